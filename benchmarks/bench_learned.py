"""Learned and iterative reconstruction, and chemical-image super-resolution, in one table.

Reconstruction rows: FBP, SIRT, CGLS, autodiff TV (tasks.iterative), GAN (tasks.gan, FBP
start) and CNN (tasks.cnn, trained here on a catalyst-like phantom library, one model per
angle set) on images none of them saw:

* ``catalyst`` -- held-out catalyst-like phantoms (seeds outside the training library);
* ``shapes`` -- random large shapes (what the AI3SD report's CNN fails on; the CNN's
  out-of-distribution check flags them, and the flow would fall back to FBP: the ``ood``
  column gives the flagged fraction, the CNN scores are its raw output);
* ``real catalyst`` -- ../shared/data/real/ndtomo_images/catalyst_particles_small.tif,
  area-resampled to the image size;
* ``real battery`` -- Battery_21700.tif (a CT slice of a 21700 cell), resampled likewise.

for all angles (``n_angle`` = 1.5 x image size), 1/2 and 1/4 of them, at two Gaussian
noise levels (percent of the sinogram's maximum). PSNR and SSIM (``skimage.metrics``,
``data_range`` = the truth's range) against the truth; the last rows give the time per
slice of one radial bin on this machine's CPU (torch threads as set by ``--threads``).

Super-resolution rows (2x and 4x; bilinear, bicubic, single-input, dual-input networks) are
printed by the same run through benchmarks/bench_superres.py's evaluation (``--no-sr`` skips).

No GPU rows here: this script is run on the GPU machine with ``--device cuda`` for those.

Run:  python benchmarks/bench_learned.py [--size 48] [--images 2] [--quick] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL = ROOT.parent / "shared" / "data" / "real" / "ndtomo_images"

METHODS = ("fbp", "sirt", "cgls", "tv", "gan", "cnn")


def _metrics(img, truth):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rng = float(truth.max() - truth.min()) or 1.0
    return (peak_signal_noise_ratio(truth, img, data_range=rng),
            structural_similarity(truth, img, data_range=rng))


def _real_image(name: str, n: int) -> np.ndarray | None:
    """A real image resampled (area) to n x n inside the reconstruction circle, scaled to [0, 1]."""
    p = REAL / name
    if not p.is_file():
        return None
    from skimage.io import imread
    from skimage.transform import resize

    im = np.asarray(imread(p), np.float64)
    if im.ndim == 3:
        im = im[..., :3].mean(-1)
    s = min(im.shape)
    im = im[(im.shape[0] - s) // 2:(im.shape[0] - s) // 2 + s, (im.shape[1] - s) // 2:(im.shape[1] - s) // 2 + s]
    im = resize(im, (n, n), anti_aliasing=True)
    im = (im - im.min()) / (im.max() - im.min() or 1.0)
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    im[np.hypot(yy, xx) > 0.9 * n / 2] = 0
    return im.astype(np.float32)


def test_sets(n: int, k: int) -> dict[str, list[np.ndarray]]:
    from tasks import cnn

    rng = np.random.default_rng(123_456)  # seeds the training library never uses
    sets = {"catalyst": [cnn.catalyst_phantom(n, rng) for _ in range(k)],
            "shapes": [cnn.shapes_phantom(n, rng) for _ in range(k)]}
    for label, name in (("real catalyst", "catalyst_particles_small.tif"),
                        ("real battery", "Battery_21700.tif")):
        im = _real_image(name, n)
        if im is not None:
            sets[label] = [im]
    return sets


def reconstruct(method, sino, ang, model, device, quick):
    from tasks.gan import gan_reconstruct
    from tasks.iterative import reconstruct as it
    from tasks.reconstruct import fbp

    if method == "fbp":
        return fbp(sino, ang)
    if method == "sirt":
        return it(sino, ang, "sirt", n_iter=50 if quick else 100)
    if method == "cgls":
        return it(sino, ang, "cgls", n_iter=10 if quick else 20)
    if method == "tv":
        return it(sino, ang, "tv", n_iter=100 if quick else 200, lam_tv=0.01, device=device)
    if method == "gan":
        img, _info = gan_reconstruct(sino, ang, start="fbp", n_iter=100 if quick else 200,
                                     lam_adv=0.0 if quick else 1.0, device=device)
        return img
    from tasks.cnn import predict

    return predict(model, sino)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=48, help="image side (translations)")
    ap.add_argument("--images", type=int, default=2, help="simulated images per set")
    ap.add_argument("--noise", type=float, nargs=2, default=(1.0, 5.0), help="noise levels, %% of max")
    ap.add_argument("--train", type=int, default=500, help="CNN library size")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer iterations and epochs")
    ap.add_argument("--no-sr", action="store_true", help="skip the super-resolution rows")
    args = ap.parse_args(argv)
    import torch

    from tasks import cnn
    from tasks.reconstruct import radon

    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.size
    full = int(round(1.5 * n))
    angle_sets = {"all": full, "1/2": full // 2, "1/4": full // 4}
    sets = test_sets(n, 1 if args.quick else args.images)
    epochs = max(3, args.epochs // 3) if args.quick else args.epochs
    rows, times = [], {m: [] for m in METHODS}
    train_s = {}
    for label, na in angle_sets.items():
        ang = cnn.default_angles(na)
        t0 = time.perf_counter()
        lib = cnn.build_library(args.train // (3 if args.quick else 1), n, na, kind="catalyst",
                                seed=0, noise=0.01)
        model = cnn.train(lib, epochs=epochs, lr=1e-3, seed=0, device=args.device)
        train_s[label] = time.perf_counter() - t0
        for noise in args.noise:
            rng = np.random.default_rng(int(noise * 100) + na)
            for set_name, images in sets.items():
                scores = {m: [] for m in METHODS}
                ood = []
                for img in images:
                    clean = radon(img, ang)
                    sino = (clean + rng.normal(0, noise / 100 * clean.max(), clean.shape)).astype(np.float32)
                    ood.append(cnn.is_out_of_distribution(model, sino)[0])
                    for m in METHODS:
                        t1 = time.perf_counter()
                        rec = np.asarray(reconstruct(m, sino, ang, model, args.device, args.quick), np.float32)
                        times[m].append(time.perf_counter() - t1)
                        scores[m].append(_metrics(rec, img))
                rows.append((set_name, f"{label} ({na})", f"{noise:g} %",
                             {m: np.mean(scores[m], axis=0) for m in METHODS}, float(np.mean(ood))))
                print(f"  done: {set_name}, {label} angles, {noise:g} % noise", file=sys.stderr, flush=True)
    head = f"{'images':<15}{'angles':<11}{'noise':<7}" + "".join(f"{m.upper():>14}" for m in METHODS) + "   cnn ood"
    print(f"\nReconstruction, {n} x {n} px, one radial bin; PSNR dB / SSIM against the truth "
          f"(CNN: {args.train // (3 if args.quick else 1)} catalyst-like training pairs, {epochs} epochs; "
          f"training {', '.join(f'{k} {v:.0f} s' for k, v in train_s.items())})")
    print(head)
    print("-" * len(head))
    for set_name, lab, noise, sc, ood in rows:
        best = max(METHODS, key=lambda m: sc[m][0])
        cells = "".join(f"{sc[m][0]:>7.2f}/{sc[m][1]:.2f}" + ("*" if m == best else " ") for m in METHODS)
        print(f"{set_name:<15}{lab:<11}{noise:<7}{cells}   {ood:.2f}")
    print(f"{'time per slice':<33}" + "".join(f"{np.mean(times[m]):>13.3f}s" for m in METHODS))
    print(f"{'ratio to FBP':<33}" + "".join(f"{np.mean(times[m]) / np.mean(times['fbp']):>13.0f}x" for m in METHODS))
    print("* best PSNR in the row. ood: fraction of the row's inputs the CNN's check flags "
          "(the flow reconstructs those with FBP).")
    if not args.no_sr:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import bench_superres

        print("\nSuper-resolution (benchmarks/bench_superres.py, same run):", flush=True)
        bench_superres.main(["--quick"] if args.quick else [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
