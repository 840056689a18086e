"""The ``xrdct`` command line: ``process``, ``simulate``, ``demo``, ``catalog``, ``profile``
(instrument profile from a calibrant), ``train`` and ``learn``.

Every command runs the Prefect flow ``process_scan`` (ephemeral Prefect API when no server
is configured) on a local Dask cluster, shows progress bars for long stages and ends with a
summary table (product path, stage timings, fit quality).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path


def _console():
    from rich.console import Console

    return Console(stderr=False)


class _Bars:
    """Rich progress bars fed by :mod:`flows.progress` reports."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.p = Progress(TextColumn("{task.description:>12}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console, transient=False)
        self.ids = {}

    def __call__(self, stage, done, total):
        if stage not in self.ids:
            self.ids[stage] = self.p.add_task(stage, total=total)
        self.p.update(self.ids[stage], completed=done, total=total)

    def __enter__(self):
        from flows import progress

        self.p.start()
        progress.add_listener(self)
        return self

    def __exit__(self, *exc):
        from flows import progress

        progress.remove_listener(self)
        self.p.stop()
        return False


def _summary(console, product: str, wall: float) -> None:
    from rich.table import Table

    from flows.process import summary_rows

    t = Table(title="xrdct product", show_header=False)
    t.add_column("what", no_wrap=True)
    t.add_column("value", overflow="fold")
    for k, v in summary_rows(product):
        t.add_row(k, v)
    t.add_row("time: total (wall)", f"{wall:.2f} s")
    png = Path(product).with_suffix(".png")
    if png.exists():
        t.add_row("overview", str(png))
    console.print(t)


def _run_flow(scan, poni, pipeline, out, dask_address, workers, use_prefect=True,
              backend=None, cluster=None) -> str:
    from flows.process import get_flow, run_pipeline

    if use_prefect:
        from flows.warm import import_science_stack, prefect_api_started_meanwhile

        with prefect_api_started_meanwhile():  # the ephemeral API boots while we import
            import_science_stack()
        flow = get_flow()
        return flow(scan=str(scan), poni=str(poni) if poni else None, pipeline=str(pipeline),
                    out=str(out), dask_address=dask_address, n_workers=workers, backend=backend,
                    cluster=cluster)
    return run_pipeline(scan, poni=poni, pipeline=pipeline, out=out, dask_address=dask_address,
                        n_workers=workers, backend=backend, cluster=cluster)


def cmd_process(args) -> int:
    console = _console()
    t0 = time.perf_counter()
    with _Bars(console):
        product = _run_flow(args.scan, args.poni, args.pipeline, args.out, args.dask_address,
                            args.workers, not args.no_prefect, args.backend, args.cluster)
    _summary(console, product, time.perf_counter() - t0)
    return 0


def _sim_config(args):
    from tasks.simulate import preset

    cfg = preset(args.preset)
    over = {k: v for k, v in (("n_translations", args.translations), ("n_angles", args.angles),
                              ("seed", args.seed)) if v is not None}
    return cfg.model_copy(update=over) if over else cfg


def cmd_simulate(args) -> int:
    from tasks.simulate import simulate_scan

    console = _console()
    with _Bars(console):
        from flows.progress import callback

        sim = simulate_scan(args.out, _sim_config(args), progress=callback("simulate"))
    console.print(f"scan: {sim.nexus_path}\nponi: {sim.poni_path}")
    return 0


def cmd_demo(args) -> int:
    """Simulate the built-in demo scan, process it, write the overview PNG."""
    from tasks.simulate import simulate_scan

    console = _console()
    out = Path(args.out)
    t0 = time.perf_counter()
    console.print(f"[bold]xrdct demo[/bold]: simulating a {args.preset} XRD-CT slice into {out}/scan")
    with _Bars(console):
        from flows.progress import callback

        sim = simulate_scan(out / "scan", _sim_config(args), progress=callback("simulate"))
        product = _run_flow(sim.nexus_path, sim.poni_path, args.pipeline or "demo", out / "products",
                            args.dask_address, args.workers, not args.no_prefect, args.backend,
                            args.cluster)
    _summary(console, product, time.perf_counter() - t0)
    return 0


