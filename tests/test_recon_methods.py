"""The reconstruction methods of the spec (fbp, sirt, cgls, tv, gan) as the flow's
reconstruct stage: a simulated sinogram cube (known phase maps) through ``run_pipeline``
with each method; every method's volume matches the truth, and the product records what
was done. The methods' own accuracy is tested in test_iterative.py and test_gan.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flows.process import run_pipeline
from pipelines.spec import SpecError, parse_spec
from tasks import store
from tasks.simulate import SimConfig, simulate_sinogram_cube

N_T, N_A, NPT = 32, 40, 24


@pytest.fixture(scope="module")
def cube(tmp_path_factory):
    cfg = SimConfig(n_translations=N_T, n_angles=N_A, counts=2000.0, seed=4, cor_offset_px=0.0)
    return simulate_sinogram_cube(tmp_path_factory.mktemp("cube") / "sino.h5", cfg,
                                  unit="q_nm^-1", npt=NPT)


def _spec(method: str, **section):
    recon = {"method": method, **section}
    return parse_spec({"schema_version": 1, "name": f"recon-{method}",
                       "input": {"kind": "sinogram"},
                       "sinogram": {"center": float((N_T - 1) / 2)},
                       "reconstruction": recon, "mapping": {"enabled": False},
                       "output": {"overview_png": False}})


def _truth_total(sim):
    """Noise-free reconstructed intensity summed over bins: K * mass @ patterns (y, x)."""
    per_mass = sim.patterns_per_mass.sum(axis=1)                   # (phase,)
    return sim.intensity_scale * np.tensordot(per_mass, sim.mass[:, 0] if sim.mass.ndim == 4 else sim.mass, 1)


def _corr(vol, truth):
    img = vol.sum(axis=-1)
    k = (img.shape[0] - truth.shape[0]) // 2
    img = img[k:k + truth.shape[0], k:k + truth.shape[1]]
    return float(np.corrcoef(img.ravel(), truth.ravel())[0, 1])


@pytest.mark.parametrize("method,section", [
    ("fbp", {}),
    ("sirt", {"iterative": {"n_iter": 30}}),
    ("cgls", {"iterative": {"n_iter": 10}}),
    ("tv", {"iterative": {"n_iter": 60, "lam_tv": 0.01}}),
    ("gan", {"gan": {"n_iter": 40, "channels": [3, 7]}}),
])
def test_method_through_the_flow(cube, tmp_path, method, section):
    path = run_pipeline(cube.path, pipeline=_spec(method, **section), out=tmp_path)
    ds = store.open_product(path)
    vol = ds["volume"].isel(z=0).values
    assert vol.shape[-1] == NPT and np.isfinite(vol).all()
    truth = _truth_total(cube)
    assert _corr(vol, truth) > 0.9, method
    stage = store.provenance(path)["stages"]["reconstruct"]
    assert stage["method"] == method
    assert method in ds["volume"].attrs["long_name"]
    if method == "gan":
        assert stage["gan_channels"] == [3, 7]
        fbp_path = run_pipeline(cube.path, pipeline=_spec("fbp"), out=tmp_path / "fbp")
        ref = store.open_product(fbp_path)["volume"].isel(z=0).values
        other = [b for b in range(NPT) if b not in (3, 7)]
        np.testing.assert_allclose(vol[..., other], ref[..., other], rtol=1e-5, atol=1e-6 * ref.max())
        assert not np.allclose(vol[..., 3], ref[..., 3])


def test_gan_channels_beyond_the_bins_are_named(cube, tmp_path):
    with pytest.raises(SpecError, match=r"reconstruction.gan.channels: bins \[99\] do not exist"):
        run_pipeline(cube.path, pipeline=_spec("gan", gan={"n_iter": 2, "channels": [99]}), out=tmp_path)


# ------------------------------------------------------------------------------ cnn
@pytest.fixture(scope="module")
def cnn_cube(tmp_path_factory):
    """A 32 x 32-angle cube, the tiny test model's geometry (tests/cnn_helpers.py); the
    simulator's default phantom (large shapes) is unlike the model's catalyst library."""
    from cnn_helpers import N_ANGLE, SIZE

    cfg = SimConfig(n_translations=SIZE, n_angles=N_ANGLE, counts=2000.0, seed=5, cor_offset_px=0.0)
    return simulate_sinogram_cube(tmp_path_factory.mktemp("cnncube") / "sino.h5", cfg,
                                  unit="q_nm^-1", npt=6)


def _register_model(out, seed_shift=0.0):
    """Save the session's tiny trained model under ``out/models`` and promote it."""
    from catalog.db import Catalog
    from cnn_helpers import trained_model
    from tasks import cnn

    model = trained_model()
    if seed_shift:  # a different model: perturbed weights
        import copy

        import torch

        model = copy.deepcopy(model)
        with torch.no_grad():
            for p in model.net.parameters():
                p.add_(seed_shift)
    path = Path(out) / "models" / f"cnn-{seed_shift}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    side = cnn.save_model(model, path)
    cat = Catalog.for_products(out)
    v = cat.add_model(name="cnn", path=path, sha256=side["weights_sha256"], promoted=False)
    cat.promote_model("cnn", v)
    return v


