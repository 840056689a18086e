"""Batched whole-pattern refinement (tasks.refine): model, Jacobian, accuracy on noise-free
volumes, measured esd coverage on noisy ones, instrument profile from a calibrant, and a
real battery pattern."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.spec import PHASES_DIR
from tasks.refine import (
    RefineError,
    build_model,
    evaluate,
    phase_table,
    refine,
    refine_profile,
)
from tasks.rietveld import fit_scales, load_phase, reference_patterns
from tests.conftest import real_path

LAM = 0.1198e-10                      # the nDTomo battery patterns' wavelength (see test_rietveld)
PROF = dict(U=0.0005, V=0.0, W=0.001, eta=0.4)
BATTERY = ["LiCoO2", "graphite", "Al", "Cu"]


@pytest.fixture(scope="module")
def ph():
    names = BATTERY + ["Fe", "CeO2"]
    return {n: load_phase(n, PHASES_DIR / f"{n}.cif") for n in names}


def _truth(model, rng, V, scale=(0.2, 2.0), scale_unit=1e-4, lat=3e-3, size=(30, 200),
           strain=(1e-4, 1e-3), bg=(500.0, 0, 0, 0, 0)):
    """Random parameters inside the model's bounds (and well away from them)."""
    X = np.tile(model.x_ref, (V, 1))
    for sl in model.phase_slices:
        X[:, sl["scale"]] = rng.uniform(*scale, V) * scale_unit
        for j in sl["lattice"]:
            X[:, j] *= 1 + rng.uniform(-lat, lat, V)
        X[:, sl["size_inv"]] = 1 / rng.uniform(*size, V)
        X[:, sl["strain"]] = rng.uniform(*strain, V)
    nb = model.i_bg.stop - model.i_bg.start
    X[:, model.i_bg] = np.asarray(bg[:nb]) + rng.normal(size=(V, nb)) * 0.1 * bg[0]
    return X


# ------------------------------------------------------------------------------------
# Phases and model
# ------------------------------------------------------------------------------------


def test_phase_table_metric_by_crystal_system(ph):
    t = phase_table(ph["LiCoO2"], LAM, 12.0)
    assert t.system == "trigonal" and t.lattice_names == ("a", "c")
    np.testing.assert_allclose(t.coef @ (1 / t.lattice0 ** 2), t.inv_d2_0, rtol=1e-9)
    # (0 0 3) of the hexagonal setting
    i = int(np.argmax(t.inv_d2_0 == t.inv_d2_0.min()))
    assert tuple(t.hkl[i]) == (0, 0, 3)
    assert abs(1 / np.sqrt(t.inv_d2_0[i]) - 14.0542 / 3) < 1e-6
    c = phase_table(ph["Cu"], LAM, 12.0)
    assert c.system == "cubic" and c.lattice_names == ("a",)
    assert abs(c.volume(np.array([3.6149])) - ph["Cu"].volume_A3) < 1e-3


def test_model_matches_reference_patterns(ph):
    """No broadening, CIF cell: the windowed model is reference_patterns (exactly as the
    window grows; at the default window the truncated tails are folded into the core and
    the area is kept)."""
    phases = [ph[n] for n in BATTERY]
    x = np.linspace(1.0, 12.0, 1500)
    ref = reference_patterns(phases, x, "2th_deg", LAM, PROF)
    for k, tol_peak in ((100.0, 2e-3), (6.0, 3e-2)):
        m = build_model(phases, x, "2th_deg", LAM, PROF, window_fwhm=k, refine_lattice=False,
                        refine_size=False, refine_strain=False)
        pp = evaluate(m, m.x_ref[None], per_phase=True)[0]
        rel_peak = np.abs(pp - ref).max(axis=1) / ref.max(axis=1)
        assert np.all(rel_peak < tol_peak), (k, rel_peak)
        # areas agree (only tails running off the ends of the range differ)
        np.testing.assert_allclose(pp.sum(axis=1), ref.sum(axis=1), rtol=5e-3)


