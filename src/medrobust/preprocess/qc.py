"""A quality-control picture per slide: what the tiler saw and what it kept.

The tissue mask's outline and the kept tiles are drawn over the thumbnail the
mask was computed from (as CLAM and TRIDENT show theirs), so a reader sees at
a glance whether the tissue detection missed tissue or kept glass, pen marks
or the slide label. The thumbnail has `tiling.mask_pixels_per_tile` pixels
per tile side (4 by default), so small slides or large tiles give a few
dozen pixels: the picture is scaled to at least
QC_MIN_SIDE pixels on its shorter side to be readable, and at most QC_MAX_SIDE
on its longer, since the report inlines one per slide.

The attention heatmap of a slide classifier (evaluate/heatmaps.py) is drawn
with these helpers on a thumbnail of the same slide at the same scale, with the same
tile squares, so the two pictures of a slide line up.
"""

from __future__ import annotations

import io
import os
import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from medrobust.io.atomic import atomic_path

QC_MIN_SIDE = 320
QC_MAX_SIDE = 512
CONTOUR = (0, 200, 0)
TILE_FILL = (0, 90, 255, 50)      # translucent, so the tissue under a tile stays visible
TILE_OUTLINE = (0, 90, 255, 170)


def picture_scale(height: int, width: int) -> float:
    """How much a thumbnail of this size is enlarged (or shrunk) for a readable picture: the
    shorter side at least QC_MIN_SIDE, unless that makes the longer exceed QC_MAX_SIDE."""
    return min(max(1.0, QC_MIN_SIDE / min(height, width)), QC_MAX_SIDE / max(height, width))


def slide_canvas(thumbnail: np.ndarray) -> tuple[Image.Image, float]:
    """The thumbnail at picture size (RGBA, for overlays) and the scale it was drawn at."""
    height, width = thumbnail.shape[:2]
    scale = picture_scale(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return Image.fromarray(thumbnail).resize(size, Image.Resampling.BILINEAR).convert("RGBA"), scale


def tile_squares(size: tuple[int, int], tiles: np.ndarray, tile_side: float, scale: float,
                 fills: Sequence[tuple[int, ...]], outline: tuple[int, ...] | None = None,
                 ) -> Image.Image:
    """A transparent overlay with each tile's square in its fill colour.

    `tiles` are top-left corners `(n, 2)` (x, y) and `tile_side` their side, both in
    thumbnail pixels; `scale` maps thumbnail pixels to the picture's.
    """
    overlay = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for (x, y), fill in zip(np.asarray(tiles, dtype=float) * scale, fills):
        draw.rectangle((x, y, x + tile_side * scale - 1, y + tile_side * scale - 1),
                       fill=fill, outline=outline)
    return overlay


def draw_outline(picture: Image.Image, mask: np.ndarray, colour: tuple[int, int, int],
                 ) -> Image.Image:
    """`picture` (RGB) with the outline of a boolean mask that covers the same area."""
    # the outline is traced at the picture's size, so it stays one pixel wide
    small = np.asarray(Image.fromarray(mask).resize(picture.size, Image.Resampling.NEAREST))
    outline = small & ~ndimage.binary_erosion(small)
    pixels = np.array(picture)
    pixels[outline] = colour
    return Image.fromarray(pixels)


def qc_picture(thumbnail: np.ndarray, mask: np.ndarray, tiles: np.ndarray,
               tile_side: float) -> Image.Image:
    """The thumbnail with the mask's outline and the tiles' squares drawn on it.

    `tiles` are the kept tiles' top-left corners `(n, 2)` (x, y) and `tile_side`
    their side, both in thumbnail pixels.
    """
    picture, scale = slide_canvas(thumbnail)
    overlay = tile_squares(picture.size, tiles, tile_side, scale,
                           [TILE_FILL] * len(tiles), TILE_OUTLINE)
    return draw_outline(Image.alpha_composite(picture, overlay).convert("RGB"), mask, CONTOUR)


def left_out_picture(reason: str) -> Image.Image:
    """A small grey card with the reason, in place of the QC picture of a slide left out."""
    lines = textwrap.wrap(f"left out: {reason}", width=60)[:12]
    picture = Image.new("RGB", (QC_MAX_SIDE, 24 + 14 * len(lines)), (225, 225, 225))
    ImageDraw.Draw(picture).multiline_text((10, 10), "\n".join(lines), fill=(120, 0, 0),
                                           spacing=4)
    return picture


def png_bytes(picture: Image.Image) -> bytes:
    """The picture as a PNG file's bytes, at zlib's fastest level: 6 ms instead of 22 (PIL's
    default level, 6) for the CMU slide's picture, which took a third of the tiling job
    (docs/benchmarks.md). The file is 20 % larger, and so is the report, which inlines
    some. The tiler encodes it in its writer thread, between the store's writes."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def save_png(png: bytes, path: str | os.PathLike) -> None:
    """Write `png_bytes`' output to `path`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
