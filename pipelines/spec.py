"""Pipeline specifications: pydantic-validated YAML with a schema version.

A spec says what to do with a scan, stage by stage. It is what a product records in its
provenance and what reprocessing replays, so every field has a default that is written out
in full by :func:`PipelineSpec.canonical_json`.

Errors
------
:class:`SpecError` (a ``ValueError``) names the spec file and the offending field, for
unknown keys, wrong types, impossible values and files that do not exist.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.reconstruct import FILTER_CHOICES

SCHEMA_VERSION = 1
PIPELINES_DIR = Path(__file__).resolve().parent
PHASES_DIR = PIPELINES_DIR / "phases"

RadialUnit = Literal["q_nm^-1", "q_A^-1", "2th_deg"]


class SpecError(ValueError):
    """A pipeline spec that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputSpec(_Strict):
    """Where the scan's data live inside the input file(s).

    ``kind`` ``auto`` picks ``nexus`` for ``.h5/.hdf5/.nxs`` files holding frames,
    ``sinogram`` for HDF5 files holding an integrated cube, and ``image_series`` for a
    scan table (``.csv``/``.tsv``) listing one detector image per row.
    Dataset paths left as ``None`` are found through NeXus attributes
    (``NX_class``, ``signal``, ``axes``) or the conventional names.
    """

    kind: Literal["auto", "nexus", "image_series", "sinogram"] = "auto"
    frames: str | None = None
    angle: str | None = None
    translation: str | None = None
    z: str | None = None
    monitor: str | None = None
    sinogram: str | None = None
    # For sinogram input: the axis order of the stored dataset (None: the file's NXdata
    # @axes, else angle,translation[,radial], checked against the data by
    # tasks.ingest.open_sinogram) and the unit of its radial axis (None: from the radial
    # dataset's @units or name, else an error naming the dataset).
    sinogram_axes: Literal["angle,translation", "angle,translation,radial",
                           "translation,angle", "translation,angle,radial",
                           "radial,angle,translation"] | None = None
    radial_unit: RadialUnit | None = None
    # X-ray range, 0.01 .. 100 Angstrom (as flows.process.WAVELENGTH_RANGE_M): refuses 0,
    # a negative value and Angstrom written as metres
    wavelength_m: float | None = Field(default=None, ge=1e-12, le=1e-8)
    angle_range_deg: float | None = Field(
        default=None, gt=0, le=360,
        description="for sinogram input without an angle dataset: the scan's angular range")
    translation_step_mm: float | None = Field(
        default=None, gt=0,
        description="for sinogram input without a translation dataset: the step in mm "
                    "(None: coordinates in translation steps, units px)")


class CalibrationSpec(_Strict):
    """Detector geometry and corrections, as pyFAI applies them."""

    poni: str | None = None
    mask: str | None = None
    dark: str | None = None
    flat: str | None = None
    polarization_factor: float | None = Field(default=0.99, ge=-1, le=1)
    solid_angle: bool = True


class IntegrationSpec(_Strict):
    """Radial integration (pyFAI CSR matrix applied to batches of frames)."""

    unit: RadialUnit = "q_nm^-1"
    npt: int = Field(default=1000, ge=8, le=100_000)
    radial_range: tuple[float, float] | None = None
    method: Literal["mean", "sigma_clip", "trimmed_mean"] = "mean"
    sigma_clip_threshold: float = Field(default=4.0, gt=0)
    sigma_clip_max_iter: int = Field(default=5, ge=1, le=100)
    trimmed_mean_quantiles: tuple[float, float] = (0.0, 0.9)
    # poisson: variance = counts; azimuthal: variance from the spread of the pixels of a
    # ring (pyFAI error_model="azimuthal"), robust when strong single-crystal spots would
    # inflate a Poisson-model sigma clip; none: no standard errors.
    error_model: Literal["poisson", "azimuthal", "none"] = "poisson"
    batch_frames: int = Field(default=256, ge=1)

    @field_validator("radial_range")
    @classmethod
    def _range_increasing(cls, v):
        if v is not None and not v[0] < v[1]:
            raise ValueError(f"radial_range must be (min, max) with min < max, got {v}")
        return v

    @field_validator("trimmed_mean_quantiles")
    @classmethod
    def _quantiles(cls, v):
        if not 0 <= v[0] < v[1] <= 1:
            raise ValueError(f"trimmed_mean_quantiles must satisfy 0 <= lo < hi <= 1, got {v}")
        return v


class SinogramSpec(_Strict):
    """Sinogram corrections before reconstruction."""

    scale_per_angle: bool = True
    air_columns: int = Field(default=2, ge=0, description="outer translation columns per side used as air")
    center: Literal["auto"] | float | None = "auto"
    center_method: Literal["auto", "moment", "vo", "correlation"] = "auto"


