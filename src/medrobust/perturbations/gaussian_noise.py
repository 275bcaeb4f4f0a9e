"""Additive Gaussian noise: severity is the noise standard deviation in image units."""

from __future__ import annotations

import numpy as np
import torch

from medrobust.perturbations.base import Perturbation, from_generator


class GaussianNoise(Perturbation):
    """Independent N(0, severity^2) noise on every pixel and channel."""

    severity_unit = "noise standard deviation σ (intensity, images in [0, 1])"

    def perturb(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        return images + from_generator(rng.normal(0.0, self.severity, size=tuple(images.shape)),
                                        images)
