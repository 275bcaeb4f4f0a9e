"""An image-level dataset (DICOM mammograms, photos) to one image store.

Every manifest row is checked against its sha256, decoded, padded to a square
(the aspect ratio is kept; mammograms are tall) and resized to `image_size`.
Bad files are collected rather than stopping at the first one, so a user sees
every problem in one run; `on_bad_input` decides whether they abort the store
or are left out of it and listed in its attrs.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
from PIL import Image
from skimage.color import rgb2gray

from medrobust.data.manifest import Manifest, read_manifest
from medrobust.errors import InputError, check_choice
from medrobust.io.atomic import SCRATCH, temporary_sibling
from medrobust.io.checksums import sha256_file
from medrobust.io.image_store import ImageStoreWriter
from medrobust.io.images import read_image
from medrobust.logs import get_logger
from medrobust.progress import progress
from medrobust.config import config_from_mapping
from medrobust.preprocess import positive_number

log = get_logger(__name__)
ON_BAD_INPUT = ("fail", "skip")


@dataclass(frozen=True)
class ImagePreprocessConfig:
    image_size: int

    def __post_init__(self) -> None:
        positive_number(self.image_size, "preprocess.image_size", integer=True)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "ImagePreprocessConfig":
        return config_from_mapping(cls, mapping, "preprocess")


def build_image_store(manifest_path: str | os.PathLike, out_path: str | os.PathLike,
                      config: ImagePreprocessConfig, on_bad_input: str = "fail",
                      workers: int = 1) -> Path:
    """Write the dataset's image store at `out_path` (atomically) and return the path.

    Images are `(C, image_size, image_size)` float32 in [0, 1], in manifest
    order. C is 1 or 3, taken from the first readable image; images of the
    other kind are converted. Raises InputError listing every bad file when
    `on_bad_input` is "fail" (nothing is written), or when no file is readable.
    """
    check_choice("on_bad_input", on_bad_input, ON_BAD_INPUT)
    manifest = read_manifest(manifest_path)
    if manifest.kind != "images":
        raise InputError(f"{manifest.path}: dataset kind is {manifest.kind!r}; "
                         "an image store needs kind 'images'")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # resized images wait on disk, not in memory, until the bad ones are known;
    # a killed run's scratch folder (a full float32 copy) is removed by the next
    with temporary_sibling(out_path, SCRATCH) as scratch_dir:
        scratch, errors = _read_all(manifest, config.image_size, scratch_dir, workers)
        good = np.array([index for index in range(len(manifest.table)) if index not in errors],
                        dtype=np.int64)
        rejected = _rejected(manifest.table, errors)
        if errors and on_bad_input == "fail":
            raise _bad_inputs_error(manifest.path, rejected)
        if rejected:
            log.warning("%s: left out %d unreadable image(s):\n  %s", manifest.path,
                        len(rejected), "\n  ".join(entry["reason"] for entry in rejected))
        attrs = {
            "dataset": manifest.root.name,
            "classes": list(manifest.classes),
            "image_size": config.image_size,
            "channels": int(scratch.shape[1]),
            "source_manifest_sha256": sha256_file(manifest.path),
            "rejected": rejected,
        }
        with ImageStoreWriter(out_path, len(good), scratch.shape[1:], attrs) as writer:
            for position, index in enumerate(good):
                writer.images[position] = scratch[index]
            writer.finish(manifest.labels[good], manifest.table["split"].to_numpy()[good],
                          manifest.table["sample_id"].to_numpy()[good])
    log.info("%s: wrote %d images of %s to %s", manifest.path, len(good),
             scratch.shape[1:], out_path)
    return out_path


def _read_all(manifest: Manifest, size: int, scratch_dir: Path,
              workers: int) -> tuple[np.ndarray, dict[int, str]]:
    """Prepared images `(N, C, size, size)` (memory-mapped) and the bad rows' reasons."""
    rows = [row for _, row in manifest.table.iterrows()]
    errors: dict[int, str] = {}
    with progress(total=len(rows), desc=f"preprocess {manifest.root.name}", unit="image") as bar:
        # the channel count must be known before the parallel pass writes
        first, image = None, None
        for first, row in enumerate(rows):
            bar.update()
            try:
                image = load_verified(manifest, row)
                break
            except InputError as error:
                errors[first] = str(error)
        if image is None:
            raise _bad_inputs_error(manifest.path, _rejected(manifest.table, errors),
                                    none_readable=True)
        channels = 1 if image.ndim == 2 else 3
        scratch = np.lib.format.open_memmap(scratch_dir / "images.npy", mode="w+",
                                            dtype=np.float32,
                                            shape=(len(rows), channels, size, size))
        scratch[first] = prepare_image(image, size, channels)

        def prepare_row(index: int) -> str | None:
            try:
                scratch[index] = prepare_image(load_verified(manifest, rows[index]), size,
                                               channels)
            except InputError as error:
                return str(error)
            return None

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            indices = range(first + 1, len(rows))
            for index, error in zip(indices, pool.map(prepare_row, indices)):
                bar.update()
                if error is not None:
                    errors[index] = error
    return scratch, errors


def load_verified(manifest: Manifest, row: pd.Series) -> np.ndarray:
    """Read one row's image after checking that the file is the one the manifest lists."""
    path = manifest.absolute_path(row)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    digest = sha256_file(path)
    if digest != row["sha256"].strip().lower():
        raise InputError(f"{path}: sha256 {digest} differs from the manifest's "
                         f"{row['sha256']!r}; the file changed or is corrupt")
    return read_image(path)


def prepare_image(image: np.ndarray, size: int, channels: int) -> np.ndarray:
    """`(H, W)` or `(H, W, 3)` in [0, 1] to `(channels, size, size)` float32."""
    height, width = image.shape[:2]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    padding = [(top, side - height - top), (left, side - width - left)]
    planes = image[..., None] if image.ndim == 2 else image
    # Pillow scales its filter with the reduction factor, so downsizing is
    # anti-aliased (tiny bright specks average out instead of aliasing)
    resized = np.stack([
        np.asarray(Image.fromarray(np.pad(planes[..., c], padding).astype(np.float32))
                   .resize((size, size), Image.Resampling.LANCZOS))
        for c in range(planes.shape[-1])])
    resized = np.clip(resized, 0.0, 1.0)  # Lanczos overshoots at edges
    if resized.shape[0] == channels:
        return resized
    if channels == 3:
        return np.repeat(resized, 3, axis=0)
    return rgb2gray(resized, channel_axis=0)[None].astype(np.float32)


def _rejected(table: pd.DataFrame, errors: dict[int, str]) -> list[dict[str, str]]:
    return [{"sample_id": table.at[index, "sample_id"], "path": table.at[index, "path"],
             "reason": errors[index]} for index in sorted(errors)]


def _bad_inputs_error(manifest_path: Path, rejected: list[dict[str, str]],
                      none_readable: bool = False) -> InputError:
    what = "no image is readable" if none_readable else f"{len(rejected)} image(s) are unreadable"
    advice = "" if none_readable else " (set on_bad_input: skip to leave them out)"
    return InputError(f"{manifest_path}: {what}{advice}:\n  "
                      + "\n  ".join(entry["reason"] for entry in rejected))
