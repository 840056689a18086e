"""Compile CUDA C with NVRTC on a machine without a GPU (the ``nvidia-cuda-nvrtc-cu12``
wheel of the dev extra ships the compiler library; compiling needs no device). The CPU
test run uses it to compile every kernel of tasks/cuda_kernels.py, so a syntax or type
error is caught in CI, before a GPU session runs the kernels."""

from __future__ import annotations

import ctypes
import glob
import os


def _library():
    try:
        import nvidia.cuda_nvrtc as m  # noqa: PLC0415
    except ImportError:
        return None
    for d in m.__path__:
        hits = sorted(glob.glob(os.path.join(d, "lib", "libnvrtc.so.*")))
        hits = [h for h in hits if ".alt." not in h and "builtins" not in h]
        if hits:
            return ctypes.CDLL(hits[0])
    return None


def available() -> bool:
    return _library() is not None


def compile_log(source: str, name: str = "kernel.cu", arch: str = "compute_90") -> tuple[int, str]:
    """Compile ``source``; returns (NVRTC result code, compiler log). 0 = success."""
    lib = _library()
    if lib is None:
        raise RuntimeError("NVRTC is not installed (pip install nvidia-cuda-nvrtc-cu12)")
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None)
    if rc:
        return rc, "nvrtcCreateProgram failed"
    opts = [b"-std=c++14", f"--gpu-architecture={arch}".encode()]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, buf)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, buf.value.decode(errors="replace")
