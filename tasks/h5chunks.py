"""Bitshuffle-LZ4 HDF5 chunks read raw and decoded in parallel.

Detector frames are written by Dectris/ESRF/Diamond/MAX IV acquisition as HDF5 datasets
compressed with the bitshuffle filter (HDF5 filter id 32008) in LZ4 mode, usually one frame
per chunk. Reading them through h5py runs the filter inside libhdf5, one chunk at a time
and under h5py's global lock, so a frame stack decodes on one core. Here the compressed
bytes of each chunk are read with ``H5Dread_chunk`` (h5py ``DatasetID.read_direct_chunk``,
cheap: no filter runs) and decoded in a thread pool by the ``bitshuffle`` package: its
C ``bshuf_decompress_lz4`` called through ctypes straight into the output array (GIL
released, no intermediate copy), or ``bitshuffle.decompress_lz4`` when that symbol is
not exported.

Decoder: the ``bitshuffle`` PyPI package (``bitshuffle.decompress_lz4``; manylinux wheels
for CPython 3.11, pulls in nothing but numpy, h5py, Cython and setuptools). hdf5plugin
ships the same filter but exposes no Python-level decoder, and python-blosc2 implements
Blosc's own bit shuffle framing, not the HDF5 bitshuffle chunk format. nvCOMP (GPU) is not
used: on the 2-core reference machine there is no GPU to measure whether it pays.

Chunk format (bitshuffle ``bshuf_h5filter.c``, ``H5Z_filter_bitshuffle``): a 12-byte header,
``uint64`` big-endian uncompressed size in bytes and ``uint32`` big-endian block size in
bytes, followed by the LZ4 blocks of the bit-shuffled data (``bshuf_compress_lz4`` layout).
Filter ``cd_values`` are ``(major, minor, element size, block size in elements,
compression)`` with compression 2 = LZ4 (0 = bitshuffle only, 3 = zstd).

A chunk whose filter mask says the filter was skipped is stored raw. Anything else (other
filters, several filters, chunks that do not span whole frames, no ``bitshuffle`` package)
is read by h5py as before: :func:`direct_plan` returns None and the caller falls back.

The decoder threads each run bitshuffle's OpenMP loop on one thread (``omp_set_num_threads(1)``
in the thread, when the wheel bundles libgomp), so the pool's size is the decode
parallelism and nested use from Dask worker threads does not oversubscribe the cores.
"""

from __future__ import annotations

import ctypes
import glob
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

__all__ = ["BITSHUFFLE_FILTER_ID", "ChunkPlan", "direct_plan", "read_frames_direct",
           "decode_bitshuffle_lz4", "decode_bitshuffle_lz4_into", "decode_threads"]

#: HDF5 filter id registered for bitshuffle
BITSHUFFLE_FILTER_ID = 32008
_LZ4 = 2

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def decode_threads() -> int:
    """Decoder threads: ``XRDCT_DECODE_THREADS`` if set, else the number of cores."""
    env = os.environ.get("XRDCT_DECODE_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    return max(1, os.cpu_count() or 1)


def _bitshuffle():
    try:
        import bitshuffle  # noqa: PLC0415
    except ImportError:
        return None
    return bitshuffle if hasattr(bitshuffle, "decompress_lz4") else None


def _one_openmp_thread() -> None:
    """Pool initializer: bitshuffle's OpenMP loop on one thread in this decoder thread."""
    bs = _bitshuffle()
    if bs is None:
        return
    libdir = os.path.join(os.path.dirname(os.path.dirname(bs.__file__)), "bitshuffle.libs")
    for lib in glob.glob(os.path.join(libdir, "libgomp*.so*")):
        try:
            ctypes.CDLL(lib).omp_set_num_threads(1)
        except (OSError, AttributeError):
            pass


_C_DECODE = None


def _c_decoder():
    """``bshuf_decompress_lz4`` of the bitshuffle extension through ctypes (decodes straight
    into a caller's buffer, GIL released by ctypes), or None when the symbol is not there."""
    global _C_DECODE
    if _C_DECODE is None:
        fn = False
        try:
            import bitshuffle.ext as ext  # noqa: PLC0415

            lib = ctypes.CDLL(ext.__file__)
            fn = lib.bshuf_decompress_lz4
            fn.restype = ctypes.c_int64
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                           ctypes.c_size_t]
        except (ImportError, OSError, AttributeError):
            fn = False
        _C_DECODE = fn
    return _C_DECODE or None


