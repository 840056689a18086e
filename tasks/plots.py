"""Overview figure of a product: where people look rather than read.

One PNG per product: total-intensity sinogram, reconstruction (summed over the radial
axis), the mean pattern of the sample with the fitted phases, one weight-fraction map per
phase, and the Rwp map. Uses matplotlib's non-interactive Agg backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


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
    if "volume" in ds:
        panels.append(("image", ds["volume"].isel(z=z).sum("radial").values,
                       "reconstruction (sum over radial)", ("x (px)", "y (px)")))
    phases = list(ds["phase"].values) if "phase" in ds.coords else []
    for i, name in enumerate(phases):
        panels.append(("map", ds["weight_fraction"].isel(z=z, phase=i).values,
                       f"{name} weight fraction", ("x (px)", "y (px)")))
    if "rwp" in ds:
        panels.append(("rwp", ds["rwp"].isel(z=z).values, "Rwp", ("x (px)", "y (px)")))
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
