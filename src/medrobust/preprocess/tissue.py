"""Where the tissue is, from a slide thumbnail.

Glass in an H&E slide is bright and almost grey, stained tissue is pink to
purple: saturation separates them better than brightness, which fat and
faint stroma share with glass. Otsu picks the threshold per slide; it is
kept between two bounds because on a blank slide Otsu splits noise, and on a
slide covered in tissue it splits pale from dark tissue.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import disk

MIN_SATURATION = 0.05   # below: glass, whatever Otsu says
MAX_SATURATION = 0.15   # above: tissue, whatever Otsu says


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean `(H, W)` mask of tissue in an RGB uint8 thumbnail."""
    saturation = ndimage.median_filter(hsv_saturation(rgb), size=3)  # drops speckle
    if np.ptp(saturation) > 0:
        threshold = float(np.clip(threshold_otsu(saturation), MIN_SATURATION, MAX_SATURATION))
    else:
        threshold = MIN_SATURATION
    mask = saturation > threshold
    # close small gaps inside tissue, then drop isolated specks (dust, debris): skimage's
    # closing with disk(2), then opening with disk(1)
    closed = _disk_filter(_disk_filter(mask, 2, np.logical_or), 2, np.logical_and)
    return _disk_filter(_disk_filter(closed, 1, np.logical_and), 1, np.logical_or)


def _disk_filter(mask: np.ndarray, radius: int, combine) -> np.ndarray:
    """Binary dilation (`combine` logical_or) or erosion (logical_and) of `mask` by skimage's
    `disk(radius)`, the border reflected as skimage's morphology reflects it (its default), so
    the result is skimage's; combining the mask's shifted views is 18x faster than skimage's
    grey-level filters on a 900^2 mask (docs/benchmarks.md)."""
    height, width = mask.shape
    padded = np.pad(mask, radius, mode="symmetric")  # numpy's "symmetric" is scipy's "reflect"
    out = None
    for dy, dx in zip(*np.nonzero(disk(radius))):
        view = padded[dy:dy + height, dx:dx + width]
        out = view.copy() if out is None else combine(out, view, out=out)
    return out


def hsv_saturation(rgb: np.ndarray) -> np.ndarray:
    """rgb2hsv's saturation `(max - min) / max` (0 where black) of RGB uint8, without the hue
    and the float copy of the whole image that took 8 of the 11 s a 3,125^2 mask cost
    (docs/benchmarks.md). The float steps are skimage's, so the values are identical."""
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # elementwise over the channels: numpy's reduction along a length-3 axis is 10x slower
    brightest = np.maximum(np.maximum(red, green), blue) * (1 / 255)
    spread = brightest - np.minimum(np.minimum(red, green), blue) * (1 / 255)
    return np.divide(spread, brightest, out=np.zeros_like(spread), where=brightest > 0)
