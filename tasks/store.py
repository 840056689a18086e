"""Product stores: content-addressed, chunked Zarr v3, published by atomic rename.

A product is one Zarr v3 store that ``xarray.open_zarr`` opens, with the dims and variables
of DESIGN.md (``patterns``, ``volume``, ``scale``, ``weight_fraction``, ``rwp``, ...) and its
provenance (pipeline spec, package versions, inputs and checksums, timings) in the root
attrs under ``xrdct``.

Life of a product::

    pid  = product_id(spec, inputs, calibration)      # content address
    work = work_path(out_dir, pid)                     # <out>/.work/<pid>.zarr
    write_variables(work, ds) ...                      # each stage adds its variables
    publish(work, published_path(out_dir, pid))        # atomic rename, never overwrites

Readers only ever see ``<out>/<pid>.zarr`` complete: a half-written store lives under
``.work/`` and a failed run leaves nothing under the published name.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np

PROVENANCE_KEY = "xrdct"
_PACKAGES = ("xrdct", "numpy", "scipy", "pyFAI", "h5py", "hdf5plugin", "fabio", "dask",
             "distributed", "zarr", "xarray", "pymatgen", "prefect", "astra-toolbox")


class ProductExistsError(FileExistsError):
    """A product with this content address is already published (never overwritten)."""


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a product's numbers (``None`` if absent)."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def code_version() -> str:
    """The xrdct version, plus the git commit (and ``+dirty``) when run from a checkout."""
    try:
        ver = metadata.version("xrdct")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare tree
        ver = "0+unknown"
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():
        try:
            head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                                  capture_output=True, text=True, timeout=10).stdout.strip()
            if head:
                dirty = subprocess.run(
                    ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no",
                     "--", "tasks", "flows", "pipelines", "catalog"],
                    capture_output=True, text=True, timeout=10).stdout.strip()
                ver += f"+g{head}" + (".dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            pass
    return ver


def product_id(spec_json: str, inputs: dict[str, str], calibration: dict[str, str],
               code: str | None = None) -> str:
    """Content address of a product.

    Parameters
    ----------
    spec_json : str
        Canonical JSON of the pipeline spec (:meth:`PipelineSpec.canonical_json`).
    inputs : dict of str to str
        Input role or file name -> sha256 checksum.
    calibration : dict of str to str
        Calibration file role (``poni``, ``mask``, ``dark``, ``flat``, phase CIFs) -> checksum.
    code : str, optional
        Code version; defaults to :func:`code_version`.

    Returns
    -------
    str
        24 hex digits of sha256 over all of the above: same inputs, same id.
    """
    payload = json.dumps({"spec": json.loads(spec_json), "inputs": inputs,
                          "calibration": calibration, "code": code or code_version()},
                         sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def published_path(out_dir: str | Path, pid: str) -> Path:
    """Where the product ``pid`` is published: ``<out_dir>/<pid>.zarr``."""
    return Path(out_dir) / f"{pid}.zarr"


def work_path(out_dir: str | Path, pid: str) -> Path:
    """Where the product ``pid`` is built before publishing: ``<out_dir>/.work/<pid>.zarr``."""
    return Path(out_dir) / ".work" / f"{pid}.zarr"


def _chunks(dims: tuple[str, ...], shape: tuple[int, ...], itemsize: int,
            target_bytes: int = 4 << 20) -> tuple[int, ...]:
    """Chunk shape for a variable: whole patterns along ``radial`` for per-voxel reads,
    whole (angle, translation) planes for sinograms, one z slice per chunk, ~4 MB."""
    chunks = list(shape)
    if "z" in dims:
        chunks[dims.index("z")] = 1
    total = int(np.prod(chunks)) * itemsize
    # Split the leading spatial dimension (angle or y) until the chunk is near the target.
    for lead in ("angle", "y"):
        if lead in dims and total > target_bytes:
            i = dims.index(lead)
            per_row = total // max(shape[i], 1)
            chunks[i] = max(1, min(shape[i], target_bytes // max(per_row, 1)))
            break
    return tuple(int(c) for c in chunks)


def write_variables(store: str | Path, ds, *, level: int = 3) -> None:
    """Add the variables (and coordinates) of ``ds`` to the Zarr v3 store ``store``.

    Creates the store on first use. Every array is blosc-zstd (bitshuffle) compressed
    and chunked by :func:`_chunks`. Existing variables of the same name are replaced
    (the work store is private to one run until published).

    Parameters
    ----------
    store : path
        A work store (not a published product).
    ds : xarray.Dataset
        Variables with DESIGN.md dims; attrs carry units.
    level : int
        zstd level.
    """
    import zarr

    store = Path(store)
    comp = [zarr.codecs.BloscCodec(cname="zstd", clevel=level, shuffle="bitshuffle")]
    existing = set()
    if (store / "zarr.json").exists():
        grp = zarr.open_group(str(store), mode="r")
        existing = set(grp.array_keys())
    ds = ds.drop_vars([v for v in ds.variables if v in existing
                       and v in ds.coords and v not in ds.data_vars], errors="ignore")
    for name in list(ds.data_vars):
        if name in existing:
            shutil.rmtree(store / name)
    encoding = {}
    for name, var in ds.variables.items():
        if var.dtype.kind in "US" or var.dtype == object:
            continue
        encoding[name] = {"compressors": comp,
                          "chunks": _chunks(var.dims, var.shape, var.dtype.itemsize)}
    mode = "a" if (store / "zarr.json").exists() else "w-"
    kept = {}
    if mode == "a":  # to_zarr replaces the root attrs; keep the provenance written so far
        kept = dict(zarr.open_group(str(store), mode="r").attrs)
    ds.to_zarr(str(store), mode=mode, zarr_format=3, consolidated=False, encoding=encoding)
    if kept:
        grp = zarr.open_group(str(store), mode="a")
        grp.attrs.update({**kept, **dict(grp.attrs)})


def update_attrs(store: str | Path, attrs: dict) -> None:
    """Merge JSON-serialisable ``attrs`` into the store's root attrs under ``xrdct``."""
    import zarr

    grp = zarr.open_group(str(store), mode="a")
    prov = dict(grp.attrs.get(PROVENANCE_KEY, {}))
    prov.update(_jsonable(attrs))
    grp.attrs[PROVENANCE_KEY] = prov


