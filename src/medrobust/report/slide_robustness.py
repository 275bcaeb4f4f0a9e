"""The report's "Slides: robustness" subsection: each slide model's tile-fraction and
adversarial-tile runs (`evaluate.slide_robustness`) as tables and curves."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from medrobust.errors import RERUN, InputError
from medrobust.evaluate.slide_robustness import CONDITION_COLUMNS, METRICS, PREDICTIONS, RUN
from medrobust.evaluate.statistics import comparison_columns, paired_comparison
from medrobust.io.result_files import (
    check_numbers, read_result_record, read_result_table)
from medrobust.report import figures


RUN_KEYS = ("model", "dataset", "n_test_slides", "class_counts", "fractions", "severity_units",
            "adversarial", "attack", "statistics")
INTERVALS = ("accuracy", "accuracy_low", "accuracy_high", "auc", "auc_low", "auc_high")


def _read(folder: Path) -> tuple[pd.DataFrame, dict[str, Any], pd.DataFrame]:
    """A run's metrics, each condition with its `predicted` classes, its run record and its
    per-slide predictions, checked against each other (`_check_conditions`)."""
    conditions = ("fraction", "k", "epsilon")   # severity is empty where none applies
    metrics = read_result_table(
        folder / METRICS, "slide robustness metrics",
        (*CONDITION_COLUMNS, "n", *INTERVALS, "model", "dataset"),
        numbers=("severity", *INTERVALS[3:]),   # AUC is undefined on slides of one class
        finite=(*conditions, "n", *INTERVALS[:3]), dtype={"perturbation": str})
    predictions = read_result_table(
        folder / PREDICTIONS, "slide robustness predictions",
        ("sample_id", "label", "prediction", *CONDITION_COLUMNS), numbers=("severity",),
        finite=(*conditions, "label", "prediction"),
        dtype={"perturbation": str, "sample_id": str})
    classes = _classes(predictions)
    predictions = check_numbers(predictions, folder / PREDICTIONS,
                                finite=[f"prob_{name}" for name in classes])
    run = read_result_record(folder / RUN, "slide robustness run record", RUN_KEYS)
    _check_conditions(folder, metrics, predictions, run, classes)
    predicted = (predictions.groupby(list(CONDITION_COLUMNS), dropna=False)["prediction"]
                 .agg(lambda column: _predicted(column, classes))
                 .rename("predicted").reset_index())
    return metrics.merge(predicted, on=list(CONDITION_COLUMNS), how="left"), run, predictions


def _check_conditions(folder: Path, metrics: pd.DataFrame, predictions: pd.DataFrame,
                      run: Mapping[str, Any], classes: Sequence[str]) -> None:
    """What `evaluate.slide_robustness` writes, so that a lost row cannot drop a condition or
    change a count: in metrics.csv one row per condition of run.json's plan, each scored on
    its n_test_slides; in predictions.csv one row per condition and slide, each a class."""
    metrics_path, predictions_path, run_path = folder / METRICS, folder / PREDICTIONS, folder / RUN
    if len(classes) < 2 or not predictions["prediction"].isin(range(len(classes))).all():
        raise InputError(f"{predictions_path}: each prediction must be the index of a class of "
                         f"its prob_<class> columns; {RERUN}")
    slides, keys = run["n_test_slides"], _condition_keys(metrics)
    if keys.duplicated().any() or set(keys) != set(_condition_keys(predictions)):
        raise InputError(f"{metrics_path}: its conditions are not those of {predictions_path}, "
                         f"each once; {RERUN}")
    scored = predictions.groupby(_condition_keys(predictions))["sample_id"].nunique()
    if len(predictions) != len(keys) * slides or (scored != slides).any():
        raise InputError(f"{predictions_path}: {len(predictions)} rows, not one per condition "
                         f"({len(keys)}) and test slide ({slides}, {run_path}); {RERUN}")
    if (metrics["n"] != slides).any():
        raise InputError(f"{metrics_path}: n must be the {slides} test slides of {run_path} "
                         f"in every row; {RERUN}")
    fractions = metrics[metrics["kind"] == "tile_fraction"]
    attacked = metrics[metrics["kind"] == "adversarial_tiles"]
    budgets = run["adversarial"] or {"top_k": [], "epsilons": []}
    planned = ((metrics["kind"] == "clean").sum() == 1
               and set(fractions["perturbation"]) == set(run["severity_units"])
               and all(sorted(group) == sorted(run["fractions"]) for _, group
                       in fractions.groupby(["perturbation", "severity"])["fraction"])
               and sorted(zip(attacked["k"], attacked["epsilon"]))
               == sorted((k, e) for k in budgets["top_k"] for e in budgets["epsilons"])
               and len(metrics) == 1 + len(fractions) + len(attacked))
    if not planned:
        raise InputError(f"{metrics_path}: its conditions are not the clean one, every "
                         f"perturbation at each fraction and every attack budget of {run_path}; "
                         f"{RERUN}")


def _classes(predictions: pd.DataFrame) -> list[str]:
    """Class names in index order, from the probability columns."""
    return [column.removeprefix("prob_") for column in predictions.columns
            if column.startswith("prob_")]


def _predicted(indices: pd.Series, classes: Sequence[str]) -> str:
    """How many slides a condition called each class: a collapse to one class shows here,
    where accuracy alone reads as the class's share (0.5 on a balanced set)."""
    counts = indices.value_counts().sort_index()
    if len(counts) == 1:
        return f"all {int(counts.iloc[0])} {classes[int(counts.index[0])]}"
    return ", ".join(f"{int(count)} {classes[int(index)]}" for index, count in counts.items())


