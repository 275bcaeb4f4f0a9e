"""The denoising-CNN study's tables as Xue et al. (MICCAI 2019) print them.

One table per (dataset, target architecture, attack source): a black-box
table per transfer source (attacks crafted on that model, fed to every
target) and a white-box table (each target attacked with its own gradients),
so the paper's Tables 1-4 each come out of the config that ran them.

- A row is a target model, labelled by the defense setting its config.json
  records: "none", or "λn 1, λa 10" (with the distance and a pixel denoiser
  when the config has them).
- The columns are clean, every attack that ran at every budget (attacks in
  the registry's order, as the paper: FGSM, I-FGSM, PGD, ..., C&W), then the
  worst case at each budget; nothing is hard-coded, a column exists because
  the summary has its rows.
- A cell is a row of the summary (robustness.json): accuracy with its 95%
  interval, and the AUC.

`defense_tables` builds the tables; the page renders them and
`write_defense_tables` writes them, one line per cell, as
defense_tables.csv (columns: docs/report.md).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import pandas as pd

from medrobust.attacks import ATTACKS
from medrobust.io.atomic import atomic_path
from medrobust.report.summary import rounded

# what distinguishes one target from another in the paper's rows, in label order;
# the denoiser (MagNet's Reformer, HGD) first, as the paper's "R+Ln+La"
SETTING_KEYS = ("denoiser", "lambda_n", "lambda_a", "distance")
_SETTING_NAMES = {"denoiser": "denoiser", "lambda_n": "λn", "lambda_a": "λa",
                  "distance": "distance"}
# a cell's own columns, as the summary row it shows has them
CELL_COLUMNS = ("condition", "kind", "attack", "norm", "epsilon", "n", "accuracy",
                "accuracy_low", "accuracy_high", "auc", "auc_low", "auc_high")
DEFENSE_TABLE_COLUMNS = ("dataset", "arch", "threat_model", "source_model", "source_arch",
                         "model", "defense", *SETTING_KEYS, "setting", "column", *CELL_COLUMNS)
_KIND_ORDER = {"clean": 0, "attack": 1, "worst_case": 2}
_NORM_ORDER = {"linf": 0, "l2": 1}  # the paper's L∞ attacks before C&W's L2
_ATTACK_ORDER = {name: index for index, name in enumerate(ATTACKS)}


def epsilon_label(norm: str | None, epsilon: float) -> str:
    """A budget in its attack's units: "ε=8/255" (L∞) or "ε=0.5" (L2, image units)."""
    return f"ε={epsilon:g}" if norm == "l2" else f"ε={epsilon:g}/255"


def budget_label(row: Mapping[str, Any]) -> str:
    """An attack budget with its norm: "L∞ ε=8/255" or "L2 ε=0.5"."""
    norm = row.get("norm")
    return f"{'L2' if norm == 'l2' else 'L∞'} {epsilon_label(norm, row['epsilon'])}"


def defense_setting(config: Mapping[str, Any]) -> dict[str, Any]:
    """A model's defense name and the settings its rows are told apart by, from config.json.

    λn, λa and the distance sit in the `defense` section; a pixel denoiser in
    front of the classifier is not part of its training, so the report adds it
    (`denoiser`) from the run's config. Settings a config lacks are None.
    """
    defense = config.get("defense") or {}
    return {"defense": defense.get("name", "none"), "denoiser": config.get("denoiser"),
            **{key: defense.get(key) for key in ("lambda_n", "lambda_a", "distance")}}


def _setting_text(value: Any) -> str:
    # 1.0 -> "1", 0.1 -> "0.1": the config's numbers as a reader wrote them
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def setting_label(setting: Mapping[str, Any]) -> str:
    """"λn 1, λa 10" as the paper labels a row; the defense's name when it has no settings."""
    parts = [f"{_SETTING_NAMES[key]} {_setting_text(setting[key])}" for key in SETTING_KEYS
             if setting[key] is not None]
    return ", ".join(parts) or setting["defense"]


@dataclasses.dataclass(frozen=True)
class TableRow:
    model: str
    setting: dict[str, Any]
    cells: list[dict[str, Any] | None]  # summary rows, one per column; None where not run

    @property
    def label(self) -> str:
        return setting_label(self.setting)


@dataclasses.dataclass(frozen=True)
class DefenseTable:
    dataset: str
    arch: str
    threat_model: str           # "transfer" or "white-box"
    source_model: str | None    # the model the attacks were crafted on (transfer only)
    source_arch: str | None
    columns: list[str]          # headers: "clean", "FGSM (L∞) ε=8/255", "worst case ..."
    rows: list[TableRow]

    @property
    def title(self) -> str:
        if self.threat_model == "white-box":
            return (f"{self.dataset}, {self.arch} targets: white-box, each attacked with "
                    "its own gradients")
        return (f"{self.dataset}, {self.arch} targets: black-box, attacks transferred from "
                f"{self.source_model} ({self.source_arch})")


