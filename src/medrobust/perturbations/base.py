"""The shared shape of input perturbations: one perturbation = one small subclass.

A perturbation maps a numpy batch `(N, C, H, W)` in [0, 1] to a batch of the
same shape, clipped back to [0, 1] (the model contract). Randomness comes only
from the generator passed in, so a seed fixes the result.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np

from medrobust.errors import ConfigError


class Perturbation(ABC):
    """A perturbation of strength `severity` (its meaning is the subclass's)."""

    # what the severity measures, in its units, as the report's axes name it
    severity_unit: str = "severity"

    def __init__(self, severity: float):
        if not (math.isfinite(severity) and severity >= 0):
            raise ConfigError(f"{type(self).__name__}: severity must be a finite number >= 0, "
                              f"got {severity}")
        self.severity = float(severity)

    def __call__(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.clip(self.apply(np.asarray(images, dtype=np.float32), rng), 0.0, 1.0).astype(np.float32)

    @abstractmethod
    def apply(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The perturbation before clipping to [0, 1]."""
