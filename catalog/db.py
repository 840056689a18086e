"""The experiment catalog: what was made from what.

SQLAlchemy models for experiments, scans, calibrations, pipeline versions, runs and
products. SQLite (embedded, WAL mode) is the default: ``<product dir>/catalog.sqlite``, or
the URL in ``XRDCT_CATALOG_URL`` (``postgresql+psycopg://...`` in production).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path

from sqlalchemy import (JSON, DateTime, Float, ForeignKey, Integer, String, Text, create_engine,
                        event, select)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    pass


class Experiment(Base):
    __tablename__ = "experiments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    proposal: Mapped[str] = mapped_column(String(64), default="")
    sample: Mapped[str] = mapped_column(String(256), default="")


class Scan(Base):
    __tablename__ = "scans"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    checksum: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    kind: Mapped[str] = mapped_column(String(32), default="")
    geometry: Mapped[dict] = mapped_column(JSON, default=dict)
    experiment_id: Mapped[int | None] = mapped_column(ForeignKey("experiments.id"), nullable=True)
    registered: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Calibration(Base):
    __tablename__ = "calibrations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    poni_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    checksums: Mapped[dict] = mapped_column(JSON, default=dict)


class PipelineVersion(Base):
    __tablename__ = "pipeline_versions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    name: Mapped[str] = mapped_column(String(128))
    spec: Mapped[dict] = mapped_column(JSON)
    code_version: Mapped[str] = mapped_column(String(128))


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    flow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    product_id: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(32))
    wall_time_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    timings: Mapped[dict] = mapped_column(JSON, default=dict)
    finished: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Product(Base):
    __tablename__ = "products"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    location: Mapped[str] = mapped_column(Text)
    scan_id: Mapped[int] = mapped_column(ForeignKey("scans.id"))
    calibration_id: Mapped[int] = mapped_column(ForeignKey("calibrations.id"))
    pipeline_version_id: Mapped[int] = mapped_column(ForeignKey("pipeline_versions.id"))
    inputs: Mapped[dict] = mapped_column(JSON, default=dict)
    created: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    scan: Mapped[Scan] = relationship()
    pipeline_version: Mapped[PipelineVersion] = relationship()


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


class Catalog:
    """A catalog database.

    Parameters
    ----------
    url : str
        SQLAlchemy URL; ``sqlite:///path`` (WAL mode, created on first use) or PostgreSQL.
    """

    def __init__(self, url: str):
        self.url = url
        self.engine = create_engine(url, future=True)
        if url.startswith("sqlite"):
            @event.listens_for(self.engine, "connect")
            def _wal(dbapi_conn, _rec):
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()
        Base.metadata.create_all(self.engine)

    @classmethod
    def for_products(cls, out_dir: str | Path) -> "Catalog":
        """The catalog named by ``XRDCT_CATALOG_URL``, else ``<out_dir>/catalog.sqlite``."""
        url = os.environ.get("XRDCT_CATALOG_URL")
        if not url:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{Path(out_dir).resolve() / 'catalog.sqlite'}"
        return cls(url)

    def _get_or_add(self, s: Session, model, where: dict, **values):
        obj = s.scalars(select(model).filter_by(**where)).first()
        if obj is None:
            obj = model(**where, **values)
            s.add(obj)
            s.flush()
        return obj

    def register_product(self, *, product_id: str, location: str, scan_path: str,
                         scan_checksum: str, scan_kind: str, geometry: dict, poni: str | None,
                         calibration: dict, pipeline_name: str, spec: dict, code_version: str,
                         inputs: dict, timings: dict, wall_time_s: float | None,
                         flow_run_id: str | None = None) -> None:
        """Record a published product, its scan, calibration, pipeline version and run."""
        with Session(self.engine) as s, s.begin():
            scan = self._get_or_add(s, Scan, {"checksum": scan_checksum}, path=scan_path,
                                    kind=scan_kind, geometry=geometry)
            cal = self._get_or_add(s, Calibration, {"key": _key(calibration)}, poni_path=poni,
                                   checksums=calibration)
            pv = self._get_or_add(s, PipelineVersion, {"key": _key([spec, code_version])},
                                  name=pipeline_name, spec=spec, code_version=code_version)
            if s.get(Product, product_id) is None:
                s.add(Product(id=product_id, location=location, scan_id=scan.id,
                              calibration_id=cal.id, pipeline_version_id=pv.id, inputs=inputs))
            s.add(Run(flow_run_id=flow_run_id, product_id=product_id, status="Completed",
                      wall_time_s=wall_time_s, timings=timings))

    def products(self) -> list[Product]:
        with Session(self.engine) as s:
            return list(s.scalars(select(Product).order_by(Product.created)))

    def product(self, product_id: str) -> Product | None:
        with Session(self.engine) as s:
            return s.get(Product, product_id)

    def runs(self, product_id: str | None = None) -> list[Run]:
        with Session(self.engine) as s:
            q = select(Run)
            if product_id:
                q = q.filter_by(product_id=product_id)
            return list(s.scalars(q))