def test_analytic_jacobian_matches_finite_differences(ph):
    phases = [ph["LiCoO2"], ph["Cu"]]
    x = np.linspace(1.5, 9.0, 800)
    m = build_model(phases, x, "2th_deg", LAM, PROF, background_order=2, refine_zero=True)
    X = _truth(m, np.random.default_rng(3), 2)
    X[:, m.i_zero] = 0.01
    _, J = evaluate(m, X, jacobian=True)
    for p in range(m.n_param):
        h = 1e-6 * max(abs(X[0, p]), 1e-4)
        Xp, Xm = X.copy(), X.copy()
        Xp[:, p] += h
        Xm[:, p] -= h
        num = (evaluate(m, Xp) - evaluate(m, Xm)) / (2 * h)
        scale = np.abs(num).max()
        assert scale > 0, m.names[p]
        assert np.abs(num - J[:, p, :]).max() <= 1e-3 * scale, m.names[p]


# ------------------------------------------------------------------------------------
# Accuracy
# ------------------------------------------------------------------------------------


def test_noise_free_volume_recovers_every_parameter(ph):
    """A 4 x 4 x 1 volume with four phases: lattice 1e-4 relative, scales 1 %, size 5 %."""
    phases = [ph[n] for n in BATTERY]
    x = np.linspace(1.0, 12.0, 1500)
    m = build_model(phases, x, "2th_deg", LAM, PROF, background_order=4)
    X = _truth(m, np.random.default_rng(0), 16)
    vol = evaluate(m, X).reshape(1, 4, 4, -1)
    res = refine(m, vol)
    P = res.params.reshape(16, -1)
    assert res.converged.all()
    names = m.names
    for i, nm in enumerate(names):
        if not nm.startswith(tuple(BATTERY)):
            continue
        rel = np.abs(P[:, i] - X[:, i]) / np.abs(X[:, i])
        if nm.endswith(".scale"):
            assert rel.max() < 1e-2, nm
        elif nm.split(".")[-1] in ("a", "b", "c"):
            assert rel.max() < 1e-4, nm
        elif nm.endswith("size_inv"):
            assert rel.max() < 5e-2, nm
        elif nm.endswith("strain"):
            assert rel.max() < 5e-2, nm
    size = res.crystallite_size.reshape(16, -1)
    true_size = 1 / X[:, [sl["size_inv"] for sl in m.phase_slices]]
    assert np.max(np.abs(size / true_size - 1)) < 0.05
    assert np.nanmax(res.rwp) < 1e-6
    # weight fractions: Hill & Howard with the refined cell volume
    zmv = np.stack([t.zmv * t.volume(X[:, sl["lattice"]]) / t.volume0
                    for t, sl in zip(m.tables, m.phase_slices)], axis=1)
    S = X[:, [sl["scale"] for sl in m.phase_slices]]
    wf = S * zmv / (S * zmv).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(res.weight_fraction.reshape(16, -1), wf, rtol=1e-6)


def test_data_from_reference_patterns_consistent_with_fit_scales(ph):
    """Patterns made by tasks.rietveld.reference_patterns (full Lorentzian tails, CIF
    cells): refinement returns the CIF cells and the same scales as fit_scales, once the
    window holds the tails (30 FWHM; at the default 6 FWHM the folded tails bias the
    scales by up to ~6 % for eta = 0.4, measured, while the cells stay within 1e-4)."""
    phases = [ph[n] for n in BATTERY]
    x = np.linspace(1.0, 12.0, 1500)
    refs = reference_patterns(phases, x, "2th_deg", LAM, PROF)
    rng = np.random.default_rng(5)
    S = rng.uniform(0.2, 2.0, (6, 4)) * 1e-4
    Y = S @ refs + 300.0
    fs = fit_scales(Y, refs, 4, radial=x)
    m6 = build_model(phases, x, "2th_deg", LAM, PROF, background_order=4)
    r6 = refine(m6, Y)
    for ip, t in enumerate(m6.tables):
        for j, ln in enumerate(t.lattice_names):
            assert np.max(np.abs(r6.lattice[ln][:, ip] / t.lattice0[j] - 1)) < 1e-4, (t.name, ln)
    assert np.max(np.abs(r6.scale / S - 1)) < 0.08
    m = build_model(phases, x, "2th_deg", LAM, PROF, background_order=4, window_fwhm=30)
    res = refine(m, Y)
    np.testing.assert_allclose(fs.scale, S, rtol=1e-6)
    np.testing.assert_allclose(res.scale, S, rtol=1e-2)
    for ln, vals in res.lattice.items():
        for ip, t in enumerate(m.tables):
            if ln in t.lattice_names:
                v0 = t.lattice0[t.lattice_names.index(ln)]
                assert np.max(np.abs(vals[:, ip] / v0 - 1)) < 1e-4, (t.name, ln)


