"""FBP on noisy data: xrdct's default (filter chosen from the noise) against each of its
filters and nDTomo's chain, on nDTomo's own phantom.

One table, one run. The phantom is nDTomo's (``nDTomo.sim.phantoms``): its five component
images (``nDTomophantom_2D(..., 'Multiple')``: Siemens star, circles, squares, triangle,
face) times its five example diffraction patterns (``load_example_patterns``: Al, Cu, Fe,
Pt, Zn, 250 channels), normalised to a brightest voxel of 1, as ``nDTomophantom_3D(...,
use_spectra=True, indices='All')`` builds it, at ``--inner`` pixels inside a ``--n`` pixel
field of view (air around it, as a scan has), 128 x 128 x 250 by default. It is made
``--ss`` times finer than the reconstruction grid: the sinogram is the exact strip
integral (:func:`tasks.reconstruct.radon`) of the fine image binned to one translation
step, and the truth of each reconstruction is the fine image averaged over *that
reconstruction's* pixels. nDTomo's chain reconstructs on a grid offset by half a pixel
(below); comparing it with the same pixel-aligned truth as ours would charge it for the
offset, and a phantom drawn on our grid would favour ours, so both are measured against
their own pixel averages. Poisson noise: the sinogram scaled so that its brightest bin
holds ``--counts`` counts.

Rows: ``--counts`` levels (and noise-free). Columns (relative RMS inside the sample, the
voxels whose summed truth exceeds 1 % of its maximum, all channels together):

* ``default``: xrdct as its reconstruct stage runs with the default spec: the sinogram
  stage's corrections (``process_sinogram`` with ``SinogramSpec()``: per-angle scaling,
  air columns, centre of rotation found, Fourier-shift centring) then
  :func:`tasks.reconstruct.fbp` with ``ReconstructionSpec()``'s filter, ``auto``
  (:func:`tasks.reconstruct.choose_filter`: a filter per radial bin); the most frequent
  choice is shown, and all of them under the table.
* one column per candidate of :data:`tasks.reconstruct.AUTO_FILTERS` on the same
  corrected sinogram, the same in every bin; ``best`` = the least of them, chosen with
  hindsight.
* ``nDTomo``: nDTomo's chain, ``nDTomo.tomo.sinograms.sinocentering`` (centre of
  rotation by flipping the 180 projection; the sinogram re-sampled by linear
  interpolation, ``interp=True``) then ``astra_rec_vol`` (astra-toolbox CPU ``FBP``,
  ``Ram-Lak``, the ``strip`` projector of ``astra_create_geo``). When nDTomo is not
  importable the chain is re-implemented (the same linear-interpolation centring, then
  ramp FBP by :func:`tasks.reconstruct.fbp`, equal to astra's within 1e-4) and the
  table says so.

nDTomo (GPL-3) is not a dependency: ``pip install --no-deps ndtomo xdesign
cached-property``. Its package ``__init__`` imports modules this bench does not use
(``xgboost``, ``algotom``, ``pkg_resources`` through xdesign); when those are absent they
are replaced by empty stand-ins, and the table says so.

Run::

    python benchmarks/bench_noise.py [--n 128] [--inner 112] [--ss 4]
                                     [--counts 200 2000 20000] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.spec import ReconstructionSpec, SinogramSpec  # noqa: E402
from tasks.reconstruct import AUTO_FILTERS, choose_filter, fbp, radon  # noqa: E402
from tasks.sinogram import process_sinogram  # noqa: E402


def _stub_missing(names):
    """Empty stand-ins for modules nDTomo imports at package level but this bench never
    calls; returns the names stubbed."""
    done = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                sub = ".".join(parts[:i])
                if sub not in sys.modules:
                    sys.modules[sub] = types.ModuleType(sub)
            done.append(name)
    mods = sys.modules
    if "xgboost" in done:
        mods["xgboost"].XGBClassifier = type("XGBClassifier", (), {})
    if "pkg_resources" in done:
        class DistributionNotFound(Exception):
            pass

        def get_distribution(name):
            raise DistributionNotFound(name)

        mods["pkg_resources"].DistributionNotFound = DistributionNotFound
        mods["pkg_resources"].get_distribution = get_distribution
    return done


def load_ndtomo():
    """nDTomo's phantom and chain functions, the stand-ins used, or None."""
    stubbed = _stub_missing(["xgboost", "algotom.prep.removal", "algotom.util.utility",
                             "pkg_resources"])
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from nDTomo.sim.phantoms import load_example_patterns, nDTomophantom_2D
            from nDTomo.tomo.astra_tomo import astra_create_geo, astra_rec_vol
            from nDTomo.tomo.sinograms import sinocentering
    except Exception as err:  # noqa: BLE001 - nDTomo absent or broken: re-implement
        return None, f"{type(err).__name__}: {err}"
    return dict(images=nDTomophantom_2D, patterns=load_example_patterns,
                geo=astra_create_geo, rec=astra_rec_vol, centre=sinocentering), stubbed


