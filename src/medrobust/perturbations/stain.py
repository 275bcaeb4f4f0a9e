"""Stain shift in HED space (Tellez et al. 2019, "Quantifying the effects of data augmentation
and stain color normalization ..."): severity is σ of the random scale and bias.

Each RGB image is taken to optical density and projected onto the
haematoxylin, eosin and DAB stain vectors with skimage's matrices
(`rgb2hed`); per image and stain, its concentration s becomes α·s + β with
α ~ U(1 - σ, 1 + σ) and β ~ U(-σ, σ), as Tellez et al. draw them; then back
to RGB (`hed2rgb`). Unlike skimage's `rgb2hed` the concentrations are not
clipped at 0: the projection is linear and invertible, so σ = 0 gives back
the image (up to skimage's floor of 1e-6 on intensities).
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.color import hed_from_rgb, rgb_from_hed

from medrobust.errors import InputError
from medrobust.perturbations.base import Perturbation, from_generator

# skimage's floor on intensities before the logarithm; its log is the unit of optical density
FLOOR = 1e-6


class StainShift(Perturbation):
    """Random per-image scale and bias of the H, E and D stain concentrations."""

    severity_unit = "σ of the HED scale and bias (scale ~ U(1-σ, 1+σ), bias ~ U(-σ, σ))"

    def perturb(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if images.shape[1] != 3:
            raise InputError(f"stain shift works on RGB images, got {images.shape[1]} channels")
        n = len(images)
        scale = from_generator(rng.uniform(1.0 - self.severity, 1.0 + self.severity, (n, 3)),
                               images)
        bias = from_generator(rng.uniform(-self.severity, self.severity, (n, 3)), images)
        to_hed = torch.as_tensor(hed_from_rgb, dtype=torch.float64, device=images.device)
        to_rgb = torch.as_tensor(rgb_from_hed, dtype=torch.float64, device=images.device)
        log_floor = float(np.log(FLOOR))
        # (n, H, W, 3) rows of RGB, as skimage's matrices multiply from the right
        rgb = images.double().clamp_min(FLOOR).permute(0, 2, 3, 1)
        stains = (torch.log(rgb) / log_floor) @ to_hed
        stains = stains * scale[:, None, None, :] + bias[:, None, None, :]
        shifted = torch.exp((stains * log_floor) @ to_rgb)
        return shifted.permute(0, 3, 1, 2)
