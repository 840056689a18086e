"""Chemical-image super-resolution (tasks.superres): bilinear, bicubic, guided filter,
single-input and dual-input networks, at 2x and 4x, on held-out phantoms and on structures
from the real images in ../shared/data/real/ndtomo_images.

Training: for each factor, a library of random phantoms (:func:`tasks.superres.build_sr_library`
with ``kinds=("random",)``: nothing evaluated below is in it) trains a single-input and a
dual-input network on the CPU; their training time is printed.

Evaluation sets (PSNR and SSIM from ``skimage.metrics``, ``data_range`` = the truth's range,
averaged over the phases of a set; time columns: wall and CPU (process) ms per image,
inference only; with ``--threads 1`` CPU time is the wall time an idle core would take):

* ``shapes``: the fixed ``shapes`` phantom of :func:`tasks.simulate.make_phantom` (256 px,
  3 phases), never seen in training.
* ``catalyst``: ``catalyst_particles_large.tif`` (870 px; the same structure as the
  218 / 434 px files) segmented into 3 phases by the simulator's image segmentation
  (:func:`tasks.simulate._image_phantom`): truth = each phase's map at 870 px (cropped to
  a multiple of the factor), input = its area-downsampled version plus 0.5 % noise, guide
  = attenuation-weighted sum of the phases blurred (sigma 0.7 px) with 1 % noise: real
  structure, simulated contrasts.
* ``catalyst-grey``: the greyscale image itself as truth and its area-downsampled version
  as input (no guide exists that is not the truth itself, so only unguided methods).
* ``battery``: ``Battery_21700.tif`` (1568 px CT slice) split by multi-Otsu grey levels
  into casing and jelly roll (2 phases), same construction as ``catalyst``.
* ``... from-data`` rows: the guide replaced by what the XRD-CT data give by themselves,
  the absorption image area-downsampled to the chemical image's grid and bicubic-upsampled
  (as :func:`tasks.superres.absorption_from_xrdct` with ``factor``): it holds no detail
  finer than the chemical image, so any gain over bicubic is denoising, not resolution.

Run:  python benchmarks/bench_superres.py [--epochs 80] [--threads 1] [--quick]
Default run: about 3-4 minutes of CPU time (one torch thread); the final line prints both.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import superres as sr  # noqa: E402
from tasks.simulate import SimConfig, _image_phantom, make_phantom  # noqa: E402

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "ndtomo_images"


def _metrics(truth, img):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    dr = float(truth.max() - truth.min())
    return (peak_signal_noise_ratio(truth, img, data_range=dr),
            structural_similarity(truth, img, data_range=dr))


def _crop(m, f):
    n = (m.shape[-1] // f) * f
    o = (m.shape[-1] - n) // 2
    return np.ascontiguousarray(m[..., o:o + n, o:o + n])


def _centre(a, n):
    o = (a.shape[-1] - n) // 2
    return np.ascontiguousarray(a[..., o:o + n, o:o + n])


def _battery_masses(path):
    from skimage.filters import threshold_multiotsu

    img = np.asarray(sr.load_guide(path), float)
    t = threshold_multiotsu(img, classes=4)
    cls = np.digitize(img, t)  # 0 air, 1 dark (holes, separators), 2 jelly roll, 3 casing
    dens = img / img[cls >= 2].mean()
    return np.stack([np.where(cls == 2, dens, 0.0), np.where(cls == 3, dens, 0.0)])


def eval_sets(f, quick):
    """{name: list of SRPair} at factor f."""
    sets = {}
    m = make_phantom(SimConfig(n_translations=128 if quick else 256, phantom="shapes"), 3)
    sets["shapes"] = [sr.make_sr_pair(m, p, f, seed=10 + p, guide_blur_px=0.7, guide_noise=0.01,
                                      low_noise=0.005, source="shapes") for p in range(3)]
    cat = IMAGES / "catalyst_particles_large.tif"
    if cat.is_file():
        m = _crop(_image_phantom(cat, 3), f)
        if quick:
            m = _centre(m, 256)
        mu = [0.6, 1.0, 1.4]
        sets["catalyst"] = [sr.make_sr_pair(m, p, f, seed=20 + p, mu=mu, guide_blur_px=0.7,
                                            guide_noise=0.01, low_noise=0.005, source="catalyst")
                            for p in range(3)]
        grey = _crop(sr.load_guide(cat)[None].astype(float) / 255.0, f)[0]
        if quick:
            grey = _centre(grey, 256)
        sets["catalyst-grey"] = [sr.SRPair(high=grey.astype(np.float32), low=sr.area_downsample(grey, f),
                                           guide=None, factor=f, source="catalyst-grey")]
    bat = IMAGES / "Battery_21700.tif"
    if bat.is_file():
        m = _crop(_battery_masses(bat), f)
        if quick:
            m = m[:, 200:456, 656:912]
        sets["battery"] = [sr.make_sr_pair(m, p, f, seed=30 + p, mu=[0.8, 1.5], guide_blur_px=0.7,
                                           guide_noise=0.01, low_noise=0.005, source="battery")
                           for p in range(2)]
    return sets


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--library", type=int, default=32, help="training pairs per factor")
    ap.add_argument("--size", type=int, default=128, help="training image side (px)")
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--factors", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--quick", action="store_true", help="tiny run (smoke test of the script)")
    ap.add_argument("--save", type=Path, default=None, help="directory to save the trained models in")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        args.epochs, args.library, args.size = 4, 8, 64
    t_all, c_all = time.perf_counter(), time.process_time()
    rows, train_rows = [], []
    for f in args.factors:
        lib = sr.build_sr_library(args.library, size=args.size, factor=f, kinds=("random",), seed=f)
        nets = {}
        for kind in ("single", "dual"):
            c0 = time.process_time()
            nets[kind] = sr.train_sr(lib, kind=kind, factor=f, epochs=args.epochs, seed=0,
                                     channels=args.channels, blocks=args.blocks)
            train_rows.append((f, kind, nets[kind].train_seconds, time.process_time() - c0,
                               nets[kind].train_loss))
            if args.save:
                args.save.mkdir(parents=True, exist_ok=True)
                sr.save_model(nets[kind], args.save / f"superres_{kind}_x{f}.pt")
        for name, pairs in eval_sets(f, args.quick).items():
            pairs = [p for p in pairs if np.ptp(p.high) > 0]  # a phase absent from a crop
            if not pairs:
                continue
            guided = pairs[0].guide is not None
            variants = [("bilinear", None), ("bicubic", None), ("single", None)]
            if guided:
                variants += [("guided", "true"), ("dual", "true"), ("guided", "from-data"), ("dual", "from-data")]
            for method, gkind in variants:
                ps, ss, ts, cs = [], [], [], []
                for p in pairs:
                    guide = p.guide
                    if gkind == "from-data":
                        guide = sr.upscale(sr.area_downsample(p.guide, f), f, method="bicubic")
                    t0, c0 = time.perf_counter(), time.process_time()
                    out = sr.upscale(p.low, f, method=method, model=nets.get(method), guide=guide)
                    ts.append(time.perf_counter() - t0)
                    cs.append(time.process_time() - c0)
                    a, b = _metrics(p.high, out)
                    ps.append(a)
                    ss.append(b)
                label = method + (" (guide from data)" if gkind == "from-data" else "")
                rows.append((name, pairs[0].high.shape[0], f, label, np.mean(ps), np.mean(ss), 1e3 * np.mean(ts),
                             1e3 * np.mean(cs)))

    print(f"\nSuper-resolution benchmark (CPU, torch threads = {args.threads}; networks: "
          f"{args.channels} channels, {args.blocks} residual blocks; trained on {args.library} random "
          f"phantoms of {args.size} px, {args.epochs} epochs)")
    hdr = (f"{'set':14s} {'HR px':>6s} {'factor':>6s} {'method':28s} {'PSNR dB':>8s} {'SSIM':>6s} "
           f"{'wall ms/img':>11s} {'CPU ms/img':>10s}")
    print(hdr)
    print("-" * len(hdr))
    last = None
    for name, n, f, label, p, s, t, c in rows:
        if last is not None and (name, f) != last:
            print()
        last = (name, f)
        print(f"{name:14s} {n:6d} {f:6d} {label:28s} {p:8.2f} {s:6.3f} {t:11.1f} {c:10.1f}")
    print("\nTraining (CPU):")
    print(f"{'factor':>6s} {'network':8s} {'wall s':>8s} {'cpu s':>8s} {'final L1':>9s}")
    for f, kind, tw, tc, loss in train_rows:
        print(f"{f:6d} {kind:8s} {tw:8.1f} {tc:8.1f} {loss:9.4f}")
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s wall, {time.process_time() - c_all:.0f} s CPU "
          "(CPU time is what an idle machine would take as wall time with --threads 1)")


if __name__ == "__main__":
    main()
