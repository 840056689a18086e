"""Overview figure of a product: where people look rather than read.

One PNG per product: total-intensity sinogram, reconstruction (summed over the radial
axis), the mean pattern of the sample with the fitted phases, one weight-fraction map per
phase, and the Rwp map. Uses matplotlib's non-interactive Agg backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def image_extent(img, y, x) -> tuple[np.ndarray, tuple[float, float, float, float], str]:
    """An image ``(y, x)`` and its pixel-centre coordinates, arranged for ``imshow`` so that
    +x is to the right and +y up, whatever order the coordinates are stored in (the
    product's ``y`` descends: row 0 is the largest y).

    Parameters
    ----------
    img : array (ny, nx)
    y, x : array (ny,), (nx,)
        Evenly spaced pixel centres (e.g. mm), ascending or descending.

    Returns
    -------
    img : array (ny, nx)
        ``img`` with rows and columns in ascending y and x.
    extent : tuple of float
        ``(left, right, bottom, top)`` pixel edges for ``imshow(..., extent=extent)``.
    origin : str
        ``"lower"`` (row 0, the smallest y, at the bottom).
    """
    img = np.asarray(img)
    y, x = np.asarray(y, float), np.asarray(x, float)
    if y.size > 1 and y[-1] < y[0]:
        img, y = img[::-1], y[::-1]
    if x.size > 1 and x[-1] < x[0]:
        img, x = img[:, ::-1], x[::-1]
    dy = float(y[1] - y[0]) if y.size > 1 else 1.0
    dx = float(x[1] - x[0]) if x.size > 1 else 1.0
    extent = (float(x[0] - dx / 2), float(x[-1] + dx / 2), float(y[0] - dy / 2), float(y[-1] + dy / 2))
    return img, extent, "lower"


def overview_png(product: str | Path, png: str | Path, z: int = 0) -> Path:
    """Write the overview PNG of slice ``z`` of a published product.

    Parameters
    ----------
    product : path
        Published Zarr product (``<out>/<id>.zarr``).
    png : path
        Output PNG file.
    z : int
        Slice index.

    Returns
    -------
    Path
        ``png``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.store import open_product

    ds = open_product(product)
    panels = []
    if "patterns" in ds:
        panels.append(("sinogram", ds["patterns"].isel(z=z).sum("radial").values,
                       "total-intensity sinogram", ("translation (px)", "angle (index)")))
    # images are drawn in the product's coordinates, +y up (tasks.plots.image_extent)
    has_xy = "x" in ds.coords and "y" in ds.coords
    u = ds["x"].attrs.get("units", "px") if has_xy else "px"
    xy = (f"x ({u})", f"y ({u})")
    if "volume" in ds:
        panels.append(("image", ds["volume"].isel(z=z).sum("radial").values,
                       "reconstruction (sum over radial)", xy))
    phases = list(ds["phase"].values) if "phase" in ds.coords else []
    for i, name in enumerate(phases):
        panels.append(("map", ds["weight_fraction"].isel(z=z, phase=i).values,
                       f"{name} weight fraction", xy))
    if "rwp" in ds:
        panels.append(("rwp", ds["rwp"].isel(z=z).values, "Rwp", xy))
    ncol = min(4, max(1, len(panels)))
    nrow = int(np.ceil(len(panels) / ncol)) + (1 if "volume" in ds else 0)
    fig = plt.figure(figsize=(4.2 * ncol, 3.6 * nrow), dpi=90)
    for k, (kind, img, title, (xl, yl)) in enumerate(panels):
        ax = fig.add_subplot(nrow, ncol, k + 1)
        kw = {"cmap": "viridis", "origin": "upper", "interpolation": "nearest"}
        if kind == "map":
            kw.update(vmin=0, vmax=1)
        if kind == "sinogram":
            kw["aspect"] = "auto"
        elif has_xy and img.shape == (ds.sizes["y"], ds.sizes["x"]):
            img, extent, origin = image_extent(img, ds["y"].values, ds["x"].values)
            kw.update(extent=extent, origin=origin)
        im = ax.imshow(img, **kw)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xl, fontsize=8)
        ax.set_ylabel(yl, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if "volume" in ds:
        ax = fig.add_subplot(nrow, 1, nrow)
        vol = ds["volume"].isel(z=z).values
        mask = ds["sample_mask"].isel(z=z).values if "sample_mask" in ds else np.ones(vol.shape[:2], bool)
        radial = ds["radial"].values
        if mask.any():
            ax.plot(radial, vol[mask].mean(axis=0), "k-", lw=1, label="mean sample pattern")
        unit = ds["radial"].attrs.get("unit", "")
        ax.set_xlabel(f"radial ({unit})")
        ax.set_ylabel("intensity")
        ax.legend(fontsize=8)
    prov = ds.attrs.get("xrdct", {})
    fig.suptitle(f"xrdct product {prov.get('product_id', Path(product).stem)} "
                 f"({prov.get('pipeline_name', '')})", fontsize=11)
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png)
    plt.close(fig)
    return png


