"""Facility flows: the deployable entry points (``infra/prefect.yaml``).

``process_scan``
    One scan on demand (the UI's "Run" button): :mod:`flows.process`.
``discover_and_process``
    Scheduled: registers the scans found under a directory in the catalog and processes
    every one that has no product yet for the given pipeline and calibration.
``reprocess``
    A catalog query (:class:`ReprocessQuery`) -> one ``process_scan`` sub-flow per scan
    with a new pipeline spec or calibration. Products are content-addressed, so new
    products appear beside the old ones, which are never touched, and an identical second
    request makes nothing.

Every path parameter (``scan``, ``poni``, ``pipeline``, ``out``, ``root``) is confined to the
data roots of ``XRDCT_DATA_ROOTS`` when the workers' environment sets it (:mod:`flows.paths`):
``make_request`` confines the per-scan paths, the flows here ``root`` and ``out``.

Importing this module imports Prefect (the science in ``tasks/`` does not need it).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from catalog.db import Catalog
from flows.paths import PathNotAllowedError, confine
from flows.process import Pipeline, get_flow, make_request, resolved_annotations

process_scan = get_flow()


class ReprocessQuery(BaseModel):
    """Which archived products to reprocess; every condition given must hold.

    Shown as a form in the Prefect UI (the ``reprocess`` flow's parameter).
    """

    model_config = ConfigDict(extra="forbid")

    proposal: str | None = Field(default=None, description="scans of this proposal "
                                 "(NeXus experiment_identifier, or `xrdct catalog add --proposal`)")
    sample: str | None = Field(default=None, description="scans of this sample (NeXus sample/name)")
    acquired_after: dt.datetime | None = Field(default=None, description="scans measured after")
    acquired_before: dt.datetime | None = Field(default=None, description="scans measured before")
    scan_path_contains: str | None = Field(
        default=None, description="substring of the scan path (e.g. a proposal or sample folder)")
    pipeline_name: str | None = Field(default=None, description="products made by this pipeline")
    created_after: dt.datetime | None = Field(default=None, description="products made after")
    created_before: dt.datetime | None = Field(
        default=None, description="products made before (e.g. before a calibration changed)")
    older_than_days: float | None = Field(
        default=None, ge=0, description="products made more than this many days ago")
    code_version_not: str | None = Field(
        default=None, description="products made by any code version but this one (e.g. the "
        "installed version, to bring an archive up to date)")
    scan_kind: str | None = Field(default=None, description="frames, map or sinogram")


def select_scans(catalog: Catalog, query: ReprocessQuery) -> list[tuple[str, str | None]]:
    """Scans whose products match ``query``: (scan path, PONI path of that product), one
    entry per scan (the newest product's calibration), in the order the products were made."""

    def aware(t: dt.datetime) -> dt.datetime:
        return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)

    now = dt.datetime.now(dt.timezone.utc)
    chosen: dict[int, tuple[str, str | None]] = {}
    for p in catalog.products():
        created = aware(p.created)
        exp = p.scan.experiment
        acquired = aware(p.scan.acquired) if p.scan.acquired else None
        if query.proposal and (exp is None or exp.proposal != query.proposal):
            continue
        if query.sample and (exp is None or exp.sample != query.sample):
            continue
        if query.acquired_after and (acquired is None or acquired <= aware(query.acquired_after)):
            continue
        if query.acquired_before and (acquired is None or acquired >= aware(query.acquired_before)):
            continue
        if query.older_than_days is not None and (now - created).total_seconds() < query.older_than_days * 86400:
            continue
        if query.code_version_not and p.pipeline_version.code_version == query.code_version_not:
            continue
        if query.scan_path_contains and query.scan_path_contains not in p.scan.path:
            continue
        if query.pipeline_name and p.pipeline_version.name != query.pipeline_name:
            continue
        if query.created_after and created <= aware(query.created_after):
            continue
        if query.created_before and created >= aware(query.created_before):
            continue
        if query.scan_kind and p.scan.kind != query.scan_kind:
            continue
        cal = catalog.calibration(p.calibration_id)
        chosen[p.scan_id] = (p.scan.path, cal.poni_path if cal else None)
    return list(chosen.values())


def idempotency_key(product_id: str) -> str:
    """The Prefect flow-run idempotency key of a product: ``xrdct-<product id>``, the same
    content hash the stage cache keys start with (:func:`flows.process.stage_cache_key`)."""
    return f"xrdct-{product_id}"


def submit(deployment: str, scan: str, pipeline: str, out: str, poni: str | None,
           product_id: str) -> str:
    """Create a ``process_scan`` flow run of ``deployment`` for one scan, keyed by its product.

    A second submission of the same product (a discovery tick while the first run is still
    queued, two overlapping reprocess requests) gets the existing flow run back: the server
    keeps one flow run per (flow, idempotency key).

    Parameters
    ----------
    deployment : str
        ``"<flow name>/<deployment name>"``, e.g. ``"process_scan/process_scan"``.
    scan, pipeline, out, poni
        ``process_scan`` parameters.
    product_id : str
        Content address of the product (:func:`flows.process.make_request`).

    Returns
    -------
    str
        Flow-run id (not waited for).
    """
    from prefect.deployments import run_deployment

    fr = run_deployment(deployment, parameters={"scan": scan, "poni": poni, "pipeline": pipeline,
                                                "out": out},
                        idempotency_key=idempotency_key(product_id), timeout=0,
                        tags=["xrdct", f"product:{product_id}"])
    return str(fr.id)


def _process_all(scans: list[tuple[str, str | None]], pipeline: str, out: str,
                 poni: str | None, deployment: str | None = None) -> dict:
    log = get_run_logger()
    new, existing, submitted = [], [], []
    for scan, scan_poni in scans:
        req = make_request(scan, pipeline, poni or scan_poni, out)
        if req.final.exists():
            existing.append(str(req.final))
            continue
        if deployment:
            run_id = submit(deployment, scan, pipeline, out, req.poni, req.product_id)
            log.info("submitted %s -> %s as flow run %s", scan, req.product_id, run_id)
            submitted.append(run_id)
            continue
        log.info("processing %s -> %s", scan, req.product_id)
        new.append(process_scan(scan=scan, poni=req.poni, pipeline=pipeline, out=out))
    log.info("%d new product(s), %d submitted, %d already published", len(new), len(submitted),
             len(existing))
    return {"new": new, "existing": existing, "submitted": submitted}


@flow(name="reprocess", log_prints=True)
@resolved_annotations
def reprocess(query: ReprocessQuery = ReprocessQuery(), pipeline: Pipeline = "default",
              out: str = "xrdct-out", poni: str | None = None,
              deployment: str | None = None) -> dict:
    """Reprocess archived scans selected from the catalog with ``pipeline``.

    Parameters
    ----------
    query : ReprocessQuery
        Which products' scans to reprocess.
    pipeline : str
        Shipped spec name or YAML path (the new spec).
    out : str
        Product directory (and its catalog, unless ``XRDCT_CATALOG_URL`` names one).
    poni : str, optional
        A new calibration for every scan; else each scan keeps the PONI of its product.
    deployment : str, optional
        ``"process_scan/<deployment>"``: submit one flow run per scan to that deployment
        (its work pool and concurrency limit), keyed by :func:`idempotency_key`, instead of
        running them here as sub-flows.

    Returns
    -------
    dict
        ``new``: products made now; ``existing``: products this request already had;
        ``submitted``: flow-run ids (with ``deployment``).
    """
    out = str(confine(out, "out"))
    scans = select_scans(Catalog.for_products(out), query)
    return _process_all(scans, pipeline, out, poni, deployment)


@flow(name="discover_and_process", log_prints=True)
@resolved_annotations
def discover_and_process(root: str, pipeline: Pipeline = "default", poni: str | None = None,
                         out: str = "xrdct-out", pattern: str = "*.nxs",
                         recursive: bool = True, deployment: str | None = None) -> dict:
    """Register the scans under ``root`` and process those without a product yet.

    Parameters
    ----------
    root : str
        Directory that acquisition writes scans into.
    pipeline, poni, out
        As for ``process_scan``; ``poni`` is the beamtime's calibration.
    pattern : str
        Glob of scan files.
    recursive : bool
        Search sub-directories.
    deployment : str, optional
        As for :func:`reprocess`: submit keyed flow runs instead of sub-flows, so that a
        tick which finds scans still queued from the previous tick submits nothing new.

    Returns
    -------
    dict
        ``new``, ``existing`` (as :func:`reprocess`), ``skipped`` (file, reason) for files
        matching ``pattern`` that do not open as scans.
    """
    from catalog.scans import add_scans

    root_p = confine(root, "root")
    out = str(confine(out, "out"))
    if not root_p.is_dir():
        raise FileNotFoundError(f"{root}: scan directory not found")
    files = sorted(root_p.rglob(pattern) if recursive else root_p.glob(pattern))
    files = [f for f in files if f.is_file()]
    outside = []  # a pattern with '..', or a symlink under root that leads out of the roots
    for f in list(files):
        try:
            confine(f, "root")
        except PathNotAllowedError as err:
            files.remove(f)
            outside.append((str(f), str(err)))
    report = add_scans(Catalog.for_products(out), files) if files else None
    skipped = {p for p, _ in report.skipped} if report else set()
    result = _process_all([(str(f), None) for f in files if str(f) not in skipped], pipeline, out,
                          poni, deployment)
    result["skipped"] = (report.skipped if report else []) + outside
    return result
