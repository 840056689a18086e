"""The XRD-CT scan simulator: file layout, physical consistency of the frames against
pyFAI's own integrator, mass conservation of the projection, beam decay, hot spots,
the sinogram-cube shortcut, the image phantom and its errors."""

from __future__ import annotations

import math

import h5py
import hdf5plugin  # noqa: F401 - registers the bitshuffle filter for reading
import numpy as np
import pytest

pyFAI = pytest.importorskip("pyFAI")

from tasks.simulate import (SimConfig, SimulationError, expected_pattern,  # noqa: E402
                            load_ground_truth, make_phantom, simulate_scan,
                            simulate_sinogram_cube)

SMALL = dict(n_translations=16, n_angles=24)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """Realistic small scan: Poisson noise, hot spots, air, beam decay, COR offset."""
    cfg = SimConfig(**SMALL, hot_spots=20.0, seed=3)
    calls = []
    sim = simulate_scan(tmp_path_factory.mktemp("noisy"), cfg,
                        progress=lambda d, n: calls.append((d, n)))
    return sim, calls


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """Noise-free (rounded expectation, 1e6 counts so rounding is negligible), no spots."""
    cfg = SimConfig(**SMALL, noise=False, hot_spots=0, counts=1e6, seed=3)
    return simulate_scan(tmp_path_factory.mktemp("clean"), cfg)


def _integrate(ai, frame, cfg, npt=400):
    hi = float(ai.center_array(frame.shape, unit="2th_deg").max()) * 0.95
    return ai.integrate1d_ng(frame, npt, unit="2th_deg", radial_range=(1.0, hi),
                             polarization_factor=cfg.polarization_factor,
                             correctSolidAngle=True, method=("full", "csr", "cython"))


def _rel_dev(res, expected_on_grid, tth, frac=0.1):
    """Relative deviation of an integrated pattern from the expected one where the latter
    exceeds ``frac`` of its maximum; the first and last bins (partial pixels at the
    range ends) are left out."""
    exp = np.interp(res.radial, tth, expected_on_grid)
    sig = exp > frac * exp.max()
    sig[[0, -1]] = False
    rel = (res.intensity - exp) / exp
    return rel[sig]


