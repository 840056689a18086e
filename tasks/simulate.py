"""Simulated pencil-beam XRD-CT scans with known ground truth.

The simulator builds a phantom (per-phase mass maps), projects it along the pencil beam
for every (rotation angle, translation), turns the projected masses into 2D powder
diffraction frames on a real pyFAI detector, and writes a NeXus/HDF5 scan (frames
bitshuffle-LZ4 compressed) plus a PONI calibration. Everything the pipeline should recover
is stored beside the frames in ``/entry/ground_truth``.

Forward model
-------------
For slice ``k``, angle ``a``, translation ``t`` (frame ``f``) the expected frame is::

    frame_f = K * monitor_f * ( sum_p P_p[k, a, t] * B_p  +  B_air )

* ``P_p = radon(m_p)`` is the projected mass of phase ``p``: the integral of the
  per-pixel mass map ``m_p`` over the beam's path, **in pixel-length units** (one
  translation step = one pixel), computed with :func:`tasks.reconstruct.radon` about a
  rotation axis at translation pixel ``(n - 1) / 2 + cor_offset_px``, as strip integrals
  over a beam ``beam_width_px`` steps wide (default 1: every voxel is seen exactly once
  per angle, so projections conserve mass). This is the pencil-beam XRD-CT measurement
  model (Jacques et al. 2011): each frame is the sum of the diffraction of all voxels
  the beam crosses.
* ``B_p`` is the 2D image of the 1D pattern ``ref_p(2theta) / zmv_p`` (the per-unit-cell
  reference pattern of :func:`tasks.rietveld.reference_patterns` divided by the cell mass x
  cell volume ``Phase.zmv``, so a voxel holding mass ``m_p`` scatters
  ``(m_p / zmv_p) * ref_p``, the convention of the Rietveld mapping and of Hill & Howard,
  J. Appl. Cryst. 20 (1987) 467). ``B_air`` is a smooth, broad air-scatter pattern that
  every frame sees.
* Patterns are intensities per solid angle as functions of 2theta (per degree of
  2theta, what :func:`tasks.rietveld.reference_patterns` returns in ``2th_deg``). pyFAI
  integration returns these values pointwise in any radial unit (no Jacobian), so the
  sinogram cube in ``q`` units holds the 2theta patterns evaluated at ``2theta(q)``.
* 2D images come from pyFAI ``AzimuthalIntegrator.calcfrom1d`` (solid angle and
  polarisation applied, the inverse of what ``integrate1d`` corrects). For a binned
  detector the image is computed on the native (unbinned) pixels and block-averaged, so a
  binned pixel holds the pattern averaged over its area, as a real binned pixel does.
  Each basis image is computed once; frames are linear combinations of them.
* ``K`` (``intensity_scale``) is chosen so that the brightest noise-free frame has a mean of
  ``config.counts`` counts per unmasked pixel at monitor 1. Then: Poisson noise, single
  crystal hot spots, cast to ``uint32`` (masked/gap pixels = 0).

Ground-truth scale convention (what the pipeline should recover)
-----------------------------------------------------------------
``ground_truth/scale[p, y, x] = K * m_p[y, x] / zmv_p``. Integrating the frames with the
same PONI (solid-angle and polarisation corrections, ``polarization_factor`` of the
config) and dividing by the recorded monitor gives patterns
``K * (sum_p P_p ref_p / zmv_p + air)``; subtracting the air and reconstructing every
radial bin with a filtered back-projection **in pixel units** (FBP inverse of the
pixel-unit Radon transform: volume pixel = one translation step, line integrals as sums
over pixels, as astra-toolbox with unit detector spacing and skimage ``iradon`` do) gives
``K * sum_p m_p ref_p / zmv_p`` per voxel, whose whole-pattern fit against ``ref_p`` returns
exactly ``scale``. A reconstruction expressed per millimetre of path (line integrals in mm)
returns ``scale / translation_step_mm``. Mass fractions (Hill & Howard) are independent
of this factor: ``ground_truth/weight_fraction``.

Checked end to end (noise-free, 48 translations x 72 angles, default geometry and
profile): pyFAI ``integrate1d_ng`` (2th_deg, 800 bins) / monitor - air, this package's
FBP at the true centre, ``fit_scales`` against ``reference_patterns``: the median of
fitted / true scale over the interior of uniform regions is 1.000 (NiO), 0.992
(corundum), 0.996 (CeO2); remaining spread comes from FBP streaks of sharp edges and
from the pixel footprint (a binned pixel averages the pattern over ~0.05 deg).

Scan layout (``scan.nxs``)
--------------------------
``/entry`` (NXentry, ``default="data"``): ``title``, ``experiment_identifier`` (proposal),
  ``start_time`` (ISO 8601).
  ``instrument`` (NXinstrument) / ``detector`` (NXdetector) / ``data``: (N, H, W) uint32,
  chunks (1, H, W), bitshuffle + LZ4 (``hdf5plugin.Bitshuffle(cname="lz4")``);
  ``instrument/monochromator/wavelength`` (angstrom).
  ``sample`` (NXsample): ``name``, ``rotation_angle`` (N,) float64 deg, ``translation`` (N,) float64
  mm, ``z`` (N,) float64 mm.
  ``monitor`` (NXmonitor) / ``data`` (N,) float64 (relative beam intensity, 1 at start).
  ``data`` (NXdata, ``signal="data"``): hard links to the frames and the positions.
  ``ground_truth`` (NXcollection): see :func:`load_ground_truth`.
Frame order: z outer, angle, translation inner (snake optional).

References
----------
* G. Ashiotis et al., "The fast azimuthal integration Python library: pyFAI",
  J. Appl. Cryst. 48 (2015) 510 (``calcfrom1d``, geometry, detector masks).
* S. D. M. Jacques et al., "Dynamic X-ray diffraction computed tomography reveals
  real-time insight into catalyst active phase evolution", Angew. Chem. Int. Ed. 50
  (2011) 10148 (pencil-beam XRD-CT).
* A. Vamvakeros et al., "Removing multiple outliers and single-crystal artefacts from
  X-ray diffraction computed tomography data", J. Appl. Cryst. 48 (2015) 1943 (hot
  spots); nDTomo (phantom images).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipelines import spec as _spec
from pipelines.spec import ProfileSpec

__all__ = [
    "SimulationError", "SimConfig", "SimulatedScan", "SimulatedSinogram",
    "CATALYST_PHASES", "BATTERY_PHASES",
    "make_phantom", "make_geometry", "simulate_scan", "simulate_sinogram_cube",
    "load_ground_truth", "air_pattern",
]

CATALYST_PHASES: list[tuple[str, str]] = [
    ("NiO", "NiO.cif"), ("Al2O3_corundum", "Al2O3_corundum.cif"), ("CeO2", "CeO2.cif")]
BATTERY_PHASES: list[tuple[str, str]] = [
    ("LiCoO2", "LiCoO2.cif"), ("graphite", "graphite.cif"), ("Al", "Al.cif"), ("Cu", "Cu.cif")]


class SimulationError(ValueError):
    """A simulation that cannot run as configured; the message names the field or file."""


# ----------------------------------------------------------------------------- config
class SimConfig(BaseModel):
    """Configuration of a simulated XRD-CT scan (pydantic model; ``extra="forbid"``).

    Attributes
    ----------
    n_translations, n_angles : int
        Scan grid. The reconstructed image is ``n_translations`` square pixels of
        ``translation_step_mm``.
    angle_range_deg : float
        Rotation range; angles are ``linspace(0, range, n_angles, endpoint=False)`` deg.
    translation_step_mm : float
        Translation step (= reconstructed pixel size), mm.
    phases : list of (name, cif)
        CIF path absolute, relative to the working directory, or a file in
        ``pipelines/phases``. Default: a catalyst (NiO, corundum, CeO2);
        :data:`BATTERY_PHASES` is a battery set.
    phantom : str
        ``"shapes"`` (disks, ellipses, rectangle, a pore; pure, mixed and graded regions)
        or a path to a greyscale image, segmented into phases (see :func:`make_phantom`).
    sample_radius_frac : float
        Sample radius as a fraction of the half-width of the translation range; outside
        it only air is seen.
    detector, binning : str, (int, int)
        A pyFAI detector name and its binning (``Eiger1M`` binned 5x5 is 213 x 206 px with
        its module-gap mask). Pilatus1M (1043 x 981 px) admits no square binning with a
        gap mask in pyFAI, hence the Eiger default.
    distance_m, wavelength_m : float
        Sample-detector distance (m) and wavelength (m; 0.1746e-10 m = 71 keV).
    beam_center_frac : (float, float)
        Beam centre (PONI, no tilts) as a fraction of the detector height and width.
    rot1, rot2, rot3 : float
        Detector rotations (rad), pyFAI convention.
    polarization_factor : float or None
        Horizontal polarisation factor applied to the frames (pyFAI convention).
    npt_sim, tth_max_deg : int, float or None
        Fine 2theta grid of the 1D patterns (``tth_max_deg`` None: covers the detector).
    profile : ProfileSpec
        Pseudo-Voigt profile (Caglioti) of the reference patterns. Default W = 0.09 deg^2:
        FWHM 0.30 deg, about 6 pixels of the default geometry (0.048 deg per binned
        pixel). Keep the FWHM well above the angular size of a pixel: the pixel footprint
        broadens peaks in the integrated patterns (relative variance ~ (0.45 px)^2/sigma^2;
        at FWHM 0.15 deg the integrated peaks deviate by up to ~4 % rms from the input).
    counts : float
        Mean counts per unmasked pixel in the brightest noise-free frame at monitor 1.
    noise : bool
        Poisson noise on (off: frames are the rounded expectation).
    hot_spots : float
        Expected number of single-crystal spots per 100 frames (Poisson), placed on a
        reflection ring of a phase present in the frame.
    hot_spot_size, hot_spot_intensity : int, float
        Spot cluster edge (pixels) and its level relative to the local noise-free level.
    air_scatter : float
        Mean air-scatter pixel level relative to the mean sample pixel level of the
        brightest frame (0 = none).
    beam_decay : float
        Fractional monitor decay over the scan (exponential in frame number).
    cor_offset_px : float
        Rotation axis position minus the centre of the translation range, in pixels.
    beam_width_px : float
        Pencil-beam width in translation steps. 1 (default) = strip integrals over one
        step, a beam as wide as the step: every voxel is seen exactly once per angle, so
        the sum over translations of a projection equals the slice's mass (to 1e-6); FBP
        then returns the phantom blurred by about one pixel at edges, exact inside uniform
        regions. 0 = line integrals sampled at the translation positions (sum conserved
        only to ~2 % at 16 translations).
    snake : bool
        Reverse the translation direction on every other line.
    z_mm : list of float
        Slice positions (one slice by default). Slice ``k`` is the phantom rotated by
        ``15 k`` degrees.
    seed : int
        Seed of ``numpy.random.default_rng``.
    proposal, sample_name : str
        Written as the NeXus ``/entry/experiment_identifier`` and ``/entry/sample/name``
        (what the catalog files the scan under).
    start_time : datetime
        ``/entry/start_time`` (ISO 8601); fixed by default so the same config writes the
        same file.
    chunk_frames : int
        Frames generated and written per chunk (memory ~ ``chunk_frames * H * W * 16`` B).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    n_translations: int = Field(default=48, ge=8, le=4096)
    n_angles: int = Field(default=72, ge=2, le=10000)
    angle_range_deg: float = Field(default=180.0, gt=0, le=360)
    translation_step_mm: float = Field(default=0.05, gt=0)
    phases: list[tuple[str, str]] = Field(default_factory=lambda: list(CATALYST_PHASES))
    phantom: str = "shapes"
    sample_radius_frac: float = Field(default=0.75, gt=0.1, le=0.95)
    detector: str = "Eiger1M"
    binning: tuple[int, int] = (5, 5)
    distance_m: float = Field(default=0.45, gt=0)
    wavelength_m: float = Field(default=0.1746e-10, gt=0, lt=1e-8)
    beam_center_frac: tuple[float, float] = (0.2, 0.2)
    rot1: float = 0.0
    rot2: float = 0.0
    rot3: float = 0.0
    polarization_factor: float | None = Field(default=0.99, ge=-1, le=1)
    npt_sim: int = Field(default=8000, ge=100, le=1_000_000)
    tth_max_deg: float | None = Field(default=None, gt=0, lt=180)
    profile: ProfileSpec = Field(default_factory=lambda: ProfileSpec(W=0.09, eta=0.5))
    counts: float = Field(default=200.0, gt=0)
    noise: bool = True
    hot_spots: float = Field(default=3.0, ge=0)
    hot_spot_size: int = Field(default=3, ge=1, le=15)
    hot_spot_intensity: float = Field(default=50.0, gt=1)
    air_scatter: float = Field(default=0.05, ge=0)
    beam_decay: float = Field(default=0.10, ge=0, lt=1)
    cor_offset_px: float = 1.3
    beam_width_px: float = Field(default=1.0, ge=0, le=4)
    snake: bool = False
    z_mm: list[float] = Field(default_factory=lambda: [0.0], min_length=1)
    seed: int = 0
    proposal: str = Field(default="sim-0001", max_length=64)
    sample_name: str = Field(default="simulated sample", max_length=256)
    start_time: dt.datetime = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    chunk_frames: int = Field(default=128, ge=16, multiple_of=16)
    dtype: Literal["uint32"] = "uint32"

    @field_validator("phases")
    @classmethod
    def _phases(cls, v):
        if not v:
            raise ValueError("at least one phase (name, cif) is needed")
        names = [n for n, _ in v]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique, got {names}")
        return v

    @field_validator("binning")
    @classmethod
    def _binning(cls, v):
        if v[0] < 1 or v[1] < 1:
            raise ValueError(f"binning must be positive integers, got {v}")
        return v

    @model_validator(mode="after")
    def _cor(self):
        r = self.sample_radius_frac * self.n_translations / 2
        if abs(self.cor_offset_px) + r > self.n_translations / 2 - 0.5:
            raise ValueError(
                f"cor_offset_px={self.cor_offset_px} with sample_radius_frac="
                f"{self.sample_radius_frac} puts the sample outside the translation range")
        return self

    @classmethod
    def battery(cls, **kw) -> "SimConfig":
        """A battery-like configuration (LiCoO2, graphite, Al, Cu)."""
        kw.setdefault("phases", list(BATTERY_PHASES))
        return cls(**kw)

    # derived quantities -----------------------------------------------------------
    @property
    def angles_deg(self) -> np.ndarray:
        """(n_angles,) float64 rotation angles, deg."""
        return np.linspace(0.0, self.angle_range_deg, self.n_angles, endpoint=False)

    @property
    def translations_mm(self) -> np.ndarray:
        """(n_translations,) float64 translation positions, mm (0 = centre of the range)."""
        n = self.n_translations
        return (np.arange(n) - (n - 1) / 2) * self.translation_step_mm

    @property
    def center_of_rotation_px(self) -> float:
        """Rotation axis in translation-pixel coordinates (0 = first column)."""
        return (self.n_translations - 1) / 2 + self.cor_offset_px

    @property
    def n_frames(self) -> int:
        return len(self.z_mm) * self.n_angles * self.n_translations


