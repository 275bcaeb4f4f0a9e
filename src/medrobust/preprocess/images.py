"""An image-level dataset (DICOM mammograms, photos) to one image store.

Every manifest row is checked against its sha256, decoded, for mammograms
optionally cropped to the breast and turned so that every chest wall is on the
left (`medrobust.preprocess.mammograms`), padded to the target's aspect ratio
(the image's own is kept; mammograms are tall) and resized to `image_size`.
Intensities stay float32 throughout, so a 12- or 16-bit DICOM keeps its
precision up to the model's input normalisation.
Bad files are collected rather than stopping at the first one, so a user sees
every problem in one run; `on_bad_input` decides whether they abort the store
or are left out of it and listed in its attrs.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image
from skimage.color import rgb2gray

from medrobust.data.manifest import Manifest, read_manifest
from medrobust.errors import ON_BAD_INPUT, ConfigError, InputError, check_choice
from medrobust.io.atomic import SCRATCH, temporary_sibling
from medrobust.io.checksums import sha256_file
from medrobust.io.image_store import ImageStoreWriter
from medrobust.io.dicom import read_dicom_laterality
from medrobust.io.images import is_dicom, read_image
from medrobust.logs import get_logger
from medrobust.progress import progress
from medrobust.config import config_from_mapping
from medrobust.preprocess import positive_number
from medrobust.preprocess.mammograms import screening_view

log = get_logger(__name__)


@dataclass(frozen=True)
class ImagePreprocessConfig:
    image_size: int | Sequence[int]  # a square's side, or [height, width]
    breast_crop: bool = False
    uniform_laterality: bool = False

    def __post_init__(self) -> None:
        square = isinstance(self.image_size, int)
        sides = [self.image_size] if square else list(self.image_size)
        if not square and len(sides) != 2:
            raise ConfigError(f"preprocess.image_size must be a side or [height, width], "
                              f"not {self.image_size!r}")
        for side in sides:
            positive_number(side, "preprocess.image_size", integer=True)
        for key in ("breast_crop", "uniform_laterality"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"preprocess.{key} must be true or false, "
                                  f"not {getattr(self, key)!r}")

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the stored images."""
        if isinstance(self.image_size, int):
            return self.image_size, self.image_size
        return int(self.image_size[0]), int(self.image_size[1])

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "ImagePreprocessConfig":
        return config_from_mapping(cls, mapping, "preprocess")


def build_image_store(manifest_path: str | os.PathLike, out_path: str | os.PathLike,
                      config: ImagePreprocessConfig, on_bad_input: str = "fail",
                      workers: int = 1) -> Path:
    """Write the dataset's image store at `out_path` (atomically) and return the path.

    Images are `(C, height, width)` float32 in [0, 1] (`config.shape`), in
    manifest order. C is 1 or 3, taken from the first readable image; images of the
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
        scratch, errors, geometry = _read_all(manifest, config, scratch_dir, workers)
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
            "breast_crop": config.breast_crop,
            "uniform_laterality": config.uniform_laterality,
            "channels": int(scratch.shape[1]),
            "source_manifest_sha256": sha256_file(manifest.path),
            "rejected": rejected,
            "geometry": {manifest.table.at[int(index), "sample_id"]: geometry[int(index)]
                         for index in good},
        }
        with ImageStoreWriter(out_path, len(good), scratch.shape[1:], attrs) as writer:
            for position, index in enumerate(good):
                writer.images[position] = scratch[index]
            writer.finish(manifest.labels[good], manifest.table["split"].to_numpy()[good],
                          manifest.table["sample_id"].to_numpy()[good])
    log.info("%s: wrote %d images of %s to %s", manifest.path, len(good),
             scratch.shape[1:], out_path)
    return out_path


def _read_all(manifest: Manifest, config: ImagePreprocessConfig, scratch_dir: Path,
              workers: int) -> tuple[np.ndarray, dict[int, str], dict[int, list[float]]]:
    """Prepared images `(N, C, height, width)` (memory-mapped), the bad rows' reasons and
    the good rows' `Placement.geometry`."""
    rows = [row for _, row in manifest.table.iterrows()]
    errors: dict[int, str] = {}
    geometry: dict[int, list[float]] = {}
    with progress(total=len(rows), desc=f"preprocess {manifest.root.name}", unit="image") as bar:
        # the channel count must be known before the parallel pass writes
        first, image = None, None
        for first, row in enumerate(rows):
            bar.update()
            try:
                image, placement = load_mammogram_view(manifest, row, config)
                break
            except InputError as error:
                errors[first] = str(error)
        if image is None:
            raise _bad_inputs_error(manifest.path, _rejected(manifest.table, errors),
                                    none_readable=True)
        channels = 1 if image.ndim == 2 else 3
        scratch = np.lib.format.open_memmap(scratch_dir / "images.npy", mode="w+",
                                            dtype=np.float32,
                                            shape=(len(rows), channels, *config.shape))
        # with one laterality the chest wall stays at the left edge: pad on the nipple's side
        wall_left = config.uniform_laterality
        scratch[first] = prepare_image(image, config.shape, channels, wall_left)
        geometry[first] = placement.geometry(image.shape[:2], config.shape, wall_left)

        def prepare_row(index: int) -> str | None:
            try:
                view, placement = load_mammogram_view(manifest, rows[index], config)
                scratch[index] = prepare_image(view, config.shape, channels, wall_left)
                geometry[index] = placement.geometry(view.shape[:2], config.shape, wall_left)
            except InputError as error:
                return str(error)
            return None

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            indices = range(first + 1, len(rows))
            for index, error in zip(indices, pool.map(prepare_row, indices)):
                bar.update()
                if error is not None:
                    errors[index] = error
    return scratch, errors, geometry


