"""Progress reporting for long stages, shown by the CLI and logged under Prefect.

Stages call :func:`report` (``stage``, ``done``, ``total``); whoever listens (the CLI's
rich progress bars) is told. Without a listener a report costs one dict lookup.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_listeners: list[Callable[[str, int, int], None]] = []
_lock = threading.Lock()


def add_listener(fn: Callable[[str, int, int], None]) -> None:
    with _lock:
        _listeners.append(fn)


def remove_listener(fn: Callable[[str, int, int], None]) -> None:
    with _lock:
        if fn in _listeners:
            _listeners.remove(fn)


def report(stage: str, done: int, total: int) -> None:
    """Tell listeners that ``done`` of ``total`` units of ``stage`` are finished."""
    for fn in list(_listeners):
        try:
            fn(stage, done, total)
        except Exception:  # noqa: BLE001 - a broken progress bar must not stop processing
            pass


def callback(stage: str) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callable for array functions, bound to ``stage``."""
    return lambda done, total: report(stage, done, total)
