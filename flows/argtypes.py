"""argparse types shared by every ``xrdct`` subcommand: a bad option value is one line
naming the option and what was expected (argparse prints ``argument --X: <message>`` and
exits 2), before any work starts."""

from __future__ import annotations

import argparse
import math


def whole(lo: int = 1):
    """argparse type: an integer >= ``lo``."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {lo}, got {v}")
        return v

    parse.__name__ = f"whole number >= {lo}"
    return parse


def real(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
         hi_open: bool = False):
    """argparse type: a finite number within ``[lo, hi]`` (``(lo`` / ``hi)`` when open)."""
    lb = "(" if lo_open else "["
    rb = ")" if hi_open else "]"
    want = f"a number in {lb}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{rb}"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        bad = not math.isfinite(v)
        if lo is not None:
            bad = bad or (v <= lo if lo_open else v < lo)
        if hi is not None:
            bad = bad or (v >= hi if hi_open else v > hi)
        if bad:
            raise argparse.ArgumentTypeError(f"expected {want}, got {v:g}")
        return v

    parse.__name__ = want
    return parse


def nonempty(text: str) -> str:
    """argparse type: a non-blank string (path, name)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty value")
    return text


positive_int = whole(1)
seed = whole(0)