@pytest.mark.parametrize("understate", [1.0, 5.0], ids=["matched_weights", "noise_5x_weights"])
def test_noisy_volume_esd_coverage(ph, understate):
    """Gaussian noise with sigma = sqrt(counts), fitted with weights 1 / sigma_w^2 where
    sigma_w = sigma / understate: matched weights (chi^2 ~ 1), and weights that state the
    noise 5x too small (the noise is 5x sigma_w, chi^2 ~ 25; the esd is honest only if it
    is scaled by sqrt(reduced chi^2)). Over 200 voxels and every parameter the true value
    lies within 3 esd in >= 95 % of voxels (measured 0.99-1.00 for both), the normalised
    errors have unit spread (0.94-1.07) and their median |err| / esd is near the Gaussian
    0.674 (0.55-0.72), so an esd too large by 2x fails too. Without the chi^2 factor the
    esd of the second case is 5x too small and covers ~45 %."""
    phases = [ph["LiCoO2"], ph["Cu"]]
    x = np.linspace(1.5, 9.0, 1000)
    m = build_model(phases, x, "2th_deg", LAM, PROF, background_order=3)
    rng = np.random.default_rng(1)
    X = _truth(m, rng, 200, scale=(0.5, 2.0), scale_unit=1e-6, lat=2e-3, size=(30, 80),
               strain=(5e-4, 1e-3), bg=(50.0, -5.0, 3.0, 1.0))
    y0 = evaluate(m, X)
    sig = np.sqrt(np.maximum(y0, 1.0))
    y = y0 + rng.normal(size=y0.shape) * sig
    res = refine(m, y, sigma=sig / understate)
    assert np.mean(res.converged) > 0.9
    assert 0.85 < np.median(res.chi2) / understate ** 2 < 1.15
    z = (res.params - X) / res.esd
    for i, nm in enumerate(m.names):
        if nm == "zero":
            assert np.all(np.isnan(z[:, i]))         # not refined: no esd
            continue
        cover = np.mean(np.abs(z[:, i]) < 3)         # NaN (no esd) counts as not covered
        assert cover >= 0.95, (nm, cover)
        assert 0.75 < np.nanstd(z[:, i]) < 1.3, (nm, np.nanstd(z[:, i]))
        assert 0.45 < np.nanmedian(np.abs(z[:, i])) < 0.9, (nm, np.nanmedian(np.abs(z[:, i])))


def test_mask_and_errors(ph):
    phases = [ph["Cu"]]
    x = np.linspace(2.0, 9.0, 600)
    m = build_model(phases, x, "2th_deg", LAM, PROF, background_order=1)
    X = _truth(m, np.random.default_rng(2), 3, bg=(100.0, 0.0))
    Y = evaluate(m, X)
    Y[1] = np.nan
    mask = np.array([False, True, False])
    res = refine(m, Y, mask=mask)
    assert np.all(np.isnan(res.params[1])) and np.isnan(res.rwp[1])
    np.testing.assert_allclose(res.lattice["a"][[0, 2], 0], X[[0, 2], 1], rtol=1e-8)
    with pytest.raises(RefineError, match="NaN"):
        refine(m, Y)
    with pytest.raises(RefineError, match="patterns: expected shape"):
        refine(m, Y[:, :10])
    with pytest.raises(RefineError, match="sigma"):
        refine(m, Y[[0]], sigma=np.zeros(600))
    with pytest.raises(RefineError, match="mask"):
        refine(m, Y, mask=np.zeros(5, bool))
    with pytest.raises(RefineError, match="phases"):
        build_model([], x, "2th_deg", LAM, PROF)
    with pytest.raises(RefineError, match="radial"):
        build_model(phases, x[::-1], "2th_deg", LAM, PROF)
    with pytest.raises(RefineError, match="wavelength_m"):
        build_model(phases, x, "2th_deg", 1.2, PROF)
    with pytest.raises(RefineError, match="eta"):
        build_model(phases, x, "2th_deg", LAM, dict(W=0.001, eta=1.5))