def _cnn_spec(**cnn):
    from cnn_helpers import SIZE

    return parse_spec({"schema_version": 1, "name": "recon-cnn", "input": {"kind": "sinogram"},
                       "sinogram": {"center": float((SIZE - 1) / 2)},
                       "reconstruction": {"method": "cnn", "cnn": cnn},
                       "mapping": {"enabled": False}, "output": {"overview_png": False}})


def test_cnn_method_through_the_flow(cnn_cube, tmp_path):
    """``method: cnn`` takes the catalog's promoted model; the model is an input of the
    product id; a slice unlike the training library falls back to FBP with a warning that
    the product records; ``fallback: none`` keeps the CNN result; no model -> SpecError."""
    from flows.process import make_request
    from tasks.cnn import OutOfDistributionWarning

    out = tmp_path / "out"
    with pytest.raises(SpecError, match=r"reconstruction.cnn.model: the catalog of .* has no "
                                        r"promoted version of model 'cnn'"):
        make_request(cnn_cube.path, _cnn_spec(), out=out)
    v1 = _register_model(out)
    id1 = make_request(cnn_cube.path, _cnn_spec(), out=out).product_id
    with pytest.warns(OutOfDistributionWarning, match="falling back to FBP"):
        path = run_pipeline(cnn_cube.path, pipeline=_cnn_spec(), out=out)
    stage = store.provenance(path)["stages"]["reconstruct"]
    assert stage["method"] == "cnn" and stage["cnn_version"] == v1
    assert [f["slice"] for f in stage["cnn_fbp_fallback_slices"]] == [0]
    assert "out of distribution" in stage["cnn_fbp_fallback_slices"][0]["reason"]
    fbp_vol = store.open_product(run_pipeline(cnn_cube.path, pipeline=_spec("fbp"), out=tmp_path / "f"))["volume"].values
    np.testing.assert_allclose(store.open_product(path)["volume"].values, fbp_vol, rtol=1e-5,
                               atol=1e-6 * np.abs(fbp_vol).max())
    with pytest.warns(OutOfDistributionWarning, match="CNN result returned anyway"):
        kept = run_pipeline(cnn_cube.path, pipeline=_cnn_spec(fallback="none"), out=out)
    vol = store.open_product(kept)["volume"].values
    assert np.isfinite(vol).all() and not np.allclose(vol, fbp_vol, rtol=0.05)
    assert _corr(vol[0], _truth_total(cnn_cube)) > 0.5
    _register_model(out, seed_shift=1e-3)  # a new promoted model: a new product
    assert make_request(cnn_cube.path, _cnn_spec(), out=out).product_id != id1
    from catalog.db import Catalog

    Catalog.for_products(out).promote_model("cnn", v1)  # the first model again: same product
    assert make_request(cnn_cube.path, _cnn_spec(), out=out).product_id == id1


# ------------------------------------------------------------------------------ superres
def test_superres_stage_through_the_flow(tmp_path):
    """``superres`` after mapping: the per-phase maps at 2x, guided by the data's own
    total-scattering image; each super-resolved map, area-averaged back to the
    reconstruction grid, gives the map again; the stage is recorded in the product. (The
    guide-free methods differ only inside tasks.superres.upscale, tested in
    test_superres.py; one flow run here keeps the default test run short.)"""
    from tasks.simulate import CATALYST_PHASES
    from tasks.superres import area_downsample

    cfg = SimConfig(n_translations=24, n_angles=36, counts=5000.0, seed=6, cor_offset_px=0.0)
    sim = simulate_sinogram_cube(tmp_path / "sino.h5", cfg, unit="q_nm^-1", npt=300)
    for method, guide in (("guided", "from_data"),):
        spec = parse_spec({
            "schema_version": 1, "name": "sr",
            "input": {"kind": "sinogram", "wavelength_m": sim.wavelength_m},
            "sinogram": {"center": 11.5},
            "mapping": {"enabled": True, "phases": [{"name": n, "cif": c} for n, c in CATALYST_PHASES],
                        "profile": {"W": 0.09, "eta": 0.5}},
            "superres": {"enabled": True, "factor": 2, "method": method, "guide": guide},
            "output": {"overview_png": False}})
        path = run_pipeline(sim.path, pipeline=spec, out=tmp_path / method)
        ds = store.open_product(path)
        m = ds.sizes["x"]
        assert ds["scale_sr"].shape == (1, len(CATALYST_PHASES), 2 * m, 2 * m)
        assert ds["x_sr"].size == 2 * m and abs(float(ds["x_sr"].mean()) - float(ds["x"].mean())) < 1e-9
        low = np.nan_to_num(ds["scale"].values[0])
        back = np.stack([area_downsample(a, 2) for a in ds["scale_sr"].values[0]])
        big = low > 0.2 * low.max(axis=(1, 2), keepdims=True)
        assert big.sum() > 50
        assert np.median(np.abs(back - low)[big] / low[big]) < 0.1, method
        stage = store.provenance(path)["stages"]["superres"]
        assert stage["method"] == method and stage["factor"] == 2


def test_superres_needs_the_maps():
    with pytest.raises(Exception, match="superres.enabled: super-resolution works on the per-phase"):
        parse_spec({"schema_version": 1, "superres": {"enabled": True}})
