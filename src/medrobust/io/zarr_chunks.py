"""Zarr arrays with every chunk written, read so that a missing or damaged chunk is an error.

zarr reads a chunk file that is not there as never written: the fill value, zeros.
It also leaves a chunk of fill values unwritten (`write_empty_chunks` off), so in
general an absent chunk is not damage. A store copied in part or a chunk deleted
would then be read as zeros, and a model trained or scored on them without a word.
So medrobust's writers create arrays with `create_array`, which writes every chunk
and marks the array (EVERY_CHUNK_WRITTEN), and its readers read with `read_array`,
which refuses a marked array's absent chunk by name, and a chunk that does not
decode (cut short, overwritten) as well. Arrays without the mark (stores written by
zarr itself, or before the mark) keep zarr's meaning.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import zarr

from medrobust.errors import RERUN, InputError

EVERY_CHUNK_WRITTEN = "every_chunk_written"
DAMAGED = f"the store is damaged; {RERUN}"


def create_array(group: zarr.Group, name: str, **kwargs: Any) -> zarr.Array:
    """`group.create_array(name, **kwargs)`, writing all-zero chunks too, marked as such."""
    return group.create_array(name, attributes={EVERY_CHUNK_WRITTEN: True},
                              config={"write_empty_chunks": True}, **kwargs)


def array_folder(array: zarr.Array) -> Path:
    """The folder of an array in a local store."""
    return Path(array.store_path.store.root) / array.store_path.path


def check_chunks(array: zarr.Array, rows: np.ndarray | None = None) -> None:
    """InputError naming the first absent chunk file (shard file, for a sharded array) that
    holds any of `rows` (positions on the first axis; None: all) of a marked array."""
    if not array.attrs.get(EVERY_CHUNK_WRITTEN) or not array.size:
        return
    chunk_shape = array.metadata.chunk_grid.chunk_shape  # a sharded array's: its shards
    grid = [range(-(-length // chunk)) for length, chunk in zip(array.shape, chunk_shape)]
    if rows is not None:
        grid[0] = np.unique(np.asarray(rows, dtype=np.int64) // chunk_shape[0]).tolist()
    folder = os.fspath(array_folder(array))
    for coords in itertools.product(*grid):
        path = os.path.join(folder, array.metadata.encode_chunk_key(coords))
        if not os.path.isfile(path):
            raise InputError(f"{path}: chunk {coords} of this array is missing; {DAMAGED}")


def read_array(array: zarr.Array, rows: slice | np.ndarray | list[int] = slice(None)
               ) -> np.ndarray:
    """`array[rows]` (rows on the first axis, a slice or positions), checked: an absent
    chunk of a marked array, or a chunk that does not decode, is an InputError."""
    positions = (np.arange(array.shape[0])[rows] if isinstance(rows, slice)
                 else np.asarray(rows, dtype=np.int64).reshape(-1))
    check_chunks(array, positions)
    try:
        if isinstance(rows, slice):
            return np.asarray(array[rows])
        return np.asarray(array.get_orthogonal_selection((positions,)))
    except (RuntimeError, ValueError, TypeError) as error:  # the codecs' own errors
        raise InputError(f"{array_folder(array)}: a chunk does not decode ({error}); "
                         f"{DAMAGED}") from error


def check_lengths(path: str | os.PathLike, arrays: Mapping[str, zarr.Array | np.ndarray],
                  stated: Any = None, stated_as: str = "") -> None:
    """InputError unless `arrays` (a store's, by name) have as many rows as each other and as
    the store's attrs state (`stated`, its attribute `stated_as`): an array's metadata
    edited or damaged would otherwise drop or misalign rows without a word."""
    lengths = {name: int(array.shape[0]) for name, array in arrays.items()}
    if stated is not None:
        lengths[stated_as] = stated
    if len(set(lengths.values())) > 1:
        found = ", ".join(f"{name} {length}" for name, length in lengths.items())
        raise InputError(f"{path}: its arrays disagree on the number of rows ({found}); "
                         f"{DAMAGED}")
