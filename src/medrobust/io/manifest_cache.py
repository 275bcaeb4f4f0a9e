"""A dataset manifest's rows by sample id, read once per version of the file.

Snakemake calls the workflow's input functions once per job, so a cohort of N
slides would read its N-row manifest N times, which made planning quadratic
(docs/benchmarks.md, "Planning"). The cache is keyed on the file's path,
modification time and size, so a rewritten manifest is read again. This module
imports only the standard library: the workflow imports it at every parse.
Validation stays with `medrobust.data.manifest.read_manifest`, which the jobs use.
"""

from __future__ import annotations

import csv
import functools
import os
from typing import Mapping


def manifest_rows(path: str | os.PathLike) -> Mapping[str, Mapping[str, str]]:
    """Rows of `manifest.csv` by `sample_id`, every cell a string.

    Callers share the returned rows: copy a row before changing it.
    """
    stat = os.stat(path)
    return _read_rows(os.fspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)  # a few datasets per workflow
def _read_rows(path: str, mtime_ns: int, size: int) -> Mapping[str, Mapping[str, str]]:
    with open(path, newline="") as handle:
        return {row["sample_id"]: row for row in csv.DictReader(handle)}
