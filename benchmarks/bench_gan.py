"""Self-supervised GAN reconstruction (tasks.gan) against FBP at full, 1/2 and 1/4 angles.

The simulator's "shapes" phantom (tasks.simulate.make_phantom, all phases summed; or an
image phantom with ``--phantom PATH``), ``--n`` pixels square; sinograms from
tasks.reconstruct.radon (exact strip integrals) over 0-180 deg with ``--angles`` (full),
half and a quarter of them, plus Gaussian noise of ``--noise`` fractions of the sinogram
maximum (two levels by default). Every setting is reconstructed by FBP (tasks.reconstruct
.fbp, ramp filter; the peer, measured in the same run) and by the GAN with both generator
inputs: ``start="sinogram"`` (GANrec, Yang et al. J. Synchrotron Rad. 27 (2020) 486) and
``start="fbp"`` (residual from the FBP image, Butler et al., AI3SD), same seed, ``--iters``
iterations, generator learning rate ``--lr``.

Run:  python benchmarks/bench_gan.py [--n 64] [--angles 96] [--iters 200] [--noise 0.01 0.05]
      [--threads 1] [--no-adv] [--device cpu]

Prints one table: PSNR (dB) and SSIM (skimage.metrics, data_range = truth max - min, over
the whole image; every method is zero outside the reconstruction circle), the relative
data residual ||A x - y|| / ||y|| of each result against the noisy sinogram, and the time
per slice: wall seconds and process CPU seconds (the CPU column is the one to compare
when the machine is shared). ``--no-adv`` adds rows with the adversarial term off
(lam_adv = 0: the network prior alone) to show what the discriminator contributes.

Measured 2026-11-23 (defaults plus --no-adv; 2-core machine shared with other jobs, so
compare the cpu column), PSNR dB FBP / GAN sinogram / GAN fbp:

    96 angles   1 %: 30.73 / 27.97 / 33.38     5 %: 19.56 / 16.21 / 21.64
    48 (1/2)    1 %: 28.65 / 27.04 / 30.82     5 %: 16.57 / 13.71 / 18.80
    24 (1/4)    1 %: 25.34 / 26.91 / 28.09     5 %: 12.87 / 15.24 / 15.22

GAN time per slice 3.7-8.3 s CPU (FBP 3-12 ms); without the adversarial term 2.6-4.6 s
CPU and within 0.1 dB except sinogram start, 1/4 angles, 5 %: 14.43 dB.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.gan import gan_reconstruct  # noqa: E402
from tasks.projector import Projector  # noqa: E402
from tasks.reconstruct import fbp, radon  # noqa: E402
from tasks.simulate import SimConfig, make_phantom  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64, help="image side, pixels")
    ap.add_argument("--angles", type=int, default=96, help="angles of the full scan")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lam-data", type=float, default=100.0)
    ap.add_argument("--noise", type=float, nargs="+", default=[0.01, 0.05],
                    help="Gaussian noise sigma as fractions of the sinogram maximum")
    ap.add_argument("--phantom", default="shapes", help="'shapes' or an image path")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-adv", action="store_true", help="also run with lam_adv = 0")
    args = ap.parse_args(argv)

    import torch
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    torch.set_num_threads(args.threads)
    n = args.n
    truth = make_phantom(SimConfig(n_translations=n, n_angles=8, phantom=args.phantom),
                         3).sum(0).astype(np.float32)
    dr = float(truth.max() - truth.min())

    def scores(img, sino, P):
        p = P.forward_np(img)
        res = float(np.linalg.norm(p - sino) / np.linalg.norm(sino))
        return (peak_signal_noise_ratio(truth, img, data_range=dr),
                structural_similarity(truth, img, data_range=dr), res)

    methods = [("GAN sinogram", dict(start="sinogram")), ("GAN fbp", dict(start="fbp"))]
    if args.no_adv:
        methods += [("DIP sinogram (no adv)", dict(start="sinogram", lam_adv=0.0)),
                    ("DIP fbp (no adv)", dict(start="fbp", lam_adv=0.0))]
    print(f"# bench_gan: {n}x{n} '{args.phantom}' phantom, full scan {args.angles} angles, "
          f"{args.iters} iterations, lr {args.lr:g}, lam_data {args.lam_data:g}, torch "
          f"{torch.__version__} on {args.device} with {args.threads} thread(s)")
    hdr = (f"{'angles':>7} {'noise':>6} {'method':<22} {'PSNR dB':>8} {'SSIM':>6} "
           f"{'resid':>6} {'wall s':>7} {'cpu s':>6}")
    print(hdr)
    print("-" * len(hdr))
    t_all = time.perf_counter()
    rows = []
    for frac in (1, 2, 4):
        na = args.angles // frac
        ang = np.linspace(0.0, 180.0, na, endpoint=False)
        clean = radon(truth, ang)
        P = Projector(ang, n, backend="torch", device=args.device)
        for k, noise in enumerate(args.noise):
            rng = np.random.default_rng(1000 + 10 * frac + k)
            sino = (clean + noise * clean.max() * rng.standard_normal(clean.shape)).astype(np.float32)
            label = f"{na}" + ("" if frac == 1 else f" (1/{frac})")
            t0, c0 = time.perf_counter(), time.process_time()
            f = fbp(sino, ang)
            t1, c1 = time.perf_counter() - t0, time.process_time() - c0
            ps, ss, res = scores(f, sino, P)
            rows.append((na, noise, "FBP", ps, ss))
            print(f"{label:>7} {noise:>6.3f} {'FBP (ramp)':<22} {ps:8.2f} {ss:6.3f} {res:6.3f} "
                  f"{t1:7.3f} {c1:6.3f}", flush=True)
            for name, kw in methods:
                t0, c0 = time.perf_counter(), time.process_time()
                img, info = gan_reconstruct(sino, ang, n_iter=args.iters, lr=args.lr,
                                            lam_data=args.lam_data, seed=args.seed,
                                            device=args.device, projector=P, **kw)
                t1, c1 = time.perf_counter() - t0, time.process_time() - c0
                ps, ss, res = scores(img, sino, P)
                rows.append((na, noise, name, ps, ss))
                flag = " diverged" if info["diverged"][0] else ""
                print(f"{label:>7} {noise:>6.3f} {name:<22} {ps:8.2f} {ss:6.3f} {res:6.3f} "
                      f"{info['seconds'][0]:7.2f} {c1:6.2f}{flag}", flush=True)
    print(f"# total {time.perf_counter() - t_all:.0f} s wall")
    return rows


if __name__ == "__main__":
    main()
