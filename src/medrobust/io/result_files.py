"""Reading the tables, records and pictures the workflow's own jobs wrote under results/.

Such a file, once damaged (cut short, a row lost, a word or NaN where a number
belongs), must stop its reader with a message naming it: read as it is, it
would show as fewer rows or holes in the report. Each reader still checks its
rows against what its writer guarantees; these check what every file shares.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import pandas as pd

from PIL import Image, UnidentifiedImageError

from medrobust.errors import RERUN, InputError

_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"   # the empty end chunk and its checksum


def read_result_table(path: str | os.PathLike, what: str, columns: Iterable[str],
                      numbers: Iterable[str] = (), finite: Iterable[str] = (),
                      dtype: Mapping[str, Any] | None = None,
                      may_be_empty: bool = False) -> pd.DataFrame:
    """The CSV at `path` (`what` it is, for messages): rows with at least `columns`
    (`may_be_empty`: or none, where its writer may find nothing to write).

    `numbers` are read as numbers where an empty cell (undefined) is allowed;
    `finite` must hold a finite number in every row. InputError names the file,
    and the line of a bad value.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
        table = pd.read_csv(io.BytesIO(data), dtype=dtype)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError,
            pd.errors.EmptyDataError) as error:
        raise InputError(f"{path}: unreadable {what} ({error}); {RERUN}") from error
    # pandas ends every row with a line break: a file without one was cut short
    if not data.endswith(b"\n"):
        raise InputError(f"{path}: the {what} is cut short (its last line is incomplete); "
                         f"{RERUN}")
    missing = [column for column in columns if column not in table]
    if missing:
        raise InputError(f"{path}: the {what} lacks column(s) {', '.join(missing)}; {RERUN}")
    if table.empty and not may_be_empty:
        raise InputError(f"{path}: the {what} has no rows; {RERUN}")
    return check_numbers(table, path, numbers, finite)


def check_numbers(table: pd.DataFrame, path: Path, numbers: Iterable[str] = (),
                  finite: Iterable[str] = (),
                  where: Callable[[int], str] = lambda row: f"line {row + 2}",
                  ) -> pd.DataFrame:
    """`table` (read from `path`) with `numbers` and `finite` as read_result_table reads
    them, for columns known only once the table is read or a table not read from a CSV
    (`where` names a row by its position; in a CSV, line 1 is the header)."""
    finite = set(finite)
    for column in dict.fromkeys([*numbers, *finite]):
        values = pd.to_numeric(table[column], errors="coerce")
        bad = values.isna().to_numpy() & table[column].notna().to_numpy()
        if column in finite:
            bad = bad | ~np.isfinite(values.to_numpy(dtype=float))
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            value = table[column].iloc[first]
            kind = "a finite number" if column in finite else "a number or empty"
            shown = "empty or NaN" if pd.isna(value) else repr(str(value))
            raise InputError(f"{path}: {where(first)}: {column} must be {kind}, not "
                             f"{shown}; {RERUN}")
        table[column] = values
    return table


def read_result_record(path: str | os.PathLike, what: str,
                       keys: Iterable[str] = ()) -> dict[str, Any]:
    """The JSON object at `path` (`what` it is, for messages), with at least `keys`; a key
    "a.b" is b in the object at a."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: unreadable {what} ({error}); {RERUN}") from error
    if not isinstance(record, dict):
        raise InputError(f"{path}: the {what} must hold one JSON object, not "
                         f"{type(record).__name__}; {RERUN}")
    for key in keys:
        value = record
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                raise InputError(f"{path}: the {what} lacks {key}; {RERUN}")
            value = value[part]
    return record


def read_result_png(path: str | os.PathLike, what: str) -> bytes:
    """The bytes of a PNG file that a job wrote (`what`: "QC picture"), checked whole:
    one cut short would show on the page as a broken image."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise InputError(f"{path}: unreadable {what} ({error})") from error
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            image.verify()   # every chunk and its checksum, but not the end chunk's
        problem = None if data.endswith(_PNG_END) else "no whole end chunk at its end"
    except UnidentifiedImageError:
        problem = "no PNG header"
    except (OSError, SyntaxError) as error:   # PIL's errors for a chunk cut short or corrupt
        problem = str(error)
    if problem:
        raise InputError(f"{path}: damaged PNG {what} ({problem}); {RERUN}")
    return data
