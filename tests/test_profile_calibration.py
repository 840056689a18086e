"""Instrument profile refined once from a calibrant and stored with the calibration
(issue 5, item 2): ``flows.calibrate`` / ``xrdct profile``, the catalog's
``instrument_profiles`` table, and ``mapping.profile: calibration`` in the flow.

Truth: a CeO2 frame simulated in the demo geometry with the simulator's Caglioti profile
(W = 0.09 deg^2, eta = 0.5); and the real CeO2 frame on a Pilatus 2M."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import real_path
from scipy import ndimage

from catalog.db import Catalog
from flows.calibrate import CalibrantError, calibrate_profile, fwhm_deg, read_pattern, resolve_calibrant
from flows.process import make_request, run_pipeline
from pipelines.spec import SpecError, load_spec
from tasks import store
from tasks.ingest import file_checksum
from tasks.simulate import preset, simulate_calibrant, simulate_scan

TTH = np.array([3.0, 6.0, 10.0])  # deg, across the demo detector


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """Small demo-geometry scan (24 x 36) and a CeO2 frame in the same geometry."""
    d = tmp_path_factory.mktemp("cal")
    sim = simulate_scan(d / "scan", preset("small"))
    tif = simulate_calibrant(d / "calibrant", preset("small"), seed=3)
    return sim, tif


@pytest.fixture(scope="module")
def stored(scan, tmp_path_factory):
    sim, tif = scan
    out = tmp_path_factory.mktemp("out")
    rep = calibrate_profile(tif, sim.poni_path, "CeO2", out=out, mask=sim.mask_path, npt=800)
    return out, rep


def test_simulated_calibrant_gives_back_the_profile(scan, stored):
    sim, _ = scan
    out, rep = stored
    true = sim.config.profile.model_dump()
    # the binned 375 um pixels add ~0.05 deg in quadrature to the 0.30 deg FWHM: <= 3 %
    np.testing.assert_allclose(fwhm_deg(rep.row.profile, TTH), fwhm_deg(true, TTH), rtol=0.03)
    assert abs(rep.row.profile["eta"] - true["eta"]) < 0.05
    assert abs(rep.row.profile["zero_shift_deg"]) < 0.005
    assert rep.row.rwp < 0.02                                    # measured 0.0046
    cif_a = resolve_calibrant("CeO2")[1]
    from tasks.rietveld import load_phase

    assert abs(rep.row.lattice - load_phase("CeO2", cif_a).a) < 5e-3   # measured 6e-4
    assert rep.png.is_file() and rep.png.stat().st_size > 10_000


def _store_again(cat, row, **profile):
    """Store ``row``'s profile again through the public API, with ``profile`` values changed."""
    return cat.add_instrument_profile(
        poni_checksum=row.poni_checksum, poni_path=row.poni_path, calibrant=row.calibrant,
        calibrant_checksum=row.calibrant_checksum, source_path=row.source_path,
        source_checksum=row.source_checksum, profile={**row.profile, **profile}, esd=row.esd,
        rwp=row.rwp, lattice=row.lattice)


def test_profile_is_stored_with_the_calibration(scan, stored):
    sim, tif = scan
    out, rep = stored
    cat = Catalog.for_products(out)
    try:
        row = cat.instrument_profile(file_checksum(sim.poni_path))
        assert row is not None and row.key == rep.row.key
        assert row.calibrant == "CeO2" and row.source_checksum == file_checksum(tif)
        assert set(row.esd) >= {"U", "V", "W", "eta", "zero_shift_deg", "a"}
        assert 0 < row.esd["W"] < 0.1 * row.profile["W"]
        # idempotent: storing the same fit again adds no row
        again = _store_again(cat, row)
        assert again.key == row.key and len(cat.instrument_profiles()) == 1
        assert cat.instrument_profile("0" * 64) is None
    finally:
        cat.dispose()


def test_catalog_rejects_a_bad_profile(tmp_path):
    cat = Catalog.for_products(tmp_path)
    good = dict(poni_checksum="a" * 64, poni_path="p.poni", calibrant="CeO2",
                calibrant_checksum="b" * 64, source_path="c.tif", source_checksum="c" * 64,
                profile=dict(U=0, V=0, W=0.01, eta=0.5, zero_shift_deg=0), rwp=0.01)
    try:
        with pytest.raises(ValueError, match="poni_checksum: expected 64"):
            cat.add_instrument_profile(**{**good, "poni_checksum": "xyz"})
        with pytest.raises(ValueError, match="profile: expected finite"):
            cat.add_instrument_profile(**{**good, "profile": {**good["profile"], "eta": 1.5}})
        with pytest.raises(ValueError, match="profile: missing"):
            cat.add_instrument_profile(**{**good, "profile": {"W": 0.01}})
        assert cat.instrument_profiles() == []
    finally:
        cat.dispose()


def _weight_fraction_error(sim, path):
    """Mean |weight fraction - truth| over interior voxels away from phase boundaries."""
    ds = store.open_product(path)
    wf = ds["weight_fraction"].isel(z=0).values
    n = sim.scale.shape[-1]
    k = (wf.shape[-1] - n) // 2
    wf = wf[:, k:k + n, k:k + n]
    inside = np.isfinite(sim.weight_fraction).all(axis=0) & (sim.mass.sum(axis=0) > 0)
    keep = ndimage.binary_erosion(inside, iterations=1)
    for t in sim.scale:
        keep &= ndimage.maximum_filter(t, 3) - ndimage.minimum_filter(t, 3) <= 0.1 * t.max()
    return float(np.nanmean(np.abs(wf[:, keep] - sim.weight_fraction[:, keep])))


