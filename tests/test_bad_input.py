"""Bad input, case by case: the real pipeline (``run_pipeline``, and the CLI for some) on a
broken copy of a small simulated scan stops with the project's error, whose message names
the file and the field and says what was expected, and publishes nothing: no product store,
no overview PNG, no work store left in ``<out>/.work``, no catalog row.

The scan (12 translations x 12 angles, 213 x 206 px Eiger 1M binned 5x5) is simulated once
per module; each case copies it and breaks one thing with h5py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest

from flows.process import run_pipeline
from helpers import ROOT, subprocess_env
from pipelines.spec import SpecError
from tasks.ingest import IngestError, open_scan
from tasks.integrate import IntegrationError
from tasks.rietveld import PhaseError
from tasks.simulate import preset, simulate_scan

FRAMES = "/entry/instrument/detector/data"   # hard-linked as /entry/data/data (NXdata signal)
ANGLES = ("/entry/sample/rotation_angle", "/entry/data/rotation_angle")  # one dataset, two links
TRANS = ("/entry/sample/translation", "/entry/data/translation")
N = 12


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    cfg = preset("small").model_copy(update={"n_translations": N, "n_angles": N})
    return simulate_scan(tmp_path_factory.mktemp("bad_input_sim") / "scan", cfg)


def _copy(sim, d: Path) -> Path:
    p = d / "scan.nxs"
    shutil.copy(sim.nexus_path, p)
    return p


def _replace(h, links, data, **kw):
    """Replace the dataset behind every link in ``links`` by one new dataset ``data``."""
    attrs = dict(h[links[0]].attrs)
    for ln in links:
        if ln in h:
            del h[ln]
    h.create_dataset(links[0], data=data, **kw)
    for k, v in attrs.items():
        h[links[0]].attrs[k] = v
    for ln in links[1:]:
        h[ln] = h[links[0]]


def _replace_frames(h, data):
    chunks = (1,) + data.shape[1:] if data.shape[0] else None
    kw = dict(chunks=chunks, **hdf5plugin.Bitshuffle()) if chunks and data.dtype.kind in "uif" else {}
    _replace(h, (FRAMES, "/entry/data/data"), data, **kw)


def _good_pixel(sim):
    """A detector pixel that no mask excludes (the gaps of the Eiger are masked)."""
    import fabio

    m = fabio.open(str(sim.mask_path)).data
    y, x = np.argwhere(m == 0)[len(np.argwhere(m == 0)) // 2]
    return int(y), int(x)


def _spec(d: Path, text: str) -> Path:
    p = d / "spec.yaml"
    p.write_text(text)
    return p


# ------------------------------------------------------------------------------ cases
# Each builds the broken input in directory d and returns what to run and what to expect:
# scan, poni, pipeline; error type; substrings the message must hold ("{scan}", "{poni}",
# "{spec}", "{d}" are filled in).


def truncated_hdf5(sim, d):
    p = _copy(sim, d)
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size * 6 // 10)
    return dict(scan=p), IngestError, ["{scan}", "truncated", "expected a complete HDF5"]


def corrupt_frame_chunk(sim, d):
    """A frame's compressed chunk overwritten: found when that frame is read (integration)."""
    p = _copy(sim, d)
    with h5py.File(p, "r") as h:
        info = h[FRAMES].id.get_chunk_info(37)
    with open(p, "r+b") as f:
        f.seek(info.byte_offset)
        f.write(b"\xff" * 32)
    return dict(scan=p), IngestError, ["{scan}", "/data", "input.frames", "cannot read frames",
                                       "first unreadable frame 37"]


def missing_frames_dataset(sim, d):
    p = _copy(sim, d)
    with h5py.File(p, "r+") as h:
        del h[FRAMES], h["/entry/data/data"]
    return dict(scan=p), IngestError, ["{scan}", "input.frames", "/entry/data/data", "does not exist"]


def missing_angle_dataset(sim, d):
    p = _copy(sim, d)
    with h5py.File(p, "r+") as h:
        for ln in ANGLES:
            del h[ln]
    return dict(scan=p), IngestError, ["{scan}", "input.angle", "no angle dataset"]


def frames_wrong_dtype_bool(sim, d):
    p = _copy(sim, d)
    with h5py.File(p, "r+") as h:
        data = h[FRAMES][()] > 3
        _replace_frames(h, data)
    return dict(scan=p), IngestError, ["{scan}", "input.frames", "dtype bool",
                                       "expected integer or float"]


def angles_wrong_dtype_string(sim, d):
    p = _copy(sim, d)
    with h5py.File(p, "r+") as h:
        a = h[ANGLES[0]][()]
        _replace(h, ANGLES, np.array([f"{v:g} deg" for v in a], dtype=h5py.string_dtype()))
    return dict(scan=p), IngestError, ["{scan}", "input.angle", "rotation_angle", "expected numbers"]


