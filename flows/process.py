"""The main job: one scan in, one chemical-image product out, as a Prefect flow.

``process_scan`` chains coarse Prefect tasks (ingest, integrate, sinogram, reconstruct,
mapping, publish). Tasks pass the path of the product's work store, never arrays; the
chunk-level parallelism inside a task is Dask's (a LocalCluster by default, or an existing
cluster given by address). Runs with no Prefect server configured (ephemeral API).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field

from flows import progress
from pipelines.spec import (PIPELINES_DIR, PROFILE_KEYS, PipelineSpec, ProfileSpec, SpecError, load_spec,
                            parse_spec)
from tasks import store


class ProcessingError(RuntimeError):
    """A stage could not produce its output; the message names the stage and input."""


class ClusterUnreachableError(ProcessingError):
    """The Dask scheduler named by ``--dask-address`` (``cluster``) cannot be reached."""


@dataclass
class Request:
    """Everything that defines a product (JSON-serialisable, passed between tasks)."""

    scan: str
    spec_json: str
    spec_base_dir: str | None
    poni: str | None
    out: str
    product_id: str = ""
    inputs: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    # The stored instrument profile (``key``, ``calibrant``, ``U, V, W, eta,
    # zero_shift_deg``) when the spec's ``mapping.profile`` is ``calibration``
    profile: dict = field(default_factory=dict)
    # Token of the work store this request builds in (set under the product lock by
    # :func:`open_work`); part of the Prefect cache keys, so a cache entry never outlives
    # the work store it describes.
    work_token: str = ""

    @property
    def spec(self) -> PipelineSpec:
        spec = parse_spec(json.loads(self.spec_json), source="<request>", base_dir=self.spec_base_dir)
        if self.poni:
            spec.calibration.poni = self.poni
        if spec.mapping.profile == "calibration" and self.profile:
            spec.mapping.profile = ProfileSpec(**{k: self.profile[k] for k in PROFILE_KEYS})
        return spec

    @property
    def work(self) -> Path:
        return store.work_path(self.out, self.product_id)

    @property
    def lock(self) -> Path:
        return Path(self.out) / ".locks" / f"{self.product_id}.lock"

    def discard_work(self) -> None:
        """Remove everything this request built and did not publish: the work store, the
        stages' kept slices (:class:`SliceCheckpoints`) and the PNG and run record drawn
        beside the work store before publishing."""
        shutil.rmtree(self.work, ignore_errors=True)
        for d in self.work.parent.glob(f"{self.work.stem}.*.slices"):
            shutil.rmtree(d, ignore_errors=True)
        for suffix in (".png", ".run.json"):
            self.work.with_suffix(suffix).unlink(missing_ok=True)

    @property
    def final(self) -> Path:
        return store.published_path(self.out, self.product_id)


def _poni_path(req_poni: str | None, spec: PipelineSpec) -> Path | None:
    p = Path(req_poni) if req_poni else spec.resolve(spec.calibration.poni)
    if p is not None and not p.is_file():
        raise SpecError(f"calibration.poni: PONI file {str(p)!r} not found")
    return p


#: Physical ranges checked before any work starts (:func:`check_poni_physics`): a sample-to-
#: detector distance of 1 mm .. 100 m (XRD-CT setups use 0.1 .. 3 m; the range only rejects
#: a sign error, a zero or a unit slip such as mm written as m) and an X-ray wavelength of
#: 1e-12 .. 1e-8 m (0.01 .. 100 Angstrom, 1.24 MeV .. 124 eV: rejects 0, a negative value and
#: Angstrom written as metres, e.g. 0.1746).
DISTANCE_RANGE_M = (1e-3, 100.0)
WAVELENGTH_RANGE_M = (1e-12, 1e-8)


def check_poni_physics(poni: str | Path) -> None:
    """Check the distance and wavelength of a pyFAI PONI file against the ranges X-ray
    diffraction can have (:data:`DISTANCE_RANGE_M`, :data:`WAVELENGTH_RANGE_M`), reading
    only its ``Distance:`` and ``Wavelength:`` lines (cheap: no pyFAI import).

    Raises
    ------
    pipelines.spec.SpecError
        A value outside its range or not a number; the message names the file, the field
        and the expected range. A PONI without these lines passes (pyFAI reading it later
        says what is wrong).
    """
    try:
        lines = Path(poni).read_text(errors="replace").splitlines()
    except OSError:
        return
    fields = {}
    for ln in lines:
        if ":" in ln and not ln.lstrip().startswith("#"):
            k, v = ln.split(":", 1)
            fields[k.strip().lower()] = v.strip()
    for key, (lo, hi), what in (("distance", DISTANCE_RANGE_M, "sample-to-detector distance"),
                                ("wavelength", WAVELENGTH_RANGE_M, "X-ray wavelength")):
        if key not in fields:
            continue
        raw = fields[key]
        try:
            v = float(raw)
        except ValueError:
            raise SpecError(f"calibration.poni: {poni}: {key.capitalize()} {raw!r} is not a "
                            f"number; expected the {what} in metres, {lo:g} .. {hi:g} m") from None
        if not (np.isfinite(v) and lo <= v <= hi):
            hint = ""
            if key == "wavelength" and 1e-2 <= abs(v) <= 1e2:
                hint = f" (Angstrom written as metres? {v} A = {v * 1e-10:g} m)"
            elif key == "distance" and 1 <= v <= 1e4:
                hint = f" (mm written as metres? {v} mm = {v * 1e-3:g} m)"
            raise SpecError(f"calibration.poni: {poni}: {key.capitalize()} {raw} m is outside "
                            f"the range of X-ray diffraction{hint}; expected the {what} in "
                            f"metres, {lo:g} .. {hi:g} m")


def make_request(scan: str | Path, pipeline: str | Path | PipelineSpec | None = None,
                 poni: str | Path | None = None, out: str | Path = "xrdct-out") -> Request:
    """Validate the inputs, checksum them and compute the product's content address.

    Every path (``scan``, ``poni``, ``pipeline`` when it is a YAML path, ``out``, and the
    PONI, mask, dark, flat and CIF files the spec names) is confined to the data roots of
    ``XRDCT_DATA_ROOTS`` when that is set (:mod:`flows.paths`).

    Raises
    ------
    SpecError
        Spec invalid, or a file it names (PONI, mask, CIF) missing.
    FileNotFoundError
        The scan does not exist.
    flows.paths.PathNotAllowedError
        A path outside the data roots, or with a ``..`` component (only with data roots).
    """
    from flows.paths import confine, confine_pipeline
    from tasks.ingest import TABLE_SUFFIXES, file_checksum

    spec = pipeline if isinstance(pipeline, PipelineSpec) else load_spec(confine_pipeline(pipeline))
    scan = confine(scan, "scan")
    if not scan.exists():
        raise FileNotFoundError(f"{scan}: scan not found")
    out = confine(out, "out")
    poni_p = _poni_path(str(confine(poni, "poni")) if poni else None, spec)
    if poni_p is not None and not poni:
        poni_p = confine(poni_p, "calibration.poni", extra_roots=[PIPELINES_DIR])
    for folder in (".work", ".locks"):  # written like outputs, so confined like them
        confine(out / folder, f"out ({folder} folder)")
    if poni_p is not None:
        check_poni_physics(poni_p)
    inputs = {scan.name: file_checksum(scan)} if scan.is_file() else {}
    if scan.is_file() and scan.suffix.lower() not in TABLE_SUFFIXES:
        # files an HDF5 scan reads through external links, virtual datasets and external
        # storage: confined like the scan, and their content is part of the product id
        from tasks.ingest import hdf5_linked_files

        for f, via in hdf5_linked_files(scan):
            confine(f, f"scan: {scan}: {via}")
            inputs[f"{scan.name} -> {f}"] = file_checksum(f)
    if scan.suffix.lower() in TABLE_SUFFIXES:
        from flows.paths import confine_table_files
        from tasks.ingest import open_scan

        confine_table_files(scan)
        for f in open_scan(scan, spec.input).files:
            inputs[os.path.relpath(f, scan.parent)] = file_checksum(f)
    calib = {}
    for role, p in (("poni", poni_p), ("mask", spec.resolve(spec.calibration.mask)),
                    ("dark", spec.resolve(spec.calibration.dark)),
                    ("flat", spec.resolve(spec.calibration.flat))):
        if p is not None:
            if not Path(p).is_file():
                raise SpecError(f"calibration.{role}: file {str(p)!r} not found")
            if role != "poni":
                confine(p, f"calibration.{role}", extra_roots=[PIPELINES_DIR])
            calib[role] = file_checksum(p)
    if spec.mapping.enabled:
        seen = {}
        for i, (ph, p) in enumerate(zip(spec.mapping.phases, spec.phase_paths())):
            confine(p, f"mapping.phases[{i}].cif", extra_roots=[PIPELINES_DIR])
            calib[f"phase:{ph.name}"] = file_checksum(p)
            j = seen.setdefault(calib[f"phase:{ph.name}"], i)
            if j != i:
                raise SpecError(f"mapping.phases[{i}].cif: {p} (phase {ph.name!r}) is the same "
                                f"file content as mapping.phases[{j}].cif "
                                f"({spec.mapping.phases[j].name!r}); two phases with one "
                                f"structure cannot be told apart: expected distinct structures")
    sr = spec.superres
    if sr.enabled:
        for role, name in (("model", sr.model), ("guide", None if sr.guide == "from_data" else sr.guide)):
            if name:
                p = spec.resolve(name)
                if not Path(p).is_file():
                    raise SpecError(f"superres.{role}: file {str(p)!r} not found")
                confine(p, f"superres.{role}", extra_roots=[PIPELINES_DIR])
                calib[f"superres_{role}"] = file_checksum(p)
    r = spec.reconstruction
    if r.enabled and r.method == "cnn":  # the model's weights are an input of the product
        row = _cnn_model_row(out, r.cnn)
        calib[f"model:{row.name}"] = row.sha256
    profile = {}
    if spec.mapping.enabled and spec.mapping.profile == "calibration":
        profile = _stored_profile(out, poni_p, calib.get("poni"))
        calib["instrument_profile"] = profile["key"]
    req = Request(scan=str(scan), spec_json=spec.canonical_json(), spec_base_dir=spec.base_dir,
                  poni=str(poni_p) if poni_p else None, out=str(Path(out).resolve()),
                  inputs=inputs, calibration=calib, profile=profile)
    req.product_id = store.product_id(req.spec_json, inputs, calib)
    return req


def _cnn_model_row(out, c):
    """The catalog row of the CNN model a spec asks for (``reconstruction.cnn``: name and
    version, None = promoted) in the catalog of ``out``; SpecError naming the field when
    there is none."""
    from catalog.db import Catalog

    cat = Catalog.for_products(out)
    row = cat.promoted_model(c.model) if c.version is None else cat.model(c.model, c.version)
    if row is None:
        which = "promoted version" if c.version is None else f"version {c.version}"
        raise SpecError(f"reconstruction.cnn.model: the catalog of {out} has no {which} of model "
                        f"{c.model!r} (train one: xrdct train --out {out})")
    return row


def _stored_profile(out, poni: Path | None, poni_checksum: str | None) -> dict:
    """The newest instrument profile the catalog of ``out`` holds for the PONI
    (``mapping.profile: calibration``), as ``{"key", "calibrant", "rwp", U, V, W, eta,
    zero_shift_deg}``; SpecError naming the field and the PONI when there is none."""
    from catalog.db import Catalog

    if poni is None or not poni_checksum:
        raise SpecError("mapping.profile: 'calibration' needs a PONI (calibration.poni or "
                        "--poni) to find the instrument profile stored with it")
    cat = Catalog.for_products(out)
    try:
        row = cat.instrument_profile(poni_checksum)
    finally:
        cat.dispose()
    if row is None:
        raise SpecError(f"mapping.profile: 'calibration', but the catalog of {out} holds no "
                        f"instrument profile for PONI {poni} (sha256 {poni_checksum[:12]}...); "
                        f"refine one from a calibrant: xrdct profile CALIBRANT --poni {poni} "
                        f"--out {out}")
    return {"key": row.key, "calibrant": row.calibrant, "rwp": row.rwp,
            **{k: row.profile[k] for k in PROFILE_KEYS}}


# ----------------------------------------------------------------------------- stages
# Plain functions (testable without Prefect); the @task wrappers below add retries and
# names. Each reads what it needs from the work store and adds its variables to it.


#: The product's coordinate convention, written to its attrs (``xrdct.coordinate_convention``)
#: and to the attrs of its ``x`` and ``y`` coordinates.
COORDINATE_CONVENTION = (
    "x, y: sample frame, rotation axis at (0, 0), in the units of the translation axis (mm, "
    "or px when the scan gives no translation positions); a point at (x, y) is measured at "
    "rotation angle theta on the translation t = x cos(theta) + y sin(theta) relative to the "
    "axis (tasks.reconstruct.radon, astra's linear projector, skimage radon, the simulator): "
    "seen from +z (x right, y up) the sample turns clockwise as theta grows. Images are "
    "stored (y, x) with row 0 at the largest y (y descending) and x ascending; translations "
    "measured in descending order are reversed before reconstruction.")


def _coords_xy(n: int, step_mm: float) -> np.ndarray:
    """``(n,)`` pixel centres about the rotation axis, ascending for ``step_mm > 0``: the
    ``x`` (and, reversed, ``y``) coordinates of an ``n x n`` reconstruction."""
    return (np.arange(n) - (n - 1) / 2.0) * step_mm


def _fine_coords(c: np.ndarray, factor: int) -> np.ndarray:
    """Pixel centres of a grid ``factor`` times finer than the pixel centres ``c`` (1-D,
    evenly spaced, ascending or descending), covering the same field of view: the ``factor``
    fine centres of coarse pixel ``i`` average to ``c[i]``."""
    c = np.asarray(c, np.float64)
    step = float(c[1] - c[0]) if c.size > 1 else 1.0
    return c[0] - step / 2 + step / (2 * factor) + np.arange(c.size * factor) * step / factor


def _integrator_settings(req: Request, spec: PipelineSpec) -> dict:
    c, i = spec.calibration, spec.integration
    if req.poni is None:
        raise SpecError("calibration.poni: frame input needs a PONI file (give --poni or "
                        "calibration.poni in the spec)")
    mask = spec.resolve(c.mask)
    return dict(poni=req.poni, npt=i.npt, unit=i.unit, radial_range=i.radial_range,
                mask=str(mask) if mask else None,
                dark=str(spec.resolve(c.dark)) if c.dark else None,
                flat=str(spec.resolve(c.flat)) if c.flat else None,
                polarization_factor=c.polarization_factor, solid_angle=c.solid_angle)


def _load_poni(poni: str):
    """pyFAI geometry of ``calibration.poni``; SpecError naming the file for one that is not
    a PONI (pyFAI reads any text as an 'Undefined detector' 1 m away)."""
    import pyFAI

    try:
        text = Path(poni).read_text(errors="replace")
        ai = pyFAI.load(poni)
    except Exception as err:  # noqa: BLE001 - pyFAI raises many types for a bad file
        raise SpecError(f"calibration.poni: {poni}: cannot read PONI calibration: "
                        f"{type(err).__name__}: {err}") from None
    if not any(ln.split(":", 1)[0].strip().lower() == "distance" for ln in text.splitlines()):
        raise SpecError(f"calibration.poni: {poni}: not a pyFAI PONI calibration (no "
                        f"'Distance:' line); expected the file pyFAI-calib2 writes")
    return ai


def _check_phases(req: Request, spec: PipelineSpec) -> None:
    """Read every phase's CIF now, so a malformed one stops the run before integration."""
    from tasks.rietveld import PhaseError, load_phase

    loaded = []
    for i, (ph, path) in enumerate(zip(spec.mapping.phases, spec.phase_paths())):
        try:
            phase = load_phase(ph.name, path)
        except PhaseError as err:
            raise PhaseError(f"mapping.phases[{i}].cif (pipeline {spec.name!r}, spec in "
                             f"{req.spec_base_dir}): {err}") from None
        for j, other in enumerate(loaded):  # one structure under two names: not separable
            if _same_structure(phase.structure, other.structure):
                raise PhaseError(
                    f"mapping.phases[{i}].cif: {path} (phase {ph.name!r}) holds the same crystal "
                    f"structure ({phase.formula}, a={phase.a:.5g} A) as mapping.phases[{j}].cif "
                    f"{other.cif_path} (phase {other.name!r}); their patterns are identical, so "
                    f"the fit cannot split them: expected distinct structures")
        loaded.append(phase)


