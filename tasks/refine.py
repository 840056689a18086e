"""Batched whole-pattern (Rietveld-style) refinement of every voxel at once.

The science is in plain array functions (numpy or cupy, one code path); nothing here
imports Prefect.

Model
-----
For a voxel with parameters ``x`` the pattern in radial bin ``j`` is

    y_j = sum_p S_p sum_{r in p} I_r P_j(mu_r, H_r) + sum_k c_k T_k(t_j)

(H. M. Rietveld, J. Appl. Cryst. 2 (1969) 65) with

* ``I_r`` the per-unit-cell integrated intensity of reflection ``r`` from pymatgen's
  ``XRDCalculator`` at the phase's CIF cell (the same numbers as
  :func:`tasks.rietveld.reflections`; the Lorentz-polarisation factor is kept at the
  reference angle while the cell is refined, a relative error below 1e-3 for the lattice
  changes the bounds allow);
* ``mu_r = 2 asin(lambda / (2 d_r)) + zero`` (deg), ``1/d_r^2`` from the refined cell
  respecting the crystal system (cubic ``a``; tetragonal and hexagonal/trigonal in the
  hexagonal setting ``a, c``; orthorhombic ``a, b, c``; lower symmetry: cell fixed);
* ``H_r`` the FWHM (deg 2theta): instrument Caglioti width
  ``sqrt(U tan^2 th + V tan th + W)`` (G. Caglioti, A. Paoletti, F. P. Ricci, Nucl.
  Instrum. 3 (1958) 223) plus Scherrer size broadening ``(180/pi) K lambda / (L cos th)``
  (P. Scherrer 1918; ``L`` the volume-weighted crystallite size, ``K`` = 0.9) plus
  microstrain broadening ``(180/pi) 4 e tan th`` (A. R. Stokes, A. J. C. Wilson, Proc.
  Phys. Soc. 56 (1944) 174). The three widths add linearly, as Lorentzian widths do; a
  single pseudo-Voigt ``eta L + (1 - eta) G`` with the instrument's ``eta`` carries the
  sum (a simplification of the Thompson-Cox-Hastings pseudo-Voigt, J. Appl. Cryst. 20
  (1987) 79, which mixes Gaussian and Lorentzian widths separately);
* ``P_j`` the bin average of the unit-area pseudo-Voigt: its analytic CDF at the bin's
  edges (mapped to 2theta) differenced and divided by the bin width, exactly as in
  :func:`tasks.rietveld.reference_patterns`. With ``size`` infinite, ``strain`` 0, the
  CIF cell and ``window_fwhm`` large the model equals ``reference_patterns`` (tested);
* ``T_k`` Chebyshev polynomials on the radial range (:func:`tasks.rietveld.chebyshev_background`).

Windows
-------
Each reflection is a pseudo-Voigt truncated to ``|2th - mu| <= k H`` (``k`` =
``window_fwhm``) and renormalised to unit area, so truncation moves no intensity between
phases (scale factors keep the meaning of :func:`tasks.rietveld.reference_patterns`;
the tails beyond ``k H``, an area fraction of about ``eta / (pi k)``, are folded into the
core). It is evaluated only on the bins of its window: for every voxel and reflection the
first bin is found by ``searchsorted`` on the bin edges, the profile's CDF is evaluated
on ``nw + 1`` edges from there (``u`` clamped to ``[-k, k]``, so bins beyond the support
contribute exactly 0 and the model is continuous in every parameter whichever bins a
window covers), and the values are scattered back onto the pattern with one
``bincount`` per phase and Jacobian column. The window length (bins) is set per block of
reflections of similar width (reflections sorted by angle, ``_BLOCKS`` blocks per phase),
so narrow low-angle reflections are not padded to the widest window. Cost per voxel:
reflections x ``2 k H / bin width`` instead of reflections x bins.

Fit
---
Levenberg-Marquardt (D. W. Marquardt, J. Soc. Ind. Appl. Math. 11 (1963) 431) with
analytic Jacobians, vectorised over voxels: every voxel has its own damping, the normal
equations ``J^T W J`` of a block of voxels are solved with one batched solve. Box bounds
are enforced by projection: a parameter sitting on a bound with the gradient, or the
step, pointing outwards is held for that iteration (projected Newton, Bertsekas 1982);
a step is clipped to the box per parameter or shortened to the first bound it meets,
whichever the quadratic model expects to gain more. Damping follows H. B. Nielsen
(IMM-REP-1999-05): after an accepted step ``lam * max(1/3, 1 - (2 rho - 1)^3)`` with
``rho`` the actual over the predicted chi^2 gain, after a rejected one ``lam * nu`` with
``nu`` doubling; a rejected step is first retried at the minimiser of the parabola
through chi^2 and its slope at the start and chi^2 at the rejected point (safeguarded to
0.1 .. 0.5 of the step). A voxel stops when its Gauss-Newton decrement ``g^T A^-1 g`` (the
chi^2 a full step could still gain) or an accepted step's gain falls below
``max(ftol chi^2, dchi2 chi^2_red)``, when a rejected step expected less than 5 times
that (chi^2 is rough at about that level where window edges cross bin edges), or when
steps fall below ``xtol`` or the statistical resolution.

Engines: ``engine="numba"`` (the default for numpy input) computes the model, the
Jacobian and ``J^T W J``, ``J^T W r``, chi^2 of each voxel in one fused CPU kernel
(:mod:`tasks._refine_nb`; each reflection over its window's bins only, the profile CDF
from a cubic Hermite table, accurate to 4e-14); ``engine="numpy"`` runs the array code
of :func:`evaluate` with batched matrix products (numpy, or cupy on the GPU);
``"numba-exact"`` is the kernel with ``erf``/``atan``/``exp`` instead of the table. The
LM iteration is the same code for all. Start values: the phase scale factors and background of the exact
batched NNLS :func:`tasks.rietveld.fit_scales` on the reference patterns; a phase with
zero start scale keeps its lattice, size and strain fixed (they are undetermined).
Standard deviations come from the covariance at the solution,
``esd = sqrt(diag((J^T W J)^-1) chi2_red)`` over the parameters that are free and not on
a bound: scaled by the square root of the reduced chi^2, so that it holds when the weights
are off from the true noise by a common factor (measured: noise 5x the stated sigma,
chi2_red = 25, 93-100 % of 200 voxels' parameters within 2 esd, as with matched weights). Weight fractions: Hill & Howard, J. Appl. Cryst. 20 (1987) 467, with the refined
cell volume in ZMV.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from tasks._xp import get_xp, to_numpy
from tasks.rietveld import (
    Phase,
    _bin_edges,
    _check_wavelength,
    _erf,
    _profile_fields,
    chebyshev_background,
    fit_scales,
    radial_to_two_theta,
    RADIAL_UNITS,
    ESD_SCALING,
)

__all__ = [
    "RefineError",
    "PhaseTable",
    "RefineModel",
    "RefineResult",
    "ProfileResult",
    "phase_table",
    "build_model",
    "evaluate",
    "start_parameters",
    "refine",
    "refine_profile",
    "refine_seeded",
    "weak_voxels",
    "model_from_mapping",
    "refine_variables",
    "to_host",
]

DEG = 180.0 / math.pi
_LAM_DOWN = 3.0
_BLOCKS = 8            # reflection blocks per phase, each with its own window length
_TABLE_H = 2.0 ** -10  # step (in u = (2th - mu) / H) of the numba engine's profile table
G_SCALE = 2.0 * math.sqrt(math.log(2.0))          # (x / FWHM) * this = x / (sigma sqrt 2)


class RefineError(ValueError):
    """Impossible input to the refinement; the message names the field and what was expected."""


# --------------------------------------------------------------------------------------
# Phases: reflections with Miller indices and the crystal system's cell parameters
# --------------------------------------------------------------------------------------


@dataclass
class PhaseTable:
    """Reflections of one phase with what the refinement needs to move them.

    Attributes
    ----------
    name : str
    system : str
        pymatgen crystal system (``cubic``, ``hexagonal``, ``trigonal``, ...).
    lattice_names : tuple of str
        Refined cell parameters, a subset of ``("a", "b", "c")`` (empty: cell fixed).
    lattice0 : ndarray (n_lat,) float64
        CIF values (A).
    hkl : ndarray (m, 3) int
        One (h k l) per reflection (hexagonal setting for hexagonal/trigonal cells).
    coef : ndarray (m, n_lat) float64
        ``1/d^2 = coef @ (1 / lattice^2)`` (A^-2).
    inv_d2_0 : ndarray (m,) float64
        ``1/d^2`` at the CIF cell (A^-2).
    intensity : ndarray (m,) float64
        Per-cell integrated intensity (as :func:`tasks.rietveld.reflections`).
    zmv : float
        Z*M*V of the CIF cell (amu A^3).
    volume0 : float
        CIF cell volume (A^3).
    """

    name: str
    system: str
    lattice_names: tuple
    lattice0: np.ndarray
    hkl: np.ndarray
    coef: np.ndarray
    inv_d2_0: np.ndarray
    intensity: np.ndarray
    zmv: float
    volume0: float

    def volume(self, lat):
        """Cell volume (A^3) for refined cell parameters ``lat`` (..., n_lat)."""
        xp = get_xp(lat)
        lat = xp.asarray(lat, dtype=xp.float64)
        v0 = self.volume0
        if self.system == "cubic":
            return lat[..., 0] ** 3
        if self.system == "tetragonal":
            return lat[..., 0] ** 2 * lat[..., 1]
        if self.system in ("hexagonal", "trigonal") and self.lattice_names == ("a", "c"):
            return math.sqrt(3.0) / 2.0 * lat[..., 0] ** 2 * lat[..., 1]
        if self.system == "orthorhombic":
            return lat[..., 0] * lat[..., 1] * lat[..., 2]
        return xp.full(lat.shape[:-1], v0)


def phase_table(phase: Phase, wavelength_m: float, two_theta_max_deg: float) -> PhaseTable:
    """Reflections of ``phase`` up to ``two_theta_max_deg`` with Miller indices.

    Parameters
    ----------
    phase : tasks.rietveld.Phase
    wavelength_m : float
        Wavelength (m).
    two_theta_max_deg : float
        Upper 2theta limit (deg).

    Returns
    -------
    PhaseTable

    Raises
    ------
    RefineError
        The Miller indices pymatgen reports do not reproduce its d-spacings with the
        crystal system's metric (a cell setting this module does not handle).
    """
    from pymatgen.analysis.diffraction.xrd import XRDCalculator
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    lam = _check_wavelength(wavelength_m)
    key = ("refine_table", round(lam * 1e10, 12), round(float(two_theta_max_deg), 9))
    hit = phase._cache.get(key)
    if hit is not None:
        return hit
    system = SpacegroupAnalyzer(phase.structure, symprec=1e-3).get_crystal_system()
    pat = XRDCalculator(wavelength=lam * 1e10).get_pattern(
        phase.structure, scaled=False, two_theta_range=(0, float(two_theta_max_deg)))
    hkl = []
    for fam in pat.hkls:
        h = tuple(fam[0]["hkl"])
        if len(h) == 4:                      # Miller-Bravais (h k i l) -> (h k l)
            h = (h[0], h[1], h[3])
        hkl.append(h)
    hkl = np.asarray(hkl, dtype=np.int64).reshape(-1, 3)
    d = np.asarray(pat.d_hkls, dtype=np.float64)
    h, k, l = (hkl[:, i].astype(np.float64) for i in range(3))
    hexcell = abs(phase.gamma - 120.0) < 1e-3 and abs(phase.alpha - 90) < 1e-3 and abs(phase.beta - 90) < 1e-3
    if system == "cubic":
        names, coef = ("a",), np.stack([h * h + k * k + l * l], axis=1)
        lat0 = [phase.a]
    elif system == "tetragonal":
        names, coef = ("a", "c"), np.stack([h * h + k * k, l * l], axis=1)
        lat0 = [phase.a, phase.c]
    elif system in ("hexagonal", "trigonal") and hexcell:
        names, coef = ("a", "c"), np.stack([4.0 / 3.0 * (h * h + h * k + k * k), l * l], axis=1)
        lat0 = [phase.a, phase.c]
    elif system == "orthorhombic":
        names, coef = ("a", "b", "c"), np.stack([h * h, k * k, l * l], axis=1)
        lat0 = [phase.a, phase.b, phase.c]
    else:                                   # monoclinic, triclinic, rhombohedral setting
        names, coef, lat0 = (), np.zeros((d.size, 0)), []
    lat0 = np.asarray(lat0, dtype=np.float64)
    inv_d2 = 1.0 / (d * d)
    if names:
        calc = coef @ (1.0 / lat0 ** 2)
        bad = np.abs(calc - inv_d2) > 1e-7 * inv_d2
        if np.any(bad):
            i = int(np.argmax(bad))
            raise RefineError(
                f"phase {phase.name!r}: reflection {tuple(hkl[i])} has d = {d[i]:.6f} A but the "
                f"{system} metric of the CIF cell gives {1 / math.sqrt(calc[i]):.6f} A; expected a "
                "conventional cell (hexagonal setting for trigonal phases)")
    out = PhaseTable(name=phase.name, system=system, lattice_names=names, lattice0=lat0, hkl=hkl,
                     coef=np.asarray(coef, dtype=np.float64), inv_d2_0=inv_d2,
                     intensity=np.asarray(pat.y, dtype=np.float64), zmv=float(phase.zmv),
                     volume0=float(phase.volume_A3))
    phase._cache[key] = out
    return out


# --------------------------------------------------------------------------------------
# The model: parameter layout, bounds, windows
# --------------------------------------------------------------------------------------


@dataclass
class RefineModel:
    """Everything fixed during a refinement (built by :func:`build_model`).

    Parameter vector of a voxel (``names``): per phase ``<phase>.scale``, its cell
    parameters ``<phase>.a`` (``.b``, ``.c``) in A, ``<phase>.size_inv`` (1 / crystallite
    size, nm^-1), ``<phase>.strain`` (microstrain, 1); then ``zero`` (deg) and the
    Chebyshev coefficients ``bg0 .. bgK``.
    """

    tables: list
    names: list
    lower: np.ndarray
    upper: np.ndarray
    refined: np.ndarray            # (P,) bool: parameters that the fit may move
    x_ref: np.ndarray              # (P,) reference values (CIF cell, no broadening, zero 0)
    phase_slices: list             # per phase: dict of parameter indices
    i_zero: int
    i_bg: slice
    n: int
    radial: np.ndarray
    unit: str
    wavelength_m: float
    U: float
    V: float
    W: float
    eta: float
    zero0: float
    scherrer_k: float
    edges_t: np.ndarray            # (n+1,) deg
    width: np.ndarray              # (n,) bin width the profile integral is divided by
    T: np.ndarray                  # (K+1, n) Chebyshev
    # reflections, all phases concatenated
    r_phase: np.ndarray            # (R,) phase index
    r_bounds: list                 # per phase (r0, r1)
    window_fwhm: float
    _dev: dict = field(default_factory=dict, repr=False)

    @property
    def n_param(self) -> int:
        return len(self.names)

    @property
    def n_phase(self) -> int:
        return len(self.tables)

    def arrays(self, xp):
        """Device copies of the model's arrays (cached per array module)."""
        key = xp.__name__
        if key in self._dev:
            return self._dev[key]
        n = self.n
        # padded beyond the last bin (edges repeat the last edge, weights are 0), so a
        # window running off the end needs no clamping
        d = dict(
            edges=xp.asarray(self.edges_t),                    # (n+1,) deg
            edges_pad=xp.asarray(np.concatenate([self.edges_t, np.full(n + 2, self.edges_t[-1])])),
            inv_w_pad=xp.asarray(np.concatenate([1.0 / self.width, np.zeros(n + 2)])),
            T=xp.asarray(self.T),
            tables=[dict(coef=xp.asarray(t.coef), inv_d2=xp.asarray(t.inv_d2_0),
                         I=xp.asarray(t.intensity)) for t in self.tables],
            lower=xp.asarray(self.lower), upper=xp.asarray(self.upper),
            refined=xp.asarray(self.refined),
        )
        self._dev[key] = d
        return d

    def numba_arrays(self, table: bool = True):
        """Host arrays packed for the numba kernels of :mod:`tasks._refine_nb` (cached).

        ``table``: the profile's CDF as a cubic Hermite table (step ``_TABLE_H`` in u;
        measured max error 4e-14 in F, 1.4e-10 in its derivative, of a CDF rising by 1)
        instead of ``erf``/``atan``/``exp`` per bin edge.
        """
        key = "numba" if table else "numba-exact"
        if key in self._dev:
            return self._dev[key]
        R = int(self.r_phase.size)
        coef = np.zeros((R, 3))
        inv_d2 = np.zeros(R)
        inten = np.zeros(R)
        ph_r = np.zeros((self.n_phase, 2), dtype=np.int64)
        ph_idx = np.zeros((self.n_phase, 3), dtype=np.int64)
        ph_lat = np.full((self.n_phase, 3), -1, dtype=np.int64)
        for ip, (t, sl, (r0, r1)) in enumerate(zip(self.tables, self.phase_slices, self.r_bounds)):
            coef[r0:r1, :t.coef.shape[1]] = t.coef
            inv_d2[r0:r1] = t.inv_d2_0
            inten[r0:r1] = t.intensity
            ph_r[ip] = (r0, r1)
            ph_idx[ip] = (sl["scale"], sl["size_inv"], sl["strain"])
            ph_lat[ip, :len(sl["lattice"])] = sl["lattice"]
        k = self.window_fwhm
        eta = self.eta
        norm = (1.0 - eta) * math.erf(G_SCALE * k) + eta * 2.0 / math.pi * math.atan(2.0 * k)
        c1, c2 = (1.0 - eta) * 0.5 / norm, eta / math.pi / norm
        Fk = c1 * math.erf(G_SCALE * k) + c2 * math.atan(2.0 * k)
        if table:
            from scipy.special import erf

            h = _TABLE_H
            u = -k + h * np.arange(int(math.ceil(2.0 * k / h)) + 2)
            f = (c1 * (2.0 * G_SCALE / math.sqrt(math.pi)) * np.exp(-(G_SCALE * u) ** 2)
                 + c2 * 2.0 / (1.0 + 4.0 * u * u))
            tab = np.ascontiguousarray(np.stack([c1 * erf(G_SCALE * u) + c2 * np.arctan(2.0 * u), h * f], 1))
        else:
            h, tab = 1.0, np.zeros((0, 2))
        cst = np.array([self.wavelength_m * 1e10, self.U, self.V, self.W, k, c1, c2,
                        DEG * self.scherrer_k * self.wavelength_m * 1e9, G_SCALE, 1.0 / h, Fk])
        d = dict(edges=np.ascontiguousarray(self.edges_t, dtype=np.float64),
                 inv_w=np.ascontiguousarray(1.0 / self.width, dtype=np.float64),
                 T=np.ascontiguousarray(self.T, dtype=np.float64), r_coef=coef, r_inv_d2=inv_d2,
                 r_I=inten, ph_r=ph_r, ph_idx=ph_idx, ph_lat=ph_lat, i_zero=int(self.i_zero),
                 zero_jac=bool(self.refined[self.i_zero]), bg0=int(self.i_bg.start), cst=cst,
                 tab=tab)
        self._dev[key] = d
        return d


