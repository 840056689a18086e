"""Supervised CNN reconstruction of XRD-CT sinograms, its training library and an
out-of-distribution check.

Method
------
The network is the ``cnn_reconstruct`` model of the AI3SD report (K. T. Butler, H. Dong,
A. Vamvakeros, S. D. M. Jacques et al., "Machine learning for XRD-CT", AI3SD project
report; Keras code distributed with nDTomo's ``nDTomo/nn/models``), re-written in PyTorch:

* input: one sinogram ``(n_angle, n_translation)`` as a one-channel image;
* four 3x3 convolutions with stride 2 and ReLU (the published width is 64 filters);
* flatten, fully connected layers with ReLU and dropout 0.1 (published: 1000 units), and a
  linear layer with ``n_translation**2`` outputs, reshaped to the ``(n, n)`` image;
* three 3x3 refining convolutions with ReLU (published: 128 filters) and a final 3x3
  convolution to one channel.

Training minimises the RMSE between prediction and ground-truth image with Adam at the
published learning rate 2.5e-4. The default widths here are smaller (:data:`DEFAULT_ARCH`)
so that a 32-64 px model trains in minutes on a CPU; every width is a hyper-parameter
recorded with the model.

Conventions
-----------
Sinograms are ``(n_angle, n_translation[, n_bin])`` float32 and images
``(n, n[, n_bin])`` with ``n = n_translation``, in the orientation of
:func:`tasks.reconstruct.fbp` (the training pairs are made with
:func:`tasks.reconstruct.radon`, whose geometry ``fbp`` inverts). Radial bins are a batch
dimension. Each sinogram is normalised by its mean row sum ``M`` (the total mass the beam
sees at every angle): the network sees ``sino * n / M`` and predicts ``image * n**2 / M``,
so the reconstruction is linear in the intensity scale of the input, as FBP is.

Out of distribution
-------------------
The AI3SD report shows the failure of a CNN trained on catalyst-like images when it meets
random shapes. :func:`ood_score` embeds a sinogram in two parts -- the trained encoder's
bottleneck features (the flattened output of the four strided convolutions) and the log
power spectrum of the normalised sinogram along translation, averaged over angles (its
texture: many small particles put power at high spatial frequencies, large shapes do not)
-- standardised per feature with the training set's mean and spread, and returns the mean
distance to its ``k`` nearest training embeddings. The threshold is a quantile (default
0.99) of the same distance of every training embedding to its ``k`` nearest *other*
training embeddings (leave-one-out), so about 1 % of in-distribution inputs are flagged by
construction. :func:`reconstruct` falls back to FBP, with a warning, beyond it (and for
another geometry or angle set than the model's).

Models are artefacts: :func:`save_model` writes the weights with ``torch.save`` of a
state dict plus a JSON sidecar (architecture, angles, OOD settings, training provenance,
SHA-256 of the weights); :func:`load_model` reads them back with
``torch.load(..., weights_only=True)`` and checks the checksum.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasks._checks import angles_array, sinogram_array
from tasks._xp import to_numpy

__all__ = ["CnnError", "OutOfDistributionWarning", "Library", "CnnModel", "DEFAULT_ARCH",
           "LEARNING_RATE", "catalyst_phantom", "shapes_phantom", "build_library",
           "add_pairs_from_product", "build_network", "train", "predict", "evaluate",
           "embed", "ood_score", "is_out_of_distribution", "reconstruct", "save_model",
           "load_model", "file_sha256", "default_angles"]

LEARNING_RATE = 2.5e-4          # the AI3SD report's Adam learning rate
FORMAT = "xrdct-cnn-reconstruct/1"
KINDS = ("catalyst", "shapes")
FALLBACKS = ("fbp", "error", "none")

#: Default hyper-parameters (the published ones are width 64, dense 1000 x 4 and refine 128).
DEFAULT_ARCH = {"width": 32, "dense": 512, "n_dense": 2, "refine": 16, "dropout": 0.1}

_CATALYST_IMAGES = ("catalyst_particles_medium.tif", "catalyst_particles_large.tif",
                    "catalyst_particles_small.tif")


class CnnError(ValueError):
    """Bad input to the CNN stage; the message names the argument and what was expected."""


class OutOfDistributionWarning(RuntimeWarning):
    """A sinogram was judged out of the training distribution (CNN not trusted)."""


def _torch():
    try:
        import torch
    except ImportError as err:  # pragma: no cover - torch is in the learned extra
        raise CnnError("the CNN stage needs PyTorch (pip install 'xrdct[learned]')") from err
    return torch


def default_angles(n_angle: int) -> np.ndarray:
    """``n_angle`` uniformly spaced angles over [0, 180) degrees, float64."""
    if int(n_angle) < 2:
        raise CnnError(f"n_angle: expected >= 2 angles, got {n_angle!r}")
    return np.linspace(0.0, 180.0, int(n_angle), endpoint=False)


# --------------------------------------------------------------------------------------
# phantoms
# --------------------------------------------------------------------------------------

def _real_images_dir() -> Path:
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "ndtomo_images"


_IMAGE_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _catalyst_source():
    """(image, particle labels) of the nDTomo catalyst image, or None when absent."""
    d = _real_images_dir()
    for name in _CATALYST_IMAGES:
        p = d / name
        if p.is_file():
            key = str(p)
            if key not in _IMAGE_CACHE:
                from scipy import ndimage

                from tasks.simulate import _otsu, _read_image

                img = _read_image(p)
                img = img / max(float(img.max()), 1e-12)
                fg = img > _otsu(img.ravel())
                labels, _ = ndimage.label(fg)
                _IMAGE_CACHE[key] = (img, labels)
            return _IMAGE_CACHE[key]
    return None


def _disk_support(n: int, radius_frac: float) -> np.ndarray:
    c = (n - 1) / 2.0
    yy, xx = np.mgrid[:n, :n] - c
    return np.hypot(yy, xx) <= radius_frac * n / 2.0


def _area_resample(img: np.ndarray, n: int) -> np.ndarray:
    from tasks.simulate import _area_matrix

    a = _area_matrix(img.shape[0], n)
    b = _area_matrix(img.shape[1], n)
    return a @ img @ b.T


def catalyst_phantom(n: int, rng: np.random.Generator, *, radius_frac: float = 0.9,
                     source: str = "auto") -> np.ndarray:
    """One catalyst-like phantom: particles in a circular bed.

    With the nDTomo catalyst images (``../shared/data/real/ndtomo_images``) present and
    ``source`` "auto" or "image": a random square window (40-100 % of the image side) is
    cut, rotated by a random angle, randomly flipped, every particle (connected component
    of the Otsu foreground) is given a random intensity factor in [0.4, 1.6] (particles of
    different phase content, as the bins of an XRD-CT scan show them), and the window is
    area-averaged to ``n x n``. Otherwise ("procedural"): up to 25-70 round particles of
    radius 2-7 % of the bed diameter (+ 0.6 px), of random intensity in [0.4, 1.6], at
    least 1.5 px apart, in the bed.

    Parameters
    ----------
    n : int
        Image side (pixels).
    rng : numpy.random.Generator
    radius_frac : float
        The bed radius as a fraction of ``n / 2``; zero outside it.
    source : {"auto", "image", "procedural"}

    Returns
    -------
    numpy.ndarray, shape (n, n), float32, >= 0
    """
    from scipy import ndimage

    support = _disk_support(n, radius_frac)
    src = _catalyst_source() if source in ("auto", "image") else None
    if source == "image" and src is None:
        raise CnnError(f"source: 'image' needs the nDTomo catalyst images in {_real_images_dir()}")
    if src is not None:
        img, labels = src
        s = img.shape[0]
        w = int(rng.uniform(0.4, 1.0) * s)
        y0 = int(rng.integers(0, s - w + 1))
        x0 = int(rng.integers(0, s - w + 1))
        win = img[y0:y0 + w, x0:x0 + w]
        lab = labels[y0:y0 + w, x0:x0 + w]
        factors = rng.uniform(0.4, 1.6, size=int(labels.max()) + 1)
        factors[0] = 1.0
        win = win * factors[lab]
        win = ndimage.rotate(win, float(rng.uniform(0, 360)), reshape=False, order=1, mode="constant")
        if rng.random() < 0.5:
            win = win[:, ::-1]
        out = _area_resample(np.clip(win, 0, None), n)
    else:
        c = (n - 1) / 2.0
        R = radius_frac * n / 2.0
        ss = 4
        sub = (np.arange(n * ss) + 0.5) / ss - 0.5
        yy, xx = np.meshgrid(sub - c, sub - c, indexing="ij")
        fine = np.zeros(yy.shape)
        placed: list[tuple[float, float, float]] = []
        gap = 1.5                      # pixels between particles, so they stay apart
        for _ in range(int(rng.integers(25, 71))):
            for _try in range(30):
                r = float(rng.uniform(0.02, 0.07)) * 2 * R + 0.6
                rho = R * math.sqrt(rng.random()) * 0.95
                phi = rng.uniform(0, 2 * np.pi)
                py, px = rho * math.sin(phi), rho * math.cos(phi)
                if math.hypot(py, px) + r > R:
                    continue
                if all(math.hypot(py - qy, px - qx) > r + qr + gap for qy, qx, qr in placed):
                    placed.append((py, px, r))
                    fine[(yy - py) ** 2 + (xx - px) ** 2 <= r * r] = rng.uniform(0.4, 1.6)
                    break
        out = fine.reshape(n, ss, n, ss).mean(axis=(1, 3))
    return np.where(support, np.clip(out, 0, None), 0.0).astype(np.float32)


def shapes_phantom(n: int, rng: np.random.Generator, *, radius_frac: float = 0.9) -> np.ndarray:
    """One random-shapes phantom, the out-of-distribution input of the AI3SD report.

    One time in four: the simulator's multi-phase test object
    (:func:`tasks.simulate._shapes_phantom`, phases summed) rotated by a random angle.
    Otherwise 1-4 large shapes (ellipses, rectangles, triangles; sizes 15-60 % of the
    bed radius) of random uniform intensity in [0.3, 1.5], added, 4x4 supersampled.

    Parameters
    ----------
    n : int
    rng : numpy.random.Generator
    radius_frac : float
        As for :func:`catalyst_phantom`.

    Returns
    -------
    numpy.ndarray, shape (n, n), float32, >= 0
    """
    from scipy import ndimage

    support = _disk_support(n, radius_frac)
    R = radius_frac * n / 2.0
    if rng.random() < 0.25:
        from tasks.simulate import _shapes_phantom

        m = _shapes_phantom(n, R, 3).sum(axis=0)
        out = ndimage.rotate(m, float(rng.uniform(0, 360)), reshape=False, order=1)
    else:
        ss = 4
        c = (n - 1) / 2.0
        sub = (np.arange(n * ss) + 0.5) / ss - 0.5
        yy, xx = np.meshgrid((sub - c) / R, (sub - c) / R, indexing="ij")
        fine = np.zeros(yy.shape)
        for _ in range(int(rng.integers(1, 5))):
            cy, cx = rng.uniform(-0.5, 0.5, 2)
            a, b = rng.uniform(0.15, 0.6, 2)
            t = rng.uniform(0, np.pi)
            u = (yy - cy) * np.cos(t) + (xx - cx) * np.sin(t)
            v = -(yy - cy) * np.sin(t) + (xx - cx) * np.cos(t)
            kind = int(rng.integers(0, 3))
            if kind == 0:
                region = (u / a) ** 2 + (v / b) ** 2 <= 1
            elif kind == 1:
                region = (np.abs(u) <= a) & (np.abs(v) <= b)
            else:
                region = (u >= -a) & (np.abs(v) <= b * (1 - (u + a) / (2 * a)))
            fine[region] += rng.uniform(0.3, 1.5)
        out = fine.reshape(n, ss, n, ss).mean(axis=(1, 3))
    return np.where(support, np.clip(out, 0, None), 0.0).astype(np.float32)


# --------------------------------------------------------------------------------------
# library
# --------------------------------------------------------------------------------------

@dataclass
class Library:
    """Sinogram/image training pairs.

    Attributes
    ----------
    sinograms : numpy.ndarray, shape (N, n_angle, n), float32
    images : numpy.ndarray, shape (N, n, n), float32
        Targets in the orientation of :func:`tasks.reconstruct.fbp`.
    angles_deg : numpy.ndarray, shape (n_angle,), float64
    groups : numpy.ndarray, shape (N,), int64
        Source of each pair (an index into ``sources``), so held-out splits can keep whole
        scans apart.
    sources : list of dict
        JSON description of each source: simulated phantoms (kind, count, seed, noise) or
        a product (id, path, bins).
    """

    sinograms: np.ndarray
    images: np.ndarray
    angles_deg: np.ndarray
    groups: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    sources: list = field(default_factory=list)

    def __post_init__(self):
        self.sinograms = np.ascontiguousarray(self.sinograms, np.float32)
        self.images = np.ascontiguousarray(self.images, np.float32)
        self.angles_deg = np.asarray(self.angles_deg, np.float64)
        if self.sinograms.ndim != 3 or self.images.ndim != 3:
            raise CnnError(f"library: sinograms (N, n_angle, n) and images (N, n, n) expected, "
                           f"got {self.sinograms.shape} and {self.images.shape}")
        N, na, n = self.sinograms.shape
        if self.images.shape != (N, n, n) or self.angles_deg.shape != (na,):
            raise CnnError(f"library: images must be (N, n, n) = {(N, n, n)} and angles ({na},); "
                           f"got {self.images.shape} and {self.angles_deg.shape}")
        if self.groups.size == 0 and N:
            self.groups = np.zeros(N, np.int64)
        self.groups = np.asarray(self.groups, np.int64)

    def __len__(self) -> int:
        return int(self.sinograms.shape[0])

    @property
    def n_angle(self) -> int:
        return int(self.sinograms.shape[1])

    @property
    def n_translation(self) -> int:
        return int(self.sinograms.shape[2])

    def checksum(self) -> str:
        """SHA-256 of the pairs and the angles (the library's identity)."""
        h = hashlib.sha256()
        for a in (self.angles_deg, self.sinograms, self.images):
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def description(self) -> dict:
        """JSON description: size, geometry, sources and checksum."""
        return {"n_pairs": len(self), "n_angle": self.n_angle, "n_translation": self.n_translation,
                "angle_range_deg": [float(self.angles_deg.min()), float(self.angles_deg.max())],
                "sources": copy.deepcopy(self.sources), "sha256": self.checksum()}

    def subset(self, idx) -> "Library":
        idx = np.asarray(idx)
        return Library(self.sinograms[idx], self.images[idx], self.angles_deg,
                       self.groups[idx], copy.deepcopy(self.sources))

    def extend(self, other: "Library") -> "Library":
        """A new library holding both sets of pairs (same geometry required)."""
        if other.sinograms.shape[1:] != self.sinograms.shape[1:] or not np.allclose(
                other.angles_deg, self.angles_deg):
            raise CnnError(f"library: cannot join pairs of shape {other.sinograms.shape[1:]} "
                           f"to a library of shape {self.sinograms.shape[1:]} (or other angles)")
        off = len(self.sources)
        return Library(np.concatenate([self.sinograms, other.sinograms]),
                       np.concatenate([self.images, other.images]), self.angles_deg,
                       np.concatenate([self.groups, other.groups + off]),
                       copy.deepcopy(self.sources) + copy.deepcopy(other.sources))


def _add_noise(sino: np.ndarray, noise: float, rng) -> np.ndarray:
    if noise <= 0:
        return sino
    # per pair: Gaussian noise of std = noise * the mean positive sinogram value
    scale = np.array([s[s > 0].mean() if np.any(s > 0) else 1.0 for s in sino], np.float32)
    return (sino + noise * scale[:, None, None] * rng.standard_normal(sino.shape)).astype(np.float32)


def build_library(n: int, size: int, n_angle: int, *, kind: str = "catalyst", seed: int = 0,
                  noise: float = 0.0, angles_deg=None, radius_frac: float = 0.9,
                  source: str = "auto") -> Library:
    """Simulated sinogram/image pairs.

    Parameters
    ----------
    n : int
        Number of pairs.
    size : int
        Image side = number of translations (pixels).
    n_angle : int
        Number of projection angles; uniform over [0, 180) unless ``angles_deg`` is given.
    kind : {"catalyst", "shapes"}
        :func:`catalyst_phantom` (particles in a bed) or :func:`shapes_phantom`.
    seed : int
        Seed of the phantoms and the noise.
    noise : float
        Gaussian noise added to each sinogram, std = ``noise`` x its mean positive value
        (0 = noise free).
    angles_deg : array_like, shape (n_angle,), optional
    radius_frac : float
        Bed radius as a fraction of ``size / 2``.
    source : {"auto", "image", "procedural"}
        For ``kind="catalyst"``, see :func:`catalyst_phantom`.

    Returns
    -------
    Library
        Sinograms made by :func:`tasks.reconstruct.radon` (strip integrals of one
        translation step, all phantoms in one batched call).

    Raises
    ------
    CnnError
        Unknown kind, non-positive sizes, negative noise.
    """
    from tasks.reconstruct import radon

    if kind not in KINDS:
        raise CnnError(f"kind: expected one of {KINDS}, got {kind!r}")
    if int(n) < 1 or int(size) < 8:
        raise CnnError(f"n, size: expected n >= 1 pairs and size >= 8 pixels, got {n!r}, {size!r}")
    if not noise >= 0:
        raise CnnError(f"noise: expected >= 0 (relative std), got {noise!r}")
    ang = default_angles(n_angle) if angles_deg is None else angles_array(
        angles_deg, int(n_angle), CnnError)
    rng = np.random.default_rng(seed)
    if kind == "catalyst":
        imgs = np.stack([catalyst_phantom(size, rng, radius_frac=radius_frac, source=source)
                         for _ in range(int(n))])
        src = "image" if (source != "procedural" and _catalyst_source() is not None) else "procedural"
    else:
        imgs = np.stack([shapes_phantom(size, rng, radius_frac=radius_frac) for _ in range(int(n))])
        src = "random shapes"
    sino = np.moveaxis(radon(np.moveaxis(imgs, 0, -1), ang), -1, 0)
    sino = _add_noise(np.ascontiguousarray(sino), float(noise), rng)
    desc = {"kind": kind, "phantoms": src, "n": int(n), "size": int(size), "n_angle": int(n_angle),
            "seed": int(seed), "noise": float(noise), "radius_frac": float(radius_frac)}
    return Library(sino, imgs, ang, np.zeros(int(n), np.int64), [desc])


def _resample_pair(sino: np.ndarray, vol: np.ndarray, angles: np.ndarray, lib_angles: np.ndarray,
                   n: int):
    """Bring a product's (angle, translation, bin) sinogram and (y, x, bin) volume to the
    library's geometry: angles by linear interpolation on the 180-degree-periodic sinogram
    (p(theta + 180, t) = p(theta, -t)), translations and pixels by linear interpolation /
    area averaging, with sinogram values scaled by the pixel-size ratio (line integrals in
    units of the new step)."""
    from scipy import ndimage

    na, m, nb = sino.shape
    if m != n:
        z = n / m
        sino = ndimage.zoom(sino, (1, z, 1), order=1, grid_mode=True, mode="nearest") * (n / m)
        vol = np.stack([_area_resample(vol[:, :, b], n) for b in range(nb)], axis=-1)
    a = np.mod(angles, 360.0)
    if not (len(a) == len(lib_angles) and np.allclose(a, lib_angles, atol=1e-6)):
        # extend to a full period, then interpolate each library angle
        full_a = np.concatenate([a % 180.0, (a % 180.0) + 180.0])
        flip = a >= 180.0
        base = np.where(flip[:, None, None], sino[:, ::-1, :], sino)
        full_s = np.concatenate([base, base[:, ::-1, :]])
        order = np.argsort(full_a)
        full_a, full_s = full_a[order], full_s[order]
        full_a = np.concatenate([full_a, full_a[:1] + 360.0])
        full_s = np.concatenate([full_s, full_s[:1]])
        idx = np.searchsorted(full_a, lib_angles % 360.0, side="right") - 1
        idx = np.clip(idx, 0, len(full_a) - 2)
        w = ((lib_angles % 360.0) - full_a[idx]) / np.maximum(full_a[idx + 1] - full_a[idx], 1e-12)
        sino = (1 - w)[:, None, None] * full_s[idx] + w[:, None, None] * full_s[idx + 1]
    return sino.astype(np.float32), vol.astype(np.float32)


def add_pairs_from_product(library: Library, product_store, *, n_bins: int = 8,
                           z: int | list[int] | None = None, min_fraction: float = 0.05,
                           include_total: bool = True, product_id: str | None = None) -> Library:
    """Add sinogram/image pairs of a conventionally processed scan to a library.

    The pairs are (corrected sinogram, reconstructed volume) of the product's strongest
    radial bins: the ``n_bins`` bins of largest total sinogram intensity among those of at
    least ``min_fraction`` of the strongest, plus (``include_total``) the bin-summed
    sinogram and volume. The volume is the product's reconstruction (FBP for a
    conventionally processed scan), so the network learns to reproduce it on real data
    (the continual-learning scheme of PtychoNN, Babu et al., Nat. Commun. 14, 7059 (2023)).

    Parameters
    ----------
    library : Library
        Its geometry (angles, size) is kept: a product of another size or angle set is
        resampled (:func:`_resample_pair`).
    product_store : str or Path
        A product (Zarr store) with ``sinogram`` (z, angle, translation_c, radial),
        ``volume`` (z, y, x, radial) and the ``angle`` coordinate (deg).
    n_bins : int
        Bins per slice.
    z : int or list of int, optional
        Slices to use (default all).
    min_fraction : float
        Skip bins whose total intensity is below this fraction of the strongest bin's.
    include_total : bool
        Also add the bin-summed pair.
    product_id : str, optional
        Recorded in the library's sources (default: the store's file name).

    Returns
    -------
    Library
        A new library: ``library`` plus the product's pairs (one new source group).

    Raises
    ------
    CnnError
        Store without the ``sinogram``/``volume`` variables, or shapes that do not match.
    """
    from tasks import store

    path = Path(product_store)
    try:
        ds = store.open_product(path)
    except Exception as err:  # noqa: BLE001 - any unreadable store
        raise CnnError(f"product_store: cannot open {path} as a product: {err}") from err
    for v in ("sinogram", "volume"):
        if v not in ds:
            raise CnnError(f"product_store: {path} has no {v!r} variable (a processed product "
                           "with a reconstruction is expected)")
    angles = np.asarray(ds["angle"].values, np.float64)
    zs = range(ds.sizes["z"]) if z is None else ([z] if isinstance(z, int) else list(z))
    sinos, imgs, used = [], [], []
    for iz in zs:
        s = np.asarray(ds["sinogram"].isel(z=iz).values, np.float32)     # (a, t, b)
        v = np.asarray(ds["volume"].isel(z=iz).values, np.float32)       # (y, x, b)
        if s.shape[1] != v.shape[0] or v.shape[0] != v.shape[1] or s.shape[2] != v.shape[2]:
            raise CnnError(f"product_store: slice {iz}: sinogram {s.shape} and volume {v.shape} "
                           "do not match")
        tot = s.sum(axis=(0, 1))
        if not np.any(tot > 0):
            continue
        order = np.argsort(tot)[::-1]
        keep = [int(b) for b in order[:int(n_bins)] if tot[b] >= min_fraction * tot[order[0]]]
        cols_s = [s[:, :, keep]]
        cols_v = [v[:, :, keep]]
        if include_total:
            cols_s.append(s.sum(axis=2, keepdims=True))
            cols_v.append(v.sum(axis=2, keepdims=True))
        ss, vv = _resample_pair(np.concatenate(cols_s, axis=2), np.concatenate(cols_v, axis=2),
                                angles, library.angles_deg, library.n_translation)
        sinos.append(np.moveaxis(ss, -1, 0))
        imgs.append(np.moveaxis(vv, -1, 0))
        used.append({"z": int(iz), "bins": keep, "total": bool(include_total)})
    if not sinos:
        raise CnnError(f"product_store: {path} has no slice with a positive sinogram")
    new = Library(np.concatenate(sinos), np.concatenate(imgs), library.angles_deg,
                  np.zeros(sum(len(s) for s in sinos), np.int64),
                  [{"kind": "product", "product_id": product_id or path.stem, "path": str(path),
                    "slices": used}])
    return library.extend(new)


# --------------------------------------------------------------------------------------
# network
# --------------------------------------------------------------------------------------

def _conv_out(k: int, times: int = 4) -> int:
    for _ in range(times):
        k = (k - 1) // 2 + 1          # 3x3, stride 2, padding 1
    return k


def build_network(n_angle: int, n_translation: int, *, width: int = 32, dense: int = 512,
                  n_dense: int = 2, refine: int = 16, dropout: float = 0.1):
    """The ``cnn_reconstruct`` network (AI3SD report / nDTomo), sized by the geometry.

    Parameters
    ----------
    n_angle, n_translation : int
        Input sinogram shape; the output image is ``n_translation x n_translation``.
    width : int
        Filters of the four stride-2 convolutions (published: 64).
    dense : int
        Units of each hidden fully connected layer (published: 1000).
    n_dense : int
        Hidden fully connected layers, each ReLU + dropout (published: 4).
    refine : int
        Filters of the three refining convolutions (published: 128).
    dropout : float
        Dropout rate after each hidden dense layer (published: 0.1).

    Returns
    -------
    torch.nn.Module
        ``forward(x)``: ``(B, 1, n_angle, n_translation)`` -> ``(B, n, n)``;
        ``encode(x)``: ``(B, width * h * w)`` bottleneck features.
    """
    torch = _torch()
    nn = torch.nn

    class CnnReconstruct(nn.Module):
        def __init__(self):
            super().__init__()
            self.n = int(n_translation)
            convs = []
            cin = 1
            for _ in range(4):
                convs += [nn.Conv2d(cin, width, 3, stride=2, padding=1), nn.ReLU()]
                cin = width
            self.encoder = nn.Sequential(*convs)
            feat = width * _conv_out(int(n_angle)) * _conv_out(int(n_translation))
            layers = []
            d_in = feat
            for _ in range(int(n_dense)):
                layers += [nn.Linear(d_in, dense), nn.ReLU(), nn.Dropout(dropout)]
                d_in = dense
            layers.append(nn.Linear(d_in, self.n * self.n))
            self.dense = nn.Sequential(*layers)
            self.refine = nn.Sequential(
                nn.Conv2d(1, refine, 3, padding=1), nn.ReLU(),
                nn.Conv2d(refine, refine, 3, padding=1), nn.ReLU(),
                nn.Conv2d(refine, refine, 3, padding=1), nn.ReLU(),
                nn.Conv2d(refine, 1, 3, padding=1))
            for mod in self.modules():   # he_normal, as the published Keras model
                if isinstance(mod, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
                    nn.init.zeros_(mod.bias)
            c = (self.n - 1) / 2.0
            yy, xx = np.mgrid[:self.n, :self.n] - c
            mask = (np.hypot(yy, xx) <= c + 1e-9).astype(np.float32)
            self.register_buffer("mask", torch.from_numpy(mask), persistent=False)

        def encode(self, x):
            return self.encoder(x).flatten(1)

        def forward(self, x):
            h = self.dense(self.encode(x)).view(-1, 1, self.n, self.n)
            return self.refine(h)[:, 0] * self.mask

    return CnnReconstruct()


@dataclass
class CnnModel:
    """A trained network with what is needed to use and trust it.

    Attributes
    ----------
    net : torch.nn.Module
        From :func:`build_network`.
    angles_deg : numpy.ndarray, shape (n_angle,)
        The angles the network was trained for.
    arch : dict
        ``n_angle``, ``n_translation`` and the :func:`build_network` keywords.
    ood : dict
        ``k``, ``quantile``, ``threshold`` and the tensors ``bank`` (N, D) (standardised
        training embeddings), ``mean`` and ``std`` (D,).
    metrics : dict
        Training/validation RMSE and any evaluation recorded with the model.
    provenance : dict
        Library description and checksum, code version, seed, training settings.
    """

    net: object
    angles_deg: np.ndarray
    arch: dict
    ood: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    @property
    def n_angle(self) -> int:
        return int(self.arch["n_angle"])

    @property
    def n_translation(self) -> int:
        return int(self.arch["n_translation"])

    @property
    def device(self):
        return next(self.net.parameters()).device

    def copy(self) -> "CnnModel":
        return copy.deepcopy(self)


def _new_model(n_angle, n_translation, angles_deg, arch=None) -> CnnModel:
    a = dict(DEFAULT_ARCH)
    a.update(arch or {})
    a = {k: a[k] for k in DEFAULT_ARCH}
    net = build_network(n_angle, n_translation, **a)
    return CnnModel(net, np.asarray(angles_deg, np.float64),
                    {"n_angle": int(n_angle), "n_translation": int(n_translation), **a})


def _normalise(sino: np.ndarray):
    """(B, na, n) sinograms -> network input and the per-sinogram mass ``M`` (B,)."""
    n = sino.shape[-1]
    mass = sino.sum(axis=-1).mean(axis=-1)
    ok = mass > 0
    safe = np.where(ok, mass, 1.0).astype(np.float32)
    return (sino * (n / safe)[:, None, None]).astype(np.float32), safe, ok


def _targets(img: np.ndarray, mass: np.ndarray) -> np.ndarray:
    n = img.shape[-1]
    return (img * (n * n / mass)[:, None, None]).astype(np.float32)


def _check_geometry(model: CnnModel, s: np.ndarray, name="sino"):
    if s.shape[0] != model.n_angle or s.shape[1] != model.n_translation:
        raise CnnError(f"{name}: the model was trained for (n_angle, n_translation) = "
                       f"({model.n_angle}, {model.n_translation}); got {tuple(s.shape[:2])}")


def _batches(n, bs):
    for i in range(0, n, bs):
        yield slice(i, min(n, i + bs))


def _forward_numpy(model: CnnModel, x: np.ndarray, batch: int = 256, encode: bool = False):
    torch = _torch()
    net = model.net
    was = net.training
    net.eval()
    out = []
    with torch.no_grad():
        for sl in _batches(x.shape[0], batch):
            t = torch.from_numpy(np.ascontiguousarray(x[sl][:, None])).to(model.device)
            out.append((net.encode(t) if encode else net(t)).cpu().numpy())
    net.train(was)
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def _rmse(pred, target) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - target) ** 2)))