def nan_frames(sim, d):
    p = _copy(sim, d)
    y, x = _good_pixel(sim)
    with h5py.File(p, "r+") as h:
        data = h[FRAMES][()].astype(np.float32)
        data[100, y, x] = np.nan
        _replace_frames(h, data)
    return dict(scan=p), IngestError, ["{scan}", FRAMES, "frame 100", "NaN/inf",
                                       f"row {y}, col {x}", "expected finite values"]


def inf_frames(sim, d):
    p = _copy(sim, d)
    y, x = _good_pixel(sim)
    with h5py.File(p, "r+") as h:
        data = h[FRAMES][()].astype(np.float64)
        data[3, y, x] = np.inf
        _replace_frames(h, data)
    return dict(scan=p), IngestError, ["{scan}", FRAMES, "frame 3", "NaN/inf"]


def frame_count_not_angles(sim, d):
    """143 frames, 144 angles and translations."""
    p = _copy(sim, d)
    with h5py.File(p, "r+") as h:
        _replace_frames(h, h[FRAMES][:-1])
    return dict(scan=p), IngestError, ["{scan}", "input.angle", "rotation_angle", "(144,)",
                                       "143 values"]


def incomplete_grid(sim, d):
    """143 frames with 143 angles and translations: the 12 x 12 table misses one point."""
    p = _copy(sim, d)
    with h5py.File(p, "r+") as h:
        _replace_frames(h, h[FRAMES][:-1])
        for links in (ANGLES, TRANS, ("/entry/sample/z", "/entry/data/z"),
                      ("/entry/monitor/data",)):
            _replace(h, links, h[links[0]][:-1])
    return dict(scan=p), IngestError, ["{scan}", "input.angle, input.translation",
                                       "incomplete grid", "1 of 144", "143 frames for 144 points"]


def duplicated_angles(sim, d):
    """The second angle row repeats the first (0 deg twice, 15 deg never)."""
    p = _copy(sim, d)
    with h5py.File(p, "r+") as h:
        a = h[ANGLES[0]][()]
        a[N:2 * N] = a[:N]
        _replace(h, ANGLES, a)
    return dict(scan=p), IngestError, ["{scan}", "input.angle, input.translation",
                                       "duplicated grid point", "angle=0", "frames [0, 12]",
                                       "expected one frame per point"]


def poni_other_detector(sim, d):
    poni = d / "pilatus.poni"
    poni.write_text(sim.poni_path.read_text().replace("Detector: Eiger1M", "Detector: Pilatus1M")
                    .replace('Detector_config: {"pixel1": 0.00037499999999999995, '
                             '"pixel2": 0.00037499999999999995, "orientation": 3}',
                             'Detector_config: {"orientation": 3}'))
    return (dict(scan=sim.nexus_path, poni=poni), IngestError,
            ["{scan}", "input.frames", "calibration.poni", "{poni}", "Pilatus", "(1043, 981)",
             "(213, 206)"])


def poni_not_a_poni(sim, d):
    poni = d / "garbage.poni"
    poni.write_text("this is not a calibration\n")
    return dict(scan=sim.nexus_path, poni=poni), SpecError, ["calibration.poni", "{poni}",
                                                              "Distance"]


def poni_missing(sim, d):
    return (dict(scan=sim.nexus_path, poni=d / "nowhere.poni"), SpecError,
            ["calibration.poni", "{d}/nowhere.poni", "not found"])


_PHASES = """
mapping:
  enabled: true
  phases:
    - {{name: NiO, cif: phases/NiO.cif}}
    - {{name: X, cif: {cif}}}
"""


def cif_missing(sim, d):
    spec = _spec(d, _PHASES.format(cif="X_missing.cif"))
    return (dict(scan=sim.nexus_path, pipeline=spec), SpecError,
            ["{spec}", "mapping.phases[1].cif", "X_missing.cif", "not found"])


def cif_malformed(sim, d):
    (d / "X.cif").write_text("data_X\n_cell_length_a 4.2\n_cell_length_b oops\nloop_\n_atom_site_label\n")
    spec = _spec(d, _PHASES.format(cif="X.cif"))
    return (dict(scan=sim.nexus_path, pipeline=spec), PhaseError,
            ["mapping.phases[1].cif", "{d}/X.cif", "phase 'X'", "malformed CIF"])


def spec_unknown_keys(sim, d):
    spec = _spec(d, "integration:\n  npt: 500\n  colour: red\nreconstruction:\n  algorithm: sirt\n")
    return (dict(scan=sim.nexus_path, pipeline=spec), SpecError,
            ["{spec}", "integration.colour", "reconstruction.algorithm", "unknown key"])


