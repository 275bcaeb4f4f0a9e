"""Microcalcification visibility under Fourier low-pass filtering (Oleszkiewicz et al., 2020).

The study's argument: a low-pass filter erases microcalcifications (specks a
few pixels wide) long before it erases masses, so a mammography model that
is invariant to low-pass filtering has stopped looking at calcifications.
This module measures both halves on the test images of a dataset with lesion
annotations (`medrobust.data.lesions`), at every low-pass radius of the config:

- per lesion, on the store's image after `LowPass(radius)`: the
  contrast-to-noise ratio `(mean(lesion) - mean(ring)) / std(ring)` and
  whether it is *detectable*, `max(lesion) > mean(ring) + k * std(ring)`.
  The ring is the background around the lesion: pixels more than `RING_GAP`
  and at most `RING_GAP + ring_width` pixels from it, other lesions excluded;
- per model, the sensitivity on malignant images whose lesions are all
  calcifications and on those whose lesions are all masses, read from the
  evaluation's per-image predictions under the same low-pass conditions.

Masks are brought to the store's grid by each image's `geometry` attr, the
transform the preprocessing applied (breast crop, laterality flip, padding
and scale), so they land on the pixels the model sees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from medrobust.config import config_from_mapping
from medrobust.data.lesions import LesionMask, read_lesion_masks
from medrobust.errors import InputError
from medrobust.evaluate.metrics import read_evaluation
from medrobust.evaluate.statistics import clopper_pearson, proportion_interval
from medrobust.io.atomic import atomic_path
from medrobust.io.image_store import open_image_store
from medrobust.logs import get_logger
from medrobust.perturbations.fourier import LowPass
from medrobust.preprocess import positive_number

log = get_logger(__name__)

PERTURBATION = "lowpass"
RING_GAP = 1.0   # pixels next to the lesion carry its own edge (resampling blur): not background
CLEAN = "clean"
GROUPS = {"calcification": "calcification only", "mass": "mass only"}
FILES = {"lesions": "lesions.csv", "visibility": "visibility.csv",
         "sensitivity": "sensitivity.csv", "crops": "crops.npz"}
CROP_MIN = 16    # pixels at the store's resolution


@dataclass(frozen=True)
class LesionVisibilityConfig:
    k: float = 3.0            # detectable: peak above the ring mean by k ring standard deviations
    ring_width: int = 3       # pixels at the store's resolution

    def __post_init__(self) -> None:
        positive_number(self.k, "lesion_visibility.k")
        positive_number(self.ring_width, "lesion_visibility.ring_width", integer=True)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "LesionVisibilityConfig":
        return config_from_mapping(cls, mapping, "lesion_visibility")


@dataclass(frozen=True)
class StoreLesion:
    """A lesion on the store's grid: which test image, its type and its mask there."""

    index: int          # position of the image among the analysed (test) images
    sample_id: str
    lesion_type: str
    mask: np.ndarray    # bool (height, width) of the stored image


# ---------------------------------------------------------------------------
# masks at the store's resolution

def to_store_grid(lesions: Iterable[LesionMask], positions: Mapping[str, int],
                  geometry: Mapping[str, Sequence[float]],
                  shape: tuple[int, int]) -> list[StoreLesion]:
    """Each raw mask on the store's grid, through its image's own `geometry` attr
    (`[sx, tx, sy, ty]`, written by the preprocessing: breast crop, flip, padding and
    scale), kept where it covers at least half as much of a store pixel as at its peak.

    Half the peak coverage, not half a pixel: a speck narrower than a store pixel
    covers less than half of it but still marks the pixel it fell on. Lesions the
    breast crop cut away are left out (and counted in the log).
    """
    found, outside = [], 0
    for lesion in lesions:
        sx, tx, sy, ty = (float(value) for value in geometry[lesion.sample_id])
        ys, xs = np.nonzero(lesion.mask)
        rows = np.floor(sy * (ys + 0.5) + ty).astype(np.int64)   # pixel centres
        cols = np.floor(sx * (xs + 0.5) + tx).astype(np.int64)
        inside = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
        if not inside.any():
            outside += 1
            continue
        coverage = np.zeros(shape, np.float64)
        np.add.at(coverage, (rows[inside], cols[inside]), 1.0)
        found.append(StoreLesion(positions[lesion.sample_id], lesion.sample_id,
                                 lesion.lesion_type, coverage >= 0.5 * coverage.max()))
    if outside:
        log.warning("%d lesion(s) lie outside the stored images (cut by the breast crop)", outside)
    return found