def build_model(phases: Sequence[Phase], radial, unit: str, wavelength_m: float, profile=None, *,
                background_order: int = 4, refine_lattice: bool = True, refine_size: bool = True,
                refine_strain: bool = True, refine_zero: bool = False,
                lattice_bound: float = 0.01, size_min_nm: float = 20.0, strain_max: float = 2e-3,
                zero_bound_deg: float = 0.05, window_fwhm: float = 6.0,
                scherrer_k: float = 0.9, density: str = "2th_deg") -> RefineModel:
    """Prepare a refinement: parameter layout, bounds, reflection windows.

    Parameters
    ----------
    phases : sequence of tasks.rietveld.Phase
        At least one.
    radial : array_like (n,)
        Bin centres, strictly increasing, in ``unit``.
    unit : {"q_nm^-1", "q_A^-1", "2th_deg"}
    wavelength_m : float
        Wavelength (m), e.g. from the data's ``radial`` attrs.
    profile : ProfileSpec, dict or None
        Instrument profile ``U, V, W`` (deg^2), ``eta``, ``zero_shift_deg`` (as
        :func:`tasks.rietveld.reference_patterns`; e.g. from :func:`refine_profile`).
    background_order : int
        Highest Chebyshev order (>= 0).
    refine_lattice, refine_size, refine_strain, refine_zero : bool
        Which non-linear parameters are free (scales and background always are).
    lattice_bound : float
        Cell parameters stay within ``(1 +- lattice_bound)`` of the CIF values.
    size_min_nm : float
        Smallest crystallite size allowed (nm); sets the upper bound of ``size_inv``.
    strain_max : float
        Largest microstrain allowed.
    zero_bound_deg : float
        ``|zero - profile.zero_shift_deg| <= zero_bound_deg`` when refined.
    window_fwhm : float
        Half-width ``k`` of each reflection's support in units of its FWHM (the
        truncated profile is renormalised to unit area; see the module notes).
    scherrer_k : float
        Scherrer constant K.
    density : {"2th_deg", "radial"}
        Bin value convention, as in :func:`tasks.rietveld.reference_patterns`.

    Returns
    -------
    RefineModel

    Raises
    ------
    RefineError
        No phases; bad radial axis, unit, wavelength, profile, bounds or window.
    """
    if len(phases) == 0:
        raise RefineError("phases: expected at least one phase, got none")
    r = np.asarray(radial, dtype=np.float64)
    if r.ndim != 1 or r.size < 2 or not np.all(np.isfinite(r)) or not np.all(np.diff(r) > 0):
        raise RefineError(f"radial: expected a finite, strictly increasing 1-D axis of >= 2 bins, "
                          f"got shape {r.shape}")
    if unit not in RADIAL_UNITS:
        raise RefineError(f"unit: expected one of {RADIAL_UNITS}, got {unit!r}")
    if density not in ("2th_deg", "radial"):
        raise RefineError(f"density: expected '2th_deg' or 'radial', got {density!r}")
    try:
        lam = _check_wavelength(wavelength_m)
    except ValueError as err:
        raise RefineError(f"wavelength_m: {err}") from None
    U, V, W, eta, zero0 = _profile_fields(profile)
    if not 0 <= eta <= 1:
        raise RefineError(f"profile.eta: expected 0 <= eta <= 1, got {eta}")
    order = int(background_order)
    if order < 0:
        raise RefineError(f"background_order: expected >= 0, got {background_order}")
    for nm, v, lo in (("lattice_bound", lattice_bound, 0), ("size_min_nm", size_min_nm, 0),
                      ("strain_max", strain_max, 0), ("window_fwhm", window_fwhm, 0),
                      ("zero_bound_deg", zero_bound_deg, -1e-300), ("scherrer_k", scherrer_k, 0)):
        if not (math.isfinite(v) and v > lo):
            raise RefineError(f"{nm}: expected a finite value > {max(lo, 0)}, got {v!r}")
    if lattice_bound >= 0.5:
        raise RefineError(f"lattice_bound: expected a relative bound < 0.5, got {lattice_bound}")

    n = r.size
    edges_r = _bin_edges(r)
    if unit != "2th_deg":
        edges_r = np.maximum(edges_r, 0.0)
    edges_t = radial_to_two_theta(edges_r, unit, lam)
    width = np.diff(edges_t) if density == "2th_deg" else np.diff(edges_r)
    lam_A = lam * 1e10
    lam_nm = lam * 1e9

    def inst_fwhm(tth):
        th = np.radians(tth / 2)
        tn = np.tan(th)
        h2 = U * tn * tn + V * tn + W
        return h2

    # largest possible width at the upper 2theta edge decides how far beyond it to look
    t_hi = float(edges_t[-1])
    th_hi = math.radians(min(t_hi, 170) / 2)
    h2_hi = inst_fwhm(np.asarray(min(t_hi, 170.0)))
    if not h2_hi > 0:
        raise RefineError(f"profile: U={U}, V={V}, W={W} give FWHM^2 <= 0 at the top of the range")
    hmax_hi = (math.sqrt(h2_hi) + DEG * scherrer_k * lam_nm / size_min_nm / math.cos(th_hi)
               + DEG * 4 * strain_max * math.tan(th_hi))
    t_lim = min(179.0, t_hi * (1 + 2.5 * lattice_bound) + window_fwhm * hmax_hi + abs(zero0)
                + zero_bound_deg)

    tables = [phase_table(ph, lam, t_lim) for ph in phases]
    names, lower, upper, refined, x_ref, slices = [], [], [], [], [], []
    for t in tables:
        sl = {"scale": len(names)}
        names.append(f"{t.name}.scale"); lower.append(0.0); upper.append(np.inf)
        refined.append(True); x_ref.append(1.0)
        sl["lattice"] = []
        for ln, v0 in zip(t.lattice_names, t.lattice0):
            sl["lattice"].append(len(names))
            names.append(f"{t.name}.{ln}"); lower.append(v0 * (1 - lattice_bound))
            upper.append(v0 * (1 + lattice_bound)); refined.append(bool(refine_lattice)); x_ref.append(v0)
        sl["size_inv"] = len(names)
        names.append(f"{t.name}.size_inv"); lower.append(0.0); upper.append(1.0 / size_min_nm)
        refined.append(bool(refine_size)); x_ref.append(0.0)
        sl["strain"] = len(names)
        names.append(f"{t.name}.strain"); lower.append(0.0); upper.append(strain_max)
        refined.append(bool(refine_strain)); x_ref.append(0.0)
        slices.append(sl)
    i_zero = len(names)
    names.append("zero"); lower.append(zero0 - (zero_bound_deg if refine_zero else 0.0))
    upper.append(zero0 + (zero_bound_deg if refine_zero else 0.0)); refined.append(bool(refine_zero))
    x_ref.append(zero0)
    i_bg = slice(len(names), len(names) + order + 1)
    for k in range(order + 1):
        names.append(f"bg{k}"); lower.append(-np.inf); upper.append(np.inf); refined.append(True)
        x_ref.append(0.0)

    # keep the reflections whose support can reach the range: reference position +-
    # (largest shift at the bounds + window_fwhm * largest FWHM at the bounds)
    r_phase, r_bounds = [], []
    r0 = 0
    for ip, t in enumerate(tables):
        s0 = np.clip(lam_A * np.sqrt(t.inv_d2_0) / 2, 0, 1)
        tth0 = DEG * 2 * np.arcsin(s0)
        # lattice at its bounds: d scales by (1 +- b), sin(th) by 1 / (1 -+ b)
        s_lo = np.clip(s0 / (1 + lattice_bound), 0, 1)
        s_hi = np.clip(s0 / (1 - lattice_bound), 0, 1)
        tlo = DEG * 2 * np.arcsin(s_lo) + zero0 - zero_bound_deg * bool(refine_zero)
        thi = DEG * 2 * np.arcsin(s_hi) + zero0 + zero_bound_deg * bool(refine_zero)
        if not refine_lattice:
            tlo = tth0 + zero0 - zero_bound_deg * bool(refine_zero)
            thi = tth0 + zero0 + zero_bound_deg * bool(refine_zero)
        th = np.radians(np.minimum(thi, 170.0) / 2)
        h2 = inst_fwhm(np.minimum(thi, 170.0))
        if np.any(h2 <= 0):
            raise RefineError(f"profile: U={U}, V={V}, W={W} give FWHM^2 <= 0 at a reflection of "
                              f"phase {t.name!r}")
        hmax = (np.sqrt(h2) + DEG * scherrer_k * lam_nm / size_min_nm / np.cos(th) * bool(refine_size)
                + DEG * 4 * strain_max * np.tan(th) * bool(refine_strain))
        lo = tlo - window_fwhm * hmax
        hi = thi + window_fwhm * hmax
        b_lo = np.searchsorted(edges_t, lo, side="right") - 1
        b_hi = np.searchsorted(edges_t, hi, side="left")
        keep = (b_hi >= 0) & (b_lo <= n - 1)
        t = replace(t, **{k: getattr(t, k)[keep] for k in ("hkl", "coef", "inv_d2_0", "intensity")})
        tables[ip] = t
        nk = int(keep.sum())
        r_phase.append(np.full(nk, ip))
        r_bounds.append((r0, r0 + nk))
        r0 += nk
    T = chebyshev_background(n, order, r)
    return RefineModel(tables=tables, names=names, lower=np.asarray(lower), upper=np.asarray(upper),
                       refined=np.asarray(refined), x_ref=np.asarray(x_ref), phase_slices=slices,
                       i_zero=i_zero, i_bg=i_bg, n=n, radial=r, unit=unit, wavelength_m=lam,
                       U=U, V=V, W=W, eta=eta, zero0=zero0, scherrer_k=float(scherrer_k),
                       edges_t=edges_t, width=width, T=T, r_phase=np.concatenate(r_phase),
                       r_bounds=r_bounds, window_fwhm=float(window_fwhm))


