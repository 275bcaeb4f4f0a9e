"""The report: one self-contained HTML page from Jinja2 templates, and its figures as files.

`write_report` gathers what the page shows (the summary tables with their
intervals, the paired verdicts, figures, training recipes, data and
provenance) into plain values and renders `templates/report.html.j2`;
the template escapes every inserted value. The same PNGs the page inlines
are written to a folder so `snakemake --report` can show them too, and the
slide study's paired comparisons, which the page computes, to a CSV.
"""

from __future__ import annotations

import base64
import json
import os
import zipfile
import zlib
from itertools import product
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import numpy as np
import pandas as pd
import yaml

from medrobust import __version__
from medrobust.config import defense_labels, mil_baselines
from medrobust.data.manifest import MANIFEST_NAME, read_manifest
from medrobust.errors import RERUN, InputError
from medrobust.evaluate.fourier_heatmap import read_heatmap
from medrobust.evaluate.slide_robustness import CONDITION_COLUMNS
from medrobust.evaluate import lesion_visibility
from medrobust.evaluate.metrics import Evaluation, read_evaluation
from medrobust.evaluate.statistics import cluster_numbers, smallest_detectable_difference
from medrobust.io.atomic import atomic_path
from medrobust.io.image_store import ImageStore, open_image_store
from medrobust.io.result_files import (
    check_numbers, read_result_png, read_result_record, read_result_table)
from medrobust.io.slide_stores import open_tile_store
from medrobust.logs import get_logger
from medrobust.models.registry import CONFIG_FILE, read_history
from medrobust.perturbations import harshness
from medrobust.perturbations.fourier import gaussian_lowpass_mask
from medrobust.report import figures
from medrobust.report.provenance import applicable_config, class_counts, provenance
from medrobust.report.slide_attention import attention_section
from medrobust.report.slide_robustness import slide_robustness_view
from medrobust.report.study_tables import (
    DefenseTable, budget_label, defense_tables, write_defense_tables)
from medrobust.report.summary import (
    COMPARISON_COLUMNS, HEADLINE_KINDS, MASKING_COLUMNS, PAIRED_COLUMNS, PER_CLASS_COLUMNS,
    SUMMARY_COLUMNS, rounded)
from medrobust.slide_index import read_slide_index

log = get_logger(__name__)
TEMPLATES = Path(__file__).parent / "templates"
# the page inlines every picture; a cohort's thousands of QC pictures stay beside their stores
MAX_QC_FIGURES = 24


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    environment.filters["num"] = format_number
    environment.filters["signed"] = lambda value: format_number(value, signed=True)
    environment.filters["pvalue"] = format_p_value
    environment.filters["p_clause"] = format_p_value_clause
    return environment


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def stand_in_notes(config: Mapping[str, Any]) -> list[str]:
    """What in this run stands in for real data or a trained model, for the top of the page:
    synthetic datasets, and slide features from a randomly initialised backbone."""
    used = applicable_config(config)
    notes = [f"{name}: synthetic {settings['source'].get('modality', '')} data"
             for name, settings in used.get("datasets", {}).items()
             if settings["source"]["type"] == "synthetic"]
    features = used.get("features") or {}
    if features.get("weights") == "random":
        notes.append(f"slide features from a randomly initialised {features['backbone']} "
                     "(features.weights: random), not a trained extractor")
    return notes


def format_number(value: Any, signed: bool = False) -> str:
    """Three decimals, as in the tables; an en dash where undefined."""
    if _missing(value):
        return "–"
    return f"{float(value):+.3f}" if signed else f"{float(value):.3f}"


def format_p_value(value: Any) -> str:
    if _missing(value):
        return "–"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def format_p_value_clause(value: Any) -> str:
    """In a sentence: "p < 0.001", "p = 0.017"."""
    shown = format_p_value(value)
    return f"p {shown}" if shown.startswith("<") else f"p = {shown}"


# robustness.json's columns that hold text, flags or null; every other one a number or null
# (epsilon and severity as exact strings of numbers)
_TEXT_COLUMNS = frozenset({
    "family", "model", "dataset", "condition", "kind", "attack", "perturbation", "norm",
    "source_model", "white_box", "threat_model", "positive_class", "class", "reference_model",
    "defense", "test", "verdict", "family_verdict", "auc_caveat", "family_auc_caveat",
    "gradient_attacks", "gradient_free_attacks", "flagged"})


def load_summary(path: str | os.PathLike) -> dict[str, Any]:
    """robustness.json as tables (epsilon and severity back to numbers), every number checked:
    a word in its place would stop the page with a traceback naming no file."""
    path = Path(path)
    tables = {"robustness": SUMMARY_COLUMNS, "per_class": PER_CLASS_COLUMNS,
              "comparisons": COMPARISON_COLUMNS, "gradient_masking": MASKING_COLUMNS}
    data = read_result_record(path, "robustness summary",
                              (*tables, "settings", "confusion_matrices"))
    for name, columns in tables.items():
        try:
            table = pd.DataFrame(data[name], columns=list(columns))
        except (TypeError, ValueError) as error:
            raise InputError(f"{path}: {name} must be a list of rows ({error}); "
                             f"{RERUN}") from error
        tables[name] = check_numbers(
            table, path, numbers=[column for column in columns if column not in _TEXT_COLUMNS],
            where=lambda row, name=name: f"{name} row {row + 1}")
    return {**tables, "settings": data["settings"],
            "confusion_matrices": data["confusion_matrices"]}


# ---------------------------------------------------------------------------
# what the page shows, as plain values