def test_q_axis_same_parameters(ph):
    """The radial unit comes from the data: a q axis gives the same refined cell."""
    from tasks.rietveld import two_theta_to_radial

    phases = [ph["Cu"], ph["Al"]]
    t = np.linspace(2.0, 10.0, 1200)
    q = two_theta_to_radial(t, "q_nm^-1", LAM)
    m2 = build_model(phases, t, "2th_deg", LAM, PROF, background_order=2)
    mq = build_model(phases, q, "q_nm^-1", LAM, PROF, background_order=2)
    X = _truth(m2, np.random.default_rng(7), 3, bg=(100.0, 0.0, 0.0))
    res = refine(mq, evaluate(mq, X))
    np.testing.assert_allclose(res.lattice["a"], X[:, [mq.names.index("Cu.a"), mq.names.index("Al.a")]], rtol=1e-8)


# ------------------------------------------------------------------------------------
# Instrument profile
# ------------------------------------------------------------------------------------


def test_refine_profile_simulated_caglioti(ph):
    lam = 0.1746e-10
    x = np.linspace(1.0, 14.0, 1500)
    true = dict(U=0.004, V=-0.0008, W=0.0009, eta=0.35, zero_shift_deg=0.004)
    y = reference_patterns([ph["CeO2"]], x, "2th_deg", lam, true)[0] * 1e-4 + 20 + 3 * np.cos(x / 3)
    pr = refine_profile(y, x, "2th_deg", lam, ph["CeO2"])
    th = np.radians(np.array([3.0, 8.0, 13.0]) / 2)

    def fwhm(p):
        return np.sqrt(p["U"] * np.tan(th) ** 2 + p["V"] * np.tan(th) + p["W"])

    np.testing.assert_allclose(fwhm(pr.as_profile()), fwhm(true), rtol=2e-3)
    assert abs(pr.eta - 0.35) < 0.01
    assert abs(pr.zero_shift_deg - 0.004) < 1e-5
    assert pr.rwp < 2e-3                       # windowed model vs full tails


# The real CeO2 frame (Pilatus 2M) goes through refine_profile in
# tests/test_profile_calibration.py::test_cli_profile_on_real_ceo2_pilatus2m (xrdct profile:
# integration, fit, catalog row).


# ------------------------------------------------------------------------------------
# Real battery pattern
# ------------------------------------------------------------------------------------


