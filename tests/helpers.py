"""Helpers shared by several test files (imported as ``from helpers import ...``)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
PYXRDCT = REAL / "pyxrdct_sinograms"


def phantom(n, nb=1):
    """Smooth multi-bin phantom: four Gaussian blobs, each with its own 'pattern'
    (intensity vs bin), inside 0.45 n of the centre. (n, n) or (n, n, nb) float64."""
    yy, xx = np.mgrid[:n, :n]
    c0 = (n - 1) / 2
    x = (xx - c0) * 128.0 / n
    y = (c0 - yy) * 128.0 / n
    out = np.zeros((n, n, nb))
    for k, (cx, cy, r, v) in enumerate([(10, 5, 30, 1.0), (-20, -15, 12, 2.0),
                                        (25, -20, 8, 1.5), (-5, 30, 6, 3.0)]):
        pattern = 1 + 0.5 * np.sin(np.arange(nb) * (k + 1) * 0.3)
        out += (v * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * (r / 2) ** 2)))[:, :, None] * pattern
    out[x ** 2 + y ** 2 > (0.45 * 128) ** 2] = 0
    return out[:, :, 0] if nb == 1 else out


def pyxrdct_sinograms():
    """The two real PyXRDCT (ESRF ID11) sinograms as (180 angles, 708 translations)
    float32 arrays; skips the calling test when ../shared/data/real is absent.

    The files hold a (708 translations, 180 angles) dataset ``data/sinogram_00000`` and
    no angle list (180 evenly spaced angles over 0-180 deg are assumed by the tests)."""
    h5py = pytest.importorskip("h5py")
    files = sorted(PYXRDCT.glob("*.hdf5")) if PYXRDCT.is_dir() else []
    if len(files) < 2:
        pytest.skip(f"real data not available: {PYXRDCT} (../shared/data/real beside the "
                    "project) is absent")
    out = []
    for f in files:
        with h5py.File(f, "r") as h:
            d = h["data/sinogram_00000"]
            assert d.shape == (708, 180), f"{f}: data/sinogram_00000 has shape {d.shape}"
            out.append(np.ascontiguousarray(d[()].T, dtype=np.float32))
    return out


def tree_digest(path: Path) -> str:
    """SHA-256 over every file below ``path`` (relative name and bytes): equal digests mean
    byte-identical trees, e.g. two published products."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def tree_diff(a: Path, b: Path) -> list[str]:
    """Relative names of the files that differ between two trees (or are in one only):
    the message of a failed :func:`tree_digest` comparison."""
    fa = {str(p.relative_to(a)): p for p in Path(a).rglob("*") if p.is_file()}
    fb = {str(p.relative_to(b)): p for p in Path(b).rglob("*") if p.is_file()}
    return sorted(k for k in fa.keys() | fb.keys()
                  if k not in fa or k not in fb or fa[k].read_bytes() != fb[k].read_bytes())


def subprocess_env(**extra) -> dict:
    """The environment for a child Python process that must import this checkout's packages
    (the repository root first on ``PYTHONPATH``), plus ``extra``."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            **extra}
