"""Iterative reconstructions (SIRT, CGLS, TV) against FBP and astra-toolbox's SIRT.

One table, one run: a held-out phantom (the simulator's ``catalyst_particles_medium``
image, not the one the tests use; the shapes phantom when the image is absent) gives
three phase maps; ``--bins`` radial bins are non-negative mixtures of them (each bin its
own 'pattern' value per phase, as an XRD-CT slice). Sinograms are strip integrals
(:func:`tasks.reconstruct.radon`) over all, 1/2 and 1/4 of ``--angles`` angles (0-180
deg) with Gaussian noise of two levels (a fraction of the sinogram maximum).

Per method: PSNR and SSIM (``skimage.metrics``, ``data_range`` = the truth's range, per
bin, averaged over bins) against the truth, and wall time per slice (all bins at once),
CPU, torch and BLAS on 1 thread. Methods: FBP (ramp, ``tasks.reconstruct.fbp``), SIRT
(100 iterations), CGLS (20 iterations, no early stopping), TV (Adam, the
``tv_reconstruct`` defaults: lam_tv 0.01, 200 epochs, lr 0.1), and the peer astra-toolbox
CPU ``SIRT`` (``strip`` projector, circle mask, MinConstraint 0, 100 iterations) looped
over the bins; astra runs on ``--astra-bins`` bins only (it is ~20x slower here) and its
time is scaled linearly to all bins, its scores are over those bins (the table says so).
Every method runs with its defaults: no per-case tuning. CGLS is run for a fixed number
of iterations: on noisy data it semi-converges (stop it earlier, or use SIRT/TV).

Run::

    python benchmarks/bench_iterative.py [--n 96] [--bins 8] [--angles 96]
                                         [--noise 0.01 0.05] [--tv-iter 200]
                                         [--astra-bins 2] [--no-astra]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL = ROOT.parent / "shared" / "data" / "real"


def phantom(n, n_bin, seed=7):
    """(n, n, n_bin) float32 truth: bins = non-negative mixtures of 3 phase maps."""
    from tasks.simulate import SimConfig, make_phantom

    img = REAL / "ndtomo_images" / "catalyst_particles_medium.tif"
    cfg = SimConfig(n_translations=n, phantom=str(img) if img.exists() else "shapes")
    maps = make_phantom(cfg)                                   # (P, n, n)
    rng = np.random.default_rng(seed)
    mix = rng.gamma(1.0, 1.0, size=(maps.shape[0], n_bin)) + 0.05
    truth = np.einsum("pyx,pb->yxb", maps, mix)
    return np.ascontiguousarray(truth, dtype=np.float32), ("catalyst_particles_medium"
                                                           if img.exists() else "shapes")


def astra_sirt(sino, angles_deg, mask, n_iter):
    import astra

    na, nt, nb = sino.shape
    vg = astra.create_vol_geom(nt, nt)
    pg = astra.create_proj_geom("parallel", 1.0, nt, np.deg2rad(angles_deg))
    pid = astra.create_projector("strip", pg, vg)
    mid = astra.data2d.create("-vol", vg, mask.astype(np.float32))
    out = np.empty((nt, nt, nb), np.float32)
    for b in range(nb):
        sid = astra.data2d.create("-sino", pg, np.ascontiguousarray(sino[:, :, b]))
        rid = astra.data2d.create("-vol", vg, 0)
        cfg = astra.astra_dict("SIRT")
        cfg.update(ProjectorId=pid, ProjectionDataId=sid, ReconstructionDataId=rid,
                   option={"MinConstraint": 0.0, "ReconstructionMaskId": mid})
        aid = astra.algorithm.create(cfg)
        astra.algorithm.run(aid, n_iter)
        out[:, :, b] = astra.data2d.get(rid)
        astra.algorithm.delete(aid)
        astra.data2d.delete([sid, rid])
    astra.data2d.delete(mid)
    astra.projector.delete(pid)
    return out


def scores(rec, truth):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    p, s = [], []
    for b in range(truth.shape[2]):
        t = truth[:, :, b].astype(np.float64)
        r = rec[:, :, b].astype(np.float64)
        rng = float(t.max() - t.min())
        p.append(peak_signal_noise_ratio(t, r, data_range=rng))
        s.append(structural_similarity(t, r, data_range=rng))
    return float(np.mean(p)), float(np.mean(s))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=96, help="image side = translations")
    ap.add_argument("--bins", type=int, default=8)
    ap.add_argument("--angles", type=int, default=96, help="full scan angles over 180 deg")
    ap.add_argument("--noise", type=float, nargs="+", default=[0.01, 0.05],
                    help="Gaussian noise sigma as a fraction of the sinogram maximum")
    ap.add_argument("--sirt-iter", type=int, default=100)
    ap.add_argument("--cgls-iter", type=int, default=20)
    ap.add_argument("--tv-iter", type=int, default=200)
    ap.add_argument("--astra-bins", type=int, default=2,
                    help="bins astra runs on (its time is scaled to all bins; its scores "
                         "are over these bins)")
    ap.add_argument("--no-astra", action="store_true")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from tasks.iterative import cgls, sirt, tv_reconstruct
    from tasks.projector import Projector
    from tasks.reconstruct import circle_mask, fbp, radon

    try:
        import astra  # noqa: F401
        have_astra = not args.no_astra
    except ImportError:
        have_astra = False

    n, nb = args.n, args.bins
    truth, name = phantom(n, nb)
    mask = circle_mask(n)
    full = np.linspace(0.0, 180.0, args.angles, endpoint=False)
    print(f"phantom {name}, {n} x {n} px, {nb} bins; torch {torch.__version__} on 1 CPU "
          f"thread; times = wall s per slice (all {nb} bins)")
    hdr = (f"{'angles':>7} {'noise':>6} {'method':<26} {'PSNR dB':>8} {'SSIM':>6} "
           f"{'time s':>8}")
    print(hdr)
    print("-" * len(hdr))
    rng = np.random.default_rng(0)
    t_start = time.perf_counter()
    for frac in (1, 2, 4):
        ang = full[::frac]
        clean = radon(truth, ang)
        # the projector is built once per geometry and shared, as a flow would; its
        # build time is reported on its own row
        t0 = time.perf_counter()
        P = Projector(ang, n, backend="torch")
        t_build = time.perf_counter() - t0
        print(f"{ang.size:>7} {'':>6} {'(build torch projector)':<26} {'':>8} {'':>6} "
              f"{t_build:>8.2f}")
        for level in args.noise:
            sino = (clean + level * clean.max() * rng.standard_normal(clean.shape)).astype(np.float32)
            runs = [
                ("FBP (ramp)", lambda: fbp(sino, ang)),
                (f"SIRT {args.sirt_iter} it", lambda: sirt(sino, ang, n_iter=args.sirt_iter,
                                                           projector=P)),
                (f"CGLS {args.cgls_iter} it", lambda: cgls(sino, ang, n_iter=args.cgls_iter,
                                                           projector=P)),
                (f"TV Adam {args.tv_iter} ep", lambda: tv_reconstruct(sino, ang,
                                                                       n_iter=args.tv_iter,
                                                                       projector=P)),
            ]
            if have_astra:
                ka = max(1, min(args.astra_bins, nb))
                runs.append((f"astra SIRT {args.sirt_iter} it" + (f" [{ka} bins]" if ka < nb else ""),
                             lambda: astra_sirt(sino[:, :, :ka], ang, mask, args.sirt_iter)))
            for label, fn in runs:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    t0 = time.perf_counter()
                    rec = fn()
                    dt = time.perf_counter() - t0
                rec = np.asarray(rec)
                kb = rec.shape[2]
                if kb < nb:                       # astra on a few bins: time scaled per bin
                    dt *= nb / kb
                p, s = scores(rec, truth[:, :, :kb])
                note = ""
                if label.startswith("SIRT"):
                    sirt_rec = rec
                elif label.startswith("astra"):
                    ours = sirt_rec[:, :, :kb]
                    d = np.sqrt(np.mean((ours - rec)[mask] ** 2) / np.mean(rec[mask] ** 2))
                    note = f"  ours on the same bins {scores(ours, truth[:, :, :kb])[0]:.2f} dB, " \
                           f"rel RMS ours - astra {d:.1e}" + (
                               f"; time x{nb / kb:g} from {kb} bins" if kb < nb else "")
                print(f"{ang.size:>7} {level:>6.2f} {label:<26} {p:>8.2f} {s:>6.3f} {dt:>8.2f}"
                      f"{note}", flush=True)
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
