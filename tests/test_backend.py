"""Array backend choice (spec ``backend``, CLI ``--backend``), GPU batch size from free
memory (fake numbers on the CPU), and the GPU integration / FBP paths against the CPU
(gpu-marked: run on the device machine)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.spec import SpecError, load_spec, parse_spec
from tasks import _xp
from tasks._xp import BackendError, batch_from_free_memory, resolve_backend

GiB = 2 ** 30
MiB = 2 ** 20


def _no_gpu():
    return not _xp.gpu_status()[0]


# ------------------------------------------------------------------------------ choice
def test_resolve_backend(monkeypatch):
    assert resolve_backend("cpu") == "cpu"
    monkeypatch.setattr(_xp, "gpu_status", lambda: (False, "no CUDA device (cupy sees 0 devices)"))
    assert resolve_backend("auto") == "cpu" and resolve_backend(None) == "cpu"
    with pytest.raises(BackendError, match=r"backend 'gpu' requested .* no CUDA device \(cupy sees 0"):
        resolve_backend("gpu")
    monkeypatch.setattr(_xp, "gpu_status", lambda: (True, "NVIDIA H100"))
    assert resolve_backend("auto") == "gpu" and resolve_backend("GPU") == "gpu"
    assert resolve_backend("cpu") == "cpu"
    with pytest.raises(BackendError, match="backend 'cuda': expected one of cpu, gpu, auto"):
        resolve_backend("cuda")


@pytest.mark.skipif(not _no_gpu(), reason="checks the no-GPU message; this machine has a GPU")
def test_gpu_status_says_why_not_here():
    ok, why = _xp.gpu_status()
    assert not ok and ("cupy does not import" in why or "no CUDA device" in why)


def test_spec_backend_field():
    assert parse_spec({}).backend == "auto"
    assert parse_spec({"backend": "gpu"}).backend == "gpu"
    for name in ("default", "demo", "battery", "catalyst"):  # shipped YAMLs stay valid
        assert load_spec(name).backend == "auto"
    with pytest.raises(SpecError, match=r"backend: Input should be 'cpu', 'gpu' or 'auto' \(got 'cuda'\)"):
        parse_spec({"backend": "cuda"}, source="x.yaml")
    with pytest.raises(SpecError, match="integration.backend: unknown key"):
        parse_spec({"integration": {"backend": "gpu"}})
    # part of the spec's identity (provenance, product id)
    assert parse_spec({"backend": "cpu"}).canonical_json() != parse_spec({}).canonical_json()


@pytest.mark.skipif(not _no_gpu(), reason="a GPU is present here")
def test_gpu_requested_without_device_is_one_clear_error(tmp_path, capsys):
    from flows.cli import main
    from flows.process import run_pipeline

    scan = tmp_path / "scan.h5"
    scan.write_bytes(b"")
    with pytest.raises(BackendError, match="backend 'gpu' requested"):
        run_pipeline(scan, pipeline="default", out=tmp_path / "out", backend="gpu")
    assert not (tmp_path / "out" / ".work").exists()  # nothing started
    with pytest.raises(SpecError, match="backend 'tpu'"):
        run_pipeline(scan, pipeline="default", out=tmp_path / "out", backend="tpu")
    rc = main(["process", str(scan), "--backend", "gpu", "--no-prefect", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 2 and "backend 'gpu' requested" in out
    with pytest.raises(SystemExit):
        main(["process", str(scan), "--backend", "tpu"])


# ------------------------------------------------------------------------------ batch size
def test_batch_from_free_memory_numbers():
    # 80 GiB free, half usable, 1 GiB fixed: (40 - 1) GiB / 100 MiB = 399.36 -> 399
    assert batch_from_free_memory(80 * GiB, 100 * MiB, 1 * GiB) == 399
    assert batch_from_free_memory(80 * GiB, 100 * MiB, 1 * GiB, multiple=32) == 384
    assert batch_from_free_memory(80 * GiB, 100 * MiB, 1 * GiB, max_items=50) == 50
    assert batch_from_free_memory(80 * GiB, 100 * MiB, fraction=1.0) == 819
    # a smaller card (or a busier one) gets a smaller batch: never a constant
    assert batch_from_free_memory(16 * GiB, 100 * MiB, 1 * GiB) == 71
    assert batch_from_free_memory(16 * GiB, 100 * MiB, 1 * GiB, multiple=32) == 64
    assert batch_from_free_memory(1 * GiB, 300 * MiB, 0, multiple=32) == 1  # < multiple: kept
    with pytest.raises(BackendError, match=r"not even one item fits in the GPU: 1024 MiB free, "
                                           r"50% usable, 600 MiB fixed, 100.0 MiB per item"):
        batch_from_free_memory(1 * GiB, 100 * MiB, 600 * MiB)
    with pytest.raises(ValueError, match="bytes_per_item"):
        batch_from_free_memory(GiB, 0)
    with pytest.raises(ValueError, match="fraction"):
        batch_from_free_memory(GiB, 1, fraction=1.5)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from tasks.simulate import SimConfig, simulate_scan

    return simulate_scan(tmp_path_factory.mktemp("sim") / "scan",
                         SimConfig(n_translations=12, n_angles=6, npt_sim=500, cor_offset_px=0.0))


def _spec(sim, **integration):
    return parse_spec({"integration": {"npt": 500, "radial_range": [10.0, 66.0], **integration},
                       "calibration": {"poni": str(sim.poni_path)}})


def test_integrator_gpu_bytes_and_batch(sim):
    from tasks.integrate import integrator_from_spec

    integ = integrator_from_spec(_spec(sim), shape=(213, 206))
    per_frame, fixed = integ.gpu_bytes(np.uint32)
    npix = 213 * 206
    # the fused kernel reads frames in place: the frame and two float32 results per frame
    assert per_frame == npix * 4 + 2 * 4 * 500
    nnz = integ._csr("bbox").A.nnz
    assert fixed == nnz * 8 + 501 * 4 + npix * 8 + 500 * 8
    assert integ.gpu_bytes(np.uint16)[0] == per_frame - 2 * npix  # frames stay 2-byte ints
    # what the GPU path would pick on an 80 GB card and on a 4 GB card
    big = batch_from_free_memory(80 * 10 ** 9, per_frame + npix * 4, fixed)
    small = batch_from_free_memory(4 * 10 ** 9, per_frame + npix * 4, fixed)
    assert big == (40 * 10 ** 9 - fixed) // (per_frame + npix * 4)
    assert 15 < small < big // 19


# ------------------------------------------------------------------------------ GPU (device machine)
def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.gpu
@pytest.mark.parametrize("free_gib", [None, 0.02])
def test_gpu_scan_integration_matches_cpu(sim, free_gib):
    """Pinned staging + two streams, the batch from (real or small fake) free memory, against
    the CPU path: 1e-5 relative (intensity and sigma)."""
    from tasks.ingest import open_nexus
    from tasks.integrate import _integrate_scan_gpu, integrate_scan, integrator_from_spec

    spec = _spec(sim)
    scan = open_nexus(sim.nexus_path)
    assert scan.frames.dtype == np.uint32
    integ = integrator_from_spec(spec, shape=scan.frame_shape)
    radial, i_cpu, s_cpu = integrate_scan(scan, spec, integrator=integ, backend="cpu")
    got_i = np.full_like(i_cpu, np.nan)
    got_s = np.full_like(s_cpu, np.nan)
    order = []

    def emit(s, e, i, sg):
        order.append(s)
        got_i[s:e] = i
        got_s[s:e] = sg

    free = None if free_gib is None else int(free_gib * GiB)
    batch = _integrate_scan_gpu(integ, scan, spec.integration, "sim", emit, None, 512 * MiB,
                                free_bytes=free)
    if free is not None:
        assert 1 <= batch < scan.n_frames  # several batches: both buffers and streams used
    assert order == sorted(order) and not np.isnan(got_i).any()
    assert _rel(got_i, i_cpu) < 1e-5 and _rel(got_s, s_cpu) < 1e-5
    # the public entry point picks the same path
    _, i2, s2 = integrate_scan(scan, spec, integrator=integ, backend="gpu")
    assert _rel(i2, i_cpu) < 1e-5 and _rel(s2, s_cpu) < 1e-5


@pytest.mark.gpu
def test_gpu_bytes_is_an_upper_bound(sim):
    import cupy as cp

    from tasks.ingest import open_nexus
    from tasks.integrate import integrator_from_spec

    scan = open_nexus(sim.nexus_path)
    integ = integrator_from_spec(_spec(sim), shape=scan.frame_shape)
    frames = cp.asarray(scan.frames[:16].compute())
    integ.integrate(frames[:1])  # matrices on the device
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    # what the pool holds before (chunks partly in use keep free space that used_bytes does
    # not count); its growth is the memory the call needed
    before = pool.total_bytes()
    out = integ.integrate(frames)
    cp.cuda.Device().synchronize()
    per_frame, fixed = integ.gpu_bytes(frames.dtype)
    assert pool.total_bytes() - before <= 16 * per_frame
    assert out[0].shape == (16, 500)


@pytest.mark.gpu
def test_gpu_fbp_matches_cpu():
    import cupy as cp

    from helpers import phantom
    from tasks.reconstruct import fbp, radon

    img = phantom(64, nb=5).astype(np.float32)
    angles = np.linspace(0, 180, 90, endpoint=False)
    sino = radon(img, angles)
    v_cpu = fbp(sino, angles)
    v_gpu = fbp(cp.asarray(sino), angles)
    assert _rel(cp.asnumpy(v_gpu), v_cpu) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("n_angle, span, center, circle", [(120, 180.0, 45.6, True),
                                                           (77, 360.0, 52.3, False)])
def test_cupy_fbp_paths_equal_numpy(n_angle, span, center, circle):
    """The same FBP on cupy arrays (the tiled CUDA back-projection kernel and the cuSPARSE
    path, every filter; an off-centre axis, 180 and 360 degree scans, with and without the
    reconstruction circle) gives the CPU result; so do the GPU radon and sinogram shift."""
    cp = pytest.importorskip("cupy")
    from helpers import phantom
    from tasks.reconstruct import FILTERS, fbp, radon
    from tasks.sinogram import shift_sinogram

    n, nb = 96, 37
    ang = np.linspace(0, span, n_angle, endpoint=False)
    img = phantom(n, nb).astype(np.float32)
    sino = radon(img, ang, center=center)
    sino_gpu = radon(cp.asarray(img), ang, center=center)
    assert isinstance(sino_gpu, cp.ndarray)
    np.testing.assert_allclose(cp.asnumpy(sino_gpu), sino, rtol=0, atol=1e-5 * sino.max())
    for filt in FILTERS:
        ref = fbp(sino, ang, center=center, filter=filt, circle=circle)
        for kernel in ("auto", "cuda", "spmm"):
            got = fbp(cp.asarray(sino), ang, center=center, filter=filt, kernel=kernel,
                      circle=circle)
            assert isinstance(got, cp.ndarray)
            assert _rel_rms(cp.asnumpy(got), ref) < 1e-5, (filt, kernel)
    sh = shift_sinogram(cp.asarray(sino), 0.37)
    np.testing.assert_allclose(cp.asnumpy(sh), shift_sinogram(sino, 0.37), atol=1e-4 * sino.max())


def _rel_rms(a, ref):
    return float(np.sqrt(np.mean((a - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))


# ------------------------------------------------------------------------------ cluster setting
def test_cluster_setting(monkeypatch):
    import sys

    from flows.process import _dask_client

    monkeypatch.delenv("XRDCT_CLUSTER", raising=False)
    monkeypatch.delenv("XRDCT_DASK_ADDRESS", raising=False)
    c = _dask_client(None, None)
    assert (c.kind, c.address) == ("local", None)
    c = _dask_client(None, None, "tcp://10.0.0.5:8786")  # an address attaches
    assert (c.kind, c.address) == ("local", "tcp://10.0.0.5:8786")
    monkeypatch.setenv("XRDCT_CLUSTER", "cuda")
    assert _dask_client(None, 2).kind == "cuda"
    with pytest.raises(BackendError, match="cluster 'gpus': expected 'local', 'cuda' or a Dask"):
        _dask_client(None, None, "gpus")
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # import fails as without the extra
    with pytest.raises(BackendError, match=r"cluster 'cuda' needs dask_cuda .*\(pip install -e '\.\[gpu\]'"):
        with _dask_client(None, None, "cuda"):
            pass


def test_clipping_kernel_capacity_and_cpu_refusal(sim):
    """The one-kernel sigma clip holds each bin's pixels in registers, K per thread (a power
    of two, one bit each in a 64-bit mask): K follows the largest bin, a bin too large for
    64 x threads is refused by name, and the kernel engine refuses numpy frames."""
    from tasks.cuda_kernels import CLIP_THREADS, clip_entries_per_thread
    from tasks.integrate import IntegrationError, integrator_from_spec

    t = CLIP_THREADS
    assert [clip_entries_per_thread(c) for c in (1, t, t + 1, 3 * t, 64 * t)] == [1, 1, 2, 4, 64]
    with pytest.raises(ValueError, match="bin holds"):
        clip_entries_per_thread(64 * t + 1)
    integ = integrator_from_spec(_spec(sim), shape=(213, 206))
    with pytest.raises(IntegrationError, match="engine 'kernel'"):
        integ.integrate_sigma_clip(np.zeros((1, 213, 206), np.uint32), engine="kernel")
    with pytest.raises(IntegrationError, match="engine 'kernel'"):
        integ.integrate_trimmed_mean(np.zeros((1, 213, 206), np.uint32), engine="kernel")
    # the trimmed-mean kernel sorts a power of two >= the largest bin, within shared memory
    from tasks.cuda_kernels import TRIM_THREADS, trim_sort_size

    assert [trim_sort_size(c) for c in (1, TRIM_THREADS + 1, 4700, 8192)] == \
        [TRIM_THREADS, 2 * TRIM_THREADS, 8192, 8192]
    with pytest.raises(ValueError, match="sorts at most 8192"):
        trim_sort_size(8193)


def test_every_cuda_kernel_compiles():
    """Every CUDA kernel of tasks/cuda_kernels.py compiles with NVRTC (no GPU needed), for
    every frame dtype and every launch variant the code can ask for: a syntax or type error
    fails here on the CPU, not in the next GPU session."""
    import nvrtc

    if not nvrtc.available():
        pytest.skip("NVRTC is not installed (the dev extra's nvidia-cuda-nvrtc-cu12)")
    from tasks import cuda_kernels as ck

    sources = {"bp_joseph_tiled": ck._SOURCE}
    for ct in sorted(set(ck._CTYPES.values())):
        base = {"T": ct, "VALID": ck._VALID_PIXEL}
        sources[f"integrate {ct}"] = ck._INTEGRATE_SOURCE % {**base, "NF": ck.FRAMES_PER_BLOCK,
                                                             "NT": ck.INTEGRATE_THREADS}
        sources[f"trim {ct}"] = ck._TRIM_SOURCE % {**base, "NT": ck.TRIM_THREADS}
        for k in (1, 64):
            sources[f"clip {ct} K={k}"] = ck._CLIP_SOURCE % {**base, "NT": ck.CLIP_THREADS, "K": k}
    for nf, nt in ((1, 32), (16, 512)):
        sources[f"integrate nf={nf} nt={nt}"] = ck._INTEGRATE_SOURCE % {
            "T": "unsigned int", "VALID": ck._VALID_PIXEL, "NF": nf, "NT": nt}
    failed = {}
    for name, src in sources.items():
        rc, log = nvrtc.compile_log(src, name.replace(" ", "_") + ".cu")
        if rc != 0:
            failed[name] = log[-1500:]
    assert not failed, failed
    # and a broken source does fail (the check can fail)
    rc, log = nvrtc.compile_log('extern "C" __global__ void k(float* a) { a[0] = b; }')
    assert rc != 0 and "identifier" in log