def refinement_png(png: str | Path, radial, patterns, models, phase_patterns, phase_names,
                   maps: dict | None = None, *, unit: str = "2th_deg", titles=None) -> Path:
    """Figure of a whole-pattern refinement: maps, and fitted patterns with residuals.

    Parameters
    ----------
    png : path
        Output PNG file.
    radial : array (n,)
        Radial axis in ``unit``.
    patterns, models : array (k, n)
        Observed and fitted patterns of ``k`` voxels (a few; one row of panels each).
    phase_patterns : array (k, n_phase, n)
        Each phase's contribution to the fit (drawn upright, in a band below the residual).
    phase_names : sequence of str
    maps : dict name -> array (y, x), optional
        Maps drawn in a top row (e.g. ``lattice_c LiCoO2``, ``crystallite_size Cu``,
        ``rwp``); NaN is drawn blank.
    unit : str
        Axis label of ``radial``.
    titles : sequence of str, optional
        One title per pattern (e.g. its voxel and Rwp).

    Returns
    -------
    Path
        ``png``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.asarray(radial)
    Y = np.atleast_2d(np.asarray(patterns, dtype=float))
    M = np.atleast_2d(np.asarray(models, dtype=float))
    PP = np.asarray(phase_patterns, dtype=float).reshape(Y.shape[0], -1, x.size)
    maps = maps or {}
    nm = len(maps)
    k = Y.shape[0]
    ncol = max(nm, 1)
    fig = plt.figure(figsize=(max(12, 3 * ncol), 3.2 * (nm > 0) + 3.6 * k), constrained_layout=True)
    rows = (1 if nm else 0) + k
    gs = fig.add_gridspec(rows, ncol)
    for i, (name, img) in enumerate(maps.items()):
        ax = fig.add_subplot(gs[0, i])
        a = np.asarray(img, dtype=float)
        fin = a[np.isfinite(a)]
        vmin, vmax = (np.percentile(fin, [2, 98]) if fin.size else (0, 1))
        im = ax.imshow(np.where(np.isfinite(a), a, np.nan), vmin=vmin, vmax=vmax, cmap="viridis")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, shrink=0.8)
    for j in range(k):
        ax = fig.add_subplot(gs[(1 if nm else 0) + j, :])
        y, m = Y[j], M[j]
        span = np.nanmax(y) - np.nanmin(y)
        ax.plot(x, y, "k.", ms=1.5, label="observed")
        ax.plot(x, m, "r-", lw=0.7, label="fit")
        base = np.nanmin(y) - 0.08 * span
        ax.plot(x, base + (y - m), color="0.4", lw=0.6, label="residual")
        low = base - 0.1 * span - (float(np.nanmax(PP[j])) if PP[j].size else 0.0)
        for p, name in enumerate(phase_names):  # upright, in a band below the residual
            ax.plot(x, low + PP[j, p], lw=0.6, label=name)
        ax.set_xlabel(f"radial ({unit})")
        ax.set_ylabel("intensity")
        if titles is not None:
            ax.set_title(titles[j], fontsize=9)
        if j == 0:
            ax.legend(fontsize=7, ncol=3 + len(phase_names), loc="upper right")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)


def refinement_png_from_product(product: str | Path, png: str | Path, z: int = 0, n_patterns: int = 3,
                                phases_dir: str | Path | None = None) -> Path:
    """:func:`refinement_png` of a product mapped with ``mapping.method: refine``: maps
    of lattice parameters, crystallite size and Rwp of slice ``z``, and the fitted
    patterns of the ``n_patterns`` voxels with the largest total intensity (the model is
    rebuilt from the product's pipeline spec and ``refine_params``)."""
    from pipelines.spec import parse_spec
    from tasks.refine import evaluate, model_from_mapping
    from tasks.rietveld import load_phase
    from tasks.store import open_product, provenance

    ds = open_product(product)
    spec = parse_spec(provenance(product)["pipeline_spec"], source=str(product))
    names = [str(p) for p in ds["phase"].values]
    phases = [load_phase(p.name, path) for p, path in zip(spec.mapping.phases, spec.phase_paths())]
    pv = ds["refine_params"]
    model = model_from_mapping(phases, ds["radial"].values, pv.attrs["radial_unit"],
                               pv.attrs["wavelength_m"], spec.mapping)
    P = pv.isel(z=z).values                                   # (y, x, P)
    vol = ds["volume"].isel(z=z).values
    ok = np.isfinite(P).all(axis=-1)
    tot = np.where(ok, np.nansum(vol, axis=-1), -np.inf)
    pick = np.argsort(tot.ravel())[::-1][:n_patterns]
    iy, ix = np.unravel_index(pick, tot.shape)
    Xp = P[iy, ix]
    models = evaluate(model, Xp)
    pp = evaluate(model, Xp, per_phase=True)
    maps = {}
    for v in ("lattice_a", "lattice_c", "crystallite_size"):
        if v in ds:
            for i, n in enumerate(names):
                a = ds[v].isel(z=z, phase=i).values
                if np.isfinite(a).any():
                    maps[f"{v} {n}"] = a
    maps["rwp"] = ds["rwp"].isel(z=z).values
    rw = ds["rwp"].isel(z=z).values
    titles = [f"voxel (y={a}, x={b}), Rwp {rw[a, b]:.4f}" for a, b in zip(iy, ix)]
    return refinement_png(png, ds["radial"].values, vol[iy, ix], models, pp, names, maps,
                          unit=pv.attrs["radial_unit"], titles=titles)
