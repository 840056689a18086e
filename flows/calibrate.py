"""Instrument profile from a calibrant, stored with the calibration: ``xrdct profile``.

The peak shape of the instrument (Caglioti U, V, W, pseudo-Voigt eta, zero shift) is
refined once from a calibrant measured in the same geometry (NIST CeO2 SRM 674b, LaB6 SRM
660c), with :func:`tasks.refine.refine_profile`, and stored in the catalog keyed by the
PONI file's checksum. A pipeline whose ``mapping.profile`` is ``calibration`` then uses the
newest profile of its PONI; the profile's key is an input of the product id, so storing a
better profile makes a new product on reprocessing, and the old products keep naming the
profile they were made with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flows.argtypes import real, whole

PATTERN_SUFFIXES = (".xy", ".dat", ".txt", ".chi", ".csv")


class CalibrantError(ValueError):
    """A calibrant file, PONI or calibrant phase that cannot be used; names the file."""


@dataclass
class ProfileReport:
    """What :func:`calibrate_profile` stored.

    Attributes
    ----------
    row : catalog.db.InstrumentProfile
        The catalog row (``key``, ``profile``, ``esd``, ``rwp``, ...).
    result : tasks.refine.ProfileResult
        The fit.
    radial : ndarray (n,) float64
        2theta (deg) of the fitted pattern.
    pattern : ndarray (n,) float64
        The calibrant pattern that was fitted.
    png : Path
        Figure of the fit (observed, model, residual).
    """

    row: object
    result: object
    radial: np.ndarray
    pattern: np.ndarray
    png: Path


def resolve_calibrant(calibrant: str | Path) -> tuple[str, Path]:
    """Name and CIF path of a calibrant: a CIF path, or a phase name in
    ``pipelines/phases`` (``CeO2``). Raises CalibrantError naming what was looked for."""
    from pipelines.spec import PHASES_DIR

    p = Path(calibrant)
    if p.suffix.lower() == ".cif":
        if not p.is_file():
            raise CalibrantError(f"calibrant: CIF file {str(p)!r} not found")
        return p.stem, p
    cand = PHASES_DIR / f"{calibrant}.cif"
    if not cand.is_file():
        known = sorted(q.stem for q in PHASES_DIR.glob("*.cif"))
        raise CalibrantError(f"calibrant: {calibrant!r} is neither a CIF path nor a phase in "
                             f"{PHASES_DIR} (known: {', '.join(known)})")
    return str(calibrant), cand


def read_pattern(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A 1-D calibrant pattern from a two-column text file (2theta in degrees, intensity),
    as pyFAI, Dioptas or nDTomo write them; ``#`` lines are comments.

    Returns
    -------
    (tth_deg, intensity) : ndarrays (n,) float64

    Raises
    ------
    CalibrantError
        Unreadable, fewer than two columns, a header naming a radial unit other than
        2th_deg, non-increasing 2theta.
    """
    path = Path(path)
    header = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lstrip().startswith("#"):
                    header.append(line)
        d = np.loadtxt(path, comments="#", delimiter="," if path.suffix.lower() == ".csv" else None,
                       ndmin=2)
    except (OSError, ValueError) as err:
        raise CalibrantError(f"{path}: cannot read a two-column pattern: {err}") from None
    if d.shape[1] < 2 or d.shape[0] < 20:
        raise CalibrantError(f"{path}: expected at least 20 rows of two columns (2th_deg, "
                             f"intensity), got shape {d.shape}")
    text = "".join(header).lower()
    for other in ("q_nm^-1", "q_a^-1", "r_mm", "d*2_a^-2"):
        if other in text:
            raise CalibrantError(f"{path}: the header names radial unit {other!r}; expected "
                                 "2th_deg (integrate the calibrant in 2theta)")
    x, y = d[:, 0].astype(np.float64), d[:, 1].astype(np.float64)
    if not np.all(np.diff(x) > 0):
        raise CalibrantError(f"{path}: column 1 (2th_deg): expected strictly increasing values")
    return x, y


