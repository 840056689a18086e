"""CPU back-projection of :func:`tasks.reconstruct.fbp`: every radial bin of a slice at once,
bins innermost, threaded over tiles of pixels.

The same operator as :func:`tasks.reconstruct.backprojection_matrix` (Joseph's triangle,
the transpose of astra-toolbox's ``linear`` projector, or plain linear interpolation),
applied without building the sparse matrix: for each tile of 8 x 8 pixels and each angle,
the two weights of each pixel are computed once and the inner loop runs over the bins
(contiguous, vectorised by LLVM), so the tile's 64 output rows and the angle's few detector
rows stay in cache. scipy's ``csr_matvecs`` does the same arithmetic on one thread; this
kernel releases the GIL (``nogil``) and tiles are shared among threads, so it scales with
cores. The pixel's detector coordinate is computed in float64 and its sub-pixel fraction
and weights in float32, as :func:`~tasks.reconstruct.backprojection_matrix` does; sums are
float32 in angle order, so results differ from the sparse product by rounding only
(tests/test_reconstruct.py). Compiled on first use and cached on disk (``cache=True``).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

TILE = 8


@njit(cache=True, nogil=True, fastmath=False, boundscheck=False)
def _bp_tiles(f, cosv, sinv, inva, tiles, t0, t1, mask, center, joseph, out):
    na, nt, nb = f.shape
    c0 = (nt - 1) / 2.0
    for k in range(t0, t1):
        r0 = tiles[k, 0]
        q0 = tiles[k, 1]
        for a in range(na):
            c = cosv[a]
            s = sinv[a]
            inv = inva[a]
            for r in range(r0, min(r0 + TILE, nt)):
                y = c0 - r
                for q in range(q0, min(q0 + TILE, nt)):
                    if not mask[r, q]:
                        continue
                    x = q - c0
                    t = x * c + y * s + center
                    fl = math.floor(t)
                    frac = np.float32(t - fl)
                    i0 = int(fl)
                    if joseph:
                        w0 = max(np.float32(0.0), np.float32(1.0) - frac * inv) * inv
                        w1 = max(np.float32(0.0), np.float32(1.0) - (np.float32(1.0) - frac) * inv) * inv
                    else:
                        w0 = np.float32(1.0) - frac
                        w1 = frac
                    p = r * nt + q
                    if 0 <= i0 < nt and w0 != 0:
                        row = f[a, i0]
                        for b in range(nb):
                            out[p, b] += w0 * row[b]
                    if 0 <= i0 + 1 < nt and w1 != 0:
                        row = f[a, i0 + 1]
                        for b in range(nb):
                            out[p, b] += w1 * row[b]


def cpu_threads() -> int:
    """Threads of the CPU back-projection: ``XRDCT_THREADS`` when set, else all cores."""
    env = os.environ.get("XRDCT_THREADS")
    if env:
        return max(1, int(env))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else (os.cpu_count() or 1))


def backproject(f, angles_rad, center, mask, *, interpolation="joseph", threads=None, out=None):
    """Back-project a filtered sinogram onto the square image grid, every bin at once (CPU).

    Parameters
    ----------
    f : numpy.ndarray, shape (n_angle, n_translation, n_bin), float32
        Filtered sinogram (C order: bins innermost).
    angles_rad : array_like, shape (n_angle,)
        Angles in radians.
    center : float
        Rotation-axis position in translation pixels.
    mask : numpy.ndarray, shape (n_translation, n_translation), bool
        Pixels to compute (the reconstruction circle); the others stay as in ``out``.
    interpolation : {"joseph", "linear"}
        See :func:`tasks.reconstruct.backprojection_matrix`.
    threads : int, optional
        Worker threads (default :func:`cpu_threads`).
    out : numpy.ndarray, shape (n_translation * n_translation, n_bin), float32, optional
        Accumulated into; zeros when None.

    Returns
    -------
    numpy.ndarray, shape (n_translation * n_translation, n_bin), float32
        Pixel ``(row i, column j)`` at ``x = j - c0``, ``y = c0 - i`` translation steps.

    Raises
    ------
    ValueError
        Wrong shapes, dtypes or interpolation.
    """
    from tasks.cuda_kernels import tiles_for  # noqa: PLC0415 - numpy helper, no cupy

    if interpolation not in ("joseph", "linear"):
        raise ValueError(f"interpolation: expected 'joseph' or 'linear', got {interpolation!r}")
    f = np.ascontiguousarray(f, dtype=np.float32)
    if f.ndim != 3:
        raise ValueError(f"f: expected (n_angle, n_translation, n_bin), got shape {f.shape}")
    na, nt, nb = f.shape
    ang = np.asarray(angles_rad, np.float64).reshape(-1)
    if ang.size != na:
        raise ValueError(f"angles_rad: expected {na} angles, got {ang.size}")
    mask = np.ascontiguousarray(mask, dtype=np.bool_)
    if mask.shape != (nt, nt):
        raise ValueError(f"mask: expected shape ({nt}, {nt}), got {mask.shape}")
    if out is None:
        out = np.zeros((nt * nt, nb), np.float32)
    tiles = tiles_for(mask)
    cosv, sinv = np.cos(ang), np.sin(ang)
    inv = (1.0 / np.maximum(np.abs(cosv), np.abs(sinv))).astype(np.float32)
    joseph = interpolation == "joseph"
    n = int(threads or cpu_threads())
    n_tiles = tiles.shape[0]
    if n <= 1 or n_tiles < 2:
        _bp_tiles(f, cosv, sinv, inv, tiles, 0, n_tiles, mask, float(center), joseph, out)
        return out
    # tiles are handed out in small pieces (the circle's rows have unequal work)
    step = max(1, n_tiles // (8 * n))
    pieces = [(a, min(a + step, n_tiles)) for a in range(0, n_tiles, step)]
    with ThreadPoolExecutor(n) as pool:
        futs = [pool.submit(_bp_tiles, f, cosv, sinv, inv, tiles, a, b, mask, float(center),
                            joseph, out) for a, b in pieces]
        for fu in futs:
            fu.result()
    return out
