"""Classifiers, defenses and their registries.

Importing the package imports every model module, which registers its
builders in `medrobust.models.registry`.
"""

from medrobust.models import (  # noqa: F401  (registration)
    denoising, image_classifiers, mil, pixel_denoisers, transmil)
from medrobust.models.registry import build_model, load_model, save_model

__all__ = ["build_model", "load_model", "save_model"]