def _interval(row: pd.Series, metric: str) -> dict[str, Any]:
    def value(key: str) -> float | None:
        return None if pd.isna(row[key]) else float(row[key])

    return {"estimate": value(metric), "low": value(f"{metric}_low"),
            "high": value(f"{metric}_high")}


def _condition(row: pd.Series) -> str:
    if row["kind"] == "clean":
        return "clean"
    if row["kind"] == "tile_fraction":
        return f"{row['perturbation']} {row['severity']:g}, {row['fraction']:.0%} of tiles"
    k = int(row["k"])
    return f"PGD ε {row['epsilon']:g}/255 on the top {k} tile{'s' if k != 1 else ''}"


def base_comparisons(runs: Sequence[Mapping[str, Any]], predictions: Sequence[pd.DataFrame],
                     baselines: Mapping[str, str], statistics: Mapping[str, Any],
                     ) -> list[dict[str, Any]]:
    """Each model against its base model (`baselines`: MHIM-MIL model -> base, config's
    mil_baselines) under every condition both runs have, on the same test slides:
    statistics.paired_comparison's columns (statistics.comparison_columns), labelled."""
    by_model = {run["model"]: (run, table) for run, table in zip(runs, predictions)}
    rows = []
    for model, base in baselines.items():
        if model not in by_model or base not in by_model \
                or by_model[model][0]["dataset"] != by_model[base][0]["dataset"]:
            continue
        ours, theirs = (by_model[name][1] for name in (model, base))
        columns = [f"prob_{name}" for name in _classes(ours)]
        reference = {key: group.set_index("sample_id")
                     for key, group in theirs.groupby(_condition_keys(theirs), sort=False)}
        for key, group in ours.groupby(_condition_keys(ours), sort=False):
            if key not in reference:
                continue
            condition = group.iloc[0]
            label = _condition(condition)
            if set(group["sample_id"]) != set(reference[key].index):
                raise InputError(f"slide robustness of {model} and {base}: {label} was scored "
                                 "on different test slides")
            aligned = reference[key].loc[group["sample_id"]]
            if (aligned["label"].to_numpy() != group["label"].to_numpy()).any():
                raise InputError(f"slide robustness of {model} and {base}: {label} gives the "
                                 "same slides different labels")
            comparison = paired_comparison(
                group["label"].to_numpy(), aligned[columns].to_numpy(), group[columns].to_numpy(),
                statistics["n_resamples"], statistics["seed"], statistics["confidence"],
                statistics["alpha"])
            rows.append({"dataset": by_model[model][0]["dataset"], "model": model,
                         "reference_model": base, "label": label,
                         **{column: None if pd.isna(condition[column]) else condition[column]
                            for column in CONDITION_COLUMNS},
                         # adversarial rows of more classes mix runs: no macro AUC to compare
                         **comparison_columns(comparison, with_auc=not (
                             condition["kind"] == "adversarial_tiles" and len(columns) > 2))})
    return rows