def _split(library: Library, val_fraction: float, rng) -> tuple[np.ndarray, np.ndarray]:
    N = len(library)
    idx = rng.permutation(N)
    nv = int(round(val_fraction * N))
    if val_fraction > 0 and N >= 2:
        nv = min(max(nv, 1), N - 1)
    return np.sort(idx[nv:]), np.sort(idx[:nv])


def train(library: Library, *, epochs: int = 30, lr: float = LEARNING_RATE, seed: int = 0,
          init: CnnModel | None = None, val_fraction: float = 0.1, batch_size: int = 32,
          arch: dict | None = None, device: str | None = None, ood_k: int = 5,
          ood_quantile: float = 0.99, augment: bool = True, log=None) -> CnnModel:
    """Train (or continue training) the CNN on a library.

    Parameters
    ----------
    library : Library
    epochs : int
        Passes over the training pairs (0: no training, only the OOD reference is built).
    lr : float
        Adam learning rate (the AI3SD report's 2.5e-4).
    seed : int
        Seeds the split, the initial weights, the batches and dropout.
    init : CnnModel, optional
        Warm start from this model's weights (its geometry must match the library's);
        ``None`` starts from random weights.
    val_fraction : float
        Fraction of pairs held out to pick the epoch whose weights are kept (lowest
        validation RMSE) and reported; 0 keeps the last epoch.
    batch_size : int
    arch : dict, optional
        :func:`build_network` keywords (default :data:`DEFAULT_ARCH`; ignored with ``init``).
    device : str, optional
        torch device ("cpu", "cuda"); default: cuda when available.
    ood_k, ood_quantile : int, float
        k nearest neighbours and the quantile of leave-one-out distances that sets the
        out-of-distribution threshold.
    augment : bool
        Also train on each pair rotated by 180 degrees (exact, see Notes), which doubles
        the training pairs at no simulation cost.
    log : callable, optional
        ``log(str)`` once per epoch.

    Returns
    -------
    CnnModel
        Loss: RMSE on normalised images. ``metrics``: ``train_rmse``, ``val_rmse``
        (normalised units), ``best_epoch``, ``history``; ``provenance``: library
        description, training settings, seed, code version, wall time.

    Raises
    ------
    CnnError
        Empty library, bad fractions, an ``init`` model of another geometry.

    Notes
    -----
    Augmentation: a pair (p, f) gives the exact pair (p', f') with f' = f rotated by 180
    degrees and p'(theta, t) = p(theta, -t) (the translation axis reversed), since a
    point (x, y) -> (-x, -y) projects to -t at every angle.
    """
    torch = _torch()
    if len(library) < 2:
        raise CnnError(f"library: at least 2 pairs needed, got {len(library)}")
    if not 0 <= val_fraction < 1:
        raise CnnError(f"val_fraction: expected 0 <= val_fraction < 1, got {val_fraction!r}")
    if int(epochs) < 0 or not lr > 0 or int(batch_size) < 1:
        raise CnnError(f"epochs >= 0, lr > 0, batch_size >= 1 expected, got {epochs!r}, {lr!r}, "
                       f"{batch_size!r}")
    t_start = time.perf_counter()
    rng = np.random.default_rng(seed)
    torch.manual_seed(int(seed))
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if init is not None:
        if (init.n_angle, init.n_translation) != (library.n_angle, library.n_translation):
            raise CnnError(f"init: model geometry {(init.n_angle, init.n_translation)} differs from "
                           f"the library's {(library.n_angle, library.n_translation)}")
        model = init.copy()
        model.ood = {}
        model.metrics = {}
        model.provenance = {}
    else:
        model = _new_model(library.n_angle, library.n_translation, library.angles_deg, arch)
    model.net.to(dev)
    x_all, mass, ok = _normalise(library.sinograms)
    if not np.all(ok):
        keep = np.flatnonzero(ok)
        x_all, mass = x_all[keep], mass[keep]
        y_all = _targets(library.images[keep], mass)
    else:
        y_all = _targets(library.images, mass)
    tr, va = _split(Library(x_all, y_all, library.angles_deg), val_fraction, rng)
    xt, yt = x_all[tr], y_all[tr]
    if augment:
        xt = np.concatenate([xt, xt[:, :, ::-1]])
        yt = np.concatenate([yt, yt[:, ::-1, ::-1]])
    xt_t = torch.from_numpy(np.ascontiguousarray(xt[:, None])).to(dev)
    yt_t = torch.from_numpy(np.ascontiguousarray(yt)).to(dev)
    opt = torch.optim.Adam(model.net.parameters(), lr=float(lr))
    gen = torch.Generator().manual_seed(int(seed))
    history = []
    best = (math.inf, -1, None)

    def val_rmse():
        if len(va) == 0:
            return math.nan
        return _rmse(_forward_numpy(model, x_all[va]), y_all[va])

    for ep in range(int(epochs)):
        model.net.train()
        perm = torch.randperm(xt_t.shape[0], generator=gen).to(dev)
        tot, cnt = 0.0, 0
        for sl in _batches(len(perm), int(batch_size)):
            b = perm[sl]
            pred = model.net(xt_t[b])
            loss = torch.sqrt(torch.mean((pred - yt_t[b]) ** 2) + 1e-12)   # RMSE
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) ** 2 * len(b)
            cnt += len(b)
        v = val_rmse()
        history.append({"epoch": ep + 1, "train_rmse": math.sqrt(tot / max(cnt, 1)), "val_rmse": v})
        if log is not None:
            log(f"epoch {ep + 1}/{epochs}: train RMSE {history[-1]['train_rmse']:.4f}, val RMSE {v:.4f}")
        if len(va) and v < best[0]:
            best = (v, ep + 1, copy.deepcopy(model.net.state_dict()))
    if best[2] is not None:
        model.net.load_state_dict(best[2])
    model.net.eval()
    _build_ood(model, x_all[tr], k=ood_k, quantile=ood_quantile)
    train_rmse = _rmse(_forward_numpy(model, x_all[tr]), y_all[tr])
    model.metrics = {"train_rmse": train_rmse, "val_rmse": val_rmse(),
                     "best_epoch": int(best[1]) if best[2] is not None else int(epochs),
                     "history": history, "units": "RMSE of images normalised by n^2 / mass"}
    from tasks.store import code_version

    model.provenance = {
        "library": library.description(), "seed": int(seed), "epochs": int(epochs),
        "lr": float(lr), "batch_size": int(batch_size), "val_fraction": float(val_fraction),
        "augment": bool(augment), "loss": "RMSE", "optimizer": "Adam",
        "warm_start": None if init is None else init.provenance.get("weights_sha256", "in-memory model"),
        "code_version": code_version(), "torch": torch.__version__,
        "train_seconds": time.perf_counter() - t_start, "device": str(dev),
        "created": dt.datetime.now(dt.timezone.utc).isoformat()}
    return model


