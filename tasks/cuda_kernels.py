"""CUDA kernels (CuPy ``RawKernel``) for the batched reconstruction: back-projection of every
radial bin of a slice at once, bins innermost in memory.

No Numba-CUDA: numba-cuda 0.30 (the newest) fails to compile any kernel under numpy 2.5
(it calls ``np.row_stack``), so the kernels are CUDA C compiled by NVRTC through CuPy, which
the GPU path needs anyway. The CPU checks the arithmetic of the tiled algorithm through
:func:`backproject_tiled_reference`, a numpy transcription of the kernel (same tiles, same
tile-local float32 detector coordinates, same shared-memory footprint) that the tests
compare with the sparse Joseph operator of :func:`tasks.reconstruct.backprojection_matrix`;
the GPU machine checks the compiled kernel against the CPU FBP (``@pytest.mark.gpu``).

Design (Joseph back-projection, the transpose of astra-toolbox's ``linear`` projector):

* one block = a tile of ``TILE x TILE`` pixels x 32 consecutive radial bins; 256 threads as
  8 warps x 32 lanes, lane = bin, warp = one pixel row of the tile, so each thread keeps
  ``TILE`` accumulators (one per pixel of its row) in registers;
* per group of ``ANGLES_PER_STAGE`` angles, the block stages the detector footprint of its
  tile (at most ``FOOTPRINT`` samples x 32 bins per angle) from global memory into shared
  memory with coalesced 128-byte reads (bins innermost), then every thread reads its
  samples from shared memory without bank conflicts (lane = bin = bank);
* blocks are ordered tile-fastest, so the blocks resident at once share one 32-bin column
  of the filtered sinogram (``n_angle x n_translation x 32`` floats, ~13 MB at
  400 x 256): it stays in L2 and DRAM is read about once;
* the tile origin's detector coordinate is computed in float64 per angle, the in-tile
  offsets in float32 (|offset| < TILE * sqrt(2)), so the sub-pixel fraction keeps ~1e-6
  absolute precision for detectors of any width.

The filtered sinogram is ``(n_angle, n_translation, n_bin)`` float32, C order.
"""

from __future__ import annotations

import math

import numpy as np

TILE = 8                 # pixels per tile side (one warp per tile row)
LANES = 32               # bins per block (one per lane)
ANGLES_PER_STAGE = 16    # angles staged in shared memory at once
# detector samples a tile can touch at one angle: the projection of the tile's diagonal
# ((TILE - 1) * (|cos| + |sin|) <= (TILE - 1) * sqrt(2)), +1 for the floor, +1 for i0 + 1,
# +1 margin below (the footprint starts one sample early, so float32 rounding of the
# in-tile coordinate never falls below sample 0) and +1 above
FOOTPRINT = int(math.ceil((TILE - 1) * math.sqrt(2.0))) + 5

_SOURCE = r"""
#define TILE %(TILE)d
#define LANES %(LANES)d
#define AST %(AST)d
#define FP %(FP)d
extern "C" __global__ void bp_joseph_tiled(
    const float* __restrict__ f,       // (na, nt, nb)
    const double* __restrict__ cosv,   // (na,)
    const double* __restrict__ sinv,   // (na,)
    const float* __restrict__ inva,    // (na,) 1 / max(|cos|, |sin|)
    const int* __restrict__ tiles,     // (n_tiles, 2): row0, col0
    const unsigned char* __restrict__ mask,  // (nt * nt,) pixels to write
    int na, int nt, int nb, double center, double c0,
    float* __restrict__ out)           // (nt * nt, nb)
{
    __shared__ float sm[AST][FP][LANES];
    __shared__ int jmin_s[AST];
    __shared__ float lt_s[AST];
    const int lane = threadIdx.x;
    const int row = threadIdx.y;                 // 0 .. TILE - 1
    const int tile = blockIdx.x;
    const int b = blockIdx.y * LANES + lane;
    const int r0 = tiles[2 * tile];
    const int q0 = tiles[2 * tile + 1];
    // tile origin (row r0, column q0) in translation steps: x = q - c0, y = c0 - r
    const double x0 = (double)q0 - c0;
    const double y0 = c0 - (double)r0;
    float acc[TILE];
    #pragma unroll
    for (int k = 0; k < TILE; ++k) acc[k] = 0.0f;
    const int tid = row * LANES + lane;
    const int nthreads = LANES * TILE;
    for (int a0 = 0; a0 < na; a0 += AST) {
        const int nag = min(AST, na - a0);
        if (tid < nag) {
            const int a = a0 + tid;
            const double c = cosv[a], s = sinv[a];
            const double to = x0 * c + y0 * s + center;
            // corners of the tile: offsets dx * c - dy * s with dx, dy in [0, TILE - 1]
            double lo = to + fmin(0.0, (TILE - 1) * c) + fmin(0.0, -(TILE - 1) * s);
            int jm = (int)floor(lo) - 1;
            jmin_s[tid] = jm;
            lt_s[tid] = (float)(to - (double)jm);
        }
        __syncthreads();
        for (int e = tid / LANES; e < nag * FP; e += nthreads / LANES) {
            const int al = e / FP;
            const int k = e - al * FP;
            const int j = jmin_s[al] + k;
            float v = 0.0f;
            if (b < nb && j >= 0 && j < nt) v = f[((size_t)(a0 + al) * nt + j) * nb + b];
            sm[al][k][lane] = v;
        }
        __syncthreads();
        for (int al = 0; al < nag; ++al) {
            const int a = a0 + al;
            const float c = (float)cosv[a], s = (float)sinv[a];
            const float inv = inva[a];
            const float base = lt_s[al] - (float)row * s;
            #pragma unroll
            for (int dx = 0; dx < TILE; ++dx) {
                const float t = base + (float)dx * c;
                const float fl = floorf(t);
                const float frac = t - fl;
                int i0 = (int)fl;
                i0 = max(0, min(FP - 2, i0));
                const float w0 = fmaxf(0.0f, 1.0f - frac * inv) * inv;
                const float w1 = fmaxf(0.0f, 1.0f - (1.0f - frac) * inv) * inv;
                acc[dx] += w0 * sm[al][i0][lane] + w1 * sm[al][i0 + 1][lane];
            }
        }
        __syncthreads();
    }
    if (b >= nb) return;
    const int r = r0 + row;
    if (r >= nt) return;
    #pragma unroll
    for (int dx = 0; dx < TILE; ++dx) {
        const int q = q0 + dx;
        if (q < nt) {
            const size_t p = (size_t)r * nt + q;
            if (mask[p]) out[p * nb + b] = acc[dx];
        }
    }
}
""" % {"TILE": TILE, "LANES": LANES, "AST": ANGLES_PER_STAGE, "FP": FOOTPRINT}