def _same_structure(s1, s2, tol: float = 1e-4) -> bool:
    """Whether two pymatgen structures are the same cell with the same sites (lattice
    parameters within ``tol`` relative, species and fractional coordinates equal within
    ``tol``, in any order)."""
    l1, l2 = s1.lattice, s2.lattice
    if len(s1) != len(s2) or not np.allclose(l1.abc + l1.angles, l2.abc + l2.angles, rtol=tol):
        return False

    def sites(s):
        return sorted((str(site.species), *(float(v) for v in np.mod(np.round(site.frac_coords, 3), 1.0)))
                      for site in s)

    return sites(s1) == sites(s2)


def stage_ingest(req: Request) -> dict:
    """Open the scan lazily and check it against the spec, the PONI's detector and the
    phases' CIF files: the input problems found here cost no integration.

    Frame values (NaN/inf, negative counts outside the mask) are not checked here: that
    needs every frame read, and integration already reads each batch once and checks it
    before integrating it (:func:`tasks.ingest.check_frames`); a second pass would double
    the I/O of every good scan. A bad frame fails the run at its batch, and (as for every
    input error) nothing is kept or published."""
    from tasks.ingest import IngestError, open_scan

    spec = req.spec
    shape = ai = None
    if req.poni:
        ai = _load_poni(req.poni)
        shape = tuple(ai.detector.shape) if ai.detector.shape is not None else None
    scan = open_scan(req.scan, spec.input)
    if shape is not None and scan.frame_shape is not None and tuple(scan.frame_shape) != shape:
        raise IngestError(
            f"{req.scan}: {scan.frames_dataset} (input.frames): frame shape {scan.frame_shape} "
            f"does not match calibration.poni {req.poni}: its detector {ai.detector.name} has "
            f"shape {shape}; expected the PONI of the detector that recorded these frames")
    if spec.mapping.enabled:
        _check_phases(req, spec)
    info = {"kind": scan.kind, "source": scan.source, "metadata": dict(scan.metadata)}
    if scan.frames is not None:
        g = scan.grid()
        if scan.kind != "map" and spec.reconstruction.enabled:
            _check_grid_size(req.scan, len(g.angle), len(g.translation))
        _check_not_constant(scan)
        info.update(n_frames=int(scan.frames.shape[0]), frame_shape=list(scan.frames.shape[1:]),
                    frame_dtype=str(scan.frames.dtype),
                    grid=[len(g.z), len(g.angle), len(g.translation)])
    else:
        if spec.reconstruction.enabled:
            _check_grid_size(req.scan, len(scan.sino_angle), len(scan.sino_translation))
        info.update(sinogram_shape=list(scan.sinogram.shape))
    return info


#: The fewest distinct rotation angles and translations a scan to be reconstructed must have
#: (checked by the ingest stage, before integration): centring and filtered back-projection
#: need at least 3 of each; a useful XRD-CT slice has tens to hundreds.
MIN_ANGLES = 3
MIN_TRANSLATIONS = 3


def _check_grid_size(scan: str, n_angle: int, n_translation: int) -> None:
    for field_, n, lo in (("angle", n_angle, MIN_ANGLES),
                          ("translation", n_translation, MIN_TRANSLATIONS)):
        if n < lo:
            from tasks.ingest import IngestError

            raise IngestError(f"{scan}: input.{field_}: {n} distinct {field_} position(s); "
                              f"expected at least {lo} to reconstruct a slice (or disable "
                              f"reconstruction)")


#: Frames read by the ingest stage to catch a blank scan (all zero or one constant value).
CONSTANT_SAMPLE = 8


def _check_not_constant(scan) -> None:
    """Read up to :data:`CONSTANT_SAMPLE` frames spread over the scan (first and last
    included) and raise when every one holds a single value in all its pixels (dead-pixel
    and gap markers excluded: negative values and, for unsigned integers, the type's
    maximum): an all-zero or constant scan has nothing to integrate, and its maps would be
    NaN. Cheap: a few frames are read, not the scan."""
    from tasks.ingest import IngestError

    n = int(scan.frames.shape[0])
    idx = np.unique(np.linspace(0, n - 1, min(CONSTANT_SAMPLE, n)).round().astype(int))
    dt = np.dtype(scan.frames.dtype)
    values = set()
    for i in idx:
        reader = getattr(scan, "reader", None)  # straight from the file, not through Dask
        f = np.asarray(reader[int(i)] if reader is not None else scan.frames[int(i)].compute())
        ok = f >= 0
        if dt.kind == "u":
            ok &= f != np.iinfo(dt).max
        elif dt.kind == "f":
            ok &= np.isfinite(f)
        v = f[ok]
        if v.size == 0:
            continue
        lo, hi = v.min(), v.max()
        if lo != hi:
            return
        values.add(lo.item())
    where = f"{scan.source}: {scan.frames_dataset}" if scan.frames_dataset else scan.source
    shown = ", ".join(f"{v:g}" for v in sorted(values)) or "no valid pixel"
    raise IngestError(f"{where} (input.frames): the {idx.size} frames read of {n} (indices "
                      f"{', '.join(str(int(i)) for i in idx)}) each hold one value in every "
                      f"pixel ({shown}): a blank scan; expected diffraction frames with "
                      f"varying counts")


