"""Read one image file of an image-level dataset as float32 in [0, 1].

DICOM (mammograms, radiographs) and the photo formats of datasets such as
ISIC or MedMNIST (PNG, JPEG) come back in one form: `(H, W)` for grayscale,
`(H, W, 3)` for colour.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medrobust.errors import InputError
from medrobust.io.dicom import read_dicom_image

DICOM_SUFFIXES = (".dcm", ".dicom")
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg")
_DICOM_MAGIC_OFFSET, _DICOM_MAGIC = 128, b"DICM"
_GRAY_MODES = ("1", "L", "LA")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Dispatch on the suffix; DICOM files often have none, or a photo's (exports named
    .jpg), so the DICOM magic bytes decide first."""
    path = Path(path)
    if _has_dicom_magic(path):
        return read_dicom_image(path)
    if path.suffix.lower() in PHOTO_SUFFIXES:
        return read_photo(path)
    if path.suffix.lower() in DICOM_SUFFIXES:  # a DICOM file without the magic bytes
        return read_dicom_image(path)
    suffix = path.suffix.lower()
    raise InputError(f"{path}: unsupported image format {suffix or '(no suffix)'!r}; "
                     f"expected one of {', '.join(DICOM_SUFFIXES + PHOTO_SUFFIXES)} "
                     "or a DICOM file")


def read_photo(path: str | os.PathLike) -> np.ndarray:
    """A PNG or JPEG as float32 `(H, W)` or `(H, W, 3)` in [0, 1]."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later
            image = ImageOps.exif_transpose(image)  # photos are often stored rotated
    except FileNotFoundError as error:
        raise InputError(f"{path}: file not found") from error
    except (UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise InputError(f"{path}: not a readable image ({error})") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(f"{path}: image data truncated or corrupt ({error})") from error
    return _to_unit_range(image, path)


def _to_unit_range(image: Image.Image, path: Path) -> np.ndarray:
    if image.mode.startswith("I;16"):
        return np.asarray(image, dtype=np.float32) / np.float32(65535.0)
    if image.mode in ("I", "F"):  # no known white level to scale by
        raise InputError(f"{path}: 32-bit pixel mode {image.mode!r} is not supported; "
                         "store 8- or 16-bit images")
    mode = "L" if image.mode in _GRAY_MODES else "RGB"  # alpha is dropped
    return np.asarray(image.convert(mode), dtype=np.float32) / np.float32(255.0)


def is_dicom(path: Path) -> bool:
    """By its suffix, or, as DICOM files often have none, by the magic bytes."""
    return path.suffix.lower() in DICOM_SUFFIXES or _has_dicom_magic(path)


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(_DICOM_MAGIC_OFFSET)
            return handle.read(len(_DICOM_MAGIC)) == _DICOM_MAGIC
    except OSError:
        return False
