"""Gather every metrics JSON into one tidy table: one row per (model, condition).

The evaluators' JSON keys (`evaluate.metrics.METRIC_KEYS`) are the columns;
`family` (`image` or `slide`) tells the report which table a row belongs in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import pandas as pd

from medrobust.errors import InputError
from medrobust.evaluate.metrics import METRIC_KEYS
from medrobust.io.atomic import atomic_path, write_json

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
    table = pd.DataFrame(list(records), columns=list(METRIC_KEYS))
    order = table.assign(_kind=table["kind"].map(_KIND_ORDER))
    order = order.sort_values(["family", "dataset", "model", "_kind", "attack", "epsilon",
                               "source_model", "perturbation", "severity"],
                              na_position="first", kind="stable")
    return table.loc[order.index].reset_index(drop=True)


def summarize_metrics(metric_json_paths: Iterable[str | os.PathLike], out_csv: str | os.PathLike,
                      out_json: str | os.PathLike) -> pd.DataFrame:
    """Write all metrics rows as CSV and as a JSON list of records; return the table."""
    table = metrics_table(map(read_metrics, metric_json_paths))
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    # missing values (no attack on a clean row, undefined AUC) become null
    records = table.astype(object).where(table.notna(), None).to_dict(orient="records")
    write_json(out_json, records)
    return table
