"""MagNet's detector on a reformer, with thresholds set on validation images.

Scores per image (`models.pixel_denoisers.DetectorSettings` says which):

- the reconstruction error `mean |x - AE(x)|^p`;
- per temperature T, the Jensen-Shannon divergence between softmax(f(x)/T)
  and softmax(f(AE(x))/T), f the classifier.

An image is rejected when any score is above its threshold. The thresholds
depend on the classifier (the divergences do), so they are fitted here, in
the evaluation of the classifier behind the reformer, on the clean store's
validation split: each threshold is the (k+1)-th largest validation score, so
that at most k validation images exceed it. With `scope: each`, k is
floor(rate x n) for every score (MagNet's choice); with `scope: combined`,
k is the largest number for which all scores together reject at most
floor(rate x n) validation images.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import numpy as np
import torch
from torch import nn

from medrobust.errors import InputError
from medrobust.io.image_store import ImageStore
from medrobust.io.test_split import iter_index_batches
from medrobust.logs import get_logger
from medrobust.models.pipeline import DenoisedClassifier
from medrobust.models.pixel_denoisers import DetectorSettings, Reformer

log = get_logger(__name__)


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per row, the Jensen-Shannon divergence (natural log) of two probability vectors."""
    m = (p + q) / 2
    return 0.5 * ((torch.xlogy(p, p) - torch.xlogy(p, m)).sum(1)
                  + (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(1))


def detector_scores(reformer: nn.Module, classifier: nn.Module, images: torch.Tensor,
                    settings: DetectorSettings) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every score of `settings` for a batch, by name (one value per image), and the
    classifier's logits on the reformed images: the pipeline's own prediction, so an
    evaluation need not run reformer and classifier a second time."""
    reformed = reformer(images)
    reformed_logits = classifier(reformed)
    error = (images - reformed).abs().pow(settings.reconstruction_norm)
    scores = {f"reconstruction_error_p{settings.reconstruction_norm:g}": error.flatten(1).mean(1)}
    if settings.temperatures:
        # double precision: at T = 40 the two distributions differ by ~1e-4 and their
        # divergence (~1e-9) would drown in float32 rounding
        logits = classifier(images).double()
        for temperature in settings.temperatures:
            scores[f"jsd_T{temperature:g}"] = jensen_shannon(
                torch.softmax(logits / temperature, dim=1),
                torch.softmax(reformed_logits.double() / temperature, dim=1))
    return scores, reformed_logits


def fit_thresholds(scores: Mapping[str, np.ndarray], false_positive_rate: float,
                   scope: str) -> dict[str, float]:
    """Thresholds on validation `scores` (name -> one value per image, at least one image),
    see the module doc."""
    n = len(next(iter(scores.values())))
    allowed = math.floor(false_positive_rate * n)
    descending = {name: np.sort(np.asarray(values, dtype=np.float64))[::-1]
                  for name, values in scores.items()}

    def thresholds(k: int) -> dict[str, float]:
        return {name: float(values[k]) for name, values in descending.items()}

    k = allowed
    while scope == "combined" and k > 0 and \
            rejections(scores, thresholds(k)).sum() > allowed:
        k -= 1
    return thresholds(k)


def rejections(scores: Mapping[str, np.ndarray], thresholds: Mapping[str, float]) -> np.ndarray:
    """Per image, whether any score is above its threshold."""
    return np.any([np.asarray(scores[name]) > threshold
                   for name, threshold in thresholds.items()], axis=0)


@dataclasses.dataclass(frozen=True)
class Detector:
    """A fitted detector: its settings, thresholds and how it did on the validation images."""

    settings: DetectorSettings
    thresholds: dict[str, float]
    n_validation: int
    validation_rejection_rate: float

    @torch.no_grad()
    def predict(self, model: DenoisedClassifier, images: torch.Tensor
                ) -> tuple[torch.Tensor, np.ndarray]:
        """The model's logits and whether the detector rejects each image, from one pass."""
        scores, logits = detector_scores(model.denoiser, model.classifier, images,
                                         self.settings)
        return logits, rejections({name: value.cpu().numpy() for name, value in scores.items()},
                                  self.thresholds)

    def record(self) -> dict:
        """What the evaluation writes to detector.json."""
        return {"settings": dataclasses.asdict(self.settings), "thresholds": self.thresholds,
                "n_validation": self.n_validation,
                "validation_false_positive_rate": self.validation_rejection_rate}


@torch.no_grad()
def fit_detector(model: nn.Module, settings: DetectorSettings | Mapping, store: ImageStore,
                 device: torch.device, batch_size: int = 64) -> tuple[Detector, torch.Tensor]:
    """Fit thresholds on the validation split of the clean `store`, for `model`, a
    classifier behind a reformer (`models.pipeline.load_pipeline`). Also returns the
    model's logits on those images, in store order, from the same pass: the evaluation's
    operating point needs them, and the pipeline need not run over them again."""
    if isinstance(settings, Mapping):
        settings = DetectorSettings.from_mapping(settings)
    if not isinstance(model, DenoisedClassifier) or not isinstance(model.denoiser, Reformer):
        raise InputError("MagNet's detector needs a classifier behind a reformer; this model "
                         "has no reformer")
    index = store.indices("val")
    if index.size == 0:
        raise InputError(f"{store.path}: the detector sets its thresholds on the val split, "
                         "which is empty")
    batches = [detector_scores(model.denoiser, model.classifier, torch.as_tensor(
                   images, dtype=torch.float32, device=device), settings)
               for images, _ in iter_index_batches(store, index, batch_size,
                                                   desc="detector thresholds")]
    scores = {name: torch.cat([batch[name] for batch, _ in batches]).cpu().numpy()
              for name in batches[0][0]}
    thresholds = fit_thresholds(scores, settings.false_positive_rate, settings.scope)
    rate = float(rejections(scores, thresholds).mean())
    if settings.false_positive_rate * index.size < 1:
        log.warning("%s: %d validation images cannot resolve a false-positive rate of %g: "
                    "the thresholds reject none of them", store.path, index.size,
                    settings.false_positive_rate)
    log.info("detector thresholds %s reject %.2f %% of %d validation images (allowed %g %%, %s)",
             {name: round(value, 6) for name, value in thresholds.items()}, 100 * rate,
             index.size, 100 * settings.false_positive_rate, settings.scope)
    return (Detector(settings, thresholds, int(index.size), rate),
            torch.cat([logits for _, logits in batches]))
