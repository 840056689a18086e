"""Argument checks shared by the sinogram and reconstruction stages."""

from __future__ import annotations

import numpy as np

from tasks._xp import get_xp, to_numpy

_DIMS = {2: "(angle, translation)", 3: "(angle, translation, radial)"}


def sinogram_array(sino, error: type[Exception], *, name: str = "sino", ndims=(2, 3),
                   min_angles: int = 1):
    """``sino`` as a numpy/cupy array of ``ndims`` dimensions with at least ``min_angles``
    rows and 2 translation columns; else ``error`` naming ``name`` and the shape."""
    a = get_xp(sino).asarray(sino)
    if a.ndim not in ndims:
        want = " or ".join(_DIMS[d] for d in ndims)
        raise error(f"{name}: expected a {want} array, got shape {tuple(a.shape)}")
    if a.shape[0] < min_angles or a.shape[1] < 2:
        raise error(f"{name}: needs at least {min_angles} angle(s) and 2 translation columns, "
                    f"got shape {tuple(a.shape)}")
    return a


def angles_array(angles_deg, n_angle: int, error: type[Exception], *, name: str = "angles_deg"):
    """Angles (deg) as float64 numpy of length ``n_angle``, all finite; else ``error``."""
    ang = np.asarray(to_numpy(angles_deg), dtype=np.float64).ravel()
    if ang.size != n_angle:
        raise error(f"{name}: expected {n_angle} angles (one per sinogram row), got {ang.size}")
    if not np.all(np.isfinite(ang)):
        raise error(f"{name}: angles must be finite (degrees)")
    return ang
