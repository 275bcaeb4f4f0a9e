"""Evaluate a saved slide classifier on the test split of its dataset's feature stores.

Writes the per-slide prediction table (CSV) and the metrics (JSON) of
docs/architecture.md, "Evaluation", and the operating point chosen on the
val slides into the model's evaluation run; the summary sees only the clean
condition (slide robustness has its own runs, `evaluate.slide_robustness`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from medrobust.conditions import CLEAN, OPERATING_POINT_FILE, evaluation_tables
from medrobust.errors import InputError
from medrobust.evaluate.metrics import (
    METRIC_KEYS, classification_metrics, describe_condition, prediction_table)
from medrobust.evaluate.operating_point import choose_operating_point, log_operating_point
from medrobust.io.atomic import atomic_path, write_json
from medrobust.logs import get_logger
from medrobust.models.registry import CONFIG_FILE, load_model
from medrobust.train.slide_classifier import SlideBag, bag_logits, load_bags

log = get_logger(__name__)


def load_checked_bags(model_dir: Path, feature_paths: Sequence[str | os.PathLike],
                      device: torch.device
                      ) -> tuple[torch.nn.Module, dict[str, Any], list[SlideBag]]:
    """The saved model (eval mode), its config, and every bag with tiles, after checking
    that the features are those the model was trained on."""
    model = load_model(model_dir, device)
    config = json.loads((model_dir / CONFIG_FILE).read_text())
    bags, provenance = load_bags(feature_paths, list(config["classes"]))
    if provenance["weights_sha256"] != config["backbone_weights_sha256"]:
        raise InputError(f"{model_dir}: the model was trained on {config['backbone']} features "
                         f"with weights {config['backbone_weights_sha256'][:12]}, these are "
                         f"{provenance['backbone']} with {provenance['weights_sha256'][:12]}")
    return model, config, bags


def split_bags(bags: Sequence[SlideBag], split: str, n_stores: int) -> list[SlideBag]:
    """The bags of `split`; none is an InputError."""
    chosen = [bag for bag in bags if bag.split == split]
    if not chosen:
        raise InputError(f"no slide with tiles in the {split!r} split among "
                         f"{n_stores} feature stores")
    return chosen


def load_split_bags(model_dir: Path, feature_paths: Sequence[str | os.PathLike], split: str,
                    device: torch.device) -> tuple[torch.nn.Module, dict[str, Any], list[SlideBag]]:
    """The saved model (eval mode), its config, and the bags of `split` with tiles, after
    checking that the features are those the model was trained on."""
    model, config, bags = load_checked_bags(model_dir, feature_paths, device)
    return model, config, split_bags(bags, split, len(feature_paths))


def predict_split(model_dir: Path, feature_paths: Sequence[str | os.PathLike], split: str,
                  device: str | torch.device = "cpu"
                  ) -> tuple[dict[str, Any], list[SlideBag], np.ndarray]:
    """A saved slide model's config, the bags of `split` and its class probabilities for
    them, after checking the features are those it was trained on."""
    device = torch.device(device)
    model, config, bags = load_split_bags(model_dir, feature_paths, split, device)
    return config, bags, bag_probabilities(model, bags, device, len(config["classes"]))


def bag_probabilities(model: torch.nn.Module, bags: Sequence[SlideBag], device: torch.device,
                      n_classes: int) -> np.ndarray:
    """Class probabilities `(len(bags), n_classes)`, also for no bags."""
    if not bags:
        return np.zeros((0, n_classes))
    return torch.softmax(bag_logits(model, bags, device), dim=1).numpy()


def evaluate_slide_classifier(model_dir: str | os.PathLike,
                              feature_paths: Sequence[str | os.PathLike],
                              out_dir: str | os.PathLike,
                              device: str | torch.device = "cpu") -> dict[str, Any]:
    """Predict every test slide; write `clean.csv`, `clean.json` and the model's operating
    point, chosen on the val slides (`evaluate.operating_point`), in `out_dir`.

    Returns the metrics; `out_dir` appears only once all are written.
    """
    model_dir = Path(model_dir)
    device = torch.device(device)
    model, config, bags = load_checked_bags(model_dir, feature_paths, device)
    test = split_bags(bags, "test", len(feature_paths))
    val = [bag for bag in bags if bag.split == "val"]
    classes = list(config["classes"])
    probabilities = bag_probabilities(model, test, device, len(classes))
    labels = [bag.label for bag in test]
    table = prediction_table([bag.slide_id for bag in test], labels, probabilities, classes)
    record = {**describe_condition({"dataset": config["dataset"]}, model_dir.name, CLEAN.name,
                                  family="slide"),
              **classification_metrics(labels, probabilities)}
    metrics = {key: record[key] for key in METRIC_KEYS}
    operating_point = choose_operating_point(
        model_dir.name, [bag.label for bag in val],
        bag_probabilities(model, val, device, len(classes)), classes)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        files = evaluation_tables(CLEAN.name)
        table.to_csv(tmp / files["predictions"], index=False)
        write_json(tmp / files["metrics"], metrics)
        write_json(tmp / OPERATING_POINT_FILE, operating_point)
    log.info("%s on %s test: accuracy %.3f over %d slides", model_dir.name, config["dataset"],
             metrics["accuracy"], metrics["n"])
    log_operating_point(operating_point)
    return metrics