# --------------------------------------------------------------------------------------
# out of distribution
# --------------------------------------------------------------------------------------

def _knn_mean(q, bank, k, exclude_self=False):
    """Mean Euclidean distance of each row of ``q`` (Q, D) to its ``k`` nearest rows of
    ``bank`` (N, D); with ``exclude_self`` the rows of q are the bank and the zero
    self-distance is left out."""
    out = np.empty(q.shape[0])
    b2 = (bank ** 2).sum(1)
    for sl in _batches(q.shape[0], 512):
        qq = q[sl]
        d2 = (qq ** 2).sum(1)[:, None] + b2[None, :] - 2 * qq @ bank.T
        d2 = np.maximum(d2, 0)
        if exclude_self:
            rows = np.arange(sl.start, sl.stop)
            d2[np.arange(len(rows)), rows] = np.inf
        kk = min(k, d2.shape[1] - (1 if exclude_self else 0))
        part = np.partition(d2, kk - 1, axis=1)[:, :kk]
        out[sl] = np.sqrt(part).mean(1)
    return out


def _spectrum(x_norm: np.ndarray) -> np.ndarray:
    """Texture descriptor of normalised sinograms (B, na, n): log10 of the power spectrum
    along translation, averaged over angles, without the DC term (B, n // 2)."""
    p = np.abs(np.fft.rfft(x_norm.astype(np.float64), axis=-1)[:, :, 1:]) ** 2
    return np.log10(p.mean(axis=1) + 1e-8)