@pytest.mark.real
def test_real_battery_pattern_refinement(ph, tmp_path):
    """Summed patterns of real Li-ion cells (nDTomo, 'pristine' and 'discharged C/20'),
    with the instrument profile refined from the CeO2 pattern of the same beamtime (same
    wavelength and 2theta grid): refining cells, size, strain and zero shift beats the
    scale-only fit; the current collector (Cu) and can (Fe) come back at their handbook
    cells, which pins the wavelength.

    The layered oxide's c is 14.52 A in 'pristine', not the 14.05 A of LiCoO2: its 003
    reflection is at d = 4.84 A. 'Pristine' gives the same cells as the charged cells
    (14.49-14.52 A, graphite d002 = 3.52 A, stage-2 LiC12), and both discharged cells
    give a larger a, a smaller c (2.845 / 14.30 A) and graphite back at d002 = 3.39 A: the
    shifts of a layered oxide and of graphite with state of charge, so the 'pristine' cell
    was measured charged (after formation). The test asserts those shifts. Several start
    values of the two c axes and both cells go through one batched fit as 'voxels'."""
    from tasks.refine import refine_profile, start_parameters

    cal = np.loadtxt(real_path("ndtomo_patterns", "CeO2.xy"))
    prof = refine_profile(cal[:, 1], cal[:, 0], "2th_deg", LAM, ph["CeO2"], refine_lattice=True,
                          two_theta_range=(1.0, 11.9))
    assert prof.rwp < 0.08 and abs(prof.lattice - 5.4116) < 0.005    # measured 0.049, 5.4095
    cells = ["Pristine_summed", "Discharged_C20_summed"]
    data = [np.loadtxt(real_path("ndtomo_patterns", f"{c}.xy")) for c in cells]
    x = data[0][:, 0]
    assert all(np.array_equal(d[:, 0], x) for d in data)
    Y = np.stack([d[:, 1] for d in data])
    names = ["LiCoO2", "graphite", "Al", "Cu", "Fe"]
    phases = [ph[n] for n in names]
    refs = reference_patterns(phases, x, "2th_deg", LAM, prof.as_profile())
    rwp_scales = np.array([float(fit_scales(y, refs, 6, radial=x).rwp) for y in Y])
    m = build_model(phases, x, "2th_deg", LAM, prof.as_profile(), background_order=6,
                    refine_zero=True, lattice_bound=0.06, size_min_nm=20, strain_max=3e-3)
    cs, gs = np.array([14.05, 14.3, 14.55]), np.array([6.71, 7.05])
    n_start = cs.size * gs.size
    x0 = np.repeat(start_parameters(m, Y), n_start, axis=0)           # (cell x start, param)
    x0[:, m.names.index("LiCoO2.c")] = np.tile(np.repeat(cs, gs.size), len(cells))
    x0[:, m.names.index("graphite.c")] = np.tile(gs, cs.size * len(cells))
    for sl in m.phase_slices:
        x0[:, sl["scale"]] = np.maximum(x0[:, sl["scale"]], 1e-9)
    res = refine(m, np.repeat(Y, n_start, axis=0), x0=x0, max_iter=100)
    rwp_all = res.rwp.reshape(len(cells), n_start)
    best = [k * n_start + int(np.argmin(rwp_all[k])) for k in range(len(cells))]
    lat = {k: v[best] for k, v in res.lattice.items()}                 # (cell, phase)
    rwp = res.rwp[best]
    assert np.all(rwp < 0.7 * rwp_scales), (rwp, rwp_scales)          # measured 0.211 vs 0.386
    iL, iG, iC, iF = (names.index(n) for n in ("LiCoO2", "graphite", "Cu", "Fe"))
    assert abs(lat["a"][0, iL] - 2.816) < 0.01                         # measured 2.821
    assert 14.4 < lat["c"][0, iL] < 14.6                               # measured 14.514
    assert np.all(np.abs(lat["a"][:, iC] / 3.6149 - 1) < 1e-3)         # measured 3.6147, 3.6135
    assert np.all(np.abs(lat["a"][:, iF] / 2.8665 - 1) < 2e-3)
    # state of charge: the discharged cell's oxide has a larger a and a smaller c, its
    # graphite a smaller c (measured: +0.025 A, -0.21 A, -0.25 A)
    assert lat["a"][1, iL] - lat["a"][0, iL] > 0.015
    assert lat["c"][0, iL] - lat["c"][1, iL] > 0.1
    assert lat["c"][0, iG] - lat["c"][1, iG] > 0.15
    for n in ("LiCoO2", "Cu", "Fe"):
        i = names.index(n)
        assert np.all(res.scale[best, i] > 10 * res.scale_esd[best, i]), n
    # the figure: the fitted patterns, their residuals and each phase's contribution
    from tasks.plots import refinement_png

    xb = res.params[best]
    png = refinement_png(tmp_path / "battery_fit.png", x, Y, evaluate(m, xb),
                         evaluate(m, xb, per_phase=True), names, unit="2th_deg",
                         titles=[f"{c}.xy, Rwp {r:.3f} (scale-only {s:.3f}); c = {lc:.3f} A"
                                 for c, r, s, lc in zip(cells, rwp, rwp_scales, lat["c"][:, iL])])
    assert png.stat().st_size > 20_000


# ------------------------------------------------------------------------------------
# Pipeline: spec option and the mapping stage
# ------------------------------------------------------------------------------------


