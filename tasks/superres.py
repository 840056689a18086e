"""Super-resolution of chemical images, guided by a high-resolution absorption image.

A pencil-beam XRD-CT chemical image (a phase's map) is measured on the grid of the beam's
translation step; an absorption-contrast micro-CT image of the same slice is often
available at a finer pixel. This module upsamples chemical images by an integer factor
(2 or 4) with

* ``bilinear`` / ``bicubic`` interpolation (``torch.nn.functional.interpolate``,
  ``align_corners=False``; bicubic is the Keys cubic-convolution kernel with a = -0.75,
  as in PyTorch and OpenCV; borders replicate the edge pixel);
* ``single``: a small single-input residual network in the manner of SRResNet / EDSR
  (Ledig et al., CVPR 2017; Lim et al., CVPR Workshops 2017): convolutional body at the
  low resolution, residual blocks without batch normalisation, sub-pixel (pixel-shuffle)
  upsampling (Shi et al., CVPR 2016), global residual over the bicubic upsampled input
  (Kim et al., VDSR, CVPR 2016);
* ``dual``: the same network with a second input, the high-resolution absorption image
  (the *guide*), in the manner of dual-input guided super-resolution (guided depth-map
  super-resolution: Hui, Loy & Tang, MSG-Net, ECCV 2016; Li et al., deep joint image
  filtering, ECCV 2016). The guide enters three times: folded onto the low-resolution
  grid by pixel-unshuffle (so the body sees its sub-pixel structure at every
  low-resolution pixel); at the high resolution, as features in the reconstruction tail;
  and through a guided-filter upsampling (He, Sun & Tang, TPAMI 2013: the local linear
  model chemical = a * absorption + b fitted on the low-resolution grid and applied to
  the high-resolution guide), which the network blends with the bicubic image through a
  learned per-pixel gate (the linear model fails where a window holds more than two
  materials) and then corrects with a learned residual.

  The application (an XRD-CT phase map super-resolved with an absorption-contrast CT
  image of the same slice) is the one of ChemISR-Net (Vamvakeros, Jacques et al.); its
  bibliographic reference could not be confirmed from the sources available when this
  was written, so it is not cited, and this network is *not* a reproduction of it: it is
  a generic dual-input guided residual network, designed and tuned here.

Networks work on normalised images: the low-resolution chemical image is divided by its
99.9th percentile of ``|value|`` (zero stays zero: no phase), the guide is mapped to
[0, 1] by its 0.1 / 99.9 percentiles; the output is scaled back. Multi-channel images
``(ny, nx, C)`` (one channel per phase) are batched, all channels sharing one guide.

Training data (:func:`build_sr_library`) come from simulated phantoms: random shapes
(disks, ellipses, rotated rectangles, fragments, thin rings, pores; pure, mixed and graded
phase fractions), the fixed ``shapes`` phantom of :mod:`tasks.simulate`, and crops of the
catalyst-particle structure segmented from ``../shared/data/real/ndtomo_images`` when
present. For each phantom: chemical image = a phase's mass map, absorption image = the
phases weighted by random attenuation coefficients, Gaussian-blurred and noisy as a
micro-CT image is, low resolution = area-downsampled chemical image plus noise.

The guide from the XRD-CT data itself (:func:`absorption_from_xrdct`) is the
total-scattering image on the reconstruction grid: it is *not* of higher resolution than
the chemical maps, so a dual network guided by it can only denoise/sharpen what both
images already hold; real gains need a separate, finer absorption image.

Models are saved with ``torch.save`` of a dict of tensors and plain values and loaded
with ``torch.load(..., weights_only=True)`` (:func:`save_model`, :func:`load_model`).

Measured (``benchmarks/bench_superres.py``, default run: 32-channel / 4-block networks
trained 80 epochs on 32 random 128 px phantoms; PSNR in dB on sets never trained on)::

    set (HR px)           factor  bicubic  single  guided filter  dual   dual, guide from data
    shapes (256)             4     27.38   30.57      33.13       33.80        28.59
    catalyst phases (868)    4     34.06   38.02      39.56       40.69        35.89
    battery phases (1568)    4     24.09   25.42      28.14       28.93        24.78
    shapes (256)             2     32.50   36.52      35.17       36.71        33.97
    catalyst phases (870)    2     40.20   43.34      41.94       43.08        41.78
    battery phases (1568)    2     28.60   31.00      29.74       30.80        29.24

At 4x the guide is worth 2.7-3.5 dB over the single-input network; at 2x the two are
within 0.3 dB (the single network alone recovers most of what is lost). A guide on the
chemical image's own grid (``from data``) does not match the single-input network. On
the smooth greyscale catalyst image itself (no phases) the single network trained on
piecewise-constant phantoms loses to bicubic at 2x (41.2 vs 45.7 dB): train on images
like the ones to be super-resolved.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np

__all__ = [
    "SuperResolutionError", "SRPair", "SRNet", "METHODS",
    "area_downsample", "make_sr_pair", "random_phantom", "build_sr_library",
    "train_sr", "upscale", "save_model", "load_model", "absorption_from_xrdct", "load_guide",
]

METHODS = ("bilinear", "bicubic", "guided", "single", "dual")
_FORMAT = "xrdct-superres-1"
_IMAGES_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "ndtomo_images"


class SuperResolutionError(ValueError):
    """Bad input to a super-resolution function; the message names the argument."""


# ----------------------------------------------------------------------------- arrays
def _image(a, name: str, *, ndims=(2, 3)) -> np.ndarray:
    """``a`` as a finite float32 numpy array of ``ndims`` dims; else SuperResolutionError."""
    try:
        from tasks._xp import to_numpy

        arr = np.asarray(to_numpy(a))
    except Exception as err:  # noqa: BLE001
        raise SuperResolutionError(f"{name}: expected an array, got {type(a).__name__} ({err})") from None
    if arr.dtype.kind not in "biuf":
        raise SuperResolutionError(f"{name}: expected a real numeric array, got dtype {arr.dtype}")
    if arr.ndim not in ndims:
        want = " or ".join({2: "(ny, nx)", 3: "(ny, nx, C)"}[d] for d in ndims)
        raise SuperResolutionError(f"{name}: expected a {want} array, got shape {arr.shape}")
    if min(arr.shape[:2]) < 2:
        raise SuperResolutionError(f"{name}: image must be at least 2x2 pixels, got shape {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise SuperResolutionError(f"{name}: contains NaN or infinite values")
    return arr


def _factor(factor, name="factor") -> int:
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or int(factor) < 2 or int(factor) > 16:
        raise SuperResolutionError(f"{name}: expected an integer upsampling factor 2..16 (2 or 4 "
                                   f"for the networks), got {factor!r}")
    return int(factor)


def area_downsample(image, factor: int) -> np.ndarray:
    """Average ``factor x factor`` blocks (the pixel footprint of a coarser detector grid).

    Parameters
    ----------
    image : array (ny, nx) or (ny, nx, C)
        ``ny`` and ``nx`` divisible by ``factor``.
    factor : int

    Returns
    -------
    ndarray (ny // factor, nx // factor[, C]) float32

    Raises
    ------
    SuperResolutionError
        Shape not divisible by ``factor``, not 2-D/3-D, non-finite values.
    """
    f = _factor(factor)
    a = _image(image, "image")
    ny, nx = a.shape[:2]
    if ny % f or nx % f:
        raise SuperResolutionError(f"image: shape {a.shape[:2]} is not divisible by factor {f}; "
                                   "crop it first")
    out = a.reshape(ny // f, f, nx // f, f, *a.shape[2:]).mean(axis=(1, 3), dtype=np.float64)
    return out.astype(np.float32)


# ----------------------------------------------------------------------------- phantoms
def _ellipse(yy, xx, cy, cx, ay, ax, ang):
    c, s = math.cos(ang), math.sin(ang)
    y, x = yy - cy, xx - cx
    u = y * c + x * s
    v = -y * s + x * c
    return (u / ay) ** 2 + (v / ax) ** 2 <= 1


def _polygon(yy, xx, pts):
    """Inside test for a convex polygon given counter-clockwise (y, x) vertices."""
    inside = np.ones(yy.shape, bool)
    n = len(pts)
    for i in range(n):
        (y0, x0), (y1, x1) = pts[i], pts[(i + 1) % n]
        inside &= (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0) >= 0
    return inside


def random_phantom(size: int, n_phase: int = 3, *, seed=None, ss: int = 2) -> np.ndarray:
    """Random multi-phase phantom for training: per-phase mass maps with sharp edges.

    A circular support (sometimes partly filled by a mixed-phase matrix) holds 6-24 random
    objects: disks, ellipses, rotated rectangles, convex fragments (the look of crushed
    catalyst particles), thin rings and lines, and pores. Each object is a pure phase, a
    random (Dirichlet) mixture, or a linear gradient between two phases; densities are
    0.4-1.5. Anti-aliased by ``ss x ss`` supersampling.

    Parameters
    ----------
    size : int
        Image side in pixels (>= 8).
    n_phase : int
        Number of phases (>= 1).
    seed : int or numpy.random.Generator, optional
    ss : int
        Supersampling per axis.

    Returns
    -------
    ndarray (n_phase, size, size) float64, >= 0
    """
    if size < 8 or n_phase < 1:
        raise SuperResolutionError(f"size: expected >= 8 and n_phase >= 1, got {size}, {n_phase}")
    rng = np.random.default_rng(seed)
    P = n_phase
    n = size * ss
    g = (np.arange(n) + 0.5) / ss
    yy, xx = np.meshgrid(g, g, indexing="ij")
    c = size / 2
    r_sup = rng.uniform(0.80, 0.99) * size / 2
    support = np.hypot(yy - c, xx - c) <= r_sup
    dens = np.zeros((n, n))
    frac = np.zeros((P, n, n))

    def fractions(region):
        u = rng.random()
        if u < 0.55 or P == 1:
            v = np.zeros(P)
            v[rng.integers(P)] = 1.0
            frac[:, region] = v[:, None]
        elif u < 0.8:
            frac[:, region] = rng.dirichlet(np.ones(P))[:, None]
        else:  # linear gradient between two phases across the object
            a, b = rng.choice(P, 2, replace=False)
            ang = rng.uniform(0, np.pi)
            t = (yy[region] * math.sin(ang) + xx[region] * math.cos(ang))
            t = (t - t.min()) / max(np.ptp(t), 1e-9)
            lo, hi = sorted(rng.uniform(0, 1, 2))
            f = lo + (hi - lo) * t
            frac[:, region] = 0.0
            frac[a, region] = f
            frac[b, region] += 1 - f

    if rng.random() < 0.6:
        dens[support] = rng.uniform(0.3, 0.9)
        fractions(support)
    for _ in range(int(rng.integers(6, 25))):
        kind = rng.choice(["disk", "ellipse", "rect", "fragment", "fragment", "ring", "line"])
        cy, cx = rng.uniform(c - r_sup * 0.85, c + r_sup * 0.85, 2)
        big = rng.uniform(1.0, size / 7) if rng.random() < 0.7 else rng.uniform(0.7, 3.0)
        ang = rng.uniform(0, np.pi)
        if kind == "disk":
            reg = _ellipse(yy, xx, cy, cx, big, big, 0.0)
        elif kind == "ellipse":
            reg = _ellipse(yy, xx, cy, cx, big, big * rng.uniform(0.3, 0.9), ang)
        elif kind == "rect":
            h, w = big, big * rng.uniform(0.2, 1.0)
            u = (yy - cy) * math.cos(ang) + (xx - cx) * math.sin(ang)
            v = -(yy - cy) * math.sin(ang) + (xx - cx) * math.cos(ang)
            reg = (np.abs(u) <= h) & (np.abs(v) <= w)
        elif kind == "fragment":
            k = int(rng.integers(4, 8))
            th = np.sort(rng.uniform(0, 2 * np.pi, k))
            rad = big * rng.uniform(0.6, 1.3, k)
            pts = [(cy + r * math.sin(t), cx + r * math.cos(t)) for r, t in zip(rad, th)]
            reg = _polygon(yy, xx, pts)
        elif kind == "ring":
            r0 = rng.uniform(2, size / 4)
            w = rng.uniform(0.5, 2.0)
            d = np.hypot(yy - cy, xx - cx)
            reg = (d >= r0) & (d <= r0 + w)
        else:  # thin line
            w = rng.uniform(0.4, 1.5)
            L = rng.uniform(4, size / 3)
            u = (yy - cy) * math.cos(ang) + (xx - cx) * math.sin(ang)
            v = -(yy - cy) * math.sin(ang) + (xx - cx) * math.cos(ang)
            reg = (np.abs(u) <= w / 2) & (np.abs(v) <= L / 2)
        reg &= support
        if not reg.any():
            continue
        dens[reg] = rng.uniform(0.4, 1.5)
        fractions(reg)
    for _ in range(int(rng.integers(0, 4))):  # pores
        cy, cx = rng.uniform(c - r_sup * 0.7, c + r_sup * 0.7, 2)
        r = rng.uniform(0.8, size / 14)
        dens[_ellipse(yy, xx, cy, cx, r, r * rng.uniform(0.5, 1), rng.uniform(0, np.pi))] = 0.0
    m = dens[None] * frac
    return m.reshape(P, size, ss, size, ss).mean(axis=(2, 4))


def _catalyst_masses(path: Path, n_phase: int) -> np.ndarray:
    from tasks.simulate import _image_phantom

    return _image_phantom(path, n_phase)


def _crop_phantom(native: np.ndarray, size: int, rng) -> np.ndarray:
    """Random crop of a native-resolution phantom, area-resampled to ``size`` pixels at a
    random zoom, randomly flipped/rotated."""
    from tasks.simulate import _area_matrix

    N = native.shape[-1]
    side = int(min(N, round(size * rng.uniform(1.0, 3.0))))
    for _ in range(20):  # avoid empty crops
        y0, x0 = rng.integers(0, N - side + 1, 2)
        crop = native[:, y0:y0 + side, x0:x0 + side]
        if crop.sum() > 0.1 * side * side:
            break
    a = _area_matrix(side, size)
    out = np.einsum("ij,pjk,lk->pil", a, crop, a)
    out = np.rot90(out, int(rng.integers(4)), axes=(1, 2))
    if rng.random() < 0.5:
        out = out[:, :, ::-1]
    return np.ascontiguousarray(out)


@dataclass
class SRPair:
    """One training/evaluation example.

    Attributes
    ----------
    high : ndarray (f*ny, f*nx) float32
        Ground-truth high-resolution chemical image (a phase's mass map).
    low : ndarray (ny, nx) float32
        Area-downsampled ``high`` plus noise (the measured chemical image).
    guide : ndarray (f*ny, f*nx) float32
        High-resolution absorption image (attenuation-weighted phases, blurred, noisy).
    factor : int
    source : str
        Where the phantom came from (``random``, ``shapes``, ``catalyst``, a file name).
    phase : int
        Which phase ``high`` maps.
    """

    high: np.ndarray
    low: np.ndarray
    guide: np.ndarray
    factor: int
    source: str = ""
    phase: int = 0
    meta: dict = field(default_factory=dict)


def make_sr_pair(masses, phase: int, factor: int, *, seed=None, mu=None,
                 guide_blur_px: float | tuple[float, float] = (0.3, 1.0),
                 guide_noise: float | tuple[float, float] = (0.0, 0.02),
                 low_noise: float | tuple[float, float] = (0.0, 0.01),
                 source: str = "") -> SRPair:
    """Build one (low-res chemical, high-res absorption, high-res chemical) example.

    Parameters
    ----------
    masses : array (n_phase, N, N)
        Per-phase mass maps at the high resolution (``N`` divisible by ``factor``).
    phase : int
        Phase whose map is the chemical image.
    factor : int
    seed : int or Generator, optional
    mu : sequence of n_phase floats, optional
        Attenuation coefficient of each phase (default: random in [0.2, 1.5]).
    guide_blur_px, guide_noise, low_noise : float or (lo, hi)
        Gaussian blur sigma of the absorption image (high-res pixels), its noise standard
        deviation and that of the low-res chemical image as fractions of the image's
        maximum; a (lo, hi) pair draws uniformly.

    Returns
    -------
    SRPair
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    m = np.asarray(masses, dtype=np.float64)
    if m.ndim != 3:
        raise SuperResolutionError(f"masses: expected (n_phase, N, N), got shape {m.shape}")
    if not 0 <= phase < m.shape[0]:
        raise SuperResolutionError(f"phase: expected 0..{m.shape[0] - 1}, got {phase}")
    f = _factor(factor)

    def draw(v):
        return float(rng.uniform(*v)) if isinstance(v, (tuple, list)) else float(v)

    mu = rng.uniform(0.2, 1.5, m.shape[0]) if mu is None else np.asarray(mu, float)
    if mu.shape != (m.shape[0],):
        raise SuperResolutionError(f"mu: expected {m.shape[0]} attenuation coefficients, got {mu.shape}")
    high = m[phase]
    absorb = np.tensordot(mu, m, axes=1)
    sig = draw(guide_blur_px)
    if sig > 0:
        absorb = ndimage.gaussian_filter(absorb, sig, mode="nearest")
    absorb = absorb + rng.normal(0, draw(guide_noise) * max(absorb.max(), 1e-12), absorb.shape)
    low = area_downsample(high, f).astype(np.float64)
    low = low + rng.normal(0, draw(low_noise) * max(low.max(), 1e-12), low.shape)
    return SRPair(high=high.astype(np.float32), low=low.astype(np.float32),
                  guide=absorb.astype(np.float32), factor=f, source=source, phase=int(phase),
                  meta={"mu": mu.tolist(), "guide_blur_px": sig})


def build_sr_library(n: int = 48, *, size: int = 128, factor: int = 4, n_phase: int = 3,
                     kinds: Sequence[str] = ("random", "catalyst"), seed: int = 0,
                     images: Sequence[str | Path] | None = None, **pair_kw) -> list[SRPair]:
    """Training/evaluation examples from simulated phantoms.

    Parameters
    ----------
    n : int
        Number of pairs.
    size : int
        High-resolution side in pixels (divisible by ``factor``); low res is ``size // factor``.
    factor : int
    n_phase : int
    kinds : sequence of {"random", "shapes", "catalyst"}
        Phantom sources, used in turn: ``random`` (:func:`random_phantom`), ``shapes``
        (:func:`tasks.simulate.make_phantom` with the fixed ``shapes`` phantom, randomly
        rotated by multiples of 90 deg and flipped) and ``catalyst`` (random crops of the
        segmented particle images ``images``; default the ``catalyst_particles_*.tif`` of
        ``../shared/data/real/ndtomo_images``; silently dropped when none exists).
    seed : int
    images : sequence of paths, optional
        Greyscale images for ``catalyst`` (segmented by :func:`tasks.simulate.make_phantom`'s
        image segmentation).
    **pair_kw
        Passed to :func:`make_sr_pair` (``guide_blur_px``, ``guide_noise``, ``low_noise``).

    Returns
    -------
    list of SRPair
        Pairs whose chemical image is non-empty; phases cycle.

    Raises
    ------
    SuperResolutionError
        Unknown kind, ``size`` not divisible by ``factor``, no usable source.
    """
    f = _factor(factor)
    if size % f or size < 4 * f:
        raise SuperResolutionError(f"size: expected a multiple of factor {f} of at least {4 * f}, got {size}")
    kinds = list(kinds)
    bad = [k for k in kinds if k not in ("random", "shapes", "catalyst")]
    if bad:
        raise SuperResolutionError(f"kinds: unknown phantom kind(s) {bad}; expected random, shapes, catalyst")
    rng = np.random.default_rng(seed)
    natives = []
    if "catalyst" in kinds:
        paths = [Path(p) for p in images] if images is not None else sorted(
            _IMAGES_DIR.glob("catalyst_particles_*.tif")) if _IMAGES_DIR.is_dir() else []
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise SuperResolutionError(f"images: file(s) not found: {missing}")
        if paths:  # the largest holds the most detail
            paths = sorted(paths, key=lambda p: p.stat().st_size)[-1:]
            natives = [_catalyst_masses(p, n_phase) for p in paths]
        else:
            kinds.remove("catalyst")
    if not kinds:
        raise SuperResolutionError("kinds: no usable phantom source (catalyst images absent)")
    shapes = None
    out: list[SRPair] = []
    i = 0
    while len(out) < n:
        kind = kinds[i % len(kinds)]
        i += 1
        if kind == "random":
            m = random_phantom(size, n_phase, seed=rng)
        elif kind == "shapes":
            if shapes is None:
                from tasks.simulate import SimConfig, make_phantom

                shapes = make_phantom(SimConfig(n_translations=size, phantom="shapes"), n_phase)
            m = np.rot90(shapes, int(rng.integers(4)), axes=(1, 2))
            m = np.ascontiguousarray(m[:, :, ::-1] if rng.random() < 0.5 else m)
        else:
            m = _crop_phantom(natives[int(rng.integers(len(natives)))], size, rng)
        present = [p for p in range(n_phase) if m[p].max() > 1e-3]
        if not present:
            continue
        p = present[len(out) % len(present)]
        out.append(make_sr_pair(m, p, f, seed=rng, source=kind, **pair_kw))
        if i > 20 * n:
            raise SuperResolutionError("build_sr_library: phantoms keep coming out empty")
    return out


# ----------------------------------------------------------------------------- networks
def _torch():
    import torch

    return torch


def _box(x, r: int):
    """Mean over a (2r+1)^2 window, edges replicated; x (B, 1, h, w) torch tensor."""
    F = _torch().nn.functional
    return F.avg_pool2d(F.pad(x, (r, r, r, r), mode="replicate"), 2 * r + 1, stride=1)


def _guided_upsample(low, guide, f: int, r: int = 1, eps: float = 3e-4):
    """Guided-filter upsampling (He, Sun & Tang, IEEE TPAMI 35 (2013) 1397, the local
    linear model ``high = a * guide + b``; fast guided filter: He & Sun, arXiv:1505.00996).

    ``a`` and ``b`` are fitted by least squares over (2r+1)^2 windows of the low-resolution
    grid between ``low`` and the area-downsampled guide, box-averaged, bilinearly upsampled
    and applied to the high-resolution ``guide``. Torch tensors (B, 1, h, w) and
    (B, 1, f*h, f*w); guide normalised to about [0, 1] (``eps`` is in those units^2)."""
    F = _torch().nn.functional
    gl = F.avg_pool2d(guide, f)
    mg, mp = _box(gl, r), _box(low, r)
    cov = _box(gl * low, r) - mg * mp
    var = (_box(gl * gl, r) - mg * mg).clamp_min(0)
    a = cov / (var + eps)
    b = mp - a * mg
    up = dict(scale_factor=f, mode="bilinear", align_corners=False)
    return F.interpolate(_box(a, r), **up) * guide + F.interpolate(_box(b, r), **up)


GUIDED_RADIUS, GUIDED_EPS = 1, 3e-4


def _build_net_class():
    torch = _torch()
    nn = torch.nn
    F = torch.nn.functional

    class _ResBlock(nn.Module):
        def __init__(self, c, res_scale=0.2):
            super().__init__()
            self.c1 = nn.Conv2d(c, c, 3, padding=1)
            self.c2 = nn.Conv2d(c, c, 3, padding=1)
            self.res_scale = res_scale

        def forward(self, x):
            return x + self.res_scale * self.c2(F.relu(self.c1(x)))

    class SRNet(nn.Module):
        """Residual super-resolution network (``kind`` "single" or "dual").

        Input ``low`` (B, 1, h, w) and, for "dual", ``guide`` (B, 1, f*h, f*w), both
        normalised; output (B, 1, f*h, f*w).
        Low-resolution body: conv head (low [+ pixel-unshuffled guide]) -> ``blocks``
        residual blocks (EDSR style, no batch norm, residual scaling 0.2) -> conv ->
        pixel-shuffle to ``hr_channels`` features at the high resolution -> tail of two
        3x3 convolutions fed with those features, the bicubic upsampled input ``b`` and
        (dual) the guided-filter upsampling ``gf`` and guide features.
        single: ``b + r``; dual: ``b + sigmoid(gate) * (gf - b) + r`` with ``r`` and
        ``gate`` from the tail. The output layer starts at zero (gate bias 2.2), so an
        untrained network returns ``b`` (single) or ``b + 0.9 (gf - b)`` (dual).
        """

        def __init__(self, kind: str = "dual", factor: int = 4, channels: int = 32,
                     blocks: int = 4, hr_channels: int = 16):
            super().__init__()
            if kind not in ("single", "dual"):
                raise SuperResolutionError(f"kind: expected 'single' or 'dual', got {kind!r}")
            self.kind, self.factor = kind, int(factor)
            self.channels, self.blocks, self.hr_channels = int(channels), int(blocks), int(hr_channels)
            f, C, H = self.factor, self.channels, self.hr_channels
            dual = kind == "dual"
            self.head = nn.Conv2d(1 + (f * f if dual else 0), C, 3, padding=1)
            self.body = nn.Sequential(*[_ResBlock(C) for _ in range(blocks)],
                                      nn.Conv2d(C, C, 3, padding=1))
            self.up = nn.Sequential(nn.Conv2d(C, H * f * f, 3, padding=1), nn.PixelShuffle(f))
            if dual:
                self.guide_hr = nn.Conv2d(1, H, 3, padding=1)
            self.tail = nn.Sequential(
                nn.Conv2d(H + (1 + 1 + H if dual else 1), H, 3, padding=1), nn.LeakyReLU(0.1),
                nn.Conv2d(H, 2 if dual else 1, 3, padding=1))
            # the untrained network returns its base (bicubic / gated guided filter); leaky
            # ReLUs after the upsampler and in the tail keep its units from dying while the
            # zero-initialised output layer starts to learn
            nn.init.zeros_(self.tail[-1].weight)
            nn.init.zeros_(self.tail[-1].bias)
            if dual:  # gate on the guided-filter base starts at sigmoid(2.2) = 0.9
                with torch.no_grad():
                    self.tail[-1].bias[1] = 2.2
            self.gf_radius, self.gf_eps = GUIDED_RADIUS, GUIDED_EPS

        def config(self) -> dict:
            return {"kind": self.kind, "factor": self.factor, "channels": self.channels,
                    "blocks": self.blocks, "hr_channels": self.hr_channels}

        def forward(self, low, guide=None):
            f = self.factor
            base = F.interpolate(low, scale_factor=f, mode="bicubic", align_corners=False)
            if self.kind == "single":
                h = self.head(low)
                h = h + self.body(h)
                u = F.leaky_relu(self.up(h), 0.1)
                return base + self.tail(torch.cat([u, base], 1))
            gf = _guided_upsample(low, guide, f, self.gf_radius, self.gf_eps)
            h = self.head(torch.cat([low, F.pixel_unshuffle(guide, f)], 1))
            h = h + self.body(h)
            u = F.leaky_relu(self.up(h), 0.1)
            g = F.leaky_relu(self.guide_hr(guide), 0.1)
            o = self.tail(torch.cat([u, base, gf, g], 1))
            # gated guided-filter base: trust the local linear model where it holds
            return base + torch.sigmoid(o[:, 1:2]) * (gf - base) + o[:, :1]

    return SRNet


_SRNet = None


def SRNet(kind: str = "dual", factor: int = 4, channels: int = 32, blocks: int = 4,
          hr_channels: int = 16):
    """Build a super-resolution network (a ``torch.nn.Module``); see the module notes.

    Parameters
    ----------
    kind : {"single", "dual"}
    factor : int
        Upsampling factor (2 or 4 used here; any integer >= 2 works).
    channels, blocks, hr_channels : int
        Body width, number of residual blocks, high-resolution feature width.
    """
    global _SRNet
    if _SRNet is None:
        _SRNet = _build_net_class()
    return _SRNet(kind, _factor(factor), channels, blocks, hr_channels)


def _is_net(obj) -> bool:
    return _SRNet is not None and isinstance(obj, _SRNet)


def _low_scale(low: np.ndarray) -> np.ndarray:
    """Per-image scale of (B, h, w): 99.9th percentile of |low| (1 where the image is 0)."""
    s = np.quantile(np.abs(low.reshape(low.shape[0], -1)), 0.999, axis=1)
    return np.where(s > 0, s, 1.0).astype(np.float32)


def _norm_guide(g: np.ndarray) -> np.ndarray:
    lo, hi = np.quantile(g, [0.001, 0.999])
    return ((g - lo) / (hi - lo if hi > lo else 1.0)).astype(np.float32)


def _device(device):
    torch = _torch()
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device in ("gpu", "cuda") and not torch.cuda.is_available():
        raise SuperResolutionError(f"device: {device!r} requested but torch sees no CUDA device")
    return torch.device("cuda" if device == "gpu" else device)


def _pairs(pairs) -> list[SRPair]:
    out = []
    for i, p in enumerate(pairs):
        if isinstance(p, dict):
            p = SRPair(high=p["high"], low=p["low"], guide=p.get("guide"), factor=p["factor"])
        if not isinstance(p, SRPair):
            raise SuperResolutionError(f"pairs[{i}]: expected an SRPair or a dict with high, low, "
                                       f"guide, factor; got {type(p).__name__}")
        out.append(p)
    if not out:
        raise SuperResolutionError("pairs: empty training library")
    return out


def train_sr(pairs: Iterable[SRPair], *, kind: Literal["single", "dual"] = "dual", factor: int,
             epochs: int = 60, seed: int = 0, patch: int | None = None, batch: int = 8,
             patches_per_image: int = 2, lr: float = 1e-3, channels: int = 32, blocks: int = 4,
             hr_channels: int = 16, loss: Literal["l1", "mse"] = "l1", device: str | None = "cpu",
             verbose: bool = False):
    """Train a single- or dual-input super-resolution network on simulated pairs.

    Parameters
    ----------
    pairs : iterable of SRPair
        From :func:`build_sr_library`; all with ``factor`` and, for "dual", a guide.
    kind : {"dual", "single"}
    factor : int
        2 or 4 (any integer >= 2 works).
    epochs : int
        Passes over the library; each pass draws ``patches_per_image`` random patches per
        pair (random flips and 90 deg rotations).
    seed : int
        Seeds torch and the patch sampler (deterministic on CPU for a given thread count).
    patch : int, optional
        High-resolution patch side (multiple of ``factor``; default ``12 * factor``).
    batch, lr : int, float
        Mini-batch size; Adam learning rate, cosine-decayed to 1 % over the run.
    loss : {"l1", "mse"}
        Training loss on the normalised images (MSE optimises PSNR directly; L1 as EDSR).
    channels, blocks, hr_channels : int
        Network size (see :func:`SRNet`).
    device : str, optional
        ``"cpu"`` (default), ``"cuda"``, or ``"auto"``.

    Returns
    -------
    SRNet
        In eval mode on the CPU, with ``train_seconds`` and ``train_loss`` attributes.

    Raises
    ------
    SuperResolutionError
        Empty library, pairs of another factor, mismatched shapes, missing guides.
    """
    torch = _torch()
    f = _factor(factor)
    if kind not in ("single", "dual"):
        raise SuperResolutionError(f"kind: expected 'single' or 'dual', got {kind!r}")
    plist = _pairs(pairs)
    patch = 12 * f if patch is None else int(patch)
    if patch % f or patch < 2 * f:
        raise SuperResolutionError(f"patch: expected a multiple of factor {f} >= {2 * f}, got {patch}")
    lows, highs, guides = [], [], []
    for i, p in enumerate(plist):
        if p.factor != f:
            raise SuperResolutionError(f"pairs[{i}]: built for factor {p.factor}, training factor is {f}")
        lo = _image(p.low, f"pairs[{i}].low", ndims=(2,))
        hi = _image(p.high, f"pairs[{i}].high", ndims=(2,))
        if hi.shape != (lo.shape[0] * f, lo.shape[1] * f):
            raise SuperResolutionError(f"pairs[{i}]: high {hi.shape} is not factor {f} x low {lo.shape}")
        if min(hi.shape) < patch:
            raise SuperResolutionError(f"pairs[{i}]: image {hi.shape} smaller than patch {patch}")
        s = _low_scale(lo[None])[0]
        lows.append(lo / s)
        highs.append(hi / s)
        if kind == "dual":
            if p.guide is None:
                raise SuperResolutionError(f"pairs[{i}].guide: dual training needs a guide image")
            g = _image(p.guide, f"pairs[{i}].guide", ndims=(2,))
            if g.shape != hi.shape:
                raise SuperResolutionError(f"pairs[{i}].guide: shape {g.shape}, expected {hi.shape}")
            guides.append(_norm_guide(g))
    dev = _device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = SRNet(kind, f, channels, blocks, hr_channels).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    n_steps = max(1, int(math.ceil(epochs * len(plist) * patches_per_image / batch)))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, n_steps, eta_min=lr * 0.01)
    if loss not in ("l1", "mse"):
        raise SuperResolutionError(f"loss: expected 'l1' or 'mse', got {loss!r}")
    lossfn = torch.nn.functional.l1_loss if loss == "l1" else torch.nn.functional.mse_loss
    pl = patch // f
    t0 = time.perf_counter()
    net.train()
    losses = []
    for step in range(n_steps):
        idx = rng.integers(len(plist), size=batch)
        lb, hb, gb = [], [], []
        for j in idx:
            h, w = lows[j].shape
            y, x = int(rng.integers(h - pl + 1)), int(rng.integers(w - pl + 1))
            k, flip = int(rng.integers(4)), bool(rng.random() < 0.5)

            def aug(a):
                a = np.rot90(a, k)
                return a[:, ::-1] if flip else a

            lb.append(aug(lows[j][y:y + pl, x:x + pl]))
            hb.append(aug(highs[j][y * f:(y + pl) * f, x * f:(x + pl) * f]))
            if kind == "dual":
                gb.append(aug(guides[j][y * f:(y + pl) * f, x * f:(x + pl) * f]))
        lt = torch.from_numpy(np.ascontiguousarray(np.stack(lb)[:, None])).to(dev)
        ht = torch.from_numpy(np.ascontiguousarray(np.stack(hb)[:, None])).to(dev)
        gt = torch.from_numpy(np.ascontiguousarray(np.stack(gb)[:, None])).to(dev) if gb else None
        err = lossfn(net(lt, gt), ht)
        opt.zero_grad(set_to_none=True)
        err.backward()
        opt.step()
        sched.step()
        losses.append(float(err.detach()))
        if verbose and (step % 100 == 0 or step == n_steps - 1):
            print(f"train_sr[{kind} x{f}] step {step + 1}/{n_steps} {loss} {np.mean(losses[-50:]):.3g}")
    net = net.cpu().eval()
    net.train_seconds = time.perf_counter() - t0
    net.train_loss = float(np.mean(losses[-max(1, n_steps // 10):]))
    return net


def save_model(model, path: str | Path) -> Path:
    """Save a trained :func:`SRNet`: ``torch.save`` of ``{"format", "config", "state_dict"}``
    (tensors, strings and ints only, loadable with ``weights_only=True``)."""
    torch = _torch()
    if not _is_net(model):
        raise SuperResolutionError(f"model: expected an SRNet, got {type(model).__name__}")
    path = Path(path)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": _FORMAT, "config": model.config(), "state_dict": sd}, path)
    return path


def load_model(path: str | Path, *, device: str | None = "cpu"):
    """Load a model written by :func:`save_model` (``torch.load(weights_only=True)``).

    Raises
    ------
    SuperResolutionError
        File missing or not a model file of this module.
    """
    torch = _torch()
    path = Path(path)
    if not path.is_file():
        raise SuperResolutionError(f"model: file {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle/zip errors of a foreign file
        raise SuperResolutionError(f"model: {path} is not a loadable torch file ({err})") from None
    if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
        raise SuperResolutionError(f"model: {path} is not a super-resolution model of format {_FORMAT}")
    net = SRNet(**obj["config"])
    try:
        net.load_state_dict(obj["state_dict"])
    except RuntimeError as err:
        raise SuperResolutionError(f"model: {path}: weights do not fit the stored config ({err})") from None
    return net.to(_device(device)).eval()


# ----------------------------------------------------------------------------- inference
def upscale(low_res, factor: int, *, method: Literal["bilinear", "bicubic", "guided", "single", "dual"] = "bicubic",
            model=None, guide=None, device: str | None = "cpu", batch: int = 16) -> np.ndarray:
    """Upsample a chemical image by ``factor``.

    Parameters
    ----------
    low_res : array (ny, nx) or (ny, nx, C)
        Chemical image(s), any units; channels (e.g. phases) are processed as a batch.
    factor : int
        Integer factor (the networks: the factor they were trained for).
    method : {"bilinear", "bicubic", "guided", "single", "dual"}
        Interpolation (``torch.nn.functional.interpolate``, ``align_corners=False``,
        bicubic = Keys a = -0.75), guided-filter upsampling with ``guide`` (no learning;
        the base the dual network refines), or a trained network.
    model : SRNet or path, optional
        Required for "single" / "dual"; its kind must match ``method``.
    guide : array (factor*ny, factor*nx), optional
        High-resolution absorption image of the same slice, registered to the chemical
        image's field of view; required for "guided" and "dual", shared by all channels.
    device : str, optional
        Torch device for the networks ("cpu", "cuda", "auto").
    batch : int
        Channels per forward pass.

    Returns
    -------
    ndarray (factor*ny, factor*nx[, C]) float32

    Raises
    ------
    SuperResolutionError
        Unknown method, missing/mismatched model or guide (the message gives the expected
        guide shape), bad image.
    """
    torch = _torch()
    F = torch.nn.functional
    f = _factor(factor)
    if method not in METHODS:
        raise SuperResolutionError(f"method: expected one of {METHODS}, got {method!r}")
    img = _image(low_res, "low_res")
    squeeze = img.ndim == 2
    stack = np.moveaxis(img[..., None] if squeeze else img, -1, 0)  # (C, ny, nx)
    ny, nx = stack.shape[1:]
    gt = None
    if method in ("guided", "dual"):
        if guide is None:
            raise SuperResolutionError(f"guide: method {method!r} needs a high-resolution absorption "
                                       f"image of shape ({f * ny}, {f * nx})")
        g = _image(guide, "guide", ndims=(2,))
        if g.shape != (f * ny, f * nx):
            raise SuperResolutionError(
                f"guide: shape {g.shape} does not match low_res {(ny, nx)} x factor {f}; expected "
                f"({f * ny}, {f * nx}) (register/crop the absorption image to the chemical image's grid)")
        gt = torch.from_numpy(_norm_guide(g)[None, None])
    if method in ("bilinear", "bicubic"):
        t = torch.from_numpy(np.ascontiguousarray(stack[:, None]))
        out = F.interpolate(t, scale_factor=f, mode=method, align_corners=False)[:, 0].numpy()
    elif method == "guided":
        s = _low_scale(stack)
        t = torch.from_numpy(np.ascontiguousarray((stack / s[:, None, None])[:, None]))
        with torch.inference_mode():
            out = _guided_upsample(t, gt.expand(len(t), -1, -1, -1), f, GUIDED_RADIUS, GUIDED_EPS)
        out = out[:, 0].numpy() * s[:, None, None]
    else:
        if model is None:
            raise SuperResolutionError(f"model: method {method!r} needs a trained model (SRNet or file)")
        net = load_model(model, device=device) if isinstance(model, (str, Path)) else model
        if not _is_net(net):
            raise SuperResolutionError(f"model: expected an SRNet or a model file, got {type(model).__name__}")
        if net.kind != method:
            raise SuperResolutionError(f"model: a {net.kind!r}-input model cannot run method {method!r}")
        if net.factor != f:
            raise SuperResolutionError(f"factor: model was trained for factor {net.factor}, got {f}")
        dev = _device(device)
        net = net.to(dev)
        s = _low_scale(stack)
        x = stack / s[:, None, None]
        outs = []
        with torch.inference_mode():
            for i in range(0, len(x), max(1, batch)):
                xb = torch.from_numpy(np.ascontiguousarray(x[i:i + batch, None])).to(dev)
                gb = gt.to(dev).expand(len(xb), -1, -1, -1) if gt is not None else None
                outs.append(net(xb, gb)[:, 0].float().cpu().numpy())
        out = np.concatenate(outs) * s[:, None, None]
    out = out.astype(np.float32, copy=False)
    return out[0] if squeeze else np.ascontiguousarray(np.moveaxis(out, 0, -1))


# ----------------------------------------------------------------------------- guides
def absorption_from_xrdct(volume, *, radial=None, radial_range=None, factor: int | None = None,
                          clip_negative: bool = True) -> np.ndarray:
    """Total-scattering image of a reconstructed XRD-CT slice, for use as a guide.

    Sums the reconstructed intensity over the radial bins (all, or those within
    ``radial_range``): an image of the total scattering power per voxel, which follows the
    electron density (roughly the absorption contrast) and is far less noisy than any
    single phase's map because every bin contributes.

    Parameters
    ----------
    volume : array (ny, nx, n_bin) or (nz, ny, nx, n_bin)
        Reconstructed volume, bins last (as :func:`tasks.reconstruct.fbp` returns).
    radial : array (n_bin,), optional
        Radial axis values (needed with ``radial_range``).
    radial_range : (lo, hi), optional
        Sum only bins with ``lo <= radial <= hi`` (e.g. to exclude the air/beamstop region).
    factor : int, optional
        Also bicubic-interpolate the image by ``factor`` so it has the shape
        :func:`upscale` expects of a guide.
    clip_negative : bool
        Set negative sums (FBP ringing outside the sample) to zero.

    Returns
    -------
    ndarray (ny, nx) / (nz, ny, nx), or times ``factor`` when given; float32

    Notes
    -----
    This image lives on the reconstruction grid: it is **not** of higher resolution than
    the chemical maps. Interpolated by ``factor`` it has the guide's shape but no detail
    finer than the chemical image's pixel, so the "dual" network guided by it cannot
    recover sub-pixel edges (it can only use the lower noise of the summed image). A real
    resolution gain needs a separate absorption-contrast (micro-CT) image at the finer
    pixel, registered to the slice (:func:`load_guide`).

    Raises
    ------
    SuperResolutionError
        Wrong dimensions, ``radial`` missing/mismatched, empty range.
    """
    from tasks._xp import to_numpy

    v = np.asarray(to_numpy(volume))
    if v.ndim not in (3, 4):
        raise SuperResolutionError(f"volume: expected (ny, nx, n_bin) or (nz, ny, nx, n_bin), got shape {v.shape}")
    sel = slice(None)
    if radial_range is not None:
        if radial is None:
            raise SuperResolutionError("radial: needed with radial_range (the radial axis values)")
        r = np.asarray(radial, float).ravel()
        if r.size != v.shape[-1]:
            raise SuperResolutionError(f"radial: expected {v.shape[-1]} values (one per bin), got {r.size}")
        lo, hi = radial_range
        sel = (r >= lo) & (r <= hi)
        if not sel.any():
            raise SuperResolutionError(f"radial_range: {radial_range} selects no bin of [{r.min()}, {r.max()}]")
    img = v[..., sel].sum(axis=-1, dtype=np.float64)
    if clip_negative:
        img = np.clip(img, 0, None)
    img = img.astype(np.float32)
    if factor is not None:
        if img.ndim == 2:
            img = upscale(img, factor, method="bicubic")
        else:
            img = np.moveaxis(upscale(np.moveaxis(img, 0, -1), factor, method="bicubic"), -1, 0)
    return img


def load_guide(path: str | Path, *, dataset: str | None = None) -> np.ndarray:
    """Read a 2-D absorption image (TIFF via tifffile/fabio, or HDF5 via h5py).

    Parameters
    ----------
    path : str or Path
        ``.tif``/``.tiff`` or ``.h5``/``.hdf5``/``.nxs``.
    dataset : str, optional
        HDF5 dataset path; default: the only 2-D dataset in the file, else the first
        named ``data``/``image``/``guide``/``absorption``.

    Returns
    -------
    ndarray (ny, nx) float32

    Raises
    ------
    SuperResolutionError
        Missing file, unknown format, no / ambiguous 2-D dataset, not 2-D.
    """
    p = Path(path)
    if not p.is_file():
        raise SuperResolutionError(f"guide: file {p} not found")
    suf = p.suffix.lower()
    if suf in (".tif", ".tiff"):
        try:
            import tifffile

            arr = tifffile.imread(str(p))
        except Exception:  # noqa: BLE001 - fall back to fabio
            try:
                import fabio

                arr = fabio.open(str(p)).data
            except Exception as err:  # noqa: BLE001
                raise SuperResolutionError(f"guide: cannot read TIFF {p}: {err}") from None
    elif suf in (".h5", ".hdf5", ".nxs", ".hdf"):
        import h5py

        with h5py.File(p, "r") as h:
            if dataset is None:
                found = []
                h.visititems(lambda name, o: found.append(name)
                             if isinstance(o, h5py.Dataset) and o.ndim == 2 else None)
                named = [n for n in found if n.split("/")[-1] in ("data", "image", "guide", "absorption")]
                if len(found) == 1:
                    dataset = found[0]
                elif named:
                    dataset = named[0]
                else:
                    raise SuperResolutionError(f"guide: {p} holds {len(found)} 2-D datasets {found[:5]}; "
                                               "name one with dataset=")
            if dataset not in h or not isinstance(h[dataset], h5py.Dataset):
                raise SuperResolutionError(f"guide: dataset {dataset!r} not found in {p}")
            arr = h[dataset][()]
    else:
        raise SuperResolutionError(f"guide: {p}: expected a .tif/.tiff or .h5/.hdf5/.nxs file")
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].mean(-1)
    return _image(np.squeeze(arr), "guide", ndims=(2,))