def _header(buf, nbytes_want: int, itemsize: int) -> int:
    """Check a chunk's 12-byte header; returns the block size in bytes."""
    if len(buf) < 12:
        raise ValueError(f"bitshuffle chunk of {len(buf)} bytes: shorter than its 12-byte header")
    nbytes, block_bytes = struct.unpack(">QI", bytes(buf[:12]))
    if nbytes != nbytes_want:
        raise ValueError(f"bitshuffle chunk header says {nbytes} bytes; the chunk holds "
                         f"{nbytes_want}")
    if block_bytes % itemsize:
        raise ValueError(f"bitshuffle block size {block_bytes} bytes is not a multiple of the "
                         f"element size {itemsize}")
    return block_bytes


_WALK = None


def _lz4_walk():
    """The compiled block walker of :func:`check_lz4_blocks` (numba, cached on disk)."""
    global _WALK
    if _WALK is None:
        from numba import njit  # noqa: PLC0415

        @njit(cache=True, nogil=True)
        def walk(payload, n_blocks, block_bytes, last_bytes, leftover):
            # returns -1 when the blocks tile the payload, else the index of the first bad
            # block (or n_blocks when the sizes do not add up to the payload's length)
            pos = 0
            n = payload.size
            for b in range(n_blocks):
                want = block_bytes if b < n_blocks - 1 or last_bytes == 0 else last_bytes
                if pos + 4 > n:
                    return b
                size = ((np.int64(payload[pos]) << 24) | (np.int64(payload[pos + 1]) << 16)
                        | (np.int64(payload[pos + 2]) << 8) | np.int64(payload[pos + 3]))
                if size <= 0 or size > want + want // 255 + 16 or pos + 4 + size > n:
                    return b
                pos += 4 + size
            if pos + leftover != n:
                return n_blocks
            return -1

        _WALK = walk
    return _WALK