# --------------------------------------------------------------------------------------
# Forward model and analytic Jacobian
# --------------------------------------------------------------------------------------


ENGINES = ("auto", "numba", "numba-exact", "numpy")


def _numba_kernels():
    """The compiled kernels of :mod:`tasks._refine_nb`, or None when numba does not import."""
    try:
        from tasks import _refine_nb
    except ImportError:            # pragma: no cover - numba is a core dependency
        return None
    return _refine_nb


def _engine(engine, xp) -> str:
    """Resolve ``engine`` (one of ``ENGINES`` or None) for arrays of module ``xp``."""
    e = "auto" if engine is None else engine
    if e not in ENGINES:
        raise RefineError(f"engine: expected one of {ENGINES}, got {engine!r}")
    if e == "auto":
        return "numba" if (xp is np and _numba_kernels() is not None) else "numpy"
    if e in ("numba", "numba-exact"):
        if xp is not np:
            raise RefineError("engine: 'numba' is the CPU fast path; expected numpy arrays, got "
                              f"{xp.__name__} (use engine='auto' or 'numpy' on the GPU)")
        if _numba_kernels() is None:
            raise RefineError("engine: 'numba' requested but numba does not import")
    return e


def evaluate(model: RefineModel, x, *, jacobian: bool = False, per_phase: bool = False,
             engine: str | None = None):
    """Model patterns (and the Jacobian) of a block of voxels.

    Parameters
    ----------
    model : RefineModel
    x : array (V, P) float64
        Parameters (numpy or cupy; the result lives on the same device).
    jacobian : bool
        Also return ``J`` (V, P, n) float64 (parameter-major), the analytic derivatives of the model with
        respect to every parameter (columns of parameters that are not refined are 0,
        except scales and background, which are always filled).
    per_phase : bool
        Return the per-phase contributions (V, n_phase, n) instead of the model (no
        background), for plots and start values (always the numpy/cupy code).
    engine : {"auto", "numba", "numba-exact", "numpy"} or None
        ``"numba"``: the fused CPU kernel of :mod:`tasks._refine_nb` (numpy input only;
        profile CDF from a table, see :meth:`RefineModel.numba_arrays`);
        ``"numba-exact"``: the same with ``erf``/``atan``/``exp``; ``"numpy"``: the array
        code below (numpy or cupy); ``"auto"``/None: numba for numpy arrays when numba
        imports, else the array code.

    Returns
    -------
    y : array (V, n) float64
    J : array (V, P, n) float64, only when ``jacobian``

    Raises
    ------
    RefineError
        ``x`` not (V, P); an unknown ``engine``, or ``"numba"`` with cupy input.
    """
    xp = get_xp(x)
    X = xp.asarray(x, dtype=xp.float64)
    if X.ndim != 2 or X.shape[1] != model.n_param:
        raise RefineError(f"x: expected shape (V, {model.n_param}), got {tuple(X.shape)}")
    eng = _engine(engine, xp)
    if eng.startswith("numba") and not per_phase:
        nb, a = _numba_kernels(), model.numba_arrays(table=eng == "numba")
        Xc = np.ascontiguousarray(X)
        y = np.empty((Xc.shape[0], model.n))
        J = np.empty((Xc.shape[0], model.n_param, model.n)) if jacobian else np.empty((1, 1, 1))
        e1, e2, e3 = np.empty((1, 1)), np.empty(1), np.empty((1, 1, 1))
        nb.batch(Xc, e1, e1, a["edges"], a["inv_w"], a["T"], a["r_coef"], a["r_inv_d2"], a["r_I"],
                 a["ph_r"], a["ph_idx"], a["ph_lat"], a["i_zero"], a["zero_jac"], a["bg0"], a["cst"],
                 a["tab"], 1 if jacobian else 0, y, J, e2, e3, e1)
        return (y, J) if jacobian else y
    d = model.arrays(xp)
    Vc = X.shape[0]
    n = model.n
    lam_A = model.wavelength_m * 1e10
    lam_nm = model.wavelength_m * 1e9
    U, Vcag, W, eta = model.U, model.V, model.W, model.eta
    k = model.window_fwhm
    norm = (1.0 - eta) * math.erf(G_SCALE * k) + eta * 2.0 / math.pi * math.atan(2.0 * k)
    c1 = (1.0 - eta) * 0.5 / norm
    c2 = eta / math.pi / norm
    edges, edges_pad, inv_w_pad = d["edges"], d["edges_pad"], d["inv_w_pad"]
    zero = X[:, model.i_zero]
    y = xp.zeros((Vc, n), dtype=xp.float64)
    out_phase = xp.zeros((Vc, model.n_phase, n)) if per_phase else None
    J = xp.zeros((Vc, model.n_param, n), dtype=xp.float64) if jacobian else None
    vofs = (xp.arange(Vc, dtype=xp.int64) * n)[:, None, None]
    for ip, (sl, (r0, r1)) in enumerate(zip(model.phase_slices, model.r_bounds)):
        Rp = r1 - r0
        if Rp == 0 or Vc == 0:
            continue
        td = d["tables"][ip]
        S = X[:, sl["scale"]]
        li = sl["lattice"]
        if li:
            lat = X[:, li]                                       # (V, nl)
            Q = (1.0 / (lat * lat)) @ td["coef"].T               # (V, Rp) 1/d^2
        else:
            Q = xp.broadcast_to(td["inv_d2"][None, :], (Vc, Rp))
        sq = xp.sqrt(Q)
        s = xp.clip(lam_A * sq / 2.0, 0.0, 1.0 - 1e-12)
        th = xp.arcsin(s)                                        # rad
        cos = xp.cos(th)
        tan = s / cos
        h_inst = xp.sqrt(U * tan * tan + Vcag * tan + W)
        beta = X[:, sl["size_inv"]][:, None]
        eps = X[:, sl["strain"]][:, None]
        ks = DEG * model.scherrer_k * lam_nm
        H = h_inst + ks * beta / cos + DEG * 4.0 * eps * tan     # (V, Rp) FWHM, deg
        mu = 2.0 * DEG * th + zero[:, None]
        I = td["I"]
        A = S[:, None] * I[None, :]                              # (V, Rp)
        invH = 1.0 / H
        if jacobian:
            # chain rule: d(2th)/dQ (deg A^2); dQ/dlat_j = coef_j (-2 / lat_j^3);
            # the width moves with th too: dH/d(2th) = dH/dth / (2 DEG)
            dtth_dQ = 2.0 * DEG * (lam_A / (4.0 * sq)) / cos
            sec2 = 1.0 / (cos * cos)
            dH_dtth = ((2 * U * tan + Vcag) * sec2 / (2 * h_inst) + ks * beta * tan / cos
                       + DEG * 4.0 * eps * sec2) / (2.0 * DEG)
            dts = [dtth_dQ * (td["coef"][None, :, j] * (-2.0 / X[:, pj][:, None] ** 3))
                   for j, pj in enumerate(li)]                   # (V, Rp) deg / A
            idx = [sl["scale"]] + list(li) + [sl["size_inv"], sl["strain"]]
            if model.refined[model.i_zero]:
                idx.append(model.i_zero)
        else:
            idx = []
        # Reflections in blocks of similar width (they are sorted by angle and the width
        # grows with it): each block gets its own window length, so narrow low-angle
        # reflections are not padded to the widest window of the phase.
        nblk = max(1, min(_BLOCKS, Rp))
        bounds = np.linspace(0, Rp, nblk + 1).astype(int)
        flats, wts = [], [[] for _ in range(1 + len(idx))]
        for b0, b1 in zip(bounds[:-1], bounds[1:]):
            if b1 <= b0:
                continue
            rs = slice(b0, b1)
            mu_b, H_b, iH_b = mu[:, rs], H[:, rs], invH[:, rs]
            # window: first edge at or below mu - k H; as many edges as the widest needs
            lo = xp.searchsorted(edges, (mu_b - k * H_b).reshape(-1), side="right").reshape(Vc, -1) - 1
            hi = xp.searchsorted(edges, (mu_b + k * H_b).reshape(-1), side="left").reshape(Vc, -1)
            lo = xp.clip(lo, 0, n - 1)
            nw = max(1, int(xp.max(hi - lo)))
            e_idx = lo[:, :, None] + xp.arange(nw + 1, dtype=xp.int64)   # <= 2n + 1
            b_idx = e_idx[:, :, :-1]
            u = xp.clip((edges_pad[e_idx] - mu_b[:, :, None]) * iH_b[:, :, None], -k, k)
            F = c1 * _erf(xp, G_SCALE * u) + c2 * xp.arctan(2.0 * u)
            iw = inv_w_pad[b_idx]                                # 0 beyond the last bin
            prof = (F[:, :, 1:] - F[:, :, :-1]) * iw             # (V, Rb, nw) bin average
            del F
            # bins beyond a voxel's last one carry weight 0: they may spill into the next
            # voxel's range (adding 0) and past the end (cut off below)
            flats.append((vofs + b_idx).reshape(-1))
            A_b = A[:, rs, None]
            wts[0].append((A_b * prof).reshape(-1))
            if jacobian:
                inside = xp.abs(u) < k
                f = xp.where(inside, c1 * (2.0 * G_SCALE / math.sqrt(math.pi)) * xp.exp(-(G_SCALE * u) ** 2)
                             + c2 * 2.0 / (1.0 + 4.0 * u * u), 0.0)  # dF/du (0 where clamped)
                fu = f * u
                Amu = (f[:, :, :-1] - f[:, :, 1:]) * iw * (A_b * iH_b[:, :, None])   # A d prof / d mu
                AH = (fu[:, :, :-1] - fu[:, :, 1:]) * iw * (A_b * iH_b[:, :, None])  # A d prof / d H
                del f, fu, u, inside
                cols = [I[None, rs, None] * prof]
                for dt in dts:
                    cols.append(Amu * dt[:, rs, None] + AH * (dH_dtth[:, rs] * dt[:, rs])[:, :, None])
                cols.append(AH * (ks / cos[:, rs])[:, :, None])
                cols.append(AH * (DEG * 4.0 * tan[:, rs])[:, :, None])
                if model.refined[model.i_zero]:
                    cols.append(Amu)
                for c, lst in zip(cols, wts[1:]):
                    lst.append(xp.broadcast_to(c, Amu.shape).reshape(-1))
                del cols, Amu, AH
            del prof
        flat = xp.concatenate(flats) if len(flats) > 1 else flats[0]
        nbc = Vc * n + 2 * n + 2

        def scat(parts):                                         # one bincount per column
            w_ = xp.concatenate(parts) if len(parts) > 1 else parts[0]
            return xp.bincount(flat, weights=w_, minlength=nbc)[:Vc * n].reshape(Vc, n)

        contrib = scat(wts[0])
        y += contrib
        if per_phase:
            out_phase[:, ip] = contrib
        for parts, pj in zip(wts[1:], idx):
            J[:, pj] += scat(parts)
        del flats, wts
    if per_phase:
        return out_phase
    y += X[:, model.i_bg] @ d["T"]
    if jacobian:
        J[:, model.i_bg] = d["T"][None]
        return y, J
    return y


