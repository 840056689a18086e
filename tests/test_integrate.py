"""Tests of tasks.integrate against pyFAI and against real calibrant data.

References: pyFAI ``integrate1d_ng`` / ``sigma_clip_ng`` / ``medfilt1d_ng`` with the same
geometry and corrections; CeO2 (fluorite, a = 5.4111 A) reflection positions; the 1-D
patterns Dioptas wrote for the same frames.
"""

from __future__ import annotations

import os
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from scipy.optimize import curve_fit

from pipelines.spec import InputSpec, PipelineSpec
from tasks.ingest import IngestError, Scan, open_scan
from tasks.integrate import IntegrationError, RadialIntegrator, integrate_scan, integrator_from_spec

REAL = Path(__file__).resolve().parents[1].parent / "shared/data/real"
P2M = REAL / "ndtomo_ceo2_pilatus2m"
P1M = REAL / "dioptas_ceo2_pilatus1m"
MAP = REAL / "dioptas_fe3o4c_map"
MAP_IDS = [1, 2, 3, 6, 7, 8, 11, 12, 13]  # 3 x 3 raster, rows of the 5-wide map
CEO2_A = 5.4111  # Angstrom
CEO2_HKL = [(1, 1, 1), (2, 0, 0), (2, 2, 0), (3, 1, 1), (2, 2, 2), (4, 0, 0), (3, 3, 1), (4, 2, 0)]

pytestmark = pytest.mark.real


def _need(*paths):
    for p in paths:
        if not Path(p).exists():
            pytest.skip(f"real data not found: {p} (expected ../shared/data/real beside the repo)")


def _fabio(path):
    import fabio

    with fabio.open(str(path)) as img:
        return np.asarray(img.data)


def _rel(a, b):
    """Max relative difference over bins where the reference is non-zero."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    g = b != 0
    assert g.sum() > 0.9 * b.size
    return float(np.max(np.abs(a[g] - b[g]) / np.abs(b[g])))


def _clip_agrees(a, b):
    """Sigma-clip agreement with pyFAI: a pixel exactly at the clipping limit may fall either
    way in double precision, so allow 1 % of bins to differ by up to 1 %; the rest < 1e-4."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    g = b != 0
    r = np.abs(a[g] - b[g]) / np.abs(b[g])
    return r.max() < 1e-2 and np.mean(r > 1e-4) < 0.01


def _ceo2_two_theta(wavelength_m):
    lam = wavelength_m * 1e10
    return np.array([2 * np.degrees(np.arcsin(lam * np.sqrt(h * h + k * k + l * l) / (2 * CEO2_A)))
                     for h, k, l in CEO2_HKL])


def _peak_centre(x, y, guess, half):
    """Centre of a Gaussian + linear background fitted around the maximum near ``guess``."""
    sel = (x > guess - half) & (x < guess + half)
    c0 = x[sel][np.argmax(y[sel])]
    sel = (x > c0 - half) & (x < c0 + half)
    xs, ys = x[sel], y[sel]

    def g(t, a, c, w, b0, b1):
        return a * np.exp(-0.5 * ((t - c) / w) ** 2) + b0 + b1 * (t - c0)

    p, _ = curve_fit(g, xs, ys, p0=[ys.max() - ys.min(), c0, half / 8, ys.min(), 0.0])
    return p[1]


@pytest.fixture(scope="module")
def frame2m():
    _need(P2M / "CeO2.cbf", P2M / "CeO2.poni", P2M / "mask.edf")
    return _fabio(P2M / "CeO2.cbf")


@pytest.fixture(scope="module")
def ri_q(frame2m):
    return RadialIntegrator(P2M / "CeO2.poni", npt=1000, unit="q_nm^-1", mask=P2M / "mask.edf")


@pytest.fixture(scope="module")
def ri_2th(frame2m):
    return RadialIntegrator(P2M / "CeO2.poni", npt=4000, unit="2th_deg", mask=P2M / "mask.edf")