def test_stage_mapping_refine_writes_maps(ph, tmp_path):
    """``mapping.method: refine`` in a spec: the mapping stage writes lattice, size,
    strain, esd, Rwp and chi2 maps into the product store (q axis, wavelength from the
    volume's radial attrs)."""
    import json

    import xarray as xr

    from flows.process import Request, stage_mapping
    from pipelines.spec import parse_spec
    from tasks import store
    from tasks.rietveld import two_theta_to_radial

    phases = [ph["Cu"], ph["Al"]]
    q = two_theta_to_radial(np.linspace(2.0, 10.0, 900), "q_nm^-1", LAM)
    spec = parse_spec({"name": "t", "mapping": {
        "enabled": True, "method": "refine", "background_order": 2,
        "phases": [{"name": "Cu", "cif": "phases/Cu.cif"}, {"name": "Al", "cif": "phases/Al.cif"}],
        "profile": {"W": 0.001, "eta": 0.4},
        "refine": {"lattice_bound": 0.005, "seed_weak_from_neighbours": True}}})
    m = build_model(phases, q, "q_nm^-1", LAM, dict(W=0.001, eta=0.4), background_order=2,
                    lattice_bound=0.005)
    X = _truth(m, np.random.default_rng(11), 9, lat=2e-3, bg=(100.0, 0.0, 0.0))
    vol = evaluate(m, X).reshape(1, 3, 3, -1)
    vol[0, 0, 0] = 0.0                                    # an empty voxel: masked
    req = Request(scan="none", spec_json=spec.canonical_json(), spec_base_dir=None, poni=None,
                  out=str(tmp_path), product_id="test")
    ds = xr.Dataset({"volume": (("z", "y", "x", "radial"), vol)},
                    coords={"radial": ("radial", q, {"unit": "q_nm^-1", "wavelength_m": LAM})})
    store.write_variables(req.work, ds)
    stage_mapping(req)
    out = store.open_product(req.work)
    for v in ("lattice_a", "lattice_a_esd", "crystallite_size", "microstrain", "microstrain_esd",
              "scale", "weight_fraction", "rwp", "chi2", "refine_params"):
        assert v in out, v
    assert out["lattice_a"].dims == ("z", "phase", "y", "x")
    esd_vars = [v for v in out.data_vars if v.endswith("_esd")]
    assert {"scale_esd", "lattice_a_esd", "crystallite_size_esd", "microstrain_esd"} <= set(esd_vars)
    for v in esd_vars:                                            # the product says how esd is scaled
        assert out[v].attrs["esd_scaling"].startswith("esd scaled by sqrt(reduced chi^2)"), v
    a = out["lattice_a"].values[0].reshape(2, 9)                  # (phase, voxel)
    true = X[:, [m.names.index("Cu.a"), m.names.index("Al.a")]].T
    assert np.isnan(a[:, 0]).all()
    np.testing.assert_allclose(a[:, 1:], true[:, 1:], rtol=1e-6)
    assert np.nanmax(out["rwp"].values) < 1e-5
    assert json.loads(json.dumps(out["refine_params"].attrs["param_names"]))[0] == "Cu.scale"
    # the figure of a refined product: maps and the strongest voxels' fits (model rebuilt
    # from the product's spec and refine_params)
    from tasks.plots import refinement_png_from_product

    store.update_attrs(req.work, {"pipeline_spec": json.loads(req.spec_json)})
    png = refinement_png_from_product(req.work, tmp_path / "maps.png", n_patterns=2)
    assert png.stat().st_size > 20_000