def _features(model: CnnModel, x_norm: np.ndarray) -> np.ndarray:
    """Raw embedding: encoder bottleneck features and the sinogram spectrum, (B, D)."""
    enc = _forward_numpy(model, x_norm, encode=True).astype(np.float64)
    return np.concatenate([enc, _spectrum(x_norm)], axis=1)


def _standardise(model: CnnModel, feats: np.ndarray) -> np.ndarray:
    return (feats - np.asarray(model.ood["mean"], np.float64)) / np.asarray(model.ood["std"], np.float64)


def _build_ood(model: CnnModel, x_norm: np.ndarray, *, k: int, quantile: float) -> None:
    if not 0 < quantile <= 1 or int(k) < 1:
        raise CnnError(f"ood_k >= 1 and 0 < ood_quantile <= 1 expected, got {k!r}, {quantile!r}")
    feats = _features(model, x_norm)
    mean = feats.mean(0)
    sd = feats.std(0)
    # features constant over the training set (dead ReLUs) get the typical spread, so a
    # tiny variance cannot blow a distance up
    std = np.maximum(sd, np.median(sd[sd > 0]) if np.any(sd > 0) else 1.0)
    model.ood = {"k": int(k), "quantile": float(quantile), "mean": mean.astype(np.float32),
                 "std": std.astype(np.float32),
                 "embedding": "encoder features (4 strided convolutions) + log power spectrum "
                              "along translation, standardised"}
    bank = _standardise(model, feats)
    loo = _knn_mean(bank, bank, int(k), exclude_self=True)
    model.ood.update(threshold=float(np.quantile(loo, quantile)), loo_median=float(np.median(loo)),
                     bank=bank.astype(np.float32))