def stage_integrate(req: Request) -> dict:
    """Radial integration of every frame into ``patterns`` (z, angle, translation, radial),
    or, for a raster map, into ``volume`` (z, y, x, radial). Sinogram input is copied."""
    import xarray as xr

    from tasks.ingest import open_scan
    from tasks.integrate import integrate_scan

    spec = req.spec
    scan = open_scan(req.scan, spec.input)
    t0 = time.perf_counter()
    attrs = {}
    if scan.kind == "sinogram":
        sino = np.asarray(scan.sinogram, dtype=np.float32)[None]
        radial = np.asarray(scan.radial if scan.radial is not None else np.arange(sino.shape[-1]), float)
        # the unit the file states or the spec gives (tasks.ingest.open_sinogram); "bin"
        # (bin index) when the file has no radial axis
        unit = scan.radial_unit or "bin"
        ds = xr.Dataset(
            {"patterns": (("z", "angle", "translation", "radial"), sino,
                          {"long_name": "integrated intensity (sinogram input)", "units": "counts / monitor"})},
            coords={"z": ("z", [0.0], {"units": "mm"}),
                    "angle": ("angle", np.asarray(scan.sino_angle, float), {"units": "deg"}),
                    "translation": ("translation", np.asarray(scan.sino_translation, float),
                                    {"units": scan.translation_unit}),
                    "radial": ("radial", radial, {"unit": unit, "units": unit})})
        wavelength = scan.wavelength_m or spec.input.wavelength_m
    else:
        # Streamed: the variables are created first (lazy zero chunks), then filled chunk by
        # chunk as batches of frames are integrated (store.GridWriter); nothing of the
        # scan's length is held in memory.
        import pyFAI

        from tasks.integrate import integrator_from_spec

        g = scan.grid()
        integ = integrator_from_spec(spec, shape=scan.frame_shape, poni=req.poni)
        radial = integ.radial if spec.integration.method == "mean" else integ.radial_clip
        unit = spec.integration.unit
        wavelength = float(pyFAI.load(req.poni).wavelength)
        radial_c = ("radial", np.asarray(radial, float), {"unit": unit, "units": unit,
                                                          "wavelength_m": wavelength})
        # a raster map has no rotation: its grid's two axes are y and x, and its patterns
        # are already the "volume" that mapping reads
        is_map = scan.kind == "map"
        d1, d2 = ("y", "x") if is_map else ("angle", "translation")
        dims = ("z", d1, d2, "radial")
        name = "volume" if is_map else "patterns"
        coords = {"z": ("z", np.asarray(g.z, float), {"units": "mm"}),
                  d1: (d1, np.asarray(g.angle, float), {"units": "mm" if is_map else "deg"}),
                  d2: (d2, np.asarray(g.translation, float), {"units": "mm"}),
                  "radial": radial_c}
        long = "integrated intensity" + (" of a raster map (no reconstruction)" if is_map else "")
        shape = tuple(g.index.shape) + (len(radial),)
        ds = xr.Dataset({name: (dims, store.lazy_zeros(dims, shape),
                                {"long_name": long, "units": "counts / monitor"}),
                         f"{name}_sigma": (dims, store.lazy_zeros(dims, shape),
                                           {"long_name": "standard error (Poisson)", "units": "counts / monitor"})},
                        coords=coords)
        ds["radial"].attrs["wavelength_m"] = wavelength if wavelength else float("nan")
        names = [name, f"{name}_sigma"]
        ledger = ChunkLedger(req, "integrate")
        written = ledger.keys(names, shape)
        if written is None:  # nothing kept from an earlier attempt: a fresh start
            ledger.start()
            store.write_variables(req.work, ds, level=spec.output.compressor_level)
            written = []
        writer = store.GridWriter(req.work, names, g.index, written=written, on_flush=ledger.add)
        todo = writer.todo
        frames_reused = int(todo.size - todo.sum())
        if frames_reused:
            _log_info(f"stage integrate: {frames_reused} of {todo.size} frames ({writer.reused} "
                      f"chunk(s)) kept from an earlier attempt; integrating the other {int(todo.sum())}")
        integrate_scan(scan, spec, poni=req.poni, client=_current_client(), integrator=integ,
                       progress=progress.callback("integrate"), sink=writer, backend=spec.backend,
                       todo=todo)
        writer.close()
        attrs["integration_method"] = spec.integration.method
        counts = {"frames_reused": frames_reused, "frames_integrated": int(todo.sum())}
        ds = None
    if ds is not None:
        ds["radial"].attrs["wavelength_m"] = wavelength if wavelength else float("nan")
        store.write_variables(req.work, ds, level=spec.output.compressor_level)
    dt = time.perf_counter() - t0
    store.update_attrs(req.work, {"timings_s": {"integrate": dt}, "scan_kind": scan.kind,
                                  "wavelength_m": wavelength, **attrs})
    if ds is None:
        ledger.clear()
        return {"seconds": dt, "kind": scan.kind, **counts}
    return {"seconds": dt, "kind": scan.kind}


def _current_client():
    """The Dask client of the running flow, if any (chunk-level parallelism of a stage)."""
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


#: pass-1 sinograms kept for pass 2 of stage_sinogram, at most (bytes, all slices together)
SINOGRAM_KEEP_BYTES = 16 * 2**20


def stage_sinogram(req: Request) -> dict:
    """Per-angle scaling, air-scatter removal and centre-of-rotation correction."""
    import xarray as xr

    from tasks.sinogram import process_sinogram

    spec = req.spec
    t0 = time.perf_counter()
    ds = store.open_product(req.work)
    pat = ds["patterns"]
    angles = ds["angle"].values
    nz, n = pat.sizes["z"], pat.sizes["translation"]
    t_unit = ds["translation"].attrs.get("units", "mm")
    trans = np.asarray(ds["translation"].values, float)
    # Translations measured in descending order: the sinogram is reversed along translation
    # so that column j is at t = (j - centre) * step, step > 0, as the reconstruction
    # assumes; a given centre and the recorded centre are in measured columns.
    reverse = n > 1 and trans[-1] < trans[0]
    if reverse:
        pat = pat.isel(translation=slice(None, None, -1))
        if spec.sinogram.center not in ("auto", None):
            spec = spec.model_copy(update={"sinogram": spec.sinogram.model_copy(
                update={"center": float(n - 1 - spec.sinogram.center)})})
    # Pass 1: the centre of every slice. Pass 2: centre all slices to one common width m,
    # with m - n even so the reconstruction grid keeps the measured pixel pitch and the
    # central n x n pixels sit on the nominal grid about the rotation axis.
    # Slices are read, corrected and written one at a time; pass-1 results are kept for
    # pass 2 only up to 16 MiB in all (else recomputed with the found centre), so memory
    # stays per slice however many slices the scan has.
    keep_bytes, kept = SINOGRAM_KEEP_BYTES, 0
    found = []
    for iz in range(nz):
        sino, info = process_sinogram(np.asarray(pat.isel(z=iz).values, np.float32), angles, spec.sinogram)
        kept += sino.nbytes
        found.append((sino if kept <= keep_bytes else None, info))
    first = [info for _, info in found]
    m = max(info["width_out"] for _, info in found)
    m += (m - n) % 2
    step = abs(float(np.median(np.diff(trans)))) if n > 1 else 1.0
    dims = ("z", "angle", "translation_c", "radial")
    shape = (nz, pat.sizes["angle"], m, pat.sizes["radial"])
    store.write_variables(req.work, xr.Dataset(
        {"sinogram": (dims, store.lazy_zeros(dims, shape),
                      {"long_name": "corrected sinogram (scaled, air removed, centred"
                                    f"{'; translation order reversed' if reverse else ''})"})},
        coords={"translation_c": ("translation_c", _coords_xy(m, step),
                                  {"units": t_unit, "long_name": "translation relative to the "
                                   "rotation axis, ascending"})}),
        level=spec.output.compressor_level)
    centers, shifts, uncs, methods = [], [], [], []
    for iz in range(nz):
        sino, info = found[iz]
        if sino is None or info["width_out"] != m:  # (re)computed at the common width
            sino, info = process_sinogram(np.asarray(pat.isel(z=iz).values, np.float32), angles,
                                          spec.sinogram, width=m, center=info["center_px"])
        found[iz] = None
        store.write_slice(req.work, "sinogram", iz, sino.astype(np.float32))
        centers.append(float(n - 1 - info["center_px"]) if reverse else float(info["center_px"]))
        shifts.append(float(info["shift_px"]))
        # pass 2 may recompute with the found centre ("given"): keep pass 1's finding
        uncs.append(float(first[iz]["center_uncertainty_px"]))
        methods.append(str(first[iz]["center_method"]))
        progress.report("sinogram", iz + 1, nz)
    new = xr.Dataset(
        {"center_of_rotation": (("z",), np.asarray(centers),
                                {"units": "px", "long_name": "centre of rotation, translation-pixel "
                                 "coordinates of the measured sinogram (0 = first column)"}),
         "center_shift": (("z",), np.asarray(shifts), {"units": "px", "long_name": (
             "shift of the measured sinogram's columns to centre the axis" + (
                 " (after reversing them to ascending translation)" if reverse else ""))}),
         "center_of_rotation_uncertainty": (("z",), np.asarray(uncs), {
             "units": "px", "long_name": "standard uncertainty of the centre of rotation "
             "(NaN for a given centre)", "center_method": ", ".join(sorted(set(methods)))})})
    store.write_variables(req.work, new, level=spec.output.compressor_level)
    dt = time.perf_counter() - t0
    store.update_attrs(req.work, {"timings_s": {**_timings(req.work), "sinogram": dt},
                                  "translation_step_mm": step, "translation_unit": t_unit,
                                  "translation_reversed": bool(reverse)})
    return {"seconds": dt, "center_px": centers,
            "center_uncertainty_px": [u if np.isfinite(u) else None for u in uncs],
            "center_method": methods}