# ----------------------------------------------------------------------------- layout
def test_nexus_layout_and_compression(noisy):
    sim, calls = noisy
    cfg = sim.config
    N = cfg.n_frames
    with h5py.File(sim.nexus_path, "r") as f:
        e = f["entry"]
        assert e.attrs["NX_class"] == "NXentry" and e.attrs["default"] == "data"
        assert e["instrument"].attrs["NX_class"] == "NXinstrument"
        det = e["instrument/detector"]
        assert det.attrs["NX_class"] == "NXdetector"
        d = det["data"]
        H, W = d.shape[1:]
        assert d.shape[0] == N and d.dtype == np.uint32 and d.chunks == (1, H, W)
        fid, _, opts, _ = d.id.get_create_plist().get_filter(0)
        assert fid == 32008 and opts[4] == 2          # bitshuffle, LZ4
        assert d.id.get_storage_size() < 0.5 * d.size * 4   # really compressed
        # NXdata signal is a hard link to the detector data (same object, 2 links)
        nxd = e["data"]
        assert nxd.attrs["NX_class"] == "NXdata" and nxd.attrs["signal"] == "data"
        assert nxd["data"].id == d.id and h5py.h5o.get_info(d.id).rc == 2
        s = e["sample"]
        assert s.attrs["NX_class"] == "NXsample"
        ang, tr, z = s["rotation_angle"][()], s["translation"][()], s["z"][()]
        assert s["rotation_angle"].attrs["units"] == "deg" and s["translation"].attrs["units"] == "mm"
        assert ang.dtype == np.float64 and ang.shape == tr.shape == z.shape == (N,)
        # angle outer, translation inner
        np.testing.assert_allclose(ang.reshape(cfg.n_angles, cfg.n_translations)[:, 0], cfg.angles_deg)
        np.testing.assert_allclose(tr[:cfg.n_translations], cfg.translations_mm)
        assert np.ptp(ang[:cfg.n_translations]) == 0
        np.testing.assert_allclose(np.diff(tr[:cfg.n_translations]), cfg.translation_step_mm)
        assert e["monitor"].attrs["NX_class"] == "NXmonitor"
        np.testing.assert_array_equal(e["monitor/data"][()], sim.monitor)
        frames = d[:]
    assert calls and calls[-1] == (N, N)
    # every frame has counts; gap pixels are 0; the outer columns are air only (dimmer)
    mask = np.asarray(pyFAI.load(str(sim.poni_path)).detector.mask, bool)
    assert frames[:, mask].max() == 0
    assert frames[:, ~mask].mean(axis=1).min() > 0
    tot = frames.reshape(cfg.n_angles, cfg.n_translations, -1).sum(-1, dtype=np.float64)
    assert tot[:, [0, -1]].max() < 0.5 * tot[:, cfg.n_translations // 2].min()


def test_poni_and_mask_roundtrip(noisy):
    sim, _ = noisy
    ai = pyFAI.load(str(sim.poni_path))
    with h5py.File(sim.nexus_path, "r") as f:
        shape = f["entry/instrument/detector/data"].shape[1:]
        pixel_mask = f["entry/instrument/detector/pixel_mask"][()].astype(bool)
        wl = f["entry/instrument/monochromator/wavelength"][()]
    assert ai.detector.shape == shape
    assert ai.wavelength == pytest.approx(sim.config.wavelength_m, rel=1e-12)
    assert wl == pytest.approx(sim.config.wavelength_m * 1e10, rel=1e-12)
    assert ai.dist == pytest.approx(sim.config.distance_m)
    # pyFAI rebuilds the gap mask itself from the detector name in the PONI
    det_mask = np.asarray(ai.detector.mask, bool)
    assert det_mask.sum() > 0
    np.testing.assert_array_equal(det_mask, pixel_mask)
    import fabio

    np.testing.assert_array_equal(fabio.open(str(sim.mask_path)).data.astype(bool), det_mask)


def test_ground_truth_consistency(noisy):
    sim, _ = noisy
    cfg = sim.config
    gt = load_ground_truth(sim.nexus_path)
    P, n = len(cfg.phases), cfg.n_translations
    assert gt["phase_names"] == [p for p, _ in cfg.phases] == sim.phase_names
    for k in ("mass", "weight_fraction", "scale", "mass_over_zmv"):
        assert gt[k].shape == (P, n, n)
    assert gt["projected_mass"].shape == (1, cfg.n_angles, n, P)
    assert gt["config"] == cfg
    mass, wf = gt["mass"], gt["weight_fraction"]
    assert (mass >= 0).all()
    tot = mass.sum(0)
    inside = tot > 0
    # the sample sits inside the circle; outside it there is no mass and no fraction
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    assert not inside[np.hypot(yy, xx) > cfg.sample_radius_frac * n / 2].any()
    np.testing.assert_allclose(np.nansum(wf, 0)[inside], 1.0, atol=1e-12)
    assert np.isnan(wf[:, ~inside]).all()
    # pure and mixed regions, and the fractions vary
    assert (wf.max(0)[inside] > 0.999).sum() >= 4
    assert ((wf.max(0) < 0.9) & inside).sum() >= 4
    for p in range(P):
        assert np.nanstd(wf[p]) > 0.05
    # scale convention: K * mass / zmv
    np.testing.assert_allclose(gt["scale"], gt["intensity_scale"] * mass / gt["zmv"][:, None, None],
                               rtol=1e-12)
    assert gt["center_of_rotation_px"] == pytest.approx((n - 1) / 2 + 1.3)
    # outer translation columns see only air (projected mass 0) on the side away from
    # the rotation-axis offset (at 16 translations the other edge grazes the sample)
    pm = gt["projected_mass"][0]
    assert pm[:, :2].max() == 0 and pm.max() > 1
    # the default scan (48 translations) keeps >= 3 air columns on both sides
    from tasks.reconstruct import radon

    d = SimConfig()
    pd = radon(make_phantom(d).transpose(1, 2, 0), d.angles_deg, center=d.center_of_rotation_px,
               beam_width=d.beam_width_px)
    assert max(pd[:, :3].max(), pd[:, -3:].max()) < 1e-6 * pd.max() and pd.max() > 1
    # y axis follows tasks.reconstruct (row 0 = largest y)
    assert gt["y"][0] > gt["y"][-1] and gt["x"][0] < gt["x"][-1]


# ----------------------------------------------------------------------------- physics
def test_integrated_frames_reproduce_input_patterns(clean):
    """pyFAI integrate1d_ng of a simulated frame (same PONI, solid angle + polarisation)
    returns the 1D pattern combination that made it."""
    sim = clean
    ai = pyFAI.load(str(sim.poni_path))
    n = sim.config.n_translations
    with h5py.File(sim.nexus_path, "r") as f:
        d = f["entry/data/data"]
        # centre column early in the scan, off-centre late (monitor decayed), air only
        for a, t, tol_max, tol_rms in ((3, n // 2, 0.02, 0.01), (20, n // 2 - 3, 0.02, 0.01),
                                       (12, 0, 0.005, 0.001)):
            fi = int(sim.frame_index[0, a, t])
            res = _integrate(ai, d[fi], sim.config)
            rel = _rel_dev(res, sim.expected_pattern(fi), sim.tth_deg)
            assert rel.size > 50
            assert np.abs(rel).max() < tol_max, (a, t, np.abs(rel).max())
            assert np.sqrt(np.mean(rel ** 2)) < tol_rms, (a, t)


def test_projection_conserves_mass(clean):
    """Sum over translations of one angle: projected masses = slice mass, and the summed,
    monitor-normalised frames integrate to that mass times the patterns."""
    sim = clean
    cfg = sim.config
    total = sim.mass.sum(axis=(1, 2))                     # (P,)
    per_angle = sim.projected_mass[0].sum(axis=1)          # (angle, P)
    np.testing.assert_allclose(per_angle, np.broadcast_to(total, per_angle.shape), rtol=1e-5)
    ai = pyFAI.load(str(sim.poni_path))
    a = 7
    idx = sim.frame_index[0, a]
    with h5py.File(sim.nexus_path, "r") as f:
        frames = f["entry/data/data"][int(idx.min()):int(idx.max()) + 1].astype(np.float64)
    summed = (frames / sim.monitor[idx][:, None, None]).sum(0)
    res = _integrate(ai, summed, cfg)
    expected = sim.intensity_scale * (total @ sim.patterns_per_mass + cfg.n_translations * sim.air)
    rel = _rel_dev(res, expected, sim.tth_deg)
    assert np.abs(rel).max() < 0.02 and np.sqrt(np.mean(rel ** 2)) < 0.01


def test_beam_decay_monitor(clean):
    sim = clean
    cfg = sim.config
    mon = sim.monitor
    N = cfg.n_frames
    assert mon[0] == pytest.approx(1.0) and mon[-1] == pytest.approx(1 - cfg.beam_decay, rel=1e-12)
    np.testing.assert_allclose(np.diff(np.log(mon)), math.log(1 - cfg.beam_decay) / (N - 1), rtol=1e-9)
    # air-only frames (first column) scale with the monitor
    with h5py.File(sim.nexus_path, "r") as f:
        d = f["entry/data/data"]
        i0, i1 = int(sim.frame_index[0, 0, 0]), int(sim.frame_index[0, -1, 0])
        r = d[i1].sum(dtype=np.float64) / d[i0].sum(dtype=np.float64)
    assert r == pytest.approx(mon[i1] / mon[i0], rel=1e-4)
    assert r < 0.92


def test_hot_spots(noisy, tmp_path):
    sim, _ = noisy
    cfg = sim.config
    hs = sim.hot_spots
    expected = cfg.hot_spots * cfg.n_frames / 100
    assert abs(len(hs) - expected) < 4 * math.sqrt(expected)
    # noise-free twin with and without spots: the difference is exactly the spot clusters
    base = dict(SMALL, noise=False, seed=5, counts=1000)
    with_spots = simulate_scan(tmp_path / "a", SimConfig(**base, hot_spots=30.0))
    without = simulate_scan(tmp_path / "b", SimConfig(**base, hot_spots=0.0))
    spots = with_spots.hot_spots
    assert len(spots) > 20 and len(without.hot_spots) == 0
    ai = pyFAI.load(str(with_spots.poni_path))
    tth_px = ai.center_array(unit="2th_deg")
    pix_deg = math.degrees(ai.detector.pixel1 / cfg.distance_m)
    with h5py.File(with_spots.nexus_path) as fa, h5py.File(without.nexus_path) as fb:
        a, b = fa["entry/data/data"], fb["entry/data/data"]
        changed = 0
        for fr in np.unique(spots["frame"]):
            fa_, fb_ = a[fr].astype(float), b[fr].astype(float)
            changed += np.count_nonzero(fa_ != fb_)
            for sp in spots[spots["frame"] == fr]:
                r, c = sp["row"], sp["col"]
                assert fa_[r, c] == pytest.approx(cfg.hot_spot_intensity * fb_[r, c],
                                                   abs=0.5 * cfg.hot_spot_intensity + 1)
                # on a reflection ring: the pixel's 2theta is the ring's, within a pixel
                assert abs(tth_px[r, c] - sp["tth_deg"]) < pix_deg
        # clusters of at most 3x3 (overlaps allowed), nothing else changed
        assert 0 < changed <= 9 * len(spots)
        other = np.setdiff1d(np.arange(cfg.n_frames), spots["frame"])[:40]
        np.testing.assert_array_equal(a[np.sort(other)], b[np.sort(other)])


# ----------------------------------------------------------------------------- cube
def test_sinogram_cube(tmp_path):
    cfg = SimConfig(**SMALL, counts=500.0, seed=1)
    sim = simulate_sinogram_cube(tmp_path / "sino.h5", cfg, unit="q_nm^-1", npt=300)
    with h5py.File(sim.path, "r") as f:
        d = f["entry/data"]
        assert f["entry"].attrs["default"] == "data" and d.attrs["signal"] == "sinogram"
        assert list(d.attrs["axes"]) == ["angle", "translation", "radial"]
        cube, err = d["sinogram"][()], d["sinogram_errors"][()]
        assert d["radial"].attrs["units"] == "q_nm^-1"
        np.testing.assert_allclose(d["angle"][()], cfg.angles_deg)
    assert cube.shape == (24, 16, 300) and cube.dtype == np.float32
    # Poisson noise about the clean cube, with honest errors
    z = (cube - sim.sinogram_clean) / err
    bright = sim.sinogram_clean > 50
    assert 0.9 < z[bright].std() < 1.1 and abs(z[bright].mean()) < 0.05
    # mass conservation along translations, and the clean cube is K (P @ patterns + air)
    per_angle = sim.projected_mass[0].sum(1)
    np.testing.assert_allclose(per_angle, np.broadcast_to(sim.mass.sum((1, 2)), per_angle.shape), rtol=1e-5)
    np.testing.assert_allclose(
        sim.sinogram_clean.sum(1),
        sim.intensity_scale * (per_angle @ sim.patterns_per_mass + cfg.n_translations * sim.air),
        rtol=1e-9)
    # noise-free twin equals the clean cube
    sim2 = simulate_sinogram_cube(tmp_path / "clean.h5", cfg.model_copy(update={"noise": False}),
                                  unit="q_nm^-1", npt=300)
    with h5py.File(sim2.path, "r") as f:
        np.testing.assert_allclose(f["entry/data/sinogram"][()], sim2.sinogram_clean, rtol=1e-6)


# ----------------------------------------------------------------------------- phantoms
@pytest.mark.real
def test_image_phantom(real):
    path = real("ndtomo_images", "catalyst_particles_small.tif")
    cfg = SimConfig(n_translations=64, phantom=str(path))
    m = make_phantom(cfg)
    assert m.shape == (3, 64, 64) and (m >= 0).all()
    tot = m.sum(0)
    n = 64
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    assert tot[np.hypot(yy, xx) > cfg.sample_radius_frac * n / 2].max() == 0
    inside = tot > 1e-6
    wf = m[:, inside] / tot[inside]
    # every phase present, as pure particles, and mixed voxels at particle edges
    assert (m.sum((1, 2)) > 0.1 * m.sum() / 3).all()
    for p in range(3):
        assert (wf[p] > 0.999).sum() > 20
    assert ((wf.max(0) < 0.9)).sum() > 20
    # about half of the disc is particles (pores in between)
    disc = np.hypot(yy, xx) <= cfg.sample_radius_frac * n / 2
    assert 0.3 < inside[disc].mean() < 0.95


def test_shapes_phantom_any_phase_count():
    for P in (1, 2, 4):
        m = make_phantom(SimConfig(n_translations=32), n_phase=P)
        assert m.shape == (P, 32, 32) and (m.sum((1, 2)) > 0).all()


def test_errors_name_the_field(tmp_path):
    with pytest.raises(SimulationError, match="detector"):
        simulate_scan(tmp_path, SimConfig(**SMALL, detector="NoSuchDetector9000"))
    with pytest.raises(SimulationError, match="binning"):
        simulate_scan(tmp_path, SimConfig(**SMALL, detector="Pilatus1M", binning=(4, 4)))
    with pytest.raises(SimulationError, match="nothere.cif"):
        simulate_scan(tmp_path, SimConfig(**SMALL, phases=[("X", "nothere.cif")]))
    with pytest.raises(SimulationError, match="phantom"):
        make_phantom(SimConfig(**SMALL, phantom=str(tmp_path / "missing.tif")))
    with pytest.raises(ValueError, match="cor_offset_px"):
        SimConfig(n_translations=16, cor_offset_px=4.0)
    with pytest.raises(ValueError, match="unique"):
        SimConfig(phases=[("A", "Al.cif"), ("A", "Cu.cif")])
    with pytest.raises(SimulationError, match="z_mm"):
        simulate_sinogram_cube(tmp_path / "x.h5", SimConfig(**SMALL, z_mm=[0.0, 1.0]))


def test_multi_slice_snake_order(tmp_path):
    cfg = SimConfig(n_translations=12, n_angles=6, z_mm=[0.0, 0.25], snake=True, noise=False,
                    counts=1e6, hot_spots=0, cor_offset_px=0.5)
    sim = simulate_scan(tmp_path, cfg)
    gt = load_ground_truth(sim.nexus_path)
    assert gt["mass"].shape == (2, 3, 12, 12) and gt["frame_index"].shape == (2, 6, 12)
    assert not np.allclose(gt["mass"][0], gt["mass"][1])           # slices differ
    np.testing.assert_allclose(gt["mass"][1].sum(), gt["mass"][0].sum(), rtol=0.1)
    with h5py.File(sim.nexus_path) as f:
        ang = f["entry/sample/rotation_angle"][()]
        tr = f["entry/sample/translation"][()]
        z = f["entry/sample/z"][()]
        fi = gt["frame_index"]
        # the frame index maps every grid point to the frame recorded at it
        np.testing.assert_allclose(ang[fi], np.broadcast_to(cfg.angles_deg[None, :, None], fi.shape))
        np.testing.assert_allclose(tr[fi], np.broadcast_to(cfg.translations_mm, fi.shape))
        np.testing.assert_allclose(z[fi], np.broadcast_to(np.array([0.0, 0.25])[:, None, None], fi.shape))
        assert tr[12] > tr[13]                                       # second line reversed
        assert sorted(fi.ravel()) == list(range(cfg.n_frames))
        f_ = int(fi[1, 4, 5])
        frame = f["entry/data/data"][f_]
    res = _integrate(pyFAI.load(str(sim.poni_path)), frame, cfg)
    rel = _rel_dev(res, expected_pattern(gt, f_), gt["tth_deg"])
    assert np.abs(rel).max() < 0.02