class IterativeSpec(_Strict):
    """Options of the iterative reconstructions (``reconstruction.method`` sirt, cgls or
    tv; tasks.iterative). ``n_iter`` None = the method's default (SIRT 100, CGLS 20,
    TV 200); the ``lam_*``, ``loss``, ``optimizer``, ``lr`` and ``angle_batch`` fields
    apply to ``tv`` only."""

    n_iter: int | None = Field(default=None, ge=1, le=100_000)
    lam_tv: float = Field(default=0.01, ge=0, description="total-variation weight (image / bin mean)")
    lam_l1: float = Field(default=0.0, ge=0, description="L1 weight (image / bin mean)")
    loss: Literal["gaussian", "poisson"] = "gaussian"
    optimizer: Literal["adam", "lbfgs"] = "adam"
    lr: float = Field(default=0.1, gt=0, le=10, description="Adam learning rate (image / bin mean)")
    angle_batch: int | None = Field(default=None, ge=1, description="angles per Adam step; None = all")

    @model_validator(mode="after")
    def _lbfgs_full_batch(self):
        if self.optimizer == "lbfgs" and self.angle_batch is not None:
            raise ValueError("angle_batch: L-BFGS uses all angles; leave angle_batch unset")
        return self

    def options(self, method: str) -> dict:
        """Keyword arguments of ``tasks.iterative.reconstruct`` for ``method``."""
        out = {} if self.n_iter is None else {"n_iter": self.n_iter}
        if method == "tv":
            out.update(lam_tv=self.lam_tv, lam_l1=self.lam_l1, loss=self.loss,
                       optimizer=self.optimizer, lr=self.lr, angle_batch=self.angle_batch)
        return out


class GanSpec(_Strict):
    """Self-supervised GAN reconstruction (``reconstruction.method: gan``; tasks.gan,
    GANrec of Yang et al. 2020). Nothing is trained beforehand; ``n_iter`` Adam steps per
    channel fit the networks to each slice."""

    start: Literal["fbp", "sinogram"] = Field(
        default="fbp", description="generator input: the FBP image (residual) or the sinogram")
    n_iter: int = Field(default=300, ge=1, le=100_000)
    lr: float = Field(default=1e-3, gt=0, le=1.0, description="generator learning rate (Adam)")
    lam_data: float = Field(default=100.0, ge=0, description="weight of the L1 data term")
    channels: list[int] | None = Field(
        default=None, description="radial-bin indices to reconstruct (None = all bins)")
    seed: int = Field(default=0, ge=0, description="network initialisation seed")

    @field_validator("channels")
    @classmethod
    def _channels(cls, v):
        if v is not None and (not v or min(v) < 0 or len(set(v)) != len(v)):
            raise ValueError(f"expected a non-empty list of distinct bin indices >= 0, got {v}")
        return v

    def options(self) -> dict:
        """Keyword arguments of ``tasks.gan.gan_reconstruct``."""
        return {"start": self.start, "n_iter": self.n_iter, "lr": self.lr,
                "lam_data": self.lam_data, "channels": self.channels, "seed": self.seed}


class CnnSpec(_Strict):
    """The learned reconstruction (``reconstruction.method: cnn``; tasks.cnn): which model of
    the catalog, the out-of-distribution threshold and what to do beyond it."""

    model: str = Field(default="cnn", min_length=1, description="model name in the catalog")
    version: int | None = Field(default=None, ge=1, description="None = the promoted version")
    ood_threshold: float | None = Field(default=None, gt=0,
                                        description="override of the model's own threshold")
    fallback: Literal["fbp", "error", "none"] = "fbp"


class ReconstructionSpec(_Strict):
    """Reconstruction of every radial bin of a slice."""

    enabled: bool = True
    method: Literal["fbp", "sirt", "cgls", "tv", "gan", "cnn"] = "fbp"
    backend: Literal["auto", "numpy", "astra", "tomopy"] = "numpy"
    filter: Literal[FILTER_CHOICES] = Field(
        default="auto",
        description="FBP filter (astra-toolbox's names), or auto: the one with the least "
                    "expected image error for the sinogram's estimated noise "
                    "(tasks.reconstruct.choose_filter; the choice, the noise estimate and why "
                    "are recorded in the product)")
    cutoff: float = Field(default=1.0, gt=0, le=1,
                          description="fraction of the Nyquist frequency where an explicit "
                                      "filter ends (astra's FilterD); auto chooses its own")
    clip_negative: bool = False
    circle: bool = True
    iterative: IterativeSpec = Field(default_factory=IterativeSpec)
    gan: GanSpec = Field(default_factory=GanSpec)
    cnn: CnnSpec = Field(default_factory=CnnSpec)