def set_provenance(store: str | Path, prov: dict) -> None:
    """Replace the store's provenance (root attrs under ``xrdct``) by ``prov``, with every
    mapping's keys sorted, so that equal provenance is equal bytes in ``zarr.json``."""
    import zarr

    def canonical(o):
        if isinstance(o, dict):
            return {k: canonical(o[k]) for k in sorted(o)}
        if isinstance(o, list):
            return [canonical(v) for v in o]
        return o

    grp = zarr.open_group(str(store), mode="a")
    grp.attrs[PROVENANCE_KEY] = canonical(_jsonable(prov))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def publish(work: str | Path, final: str | Path) -> Path:
    """Publish a finished work store by atomic rename.

    Renames ``work`` to ``final`` in one ``os.rename`` (same file system). Metadata is
    not consolidated (consolidation is not part of the Zarr v3 specification). A product already at ``final`` is never replaced.

    Raises
    ------
    ProductExistsError
        ``final`` exists already (published by an earlier or concurrent run).
    FileNotFoundError
        ``work`` does not exist.
    """
    work, final = Path(work), Path(final)
    if not (work / "zarr.json").exists():
        raise FileNotFoundError(f"{work}: no Zarr store to publish")
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        raise ProductExistsError(f"{final}: product already published; not overwritten")
    try:
        os.rename(work, final)  # atomic; fails if final appeared meanwhile (non-empty dir)
    except OSError as err:
        if final.exists():
            raise ProductExistsError(f"{final}: product already published; not overwritten") from err
        raise
    return final


def open_product(path: str | Path):
    """Open a published product as an ``xarray.Dataset`` (lazy, dask-backed)."""
    import xarray as xr

    path = Path(path)
    if not (path / "zarr.json").exists():
        raise FileNotFoundError(f"{path}: not a Zarr v3 product store (no zarr.json)")
    return xr.open_zarr(str(path), consolidated=False)


def provenance(path: str | Path) -> dict:
    """The provenance dict stored in a product's root attrs."""
    import zarr

    return dict(zarr.open_group(str(path), mode="r").attrs.get(PROVENANCE_KEY, {}))


def lazy_zeros(dims: tuple[str, ...], shape: tuple[int, ...], dtype=np.float32):
    """A dask array of zeros chunked exactly as :func:`write_variables` will store it.

    Put it in a dataset given to :func:`write_variables` to create a variable (metadata,
    coordinates, zero chunks computed one at a time) that :class:`GridWriter` then fills,
    so a stage never holds the whole variable.
    """
    import dask.array as da

    dtype = np.dtype(dtype)
    return da.zeros(shape, dtype=dtype, chunks=_chunks(tuple(dims), tuple(shape), dtype.itemsize))


