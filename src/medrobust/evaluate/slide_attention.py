"""Where a slide classifier looks, and whether its decision rests on a few tiles.

For one saved slide classifier and its test slides (docs/mil.md, "Attention"):

- per-tile attention (the weight the model's forward gives each tile of the
  full bag: ABMIL's softmax weights, TransMIL's first-layer CLS attention),
  with each tile's tumour fraction where the dataset has tumour masks;
- a heatmap per slide: the tiling thumbnail with every kept tile coloured by
  its attention (evaluate/heatmaps.py);
- localisation AUC per slide with a tumour mask: the AUC of tile attention
  for telling tumour tiles (at least `tumour_threshold` of the tile in the
  mask) from the others, and its mean over slides with Student's t interval;
- top-k removal: each slide re-scored from its stored features without its k
  most-attended tiles, and, as the control, without k tiles drawn at random,
  each of `random_repeats` draws scored on its own; AUC and accuracy with
  intervals against k, and per k the two removals compared slide by slide.
  At least one tile always stays: a slide of n <= k tiles loses its n - 1
  most-attended (or random) tiles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from medrobust.config import config_from_mapping
from medrobust.errors import ConfigError, InputError
from medrobust.evaluate.attention_files import (
    HEATMAPS, LOCALISATION_TABLE, SUMMARY, TILES_TABLE, TOP_K_TABLE)
from medrobust.evaluate.heatmaps import attention_heatmap
from medrobust.evaluate.slide_classifier import load_split_bags
from medrobust.evaluate.statistics import (
    Interval, auc_score, classification_statistics, count_comparison, interval_columns,
    jsonable, model_auc, t_mean)
from medrobust.io.atomic import atomic_path, write_json
from medrobust.io.slide_stores import open_feature_store, open_tile_store
from medrobust.io.slides import open_slide
from medrobust.io.tumour_masks import TumourAnnotations, TumourMask
from medrobust.logs import get_logger
from medrobust.preprocess.tiling import TileGrid, mask_fractions

log = get_logger(__name__)

HEATMAP_PIXELS_PER_TILE = 8  # thumbnail pixels per tile side
NO_DRAW = -1   # top_k.csv's `draw` for the full bag and the top-k removal, which draw nothing



@dataclass(frozen=True)
class AttentionSettings:
    """What the attention analysis of a slide classifier does (`slide_attention:` in config)."""

    top_k: tuple[int, ...] = (1, 2, 4, 8)
    random_repeats: int = 5         # random draws per slide and k, each scored on its own
    tumour_threshold: float = 0.5   # a tile is tumour when at least this fraction is in the mask

    def __post_init__(self):
        if not self.top_k or any(isinstance(k, bool) or not isinstance(k, int) or k < 1
                                 for k in self.top_k):
            raise ConfigError(f"slide_attention.top_k must be a non-empty list of integers "
                              f">= 1, not {self.top_k!r}")
        if self.random_repeats < 1 or not 0 < self.tumour_threshold <= 1:
            raise ConfigError("slide_attention: random_repeats must be >= 1 and "
                              "tumour_threshold in (0, 1]")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "AttentionSettings":
        settings = {key: value for key, value in mapping.items() if key != "models"}
        if "top_k" in settings:
            settings["top_k"] = tuple(settings["top_k"])
        return config_from_mapping(cls, settings, "slide_attention")


# ---------------------------------------------------------------- the pieces

def bag_scores(model: torch.nn.Module, features: torch.Tensor,
               device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities `(C,)` and per-tile attention `(n,)` of one bag; every slide
    classifier's forward gives both (models/mil.py)."""
    with torch.inference_mode():
        logits, attention = model(features.to(device))
    return torch.softmax(logits.float(), dim=-1).cpu().numpy(), attention.float().cpu().numpy()


def tiles_to_remove(n_tiles: int, k: int) -> int:
    """How many of n tiles top-k removal takes away: k, but at least one tile stays."""
    return max(0, min(k, n_tiles - 1))


def top_k_kept(attention: np.ndarray, k: int) -> np.ndarray:
    """Indices (ascending) of the tiles left after removing the k most-attended ones (ties
    broken by the lower index, as a stable sort gives)."""
    order = np.argsort(-np.asarray(attention), kind="stable")
    return np.sort(order[tiles_to_remove(len(order), k):])


