"""Property-based fuzzing (hypothesis) of the two places where outside input enters:

* the pipeline spec loader: arbitrary YAML-ish values, mutations of the shipped specs and
  arbitrary YAML text either load into a spec that round-trips through its canonical JSON,
  or raise :class:`SpecError` naming the spec file and a field; never another exception;
* the HDF5 ingest: small generated NeXus-like files (random layouts, shapes, dtypes including
  bool, strings, complex and float with NaN, missing or extra axis datasets, mismatched
  lengths, units attributes) either open as a Scan whose invariants hold (one angle,
  translation, z and monitor value per frame; its grid places every frame exactly once) or
  raise :class:`IngestError` naming the file.

Each test is bounded by ``max_examples`` (a few seconds each here; ``XRDCT_FUZZ_SCALE``
multiplies them for a soak run); ``deadline=None`` because file-system latency is not what is
tested.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import string

import h5py
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipelines.spec import PIPELINES_DIR, InputSpec, PipelineSpec, SpecError, load_spec, parse_spec
from tasks.ingest import IngestError, check_frames, open_scan

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.function_scoped_fixture])
#: XRDCT_FUZZ_SCALE=20 python -m pytest tests/test_fuzz.py: a longer soak (20x the examples)
_SCALE = float(os.environ.get("XRDCT_FUZZ_SCALE", "1"))


def _n(examples: int) -> int:
    return max(1, int(examples * _SCALE))


SHIPPED = {p.stem: yaml.safe_load(p.read_text()) for p in sorted(PIPELINES_DIR.glob("*.yaml"))}

# ----------------------------------------------------------------------------- spec loader

_text = st.text(alphabet=string.printable + "äµ°\x00", max_size=12)
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                     st.floats(allow_nan=True, allow_infinity=True), _text,
                     st.sampled_from(["auto", "nexus", "fbp", "q_nm^-1", "2th_deg", "sigma_clip",
                                      "phases/NiO.cif", "../../etc/passwd", "x" * 5000, "~nobody/x",
                                      "angle,translation", "ramp", "-1", "1e400"]))
_values = st.recursive(_scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                     st.dictionaries(_text, c, max_size=4)),
                       max_leaves=12)


def _paths(d, prefix=()):
    """Every key path of a nested dict (lists of dicts included, by index)."""
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            out.append(prefix + (k,))
            out += _paths(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out.append(prefix + (i,))
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def mutated_specs(draw):
    """A shipped spec with 1-4 mutations: a value replaced, a key removed, a key added."""
    data = copy.deepcopy(SHIPPED[draw(st.sampled_from(sorted(SHIPPED)))])
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(data)
        op = draw(st.sampled_from(["replace", "delete", "add"]))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for k in path[:-1]:
            parent = parent[k]
        if op == "replace":
            parent[path[-1]] = draw(_values)
        elif op == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["nbins", "colour", "enabled", "npt", "phases", "mask",
                                         "method", "backend", "unit"]))] = draw(_values)
    return data


# "  field.path: problem": names, list indexes and quoted odd keys, dot-separated
_KEY = r"([^\W\d]\w*|\d+|'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\")"
_FIELD_LINE = re.compile(rf"^  (<top level>|{_KEY}(\.{_KEY})*): ", re.M)


def _check_spec_outcome(data, source="fuzz.yaml"):
    try:
        spec = parse_spec(data, source=source, base_dir=PIPELINES_DIR)
    except SpecError as err:
        msg = str(err)
        assert msg.startswith(source), msg
        if isinstance(data, dict):
            # the message names a field: a "  field.path: problem" line, or the phase's cif
            assert _FIELD_LINE.search(msg) or "mapping.phases[" in msg, msg
        else:
            assert "must be a YAML mapping" in msg, msg
        return None
    assert isinstance(spec, PipelineSpec)
    again = parse_spec(json.loads(spec.canonical_json()), source="roundtrip", base_dir=PIPELINES_DIR)
    assert again.canonical_json() == spec.canonical_json()
    return spec


@settings(FUZZ, max_examples=_n(300))
@given(mutated_specs())
def test_fuzz_mutated_shipped_specs_load_or_name_a_field(data):
    _check_spec_outcome(data)


@settings(FUZZ, max_examples=_n(200))
@given(st.one_of(_values, st.dictionaries(st.sampled_from(
    ["schema_version", "name", "input", "calibration", "integration", "sinogram",
     "reconstruction", "mapping", "output", "extra"]), _values, max_size=5)))
def test_fuzz_arbitrary_values_load_or_name_a_field(data):
    _check_spec_outcome(data)


@settings(FUZZ, max_examples=_n(150))
@given(text=st.text(alphabet=string.printable + "\t\x00{}[]&*!|>%@`", max_size=200))
def test_fuzz_yaml_text_loads_or_raises_spec_error(text, tmp_path_factory):
    p = tmp_path_factory.mktemp("specfuzz", numbered=True) / "spec.yaml"
    p.write_text(text)
    try:
        load_spec(p)
    except SpecError as err:
        assert str(err).startswith(str(p)), str(err)


def test_spec_fuzz_found_these(tmp_path):
    """Regressions the fuzzer found: paths that the OS refuses (NUL byte, a name longer
    than NAME_MAX) in file fields are SpecErrors naming the field, not ValueError/OSError."""
    for cif in ("a\x00b.cif", "x" * 5000):
        with pytest.raises(SpecError, match=r"mapping\.phases\[0\]\.cif"):
            parse_spec({"mapping": {"enabled": True, "phases": [{"name": "A", "cif": cif}]}},
                       source="s.yaml")


# ----------------------------------------------------------------------------- HDF5 ingest

_DTYPES = ["uint8", "uint16", "uint32", "int32", "float32", "float64", "bool", "complex64", "str"]
_counter = itertools.count()


def _array(draw, shape, dtype, nan=False):
    n = int(np.prod(shape)) if shape else 1
    if dtype == "str":
        return np.array([str(i) for i in range(n)], dtype=h5py.string_dtype()).reshape(shape)
    if dtype == "bool":
        return (np.arange(n) % 2 == 0).reshape(shape)
    a = (np.arange(n) % 97).astype(dtype).reshape(shape)
    if nan and n and np.dtype(dtype).kind in "fc":
        a.flat[draw(st.integers(0, n - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return a


_VALID_AXIS = {"len": "axis", "dtype": "float64", "units": None, "nan": False, "repeat": False}
_BREAKS = ["nd", "hw", "zero_len", "dtype", "nan", "layout", "axis_missing", "axis_len",
           "axis_dtype", "axis_units", "axis_nan", "axis_repeat", "monitor_zero"]


@st.composite
def h5_scans(draw):
    """A description of a small NeXus-like file: a valid 3-5-D scan with 0-3 random
    breakages (dimension count, frame size, empty axis, dtype, NaN/inf, layout, axis datasets
    missing, of the wrong length, dtype or units, with NaN or repeats, a zero monitor)."""
    breaks = set(draw(st.lists(st.sampled_from(_BREAKS), max_size=3)))
    nd = draw(st.sampled_from([1, 2, 6])) if "nd" in breaks else draw(st.sampled_from([3, 4, 4, 5]))
    hw = ((draw(st.sampled_from([0, 1, 7])), draw(st.sampled_from([0, 8]))) if "hw" in breaks
          else (draw(st.integers(8, 9)), draw(st.integers(8, 10))))
    scan_shape = [draw(st.integers(1, 4)) for _ in range(max(nd - 2, 0))]
    if "zero_len" in breaks and scan_shape:
        scan_shape[draw(st.integers(0, len(scan_shape) - 1))] = 0
    shape = (tuple(scan_shape) + hw)[-nd:] if nd >= 2 else (draw(st.integers(0, 5)),)
    n = int(np.prod(shape[:-2])) if nd >= 3 else 0
    axes = {}
    for role in ("rotation_angle", "translation", "z", "monitor"):
        a = dict(_VALID_AXIS, len="n" if role == "monitor" or nd == 3 else "axis",
                 units=draw(st.sampled_from([None, "deg"] if role == "rotation_angle" else [None, "mm"])))
        if role == "z" and nd != 5:
            a = None if not draw(st.booleans()) else dict(a, len="n")
        if a is not None:
            if "axis_len" in breaks and draw(st.booleans()):
                a["len"] = draw(st.sampled_from(["n+1", "n-1", "scalar", "2d", "axis", "n"]))
            if "axis_dtype" in breaks and draw(st.booleans()):
                a["dtype"] = draw(st.sampled_from(["int32", "str", "bool"]))
            if "axis_units" in breaks and draw(st.booleans()):
                a["units"] = draw(st.sampled_from(["rad", "um", "furlong", "", "deg", "mm"]))
            if "axis_nan" in breaks and draw(st.booleans()):
                a["nan"] = True
            if "axis_repeat" in breaks and role != "monitor" and draw(st.booleans()):
                a["repeat"] = True
            if role == "monitor" and "monitor_zero" in breaks:
                a["repeat"] = True
        if "axis_missing" in breaks and draw(st.booleans()):
            a = None
        axes[role] = a
    if nd == 3:  # flat frames need per-frame positions of a grid: angle-major
        for role in ("rotation_angle", "translation"):
            if axes[role] is not None and axes[role]["len"] == "n":
                axes[role]["grid"] = True
    return dict(shape=shape, n=n,
                dtype=draw(st.sampled_from(_DTYPES)) if "dtype" in breaks else draw(st.sampled_from(["uint16", "int32", "float32"])),
                nan="nan" in breaks,
                layout=draw(st.sampled_from(["nxdata", "detector", "flat"])) if "layout" in breaks else "detector+nxdata",
                axes=axes, extra=draw(st.booleans()))


def _axis_values(spec, role, n, shape, draw_int):
    nd = len(shape) - 2
    length = {"n": n, "n+1": n + 1, "n-1": max(n - 1, 0)}.get(spec["len"])
    if spec["len"] == "axis":
        dim = {"rotation_angle": nd - 2, "translation": nd - 1, "z": 0}.get(role, 0)
        length = shape[dim] if 0 <= dim < nd else n
    if spec["len"] == "scalar":
        a = np.array(draw_int)
    elif spec["len"] == "2d":
        a = np.ones((2, max(n, 1)))
    elif spec.get("grid") and nd == 1 and n:
        # a flat scan of n frames on a k x (n // k) grid (angle-major) when n factorises
        k = next((k for k in range(2, n) if n % k == 0), 1)
        ia, it = np.divmod(np.arange(n), n // k)
        a = (ia * 15.0 if role == "rotation_angle" else it * 0.05).astype(np.float64)
        if spec["repeat"] and a.size > 1:
            a[1] = a[0]
    else:
        a = np.arange(length, dtype=np.float64) * (15.0 if role == "rotation_angle" else 0.05)
        if role == "monitor":
            a = a + (0.0 if spec["repeat"] else 1.0)   # repeat: a zero monitor value
        elif spec["repeat"] and a.size > 1:
            a[1] = a[0]
    if spec["dtype"] == "str":
        return np.array([str(v) for v in np.ravel(a)], dtype=h5py.string_dtype()).reshape(np.shape(a))
    if spec["dtype"] == "bool":
        return np.asarray(a, dtype=bool)
    a = np.asarray(a, dtype=spec["dtype"])
    if spec["nan"] and a.size and a.dtype.kind == "f":
        a.flat[0] = np.nan
    return a


def _write(path, desc, draw):
    shape = desc["shape"]
    frames = _array(draw, shape, desc["dtype"], desc["nan"])
    with h5py.File(path, "w") as h:
        e = h.create_group("entry")
        e.attrs["NX_class"] = "NXentry"
        lay = desc["layout"]
        if lay in ("detector+nxdata", "detector"):
            inst = e.create_group("instrument")
            inst.attrs["NX_class"] = "NXinstrument"
            det = inst.create_group("detector")
            det.attrs["NX_class"] = "NXdetector"
            det["data"] = frames
        d = None
        if lay in ("detector+nxdata", "nxdata"):
            d = e.create_group("data")
            d.attrs["NX_class"] = "NXdata"
            d.attrs["signal"] = "data"
            if lay == "detector+nxdata":
                d["data"] = h["entry/instrument/detector/data"]
            else:
                d["data"] = frames
                d["data"].attrs["interpretation"] = "image"
        if lay == "flat":
            h["frames"] = frames
        s = e.create_group("sample")
        s.attrs["NX_class"] = "NXsample"
        for role, spec in desc["axes"].items():
            if spec is None:
                continue
            a = _axis_values(spec, role, desc["n"], shape if len(shape) >= 3 else (0, 0, 0), 3)
            if role == "monitor":
                m = e.create_group("monitor")
                m.attrs["NX_class"] = "NXmonitor"
                ds = m.create_dataset("data", data=a)
            else:
                ds = s.create_dataset(role, data=a)
                if d is not None and lay == "nxdata":
                    d[role] = ds
                    d.attrs[f"{role}_indices"] = 0
            if spec["units"] is not None:
                ds.attrs["units"] = spec["units"]
        if desc["extra"]:
            s["omega"] = np.arange(7.0)             # an extra, unrelated axis-like dataset
            e["title"] = "fuzz"
            e["start_time"] = "not a date"


def _event(msg):
    try:
        event(msg)
    except Exception:  # noqa: BLE001 - outside a hypothesis test
        pass


def _check_scan(scan, path):
    n = scan.n_frames
    if scan.kind in ("frames", "map"):
        assert scan.frames.ndim == 3 and n == scan.frames.shape[0] > 0
        assert min(scan.frames.shape[1:]) > 0
        dt = np.dtype(scan.frames.dtype)
        assert dt.kind in "uif", dt
        for a in (scan.angle, scan.translation, scan.z, scan.monitor):
            if a is not None:
                assert a.shape == (n,) and np.all(np.isfinite(a))
        if scan.monitor is not None:
            assert np.all(scan.monitor > 0)
        try:
            g = scan.grid()
        except IngestError as err:
            assert str(path) in str(err), str(err)
            _event("frames opened, grid refused")
        else:
            _event("frames opened, grid complete")
            assert np.array_equal(np.sort(g.index.ravel()), np.arange(n))
            assert g.index.size == n
        first = np.asarray(scan.frames[:1].compute(scheduler="synchronous"))
        assert first.shape == (1,) + tuple(scan.frames.shape[1:])
        try:
            check_frames(first, str(path))
        except IngestError as err:
            assert str(path) in str(err) and "frame 0" in str(err)
    else:
        assert scan.kind == "sinogram"
        na, nt, nr = scan.sinogram.shape
        assert len(scan.sino_angle) == na and len(scan.sino_translation) == nt and nr >= 1
        assert np.all(np.isfinite(scan.sino_angle)) and np.all(np.isfinite(scan.sino_translation))


_input_specs = st.one_of(st.just(None), st.builds(
    lambda kind, frames, angle, translation, sino: InputSpec(
        kind=kind, frames=frames, angle=angle, translation=translation, sinogram=sino),
    st.sampled_from(["auto", "auto", "nexus", "sinogram"]),
    st.sampled_from([None, "/entry/instrument/detector/data", "/entry/nope", "/entry",
                     "entry/sample/rotation_angle", "/frames"]),
    st.sampled_from([None, "/entry/sample/rotation_angle", "/entry/sample/translation", "/nope",
                     "/entry/sample"]),
    st.sampled_from([None, "/entry/sample/translation", "/entry/monitor/data"]),
    st.sampled_from([None, None, "/entry/instrument/detector/data", "/entry/sample/z"])))


@settings(FUZZ, max_examples=_n(250))
@given(desc=h5_scans(), spec=_input_specs, data=st.data())
def test_fuzz_ingest_of_generated_hdf5(desc, spec, data, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / f"fuzz_{next(_counter)}.nxs"
    _write(path, desc, data.draw)
    try:
        scan = open_scan(path, spec)
    except IngestError as err:
        assert str(path) in str(err), str(err)
        event("IngestError at open")
        return
    event(f"opened as {scan.kind}")
    try:
        _check_scan(scan, path)
    except IngestError as err:  # reading a sinogram chunk with NaN, ...
        assert str(path) in str(err), str(err)
    finally:
        path.unlink()


def test_ingest_accepts_the_fuzzers_valid_layout(tmp_path):
    """The generator can make a valid scan (so the property above is not vacuous)."""
    desc = dict(shape=(3, 4, 8, 10), n=12, dtype="uint16", nan=False, layout="detector+nxdata",
                axes={"rotation_angle": {"len": "axis", "dtype": "float64", "units": "deg",
                                         "nan": False, "repeat": False},
                      "translation": {"len": "axis", "dtype": "float64", "units": "mm",
                                      "nan": False, "repeat": False},
                      "z": None, "monitor": {"len": "n", "dtype": "float64", "units": None,
                                             "nan": False, "repeat": False}},
                extra=True)
    _write(tmp_path / "ok.nxs", desc, lambda s: 0)
    scan = open_scan(tmp_path / "ok.nxs")
    assert scan.kind == "frames" and scan.frames.shape == (12, 8, 10)
    g = scan.grid()
    assert g.shape == (1, 3, 4)
    np.testing.assert_allclose(g.angle, [0, 15, 30])
    _check_scan(scan, tmp_path / "ok.nxs")
