"""A quality-control picture per slide: what the tiler saw and what it kept.

The tissue mask's outline and the kept tiles are drawn over the thumbnail the
mask was computed from (as CLAM and TRIDENT show theirs), so a reader sees at
a glance whether the tissue detection missed tissue or kept glass, pen marks
or the slide label. The thumbnail has 8 pixels per tile side, so small slides
or large tiles give a few dozen pixels: the picture is scaled to at least
QC_MIN_SIDE pixels on its shorter side to be readable, and at most QC_MAX_SIDE
on its longer, since the report inlines one per slide.
"""

from __future__ import annotations

import os
import textwrap

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from medrobust.io.atomic import atomic_path

QC_MIN_SIDE = 320
QC_MAX_SIDE = 512
CONTOUR = (0, 200, 0)
TILE_FILL = (0, 90, 255, 50)      # translucent, so the tissue under a tile stays visible
TILE_OUTLINE = (0, 90, 255, 170)


def qc_picture(thumbnail: np.ndarray, mask: np.ndarray, tiles: np.ndarray,
               tile_side: float) -> Image.Image:
    """The thumbnail with the mask's outline and the tiles' squares drawn on it.

    `tiles` are the kept tiles' top-left corners `(n, 2)` (x, y) and `tile_side`
    their side, both in thumbnail pixels.
    """
    height, width = mask.shape
    # the shorter side at least QC_MIN_SIDE, unless that makes the longer exceed QC_MAX_SIDE
    scale = min(max(1.0, QC_MIN_SIDE / min(height, width)), QC_MAX_SIDE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    picture = Image.fromarray(thumbnail).resize(size, Image.Resampling.BILINEAR).convert("RGBA")
    overlay = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for x, y in np.asarray(tiles, dtype=float) * scale:
        draw.rectangle((x, y, x + tile_side * scale - 1, y + tile_side * scale - 1),
                       fill=TILE_FILL, outline=TILE_OUTLINE)
    picture = Image.alpha_composite(picture, overlay).convert("RGB")
    # the outline is traced at the picture's size, so it stays one pixel wide
    small = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
    outline = small & ~ndimage.binary_erosion(small)
    pixels = np.array(picture)
    pixels[outline] = CONTOUR
    return Image.fromarray(pixels)


def left_out_picture(reason: str) -> Image.Image:
    """A small grey card with the reason, in place of the QC picture of a slide left out."""
    lines = textwrap.wrap(f"left out: {reason}", width=60)[:12]
    picture = Image.new("RGB", (QC_MAX_SIDE, 24 + 14 * len(lines)), (225, 225, 225))
    ImageDraw.Draw(picture).multiline_text((10, 10), "\n".join(lines), fill=(120, 0, 0),
                                           spacing=4)
    return picture


def save_png(picture: Image.Image, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
