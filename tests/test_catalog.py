"""The experiment catalog: Alembic schema, scan registration, ``xrdct catalog`` CLI, on
SQLite and on a real PostgreSQL server started by the test."""

from __future__ import annotations

import datetime as dt
import glob
import io
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from catalog.db import Base, Catalog, alembic_config, head_revision
from catalog.scans import add_scans
from flows.cli import main

N_SCANS = 3


@pytest.fixture(scope="module")
def scan_dir(tmp_path_factory):
    """Three small simulated scans (``s<k>/scan.nxs`` beside a PONI and a mask each)."""
    from tasks.simulate import preset, simulate_scan

    d = tmp_path_factory.mktemp("scans")
    for k in range(N_SCANS):
        simulate_scan(d / f"s{k}", preset("small").model_copy(
            update={"n_translations": 12, "n_angles": 12, "seed": k,
                    "proposal": "mx1234" if k < 2 else "ch999", "sample_name": f"cell{k % 2}",
                    "start_time": dt.datetime(2026, 3, 1 + k, 8, tzinfo=dt.timezone.utc)}))
    return d


def _fake_product(cat: Catalog, scan_path: Path, checksum: str, pid: str) -> None:
    cat.register_product(
        product_id=pid, location=f"/products/{pid}.zarr", scan_path=str(scan_path),
        scan_checksum=checksum, scan_kind="frames", geometry={"kind": "frames"},
        poni="/cal/scan.poni", calibration={"poni": "c" * 64}, pipeline_name="demo",
        spec={"schema_version": 1, "name": "demo"}, code_version="0.1.0",
        inputs={"scan.nxs": checksum}, timings={"ingest": 0.1}, wall_time_s=1.5,
        flow_run_id="run-1")


