"""Batched whole-pattern refinement of every voxel (tasks.refine) against scipy
``least_squares`` looped over voxels, measured in the same run.

Synthetic LiCoO2 / graphite / Al / Cu voxels (4 phases, 2000 bins, 1-12 deg 2theta at
0.1198 A), each with its own scales, cells (+-0.3 %), crystallite sizes (30-200 nm) and
microstrains (1e-4 .. 1e-3), Poisson-like noise; refined: 4 scales, 6 cell parameters,
4 sizes, 4 strains, 5 Chebyshev coefficients (23 parameters per voxel).

Ours is :func:`tasks.refine.refine` with its default engine on CPU: the numba kernel
(model, Jacobian and normal equations fused per voxel, :mod:`tasks._refine_nb`), blocks
of voxels in parallel threads. Its numba compile (or cache load) is done by a warm-up
call before the timing and printed separately. ``--numpy-voxels`` also times the same
refinement with ``engine="numpy"`` (the array code, which is also the GPU path).

The peer is what a per-voxel script does: ``scipy.optimize.least_squares`` (trust-region
reflective, the same bounds) on one voxel at a time, measured on ``--peer-voxels``
voxels and extrapolated linearly to the full volume. It gets the same windowed model and
the same NNLS start values; rows: with our windowed model and analytic Jacobian (the
strongest peer: only the batching differs), with our windowed model and scipy's default
finite differences (``jac="2-point"``), and the plain script that evaluates every
reflection on every bin with finite differences (``--peer-full-voxels``). The per-voxel
peers call :func:`tasks.refine.evaluate` with ``engine="numpy"``: the standard scipy loop
over a numpy model, without our numba kernel, so the comparison is "standard scipy
per-voxel loop vs ours".

Run:  python benchmarks/bench_refine.py [--voxels 65536] [--peer-voxels 200] [--gpu]

Prints one table (the full-size run on the 2-core CPU machine is kept in
``benchmarks/refine_results/``). Times are wall seconds on this machine; the ratio column is peer / ours
(> 1 means we are faster). Accuracy columns: median |error| / esd over the fitted voxels
for the LiCoO2 c axis, and the fraction of voxels whose true c lies within 3 esd.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# small batched matrix products: a single-threaded BLAS per worker thread (the voxel
# blocks run in parallel threads instead); must be set before numpy loads BLAS
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.spec import PHASES_DIR  # noqa: E402
from tasks.refine import build_model, evaluate, refine, start_parameters  # noqa: E402
from tasks.rietveld import load_phase  # noqa: E402

NAMES = ["LiCoO2", "graphite", "Al", "Cu"]
LAM = 0.1198e-10
PROF = dict(U=0.0005, V=0.0, W=0.001, eta=0.4)


def make_volume(m, V, seed=0, chunk=2048):
    rng = np.random.default_rng(seed)
    X = np.tile(m.x_ref, (V, 1))
    for sl in m.phase_slices:
        X[:, sl["scale"]] = rng.uniform(0.2, 2.0, V) * 1e-6
        for j in sl["lattice"]:
            X[:, j] *= 1 + rng.uniform(-3e-3, 3e-3, V)
        X[:, sl["size_inv"]] = 1 / rng.uniform(30, 200, V)
        X[:, sl["strain"]] = rng.uniform(1e-4, 1e-3, V)
    nb = m.i_bg.stop - m.i_bg.start
    X[:, m.i_bg] = np.array([50.0, -5.0, 3.0, 1.0, 0.5])[:nb] * rng.uniform(0.8, 1.2, (V, 1))
    Y = np.empty((V, m.n), np.float32)
    S = np.empty((V, m.n), np.float32)
    for c0 in range(0, V, chunk):
        y0 = evaluate(m, X[c0:c0 + chunk], engine="numpy")
        sig = np.sqrt(np.maximum(y0, 1.0))
        Y[c0:c0 + chunk] = y0 + rng.normal(size=y0.shape) * sig
        S[c0:c0 + chunk] = sig
    return X, Y, S


def _per_voxel_fit(m, Y, S, x0, model, jacobian=None):
    """scipy ``least_squares`` (trf, bounds) voxel by voxel on the refined parameters, from
    ``x0``. ``model(x) -> (bins,)`` for a full parameter vector; ``jacobian(x) -> (bins,
    n_params)``, or None for scipy's 2-point finite differences. Returns (seconds, params)."""
    from scipy.optimize import least_squares

    free = np.asarray(m.refined) & ~(np.asarray(m.names) == "zero")
    lo, hi = m.lower[free], m.upper[free]
    out = []
    t0 = time.perf_counter()
    for v in range(Y.shape[0]):
        y = Y[v].astype(np.float64)
        w = 1.0 / S[v].astype(np.float64)
        base = x0[v].copy()

        def full(p, base=base):
            x = base.copy()
            x[free] = p
            return x

        def fun(p, y=y, w=w):
            return (model(full(p)) - y) * w

        def jacf(p, w=w):
            return jacobian(full(p))[:, free] * w[:, None]

        sol = least_squares(fun, np.clip(base[free], lo, hi), jac=jacf if jacobian else "2-point",
                            bounds=(lo, hi), method="trf", x_scale="jac")
        out.append(full(sol.x))
    return time.perf_counter() - t0, np.asarray(out)


