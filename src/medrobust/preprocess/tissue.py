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
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu
from skimage.morphology import closing, disk, opening

MIN_SATURATION = 0.05   # below: glass, whatever Otsu says
MAX_SATURATION = 0.15   # above: tissue, whatever Otsu says


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean `(H, W)` mask of tissue in an RGB uint8 thumbnail."""
    saturation = ndimage.median_filter(rgb2hsv(rgb)[..., 1], size=3)  # drops speckle
    if np.ptp(saturation) > 0:
        threshold = float(np.clip(threshold_otsu(saturation), MIN_SATURATION, MAX_SATURATION))
    else:
        threshold = MIN_SATURATION
    mask = saturation > threshold
    # close small gaps inside tissue, then drop isolated specks (dust, debris);
    # reflecting at the border keeps tissue that touches the edge
    return opening(closing(mask, disk(2)), disk(1))
