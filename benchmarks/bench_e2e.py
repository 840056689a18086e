"""End to end on CPU: ``xrdct process`` (without and with Prefect) against the plain
per-frame pyFAI + per-bin FBP + per-voxel NNLS script (``benchmarks/plain_script.py``) on
the same simulated scans, in one run.

Scans are simulated with ``tasks.simulate.simulate_scan``: a Pilatus 300k detector
(619 x 487 px, 172 um, unbinned, its module-gap mask), 4 phases (NiO, Ni, corundum,
CeO2), a square grid of ``sqrt(frames)`` translations x angles (576 = 24 x 24, 2,304 =
48 x 48, 16,384 = 128 x 128). The pipeline spec (written beside the scans) is the
catalyst spec at the issue's settings: sigma clip (4 sd, 5 iterations), 1,500 q bins,
FBP, per-voxel phase scales of the 4 phases with the simulator's profile. The simulation
is not timed and is reused from ``--work`` when present.

Each of the three runs is a separate process with its own output folder (no run reuses
another's product), run one after the other per size. Wall time is the process's; CPU
time is user + sys of the process tree (``getrusage(RUSAGE_CHILDREN)`` around the run:
children that the run waited for, e.g. the ephemeral Prefect server, are included), so
``cores busy`` = CPU / wall. Prefect runs use a ``PREFECT_HOME`` inside ``--work``
(its database is created by the first Prefect run: run a size twice, or keep ``--work``,
to see the steady state).

Agreement: each phase's scale map of xrdct and of the script is correlated with the
simulator's true scale map (``ground_truth/scale``) and with each other; the script's
``iradon`` image axes are matched to the product's (y, x) by trying the 8 flips/
transpositions against the truth and keeping the best (said in the table).

Run::

    python benchmarks/bench_e2e.py [--frames 576 2304] [--full] [--work DIR] [--skip-prefect]

``--full`` = 576 1024 2304 4096 9216 16384 frames (the issue's range; the large scans need
tens of GB of disk and an hour on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = [("NiO", "NiO.cif"), ("Ni", "Ni.cif"), ("Al2O3", "Al2O3_corundum.cif"), ("CeO2", "CeO2.cif")]
FULL = [576, 1024, 2304, 4096, 9216, 16384]


def write_spec(work: Path) -> Path:
    """The catalyst spec at the issue's settings, with the simulator's profile."""
    import yaml

    from pipelines.spec import PHASES_DIR, load_spec

    spec = {
        "schema_version": 1, "name": "bench_e2e",
        "description": "bench_e2e: sigma clip, 1500 q bins, FBP, 4-phase scale maps",
        "integration": {"unit": "q_nm^-1", "npt": 1500, "method": "sigma_clip",
                        "sigma_clip_threshold": 4.0, "sigma_clip_max_iter": 5},
        "sinogram": {"air_columns": 2, "center": "auto"},
        "reconstruction": {"method": "fbp", "backend": "numpy", "filter": "ramp"},
        "mapping": {"enabled": True, "method": "scales",
                    "phases": [{"name": n, "cif": str(PHASES_DIR / c)} for n, c in PHASES],
                    "profile": {"U": 0.0, "V": 0.0, "W": 0.09, "eta": 0.5},
                    "background_order": 4},
    }
    p = work / "bench_e2e.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    load_spec(str(p))  # fail here, not inside a timed run
    return p


def simulate(work: Path, frames: int):
    from tasks.simulate import SimConfig, simulate_scan

    n = int(round(math.sqrt(frames)))
    if n * n != frames:
        raise SystemExit(f"--frames: {frames} is not a square number of frames (translations = angles)")
    d = work / f"scan_{frames}"
    cfg = SimConfig(n_translations=n, n_angles=n, detector="Pilatus300k", binning=(1, 1),
                    phases=PHASES, seed=0)
    if not (d / "scan.nxs").exists():
        t = time.perf_counter()
        simulate_scan(d, cfg)
        print(f"  simulated {frames} frames in {time.perf_counter() - t:.0f} s "
              f"({(d / 'scan.nxs').stat().st_size / 2**30:.2f} GiB)", flush=True)
    return d / "scan.nxs", d / "scan.poni"


def timed(cmd, env, log: Path):
    """Run ``cmd``; return (wall s, CPU s of the process tree, return code)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return wall, cpu, rc


def _orient(a):
    """The 8 flips/transpositions of a (y, x) image, with names."""
    for t in (False, True):
        b = a.T if t else a
        for fy in (False, True):
            for fx in (False, True):
                c = b[::-1] if fy else b
                c = c[:, ::-1] if fx else c
                yield ("T" if t else "") + ("fy" if fy else "") + ("fx" if fx else "") or "id", c


def _corr(a, b, m):
    m = m & np.isfinite(a) & np.isfinite(b)  # the product leaves voxels outside the sample NaN
    a, b = a[m], b[m]
    return float(np.corrcoef(a, b)[0, 1])