def integrate_calibrant(image: str | Path, poni: str | Path, *, mask=None, npt: int = 2000,
                        two_theta_range: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Integrate a calibrant frame (any format fabio reads: TIFF, CBF, EDF, ...) to 2theta
    with the pipeline's integrator (:class:`tasks.integrate.RadialIntegrator`: pyFAI's CSR
    matrix, solid angle and polarisation corrections).

    Returns
    -------
    (tth_deg, intensity) : ndarrays (npt,) float64

    Raises
    ------
    CalibrantError
        Unreadable image, or a frame whose shape is not the PONI detector's.
    """
    import fabio

    from tasks.integrate import RadialIntegrator

    try:
        img = np.asarray(fabio.open(str(image)).data, dtype=np.float32)
    except Exception as err:  # noqa: BLE001 - fabio raises many types
        raise CalibrantError(f"{image}: cannot read a detector frame: {err}") from None
    integ = RadialIntegrator(poni, npt=npt, unit="2th_deg", mask=mask, radial_range=two_theta_range,
                             shape=img.shape)
    if tuple(integ.mask.shape) != img.shape:
        raise CalibrantError(f"{image}: frame shape {img.shape} does not match the detector of "
                             f"{poni} {tuple(integ.mask.shape)}")
    y = np.asarray(integ.integrate(img[None])[0], dtype=np.float64)[0]
    return np.asarray(integ.radial, dtype=np.float64), y


def calibrate_profile(source: str | Path, poni: str | Path, calibrant: str | Path = "CeO2", *,
                      out: str | Path = "xrdct-out", url: str | None = None, mask=None,
                      npt: int = 2000, two_theta_range: tuple | None = None,
                      refine_lattice: bool = True, background_order: int = 6) -> ProfileReport:
    """Refine the instrument profile from a calibrant and store it with the calibration.

    Parameters
    ----------
    source : str or Path
        The calibrant: a detector frame (integrated with ``poni`` and ``mask``) or a 1-D
        pattern (two columns, 2th_deg and intensity; :func:`read_pattern`).
    poni : str or Path
        pyFAI PONI file of the geometry (the wavelength comes from it). The profile is
        stored under its checksum.
    calibrant : str or Path
        Phase name in ``pipelines/phases`` or a CIF path (certified cell).
    out : str or Path
        Product directory whose catalog is used (``XRDCT_CATALOG_URL`` or ``url`` win);
        the figure is written to ``<out>/profiles/<key>.png``.
    url : str, optional
        Catalog URL.
    mask : path or array (H, W) bool, optional
        Detector mask for a frame.
    npt : int
        Bins of the integration (frame source).
    two_theta_range : (lo, hi) or None
        Fit (and integrate) only this 2theta range (deg).
    refine_lattice : bool
        Refine the calibrant's cell too (absorbs a small wavelength error).
    background_order : int
        Chebyshev background order.

    Returns
    -------
    ProfileReport

    Raises
    ------
    CalibrantError
        Missing or unreadable source, PONI or calibrant.
    tasks.refine.RefineError
        The fit finds no calibrant reflections.

    Notes
    -----
    Method: :func:`tasks.refine.refine_profile` (Caglioti, Paoletti & Ricci, Nucl.
    Instrum. 3 (1958) 223; pseudo-Voigt, Thompson, Cox & Hastings, J. Appl. Cryst. 20
    (1987) 79).
    """
    from catalog.db import Catalog
    from tasks.ingest import file_checksum
    from flows.process import _load_poni
    from tasks.plots import refinement_png
    from tasks.refine import refine_profile
    from tasks.rietveld import load_phase

    source, poni = Path(source), Path(poni)
    if not source.is_file():
        raise CalibrantError(f"{source}: calibrant file not found")
    if not poni.is_file():
        raise CalibrantError(f"{poni}: PONI file not found")
    name, cif = resolve_calibrant(calibrant)
    try:
        phase = load_phase(name, cif)
    except Exception as err:  # noqa: BLE001 - pymatgen raises many types
        raise CalibrantError(f"{cif}: cannot read the calibrant structure: {err}") from None
    ai = _load_poni(str(poni))
    if not ai.wavelength:
        raise CalibrantError(f"{poni}: the PONI has no Wavelength; expected the calibration's "
                             "X-ray wavelength (m)")
    wl = float(ai.wavelength)
    if source.suffix.lower() in PATTERN_SUFFIXES:
        x, y = read_pattern(source)
    else:
        x, y = integrate_calibrant(source, poni, mask=mask, npt=npt, two_theta_range=two_theta_range)
    res = refine_profile(y, x, "2th_deg", wl, phase, refine_lattice=refine_lattice,
                         two_theta_range=two_theta_range, background_order=background_order)
    cat = Catalog(Catalog.resolve_url(url, out))
    try:
        row = cat.add_instrument_profile(
            poni_checksum=file_checksum(poni), poni_path=str(poni.resolve()), calibrant=name,
            calibrant_checksum=file_checksum(cif), source_path=str(source.resolve()),
            source_checksum=file_checksum(source), profile=res.as_profile(), esd=res.esd,
            rwp=res.rwp, lattice=res.lattice)
    finally:
        cat.dispose()
    png_dir = Path(out) / "profiles"
    png_dir.mkdir(parents=True, exist_ok=True)
    ok = np.isfinite(y)
    if two_theta_range is not None:
        ok &= (x >= two_theta_range[0]) & (x <= two_theta_range[1])
    title = (f"{name} calibrant, {source.name}: U={res.U:.3g} V={res.V:.3g} W={res.W:.3g} deg^2, "
             f"eta={res.eta:.3f}, zero={res.zero_shift_deg:.4f} deg, Rwp={res.rwp:.4f}"
             + (f", a={res.lattice:.5f} A" if res.lattice is not None else ""))
    png = refinement_png(png_dir / f"{row.key}.png", x[ok], y[ok][None], res.model[ok][None],
                         np.zeros((1, 0, int(ok.sum()))), [], titles=[title])
    return ProfileReport(row=row, result=res, radial=x, pattern=y, png=png)


def fwhm_deg(profile: dict, two_theta_deg) -> np.ndarray:
    """Instrumental FWHM (deg 2theta) of a Caglioti profile at ``two_theta_deg``:
    sqrt(U tan^2 th + V tan th + W) (NaN where the quadratic is negative)."""
    t = np.tan(np.radians(np.asarray(two_theta_deg, dtype=np.float64)) / 2)
    f2 = profile["U"] * t * t + profile["V"] * t + profile["W"]
    return np.sqrt(np.where(f2 > 0, f2, np.nan))


def cmd_profile(args) -> int:
    """``xrdct profile``: refine, store, print a table."""
    from rich.console import Console
    from rich.table import Table

    rng = tuple(args.tth_range) if args.tth_range else None
    rep = calibrate_profile(args.source, args.poni, args.calibrant, out=args.out, url=args.url,
                            mask=args.mask, npt=args.npt, two_theta_range=rng,
                            refine_lattice=not args.fixed_cell)
    row = rep.row
    t = Table(title=f"instrument profile {row.key} (stored for PONI {row.poni_path})")
    t.add_column("parameter")
    t.add_column("value", justify="right")
    t.add_column("esd", justify="right")
    for k in ("U", "V", "W", "eta", "zero_shift_deg"):
        e = row.esd.get(k)
        t.add_row(k, f"{row.profile[k]:.6g}", "" if e is None else f"{e:.2g}")
    if row.lattice is not None:
        e = row.esd.get("a")
        t.add_row(f"{row.calibrant} a (A)", f"{row.lattice:.6f}", "" if e is None else f"{e:.2g}")
    t.add_row("Rwp", f"{row.rwp:.4f}", "")
    lo, hi = float(rep.radial[0]), float(rep.radial[-1])
    for tt in np.linspace(max(lo, 0.5), hi, 3):
        t.add_row(f"FWHM at {tt:.2f} deg", f"{float(fwhm_deg(row.profile, tt)):.5f} deg", "")
    t.add_row("figure", str(rep.png), "")
    Console().print(t)
    return 0


def add_cli(sub, where) -> None:
    """Register ``xrdct profile`` on the ``xrdct`` sub-parsers."""
    p = sub.add_parser("profile", help="refine the instrument profile (Caglioti U, V, W, eta, "
                       "zero) from a calibrant and store it with the calibration")
    p.add_argument("source", help="calibrant frame (TIFF/CBF/EDF) or 1-D pattern (.xy: 2th_deg, I)")
    p.add_argument("--poni", required=True, help="pyFAI PONI of the geometry; the profile is "
                   "stored under its checksum")
    p.add_argument("--calibrant", default="CeO2", help="phase name in pipelines/phases or a CIF")
    p.add_argument("--mask", default=None, help="detector mask (frame source)")
    p.add_argument("--npt", type=whole(16), default=2000, help="integration bins (frame source)")
    p.add_argument("--tth-range", type=real(0.0, 180.0, lo_open=True, hi_open=True), nargs=2, metavar=("LO", "HI"), default=None,
                   help="fit only this 2theta range (deg)")
    p.add_argument("--fixed-cell", action="store_true", help="keep the calibrant's certified cell")
    where(p)
    p.set_defaults(fn=cmd_profile)
