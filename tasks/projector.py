"""Parallel-beam pencil-beam projector (forward and exact adjoint) for XRD-CT, with
interchangeable array backends and a differentiable PyTorch path.

Geometry and conventions are those of :func:`tasks.reconstruct.radon` and
:func:`tasks.reconstruct.fbp`: the image is ``n_pixels x n_pixels`` pixels of one
translation step, column ``j`` at ``x = j - (n - 1) / 2`` and row ``i`` at
``y = (n - 1) / 2 - i`` (row 0 on top); a point is seen at angle ``theta`` on detector
(translation) coordinate ``t = x cos(theta) + y sin(theta) + center``. Each pixel is a
uniform square and each measurement is the exact integral of the image over a strip of
``beam_width`` translation steps (the pencil beam swept along one step), so
``Projector(...).forward_np(img)`` equals ``radon(img, ...)`` to float32 rounding.

Backends (one interface, :class:`Projector`)
--------------------------------------------
``"torch"``
    The sparse system matrix ``A`` (:func:`tasks.reconstruct.projection_matrix`, built
    once with numpy) and its transpose are held as ``torch.sparse_csr`` float32 tensors on
    ``device``; :meth:`Projector.forward` and :meth:`Projector.adjoint` take and return
    torch tensors and are differentiable (a :class:`torch.autograd.Function` whose
    backward is the other product, so double backward works too).
``"numpy"``
    The same matrix as ``scipy.sparse`` CSR.
``"cupy"``
    The same matrix as ``cupyx.scipy.sparse`` CSR on the current GPU (needs cupy).
``"astra"``
    astra-toolbox's CPU ``strip`` projector (``line`` for ``beam_width=0``) through
    ``astra.OpTomo``, one channel at a time, with the rotation axis placed by
    ``astra.geom_postalignment`` (W. van Aarle et al., Opt. Express 24 (2016) 25129).
    A different discretisation of the same integrals: agrees with the matrix backends
    within ~1e-3 relative RMS on smooth images (tests/test_projector.py). Not
    differentiable.

Channels (radial bins, or a batch of images) are the dense right-hand side of one sparse
product, so all bins of a slice are projected in one call.

Memory: ``A`` has about ``n_pixels**2 * n_angle * (1 + |cos| + |sin|)`` non-zeros
(~2.3 per pixel and angle on average, 8 bytes each with int32 indices), held twice
(``A`` and ``A.T``) on the matrix backends (on the CPU the torch tensors share the scipy
arrays; on a GPU the host copy of ``A`` stays too): ~0.3 GB per copy for 256 x 256 pixels and 256 angles, ~1.7 GB for
708 x 708 pixels and 180 angles. Building it costs ~1 s per 5 million non-zeros.
"""

from __future__ import annotations

import warnings

import numpy as np

from tasks.reconstruct import ReconstructionError, _center, projection_matrix
from tasks._xp import to_numpy

__all__ = ["Projector", "ProjectorError", "BACKENDS"]

BACKENDS = ("torch", "numpy", "cupy", "astra")


class ProjectorError(ReconstructionError):
    """Bad projector argument or array; the message names it and what was expected."""


# --------------------------------------------------------------------------------------
# torch autograd
# --------------------------------------------------------------------------------------

_SPARSE_MATMUL = None


def _sparse_matmul_fn():
    """``torch.autograd.Function`` computing ``M @ X`` (sparse CSR M, dense X (N, C)) with
    gradient ``M.T @ G`` (the transpose is passed in, never formed on the fly)."""
    global _SPARSE_MATMUL
    if _SPARSE_MATMUL is None:
        import torch

        class _SparseMatmul(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x2, m, mt):
                ctx.m, ctx.mt = m, mt
                out = m @ x2.to(m.dtype).contiguous()
                return out.to(x2.dtype)

            @staticmethod
            def backward(ctx, g):
                # applying the Function again keeps the graph for double backward
                return _SparseMatmul.apply(g, ctx.mt, ctx.m), None, None

        _SPARSE_MATMUL = _SparseMatmul
    return _SPARSE_MATMUL