class ChunkLedger:
    """Chunks of a streamed stage's variables already in the work store, recorded while
    the stage runs (``<out>/.work/<id>.<stage>.slices/``, one empty marker file per chunk).

    :class:`tasks.store.GridWriter` calls :meth:`add` once a chunk of every variable is
    written, so a marker always names a complete chunk (a kill during the write leaves no
    marker, and the chunk is written again). A later attempt at the same work store (same
    work token, same variable shapes) reads the markers (:meth:`keys`) and integrates only
    the frames of the other chunks. The folder is removed when the stage has finished.
    """

    def __init__(self, req: Request, stage: str):
        self.dir = req.work.with_name(f"{req.work.stem}.{stage}.slices")
        self.work, self.token = req.work, req.work_token

    def start(self) -> None:
        """Forget every chunk (a fresh start of the stage) and tie the ledger to the work
        store's token."""
        self.clear()
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.dir / "token", lambda f: f.write(self.token.encode()))

    def keys(self, names, shape) -> list[tuple[int, ...]] | None:
        """The recorded chunk keys, or None when nothing can be resumed: no ledger, a
        ledger of another work store, or variables missing or of another shape."""
        import zarr

        tok = self.dir / "token"
        if not tok.is_file() or tok.read_text() != self.token:
            return None
        try:
            for n in names:
                if tuple(zarr.open_array(str(self.work / n), mode="r").shape) != tuple(shape):
                    return None
        except Exception:  # noqa: BLE001 - variable missing or unreadable: start afresh
            return None
        return sorted(tuple(int(k) for k in p.stem.split(".")[1:]) for p in self.dir.glob("chunk.*.done"))

    def add(self, key) -> None:
        _atomic_write(self.dir / f"chunk.{'.'.join(str(int(k)) for k in key)}.done", lambda f: None)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _atomic_write(path: Path, write) -> None:
    """Write ``path`` by ``write(binary file)`` under a temporary name, then rename it into
    place, so that a kill never leaves it half-written."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


class SliceCheckpoints:
    """Finished slices of one stage, kept while the stage runs (``<out>/.work/<id>.<stage>.slices/``).

    A stage that fails on one slice (and the Prefect retry of it, or a later request after a
    crash) reuses the slices finished before, and recomputes only the rest. Each slice is
    one file written to a temporary name and renamed, so a kill never leaves a half-written
    slice: ``.npy`` for a reconstructed slice (:meth:`save`), ``.npz`` for a slice's maps
    (:meth:`save_maps`). The folder is removed when the stage has written its output.
    """

    def __init__(self, req: Request, stage: str):
        self.dir = req.work.with_name(f"{req.work.stem}.{stage}.slices")

    def _path(self, iz: int) -> Path:
        return self.dir / f"z{iz:05d}.npy"

    def load(self, iz: int) -> np.ndarray | None:
        """The kept result of slice ``iz``, or None."""
        p = self._path(iz)
        return np.load(p, allow_pickle=False) if p.is_file() else None

    def save(self, iz: int, arr: np.ndarray) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self._path(iz), lambda f: np.save(f, np.ascontiguousarray(arr), allow_pickle=False))

    def load_maps(self, iz: int) -> tuple[dict, np.ndarray, np.ndarray] | None:
        """The kept maps of slice ``iz`` (:meth:`save_maps`), or None."""
        p = self.dir / f"z{iz:05d}.npz"
        if not p.is_file():
            return None
        with np.load(p, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            data = {k: (tuple(dims), f[f"var.{k}"], attrs) for k, (dims, attrs) in meta.items()}
            return data, f["rwp"], f["wf"]

    def save_maps(self, iz: int, data: dict, rwp: np.ndarray, wf: np.ndarray) -> None:
        """Keep the maps of slice ``iz``: ``data`` name -> (dims, array, attrs) (attrs JSON
        values), the slice's Rwp and weight fractions; one ``.npz``, renamed into place."""
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = json.dumps({k: [list(d), a] for k, (d, _v, a) in data.items()})
        _atomic_write(self.dir / f"z{iz:05d}.npz", lambda f: np.savez(
            f, meta=np.array(meta), rwp=np.asarray(rwp), wf=np.asarray(wf),
            **{f"var.{k}": np.asarray(v) for k, (_d, v, _a) in data.items()}))

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class _SliceReconstructor:
    """The spec's reconstruction method for one slice of every radial bin at once.

    ``fbp`` (tasks.reconstruct), ``sirt``/``cgls``/``tv`` (tasks.iterative, one projector
    matrix built for all slices), ``gan`` (tasks.gan; the spec's channels, the other bins
    keep their FBP), ``cnn`` (tasks.cnn; the promoted or named model from the catalog, FBP
    with a warning for a slice unlike the training library). ``notes`` collects what the
    product's provenance records (channels, fallbacks, model).
    """

    def __init__(self, req: Request, angles, n_translation: int, on_gpu: bool):
        self.req, self.r, self.angles, self.nt, self.on_gpu = req, req.spec.reconstruction, angles, n_translation, on_gpu
        self.device = "cuda" if on_gpu else "cpu"
        self.notes: dict = {"method": self.r.method}
        self._projector = None
        self._model = None

    def filter_for(self, s, iz: int):
        """The FBP filter and cutoff of slice ``iz``: the spec's, or for ``auto`` those
        :func:`tasks.reconstruct.choose_filter` picks per radial bin from the slice's
        noise (a name and a number, or one of each per bin), recorded (choices, noise
        estimate, why) in ``notes["filter_by_slice"]``."""
        r = self.r
        if r.filter != "auto":
            return r.filter, r.cutoff
        from tasks.reconstruct import choose_filter

        choice, info = choose_filter(s, self.angles)
        rec = {"slice": int(iz), **{k: info[k] for k in (
            "counts", "noise_variance", "noise_method", "noise_fraction", "reason",
            "candidates", "index_by_bin")}}
        by = self.notes.setdefault("filter_by_slice", [])
        by[:] = sorted([b for b in by if b["slice"] != iz] + [rec], key=lambda b: b["slice"])
        return choice

    def fbp(self, s, iz: int = 0):
        from tasks._xp import to_numpy
        from tasks.reconstruct import fbp

        r = self.r
        name, cutoff = self.filter_for(s, iz)
        if self.on_gpu:
            import cupy

            s = cupy.asarray(s)
        return to_numpy(fbp(s, self.angles, filter=name, cutoff=cutoff, circle=r.circle,
                            clip_negative=r.clip_negative, backend=r.backend))

    def __call__(self, s, iz: int):
        r = self.r
        if r.method == "fbp":
            return self.fbp(s, iz)
        if r.method in ("sirt", "cgls", "tv"):
            from tasks.iterative import reconstruct
            from tasks.projector import Projector

            if self._projector is None:
                self._projector = Projector(self.angles, self.nt, backend="torch", device=self.device)
            opts = r.iterative.options(r.method)
            if r.method == "tv":
                opts["device"] = self.device
            vol = reconstruct(s, self.angles, r.method, projector=self._projector, **opts)
        elif r.method == "gan":
            from tasks.gan import gan_reconstruct

            opts = r.gan.options()
            nb = s.shape[-1]
            chans = list(range(nb)) if opts["channels"] is None else opts["channels"]
            bad = [c for c in chans if c >= nb]
            if bad:
                raise SpecError(f"reconstruction.gan.channels: bins {bad} do not exist; the "
                                f"sinogram has {nb} radial bins (0..{nb - 1})")
            vol = self.fbp(s, iz) if len(chans) < nb else np.zeros((self.nt, self.nt, nb), np.float32)
            img, _info = gan_reconstruct(s, self.angles, device=self.device, **{**opts, "channels": chans})
            vol[:, :, chans] = img.reshape(self.nt, self.nt, len(chans))
            self.notes.setdefault("gan_channels", chans)
        elif r.method == "cnn":
            vol = self._cnn(s, iz)
        else:  # pragma: no cover - the spec's Literal lists the methods
            raise SpecError(f"reconstruction.method {r.method!r} unknown")
        if r.circle:
            from tasks.reconstruct import circle_mask

            vol = vol * circle_mask(self.nt)[:, :, None]
        if r.clip_negative:
            vol = np.maximum(vol, 0)
        return np.asarray(vol, np.float32)

    def _cnn(self, s, iz):
        import warnings

        from catalog.db import Catalog
        from flows.learn import load_registered_model
        from tasks.cnn import OutOfDistributionWarning, reconstruct

        c = self.r.cnn
        if self._model is None:
            sha = self.req.calibration.get(f"model:{c.model}")
            cat = Catalog.for_products(self.req.out)
            rows = [m for m in cat.models(c.model) if m.sha256 == sha]
            if not rows:
                raise SpecError(f"reconstruction.cnn.model: model {c.model!r} with SHA-256 {sha} "
                                f"(the one this product was requested with) is no longer in the "
                                f"catalog of {self.req.out}")
            self._model = load_registered_model(cat, c.model, rows[0].version, device=self.device)
            self.notes.update(cnn_model=c.model, cnn_version=int(rows[0].version), cnn_sha256=sha)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", OutOfDistributionWarning)
            vol, info = reconstruct(s, self.angles, self._model, fallback=c.fallback,
                                    threshold=c.ood_threshold, filter=self.r.filter,
                                    cutoff=self.r.cutoff)
        for w in caught:  # shown in the flow's log, and recorded in the product
            _log_info(f"slice {iz}: {w.message}")
            warnings.warn(f"slice {iz}: {w.message}", w.category, stacklevel=2)
        if info.get("method") == "fbp":
            self.notes.setdefault("cnn_fbp_fallback_slices", []).append(
                {"slice": iz, "reason": info.get("reason", "")})
        return vol


def stage_reconstruct(req: Request) -> dict:
    """Reconstruction of every radial bin of every slice, one batched call per slice, by
    the spec's method (:class:`_SliceReconstructor`).

    Slices are kept as they finish (:class:`SliceCheckpoints`); a slice that fails raises
    :class:`ProcessingError` naming it, and a retry recomputes only the slices not kept.
    """
    import xarray as xr

    from tasks._xp import resolve_backend

    spec = req.spec
    r = spec.reconstruction
    # the batched FBP runs cupy arrays as they are (astra/tomopy take numpy)
    on_gpu = resolve_backend(spec.backend) == "gpu" and r.backend in ("numpy", "auto")
    t0 = time.perf_counter()
    ds = store.open_product(req.work)
    sino = ds["sinogram"]
    angles = ds["angle"].values
    nz, n = sino.sizes["z"], sino.sizes["translation_c"]
    step = float(store.provenance(req.work).get("translation_step_mm", 1.0))
    unit = sino["translation_c"].attrs.get("units", "mm")
    xy_attrs = {"units": unit, "coordinate_convention": COORDINATE_CONVENTION}
    dims = ("z", "y", "x", "radial")
    store.write_variables(req.work, xr.Dataset(
        {"volume": (dims, store.lazy_zeros(dims, (nz, n, n, sino.sizes["radial"])),
                    {"long_name": f"reconstructed intensity ({r.method}"
                              f"{', ' + r.filter + ' filter' if r.method == 'fbp' else ''})",
                     "units": "counts / monitor / pixel"})},
        coords={"y": ("y", _coords_xy(n, step)[::-1].copy(), xy_attrs),   # row 0 = largest y
                "x": ("x", _coords_xy(n, step), xy_attrs)}),
        level=spec.output.compressor_level)
    store.update_attrs(req.work, {"coordinate_convention": COORDINATE_CONVENTION})
    kept = SliceCheckpoints(req, "reconstruct")
    recon = _SliceReconstructor(req, angles, n, on_gpu)
    auto_fbp = r.filter == "auto" and r.method == "fbp"
    reused = 0
    for iz in range(nz):  # one slice in memory at a time, written as it is done
        vol = kept.load(iz)
        if vol is None or auto_fbp:
            s = np.asarray(sino.isel(z=iz).values, np.float32)
        if vol is None:
            try:
                vol = recon(s, iz)
            except SpecError:
                raise
            except Exception as err:
                z = float(ds["z"].values[iz])
                raise ProcessingError(
                    f"stage reconstruct: slice {iz} of {nz} (z = {z:g} mm) of {req.scan} failed: "
                    f"{type(err).__name__}: {err} ({iz - reused} slice(s) finished in this "
                    f"attempt and {reused} earlier are kept for the retry)") from err
            vol = vol.astype(np.float32)
            kept.save(iz, vol)
        else:
            reused += 1
            if auto_fbp:  # the kept slice's filter choice, recorded again (deterministic)
                recon.filter_for(s, iz)
        store.write_slice(req.work, "volume", iz, vol)
        progress.report("reconstruct", iz + 1, nz)
    kept.clear()
    dt = time.perf_counter() - t0
    attrs = {"timings_s": {**_timings(req.work), "reconstruct": dt}}
    if r.method == "fbp":
        # the FBP filter of every slice: the spec's, or what "auto" chose from the noise
        by = recon.notes.get("filter_by_slice")
        chosen: dict = {}
        for b in by or []:
            for k, v in b["counts"].items():
                chosen[k] = chosen.get(k, 0) + v
        attrs["reconstruction_filter"] = {
            "requested": r.filter, "cutoff_requested": r.cutoff,
            "chosen_bins": chosen or {(r.filter if r.cutoff == 1.0 else f"{r.filter}@{r.cutoff:g}"):
                                      int(sino.sizes["radial"]) * nz},
            "by_slice": by or []}
    store.update_attrs(req.work, attrs)
    if "reconstruction_filter" in attrs:  # the summary on the volume itself, too
        import zarr

        rf = attrs["reconstruction_filter"]
        va = {"filter": r.filter, "filter_chosen_bins": rf["chosen_bins"]}
        if rf["by_slice"]:
            va["noise_variance"] = float(np.mean([b["noise_variance"] for b in rf["by_slice"]]))
        zarr.open_array(str(req.work / "volume"), mode="a").attrs.update(va)
    notes = {k: v for k, v in recon.notes.items() if k != "filter_by_slice"}  # in the attrs
    if "reconstruction_filter" in attrs:
        notes["filter_chosen_bins"] = attrs["reconstruction_filter"]["chosen_bins"]
    return {"seconds": dt, "slices_reused": reused, **notes}