def _as_batch(model: CnnModel, sino, name="sino"):
    s = np.asarray(to_numpy(sinogram_array(sino, CnnError, name=name)), np.float32)
    _check_geometry(model, s, name)
    if not np.all(np.isfinite(s)):
        raise CnnError(f"{name}: contains NaN or infinite values")
    two_d = s.ndim == 2
    b = s[None] if two_d else np.moveaxis(s, -1, 0)
    return np.ascontiguousarray(b), two_d


def embed(model: CnnModel, sino) -> np.ndarray:
    """Standardised embeddings (encoder features + spectrum), ``(D,)`` or ``(n_bin, D)``."""
    if not model.ood:
        raise CnnError("model: has no out-of-distribution reference (train it with train())")
    b, two_d = _as_batch(model, sino)
    x, _, _ = _normalise(b)
    f = _standardise(model, _features(model, x))
    return f[0] if two_d else f


def ood_score(model: CnnModel, sino):
    """Out-of-distribution score: mean distance to the ``k`` nearest training embeddings.

    Parameters
    ----------
    model : CnnModel
        Trained (``model.ood`` built by :func:`train`).
    sino : array, shape (n_angle, n_translation) or (n_angle, n_translation, n_bin)

    Returns
    -------
    float or numpy.ndarray of shape (n_bin,)
        Scores in the units of ``model.ood["threshold"]`` (standardised feature space).
        An all-zero (or negative-mass) sinogram scores ``inf``.
    """
    if not model.ood:
        raise CnnError("model: has no out-of-distribution reference (train it with train())")
    b, two_d = _as_batch(model, sino)
    x, _, ok = _normalise(b)
    f = _standardise(model, _features(model, x))
    s = _knn_mean(f, np.asarray(model.ood["bank"], np.float64), model.ood["k"])
    s = np.where(ok, s, np.inf)
    return float(s[0]) if two_d else s


