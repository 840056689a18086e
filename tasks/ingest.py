"""Open XRD-CT scans lazily: NeXus/HDF5 frame stacks, detector-image series, sinogram cubes.

Nothing here loads a scan. Frames come back as a :mod:`dask.array` whose chunks are whole
frames; each chunk is read by a small picklable reader that re-opens the file read-only by
path, so the same graph runs on local threads and on distributed workers. Axis arrays
(angle, translation, z, monitor) are small and read eagerly.

Sources
-------
* NeXus/HDF5 (h5py + hdf5plugin, so bitshuffle-LZ4 and other filtered datasets open).
  Bitshuffle-LZ4 frame chunks are read raw and decoded in parallel (:mod:`tasks.h5chunks`).
  Frames stored ``(N, H, W)``, ``(n_angle, n_translation, H, W)`` or
  ``(n_z, n_angle, n_translation, H, W)`` are presented as ``(N, H, W)`` with matching
  flat axis arrays (C order: translation fastest).
* Image series (TIFF, CBF, EDF, ... anything fabio reads) listed by a scan table
  (CSV/TSV with a header).
* Already-integrated sinograms ``(angle, translation[, radial])`` in HDF5.

Errors
------
Every problem with the input raises :class:`IngestError` (a ``ValueError``) whose message
names the file, the dataset or column, and what was expected.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

try:  # registers the HDF5 compression filters (bitshuffle-LZ4, ...) with h5py
    import hdf5plugin  # noqa: F401
except ImportError:  # pragma: no cover - hdf5plugin is a declared dependency
    hdf5plugin = None
import h5py

__all__ = [
    "IngestError", "Scan", "Grid", "open_scan", "open_nexus", "open_image_series",
    "open_sinogram", "check_frames", "file_checksum", "HDF5_SUFFIXES", "TABLE_SUFFIXES",
]

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs", ".nx5", ".nx", ".he5")
TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".dat")
#: target size of one dask chunk of frames (a whole number of frames, at least one)
CHUNK_BYTES = 32 * 2**20

# Conventional dataset names, tried in order, relative to an NXentry.
_FRAME_PATHS = ("instrument/detector/data", "data/data", "measurement/data")
_ANGLE_PATHS = ("sample/rotation_angle", "sample/rot", "sample/omega", "sample/theta",
                "sample/angle", "data/rotation_angle", "data/rot", "data/omega", "data/theta",
                "data/angle", "instrument/positioners/rot", "measurement/rot")
_TRANSLATION_PATHS = ("sample/translation", "sample/dty", "sample/x", "sample/y",
                      "data/translation", "data/dty", "data/x",
                      "instrument/positioners/dty", "measurement/dty")
_Z_PATHS = ("sample/z", "sample/dtz", "data/z", "instrument/positioners/dtz")
_MONITOR_PATHS = ("monitor/data", "control/data", "instrument/monitor/data",
                  "measurement/monitor")

_ANGLE_UNITS = {"deg": 1.0, "degree": 1.0, "degrees": 1.0, "°": 1.0,
                "rad": 180.0 / np.pi, "radian": 180.0 / np.pi, "radians": 180.0 / np.pi,
                "mrad": 0.18 / np.pi, "urad": 1.8e-4 / np.pi}
_LENGTH_UNITS = {"mm": 1.0, "millimeter": 1.0, "millimetre": 1.0,
                 "m": 1e3, "meter": 1e3, "metre": 1e3, "cm": 10.0,
                 "um": 1e-3, "µm": 1e-3, "micron": 1e-3, "microns": 1e-3, "micrometer": 1e-3,
                 "nm": 1e-6}


class IngestError(ValueError):
    """Input that cannot be used; the message names the file, the dataset and the expectation."""


# --------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------

@dataclass
class Grid:
    """The regular scan grid behind a list of frames.

    Attributes
    ----------
    z : numpy.ndarray, shape (nz,), float64
        Slice positions in mm (``[0.0]`` when the scan has no z).
    angle : numpy.ndarray, shape (na,), float64
        Rotation angles in deg (for a raster map: the y positions in mm).
    translation : numpy.ndarray, shape (nt,), float64
        Translations in mm (for a raster map: the x positions in mm).
    index : numpy.ndarray, shape (nz, na, nt), int64
        Frame index of each grid point; every point has exactly one frame.
    """

    z: np.ndarray
    angle: np.ndarray
    translation: np.ndarray
    index: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.index.shape)


@dataclass
class Scan:
    """A scan opened lazily.

    Attributes
    ----------
    kind : str
        ``"frames"`` (XRD-CT frames, NeXus or image series), ``"map"`` (raster map
        without rotation, image series with ``y,x``) or ``"sinogram"`` (already integrated).
    source : str
        Path of the HDF5 file or of the scan table.
    frames : dask.array.Array or None
        ``(n_frames, H, W)`` in the detector's dtype; chunks are whole frames.
    angle, translation, z, monitor : numpy.ndarray or None
        ``(n_frames,)``: rotation angle in deg, translation in mm, z in mm, monitor counts.
    sinogram : dask.array.Array or None
        ``(angle, translation, radial)`` float32 (kind ``"sinogram"``).
    sino_angle, sino_translation : numpy.ndarray or None
        Axes of ``sinogram``: deg and ``translation_unit``.
    translation_unit : str
        ``"mm"``, or ``"px"`` for sinogram input without translation positions or step
        (positions are then translation steps 0, 1, ...).
    radial : numpy.ndarray or None
        Radial axis of ``sinogram`` in ``radial_unit`` when the file provides it.
    radial_unit : str or None
        pyFAI unit name of ``radial``.
    wavelength_m : float or None
        Wavelength in m when known (from the input spec, or for sinogram input the
        ``wavelength_m`` attribute of the radial dataset or its group).
    map_y, map_x : numpy.ndarray or None
        ``(n_frames,)`` raster positions in mm (kind ``"map"``).
    files : list of str
        Every file read (for checksums): the HDF5 file, or the scan table and its images.
    frames_dataset : str or None
        HDF5 path of the frames (for messages), or the table column ``file``.
    metadata : dict of str to str
        What the catalog files the scan under, when the file says it (:func:`nexus_metadata`):
        ``proposal``, ``sample``, ``start_time`` (ISO 8601), ``title``.
    reader : array-like or None
        The picklable reader behind ``frames`` (``reader[s:e]`` reads exactly frames
        ``s:e``, whatever the dask chunking); what batch readers use so that a batch never
        reads a whole dask chunk to keep a few frames of it.
    """

    kind: str
    source: str
    frames: Any = None
    angle: np.ndarray | None = None
    translation: np.ndarray | None = None
    z: np.ndarray | None = None
    monitor: np.ndarray | None = None
    sinogram: Any = None
    sino_angle: np.ndarray | None = None
    sino_translation: np.ndarray | None = None
    translation_unit: str = "mm"
    radial: np.ndarray | None = None
    radial_unit: str | None = None
    wavelength_m: float | None = None
    map_y: np.ndarray | None = None
    map_x: np.ndarray | None = None
    files: list = field(default_factory=list)
    frames_dataset: str | None = None
    metadata: dict = field(default_factory=dict)
    reader: Any = None

    @property
    def n_frames(self) -> int:
        """Number of frames (0 for a sinogram input)."""
        return 0 if self.frames is None else int(self.frames.shape[0])

    @property
    def frame_shape(self) -> tuple[int, int] | None:
        """Detector shape ``(H, W)`` of the frames, or None for a sinogram input."""
        return None if self.frames is None else tuple(int(s) for s in self.frames.shape[1:])

    def grid(self) -> Grid:
        """The regular grid of the scan.

        For kind ``"frames"`` the axes are (z, angle, translation); for kind ``"map"`` the
        ``angle`` axis holds the y positions and the ``translation`` axis the x positions
        (mm); for kind ``"sinogram"`` the grid is the sinogram's (angle, translation) plane
        and ``index`` the flat C-order index of each point.

        Positions are grouped into grid values by :func:`_cluster_positions` (exact
        repeats, or encoder jitter much smaller than the grid step).

        Raises
        ------
        IngestError
            Two frames at the same grid point, or grid points without a frame.
        """
        if self.kind == "sinogram":
            na, nt = len(self.sino_angle), len(self.sino_translation)
            return Grid(np.zeros(1), np.asarray(self.sino_angle, float),
                        np.asarray(self.sino_translation, float),
                        np.arange(na * nt, dtype=np.int64).reshape(1, na, nt))
        if self.kind == "map":
            a_name, t_name = "y", "x"
            a, t = self.map_y, self.map_x
            fields = "scan table columns 'y', 'x'"
        else:
            a_name, t_name = "angle", "translation"
            a, t = self.angle, self.translation
            fields = ("input.angle, input.translation" + (", input.z" if self.z is not None else "")
                      if self.frames_dataset != "file" else "scan table columns 'angle', 'translation'")
        n = self.n_frames
        if n == 0:
            raise IngestError(f"{self.source}: empty scan (no frames): no grid")
        if a is None or t is None:
            raise IngestError(f"{self.source}: scan has no {a_name}/{t_name} positions: no grid")
        z = self.z if self.z is not None else np.zeros(n)
        zv, zi = _cluster_positions(z)
        av, ai = _cluster_positions(a)
        tv, ti = _cluster_positions(t)
        index = np.full((len(zv), len(av), len(tv)), -1, dtype=np.int64)
        flat = np.ravel_multi_index((zi, ai, ti), index.shape)
        counts = np.bincount(flat, minlength=index.size)
        if (counts > 1).any():
            dup = int(np.flatnonzero(counts > 1)[0])
            frames = np.flatnonzero(flat == dup)[:5]
            iz, ia, it = np.unravel_index(dup, index.shape)
            raise IngestError(
                f"{self.source}: duplicated grid point z={zv[iz]:g}, {a_name}={av[ia]:g}, "
                f"{t_name}={tv[it]:g} ({fields}): frames {frames.tolist()} (expected one frame "
                f"per point; {int((counts > 1).sum())} point(s) duplicated)")
        index.ravel()[flat] = np.arange(n)
        if (counts == 0).any():
            miss = np.flatnonzero(counts == 0)
            iz, ia, it = np.unravel_index(int(miss[0]), index.shape)
            raise IngestError(
                f"{self.source}: incomplete grid ({fields}): {len(miss)} of {index.size} points "
                f"of the {len(zv)} x {len(av)} x {len(tv)} (z, {a_name}, {t_name}) grid have no "
                f"frame, first z={zv[iz]:g}, {a_name}={av[ia]:g}, {t_name}={tv[it]:g} (expected "
                f"one frame per point: {n} frames for {index.size} points)")
        return Grid(zv, av, tv, index)


def _cluster_positions(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group 1-D motor positions into grid values.

    Equal values form one group. When positions jitter (encoder readback), sorted gaps fall
    in two populations (jitter, grid step); the cut is put at the largest ratio between
    consecutive sorted gaps when that ratio exceeds 20 and the resulting groups are narrower
    than a tenth of the smallest separation between groups (so a stray position is not
    mistaken for a grid step). Returns (group centres ascending, group index of each value).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    order = np.argsort(v, kind="stable")
    s = v[order]
    gaps = np.diff(s)
    span = s[-1] - s[0]
    cut = max(span * 1e-9, 1e-12)
    pos = np.sort(gaps[gaps > cut])
    if pos.size >= 2:
        ratios = pos[1:] / pos[:-1]
        k = int(np.argmax(ratios))
        if ratios[k] > 20:
            trial = np.sqrt(pos[k] * pos[k + 1])
            gid = np.cumsum(np.concatenate([[True], gaps > trial])) - 1
            starts = np.flatnonzero(np.concatenate([[True], gaps > trial]))
            ends = np.concatenate([starts[1:], [s.size]]) - 1
            width = (s[ends] - s[starts]).max()
            if width < 0.1 * gaps[gaps > trial].min():
                cut = trial
    new_group = np.concatenate([[True], gaps > cut])
    gid_sorted = np.cumsum(new_group) - 1
    gid = np.empty_like(gid_sorted)
    gid[order] = gid_sorted
    centres = np.bincount(gid_sorted, weights=s) / np.bincount(gid_sorted)
    return centres, gid.astype(np.int64)


# --------------------------------------------------------------------------------------
# Lazy readers (picklable; each read re-opens the file by path)
# --------------------------------------------------------------------------------------

class _H5FrameReader:
    """Array-like ``(N, H, W)`` view of an HDF5 frame dataset of 3, 4 or 5 dimensions.

    ``direct`` (a :class:`tasks.h5chunks.ChunkPlan`, from :func:`tasks.h5chunks.direct_plan`)
    reads bitshuffle-LZ4 chunks raw and decodes them in a thread pool; None reads through
    h5py's filter pipeline.
    """

    def __init__(self, path: str, dataset: str, stored_shape: tuple, dtype, direct=None):
        self.path = str(path)
        self.dataset = dataset
        self.stored_shape = tuple(int(s) for s in stored_shape)
        self.dtype = np.dtype(dtype)
        self.scan_shape = self.stored_shape[:-2]
        n = int(np.prod(self.scan_shape)) if self.scan_shape else 1
        self.shape = (n,) + self.stored_shape[-2:]
        self.ndim = 3
        self.direct = direct

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        k0, ky, kx = key
        n = self.shape[0]
        idx = np.arange(n)[k0]
        scalar = np.ndim(idx) == 0
        idx = np.atleast_1d(idx)
        try:
            with h5py.File(self.path, "r") as h5:
                dset = h5[self.dataset]
                if self.direct is not None:
                    from tasks.h5chunks import read_frames_direct  # noqa: PLC0415

                    out = read_frames_direct(dset, self.direct, self.scan_shape, idx, ky, kx)
                elif len(self.scan_shape) == 1:
                    if idx.size and np.all(np.diff(idx) == 1):
                        out = dset[int(idx[0]):int(idx[-1]) + 1, ky, kx]
                    else:
                        out = np.stack([dset[int(i), ky, kx] for i in idx]) if idx.size else \
                            np.empty((0,) + np.empty(self.shape[1:])[ky, kx].shape, self.dtype)
                else:
                    parts = []
                    coords = np.unravel_index(idx, self.scan_shape)
                    # runs of consecutive frames along the fastest scan axis
                    start = 0
                    while start < idx.size:
                        stop = start + 1
                        while (stop < idx.size and idx[stop] == idx[stop - 1] + 1
                               and all(c[stop] == c[start] for c in coords[:-1])):
                            stop += 1
                        lead = tuple(int(c[start]) for c in coords[:-1])
                        t0, t1 = int(coords[-1][start]), int(coords[-1][stop - 1]) + 1
                        parts.append(dset[lead + (slice(t0, t1), ky, kx)])
                        start = stop
                    out = np.concatenate(parts) if parts else \
                        np.empty((0,) + np.empty(self.shape[1:])[ky, kx].shape, self.dtype)
        except (OSError, ValueError) as err:
            bad = self._first_unreadable(idx) if idx.size > 1 else (int(idx[0]) if idx.size else None)
            raise IngestError(
                f"{self.path}: dataset {self.dataset}: cannot read frames "
                f"{int(idx[0]) if idx.size else 0}..{int(idx[-1]) if idx.size else 0}"
                + (f", first unreadable frame {bad}{self._chunk_of(bad)}" if bad is not None else "")
                + f" (input.frames; corrupt or truncated file?): {err}") from None
        return out[0] if scalar else out

    def read_into(self, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        """Frames ``start:stop`` decoded straight into ``out`` (C-contiguous, shape
        ``(stop - start, H, W)``, the dataset's dtype), e.g. a pinned GPU staging buffer:
        bitshuffle-LZ4 chunks decode into it on several threads; other datasets are read
        by h5py into it directly (``Dataset.read_direct``) when the frames are one run.

        Raises
        ------
        IngestError
            As ``__getitem__``.
        """
        if self.direct is not None:
            try:
                with h5py.File(self.path, "r") as h5:
                    from tasks.h5chunks import read_frames_direct  # noqa: PLC0415

                    return read_frames_direct(h5[self.dataset], self.direct, self.scan_shape,
                                              np.arange(start, stop), out=out)
            except (OSError, ValueError):
                pass  # the reading below names the frame that cannot be read
        elif len(self.scan_shape) == 1 and stop > start:
            try:
                with h5py.File(self.path, "r") as h5:
                    h5[self.dataset].read_direct(out, np.s_[start:stop])
                return out
            except (OSError, ValueError, TypeError):
                pass
        out[...] = self[start:stop]
        return out

    def _chunk_of(self, i: int) -> str:
        """`` (chunk (c0, c1, ...))``: the HDF5 chunk (its origin) holding frame ``i``."""
        try:
            with h5py.File(self.path, "r") as h5:
                chunks = h5[self.dataset].chunks
        except (OSError, KeyError):
            return ""
        if not chunks:
            return ""
        pos = tuple(int(c) for c in np.unravel_index(int(i), self.scan_shape)) + (0, 0)
        return f" (chunk {tuple(c // k * k for c, k in zip(pos, chunks))})"

    def _first_unreadable(self, idx) -> int | None:
        """After a failed read: the first frame of ``idx`` that cannot be read on its own."""
        for i in idx:
            try:
                self[int(i)]
            except IngestError:
                return int(i)
        return None

    def __reduce__(self):
        return (_H5FrameReader, (self.path, self.dataset, self.stored_shape, self.dtype.str,
                                 self.direct))


class _ImageSeriesReader:
    """Array-like ``(N, H, W)`` over a list of detector image files read with fabio."""

    def __init__(self, files: Sequence[str], frame_shape: tuple, dtype, table: str):
        self.files = [str(f) for f in files]
        self.dtype = np.dtype(dtype)
        self.shape = (len(self.files),) + tuple(int(s) for s in frame_shape)
        self.ndim = 3
        self.table = str(table)

    def _read(self, i: int) -> np.ndarray:
        import fabio  # noqa: PLC0415 - heavy import only where images are read

        f = self.files[i]
        if not os.path.exists(f):
            raise IngestError(f"{self.table}: row {i + 1}: column 'file': image {f} does not exist")
        try:
            with fabio.open(f) as img:
                data = np.asarray(img.data)
        except Exception as err:  # fabio raises many types for unreadable files
            raise IngestError(f"{f}: cannot read detector image (listed in {self.table}, "
                              f"row {i + 1}): {err}") from None
        if data.shape != self.shape[1:]:
            raise IngestError(f"{f}: image shape {data.shape} differs from the first image's "
                              f"{self.shape[1:]} (scan table {self.table}, row {i + 1})")
        if not np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_:
            raise IngestError(f"{f}: image dtype {data.dtype} is not numeric")
        return data.astype(self.dtype, copy=False)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        idx = np.arange(self.shape[0])[key[0]]
        if np.ndim(idx) == 0:
            return self._read(int(idx))[key[1], key[2]]
        if idx.size == 0:
            return np.empty((0,) + np.empty(self.shape[1:])[key[1], key[2]].shape, self.dtype)
        return np.stack([self._read(int(i))[key[1], key[2]] for i in idx])

    def __reduce__(self):
        return (_ImageSeriesReader, (self.files, self.shape[1:], self.dtype.str, self.table))


def _frames_chunk(frame_shape, dtype) -> int:
    nbytes = int(np.prod(frame_shape)) * np.dtype(dtype).itemsize
    return max(1, CHUNK_BYTES // max(nbytes, 1))


def _lazy(reader, name_parts, chunk_frames: int | None = None):
    import dask.array as da  # noqa: PLC0415
    from dask.base import tokenize  # noqa: PLC0415

    n = reader.shape[0]
    k = chunk_frames or _frames_chunk(reader.shape[1:], reader.dtype)
    k = max(1, min(k, max(n, 1)))
    name = "frames-" + tokenize(*name_parts)
    return da.from_array(reader, chunks=(k,) + tuple(reader.shape[1:]), name=name,
                         lock=False, asarray=True, fancy=False,
                         meta=np.empty((0, 0, 0), dtype=reader.dtype))


def _file_token(path) -> tuple:
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


# --------------------------------------------------------------------------------------
# Frame checks (called per chunk by the integration)
# --------------------------------------------------------------------------------------

def check_frames(frames_chunk, source: str, first_index: int = 0, mask=None,
                 dummy: float | None = None, delta_dummy: float | None = None) -> None:
    """Check a chunk of frames for values that cannot be integrated.

    Parameters
    ----------
    frames_chunk : array, shape (n, H, W), any numeric dtype (numpy or cupy)
        Frames as read.
    source : str
        File (and dataset) the chunk came from, for the message.
    first_index : int
        Scan index of ``frames_chunk[0]``, for the message.
    mask : array of bool, shape (H, W), optional
        True for pixels excluded from integration; their values are not checked.
    dummy, delta_dummy : float, optional
        The detector's dummy value (pyFAI ``detector.get_dummies``): pixels with
        ``|value - dummy| <= delta_dummy`` are dead pixels that the integration masks
        frame by frame, so they are allowed.

    Raises
    ------
    IngestError
        Non-numeric dtype, NaN/inf values (float frames) or negative values in pixels that
        are integrated; the message gives the frame index and a pixel.
    """
    from tasks._xp import get_xp  # noqa: PLC0415

    xp = get_xp(frames_chunk)
    a = frames_chunk
    dt = np.dtype(a.dtype)
    if not np.issubdtype(dt, np.number) or dt == np.bool_ or np.issubdtype(dt, np.complexfloating):
        raise IngestError(f"{source}: frames have dtype {dt}; expected real numbers")
    if a.ndim == 2:
        a = a[None]
    is_float = np.issubdtype(dt, np.floating)
    unsigned = np.issubdtype(dt, np.unsignedinteger)
    # fast path: no NaN and nothing negative anywhere
    if is_float:
        lo = float(xp.min(a)) if a.size else 0.0
        if np.isfinite(lo) and lo >= 0 and bool(xp.isfinite(xp.max(a))):
            return
    else:
        if unsigned or a.size == 0 or int(xp.min(a)) >= 0:
            return
    bad = xp.zeros(a.shape, dtype=bool)
    if is_float:
        bad |= ~xp.isfinite(a)
    neg = a < 0
    if dummy is not None:
        dd = 0.0 if delta_dummy is None else float(delta_dummy)
        neg &= ~(xp.abs(a.astype(xp.float32) - np.float32(dummy)) <= dd)
    bad |= neg
    if mask is not None:
        bad &= ~xp.asarray(mask, dtype=bool)[None]
    if bool(bad.any()):
        where = np.argwhere(np.asarray(bad.get() if hasattr(bad, "get") else bad))
        f, y, x = (int(v) for v in where[0])
        val = a[f, y, x]
        val = val.item() if hasattr(val, "item") else val
        kind = "NaN/inf" if is_float and not np.isfinite(val) else "negative"
        frames_bad = np.unique(where[:, 0])
        raise IngestError(
            f"{source}: frame {first_index + f}: {kind} value {val} at pixel (row {y}, col {x}) "
            f"outside the mask ({len(where)} such pixel(s) in {len(frames_bad)} frame(s) of "
            f"frames {first_index}..{first_index + a.shape[0] - 1}); expected finite values >= 0 "
            f"(add these pixels to the mask if they are dead)")


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------

def _input_spec(spec):
    from pipelines.spec import InputSpec  # noqa: PLC0415

    if spec is None:
        return InputSpec()
    if hasattr(spec, "input") and not isinstance(spec, InputSpec):
        return spec.input
    return spec


def _attr_str(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, np.ndarray):
        if v.size == 0:
            return None
        v = v.ravel()[0]
        return v.decode(errors="replace") if isinstance(v, bytes) else str(v)
    return str(v)


def _attr_list(v) -> list[str]:
    if v is None:
        return []
    if isinstance(v, (bytes, str)):
        s = v.decode(errors="replace") if isinstance(v, bytes) else v
        return [p.strip() for p in s.replace(",", ":").split(":")] if ":" in s or "," in s else [s]
    return [x.decode(errors="replace") if isinstance(x, bytes) else str(x) for x in np.ravel(v)]


def _nx_class(obj) -> str | None:
    return _attr_str(obj.attrs.get("NX_class"))


def _open_h5(path: Path) -> h5py.File:
    if not path.exists():
        raise IngestError(f"{path}: file does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise IngestError(f"{path}: cannot open as HDF5 (corrupt or truncated file?): {err}; "
                          f"expected a complete HDF5/NeXus file (scan)") from None


def _get_dataset(h5: h5py.File, path: Path, name: str, field_name: str) -> h5py.Dataset:
    try:
        obj = h5[name]
    except KeyError:
        raise IngestError(f"{path}: dataset {name!r} (input.{field_name}) not found") from None
    except OSError as err:
        raise IngestError(f"{path}: dataset {name!r} (input.{field_name}) cannot be read: {err}") from None
    if not isinstance(obj, h5py.Dataset):
        raise IngestError(f"{path}: {name!r} (input.{field_name}) is a group, expected a dataset")
    return obj


def _entries(h5: h5py.File) -> list[h5py.Group]:
    """NXentry groups: the root's ``default`` first, then all NXentry, then /entry."""
    out = []
    default = _attr_str(h5.attrs.get("default"))
    if default and default in h5 and isinstance(h5[default], h5py.Group):
        out.append(h5[default])
    for k in h5:
        try:
            g = h5[k]
        except (KeyError, OSError):
            continue
        if isinstance(g, h5py.Group) and _nx_class(g) == "NXentry" and g not in out:
            out.append(g)
            for kk in g:  # NXsubentry
                try:
                    sg = g[kk]
                except (KeyError, OSError):
                    continue
                if isinstance(sg, h5py.Group) and _nx_class(sg) == "NXsubentry":
                    out.append(sg)
    if "entry" in h5 and isinstance(h5["entry"], h5py.Group) and h5["entry"] not in out:
        out.append(h5["entry"])
    return out


def _nxdata_groups(entry: h5py.Group) -> list[h5py.Group]:
    out = []
    default = _attr_str(entry.attrs.get("default"))
    if default and default in entry and isinstance(entry[default], h5py.Group):
        out.append(entry[default])
    for k in entry:
        try:
            g = entry[k]
        except (KeyError, OSError):
            continue
        if isinstance(g, h5py.Group) and _nx_class(g) == "NXdata" and g not in out:
            out.append(g)
    return out


def _signal(group: h5py.Group) -> h5py.Dataset | None:
    name = _attr_str(group.attrs.get("signal"))
    if name and name in group and isinstance(group[name], h5py.Dataset):
        return group[name]
    for k in group:  # NeXus v1: dataset attribute signal=1
        obj = group[k]
        if isinstance(obj, h5py.Dataset) and _attr_str(obj.attrs.get("signal")) in ("1", "True"):
            return obj
    return None


def _find_frames(h5: h5py.File) -> tuple[h5py.Dataset, h5py.Group | None, h5py.Group | None] | None:
    """Locate a frame stack: (dataset, its entry, the NXdata group it came from)."""
    for entry in _entries(h5):
        for g in _nxdata_groups(entry):
            sig = _signal(g)
            if sig is not None and 3 <= sig.ndim <= 5 and _looks_like_frames(sig):
                return sig, entry, g
        for rel in _FRAME_PATHS:
            d = entry.get(rel) if rel.split("/")[0] in entry else None
            if isinstance(d, h5py.Dataset) and 3 <= d.ndim <= 5 and _looks_like_frames(d, True):
                return d, entry, None
        if "instrument" in entry and isinstance(entry["instrument"], h5py.Group):
            for k, g in entry["instrument"].items():
                if isinstance(g, h5py.Group) and _nx_class(g) == "NXdetector":
                    d = g.get("data")
                    if isinstance(d, h5py.Dataset) and 3 <= d.ndim <= 5 and _looks_like_frames(d, True):
                        return d, entry, None
    return None


def _seen_path(h5: h5py.File, dset: h5py.Dataset, nxdata: h5py.Group | None) -> str:
    """The path in ``h5`` of the external-link that leads to ``dset`` (another file's
    dataset): a member of the NXdata group it was found in, else any ExternalLink."""
    def same(o):
        return (isinstance(o, h5py.Dataset) and o.name == dset.name
                and o.file.filename == dset.file.filename)

    if nxdata is not None and nxdata.file.filename == h5.filename:
        for k in nxdata:
            if same(nxdata.get(k)):
                return f"{nxdata.name}/{k}"
    links = []
    h5.visititems_links(lambda n, ln: links.append(n) if isinstance(ln, h5py.ExternalLink) else None)
    for n in links:
        if same(h5.get(n)):
            return "/" + n
    return dset.name


def _missing_frames(h5: h5py.File) -> str | None:
    """Why a NeXus file that was meant to hold frames holds none: an NXdata group whose
    ``signal`` names a dataset that does not exist, or an NXdetector without ``data``."""
    for entry in _entries(h5):
        for g in _nxdata_groups(entry):
            sig = _attr_str(g.attrs.get("signal"))
            if sig and sig not in g:
                return f"NXdata group {g.name} names signal {sig!r} but dataset {g.name}/{sig} does not exist"
        inst = entry.get("instrument")
        if isinstance(inst, h5py.Group):
            for k, g in inst.items():
                if isinstance(g, h5py.Group) and _nx_class(g) == "NXdetector" and "data" not in g:
                    return f"detector group {g.name} has no dataset 'data'"
    return None


def _looks_like_frames(d: h5py.Dataset, detector_path: bool = False) -> bool:
    """Whether a 3-5-D dataset holds detector frames (not spectra or a sinogram cube).

    ``interpretation="image"`` says yes, ``spectrum``/``scaler`` no; otherwise the last two
    dims must be at least 8 pixels, and a dataset that is not at a detector path must hold
    integer counts (a float NXdata signal is more likely an integrated cube).
    """
    interp = _attr_str(d.attrs.get("interpretation"))
    if interp == "image":
        return True
    if interp in ("spectrum", "scaler", "vertex"):
        return False
    big = d.shape[-1] >= 8 and d.shape[-2] >= 8
    return big and (detector_path or np.issubdtype(d.dtype, np.integer))


def _entry_of(h5: h5py.File, d: h5py.Dataset) -> h5py.Group | None:
    parts = d.name.strip("/").split("/")
    for i in range(len(parts) - 1, 0, -1):
        g = h5["/" + "/".join(parts[:i])]
        if _nx_class(g) in ("NXentry", "NXsubentry"):
            return g
    return h5[parts[0]] if len(parts) > 1 and isinstance(h5[parts[0]], h5py.Group) else None


def _axis_from_nxdata(group: h5py.Group | None, role: str) -> h5py.Dataset | None:
    if group is None:
        return None
    names = [n for n in _attr_list(group.attrs.get("axes")) if n and n != "."]
    names += [k[:-len("_indices")] for k in group.attrs if k.endswith("_indices")]
    for n in names:
        d = group.get(n)
        if not isinstance(d, h5py.Dataset):
            continue
        if _axis_role(n, d) == role:
            return d
    return None


_RADIAL_NAMES = ("radial", "q", "2th", "tth", "twotheta", "2theta", "two_theta", "q_nm^-1",
                 "q_a^-1", "2th_deg", "2th_rad", "d", "d_spacing", "dspacing")
# Quantity of a radial dataset from its name (lower case): q, 2th, d, or None (unknown).
_RADIAL_QUANTITY = {"q": "q", "q_nm^-1": "q", "q_a^-1": "q", "2th": "2th", "tth": "2th",
                    "twotheta": "2th", "2theta": "2th", "two_theta": "2th", "2th_deg": "2th",
                    "2th_rad": "2th", "d": "d", "d_spacing": "d", "dspacing": "d"}
# Radial units (lower case, spaces removed) -> (quantity, pyFAI unit name, factor to it)
_RADIAL_UNITS = {
    **{u: ("q", "q_nm^-1", 1.0) for u in ("q_nm^-1", "1/nm", "nm^-1", "nm-1", "nm**-1",
                                           "1/nanometer", "1/nanometre", "nanometer^-1")},
    **{u: ("q", "q_A^-1", 1.0) for u in ("q_a^-1", "1/a", "a^-1", "a-1", "a**-1", "1/å", "å^-1",
                                          "å-1", "1/angstrom", "angstrom^-1", "1/ang", "ang^-1")},
    **{u: ("2th", "2th_deg", 1.0) for u in ("2th_deg", "deg", "degree", "degrees", "°")},
    **{u: ("2th", "2th_deg", 180.0 / np.pi) for u in ("2th_rad", "rad", "radian", "radians")},
    **{u: ("d", None, 1.0) for u in ("a", "å", "angstrom", "nm", "d_a", "d_nm")},
}


def _axis_role(name: str, d: h5py.Dataset | None) -> str | None:
    """Role of an NXdata axis: "angle", "translation", "z", "radial" or None."""
    tt = _attr_str(d.attrs.get("transformation_type")) if d is not None else None
    n = name.lower().rsplit("/", 1)[-1]
    if n in ("z", "dtz", "sz", "samz"):
        return "z"
    if n in _RADIAL_NAMES:
        return "radial"
    if tt == "rotation" or any(s in n for s in ("angle", "rot", "theta", "omega", "phi")):
        return "angle"
    if tt == "translation" or "trans" in n or n in ("x", "y", "dty", "sx", "sy", "samx", "samy"):
        return "translation"
    return None


def _find_named(entry: h5py.Group | None, candidates: Sequence[str]) -> h5py.Dataset | None:
    if entry is None:
        return None
    for rel in candidates:
        if rel in entry and isinstance(entry[rel], h5py.Dataset):
            return entry[rel]
    return None


#: NeXus fields (relative to the NXentry) that the catalog files a scan under.
NEXUS_METADATA = {"proposal": ("experiment_identifier", "proposal_id", "proposal"),
                  "sample": ("sample/name", "sample/sample_name", "sample/chemical_formula"),
                  "start_time": ("start_time",),
                  "title": ("title",)}


def nexus_metadata(entry: h5py.Group | None) -> dict[str, str]:
    """Proposal, sample name, start time and title of a NeXus entry, where present.

    Reads the NXentry fields ``experiment_identifier`` (NeXus's name for the proposal;
    ``proposal_id``/``proposal`` also accepted), ``sample/name``, ``start_time`` (ISO 8601,
    checked) and ``title``. Missing or non-text fields are left out: metadata never stops an
    ingest.

    Parameters
    ----------
    entry : h5py.Group or None
        The NXentry of the scan.

    Returns
    -------
    dict of str to str
        Keys among ``proposal``, ``sample``, ``start_time``, ``title``.
    """
    import datetime as dt

    out: dict[str, str] = {}
    if entry is None:
        return out
    for key, candidates in NEXUS_METADATA.items():
        for rel in candidates:
            d = entry.get(rel)
            if not isinstance(d, h5py.Dataset) or d.size != 1:
                continue
            v = d[()]
            v = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
            v = v.item() if isinstance(v, np.ndarray) else v
            v = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
            if not isinstance(v, str) or not v.strip():
                continue
            v = v.strip()
            if key == "start_time":
                try:
                    dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
                except ValueError:
                    continue
            out[key] = v
            break
    return out


def _find_monitor(entry: h5py.Group | None) -> h5py.Dataset | None:
    d = _find_named(entry, _MONITOR_PATHS)
    if d is not None or entry is None:
        return d
    for k in entry:
        g = entry[k]
        if isinstance(g, h5py.Group) and _nx_class(g) == "NXmonitor" and isinstance(g.get("data"), h5py.Dataset):
            return g["data"]
    return None


def _read_numeric(d: h5py.Dataset, path: Path, field_name: str) -> np.ndarray:
    if not np.issubdtype(d.dtype, np.number) or d.dtype == np.bool_:
        raise IngestError(f"{path}: dataset {d.name} (input.{field_name}) has dtype {d.dtype}; "
                          f"expected numbers")
    try:
        a = np.asarray(d[()], dtype=np.float64)
    except OSError as err:
        raise IngestError(f"{path}: dataset {d.name} (input.{field_name}) cannot be read: {err}") from None
    if not np.all(np.isfinite(a)):
        raise IngestError(f"{path}: dataset {d.name} (input.{field_name}) contains NaN/inf values")
    return a


def _unit_factor(d: h5py.Dataset, table: dict, path: Path, field_name: str) -> float:
    u = _attr_str(d.attrs.get("units"))
    if u is None or u.strip() == "":
        return 1.0
    key = u.strip().lower().replace("degree_angle", "deg")
    if key in table:
        return table[key]
    raise IngestError(f"{path}: dataset {d.name} (input.{field_name}) has units {u!r}; expected "
                      f"one of {sorted(table)}")


#: A rotation scan's angular span below which degrees are taken to be radians (2 pi, plus
#: rounding): XRD-CT covers about 180 or 360 deg, and 2 pi deg is far too little for it.
_RADIAN_SPAN = 2 * np.pi * 1.001


def _check_angle_unit(a: np.ndarray, d: h5py.Dataset, path: Path, factor: float) -> None:
    """Infer the unit of rotation angles ``a`` (as stored) from their range and check it
    against the dataset's ``units`` (``factor`` to degrees: 1 for deg or no units): a span
    of at most 2 pi stored as degrees is radians; a span above 2 pi stored as radians is
    degrees. Fewer than 3 distinct values are not judged (the minimum is checked later)."""
    v = np.unique(np.asarray(a, np.float64).ravel())
    if v.size < 3:
        return
    span = float(v[-1] - v[0])
    u = _attr_str(d.attrs.get("units"))
    stated = f"units {u!r}" if u and u.strip() else "no units attribute (degrees assumed)"
    if factor == 1.0 and span <= _RADIAN_SPAN:
        raise IngestError(
            f"{path}: dataset {d.name} (input.angle): rotation angles span {v[0]:.6g} .. "
            f"{v[-1]:.6g} with {stated}: a span of at most 2 pi is radians, not degrees; "
            f"expected degrees over a tomographic range (about 180 or 360), or units='rad'")
    if abs(factor - 180.0 / np.pi) < 1e-12 and span > _RADIAN_SPAN:
        raise IngestError(
            f"{path}: dataset {d.name} (input.angle): rotation angles span {v[0]:.6g} .. "
            f"{v[-1]:.6g} with {stated}: more than 2 pi, so these are degrees, not radians; "
            f"expected radians within 2 pi, or units='deg'")


def _read_angles(d: h5py.Dataset, path: Path) -> np.ndarray:
    """Rotation angles of dataset ``d`` in degrees, their unit checked by their range."""
    a = _read_numeric(d, path, "angle")
    f = _unit_factor(d, _ANGLE_UNITS, path, "angle")
    _check_angle_unit(a, d, path, f)
    return a * f


def _expand_axis(a: np.ndarray, scan_shape: tuple, dim: int | None, path: Path, name: str,
                 field_name: str) -> np.ndarray:
    """Broadcast an axis array onto the flat frame list (C order over scan_shape)."""
    n = int(np.prod(scan_shape))
    if a.ndim == 0:
        return np.full(n, float(a))
    if a.shape == tuple(scan_shape):
        return a.ravel().astype(np.float64)
    if a.ndim == 1 and a.size == n:
        return a.astype(np.float64)
    if a.ndim == 1 and dim is not None and len(scan_shape) > 1 and a.size == scan_shape[dim]:
        shape = [1] * len(scan_shape)
        shape[dim] = a.size
        return np.broadcast_to(a.reshape(shape), scan_shape).ravel().astype(np.float64)
    raise IngestError(
        f"{path}: dataset {name} (input.{field_name}) has shape {a.shape}; expected one value "
        f"per frame: {n} values (or shape {tuple(scan_shape)}) to match the frames")


# --------------------------------------------------------------------------------------
# Openers
# --------------------------------------------------------------------------------------

def open_scan(path, spec=None, poni_shape: tuple[int, int] | None = None) -> Scan:
    """Open a scan lazily, whatever its kind.

    Parameters
    ----------
    path : str or Path
        A NeXus/HDF5 file (frames or sinogram) or a scan table (``.csv``/``.tsv``).
    spec : pipelines.spec.InputSpec or PipelineSpec, optional
        Where the data live; ``kind="auto"`` picks ``image_series`` for tables,
        ``nexus`` for HDF5 files holding a frame stack (or when ``frames`` is given) and
        ``sinogram`` for HDF5 files holding an integrated cube (or when ``sinogram`` is given).
    poni_shape : (int, int), optional
        Detector shape of the calibration; frames of another shape raise.

    Returns
    -------
    Scan

    Raises
    ------
    IngestError
        Missing or unreadable file, unknown kind, and everything listed in the openers.
    """
    spec = _input_spec(spec)
    p = Path(path)
    if not p.exists():
        raise IngestError(f"{p}: scan file does not exist")
    kind = spec.kind
    if kind == "auto":
        suffix = p.suffix.lower()
        if suffix in TABLE_SUFFIXES:
            kind = "image_series"
        elif suffix in HDF5_SUFFIXES or h5py.is_hdf5(p):
            if spec.sinogram is not None:
                kind = "sinogram"
            elif spec.frames is not None:
                kind = "nexus"
            else:
                with _open_h5(p) as h5:
                    kind = "nexus" if _find_frames(h5) is not None else "sinogram"
                    hint = _missing_frames(h5) if kind == "sinogram" else None
                if hint:
                    raise IngestError(f"{p}: {hint} (input.frames): expected the frame stack "
                                      f"(N, H, W) there; set input.frames to the frames' dataset, "
                                      f"or input.sinogram for an integrated cube")
        else:
            raise IngestError(f"{p}: cannot tell the scan kind from suffix {p.suffix!r}: expected "
                              f"an HDF5/NeXus file ({', '.join(HDF5_SUFFIXES)}) or a scan table "
                              f"({', '.join(TABLE_SUFFIXES)}); set input.kind")
    if kind == "nexus":
        return open_nexus(p, spec, poni_shape=poni_shape)
    if kind == "image_series":
        return open_image_series(p, spec, poni_shape=poni_shape)
    if kind == "sinogram":
        return open_sinogram(p, spec)
    raise IngestError(f"{p}: input.kind {kind!r} is not one of auto, nexus, image_series, sinogram")


def open_nexus(path, spec=None, poni_shape: tuple[int, int] | None = None,
               chunk_frames: int | None = None, direct_chunks: bool = True) -> Scan:
    """Open a NeXus/HDF5 frame stack lazily.

    Dataset paths come from ``spec`` (``frames``, ``angle``, ``translation``, ``z``,
    ``monitor``) or are found: the ``signal`` of an NXdata group of an NXentry (3-5 dims)
    and its ``axes``, else the conventional names (``/entry/instrument/detector/data``,
    ``/entry/sample/rotation_angle``, ``/entry/sample/translation``, ``/entry/sample/z``,
    ``/entry/monitor/data``, ...). Axis ``units`` attributes are converted to deg and mm.

    Parameters
    ----------
    path : str or Path
    spec : InputSpec or PipelineSpec, optional
    poni_shape : (int, int), optional
        Expected detector shape ``(H, W)``.
    chunk_frames : int, optional
        Frames per dask chunk (default: about 32 MiB per chunk).
    direct_chunks : bool
        Read bitshuffle-LZ4 frames (one filter, whole frames per chunk) as raw chunks
        (``read_direct_chunk``) decoded in parallel by :mod:`tasks.h5chunks`; other
        datasets, or False, read through h5py's filter pipeline. Both give identical arrays.

    Returns
    -------
    Scan
        kind ``"frames"``; ``frames`` ``(N, H, W)`` dask array in the stored dtype.
        4-D ``(n_angle, n_translation, H, W)`` and 5-D ``(n_z, n_angle, n_translation, H, W)``
        storage is flattened in C order.

    Raises
    ------
    IngestError
        Unreadable/corrupt file, no frame dataset, non-numeric frames, empty scan, missing
        angle/translation, axis arrays whose length differs from the number of frames,
        non-finite or non-positive monitor, detector shape differing from ``poni_shape``.
    """
    spec = _input_spec(spec)
    p = Path(path)
    h5 = _open_h5(p)
    try:
        nxdata = None
        if spec.frames is not None:
            dset = _get_dataset(h5, p, spec.frames, "frames")
            entry = _entry_of(h5, dset)
            parent = dset.parent
            if _nx_class(parent) == "NXdata":
                nxdata = parent
        else:
            found = _find_frames(h5)
            if found is None:
                raise IngestError(
                    f"{p}: no frame stack found (looked for the signal of NXdata groups and "
                    f"{', '.join('/entry/' + f for f in _FRAME_PATHS)}); expected a dataset "
                    f"(N, H, W) or (n_angle, n_translation, H, W); set input.frames")
            dset, entry, nxdata = found
        name = dset.name
        if Path(dset.file.filename).resolve() != p.resolve():
            # reached through an ExternalLink: the reader re-opens the scan file, so it needs
            # the link's path here (dset.name is the path inside the linked file)
            name = spec.frames if spec.frames is not None else _seen_path(h5, dset, nxdata)
        if (not np.issubdtype(dset.dtype, np.number) or dset.dtype == np.bool_
                or np.issubdtype(dset.dtype, np.complexfloating)):
            raise IngestError(f"{p}: dataset {name} (input.frames) has dtype {dset.dtype}; "
                              f"expected integer or float detector counts")
        if not 3 <= dset.ndim <= 5:
            raise IngestError(f"{p}: dataset {name} (input.frames) has shape {dset.shape}; expected "
                              f"(N, H, W), (n_angle, n_translation, H, W) or (n_z, n_angle, "
                              f"n_translation, H, W)")
        stored = tuple(int(s) for s in dset.shape)
        scan_shape = stored[:-2]
        n = int(np.prod(scan_shape))
        if n == 0 or stored[-1] == 0 or stored[-2] == 0:
            raise IngestError(f"{p}: dataset {name} (input.frames) has shape {stored}: empty scan")
        frame_shape = stored[-2:]
        if poni_shape is not None and tuple(poni_shape) != frame_shape:
            raise IngestError(f"{p}: dataset {name} (input.frames): frame shape {frame_shape} "
                              f"differs from the calibration's detector shape {tuple(poni_shape)}")

        nd = len(scan_shape)
        dims = {"z": 0 if nd == 3 else None,
                "angle": nd - 2 if nd >= 2 else None,
                "translation": nd - 1 if nd >= 2 else None}

        def axis(role, explicit, conventional, units, required):
            if explicit is not None:
                d = _get_dataset(h5, p, explicit, role)
            else:
                d = _axis_from_nxdata(nxdata, role)
                if d is None:
                    d = _find_named(entry, conventional)
            if d is None:
                if required:
                    raise IngestError(
                        f"{p}: no {role} dataset found for frames {name} (looked at NXdata axes "
                        f"and {', '.join(conventional[:4])}, ...); set input.{role}")
                return None
            if role == "angle":
                return _expand_axis(_read_angles(d, p), scan_shape, dims.get(role), p, d.name, role)
            a = _read_numeric(d, p, role)
            f = _unit_factor(d, units, p, role) if units else 1.0
            return _expand_axis(a * f, scan_shape, dims.get(role), p, d.name, role)

        angle = axis("angle", spec.angle, _ANGLE_PATHS, _ANGLE_UNITS, True)
        translation = axis("translation", spec.translation, _TRANSLATION_PATHS, _LENGTH_UNITS, True)
        z = axis("z", spec.z, _Z_PATHS, _LENGTH_UNITS, False)
        if spec.monitor is not None:
            md = _get_dataset(h5, p, spec.monitor, "monitor")
        else:
            md = _find_monitor(entry)
        monitor = None
        if md is not None:
            monitor = _expand_axis(_read_numeric(md, p, "monitor"), scan_shape, None, p,
                                   md.name, "monitor")
            if np.any(monitor <= 0):
                i = int(np.flatnonzero(monitor <= 0)[0])
                raise IngestError(f"{p}: dataset {md.name} (input.monitor): value {monitor[i]} at "
                                  f"frame {i}; expected monitor counts > 0")
        dtype = dset.dtype
        token = _file_token(p)
        metadata = nexus_metadata(entry)
        from tasks.h5chunks import direct_plan  # noqa: PLC0415

        plan = direct_plan(dset) if direct_chunks else None
    finally:
        h5.close()

    reader = _H5FrameReader(str(p), name, stored, dtype, direct=plan)
    frames = _lazy(reader, (token, name, stored), chunk_frames)
    return Scan(kind="frames", source=str(p), frames=frames, angle=angle,
                translation=translation, z=z, monitor=monitor, wavelength_m=spec.wavelength_m,
                files=[str(p)], frames_dataset=name, metadata=metadata,
                reader=reader)


def _read_table(table: Path) -> tuple[list[str], list[list[str]]]:
    try:
        text = table.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise IngestError(f"{table}: cannot read scan table: {err}") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise IngestError(f"{table}: scan table is empty (expected a header line with a 'file' "
                          f"column and one row per frame)")
    if table.suffix.lower() == ".tsv" or "\t" in lines[0]:
        delim = "\t"
    elif "," in lines[0]:
        delim = ","
    elif ";" in lines[0]:
        delim = ";"
    else:
        delim = None  # whitespace
    if delim is None:
        rows = [ln.split() for ln in lines]
    else:
        rows = [[c.strip() for c in r] for r in csv.reader(lines, delimiter=delim)]
    header = [h.strip().lower() for h in rows[0]]
    return header, rows[1:]


def open_image_series(table_path, spec=None, poni_shape: tuple[int, int] | None = None,
                      chunk_frames: int = 1) -> Scan:
    """Open detector images listed in a scan table, lazily (one dask chunk per file).

    The table is CSV (``,`` or ``;``), TSV or whitespace separated, with a header. Columns:
    ``file`` (path, relative to the table's folder or absolute) and either
    ``angle, translation[, z]`` (deg, mm: XRD-CT, kind ``"frames"``) or ``y, x`` (mm: raster
    map, kind ``"map"``); optional ``monitor``. Lines starting with ``#`` are comments.

    Parameters
    ----------
    table_path : str or Path
    spec : InputSpec or PipelineSpec, optional
        Only ``wavelength_m`` is used.
    poni_shape : (int, int), optional
        Expected detector shape ``(H, W)``.
    chunk_frames : int
        Files per dask chunk (default 1).

    Returns
    -------
    Scan
        ``frames`` ``(N, H, W)`` in the first image's dtype. Only the first image is read
        here (for its shape and dtype); the others are read when computed.

    Raises
    ------
    IngestError
        Missing ``file`` column or position columns, non-numeric cells, missing image files
        (all listed), empty table, non-positive monitor, unreadable first image, non-numeric
        image dtype, image shape differing from ``poni_shape``; at compute time: images whose
        shape differs from the first.
    """
    import fabio  # noqa: PLC0415

    spec = _input_spec(spec)
    table = Path(table_path)
    if not table.exists():
        raise IngestError(f"{table}: scan table does not exist")
    header, rows = _read_table(table)
    if "file" not in header:
        raise IngestError(f"{table}: scan table header {header} has no 'file' column")
    if not rows:
        raise IngestError(f"{table}: scan table has a header but no rows: empty scan")
    if {"angle", "translation"} <= set(header):
        kind, pos_cols = "frames", ["angle", "translation"] + (["z"] if "z" in header else [])
    elif {"y", "x"} <= set(header):
        kind, pos_cols = "map", ["y", "x"]
    else:
        raise IngestError(f"{table}: scan table header {header}: expected columns 'angle' and "
                          f"'translation' (XRD-CT) or 'y' and 'x' (raster map)")
    num_cols = pos_cols + (["monitor"] if "monitor" in header else [])
    col = {h: i for i, h in enumerate(header)}
    files, values = [], {c: [] for c in num_cols}
    for r, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise IngestError(f"{table}: line {r}: {len(row)} fields, expected {len(header)} "
                              f"(header {header})")
        f = Path(row[col["file"]])
        files.append(str(f if f.is_absolute() else (table.parent / f)))
        for c in num_cols:
            try:
                v = float(row[col[c]])
            except ValueError:
                raise IngestError(f"{table}: line {r}: column {c!r}: {row[col[c]]!r} is not a "
                                  f"number") from None
            if not np.isfinite(v):
                raise IngestError(f"{table}: line {r}: column {c!r}: value {v} is not finite")
            values[c].append(v)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        raise IngestError(f"{table}: column 'file': {len(missing)} of {len(files)} image(s) do "
                          f"not exist: {shown}")
    arr = {c: np.asarray(v, dtype=np.float64) for c, v in values.items()}
    monitor = arr.get("monitor")
    if monitor is not None and np.any(monitor <= 0):
        i = int(np.flatnonzero(monitor <= 0)[0])
        raise IngestError(f"{table}: line {i + 2}: column 'monitor': {monitor[i]}; expected > 0")
    try:
        with fabio.open(files[0]) as img:
            first = np.asarray(img.data)
    except Exception as err:
        raise IngestError(f"{files[0]}: cannot read detector image (first row of {table}): "
                          f"{err}") from None
    if not np.issubdtype(first.dtype, np.number) or first.dtype == np.bool_:
        raise IngestError(f"{files[0]}: image dtype {first.dtype} is not numeric")
    if first.ndim != 2:
        raise IngestError(f"{files[0]}: image has shape {first.shape}; expected a 2-D frame")
    if poni_shape is not None and tuple(poni_shape) != first.shape:
        raise IngestError(f"{files[0]}: frame shape {first.shape} differs from the "
                          f"calibration's detector shape {tuple(poni_shape)} (scan table {table})")
    reader = _ImageSeriesReader(files, first.shape, first.dtype, str(table))
    token = (_file_token(table),) + tuple(_file_token(f) for f in files)
    frames = _lazy(reader, token, chunk_frames)
    scan = Scan(kind=kind, source=str(table), frames=frames, monitor=monitor,
                wavelength_m=spec.wavelength_m, files=[str(table)] + files,
                frames_dataset="file", reader=reader)
    if kind == "frames":
        v = np.unique(arr["angle"])
        if v.size >= 3 and v[-1] - v[0] <= _RADIAN_SPAN:  # the table's angles are in degrees
            raise IngestError(f"{table}: column 'angle' (input.angle): rotation angles span "
                              f"{v[0]:.6g} .. {v[-1]:.6g}: a span of at most 2 pi is radians; "
                              f"expected degrees over a tomographic range (about 180 or 360)")
        scan.angle, scan.translation, scan.z = arr["angle"], arr["translation"], arr.get("z")
    else:
        scan.map_y, scan.map_x = arr["y"], arr["x"]
    return scan


_SINO_AXES = ("angle", "translation", "radial")


def _check_finite_block(block, source):
    if not np.all(np.isfinite(block)):
        raise IngestError(f"{source}: sinogram contains NaN/inf values ({int(np.sum(~np.isfinite(block)))} "
                          f"in one chunk); expected finite intensities")
    return block


def open_sinogram(path, spec=None) -> Scan:
    """Open an already-integrated sinogram cube lazily.

    Parameters
    ----------
    path : str or Path
        HDF5 file.
    spec : InputSpec or PipelineSpec
        ``sinogram``: dataset path (found when None: the signal of an NXdata group, or the
        only 2-D/3-D numeric dataset in the file); ``sinogram_axes``: stored axis order
        (None: the NXdata group's ``@axes`` when every axis has a role, else
        ``angle,translation[,radial]``, checked by :func:`_check_axis_order`);
        ``angle``: dataset of angles in deg (else the NXdata angle axis, else
        ``angle_range_deg`` is required and angles are ``linspace(0, angle_range_deg,
        n_angle, endpoint=False)``); ``translation``: dataset in mm (else the NXdata
        translation axis, else ``arange(n) * translation_step_mm``, else ``arange(n)`` in
        px); ``radial_unit`` (when the file does not state it) and ``wavelength_m``.

    Returns
    -------
    Scan
        kind ``"sinogram"``, ``sinogram`` ``(angle, translation, radial)`` float32 dask array
        (``radial`` of length 1 for 2-D input). ``radial`` is read from the NXdata radial
        axis, else a sibling dataset named ``radial``, ``q``, ``2th``, ``tth``,
        ``twotheta``, ``2theta`` (or a pyFAI unit name) of matching length, else None; its
        unit from the dataset (:func:`_radial_unit`). ``translation_unit`` is ``"px"``
        when no translation positions or step are given. Non-finite values raise when the
        chunk holding them is computed.

    Raises
    ------
    IngestError
        No or ambiguous dataset, dimension count differing from ``sinogram_axes``,
        non-numeric dtype, angles missing without ``angle_range_deg``, angle/translation
        datasets of the wrong length, translations not monotonic, empty cube; a radial
        unit missing, unknown or contradicted (:func:`_radial_unit`); a cube whose angle
        and translation axes look swapped under the default order (:func:`_check_axis_order`).
    """
    import dask.array as da  # noqa: PLC0415
    from dask.base import tokenize  # noqa: PLC0415

    spec = _input_spec(spec)
    p = Path(path)
    h5 = _open_h5(p)
    try:
        if spec.sinogram is not None:
            d = _get_dataset(h5, p, spec.sinogram, "sinogram")
        else:
            d = _find_sinogram(h5, p)
        name = d.name
        if not np.issubdtype(d.dtype, np.number) or d.dtype == np.bool_:
            raise IngestError(f"{p}: dataset {name} (input.sinogram) has dtype {d.dtype}; "
                              f"expected numbers")
        file_axes = _nxdata_sinogram_axes(d)
        if spec.sinogram_axes is not None:
            axes, axes_from = spec.sinogram_axes.split(","), "spec"
        elif file_axes is not None:
            axes, axes_from = file_axes, "file"  # the file's NXdata @axes say the order
        else:  # nothing says the order: the default, checked against the data below
            axes, axes_from = ["angle", "translation", "radial"][:max(d.ndim, 2)], "default"
        if d.ndim != len(axes):
            raise IngestError(
                f"{p}: dataset {name} (input.sinogram) has {d.ndim} dimensions {d.shape} but "
                f"input.sinogram_axes is {','.join(axes)!r} ({len(axes)} axes); set "
                f"input.sinogram_axes to the stored order, e.g. 'translation,angle'")
        if d.size == 0:
            raise IngestError(f"{p}: dataset {name} (input.sinogram) has shape {d.shape}: empty")
        size = dict(zip(axes, d.shape))
        na, nt = size["angle"], size["translation"]
        nr = size.get("radial", 1)
        if axes_from == "default":
            _check_axis_order(d, axes, na, nt, p)
        nx_angle = _nxdata_axis_values(d, "angle", na)
        nx_trans = _nxdata_axis_values(d, "translation", nt)
        if spec.angle is None and nx_angle is not None:
            angles = _read_angles(nx_angle, p).ravel()
        elif spec.angle is not None:
            ad = _get_dataset(h5, p, spec.angle, "angle")
            angles = _read_angles(ad, p).ravel()
            if angles.size != na:
                raise IngestError(f"{p}: dataset {ad.name} (input.angle) has {angles.size} values; "
                                  f"expected {na} (angle axis of {name} {d.shape})")
        else:
            if spec.angle_range_deg is None:
                raise IngestError(f"{p}: dataset {name} (input.sinogram) has no angle dataset: set "
                                  f"input.angle to a dataset of angles, or input.angle_range_deg "
                                  f"(e.g. 180) for {na} equally spaced angles")
            angles = np.linspace(0.0, spec.angle_range_deg, na, endpoint=False)
        if spec.translation is None and nx_trans is not None:
            trans = _read_numeric(nx_trans, p, "translation").ravel() * _unit_factor(nx_trans, _LENGTH_UNITS, p, "translation")
        elif spec.translation is not None:
            td = _get_dataset(h5, p, spec.translation, "translation")
            trans = _read_numeric(td, p, "translation").ravel() * _unit_factor(td, _LENGTH_UNITS, p, "translation")
            if trans.size != nt:
                raise IngestError(f"{p}: dataset {td.name} (input.translation) has {trans.size} "
                                  f"values; expected {nt} (translation axis of {name} {d.shape})")
        elif spec.translation_step_mm is not None:
            trans = np.arange(nt, dtype=np.float64) * spec.translation_step_mm
        else:  # no positions: coordinates in translation steps
            trans = np.arange(nt, dtype=np.float64)
        t_unit = "mm" if (nx_trans is not None or spec.translation is not None
                          or spec.translation_step_mm is not None) else "px"
        if nt > 1:
            dt_ = np.diff(trans)
            if not (np.all(dt_ > 0) or np.all(dt_ < 0)):
                raise IngestError(f"{p}: translation positions of {name} are not strictly "
                                  f"ascending or descending (first step {dt_[0]:g}); expected a "
                                  f"monotonic translation scan")
        radial, radial_unit, wavelength = None, None, spec.wavelength_m
        if "radial" in size:
            rd = _nxdata_axis_values(d, "radial", nr)
            if rd is None:
                for rn in _RADIAL_NAMES:
                    c = d.parent.get(rn)
                    if isinstance(c, h5py.Dataset) and c.ndim == 1 and c.size == nr:
                        rd = c
                        break
            if rd is not None:
                radial = _read_numeric(rd, p, "radial")
                radial, radial_unit = _radial_unit(rd, radial, spec, p)
                if wavelength is None:
                    wavelength = _wavelength_attr(rd, d.parent)
        stored = tuple(int(s) for s in d.shape)
        dtype = d.dtype
        token = _file_token(p)
        metadata = nexus_metadata(_entry_of(h5, d))
        if wavelength is None and radial is not None:
            wavelength = _nexus_wavelength(_entry_of(h5, d))
        if wavelength is not None and not (1e-12 <= wavelength <= 1e-8):
            raise IngestError(f"{p}: wavelength {wavelength:g} m of {name} (its wavelength_m "
                              f"attribute, or input.wavelength_m): outside the X-ray range; "
                              f"expected 1e-12 .. 1e-08 m")
    finally:
        h5.close()

    reader = _H5Array(str(p), name, stored, dtype)
    # chunks: whole (angle, translation) planes, radial split to ~32 MiB
    per_r = na * nt * 4
    rchunk = max(1, min(nr, CHUNK_BYTES // max(per_r, 1)))
    chunks = tuple(rchunk if a == "radial" else s for a, s in zip(axes, stored))
    arr = da.from_array(reader, chunks=chunks, name="sino-" + tokenize(token, name), lock=False,
                        asarray=True, fancy=False, meta=np.empty((0,) * len(stored), dtype))
    if "radial" not in axes:
        arr = arr[..., None]
        axes = axes + ["radial"]
    arr = arr.transpose([axes.index(a) for a in _SINO_AXES]).astype(np.float32)
    arr = arr.map_blocks(_check_finite_block, source=f"{p}: dataset {name}", dtype=np.float32)
    return Scan(kind="sinogram", source=str(p), sinogram=arr, sino_angle=angles,
                sino_translation=trans, translation_unit=t_unit, radial=radial,
                radial_unit=radial_unit, wavelength_m=wavelength, files=[str(p)],
                frames_dataset=name, metadata=metadata)


def _radial_unit(rd: h5py.Dataset, values: np.ndarray, spec, p: Path) -> tuple[np.ndarray, str]:
    """Values and pyFAI unit name (``q_nm^-1``, ``q_A^-1``, ``2th_deg``) of a sinogram's
    radial dataset ``rd``: from its ``units`` (or ``unit``, ``radial_unit``) attribute, else
    from a name that is a unit (``q_A^-1``, ``2th_deg``), else ``input.radial_unit``. A
    dataset named for its quantity (``q``, ``2th``/``tth``, ``d``) must agree with the unit.
    2-theta in radians is converted to degrees.

    Raises
    ------
    IngestError
        No unit in the file or the spec; a unit that is not a radial unit; a unit that
        contradicts the dataset's name or ``input.radial_unit``; d-spacing (not a radial
        unit the pipeline maps: convert to q or 2-theta).
    """
    name = rd.name.rsplit("/", 1)[-1].lower()
    quantity = _RADIAL_QUANTITY.get(name)
    attr = None
    for key in ("units", "unit", "radial_unit"):
        attr = _attr_str(rd.attrs.get(key))
        if attr and attr.strip():
            break
    field = f"{p}: dataset {rd.name} (radial axis)"
    stated = None
    if attr and attr.strip():
        key = attr.strip().lower().replace(" ", "").replace("angstroms", "angstrom")
        if key not in _RADIAL_UNITS:
            raise IngestError(f"{field} has units {attr!r}; expected a unit of q (1/nm, 1/A), "
                              f"2-theta (deg, rad) or a pyFAI unit name (q_nm^-1, q_A^-1, 2th_deg)")
        stated = _RADIAL_UNITS[key]
        if quantity is not None and stated[0] != quantity:
            raise IngestError(f"{field} is named for {quantity} but has units {attr!r}; fix the "
                              f"units attribute or the dataset name")
    elif name in _RADIAL_UNITS and _RADIAL_UNITS[name][1] is not None:  # named q_A^-1, 2th_deg
        stated = _RADIAL_UNITS[name]
    if (stated is not None and stated[0] == "d") or (stated is None and quantity == "d"):
        raise IngestError(f"{field} is d-spacing; the pipeline's radial units are q_nm^-1, q_A^-1 "
                          f"and 2th_deg: store q = 2 pi / d or 2-theta instead")
    given = spec.radial_unit
    if stated is None:
        if given is None:
            raise IngestError(
                f"{field} has no units attribute and its name does not say the unit"
                f"{' (q in 1/nm or 1/A?)' if quantity == 'q' else ''}; set input.radial_unit "
                f"(q_nm^-1, q_A^-1 or 2th_deg) or add a units attribute to the dataset")
        if quantity is not None and not given.startswith(quantity):
            raise IngestError(f"{field} is named for {quantity} but input.radial_unit is "
                              f"{given!r}; fix input.radial_unit")
        return values, given
    unit = stated[1]
    if given is not None and given != unit:
        raise IngestError(f"{field} states its unit {attr or name!r} = {unit} but "
                          f"input.radial_unit is {given!r}; remove input.radial_unit or make it "
                          f"{unit!r}")
    return values * stated[2], unit


def _wavelength_attr(rd: h5py.Dataset, group: h5py.Group) -> float | None:
    """``wavelength_m`` attribute of the radial dataset or its group (the simulator's, or a
    NeXus ``wavelength`` attribute in Angstrom), else None."""
    for o in (rd, group):
        v = o.attrs.get("wavelength_m")
        if v is not None and np.isfinite(float(np.asarray(v).ravel()[0])):
            return float(np.asarray(v).ravel()[0])
    return None


_WAVELENGTH_UNITS = {"m": 1.0, "nm": 1e-9, "a": 1e-10, "å": 1e-10, "angstrom": 1e-10,
                     "angstroms": 1e-10, "pm": 1e-12}


def _nexus_wavelength(entry: h5py.Group | None) -> float | None:
    """Wavelength in m from ``<entry>/instrument/monochromator/wavelength`` (NXmonochromator)
    when it has a length unit, else None (a wavelength without units is not guessed)."""
    if entry is None:
        return None
    d = entry.get("instrument/monochromator/wavelength")
    if not isinstance(d, h5py.Dataset) or d.size != 1 or not np.issubdtype(d.dtype, np.number):
        return None
    u = (_attr_str(d.attrs.get("units")) or "").strip().lower()
    v = float(np.asarray(d[()]).ravel()[0]) * _WAVELENGTH_UNITS.get(u, np.nan)
    return v if np.isfinite(v) and 0 < v < 1e-8 else None


#: a cube is refused as transposed when the spread of its per-angle totals exceeds this many
#: times the spread of its per-translation totals (see :func:`_check_axis_order`)
TRANSPOSED_RATIO = 2.0


def _check_axis_order(d: h5py.Dataset, axes: list[str], na: int, nt: int, p: Path) -> None:
    """Refuse a sinogram whose stored axis order is not the assumed (default) one.

    The total of a parallel-beam projection over all translations is the same at every
    angle (the zeroth Helgason-Ludwig moment condition: the object's integral; S. Helgason,
    *The Radon Transform*, 1980; D. Ludwig, Comm. Pure Appl. Math. 19 (1966) 49), up to
    the monitor's drift, whereas the total over all angles varies with translation from the
    air at the edges to the sample's thickest chord. A cube read with angle and translation
    swapped shows the reverse: per-"angle" totals that vary like a projection. The check
    reads at most 16 radial bins (evenly spaced), sums them, and compares the coefficients
    of variation of the two totals; it refuses when the per-angle spread is more than
    :data:`TRANSPOSED_RATIO` times the per-translation spread and above 10 %.

    Raises
    ------
    IngestError
        Naming the file, the dataset, the measured spreads and the fix (input.sinogram_axes).
    """
    if na < 4 or nt < 4:
        return
    if "radial" in axes:
        ir = axes.index("radial")
        nr = d.shape[ir]
        pick = np.unique(np.linspace(0, nr - 1, min(nr, 16)).round().astype(int))
        key = [slice(None)] * d.ndim
        key[ir] = pick.tolist()
        try:
            block = np.asarray(d[tuple(key)], np.float64).sum(axis=ir)
        except OSError:
            return  # unreadable chunks are reported, naming the chunk, when the data are read
        rest = [a for a in axes if a != "radial"]
    else:
        try:
            block = np.asarray(d[()], np.float64)
        except OSError:
            return
        rest = list(axes)
    if not np.all(np.isfinite(block)):
        return  # NaN/inf are reported, naming the chunk, when the data are read
    block = block if rest == ["angle", "translation"] else block.T
    per_angle, per_trans = block.sum(axis=1), block.sum(axis=0)

    def cv(v):
        m = abs(float(np.mean(v)))
        return float(np.std(v)) / m if m > 0 else 0.0

    ca, ct = cv(per_angle), cv(per_trans)
    if ca > 0.1 and ca > TRANSPOSED_RATIO * ct:
        swapped = ",".join({"angle": "translation", "translation": "angle"}.get(a, a) for a in axes)
        raise IngestError(
            f"{p}: dataset {d.name} (input.sinogram) {d.shape} does not look like "
            f"({','.join(axes)}): its totals over translation vary by {100 * ca:.0f} % from angle "
            f"to angle (a projection's total should not) while its totals over angle vary by "
            f"{100 * ct:.0f} %, as if angle and translation were swapped; set "
            f"input.sinogram_axes to the stored order (e.g. {swapped!r})")


def _find_sinogram(h5: h5py.File, p: Path) -> h5py.Dataset:
    """Locate an integrated sinogram: a 2-D/3-D NXdata signal, else the only 2-D numeric or
    3-D float dataset of the file (3-D integer stacks are frames, not sinograms)."""
    for entry in _entries(h5):
        for g in _nxdata_groups(entry):
            s = _signal(g)
            if s is not None and (s.ndim == 2 or (s.ndim == 3 and _attr_str(s.attrs.get("interpretation")) != "image")):
                return s
    cands = []

    def visit(_name, o):
        if isinstance(o, h5py.Dataset) and np.issubdtype(o.dtype, np.number) and o.dtype != np.bool_:
            if o.ndim == 2 or (o.ndim == 3 and np.issubdtype(o.dtype, np.floating)):
                cands.append(o)

    h5.visititems(visit)
    if len(cands) == 1:
        return cands[0]
    if not cands:
        raise IngestError(
            f"{p}: no frame stack (NXdata signal, /entry/instrument/detector/data, ...) and no "
            f"sinogram (2-D dataset or 3-D float cube) found; set input.frames (with "
            f"input.angle and input.translation) or input.sinogram")
    raise IngestError(f"{p}: several candidate sinogram datasets {[c.name for c in cands][:8]}; "
                      f"set input.sinogram (or input.frames for a frame stack)")


def _nxdata_axis_names(d: h5py.Dataset) -> list[str] | None:
    g = d.parent
    if _nx_class(g) != "NXdata" or _attr_str(g.attrs.get("signal")) != d.name.rsplit("/", 1)[-1]:
        return None
    names = _attr_list(g.attrs.get("axes"))
    return names if len(names) == d.ndim else None


def _nxdata_sinogram_axes(d: h5py.Dataset) -> list[str] | None:
    """Axis order of a sinogram from its NXdata ``axes`` attribute, when every axis has a role."""
    names = _nxdata_axis_names(d)
    if names is None:
        return None
    roles = [_axis_role(n, d.parent.get(n) if n in d.parent else None) for n in names]
    if sorted(roles) in (["angle", "translation"], ["angle", "radial", "translation"]):
        return roles
    return None


def _nxdata_axis_values(d: h5py.Dataset, role: str, n: int) -> h5py.Dataset | None:
    """1-D axis dataset of the given role and length next to an NXdata signal, if any."""
    names = _nxdata_axis_names(d)
    if names is None:
        return None
    for name in names:
        a = d.parent.get(name)
        if isinstance(a, h5py.Dataset) and a.ndim == 1 and a.size == n and _axis_role(name, a) == role:
            return a
    return None


class _H5Array:
    """Picklable array-like over any HDF5 dataset; each read re-opens the file."""

    def __init__(self, path: str, dataset: str, shape: tuple, dtype):
        self.path, self.dataset = str(path), dataset
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        try:
            with h5py.File(self.path, "r") as h5:
                return h5[self.dataset][key]
        except OSError as err:
            raise IngestError(f"{self.path}: dataset {self.dataset}: cannot read {key} "
                              f"(corrupt or truncated file?): {err}") from None

    def __reduce__(self):
        return (_H5Array, (self.path, self.dataset, self.shape, self.dtype.str))


def hdf5_linked_files(path, _seen=None) -> list[tuple[Path, str]]:
    """Every other file that reading the HDF5 file ``path`` can open: targets of external
    links, sources of virtual datasets (VDS) and external raw storage, followed into those
    files in turn.

    Each file is resolved as libhdf5 resolves it: an external link by opening it (the file
    libhdf5 opened), a VDS source or external storage relative to the linking file's folder
    (then the working directory) unless absolute. The caller confines them to the data roots
    and checksums them into the product id (:func:`flows.process.make_request`).

    Parameters
    ----------
    path : str or Path
        An HDF5 file (other files: empty list).

    Returns
    -------
    list of (Path, str)
        Resolved file and how it is reached (``"ExternalLink /entry/data/data ->
        frames.h5:/data"``), each file once, in the order found.

    Raises
    ------
    IngestError
        A link whose target file does not exist or cannot be opened, a VDS source given as a
        file-name pattern (``%b``), or the prefix variables ``HDF5_EXT_PREFIX`` /
        ``HDF5_VDS_PREFIX`` set (libhdf5 would look elsewhere than what is checked).
    """
    p = Path(path).resolve()
    seen = {p} if _seen is None else _seen
    seen.add(p)
    if not h5py.is_hdf5(p):
        return []
    found: list[tuple[Path, str]] = []
    direct: list[tuple[Path, str]] = []
    for var in ("HDF5_EXT_PREFIX", "HDF5_VDS_PREFIX"):
        if os.environ.get(var):
            raise IngestError(f"{p}: environment variable {var} is set: libhdf5 would resolve "
                              f"linked files through it; unset it so that every file the scan "
                              f"reads is the one checked")

    def near(name: str, via: str, cands: list[Path]) -> Path:
        for c in cands:
            if c.is_file():
                return c.resolve()
        raise IngestError(f"{p}: {via}: file {name!r} not found (looked at "
                          f"{', '.join(str(c) for c in cands)}); expected every file the scan "
                          f"links to to exist")

    def visit(h5, name, link):
        if isinstance(link, h5py.ExternalLink):
            via = f"ExternalLink /{name} -> {link.filename}:{link.path}"
            try:
                target = Path(h5[name].file.filename).resolve()
            except (KeyError, OSError) as err:
                raise IngestError(f"{p}: {via}: cannot open the link's target ({err}); "
                                  f"expected the linked file and dataset to exist") from None
            direct.append((target, via))
            return
        if isinstance(link, h5py.SoftLink):
            return
        try:
            obj = h5[name]
        except (KeyError, OSError):
            return
        if not isinstance(obj, h5py.Dataset):
            return
        if obj.is_virtual:
            for vs in obj.virtual_sources():
                if vs.file_name == ".":
                    continue
                via = f"virtual dataset /{name} -> source {vs.file_name}:{vs.dset_name}"
                if "%" in vs.file_name:
                    raise IngestError(f"{p}: {via}: file-name patterns are refused; expected "
                                      f"plain source file names")
                f = Path(vs.file_name)  # libhdf5: relative to the VDS file's folder, then cwd
                direct.append((near(vs.file_name, via, [f] if f.is_absolute() else
                                    [p.parent / f, Path.cwd() / f]), via))
        for ext in obj.external or ():
            via = f"dataset /{name} -> external storage {ext[0]}"
            f = Path(ext[0])  # libhdf5 (no efile prefix): relative to the working directory
            direct.append((near(ext[0], via, [f if f.is_absolute() else Path.cwd() / f]), via))

    with _open_h5(p) as h5:
        names = []
        h5.visititems_links(lambda name, link: names.append((name, link)))
        for name, link in names:  # not inside the callback: h5py cannot raise through it
            visit(h5, name, link)
    for f, via in direct:
        if f in seen:
            continue
        seen.add(f)
        found.append((f, via))
        found.extend((g, f"{via} -> {v}") for g, v in hdf5_linked_files(f, seen))
    return found


def file_checksum(path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file, streamed in ``chunk_size`` blocks.

    Parameters
    ----------
    path : str or Path
    chunk_size : int
        Bytes read at a time.

    Returns
    -------
    str
        64 hexadecimal characters.

    Raises
    ------
    IngestError
        The file does not exist or cannot be read.
    """
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while True:
                b = f.read(chunk_size)
                if not b:
                    break
                h.update(b)
    except OSError as err:
        raise IngestError(f"{path}: cannot read file for its checksum: {err}") from None
    return h.hexdigest()
