"""Mammograms as a screening classifier sees them: cropped to the breast, all one way round.

The breast is the largest bright connected region after an Otsu threshold,
the lower of a three-class Otsu (background, fatty, dense tissue: a two-class
threshold falls between fatty and dense tissue and crops to the dense part):
the pectoral muscle is brighter still and joined to it, so it stays, while
burned-in labels, film markers and scanner borders are separate regions and
go with the background around the crop. Flipping puts every chest wall on the
image's left (as NYU's screening classifier flips right breasts). The side
comes from the DICOM laterality, read as the standard display hangs it (a left
breast's chest wall on the left, a right breast's on the right); an image
without one is judged by its tissue: the half against the chest wall holds
more of it, the breast thinning towards the nipple.

Everything stays float, so the 12- or 16-bit precision of the DICOM values
reaches the store.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_multiotsu, threshold_otsu

LEFT, RIGHT = "L", "R"


def breast_mask(image: np.ndarray) -> np.ndarray:
    """`(H, W)` bool: the largest connected region brighter than the background threshold,
    holes filled. `image` is `(H, W)` or `(H, W, C)`; an image of one value is all breast."""
    gray = image.mean(axis=-1) if image.ndim == 3 else image
    levels = np.unique(gray)
    if len(levels) == 1:
        return np.ones(gray.shape, dtype=bool)
    # three classes need more than three levels; fewer: background and breast
    threshold = (threshold_multiotsu(gray, classes=3)[0] if len(levels) > 3
                 else threshold_otsu(gray))
    labels, count = ndimage.label(gray > threshold)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0  # the background
    return ndimage.binary_fill_holes(labels == int(sizes.argmax()))


def breast_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of `breast_mask`'s bounding box, bottom and right
    exclusive."""
    rows, cols = np.nonzero(breast_mask(image))
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


def crop_to_breast(image: np.ndarray) -> np.ndarray:
    top, bottom, left, right = breast_box(image)
    return image[top:bottom, left:right]


def chest_wall_side(image: np.ndarray, laterality: str | None) -> str:
    """L (chest wall at the left edge) or R; `laterality` (L or R) when known, else the
    half of the image with more tissue (the larger sum of intensities)."""
    if laterality in (LEFT, RIGHT):
        return laterality
    gray = image.mean(axis=-1) if image.ndim == 3 else image
    half = gray.shape[1] // 2
    left, right = gray[:, :half].sum(), gray[:, gray.shape[1] - half:].sum()
    return LEFT if left >= right else RIGHT


def screening_view(image: np.ndarray, laterality: str | None, crop: bool,
                   uniform_laterality: bool) -> tuple[np.ndarray, tuple[int, int], bool]:
    """`image` cropped to the breast (`crop`) and flipped to put the chest wall on the left
    (`uniform_laterality`); with the crop's (top, left) in `image` and whether it was
    flipped, so that annotations can follow."""
    top, left = 0, 0
    if crop:
        top, bottom, left, right = breast_box(image)
        image = image[top:bottom, left:right]
    flipped = uniform_laterality and chest_wall_side(image, laterality) == RIGHT
    if flipped:
        image = image[:, ::-1]
    return np.ascontiguousarray(image), (top, left), flipped
