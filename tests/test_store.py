"""Product store: Zarr v3 with xarray, content address, atomic publish, no overwrite."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from tasks import store


def _ds(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return xr.Dataset(
        {"patterns": (("z", "angle", "translation", "radial"),
                      rng.random((1, n, n + 2, 50), dtype=np.float32), {"units": "counts / monitor"})},
        coords={"z": ("z", [0.0], {"units": "mm"}), "angle": ("angle", np.linspace(0, 180, n, endpoint=False)),
                "translation": ("translation", np.arange(n + 2) * 0.05),
                "radial": ("radial", np.linspace(1, 40, 50), {"unit": "q_nm^-1"})})


def test_product_id_is_a_content_address():
    a = store.product_id('{"a":1}', {"scan.nxs": "ab"}, {"poni": "cd"}, code="1")
    assert a == store.product_id('{"a":1}', {"scan.nxs": "ab"}, {"poni": "cd"}, code="1")
    assert a != store.product_id('{"a":2}', {"scan.nxs": "ab"}, {"poni": "cd"}, code="1")
    assert a != store.product_id('{"a":1}', {"scan.nxs": "ab"}, {"poni": "ce"}, code="1")
    assert a != store.product_id('{"a":1}', {"scan.nxs": "ab"}, {"poni": "cd"}, code="2")
    assert len(a) == 24 and int(a, 16) >= 0


def test_write_publish_open_roundtrip(tmp_path):
    ds = _ds()
    work = store.work_path(tmp_path, "abc")
    store.write_variables(work, ds)
    store.update_attrs(work, {"timings_s": {"integrate": 1.5}, "arr": np.arange(3)})
    # a later stage adds variables: the provenance written so far must survive
    store.write_variables(work, xr.Dataset({"rwp": (("z", "y", "x"), np.ones((1, 4, 4), np.float32))}))
    final = store.publish(work, store.published_path(tmp_path, "abc"))
    assert not work.exists() and final.name == "abc.zarr"
    meta = json.loads((final / "patterns" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["dimension_names"] == ["z", "angle", "translation", "radial"]
    assert any(c["name"] == "blosc" and c["configuration"]["cname"] == "zstd" for c in meta["codecs"])
    back = store.open_product(final)
    np.testing.assert_array_equal(back["patterns"].values, ds["patterns"].values)
    assert back["radial"].attrs["unit"] == "q_nm^-1"
    assert store.provenance(final)["timings_s"] == {"integrate": 1.5}
    assert store.provenance(final)["arr"] == [0, 1, 2]


def test_publish_never_overwrites(tmp_path):
    final = store.published_path(tmp_path, "p")
    for seed in (0, 1):
        work = store.work_path(tmp_path, f"w{seed}")
        store.write_variables(work, _ds(seed=seed))
        if seed == 0:
            store.publish(work, final)
        else:
            before = store.open_product(final)["patterns"].values.copy()
            with pytest.raises(store.ProductExistsError, match="already published"):
                store.publish(work, final)
            np.testing.assert_array_equal(store.open_product(final)["patterns"].values, before)
            assert work.exists()  # the unpublished work store is left for inspection/resume


def test_publish_missing_work_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Zarr store"):
        store.publish(tmp_path / "nothing.zarr", tmp_path / "final.zarr")


def test_chunks_keep_whole_patterns_and_planes():
    c = store._chunks(("z", "angle", "translation", "radial"), (3, 400, 256, 2000), 4)
    assert c[0] == 1 and c[2] == 256 and c[3] == 2000 and c[1] * 256 * 2000 * 4 <= 4 << 20
    c = store._chunks(("z", "y", "x", "radial"), (1, 64, 64, 500), 4)
    assert c[3] == 500 and c[2] == 64
