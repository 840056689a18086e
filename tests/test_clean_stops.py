"""Issue 15, classes 1, 4 and 5, through the real command line (``python -m flows.cli``):

* publish and catalog as one recoverable step: a run killed between the atomic rename and
  the catalog write, a catalog locked by another process, a corrupt catalog; each ends in
  one line naming the catalog, and a rerun (or ``xrdct catalog add``) gives one row and the
  same product;
* nothing left behind: no lock file after any run, no work store after bad input;
* clean stops: every option validated (one line, exit 2), SIGTERM / SIGINT end the run
  within seconds with exit 143 / 130 and one line, stop every process the run started
  (Prefect's API server, Dask) and keep the work for a resume; read-only or file outputs,
  read-only catalogs and unreachable schedulers give one line each.

The scan is 12 x 12 frames (simulated once per module), pipeline ``demo``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from helpers import ROOT, subprocess_env, tree_digest
from tasks.simulate import preset, simulate_scan

TINY = {"n_translations": 12, "n_angles": 12, "noise": False, "hot_spots": 0}
TIMEOUT = 600


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate_scan(tmp_path_factory.mktemp("stops") / "scan", preset("small").model_copy(update=TINY))


def _process(sim, out, *extra, prefect=False, scan=None, poni=None):
    return [sys.executable, "-m", "flows.cli", "process", str(scan or sim.nexus_path), "--poni",
            str(poni or sim.poni_path), "--pipeline", "demo", "--out", str(out), *extra,
            *([] if prefect else ["--no-prefect"])]


def _xrdct(*args, **env):
    return subprocess.run([sys.executable, "-m", "flows.cli", *map(str, args)], cwd=ROOT,
                          env=subprocess_env(**env), capture_output=True, text=True, timeout=TIMEOUT)


def _run(cmd, **env):
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(**env), capture_output=True, text=True,
                          timeout=TIMEOUT)


def one_line(r, word="error:") -> str:
    """The one line of the run's output that holds ``word``; no traceback anywhere."""
    both = r.stdout + r.stderr
    assert "Traceback" not in both, both[-4000:]
    lines = [ln for ln in both.splitlines() if word in ln]
    assert len(lines) == 1, both[-4000:]
    return lines[0]


def left_behind(out: Path) -> list[str]:
    """Work stores, kept slices, PNGs and run records in ``.work``, and lock files."""
    return sorted(str(p.relative_to(out)) for d in (".work", ".locks") if (out / d).is_dir()
                  for p in (out / d).iterdir())


def products(out: Path) -> list[Path]:
    return sorted(out.glob("*.zarr"))


def rows(out: Path) -> tuple[int, int]:
    """(product rows, run rows) of ``<out>/catalog.sqlite``, read with sqlite3 itself."""
    if not (out / "catalog.sqlite").exists():
        return 0, 0
    con = sqlite3.connect(f"file:{out / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        return (con.execute("select count(*) from products").fetchone()[0],
                con.execute("select count(*) from runs").fetchone()[0])
    finally:
        con.close()


def assert_nothing(out: Path) -> None:
    """Nothing published, catalogued or left behind."""
    assert not products(out) and not list(out.glob("*.png")) and not list(out.glob("*.run.json"))
    assert left_behind(out) == []
    assert rows(out)[0] == 0


@contextlib.contextmanager
def sqlite_write_lock(db: Path):
    """Hold the write lock of an SQLite catalog from this process (what another writer
    holding it for a long time looks like)."""
    con = sqlite3.connect(db, isolation_level=None, timeout=30)
    con.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        con.execute("ROLLBACK")
        con.close()