_KERNELS: dict = {}


class CudaKernelError(RuntimeError):
    """The CUDA kernels cannot run here (cupy missing or no GPU)."""


def available() -> tuple[bool, str]:
    """Whether the CuPy CUDA kernels can run: ``(ok, reason)``; never raises."""
    from tasks._xp import gpu_status  # noqa: PLC0415

    return gpu_status()


def _kernel():
    return _raw_kernel("bp", "%s", _SOURCE, "bp_joseph_tiled")


def tiles_for(mask):
    """Origins of the ``TILE x TILE`` pixel tiles that hold at least one pixel of ``mask``.

    Parameters
    ----------
    mask : numpy.ndarray, shape (n, n), bool
        Pixels to reconstruct (rows = y from top, columns = x).

    Returns
    -------
    numpy.ndarray, shape (n_tiles, 2), int32
        ``(row0, col0)`` of each tile, row-major.
    """
    n = mask.shape[0]
    nt_ = (n + TILE - 1) // TILE
    pad = np.zeros((nt_ * TILE, nt_ * TILE), bool)
    pad[:n, :n] = mask
    any_ = pad.reshape(nt_, TILE, nt_, TILE).any(axis=(1, 3))
    r, q = np.nonzero(any_)
    return np.stack([r * TILE, q * TILE], axis=1).astype(np.int32)


def _check(f, angles_rad, mask):
    if f.ndim != 3 or f.dtype != np.float32:
        raise ValueError(f"f: expected a (n_angle, n_translation, n_bin) float32 array, got "
                         f"shape {tuple(f.shape)} dtype {f.dtype}")
    na, nt, nb = (int(v) for v in f.shape)
    ang = np.asarray(angles_rad, np.float64)
    if ang.shape != (na,):
        raise ValueError(f"angles_rad: expected {na} angles, got shape {ang.shape}")
    if tuple(mask.shape) != (nt, nt):
        raise ValueError(f"mask: expected shape ({nt}, {nt}), got {tuple(mask.shape)}")
    return na, nt, nb, ang