class PhaseSpec(_Strict):
    """A crystalline phase, defined by a CIF file (absolute, relative to the spec, or in
    ``pipelines/phases``)."""

    name: str = Field(min_length=1)
    cif: str


class ProfileSpec(_Strict):
    """Pseudo-Voigt peak profile; Caglioti FWHM^2 = U tan^2(th) + V tan(th) + W in deg^2 of 2theta."""

    U: float = 0.0
    V: float = 0.0
    W: float = Field(default=0.0025, gt=0)
    eta: float = Field(default=0.5, ge=0, le=1)
    zero_shift_deg: float = 0.0


PROFILE_KEYS = tuple(ProfileSpec.model_fields)  # U, V, W, eta, zero_shift_deg


class RefineSpec(_Strict):
    """Whole-pattern refinement of every voxel (``mapping.method: refine``; tasks.refine).

    Which non-linear parameters are refined besides the scales and the background, their
    bounds, the reflection window and the iteration limit."""

    lattice: bool = True
    size: bool = True
    strain: bool = True
    zero_shift: bool = False
    lattice_bound: float = Field(default=0.01, gt=0, lt=0.5,
                                 description="cells stay within (1 +- this) of the CIF values")
    size_min_nm: float = Field(default=20.0, gt=0, description="smallest crystallite size (nm)")
    strain_max: float = Field(default=2e-3, gt=0, description="largest microstrain")
    zero_bound_deg: float = Field(default=0.05, gt=0)
    window_fwhm: float = Field(default=6.0, gt=0, description="reflection support in FWHM")
    max_iter: int = Field(default=40, ge=1, le=1000)
    chunk_voxels: int = Field(default=256, ge=1)
    seed_weak_from_neighbours: bool = Field(
        default=False, description="refit weak voxels from their neighbours' cells (tasks.refine.refine_seeded)")


class MappingSpec(_Strict):
    """Rietveld-style mapping: per-voxel scale factors against reference phase patterns
    (``method: scales``, batched NNLS) or whole-pattern refinement of every voxel
    (``method: refine``: scales, cells, size, strain; see :class:`RefineSpec`).

    ``profile`` is the instrument profile: explicit values (:class:`ProfileSpec`) or
    ``calibration``, the newest profile the catalog holds for the scan's PONI (refined
    from a calibrant by ``xrdct profile``); its key is then an input of the product id."""

    enabled: bool = True
    method: Literal["scales", "refine"] = "scales"
    phases: list[PhaseSpec] = Field(default_factory=list)
    profile: ProfileSpec | Literal["calibration"] = Field(
        default_factory=ProfileSpec,
        description='instrument profile: U, V, W, eta, zero_shift_deg, or "calibration": the '
                    "newest profile stored for the PONI by `xrdct profile` (flows.calibrate)")
    background_order: int = Field(default=4, ge=0, le=20)
    min_total_intensity: float = Field(
        default=0.02, ge=0, description="voxels below this fraction of the brightest are masked")
    refine: RefineSpec = Field(default_factory=RefineSpec)

    @model_validator(mode="after")
    def _unique_names(self):
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique, got {names}")
        if self.enabled and not self.phases:
            raise ValueError("mapping is enabled but no phases are listed")
        return self


class SuperResolutionSpec(_Strict):
    """Super-resolution of the per-phase chemical maps (tasks.superres).

    ``method``: ``bilinear``/``bicubic`` interpolation, ``guided`` (guided-filter
    upsampling, no training) or a ``single``/``dual``-input network. ``guided`` and
    ``dual`` need ``guide``: ``from_data`` (the total-scattering image of the
    reconstructed volume, :func:`tasks.superres.absorption_from_xrdct`; on the
    reconstruction grid, so it adds no detail finer than the chemical maps) or the path of
    a TIFF/HDF5 absorption-contrast (micro-CT) image registered to the slice at ``factor``
    times the reconstruction grid. ``single`` and ``dual`` need ``model`` (a file written
    by :func:`tasks.superres.save_model`)."""

    enabled: bool = False
    factor: Literal[2, 4] = 2
    method: Literal["bilinear", "bicubic", "guided", "single", "dual"] = "bicubic"
    model: str | None = None
    guide: str | None = Field(default=None, description='"from_data" or a TIFF/HDF5 image path')

    @model_validator(mode="after")
    def _needs(self):
        if self.enabled and self.method in ("single", "dual") and not self.model:
            raise ValueError(f"superres.model: method {self.method!r} needs a trained model file")
        if self.enabled and self.method in ("guided", "dual") and not self.guide:
            raise ValueError(f'superres.guide: method {self.method!r} needs a guide ("from_data" or an image path)')
        return self


class OutputSpec(_Strict):
    compressor_level: int = Field(default=3, ge=1, le=22)
    overview_png: bool = True


