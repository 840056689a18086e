"""Centre of rotation on sinograms with a known axis: xrdct's ``find_center`` (default
``auto``: the first-moment consistency condition, reported with its uncertainty) against
the plain 0/180-degree mirror correlation and nDTomo's ``sinocentering``, all on the same
sinograms in the same run.

Sinograms: tests/centre_cases.py (the simulator's shapes phantom, turned by a random
angle, projected by :func:`tasks.reconstruct.radon` about a known axis; optional air
scatter, single-crystal hot spots and Poisson noise at N counts per radial bin with 250
(or 64) bins summed into the total-intensity sinogram). Angles ``linspace(0, span, n,
endpoint=False)`` unless the row says ``+end``.

Columns (|error| in px; the worst over ``--seeds`` seeds):

* ``xrdct`` - :func:`tasks.sinogram.find_center` with its defaults, and ``unc`` the median
  reported standard uncertainty.
* ``vo`` - the same function with ``method="vo"`` (Vo et al. 2014; its search range
  is now chosen from the scan).
* ``0/180 corr`` - the plain 0/180 correlation: ``find_center(method="correlation")``,
  the projections nearest to 180 degrees apart (every such pair of a 360 scan), searched
  over the whole plausible range ``(n-1)/2 +- (n/4 + 2)``.
* ``nDTomo`` - ``nDTomo.tomo.sinograms.sinocentering`` (nDTomo 2026.7; GPL-3, not a
  dependency): the 0.1 px grid minimum of the std of (first projection - flipped last
  projection of the first 180 degrees), on the (translation, angle) transposed sinogram,
  ``crsr = n/4 + 2`` so the axis is inside its range, ``scan=180`` or ``360``. It returns
  the centred sinogram; its centre is recovered from the printed COR ``cr`` as ``cr - 1``
  (its output column k samples the input at ``cr - ceil(n/2) + k`` and is mirrored about
  ``ceil(n/2) - 1``).

Install nDTomo for this benchmark only, without its heavy dependencies (napari, Qt,
torch, ...)::

    pip install --no-deps --target /tmp/ndtomo ndtomo algotom pywavelets
    PYTHONPATH=/tmp/ndtomo python benchmarks/bench_centre.py

(``sinograms.py`` imports algotom and, through it, pywt; the module file is loaded on
its own, so ``nDTomo.tomo``'s other modules - astra - are not needed.) Without it the
column says "not installed".

Run:  python benchmarks/bench_centre.py [--seeds 3] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from centre_cases import CentreCase, make_sinogram  # noqa: E402
from tasks.sinogram import find_center  # noqa: E402


def load_ndtomo():
    """nDTomo's sinograms module (loaded from its file), or None."""
    try:
        import nDTomo
    except ImportError:
        return None
    path = Path(nDTomo.__file__).parent / "tomo" / "sinograms.py"
    spec = importlib.util.spec_from_file_location("ndtomo_sinograms", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except ImportError as e:                       # algotom / pywt missing
        print(f"nDTomo found but its sinograms module does not import: {e}")
        return None
    return mod


def ndtomo_centre(mod, sino, case):
    n = sino.shape[1]
    crsr = n / 4.0 + 2.0
    # sinocentering prints its COR; read it back (it returns only the centred sinogram)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod.sinocentering(np.ascontiguousarray(sino.T), crsr=crsr, interp=True,
                          scan=int(case.span), pbar=True)
    line = [ln for ln in buf.getvalue().splitlines() if ln.startswith("Calculated COR")]
    return float(line[-1].split(":")[1]) - 1.0


def plain_correlation(sino, ang):
    n = sino.shape[1]
    half = n / 4.0 + 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return find_center(sino, ang, method="correlation",
                           search=((n - 1) / 2 - half, (n - 1) / 2 + half))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="skip the 400-translation rows")
    args = ap.parse_args(argv)
    nd = load_ndtomo()
    sizes = [(16, 12), (24, 24), (48, 36), (128, 128), (256, 90)]
    if not args.quick:
        sizes += [(400, 12), (400, 400)]
    noises = [("clean", {}), ("100cts/bin x250 +hot+air", dict(counts=100.0, hot=0.03, air=0.05)),
              ("100cts/bin x64 +hot+air", dict(counts=100.0, hot=0.03, air=0.05, n_bins=64))]
    rows = []
    t_ours = t_nd = 0.0
    for (nt, na) in sizes:
        for span, ep in ((180, False), (180, True), (360, False)):
            for frac in (0.07, -0.25):
                for label, kw in noises:
                    errs = {"xrdct": [], "vo": [], "corr": [], "nd": []}
                    uncs = []
                    for seed in range(args.seeds):
                        # + 0.037 px: off the 0.1 px grid that nDTomo searches
                        case = CentreCase(nt, na, span, frac * nt + 0.037, endpoint=ep,
                                          seed=1000 * seed + nt + na, **kw)
                        s, ang = make_sinogram(case)
                        t = time.perf_counter()
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            c, u = find_center(s, ang, return_uncertainty=True)
                            cv = find_center(s, ang, method="vo")
                        t_ours += time.perf_counter() - t
                        errs["xrdct"].append(abs(c - case.center))
                        uncs.append(u)
                        errs["vo"].append(abs(cv - case.center))
                        errs["corr"].append(abs(plain_correlation(s, ang) - case.center))
                        if nd is not None:
                            t = time.perf_counter()
                            errs["nd"].append(abs(ndtomo_centre(nd, s, case) - case.center))
                            t_nd += time.perf_counter() - t
                    name = (f"{nt}x{na} {span}{' +end' if ep else ''} off{frac * nt + 0.037:+.3f} "
                            f"{label}")
                    rows.append((name, max(errs["xrdct"]), float(np.median(uncs)),
                                 max(errs["vo"]), max(errs["corr"]),
                                 max(errs["nd"]) if errs["nd"] else None))
    w = max(len(r[0]) for r in rows)
    print(f"Centre of rotation: worst |error| over {args.seeds} seeds, px "
          "(the axis is known from the simulation)")
    print(f"{'scan':{w}s} | {'xrdct':>7s} {'unc':>6s} | {'vo':>7s} | {'0/180 corr':>10s} | "
          f"{'nDTomo':>13s}")
    print("-" * (w + 54))
    for name, e, u, ev, ec, en in rows:
        ndc = "not installed" if en is None else f"{en:13.3f}"
        print(f"{name:{w}s} | {e:7.3f} {u:6.3f} | {ev:7.3f} | {ec:10.3f} | {ndc}")
    ours = np.array([r[1] for r in rows])
    print("-" * (w + 54))
    print(f"rows within 0.1 px: xrdct {np.sum(ours < 0.1)}/{len(rows)}, vo "
          f"{sum(r[3] < 0.1 for r in rows)}/{len(rows)}, 0/180 corr "
          f"{sum(r[4] < 0.1 for r in rows)}/{len(rows)}"
          + ("" if nd is None else f", nDTomo {sum(r[5] < 0.1 for r in rows)}/{len(rows)}"))
    print(f"time: xrdct auto + vo {t_ours:.1f} s" + ("" if nd is None else
                                                    f", nDTomo {t_nd:.1f} s"))


if __name__ == "__main__":
    main()
