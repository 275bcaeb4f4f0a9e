"""Accuracy, AUC and the per-sample prediction table shared by every evaluator, and
`read_evaluation`, the one reader of a metrics JSON with its prediction table."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medrobust.errors import InputError
from medrobust.evaluate.statistics import model_auc
from medrobust.io.result_files import read_result_record, read_result_table


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


DESCRIPTION_KEYS = tuple(key for key in METRIC_KEYS if key not in ("n", "accuracy", "auc"))


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One model's predictions under one condition, as the evaluators wrote them."""

    description: dict[str, Any]
    sample_ids: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray
    classes: list[str]

    @property
    def correct(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1) == self.labels

    def aligned(self, sample_ids: np.ndarray) -> "Evaluation":
        """The same evaluation in the order of `sample_ids` (which must be the same set)."""
        order = pairing_order(self.sample_ids, sample_ids,
                              f"{self.description['model']} on {self.description['condition']}")
        if order is None:
            return self
        return dataclasses.replace(self, sample_ids=sample_ids, labels=self.labels[order],
                                   probabilities=self.probabilities[order])


def pairing_order(own: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray | None:
    """Positions in `own` of the sample ids `wanted` (None: already in that order); `what`
    names the results for the message when the two are not the same set of samples."""
    if np.array_equal(own, wanted):
        return None
    position = {sample: index for index, sample in enumerate(own)}
    if len(wanted) != len(position) or any(sample not in position for sample in wanted):
        raise InputError(f"{what}: its test samples differ from those of the condition it is "
                         "paired with")
    return np.array([position[sample] for sample in wanted])


def read_evaluation(metrics_path: str | os.PathLike,
                    predictions_path: str | os.PathLike) -> Evaluation:
    """A metrics JSON and its prediction table, checked against each other."""
    metrics_path, predictions_path = Path(metrics_path), Path(predictions_path)
    record = read_result_record(metrics_path, "metrics JSON", METRIC_KEYS)
    # the numbers that name a condition: an attack's budget, a perturbation's severity
    kind = record["kind"]
    budget = {"attack": "epsilon", "perturbation": "severity"}.get(kind) \
        if isinstance(kind, str) else None
    if kind not in ("clean", "attack", "perturbation") or budget and (
            isinstance(record[budget], bool) or not isinstance(record[budget], (int, float))):
        raise InputError(f"{metrics_path}: kind {record['kind']!r} with epsilon "
                         f"{record['epsilon']!r} and severity {record['severity']!r} describes "
                         "no condition (clean; attack with a number epsilon; perturbation with "
                         "a number severity)")
    table = read_result_table(predictions_path, "prediction table", ("sample_id", "label"),
                              dtype={"sample_id": str})
    probability_columns = [column for column in table.columns if column.startswith("prob_")]
    if len(probability_columns) < 2:
        raise InputError(f"{predictions_path}: a prediction table needs one prob_<class> "
                         "column per class")
    if len(table) != record["n"]:
        raise InputError(f"{predictions_path}: {len(table)} rows, but {metrics_path} counts "
                         f"n = {record['n']}")
    labels = pd.to_numeric(table["label"], errors="coerce").to_numpy(dtype=np.float64)
    probabilities = table[probability_columns].apply(pd.to_numeric, errors="coerce") \
        .to_numpy(dtype=np.float64)
    # a damaged table must not reach the statistics as numbers: each class's probability
    # in [0, 1], summing to 1 per row (the evaluation writes softmax outputs)
    bad = ~(np.isfinite(labels) & (labels == np.round(labels)) & (labels >= 0)
            & (labels < len(probability_columns))
            & np.isfinite(probabilities).all(axis=1)
            & ((probabilities >= 0) & (probabilities <= 1)).all(axis=1)
            & (np.abs(probabilities.sum(axis=1) - 1) < 1e-3))
    if bad.any():
        line = int(np.flatnonzero(bad)[0]) + 2  # line 1 is the header
        raise InputError(f"{predictions_path}: line {line}: the label must be a class index "
                         f"below {len(probability_columns)} and the probabilities numbers in "
                         "[0, 1] that sum to 1; the table is damaged (rerun its evaluation)")
    return Evaluation(
        description={key: record[key] for key in DESCRIPTION_KEYS},
        sample_ids=table["sample_id"].to_numpy(dtype=str),
        labels=labels.astype(np.int64),
        probabilities=probabilities,
        classes=[column[len("prob_"):] for column in probability_columns])