# --------------------------------------------------------------------------------------
# Refinement
# --------------------------------------------------------------------------------------


@dataclass
class RefineResult:
    """Result of :func:`refine`; leading dims ``(...)`` are those of the patterns.

    Attributes
    ----------
    names : list of str
        Parameter names (see :class:`RefineModel`).
    params, esd : (..., P) float64
        Refined parameters and their standard deviations (NaN: masked voxel, fixed
        parameter, parameter on a bound, or phase absent); the esd is scaled by
        ``sqrt(chi2)`` (see the module notes and :data:`tasks.rietveld.ESD_SCALING`).
    scale : (..., n_phase) float64
    weight_fraction : (..., n_phase) float64
        Hill & Howard with the refined cell volume.
    lattice : dict name -> (..., n_phase) float64
        ``"a"``, ``"b"``, ``"c"`` in A; NaN for phases without that refined parameter
        (the CIF value is used for them) and for absent phases.
    lattice_esd : dict, as ``lattice``
    crystallite_size, crystallite_size_esd : (..., n_phase) float64
        Size (nm); ``inf`` where no size broadening was found (size_inv = 0).
    microstrain, microstrain_esd : (..., n_phase) float64
    zero, zero_esd : (...) float64
        Zero shift (deg).
    rwp, chi2 : (...) float64
        ``sqrt(sum w r^2 / sum w y^2)``; ``sum w r^2 / (n_used - n_free)``.
    model : (..., n) float64 or None
    converged : (...) bool
    n_iter : (...) int
    mask : (...) bool
        Voxels not fitted.
    """

    names: list
    params: Any
    esd: Any
    scale: Any
    scale_esd: Any
    weight_fraction: Any
    lattice: dict
    lattice_esd: dict
    crystallite_size: Any
    crystallite_size_esd: Any
    microstrain: Any
    microstrain_esd: Any
    zero: Any
    zero_esd: Any
    rwp: Any
    chi2: Any
    model: Any
    converged: Any
    n_iter: Any
    mask: Any


def start_parameters(model: RefineModel, patterns, sigma=None, *, mask=None):
    """NNLS start values: scales and background from :func:`tasks.rietveld.fit_scales` on
    the model's patterns at the CIF cells (no size/strain broadening).

    Parameters
    ----------
    model : RefineModel
    patterns : array (V, n)
    sigma : None, (n,) or (V, n)
    mask : None or (V,) bool

    Returns
    -------
    x0 : array (V, P) float64 (NaN rows for masked voxels)
    """
    xp = get_xp(patterns)
    refs = evaluate(model, xp.asarray(model.x_ref)[None, :], per_phase=True)[0]   # (n_phase, n)
    res = fit_scales(patterns, refs, background_order=model.i_bg.stop - model.i_bg.start - 1,
                     sigma=sigma, mask=mask, radial=xp.asarray(model.radial), return_model=False)
    V = patterns.shape[0]
    x0 = xp.tile(xp.asarray(model.x_ref)[None, :], (V, 1))
    for ip, sl in enumerate(model.phase_slices):
        x0[:, sl["scale"]] = res.scale[:, ip]
    x0[:, model.i_bg] = res.background_coef
    return x0