def _map_slice(vol, sigma, mask, phases, refs, radial, unit, wl, m) -> tuple[dict, np.ndarray, np.ndarray]:
    """Maps of one slice: ``vol`` (1, y, x, radial) float64, ``sigma`` same or None, ``mask``
    (1, y, x) True = not fitted. Returns the variables ``name -> (dims, array, attrs)``
    with z of length 1, the slice's Rwp (1, y, x) and weight fractions (1, y, x, phase)."""
    from tasks.rietveld import ESD_SCALING, fit_scales, weight_fractions

    sigma = np.ones_like(vol) if sigma is None else sigma
    res = fit_scales(vol, refs, background_order=m.background_order, sigma=sigma, mask=mask)
    wf = weight_fractions(res.scale, phases)

    def zp(a):  # (z, y, x, phase) -> (z, phase, y, x)
        return np.moveaxis(np.asarray(a, np.float32), -1, 1)

    data = {"scale": (("z", "phase", "y", "x"), zp(res.scale),
                      {"long_name": "phase scale factor S_p (= mass / ZMV per voxel)"}),
            "weight_fraction": (("z", "phase", "y", "x"), zp(wf),
                                {"long_name": "weight fraction (Hill & Howard 1987)", "units": "1"}),
            "rwp": (("z", "y", "x"), np.asarray(res.rwp, np.float32),
                    {"long_name": "weighted-profile R factor", "units": "1"}),
            "sample_mask": (("z", "y", "x"), ~mask, {"long_name": "voxels fitted"})}
    if getattr(res, "scale_esd", None) is not None:
        data["scale_esd"] = (("z", "phase", "y", "x"), zp(res.scale_esd),
                             {"long_name": "esd of scale", "esd_scaling": ESD_SCALING})
    if getattr(res, "chi2", None) is not None:
        data["chi2"] = (("z", "y", "x"), np.asarray(res.chi2, np.float32), {"long_name": "reduced chi^2"})
    if m.method == "refine":  # whole-pattern refinement of every voxel (tasks.refine)
        from tasks.refine import refine_variables

        extra, res = refine_variables(vol, sigma, mask, phases, radial, unit, wl, m)
        data.update(extra)
        wf = res.weight_fraction
    return data, np.asarray(res.rwp), np.asarray(wf)


def stage_mapping(req: Request) -> dict:
    """Per-voxel scale factors of the spec's phases, weight fractions and Rwp (or the
    whole-pattern refinement of every voxel), slice by slice: one slice of the volume is
    in memory at a time and its maps are written as they are done. Each slice's maps are
    kept as they finish (:class:`SliceCheckpoints`), so an attempt killed half-way is
    resumed without refitting the slices it finished."""
    import xarray as xr

    from tasks.rietveld import load_phase, reference_patterns

    spec = req.spec
    m = spec.mapping
    t0 = time.perf_counter()
    ds = store.open_product(req.work)
    nz = ds.sizes["z"]
    radial = ds["radial"].values
    unit = ds["radial"].attrs.get("unit", spec.integration.unit)
    if unit == "bin":
        raise SpecError(f"mapping.enabled: {req.scan} has no radial axis dataset (q or 2-theta "
                        f"beside the sinogram), so patterns cannot be fitted; add one or "
                        f"disable mapping")
    wl = ds["radial"].attrs.get("wavelength_m") or spec.input.wavelength_m
    if not wl or not np.isfinite(wl):
        raise SpecError("input.wavelength_m: mapping needs the wavelength (from the PONI, or "
                        "input.wavelength_m for sinogram input)")
    if m.profile == "calibration":  # make_request resolves it; a hand-made Request may not
        raise SpecError("mapping.profile: 'calibration' was not resolved to a stored instrument "
                        "profile; build the request with make_request")
    phases = [load_phase(p.name, path) for p, path in zip(m.phases, spec.phase_paths())]
    refs = reference_patterns(phases, radial, unit, wl, m.profile)
    has_sigma = "volume_sigma" in ds

    def volume(iz):
        return np.asarray(ds["volume"].isel(z=iz).values, np.float64)[None]

    # pass 1 (one slice at a time): the voxel mask needs the brightest voxel of the volume,
    # the error model the largest sigma
    total = np.concatenate([np.nansum(np.clip(volume(iz), 0, None), axis=-1) for iz in range(nz)])
    mask = ~(total > m.min_total_intensity * np.nanmax(total))
    sig_max = max(float(np.nanmax(ds["volume_sigma"].isel(z=iz).values)) for iz in range(nz)) \
        if has_sigma else None
    names = [p.name for p in phases]
    rwp_all, wf_sum, wf_n = [], np.zeros(len(names)), np.zeros(len(names))
    kept = SliceCheckpoints(req, "mapping")
    reused = 0
    for iz in range(nz):  # pass 2: fit (or take the kept fit of an earlier attempt), write
        got = kept.load_maps(iz)
        if got is None:
            sigma = None
            if has_sigma:
                sigma = np.asarray(ds["volume_sigma"].isel(z=iz).values, np.float64)[None]
                sigma = np.where(sigma > 0, sigma, sig_max)
            data, rwp, wf = _map_slice(volume(iz), sigma, mask[iz:iz + 1], phases, refs, radial,
                                       unit, wl, m)
            kept.save_maps(iz, data, rwp, wf)
        else:
            data, rwp, wf = got
            reused += 1
        if iz == 0:  # create every variable (zero chunks), then fill slice by slice
            store.write_variables(req.work, xr.Dataset(
                {k: (dims, store.lazy_zeros(dims, (nz,) + np.shape(a)[1:], np.asarray(a).dtype), attrs)
                 for k, (dims, a, attrs) in data.items()},
                coords={"phase": ("phase", np.asarray(names, dtype=str))}),
                level=spec.output.compressor_level)
        for k, (_dims, a, _attrs) in data.items():
            store.write_slice(req.work, k, iz, np.asarray(a)[0])
        inside = ~mask[iz]
        rwp_all.append(rwp[0][inside])
        wf_sum += np.nansum(wf[0][inside], axis=0)
        wf_n += np.isfinite(wf[0][inside]).sum(axis=0)
        progress.report("mapping", iz + 1, nz)
    kept.clear()
    dt = time.perf_counter() - t0
    rwp_in = np.concatenate(rwp_all)
    summary = {"median_rwp": float(np.nanmedian(rwp_in)) if rwp_in.size else float("nan"),
               "mean_weight_fraction": {n: float(wf_sum[i] / wf_n[i]) if wf_n[i] else float("nan")
                                        for i, n in enumerate(names)}}
    profile = {"source": "catalog" if req.profile else "spec", **m.profile.model_dump()}
    if req.profile:
        profile.update(key=req.profile["key"], calibrant=req.profile["calibrant"],
                       calibrant_rwp=req.profile["rwp"])
    store.update_attrs(req.work, {"timings_s": {**_timings(req.work), "mapping": dt},
                                  "fit_summary": summary, "instrument_profile": profile})
    return {"seconds": dt, "slices_reused": reused, **summary, "instrument_profile": profile}


def stage_superres(req: Request) -> dict:
    """Super-resolution of the per-phase chemical maps (``scale`` and ``weight_fraction``,
    z, phase, y, x) by the spec's factor and method (tasks.superres), slice by slice, into
    ``scale_sr`` / ``weight_fraction_sr`` on the finer ``y_sr``, ``x_sr`` grid. The guide
    is the slice's total-scattering image (``from_data``) or the absorption-contrast image
    the spec names (2-D for one slice, or (z, y, x)); it must be ``factor`` times the
    reconstruction grid (tasks.superres gives the expected shape when it is not)."""
    import xarray as xr

    from tasks.superres import absorption_from_xrdct, load_guide, load_model, upscale

    spec = req.spec
    sr = spec.superres
    f = int(sr.factor)
    t0 = time.perf_counter()
    ds = store.open_product(req.work)
    nz, ny, nx = ds.sizes["z"], ds.sizes["y"], ds.sizes["x"]
    model = load_model(spec.resolve(sr.model)) if sr.method in ("single", "dual") else None
    uses_guide = sr.method in ("guided", "dual")  # the interpolations and "single" take none
    guide_img = None
    if uses_guide and sr.guide != "from_data":
        guide_img = load_guide(spec.resolve(sr.guide))
        if guide_img.ndim == 2:
            guide_img = guide_img[None]
        if guide_img.shape[0] != nz:
            raise SpecError(f"superres.guide: {sr.guide} holds {guide_img.shape[0]} slice(s); the "
                            f"product has {nz} (give one image per slice, (z, y, x))")

    names = [v for v in ("scale", "weight_fraction") if v in ds]
    if not names:
        raise SpecError("superres.enabled: super-resolution works on the per-phase maps; enable "
                        "mapping (mapping.enabled with phases)")
    dims = ("z", "phase", "y_sr", "x_sr")
    shape = (nz, ds.sizes["phase"], ny * f, nx * f)
    store.write_variables(req.work, xr.Dataset(
        {f"{v}_sr": (dims, store.lazy_zeros(dims, shape),
                     {**ds[v].attrs, "long_name": f"{ds[v].attrs.get('long_name', v)}, "
                                                  f"super-resolved {f}x ({sr.method})"})
         for v in names},
        coords={"y_sr": ("y_sr", _fine_coords(ds["y"].values, f), dict(ds["y"].attrs)),
                "x_sr": ("x_sr", _fine_coords(ds["x"].values, f), dict(ds["x"].attrs))}),
        level=spec.output.compressor_level)
    for iz in range(nz):
        guide = None
        if uses_guide:
            guide = (absorption_from_xrdct(np.asarray(ds["volume"].isel(z=iz).values, np.float32), factor=f)
                     if sr.guide == "from_data" else guide_img[iz])
        for v in names:
            low = np.moveaxis(np.asarray(ds[v].isel(z=iz).values, np.float32), 0, -1)   # (y, x, phase)
            up = upscale(np.nan_to_num(low), f, method=sr.method, model=model, guide=guide)
            store.write_slice(req.work, f"{v}_sr", iz, np.moveaxis(up, -1, 0))
        progress.report("superres", iz + 1, nz)
    dt = time.perf_counter() - t0
    store.update_attrs(req.work, {"timings_s": {**_timings(req.work), "superres": dt}})
    return {"seconds": dt, "factor": f, "method": sr.method, "guide": sr.guide}


#: Provenance keys that describe one run rather than the product. They are moved out of the
#: store before publishing (so one request gives the same bytes, made in one go or resumed
#: after a crash) into the run record ``<out>/<product_id>.run.json`` and the catalog.
RUN_KEYS = ("timings_s", "work_token", "stages_done")
#: per-stage info of the run, not the product
_RUN_INFO = ("seconds", "resumed", "slices_reused", "frames_reused", "frames_integrated")


