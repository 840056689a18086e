"""Streaming integration: results go to the store chunk by chunk (tasks.store.GridWriter,
integrate_scan(sink=)), and the integrate stage's memory does not grow with the scan."""

from __future__ import annotations

import tracemalloc

import h5py
import hdf5plugin
import numpy as np
import pytest
import xarray as xr

from pipelines.spec import parse_spec
from tasks import store
from tasks.ingest import open_nexus
from tasks.integrate import IntegrationError, integrate_scan


# ------------------------------------------------------------------------------ GridWriter
def _template(path, shape, names=("a", "b")):
    dims = ("z", "angle", "translation", "radial")
    ds = xr.Dataset({n: (dims, store.lazy_zeros(dims, shape)) for n in names})
    store.write_variables(path, ds)


def test_grid_writer_any_order_chunk_aligned(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "_chunks", lambda dims, shape, itemsize, target_bytes=0:
                        (1, 3, shape[2], shape[3]))  # small chunks: several per slice
    nz, na, nt, npt = 2, 7, 5, 6
    rng = np.random.default_rng(0)
    index = rng.permutation(nz * na * nt).reshape(nz, na, nt)  # frame order != grid order
    a = rng.normal(size=(index.size, npt)).astype(np.float32)
    b = rng.normal(size=(index.size, npt)).astype(np.float32)
    path = tmp_path / "w.zarr"
    _template(path, (nz, na, nt, npt))
    w = store.GridWriter(path, ["a", "b"], index)
    assert w.chunks == (1, 3, nt)
    order = rng.permutation(np.arange(0, index.size, 4))  # batches of 4 frames, shuffled
    peak_pending = 0
    for s in order:
        e = min(index.size, s + 4)
        w(s, e, a[s:e], None if s % 8 == 0 else b[s:e])
        peak_pending = max(peak_pending, len(w.pending))
    w.close()
    assert w.written == nz * 3  # every chunk written exactly once
    got = xr.open_zarr(path, consolidated=False)
    assert np.array_equal(got["a"].values, a[index])
    want_b = b[index].copy()
    none_frames = np.concatenate([np.arange(s, min(index.size, s + 4)) for s in order if s % 8 == 0])
    want_b[np.isin(index, none_frames)] = np.nan  # None -> NaN (no standard errors)
    assert np.array_equal(got["b"].values, want_b, equal_nan=True)


def test_grid_writer_in_order_holds_one_chunk_and_checks(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "_chunks", lambda dims, shape, itemsize, target_bytes=0:
                        (1, 2, shape[2], shape[3]))
    nz, na, nt, npt = 3, 4, 3, 2
    index = np.arange(nz * na * nt).reshape(nz, na, nt)
    path = tmp_path / "w.zarr"
    _template(path, (nz, na, nt, npt), names=("a",))
    w = store.GridWriter(path, ["a"], index)
    vals = np.arange(index.size * npt, dtype=np.float32).reshape(-1, npt)
    for s in range(0, index.size, 5):
        w(s, min(s + 5, index.size), vals[s:s + 5])
        assert len(w.pending) <= 1  # acquisition order: chunks flush as they fill
    with pytest.raises(ValueError, match="frame 3 written twice"):
        w(3, 4, vals[3:4])
    w.close()
    w2 = store.GridWriter(path, ["a"], index)
    w2(0, 5, vals[:5])
    with pytest.raises(ValueError, match="31 frame\\(s\\) never written"):
        w2.close()
    with pytest.raises(ValueError, match="batch of shape"):
        w2(5, 7, vals[5:8])


def test_grid_writer_resumes_from_the_chunks_an_earlier_attempt_wrote(tmp_path, monkeypatch):
    """An attempt killed after some chunks were flushed: a new writer given those chunk keys
    (as its ``on_flush`` reported them) leaves their frames out of ``todo``, and filling
    only ``todo`` completes the variables with the same values as one undisturbed pass."""
    from tasks.integrate import batch_ranges

    monkeypatch.setattr(store, "_chunks", lambda dims, shape, itemsize, target_bytes=0:
                        (1, 2, shape[2], shape[3]))
    nz, na, nt, npt = 2, 5, 3, 4
    index = np.arange(nz * na * nt).reshape(nz, na, nt)
    vals = np.random.default_rng(1).normal(size=(index.size, npt)).astype(np.float32)
    path = tmp_path / "w.zarr"
    _template(path, (nz, na, nt, npt), names=("a",))
    flushed = []
    w = store.GridWriter(path, ["a"], index, on_flush=flushed.append)
    w(0, 17, vals[:17])  # slice 0 (frames 0-14: three chunks) and 2 frames of slice 1
    assert sorted(flushed) == [(0, 0, 0), (0, 1, 0), (0, 2, 0)] and len(w.pending) == 1
    del w  # "killed": frames 15, 16 were buffered, never written; 17.. never arrived

    w2 = store.GridWriter(path, ["a"], index, written=flushed)
    assert w2.reused == 3 and np.array_equal(np.flatnonzero(w2.todo), np.arange(15, 30))
    for s, e in batch_ranges(index.size, 4, w2.todo):
        w2(s, e, vals[s:e])
    w2.close()
    assert np.array_equal(xr.open_zarr(path, consolidated=False)["a"].values, vals[index])
    with pytest.raises(ValueError, match="outside its"):
        store.GridWriter(path, ["a"], index, written=[(0, 3, 0)])


