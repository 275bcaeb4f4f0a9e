"""Evaluate a saved slide classifier on one split of its dataset's feature stores.

Writes the per-slide prediction table (CSV) and the metrics (JSON) of
docs/architecture.md, "Evaluation", into the model's evaluation run; slides
have only the clean condition (no stage yet attacks or perturbs slides).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from medrobust.conditions import CLEAN, evaluation_tables
from medrobust.errors import InputError
from medrobust.evaluate.metrics import (
    METRIC_KEYS, classification_metrics, describe_condition, prediction_table)
from medrobust.io.atomic import atomic_path, write_json
from medrobust.logs import get_logger
from medrobust.models.registry import CONFIG_FILE, load_model
from medrobust.train.slide_classifier import SlideBag, bag_logits, load_bags

log = get_logger(__name__)


def load_split_bags(model_dir: Path, feature_paths: Sequence[str | os.PathLike], split: str,
                    device: torch.device) -> tuple[torch.nn.Module, dict[str, Any], list[SlideBag]]:
    """The saved model (eval mode), its config, and the bags of `split` with tiles, after
    checking that the features are those the model was trained on."""
    model = load_model(model_dir, device)
    config = json.loads((model_dir / CONFIG_FILE).read_text())
    bags, provenance = load_bags(feature_paths, list(config["classes"]))
    if provenance["weights_sha256"] != config["backbone_weights_sha256"]:
        raise InputError(f"{model_dir}: the model was trained on {config['backbone']} features "
                         f"with weights {config['backbone_weights_sha256'][:12]}, these are "
                         f"{provenance['backbone']} with {provenance['weights_sha256'][:12]}")
    bags = [bag for bag in bags if bag.split == split]
    if not bags:
        raise InputError(f"no slide with tiles in the {split!r} split among "
                         f"{len(feature_paths)} feature stores")
    return model, config, bags


def predict_split(model_dir: Path, feature_paths: Sequence[str | os.PathLike], split: str,
                  device: str | torch.device = "cpu"
                  ) -> tuple[dict[str, Any], list[SlideBag], np.ndarray]:
    """A saved slide model's config, the bags of `split` and its class probabilities for
    them, after checking the features are those it was trained on."""
    device = torch.device(device)
    model, config, bags = load_split_bags(model_dir, feature_paths, split, device)
    return config, bags, torch.softmax(bag_logits(model, bags, device), dim=1).numpy()


def evaluate_slide_classifier(model_dir: str | os.PathLike,
                              feature_paths: Sequence[str | os.PathLike],
                              out_dir: str | os.PathLike, split: str = "test",
                              device: str | torch.device = "cpu") -> dict[str, Any]:
    """Predict every slide of `split`; write `clean.csv` and `clean.json` in `out_dir`.

    Returns the metrics; `out_dir` appears only once both are written.
    """
    model_dir = Path(model_dir)
    config, bags, probabilities = predict_split(model_dir, feature_paths, split, device)
    classes = list(config["classes"])
    labels = [bag.label for bag in bags]
    table = prediction_table([bag.slide_id for bag in bags], labels, probabilities, classes)
    record = {**describe_condition({"dataset": config["dataset"]}, model_dir.name, CLEAN.name,
                                  family="slide"),
              **classification_metrics(labels, probabilities)}
    metrics = {key: record[key] for key in METRIC_KEYS}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        files = evaluation_tables(CLEAN.name)
        table.to_csv(tmp / files["predictions"], index=False)
        write_json(tmp / files["metrics"], metrics)
    log.info("%s on %s %s: accuracy %.3f over %d slides", model_dir.name, config["dataset"],
             split, metrics["accuracy"], metrics["n"])
    return metrics
