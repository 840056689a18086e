"""CPU kernel of :meth:`tasks.integrate.RadialIntegrator.integrate`: the CSR integration of a
batch of frames, threaded over pixel ranges of one shared batch.

pyFAI's ``integrate1d_ng`` CSR engine (Kieffer et al., J. Synchrotron Rad. 2020, 27, 1451)
runs one frame at a time and reads the whole matrix per frame. Here the matrix is read in
its column (pixel) order once per batch: each pixel's value is read once for every frame
of the batch, in the frame's detector dtype, and scattered into the ``(bins, frames)``
float64 sums of its bins, so every frame is streamed once and the sums (2000 bins x 16
frames x 8 bytes = 256 kB per quantity) stay in cache. Threads take contiguous pixel
ranges of equal matrix size and keep their own sums, added at the end, so the batch is
shared, nothing is locked and the kernel scales with cores (scipy's sparse products hold
the GIL and do not). Invalid pixels (the detector's dummy value within its tolerance, or
non-finite floats) are left out of the sums and their ``c * omega`` is taken off the bin's
normalisation, as pyFAI does with dynamic masks. Compiled on first use and cached on disk.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit


def balanced_ranges(ptr, pieces: int) -> list[tuple[int, int]]:
    """Contiguous ranges of the ``len(ptr) - 1`` rows (or columns) of a compressed sparse
    matrix holding about equal numbers of entries: ``pieces`` at most, empty ones dropped.

    Parameters
    ----------
    ptr : numpy.ndarray, shape (n + 1,), int
        Row (or column) pointer, non-decreasing, ``ptr[0] == 0``.
    pieces : int

    Returns
    -------
    list of (start, stop)
        Covering ``0 .. n`` in order.
    """
    n = ptr.shape[0] - 1
    cuts = np.searchsorted(ptr, np.linspace(0, ptr[-1], int(pieces) + 1)).clip(0, n)
    cuts[0], cuts[-1] = 0, n
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


@njit(cache=True, nogil=True, fastmath=False, boundscheck=False)
def _scatter(frames, p0, p1, colptr, rows, coef, omega, dark, use_dark, use_dummy, dummy,
             delta, is_float, do_var, S, V, L):
    n = frames.shape[0]
    xs = np.empty(n, np.float64)
    vs = np.empty(n, np.float64)
    bad = np.empty(n, np.bool_)
    for p in range(p0, p1):
        e0 = colptr[p]
        e1 = colptr[p + 1]
        if e0 == e1:
            continue                       # no coefficient (static mask): never read
        d = np.float32(dark[p]) if use_dark else np.float32(0.0)
        any_bad = False
        for f in range(n):
            x = np.float64(np.float32(frames[f, p]))
            b = False
            if is_float and not math.isfinite(x):
                b = True
            if use_dummy:
                if delta == 0.0:
                    b = b or x == dummy
                else:
                    b = b or abs(x - dummy) <= delta
            bad[f] = b
            if b:
                any_bad = True
                xs[f] = 0.0
                vs[f] = 0.0
            else:
                xs[f] = np.float64(np.float32(x) - d) if use_dark else x
                vs[f] = max(x, 1.0)
        for e in range(e0, e1):
            r = rows[e]
            c = np.float64(coef[e])
            for f in range(n):
                S[r, f] += c * xs[f]
            if do_var:
                c2 = c * c
                for f in range(n):
                    V[r, f] += c2 * vs[f]
            if any_bad:
                co = c * omega[p]
                for f in range(n):
                    if bad[f]:
                        L[r, f] += co


def integrate_csc(frames, colptr, rows, coef, omega, norm, nbins, *, monitor=None, dark=None,
                  dummy=None, delta=None, poisson=True, threads=1):
    """Integrate a batch of frames through the CSR matrix held in column (pixel) order.

    Parameters
    ----------
    frames : numpy.ndarray, shape (n, H, W) or (n, npix), any real dtype
        Raw detector counts, read in place (C order).
    colptr : numpy.ndarray, shape (npix + 1,), int64
    rows : numpy.ndarray, shape (nnz,), int32
        The matrix in compressed-column form: bins of each pixel's coefficients.
    coef : numpy.ndarray, shape (nnz,), float32
    omega : numpy.ndarray, shape (npix,), float32
        Solid angle x polarisation x flat per pixel.
    norm : numpy.ndarray, shape (nbins,), float64
        ``sum_j c_j omega_j`` per bin.
    nbins : int
    monitor : numpy.ndarray, shape (n,), optional
    dark : numpy.ndarray, shape (npix,), optional
    dummy, delta : float, optional
        Detector dummy value and tolerance (pyFAI ``get_dummies``).
    poisson : bool
        Also return the Poisson standard error ``sqrt(sum c^2 max(x, 1)) / denominator``.
    threads : int
        Threads sharing the batch (contiguous pixel ranges of equal matrix size).

    Returns
    -------
    intensity, sigma : numpy.ndarray, shape (n, nbins), float32 (sigma None without poisson)
        ``sum c (x - dark) / (mon * (norm - sum_invalid c omega))``; 0 where the
        denominator is not positive.
    """
    n = frames.shape[0]
    fr = np.ascontiguousarray(frames).reshape(n, -1)
    is_float = bool(np.issubdtype(fr.dtype, np.floating))
    use_dark = dark is not None
    # float32 as the integrator holds them (no per-batch copy of two detector-sized arrays);
    # the kernel widens each value it reads, so the sums are unchanged
    dk = np.asarray(dark, np.float32) if use_dark else np.zeros(1, np.float32)
    om = np.asarray(omega, np.float32)
    parts = balanced_ranges(colptr, max(1, min(int(threads), 64)))  # pixels, equal entries
    acc = [(np.zeros((nbins, n)), np.zeros((nbins, n)) if poisson else np.zeros((1, 1)),
            np.zeros((nbins, n))) for _ in parts]
    args = (colptr, rows, coef, om, dk, use_dark, dummy is not None,
            float(dummy) if dummy is not None else 0.0, float(delta or 0.0), is_float,
            bool(poisson))

    def run(k):
        a, b = parts[k]
        S, V, L = acc[k]
        _scatter(fr, a, b, *args, S, V, L)

    if len(parts) == 1:
        run(0)
    else:
        with ThreadPoolExecutor(len(parts)) as pool:
            list(pool.map(run, range(len(parts))))
    S = acc[0][0]
    L = acc[0][2]
    V = acc[0][1] if poisson else None
    for k in range(1, len(parts)):
        S += acc[k][0]
        L += acc[k][2]
        if poisson:
            V += acc[k][1]
    den = norm[:, None] - L
    if monitor is not None:
        den = den * np.asarray(monitor, np.float64)[None, :]
    good = den > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        intensity = np.where(good, S / den, 0.0).T.astype(np.float32)
        sigma = np.where(good, np.sqrt(V) / den, 0.0).T.astype(np.float32) if poisson else None
    return intensity, sigma


# --------------------------------------------------------------------------------------
# sigma clipping: threaded over bins, every iteration per (bin, frame) in registers
# --------------------------------------------------------------------------------------

@njit(cache=True, nogil=True, fastmath=False, boundscheck=False)
def _clip_bins(frames, b0, b1, indptr, pix, om32, dark, use_dark, use_dummy, dummy, delta,
               is_float, poisson, thres, max_iter, mean_out, sem_out):
    n = frames.shape[0]
    cmax = 0
    for b in range(b0, b1):
        cmax = max(cmax, indptr[b + 1] - indptr[b])
    sig = np.empty((cmax, n), np.float32)
    var = np.empty((cmax, n), np.float32)
    x = np.empty((cmax, n), np.float32)
    ok = np.empty((cmax, n), np.bool_)
    floor = math.sqrt(2.0 * math.pi)
    for b in range(b0, b1):
        s0 = indptr[b]
        c = indptr[b + 1] - s0
        if c == 0:
            continue
        # gather the bin's pixels for every frame (pixel order: rows read in sequence)
        for i in range(c):
            p = pix[s0 + i]
            d = dark[s0 + i] if use_dark else np.float32(0.0)
            o = om32[s0 + i]
            for f in range(n):
                raw = np.float32(frames[f, p])
                good = True
                if is_float and not math.isfinite(raw):
                    good = False
                if use_dummy:
                    if delta == 0.0:
                        if raw == dummy:
                            good = False
                    elif abs(raw - dummy) <= delta:
                        good = False
                ok[i, f] = good
                if good:
                    s = raw - d if use_dark else raw
                    sig[i, f] = s
                    var[i, f] = max(raw, np.float32(1.0))
                    x[i, f] = s / o
                else:
                    sig[i, f] = 0.0
                    var[i, f] = 0.0
                    x[i, f] = 0.0
        for f in range(n):
            it = 0
            while True:
                ssig = sw = sw2 = scnt = sv = ss2 = sws = 0.0
                for i in range(c):
                    if ok[i, f]:
                        o = np.float64(om32[s0 + i])
                        s = np.float64(sig[i, f])
                        ssig += s
                        sw += o
                        sw2 += o * o
                        scnt += 1.0
                        if poisson:
                            sv += np.float64(var[i, f])
                        else:
                            ss2 += s * s
                            sws += s * o
                mean = ssig / sw if sw != 0.0 else np.nan
                if poisson:
                    vsum = sv
                else:
                    vsum = max(ss2 - 2.0 * mean * sws + mean * mean * sw2, 0.0)
                std = math.sqrt(vsum / sw2) if sw2 != 0.0 else np.nan
                if it >= max_iter:
                    break
                c3 = max(scnt, 3.0)
                lim = max(thres, math.sqrt(2.0 * math.log(c3 / floor))) * std
                lo = np.float32(mean - lim)
                hi = np.float32(mean + lim)
                rejected = False
                for i in range(c):
                    if ok[i, f] and (x[i, f] < lo or x[i, f] > hi):
                        ok[i, f] = False
                        rejected = True
                if not rejected:
                    break
                it += 1
            if sw > 0.0 and scnt > 0.5:
                mean_out[f, b] = mean
                sem_out[f, b] = math.sqrt(vsum) / sw
            else:
                mean_out[f, b] = 0.0
                sem_out[f, b] = 0.0


def sigma_clip_bins(frames, indptr, pix, om32, *, dark=None, dummy=None, delta=None,
                    poisson=True, thres=4.0, max_iter=5, threads=1):
    """Sigma-clipped mean per bin (pyFAI ``sigma_clip_ng``'s rule, as
    :meth:`tasks.integrate.RadialIntegrator._sigma_clip_array`), threaded over bins.

    Each (bin, frame) is clipped on its own: the bin's pixels are gathered once for all
    frames of the batch, then every iteration sums them in float64 and tests them against
    ``max(thres, sqrt(2 ln(n / sqrt(2 pi)))) * std``. Threads take ranges of bins of equal
    pixel counts and write disjoint outputs.

    Parameters
    ----------
    frames : numpy.ndarray, shape (n, H, W) or (n, npix), detector dtype
    indptr : numpy.ndarray, shape (nbins + 1,), int64
    pix : numpy.ndarray, shape (P,), int64
        Detector pixel of each entry of the no-split matrix, in bin order.
    om32 : numpy.ndarray, shape (P,), float32
        Each entry's omega (solid angle x polarisation x flat).
    dark : numpy.ndarray, shape (P,), float32, optional
        Each entry's dark.
    dummy, delta : float, optional
    poisson : bool
        Poisson error model, else the azimuthal spread.
    thres : float
    max_iter : int
    threads : int

    Returns
    -------
    mean, sem : numpy.ndarray, shape (n, nbins), float64
    """
    n = frames.shape[0]
    fr = np.ascontiguousarray(frames).reshape(n, -1)
    nbins = indptr.shape[0] - 1
    mean = np.zeros((n, nbins))
    sem = np.zeros((n, nbins))
    use_dark = dark is not None
    dk = np.asarray(dark, np.float32) if use_dark else np.zeros(1, np.float32)
    args = (indptr, pix, np.asarray(om32, np.float32), dk, use_dark, dummy is not None,
            np.float32(dummy if dummy is not None else 0.0), np.float32(delta or 0.0),
            bool(np.issubdtype(fr.dtype, np.floating)), bool(poisson), float(thres),
            int(max_iter), mean, sem)
    T = max(1, min(int(threads), 64))
    parts = balanced_ranges(indptr, 4 * T)   # bins, equal pixel counts, 4 per thread
    if T == 1 or len(parts) == 1:
        _clip_bins(fr, 0, nbins, *args)
    else:
        with ThreadPoolExecutor(T) as pool:
            list(pool.map(lambda ab: _clip_bins(fr, ab[0], ab[1], *args), parts))
    return mean, sem