def _run_record(req: Request, started: float, stage_info: dict) -> dict:
    """Split the work store's provenance into the product's (kept, canonical) and this
    run's (returned): timings, work token, stage seconds, resumed stages, wall time."""
    prov = store.provenance(req.work)
    run = {k: prov.pop(k) for k in RUN_KEYS if k in prov}
    integ = stage_info.get("integrate", {})
    spec = req.spec
    prov.update({
        "product_id": req.product_id, "pipeline_spec": json.loads(req.spec_json),
        "pipeline_name": spec.name, "schema_version": spec.schema_version,
        "code_version": store.code_version(), "packages": store.package_versions(),
        "inputs": {"scan": req.scan, "checksums": req.inputs},
        "calibration": {"poni": req.poni, "checksums": req.calibration},
        "stages": {name: {k: v for k, v in info.items() if k not in _RUN_INFO}
                   for name, info in stage_info.items()}})
    store.set_provenance(req.work, prov)
    run.update({"product_id": req.product_id, "flow_run_id": _flow_run_id(),
                "created_unix": time.time(), "wall_time_s": time.perf_counter() - started,
                "stage_seconds": {n: i.get("seconds") for n, i in stage_info.items()},
                "resumed_stages": [n for n, i in stage_info.items() if i.get("resumed")],
                "slices_reused": {n: i["slices_reused"] for n, i in stage_info.items()
                                  if "slices_reused" in i},
                # frames of the integrate stage this run: kept from an earlier attempt's
                # chunks, integrated now (none when the whole stage was resumed)
                "frames": {k: integ[k] for k in ("frames_reused", "frames_integrated")
                           if k in integ and not integ.get("resumed")}})
    return run


def run_record(product: str | Path) -> dict:
    """The run record beside a product (``<id>.run.json``): stage timings, wall time,
    creation time, flow-run id, resumed stages. Empty when absent."""
    p = Path(product).with_suffix(".run.json")
    return json.loads(p.read_text()) if p.is_file() else {}


def stage_publish(req: Request, started: float, stage_info: dict) -> str:
    """Write provenance, the run record and the overview PNG, then publish the work store
    atomically (the PNG and run record are renamed beside it right after)."""
    spec = req.spec
    run = _run_record(req, started, stage_info)
    side = {".png": req.work.with_suffix(".png"), ".run.json": req.work.with_suffix(".run.json")}
    side[".run.json"].write_text(json.dumps(store._jsonable(run), indent=1, sort_keys=True))
    if spec.output.overview_png:  # drawn before publishing, renamed beside the product after
        from tasks.plots import overview_png

        overview_png(req.work, side[".png"])
    try:
        final = store.publish(req.work, req.final)
    except store.ProductExistsError:
        # published meanwhile by a run that did not hold the product lock: same inputs,
        # same spec, same code, so the same product; drop this attempt and return that one
        req.discard_work()
        return str(req.final)
    if os.environ.get("_XRDCT_TEST_KILL_AFTER_PUBLISH"):  # tests only: die between rename and catalog
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    for suffix, f in side.items():
        if f.exists():
            os.replace(f, final.with_suffix(suffix))
    _register(req, final, stage_info, run)
    _summary_artifact(req, final)
    return str(final)


def summary_rows(product: str | Path) -> list[tuple[str, str]]:
    """(field, value) rows summarising a product: inputs, stage timings, centre of rotation,
    fit quality. Shared by the CLI's summary table and the UI's markdown artifact."""
    prov = store.provenance(product)
    rows = [("product", str(product)),
            ("pipeline", f"{prov.get('pipeline_name')} (schema {prov.get('schema_version')}, "
                         f"code {prov.get('code_version')})"),
            ("scan", str(prov.get("inputs", {}).get("scan")))]
    rows += [(f"time: {k}", f"{v:.2f} s") for k, v in run_record(product).get("timings_s", {}).items()]
    sino = prov.get("stages", {}).get("sinogram")
    if sino:
        unc = sino.get("center_uncertainty_px") or [None] * len(sino["center_px"])
        how = sino.get("center_method") or [""] * len(sino["center_px"])
        rows.append(("centre of rotation", ", ".join(
            f"{c:.2f}" + (f" +- {u:.2f}" if u is not None else "") + f" px{f' ({m})' if m else ''}"
            for c, u, m in zip(sino["center_px"], unc, how))))
    fit = prov.get("fit_summary")
    if fit:
        rows.append(("median Rwp", f"{fit['median_rwp']:.4f}"))
        rows += [(f"mean weight fraction {n}", f"{w:.3f}") for n, w in fit["mean_weight_fraction"].items()]
    prof = prov.get("instrument_profile")
    if prof:
        src = (f"catalog {prof['key'][:12]} ({prof['calibrant']} calibrant)"
               if prof.get("source") == "catalog" else "spec")
        rows.append(("instrument profile", f"{src}: U={prof['U']:.4g} V={prof['V']:.4g} "
                     f"W={prof['W']:.4g} deg^2, eta={prof['eta']:.3f}, zero={prof['zero_shift_deg']:.4g} deg"))
    return rows


def summary_markdown(product: str | Path) -> str:
    """:func:`summary_rows` as a markdown table (paths as code)."""
    rows = [(k, f"`{v}`" if k in ("product", "scan") else v) for k, v in summary_rows(product)]
    return "| field | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


def _summary_artifact(req: Request, final: Path) -> None:
    """Inside a Prefect flow run: a markdown artifact (the UI's Artifacts tab) keyed by
    product id, and, when ``XRDCT_PRODUCTS_URL`` names the URL under which a file server
    publishes the product directory (infra/compose.yaml has one), an image artifact of the
    overview PNG (Prefect image artifacts are URLs). Outside a flow run: nothing."""
    if _flow_run_id() is None:
        return
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=summary_markdown(final), key=f"xrdct-{req.product_id}",
                             description=f"xrdct product {req.product_id}")
    base = os.environ.get("XRDCT_PRODUCTS_URL")  # where a file server publishes <out>
    png = final.with_suffix(".png")
    if base and png.exists():
        from prefect.artifacts import create_image_artifact

        create_image_artifact(image_url=f"{base.rstrip('/')}/{png.name}",
                              key=f"xrdct-{req.product_id}-overview",
                              description="overview: sinogram, reconstruction, phase maps")


def _flow_run_id() -> str | None:
    if "prefect" not in sys.modules:  # no flow runs in a process that never imported Prefect:
        return None  # importing prefect.runtime to find that out costs ~1-3 s (--no-prefect)
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:  # noqa: BLE001 - not inside a Prefect flow
        return None


def _register(req: Request, final: Path, stage_info: dict, run: dict) -> None:
    """Record the product in the catalog (SQLite beside the products by default).

    Raises
    ------
    catalog.db.CatalogError
        The catalog is locked past its timeout, corrupt or read-only. The product stays
        published; the message says how it gets its row (a rerun of the request, or
        ``xrdct catalog add``)."""
    from catalog.db import CatalogError

    try:
        register_product_store(final, req.out, run=run)
    except CatalogError as err:
        raise CatalogError(f"{err}; product {final} is published but has no catalog row: run the "
                           f"same request again or 'xrdct catalog add {final}' once the catalog "
                           f"is usable") from None


def register_product_store(product: str | Path, out: str | Path | None = None, *, run: dict | None = None,
                           catalog=None, if_absent: bool = False) -> bool:
    """Record a published product in the catalog from what the product itself holds: its
    provenance attrs (scan, input and calibration checksums, spec, code version, ingest
    info) and its run record (``<id>.run.json``: wall time, timings, flow-run id).

    What publishing writes and what repairs a catalog that missed a product (a run killed
    between the rename and the catalog write, a catalog locked or corrupt then) or
    ``xrdct catalog add <product>.zarr`` use: one code path, the same row.

    Parameters
    ----------
    product : path
        A published product store ``<out>/<product_id>.zarr``.
    out : path, optional
        Product directory whose catalog is used (default: the product's folder); ignored
        when ``catalog`` is given.
    run : dict, optional
        This run's record (default: the product's ``<id>.run.json``, or none).
    catalog : catalog.db.Catalog, optional
    if_absent : bool
        Write nothing when the product has a row already.

    Returns
    -------
    bool
        Whether the product row was added.

    Raises
    ------
    ValueError
        ``product`` is not a published xrdct product store (no zarr.json or no product id).
    catalog.db.CatalogError
        The catalog cannot be written.
    """
    import hashlib

    from catalog.db import Catalog

    final = Path(product).resolve()
    try:
        prov = store.provenance(final) if (final / "zarr.json").is_file() else {}
    except Exception as err:  # noqa: BLE001 - unreadable attrs: not a product we can register
        raise ValueError(f"{final}: cannot read the product's attributes ({err})") from None
    pid = prov.get("product_id")
    if not pid or final.name != f"{pid}.zarr" or "inputs" not in prov:
        raise ValueError(f"{final}: not a published xrdct product store (expected "
                         f"<product_id>.zarr with zarr.json and provenance attrs)")
    run = run if run is not None else run_record(final)
    inputs = prov["inputs"].get("checksums", {})
    cal = prov.get("calibration", {})
    ingest = prov.get("stages", {}).get("ingest", {})
    scan_sum = (next(iter(inputs.values())) if len(inputs) == 1 else
                hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest())
    cat = catalog or Catalog.for_products(out if out is not None else final.parent)
    try:
        return cat.register_product(
            product_id=pid, location=str(final), scan_path=prov["inputs"].get("scan", ""),
            scan_checksum=scan_sum, scan_kind=ingest.get("kind", ""),
            geometry={k: v for k, v in ingest.items() if k not in ("resumed", "metadata", "seconds")},
            poni=cal.get("poni"), calibration=cal.get("checksums", {}),
            pipeline_name=prov.get("pipeline_name", ""), spec=prov.get("pipeline_spec", {}),
            code_version=prov.get("code_version", ""), inputs=inputs,
            timings=run.get("timings_s", {}), wall_time_s=run.get("wall_time_s"),
            flow_run_id=run.get("flow_run_id"), metadata=ingest.get("metadata"), if_absent=if_absent)
    finally:
        if catalog is None:
            cat.dispose()


def _catalogued(req: Request) -> bool:
    """Whether the catalog of ``req.out`` has the product's row (CatalogError when the
    catalog cannot be read)."""
    from catalog.db import Catalog

    cat = Catalog(Catalog.resolve_url(None, req.out), readonly=True)
    try:
        return cat.product(req.product_id) is not None
    finally:
        cat.dispose()


def _check_catalog(req: Request) -> None:
    """Open the catalog of ``req.out`` once (migrating it), so that a catalog that is locked
    past its timeout, corrupt or read-only fails before any work (CatalogError). A default
    SQLite catalog that does not exist yet is not created here."""
    from catalog.db import Catalog, catalog_location

    url = Catalog.resolve_url(None, req.out)
    if url.startswith("sqlite") and not Path(catalog_location(url)).exists():
        return
    Catalog(url).dispose()


class OutputError(ValueError):
    """The product folder (``out``) cannot hold products: a file, or not writable."""