def condition_label(row: Mapping[str, Any]) -> str:
    """A condition in words, as headers and figures name it."""
    kind = row["kind"]
    if kind == "clean":
        return "clean"
    if kind == "attack":
        threat = ("white-box" if row["threat_model"] == "white-box"
                  else f"transfer from {row['source_model']}")
        return f"{row['attack']} {budget_label(row)}, {threat}"
    if kind == "worst_case":
        return f"worst case {budget_label(row)}, {row['threat_model']}"
    if kind == "perturbation":
        return f"{row['perturbation']} severity {row['severity']:g}"
    return "mean over perturbations"


def _value(row: Mapping[str, Any], key: str) -> Any:
    value = row.get(key)
    return None if _missing(value) else value


def _interval(row: Mapping[str, Any], metric: str) -> dict[str, Any]:
    return {"estimate": _value(row, metric), "low": _value(row, f"{metric}_low"),
            "high": _value(row, f"{metric}_high")}


def column_key(row: Mapping[str, Any]) -> tuple:
    """Conditions that share a column: white-box attacks on different models are one column."""
    source = None if row["threat_model"] == "white-box" else _value(row, "source_model")
    return tuple(_value(row, key) for key in ("kind", "attack", "norm", "epsilon",
                                              "threat_model", "perturbation", "severity")) + (
        source,)


def glance_rows(robustness: pd.DataFrame, defenses: Mapping[str, str]) -> tuple[list, list]:
    """Per model: clean, the worst case at each (ε, threat model), mean over perturbations."""
    columns = [("clean", "clean")]
    worst = robustness[robustness["kind"] == "worst_case"].sort_values(
        ["threat_model", "norm", "epsilon"])
    columns += [(row["condition"], condition_label(row))
                for _, row in worst.drop_duplicates("condition").iterrows()]
    if (robustness["kind"] == "mean_perturbation").any():
        columns.append(("mean-perturbation", "mean over perturbations"))
    rows = []
    for (family, dataset, model), group in robustness.groupby(["family", "dataset", "model"],
                                                              sort=False):
        by_condition = {row["condition"]: row for _, row in group.iterrows()}
        rows.append({"family": family, "dataset": dataset, "model": model,
                     "defense": defenses.get(model, "none"), "n": int(group["n"].max()),
                     "cells": [_interval(by_condition[c], "accuracy") if c in by_condition
                               else None for c, _ in columns]})
    return [label for _, label in columns], rows


def verdicts(comparisons: pd.DataFrame) -> list[dict[str, Any]]:
    """Per (defended, reference) pair: the headline rows (clean, worst cases, perturbations),
    judged as one family (their Holm-adjusted p-values and verdicts)."""
    pairs = []
    headline = comparisons[comparisons["kind"].isin(HEADLINE_KINDS)]
    for (dataset, reference, model), group in headline.groupby(
            ["dataset", "reference_model", "model"], sort=False):
        rows = [comparison_row(row.drop(["verdict", "p_value", "auc_caveat"]).rename(
                    {"family_verdict": "verdict", "family_p_value": "p_value",
                     "family_auc_caveat": "auc_caveat"}))
                | {"unadjusted_p_value": _value(row, "p_value")}
                for _, row in group.iterrows()]
        pairs.append({"dataset": dataset, "reference": reference, "model": model,
                      "defense": group["defense"].iloc[0], "rows": rows})
    return pairs


def _plain(row: Mapping[str, Any]) -> dict[str, Any]:
    """A table row with missing numbers as None, as the template tests them."""
    return {key: _value(row, key) for key in row.keys()}


def comparison_row(row: Mapping[str, Any], label: str | None = None) -> dict[str, Any]:
    """A comparisons-table row (statistics.comparison_columns) for `m.comparison_table`;
    `label` names its condition where the row has no image condition (condition_label)."""
    row = _plain(row)
    verdict = row["verdict"]
    if verdict == "no detectable difference":
        verdict = f"no detectable difference at n = {int(row['n'])}"
    caveat = None
    if row.get("auc_caveat"):  # accuracy and ranking disagree: say both
        auc = _interval(row, "auc_difference")
        caveat = (f"but {row['auc_caveat']}: {auc['estimate']:+.3f} "
                  f"[{auc['low']:+.3f}, {auc['high']:+.3f}]")
    return {**row, "label": label or condition_label(row), "verdict_text": verdict,
            "caveat": caveat,
            "difference": _interval(row, "accuracy_difference"),
            "auc_difference": _interval(row, "auc_difference")}


