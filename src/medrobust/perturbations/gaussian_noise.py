"""Additive Gaussian noise: severity is the noise standard deviation in image units."""

from __future__ import annotations

import numpy as np

from medrobust.perturbations.base import Perturbation


class GaussianNoise(Perturbation):
    """Independent N(0, severity^2) noise on every pixel and channel."""

    severity_unit = "noise standard deviation (intensity, images in [0, 1])"

    def apply(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return images + rng.normal(0.0, self.severity, size=images.shape)