def agreement(product: Path, script_npz: Path, scan: Path) -> str:
    import h5py
    import xarray as xr

    with h5py.File(scan, "r") as h:
        truth = h["entry/ground_truth/scale"][()]  # (phase, y, x)
        names = [s.decode() if isinstance(s, bytes) else str(s) for s in h["entry/ground_truth/phase_names"][()]]
        gx, gy = h["entry/ground_truth/x"][()], h["entry/ground_truth/y"][()]
    ds = xr.open_zarr(product, consolidated=False)
    # the product's grid is padded for the centre correction: take the truth's pixels (mm)
    ours = ds["scale"].isel(z=0).sel(phase=names).sel(y=gy, x=gx, method="nearest").values
    sc = np.load(script_npz)
    theirs = sc["scale"]
    n = truth.shape[1]
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    m = (yy**2 + xx**2) < (0.45 * n) ** 2  # inside the reconstruction circle
    best, bs = None, -np.inf
    for name, _ in _orient(theirs[0]):
        s = np.mean([_corr(dict(_orient(theirs[k]))[name], truth[k], m) for k in range(len(names))])
        if s > bs:
            best, bs = name, s
    theirs = np.stack([dict(_orient(theirs[k]))[best] for k in range(len(names))])
    c_ours = [_corr(ours[k], truth[k], m) for k in range(len(names))]
    c_th = [_corr(theirs[k], truth[k], m) for k in range(len(names))]
    c_x = [_corr(ours[k], theirs[k], m) for k in range(len(names))]
    f = lambda c: "/".join(f"{v:.3f}" for v in c)  # noqa: E731
    return (f"phase scale maps ({'/'.join(names)}) correlated with the truth: xrdct {f(c_ours)}, "
            f"script {f(c_th)}; xrdct with script {f(c_x)} (script image axes: {best})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[576, 2304])
    ap.add_argument("--full", action="store_true", help=f"frames = {FULL}")
    ap.add_argument("--work", default=None, help="folder for scans, products and logs "
                    "(scans are reused from it)")
    ap.add_argument("--skip-prefect", action="store_true", help="no Prefect-mode run")
    ap.add_argument("--skip-script", action="store_true", help="no plain-script run")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each command per size (best kept)")
    args = ap.parse_args(argv)
    sizes = FULL if args.full else args.frames
    work = Path(args.work or tempfile.mkdtemp(prefix="xrdct-e2e-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    spec = write_spec(work)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_HOME=str(work / "prefect_home"))
    print(f"work folder {work}; {os.cpu_count()} cores; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

    rows = []
    for frames in sizes:
        scan, poni = simulate(work, frames)
        res, notes = {}, []
        runs = [("noprefect", True), ("prefect", not args.skip_prefect), ("script", not args.skip_script)]
        for rep in range(args.repeat):
            for name, on in runs:
                if not on:
                    continue
                out = work / f"out_{frames}_{name}_{rep}"
                shutil.rmtree(out, ignore_errors=True)  # a product left there would be returned as is
                if name == "script":
                    out.mkdir(exist_ok=True)
                    cmd = [sys.executable, str(ROOT / "benchmarks" / "plain_script.py"), str(scan), str(poni),
                           str(spec), str(out / "maps.npz")]
                else:
                    cmd = [sys.executable, "-m", "flows.cli", "process", str(scan), "--poni", str(poni),
                           "--pipeline", str(spec), "--out", str(out)]
                    if name == "noprefect":
                        cmd.append("--no-prefect")
                wall, cpu, rc = timed(cmd, env, work / f"log_{frames}_{name}_{rep}.txt")
                print(f"  {frames} frames, {name} run {rep}: {wall:.1f} s wall, {cpu:.1f} s CPU, rc {rc}",
                      flush=True)
                if rc != 0:
                    raise SystemExit(f"{name} failed (rc {rc}); see {work}/log_{frames}_{name}_{rep}.txt")
                if name not in res or wall < res[name][0]:
                    res[name] = (wall, cpu, out)
        if "script" in res:
            prods = sorted(res["noprefect"][2].glob("*.zarr"))
            notes.append(agreement(prods[-1], res["script"][2] / "maps.npz", scan) if prods else "no product")
        rows.append((frames, res, notes))

    def cell(res, k, i=0):
        return f"{res[k][i]:.1f}" if k in res else "-"

    def ratio(res, a, b):
        return f"{res[a][0] / res[b][0]:.2f}" if a in res and b in res else "-"

    def busy(res, k):
        return f"{res[k][1] / res[k][0]:.2f}" if k in res else "-"

    hdr = ("frames", "xrdct no-prefect s", "xrdct prefect s", "script s", "script/no-prefect",
           "script/prefect", "cores busy np/p/script")
    print()
    print(" | ".join(hdr))
    print(" | ".join("---" for _ in hdr))
    for frames, res, notes in rows:
        print(" | ".join([str(frames), cell(res, "noprefect"), cell(res, "prefect"), cell(res, "script"),
                          ratio(res, "script", "noprefect"), ratio(res, "script", "prefect"),
                          f"{busy(res, 'noprefect')}/{busy(res, 'prefect')}/{busy(res, 'script')}"]))
    print()
    for frames, res, notes in rows:
        for n in notes:
            print(f"{frames} frames: {n}")
    print(f"ratios > 1: xrdct faster. load average at the end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