def load_verified(manifest: Manifest, row: pd.Series) -> np.ndarray:
    """Read one row's image after checking that the file is the one the manifest lists."""
    path = manifest.absolute_path(row)
    if not path.is_file():
        raise InputError(f"{path}: {'not a file' if path.exists() else 'file not found'}")
    digest = sha256_file(path)
    if digest != row["sha256"].strip().lower():
        raise InputError(f"{path}: sha256 {digest} differs from the manifest's "
                         f"{row['sha256']!r}; the file changed or is corrupt")
    return read_image(path)


@dataclass(frozen=True)
class Placement:
    """Where the view given to `prepare_image` sits in the source image."""

    top: int = 0
    left: int = 0
    flipped: bool = False

    def geometry(self, view_shape: tuple[int, int], size: tuple[int, int],
                 pad_right: bool) -> list[float]:
        """[sx, tx, sy, ty]: a source point (x, y), in pixels with pixel i spanning [i, i + 1),
        lands at (sx x + tx, sy y + ty) in the stored image; sx < 0 when flipped."""
        height, width = view_shape
        (top_pad, _), (left_pad, _), (padded_height, padded_width) = _padding(
            height, width, size, pad_right)
        kx, ky = size[1] / padded_width, size[0] / padded_height
        if self.flipped:  # x -> width - (x - left)
            sx, tx = -kx, kx * (width + self.left + left_pad)
        else:
            sx, tx = kx, kx * (left_pad - self.left)
        return [sx, tx, ky, ky * (top_pad - self.top)]


def load_mammogram_view(manifest: Manifest, row: pd.Series,
                        config: ImagePreprocessConfig) -> tuple[np.ndarray, Placement]:
    """`load_verified`, then the breast crop and the flip the config asks for."""
    image = load_verified(manifest, row)
    if not (config.breast_crop or config.uniform_laterality):
        return image, Placement()
    path = manifest.absolute_path(row)
    laterality = (read_dicom_laterality(path)
                  if config.uniform_laterality and is_dicom(path) else None)
    view, (top, left), flipped = screening_view(image, laterality, config.breast_crop,
                                                config.uniform_laterality)
    return view, Placement(top, left, flipped)


def _padding(height: int, width: int, size: tuple[int, int], pad_right: bool
             ) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Rows above and below, columns left and right, and the padded shape that bring an
    image to the aspect ratio of `size` (height, width)."""
    out_height, out_width = size
    padded_height = max(height, round(width * out_height / out_width))
    padded_width = max(width, round(height * out_width / out_height))
    top = (padded_height - height) // 2
    left = 0 if pad_right else (padded_width - width) // 2
    return ((top, padded_height - height - top), (left, padded_width - width - left),
            (padded_height, padded_width))


def prepare_image(image: np.ndarray, size: int | tuple[int, int], channels: int,
                  pad_right: bool = False) -> np.ndarray:
    """`(H, W)` or `(H, W, 3)` in [0, 1] to `(channels, height, width)` float32; `size` is a
    square's side or (height, width). Padding is centred, or, with `pad_right`, added
    widthwise on the right only."""
    out_height, out_width = (size, size) if isinstance(size, int) else size
    rows, cols, _ = _padding(*image.shape[:2], (out_height, out_width), pad_right)
    padding = [rows, cols]
    planes = image[..., None] if image.ndim == 2 else image
    # Pillow scales its filter with the reduction factor, so downsizing is
    # anti-aliased (tiny bright specks average out instead of aliasing)
    resized = np.stack([
        np.asarray(Image.fromarray(np.pad(planes[..., c], padding).astype(np.float32))
                   .resize((out_width, out_height), Image.Resampling.LANCZOS))
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
