"""Faults a facility pipeline meets unattended: a process killed (SIGKILL) mid-stage or while
publishing, a Dask worker killed mid-integration, a full disk, many simultaneous requests.
Each test checks that nothing half-made is ever visible as a product and that the work
done before the fault is kept and not recomputed."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from catalog.db import Catalog
from flows import process
from helpers import ROOT, subprocess_env, tree_diff, tree_digest
from tasks import store
from tasks.simulate import preset, simulate_scan

TINY = {"n_translations": 12, "n_angles": 12, "noise": False, "hot_spots": 0}


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    return simulate_scan(tmp_path_factory.mktemp("faults") / "scan", preset("small"))


@pytest.fixture(scope="module")
def reference(scan, tmp_path_factory):
    """The product made in one go, undisturbed."""
    out = tmp_path_factory.mktemp("reference")
    return Path(process.run_pipeline(scan.nexus_path, poni=scan.poni_path, pipeline="demo", out=out))


def _cli(scan, out):
    return [sys.executable, "-m", "flows.cli", "process", str(scan.nexus_path), "--poni",
            str(scan.poni_path), "--pipeline", "demo", "--out", str(out), "--no-prefect"]


def _done_stages(work: Path) -> list[str]:
    try:
        return list(store.provenance(work).get("stages_done", {})) if (work / "zarr.json").exists() else []
    except Exception:  # noqa: BLE001 - zarr.json being rewritten this instant
        return []


def _kill_when(cmd, ready, what):
    """Start ``cmd``; SIGKILL it as soon as ``ready()`` holds."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not ready():
        assert p.poll() is None, f"finished before the kill {what}: {p.stderr.read()[-2000:]}"
        assert time.time() - t0 < 300
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", ["ingest", "integrate", "mapping"])
def test_sigkill_then_rerun_resumes_and_equals_an_undisturbed_run(scan, reference, tmp_path, kill_after):
    """SIGKILL once the work store records ``kill_after`` as finished: during integration
    (after ingest; :func:`test_sigkill_mid_integration_then_mid_mapping_keeps_the_finished_work`
    kills it half-way through a multi-slice scan), during sinogram processing (after
    integrate), while publishing (after mapping: the PNG and provenance are being written). No product is visible after the
    kill; the rerun resumes (the run record lists the stages it did not redo) and publishes
    the same bytes as the undisturbed run."""
    out = tmp_path / "out"
    req = process.make_request(scan.nexus_path, "demo", scan.poni_path, out)
    _kill_when(_cli(scan, out), lambda: kill_after in _done_stages(req.work), f"after {kill_after}")
    assert not req.final.exists() and not list(out.glob("*.zarr"))
    assert not Catalog.for_products(out).products()
    finished = _done_stages(req.work)
    assert kill_after in finished

    r = subprocess.run(_cli(scan, out), cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    run = process.run_record(req.final)
    assert run["resumed_stages"] == finished  # nothing finished before the kill was redone
    assert tree_digest(req.final) == tree_digest(reference), tree_diff(req.final, reference)
    assert not any((out / ".work").iterdir())
    assert [x.id for x in Catalog.for_products(out).products()] == [req.product_id]


@pytest.mark.slow
def test_sigkill_mid_integration_then_mid_mapping_keeps_the_finished_work(tmp_path):
    """An eight-slice scan (one Zarr chunk of ``patterns`` per slice). SIGKILL while
    integration is half-way; the second attempt integrates only the frames of the chunks not
    yet written, and is killed half-way through mapping; the third fits only the slices the
    second did not finish. The run records count what was reused, nothing is ever visible
    under the published name, and the product is byte-identical to an undisturbed run."""
    import zarr

    sim = simulate_scan(tmp_path / "scan", preset("small").model_copy(
        update={**TINY, "z_mm": [0.25 * k for k in range(8)]}))
    ref = Path(process.run_pipeline(sim.nexus_path, poni=sim.poni_path, pipeline="demo",
                                    out=tmp_path / "reference"))
    chunk = zarr.open_array(str(ref / "patterns"), mode="r").chunks
    per_chunk = chunk[1] * chunk[2]
    n_frames = 8 * TINY["n_angles"] * TINY["n_translations"]
    assert chunk[0] == 1 and per_chunk * 8 == n_frames  # one chunk per slice

    out = tmp_path / "out"
    req = process.make_request(sim.nexus_path, "demo", sim.poni_path, out)
    ledger = req.work.with_name(f"{req.work.stem}.integrate.slices")
    maps = req.work.with_name(f"{req.work.stem}.mapping.slices")
    _kill_when(_cli(sim, out), lambda: len(list(ledger.glob("chunk.*.done"))) >= 2, "in integrate")
    assert _done_stages(req.work) == ["ingest"]  # killed inside integrate
    kept = len(list(ledger.glob("chunk.*.done")))
    assert 2 <= kept < 8 and not list(out.glob("*.zarr"))

    _kill_when(_cli(sim, out), lambda: len(list(maps.glob("z?????.npz"))) >= 2, "in mapping")
    assert _done_stages(req.work) == ["ingest", "integrate", "sinogram", "reconstruct"]
    second = store.provenance(req.work)["stages_done"]["integrate"]  # the killed run's record
    assert second["frames_reused"] == kept * per_chunk
    assert second["frames_integrated"] == n_frames - kept * per_chunk
    assert not ledger.exists()  # removed once integrate finished
    fitted = len(list(maps.glob("z?????.npz")))
    assert 2 <= fitted < 8 and not list(out.glob("*.zarr"))
    assert not req.final.exists() and not Catalog.for_products(out).products()

    r = subprocess.run(_cli(sim, out), cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    run = process.run_record(req.final)
    assert run["resumed_stages"] == ["ingest", "integrate", "sinogram", "reconstruct"]
    assert run["slices_reused"]["mapping"] == fitted
    assert tree_digest(req.final) == tree_digest(ref), tree_diff(req.final, ref)
    assert run["frames"] == {}  # integrate was resumed whole: nothing integrated in this run
    assert not any((out / ".work").iterdir())  # kept maps and work store gone


@pytest.mark.slow
def test_dask_worker_killed_mid_integration(scan):
    """One of two worker processes is killed while it integrates: the scheduler reschedules
    its batches on the restarted/remaining worker and the patterns equal the in-process
    integration."""
    from distributed import Client, LocalCluster

    from pipelines.spec import load_spec
    from tasks.ingest import open_scan
    from tasks.integrate import integrate_scan

    spec = load_spec("demo")
    sc = open_scan(scan.nexus_path, spec.input)
    ref = integrate_scan(sc, spec, poni=str(scan.poni_path))
    killed = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=50) as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)

        def progress(done, total):
            if not killed and done > 0:
                pid = next(iter(pids.values()))
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        radial, patterns, sigma = integrate_scan(sc, spec, poni=str(scan.poni_path), client=client,
                                                 progress=progress)
    assert killed
    np.testing.assert_allclose(radial, ref[0])
    np.testing.assert_allclose(patterns, ref[1], rtol=1e-6, atol=1e-7)


