"""Accuracy, AUC and the per-sample prediction table shared by every evaluator."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from medrobust.evaluate.statistics import model_auc


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Accuracy and AUC (binary: P(class 1); multi-class: macro one-vs-rest over the
    classes present), as the summary's intervals define them (`statistics.model_auc`).

    AUC is None when the labels hold a single class, where it is undefined.
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predictions = probabilities.argmax(axis=1)
    accuracy = float((predictions == labels).mean()) if len(labels) else float("nan")
    auc = model_auc(labels, probabilities) if len(labels) else None
    return {"n": int(len(labels)), "accuracy": accuracy, "auc": auc}


def prediction_table(sample_ids, labels: np.ndarray, probabilities: np.ndarray,
                     classes: list[str]) -> pd.DataFrame:
    """One row per sample: id, label, prediction, correctness and class probabilities."""
    predictions = np.asarray(probabilities).argmax(axis=1)
    table = pd.DataFrame({
        "sample_id": list(sample_ids),
        "label": np.asarray(labels, dtype=np.int64),
        "prediction": predictions,
        "correct": predictions == np.asarray(labels),
    })
    for index, name in enumerate(classes):
        table[f"prob_{name}"] = np.asarray(probabilities)[:, index]
    return table


# the metrics JSON, key by key, in this order (also the summary's columns)
METRIC_KEYS = ("family", "model", "dataset", "condition", "kind", "attack", "perturbation",
               "epsilon", "norm", "severity", "source_model", "white_box", "n", "accuracy", "auc",
               "detection_rate")


def describe_condition(store_attrs: dict[str, Any], model: str, condition: str,
                       family: str) -> dict[str, Any]:
    """The metrics JSON's description of what the model was fed, from the store's attrs."""
    kind = ("attack" if "attack" in store_attrs
            else "perturbation" if "perturbation" in store_attrs else "clean")
    source_model = store_attrs.get("source_model")
    return {
        "family": family,
        "model": model,
        "dataset": store_attrs.get("dataset"),
        "condition": condition,
        "kind": kind,
        "attack": store_attrs.get("attack"),
        "perturbation": store_attrs.get("perturbation"),
        "epsilon": store_attrs.get("epsilon"),
        "norm": store_attrs.get("norm"),  # the budget's norm: "linf" or "l2"
        "severity": store_attrs.get("severity"),
        "source_model": source_model,
        # white-box: the attack used this very model's gradients
        "white_box": source_model == model if kind == "attack" else None,
        # the fraction of images a detector rejects; None: the model has no detector
        "detection_rate": None,
    }
