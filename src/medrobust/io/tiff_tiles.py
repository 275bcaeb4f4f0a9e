"""A slide level stored as a plain mosaic of TIFF tiles, decoded without OpenSlide's compositing.

For a region that starts at a whole pixel of a level, OpenSlide's
`read_region` returns the stored tiles' decoded pixels unchanged, but it
decodes them into premultiplied ARGB and paints them through cairo: on the
tiler's slides that costs about four times the JPEG decode itself (1.7 ms against
0.4 ms per 256-px tile; docs/benchmarks.md, "sixth session: decoding TIFF tiles
directly"). `TiffTileLevel` reads a level's compressed tiles from the file
and decodes them with tifffile's decoder for that page (libjpeg-turbo through
imagecodecs for JPEG), which gives the same pixels. A tile that a region only
partly covers is kept decoded for a while, as OpenSlide's tile cache does:
when tiles of 224 px are cut from a file of 256-px tiles, the neighbouring
region needs the rest of it.

Only levels of the vendors whose levels are such a mosaic (`MOSAIC_VENDORS`)
are read this way; `io/slides.py` checks one tile against OpenSlide before
trusting a level and reads everything else through OpenSlide.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import tifffile

from medrobust.errors import InputError
from medrobust.logs import get_logger

log = get_logger(__name__)
# OpenSlide vendors whose pyramid levels are TIFF pages of non-overlapping tiles in a grid
# (NDPI's restart markers, Ventana's overlapping tiles and Philips' sparse levels are not)
MOSAIC_VENDORS = ("generic-tiff", "aperio")
# decoded tiles kept per level: about 340 of 256 px, two rows of tissue on most slides
CACHE_BYTES = 64 << 20


class TiffTileLevel:
    """The tiles of one TIFF page, read with a lock and decoded by the calling thread."""

    def __init__(self, path: Path, tiff: tifffile.TiffFile, page: tifffile.TiffPage):
        self.path = path
        self.width, self.height = page.imagewidth, page.imagelength
        self.tile_width, self.tile_height = page.tilewidth, page.tilelength
        self.columns = -(-self.width // self.tile_width)
        self._offsets = np.asarray(page.dataoffsets, np.int64)
        self.byte_counts = np.asarray(page.databytecounts, np.int64)
        self._decode = page.decode
        self._tables = page.jpegtables
        self._tiff = tiff
        self._file = open(path, "rb")  # kept open until close()
        self._lock = threading.Lock()  # one file position shared by the reading threads
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()  # least recently used first
        self._cache_lock = threading.Lock()
        self._cache_bytes = 0

    @classmethod
    def open(cls, path: Path, vendor: str | None,
             dimensions: tuple[int, int]) -> "TiffTileLevel | None":
        """The level of `dimensions` if it is one tiled 8-bit RGB page of a mosaic vendor's file,
        else None (read it through OpenSlide)."""
        if vendor not in MOSAIC_VENDORS:
            return None
        try:
            tiff = tifffile.TiffFile(path)
        except (OSError, ValueError, tifffile.TiffFileError) as error:
            log.debug("%s: tifffile cannot parse it (%s); reading through OpenSlide", path, error)
            return None
        pages = [page for page in tiff.pages
                 if isinstance(page, tifffile.TiffPage) and page.is_tiled
                 and (page.imagewidth, page.imagelength) == tuple(dimensions)]
        if len(pages) != 1 or not _plain_rgb(pages[0]):
            tiff.close()
            return None
        return cls(path, tiff, pages[0])

    def covers(self, x: int, y: int, width: int, height: int) -> bool:
        """Whether the region lies inside the level and every tile it needs is stored."""
        if x < 0 or y < 0 or x + width > self.width or y + height > self.height:
            return False
        return bool((self.byte_counts[self._tile_indices(x, y, width, height)] > 0).all())

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """`(height, width, 3)` uint8 of a region that `covers` accepts, at level coordinates."""
        out = np.empty((height, width, 3), np.uint8)
        first_column, first_row = x // self.tile_width, y // self.tile_height
        last_column = (x + width - 1) // self.tile_width
        last_row = (y + height - 1) // self.tile_height
        for row in range(first_row, last_row + 1):
            top = row * self.tile_height
            for column in range(first_column, last_column + 1):
                left = column * self.tile_width
                # the part of this tile inside the region, in tile and in region coordinates
                x0, y0 = max(x, left), max(y, top)
                x1 = min(x + width, left + self.tile_width)
                y1 = min(y + height, top + self.tile_height)
                whole = (x1 - x0, y1 - y0) == (min(self.tile_width, self.width - left),
                                               min(self.tile_height, self.height - top))
                tile = self._tile(row * self.columns + column, keep=not whole)
                out[y0 - y:y1 - y, x0 - x:x1 - x] = tile[y0 - top:y1 - top, x0 - left:x1 - left]
        return out

    def _tile(self, index: int, keep: bool) -> np.ndarray:
        """The decoded tile, from the cache if there; `keep` caches it (a tile used whole is
        not needed again: the tiler's regions do not overlap)."""
        with self._cache_lock:
            tile = self._cache.get(index)
            if tile is not None:
                self._cache.move_to_end(index)
                return tile
        tile = self._decoded(index)
        if keep:
            with self._cache_lock:
                if index not in self._cache:  # another thread may have decoded it too
                    self._cache[index] = tile
                    self._cache_bytes += tile.nbytes
                while self._cache_bytes > CACHE_BYTES:
                    self._cache_bytes -= self._cache.popitem(last=False)[1].nbytes
        return tile

    def _decoded(self, index: int) -> np.ndarray:
        with self._lock:
            self._file.seek(int(self._offsets[index]))
            data = self._file.read(int(self.byte_counts[index]))
        try:
            decoded, _, _ = self._decode(data, index, jpegtables=self._tables)
        # the codecs raise their own error types (imagecodecs.JpegError, zlib.error, ...)
        except Exception as error:
            raise InputError(f"{self.path}: cannot decode tile {index} of the "
                             f"{self.width} x {self.height} level ({error}); the slide file "
                             "is corrupt") from error
        return decoded.reshape(decoded.shape[-3:])

    def _tile_indices(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        columns = np.arange(x // self.tile_width, (x + width - 1) // self.tile_width + 1)
        rows = np.arange(y // self.tile_height, (y + height - 1) // self.tile_height + 1)
        return (rows[:, None] * self.columns + columns[None, :]).ravel()

    def close(self) -> None:
        self._file.close()
        self._tiff.close()


def _plain_rgb(page: tifffile.TiffPage) -> bool:
    """A page of 8-bit RGB (or JPEG's YCbCr) pixels stored side by side, one plane deep."""
    return (page.samplesperpixel == 3 and page.bitspersample == 8
            and page.planarconfig == tifffile.PLANARCONFIG.CONTIG
            and page.imagedepth == 1 and page.tiledepth == 1
            and page.photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR))
