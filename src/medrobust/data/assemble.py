"""Assembling a dataset folder from what a source found: the helpers every source shares.

The `local` and `http` sources and the recipes all end the same way: read a
labels table (CSV or TSV) and map its labels to the dataset's classes, give
samples without a split one from a stratified split, link a folder the user
already has, hash the files and write `manifest.csv` + `dataset.json` and
side tables, and read their own section of the dataset config.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from medrobust.config import config_from_mapping
from medrobust.data.manifest import (
    GROUP_COLUMN,
    KINDS,
    SPLITS,
    check_slide_id,
    check_split_fractions,
    stratified_split,
    write_dataset,
)
from medrobust.errors import ConfigError, InputError, check_choice
from medrobust.io.atomic import atomic_path
from medrobust.io.checksums import sha256_file
from medrobust.logs import get_logger
from medrobust.progress import progress

log = get_logger(__name__)

DEFAULT_SPLITS = {"train": 0.7, "val": 0.1, "test": 0.2}


@dataclass(frozen=True)
class Sample:
    """One row of the manifest to be; `path` is absolute (or relative to the cwd)."""

    sample_id: str
    path: Path
    label: str
    split: str | None = None          # None: assigned by a stratified split later
    sha256: str | None = None         # None: computed when the manifest is written
    group: str | None = None          # samples of one group (lesion) share a split


@dataclass(frozen=True)
class LabelsTable:
    """Where the labels are and how to read them (`labels:` in a source config)."""

    table: str                        # the CSV/TSV, relative to the data folder
    path_column: str = "path"
    label_column: str = "label"
    id_column: str | None = None      # default: the path without its extension
    split_column: str | None = None   # values train/val/test; default: stratified split
    group_column: str | None = None   # patient (lesion) of a sample: one split, counted once
    path_template: str = "{}"         # file of a row, from its path cell: "images/{}.jpg"
    label_map: Mapping[str, str | None] = field(default_factory=dict)  # None drops the row

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "LabelsTable":
        labels = config_from_mapping(cls, mapping, "source.labels")
        if not isinstance(labels.table, str) or not labels.table:
            raise ConfigError(f"source.labels.table must be a table's path, not "
                              f"{labels.table!r}")
        if "{}" not in labels.path_template:
            raise ConfigError(f"source.labels.path_template must contain '{{}}' where the "
                              f"path cell goes, not {labels.path_template!r}")
        if not isinstance(labels.label_map, Mapping):
            raise ConfigError("source.labels.label_map must map table values to class names")
        # YAML reads `0: normal` with an int key; table cells are always strings
        label_map = {str(key): None if value is None else str(value)
                     for key, value in labels.label_map.items()}
        return replace(labels, label_map=label_map)

    def read(self, data_root: Path, classes: Sequence[str]) -> list[Sample]:
        """The table's rows as samples, every file checked to exist. Messages name the files
        where they are (a local source's folder, not its link under resources/)."""
        folder = data_root.resolve()
        table = folder / self.table
        columns = [self.path_column, self.label_column, self.id_column, self.split_column,
                   self.group_column]
        samples, first_line = [], {}
        for line, row in read_table(table, [column for column in columns if column]):
            where = f"{table}: line {line} ({self.path_column} {row[self.path_column]!r})"
            if Path(row[self.path_column]).name in ("", ".."):
                raise InputError(f"{where}: the {self.path_column} cell names no file")
            sample_id = (row[self.id_column] if self.id_column
                         else Path(row[self.path_column]).with_suffix("").as_posix())
            label = map_label(row[self.label_column], self.label_map, classes, where)
            if label is None:
                continue
            # a repeated id would make one sample's label (or split) silently win
            check_unique(sample_id, line, first_line, where)
            # the manifest's paths are relative to the dataset folder, through data_root
            relative = os.path.normpath(self.path_template.format(row[self.path_column]))
            if os.path.isabs(relative):  # a path into the folder, written out in full
                real = os.path.join(os.path.realpath(os.path.dirname(relative)),
                                    os.path.basename(relative))
                if os.path.commonpath([real, folder]) == str(folder):
                    relative = os.path.relpath(real, folder)
            if os.path.isabs(relative) or relative.split(os.sep)[0] == os.pardir:
                raise InputError(f"{where}: {relative} is not inside {folder}; name the files "
                                 f"relative to that folder (source.root), without '..'")
            try:
                found = (folder / relative).is_file()
            except OSError as error:  # a folder on the way that cannot be searched
                raise InputError(f"{where}: cannot reach {folder / relative} "
                                 f"({error.strerror})") from error
            if not found:
                raise InputError(f"{where}: no file {folder / relative}")
            path = data_root / relative
            split = row[self.split_column] if self.split_column else None
            if split is not None and split not in SPLITS:
                raise InputError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
            group = (row[self.group_column] or None) if self.group_column else None
            samples.append(Sample(sample_id, path, label, split, group=group))
        if not samples:
            raise InputError(f"{table}: no rows left after label_map")
        return samples


def source_section(dataset_config: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset's `source` mapping without its `type`."""
    return {key: value for key, value in dataset_config["source"].items() if key != "type"}


def config_classes(dataset_config: Mapping[str, Any]) -> list[str]:
    classes = dataset_config.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or len(set(classes)) != len(classes):
        raise ConfigError(f"this source takes its classes from the dataset's `classes`: list "
                          f"at least two distinct names (got {classes!r})")
    return [str(name) for name in classes]


def config_kind(dataset_config: Mapping[str, Any], default: str = "images") -> str:
    kind = dataset_config.get("kind", default)
    check_choice("dataset kind", kind, KINDS)
    return kind


def recipe_classes(dataset_config: Mapping[str, Any], classes: Sequence[str], recipe: str,
                   kind: str = "images") -> list[str]:
    """The classes a recipe defines; `classes` and `kind` in config must agree with it."""
    given = dataset_config.get("classes")
    if given is not None and list(given) != list(classes):
        raise ConfigError(f"{recipe}: this recipe's classes are {list(classes)} (in that "
                          f"order); drop `classes` from the dataset config or write exactly "
                          f"these, not {given!r}")
    if dataset_config.get("kind", kind) != kind:
        raise ConfigError(f"{recipe}: this recipe's datasets are of kind {kind!r}, not "
                          f"{dataset_config['kind']!r}")
    return list(classes)


def read_table(path: Path, required: Iterable[str] = ()) -> list[tuple[int, dict[str, str]]]:
    """A CSV (or TSV, by suffix) as (line, row) pairs, cells stripped, keyed by header.

    `line` is where the row starts in the file (quoted cells may span lines);
    InputError when a `required` column is missing.
    """
    if not path.is_file():
        raise InputError(f"table {path} does not exist")
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            header = [name.strip() for name in reader.fieldnames or []]
            line = reader.line_num + 1
            for row in reader:
                if None in row:  # DictReader keeps the cells past the header under None
                    raise InputError(f"{path}: line {line} has {len(header) + len(row[None])} "
                                     f"cells, the header {len(header)} (an unquoted "
                                     f"{delimiter!r} in a cell?)")
                rows.append((line, {(key or "").strip(): (value or "").strip()
                                    for key, value in row.items()}))
                line = reader.line_num + 1
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text ({error}); save the table as UTF-8 "
                         "CSV") from error
    except (OSError, csv.Error) as error:
        raise InputError(f"{path}: unreadable table ({error})") from error
    if not header:
        raise InputError(f"{path}: empty table")
    missing = [column for column in required if column not in header]
    if missing:
        # a table separated by something else reads as one column of joined names
        other = [name for name, sign in ((";", ";"), ("tab", "\t"), (",", ","))
                 if sign != delimiter and sign in "".join(header)]
        hint = (f" (it looks separated by {other[0]}: a .csv table is read with commas, "
                f"a .tsv or .tab one with tabs)" if other else "")
        raise InputError(f"{path}: line 1 (header) has no column(s) {', '.join(missing)}; "
                         f"it has: {', '.join(header)}{hint}")
    if not rows:
        raise InputError(f"{path}: the table has a header but no rows")
    return rows


def check_unique(sample_id: str, line: int, first_line: dict[str, int], where: str) -> None:
    """Note `sample_id` as read on `line`; InputError naming both lines when seen before."""
    if sample_id in first_line:
        raise InputError(f"{where}: sample id {sample_id!r} is also on line "
                         f"{first_line[sample_id]}; each sample (slide) needs one row")
    first_line[sample_id] = line


def map_label(value: str, label_map: Mapping[str, str | None], classes: Sequence[str],
              where: str) -> str | None:
    """A table value as a class name (None: the row is dropped); InputError names `where`."""
    label = label_map[value] if value in label_map else value
    if label is not None and label not in classes:
        raise InputError(f"{where}: label {value!r} is not one of the classes "
                         f"({', '.join(classes)}); map it to one with `label_map`"
                         + (f" (it maps to {label!r})" if label != value else ""))
    return label


def assign_splits(samples: list[Sample], fractions: Mapping[str, float],
                  seed: int) -> list[Sample]:
    """Samples without a split get one from a stratified split of their own labels.

    Samples that share a `group` get the same split (`stratified_split`); a
    group must not mix samples with and without a split.
    """
    open_ = [index for index, sample in enumerate(samples) if sample.split is None]
    if not open_:
        return samples
    check_split_fractions(fractions)
    fixed = {sample.group for sample in samples if sample.split is not None} - {None}
    straddling = sorted(fixed & {samples[index].group for index in open_})
    if straddling:
        raise ValueError(f"group(s) {', '.join(straddling[:3])} have samples with and "
                         f"without a split")
    splits = stratified_split([samples[index].label for index in open_], fractions, seed,
                              [samples[index].group for index in open_])
    out = list(samples)
    for index, split in zip(open_, splits, strict=True):
        out[index] = replace(samples[index], split=split)
    return out


def link_folder(root: str | os.PathLike, link: Path) -> Path:
    """Make `link` a symlink to the existing folder `root`; return the link."""
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise InputError(f"local data folder {root} {what} (source.root)")
    root = root.resolve()
    if link.is_symlink() and link.resolve() == root:
        return link
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        raise InputError(f"{link} is a folder; remove it so that it can link to {root}")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(root, target_is_directory=True)
    return link


def write_samples(out_dir: Path, samples: Sequence[Sample], classes: Sequence[str],
                  kind: str) -> Path:
    """Hash what needs it and write `manifest.csv` + `dataset.json` (paths made relative).

    The manifest gets a `group` column when any sample has a group.
    """
    rows = []
    grouped = any(sample.group is not None for sample in samples)
    if kind == "slides":  # before hours of checksums, not when the manifest is read
        for sample in samples:
            check_slide_id(sample.sample_id, str(sample.path))
    for sample in progress(samples, desc="checksums", unit="file"):
        if sample.split not in SPLITS:
            raise ValueError(f"sample {sample.sample_id!r} has no split")
        row = {
            "sample_id": sample.sample_id,
            "path": os.path.relpath(sample.path, out_dir),
            "label": sample.label,
            "split": sample.split,
            "sha256": sample.sha256 or sha256_file(sample.path),
        }
        if grouped:
            row[GROUP_COLUMN] = sample.group or ""
        rows.append(row)
    manifest = write_dataset(out_dir, rows, classes, kind,
                             (GROUP_COLUMN,) if grouped else ())
    counts = {split: sum(row["split"] == split for row in rows) for split in SPLITS}
    log.info("%s: %d samples (%s)", manifest, len(rows),
             ", ".join(f"{split} {count}" for split, count in counts.items()))
    _warn_of_splits(manifest, rows, counts)
    return manifest


def _warn_of_splits(manifest: Path, rows: Sequence[Mapping[str, str]],
                    counts: Mapping[str, int]) -> None:
    """Log what makes the splits' numbers mean less: an empty split, the same file (by
    sha256) in two splits, which leaks test or val samples into training, and a group
    (patient, lesion) with samples in test and in train or val (a split given per row,
    as CBIS-DDSM's official one is per abnormality table, can do that)."""
    for split in ("val", "test"):
        if not counts[split]:
            log.warning("%s: no %s samples%s", manifest, split,
                        ": models are kept from their last epoch, not selected on val"
                        if split == "val" else ": nothing will be scored")
    splits_of: dict[str, dict[str, str]] = {}
    for row in rows:
        splits_of.setdefault(row["sha256"], {})[row["sample_id"]] = row["split"]
    leaks = [samples for samples in splits_of.values() if len(set(samples.values())) > 1]
    if leaks:
        shown = "; ".join(", ".join(f"{sample} ({split})" for sample, split in samples.items())
                          for samples in leaks[:5])
        log.warning("%s: %d file(s) are in more than one split under different sample ids "
                    "(same sha256), which leaks them between splits: %s%s", manifest,
                    len(leaks), shown, " ..." if len(leaks) > 5 else "")
    shared = groups_in_test_and_training(rows)
    if shared:
        log.warning("%s: %d group(s) (%r column: patients or lesions) have samples in "
                    "the test split and in train or val (first: %s); their test samples are "
                    "not from unseen groups", manifest, len(shared), GROUP_COLUMN, shared[0])


def groups_in_test_and_training(rows: Iterable[Mapping[str, str]]) -> list[str]:
    """The groups (manifest rows' `GROUP_COLUMN`, empty: none) with rows in the test split
    and in train or val, sorted."""
    tested, trained = set(), set()
    for row in rows:
        if row.get(GROUP_COLUMN):
            (tested if row["split"] == "test" else trained).add(row[GROUP_COLUMN])
    return sorted(tested & trained)


def write_table(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """A side table of a dataset (ROI masks, annotations), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    return path


def find_one(root: Path, name: str, where_to_get: str = "") -> Path:
    """The single file called `name` anywhere under `root`; InputError otherwise."""
    found = sorted(path for path in root.rglob(name) if path.is_file())
    if len(found) != 1:
        what = "no file" if not found else f"{len(found)} files ({', '.join(map(str, found[:3]))})"
        hint = f"; {where_to_get}" if where_to_get and not found else ""
        raise InputError(f"{root}: expected one {name}, found {what}{hint}")
    return found[0]
