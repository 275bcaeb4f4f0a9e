"""k-fold cross-validation of a slide classifier (`slide_classifiers.<name>.cv_folds`):
each fold's model, trained with early stopping on its own fold's validation slides
(`train.slide_classifier.fold_split`), scored on the dataset's fixed test split, and
each metric's mean and spread across the folds (`statistics.across_folds`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch

from medrobust.errors import InputError
from medrobust.evaluate.metrics import classification_metrics
from medrobust.evaluate.slide_classifier import predict_split
from medrobust.evaluate.statistics import across_folds
from medrobust.io.atomic import atomic_path, write_json
from medrobust.logs import get_logger
from medrobust.models.registry import CONFIG_FILE, read_history

log = get_logger(__name__)
FOLD_METRICS = ("val_auc", "test_accuracy", "test_auc")
SPREAD = "sample standard deviation across folds (ddof 1); not a confidence interval"


def fold_row(model_dir: Path, feature_paths: Sequence[str | os.PathLike],
             device: str | torch.device) -> dict[str, Any]:
    """One fold's numbers: its kept epoch's validation AUC and its test metrics."""
    config, bags, probabilities = predict_split(model_dir, feature_paths, "test", device)
    cv = config.get("training", {}).get("cv")
    if cv is None:
        raise InputError(f"{model_dir / CONFIG_FILE}: not a cross-validation fold's model")
    history = read_history(model_dir)
    [kept] = [record for record in history["epochs"] if record["epoch"] == history["best_epoch"]]
    metrics = classification_metrics([bag.label for bag in bags], probabilities)
    return {"fold": cv["fold"], "n_val": len(cv["val_slides"]), "n_test": metrics["n"],
            "best_epoch": history["best_epoch"], "val_auc": kept["val_auc"],
            "test_accuracy": metrics["accuracy"], "test_auc": metrics["auc"]}


def evaluate_folds(fold_dirs: Sequence[str | os.PathLike],
                   feature_paths: Sequence[str | os.PathLike], out_json: str | os.PathLike,
                   out_csv: str | os.PathLike, device: str | torch.device = "cpu"
                   ) -> dict[str, Any]:
    """Score every fold's model on the test split; write per-fold rows with the mean and
    spread of each metric (JSON; CSV: one row per fold, then `mean` and `sd`)."""
    rows = sorted((fold_row(Path(folder), feature_paths, device) for folder in fold_dirs),
                  key=lambda row: row["fold"])
    config = json.loads((Path(fold_dirs[0]) / CONFIG_FILE).read_text())
    summary = {key: across_folds([row[key] for row in rows]) for key in FOLD_METRICS}
    result = {"model": Path(fold_dirs[0]).parent.parent.name, "dataset": config["dataset"],
              "folds": len(rows), "seed": config["training"]["cv"]["seed"], "per_fold": rows,
              "across_folds": summary, "spread": SPREAD}
    table = pd.DataFrame(rows + [{"fold": statistic, **{key: summary[key][statistic]
                                                        for key in FOLD_METRICS}}
                                 for statistic in ("mean", "sd")])
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    write_json(out_json, result)
    log.info("%s: %d folds, test AUC %s (sd %s)", result["model"], len(rows),
             summary["test_auc"]["mean"], summary["test_auc"]["sd"])
    return result
