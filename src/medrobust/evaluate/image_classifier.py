"""Evaluate an image classifier on the test split of a clean, adversarial or perturbed store.

What the inputs were (clean, which attack at which epsilon crafted on which
model, which perturbation at which severity) is read from the store's attrs,
so the metrics JSON describes itself (docs/architecture.md, "Evaluation").
One call covers every condition of one model: the model loads once. A model
with a pixel denoiser is evaluated behind it (`models.pipeline`); with
MagNet's detector on a reformer, every image also gets a reject decision
(`evaluate.detector`), and each condition its detection rate. The model's
operating point is chosen on the clean store's val split (`evaluate.operating_point`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from medrobust.conditions import DETECTOR_FILE, OPERATING_POINT_FILE, evaluation_tables
from medrobust.evaluate.detector import Detector, fit_detector
from medrobust.evaluate.metrics import (
    METRIC_KEYS, classification_metrics, describe_condition, prediction_table)
from medrobust.evaluate.operating_point import choose_operating_point, log_operating_point
from medrobust.io.atomic import atomic_path, write_json
from medrobust.io.image_store import ImageStore, open_image_store
from medrobust.logs import get_logger
from medrobust.models.pipeline import load_pipeline
from medrobust.models.registry import check_model_classes
from medrobust.io.test_split import iter_index_batches, nonempty_test_index

log = get_logger(__name__)

def predict_probabilities(model: nn.Module, store: ImageStore, device: torch.device,
                          batch_size: int, detector: Detector | None = None,
                          split: str = "test") -> tuple[np.ndarray, np.ndarray | None]:
    """Softmax probabilities `(n, n_classes)` of the `split` (the test split must not be
    empty) in store order, and with a `detector` whether it rejects each image (else None)."""
    index = nonempty_test_index(store) if split == "test" else store.indices(split)
    probabilities = [np.zeros((0, len(store.classes)), dtype=np.float32)]
    rejected = []
    with torch.inference_mode():
        for images, _ in iter_index_batches(store, index, batch_size,
                                            desc=f"predict {store.path.name} {split}"):
            images = torch.as_tensor(images, dtype=torch.float32, device=device)
            if detector is None:
                logits = model(images)
            else:
                logits, flags = detector.predict(model, images)
                rejected.append(flags)
            probabilities.append(softmax_probabilities(logits))
    return np.concatenate(probabilities), np.concatenate(rejected) if rejected else None


def softmax_probabilities(logits: torch.Tensor) -> np.ndarray:
    """Class probabilities `(n, n_classes)` of a batch's logits, as numpy."""
    return torch.softmax(logits.float(), dim=1).cpu().numpy()


def evaluate_on_store(model: nn.Module, model_name: str, store: ImageStore, condition: str,
                      device: torch.device, batch_size: int = 64,
                      detector: Detector | None = None) -> tuple[pd.DataFrame, dict]:
    """Per-sample predictions and the metrics record of `model` on the store's test split.

    With a `detector`, the table gains a `rejected` column and the record's
    `detection_rate` is the fraction rejected (on clean images: the false-positive rate).
    """
    index = store.indices("test")
    probabilities, rejected = predict_probabilities(model, store, device, batch_size, detector)
    labels = store.labels[index]
    table = prediction_table(store.sample_ids[index], labels, probabilities, store.classes)
    record = {**describe_condition(store.attrs, model_name, condition, family="image"),
              **classification_metrics(labels, probabilities)}
    if rejected is not None:
        table.insert(table.columns.get_loc("correct") + 1, "rejected", rejected)
        record["detection_rate"] = float(rejected.mean())
    return table, {key: record[key] for key in METRIC_KEYS}


def evaluate_image_classifier(model_dir: str | os.PathLike,
                              conditions: Mapping[str, str | os.PathLike],
                              validation_store: str | os.PathLike,
                              out_dir: str | os.PathLike, device: str | torch.device = "cpu",
                              batch_size: int = 64,
                              denoiser_dir: str | os.PathLike | None = None,
                              detector: Mapping | None = None) -> dict[str, dict]:
    """Evaluate the saved model on the test split of each condition's store.

    `conditions` maps a condition's name to the store it reads; `out_dir`
    receives each one's predictions and metrics (`medrobust.conditions.evaluation_tables`),
    and the model's operating point, chosen on the val split of the clean
    `validation_store` (`evaluate.operating_point`); it appears only once all
    are written. The model is named by its folder and loads once, behind the
    saved denoiser in `denoiser_dir` if given; `device` is where to run (the
    caller picks it with `medrobust.device.select_device`). `detector`
    (MagNet's detector settings, for a reformer) sets its thresholds on the
    same val split and adds `detector.json` to `out_dir`. Returns the metrics
    records by name.
    """
    model_dir = Path(model_dir)
    device = torch.device(device)
    stores = {name: open_image_store(path) for name, path in conditions.items()}
    validation = open_image_store(validation_store)
    for store in [*stores.values(), validation]:  # every store checked before any forward pass
        check_model_classes(model_dir, store.classes, store.path)
    model = load_pipeline(model_dir, denoiser_dir, device)
    if detector is None:
        fitted = None
        probabilities, _ = predict_probabilities(model, validation, device, batch_size,
                                                 split="val")
    else:  # the detector's pass over the val images gives the model's predictions too
        fitted, logits = fit_detector(model, detector, validation, device, batch_size)
        probabilities = softmax_probabilities(logits)
    records = {}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        if fitted is not None:
            write_json(tmp / DETECTOR_FILE, fitted.record())
        operating_point = choose_operating_point(
            model_dir.name, validation.labels[validation.indices("val")], probabilities,
            validation.classes)
        write_json(tmp / OPERATING_POINT_FILE, operating_point)
        log_operating_point(operating_point)
        for name, store in stores.items():
            table, records[name] = evaluate_on_store(model, model_dir.name, store, name,
                                                     device, batch_size, fitted)
            files = evaluation_tables(name)
            table.to_csv(tmp / files["predictions"], index=False)
            write_json(tmp / files["metrics"], records[name])
            log.info("%s on %s: accuracy %.3f over %d test images", model_dir.name, name,
                     records[name]["accuracy"], records[name]["n"])
    return records