def _iso(t: dt.datetime) -> str:
    """ISO 8601 with a time zone (UTC assumed for a naive time)."""
    return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).isoformat()


# ----------------------------------------------------------------------------- results
@dataclass
class _GroundTruth:
    """Fields both simulation results share (see :class:`SimulatedScan`)."""

    config: SimConfig
    phase_names: list[str]
    mass: np.ndarray
    weight_fraction: np.ndarray
    scale: np.ndarray
    zmv: np.ndarray
    projected_mass: np.ndarray
    intensity_scale: float
    patterns_per_mass: np.ndarray
    air: np.ndarray
    center_of_rotation_px: float
    cor_offset_px: float
    wavelength_m: float


@dataclass
class SimulatedScan(_GroundTruth):
    """What :func:`simulate_scan` wrote, with its ground truth.

    Attributes
    ----------
    nexus_path, poni_path : Path
    mask_path : Path or None
        EDF mask (int8, 1 = masked) of the detector gaps; None if the detector has none.
        pyFAI also applies it itself when the PONI names the detector.
    config : SimConfig
    phase_names : list of str
    mass : ndarray (phase, y, x) float64, or (z, phase, y, x) for several slices
        Mass per voxel (arbitrary units).
    weight_fraction : ndarray, same shape
        Mass fractions; NaN where the voxel holds no sample.
    scale : ndarray, same shape
        ``K * mass / zmv``: the phase scale the pipeline recovers (see module docstring).
    zmv : ndarray (phase,) float64
        Cell mass x cell volume, amu * A^3 (``Phase.zmv``).
    projected_mass : ndarray (z, angle, translation, phase) float64
        Pixel-unit projections actually used for the frames.
    frame_index : ndarray (z, angle, translation) int64
        Frame number of each scan point.
    monitor : ndarray (n_frames,) float64
    intensity_scale : float
        ``K``.
    tth_deg : ndarray (npt_sim,)
        Fine 2theta grid of the 1D patterns.
    patterns_per_mass : ndarray (phase, npt_sim)
        ``ref_p / zmv_p`` on ``tth_deg``.
    air : ndarray (npt_sim,)
        Air-scatter pattern (same units as ``patterns_per_mass`` x mass).
    hot_spots : ndarray (n_spots,) structured: frame, row, col, tth_deg
    center_of_rotation_px, cor_offset_px, wavelength_m : float
    """

    nexus_path: Path
    poni_path: Path
    mask_path: Path | None
    frame_index: np.ndarray
    monitor: np.ndarray
    tth_deg: np.ndarray
    hot_spots: np.ndarray

    def expected_pattern(self, frame: int) -> np.ndarray:
        """Noise-free 1D pattern (on ``tth_deg``) that integrating frame ``frame`` with the
        PONI (solid-angle + polarisation corrections) returns, before monitor division:
        ``K * monitor[f] * (P[f] @ patterns_per_mass + air)``. Shape (npt_sim,)."""
        return expected_pattern(self.__dict__, frame)