def is_out_of_distribution(model: CnnModel, sino, *, threshold: float | None = None,
                           min_fraction: float = 0.05):
    """Whether a sinogram lies outside the training distribution of ``model``.

    Parameters
    ----------
    model : CnnModel
    sino : array, shape (n_angle, n) or (n_angle, n, n_bin)
    threshold : float, optional
        Override of ``model.ood["threshold"]``.
    min_fraction : float
        For a 3D sinogram: bins whose total intensity is below this fraction of the
        strongest bin's are not judged (background bins); the slice is out of distribution
        when any judged bin is.

    Returns
    -------
    (bool, score, threshold)
        ``score`` is the largest judged score (3D) or the score (2D).
    """
    thr = float(model.ood["threshold"] if threshold is None else threshold)
    sc = ood_score(model, sino)
    if np.ndim(sc) == 0:
        return bool(sc > thr), float(sc), thr
    s = np.asarray(to_numpy(sino), np.float32)
    tot = s.sum(axis=(0, 1))
    judged = tot >= min_fraction * max(float(tot.max()), 0.0)
    if not np.any(judged) or tot.max() <= 0:
        return True, math.inf, thr
    worst = float(np.max(sc[judged]))
    return bool(worst > thr), worst, thr


# --------------------------------------------------------------------------------------
# inference
# --------------------------------------------------------------------------------------