def _column_key(row: Mapping[str, Any]) -> tuple:
    """Sort key and identity of a summary row's column: clean, attacks, worst cases."""
    if row["kind"] == "clean":
        return (0,)
    attack = _ATTACK_ORDER[row["attack"]] if row["kind"] == "attack" else -1
    return (_KIND_ORDER[row["kind"]], attack, _NORM_ORDER[row["norm"]], float(row["epsilon"]))


def _column_label(row: Mapping[str, Any], source_model: str | None) -> str:
    if row["kind"] == "clean":
        return "clean"
    if row["kind"] == "attack":
        return f"{ATTACKS[row['attack']].title} {epsilon_label(row['norm'], row['epsilon'])}"
    label = f"worst case {budget_label(row)}"
    sources = row["source_model"].split("+")
    # the summary's transfer worst case spans every source: say so where that is more than one
    if source_model is not None and sources != [source_model]:
        label += f" over transfers from {', '.join(sources)}"
    return label


def _in_table(row: Mapping[str, Any], threat_model: str, source_model: str | None) -> bool:
    """Whether a target's summary row belongs in the table of this threat model and source."""
    if row["kind"] == "clean":
        return True
    if row["kind"] not in ("attack", "worst_case") or row["threat_model"] != threat_model:
        return False
    return source_model is None or source_model in row["source_model"].split("+")


def _table(rows: pd.DataFrame, targets: Sequence[str], configs: Mapping[str, Mapping[str, Any]],
           threat_model: str, source_model: str | None) -> DefenseTable:
    """One table: the given targets' summary rows under one threat model and source."""
    chosen = [row for row in rows.to_dict(orient="records")
              if _in_table(row, threat_model, source_model)]
    columns = {}  # header by column key, in column order
    for row in sorted(chosen, key=_column_key):
        columns.setdefault(_column_key(row), _column_label(row, source_model))
    table_rows = []
    for model in targets:
        own = [row for row in chosen if row["model"] == model]
        if all(row["kind"] == "clean" for row in own):
            continue  # not attacked under this threat model and source
        by_column = {_column_key(row): row for row in own}
        table_rows.append(TableRow(model, defense_setting(configs[model]),
                                   [by_column.get(key) for key in columns]))
    config = configs[targets[0]]
    return DefenseTable(config["dataset"], config["arch"], threat_model, source_model,
                        configs[source_model]["arch"] if source_model else None,
                        list(columns.values()), table_rows)


def defense_tables(robustness: pd.DataFrame,
                   configs: Mapping[str, Mapping[str, Any]]) -> list[DefenseTable]:
    """Every (dataset, target architecture, attack source) table, black-box before white-box.

    `configs` maps each trained model to its config.json, in the config's
    order, which is the order of the rows and of the transfer sources.
    """
    attacked = set(robustness.loc[robustness["kind"] == "attack", "model"])
    targets_by_arch: dict[tuple[str, str], list[str]] = {}
    for model in configs:
        if model in attacked:
            key = (configs[model]["dataset"], configs[model]["arch"])
            targets_by_arch.setdefault(key, []).append(model)
    tables = []
    for targets in targets_by_arch.values():
        rows = robustness[robustness["model"].isin(targets)]
        threats = rows[rows["kind"] == "attack"]
        used = set(threats.loc[threats["threat_model"] == "transfer", "source_model"])
        tables += [_table(rows, targets, configs, "transfer", source)
                   for source in configs if source in used]
        if (threats["threat_model"] == "white-box").any():
            tables.append(_table(rows, targets, configs, "white-box", None))
    return tables


def defense_table_frame(tables: Sequence[DefenseTable]) -> pd.DataFrame:
    """The tables as one line per cell, in page order (defense_tables.csv)."""
    lines = []
    for table in tables:
        for row in table.rows:
            for column, cell in zip(table.columns, row.cells):
                if cell is None:
                    continue
                lines.append({
                    "dataset": table.dataset, "arch": table.arch,
                    "threat_model": table.threat_model, "source_model": table.source_model,
                    "source_arch": table.source_arch, "model": row.model, **row.setting,
                    "setting": row.label, "column": column,
                    **{key: cell[key] for key in CELL_COLUMNS}})
    return pd.DataFrame(lines, columns=list(DEFENSE_TABLE_COLUMNS))


def write_defense_tables(tables: Sequence[DefenseTable], path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        rounded(defense_table_frame(tables)).to_csv(tmp, index=False)


__all__ = ["DEFENSE_TABLE_COLUMNS", "DefenseTable", "TableRow", "budget_label",
           "defense_setting", "defense_table_frame", "defense_tables", "epsilon_label",
           "setting_label", "write_defense_tables"]