@dataclass
class SimulatedSinogram(_GroundTruth):
    """What :func:`simulate_sinogram_cube` wrote: ``path`` and ground truth as in
    :class:`SimulatedScan` (``sinogram_clean`` is the noise-free cube, (angle, translation,
    radial) float64, monitor-normalised)."""

    path: Path
    radial: np.ndarray
    radial_unit: str
    sinogram_clean: np.ndarray


def expected_pattern(gt: dict, frame: int) -> np.ndarray:
    """Noise-free integrated pattern of frame ``frame`` from ground truth ``gt`` (a
    :func:`load_ground_truth` dict or a :class:`SimulatedScan`'s fields), before monitor
    division, on ``gt["tth_deg"]``."""
    fi = np.asarray(gt["frame_index"])
    pos = np.argwhere(fi == frame)
    if len(pos) != 1:
        raise SimulationError(f"frame {frame} is not in the scan (0..{fi.size - 1})")
    k, a, t = pos[0]
    pm = np.asarray(gt["projected_mass"])[k, a, t]
    return float(gt["intensity_scale"]) * float(np.asarray(gt["monitor"])[frame]) * (
        pm @ np.asarray(gt["patterns_per_mass"]) + np.asarray(gt["air"]))


# ----------------------------------------------------------------------------- phantom
def _resolve_cif(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    for root in (Path.cwd(), _spec.PIPELINES_DIR, _spec.PHASES_DIR):
        if (root / p).is_file():
            return (root / p).resolve()
    return _spec.PHASES_DIR / p


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix averaging input pixels over each output pixel's footprint."""
    edges_out = np.linspace(0, n_in, n_out + 1)
    a = np.zeros((n_out, n_in))
    for i in range(n_out):
        lo, hi = edges_out[i], edges_out[i + 1]
        j0, j1 = int(math.floor(lo)), int(math.ceil(hi))
        for j in range(j0, min(j1, n_in)):
            a[i, j] = max(0.0, min(hi, j + 1) - max(lo, j))
        a[i] /= hi - lo
    return a


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between))])


def _read_image(path: Path) -> np.ndarray:
    if not path.is_file():
        raise SimulationError(f"phantom: image file {path} not found (a greyscale image "
                              "or 'shapes' expected)")
    try:
        import fabio

        img = np.asarray(fabio.open(str(path)).data, dtype=float)
    except Exception:  # noqa: BLE001 - fall back to matplotlib's reader (PNG, ...)
        try:
            import matplotlib.image as mpimg

            img = np.asarray(mpimg.imread(str(path)), dtype=float)
        except Exception as err:  # noqa: BLE001
            raise SimulationError(f"phantom: cannot read image {path}: {err}") from None
    if img.ndim == 3:
        img = img[..., :3].mean(-1)
    if img.ndim != 2 or min(img.shape) < 8:
        raise SimulationError(f"phantom: image {path} has shape {img.shape}; a 2D greyscale "
                              "image of at least 8x8 pixels is expected")
    return img


def _image_phantom(path: Path, n_phase: int) -> np.ndarray:
    """Segment a greyscale image: foreground (Otsu) -> particles (connected components)
    -> phase by the rank of each particle's mean grey level (quantiles); mass density
    proportional to the grey level. Returns (n_phase, N, N) native-resolution masses
    (central square crop of the image)."""
    from scipy import ndimage

    img = _read_image(path)
    h, w = img.shape
    s = min(h, w)
    img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    if np.ptp(img) == 0:
        raise SimulationError(f"phantom: image {path} is uniform; nothing to segment")
    fg = img > _otsu(img.ravel())
    labels, nlab = ndimage.label(fg)
    if nlab == 0:
        raise SimulationError(f"phantom: image {path} has no foreground after thresholding")
    idx = np.arange(1, nlab + 1)
    size = ndimage.sum(fg, labels, idx)
    mean = ndimage.mean(img, labels, idx)
    keep = size >= 4
    cls = np.full(nlab + 1, -1)
    if n_phase == 1:
        cls[idx[keep]] = 0
    else:
        qs = np.quantile(mean[keep], np.linspace(0, 1, n_phase + 1)[1:-1])
        cls[idx[keep]] = np.searchsorted(qs, mean[keep])
    lab_cls = cls[labels]
    dens = img / img[fg].mean()
    out = np.zeros((n_phase, s, s))
    for p in range(n_phase):
        out[p] = np.where(lab_cls == p, dens, 0.0)
    return out


