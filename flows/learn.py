"""Model training and continual learning of the CNN reconstruction (tasks.cnn).

Two flows, each a plain function (tested without Prefect) wrapped as a Prefect flow by
:func:`get_flows` (built on first use, so importing this module does not import Prefect):

``train_model``
    simulated library -> train -> evaluate on a held-out simulated set -> save the weights
    and sidecar as an artefact -> register in the catalog's ``models`` table (promoted when
    no model of that name is promoted yet, or when it beats the promoted one on its
    held-out set).

``continual_learning``
    In the manner of PtychoNN's authors (A. V. Babu et al., "Deep learning at the edge
    enables real-time streaming ptychographic imaging", Nat. Commun. 14, 7059 (2023)):
    scans processed conventionally since the promoted model was trained bring
    (sinogram, FBP volume) pairs (:func:`tasks.cnn.add_pairs_from_product`); a fixed share
    of the new scans is held out for good; the library (the promoted model's simulated
    library, rebuilt from its recorded recipe and checked against its checksum, plus every
    training scan so far) trains a candidate warm-started from the promoted model; the
    candidate and the promoted model are evaluated on the same held-out set (every
    held-out scan so far plus the simulated held-out set); the candidate is registered
    with both numbers and promoted only if its held-out error is lower.

Artefacts are content-addressed: ``<models_dir>/<name>-<sha256[:16]>.pt`` plus the JSON
sidecar ``.pt.json``.
"""

from __future__ import annotations

import hashlib
import os
import uuid
import warnings
from pathlib import Path

import numpy as np

from catalog.db import Catalog
from flows.argtypes import nonempty, real, whole
from tasks import cnn

__all__ = ["LearnError", "train_model_run", "continual_learning_run", "save_artifact",
           "load_registered_model",
           "get_flows", "DEFAULT_NAME"]

DEFAULT_NAME = "cnn"


class LearnError(ValueError):
    """A training request that cannot run; the message names the argument."""


def _log(msg: str) -> None:
    try:
        from prefect import get_run_logger

        get_run_logger().info(msg)
    except Exception:  # noqa: BLE001 - outside a Prefect run
        print(msg)


def _catalog(catalog_url: str | None, out: str | Path) -> Catalog:
    return Catalog(Catalog.resolve_url(catalog_url, out))


