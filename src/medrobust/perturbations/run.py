"""Perturbed copies of a store's test split, and the test-split streaming they share.

`iter_test_batches` and `write_test_store` serve every stage that turns a
clean store's test split into another store (perturbations, attacks) or reads
it in batches (evaluation); a derived store keeps the clean store's layout and
attrs (docs/architecture.md, "Image store").
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from medrobust.errors import InputError
from medrobust.io.image_store import ImageStore, ImageStoreWriter, open_image_store
from medrobust.logs import get_logger
from medrobust.perturbations import build_perturbation

log = get_logger(__name__)


def nonempty_test_index(store: ImageStore) -> np.ndarray:
    """Positions of the test samples; a store without any is an input error."""
    index = store.indices("test")
    if index.size == 0:
        raise InputError(f"{store.path}: the image store has no test samples")
    return index


def iter_test_batches(store: ImageStore, batch_size: int,
                      desc: str = "test batches") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) of the test split in store order, one batch in memory at a time."""
    index = nonempty_test_index(store)
    for start in tqdm(range(0, index.size, batch_size), desc=desc, unit="batch"):
        chunk = index[start:start + batch_size]
        yield np.asarray(store.images.get_orthogonal_selection((chunk,))), store.labels[chunk]


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


def perturb_store(clean_store_path: str | os.PathLike, out_path: str | os.PathLike, name: str,
                  severity: float, seed: int, batch_size: int = 64) -> None:
    """Apply perturbation `name` at `severity` to the test split of a clean store."""
    perturbation = build_perturbation(name, severity)
    store = open_image_store(clean_store_path)
    # one generator for the whole split, drawn in store order: the result
    # depends on the seed only, not on the batch size
    rng = np.random.default_rng(seed)
    batches = (perturbation(images, rng)
               for images, _ in iter_test_batches(store, batch_size, desc=f"{name} {severity:g}"))
    write_test_store(store, out_path, batches,
                     {"perturbation": name, "severity": severity, "seed": seed})
    log.info("wrote %s (%s, severity %g)", out_path, name, severity)