def _shapes_phantom(n: int, radius: float, n_phase: int, ss: int = 4) -> np.ndarray:
    """Disks, ellipses, a rectangle and a pore with pure, mixed and graded phase
    mixtures, anti-aliased by ``ss x ss`` supersampling. Returns (n_phase, n, n)."""
    c = (n - 1) / 2
    sub = (np.arange(n * ss) + 0.5) / ss - 0.5
    yy, xx = np.meshgrid((sub - c) / radius, (sub - c) / radius, indexing="ij")
    P = n_phase

    def e(k):
        v = np.zeros(P)
        v[k % P] = 1.0
        return v

    dens = np.zeros(yy.shape)
    frac = np.zeros((P,) + yy.shape)

    def paint(region, density, fractions):
        dens[region] = density
        frac[:, region] = np.asarray(fractions, float)[:, None]

    def ellipse(cy, cx, ay, ax, ang_deg=0.0):
        t = np.radians(ang_deg)
        y, x = yy - cy, xx - cx
        u = y * np.cos(t) + x * np.sin(t)
        v = -y * np.sin(t) + x * np.cos(t)
        return (u / ay) ** 2 + (v / ax) ** 2 <= 1

    # matrix: support with some of phase 0 (e.g. corundum with NiO)
    paint(ellipse(0, 0, 0.97, 0.97), 0.8, 0.75 * e(1) + 0.25 * e(0) if P > 1 else e(0))
    # pure phase-0 ellipse
    paint(ellipse(-0.38, -0.30, 0.30, 0.20, 30), 1.2, e(0))
    # pure last-phase rectangle
    rect = (np.abs(yy - 0.40) <= 0.17) & (np.abs(xx - 0.22) <= 0.30)
    paint(rect, 1.0, e(P - 1))
    # equal mixture of all phases
    paint(ellipse(0.30, -0.48, 0.22, 0.22), 1.4, np.full(P, 1.0 / P))
    # graded: fraction of phase 0 from 0.1 to 0.9 across x, rest in phase 2 (or last)
    g = ellipse(-0.30, 0.45, 0.24, 0.32)
    f0 = np.clip(0.1 + 0.8 * (xx - (0.45 - 0.32)) / 0.64, 0.1, 0.9)
    grad = np.zeros((P,) + yy.shape)
    grad[0] = f0
    grad[min(2, P - 1) if P > 1 else 0] += 1 - f0
    dens[g] = 1.1
    frac[:, g] = grad[:, g]
    # a pore
    pore = ellipse(0.02, 0.05, 0.13, 0.13)
    dens[pore] = 0.0
    m = dens[None] * frac
    return m.reshape(P, n, ss, n, ss).mean(axis=(2, 4))


def make_phantom(config: SimConfig, n_phase: int | None = None) -> np.ndarray:
    """Per-phase mass maps of one slice.

    Parameters
    ----------
    config : SimConfig
        ``phantom`` ("shapes" or an image path), ``n_translations`` (n) and
        ``sample_radius_frac`` are used.
    n_phase : int, optional
        Number of phases (default ``len(config.phases)``).

    Returns
    -------
    ndarray, shape (n_phase, n, n), float64, >= 0
        Mass per voxel (arbitrary units, ~1 for a dense region). Zero outside the circle
        of radius ``sample_radius_frac * n / 2`` about the image centre ``(n-1)/2``.

    Raises
    ------
    SimulationError
        Image missing, unreadable, not 2D, uniform.

    Notes
    -----
    An image phantom is segmented at native resolution (Otsu threshold, connected
    particles, phase by rank of particle mean grey level, density ~ grey level) and
    area-averaged down to the sample diameter, so particle edges become mixed voxels.
    """
    n = config.n_translations
    P = len(config.phases) if n_phase is None else n_phase
    radius = config.sample_radius_frac * n / 2
    c = (n - 1) / 2
    yy, xx = np.mgrid[0:n, 0:n] - c
    support = np.hypot(yy, xx) <= radius
    if config.phantom == "shapes":
        m = _shapes_phantom(n, radius, P)
    else:
        native = _image_phantom(Path(config.phantom).expanduser(), P)
        d = int(round(2 * radius))
        if (n - d) % 2:
            d += 1
        d = min(d, n)
        a = _area_matrix(native.shape[-1], d)
        small = np.einsum("ij,pjk,lk->pil", a, native, a)
        m = np.zeros((P, n, n))
        o = (n - d) // 2
        m[:, o:o + d, o:o + d] = small
    m = np.where(support[None], np.clip(m, 0, None), 0.0)
    return m


def _slice_phantom(base: np.ndarray, k: int) -> np.ndarray:
    if k == 0:
        return base
    from scipy import ndimage

    n = base.shape[-1]
    rot = ndimage.rotate(base, 15.0 * k, axes=(1, 2), reshape=False, order=1)
    yy, xx = np.mgrid[0:n, 0:n] - (n - 1) / 2
    inside = np.hypot(yy, xx) <= (n / 2 - 1)
    return np.where(inside[None], np.clip(rot, 0, None), 0.0)


def _weight_fraction(mass: np.ndarray, axis: int) -> np.ndarray:
    tot = mass.sum(axis=axis, keepdims=True)
    thr = 1e-9 * max(float(tot.max()), 1e-300)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > thr, mass / np.where(tot > thr, tot, 1), np.nan)


# ----------------------------------------------------------------------------- geometry
def make_geometry(config: SimConfig):
    """The pyFAI geometry of the simulated detector.

    Returns
    -------
    ai : pyFAI AzimuthalIntegrator
        Binned detector (what the frames and the PONI describe).
    ai_native : AzimuthalIntegrator or None
        Same geometry on the unbinned detector (None when not binned), used to average
        each binned pixel over its area.
    mask : ndarray (H, W) bool
        True = masked (module gaps of the binned detector; all False if none).

    Raises
    ------
    SimulationError
        Unknown detector name or a binning pyFAI cannot apply to its mask.
    """
    from pyFAI.detectors import detector_factory
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    try:
        det = detector_factory(config.detector)
    except Exception as err:  # noqa: BLE001
        raise SimulationError(f"SimConfig.detector: {config.detector!r} is not a pyFAI "
                              f"detector ({err})") from None
    native = detector_factory(config.detector)
    binned = tuple(config.binning) != (1, 1)
    if binned:
        ms = det.max_shape
        if ms[0] % config.binning[0] or ms[1] % config.binning[1]:
            raise SimulationError(
                f"SimConfig.binning: {tuple(config.binning)} does not divide the "
                f"{config.detector} shape {tuple(ms)}; pyFAI needs an exact divisor to bin "
                "its mask (e.g. Eiger1M with (5, 5))")
        det.binning = tuple(config.binning)
    m = det.mask
    mask = np.zeros(det.shape, bool) if m is None else np.asarray(m, bool)
    h_m = det.shape[0] * det.pixel1
    w_m = det.shape[1] * det.pixel2
    kw = dict(dist=config.distance_m, poni1=config.beam_center_frac[0] * h_m,
              poni2=config.beam_center_frac[1] * w_m, rot1=config.rot1, rot2=config.rot2,
              rot3=config.rot3, wavelength=config.wavelength_m)
    ai = AzimuthalIntegrator(detector=det, **kw)
    ai_native = AzimuthalIntegrator(detector=native, **kw) if binned else None
    return ai, ai_native, mask


def _basis_images(ai, ai_native, config: SimConfig, tth: np.ndarray,
                  patterns: np.ndarray) -> np.ndarray:
    """(n_pattern, H, W) float64 images of 1D patterns via pyFAI calcfrom1d."""
    H, W = ai.detector.shape
    out = np.empty((len(patterns), H, W))
    for i, pat in enumerate(patterns):
        if ai_native is None:
            img = ai.calcfrom1d(tth, pat, shape=(H, W), dim1_unit="2th_deg",
                                correctSolidAngle=True,
                                polarization_factor=config.polarization_factor)
        else:
            full = ai_native.calcfrom1d(tth, pat, shape=ai_native.detector.shape,
                                        dim1_unit="2th_deg", correctSolidAngle=True,
                                        polarization_factor=config.polarization_factor)
            by, bx = config.binning
            img = full[:H * by, :W * bx].reshape(H, by, W, bx).mean(axis=(1, 3))
        out[i] = img
    return out


