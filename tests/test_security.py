"""Issue 6 item 5: paths from flow parameters confined to XRDCT_DATA_ROOTS (traversal,
absolute paths elsewhere, symlink escapes), no unsafe deserialisation in the package, raw
data opened read-only (a mode-0444 scan processes and is left byte-for-byte unchanged),
Prefect stage results serialised as JSON."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

import pytest

from flows import process
from flows.paths import ENV, PathNotAllowedError, confine, data_roots
from flows.process import make_request, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "flows", "pipelines", "catalog", "benchmarks", "infra")


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """Two data roots (raw, products) and a directory outside them holding a 'secret'."""
    raw, prod, outside = tmp_path / "raw", tmp_path / "products", tmp_path / "outside"
    for d in (raw, prod, outside):
        d.mkdir()
    (outside / "secret.nxs").write_bytes(b"not yours")
    (outside / "secret.poni").write_text("Distance: 0.1\n")
    monkeypatch.setenv(ENV, os.pathsep.join([str(raw), str(prod)]))
    return raw, prod, outside


# ----------------------------------------------------------------------------- confine()


def test_unset_roots_confine_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert data_roots() is None
    assert confine(tmp_path / ".." / "x", "scan") == (tmp_path.parent / "x").resolve()


def test_path_inside_a_root_is_allowed_and_resolved(roots):
    raw, prod, _ = roots
    (raw / "p1").mkdir()
    (raw / "p1" / "s.nxs").write_bytes(b"x")
    assert confine(raw / "p1" / "s.nxs", "scan") == (raw / "p1" / "s.nxs").resolve()
    assert confine(prod / "new" / "dir", "out") == (prod / "new" / "dir").resolve()  # need not exist
    # a symlink that stays inside the roots is fine, and is resolved
    (prod / "alias.nxs").symlink_to(raw / "p1" / "s.nxs")
    assert confine(prod / "alias.nxs", "scan") == (raw / "p1" / "s.nxs").resolve()


def test_dotdot_traversal_is_rejected_even_when_it_lands_inside(roots):
    raw, _, outside = roots
    for p in (raw / ".." / "outside" / "secret.nxs", raw / "p1" / ".." / "s.nxs"):
        with pytest.raises(PathNotAllowedError) as e:
            confine(str(p), "scan")
        msg = str(e.value)
        assert msg.startswith("scan: ") and str(p) in msg and "'..'" in msg and str(raw) in msg


def test_absolute_path_outside_is_rejected(roots):
    raw, prod, outside = roots
    with pytest.raises(PathNotAllowedError) as e:
        confine(outside / "secret.nxs", "poni")
    msg = str(e.value)
    assert msg.startswith("poni: ") and str(outside / "secret.nxs") in msg
    assert str(raw) in msg and str(prod) in msg and ENV in msg
    with pytest.raises(PathNotAllowedError):
        confine("/etc/passwd", "scan")
    # a sibling whose name merely starts with a root's name is outside
    sibling = raw.parent / (raw.name + "2")
    sibling.mkdir()
    with pytest.raises(PathNotAllowedError):
        confine(sibling / "x.nxs", "scan")


def test_symlink_escaping_a_root_is_rejected(roots):
    raw, _, outside = roots
    (raw / "link.nxs").symlink_to(outside / "secret.nxs")
    (raw / "linkdir").symlink_to(outside, target_is_directory=True)
    for p in (raw / "link.nxs", raw / "linkdir" / "secret.nxs"):
        with pytest.raises(PathNotAllowedError) as e:
            confine(p, "scan")
        assert "symlink" in str(e.value) and str(outside / "secret.nxs") in str(e.value)


# ----------------------------------------------------------------------------- make_request


def _inputs(raw):
    scan = raw / "scan.nxs"
    scan.write_bytes(b"frames")       # make_request checksums the scan; it does not open it
    poni = raw / "calib.poni"
    poni.write_text("Distance: 0.1\n")
    return scan, poni


@pytest.mark.parametrize("param", ["scan", "poni", "pipeline", "out", "calibration.mask",
                                   "mapping.phases[0].cif"])
def test_make_request_confines_every_path(roots, param):
    raw, prod, outside = roots
    scan, poni = _inputs(raw)
    pipeline, out = "default", prod
    (outside / "mask.edf").write_bytes(b"m")
    (outside / "X.cif").write_text("data_X\n")
    if param == "scan":
        scan = outside / "secret.nxs"
    elif param == "poni":
        poni = outside / "secret.poni"
    elif param == "out":
        out = outside / "products"
    elif param == "pipeline":
        pipeline = outside / "spec.yaml"
        pipeline.write_text("name: x\n")
    else:
        pipeline = raw / "spec.yaml"  # the spec is inside; a file it names is not
        pipeline.write_text(f"calibration: {{mask: {outside / 'mask.edf'}}}\n" if "mask" in param else
                            f"mapping: {{enabled: true, phases: [{{name: X, cif: {outside / 'X.cif'}}}]}}\n")
    with pytest.raises(PathNotAllowedError) as e:
        make_request(scan, pipeline, poni, out)
    assert str(e.value).startswith(f"{param}: ") and str(outside) in str(e.value)
    assert not (outside / "products").exists()


def test_make_request_inside_the_roots_and_shipped_specs_work(roots):
    raw, prod, _ = roots
    scan, poni = _inputs(raw)
    req = make_request(scan, "demo", poni, prod / "out")      # shipped spec and shipped CIFs
    assert req.scan == str(scan.resolve()) and req.out == str((prod / "out").resolve())
    assert {"poni", "phase:NiO"} <= set(req.calibration)
    spec = raw / "mine.yaml"
    spec.write_text("name: mine\nintegration: {npt: 500}\n")
    assert make_request(scan, spec, poni, prod).product_id != req.product_id


def test_facility_flows_confine_root_and_out(roots, monkeypatch):
    import logging

    from flows import facility

    raw, prod, outside = roots
    with pytest.raises(PathNotAllowedError, match=r"^root: "):
        facility.discover_and_process.fn(root=str(outside), out=str(prod))
    with pytest.raises(PathNotAllowedError, match=r"^out: "):
        facility.discover_and_process.fn(root=str(raw), out=str(outside))
    with pytest.raises(PathNotAllowedError, match=r"^out: "):
        facility.reprocess.fn(out=str(raw / ".." / "outside"))
    # discovery skips, and reports, a symlink under the root that leads out of the roots
    (raw / "escape.nxs").symlink_to(outside / "secret.nxs")
    monkeypatch.setattr(facility, "get_run_logger", lambda: logging.getLogger("test"))
    res = facility.discover_and_process.fn(root=str(raw), out=str(prod))
    assert res["new"] == [] and res["submitted"] == []
    assert [p for p, _ in res["skipped"]] == [str(raw / "escape.nxs")]
    assert "outside the data roots" in res["skipped"][0][1]


# ----------------------------------------------------------------------------- audit


def _sources():
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            yield p, p.read_text()


def test_no_unsafe_deserialisation_in_the_package():
    """YAML only through safe_load, no pickle/marshal/shelve loads, torch.load only with
    weights_only=True, numpy loads without allow_pickle=True."""
    bad = []
    for p, text in _sources():
        for i, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\byaml\.(load|unsafe_load|full_load|load_all)\s*\(", code) or \
                    re.search(r"\byaml\.Loader\b|\byaml\.UnsafeLoader\b", code) or \
                    re.search(r"\b(pickle|cPickle|dill|marshal|shelve|joblib)\.(load|loads|open)\s*\(", code) or \
                    re.search(r"allow_pickle\s*=\s*True", code) or \
                    (re.search(r"\btorch\.load\s*\(", code) and "weights_only=True" not in code):
                bad.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bad, "unsafe deserialisation:\n" + "\n".join(bad)
    # the spec loader really is the safe one
    assert "yaml.safe_load(" in (ROOT / "pipelines" / "spec.py").read_text()


def test_hdf5_inputs_are_opened_read_only():
    """Every h5py.File of the pipeline opens mode "r". Exempt: the simulator and the
    benchmarks, which write the synthetic scans they then read."""
    bad = []
    for p, text in _sources():
        if p.name == "simulate.py" or p.relative_to(ROOT).parts[0] == "benchmarks":
            continue
        for m in re.finditer(r"h5py\.File\(([^)]*)\)", text):
            args = m.group(1)
            if not re.search(r""",\s*(mode\s*=\s*)?["']r["']""", args):
                bad.append(f"{p.relative_to(ROOT)}: h5py.File({args})")
    assert not bad, "\n".join(bad)


def test_cached_stage_results_are_json(monkeypatch):
    """The Prefect stage tasks persist JSON results (never pickles) keyed by the product hash."""
    made = {}

    def task(**kw):
        def deco(fn):
            made[kw["name"]] = kw
            return fn
        return deco

    monkeypatch.setattr(process, "_prefect", lambda: ((lambda **kw: (lambda fn: fn)), task))
    process._build_flow()
    for name in process.STAGES:
        assert made[name]["result_serializer"] == "json", (name, made[name])
        assert made[name]["persist_result"] is True and made[name]["cache_key_fn"] is not None
    assert "result_serializer" not in made["publish"] and "persist_result" not in made["publish"]
    # the retried stages retry a crash, not bad input (it would fail the same way again)
    from prefect.states import Failed

    from tasks.ingest import IngestError

    for name in ("ingest", "integrate"):
        again = made[name]["retry_condition_fn"]
        assert again(None, None, Failed(data=IngestError("x.nxs: frame 3: NaN"))) is False
        assert again(None, None, Failed(data=OSError("NFS hiccup"))) is True


# ----------------------------------------------------------------------------- read-only raw data


def test_read_only_scan_processes_and_is_left_unchanged(tmp_path, monkeypatch):
    """A scan file of mode 0444 inside the data roots processes, every h5py open of it is
    mode "r" (recorded: the tests may run as root, whom 0444 does not stop), and its bytes
    and mtime are the same afterwards."""
    import h5py

    from tasks.simulate import preset, simulate_scan

    raw, prod = tmp_path / "raw", tmp_path / "products"
    sim = simulate_scan(raw, preset("small").model_copy(update={"n_translations": 12, "n_angles": 12}))
    scan = Path(sim.nexus_path)
    scan.chmod(0o444)
    before = (hashlib.sha256(scan.read_bytes()).hexdigest(), scan.stat().st_mtime_ns)
    monkeypatch.setenv(ENV, os.pathsep.join([str(raw), str(prod)]))
    modes = []

    class Recording(h5py.File):
        def __init__(self, name, mode="r", *args, **kw):
            modes.append((str(name), mode))
            super().__init__(name, mode, *args, **kw)

    monkeypatch.setattr(h5py, "File", Recording)
    try:
        path = run_pipeline(scan, poni=sim.poni_path, pipeline="default", out=prod)
        opened = [m for f, m in modes if Path(f).resolve() == scan.resolve()]
        assert len(opened) >= 3 and set(opened) == {"r"}, modes   # ingest, integrate, frames
        assert Path(path).is_dir() and Path(path).parent == prod.resolve()
        assert (hashlib.sha256(scan.read_bytes()).hexdigest(), scan.stat().st_mtime_ns) == before
        assert stat.S_IMODE(scan.stat().st_mode) == 0o444
    finally:
        scan.chmod(0o644)


def test_scan_table_images_are_confined_before_any_is_read(roots):
    raw, prod, outside = roots
    _, poni = _inputs(raw)
    (raw / "f0.edf").write_bytes(b"x")
    table = raw / "scan.csv"
    table.write_text(f"file,angle,translation\nf0.edf,0,0\n{outside / 'secret.nxs'},0,1\n"
                     "../outside/secret.nxs,1,0\n")
    with pytest.raises(PathNotAllowedError) as e:
        make_request(table, "default", poni, prod)
    msg = str(e.value)
    assert msg.startswith(f"scan table {table}: line 3: column 'file'") and "secret.nxs" in msg


def test_compose_mounts_raw_data_read_only_and_only_products_writable():
    """The workers see raw scans and calibrations through read-only mounts and can write
    only the product directory; the data roots are exactly those mounts, and the example
    parameters of infra/prefect.yaml read from the read-only and write to the writable one."""
    import yaml

    compose = yaml.safe_load((ROOT / "infra" / "compose.yaml").read_text())
    raw, cal, prod = "/data/xrdct/raw", "/data/xrdct/calibration", "/data/xrdct/products"
    env = compose["x-worker-env"]
    assert env["XRDCT_DATA_ROOTS"].split(":") == [raw, cal, prod]
    for name in ("worker-cpu", "worker-gpu"):
        svc = compose["services"][name]
        assert svc["environment"]["XRDCT_DATA_ROOTS"] == env["XRDCT_DATA_ROOTS"]
        mounts = {}
        for v in svc["volumes"]:
            parts = re.sub(r"\$\{[^}]*\}", "HOST", v).split(":")  # ${VAR:-default} -> HOST
            assert parts[0] == "HOST" and len(parts) in (2, 3), (name, v)
            mounts[parts[1]] = parts[2] if len(parts) == 3 else "rw"
        assert mounts == {raw: "ro", cal: "ro", prod: "rw"}, (name, svc["volumes"])
        # the host side of each mount is its own variable (no one /data mount holding both)
        hosts = [re.match(r"\$\{(\w+):-", v).group(1) for v in svc["volumes"]]
        assert hosts == ["XRDCT_RAW_DIR", "XRDCT_CALIBRATION_DIR", "XRDCT_PRODUCTS_DIR"]
    assert compose["services"]["products"]["volumes"][0].endswith(":/usr/share/nginx/html:ro")
    deployments = {d["name"]: d for d in yaml.safe_load(
        (ROOT / "infra" / "prefect.yaml").read_text())["deployments"]}
    root = deployments["discover_and_process"]["parameters"]["root"]
    assert root == raw or root.startswith(raw + "/")
    for d in deployments.values():
        assert d["parameters"]["out"].rstrip("/") == prod
    example = (ROOT / "infra" / ".env.example").read_text()
    for var in ("XRDCT_RAW_DIR", "XRDCT_CALIBRATION_DIR", "XRDCT_PRODUCTS_DIR"):
        assert f"# {var}=/data/xrdct/" in example
    assert "XRDCT_DATA_DIR" not in example

# ----------------------------------------------------------------------------- issue 15: linked files


def _h5_linking(scan: Path, target: Path, how: str) -> None:
    import h5py
    import numpy as np

    rel = os.path.relpath(target, scan.parent)
    with h5py.File(scan, "w") as h:
        if how == "external_link":
            h["/entry/data/data"] = h5py.ExternalLink(rel, "/frames")
        elif how == "virtual_dataset":
            layout = h5py.VirtualLayout(shape=(2, 3), dtype="f8")
            layout[...] = h5py.VirtualSource(rel, "frames", shape=(2, 3))
            h.create_virtual_dataset("/entry/data/data", layout)
        else:  # external raw storage, relative to the working directory (libhdf5's default)
            h.create_dataset("/entry/data/data", shape=(6,), dtype="f8",
                             external=[(str(target), 0, 48)])
    if how != "external_storage" and not target.exists():
        with h5py.File(target, "w") as g:
            g["frames"] = np.arange(6.0).reshape(2, 3)
    elif how == "external_storage" and not target.exists():
        target.write_bytes(np.arange(6.0).tobytes())


@pytest.mark.parametrize("how", ["external_link", "virtual_dataset", "external_storage"])
def test_make_request_confines_files_an_hdf5_scan_links_to(roots, how):
    raw, prod, outside = roots
    scan, poni = _inputs(raw)
    _h5_linking(scan, outside / ("frames.bin" if how == "external_storage" else "frames.h5"), how)
    with pytest.raises(PathNotAllowedError) as e:
        make_request(scan, "default", poni, prod)
    msg = str(e.value)
    assert msg.startswith(f"scan: {scan}: ") and str(outside) in msg and "outside the data roots" in msg


def test_links_are_followed_into_the_linked_files(roots):
    """scan -> (ExternalLink, inside the roots) -> hop.h5 -> (VDS) -> outside: refused."""
    raw, prod, outside = roots
    scan, poni = _inputs(raw)
    _h5_linking(scan, raw / "hop.h5", "external_link")
    _h5_linking(raw / "hop.h5", outside / "frames.h5", "virtual_dataset")
    import h5py

    with h5py.File(raw / "hop.h5", "a") as h:  # the link's target dataset, beside the VDS
        h["frames"] = h["/entry/data/data"][()]
    with pytest.raises(PathNotAllowedError) as e:
        make_request(scan, "default", poni, prod)
    msg = str(e.value)
    assert "ExternalLink /entry/data/data -> hop.h5:/frames -> virtual dataset" in msg
    assert str(outside / "frames.h5") in msg


def test_linked_files_are_part_of_the_product_id_and_must_exist(tmp_path, monkeypatch):
    import h5py

    from tasks.ingest import IngestError

    monkeypatch.delenv(ENV, raising=False)
    scan, poni = _inputs(tmp_path)
    _h5_linking(scan, tmp_path / "frames.h5", "virtual_dataset")
    first = make_request(scan, "default", poni, tmp_path / "out")
    assert any(k.endswith(str(tmp_path / "frames.h5")) for k in first.inputs)
    with h5py.File(tmp_path / "frames.h5", "r+") as g:
        g["frames"][0, 0] = 42.0
    assert make_request(scan, "default", poni, tmp_path / "out").product_id != first.product_id
    (tmp_path / "frames.h5").unlink()  # a VDS with a missing source reads as fill values
    with pytest.raises(IngestError) as e:
        make_request(scan, "default", poni, tmp_path / "out")
    assert str(scan) in str(e.value) and "frames.h5" in str(e.value) and "not found" in str(e.value)