def _open_catalog(args, readonly: bool = False):
    """The catalog of ``--url`` / ``--out``; ``readonly``: for listing (a catalog in a folder
    this process cannot write is opened read-only)."""
    from catalog.db import Catalog

    return Catalog(Catalog.resolve_url(args.url, args.out), readonly=readonly)


def _wide_console():
    """Console for tables of ids and checksums: piped output is not folded at 80 columns,
    so ids and checksums stay greppable."""
    console = _console()
    if not console.is_terminal:
        console.width = max(console.width, 200)
    return console


def _fmt_time(t) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S") if t is not None else ""


def _experiment(scan) -> tuple[str, str]:
    e = scan.experiment if scan is not None else None
    return (e.proposal, e.sample) if e is not None else ("", "")


def cmd_catalog_list(args) -> int:
    """Table of the catalog's products: id, scan path, pipeline name, created."""
    from rich.table import Table

    cat = _open_catalog(args, readonly=True)
    rows = [p for p in cat.products()
            if (not args.proposal or _experiment(p.scan)[0] == args.proposal)
            and (not args.sample or _experiment(p.scan)[1] == args.sample)]
    t = Table(title=f"xrdct catalog: {len(rows)} product(s)")
    t.add_column("id", no_wrap=True)
    for col in ("proposal", "sample", "acquired", "scan", "pipeline", "created"):
        t.add_column(col, overflow="fold")
    for p in rows:
        prop, sample = _experiment(p.scan)
        t.add_row(p.id, prop, sample, _fmt_time(p.scan.acquired) if p.scan else "",
                  p.scan.path if p.scan else "",
                  p.pipeline_version.name if p.pipeline_version else "", _fmt_time(p.created))
    _wide_console().print(t)
    cat.dispose()
    return 0


def cmd_catalog_profiles(args) -> int:
    """Table of the instrument profiles stored with calibrations (``xrdct profile``)."""
    from rich.table import Table

    from tasks.ingest import file_checksum

    cat = _open_catalog(args, readonly=True)
    try:
        rows = cat.instrument_profiles(file_checksum(args.poni) if args.poni else None)
    finally:
        cat.dispose()
    newest = {}
    for r in rows:
        newest[r.poni_checksum] = r.id
    t = Table(title=f"xrdct catalog: {len(rows)} instrument profile(s) (* = newest for its PONI, "
                    "the one mapping.profile: calibration uses)")
    t.add_column("key", no_wrap=True)
    for col in ("PONI", "calibrant", "source", "U", "V", "W", "eta", "zero (deg)", "Rwp", "created"):
        t.add_column(col, overflow="fold")
    for r in rows:
        p = r.profile
        t.add_row(r.key + (" *" if newest[r.poni_checksum] == r.id else ""), r.poni_path,
                  r.calibrant, r.source_path, *(f"{p[k]:.4g}" for k in ("U", "V", "W", "eta", "zero_shift_deg")),
                  f"{r.rwp:.4f}", _fmt_time(r.created))
    _wide_console().print(t)
    return 0