def spec_impossible_values(sim, d):
    spec = _spec(d, "integration:\n  npt: 3\n  radial_range: [40, 10]\nsinogram:\n  air_columns: -2\n")
    return (dict(scan=sim.nexus_path, pipeline=spec), SpecError,
            ["{spec}", "integration.npt", "greater than or equal to 8", "integration.radial_range",
             "min < max", "sinogram.air_columns"])


def empty_scan(sim, d):
    p = _copy(sim, d)
    with h5py.File(p, "r+") as h:
        _replace_frames(h, np.zeros((0, 213, 206), np.uint32))
        for links in (ANGLES, TRANS, ("/entry/sample/z", "/entry/data/z"), ("/entry/monitor/data",)):
            _replace(h, links, np.zeros(0))
    return dict(scan=p), IngestError, ["{scan}", "input.frames", "(0, 213, 206)", "empty scan"]


def every_pixel_masked(sim, d):
    import fabio.edfimage

    mask = d / "all.edf"
    fabio.edfimage.EdfImage(data=np.ones((213, 206), np.int8)).write(str(mask))
    spec = _spec(d, f"calibration:\n  mask: {mask}\n")
    return (dict(scan=sim.nexus_path, pipeline=spec), IntegrationError,
            ["{d}/all.edf", "calibration.mask", "every one of the 213 x 206 detector pixels is masked"])


def mask_wrong_shape(sim, d):
    import fabio.edfimage

    mask = d / "small.edf"
    fabio.edfimage.EdfImage(data=np.zeros((100, 100), np.int8)).write(str(mask))
    spec = _spec(d, f"calibration:\n  mask: {mask}\n")
    return (dict(scan=sim.nexus_path, pipeline=spec), IntegrationError,
            ["{d}/small.edf", "calibration.mask", "(100, 100)", "expected the detector shape (213, 206)"])


def radial_range_off_the_detector(sim, d):
    spec = _spec(d, "integration:\n  radial_range: [500, 600]\n")
    return (dict(scan=sim.nexus_path, pipeline=spec), IntegrationError,
            ["{poni}", "integration.radial_range", "(500.0, 600.0)", "no unmasked detector pixel",
             "cover 0.09"])


# ---- issue 15, class 3: physically impossible input, refused before any work starts


def _poni_with(sim, d, key, value):
    """The scan's PONI with the line ``key: ...`` set to ``value``."""
    lines = [f"{key}: {value}" if ln.split(":", 1)[0].strip() == key else ln
             for ln in sim.poni_path.read_text().splitlines()]
    assert any(ln == f"{key}: {value}" for ln in lines)
    poni = d / "bad.poni"
    poni.write_text("\n".join(lines) + "\n")
    return poni


def poni_negative_distance(sim, d):
    return (dict(scan=sim.nexus_path, poni=_poni_with(sim, d, "Distance", -0.45)), SpecError,
            ["calibration.poni", "{poni}", "Distance -0.45 m", "expected the sample-to-detector "
             "distance in metres, 0.001 .. 100 m"])


def poni_zero_distance(sim, d):
    return (dict(scan=sim.nexus_path, poni=_poni_with(sim, d, "Distance", 0.0)), SpecError,
            ["calibration.poni", "{poni}", "Distance 0.0 m", "0.001 .. 100 m"])


def poni_distance_in_mm(sim, d):
    return (dict(scan=sim.nexus_path, poni=_poni_with(sim, d, "Distance", 450.0)), SpecError,
            ["calibration.poni", "{poni}", "Distance 450.0 m", "mm written as metres"])


def poni_wavelength_angstrom_as_m(sim, d):
    return (dict(scan=sim.nexus_path, poni=_poni_with(sim, d, "Wavelength", 0.1746)), SpecError,
            ["calibration.poni", "{poni}", "Wavelength 0.1746 m", "Angstrom written as metres",
             "X-ray wavelength in metres, 1e-12 .. 1e-08 m"])


def poni_negative_wavelength(sim, d):
    return (dict(scan=sim.nexus_path, poni=_poni_with(sim, d, "Wavelength", -1.746e-11)),
            SpecError, ["calibration.poni", "{poni}", "Wavelength -1.746e-11 m", "1e-12 .. 1e-08 m"])


def poni_zero_wavelength(sim, d):
    return (dict(scan=sim.nexus_path, poni=_poni_with(sim, d, "Wavelength", 0.0)), SpecError,
            ["calibration.poni", "{poni}", "Wavelength 0.0 m", "1e-12 .. 1e-08 m"])


def spec_wavelength_angstrom_as_m(sim, d):
    spec = _spec(d, "input:\n  wavelength_m: 0.1746\n")
    return (dict(scan=sim.nexus_path, pipeline=spec), SpecError,
            ["{spec}", "input.wavelength_m", "less than or equal to", "(got 0.1746)"])


