"""The main job end to end: simulated scan in, chemical maps out, checked against the
simulator's ground truth; the Prefect flow under ``prefect_test_harness``; the CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from catalog.db import Catalog
from flows.process import get_flow, make_request, run_pipeline
from tasks import store
from tasks.simulate import preset, simulate_scan


@pytest.fixture(scope="module")
def demo_scan(tmp_path_factory):
    """The demo preset (48 translations x 72 angles, noise, hot spots, air, beam decay,
    centre offset 1.3 px) simulated once for the module."""
    return simulate_scan(tmp_path_factory.mktemp("demo") / "scan", preset("demo"))


@pytest.fixture(scope="module")
def demo_product(demo_scan, tmp_path_factory):
    out = tmp_path_factory.mktemp("products")
    path = run_pipeline(demo_scan.nexus_path, poni=demo_scan.poni_path, pipeline="demo", out=out)
    return demo_scan, out, path


def test_center_of_rotation_within_quarter_pixel(demo_product):
    sim, _, path = demo_product
    found = float(store.open_product(path)["center_of_rotation"].values[0])
    assert abs(found - sim.center_of_rotation_px) < 0.25, (found, sim.center_of_rotation_px)


def _compared(sim):
    """Voxels compared with the truth: inside the sample, one pixel in from its outline,
    and away from phase boundaries (where the 3x3 neighbourhood of any phase's true map
    spans more than 10 % of that phase's maximum). At a boundary the reconstruction's
    resolution (one translation step), not the pipeline, sets the error."""
    inside = np.isfinite(sim.weight_fraction).all(axis=0) & (sim.mass.sum(axis=0) > 0)
    keep = ndimage.binary_erosion(inside, iterations=1)
    for t in sim.scale:
        spread = ndimage.maximum_filter(t, 3) - ndimage.minimum_filter(t, 3)
        keep &= spread <= 0.1 * t.max()
    assert keep.sum() > 200  # enough voxels for the statistic to mean something
    return keep


def _on_truth_grid(a, n):
    """The central n x n pixels of (..., m, m) maps: the reconstruction is centred on the
    rotation axis with m - n even, so these are the simulator's grid."""
    k = (a.shape[-1] - n) // 2
    assert a.shape[-1] - 2 * k == n
    return a[..., k:a.shape[-2] - k, k:a.shape[-1] - k]


def test_phase_scale_maps_match_truth(demo_product):
    sim, _, path = demo_product
    ds = store.open_product(path)
    n = sim.scale.shape[-1]
    fit = _on_truth_grid(ds["scale"].isel(z=0).values, n)            # (phase, y, x)
    names = list(ds["phase"].values)
    keep = _compared(sim)
    for i, name in enumerate(names):
        true = sim.scale[i][keep]
        got = fit[i][keep]
        rel_rms = np.sqrt(np.mean((got - true) ** 2)) / np.sqrt(np.mean(true ** 2))
        assert rel_rms < 0.05, f"{name}: relative RMS {rel_rms:.3f} of the scale map"


def test_weight_fractions_match_truth(demo_product):
    sim, _, path = demo_product
    ds = store.open_product(path)
    wf = _on_truth_grid(ds["weight_fraction"].isel(z=0).values, sim.scale.shape[-1])
    keep = _compared(sim)
    err = np.abs(wf[:, keep] - sim.weight_fraction[:, keep])
    assert np.nanmean(err) < 0.02, f"mean |error| {np.nanmean(err):.4f}"
    assert np.nanpercentile(err, 90) < 0.05


def test_product_layout_and_provenance(demo_product):
    sim, out, path = demo_product
    ds = store.open_product(path)
    assert ds["patterns"].dims == ("z", "angle", "translation", "radial")
    assert ds["volume"].dims == ("z", "y", "x", "radial")
    assert ds["weight_fraction"].dims == ("z", "phase", "y", "x")
    assert ds["radial"].attrs["unit"] == "q_nm^-1"
    assert ds["angle"].attrs["units"] == "deg" and ds["translation"].attrs["units"] == "mm"
    assert np.isclose(ds["radial"].attrs["wavelength_m"], sim.config.wavelength_m, rtol=1e-6)
    prov = store.provenance(path)
    assert prov["pipeline_name"] == "demo" and prov["product_id"] in str(path)
    assert set(prov["timings_s"]) >= {"integrate", "sinogram", "reconstruct", "mapping"}
    assert prov["inputs"]["checksums"]["scan.nxs"] == make_request(
        sim.nexus_path, "demo", sim.poni_path, out).inputs["scan.nxs"]
    assert store.published_path(out, prov["product_id"]).with_suffix(".png").stat().st_size > 10_000
    assert not any((out / ".work").iterdir())  # nothing half-written left behind
    cat = Catalog.for_products(out)
    assert [p.id for p in cat.products()] == [prov["product_id"]]


def test_same_request_is_the_same_product(demo_product):
    sim, out, path = demo_product
    mtime = (store.published_path(out, store.provenance(path)["product_id"]) / "zarr.json").stat().st_mtime_ns
    again = run_pipeline(sim.nexus_path, poni=sim.poni_path, pipeline="demo", out=out)
    assert again == path
    assert (store.published_path(out, store.provenance(path)["product_id"]) / "zarr.json").stat().st_mtime_ns == mtime


@pytest.fixture(scope="module")
def small_scan(tmp_path_factory):
    return simulate_scan(tmp_path_factory.mktemp("small") / "scan", preset("small"))


def test_flow_runs_under_prefect_test_harness(small_scan, tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        path = get_flow()(scan=str(small_scan.nexus_path), poni=str(small_scan.poni_path),
                          pipeline="demo", out=str(tmp_path), n_workers=1)
        import httpx
        from prefect.settings import PREFECT_API_URL

        # the artifact as the UI reads it, through the REST API
        r = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter",
                       json={"limit": 50, "offset": 0, "sort": "CREATED_DESC"}, timeout=30)
        r.raise_for_status()
        arts = [a for a in r.json() if (a.get("key") or "").startswith("xrdct-")]
    ds = store.open_product(path)
    assert ds["weight_fraction"].shape[1] == 3
    runs = Catalog.for_products(tmp_path).runs()
    assert len(runs) == 1 and runs[0].flow_run_id  # registered with its Prefect flow-run id
    assert len(arts) == 1 and store.provenance(path)["product_id"] in arts[0]["key"]
    assert "median Rwp" in arts[0]["data"] and str(runs[0].flow_run_id) == str(arts[0]["flow_run_id"])


def test_cli_demo_end_to_end(tmp_path):
    """`xrdct demo` as a user runs it (ephemeral Prefect API, local Dask cluster)."""
    r = subprocess.run([sys.executable, "-m", "flows.cli", "demo", "--preset", "small",
                        "--out", str(tmp_path), "--workers", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    products = list((tmp_path / "products").glob("*.zarr"))
    assert len(products) == 1 and products[0].with_suffix(".png").exists()
    assert "median Rwp" in r.stdout and "centre of rotation" in r.stdout


def test_cli_reports_bad_input_clearly(tmp_path):
    r = subprocess.run([sys.executable, "-m", "flows.cli", "process", str(tmp_path / "nope.nxs"),
                        "--no-prefect", "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "nope.nxs" in r.stdout and "not found" in r.stdout
    assert not list(tmp_path.glob("*.zarr"))


def test_cli_simulate_writes_a_scan_ingest_reads(tmp_path):
    from flows.cli import main as xrdct
    from tasks.ingest import open_scan
    from tasks.simulate import load_ground_truth
    from pipelines.spec import InputSpec

    assert xrdct(["simulate", str(tmp_path), "--preset", "small", "--translations", "16",
                  "--angles", "20", "--seed", "3"]) == 0
    scan = open_scan(tmp_path / "scan.nxs", InputSpec())
    g = scan.grid()
    assert (len(g.angle), len(g.translation)) == (20, 16) and scan.frames.shape[0] == 320
    gt = load_ground_truth(tmp_path / "scan.nxs")
    assert gt["config"].seed == 3 and gt["mass"].shape[-2:] == (16, 16)


def test_concurrent_requests_for_one_product_make_one(small_scan, tmp_path):
    """Two attempts at the same content address race to publish: each builds in its own
    work store, the first rename wins, the second returns the published product and removes
    its work store; nothing is overwritten."""
    from flows.process import (stage_ingest, stage_integrate, stage_mapping, stage_publish,
                               stage_reconstruct, stage_sinogram)

    reqs = [make_request(small_scan.nexus_path, "demo", small_scan.poni_path, tmp_path) for _ in range(2)]
    assert reqs[0].product_id == reqs[1].product_id and reqs[0].work != reqs[1].work
    for r in reqs:
        r.work.parent.mkdir(parents=True, exist_ok=True)
        for stage in (stage_ingest, stage_integrate, stage_sinogram, stage_reconstruct, stage_mapping):
            stage(r)
    first = stage_publish(reqs[0], 0.0, {})
    digest = (store.published_path(tmp_path, reqs[0].product_id) / "zarr.json").read_bytes()
    second = stage_publish(reqs[1], 0.0, {})
    assert first == second == str(reqs[0].final)
    assert not reqs[1].work.exists() and not any((tmp_path / ".work").iterdir())
    assert (store.published_path(tmp_path, reqs[0].product_id) / "zarr.json").read_bytes() == digest
    assert len(Catalog.for_products(tmp_path).products()) == 1
