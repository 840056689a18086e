"""Rietveld-style phase mapping: reference patterns from CIFs and batched scale fits.

The science is in plain array functions; nothing here imports Prefect.

Model
-----
A voxel (or a pattern) holding mass ``m_p`` of phase ``p`` is modelled as

    y(r) = sum_p S_p ref_p(r) + sum_k c_k T_k(t(r)),       S_p = m_p / (ZMV)_p

where ``ref_p`` is the phase's powder pattern *per unit cell* (:func:`reference_patterns`),
``T_k`` are Chebyshev polynomials on the radial range (free coefficients) and ``(ZMV)_p``
is the cell mass (amu) times the cell volume (A^3). With this convention the weight
fractions of Hill & Howard, J. Appl. Cryst. 20 (1987) 467-474,
``W_p = S_p (ZMV)_p / sum_i S_i (ZMV)_i``, are the true mass fractions
(:func:`weight_fractions`). The simulator (``tasks.simulate``) builds its patterns the
same way, so fits of simulated data are self-consistent.

Intensities
-----------
Per-cell integrated intensities come from pymatgen's ``XRDCalculator`` (``scaled=False``):
``I_hkl = |F_hkl|^2 * (1 + cos^2 2th) / (sin^2 th cos th)`` summed over all (h k l) of a
powder ring (so multiplicity is included), atomic form factors from pymatgen's tables,
no anomalous dispersion, no displacement parameters unless the structure carries them.
The angular factor is pymatgen's Lorentz-polarisation factor for an unpolarised lab
beam; its Lorentz part 1 / (sin^2 th cos th) = 2 / (sin th sin 2th) is also the one for
the azimuthal mean of a Debye-Scherrer ring on a 2D detector (ring intensity spread over
a circumference proportional to sin 2th). For synchrotron data integrated with a polarisation correction the polarisation
term ``(1 + cos^2 2th) / 2`` would be 1 instead; at the high energies of XRD-CT
(2th < 15 deg) it varies by less than 3.5 % across the pattern, and we keep pymatgen's
intensities unchanged so that references and simulated data agree exactly (documented
choice; a refined fit of real data absorbs it in the scale factor and background).
``scaled=False`` only skips pymatgen's normalisation to a maximum of 100; pymatgen still
drops reflections weaker than 1e-5 of the strongest one in the requested range, and
merges reflections closer than 1e-5 deg.

Profiles
--------
Each reflection is a pseudo-Voigt ``eta L + (1 - eta) G`` of unit area in 2theta (deg),
with a common Caglioti width ``FWHM^2 = U tan^2 th + V tan th + W`` (deg^2; G. Caglioti,
A. Paoletti, F. P. Ricci, Nucl. Instrum. 3 (1958) 223) for both components, centred at
``2th_hkl + zero_shift_deg``. The value stored in a radial bin is a *bin average*: the
exact integral of the profile between the bin's edges (analytic pseudo-Voigt CDF,
evaluated at the edges mapped to 2theta) divided by the bin's width, so peaks narrower
than a bin keep their area. By default the width is taken in 2theta (deg): the pattern is
intensity per degree 2theta whatever the radial unit, which is what pyFAI's
``integrate1d`` returns in any unit (mean corrected pixel intensity per bin; checked
against ``calcfrom1d`` + ``integrate1d`` in the tests). With ``density="radial"`` the
width is taken in the radial unit (intensity per radial unit; area over the radial axis
= pymatgen intensity).

Fitting
-------
:func:`fit_scales` solves all voxels in one batched computation: the design matrix is
shared, normal equations are formed with one matrix product, and non-negativity of the
phase scales is enforced exactly with a batched Lawson-Hanson active-set method
(C. L. Lawson, R. J. Hanson, Solving Least Squares Problems, 1974, ch. 23) in which each
voxel's passive set is a boolean mask and voxels sharing a mask are solved together.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tasks._xp import get_xp, to_numpy

__all__ = [
    "PhaseError",
    "ProfileError",
    "Phase",
    "FitResult",
    "load_phase",
    "reflections",
    "radial_to_two_theta",
    "two_theta_to_radial",
    "reference_patterns",
    "chebyshev_background",
    "fit_scales",
    "weight_fractions",
    "ESD_SCALING",
]

RADIAL_UNITS = ("q_nm^-1", "q_A^-1", "2th_deg")

#: What every ``*_esd`` product variable states about itself (attr ``esd_scaling``), for
#: :func:`fit_scales` and :func:`tasks.refine.refine` alike.
ESD_SCALING = ("esd scaled by sqrt(reduced chi^2): esd = sqrt(diag((J^T W J)^-1) * chi2), chi2 = "
               "sum w r^2 / (n_used - n_free) (the chi2 variable); holds when the weights are "
               "off from 1/sigma^2 of the true noise by one common factor (unit weights, or "
               "sigma 5x too small), not when their shape across bins is wrong")


class PhaseError(ValueError):
    """A phase that cannot be used (missing, malformed or unusable CIF); names the file."""


class ProfileError(ValueError):
    """Impossible profile or radial axis for :func:`reference_patterns`."""


# --------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------


@dataclass
class Phase:
    """A crystalline phase read from a CIF.

    Attributes
    ----------
    name : str
        Phase name (as in the pipeline spec).
    cif_path : Path
        The CIF it was read from.
    structure : pymatgen.core.Structure
        The conventional cell as given by the CIF (``primitive=False``).
    zmv : float
        Z*M*V: mass of the cell's contents (amu) times the cell volume (A^3), the
        quantity of Hill & Howard (1987). Independent of the cell choice for
        :func:`weight_fractions` because per-cell intensities scale the same way.
    formula : str
        Reduced formula.
    cell_mass_amu, volume_A3 : float
        Cell contents' mass (amu) and cell volume (A^3).
    a, b, c : float
        Lattice parameters (A).
    alpha, beta, gamma : float
        Cell angles (deg).
    """

    name: str
    cif_path: Path
    structure: Any
    zmv: float
    formula: str
    cell_mass_amu: float
    volume_A3: float
    a: float
    b: float
    c: float
    alpha: float
    beta: float
    gamma: float
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def lattice_parameters(self) -> tuple[float, float, float, float, float, float]:
        """(a, b, c, alpha, beta, gamma) in A and deg."""
        return (self.a, self.b, self.c, self.alpha, self.beta, self.gamma)

    @property
    def density_g_cm3(self) -> float:
        """Crystallographic density (g/cm^3)."""
        return self.cell_mass_amu * 1.66053906660 / self.volume_A3


#: parsed CIF structures by (resolved path, mtime ns, size): a run checks its phases before
#: work starts and reads them again in the mapping stage; pymatgen parses a CIF in 30-130 ms
_PARSED: dict[tuple[str, int, int], list] = {}


def load_phase(name: str, cif_path: str | Path) -> Phase:
    """Read a phase from a CIF file with pymatgen.

    Parameters
    ----------
    name : str
        Name given to the phase.
    cif_path : str or Path
        CIF file. The first data block holding a structure is used (conventional cell).

    Returns
    -------
    Phase

    Raises
    ------
    PhaseError
        The file does not exist or is not a file; pymatgen cannot parse it; it holds no
        structure; or it holds species without X-ray form factors (e.g. dummy species).
        The message names the file and the phase.

    Notes
    -----
    A file is parsed once per process while its path, modification time and size stay
    the same (the parsed structure is shared; every call returns a new ``Phase``).
    """
    from pymatgen.analysis.diffraction.xrd import ATOMIC_SCATTERING_PARAMS
    from pymatgen.io.cif import CifParser

    path = Path(cif_path)
    if not path.is_file():
        what = "is a directory, not a CIF file" if path.is_dir() else "not found"
        raise PhaseError(f"{path}: CIF file for phase {name!r} {what}")
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    structures = _PARSED.get(key)
    if structures is None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                structures = CifParser(path).parse_structures(primitive=False, on_error="raise")
            except Exception as err:  # pymatgen raises ValueError, KeyError, IndexError, ...
                notes = "; ".join(str(w.message) for w in caught)[:300]
                raise PhaseError(
                    f"{path}: malformed CIF for phase {name!r}: pymatgen could not parse a "
                    f"structure ({type(err).__name__}: {err})" + (f" [{notes}]" if notes else "")
                ) from None
        _PARSED[key] = structures
    if not structures:
        raise PhaseError(f"{path}: CIF for phase {name!r} holds no crystal structure "
                         "(no cell and atom sites found)")
    structure = structures[0]
    if len(structure) == 0:
        raise PhaseError(f"{path}: CIF for phase {name!r} has a cell but no atom sites")
    bad = sorted({sp.symbol for site in structure for sp in site.species
                  if getattr(sp, "symbol", None) not in ATOMIC_SCATTERING_PARAMS})
    if bad:
        raise PhaseError(f"{path}: CIF for phase {name!r} holds species {bad} without X-ray "
                         "form factors (expected chemical elements in _atom_site_type_symbol)")
    lat = structure.lattice
    mass = float(structure.composition.weight)
    vol = float(lat.volume)
    a, b, c = (float(v) for v in lat.abc)
    al, be, ga = (float(v) for v in lat.angles)
    return Phase(name=name, cif_path=path, structure=structure, zmv=mass * vol,
                 formula=structure.composition.reduced_formula, cell_mass_amu=mass,
                 volume_A3=vol, a=a, b=b, c=c, alpha=al, beta=be, gamma=ga)


def _check_wavelength(wavelength_m: float) -> float:
    lam = float(wavelength_m)
    if not (math.isfinite(lam) and 1e-12 < lam < 1e-8):
        raise ProfileError(f"wavelength_m must be in metres (1e-12 .. 1e-8), got {wavelength_m!r}")
    return lam


def reflections(phase: Phase, wavelength_m: float, two_theta_max_deg: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """Powder reflections of one phase up to ``two_theta_max_deg``.

    Parameters
    ----------
    phase : Phase
    wavelength_m : float
        X-ray wavelength (m).
    two_theta_max_deg : float
        Upper limit of 2theta (deg), 0 < value <= 180.

    Returns
    -------
    two_theta_deg : ndarray (m,) float64
        Reflection positions, increasing.
    intensity : ndarray (m,) float64
        Integrated intensity per unit cell: pymatgen ``XRDCalculator.get_pattern(
        structure, scaled=False)`` (|F|^2 times multiplicity times pymatgen's
        Lorentz-polarisation factor; see the module notes). Empty arrays when no
        reflection lies in range.
    """
    from pymatgen.analysis.diffraction.xrd import XRDCalculator

    lam = _check_wavelength(wavelength_m)
    tmax = float(two_theta_max_deg)
    if not (0 < tmax <= 180):
        raise ProfileError(f"two_theta_max_deg must be in (0, 180], got {two_theta_max_deg!r}")
    key = (round(lam * 1e10, 12), round(tmax, 9))
    hit = phase._cache.get(key)
    if hit is not None:
        return hit[0].copy(), hit[1].copy()
    # Shortest reciprocal vector: if even that is outside the sphere, pymatgen's
    # max() over an empty peak list would fail.
    gmin = float(np.min(phase.structure.lattice.reciprocal_lattice_crystallographic.abc))
    g_lim = 2 * math.sin(math.radians(tmax / 2)) / (lam * 1e10)
    if g_lim < gmin * (1 - 1e-9) and not _any_recip_point(phase, g_lim):
        out = (np.zeros(0), np.zeros(0))
    else:
        pat = XRDCalculator(wavelength=lam * 1e10).get_pattern(
            phase.structure, scaled=False, two_theta_range=(0, tmax))
        out = (np.asarray(pat.x, dtype=np.float64), np.asarray(pat.y, dtype=np.float64))
    phase._cache[key] = out
    return out[0].copy(), out[1].copy()


def _any_recip_point(phase: Phase, g_lim: float) -> bool:
    pts = phase.structure.lattice.reciprocal_lattice_crystallographic.get_points_in_sphere(
        [[0, 0, 0]], [0, 0, 0], g_lim)
    return any(p[1] > 1e-12 for p in pts)


# --------------------------------------------------------------------------------------
# Radial axes
# --------------------------------------------------------------------------------------


def radial_to_two_theta(radial, unit: str, wavelength_m: float) -> np.ndarray:
    """Convert radial positions to 2theta (deg).

    ``q = 4 pi sin(th) / lambda`` with lambda in nm for ``q_nm^-1`` and in A for
    ``q_A^-1``; ``2th_deg`` is returned unchanged.

    Raises
    ------
    ProfileError
        Unknown unit, or q beyond the limiting sphere ``4 pi / lambda``.
    """
    r = np.asarray(radial, dtype=np.float64)
    if unit == "2th_deg":
        return r.copy()
    lam_u = _wavelength_in_unit(unit, wavelength_m)
    s = r * lam_u / (4 * math.pi)
    if np.any(np.abs(s) > 1):
        raise ProfileError(f"radial values up to {np.max(np.abs(r)):g} {unit} exceed the limiting "
                           f"sphere 4 pi / lambda = {4 * math.pi / lam_u:g} {unit}")
    return np.degrees(2 * np.arcsin(s))


def _wavelength_in_unit(unit: str, wavelength_m: float) -> float:
    """The wavelength in the length unit of a q axis (nm for ``q_nm^-1``, A for ``q_A^-1``)."""
    lam = _check_wavelength(wavelength_m)
    if unit == "q_nm^-1":
        return lam * 1e9
    if unit == "q_A^-1":
        return lam * 1e10
    raise ProfileError(f"radial unit must be one of {RADIAL_UNITS}, got {unit!r}")


def two_theta_to_radial(two_theta_deg, unit: str, wavelength_m: float) -> np.ndarray:
    """Inverse of :func:`radial_to_two_theta`."""
    t = np.asarray(two_theta_deg, dtype=np.float64)
    if unit == "2th_deg":
        return t.copy()
    lam_u = _wavelength_in_unit(unit, wavelength_m)
    return 4 * math.pi * np.sin(np.radians(t) / 2) / lam_u


def _bin_edges(radial: np.ndarray) -> np.ndarray:
    mid = 0.5 * (radial[1:] + radial[:-1])
    first = radial[0] - (mid[0] - radial[0])
    last = radial[-1] + (radial[-1] - mid[-1])
    return np.concatenate([[first], mid, [last]])


def _profile_fields(profile) -> tuple[float, float, float, float, float]:
    def get(name, default):
        if isinstance(profile, dict):
            return float(profile.get(name, default))
        return float(getattr(profile, name, default))

    if profile is None:
        return 0.0, 0.0, 0.0025, 0.5, 0.0
    return get("U", 0.0), get("V", 0.0), get("W", 0.0025), get("eta", 0.5), get("zero_shift_deg", 0.0)


def _erf(xp, x):
    if xp is np:
        from scipy.special import erf
    else:  # pragma: no cover - GPU path
        from cupyx.scipy.special import erf
    return erf(x)


def reference_patterns(phases: Sequence[Phase], radial, unit: str, wavelength_m: float,
                       profile=None, *, density: str = "2th_deg",
                       chunk_elements: int = 4_000_000) -> np.ndarray:
    """Per-unit-cell powder patterns of the phases on a radial grid.

    Parameters
    ----------
    phases : sequence of Phase
    radial : array_like (n,)
        Bin centres, strictly increasing, in ``unit``. Bin edges are the midpoints
        between centres (the outer edges half a bin beyond the outer centres).
    unit : {"q_nm^-1", "q_A^-1", "2th_deg"}
    wavelength_m : float
        X-ray wavelength (m).
    profile : pipelines.spec.ProfileSpec or dict or None
        Caglioti ``U, V, W`` (deg^2 of 2theta), pseudo-Voigt ``eta`` (0 Gaussian ..
        1 Lorentzian) and ``zero_shift_deg`` (added to every calculated 2theta).
        ``None`` means ProfileSpec's defaults (W = 0.0025, eta = 0.5).
    density : {"2th_deg", "radial"}
        What a bin value is. ``"2th_deg"`` (default): intensity per degree of 2theta,
        averaged over the bin, whatever ``unit`` is. This is what pyFAI's
        ``integrate1d`` produces (the mean corrected pixel intensity of a bin is a point
        function of the scattering angle, the same in every unit), so it is the
        reference for integrated data and for the simulator: the area of a reflection
        over 2theta (deg) is its pymatgen intensity. ``"radial"``: intensity per unit of
        ``unit`` (multiplied by the Jacobian d(2th)/d(radial)), so the area over the
        radial axis is the pymatgen intensity. The two differ only for q units, by
        d(2th)/dq (= 1 / (6.28 cos th) deg nm at 0.1746 A).
    chunk_elements : int
        Bound on reflections x edges evaluated at once (memory).

    Returns
    -------
    ndarray (n_phase, n) float64
        Bin-averaged intensity per unit cell (see ``density``). All reflections up to 20
        FWHM (at least 1 deg) beyond the upper edge are included, with their full
        Lorentzian tails.

    Raises
    ------
    ProfileError
        Non-increasing or non-finite ``radial``; unknown unit; radial beyond the
        limiting sphere; ``eta`` outside [0, 1]; FWHM^2 <= 0 at a reflection; unknown
        ``density``.
    """
    if density not in ("2th_deg", "radial"):
        raise ProfileError(f"density must be '2th_deg' or 'radial', got {density!r}")
    r = np.asarray(radial, dtype=np.float64)
    if r.ndim != 1 or r.size < 2:
        raise ProfileError(f"radial must be a 1-D array of >= 2 bin centres, got shape {r.shape}")
    if not np.all(np.isfinite(r)) or not np.all(np.diff(r) > 0):
        raise ProfileError("radial must be finite and strictly increasing")
    if unit not in RADIAL_UNITS:
        raise ProfileError(f"radial unit must be one of {RADIAL_UNITS}, got {unit!r}")
    lam = _check_wavelength(wavelength_m)
    U, V, W, eta, zero = _profile_fields(profile)
    if not 0 <= eta <= 1:
        raise ProfileError(f"profile.eta must be in [0, 1], got {eta}")

    edges_r = _bin_edges(r)
    if unit != "2th_deg":
        edges_r = np.maximum(edges_r, 0.0)
    edges_t = radial_to_two_theta(edges_r, unit, lam)          # (n+1,) deg
    # bin width the profile integral is divided by: in 2theta (deg) or in the radial unit
    width = np.diff(edges_t) if density == "2th_deg" else np.diff(edges_r)

    def fwhm2(tth):
        th = np.radians(np.asarray(tth) / 2)
        tn = np.tan(th)
        return U * tn * tn + V * tn + W

    tmax_edge = float(edges_t[-1])
    h_end = math.sqrt(max(fwhm2(min(tmax_edge, 179.0)), W, 1e-12))
    t_lim = min(179.999, tmax_edge + max(20 * h_end, 1.0) + abs(zero))

    out = np.zeros((len(phases), r.size), dtype=np.float64)
    g_scale = 2 * math.sqrt(math.log(2))        # (x / FWHM) * this = x / (sigma sqrt 2)
    for ip, ph in enumerate(phases):
        tth, inten = reflections(ph, lam, t_lim)
        if tth.size == 0:
            continue
        h2 = fwhm2(tth)
        if np.any(h2 <= 0) or not np.all(np.isfinite(h2)):
            k = int(np.argmax(~(h2 > 0)))
            raise ProfileError(
                f"profile U={U}, V={V}, W={W} gives FWHM^2 = {h2[k]:g} deg^2 <= 0 at "
                f"2theta = {tth[k]:.4f} deg (phase {ph.name!r}); choose U, V, W so that "
                "U tan^2(th) + V tan(th) + W > 0")
        h = np.sqrt(h2)
        pos = tth + zero
        step = max(1, chunk_elements // edges_t.size)
        acc = np.zeros(r.size, dtype=np.float64)
        for s in range(0, tth.size, step):
            d = (edges_t[None, :] - pos[s:s + step, None]) / h[s:s + step, None]   # (k, n+1)
            cdf = (1 - eta) * 0.5 * _erf(np, d * g_scale) + eta * np.arctan(2 * d) / math.pi
            acc += inten[s:s + step] @ np.diff(cdf, axis=1)
        out[ip] = acc / width
    return out


# --------------------------------------------------------------------------------------
# Batched non-negative least squares
# --------------------------------------------------------------------------------------


@dataclass
class FitResult:
    """Result of :func:`fit_scales`; leading dims ``(...)`` are those of the patterns.

    Attributes
    ----------
    scale : (..., n_phase) float64
        Phase scale factors S_p >= 0 (NaN for masked voxels).
    scale_esd : (..., n_phase) float64
        Standard deviations from the covariance of the linear model at the solution,
        ``sqrt(diag((D^T W D)^-1) * chi2)`` (bounds ignored): scaled by the square root of
        the reduced chi^2, so they hold when the weights are off from the true noise by a
        common factor (measured: noise 5x the stated sigma, chi2 = 25, spread of the
        scales / esd = 0.92-1.01). They assume the weights' shape across bins is right:
        with unit weights on counted patterns (noise ~ sqrt(counts), strongest at the
        peaks) they are 2-3x too small (measured, 4 phases, 2,000 counts at the top).
    background : (..., n) float64 or None
        Fitted Chebyshev background.
    model : (..., n) float64 or None
        Full model (phases + background).
    rwp : (...) float64
        ``sqrt(sum w (y - model)^2 / sum w y^2)``.
    chi2 : (...) float64
        ``sum w (y - model)^2 / (n_used - n_free)``: reduced chi^2 when sigma is given,
        the residual variance when it is not (unit weights).
    background_coef : (..., order + 1) float64
        Chebyshev coefficients.
    converged : (...) bool
        Active-set iteration finished (always True in practice).
    n_iter : int
        Batched active-set iterations used.
    """

    scale: Any
    scale_esd: Any
    background: Any
    model: Any
    rwp: Any
    chi2: Any
    background_coef: Any
    converged: Any
    n_iter: int = 0


def chebyshev_background(n: int, order: int, radial=None, xp=np) -> Any:
    """Chebyshev polynomials T_0..T_order on the radial range, shape (order + 1, n).

    The radial range (or the bin index when ``radial`` is None) is mapped linearly onto
    [-1, 1].
    """
    if radial is None:
        t = xp.linspace(-1.0, 1.0, n) if n > 1 else xp.zeros(1)
    else:
        rr = xp.asarray(radial, dtype=xp.float64)
        span = rr[-1] - rr[0]
        t = 2 * (rr - rr[0]) / span - 1 if float(span) != 0 else xp.zeros(n)
    T = xp.empty((order + 1, n), dtype=xp.float64)
    T[0] = 1.0
    if order >= 1:
        T[1] = t
    for k in range(2, order + 1):
        T[k] = 2 * t * T[k - 1] - T[k - 2]
    return T


def _solve_groups(xp, G, b, passive, shared: bool):
    """Solve G[S,S] z_S = b_S per voxel with S = passive[v]; z = 0 off S.

    G: (p, p) shared or (V, p, p); b: (V, p); passive: (V, p) bool. Voxels with the same
    mask are solved in one call (one factorisation when G is shared).
    """
    V, p = b.shape
    z = xp.zeros_like(b)
    if V == 0:
        return z
    weights = xp.asarray(1 << np.arange(p, dtype=np.int64)) if p < 63 else None
    if weights is None:  # pragma: no cover - more than 62 parameters
        raise ValueError("fit_scales supports at most 62 parameters (phases + background)")
    codes = (passive.astype(xp.int64) * weights[None, :]).sum(axis=1)
    uniq, inv = xp.unique(codes, return_inverse=True)
    inv = inv.reshape(-1)
    for u in range(int(uniq.shape[0])):
        sel = xp.nonzero(inv == u)[0]
        S = xp.nonzero(passive[int(sel[0])])[0]
        if S.shape[0] == 0:
            continue
        bs = b[sel][:, S]                                        # (g, s)
        if shared:
            Gs = G[S][:, S]
            try:
                zs = _chol_solve(xp, Gs, bs.T).T
            except np.linalg.LinAlgError:
                zs = (xp.linalg.pinv(Gs, rcond=1e-13) @ bs.T).T
        else:
            Gs = G[sel][:, S][:, :, S]                           # (g, s, s)
            try:
                zs = xp.linalg.solve(Gs, bs[..., None])[..., 0]
            except np.linalg.LinAlgError:
                zs = (xp.linalg.pinv(Gs, rcond=1e-13) @ bs[..., None])[..., 0]
        z[sel[:, None], S[None, :]] = zs
    return z


def _chol_solve(xp, A, B):
    if xp is np:
        from scipy.linalg import cho_factor, cho_solve
        c = cho_factor(A, lower=True, check_finite=False)
        return cho_solve(c, B, check_finite=False)
    return xp.linalg.solve(A, B)  # pragma: no cover - GPU path


def _batched_nnls(xp, G, b, n_con: int, tol, shared: bool, max_iter: int):
    """Exact Lawson-Hanson on the normal equations, batched over voxels.

    Minimises 0.5 x^T G x - b^T x with x[:n_con] >= 0, x[n_con:] free, for every voxel.
    ``G`` has unit diagonal (normalised columns) where the column is live.
    Returns x (V, p), converged (V,), iterations.
    """
    V, p = b.shape
    con = xp.zeros(p, dtype=bool)
    con[:n_con] = True
    free = ~con
    # 1. unconstrained solution for all voxels; feasible ones are optimal (KKT).
    passive = xp.ones((V, p), dtype=bool)
    x = _solve_groups(xp, G, b, passive, shared)
    todo = xp.any(x[:, :n_con] < 0, axis=1) if n_con else xp.zeros(V, dtype=bool)
    converged = ~todo
    idx = xp.nonzero(todo)[0]
    n_iter = 0
    if idx.shape[0] == 0:
        return x, converged, n_iter
    # 2. Lawson-Hanson from the free-only passive set for the infeasible voxels.
    bb = b[idx]
    GG = G if shared else G[idx]
    tt = tol[idx]
    Vi = idx.shape[0]
    P = xp.zeros((Vi, p), dtype=bool)
    P[:, free] = True
    xx = _solve_groups(xp, GG, bb, P, shared)
    need_outer = xp.ones(Vi, dtype=bool)
    live = xp.ones(Vi, dtype=bool)
    forbid = xp.zeros((Vi, p), dtype=bool)
    last = xp.full(Vi, -1, dtype=xp.int64)
    for n_iter in range(1, max_iter + 1):
        # outer step: add the constrained variable with the largest positive gradient
        o = xp.nonzero(live & need_outer)[0]
        if o.shape[0]:
            if shared:
                w = bb[o] - xx[o] @ GG
            else:
                w = bb[o] - xp.einsum("vij,vj->vi", GG[o], xx[o])
            cand = con[None, :] & ~P[o] & ~forbid[o] & (w > tt[o, None])
            has = xp.any(cand, axis=1)
            live[o[~has]] = False
            oh = o[has]
            if oh.shape[0]:
                j = xp.argmax(xp.where(cand[has], w[has], -xp.inf), axis=1)
                P[oh, j] = True
                last[oh] = j
        a = xp.nonzero(live)[0]
        if a.shape[0] == 0:
            break
        z = _solve_groups(xp, GG if shared else GG[a], bb[a], P[a], shared)
        bad = P[a] & con[None, :] & (z <= 0)
        feas = ~xp.any(bad, axis=1)
        af = a[feas]
        xx[af] = z[feas]
        need_outer[af] = True
        forbid[af] = False
        ai = a[~feas]
        if ai.shape[0]:
            zi = z[~feas]
            xi = xx[ai]
            badi = bad[~feas]
            denom = xi - zi
            ratio = xp.where(badi, xi / xp.where(badi, denom, 1.0), xp.inf)
            k = xp.argmin(ratio, axis=1)
            alpha = xp.clip(ratio[xp.arange(ai.shape[0]), k], 0.0, 1.0)
            xn = xi + alpha[:, None] * (zi - xi)
            xn[xp.arange(ai.shape[0]), k] = 0.0
            drop = con[None, :] & P[ai] & (xn <= 0)
            drop[xp.arange(ai.shape[0]), k] = True
            xn = xp.where(drop, 0.0, xn)
            # Anti-cycling: the variable just added could not enter (alpha == 0): forbid
            # it until the next successful step.
            stuck = (alpha <= 0) & (k == last[ai])
            forbid[ai[stuck], k[stuck]] = True
            xx[ai] = xn
            P[ai] = P[ai] & ~drop
            need_outer[ai] = stuck  # a stuck voxel goes back to the outer step
            # the inner loop continues for the others: re-solve on the reduced set
    x[idx] = xx
    converged[idx] = ~live
    return x, converged, n_iter


def fit_scales(patterns, refs, background_order: int = 4, sigma=None, mask=None, *,
               radial=None, return_model: bool = True, max_iter: int | None = None,
               chunk_voxels: int = 2048) -> FitResult:
    """Fit phase scale factors (>= 0) and a Chebyshev background to many patterns at once.

    Solves, for every voxel v independently,
    ``min_x || W_v^1/2 (y_v - D x) ||^2`` subject to ``x_p >= 0`` for the phase columns,
    with ``D = [refs^T | T_0 .. T_order]`` (n, n_phase + order + 1) shared by all voxels.

    Parameters
    ----------
    patterns : array_like (..., n)
        Patterns (any real dtype; arithmetic in float64).
    refs : array_like (n_phase, n)
        Reference patterns (:func:`reference_patterns`); n_phase may be 0
        (background-only fit).
    background_order : int
        Highest Chebyshev order (>= 0); -1 for no background.
    sigma : None or array_like (n,) or (..., n)
        Standard errors. ``None``: unit weights (w = 1) for the fit, Rwp and chi2. This is
        the default because reconstructed (FBP) voxel patterns are not Poisson counts.
        For counted patterns fit twice: unit weights, then
        ``sigma = sqrt(max(model, 1))`` from the first fit; weights from the observed
        counts, ``sqrt(max(y, 1))``, bias the scales low where counts are low (a few
        percent at < 10 counts per bin; K. J. Mighell, ApJ 518 (1999) 380). ``inf`` marks a bin as
        unused (w = 0); zero, negative or NaN sigma is an error. A shared (n,) sigma
        keeps one factorisation for all voxels; per-voxel sigma uses batched solves.
    mask : None or array_like (...) bool
        True = voxel excluded: its outputs are NaN and its patterns may be non-finite.
    radial : None or array_like (n,)
        Radial axis for the Chebyshev polynomials (default: the bin index), mapped onto
        [-1, 1].
    return_model : bool
        If False, ``model`` and ``background`` are None (saves 2 x patterns of memory).
    max_iter : int or None
        Cap on batched active-set iterations (default ``3 * (n_phase + order + 1) + 10``).
    chunk_voxels : int
        Voxels per block for the memory-bound passes over the patterns.

    Returns
    -------
    FitResult
        ``model`` and ``background`` have the patterns' floating dtype (float32 in,
        float32 out); all other arrays are float64.

    Raises
    ------
    ValueError
        Shape mismatches; non-finite values in unmasked patterns or in refs; bad sigma.

    Notes
    -----
    Columns are normalised to unit weighted norm before solving. The unconstrained
    solution of all voxels comes from one Cholesky factorisation of ``D^T W D`` (shared
    weights); voxels whose solution has a negative phase scale go through a batched
    Lawson-Hanson active-set iteration in which each voxel's passive set is a boolean
    mask and voxels sharing a mask are solved in one call. The result equals a per-voxel
    bounded least squares (``scipy.optimize.lsq_linear(method="bvls")``) to rounding.
    Phase columns that are identically zero (no reflection in range) get scale 0 and
    esd NaN.
    """
    xp = get_xp(patterns)
    Y = xp.asarray(patterns)
    if not (xp.issubdtype(Y.dtype, xp.floating) or xp.issubdtype(Y.dtype, xp.integer)):
        raise ValueError(f"patterns must be a real numeric array, got dtype {Y.dtype}")
    out_dtype = Y.dtype if xp.issubdtype(Y.dtype, xp.floating) else xp.float64
    R = xp.asarray(refs, dtype=xp.float64)
    if R.ndim != 2:
        raise ValueError(f"refs must be (n_phase, n), got shape {tuple(R.shape)}")
    n_phase, n = R.shape
    if Y.ndim < 1 or Y.shape[-1] != n:
        raise ValueError(f"patterns must be (..., {n}) to match refs (n_phase={n_phase}, n={n}), "
                         f"got shape {tuple(Y.shape)}")
    if not bool(xp.all(xp.isfinite(R))):
        raise ValueError("refs contain non-finite values")
    order = int(background_order)
    if order < -1:
        raise ValueError(f"background_order must be >= -1, got {background_order}")
    if radial is not None and tuple(xp.asarray(radial).shape) != (n,):
        raise ValueError(f"radial must have shape ({n},), got {tuple(xp.asarray(radial).shape)}")
    lead = tuple(Y.shape[:-1])
    Yf = Y.reshape(-1, n)
    Vtot = Yf.shape[0]

    if mask is None:
        kidx = None
        Vk = Vtot
    else:
        m = xp.asarray(mask, dtype=bool)
        if tuple(m.shape) != lead:
            raise ValueError(f"mask must have the patterns' leading shape {lead}, got {tuple(m.shape)}")
        kidx = xp.nonzero(~m.reshape(-1))[0]
        Vk = int(kidx.shape[0])

    def rows(c0, c1):
        """float64 copy of kept voxels c0..c1 (positions among kept voxels)."""
        src = Yf[c0:c1] if kidx is None else Yf[kidx[c0:c1]]
        return src.astype(xp.float64)

    # weights: shared (n,) or per voxel (Vtot, n) view
    shared = True
    s_full = None
    if sigma is None:
        w = xp.ones(n, dtype=xp.float64)
    else:
        s = xp.asarray(sigma, dtype=xp.float64)
        if s.ndim == 1 and s.shape[0] == n:
            if bool(xp.any(xp.isnan(s))) or bool(xp.any(s <= 0)):
                raise ValueError("sigma must be > 0 (use inf to drop a bin), got zero/negative/NaN values")
            w = 1.0 / (s * s)
        else:
            try:
                s_full = xp.broadcast_to(s, Y.shape).reshape(-1, n)
            except ValueError:
                raise ValueError(f"sigma must be (n,) = ({n},) or broadcast to the patterns' shape "
                                 f"{tuple(Y.shape)}, got {tuple(s.shape)}") from None
            shared = False

    def wrows(c0, c1):
        src = s_full[c0:c1] if kidx is None else s_full[kidx[c0:c1]]
        if bool(xp.any(xp.isnan(src))) or bool(xp.any(src <= 0)):
            raise ValueError("sigma must be > 0 (use inf to drop a bin), got zero/negative/NaN values")
        return 1.0 / (src * src)

    T = chebyshev_background(n, order, radial, xp) if order >= 0 else xp.zeros((0, n))
    D = xp.concatenate([R, T], axis=0).T                         # (n, p)
    p = D.shape[1]
    if p == 0:
        raise ValueError("nothing to fit: no phases and background_order = -1")
    step = max(1, int(chunk_voxels))

    # Pass 1: normal equations (one product per block of voxels)
    B = xp.empty((Vk, p), dtype=xp.float64)
    wy2 = xp.empty(Vk, dtype=xp.float64)
    if shared:
        Dw = D * w[:, None]
        G = D.T @ Dw                                             # (p, p)
    else:
        iu, ju = np.triu_indices(p)
        Q = D[:, iu] * D[:, ju]                                  # (n, p(p+1)/2)
        G = xp.empty((Vk, p, p), dtype=xp.float64)
    n_used = xp.empty(Vk, dtype=xp.float64)
    for c0 in range(0, Vk, step):
        c1 = min(Vk, c0 + step)
        Yc = rows(c0, c1)
        if not bool(xp.all(xp.isfinite(Yc))):
            nbad = int(xp.sum(~xp.all(xp.isfinite(Yc), axis=1)))
            raise ValueError(f"patterns: {nbad} unmasked voxel(s) in voxels {c0}..{c1 - 1} of the "
                             "unmasked set contain NaN/inf; mask them")
        if shared:
            B[c0:c1] = Yc @ Dw
            wy2[c0:c1] = (Yc * Yc) @ w
            n_used[c0:c1] = float(xp.sum(w > 0))
        else:
            wc = wrows(c0, c1)
            Gt = wc @ Q
            G[c0:c1, iu, ju] = Gt
            G[c0:c1, ju, iu] = Gt
            B[c0:c1] = (Yc * wc) @ D
            wy2[c0:c1] = xp.sum(Yc * Yc * wc, axis=1)
            n_used[c0:c1] = xp.sum(wc > 0, axis=1)
        del Yc

    # Normalise columns; zero (dead) phase columns stay at 0
    diag = xp.diag(G).copy() if shared else xp.diagonal(G, axis1=1, axis2=2).copy()
    dead = diag <= 0
    if bool(xp.any(dead[..., n_phase:])):
        raise ValueError("a background column has zero weighted norm (are all bins unused?)")
    sc = xp.sqrt(xp.where(dead, 1.0, diag))
    if shared:
        Gn = G / (sc[:, None] * sc[None, :])
        Bn = B / sc[None, :]
        if bool(xp.any(dead)):
            dj = xp.nonzero(dead)[0]
            Gn[dj, :] = 0.0
            Gn[:, dj] = 0.0
            Gn[dj, dj] = 1.0
            Bn[:, dj] = 0.0
    else:
        Gn = G / (sc[:, :, None] * sc[:, None, :])
        Bn = B / sc
        if bool(xp.any(dead)):
            dd = dead[:, :, None] | dead[:, None, :]
            Gn = xp.where(dd, 0.0, Gn)
            Gn = xp.where(dead[:, :, None] & xp.eye(p, dtype=bool)[None], 1.0, Gn)
            Bn = xp.where(dead, 0.0, Bn)
    tol = 1e-11 * xp.sqrt(xp.maximum(wy2, 1e-300))
    if max_iter is None:
        max_iter = 3 * p + 10
    x_n, conv, n_iter = _batched_nnls(xp, Gn, Bn, n_phase, tol, shared, max_iter)
    x = x_n / (sc[None, :] if shared else sc)
    x = xp.where(dead[None, :] if shared else dead, 0.0, x)
    x[:, :n_phase] = xp.maximum(x[:, :n_phase], 0.0)

    # Pass 2: residuals (and the model) block by block
    def full(tail, dtype=xp.float64):
        return xp.full((Vtot,) + tail, xp.nan, dtype=dtype)

    model = background = None
    if return_model:
        model = full((n,), out_dtype)
        background = full((n,), out_dtype)
    wr2 = xp.empty(Vk, dtype=xp.float64)
    for c0 in range(0, Vk, step):
        c1 = min(Vk, c0 + step)
        Yc = rows(c0, c1)
        bg = x[c0:c1, n_phase:] @ T
        mc = bg + x[c0:c1, :n_phase] @ R if n_phase else bg
        r = Yc - mc
        wr2[c0:c1] = (r * r) @ w if shared else xp.sum(r * r * wrows(c0, c1), axis=1)
        if return_model:
            dst = slice(c0, c1) if kidx is None else kidx[c0:c1]
            model[dst] = mc
            background[dst] = bg
        del Yc, r, mc, bg
    rwp_k = xp.sqrt(wr2 / xp.where(wy2 > 0, wy2, xp.nan))
    n_free = p - xp.sum(x[:, :n_phase] <= 0, axis=1)           # parameters off their bound
    chi2_k = wr2 / xp.maximum(n_used - n_free, 1)
    # esd: unconstrained covariance (D^T W D)^-1 at the solution, times chi2
    Ginv = _safe_inv(xp, Gn)
    if shared:
        var = (xp.diag(Ginv) / (sc * sc))[None, :] * chi2_k[:, None]
        deadm = dead[None, :n_phase]
    else:
        var = xp.diagonal(Ginv, axis1=1, axis2=2) / (sc * sc) * chi2_k[:, None]
        deadm = dead[:, :n_phase]
    esd_k = xp.where(deadm, xp.nan, xp.sqrt(xp.maximum(var[:, :n_phase], 0.0)))

    def scatter(vals, tail):
        if kidx is None:
            return vals.reshape(lead + tail)
        if vals.dtype == bool:
            out = xp.zeros((Vtot,) + tail, dtype=bool)
        else:
            out = full(tail, vals.dtype)
        out[kidx] = vals
        return out.reshape(lead + tail)

    return FitResult(
        scale=scatter(x[:, :n_phase], (n_phase,)),
        scale_esd=scatter(esd_k, (n_phase,)),
        background=None if background is None else background.reshape(lead + (n,)),
        model=None if model is None else model.reshape(lead + (n,)),
        rwp=scatter(rwp_k, ()),
        chi2=scatter(chi2_k, ()),
        background_coef=scatter(xp.ascontiguousarray(x[:, n_phase:]), (order + 1,)),
        converged=scatter(conv, ()),
        n_iter=int(n_iter),
    )


def _safe_inv(xp, A):
    try:
        return xp.linalg.inv(A)
    except np.linalg.LinAlgError:
        return xp.linalg.pinv(A, rcond=1e-13)


def weight_fractions(scale, phases) -> Any:
    """Weight fractions from scale factors (Hill & Howard, J. Appl. Cryst. 20 (1987) 467).

    ``W_p = S_p (ZMV)_p / sum_i S_i (ZMV)_i``.

    Parameters
    ----------
    scale : array_like (..., n_phase)
        Scale factors from :func:`fit_scales` (per-unit-cell references).
    phases : sequence of Phase, or array_like (n_phase,) of ZMV values (amu A^3)

    Returns
    -------
    ndarray (..., n_phase) float64
        Mass fractions; NaN where the denominator is 0 or not finite (empty or masked
        voxels).

    Raises
    ------
    ValueError
        ``scale``'s last axis does not match the number of phases.
    """
    xp = get_xp(scale)
    S = xp.asarray(scale, dtype=xp.float64)
    if all(isinstance(ph, Phase) for ph in phases):
        zmv = xp.asarray([ph.zmv for ph in phases], dtype=xp.float64)
    else:
        zmv = xp.asarray(np.asarray(to_numpy(phases), dtype=np.float64))
    if S.shape[-1:] != zmv.shape:
        raise ValueError(f"scale has {S.shape[-1] if S.ndim else 0} phases on its last axis, "
                         f"but {zmv.shape[0]} phases (ZMV values) were given")
    num = S * zmv
    den = xp.sum(num, axis=-1, keepdims=True)
    ok = xp.isfinite(den) & (den != 0)
    return xp.where(ok, num / xp.where(ok, den, 1.0), xp.nan)