def angles_radians_labelled_deg(sim, d):
    p = _copy(sim, d)
    with h5py.File(p, "r+") as h:
        assert h[ANGLES[0]].attrs["units"] in ("deg", b"deg")
        _replace(h, ANGLES, np.deg2rad(h[ANGLES[0]][()]))   # the attrs (units=deg) kept
    return dict(scan=p), IngestError, ["{scan}", "rotation_angle", "input.angle", "units 'deg'",
                                       "radians, not degrees", "or units='rad'"]


def angles_without_units_in_radians(sim, d):
    p = _copy(sim, d)
    with h5py.File(p, "r+") as h:
        _replace(h, ANGLES, np.deg2rad(h[ANGLES[0]][()]))
        del h[ANGLES[0]].attrs["units"]
    return dict(scan=p), IngestError, ["{scan}", "rotation_angle", "input.angle",
                                       "no units attribute (degrees assumed)", "radians"]


def angles_degrees_labelled_rad(sim, d):
    p = _copy(sim, d)
    with h5py.File(p, "r+") as h:
        h[ANGLES[0]].attrs["units"] = "rad"
    return dict(scan=p), IngestError, ["{scan}", "rotation_angle", "input.angle", "units 'rad'",
                                       "degrees, not radians"]


def _subset(sim, d, keep):
    """The scan with only the frames ``keep(angle, translation)`` selects."""
    p = _copy(sim, d)
    with h5py.File(p, "r+") as h:
        sel = np.flatnonzero(keep(h[ANGLES[0]][()], h[TRANS[0]][()]))
        _replace_frames(h, h[FRAMES][()][sel])
        for links in (ANGLES, TRANS, ("/entry/sample/z", "/entry/data/z"), ("/entry/monitor/data",)):
            _replace(h, links, h[links[0]][()][sel])
    return p


def two_angles(sim, d):
    p = _subset(sim, d, lambda a, t: np.isin(a, np.unique(a)[:2]))
    return dict(scan=p), IngestError, ["{scan}", "input.angle", "2 distinct angle position(s)",
                                       "expected at least 3"]


def one_angle(sim, d):
    p = _subset(sim, d, lambda a, t: a == a.min())
    return dict(scan=p), IngestError, ["{scan}", "input.angle", "1 distinct angle position(s)",
                                       "expected at least 3"]


def one_translation(sim, d):
    p = _subset(sim, d, lambda a, t: t == t[0])
    return dict(scan=p), IngestError, ["{scan}", "input.translation",
                                       "1 distinct translation position(s)", "expected at least 3"]


def same_cif_twice(sim, d):
    spec = _spec(d, _PHASES.format(cif="phases/NiO.cif"))
    return (dict(scan=sim.nexus_path, pipeline=spec), SpecError,
            ["mapping.phases[1].cif", "phases/NiO.cif", "phase 'X'", "mapping.phases[0].cif",
             "'NiO'", "expected distinct structures"])


def same_structure_other_file(sim, d):
    """The same structure in another file (a comment added): found by comparing structures."""
    (d / "X.cif").write_text("# a copy\n" + (ROOT / "pipelines/phases/NiO.cif").read_text())
    spec = _spec(d, _PHASES.format(cif="X.cif"))
    return (dict(scan=sim.nexus_path, pipeline=spec), PhaseError,
            ["mapping.phases[1].cif", "{d}/X.cif", "phase 'X'", "same crystal structure",
             "mapping.phases[0].cif", "expected distinct structures"])


def all_zero_frames(sim, d):
    p = _copy(sim, d)
    with h5py.File(p, "r+") as h:
        _replace_frames(h, np.zeros(h[FRAMES].shape, np.uint32))
    return dict(scan=p), IngestError, ["{scan}", "/data", "input.frames", "blank scan",
                                       "each hold one value in every pixel (0)",
                                       "expected diffraction frames"]


def constant_frames(sim, d):
    p = _copy(sim, d)
    with h5py.File(p, "r+") as h:
        _replace_frames(h, np.full(h[FRAMES].shape, 7.0, np.float32))
    return dict(scan=p), IngestError, ["{scan}", "/data", "input.frames", "blank scan", "(7)"]


def _chunk_bytes(p, i):
    with h5py.File(p, "r") as h:
        info = h[FRAMES].id.get_chunk_info(i)
    return info.byte_offset, info.size


def _chunk_overwritten(sim, d, frame, at, data):
    """A copy of the scan with ``data`` written ``at`` bytes into frame ``frame``'s chunk;
    the case's expected error names the file, dataset, field, frame and chunk."""
    p = _copy(sim, d)
    off, _ = _chunk_bytes(p, frame)
    with open(p, "r+b") as f:
        f.seek(off + at)
        f.write(data)
    return dict(scan=p), IngestError, ["{scan}", "/data", "input.frames",
                                       f"first unreadable frame {frame}", f"chunk ({frame}, 0, 0)"]