def _absent_hold(model, x, xp):
    """(V, P) bool: cell, size and strain of phases whose scale is 0 (undetermined)."""
    hold = xp.zeros(x.shape, dtype=bool)
    for sl in model.phase_slices:
        absent = ~(x[:, sl["scale"]] > 0)
        for j in sl["lattice"] + [sl["size_inv"], sl["strain"]]:
            hold[:, j] = absent
    return hold


def _solve(xp, A, b):
    try:
        return xp.linalg.solve(A, b[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return (xp.linalg.pinv(A) @ b[..., None])[..., 0]


def _held_step(xp, A, g, hold, dg, lam, x, lo, hi, eye):
    """Levenberg-Marquardt step ``(A + lam diag(dg)) d = g`` over the parameters not held
    (``lam`` None: Gauss-Newton). A free parameter on a bound whose step points out of the
    box joins the held ones and the step is solved again (projected Newton, D. P.
    Bertsekas, SIAM J. Control Optim. 20 (1982) 221), at most three times; what still
    points out is clipped by the caller. Returns ``(d, hold)``."""
    at_lo = x <= lo[None, :]
    at_hi = x >= hi[None, :]
    eye3 = eye[None]
    for _ in range(3):
        Ad = A if lam is None else A + lam[:, None, None] * (dg[:, :, None] * eye3)
        Ad = xp.where(hold[:, :, None] | hold[:, None, :], 0.0, Ad)
        Ad = xp.where(hold[:, :, None] & eye3, 1.0, Ad)
        ga = xp.where(hold, 0.0, g)
        # scale rows/cols for conditioning
        sc = xp.sqrt(xp.diagonal(Ad, axis1=1, axis2=2))
        sc = xp.where(sc > 0, sc, 1.0)
        d = _solve(xp, Ad / (sc[:, :, None] * sc[:, None, :]), ga / sc) / sc
        out = ~hold & ((at_lo & (d < 0)) | (at_hi & (d > 0)))
        if not bool(xp.any(out)):
            break
        hold = hold | out
    return d, hold


def refine(model: RefineModel, patterns, sigma=None, *, mask=None, x0=None, max_iter: int = 40,
           xtol: float = 1e-9, ftol: float = 1e-9, dchi2: float = 1e-2, chunk_voxels: int = 256, return_model: bool = False,
           lambda0: float = 1e-3, threads: int | None = None, engine: str | None = None,
           newton_stop: bool = True) -> RefineResult:
    """Refine every voxel's pattern at once (batched Levenberg-Marquardt).

    Parameters
    ----------
    model : RefineModel
        From :func:`build_model`.
    patterns : array_like (..., n)
        Patterns (numpy or cupy; float32 or float64; arithmetic in float64).
    sigma : None or array_like (n,) or (..., n)
        Standard errors (``None``: unit weights; ``inf`` drops a bin).
    mask : None or array_like (...) bool
        True = voxel not fitted (outputs NaN).
    x0 : None or array_like (..., P)
        Start values; default :func:`start_parameters` (batched NNLS).
    max_iter : int
        Iterations per block of voxels.
    xtol : float
        A voxel has converged when an accepted step moves every free parameter by less than
        ``xtol * (|x| + typical)`` (typical: the parameter's bound range or 1), or chi^2
        by less than ``ftol`` relative or ``dchi2`` times the reduced chi^2 (a step of
        less than ``sqrt(dchi2)`` esd), or every parameter by less than 1e-3 of its
        statistical resolution.
    ftol, dchi2 : float
    chunk_voxels : int
        Voxels refined together (memory: about ``chunk * n * (P + 6 * reflections *
        window / n)`` float64 values).
    return_model : bool
        Also return the fitted patterns.
    lambda0 : float
        Initial Marquardt damping.
    threads : int or None
        numpy input: blocks of voxels refined in parallel threads (default: all cores).
        Small batched matrix products are fastest with a single-threaded BLAS, measured
        40x faster on a loaded 2-core machine: with more than one thread, BLAS is limited
        to one thread per caller while the blocks run (threadpoolctl).
        The numba engine runs its blocks in the same threads (its kernel releases the
        GIL), with blocks of at most ``ceil(voxels / threads)`` so every thread has one.
    engine : {"auto", "numba", "numba-exact", "numpy"} or None
        How the model, Jacobian and normal equations are computed: ``"numba"``, one fused
        CPU kernel per block of voxels (:mod:`tasks._refine_nb`, numpy input only;
        ``"numba-exact"`` without the profile table, see :func:`evaluate`);
        ``"numpy"``, the array code of :func:`evaluate` (numpy or cupy) with batched
        matrix products; ``"auto"``/None: numba for numpy input when numba imports. The
        Levenberg-Marquardt iteration is the same code for all.
    newton_stop : bool
        Stop a voxel once its Gauss-Newton decrement is below the chi^2 tolerance (see
        the module notes); False keeps iterating until a step meets another criterion.

    Returns
    -------
    RefineResult

    Raises
    ------
    RefineError
        Shapes that do not match the model; non-finite values in unmasked voxels; sigma
        <= 0 or NaN; an unknown ``engine``, or ``"numba"`` with cupy input.
    """
    xp = get_xp(patterns)
    eng = _engine(engine, xp)
    Y = xp.asarray(patterns)
    n, P = model.n, model.n_param
    if Y.ndim < 1 or Y.shape[-1] != n:
        raise RefineError(f"patterns: expected shape (..., {n}) to match the model's radial axis, "
                          f"got {tuple(Y.shape)}")
    lead = tuple(Y.shape[:-1])
    Yf = Y.reshape(-1, n)
    Vt = Yf.shape[0]
    if mask is None:
        m = xp.zeros(Vt, dtype=bool)
    else:
        m = xp.asarray(mask, dtype=bool)
        if tuple(m.shape) != lead:
            raise RefineError(f"mask: expected shape {lead} (the patterns' leading shape), got {tuple(m.shape)}")
        m = m.reshape(-1)
    keep = xp.nonzero(~m)[0]
    Yk = Yf[keep].astype(xp.float64)
    if not bool(xp.all(xp.isfinite(Yk))):
        raise RefineError("patterns: unmasked voxels contain NaN/inf; expected finite values (mask them)")
    shared = True
    if sigma is None:
        w_sh = xp.ones(n)
    else:
        s = xp.asarray(sigma, dtype=xp.float64)
        if s.ndim == 1 and s.shape[0] == n:
            bad = xp.isnan(s) | (s <= 0)
            w_sh = 1.0 / (xp.where(bad, 1.0, s) ** 2)
        else:
            try:
                s = xp.broadcast_to(s, Y.shape).reshape(-1, n)[keep]
            except ValueError:
                raise RefineError(f"sigma: expected shape ({n},) or broadcastable to {tuple(Y.shape)}, "
                                  f"got {tuple(xp.asarray(sigma).shape)}") from None
            shared = False
            bad = xp.isnan(s) | (s <= 0)
            w_all = 1.0 / (xp.where(bad, 1.0, s) ** 2)
        if bool(xp.any(bad)):
            raise RefineError("sigma: expected values > 0 (inf drops a bin), got zero/negative/NaN")
    Vk = int(keep.shape[0])
    if x0 is None:
        sig_k = None if sigma is None else (xp.asarray(sigma) if shared else s)
        X0 = start_parameters(model, Yk, sig_k) if Vk else xp.zeros((0, P))
    else:
        X0 = xp.asarray(x0, dtype=xp.float64).reshape(-1, P)
        if X0.shape[0] != Vt:
            raise RefineError(f"x0: expected shape {lead + (P,)}, got {tuple(xp.asarray(x0).shape)}")
        X0 = X0[keep]
    d = model.arrays(xp)
    lo, hi, refd = d["lower"], d["upper"], d["refined"]
    lo_np = model.lower
    typ = np.where(np.isfinite(model.upper - model.lower), model.upper - model.lower, 1.0)
    typ = np.where(typ > 0, typ, 1.0)
    for sl in model.phase_slices:
        typ[sl["scale"]] = 0.0
    typ = xp.asarray(typ)
    X0 = xp.clip(X0, lo, hi)

    out_x = xp.full((Vk, P), xp.nan)
    out_e = xp.full((Vk, P), xp.nan)
    out_wr2 = xp.full(Vk, xp.nan)
    out_wy2 = xp.full(Vk, xp.nan)
    out_free = xp.zeros(Vk)
    out_used = xp.zeros(Vk)
    out_conv = xp.zeros(Vk, dtype=bool)
    out_it = xp.zeros(Vk, dtype=xp.int64)
    out_model = xp.full((Vk, n), xp.nan) if return_model else None
    step = max(1, int(chunk_voxels))
    nthreads = (os.cpu_count() or 1) if threads is None else int(threads)
    if eng.startswith("numba"):
        step = max(1, min(step, -(-Vk // max(nthreads, 1))))
    eye = xp.eye(P, dtype=bool)
    if eng.startswith("numba"):
        nbk, nba = _numba_kernels(), model.numba_arrays(table=eng == "numba")
    def fit_chunk(c0):
        c1 = min(Vk, c0 + step)
        y = Yk[c0:c1]
        w = w_sh[None, :] if shared else w_all[c0:c1]
        x = X0[c0:c1].copy()
        Vc = c1 - c0
        fixed = xp.broadcast_to(~refd[None, :], (Vc, P))

        def normal_eq(xv, yv, wv):
            """model residual, chi^2, J^T W J and J^T W r of a block of voxels."""
            if eng.startswith("numba"):
                nv = xv.shape[0]
                rv, chv = np.empty((nv, n)), np.empty(nv)
                Av, gv = np.empty((nv, P, P)), np.empty((nv, P))
                wk = np.ascontiguousarray(wv[:1] if shared else wv)
                nbk.batch(np.ascontiguousarray(xv), np.ascontiguousarray(yv), wk, nba["edges"],
                          nba["inv_w"], nba["T"], nba["r_coef"], nba["r_inv_d2"], nba["r_I"],
                          nba["ph_r"], nba["ph_idx"], nba["ph_lat"], nba["i_zero"], nba["zero_jac"],
                          nba["bg0"], nba["cst"], nba["tab"], 2, rv, np.empty((1, 1, 1)), chv, Av, gv)
                return rv, chv, Av, gv
            ym, Jv = evaluate(model, xv, jacobian=True, engine="numpy")   # J: (v, P, n)
            rv = yv - ym
            Jw = Jv * wv[:, None, :]
            Av = xp.matmul(Jw, Jv.transpose(0, 2, 1))            # (v, P, P)
            gv = xp.matmul(Jw, rv[:, :, None])[:, :, 0]          # (v, P)
            return rv, xp.sum(wv * rv * rv, axis=1), Av, gv

        r, chi, A, g = normal_eq(x, y, w)
        lam = xp.full(Vc, float(lambda0))
        nu = xp.full(Vc, 2.0)
        bt = xp.zeros(Vc, dtype=bool)                             # next trial: backtrack
        fresh = xp.ones(Vc, dtype=bool)                           # moved since last tested
        bt_t = xp.zeros(Vc)
        bt_dd = xp.zeros((Vc, P))
        active = xp.ones(Vc, dtype=bool)
        it = xp.zeros(Vc, dtype=xp.int64)
        for _ in range(int(max_iter)):
            a = xp.nonzero(active)[0]
            if a.shape[0] == 0:
                break
            Aa, ga0, xa = A[a], g[a], x[a]
            # projected: hold parameters on a bound whose gradient points out of the box
            on_lo = (xa <= lo[None, :]) & (ga0 <= 0)
            on_hi = (xa >= hi[None, :]) & (ga0 >= 0)
            hold = fixed[a] | on_lo | on_hi | _absent_hold(model, xa, xp)
            dg = xp.diagonal(Aa, axis1=1, axis2=2)
            dg = xp.where(dg > 0, dg, 1.0)
            if newton_stop:
                # Newton decrement g^T A^-1 g over the free parameters: the chi^2 a full
                # Gauss-Newton step would gain. At or below the chi^2 tolerance (as for
                # an accepted step's gain, below) the voxel is at its minimum and needs
                # no further model evaluation. (After a rejected step x, A and g are
                # unchanged, so is the decrement: only voxels that moved are tested.)
                kf = xp.nonzero(fresh[a])[0]
                at_min = xp.zeros(a.shape[0], dtype=bool)
                if kf.shape[0]:
                    d0, h0 = _held_step(xp, Aa[kf], ga0[kf], hold[kf], dg[kf], None, xa[kf], lo, hi, eye)
                    dec = xp.sum(xp.where(h0, 0.0, ga0[kf]) * d0, axis=1)
                    at_min[kf] = dec <= xp.maximum(ftol * chi[a[kf]], dchi2 * chi[a[kf]] / max(n - P, 1))
                if bool(xp.any(at_min)):
                    active[a[at_min]] = False
                    k_ = xp.nonzero(~at_min)[0]
                    if k_.shape[0] == 0:
                        break
                    a, Aa, ga0, xa, hold, dg = (v_[k_] for v_ in (a, Aa, ga0, xa, hold, dg))
            delta, hold = _held_step(xp, Aa, ga0, hold, dg, lam[a], xa, lo, hi, eye)
            # into the box: clipped per parameter, or the whole step shortened to the
            # first bound it meets, whichever the quadratic model expects to gain more
            xt = xp.clip(xa + delta, lo[None, :], hi[None, :])
            with np.errstate(divide="ignore", invalid="ignore"):
                room = xp.where(delta > 0, (hi[None, :] - xa) / delta,
                                xp.where(delta < 0, (lo[None, :] - xa) / delta, xp.inf))
            tmax = xp.clip(xp.min(xp.where(xp.isnan(room), xp.inf, room), axis=1), 0.0, 1.0)
            xs = xp.clip(xa + tmax[:, None] * delta, lo[None, :], hi[None, :])

            def _pred(d_):
                return 2.0 * xp.sum(ga0 * d_, axis=1) - xp.sum(d_ * xp.matmul(Aa, d_[:, :, None])[:, :, 0], axis=1)

            xt = xp.where((_pred(xs - xa) > _pred(xt - xa))[:, None], xs, xt)
            # a voxel whose last step was rejected tries the minimiser of the parabola
            # through chi^2(0), its slope and chi^2(1) along that step instead
            btv = bt[a]
            xt = xp.where(btv[:, None], xa + bt_t[a][:, None] * bt_dd[a], xt)
            rt, chit, At, gt = normal_eq(xt, y[a], w if shared else w[a])
            chi_old = chi[a]
            better = chit <= chi_old
            dd = xt - xa
            gd = xp.sum(ga0 * dd, axis=1)                          # -(1/2) d chi^2 / dt at 0
            pred = 2.0 * gd - xp.sum(dd * xp.matmul(Aa, dd[:, :, None])[:, :, 0], axis=1)
            acc = a[better]
            x[acc] = xt[better]
            r[acc] = rt[better]
            A[acc] = At[better]
            g[acc] = gt[better]
            chi[acc] = chit[better]
            # damping (H. B. Nielsen, IMM-REP-1999-05): accepted: lam * max(1/3, 1 - (2 rho - 1)^3)
            # with rho = actual / predicted gain; rejected: lam * nu, nu doubling
            rho = (chi_old - chit) / xp.where(pred > 0, pred, xp.inf)
            fac = xp.maximum(1.0 / _LAM_DOWN, 1.0 - (2.0 * rho - 1.0) ** 3)
            lam[acc] = xp.maximum(lam[acc] * fac[better], 1e-12)
            nu[acc] = 2.0
            bt[acc] = False
            fresh[a] = better
            rej = a[~better]
            lam[rej] = lam[rej] * nu[rej]
            nu[rej] = nu[rej] * 2.0
            first = ~better & ~btv
            den = chit - chi_old + 2.0 * gd
            tstar = xp.clip(gd / xp.where(den > 0, den, xp.inf), 0.1, 0.5)
            bt[rej] = first[~better]
            bt_t[a[first]] = tstar[first]
            bt_dd[a[first]] = dd[first]
            it[a] += 1
            moved = xp.abs(xt - xa) <= xtol * (xp.abs(xa) + typ[None, :]) + 1e-300
            small = xp.all(moved | hold, axis=1)
            # chi^2 no longer moves (by ftol relative, or by less than dchi2 in units of
            # the reduced chi^2: parameters then move by < sqrt(dchi2) esd), or the step
            # is far below the statistical resolution: |dx| sqrt(A_ii) << sqrt(chi^2 / n)
            tiny_gain = (chi_old - chit) <= xp.maximum(ftol * chi_old, dchi2 * chit / max(n - P, 1))
            stat = xp.abs(xt - xa) * xp.sqrt(dg) <= 1e-3 * xp.sqrt(chit / n)[:, None]
            stat_small = xp.all(stat | hold, axis=1)
            # a rejected step that expected to gain less than 5 dchi2 reduced chi^2: the
            # window edges make chi^2 rough at about that level (measured 0.03-0.07 for
            # 2000 bins), so nothing below it can be resolved by further steps
            stall = ~better & (pred <= 5.0 * xp.maximum(ftol * chi_old, dchi2 * chi_old / max(n - P, 1)))
            done = ((better & (small | tiny_gain | stat_small)) | stall | (lam[a] > 1e12)
                    | (chi[a] == 0))
            active[a[done]] = False
            del Aa, At, rt
        # covariance at the solution
        on_lo = (x <= lo[None, :]) & (g <= 0) & xp.isfinite(lo)[None, :]
        on_hi = (x >= hi[None, :]) & (g >= 0) & xp.isfinite(hi)[None, :]
        hold = fixed | on_lo | on_hi | _absent_hold(model, x, xp)
        hh = hold[:, :, None] | hold[:, None, :]
        A = xp.where(hh, 0.0, A)
        A = xp.where(hold[:, :, None] & eye[None], 1.0, A)
        sc = xp.sqrt(xp.diagonal(A, axis1=1, axis2=2))
        sc = xp.where(sc > 0, sc, 1.0)
        try:
            cinv = xp.linalg.inv(A / (sc[:, :, None] * sc[:, None, :]))
        except np.linalg.LinAlgError:
            cinv = xp.linalg.pinv(A / (sc[:, :, None] * sc[:, None, :]))
        var = xp.diagonal(cinv, axis1=1, axis2=2) / (sc * sc)
        n_used = xp.sum(xp.broadcast_to(w, (Vc, n)) > 0, axis=1).astype(xp.float64)
        n_free = xp.sum(~hold, axis=1).astype(xp.float64)
        chi2r = chi / xp.maximum(n_used - n_free, 1.0)
        esd = xp.where(hold, xp.nan, xp.sqrt(xp.maximum(var, 0.0) * chi2r[:, None]))
        out_x[c0:c1] = x
        out_e[c0:c1] = esd
        out_wr2[c0:c1] = chi
        out_wy2[c0:c1] = xp.sum(w * y * y, axis=1)
        out_free[c0:c1] = n_free
        out_used[c0:c1] = n_used
        out_conv[c0:c1] = ~active
        out_it[c0:c1] = it
        if return_model:
            out_model[c0:c1] = y - r

    starts = range(0, Vk, step)
    if xp is np and nthreads > 1 and len(starts) > 1:
        # numpy and the numba kernel release the GIL: blocks of voxels run side by side,
        # each on a single-threaded BLAS (threadpoolctl: their small matrix products
        # would otherwise each start a BLAS thread per core, measured 2.5x slower)
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"), \
                ThreadPoolExecutor(min(nthreads, len(starts))) as ex:
            list(ex.map(fit_chunk, starts))
    else:
        for c0 in starts:
            fit_chunk(c0)
    _ = lo_np

    def scatter(vals, tail, fill=xp.nan):
        if vals.dtype == bool:
            o = xp.zeros((Vt,) + tail, dtype=bool)
        elif vals.dtype.kind in "iu":
            o = xp.zeros((Vt,) + tail, dtype=vals.dtype)
        else:
            o = xp.full((Vt,) + tail, fill, dtype=vals.dtype)
        o[keep] = vals
        return o.reshape(lead + tail)

    params = scatter(out_x, (P,))
    esd = scatter(out_e, (P,))
    rwp = scatter(xp.sqrt(out_wr2 / xp.where(out_wy2 > 0, out_wy2, xp.nan)), ())
    chi2 = scatter(out_wr2 / xp.maximum(out_used - out_free, 1.0), ())
    return _unpack(model, params, esd, rwp, chi2,
                   None if out_model is None else scatter(out_model, (n,)),
                   scatter(out_conv, ()), scatter(out_it, ()), m.reshape(lead))


def _unpack(model, params, esd, rwp, chi2, ymodel, conv, n_iter, mask) -> RefineResult:
    xp = get_xp(params)
    npz = model.n_phase
    lead = params.shape[:-1]
    scale = xp.stack([params[..., sl["scale"]] for sl in model.phase_slices], axis=-1)
    scale_esd = xp.stack([esd[..., sl["scale"]] for sl in model.phase_slices], axis=-1)
    lattice, lattice_esd = {}, {}
    for ln in ("a", "b", "c"):
        if not any(ln in t.lattice_names for t in model.tables):
            continue
        v = xp.full(lead + (npz,), xp.nan)
        e = xp.full(lead + (npz,), xp.nan)
        for ip, (t, sl) in enumerate(zip(model.tables, model.phase_slices)):
            if ln in t.lattice_names:
                j = sl["lattice"][t.lattice_names.index(ln)]
                v[..., ip] = params[..., j]
                e[..., ip] = esd[..., j]
        lattice[ln], lattice_esd[ln] = v, e
    beta = xp.stack([params[..., sl["size_inv"]] for sl in model.phase_slices], axis=-1)
    beta_e = xp.stack([esd[..., sl["size_inv"]] for sl in model.phase_slices], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        size = xp.where(beta > 0, 1.0 / xp.where(beta > 0, beta, 1.0), xp.inf)
        size = xp.where(xp.isnan(beta), xp.nan, size)
        size_e = xp.where(beta > 0, beta_e / xp.where(beta > 0, beta, 1.0) ** 2, xp.nan)
    strain = xp.stack([params[..., sl["strain"]] for sl in model.phase_slices], axis=-1)
    strain_e = xp.stack([esd[..., sl["strain"]] for sl in model.phase_slices], axis=-1)
    vol_ratio = []
    for t, sl in zip(model.tables, model.phase_slices):
        if sl["lattice"]:
            vol_ratio.append(t.volume(params[..., sl["lattice"]]) / t.volume0)
        else:
            vol_ratio.append(xp.ones(lead))
    zmv = xp.stack(vol_ratio, axis=-1) * xp.asarray([t.zmv for t in model.tables])
    num = scale * zmv
    den = xp.sum(num, axis=-1, keepdims=True)
    ok = xp.isfinite(den) & (den > 0)
    wf = xp.where(ok, num / xp.where(ok, den, 1.0), xp.nan)
    # phases absent from a voxel: cell, size and strain are undetermined
    absent = ~(scale > 0)
    for dct in (lattice, lattice_esd):
        for k in dct:
            dct[k] = xp.where(absent, xp.nan, dct[k])
    size = xp.where(absent, xp.nan, size)
    strain = xp.where(absent, xp.nan, strain)
    return RefineResult(names=list(model.names), params=params, esd=esd, scale=scale, scale_esd=scale_esd,
                        weight_fraction=wf, lattice=lattice, lattice_esd=lattice_esd,
                        crystallite_size=size, crystallite_size_esd=size_e, microstrain=strain,
                        microstrain_esd=strain_e, zero=params[..., model.i_zero],
                        zero_esd=esd[..., model.i_zero], rwp=rwp, chi2=chi2, model=ymodel,
                        converged=conv, n_iter=n_iter, mask=mask)


# --------------------------------------------------------------------------------------
# Instrument profile from a calibrant
# --------------------------------------------------------------------------------------


@dataclass
class ProfileResult:
    """Instrument profile refined from a calibrant pattern (:func:`refine_profile`).

    Attributes
    ----------
    U, V, W : float
        Caglioti parameters (deg^2 of 2theta).
    eta : float
        Pseudo-Voigt mixing.
    zero_shift_deg : float
    esd : dict name -> float
    rwp : float
    model : ndarray (n,) float64
    lattice : float or None
        Refined calibrant cell parameter (A) when ``refine_lattice``.
    """

    U: float
    V: float
    W: float
    eta: float
    zero_shift_deg: float
    esd: dict
    rwp: float
    model: np.ndarray
    lattice: float | None = None

    def as_profile(self) -> dict:
        """``{"U", "V", "W", "eta", "zero_shift_deg"}`` for :func:`build_model` or a spec."""
        return dict(U=self.U, V=self.V, W=self.W, eta=self.eta, zero_shift_deg=self.zero_shift_deg)


def refine_profile(pattern, radial, unit: str, wavelength_m: float, calibrant: Phase, *,
                   start=None, background_order: int = 6, sigma=None, refine_lattice: bool = False,
                   two_theta_range: tuple | None = None) -> ProfileResult:
    """Refine Caglioti U, V, W, pseudo-Voigt eta and the zero shift from a calibrant pattern.

    The calibrant is assumed free of size and strain broadening (a line-profile standard
    such as NIST CeO2 SRM 674b or LaB6 SRM 660c), so its widths are the instrument's.
    Scale and Chebyshev background are solved linearly at every step (variable
    projection, G. H. Golub and V. Pereyra, SIAM J. Numer. Anal. 10 (1973) 413); the
    non-linear parameters go through ``scipy.optimize.least_squares`` (trust-region
    reflective, bounds ``W > 0``, ``0 <= eta <= 1``).

    Parameters
    ----------
    pattern : array_like (n,)
        Calibrant pattern (intensity per degree 2theta, as pyFAI ``integrate1d``).
    radial : array_like (n,)
    unit : {"q_nm^-1", "q_A^-1", "2th_deg"}
    wavelength_m : float
    calibrant : Phase
        The calibrant (certified cell in its CIF).
    start : dict or None
        Start ``U, V, W, eta, zero_shift_deg`` (default W = 0.001, eta = 0.5). A first
        stage refines ``W, eta, zero`` (and the cell) with ``U = V = 0``, a second all.
    background_order : int
    sigma : None or array_like (n,)
    refine_lattice : bool
        Also refine the calibrant's cell (absorbs a wavelength error).
    two_theta_range : (lo, hi) or None
        Restrict the fit to this 2theta range (deg).

    Returns
    -------
    ProfileResult

    Raises
    ------
    RefineError
        Bad shapes or values; the fit does not find the calibrant's reflections.
    """
    from scipy.optimize import least_squares

    y = np.asarray(pattern, dtype=np.float64)
    r = np.asarray(radial, dtype=np.float64)
    if y.shape != r.shape or y.ndim != 1:
        raise RefineError(f"pattern: expected shape {r.shape} (the radial axis), got {y.shape}")
    ok = np.isfinite(y)
    if two_theta_range is not None:
        tt = radial_to_two_theta(r, unit, wavelength_m)
        ok &= (tt >= two_theta_range[0]) & (tt <= two_theta_range[1])
    if ok.sum() < 20:
        raise RefineError("pattern: expected at least 20 finite bins in range")
    w = np.ones_like(y) if sigma is None else 1.0 / np.asarray(sigma, dtype=np.float64) ** 2
    w = np.where(ok, w, 0.0)
    sw = np.sqrt(w)
    y0 = np.where(ok, y, 0.0)
    st = dict(U=0.0, V=0.0, W=0.001, eta=0.5, zero_shift_deg=0.0)
    st.update(start or {})

    def pattern_for(p):
        U, V, W, eta, zero = p[:5]
        prof = dict(U=U, V=V, W=W, eta=min(max(eta, 0.0), 1.0), zero_shift_deg=zero)
        m = build_model([calibrant], r, unit, wavelength_m, prof, background_order=background_order,
                        refine_lattice=refine_lattice, refine_size=False, refine_strain=False,
                        window_fwhm=25.0, lattice_bound=0.01 if refine_lattice else 1e-6)
        xr = m.x_ref.copy()
        if refine_lattice:
            xr[m.phase_slices[0]["lattice"][0]] = p[5]
        ref = evaluate(m, xr[None, :], per_phase=True)[0, 0]
        return ref, m.T

    def resid(p):
        try:
            ref, T = pattern_for(p)
        except ValueError:
            return np.full(y.size, 1e6)
        D = np.concatenate([ref[None], T], axis=0).T * sw[:, None]
        coef, *_ = np.linalg.lstsq(D, y0 * sw, rcond=None)
        return D @ coef - y0 * sw

    p0 = [st["U"], st["V"], st["W"], st["eta"], st["zero_shift_deg"]]
    lb = [-1.0, -1.0, 1e-8, 0.0, -1.0]
    ub = [1.0, 1.0, 1.0, 1.0, 1.0]
    x_scale = [1e-3, 1e-3, 1e-4, 0.1, 1e-3]
    if refine_lattice:
        p0.append(calibrant.a)
        lb.append(calibrant.a * 0.99)
        ub.append(calibrant.a * 1.01)
        x_scale.append(1e-4)
    p0 = np.clip(np.asarray(p0, dtype=np.float64), lb, ub)
    # stage 1: constant width (U = V = 0; W, eta, zero, cell) -- always a valid profile,
    # so the search cannot wander into U, V where FWHM^2 <= 0; stage 2: all parameters
    sub = [2, 3, 4] + ([5] if refine_lattice else [])

    def resid_sub(q):
        p = p0.copy()
        p[0] = p[1] = 0.0
        p[sub] = q
        return resid(p)

    s1 = least_squares(resid_sub, p0[sub], bounds=(np.asarray(lb)[sub], np.asarray(ub)[sub]),
                       x_scale=np.asarray(x_scale)[sub], method="trf", max_nfev=200)
    p1 = p0.copy()
    p1[0] = p1[1] = 0.0
    p1[sub] = s1.x
    sol = least_squares(resid, p1, bounds=(lb, ub), x_scale=x_scale, method="trf",
                        xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=400)
    ref, T = pattern_for(sol.x)
    D = np.concatenate([ref[None], T], axis=0).T
    coef, *_ = np.linalg.lstsq(D * sw[:, None], y0 * sw, rcond=None)
    model = D @ coef
    wr2 = float(np.sum(w * (y0 - model) ** 2))
    rwp = math.sqrt(wr2 / float(np.sum(w * y0 * y0)))
    dof = max(int(ok.sum()) - len(sol.x) - D.shape[1], 1)
    try:
        cov = np.linalg.inv(sol.jac.T @ sol.jac) * (wr2 / dof)
        e = np.sqrt(np.maximum(np.diag(cov), 0))
    except np.linalg.LinAlgError:
        e = np.full(len(sol.x), np.nan)
    keys = ["U", "V", "W", "eta", "zero_shift_deg"] + (["a"] if refine_lattice else [])
    if coef[0] <= 0:
        raise RefineError("calibrant: the fit found no positive calibrant scale; expected the "
                          "calibrant's reflections in the pattern (check wavelength and unit)")
    return ProfileResult(U=float(sol.x[0]), V=float(sol.x[1]), W=float(sol.x[2]), eta=float(sol.x[3]),
                         zero_shift_deg=float(sol.x[4]), esd=dict(zip(keys, map(float, e))), rwp=rwp,
                         model=model, lattice=float(sol.x[5]) if refine_lattice else None)


def to_host(result: RefineResult) -> RefineResult:
    """A copy of ``result`` with every array on the host (numpy)."""
    kw = {}
    for k, v in result.__dict__.items():
        if isinstance(v, dict):
            kw[k] = {a: to_numpy(b) for a, b in v.items()}
        elif k == "names":
            kw[k] = v
        else:
            kw[k] = None if v is None else to_numpy(v)
    return RefineResult(**kw)


# --------------------------------------------------------------------------------------
# Pipeline glue: maps for the product store
# --------------------------------------------------------------------------------------


def model_from_mapping(phases, radial, unit: str, wavelength_m: float, mapping) -> RefineModel:
    """:func:`build_model` configured by a ``pipelines.spec.MappingSpec``."""
    rs = mapping.refine
    return build_model(phases, radial, unit, wavelength_m, mapping.profile,
                       background_order=mapping.background_order, refine_lattice=rs.lattice,
                       refine_size=rs.size, refine_strain=rs.strain, refine_zero=rs.zero_shift,
                       lattice_bound=rs.lattice_bound, size_min_nm=rs.size_min_nm,
                       strain_max=rs.strain_max, zero_bound_deg=rs.zero_bound_deg,
                       window_fwhm=rs.window_fwhm)


def refine_variables(volume, sigma, mask, phases, radial, unit: str, wavelength_m: float, mapping):
    """Refine a volume and return its maps as xarray variable tuples.

    Parameters
    ----------
    volume : ndarray (z, y, x, n)
    sigma : None or ndarray (z, y, x, n)
    mask : ndarray (z, y, x) bool
        True = not fitted.
    phases : list of Phase
    radial, unit, wavelength_m
        The volume's radial axis (from its ``radial`` attrs).
    mapping : pipelines.spec.MappingSpec

    Returns
    -------
    data : dict name -> (dims, array float32, attrs)
        ``scale``, ``scale_esd``, ``weight_fraction``, ``lattice_a`` (``_b``, ``_c``) and
        their ``_esd`` (z, phase, y, x) in A, ``crystallite_size`` (nm), ``microstrain``
        and their ``_esd``, ``zero_shift`` (z, y, x) deg when refined, ``rwp``, ``chi2``,
        ``refine_converged`` and ``refine_params`` (z, y, x, param) with the parameter
        names in its attrs. Every ``*_esd`` variable carries the attr ``esd_scaling``
        (:data:`tasks.rietveld.ESD_SCALING`: scaled by sqrt(reduced chi^2)).
    result : RefineResult
    """
    model = model_from_mapping(phases, radial, unit, wavelength_m, mapping)
    rs = mapping.refine
    fit = refine_seeded if rs.seed_weak_from_neighbours else refine
    res = fit(model, volume, sigma, mask=mask, max_iter=rs.max_iter, chunk_voxels=rs.chunk_voxels)

    def zp(a):  # (z, y, x, phase) -> (z, phase, y, x)
        return np.moveaxis(np.asarray(to_numpy(a), np.float32), -1, 1)

    P4 = ("z", "phase", "y", "x")
    data = {
        "scale": (P4, zp(res.scale), {"long_name": "phase scale factor S_p (refined)"}),
        "scale_esd": (P4, zp(res.scale_esd), {"long_name": "esd of scale (refined)"}),
        "weight_fraction": (P4, zp(res.weight_fraction),
                            {"long_name": "weight fraction (Hill & Howard 1987, refined ZMV)", "units": "1"}),
        "crystallite_size": (P4, zp(res.crystallite_size),
                             {"long_name": "crystallite size (Scherrer, K = %g); inf: no size broadening"
                              % model.scherrer_k, "units": "nm"}),
        "crystallite_size_esd": (P4, zp(res.crystallite_size_esd), {"long_name": "esd of crystallite size",
                                                                    "units": "nm"}),
        "microstrain": (P4, zp(res.microstrain), {"long_name": "microstrain (4 e tan th broadening)",
                                                  "units": "1"}),
        "microstrain_esd": (P4, zp(res.microstrain_esd), {"long_name": "esd of microstrain", "units": "1"}),
        "rwp": (("z", "y", "x"), np.asarray(to_numpy(res.rwp), np.float32),
                {"long_name": "weighted-profile R factor (refined)", "units": "1"}),
        "chi2": (("z", "y", "x"), np.asarray(to_numpy(res.chi2), np.float32),
                 {"long_name": "reduced chi^2 (refined)"}),
        "refine_converged": (("z", "y", "x"), np.asarray(to_numpy(res.converged), bool),
                             {"long_name": "Levenberg-Marquardt converged"}),
        "refine_params": (("z", "y", "x", "param"), np.asarray(to_numpy(res.params), np.float64),
                          {"long_name": "refined parameters", "param_names": list(model.names),
                           "radial_unit": unit, "wavelength_m": float(wavelength_m)}),
    }
    for ln in res.lattice:
        data[f"lattice_{ln}"] = (P4, zp(res.lattice[ln]), {"long_name": f"lattice parameter {ln}",
                                                           "units": "Angstrom"})
        data[f"lattice_{ln}_esd"] = (P4, zp(res.lattice_esd[ln]), {"long_name": f"esd of lattice {ln}",
                                                                   "units": "Angstrom"})
    if mapping.refine.zero_shift:
        data["zero_shift"] = (("z", "y", "x"), np.asarray(to_numpy(res.zero), np.float32),
                              {"long_name": "zero shift", "units": "deg"})
        data["zero_shift_esd"] = (("z", "y", "x"), np.asarray(to_numpy(res.zero_esd), np.float32),
                                  {"long_name": "esd of zero shift", "units": "deg"})
    for k, (_, _, attrs) in data.items():
        if k.endswith("_esd"):
            attrs["esd_scaling"] = ESD_SCALING
    return data, res


# --------------------------------------------------------------------------------------
# Weak voxels seeded from their neighbours
# --------------------------------------------------------------------------------------


def weak_voxels(model: RefineModel, result: RefineResult, rel_esd: float = 0.05):
    """(...) bool: fitted voxels whose refinement is not trustworthy on its own: not
    converged, or a present phase whose refined cell or scale has no esd (stuck on a
    bound) or a relative scale esd above ``rel_esd``."""
    xp = get_xp(result.params)
    weak = ~result.converged & ~result.mask
    for ip, sl in enumerate(model.phase_slices):
        S = result.params[..., sl["scale"]]
        present = S > 0
        e = result.esd[..., sl["scale"]]
        weak |= present & ~(e <= rel_esd * S)
        for j in sl["lattice"]:
            weak |= present & ~xp.isfinite(result.esd[..., j]) & bool(model.refined[j])
    return weak & ~result.mask


def refine_seeded(model: RefineModel, volume, sigma=None, *, mask=None, rel_esd: float = 0.05,
                  radius: int = 1, **kw) -> RefineResult:
    """Refine a volume, then refit weak voxels from their neighbours' parameters.

    Sequential option for weak voxels (few counts, a minor phase): after the batched fit
    of every voxel, each voxel flagged by :func:`weak_voxels` gets a second batched fit
    started from the median parameters (cells, size, strain, zero) of the trustworthy
    voxels within ``radius`` in y and x (and the neighbouring slices in z), with its own
    NNLS scales and background. The second fit replaces the first where it reaches a
    lower chi^2.

    Parameters
    ----------
    model : RefineModel
    volume : array (z, y, x, n) or (y, x, n)
    sigma, mask : as :func:`refine`
    rel_esd : float
        Threshold of :func:`weak_voxels`.
    radius : int
        Neighbourhood half-width (voxels).
    **kw
        Passed to :func:`refine`.

    Returns
    -------
    RefineResult
        With ``n_iter`` of the refitted voxels replaced by their second fit's.
    """
    xp = get_xp(volume)
    vol = xp.asarray(volume)
    if vol.ndim not in (3, 4):
        raise RefineError(f"volume: expected (z, y, x, n) or (y, x, n), got shape {tuple(vol.shape)}")
    first = refine(model, vol, sigma, mask=mask, **kw)
    weak = weak_voxels(model, first, rel_esd)
    if not bool(xp.any(weak)):
        return first
    P = model.n_param
    params = to_numpy(first.params)
    good = to_numpy(~weak & ~first.mask)
    w4 = to_numpy(weak)
    if vol.ndim == 3:
        params, good, w4 = params[None], good[None], w4[None]
    nz, ny, nx = good.shape
    nonlin = np.ones(P, dtype=bool)
    for sl in model.phase_slices:
        nonlin[sl["scale"]] = False
    nonlin[model.i_bg] = False
    idx = np.argwhere(w4)
    x0 = np.full((idx.shape[0], P), np.nan)
    for k, (iz, iy, ix) in enumerate(idx):
        zs = slice(max(0, iz - 1), iz + 2)
        ys = slice(max(0, iy - radius), iy + radius + 1)
        xs = slice(max(0, ix - radius), ix + radius + 1)
        nb = params[zs, ys, xs][good[zs, ys, xs]]
        x0[k] = params[iz, iy, ix]
        if nb.shape[0]:
            med = np.nanmedian(nb, axis=0)
            x0[k, nonlin] = np.where(np.isfinite(med[nonlin]), med[nonlin], x0[k, nonlin])
    flat = vol.reshape(-1, model.n)
    sel = np.ravel_multi_index(idx.T, (nz, ny, nx))
    yw = flat[xp.asarray(sel)].astype(xp.float64)
    sw = None
    if sigma is not None:
        s = xp.asarray(sigma, dtype=xp.float64)
        sw = s if s.ndim == 1 else xp.broadcast_to(s, vol.shape).reshape(-1, model.n)[xp.asarray(sel)]
    # fresh NNLS scales and background at the seeded cells
    st = start_parameters(model, yw, sw)
    x0 = xp.asarray(x0)
    for sl in model.phase_slices:
        x0[:, sl["scale"]] = st[:, sl["scale"]]
    x0[:, model.i_bg] = st[:, model.i_bg]
    kw2 = {k: v for k, v in kw.items() if k != "x0"}
    second = refine(model, yw, sw, x0=x0, **kw2)
    better = to_numpy(second.chi2 < to_numpy(first.chi2).reshape(-1)[sel])
    # merge: replace the arrays of the voxels where the seeded fit is better
    out = {}
    for name, v in first.__dict__.items():
        if name in ("names", "mask"):
            out[name] = v
            continue
        if isinstance(v, dict):
            out[name] = {}
            for kk, arr in v.items():
                a = to_numpy(arr).copy()
                af = a.reshape((-1,) + a.shape[vol.ndim - 1:])
                af[sel[better]] = to_numpy(getattr(second, name)[kk])[better]
                out[name][kk] = xp.asarray(a)
            continue
        if v is None or getattr(second, name) is None:
            out[name] = v
            continue
        a = to_numpy(v).copy()
        af = a.reshape((-1,) + a.shape[vol.ndim - 1:])
        af[sel[better]] = to_numpy(getattr(second, name))[better]
        out[name] = xp.asarray(a)
    return RefineResult(**out)
