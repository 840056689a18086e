"""Tests of tasks.ingest: lazy NeXus / image-series / sinogram opening and every error case."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import dask.array as da
import h5py
import hdf5plugin
import numpy as np
import pytest

from pipelines.spec import InputSpec
from tasks import ingest
from tasks.ingest import IngestError, check_frames, file_checksum, open_scan

REAL = Path(__file__).resolve().parents[1].parent / "shared/data/real"
NA, NT, H, W = 4, 5, 24, 30
N = NA * NT


def _write_nexus(path, frames, angle, translation, z=None, monitor=None, nxdata=True,
                 compress=True):
    """The simulator's layout: /entry/instrument/detector/data (bitshuffle-LZ4, one frame per
    chunk), /entry/sample/{rotation_angle,translation,z}, /entry/monitor/data, /entry/data
    (NXdata, signal=data, hard link to the detector data)."""
    with h5py.File(path, "w") as h:
        e = h.create_group("entry")
        e.attrs["NX_class"] = "NXentry"
        det = e.create_group("instrument/detector")
        h["entry/instrument"].attrs["NX_class"] = "NXinstrument"
        det.attrs["NX_class"] = "NXdetector"
        kw = dict(chunks=(1,) + frames.shape[-2:], **hdf5plugin.Bitshuffle()) if compress else {}
        det.create_dataset("data", data=frames, **kw)
        s = e.create_group("sample")
        s.attrs["NX_class"] = "NXsample"
        s["rotation_angle"] = angle
        s["rotation_angle"].attrs["units"] = "deg"
        s["translation"] = translation
        s["translation"].attrs["units"] = "mm"
        if z is not None:
            s["z"] = z
        if monitor is not None:
            m = e.create_group("monitor")
            m.attrs["NX_class"] = "NXmonitor"
            m["data"] = monitor
        if nxdata:
            d = e.create_group("data")
            d.attrs["NX_class"] = "NXdata"
            d.attrs["signal"] = "data"
            d["data"] = det["data"]  # hard link


@pytest.fixture
def scan_arrays():
    rng = np.random.default_rng(0)
    frames = rng.poisson(20, (N, H, W)).astype(np.uint32)
    angle = np.repeat(np.linspace(0, 180, NA, endpoint=False), NT)
    translation = np.tile(np.arange(NT) * 0.25 - 0.5, NA)
    z = np.full(N, 1.5)
    monitor = rng.uniform(900, 1100, N)
    return frames, angle, translation, z, monitor


@pytest.fixture
def nexus_file(tmp_path, scan_arrays):
    p = tmp_path / "scan.nxs"
    _write_nexus(p, *scan_arrays)
    return p


# ------------------------------------------------------------------------------ NeXus
def test_simulator_layout_found_without_paths(nexus_file, scan_arrays, monkeypatch):
    frames, angle, translation, z, monitor = scan_arrays
    with h5py.File(nexus_file) as h:  # the file really is bitshuffle-LZ4 compressed
        plist = h["entry/instrument/detector/data"].id.get_create_plist()
        assert hdf5plugin.BSHUF_ID in [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]

    reads = []
    orig = ingest._H5FrameReader.__getitem__
    monkeypatch.setattr(ingest._H5FrameReader, "__getitem__",
                        lambda self, key: reads.append(key) or orig(self, key))
    scan = open_scan(nexus_file, InputSpec())
    assert reads == []  # nothing read at open
    assert scan.kind == "frames"
    assert isinstance(scan.frames, da.Array)
    assert scan.frames.shape == (N, H, W) and scan.frames.dtype == np.uint32
    assert scan.frames.chunks[1] == (H,) and scan.frames.chunks[2] == (W,)  # whole frames
    np.testing.assert_array_equal(scan.frames[7:9].compute(), frames[7:9])
    assert 0 < len(reads) <= 2  # only the chunk(s) holding frames 7..8
    np.testing.assert_array_equal(scan.frames.compute(), frames)
    np.testing.assert_allclose(scan.angle, angle)
    np.testing.assert_allclose(scan.translation, translation)
    np.testing.assert_allclose(scan.z, z)
    np.testing.assert_allclose(scan.monitor, monitor)
    assert scan.files == [str(nexus_file)]


def test_explicit_paths_and_small_chunks(tmp_path, scan_arrays):
    frames, angle, translation, z, monitor = scan_arrays
    p = tmp_path / "odd.h5"
    with h5py.File(p, "w") as h:
        h.create_dataset("scan/images", data=frames, chunks=(1, H, W), **hdf5plugin.Bitshuffle())
        h["scan/rot"] = np.deg2rad(angle)
        h["scan/rot"].attrs["units"] = "rad"
        h["scan/ty"] = translation * 1000
        h["scan/ty"].attrs["units"] = "um"
        h["scan/i0"] = monitor
    with pytest.raises(IngestError, match=r"odd\.h5: no frame stack.*set input\.frames"):
        open_scan(p, InputSpec())
    spec = InputSpec(kind="nexus", frames="/scan/images", angle="/scan/rot", translation="/scan/ty",
                     monitor="/scan/i0")
    scan = ingest.open_nexus(p, spec, chunk_frames=3)
    assert scan.frames.chunks[0][0] == 3
    np.testing.assert_array_equal(scan.frames.compute(), frames)
    np.testing.assert_allclose(scan.angle, angle)  # rad -> deg
    np.testing.assert_allclose(scan.translation, translation)  # um -> mm
    np.testing.assert_allclose(scan.monitor, monitor)
    # the dask graph pickles (distributed workers re-open the file by path)
    f2 = pickle.loads(pickle.dumps(scan.frames))
    np.testing.assert_array_equal(f2[4].compute(), frames[4])


def test_4d_storage_is_flattened(tmp_path, scan_arrays):
    frames, angle, translation, *_ = scan_arrays
    p = tmp_path / "scan4d.h5"
    with h5py.File(p, "w") as h:
        e = h.create_group("entry")
        e.attrs["NX_class"] = "NXentry"
        e.create_dataset("instrument/detector/data", data=frames.reshape(NA, NT, H, W),
                         chunks=(1, 1, H, W), **hdf5plugin.Bitshuffle())
        e["sample/rotation_angle"] = angle[::NT]           # (n_angle,)
        e["sample/translation"] = translation.reshape(NA, NT)  # (n_angle, n_translation)
    scan = open_scan(p, InputSpec())
    assert scan.frames.shape == (N, H, W)
    np.testing.assert_array_equal(scan.frames.compute(), frames)
    np.testing.assert_array_equal(scan.frames[3:13].compute(), frames[3:13])  # crosses rows
    np.testing.assert_allclose(scan.angle, angle)
    np.testing.assert_allclose(scan.translation, translation)
    g = scan.grid()
    assert g.shape == (1, NA, NT)
    np.testing.assert_allclose(g.angle, angle[::NT])
    np.testing.assert_allclose(g.translation, translation[:NT])
    np.testing.assert_array_equal(g.index[0], np.arange(N).reshape(NA, NT))


def test_grid_absorbs_encoder_jitter(nexus_file, scan_arrays):
    frames, angle, translation, z, monitor = scan_arrays
    scan = open_scan(nexus_file, InputSpec())
    rng = np.random.default_rng(3)
    perm = rng.permutation(N)  # frames in any order
    scan.angle = angle[perm] + rng.normal(0, 1e-3, N)
    scan.translation = translation[perm] + rng.normal(0, 1e-4, N)
    g = scan.grid()
    assert g.shape == (1, NA, NT)
    np.testing.assert_allclose(g.angle, np.unique(angle), atol=2e-3)
    np.testing.assert_allclose(g.translation, np.unique(translation), atol=2e-4)
    # every grid point maps back to the frame that was measured there
    ia, it = np.meshgrid(np.arange(NA), np.arange(NT), indexing="ij")
    np.testing.assert_allclose(angle[perm][g.index[0]], np.unique(angle)[ia])
    np.testing.assert_allclose(translation[perm][g.index[0]], np.unique(translation)[it])


# ------------------------------------------------------------------------------ errors
def test_missing_and_corrupt_files(tmp_path, nexus_file):
    with pytest.raises(IngestError, match="does not exist"):
        open_scan(tmp_path / "nope.nxs", InputSpec())
    data = nexus_file.read_bytes()
    trunc = tmp_path / "truncated.nxs"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(IngestError, match=r"truncated\.nxs.*(HDF5|truncated)"):
        open_scan(trunc, InputSpec(kind="nexus"))
    # a damaged compressed chunk: opens, fails when that chunk is read, naming the dataset
    bad = tmp_path / "badchunk.nxs"
    bad.write_bytes(data)
    with h5py.File(bad) as h:
        info = h["entry/instrument/detector/data"].id.get_chunk_info(5)
    raw = bytearray(bad.read_bytes())
    raw[info.byte_offset: info.byte_offset + info.size] = b"\xff" * info.size
    bad.write_bytes(bytes(raw))
    scan = ingest.open_nexus(bad, InputSpec(), chunk_frames=1)
    scan.frames[4].compute()  # undamaged chunk reads
    with pytest.raises(IngestError, match=r"badchunk\.nxs: dataset /entry/.*data: cannot read frames 5\.\.5"):
        scan.frames[5].compute()


def test_unequal_lengths_named(tmp_path, scan_arrays):
    frames, angle, translation, z, monitor = scan_arrays
    p = tmp_path / "short_angle.nxs"
    _write_nexus(p, frames, angle[:-1], translation)
    with pytest.raises(IngestError, match=r"short_angle\.nxs.*/entry/sample/rotation_angle.*19.*20 values"):
        open_scan(p, InputSpec())
    p = tmp_path / "short_mon.nxs"
    _write_nexus(p, frames, angle, translation, monitor=monitor[:7])
    with pytest.raises(IngestError, match=r"/entry/monitor/data.*monitor"):
        open_scan(p, InputSpec())
    p = tmp_path / "zero_mon.nxs"
    m = monitor.copy()
    m[4] = 0
    _write_nexus(p, frames, angle, translation, monitor=m)
    with pytest.raises(IngestError, match=r"/entry/monitor/data.*frame 4.*> 0"):
        open_scan(p, InputSpec())
    p = tmp_path / "no_angle.h5"
    with h5py.File(p, "w") as h:
        h["entry/instrument/detector/data"] = frames
        h["entry/sample/translation"] = translation
    with pytest.raises(IngestError, match=r"no_angle\.h5.*no angle dataset.*input\.angle"):
        open_scan(p, InputSpec())
    with pytest.raises(IngestError, match=r"'/entry/sample/rot'.*input\.angle.*not found"):
        open_scan(p, InputSpec(angle="/entry/sample/rot"))


def test_dtype_empty_and_shape_errors(tmp_path, scan_arrays):
    frames, angle, translation, *_ = scan_arrays
    p = tmp_path / "strings.h5"
    with h5py.File(p, "w") as h:
        h["entry/instrument/detector/data"] = np.array([[[b"ab"] * W] * H] * 2)
        h["entry/sample/rotation_angle"] = [0.0, 1.0]
        h["entry/sample/translation"] = [0.0, 0.0]
    with pytest.raises(IngestError, match=r"strings\.h5.*/entry/instrument/detector/data.*dtype"):
        open_scan(p, InputSpec(kind="nexus", frames="/entry/instrument/detector/data"))
    p = tmp_path / "empty.h5"
    with h5py.File(p, "w") as h:
        h.create_dataset("entry/instrument/detector/data", shape=(0, H, W), dtype=np.uint32)
        h["entry/sample/rotation_angle"] = np.zeros(0)
        h["entry/sample/translation"] = np.zeros(0)
    with pytest.raises(IngestError, match=r"empty\.h5.*empty scan"):
        open_scan(p, InputSpec(kind="nexus"))
    p = tmp_path / "ok.nxs"
    _write_nexus(p, frames, angle, translation)
    with pytest.raises(IngestError, match=r"ok\.nxs.*frame shape \(24, 30\).*\(1679, 1475\)"):
        open_scan(p, InputSpec(), poni_shape=(1679, 1475))


def test_grid_duplicates_and_holes(nexus_file, scan_arrays):
    frames, angle, translation, *_ = scan_arrays
    scan = open_scan(nexus_file, InputSpec())
    a = angle.copy()
    a[1] = a[0]
    t = translation.copy()
    t[1] = t[0]
    scan.angle, scan.translation = a, t
    with pytest.raises(IngestError, match=r"scan\.nxs: duplicated grid point.*frames \[0, 1\]"):
        scan.grid()
    scan.angle, scan.translation = angle.copy(), translation.copy()
    scan.translation[3] = 7.0  # one frame off the grid -> a new column with one frame
    with pytest.raises(IngestError, match=r"incomplete grid"):
        scan.grid()


def test_check_frames():
    good = np.random.default_rng(1).poisson(5, (3, 8, 9)).astype(np.int32)
    check_frames(good, "f.h5: /d", 10)  # no error
    bad = good.copy()
    bad[1, 2, 3] = -7
    with pytest.raises(IngestError, match=r"f\.h5: /d: frame 11: negative value -7 at pixel \(row 2, col 3\)"):
        check_frames(bad, "f.h5: /d", 10)
    mask = np.zeros((8, 9), bool)
    mask[2, 3] = True
    check_frames(bad, "f.h5: /d", 10, mask=mask)  # masked: allowed
    dummy = good.copy()
    dummy[0, 0, 0] = -2
    check_frames(dummy, "x", 0, dummy=-2.0, delta_dummy=1.5)  # detector dummy: allowed
    with pytest.raises(IngestError, match="negative"):
        check_frames(dummy, "x", 0)
    fl = good.astype(np.float32)
    fl[2, 5, 5] = np.nan
    with pytest.raises(IngestError, match=r"frame 2: NaN/inf value nan at pixel \(row 5, col 5\)"):
        check_frames(fl, "x", 0)
    with pytest.raises(IngestError, match="dtype"):
        check_frames(good.astype(bool), "x", 0)


# ------------------------------------------------------------------------------ image series
def _write_edf(path, data):
    import fabio

    fabio.edfimage.EdfImage(data=data).write(str(path))


def test_image_series_table(tmp_path, scan_arrays):
    frames, angle, translation, *_ = scan_arrays
    (tmp_path / "img").mkdir()
    rows = ["file,angle,translation,monitor"]
    for i in range(N):
        _write_edf(tmp_path / "img" / f"f_{i:03d}.edf", frames[i].astype(np.int32))
        rows.append(f"img/f_{i:03d}.edf,{angle[i]},{translation[i]},{1000 + i}")
    table = tmp_path / "scan.csv"
    table.write_text("\n".join(rows) + "\n")
    scan = open_scan(table, InputSpec())
    assert scan.kind == "frames" and scan.frames.shape == (N, H, W)
    assert scan.frames.chunks[0] == (1,) * N  # one chunk per file
    np.testing.assert_array_equal(scan.frames.compute(), frames.astype(np.int32))
    np.testing.assert_allclose(scan.angle, angle)
    np.testing.assert_allclose(scan.monitor, 1000 + np.arange(N))
    assert scan.files[0] == str(table) and len(scan.files) == N + 1
    assert scan.grid().shape == (1, NA, NT)
    # TSV with a raster map
    tsv = tmp_path / "map.tsv"
    tsv.write_text("file\ty\tx\n" + "\n".join(
        f"img/f_{i:03d}.edf\t{i // 5 * 0.1}\t{i % 5 * 0.2}" for i in range(N)))
    m = open_scan(tsv, InputSpec())
    assert m.kind == "map" and m.grid().shape == (1, 4, 5)
    np.testing.assert_array_equal(m.grid().index[0], np.arange(N).reshape(4, 5))
    # errors: missing files (all listed), missing columns, bad numbers, empty table
    bad = tmp_path / "missing.csv"
    bad.write_text("file,angle,translation\nimg/f_000.edf,0,0\nimg/nope1.edf,0,1\nimg/nope2.edf,0,2\n")
    with pytest.raises(IngestError, match=r"missing\.csv: column 'file': 2 of 3 image\(s\) do not exist: .*nope1\.edf.*nope2\.edf"):
        open_scan(bad, InputSpec())
    bad.write_text("file,omega\nimg/f_000.edf,0\n")
    with pytest.raises(IngestError, match=r"missing\.csv.*expected columns 'angle' and 'translation'"):
        open_scan(bad, InputSpec())
    bad.write_text("file,angle,translation\nimg/f_000.edf,zero,0\n")
    with pytest.raises(IngestError, match=r"missing\.csv: line 2: column 'angle': 'zero' is not a number"):
        open_scan(bad, InputSpec())
    bad.write_text("file,angle,translation\n")
    with pytest.raises(IngestError, match="empty scan"):
        open_scan(bad, InputSpec())
    # an image of another shape fails when read, naming the file
    _write_edf(tmp_path / "img" / "small.edf", np.zeros((5, 5), np.int32))
    bad.write_text("file,angle,translation\nimg/f_000.edf,0,0\nimg/small.edf,0,1\n")
    s = open_scan(bad, InputSpec())
    with pytest.raises(IngestError, match=r"small\.edf: image shape \(5, 5\) differs"):
        s.frames.compute()
    with pytest.raises(IngestError, match=r"f_000\.edf: frame shape \(24, 30\) differs.*\(10, 10\)"):
        open_scan(table, InputSpec(), poni_shape=(10, 10))


# ------------------------------------------------------------------------------ sinograms
def test_sinogram_axes_and_angles(tmp_path):
    rng = np.random.default_rng(2)
    cube = rng.random((7, 6, 5)).astype(np.float64)  # stored (radial, angle, translation)
    p = tmp_path / "sino.h5"
    with h5py.File(p, "w") as h:
        h["cube"] = cube
        h["rot"] = np.linspace(0, 90, 6)
    with pytest.raises(IngestError, match=r"sino\.h5.*no angle dataset.*angle_range_deg"):
        open_scan(p, InputSpec(kind="sinogram", sinogram="/cube", sinogram_axes="radial,angle,translation"))
    s = open_scan(p, InputSpec(kind="sinogram", sinogram="/cube", sinogram_axes="radial,angle,translation",
                               angle="/rot", translation_step_mm=0.05))
    assert s.kind == "sinogram" and s.sinogram.dtype == np.float32
    np.testing.assert_allclose(s.sinogram.compute(), cube.transpose(1, 2, 0), rtol=1e-6)
    np.testing.assert_allclose(s.sino_angle, np.linspace(0, 90, 6))
    np.testing.assert_allclose(s.sino_translation, np.arange(5) * 0.05)
    with pytest.raises(IngestError, match=r"/rot \(input.angle\) has 6 values; expected 7"):
        open_scan(p, InputSpec(kind="sinogram", sinogram="/cube", angle="/rot"))
    with pytest.raises(IngestError, match=r"'/nope' \(input.sinogram\) not found"):
        open_scan(p, InputSpec(sinogram="/nope"))
    with h5py.File(p, "a") as h:
        c = cube.copy()
        c[3, 2, 1] = np.nan
        h["nan"] = c
    s = open_scan(p, InputSpec(sinogram="/nan", sinogram_axes="radial,angle,translation",
                               angle_range_deg=180))
    with pytest.raises(IngestError, match=r"sino\.h5: dataset /nan: sinogram contains NaN"):
        s.sinogram.compute()


@pytest.mark.real
def test_real_pyxrdct_sinogram():
    f = REAL / "pyxrdct_sinograms/pyxrdct_image1_sinogram.hdf5"
    if not f.exists():
        pytest.skip(f"real data not found: {f}")
    # nDTomo's (translation, angle) order read under the default (angle, translation):
    # refused from the data (a projection's total does not vary with angle), naming the fix
    with pytest.raises(IngestError, match=r"as if angle and translation were swapped; set "
                                          r"input.sinogram_axes .*'translation,angle'"):
        open_scan(f, InputSpec())
    s = open_scan(f, InputSpec(sinogram_axes="translation,angle", angle_range_deg=180))
    assert s.sinogram.shape == (180, 708, 1)
    x = s.sinogram.compute()[..., 0]
    with h5py.File(f) as h:
        np.testing.assert_array_equal(x, h["data/sinogram_00000"][()].T)
    np.testing.assert_allclose(s.sino_angle, np.arange(180.0))
    # it is a parallel-beam sinogram over 180 deg: the total intensity of every projection is
    # the same (mass conservation), and the last projection mirrors the first
    tot = x.sum(axis=1, dtype=np.float64)
    assert np.ptp(tot) / tot.mean() < 1e-3
    first, last = x[0] - x[0].mean(), x[-1][::-1] - x[-1].mean()
    best = max(np.corrcoef(np.roll(first, k), last)[0, 1] for k in range(-20, 21))
    assert best > 0.99


@pytest.mark.real
def test_real_savu_nexus_sinogram():
    f = REAL / "savu_sinograms/stxm_single_sino.nxs"
    if not f.exists():
        pytest.skip(f"real data not found: {f}")
    s = open_scan(f, InputSpec())  # NXdata axes (theta, x) give the order and the angles
    assert s.kind == "sinogram" and s.sinogram.shape == (52, 101, 1)
    with h5py.File(f) as h:
        np.testing.assert_allclose(s.sino_angle, h["entry1/stxm_entry/data/theta"][()])
        np.testing.assert_allclose(s.sino_translation, h["entry1/stxm_entry/data/x"][()])


def test_file_checksum(tmp_path):
    p = tmp_path / "blob.bin"
    data = np.random.default_rng(0).bytes(3 * (1 << 20) + 17)
    p.write_bytes(data)
    assert file_checksum(p) == hashlib.sha256(data).hexdigest()
    assert file_checksum(p, chunk_size=1000) == hashlib.sha256(data).hexdigest()
    with pytest.raises(IngestError, match="nope.bin"):
        file_checksum(tmp_path / "nope.bin")
