"""Shared, cached pieces of the CNN tests (tests/test_cnn.py, tests/test_learn.py): one
tiny trained model per session, and fake processed products (sinogram + FBP volume)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

SIZE = 32          # image side = translations
N_ANGLE = 32
NOISE = 0.01
ARCH = {"width": 32, "dense": 256, "n_dense": 1, "refine": 8, "dropout": 0.1}
N_TRAIN = 300
EPOCHS = 12
LR = 1e-3          # 4x the published 2.5e-4, so that a few epochs suffice in the tests


def torch_one_thread():
    import torch

    torch.set_num_threads(1)


@functools.lru_cache(maxsize=None)
def library(kind: str, n: int, seed: int):
    from tasks import cnn

    return cnn.build_library(n, SIZE, N_ANGLE, kind=kind, seed=seed, noise=NOISE)


@functools.lru_cache(maxsize=None)
def trained_model():
    """The test model: catalyst-like library of N_TRAIN pairs, EPOCHS epochs."""
    from tasks import cnn

    torch_one_thread()
    return cnn.train(library("catalyst", N_TRAIN, 0), epochs=EPOCHS, lr=LR, seed=0,
                     batch_size=16, arch=ARCH)


def write_product(path: Path, seed: int, n_bins: int = 3, size: int = SIZE,
                  n_angle: int = N_ANGLE) -> np.ndarray:
    """A processed-product store with ``sinogram`` (z, angle, translation_c, radial) of
    catalyst-like phantoms (one per bin, bin intensity 1, 0.6, 0.3, ...) and their FBP
    ``volume``; returns the phantoms (n, n, n_bins)."""
    import xarray as xr

    from tasks import cnn, store
    from tasks.reconstruct import fbp, radon

    rng = np.random.default_rng(seed)
    imgs = np.stack([cnn.catalyst_phantom(size, rng) * (0.6 ** b) for b in range(n_bins)], axis=-1)
    ang = cnn.default_angles(n_angle)
    sino = radon(imgs, ang)
    vol = fbp(sino, ang)
    ds = xr.Dataset(
        {"sinogram": (("z", "angle", "translation_c", "radial"), sino[None].astype(np.float32)),
         "volume": (("z", "y", "x", "radial"), vol[None].astype(np.float32))},
        coords={"z": ("z", [0.0]), "angle": ("angle", ang), "radial": ("radial", np.arange(n_bins) + 1.0)})
    store.write_variables(path, ds)
    return imgs


def register_product(cat, pid: str, location: Path) -> None:
    cat.register_product(
        product_id=pid, location=str(location), scan_path=f"/scans/{pid}.nxs",
        scan_checksum=(pid * 64)[:64], scan_kind="sinogram", geometry={}, poni=None,
        calibration={"poni": None}, pipeline_name="default", spec={"name": "default"},
        code_version="test", inputs={}, timings={}, wall_time_s=1.0)
