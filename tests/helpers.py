"""Helpers shared by several test files (imported as ``from helpers import ...``)."""

from __future__ import annotations

import numpy as np


def phantom(n, nb=1):
    """Smooth multi-bin phantom: four Gaussian blobs, each with its own 'pattern'
    (intensity vs bin), inside 0.45 n of the centre. (n, n) or (n, n, nb) float64."""
    yy, xx = np.mgrid[:n, :n]
    c0 = (n - 1) / 2
    x = (xx - c0) * 128.0 / n
    y = (c0 - yy) * 128.0 / n
    out = np.zeros((n, n, nb))
    for k, (cx, cy, r, v) in enumerate([(10, 5, 30, 1.0), (-20, -15, 12, 2.0),
                                        (25, -20, 8, 1.5), (-5, 30, 6, 3.0)]):
        pattern = 1 + 0.5 * np.sin(np.arange(nb) * (k + 1) * 0.3)
        out += (v * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * (r / 2) ** 2)))[:, :, None] * pattern
    out[x ** 2 + y ** 2 > (0.45 * 128) ** 2] = 0
    return out[:, :, 0] if nb == 1 else out
