"""CPU fast path of :mod:`tasks.refine`: the windowed pseudo-Voigt model, its analytic
Jacobian and the normal equations of a block of voxels fused in one numba kernel.

Same model, same formulas and the same order of operations per reflection as
:func:`tasks.refine.evaluate` (the numpy/cupy reference); what differs is the
bookkeeping: every voxel runs in one pass over its reflections, each reflection over the
bins of its own window only, the Jacobian of the voxel is accumulated into a (P, bins)
scratch buffer owned by the thread, and ``J^T W J`` and ``J^T W r`` are formed from it
straight away, so the (voxels, P, bins) Jacobian of the reference is never built.
With an empty profile table (engine ``"numba-exact"``) the differences to the reference
are rounding only (sums in another order; ``math.erf`` instead of
``scipy.special.erf``); with the table (engine ``"numba"``) the profile's CDF and
density come from a cubic Hermite interpolant (errors 4e-14 and 1.4e-10 of a CDF rising
by 1). Both are tested against the reference in tests/test_refine.py.

The kernels release the GIL (``nogil``): :func:`tasks.refine.refine` runs blocks of
voxels in parallel threads, as it does with the numpy engine (``parallel=True`` with
``prange`` compiled in 96 s against 57 s without, wall time on the loaded 2-core test
machine). Compiled functions are cached on disk (``cache=True``), so only the first
call on a machine pays the compile time (measured 14 s of CPU time).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_DEG = 180.0 / math.pi


@njit(cache=True, nogil=True, fastmath=False)
def _searchsorted_right(a, v):
    lo, hi = 0, a.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] <= v:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True, fastmath=False)
def _searchsorted_left(a, v):
    lo, hi = 0, a.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True, fastmath=False)
def _cdf(u, k, c1, c2, G, cf, Fk, tab, inv_h, do_pdf):
    """Window-normalised pseudo-Voigt CDF ``F(u)`` and its density ``f(u)`` (0 unless
    ``do_pdf``; 0 where ``u`` is clamped to the support ``[-k, k]``).

    ``tab`` empty: ``math.erf``, ``math.atan``, ``math.exp``. Otherwise a cubic Hermite
    table ``tab[i] = (F(u_i), h f(u_i))`` on ``u_i = -k + i h``, ``h = 1 / inv_h``; ``f`` is
    then the derivative of the interpolant (consistent with ``F``). ``Fk = F(k)``."""
    if u <= -k:
        return -Fk, 0.0
    if u >= k:
        return Fk, 0.0
    if tab.shape[0] == 0:
        F = c1 * math.erf(G * u) + c2 * math.atan(2.0 * u)
        f = 0.0
        if do_pdf:
            gu = G * u
            f = cf * math.exp(-(gu * gu)) + c2 * 2.0 / (1.0 + 4.0 * u * u)
        return F, f
    t = (u + k) * inv_h
    i = int(t)
    s = t - i
    F0 = tab[i, 0]
    d0 = tab[i, 1]
    F1 = tab[i + 1, 0]
    d1 = tab[i + 1, 1]
    dF = F1 - F0
    # Hermite basis: F0 + s d0 + s^2 (3 dF - 2 d0 - d1) + s^3 (d0 + d1 - 2 dF)
    a2 = 3.0 * dF - 2.0 * d0 - d1
    a3 = d0 + d1 - 2.0 * dF
    F = F0 + s * (d0 + s * (a2 + s * a3))
    f = 0.0
    if do_pdf:
        f = (d0 + s * (2.0 * a2 + 3.0 * s * a3)) * inv_h
    return F, f


@njit(cache=True, nogil=True, fastmath=False)
def _voxel(x, edges, inv_w, T, r_coef, r_inv_d2, r_I, ph_r, ph_idx, ph_lat, i_zero, zero_jac,
           bg0, cst, tab, y, J, do_jac):
    """Model ``y`` (n,) and, when ``do_jac``, the Jacobian ``J`` (P4 >= P, n) of one voxel
    (parameter-major, so that a parameter's row is contiguous over the bins).

    ``ph_idx[p] = (scale, size_inv, strain)`` parameter indices, ``ph_lat[p]`` the cell
    parameter indices (-1 padded), ``ph_r[p] = (r0, r1)`` the phase's reflections;
    ``cst = (lam_A, U, V, W, k, c1, c2, ks, G, 1 / h, F(k))``; ``tab`` see :func:`_cdf`.
    """
    n = y.shape[0]
    nbg = T.shape[0]
    lam_A, U, Vc, W, k, c1, c2, ks, G = cst[0], cst[1], cst[2], cst[3], cst[4], cst[5], cst[6], cst[7], cst[8]
    inv_h, Fk = cst[9], cst[10]
    cf = c1 * (2.0 * G / math.sqrt(math.pi))
    for j in range(n):
        s = 0.0
        for q in range(nbg):
            s += x[bg0 + q] * T[q, j]
        y[j] = s
    if do_jac:
        J[:, :] = 0.0
        for q in range(nbg):
            for j in range(n):
                J[bg0 + q, j] = T[q, j]
    zero = x[i_zero]
    for p in range(ph_r.shape[0]):
        S = x[ph_idx[p, 0]]
        i_scale = ph_idx[p, 0]
        i_size = ph_idx[p, 1]
        i_strain = ph_idx[p, 2]
        beta = x[i_size]
        eps = x[i_strain]
        nl = 0
        for l in range(3):
            if ph_lat[p, l] >= 0:
                nl += 1
        l0, l1, l2 = ph_lat[p, 0], ph_lat[p, 1], ph_lat[p, 2]
        for r in range(ph_r[p, 0], ph_r[p, 1]):
            if nl > 0:
                Q = 0.0
                for l in range(nl):
                    lat = x[ph_lat[p, l]]
                    Q += (1.0 / (lat * lat)) * r_coef[r, l]
            else:
                Q = r_inv_d2[r]
            sq = math.sqrt(Q)
            s = min(max(lam_A * sq / 2.0, 0.0), 1.0 - 1e-12)
            th = math.asin(s)
            cos = math.cos(th)
            tan = s / cos
            h_inst = math.sqrt(U * tan * tan + Vc * tan + W)
            H = h_inst + ks * beta / cos + _DEG * 4.0 * eps * tan
            mu = 2.0 * _DEG * th + zero
            A = S * r_I[r]
            Ir = r_I[r]
            invH = 1.0 / H
            lo = _searchsorted_right(edges, mu - k * H) - 1
            hi = _searchsorted_left(edges, mu + k * H)
            lo = min(max(lo, 0), n - 1)
            jend = min(max(hi, lo + 1), n)
            # left edge of the first bin, then bin by bin (each edge evaluated once)
            u = min(max((edges[lo] - mu) * invH, -k), k)
            F0, f0 = _cdf(u, k, c1, c2, G, cf, Fk, tab, inv_h, do_jac)
            if not do_jac:
                for j in range(lo, jend):
                    u = min(max((edges[j + 1] - mu) * invH, -k), k)
                    F1, f1 = _cdf(u, k, c1, c2, G, cf, Fk, tab, inv_h, False)
                    y[j] += A * ((F1 - F0) * inv_w[j])
                    F0 = F1
                continue
            AiH = A * invH
            dtth_dQ = 2.0 * _DEG * (lam_A / (4.0 * sq)) / cos
            sec2 = 1.0 / (cos * cos)
            dH_dtth = ((2 * U * tan + Vc) * sec2 / (2 * h_inst) + ks * beta * tan / cos
                       + _DEG * 4.0 * eps * sec2) / (2.0 * _DEG)
            # d(2th)/d(cell parameter l) and the width's share through th (as evaluate)
            m0 = m1 = m2 = h0 = h1 = h2 = 0.0
            if nl > 0:
                lat = x[l0]
                m0 = dtth_dQ * (r_coef[r, 0] * (-2.0 / (lat * lat * lat)))
                h0 = dH_dtth * m0
            if nl > 1:
                lat = x[l1]
                m1 = dtth_dQ * (r_coef[r, 1] * (-2.0 / (lat * lat * lat)))
                h1 = dH_dtth * m1
            if nl > 2:
                lat = x[l2]
                m2 = dtth_dQ * (r_coef[r, 2] * (-2.0 / (lat * lat * lat)))
                h2 = dH_dtth * m2
            c_size = ks / cos
            c_strain = _DEG * 4.0 * tan
            fu0 = f0 * u
            for j in range(lo, jend):
                u = min(max((edges[j + 1] - mu) * invH, -k), k)
                F1, f1 = _cdf(u, k, c1, c2, G, cf, Fk, tab, inv_h, True)
                iw = inv_w[j]
                prof = (F1 - F0) * iw
                y[j] += A * prof
                fu1 = f1 * u
                Amu = (f0 - f1) * iw * AiH
                AH = (fu0 - fu1) * iw * AiH
                J[i_scale, j] += Ir * prof
                if nl > 0:
                    J[l0, j] += Amu * m0 + AH * h0
                    if nl > 1:
                        J[l1, j] += Amu * m1 + AH * h1
                        if nl > 2:
                            J[l2, j] += Amu * m2 + AH * h2
                J[i_size, j] += AH * c_size
                J[i_strain, j] += AH * c_strain
                if zero_jac:
                    J[i_zero, j] += Amu
                F0 = F1
                f0 = f1
                fu0 = fu1


@njit(cache=True, nogil=True, fastmath=False)
def _gram(Jv, w, M):
    """``M[p, q] = sum_j w_j Jv[p, j] Jv[q, j]`` (``Jv`` (P4, n), overwritten by
    ``Jv sqrt(w)``): each row scaled by the square root of the weights, then one BLAS
    ``dgemm`` (numba's ``np.dot``, which calls scipy's BLAS without the GIL). For 2000 x 24
    measured 90-100 us against 170-240 us for the register-tiled loop it replaces (16
    accumulators per 4 x 4 tile) and 500 us for a loop of dot products; BLAS reassociates
    the sums, as it does in the reference's matrix products."""
    P4, n = Jv.shape
    sw = np.sqrt(w)
    for p in range(P4):
        for j in range(n):
            Jv[p, j] *= sw[j]
    M[:, :] = np.dot(Jv, Jv.T)


@njit(cache=True, nogil=True, fastmath=False)
def batch(X, Yd, Wt, edges, inv_w, T, r_coef, r_inv_d2, r_I, ph_r, ph_idx, ph_lat, i_zero, zero_jac,
          bg0, cst, tab, mode, Y_out, J_out, chi_out, A_out, g_out):
    """Every voxel of a block in turn (one entry point, so numba compiles the model once).

    ``mode`` 0: model into ``Y_out`` (V, n). 1: model and Jacobian ``J_out`` (V, P, n).
    2: normal equations: residual ``Yd - model`` into ``Y_out`` (V, n), ``chi^2 = sum w
    r^2`` (V,), ``J^T W J`` (V, P, P) and ``J^T W r`` (V, P); ``Wt`` is (V, n) or (1, n)
    (shared). The residual goes into a spare column of the voxel's Jacobian buffer, so
    one Gram matrix of ``[J, r]`` gives ``J^T W J``, ``J^T W r`` and ``chi^2`` together.
    Outputs a mode does not use may be any array of the right type. ``nogil``: callers
    run blocks of voxels in parallel threads.
    """
    Vn = X.shape[0]
    n = edges.shape[0] - 1
    P = X.shape[1]
    # the residual's column: P, or the zero shift's when that is not refined (its column
    # is then 0 and unused), which saves a quarter of the Gram tiles for P = 24
    rc = P if zero_jac else i_zero
    P4 = ((P + 1 if zero_jac else P) + 3) // 4 * 4
    do_jac = mode > 0
    Jv = np.empty((P4, n) if do_jac else (P4, 1))
    ym = np.empty(n)
    M = np.empty((P4, P4))
    for v in range(Vn):
        _voxel(X[v], edges, inv_w, T, r_coef, r_inv_d2, r_I, ph_r, ph_idx, ph_lat, i_zero, zero_jac,
               bg0, cst, tab, ym, Jv, do_jac)
        if mode == 0:
            Y_out[v, :] = ym
            continue
        if mode == 1:
            Y_out[v, :] = ym
            for q in range(P):
                for j in range(n):
                    J_out[v, q, j] = Jv[q, j]
            continue
        for j in range(n):
            rj = Yd[v, j] - ym[j]
            Y_out[v, j] = rj
            Jv[rc, j] = rj
        _gram(Jv, Wt[0] if Wt.shape[0] == 1 else Wt[v], M)
        for p in range(P):
            for q in range(p, P):
                a = M[p, q]
                if rc != P and (p == rc or q == rc):
                    a = 0.0
                A_out[v, p, q] = a
                A_out[v, q, p] = a
            if p == rc:
                g_out[v, p] = 0.0
            else:
                g_out[v, p] = M[p, rc] if p < rc else M[rc, p]
        chi_out[v] = M[rc, rc]