def own_phantom(m):
    """Four-phase stand-in when nDTomo is absent: disks, a ring and a bar at ``m`` pixels
    (5 images), 250-channel Gaussian-peak patterns."""
    c = (m - 1) / 2
    yy, xx = (np.mgrid[:m, :m] - c) / (m / 2)
    r = np.hypot(xx, yy)
    ims = [(r < 0.95) * 0.5, np.hypot(xx - 0.3, yy + 0.2) < 0.25, (r > 0.5) & (r < 0.7),
           (abs(xx + 0.3) < 0.15) & (abs(yy) < 0.5), np.hypot(xx + 0.1, yy - 0.5) < 0.15]
    q = np.linspace(0, 1, 250)
    rng = np.random.default_rng(7)
    pats = [sum(np.exp(-0.5 * ((q - p) / 0.004) ** 2) for p in rng.uniform(0.05, 0.95, 6)) + 0.05
            for _ in ims]
    return [np.asarray(i, np.float64) for i in ims], pats


def make_data(n, inner, ss, nd):
    """Sinogram (angle, translation, channel) of the fine phantom binned to one step, the
    truth on our grid (n, n, C) and on the half-pixel-offset grid (n-1, n-1, C)."""
    N, m = n * ss, inner * ss
    if nd is not None:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ims = nd["images"](m, "Multiple")
            pats = nd["patterns"]()[:5]
    else:
        ims, pats = own_phantom(m)
    p = (N - m) // 2
    img = np.zeros((N, N, len(ims)), np.float32)
    for i, im in enumerate(ims):
        img[p:p + m, p:p + m, i] = im
    spec = np.stack([np.asarray(s, np.float64) for s in pats], 0)
    ang = np.arange(n) * 180.0 / n
    fine = radon(img, ang)                                   # (n, N, K), fine steps
    sino = fine.reshape(n, n, ss, -1).sum(axis=2) / ss ** 2  # strips of one coarse step

    def block(off):
        k = n - (1 if off else 0)
        a = img[off:off + k * ss, off:off + k * ss]
        return a.reshape(k, ss, k, ss, -1).mean(axis=(1, 3)) @ spec

    t0, t1 = block(0), block(ss // 2)
    peak = float((img.reshape(-1, img.shape[-1]) @ spec).max())
    return (np.clip(sino @ spec, 0, None) / peak).astype(np.float32), t0 / peak, t1 / peak, ang


def rel_rms(rec, truth):
    tot = truth.sum(axis=-1)
    mask = tot > 0.01 * tot.max()
    d = (rec - truth)[mask]
    return float(np.sqrt((d ** 2).sum() / (truth[mask] ** 2).sum()))


def xrdct_sinogram(s, ang):
    """The sinogram stage with the default spec (common width m, m - n even, as
    stage_sinogram makes it)."""
    n = s.shape[1]
    out, info = process_sinogram(s, ang, SinogramSpec())
    m = out.shape[1]
    if m != n:
        m += (m - n) % 2
        out, info = process_sinogram(s, ang, SinogramSpec(), width=m, center=info["center_px"])
    return out, (m - n) // 2


def peer_reimplemented(s, ang):
    """nDTomo's chain re-implemented: the axis of an even-width sinogram found at
    ``n/2 + 0.5`` by sinocentering is re-sampled by linear interpolation at half pixels
    (``n - 1`` columns), then ramp FBP."""
    n = s.shape[1]
    sn = 0.5 * (s[:, :-1] + s[:, 1:])
    return fbp(sn, ang, filter="ramp", circle=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--inner", type=int, default=112)
    ap.add_argument("--ss", type=int, default=4)
    ap.add_argument("--counts", type=float, nargs="+", default=[200, 2000, 20000])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    nd, stubbed = load_ndtomo()
    t = time.perf_counter()
    s0, truth, truth_half, ang = make_data(a.n, a.inner, a.ss, nd)
    print(f"phantom: {'nDTomo' if nd else 'own 5-image stand-in (nDTomo not importable: ' + str(stubbed) + ')'}"
          f", {a.n} x {a.n} x {s0.shape[-1]} ({a.inner} px sample, {a.ss}x supersampled), "
          f"{len(ang)} angles over 180 deg; built in {time.perf_counter() - t:.1f} s")
    if nd and stubbed:
        print(f"nDTomo imported with empty stand-ins for {', '.join(stubbed)} (not used here)")
    peer_name = "nDTomo sinocentering + astra FBP" if nd else "nDTomo chain re-implemented"
    rspec = ReconstructionSpec()
    names = [f if d == 1.0 else f"{f}@{d:g}" for f, d in AUTO_FILTERS]
    head = (f"{'counts':>10} | {'default (choice)':>24} | " + " | ".join(f"{x:>9}" for x in names)
            + f" | {'best':>6} | {'def/best':>8} | {'nDTomo':>7} | {'def/nDT':>7}")
    print(f"relative RMS inside the sample (default spec filter: {rspec.filter}); nDTomo = {peer_name}")
    print(head)
    print("-" * len(head))
    rng = np.random.default_rng(a.seed)
    choices = []
    for counts in [None, *a.counts]:
        if counts is None:
            s = s0
        else:
            k = counts / float(s0.max())
            s = (rng.poisson(s0 * k) / k).astype(np.float32)
        so, off = xrdct_sinogram(s, ang)
        crop = (slice(off, off + a.n), slice(off, off + a.n))
        if rspec.filter == "auto":
            (f, d), info = choose_filter(so, ang)
            top = sorted(info["counts"].items(), key=lambda kv: -kv[1])
            choice = top[0][0] + (f" +{len(top) - 1}" if len(top) > 1 else "")
            choices.append((counts, info))
        else:
            f, d = rspec.filter, rspec.cutoff
            choice = f if d == 1.0 else f"{f}@{d:g}"
        default = rel_rms(fbp(so, ang, filter=f, cutoff=d)[crop], truth)
        errs = [rel_rms(fbp(so, ang, filter=ff, cutoff=dd)[crop], truth) for ff, dd in AUTO_FILTERS]
        if nd:
            with contextlib.redirect_stdout(io.StringIO()):
                sn = nd["centre"](np.ascontiguousarray(s.transpose(1, 0, 2)), crsr=5, interp=True,
                                  scan=180, pbar=False)
                pg, rid, pid = nd["geo"](sn[:, :, 0], np.deg2rad(ang))
                peer = nd["rec"](sn, proj_geom=pg, proj_id=pid, rec_id=rid, method="FBP",
                                 filt="Ram-Lak", pbar=False)
        else:
            peer = peer_reimplemented(s, ang)
        pe = rel_rms(peer, truth_half)
        best = min(errs)
        label = "noise-free" if counts is None else f"{counts:g}"
        print(f"{label:>10} | {default:>8.4f} ({choice:>13}) | "
              + " | ".join(f"{e:>9.4f}" for e in errs)
              + f" | {best:>6.4f} | {default / best:>8.3f} | {pe:>7.4f} | {default / pe:>7.3f}",
              flush=True)

    print("default's choice (filter per radial bin: bins; +k = k more filters in the slice):")
    for counts, info in choices:
        label = "noise-free" if counts is None else f"{counts:g}"
        print(f"  {label:>10}: " + ", ".join(f"{k} x{v}" for k, v in info["counts"].items())
              + f"; noise variance {info['noise_variance']:.3g} per sample "
              f"({info['noise_method']}), {100 * info['noise_fraction']:.0f} % of the power above "
              "1/4 cycle per step")


if __name__ == "__main__":
    main()
