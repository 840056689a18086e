"""Models as catalog artefacts and the continual-learning flow (flows/learn.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cnn_helpers import N_ANGLE, SIZE, register_product, torch_one_thread, write_product
from test_catalog import postgres_url  # noqa: F401 - the throwaway PostgreSQL fixture

from catalog.db import Catalog, head_revision
from flows import learn
from tasks import cnn


def _exercise_models(url: str) -> None:
    cat = Catalog(url)
    try:
        assert head_revision() == "0004"
        assert cat.promoted_model("m") is None
        v1 = cat.add_model(name="m", path="/models/a.pt", sha256="a" * 64, metrics={"rmse": 0.5},
                           provenance={"seed": 1}, promoted=True)
        v2 = cat.add_model(name="m", path="/models/b.pt", sha256="b" * 64, metrics={"rmse": 0.4})
        other = cat.add_model(name="other", path="/models/c.pt", sha256="c" * 64, promoted=True)
        assert (v1, v2, other) == (1, 2, 1)
        assert cat.promoted_model("m").version == 1
        cat.promote_model("m", 2)
        rows = cat.models("m")
        assert [(r.version, r.promoted) for r in rows] == [(1, False), (2, True)]
        assert cat.promoted_model("m").sha256 == "b" * 64
        assert cat.promoted_model("other").version == 1          # other names untouched
        assert cat.model("m", 1).metrics == {"rmse": 0.5}
        assert cat.model("m", 1).provenance == {"seed": 1}
        cat.update_model_metrics("m", 1, {"note": "x"})
        assert cat.model("m", 1).metrics == {"rmse": 0.5, "note": "x"}
        with pytest.raises(ValueError, match="version"):
            cat.promote_model("m", 7)
        with pytest.raises(ValueError, match="sha256"):
            cat.add_model(name="m", path="/x.pt", sha256="xyz")
        with pytest.raises(ValueError, match="already registered"):
            cat.add_model(name="m", path="/x.pt", sha256="d" * 64, version=2)
        assert len(cat.models()) == 3
    finally:
        cat.dispose()


def test_catalog_models_table_sqlite(tmp_path):
    _exercise_models(f"sqlite:///{tmp_path / 'c.sqlite'}")


def test_catalog_models_table_postgresql(postgres_url):  # noqa: F811
    _exercise_models(postgres_url)


@pytest.mark.slow
def test_train_then_continual_learning(tmp_path):
    """train_model registers v1 (promoted: nothing to beat); three processed scans arrive;
    continual_learning warm-starts from v1 on library + scans and is promoted when its
    held-out error is lower (both numbers recorded); a deliberately worse candidate (an
    untrained network) is registered but refused; with nothing new, nothing happens."""
    torch_one_thread()
    url = f"sqlite:///{tmp_path / 'cat.sqlite'}"
    out = tmp_path / "out"
    r1 = learn.train_model_run(name="cnn", out=out, catalog_url=url, n_train=64, n_held_out=12,
                               size=SIZE, n_angle=N_ANGLE, epochs=3, lr=1e-3, seed=0,
                               arch={"dense": 128, "n_dense": 1, "refine": 8})
    assert r1["version"] == 1 and r1["promoted"]
    side = json.loads((out / "models" / (r1["path"].split("/")[-1] + ".json")).read_text())
    assert side["weights_sha256"] == r1["sha256"] == cnn.file_sha256(r1["path"])
    assert side["provenance"]["library"]["sha256"]
    assert side["provenance"]["code_version"]

    cat = Catalog(url)
    for i in range(3):
        loc = tmp_path / f"p{i}.zarr"
        write_product(loc, seed=100 + i)
        register_product(cat, f"p{i}", loc)

    r2 = learn.continual_learning_run(name="cnn", out=out, catalog_url=url, epochs=4, lr=1e-3,
                                      seed=1, held_out_fraction=0.34)
    assert r2["status"] == "promoted", r2["metrics"]
    assert len(r2["new_held_out"]) >= 1 and len(r2["new_train"]) >= 1
    m2 = r2["metrics"]
    assert m2["held_out"]["rmse"] < m2["incumbent"]["held_out"]["rmse"]
    assert m2["incumbent"]["version"] == 1
    assert cat.promoted_model("cnn").version == 2
    prov2 = cat.model("cnn", 2).provenance
    assert sorted(prov2["products_train"] + prov2["products_held_out"]) == ["p0", "p1", "p2"]
    assert prov2["warm_start"]["version"] == 1
    assert any(s.get("kind") == "product" for s in prov2["library"]["sources"])

    # a deliberately worse candidate: the same network untrained
    lib = cnn.build_library(8, SIZE, N_ANGLE, seed=5)
    worse = cnn.train(lib, epochs=0, seed=3, arch={"dense": 128, "n_dense": 1, "refine": 8})
    r3 = learn.continual_learning_run(name="cnn", out=out, catalog_url=url, candidate=worse)
    assert r3["status"] == "not promoted"
    m3 = r3["metrics"]
    assert m3["held_out"]["rmse"] > m3["incumbent"]["held_out"]["rmse"]
    assert m3["incumbent"]["version"] == 2 and not m3["promoted"]
    assert cat.promoted_model("cnn").version == 2
    assert [m.version for m in cat.models("cnn")] == [1, 2, 3]
    assert cat.model("cnn", 3).metrics["incumbent"]["held_out"]["rmse"] == pytest.approx(
        m3["incumbent"]["held_out"]["rmse"])

    r4 = learn.continual_learning_run(name="cnn", out=out, catalog_url=url)
    assert r4["status"] == "no new scans"
    # the promoted artefact loads (checksum checked against the catalog) and reconstructs
    model = learn.load_registered_model(cat, "cnn")
    assert model.provenance["weights_sha256"] == cat.promoted_model("cnn").sha256
    with pytest.raises(learn.LearnError, match="no version 9"):
        learn.load_registered_model(cat, "cnn", version=9)
    imgs = write_product(tmp_path / "p9.zarr", seed=999, n_bins=1)
    from tasks.reconstruct import radon

    pred = cnn.predict(model, radon(imgs[:, :, 0], model.angles_deg))
    assert pred.shape == (SIZE, SIZE) and np.isfinite(pred).all()
    cat.dispose()


def test_add_pairs_from_product_and_resampling(tmp_path):
    """Pairs come from the strongest bins plus the bin sum; a product of another size is
    resampled to the library's geometry."""
    loc = tmp_path / "p.zarr"
    imgs = write_product(loc, seed=7, n_bins=3)
    base = cnn.build_library(2, SIZE, N_ANGLE, seed=0)
    lib = cnn.add_pairs_from_product(base, loc, n_bins=2, product_id="p")
    assert len(lib) == 2 + 3
    assert lib.sources[-1]["product_id"] == "p"
    assert lib.sources[-1]["slices"][0]["bins"] == [0, 1]      # the two strongest
    assert set(lib.groups[2:]) == {1}
    from tasks.reconstruct import fbp, radon

    ang = cnn.default_angles(N_ANGLE)
    assert np.allclose(lib.images[2], fbp(radon(imgs[:, :, 0], ang), ang), atol=1e-5)
    assert np.allclose(lib.sinograms[4], radon(imgs.sum(-1), ang), rtol=1e-4, atol=1e-4)

    big = tmp_path / "big.zarr"
    write_product(big, seed=8, n_bins=1, size=48, n_angle=48)
    lib2 = cnn.add_pairs_from_product(base, big, n_bins=1, include_total=False)
    assert lib2.sinograms.shape[1:] == (N_ANGLE, SIZE) and len(lib2) == 3
    # line integrals keep their total: mass per angle scales with (n / m) ** 2 of the area
    m_new = lib2.sinograms[2].sum(1).mean()
    m_img = lib2.images[2].sum()
    assert m_new == pytest.approx(m_img, rel=0.05)

    with pytest.raises(cnn.CnnError, match="product_store"):
        cnn.add_pairs_from_product(base, tmp_path / "missing.zarr")


def test_cli_train_and_learn(tmp_path, capsys):
    from flows.cli import main

    torch_one_thread()
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    assert main(["train", "--size", "16", "--angles", "8", "--n-train", "16", "--n-held-out", "4",
                 "--epochs", "1", "--url", url, "--name", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "tiny v1" in out and "promoted" in out
    assert main(["learn", "--url", url, "--name", "tiny"]) == 0
    assert "no new scans" in capsys.readouterr().out
    assert main(["learn", "--url", url, "--name", "absent"]) == 0
    assert "no promoted model" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--kind", "cats", "--url", url])
