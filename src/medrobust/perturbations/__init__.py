"""Input perturbations, by config name.

`PERTURBATIONS` maps the names used under `perturbations:` in config.yaml to
perturbation classes; `build_perturbation` makes one at a given severity.
"""

from __future__ import annotations

from medrobust.errors import unknown_name
from medrobust.perturbations.base import Perturbation
from medrobust.perturbations.fourier import HighPass, LowPass
from medrobust.perturbations.gaussian_noise import GaussianNoise

PERTURBATIONS: dict[str, type[Perturbation]] = {
    "gaussian_noise": GaussianNoise,
    "lowpass": LowPass,
    "highpass": HighPass,
}


def build_perturbation(name: str, severity: float) -> Perturbation:
    try:
        perturbation_class = PERTURBATIONS[name]
    except KeyError:
        raise unknown_name("perturbation", name, PERTURBATIONS) from None
    return perturbation_class(severity)


__all__ = ["PERTURBATIONS", "Perturbation", "GaussianNoise", "LowPass", "HighPass",
           "build_perturbation"]