def _torch_csr(mat, device):
    import torch

    # int32 indices when they fit: half the index memory and ~1.4x faster products
    it = np.int32 if max(mat.nnz, *mat.shape) < 2**31 - 1 else np.int64
    crow = torch.from_numpy(np.ascontiguousarray(mat.indptr).astype(it, copy=False))
    col = torch.from_numpy(np.ascontiguousarray(mat.indices).astype(it, copy=False))
    val = torch.from_numpy(np.ascontiguousarray(mat.data, dtype=np.float32))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        t = torch.sparse_csr_tensor(crow, col, val, size=mat.shape, dtype=torch.float32,
                                    check_invariants=False)
    return t.to(device)


# --------------------------------------------------------------------------------------
# the projector
# --------------------------------------------------------------------------------------

class Projector:
    """Forward projector ``A`` and its exact adjoint ``A.T`` for parallel-beam XRD-CT.

    Parameters
    ----------
    angles_deg : array_like, shape (n_angle,)
        Rotation angles in degrees, finite, at least one.
    n_translation : int
        Translation (detector) positions per angle, >= 2.
    center : float or None
        Translation-pixel position of the rotation axis (0 = first position); None =
        ``(n_translation - 1) / 2``. The image centre is on the axis.
    n_pixels : int, optional
        Side of the square image (pixel = one translation step); default
        ``n_translation``.
    backend : {"torch", "numpy", "cupy", "astra"}
        Array backend, see the module docstring. ``forward``/``adjoint`` take and return
        that backend's arrays (torch tensors, numpy arrays, cupy arrays; numpy for
        ``astra``); numpy input to the torch and cupy backends is converted.
    device : str or torch.device
        Torch device of the ``torch`` backend (``"cpu"``, ``"cuda"``, ``"cuda:1"``); the
        ``cupy`` backend uses cupy's current device; ignored otherwise.
    beam_width : float
        Beam width in translation steps, >= 0 (1 = strip integrals one step wide, 0 =
        line integrals). The astra backend supports 1 (``strip``) and 0 (``line``) only.

    Attributes
    ----------
    angles_deg : numpy.ndarray, shape (n_angle,), float64
    n_angle, n_translation, n_pixels : int
    center : float
    image_shape : tuple (n_pixels, n_pixels)
    sino_shape : tuple (n_angle, n_translation)
    shape : tuple (n_angle * n_translation, n_pixels**2), the matrix shape

    Raises
    ------
    ProjectorError
        Bad angles, sizes, centre, beam width, backend or device; a backend whose library
        does not import (cupy, astra, torch) or a CUDA device that is absent.

    Notes
    -----
    The matrix is :func:`tasks.reconstruct.projection_matrix` (the exact pixel-footprint
    strip integrals of :func:`tasks.reconstruct.radon`); on the matrix backends
    ``adjoint`` is its exact transpose, so ``<A x, y> = <x, A.T y>`` to float32 rounding.

    Examples
    --------
    >>> P = Projector(np.arange(90) * 2.0, 64)
    >>> sino = P.forward(torch.rand(3, 64, 64, requires_grad=True))   # (3, 90, 64)
    >>> sino_np = P.forward_np(np.random.rand(64, 64, 3))              # (90, 64, 3)
    """

    def __init__(self, angles_deg, n_translation, center=None, *, n_pixels=None,
                 backend="torch", device="cpu", beam_width=1.0):
        if backend not in BACKENDS:
            raise ProjectorError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        ang = np.asarray(to_numpy(angles_deg), dtype=np.float64).ravel()
        if ang.size < 1 or not np.all(np.isfinite(ang)):
            raise ProjectorError(f"angles_deg: expected at least one finite angle (degrees), got "
                                 f"{ang.size} values")
        try:
            nt = int(n_translation)
        except (TypeError, ValueError):
            nt = -1
        if nt != n_translation or nt < 2:
            raise ProjectorError(f"n_translation: expected an integer >= 2, got {n_translation!r}")
        n = nt if n_pixels is None else n_pixels
        try:
            n_int = int(n)
        except (TypeError, ValueError):
            n_int = -1
        if n_int != n or n_int < 1:
            raise ProjectorError(f"n_pixels: expected an integer >= 1, got {n_pixels!r}")
        try:
            bw = float(beam_width)
        except (TypeError, ValueError):
            bw = float("nan")
        if not (bw >= 0 and np.isfinite(bw)):
            raise ProjectorError(f"beam_width: expected a finite width >= 0 translation steps, "
                                 f"got {beam_width!r}")
        try:
            c = _center(center, nt)
        except ReconstructionError as err:
            raise ProjectorError(str(err)) from None
        self.angles_deg = ang
        self.n_angle = ang.size
        self.n_translation = nt
        self.n_pixels = n_int
        self.center = c
        self.beam_width = bw
        self.backend = backend
        self.image_shape = (n_int, n_int)
        self.sino_shape = (self.n_angle, nt)
        self.shape = (self.n_angle * nt, n_int * n_int)
        self.device = device
        self._mat = None           # scipy CSR A (host), matrix backends
        self._A = self._At = None  # backend-native A and A.T
        if backend == "astra":
            self._init_astra()
        else:
            self._init_matrix(device)

    # ------------------------------------------------------------------ construction
    def _init_matrix(self, device, mat=None):
        if mat is None:
            mat = projection_matrix(self.angles_deg, self.n_translation, self.center,
                                    n_pixels=self.n_pixels, beam_width=self.beam_width)
        self._mat = mat
        if self.backend == "numpy":
            self._A, self._At = mat, mat.T.tocsr()
        elif self.backend == "torch":
            try:
                import torch
            except ImportError as err:  # pragma: no cover - torch is in the dev extra
                raise ProjectorError("backend 'torch': torch does not import") from err
            try:
                dev = torch.device(device)
            except (RuntimeError, TypeError) as err:
                raise ProjectorError(f"device: not a torch device: {device!r} ({err})") from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ProjectorError(f"device: {device!r} requested but torch sees no CUDA device")
            self.device = dev
            self._A = _torch_csr(mat, dev)
            self._At = _torch_csr(mat.T.tocsr(), dev)
        else:  # cupy
            try:
                import cupy
                import cupyx.scipy.sparse as csp
                if cupy.cuda.runtime.getDeviceCount() < 1:
                    raise RuntimeError("no CUDA device")
            except Exception as err:  # noqa: BLE001 - ImportError, no driver, no device
                raise ProjectorError(f"backend 'cupy': cupy with a CUDA device is needed "
                                     f"({type(err).__name__}: {err})") from None
            self._A = csp.csr_matrix(mat)
            self._At = csp.csr_matrix(mat.T.tocsr())

    def _init_astra(self):
        try:
            import astra
        except ImportError as err:
            raise ProjectorError("backend 'astra': astra-toolbox is not installed "
                                 "(pip install astra-toolbox)") from err
        kinds = {1.0: "strip", 0.0: "line"}
        if self.beam_width not in kinds:
            raise ProjectorError(f"beam_width: the astra backend supports 1 ('strip') and 0 "
                                 f"('line') only, got {self.beam_width!r}")
        n, nt = self.n_pixels, self.n_translation
        vg = astra.create_vol_geom(n, n)
        pg = astra.create_proj_geom("parallel", 1.0, nt, np.deg2rad(self.angles_deg))
        # astra's axis projects onto the detector centre (nt - 1) / 2; ours onto `center`
        pg = astra.geom_postalignment(pg, -(self.center - (nt - 1) / 2.0))
        self._astra = astra
        self._astra_pid = astra.create_projector(kinds[self.beam_width], pg, vg)
        self._A = astra.OpTomo(self._astra_pid)
        self._At = self._A.T

    def __del__(self):
        pid = getattr(self, "_astra_pid", None)
        if pid is not None:
            try:
                self._astra.projector.delete(pid)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass

    def __repr__(self):
        return (f"Projector(n_angle={self.n_angle}, n_translation={self.n_translation}, "
                f"n_pixels={self.n_pixels}, center={self.center:g}, backend={self.backend!r}, "
                f"beam_width={self.beam_width:g})")

    @property
    def matrix(self):
        """The system matrix ``A`` as ``scipy.sparse.csr_matrix`` (float32), shape
        :attr:`shape`; built on first use for the astra backend."""
        if self._mat is None:
            self._mat = projection_matrix(self.angles_deg, self.n_translation, self.center,
                                          n_pixels=self.n_pixels, beam_width=self.beam_width)
        return self._mat

    def subset(self, angle_index):
        """A projector for some of the angles (rows of ``A``), same backend and device.

        Parameters
        ----------
        angle_index : array_like of int
            Indices into :attr:`angles_deg` (any order; the sinogram rows follow it).

        Returns
        -------
        Projector
            The matrix backends slice the parent's matrix (no rebuild).
        """
        idx = np.asarray(angle_index).ravel()
        if idx.size < 1 or not np.issubdtype(idx.dtype, np.integer) or \
                idx.min() < -self.n_angle or idx.max() >= self.n_angle:
            raise ProjectorError(f"angle_index: expected integer indices into the {self.n_angle} "
                                 f"angles, got {angle_index!r}")
        idx = idx % self.n_angle
        if self.backend == "astra":
            return Projector(self.angles_deg[idx], self.n_translation, self.center,
                             n_pixels=self.n_pixels, backend="astra", beam_width=self.beam_width)
        sub = object.__new__(Projector)
        sub.__dict__.update({k: v for k, v in self.__dict__.items()
                             if k not in ("_mat", "_A", "_At")})
        sub.angles_deg = self.angles_deg[idx]
        sub.n_angle = idx.size
        sub.sino_shape = (idx.size, self.n_translation)
        sub.shape = (idx.size * self.n_translation, self.shape[1])
        rows = (idx[:, None] * self.n_translation + np.arange(self.n_translation)).ravel()
        sub._init_matrix(self.device, self._mat[rows])
        return sub

    # ------------------------------------------------------------------ products
    def _matmul(self, x2, transpose):
        """``A @ x2`` or ``A.T @ x2``; x2 (N, C) in the backend's array type."""
        if self.backend == "torch":
            m, mt = (self._At, self._A) if transpose else (self._A, self._At)
            return _sparse_matmul_fn().apply(x2, m, mt)
        if self.backend == "astra":
            op = self._At if transpose else self._A
            out = np.empty((op.shape[0], x2.shape[1]), np.float32)
            for k in range(x2.shape[1]):
                out[:, k] = op @ np.ascontiguousarray(x2[:, k], dtype=np.float32)
            return out
        m = self._At if transpose else self._A
        if self.backend == "cupy":
            import cupy

            # cuSPARSE's SpMM wants one dtype and a contiguous dense operand
            return m @ cupy.ascontiguousarray(x2, dtype=cupy.float32)
        return m @ x2

    def matvec(self, x2):
        """``A @ x2`` on flattened images, channels last: x2 (n_pixels**2, C) -> (n_angle *
        n_translation, C), in the backend's array type (see :meth:`asarray`);
        differentiable on the torch backend. Rows are ``angle * n_translation + t``,
        columns ``i * n_pixels + j``."""
        return self._matmul(x2, False)

    def rmatvec(self, y2):
        """``A.T @ y2``: y2 (n_angle * n_translation, C) -> (n_pixels**2, C), backend type."""
        return self._matmul(y2, True)

    def asarray(self, a):
        """``a`` (numpy, cupy or torch) as the backend's float32 array type on its device:
        torch tensor (torch), cupy array (cupy), numpy array (numpy, astra)."""
        a = self._native(a, "a")
        if self.backend == "torch":
            import torch

            return a.to(torch.float32)
        return a.astype(np.float32, copy=False)

    @staticmethod
    def to_numpy(a):
        """A backend array (torch tensor on any device, cupy, numpy) as numpy."""
        if type(a).__module__.startswith("torch"):
            return a.detach().cpu().numpy()
        return np.asarray(to_numpy(a))

    def _native(self, a, name):
        if self.backend == "torch":
            import torch

            if not isinstance(a, torch.Tensor):
                a = torch.as_tensor(np.asarray(to_numpy(a)), dtype=torch.float32)
            if a.device != self.device:
                a = a.to(self.device)
            if not a.is_floating_point():
                a = a.to(torch.float32)
            return a
        if self.backend == "cupy":
            import cupy

            a = cupy.asarray(a)
            return a if a.dtype in (cupy.float32, cupy.float64) else a.astype(cupy.float32)
        a = np.asarray(to_numpy(a))
        return a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)

    def _check(self, a, trailing, name, what):
        shape = tuple(a.shape)
        if len(shape) < 2 or shape[-2:] != trailing:
            raise ProjectorError(f"{name}: expected shape (..., {trailing[0]}, {trailing[1]}) "
                                 f"{what}, got {shape}")

    def _apply(self, a, transpose, name):
        a = self._native(a, name)
        src, dst = (self.sino_shape, self.image_shape) if transpose else \
            (self.image_shape, self.sino_shape)
        self._check(a, src, name, "(channels first)" if not transpose else
                    "(channels first: ..., angle, translation)")
        lead = tuple(a.shape[:-2])
        c = int(np.prod(lead)) if lead else 1
        x2 = a.reshape(c, src[0] * src[1]).T          # (N, C)
        y2 = self._matmul(x2, transpose)               # (M, C)
        return y2.T.reshape(*lead, *dst)

    def forward(self, x):
        """Project images: ``y = A x``.

        Parameters
        ----------
        x : array, shape (..., n_pixels, n_pixels)
            Images, channels (radial bins, batch) first, rows top (largest y) to bottom.
            torch tensor (torch backend; differentiable), numpy or cupy array.

        Returns
        -------
        array, shape (..., n_angle, n_translation)
            Same leading dimensions and dtype as ``x`` (float32 arithmetic), backend array
            type. Units: image value x translation step.

        Raises
        ------
        ProjectorError
            Trailing dimensions not ``(n_pixels, n_pixels)``.
        """
        return self._apply(x, False, "x")

    __call__ = forward

    def adjoint(self, y):
        """Back-project sinograms with the exact transpose: ``x = A.T y``.

        Parameters
        ----------
        y : array, shape (..., n_angle, n_translation)
            Sinograms, channels first (backend array type; differentiable on torch).

        Returns
        -------
        array, shape (..., n_pixels, n_pixels)

        Raises
        ------
        ProjectorError
            Trailing dimensions not ``(n_angle, n_translation)``.
        """
        return self._apply(y, True, "y")

    def _apply_np(self, a, transpose, name):
        a = np.asarray(to_numpy(a))
        src, dst = (self.sino_shape, self.image_shape) if transpose else \
            (self.image_shape, self.sino_shape)
        if a.ndim not in (2, 3) or a.shape[:2] != src:
            raise ProjectorError(f"{name}: expected shape ({src[0]}, {src[1]}) or ({src[0]}, "
                                 f"{src[1]}, n_bin) (bins last), got {a.shape}")
        two_d = a.ndim == 2
        x2 = np.ascontiguousarray(a.reshape(src[0] * src[1], -1), dtype=np.float32)
        if self.backend == "torch":
            import torch

            with torch.no_grad():
                y2 = self._matmul(torch.from_numpy(x2).to(self.device), transpose)
            y2 = y2.cpu().numpy()
        elif self.backend == "cupy":
            import cupy

            y2 = self._matmul(cupy.asarray(x2), transpose).get()
        else:
            y2 = self._matmul(x2, transpose)
        y = np.asarray(y2, dtype=np.float32).reshape(*dst, -1)
        return y[:, :, 0] if two_d else y

    def forward_np(self, image):
        """Project a bins-last numpy image as :func:`tasks.reconstruct.radon` does.

        Parameters
        ----------
        image : numpy.ndarray, shape (n_pixels, n_pixels) or (n_pixels, n_pixels, n_bin)

        Returns
        -------
        numpy.ndarray, shape (n_angle, n_translation[, n_bin]), float32
        """
        return self._apply_np(image, False, "image")

    def adjoint_np(self, sino):
        """Back-project a bins-last numpy sinogram with ``A.T`` (no filter).

        Parameters
        ----------
        sino : numpy.ndarray, shape (n_angle, n_translation) or (n_angle, n_translation, n_bin)

        Returns
        -------
        numpy.ndarray, shape (n_pixels, n_pixels[, n_bin]), float32
        """
        return self._apply_np(sino, True, "sino")

    def row_sums(self):
        """``A @ 1``: the length of each ray through the image, (n_angle, n_translation)
        float64 numpy (SIRT's row normalisation)."""
        return self.forward_np(np.ones(self.image_shape, np.float32)).astype(np.float64)

    def col_sums(self):
        """``A.T @ 1``: the total weight of each pixel, (n_pixels, n_pixels) float64 numpy
        (SIRT's column normalisation)."""
        return self.adjoint_np(np.ones(self.sino_shape, np.float32)).astype(np.float64)
