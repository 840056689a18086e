"""Stage-by-stage time and peak memory of the demo scan, with the peers measured in the
same run: pyFAI ``integrate1d_ng`` frame by frame (the hand-made pyFAI-script way) and
astra-toolbox FBP looped over radial bins (the nDTomo/Savu way).

Run:  python benchmarks/bench_demo.py [--preset demo|small] [--out DIR]

Prints one table. Times are wall seconds on this machine; the ratio column is what the
numbers are measured by (peer / ours, > 1 means we are faster).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class PeakRSS:
    """Samples the resident memory of this process and its children every 10 ms."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self):
        total = self.proc.memory_info().rss
        for c in self.proc.children(recursive=True):
            try:
                total += c.memory_info().rss
            except Exception:  # noqa: BLE001 - child exited meanwhile
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.01)

    def __enter__(self):
        self.peak = self._rss()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self.t.join()
        return False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from flows import process
    from tasks.simulate import preset, simulate_scan

    out = Path(args.out or tempfile.mkdtemp(prefix="xrdct-bench-"))
    rows = []

    with PeakRSS() as m:
        sim = simulate_scan(out / "scan", preset(args.preset))
    rows.append(("simulate (not a stage)", m.seconds, m.peak, None, None))

    timed = {}

    def wrap(name, fn):
        def inner(*a, **k):
            with PeakRSS() as mm:
                r = fn(*a, **k)
            timed[name] = (mm.seconds, mm.peak)
            return r
        return inner

    stages = {k: wrap(k, getattr(process, f"stage_{k}")) for k in
              ("ingest", "integrate", "sinogram", "reconstruct", "mapping", "publish")}
    with PeakRSS() as total:
        product = process.run_pipeline(sim.nexus_path, poni=sim.poni_path, pipeline="demo",
                                       out=out / "products", stages=stages)

    # --- peers, same data, same settings
    from pipelines.spec import load_spec
    from tasks.ingest import open_scan
    from tasks.integrate import integrator_from_spec
    from tasks.store import open_product

    spec = load_spec("demo")
    scan = open_scan(sim.nexus_path, spec.input)
    i = spec.integration
    frames = np.asarray(scan.frames)
    n = frames.shape[0]
    # the stage's own method (sigma clip) against pyFAI sigma_clip_ng frame by frame
    clip = integrator_from_spec(spec, shape=frames.shape[1:], poni=sim.poni_path)
    with PeakRSS() as mp_clip:
        for f in frames:
            clip.reference_sigma_clip(f, thres=i.sigma_clip_threshold, max_iter=i.sigma_clip_max_iter)
    with PeakRSS() as mo_clip:
        clip.integrate_sigma_clip(frames, thres=i.sigma_clip_threshold, max_iter=i.sigma_clip_max_iter)
    # plain mean integration against pyFAI integrate1d_ng (csr, cython) frame by frame
    mean = integrator_from_spec(spec.model_copy(update={"integration": i.model_copy(update={"method": "mean"})}),
                                shape=frames.shape[1:], poni=sim.poni_path)
    with PeakRSS() as mp:
        for f in frames:
            mean.reference(f)
    with PeakRSS() as mo:
        mean.integrate(frames)
    peer_int, ours_int_kernel = mp.seconds, mo.seconds

    import astra  # noqa: F401

    from tasks.reconstruct import fbp

    ds = open_product(product)
    sino = np.asarray(ds["sinogram"].isel(z=0).values, np.float32)
    angles = ds["angle"].values
    with PeakRSS() as ma:
        fbp(sino, angles, filter=spec.reconstruction.filter, backend="astra")
    with PeakRSS() as mf:
        fbp(sino, angles, filter=spec.reconstruction.filter, backend="numpy")

    mb = 1 / 2**20
    print(f"\nxrdct demo benchmark: {n} frames {frames.shape[1]}x{frames.shape[2]} {frames.dtype}, "
          f"{i.npt} bins, sinogram {sino.shape}; {os.cpu_count()} cores\n")
    hdr = f"{'stage':<34}{'time (s)':>10}{'peak RSS (MB)':>15}{'peer (s)':>10}{'peer/ours':>11}"
    print(hdr)
    print("-" * len(hdr))
    for name in ("ingest", "integrate", "sinogram", "reconstruct", "mapping", "publish"):
        if name in timed:
            s, p = timed[name]
            peer = {"integrate": mp_clip.seconds, "reconstruct": ma.seconds}.get(name)
            ratio = f"{peer / s:>11.2f}" if peer else f"{'':>11}"
            print(f"{name:<34}{s:>10.3f}{p * mb:>15.0f}{(f'{peer:.3f}' if peer else ''):>10}{ratio}")
    print(f"{'whole flow (no Prefect)':<34}{total.seconds:>10.3f}{total.peak * mb:>15.0f}")
    print(f"{'sigma clip kernel, in memory':<34}{mo_clip.seconds:>10.3f}{mo_clip.peak * mb:>15.0f}"
          f"{mp_clip.seconds:>10.3f}{mp_clip.seconds / mo_clip.seconds:>11.2f}   peer: pyFAI sigma_clip_ng per frame")
    print(f"{'mean integration kernel, in memory':<34}{ours_int_kernel:>10.3f}{mo.peak * mb:>15.0f}"
          f"{peer_int:>10.3f}{peer_int / ours_int_kernel:>11.2f}   peer: pyFAI integrate1d_ng per frame")
    print(f"{'FBP, all bins (numpy batched)':<34}{mf.seconds:>10.3f}{mf.peak * mb:>15.0f}"
          f"{ma.seconds:>10.3f}{ma.seconds / mf.seconds:>11.2f}   peer: astra CPU FBP per bin")
    acq = n / 1000.0
    print(f"{'acquisition at 1 kHz':<34}{acq:>10.3f}{'':>15}{'':>10}{acq / total.seconds:>11.2f}"
          f"   (>1: the flow is faster than the detector)")
    print("\nstage rows: peer of 'integrate' = pyFAI sigma_clip_ng per frame (the stage's method), "
          "of 'reconstruct' = astra CPU FBP per bin; peak RSS includes the Dask worker processes.")


if __name__ == "__main__":
    main()
