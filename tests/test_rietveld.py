"""Tests for tasks.rietveld and the shipped phase library (pipelines/phases)."""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import lsq_linear, nnls

from pipelines.spec import ProfileSpec
from tasks.rietveld import (
    Phase,
    PhaseError,
    ProfileError,
    chebyshev_background,
    fit_scales,
    load_phase,
    radial_to_two_theta,
    reference_patterns,
    reflections,
    two_theta_to_radial,
    weight_fractions,
)

ROOT = Path(__file__).resolve().parents[1]
PHASES_DIR = ROOT / "pipelines" / "phases"
REAL = ROOT.parent / "shared" / "data" / "real"
LAM_0 = 0.1746e-10  # m


def _build_module():
    spec = importlib.util.spec_from_file_location("build_phases", PHASES_DIR / "build_phases.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BUILD = _build_module()


def _phase(name: str) -> Phase:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_phase(name, PHASES_DIR / BUILD.PHASES[name]["file"])


@pytest.fixture(scope="module")
def phases():
    return {name: _phase(name) for name in BUILD.PHASES}


# ------------------------------------------------------------------------------------
# Phase library
# ------------------------------------------------------------------------------------

# Crystallographic densities (g/cm^3) from the handbook values of these solids; a wrong
# Wyckoff position or space group changes the cell contents and fails this check.
DENSITY = {"Al": 2.70, "Cu": 8.93, "Fe": 7.87, "Ni": 8.91, "NiO": 6.81, "CeO2": 7.21,
           "graphite": 2.26, "Al2O3_corundum": 3.99, "Fe3O4": 5.20, "LiCoO2": 5.05,
           "LiC6": 2.21}
FORMULA = {"Al": "Al", "Cu": "Cu", "Fe": "Fe", "Ni": "Ni", "NiO": "NiO", "CeO2": "CeO2",
           "graphite": "C", "Al2O3_corundum": "Al2O3", "Fe3O4": "Fe3O4", "LiCoO2": "LiCoO2",
           "LiC6": "LiC6"}


def test_every_shipped_cif_is_built_and_loads(phases):
    shipped = {p.name for p in PHASES_DIR.glob("*.cif")}
    built = {e["file"] for e in BUILD.PHASES.values()}
    assert shipped == built
    for name, entry in BUILD.PHASES.items():
        ph = phases[name]
        np.testing.assert_allclose(ph.lattice_parameters, entry["lattice"], rtol=1e-7, atol=1e-7)
        assert ph.formula == FORMULA[name]
        assert ph.density_g_cm3 == pytest.approx(DENSITY[name], rel=0.01), name
        assert ph.zmv == pytest.approx(ph.cell_mass_amu * ph.volume_A3, rel=1e-12)
        text = (PHASES_DIR / entry["file"]).read_text()
        assert text.startswith(f"# {name}:") and "# Sources:" in text
        # The written file equals what the build script writes now (no hand edits).
        assert text == BUILD.cif_text(name, entry)


def test_load_phase_errors(tmp_path):
    missing = tmp_path / "nope.cif"
    with pytest.raises(PhaseError, match="nope.cif.*not found"):
        load_phase("x", missing)
    bad = tmp_path / "garbage.cif"
    bad.write_text("this is not a CIF file\n")
    with pytest.raises(PhaseError, match="garbage.cif.*malformed CIF"):
        load_phase("x", bad)
    nosites = tmp_path / "cell_only.cif"
    nosites.write_text("data_x\n_cell_length_a 3.0\n_cell_length_b 3.0\n_cell_length_c 3.0\n"
                       "_cell_angle_alpha 90\n_cell_angle_beta 90\n_cell_angle_gamma 90\n")
    with pytest.raises(PhaseError, match="cell_only.cif"):
        load_phase("x", nosites)
    dummy = tmp_path / "dummy.cif"
    dummy.write_text("data_x\n_cell_length_a 3.0\n_cell_length_b 3.0\n_cell_length_c 3.0\n"
                     "_cell_angle_alpha 90\n_cell_angle_beta 90\n_cell_angle_gamma 90\n"
                     "loop_\n_atom_site_label\n_atom_site_type_symbol\n_atom_site_fract_x\n"
                     "_atom_site_fract_y\n_atom_site_fract_z\nX1 Xx 0 0 0\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(PhaseError, match="dummy.cif.*form factors"):
            load_phase("x", dummy)
    with pytest.raises(PhaseError, match="directory"):
        load_phase("x", tmp_path)


# ------------------------------------------------------------------------------------
# Reflections and reference patterns
# ------------------------------------------------------------------------------------


def _fcc_two_theta(a, lam_A, tmax):
    out = set()
    for h in range(0, 12):
        for k in range(0, h + 1):
            for l_ in range(0, k + 1):
                if h == 0 or len({h % 2, k % 2, l_ % 2}) != 1:
                    continue
                d = a / math.sqrt(h * h + k * k + l_ * l_)
                s = lam_A / (2 * d)
                if s < 1:
                    t = 2 * math.degrees(math.asin(s))
                    if t <= tmax:
                        out.add(round(t, 9))
    return np.array(sorted(out))


def test_reflections_ceo2_positions_and_unscaled_intensity(phases):
    ceo2 = phases["CeO2"]
    a = BUILD.PHASES["CeO2"]["lattice"][0]
    tth, inten = reflections(ceo2, LAM_0, 12.0)
    want = _fcc_two_theta(a, 0.1746, 12.0)
    # CeO2 (fluorite) has every fcc reflection; none is extinct at these angles
    assert tth.shape == want.shape
    np.testing.assert_allclose(tth, want, atol=1e-6)
    # scaled=False: not normalised to 100
    assert inten.max() > 1e3 and np.argmax(inten) == 0
    # |F|^2 depends on sin(th)/lambda only, so the ratio of one reflection's intensity at
    # two wavelengths is pymatgen's Lorentz-polarisation ratio (module notes).
    t2, i2 = reflections(ceo2, 0.5e-10, 60.0)
    th1, th2 = np.radians(tth[0] / 2), np.radians(t2[0] / 2)

    def lp(th):
        return (1 + np.cos(2 * th) ** 2) / (np.sin(th) ** 2 * np.cos(th))

    assert inten[0] / i2[0] == pytest.approx(lp(th1) / lp(th2), rel=1e-9)


def _peak_max(x, y, i):
    c = np.polyfit(x[i - 1:i + 2] - x[i], np.log(y[i - 1:i + 2]), 2)
    return x[i] - c[1] / (2 * c[0])


def test_reference_pattern_peak_positions_2th(phases):
    ceo2 = phases["CeO2"]
    x = np.arange(1.0, 12.0, 0.002)
    for zero in (0.0, 0.013):
        prof = ProfileSpec(W=0.0004, eta=0.0, zero_shift_deg=zero)
        ref = reference_patterns([ceo2], x, "2th_deg", LAM_0, prof)[0]
        want = _fcc_two_theta(BUILD.PHASES["CeO2"]["lattice"][0], 0.1746, 11.9) + zero
        got = []
        for t in want:
            i = int(np.argmin(np.abs(x - t)))
            i = i - 3 + int(np.argmax(ref[i - 3:i + 4]))
            got.append(_peak_max(x, ref, i))
        np.testing.assert_allclose(got, want, atol=1e-3)


def test_reference_pattern_area_and_jacobian_in_q(phases):
    al = phases["Al"]
    W, eta = 1e-4, 0.3
    prof = ProfileSpec(W=W, eta=eta)
    tth, inten = reflections(al, LAM_0, 12.0)
    t0, i0 = tth[0], inten[0]                                     # Al (111)
    h = math.sqrt(W)                                               # FWHM (deg) at U = V = 0
    q_lo, q_hi = two_theta_to_radial([t0 - 40 * h, t0 + 40 * h], "q_nm^-1", LAM_0)
    q = np.linspace(q_lo, q_hi, 8001)
    dq = q[1] - q[0]
    t = radial_to_two_theta(q, "q_nm^-1", LAM_0)
    lam_nm = LAM_0 * 1e9
    dtdq = np.degrees(2 / np.sqrt(1 - (q * lam_nm / (4 * np.pi)) ** 2) * lam_nm / (4 * np.pi))
    # density="radial": the area over q is the pymatgen intensity
    ref_r = reference_patterns([al], q, "q_nm^-1", LAM_0, prof, density="radial")[0]
    assert ref_r.sum() * dq == pytest.approx(i0, rel=0.01)
    # default (per degree 2theta, as pyFAI integrates): the area over 2theta(q) is
    ref = reference_patterns([al], q, "q_nm^-1", LAM_0, prof)[0]
    assert np.sum(ref * dtdq) * dq == pytest.approx(i0, rel=0.01)
    # point values = intensity * pseudo-Voigt(2th(q)) (* d(2th)/dq), written out independently
    u = t - t0
    g = math.sqrt(4 * math.log(2) / math.pi) / h * np.exp(-4 * math.log(2) * u**2 / h**2)
    lor = (2 / (math.pi * h)) / (1 + 4 * u**2 / h**2)
    want = i0 * (eta * lor + (1 - eta) * g)
    core = np.abs(u) < 2 * h
    np.testing.assert_allclose(ref[core], want[core], rtol=2e-3)
    np.testing.assert_allclose(ref_r[core], (want * dtdq)[core], rtol=2e-3)
    # per radial unit: q_A^-1 values are 10x the q_nm^-1 ones; per degree: identical
    ref_A = reference_patterns([al], q / 10, "q_A^-1", LAM_0, prof, density="radial")[0]
    np.testing.assert_allclose(ref_A, ref_r * 10, rtol=1e-9)
    ref_A = reference_patterns([al], q / 10, "q_A^-1", LAM_0, prof)[0]
    np.testing.assert_allclose(ref_A, ref, rtol=1e-9)


def test_reference_pattern_matches_pyfai_integration(phases):
    """A 2D image made from the 2theta reference (pyFAI calcfrom1d) and integrated in
    q_nm^-1 (pyFAI integrate1d) gives the q_nm^-1 reference (default density)."""
    from pyFAI.detectors import Detector
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    det = Detector(pixel1=172e-6, pixel2=172e-6, max_shape=(600, 600))
    ai = AzimuthalIntegrator(dist=0.35, poni1=300 * 172e-6, poni2=300 * 172e-6,
                             detector=det, wavelength=LAM_0)
    ceo2 = phases["CeO2"]
    prof = ProfileSpec(W=0.01, eta=0.5)
    tth = np.linspace(0.0, 12.0, 6000)
    ref_t = reference_patterns([ceo2], tth, "2th_deg", LAM_0, prof)[0]
    img = ai.calcfrom1d(tth, ref_t, dim1_unit="2th_deg", correctSolidAngle=True,
                        polarization_factor=None)
    res = ai.integrate1d(img, 400, unit="q_nm^-1", radial_range=(15.0, 38.0),
                         correctSolidAngle=True, polarization_factor=None,
                         method=("full", "csr", "cython"))
    ref_q = reference_patterns([ceo2], res.radial, "q_nm^-1", LAM_0, prof)[0]
    peak = ref_q > 0.2 * ref_q.max()
    ratio = res.intensity[peak] / ref_q[peak]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.01), np.median(ratio)
    assert np.abs(np.trapezoid(res.intensity, res.radial) / np.trapezoid(ref_q, res.radial)
                  - 1) < 0.01


def test_reference_pattern_errors(phases):
    al = [phases["Al"]]
    with pytest.raises(ProfileError, match="FWHM"):
        reference_patterns(al, np.linspace(1, 10, 50), "2th_deg", LAM_0,
                           {"U": 0.0, "V": -0.5, "W": 0.001, "eta": 0.5})
    with pytest.raises(ProfileError, match="increasing"):
        reference_patterns(al, np.array([1.0, 3.0, 2.0]), "2th_deg", LAM_0, ProfileSpec())
    with pytest.raises(ProfileError, match="limiting sphere"):
        reference_patterns(al, np.linspace(10, 800, 50), "q_nm^-1", LAM_0, ProfileSpec())
    with pytest.raises(ProfileError, match="unit"):
        reference_patterns(al, np.linspace(1, 10, 50), "d_A", LAM_0, ProfileSpec())
    with pytest.raises(ProfileError, match="density"):
        reference_patterns(al, np.linspace(1, 10, 50), "2th_deg", LAM_0, ProfileSpec(),
                           density="per_bin")


# ------------------------------------------------------------------------------------
# Batched NNLS
# ------------------------------------------------------------------------------------


def _reference_solution(D, y, n_phase, w=None):
    w = np.ones(len(y)) if w is None else w
    sw = np.sqrt(w)
    lb = np.r_[np.zeros(n_phase), np.full(D.shape[1] - n_phase, -np.inf)]
    return lsq_linear(D * sw[:, None], y * sw, bounds=(lb, np.inf), method="bvls",
                      tol=1e-14).x


@pytest.mark.parametrize("per_voxel_sigma", [False, True])
def test_batched_nnls_equals_scipy_random(per_voxel_sigma):
    rng = np.random.default_rng(42 + per_voxel_sigma)
    n, n_phase, order, V = 150, 6, 3, 120
    base = np.abs(rng.normal(size=(n_phase, n))) ** 2
    refs = base + 0.7 * base.mean(axis=0)                         # strongly correlated columns
    truth = np.abs(rng.normal(size=(V, n_phase)))
    truth[rng.random((V, n_phase)) < 0.5] = 0
    T = chebyshev_background(n, order)
    Y = truth @ refs + rng.normal(size=(V, order + 1)) @ T + rng.normal(scale=1.0, size=(V, n))
    sigma = rng.uniform(0.5, 2.0, size=(V, n)) if per_voxel_sigma else None
    res = fit_scales(Y.reshape(10, 12, n), refs, order, sigma=None if sigma is None
                     else sigma.reshape(10, 12, n))
    assert res.scale.shape == (10, 12, n_phase) and res.rwp.shape == (10, 12)
    assert bool(res.converged.all())
    S = res.scale.reshape(V, n_phase)
    C = res.background_coef.reshape(V, order + 1)
    D = np.concatenate([refs, T]).T
    n_active = 0
    for v in range(V):
        w = None if sigma is None else 1 / sigma[v] ** 2
        want = _reference_solution(D, Y[v], n_phase, w)
        got = np.r_[S[v], C[v]]
        assert np.max(np.abs(got - want)) <= 1e-6 * np.max(np.abs(want)), v
        n_active += int(np.sum(want[:n_phase] == 0))
    assert n_active > V // 2                                      # constraints were active
    assert np.all(S >= 0)
    # scipy.optimize.nnls on the problem with the background projected out (shared weights)
    if sigma is None:
        Qb, _ = np.linalg.qr(T.T)
        Pm = np.eye(n) - Qb @ Qb.T
        for v in range(0, V, 7):
            x, _ = nnls(Pm @ refs.T, Pm @ Y[v], maxiter=1000)
            assert np.max(np.abs(x - S[v])) <= 1e-6 * max(np.max(np.abs(x)), 1e-300)


def test_fit_scales_model_rwp_and_mask():
    rng = np.random.default_rng(3)
    n, V = 80, 30
    refs = np.abs(rng.normal(size=(3, n)))
    Y = rng.random((V, n)) * 5 + 1
    mask = np.zeros(V, bool)
    mask[[2, 5]] = True
    Y[2] = np.nan                                                 # masked voxels may be NaN
    res = fit_scales(Y, refs, 2, mask=mask)
    assert np.all(np.isnan(res.scale[mask])) and np.all(np.isnan(res.rwp[mask]))
    assert np.all(np.isnan(res.model[mask]))
    ok = ~mask
    Yk = Y[ok]
    np.testing.assert_allclose(res.model[ok], res.scale[ok] @ refs + res.background[ok],
                               rtol=1e-10)
    rwp = np.sqrt(np.sum((Yk - res.model[ok]) ** 2, 1) / np.sum(Yk**2, 1))
    np.testing.assert_allclose(res.rwp[ok], rwp, rtol=1e-10)
    # background-only fit (no phases) and the errors
    res0 = fit_scales(Yk, np.zeros((0, n)), 2)
    assert np.all(res0.rwp >= res.rwp[ok] - 1e-12)
    with pytest.raises(ValueError, match="NaN"):
        fit_scales(Y, refs, 2)
    with pytest.raises(ValueError, match=r"\(\.\.\., 80\)"):
        fit_scales(Y[:, :50], refs, 2, mask=mask)
    with pytest.raises(ValueError, match="sigma"):
        fit_scales(Yk, refs, 2, sigma=np.zeros(n))


def test_phase_without_reflections_in_range(phases):
    al, cu = phases["Al"], phases["Cu"]
    t, i = reflections(al, LAM_0, 2.0)                            # Al (111) is at 4.28 deg
    assert t.size == 0 and i.size == 0
    x = np.linspace(3.0, 5.0, 400)
    refs = reference_patterns([al, cu], x, "2th_deg", LAM_0, ProfileSpec())
    refs[1] = 0.0                                                 # a phase with nothing in range
    y = 3.0 * refs[0] + 1.0 + np.random.default_rng(0).normal(scale=1e-3, size=x.size)
    for sigma in (None, np.full((2, x.size), 0.01)):
        res = fit_scales(np.stack([y, y]), refs, 2, sigma=sigma)
        np.testing.assert_allclose(res.scale[:, 0], 3.0, rtol=1e-4)
        assert np.all(res.scale[:, 1] == 0) and np.all(np.isnan(res.scale_esd[:, 1]))
        assert np.all(res.scale_esd[:, 0] > 0)


# ------------------------------------------------------------------------------------
# Synthetic mixtures: recovery of scales and Hill & Howard weight fractions
# ------------------------------------------------------------------------------------

BATTERY = ["LiCoO2", "graphite", "Al", "Cu"]


def _mixtures(phases, rng, V, q):
    ph = [phases[n] for n in BATTERY]
    refs = reference_patterns(ph, q, "q_nm^-1", LAM_0, ProfileSpec(W=0.003, eta=0.4))
    zmv = np.array([p.zmv for p in ph])
    mass = rng.uniform(0.1, 1.0, size=(V, len(ph)))
    mass[rng.random(mass.shape) < 0.35] = 0                       # absent phases
    empty = ~np.any(mass > 0, axis=1)
    mass[empty, rng.integers(0, len(ph), int(empty.sum()))] = 0.5  # every voxel holds a phase
    mass[0] = 0
    mass[0, 1] = 1.0                                              # a pure phase
    t = 2 * (q - q[0]) / (q[-1] - q[0]) - 1
    bkg = 20 + 5 * t - 3 * t**2 + 0.5 * t**3                      # smooth, degree 3
    Y = (mass / zmv) @ refs + rng.uniform(0.5, 2.0, size=(V, 1)) * bkg
    return ph, refs, zmv, mass, Y


def test_synthetic_mixture_noise_free(phases):
    rng = np.random.default_rng(7)
    q = np.linspace(8.0, 60.0, 1500)
    ph, refs, zmv, mass, Y = _mixtures(phases, rng, 64, q)
    res = fit_scales(Y.reshape(4, 16, -1), refs, 4, radial=q)
    S = res.scale.reshape(64, -1)
    true_S = mass / zmv
    np.testing.assert_allclose(S, true_S, rtol=1e-6, atol=1e-6 * true_S.max())
    wf = weight_fractions(S, ph)
    true_wf = mass / mass.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(wf, true_wf, atol=1e-6)
    assert np.nanmax(res.rwp) < 1e-6


def test_synthetic_mixture_poisson_noise_and_esd(phases):
    rng = np.random.default_rng(11)
    q = np.linspace(8.0, 60.0, 1500)
    ph, refs, zmv, mass, Y = _mixtures(phases, rng, 64, q)
    counts = 2000.0 / Y.max()                                     # ~2000 counts at the top
    lam = Y * counts
    Yn = rng.poisson(lam).astype(np.float64)
    # two passes: unit weights, then Poisson weights from the first model (weights from
    # the observed counts bias the scales low where counts are low; see fit_scales)
    res0 = fit_scales(Yn, refs, 4, radial=q)
    res = fit_scales(Yn, refs, 4, sigma=np.sqrt(np.maximum(res0.model, 1)), radial=q)
    true_wf = mass / mass.sum(axis=1, keepdims=True)
    for r in (res0, res):                                         # measured max 0.016, 0.014
        err = np.abs(weight_fractions(r.scale, ph) - true_wf)
        assert err.max() < 0.02, err.max()
    assert np.median(res.chi2) == pytest.approx(1.0, abs=0.1)
    # honest error bars: one mixture, 400 noise realisations, weights from the expected
    # counts (shared sigma): the spread of the fitted scales matches the esd
    m1 = np.array([0.4, 0.3, 0.2, 0.1])
    lam1 = ((m1 / zmv) @ refs + 15.0) * counts
    Y1 = rng.poisson(np.broadcast_to(lam1, (400, q.size))).astype(np.float64)
    r1 = fit_scales(Y1, refs, 4, sigma=np.sqrt(lam1), radial=q)
    spread = r1.scale.std(axis=0)
    esd = r1.scale_esd.mean(axis=0)
    np.testing.assert_allclose(spread / esd, 1.0, atol=0.12)
    np.testing.assert_allclose(r1.scale.mean(axis=0), m1 / zmv * counts, rtol=0.01)
    assert np.mean(r1.chi2) == pytest.approx(1.0, abs=0.02)



@pytest.mark.parametrize("sigma_shape", ["shared", "per_voxel"])
def test_fit_scales_esd_scaled_by_chi2_when_weights_understate_noise(phases, sigma_shape):
    """Weights that state the noise 5x too small (sigma_w = sqrt(expected counts) / 5,
    Poisson noise 5x sigma_w): one mixture, 400 noise realisations. chi2 ~ 25, and the
    esd, scaled by sqrt(chi2), still matches the spread of the fitted scales (measured
    0.92-1.01) and covers the truth: >= 95 % within 3 esd (measured 0.995-1.0), median
    |err| / esd near the Gaussian 0.674 (measured 0.64-0.69). Without the chi2 factor
    the esd is 5x too small (spread / esd ~ 5). Both the shared (n,) sigma path (one
    factorisation) and the per-voxel (V, n) path."""
    rng = np.random.default_rng(12)
    q = np.linspace(8.0, 60.0, 1500)
    ph = [phases[n] for n in BATTERY]
    refs = reference_patterns(ph, q, "q_nm^-1", LAM_0, ProfileSpec(W=0.003, eta=0.4))
    zmv = np.array([p.zmv for p in ph])
    m1 = np.array([0.4, 0.3, 0.2, 0.1])
    counts = 2000.0 / ((m1 / zmv) @ refs + 15.0).max()          # 2,000 counts at the top
    lam1 = ((m1 / zmv) @ refs + 15.0) * counts
    Y1 = rng.poisson(np.broadcast_to(lam1, (400, q.size))).astype(np.float64)
    sigma_w = np.sqrt(lam1) / 5
    if sigma_shape == "per_voxel":
        sigma_w = np.broadcast_to(sigma_w, Y1.shape).copy()
    r = fit_scales(Y1, refs, 4, sigma=sigma_w, radial=q)
    truth = m1 / zmv * counts
    assert np.mean(r.chi2) == pytest.approx(25.0, rel=0.03)
    np.testing.assert_allclose(r.scale.std(axis=0) / r.scale_esd.mean(axis=0), 1.0, atol=0.12)
    z = np.abs(r.scale - truth) / r.scale_esd
    assert np.all(np.mean(z < 3, axis=0) >= 0.95), np.mean(z < 3, axis=0)
    med = np.median(z, axis=0)
    assert np.all((med > 0.45) & (med < 0.9)), med

def test_weight_fractions(phases):
    ph = [phases["Al"], phases["Cu"]]
    S = np.array([[1.0 / ph[0].zmv, 3.0 / ph[1].zmv], [0.0, 0.0], [np.nan, 1.0]])
    wf = weight_fractions(S, ph)
    np.testing.assert_allclose(wf[0], [0.25, 0.75], rtol=1e-12)
    assert np.all(np.isnan(wf[1])) and np.all(np.isnan(wf[2]))
    np.testing.assert_allclose(weight_fractions(S[:1], [ph[0].zmv, ph[1].zmv]), wf[:1])
    with pytest.raises(ValueError, match="phases"):
        weight_fractions(S, ph[:1])


# ------------------------------------------------------------------------------------
# Real data (nDTomo summed patterns; ../shared/data/real/ndtomo_patterns)
# ------------------------------------------------------------------------------------

PATTERNS = REAL / "ndtomo_patterns"
# The patterns' wavelength, measured from the data: CeO2 (SRM 674b cell) and the Fe, Cu,
# Al reflections of the cell all index at 0.1198 A (103.5 keV), not at the 0.1746 A of
# the CeO2 calibration frame in ndtomo_ceo2_pilatus2m (see the tests below).
LAM_PATTERNS = 0.1198e-10
BATTERY_PROFILE = ProfileSpec(W=0.001, eta=0.3)                  # FWHM 0.032 deg


def _xy(name):
    path = PATTERNS / name
    if not path.is_file():
        pytest.skip(f"real data not available: {path} (see shared/data/real/README.md)")
    d = np.loadtxt(path)
    return d[:, 0], d[:, 1]


def _best_wavelength(phase_list, x, y, lams, profile, order=6):
    rwp = []
    for lam in lams:
        refs = reference_patterns(phase_list, x, "2th_deg", lam * 1e-10, profile)
        rwp.append(float(fit_scales(y, refs, order, radial=x).rwp))
    return lams[int(np.argmin(rwp))], np.array(rwp)


@pytest.mark.real
def test_real_ceo2_pattern_wavelength(phases):
    x, y = _xy("CeO2_nobkg.xy")
    prof = ProfileSpec(W=0.002, eta=0.3)
    coarse = np.round(np.arange(0.100, 0.2001, 0.005), 5)
    lam, rwp = _best_wavelength([phases["CeO2"]], x, y, coarse, prof)
    assert abs(lam - 0.1198) <= 0.0025
    fine = np.round(np.arange(0.1192, 0.12041, 0.0001), 5)
    lam_f, rwp_f = _best_wavelength([phases["CeO2"]], x, y, fine,
                                    ProfileSpec(W=0.0005, eta=0.2))
    assert abs(lam_f - 0.1198) <= 0.0002, lam_f
    assert rwp_f.min() < 0.35 and rwp.max() > 0.9


@pytest.mark.real
def test_real_battery_pattern_fit(phases):
    x, y = _xy("Pristine_summed.xy")
    names = ["LiCoO2", "graphite", "Al", "Cu", "Fe"]
    ph = [phases[n] for n in names]
    bkg_only = float(fit_scales(y, np.zeros((0, x.size)), 6, radial=x).rwp)
    refs = reference_patterns(ph, x, "2th_deg", LAM_PATTERNS, BATTERY_PROFILE)
    res = fit_scales(y, refs, 6, radial=x)
    rwp = float(res.rwp)
    assert rwp < 0.5 * bkg_only, (rwp, bkg_only)                  # measured 0.384 vs 0.948
    # the steel can and both current collectors are found above their esd (unit weights;
    # the esd includes the misfit of the cell's shifted cathode/anode peaks through chi2)
    # measured: Fe 89 esd, Cu 17 esd, Al 2.8 esd
    for n, k in (("Fe", 20), ("Cu", 10), ("Al", 2)):
        i = names.index(n)
        assert res.scale[i] > k * res.scale_esd[i], (n, res.scale[i], res.scale_esd[i])
    # the metals alone locate the wavelength
    lams = np.round(np.arange(0.1190, 0.12061, 0.0002), 5)
    lam, _ = _best_wavelength([phases["Al"], phases["Cu"], phases["Fe"]], x, y, lams,
                              BATTERY_PROFILE)
    assert abs(lam - 0.1198) <= 0.0002
    # at 0.1746 A nothing indexes: the fit is no better than the background alone
    refs_bad = reference_patterns(ph, x, "2th_deg", LAM_0, BATTERY_PROFILE)
    assert float(fit_scales(y, refs_bad, 6, radial=x).rwp) > 0.97 * bkg_only


def test_load_phase_parses_a_cif_once_until_the_file_changes(tmp_path, monkeypatch):
    """A run checks its phases before work starts and loads them again for mapping: the
    second load reuses the parsed structure; a rewritten file is parsed again."""
    import os

    import pymatgen.io.cif as pcif

    from pipelines.spec import PHASES_DIR
    from tasks.rietveld import load_phase

    calls = []

    class Counting(pcif.CifParser):
        def __init__(self, *a, **k):
            calls.append(a[0])
            super().__init__(*a, **k)

    monkeypatch.setattr(pcif, "CifParser", Counting)
    p = tmp_path / "phase.cif"
    p.write_text((PHASES_DIR / "NiO.cif").read_text())
    a, b = load_phase("NiO", p), load_phase("NiO", p)
    assert len(calls) == 1 and a is not b and a._cache is not b._cache
    assert (a.lattice_parameters, a.zmv, a.formula) == (b.lattice_parameters, b.zmv, b.formula)
    assert a.formula == "NiO" and abs(a.a - 4.177) < 0.01
    mtime = p.stat().st_mtime_ns
    p.write_text((PHASES_DIR / "Ni.cif").read_text())
    os.utime(p, ns=(mtime + 10**9, mtime + 10**9))
    c = load_phase("Ni", p)
    assert len(calls) == 2 and c.formula == "Ni" and abs(c.a - 3.524) < 0.01
