"""Iterative reconstruction of every radial bin of an XRD-CT slice at once.

Three methods on the exact strip-integral projector of :mod:`tasks.projector` (the
geometry of :func:`tasks.reconstruct.radon` / :func:`tasks.reconstruct.fbp`: a sinogram
``(angle, translation[, bin])`` gives an image ``(n, n[, bin])``, rows top = largest y,
centre of rotation in translation pixels), the radial bins being the batch (channel)
dimension of every sparse product:

:func:`sirt`
    Simultaneous Iterative Reconstruction Technique in the row/column-sum normalised form
    of van der Sluis & van der Vorst (Linear Algebra Appl. 130 (1990) 257) as astra-toolbox
    implements it (``SIRT``, ``src/SirtAlgorithm.cpp``): ``x <- x + lambda C A' R (b - A x)``
    with ``R = 1 / (A 1)`` and ``C = 1 / (A' 1)``, optional clamp at 0 after every step and
    a reconstruction mask (support).
:func:`cgls`
    Conjugate gradients on the normal equations ``A'A x = A'b`` (Hestenes & Stiefel, J. Res.
    NBS 49 (1952) 409; the CGLS form of Björck, *Numerical Methods for Least Squares
    Problems*, SIAM 1996, sect. 7.4), one independent recursion per bin. The residual
    ``||b - A x||`` decreases monotonically; stop early on noisy data (semi-convergence).
:func:`tv_reconstruct`
    Regularised reconstruction by automatic differentiation in the manner of Adorym (M. Du
    et al., Sci. Adv. 6 (2020) eaay3700): a loss = data term (Gaussian least squares or
    Poisson negative log-likelihood) + L1 + smoothed isotropic total variation, with
    non-negativity (projection or softplus parametrisation) and a support, minimised with
    Adam (Kingma & Ba, ICLR 2015) on minibatches of angles or with L-BFGS, in PyTorch.

:func:`reconstruct` dispatches on the method name (``"sirt"``, ``"cgls"``, ``"tv"``).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from tasks._xp import get_xp
from tasks.projector import Projector, ProjectorError
from tasks.reconstruct import (ReconstructionError, _as_angles, _as_sino, _center, circle_mask,
                               circle_radius, fbp)

__all__ = ["IterativeError", "sirt", "cgls", "tv_reconstruct", "reconstruct", "METHODS"]

METHODS = ("sirt", "cgls", "tv")
LOSSES = ("gaussian", "poisson")
OPTIMIZERS = ("adam", "lbfgs")
_EPS = 1e-6          # astra's threshold below which a ray length / pixel weight counts as 0


class IterativeError(ReconstructionError):
    """Bad input to an iterative reconstruction; the message names the argument."""


# --------------------------------------------------------------------------------------
# shared input handling
# --------------------------------------------------------------------------------------

def _prepare(sino, angles_deg, center, projector, backend, device):
    """Validated float32 numpy sinogram (na, nt, nb), 2D flag, input module, projector."""
    try:
        s = _as_sino(sino)
    except ReconstructionError as err:
        raise IterativeError(str(err)) from None
    xp = get_xp(s)
    two_d = s.ndim == 2
    s = np.asarray(s.get() if xp is not np else s, dtype=np.float32)
    if two_d:
        s = s[:, :, None]
    if not np.all(np.isfinite(s)):
        raise IterativeError("sino: contains NaN or infinite values")
    try:
        ang = _as_angles(angles_deg, s.shape[0])
        c = _center(center, s.shape[1])
    except ReconstructionError as err:
        raise IterativeError(str(err)) from None
    na, nt, _ = s.shape
    if projector is None:
        if backend is None:
            try:
                import torch  # noqa: F401
                backend = "torch"
            except ImportError:
                backend = "numpy"
        if backend not in ("torch", "numpy", "cupy", "astra"):
            raise IterativeError(f"backend: expected torch, numpy, cupy or astra, got {backend!r}")
        try:
            projector = Projector(ang, nt, c, backend=backend, device=device)
        except ProjectorError as err:
            raise IterativeError(str(err)) from None
    else:
        if not isinstance(projector, Projector):
            raise IterativeError(f"projector: expected a tasks.projector.Projector, got "
                                 f"{type(projector).__name__}")
        if projector.sino_shape != (na, nt):
            raise IterativeError(f"projector: built for sinograms of shape {projector.sino_shape}, "
                                 f"sino has ({na}, {nt})")
        if not np.allclose(projector.angles_deg, ang, atol=1e-9) or \
                (center is not None and abs(projector.center - c) > 1e-9):
            raise IterativeError("projector: its angles or centre differ from angles_deg / center")
    return s, two_d, xp, ang, projector


def _support_mask(support, P):
    """Boolean (n, n) support from None (all pixels), "circle" or a mask."""
    n = P.n_pixels
    if support is None:
        return np.ones((n, n), bool)
    if isinstance(support, str):
        if support != "circle":
            raise IterativeError(f"support: expected None, 'circle' or an ({n}, {n}) mask, got "
                                 f"{support!r}")
        if n == P.n_translation:
            return circle_mask(n, P.center)
        # the reconstruction circle of the detector, on an image of another size
        r = circle_radius(P.n_translation, P.center)
        i, j = np.mgrid[:n, :n] - (n - 1) / 2.0
        return i * i + j * j <= r * r + 1e-9
    m = np.asarray(support.get() if hasattr(support, "get") else support)
    if m.shape != (n, n):
        raise IterativeError(f"support: expected an ({n}, {n}) mask, got shape {m.shape}")
    if m.dtype != bool:
        if not np.all(np.isin(m, (0, 1))):
            raise IterativeError("support: a mask must be boolean (or 0/1)")
        m = m.astype(bool)
    if not m.any():
        raise IterativeError("support: the mask selects no pixel")
    return m


def _check_n_iter(n_iter):
    if isinstance(n_iter, bool) or not isinstance(n_iter, (int, np.integer)) or n_iter < 1:
        raise IterativeError(f"n_iter: expected an integer >= 1, got {n_iter!r}")
    return int(n_iter)


def _initial(x0, s, ang, center, n, nb, name="x0"):
    """x0 as float32 numpy (n, n, nb) or None (zeros)."""
    if x0 is None:
        return None
    if isinstance(x0, str):
        if x0 != "fbp":
            raise IterativeError(f"{name}: expected None, 'fbp' or an ({n}, {n}, {nb}) image, "
                                 f"got {x0!r}")
        if n != s.shape[1]:
            raise IterativeError(f"{name}: 'fbp' needs n_pixels == n_translation ({s.shape[1]}), "
                                 f"the projector has {n}; pass an image or None")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # limited-angle warning
            return np.asarray(fbp(s, ang, center=center, circle=False), np.float32)
    a = np.asarray(x0.get() if hasattr(x0, "get") else x0, dtype=np.float32)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape != (n, n, nb):
        raise IterativeError(f"{name}: expected shape ({n}, {n}, {nb}) (bins last), got "
                             f"{np.shape(x0)}")
    if not np.all(np.isfinite(a)):
        raise IterativeError(f"{name}: contains NaN or infinite values")
    return a


def _colnorm2(a):
    """Per-column squared norms of a (N, C) backend array, as float64 numpy (C,)."""
    return np.asarray(Projector.to_numpy((a * a).sum(0)), np.float64)


def _clamp0(a):
    if type(a).__module__.startswith("torch"):
        return a.clamp_(min=0)
    xp = get_xp(a)
    return xp.maximum(a, 0, out=a)


def _finish(x2, n, nb, two_d, xp, P):
    img = Projector.to_numpy(x2).reshape(n, n, nb).astype(np.float32, copy=False)
    if xp is not np:
        img = xp.asarray(img)
    return img[:, :, 0] if two_d else img


# --------------------------------------------------------------------------------------
# SIRT
# --------------------------------------------------------------------------------------

def sirt(sino, angles_deg, *, n_iter=100, center=None, nonneg=True, support="circle",
         projector=None, x0=None, callback=None, relaxation=1.0, backend=None, device="cpu"):
    """SIRT of every radial bin of a parallel-beam sinogram (astra-toolbox's algorithm).

    Parameters
    ----------
    sino : array, shape (n_angle, n_translation, n_bin) or (n_angle, n_translation)
        Sinogram (numpy or cupy; cast to float32). Units: image value x translation step.
    angles_deg : array_like, shape (n_angle,)
        Rotation angles in degrees.
    n_iter : int
        Iterations (>= 1); each is one forward and one back projection of all bins.
    center : float or None
        Rotation-axis position in translation pixels; None = ``(n_translation - 1) / 2``.
    nonneg : bool
        Clamp the image at 0 after every update (astra's ``MinConstraint = 0``).
    support : None, "circle" or array (n, n) of bool
        Pixels that may be non-zero (astra's ``ReconstructionMask``): the ray lengths
        ``A 1`` are summed over the support only and the rest stays 0. ``"circle"``
        (default): :func:`tasks.reconstruct.circle_mask`, as :func:`fbp` zeroes outside it.
    projector : tasks.projector.Projector, optional
        Reuse a projector (same angles, translation count and centre); default: a new
        one on ``backend``/``device``.
    x0 : None, "fbp" or array (n, n[, n_bin])
        Start image; None = zeros.
    callback : callable, optional
        ``callback(iteration, residual)`` after every iteration (1-based), ``residual`` =
        ``||b - A x|| / ||b||`` over all bins (float) of the image entering that
        iteration.
    relaxation : float
        ``lambda`` in ``x <- x + lambda C A' R (b - A x)``, 0 < lambda < 2 (default 1).
    backend : {"torch", "numpy", "cupy", "astra"} or None
        Projector backend when ``projector`` is None; None = torch when it imports, else
        numpy. The result does not depend on it beyond float32 rounding.
    device : str
        Torch device for the torch backend ("cpu", "cuda").

    Returns
    -------
    array, shape (n_translation, n_translation[, n_bin]), float32
        Image, bins last, rows top (largest y) to bottom, as :func:`fbp`; on the input's
        array module (numpy or cupy).

    Raises
    ------
    IterativeError
        Wrong shapes, non-finite values, bad ``n_iter``, ``support``, ``x0``,
        ``relaxation`` or a mismatched ``projector``.

    Notes
    -----
    ``R`` and ``C`` are the inverse row and column sums of the system matrix, zero where a
    sum is below 1e-6 (astra's rule). With ``support`` and ``nonneg`` this is astra's CPU
    ``SIRT`` with a ``ReconstructionMask`` and ``MinConstraint = 0`` on the ``strip``
    projector (tests/test_iterative.py compares them).
    """
    n_iter = _check_n_iter(n_iter)
    if not (0 < relaxation < 2):
        raise IterativeError(f"relaxation: expected 0 < relaxation < 2, got {relaxation!r}")
    s, two_d, xp, ang, P = _prepare(sino, angles_deg, center, projector, backend, device)
    na, nt, nb = s.shape
    n = P.n_pixels
    mask = _support_mask(support, P)
    x_init = _initial(x0, s, ang, P.center, n, nb)
    m = mask.reshape(-1, 1).astype(np.float32)
    rows = P.to_numpy(P.matvec(P.asarray(m))).astype(np.float64)            # A 1_support
    cols = P.to_numpy(P.rmatvec(P.asarray(np.ones((na * nt, 1), np.float32)))).astype(np.float64)
    R = np.where(np.abs(rows) > _EPS, 1.0 / np.where(rows == 0, 1, rows), 0.0).astype(np.float32)
    C = np.where((np.abs(cols) > _EPS) & (m > 0), relaxation / np.where(cols == 0, 1, cols),
                 0.0).astype(np.float32)
    R, C = P.asarray(R), P.asarray(C)
    b = P.asarray(s.reshape(na * nt, nb))
    bnorm = math.sqrt(max(float(_colnorm2(b).sum()), 1e-300))
    if x_init is None:
        x = P.asarray(np.zeros((n * n, nb), np.float32))
    else:
        x = P.asarray(x_init.reshape(n * n, nb) * m)
        if nonneg:
            x = _clamp0(x)
    for it in range(1, n_iter + 1):
        r = b - P.matvec(x)
        if callback is not None:
            callback(it, math.sqrt(float(_colnorm2(r).sum())) / bnorm)
        x = x + C * P.rmatvec(R * r)
        if nonneg:
            x = _clamp0(x)
    return _finish(x, n, nb, two_d, xp, P)


# --------------------------------------------------------------------------------------
# CGLS
# --------------------------------------------------------------------------------------

def cgls(sino, angles_deg, *, n_iter=20, center=None, nonneg=False, support="circle",
         projector=None, x0=None, callback=None, backend=None, device="cpu"):
    """CGLS (conjugate gradients for least squares) of every radial bin at once.

    Minimises ``||A x - b||^2`` over images supported on ``support``, one CG recursion
    per bin (every inner product is per bin, so the bins do not interact).

    Parameters
    ----------
    sino, angles_deg, center, support, projector, x0, backend, device
        As :func:`sirt`.
    n_iter : int
        CG iterations (>= 1). On noisy data CGLS semi-converges: the error to the truth
        is smallest after some tens of iterations, then noise grows.
    nonneg : bool
        Must be False: CGLS is an unconstrained Krylov method and a clamp would break the
        conjugacy of its directions. Use :func:`sirt` or :func:`tv_reconstruct` for a
        non-negative image (or clip the result).
    callback : callable, optional
        ``callback(iteration, residual)`` after every iteration, ``residual`` =
        ``||b - A x|| / ||b||`` over all bins after the update (non-increasing).

    Returns
    -------
    array, shape (n_translation, n_translation[, n_bin]), float32

    Raises
    ------
    IterativeError
        As :func:`sirt`, and ``nonneg=True``.

    Notes
    -----
    Björck (1996), Algorithm 7.4.1 (CGLS): ``r = b - A x``, ``s = p = A' r``,
    ``gamma = ||s||^2``; repeat ``q = A p``, ``alpha = gamma / ||q||^2``,
    ``x += alpha p``, ``r -= alpha q``, ``s = A' r``, ``beta = ||s||^2 / gamma``,
    ``p = s + beta p``. A bin whose ``gamma`` reaches 0 (solved, or an all-zero
    sinogram) stops updating.
    """
    n_iter = _check_n_iter(n_iter)
    if nonneg:
        raise IterativeError("nonneg: not applicable to CGLS (an unconstrained least-squares "
                             "solver; a clamp breaks conjugacy): use method 'sirt' or 'tv', "
                             "or clip the result")
    s, two_d, xp, ang, P = _prepare(sino, angles_deg, center, projector, backend, device)
    na, nt, nb = s.shape
    n = P.n_pixels
    mask = _support_mask(support, P)
    x_init = _initial(x0, s, ang, P.center, n, nb)
    m = P.asarray(mask.reshape(-1, 1).astype(np.float32))
    b = P.asarray(s.reshape(na * nt, nb))
    bnorm = math.sqrt(max(float(_colnorm2(b).sum()), 1e-300))
    if x_init is None:
        x = P.asarray(np.zeros((n * n, nb), np.float32))
        r = b.clone() if hasattr(b, "clone") else b.copy()
    else:
        x = P.asarray(x_init.reshape(n * n, nb)) * m
        r = b - P.matvec(x)
    sv = m * P.rmatvec(r)
    p = sv
    gamma = _colnorm2(sv)
    for it in range(1, n_iter + 1):
        q = P.matvec(p)
        qq = _colnorm2(q)
        alpha = np.where((qq > 0) & (gamma > 0), gamma / np.where(qq > 0, qq, 1.0), 0.0)
        a = P.asarray(alpha[None, :].astype(np.float32))
        x = x + a * p
        r = r - a * q
        sv = m * P.rmatvec(r)
        g_new = _colnorm2(sv)
        beta = np.where(gamma > 0, g_new / np.where(gamma > 0, gamma, 1.0), 0.0)
        p = sv + P.asarray(beta[None, :].astype(np.float32)) * p
        gamma = g_new
        if callback is not None:
            callback(it, math.sqrt(float(_colnorm2(r).sum())) / bnorm)
    return _finish(x, n, nb, two_d, xp, P)


# --------------------------------------------------------------------------------------
# TV-regularised reconstruction by automatic differentiation (Adorym-style)
# --------------------------------------------------------------------------------------

def _tv(u, eps):
    """Smoothed isotropic total variation of (C, n, n), summed over pixels, per channel:
    ``sum sqrt(dx^2 + dy^2 + eps^2) - eps`` with forward differences (0 at the far edge)."""
    import torch.nn.functional as F

    dx = F.pad(u[:, :, 1:] - u[:, :, :-1], (0, 1))
    dy = F.pad(u[:, 1:, :] - u[:, :-1, :], (0, 0, 0, 1))
    return (((dx * dx + dy * dy + eps * eps).sqrt() - eps)).sum(dim=(1, 2))


def tv_reconstruct(sino, angles_deg, *, loss="gaussian", lam_tv=0.01, lam_l1=0.0, n_iter=200,
                   optimizer="adam", lr=0.1, angle_batch=None, nonneg=True, support="circle",
                   x0="fbp", device="cpu", seed=0, center=None, projector=None, tv_eps=1e-3,
                   callback=None):
    """Regularised reconstruction of every radial bin by automatic differentiation.

    Minimises, independently for every bin ``k`` (the bins are the channel dimension of
    one PyTorch graph), ``D_k(x_k) + lam_tv TV(u_k) + lam_l1 ||u_k||_1`` over the pixels of
    ``support``, where ``u_k = x_k / s_k`` is the image in units of the bin's scale
    ``s_k = sum(b_k) / sum(A 1_support)`` (the mean image value over the support that
    reproduces the bin's total intensity), so one ``lam_tv`` suits strong and weak bins.

    Parameters
    ----------
    sino : array, shape (n_angle, n_translation, n_bin) or (n_angle, n_translation)
        Sinogram, float; counts for ``loss="poisson"`` (>= 0).
    angles_deg : array_like, shape (n_angle,)
    loss : {"gaussian", "poisson"}
        ``gaussian``: ``D = ||A u - b/s||^2 / (2 n_angle n)`` (least squares; ``n`` the
        image side, ``n_angle`` the angles of the minibatch). ``poisson``: the negative log-likelihood
        ``sum(l - b log l)``, ``l = A x + delta`` (``delta = 1e-6 mean(b)``), scaled by
        ``mean(b) / s^2 / (n_angle n)`` so that to second order about ``A x = mean(b)`` it
        equals the Gaussian term and ``lam_tv`` means the same for both.
    lam_tv : float
        Weight (>= 0) of the smoothed isotropic total variation
        ``sum sqrt(|grad u|^2 + tv_eps^2) - tv_eps`` (forward differences).
    lam_l1 : float
        Weight (>= 0) of ``sum |u|`` (sparsity).
    n_iter : int
        Adam: epochs (passes over all angles), each ``ceil(n_angle / angle_batch)``
        optimiser steps. L-BFGS: its ``max_iter`` (see Notes).
    optimizer : {"adam", "lbfgs"}
        ``adam``: Adam with learning rate ``lr`` (image units of ``u``, i.e. fractions of
        the bin's mean value per step) decayed by a cosine schedule to ``lr / 20``.
        ``lbfgs``: ``torch.optim.LBFGS`` with a strong-Wolfe line search, all angles
        (``angle_batch`` must be None), ``n_iter`` iterations.
    lr : float
        Adam's learning rate (> 0); L-BFGS's initial step (1 is typical; values < 1 are
        raised to 1).
    angle_batch : int or None
        Angles per Adam step (minibatch); None = all. The angles are dealt into
        ``ceil(n_angle / angle_batch)`` interleaved ordered subsets (each spanning the
        whole angular range, as the ordered subsets of Hudson & Larkin, IEEE TMI 13 (1994)
        601) visited in a random order every epoch (``seed``).
    nonneg : bool or {"project", "softplus"}
        Non-negativity: ``project`` clamps after every Adam step; ``softplus`` optimises
        ``v`` with ``u = softplus(v)``. True = ``project`` for Adam, ``softplus`` for
        L-BFGS (whose line search needs a smooth, unconstrained problem).
    support : None, "circle" or (n, n) bool mask
        As :func:`sirt`: pixels outside are 0.
    x0 : "fbp", None or array (n, n[, n_bin])
        Start: FBP of the sinogram (clamped at 0 when ``nonneg``), zeros (``None``; 1e-3 s
        with softplus) or an image.
    device : str
        Torch device ("cpu", "cuda").
    seed : int
        Seed of the subset order.
    center : float or None
        Rotation-axis position in translation pixels.
    projector : tasks.projector.Projector, optional
        A torch-backend projector to reuse.
    tv_eps : float
        Smoothing of the TV (> 0), in units of ``u``.
    callback : callable, optional
        ``callback(iteration, residual)``, ``residual`` = ``||A x - b|| / ||b||`` over all
        bins: Adam, after every epoch, accumulated over the epoch's minibatches before each
        step; L-BFGS, after every function evaluation (line-search trials included).

    Returns
    -------
    numpy.ndarray, shape (n, n[, n_bin]), float32
        Image, bins last, as :func:`tasks.reconstruct.fbp` (numpy also for cupy input).

    Raises
    ------
    IterativeError
        Bad shapes or values, unknown ``loss``/``optimizer``/``nonneg``, negative weights,
        ``angle_batch`` out of range or given with L-BFGS, negative counts for the Poisson
        loss, a projector that is not on the torch backend.

    Notes
    -----
    The bins are independent with Adam (the loss is a sum over bins and Adam's update is
    element-wise); L-BFGS shares one line search and curvature history across the bins,
    so its result depends weakly on which bins are reconstructed together. For
    ``optimizer="lbfgs"``, ``n_iter`` is L-BFGS's ``max_iter`` (each iteration one
    or a few function evaluations over all angles).
    """
    try:
        import torch
    except ImportError as err:  # pragma: no cover - torch is in the learned/dev extras
        raise IterativeError("tv_reconstruct needs torch (pip install torch)") from err
    n_iter = _check_n_iter(n_iter)
    if loss not in LOSSES:
        raise IterativeError(f"loss: expected one of {LOSSES}, got {loss!r}")
    if optimizer not in OPTIMIZERS:
        raise IterativeError(f"optimizer: expected one of {OPTIMIZERS}, got {optimizer!r}")
    for name, v in (("lam_tv", lam_tv), ("lam_l1", lam_l1)):
        if not (isinstance(v, (int, float, np.floating, np.integer)) and np.isfinite(v) and v >= 0):
            raise IterativeError(f"{name}: expected a finite weight >= 0, got {v!r}")
    if not (isinstance(lr, (int, float, np.floating)) and np.isfinite(lr) and lr > 0):
        raise IterativeError(f"lr: expected a finite learning rate > 0, got {lr!r}")
    if not (tv_eps > 0):
        raise IterativeError(f"tv_eps: expected > 0, got {tv_eps!r}")
    if nonneg is True:
        mode = "project" if optimizer == "adam" else "softplus"
    elif nonneg is False or nonneg is None:
        mode = None
    elif nonneg in ("project", "softplus"):
        mode = nonneg
    else:
        raise IterativeError(f"nonneg: expected a bool, 'project' or 'softplus', got {nonneg!r}")
    if mode == "project" and optimizer == "lbfgs":
        raise IterativeError("nonneg: 'project' does not suit L-BFGS's line search; use "
                             "'softplus' (or nonneg=True)")
    if projector is not None and getattr(projector, "backend", None) != "torch":
        raise IterativeError("projector: tv_reconstruct needs a Projector(backend='torch')")
    s, two_d, _xp, ang, P = _prepare(sino, angles_deg, center, projector, "torch", device)
    na, nt, nb = s.shape
    n = P.n_pixels
    if angle_batch is not None:
        if optimizer == "lbfgs":
            raise IterativeError("angle_batch: L-BFGS uses all angles; leave angle_batch None")
        if isinstance(angle_batch, bool) or not isinstance(angle_batch, (int, np.integer)) \
                or not 1 <= angle_batch <= na:
            raise IterativeError(f"angle_batch: expected an integer in 1..{na} (angles per step) "
                                 f"or None, got {angle_batch!r}")
    if loss == "poisson" and np.any(s < 0):
        raise IterativeError("sino: the Poisson loss needs counts >= 0 (got negative values)")
    mask = _support_mask(support, P)
    x_init = _initial(x0, s, ang, P.center, n, nb)
    dev = P.device
    dt = torch.float32

    # per-bin scale: mean image value over the support reproducing the bin's total
    ray_support = P.forward_np(mask.astype(np.float32)).astype(np.float64)       # (na, nt)
    total = s.astype(np.float64).sum(axis=(0, 1))                                # (nb,)
    scale = total / max(ray_support.sum(), 1e-12)
    scale = np.where(scale > 0, scale, np.maximum(np.abs(s).max(axis=(0, 1)), 1.0) / n)
    mean_b = np.maximum(s.astype(np.float64).mean(axis=(0, 1)), 1e-12)
    sc = torch.tensor(scale, dtype=dt, device=dev)[:, None, None]
    b_all = torch.tensor(np.ascontiguousarray(np.moveaxis(s, 2, 0)), dtype=dt, device=dev)  # (nb, na, nt)
    bn_all = b_all / sc
    m_t = torch.tensor(mask, dtype=dt, device=dev)[None]
    bnorm2 = float((b_all.double() ** 2).sum())

    # ordered subsets of angles (interleaved) and their projectors
    order = np.argsort(ang, kind="stable")
    n_sub = 1 if angle_batch is None else int(math.ceil(na / angle_batch))
    subsets = [order[k::n_sub] for k in range(n_sub)]
    projs = [P] if n_sub == 1 else [P.subset(idx) for idx in subsets]
    if n_sub == 1:
        subsets = [np.arange(na)]
    rng = np.random.default_rng(seed)

    # parameters
    if x_init is None:
        u0 = np.zeros((nb, n, n), np.float32)
    else:
        u0 = np.moveaxis(x_init, 2, 0) / scale[:, None, None].astype(np.float32)
    u0 = u0 * mask[None]
    if mode is not None:
        u0 = np.maximum(u0, 0.0)
    if mode == "softplus":
        u0 = np.maximum(u0, 1e-3)
        v0 = u0 + np.log(-np.expm1(-u0))          # inverse softplus, stable
    else:
        v0 = u0
    v = torch.tensor(np.ascontiguousarray(v0), dtype=dt, device=dev, requires_grad=True)

    def image(vv):
        u = torch.nn.functional.softplus(vv) if mode == "softplus" else vv
        return u * m_t

    pois_w = torch.tensor(mean_b / scale ** 2, dtype=dt, device=dev)
    delta = torch.tensor(1e-6 * mean_b, dtype=dt, device=dev)[:, None, None]

    def objective(u, k):
        """Loss summed over bins for subset k, and the batch's squared residual."""
        Pk = projs[k]
        idx = subsets[k]
        bn = bn_all if n_sub == 1 else bn_all[:, torch.as_tensor(idx, device=dev)]
        au = Pk.forward(u)                                        # (nb, na_k, nt)
        norm = 1.0 / (len(idx) * n)
        if loss == "gaussian":
            r = au - bn
            data = 0.5 * norm * (r * r).sum(dim=(1, 2))
            res2 = float(((r.detach() * sc) ** 2).sum())
        else:
            b = bn * sc
            lam = au * sc + delta
            nll = (lam - b * torch.log(lam)).sum(dim=(1, 2))
            data = norm * pois_w * nll
            res2 = float(((lam.detach() - delta - b) ** 2).sum())
        reg = lam_tv * _tv(u, tv_eps) if lam_tv > 0 else 0.0
        if lam_l1 > 0:
            reg = reg + lam_l1 * u.abs().sum(dim=(1, 2))
        return (data + reg).sum(), res2

    if optimizer == "adam":
        # Adam (Kingma & Ba 2015, Algorithm 1), written out: torch.optim's first use
        # imports torch._dynamo (seconds), and the clamp is folded into the step
        beta1, beta2, eps_adam = 0.9, 0.999, 1e-8
        m1 = torch.zeros_like(v)
        m2 = torch.zeros_like(v)
        total_steps = n_iter * n_sub
        step = 0
        for epoch in range(1, n_iter + 1):
            res2 = 0.0
            for k in rng.permutation(n_sub):
                frac = step / max(total_steps - 1, 1)
                lr_t = float(lr) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
                v.grad = None
                f, r2 = objective(image(v), int(k))
                f.backward()
                step += 1
                with torch.no_grad():
                    g = v.grad
                    m1.mul_(beta1).add_(g, alpha=1 - beta1)
                    m2.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    denom = (m2 / (1 - beta2 ** step)).sqrt_().add_(eps_adam)
                    v.addcdiv_(m1, denom, value=-lr_t / (1 - beta1 ** step))
                    if mode == "project":
                        v.clamp_(min=0)
                res2 += r2
            if callback is not None:
                callback(epoch, math.sqrt(res2 / max(bnorm2, 1e-300)))
    else:
        # torch.optim.LBFGS (Nocedal & Wright, Numerical Optimization, 2nd ed., Alg. 7.4,
        # with a strong-Wolfe line search); non-negativity through the softplus
        opt = torch.optim.LBFGS([v], lr=max(float(lr), 1.0), max_iter=n_iter,
                                max_eval=int(n_iter * 1.5) + 5, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-10,
                                tolerance_change=1e-14)
        state = {"it": 0}

        def closure():
            opt.zero_grad(set_to_none=True)
            f, r2 = objective(image(v), 0)
            f.backward()
            state["it"] += 1
            if callback is not None:
                callback(state["it"], math.sqrt(r2 / max(bnorm2, 1e-300)))
            return f

        opt.step(closure)

    with torch.no_grad():
        out = (image(v) * sc).detach().cpu().numpy()
    out = np.ascontiguousarray(np.moveaxis(out, 0, 2), dtype=np.float32)
    return out[:, :, 0] if two_d else out


# --------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------

def reconstruct(sino, angles_deg, method, *, center=None, **options):
    """Iterative reconstruction of all bins of a slice, by method name.

    Parameters
    ----------
    sino : array, shape (n_angle, n_translation[, n_bin])
    angles_deg : array_like, shape (n_angle,)
    method : {"sirt", "cgls", "tv"}
        :func:`sirt`, :func:`cgls` or :func:`tv_reconstruct`.
    center : float or None
        Rotation-axis position in translation pixels.
    **options
        Keyword arguments of the chosen function (``n_iter``, ``support``, ``lam_tv``, ...),
        passed as given (``None`` keeps its meaning, e.g. ``support=None`` = all pixels).

    Returns
    -------
    array, shape (n, n[, n_bin]), float32

    Raises
    ------
    IterativeError
        Unknown method or an option the method does not take (named), and the method's
        own errors.
    """
    funcs = {"sirt": sirt, "cgls": cgls, "tv": tv_reconstruct}
    if method not in funcs:
        raise IterativeError(f"method: expected one of {METHODS}, got {method!r}")
    f = funcs[method]
    import inspect

    allowed = set(inspect.signature(f).parameters) - {"sino", "angles_deg"}
    bad = sorted(set(options) - allowed)
    if bad:
        raise IterativeError(f"options: {', '.join(bad)} not accepted by method {method!r} "
                             f"(accepted: {', '.join(sorted(allowed))})")
    return f(sino, angles_deg, center=center, **options)
