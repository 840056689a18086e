"""Self-supervised GAN reconstruction of parallel-beam sinograms (no training data).

Method
------
GANrec (X. Yang, M. Kahnt, D. Brückner, A. Schropp, Y. Fam, J. Becher, J.-D. Grunwaldt,
T. L. Sheppard, C. G. Schroer, "Tomographic reconstruction with a generative adversarial
network", J. Synchrotron Rad. 27 (2020) 486-493; public code github.com/XYangXRay/ganrec):
a generator ``G`` maps a fixed input to an image ``x = G(input)``; a differentiable forward
projector ``A`` turns it into a sinogram ``A x``; a discriminator ``D`` is trained to tell
the measured sinogram ``y`` from ``A x``, and the generator is trained on

    L_G = lam_adv * BCE(D(A x), real) + lam_data * mean |A x - y|   (L1, GANrec; or L2)
    L_D = BCE(D(y), real) + BCE(D(A x), fake)

(the sinograms in both terms divided by ``max |y|``; GANrec normalises likewise)

with Adam, generator learning rate ``lr`` and discriminator ``lr * d_lr_ratio`` (GANrec's
``GANtomo`` defaults: ``l1_ratio = 100``, g 1e-3, d 1e-5). Both networks are fitted to the
one slice being reconstructed, from random weights (seeded): nothing is learned from other
data. The network itself is the regulariser (a deep-image-prior effect; D. Ulyanov et al.,
CVPR 2018) together with non-negativity and the reconstruction circle.

Two generator inputs (``start``):

* ``"sinogram"`` (GANrec): the normalised sinogram, flattened, through fully connected
  layers (GANrec: 3 x 128 units then ``n*n``; here 2 x 128) reshaped to the image and
  refined by a few 3x3 convolutions (GANrec: 3 conv + 3 transposed conv of 32 filters;
  here 3 conv of 16 filters).
* ``"fbp"`` (Butler, Dong, Vamvakeros, Jacques, AI3SD report on learned XRD-CT
  reconstruction): the FBP image through a small two-level U-Net whose output is *added*
  to the FBP image (residual learning; the last layer starts at zero, so iteration 0 is
  the FBP image through the output non-linearity).

Non-negativity: the output goes through ``softplus(beta = 50)`` in units of the 99.5th
percentile of the FBP image (a ReLU output that hits 0 everywhere loses its gradient for
good); a zero pixel therefore reads about 1.4 % of that percentile. Pixels outside the
reconstruction circle are 0, as :func:`tasks.reconstruct.fbp` with ``circle=True``.
If the adversarial game diverges (the final data residual over twice the lowest seen),
the image of lowest residual is returned and ``info["diverged"]`` says so.

Measured (``benchmarks/bench_gan.py``, 64 x 64 shapes phantom, 200 iterations): the FBP
start beats FBP at every setting (+2.1 to +2.7 dB PSNR at full, 1/2 and 1/4 of 96 angles
with 1 % and 5 % noise); the sinogram start beats FBP only at 1/4 of the angles (+1.6 dB
at 1 % noise, +2.4 dB at 5 %) and is worse at full and 1/2 angles (-1.6 to -3.4 dB, though
with a higher SSIM at 1 % noise). The adversarial term changed PSNR by <= 0.1 dB except
one setting (sinogram start, 1/4 angles, 5 % noise: +0.8 dB) and costs about half the
time: the network prior does the work. Nothing stops the fit at the noise level, so with
strong noise longer runs fit the noise (``n_iter`` is the regularisation knob); the
sinogram start varies by about +-1 dB with the seed.

Sizes are shrunk from GANrec so that a slice runs in seconds on one CPU core: 64 x 64
pixels, 96 angles, 200 iterations took 8 s of CPU time with the discriminator and 4.6 s
without (``lam_adv = 0``), torch 2.13 CPU, one thread (``benchmarks/bench_gan.py``).

Conventions
-----------
Sinograms ``(n_angle, n_translation[, n_bin])``, images ``(n, n[, n_bin])`` with
``n = n_translation``, in the orientation of :func:`tasks.reconstruct.fbp` (same scale:
``radon(image) ~ sino``). Channels (radial bins, or components of a decomposition) are
reconstructed one at a time, each with its own networks (GANrec is a per-slice method).

The projector is ``tasks.projector.Projector`` (``forward``: torch ``(C, ny, nx)`` ->
``(C, n_angle, n_translation)``, differentiable).
"""

