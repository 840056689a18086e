"""Pipeline spec: every shipped spec loads; bad specs fail with one clear error each."""

from __future__ import annotations

import pytest
import yaml

from pipelines.spec import PIPELINES_DIR, SpecError, load_spec, parse_spec


@pytest.mark.parametrize("name", sorted(p.stem for p in PIPELINES_DIR.glob("*.yaml")))
def test_shipped_specs_load(name):
    spec = load_spec(name)
    assert spec.schema_version == 1
    if spec.mapping.enabled:
        paths = spec.phase_paths()
        assert len(paths) == len(spec.mapping.phases) >= 1
        assert all(p.is_file() and p.suffix == ".cif" for p in paths)


def _write(tmp_path, data, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_unknown_key_is_named_with_file(tmp_path):
    p = _write(tmp_path, {"schema_version": 1, "integration": {"npt": 500, "nbins": 3}})
    with pytest.raises(SpecError) as e:
        load_spec(p)
    msg = str(e.value)
    assert str(p) in msg and "integration.nbins" in msg and "unknown key" in msg


def test_wrong_type_and_impossible_values(tmp_path):
    p = _write(tmp_path, {"integration": {"npt": "many", "radial_range": [10, 2]},
                          "sinogram": {"air_columns": -1}})
    with pytest.raises(SpecError) as e:
        load_spec(p)
    msg = str(e.value)
    assert "integration.npt" in msg and "integration.radial_range" in msg
    assert "sinogram.air_columns" in msg and "3 problem" in msg


def test_unknown_schema_version_and_unit(tmp_path):
    with pytest.raises(SpecError, match="schema_version"):
        parse_spec({"schema_version": 2})
    with pytest.raises(SpecError, match="integration.unit"):
        parse_spec({"integration": {"unit": "q_parsec^-1"}})


def test_missing_cif_is_named(tmp_path):
    p = _write(tmp_path, {"mapping": {"enabled": True,
                                      "phases": [{"name": "X", "cif": "nowhere/X.cif"}]}})
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert "mapping.phases[0].cif" in str(e.value) and "nowhere/X.cif" in str(e.value)
    assert str(p) in str(e.value)


def test_mapping_without_phases_and_duplicate_names():
    with pytest.raises(SpecError, match="no phases"):
        parse_spec({"mapping": {"enabled": True}})
    with pytest.raises(SpecError, match="unique"):
        parse_spec({"mapping": {"enabled": True, "phases": [{"name": "a", "cif": "Al.cif"},
                                                            {"name": "a", "cif": "Cu.cif"}]}})


def test_not_yaml_and_not_mapping(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("integration: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        load_spec(p)
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "absent.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(p)


def test_canonical_json_is_stable_and_complete():
    a = load_spec("default")
    b = parse_spec({"schema_version": 1, "name": "default",
                    "description": a.description, "integration": {"npt": a.integration.npt}})
    assert a.canonical_json() == load_spec("default").canonical_json()
    assert '"npt":1000' in a.canonical_json()
    # complete: the defaults default.yaml spells out are in the canonical form of a spec
    # that leaves them implicit, so the two are one pipeline ...
    assert b.canonical_json() == a.canonical_json()
    # ... and any field that differs, however deep, makes another one
    for change in ({"integration": {"npt": 999}}, {"description": "other"},
                   {"sinogram": {"air_columns": 3}}, {"reconstruction": {"filter": "hann"}}):
        c = parse_spec({"schema_version": 1, "name": "default", "description": a.description,
                        "integration": {"npt": a.integration.npt}} | change)
        assert c.canonical_json() != a.canonical_json(), change
    assert "base_dir" not in a.canonical_json()
