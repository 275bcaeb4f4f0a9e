"""The raw-dataset contract: `manifest.csv` plus `dataset.json` in one folder.

`manifest.csv` lists one sample per row (`MANIFEST_COLUMNS`, `path` relative
to the folder, optionally `GROUP_COLUMN`); `dataset.json` holds the class
names (their order fixes the integer labels downstream) and the dataset kind.
`dataset.json` is written last, so a folder that has it is complete.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from medrobust.errors import ConfigError, InputError
from medrobust.io.atomic import atomic_path, write_json

MANIFEST_COLUMNS = ("sample_id", "path", "label", "split", "sha256")
# optional: samples that are not independent (ISIC 2018: the lesion id); splits keep a
# group whole, and a later stage can resample or cluster by it
GROUP_COLUMN = "group"
SPLITS = ("train", "val", "test")
KINDS = ("images", "slides")
MANIFEST_NAME = "manifest.csv"
DATASET_NAME = "dataset.json"


@dataclass(frozen=True)
class Manifest:
    """A validated manifest; `table` holds every column of the CSV as strings."""

    path: Path
    table: pd.DataFrame
    classes: list[str]
    kind: str

    @property
    def root(self) -> Path:
        """The dataset folder that the `path` column is relative to."""
        return self.path.parent

    def label_index(self, label: str) -> int:
        try:
            return self.classes.index(label)
        except ValueError:
            raise InputError(f"{self.root / DATASET_NAME}: no class {label!r}; "
                             f"classes are {self.classes}") from None

    @property
    def labels(self) -> np.ndarray:
        """Integer labels (index into `classes`), one per row."""
        return np.array([self.classes.index(label) for label in self.table["label"]],
                        dtype=np.int64)

    @property
    def groups(self) -> dict[str, str | None] | None:
        """Each sample's group (`GROUP_COLUMN`: its patient or lesion; None for an empty
        cell, a group of its own), or None where the manifest has no such column."""
        if GROUP_COLUMN not in self.table.columns:
            return None
        return {sample: group or None for sample, group
                in zip(self.table["sample_id"], self.table[GROUP_COLUMN])}

    def absolute_path(self, row: Mapping[str, Any]) -> Path:
        """The file of one table row (a row Series or a mapping with `path`)."""
        return self.root / row["path"]


def begin_dataset(out_dir: str | os.PathLike) -> Path:
    """Create `out_dir` and drop an old `dataset.json` before raw files are rewritten.

    An interrupted rewrite then never looks like a complete dataset.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DATASET_NAME).unlink(missing_ok=True)
    return out_dir


