"""Fourier low-pass and high-pass filtering (Oleszkiewicz et al., 2020).

The spectrum of each image channel is multiplied by a Gaussian mask
exp(-d^2 / (2 r^2)) (low-pass) or 1 - that mask (high-pass). `d` is the
distance from the zero frequency, the centre of the centred (fftshift-ed)
spectrum, measured in cycles per image along each axis, i.e. in pixels of the
centred spectrum. Severity is the radius `r` in those units: for a 64-pixel
image, r = 4 keeps roughly the coarsest 4 cycles across the image in the
low-pass. Low-pass severity grows as r shrinks; high-pass severity grows with r.

The high-pass removes the mean (zero frequency) too, so its output is
centred on 0 and the [0, 1] clip keeps only its positive part.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np

from medrobust.errors import ConfigError
from medrobust.perturbations.base import Perturbation


def gaussian_lowpass_mask(height: int, width: int, radius: float) -> np.ndarray:
    """exp(-d^2 / 2r^2) laid out like `np.fft.fft2` output (zero frequency at [0, 0])."""
    # fftfreq * n is the signed frequency in cycles per image; using the
    # unshifted layout equals masking the centred spectrum and shifting back
    fy = np.fft.fftfreq(height) * height
    fx = np.fft.fftfreq(width) * width
    distance_sq = fy[:, None] ** 2 + fx[None, :] ** 2
    return np.exp(-distance_sq / (2.0 * radius**2))


class FourierFilter(Perturbation):
    """Multiply each channel's spectrum by a real, symmetric mask."""

    severity_unit = "radius of the Gaussian mask (cycles per image)"

    def __init__(self, severity: float):
        super().__init__(severity)
        if self.severity <= 0:
            raise ConfigError(f"{type(self).__name__}: the radius (severity) must be > 0")

    @abstractmethod
    def mask(self, height: int, width: int) -> np.ndarray:
        """The frequency mask in `np.fft.fft2` layout."""

    def apply(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        spectrum = np.fft.fft2(images.astype(np.float64), axes=(-2, -1))
        # the mask is even in frequency, so the filtered image is real
        return np.fft.ifft2(spectrum * self.mask(*images.shape[-2:]), axes=(-2, -1)).real


class LowPass(FourierFilter):
    def mask(self, height: int, width: int) -> np.ndarray:
        return gaussian_lowpass_mask(height, width, self.severity)


class HighPass(FourierFilter):
    def mask(self, height: int, width: int) -> np.ndarray:
        return 1.0 - gaussian_lowpass_mask(height, width, self.severity)