class GridWriter:
    """Fill (z, a, b, radial) variables of a work store frame batch by frame batch.

    Integration produces frames in acquisition order; the product stores them on the scan
    grid. Rows are buffered per Zarr chunk of the target variables and a chunk is written
    (one aligned region write, no read-modify-write) as soon as all its frames have
    arrived, so for a scan acquired in grid order the memory held is about one chunk plus
    one batch, whatever the scan length. Frames arriving in any other order (snake scans,
    out-of-order batches from a cluster) are correct too; they only hold more chunks.

    Parameters
    ----------
    store : path
        Work store holding the variables (created with :func:`lazy_zeros`).
    names : sequence of str
        Variables to fill, each of shape ``index.shape + (npt,)``, float32.
    index : numpy.ndarray of int, shape (nz, na, nb)
        Frame index of each grid point (:class:`tasks.ingest.Grid`).
    written : iterable of tuple of int, optional
        Keys (chunk indices along z, a, b) of chunks already in the store, written by an
        earlier attempt (the keys its ``on_flush`` received): their frames count as
        written, and :attr:`todo` leaves them out.
    on_flush : callable(key), optional
        Called with a chunk's key once all its variables are written (e.g. to record it in
        a ledger, so that a resumed attempt skips it).

    Raises
    ------
    ValueError
        A frame written twice, a batch of the wrong width, an unknown chunk key in
        ``written``, or (at :meth:`close`) grid points without a frame.
    """

    def __init__(self, store, names, index: np.ndarray, written=(), on_flush=None):
        import zarr

        self.arrays = [zarr.open_array(str(Path(store) / n), mode="r+") for n in names]
        self.names = list(names)
        index = np.asarray(index, dtype=np.int64)
        self.grid_shape = index.shape
        shape = self.arrays[0].shape
        if tuple(shape[:3]) != tuple(index.shape):
            raise ValueError(f"{store}: variable {names[0]} has shape {shape}; expected "
                             f"{index.shape} + (radial,)")
        self.npt = int(shape[3])
        self.chunks = tuple(int(c) for c in self.arrays[0].chunks[:3])
        n = index.size
        self.point = np.empty(n, dtype=np.int64)  # frame -> flat grid point
        self.point[index.ravel()] = np.arange(n)
        self.seen = np.zeros(n, dtype=bool)
        self.pending: dict[tuple, list] = {}
        self.written = 0
        self.on_flush = on_flush
        self.n_chunks = tuple(-(-g // c) for g, c in zip(self.grid_shape, self.chunks))
        self.reused = 0
        for key in written:
            key = tuple(int(k) for k in key)
            if len(key) != 3 or not all(0 <= k < nc for k, nc in zip(key, self.n_chunks)):
                raise ValueError(f"{store}: chunk {key} of {names[0]} is outside its "
                                 f"{self.n_chunks} chunks")
            lo, hi = self._box(key)
            self.seen[index[tuple(slice(a, b) for a, b in zip(lo, hi))].ravel()] = True
            self.reused += 1

    @property
    def todo(self) -> np.ndarray:
        """bool, shape (n_frames,): frames not yet written (all but those of ``written``)."""
        return ~self.seen

    def _box(self, key):
        lo = [k * c for k, c in zip(key, self.chunks)]
        hi = [min(l + c, s) for l, c, s in zip(lo, self.chunks, self.grid_shape)]
        return lo, hi

    def __call__(self, s: int, e: int, *values) -> None:
        """Store the rows of frames ``s:e`` (one ``(e - s, npt)`` array, or None for NaN,
        per variable)."""
        if len(values) != len(self.arrays):
            raise ValueError(f"GridWriter: {len(values)} arrays for variables {self.names}")
        frames = np.arange(s, e)
        if self.seen[frames].any():
            raise ValueError(f"GridWriter: frame {int(frames[self.seen[frames]][0])} written twice")
        self.seen[frames] = True
        vals = [None if v is None else np.asarray(v, np.float32) for v in values]
        for v in vals:
            if v is not None and v.shape != (e - s, self.npt):
                raise ValueError(f"GridWriter: batch of shape {v.shape}; expected {(e - s, self.npt)}")
        coords = np.stack(np.unravel_index(self.point[frames], self.grid_shape), axis=1)
        keys = coords // np.asarray(self.chunks)
        for key in {tuple(int(x) for x in k) for k in keys}:
            sel = np.flatnonzero((keys == key).all(axis=1))
            if key not in self.pending:
                lo, hi = self._box(key)
                size = tuple(h - l for l, h in zip(lo, hi))
                self.pending[key] = [[np.full(size + (self.npt,), np.nan, np.float32)
                                      for _ in self.arrays], 0, lo, hi, int(np.prod(size))]
            bufs, count, lo, hi, total = self.pending[key]
            local = tuple((coords[sel] - np.asarray(lo)).T)
            for buf, v in zip(bufs, vals):
                if v is not None:
                    buf[local] = v[sel]
            count += sel.size
            self.pending[key][1] = count
            if count == total:
                region = tuple(slice(l, h) for l, h in zip(lo, hi))
                for arr, buf in zip(self.arrays, bufs):
                    arr[region] = buf
                self.written += 1
                del self.pending[key]
                if self.on_flush is not None:
                    self.on_flush(key)

    def close(self) -> None:
        """Check that every grid point was written (all chunks flushed)."""
        if self.pending or not self.seen.all():
            missing = int((~self.seen).sum())
            raise ValueError(f"GridWriter: {missing} frame(s) never written; "
                             f"{len(self.pending)} chunk(s) of {self.names} incomplete")


def write_slice(store, name: str, iz: int, values) -> None:
    """Write ``values`` (shape of the variable without its first axis) as slice ``iz`` of
    variable ``name`` of a work store (created beforehand, e.g. with :func:`lazy_zeros`).
    Chunks hold one z slice, so the write is chunk-aligned (no read-modify-write)."""
    import zarr

    arr = zarr.open_array(str(Path(store) / name), mode="r+")
    values = np.asarray(values, dtype=arr.dtype)
    if values.shape != tuple(arr.shape[1:]):
        raise ValueError(f"{store}: variable {name} slice has shape {tuple(arr.shape[1:])}; "
                         f"got {values.shape}")
    arr[int(iz)] = values