@contextlib.contextmanager
def read_only(path: Path):
    """Make the folder ``path`` unwritable for the processes this test starts: mode 0555 for
    an ordinary user; for root (who writes through modes) the immutable attribute."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode:
        pytest.skip("running as root and 'chattr +i' is not available here: no way to make a "
                    "folder read-only for this process")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.fixture(scope="module")
def published(sim, tmp_path_factory):
    """One undisturbed CLI run: its product directory (copied by the tests that change it)."""
    out = tmp_path_factory.mktemp("published") / "out"
    r = _run(_process(sim, out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def _copy_products(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("catalog.sqlite*"))
    return dst


# ------------------------------------------------------------------ class 1: publish + catalog

def test_kill_between_rename_and_catalog_then_rerun_repairs_the_catalog(sim, published, tmp_path):
    """SIGKILL right after the atomic rename (test hook): the product is published, the
    catalog has no row and ``catalog show`` says so. The rerun does not return early: it adds
    the one row (one product, one run), moves the PNG and run record beside the product, and
    leaves the product's bytes as they were (no second product, nothing stale)."""
    out = tmp_path / "out"
    r = _run(_process(sim, out), _XRDCT_TEST_KILL_AFTER_PUBLISH="1")
    assert r.returncode == -signal.SIGKILL, r.stdout[-2000:] + r.stderr[-2000:]
    (final,) = products(out)
    assert rows(out)[0] == 0
    pid = final.stem
    r = _xrdct("catalog", "show", pid, "--out", out)
    assert r.returncode == 2 and "not in the catalog" in one_line(r)
    digest = tree_digest(final)
    r = _run(_process(sim, out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert products(out) == [final] and tree_digest(final) == digest
    assert rows(out) == (1, 1)
    assert final.with_suffix(".png").is_file() and final.with_suffix(".run.json").is_file()
    assert left_behind(out) == []
    r = _xrdct("catalog", "show", pid, "--out", out)
    assert r.returncode == 0 and str(final) in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert tree_digest(final) == tree_digest(published / final.name)  # the same product


def test_locked_catalog_fails_before_any_work_after_the_stated_wait(sim, tmp_path):
    """Another process holds the catalog's write lock for the whole run: the run waits
    XRDCT_CATALOG_TIMEOUT_S (2 s here) and fails with one line naming the catalog and the
    wait, before any work: nothing published, catalogued or left behind."""
    from catalog.db import Catalog

    out = tmp_path / "out"
    Catalog.for_products(out).dispose()
    with sqlite_write_lock(out / "catalog.sqlite"):
        r = _run(_process(sim, out), XRDCT_CATALOG_TIMEOUT_S="2")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    line = one_line(r)
    assert str(out / "catalog.sqlite") in line and "locked" in line and "2 s" in line, line
    assert_nothing(out)


def test_catalog_locked_at_publishing_then_rerun_adds_the_one_row(sim, tmp_path):
    """The catalog is locked by another process only once the work has started: the
    product is published, the catalog write waits 2 s and the run fails with one line
    naming the catalog, the product and ``xrdct catalog add``. Once the lock is gone the
    same request adds the row (one product, one run) and returns the same product."""
    from catalog.db import Catalog

    out = tmp_path / "out"
    Catalog.for_products(out).dispose()
    p = subprocess.Popen(_process(sim, out), cwd=ROOT, env=subprocess_env(XRDCT_CATALOG_TIMEOUT_S="2"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not list((out / ".work").glob("*.zarr/zarr.json")):
        assert p.poll() is None and time.time() - t0 < 300, p.communicate()
        time.sleep(0.02)
    with sqlite_write_lock(out / "catalog.sqlite"):
        o, e = p.communicate(timeout=TIMEOUT)
    r = subprocess.CompletedProcess(p.args, p.returncode, o, e)
    assert r.returncode == 1, o[-3000:] + e[-3000:]
    (final,) = products(out)
    line = one_line(r)
    for part in (str(out / "catalog.sqlite"), "locked", str(final), "xrdct catalog add"):
        assert part in line, line
    assert rows(out)[0] == 0
    digest = tree_digest(final)
    r = _run(_process(sim, out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert rows(out) == (1, 1) and products(out) == [final] and tree_digest(final) == digest
    assert left_behind(out) == []


def test_corrupt_catalog_is_named_and_the_product_is_found_by_catalog_add(sim, published, tmp_path):
    """A catalog file that is not a database: a new request fails before any work with one
    line naming the file; a request for a published product, and ``catalog list``, fail with
    one line naming it and keep the product. Moved aside, ``xrdct catalog add <product>``
    registers the product from its attrs (one product, one run), ``catalog show`` finds it,
    a second add knows it, and the request then returns the same product."""
    garbage = b"this is not an SQLite database\n" * 200
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "catalog.sqlite").write_bytes(garbage)
    r = _run(_process(sim, fresh))
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    line = one_line(r)
    assert str(fresh / "catalog.sqlite") in line and "not a usable SQLite database" in line, line
    assert not products(fresh) and left_behind(fresh) == []

    out = _copy_products(published, tmp_path / "out")
    (final,) = products(out)
    digest = tree_digest(final)
    (out / "catalog.sqlite").write_bytes(garbage)
    r = _run(_process(sim, out))
    assert r.returncode == 1 and str(out / "catalog.sqlite") in one_line(r), r.stdout[-3000:]
    r = _xrdct("catalog", "list", "--out", out)
    assert r.returncode == 1 and str(out / "catalog.sqlite") in one_line(r), r.stdout[-3000:]
    assert tree_digest(final) == digest
    (out / "catalog.sqlite").rename(out / "catalog.corrupt")
    r = _xrdct("catalog", "add", final, "--out", out)
    assert r.returncode == 0 and f"added   product {final}" in r.stdout, r.stdout + r.stderr
    assert rows(out) == (1, 1)
    r = _xrdct("catalog", "show", final.stem, "--out", out)
    assert r.returncode == 0 and str(final) in r.stdout and str(sim.nexus_path) in r.stdout, r.stdout
    r = _xrdct("catalog", "add", out, "--out", out)  # the folder: finds the product, knows it
    assert r.returncode == 0 and f"known   product {final}" in r.stdout, r.stdout + r.stderr
    r = _run(_process(sim, out))
    assert r.returncode == 0 and rows(out) == (1, 1) and tree_digest(final) == digest


def test_catalog_add_refuses_what_is_not_a_product(tmp_path):
    """A ``.zarr`` folder without xrdct provenance is skipped with the reason, not added."""
    import zarr

    fake = tmp_path / "fake.zarr"
    zarr.open_group(str(fake), mode="w", zarr_format=3)
    r = _xrdct("catalog", "add", fake, "--out", tmp_path / "out")
    assert r.returncode == 0 and f"skipped {fake}" in r.stdout and "not a published xrdct product" in r.stdout
    assert rows(tmp_path / "out") == (0, 0)


# ------------------------------------------------------------------ class 4: leftovers

def test_a_finished_run_leaves_no_lock_file(published):
    """A run that published leaves its product, PNG, run record and catalog row, and no
    ``.locks/<id>.lock`` or ``.work`` entry (before: a 0-byte lock file per product)."""
    assert len(products(published)) == 1 and rows(published) == (1, 1)
    assert left_behind(published) == []


def test_product_lock_is_exclusive_while_its_file_is_removed(tmp_path):
    """Three threads take one product's lock 30 times each; every holder removes the lock
    file on release. Never two holders at once (a waiter that locked the removed file
    locks the new one instead), and no file is left at the end."""
    from flows.process import HELD_LOCKS, product_lock, Request

    req = Request(scan="s", spec_json="{}", spec_base_dir=None, poni=None, out=str(tmp_path),
                  product_id="p" * 24)
    holders, most, errors = [0], [0], []
    guard = threading.Lock()

    def worker():
        try:
            for _ in range(30):
                with product_lock(req):
                    with guard:
                        holders[0] += 1
                        most[0] = max(most[0], holders[0])
                    time.sleep(0.001)
                    with guard:
                        holders[0] -= 1
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and most[0] == 1
    assert not req.lock.exists() and not HELD_LOCKS


def _duplicated_angles(sim, d: Path) -> Path:
    import h5py

    p = d / "dup.nxs"
    shutil.copy(sim.nexus_path, p)
    with h5py.File(p, "r+") as h:
        a = h["/entry/sample/rotation_angle"]
        v = a[()]
        v[v == v.max()] = v.min()
        a[...] = v
    return p


@pytest.mark.parametrize("case", ["duplicated_angles", "two_angles"])
def test_bad_input_leaves_no_work_store_and_no_lock(case, sim, tmp_path):
    """Input errors found while a stage runs (duplicated angles: the ingest stage; a scan of
    2 angles: the sinogram stage, after ingest and integration wrote the work store) exit 2
    with one line, and leave nothing: no product, no row, no ``.work/<id>.zarr``, no kept
    slices, no lock file (before: the lock always, and the work store for 2 angles)."""
    d = tmp_path / "in"
    d.mkdir()
    if case == "duplicated_angles":
        scan, poni, word = _duplicated_angles(sim, d), sim.poni_path, "angle"
    else:
        two = simulate_scan(d / "two", preset("small").model_copy(update={**TINY, "n_angles": 2,
                                                                          "n_translations": 6}))
        scan, poni, word = two.nexus_path, two.poni_path, "angle"
    out = tmp_path / "out"
    r = _run(_process(sim, out, scan=scan, poni=poni))
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert word in one_line(r)
    assert_nothing(out)


# ------------------------------------------------------------------ class 5: clean stops

@pytest.mark.parametrize("option,value,expect", [
    ("--workers", "0", "--workers: expected a whole number >= 1, got 0"),
    ("--workers", "-2", "--workers: expected a whole number >= 1, got -2"),
    ("--workers", "two", "--workers: expected a whole number >= 1, got 'two'"),
    ("--dask-address", "nohost", "--dask-address: expected a Dask scheduler address"),
    ("--dask-address", "tcp://h:70000", "--dask-address: expected a Dask scheduler address"),
    ("--cluster", "slurm", "--cluster: expected 'local', 'cuda' or a Dask scheduler address"),
    ("--backend", "tpu", "--backend: invalid choice: 'tpu'"),
    ("--out", "", "--out: expected a non-empty value"),
])
def test_every_option_is_validated_in_one_line(option, value, expect, sim, tmp_path):
    """A bad option value exits 2 at once with one line naming the option and what it
    expects, and creates nothing (before: ``--workers 0`` or negative hung forever)."""
    out = tmp_path / "out"
    cmd = _process(sim, out) + [option, value]
    r = _run(cmd)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert expect in one_line(r), r.stderr
    assert r.stdout.strip() == "" and not out.exists()


@pytest.mark.parametrize("option,value", [("--angles", "0"), ("--translations", "-4"), ("--seed", "-1")])
def test_simulate_options_are_validated_in_one_line(option, value, tmp_path):
    r = _xrdct("simulate", tmp_path / "sim", option, value)
    assert r.returncode == 2 and f"{option}: expected a whole number" in one_line(r), r.stderr
    assert not (tmp_path / "sim").exists()


def test_output_that_is_a_file_or_read_only_is_one_line(sim, tmp_path):
    """``--out`` naming a file, a folder under a file, or a read-only folder: exit 2, one
    line naming the path, nothing written (before: tracebacks from ``mkdir .locks``)."""
    f = tmp_path / "file"
    f.write_text("not a folder")
    for out in (f, f / "sub"):
        r = _run(_process(sim, out))
        assert r.returncode == 2 and f"{str(f)!r} is a file" in one_line(r), r.stdout + r.stderr
    assert f.read_text() == "not a folder"
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only(ro):
        r = _run(_process(sim, ro))
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"folder {str(ro)!r} is not writable" in one_line(r)
    assert list(ro.iterdir()) == []


def test_catalog_list_and_show_on_a_read_only_product_folder(published, tmp_path):
    """``catalog list`` / ``show`` on a product folder this process cannot write read the
    catalog read-only (no WAL files made, no migration) and print the product (before: a
    traceback, the catalog being opened for writing)."""
    out = _copy_products(published, tmp_path / "out")
    shutil.copy(published / "catalog.sqlite", out / "catalog.sqlite")
    (pid,) = [p.stem for p in products(out)]
    before = sorted(p.name for p in out.iterdir())
    with read_only(out):
        r1 = _xrdct("catalog", "list", "--out", out)
        r2 = _xrdct("catalog", "show", pid, "--out", out)
    assert r1.returncode == 0 and pid in r1.stdout and "1 product(s)" in r1.stdout, r1.stdout + r1.stderr
    assert r2.returncode == 0 and pid in r2.stdout, r2.stdout + r2.stderr
    assert sorted(p.name for p in out.iterdir()) == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_dask_address_fails_in_seconds_naming_it(sim, tmp_path):
    """A scheduler address nobody listens on: exit 1 after XRDCT_DASK_CONNECT_TIMEOUT_S (2 s
    here), one line naming the address and the wait, nothing left (before: a 30 s traceback
    that kept the work store and the lock)."""
    addr = f"tcp://127.0.0.1:{_free_port()}"
    out = tmp_path / "out"
    r = _run(_process(sim, out, "--dask-address", addr), XRDCT_DASK_CONNECT_TIMEOUT_S="2")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    line = one_line(r)
    assert f"Dask scheduler {addr}: not reachable within 2 s" in line, line
    assert_nothing(out)


def _stop_mid_run(sim, out, sig, prefect, group, ready):
    """Start a run in its own session, send ``sig`` once ``ready(out)`` holds (to the whole
    process group for ``group``: what Ctrl-C in a terminal does), and return the completed
    process, the seconds from the signal to its end, and the run's child processes (taken
    just before the signal) that are still alive afterwards."""
    p = subprocess.Popen(_process(sim, out, prefect=prefect), cwd=ROOT, env=subprocess_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        t0 = time.time()
        while not ready(out):
            assert p.poll() is None, p.communicate()
            assert time.time() - t0 < 300
            time.sleep(0.02)
        kids = psutil.Process(p.pid).children(recursive=True)
        if prefect:
            assert any("uvicorn" in " ".join(k.cmdline()) for k in kids), [k.cmdline() for k in kids]
        t = time.time()
        os.killpg(p.pid, sig) if group else p.send_signal(sig)
        o, e = p.communicate(timeout=120)
        dt = time.time() - t
        time.sleep(0.5)
        alive = [k for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
        return subprocess.CompletedProcess(p.args, p.returncode, o, e), dt, alive
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _after_ingest(out: Path) -> bool:
    from tasks import store

    for z in (out / ".work").glob("*.zarr"):
        try:
            if "ingest" in store.provenance(z).get("stages_done", {}):
                return True
        except Exception:  # noqa: BLE001 - zarr.json being written this instant
            pass
    return False


def _assert_stopped(r, dt, alive, sig, out):
    assert r.returncode == 128 + sig, (r.returncode, r.stdout[-3000:], r.stderr[-3000:])
    line = one_line(r, "stopped:")
    assert signal.Signals(sig).name in line and str(out / ".work") in line, line
    assert dt < 30, dt
    assert alive == [], [k.cmdline() for k in alive]
    assert not products(out) and rows(out)[0] == 0
    assert list((out / ".work").glob("*.zarr")), "the work store is kept for a resume"
    assert not list((out / ".locks").glob("*.lock"))


@pytest.mark.slow
@pytest.mark.parametrize("sig,group", [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["sigterm", "ctrl-c"])
def test_signal_stops_the_run_and_the_rerun_resumes(sig, group, sim, published, tmp_path):
    """SIGTERM to the process, or SIGINT to its process group (Ctrl-C), once ingest has
    finished: exit 143 / 130 within seconds, one line, no process left, work kept, no lock.
    The same command then resumes (ingest is not run again) and makes the same product."""
    out = tmp_path / "out"
    r, dt, alive = _stop_mid_run(sim, out, sig, prefect=False, group=group, ready=_after_ingest)
    _assert_stopped(r, dt, alive, sig, out)
    r = _run(_process(sim, out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (final,) = products(out)
    from flows.process import run_record

    assert "ingest" in run_record(final)["resumed_stages"]
    assert tree_digest(final) == tree_digest(published / final.name)
    assert left_behind(out) == [] and rows(out) == (1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("sig,group", [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["sigterm", "ctrl-c"])
def test_signal_with_prefect_stops_its_api_server(sig, group, sim, tmp_path):
    """With Prefect on (its ephemeral API server runs as a child process): SIGTERM to the
    CLI alone, or Ctrl-C to the group, ends the run within seconds with exit 143 / 130 and
    one line, and no child process (the uvicorn API server, Dask) survives (before: SIGTERM
    left the API server running; Ctrl-C took 70 s and ended in an httpx.ConnectError
    traceback)."""
    out = tmp_path / "out"
    r, dt, alive = _stop_mid_run(sim, out, sig, prefect=True, group=group, ready=_after_ingest)
    _assert_stopped(r, dt, alive, sig, out)