def cmd_catalog_show(args) -> int:
    """One product with its scan, calibration, pipeline version and runs."""
    import json

    from rich.table import Table

    cat = _open_catalog(args, readonly=True)
    p = cat.product(args.product_id)
    if p is None:
        cat.dispose()
        raise ValueError(f"product {args.product_id!r} is not in the catalog {cat.url}")
    cal = cat.calibration(p.calibration_id)
    t = Table(title=f"product {p.id}", show_header=False)
    t.add_column("what", no_wrap=True)
    t.add_column("value", overflow="fold")
    t.add_row("product", p.id)
    t.add_row("location", p.location)
    t.add_row("created", _fmt_time(p.created))
    t.add_row("scan", f"#{p.scan.id} {p.scan.path}")
    prop, sample = _experiment(p.scan)
    t.add_row("proposal / sample", f"{prop or '-'} / {sample or '-'}")
    t.add_row("acquired", _fmt_time(p.scan.acquired) or "-")
    t.add_row("scan checksum", p.scan.checksum)
    t.add_row("scan kind", p.scan.kind)
    t.add_row("scan geometry", json.dumps(p.scan.geometry, sort_keys=True))
    if cal is not None:
        t.add_row("calibration", f"#{cal.id} {cal.poni_path or '(no PONI)'}")
        for role, sha in sorted(cal.checksums.items()):
            t.add_row(f"  {role}", sha)
    pv = p.pipeline_version
    t.add_row("pipeline", f"#{pv.id} {pv.name}, code {pv.code_version}")
    for role, sha in sorted(p.inputs.items()):
        t.add_row(f"input {role}", sha)
    for r in cat.runs(p.id):
        wall = f"{r.wall_time_s:.2f} s" if r.wall_time_s is not None else "-"
        t.add_row(f"run #{r.id}", f"{r.status}, {wall}, finished {_fmt_time(r.finished)}, "
                                  f"flow run {r.flow_run_id or '-'}")
    _wide_console().print(t)
    cat.dispose()
    return 0


def _product_stores(paths, recursive: bool) -> tuple[list[Path], list[str]]:
    """Split ``paths`` into published product stores (``<id>.zarr`` folders with a
    ``zarr.json``, given or found in a given folder) and the rest (scans, folders of scans)."""
    stores, rest = [], []
    for a in paths:
        p = Path(a)
        if p.suffix == ".zarr" and (p / "zarr.json").is_file():
            stores.append(p)
            continue
        rest.append(a)
        if p.is_dir():
            found = p.rglob("*.zarr") if recursive else p.glob("*.zarr")
            stores += sorted(z for z in found if (z / "zarr.json").is_file()
                             and not any(part.startswith(".") for part in z.relative_to(p).parts))
    return stores, rest


def cmd_catalog_add(args) -> int:
    """Register scan files, or every scan of a directory, and published product stores
    (``<id>.zarr``, given or found in a directory: a product published without its catalog
    row gets it from its own attrs); report what was skipped and why."""
    from catalog.scans import AddReport, add_scans
    from flows.process import register_product_store

    console = _wide_console()
    cat = _open_catalog(args)
    stores, rest = _product_stores(args.paths, args.recursive)
    n_new = 0
    for z in stores:
        try:
            new = register_product_store(z, catalog=cat, if_absent=True)
        except ValueError as err:
            console.print(f"skipped {z}: {err}", highlight=False)
            continue
        n_new += bool(new)
        console.print(f"{'added  ' if new else 'known  '} product {z.resolve()}", highlight=False)
    rep = (add_scans(cat, rest, recursive=args.recursive, proposal=args.proposal,
                     sample=args.sample) if rest else AddReport())
    for sid, path in rep.added:
        console.print(f"added   scan #{sid} {path}", highlight=False)
    for sid, path in rep.known:
        console.print(f"known   scan #{sid} {path}", highlight=False)
    for path, why in rep.skipped:
        console.print(f"skipped {path}: {why}", highlight=False)
    products = f"{n_new} of {len(stores)} product(s) added; " if stores else ""
    console.print(f"{products}{len(rep.added)} added, {len(rep.known)} already registered, "
                  f"{len(rep.skipped)} skipped (catalog {cat.url})", highlight=False)
    cat.dispose()
    return 0


# ----------------------------------------------------------------------------- clean stops

#: Seconds a run stopped by SIGTERM / SIGINT has to unwind (close its Dask cluster, let
#: Prefect record the crash) before its child processes are killed and it exits anyway.
STOP_GRACE_ENV = "XRDCT_STOP_GRACE_S"