def write_dataset(out_dir: str | os.PathLike, rows: Iterable[Mapping[str, Any]],
                  classes: Sequence[str], kind: str, extra_columns: Sequence[str] = ()
                  ) -> Path:
    """Write `manifest.csv`, then `dataset.json`; return the manifest path.

    Each row maps every name in `MANIFEST_COLUMNS` to its value, and may map
    the `extra_columns` (such as `GROUP_COLUMN`), which follow them.
    """
    if kind not in KINDS:
        raise ValueError(f"dataset kind must be one of {KINDS}, not {kind!r}")
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST_NAME
    with atomic_path(manifest_path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*MANIFEST_COLUMNS, *extra_columns],
                                extrasaction="raise")
        writer.writeheader()
        for row in rows:
            missing = [column for column in MANIFEST_COLUMNS if column not in row]
            if missing:
                raise ValueError(f"{manifest_path}: row {dict(row)} lacks {', '.join(missing)}")
            writer.writerow(row)
    write_json(out_dir / DATASET_NAME, {"classes": list(classes), "kind": kind})
    return manifest_path


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read `manifest.csv` and its `dataset.json`; raise InputError on any problem."""
    path = Path(path)
    classes, kind = _read_dataset_json(path.parent / DATASET_NAME)
    try:
        # all strings, and empty cells stay "" so that they can be reported
        # index_col False: a row with a cell too many is an error, not read shifted
        table = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError,
            pd.errors.EmptyDataError) as error:
        raise InputError(f"{path}: not a readable CSV manifest ({error})") from error
    missing = [column for column in MANIFEST_COLUMNS if column not in table.columns]
    if missing:
        raise InputError(f"{path}: line 1 (header) lacks column(s) {', '.join(missing)}; "
                         f"expected {', '.join(MANIFEST_COLUMNS)}")
    _validate_rows(path, table, classes, kind)
    return Manifest(path=path, table=table, classes=classes, kind=kind)


def _read_dataset_json(path: Path) -> tuple[list[str], str]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable dataset description ({error})") from error
    classes = meta.get("classes") if isinstance(meta, dict) else None
    if (not isinstance(classes, list) or len(classes) < 2
            or not all(isinstance(name, str) and name for name in classes)
            or len(set(classes)) != len(classes)):
        raise InputError(f"{path}: `classes` must list at least two distinct names, "
                         f"not {classes!r}")
    kind = meta.get("kind")
    if kind not in KINDS:
        raise InputError(f"{path}: `kind` must be one of {', '.join(KINDS)}, not {kind!r}")
    return classes, kind


def check_slide_id(sample_id: str, where: str) -> None:
    """InputError at `where` when `sample_id` cannot name a slide: a slide's id is a file name
    (results/tiles/{dataset}/{id}.zarr) and a Snakemake wildcard, so it cannot hold a path
    separator or start with a dot (as `..` and the hidden partial outputs do)."""
    if "/" in sample_id or "\\" in sample_id or sample_id.startswith("."):
        raise InputError(f"{where}: slide id {sample_id!r} cannot name the slide's files (no "
                         "path separator, no leading dot); give the slides ids of their own "
                         "(source.labels.id_column, a column of unique names such as the file "
                         "names) or move them out of subfolders")


def _validate_rows(path: Path, table: pd.DataFrame, classes: list[str], kind: str) -> None:
    first_line: dict[str, int] = {}
    for index, row in enumerate(table.itertuples(index=False)):
        line = index + 2  # line 1 is the header

        def bad(what: str) -> InputError:
            return InputError(f"{path}: line {line} (sample_id {row.sample_id!r}): {what}")

        if not row.sample_id.strip():
            raise bad("empty sample_id")
        if kind == "slides":
            check_slide_id(row.sample_id, f"{path}: line {line}")
        if row.sample_id in first_line:
            raise bad(f"duplicate sample_id {row.sample_id!r} (first on line "
                      f"{first_line[row.sample_id]})")
        first_line[row.sample_id] = line
        if not row.path.strip():
            raise bad("empty path")
        if row.split not in SPLITS:
            raise bad(f"split {row.split!r} is not one of {', '.join(SPLITS)}")
        if row.label not in classes:
            raise bad(f"label {row.label!r} is not a class of {DATASET_NAME} "
                      f"({', '.join(classes)})")


def check_split_fractions(fractions: Mapping[str, Any]) -> dict[str, float]:
    """The split fractions as floats; ConfigError unless they name known splits and sum to 1."""
    if not isinstance(fractions, Mapping) or not fractions:
        raise ConfigError(f"splits must map split names to fractions, not {fractions!r}")
    checked = {}
    for name, value in fractions.items():
        if name not in SPLITS:
            raise ConfigError(f"splits: unknown split {name!r}; known: {', '.join(SPLITS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"splits: fraction of {name!r} must be a number >= 0, not {value!r}")
        checked[name] = float(value)
    if not math.isclose(sum(checked.values()), 1.0, abs_tol=1e-6):
        raise ConfigError(f"splits: fractions must sum to 1, not {sum(checked.values()):g}")
    return checked


def stratified_split(labels: Sequence[Any], fractions: Mapping[str, float], seed: int,
                     groups: Sequence[Hashable | None] | None = None) -> list[str]:
    """Assign each sample a split so that every class is divided by `fractions`.

    Within a class the counts follow the largest-remainder rule (they sum to
    the class size and differ from the exact share by less than one); which
    samples go where is a seeded shuffle, so the result depends only on
    `labels`, `fractions`, `seed` and `groups`.

    `groups` (one key per sample; None: a group of its own) keeps samples that
    are not independent, such as the images of one lesion or patient, in one
    split: the groups of a class are shuffled instead of its samples, laid end
    to end, and each goes to the split that holds its middle sample. A split
    then misses its count by at most half of the group that straddles its
    edge. A group of several labels (a patient with a normal and an abnormal
    image) is divided with the class of its rarest label, so the rare class's
    groups are spread by the fractions first; its other labels' samples follow
    it, and their classes' counts can miss by more. Without groups (or with groups
    of one) this is the plain split, sample for sample.
    """
    fractions = check_split_fractions(fractions)
    names = [name for name in SPLITS if name in fractions]  # fixed order, not dict order
    labels = np.asarray(labels)
    units = _group_members(labels, groups)
    values, counts = np.unique(labels, return_counts=True)
    rarity = {value: (count, index) for index, (value, count) in enumerate(zip(values, counts))}
    stratum = [min((labels[member] for member in unit), key=lambda value: rarity[value])
               for unit in units]
    rng = np.random.default_rng(seed)
    assigned = [""] * len(labels)
    for label in values:
        members = [unit for unit, of in zip(units, stratum) if of == label]
        size = sum(len(unit) for unit in members)
        ends = np.cumsum(_largest_remainder([fractions[name] * size for name in names]))
        start = 0
        for position in rng.permutation(len(members)):
            unit = members[position]
            # the first split that ends past the group's middle (singletons: their own place)
            name = names[int(np.searchsorted(ends, start + len(unit) / 2, side="right"))]
            for member in unit:
                assigned[member] = name
            start += len(unit)
    return assigned


def _group_members(labels: np.ndarray, groups: Sequence[Hashable | None] | None
                   ) -> list[list[int]]:
    """The sample indices of each group, groups in order of their first sample."""
    if groups is None:
        return [[index] for index in range(len(labels))]
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} groups for {len(labels)} labels")
    units: dict[Hashable, list[int]] = {}
    for index, group in enumerate(groups):
        units.setdefault(("alone", index) if group is None else ("group", group),
                         []).append(index)
    return list(units.values())


def _largest_remainder(shares: list[float]) -> list[int]:
    counts = [math.floor(share) for share in shares]
    left = round(sum(shares)) - sum(counts)
    # stable sort: ties go to the earlier split (train before val before test)
    order = sorted(range(len(shares)), key=lambda i: counts[i] - shares[i])
    for i in order[:left]:
        counts[i] += 1
    return counts