def ring_mask(mask: np.ndarray, exclude: np.ndarray, width: int) -> np.ndarray:
    """Background around `mask`: distance in (RING_GAP, RING_GAP + width], outside `exclude`."""
    distance = ndimage.distance_transform_edt(~mask)
    return (distance > RING_GAP) & (distance <= RING_GAP + width) & ~exclude


def lesion_contrast(image: np.ndarray, mask: np.ndarray, ring: np.ndarray,
                    k: float) -> tuple[float, bool]:
    """(contrast-to-noise ratio, detectable) of one lesion on one (H, W) image."""
    background = image[ring].astype(np.float64)
    if background.size < 2:
        raise InputError("a lesion has fewer than 2 background pixels around it; "
                         "the ring lies outside the image")
    mean, spread = background.mean(), background.std()
    lesion = image[mask].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        cnr = float((lesion.mean() - mean) / spread)
    return cnr, bool(lesion.max() > mean + k * spread)


def measure_lesions(images: np.ndarray, lesions: Sequence[StoreLesion], level: str,
                    config: LesionVisibilityConfig) -> pd.DataFrame:
    """One row per lesion: its CNR and detectability on `images` (store order, (N, H, W))."""
    union: dict[int, np.ndarray] = {}
    for lesion in lesions:
        union[lesion.index] = union.get(lesion.index, False) | lesion.mask
    rows = []
    for lesion_id, lesion in enumerate(lesions):
        ring = ring_mask(lesion.mask, union[lesion.index], config.ring_width)
        cnr, detectable = lesion_contrast(images[lesion.index], lesion.mask, ring, config.k)
        rows.append({"sample_id": lesion.sample_id, "lesion_id": lesion_id,
                     "lesion_type": lesion.lesion_type, "level": level, "cnr": cnr,
                     "detectable": detectable})
    return pd.DataFrame(rows)


