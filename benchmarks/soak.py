"""Soak run of the deployed flow: N small distinct scans through a real Prefect server on
localhost, with the memory and open files of the long-lived processes sampled throughout.

What runs (all on 127.0.0.1, all started and stopped here):

* ``prefect server start`` (SQLite database under ``<out>/prefect-home``);
* the deployments of ``infra/prefect.yaml`` created by ``infra/deploy.py`` (work pools
  ``xrdct-cpu`` / ``xrdct-gpu`` created first), as at the facility;
* one long-lived ``prefect worker start --pool xrdct-cpu --type process`` (``--limit``
  concurrent flow runs), which starts each flow run as a subprocess, exactly as the
  compose ``worker-cpu`` service does;
* by default a long-lived Dask cluster (``dask scheduler`` + ``dask worker``, one worker
  process) that every flow run attaches to through ``XRDCT_DASK_ADDRESS``, as the GPU pool
  does (``--dask-workers 0``: each flow run starts its own in-process LocalCluster);
* N scans simulated up front (``SimConfig`` 16 translations x 16 angles, binned Eiger,
  distinct seeds, so distinct products), submitted with :func:`flows.facility.submit`
  (idempotency key = product id) to ``process_scan/process_scan``, at most
  ``--limit + 2`` unfinished at a time, pipeline ``demo``.

Every ``--interval`` seconds the resident set size (``VmRSS``) and the open file
descriptors (``/proc/<pid>/fd``) of each long-lived process (the server and its children,
the worker, the Dask scheduler, nanny and worker) are sampled, with the runs completed /
failed and what lies under the product directory: published stores (``*.zarr``), catalog
rows (``runs``, ``products``), work stores left in ``.work`` and lock files in ``.locks``.

At the end it prints one table: for each process the RSS and fd count at warm-up (the
first sample with ``--warmup`` runs completed), at the end, the maximum, and the growth per
100 runs (slope of a least-squares line over the samples after warm-up), against the bounds
(``--rss-bound-mb`` per 100 runs, and a fitted fd growth over the whole soak of at most
``--fd-bound``). The exit status is 1 when a bound is broken, a run failed, or a work
store was left behind. Samples go to ``<out>/soak.csv`` and a plot to ``<out>/soak.png``.

Run:  python benchmarks/soak.py [--n 200] [--out DIR] [--limit 2] [--dask-workers 1]
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAGE_MB = 1 / 1024  # VmRSS is in kB


# ----------------------------------------------------------------------------- processes
def proc_rss_fds(pid: int) -> tuple[float, int] | None:
    """(RSS in MB, open file descriptors) of ``pid`` from /proc, None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return rss * PAGE_MB, fds


