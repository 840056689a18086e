"""Peak host memory of the pipeline stages for a scan and the same scan 10x longer.

Streaming means the peak resident memory is bounded by batch size x workers, not by the
scan: a scan with ten times the frames must not need ten times the memory. This benchmark
simulates one small XRD-CT slice with the built-in simulator (bitshuffle-LZ4 NeXus, PONI),
then writes two scans from its compressed chunks (copied with ``write_direct_chunk``, so
writing is cheap): ``1x`` = the slice at ``--slices`` z positions and ``10x`` = the same at
ten times as many z positions (ten times the frames, the same per-slice work). Each size
runs in a fresh Python process (the stages are the plain ``flows.process.stage_*``
functions, no Prefect, with the flow's default local Dask cluster), which reports

* ``peak RSS``: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the kernel's high-water mark),
* ``baseline``: RSS after the imports, before the first stage,
* ``stage peak``: peak minus baseline, the memory the stages themselves needed,
* per stage: the largest RSS sampled (every 2 ms, psutil) while that stage ran, so that a
  stage growing with the scan shows even below another stage's higher peak.

Run::

    python benchmarks/bench_memory.py [--stages integrate|flow] [--angles 36] [--translations 16]

Prints one table: frames, peak RSS, stage peak (MB) per size and the 10x/1x ratios
(flat streaming: ratio near 1; a whole-scan load: near 10).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPEC = """\
schema_version: 1
name: bench-memory
integration: {{unit: q_nm^-1, npt: {npt}, radial_range: [10.0, 66.0], method: {method},
              error_model: {error_model}, batch_frames: {batch}}}
