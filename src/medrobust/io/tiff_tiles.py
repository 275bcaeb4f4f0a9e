"""A slide level stored as a plain mosaic of TIFF tiles, decoded without OpenSlide's compositing.

For a region that starts at a whole pixel of a level, OpenSlide's
`read_region` returns the stored tiles' decoded pixels unchanged, but it
decodes them into premultiplied ARGB and paints them through cairo: on the
tiler's slides `read_region` costs about four times the JPEG decode itself
(1.7 ms against 0.4 ms per 256-px tile; docs/benchmarks.md, "sixth session:
decoding TIFF tiles directly"). `TiffTileLevel` reads a level's compressed
tiles from the file and decodes them itself, which gives the same pixels:
JPEG tiles with libjpeg-turbo through simplejpeg, in the colour space the
page's photometric tag states, as OpenSlide does (the tile's own JFIF or
Adobe segment is replaced), and in strict mode: a tile libjpeg warns about
(a premature end, a bad Huffman code) is read through OpenSlide instead,
which raises where it is corrupt and reads it where libjpeg's final checks
alone complained (imagecodecs, under tifffile's decoder, returns damaged
pixels without an error); deflate, LZW and uncompressed tiles with tifffile's
decoder. A tile that a region only partly covers is kept decoded
for a while, as OpenSlide's tile cache does: when tiles of 224 px are cut
from a file of 256-px tiles, the neighbouring region needs the rest of it.

Only levels of the vendors whose levels are such a mosaic (`MOSAIC_VENDORS`)
are read this way; `io/slides.py` checks one tile against OpenSlide before
trusting a level and reads everything else through OpenSlide.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np
import simplejpeg
import tifffile

from medrobust.errors import InputError
from medrobust.io.file_reads import read_at
from medrobust.logs import get_logger

log = get_logger(__name__)
# OpenSlide vendors whose pyramid levels are TIFF pages of non-overlapping tiles in a grid
# (NDPI's restart markers, Ventana's overlapping tiles and Philips' sparse levels are not)
MOSAIC_VENDORS = ("generic-tiff", "aperio")
# decoded tiles kept per level: about 340 of 256 px, two rows of tissue on most slides
CACHE_BYTES = 64 << 20
JPEG = tifffile.COMPRESSION.JPEG
# what is decoded here; JPEG 2000 (Aperio's 33003 and 33005) is left to OpenSlide
COMPRESSIONS = (tifffile.COMPRESSION.NONE, tifffile.COMPRESSION.LZW, JPEG,
                tifffile.COMPRESSION.ADOBE_DEFLATE, tifffile.COMPRESSION.DEFLATE)
_SOI, _EOI, _SOS = b"\xff\xd8", b"\xff\xd9", 0xDA
# frame headers: SOF0-SOF15 less DHT (C4), JPG (C8) and DAC (CC)
_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# JFIF (APP0) and Adobe (APP14) segments decide the colour space libjpeg reads: OpenSlide takes
# it from the page's photometric tag instead, so they are replaced by one Adobe segment saying
# what the tag says (transform 0: RGB as stored, as Aperio's tiles are; 1: YCbCr)
_COLOUR_SEGMENTS = (0xE0, 0xEE)
_ADOBE = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00"


class TiffTileLevel:
    """The tiles of one TIFF page, read (`read_at`: no shared file position) and decoded by
    the calling thread."""

    def __init__(self, path: Path, page: tifffile.TiffPage):
        self.path = path
        self.width, self.height = page.imagewidth, page.imagelength
        self.tile_width, self.tile_height = page.tilewidth, page.tilelength
        self.columns = -(-self.width // self.tile_width)
        self._offsets = np.asarray(page.dataoffsets, np.int64)
        self.byte_counts = np.asarray(page.databytecounts, np.int64)
        self._all_stored = bool((self.byte_counts > 0).all())  # spares `covers` a lookup
        self._decode = page.decode
        self._jpeg_header = _jpeg_header(page) if page.compression == JPEG else None
        self._buffers = threading.local()  # a decoded tile's pixels, each thread its own
        self._fd = os.open(path, os.O_RDONLY)  # kept open until close() or garbage collection
        self._close_fd = weakref.finalize(self, os.close, self._fd)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()  # least recently used first
        self._cache_lock = threading.Lock()
        self._cache_bytes = 0

    @classmethod
    def open(cls, path: Path, vendor: str | None,
             dimensions: tuple[int, int]) -> "TiffTileLevel | None":
        """The level of `dimensions` if it is one tiled 8-bit RGB page of a mosaic vendor's file
        that can be decoded here, else None (read it through OpenSlide)."""
        if vendor not in MOSAIC_VENDORS:
            return None
        try:
            tiff = tifffile.TiffFile(path)
        except Exception as error:  # tifffile raises many kinds on a damaged file
            log.debug("%s: tifffile cannot parse it (%s); reading through OpenSlide", path, error)
            return None
        with tiff:  # the level keeps what it needs: its decoder does not use the TiffFile
            try:
                tiled = [page for page in tiff.pages
                         if isinstance(page, tifffile.TiffPage) and page.is_tiled]
                level = [page for page in tiled
                         if (page.imagewidth, page.imagelength) == tuple(dimensions)]
                # OpenSlide's Aperio reader draws a level's tile from the finer level instead
                # where a finer level lacks the tile's data, which a stored tile cannot show
                finer_missing = vendor == "aperio" and any(
                    page.imagewidth > dimensions[0] and 0 in page.databytecounts
                    for page in tiled)
                if len(level) == 1 and _decodable(level[0]) and not finer_missing:
                    return cls(path, level[0])
            except Exception as error:  # a damaged tag: OpenSlide decides what the file holds
                log.debug("%s: tifffile cannot read its levels (%s); reading through OpenSlide",
                          path, error)
        return None

    def covers(self, x: int, y: int, width: int, height: int) -> bool:
        """Whether the region lies inside the level and every tile it needs is stored."""
        if x < 0 or y < 0 or x + width > self.width or y + height > self.height:
            return False
        return self._all_stored or bool(
            (self.byte_counts[self._tile_indices(x, y, width, height)] > 0).all())

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
        not needed again: the tiler's regions do not overlap, so it is decoded into this
        thread's buffer, sparing a fresh array's page faults)."""
        with self._cache_lock:
            tile = self._cache.get(index)
            if tile is not None:
                self._cache.move_to_end(index)
                return tile
        tile = self._decoded(index, out=None if keep else self._buffer())
        if keep:
            with self._cache_lock:
                if index not in self._cache:  # another thread may have decoded it too
                    self._cache[index] = tile
                    self._cache_bytes += tile.nbytes
                while self._cache_bytes > CACHE_BYTES:
                    self._cache_bytes -= self._cache.popitem(last=False)[1].nbytes
        return tile

    def _buffer(self) -> np.ndarray:
        buffer = getattr(self._buffers, "tile", None)
        if buffer is None:
            buffer = self._buffers.tile = np.empty(
                (self.tile_height, self.tile_width, 3), np.uint8)
        return buffer

    def _decoded(self, index: int, out: np.ndarray | None) -> np.ndarray:
        """Tile `index` decoded, `(tile_height, tile_width, 3)`, into `out` if given; an
        InputError naming the file if its data is short or corrupt."""
        count = int(self.byte_counts[index])
        data = read_at(self._fd, count, int(self._offsets[index]))
        try:
            if len(data) < count:
                raise ValueError(f"the file ends {count - len(data)} bytes into the tile")
            if self._jpeg_header is None:
                decoded, _, _ = self._decode(data, index)
                decoded = decoded.reshape(decoded.shape[-3:])
            elif data[:2] != _SOI:
                raise ValueError("the tile's data is not a JPEG stream")
            else:  # strict: libjpeg's warnings (premature end, bad Huffman code) are errors
                segments, scan = _marker_segments(data, 2)
                stream = b"".join((self._jpeg_header, _colour_free(data, segments),
                                   memoryview(data)[scan:]))  # one copy of the scan
                decoded = simplejpeg.decode_jpeg(stream, colorspace="RGB", strict=True,
                                                 buffer=out)
            if decoded.shape != (self.tile_height, self.tile_width, 3):
                raise ValueError(f"it decodes to {decoded.shape[1]} x {decoded.shape[0]} "
                                 f"pixels, not the level's {self.tile_width} x "
                                 f"{self.tile_height}")
        # the codecs raise their own error types (ValueError, zlib.error, ...)
        except Exception as error:
            raise InputError(f"{self.path}: cannot decode tile {index} of the "
                             f"{self.width} x {self.height} level ({error}); the slide file "
                             "is corrupt") from error
        return decoded

    def _tile_indices(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        columns = np.arange(x // self.tile_width, (x + width - 1) // self.tile_width + 1)
        rows = np.arange(y // self.tile_height, (y + height - 1) // self.tile_height + 1)
        return (rows[:, None] * self.columns + columns[None, :]).ravel()

    def close(self) -> None:
        """Close the file (once: its descriptor's number may be another file's afterwards)."""
        self._fd = -1  # a read after close fails (EBADF) rather than read another file
        self._close_fd()
        with self._cache_lock:
            self._cache.clear()


def _decodable(page: tifffile.TiffPage) -> bool:
    """A page of 8-bit RGB pixels side by side (YCbCr only inside JPEG, whose decoder converts
    it), one plane deep, in a grid of as many tiles as stored, compressed as decoded here."""
    columns = -(-page.imagewidth // page.tilewidth) if page.tilewidth else 0
    rows = -(-page.imagelength // page.tilelength) if page.tilelength else 0
    colour = (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR) \
        if page.compression == JPEG else (tifffile.PHOTOMETRIC.RGB,)
    return (page.samplesperpixel == 3 and page.bitspersample == 8
            and page.planarconfig == tifffile.PLANARCONFIG.CONTIG
            and page.imagedepth == 1 and page.tiledepth == 1
            and page.compression in COMPRESSIONS and page.photometric in colour
            and columns * rows > 0
            and len(page.dataoffsets) == len(page.databytecounts) == columns * rows)


def _jpeg_header(page: tifffile.TiffPage) -> bytes:
    """What goes before a tile's own segments to make a whole JPEG stream: the start marker,
    the Adobe segment for the page's photometric, and the page's shared tables if any."""
    transform = b"\x01" if page.photometric == tifffile.PHOTOMETRIC.YCBCR else b"\x00"
    tables = page.jpegtables or b""
    if tables and (tables[:2] != _SOI or tables[-2:] != _EOI):
        raise ValueError("its JPEGTables are not a JPEG tables stream")
    tables = tables[:-2]
    return _SOI + _ADOBE + transform + _colour_free(tables, _marker_segments(tables, 2)[0])


def _marker_segments(stream: bytes, position: int) -> tuple[list[tuple[int, int, int]], int]:
    """(marker, start, end) of each marker segment from `position` to the start of scan or the
    stream's end, and where that is; ValueError if they are not well formed or a frame header
    states other than 3 components (OpenSlide refuses a grey tile in an RGB page)."""
    segments = []
    while position < len(stream):
        if position + 4 > len(stream) or stream[position] != 0xFF:
            raise ValueError("its JPEG marker segments are not well formed")
        marker = stream[position + 1]
        if marker == _SOS:
            break
        end = position + 2 + int.from_bytes(stream[position + 2:position + 4], "big")
        if marker in _FRAMES and (end > len(stream) or stream[position + 9] != 3):
            raise ValueError("its JPEG frame is not of 3 components")
        segments.append((marker, position, end))
        position = end
    return segments, position


def _colour_free(stream: bytes, segments: list[tuple[int, int, int]]) -> bytes:
    """The segments less the JFIF and Adobe ones."""
    return b"".join(stream[start:end] for marker, start, end in segments
                    if marker not in _COLOUR_SEGMENTS)