def check_lz4_blocks(buf, nbytes: int, block_bytes: int, itemsize: int) -> None:
    """Check the block structure of a bitshuffle-LZ4 chunk before it is decoded.

    bitshuffle's decoder (``bshuf_decompress_lz4``) trusts each block's 4-byte compressed
    size and decodes with ``LZ4_decompress_fast``, which does not bound its reads: a
    corrupted size field makes it read past the chunk and crash the process. Here the
    blocks are walked first (layout of ``bshuf_blocked_wrap_fun``: ``size // block``
    full blocks, one last block of the remainder rounded down to 8 elements, then the
    last ``size % 8`` elements stored raw): every size must be positive, at most
    ``LZ4_compressBound`` of its block, and the sizes must tile the payload exactly.

    Limit: a flipped byte inside an LZ4 literal decodes to a wrong value without any
    error; only a checksum (HDF5 Fletcher32, read through h5py) can find it.

    Raises
    ------
    ValueError
        Naming the first bad block.
    """
    if block_bytes <= 0 or (block_bytes // itemsize) % 8:
        raise ValueError(f"corrupt bitshuffle-LZ4 chunk: block size {block_bytes} bytes is not "
                         f"a positive multiple of 8 elements")
    size = nbytes // itemsize
    block = block_bytes // itemsize
    rem = size % block
    last = rem - rem % 8
    n_blocks = size // block + (1 if last else 0)
    payload = np.frombuffer(buf, dtype=np.uint8, offset=12)
    bad = _lz4_walk()(payload, n_blocks, block * itemsize, last * itemsize, (size % 8) * itemsize)
    if bad >= 0:
        what = (f"LZ4 block {bad} of {n_blocks} has an impossible compressed size"
                if bad < n_blocks else "the LZ4 blocks do not fill the chunk exactly")
        raise ValueError(f"corrupt bitshuffle-LZ4 chunk: {what} ({payload.size} compressed bytes "
                         f"for {nbytes} decoded)")


def decode_bitshuffle_lz4_into(buf: bytes, out: np.ndarray) -> None:
    """Decode one HDF5 bitshuffle-LZ4 chunk into ``out`` (C-contiguous, the chunk's shape
    and dtype), with no intermediate array.

    Raises
    ------
    ValueError
        Header size differing from ``out.nbytes``, a corrupt LZ4 stream, or input bytes left
        over / missing.
    """
    fn = _c_decoder()
    if fn is None or not out.flags.c_contiguous:
        out[...] = decode_bitshuffle_lz4(buf, out.shape, out.dtype)
        return
    block_bytes = _header(buf, out.nbytes, out.itemsize)
    check_lz4_blocks(buf, out.nbytes, block_bytes, out.itemsize)
    payload = np.frombuffer(buf, dtype=np.uint8, offset=12)
    used = fn(payload.ctypes.data, out.ctypes.data, out.size, out.itemsize,
              block_bytes // out.itemsize)
    if used < 0:
        raise ValueError(f"corrupt bitshuffle-LZ4 chunk: error code {used}")
    if used != payload.size:
        raise ValueError(f"corrupt bitshuffle-LZ4 chunk: {payload.size} compressed bytes, "
                         f"{used} decoded")


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(decode_threads(), thread_name_prefix="xrdct-decode",
                                       initializer=_one_openmp_thread)
        return _POOL


@dataclass(frozen=True)
class ChunkPlan:
    """How to read a frame dataset chunk by chunk.

    Attributes
    ----------
    chunks : tuple of int
        HDF5 chunk shape; its last two entries equal the frame shape ``(H, W)``.
    itemsize : int
        Bytes per element of the stored dtype.
    """

    chunks: tuple
    itemsize: int


def direct_plan(dset) -> ChunkPlan | None:
    """Whether ``dset`` can be read by :func:`read_frames_direct`, and how.

    Parameters
    ----------
    dset : h5py.Dataset
        A frame dataset ``(..., H, W)``.

    Returns
    -------
    ChunkPlan or None
        None (use h5py's own read) unless: the ``bitshuffle`` package imports, the dataset is
        chunked with whole frames per chunk, its filter pipeline is exactly one bitshuffle
        filter in LZ4 mode, and the dtype is a fixed-size number.
    """
    if _bitshuffle() is None or dset.chunks is None or dset.ndim < 3:
        return None
    if tuple(dset.chunks[-2:]) != tuple(dset.shape[-2:]):
        return None
    dt = dset.dtype
    if dt.kind not in "iuf" or dt.itemsize not in (1, 2, 4, 8):
        return None
    plist = dset.id.get_create_plist()
    if plist.get_nfilters() != 1:
        return None
    fid, _flags, cd, _name = plist.get_filter(0)
    if fid != BITSHUFFLE_FILTER_ID or len(cd) < 5 or cd[4] != _LZ4:
        return None
    return ChunkPlan(tuple(int(c) for c in dset.chunks), int(dt.itemsize))


def decode_bitshuffle_lz4(buf: bytes, shape: tuple, dtype) -> np.ndarray:
    """Decode one HDF5 bitshuffle-LZ4 chunk.

    Parameters
    ----------
    buf : bytes
        The chunk as stored (12-byte header + LZ4 blocks).
    shape : tuple of int
        Chunk shape.
    dtype : numpy dtype
        Stored element type.

    Returns
    -------
    numpy.ndarray, shape ``shape``, dtype ``dtype``

    Raises
    ------
    ValueError
        Header size differing from ``prod(shape) * itemsize``, or a corrupt LZ4 stream.
    """
    bs = _bitshuffle()
    dtype = np.dtype(dtype)
    block_bytes = _header(buf, int(np.prod(shape)) * dtype.itemsize, dtype.itemsize)
    check_lz4_blocks(buf, int(np.prod(shape)) * dtype.itemsize, block_bytes, dtype.itemsize)
    payload = np.frombuffer(buf, dtype=np.uint8, offset=12)
    try:
        return bs.decompress_lz4(payload, tuple(shape), dtype, block_bytes // dtype.itemsize)
    except Exception as err:  # bitshuffle raises RuntimeError/ValueError on bad streams
        raise ValueError(f"corrupt bitshuffle-LZ4 chunk: {err}") from None


def read_frames_direct(dset, plan: ChunkPlan, scan_shape: tuple, idx: np.ndarray,
                       ky=slice(None), kx=slice(None), out: np.ndarray | None = None) -> np.ndarray:
    """Frames ``idx`` of a bitshuffle-LZ4 frame dataset, decoded in parallel.

    Parameters
    ----------
    dset : h5py.Dataset
        Open dataset of shape ``scan_shape + (H, W)``, with ``plan = direct_plan(dset)``.
    plan : ChunkPlan
    scan_shape : tuple of int
        Leading (scan) dimensions of the dataset.
    idx : numpy.ndarray of int, shape (n,)
        Flat (C-order) frame indices.
    ky, kx : slice
        Rows and columns of each frame to return.
    out : numpy.ndarray, shape (n, h, w), the dataset's dtype, C-contiguous, optional
        Decoded into in place (e.g. a pinned staging buffer of the GPU path: no fresh
        allocation, no second copy); allocated when None.

    Returns
    -------
    numpy.ndarray, shape (n, h, w), the dataset's dtype
        Bit-identical to ``dset[...]`` read through the HDF5 filter (``out`` when given).

    Raises
    ------
    ValueError
        A corrupt chunk (header or LZ4 stream); the message names the chunk offset.
    OSError
        libhdf5 cannot read a chunk (truncated file, unallocated chunk).
    """
    idx = np.asarray(idx, dtype=np.int64).ravel()
    frame_shape = tuple(dset.shape[-2:])
    out_hw = np.empty(frame_shape, dtype=np.bool_)[ky, kx].shape
    if out is None:
        out = np.empty((idx.size,) + out_hw, dtype=dset.dtype)
    elif (tuple(out.shape) != (idx.size,) + out_hw or out.dtype != dset.dtype
          or not out.flags.c_contiguous):
        raise ValueError(f"out: expected a C-contiguous {(idx.size,) + out_hw} {dset.dtype} "
                         f"array, got {tuple(out.shape)} {out.dtype}")
    if idx.size == 0:
        return out
    lead_chunks = plan.chunks[:-2]
    coords = np.stack(np.unravel_index(idx, scan_shape), axis=1)  # (n, nd)
    origin = (coords // np.asarray(lead_chunks)) * np.asarray(lead_chunks)
    groups: dict[tuple, list[int]] = {}
    for k in range(idx.size):
        groups.setdefault(tuple(int(v) for v in origin[k]), []).append(k)
    # compressed bytes first (cheap, libhdf5 holds its lock), then decode in parallel
    raw = []
    for org, ks in groups.items():
        mask, buf = dset.id.read_direct_chunk(org + (0, 0))
        raw.append((org, ks, mask, buf))

    whole = np.empty(frame_shape, dtype=np.bool_)[ky, kx].shape == frame_shape
    one_frame = all(c == 1 for c in lead_chunks)

    def decode(item):
        org, ks, mask, buf = item
        try:
            if mask & 1:  # the filter was skipped for this chunk: stored raw
                chunk = np.frombuffer(buf, dtype=dset.dtype).reshape(plan.chunks)
            elif one_frame and whole and len(ks) == 1:  # straight into the output
                decode_bitshuffle_lz4_into(buf, out[ks[0]])
                return None
            else:
                chunk = np.empty(plan.chunks, dtype=dset.dtype)
                decode_bitshuffle_lz4_into(buf, chunk)
        except ValueError as err:
            raise ValueError(f"chunk at {org + (0, 0)}: {err}") from None
        for k in ks:
            local = tuple(int(c - o) for c, o in zip(coords[k], org))
            out[k] = chunk[local][ky, kx]
        return None

    if len(raw) == 1:
        decode(raw[0])
    else:
        list(_pool().map(decode, raw))
    return out