reconstruction: {{enabled: {recon}}}
output: {{overview_png: false}}
"""


def make_scans(work: Path, n_angles: int, n_translations: int, slices: int, factor: int):
    """Simulate one slice; write the 1x and ``factor``x scans from its compressed chunks.

    Returns (path_1x, path_kx, poni, frames_1x, frame_shape)."""
    import h5py
    import hdf5plugin

    from tasks.simulate import SimConfig, simulate_scan

    sim = simulate_scan(work / "sim", SimConfig(n_translations=n_translations, n_angles=n_angles,
                                                npt_sim=2000, seed=1))
    with h5py.File(sim.nexus_path, "r") as h:
        d = h["entry/instrument/detector/data"]
        n0, H, W = d.shape
        chunks = [d.id.read_direct_chunk((i, 0, 0)) for i in range(n0)]
        angle = h["entry/sample/rotation_angle"][()]
        trans = h["entry/sample/translation"][()]
        dtype = d.dtype
    paths = []
    for k, nz in (("1x", slices), (f"{factor}x", slices * factor)):
        p = work / f"scan_{k}.nxs"
        n = n0 * nz
        with h5py.File(p, "w") as h:
            e = h.create_group("entry")
            e.attrs["NX_class"] = "NXentry"
            det = e.create_group("instrument/detector")
            det.attrs["NX_class"] = "NXdetector"
            ds = det.create_dataset("data", shape=(n, H, W), dtype=dtype, chunks=(1, H, W),
                                    **hdf5plugin.Bitshuffle(cname="lz4"))
            for i in range(n):
                mask, buf = chunks[i % n0]
                ds.id.write_direct_chunk((i, 0, 0), buf, filter_mask=mask)
            s = e.create_group("sample")
            s.attrs["NX_class"] = "NXsample"
            s["rotation_angle"] = np.tile(angle, nz)
            s["rotation_angle"].attrs["units"] = "deg"
            s["translation"] = np.tile(trans, nz)
            s["translation"].attrs["units"] = "mm"
            s["z"] = np.repeat(np.arange(nz) * 0.1, n0)
            s["z"].attrs["units"] = "mm"
        paths.append((p, n))
    return paths, sim.poni_path, (H, W)


def child(args) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    import resource

    import psutil

    from flows import process

    # the libraries the stages import, loaded before the baseline is taken
    import distributed  # noqa: F401
    import pyFAI  # noqa: F401
    import scipy.sparse  # noqa: F401
    import xarray  # noqa: F401
    import zarr  # noqa: F401

    import tasks.integrate  # noqa: F401
    import tasks.reconstruct  # noqa: F401
    import tasks.sinogram  # noqa: F401

    stages = ["ingest", "integrate"] + (["sinogram", "reconstruct"] if args.stages == "flow" else [])
    req = process.make_request(args.scan, args.spec, args.poni, args.out)
    req.work.parent.mkdir(parents=True, exist_ok=True)
    import threading

    proc = psutil.Process()
    base = proc.memory_info().rss
    per_stage = {}
    state = {"stage": None, "stop": False}

    def sample():  # RSS every 2 ms, the maximum kept per running stage
        while not state["stop"]:
            st = state["stage"]
            if st is not None:
                per_stage[st] = max(per_stage.get(st, 0), proc.memory_info().rss)
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    with process._dask_client(None, None):
        for s in stages:
            state["stage"] = s
            getattr(process, f"stage_{s}")(req)
            state["stage"] = None
    dt = time.perf_counter() - t0
    state["stop"] = True
    th.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak, "base": base, "seconds": dt, "stages": per_stage}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", choices=["integrate", "flow"], default="integrate",
                    help="integrate: ingest + integrate; flow: + sinogram + reconstruct")
    ap.add_argument("--angles", type=int, default=36)
    ap.add_argument("--translations", type=int, default=16)
    ap.add_argument("--slices", type=int, default=1, help="z slices of the 1x scan")
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--npt", type=int, default=1000)
    ap.add_argument("--method", default="mean", choices=["mean", "sigma_clip"])
    ap.add_argument("--batch", type=int, default=64, help="integration.batch_frames")
    ap.add_argument("--work", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scan", help=argparse.SUPPRESS)
    ap.add_argument("--poni", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0

    work = Path(args.work or tempfile.mkdtemp(prefix="xrdct-benchmem-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    scans, poni, shape = make_scans(work, args.angles, args.translations, args.slices, args.factor)
    t_make = time.perf_counter() - t0
    spec = work / "spec.yaml"
    spec.write_text(SPEC.format(npt=args.npt, method=args.method, batch=args.batch,
                                error_model="poisson" if args.method == "mean" else "azimuthal",
                                recon="true" if args.stages == "flow" else "false"))
    rows = []
    for (path, n), label in zip(scans, ("1x", f"{args.factor}x")):
        cmd = [sys.executable, __file__, "--child", "--stages", args.stages, "--scan", str(path),
               "--poni", str(poni), "--spec", str(spec), "--out", str(work / f"out_{label}")]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT),
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        if r.returncode != 0:
            sys.stderr.write(r.stderr)
            raise SystemExit(f"child for {label} failed (rc {r.returncode})")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append((label, n, res))
    mb = 2.0 ** 20
    fb = shape[0] * shape[1] * 4
    print(f"\nxrdct peak host memory, stages: {args.stages} "
          f"({'ingest, integrate' if args.stages == 'integrate' else 'ingest, integrate, sinogram, reconstruct'}); "
          f"frames {shape[0]}x{shape[1]} uint32 bitshuffle-LZ4, {args.npt} bins, method {args.method}, "
          f"batch_frames {args.batch}, {os.cpu_count()} cores; scans written in {t_make:.0f} s")
    names = list(rows[0][2]["stages"])
    print(f"{'scan':>5} {'frames':>8} {'raw frames MB':>14} {'time s':>8} {'baseline MB':>12} "
          f"{'peak RSS MB':>12} {'stage peak MB':>14}  " + " ".join(f"{s + ' MB':>15}" for s in names))
    for label, n, res in rows:
        print(f"{label:>5} {n:>8} {n * fb / mb:>14.0f} {res['seconds']:>8.1f} {res['base'] / mb:>12.0f} "
              f"{res['peak'] / mb:>12.0f} {(res['peak'] - res['base']) / mb:>14.0f}  " +
              " ".join(f"{res['stages'].get(s, 0) / mb:>15.0f}" for s in names))
    a, b = rows[0][2], rows[1][2]
    print(f"ratio {args.factor}x/1x: frames {rows[1][1] / rows[0][1]:.1f}, peak RSS "
          f"{b['peak'] / a['peak']:.2f}, stage peak {(b['peak'] - b['base']) / max(a['peak'] - a['base'], 1):.2f}; "
          "per stage (sampled RSS, 2 ms): " +
          ", ".join(f"{s} {b['stages'].get(s, 0) / max(a['stages'].get(s, 1), 1):.2f}" for s in names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
