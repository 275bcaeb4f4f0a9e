"""A slide classifier's attention drawn over the slide, as CLAM and TRIDENT show theirs.

The thumbnail, its scale and the tile squares are the QC picture's
(preprocess/qc.py), so a slide's heatmap lines up with its QC picture.
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

from medrobust.preprocess.qc import draw_outline, slide_canvas, tile_squares

HEATMAP_COLOURMAP = "inferno"
HEATMAP_ALPHA = 170               # of 255: the colour dominates, the tissue still shows through
TUMOUR_CONTOUR = (0, 220, 255)    # cyan: absent from the colour map
COLOUR_BAR_WIDTH = 56


def normalise_per_slide(values: np.ndarray) -> np.ndarray:
    """Values scaled to [0, 1] within one slide (min to max); all equal gives 0.5."""
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return values
    low, high = values.min(), values.max()
    return np.full_like(values, 0.5) if high == low else (values - low) / (high - low)


def heatmap_colours(levels: np.ndarray) -> np.ndarray:
    """RGB uint8 `(n, 3)` of levels in [0, 1] on HEATMAP_COLOURMAP."""
    return (colormaps[HEATMAP_COLOURMAP](np.asarray(levels))[:, :3] * 255).round().astype(np.uint8)


def attention_heatmap(thumbnail: np.ndarray, tiles: np.ndarray, tile_side: float,
                      attention: np.ndarray, tumour_mask: np.ndarray | None = None,
                      ) -> Image.Image:
    """The thumbnail with each tile coloured in place by its attention, and a colour bar.

    Attention is normalised per slide (its lowest tile gets the colour map's
    bottom, its highest the top); `tiles` and `tile_side` are in thumbnail
    pixels as for `qc_picture`. `tumour_mask`, covering the same area as the
    thumbnail at any resolution, is outlined in TUMOUR_CONTOUR.
    """
    picture, scale = slide_canvas(thumbnail)
    fills = [(*colour, HEATMAP_ALPHA)
             for colour in heatmap_colours(normalise_per_slide(attention)).tolist()]
    picture = Image.alpha_composite(picture, tile_squares(picture.size, tiles, tile_side, scale,
                                                          fills)).convert("RGB")
    if tumour_mask is not None:
        picture = draw_outline(picture, tumour_mask, TUMOUR_CONTOUR)
    return _with_colour_bar(picture)


def _with_colour_bar(picture: Image.Image) -> Image.Image:
    """The picture with a vertical colour bar on its right, top = highest attention."""
    width, height = picture.size
    bar_height = max(16, height - 40)
    gradient = heatmap_colours(np.linspace(1, 0, bar_height))
    out = Image.new("RGB", (width + COLOUR_BAR_WIDTH, height), (255, 255, 255))
    out.paste(picture, (0, 0))
    bar = np.repeat(gradient[:, None, :], 12, axis=1)
    top = (height - bar_height) // 2
    out.paste(Image.fromarray(bar), (width + 8, top))
    draw = ImageDraw.Draw(out)
    draw.text((width + 24, top), "high", fill=(0, 0, 0))
    draw.text((width + 24, top + bar_height - 10), "low", fill=(0, 0, 0))
    return out
