"""Array-module dispatch: one code path for numpy and cupy arrays."""

from __future__ import annotations

import numpy as np


def get_xp(*arrays):
    """Return the array module (``numpy`` or ``cupy``) of the given arrays.

    cupy is imported only when one of the arrays is a cupy array, so CPU-only machines
    never import it.
    """
    for a in arrays:
        mod = type(a).__module__
        if mod.startswith("cupy"):
            import cupy  # noqa: PLC0415 - lazy by design

            return cupy
    return np


def to_numpy(a):
    """Return ``a`` as a numpy array (copying from the GPU when it is a cupy array)."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


# --------------------------------------------------------------------------------------
# Backend choice (pipeline spec ``backend``, CLI ``--backend``)
# --------------------------------------------------------------------------------------

BACKENDS = ("cpu", "gpu", "auto")


class BackendError(ValueError):
    """The requested array backend cannot be used here (e.g. ``gpu`` without a device)."""


def gpu_status() -> tuple[bool, str]:
    """Whether cupy imports and sees a CUDA device, and why not.

    Returns
    -------
    (bool, str)
        ``(True, "<device name>")`` or ``(False, reason)``; never raises.
    """
    try:
        import cupy  # noqa: PLC0415
    except Exception as err:  # noqa: BLE001 - ImportError, or a broken CUDA install
        return False, f"cupy does not import ({type(err).__name__}: {err}); install the 'gpu' extra"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # noqa: BLE001 - no driver, no device
        return False, f"no CUDA device ({type(err).__name__}: {err})"
    if n < 1:
        return False, "no CUDA device (cupy sees 0 devices)"
    try:
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    except Exception:  # noqa: BLE001
        name = "CUDA device"
    return True, name


def resolve_backend(backend: str | None) -> str:
    """The array backend to run on: ``"cpu"`` or ``"gpu"``.

    Parameters
    ----------
    backend : {"cpu", "gpu", "auto"} or None
        ``auto`` (and None): ``gpu`` when cupy imports and a CUDA device is present, else
        ``cpu``.

    Returns
    -------
    str
        ``"cpu"`` or ``"gpu"``.

    Raises
    ------
    BackendError
        ``gpu`` requested but cupy does not import or no device is present (the message
        says which), or an unknown name.
    """
    b = "auto" if backend is None else str(backend).lower()
    if b not in BACKENDS:
        raise BackendError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if b == "cpu":
        return "cpu"
    ok, why = gpu_status()
    if b == "gpu" and not ok:
        raise BackendError(f"backend 'gpu' requested (pipeline spec 'backend' or --backend) but "
                           f"it cannot run here: {why}; use backend 'cpu' or 'auto'")
    return "gpu" if ok else "cpu"


def free_gpu_bytes() -> int:
    """Bytes the current CUDA device can still give: driver free memory plus the blocks
    cupy's memory pool holds but does not use (``cupy.cuda.Device().mem_info``)."""
    import cupy  # noqa: PLC0415

    free, _total = cupy.cuda.Device().mem_info
    pool = cupy.get_default_memory_pool()
    return int(free) + int(pool.free_bytes())


def batch_from_free_memory(free_bytes: int, bytes_per_item: int, fixed_bytes: int = 0, *,
                           fraction: float = 0.5, multiple: int = 1, max_items: int | None = None,
                           what: str = "batch") -> int:
    """How many items (frames, bins, voxels) fit in a share of the free device memory.

    ``floor((fraction * free_bytes - fixed_bytes) / bytes_per_item)``, rounded down to a
    multiple of ``multiple`` (when at least that many fit) and capped at ``max_items``.
    The batch is thus chosen from the memory the device has now, never a fixed constant.

    Parameters
    ----------
    free_bytes : int
        Free device memory in bytes (:func:`free_gpu_bytes`).
    bytes_per_item : int
        Device bytes one item needs (inputs, temporaries and outputs), > 0.
    fixed_bytes : int
        Bytes needed whatever the batch (matrices, masks), >= 0.
    fraction : float
        Share of ``free_bytes`` to use, 0 < fraction <= 1 (the rest is headroom for cuSPARSE
        / cuFFT workspaces and fragmentation).
    multiple : int
        Round the batch down to a multiple of this (e.g. 32 frames per warp-friendly step).
    max_items : int, optional
        Upper bound (e.g. the scan length).
    what : str
        Name for the error message.

    Returns
    -------
    int
        At least 1.

    Raises
    ------
    BackendError
        Not even one item fits (the message gives the numbers in MiB).
    ValueError
        Non-positive ``bytes_per_item`` or ``fraction`` outside (0, 1].
    """
    if bytes_per_item <= 0:
        raise ValueError(f"bytes_per_item={bytes_per_item}: expected > 0")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction}: expected 0 < fraction <= 1")
    usable = int(fraction * free_bytes) - int(fixed_bytes)
    k = usable // int(bytes_per_item)
    if k < 1:
        mib = 2.0 ** 20
        raise BackendError(
            f"{what}: not even one item fits in the GPU: {free_bytes / mib:.0f} MiB free, "
            f"{fraction:.0%} usable, {fixed_bytes / mib:.0f} MiB fixed, "
            f"{bytes_per_item / mib:.1f} MiB per item")
    if multiple > 1 and k >= multiple:
        k -= k % multiple
    if max_items is not None:
        k = min(k, max(1, int(max_items)))
    return int(k)