def descendants(pid: int) -> list[int]:
    """``pid`` and its descendants (psutil)."""
    import psutil

    try:
        p = psutil.Process(pid)
        return [pid] + [c.pid for c in p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def stop(proc: subprocess.Popen | None) -> None:
    """Terminate ``proc`` and every descendant it still has (all started here)."""
    if proc is None or proc.poll() is not None:
        return
    import psutil

    kids = []
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    for k in kids:
        try:
            k.terminate()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(kids, timeout=10)
    for k in kids:
        try:
            k.kill()
        except psutil.NoSuchProcess:
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infra"))
from local_stack import prepare_server, wait_for  # noqa: E402


# ----------------------------------------------------------------------------- disk
def disk_counts(out: Path) -> dict:
    """Published stores, catalog rows, leftover work stores and locks under ``out``."""
    counts = {"products": len(list(out.glob("*.zarr"))),
              "work_stores": len(list((out / ".work").glob("*"))) if (out / ".work").is_dir() else 0,
              "locks": len(list((out / ".locks").glob("*.lock"))) if (out / ".locks").is_dir() else 0,
              "catalog_runs": 0, "catalog_products": 0}
    db = out / "catalog.sqlite"
    if db.exists():
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
            try:
                counts["catalog_runs"] = con.execute("select count(*) from runs").fetchone()[0]
                counts["catalog_products"] = con.execute("select count(*) from products").fetchone()[0]
            finally:
                con.close()
        except sqlite3.Error:
            pass
    return counts


# ----------------------------------------------------------------------------- statistics
def slope(xs, ys) -> float:
    """Least-squares slope of ys against xs (0 with fewer than two distinct xs)."""
    import numpy as np

    x, y = np.asarray(xs, float), np.asarray(ys, float)
    if len(x) < 2 or np.ptp(x) == 0:
        return 0.0
    return float(np.polyfit(x, y, 1)[0])


def summarize(rows: list[dict], roles: list[str], warmup: int, rss_bound: float, fd_bound: float):
    """Per process: warm-up, end, max, growth per 100 runs, verdict. Returns (lines, ok)."""
    after = [r for r in rows if r["completed"] >= warmup]
    lines, ok = [], True
    hdr = (f"{'process':<28}{'RSS warm':>9}{'RSS end':>9}{'RSS max':>9}{'MB/100 runs':>12}"
           f"{'fd warm':>8}{'fd end':>7}{'fd max':>7}{'fd fit+':>8}  verdict")
    lines += [hdr, "-" * len(hdr)]
    if len(after) < 2:
        return lines + ["(too few samples after warm-up for a slope)"], False
    span = after[-1]["completed"] - after[0]["completed"]
    for role in roles:
        pts = [(r["completed"], r[f"{role}_rss_mb"], r[f"{role}_fds"]) for r in after
               if r.get(f"{role}_rss_mb") not in ("", None)]
        if len(pts) < 2:
            lines.append(f"{role:<28}  (gone before warm-up ended)")
            ok = False
            continue
        n = [p[0] for p in pts]
        rss = [p[1] for p in pts]
        fds = [p[2] for p in pts]
        g_rss = 100 * slope(n, rss)
        g_fd = slope(n, fds) * span
        bad = []
        if g_rss > rss_bound:
            bad.append(f"RSS +{g_rss:.1f} MB/100 > {rss_bound:g}")
        if g_fd > fd_bound:
            bad.append(f"fds +{g_fd:.1f} > {fd_bound:g}")
        ok &= not bad
        all_rss = [r[f"{role}_rss_mb"] for r in rows if r.get(f"{role}_rss_mb") not in ("", None)]
        all_fd = [r[f"{role}_fds"] for r in rows if r.get(f"{role}_fds") not in ("", None)]
        lines.append(f"{role:<28}{rss[0]:>9.0f}{rss[-1]:>9.0f}{max(all_rss):>9.0f}{g_rss:>12.1f}"
                     f"{fds[0]:>8d}{fds[-1]:>7d}{max(all_fd):>7d}{g_fd:>8.1f}  "
                     + ("ok" if not bad else "BROKEN: " + "; ".join(bad)))
    return lines, ok


def plot(rows: list[dict], roles: list[str], warmup: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for role in roles:
        pts = [(r["completed"], r[f"{role}_rss_mb"], r[f"{role}_fds"]) for r in rows
               if r.get(f"{role}_rss_mb") not in ("", None)]
        if pts:
            x, y, z = zip(*pts)
            a.plot(x, y, ".-", ms=2, lw=0.8, label=role)
            b.plot(x, z, ".-", ms=2, lw=0.8, label=role)
    for ax in (a, b):
        ax.axvline(warmup, color="grey", ls=":", lw=1)
        ax.grid(alpha=0.3)
    a.set_ylabel("RSS (MB)")
    b.set_ylabel("open file descriptors")
    b.set_xlabel("flow runs completed")
    a.legend(fontsize=7, ncol=2)
    a.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="scans (flow runs)")
    ap.add_argument("--out", default=None, help="working directory (default: a new temp dir)")
    ap.add_argument("--limit", type=int, default=2, help="concurrent flow runs of the worker")
    ap.add_argument("--dask-workers", type=int, default=1,
                    help="worker processes of the long-lived Dask cluster (0: none, each run "
                         "starts its own in-process cluster)")
    ap.add_argument("--translations", type=int, default=16)
    ap.add_argument("--angles", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=10, help="runs before the reference sample")
    ap.add_argument("--interval", type=float, default=3.0, help="seconds between samples")
    ap.add_argument("--rss-bound-mb", type=float, default=50.0, help="RSS growth bound per 100 runs")
    ap.add_argument("--fd-bound", type=float, default=10.0, help="fd growth bound over the soak")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop submitting after this long, let the runs in flight finish, "
                         "and report on the runs done")
    ap.add_argument("--stall-s", type=float, default=900.0,
                    help="give up when no run finished for this long")
    args = ap.parse_args(argv)
    if args.n <= args.warmup + 1:
        ap.error(f"--n must exceed --warmup + 1 ({args.warmup + 1}), got {args.n}")
    requested = args.n

    import tempfile

    base = Path(args.out or tempfile.mkdtemp(prefix="xrdct-soak-")).resolve()
    base.mkdir(parents=True, exist_ok=True)
    raw, out, logs = base / "raw", base / "products", base / "logs"
    for d in (raw, out, logs):
        d.mkdir(exist_ok=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(base / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "XRDCT_PROJECT_DIR": str(ROOT),
           # the facility's confinement: flow parameters must name paths under base
           "XRDCT_DATA_ROOTS": str(base)}
    env.pop("PREFECT_PROFILE", None)
    os.environ.update({k: env[k] for k in ("PREFECT_HOME", "PREFECT_API_URL",
                                           "PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_LOGGING_LEVEL")})
    os.environ.pop("PREFECT_PROFILE", None)

    import httpx

    procs: dict[str, subprocess.Popen] = {}
    csv_file = None

    def start(name, cmd, extra_env=None):
        procs[name] = subprocess.Popen(cmd, env={**env, **(extra_env or {})}, cwd=ROOT,
                                       stdout=open(logs / f"{name}.log", "w"),
                                       stderr=subprocess.STDOUT)
        return procs[name]

    t_start = time.time()
    try:
        start("server", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                         "--port", str(port), "--no-ui"])

        # scans: the first few now (while the server starts), the rest just before each is
        # submitted; all use the first scan's PONI, as the scans of one beamtime share one
        # calibration (the long-lived Dask worker then builds its integrator once)
        from tasks.simulate import SimConfig, simulate_scan

        print(f"soak: {base}; {args.n} scans of {args.translations} translations x "
              f"{args.angles} angles, simulated as they are submitted", flush=True)
        t_sim = 0.0

        def scan_files(i):
            nonlocal t_sim
            t0 = time.time()
            d = raw / f"scan{i:04d}"
            nx, poni = d / "scan.nxs", d / "scan.poni"
            if not (nx.exists() and poni.exists()):  # a rerun in the same --out reuses them
                cfg = SimConfig(n_translations=args.translations, n_angles=args.angles,
                                seed=1000 + i, sample_name=f"soak {i}")
                s = simulate_scan(d, cfg)
                nx, poni = s.nexus_path, s.poni_path
            t_sim += time.time() - t0
            return str(nx), str(poni)

        shared_poni = scan_files(0)[1]
        for i in range(1, min(args.n, args.limit + 2)):
            scan_files(i)

        prepare_server(api, env, names=["process_scan"])
        dep = httpx.get(f"{api}/deployments/name/process_scan/process_scan", timeout=10).json()

        worker_env = {}
        if args.dask_workers > 0:
            dport = free_port()
            addr = f"tcp://127.0.0.1:{dport}"
            start("dask-scheduler", [sys.executable, "-m", "distributed.cli.dask_scheduler",
                                     "--host", "127.0.0.1", "--port", str(dport), "--no-dashboard"])
            start("dask-worker", [sys.executable, "-m", "distributed.cli.dask_worker", addr,
                                  "--nworkers", str(args.dask_workers), "--nthreads",
                                  str(max(1, (os.cpu_count() or 2) // args.dask_workers)),
                                  "--no-dashboard", "--memory-limit", "0"])
            from distributed import Client

            def dask_ready():
                try:
                    with Client(addr, timeout=5) as c:
                        return len(c.scheduler_info()["workers"]) >= args.dask_workers
                except Exception:  # noqa: BLE001 - not up yet
                    return False

            wait_for(dask_ready, 180, "dask cluster")
            worker_env["XRDCT_DASK_ADDRESS"] = addr
        start("worker", [sys.executable, "-m", "prefect", "worker", "start", "--pool", "xrdct-cpu",
                         "--type", "process", "--limit", str(args.limit)], worker_env)

        def worker_online():
            r = httpx.post(f"{api}/work_pools/xrdct-cpu/workers/filter", timeout=5,
                           json={"offset": 0, "limit": 10})
            return r.status_code == 200 and any(w.get("status") == "ONLINE" for w in r.json())

        wait_for(worker_online, 180, "prefect worker")

        # the long-lived processes, named by role (children of the server and the Dask
        # worker CLI are the uvicorn / nanny / worker processes; flow runs are not yet there)
        tracked: dict[str, int] = {}
        for name in ("server", "dask-scheduler", "dask-worker", "worker"):
            if name not in procs:
                continue
            for k, pid in enumerate(descendants(procs[name].pid)):
                if "multiprocessing.resource_tracker" in cmdline(pid):
                    role = f"{name}:resource_tracker"
                elif k == 0:
                    role = name
                elif name == "dask-worker":
                    role = "dask-worker:nanny" if k == 1 else f"dask-worker:proc{k - 1}"
                else:
                    role = f"{name}:child{k}"
                tracked[role] = pid
        roles = list(tracked)
        print("soak: tracking " + ", ".join(f"{r} ({p})" for r, p in tracked.items()), flush=True)

        from prefect.settings import PREFECT_API_URL, temporary_settings

        from flows.facility import submit
        from flows.process import make_request

        def count(types):
            r = httpx.post(f"{api}/flow_runs/count", timeout=10, json={
                "deployments": {"id": {"any_": [dep["id"]]}},
                "flow_runs": {"state": {"type": {"any_": types}}}})
            r.raise_for_status()
            return int(r.json())

        rows: list[dict] = []
        submitted = completed = failed = 0
        fields = (["t_s", "submitted", "completed", "failed", *disk_counts(out)]
                  + [f"{r}_{m}" for r in roles for m in ("rss_mb", "fds")])
        csv_file = open(base / "soak.csv", "w", newline="")  # written as the samples come
        writer = csv.DictWriter(csv_file, fieldnames=fields)
        writer.writeheader()

        def sample() -> dict:
            row = {"t_s": round(time.time() - t_runs, 1), "submitted": submitted,
                   "completed": completed, "failed": failed, **disk_counts(out)}
            for role, pid in tracked.items():
                m = proc_rss_fds(pid)
                row[f"{role}_rss_mb"] = round(m[0], 1) if m else ""
                row[f"{role}_fds"] = m[1] if m else ""
            rows.append(row)
            writer.writerow(row)
            csv_file.flush()
            return row
        last_progress = time.time()
        t_runs = time.time()
        next_sample = 0.0
        while True:
            done = count(["COMPLETED"]), count(["FAILED", "CRASHED", "CANCELLED"])
            if sum(done) > completed + failed:
                last_progress = time.time()
            completed, failed = done
            if args.max_minutes is not None and time.time() - t_runs > 60 * args.max_minutes \
                    and submitted < args.n:
                print(f"soak: --max-minutes {args.max_minutes:g} reached after {submitted} "
                      f"submissions; finishing those", flush=True)
                args.n = submitted
            while submitted < args.n and submitted - completed - failed < args.limit + 2:
                scan, _ = scan_files(submitted)
                poni = shared_poni
                req = make_request(scan, "demo", poni, str(out))
                with temporary_settings({PREFECT_API_URL: api}):
                    submit("process_scan/process_scan", scan, "demo", str(out), poni, req.product_id)
                submitted += 1
            if time.time() >= next_sample:
                next_sample = time.time() + args.interval
                row = sample()
                if len(rows) % 20 == 1:
                    print(f"soak: t={row['t_s']:.0f}s submitted {submitted} completed {completed} "
                          f"failed {failed} | " + " ".join(
                              f"{r}={row[f'{r}_rss_mb']}MB/{row[f'{r}_fds']}fd" for r in roles),
                          flush=True)
            if completed + failed >= args.n:
                break
            if time.time() - last_progress > args.stall_s:
                print(f"soak: no run finished for {args.stall_s:.0f} s; stopping", flush=True)
                break
            for name, p in procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}; see {logs / name}.log")
            time.sleep(1.0)
        wall = time.time() - t_runs
        time.sleep(args.interval)  # one last sample, everything settled
        sample()
    finally:
        for name in ("worker", "dask-worker", "dask-scheduler", "server"):
            stop(procs.get(name))
        if csv_file is not None:
            csv_file.close()
    lines, ok = summarize(rows, roles, args.warmup, args.rss_bound_mb, args.fd_bound)
    end = rows[-1]
    cut = f" (stopped by --max-minutes after {args.n} submissions)" if args.n < requested else ""
    title = (f"xrdct soak: {completed}/{requested} runs completed{cut}, {failed} failed, "
             f"{args.translations}x{args.angles} scans, worker limit {args.limit}, "
             f"dask workers {args.dask_workers}")
    plot(rows, roles, args.warmup, base / "soak.png", title)
    print(f"\n{title}")
    print(f"wall {wall:.0f} s for the runs ({wall / max(1, completed + failed):.1f} s per run), "
          f"simulation {t_sim:.0f} s, total {time.time() - t_start:.0f} s; {os.cpu_count()} cores; "
          f"{len(rows)} samples every {args.interval:g} s")
    print(f"bounds: RSS growth <= {args.rss_bound_mb:g} MB per 100 runs after warm-up "
          f"({args.warmup} runs); fitted fd growth over the soak <= {args.fd_bound:g}\n")
    print("\n".join(lines))
    print(f"\nproduct dir: {end['products']} stores, catalog {end['catalog_runs']} runs / "
          f"{end['catalog_products']} products, {end['work_stores']} entries left in .work, "
          f"{end['locks']} lock files in .locks")
    problems = []
    if failed:
        problems.append(f"{failed} run(s) failed")
    if completed < args.n:
        problems.append(f"only {completed} of {args.n} runs completed")
    if end["work_stores"]:
        problems.append(f"{end['work_stores']} work store(s) left in .work")
    if end["products"] != completed or end["catalog_products"] != completed:
        problems.append(f"{end['products']} stores / {end['catalog_products']} catalog products "
                        f"for {completed} completed runs")
    if not ok:
        problems.append("a growth bound is broken")
    print(f"samples: {base / 'soak.csv'}; plot: {base / 'soak.png'}")
    print("RESULT: " + ("ok" if not problems else "FAIL: " + "; ".join(problems)))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