from __future__ import annotations

import time

import numpy as np

from tasks.reconstruct import ReconstructionError, circle_mask, fbp

__all__ = ["GanError", "gan_reconstruct", "gan_reconstruct_components", "decompose",
           "STARTS", "LOSSES"]

STARTS = ("fbp", "sinogram")
LOSSES = ("l1", "l2")
DECOMPOSITIONS = ("nmf", "svd")
_SOFTPLUS_BETA = 50.0
_DIVERGED = 2.0     # final residual / lowest residual above which the fit counts as diverged
_BETAS = (0.9, 0.999)   # Adam: Keras defaults, as GANrec


class GanError(ReconstructionError):
    """Bad input to the GAN reconstruction; the message names the argument."""


# --------------------------------------------------------------------------------------
# networks
# --------------------------------------------------------------------------------------

def _torch():
    try:
        import torch
    except ImportError as err:   # pragma: no cover - torch is in the learned/dev extras
        raise GanError("gan: PyTorch is not importable; install the 'learned' extra "
                       "(pip install 'xrdct[learned]')") from err
    return torch


def _make_nets(start, n_angle, n, width):
    """Generator and discriminator modules (built inside the caller's seeded RNG)."""
    torch = _torch()
    nn = torch.nn

    def conv(cin, cout):
        return nn.Conv2d(cin, cout, 3, padding=1)

    class SinoGenerator(nn.Module):
        """GANrec's generator, shrunk: FC layers from the flattened sinogram to the
        image grid, then 3x3 convolutions."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Sequential(nn.Flatten(), nn.Linear(n_angle * n, 128), nn.LeakyReLU(0.2),
                                    nn.Linear(128, 128), nn.LeakyReLU(0.2), nn.Linear(128, n * n))
            self.conv = nn.Sequential(conv(1, width), nn.LeakyReLU(0.2), conv(width, width),
                                      nn.LeakyReLU(0.2), conv(width, 1))
            # start from a flat positive image (a ReLU output that starts <= 0 has no gradient)
            nn.init.constant_(self.conv[-1].bias, 0.3)

        def forward(self, s):                       # s: (1, 1, n_angle, n)
            x = self.fc(s).reshape(1, 1, n, n)
            return self.conv(x)

    class ResUNet(nn.Module):
        """Two-level U-Net; returns ``input + residual`` (last layer zero at start)."""

        def __init__(self):
            super().__init__()
            w, w2 = width, 2 * width
            self.enc = nn.Sequential(conv(1, w), nn.LeakyReLU(0.2), conv(w, w), nn.LeakyReLU(0.2))
            self.mid = nn.Sequential(conv(w, w2), nn.LeakyReLU(0.2), conv(w2, w2), nn.LeakyReLU(0.2))
            self.dec = nn.Sequential(conv(w + w2, w), nn.LeakyReLU(0.2))
            self.out = conv(w, 1)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

        def forward(self, x):                       # x: (1, 1, n, n)
            e = self.enc(x)
            m = self.mid(nn.functional.avg_pool2d(e, 2))
            u = nn.functional.interpolate(m, size=e.shape[-2:], mode="bilinear",
                                          align_corners=False)
            return x + self.out(self.dec(torch.cat([e, u], dim=1)))

    class Discriminator(nn.Module):
        """Small convolutional discriminator on sinograms (GANrec's, shrunk): strided
        4x4 convolutions, global average, one logit."""

        def __init__(self):
            super().__init__()
            w = max(4, width // 2)
            self.body = nn.Sequential(
                nn.Conv2d(1, w, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
                nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
                nn.Conv2d(2 * w, 4 * w, 3, stride=1, padding=1), nn.LeakyReLU(0.2))
            self.head = nn.Linear(4 * w, 1)

        def forward(self, s):                       # s: (1, 1, n_angle, n)
            return self.head(self.body(s).mean(dim=(2, 3)))

    gen = SinoGenerator() if start == "sinogram" else ResUNet()
    return gen, Discriminator()


def _make_projector(angles_deg, n_translation, center, device):
    try:
        from tasks.projector import Projector
    except ImportError as err:
        raise GanError("gan: tasks.projector (the differentiable forward projector) is not "
                       "importable") from err
    return Projector(angles_deg, n_translation, center=center, backend="torch", device=device)


# --------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------

def _check_args(sino, angles_deg, start, n_iter, lr, lam_data, loss, d_lr_ratio, lam_adv,
                width, channels):
    a = np.asarray(sino)
    if a.ndim not in (2, 3):
        raise GanError(f"sino: expected a (angle, translation) or (angle, translation, "
                       f"channel) array, got shape {a.shape}")
    if a.shape[0] < 2 or a.shape[1] < 4:
        raise GanError(f"sino: needs at least 2 angles and 4 translation columns, got shape "
                       f"{a.shape}")
    if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise GanError(f"sino: expected a real numeric array, got dtype {a.dtype}")
    a = a.astype(np.float32, copy=False)
    if not np.all(np.isfinite(a)):
        raise GanError("sino: contains NaN or infinite values")
    ang = np.asarray(angles_deg, dtype=np.float64).ravel()
    if ang.size != a.shape[0]:
        raise GanError(f"angles_deg: expected {a.shape[0]} angles (one per sinogram row), "
                       f"got {ang.size}")
    if not np.all(np.isfinite(ang)):
        raise GanError("angles_deg: angles must be finite (degrees)")
    if start not in STARTS:
        raise GanError(f"start: expected one of {STARTS}, got {start!r}")
    if loss not in LOSSES:
        raise GanError(f"loss: expected one of {LOSSES}, got {loss!r}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, (int, np.integer)) or n_iter < 1:
        raise GanError(f"n_iter: expected an integer >= 1, got {n_iter!r}")
    for name, v in (("lr", lr), ("d_lr_ratio", d_lr_ratio)):
        if not (isinstance(v, (int, float, np.floating)) and np.isfinite(v) and v > 0):
            raise GanError(f"{name}: expected a finite number > 0, got {v!r}")
    for name, v in (("lam_data", lam_data), ("lam_adv", lam_adv)):
        if not (isinstance(v, (int, float, np.floating)) and np.isfinite(v) and v >= 0):
            raise GanError(f"{name}: expected a finite number >= 0, got {v!r}")
    if lam_data == 0 and lam_adv == 0:
        raise GanError("lam_data: lam_data and lam_adv are both 0; nothing to fit")
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 2:
        raise GanError(f"width: expected an integer >= 2 (convolution filters), got {width!r}")
    if a.ndim == 2:
        if channels is not None:
            raise GanError("channels: only for a 3D (angle, translation, channel) sinogram")
        chans = [None]
    else:
        nb = a.shape[2]
        if channels is None:
            chans = list(range(nb))
        else:
            c = np.asarray(channels).ravel()
            if c.size == 0 or not np.issubdtype(c.dtype, np.integer):
                raise GanError(f"channels: expected a non-empty sequence of integer indices "
                               f"into the last axis (0..{nb - 1}), got {channels!r}")
            if np.any(c < -nb) or np.any(c >= nb):
                raise GanError(f"channels: indices must lie in [{-nb}, {nb - 1}], got {channels!r}")
            chans = [int(i) % nb for i in c]
    return a, ang, chans


# --------------------------------------------------------------------------------------
# one channel
# --------------------------------------------------------------------------------------

def _reconstruct_one(s2d, ang, proj, mask_t, *, start, n_iter, lr, lam_data, lam_adv, loss,
                     d_lr_ratio, width, nonneg, center, device, seed, callback, channel):
    torch = _torch()
    na, n = s2d.shape
    t0 = time.perf_counter()
    f = fbp(s2d, ang, center=center)                                     # (n, n) float32
    inside = np.abs(f[mask_t[0].cpu().numpy() > 0])
    img_scale = float(np.percentile(inside, 99.5)) if inside.size else 0.0
    sino_scale = float(np.max(np.abs(s2d)))
    if img_scale <= 0 or sino_scale <= 0:                                # all-zero data
        return np.zeros((n, n), np.float32), {"data_residual": [0.0], "iterations": 0,
                                              "diverged": False,
                                              "seconds": time.perf_counter() - t0}
    y = torch.from_numpy(np.ascontiguousarray(s2d / sino_scale, np.float32)).to(device)[None]
    op_scale = img_scale / sino_scale          # A_n u = A (u * img_scale) / sino_scale
    if start == "fbp":
        g_in = torch.from_numpy(np.ascontiguousarray(f / img_scale, np.float32)).to(device)[None, None]
    else:
        g_in = y[None]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen, disc = _make_nets(start, na, n, width)
    gen.to(device)
    disc.to(device)
    opt_g = torch.optim.Adam(gen.parameters(), lr=lr, betas=_BETAS)
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr * d_lr_ratio, betas=_BETAS)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    one = torch.ones(1, 1, device=device)
    zero = torch.zeros(1, 1, device=device)
    y_norm = float(torch.linalg.vector_norm(y))

    def image(out):
        # softplus, not ReLU: a ReLU output that goes <= 0 everywhere has no gradient and
        # stays 0 for good (seen at lr 3e-3); softplus keeps a (small) gradient, which
        # Adam rescales, so the fit recovers. beta 50 in units of the 99.5th percentile
        # of the FBP image: 0 maps to 1.4e-2, -0.1 to 1.3e-4.
        u = out[:, 0]
        if nonneg:
            u = torch.nn.functional.softplus(u, beta=_SOFTPLUS_BETA)
        return u * mask_t

    hist = []
    stopped = n_iter
    best = (np.inf, None)       # lowest data residual seen: the fallback if the GAN diverges
    for it in range(n_iter):
        u = image(gen(g_in))                                             # (1, n, n)
        p = proj.forward(u) * op_scale                                   # (1, na, n)
        r = p - y
        data = r.abs().mean() if loss == "l1" else (r * r).mean()
        if lam_adv > 0:
            adv = bce(disc(p[None]), one)
            g_loss = lam_adv * adv + lam_data * data
        else:
            adv = torch.zeros((), device=device)
            g_loss = lam_data * data
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        if lam_adv > 0:
            d_loss = bce(disc(y[None]), one) + bce(disc(p.detach()[None]), zero)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        rel = float(torch.linalg.vector_norm(r.detach())) / y_norm
        hist.append(rel)
        if rel < best[0]:
            best = (rel, u.detach().clone())
        if callback is not None and callback({"channel": channel, "iteration": it,
                                              "data_residual": rel, "data_loss": data.item(),
                                              "adv_loss": adv.item()}):
            stopped = it + 1
            break
    with torch.no_grad():
        u = image(gen(g_in))
        rel = float(torch.linalg.vector_norm(proj.forward(u) * op_scale - y)) / y_norm
    hist.append(rel)
    # adversarial training can diverge late (the discriminator wins and the generator's
    # image collapses; seen at lr 3e-3): then the iterate of lowest residual is returned
    diverged = best[1] is not None and rel > _DIVERGED * best[0]
    if diverged:
        u = best[1]
    img = (u[0].cpu().numpy() * img_scale).astype(np.float32)
    return img, {"data_residual": hist, "seconds": time.perf_counter() - t0,
                 "iterations": stopped, "diverged": bool(diverged)}


def gan_reconstruct(sino, angles_deg, *, start="fbp", n_iter=300, lr=1e-3, lam_data=100.0,
                    center=None, device="cpu", seed=0, channels=None, callback=None,
                    loss="l1", lam_adv=1.0, d_lr_ratio=0.01, width=16, nonneg=True,
                    projector=None):
    """Self-supervised GAN reconstruction (GANrec) of every selected channel of a sinogram.

    Parameters
    ----------
    sino : numpy.ndarray, shape (n_angle, n_translation) or (n_angle, n_translation, n_bin)
        Sinogram, real (cast to float32), finite; the last axis holds channels (radial bins,
        or decomposition components).
    angles_deg : array_like, shape (n_angle,)
        Rotation angles in degrees.
    start : {"fbp", "sinogram"}
        Generator input: ``"fbp"`` the FBP image with a residual U-Net (Butler et al.,
        AI3SD), ``"sinogram"`` the sinogram through FC + conv layers (GANrec).
    n_iter : int
        Adam iterations (one generator and one discriminator step each) per channel.
    lr : float
        Generator learning rate (Adam, betas 0.9, 0.999 as GANrec); GANrec uses 1e-3.
    lam_data : float
        Weight of the data term; GANrec's ``l1_ratio`` (100 for tomography). The data term
        is on the sinogram normalised by its maximum.
    center : float or None
        Rotation-axis position in translation pixels, as :func:`tasks.reconstruct.fbp`.
    device : str
        torch device for the networks and projector ("cpu", "cuda", ...).
    seed : int
        Seeds the weight initialisation; the same seed (and thread count) gives the same
        image.
    channels : sequence of int, optional
        Indices into the last axis of a 3D ``sino`` to reconstruct (default all); not
        allowed for a 2D ``sino``.
    callback : callable, optional
        Called after every iteration with a dict ``channel, iteration, data_residual,
        data_loss, adv_loss``; a true return value stops that channel early.
    loss : {"l1", "l2"}
        Data term: mean absolute (GANrec) or mean squared residual.
    lam_adv : float
        Weight of the adversarial term (GANrec: 1); 0 turns the discriminator off (the
        network prior alone, a deep image prior).
    d_lr_ratio : float
        Discriminator learning rate as a fraction of ``lr`` (GANrec: 1e-5 / 1e-3 = 0.01;
        a faster discriminator made the generator collapse in our tests).
    width : int
        Convolution filters of the first generator level (discriminator: half).
    nonneg : bool
        ReLU on the output (intensities are >= 0). Off for signed inputs (SVD components).
    projector : object, optional
        Forward projector with ``forward(x)``: torch ``(1, n, n)`` -> ``(1, n_angle,
        n_translation)``; default ``tasks.projector.Projector(angles_deg, n_translation,
        center=center, backend="torch", device=device)``.

    Returns
    -------
    image : numpy.ndarray, shape (n, n) or (n, n, len(channels)), float32
        ``n = n_translation``; same orientation and scale as :func:`fbp`; zero outside the
        reconstruction circle; >= 0 when ``nonneg``. A 3D ``sino`` gives the selected
        channels in the order of ``channels``.
    info : dict
        ``channels`` (list of indices, ``[None]`` for 2D), ``seconds`` (wall time per
        channel, list of float, FBP and network set-up included), ``data_residual`` (per
        channel, the list of relative residuals ``||A x - y|| / ||y||`` at every iteration
        and after the last), ``iterations`` (per channel), ``diverged`` (per channel: the
        final residual was over twice the lowest one seen, e.g. a collapse of the
        adversarial game, and the image of lowest residual was returned instead of the
        last), ``start``, ``n_iter``, ``lr``, ``lam_data``, ``loss``, ``lam_adv``, ``seed``.

    Raises
    ------
    GanError
        (a ``ValueError``) wrong shapes or dtype, non-finite values, angle count, unknown
        ``start``/``loss``, non-positive ``n_iter``/``lr``, bad ``channels``, torch or the
        projector not importable.

    Notes
    -----
    Yang et al., J. Synchrotron Rad. 27 (2020) 486 (GANrec); see the module docstring.
    Nothing is trained beforehand; the result depends on ``n_iter`` (early stopping is part
    of the regularisation with noisy data).
    """
    a, ang, chans = _check_args(sino, angles_deg, start, n_iter, lr, lam_data, loss,
                                d_lr_ratio, lam_adv, width, channels)
    torch = _torch()
    na, n = a.shape[:2]
    try:
        mask = circle_mask(n, center)
    except ReconstructionError as err:
        raise GanError(str(err)) from err
    proj = projector if projector is not None else _make_projector(ang, n, center, device)
    mask_t = torch.from_numpy(mask.astype(np.float32)).to(device)[None]
    out = np.zeros((n, n, len(chans)), np.float32)
    info = {"channels": chans, "seconds": [], "data_residual": [], "iterations": [],
            "diverged": [],
            "start": start, "n_iter": int(n_iter), "lr": float(lr), "lam_data": float(lam_data),
            "loss": loss, "lam_adv": float(lam_adv), "seed": int(seed)}
    for k, c in enumerate(chans):
        s2d = a if c is None else a[:, :, c]
        img, one = _reconstruct_one(
            s2d, ang, proj, mask_t, start=start, n_iter=int(n_iter), lr=float(lr),
            lam_data=float(lam_data), lam_adv=float(lam_adv), loss=loss,
            d_lr_ratio=float(d_lr_ratio), width=int(width), nonneg=bool(nonneg),
            center=center, device=device, seed=int(seed), callback=callback, channel=c)
        out[:, :, k] = img
        info["seconds"].append(one["seconds"])
        info["data_residual"].append(one["data_residual"])
        info["iterations"].append(one["iterations"])
        info["diverged"].append(one["diverged"])
    return (out[:, :, 0] if a.ndim == 2 else out), info


# --------------------------------------------------------------------------------------
# components of a decomposition
# --------------------------------------------------------------------------------------

def _nmf_numpy(x, k, n_iter, seed):
    """NMF ``x ~ w @ h`` (Frobenius, Lee & Seung multiplicative updates, NIPS 2000),
    started from the absolute values of the truncated SVD (as NNDSVDa; Boutsidis &
    Gallopoulos, Pattern Recognit. 41 (2008) 1350)."""
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    w = np.abs(u[:, :k]) * np.sqrt(s[:k])
    h = np.abs(vt[:k]) * np.sqrt(s[:k])[:, None]
    avg = float(np.sqrt(x.mean() / k)) if x.mean() > 0 else 1e-6
    w[w == 0] = avg * 1e-2
    h[h == 0] = avg * 1e-2
    eps = np.finfo(np.float64).tiny
    for _ in range(n_iter):
        h *= (w.T @ x) / (w.T @ w @ h + eps)
        w *= (x @ h.T) / (w @ (h @ h.T) + eps)
    return w, h


def decompose(sino_cube, n_components, *, method="nmf", seed=0, max_iter=500):
    """Split a sinogram cube into component sinograms and their spectra (patterns).

    ``X[(angle, translation), bin] ~ W[(angle, translation), k] @ H[k, bin]``; since
    projection is linear, reconstructing each component sinogram ``W[:, k]`` and
    recombining with ``H`` gives the volume.

    Parameters
    ----------
    sino_cube : numpy.ndarray, shape (n_angle, n_translation, n_bin)
    n_components : int
        1 <= n_components <= min(n_angle * n_translation, n_bin).
    method : {"nmf", "svd"}
        ``"nmf"``: non-negative matrix factorisation of the cube clipped at 0,
        scikit-learn's ``NMF(init="nndsvda")`` when scikit-learn is installed, else a
        numpy implementation (multiplicative updates from an SVD start). ``"svd"``: the
        truncated (uncentred) SVD, numpy; components are signed.
    seed : int
        Random state of scikit-learn's NMF (the numpy paths are deterministic).
    max_iter : int
        NMF iterations.

    Returns
    -------
    comp_sinos : numpy.ndarray, shape (n_angle, n_translation, n_components), float32
    spectra : numpy.ndarray, shape (n_components, n_bin), float32
        Each row scaled to a maximum absolute value of 1 (the intensity is in
        ``comp_sinos``).
    info : dict
        ``method``, ``backend`` ("sklearn" or "numpy"), ``rel_error`` (relative Frobenius
        error of the factorisation).

    Raises
    ------
    GanError
        Not a 3D finite array, bad ``n_components`` or ``method``.
    """
    x3 = np.asarray(sino_cube)
    if x3.ndim != 3 or not np.issubdtype(x3.dtype, np.number):
        raise GanError(f"sino_cube: expected a numeric (angle, translation, bin) array, got "
                       f"shape {x3.shape}")
    if not np.all(np.isfinite(x3)):
        raise GanError("sino_cube: contains NaN or infinite values")
    na, nt, nb = x3.shape
    if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)) or \
            not 1 <= n_components <= min(na * nt, nb):
        raise GanError(f"n_components: expected an integer in [1, {min(na * nt, nb)}], got "
                       f"{n_components!r}")
    if method not in DECOMPOSITIONS:
        raise GanError(f"method: expected one of {DECOMPOSITIONS}, got {method!r}")
    k = int(n_components)
    x = x3.reshape(na * nt, nb).astype(np.float64)
    backend = "numpy"
    if method == "svd":
        u, s, vt = np.linalg.svd(x, full_matrices=False)
        w, h = u[:, :k] * s[:k], vt[:k]
    else:
        x = np.clip(x, 0, None)
        try:
            from sklearn.decomposition import NMF
        except ImportError:
            w, h = _nmf_numpy(x, k, int(max_iter), seed)
        else:
            backend = "sklearn"
            model = NMF(n_components=k, init="nndsvda", random_state=seed, max_iter=int(max_iter))
            w = model.fit_transform(x)
            h = model.components_
    scale = np.max(np.abs(h), axis=1)
    scale[scale == 0] = 1.0
    h = h / scale[:, None]
    w = w * scale[None, :]
    err = float(np.linalg.norm(x - w @ h) / max(np.linalg.norm(x), 1e-30))
    return (w.reshape(na, nt, k).astype(np.float32), h.astype(np.float32),
            {"method": method, "backend": backend, "rel_error": err})


def gan_reconstruct_components(sino_cube, angles_deg, n_components, *, method="nmf",
                               decompose_seed=0, **kwargs):
    """GAN reconstruction of the components of a decomposed sinogram cube.

    The cube is factorised by :func:`decompose`; each component sinogram is reconstructed
    by :func:`gan_reconstruct` (``nonneg`` follows the method: on for NMF, off for the
    signed SVD components unless given).

    Parameters
    ----------
    sino_cube : numpy.ndarray, shape (n_angle, n_translation, n_bin)
    angles_deg : array_like, shape (n_angle,)
    n_components : int
    method : {"nmf", "svd"}
        See :func:`decompose`.
    decompose_seed : int
        ``seed`` of :func:`decompose`.
    **kwargs
        Passed to :func:`gan_reconstruct` (``start``, ``n_iter``, ``lr``, ``lam_data``,
        ``center``, ``device``, ``seed``, ...); ``channels`` is not allowed.

    Returns
    -------
    images : numpy.ndarray, shape (n, n, n_components), float32
        Component images; the volume is ``images @ spectra`` (shape (n, n, n_bin)).
    spectra : numpy.ndarray, shape (n_components, n_bin), float32
    info : dict
        :func:`gan_reconstruct`'s info plus ``decomposition`` (:func:`decompose`'s info).

    Raises
    ------
    GanError
        As :func:`decompose` and :func:`gan_reconstruct`; ``channels`` given.
    """
    if "channels" in kwargs:
        raise GanError("channels: not accepted by gan_reconstruct_components (every "
                       "component is reconstructed)")
    comp, spectra, dinfo = decompose(sino_cube, n_components, method=method, seed=decompose_seed)
    kwargs.setdefault("nonneg", method == "nmf")
    images, info = gan_reconstruct(comp, angles_deg, **kwargs)
    info["decomposition"] = dinfo
    return images, spectra, info
