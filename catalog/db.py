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

from sqlalchemy import (JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text,
                        create_engine, event, inspect, pool, select)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    pass


class Experiment(Base):
    """One (proposal, sample) pair: what a beamtime measured."""

    __tablename__ = "experiments"
    __table_args__ = (Index("ix_experiments_proposal_sample", "proposal", "sample", unique=True),)
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
    acquired: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True,
                                                         index=True)
    experiment: Mapped[Experiment | None] = relationship()


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


class Model(Base):
    """A trained reconstruction network: weights file, checksum, metrics and provenance.

    ``(name, version)`` is unique; at most one version of a name is ``promoted`` (the one
    the pipeline uses)."""

    __tablename__ = "models"
    __table_args__ = (Index("ix_models_name_version", "name", "version", unique=True),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    created: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    provenance: Mapped[dict] = mapped_column(JSON, default=dict)
    promoted: Mapped[bool] = mapped_column(Boolean, default=False)


class InstrumentProfile(Base):
    """An instrument profile refined from a calibrant pattern (tasks.refine.refine_profile),
    stored with the calibration it belongs to: the PONI file, by checksum.

    ``profile`` holds ``U, V, W`` (deg^2 of 2theta), ``eta`` and ``zero_shift_deg``;
    ``esd`` their estimated standard deviations; ``key`` is the content address of the
    row (PONI, calibrant, source pattern and refined values). The newest row of a PONI is
    the one ``mapping.profile: calibration`` uses."""

    __tablename__ = "instrument_profiles"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    poni_checksum: Mapped[str] = mapped_column(String(64), index=True)
    poni_path: Mapped[str] = mapped_column(Text)
    calibrant: Mapped[str] = mapped_column(String(128))
    calibrant_checksum: Mapped[str] = mapped_column(String(64))
    source_path: Mapped[str] = mapped_column(Text)
    source_checksum: Mapped[str] = mapped_column(String(64))
    profile: Mapped[dict] = mapped_column(JSON)
    esd: Mapped[dict] = mapped_column(JSON, default=dict)
    rwp: Mapped[float] = mapped_column(Float)
    lattice: Mapped[float | None] = mapped_column(Float, nullable=True)
    created: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_PG_LOCK = 0x78726463  # advisory lock id ("xrdc") held while PostgreSQL is migrated


def alembic_config(connection=None):
    """An Alembic :class:`~alembic.config.Config` for the catalog's migrations.

    Parameters
    ----------
    connection : sqlalchemy.engine.Connection, optional
        Open connection the migrations run on (``config.attributes["connection"]``).

    Returns
    -------
    alembic.config.Config
        ``script_location`` is the ``migrations`` folder inside this package.
    """
    import sys

    from alembic.config import Config

    cfg = Config(stdout=sys.stdout)  # the stdout of now, not of import time
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    """The newest revision of the catalog schema (``"0001"``, ...)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


class CatalogError(RuntimeError):
    """The catalog cannot be used: locked by another process past the timeout, not a
    database, read-only, or unreachable. The message names the catalog (its file for SQLite)
    and the cause, on one line."""


#: Environment variable: seconds a catalog write waits for a lock another process holds
#: (SQLite ``busy_timeout``) before failing with :class:`CatalogError`; default 30.
TIMEOUT_ENV = "XRDCT_CATALOG_TIMEOUT_S"


def busy_timeout_s() -> float:
    """Seconds a write waits for a locked SQLite catalog (``XRDCT_CATALOG_TIMEOUT_S``, 30)."""
    raw = os.environ.get(TIMEOUT_ENV, "30")
    try:
        t = float(raw)
    except ValueError:
        t = -1.0
    if not 0 <= t <= 86400:
        raise CatalogError(f"{TIMEOUT_ENV}={raw!r}: expected seconds between 0 and 86400")
    return t


def catalog_location(url: str) -> str:
    """The file of an SQLite catalog URL, else the URL without its password."""
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1].split("?", 1)[0]
        return path[len("file:"):] if path.startswith("file:") else path
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy parses
        return url


def catalog_error(url: str, err: BaseException) -> CatalogError:
    """A one-line :class:`CatalogError` for a database error ``err`` on the catalog ``url``."""
    where = catalog_location(url)
    orig = getattr(err, "orig", None) or err
    text = " ".join(str(orig).split())
    low = text.lower()
    if "locked" in low or "busy" in low:
        return CatalogError(f"catalog {where} is locked by another process: gave up after "
                            f"{busy_timeout_s():g} s ({TIMEOUT_ENV})")
    if "not a database" in low or "malformed" in low:
        return CatalogError(f"catalog {where} is not a usable SQLite database ({text}); move it "
                            f"aside or restore it, then register products with 'xrdct catalog add "
                            f"<product>.zarr'")
    if "readonly" in low or "read-only" in low or "unable to open" in low:
        return CatalogError(f"catalog {where} cannot be written ({text}): the file or its folder "
                            f"is read-only")
    return CatalogError(f"catalog {where}: {text}")


def _unusable(err: BaseException) -> bool:
    """Whether a database error means the catalog cannot be used (locked, not a database,
    read-only, cannot be opened), as opposed to a constraint a retry resolves."""
    from sqlalchemy.exc import DatabaseError, OperationalError

    return isinstance(err, OperationalError) or type(err) is DatabaseError


def _sqlite_pragmas(dbapi_conn) -> None:
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s() * 1000)}")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.close()


def upgrade(url: str) -> None:
    """Bring the catalog database at ``url`` to the newest schema with Alembic.

    Safe against concurrent callers: on SQLite the whole upgrade runs in one
    ``BEGIN IMMEDIATE`` transaction (a second process waits for it, then finds the schema at
    head); on PostgreSQL under a transaction-scoped advisory lock. A database made by the
    pre-Alembic ``create_all`` (every table present, no ``alembic_version``) is stamped at
    the revision its columns match first.

    Parameters
    ----------
    url : str
        SQLAlchemy URL of the catalog.
    """
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    sqlite = url.startswith("sqlite")
    engine = create_engine(url, poolclass=pool.NullPool)
    if sqlite:
        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn, _rec):
            dbapi_conn.isolation_level = None  # SQLAlchemy, not pysqlite, opens transactions
            _sqlite_pragmas(dbapi_conn)

        @event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    head = head_revision()
    from sqlalchemy.exc import DBAPIError

    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK})")
            current = MigrationContext.configure(conn).get_current_revision()
            if current == head:
                return
            cfg = alembic_config(conn)
            if current is None:
                insp = inspect(conn)
                tables = set(insp.get_table_names())
                if set(Base.metadata.tables) - {"models", "instrument_profiles"} <= tables:
                    # a create_all database: stamp the revision whose schema it has
                    cols = {c["name"] for c in insp.get_columns("scans")}
                    command.stamp(cfg, "0001" if "acquired" not in cols else
                                  "0002" if "models" not in tables else
                                  "0003" if "instrument_profiles" not in tables else "0004")
            command.upgrade(cfg, "head")
    except DBAPIError as err:
        if not _unusable(err):
            raise
        raise catalog_error(url, err) from None
    finally:
        engine.dispose()


def _parse_time(value) -> dt.datetime | None:
    """An ISO 8601 string (``Z`` allowed) or datetime as an aware datetime (UTC if naive)."""
    if value is None or value == "":
        return None
    t = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


class Catalog:
    """A catalog database.

    Parameters
    ----------
    url : str
        SQLAlchemy URL; ``sqlite:///path`` (WAL mode, busy timeout ``XRDCT_CATALOG_TIMEOUT_S``
        seconds, 30 by default, created on first use) or ``postgresql+psycopg://...``. The
        schema is brought to the newest Alembic revision (:func:`upgrade`) on opening.
    readonly : bool
        For reading only: an SQLite catalog whose file or folder this process cannot write is
        opened read-only (not migrated; no WAL files made). Writes then fail.

    Raises
    ------
    CatalogError
        On opening or on any later call: the catalog is locked past the timeout, is not a
        database, cannot be written, or (read-only) is at an older schema revision. One
        line naming the catalog file.
    """

    def __init__(self, url: str, readonly: bool = False):
        self.url = url
        db = Path(catalog_location(url)) if url.startswith("sqlite") else None
        # reading a catalog in a folder this process cannot write (an archive, another
        # user's products): opened read-only, not migrated, no WAL files created
        self.readonly = bool(readonly and db is not None and db.is_file()
                             and not (os.access(db, os.W_OK) and os.access(db.parent, os.W_OK)))
        if self.readonly:
            wal = db.with_name(db.name + "-wal")
            mode = "mode=ro" if wal.exists() else "mode=ro&immutable=1"
            self.engine = create_engine(f"sqlite:///file:{db}?{mode}&uri=true", future=True,
                                        poolclass=pool.NullPool)
        else:
            upgrade(url)
            self.engine = create_engine(url, future=True)
            if url.startswith("sqlite"):
                @event.listens_for(self.engine, "connect")
                def _wal(dbapi_conn, _rec):
                    _sqlite_pragmas(dbapi_conn)

        @event.listens_for(self.engine, "handle_error")
        def _one_line(ctx):  # locked, corrupt, read-only: one CatalogError naming the file
            if _unusable(ctx.sqlalchemy_exception):
                raise catalog_error(url, ctx.original_exception) from None

        if self.readonly:
            from sqlalchemy import text

            with self.engine.connect() as conn:
                rev = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            if rev != head_revision():
                raise CatalogError(f"catalog {db} is read-only and at schema revision {rev}; this "
                                   f"code reads {head_revision()}: open it once where it can be "
                                   f"written to migrate it")

    @staticmethod
    def resolve_url(url: str | None = None, out_dir: str | Path = "xrdct-out") -> str:
        """The catalog URL: ``url``, else ``XRDCT_CATALOG_URL``, else ``<out_dir>/catalog.sqlite``.

        Parameters
        ----------
        url : str, optional
        out_dir : str or Path
            Product directory (created when the SQLite default is used).

        Returns
        -------
        str
        """
        url = url or os.environ.get("XRDCT_CATALOG_URL")
        if not url:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{Path(out_dir).resolve() / 'catalog.sqlite'}"
        return url

    @classmethod
    def for_products(cls, out_dir: str | Path) -> "Catalog":
        """The catalog named by ``XRDCT_CATALOG_URL``, else ``<out_dir>/catalog.sqlite``."""
        return cls(cls.resolve_url(None, out_dir))

    def dispose(self) -> None:
        """Close the engine's pooled connections."""
        self.engine.dispose()

    def _get_or_add(self, s: Session, model, where: dict, **values):
        obj = s.scalars(select(model).filter_by(**where)).first()
        if obj is None:
            obj = model(**where, **values)
            s.add(obj)
            s.flush()
        return obj

    def _experiment(self, s: Session, proposal: str | None, sample: str | None) -> int | None:
        if not proposal and not sample:
            return None
        where = {"proposal": proposal or "", "sample": sample or ""}
        return self._get_or_add(s, Experiment, where).id

    def _scan(self, s: Session, path: str, checksum: str, kind: str, geometry: dict,
              metadata: dict | None = None) -> tuple[Scan, bool]:
        metadata = metadata or {}
        obj = s.scalars(select(Scan).filter_by(checksum=checksum)).first()
        if obj is not None:
            if obj.experiment_id is None and (metadata.get("proposal") or metadata.get("sample")):
                obj.experiment_id = self._experiment(s, metadata.get("proposal"), metadata.get("sample"))
            if obj.acquired is None and metadata.get("start_time"):
                obj.acquired = _parse_time(metadata["start_time"])
            return obj, False
        obj = Scan(path=str(path), checksum=checksum, kind=kind, geometry=dict(geometry or {}),
                   experiment_id=self._experiment(s, metadata.get("proposal"), metadata.get("sample")),
                   acquired=_parse_time(metadata.get("start_time")))
        s.add(obj)
        s.flush()
        return obj, True

    def register_scan(self, *, path: str | Path, checksum: str, kind: str = "",
                      geometry: dict | None = None,
                      metadata: dict | None = None) -> tuple[int, bool]:
        """Record a raw scan; idempotent on its checksum.

        Parameters
        ----------
        path : str or Path
            Raw location of the scan.
        checksum : str
            SHA-256 of the scan (of its file, or of the checksums of a table and its images).
        kind : str
            ``"frames"``, ``"map"`` or ``"sinogram"``.
        geometry : dict, optional
            Scan geometry (frame count, detector shape, grid), JSON-serialisable.
        metadata : dict, optional
            ``proposal`` and ``sample`` (filed as an :class:`Experiment`), ``start_time``
            (ISO 8601, the scan's ``acquired`` time), as :func:`tasks.ingest.nexus_metadata`
            reads them. Fills those fields of an already-known scan where they are empty.

        Returns
        -------
        (int, bool)
            Row id of the scan, and whether this call added it (False: already known).
        """
        def write(s):
            obj, new = self._scan(s, str(path), checksum, kind, geometry, metadata)
            return obj.id, new

        return self._transaction(write)

    def _transaction(self, write, attempts: int = 5):
        """Run ``write(session)`` in one transaction. Every write is get-or-add on a unique
        key; when a concurrent writer adds the same key between our read and our insert
        (IntegrityError), the transaction is rolled back and run again, and then reads it."""
        from sqlalchemy.exc import IntegrityError

        for attempt in range(attempts):
            try:
                with Session(self.engine) as s, s.begin():
                    return write(s)
            except IntegrityError:
                if attempt == attempts - 1:
                    raise

    def scans(self) -> list[Scan]:
        """Every registered scan, oldest first."""
        from sqlalchemy.orm import selectinload

        with Session(self.engine) as s:
            return list(s.scalars(select(Scan).options(selectinload(Scan.experiment)).order_by(Scan.id)))

    def register_product(self, *, product_id: str, location: str, scan_path: str,
                         scan_checksum: str, scan_kind: str, geometry: dict, poni: str | None,
                         calibration: dict, pipeline_name: str, spec: dict, code_version: str,
                         inputs: dict, timings: dict, wall_time_s: float | None,
                         flow_run_id: str | None = None, metadata: dict | None = None,
                         if_absent: bool = False) -> bool:
        """Record a published product, its scan (with ``metadata`` as for
        :meth:`register_scan`), calibration, pipeline version and run.

        With ``if_absent`` nothing is written when the product has a row already (repairing
        a catalog that missed a product: the run is recorded once). Returns whether the
        product row was added."""
        def write(s):
            known = s.get(Product, product_id) is not None
            if known and if_absent:
                return False
            scan, _ = self._scan(s, scan_path, scan_checksum, scan_kind, geometry, metadata)
            cal = self._get_or_add(s, Calibration, {"key": _key(calibration)}, poni_path=poni,
                                   checksums=calibration)
            pv = self._get_or_add(s, PipelineVersion, {"key": _key([spec, code_version])},
                                  name=pipeline_name, spec=spec, code_version=code_version)
            if not known:
                s.add(Product(id=product_id, location=location, scan_id=scan.id,
                              calibration_id=cal.id, pipeline_version_id=pv.id, inputs=inputs))
            s.add(Run(flow_run_id=flow_run_id, product_id=product_id, status="Completed",
                      wall_time_s=wall_time_s, timings=timings))
            return not known

        return self._transaction(write)

    def products(self) -> list[Product]:
        """Every product, oldest first, with ``scan`` and ``pipeline_version`` loaded."""
        from sqlalchemy.orm import selectinload

        with Session(self.engine) as s:
            q = (select(Product).options(selectinload(Product.scan).selectinload(Scan.experiment),
                                         selectinload(Product.pipeline_version))
                 .order_by(Product.created))
            return list(s.scalars(q))

    def product(self, product_id: str) -> Product | None:
        """One product (``scan`` and ``pipeline_version`` loaded), or None."""
        from sqlalchemy.orm import selectinload

        with Session(self.engine) as s:
            return s.get(Product, product_id,
                         options=[selectinload(Product.scan).selectinload(Scan.experiment),
                                  selectinload(Product.pipeline_version)])

    def calibration(self, calibration_id: int) -> Calibration | None:
        """One calibration row, or None."""
        with Session(self.engine) as s:
            return s.get(Calibration, calibration_id)

    def runs(self, product_id: str | None = None) -> list[Run]:
        """Runs, of one product or of all."""
        with Session(self.engine) as s:
            q = select(Run)
            if product_id:
                q = q.filter_by(product_id=product_id)
            return list(s.scalars(q))

    # ------------------------------------------------------------------------- models

    def add_model(self, *, name: str, path: str | Path, sha256: str, metrics: dict | None = None,
                  provenance: dict | None = None, promoted: bool = False,
                  version: int | None = None) -> int:
        """Register a trained model's weights file.

        Parameters
        ----------
        name : str
            Model family (e.g. ``"cnn-catalyst-32"``).
        path : str or Path
            Weights file (its JSON sidecar beside it).
        sha256 : str
            SHA-256 of the weights file (64 hex digits).
        metrics, provenance : dict, optional
            JSON: evaluation numbers; library, code version, seed, training settings.
        promoted : bool
            Make it the promoted version of ``name`` (demoting the others).
        version : int, optional
            Default: one more than the newest version of ``name``.

        Returns
        -------
        int
            The version registered.

        Raises
        ------
        ValueError
            Empty name, a checksum that is not 64 hex digits, a version already taken.
        """
        import re

        if not name:
            raise ValueError("name: a non-empty model name is required")
        if not re.fullmatch(r"[0-9a-f]{64}", sha256 or ""):
            raise ValueError(f"sha256: expected 64 lowercase hex digits, got {sha256!r}")

        def write(s):
            from sqlalchemy import func

            v = version
            if v is None:
                v = (s.scalar(select(func.max(Model.version)).filter_by(name=name)) or 0) + 1
            elif s.scalars(select(Model).filter_by(name=name, version=int(v))).first() is not None:
                raise ValueError(f"version: {name!r} version {v} is already registered")
            if promoted:
                for m in s.scalars(select(Model).filter_by(name=name, promoted=True)):
                    m.promoted = False
            s.add(Model(name=name, version=int(v), path=str(path), sha256=sha256,
                        metrics=dict(metrics or {}), provenance=dict(provenance or {}),
                        promoted=bool(promoted)))
            s.flush()
            return int(v)

        return self._transaction(write)

    def models(self, name: str | None = None) -> list[Model]:
        """Registered models (of one name, or all), by name then version."""
        with Session(self.engine) as s:
            q = select(Model)
            if name is not None:
                q = q.filter_by(name=name)
            return list(s.scalars(q.order_by(Model.name, Model.version)))

    def model(self, name: str, version: int) -> Model | None:
        """One model version, or None."""
        with Session(self.engine) as s:
            return s.scalars(select(Model).filter_by(name=name, version=int(version))).first()

    def promoted_model(self, name: str) -> Model | None:
        """The promoted version of ``name``, or None."""
        with Session(self.engine) as s:
            return s.scalars(select(Model).filter_by(name=name, promoted=True)).first()

    def promote_model(self, name: str, version: int) -> None:
        """Make ``version`` the promoted model of ``name`` (one transaction: the others are
        demoted). Raises ValueError for an unknown version."""
        def write(s):
            target = s.scalars(select(Model).filter_by(name=name, version=int(version))).first()
            if target is None:
                raise ValueError(f"version: no model {name!r} version {version} in the catalog")
            for m in s.scalars(select(Model).filter_by(name=name, promoted=True)):
                m.promoted = False
            target.promoted = True

        self._transaction(write)

    def update_model_metrics(self, name: str, version: int, metrics: dict) -> None:
        """Merge ``metrics`` into a model's recorded metrics."""
        def write(s):
            target = s.scalars(select(Model).filter_by(name=name, version=int(version))).first()
            if target is None:
                raise ValueError(f"version: no model {name!r} version {version} in the catalog")
            target.metrics = {**(target.metrics or {}), **metrics}

        self._transaction(write)

    # ---------------------------------------------------------- instrument profiles

    def add_instrument_profile(self, *, poni_checksum: str, poni_path: str | Path, calibrant: str,
                               calibrant_checksum: str, source_path: str | Path,
                               source_checksum: str, profile: dict, esd: dict | None = None,
                               rwp: float, lattice: float | None = None) -> InstrumentProfile:
        """Store an instrument profile refined from a calibrant, with its calibration.

        Idempotent: the same PONI, calibrant, source pattern and refined values give the
        same row (``key``). A later row for the same PONI supersedes earlier ones (they
        stay, for the products made with them).

        Parameters
        ----------
        poni_checksum : str
            SHA-256 of the PONI file (64 hex digits).
        poni_path, source_path : str or Path
            The PONI and the calibrant image or pattern the profile was refined from.
        calibrant : str
            Calibrant phase name (e.g. ``"CeO2"``).
        calibrant_checksum, source_checksum : str
            SHA-256 of the calibrant's CIF and of the source file.
        profile : dict
            ``U, V, W`` (deg^2 of 2theta), ``eta`` (0..1), ``zero_shift_deg`` (deg).
        esd : dict, optional
            Estimated standard deviations of those (and ``a`` when the cell was refined).
        rwp : float
            Weighted-profile R factor of the calibrant fit.
        lattice : float, optional
            Refined calibrant cell parameter (A).

        Returns
        -------
        InstrumentProfile

        Raises
        ------
        ValueError
            A checksum that is not 64 hex digits; ``profile`` without the five values, a
            non-finite value, ``W <= 0`` or ``eta`` outside [0, 1].
        """
        import math
        import re

        from pipelines.spec import PROFILE_KEYS

        for field, v in (("poni_checksum", poni_checksum), ("calibrant_checksum", calibrant_checksum),
                         ("source_checksum", source_checksum)):
            if not re.fullmatch(r"[0-9a-f]{64}", v or ""):
                raise ValueError(f"{field}: expected 64 lowercase hex digits, got {v!r}")
        missing = [k for k in PROFILE_KEYS if k not in profile]
        if missing:
            raise ValueError(f"profile: missing {missing}; expected {list(PROFILE_KEYS)}")
        prof = {k: float(profile[k]) for k in PROFILE_KEYS}
        if not all(math.isfinite(v) for v in prof.values()) or prof["W"] <= 0 \
                or not 0 <= prof["eta"] <= 1:
            raise ValueError(f"profile: expected finite values with W > 0 and 0 <= eta <= 1, got {prof}")
        esd = {k: float(v) for k, v in (esd or {}).items()}
        key = _key([poni_checksum, calibrant, calibrant_checksum, source_checksum, prof,
                    None if lattice is None else float(lattice)])

        def write(s):
            return self._get_or_add(
                s, InstrumentProfile, {"key": key}, poni_checksum=poni_checksum,
                poni_path=str(poni_path), calibrant=calibrant, calibrant_checksum=calibrant_checksum,
                source_path=str(source_path), source_checksum=source_checksum, profile=prof,
                esd={k: (v if math.isfinite(v) else None) for k, v in esd.items()},
                rwp=float(rwp), lattice=None if lattice is None else float(lattice))

        self._transaction(write)
        return self.instrument_profile(key=key)

    def instrument_profile(self, poni_checksum: str | None = None, *,
                           key: str | None = None) -> InstrumentProfile | None:
        """The newest instrument profile stored for a PONI (by its checksum), or the one
        with ``key``; None when there is none."""
        with Session(self.engine) as s:
            q = select(InstrumentProfile)
            if key is not None:
                return s.scalars(q.filter_by(key=key)).first()
            return s.scalars(q.filter_by(poni_checksum=poni_checksum)
                             .order_by(InstrumentProfile.id.desc())).first()

    def instrument_profiles(self, poni_checksum: str | None = None) -> list[InstrumentProfile]:
        """Stored instrument profiles (of one PONI, or all), oldest first."""
        with Session(self.engine) as s:
            q = select(InstrumentProfile)
            if poni_checksum is not None:
                q = q.filter_by(poni_checksum=poni_checksum)
            return list(s.scalars(q.order_by(InstrumentProfile.id)))
