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

Importing this module imports Prefect (the science in ``tasks/`` does not need it).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from catalog.db import Catalog
from flows.process import Pipeline, get_flow, make_request, resolved_annotations

process_scan = get_flow()


class ReprocessQuery(BaseModel):
    """Which archived products to reprocess; every condition given must hold.

    Shown as a form in the Prefect UI (the ``reprocess`` flow's parameter).
    """

    model_config = ConfigDict(extra="forbid")

    scan_path_contains: str | None = Field(
        default=None, description="substring of the scan path (e.g. a proposal or sample folder)")
    pipeline_name: str | None = Field(default=None, description="products made by this pipeline")
    created_after: dt.datetime | None = Field(default=None, description="products made after")
    created_before: dt.datetime | None = Field(
        default=None, description="products made before (e.g. before a calibration changed)")
    scan_kind: str | None = Field(default=None, description="frames, map or sinogram")


def select_scans(catalog: Catalog, query: ReprocessQuery) -> list[tuple[str, str | None]]:
    """Scans whose products match ``query``: (scan path, PONI path of that product), one
    entry per scan (the newest product's calibration), in the order the products were made."""

    def aware(t: dt.datetime) -> dt.datetime:
        return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)

    chosen: dict[int, tuple[str, str | None]] = {}
    for p in catalog.products():
        created = aware(p.created)
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


def _process_all(scans: list[tuple[str, str | None]], pipeline: str, out: str,
                 poni: str | None) -> dict:
    log = get_run_logger()
    new, existing = [], []
    for scan, scan_poni in scans:
        req = make_request(scan, pipeline, poni or scan_poni, out)
        if req.final.exists():
            existing.append(str(req.final))
            continue
        log.info("processing %s -> %s", scan, req.product_id)
        new.append(process_scan(scan=scan, poni=req.poni, pipeline=pipeline, out=out))
    log.info("%d new product(s), %d already published", len(new), len(existing))
    return {"new": new, "existing": existing}


@flow(name="reprocess", log_prints=True)
@resolved_annotations
def reprocess(query: ReprocessQuery = ReprocessQuery(), pipeline: Pipeline = "default",
              out: str = "xrdct-out", poni: str | None = None) -> dict:
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

    Returns
    -------
    dict
        ``new``: products made now; ``existing``: products this request already had.
    """
    scans = select_scans(Catalog.for_products(out), query)
    return _process_all(scans, pipeline, out, poni)


@flow(name="discover_and_process", log_prints=True)
@resolved_annotations
def discover_and_process(root: str, pipeline: Pipeline = "default", poni: str | None = None,
                         out: str = "xrdct-out", pattern: str = "*.nxs",
                         recursive: bool = True) -> dict:
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

    Returns
    -------
    dict
        ``new``, ``existing`` (as :func:`reprocess`), ``skipped`` (file, reason) for files
        matching ``pattern`` that do not open as scans.
    """
    from catalog.scans import add_scans

    root_p = Path(root)
    if not root_p.is_dir():
        raise FileNotFoundError(f"{root}: scan directory not found")
    files = sorted(root_p.rglob(pattern) if recursive else root_p.glob(pattern))
    files = [f for f in files if f.is_file()]
    report = add_scans(Catalog.for_products(out), files) if files else None
    skipped = {p for p, _ in report.skipped} if report else set()
    result = _process_all([(str(f), None) for f in files if str(f) not in skipped], pipeline, out, poni)
    result["skipped"] = report.skipped if report else []
    return result