def test_batch_ranges_cover_exactly_the_frames_to_do():
    from tasks.integrate import batch_ranges

    assert batch_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    todo = np.zeros(20, bool)
    todo[[0, 1, 2, 7, 8, 9, 10, 11, 12, 13, 19]] = True
    r = batch_ranges(20, 3, todo)
    assert r == [(0, 3), (7, 10), (10, 13), (13, 14), (19, 20)]
    got = np.zeros(20, bool)
    for s, e in r:
        assert not got[s:e].any()
        got[s:e] = True
    assert np.array_equal(got, todo) and batch_ranges(5, 2, np.zeros(5, bool)) == []


# ------------------------------------------------------------------------------ scans
@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from tasks.simulate import SimConfig, simulate_scan

    return simulate_scan(tmp_path_factory.mktemp("sim") / "scan",
                         SimConfig(n_translations=12, n_angles=4, npt_sim=500, cor_offset_px=0.0))


def _replicate(sim, path, nz):
    """The simulated slice repeated at ``nz`` z positions (compressed chunks copied)."""
    with h5py.File(sim.nexus_path, "r") as h:
        d = h["entry/instrument/detector/data"]
        n0, H, W = d.shape
        raw = [d.id.read_direct_chunk((i, 0, 0)) for i in range(n0)]
        angle, trans = h["entry/sample/rotation_angle"][()], h["entry/sample/translation"][()]
        dtype = d.dtype
    with h5py.File(path, "w") as h:
        e = h.create_group("entry")
        e.attrs["NX_class"] = "NXentry"
        det = e.create_group("instrument/detector")
        det.attrs["NX_class"] = "NXdetector"
        ds = det.create_dataset("data", shape=(n0 * nz, H, W), dtype=dtype, chunks=(1, H, W),
                                **hdf5plugin.Bitshuffle(cname="lz4"))
        for i in range(n0 * nz):
            ds.id.write_direct_chunk((i, 0, 0), raw[i % n0][1], filter_mask=raw[i % n0][0])
        e["sample/rotation_angle"] = np.tile(angle, nz)
        e["sample/translation"] = np.tile(trans, nz)
        e["sample/z"] = np.repeat(np.arange(nz) * 0.1, n0)
    return path


def _spec(sim, **integration):
    return parse_spec({"integration": {"npt": 500, "radial_range": [10.0, 66.0], **integration},
                       "calibration": {"poni": str(sim.poni_path)}})


@pytest.mark.parametrize("method", ["mean", "sigma_clip"])
def test_sink_receives_exactly_what_is_collected(sim, method):
    spec = _spec(sim, method=method, batch_frames=7)
    scan = open_nexus(sim.nexus_path)
    radial, pat, sig = integrate_scan(scan, spec)
    got_i = np.full_like(pat, np.nan)
    got_s = np.full_like(pat, np.nan)
    calls = []

    def sink(s, e, i, sg):
        calls.append((s, e))
        got_i[s:e] = i
        got_s[s:e] = sg

    radial2, p2, s2 = integrate_scan(scan, spec, sink=sink)
    assert p2 is None and s2 is None and np.array_equal(radial, radial2)
    assert calls == [(s, min(s + 7, scan.n_frames)) for s in range(0, scan.n_frames, 7)]
    assert np.array_equal(got_i, pat) and np.array_equal(got_s, sig)
    assert pat.max() > 0

    # a resumed stage integrates only the frames still to do, to the same bits
    todo = np.ones(scan.n_frames, bool)
    todo[3:12] = False
    calls.clear()
    got_i[:] = np.nan
    seen = []
    integrate_scan(scan, spec, sink=sink, todo=todo, progress=lambda d, t: seen.append((d, t)))
    assert calls == [(0, 3), (12, 19), (19, 26), (26, 33), (33, 40), (40, 47), (47, 48)]
    assert np.array_equal(got_i[todo], pat[todo]) and np.isnan(got_i[~todo]).all()
    assert seen[-1] == (int(todo.sum()),) * 2
    with pytest.raises(IntegrationError, match="todo has shape"):
        integrate_scan(scan, spec, sink=sink, todo=todo[1:])