def test_flow_uses_the_stored_profile(scan, tmp_path):
    sim, tif = scan
    spec = load_spec("demo")
    spec.mapping.profile = "calibration"
    # no profile stored yet: a clear error that says how to make one
    with pytest.raises(SpecError, match=r"mapping.profile.*xrdct profile"):
        make_request(sim.nexus_path, spec, poni=sim.poni_path, out=tmp_path)
    rep = calibrate_profile(tif, sim.poni_path, "CeO2", out=tmp_path, mask=sim.mask_path, npt=800)
    req = make_request(sim.nexus_path, spec, poni=sim.poni_path, out=tmp_path)
    assert req.calibration["instrument_profile"] == rep.row.key
    assert req.spec.mapping.profile.W == pytest.approx(rep.row.profile["W"])
    path = run_pipeline(sim.nexus_path, poni=sim.poni_path, pipeline=spec, out=tmp_path)
    prov = store.provenance(path)
    assert prov["instrument_profile"]["source"] == "catalog"
    assert prov["instrument_profile"]["key"] == rep.row.key
    assert prov["instrument_profile"]["W"] == pytest.approx(rep.row.profile["W"])
    from flows.process import summary_rows

    assert dict(summary_rows(path))["instrument profile"].startswith(f"catalog {rep.row.key[:12]}")
    # the maps made with the calibrant's profile are as good as with the true profile:
    # the "demo" spec (the simulator's W = 0.09, eta = 0.5) gives 0.0078 on this scan,
    # the stored profile 0.0083 (measured; a run each costs ~15 s, so one is run here)
    e_cal = _weight_fraction_error(sim, path)
    assert e_cal < 0.011, e_cal
    # a newer profile for the PONI (say, a better calibrant measurement) is a new product
    cat = Catalog.for_products(tmp_path)
    try:
        newer = _store_again(cat, rep.row, W=rep.row.profile["W"] * 1.01)
    finally:
        cat.dispose()
    req2 = make_request(sim.nexus_path, spec, poni=sim.poni_path, out=tmp_path)
    assert req2.calibration["instrument_profile"] == newer.key != rep.row.key
    assert req2.product_id != req.product_id


def test_profile_needs_a_poni(tmp_path):
    from tasks.simulate import SimConfig, simulate_sinogram_cube

    cube = simulate_sinogram_cube(tmp_path / "s.h5", SimConfig(n_translations=16, n_angles=8, cor_offset_px=0.0),
                                  unit="q_nm^-1", npt=16)
    spec = load_spec("demo")
    spec.input.kind = "sinogram"
    spec.mapping.profile = "calibration"
    with pytest.raises(SpecError, match="mapping.profile: 'calibration' needs a PONI"):
        make_request(cube.path, spec, out=tmp_path)


def test_bad_calibrant_inputs_are_named(tmp_path, scan):
    sim, tif = scan
    with pytest.raises(CalibrantError, match="calibrant: 'Unobtainium' is neither"):
        resolve_calibrant("Unobtainium")
    q = tmp_path / "q.xy"
    q.write_text("# q_nm^-1 I\n" + "\n".join(f"{i * 0.1} 1.0" for i in range(1, 50)))
    with pytest.raises(CalibrantError, match=r"q.xy: the header names radial unit 'q_nm\^-1'"):
        read_pattern(q)
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff")
    with pytest.raises(CalibrantError, match="bad.tif: cannot read a detector frame"):
        calibrate_profile(bad, sim.poni_path, out=tmp_path)
    with pytest.raises(CalibrantError, match="nope.poni: PONI file not found"):
        calibrate_profile(tif, tmp_path / "nope.poni", out=tmp_path)
    assert not (tmp_path / "catalog.sqlite").exists() or Catalog.for_products(tmp_path).instrument_profiles() == []


@pytest.mark.real
def test_cli_profile_on_real_ceo2_pilatus2m(tmp_path, capsys):
    """``xrdct profile`` on the real CeO2 frame (Pilatus 2M, 71 keV) with its mask:
    the certified cell comes back and the stored row is the printed one."""
    from flows.cli import main

    d = real_path("ndtomo_ceo2_pilatus2m")
    rc = main(["profile", str(d / "CeO2.cbf"), "--poni", str(d / "CeO2.poni"), "--mask",
               str(d / "mask.edf"), "--tth-range", "1.0", "13.0", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert rc == 0, text
    cat = Catalog.for_products(tmp_path)
    try:
        row = cat.instrument_profile(file_checksum(d / "CeO2.poni"))
    finally:
        cat.dispose()
    assert row is not None and row.key in text and "Rwp" in text
    assert main(["catalog", "profiles", "--poni", str(d / "CeO2.poni"), "--out", str(tmp_path)]) == 0
    listed = capsys.readouterr().out
    assert f"{row.key} *" in listed and "CeO2" in listed
    assert abs(row.lattice - 5.411651) < 0.005, row.lattice
    assert row.rwp < 0.05
    assert 0.015 < float(fwhm_deg(row.profile, 3.2)) < 0.05          # (111), measured 0.026 deg
