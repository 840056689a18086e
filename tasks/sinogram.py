"""Sinogram corrections before reconstruction: per-angle scaling, air-scatter removal and
centre-of-rotation finding / correction.

Arrays are ``(angle, translation[, radial])`` float32 with angles in degrees; the centre of
rotation is given in translation-pixel coordinates (0 = first column, a perfectly centred
sinogram of ``n`` columns has its axis at ``(n - 1) / 2``), the convention of
:mod:`tasks.reconstruct`. A projection at ``theta + 180`` is the mirror image, about the
axis ``c``, of the projection at ``theta``: ``p(theta + 180, t) = p(theta, 2 c - t)``.

Methods
-------
* Centre of rotation, ``vo``: N. T. Vo, M. Drakopoulos, R. C. Atwood and C. Reinhard,
  "Reliable method for calculating the center of rotation in parallel-beam tomography",
  Opt. Express 22 (2014) 19078. The 180-degree sinogram stacked on its mirror image about a
  trial centre is a 360-degree sinogram; for the right centre its 2D Fourier transform has
  no energy inside a double wedge. The mean Fourier amplitude in that region is minimised:
  coarse on a block-averaged sinogram (<= ~256 columns; half-pixel steps, exact shifts),
  then fine at full resolution (0.1 px steps, Fourier shifts), then the vertex of a
  least-squares parabola over +-0.5 px. Written here after the paper (algotom, the
  authors' package, is not a dependency); two changes from its reference code, both
  measured on phantoms: the noise blur is a Fourier weight of the stacked sinogram (a
  spatial blur with a boundary rule biased the centre by ~0.15 px), and the wedge is sized
  from the object's measured extent instead of a fixed ratio 0.5 (a wedge narrower than
  the object let its own energy in and biased noisy data by 0.15-0.3 px).
* Centre of rotation, ``correlation``: cross-correlation of each projection with the mirror
  image of the projection 180 degrees away (one pair for a 0-180 scan, every pair for a
  0-360 scan), peak refined by a parabola.
* Centre of rotation, ``moment``: the first Helgason-Ludwig consistency condition. For an
  object inside the field of view the first moment of each projection about the axis is a
  pure sinusoid of the angle, ``sum_t (t - c) p(theta, t) = M (a cos theta + b sin theta)``
  (the centre of mass of every projection follows ``c + a cos theta + b sin theta``), so
  the constant term of a least-squares fit of ``1, cos, sin`` over the angles vanishes at
  the true ``c``. Moments are taken over a window symmetric about the trial centre (a
  constant air-scatter level then adds nothing) and the constant term's root is found by
  Newton steps. Single-bin hot spots are replaced from their translation neighbours (the
  estimate with and without that replacement with the smaller uncertainty is kept),
  projections whose moment lies far off the sinusoid (a displaced projection) are left
  out, and the standard error follows from the fit residual.
  It needs no projection pairs 180 degrees apart and no fine angular sampling, so it holds
  on coarse scans (12 angles over 180 degrees) where the Vo metric and the 0/180
  correlation are biased. References: S. Helgason, "The Radon transform" (1980); D.
  Ludwig, Comm. Pure Appl. Math. 19 (1966) 49; the centre-of-mass sinusoid as used for
  centring by e.g. S. G. Azevedo et al., IEEE Trans. Nucl. Sci. 37 (1990) 1525.
* ``auto`` (the default): ``moment``, unless the sinogram shows the object reaching the
  edge of the field of view (its moments are then not consistent); then ``vo`` with its
  search range centred on the moment estimate. Every method reports a standard
  uncertainty (:func:`find_center` with ``return_uncertainty``).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from tasks._checks import angles_array, sinogram_array
from tasks._xp import get_xp, to_numpy

__all__ = ["SinogramError", "scale_per_angle", "remove_air_scatter", "find_center", "METHODS",
           "shift_sinogram", "center_sinogram", "process_sinogram"]


class SinogramError(ValueError):
    """A sinogram or argument that cannot be processed; the message names the argument."""


def _check_sino(sino, name="sino", ndims=(2, 3)):
    return sinogram_array(sino, SinogramError, name=name, ndims=ndims, min_angles=1)


def _check_angles(angles_deg, n_angle, name="angles_deg"):
    return angles_array(angles_deg, n_angle, SinogramError, name=name)


# --------------------------------------------------------------------------------------
# intensity corrections
# --------------------------------------------------------------------------------------

def scale_per_angle(sino, *, return_factors=False):
    """Scale each angle so that every projection has the same total intensity.

    In XRD-CT the total scattered intensity summed over translation (and radial bins) is
    the same at every angle for a sample that stays in the scanned field; beam decay,
    refills and monitor drift change it. Each angle is multiplied by
    ``f_a = mean_a(T) / T_a`` with ``T_a`` the sum over translation and bins, so the mean
    level is kept.

    Parameters
    ----------
    sino : array, shape (n_angle, n_translation[, n_bin])
        Sinogram (numpy or cupy), any float dtype; not modified.
    return_factors : bool
        Also return the factors.

    Returns
    -------
    scaled : array, same shape, float32
    factors : numpy.ndarray, shape (n_angle,), float64
        Only with ``return_factors``. Angles whose total is not positive and finite (an
        empty or broken row) keep factor 1 and a ``RuntimeWarning`` names them.
    """
    s = _check_sino(sino)
    xp = get_xp(s)
    axes = tuple(range(1, s.ndim))
    tot = np.asarray(to_numpy(xp.sum(s.astype(xp.float64), axis=axes)), dtype=np.float64)
    good = np.isfinite(tot) & (tot > 0)
    factors = np.ones_like(tot)
    if good.any():
        ref = tot[good].mean()
        # guard against totals that are positive but vanishingly small (all-air rows)
        good &= tot > 1e-12 * ref
        factors[good] = ref / tot[good]
    bad = np.flatnonzero(~good)
    if bad.size:
        warnings.warn(f"scale_per_angle: {bad.size} angle(s) have no positive finite total "
                      f"intensity (rows {bad[:10].tolist()}{'...' if bad.size > 10 else ''}); "
                      "left unscaled", RuntimeWarning, stacklevel=2)
    shape = (-1,) + (1,) * (s.ndim - 1)
    out = (s * xp.asarray(factors.reshape(shape))).astype(xp.float32)
    return (out, factors) if return_factors else out


def remove_air_scatter(sino, n_columns, *, per_angle=False, return_pattern=False):
    """Subtract the air-scatter pattern measured on the outer translation columns.

    The pattern is the mean of the ``n_columns`` outermost columns on each side (``2 n``
    columns in all), which must see only air. It is subtracted from every column; nothing
    is clipped (noise can make values negative).

    Parameters
    ----------
    sino : array, shape (n_angle, n_translation[, n_bin])
        Sinogram (numpy or cupy); not modified.
    n_columns : int
        Air columns per side, ``0 <= 2 n_columns < n_translation``; 0 returns a float32
        copy and a zero pattern.
    per_angle : bool
        False (default): one pattern, averaged over all angles as well (least noise; right
        once the angles are scaled to a common beam intensity by :func:`scale_per_angle`).
        True: a pattern per angle (follows beam decay in unscaled data, but adds the noise
        of ``2 n`` columns to each row).
    return_pattern : bool
        Also return the subtracted pattern.

    Returns
    -------
    corrected : array, same shape, float32
    pattern : array, shape ([n_angle,] [n_bin]), float32
        Only with ``return_pattern``: ``(n_bin,)`` (or a scalar for 2D input) averaged over
        angles, ``(n_angle, n_bin)`` (``(n_angle,)`` for 2D input) per angle.

    Raises
    ------
    SinogramError
        ``n_columns`` negative or leaving no sample columns.
    """
    s = _check_sino(sino)
    xp = get_xp(s)
    n = int(n_columns)
    if n != n_columns or n < 0:
        raise SinogramError(f"n_columns: expected a non-negative integer, got {n_columns!r}")
    nt = s.shape[1]
    if 2 * n >= nt:
        raise SinogramError(f"n_columns: 2 x {n} air columns leave no sample columns in a "
                            f"sinogram of {nt} translation columns")
    s32 = s.astype(xp.float32)
    if n == 0:
        pat = xp.zeros((s.shape[0],) + s.shape[2:] if per_angle else s.shape[2:], xp.float32)
        return (s32.copy(), pat) if return_pattern else s32.copy()
    edge = xp.concatenate([s[:, :n], s[:, nt - n:]], axis=1).astype(xp.float64)
    pat = edge.mean(axis=1)                       # (n_angle[, n_bin])
    if not per_angle:
        pat = pat.mean(axis=0)                    # ([n_bin])
        out = s32 - pat.astype(xp.float32)[None, None]
    else:
        out = s32 - pat.astype(xp.float32)[:, None]
    pat = pat.astype(xp.float32)
    return (out, pat) if return_pattern else out


# --------------------------------------------------------------------------------------
# shifting
# --------------------------------------------------------------------------------------

def _resample(s, offset, width, method, fill):
    """out[:, k] = s(k - offset) for k = 0 .. width-1 along axis 1 (numpy or cupy)."""
    xp = get_xp(s)
    na, nt = s.shape[:2]
    rest = s.shape[2:]
    offset = float(offset)
    if method == "linear":
        pos = np.arange(width, dtype=np.float64) - offset
        i0 = np.floor(pos)
        frac = pos - i0
        if abs(offset - round(offset)) < 1e-9:            # integer shift: exact copy
            frac = np.zeros_like(frac)
            i0 = np.round(pos)
        i0 = i0.astype(np.int64)
        i1 = i0 + 1
        if fill == "edge":
            v0 = np.ones(width)
            v1 = np.ones(width)
        else:
            v0 = ((i0 >= 0) & (i0 <= nt - 1)).astype(np.float64)
            v1 = ((i1 >= 0) & (i1 <= nt - 1)).astype(np.float64)
        w0 = xp.asarray(((1.0 - frac) * v0).astype(np.float32))
        w1 = xp.asarray((frac * v1).astype(np.float32))
        g0 = s[:, xp.asarray(np.clip(i0, 0, nt - 1))]
        g1 = s[:, xp.asarray(np.clip(i1, 0, nt - 1))]
        shape = (1, width) + (1,) * len(rest)
        return (g0 * w0.reshape(shape) + g1 * w1.reshape(shape)).astype(xp.float32)
    # Fourier shift: place the data at the integer part of the offset inside a padded,
    # smoothly periodic row, multiply by the phase ramp of the fractional part, crop.
    # Trailing (bin) axes are flattened and processed in blocks of ~128 MB (float32).
    k = int(math.floor(offset))
    frac = offset - k
    margin = 16 + nt // 4
    lo = min(0, k) - margin
    hi = max(width, k + nt) + margin
    size = 1 << int(math.ceil(math.log2(hi - lo)))
    start = k - lo
    flat = s.reshape(na, nt, -1)
    nr = flat.shape[2]
    out = xp.empty((na, width, nr), dtype=xp.float32)
    ph = None
    if frac != 0.0:
        f = np.fft.rfftfreq(size)
        ph = xp.asarray(np.exp(-2j * np.pi * f * frac).astype(np.complex64))[None, :, None]
    nblend = margin                       # the right fill is at least `margin` long
    tpos = (np.arange(nblend) + 0.5) / nblend
    wgt = xp.asarray((0.5 - 0.5 * np.cos(np.pi * tpos)).astype(np.float32))[None, :, None]
    chunk = max(1, (128 * 2**20) // (na * size * 4 * 4))
    for r0 in range(0, nr, chunk):
        blk = flat[:, :, r0:r0 + chunk].astype(xp.float32)
        buf = xp.zeros((na, size, blk.shape[2]), dtype=xp.float32)
        buf[:, start:start + nt] = blk
        if fill == "edge":
            left = blk[:, :1]
            right = blk[:, nt - 1:nt]
            buf[:, :start] = left
            buf[:, start + nt:] = right
            # raised-cosine blend from the right edge value back to the left one over the
            # outer margin, so the periodic extension has no jump (no ringing)
            buf[:, size - nblend:] = right * (1 - wgt) + left * wgt
        if ph is not None:
            buf = _irfft_axis1(xp, _rfft_axis1(xp, buf) * ph, size)
        out[:, :, r0:r0 + chunk] = buf[:, -lo:-lo + width]
    return out.reshape((na, width) + rest)


def _rfft_axis1(xp, a):
    if xp is np:
        import scipy.fft as sfft

        return sfft.rfft(a, axis=1, workers=-1)
    return xp.fft.rfft(a, axis=1)


def _irfft_axis1(xp, a, n):
    if xp is np:
        import scipy.fft as sfft

        return sfft.irfft(a, n=n, axis=1, workers=-1)
    return xp.fft.irfft(a, n=n, axis=1)


def shift_sinogram(sino, shift_px, *, method="fourier", expand=True, fill="edge",
                   return_offset=False):
    """Shift a sinogram along translation by a (sub-pixel) number of columns.

    ``out(t) = sino(t - shift_px)``: a feature at column ``j`` moves to ``j + shift_px``.

    Parameters
    ----------
    sino : array, shape (n_angle, n_translation[, n_bin])
        numpy or cupy; not modified.
    shift_px : float
        Shift in translation pixels (positive: towards higher column index).
    method : {"fourier", "linear"}
        ``fourier`` (default): multiplication by a phase ramp on a zero-jump periodic
        extension (exact for band-limited data, no smoothing; may ring next to sharp
        features such as single-crystal spots). ``linear``: linear interpolation (local,
        never creates new extrema, but a fractional shift smooths: a half-pixel shift
        averages neighbours, which costs ~0.5 % relative RMS in a later FBP of a smooth
        phantom). Integer shifts are exact copies with both.
    expand : bool
        True (default): the output grows by ``ceil(|shift_px|)`` columns so that no
        measured column is dropped; for a negative shift the new columns are prepended, so
        input column ``j`` lands at ``j + shift_px + ceil(-shift_px)`` (the ``offset``
        returned with ``return_offset``). False: the width is kept and the columns shifted
        out are dropped (only for small corrections you accept to lose).
    fill : {"edge", "zero"}
        Value of columns with no measured data: the nearest measured column (``edge``,
        default; no step at the border) or 0 (right after air-scatter removal).
    return_offset : bool
        Also return ``offset``, the output position of input column 0.

    Returns
    -------
    shifted : array, shape (n_angle, n_out[, n_bin]), float32
    offset : float
        Only with ``return_offset``.

    Raises
    ------
    SinogramError
        Unknown method/fill or a non-finite shift.
    """
    s = _check_sino(sino)
    if method not in ("linear", "fourier"):
        raise SinogramError(f"method: expected 'linear' or 'fourier', got {method!r}")
    if fill not in ("edge", "zero"):
        raise SinogramError(f"fill: expected 'edge' or 'zero', got {fill!r}")
    sh = float(shift_px)
    if not math.isfinite(sh):
        raise SinogramError(f"shift_px: expected a finite number of pixels, got {shift_px!r}")
    nt = s.shape[1]
    if expand:
        e = int(math.ceil(abs(sh) - 1e-9))
        pad_left = e if sh < 0 else 0
        offset = sh + pad_left
        width = nt + e
    else:
        offset = sh
        width = nt
    out = _resample(s, offset, width, method, fill)
    return (out, offset) if return_offset else out


# --------------------------------------------------------------------------------------
# centre of rotation
# --------------------------------------------------------------------------------------

def _sorted_halves(sino, ang):
    """Split a scan into 180-degree sinograms (sorted by angle).

    Returns a list of (angles, rows) for 0-180 (one) or 0-360 (two) scans.
    """
    order = np.argsort(ang, kind="stable")
    a = ang[order]
    s = sino[order]
    step = float(np.median(np.diff(a))) if a.size > 1 else 180.0
    span = a[-1] - a[0]
    if span <= 180.0 + 0.5 * step + 1e-6:
        return [(a, s)], step
    first = a < a[0] + 180.0 - 0.5 * step
    second = ~first
    halves = [(a[first], s[first])]
    if second.sum() >= max(3, first.sum() // 2):
        halves.append((a[second], s[second]))
    return halves, step


def _wedge_mask(height, width, radius, hor_drop=None, ver_drop=1):
    """Double-wedge mask of Vo et al. (2014), Eq. 3, on the ``rfft2`` grid of a
    ``(height, width)`` stacked sinogram (rows in fftshift order, columns = non-negative
    spatial frequencies): 1 where a consistent 360-degree sinogram of an object of the
    given radius (pixels) has no Fourier energy. Column weights 2 count the mirrored
    (negative-frequency) half, so the mean equals Vo's full-plane mean."""
    du = 1.0 / width
    dv = (height - 1.0) / (height * 2.0 * np.pi)
    ndrop = min(20, int(0.05 * height)) if hor_drop is None else int(hor_drop)
    ndrop = max(ndrop, 1)
    yc = height // 2                                   # zero frequency after fftshift
    rows = np.arange(height)[:, None]
    kx = np.arange(width // 2 + 1)[None, :]
    num = np.ceil(np.abs(rows - yc) * dv / radius / du)
    mask = (kx <= num).astype(np.float64)
    mask[max(0, yc - ndrop):yc + ndrop + 1, :] = 0.0
    mask[:, :ver_drop + 1] = 0.0
    mask[:, 1:(width + 1) // 2] *= 2.0                  # columns that stand for +-kx
    return mask / (height * width)


def _gauss_weight(height, width, sigma):
    """Transfer function (rows in fftshift order, rfft columns) of a Gaussian blur with
    sigmas (rows, cols) in pixels, periodic in both axes: blurring the stacked 360-degree
    sinogram is the same as weighting its Fourier amplitudes, and needs no boundary rule at
    the 0/180 degree seams (a blur with a boundary rule biased the centre by ~0.15 px)."""
    fy = np.fft.fftshift(np.fft.fftfreq(height))[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    return np.exp(-2.0 * np.pi ** 2 * ((sigma[0] * fy) ** 2 + (sigma[1] * fx) ** 2))


def _vo_metrics(s180, centers, weight, method, batch_bytes=64 * 2**20):
    """Vo metric for each trial centre on one sorted 180-degree sinogram (float64 in)."""
    import scipy.fft as sfft

    na, n = s180.shape
    flip = s180[:, ::-1]
    comp = s180[::-1, :]
    centers = np.asarray(centers, np.float64)
    out = np.empty(centers.size)
    per = 2 * na * n * 4 * 3
    bs = max(1, min(centers.size, batch_bytes // per))
    w32 = weight.astype(np.float32)
    for k0 in range(0, centers.size, bs):
        cs = centers[k0:k0 + bs]
        mats = np.empty((cs.size, 2 * na, n), np.float32)
        mats[:, :na] = s180
        for k, c in enumerate(cs):
            sh = 2.0 * c - (n - 1)                # mirror about c = flip shifted by sh
            ref = _resample(flip, sh, n, method, "edge")
            # columns with no mirrored data: fill from the angle-reversed sinogram, as Vo's
            # reference code does, so they carry sinogram-like texture
            if sh >= 0:
                g = int(math.ceil(sh - 1e-9))
                ref[:, :g] = comp[:, :g]
            else:
                g = int(math.floor(sh + 1e-9))
                if g < 0:
                    ref[:, g:] = comp[:, g:]
            mats[k, na:] = ref
        spec = np.abs(sfft.fftshift(sfft.rfft2(mats, workers=-1), axes=1))
        out[k0:k0 + cs.size] = np.einsum("kij,ij->k", spec, w32, dtype=np.float64)
    return out


def _parabola_min(x, y, half=1):
    """Vertex of the least-squares parabola through the minimum of y and ``half``
    neighbours on each side (``half=1``: the parabola through three points). The vertex
    is kept within the fitted window."""
    i = int(np.argmin(y))
    if i == 0 or i == len(y) - 1:
        return float(x[i]), True
    h = min(half, i, len(y) - 1 - i)
    xs = np.asarray(x[i - h:i + h + 1], np.float64) - x[i]
    ys = np.asarray(y[i - h:i + h + 1], np.float64)
    a, b, _ = np.polyfit(xs, ys, 2)
    if a <= 0:
        return float(x[i]), False
    d = float(np.clip(-b / (2 * a), xs[0], xs[-1]))
    return float(x[i] + d), False


def _block_mean(s, fa, ft):
    na, n = s.shape
    na2, n2 = na // fa, n // ft
    return s[:na2 * fa, :n2 * ft].reshape(na2, fa, n2, ft).mean(axis=(1, 3))


def _object_ratio(sino, frac=0.02):
    """Upper bound of the object's diameter over the sinogram width: the farthest column
    (from the sinogram centre) whose intensity rises above the edge level by ``frac`` of
    the range, in any projection (a smoothed one, so noise does not count)."""
    from scipy import ndimage as ndi

    n = sino.shape[1]
    sm = ndi.uniform_filter(np.asarray(sino, np.float64), (3, 3), mode="nearest")
    ne = max(1, n // 32)
    bg = np.median(np.concatenate([sm[:, :ne], sm[:, n - ne:]], axis=1))
    top = sm.max()
    if not top > bg:
        return 1.0
    cols = np.flatnonzero((sm > bg + frac * (top - bg)).any(axis=0))
    if cols.size == 0:
        return 1.0
    m = (n - 1) / 2.0
    radius = max(abs(cols[0] - m), abs(cols[-1] - m)) + 2.0
    return float(np.clip(2.0 * radius / n, 0.2, 1.0))


def _find_center_vo(sino, ang, search, ratio, smooth):
    halves, _ = _sorted_halves(sino, ang)
    n = sino.shape[1]
    if ratio is None:
        ratio = _object_ratio(sino)
    lo, hi = search
    # coarse search on a block-averaged sinogram (<= ~256 columns and rows), half-pixel
    # steps of the coarse grid (exact integer mirror shifts); then a 0.1 px search at full
    # resolution around it and a parabola through the three best.
    ft = max(1, n // 256)
    radius_full = max(1.0, 0.5 * ratio * n)
    tot = None
    coarse = None
    prepared = []
    for _, s in halves:
        s = np.asarray(s, np.float64)
        fa = max(1, s.shape[0] // 256)
        sd = _block_mean(s, fa, ft)
        nd = sd.shape[1]
        # coarse-grid centre cd <-> full-resolution centre cd * ft + (ft - 1) / 2
        cd = np.arange(math.ceil(2 * (lo - (ft - 1) / 2) / ft) / 2.0,
                       math.floor(2 * (hi - (ft - 1) / 2) / ft) / 2.0 + 0.25, 0.5)
        cd = cd[(cd >= 0) & (cd <= nd - 1)]
        if cd.size == 0:
            raise SinogramError(f"search: empty centre search range {search!r}")
        hd = 2 * sd.shape[0]
        wc = _wedge_mask(hd, nd, max(1.0, 0.5 * ratio * nd))
        if smooth:
            wc = wc * _gauss_weight(hd, nd, (3.0 / fa, 1.0 / ft))
        m = _vo_metrics(sd, cd, wc, "linear")
        tot = m if tot is None else tot + m
        coarse = cd * ft + (ft - 1) / 2.0
        h = 2 * s.shape[0]
        wf = _wedge_mask(h, n, radius_full)
        if smooth:
            wf = wf * _gauss_weight(h, n, (2.0, 2.0))
        prepared.append((s, wf))
    c0 = float(coarse[int(np.argmin(tot))])
    at_edge = bool(coarse.size > 2 and c0 in (coarse[0], coarse[-1]))
    r = max(1.0, float(ft))
    fine = c0 + np.arange(-r, r + 1e-9, 0.1)
    fine = fine[(fine >= 0) & (fine <= n - 1)]
    ftot = np.zeros(fine.size)
    for s, wf in prepared:
        ftot += _vo_metrics(s, fine, wf, "fourier")
    # a parabola over +-0.5 px: the metric of real (striped, spotty) data is flat and
    # noisy near its minimum, where a three-point vertex wanders by ~0.2 px
    c, _ = _parabola_min(fine, ftot, half=5)
    return c, at_edge


def _despike(sino, k=6.0, floor=0.03, rel=0.2, smooth=False):
    """Replace single-bin positive outliers (single-crystal hot spots in the total
    intensity) along translation.

    ``smooth=False``: a bin is an outlier when it exceeds both neighbours by more than
    ``max(k sigma, floor x range, rel x (median3 - low))`` (``sigma`` the robust (MAD)
    scale of ``sino - median3``, ``range`` the 0.5-99.5 percentile span, ``low`` the 0.5
    percentile) and is replaced by the median of itself and its neighbours.
    ``smooth=True`` (finely sampled profiles): the excess over the mean of the two
    neighbours is compared with the same bounds (``sigma`` from that excess) and the bin
    is replaced by that mean; this also finds spikes on a slope. Returns (cleaned float64
    copy, number replaced)."""
    s = np.asarray(sino, np.float64)
    pad = np.pad(s, ((0, 0), (1, 1)), mode="edge")
    left, right = pad[:, :-2], pad[:, 2:]
    med = np.median(np.stack([left, s, right]), axis=0)
    ref = 0.5 * (left + right) if smooth else med
    r = s - ref
    sig = 1.4826 * float(np.median(np.abs(r - np.median(r))))
    low, high = np.percentile(s, [0.5, 99.5])
    thr = np.maximum(max(k * sig, floor * float(high - low)), rel * (med - low))
    bad = (s - (ref if smooth else np.maximum(left, right))) > thr
    out = s.copy()
    out[bad] = ref[bad]
    return out, int(bad.sum())


def _moment_weights(n, c, h):
    """Weights of the first moment about ``c`` over the window ``[c - h, c + h]`` of a
    pixel-basis projection (column ``t`` covers ``[t - 1/2, t + 1/2]``): ``w1[t] =
    integral (u - c) du`` and ``w0[t]`` = length, over the overlap of pixel and window.
    ``sum w1 = 0`` exactly, so a constant level adds nothing to the moment."""
    t = np.arange(n, dtype=np.float64)
    lo = np.clip(c - h, t - 0.5, t + 0.5)
    hi = np.clip(c + h, t - 0.5, t + 0.5)
    return 0.5 * ((hi - c) ** 2 - (lo - c) ** 2), hi - lo


def _find_center_moment(sino, ang):
    """Centre by the first-moment consistency condition (see the module docstring), on
    the sinogram as given and with hot spots replaced (:func:`_despike`); the estimate
    with the smaller uncertainty is kept (replacing genuine narrow maxima of a clean
    coarse sinogram costs ~0.01 px, leaving hot spots in up to ~0.14 px).

    Two despiking levels are tried (a strict one for coarse profiles, where genuine narrow
    maxima stand out, and a sensitive one for finely sampled profiles). Angles whose first
    moment lies more than 6 robust sigma off the fitted sinusoid are left out (up to 10 %
    of them; ``rejected_angles`` in the returned dict).

    Returns (centre px, standard uncertainty px, dict with ``hot_spots`` replaced (0 when
    the estimate on the sinogram as given was kept), ``truncated`` (the object seems to
    reach the edge of the field) and ``iterations``)."""
    na = sino.shape[0]
    th = np.deg2rad(ang)
    X = np.column_stack([np.ones(na), np.cos(th), np.sin(th)])
    if np.linalg.matrix_rank(X, tol=1e-6 * na) < 3:
        raise SinogramError("angles_deg: the moment method needs at least 3 distinct angles "
                            "(mod 180 deg)")
    sino = np.asarray(sino, np.float64)
    keep = np.ones(na, bool)
    for _ in range(3):
        best = _moment_fit(sino[keep], X[keep])
        for floor, rel, smooth in ((0.03, 0.2, False), (0.01, 0.05, True)):   # coarse / fine
            clean, n_hot = _despike(sino[keep], floor=floor, rel=rel, smooth=smooth)
            if n_hot == 0:
                continue
            fixed = _moment_fit(clean, X[keep])
            fixed[2]["hot_spots"] = n_hot
            if fixed[1] < best[1] or not math.isfinite(best[1]):
                best = fixed
        # a projection whose first moment is far off the sinusoid (displaced, a beam
        # dump, a gap) is left out and the fit repeated: 6 robust sigma, at most 10 %
        res = best[2].pop("residuals")
        idx = np.flatnonzero(keep)
        scale = 1.4826 * float(np.median(np.abs(res)))
        out = np.abs(res) > 6.0 * scale if scale > 0 else np.zeros(res.size, bool)
        if not out.any() or keep.sum() - out.sum() < max(4, int(0.9 * na)):
            break
        if np.linalg.matrix_rank(X[idx[~out]], tol=1e-6 * na) < 3:
            break
        keep[idx[out]] = False
    best[2]["rejected_angles"] = np.flatnonzero(~keep).tolist()
    return best


def _moment_fit(s, X, *, max_iter=100):
    """Root of the constant term of the first-moment fit for one sinogram ``s`` (na, n)
    and design matrix ``X`` (na, 3) = (1, cos, sin); returns (c, sigma, dict)."""
    na, n = s.shape
    xtx_inv = np.linalg.inv(X.T @ X)
    n_hot = 0
    # constant (angle-independent) component of every column, least squares over angles
    p0 = (xtx_inv @ X.T)[0] @ s
    c = (n - 1) / 2.0
    it = 0
    for it in range(1, max_iter + 1):
        h = min(c + 0.5, n - 0.5 - c)
        w1, w0 = _moment_weights(n, c, h)
        mass = float(w0 @ p0)
        if not mass > 0:
            raise SinogramError("sino2d: no positive intensity inside the field of view; "
                                "cannot find the centre of rotation")
        # alpha(c) = sum w1 p0 = M (c_true - c) for the object's mass M (a constant air
        # level adds nothing): a Newton step with the slope -M measured at this window;
        # c + alpha / mass (mass >= M: the window adds air) is the safe fallback
        alpha = float(w1 @ p0)
        m_obj = float(_moment_weights(n, c - 0.25, h)[0] @ p0
                      - _moment_weights(n, c + 0.25, h)[0] @ p0) / 0.5
        step = alpha / m_obj if m_obj > 0 and it > 1 else alpha / mass
        c = min(max(c + step, 0.0), n - 1.0)
        if abs(step) < 1e-7:
            break
    h = min(c + 0.5, n - 0.5 - c)
    w1, w0 = _moment_weights(n, c, h)
    mu1 = s @ w1                                        # first moment of every angle
    coef = xtx_inv @ (X.T @ mu1)
    res = mu1 - X @ coef
    dof = na - 3
    # slope d alpha / d c = -M (the object's mass), from a symmetric difference
    slope = float(_moment_weights(n, c - 0.25, h)[0] @ p0 - _moment_weights(n, c + 0.25, h)[0]
                  @ p0) / 0.5
    if dof > 0 and slope > 0:
        sigma = math.sqrt(max(float(res @ res) / dof * xtx_inv[0, 0], 0.0)) / slope
    else:
        sigma = float("nan")
    # the object must lie inside the window for every angle: the mean profile at the
    # field's edges must be at the air level (the lowest level of the mean profile)
    prof = s.mean(axis=0)
    ne = 1
    low = float(prof.min())
    top = float(prof.max())
    noise = 1.4826 * float(np.median(np.abs(np.diff(s, axis=1)))) / math.sqrt(2 * na)
    edge = max(float(prof[:ne].mean()), float(prof[n - ne:].mean()))
    truncated = bool(edge - low > 0.2 * (top - low) + 5.0 * noise)
    return c, sigma, {"hot_spots": n_hot, "truncated": truncated, "iterations": it,
                      "residuals": res}


def _find_center_correlation(sino, ang, search):
    order = np.argsort(ang, kind="stable")
    a = ang[order]
    s = np.asarray(sino[order], np.float64)
    na, n = s.shape
    step = float(np.median(np.diff(a))) if na > 1 else 180.0
    # pair every angle with the one nearest to it + 180 degrees
    j = np.searchsorted(a, a + 180.0)
    cand = []
    for i in range(na):
        for jj in (j[i] - 1, j[i]):
            if 0 <= jj < na and jj != i:
                cand.append((abs(a[jj] - a[i] - 180.0), i, jj))
    if not cand:
        raise SinogramError("angles_deg: the correlation method needs projections about 180 "
                            f"degrees apart; the scan covers {a[-1] - a[0]:.4g} deg. Use "
                            "method='vo'")
    best = min(c[0] for c in cand)
    if best > 1.01 * step:
        raise SinogramError(f"angles_deg: no two projections are 180 degrees apart within one "
                            f"angular step (closest pair: {180 + best:.4g} deg); use method='vo'")
    tol = max(best, 1e-6 * step) * 1.001 + 1e-9
    pairs = sorted({(i, jj) for d, i, jj in cand if d <= tol})
    if best > 0.05 * step:
        warnings.warn(f"find_center (correlation): the closest projections are "
                      f"{180 + best:.4g} deg apart, not 180; the centre can be biased for an "
                      "object off the axis (method='vo' uses the whole sinogram)",
                      RuntimeWarning, stacklevel=4)
    size = 1 << int(math.ceil(math.log2(2 * n)))
    cc = np.zeros(size)
    ne = max(1, min(4, n // 16))
    ramp = np.linspace(0.0, 1.0, n)

    def _baseline_free(row):
        # remove the straight line through the mean of the outer columns (air level), so
        # the zero padding of the correlation adds no step (a mean subtraction would, and
        # that pulls the peak towards zero shift)
        a0, a1 = row[:ne].mean(), row[n - ne:].mean()
        return row - (a0 + (a1 - a0) * ramp)

    norm = 0.0
    for i, jj in pairs:
        p = _baseline_free(s[i])
        q = _baseline_free(s[jj][::-1])
        norm += math.sqrt(float(np.dot(p, p)) * float(np.dot(q, q)))
        # q[k] = p[k + sh] with sh = 2c - (n - 1); cc[tau] = sum_k p[k + tau] q[k]
        cc += np.fft.irfft(np.fft.rfft(p, size) * np.conj(np.fft.rfft(q, size)), size)
    taus = np.arange(size)
    taus = np.where(taus >= size // 2, taus - size, taus)
    lo, hi = search
    ok = (taus >= 2 * lo - (n - 1) - 1e-9) & (taus <= 2 * hi - (n - 1) + 1e-9)
    if not ok.any():
        raise SinogramError(f"search: empty centre search range {search!r}")
    idx = np.flatnonzero(ok)
    k = idx[int(np.argmax(cc[idx]))]
    at_edge = bool(idx.size > 2 and taus[k] in (taus[idx].min(), taus[idx].max()))
    y0, y1, y2 = cc[(k - 1) % size], cc[k], cc[(k + 1) % size]
    den = y0 - 2 * y1 + y2
    d = 0.5 * (y0 - y2) / den if den < 0 else 0.0
    sh = taus[k] + float(np.clip(d, -0.5, 0.5))
    coef = y1 / norm if norm > 0 else 0.0
    if coef < 0.95:
        warnings.warn(f"find_center (correlation): the mirrored projections 180 degrees apart "
                      f"match poorly (correlation coefficient {coef:.3f} < 0.95; a bad or "
                      "missing projection?); the centre is unreliable, try method='vo'",
                      RuntimeWarning, stacklevel=4)
    return (sh + n - 1) / 2.0, at_edge


METHODS = ("auto", "moment", "vo", "correlation")


def find_center(sino2d, angles_deg, method="auto", *, search=None, ratio=None, smooth=True,
                return_uncertainty=False, return_info=False):
    """Centre of rotation of a parallel-beam sinogram, to sub-pixel precision.

    Parameters
    ----------
    sino2d : array, shape (n_angle, n_translation)
        One sinogram (for a cube, pass the sum over radial bins). numpy or cupy (copied to
        the host). Air scatter may be present (a constant level); single-bin hot spots are
        tolerated by ``moment``.
    angles_deg : array_like, shape (n_angle,)
        Angles in degrees, any order: a 0-180 scan (the 180 degree end point may or may not
        be included), a 0-360 scan, or (``moment``) any set of at least 3 angles.
    method : {"auto", "moment", "vo", "correlation"}
        ``moment``: the first-moment (centre-of-mass sinusoid) consistency condition, see
        the module docstring; exact for an object inside the field of view whatever the
        angular sampling. ``vo``: Vo et al., Opt. Express 22 (2014) 19078 (Fourier
        double-wedge metric); for a 360 scan the metrics of both halves are added; needs
        fine angular sampling. ``correlation``: cross-correlation of the projections at
        ``theta`` and ``theta + 180`` (mirrored); every such pair of a 360 scan
        contributes. Needs two projections 180 degrees apart (within one angular step; a
        warning is raised when they are more than 5 % of a step off, which biases the
        centre for off-axis objects, and when the mirrored projections correlate below
        0.95). ``auto`` (default): ``moment``, or ``vo`` when the object seems to reach the
        edge of the field of view (then the moments are not consistent; a
        ``RuntimeWarning`` says so).
    search : (float, float), optional
        ``vo`` and ``correlation``: range of centres tried, in pixels. Default: chosen from
        the scan, the moment estimate +- max(2, n/16, 6 sigma) px (or ``(n-1)/2 +- (n/4 +
        2)`` when the moment estimate is not valid). When the best centre lies at an edge
        of the range, the range is widened (up to the whole sinogram) and searched again;
        a ``RuntimeWarning`` is raised only if it is still at the edge of the sinogram.
        ``moment`` does not search; the range is only checked.
    ratio : float, optional
        ``vo`` only: object diameter over sinogram width, sets the wedge (Vo's ``ratio``).
        Default: estimated from the sinogram (the farthest column from the centre that rises
        2 % above the edge level, +2 px). A wedge narrower than the object lets the
        object's own Fourier energy into the metric, which biased the centre by ~0.15-0.3 px
        with noisy data at Vo's default 0.5 for an object 0.9 of the width.
    smooth : bool
        ``vo`` only: Gaussian noise suppression as in Vo's reference code (sigma (3, 1) px
        coarse, (2, 2) px fine, in (angle, translation)), applied as a Fourier weight.
    return_uncertainty : bool
        Also return the standard uncertainty of the centre (px). ``moment``: from the
        residual of the least-squares fit of the first moments over angles (covers noise,
        hot spots and sampling error; calibrated: rms of error / uncertainty 1.1 over 36
        noisy scans of tests/test_centre.py). ``vo`` and ``correlation``: the difference from the
        moment estimate combined with the moment's uncertainty (NaN when the moment
        estimate is not valid); a ``RuntimeWarning`` says when that difference exceeds
        ``max(1 px, 5 sigma)``.
    return_info : bool
        Also return a dict: ``method`` (the one used), ``uncertainty_px``, ``search_px``
        (final range, or None), ``hot_spots`` (bins replaced by ``moment``), ``truncated``,
        ``rejected_angles`` (rows the moment fit left out as outliers).

    Returns
    -------
    center : float
        Centre of rotation in translation pixels (0 = first column).
    uncertainty : float
        Only with ``return_uncertainty``.
    info : dict
        Only with ``return_info`` (after the uncertainty when both are asked).

    Raises
    ------
    SinogramError
        Wrong shape, angle count, method, an empty search range, fewer than 3 angles,
        no positive intensity or (correlation) no projections 180 degrees apart.
    """
    s = _check_sino(sino2d, "sino2d", ndims=(2,))
    s = np.asarray(to_numpy(s), dtype=np.float64)
    if not np.all(np.isfinite(s)):
        raise SinogramError("sino2d: contains NaN or infinite values")
    if s.shape[0] < 3:
        raise SinogramError(f"sino2d: needs at least 3 angles, got {s.shape[0]}")
    ang = _check_angles(angles_deg, s.shape[0])
    if method not in METHODS:
        raise SinogramError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    n = s.shape[1]
    if search is not None:
        lo, hi = max(float(search[0]), 0.0), min(float(search[1]), n - 1.0)
        if not lo < hi:
            raise SinogramError(f"search: expected (low, high) inside [0, {n - 1}] px, got "
                                f"{search!r}")
    try:
        cm, sm, minfo = _find_center_moment(s, ang)
        valid = not minfo["truncated"]
    except SinogramError:
        if method == "moment":
            raise
        cm, sm, valid = float("nan"), float("nan"), False
        minfo = {"hot_spots": 0, "truncated": True}
    used = method
    if method == "auto":
        used = "moment" if valid else "vo"
        if not valid:
            warnings.warn("find_center (auto): the object seems to reach the edge of the field "
                          "of view, so its moments are not consistent; using method='vo'",
                          RuntimeWarning, stacklevel=2)
    info = {"method": used, "search_px": None, "hot_spots": minfo["hot_spots"],
            "truncated": bool(minfo["truncated"]),
            "rejected_angles": minfo.get("rejected_angles", [])}
    if used == "moment":
        c, unc = cm, sm
    else:
        if search is None:
            if math.isfinite(sm):
                half = max(2.0, n / 16.0, 6.0 * sm)
                lo, hi = cm - half, cm + half
            else:
                half = n / 4.0 + 2.0
                lo, hi = (n - 1) / 2.0 - half, (n - 1) / 2.0 + half
            lo, hi = max(lo, 0.0), min(hi, n - 1.0)
        while True:
            if used == "vo":
                c, at_edge = _find_center_vo(s, ang, (lo, hi),
                                             None if ratio is None else float(ratio), smooth)
            else:
                c, at_edge = _find_center_correlation(s, ang, (lo, hi))
            if not at_edge:
                break
            width = hi - lo
            nlo = max(0.0, lo - width) if c - lo < hi - c else lo
            nhi = min(n - 1.0, hi + width) if c - lo >= hi - c else hi
            if (nlo, nhi) == (lo, hi):
                warnings.warn(f"find_center ({used}): the best centre is at the edge of the "
                              f"sinogram ({c:.4g} px of [0, {n - 1}]); the result is unreliable",
                              RuntimeWarning, stacklevel=2)
                break
            lo, hi = nlo, nhi
        info["search_px"] = (lo, hi)
        unc = math.hypot(c - cm, sm) if valid else float("nan")
        if valid and abs(c - cm) > max(1.0, 5.0 * sm):
            warnings.warn(f"find_center ({used}): {c:.4g} px is {c - cm:+.3g} px from the "
                          f"moment estimate ({cm:.4g} +- {sm:.2g} px); the {used} metric is "
                          "unreliable for this scan (too few angles or too much noise?)",
                          RuntimeWarning, stacklevel=2)
    info["uncertainty_px"] = float(unc)
    out = [float(c)]
    if return_uncertainty:
        out.append(float(unc))
    if return_info:
        out.append(info)
    return out[0] if len(out) == 1 else tuple(out)


def center_sinogram(sino, angles_deg, center="auto", method="auto", *, width=None,
                    shift_method="fourier", fill="edge", return_info=False):
    """Resample a sinogram so that the rotation axis is at its centre column.

    The output has ``m`` columns with the axis at ``(m - 1) / 2``; ``m`` is the smallest
    width that keeps every measured column (``m = ceil(2 max(c, n-1-c)) + 1``) unless
    ``width`` asks for more. Input column ``j`` lands at ``j + shift`` with
    ``shift = (m - 1) / 2 - c``; columns with no data are filled (``fill``).
    Alternatively pass ``center=c`` to :func:`tasks.reconstruct.fbp`, which needs no
    resampling but reconstructs only the circle of radius ``min(c, n-1-c)``.

    Parameters
    ----------
    sino : array, shape (n_angle, n_translation[, n_bin])
    angles_deg : array_like, shape (n_angle,)
    center : "auto" or float
        Axis position in input pixels, or ``"auto"``: :func:`find_center` on the sum over
        bins with ``method``.
    method : {"auto", "moment", "vo", "correlation"}
        See :func:`find_center`.
    width : int, optional
        Output width (e.g. one common width for all slices of a volume); must be at
        least the minimal ``m``.
    shift_method, fill
        See :func:`shift_sinogram`.
    return_info : bool
        Also return a dict ``shift_px, pad_left, pad_right, width_in, width_out``,
        ``center_uncertainty_px`` (standard uncertainty of a found centre; NaN for a given
        one) and ``center_method_used`` (the method :func:`find_center` used, or None).

    Returns
    -------
    centred : array, shape (n_angle, m[, n_bin]), float32
    center : float
        The axis position in the input's columns (found or given).
    info : dict
        Only with ``return_info``.

    Raises
    ------
    SinogramError
        A centre off the sinogram, or ``width`` too small.
    """
    s = _check_sino(sino)
    nt = s.shape[1]
    ang = _check_angles(angles_deg, s.shape[0])
    if isinstance(center, str):
        if center != "auto":
            raise SinogramError(f"center: expected 'auto' or a number of pixels, got {center!r}")
        xp = get_xp(s)
        s2 = s if s.ndim == 2 else xp.sum(s.astype(xp.float64), axis=2)
        c, unc, finfo = find_center(s2, ang, method=method, return_uncertainty=True,
                                    return_info=True)
        used = finfo["method"]
    else:
        c, unc, used = float(center), float("nan"), None
    if not (math.isfinite(c) and 0.0 <= c <= nt - 1):
        raise SinogramError(f"center: the rotation axis must lie on the sinogram, 0 <= center "
                            f"<= {nt - 1} px, got {center!r}")
    half = max(c, nt - 1 - c)
    m = int(math.ceil(2.0 * half - 1e-9)) + 1
    if width is not None:
        if int(width) < m:
            raise SinogramError(f"width: {width} columns would drop measured data; at least {m} "
                                f"are needed for centre {c:.3f} of a {nt}-column sinogram")
        m = int(width)
    shift = (m - 1) / 2.0 - c
    out = _resample(s, shift, m, shift_method, fill)
    if not return_info:
        return out, c
    info = {"shift_px": shift, "pad_left": shift, "pad_right": (m - 1) - (nt - 1 + shift),
            "width_in": nt, "width_out": m, "center_uncertainty_px": unc,
            "center_method_used": used}
    return out, c, info


# --------------------------------------------------------------------------------------
# pipeline entry point
# --------------------------------------------------------------------------------------

def process_sinogram(sino, angles_deg, spec, *, width=None, center=None):
    """Apply the spec's sinogram corrections: scaling, air removal, centring.

    Order: :func:`scale_per_angle` (if ``spec.scale_per_angle``), then
    :func:`remove_air_scatter` with ``spec.air_columns`` per side (one pattern averaged over
    angles when the angles were scaled, a pattern per angle otherwise), then the centre:
    ``spec.center == "auto"`` finds it with ``spec.center_method`` (default ``auto``, see
    :func:`find_center`) on the sum over bins, a
    number uses it, ``None`` takes the sinogram as centred; finally
    :func:`center_sinogram` puts the axis at the centre column (Fourier shift, edge
    fill), keeping every measured column.

    Parameters
    ----------
    sino : array, shape (n_angle, n_translation[, n_bin])
    angles_deg : array_like, shape (n_angle,)
    spec : pipelines.spec.SinogramSpec
    width : int, optional
        Output width (one common width for all slices of a volume), at least the minimal
        width that keeps every measured column; see :func:`center_sinogram`.
    center : float, optional
        Use this centre (px) instead of the spec's (e.g. found in a first pass).

    Returns
    -------
    sino : numpy.ndarray, shape (n_angle, m[, n_bin]), float32
        Corrected sinogram with the axis at ``(m - 1) / 2``; ``m >= n_translation`` (equal
        when the axis was already central).
    info : dict
        ``center_px`` (axis in input columns), ``shift_px`` (input column ``j`` is output
        column ``j + shift_px``), ``width_in``, ``width_out``, ``pad_left``, ``pad_right``,
        ``center_method`` (the method used for ``auto``, e.g. ``moment``; ``given`` or
        ``none``), ``center_uncertainty_px`` (standard uncertainty of a found centre, see
        :func:`find_center`; NaN for a given one), ``scale_factors``
        ((n_angle,) or None), ``air_pattern`` (None or array, see
        :func:`remove_air_scatter`), ``air_per_angle``.
    """
    s = _check_sino(sino)
    s = np.asarray(to_numpy(s), dtype=np.float32)
    if not np.all(np.isfinite(s)):
        raise SinogramError("sino: contains NaN or infinite values")
    ang = _check_angles(angles_deg, s.shape[0])
    info: dict = {"scale_factors": None, "air_pattern": None, "air_per_angle": None}
    if spec.scale_per_angle:
        s, f = scale_per_angle(s, return_factors=True)
        info["scale_factors"] = f
    if spec.air_columns > 0:
        per_angle = not spec.scale_per_angle
        s, pat = remove_air_scatter(s, spec.air_columns, per_angle=per_angle, return_pattern=True)
        info["air_pattern"] = pat
        info["air_per_angle"] = per_angle
    nt = s.shape[1]
    if center is not None:
        center, how = float(center), "given"
    elif spec.center is None:
        center, how = (nt - 1) / 2.0, "none"
    elif isinstance(spec.center, str):
        center, how = "auto", spec.center_method
    else:
        center, how = float(spec.center), "given"
    out, c, cinfo = center_sinogram(s, ang, center=center, method=spec.center_method,
                                    width=width, return_info=True)
    used = cinfo.pop("center_method_used")
    info.update(center_px=float(c), center_method=used or how, **cinfo)
    return out, info