def peer(m, Y, S, x0, jac: bool):
    """scipy least_squares voxel by voxel on our windowed model, with its analytic Jacobian
    (``jac``) or finite differences; returns (seconds, params)."""
    return _per_voxel_fit(m, Y, S, x0, lambda x: evaluate(m, x[None], engine="numpy")[0],
                          (lambda x: evaluate(m, x[None], jacobian=True, engine="numpy")[1][0].T)
                          if jac else None)


def peer_full(m, Y, S, x0):
    """The plain per-voxel script: every reflection evaluated on every bin (point
    pseudo-Voigt at the bin centres, same reflections, cells, Caglioti + size + strain
    widths as ours), scipy ``least_squares`` with its default finite-difference Jacobian.
    Returns (seconds, params)."""
    tth = 0.5 * (m.edges_t[1:] + m.edges_t[:-1])
    lam_A, lam_nm = m.wavelength_m * 1e10, m.wavelength_m * 1e9
    eta, g = m.eta, 4 * np.log(2)

    def model(x):
        y = x[m.i_bg] @ m.T
        for t, sl in zip(m.tables, m.phase_slices):
            lat = x[sl["lattice"]]
            Q = t.coef @ (1 / lat ** 2) if sl["lattice"] else t.inv_d2_0
            th = np.arcsin(np.clip(lam_A * np.sqrt(Q) / 2, 0, 1 - 1e-12))
            tn = np.tan(th)
            H = (np.sqrt(m.U * tn * tn + m.V * tn + m.W) + np.degrees(m.scherrer_k * lam_nm * x[sl["size_inv"]])
                 / np.cos(th) + np.degrees(4 * x[sl["strain"]]) * tn)
            d = (tth[None, :] - (np.degrees(2 * th) + x[m.i_zero])[:, None]) / H[:, None]
            pv = (eta * 2 / (np.pi * H[:, None] * (1 + 4 * d * d))
                  + (1 - eta) * np.sqrt(g / np.pi) / H[:, None] * np.exp(-g * d * d))
            y = y + x[sl["scale"]] * (t.intensity @ pv)
        return y

    return _per_voxel_fit(m, Y, S, x0, model)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxels", type=int, default=65536)
    ap.add_argument("--peer-voxels", type=int, default=200)
    ap.add_argument("--peer-fd-voxels", type=int, default=20)
    ap.add_argument("--peer-full-voxels", type=int, default=3)
    ap.add_argument("--bins", type=int, default=2000)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--numpy-voxels", type=int, default=256,
                    help="also time engine='numpy' on this many voxels (0: skip)")
    ap.add_argument("--gpu", action="store_true", help="also run the batched fit with cupy")
    args = ap.parse_args()

    phases = [load_phase(n, PHASES_DIR / f"{n}.cif") for n in NAMES]
    x = np.linspace(1.0, 12.0, args.bins)
    m = build_model(phases, x, "2th_deg", LAM, PROF, background_order=4)
    V = args.voxels
    t = time.perf_counter()
    X, Y, S = make_volume(m, V)
    t_make = time.perf_counter() - t
    ic = m.names.index("LiCoO2.c")

    rows = []
    t = time.perf_counter()
    refine(m, Y[:4], sigma=S[:4], chunk_voxels=args.chunk)          # numba compile / cache load
    t_jit = time.perf_counter() - t
    t = time.perf_counter()
    res = refine(m, Y, sigma=S, chunk_voxels=args.chunk)
    t_ours = time.perf_counter() - t
    z = np.abs(res.params[:, ic] - X[:, ic]) / res.esd[:, ic]
    OURS = "ours, batched LM (numba engine, CPU)"
    rows.append((OURS, V, t_ours, t_ours, np.nanmedian(z), np.mean(z < 3),
                 float(np.mean(res.converged))))
    nnp = min(args.numpy_voxels, V)
    if nnp > 0:
        t = time.perf_counter()
        rn = refine(m, Y[:nnp], sigma=S[:nnp], chunk_voxels=args.chunk, engine="numpy")
        tn = time.perf_counter() - t
        zn = np.abs(rn.params[:, ic] - X[:nnp, ic]) / rn.esd[:, ic]
        rows.append(("ours, batched LM (numpy engine, CPU)", nnp, tn, tn * V / nnp, np.nanmedian(zn),
                     np.mean(zn < 3), float(np.mean(rn.converged))))

    if args.gpu:
        import cupy as cp

        from tasks.refine import to_host
        Yg, Sg = cp.asarray(Y), cp.asarray(S)
        refine(m, Yg[:256], sigma=Sg[:256])                      # warm-up (kernels, plans)
        cp.cuda.Device().synchronize()
        t = time.perf_counter()
        rg = refine(m, Yg, sigma=Sg, chunk_voxels=4096)
        cp.cuda.Device().synchronize()
        t_gpu = time.perf_counter() - t
        rg = to_host(rg)
        zg = np.abs(rg.params[:, ic] - X[:, ic]) / rg.esd[:, ic]
        rows.append(("ours, batched LM (cupy, GPU)", V, t_gpu, t_gpu, np.nanmedian(zg), np.mean(zg < 3),
                     float(np.mean(rg.converged))))

    # the peers start where ours starts (batched NNLS scales, CIF cells)
    npv = min(args.peer_voxels, V)
    x0 = start_parameters(m, Y[:npv].astype(np.float64), S[:npv].astype(np.float64))
    tp, Pp = peer(m, Y[:npv], S[:npv], x0, jac=True)
    zp = np.abs(Pp[:, ic] - X[:npv, ic]) / res.esd[:npv, ic]
    rows.append(("scipy least_squares per voxel, analytic jac", npv, tp, tp * V / npv, np.nanmedian(zp),
                 np.mean(zp < 3), float("nan")))
    nfd = min(args.peer_fd_voxels, V)
    if nfd > 0:
        tf, Pf = peer(m, Y[:nfd], S[:nfd], x0[:nfd], jac=False)
        zf = np.abs(Pf[:, ic] - X[:nfd, ic]) / res.esd[:nfd, ic]
        rows.append(("scipy least_squares per voxel, 2-point jac", nfd, tf, tf * V / nfd, np.nanmedian(zf),
                     np.mean(zf < 3), float("nan")))

    nfull = min(args.peer_full_voxels, V)
    if nfull > 0:
        tq, Pq = peer_full(m, Y[:nfull], S[:nfull], x0[:nfull])
        zq = np.abs(Pq[:, ic] - X[:nfull, ic]) / res.esd[:nfull, ic]
        rows.append(("scipy least_squares per voxel, full pattern, 2-point", nfull, tq, tq * V / nfull,
                     np.nanmedian(zq), np.mean(zq < 3), float("nan")))

    print(f"\nRefinement benchmark: {V} voxels x {args.bins} bins x {len(NAMES)} phases, "
          f"{m.n_param} parameters/voxel ({sum(m.refined)} refined), "
          f"{len(m.r_phase)} reflections, window {m.window_fwhm:g} FWHM; "
          f"{os.cpu_count()} CPU cores; volume simulated in {t_make:.1f} s; numba compile or "
          f"cache load (warm-up, not timed below) {t_jit:.1f} s; mean LM iterations "
          f"{float(np.mean(res.n_iter)):.1f}\n")
    hdr = (f"{'method':52s} {'voxels run':>10s} {'time run (s)':>13s} {'time for volume (s)':>20s} "
           f"{'peer/ours':>10s} {'med |err|/esd c':>16s} {'c in 3 esd':>11s} {'converged':>10s}")
    print(hdr)
    print("-" * len(hdr))
    ours = {r[0]: r[3] for r in rows}
    t_ref = ours[OURS]
    for name, nv, trun, tvol, zmed, cov, conv in rows:
        ratio = tvol / t_ref
        print(f"{name:52s} {nv:10d} {trun:13.2f} {tvol:20.1f} {ratio:10.1f} {zmed:16.2f} {cov:11.3f} "
              f"{'' if np.isnan(conv) else f'{conv:.3f}':>10s}")
    print(f"\nours: {V / t_ours:.0f} voxels/s on CPU; goals: CPU >= 50x the per-voxel loop, GPU < 10 s "
          "for 65,536 voxels")


if __name__ == "__main__":
    main()
