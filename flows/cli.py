"""The ``xrdct`` command line: ``process``, ``simulate``, ``demo``, ``catalog``, ``profile``
(instrument profile from a calibrant), ``train`` and ``learn``.

Every command runs the Prefect flow ``process_scan`` (ephemeral Prefect API when no server
is configured) on a local Dask cluster, shows progress bars for long stages and ends with a
summary table (product path, stage timings, fit quality).
"""

from __future__ import annotations

import argparse
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


def _open_catalog(args):
    from catalog.db import Catalog

    return Catalog(Catalog.resolve_url(args.url, args.out))


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

    cat = _open_catalog(args)
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

    cat = _open_catalog(args)
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

    cat = _open_catalog(args)
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


def cmd_catalog_add(args) -> int:
    """Register scan files, or every scan of a directory; report what was skipped and why."""
    from catalog.scans import add_scans

    console = _wide_console()
    cat = _open_catalog(args)
    rep = add_scans(cat, args.paths, recursive=args.recursive, proposal=args.proposal,
                    sample=args.sample)
    for sid, path in rep.added:
        console.print(f"added   scan #{sid} {path}", highlight=False)
    for sid, path in rep.known:
        console.print(f"known   scan #{sid} {path}", highlight=False)
    for path, why in rep.skipped:
        console.print(f"skipped {path}: {why}", highlight=False)
    console.print(f"{len(rep.added)} added, {len(rep.known)} already registered, "
                  f"{len(rep.skipped)} skipped (catalog {cat.url})", highlight=False)
    cat.dispose()
    return 0


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
    parser = argparse.ArgumentParser(prog="xrdct", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--dask-address", default=None, help="attach to this Dask scheduler "
                       "instead of starting a LocalCluster")
        p.add_argument("--workers", type=int, default=None, help="LocalCluster worker processes "
                       "(default: one threaded worker using every core)")
        p.add_argument("--no-prefect", action="store_true", help="run the stages without Prefect")
        p.add_argument("--backend", choices=["cpu", "gpu", "auto"], default=None,
                       help="array backend of the kernels, overriding the spec's 'backend' "
                       "(auto: the GPU when cupy sees one; gpu without a device is an error)")
        p.add_argument("--cluster", default=None, help="Dask cluster: local (default), cuda "
                       "(dask_cuda.LocalCUDACluster, one worker per GPU) or a scheduler address")

    p = sub.add_parser("process", help="process one scan into a product")
    p.add_argument("scan", help="NeXus/HDF5 frames, scan table CSV, or HDF5 sinogram cube")
    p.add_argument("--poni", default=None, help="pyFAI PONI calibration")
    p.add_argument("--pipeline", default="default", help="spec name or YAML path")
    p.add_argument("--out", default="xrdct-out", help="product directory")
    common(p)
    p.set_defaults(fn=cmd_process)

    def sim_args(p):
        p.add_argument("--preset", default="demo", help="simulator preset (demo, small, battery, catalyst)")
        p.add_argument("--translations", type=int, default=None)
        p.add_argument("--angles", type=int, default=None)
        p.add_argument("--seed", type=int, default=None)

    p = sub.add_parser("simulate", help="simulate an XRD-CT scan with known ground truth")
    p.add_argument("out", help="output directory")
    sim_args(p)
    p.set_defaults(fn=cmd_simulate)

    p = sub.add_parser("demo", help="simulate the built-in demo scan and process it")
    p.add_argument("--out", default="xrdct-out/demo")
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
    c = csub.add_parser("add", help="register scan files or every scan in a directory")
    c.add_argument("paths", nargs="+", metavar="SCAN_OR_DIR")
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
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        from rich.markup import escape

        # escaped: messages name fields like mapping.phases[1].cif; not wrapped: paths
        # in the message stay whole when the output is piped
        _console().print(f"[red]error:[/red] {escape(str(err))}", soft_wrap=True)
        return 2
    except RuntimeError as err:
        from flows.process import ProcessingError

        if not isinstance(err, ProcessingError):
            raise
        from rich.markup import escape

        # a stage failed (e.g. non-finite maps): one line, the work kept for inspection
        _console().print(f"[red]error:[/red] {escape(str(err))}", soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
