"""Fourier low-pass and high-pass filtering (Oleszkiewicz et al., 2020) and Fourier-basis
noise (Yin et al., 2019).

The spectrum of each image channel is multiplied by a Gaussian mask
exp(-d^2 / (2 r^2)) (low-pass) or 1 - that mask (high-pass). `d` is the
distance from the zero frequency, the centre of the centred (fftshift-ed)
spectrum, measured in cycles per image along each axis, i.e. in pixels of the
centred spectrum. Severity is the radius `r` in those units: for a 64-pixel
image, r = 4 keeps roughly the coarsest 4 cycles across the image in the
low-pass. Low-pass severity grows as r shrinks; high-pass severity grows with r.

The high-pass removes the mean (zero frequency) too, so its output is
centred on 0 and the [0, 1] clip keeps only its positive part.

Fourier-basis noise adds to each channel v·r·U_ij, where U_ij is the real
image whose spectrum is non-zero only at frequency (i, j) and its mirror
(-i, -j) (a cosine grating of i cycles down and j across the image), scaled
to L2 norm 1, and r = ±1 is drawn per image and channel. Severity is v, the
L2 norm of the added noise per channel in intensity units (images in [0, 1]).

The FFTs run in torch on the batch's device, in float64 as numpy's do.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Sequence

import numpy as np
import torch

from medrobust.errors import ConfigError
from medrobust.perturbations.base import Perturbation, from_generator


def gaussian_lowpass_mask(height: int, width: int, radius: float) -> np.ndarray:
    """exp(-d^2 / 2r^2) laid out like `np.fft.fft2` output (zero frequency at [0, 0])."""
    # fftfreq * n is the signed frequency in cycles per image; using the
    # unshifted layout equals masking the centred spectrum and shifting back
    fy = np.fft.fftfreq(height) * height
    fx = np.fft.fftfreq(width) * width
    distance_sq = fy[:, None] ** 2 + fx[None, :] ** 2
    return np.exp(-distance_sq / (2.0 * radius**2))


def apply_spectrum_mask(images: torch.Tensor, mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Each channel's spectrum of `images` (..., H, W) times `mask` (broadcast, `np.fft.fft2`
    layout), in float64; the masks here are real and even in frequency, so the result is real."""
    spectrum = torch.fft.fft2(images.double())
    return torch.fft.ifft2(spectrum * torch.as_tensor(mask, device=images.device)).real


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

    def perturb(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        return apply_spectrum_mask(images, self.mask(*images.shape[-2:]))


class LowPass(FourierFilter):
    clean_severity = math.inf  # a wider mask keeps more: the identity as the radius grows

    def mask(self, height: int, width: int) -> np.ndarray:
        return gaussian_lowpass_mask(height, width, self.severity)


class HighPass(FourierFilter):
    def mask(self, height: int, width: int) -> np.ndarray:
        return 1.0 - gaussian_lowpass_mask(height, width, self.severity)


def fourier_basis(height: int, width: int, frequency: Sequence[int],
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """U_ij `(height, width)` float64: spectrum non-zero only at (i, j) and (-i, -j), L2 norm 1.

    `frequency` (i, j) is in cycles per image, down and across, as in the
    centred spectrum; |i| <= height / 2 and |j| <= width / 2.
    """
    i, j = (int(value) for value in frequency)
    if abs(i) > height / 2 or abs(j) > width / 2:
        raise ConfigError(f"Fourier basis frequency ({i}, {j}) lies outside the spectrum of a "
                          f"{height}x{width} image (at most {height // 2}, {width // 2})")
    spectrum = torch.zeros(height, width, dtype=torch.complex128, device=device)
    # Hermitian: the mirror makes the image real (at the zero and Nyquist
    # frequencies the mirror is the same entry)
    spectrum[i % height, j % width] = 1.0
    spectrum[-i % height, -j % width] = 1.0
    basis = torch.fft.ifft2(spectrum).real
    return basis / torch.linalg.vector_norm(basis)


class FourierBasisNoise(Perturbation):
    """x + v·r·U_ij per channel, r = ±1 at random per image and channel (Yin et al. 2019)."""

    severity_unit = "L2 norm v of the basis noise per channel (intensity, images in [0, 1])"

    def __init__(self, severity: float, frequency: Sequence[int] = (1, 1)):
        super().__init__(severity)
        if (isinstance(frequency, (str, bytes)) or len(frequency) != 2
                or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                           for v in frequency)):
            raise ConfigError(f"{type(self).__name__}: frequency must be two integers [i, j] "
                              f"(cycles per image, down and across), got {frequency!r}")
        self.frequency = (int(frequency[0]), int(frequency[1]))

    def perturb(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        basis = fourier_basis(*images.shape[-2:], self.frequency, images.device)
        signs = from_generator(rng.choice([-1.0, 1.0], size=tuple(images.shape[:2])), images)
        return images + self.severity * signs[:, :, None, None] * basis
