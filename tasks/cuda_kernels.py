"""CUDA kernels (Numba-CUDA) for the batched reconstruction: back-projection of every radial
bin of a slice at once, bins innermost in memory.

The kernels are compiled on first use and take device arrays (cupy arrays, through the CUDA
array interface) on the GPU. Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) the
same kernels run on numpy arrays on the CPU, slowly: the tests use that to check the kernel
arithmetic against the sparse-matrix back-projection on machines without a GPU
(tests/test_reconstruct.py), and the GPU machine checks the compiled kernel against the CPU
path (``@pytest.mark.gpu``).

Layout: the filtered sinogram is ``(n_angle, n_translation, n_bin)`` float32, C order, so the
threads of a warp (consecutive bins of one pixel) read 32 consecutive floats of one detector
sample: every read is coalesced, and one angle's plane (``n_translation x n_bin`` floats,
2 MB for 256 x 2000) stays in L2 while all pixels use it.
"""

from __future__ import annotations

import math

import numpy as np

_KERNELS: dict = {}
cuda = None  # numba.cuda, imported on first use (a module global: the simulator swaps it)


class CudaKernelError(RuntimeError):
    """The Numba-CUDA kernels cannot run here (numba missing, no GPU and no simulator)."""


def available() -> tuple[bool, str]:
    """Whether the Numba-CUDA kernels can run: (ok, reason)."""
    try:
        from numba import cuda  # noqa: PLC0415
    except ImportError as err:
        return False, f"numba is not installed ({err})"
    try:
        if cuda.is_available():
            return True, "numba-cuda sees a GPU"
    except Exception as err:  # noqa: BLE001 - any driver problem means "not available"
        return False, f"numba-cuda: {err}"
    return False, "numba-cuda sees no GPU"


def _build():
    global cuda
    from numba import cuda  # noqa: PLC0415

    @cuda.jit(fastmath=False)
    def bp_joseph(f, cosv, sinv, inv_a, xs, ys, center, out):
        """out[p, b] = sum_a sum_{k=0,1} w_k(a, p) f[a, i0 + k, b] (Joseph weights)."""
        p = cuda.blockIdx.x
        b = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
        na, nt, nb = f.shape
        if b >= nb or p >= xs.shape[0]:
            return
        x = xs[p]
        y = ys[p]
        acc = np.float32(0.0)
        for a in range(na):
            t = x * cosv[a] + y * sinv[a] + center
            i0 = math.floor(t)
            frac = np.float32(t - i0)
            inv = inv_a[a]
            w0 = max(np.float32(0.0), np.float32(1.0) - frac * inv) * inv
            w1 = max(np.float32(0.0), np.float32(1.0) - (np.float32(1.0) - frac) * inv) * inv
            j = int(i0)
            if 0 <= j < nt:
                acc += w0 * f[a, j, b]
            if 0 <= j + 1 < nt:
                acc += w1 * f[a, j + 1, b]
        out[p, b] = acc

    _KERNELS["bp_joseph"] = bp_joseph


def backproject_joseph(f, angles_rad, center: float, xs, ys, out=None, *, threads: int = 128):
    """Back-project a filtered sinogram onto a set of pixels, every bin at once (CUDA kernel).

    Same operator as :func:`tasks.reconstruct.backprojection_matrix` with
    ``interpolation="joseph"`` (the transpose of astra-toolbox's ``linear``/Joseph projector):
    for each angle, the pixel's detector coordinate ``t = x cos + y sin + center`` is
    interpolated with a triangle of half-width ``a = max(|cos|, |sin|)`` and height ``1/a``;
    samples off the detector read zeros. One thread per (pixel, bin), the bins of a pixel in
    consecutive threads; the pixel's coordinate is computed in float64, the weights and the
    sum in float32.

    Parameters
    ----------
    f : cupy.ndarray (numpy under the simulator), shape (n_angle, n_translation, n_bin), float32
        Filtered sinogram, C-contiguous.
    angles_rad : array_like, shape (n_angle,)
        Angles in radians (host array).
    center : float
        Rotation-axis position in translation pixels.
    xs, ys : array, shape (n_pixel,), float64
        Pixel centres in translation steps, on the same device as ``f``.
    out : array, shape (n_pixel, n_bin), float32, optional
        Written in place; allocated when None.
    threads : int
        Threads per block along the bins (a multiple of 32).

    Returns
    -------
    array, shape (n_pixel, n_bin), float32
        On the module of ``f``.

    Raises
    ------
    CudaKernelError
        numba is not installed.
    ValueError
        Wrong shapes or dtypes.
    """
    try:
        from numba import cuda  # noqa: PLC0415
    except ImportError as err:
        raise CudaKernelError(f"numba is not installed: {err}") from err
    if "bp_joseph" not in _KERNELS:
        _build()
    if f.ndim != 3 or f.dtype != np.float32:
        raise ValueError(f"f: expected a (n_angle, n_translation, n_bin) float32 array, got "
                         f"shape {tuple(f.shape)} dtype {f.dtype}")
    na, nt, nb = (int(v) for v in f.shape)
    ang = np.asarray(angles_rad, np.float64)
    if ang.shape != (na,):
        raise ValueError(f"angles_rad: expected {na} angles, got shape {ang.shape}")
    npix = int(xs.shape[0])
    mod = type(f).__module__.split(".")[0]
    xp = np
    if mod == "cupy":
        import cupy as xp  # noqa: PLC0415
    inv = (1.0 / np.maximum(np.abs(np.cos(ang)), np.abs(np.sin(ang)))).astype(np.float32)
    cosv, sinv, inv_a = (xp.asarray(v) for v in (np.cos(ang), np.sin(ang), inv))
    if out is None:
        out = xp.empty((npix, nb), dtype=xp.float32)
    threads = max(32, min(int(threads), 32 * ((nb + 31) // 32)))
    grid = (npix, (nb + threads - 1) // threads)
    kern = _KERNELS["bp_joseph"]
    if xp is not np:
        stream = cuda.external_stream(xp.cuda.get_current_stream().ptr)
        kern[grid, threads, stream](f, cosv, sinv, inv_a, xs, ys, np.float64(center), out)
    else:  # the CUDA simulator
        kern[grid, threads](f, cosv, sinv, inv_a, xs, ys, np.float64(center), out)
    return out
