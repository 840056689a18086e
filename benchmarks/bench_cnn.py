"""CNN reconstruction (tasks.cnn, the AI3SD report's cnn_reconstruct) against FBP
(tasks.reconstruct.fbp), measured in the same run.

For each angle count (full = as many angles as translations, 1/2, 1/4; uniform over
180 deg) one CNN is trained on a simulated catalyst-like library (nDTomo catalyst-image
crops when ../shared/data/real is present, else procedural particles) with 1 % sinogram
noise, then both methods reconstruct held-out catalyst-like phantoms (other seed) and
random-shape phantoms (the out-of-distribution case of the AI3SD report). Accuracy: mean
PSNR and SSIM (skimage.metrics, data range = each truth's max - min) against the
phantoms; the OOD column is the fraction of inputs the check flags. Times: wall seconds
per slice (one sinogram; and per slice of --bins bins, batched), and training time, on
the CPU (torch threads as given by --threads).

Run:  python benchmarks/bench_cnn.py [--size 32] [--n-train 1500] [--epochs 25]
      [--lr 1e-3] [--threads 1] [--device cpu] [--arch JSON]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import cnn  # noqa: E402
from tasks.reconstruct import fbp  # noqa: E402


def _metrics(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ps, ss = [], []
    for p, g in zip(pred, truth):
        r = float(g.max() - g.min()) or 1.0
        ps.append(peak_signal_noise_ratio(g, p, data_range=r))
        ss.append(structural_similarity(g, p, data_range=r))
    return float(np.mean(ps)), float(np.mean(ss))


def _time(fn, repeat: int = 5) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--n-train", type=int, default=1500)
    ap.add_argument("--n-test", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--noise", type=float, default=0.01)
    ap.add_argument("--bins", type=int, default=64, help="bins per slice for the batched timing")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fractions", default="1,2,4", help="angle divisors (1 = full)")
    ap.add_argument("--arch", default=None, help='network widths as JSON, e.g. '
                    '\'{"dense": 256, "n_dense": 1, "refine": 8}\' (default tasks.cnn.DEFAULT_ARCH)')
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    n = args.size
    rows = []
    for div in (int(x) for x in args.fractions.split(",")):
        na = max(2, n // div)
        lib = cnn.build_library(args.n_train, n, na, kind="catalyst", seed=0, noise=args.noise)
        t0 = time.perf_counter()
        model = cnn.train(lib, epochs=args.epochs, lr=args.lr, seed=0, device=args.device,
                          arch=json.loads(args.arch) if args.arch else None)
        t_train = time.perf_counter() - t0
        model.net.to("cpu")
        sets = {"catalyst (held out)": cnn.build_library(args.n_test, n, na, kind="catalyst",
                                                         seed=1, noise=args.noise),
                "random shapes": cnn.build_library(args.n_test, n, na, kind="shapes", seed=2,
                                                   noise=args.noise)}
        one = sets["catalyst (held out)"].sinograms[0]
        stack = np.repeat(one[:, :, None], args.bins, axis=2)
        t_fbp1 = _time(lambda: fbp(one, lib.angles_deg))
        t_cnn1 = _time(lambda: cnn.predict(model, one))
        t_fbpb = _time(lambda: fbp(stack, lib.angles_deg), repeat=2)
        t_cnnb = _time(lambda: cnn.predict(model, stack), repeat=2)
        for name, test in sets.items():
            s = np.moveaxis(test.sinograms, 0, -1)
            f = np.moveaxis(fbp(s, test.angles_deg), -1, 0)
            c = np.moveaxis(cnn.predict(model, s), -1, 0)
            pf, sf = _metrics(f, test.images)
            pc, sc = _metrics(c, test.images)
            thr = model.ood["threshold"]
            flagged = float(np.mean(cnn.ood_score(model, s) > thr))
            rows.append((f"1/{div}" if div > 1 else "full", na, name, pf, sf, pc, sc, flagged,
                         t_fbp1, t_cnn1, t_fbpb, t_cnnb, t_train))
        print(f"# trained {na} angles: best epoch {model.metrics['best_epoch']}/{args.epochs}, "
              f"val RMSE {model.metrics['val_rmse']:.3f}, {t_train:.0f} s", flush=True)

    print(f"\nCNN vs FBP, {n} px, {args.n_train} training pairs, {args.epochs} epochs, lr {args.lr:g}, "
          f"noise {args.noise:g}, arch {json.dumps(model.arch)}, torch threads {args.threads}, "
          f"device {args.device}")
    hdr = ("angles", "n", "phantoms", "FBP PSNR", "FBP SSIM", "CNN PSNR", "CNN SSIM", "OOD flagged",
           "FBP s/slice", "CNN s/slice", f"FBP s/{args.bins} bins", f"CNN s/{args.bins} bins",
           "train s")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.3f} | {r[5]:.2f} | {r[6]:.3f} | "
              f"{r[7]:.2f} | {r[8]:.4f} | {r[9]:.4f} | {r[10]:.3f} | {r[11]:.3f} | {r[12]:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