def test_disk_full_gives_a_clear_error_and_removes_the_work_store(scan, tmp_path, monkeypatch):
    """ENOSPC while a stage writes: the error names the store and says the disk is full;
    the work store is removed (it may hold a half-written array) and nothing is published."""
    real_write = store.write_variables

    def full(path, ds, **kw):
        if "volume" in ds:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, ds, **kw)
    monkeypatch.setattr(store, "write_variables", full)
    out = tmp_path / "out"
    with pytest.raises(process.ProcessingError, match="disk full") as err:
        process.run_pipeline(scan.nexus_path, poni=scan.poni_path, pipeline="demo", out=out)
    assert ".work" in str(err.value) and "reconstruct" in str(err.value)
    assert not list(out.glob("*.zarr")) and not any((out / ".work").iterdir())
    assert not Catalog.for_products(out).products()


_MANY = """
import sys
from flows.process import run_pipeline
print("PRODUCT", run_pipeline(sys.argv[1], poni=sys.argv[2], pipeline="demo", out=sys.argv[3]))
"""


@pytest.mark.long
def test_twenty_simultaneous_requests(tmp_path):
    """20 processes asking for one product make one product (the others wait on its lock
    and return it); 20 processes for 20 different scans all complete; the catalog has one
    row per scan, product and run, and nothing else."""
    script = tmp_path / "many.py"
    script.write_text(_MANY)
    scans = [simulate_scan(tmp_path / f"s{k:02d}", preset("small").model_copy(update={**TINY, "seed": k}))
             for k in range(20)]

    def launch(jobs, out):
        procs = [subprocess.Popen([sys.executable, str(script), str(s.nexus_path), str(s.poni_path), str(out)],
                                  cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS="1"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for s in jobs]
        res = [p.communicate(timeout=1200) for p in procs]
        assert [p.returncode for p in procs] == [0] * len(procs), [e[-1500:] for _, e in res if e][:2]
        return [line.split(" ", 1)[1] for o, _ in res for line in o.splitlines() if line.startswith("PRODUCT ")]

    same = launch([scans[0]] * 20, tmp_path / "same")
    assert len(same) == 20 and len(set(same)) == 1
    cat = Catalog.for_products(tmp_path / "same")
    assert len(cat.products()) == 1 and len(cat.scans()) == 1 and len(cat.runs()) == 1

    different = launch(scans, tmp_path / "different")
    assert len(set(different)) == 20 and len(list((tmp_path / "different").glob("*.zarr"))) == 20
    cat = Catalog.for_products(tmp_path / "different")
    assert len(cat.products()) == 20 and len(cat.scans()) == 20 and len(cat.runs()) == 20
    assert len({p.scan_id for p in cat.products()}) == 20


def test_a_slice_that_fails_is_named_and_the_others_are_kept(tmp_path, monkeypatch):
    """Two slices; FBP raises on the second. Prefect retries the reconstruct task once (the
    first slice is not recomputed), then the flow fails with the slice named. The next run
    reuses the kept first slice and completes."""
    from prefect.testing.utilities import prefect_test_harness

    import tasks.reconstruct as rec

    sim = simulate_scan(tmp_path / "scan", preset("small").model_copy(
        update={**TINY, "z_mm": [0.0, 0.25]}))
    real_fbp = rec.fbp
    calls = []

    def flaky(sino, *a, **kw):
        calls.append(float(np.asarray(sino).sum()))
        if len(calls) >= 2:
            raise FloatingPointError("injected failure")
        return real_fbp(sino, *a, **kw)
    out = tmp_path / "out"
    args = dict(scan=str(sim.nexus_path), poni=str(sim.poni_path), pipeline="demo", out=str(out))
    with prefect_test_harness(server_startup_timeout=120):
        monkeypatch.setattr(rec, "fbp", flaky)
        with pytest.raises(process.ProcessingError, match=r"slice 1 of 2 \(z = 0\.25 mm\)") as err:
            process.get_flow()(**args)
        assert "1 earlier are kept" in str(err.value)  # the retry reused slice 0
        assert len(calls) == 3 and calls[1] == calls[2] != calls[0]  # slice 0 once, slice 1 twice
        assert not list(out.glob("*.zarr"))
        monkeypatch.setattr(rec, "fbp", real_fbp)
        path = process.get_flow()(**args)
    run = process.run_record(path)
    assert run["slices_reused"] == {"reconstruct": 1, "mapping": 0}
    assert run["resumed_stages"] == ["ingest", "integrate", "sinogram"]
    assert store.open_product(path)["volume"].sizes["z"] == 2
    assert not any((out / ".work").iterdir())