def backproject_joseph(f, angles_rad, center: float, mask, out=None):
    """Back-project a filtered sinogram onto the square image grid, every bin at once (GPU).

    Same operator as :func:`tasks.reconstruct.backprojection_matrix` with
    ``interpolation="joseph"`` (the transpose of astra-toolbox's ``linear``/Joseph projector;
    Joseph 1982, IEEE TMI 1:192): for each angle, the pixel's detector coordinate
    ``t = x cos + y sin + center`` is interpolated with a triangle of half-width
    ``a = max(|cos|, |sin|)`` and height ``1/a``; samples off the detector read zeros.
    Pixel ``(row i, column j)`` sits at ``x = j - c0``, ``y = c0 - i`` translation steps,
    ``c0 = (n - 1) / 2``.

    Parameters
    ----------
    f : cupy.ndarray, shape (n_angle, n_translation, n_bin), float32
        Filtered sinogram, C-contiguous.
    angles_rad : array_like, shape (n_angle,)
        Angles in radians (host array).
    center : float
        Rotation-axis position in translation pixels.
    mask : numpy.ndarray, shape (n_translation, n_translation), bool
        Pixels to compute; the others are left untouched in ``out``.
    out : cupy.ndarray, shape (n_translation * n_translation, n_bin), float32, optional
        Written in place where ``mask``; allocated with zeros when None.

    Returns
    -------
    cupy.ndarray, shape (n_translation * n_translation, n_bin), float32

    Raises
    ------
    CudaKernelError
        cupy is not installed or sees no GPU.
    ValueError
        Wrong shapes or dtypes.
    """
    try:
        import cupy as cp  # noqa: PLC0415
    except ImportError as err:
        raise CudaKernelError(f"cupy is not installed: {err}") from err
    na, nt, nb, ang = _check(f, angles_rad, mask)
    mask = np.asarray(mask, bool)
    tiles = tiles_for(mask)
    inv = (1.0 / np.maximum(np.abs(np.cos(ang)), np.abs(np.sin(ang)))).astype(np.float32)
    if out is None:
        out = cp.zeros((nt * nt, nb), dtype=cp.float32)
    if tiles.shape[0] == 0:
        return out
    f = cp.ascontiguousarray(f)
    args = (f, cp.asarray(np.cos(ang)), cp.asarray(np.sin(ang)), cp.asarray(inv),
            cp.asarray(tiles), cp.asarray(mask.ravel().astype(np.uint8)),
            np.int32(na), np.int32(nt), np.int32(nb), np.float64(center),
            np.float64((nt - 1) / 2.0), out)
    grid = (int(tiles.shape[0]), (nb + LANES - 1) // LANES)
    _kernel()(grid, (LANES, TILE), args)
    return out


def backproject_tiled_reference(f, angles_rad, center: float, mask):
    """The GPU kernel's algorithm in numpy, for checking its arithmetic on the CPU.

    Transcribes :func:`backproject_joseph`'s kernel step by step (tiles, the float64 tile
    origin and float32 in-tile offsets, the clamped ``FOOTPRINT``-sample staging of each
    angle), vectorised over bins. Slow; for tests.

    Parameters
    ----------
    f : numpy.ndarray, shape (n_angle, n_translation, n_bin), float32
    angles_rad : array_like, shape (n_angle,)
    center : float
    mask : numpy.ndarray, shape (n_translation, n_translation), bool

    Returns
    -------
    numpy.ndarray, shape (n_translation * n_translation, n_bin), float32
    """
    na, nt, nb, ang = _check(f, angles_rad, mask)
    c0 = (nt - 1) / 2.0
    out = np.zeros((nt * nt, nb), np.float32)
    cosd, sind = np.cos(ang), np.sin(ang)
    inv = (1.0 / np.maximum(np.abs(cosd), np.abs(sind))).astype(np.float32)
    fpad = np.zeros((na, nt + 2 * FOOTPRINT + 2, nb), np.float32)
    off = FOOTPRINT + 1
    fpad[:, off:off + nt] = f
    for r0, q0 in tiles_for(mask):
        x0, y0 = q0 - c0, c0 - r0
        acc = np.zeros((TILE, TILE, nb), np.float32)
        for a in range(na):
            c, s = cosd[a], sind[a]
            to = x0 * c + y0 * s + center
            jm = int(np.floor(to + min(0.0, (TILE - 1) * c) + min(0.0, -(TILE - 1) * s))) - 1
            lt = np.float32(to - jm)
            lo, hi = jm + off, jm + off + FOOTPRINT
            if hi <= 0 or lo >= fpad.shape[1]:
                continue  # the whole footprint is off the detector: zeros
            sm = np.zeros((FOOTPRINT, nb), np.float32)
            a_lo, a_hi = max(lo, 0), min(hi, fpad.shape[1])
            sm[a_lo - lo:a_hi - lo] = fpad[a, a_lo:a_hi]
            cf, sf, iv = np.float32(c), np.float32(s), inv[a]
            for row in range(TILE):
                base = np.float32(lt - np.float32(row) * sf)
                for dx in range(TILE):
                    t = np.float32(base + np.float32(dx) * cf)
                    fl = np.floor(t)
                    frac = np.float32(t - fl)
                    i0 = min(max(int(fl), 0), FOOTPRINT - 2)
                    w0 = np.float32(max(0.0, 1.0 - frac * iv) * iv)
                    w1 = np.float32(max(0.0, 1.0 - (1.0 - frac) * iv) * iv)
                    acc[row, dx] += w0 * sm[i0] + w1 * sm[i0 + 1]
        for row in range(TILE):
            for dx in range(TILE):
                r, q = r0 + row, q0 + dx
                if r < nt and q < nt and mask[r, q]:
                    out[r * nt + q] = acc[row, dx]
    return out


# --------------------------------------------------------------------------------------
# radial integration: one fused CSR kernel over frames in their detector dtype
# --------------------------------------------------------------------------------------

_NULL = np.uint64(0)      # a NULL pointer argument
# shared by the per-bin kernels: whether a raw detector value is a pixel to use (pyFAI's
# dynamic mask: the detector's dummy value within its tolerance, non-finite floats)
_VALID_PIXEL = r"""
__device__ __forceinline__ bool valid_pixel(float raw, int is_float, int use_dummy,
                                            float dummy, float delta) {
    if (is_float && !isfinite(raw)) return false;
    if (use_dummy && (delta == 0.0f ? raw == dummy : fabsf(raw - dummy) <= delta)) return false;
    return true;
}
"""
FRAMES_PER_BLOCK = 4      # frames per block (CSR entries read once per group); H200 sweep: 4 > 8 > 16
INTEGRATE_THREADS = 256

_INTEGRATE_SOURCE = r"""
#define NF %(NF)d
#define NT %(NT)d
typedef %(T)s pix_t;
%(VALID)s
extern "C" __global__ void integrate_csr(
    const pix_t* __restrict__ frames,     // (n, npix), detector dtype, frame-major
    long long npix, int n,
    const int* __restrict__ indptr,       // (nbins + 1,)
    const int* __restrict__ indices,      // (nnz,) pixel of each entry
    const float* __restrict__ coef,       // (nnz,) CSR coefficient c
    const float* __restrict__ omega,      // (npix,) solid angle x polarisation x flat
    const float* __restrict__ dark,       // (npix,) or NULL
    const double* __restrict__ norm,      // (nbins,) sum c * omega
    const double* __restrict__ mon,       // (n,) or NULL
    int use_dummy, float dummy, float delta, int is_float, int do_var,
    int nbins,
    float* __restrict__ intensity,        // (n, nbins)
    float* __restrict__ sigma)            // (n, nbins) or NULL
{
    const int bin = blockIdx.x;
    const int f0 = blockIdx.y * NF;
    const int nf = min(NF, n - f0);
    const int start = indptr[bin], stop = indptr[bin + 1];
    double s[NF], v[NF], lost[NF];
    #pragma unroll
    for (int k = 0; k < NF; ++k) { s[k] = 0.0; v[k] = 0.0; lost[k] = 0.0; }
    for (int j = start + threadIdx.x; j < stop; j += NT) {
        const long long p = indices[j];
        const float c = coef[j];
        const float d = dark ? dark[p] : 0.0f;
        #pragma unroll
        for (int k = 0; k < NF; ++k) {
            if (k < nf) {
                const float x = (float)frames[(long long)(f0 + k) * npix + p];
                if (!valid_pixel(x, is_float, use_dummy, dummy, delta)) {
                    lost[k] += (double)c * (double)omega[p];
                } else {
                    s[k] += (double)c * (double)(x - d);
                    if (do_var) v[k] += (double)c * (double)c * (double)fmaxf(x, 1.0f);
                }
            }
        }
    }
    // block reduction: warp shuffles, then one value per warp in shared memory
    __shared__ double red[3][NF][NT / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    #pragma unroll
    for (int k = 0; k < NF; ++k) {
        double a = s[k], b = v[k], e = lost[k];
        for (int off = 16; off > 0; off >>= 1) {
            a += __shfl_down_sync(0xffffffff, a, off);
            b += __shfl_down_sync(0xffffffff, b, off);
            e += __shfl_down_sync(0xffffffff, e, off);
        }
        if (lane == 0) { red[0][k][warp] = a; red[1][k][warp] = b; red[2][k][warp] = e; }
    }
    __syncthreads();
    if (threadIdx.x < nf) {
        const int k = threadIdx.x;
        double a = 0.0, b = 0.0, e = 0.0;
        for (int w = 0; w < NT / 32; ++w) { a += red[0][k][w]; b += red[1][k][w]; e += red[2][k][w]; }
        double den = norm[bin] - e;
        if (mon) den *= mon[f0 + k];
        const long long o = (long long)(f0 + k) * nbins + bin;
        const bool good = den > 0.0;
        intensity[o] = good ? (float)(a / den) : 0.0f;
        if (sigma) sigma[o] = good ? (float)(sqrt(b) / den) : 0.0f;
    }
}
"""

_CTYPES = {"uint8": "unsigned char", "int8": "signed char", "uint16": "unsigned short",
           "int16": "short", "uint32": "unsigned int", "int32": "int", "float32": "float",
           "float64": "double", "int64": "long long", "uint64": "unsigned long long"}


def _raw_kernel(key, template, fmt, name):
    """The CuPy ``RawKernel`` ``name`` of ``template % fmt``, compiled once per ``key``."""
    if key not in _KERNELS:
        import cupy as cp  # noqa: PLC0415

        _KERNELS[key] = cp.RawKernel(template % fmt, name, options=("-std=c++14",))
    return _KERNELS[key]


def _ctype(dtype, what: str) -> str:
    """The C type of a frame dtype; ValueError for one no kernel reads."""
    name = np.dtype(dtype).name
    if name not in _CTYPES:
        raise ValueError(f"frames: dtype {name} has no {what} kernel")
    return _CTYPES[name]


def _flat_frames(frames, indptr):
    """``(frames as (n, npix) C-contiguous, n, npix, nbins)`` for the per-bin kernels."""
    import cupy as cp  # noqa: PLC0415

    n = int(frames.shape[0])
    npix = int(np.prod(frames.shape[1:]))
    return cp.ascontiguousarray(frames).reshape(n, npix), n, npix, int(indptr.shape[0]) - 1


def _validity_args(fr, dummy, delta):
    """Kernel arguments of the invalid-pixel test: use_dummy, dummy, delta, is_float."""
    return (np.int32(dummy is not None), np.float32(dummy if dummy is not None else 0.0),
            np.float32(delta or 0.0), np.int32(np.issubdtype(fr.dtype, np.floating)))


def _integrate_kernel(dtype, nf=FRAMES_PER_BLOCK, nt=INTEGRATE_THREADS):
    return _raw_kernel(("integrate", np.dtype(dtype).name, nf, nt), _INTEGRATE_SOURCE,
                       {"NF": nf, "NT": nt, "T": _ctype(dtype, "integration"),
                        "VALID": _VALID_PIXEL}, "integrate_csr")


def integrate_csr(frames, indptr, indices, coef, omega, norm, *, monitor=None, dark=None,
                  dummy=None, delta=None, poisson=True, frames_per_block=FRAMES_PER_BLOCK,
                  threads=INTEGRATE_THREADS):
    """Azimuthal integration of a batch of frames by one fused CSR kernel (GPU).

    Per bin ``b`` and frame ``f``: ``I = sum_j c_j (x_fj - dark_j) / (mon_f (norm_b -
    sum_{j invalid} c_j omega_j))`` and, with ``poisson``, ``sigma = sqrt(sum_j c_j^2
    max(x_fj, 1)) / (same denominator)``: pyFAI's ``integrate1d_ng`` CSR arithmetic
    (Kieffer et al., J. Synchrotron Rad. 2020, 27, 1451), with invalid pixels (the
    detector's dummy value within ``delta``, non-finite floats) left out of the sums and
    of the normalisation. One block per (bin, group of :data:`FRAMES_PER_BLOCK` frames):
    the bin's CSR entries are read once for the group and every pixel of every frame is
    read once, in its detector dtype; products are accumulated in float64 and reduced in
    the block. No float copy, transposition, variance array or second matrix is made.

    Parameters
    ----------
    frames : cupy.ndarray, shape (n, H, W) or (n, npix), any real dtype, C-contiguous
    indptr, indices : cupy.ndarray, int32
        CSR row pointer (nbins + 1,) and pixel indices (nnz,).
    coef : cupy.ndarray, shape (nnz,), float32
    omega : cupy.ndarray, shape (npix,), float32
    norm : cupy.ndarray, shape (nbins,), float64
        ``sum_j c_j omega_j`` per bin.
    monitor : cupy.ndarray, shape (n,), float64, optional
    dark : cupy.ndarray, shape (npix,), float32, optional
    dummy, delta : float, optional
        Detector dummy value and tolerance (pyFAI ``get_dummies``).
    poisson : bool
        Also return the Poisson-propagated standard error.
    frames_per_block, threads : int
        Launch shape (tuning; ``threads`` a multiple of 32).

    Returns
    -------
    intensity, sigma : cupy.ndarray, shape (n, nbins), float32 (sigma None without poisson)

    Raises
    ------
    CudaKernelError
        cupy is missing.
    ValueError
        Unsupported dtype or inconsistent shapes.
    """
    try:
        import cupy as cp  # noqa: PLC0415
    except ImportError as err:
        raise CudaKernelError(f"cupy is not installed: {err}") from err
    fr, n, npix, nbins = _flat_frames(frames, indptr)
    if omega.shape[0] != npix:
        raise ValueError(f"omega: {omega.shape[0]} pixels, frames have {npix}")
    out_i = cp.empty((n, nbins), cp.float32)
    out_s = cp.empty((n, nbins), cp.float32) if poisson else None
    args = (fr, np.int64(npix), np.int32(n), indptr, indices, coef, omega,
            dark if dark is not None else _NULL, norm,
            monitor if monitor is not None else _NULL, *_validity_args(fr, dummy, delta),
            np.int32(bool(poisson)), np.int32(nbins), out_i,
            out_s if out_s is not None else _NULL)
    nf, nt = int(frames_per_block), int(threads)
    if nf < 1 or nt < 32 or nt % 32:
        raise ValueError(f"frames_per_block={nf}, threads={nt}: expected >= 1 and a multiple of 32")
    grid = (nbins, (n + nf - 1) // nf)
    if n:
        _integrate_kernel(fr.dtype, nf, nt)(grid, (nt,), args)
    return out_i, out_s


# --------------------------------------------------------------------------------------
# sigma clipping: one block per (bin, frame), every iteration inside the kernel
# --------------------------------------------------------------------------------------

CLIP_THREADS = 256

_CLIP_SOURCE = r"""
#define NT %(NT)d
#define K %(K)d
typedef %(T)s pix_t;
%(VALID)s

// block-wide sum of NV doubles; every thread gets the totals in tot[]
template <int NV>
__device__ void block_sum(double* v, double (*red)[NT / 32], double* tot) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    #pragma unroll
    for (int k = 0; k < NV; ++k) {
        double a = v[k];
        for (int off = 16; off > 0; off >>= 1) a += __shfl_down_sync(0xffffffff, a, off);
        if (lane == 0) red[k][warp] = a;
    }
    __syncthreads();
    if (threadIdx.x < NV) {
        double a = 0.0;
        for (int w = 0; w < NT / 32; ++w) a += red[threadIdx.x][w];
        red[threadIdx.x][0] = a;
    }
    __syncthreads();
    #pragma unroll
    for (int k = 0; k < NV; ++k) tot[k] = red[k][0];
    __syncthreads();
}

extern "C" __global__ void sigma_clip_csr(
    const pix_t* __restrict__ frames, long long npix, int n,
    const long long* __restrict__ indptr,   // (nbins + 1,) bin segments of the no-split matrix
    const long long* __restrict__ pix,      // (P,) detector pixel of each entry, bin order
    const double* __restrict__ om,          // (P,) omega of each entry
    const float* __restrict__ dark,         // (P,) or NULL
    int use_dummy, float dummy, float delta, int is_float, int poisson,
    double thres, int max_iter, int nbins,
    double* __restrict__ out_mean, double* __restrict__ out_sem)   // (n, nbins)
{
    const int bin = blockIdx.x, f = blockIdx.y;
    const long long start = indptr[bin], stop = indptr[bin + 1];
    __shared__ double red[6][NT / 32];
    // this thread's entries: j = start + threadIdx.x + k * NT, k < K
    float sig[K], var[K], x[K];
    unsigned long long valid = 0ull;
    const pix_t* fr = frames + (long long)f * npix;
    #pragma unroll
    for (int k = 0; k < K; ++k) {
        const long long j = start + threadIdx.x + (long long)k * NT;
        sig[k] = 0.0f; var[k] = 0.0f; x[k] = 0.0f;
        if (j < stop) {
            const float raw = (float)fr[pix[j]];
            if (valid_pixel(raw, is_float, use_dummy, dummy, delta)) {
                const float s = dark ? raw - dark[j] : raw;
                sig[k] = s;
                var[k] = fmaxf(raw, 1.0f);
                x[k] = s / (float)om[j];
                valid |= (1ull << k);
            }
        }
    }
    double tot[6];
    double mean = 0.0, vsum = 0.0, w = 0.0, cnt = 0.0;
    for (int it = 0; ; ++it) {
        // sums over the valid entries: sig, w, w2, cnt, and var (Poisson) or sig2, wsig
        double v[6] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
        #pragma unroll
        for (int k = 0; k < K; ++k) {
            if (valid & (1ull << k)) {
                const long long j = start + threadIdx.x + (long long)k * NT;
                const double o = om[j], s = (double)sig[k];
                v[0] += s; v[1] += o; v[2] += o * o; v[3] += 1.0;
                if (poisson) v[4] += (double)var[k];
                else { v[4] += s * s; v[5] += s * o; }
            }
        }
        block_sum<6>(v, red, tot);
        w = tot[1]; cnt = tot[3];
        mean = tot[0] / w;
        vsum = poisson ? tot[4] : fmax(tot[4] - 2.0 * mean * tot[5] + mean * mean * tot[2], 0.0);
        const double std_ = sqrt(vsum / tot[2]);
        if (it >= max_iter) break;
        const double c3 = fmax(cnt, 3.0);
        const double lim = fmax(thres, sqrt(2.0 * log(c3 / sqrt(2.0 * 3.141592653589793)))) * std_;
        const float lo = (float)(mean - lim), hi = (float)(mean + lim);
        int rejected = 0;
        #pragma unroll
        for (int k = 0; k < K; ++k) {
            if ((valid & (1ull << k)) && (x[k] < lo || x[k] > hi)) {
                valid &= ~(1ull << k);
                rejected = 1;
            }
        }
        if (__syncthreads_or(rejected) == 0) break;
    }
    if (threadIdx.x == 0) {
        const long long o = (long long)f * nbins + bin;
        const bool good = (w > 0.0) && (cnt > 0.5);
        out_mean[o] = good ? mean : 0.0;
        out_sem[o] = good ? sqrt(vsum) / w : 0.0;
    }
}
"""


def clip_entries_per_thread(max_count: int, threads: int = CLIP_THREADS) -> int:
    """Entries each thread of :func:`sigma_clip_csr` holds in registers for the largest bin
    (a power of two, at most 64: one bit each in a 64-bit validity mask).

    Raises
    ------
    ValueError
        A bin holds more than ``64 * threads`` pixels.
    """
    need = max(1, -(-int(max_count) // int(threads)))
    if need > 64:
        raise ValueError(f"a bin holds {max_count} pixels; the clipping kernel takes at most "
                         f"{64 * threads} (use fewer radial bins or the array path)")
    k = 1
    while k < need:
        k *= 2
    return k


def sigma_clip_csr(frames, indptr, pix, om, dark, *, max_count, dummy=None, delta=None,
                   poisson=True, thres=4.0, max_iter=5):
    """Sigma-clipped mean per bin of a batch of frames, every iteration in one kernel (GPU).

    pyFAI's ``sigma_clip_ng`` rule (Kieffer et al., J. Synchrotron Rad. 2020, 27, 1451;
    its OpenCL kernel ``csr_sigma_clip4``): per bin, pixels whose corrected value
    ``(x - dark) / omega`` lies further than ``max(thres, sqrt(2 ln(n / sqrt(2 pi))))``
    standard deviations from the mean are rejected and the statistics recomputed, up to
    ``max_iter`` times or until nothing is rejected. One block per (bin, frame): the bin's
    pixels are gathered once into registers (``K`` per thread, validity as a bit mask),
    then every iteration is a block reduction in float64 and a register test; no sort, no
    prefix sum, no host round trip. The same statistics as
    :meth:`tasks.integrate.RadialIntegrator._sigma_clip_array` (which equals pyFAI).

    Parameters
    ----------
    frames : cupy.ndarray, shape (n, H, W) or (n, npix), detector dtype
    indptr : cupy.ndarray, shape (nbins + 1,), int64
    pix : cupy.ndarray, shape (P,), int64
        Detector pixel of each entry of the no-split matrix, bin order.
    om : cupy.ndarray, shape (P,), float64
    dark : cupy.ndarray, shape (P,), float32, or None
    max_count : int
        Largest number of pixels in a bin (sets the entries per thread).
    dummy, delta : float, optional
    poisson : bool
        Poisson error model (else the azimuthal spread).
    thres : float
    max_iter : int

    Returns
    -------
    mean, sem : cupy.ndarray, shape (n, nbins), float64
    """
    import cupy as cp  # noqa: PLC0415

    fr, n, npix, nbins = _flat_frames(frames, indptr)
    k = clip_entries_per_thread(max_count)
    kern = _raw_kernel(("clip", fr.dtype.name, k), _CLIP_SOURCE,
                       {"NT": CLIP_THREADS, "K": k, "T": _ctype(fr.dtype, "clipping"),
                        "VALID": _VALID_PIXEL},
                       "sigma_clip_csr")
    mean = cp.zeros((n, nbins), cp.float64)
    sem = cp.zeros((n, nbins), cp.float64)
    args = (fr, np.int64(npix), np.int32(n), indptr, pix, om,
            dark if dark is not None else _NULL, *_validity_args(fr, dummy, delta),
            np.int32(bool(poisson)), np.float64(thres), np.int32(max_iter), np.int32(nbins),
            mean, sem)
    if n and nbins:
        kern((nbins, n), (CLIP_THREADS,), args)
    return mean, sem


# --------------------------------------------------------------------------------------
# trimmed mean: one block per (bin, frame), bitonic sort in shared memory, weight scan
# --------------------------------------------------------------------------------------

TRIM_THREADS = 512

_TRIM_SOURCE = r"""
#define NT %(NT)d
typedef %(T)s pix_t;
%(VALID)s
extern "C" __global__ void trimmed_mean_csr(
    const pix_t* __restrict__ frames, long long npix, int n,
    const long long* __restrict__ indptr, const long long* __restrict__ pix,
    const double* __restrict__ om, const float* __restrict__ dark,
    int use_dummy, float dummy, float delta, int is_float, int poisson,
    double qlo, double qhi, int N, int nbins,
    double* __restrict__ out_mean, double* __restrict__ out_sem)
{
    extern __shared__ unsigned char smem[];
    double* key = (double*)smem;                 // N keys, then the weights' running sums
    int* idx = (int*)(key + N);                  // N entry offsets within the bin (-1: none)
    __shared__ double red[3][NT / 32];
    __shared__ double part[NT];
    const int bin = blockIdx.x, f = blockIdx.y;
    const long long start = indptr[bin];
    const int count = (int)(indptr[bin + 1] - start);
    const pix_t* fr = frames + (long long)f * npix;
    for (int i = threadIdx.x; i < N; i += NT) {
        double k = __longlong_as_double(0x7ff0000000000000ull);   // +inf: sorted last
        int e = -1;
        if (i < count) {
            const long long j = start + i;
            const float raw = (float)fr[pix[j]];
            if (valid_pixel(raw, is_float, use_dummy, dummy, delta)) {
                const float s = dark ? raw - dark[j] : raw;
                k = (double)s / om[j];
                e = i;
            }
        }
        key[i] = k; idx[i] = e;
    }
    __syncthreads();
    // bitonic sort of (key, idx), ascending
    for (int kk = 2; kk <= N; kk <<= 1) {
        for (int jj = kk >> 1; jj > 0; jj >>= 1) {
            for (int i = threadIdx.x; i < N; i += NT) {
                const int p = i ^ jj;
                if (p > i) {
                    const bool up = (i & kk) == 0;
                    const double a = key[i], b = key[p];
                    if ((a > b) == up) { key[i] = b; key[p] = a; const int t = idx[i]; idx[i] = idx[p]; idx[p] = t; }
                }
            }
            __syncthreads();
        }
    }
    // running sum of the weights (omega of valid entries) in sorted order: each thread a
    // contiguous run of N / NT entries, then a scan of the runs' totals
    const int per = N / NT > 0 ? N / NT : 1;
    const int i0 = threadIdx.x * per;
    double run = 0.0;
    for (int i = i0; i < i0 + per && i < N; ++i) {
        const int e = idx[i];
        const double w = e >= 0 ? om[start + e] : 0.0;
        run += w;
        key[i] = run;                        // inclusive within the run
    }
    part[threadIdx.x] = run;
    __syncthreads();
    if (threadIdx.x == 0) {
        double acc = 0.0;
        for (int t = 0; t < NT; ++t) { const double v = part[t]; part[t] = acc; acc += v; }
    }
    __syncthreads();
    const double offset = part[threadIdx.x];
    for (int i = i0; i < i0 + per && i < N; ++i) key[i] += offset;
    __syncthreads();
    const double last = key[N - 1];
    const float qmin = (float)(qlo * last), qmax = (float)(qhi * last);
    double v[3] = {0.0, 0.0, 0.0};
    for (int i = threadIdx.x; i < N; i += NT) {
        const int e = idx[i];
        if (e < 0) continue;
        const long long j = start + e;
        const double w = om[j];
        if (!(w > 0.0)) continue;
        const float upper = (float)key[i];
        const float lower = (float)(i > 0 ? key[i - 1] : 0.0);
        if ((qmin <= lower && upper <= qmax) || (qmin >= lower && upper >= qmax)) {
            const float raw = (float)fr[pix[j]];
            const float s = dark ? raw - dark[j] : raw;
            v[0] += (double)s;
            v[1] += poisson ? (double)fmaxf(raw, 1.0f) : (double)fmaxf(s, 1.0f);
            v[2] += w;
        }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int k = 0; k < 3; ++k) {
        double a = v[k];
        for (int off = 16; off > 0; off >>= 1) a += __shfl_down_sync(0xffffffff, a, off);
        if (lane == 0) red[k][warp] = a;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double S = 0.0, V = 0.0, W = 0.0;
        for (int w = 0; w < NT / 32; ++w) { S += red[0][w]; V += red[1][w]; W += red[2][w]; }
        const long long o = (long long)f * nbins + bin;
        out_mean[o] = W > 0.0 ? S / W : 0.0;
        out_sem[o] = W > 0.0 ? sqrt(V) / W : 0.0;
    }
}
"""


def trim_sort_size(max_count: int) -> int:
    """Sort length of :func:`trimmed_mean_csr` for the largest bin: a power of two >= the
    bin's pixels and >= the block's threads, at most 8192 (96 kB of shared memory).

    Raises
    ------
    ValueError
        A bin holds more than 8192 pixels.
    """
    n = TRIM_THREADS
    while n < int(max_count):
        n *= 2
    if n > 8192:
        raise ValueError(f"a bin holds {max_count} pixels; the trimmed-mean kernel sorts at "
                         f"most 8192 (use more radial bins or the array path)")
    return n


def trimmed_mean_csr(frames, indptr, pix, om, dark, *, max_count, dummy=None, delta=None,
                     poisson=True, quantiles=(0.0, 0.9)):
    """Trimmed mean per bin of a batch of frames, one CUDA kernel (GPU).

    pyFAI ``medfilt1d_ng``'s selection (its cython ``CsrIntegrator.medfilt``; Kieffer et al.,
    J. Synchrotron Rad. 2020, 27, 1451): within each bin, pixels sorted by corrected value
    ``(raw - dark) / omega``; with ``upper`` the running sum of ``omega`` up to and including
    a pixel, ``lower`` the same excluding it and ``last`` the bin's total (float32, as pyFAI
    stores them), a pixel is kept when ``lo * last <= lower`` and ``upper <= hi * last``, or
    when it straddles both limits. One block per (bin, frame): the bin's keys are sorted in
    shared memory (bitonic), the weights scanned, the kept pixels summed in float64. The
    same selection as :meth:`tasks.integrate.RadialIntegrator._trimmed_mean_array`.

    Parameters
    ----------
    frames : cupy.ndarray, shape (n, H, W) or (n, npix), detector dtype
    indptr, pix, om, dark : cupy.ndarray
        The no-split matrix's bin segments (int64), entry pixels (int64), omega (float64),
        dark (float32) or None.
    max_count : int
        Largest number of pixels in a bin.
    dummy, delta : float, optional
    poisson : bool
        Poisson variance ``max(raw, 1)`` (else ``max(raw - dark, 1)``, as the array path).
    quantiles : (float, float)

    Returns
    -------
    mean, sem : cupy.ndarray, shape (n, nbins), float64
    """
    import cupy as cp  # noqa: PLC0415

    fr, n, npix, nbins = _flat_frames(frames, indptr)
    N = trim_sort_size(max_count)
    kern = _raw_kernel(("trim", fr.dtype.name), _TRIM_SOURCE,
                       {"NT": TRIM_THREADS, "T": _ctype(fr.dtype, "trimmed-mean"),
                        "VALID": _VALID_PIXEL},
                       "trimmed_mean_csr")
    shared = N * (8 + 4)
    kern.max_dynamic_shared_size_bytes = max(shared, 48 * 1024)
    mean = cp.zeros((n, nbins), cp.float64)
    sem = cp.zeros((n, nbins), cp.float64)
    lo, hi = (float(q) for q in quantiles)
    args = (fr, np.int64(npix), np.int32(n), indptr, pix, om,
            dark if dark is not None else _NULL, *_validity_args(fr, dummy, delta),
            np.int32(bool(poisson)), np.float64(lo), np.float64(hi), np.int32(N),
            np.int32(nbins), mean, sem)
    if n and nbins:
        kern((nbins, n), (TRIM_THREADS,), args, shared_mem=shared)
    return mean, sem