def _tth_grid(ai, ai_native, config: SimConfig) -> np.ndarray:
    a = ai_native if ai_native is not None else ai
    tth_px = a.center_array(a.detector.shape, unit="2th_deg", scale=True)
    tmax = config.tth_max_deg or float(tth_px.max()) * 1.02 + 0.05
    if tmax < float(tth_px.max()):
        raise SimulationError(f"SimConfig.tth_max_deg={tmax} is below the detector's largest "
                              f"2theta {float(tth_px.max()):.3f} deg")
    return np.linspace(0.0, tmax, config.npt_sim)


def air_pattern(tth_deg: np.ndarray) -> np.ndarray:
    """Smooth broad air-scatter shape (arbitrary level): a small-angle decay plus a broad
    hump, both many degrees wide. Shape as ``tth_deg``."""
    t = np.asarray(tth_deg, float)
    return np.exp(-t / 3.0) + 0.6 * np.exp(-0.5 * ((t - 4.0) / 2.0) ** 2)


def _phase_patterns(config: SimConfig, grid: np.ndarray, unit: str):
    from tasks.rietveld import load_phase, reference_patterns

    phases = []
    for name, cif in config.phases:
        p = _resolve_cif(cif)
        if not p.is_file():
            raise SimulationError(f"SimConfig.phases: CIF {cif!r} for phase {name!r} not found "
                                  f"(looked in the working directory and {_spec.PHASES_DIR})")
        phases.append(load_phase(name, p))
    refs = np.asarray(reference_patterns(phases, grid, unit, config.wavelength_m,
                                         config.profile), dtype=float)
    if refs.shape != (len(phases), len(grid)):
        raise SimulationError(f"reference_patterns returned shape {refs.shape}, expected "
                              f"{(len(phases), len(grid))}")
    zmv = np.array([float(p.zmv) for p in phases])
    return [p.name for p in phases], refs / zmv[:, None], zmv


def _project(config: SimConfig, masses: np.ndarray) -> np.ndarray:
    """(nz, P, n, n) masses -> (nz, angle, translation, P) pixel-unit projections."""
    from tasks.reconstruct import radon

    out = []
    for m in masses:
        s = np.asarray(radon(np.ascontiguousarray(m.transpose(1, 2, 0)), config.angles_deg,
                             center=config.center_of_rotation_px, beam_width=config.beam_width_px),
                       dtype=float)
        exp = (config.n_angles, config.n_translations, m.shape[0])
        if s.shape != exp:
            raise SimulationError(f"radon returned shape {s.shape}, expected {exp}")
        # radon works in float32: zero its round-off (|values| < 1e-6 of the maximum)
        s[s < 1e-6 * max(float(s.max()), 1e-300)] = 0.0
        out.append(s)
    return np.stack(out)


def _scan_order(config: SimConfig):
    nz, na, nt = len(config.z_mm), config.n_angles, config.n_translations
    kk, aa, tt = [], [], []
    line = 0
    for k in range(nz):
        for a in range(na):
            ts = np.arange(nt)
            if config.snake and line % 2:
                ts = ts[::-1]
            kk.append(np.full(nt, k)); aa.append(np.full(nt, a)); tt.append(ts)
            line += 1
    kk, aa, tt = (np.concatenate(x) for x in (kk, aa, tt))
    index = np.empty((nz, na, nt), np.int64)
    index[kk, aa, tt] = np.arange(len(kk))
    return kk, aa, tt, index


def _monitor(n: int, decay: float) -> np.ndarray:
    if n == 1 or decay == 0:
        return np.ones(n)
    k = -math.log(1.0 - decay)
    return np.exp(-k * np.arange(n) / (n - 1))


