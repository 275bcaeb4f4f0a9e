"""The test split of an image store, streamed: read in batches, written as a derived store.

Every stage that turns a clean store's test split into another store
(perturbations, attacks) or reads it in batches (evaluation) goes through
`iter_test_batches` and `write_test_store`, one batch in memory at a time; a
derived store keeps the clean store's layout and attrs (docs/architecture.md,
"Image store").
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

import numpy as np

from medrobust.errors import InputError
from medrobust.io.image_store import ImageStore, ImageStoreWriter
from medrobust.progress import progress


def nonempty_test_index(store: ImageStore) -> np.ndarray:
    """Positions of the test samples; a store without any is an input error."""
    index = store.indices("test")
    if index.size == 0:
        raise InputError(f"{store.path}: the image store has no test samples")
    return index


def iter_test_batches(store: ImageStore, batch_size: int,
                      desc: str = "test batches") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) of the test split in store order, one batch in memory at a time."""
    return iter_index_batches(store, nonempty_test_index(store), batch_size, desc)


def iter_index_batches(store: ImageStore, index: np.ndarray, batch_size: int,
                       desc: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) of the samples at `index` (positions, e.g. of one split), in
    batches."""
    for start in progress(range(0, index.size, batch_size), desc=desc, unit="batch"):
        chunk = index[start:start + batch_size]
        yield store.read(chunk), store.labels[chunk]


def write_test_store(store: ImageStore, out_path: str | os.PathLike,
                     batches: Iterable[np.ndarray], attrs: dict[str, Any]) -> None:
    """Write transformed test images, in store order, as a test-only store.

    The clean store's attrs (dataset, classes, ...) are kept and `attrs` added.
    """
    index = nonempty_test_index(store)
    with ImageStoreWriter(out_path, index.size, store.images.shape[1:],
                          {**store.attrs, **attrs}) as writer:
        written = 0
        for batch in batches:
            writer.images[written:written + len(batch)] = batch
            written += len(batch)
        if written != index.size:
            raise RuntimeError(f"{out_path}: got {written} images for {index.size} test samples")
        writer.finish(store.labels[index], ["test"] * index.size, store.sample_ids[index])