class Stopped(BaseException):
    """SIGTERM or SIGINT asked the run to stop (raised in the main thread by the handler)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_stop = {"signum": None, "out": None, "said": False}
_exiting = __import__("threading").Lock()


def _stop_message(signum: int) -> str:
    import signal

    work = f" in {Path(_stop['out']) / '.work'}" if _stop["out"] else ""
    return (f"stopped: {signal.Signals(signum).name} received; the run's processes were stopped; "
            f"finished stages are kept{work} and the same command resumes them (no stage starts "
            f"and nothing is published after the signal)")


def _end_children(timeout: float = 3.0) -> None:
    """Terminate every process this one started (Prefect's API server, Dask workers and
    nannies), then kill what is left after ``timeout`` seconds."""
    import psutil

    try:
        kids = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for k in kids:
        with contextlib.suppress(psutil.Error):
            k.terminate()
    _, alive = psutil.wait_procs(kids, timeout=timeout)
    for k in alive:
        with contextlib.suppress(psutil.Error):
            k.kill()
    psutil.wait_procs(alive, timeout=timeout)


def _exit_stopped(signum: int) -> None:
    """Stop the children, drop the product locks this process holds, say one line and
    exit with 128 + the signal number (130 for SIGINT, 143 for SIGTERM), skipping exit
    handlers that would talk to a Prefect API that is gone."""
    from flows.process import HELD_LOCKS

    if not _exiting.acquire(blocking=False):  # the grace timer and the main thread at once
        while True:
            time.sleep(1)  # the other one exits the process
    _end_children()
    for lock in list(HELD_LOCKS):
        with contextlib.suppress(OSError):
            os.unlink(lock)  # still held by this process until it exits
    if not _stop["said"]:
        _stop["said"] = True
        sys.stdout.write(_stop_message(signum) + "\n")
    sys.stdout.flush()
    os._exit(128 + signum)


def _begin_stop(signum: int) -> None:
    """First signal: silence logging and stderr (Prefect's crash report, Dask's closing
    chatter, tracebacks of threads cut short) and give the run ``XRDCT_STOP_GRACE_S``
    seconds (5) to unwind before :func:`_exit_stopped` ends it anyway."""
    import logging
    import threading

    if _stop["signum"] is not None:
        return
    _stop["signum"] = signum
    from flows.process import STOP_REQUESTED

    STOP_REQUESTED.set()  # no stage starts, nothing is published from now on
    logging.disable(logging.CRITICAL)
    with contextlib.suppress(OSError):
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    grace = float(os.environ.get(STOP_GRACE_ENV, "5"))
    t = threading.Timer(grace, _exit_stopped, args=(signum,))
    t.daemon = True
    t.start()


def _on_signal(signum, _frame):
    if _stop["signum"] is not None:  # a second signal: stop now
        _exit_stopped(_stop["signum"])
    _begin_stop(signum)
    raise Stopped(signum)


def _install_stop_handlers(out, prefect: bool = True) -> None:
    """SIGTERM and SIGINT end a run within seconds: the handler raises :class:`Stopped` in
    the main thread (the Dask cluster closes, the product lock is released, the work store
    is kept for a resume), and :func:`_exit_stopped` ends every child process and exits
    130 / 143 with one line. Prefect replaces the SIGTERM handler while a flow runs (to
    record the crash, then it calls ours); its bridge is wrapped so the grace timer starts
    at once even then."""
    import signal

    _stop["out"] = out
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if not prefect:  # --no-prefect: Prefect is never imported (its import costs seconds)
        return
    try:
        import prefect.utilities.engine as engine

        bridge = engine._prefect_sigterm_handler
        if not getattr(bridge, "_xrdct", False):
            def wrapped(sig, *a):
                _begin_stop(sig)
                return bridge(sig, *a)

            wrapped._xrdct = True
            engine._prefect_sigterm_handler = wrapped
    except (ImportError, AttributeError):  # another Prefect: its bridge calls ours after
        pass


# ----------------------------------------------------------------------------- arguments

from flows.argtypes import nonempty as _nonempty  # noqa: E402
from flows.argtypes import positive_int as _positive_int  # noqa: E402
from flows.argtypes import seed as _seed  # noqa: E402


_ADDRESS = r"^(?:(?:tcp|tls|ucx|ws|wss|inproc)://)?\[?[A-Za-z0-9_.:-]*[A-Za-z0-9]\]?:(\d{1,5})$"


def _scheduler_address(text: str) -> str:
    """argparse type: a Dask scheduler address ``[tcp://]host:port``."""
    import re

    m = re.match(_ADDRESS, text.strip())
    if not m or not 1 <= int(m.group(1)) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a Dask scheduler address such as "
                                         f"tcp://host:8786, got {text!r}")
    return text.strip()