def _peaks(pattern: np.ndarray, tth: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    inner = (pattern[1:-1] > pattern[:-2]) & (pattern[1:-1] >= pattern[2:])
    i = np.nonzero(inner)[0] + 1
    i = i[(tth[i] > lo) & (tth[i] < hi)]
    if len(i) == 0:
        return np.empty(0), np.empty(0)
    h = pattern[i]
    keep = h > 0.05 * h.max()
    return tth[i[keep]], h[keep]


def _build_ground_truth(config: SimConfig):
    P = len(config.phases)
    base = make_phantom(config, P)
    masses = np.stack([_slice_phantom(base, k) for k in range(len(config.z_mm))])
    return masses


def _gt_arrays(masses, zmv, K, nz):
    wf = _weight_fraction(masses, axis=1)
    scale = K * masses / zmv[None, :, None, None]
    if nz == 1:
        return masses[0], wf[0], scale[0]
    return masses, wf, scale


# ----------------------------------------------------------------------------- writing
def _write_gt(g, *, names, mass, wf, scale, zmv, proj, frame_index, monitor, K, extra: dict,
              config: SimConfig):
    import h5py

    g.attrs["NX_class"] = "NXcollection"
    dims = "phase,y,x" if mass.ndim == 3 else "z,phase,y,x"
    g.create_dataset("phase_names", data=np.array(names, dtype=object), dtype=h5py.string_dtype())
    for key, arr, units, desc in [
        ("mass", mass, "arbitrary mass per voxel", "per-phase mass per voxel"),
        ("weight_fraction", wf, "1", "mass fraction; NaN where no sample"),
        ("scale", scale, "counts per monitor unit per (reference intensity / zmv)",
         "K * mass / zmv: phase scale recovered by pixel-unit FBP of monitor-normalised "
         "patterns + whole-pattern fit; divide by translation_step_mm for a per-mm FBP"),
        ("mass_over_zmv", mass / (zmv.reshape((-1, 1, 1)) if mass.ndim == 3 else zmv.reshape((1, -1, 1, 1))),
         "mass / (amu A^3)", "mass / zmv"),
    ]:
        d = g.create_dataset(key, data=arr, compression="gzip")
        d.attrs["units"] = units
        d.attrs["dims"] = dims
        d.attrs["description"] = desc
    g.create_dataset("zmv", data=zmv).attrs["units"] = "amu*A^3"
    d = g.create_dataset("projected_mass", data=proj, compression="gzip")
    d.attrs["dims"] = "z,angle,translation,phase"
    d.attrs["description"] = "pixel-unit radon projections of mass used for the frames"
    if frame_index is not None:
        g.create_dataset("frame_index", data=frame_index).attrs["dims"] = "z,angle,translation"
    g.create_dataset("monitor", data=monitor)
    g.create_dataset("intensity_scale", data=float(K))
    g.create_dataset("center_of_rotation_px", data=config.center_of_rotation_px)
    g.create_dataset("cor_offset_px", data=config.cor_offset_px)
    g.create_dataset("wavelength_m", data=config.wavelength_m)
    g.create_dataset("translation_step_mm", data=config.translation_step_mm)
    n = config.n_translations
    # tasks.reconstruct orientation: column j at x = j - (n-1)/2, row i at y = (n-1)/2 - i
    ax = (np.arange(n) - (n - 1) / 2) * config.translation_step_mm
    g.create_dataset("y", data=ax[::-1].copy()).attrs["units"] = "mm"
    g.create_dataset("x", data=ax).attrs["units"] = "mm"
    for k, v in extra.items():
        g.create_dataset(k, data=v)
    g.attrs["config"] = config.model_dump_json()
    g.attrs["scale_convention"] = (
        "scale = intensity_scale * mass / zmv per voxel; integrated frame f (solid angle + "
        "polarisation corrected, 2th_deg) = intensity_scale * monitor[f] * (projected_mass[f] "
        "@ patterns_per_mass + air); projections are in pixel-length units, so a pixel-unit "
        "FBP of monitor-normalised, air-subtracted patterns gives sum_p scale_p * ref_p")


def load_ground_truth(path: str | Path) -> dict:
    """Read ``/entry/ground_truth`` of a simulated scan or sinogram file.

    Returns
    -------
    dict
        ``phase_names`` (list of str), ``mass``/``weight_fraction``/``scale``/
        ``mass_over_zmv`` ((phase, y, x) or (z, phase, y, x) float64), ``zmv`` (phase,),
        ``projected_mass`` (z, angle, translation, phase), ``frame_index``
        (z, angle, translation) for frame scans, ``monitor``, ``intensity_scale``,
        ``center_of_rotation_px``, ``cor_offset_px``, ``wavelength_m``,
        ``translation_step_mm``, ``y``/``x`` (mm), ``tth_deg`` + ``patterns_per_mass`` +
        ``air`` (frames) or ``radial`` + ... (sinogram), ``hot_spot_*``, ``config``
        (:class:`SimConfig`).

    Raises
    ------
    SimulationError
        File or group missing.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise SimulationError(f"{path}: file not found")
    with h5py.File(path, "r") as f:
        if "entry/ground_truth" not in f:
            raise SimulationError(f"{path}: no /entry/ground_truth group (not a simulated scan)")
        g = f["entry/ground_truth"]
        out = {}
        for k, d in g.items():
            v = d[()]
            if k == "phase_names":
                v = [x.decode() if isinstance(x, bytes) else str(x) for x in v]
            elif np.ndim(v) == 0:
                v = v.item()
            out[k] = v
        out["config"] = SimConfig.model_validate_json(g.attrs["config"])
    return out


_NOISE_BLOCK = 16


@contextlib.contextmanager
def _removed_on_error(path: Path):
    """Delete a half-written temporary file if the block raises."""
    try:
        yield
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _poisson_blocks(lam: np.ndarray, first_frame: int, seed: int, pool) -> np.ndarray:
    """Poisson samples of ``lam`` (frames, H, W). Each block of ``_NOISE_BLOCK`` frames has
    its own generator seeded by (seed, block number), so the result does not depend on
    the chunking or the number of threads; numpy releases the GIL while sampling."""
    out = np.empty(lam.shape, np.int64)

    def run(i0):
        i1 = min(lam.shape[0], i0 + _NOISE_BLOCK)
        block = (first_frame + i0) // _NOISE_BLOCK
        out[i0:i1] = np.random.default_rng([seed, 0x5EED, block]).poisson(lam[i0:i1])

    if first_frame % _NOISE_BLOCK:
        raise AssertionError("chunks must start on a noise block boundary")
    list(pool.map(run, range(0, lam.shape[0], _NOISE_BLOCK)))
    return out


def _write_poni(ai, path: Path) -> None:
    # pyFAI's Geometry.save appends to an existing file: start from nothing.
    if path.exists():
        path.unlink()
    ai.write(str(path))
    if not path.is_file():
        raise SimulationError(f"{path}: pyFAI could not write the PONI file")


def simulate_calibrant(out_dir: str | Path, config: SimConfig | None = None,
                       calibrant: tuple[str, str] = ("CeO2", "CeO2.cif"), *,
                       counts: float = 2000.0, seed: int | None = None) -> Path:
    """Simulate a calibrant frame in a scan's geometry: ``<out_dir>/calibrant.tif``.

    The detector, distance, wavelength, beam centre, rotations, polarisation and peak
    profile (``config.profile``, the truth an instrument-profile refinement should give
    back) are those of ``config``: integrate the frame with the ``scan.poni`` that
    :func:`simulate_scan` writes for the same config (as at a beamline, where the
    calibrant and the scans share one PONI).

    Parameters
    ----------
    out_dir : str or Path
    config : SimConfig, optional
    calibrant : (name, cif)
        CIF absolute, relative to the working directory or in ``pipelines/phases``.
    counts : float
        Mean counts per unmasked pixel before Poisson noise.
    seed : int, optional
        Noise seed (default ``config.seed``).

    Returns
    -------
    Path
        float32 TIFF (H, W) in counts, module gaps 0.

    Raises
    ------
    SimulationError
        As :func:`simulate_scan` (bad detector, missing CIF).
    """
    import fabio.tifimage

    config = SimConfig() if config is None else config
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ai, ai_native, mask = make_geometry(config)
    tth = _tth_grid(ai, ai_native, config)
    cfg = config.model_copy(update={"phases": [tuple(calibrant)]})
    _names, ppm, _zmv = _phase_patterns(cfg, tth, "2th_deg")
    img = _basis_images(ai, ai_native, cfg, tth, ppm + 0.02 * ppm.max() * air_pattern(tth)[None])[0]
    img *= counts / float(img[~mask].mean())
    rng = np.random.default_rng(config.seed if seed is None else seed)
    frame = rng.poisson(np.clip(img, 0, None)).astype(np.float32)
    frame[mask] = 0.0
    tif = out_dir / "calibrant.tif"
    tmp = out_dir / ".calibrant.tif.part"
    fabio.tifimage.TifImage(data=frame).write(str(tmp))
    os.replace(tmp, tif)
    return tif


def simulate_scan(out_dir: str | Path, config: SimConfig | None = None,
                  progress: Callable[[int, int], None] | None = None) -> SimulatedScan:
    """Simulate a pencil-beam XRD-CT scan and write ``scan.nxs`` + ``scan.poni``.

    Parameters
    ----------
    out_dir : str or Path
        Created if needed. Files: ``scan.nxs`` (layout in the module docstring),
        ``scan.poni`` (pyFAI PONI naming the detector, binning as pixel size), and
        ``scan_mask.edf`` (int8, 1 = masked) when the detector has gaps.
    config : SimConfig, optional
        Default ``SimConfig()``: 48 translations x 72 angles, Eiger1M binned 5x5.
    progress : callable(done_frames, total_frames), optional
        Called after every chunk of frames is written.

    Returns
    -------
    SimulatedScan
        Paths and ground truth (see its attributes; the scale convention is in the module
        docstring).

    Raises
    ------
    SimulationError
        Bad detector/binning, missing CIF or image, inconsistent shapes from the
        projector or the reference patterns.

    Notes
    -----
    Frames are generated ``chunk_frames`` at a time (expectation = coefficients @ basis
    images), so memory does not grow with the number of frames. Writes go to a temporary
    name and are renamed when complete.
    """
    import h5py
    import hdf5plugin

    config = SimConfig() if config is None else config
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)

    ai, ai_native, mask = make_geometry(config)
    H, W = ai.detector.shape
    tth = _tth_grid(ai, ai_native, config)
    names, ppm, zmv = _phase_patterns(config, tth, "2th_deg")
    air = air_pattern(tth)
    basis = _basis_images(ai, ai_native, config, tth, np.vstack([ppm, air[None]]))
    basis[:, mask] = 0.0
    good = ~mask
    nb = basis.shape[0]
    basis_mean = basis[:, good].mean(axis=1)  # (nb,)

    masses = _build_ground_truth(config)
    nz = masses.shape[0]
    proj = _project(config, masses)  # (nz, na, nt, P)
    kk, aa, tt, frame_index = _scan_order(config)
    N = len(kk)
    coeff = proj[kk, aa, tt]  # (N, P)
    sample_mean = coeff @ basis_mean[:-1]
    brightest = float(sample_mean.max())
    if brightest <= 0:
        raise SimulationError("the phantom has no mass in any frame (empty sample)")
    # air level relative to the brightest frame's sample signal
    if config.air_scatter > 0:
        air_fac = config.air_scatter * brightest / basis_mean[-1]
    else:
        air_fac = 0.0
    air = air * air_fac
    basis[-1] *= air_fac
    basis_mean[-1] *= air_fac
    K = config.counts / float((coeff @ basis_mean[:-1] + basis_mean[-1]).max())
    monitor = _monitor(N, config.beam_decay)

    # hot spots: frames with sample, on a reflection ring of a phase present
    tth_px = ai.center_array((H, W), unit="2th_deg", scale=True)
    pix_deg = float(np.degrees(max(ai.detector.pixel1, ai.detector.pixel2) / config.distance_m))
    n_spots = int(rng.poisson(config.hot_spots * N / 100.0)) if config.hot_spots > 0 else 0
    spots = []
    with_sample = np.nonzero(coeff.sum(1) > 1e-6 * coeff.sum(1).max())[0]
    peaks = [_peaks(ppm[p], tth, float(tth_px[good].min()), float(tth_px[good].max()))
             for p in range(len(names))]
    hs = config.hot_spot_size
    r0 = hs // 2
    for _ in range(n_spots if len(with_sample) else 0):
        f = int(rng.choice(with_sample))
        w = coeff[f] * np.array([pk[1].sum() if len(pk[0]) else 0.0 for pk in peaks])
        if w.sum() <= 0:
            continue
        p = int(rng.choice(len(names), p=w / w.sum()))
        pos, hgt = peaks[p]
        t0 = float(rng.choice(pos, p=hgt / hgt.sum()))
        cand = np.argwhere((np.abs(tth_px - t0) < 0.6 * pix_deg) & good)
        cand = cand[(cand[:, 0] >= r0) & (cand[:, 0] < H - (hs - r0) + 1)
                    & (cand[:, 1] >= r0) & (cand[:, 1] < W - (hs - r0) + 1)]
        if len(cand) == 0:
            continue
        r, c = cand[int(rng.integers(len(cand)))]
        spots.append((f, int(r), int(c), t0))
    spots.sort()
    spot_arr = np.array(spots, dtype=[("frame", "i8"), ("row", "i8"), ("col", "i8"),
                                      ("tth_deg", "f8")])

    tr_mm = config.translations_mm[tt]
    rot = config.angles_deg[aa]
    zpos = np.asarray(config.z_mm, float)[kk]

    nexus = out_dir / "scan.nxs"
    tmp = out_dir / ".scan.nxs.part"
    poni = out_dir / "scan.poni"
    mask_path = None
    if mask.any():
        import fabio

        mask_path = out_dir / "scan_mask.edf"
        fabio.edfimage.EdfImage(data=mask.astype(np.int8)).write(str(mask_path))
    _write_poni(ai, poni)

    with _removed_on_error(tmp), h5py.File(tmp, "w") as f:
        f.attrs["default"] = "entry"
        f.attrs["creator"] = "xrdct tasks.simulate"
        e = f.create_group("entry")
        e.attrs["NX_class"] = "NXentry"
        e.attrs["default"] = "data"
        e.create_dataset("title", data="simulated XRD-CT scan")
        e.create_dataset("experiment_identifier", data=config.proposal)
        e.create_dataset("start_time", data=_iso(config.start_time))
        inst = e.create_group("instrument")
        inst.attrs["NX_class"] = "NXinstrument"
        det = inst.create_group("detector")
        det.attrs["NX_class"] = "NXdetector"
        frames = det.create_dataset("data", shape=(N, H, W), dtype=np.uint32,
                                    chunks=(1, H, W), **hdf5plugin.Bitshuffle(cname="lz4"))
        frames.attrs["units"] = "counts"
        det.create_dataset("description", data=config.detector)
        det.create_dataset("x_pixel_size", data=ai.detector.pixel2).attrs["units"] = "m"
        det.create_dataset("y_pixel_size", data=ai.detector.pixel1).attrs["units"] = "m"
        det.create_dataset("distance", data=config.distance_m).attrs["units"] = "m"
        det.create_dataset("pixel_mask", data=mask.astype(np.int32), compression="gzip")
        det.attrs["poni_file"] = poni.name
        mono = inst.create_group("monochromator")
        mono.attrs["NX_class"] = "NXmonochromator"
        mono.create_dataset("wavelength", data=config.wavelength_m * 1e10).attrs["units"] = "angstrom"
        s = e.create_group("sample")
        s.attrs["NX_class"] = "NXsample"
        s.create_dataset("name", data=config.sample_name)
        for key, arr, units in (("rotation_angle", rot, "deg"), ("translation", tr_mm, "mm"),
                                ("z", zpos, "mm")):
            s.create_dataset(key, data=arr.astype(np.float64)).attrs["units"] = units
        mon = e.create_group("monitor")
        mon.attrs["NX_class"] = "NXmonitor"
        mon.create_dataset("data", data=monitor).attrs["units"] = "relative"
        d = e.create_group("data")
        d.attrs["NX_class"] = "NXdata"
        d.attrs["signal"] = "data"
        d.attrs["axes"] = np.array([".", ".", "."], dtype=object)
        d["data"] = frames
        for key in ("rotation_angle", "translation", "z"):
            d[key] = s[key]
            d.attrs[f"{key}_indices"] = 0
        g = e.create_group("ground_truth")
        mass_o, wf_o, scale_o = _gt_arrays(masses, zmv, K, nz)
        _write_gt(g, names=names, mass=mass_o, wf=wf_o, scale=scale_o, zmv=zmv, proj=proj,
                  frame_index=frame_index, monitor=monitor, K=K, config=config,
                  extra={"tth_deg": tth, "patterns_per_mass": ppm, "air": air,
                         "hot_spot_frame": spot_arr["frame"], "hot_spot_row": spot_arr["row"],
                         "hot_spot_col": spot_arr["col"], "hot_spot_tth_deg": spot_arr["tth_deg"]})

        flat_basis = basis.reshape(nb, H * W)
        coeff_all = np.concatenate([coeff, np.ones((N, 1))], axis=1)
        spot_frames = spot_arr["frame"]
        done = 0
        pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
        for start in range(0, N, config.chunk_frames):
            stop = min(N, start + config.chunk_frames)
            lam = (coeff_all[start:stop] @ flat_basis).reshape(stop - start, H, W)
            lam *= (K * monitor[start:stop])[:, None, None]
            lo, hi = np.searchsorted(spot_frames, [start, stop])
            for sp in spot_arr[lo:hi]:
                fr = sp["frame"] - start
                r, c = sp["row"], sp["col"]
                local = lam[fr, r, c]
                sl = (fr, slice(r - r0, r - r0 + hs), slice(c - r0, c - r0 + hs))
                lam[sl] = np.maximum(lam[sl], config.hot_spot_intensity * local)
            lam[:, mask] = 0.0
            if config.noise:
                img = _poisson_blocks(lam, start, config.seed, pool)
            else:
                img = np.rint(lam)
            frames[start:stop] = np.clip(img, 0, np.iinfo(np.uint32).max).astype(np.uint32)
            done = stop
            if progress is not None:
                progress(done, N)
        pool.shutdown()
    os.replace(tmp, nexus)

    mass_o, wf_o, scale_o = _gt_arrays(masses, zmv, K, nz)
    return SimulatedScan(
        nexus_path=nexus, poni_path=poni, mask_path=mask_path, config=config,
        phase_names=names, mass=mass_o, weight_fraction=wf_o, scale=scale_o, zmv=zmv,
        projected_mass=proj, frame_index=frame_index, monitor=monitor, intensity_scale=K,
        tth_deg=tth, patterns_per_mass=ppm, air=air, hot_spots=spot_arr,
        center_of_rotation_px=config.center_of_rotation_px,
        cor_offset_px=config.cor_offset_px, wavelength_m=config.wavelength_m)


# ----------------------------------------------------------------------------- sinogram
def _radial_to_tth(radial: np.ndarray, unit: str, wavelength_m: float) -> np.ndarray:
    from tasks.rietveld import ProfileError, radial_to_two_theta  # noqa: PLC0415

    try:
        return radial_to_two_theta(radial, unit, wavelength_m)
    except ProfileError as err:
        raise SimulationError(f"unit: {err}") from None


def simulate_sinogram_cube(path: str | Path, config: SimConfig | None = None, *,
                           radial: np.ndarray | None = None, unit: str = "2th_deg",
                           npt: int = 500) -> SimulatedSinogram:
    """Project the phantom straight to an integrated sinogram cube and write it as HDF5.

    The cube is what integrating, monitor-normalising the frames of :func:`simulate_scan`
    would give (without the detector's pixel footprint): ``cube[a, t] = K * (P[a, t] @
    ref / zmv + air)`` with Poisson noise at ``config.counts`` mean counts per radial bin in
    the brightest pattern (``noise=True``), divided by the monitor.

    Parameters
    ----------
    path : str or Path
        Output HDF5 file. Layout: ``/entry`` (NXentry, default "data") /``data`` (NXdata,
        ``signal="sinogram"``, ``axes=["angle","translation","radial"]``): ``sinogram``
        (angle, translation, radial) float32, ``sinogram_errors`` (same, Poisson standard
        error), ``angle`` (deg), ``translation`` (mm), ``radial`` (attrs ``units``,
        ``wavelength_m``), ``monitor`` (angle, translation); ``/entry/ground_truth`` as for
        frame scans (with ``radial`` instead of ``tth_deg``).
    config : SimConfig, optional
        Only one slice (``len(z_mm) == 1``). Detector fields set the default radial range.
    radial : ndarray (n_radial,), optional
        Radial grid in ``unit``; default ``npt`` points from 0.5 deg to the detector's
        largest 2theta, converted to ``unit``.
    unit : {"2th_deg", "q_nm^-1", "q_A^-1"}
    npt : int

    Returns
    -------
    SimulatedSinogram

    Raises
    ------
    SimulationError
        Several slices, bad unit, missing CIF.
    """
    import h5py

    config = SimConfig() if config is None else config
    if len(config.z_mm) != 1:
        raise SimulationError("SimConfig.z_mm: simulate_sinogram_cube writes one slice; "
                              f"got {len(config.z_mm)} z positions")
    if unit not in ("2th_deg", "q_nm^-1", "q_A^-1"):
        raise SimulationError(f"unit: {unit!r} is not one of 2th_deg, q_nm^-1, q_A^-1")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    if radial is None:
        ai, ai_native, _ = make_geometry(config)
        tmax = float(_tth_grid(ai, ai_native, config)[-1]) / 1.02
        tth = np.linspace(0.5, tmax, npt)
        if unit == "2th_deg":
            radial = tth
        else:
            q = 4 * np.pi * np.sin(np.radians(tth) / 2) / (config.wavelength_m * 1e9)
            radial = q if unit == "q_nm^-1" else q / 10
    radial = np.asarray(radial, float)
    if radial.ndim != 1 or len(radial) < 2 or np.any(np.diff(radial) <= 0):
        raise SimulationError("radial: a 1D increasing grid of at least 2 points is expected")
    # Patterns are intensities per solid angle as pyFAI integration returns them in any
    # unit: the 2theta reference evaluated at each bin's 2theta (no Jacobian d2th/dq).
    tth_r = _radial_to_tth(radial, unit, config.wavelength_m)
    names, ppm, zmv = _phase_patterns(config, tth_r, "2th_deg")
    air = air_pattern(tth_r)
    masses = _build_ground_truth(config)
    proj = _project(config, masses)
    pm = proj[0]  # (na, nt, P)
    sample = pm @ ppm  # (na, nt, R)
    brightest = float(sample.mean(-1).max())
    if brightest <= 0:
        raise SimulationError("the phantom has no mass in any projection (empty sample)")
    air = air * (config.air_scatter * brightest / air.mean() if config.air_scatter > 0 else 0.0)
    clean = sample + air
    K = config.counts / float(clean.mean(-1).max())
    _, _, _, frame_index = _scan_order(config)
    monitor = _monitor(frame_index.size, config.beam_decay)[frame_index[0]]  # (na, nt)
    lam = K * clean * monitor[..., None]
    if config.noise:
        cnt = rng.poisson(lam).astype(float)
    else:
        cnt = lam
    cube = cnt / monitor[..., None]
    err = np.sqrt(np.maximum(cnt, 1.0)) / monitor[..., None]

    tmp = path.with_name("." + path.name + ".part")
    with _removed_on_error(tmp), h5py.File(tmp, "w") as f:
        f.attrs["default"] = "entry"
        e = f.create_group("entry")
        e.attrs["NX_class"] = "NXentry"
        e.attrs["default"] = "data"
        e.create_dataset("experiment_identifier", data=config.proposal)
        e.create_dataset("start_time", data=_iso(config.start_time))
        e.create_group("sample").create_dataset("name", data=config.sample_name)
        d = e.create_group("data")
        d.attrs["NX_class"] = "NXdata"
        d.attrs["signal"] = "sinogram"
        d.attrs["axes"] = np.array(["angle", "translation", "radial"], dtype=object)
        ds = d.create_dataset("sinogram", data=cube.astype(np.float32),
                              chunks=(config.n_angles, config.n_translations, min(64, len(radial))),
                              compression="gzip")
        ds.attrs["axes_order"] = "angle,translation,radial"
        ds.attrs["units"] = "counts / monitor"
        d.create_dataset("sinogram_errors", data=err.astype(np.float32), compression="gzip")
        d.create_dataset("angle", data=config.angles_deg).attrs["units"] = "deg"
        d.create_dataset("translation", data=config.translations_mm).attrs["units"] = "mm"
        r = d.create_dataset("radial", data=radial)
        r.attrs["units"] = unit
        r.attrs["unit"] = unit
        r.attrs["wavelength_m"] = config.wavelength_m
        d.create_dataset("monitor", data=monitor)
        d.attrs["radial_unit"] = unit
        d.attrs["wavelength_m"] = config.wavelength_m
        g = e.create_group("ground_truth")
        mass_o, wf_o, scale_o = _gt_arrays(masses, zmv, K, 1)
        _write_gt(g, names=names, mass=mass_o, wf=wf_o, scale=scale_o, zmv=zmv, proj=proj,
                  frame_index=None, monitor=monitor, K=K, config=config,
                  extra={"radial": radial, "patterns_per_mass": ppm, "air": air,
                         "sinogram_clean": (K * clean).astype(np.float64)})
        g["radial"].attrs["units"] = unit
    os.replace(tmp, path)
    mass_o, wf_o, scale_o = _gt_arrays(masses, zmv, K, 1)
    return SimulatedSinogram(
        path=path, config=config, phase_names=names, mass=mass_o, weight_fraction=wf_o,
        scale=scale_o, zmv=zmv, projected_mass=proj, intensity_scale=K, radial=radial,
        radial_unit=unit, patterns_per_mass=ppm, air=air, sinogram_clean=K * clean,
        center_of_rotation_px=config.center_of_rotation_px,
        cor_offset_px=config.cor_offset_px, wavelength_m=config.wavelength_m)


# ----------------------------------------------------------------------------- presets
PRESETS: dict[str, dict] = {
    # The built-in demo scan of `xrdct demo`: a catalyst-bed slice, 3456 frames.
    "demo": {},
    # A quick scan for tests: 24 translations x 36 angles (864 frames).
    "small": {"n_translations": 24, "n_angles": 36},
    "catalyst": {},
    "battery": {"phases": BATTERY_PHASES},
}


def preset(name: str) -> SimConfig:
    """A named simulator configuration (``demo``, ``small``, ``catalyst``, ``battery``).

    Raises
    ------
    SimulationError
        Unknown preset name.
    """
    if name not in PRESETS:
        raise SimulationError(f"preset: unknown simulator preset {name!r}; expected one of {sorted(PRESETS)}")
    return SimConfig(**PRESETS[name])