def visibility_table(measures: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """Per (level, lesion type): lesions and the images they lie in, mean and median CNR,
    detectable fraction with its interval; lesions of one image are not independent
    (one image's contrast and noise are every speck's), so the interval counts images
    (`statistics.proportion_interval`: Korn and Graubard's where an image holds several,
    exact binomial where each holds one)."""
    rows = []
    for (level, lesion_type), group in measures.groupby(["level", "lesion_type"], sort=False):
        detected = proportion_interval(group["detectable"].to_numpy(dtype=bool), confidence,
                                       group["sample_id"].to_numpy())
        finite = group["cnr"][np.isfinite(group["cnr"])]
        rows.append({"level": level, "lesion_type": lesion_type, "n_lesions": len(group),
                     "n_images": group["sample_id"].nunique(),
                     "cnr_mean": finite.mean(), "cnr_median": finite.median(),
                     "detectable": detected.estimate, "detectable_low": detected.low,
                     "detectable_high": detected.high})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------
# the model's sensitivity per lesion group

def lesion_groups(lesions: Sequence[StoreLesion]) -> dict[str, str]:
    """Sample id -> "calcification only" / "mass only" (images with both are in neither)."""
    types: dict[str, set[str]] = {}
    for lesion in lesions:
        types.setdefault(lesion.sample_id, set()).add(lesion.lesion_type)
    return {sample: GROUPS[next(iter(kinds))] for sample, kinds in types.items()
            if len(kinds) == 1}


def sensitivity_table(evaluations: Sequence[Mapping[str, Any]], groups: Mapping[str, str],
                      positive: int, confidence: float) -> pd.DataFrame:
    """Per (model, level, group): positives, those predicted positive, sensitivity and interval.

    `evaluations`: records with `model`, `level`, and the evaluation's `metrics` and
    `predictions` files (read and checked by `read_evaluation`).
    """
    rows = []
    for record in evaluations:
        evaluation = read_evaluation(record["metrics"], record["predictions"])
        positives = evaluation.labels == positive
        group_of = np.array([groups.get(sample) for sample in evaluation.sample_ids[positives]])
        found_positive = evaluation.probabilities[positives].argmax(axis=1) == positive
        for group in GROUPS.values():
            members = group_of == group
            found = clopper_pearson(int(found_positive[members].sum()), int(members.sum()),
                                    confidence)
            rows.append({"model": record["model"], "level": record["level"], "group": group,
                         "n_positives": int(members.sum()), "sensitivity": found.estimate,
                         "sensitivity_low": found.low, "sensitivity_high": found.high})
    return pd.DataFrame(rows, columns=["model", "level", "group", "n_positives", "sensitivity",
                                       "sensitivity_low", "sensitivity_high"])


# ---------------------------------------------------------------------------
# crops for the report: one calcification cluster and one mass at every level

def crop_window(masks: Sequence[np.ndarray], shape: tuple[int, int]) -> tuple[slice, slice]:
    """A square around the masks' bounding box, three times its extent (at least CROP_MIN),
    inside an image of `shape` (height, width)."""
    ys, xs = np.nonzero(np.logical_or.reduce(masks))
    extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    side = int(min(*shape, max(CROP_MIN, 3 * extent)))
    centre_y, centre_x = (ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2
    top = int(np.clip(centre_y - side // 2, 0, shape[0] - side))
    left = int(np.clip(centre_x - side // 2, 0, shape[1] - side))
    return slice(top, top + side), slice(left, left + side)


def example_lesions(lesions: Sequence[StoreLesion],
                    groups: Mapping[str, str]) -> dict[str, tuple[int, str, list[np.ndarray]]]:
    """Per lesion type: (store index, sample id, masks) of the first image with only that type."""
    chosen = {}
    for lesion_type, group in GROUPS.items():
        sample = next((lesion.sample_id for lesion in lesions
                       if groups.get(lesion.sample_id) == group), None)
        if sample is not None:
            members = [lesion for lesion in lesions if lesion.sample_id == sample]
            chosen[lesion_type] = (members[0].index, sample, [m.mask for m in members])
    return chosen


# ---------------------------------------------------------------------------

def lowpass_levels(radii: Sequence[float]) -> list[tuple[str, float | None]]:
    """(level name, radius) for the clean images and each radius, largest (mildest) first."""
    return [(CLEAN, None)] + [(f"{PERTURBATION}-{radius:g}", float(radius))
                              for radius in sorted(radii, reverse=True)]


def lesion_visibility_run(dataset_dir: str | os.PathLike, store_path: str | os.PathLike,
                          out_dir: str | os.PathLike, radii: Sequence[float],
                          evaluations: Sequence[Mapping[str, Any]],
                          settings: Mapping[str, Any], confidence: float) -> None:
    """Write `FILES` into `out_dir` (at once) for the test split of one dataset.

    `evaluations`: each model's `clean` and low-pass records (`model`,
    `severity` (None for clean), `predictions`).
    """
    config = LesionVisibilityConfig.from_mapping(settings)
    store = open_image_store(store_path)
    index = store.indices("test")
    sample_ids = [str(sample) for sample in store.sample_ids[index]]
    positions = {sample: position for position, sample in enumerate(sample_ids)}
    images = _grey(store.read(index))
    lesions = to_store_grid(read_lesion_masks(dataset_dir, sample_ids), positions,
                            store.attrs["geometry"], images.shape[-2:])
    if not lesions:
        raise InputError(f"{dataset_dir}: no lesion on the test images of {store.path}")
    levels = lowpass_levels(radii)
    filtered = {name: images if radius is None else LowPass(radius)(images, None)
                for name, radius in levels}
    measures = pd.concat([measure_lesions(filtered[name][:, 0], lesions, name, config)
                          for name, _ in levels], ignore_index=True)
    measures["radius"] = measures["level"].map(dict(levels))
    visibility = visibility_table(measures, confidence)
    visibility.insert(1, "radius", visibility["level"].map(dict(levels)))
    groups = lesion_groups(lesions)
    level_of = {radius: name for name, radius in levels}
    records = [{"model": r["model"], "level": level_of[None if r["severity"] is None
                                                         else float(r["severity"])],
                "metrics": r["metrics"], "predictions": r["predictions"]} for r in evaluations]
    sensitivity = sensitivity_table(records, groups, positive=len(store.classes) - 1,
                                    confidence=confidence)
    sensitivity.insert(2, "radius", sensitivity["level"].map(dict(levels)))
    crops = {}
    for lesion_type, (position, sample, masks) in example_lesions(lesions, groups).items():
        rows, cols = crop_window(masks, images.shape[-2:])
        crops[lesion_type] = np.stack([filtered[name][position, 0, rows, cols]
                                       for name, _ in levels])
        crops[f"{lesion_type}_sample"] = np.array(sample)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        measures.to_csv(tmp / FILES["lesions"], index=False)
        visibility.to_csv(tmp / FILES["visibility"], index=False)
        sensitivity.to_csv(tmp / FILES["sensitivity"], index=False)
        np.savez_compressed(tmp / FILES["crops"], radii=np.array([np.inf if r is None else r for _, r in levels]),
                            image_shape=images.shape[-2:], **crops)
    log.info("%s: %d lesions on %d test images, %d low-pass radii", store.path, len(lesions),
             len(groups), len(radii))


def _grey(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) as (N, 1, H, W): RGB is averaged (lesions are a matter of intensity)."""
    return images if images.shape[1] == 1 else images.mean(axis=1, keepdims=True)