def _cluster(text: str) -> str:
    """argparse type: ``local``, ``cuda`` or a scheduler address."""
    if text.strip() in ("local", "cuda"):
        return text.strip()
    try:
        return _scheduler_address(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'local', 'cuda' or a Dask scheduler address "
                                         f"such as tcp://host:8786, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2): the message names the option and what it
    expects; the usage block is left to ``-h``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def _quiet() -> None:
    """Keep the terminal for progress and results: Dask's INFO chatter and zarr's notes on
    its own string dtype go to the logs, not the screen."""
    import logging
    import warnings

    for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.core",
                 "distributed.worker", "distributed.http.proxy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # a task that fails on a worker is logged there ("Compute Failed", with its traceback)
    # and raised again by the client, where the CLI reports it in one line: drop the copy
    logging.getLogger("distributed.worker").addFilter(
        lambda r: not str(r.msg).startswith("Compute Failed"))
    warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="xrdct", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--dask-address", default=None, type=_scheduler_address,
                       help="attach to this Dask scheduler (tcp://host:port) instead of "
                       "starting a LocalCluster; unreachable within XRDCT_DASK_CONNECT_TIMEOUT_S "
                       "(10 s) is an error")
        p.add_argument("--workers", type=_positive_int, default=None, help="LocalCluster worker "
                       "processes, >= 1 (default: one threaded worker using every core)")
        p.add_argument("--no-prefect", action="store_true", help="run the stages without Prefect")
        p.add_argument("--backend", choices=["cpu", "gpu", "auto"], default=None,
                       help="array backend of the kernels, overriding the spec's 'backend' "
                       "(auto: the GPU when cupy sees one; gpu without a device is an error)")
        p.add_argument("--cluster", default=None, type=_cluster, help="Dask cluster: local (default), cuda "
                       "(dask_cuda.LocalCUDACluster, one worker per GPU) or a scheduler address")

    p = sub.add_parser("process", help="process one scan into a product")
    p.add_argument("scan", type=_nonempty, help="NeXus/HDF5 frames, scan table CSV, or HDF5 sinogram cube")
    p.add_argument("--poni", default=None, type=_nonempty, help="pyFAI PONI calibration")
    p.add_argument("--pipeline", default="default", type=_nonempty, help="spec name or YAML path")
    p.add_argument("--out", default="xrdct-out", type=_nonempty, help="product directory")
    common(p)
    p.set_defaults(fn=cmd_process)

    def sim_args(p):
        p.add_argument("--preset", default="demo", help="simulator preset (demo, small, battery, catalyst)")
        p.add_argument("--translations", type=_positive_int, default=None)
        p.add_argument("--angles", type=_positive_int, default=None)
        p.add_argument("--seed", type=_seed, default=None)

    p = sub.add_parser("simulate", help="simulate an XRD-CT scan with known ground truth")
    p.add_argument("out", type=_nonempty, help="output directory")
    sim_args(p)
    p.set_defaults(fn=cmd_simulate)

    p = sub.add_parser("demo", help="simulate the built-in demo scan and process it")
    p.add_argument("--out", default="xrdct-out/demo", type=_nonempty)
    p.add_argument("--pipeline", default=None, help="spec (default: demo)")
    sim_args(p)
    common(p)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("catalog", help="the experiment catalog: list, show, profiles, add")
    csub = p.add_subparsers(dest="catalog_cmd", required=True)

    def where(p):
        g = p.add_mutually_exclusive_group()
        g.add_argument("--out", default="xrdct-out", help="product directory whose "
                       "catalog.sqlite is used (default xrdct-out; XRDCT_CATALOG_URL wins)")
        g.add_argument("--url", default=None, help="SQLAlchemy URL of the catalog "
                       "(default: XRDCT_CATALOG_URL, else <out>/catalog.sqlite)")

    c = csub.add_parser("list", help="table of products")
    c.add_argument("--proposal", help="only products of scans of this proposal")
    c.add_argument("--sample", help="only products of scans of this sample")
    where(c)
    c.set_defaults(fn=cmd_catalog_list)
    c = csub.add_parser("show", help="one product: scan, calibration, pipeline version, runs")
    c.add_argument("product_id")
    where(c)
    c.set_defaults(fn=cmd_catalog_show)
    c = csub.add_parser("profiles", help="instrument profiles stored with calibrations")
    c.add_argument("--poni", help="only the profiles of this PONI file")
    where(c)
    c.set_defaults(fn=cmd_catalog_profiles)
    c = csub.add_parser("add", help="register scan files or every scan in a directory, and "
                        "published product stores (<id>.zarr) missing from the catalog")
    c.add_argument("paths", nargs="+", metavar="SCAN_OR_DIR_OR_PRODUCT")
    c.add_argument("--recursive", "-r", action="store_true", help="walk sub-directories")
    c.add_argument("--proposal", help="file the scans under this proposal (default: the "
                   "NeXus entry's experiment_identifier)")
    c.add_argument("--sample", help="file the scans under this sample (default: the NeXus "
                   "entry's sample/name)")
    where(c)
    c.set_defaults(fn=cmd_catalog_add)

    from flows.learn import add_cli  # xrdct train / xrdct learn (torch imported when run)

    add_cli(sub, where)
    from flows.calibrate import add_cli as add_profile_cli  # xrdct profile

    add_profile_cli(sub, where)

    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # the ephemeral API server's 20 s start-up limit is too short on a loaded 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    _quiet()
    if args.cmd in ("process", "demo"):
        _install_stop_handlers(args.out if args.cmd == "process" else Path(args.out) / "products",
                               prefect=not getattr(args, "no_prefect", False))
    from catalog.db import CatalogError
    from flows.process import ProcessingError

    try:
        rc = args.fn(args)
    except (Stopped, KeyboardInterrupt) as stop:
        import signal

        signum = stop.signum if isinstance(stop, Stopped) else signal.SIGINT
        _begin_stop(signum)
        _exit_stopped(signum)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
            CatalogError, ProcessingError) as err:
        if _stop["signum"] is not None:  # the stop surfaced as the flow's failure
            _exit_stopped(_stop["signum"])
        from rich.markup import escape

        # escaped: messages name fields like mapping.phases[1].cif; not wrapped: paths
        # in the message stay whole when the output is piped. Bad input (a ValueError, a
        # missing or unwritable file) exits 2; a catalog or cluster that cannot be used, 1.
        _console().print(f"[red]error:[/red] {escape(' '.join(str(err).splitlines()))}", soft_wrap=True)
        return 1 if isinstance(err, (CatalogError, ProcessingError)) else 2
    except BaseException:
        if _stop["signum"] is not None:
            _exit_stopped(_stop["signum"])
        raise
    if _stop["signum"] is not None:  # a signal the flow's machinery swallowed
        _exit_stopped(_stop["signum"])
    return rc


if __name__ == "__main__":
    sys.exit(main())