def _check_schema(url: str) -> None:
    """Alembic version at head; exactly the models' tables; no difference to the models."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert ctx.get_current_revision() == head_revision() == "0004"
            tables = set(inspect(conn).get_table_names())
            assert tables == set(Base.metadata.tables) | {"alembic_version"}
            assert compare_metadata(ctx, Base.metadata) == []
    finally:
        engine.dispose()


def _exercise(url: str, scan_dir: Path, capsys) -> None:
    """The catalog operations every backend must support, with counts that can fail."""
    _check_schema(url)
    cat = Catalog(url)
    rep = add_scans(cat, scan_dir, recursive=True)
    assert len(rep.added) == N_SCANS and not rep.known
    # the PONI and the mask of each scan are reported, not registered
    assert len(rep.skipped) == 2 * N_SCANS
    assert all("cannot tell the scan kind" in why for _, why in rep.skipped)
    scans = cat.scans()
    assert len(scans) == N_SCANS
    assert {Path(s.path).parent.name for s in scans} == {f"s{k}" for k in range(N_SCANS)}
    assert all(len(s.checksum) == 64 and s.kind == "frames" for s in scans)
    assert all(s.geometry["grid"] == [1, 12, 12] and s.geometry["n_frames"] == 144 for s in scans)
    # filed under the proposal and sample the NeXus entries name, with their start times
    filed = sorted((s.experiment.proposal, s.experiment.sample, s.acquired.day) for s in scans)
    assert filed == [("ch999", "cell0", 3), ("mx1234", "cell0", 1), ("mx1234", "cell1", 2)]
    assert len({s.experiment_id for s in scans}) == 3

    again = add_scans(cat, scan_dir, recursive=True)
    assert not again.added and len(again.known) == N_SCANS
    assert len(cat.scans()) == N_SCANS
    # not recursive: the top directory holds no scan files
    assert not add_scans(cat, scan_dir).added

    # a product of a registered scan reuses its row; a second run adds a run, not a product
    s0 = scans[0]
    _fake_product(cat, Path(s0.path), s0.checksum, "a" * 24)
    _fake_product(cat, Path(s0.path), s0.checksum, "a" * 24)
    _fake_product(cat, Path("/elsewhere/new.nxs"), "d" * 64, "b" * 24)
    assert len(cat.scans()) == N_SCANS + 1
    assert [p.id for p in cat.products()] == ["a" * 24, "b" * 24]
    assert len(cat.runs("a" * 24)) == 2 and len(cat.runs()) == 3
    assert cat.product("a" * 24).scan.id == s0.id
    cat.dispose()

    capsys.readouterr()
    assert main(["catalog", "list", "--url", url]) == 0
    out = capsys.readouterr().out
    assert "a" * 24 in out and "b" * 24 in out and "2 product(s)" in out
    prop0 = cat.product("a" * 24).scan.experiment.proposal
    assert main(["catalog", "list", "--url", url, "--proposal", prop0]) == 0
    out = capsys.readouterr().out
    assert "1 product(s)" in out and "a" * 24 in out and prop0 in out
    assert main(["catalog", "show", "a" * 24, "--url", url]) == 0
    out = capsys.readouterr().out
    assert "a" * 24 in out and s0.checksum in out and "run #" in out and "demo" in out
    assert out.count("Completed") == 2
    assert main(["catalog", "show", "f" * 24, "--url", url]) == 2
    assert main(["catalog", "add", str(scan_dir), "-r", "--url", url]) == 0
    assert f"0 added, {N_SCANS} already registered, {2 * N_SCANS} skipped" in \
        capsys.readouterr().out.replace("\n", " ")


def test_catalog_sqlite(tmp_path, scan_dir, capsys):
    url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    Catalog(url).dispose()
    _exercise(url, scan_dir, capsys)
    eng = create_engine(url)
    with eng.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    eng.dispose()


def test_cli_default_catalog_location(tmp_path, scan_dir, monkeypatch, capsys):
    """``--out DIR`` means ``DIR/catalog.sqlite``, as for products; XRDCT_CATALOG_URL wins."""
    monkeypatch.delenv("XRDCT_CATALOG_URL", raising=False)
    out = tmp_path / "products"
    assert main(["catalog", "add", str(scan_dir / "s1" / "scan.nxs"), "--out", str(out)]) == 0
    assert (out / "catalog.sqlite").is_file()
    assert len(Catalog.for_products(out).scans()) == 1
    other = tmp_path / "env.sqlite"
    monkeypatch.setenv("XRDCT_CATALOG_URL", f"sqlite:///{other}")
    assert main(["catalog", "add", str(scan_dir / "s2"), "--out", str(out)]) == 0
    assert len(Catalog(f"sqlite:///{other}").scans()) == 1
    assert len(Catalog(f"sqlite:///{out / 'catalog.sqlite'}").scans()) == 1


def test_migrations_downgrade_upgrade_and_legacy_stamp(tmp_path):
    from alembic import command

    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    Catalog(url).dispose()
    eng = create_engine(url)
    with eng.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    assert set(inspect(eng).get_table_names()) == {"alembic_version"}
    eng.dispose()
    Catalog(url).dispose()
    _check_schema(url)

    # a database made before Alembic (create_all, no version table) is stamped, kept
    legacy = f"sqlite:///{tmp_path / 'legacy.sqlite'}"
    eng = create_engine(legacy)
    Base.metadata.create_all(eng)
    eng.dispose()
    cat = Catalog(legacy)
    cat.register_scan(path="/x.nxs", checksum="e" * 64, kind="frames")
    cat.dispose()
    _check_schema(legacy)


def test_concurrent_first_open_sqlite(tmp_path):
    """Four processes opening (and migrating) one fresh SQLite catalog at once all succeed
    and agree on one scan row."""
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    code = ("import sys; from catalog.db import Catalog; c = Catalog(sys.argv[1]); "
            "print(c.register_scan(path='/s.nxs', checksum='f' * 64, kind='frames')[0])")
    procs = [subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e for _, e in outs]
    assert {o.strip() for o, _ in outs} == {"1"}
    assert len(Catalog(url).scans()) == 1
    _check_schema(url)


# ----------------------------------------------------------------------------- PostgreSQL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server (Debian's package) on a free localhost port."""
    pytest.importorskip("psycopg", reason="psycopg not installed (pip install 'psycopg[binary]')")
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        pytest.skip("PostgreSQL server binaries not installed (/usr/lib/postgresql/*/bin/initdb; "
                    "apt-get install postgresql)")
    bindir = Path(bins[-1]).parent
    prefix: list[str] = []
    # the directory must be reachable by the server's user: pytest's tmp_path lives under a
    # 0700 directory of root, so the cluster goes into its own directory under /tmp
    root = Path(tempfile.mkdtemp(prefix="xrdct-pg-"))
    if os.geteuid() == 0:  # postgres refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("running as root and no 'postgres' system user to run the server as")
        if shutil.which("runuser") is None:
            shutil.rmtree(root)
            pytest.skip("running as root and no runuser to drop to the 'postgres' user")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, log, port = root / "data", root / "server.log", _free_port()

    def run(*cmd, timeout=120):
        return subprocess.run(prefix + [str(bindir / cmd[0]), *cmd[1:]], capture_output=True,
                              text=True, timeout=timeout)

    r = run("initdb", "-D", str(data), "-A", "trust", "-U", "xrdct", "-E", "UTF8", "--no-sync")
    if r.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed, cannot start PostgreSQL: {r.stderr.strip()[-500:]}")
    opts = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
            f"-c synchronous_commit=off -c full_page_writes=off")
    r = run("pg_ctl", "-D", str(data), "-o", opts, "-l", str(log), "-w", "-t", "60", "start")
    if r.returncode != 0:
        why = log.read_text()[-800:] if log.exists() else r.stderr
        run("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"PostgreSQL server did not start: {why.strip()}")
    try:
        yield f"postgresql+psycopg://xrdct@127.0.0.1:{port}/postgres"
    finally:
        run("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_catalog_postgresql(postgres_url, scan_dir, capsys, monkeypatch):
    monkeypatch.delenv("XRDCT_CATALOG_URL", raising=False)
    cat = Catalog(postgres_url)
    assert cat.engine.dialect.name == "postgresql"
    cat.dispose()
    _exercise(postgres_url, scan_dir, capsys)
    # opening again finds the schema at head and changes nothing
    Catalog(postgres_url).dispose()
    _check_schema(postgres_url)
    # the CLI reaches it through XRDCT_CATALOG_URL as well
    monkeypatch.setenv("XRDCT_CATALOG_URL", postgres_url)
    capsys.readouterr()
    assert main(["catalog", "list"]) == 0
    assert "2 product(s)" in capsys.readouterr().out


def test_alembic_ini_for_operators(tmp_path, monkeypatch):
    """``alembic -c infra/alembic.ini`` reaches the packaged migrations through
    XRDCT_CATALOG_URL, and autogenerate finds nothing the models have that 0001 lacks."""
    from alembic import command
    from alembic.config import Config

    ini = Path(__file__).resolve().parents[1] / "infra" / "alembic.ini"
    monkeypatch.setenv("XRDCT_CATALOG_URL", f"sqlite:///{tmp_path / 'ops.sqlite'}")
    out = io.StringIO()
    cfg = Config(str(ini), stdout=out)
    command.upgrade(cfg, "head")
    command.check(cfg)  # raises AutogenerateDiffsDetected when the models moved on
    assert "No new upgrade operations detected" in out.getvalue()
    _check_schema(f"sqlite:///{tmp_path / 'ops.sqlite'}")
