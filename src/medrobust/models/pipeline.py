"""What a target model is at inference: its classifier, behind its pixel denoiser if it names one.

The one place that composes the two, used by evaluation and by attacks (a
white-box attack on a model with a denoiser differentiates through both; a
model without one is its classifier alone).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from medrobust.errors import InputError
from medrobust.models.registry import CONFIG_FILE, load_model


class DenoisedClassifier(nn.Module):
    """denoiser -> classifier; both keep their own weights and saved folders."""

    def __init__(self, denoiser: nn.Module, classifier: nn.Module):
        super().__init__()
        self.denoiser, self.classifier = denoiser, classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.denoiser(images))


def load_pipeline(model_dir: str | os.PathLike, denoiser_dir: str | os.PathLike | None = None,
                  device: str | torch.device = "cpu") -> nn.Module:
    """The saved classifier in `model_dir`, behind the saved denoiser in `denoiser_dir` if
    given, in eval mode. The denoiser must be trained on images of the classifier's
    dataset, channels and size."""
    classifier = load_model(model_dir, device)
    if denoiser_dir is None:
        return classifier
    model_config, denoiser_config = _config(model_dir), _config(denoiser_dir)
    if denoiser_config.get("family") != "denoiser":
        raise InputError(f"{Path(denoiser_dir) / CONFIG_FILE}: not a denoiser "
                         f"(family {denoiser_config.get('family')!r})")
    for key in ("dataset", "in_channels", "image_size"):
        if denoiser_config.get(key) != model_config.get(key):
            raise InputError(
                f"{Path(denoiser_dir) / CONFIG_FILE}: the denoiser's {key} "
                f"{denoiser_config.get(key)!r} differs from {model_config.get(key)!r} in "
                f"{Path(model_dir) / CONFIG_FILE}; it cannot sit before that classifier")
    return DenoisedClassifier(load_model(denoiser_dir, device), classifier).eval()


def _config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: unreadable model config ({error})") from error