def _condition_keys(predictions: pd.DataFrame) -> pd.Series:
    """One exact key per condition (its CONDITION_COLUMNS), where labels round numbers."""
    columns = predictions[list(CONDITION_COLUMNS)]
    return columns.apply(lambda column: column.map(repr)).agg("|".join, axis=1)


def slide_robustness_view(folders: Sequence[str | os.PathLike],
                          baselines: Mapping[str, str] | None = None,
                          statistics: Mapping[str, Any] | None = None,
                          ) -> tuple[dict[str, Any] | None, dict[str, tuple[bytes, str]]]:
    """What the page shows (None without runs) and the subsection's figures. With
    `baselines` and `statistics` (n_resamples, seed, confidence, alpha), also each MHIM-MIL
    model against its base under every condition (`base_comparisons`)."""
    if not folders:
        return None, {}
    tables, runs, predictions = zip(*(_read(Path(folder)) for folder in folders))
    metrics = pd.concat(tables, ignore_index=True)
    bands = figures.bands_caption({run["statistics"]["confidence"] for run in runs})
    found = {}
    if (metrics["kind"] == "tile_fraction").any():
        found["slide_tile_fraction"] = (
            figures.png(figures.tile_fraction_curves(metrics)),
            "Slide accuracy and AUC against the fraction of each test slide's tiles perturbed "
            "(a seeded random set, the same for every perturbation and model, nested across "
            "fractions) and embedded again; the other tiles keep their features; fraction 0 is "
            f"the clean slide; {bands}.")
    if (metrics["kind"] == "adversarial_tiles").any():
        found["slide_adversarial_tiles"] = (
            figures.png(figures.adversarial_tile_curves(metrics)),
            "Slide accuracy and AUC against k, the number of most-attended tiles attacked by "
            "PGD-L∞ in pixel space through the backbone and the MIL head; k = 0 is the clean "
            f"slide; {bands}.")
    # slides the run at their budget left right where a smaller budget's run (or the clean
    # slide) had them wrong: the attack fell short (older runs have no such key)
    models = [{"model": run["model"], "dataset": run["dataset"], "n": run["n_test_slides"],
               "class_counts": run["class_counts"], "attack": run["attack"],
               "fell_short": sum(bool(entry["changed_correctness"])
                                 for entry in run.get("replaced_by_smaller_budget") or [])}
              for run in runs]
    units = {name: unit for run in runs for name, unit in run["severity_units"].items()}
    rows = [{"model": row["model"], "condition": _condition(row), "n": int(row["n"]),
             "accuracy": _interval(row, "accuracy"), "auc": _interval(row, "auc"),
             "predicted": row["predicted"]}
            for _, row in metrics.iterrows()]
    comparisons = (base_comparisons(runs, predictions, baselines, statistics)
                   if baselines and statistics else [])
    return {"models": models, "rows": rows, "severity_units": units,
            "fewest_slides": min(model["n"] for model in models),
            "comparisons": comparisons,
            "alpha": statistics["alpha"] if statistics else None}, found
