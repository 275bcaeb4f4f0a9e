"""Classifiers, defenses and their registries.

Importing the package imports every model module, which registers its
builders in `medrobust.models.registry`.
"""

from medrobust.models import denoising, image_classifiers, mil  # noqa: F401  (registration)
from medrobust.models.registry import build_model, load_model, save_model

__all__ = ["build_model", "load_model", "save_model"]