def check_out(out: str | Path) -> None:
    """Check that ``out`` is a folder this process can write, or can be made as one.

    Raises
    ------
    OutputError
        ``out`` (or the nearest existing folder above it) is a file, or is not writable.
    """
    out = Path(out)
    p = out
    while not p.exists() and p != p.parent:
        p = p.parent
    if p.exists() and not p.is_dir():
        raise OutputError(f"out {str(out)!r}: {str(p)!r} is a file; expected a folder for products")
    if not os.access(p, os.W_OK | os.X_OK):
        raise OutputError(f"out {str(out)!r}: folder {str(p)!r} is not writable (products, work "
                          f"stores and locks are written there)")


def _repair_published(req: Request) -> None:
    """Finish the publishing of a product a run left half-done (called under the product
    lock): move the PNG and run record from the work folder beside the product, and add
    the catalog row if it is missing. Idempotent."""
    for suffix in (".png", ".run.json"):
        side = req.work.with_suffix(suffix)
        if side.exists() and not req.final.with_suffix(suffix).exists():
            os.replace(side, req.final.with_suffix(suffix))
        side.unlink(missing_ok=True)
    from catalog.db import CatalogError

    try:
        if register_product_store(req.final, req.out, if_absent=True):
            _log_info(f"product {req.product_id}: catalog row added (it was published without one)")
    except CatalogError as err:
        raise CatalogError(f"{err}; product {req.final} is published but has no catalog row: run "
                           f"the same request again or 'xrdct catalog add {req.final}' once the "
                           f"catalog is usable") from None


def _timings(work) -> dict:
    return dict(store.provenance(work).get("timings_s", {}))


# ----------------------------------------------------------------------------- Prefect

# The Prefect UI draws a dropdown of the shipped specs (a JSON-schema enum); the API and the
# CLI also take a YAML path (the enum is not enforced by validation).
Pipeline = Annotated[str, Field(json_schema_extra={"enum": sorted(p.stem for p in PIPELINES_DIR.glob("*.yaml"))},
                                description="pipeline spec: a shipped name or a YAML path")]

def resolved_annotations(fn):
    """Replace the string annotations of ``fn`` (this package uses ``from __future__ import
    annotations``) by the objects they name, so that Prefect's parameter model, built where
    a deployment runs the flow, finds ``Pipeline`` and the pydantic parameter models."""
    import typing

    fn.__annotations__ = typing.get_type_hints(fn, include_extras=True)
    return fn