def test_refine_seeded_weak_voxels(ph):
    """Sequential option: voxels with a weak phase are flagged and refitted from their
    neighbours' cells; the merged result is never worse in chi^2, equals the first fit
    on the other voxels, and keeps the truth within 3 esd."""
    from tasks.refine import refine_seeded, start_parameters, weak_voxels

    phases = [ph["LiCoO2"], ph["Cu"]]
    x = np.linspace(1.2, 9.0, 1000)
    m = build_model(phases, x, "2th_deg", LAM, PROF, background_order=3, lattice_bound=0.03)
    rng = np.random.default_rng(4)
    ny = nx = 5
    V = ny * nx
    X = np.tile(m.x_ref, (V, 1))
    ic = m.names.index("LiCoO2.c")
    X[:, m.names.index("LiCoO2.a")] *= 1.004
    X[:, ic] *= 1.008
    X[:, m.names.index("Cu.a")] *= 1 + rng.uniform(-1e-3, 1e-3, V)
    weak = np.zeros(V, bool)
    weak[[6, 12, 18]] = True
    X[:, m.phase_slices[0]["scale"]] = np.where(weak, 0.03, 1.0) * 1e-6
    X[:, m.phase_slices[1]["scale"]] = 1e-6
    for sl in m.phase_slices:
        X[:, sl["size_inv"]] = 1 / 60
        X[:, sl["strain"]] = 5e-4
    X[:, m.i_bg] = [50, -5, 3, 1]
    y0 = evaluate(m, X)
    sig = np.sqrt(np.maximum(y0, 1))
    y = (y0 + rng.normal(size=y0.shape) * sig).reshape(1, ny, nx, -1)
    S = sig.reshape(1, ny, nx, -1)
    x0 = start_parameters(m, y.reshape(V, -1), sig)
    x0[weak, ic] = m.x_ref[ic] * 0.975               # weak voxels start 3.3 % from the truth
    r1 = refine(m, y, S, x0=x0.reshape(1, ny, nx, -1))
    flagged = weak_voxels(m, r1).ravel()
    assert flagged[weak].all() and not flagged[~weak].any()
    r2 = refine_seeded(m, y, S, x0=x0.reshape(1, ny, nx, -1))
    assert np.all(r2.chi2 <= r1.chi2 * (1 + 1e-12))
    np.testing.assert_array_equal(r2.params.reshape(V, -1)[~weak], r1.params.reshape(V, -1)[~weak])
    z = np.abs(r2.params[..., ic].ravel() - X[:, ic]) / r2.esd[..., ic].ravel()
    assert np.all(z < 3), z


# ------------------------------------------------------------------------------------
# Engines: the numba CPU kernel against the numpy array code (the reference)
# ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def noisy_two_phase(ph):
    """200 LiCoO2 + Cu voxels with Gaussian noise sigma = sqrt(counts) (as
    test_noisy_volume_esd_coverage)."""
    m = build_model([ph["LiCoO2"], ph["Cu"]], np.linspace(1.5, 9.0, 1000), "2th_deg", LAM, PROF,
                    background_order=3)
    rng = np.random.default_rng(1)
    X = _truth(m, rng, 200, scale=(0.5, 2.0), scale_unit=1e-6, lat=2e-3, size=(30, 80),
               strain=(5e-4, 1e-3), bg=(50.0, -5.0, 3.0, 1.0))
    y0 = evaluate(m, X, engine="numpy")
    sig = np.sqrt(np.maximum(y0, 1.0))
    return m, X, y0 + rng.normal(size=y0.shape) * sig, sig


def test_numba_model_and_jacobian_equal_numpy(ph):
    """The fused kernel evaluates the same model and analytic Jacobian as the array code:
    with erf/atan/exp to rounding (measured 3e-15 model, 5e-14 Jacobian, relative to
    the largest value), with the tabulated profile CDF to its interpolation error
    (measured 4e-13 and 1.3e-9). Cubic and trigonal cells, refined zero shift, a q axis;
    the refinements of these patterns agree."""
    from tasks.rietveld import two_theta_to_radial

    q = two_theta_to_radial(np.linspace(1.5, 9.0, 700), "q_nm^-1", LAM)
    m = build_model([ph["LiCoO2"], ph["Cu"]], q, "q_nm^-1", LAM, PROF, background_order=2,
                    refine_zero=True)
    X = _truth(m, np.random.default_rng(3), 5, bg=(100.0, 0.0, 0.0))
    X[:, m.i_zero] = 0.01
    y0, J0 = evaluate(m, X, jacobian=True, engine="numpy")
    for eng, tol_y, tol_j in (("numba-exact", 1e-13, 1e-12), ("numba", 1e-11, 1e-8)):
        y1, J1 = evaluate(m, X, jacobian=True, engine=eng)
        assert np.abs(y1 - y0).max() <= tol_y * np.abs(y0).max(), eng
        np.testing.assert_array_equal(evaluate(m, X, engine=eng), y1)
        for p in range(m.n_param):
            assert np.abs(J1[:, p] - J0[:, p]).max() <= tol_j * np.abs(J0[:, p]).max(), (eng, m.names[p])
    # normal equations with the zero shift refined (its own column in the kernel's buffer)
    Y = y0 + 1.0
    ra = refine(m, Y, engine="numpy")
    rb = refine(m, Y, engine="numba")
    assert ra.converged.all() and rb.converged.all()
    np.testing.assert_allclose(rb.params, ra.params, rtol=1e-8, atol=1e-14)