def one_class_models(confusion_matrices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Models that predict one class for every clean test input: their accuracy is that
    class's share, whatever they learnt, and only their AUC (the ranking) says more."""
    flagged = []
    for item in confusion_matrices:
        predicted = np.asarray(item["matrix"]).sum(axis=0)  # rows true, columns predicted
        if item["condition"] != "clean" or predicted.sum() == 0 \
                or np.count_nonzero(predicted) != 1:
            continue
        flagged.append({"dataset": item["dataset"], "model": item["model"],
                        "class": item["classes"][int(np.flatnonzero(predicted)[0])],
                        "n": int(predicted.sum()),
                        "unit": "slides" if item["family"] == "slide" else "images"})
    return flagged


def mil_headline(pair: Mapping[str, Any]) -> str | None:
    """Whether an MHIM-MIL model beats its base model on the clean test set, in words."""
    clean = next((row for row in pair["rows"] if row["kind"] == "clean"), None)
    if clean is None:
        return None
    verb = {"helped": "beats", "hurt": "does worse than"}.get(
        clean["verdict"], "shows no detectable difference from")
    return f"{pair['model']} {verb} {pair['reference']} on the clean test slides"


def small_test_sets(robustness: pd.DataFrame, threshold: int, alpha: float) -> list[dict]:
    """A warning per dataset whose test set is below `threshold`."""
    warnings = []
    for (family, dataset), group in robustness.groupby(["family", "dataset"], sort=False):
        n = int(group["n"].max())
        if n >= threshold:
            continue
        clean = group[group["kind"] == "clean"]
        widths = (clean["accuracy_high"] - clean["accuracy_low"]).dropna()
        detectable = smallest_detectable_difference(n, alpha)
        warnings.append({"dataset": dataset, "n": n,
                         "unit": "slides" if family == "slide" else "images",
                         "width": float(widths.max()) if len(widths) else None,
                         "detectable": detectable,
                         "detectable_count": None if detectable is None
                         else round(detectable * n)})
    return warnings


def _accuracy_cell(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A table cell: accuracy with its interval, the AUC beneath, and the share MagNet's
    detector rejected for a model behind one; None where not run."""
    if row is None:
        return None
    detection = row.get("detection_rate")
    return {"accuracy": _interval(row, "accuracy"), "auc": _interval(row, "auc"),
            "detection_rate": None if detection is None or pd.isna(detection) else float(detection)}


def study_table(robustness: pd.DataFrame, kinds: Sequence[str]) -> dict[str, Any]:
    """Rows = models, columns = conditions of `kinds` (clean first); accuracy and AUC cells."""
    rows = robustness[robustness["kind"].isin(["clean", *kinds])]
    order = {kind: index for index, kind in enumerate(["clean", *kinds])}
    # a perturbation's severities from the mildest to the harshest
    harsh = [harshness(row["perturbation"], row["severity"])
             if row["kind"] == "perturbation" else None for _, row in rows.iterrows()]
    conditions = rows.assign(_order=rows["kind"].map(order), _harshness=harsh).sort_values(
        ["_order", "attack", "perturbation", "norm", "epsilon", "_harshness", "threat_model",
         "source_model"], na_position="first")
    conditions = conditions[~conditions.apply(column_key, axis=1).duplicated()]
    headers = [condition_label(row) for _, row in conditions.iterrows()]
    keys = [column_key(row) for _, row in conditions.iterrows()]
    table = []
    for (dataset, model), group in rows.groupby(["dataset", "model"], sort=False):
        if set(group["kind"]) == {"clean"} and kinds:
            continue  # models only evaluated clean (surrogates) have their own row at a glance
        by_key = {column_key(row): row for _, row in group.iterrows()}
        table.append({"dataset": dataset, "model": model,
                      "cells": [_accuracy_cell(by_key.get(key)) for key in keys]})
    return {"headers": headers, "rows": table}


def defense_table_view(table: DefenseTable, warnings: Sequence[Mapping[str, Any]]) -> dict:
    """A study table as the template shows it, with its dataset's small-test-set warning."""
    cells = [cell for row in table.rows for cell in row.cells if cell is not None]
    return {"title": table.title, "n": max(int(cell["n"]) for cell in cells),
            "headers": table.columns,
            "warning": next((w for w in warnings if w["dataset"] == table.dataset), None),
            "rows": [{"setting": row.label, "model": row.model,
                      "cells": [_accuracy_cell(cell) for cell in row.cells]}
                     for row in table.rows]}


def metric_rows(robustness: pd.DataFrame) -> list[dict[str, Any]]:
    """Every (model, condition) with all five metrics and their intervals."""
    return [{**_plain(row), "label": condition_label(row),
             "metrics": {metric: _interval(row, metric) for metric in
                         ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity")}}
            for _, row in robustness.iterrows()]


def per_class_rows(per_class: pd.DataFrame, robustness: pd.DataFrame) -> list[dict[str, Any]]:
    labels = {(row["model"], row["condition"]): condition_label(row)
              for _, row in robustness.iterrows()}
    return [{**_plain(row), "label": labels.get((row["model"], row["condition"]), row["condition"]),
             "metrics": {metric: _interval(row, metric)
                         for metric in ("sensitivity", "specificity", "auc")}}
            for _, row in per_class.iterrows()]


# ---------------------------------------------------------------------------
# pictures of test images, labelled with each model's prediction

class Predictions:
    """Each evaluation's per-sample predictions, looked up by (model, condition)."""

    def __init__(self, evaluations: Sequence[Mapping[str, Any]]):
        self._records = {(record["model"], record["condition"]): record
                         for record in evaluations}
        self._read: dict[tuple[str, str], tuple[Evaluation, dict[str, int]]] = {}

    def models_on(self, evaluations: Sequence[Mapping[str, Any]], store: str) -> list[tuple]:
        return [(record["model"], record["condition"]) for record in evaluations
                if record["store"] == store]

    def lookup(self, model: str, condition: str, sample_id: str) -> tuple[str, float, bool]:
        """(predicted class, its probability, correct) of one sample."""
        key = (model, condition)
        if key not in self._read:  # checked as the summary reads it
            evaluation = read_evaluation(self._records[key]["metrics"],
                                         self._records[key]["predictions"])
            self._read[key] = evaluation, {sample: row for row, sample
                                           in enumerate(evaluation.sample_ids)}
        evaluation, rows = self._read[key]
        if sample_id not in rows:
            raise InputError(f"{self._records[key]['predictions']}: no prediction for test "
                             f"sample {sample_id!r}")
        row = rows[sample_id]
        best = int(evaluation.probabilities[row].argmax())
        return (evaluation.classes[best], float(evaluation.probabilities[row, best]),
                bool(best == evaluation.labels[row]))


def example_samples(store: ImageStore, n: int) -> list[int]:
    """Up to `n` test samples, alternating between classes so each class is seen."""
    index = store.indices("test")
    by_class = [list(index[store.labels[index] == label]) for label in np.unique(store.labels[index])]
    chosen = []
    while len(chosen) < n and any(by_class):
        for members in by_class:
            if members and len(chosen) < n:
                chosen.append(members.pop(0))
    return chosen


def _images(store: ImageStore, sample_ids: Sequence[str]) -> np.ndarray:
    position = {sample: index for index, sample in enumerate(store.sample_ids)}
    missing = [sample for sample in sample_ids if sample not in position]
    if missing:
        raise InputError(f"{store.path}: lacks samples {missing}")
    return store.read(np.array([position[sample] for sample in sample_ids]))


def example_figure(clean: ImageStore, attacked: ImageStore, label: str,
                   clean_models: Sequence[tuple], attacked_models: Sequence[tuple],
                   predictions: Predictions, n: int) -> bytes:
    """Clean, attacked and amplified difference per sample, each model's prediction under each."""
    chosen = example_samples(clean, n)
    sample_ids = [str(clean.sample_ids[i]) for i in chosen]
    original, changed = _images(clean, sample_ids), _images(attacked, sample_ids)
    difference = changed - original
    largest = float(np.abs(difference).max())
    gain = 0.5 / largest if largest > 0 else 1.0
    rows, row_labels = [], []
    for i, sample in enumerate(sample_ids):
        rows.append([
            (original[i], "clean", figures.prediction_lines(
                {m: predictions.lookup(m, c, sample) for m, c in clean_models})),
            (changed[i], "attacked", figures.prediction_lines(
                {m: predictions.lookup(m, c, sample) for m, c in attacked_models})),
            (0.5 + gain * difference[i], f"difference ×{gain:.0f}", "mid-grey = unchanged"),
        ])
        row_labels.append(f"{sample}\ntrue: {clean.classes[clean.labels[chosen[i]]]}")
    return figures.png(figures.image_panel_grid(rows, row_labels, label))


def perturbation_strip(clean: ImageStore, stores: Sequence[tuple[float, ImageStore, list]],
                       name: str, clean_models: Sequence[tuple], predictions: Predictions,
                       n: int) -> bytes:
    """One row per sample: the clean image and the image at every severity."""
    chosen = example_samples(clean, n)
    sample_ids = [str(clean.sample_ids[i]) for i in chosen]
    unit = figures.severity_unit(name)
    columns = [(_images(clean, sample_ids), "clean", clean_models)]
    columns += [(_images(store, sample_ids), f"{severity:g}", models)
                for severity, store, models in stores]
    rows = [[(images[i], title, figures.prediction_lines(
        {m: predictions.lookup(m, c, sample) for m, c in models}))
        for images, title, models in columns] for i, sample in enumerate(sample_ids)]
    labels = [f"{sample}\ntrue: {clean.classes[clean.labels[chosen[i]]]}"
              for i, sample in enumerate(sample_ids)]
    return figures.png(figures.image_panel_grid(rows, labels, f"{name}: {unit}"))


def image_figures(robustness: pd.DataFrame, evaluations: Sequence[Mapping[str, Any]],
                  n_examples: int) -> dict[str, tuple[bytes, str]]:
    """Example and perturbation-strip figures per image dataset, by file name with captions."""
    found: dict[str, tuple[bytes, str]] = {}
    if n_examples < 1:
        return found
    predictions = Predictions(evaluations)
    kinds = {(row["model"], row["condition"]): row for _, row in robustness.iterrows()}
    image_records = [r for r in evaluations if r["family"] == "image"]
    for dataset in sorted({r["dataset"] for r in image_records}):
        records = [r for r in image_records if r["dataset"] == dataset]
        clean_path = next(r["store"] for r in records if r["condition"] == "clean")
        clean = open_image_store(clean_path)
        stores: dict[str, dict[str, Any]] = {}
        for record in records:
            row = kinds.get((record["model"], record["condition"]))
            if row is None or row["kind"] not in ("attack", "perturbation"):
                continue
            entry = stores.setdefault(record["store"], {"row": row, "models": []})
            entry["models"].append((record["model"], record["condition"]))
        attacked_models = {m for entry in stores.values() for m, _ in entry["models"]}
        clean_models = [(m, "clean") for m in sorted(attacked_models)]
        attacks = {path: entry for path, entry in stores.items() if entry["row"]["kind"] == "attack"}
        # the largest budget of each attack: the pictures where the change is visible
        largest = {}
        for entry in attacks.values():
            row = entry["row"]
            largest[row["attack"]] = max(largest.get(row["attack"], 0.0), float(row["epsilon"]))
        for path, entry in sorted(attacks.items()):
            row = entry["row"]
            if float(row["epsilon"]) != largest[row["attack"]]:
                continue
            label = condition_label(row)
            if row["threat_model"] == "white-box":
                label = f"{row['attack']} ε={row['epsilon']:g}/255, white-box on {row['source_model']}"
            name = f"examples_{dataset}_{row['attack']}_eps{row['epsilon']:g}_from_{row['source_model']}"
            found[name] = (example_figure(clean, open_image_store(path), f"{dataset}: {label}",
                                          [(m, c) for m, c in clean_models
                                           if m in {x for x, _ in entry["models"]}],
                                          entry["models"], predictions, n_examples),
                           f"{dataset}: {label}. Predictions of every model evaluated on "
                           "these images, with the probability of the predicted class.")
        perturbed: dict[str, list] = {}
        for path, entry in stores.items():
            if entry["row"]["kind"] == "perturbation":
                perturbed.setdefault(entry["row"]["perturbation"], []).append(
                    (float(entry["row"]["severity"]), open_image_store(path), entry["models"]))
        for name, members in sorted(perturbed.items()):
            members.sort(key=lambda member: harshness(name, member[0]))  # mildest first
            found[f"perturbation_strip_{dataset}_{name}"] = (
                perturbation_strip(clean, members, name, clean_models, predictions,
                                   min(n_examples, 2)),
                f"{dataset}: {name} at every severity, with each model's prediction.")
    return found


# ---------------------------------------------------------------------------
# the mammography study: microcalcification visibility under low-pass filtering

def _read_lesion_tables(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A lesion visibility run's visibility and sensitivity tables, checked to be as whole as
    `lesion_visibility_run` writes them: every lesion type at every level, and every model's
    sensitivity in each group at those levels, each once; a lost row would otherwise drop a
    point from the curves."""
    paths = {name: folder / lesion_visibility.FILES[name]
             for name in ("visibility", "sensitivity")}
    visibility = read_result_table(
        paths["visibility"], "lesion visibility table",
        ("level", "radius", "lesion_type", "n_lesions", "n_images", "cnr_mean", "cnr_median",
         "detectable", "detectable_low", "detectable_high"),
        numbers=("radius", "cnr_mean", "cnr_median"),   # CNR is undefined on a flat ring
        finite=("n_lesions", "n_images", "detectable", "detectable_low", "detectable_high"))
    intervals = ("sensitivity", "sensitivity_low", "sensitivity_high")
    sensitivity = read_result_table(
        paths["sensitivity"], "lesion sensitivity table",
        ("model", "level", "radius", "group", "n_positives", *intervals),
        numbers=("radius", *intervals), finite=("n_positives",))
    levels = set(visibility["level"])
    groups = set(lesion_visibility.GROUPS.values())
    for path, table, keys in (
            (paths["visibility"], visibility, {"lesion_type": set(visibility["lesion_type"])}),
            (paths["sensitivity"], sensitivity, {"model": set(sensitivity["model"]),
                                                 "group": groups})):
        rows = list(table[["level", *keys]].itertuples(index=False, name=None))
        if len(rows) != len(set(rows)) or set(rows) != set(product(levels, *keys.values())):
            raise InputError(f"{path}: its rows are not one per {', '.join(['level', *keys])}"
                             f" ({len(levels)} levels in {paths['visibility']}), each once; "
                             f"{RERUN}")
    # a sensitivity is undefined only without a positive image to count
    undefined = np.flatnonzero(sensitivity["sensitivity"].isna()
                               & (sensitivity["n_positives"] > 0))
    if len(undefined):
        raise InputError(f"{paths['sensitivity']}: line {undefined[0] + 2}: sensitivity is "
                         f"empty though n_positives is not 0; {RERUN}")
    return visibility, sensitivity


def _read_lesion_crops(path: Path) -> dict[str, np.ndarray]:
    """crops.npz as `lesion_visibility_run` writes it (np.load raises zipfile's errors on a
    file cut short), with the radii and image shape the figure needs."""
    try:
        with np.load(path) as archive:
            crops = dict(archive)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise InputError(f"{path}: unreadable lesion crops ({error}); {RERUN}") from error
    missing = [key for key in ("radii", "image_shape") if key not in crops]
    if missing:
        raise InputError(f"{path}: the lesion crops lack {', '.join(missing)}; {RERUN}")
    return crops


def lesion_crops_figure(crops: Mapping[str, np.ndarray], title: str) -> bytes:
    """One calcification cluster and one mass, cropped, at every level, above the spectrum
    mask of each level (centred: zero frequency in the middle)."""
    radii = crops["radii"]
    height, width = (int(side) for side in crops["image_shape"])
    titles = ["clean" if not np.isfinite(r) else f"radius {r:g}" for r in radii]
    rows, labels = [], []
    for lesion_type in lesion_visibility.GROUPS:
        if lesion_type in crops:
            rows.append([(crop[None], heading, "") for crop, heading in
                         zip(crops[lesion_type], titles)])
            labels.append(f"{lesion_type}\n{crops[f'{lesion_type}_sample']}")
    masks = [np.ones((height, width)) if not np.isfinite(r)
             else np.fft.fftshift(gaussian_lowpass_mask(height, width, float(r))) for r in radii]
    rows.append([(mask[None], heading, "kept: white") for mask, heading in zip(masks, titles)])
    labels.append("spectrum mask")
    return figures.png(figures.image_panel_grid(rows, labels, title))


def lesion_visibility_views(folders: Sequence[str | os.PathLike], k: float, confidence: float,
                            ) -> tuple[list[dict[str, Any]], dict[str, tuple[bytes, str]]]:
    """Per dataset: its visibility and sensitivity rows for the page, and its two figures
    (`confidence`: the level of their intervals, for the caption)."""
    views, found = [], {}
    for folder in map(Path, folders):
        dataset = folder.name
        visibility, sensitivity = _read_lesion_tables(folder)
        found[f"lesion_visibility_{dataset}"] = (
            figures.png(figures.lesion_visibility_curves(visibility, sensitivity)),
            f"{dataset}: lesions still detectable (peak above the surrounding ring's mean by "
            f"k = {k:g} standard deviations) and their median contrast-to-noise ratio against "
            "the low-pass radius, beside each model's sensitivity on malignant images with "
            f"calcifications only and with a mass only; "
            f"{figures.bands_caption([confidence])} (sensitivity: exact; visibility: exact at "
            "the effective size of lesions clustered in images, Korn and Graubard).")
        crops = _read_lesion_crops(folder / lesion_visibility.FILES["crops"])
        found[f"lesion_crops_{dataset}"] = (
            lesion_crops_figure(crops, f"{dataset}: lesions under low-pass filtering"),
            f"{dataset}: a calcification cluster and a mass from the test images, cropped, "
            "at every low-pass radius, with the Gaussian spectrum mask of each radius.")
        views.append({"dataset": dataset,
                      "visibility": [_plain(row) for _, row in visibility.iterrows()],
                      "sensitivity": [_plain(row) for _, row in sensitivity.iterrows()]})
    return views, found


# ---------------------------------------------------------------------------
# training and data

def read_histories(models: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Each model's saved config and history, by name; the history with the epochs and the
    epoch kept that the training curves draw."""
    found = {}
    for name, folder in models.items():
        folder = Path(folder)
        found[name] = {"config": read_result_record(folder / CONFIG_FILE, "model config"),
                       "history": read_history(folder)}
    return found


def read_cross_validation(path: str | os.PathLike) -> dict[str, Any]:
    """A slide model's cross-validation summary (`evaluate.cross_validation.evaluate_folds`)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: unreadable cross-validation summary ({error})") from error


def describe_defense(defense: Mapping[str, Any]) -> str:
    """"denoising (lambda_n 1, ...)" or "none"."""
    settings = ", ".join(f"{key} {value}" for key, value in defense.items() if key != "name")
    name = defense.get("name", "none")
    return f"{name} ({settings})" if settings else name


def recipe_rows(models: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name, model in models.items():
        history, config = model["history"], model["config"]
        recipe = dict(history.get("recipe") or {})
        defense = describe_defense(
            recipe.pop("defense", None) or config.get("defense") or {"name": "none"})
        if recipe.get("mhim"):  # named as "At a glance" names it; its settings are in the recipe
            defense = "MHIM-MIL" if defense == "none" else f"{defense} + MHIM-MIL"
        rows.append({"model": name, "family": config.get("family"), "arch": config.get("arch"),
                     "dataset": config.get("dataset"), "seed": config.get("seed"),
                     "defense": defense,
                     "recipe": recipe, "epochs_run": len(history.get("epochs", [])),
                     "best_epoch": history.get("best_epoch"),
                     "selected_by": history.get("selected_by"),
                     # validation never beat the first epoch: the model may not have learnt
                     "kept_first": len(history.get("epochs", [])) > 1
                     and history.get("best_epoch") == history["epochs"][0]["epoch"],
                     "device": history.get("device", "not recorded")})
    return rows


def dataset_rows(folders: Sequence[str | os.PathLike],
                 evaluations: Sequence[Mapping[str, Any]],
                 slides: Mapping[str, Sequence[tuple[dict[str, Any], str]]] | None = None
                 ) -> list[dict[str, Any]]:
    """Class counts per split of the samples kept, and the inputs preprocessing left out with
    the reason: from the image store's `rejected` attr, or for slides from each tile store's
    (`slides`: each slide dataset's (tile store attrs, QC picture) pairs, `read_slide_tiles`)."""
    clean_stores = {r["dataset"]: r["store"] for r in evaluations
                    if r["family"] == "image" and r["condition"] == "clean"}
    left_out_slides = {dataset: [record for attrs, _ in pairs
                                 for record in attrs.get("rejected", [])]
                       for dataset, pairs in (slides or {}).items()}
    rows = []
    for folder in folders:
        folder = Path(folder)
        manifest = read_manifest(folder / MANIFEST_NAME)
        left_out = list(left_out_slides.get(folder.name, []))
        if folder.name in clean_stores:
            left_out = list(open_image_store(clean_stores[folder.name]).attrs.get("rejected", []))
        # the counts of what training and evaluation saw, not of the manifest
        kept = manifest.table[~manifest.table["sample_id"].isin(
            {str(record["sample_id"]) for record in left_out})]
        counts = class_counts(kept["label"], kept["split"])
        test = kept[kept["split"] == "test"]
        group_of = manifest.groups   # None: no group column, each sample its own
        groups = len(test) if group_of is None else cluster_numbers(
            np.array([group_of[sample] for sample in test["sample_id"]], dtype=object),
            len(test))[1]
        rows.append({"dataset": folder.name, "kind": manifest.kind,
                     "splits": list(counts.columns),
                     "counts": [(name, [int(v) for v in values])
                                for name, values in counts.iterrows()],
                     "left_out": left_out,
                     # test samples that share a patient or lesion are not independent
                     "test_samples": len(test), "test_groups": int(groups)})
    return rows


def clustered_test_sets(datasets: Sequence[Mapping[str, Any]],
                        settings: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The datasets (`dataset_rows`) whose test samples come in fewer groups (patients,
    lesions: the manifest's `group` column) than samples, each with `grouped`: whether the
    summary (its `settings`' `grouped_datasets`) counted groups for accuracy, the two-class
    and per-class AUCs, their differences and the paired tests, and `balanced_grouped`:
    whether also for balanced accuracy (`grouped_balanced_accuracy`: no group holds two
    classes). Where it did not, every interval and test treats the samples as independent;
    where it did, the rest still does."""
    grouped = set((settings or {}).get("grouped_datasets", []))
    balanced = set((settings or {}).get("grouped_balanced_accuracy", []))
    return [{**row, "grouped": row["dataset"] in grouped,
             "balanced_grouped": row["dataset"] in balanced}
            for row in datasets if 0 < row["test_groups"] < row["test_samples"]]


def read_slide_tiles(tile_indexes: Sequence[str | os.PathLike]
                     ) -> dict[str, list[tuple[dict[str, Any], str]]]:
    """Each slide dataset's (tile store attrs, QC picture) pairs, from its tile index
    (results/tiles/{dataset}/index.csv, `medrobust.slide_index`); each store opened once."""
    return {Path(index).parent.name: [(open_tile_store(store).attrs, picture) for store, picture
                                      in zip(read_slide_index(index, "tiles"),
                                             read_slide_index(index, "qc"), strict=True)]
            for index in tile_indexes}


def slide_qc_figures(slides: Mapping[str, Sequence[tuple[dict[str, Any], str]]]
                     ) -> dict[str, tuple[bytes, str]]:
    """The tiling jobs' QC pictures, with what each store holds: at most MAX_QC_FIGURES,
    the slides left out first, then the test slides (those the slide sections score),
    then the rest, each group in the index's order."""
    found = {}
    stores = [(dataset, attrs, picture)
              for dataset, tiles in slides.items() for attrs, picture in tiles]
    stores.sort(key=lambda item: 0 if item[1].get("rejected") else 1 if item[1]["split"] == "test"
                else 2)
    for dataset, attrs, picture in stores[:MAX_QC_FIGURES]:
        where = f"{dataset}/{attrs['slide_id']} ({attrs['label']}, {attrs['split']})"
        if attrs.get("rejected"):
            caption = f"{where}: left out, {attrs['rejected'][0]['reason']}"
        else:
            caption = (f"{where}: {attrs['n_tiles']} tiles of {attrs['tile_size']} px at "
                       f"{attrs['target_mpp']:g} µm/px; green: tissue outline, blue: tiles kept "
                       f"(tissue fraction ≥ {attrs['tissue_threshold']:g}).")
        found[f"slide_qc_{dataset}_{attrs['slide_id']}"] = (
            read_result_png(picture, "QC picture"), caption)
    return found


SLIDE_COMPARISON_COLUMNS = ("comparison", "dataset", "reference_model", "model", "condition",
                            *CONDITION_COLUMNS, *PAIRED_COLUMNS)
AGAINST_BASE = "against its base model"
TOP_K_AGAINST_RANDOM = "k most-attended tiles removed against k random ones"


def slide_comparison_frame(against_base: Sequence[Mapping[str, Any]],
                           top_k_against_random: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The slide study's paired comparisons in one table (slide_comparisons.csv,
    docs/report.md): each MHIM-MIL model against its base under each slide-robustness
    condition (its label and its exact CONDITION_COLUMNS), and per model and k the removal
    of its k most-attended tiles against the removal of k random ones (kind
    `top_k_removal`; reference_model is the model itself)."""
    rows = [{**row, "comparison": AGAINST_BASE, "condition": row["label"]}
            for row in against_base]
    rows += [{**row, "comparison": TOP_K_AGAINST_RANDOM, "reference_model": row["model"],
              "condition": f"k = {row['k']}", "kind": "top_k_removal"}
             for row in top_k_against_random]
    frame = pd.DataFrame(rows, columns=list(SLIDE_COMPARISON_COLUMNS))
    return frame.astype({"k": "Int64"})  # whole numbers, empty where a condition has none


# ---------------------------------------------------------------------------

def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def write_report(summary_json: str | os.PathLike, out_html: str | os.PathLike,
                 figures_dir: str | os.PathLike, tables_csv: str | os.PathLike,
                 evaluations: Sequence[Mapping[str, Any]],
                 models: Mapping[str, str], datasets: Sequence[str | os.PathLike],
                 settings: Mapping[str, Any], config: Mapping[str, Any],
                 repository: str | os.PathLike, tile_indexes: Sequence[str | os.PathLike] = (),
                 heatmaps: Mapping[str, str | os.PathLike] | None = None,
                 lesion_folders: Sequence[str | os.PathLike] = (),
                 slide_robustness_folders: Sequence[str | os.PathLike] = (),
                 attention_runs: Sequence[str | os.PathLike] = (),
                 cv_results: Sequence[str | os.PathLike] = (),
                 slide_comparisons_csv: str | os.PathLike | None = None) -> None:
    """Render the page and write it with its figures and the study tables as CSV; nothing is
    written on error. `tile_indexes`: each slide dataset's tile index, which lists its
    slides' tiling outputs; `heatmaps`: each model's Fourier heat-map table, by model;
    `slide_robustness_folders`: each slide model's robustness run; `attention_runs`: the
    slide_attention jobs' folders; `cv_results`: the slide models' cross-validation
    summaries (`evaluate.cross_validation`); `slide_comparisons_csv`, if given, gets
    `slide_comparison_frame` (a header alone without slide comparisons)."""
    summary = load_summary(summary_json)
    robustness, comparisons = summary["robustness"], summary["comparisons"]
    defenses = defense_labels(config)
    baselines = mil_baselines(config)
    trained = read_histories(models)
    figure_files: dict[str, tuple[bytes, str]] = {}
    confidence = summary["settings"]["confidence"]
    bands = figures.bands_caption([confidence])
    images = robustness[robustness["family"] == "image"]
    if (images["kind"] == "attack").any():
        figure_files["accuracy_vs_epsilon"] = (
            figures.png(figures.attack_curves(images)),
            f"Accuracy against ε per attack, and the worst case over attacks; {bands}; "
            "ε = 0 is the clean accuracy.")
    if (images["kind"] == "perturbation").any():
        figure_files["accuracy_vs_severity"] = (
            figures.png(figures.perturbation_curves(images)), "Accuracy, AUC and sensitivity "
            "at the clean operating point against severity per perturbation, in its own units; "
            "the clean test set is at severity 0, or, for a perturbation that weakens as its "
            "severity grows (a low-pass radius, a JPEG quality), at the right end, marked "
            f"\"clean\"; {bands}.")
    if heatmaps:
        figure_files["fourier_heatmap"] = (
            figures.png(figures.fourier_heatmaps({model: read_heatmap(path)
                                                  for model, path in heatmaps.items()})),
            "Fourier heat maps (Yin et al. 2019): each model's error rate on the test images "
            "with Fourier-basis noise of L2 norm v added at frequency (i, j), the zero "
            "frequency in the centre; mirrored cells are the same basis image.")
    for family in ("image", "slide"):
        histories = {name: model["history"] for name, model in trained.items()
                     if model["config"].get("family") == family}
        if histories:
            figure_files[f"training_curves_{family}"] = (
                figures.png(figures.training_curves(histories)),
                f"Training of the {family} classifiers; a star marks the epoch kept"
                + (" (slide models: the best validation AUC)." if family == "slide" else "."))
    figure_files.update(image_figures(robustness, evaluations, int(settings["n_examples"])))
    slides = read_slide_tiles(tile_indexes)
    figure_files.update(slide_qc_figures(slides))
    lesions_k = lesion_visibility.LesionVisibilityConfig.from_mapping(
        config.get("lesion_visibility", {})).k
    lesions, lesion_figures = lesion_visibility_views(lesion_folders, lesions_k, confidence)
    figure_files.update(lesion_figures)
    slide_robustness, slide_robustness_figures = slide_robustness_view(
        slide_robustness_folders, baselines, summary["settings"])
    attention_figures, attention = attention_section(attention_runs)
    slide_comparisons = slide_comparison_frame(
        slide_robustness["comparisons"] if slide_robustness else [],
        attention["top_k_against_random"] if attention else [])
    if slide_robustness:
        slide_robustness["comparisons"] = [comparison_row(row, row["label"])
                                           for row in slide_robustness["comparisons"]]
    figure_files.update(slide_robustness_figures)
    figure_files.update(attention_figures)
    if attention:
        attention["top_k_against_random"] = [
            comparison_row(row, f"{row['model']}, k = {row['k']}")
            for row in attention["top_k_against_random"]]

    glance_headers, glance = glance_rows(robustness, defenses)
    warnings = small_test_sets(robustness, int(settings["small_test_set"]),
                               summary["settings"]["alpha"])
    # a pixel denoiser is not part of the classifier's training, so not in its config.json
    denoisers = {name: model.get("denoiser")
                 for name, model in config.get("image_classifiers", {}).items()}
    tables = defense_tables(images, {name: {**model["config"], "denoiser": denoisers.get(name)}
                                     for name, model in trained.items()})
    labels = {(row["model"], row["condition"]): condition_label(row)
              for _, row in robustness.iterrows()}
    data_rows = dataset_rows(datasets, evaluations, slides)
    context = {
        "version": __version__,
        "datasets": data_rows,
        "clustered": clustered_test_sets(data_rows, summary["settings"]),
        "settings": summary["settings"],
        "warnings": warnings,
        "stand_ins": stand_in_notes(config),
        "glance_headers": glance_headers, "glance": glance,
        # MHIM-MIL against its base model goes with the slide study, not the defenses
        "verdicts": [pair for pair in verdicts(comparisons) if pair["model"] not in baselines],
        "mil_verdicts": [{**pair, "headline": mil_headline(pair)}
                         for pair in verdicts(comparisons) if pair["model"] in baselines],
        "one_class": one_class_models(summary["confusion_matrices"]),
        "defense_tables": [defense_table_view(table, warnings) for table in tables],
        "perturbation_table": study_table(images, ["perturbation", "mean_perturbation"]),
        "has_attacks": bool((images["kind"] == "attack").any()),
        "slide_models": sorted(robustness.loc[robustness["family"] == "slide", "model"].unique()),
        "attack_norms": sorted(set(images.loc[images["kind"] == "attack", "norm"].dropna())),
        "has_perturbations": bool((images["kind"] == "perturbation").any()) or bool(heatmaps),
        "severity_units": {name: figures.severity_unit(name)
                           for name in sorted(images.loc[images["kind"] == "perturbation",
                                                         "perturbation"].unique())},
        "lesions": lesions, "lesions_k": lesions_k,
        "slide_robustness": slide_robustness,
        "small_test_set": int(settings["small_test_set"]),
        "comparisons": [comparison_row(row) for _, row in comparisons.iterrows()],
        "masking": [{**_plain(row), "label": budget_label(row)}
                    for _, row in summary["gradient_masking"].iterrows()],
        "slides": metric_rows(robustness[robustness["family"] == "slide"]),
        "cross_validation": [read_cross_validation(path) for path in cv_results],
        "metrics": metric_rows(robustness),
        "per_class": per_class_rows(summary["per_class"], robustness),
        "confusion_matrices": [{**item, "label": labels.get((item["model"], item["condition"]),
                                                          item["condition"])}
                               for item in summary["confusion_matrices"]],
        "positive_classes": {row["dataset"]: row["positive_class"]
                             for _, row in robustness.iterrows()
                             if isinstance(row.get("positive_class"), str)},
        "figures": {name: {"src": _data_uri(png), "caption": caption}
                    for name, (png, caption) in figure_files.items()},
        "recipes": recipe_rows(trained),
        "attention": attention,
        "slide_qc": {"total": sum(map(len, slides.values())),
                     "shown": sum(name.startswith("slide_qc_") for name in figure_files)},
        "provenance": provenance(repository, datasets, config,
                                 {name: model["history"].get("device", "not recorded")
                                  for name, model in trained.items()}),
        "config_yaml": yaml.safe_dump(applicable_config(config), sort_keys=False,
                                      default_flow_style=None, width=100),
    }
    page = _environment().get_template("report.html.j2").render(**context)
    with atomic_path(figures_dir) as tmp:
        tmp.mkdir()
        for name, (png, _) in figure_files.items():
            (tmp / f"{name}.png").write_bytes(png)
    write_defense_tables(tables, tables_csv)
    if slide_comparisons_csv is not None:
        with atomic_path(slide_comparisons_csv) as tmp:
            rounded(slide_comparisons).to_csv(tmp, index=False)
    with atomic_path(out_html) as tmp:
        tmp.write_text(page, encoding="utf-8")
    log.info("report: %d figures, %d summary rows, %d comparisons", len(figure_files),
             len(robustness), len(comparisons))