def save_artifact(model: cnn.CnnModel, models_dir: str | Path, name: str,
                  extra: dict | None = None) -> tuple[Path, str]:
    """Save a model as ``<models_dir>/<name>-<sha[:16]>.pt`` (+ ``.pt.json``); returns
    (path, sha256 of the weights)."""
    d = Path(models_dir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{name}-{uuid.uuid4().hex}.pt"
    side = cnn.save_model(model, tmp, name=name, extra=extra)
    sha = side["weights_sha256"]
    final = d / f"{name}-{sha[:16]}.pt"
    os.replace(tmp.with_name(tmp.name + ".json"), final.with_name(final.name + ".json"))
    os.replace(tmp, final)
    return final, sha


def load_registered_model(catalog: Catalog, name: str = DEFAULT_NAME,
                          version: int | None = None, device: str = "cpu") -> cnn.CnnModel:
    """The promoted (or a given) version of a model from the catalog, its weights checked
    against the SHA-256 the catalog recorded.

    Raises
    ------
    LearnError
        No such model, or the file's checksum differs from the catalog's.
    """
    row = catalog.promoted_model(name) if version is None else catalog.model(name, version)
    if row is None:
        which = "promoted version" if version is None else f"version {version}"
        raise LearnError(f"model: no {which} of {name!r} in the catalog (train one: xrdct train)")
    if not Path(row.path).is_file() or cnn.file_sha256(row.path) != row.sha256:
        raise LearnError(f"model: {name} v{row.version} weights at {row.path} are missing or do "
                         f"not match the catalog's SHA-256 {row.sha256}")
    return cnn.load_model(row.path, device=device)


def _summary(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "history"}


def _library_from_recipe(sources: list[dict], angles=None) -> cnn.Library | None:
    """Rebuild the simulated part of a library from its recorded sources (None if none)."""
    lib = None
    for src in sources:
        if src.get("kind") not in cnn.KINDS:
            continue
        part = cnn.build_library(src["n"], src["size"], src["n_angle"], kind=src["kind"],
                                 seed=src["seed"], noise=src["noise"],
                                 radius_frac=src.get("radius_frac", 0.9),
                                 source="procedural" if src.get("phantoms") == "procedural" else "auto",
                                 angles_deg=angles)
        lib = part if lib is None else lib.extend(part)
    return lib


def _held_out_rmse(model: cnn.CnnModel, held: cnn.Library) -> float:
    return cnn.evaluate(model, held)["rmse"]


def train_model_run(*, name: str = DEFAULT_NAME, out: str | Path = "xrdct-out",
                    catalog_url: str | None = None, models_dir: str | Path | None = None,
                    n_train: int = 400, n_held_out: int = 40, size: int = 32, n_angle: int = 32,
                    kind: str = "catalyst", noise: float = 0.01, epochs: int = 30,
                    lr: float = cnn.LEARNING_RATE, batch_size: int = 16, seed: int = 0,
                    arch: dict | None = None, promote: str = "if_better") -> dict:
    """Build a simulated library, train, evaluate on held-out phantoms, save, register.

    Parameters
    ----------
    name : str
        Model name in the catalog.
    out : str or Path
        Product directory (the SQLite catalog's default home, ``<out>/catalog.sqlite``).
    catalog_url : str, optional
        SQLAlchemy URL (else ``XRDCT_CATALOG_URL``, else the SQLite default).
    models_dir : str or Path, optional
        Where artefacts go (default ``<out>/models``).
    n_train, n_held_out, size, n_angle, kind, noise
        Library recipe (:func:`tasks.cnn.build_library`); the held-out set uses seed
        ``seed + 1_000_003`` so it shares no phantom with training.
    epochs, lr, batch_size, seed, arch
        :func:`tasks.cnn.train`.
    promote : {"if_better", "always", "never"}
        ``if_better``: promoted when no model of ``name`` is promoted, or when its held-out
        RMSE is below the promoted model's on this held-out set.

    Returns
    -------
    dict
        ``name``, ``version``, ``path``, ``sha256``, ``promoted``, ``metrics``.
    """
    if promote not in ("if_better", "always", "never"):
        raise LearnError(f"promote: expected 'if_better', 'always' or 'never', got {promote!r}")
    lib = cnn.build_library(n_train, size, n_angle, kind=kind, seed=seed, noise=noise)
    held = cnn.build_library(n_held_out, size, n_angle, kind=kind, seed=seed + 1_000_003, noise=noise)
    _log(f"train_model {name}: library of {len(lib)} pairs ({kind}, {size} px, {n_angle} angles)")
    model = cnn.train(lib, epochs=epochs, lr=lr, seed=seed, batch_size=batch_size, arch=arch)
    ev = cnn.evaluate(model, held)
    _log(f"train_model {name}: held-out RMSE {ev['rmse']:.4f}, PSNR {ev['psnr_db']:.2f} dB")
    model.provenance["library"]["simulated_sha256"] = lib.checksum()
    model.provenance["held_out_library"] = held.description()
    model.provenance["products_train"] = []
    model.provenance["products_held_out"] = []
    cat = _catalog(catalog_url, out)
    try:
        return _register(cat, name, model, held, ev, promote, out, models_dir,
                         flow="train_model")
    finally:
        cat.dispose()


def _register(cat: Catalog, name: str, model: cnn.CnnModel, held: cnn.Library, ev: dict,
              promote: str, out, models_dir, *, flow: str, product_held: dict | None = None) -> dict:
    """Compare with the promoted model on ``held``, save, register, promote if better."""
    inc_row = cat.promoted_model(name)
    incumbent = None
    if inc_row is not None:
        try:
            inc_model = cnn.load_model(inc_row.path)
            inc_ev = cnn.evaluate(inc_model, held)
            incumbent = {"version": inc_row.version, "sha256": inc_row.sha256,
                         "held_out": inc_ev}
        except (cnn.CnnError, OSError) as err:
            warnings.warn(f"promoted model {name} v{inc_row.version} cannot be evaluated "
                          f"({err}); the candidate is compared with nothing", RuntimeWarning,
                          stacklevel=2)
            incumbent = {"version": inc_row.version, "error": str(err)}
    better = incumbent is None or "held_out" not in incumbent or \
        ev["rmse"] < incumbent["held_out"]["rmse"]
    do_promote = promote == "always" or (promote == "if_better" and better)
    metrics = {"held_out": ev, "training": _summary(model.metrics),
               "incumbent": incumbent, "better_than_incumbent": bool(better),
               "promoted": bool(do_promote), "flow": flow}
    if product_held is not None:
        metrics["held_out_parts"] = product_held
    path, sha = save_artifact(model, Path(models_dir) if models_dir else Path(out) / "models",
                              name, extra={"metrics_at_registration": metrics})
    prov = dict(model.provenance)
    prov["weights_sha256"] = sha
    version = cat.add_model(name=name, path=str(path.resolve()), sha256=sha, metrics=cnn._jsonable(metrics),
                            provenance=cnn._jsonable(prov), promoted=do_promote)
    inc_txt = ("none" if incumbent is None or "held_out" not in incumbent
               else f"{incumbent['held_out']['rmse']:.4f} (v{incumbent['version']})")
    _log(f"{flow} {name}: registered v{version}, held-out RMSE {ev['rmse']:.4f} vs promoted "
         f"{inc_txt}: {'promoted' if do_promote else 'not promoted'}")
    return {"name": name, "version": version, "path": str(path), "sha256": sha,
            "promoted": bool(do_promote), "metrics": metrics}


def _held_out_by_hash(pid: str, fraction: float) -> bool:
    h = int(hashlib.sha256(pid.encode()).hexdigest()[:12], 16) / float(16 ** 12)
    return h < fraction


def _split_products(ids: list[str], held_out_fraction: float,
                    have_held: bool) -> tuple[list[str], list[str]]:
    """Split new product ids into (train, held out): a scan is held out when the SHA-256 of
    its id, read as a number in [0, 1), is below ``held_out_fraction`` -- a property of the
    scan, not of the batch it arrives with. When no scan is held out yet (``have_held``
    False) and two or more arrive, the one of smallest hash is held out."""
    held = [i for i in ids if _held_out_by_hash(i, held_out_fraction)]
    if not held and not have_held and len(ids) >= 2 and held_out_fraction > 0:
        held = [min(ids, key=lambda p: hashlib.sha256(p.encode()).hexdigest())]
    train = [i for i in ids if i not in held]
    return sorted(train), sorted(held)


def _product_pairs(lib_like: cnn.Library, products: list, n_bins: int) -> cnn.Library | None:
    out = None
    for p in products:
        base = cnn.Library(np.zeros((0,) + lib_like.sinograms.shape[1:], np.float32),
                           np.zeros((0,) + lib_like.images.shape[1:], np.float32),
                           lib_like.angles_deg)
        try:
            part = cnn.add_pairs_from_product(base, p.location, n_bins=n_bins, product_id=p.id)
        except cnn.CnnError as err:      # an unreadable or empty product: skipped, said so
            warnings.warn(f"continual_learning: product {p.id} skipped: {err}", RuntimeWarning,
                          stacklevel=2)
            continue
        out = part if out is None else out.extend(part)
    return out


def continual_learning_run(*, name: str = DEFAULT_NAME, out: str | Path = "xrdct-out",
                           catalog_url: str | None = None, models_dir: str | Path | None = None,
                           epochs: int = 10, lr: float = cnn.LEARNING_RATE, batch_size: int = 16,
                           seed: int = 0, held_out_fraction: float = 0.25, n_bins: int = 8,
                           candidate: cnn.CnnModel | None = None) -> dict:
    """Add newly processed scans to the library, retrain from the promoted model, promote
    only if the held-out error improves.

    Parameters
    ----------
    name, out, catalog_url, models_dir
        As :func:`train_model_run`.
    epochs, lr, batch_size, seed
        Warm-start training (:func:`tasks.cnn.train` with ``init`` = promoted model).
    held_out_fraction : float
        Share of the *new* scans held out for good (recorded in the candidate's provenance,
        so later rounds keep them out of training).
    n_bins : int
        Radial bins per slice taken from each product (:func:`tasks.cnn.add_pairs_from_product`).
    candidate : CnnModel, optional
        Offer this model instead of training one (it is evaluated, registered and promoted
        by the same rule) -- for a model trained elsewhere, and for testing the rule.

    Returns
    -------
    dict
        ``status`` ("no promoted model", "no new scans", "promoted", "not promoted"), and
        for a candidate the fields of :func:`train_model_run`, plus ``new_train`` and
        ``new_held_out`` product ids.
    """
    if not 0 <= held_out_fraction < 1:
        raise LearnError(f"held_out_fraction: expected 0 <= f < 1, got {held_out_fraction!r}")
    cat = _catalog(catalog_url, out)
    try:
        row = cat.promoted_model(name)
        if row is None:
            return {"status": "no promoted model", "name": name}
        incumbent = cnn.load_model(row.path)
        prov = row.provenance or {}
        used_train = list(prov.get("products_train", []))
        used_held = list(prov.get("products_held_out", []))
        known = set(used_train) | set(used_held)
        new = [p for p in cat.products() if p.id not in known and _has_pairs(p.location)]
        if not new and candidate is None:
            return {"status": "no new scans", "name": name, "promoted_version": row.version}
        new_train, new_held = _split_products([p.id for p in new], held_out_fraction,
                                               have_held=bool(used_held))
        by_id = {p.id: p for p in cat.products()}
        geom = cnn.Library(np.zeros((0, incumbent.n_angle, incumbent.n_translation), np.float32),
                           np.zeros((0, incumbent.n_translation, incumbent.n_translation), np.float32),
                           incumbent.angles_deg)
        train_ids = [i for i in used_train + new_train if i in by_id]
        held_ids = [i for i in used_held + new_held if i in by_id]
        # the simulated part of the promoted model's library, rebuilt from its recipe
        lib_desc = prov.get("library", {})
        sim = _library_from_recipe(lib_desc.get("sources", []), incumbent.angles_deg)
        if sim is not None and lib_desc.get("simulated_sha256") not in (None, sim.checksum()):
            warnings.warn("continual_learning: the simulated library rebuilt from the promoted "
                          "model's recipe differs from the one it was trained on (phantom images "
                          "or code changed); training goes on with the rebuilt one",
                          RuntimeWarning, stacklevel=2)
        prod_train = _product_pairs(geom, [by_id[i] for i in train_ids], n_bins)
        library = sim if sim is not None else geom
        if prod_train is not None:
            library = library.extend(prod_train) if len(library) else prod_train
        held_sim = _library_from_recipe(prov.get("held_out_library", {}).get("sources", []),
                                        incumbent.angles_deg)
        prod_held = _product_pairs(geom, [by_id[i] for i in held_ids], n_bins)
        parts = [x for x in (held_sim, prod_held) if x is not None and len(x)]
        if not parts:
            raise LearnError("held-out set: empty (no simulated held-out recipe and no held-out "
                             "scans); raise held_out_fraction or train with train_model first")
        held = parts[0] if len(parts) == 1 else parts[0].extend(parts[1])
        if candidate is None:
            _log(f"continual_learning {name}: {len(new_train)} new training scan(s), "
                 f"{len(new_held)} new held-out scan(s); library {len(library)} pairs; "
                 f"warm start from v{row.version}")
            model = cnn.train(library, epochs=epochs, lr=lr, seed=seed, init=incumbent,
                              batch_size=batch_size)
            model.provenance["warm_start"] = {"version": row.version, "sha256": row.sha256}
        else:
            model = candidate.copy()
            model.provenance = dict(model.provenance)
            model.provenance.setdefault("library", library.description())
            model.provenance["library"] = dict(model.provenance["library"])
            model.provenance["offered"] = True
        model.provenance["library"]["simulated_sha256"] = None if sim is None else sim.checksum()
        model.provenance["held_out_library"] = prov.get("held_out_library", {})
        model.provenance["products_train"] = train_ids
        model.provenance["products_held_out"] = held_ids
        ev = cnn.evaluate(model, held)
        parts_ev = {}
        if held_sim is not None and len(held_sim):
            parts_ev["simulated"] = cnn.evaluate(model, held_sim)
        if prod_held is not None and len(prod_held):
            parts_ev["scans"] = cnn.evaluate(model, prod_held)
        res = _register(cat, name, model, held, ev, "if_better", out, models_dir,
                        flow="continual_learning", product_held=parts_ev)
        res.update(status="promoted" if res["promoted"] else "not promoted",
                   new_train=new_train, new_held_out=new_held, promoted_before=row.version)
        return res
    finally:
        cat.dispose()


def _has_pairs(location: str) -> bool:
    p = Path(location)
    return (p / "sinogram" / "zarr.json").exists() and (p / "volume" / "zarr.json").exists()


_FLOWS = None


def get_flows() -> dict:
    """The Prefect flows ``train_model`` and ``continual_learning`` (built on first use)."""
    global _FLOWS
    if _FLOWS is None:
        from prefect import flow

        @flow(name="train_model", log_prints=True)
        def train_model(name: str = DEFAULT_NAME, out: str = "xrdct-out",
                        catalog_url: str | None = None, n_train: int = 400, n_held_out: int = 40,
                        size: int = 32, n_angle: int = 32, kind: str = "catalyst",
                        noise: float = 0.01, epochs: int = 30, lr: float = cnn.LEARNING_RATE,
                        seed: int = 0, promote: str = "if_better") -> dict:
            """Train the CNN reconstruction on a simulated library and register it."""
            return train_model_run(name=name, out=out, catalog_url=catalog_url, n_train=n_train,
                                   n_held_out=n_held_out, size=size, n_angle=n_angle, kind=kind,
                                   noise=noise, epochs=epochs, lr=lr, seed=seed, promote=promote)

        @flow(name="continual_learning", log_prints=True)
        def continual_learning(name: str = DEFAULT_NAME, out: str = "xrdct-out",
                               catalog_url: str | None = None, epochs: int = 10,
                               lr: float = cnn.LEARNING_RATE, seed: int = 0,
                               held_out_fraction: float = 0.25, n_bins: int = 8) -> dict:
            """Retrain the promoted CNN with newly processed scans; promote only if better."""
            return continual_learning_run(name=name, out=out, catalog_url=catalog_url,
                                          epochs=epochs, lr=lr, seed=seed,
                                          held_out_fraction=held_out_fraction, n_bins=n_bins)

        _FLOWS = {"train_model": train_model, "continual_learning": continual_learning}
    return _FLOWS


# ------------------------------------------------------------------------------ CLI



def add_cli(sub, where) -> None:
    """Add ``xrdct train`` and ``xrdct learn`` to the CLI's sub-parsers (``where`` adds the
    catalog's ``--out`` / ``--url`` options)."""
    p = sub.add_parser("train", help="train the CNN reconstruction on simulated phantoms and "
                       "register it in the catalog")
    p.add_argument("--name", default=DEFAULT_NAME, type=nonempty, help="model name in the catalog")
    p.add_argument("--size", type=whole(8), default=32, help="image side = translations")
    p.add_argument("--angles", type=whole(3), default=32)
    p.add_argument("--n-train", type=whole(1), default=400)
    p.add_argument("--n-held-out", type=whole(1), default=40)
    p.add_argument("--kind", choices=list(cnn.KINDS), default="catalyst")
    p.add_argument("--noise", type=real(0.0), default=0.01)
    p.add_argument("--epochs", type=whole(1), default=30)
    p.add_argument("--lr", type=real(0.0, lo_open=True), default=cnn.LEARNING_RATE)
    p.add_argument("--seed", type=whole(0), default=0)
    p.add_argument("--promote", choices=["if_better", "always", "never"], default="if_better")
    where(p)
    p.set_defaults(fn=_cmd_train)
    p = sub.add_parser("learn", help="continual learning: retrain the promoted CNN with newly "
                       "processed scans, promote only if the held-out error improves")
    p.add_argument("--name", default=DEFAULT_NAME, type=nonempty)
    p.add_argument("--epochs", type=whole(1), default=10)
    p.add_argument("--lr", type=real(0.0, lo_open=True), default=cnn.LEARNING_RATE)
    p.add_argument("--seed", type=whole(0), default=0)
    p.add_argument("--held-out-fraction", type=real(0.0, 1.0, lo_open=True, hi_open=True),
                   default=0.25)
    p.add_argument("--bins", type=whole(1), default=8, help="radial bins per slice taken from a scan")
    where(p)
    p.set_defaults(fn=_cmd_learn)


def _report(res: dict) -> int:
    if "version" not in res:
        print(f"{res.get('name')}: {res['status']}")
        return 0
    m = res["metrics"]
    inc = m.get("incumbent") or {}
    inc_txt = (f"; promoted v{inc['version']} held-out RMSE {inc['held_out']['rmse']:.4f}"
               if "held_out" in inc else "")
    print(f"{res['name']} v{res['version']}: held-out RMSE {m['held_out']['rmse']:.4f}, PSNR "
          f"{m['held_out']['psnr_db']:.2f} dB{inc_txt} -> "
          f"{'promoted' if res['promoted'] else 'not promoted'}\n  {res['path']}")
    return 0


def _cmd_train(args) -> int:
    return _report(train_model_run(name=args.name, out=args.out, catalog_url=args.url,
                                   n_train=args.n_train, n_held_out=args.n_held_out,
                                   size=args.size, n_angle=args.angles, kind=args.kind,
                                   noise=args.noise, epochs=args.epochs, lr=args.lr,
                                   seed=args.seed, promote=args.promote))


def _cmd_learn(args) -> int:
    return _report(continual_learning_run(name=args.name, out=args.out, catalog_url=args.url,
                                          epochs=args.epochs, lr=args.lr, seed=args.seed,
                                          held_out_fraction=args.held_out_fraction,
                                          n_bins=args.bins))
