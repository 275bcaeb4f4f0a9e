"""Input perturbations, by config name.

`PERTURBATIONS` maps the names used under `perturbations:` in config.yaml to
perturbation classes; `build_perturbation` makes one at a given severity.
"""

from __future__ import annotations

import math

from medrobust.errors import ConfigError, unknown_name
from medrobust.perturbations.base import Perturbation
from medrobust.perturbations.blur import GaussianBlur
from medrobust.perturbations.fourier import FourierBasisNoise, HighPass, LowPass
from medrobust.perturbations.gaussian_noise import GaussianNoise
from medrobust.perturbations.jpeg import JPEG
from medrobust.perturbations.stain import StainShift

PERTURBATIONS: dict[str, type[Perturbation]] = {
    "gaussian_noise": GaussianNoise,
    "lowpass": LowPass,
    "highpass": HighPass,
    "fourier_basis": FourierBasisNoise,
    "gaussian_blur": GaussianBlur,
    "jpeg": JPEG,
    "stain_shift": StainShift,
}


def build_perturbation(name: str, severity: float, **params) -> Perturbation:
    """`params`: the perturbation's own settings besides the severity (the config's keys
    other than `severities`, e.g. fourier_basis's `frequency`)."""
    try:
        perturbation_class = PERTURBATIONS[name]
    except KeyError:
        raise unknown_name("perturbation", name, PERTURBATIONS) from None
    try:
        return perturbation_class(severity, **params)
    except TypeError as error:  # a setting the perturbation does not take
        raise ConfigError(f"perturbation {name!r}: {error}") from None


__all__ = ["PERTURBATIONS", "Perturbation", "GaussianNoise", "LowPass", "HighPass",
           "FourierBasisNoise", "GaussianBlur", "JPEG", "StainShift", "build_perturbation"]


def harshness(name: str, severity: float) -> float:
    """A key that orders a perturbation's severities from the mildest to the harshest: the
    severity itself, or its negative where the perturbation weakens as it grows (a low-pass
    radius, a JPEG quality: those whose clean severity is infinite)."""
    weakens = not math.isfinite(getattr(PERTURBATIONS.get(name), "clean_severity", 0.0))
    return -float(severity) if weakens else float(severity)
