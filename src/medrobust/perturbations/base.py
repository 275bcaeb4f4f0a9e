"""The shared shape of input perturbations: one perturbation = one small subclass.

A perturbation maps a batch `(N, C, H, W)` in [0, 1] to a batch of the same
shape, clipped back to [0, 1] (the model contract). The work is done in torch,
over the whole batch at once, on the device of the batch: a torch tensor stays
on its device (the GPU when the job has one), a numpy array is computed on the
CPU and comes back as numpy, so callers that hand in numpy see numpy results.
Randomness comes only from the numpy generator passed in (drawn on the CPU,
then moved), so a seed fixes the result whatever the device.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TypeVar

import numpy as np
import torch

from medrobust.errors import ConfigError

Batch = TypeVar("Batch", np.ndarray, torch.Tensor)


class Perturbation(ABC):
    """A perturbation of strength `severity` (its meaning is the subclass's)."""

    # what the severity measures, in its units, as the report's axes and tables name it
    severity_unit: str = "severity"
    # the severity that leaves images as they are: the report draws the clean test set there,
    # and right of the largest severity, marked "clean", where that is infinite
    clean_severity: float = 0.0

    def __init__(self, severity: float):
        if not (math.isfinite(severity) and severity >= 0):
            raise ConfigError(f"{type(self).__name__}: severity must be a finite number >= 0, "
                              f"got {severity}")
        self.severity = float(severity)

    def __call__(self, images: Batch, rng: np.random.Generator) -> Batch:
        return self._run(images, rng, clip=True)

    def apply(self, images: Batch, rng: np.random.Generator) -> Batch:
        """The perturbation before clipping to [0, 1], as float64."""
        return self._run(images, rng, clip=False)

    def _run(self, images: Batch, rng: np.random.Generator, clip: bool) -> Batch:
        batch = torch.as_tensor(images, dtype=torch.float32)
        out = self.perturb(batch, rng)
        if clip:
            out = out.clamp(0.0, 1.0).float()
        if isinstance(images, torch.Tensor):
            return out
        return out.cpu().numpy()

    @abstractmethod
    def perturb(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """The unclipped perturbation of a float32 batch, on the batch's device."""


def from_generator(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """Numbers drawn on the CPU (numpy, float64), moved to the device of `like`."""
    return torch.as_tensor(values, dtype=torch.float64, device=like.device)
