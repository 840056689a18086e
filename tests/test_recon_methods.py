"""The reconstruction methods of the spec (fbp, sirt, cgls, tv, gan) as the flow's
reconstruct stage: a simulated sinogram cube (known phase maps) through ``run_pipeline``
with each method; every method's volume matches the truth, and the product records what
was done. The methods' own accuracy is tested in test_iterative.py and test_gan.py."""

from __future__ import annotations

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