def chunk_size_header_flipped(sim, d):
    """The decoded-size field of a bitshuffle chunk header changed."""
    return _chunk_overwritten(sim, d, 37, 6, b"\x7f")


def chunk_lz4_block_size_flipped(sim, d):
    """The compressed size of the first LZ4 block of a chunk changed (decoder error)."""
    return _chunk_overwritten(sim, d, 50, 12, b"\x00\x7f")


def chunk_fletcher32_mismatch(sim, d):
    """A byte flipped inside the LZ4 payload of a file written with HDF5 Fletcher32
    checksums: undetectable by the decoder alone, found by the checksum."""
    p = _copy(sim, d)
    with h5py.File(p, "r+") as h:
        data = h[FRAMES][()]
        _replace(h, (FRAMES, "/entry/data/data"), data, chunks=(1,) + data.shape[1:],
                 fletcher32=True, **hdf5plugin.Bitshuffle())
    off, size = _chunk_bytes(p, 20)
    with open(p, "r+b") as f:
        f.seek(off + size // 2)
        b = f.read(1)
        f.seek(off + size // 2)
        f.write(bytes([b[0] ^ 0x10]))
    return dict(scan=p), IngestError, ["{scan}", "/data", "input.frames", "first unreadable frame 20",
                                       "chunk (20, 0, 0)"]


CASES_ISSUE15 = [poni_negative_distance, poni_zero_distance, poni_distance_in_mm,
                 poni_wavelength_angstrom_as_m, poni_negative_wavelength, poni_zero_wavelength,
                 spec_wavelength_angstrom_as_m,
                 angles_radians_labelled_deg, angles_without_units_in_radians,
                 angles_degrees_labelled_rad, two_angles, one_angle, one_translation,
                 same_cif_twice, same_structure_other_file, all_zero_frames, constant_frames,
                 chunk_size_header_flipped, chunk_lz4_block_size_flipped, chunk_fletcher32_mismatch]


CASES = [truncated_hdf5, corrupt_frame_chunk, missing_frames_dataset, missing_angle_dataset,
         frames_wrong_dtype_bool, angles_wrong_dtype_string, nan_frames, inf_frames,
         frame_count_not_angles, incomplete_grid, duplicated_angles, poni_other_detector,
         poni_not_a_poni, poni_missing, cif_missing, cif_malformed, spec_unknown_keys,
         spec_impossible_values, empty_scan, every_pixel_masked, mask_wrong_shape,
         radial_range_off_the_detector] + CASES_ISSUE15


def _build(case, sim, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    args, err, must = case(sim, d)
    args = {"poni": sim.poni_path, "pipeline": "default", **args}
    fill = {"scan": str(args["scan"]), "poni": str(args["poni"]), "spec": str(args["pipeline"]),
            "d": str(d)}
    return args, err, [m.format(**fill) for m in must]


def assert_nothing_published(out: Path) -> None:
    assert not list(out.glob("*.zarr")), list(out.iterdir())
    assert not list(out.glob("*.png"))
    work = out / ".work"
    assert not work.exists() or not any(work.iterdir()), list(work.iterdir())
    if (out / "catalog.sqlite").exists():
        from catalog.db import Catalog

        cat = Catalog.for_products(out)
        assert cat.products() == []
        cat.dispose()


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_fails_clearly_and_publishes_nothing(case, sim, tmp_path):
    args, err, must = _build(case, sim, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(err) as e:
        run_pipeline(args["scan"], poni=args["poni"], pipeline=args["pipeline"], out=out)
    msg = str(e.value)
    missing = [m for m in must if m not in msg]
    assert not missing, f"message lacks {missing}:\n{msg}"
    assert_nothing_published(out)


@pytest.mark.parametrize("case", [duplicated_angles, cif_malformed, every_pixel_masked,
                                  # issue 15, class 3
                                  poni_negative_distance, poni_wavelength_angstrom_as_m,
                                  angles_radians_labelled_deg, two_angles, same_cif_twice,
                                  all_zero_frames, chunk_lz4_block_size_flipped],
                         ids=lambda c: c.__name__)
def test_cli_exits_2_with_the_message(case, sim, tmp_path):
    args, _, must = _build(case, sim, tmp_path)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "flows.cli", "process", str(args["scan"]),
                        "--poni", str(args["poni"]), "--pipeline", str(args["pipeline"]),
                        "--out", str(out), "--no-prefect"], capture_output=True, text=True,
                       cwd=ROOT, env=subprocess_env(), timeout=300)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert "error:" in r.stdout and "Traceback" not in r.stderr, r.stderr[-3000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("error:")]
    assert len(line) == 1, r.stdout  # one line, naming the file and the field
    missing = [m for m in must if m not in line[0]]
    assert not missing, f"output lacks {missing}:\n{r.stdout}"
    assert_nothing_published(out)


def test_non_monotonic_angle_order_is_a_valid_scan(sim, tmp_path):
    """Angles acquired out of order (interlaced or snake scans) are not an error: frames are
    placed on the grid by their positions. The grid equals the ordered scan's, and each grid
    point holds the frame measured there."""
    p = _copy(sim, tmp_path)
    rng = np.random.default_rng(1)
    perm = rng.permutation(N * N)
    with h5py.File(p, "r+") as h:
        frames = h[FRAMES][()]
        a, t = h[ANGLES[0]][()], h[TRANS[0]][()]
        _replace_frames(h, frames[perm])
        _replace(h, ANGLES, a[perm])
        _replace(h, TRANS, t[perm])
        for links in (("/entry/sample/z", "/entry/data/z"), ("/entry/monitor/data",)):
            _replace(h, links, h[links[0]][()][perm])
    assert np.any(np.diff(a[perm]) < 0)  # really non-monotonic
    ref, shuffled = open_scan(sim.nexus_path), open_scan(p)
    g0, g1 = ref.grid(), shuffled.grid()
    np.testing.assert_array_equal(g0.angle, g1.angle)
    np.testing.assert_array_equal(g0.translation, g1.translation)
    k = (0, 5, 7)
    np.testing.assert_array_equal(shuffled.frames[int(g1.index[k])].compute(),
                                  ref.frames[int(g0.index[k])].compute())


def test_flow_under_prefect_fails_once_with_the_message(sim, tmp_path):
    """The deployed path: the ``process_scan`` flow under a real (test-harness) Prefect API
    on bad input fails with the same error, the ingest task is not retried (bad input fails
    the same way every time), and nothing is published."""
    import httpx
    from prefect.testing.utilities import prefect_test_harness

    from flows.process import get_flow

    args, err, must = _build(duplicated_angles, sim, tmp_path)
    out = tmp_path / "out"
    with prefect_test_harness(server_startup_timeout=120):
        from prefect.settings import PREFECT_API_URL

        with pytest.raises(err) as e:
            get_flow()(scan=str(args["scan"]), poni=str(args["poni"]), pipeline="default",
                       out=str(out))
        # task runs reach the API through its event pipeline, a moment after the flow ends
        import time

        deadline = time.monotonic() + 60
        while True:
            r = httpx.post(f"{PREFECT_API_URL.value()}/task_runs/filter", json={"limit": 50}, timeout=30)
            r.raise_for_status()
            runs = {t["name"].rsplit("-", 1)[0]: t for t in r.json()}
            done = runs and all(t["state"] and t["state"]["type"] in ("FAILED", "COMPLETED", "CRASHED")
                                for t in runs.values())
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert all(m in str(e.value) for m in must), str(e.value)
    assert set(runs) == {"ingest"}, sorted(runs)
    assert runs["ingest"]["state"]["type"] == "FAILED" and runs["ingest"]["run_count"] == 1
    assert_nothing_published(out)


# ------------------------------------------------------------------------------ issue 15
# Class 2: every file a scan reads is inside the data roots and part of the product id.

def _cli(args, out, env=None):
    """``python -m flows.cli process ... --no-prefect``: (exit code, stdout, stderr)."""
    cmd = [sys.executable, "-m", "flows.cli", "process", str(args["scan"]), "--poni",
           str(args["poni"]), "--pipeline", str(args.get("pipeline", "default")), "--out",
           str(out), "--no-prefect"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env={**subprocess_env(), **(env or {})}, timeout=300)
    return r.returncode, r.stdout, r.stderr


def _one_error_line(stdout: str) -> str:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stdout
    return lines[0]


def _linked_scan(sim, scan_dir: Path, frames_dir: Path, how: str) -> tuple[Path, Path]:
    """The scan in ``scan_dir`` with its frames moved to ``frames_dir/frames.h5`` and
    reached through an HDF5 ``ExternalLink`` or a virtual dataset (``how``)."""
    import os

    p = scan_dir / "scan.nxs"
    shutil.copy(sim.nexus_path, p)
    target = frames_dir / "frames.h5"
    rel = os.path.relpath(target, scan_dir)
    with h5py.File(p, "r+") as h:
        data, attrs = h[FRAMES][()], dict(h[FRAMES].attrs)
        with h5py.File(target, "w") as g:
            g.create_dataset("frames", data=data, chunks=(1,) + data.shape[1:], **hdf5plugin.Bitshuffle())
        del h[FRAMES], h["/entry/data/data"]
        if how == "external_link":
            for ln in (FRAMES, "/entry/data/data"):
                h[ln] = h5py.ExternalLink(rel, "/frames")
        else:
            layout = h5py.VirtualLayout(shape=data.shape, dtype=data.dtype)
            layout[...] = h5py.VirtualSource(rel, "frames", shape=data.shape)
            h.create_virtual_dataset(FRAMES, layout)
            for k, v in attrs.items():
                h[FRAMES].attrs[k] = v
            h["/entry/data/data"] = h[FRAMES]
    return p, target


@pytest.fixture
def roots(tmp_path):
    """Data roots raw/ and products/, and a folder outside/ (listed before and after)."""
    from flows.paths import ENV

    raw, prod, outside = (tmp_path / n for n in ("raw", "products", "outside"))
    for d in (raw, prod, outside):
        d.mkdir()
    return raw, prod, outside, {ENV: f"{raw}:{prod}"}


@pytest.mark.parametrize("how", ["external_link", "virtual_dataset"])
def test_cli_refuses_frames_linked_from_outside_the_data_roots(how, sim, roots):
    """Before issue 15 the scan inside a root was processed (exit 0) with frames read from
    outside the roots through the link."""
    raw, prod, outside, env = roots
    scan, target = _linked_scan(sim, raw, outside, how)
    poni = raw / "scan.poni"
    shutil.copy(sim.poni_path, poni)
    before = sorted(outside.rglob("*"))
    rc, so, se = _cli(dict(scan=scan, poni=poni), prod / "out", env)
    assert rc == 2, so[-2000:] + se[-3000:]
    assert "Traceback" not in se, se[-3000:]
    line = _one_error_line(so)
    kind = "ExternalLink /entry" if how == "external_link" else "virtual dataset /entry"
    for m in (f"scan: {scan}", kind, "frames.h5", str(target), "outside the data roots"):
        assert m in line, (m, line)
    assert_nothing_published(prod / "out")
    assert sorted(outside.rglob("*")) == before


@pytest.mark.parametrize("folder", [".work", ".locks"])
def test_cli_refuses_work_and_lock_folders_linked_outside_the_roots(folder, sim, roots):
    """A symlinked ``out/.work`` or ``out/.locks`` leading out of the roots would send the
    run's writes there (before issue 15: exit 0, the work store or lock written outside)."""
    raw, prod, outside, env = roots
    scan, poni = raw / "scan.nxs", raw / "scan.poni"
    shutil.copy(sim.nexus_path, scan)
    shutil.copy(sim.poni_path, poni)
    out = prod / "out"
    out.mkdir()
    (outside / "elsewhere").mkdir()
    (out / folder).symlink_to(outside / "elsewhere", target_is_directory=True)
    rc, so, se = _cli(dict(scan=scan, poni=poni), out, env)
    assert rc == 2, so[-2000:] + se[-3000:]
    line = _one_error_line(so)
    for m in (f"out ({folder} folder)", str(outside / "elsewhere"), "outside the data roots"):
        assert m in line, (m, line)
    assert not any((outside / "elsewhere").iterdir())
    assert not list(out.glob("*.zarr"))


_INTEGRATE_ONLY = "integration: {npt: 200}\nreconstruction: {enabled: false}\n"


@pytest.mark.parametrize("how", ["external_link", "virtual_dataset"])
def test_changed_linked_frames_give_a_new_product_not_the_stale_one(how, sim, tmp_path):
    """The content of the linked frames is part of the product id: after the frames file
    changes, the same request makes a new product from the new frames (before issue 15 it
    returned the product of the old frames: the id hashed only the small link file)."""
    import xarray as xr

    (tmp_path / "det").mkdir()
    scan, target = _linked_scan(sim, tmp_path, tmp_path / "det", how)
    spec = _spec(tmp_path, _INTEGRATE_ONLY)
    out = tmp_path / "out"
    first = run_pipeline(scan, poni=sim.poni_path, pipeline=spec, out=out)
    with h5py.File(target, "r+") as g:
        d = g["frames"]
        d[5] = d[5] * 2
    second = run_pipeline(scan, poni=sim.poni_path, pipeline=spec, out=out)
    assert second != first
    p1, p2 = (xr.open_zarr(p)["patterns"] for p in (first, second))
    grid = open_scan(scan).grid()
    a, t = np.argwhere(np.asarray(grid.index[0]) == 5)[0]
    # the changed frame's pattern doubled (counts / monitor), every other one unchanged
    np.testing.assert_allclose(p2[0, a, t].values, 2 * p1[0, a, t].values, rtol=1e-5)
    diff = np.abs(p2.values - p1.values).sum(axis=-1)[0]
    assert np.count_nonzero(diff) == 1


# Class 3: integer frames whose counts collide with the detector's dummy value.

def test_uint8_counts_at_253_to_255_are_integrated_not_dropped_as_dummies(sim, tmp_path):
    """pyFAI casts the Eiger's dummy (-2, tolerance 1.5) into uint8 as 254 +- 1.5, so the
    brightest counts 253, 254, 255 were masked as dead pixels (5 % of a peak lost). The
    same counts stored as uint8 and as uint16 must give the same patterns."""
    from tasks.integrate import RadialIntegrator  # noqa: F401 - the class whose dummies are fixed

    src = open_scan(sim.nexus_path).frames.compute().astype(np.float64)
    scaled = np.clip(np.round(src * 255.0 / np.percentile(src, 99.5)), 0, 255)
    y, x = _good_pixel(sim)
    out, pats = tmp_path / "out", {}
    for dt in (np.uint8, np.uint16):
        d = tmp_path / np.dtype(dt).name
        d.mkdir()
        p = _copy(sim, d)
        with h5py.File(p, "r+") as h:
            _replace_frames(h, scaled.astype(dt))
        spec = _spec(d, _INTEGRATE_ONLY)
        import xarray as xr

        pats[dt] = xr.open_zarr(run_pipeline(p, poni=sim.poni_path, pipeline=spec, out=out))["patterns"].values
    high = (scaled >= 253).sum()
    assert high > 1000, high  # the case: many counts at 253..255 (gaps are in the static mask)
    assert np.all(np.isfinite(pats[np.uint8]))
    np.testing.assert_allclose(pats[np.uint8], pats[np.uint16], rtol=1e-6, atol=0)
    assert scaled[:, y, x].max() > 0


# Finite maps: a product is published only when its maps are finite where the sample is.

def _poisoned(stage, var, where):
    """The plain stages with ``stage`` followed by NaN written into ``var`` at ``where``
    (an index into slice 0)."""
    import zarr

    from flows.process import plain_stages

    stages = plain_stages()
    inner = stages[stage]

    def poisoned(req):
        info = inner(req)
        a = zarr.open_group(str(req.work), mode="r+")[var]
        s0 = np.asarray(a[0])
        s0[where] = np.nan
        a[0] = s0
        return info

    stages[stage] = poisoned
    return stages


@pytest.mark.parametrize("stage,var,where,spec_text", [
    ("reconstruct", "volume", (5, 6, slice(0, 3)), "integration: {npt: 200}\n"),
    ("integrate", "patterns", (2, 3, slice(None)), _INTEGRATE_ONLY),
    ("mapping", "scale", (0, 6, 6), "integration: {npt: 300, unit: 2th_deg}\n" + _PHASES.format(
        cif="phases/Al2O3_corundum.cif").replace("X,", "Al2O3,")),
], ids=["volume", "patterns", "maps"])
def test_non_finite_maps_are_not_published_and_the_stage_is_named(stage, var, where, spec_text,
                                                                    sim, tmp_path):
    from flows.process import ProcessingError, make_request

    spec = _spec(tmp_path, spec_text)
    out = tmp_path / "out"
    with pytest.raises(ProcessingError) as e:
        run_pipeline(sim.nexus_path, poni=sim.poni_path, pipeline=spec, out=out,
                     stages=_poisoned(stage, var, where))
    msg = str(e.value)
    assert "\n" not in msg
    for m in (f"stage {stage} produced non-finite values", f"{var} holds", str(sim.nexus_path),
              "nothing was published", "kept for inspection"):
        assert m in msg, (m, msg)
    req = make_request(sim.nexus_path, spec, sim.poni_path, out)
    assert str(req.work) in msg and req.work.is_dir()      # the work is kept
    assert not list(out.glob("*.zarr")) and not list(out.glob("*.png"))
    if (out / "catalog.sqlite").exists():
        from catalog.db import Catalog

        cat = Catalog.for_products(out)
        assert cat.products() == []
        cat.dispose()


def test_scan_table_angles_in_radians_are_refused(tmp_path):
    """A scan table's ``angle`` column is in degrees; angles spanning at most 2 pi are
    radians and are refused naming the table and the column (before issue 15: read as
    degrees, a 2.4-degree scan)."""
    import fabio.edfimage

    def table(angles):
        rows = ["file,angle,translation"]
        for i, a in enumerate(angles):
            for j in range(3):
                f = f"f_{i}_{j}.edf"
                fabio.edfimage.EdfImage(data=np.full((8, 9), i + j + 1, np.uint16)).write(str(tmp_path / f))
                rows.append(f"{f},{a:.6f},{j * 0.1:.1f}")
        t = tmp_path / "scan.csv"
        t.write_text("\n".join(rows) + "\n")
        return t

    rad = np.linspace(0, np.pi, 4, endpoint=False)
    t = table(rad)
    with pytest.raises(IngestError) as e:
        open_scan(t)
    msg = str(e.value)
    for m in (str(t), "column 'angle'", "input.angle", "0 .. 2.35619", "radians",
              "expected degrees"):
        assert m in msg, (m, msg)
    assert open_scan(table(np.rad2deg(rad))).angle.max() == pytest.approx(135.0)  # degrees pass
