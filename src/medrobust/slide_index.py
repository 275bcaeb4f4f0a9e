"""A slide dataset's index: one small CSV that stands for all its per-slide stores.

The slide-model jobs (train, evaluate, attention, robustness), the tile perturbations
and the report read all of a dataset's tile or feature stores, or all of its test
slides'. Listed as their inputs, each store is a DAG edge per such job, and
Snakemake's planning cost grows with edges: about 12.6 per slide made planning a
10,000-slide cohort 1.7× a bare workflow with the same jobs (docs/benchmarks.md,
"Planning"). So one local job per dataset takes the stores as input once
(`index_slide_tiles`, `index_slide_features`) and writes this index, and those jobs
take the index. A store that changes rewrites the index, so the jobs that read it
rerun; those that read only the test slides now rerun for any slide's change too.
With slides in groups (`medrobust.slide_groups`) the index lists each slide's stores
in its group's folder, and the index jobs take the group folders as input.

Columns: `slide_id`, `split` (from the manifest), then one column of paths per kind
of store (`tiles` and `qc`, or `features`), in manifest order, and last `n_slides`, the
number of rows, on every row: an index cut short or missing a row is refused rather than
read as fewer slides. Only the standard library.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Mapping, Sequence

from medrobust.errors import InputError
from medrobust.io.atomic import atomic_path
from medrobust.io.manifest_cache import manifest_rows

FIXED_COLUMNS = ("slide_id", "split")
COUNT_COLUMN = "n_slides"


def write_slide_index(manifest: str | os.PathLike, out_path: str | os.PathLike,
                      stores: Mapping[str, Sequence[str | os.PathLike]]) -> None:
    """Index the stores of every slide of `manifest`, each kind a list in manifest order.

    A path must be named after its slide, with the same suffix for every slide of a kind
    (`{slide_id}.zarr`, `{slide_id}.qc.png`), so lists in another order are refused.
    """
    rows = manifest_rows(manifest)
    if not rows:   # an index without rows could not state its count
        raise InputError(f"{manifest}: no slides to index")
    for kind, paths in stores.items():
        if kind in (*FIXED_COLUMNS, COUNT_COLUMN):
            raise ValueError(f"a store kind may not be called {kind!r}")
        if len(paths) != len(rows):
            raise InputError(f"{manifest}: {len(rows)} slides, but {len(paths)} {kind} paths")
        suffix = Path(paths[0]).name.removeprefix(next(iter(rows), "")) if paths else ""
        for slide_id, path in zip(rows, paths):
            if Path(path).name != f"{slide_id}{suffix}" or not suffix.startswith("."):
                raise InputError(f"{manifest}: {kind} path {path} is not slide {slide_id!r}'s")
            if not os.path.lexists(path):  # e.g. deleted from a group's folder by hand
                raise InputError(f"{path}: slide {slide_id!r}'s {kind} is missing; rerun the job "
                                 f"that writes it (snakemake --forcerun {Path(path).parent})")
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([*FIXED_COLUMNS, *stores, COUNT_COLUMN])
    for index, (slide_id, row) in enumerate(rows.items()):
        writer.writerow([slide_id, row["split"], *(os.fspath(paths[index])
                                                   for paths in stores.values()), len(rows)])
    with atomic_path(out_path) as tmp:
        tmp.write_text(text.getvalue())


def read_slide_index(paths: str | os.PathLike | Sequence[str | os.PathLike], kind: str,
                     split: str | None = None) -> list[str]:
    """The `kind` paths of one index or several (one per dataset, concatenated), in order;
    with `split`, only that split's slides."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: list[str] = []
    for path in paths:
        try:
            with open(path, newline="") as handle:
                rows = list(csv.reader(handle))
        except (UnicodeDecodeError, csv.Error) as error:   # e.g. cut inside a character
            raise InputError(f"{path}: not a readable slide index ({error})") from error
        header = rows.pop(0) if rows else []
        if kind not in header or "split" not in header or header[-1] != COUNT_COLUMN:
            raise InputError(f"{path}: not a slide index with a {kind!r} column and "
                             f"{COUNT_COLUMN} last (columns: {', '.join(header) or 'none'})")
        # a line cut short loses cells or digits of its count; a row cut or removed whole
        # leaves every row's count too high, and no row at all leaves no count
        for line, row in enumerate(rows or [[]], start=2):
            if len(row) != len(header):
                problem = f"{len(row)} cells for the header's {len(header)}"
            elif row[-1] != str(len(rows)):
                problem = f"{COUNT_COLUMN} is {row[-1]!r}, but there are {len(rows)} slide rows"
            else:
                continue
            raise InputError(f"{path}: line {line}: {problem}; the index is damaged or cut "
                             f"short (snakemake --forcerun {path} rewrites it)")
        column, split_column = header.index(kind), header.index("split")
        found.extend(row[column] for row in rows if split is None or row[split_column] == split)
    return found
