"""Read a single-frame grayscale DICOM image as display values in [0, 1].

The stored values go through the same chain a viewer applies (modality LUT or
rescale, then the VOI LUT or window) so that a model sees what a radiologist
sees; MONOCHROME1 is inverted so that dense tissue is bright in every image.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder

from medrobust.errors import InputError

_PIXEL_ELEMENTS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
# what pydicom raises when an element it needs is missing or malformed (a window width of 0,
# an unknown VOI LUT function, "abc" as a number, an empty PixelData, a short value)
_MALFORMED = (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError,
              EOFError, struct.error, BytesLengthException)


def read_dicom_image(path: str | os.PathLike) -> np.ndarray:
    """The image as float32 `(H, W)` in [0, 1], tissue bright; InputError naming the file
    for anything that is not such an image."""
    path = Path(path)
    ds = _read_dataset(path)
    # only reading the elements and pydicom's LUTs: an error in the arithmetic below is a
    # bug to see, not a file to leave out
    try:
        _check_single_grayscale_frame(ds, path)
        stored = _decode_pixels(ds, path)
        if _has_voi(ds):
            display = _display_values(ds, stored)
            low, high = _display_values(ds, _stored_extremes(ds))
        else:  # no window in the file: stretch the values the image has
            display = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
            low, high = display.min(initial=np.inf), display.max(initial=-np.inf)
        inverted = ds.PhotometricInterpretation == "MONOCHROME1"  # minimum value is white
    except InputError:  # a ValueError too, and already says what is wrong
        raise
    except _MALFORMED as error:
        raise InputError(f"{path}: malformed DICOM image ({type(error).__name__}: {error})") \
            from error
    if not (np.isfinite(display).all() and np.isfinite(low) and np.isfinite(high)):
        raise InputError(f"{path}: pixel values are not finite (NaN or infinity) after the "
                         "rescale and window (float pixel data, or a NaN RescaleSlope)")
    scaled = (display - low) / (high - low) if high > low else np.zeros_like(display)
    scaled = np.clip(scaled, 0.0, 1.0)
    if inverted:
        scaled = 1.0 - scaled
    return scaled.astype(np.float32)


def read_dicom_laterality(path: str | os.PathLike) -> str | None:
    """L or R, from ImageLaterality (0020,0062), else Laterality (0020,0060); None when
    neither says (absent, empty, B for both or U for unpaired)."""
    path = Path(path)
    ds = _read_dataset(path, stop_before_pixels=True)
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value in ("L", "R"):
            return value
    return None


def _read_dataset(path: Path, stop_before_pixels: bool = False) -> FileDataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as error:
        raise InputError(f"{path}: not a DICOM file ({error})") from error
    except OSError as error:
        raise InputError(f"{path}: cannot read file ({error})") from error
    except (EOFError, ValueError, struct.error, NotImplementedError) as error:
        raise InputError(f"{path}: unreadable DICOM file, truncated or corrupt ({error})") \
            from error


def _check_single_grayscale_frame(ds: FileDataset, path: Path) -> None:
    if not any(name in ds for name in _PIXEL_ELEMENTS):
        raise InputError(f"{path}: DICOM file has no pixel data (no PixelData element; "
                         "not an image, or the file is truncated)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise InputError(f"{path}: multi-frame DICOM ({frames} frames); expected one 2-D image")
    photometric = ds.get("PhotometricInterpretation")
    samples = int(ds.get("SamplesPerPixel", 1))
    if photometric not in _GRAYSCALE or samples != 1:
        raise InputError(f"{path}: not a grayscale image (PhotometricInterpretation "
                         f"{photometric!r}, SamplesPerPixel {samples}); expected one sample "
                         "per pixel, MONOCHROME1 or MONOCHROME2")


def _decode_pixels(ds: FileDataset, path: Path) -> np.ndarray:
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise InputError(f"{path}: DICOM file meta has no Transfer Syntax UID")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as error:
        raise InputError(f"{path}: unsupported transfer syntax {syntax} ({error})") from error
    plugins = "; ".join(decoder.missing_dependencies)
    if not decoder.is_available:
        raise InputError(f"{path}: no decoder installed for {syntax.name} ({syntax}) pixel "
                         f"data; install one of the pydicom plugins: {plugins}")
    try:
        pixels = ds.pixel_array
    except (ValueError, RuntimeError, NotImplementedError, struct.error) as error:
        hint = f"; other pydicom plugins may decode it: {plugins}" if plugins else ""
        raise InputError(f"{path}: cannot decode pixel data ({error}){hint}") from error
    if pixels.ndim != 2:
        raise InputError(f"{path}: pixel data has shape {pixels.shape}; expected (rows, columns)")
    return pixels


def _has_voi(ds: FileDataset) -> bool:
    # float pixel data has no storable range to window against
    window = "WindowCenter" in ds and "WindowWidth" in ds
    return "PixelData" in ds and (bool(ds.get("VOILUTSequence")) or window)


def _display_values(ds: FileDataset, stored: np.ndarray) -> np.ndarray:
    return np.asarray(apply_voi_lut(apply_modality_lut(stored, ds), ds), dtype=np.float64)


def _stored_extremes(ds: FileDataset) -> np.ndarray:
    """The smallest and largest storable values; through the VOI they give the
    display range, so a window that clips maps exactly onto 0 and 1."""
    bits = int(ds.BitsStored)
    if int(ds.PixelRepresentation) == 1:
        return np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], dtype=np.int64)
    return np.array([0, 2**bits - 1], dtype=np.int64)
