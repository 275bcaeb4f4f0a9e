"""The image-level Zarr store: N images of one size with labels, splits and ids.

The preprocessed dataset, adversarial examples and perturbed images all share
this layout (docs/architecture.md), so one reader serves every stage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr

from medrobust.errors import InputError
from medrobust.io.atomic import atomic_path
from medrobust.io.zarr_chunks import check_lengths, create_array, read_array

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ImageStore:
    """Read access to an image store; `images` stays lazy (a zarr array)."""

    path: Path
    images: zarr.Array
    labels: np.ndarray
    splits: np.ndarray
    sample_ids: np.ndarray
    attrs: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.attrs["classes"])

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)

    def read(self, index: np.ndarray | slice = slice(None)) -> np.ndarray:
        """The images at `index` (positions or a slice), float32, checked as `read_array`."""
        return read_array(self.images, index)

    def load(self, split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Images (float32) and labels of one split, or of all samples."""
        if split is None:
            return self.read(), self.labels
        index = self.indices(split)
        return self.read(index), self.labels[index]


def open_image_store(path: str | os.PathLike) -> ImageStore:
    path = Path(path)
    try:
        group = zarr.open_group(path, mode="r")
        store = ImageStore(
            path=path,
            images=group["images"],
            labels=read_array(group["labels"]),
            splits=np.asarray(read_array(group["splits"]).tolist(), dtype=str),
            sample_ids=np.asarray(read_array(group["sample_ids"]).tolist(), dtype=str),
            attrs=dict(group.attrs),
        )
    except (FileNotFoundError, KeyError, ValueError) as error:
        raise InputError(f"{path}: not a readable image store ({error})") from error
    check_lengths(path, {"images": store.images, "labels": store.labels,
                         "splits": store.splits, "sample_ids": store.sample_ids},
                  store.attrs.get("n_images"), "n_images")
    return store


class ImageStoreWriter:
    """Write an image store one image at a time (chunk = one image).

    Use as a context manager; the store appears at `path` only on success.
    """

    def __init__(self, path: str | os.PathLike, n: int, image_shape: tuple[int, ...],
                 attrs: dict[str, Any]):
        self.path = Path(path)
        self._n = n
        self._shape = tuple(image_shape)
        self._attrs = attrs
        self._atomic = atomic_path(self.path)
        self._finished = False

    def __enter__(self) -> "ImageStoreWriter":
        tmp = self._atomic.__enter__()
        self._group = zarr.open_group(tmp, mode="w")
        self.images = create_array(self._group, "images", shape=(self._n, *self._shape),
                                   chunks=(1, *self._shape), dtype="float32")
        return self

    def finish(self, labels: Iterable[int], splits: Iterable[str], sample_ids: Iterable[str],
               **extra_attrs: Any) -> None:
        labels = np.asarray(list(labels), dtype=np.int64)
        # variable-length strings have a Zarr v3 spec; fixed-width unicode has none
        splits = np.asarray(list(splits), dtype=np.dtypes.StringDType())
        sample_ids = np.asarray(list(sample_ids), dtype=np.dtypes.StringDType())
        for name, values in (("labels", labels), ("splits", splits), ("sample_ids", sample_ids)):
            if len(values) != self._n:
                raise ValueError(f"{name} has {len(values)} entries for {self._n} images")
        create_array(self._group, "labels", data=labels)
        create_array(self._group, "splits", data=splits)
        create_array(self._group, "sample_ids", data=sample_ids)
        self._group.attrs.update({**self._attrs, **extra_attrs, "n_images": self._n})
        self._finished = True

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None and not self._finished:
            # an unfinished store must not appear complete
            error = RuntimeError(f"{self.path}: writer closed before finish()")
            self._atomic.__exit__(RuntimeError, error, None)
            raise error
        return self._atomic.__exit__(exc_type, exc, tb)


def write_image_store(path: str | os.PathLike, images: np.ndarray, labels, splits, sample_ids,
                      attrs: dict[str, Any]) -> None:
    """Write a whole in-memory batch of images as a store."""
    images = np.asarray(images, dtype=np.float32)
    with ImageStoreWriter(path, len(images), images.shape[1:], attrs) as writer:
        writer.images[:] = images
        writer.finish(labels, splits, sample_ids)