def _prefect():
    from prefect import flow, task

    return flow, task


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn`` of the retried stages: retry a crash or an I/O hiccup,
    not bad input (:func:`input_errors`), which fails the same way every time."""
    return not isinstance(getattr(state, "data", None), input_errors())


def _build_flow():
    flow, task = _prefect()

    def cached(name, fn, **kw):
        return task(name=name, cache_key_fn=stage_cache_key(name), persist_result=True,
                    result_serializer="json", **kw)(resumable(name, fn))

    t_ingest = cached("ingest", stage_ingest, retries=1, retry_condition_fn=retry_unless_bad_input)
    t_integrate = cached("integrate", stage_integrate, retries=1,
                         retry_condition_fn=retry_unless_bad_input)
    t_sinogram = cached("sinogram", stage_sinogram)
    t_reconstruct = cached("reconstruct", stage_reconstruct, retries=1)
    t_mapping = cached("mapping", stage_mapping)
    t_superres = cached("superres", stage_superres)
    t_publish = task(name="publish")(stage_publish)

    @flow(name="process_scan", log_prints=True)
    @resolved_annotations
    def process_scan(scan: str, poni: str | None = None, pipeline: Pipeline = "default",
                     out: str = "xrdct-out", dask_address: str | None = None,
                     n_workers: int | None = None, backend: str | None = None,
                     cluster: str | None = None) -> str:
        """Process one XRD-CT scan into a chemical-image product (Zarr v3).

        Parameters
        ----------
        scan : str
            NeXus/HDF5 frame file, scan table (CSV) of detector images, or HDF5 sinogram cube.
        poni : str, optional
            pyFAI PONI calibration (else the spec's ``calibration.poni``).
        pipeline : str
            Shipped spec name (``default``, ``battery``, ``catalyst``, ``demo``) or a YAML path.
        out : str
            Product directory; the product is ``<out>/<product_id>.zarr``.
        dask_address : str, optional
            Attach to an existing Dask scheduler instead of starting a LocalCluster.
        backend : {"cpu", "gpu", "auto"}, optional
            Array backend, overriding the spec's ``backend``.
        cluster : str, optional
            ``local`` (default), ``cuda`` (LocalCUDACluster, one worker per GPU) or a
            scheduler address.
        """
        return run_pipeline(scan, poni=poni, pipeline=pipeline, out=out, dask_address=dask_address,
                            n_workers=n_workers, backend=backend, cluster=cluster,
                            stages=dict(ingest=t_ingest, integrate=t_integrate, sinogram=t_sinogram,
                                        reconstruct=t_reconstruct, mapping=t_mapping,
                                        superres=t_superres, publish=t_publish))

    return process_scan


#: Lock files this process holds now (:func:`product_lock`); the CLI's stop on a signal
#: removes them before it exits.
HELD_LOCKS: set[str] = set()
#: Set when the process was asked to stop (the CLI's SIGTERM / SIGINT handler): no stage
#: starts and nothing is published after it, whichever thread runs the flow.
STOP_REQUESTED = __import__("threading").Event()


@contextlib.contextmanager
def product_lock(req: Request, wait_message=None):
    """Hold the product's lock (``<out>/.locks/<product_id>.lock``, an exclusive ``flock``)
    while it is built; the lock file is removed when its holder lets go.

    A second request for the same content address waits here until the first has
    published (then finds the product and returns it) or died (the operating system
    releases a dead process's lock; the request then resumes the first one's work store).
    The lock is advisory and works across processes of one host and on file systems with
    POSIX locks (local disks, NFSv4, Lustre with ``flock``). Only the holder removes the
    file, while it still holds it; a waiter that then gets the lock of the removed file
    finds it is no longer the file at that path and locks the new one (the usual
    lock-then-check-inode protocol), so two runs never both hold "the" lock. A process
    killed while holding it leaves a 0-byte file, harmless: the next run locks and removes it.

    Parameters
    ----------
    req : Request
    wait_message : callable, optional
        Called once with a message when the lock is held by someone else.
    """
    import fcntl

    told = False
    while True:
        req.lock.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(req.lock, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # .locks removed this instant: make it again
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if wait_message is not None and not told:
                    wait_message(f"product {req.product_id} is being made by another run; waiting")
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(req.lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)  # locked a file its holder removed meanwhile: lock the one there now
    HELD_LOCKS.add(str(req.lock))
    try:
        yield
    finally:
        HELD_LOCKS.discard(str(req.lock))
        with contextlib.suppress(OSError):
            os.unlink(req.lock)  # still held: nobody else can have it
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def open_work(req: Request) -> dict:
    """Create the work store of ``req``, or reopen the one a crashed run left (call with
    the product lock held). Sets ``req.work_token``.

    Returns
    -------
    dict
        Stage name -> the info each finished stage recorded (empty for a new store).
    """
    import zarr

    req.work.parent.mkdir(parents=True, exist_ok=True)
    prov = store.provenance(req.work) if (req.work / "zarr.json").exists() else {}
    if prov.get("product_id") != req.product_id or not prov.get("work_token"):
        shutil.rmtree(req.work, ignore_errors=True)  # not a work store of this product
        zarr.open_group(str(req.work), mode="w", zarr_format=3)
        prov = {"product_id": req.product_id, "work_token": uuid.uuid4().hex[:16]}
        store.update_attrs(req.work, prov)
    req.work_token = prov["work_token"]
    return dict(prov.get("stages_done", {}))


def resumable(name: str, fn):
    """Wrap the stage ``fn(req) -> dict`` so that a stage a previous attempt finished in
    this work store is not run again: the info it recorded is returned instead. A stage
    counts as finished only once its variables are written and its record is added
    (the record is written last), so a stage killed half-way runs again in full."""

    def stage(req: Request) -> dict:
        done = dict(store.provenance(req.work).get("stages_done", {}))
        if name in done:
            progress.report(name, 1, 1)
            return {**done[name], "resumed": True}
        info = fn(req)
        store.update_attrs(req.work, {"stages_done": {**done, name: info}})
        return info

    stage.__name__ = stage.__qualname__ = f"stage_{name}"
    stage.__doc__ = fn.__doc__
    return stage


def stage_cache_key(name: str):
    """Prefect ``cache_key_fn`` of stage ``name``: ``xrdct-<product id>-<work token>-<stage>``.

    The product id is the content address (spec, code version, input and calibration
    checksums), so the cache key and the flow runs' idempotency key come from the same hash;
    the work token ties an entry to the work store it describes.
    """

    def key(_context, parameters) -> str:
        req = parameters["req"]
        return f"xrdct-{req.product_id}-{req.work_token}-{name}"

    return key


STAGES = ("ingest", "integrate", "sinogram", "reconstruct", "mapping", "superres")


def run_pipeline(scan, poni=None, pipeline="default", out="xrdct-out", dask_address=None,
                 n_workers=None, stages=None, backend=None, cluster=None) -> str:
    """Run every stage of the pipeline on one scan; returns the published product path.

    ``stages`` maps stage names to callables (Prefect tasks inside the flow; the
    :func:`resumable` ``stage_*`` functions otherwise). An already-published product is
    returned as is once the catalog has its row; one published without it (a run killed
    between the rename and the catalog write, a catalog locked or corrupt then) gets the row
    from its own attrs first (:func:`register_product_store`); a request for a product
    another run is making waits for it
    (:func:`product_lock`); a request whose earlier attempt died resumes after the last
    stage that attempt finished. ``backend`` (``cpu``, ``gpu``, ``auto``) overrides the
    spec's ``backend`` (it is part of the spec, hence of the product id); ``gpu`` without a
    device raises :class:`tasks._xp.BackendError` before anything runs. ``cluster`` picks
    the Dask cluster (see :class:`_dask_client`).

    What a failure leaves behind:

    * bad input (:func:`input_errors`: a ``ValueError`` of the project, raised by
      :func:`make_request` or by a stage: spec, path, PONI, CIF, frames, grid, mask) leaves
      nothing: no product, no catalog row, and the work store is removed. The product id is
      the hash of the inputs, so the same request would fail the same way: there is nothing
      to resume. Errors found by :func:`make_request` (spec, paths, missing files) come
      before any work store exists; the ingest stage checks the scan, the PONI's detector
      and the CIFs before anything is integrated.
    * anything else (a killed worker, out of memory, an I/O or Prefect failure, a bug) keeps
      the work store, so that the next request for the product resumes after the last
      stage that finished (:func:`open_work`, :func:`resumable`).

    Nothing is published by a failed request in either case: publishing is the last step.
    The catalog is opened before any work, so a catalog that is locked past
    ``XRDCT_CATALOG_TIMEOUT_S``, corrupt or read-only fails the request first
    (:class:`catalog.db.CatalogError`); if it fails only at publishing, the product stays
    published and the next request adds its row. The product's lock file is removed when
    the request ends, whatever the outcome.

    Raises
    ------
    OutputError
        ``out`` is a file or not writable.
    catalog.db.CatalogError
        The catalog cannot be used.
    ClusterUnreachableError
        The Dask scheduler at ``dask_address`` did not answer within
        ``XRDCT_DASK_CONNECT_TIMEOUT_S`` seconds (10).
    """
    if backend is not None:
        from tasks._xp import BACKENDS

        if backend not in BACKENDS:
            raise SpecError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        pipeline = (pipeline if isinstance(pipeline, PipelineSpec) else load_spec(pipeline)).model_copy(deep=True)
        pipeline.backend = backend
    stages = stages or plain_stages()
    started = time.perf_counter()
    check_out(out)
    req = make_request(scan, pipeline, poni, out)
    if req.final.exists() and _catalogued(req):
        return str(req.final)
    spec = req.spec
    from tasks._xp import resolve_backend

    resolve_backend(spec.backend)  # gpu without a device: one clear error, before any stage
    if not req.final.exists():
        _check_catalog(req)  # a locked, corrupt or read-only catalog fails here, before any work
    with product_lock(req, wait_message=_log_info):
        if req.final.exists():  # made by the run we waited for, or published without its row
            _repair_published(req)
            return str(req.final)
        done = open_work(req)
        if done:
            _log_info(f"product {req.product_id}: resuming after {', '.join(done)}")
        info = {}

        def run(name, *args):
            if STOP_REQUESTED.is_set():
                raise ProcessingError(f"product {req.product_id}: stopped before stage {name} (a "
                                      f"stop was requested); the work store is kept for a resume")
            try:
                out = stages[name](req, *args)
                if name in done:  # finished by an earlier attempt (work-store record or Prefect cache)
                    out = {**out, "resumed": True}
                return out
            except OSError as err:
                if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                req.discard_work()  # a half-written array cannot be resumed from
                raise ProcessingError(
                    f"disk full while stage {name} wrote the work store {req.work} of product "
                    f"{req.product_id} ({err.strerror}); the work store was removed and nothing "
                    f"was published; free space under {Path(req.out)} and run again") from err

        try:
            with _dask_client(dask_address, n_workers, cluster):
                info["ingest"] = run("ingest")
                info["integrate"] = run("integrate")
                kind = info["integrate"]["kind"]
                if kind != "map" and spec.reconstruction.enabled:
                    info["sinogram"] = run("sinogram")
                    info["reconstruct"] = run("reconstruct")
                if spec.mapping.enabled and (kind == "map" or spec.reconstruction.enabled):
                    info["mapping"] = run("mapping")
                    if spec.superres.enabled:
                        info["superres"] = run("superres")
                check_finite(req, info)
                return run("publish", started, info)
        except Exception as err:
            if isinstance(err, input_errors()) or (isinstance(err, ClusterUnreachableError) and not done):
                # bad input: the same inputs fail the same way: nothing is kept for a resume
                # (nor is a work store that no stage has written to)
                req.discard_work()
            raise


#: Map variables that must be finite wherever ``sample_mask`` is True before a product is
#: published (:func:`check_finite`); ``weight_fraction`` only where some phase has a
#: positive scale (it is 0 / 0 = NaN, by definition, where every fitted scale is 0).
FINITE_MAPS = ("scale", "weight_fraction", "rwp")
#: The stage that writes each variable checked, upstream first (where a non-finite map is
#: traced back to).
_STAGE_OF = (("integrate", "patterns"), ("sinogram", "sinogram"), ("reconstruct", "volume"),
             ("mapping", "scale"), ("mapping", "weight_fraction"), ("mapping", "rwp"),
             ("superres", "scale_sr"), ("superres", "weight_fraction_sr"))


def _nonfinite(work: Path, name: str, sample=None) -> tuple[int, int, tuple] | None:
    """Count the non-finite values of variable ``name`` of the work store, slice by slice
    along z (only where ``sample``, (z, y, x) bool, is True for variables with y and x);
    (count, total, index of the first) or None when all are finite."""
    import zarr

    arr = zarr.open_group(str(work), mode="r")[name]
    dims = list(arr.metadata.dimension_names or ())
    bad = total = 0
    first = None
    for iz in range(arr.shape[0]):
        a = np.asarray(arr[iz])
        ok = np.isfinite(a)
        if sample is not None and "y" in dims and "x" in dims:
            m = sample[iz]
            # (phase, y, x) or (y, x): broadcast the slice's sample mask
            where = np.broadcast_to(m, a.shape) if a.shape[-2:] == m.shape else np.ones(a.shape, bool)
        else:
            where = np.ones(a.shape, bool)
        nb = int((~ok & where).sum())
        total += int(where.sum())
        if nb and first is None:
            first = (iz,) + tuple(int(v) for v in np.argwhere(~ok & where)[0])
        bad += nb
    return (bad, total, first) if bad else None


def check_finite(req: Request, stage_info: dict) -> None:
    """Refuse to publish a product whose maps are not finite where the sample is.

    The product's result (the maps ``scale``, ``weight_fraction``, ``rwp`` where
    ``sample_mask`` is True, weight fractions where some phase is present, when mapping
    ran; else the ``volume``, else the ``patterns``)
    is checked slice by slice. When a value is NaN or inf, the variables upstream are
    checked in stage order and the first stage whose output holds non-finite values is
    named.

    Raises
    ------
    ProcessingError
        Non-finite values where the sample is; the message names the stage, the variable,
        the count and the first index, and the work store, which is kept for inspection
        (not an input error: :func:`run_pipeline` keeps it).
    """
    import zarr

    g = zarr.open_group(str(req.work), mode="r")
    names = set(g.array_keys())
    sample = np.asarray(g["sample_mask"][...], bool) if "sample_mask" in names else None
    where = {}
    if sample is not None and "scale" in names:
        present = np.nansum(np.asarray(g["scale"][...], np.float64), axis=1) > 0   # (z, y, x)
        where["weight_fraction"] = sample & present
    if "mapping" in stage_info and sample is not None:
        final = [v for v in FINITE_MAPS if v in names]
    elif "volume" in names:
        final = ["volume"]
    else:
        final = [v for v in ("patterns", "volume") if v in names][:1]
    if not any(_nonfinite(req.work, v, where.get(v, sample)) for v in final):
        return
    for stage, var in _STAGE_OF:
        if var not in names:
            continue
        got = _nonfinite(req.work, var, where.get(var, sample))
        if got:
            bad, total, first = got
            where = " where the sample is" if stage in ("mapping", "superres") else ""
            raise ProcessingError(
                f"stage {stage} produced non-finite values: {var} holds {bad} NaN/inf of "
                f"{total} values{where} (first at index {first}) for {req.scan}; nothing was "
                f"published; the work store {req.work} is kept for inspection")


def input_errors() -> tuple[type[Exception], ...]:
    """The errors that mean "this input cannot be processed" (all ``ValueError``s, each
    naming the file and the field): :func:`run_pipeline` removes the work store of a request
    that fails with one, and the CLI exits with status 2 and the message."""
    from flows.paths import PathNotAllowedError
    from tasks.ingest import IngestError
    from tasks.integrate import IntegrationError
    from tasks.rietveld import PhaseError, ProfileError
    from tasks.sinogram import SinogramError

    return (SpecError, PathNotAllowedError, IngestError, IntegrationError, PhaseError, ProfileError,
            SinogramError)


def plain_stages() -> dict:
    """The stages as plain (resumable) functions: what runs without Prefect."""
    fns = dict(ingest=stage_ingest, integrate=stage_integrate, sinogram=stage_sinogram,
               reconstruct=stage_reconstruct, mapping=stage_mapping, superres=stage_superres)
    return {**{k: resumable(k, f) for k, f in fns.items()}, "publish": stage_publish}


def _log_info(msg: str) -> None:
    """Log to the Prefect run logger inside a run, else to the ``xrdct`` logger."""
    import logging

    try:
        if "prefect" not in sys.modules:  # not inside a flow run; don't import Prefect
            raise LookupError
        from prefect import get_run_logger

        get_run_logger().info(msg)
    except Exception:  # noqa: BLE001 - outside a Prefect run
        logging.getLogger("xrdct").info(msg)


class _dask_client:
    """Context manager: attach to the scheduler at ``address`` (or ``XRDCT_DASK_ADDRESS``),
    or start a LocalCluster.

    With ``n_workers`` unset the LocalCluster is one worker process-free (threads, as many
    as cores): the kernels release the GIL, the integrator is built once and shared, and
    nothing is pickled. Measured on the demo scan (2 cores): integration 6.8 s on threads
    against 12.5 s on two worker processes. ``n_workers`` asks for that many worker
    processes instead (one thread each), for machines with many cores; glibc's
    ``MALLOC_TRIM_THRESHOLD_`` is raised there, because Dask's default (64 kB) makes
    numpy's large temporaries page-fault on every allocation.

    ``cluster`` (or ``XRDCT_CLUSTER``): ``local`` (the above, default), ``cuda`` (a
    ``dask_cuda.LocalCUDACluster``, one worker per visible GPU or ``n_workers``; dask_cuda
    is imported only then, and its absence is one :class:`tasks._xp.BackendError`), or a
    scheduler address (``tcp://host:8786``), the same as ``address``.
    """

    def __init__(self, address, n_workers, cluster=None):
        kind = (cluster or os.environ.get("XRDCT_CLUSTER") or "local").strip()
        if kind not in ("local", "cuda"):
            if ":" not in kind:
                from tasks._xp import BackendError

                raise BackendError(f"cluster {kind!r}: expected 'local', 'cuda' or a Dask "
                                   f"scheduler address such as tcp://host:8786")
            address, kind = address or kind, "local"
        self.kind = kind
        # a facility worker names its cluster once, for every flow it runs
        self.address = address or os.environ.get("XRDCT_DASK_ADDRESS") or None
        self.n_workers = n_workers
        self.client = self.cluster = None

    def __enter__(self):
        import dask
        from distributed import Client, LocalCluster

        if self.address:
            t = float(os.environ.get("XRDCT_DASK_CONNECT_TIMEOUT_S", "10"))
            try:
                self.client = Client(self.address, timeout=t)
            except (OSError, TimeoutError) as err:
                why = " ".join(str(err).split()) or type(err).__name__
                raise ClusterUnreachableError(
                    f"Dask scheduler {self.address}: not reachable within {t:g} s "
                    f"(XRDCT_DASK_CONNECT_TIMEOUT_S): {why[:200]}") from None
        elif self.kind == "cuda":
            try:
                from dask_cuda import LocalCUDACluster
            except ImportError as err:
                from tasks._xp import BackendError

                raise BackendError(f"cluster 'cuda' needs dask_cuda ({err}); install the gpu "
                                   f"extra (pip install -e '.[gpu]') or use cluster 'local'") from None
            self.cluster = LocalCUDACluster(n_workers=self.n_workers, dashboard_address=None,
                                            silence_logs=40)
            self.client = Client(self.cluster)
        elif self.n_workers is None:
            self.cluster = LocalCluster(n_workers=1, threads_per_worker=os.cpu_count() or 1,
                                        processes=False, dashboard_address=None, silence_logs=40)
            self.client = Client(self.cluster)
        else:
            with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 1 << 30}):
                self.cluster = LocalCluster(n_workers=self.n_workers, threads_per_worker=1,
                                            processes=True, dashboard_address=None, silence_logs=40)
            self.client = Client(self.cluster)
        return self.client

    def __exit__(self, *exc):
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        return False


_FLOW = None


def get_flow():
    """The Prefect flow ``process_scan`` (built on first use, so importing this module
    does not import Prefect)."""
    global _FLOW
    if _FLOW is None:
        _FLOW = _build_flow()
    return _FLOW


def request_dict(req: Request) -> dict:
    return asdict(req)