def random_kept(n_tiles: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices (ascending) of the tiles left after removing as many random tiles as top-k
    removal would."""
    return np.sort(rng.permutation(n_tiles)[tiles_to_remove(n_tiles, k):])


def tumour_tiles(tumour_fraction: np.ndarray, threshold: float) -> np.ndarray:
    """Which tiles count as tumour: at least `threshold` of the tile lies in the mask."""
    return np.asarray(tumour_fraction) >= threshold


def localisation_auc(attention: np.ndarray, tumour_fraction: np.ndarray,
                     threshold: float) -> float | None:
    """AUC of attention for tumour tiles against the others; None without both kinds."""
    return auc_score(tumour_tiles(tumour_fraction, threshold).astype(int), attention)


def tile_tumour_fraction(mask: TumourMask, coords: np.ndarray,
                         tile_size_level0: int) -> np.ndarray:
    """Fraction of each tile (level-0 top-left `coords`) inside the tumour mask; the tiler's
    own tissue-fraction arithmetic on the mask's raster."""
    grid = TileGrid(np.asarray(coords), int(tile_size_level0), level=0, level_downsample=1.0,
                    read_size=int(tile_size_level0))
    return mask_fractions(mask.mask.astype(np.int64), mask.downsample, grid)


# ---------------------------------------------------------------- one model

@dataclass
class _Slide:
    slide_id: str
    label: int
    features: torch.Tensor
    coords: np.ndarray
    tile_attrs: dict[str, Any]


def _test_slides(model_dir: Path, feature_paths: Sequence[str | os.PathLike],
                 tile_paths: Sequence[str | os.PathLike], device: torch.device):
    model, config, bags = load_split_bags(model_dir, feature_paths, "test", device)
    stores = {}
    for feature_path, tile_path in zip(feature_paths, tile_paths, strict=True):
        store = open_feature_store(feature_path)
        stores[str(store.attrs["slide_id"])] = (store, open_tile_store(tile_path).attrs)
    slides = []
    for bag in bags:
        store, tile_attrs = stores[bag.slide_id]
        if tile_attrs.get("slide_id") != bag.slide_id:
            raise InputError(f"{store.path}: its tile store is of slide "
                             f"{tile_attrs.get('slide_id')!r}, not {bag.slide_id!r}")
        slides.append(_Slide(bag.slide_id, bag.label, bag.features, store.coords, tile_attrs))
    return model, config, slides


def _heatmap(slide: _Slide, attention: np.ndarray, annotations: TumourAnnotations,
             path: Path) -> TumourMask | None:
    """Draw the slide's heatmap on the tiler's thumbnail; returns its tumour mask."""
    attrs = slide.tile_attrs
    side = int(attrs["tile_size_level0"])
    with open_slide(attrs["source_path"], attrs.get("slide_mpp")) as source:
        # finer than the tiler's mask (4 pixels per tile by default): the tissue under
        # the coloured squares should stay recognisable
        thumbnail, downsample = source.thumbnail(side / HEATMAP_PIXELS_PER_TILE)
        mask = annotations.mask(slide.slide_id, source.dimensions, downsample)
    picture = attention_heatmap(thumbnail, slide.coords / downsample, side / downsample,
                                attention, None if mask is None else mask.mask)
    picture.save(path, format="PNG")
    return mask


def analyse_slide_attention(model_dir: str | os.PathLike,
                            feature_paths: Sequence[str | os.PathLike],
                            tile_paths: Sequence[str | os.PathLike],
                            dataset_dir: str | os.PathLike, out_dir: str | os.PathLike,
                            settings: AttentionSettings, n_resamples: int = 1000,
                            confidence: float = 0.95, seed: int = 0, alpha: float = 0.05,
                            device: str | torch.device = "cpu") -> dict[str, Any]:
    """Write the attention analysis of the model's test slides into `out_dir` (atomically):
    tiles.csv, localisation.csv, top_k.csv, summary.json and heatmaps/{slide}.png.

    `feature_paths` and `tile_paths` are the dataset's stores, pairwise. Returns the summary.
    """
    model_dir, device = Path(model_dir), torch.device(device)
    model, config, slides = _test_slides(model_dir, feature_paths, tile_paths, device)
    classes = list(config["classes"])
    annotations = TumourAnnotations(dataset_dir)
    rng = np.random.default_rng(seed)
    tile_rows, localisation_rows, top_k_rows = [], [], []
    with atomic_path(out_dir) as tmp:
        (tmp / HEATMAPS).mkdir(parents=True)
        for slide in slides:
            probabilities, attention = bag_scores(model, slide.features, device)
            mask = _heatmap(slide, attention, annotations, tmp / HEATMAPS / f"{slide.slide_id}.png")
            fraction = (None if mask is None else tile_tumour_fraction(
                mask, slide.coords, slide.tile_attrs["tile_size_level0"]))
            tile_rows.append(pd.DataFrame({
                "slide_id": slide.slide_id, "label": classes[slide.label],
                "tile_index": np.arange(len(attention)), "x": slide.coords[:, 0],
                "y": slide.coords[:, 1], "attention": attention,
                "tumour_fraction": np.nan if fraction is None else fraction}))
            if fraction is not None:
                tumour = tumour_tiles(fraction, settings.tumour_threshold)
                localisation_rows.append({
                    "slide_id": slide.slide_id, "label": classes[slide.label],
                    "n_tiles": len(attention), "n_tumour_tiles": int(tumour.sum()),
                    "auc": localisation_auc(attention, fraction, settings.tumour_threshold)})
            top_k_rows.append(_row(slide, 0, "none", NO_DRAW, 0, probabilities, classes))
            for k in settings.top_k:
                removed = tiles_to_remove(len(attention), k)
                kept = top_k_kept(attention, k)
                top_k_rows.append(_row(slide, k, "top", NO_DRAW, removed,
                                       bag_scores(model, slide.features[kept], device)[0],
                                       classes))
                for draw in range(settings.random_repeats):
                    kept = random_kept(len(attention), k, rng)
                    top_k_rows.append(_row(slide, k, "random", draw, removed,
                                           bag_scores(model, slide.features[kept], device)[0],
                                           classes))
        top_k = pd.DataFrame(top_k_rows)
        localisation = pd.DataFrame(localisation_rows,
                                    columns=["slide_id", "label", "n_tiles", "n_tumour_tiles",
                                             "auc"])
        summary = {
            "model": model_dir.name, "dataset": config["dataset"], "arch": config.get("arch"),
            "classes": classes, "n_slides": len(slides),
            "settings": {"top_k": list(settings.top_k),
                         "random_repeats": settings.random_repeats,
                         "tumour_threshold": settings.tumour_threshold,
                         "bootstrap_resamples": n_resamples, "confidence": confidence,
                         "seed": seed, "alpha": alpha},
            "tumour_masks": annotations.available,
            "localisation": _localisation_summary(localisation, confidence),
            "top_k": _top_k_summary(top_k, classes, n_resamples, confidence, seed),
            "top_k_against_random": top_k_against_random(top_k, classes, confidence, alpha),
        }
        pd.concat(tile_rows).to_csv(tmp / TILES_TABLE, index=False)
        localisation.to_csv(tmp / LOCALISATION_TABLE, index=False)
        top_k.to_csv(tmp / TOP_K_TABLE, index=False)
        write_json(tmp / SUMMARY, jsonable(summary))
    log.info("%s: attention of %d test slides, %d with a tumour mask", model_dir.name,
             len(slides), len(localisation))
    return summary


def _row(slide: _Slide, k: int, removal: str, draw: int, removed: int,
         probabilities: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    return {"slide_id": slide.slide_id, "label": classes[slide.label], "k": k,
            "removal": removal, "draw": draw, "n_tiles": len(slide.coords), "n_removed": removed,
            **{f"prob_{name}": float(p) for name, p in zip(classes, probabilities)}}


def _localisation_summary(localisation: pd.DataFrame, confidence: float) -> dict[str, Any]:
    """Mean localisation AUC over the slides where it is defined (tumour and other tiles)."""
    defined = localisation["auc"].dropna().to_numpy(dtype=float)
    mean = t_mean(defined, confidence) if len(defined) else None
    return {"n_slides_with_mask": len(localisation), "n_slides_with_auc": len(defined),
            "mean_auc": mean}


@dataclass(frozen=True)
class _RandomDraws:
    """One k's random removals: per slide (in slide_id order) its label and each draw's
    class probabilities, `(draws, slides, classes)`."""

    slide_ids: list[str]
    labels: np.ndarray
    probabilities: np.ndarray

    @property
    def n_draws(self) -> int:
        return self.probabilities.shape[0]

    @property
    def correct(self) -> np.ndarray:
        """Per slide, how many of its draws leave it correct (the argmax class)."""
        return (self.probabilities.argmax(axis=-1) == self.labels).sum(axis=0)

    def mean_auc(self) -> float | None:
        """The mean of the draws' AUCs; None where a draw has none (slides of one class)."""
        aucs = [model_auc(self.labels, draw) for draw in self.probabilities]
        return None if None in aucs else float(np.mean(aucs))


def _scores(rows: pd.DataFrame, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Labels as class indices and class probabilities of top-k table rows."""
    return (rows["label"].map(list(classes).index).to_numpy(),
            rows[[f"prob_{name}" for name in classes]].to_numpy())


def _random_draws(rows: pd.DataFrame, classes: Sequence[str]) -> _RandomDraws:
    """One k's random rows of the top-k table as its draws; every slide must have every draw,
    once, or a slide's share of draws would be over a different number of them."""
    slides, draws = rows["slide_id"].nunique(), rows["draw"].nunique()
    if rows.duplicated(["draw", "slide_id"]).any() or len(rows) != slides * draws:
        raise InputError(f"top-k table: k = {rows['k'].iloc[0]} has not one random row per "
                         f"slide and draw ({len(rows)} rows, {slides} slides, {draws} draws)")
    ordered = rows.sort_values(["draw", "slide_id"])
    labels, probabilities = _scores(ordered, classes)
    return _RandomDraws(list(ordered["slide_id"].iloc[:slides]), labels[:slides],
                        probabilities.reshape(draws, slides, len(classes)))


def top_k_against_random(top_k: pd.DataFrame, classes: Sequence[str], confidence: float,
                         alpha: float) -> list[dict[str, Any]]:
    """Per k, removing the k most-attended tiles against removing k random ones, on the same
    slides; the columns of a comparisons table (statistics.comparison_columns' keys).

    Per slide, whether the top-k removal leaves it correct against how many of the random
    draws do, by `statistics.count_comparison` with the random removal as the reference: a
    negative difference is what the top tiles carry. Each draw is one removal, as the
    top-k removal is; their averaged probabilities would be an ensemble, steadier and
    often more accurate than any one removal. The AUC difference is the top-k removal's AUC
    less the mean of the draws' AUCs, without an interval (docs/mil.md says why).
    """
    rows = []
    for k, group in top_k[top_k["k"] > 0].groupby("k", sort=True):
        top = group[group["removal"] == "top"].sort_values("slide_id")
        random = _random_draws(group[group["removal"] == "random"], classes)
        if list(top["slide_id"]) != random.slide_ids:
            raise InputError(f"top-k table: k = {k} has different slides for the random and "
                             "the most-attended removal")
        labels, probabilities = _scores(top, classes)
        top_correct = (probabilities.argmax(axis=1) == labels).astype(int)
        comparison = count_comparison(random.correct, random.n_draws, top_correct, 1,
                                      confidence, alpha)
        top_auc, random_auc = model_auc(labels, probabilities), random.mean_auc()
        comparison["auc_difference"] = (None if top_auc is None or random_auc is None
                                        else top_auc - random_auc)
        rows.append({"k": int(k), **comparison})
    return rows


def _top_k_summary(top_k: pd.DataFrame, classes: Sequence[str], n_resamples: int,
                   confidence: float, seed: int) -> list[dict[str, Any]]:
    """AUC and accuracy with intervals per (k, removal); k = 0 is the full bag. The random
    removal's are `_random_control`'s, over its draws."""
    rows = []
    for (k, removal), group in top_k.groupby(["k", "removal"], sort=True):
        if removal == "random":
            statistics = _random_control(_random_draws(group, classes), confidence)
        else:
            labels, probabilities = _scores(group, classes)
            statistics = classification_statistics(labels, probabilities, list(classes),
                                                   n_resamples, seed, confidence)
        rows.append({"k": int(k), "removal": removal, "n": int(statistics["n"]),
                     "mean_removed": float(group["n_removed"].mean()),
                     **interval_columns("auc", statistics["auc"]),
                     **interval_columns("accuracy", statistics["accuracy"])})
    return rows


def _random_control(random: _RandomDraws, confidence: float) -> dict[str, Any]:
    """The accuracy of one random removal: the mean over slides of the share of draws that
    leave the slide correct, with Student's t interval over the slides; its AUC: the mean
    of the draws' AUCs, with no interval (the spread of the draws' AUCs is the draws'
    randomness, not the slides': docs/mil.md)."""
    return {"n": len(random.slide_ids),
            "accuracy": t_mean(random.correct / random.n_draws, confidence),
            "auc": Interval(random.mean_auc(), None, None, "mean over random draws")}
