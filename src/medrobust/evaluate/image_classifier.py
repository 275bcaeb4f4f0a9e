"""Evaluate an image classifier on the test split of a clean, adversarial or perturbed store.

What the inputs were (clean, which attack at which epsilon crafted on which
model, which perturbation at which severity) is read from the store's attrs,
so the metrics JSON describes itself (docs/architecture.md, "Evaluation").
One call covers every condition of one model: the model loads once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from medrobust.conditions import evaluation_tables
from medrobust.errors import InputError
from medrobust.evaluate.metrics import (
    METRIC_KEYS, classification_metrics, describe_condition, prediction_table)
from medrobust.io.atomic import atomic_path, write_json
from medrobust.io.image_store import ImageStore, open_image_store
from medrobust.logs import get_logger
from medrobust.models import load_model
from medrobust.models.registry import CONFIG_FILE
from medrobust.io.test_split import iter_test_batches

log = get_logger(__name__)

def predict_probabilities(model: nn.Module, store: ImageStore, device: torch.device,
                          batch_size: int) -> np.ndarray:
    """Softmax probabilities `(n_test, n_classes)` in store order."""
    probabilities = []
    with torch.inference_mode():
        for images, _ in iter_test_batches(store, batch_size, desc=f"predict {store.path.name}"):
            logits = model(torch.as_tensor(images, dtype=torch.float32, device=device))
            probabilities.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    return np.concatenate(probabilities)


def evaluate_on_store(model: nn.Module, model_name: str, store: ImageStore, condition: str,
                      device: torch.device, batch_size: int = 64) -> tuple[pd.DataFrame, dict]:
    """Per-sample predictions and the metrics record of `model` on the store's test split."""
    index = store.indices("test")
    probabilities = predict_probabilities(model, store, device, batch_size)
    labels = store.labels[index]
    table = prediction_table(store.sample_ids[index], labels, probabilities, store.classes)
    record = {**describe_condition(store.attrs, model_name, condition, family="image"),
              **classification_metrics(labels, probabilities)}
    return table, {key: record[key] for key in METRIC_KEYS}


def evaluate_image_classifier(model_dir: str | os.PathLike,
                              conditions: Mapping[str, str | os.PathLike],
                              out_dir: str | os.PathLike, device: str | torch.device = "cpu",
                              batch_size: int = 64) -> dict[str, dict]:
    """Evaluate the saved model on the test split of each condition's store.

    `conditions` maps a condition's name to the store it reads; `out_dir`
    receives each one's predictions and metrics (`medrobust.conditions.evaluation_tables`),
    and appears only once all are written. The model is named by its folder
    and loads once; `device` is where to run (the caller picks it with
    `medrobust.device.select_device`). Returns the metrics records by name.
    """
    model_dir = Path(model_dir)
    device = torch.device(device)
    stores = {name: open_image_store(path) for name, path in conditions.items()}
    for store in stores.values():  # every store checked before any forward pass
        _check_classes(model_dir, store)
    model = load_model(model_dir, device)
    records = {}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name, store in stores.items():
            table, records[name] = evaluate_on_store(model, model_dir.name, store, name,
                                                     device, batch_size)
            files = evaluation_tables(name)
            table.to_csv(tmp / files["predictions"], index=False)
            write_json(tmp / files["metrics"], records[name])
            log.info("%s on %s: accuracy %.3f over %d test images", model_dir.name, name,
                     records[name]["accuracy"], records[name]["n"])
    return records


def _check_classes(model_dir: Path, store: ImageStore) -> None:
    # the class order fixes the integer labels; a mismatch would score silently wrong
    config_path = model_dir / CONFIG_FILE
    try:
        model_classes = json.loads(config_path.read_text()).get("classes")
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"{config_path}: unreadable model config ({error})") from error
    if model_classes != store.classes:
        raise InputError(f"{config_path}: model classes {model_classes} differ from the "
                         f"classes {store.classes} of {store.path}")
