"""Whole-slide images through OpenSlide, with errors that name the file.

`Slide` wraps an OpenSlide handle with the slide's level-0 resolution and
reads regions as RGB arrays, transparent areas (outside the scanned region)
filled with the slide's background colour. OpenSlide handles are safe to
share between threads, so tiles can be read in parallel from one `Slide`.

Regions are read with openslide-python's binding of `openslide_read_region`
(`lowlevel._read_region`) into a buffer each thread reuses, not through its
`read_region`: that one returns a PIL image in a fresh buffer, and for the
wide regions the tiler reads, converting it to an RGB array and the page faults
of its fresh buffers had cost about a third of the tiler's time
(docs/benchmarks.md, "Tiling"). tests/test_slides.py checks both give the same pixels.

Where a level is a plain mosaic of TIFF tiles (generic TIFF, Aperio SVS) and
a region starts at whole pixels of that level, its tiles are decoded directly
(io/tiff_tiles.py): the same pixels at a quarter of OpenSlide's cost. Each
level is trusted only after one of its tiles decoded so matched OpenSlide's
read exactly; every other read goes through OpenSlide, and so does a region
with a tile that cannot be decoded so, for OpenSlide to read or to refuse.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from pathlib import Path

import numpy as np
import openslide
from openslide import lowlevel
from PIL import Image, ImageColor

from medrobust.errors import InputError
from medrobust.io.tiff_tiles import TiffTileLevel
from medrobust.logs import get_logger

log = get_logger(__name__)

# A level whose downsample exceeds the wanted one by less than this still
# counts as matching, so float noise in mpp ratios doesn't skip a level.
_LEVEL_TOLERANCE = 1e-3
# Pixels per strip when a thumbnail is built from a large level.
_STRIP_PIXELS = 1 << 24
_WHITE = "ffffff"
# No slide scanner images coarser than this; a larger stated mpp comes from a
# TIFF's display dpi (72 dpi reads as 352.8 µm/px), not from a microscope.
MAX_SLIDE_MPP = 20.0
# Regions up to this many pixels are read into a buffer the reading thread keeps (16 MiB);
# larger ones (thumbnail strips) into a fresh one
_REUSED_PIXELS = 1 << 22
# OpenSlide writes premultiplied ARGB as native-endian uint32: which byte of each is R, G, B, A
_RGBA_BYTES = (2, 1, 0, 3) if sys.byteorder == "little" else (1, 2, 3, 0)
_OPAQUE = np.uint32(0xFF000000)


class Slide:
    """An open slide (from `open_slide`); use as a context manager or call `close()`."""

    def __init__(self, path: Path, handle: openslide.OpenSlide, mpp: float):
        self.path = path
        self.mpp = mpp
        self._slide = handle
        self.dimensions: tuple[int, int] = handle.dimensions
        self.level_dimensions: tuple[tuple[int, int], ...] = handle.level_dimensions
        self.level_downsamples: tuple[float, ...] = handle.level_downsamples
        color = handle.properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR, _WHITE)
        self._background = "#" + color
        self._background_rgb = np.array(ImageColor.getrgb(self._background), np.float32)
        self._buffers = threading.local()
        self._vendor = handle.properties.get(openslide.PROPERTY_NAME_VENDOR)
        self._tiff_levels: dict[int, TiffTileLevel | None] = {}  # level -> its tiles, once checked
        self._tiff_lock = threading.Lock()

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed `downsample`, so reads
        from it never upsample (within `_LEVEL_TOLERANCE`)."""
        return self._slide.get_best_level_for_downsample(downsample * (1 + _LEVEL_TOLERANCE))

    def read_rgb(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """`(height, width, 3)` uint8 of the region at `level`; `location` is level-0 (x, y).

        Pixels that are not opaque (outside the scanned area) are composited over
        the background: premultiplied, that is colour + background * (1 - alpha).
        """
        width, height = int(size[0]), int(size[1])
        if width < 0 or height < 0:  # OpenSlide would latch an error for every later read
            raise ValueError(f"region size must not be negative, not {size}")
        downsample = self.level_downsamples[level]
        x, y = location[0] / downsample, location[1] / downsample
        # OpenSlide resamples a region that starts between two pixels of the level
        if x.is_integer() and y.is_integer():
            tiles = self._tiff_level(level)
            if tiles is not None and tiles.covers(int(x), int(y), width, height):
                try:
                    return tiles.read(int(x), int(y), width, height)
                # OpenSlide decides: it raises where the tile is corrupt and reads it where
                # only libjpeg's final checks complained (bytes before the end marker)
                except InputError as error:
                    log.debug("%s; reading the region through OpenSlide", error)
        return self._read_openslide(location, level, width, height)

    def reads_tiff_tiles(self, level: int) -> bool:
        """Whether whole-pixel regions of `level` are decoded from its TIFF tiles directly."""
        return self._tiff_level(level) is not None

    def _tiff_level(self, level: int) -> TiffTileLevel | None:
        with self._tiff_lock:
            if level not in self._tiff_levels:
                self._tiff_levels[level] = self._checked_tiff_level(level)
            return self._tiff_levels[level]

    def _checked_tiff_level(self, level: int) -> TiffTileLevel | None:
        """The level's TIFF tiles if one decoded directly equals OpenSlide's read of it: the
        stored tile with the most data, so tissue rather than glass where the slide has any."""
        tiles = TiffTileLevel.open(self.path, self._vendor, self.level_dimensions[level])
        if tiles is None:
            return None
        row, column = divmod(int(np.argmax(tiles.byte_counts)), tiles.columns)
        x, y = column * tiles.tile_width, row * tiles.tile_height
        width = min(tiles.tile_width, tiles.width - x)
        height = min(tiles.tile_height, tiles.height - y)
        downsample = self.level_downsamples[level]
        location = (round(x * downsample), round(y * downsample))
        try:
            same = tiles.covers(x, y, width, height) and np.array_equal(
                tiles.read(x, y, width, height),
                self._read_openslide(location, level, width, height))
        # a corrupt tile or a damaged file: OpenSlide reports what it finds when it reads
        except Exception as error:
            log.debug("%s: checking level %d's TIFF tiles failed: %s", self.path, level, error)
            same = False
        if not same:
            log.info("%s: level %d's TIFF tiles decoded directly differ from OpenSlide's "
                     "read; reading the level through OpenSlide", self.path, level)
            tiles.close()
            return None
        return tiles

    def _read_openslide(self, location: tuple[int, int], level: int, width: int,
                        height: int) -> np.ndarray:
        argb = self._argb_buffer(width * height).reshape(height, width)
        try:
            lowlevel._read_region(self._slide._osr,
                                  argb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)),
                                  int(location[0]), int(location[1]), int(level), width, height)
        except openslide.OpenSlideError as error:
            raise InputError(f"{self.path}: cannot read region at {location} level {level} "
                             f"({error}); the slide file is corrupt") from error
        channels = argb.view(np.uint8).reshape(height, width, 4)
        rgb = np.empty((height, width, 3), np.uint8)
        # a plain copy per channel: several times faster than one strided copy of all three
        for index in range(3):
            rgb[..., index] = channels[..., _RGBA_BYTES[index]]
        if not (argb >= _OPAQUE).all():
            clear = (255 - channels[..., _RGBA_BYTES[3], None]) / np.float32(255)
            rgb[...] = np.minimum(rgb + np.rint(self._background_rgb * clear), 255)
        return rgb

    def _argb_buffer(self, pixels: int) -> np.ndarray:
        """A uint32 buffer of `pixels`, this thread's own for reads up to _REUSED_PIXELS."""
        if pixels > _REUSED_PIXELS:
            return np.empty(pixels, np.uint32)
        buffer = getattr(self._buffers, "argb", None)
        if buffer is None or len(buffer) < pixels:
            buffer = self._buffers.argb = np.empty(pixels, np.uint32)
        return buffer[:pixels]

    def _rgb(self, image: Image.Image) -> np.ndarray:
        """An RGBA image (an associated image) as RGB, transparent pixels the background.

        PIL drops the alpha band: numpy's copies of an RGBA array's RGB view cost
        about 1 ms per 224-px tile, as much as OpenSlide's read (docs/benchmarks.md).
        """
        if image.getchannel("A").getextrema()[0] == 255:  # all scanned: nothing to fill
            return np.asarray(image.convert("RGB"))
        rgb = Image.new("RGB", image.size, self._background)
        rgb.paste(image, mask=image)  # non-premultiplied alpha marks unscanned areas
        return np.asarray(rgb)

    def thumbnail(self, downsample: float,
                  coarsest: float | None = None) -> tuple[np.ndarray, float]:
        """An RGB overview about `downsample` times smaller than level 0, and its exact downsample.

        Read from the coarsest level whose downsample does not exceed `coarsest`
        (default `downsample`), so a caller content with a coarser overview is
        spared decoding a finer level, then block-averaged by an integer factor
        towards `downsample`, strip by strip, so a slide without a pyramid is
        never held whole. When the file's own overview (OpenSlide's associated
        "thumbnail", as SVS files have) is fine enough and coarser than that
        level, it is resized instead: a single-level slide's level 0 is then
        not decoded at all.
        """
        coarsest = max(downsample, coarsest or downsample)
        level = self.best_level(coarsest)
        level_downsample = self.level_downsamples[level]
        associated = self._associated_thumbnail(downsample, coarsest, level_downsample)
        if associated is not None:
            return associated
        factor = max(1, int(downsample / level_downsample))
        width, height = self.level_dimensions[level]
        rows = max(factor, _STRIP_PIXELS // width // factor * factor)
        strips = []
        for top in range(0, height, rows):
            strip = self.read_rgb((0, round(top * level_downsample)), level,
                                  (width, min(rows, height - top)))
            strips.append(np.asarray(Image.fromarray(strip).reduce(factor)))
        return np.concatenate(strips), factor * level_downsample

    def _associated_thumbnail(self, downsample: float, coarsest: float,
                              level_downsample: float) -> tuple[np.ndarray, float] | None:
        """The file's "thumbnail" image resized to about `downsample`, or None where it is
        missing, does not cover level 0, is coarser than `coarsest`, or is no smaller than
        `level_downsample` (then decoding the level costs about as much)."""
        if level_downsample * 2 > downsample:
            return None
        # one decode: OpenSlide's mapping decodes the image even to answer `in`
        image = self._slide.associated_images.get("thumbnail")
        if image is None:
            return None
        width, height = self.dimensions
        scale_x, scale_y = width / image.width, height / image.height
        # the scanner floors each side: the two scales agree to a pixel unless it is cropped
        if abs(scale_x - scale_y) * min(image.size) > max(scale_x, scale_y) \
                or not level_downsample < scale_x <= coarsest * (1 + _LEVEL_TOLERANCE):
            return None
        size = (max(1, round(width / downsample)), max(1, round(height / downsample)))
        if size[0] > image.width:  # finer than wanted would only add pixels
            size = image.size
        # BOX averages the area each output pixel covers, as the block average above does
        return self._rgb(image.resize(size, Image.Resampling.BOX)), width / size[0]

    def close(self) -> None:
        with self._tiff_lock:
            for tiles in self._tiff_levels.values():
                if tiles is not None:
                    tiles.close()
            self._tiff_levels.clear()
        self._slide.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_slide(path: str | os.PathLike, fallback_mpp: float | None = None) -> Slide:
    """Open a slide; InputError naming the file if OpenSlide can't, or if its mpp is unknown.

    The level-0 mpp is `openslide.mpp-x`; `fallback_mpp` is used only when the
    slide does not state one, or states one no slide can have (see `MAX_SLIDE_MPP`).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: slide file not found")
    try:
        handle = openslide.OpenSlide(path)
    except openslide.OpenSlideError as error:
        raise InputError(f"{path}: OpenSlide cannot open it ({error}); not a supported "
                         "whole-slide format, or the file is truncated") from error
    try:
        return Slide(path, handle, _level0_mpp(handle, path, fallback_mpp))
    except InputError:
        handle.close()
        raise


def _level0_mpp(handle: openslide.OpenSlide, path: Path, fallback_mpp: float | None) -> float:
    """The stated level-0 mpp; `fallback_mpp` when none is stated or the stated one cannot be
    a slide's (coarser than MAX_SLIDE_MPP)."""
    value = handle.properties.get(openslide.PROPERTY_NAME_MPP_X)
    try:
        stated = float(value) if value is not None else None
    except ValueError:
        stated = None
    if stated is not None and stated > MAX_SLIDE_MPP:
        if fallback_mpp is None:
            raise InputError(f"{path}: the slide states {stated:g} µm/px (openslide.mpp-x), "
                             f"coarser than any slide scanner's {MAX_SLIDE_MPP:g} µm/px; this "
                             "is a TIFF's display resolution (72 dpi reads as 352.8 µm/px), not "
                             "the microscope's; set tiling.fallback_mpp to the slide's true "
                             "microns per pixel")
        stated = None
    mpp = stated if stated is not None and stated > 0 else fallback_mpp
    if mpp is None or not mpp > 0:
        raise InputError(f"{path}: the slide states no usable microns per pixel "
                         f"(openslide.mpp-x = {value!r}); set tiling.fallback_mpp")
    return float(mpp)
