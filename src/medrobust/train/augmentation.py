"""Low-pass augmentation: training images blurred in the Fourier domain now and then.

The screening study (Oleszkiewicz et al. 2020) argues that invariance to
low-pass filtering is bought with the sensitivity to microcalcifications that
the filter erases; training with it lets the report show that trade-off. Each
image is filtered with probability `probability` by the same Gaussian mask as
the `lowpass` perturbation (`medrobust.perturbations.fourier`), of a radius
drawn uniformly from `radius` (cycles per image), redrawn per image and step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from medrobust.config import config_from_mapping
from medrobust.errors import ConfigError
from medrobust.perturbations.fourier import apply_spectrum_mask, gaussian_lowpass_mask


@dataclass(frozen=True)
class LowPassAugmentation:
    probability: float
    radius: Sequence[float]  # [low, high], cycles per image

    def __post_init__(self):
        if not 0 < self.probability <= 1:
            raise ConfigError(f"lowpass_augment: probability must be in (0, 1], "
                              f"not {self.probability!r}")
        if len(self.radius) != 2 or not 0 < self.radius[0] <= self.radius[1]:
            raise ConfigError(f"lowpass_augment: radius must be [low, high] with "
                              f"0 < low <= high, not {list(self.radius)!r}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "LowPassAugmentation":
        return config_from_mapping(cls, mapping, "lowpass_augment")

    def describe(self) -> str:
        low, high = self.radius
        return (f"Fourier low-pass (Gaussian mask, radius {low:g}-{high:g} cycles per image) "
                f"with probability {self.probability:g}")

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """`images` `(N, C, H, W)` in [0, 1], each filtered or not; draws from the CPU
        `generator` whatever the images' device, so runs repeat across devices."""
        chosen = torch.rand(len(images), generator=generator) < self.probability
        low, high = self.radius
        radii = low + (high - low) * torch.rand(len(images), generator=generator)
        indices = chosen.nonzero().flatten().tolist()
        if not indices:
            return images
        height, width = images.shape[-2:]
        masks = np.stack([gaussian_lowpass_mask(height, width, float(radii[index]))
                          for index in indices])
        filtered = images.clone()
        # a Gaussian blur of an image in [0, 1] stays there but for rounding
        filtered[indices] = apply_spectrum_mask(images[indices], masks[:, None]).to(
            images.dtype).clamp(0.0, 1.0)
        return filtered
