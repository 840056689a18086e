"""Bitshuffle-LZ4 chunks read with read_direct_chunk and decoded in parallel (tasks.h5chunks):
bit-exact against h5py's own filtered read, fallbacks, corrupt chunks, real data."""

from __future__ import annotations

import pickle
import struct

import h5py
import hdf5plugin
import numpy as np
import pytest

from tasks import h5chunks, ingest
from tasks.ingest import IngestError, open_nexus
from tests.conftest import real_path

pytest.importorskip("bitshuffle")


def _write(path, frames, chunks=None, **filt):
    """Minimal NeXus frame file: /entry/instrument/detector/data + sample axes."""
    lead = frames.shape[:-2]
    n = int(np.prod(lead))
    with h5py.File(path, "w") as h:
        e = h.create_group("entry")
        e.attrs["NX_class"] = "NXentry"
        det = e.create_group("instrument/detector")
        det.attrs["NX_class"] = "NXdetector"
        det.create_dataset("data", data=frames, chunks=chunks, **filt)
        s = e.create_group("sample")
        if len(lead) == 1:
            s["rotation_angle"] = np.repeat(np.arange(n // 2) * 10.0, 2)
            s["translation"] = np.tile([0.0, 1.0], n // 2)
        else:
            s["rotation_angle"] = np.arange(lead[-2]) * 10.0
            s["translation"] = np.arange(lead[-1]) * 1.0
    return path


def _h5py_read(path, idx, ky=slice(None), kx=slice(None)):
    with h5py.File(path, "r") as h:
        d = h["entry/instrument/detector/data"]
        flat = d[()].reshape((-1,) + d.shape[-2:])
    return flat[idx][:, ky, kx]


@pytest.fixture
def frames():
    rng = np.random.default_rng(1)
    f = rng.poisson(3, (12, 37, 53)).astype(np.uint32)
    f[3, 5:9, 7:11] = 4_000_000_000  # values using the high bits
    return f


def test_plan_only_for_bitshuffle_lz4_whole_frames(tmp_path, frames):
    cases = {
        "bslz4": (dict(chunks=(1, 37, 53), **hdf5plugin.Bitshuffle(cname="lz4")), True),
        "bslz4_multi": (dict(chunks=(5, 37, 53), **hdf5plugin.Bitshuffle(cname="lz4")), True),
        "bs_none": (dict(chunks=(1, 37, 53), **hdf5plugin.Bitshuffle(cname="none")), False),
        "gzip": (dict(chunks=(1, 37, 53), compression="gzip"), False),
        "partial_frame": (dict(chunks=(1, 16, 53), **hdf5plugin.Bitshuffle(cname="lz4")), False),
        "contiguous": (dict(), False),
    }
    for name, (kw, direct) in cases.items():
        p = _write(tmp_path / f"{name}.nxs", frames, **kw)
        with h5py.File(p) as h:
            plan = h5chunks.direct_plan(h["entry/instrument/detector/data"])
        assert (plan is not None) == direct, name
        scan = open_nexus(p)
        got = scan.frames.compute(scheduler="synchronous")
        assert got.dtype == frames.dtype and np.array_equal(got, frames), name


@pytest.mark.parametrize("dtype", ["<u4", "<u2", "<i4", ">u4", "<f4", "<f8", "u1"])
def test_bit_exact_against_h5py(tmp_path, dtype):
    rng = np.random.default_rng(2)
    f = rng.poisson(50, (10, 33, 41)).astype(dtype)
    if np.dtype(dtype).kind == "f":
        f = f * np.float32(0.37) - 3.0
    p = _write(tmp_path / "s.nxs", f, chunks=(1, 33, 41), **hdf5plugin.Bitshuffle(cname="lz4"))
    with h5py.File(p) as h:
        d = h["entry/instrument/detector/data"]
        plan = h5chunks.direct_plan(d)
        assert plan is not None
        for idx, ky, kx in [(np.arange(10), slice(None), slice(None)),
                            (np.array([7, 2, 2, 9]), slice(None), slice(None)),
                            (np.arange(3, 8), slice(4, 20), slice(1, None, 3))]:
            got = h5chunks.read_frames_direct(d, plan, (10,), idx, ky, kx)
            want = _h5py_read(p, idx, ky, kx)
            assert got.dtype == d.dtype
            assert got.tobytes() == want.tobytes()


def test_multi_frame_and_4d_chunks_with_edges(tmp_path):
    rng = np.random.default_rng(3)
    f = rng.poisson(7, (3, 5, 19, 23)).astype(np.uint32)  # (angle, translation, H, W)
    # chunks of 2 x 3 frames: the last chunk along each scan axis is a partial edge chunk
    p = _write(tmp_path / "s4.nxs", f, chunks=(2, 3, 19, 23), **hdf5plugin.Bitshuffle(cname="lz4"))
    scan = open_nexus(p, chunk_frames=4)
    assert scan.frames.chunks[0] == (4, 4, 4, 3)
    got = scan.frames.compute(scheduler="synchronous")
    assert np.array_equal(got, f.reshape(15, 19, 23))
    idx = np.array([14, 0, 6, 7, 5])
    with h5py.File(p) as h:
        d = h["entry/instrument/detector/data"]
        plan = h5chunks.direct_plan(d)
        assert plan.chunks == (2, 3, 19, 23)
        got = h5chunks.read_frames_direct(d, plan, (3, 5), idx)
    assert np.array_equal(got, f.reshape(15, 19, 23)[idx])


def test_reader_uses_direct_path_and_pickles(tmp_path, frames, monkeypatch):
    p = _write(tmp_path / "s.nxs", frames, chunks=(1, 37, 53), **hdf5plugin.Bitshuffle(cname="lz4"))
    calls = []
    orig = h5chunks.read_frames_direct
    monkeypatch.setattr(h5chunks, "read_frames_direct",
                        lambda *a, **k: calls.append(len(a[3])) or orig(*a, **k))
    scan = open_nexus(p, chunk_frames=5)
    got = scan.frames.compute(scheduler="synchronous")
    assert np.array_equal(got, frames)
    assert sorted(calls) == [2, 5, 5]
    r = ingest._H5FrameReader(str(p), "/entry/instrument/detector/data", frames.shape, frames.dtype,
                              direct=h5chunks.ChunkPlan((1, 37, 53), 4))
    r2 = pickle.loads(pickle.dumps(r))
    assert r2.direct == r.direct
    assert np.array_equal(r2[4:6], frames[4:6])
    # the flag turns the direct path off; the arrays are identical
    calls.clear()
    off = open_nexus(p, direct_chunks=False).frames.compute(scheduler="synchronous")
    assert calls == [] and np.array_equal(off, frames)


def test_chunk_stored_unfiltered_is_read_raw(tmp_path, frames):
    p = _write(tmp_path / "s.nxs", frames, chunks=(1, 37, 53), **hdf5plugin.Bitshuffle(cname="lz4"))
    new = (frames[4] + 7).astype(np.uint32)
    with h5py.File(p, "a") as h:  # filter mask bit 0 set: the bitshuffle filter was skipped
        h["entry/instrument/detector/data"].id.write_direct_chunk((4, 0, 0), new.tobytes(), filter_mask=1)
    want = frames.copy()
    want[4] = new
    assert np.array_equal(_h5py_read(p, np.arange(12)), want)  # libhdf5 agrees
    got = open_nexus(p).frames.compute(scheduler="synchronous")
    assert np.array_equal(got, want)


def test_corrupt_chunk_raises_naming_the_chunk(tmp_path, frames):
    p = _write(tmp_path / "s.nxs", frames, chunks=(1, 37, 53), **hdf5plugin.Bitshuffle(cname="lz4"))
    with h5py.File(p, "a") as h:
        d = h["entry/instrument/detector/data"]
        _m, buf = d.id.read_direct_chunk((6, 0, 0))
        # LZ4 block of the wrong compressed length (libhdf5's filter rejects it too)
        d.id.write_direct_chunk((6, 0, 0), buf[:12] + struct.pack(">I", 5) + buf[16:])
        _m, buf = d.id.read_direct_chunk((7, 0, 0))
        d.id.write_direct_chunk((7, 0, 0), buf[: len(buf) // 2])  # truncated
        _m, buf = d.id.read_direct_chunk((8, 0, 0))
        d.id.write_direct_chunk((8, 0, 0), struct.pack(">QI", 999, 8192) + buf[12:])  # wrong size
    scan = open_nexus(p, chunk_frames=1)
    with pytest.raises(IngestError, match=r"frames 6\.\.6.*chunk at \(6, 0, 0\)"):
        scan.frames[6].compute(scheduler="synchronous")
    with pytest.raises(IngestError, match=r"chunk at \(7, 0, 0\): corrupt bitshuffle-LZ4"):
        scan.frames[7].compute(scheduler="synchronous")
    with pytest.raises(IngestError, match=r"chunk at \(8, 0, 0\).*header says 999 bytes"):
        scan.frames[8].compute(scheduler="synchronous")
    with h5py.File(p) as h:  # h5py's own read of the same chunks fails as well
        with pytest.raises(OSError):
            h["entry/instrument/detector/data"][6]
    assert np.array_equal(scan.frames[9].compute(scheduler="synchronous"), frames[9])


def test_simulator_file_bit_exact(tmp_path):
    from tasks.simulate import SimConfig, simulate_scan

    sim = simulate_scan(tmp_path / "scan", SimConfig(n_translations=12, n_angles=4, npt_sim=500,
                                                     cor_offset_px=0.0))
    with h5py.File(sim.nexus_path) as h:
        d = h["entry/instrument/detector/data"]
        assert h5chunks.direct_plan(d) is not None, "the simulator writes bitshuffle-LZ4 frame chunks"
        want = d[()]
    got = open_nexus(sim.nexus_path).frames.compute(scheduler="synchronous")
    assert got.dtype == want.dtype and np.array_equal(got, want)
    assert want.max() > 0


def _real_bitshuffle_datasets(real_dir):
    """Frame datasets (ndim >= 3) under ``real_dir`` that the direct path can read."""
    out = []
    for f in sorted(real_dir.rglob("*")):
        if f.suffix.lower() not in (".h5", ".hdf5", ".nxs", ".nx5", ".hdf") or not h5py.is_hdf5(f):
            continue
        with h5py.File(f, "r") as h:
            def visit(name, o, f=f):
                if isinstance(o, h5py.Dataset) and o.ndim >= 3 and h5chunks.direct_plan(o) is not None:
                    out.append((f, name))
            h.visititems(visit)
    return out


@pytest.mark.real
def test_real_bitshuffle_data_bit_exact(tmp_path, real):
    """Real Pilatus 1M frames (the nine Fe3O4/C map TIFFs, int32 with negative gap and
    dead pixels) written as a (3, 3, H, W) bitshuffle-LZ4 frame dataset, as Dectris
    detectors write them: the direct path returns fabio's frames bit for bit, and the
    reader open_nexus uses it (its frames equal too). Any bitshuffle-LZ4 frame dataset
    found in the real data itself is checked against h5py's filtered read as well (the
    files there today are uncompressed sinograms, so none is)."""
    import fabio

    d = real("dioptas_fe3o4c_map")
    tifs = sorted(d.glob("Fe3O4C_M1_map_*_P1_E1_001.tif"))
    assert len(tifs) == 9, tifs
    want = np.stack([fabio.open(str(t)).data for t in tifs])
    assert want.dtype == np.int32 and want.min() < 0 and want.max() > 1000   # gaps and signal
    H, W = want.shape[-2:]
    p = _write(tmp_path / "fe.nxs", want.reshape(3, 3, H, W), chunks=(1, 1, H, W),
               **hdf5plugin.Bitshuffle(cname="lz4"))
    with h5py.File(p) as h:
        ds = h["entry/instrument/detector/data"]
        plan = h5chunks.direct_plan(ds)
        assert plan is not None, "real frames written bitshuffle-LZ4 take the direct path"
        idx = np.array([8, 0, 4, 5])
        got = h5chunks.read_frames_direct(ds, plan, (3, 3), idx)
    assert got.dtype == want.dtype and np.array_equal(got, want[idx])
    assert np.array_equal(open_nexus(p).frames.compute(scheduler="synchronous").reshape(want.shape), want)
    for f, name in _real_bitshuffle_datasets(real_path()):
        with h5py.File(f, "r") as h:
            ds = h[name]
            n = int(np.prod(ds.shape[:-2]))
            idx = np.unique(np.linspace(0, n - 1, min(n, 8)).astype(int))
            got = h5chunks.read_frames_direct(ds, h5chunks.direct_plan(ds), ds.shape[:-2], idx)
            ref = np.stack([ds[np.unravel_index(i, ds.shape[:-2])] for i in idx])
        assert np.array_equal(got, ref), f"{f}: {name}"


def test_ctypes_decoder_and_python_fallback_agree(tmp_path, frames, monkeypatch):
    p = _write(tmp_path / "s.nxs", frames, chunks=(1, 37, 53), **hdf5plugin.Bitshuffle(cname="lz4"))
    with h5py.File(p) as h:
        d = h["entry/instrument/detector/data"]
        _m, buf = d.id.read_direct_chunk((3, 0, 0))
        plan = h5chunks.direct_plan(d)
        assert h5chunks._c_decoder() is not None, "bitshuffle's C decoder is exported"
        out = np.empty((1, 37, 53), np.uint32)
        h5chunks.decode_bitshuffle_lz4_into(buf, out)
        assert np.array_equal(out[0], frames[3])
        assert np.array_equal(h5chunks.decode_bitshuffle_lz4(buf, (1, 37, 53), np.uint32)[0], frames[3])
        with pytest.raises(ValueError, match="header says"):
            h5chunks.decode_bitshuffle_lz4_into(buf, np.empty((2, 37, 53), np.uint32))
        monkeypatch.setattr(h5chunks, "_C_DECODE", False)  # no exported symbol: Python API
        assert h5chunks._c_decoder() is None
        got = h5chunks.read_frames_direct(d, plan, (12,), np.arange(12))
    assert np.array_equal(got, frames)


def test_read_into_a_staging_buffer(tmp_path):
    """The GPU path's reader fills a given (pinned) buffer in place: bitshuffle-LZ4 frames
    decoded straight into it and plain h5py datasets read into it both equal the frames
    read the ordinary way, a partial last batch leaves the rest of the buffer untouched,
    and a buffer of the wrong shape or dtype is refused by name."""
    from tasks.simulate import SimConfig, simulate_scan

    sim = simulate_scan(tmp_path / "scan", SimConfig(n_translations=12, n_angles=4, npt_sim=500,
                                                     cor_offset_px=0.0))
    with h5py.File(sim.nexus_path) as h:
        want = h["entry/instrument/detector/data"][()].reshape((-1,) + h["entry/instrument/detector/data"].shape[-2:])
    for direct in (True, False):
        reader = open_nexus(sim.nexus_path, direct_chunks=direct).reader
        assert (reader.direct is not None) == direct
        buf = np.full((8,) + want.shape[1:], 7, want.dtype)
        got = reader.read_into(5, 10, buf[:5])
        assert got.base is buf or got is buf[:5] or np.shares_memory(got, buf)
        np.testing.assert_array_equal(buf[:5], want[5:10])
        assert np.all(buf[5:] == 7)
    plan = h5chunks.direct_plan
    with h5py.File(sim.nexus_path) as h:
        d = h["entry/instrument/detector/data"]
        with pytest.raises(ValueError, match="out: expected"):
            h5chunks.read_frames_direct(d, plan(d), d.shape[:-2], np.arange(3),
                                        out=np.empty((3,) + want.shape[1:], np.float32))
