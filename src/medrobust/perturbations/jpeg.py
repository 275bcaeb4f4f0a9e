"""JPEG compression: severity is the JPEG quality (1-100; lower is stronger).

Images are rounded to 8 bits, saved as JPEG at the given quality with Pillow
and read back, as ImageNet-C and MedMNIST-C do (torchvision's JPEG codec,
which would batch on the GPU, is deprecated since 0.29). Pillow's default
4:2:0 chroma subsampling applies to colour images, so even quality 100 loses
some colour detail; grey images keep only the 8-bit rounding and the DCT
quantisation. Encoding runs on the CPU, image by image.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

from medrobust.errors import ConfigError, InputError
from medrobust.perturbations.base import Perturbation


def jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    """One uint8 image `(H, W)` or `(H, W, 3)` through a JPEG file of `quality`."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded)


class JPEG(Perturbation):
    """Encode and decode each image as a JPEG of quality `severity`."""

    severity_unit = "JPEG quality (1-100, lower is stronger)"
    clean_severity = math.inf  # even quality 100 is lossy: no quality is the clean image

    def __init__(self, severity: float):
        super().__init__(severity)
        if not (1 <= self.severity <= 100 and self.severity.is_integer()):
            raise ConfigError(f"JPEG: the quality (severity) must be an integer from 1 to 100, "
                              f"got {severity}")

    def perturb(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if images.shape[1] not in (1, 3):
            raise InputError(f"JPEG encodes 1- or 3-channel images, got {images.shape[1]} "
                             f"channels")
        pixels = (images.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
        # channels last, and a grey image as (H, W), as Pillow takes them
        pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
        if pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
        decoded = np.stack([jpeg_round_trip(image, int(self.severity)) for image in pixels]) \
            if len(pixels) else pixels
        decoded = torch.as_tensor(decoded, device=images.device).reshape(
            images.shape[0], *images.shape[2:], images.shape[1])
        return decoded.permute(0, 3, 1, 2).double() / 255.0
