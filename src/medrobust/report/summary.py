"""Gather every metrics JSON into one tidy table: one row per (model, condition).

The evaluators' JSON keys (`evaluate.image_classifier.METRIC_KEYS`, shared by
the slide evaluator) are the columns, plus `family` (`image` or `slide`). The
metrics JSON does not say which family its model is, so the caller names the
slide classifiers (the workflow knows them from `slide_classifiers` in config).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import pandas as pd

from medrobust.errors import InputError
from medrobust.evaluate.image_classifier import METRIC_KEYS
from medrobust.io.atomic import atomic_path, write_json

COLUMNS = ("family", *METRIC_KEYS)
_KIND_ORDER = {"clean": 0, "attack": 1, "perturbation": 2}


def read_metrics(path: str | os.PathLike) -> dict:
    """One metrics record, checked for the evaluators' keys."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: unreadable metrics JSON ({error})") from error
    if not isinstance(record, dict):
        raise InputError(f"{path}: a metrics JSON must hold one object")
    missing = [key for key in METRIC_KEYS if key not in record]
    if missing:
        raise InputError(f"{path}: metrics JSON lacks {', '.join(missing)}")
    return {key: record[key] for key in METRIC_KEYS}


def metrics_table(records: Iterable[dict]) -> pd.DataFrame:
    """The records as a table in a stable order: model, then clean, attacks, perturbations."""
    table = pd.DataFrame(list(records), columns=list(COLUMNS))
    order = table.assign(_kind=table["kind"].map(_KIND_ORDER))
    order = order.sort_values(["family", "dataset", "model", "_kind", "attack", "epsilon",
                               "source_model", "perturbation", "severity"],
                              na_position="first", kind="stable")
    return table.loc[order.index].reset_index(drop=True)


def summarize_metrics(metric_json_paths: Iterable[str | os.PathLike], out_csv: str | os.PathLike,
                      out_json: str | os.PathLike, slide_models: Iterable[str] = ()) -> pd.DataFrame:
    """Write all metrics rows as CSV and as a JSON list of records; return the table.

    Rows of the models in `slide_models` get family `slide`, all others `image`.
    """
    slide_models = set(slide_models)
    table = metrics_table(
        {"family": "slide" if record["model"] in slide_models else "image", **record}
        for record in map(read_metrics, metric_json_paths))
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    # missing values (no attack on a clean row, undefined AUC) become null
    records = table.astype(object).where(table.notna(), None).to_dict(orient="records")
    write_json(out_json, records)
    return table