def predict(model: CnnModel, sino, *, batch: int = 256) -> np.ndarray:
    """CNN reconstruction of a sinogram (every radial bin as a batch).

    Parameters
    ----------
    model : CnnModel
    sino : array_like, shape (n_angle, n_translation) or (n_angle, n_translation, n_bin)
        float; numpy or cupy (copied to the model's device).

    Returns
    -------
    numpy.ndarray, shape (n, n) or (n, n, n_bin), float32
        Same orientation and scale as :func:`tasks.reconstruct.fbp` (``n = n_translation``);
        zero outside the reconstruction circle and for bins of zero mass.

    Raises
    ------
    CnnError
        Shape other than the model's geometry, non-finite values.
    """
    b, two_d = _as_batch(model, sino)
    x, mass, ok = _normalise(b)
    y = _forward_numpy(model, x, batch=batch)
    n = b.shape[-1]
    y = y * (mass / (n * n))[:, None, None] * ok[:, None, None]
    y = y.astype(np.float32)
    return y[0] if two_d else np.ascontiguousarray(np.moveaxis(y, 0, -1))


def evaluate(model: CnnModel, library: Library) -> dict:
    """RMSE, PSNR and SSIM (skimage.metrics) of the CNN on a library's pairs.

    Returns
    -------
    dict
        ``rmse`` (normalised units, as the training loss), ``rel_error`` (mean of
        ``||pred - truth|| / ||truth||``), ``psnr_db`` and ``ssim`` (means over pairs,
        data range = each ground truth's max - min), ``n``.
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    pred = predict(model, np.moveaxis(library.sinograms, 0, -1))
    pred = np.moveaxis(pred, -1, 0)
    _, mass, _ = _normalise(library.sinograms)
    rmse = _rmse(_targets(pred, mass), _targets(library.images, mass))
    ps, ss, rel = [], [], []
    for p, g in zip(pred, library.images):
        rng = float(g.max() - g.min()) or 1.0
        ps.append(peak_signal_noise_ratio(g, p, data_range=rng))
        ss.append(structural_similarity(g, p, data_range=rng))
        rel.append(float(np.linalg.norm(p - g) / max(np.linalg.norm(g), 1e-30)))
    return {"rmse": rmse, "rel_error": float(np.mean(rel)), "psnr_db": float(np.mean(ps)),
            "ssim": float(np.mean(ss)), "n": len(library)}


def reconstruct(sino, angles_deg, model: CnnModel, *, fallback: str = "fbp",
                threshold: float | None = None, **fbp_kwargs):
    """CNN reconstruction guarded by the out-of-distribution check.

    Parameters
    ----------
    sino : array, shape (n_angle, n_translation[, n_bin])
    angles_deg : array_like, shape (n_angle,)
        Must equal the model's training angles (else the CNN is not applicable).
    model : CnnModel
    fallback : {"fbp", "error", "none"}
        What to do when the input is out of distribution or of another geometry:
        ``fbp`` warns (:class:`OutOfDistributionWarning`, with the score and threshold)
        and returns :func:`tasks.reconstruct.fbp`; ``error`` raises :class:`CnnError`;
        ``none`` warns and returns the CNN result anyway (geometry mismatches still fall
        back to FBP).
    threshold : float, optional
        Override of the model's OOD threshold.
    **fbp_kwargs
        Passed to :func:`tasks.reconstruct.fbp` on fallback.

    Returns
    -------
    (numpy.ndarray, dict)
        The image(s), shape as :func:`predict`, and ``{"method": "cnn"|"fbp", "score",
        "threshold", "reason"}``.
    """
    from tasks.reconstruct import fbp

    if fallback not in FALLBACKS:
        raise CnnError(f"fallback: expected one of {FALLBACKS}, got {fallback!r}")
    s = sinogram_array(sino, CnnError)
    ang = angles_array(angles_deg, s.shape[0], CnnError)
    info = {"method": "cnn", "score": None, "threshold": None, "reason": ""}
    reason = ""
    if s.shape[0] != model.n_angle or s.shape[1] != model.n_translation:
        reason = (f"geometry {tuple(s.shape[:2])} differs from the model's "
                  f"({model.n_angle}, {model.n_translation})")
    elif not np.allclose(np.sort(np.mod(ang, 360)), np.sort(np.mod(model.angles_deg, 360)), atol=1e-3):
        reason = "angles differ from the model's training angles"
    if not reason:
        ood, score, thr = is_out_of_distribution(model, s, threshold=threshold)
        info.update(score=score, threshold=thr)
        if ood:
            reason = f"out of distribution: score {score:.3g} > threshold {thr:.3g}"
            if fallback == "none":
                warnings.warn(f"CNN reconstruction: input {reason}; CNN result returned anyway",
                              OutOfDistributionWarning, stacklevel=2)
                info["reason"] = reason
                return predict(model, s), info
    if reason:
        if fallback == "error":
            raise CnnError(f"sino: {reason}")
        warnings.warn(f"CNN reconstruction: input {reason}; falling back to FBP",
                      OutOfDistributionWarning, stacklevel=2)
        info.update(method="fbp", reason=reason)
        return np.asarray(to_numpy(fbp(s, ang, **fbp_kwargs)), np.float32), info
    return predict(model, s), info


# --------------------------------------------------------------------------------------
# artefacts
# --------------------------------------------------------------------------------------

def file_sha256(path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def save_model(model: CnnModel, path, *, name: str | None = None, extra: dict | None = None) -> dict:
    """Write the weights (``torch.save`` of a state dict) and a JSON sidecar.

    The state dict holds the network's parameters and the OOD reference tensors
    (``ood.bank``, ``ood.mean``, ``ood.std``). The sidecar ``<path>.json`` holds the format,
    architecture, angles, OOD settings, metrics, provenance (library description and
    checksum, code version, seed, training settings) and the SHA-256 of the weights file.
    Both are written to temporary names and renamed.

    Parameters
    ----------
    model : CnnModel
    path : str or Path
        Weights file (``.pt``).
    name : str, optional
        Model name recorded in the sidecar.
    extra : dict, optional
        More JSON to record under ``extra``.

    Returns
    -------
    dict
        The sidecar's content (``weights_sha256`` included).
    """
    torch = _torch()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.net.state_dict().items()}
    if model.ood:
        for key in ("bank", "mean", "std"):
            state[f"ood.{key}"] = torch.from_numpy(np.asarray(model.ood[key], np.float32))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    sha = file_sha256(tmp)
    os.replace(tmp, path)
    side = {"format": FORMAT, "name": name, "architecture": model.arch,
            "angles_deg": model.angles_deg,
            "ood": {k: v for k, v in model.ood.items() if k not in ("bank", "mean", "std")},
            "metrics": model.metrics, "provenance": model.provenance,
            "weights_sha256": sha, "extra": extra or {}}
    side = _jsonable(side)
    tmp = _sidecar(path).with_name(f".{_sidecar(path).name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(side, indent=1, sort_keys=True))
    os.replace(tmp, _sidecar(path))
    model.provenance["weights_sha256"] = sha
    return side


def load_model(path, *, device: str = "cpu", verify: bool = True) -> CnnModel:
    """Load a model written by :func:`save_model` (``torch.load(..., weights_only=True)``).

    Parameters
    ----------
    path : str or Path
        The weights file; its sidecar ``<path>.json`` must sit beside it.
    device : str
    verify : bool
        Check the weights' SHA-256 against the sidecar.

    Raises
    ------
    CnnError
        Missing file or sidecar, unknown format, checksum mismatch.
    """
    torch = _torch()
    path = Path(path)
    side_p = _sidecar(path)
    if not path.is_file() or not side_p.is_file():
        raise CnnError(f"path: model weights {path} and sidecar {side_p} are both needed")
    side = json.loads(side_p.read_text())
    if side.get("format") != FORMAT:
        raise CnnError(f"path: {side_p} is not a {FORMAT} sidecar (format {side.get('format')!r})")
    if verify:
        sha = file_sha256(path)
        if sha != side.get("weights_sha256"):
            raise CnnError(f"path: {path} has SHA-256 {sha}, the sidecar records "
                           f"{side.get('weights_sha256')} (file changed or swapped)")
    arch = side["architecture"]
    model = _new_model(arch["n_angle"], arch["n_translation"], side["angles_deg"],
                       {k: arch[k] for k in DEFAULT_ARCH})
    # loaded on the host whatever the device: the guard's arrays are numpy, and the
    # network's weights are moved to the device once, with the network
    state = torch.load(path, map_location="cpu", weights_only=True)
    ood = dict(side.get("ood") or {})
    for key in ("bank", "mean", "std"):
        t = state.pop(f"ood.{key}", None)
        if t is not None:
            ood[key] = t.detach().cpu().numpy()
    model.net.load_state_dict(state)
    model.net.to(device).eval()
    model.ood = ood if "bank" in ood else {}
    model.metrics = side.get("metrics") or {}
    model.provenance = dict(side.get("provenance") or {})
    model.provenance["weights_sha256"] = side["weights_sha256"]
    return model
