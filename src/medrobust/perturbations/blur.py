"""Gaussian blur: severity is the kernel's standard deviation σ in pixels.

As skimage.filters.gaussian (which ImageNet-C and MedMNIST-C call): a
normalised Gaussian truncated at 4σ, applied separably along rows and
columns, with the image mirrored at its borders (reflect padding). The kernel
sums to 1, so a constant image is unchanged and the mean is kept up to the
border effect; σ = 0 is the identity.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from medrobust.perturbations.base import Perturbation

TRUNCATE = 4.0  # kernel radius in σ, skimage's default


def gaussian_kernel(sigma: float, radius: int) -> torch.Tensor:
    """The normalised 1-D kernel exp(-x^2 / 2σ^2), x in [-radius, radius], float64."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-offsets**2 / (2.0 * sigma**2))
    return kernel / kernel.sum()


class GaussianBlur(Perturbation):
    """Each channel convolved with a Gaussian of standard deviation `severity` pixels."""

    severity_unit = "Gaussian kernel standard deviation σ (pixels)"

    def perturb(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if self.severity == 0:
            return images.double()
        n, channels, height, width = images.shape
        # reflect padding needs a pad below the side; a wider kernel would only add
        # weights of order exp(-side^2 / 2σ^2) beyond that
        radius = min(math.ceil(TRUNCATE * self.severity), height - 1, width - 1)
        kernel = gaussian_kernel(self.severity, radius).to(images.device)
        # channels as batch entries: one depthwise kernel serves every channel
        flat = images.double().reshape(n * channels, 1, height, width)
        flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"),
                        kernel.view(1, 1, 1, -1))
        flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"),
                        kernel.view(1, 1, -1, 1))
        return flat.reshape(n, channels, height, width)
