"""Array-module dispatch: one code path for numpy and cupy arrays."""

from __future__ import annotations

import numpy as np


def get_xp(*arrays):
    """Return the array module (``numpy`` or ``cupy``) of the given arrays.

    cupy is imported only when one of the arrays is a cupy array, so CPU-only machines
    never import it.
    """
    for a in arrays:
        mod = type(a).__module__
        if mod.startswith("cupy"):
            import cupy  # noqa: PLC0415 - lazy by design

            return cupy
    return np


def to_numpy(a):
    """Return ``a`` as a numpy array (copying from the GPU when it is a cupy array)."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)
