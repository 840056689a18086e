"""Chemical-image super-resolution (tasks.superres): guided networks against baselines on
held-out phantoms, interpolation against independent references, shapes, errors, I/O."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
skimage = pytest.importorskip("skimage")
from skimage.metrics import peak_signal_noise_ratio  # noqa: E402
from skimage.transform import resize  # noqa: E402

from tasks import superres as sr  # noqa: E402
from tasks.simulate import SimConfig, make_phantom  # noqa: E402

torch.set_num_threads(1)

# Small networks and images keep the file inside its time budget (about 60 s on one core).
NET = dict(channels=16, blocks=2, patch=32, lr=2e-3, loss="l1")


def _psnr(truth, img):
    return peak_signal_noise_ratio(truth, img, data_range=float(truth.max() - truth.min()))


def _held_out(factor, size=128):
    """The fixed 'shapes' phantom of tasks.simulate (never in the training library, which
    holds random phantoms only): one pair per phase."""
    m = make_phantom(SimConfig(n_translations=size, phantom="shapes"), 3)
    return [sr.make_sr_pair(m, p, factor, seed=100 + p, guide_blur_px=0.7, guide_noise=0.01,
                            low_noise=0.005, source="shapes") for p in range(3)]


@pytest.fixture(scope="module")
def nets4():
    lib = sr.build_sr_library(24, size=96, factor=4, kinds=("random",), seed=0)
    return {kind: sr.train_sr(lib, kind=kind, factor=4, epochs=100, seed=0, **NET)
            for kind in ("single", "dual")}


@pytest.fixture(scope="module")
def tiny4():
    """Briefly trained networks (not useful, but with non-trivial weights) for API tests."""
    lib = sr.build_sr_library(4, size=64, factor=4, kinds=("random",), seed=5)
    return {kind: sr.train_sr(lib, kind=kind, factor=4, epochs=2, seed=0, **NET)
            for kind in ("single", "dual")}


@pytest.mark.slow
def test_dual_beats_single_and_bicubic_at_4x(nets4):
    scores = {m: [] for m in sr.METHODS}
    for pair in _held_out(4):
        for m in sr.METHODS:
            out = sr.upscale(pair.low, 4, method=m, model=nets4.get(m), guide=pair.guide)
            assert out.shape == pair.high.shape and out.dtype == np.float32
            scores[m].append(_psnr(pair.high, out))
    mean = {m: float(np.mean(v)) for m, v in scores.items()}
    # measured (1 thread, mean of 3 phases): bilinear 23.8, bicubic 24.8, single 28.2,
    # guided filter 29.2, dual 29.2 dB (per phase, dual and single are within 0.1 dB on the
    # mixed-phase matrix, phase 1)
    assert mean["dual"] > mean["single"] + 0.5, mean
    assert mean["dual"] > mean["bicubic"] + 3.0, mean
    assert all(d > b + 2.0 for d, b in zip(scores["dual"], scores["bicubic"])), scores
    assert mean["single"] > mean["bicubic"] + 1.5, mean  # the single network learned something
    assert mean["dual"] >= mean["guided"] - 0.2, mean  # training did not spoil its guided base
    assert mean["bicubic"] > mean["bilinear"], mean


def test_2x_dual_works_and_channels_batch():
    lib = sr.build_sr_library(12, size=64, factor=2, kinds=("random",), seed=1)
    net = sr.train_sr(lib, kind="dual", factor=2, epochs=30, seed=0, **NET)
    pairs = _held_out(2, size=96)
    stack = np.stack([p.low for p in pairs], -1)  # (48, 48, 3): phases as channels
    out = sr.upscale(stack, 2, method="dual", model=net, guide=pairs[0].guide)
    assert out.shape == (96, 96, 3) and out.dtype == np.float32
    for c, p in enumerate(pairs):
        one = sr.upscale(p.low, 2, method="dual", model=net, guide=pairs[0].guide)
        np.testing.assert_allclose(out[..., c], one, rtol=1e-5, atol=1e-5 * float(np.abs(one).max()))
        one = sr.upscale(p.low, 2, method="dual", model=net, guide=p.guide)
        bic = sr.upscale(p.low, 2, method="bicubic")
        assert _psnr(p.high, one) > _psnr(p.high, bic) + 1.0


def _keys_bicubic_1d(n_in, f, a=-0.75):
    """Independent reference: Keys cubic-convolution weights (half-pixel centres,
    replicated edges) as an (f*n_in, n_in) matrix."""
    def w(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0

    m = np.zeros((f * n_in, n_in))
    for i in range(f * n_in):
        src = (i + 0.5) / f - 0.5
        i0 = int(np.floor(src))
        t = src - i0
        for k in range(-1, 3):
            m[i, min(max(i0 + k, 0), n_in - 1)] += w(k - t)
    return m


@pytest.mark.parametrize("factor", [2, 4])
def test_interpolation_baselines_equal_references(factor):
    rng = np.random.default_rng(3)
    low = rng.random((13, 17)).astype(np.float32)
    bil = sr.upscale(low, factor, method="bilinear")
    ref = resize(low.astype(np.float64), (13 * factor, 17 * factor), order=1, mode="edge",
                 anti_aliasing=False)
    np.testing.assert_allclose(bil, ref, atol=1e-5)
    bic = sr.upscale(low, factor, method="bicubic")
    ref = _keys_bicubic_1d(13, factor) @ low.astype(np.float64) @ _keys_bicubic_1d(17, factor).T
    np.testing.assert_allclose(bic, ref, atol=1e-5)
    assert bic.dtype == np.float32 and bic.shape == (13 * factor, 17 * factor)
    # an upsampled image area-averages back to the input up to the interpolation's smoothing
    # (exactly for a constant image)
    const = np.full((8, 8), 2.5, np.float32)
    np.testing.assert_allclose(sr.area_downsample(sr.upscale(const, factor, method="bicubic"), factor), const, rtol=1e-6)


def test_bad_inputs_raise_clear_errors(tiny4):
    low = np.ones((24, 24), np.float32)
    with pytest.raises(sr.SuperResolutionError, match=r"guide: shape \(90, 96\).*expected \(96, 96\)"):
        sr.upscale(low, 4, method="dual", model=tiny4["dual"], guide=np.ones((90, 96)))
    with pytest.raises(sr.SuperResolutionError, match="guide: method 'dual' needs"):
        sr.upscale(low, 4, method="dual", model=tiny4["dual"])
    with pytest.raises(sr.SuperResolutionError, match="model: method 'single' needs"):
        sr.upscale(low, 4, method="single")
    with pytest.raises(sr.SuperResolutionError, match="'single'-input model cannot run method 'dual'"):
        sr.upscale(low, 4, method="dual", model=tiny4["single"], guide=np.ones((96, 96)))
    with pytest.raises(sr.SuperResolutionError, match="trained for factor 4, got 2"):
        sr.upscale(low, 2, method="single", model=tiny4["single"])
    with pytest.raises(sr.SuperResolutionError, match="method: expected one of"):
        sr.upscale(low, 4, method="lanczos")
    with pytest.raises(sr.SuperResolutionError, match="factor: expected an integer"):
        sr.upscale(low, 2.5)
    with pytest.raises(sr.SuperResolutionError, match="low_res: contains NaN"):
        sr.upscale(np.full((4, 4), np.nan), 2)
    with pytest.raises(sr.SuperResolutionError, match=r"low_res: expected a \(ny, nx\) or \(ny, nx, C\)"):
        sr.upscale(np.ones(5), 2)
    with pytest.raises(sr.SuperResolutionError, match="not divisible by factor 4"):
        sr.area_downsample(np.ones((10, 12)), 4)
    assert issubclass(sr.SuperResolutionError, ValueError)


def test_save_load_round_trip(tiny4, tmp_path):
    path = sr.save_model(tiny4["dual"], tmp_path / "dual.pt")
    raw = torch.load(path, weights_only=True)  # plain tensors and values only
    assert raw["config"]["kind"] == "dual" and raw["config"]["factor"] == 4
    pair = _held_out(4, size=64)[0]
    a = sr.upscale(pair.low, 4, method="dual", model=tiny4["dual"], guide=pair.guide)
    b = sr.upscale(pair.low, 4, method="dual", model=str(path), guide=pair.guide)
    np.testing.assert_array_equal(a, b)
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(3)}, bad)
    with pytest.raises(sr.SuperResolutionError, match="not a super-resolution model"):
        sr.load_model(bad)
    with pytest.raises(sr.SuperResolutionError, match="not found"):
        sr.load_model(tmp_path / "missing.pt")


def test_library_pairs_are_consistent():
    lib = sr.build_sr_library(6, size=64, factor=4, kinds=("random", "shapes"), seed=2,
                              low_noise=0.0, guide_noise=0.0, guide_blur_px=0.0)
    for p in lib:
        assert p.high.shape == p.guide.shape == (64, 64) and p.low.shape == (16, 16)
        np.testing.assert_allclose(p.low, sr.area_downsample(p.high, 4), rtol=1e-6, atol=1e-7)
        assert p.high.max() > 0 and p.high.min() >= 0
        # the noise-free, unblurred guide is the attenuation-weighted phase sum: it is
        # at least mu_phase * chemical map everywhere
        mu = p.meta["mu"][p.phase]
        assert np.all(p.guide >= mu * p.high - 1e-5)
    assert {p.source for p in lib} == {"random", "shapes"}


@pytest.mark.real
def test_library_from_catalyst_image(real):
    path = real("ndtomo_images", "catalyst_particles_small.tif")
    cat = sr.build_sr_library(3, size=64, factor=2, kinds=("catalyst",), images=[path], seed=0)
    assert len(cat) == 3 and all(p.source == "catalyst" and p.high.max() > 0 for p in cat)
    with pytest.raises(sr.SuperResolutionError, match="images: file"):
        sr.build_sr_library(2, size=64, factor=2, kinds=("catalyst",), images=[path.with_name("nope.tif")])
    with pytest.raises(sr.SuperResolutionError, match="kinds: unknown"):
        sr.build_sr_library(2, size=64, factor=2, kinds=("blobs",))


def test_absorption_from_xrdct():
    rng = np.random.default_rng(0)
    m = rng.random((2, 10, 12))  # two phases
    pat = rng.random((2, 30))
    radial = np.linspace(1, 4, 30)
    vol = np.einsum("pyx,pb->yxb", m, pat)  # (ny, nx, n_bin) as fbp returns
    img = sr.absorption_from_xrdct(vol)
    np.testing.assert_allclose(img, np.einsum("pyx,p->yx", m, pat.sum(1)), rtol=1e-5)
    sel = (radial >= 2) & (radial <= 3)
    part = sr.absorption_from_xrdct(vol, radial=radial, radial_range=(2, 3))
    np.testing.assert_allclose(part, np.einsum("pyx,p->yx", m, pat[:, sel].sum(1)), rtol=1e-5)
    up = sr.absorption_from_xrdct(vol[None].repeat(2, 0), factor=2)
    assert up.shape == (2, 20, 24) and up.dtype == np.float32
    with pytest.raises(sr.SuperResolutionError, match="radial: needed"):
        sr.absorption_from_xrdct(vol, radial_range=(2, 3))
    with pytest.raises(sr.SuperResolutionError, match="selects no bin"):
        sr.absorption_from_xrdct(vol, radial=radial, radial_range=(9, 10))
    with pytest.raises(sr.SuperResolutionError, match="volume: expected"):
        sr.absorption_from_xrdct(np.ones((4, 4)))


def test_load_guide_tiff_and_hdf5(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    h5py = pytest.importorskip("h5py")
    img = np.arange(48, dtype=np.uint16).reshape(6, 8)
    tifffile.imwrite(tmp_path / "g.tif", img)
    np.testing.assert_array_equal(sr.load_guide(tmp_path / "g.tif"), img.astype(np.float32))
    with h5py.File(tmp_path / "g.h5", "w") as h:
        h["entry/absorption"] = img
        h["entry/other"] = img[:, :, None]
    np.testing.assert_array_equal(sr.load_guide(tmp_path / "g.h5"), img)
    with pytest.raises(sr.SuperResolutionError, match="dataset 'nope' not found"):
        sr.load_guide(tmp_path / "g.h5", dataset="nope")
    with pytest.raises(sr.SuperResolutionError, match="not found"):
        sr.load_guide(tmp_path / "missing.tif")


def test_spec_superres_field():
    from pipelines.spec import SpecError, parse_spec

    spec = parse_spec({})
    assert spec.superres.enabled is False and spec.superres.factor in (2, 4)
    maps = {"enabled": True, "phases": [{"name": "CeO2", "cif": "phases/CeO2.cif"}]}
    ok = parse_spec({"mapping": maps, "superres": {"enabled": True, "factor": 4, "method": "dual",
                                                   "model": "dual.pt", "guide": "from_data"}})
    assert ok.superres.method == "dual"
    with pytest.raises(SpecError, match="superres.guide"):
        parse_spec({"mapping": maps, "superres": {"enabled": True, "method": "dual", "model": "m.pt"}})
    with pytest.raises(SpecError, match="superres.enabled: super-resolution works on the per-phase"):
        parse_spec({"superres": {"enabled": True, "method": "bicubic"}})
    with pytest.raises(SpecError, match="superres.factor"):
        parse_spec({"superres": {"factor": 3}})


@pytest.mark.gpu
def test_gpu_matches_cpu():
    lib = sr.build_sr_library(4, size=64, factor=4, kinds=("random",), seed=0)
    net = sr.train_sr(lib, kind="dual", factor=4, epochs=10, seed=0, device="cuda", **NET)
    p = lib[0]
    cpu = sr.upscale(p.low, 4, method="dual", model=net, guide=p.guide, device="cpu")
    gpu = sr.upscale(p.low, 4, method="dual", model=net, guide=p.guide, device="cuda")
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-3 * float(np.abs(cpu).max()))
