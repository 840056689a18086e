"""Radial integration of detector frames in batches: one sparse-matrix product per batch.

pyFAI owns the geometry: the PONI file, the detector (its mask and dummy value), solid angle,
polarisation and the CSR matrix (``AzimuthalIntegrator.setup_sparse_integrator``, the same
matrix that ``integrate1d_ng(method=("bbox", "csr", "cython"))`` uses). What is ours is the
batching: pyFAI integrates one frame at a time and reads the whole matrix for every frame;
here a batch of ``n`` frames is one product ``A @ X`` with ``X`` of shape ``(pixels, n)``,
evaluated over blocks of pixels so that the transposed block of frames stays in cache.

The arithmetic is pyFAI's (Kieffer & Ashiotis, "PyFAI: a Python library for high performance
azimuthal integration on GPU", 2014; Kieffer et al., J. Appl. Cryst. 53 (2020) for the
``_ng`` error propagation):

.. math::

    I_b = \\frac{\\sum_p c_{bp} (x_p - d_p)}{m \\sum_p c_{bp} \\omega_p},\\qquad
    \\sigma_b = \\frac{\\sqrt{\\sum_p c_{bp}^2 v_p}}{m \\sum_p c_{bp} \\omega_p}

with ``c`` the CSR coefficients, ``x`` raw counts, ``d`` dark, ``omega = flat * polarisation *
solid angle``, ``m`` the monitor and the Poisson variance ``v = max(x, 1)`` of the raw counts
(what pyFAI 2026.9's cython preprocessing uses; the dark is taken as noiseless). Masked pixels
have no coefficients; pixels at the detector's dummy value (e.g. -2 on a Pilatus) and
non-finite pixels are masked frame by frame, as pyFAI does.

Sigma clipping and trimmed means need pixels that belong to one bin: they use pyFAI's
no-split CSR matrix (as ``sigma_clip_ng`` and ``medfilt1d_ng`` do).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse as sp

from tasks._xp import get_xp

__all__ = ["IntegrationError", "RadialIntegrator", "integrate_scan", "integrator_from_spec"]

UNITS = ("q_nm^-1", "q_A^-1", "2th_deg")


class IntegrationError(ValueError):
    """Integration input that cannot be used; the message names the file or argument."""


def _load_image(value, name: str, shape: tuple[int, int] | None) -> np.ndarray | None:
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        import fabio  # noqa: PLC0415

        p = Path(value)
        name = f"calibration.{name}"  # a file: named by that field of the pipeline spec
        if not p.is_file():
            raise IntegrationError(f"{p}: {name} file does not exist")
        try:
            with fabio.open(str(p)) as img:
                arr = np.asarray(img.data)
        except Exception as err:
            raise IntegrationError(f"{p}: cannot read {name} image: {err}") from None
        src = str(p)
    else:
        arr = np.asarray(value)
        src = f"{name} array"
    if arr.ndim != 2:
        raise IntegrationError(f"{src}: {name} has shape {arr.shape}; expected a 2-D image")
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise IntegrationError(f"{src}: {name} has shape {arr.shape}; expected the detector "
                               f"shape {tuple(shape)}")
    return arr


class _Csr:
    """One pyFAI CSR matrix, cut into pixel blocks for cache-friendly batched products."""

    def __init__(self, integ, n_pix: int, omega: np.ndarray, block_pixels: int, unit_scale: float):
        data, indices, indptr = integ.lut
        self.nbins = len(indptr) - 1
        self.radial = np.asarray(integ.bin_centers, dtype=np.float64) * unit_scale
        self.pos0_range = (float(integ.pos0_min), float(integ.pos0_max))
        A = sp.csr_matrix((np.asarray(data, np.float32), np.asarray(indices), np.asarray(indptr)),
                          shape=(self.nbins, n_pix))
        self.A = A
        self.norm = A @ omega.astype(np.float64)  # sum c * omega, per bin
        self.no_split = bool(np.all(np.diff(indptr) >= 0) and np.all(np.asarray(data) == 1)
                             and len(np.unique(indices)) == len(indices))
        Ac = A.tocsc()
        Ac.sort_indices()
        # the whole matrix in pixel order, for the threaded CPU kernel (tasks/_integrate_nb.py)
        self.csc = (Ac.indptr.astype(np.int64), Ac.indices.astype(np.int32),
                    Ac.data.astype(np.float32))
        self.blocks = []
        for p0 in range(0, n_pix, block_pixels):
            p1 = min(p0 + block_pixels, n_pix)
            Ab = Ac[:, p0:p1].tocsr()
            rows = np.flatnonzero(np.diff(Ab.indptr))
            if rows.size == 0:
                continue
            r0, r1 = int(rows[0]), int(rows[-1]) + 1
            Ab = Ab[r0:r1]
            Ab.sort_indices()
            A2b = Ab.multiply(Ab).tocsr() if not self.no_split else Ab
            # block pixels without coefficients (masked / out of range): zeroed before the
            # dummy test so that statically masked dead pixels cost nothing
            unused = np.flatnonzero(np.diff(Ac.indptr[p0:p1 + 1]) == 0)
            self.blocks.append((p0, p1, r0, r1, Ab, A2b, unused))
        # no-split layout: pixels sorted by bin, for the clipping filters
        if self.no_split:
            self.pix = np.asarray(indices, dtype=np.int64)
            counts = np.diff(indptr)
            self.counts = counts
            self.nonempty = np.flatnonzero(counts > 0)
            self.starts = np.asarray(indptr[:-1])[self.nonempty]
        self._gpu = None

    def gpu_raw(self, omega, dark):
        """The CSR arrays on the GPU for :func:`tasks.cuda_kernels.integrate_csr`, built once:
        ``(indptr int32, indices int32, coef float32, omega float32, dark float32 or None,
        norm float64)``."""
        if getattr(self, "_gpu_raw", None) is None:
            import cupy  # noqa: PLC0415

            A = self.A
            self._gpu_raw = (cupy.asarray(A.indptr.astype(np.int32)),
                             cupy.asarray(A.indices.astype(np.int32)),
                             cupy.asarray(A.data.astype(np.float32)),
                             cupy.asarray(np.asarray(omega, np.float32)),
                             None if dark is None else cupy.asarray(np.asarray(dark, np.float32)),
                             cupy.asarray(np.asarray(self.norm, np.float64)))
        return self._gpu_raw

    def gpu(self):
        """The matrix on the GPU (cupyx.scipy.sparse), built once."""
        if self._gpu is None:
            import cupy  # noqa: PLC0415
            import cupyx.scipy.sparse as csp  # noqa: PLC0415

            A = csp.csr_matrix(self.A)
            A2 = csp.csr_matrix(self.A.multiply(self.A).tocsr())
            self._gpu = (A, A2, cupy.asarray(self.norm))
        return self._gpu


class RadialIntegrator:
    """Batched 1-D radial integration with pyFAI geometry and corrections.

    Parameters
    ----------
    poni : str or Path
        pyFAI PONI file (geometry, wavelength, detector).
    npt : int
        Number of radial bins.
    unit : {"q_nm^-1", "q_A^-1", "2th_deg"}
        Radial unit (pyFAI unit names).
    radial_range : (float, float), optional
        Radial range in ``unit``; default: the detector's full range (as pyFAI).
    mask : str, Path or array of bool (H, W), optional
        True (non-zero) = masked. Combined (OR) with the detector's own mask.
    dark, flat : str, Path or array (H, W), optional
        Dark current (subtracted) and flat field (divided). Pixels with a zero or non-finite
        flat, or a non-finite dark, are masked.
    polarization_factor : float or None
        pyFAI polarisation factor (-1..1); None for no correction.
    solid_angle : bool
        Correct for the solid angle of each pixel (pyFAI ``correctSolidAngle``).
    shape : (int, int), optional
        Detector shape (H, W); needed when the PONI names no detector.
    split : {"bbox", "no", "full"}
        Pixel splitting of the mean integration (pyFAI's default is "bbox").
    error_model : {"poisson", "none"}
        Variance model of :meth:`integrate`; ``"none"`` returns ``sigma=None``. For
        :meth:`integrate_sigma_clip`, ``"none"`` uses the spread within each ring
        (pyFAI's ``azimuthal`` model).
    block_pixels, sub_batch : int
        Cache blocking of the CPU product: frames are multiplied ``sub_batch`` at a time over
        blocks of ``block_pixels`` pixels (16 x 16384 float32 = 1 MiB stays in L2).
    threads : int, optional
        Worker threads of the clipping filters (default: all cores).

    Attributes
    ----------
    radial : numpy.ndarray, shape (npt,), float64
        Bin centres in ``unit`` (of the ``split`` matrix).
    unit : str
    wavelength_m : float
    shape : (int, int)
    mask : numpy.ndarray of bool, shape (H, W)
        The combined static mask.
    ai : pyFAI AzimuthalIntegrator

    Raises
    ------
    IntegrationError
        Missing or unreadable PONI/mask/dark/flat, shape mismatches, unknown unit, no shape.
    """

    def __init__(self, poni, *, npt: int, unit: str = "q_nm^-1", radial_range=None, mask=None,
                 dark=None, flat=None, polarization_factor: float | None = 0.99,
                 solid_angle: bool = True, shape=None, split: str = "bbox",
                 error_model: str = "poisson", block_pixels: int = 16384, sub_batch: int = 16,
                 threads: int | None = None):
        import pyFAI  # noqa: PLC0415
        import pyFAI.units  # noqa: PLC0415

        p = Path(poni)
        if not p.is_file():
            raise IntegrationError(f"{p}: PONI file does not exist")
        try:
            self.ai = pyFAI.load(str(p))
        except Exception as err:
            raise IntegrationError(f"{p}: cannot read PONI calibration: {err}") from None
        self.poni = str(p)
        if unit not in UNITS:
            raise IntegrationError(f"unit {unit!r}: expected one of {UNITS}")
        if int(npt) < 2:
            raise IntegrationError(f"npt={npt}: expected at least 2 bins")
        if split not in ("bbox", "no", "full"):
            raise IntegrationError(f"split {split!r}: expected 'bbox', 'no' or 'full'")
        if error_model not in ("poisson", "none"):
            raise IntegrationError(f"error_model {error_model!r}: expected 'poisson' or 'none'")
        if self.ai.wavelength is None and unit != "2th_deg":
            raise IntegrationError(f"{p}: PONI has no wavelength; needed for unit {unit}")
        self.unit = unit
        self._unit = pyFAI.units.to_unit(unit)
        self.npt = int(npt)
        self.split = split
        self.error_model = error_model
        self.polarization_factor = polarization_factor
        self.solid_angle = bool(solid_angle)
        self.block_pixels = int(block_pixels)
        self.sub_batch = max(1, int(sub_batch))
        self.threads = max(1, os.cpu_count() or 1) if threads is None else max(1, int(threads))
        self.wavelength_m = float(self.ai.wavelength) if self.ai.wavelength else None
        det_shape = getattr(self.ai.detector, "shape", None) or getattr(self.ai.detector, "max_shape", None)
        det_shape = tuple(int(s) for s in det_shape) if det_shape is not None else None
        if shape is not None:
            shape = tuple(int(s) for s in shape)
            if det_shape is not None and shape != det_shape:
                raise IntegrationError(f"{p}: detector {self.ai.detector.name} has shape {det_shape}; "
                                       f"frames have shape {shape}")
        else:
            shape = det_shape
        if shape is None:
            raise IntegrationError(f"{p}: the PONI names no detector shape; pass shape=(H, W)")
        self.shape = shape
        if radial_range is not None:
            radial_range = (float(radial_range[0]), float(radial_range[1]))
            if not radial_range[0] < radial_range[1]:
                raise IntegrationError(f"radial_range {radial_range}: expected (min, max), min < max")
        self.radial_range = radial_range

        user_mask = _load_image(mask, "mask", shape)
        m = np.zeros(shape, dtype=bool) if user_mask is None else (user_mask != 0)
        det_mask = self.ai.detector.mask
        if det_mask is not None:
            if det_mask.shape != shape:
                raise IntegrationError(f"{p}: detector mask shape {det_mask.shape} differs from {shape}")
            m |= det_mask != 0
        self.dark = _load_image(dark, "dark", shape)
        self.flat = _load_image(flat, "flat", shape)
        if self.dark is not None:
            self.dark = self.dark.astype(np.float32)
            m |= ~np.isfinite(self.dark)
        if self.flat is not None:
            self.flat = self.flat.astype(np.float32)
            m |= ~np.isfinite(self.flat) | (self.flat == 0)
        # omega = flat * polarisation * solid angle, in float32 in pyFAI's preproc order
        omega = np.ones(shape, dtype=np.float32)
        if self.flat is not None:
            omega *= self.flat
        if polarization_factor is not None:
            omega *= self.ai.polarization(shape, polarization_factor).astype(np.float32)
        if self.solid_angle:
            omega *= self.ai.solidAngleArray(shape, True).astype(np.float32)
        m |= ~np.isfinite(omega) | (omega == 0)
        if m.all():
            parts = [f"calibration.mask {mask}: {int(np.count_nonzero(user_mask))}" if user_mask is not None else None,
                     f"detector mask: {int(np.count_nonzero(det_mask))}" if det_mask is not None else None]
            parts = ", ".join(x for x in parts if x) or "dark/flat/geometry"
            raise IntegrationError(
                f"{mask if isinstance(mask, (str, Path)) else p}: calibration.mask: every one of the "
                f"{shape[0]} x {shape[1]} detector pixels is masked ({parts} masked pixels; "
                f"calibration {p}); expected unmasked pixels to integrate")
        self.mask = m
        self.omega = omega.ravel()
        self._dark_flat = None if self.dark is None else self.dark.ravel()
        self._csr_cache: dict[str, _Csr] = {}
        self._lock = threading.RLock()
        csr = self._csr(split)
        if csr.A.nnz == 0:
            raise IntegrationError(
                f"{p}: integration.radial_range {self.radial_range} ({unit}): no unmasked "
                f"detector pixel falls in it ({self._covered()}); expected a range the "
                f"detector covers")
        self.radial = csr.radial

    def _covered(self) -> str:
        """The radial range the unmasked pixels cover, for messages."""
        try:
            r = np.asarray(self.ai.array_from_unit(self.shape, "center", self._unit, scale=True))
            r = r[~self.mask]
            return f"the unmasked pixels cover {r.min():.4g} to {r.max():.4g} {self.unit}"
        except Exception:  # noqa: BLE001 - only a hint
            return "coverage unknown"

    # ---------------------------------------------------------------- matrices
    def _csr(self, split: str) -> _Csr:
        with self._lock:
            if split not in self._csr_cache:
                if split == self.split or self.radial_range is not None:
                    rr = None if self.radial_range is None else tuple(
                        v / self._unit.scale for v in self.radial_range)
                else:  # share the radial grid of the main matrix
                    rr = self._csr(self.split).pos0_range
                integ = self.ai.setup_sparse_integrator(
                    self.shape, self.npt, mask=self.mask, pos0_range=rr, unit=self._unit,
                    split=split, algo="CSR", empty=0.0, scale=False)
                self._csr_cache[split] = _Csr(integ, int(np.prod(self.shape)), self.omega,
                                              self.block_pixels, self._unit.scale)
                self._csr_cache[split].range_used = rr
            return self._csr_cache[split]

    def _aux_range(self):
        """The radial_range to give pyFAI so that it builds the same no-split matrix as the
        clipping filters use (None when that matrix was built without a range)."""
        rr = self._csr("no").range_used
        return None if rr is None else (rr[0] * self._unit.scale, rr[1] * self._unit.scale)

    def dummies(self, dtype) -> tuple[float | None, float | None]:
        """The detector's dummy value and tolerance for frames of ``dtype``; (None, None)
        when the detector has none.

        pyFAI (``detector.get_dummies``) casts the detector's dummy (-2 for Eiger and
        Pilatus, tolerance 1.5) into the frame dtype: for unsigned integers it wraps around
        into the counts (uint8: 254 +- 1.5, i.e. real counts 253, 254 and 255 would be
        dropped as dead pixels). A dummy is only used where it lies outside the counts a
        pixel can hold: float and signed integer frames keep pyFAI's; unsigned integer
        frames of 16 bits or more use the type's maximum alone (2**n - 1, tolerance 0.5:
        the marker Dectris detectors write into gap and invalid pixels, never a count);
        8-bit frames have none (their gaps are in the detector's static mask)."""
        dt = np.dtype(dtype)
        dummy, delta = self.ai.detector.get_dummies(dt)
        nominal = getattr(self.ai.detector, "dummy", None)
        if dummy is None or nominal is None or dt.kind not in "iu":
            return dummy, delta
        info = np.iinfo(dt)
        if info.min <= float(nominal) <= info.max:
            return dummy, delta
        if dt.itemsize >= 2 and dt.kind == "u":
            return np.float32(info.max), np.float32(0.5)
        return None, None

    def gpu_bytes(self, frame_dtype, method: str = "mean") -> tuple[int, int]:
        """Device memory of one integration method on cupy frames: (bytes per frame, fixed).

        ``mean`` (:meth:`integrate`, the fused kernel
        :func:`tasks.cuda_kernels.integrate_csr`), per frame: the raw frame in its detector
        dtype and two float32 ``(npt,)`` results. Fixed: the CSR arrays (float32 data + int32
        indices), ``omega``, dark and norm. ``sigma_clip`` / ``trimmed_mean`` (the array-module paths
        :meth:`_sigma_clip_array`, :meth:`_trimmed_mean_array`): per pixel and frame, the
        float32 entries, values and variance, masks, and the float64 prefix sums (and for
        the trimmed mean the int64 sort order and float64 keys, weights and running sums)
        that are alive at once, 56 and 88 bytes; fixed: the bin-order pixel index, bin
        index and normalisation.

        Returns
        -------
        (int, int)
            Bytes; an upper estimate (temporaries counted as if all alive at once).
        """
        csr = self._csr(self.split)
        npix = int(np.prod(self.shape))
        if method in ("sigma_clip", "trimmed_mean"):
            nnz = int(self._csr("no").A.nnz)
            per_entry = 56 if method == "sigma_clip" else 88
            per_frame = npix * np.dtype(frame_dtype).itemsize + nnz * per_entry + 16 * 8 * csr.nbins
            return int(per_frame), int(nnz * (8 + 4 + 8 + 4) + csr.nbins * 16)
        # the fused kernel reads the frame in place: per frame only its bytes (a contiguous
        # copy at most) and the two float32 results; fixed: the CSR arrays (float32 + int32
        # per entry), omega and dark (float32), norm (float64)
        nnz = int(csr.A.nnz)
        per_frame = npix * np.dtype(frame_dtype).itemsize + 2 * 4 * csr.nbins
        fixed = nnz * 8 + (csr.nbins + 1) * 4 + npix * 8 + csr.nbins * 8
        return int(per_frame), int(fixed)

    # ---------------------------------------------------------------- inputs
    def _frames(self, frames):
        xp = get_xp(frames)
        f = frames if xp is not np else np.asarray(frames)
        if f.ndim == 2:
            f = f[None]
        if f.ndim != 3 or tuple(f.shape[1:]) != self.shape:
            raise IntegrationError(f"frames have shape {tuple(frames.shape)}; expected (n, "
                                   f"{self.shape[0]}, {self.shape[1]}) for {self.poni}")
        dt = np.dtype(f.dtype)
        if not np.issubdtype(dt, np.number) or dt == np.bool_ or np.issubdtype(dt, np.complexfloating):
            raise IntegrationError(f"frames have dtype {dt}; expected real numbers")
        return xp, f

    @staticmethod
    def _monitor(monitor, n, xp=np):
        if monitor is None:
            return None
        m = xp.asarray(monitor, dtype=xp.float64).reshape(-1)
        if m.size == 1 and n != 1:
            m = xp.full(n, float(m[0]))
        if m.size != n:
            raise IntegrationError(f"monitor has {m.size} values; expected one per frame ({n})")
        if bool(xp.any(~(m > 0))):
            raise IntegrationError("monitor values must be finite and > 0")
        return m

    @staticmethod
    def _invalid_possible(xb, dummy, delta, is_float) -> bool:
        """Whether any pixel of a block could be dummy or non-finite (min/max test)."""
        if not is_float and dummy is None:
            return False
        lo, hi = float(xb.min()), float(xb.max())
        if is_float and not (math.isfinite(lo) and math.isfinite(hi)):
            return True
        if dummy is None:
            return False
        d = float(delta or 0.0)
        return lo <= float(dummy) + d and hi >= float(dummy) - d

    def _invalid(self, xb, dummy, delta, is_float):
        inv = np.zeros(xb.shape, dtype=bool)
        if is_float:
            inv |= ~np.isfinite(xb)
        if dummy is not None:
            d = float(delta or 0.0)
            if d == 0:
                inv |= xb == np.float32(dummy)
            else:
                inv |= np.abs(xb - np.float32(dummy)) <= d
        return inv

    # ---------------------------------------------------------------- mean
    def integrate(self, frames, monitor=None, engine: str = "auto"):
        """Integrate a batch of frames (one batched sparse product).

        Parameters
        ----------
        frames : array, shape (n, H, W) or (H, W), any int or float dtype (numpy or cupy)
            Raw detector counts.
        monitor : array, shape (n,), optional
            Per-frame monitor; intensities and sigmas are divided by it.
        engine : {"auto", "scipy"}
            numpy frames: ``auto`` the threaded kernel of :mod:`tasks._integrate_nb`
            (``threads`` cores share each batch of ``sub_batch`` frames, float64 sums),
            ``scipy`` cache-blocked scipy sparse products (one thread, float32 sums; the
            previous path, kept as a reference). cupy frames: the GPU kernel.

        Returns
        -------
        intensity : numpy.ndarray (cupy for cupy input), shape (n, npt), float32
            Mean corrected intensity per bin (0 for empty bins), as pyFAI ``integrate1d_ng``.
        sigma : same shape and type, or None
            Standard error of the mean from Poisson statistics (pyFAI ``error_model="poisson"``);
            None when ``error_model="none"``.

        Raises
        ------
        IntegrationError
            Wrong frame shape or dtype, monitor length or values.
        """
        xp, f = self._frames(frames)
        n = f.shape[0]
        mon = self._monitor(monitor, n, xp)
        csr = self._csr(self.split)
        if xp is not np:
            return self._integrate_gpu(xp, f, mon, csr)
        if engine not in ("auto", "scipy"):
            raise IntegrationError(f"engine {engine!r}: expected 'auto' or 'scipy'")
        do_var = self.error_model == "poisson"
        if engine == "auto":
            from tasks._integrate_nb import integrate_csc  # noqa: PLC0415

            dummy, delta = self.dummies(f.dtype)

            def one(fb, mb):
                return integrate_csc(fb, *csr.csc, self.omega, csr.norm, csr.nbins, monitor=mb,
                                     dark=self._dark_flat, dummy=dummy, delta=delta,
                                     poisson=do_var, threads=self.threads)
        else:
            def one(fb, mb):
                return self._integrate_cpu(fb, mb, csr, do_var)
        intensity = np.empty((n, csr.nbins), np.float32)
        sigma = np.empty((n, csr.nbins), np.float32) if do_var else None
        for s in range(0, n, self.sub_batch):
            e = min(n, s + self.sub_batch)
            i, sg = one(f[s:e], None if mon is None else mon[s:e])
            intensity[s:e] = i
            if do_var:
                sigma[s:e] = sg
        return intensity, sigma

    def _integrate_cpu(self, f, mon, csr, do_var):
        n = f.shape[0]
        f2 = f.reshape(n, -1)
        dummy, delta = self.dummies(f.dtype)
        is_float = np.issubdtype(f.dtype, np.floating)
        S = np.zeros((csr.nbins, n), dtype=np.float32)
        V = np.zeros((csr.nbins, n), dtype=np.float32) if do_var else None
        norm = None  # per-frame normalisation, only when pixels are masked dynamically
        dark = self._dark_flat
        for p0, p1, r0, r1, Ab, A2b, unused in csr.blocks:
            xb = np.ascontiguousarray(f2[:, p0:p1].T, dtype=np.float32)
            if unused.size:
                xb[unused] = 0.0
            inv = None
            if self._invalid_possible(xb, dummy, delta, is_float):
                inv = self._invalid(xb, dummy, delta, is_float)
                if not inv.any():
                    inv = None
            if do_var:  # Poisson variance of the raw counts (pyFAI: max(raw, 1))
                vb = np.maximum(xb, np.float32(1.0))
            if dark is not None:
                xb -= dark[p0:p1, None]
            if inv is not None:
                xb[inv] = 0.0
                if do_var:
                    vb[inv] = 0.0
                if norm is None:
                    norm = np.repeat(csr.norm[:, None], n, axis=1)
                norm[r0:r1] -= Ab @ (inv * self.omega[p0:p1, None]).astype(np.float64)
            S[r0:r1] += Ab @ xb
            if do_var:
                V[r0:r1] += A2b @ vb
        if norm is None:
            norm = csr.norm[:, None]
        denom = norm * (mon[None, :] if mon is not None else 1.0)
        good = denom > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            intensity = np.where(good, S / denom, 0.0).T.astype(np.float32)
            sigma = np.where(good, np.sqrt(V) / denom, 0.0).T.astype(np.float32) if do_var else None
        return intensity, sigma

    def _integrate_gpu(self, cp, f, mon, csr):
        """cupy path: one fused CSR kernel over the frames in their detector dtype
        (:func:`tasks.cuda_kernels.integrate_csr`; same arithmetic as the CPU path, float64
        accumulation)."""
        from tasks.cuda_kernels import integrate_csr  # noqa: PLC0415

        indptr, indices, coef, omega, dark, norm = csr.gpu_raw(self.omega, self._dark_flat)
        dummy, delta = self.dummies(f.dtype)
        return integrate_csr(f, indptr, indices, coef, omega, norm, monitor=mon, dark=dark,
                             dummy=dummy, delta=delta, poisson=self.error_model == "poisson")

    def _integrate_gpu_spmm(self, cp, f, mon, csr):
        """cupy path by cuSPARSE products (the previous implementation; kept as the
        benchmark's reference for the fused kernel)."""
        A, A2, norm = csr.gpu()
        n = f.shape[0]
        x = cp.ascontiguousarray(f.reshape(n, -1).T, dtype=cp.float32)
        dummy, delta = self.dummies(f.dtype)
        inv = None
        if np.issubdtype(f.dtype, np.floating) or dummy is not None:
            inv = cp.zeros(x.shape, dtype=bool)
            if np.issubdtype(f.dtype, np.floating):
                inv |= ~cp.isfinite(x)
            if dummy is not None:
                inv |= cp.abs(x - cp.float32(dummy)) <= cp.float32(delta or 0.0)
        do_var = self.error_model == "poisson"
        if do_var:
            v = cp.maximum(x, cp.float32(1.0))
        if self._dark_flat is not None:
            x -= cp.asarray(self._dark_flat)[:, None]
        normb = norm[:, None]
        if inv is not None and bool(inv.any()):
            x[inv] = 0
            if do_var:
                v[inv] = 0
            normb = normb - A @ (inv * cp.asarray(self.omega)[:, None]).astype(cp.float32)
        S = A @ x
        denom = normb * (mon[None, :] if mon is not None else 1.0)
        good = denom > 0
        intensity = cp.where(good, S / denom, 0.0).T.astype(cp.float32)
        sigma = None
        if do_var:
            V = A2 @ v
            sigma = cp.where(good, cp.sqrt(V) / denom, 0.0).T.astype(cp.float32)
        return intensity, sigma

    # ---------------------------------------------------------------- sigma clip
    def integrate_sigma_clip(self, frames, monitor=None, thres: float = 4.0, max_iter: int = 5,
                             sub_batch: int = 8, engine: str = "auto"):
        """Sigma-clipped mean per bin, batched (rejects single-crystal spots and hot pixels).

        Per bin, pixels whose corrected value ``(x - d) / omega`` lies further than
        ``max(thres, sqrt(2 ln(n / sqrt(2 pi))))`` standard deviations from the bin's mean
        (Chauvenet's criterion as the floor, ``n`` the pixels left in the bin) are rejected
        and the mean is recomputed, up to ``max_iter`` times or until nothing changes. The
        standard deviation is Poisson-propagated (``error_model="poisson"``) or the spread
        within the ring (``"none"``). This is the algorithm of pyFAI ``sigma_clip_ng``
        (no pixel splitting), evaluated for many frames at once: bin sums are segment sums
        over bin-sorted pixels and rejected pixels are subtracted from the running sums.

        Parameters
        ----------
        frames : array, shape (n, H, W) or (H, W), int or float
        monitor : array, shape (n,), optional
        thres : float
            Clipping threshold in standard deviations.
        max_iter : int
            Maximum number of rejection passes.
        sub_batch : int
            Frames processed together on the CPU (memory: about 20 bytes x pixels x
            sub_batch); cupy frames are processed as one batch.
        engine : {"auto", "array", "kernel", "blocks"}
            ``"auto"``: cupy frames run the array-module path on the GPU, numpy frames the
            threaded CPU kernel (:func:`tasks._integrate_nb.sigma_clip_bins`: bins shared
            among ``threads``, every iteration per bin and frame in one pass);
            ``"blocks"``: the previous cache-blocked numpy path (one thread); ``"array"``: the array-module path (the arithmetic the GPU
            runs) on numpy frames too, for checking it without a GPU; ``"kernel"`` (cupy
            frames): one CUDA kernel with every iteration inside
            (:func:`tasks.cuda_kernels.sigma_clip_csr`); opt-in until the GPU tests have
            run it on a device.

        Returns
        -------
        intensity, sigma : numpy.ndarray (cupy for cupy input), shape (n, npt), float32
            Clipped mean and its standard error, on :attr:`radial_clip`.
        """
        xp, f = self._frames(frames)
        if engine not in ("auto", "array", "kernel", "blocks"):
            raise IntegrationError(f"engine {engine!r}: expected 'auto', 'array', 'kernel' or "
                                   f"'blocks'")
        if engine == "kernel" and xp is np:
            raise IntegrationError("engine 'kernel': the clipping kernel runs on cupy frames only")
        if xp is not np or engine == "array":
            mon = self._monitor(monitor, f.shape[0], xp)
            if engine == "kernel":
                i, sg = self._sigma_clip_kernel(f, float(thres), int(max_iter))
            else:
                i, sg = self._sigma_clip_array(xp, f, float(thres), int(max_iter))
            if mon is not None:
                i, sg = i / mon[:, None], sg / mon[:, None]
            return i.astype(xp.float32), sg.astype(xp.float32)
        n = f.shape[0]
        mon = self._monitor(monitor, n)
        out_i = np.zeros((n, self.npt), np.float32)
        out_s = np.zeros((n, self.npt), np.float32)
        for s in range(0, n, max(1, int(sub_batch))):
            e = min(n, s + max(1, int(sub_batch)))
            if engine == "blocks":
                i, sg = self._sigma_clip_block(f[s:e], thres, max_iter)
            else:
                i, sg = self._sigma_clip_threaded(f[s:e], thres, max_iter)
            if mon is not None:
                i = i / mon[s:e, None]
                sg = sg / mon[s:e, None]
            out_i[s:e] = i
            out_s[s:e] = sg
        return out_i, out_s

    def _sigma_clip_threaded(self, f, thres: float, max_iter: int):
        """Sigma clip of numpy frames by the threaded CPU kernel; (n, npt) float64."""
        from tasks._integrate_nb import sigma_clip_bins  # noqa: PLC0415

        pix, _bin_of, indptr, _om, dark = self._segments(np)
        csr = self._csr("no")
        if csr.__dict__.get("om32_entries") is None:
            csr.om32_entries = self.omega[csr.pix].astype(np.float32)
        dummy, delta = self.dummies(f.dtype)
        return sigma_clip_bins(f, indptr, pix, csr.om32_entries, dark=dark, dummy=dummy,
                               delta=delta, poisson=self.error_model == "poisson", thres=thres,
                               max_iter=max_iter, threads=self.threads)

    def _kernel_inputs(self, f) -> dict:
        """Arguments the per-bin CUDA kernels of :mod:`tasks.cuda_kernels` share, for cupy
        frames ``f``: the no-split matrix's segments on the device, the largest bin, the
        dummy test and the error model."""
        import cupy as cp  # noqa: PLC0415

        pix, _bin_of, indptr, om, dark = self._segments(cp)
        dummy, delta = self.dummies(f.dtype)
        return dict(indptr=indptr, pix=pix, om=om, dark=dark, dummy=dummy, delta=delta,
                    max_count=int(self._csr("no").counts.max(initial=1)),
                    poisson=self.error_model == "poisson")

    def _sigma_clip_kernel(self, f, thres: float, max_iter: int):
        """Sigma clip of cupy frames by :func:`tasks.cuda_kernels.sigma_clip_csr`; returns
        (n, npt) float64 arrays as :meth:`_sigma_clip_array` does."""
        from tasks.cuda_kernels import sigma_clip_csr  # noqa: PLC0415

        return sigma_clip_csr(f, **self._kernel_inputs(f), thres=thres, max_iter=max_iter)

    @property
    def radial_clip(self) -> np.ndarray:
        """Bin centres of the no-split matrix used by the clipping filters (in ``unit``)."""
        return self._csr("no").radial

    def _bin_blocks(self, csr, target_pixels: int):
        """Groups of consecutive non-empty bins holding about ``target_pixels`` pixels."""
        key = ("bin_blocks", target_pixels)
        if key not in csr.__dict__:
            ne, starts, counts = csr.nonempty, csr.starts, csr.counts[csr.nonempty]
            ends = starts + counts
            blocks, k = [], 0
            while k < len(ne):
                j = k + 1
                while j < len(ne) and ends[j - 1] - starts[k] < target_pixels:
                    j += 1
                blocks.append((k, j, int(starts[k]), int(ends[j - 1])))
                k = j
            csr.__dict__[key] = blocks
        return csr.__dict__[key]

    def _sigma_clip_block(self, f, thres, max_iter):
        """Sigma clip of a few frames, bin block by bin block (each block stays in cache).

        Layout: pixels x frames (frames innermost), pixels sorted by bin, so that per-bin
        sums are segment sums (``np.add.reduceat``) and broadcasting a bin value to its
        pixels is ``np.repeat``.
        """
        csr = self._csr("no")
        n = f.shape[0]
        f2 = f.reshape(n, -1)
        # pixel-major copy of the frames, transposed block by block (cache friendly)
        ft = np.empty((f2.shape[1], n), dtype=np.float32)
        step = max(1024, (1 << 18) // n)
        for p0 in range(0, f2.shape[1], step):
            ft[p0:p0 + step] = f2[:, p0:p0 + step].T
        ne, starts_all = csr.nonempty, csr.starts
        counts_all = csr.counts[ne]
        dummy, delta = self.dummies(f.dtype)
        is_float = np.issubdtype(f.dtype, np.floating)
        poisson = self.error_model == "poisson"
        dark = self._dark_flat
        mean_out = np.zeros((len(ne), n))
        sem_out = np.zeros((len(ne), n))
        target = max(1024, (1 << 19) // max(n, 1))  # ~2 MiB of float32 per block
        if csr.__dict__.get("om_sums") is None:
            om64_all = self.omega[csr.pix].astype(np.float64)
            csr.om_sums = (np.add.reduceat(om64_all, starts_all), np.add.reduceat(om64_all ** 2, starts_all))

        def one_block(k0, k1, q0, q1):
            pix = csr.pix[q0:q1]
            starts = starts_all[k0:k1] - q0
            counts = counts_all[k0:k1]
            raw = np.take(ft, pix, axis=0)  # (P, n)
            om = self.omega[pix]
            om64 = om.astype(np.float64)
            valid = None
            if self._invalid_possible(raw, dummy, delta, is_float):
                inv = self._invalid(raw, dummy, delta, is_float)
                if inv.any():
                    valid = ~inv
            var = np.maximum(raw, np.float32(1.0)) if poisson else None
            sig = raw
            if dark is not None:
                sig = raw - dark[pix, None]
            if valid is not None:
                sig = np.where(valid, sig, np.float32(0.0))
                if poisson:
                    var = np.where(valid, var, np.float32(0.0))
                w = valid.astype(np.float64)
            else:
                valid = np.ones(raw.shape, dtype=bool)
                w = None
            x = sig / om[:, None]  # corrected value of each pixel

            def seg(a):
                return np.add.reduceat(a, starts, axis=0, dtype=np.float64)

            s_sig = seg(sig)
            if w is None:
                s_w = np.repeat(csr.om_sums[0][k0:k1, None], n, axis=1)
                s_w2 = np.repeat(csr.om_sums[1][k0:k1, None], n, axis=1)
                s_cnt = np.repeat(counts.astype(np.float64)[:, None], n, axis=1)
            else:
                s_w = seg(w * om64[:, None])
                s_w2 = seg(w * (om64 ** 2)[:, None])
                s_cnt = seg(w)
            if poisson:
                s_var = seg(var)
            else:
                s_sig2 = seg(sig.astype(np.float64) ** 2)  # sum omega^2 x^2
                s_wsig = seg(sig * om64[:, None])  # sum omega^2 x

            def stats():
                with np.errstate(divide="ignore", invalid="ignore"):
                    mean = s_sig / s_w
                    if poisson:
                        vsum = s_var
                    else:  # sum omega^2 (x - mean)^2 over the pixels left
                        vsum = np.maximum(s_sig2 - 2 * mean * s_wsig + mean ** 2 * s_w2, 0.0)
                    std = np.sqrt(vsum / s_w2)
                return mean, std, vsum

            for _ in range(int(max_iter)):
                mean, std, _v = stats()
                cnt = np.maximum(s_cnt, 3.0)
                lim = np.maximum(thres, np.sqrt(2.0 * np.log(cnt / np.sqrt(2.0 * np.pi)))) * std
                with np.errstate(invalid="ignore"):
                    lo = np.repeat((mean - lim).astype(np.float32), counts, axis=0)
                    hi = np.repeat((mean + lim).astype(np.float32), counts, axis=0)
                    rej = x < lo
                    rej |= x > hi
                rej &= valid
                idx = np.flatnonzero(rej)
                if idx.size == 0:
                    break
                px, fr = np.divmod(idx, n)
                valid.ravel()[idx] = False
                b = np.searchsorted(starts, px, side="right") - 1
                flat = b * n + fr

                def sub(acc, vals):
                    acc -= np.bincount(flat, weights=vals, minlength=acc.size).reshape(acc.shape)

                sig_r = sig.ravel()[idx]
                sub(s_sig, sig_r)
                sub(s_w, om64[px])
                sub(s_w2, om64[px] ** 2)
                sub(s_cnt, np.ones(idx.size))
                if poisson:
                    sub(s_var, var.ravel()[idx])
                else:
                    sub(s_sig2, sig_r.astype(np.float64) ** 2)
                    sub(s_wsig, sig_r * om64[px])
            mean, std, vsum = stats()
            with np.errstate(divide="ignore", invalid="ignore"):
                sem = np.sqrt(vsum) / s_w
            good = (s_w > 0) & (s_cnt > 0.5)
            mean_out[k0:k1] = np.where(good, mean, 0.0)
            sem_out[k0:k1] = np.where(good, sem, 0.0)

        # numpy releases the GIL in these kernels: bin blocks run on all cores
        blocks = self._bin_blocks(csr, target)
        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(lambda blk: one_block(*blk), blocks))
        inten = np.zeros((n, self.npt), np.float32)
        sigma = np.zeros((n, self.npt), np.float32)
        inten[:, ne] = mean_out.T
        sigma[:, ne] = sem_out.T
        return inten, sigma

    # ---------------------------------------------------------------- trimmed mean
    def integrate_trimmed_mean(self, frames, monitor=None, quantiles=(0.0, 0.9), engine: str = "auto"):
        """Trimmed mean per bin: the mean of the pixels between two quantiles of each ring.

        numpy frames: pyFAI ``medfilt1d_ng`` (no pixel splitting, cython) frame by frame with
        ``percentile=(100*lo, 100*hi)``; Poisson errors. cupy frames (or ``engine="array"``):
        the same selection for the whole batch at once on the array module
        (:meth:`_trimmed_mean_array`).

        Parameters
        ----------
        frames : array, shape (n, H, W) or (H, W)
        monitor : array, shape (n,), optional
        quantiles : (float, float)
            ``0 <= lo < hi <= 1``; (0, 0.9) drops the brightest 10 % of each ring.
        engine : {"auto", "array", "kernel"}
            As for :meth:`integrate_sigma_clip`; ``"kernel"`` (cupy frames) is
            :func:`tasks.cuda_kernels.trimmed_mean_csr` (a sort in shared memory per bin and
            frame), opt-in until the GPU tests have run it on a device.

        Returns
        -------
        intensity, sigma : numpy.ndarray (cupy for cupy input), shape (n, npt), float32, on
            :attr:`radial_clip`.
        """
        xp, f = self._frames(frames)
        lo, hi = float(quantiles[0]), float(quantiles[1])
        if not 0 <= lo < hi <= 1:
            raise IntegrationError(f"quantiles {quantiles}: expected 0 <= lo < hi <= 1")
        if engine not in ("auto", "array", "kernel"):
            raise IntegrationError(f"engine {engine!r}: expected 'auto', 'array' or 'kernel'")
        if engine == "kernel" and xp is np:
            raise IntegrationError("engine 'kernel': the trimmed-mean kernel runs on cupy frames only")
        if xp is not np or engine == "array":
            mon = self._monitor(monitor, f.shape[0], xp)
            if engine == "kernel":
                from tasks.cuda_kernels import trimmed_mean_csr  # noqa: PLC0415

                i, sg = trimmed_mean_csr(f, **self._kernel_inputs(f), quantiles=(lo, hi))
            else:
                i, sg = self._trimmed_mean_array(xp, f, lo, hi)
            if mon is not None:
                i, sg = i / mon[:, None], sg / mon[:, None]
            return i.astype(xp.float32), sg.astype(xp.float32)
        n = f.shape[0]
        mon = self._monitor(monitor, n)
        out_i = np.zeros((n, self.npt), np.float32)
        out_s = np.zeros((n, self.npt), np.float32)
        for k in range(n):
            r = self.reference_trimmed_mean(f[k], quantiles=(lo, hi),
                                            monitor=1.0 if mon is None else float(mon[k]))
            out_i[k] = r.intensity
            if r.sigma is not None:
                out_s[k] = r.sigma
        return out_i, out_s

    # ---------------------------------------------------------------- array-module filters
    def _segments(self, xp):
        """No-split matrix as bin segments on the array module ``xp`` (built once per module).

        Returns ``(pix, bin_of, indptr, om, dark)``: detector pixel of each matrix entry in
        bin order (P,), its bin (P,), the bin boundaries (nbins + 1,), the entry's
        normalisation ``omega`` (P,) float64 and dark (P,) float32 or None.
        """
        csr = self._csr("no")
        key = "segments_" + xp.__name__
        if key not in csr.__dict__:
            indptr = np.concatenate([[0], np.cumsum(csr.counts)]).astype(np.int64)
            bin_of = np.repeat(np.arange(csr.nbins, dtype=np.int32), csr.counts)
            dark = self._dark_flat
            csr.__dict__[key] = (xp.asarray(csr.pix), xp.asarray(bin_of), xp.asarray(indptr),
                                 xp.asarray(self.omega[csr.pix].astype(np.float64)),
                                 None if dark is None else xp.asarray(dark[csr.pix].astype(np.float32)))
        return csr.__dict__[key]

    def _entries(self, xp, f):
        """Frames as matrix entries: ``(sig, valid)`` of shape (P, n), bin order, frames
        innermost; ``sig`` = raw - dark (float32, 0 where invalid), ``valid`` excludes
        detector dummies and non-finite values. Also returns the Poisson variance
        ``max(raw, 1)`` (0 where invalid) when the error model is Poisson, else None."""
        pix, _b, _p, _om, dark = self._segments(xp)
        n = f.shape[0]
        raw = f.reshape(n, -1)[:, pix].T.astype(xp.float32)      # (P, n), converted on the device
        dummy, delta = self.dummies(f.dtype)
        valid = xp.ones(raw.shape, dtype=bool)
        if np.issubdtype(f.dtype, np.floating):
            valid &= xp.isfinite(raw)
        if dummy is not None:
            valid &= ~(xp.abs(raw - xp.float32(dummy)) <= xp.float32(delta or 0.0))
        var = xp.where(valid, xp.maximum(raw, xp.float32(1.0)), xp.float32(0.0)) \
            if self.error_model == "poisson" else None
        sig = raw if dark is None else raw - dark[:, None]
        sig = xp.where(valid, sig, xp.float32(0.0))
        return sig, valid, var

    @staticmethod
    def _segsum(xp, a, indptr):
        """Per-bin sums of (P, n) entries in bin order: (nbins, n) float64 (prefix sums)."""
        c = xp.cumsum(a, axis=0, dtype=xp.float64)
        c = xp.concatenate([xp.zeros((1, a.shape[1]), xp.float64), c])
        return c[indptr[1:]] - c[indptr[:-1]]

    def _sigma_clip_array(self, xp, f, thres: float, max_iter: int):
        """Sigma clip of a batch on the array module ``xp`` (numpy or cupy, same code).

        Same rejection rule, statistics and outputs as :meth:`_sigma_clip_block` (pyFAI
        ``sigma_clip_ng``), organised for a GPU: all frames and all bins at once, per-bin
        sums as differences of prefix sums over the bin-sorted entries, the bin's mean and
        limit broadcast back to its pixels by a gather. Returns (n, npt) float64 arrays.
        """
        _pix, bin_of, indptr, om, _dark = self._segments(xp)
        sig, valid, var = self._entries(xp, f)
        x = sig / om[:, None].astype(xp.float32)
        poisson = var is not None
        om_c = om[:, None]

        def sums(v):
            w = v.astype(xp.float64)
            out = {"sig": self._segsum(xp, xp.where(v, sig, 0), indptr),
                   "w": self._segsum(xp, w * om_c, indptr),
                   "w2": self._segsum(xp, w * om_c ** 2, indptr),
                   "cnt": self._segsum(xp, w, indptr)}
            if poisson:
                out["var"] = self._segsum(xp, xp.where(v, var, 0), indptr)
            else:
                s64 = xp.where(v, sig, 0).astype(xp.float64)
                out["sig2"] = self._segsum(xp, s64 ** 2, indptr)
                out["wsig"] = self._segsum(xp, s64 * om_c, indptr)
            return out

        def stats(S):
            with np.errstate(divide="ignore", invalid="ignore"):
                mean = S["sig"] / S["w"]
                if poisson:
                    vsum = S["var"]
                else:
                    vsum = xp.maximum(S["sig2"] - 2 * mean * S["wsig"] + mean ** 2 * S["w2"], 0.0)
                std = xp.sqrt(vsum / S["w2"])
            return mean, std, vsum

        S = sums(valid)
        for _ in range(int(max_iter)):
            mean, std, _v = stats(S)
            cnt = xp.maximum(S["cnt"], 3.0)
            lim = xp.maximum(thres, xp.sqrt(2.0 * xp.log(cnt / np.sqrt(2.0 * np.pi)))) * std
            with np.errstate(invalid="ignore"):
                lo = (mean - lim).astype(xp.float32)[bin_of]
                hi = (mean + lim).astype(xp.float32)[bin_of]
                rej = valid & ((x < lo) | (x > hi))
            if not bool(rej.any()):
                break
            valid &= ~rej
            S = sums(valid)
        mean, std, vsum = stats(S)
        with np.errstate(divide="ignore", invalid="ignore"):
            sem = xp.sqrt(vsum) / S["w"]
        good = (S["w"] > 0) & (S["cnt"] > 0.5)
        return xp.where(good, mean, 0.0).T, xp.where(good, sem, 0.0).T

    def _trimmed_mean_array(self, xp, f, lo: float, hi: float):
        """Trimmed mean of a batch on the array module ``xp`` (numpy or cupy, same code).

        The selection of pyFAI ``medfilt1d_ng`` (``CsrIntegrator.medfilt``): within each bin,
        pixels sorted by corrected value ``(raw - dark) / omega``; with ``upper`` the
        cumulative ``omega`` up to and including a pixel, ``lower`` the same excluding it
        and ``last`` the bin's total, a pixel is kept when it lies wholly inside the quantile
        range, ``lo * last <= lower`` and ``upper <= hi * last`` (or straddles both limits,
        the median case), as pyFAI's cython ``CsrIntegrator.medfilt`` decides it (float32
        running sums; pyFAI's pure-python engine keeps the pixels that overlap the range
        instead, up to 3 % different on a real CeO2 frame). The sort is one batched argsort of ``bin + rank in [0, 1)``
        keys (bins stay contiguous), so every frame and bin is done at once. Invalid pixels
        (dummies, non-finite) carry no weight. Returns (n, npt) float64 mean and Poisson
        standard error.
        """
        _pix, bin_of, indptr, om, _dark = self._segments(xp)
        sig, valid, var = self._entries(xp, f)
        if var is None:
            var = xp.where(valid, xp.maximum(sig, xp.float32(1.0)), xp.float32(0.0))
        x = (sig / om[:, None]).astype(xp.float64)
        x = xp.where(valid, x, xp.inf)
        finite = xp.where(valid, x, xp.nan)
        xmin = xp.nanmin(finite, axis=0) if bool(valid.any()) else xp.zeros(x.shape[1])
        xmax = xp.nanmax(finite, axis=0) if bool(valid.any()) else xp.ones(x.shape[1])
        span = xp.maximum(xmax - xmin, 1e-300)
        # rank within [0, 1): invalid entries last in their bin
        frac = xp.where(valid, (x - xmin) / span * (1 - 2 ** -20), 1 - 2 ** -21)
        order = xp.argsort(bin_of[:, None].astype(xp.float64) + frac, axis=0)
        w = xp.take_along_axis(xp.where(valid, om[:, None], 0.0), order, axis=0)
        cw0 = xp.concatenate([xp.zeros((1, w.shape[1])), xp.cumsum(w, axis=0)])  # (P + 1, n)
        base = cw0[indptr[:-1]]                                                  # (nbins, n)
        upper = cw0[1:] - base[bin_of]
        last = (cw0[indptr[1:]] - base)[bin_of]
        # pyFAI's cython kernel stores the running sums and the limits in float32
        f32 = xp.float32
        lower = cw0[:-1] - base[bin_of]
        upper, lower = upper.astype(f32), lower.astype(f32)
        qmin, qmax = (lo * last).astype(f32), (hi * last).astype(f32)
        keep = (((qmin <= lower) & (upper <= qmax)) | ((qmin >= lower) & (upper >= qmax))) & (w > 0)
        s_sorted = xp.take_along_axis(sig, order, axis=0)
        v_sorted = xp.take_along_axis(var, order, axis=0)
        kw = keep.astype(xp.float64)
        S = self._segsum(xp, kw * s_sorted, indptr)
        V = self._segsum(xp, kw * v_sorted, indptr)
        N = self._segsum(xp, kw * w, indptr)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = S / N
            sem = xp.sqrt(V) / N
        good = N > 0
        return xp.where(good, mean, 0.0).T, xp.where(good, sem, 0.0).T

    # ---------------------------------------------------------------- pyFAI references
    def _common_kwargs(self):
        return dict(unit=self._unit, mask=self.mask, dark=self.dark, flat=self.flat,
                    polarization_factor=self.polarization_factor,
                    correctSolidAngle=self.solid_angle)

    @staticmethod
    def _check_method(result, split, name):
        m = result.method
        got = (m.split_lower, m.algo_lower, m.impl_lower)
        want = ("full" if split == "pseudo" else split, "csr", "cython")
        if got != want:
            raise IntegrationError(f"pyFAI {name} used method {got}; expected {want}")
        return result

    def reference(self, frame, monitor: float = 1.0):
        """pyFAI ``integrate1d_ng`` of one frame with the same settings (for tests/benchmarks).

        Returns the pyFAI ``Integrate1dResult``; its ``method`` is checked to be
        ``(split, "csr", "cython")``.
        """
        res = self.ai.integrate1d_ng(
            np.asarray(frame), self.npt, radial_range=self.radial_range,
            error_model="poisson" if self.error_model == "poisson" else None,
            method=(self.split, "csr", "cython"), normalization_factor=float(monitor),
            **self._common_kwargs())
        return self._check_method(res, self.split, "integrate1d_ng")

    def reference_sigma_clip(self, frame, thres: float = 4.0, max_iter: int = 5,
                             monitor: float = 1.0):
        """pyFAI ``sigma_clip_ng`` of one frame (no split, CSR, cython), same settings and
        radial grid as :meth:`integrate_sigma_clip`. The detector's dummy value is passed
        explicitly (``sigma_clip_ng`` does not look it up, ``integrate1d_ng`` does)."""
        dummy, delta = self.dummies(np.asarray(frame).dtype)
        res = self.ai.sigma_clip_ng(
            np.asarray(frame), self.npt, dummy=dummy, delta_dummy=delta,
            radial_range=self._aux_range(),
            error_model="poisson" if self.error_model == "poisson" else "azimuthal",
            method=("no", "csr", "cython"), thres=thres, max_iter=max_iter,
            normalization_factor=float(monitor), **self._common_kwargs())
        return self._check_method(res, "no", "sigma_clip_ng")

    def reference_trimmed_mean(self, frame, quantiles=(0.0, 0.9), monitor: float = 1.0):
        """pyFAI ``medfilt1d_ng`` of one frame with ``percentile=(100*lo, 100*hi)`` (detector
        dummy value passed explicitly, as for :meth:`reference_sigma_clip`)."""
        dummy, delta = self.dummies(np.asarray(frame).dtype)
        res = self.ai.medfilt1d_ng(
            np.asarray(frame), self.npt, dummy=dummy, delta_dummy=delta,
            radial_range=self._aux_range(),
            error_model="poisson", method=("no", "csr", "cython"),
            percentile=(100.0 * quantiles[0], 100.0 * quantiles[1]),
            normalization_factor=float(monitor), **self._common_kwargs())
        return self._check_method(res, "no", "medfilt1d_ng")


# ------------------------------------------------------------------------------------------
# Scan-level driver
# ------------------------------------------------------------------------------------------

def integrate_batch(integ: RadialIntegrator, block, monitor, ispec, source: str, first_index: int,
                    dummy=None, delta_dummy=None):
    """Check one batch of frames and integrate it with the spec's method.

    Parameters
    ----------
    integ : RadialIntegrator
    block : numpy.ndarray or cupy.ndarray, shape (n, H, W)
        Frames in their detector dtype (cupy: every method runs on the GPU).
    monitor : numpy.ndarray, shape (n,), or None
    ispec : pipelines.spec.IntegrationSpec
    source : str
        File and dataset, for error messages.
    first_index : int
        Index of ``block[0]`` in the scan, for error messages.

    Returns
    -------
    intensity, sigma : array of the block's module, shape (n, npt), float32 (sigma may be None)
    """
    from tasks.ingest import check_frames  # noqa: PLC0415

    check_frames(block, source, first_index, mask=integ.mask, dummy=dummy, delta_dummy=delta_dummy)
    method = ispec.method
    if method == "mean":
        return integ.integrate(block, monitor)
    if method == "sigma_clip":
        return integ.integrate_sigma_clip(block, monitor, thres=ispec.sigma_clip_threshold,
                                          max_iter=ispec.sigma_clip_max_iter)
    if method == "trimmed_mean":
        return integ.integrate_trimmed_mean(block, monitor, quantiles=ispec.trimmed_mean_quantiles)
    raise IntegrationError(f"integration.method {method!r} unknown")  # pragma: no cover


_WORKER_INTEGRATORS: dict = {}
_WORKER_LOCK = threading.Lock()


def _batch_source(scan):
    """What a batch is read from: the scan's reader when it has one (reads exactly the
    batch's frames), else its dask array (computes the chunks the batch overlaps)."""
    return scan.reader if getattr(scan, "reader", None) is not None else scan.frames


def _read_block(source, s: int, e: int) -> np.ndarray:
    """Frames ``s:e`` of a batch source (reader or dask array), as numpy."""
    if hasattr(source, "dask"):
        return np.asarray(source[s:e].compute(scheduler="synchronous"))
    return np.asarray(source[s:e])


def _worker_integrate(spec_json: str, base_dir, poni, shape, frames, monitor, s: int, e: int,
                      source: str, first_index: int = 0, backend: str = "cpu"):
    """Runs on a Dask worker: integrate frames ``s:e`` of ``frames`` (the scan's reader, or
    a dask array of the batch), frame ``s`` being scan frame ``first_index`` (integrator
    cached per process)."""
    from pipelines.spec import parse_spec  # noqa: PLC0415

    key = (spec_json, str(base_dir), str(poni), tuple(shape))
    # One build per process, under a lock: the threads of a threaded worker must not build
    # integrators at the same time (pyFAI's geometry evaluates numexpr expressions, and
    # numexpr crashed the process (SIGSEGV) when two threads did so at once).
    with _WORKER_LOCK:
        if key not in _WORKER_INTEGRATORS:
            _WORKER_INTEGRATORS.clear()
            spec = parse_spec(__import__("json").loads(spec_json), source="<worker>", base_dir=base_dir)
            _WORKER_INTEGRATORS[key] = (spec, integrator_from_spec(spec, shape=shape, poni=poni))
        spec, integ = _WORKER_INTEGRATORS[key]
    block = _read_block(frames, s, e)
    dummy, delta = integ.dummies(block.dtype)
    if backend == "gpu":
        import cupy  # noqa: PLC0415

        from tasks._xp import to_numpy  # noqa: PLC0415

        i, sg = integrate_batch(integ, cupy.asarray(block), monitor, spec.integration, source,
                                first_index, dummy, delta)  # frames cross PCIe in their int type
        return to_numpy(i), None if sg is None else to_numpy(sg)
    return integrate_batch(integ, block, monitor, spec.integration, source, first_index, dummy, delta)


def _integrate_on_cluster(client, scan, spec, poni, integ, ranges, src, emit, progress,
                          backend="cpu"):
    from distributed import as_completed  # noqa: PLC0415

    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    spec_json = spec.canonical_json()
    poni = poni if poni is not None else spec.resolve(spec.calibration.poni)
    todo = list(ranges)
    total = sum(e - s for s, e in ranges)
    done = 0

    def submit(r):
        s, e = r
        mon = None if scan.monitor is None else scan.monitor[s:e]
        if getattr(scan, "reader", None) is not None:  # the worker reads exactly s:e
            source, a, b = scan.reader, s, e
        else:
            source, a, b = scan.frames[s:e], 0, e - s
        return client.submit(_worker_integrate, spec_json, spec.base_dir, str(poni), integ.shape,
                             source, mon, a, b, src, first_index=s, backend=backend, key=f"integrate-{s}-{e}-{id(scan)}",
                             pure=False)

    futures = {}
    ac = as_completed()
    for _ in range(min(len(todo), 2 * n_workers)):
        r = todo.pop(0)
        f = submit(r)
        futures[f.key] = r
        ac.add(f)
    for f in ac:
        s, e = futures.pop(f.key)
        i, sg = f.result()
        f.release()
        emit(s, e, i, sg)
        done += e - s
        if progress is not None:
            progress(done, total)
        if todo:
            r2 = todo.pop(0)
            f2 = submit(r2)
            futures[f2.key] = r2
            ac.add(f2)


def integrator_from_spec(spec, shape=None, poni=None) -> RadialIntegrator:
    """Build the :class:`RadialIntegrator` a pipeline spec asks for.

    Parameters
    ----------
    spec : pipelines.spec.PipelineSpec
        ``calibration`` (poni, mask, dark, flat, polarization_factor, solid_angle) and
        ``integration`` (unit, npt, radial_range, error_model); paths are resolved with
        ``spec.resolve``.
    shape : (int, int), optional
        Detector shape of the frames.
    poni : str or Path, optional
        PONI file overriding ``spec.calibration.poni`` (e.g. given on the command line).

    Raises
    ------
    IntegrationError
        No PONI in the spec, or any error of :class:`RadialIntegrator`.
    """
    cal, integ = spec.calibration, spec.integration
    if poni is None and cal.poni is None:
        raise IntegrationError(f"{spec.base_dir or '<spec>'}: calibration.poni: a PONI file is "
                               f"required to integrate frames")
    split = "bbox" if integ.method == "mean" else "no"
    return RadialIntegrator(
        poni if poni is not None else spec.resolve(cal.poni), npt=integ.npt, unit=integ.unit, radial_range=integ.radial_range,
        mask=spec.resolve(cal.mask), dark=spec.resolve(cal.dark), flat=spec.resolve(cal.flat),
        polarization_factor=cal.polarization_factor, solid_angle=cal.solid_angle, shape=shape,
        split=split, error_model="poisson" if integ.error_model == "poisson" else "none")


def integrate_scan(scan, spec, progress: Callable[[int, int], None] | None = None,
                   integrator: RadialIntegrator | None = None, poni=None,
                   max_batch_bytes: int = 512 * 2**20, client=None, sink=None,
                   backend: str = "cpu", todo: np.ndarray | None = None):
    """Integrate every frame of a scan, streaming batches of frames.

    Frames are computed ``spec.integration.batch_frames`` at a time, fewer when a batch would
    exceed ``max_batch_bytes`` (the next batch is read while the current one is integrated,
    so about twice that is held); the scan is never loaded whole. Each batch is
    checked with :func:`tasks.ingest.check_frames` (mask and detector dummies allowed).

    Parameters
    ----------
    scan : tasks.ingest.Scan
        Kind ``"frames"`` or ``"map"``.
    spec : pipelines.spec.PipelineSpec
    progress : callable(done, total), optional
        Called after each batch with the number of frames done and the number to do.
    integrator : RadialIntegrator, optional
        Reuse an integrator (else built by :func:`integrator_from_spec`).
    poni : str or Path, optional
        PONI file overriding ``spec.calibration.poni``.
    max_batch_bytes : int
        Upper bound of the raw frames held per batch (default 512 MiB).
    client : distributed.Client, optional
        Spread the batches over this Dask cluster: each worker builds the integrator once
        (cached per process), reads its frames from the file itself (the readers re-open
        the file by path), and at most two batches per worker are in flight, so host memory
        stays bounded by batch size x workers whatever the scan length.
    sink : callable(start, stop, intensity, sigma), optional
        Receives each batch's results (frames ``start:stop``, arrays ``(stop - start, npt)``
        float32, sigma possibly None) instead of collecting them, so that nothing of size
        ``n_frames`` is held (e.g. :class:`tasks.store.GridWriter`). Batches arrive in scan
        order without a client, in completion order with one.
    backend : {"cpu", "gpu", "auto"}
        Where the integration runs (:func:`tasks._xp.resolve_backend`), every method
        (mean, sigma clip, trimmed mean). ``gpu`` without a client:
        :func:`_integrate_scan_gpu` (batch size from free GPU memory, pinned host staging,
        copy overlapped with compute on two CUDA streams); with a client, each worker moves
        its batch to its GPU.
    todo : numpy.ndarray of bool, shape (n_frames,), optional
        Frames to integrate (default: all). A resumed stage passes the frames an earlier
        attempt did not store (:attr:`tasks.store.GridWriter.todo`); batches are formed
        within the runs of consecutive frames to do, so no other frame is read. Each frame
        is integrated on its own, so the results do not depend on the batching.

    Returns
    -------
    radial : numpy.ndarray, shape (npt,), float64
        Bin centres in ``spec.integration.unit``.
    patterns : numpy.ndarray, shape (n_frames, npt), float32, or None
        Intensity per frame (divided by the scan's monitor when it has one); None with a
        ``sink``.
    sigma : numpy.ndarray, shape (n_frames, npt), float32, or None
        Standard errors (None for ``error_model="none"`` with ``method="mean"``, or with a
        ``sink``).

    Raises
    ------
    IntegrationError
        Sinogram input, empty scan, spec problems, ``todo`` of the wrong shape.
    tasks.ingest.IngestError
        Frames that fail :func:`check_frames`, unreadable chunks.
    tasks._xp.BackendError
        ``backend="gpu"`` without cupy or a device.
    """
    from tasks._xp import resolve_backend  # noqa: PLC0415

    backend = resolve_backend(backend)
    if scan.kind == "sinogram" or scan.frames is None:
        raise IntegrationError(f"{scan.source}: scan kind {scan.kind!r} holds no frames "
                               f"(already integrated?); nothing to integrate")
    n = scan.n_frames
    if n == 0:
        raise IntegrationError(f"{scan.source}: empty scan: no frames to integrate")
    integ = integrator or integrator_from_spec(spec, shape=scan.frame_shape, poni=poni)
    if tuple(scan.frame_shape) != integ.shape:
        raise IntegrationError(f"{scan.source}: frames of shape {scan.frame_shape} do not match "
                               f"the calibration's detector shape {integ.shape} ({integ.poni})")
    ispec = spec.integration
    method = ispec.method
    frame_bytes = int(np.prod(scan.frame_shape)) * np.dtype(scan.frames.dtype).itemsize
    batch = max(1, min(int(ispec.batch_frames), int(max_batch_bytes) // max(frame_bytes, 1)))
    dummy, delta = integ.dummies(scan.frames.dtype)
    src = f"{scan.source}: {scan.frames_dataset or 'frames'}"
    want_sigma = not (method == "mean" and ispec.error_model != "poisson")
    radial = integ.radial if method == "mean" else integ.radial_clip
    if sink is None:
        patterns = np.zeros((n, integ.npt), np.float32)
        sigma = np.zeros((n, integ.npt), np.float32) if want_sigma else None

        def emit(s, e, i, sg):
            patterns[s:e] = i
            if sigma is not None and sg is not None:
                sigma[s:e] = sg
    else:
        patterns = sigma = None

        def emit(s, e, i, sg):
            sink(s, e, i, sg if want_sigma else None)

    if todo is not None:
        todo = np.asarray(todo, dtype=bool)
        if todo.shape != (n,):
            raise IntegrationError(f"{scan.source}: todo has shape {todo.shape}; expected ({n},), "
                                   f"one flag per frame")
        if not todo.any():
            return radial, patterns, sigma
    if backend == "gpu" and client is None:
        _integrate_scan_gpu(integ, scan, ispec, src, emit, progress, max_batch_bytes, todo=todo)
        return radial, patterns, sigma
    ranges = batch_ranges(n, batch, todo)
    if client is not None:
        _integrate_on_cluster(client, scan, spec, poni, integ, ranges, src, emit, progress,
                              backend=backend)
        return radial, patterns, sigma

    source = _batch_source(scan)
    total = sum(e - s for s, e in ranges)

    def load(r):
        s, e = r
        return s, e, _read_block(source, s, e)

    done = 0
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(load, ranges[0])
        for k in range(len(ranges)):
            s, e, block = fut.result()
            if k + 1 < len(ranges):
                fut = pool.submit(load, ranges[k + 1])
            mon = None if scan.monitor is None else scan.monitor[s:e]
            i, sg = integrate_batch(integ, block, mon, ispec, src, s, dummy, delta)
            del block
            emit(s, e, i, sg)
            done += e - s
            if progress is not None:
                progress(done, total)
    return radial, patterns, sigma


def batch_ranges(n: int, batch: int, todo: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Frame ranges ``[(start, stop), ...]`` of at most ``batch`` frames covering the frames
    to do (``todo``, bool of shape (n,); default all ``n``), in scan order; a batch never
    spans a frame that is not to be done."""
    if todo is None:
        return [(s, min(n, s + batch)) for s in range(0, n, batch)]
    edges = np.flatnonzero(np.diff(np.concatenate([[0], np.asarray(todo, np.int8), [0]])))
    return [(s, min(e, s + batch)) for a, e in zip(edges[::2], edges[1::2])
            for s in range(int(a), int(e), batch)]


def _integrate_scan_gpu(integ: RadialIntegrator, scan, ispec, src: str, emit, progress,
                        max_batch_bytes: int, free_bytes: int | None = None,
                        todo: np.ndarray | None = None) -> int:
    """Integration of a whole scan on the GPU (the spec's method), streamed through pinned
    host buffers.

    Pipeline (:data:`STAGING_BUFFERS` = 3 pinned host buffers and device buffers, a copy
    stream and a compute stream; no device-wide synchronisation)::

        compute stream: integrate device[k%3], results -> pinned (async)   -- queued first
        host          : batch k+1 -> pinned[(k+1)%3]: decoded straight into it by the
                        reader (HDF5, several threads) or copied by several threads
        copy stream   : pinned[(k+1)%3] -> device[(k+1)%3] (async H2D, after the kernels
                        that read that device buffer)
        host          : wait for batch k's results, emit               -- (n, npt) only
        reader thread : reads batch k+2 ahead when the source cannot decode into a buffer

    Frames cross PCIe in their detector integer type and are read in place by the fused
    kernel (:func:`tasks.cuda_kernels.integrate_csr`). The batch is the number of frames that
    fit in half the free device memory (:func:`tasks._xp.batch_from_free_memory` with
    :meth:`RadialIntegrator.gpu_bytes`, the device buffers counted), capped so that the
    pinned buffers stay within ``max_batch_bytes``.

    Parameters
    ----------
    integ : RadialIntegrator
    scan : tasks.ingest.Scan
    ispec : pipelines.spec.IntegrationSpec
    src : str
        File and dataset, for messages.
    emit : callable(start, stop, intensity, sigma)
        Receives numpy ``(stop - start, npt)`` float32 results in scan order.
    progress : callable(done, total) or None
    max_batch_bytes : int
        Bound on the pinned host memory of both staging buffers together.
    free_bytes : int, optional
        Free device memory to plan with (default: :func:`tasks._xp.free_gpu_bytes`).
    todo : numpy.ndarray of bool, shape (n_frames,), optional
        Frames to integrate (default all; :func:`integrate_scan`).

    Returns
    -------
    int
        The batch size used (frames).
    """
    import cupy as cp  # noqa: PLC0415
    import cupyx  # noqa: PLC0415

    from tasks._xp import batch_from_free_memory, free_gpu_bytes  # noqa: PLC0415

    n = scan.n_frames
    H, W = integ.shape
    dtype = np.dtype(scan.frames.dtype)
    frame_bytes = H * W * dtype.itemsize
    per_frame, fixed = integ.gpu_bytes(dtype, ispec.method)
    free = free_gpu_bytes() if free_bytes is None else int(free_bytes)
    nbuf = STAGING_BUFFERS
    # nbuf device frame buffers (staged, in flight, being computed) besides the temporaries
    batch = batch_from_free_memory(free, per_frame + (nbuf - 1) * frame_bytes, fixed,
                                   fraction=0.5,
                                   max_items=min(n, max(1, max_batch_bytes // (nbuf * frame_bytes))),
                                   what=f"GPU integration of {H}x{W} {dtype} frames")
    dummy, delta = integ.dummies(dtype)
    source = _batch_source(scan)
    ranges = batch_ranges(n, batch, todo)
    total = sum(e - s for s, e in ranges)
    done = 0
    pinned = [cupyx.empty_pinned((batch, H, W), dtype) for _ in range(nbuf)]
    dev = [cp.empty((batch, H, W), dtype) for _ in range(nbuf)]
    copy_stream = cp.cuda.Stream(non_blocking=True)
    comp_stream = cp.cuda.Stream(non_blocking=True)
    copied: list = [None] * nbuf      # H2D of buffer j done (pinned[j] free, dev[j] ready)
    computed: list = [None] * nbuf    # kernels reading dev[j] done
    copier = ThreadPoolExecutor(copy_threads())

    # a reader that decodes into a given array (HDF5 frames) fills the pinned buffer itself:
    # no fresh host array per batch (page faults) and no second copy
    direct = callable(getattr(source, "read_into", None))

    def load(r):
        s, e = r
        return s, e, (r if direct else _read_block(source, s, e))

    def stage(k, block):
        """Host block -> pinned[k % nbuf] (several threads) -> device (async, copy stream);
        ``block`` is the frame range itself when the reader decodes into the buffer."""
        j = k % nbuf
        m = (block[1] - block[0]) if direct else block.shape[0]
        if copied[j] is not None:
            copied[j].synchronize()  # pinned[j] no longer read by an earlier copy
        if direct:
            source.read_into(block[0], block[1], pinned[j][:m])
        else:
            parallel_copy(pinned[j][:m], block, copier)
        if computed[j] is not None:
            copy_stream.wait_event(computed[j])  # dev[j] no longer read by the kernels
        dev[j][:m].set(pinned[j][:m], stream=copy_stream)
        copied[j] = copy_stream.record()

    def compute(k, s, e):
        """Queue batch k's kernels and the copy of its results; returns the host results'
        event and arrays (filled when the event has completed)."""
        j = k % nbuf
        m = e - s
        comp_stream.wait_event(copied[j])
        with comp_stream:
            mon = None if scan.monitor is None else scan.monitor[s:e]
            i, sg = integrate_batch(integ, dev[j][:m], mon, ispec, src, s, dummy, delta)
            computed[j] = comp_stream.record()
            i_h = cupyx.empty_pinned(i.shape, i.dtype)
            i.get(stream=comp_stream, out=i_h, blocking=False)
            sg_h = None
            if sg is not None:
                sg_h = cupyx.empty_pinned(sg.shape, sg.dtype)
                sg.get(stream=comp_stream, out=sg_h, blocking=False)
            return comp_stream.record(), i_h, sg_h

    try:
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(load, ranges[0])
            s0, e0, block = fut.result()
            if len(ranges) > 1:
                fut = pool.submit(load, ranges[1])
            stage(0, block)
            cur = (s0, e0)
            for k in range(len(ranges)):
                s, e = cur
                # order: queue batch k on the GPU first, then stage batch k+1 on the host
                # while it runs, then collect k's results (no device-wide synchronisation)
                ev, i_h, sg_h = compute(k, s, e)
                nxt = None
                if k + 1 < len(ranges):
                    s1, e1, block = fut.result()
                    if k + 2 < len(ranges):
                        fut = pool.submit(load, ranges[k + 2])
                    stage(k + 1, block)
                    nxt = (s1, e1)
                    del block
                ev.synchronize()
                emit(s, e, np.array(i_h), None if sg_h is None else np.array(sg_h))
                done += e - s
                if progress is not None:
                    progress(done, total)
                cur = nxt
        copy_stream.synchronize()
    finally:
        copier.shutdown(wait=True)
    return batch


STAGING_BUFFERS = 3


def copy_threads() -> int:
    """Threads that copy frames into pinned staging buffers: all cores, at most 16."""
    return max(1, min(16, os.cpu_count() or 1))


def parallel_copy(dst: np.ndarray, src: np.ndarray, pool: ThreadPoolExecutor | None = None,
                  min_bytes: int = 1 << 22) -> None:
    """``dst[...] = src`` by several threads, split along the first axis and then in
    contiguous row blocks (numpy releases the GIL while it copies).

    A single thread copies ~5-10 GB/s into pinned memory; the host-to-device link moves
    ~50 GB/s, so the staging copy must use several cores to keep it busy.

    Parameters
    ----------
    dst, src : numpy.ndarray, same shape
        ``dst`` is typically a pinned buffer; dtypes may differ (numpy casting rules).
    pool : ThreadPoolExecutor, optional
        Threads to use; None copies in the calling thread.
    min_bytes : int
        Pieces are at least this large.

    Raises
    ------
    ValueError
        Shapes differ.
    """
    if dst.shape != src.shape:
        raise ValueError(f"parallel_copy: shapes differ, {dst.shape} vs {src.shape}")
    if pool is None or dst.nbytes < 2 * min_bytes or dst.ndim == 0:
        np.copyto(dst, src)
        return
    d2 = dst.reshape(dst.shape[0] * (dst.shape[1] if dst.ndim > 1 else 1), -1) if dst.ndim > 1 \
        else dst.reshape(-1, 1)
    s2 = src.reshape(d2.shape)
    rows = d2.shape[0]
    pieces = max(1, min(rows, 4 * copy_threads(), dst.nbytes // min_bytes))
    edges = np.linspace(0, rows, pieces + 1).astype(int)
    futs = [pool.submit(np.copyto, d2[a:b], s2[a:b]) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    for f in futs:
        f.result()