def test_numba_engine_equals_numpy_noise_free(ph):
    """Noise-free 4-phase voxels: both engines reach the same parameters (measured
    relative difference 3e-10; the residual is rounding, so esd and Rwp are compared
    only as 'both at the noise floor')."""
    phases = [ph[n] for n in BATTERY]
    m = build_model(phases, np.linspace(1.0, 12.0, 1500), "2th_deg", LAM, PROF, background_order=4)
    X = _truth(m, np.random.default_rng(0), 16)[:8]
    Y = evaluate(m, X, engine="numpy")
    ra = refine(m, Y, engine="numpy")
    rb = refine(m, Y, engine="numba")
    assert ra.converged.all() and rb.converged.all()
    np.testing.assert_allclose(rb.params, ra.params, rtol=1e-8, atol=0)
    np.testing.assert_array_equal(np.isnan(rb.esd), np.isnan(ra.esd))
    assert np.nanmax(ra.rwp) < 1e-6 and np.nanmax(rb.rwp) < 1e-6


def test_numba_engine_equals_numpy_noisy(noisy_two_phase):
    """Noisy volume: same iterations, parameters within 1e-6 esd (measured 2e-9), esd
    to 1e-7 relative (measured 6e-11), Rwp to 1e-10 (measured 3e-13)."""
    m, X, y, sig = noisy_two_phase
    ra = refine(m, y, sigma=sig, engine="numpy")
    rb = refine(m, y, sigma=sig, engine="numba")
    np.testing.assert_array_equal(rb.n_iter, ra.n_iter)
    np.testing.assert_array_equal(rb.converged, ra.converged)
    np.testing.assert_array_equal(np.isnan(rb.esd), np.isnan(ra.esd))
    ok = np.isfinite(ra.esd)
    assert np.max(np.abs(rb.params - ra.params)[ok] / ra.esd[ok]) < 1e-6
    np.testing.assert_allclose(rb.esd[ok], ra.esd[ok], rtol=1e-7)
    np.testing.assert_allclose(rb.rwp, ra.rwp, rtol=1e-10)
    np.testing.assert_allclose(rb.chi2, ra.chi2, rtol=1e-10)


def test_engine_argument(ph):
    m = build_model([ph["Cu"]], np.linspace(2.0, 9.0, 300), "2th_deg", LAM, PROF, background_order=1)
    Y = evaluate(m, _truth(m, np.random.default_rng(2), 2, bg=(100.0, 0.0)))
    with pytest.raises(RefineError, match="engine"):
        refine(m, Y, engine="fortran")
    with pytest.raises(RefineError, match="engine"):
        evaluate(m, m.x_ref[None], engine="cuda")


@pytest.mark.gpu
def test_gpu_refine_matches_cpu_numba(noisy_two_phase):
    """cupy input runs the array code (engine 'auto'); 'numba' is refused for it; the
    GPU result matches the CPU numba engine."""
    import cupy as cp

    from tasks.refine import to_host

    m, X, y, sig = noisy_two_phase
    yg, sg = cp.asarray(y[:40]), cp.asarray(sig[:40])
    with pytest.raises(RefineError, match="engine"):
        refine(m, yg, sigma=sg, engine="numba")
    rg = to_host(refine(m, yg, sigma=sg))
    rc = refine(m, y[:40], sigma=sig[:40], engine="numba")
    ok = np.isfinite(rc.esd) & np.isfinite(rg.esd)
    assert np.median(np.abs(rg.params - rc.params)[ok] / rc.esd[ok]) < 1e-6
    np.testing.assert_allclose(rg.rwp, rc.rwp, rtol=1e-6)
