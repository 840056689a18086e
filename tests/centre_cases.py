"""Sinograms with a known centre of rotation for the centre-finding tests and benchmark.

Total-intensity (sum over radial bins) sinograms of the simulator's ``shapes`` phantom
(:func:`tasks.simulate.make_phantom`), projected with :func:`tasks.reconstruct.radon`
(strip integrals, a beam one translation step wide) about an axis at a known column, then
optionally: a constant air-scatter level, single-crystal hot spots (isolated bins raised by
a fraction of their own level) and Poisson noise at a given number of counts per radial
bin, as the simulator's scans carry them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CentreCase:
    """One scan geometry and its corruptions.

    n_translation, n_angle : scan size. span : 180 or 360 (angles ``linspace(0, span,
    n_angle, endpoint=False)`` unless ``endpoint``). offset : axis minus the middle of the
    translation range, px. counts : expected counts per radial bin at the brightest
    sample position; the total-intensity sinogram sums ``n_bins`` such bins, so its
    brightest bin holds ``counts * n_bins`` counts (None: no noise). hot : fraction of
    (angle, translation) bins with a single-crystal spot, which adds 10-100 % of the
    sample's own total intensity there. air : air level over the mean sample level of the
    brightest projection. sample : sample diameter over the width left by the offset.
    seed : random seed.
    """

    n_translation: int
    n_angle: int
    span: float = 180.0
    offset: float = 0.0
    counts: float | None = None
    hot: float = 0.0
    air: float = 0.0
    endpoint: bool = False
    sample: float = 0.9
    n_bins: int = 250
    seed: int = 0

    @property
    def center(self) -> float:
        return (self.n_translation - 1) / 2.0 + self.offset

    @property
    def angles(self) -> np.ndarray:
        return np.linspace(0.0, self.span, self.n_angle, endpoint=self.endpoint)

    def label(self) -> str:
        noise = "clean" if self.counts is None else f"{self.counts:g}cts/bin"
        extra = (f"{' hot' if self.hot else ''}{' air' if self.air else ''}"
                 f"{' +end' if self.endpoint else ''}")
        return (f"{self.n_translation}x{self.n_angle}/{self.span:g} off{self.offset:+.2f} "
                f"{noise}{extra}")


def make_sinogram(case: CentreCase) -> tuple[np.ndarray, np.ndarray]:
    """(sinogram (n_angle, n_translation) float64, angles (n_angle,) deg) for ``case``."""
    from tasks.reconstruct import radon
    from tasks.simulate import SimConfig, make_phantom

    n = case.n_translation
    rng = np.random.default_rng(case.seed)
    # the sample fills `sample` of the diameter that the offset axis leaves on the detector
    free = 2.0 * (n / 2.0 - 0.5 - abs(case.offset)) / n
    frac = float(np.clip(case.sample * free, 0.11, 0.95))
    cfg = SimConfig(n_translations=n, n_angles=8, sample_radius_frac=frac, cor_offset_px=0.0)
    mass = make_phantom(cfg, 3)                            # (3, n, n)
    # each phase scatters a different total intensity; turn the phantom by a random angle
    # so that the seeds do not all show the same object
    img = np.tensordot(np.array([1.0, 0.6, 1.7]), mass, axes=1)
    from scipy import ndimage

    img = ndimage.rotate(img, float(rng.uniform(0, 360)), reshape=False, order=1)
    img = np.clip(img, 0, None)
    sino = np.asarray(radon(img, case.angles, center=case.center), np.float64)
    peak = float(sino.max())
    base = 0.0
    if case.air:
        base = case.air * float(sino.mean(axis=1).max())
        sino = sino + base
    if case.hot:
        # a single-crystal spot raises one bin of the pattern tens of times; in the total
        # over radial bins that is +10-100 % of the sample's own signal in that bin
        hit = rng.random(sino.shape) < case.hot
        sino = sino + hit * rng.uniform(0.1, 1.0, sino.shape) * np.clip(sino - base, 0, None)
    if case.counts is not None:
        k = case.counts * case.n_bins / peak
        sino = rng.poisson(sino * k) / k
    return sino, case.angles