def _stage_peak(sim, scan_path, tmp_path):
    """tracemalloc peak (bytes) of stage_integrate on one scan (numpy buffers included)."""
    from flows import process

    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = tmp_path / "spec.yaml"
    spec.write_text("integration: {npt: 1000, radial_range: [10.0, 66.0], batch_frames: 8}\n"
                    "reconstruction: {enabled: false}\noutput: {overview_png: false}\n")
    req = process.make_request(scan_path, spec, sim.poni_path, tmp_path / "out")
    req.work.parent.mkdir(parents=True, exist_ok=True)
    process.stage_integrate(req)  # warm: integrator caches, imports
    import shutil

    shutil.rmtree(req.work)
    tracemalloc.start()
    try:
        process.stage_integrate(req)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    ds = store.open_product(req.work)
    return peak, ds


def test_integrate_stage_memory_flat_in_scan_length(sim, tmp_path):
    p1 = _replicate(sim, tmp_path / "s1.nxs", 1)
    p10 = _replicate(sim, tmp_path / "s10.nxs", 10)
    peak1, ds1 = _stage_peak(sim, p1, tmp_path / "r1")
    peak10, ds10 = _stage_peak(sim, p10, tmp_path / "r10")
    assert ds10["patterns"].shape == (10, 4, 12, 1000) and ds1["patterns"].shape == (1, 4, 12, 1000)
    # every slice of the 10x scan is the 1x slice, stored on the grid
    for iz in (0, 9):
        assert np.array_equal(ds10["patterns"].isel(z=iz).values, ds1["patterns"].isel(z=0).values)
    assert float(ds1["patterns"].max()) > 0
    # outputs of the 10x scan (2 x 480 x 1000 float32 = 3.7 MB) held at once would show here;
    # the streamed stage holds a batch (8 frames) and one chunk per variable
    print(f"tracemalloc peak: 1x {peak1 / 2**20:.1f} MiB, 10x {peak10 / 2**20:.1f} MiB")
    assert peak10 < 1.5 * peak1, (peak1, peak10)


def test_sinogram_and_reconstruct_stages_slice_by_slice(sim, tmp_path, monkeypatch):
    """Three identical slices go through sinogram + reconstruct one at a time; with the
    pass-1 cache off (every slice recomputed at the common width) the product is the same."""
    from flows import process

    scan = _replicate(sim, tmp_path / "s3.nxs", 3)
    spec = tmp_path / "spec.yaml"
    spec.write_text("integration: {npt: 200, radial_range: [10.0, 66.0], batch_frames: 16}\n"
                    "sinogram: {air_columns: 1}\noutput: {overview_png: false}\n")
    out = {}
    for keep in (process.SINOGRAM_KEEP_BYTES, 0):
        monkeypatch.setattr(process, "SINOGRAM_KEEP_BYTES", keep)
        req = process.make_request(scan, spec, sim.poni_path, tmp_path / f"out{keep}")
        req.work.parent.mkdir(parents=True, exist_ok=True)
        for st in (process.stage_integrate, process.stage_sinogram, process.stage_reconstruct):
            st(req)
        ds = store.open_product(req.work)
        out[keep] = (ds["sinogram"].values, ds["volume"].values, ds["center_of_rotation"].values)
    (s_a, v_a, c_a), (s_b, v_b, c_b) = out.values()
    assert s_a.shape[0] == 3 and v_a.shape[:3] == (3, s_a.shape[2], s_a.shape[2])
    assert np.isfinite(v_a).all() and np.abs(v_a).max() > 0
    for iz in (1, 2):  # identical slices, identical results
        assert np.array_equal(s_a[iz], s_a[0]) and np.array_equal(v_a[iz], v_a[0])
    np.testing.assert_allclose(c_b, c_a, atol=1e-9)
    np.testing.assert_allclose(s_b, s_a, rtol=1e-5, atol=1e-6 * np.abs(s_a).max())
    np.testing.assert_allclose(v_b, v_a, rtol=1e-4, atol=1e-5 * np.abs(v_a).max())