@pytest.fixture(scope="module")
def hot_frame(frame2m, ri_q):
    """The real frame with 400 single-crystal-like 2x2 spots of +5000 counts."""
    rng = np.random.default_rng(1)
    hot = frame2m.copy()
    ok = ~ri_q.mask
    ys, xs = np.nonzero(ok[:-1, :-1] & ok[1:, 1:] & ok[1:, :-1] & ok[:-1, 1:])
    k = rng.choice(len(ys), 400, replace=False)
    for dy in (0, 1):
        for dx in (0, 1):
            hot[ys[k] + dy, xs[k] + dx] += 5000
    return hot


# ------------------------------------------------------------------------------ mean vs pyFAI
@pytest.mark.parametrize("which", ["ri_q", "ri_2th"])
def test_equals_pyfai_integrate1d_ng(which, frame2m, request):
    ri = request.getfixturevalue(which)
    # three different frames in one batch: the frame, a scaled copy, and a shifted copy whose
    # dead (-1/-2) gap pixels now fall outside the mask (masked frame by frame as pyFAI does)
    shifted = np.roll(frame2m, 9, axis=1)
    assert ((shifted < 0) & ~ri.mask).sum() > 1000
    frames = np.stack([frame2m, frame2m * 3 // 2 + 1, shifted])
    monitor = np.array([1.0, 2.5, 0.7])
    intensity, sigma = ri.integrate(frames, monitor)
    assert intensity.dtype == np.float32 and intensity.shape == (3, ri.npt)
    for k in range(3):
        ref = ri.reference(frames[k], monitor=monitor[k])
        assert ref.method.split_lower == "bbox" and ref.method.algo_lower == "csr"
        np.testing.assert_allclose(ri.radial, ref.radial, rtol=1e-12)
        assert _rel(intensity[k], ref.intensity) < 1e-4
        assert _rel(sigma[k], ref.sigma) < 1e-4
    # batching changes nothing
    i1, s1 = ri.integrate(frames[1], monitor[1:2])
    np.testing.assert_allclose(i1[0], intensity[1], rtol=1e-6)


def test_threaded_cpu_kernel_shares_a_batch(ri_q, frame2m):
    """The CPU kernel (tasks/_integrate_nb.py) gives the same numbers on 1 and on 4 threads
    (pixel ranges of one shared batch, per-thread sums added at the end), equals pyFAI, and
    equals the previous scipy path; float frames with NaN pixels are masked frame by frame
    (the NaN's c * omega taken off the normalisation, as pyFAI does)."""
    shifted = np.roll(frame2m, 9, axis=1)
    nan = frame2m.astype(np.float32)
    nan[500:520, 300:900] = np.nan
    for frames in (np.stack([frame2m, shifted, frame2m * 2]), np.stack([nan, nan * 0.5])):
        out = {}
        for threads in (1, 4):
            ri_q.threads = threads
            out[threads] = ri_q.integrate(frames)
        ri_q.threads = os.cpu_count() or 1
        np.testing.assert_array_equal(out[1][0], out[4][0])
        np.testing.assert_array_equal(out[1][1], out[4][1])
        sc = ri_q.integrate(frames, engine="scipy")
        assert _rel(out[4][0][0], sc[0][0]) < 1e-5 and _rel(out[4][1][0], sc[1][0]) < 1e-5
        for k in range(frames.shape[0]):
            ref = ri_q.reference(frames[k])
            assert _rel(out[4][0][k], ref.intensity) < 1e-4
            assert _rel(out[4][1][k], ref.sigma) < 1e-4
    with pytest.raises(IntegrationError, match="engine"):
        ri_q.integrate(frame2m, engine="torch")


def test_corrections_dark_flat_no_polarisation(frame2m):
    rng = np.random.default_rng(5)
    shape = frame2m.shape
    dark = (2.0 + rng.random(shape)).astype(np.float32)
    flat = rng.uniform(0.8, 1.2, shape).astype(np.float32)
    flat[100:110, 200:300] = 0  # zero flat -> masked
    ri = RadialIntegrator(P2M / "CeO2.poni", npt=600, unit="q_A^-1", mask=P2M / "mask.edf",
                          dark=dark, flat=flat, polarization_factor=None, solid_angle=False)
    assert ri.mask[105, 250]
    frames = np.stack([frame2m, frame2m + 7])
    intensity, sigma = ri.integrate(frames)
    for k in range(2):
        ref = ri.reference(frames[k])
        assert _rel(intensity[k], ref.intensity) < 1e-4
        assert _rel(sigma[k], ref.sigma) < 1e-4
    # the corrections matter: without them the result differs
    ri0 = RadialIntegrator(P2M / "CeO2.poni", npt=600, unit="q_A^-1", mask=P2M / "mask.edf")
    assert _rel(ri0.integrate(frame2m)[0][0], intensity[0]) > 1e-2


# ------------------------------------------------------------------------------ peak positions
def test_ceo2_peaks_pilatus2m(ri_2th, frame2m):
    intensity, _ = ri_2th.integrate(frame2m)
    expected = _ceo2_two_theta(ri_2th.wavelength_m)
    found = np.array([_peak_centre(ri_2th.radial, intensity[0], e, 0.08) for e in expected])
    np.testing.assert_array_less(np.abs(found - expected), 0.01)


def test_ceo2_peaks_dioptas_pilatus1m():
    _need(P1M / "CeO2_Pilatus1M.tif", P1M / "CeO2_Pilatus1M.poni", P1M / "CeO2_Pilatus1M.xy")
    img = _fabio(P1M / "CeO2_Pilatus1M.tif")
    # Dioptas flips images up-down on loading: its PONI describes np.flipud(frame)
    flipped = np.ascontiguousarray(np.flipud(img))
    ri = RadialIntegrator(P1M / "CeO2_Pilatus1M.poni", npt=3000, unit="2th_deg",
                          mask=flipped < 0, shape=img.shape)
    intensity, _ = ri.integrate(np.stack([flipped, img]))
    expected = _ceo2_two_theta(ri.wavelength_m)
    xy = np.loadtxt(P1M / "CeO2_Pilatus1M.xy")
    ours = np.array([_peak_centre(ri.radial, intensity[0], e, 0.15) for e in expected])
    dioptas = np.array([_peak_centre(xy[:, 0], xy[:, 1], e, 0.15) for e in expected])
    np.testing.assert_array_less(np.abs(ours - expected), 0.01)
    np.testing.assert_array_less(np.abs(ours - dioptas), 0.01)
    # without the flip the geometry is wrong (maxima off by > 0.03 deg): the flip is real
    win = [(ri.radial > e - 0.3) & (ri.radial < e + 0.3) for e in expected]
    unflipped = np.array([ri.radial[w][np.argmax(intensity[1][w])] for w in win])
    assert np.median(np.abs(unflipped - expected)) > 0.03


# ------------------------------------------------------------------------------ image series scan
@pytest.fixture(scope="module")
def fe3o4c_table(tmp_path_factory):
    files = [MAP / f"Fe3O4C_M1_map_{i}_P1_E1_001.tif" for i in MAP_IDS]
    _need(MAP / "Fe3O4C_map.poni", *files)
    d = tmp_path_factory.mktemp("map")
    rows = ["file,y,x"]
    for k, f in enumerate(files):
        rows.append(f"{os.path.relpath(f, d)},{(k // 3) * 0.05},{(k % 3) * 0.05}")
    table = d / "map.csv"
    table.write_text("\n".join(rows) + "\n")
    return table


def test_fe3o4c_map_series_equals_pyfai(fe3o4c_table):
    spec = PipelineSpec(calibration={"poni": str(MAP / "Fe3O4C_map.poni"), "polarization_factor": 0.99},
                        integration={"unit": "2th_deg", "npt": 1500, "batch_frames": 4})
    scan = open_scan(fe3o4c_table, spec.input, poni_shape=(1043, 981))
    assert scan.kind == "map" and scan.frames.shape == (9, 1043, 981)
    g = scan.grid()
    assert g.shape == (1, 3, 3)
    np.testing.assert_array_equal(g.index[0], np.arange(9).reshape(3, 3))
    integ = integrator_from_spec(spec, shape=scan.frame_shape)
    calls = []
    radial, patterns, sigma = integrate_scan(scan, spec, progress=lambda d, t: calls.append((d, t)),
                                             integrator=integ)
    assert calls == [(4, 9), (8, 9), (9, 9)]
    assert patterns.shape == (9, 1500) and patterns.dtype == np.float32
    # a memory cap shrinks the batches, not the result
    calls2 = []
    frame_bytes = 1043 * 981 * scan.frames.dtype.itemsize
    _, patterns2, _ = integrate_scan(scan, spec, progress=lambda d, t: calls2.append(d),
                                     integrator=integ, max_batch_bytes=3 * frame_bytes)
    assert calls2 == [3, 6, 9]
    np.testing.assert_array_equal(patterns2, patterns)
    np.testing.assert_allclose(radial, integ.radial)
    n_dummy = 0
    for k, i in enumerate(MAP_IDS):
        frame = _fabio(MAP / f"Fe3O4C_M1_map_{i}_P1_E1_001.tif")
        n_dummy += int(((frame < 0) & ~integ.mask).sum())
        ref = integ.reference(frame)
        assert _rel(patterns[k], ref.intensity) < 1e-4
        assert _rel(sigma[k], ref.sigma) < 1e-4
    assert n_dummy > 0  # dead pixels outside the detector mask were masked frame by frame
    # physics: against the pattern Dioptas wrote (with its up-down flip; its corrections
    # differ by a smooth factor, so compare shapes)
    frame = np.ascontiguousarray(np.flipud(_fabio(MAP / "Fe3O4C_M1_map_7_P1_E1_001.tif")))
    xy = np.loadtxt(MAP / "xy" / "Fe3O4C_M1_map_7_P1_E1_001.xy")
    mine = np.interp(xy[:, 0], integ.radial, integ.integrate(frame)[0][0])
    assert np.corrcoef(mine, xy[:, 1])[0, 1] > 0.98


def test_integrate_scan_methods_and_errors(fe3o4c_table):
    spec = PipelineSpec(calibration={"poni": str(MAP / "Fe3O4C_map.poni")},
                        integration={"unit": "q_nm^-1", "npt": 800, "method": "sigma_clip",
                                     "sigma_clip_threshold": 3.0, "batch_frames": 5})
    scan = open_scan(fe3o4c_table, InputSpec())
    scan.monitor = np.linspace(1.0, 2.0, 9)
    integ = integrator_from_spec(spec, shape=scan.frame_shape)
    radial, patterns, sigma = integrate_scan(scan, spec, integrator=integ)
    np.testing.assert_allclose(radial, integ.radial_clip)
    for k in (0, 8):
        frame = _fabio(MAP / f"Fe3O4C_M1_map_{MAP_IDS[k]}_P1_E1_001.tif")
        ref = integ.reference_sigma_clip(frame, thres=3.0, monitor=scan.monitor[k])
        assert _clip_agrees(patterns[k], ref.intensity)
        assert _clip_agrees(sigma[k], ref.sigma)
    # frames with a negative (non-dummy) count outside the mask are refused, named
    arr = np.asarray(scan.frames[:3].compute()).copy()
    ok = np.argwhere(~integ.mask)[1000]
    arr[2, ok[0], ok[1]] = -7
    bad = Scan(kind="frames", source="mem.h5", frames=da.from_array(arr, chunks=(1,) + arr.shape[1:]),
               angle=np.zeros(3), translation=np.arange(3.0), frames_dataset="/entry/data")
    with pytest.raises(IngestError, match=r"mem\.h5: /entry/data: frame 2: negative value -7"):
        integrate_scan(bad, spec, integrator=integ)
    sino = Scan(kind="sinogram", source="s.h5", sinogram=da.zeros((2, 3, 1)))
    with pytest.raises(IntegrationError, match="s.h5.*no frames"):
        integrate_scan(sino, spec)


# ------------------------------------------------------------------------------ sigma clip
def test_sigma_clip_equals_pyfai_and_removes_spots(ri_q, frame2m, hot_frame):
    clean_mean, _ = ri_q.integrate(frame2m)
    hot_mean, _ = ri_q.integrate(hot_frame)
    clip, clip_s = ri_q.integrate_sigma_clip(np.stack([frame2m, hot_frame]), thres=4, max_iter=5)
    for k, fr in enumerate((frame2m, hot_frame)):
        ref = ri_q.reference_sigma_clip(fr, thres=4, max_iter=5)
        np.testing.assert_allclose(ri_q.radial_clip, ref.radial, rtol=1e-12)
        assert _clip_agrees(clip[k], ref.intensity)
        assert _clip_agrees(clip_s[k], ref.sigma)
    g = (clean_mean[0] > 0) & (clip[0] > 0)
    mean_dev = np.abs(hot_mean[0] - clean_mean[0])[g] / clean_mean[0][g]
    clip_dev = np.abs(clip[1] - clip[0])[g] / clip[0][g]
    assert mean_dev.max() > 0.1 and (mean_dev > 0.01).sum() > 100  # spots spoil the mean
    assert np.median(clip_dev) < 1e-4 and (clip_dev > 0.01).sum() < 0.1 * (mean_dev > 0.01).sum()


def test_threaded_sigma_clip_equals_the_blocked_path(ri_q, frame2m, hot_frame):
    """The threaded CPU sigma clip (bins shared among threads, tasks/_integrate_nb.py) gives
    the same numbers on 1 and 3 threads and equals the previous cache-blocked path, for a
    frame with spots and one with NaN pixels, both error models."""
    nan = hot_frame.astype(np.float32)
    nan[600:640, 200:1200] = np.nan
    az = RadialIntegrator(P2M / "CeO2.poni", npt=1000, unit="q_nm^-1", mask=P2M / "mask.edf",
                          error_model="none")
    for ri in (ri_q, az):
        for frames in (np.stack([frame2m, hot_frame]), nan[None]):
            got = {}
            for threads in (1, 3):
                ri.threads = threads
                got[threads] = ri.integrate_sigma_clip(frames, thres=4, max_iter=5)
            ri.threads = os.cpu_count() or 1
            ref = ri.integrate_sigma_clip(frames, thres=4, max_iter=5, engine="blocks")
            for k in range(frames.shape[0]):
                np.testing.assert_array_equal(got[1][0][k], got[3][0][k])
                assert _clip_agrees(got[3][0][k], ref[0][k]) and _clip_agrees(got[3][1][k], ref[1][k])


def test_sigma_clip_azimuthal_model(frame2m, hot_frame):
    ri = RadialIntegrator(P2M / "CeO2.poni", npt=700, unit="2th_deg", mask=P2M / "mask.edf",
                          split="no", error_model="none")
    clip, _ = ri.integrate_sigma_clip(np.stack([frame2m, hot_frame]), thres=4, max_iter=5,
                                      monitor=[1.0, 1.0])
    for k, fr in enumerate((frame2m, hot_frame)):
        ref = ri.reference_sigma_clip(fr, thres=4, max_iter=5)
        # pyFAI accumulates the ring variance with a one-pass approximation; ours is two-pass
        assert _rel(clip[k], ref.intensity) < 1e-2
    g = clip[0] > 0
    assert np.max(np.abs(clip[1] - clip[0])[g] / clip[0][g]) < 0.01  # every spot removed


def test_trimmed_mean(ri_q, frame2m, hot_frame):
    t, ts = ri_q.integrate_trimmed_mean(np.stack([frame2m, hot_frame]), quantiles=(0.0, 0.9))
    ref = ri_q.reference_trimmed_mean(hot_frame, quantiles=(0.0, 0.9))
    assert _rel(t[1], ref.intensity) < 1e-6
    clean_mean, _ = ri_q.integrate(frame2m)
    hot_mean, _ = ri_q.integrate(hot_frame)
    g = (t[0] > 0) & (clean_mean[0] > 0)
    trim_dev = np.median(np.abs(t[1] - t[0])[g] / t[0][g])
    mean_dev = np.median(np.abs(hot_mean[0] - clean_mean[0])[g] / clean_mean[0][g])
    assert trim_dev < 0.3 * mean_dev


# ------------------------------------------------------------------------------ errors
def test_errors_named(tmp_path, frame2m, ri_q):
    with pytest.raises(IntegrationError, match=r"nope\.poni: PONI file does not exist"):
        RadialIntegrator(tmp_path / "nope.poni", npt=100)
    with pytest.raises(IntegrationError, match=r"mask array: mask has shape \(3, 3\); expected the detector shape \(1679, 1475\)"):
        RadialIntegrator(P2M / "CeO2.poni", npt=100, mask=np.zeros((3, 3), bool))
    with pytest.raises(IntegrationError, match="shape"):
        RadialIntegrator(P2M / "CeO2.poni", npt=100, shape=(100, 100))
    with pytest.raises(IntegrationError, match="unit"):
        RadialIntegrator(P2M / "CeO2.poni", npt=100, unit="r_mm")
    with pytest.raises(IntegrationError, match=r"frames have shape \(5, 5\)"):
        ri_q.integrate(np.zeros((5, 5)))
    with pytest.raises(IntegrationError, match="monitor has 3 values; expected one per frame"):
        ri_q.integrate(frame2m[None], monitor=[1, 2, 3])
    with pytest.raises(IntegrationError, match="monitor values must be finite and > 0"):
        ri_q.integrate(frame2m[None], monitor=[0.0])
    with pytest.raises(IntegrationError, match="calibration.poni"):
        integrator_from_spec(PipelineSpec(), shape=(10, 10))


@pytest.mark.gpu
def test_gpu_matches_cpu(ri_q, frame2m):
    cp = pytest.importorskip("cupy", reason="needs cupy and an NVIDIA GPU")
    frames = np.stack([frame2m, np.roll(frame2m, 9, axis=1)])
    i_cpu, s_cpu = ri_q.integrate(frames)
    i_gpu, s_gpu = ri_q.integrate(cp.asarray(frames))
    assert _rel(cp.asnumpy(i_gpu)[1], i_cpu[1]) < 1e-5
    assert _rel(cp.asnumpy(s_gpu)[1], s_cpu[1]) < 1e-5


# ------------------------------------------------- clipping filters, array-module (GPU) path
def test_array_engine_sigma_clip_equals_cpu_path(ri_q, frame2m, hot_frame):
    """The arithmetic the GPU runs (prefix-sum segments, gathers), here on numpy, equals the
    cache-blocked CPU path and pyFAI ``sigma_clip_ng`` (both error models, dark, monitor)."""
    frames = np.stack([frame2m, hot_frame])
    cpu, cpu_s = ri_q.integrate_sigma_clip(frames, thres=4, max_iter=5, monitor=[2.0, 0.5])
    arr, arr_s = ri_q.integrate_sigma_clip(frames, thres=4, max_iter=5, monitor=[2.0, 0.5],
                                           engine="array")
    assert arr.dtype == np.float32 and arr.shape == cpu.shape
    for k in range(2):
        assert _clip_agrees(arr[k], cpu[k]) and _clip_agrees(arr_s[k], cpu_s[k])
        ref = ri_q.reference_sigma_clip(frames[k], thres=4, max_iter=5)
        assert _clip_agrees(arr[k] * [2.0, 0.5][k], ref.intensity)
    ri = RadialIntegrator(P2M / "CeO2.poni", npt=700, unit="2th_deg", mask=P2M / "mask.edf",
                          split="no", error_model="none", dark=np.full(frame2m.shape, 3.0))
    a, _ = ri.integrate_sigma_clip(frames, thres=4, max_iter=5, engine="array")
    c, _ = ri.integrate_sigma_clip(frames, thres=4, max_iter=5)
    for k in range(2):
        assert _clip_agrees(a[k], c[k])
    g = a[0] > 0
    assert np.max(np.abs(a[1] - a[0])[g] / a[0][g]) < 0.01  # every spot removed


def test_array_engine_trimmed_mean_equals_pyfai(ri_q, frame2m, hot_frame):
    frames = np.stack([frame2m, hot_frame])
    t, ts = ri_q.integrate_trimmed_mean(frames, quantiles=(0.0, 0.9), engine="array")
    assert t.dtype == np.float32 and t.shape == (2, ri_q.npt)
    for lo, hi in ((0.0, 0.9), (0.1, 0.8)):
        t, ts = ri_q.integrate_trimmed_mean(frames, quantiles=(lo, hi), engine="array")
        for k in range(2):
            ref = ri_q.reference_trimmed_mean(frames[k], quantiles=(lo, hi))
            assert _rel(t[k], ref.intensity) < 1e-4
            assert _rel(ts[k], ref.sigma) < 1e-4
    with pytest.raises(IntegrationError, match="engine 'gpu'"):
        ri_q.integrate_trimmed_mean(frames, engine="gpu")


@pytest.mark.gpu
def test_gpu_clipping_filters_match_cpu(ri_q, frame2m, hot_frame):
    cp = pytest.importorskip("cupy", reason="needs cupy and an NVIDIA GPU")
    frames = np.stack([frame2m, hot_frame])
    c, cs = ri_q.integrate_sigma_clip(frames, thres=4, max_iter=5)
    g, gs = ri_q.integrate_sigma_clip(cp.asarray(frames), thres=4, max_iter=5)
    t_cpu, _ = ri_q.integrate_trimmed_mean(frames, quantiles=(0.0, 0.9))
    t_gpu, _ = ri_q.integrate_trimmed_mean(cp.asarray(frames), quantiles=(0.0, 0.9))
    # the one-kernel sigma clip and trimmed mean (opt-in engines) on the same frames
    kg, kgs = ri_q.integrate_sigma_clip(cp.asarray(frames), thres=4, max_iter=5, engine="kernel")
    kt, kts = ri_q.integrate_trimmed_mean(cp.asarray(frames), quantiles=(0.0, 0.9), engine="kernel")
    t_cpu_s = ri_q.integrate_trimmed_mean(frames, quantiles=(0.0, 0.9))[1]
    for k in range(2):
        assert _rel(cp.asnumpy(kt)[k], t_cpu[k]) < 1e-4
        assert _rel(cp.asnumpy(kts)[k], t_cpu_s[k]) < 1e-4
        assert _clip_agrees(cp.asnumpy(g)[k], c[k]) and _clip_agrees(cp.asnumpy(gs)[k], cs[k])
        assert _clip_agrees(cp.asnumpy(kg)[k], c[k]) and _clip_agrees(cp.asnumpy(kgs)[k], cs[k])
        assert _rel(cp.asnumpy(t_gpu)[k], t_cpu[k]) < 1e-4
    az = RadialIntegrator(P2M / "CeO2.poni", npt=1000, unit="q_nm^-1", mask=P2M / "mask.edf",
                          error_model="none")
    a_cpu = az.integrate_sigma_clip(frames, thres=4, max_iter=5)
    a_ker = az.integrate_sigma_clip(cp.asarray(frames), thres=4, max_iter=5, engine="kernel")
    for k in range(2):
        assert _clip_agrees(cp.asnumpy(a_ker[0])[k], a_cpu[0][k])
        assert _clip_agrees(cp.asnumpy(a_ker[1])[k], a_cpu[1][k])


@pytest.mark.parametrize("shape, dtype", [((5, 64, 48), np.uint32), ((3, 1000, 700), np.uint16),
                                          ((1, 2048, 1024), np.int32), ((7,), np.float32)])
def test_parallel_copy_into_staging_buffers(shape, dtype):
    """The GPU path's host staging copy (several threads, pieces along rows) writes every
    element once and only where asked: equal to the source, and the rest of a larger
    staging buffer untouched (the copy into pinned[j][:m] of a partial last batch)."""
    from concurrent.futures import ThreadPoolExecutor

    from tasks.integrate import parallel_copy

    rng = np.random.default_rng(1)
    src = rng.integers(0, 60000, size=shape).astype(dtype)
    buf = np.full((shape[0] + 2,) + shape[1:], 7, dtype)
    with ThreadPoolExecutor(4) as pool:
        parallel_copy(buf[:shape[0]], src, pool, min_bytes=1 << 12)
    np.testing.assert_array_equal(buf[:shape[0]], src)
    assert np.all(buf[shape[0]:] == 7)
    with pytest.raises(ValueError, match="shapes differ"):
        parallel_copy(buf, src)