class PipelineSpec(_Strict):
    """A whole pipeline: what each stage does. Loaded by :func:`load_spec`."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(default="default", min_length=1)
    description: str = ""
    input: InputSpec = Field(default_factory=InputSpec)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    integration: IntegrationSpec = Field(default_factory=IntegrationSpec)
    sinogram: SinogramSpec = Field(default_factory=SinogramSpec)
    reconstruction: ReconstructionSpec = Field(default_factory=ReconstructionSpec)
    mapping: MappingSpec = Field(default_factory=lambda: MappingSpec(enabled=False))
    superres: SuperResolutionSpec = Field(default_factory=SuperResolutionSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    # Array backend of the kernels (integration, FBP): cpu (numpy), gpu (cupy; an error
    # when no CUDA device is present) or auto (gpu when cupy imports and sees a device).
    # Not to be confused with reconstruction.backend, the FBP implementation.
    backend: Literal["cpu", "gpu", "auto"] = "auto"
    # Directory that relative paths in the spec are resolved against (not serialised).
    base_dir: str | None = Field(default=None, exclude=True)
    # The file the spec was read from, named in error messages (not serialised).
    source: str | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _superres_needs_maps(self):
        if self.superres.enabled and not self.mapping.enabled:
            raise ValueError("superres.enabled: super-resolution works on the per-phase chemical "
                             "maps; enable mapping (mapping.enabled with phases) or disable superres")
        return self

    def resolve(self, path: str | None) -> Path | None:
        """Resolve a path named in the spec: absolute, relative to the spec file, or a
        file shipped in ``pipelines/`` (``phases/...``)."""
        if path is None:
            return None
        p = Path(path).expanduser()
        if p.is_absolute():
            return p
        for root in ([Path(self.base_dir)] if self.base_dir else []) + [Path.cwd(), PIPELINES_DIR, PHASES_DIR]:
            cand = root / p
            if _is(cand, "exists"):
                return cand.resolve()
        return (Path(self.base_dir) / p) if self.base_dir else p

    def phase_paths(self) -> list[Path]:
        """The CIF path of each phase, resolved; raises SpecError if one is missing."""
        out = []
        for i, ph in enumerate(self.mapping.phases):
            p = self.resolve(ph.cif)
            if p is None or not _is(p, "is_file"):
                raise SpecError(f"{self.source or '<spec>'}: mapping.phases[{i}].cif: "
                                f"CIF file {ph.cif!r} for phase {ph.name!r} not found")
            out.append(p)
        return out

    def canonical_json(self) -> str:
        """Deterministic JSON of every field (defaults included): the spec's identity."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def _is(p: Path, test: str) -> bool:
    """``p.exists()`` / ``p.is_file()`` that answer False for names the OS refuses (a NUL
    byte, longer than NAME_MAX) instead of raising ValueError/OSError."""
    try:
        return getattr(p, test)()
    except (OSError, ValueError):
        return False


def _format_errors(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid pipeline spec ({err.error_count()} problem(s))"]
    for e in err.errors():
        # keys that are not names (spaces, newlines, empty) are quoted, so the field stays legible
        loc = ".".join(str(x) if isinstance(x, int) or str(x).isidentifier() else repr(x)
                       for x in e["loc"]) or "<top level>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (not part of schema version {SCHEMA_VERSION})")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {loc}: {e['msg']}{got_s}")
    return "\n".join(lines)


def parse_spec(data: dict, source: str = "<spec>", base_dir: str | Path | None = None) -> PipelineSpec:
    """Validate a spec given as a mapping; raises :class:`SpecError` naming ``source``."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a pipeline spec must be a YAML mapping, got {type(data).__name__}")
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_errors(source, err)) from None
    spec.base_dir = str(base_dir) if base_dir is not None else None
    spec.source = source
    if spec.mapping.enabled:
        spec.phase_paths()
    return spec


def load_spec(path: str | Path | None = None) -> PipelineSpec:
    """Load a pipeline spec from YAML (safe loader).

    Parameters
    ----------
    path : str or Path or None
        A YAML file, or the name of a shipped spec (``default``, ``battery``, ``catalyst``,
        ``demo``). ``None`` gives ``default``.

    Raises
    ------
    SpecError
        File missing, not YAML, unknown keys, wrong types, impossible values, missing CIFs.
    """
    if path is None:
        path = "default"
    p = Path(path)
    if not p.exists() and (PIPELINES_DIR / f"{path}.yaml").exists():
        p = PIPELINES_DIR / f"{path}.yaml"
    if not p.is_file():
        shipped = sorted(x.stem for x in PIPELINES_DIR.glob("*.yaml"))
        raise SpecError(f"{path}: pipeline spec not found (a YAML file, or one of {shipped})")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{p}: not valid YAML: {err}") from None
    return parse_spec(data, source=str(p), base_dir=p.resolve().parent)
