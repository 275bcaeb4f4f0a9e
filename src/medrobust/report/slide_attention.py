"""The report's "Slides: attention" section, from the slide_attention jobs' folders
(evaluate/slide_attention.py): heatmaps, the localisation table, top-k curves."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from medrobust.errors import RERUN, InputError
from medrobust.evaluate.attention_files import HEATMAPS, LOCALISATION_TABLE, SUMMARY
from medrobust.io.result_files import read_result_png, read_result_record, read_result_table
from medrobust.report import figures

MAX_HEATMAPS = 24   # per model: the page inlines each one


SUMMARY_KEYS = ("model", "dataset", "n_slides", "settings.top_k", "settings.random_repeats",
                "settings.confidence", "tumour_masks", "localisation.n_slides_with_mask",
                "localisation.n_slides_with_auc", "localisation.mean_auc", "top_k",
                "top_k_against_random")


def _read(run: Path) -> tuple[dict[str, Any], pd.DataFrame, list[Path]]:
    """A run's summary, localisation table and heatmaps, checked against each other as
    `evaluate.slide_attention` writes them: a heatmap per test slide, a localisation row per
    slide with a tumour mask, a top-k row per k and removal; a lost row or picture would
    otherwise show as fewer slides than the summary counts."""
    summary = read_result_record(run / SUMMARY, "attention summary", SUMMARY_KEYS)
    path = run / LOCALISATION_TABLE
    localisation = read_result_table(   # no rows where no slide has a tumour mask
        path, "localisation table", ("slide_id", "label", "n_tiles", "n_tumour_tiles", "auc"),
        numbers=("auc",), finite=("n_tiles", "n_tumour_tiles"), dtype={"slide_id": str},
        may_be_empty=True)
    heatmaps = sorted((run / HEATMAPS).glob("*.png"))
    counts, top_k, ks = summary["localisation"], summary["top_k"], summary["settings"]["top_k"]
    with_mask, with_auc = counts["n_slides_with_mask"], counts["n_slides_with_auc"]
    if len(localisation) != with_mask or localisation["auc"].notna().sum() != with_auc \
            or localisation["slide_id"].duplicated().any():
        raise InputError(f"{path}: {len(localisation)} slides, {run / SUMMARY} counts "
                         f"{with_mask} with a tumour mask, {with_auc} of them with an AUC; "
                         f"{RERUN}")
    if len(heatmaps) != summary["n_slides"] \
            or not set(localisation["slide_id"]) <= {picture.stem for picture in heatmaps}:
        raise InputError(f"{run / HEATMAPS}: {len(heatmaps)} heatmaps, not one per test slide "
                         f"of {run / SUMMARY} ({summary['n_slides']}); {RERUN}")
    if not isinstance(top_k, list) or len(top_k) != 1 + 2 * len(ks) or not all(
            isinstance(row, dict) and all(_number(value) for key, value in row.items()
                                          if key != "removal") for row in top_k):
        raise InputError(f"{run / SUMMARY}: top_k must hold the full bag and the top and "
                         f"random removal of each k of its settings, each number finite or "
                         f"null; {RERUN}")
    return summary, localisation, heatmaps


def _number(value: Any) -> bool:
    """A finite number, or None (undefined: an AUC on slides of one class)."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                             and math.isfinite(value))


def attention_section(runs: Sequence[str | os.PathLike],
                      ) -> tuple[dict[str, tuple[bytes, str]], dict[str, Any] | None]:
    """The section's figures (name -> PNG, caption) and its template values; (no figures,
    None) without runs."""
    if not runs:
        return {}, None
    found, models, curve_rows, paired_rows = {}, [], [], []
    for run in map(Path, runs):
        summary, localisation, heatmaps = _read(run)
        settings = summary["settings"]   # the same for every model: one config section
        model = summary["model"]
        auc = dict(zip(localisation["slide_id"], localisation["auc"]))
        names = []
        for picture in heatmaps[:MAX_HEATMAPS]:
            slide = picture.stem
            value = auc.get(slide)
            where = ("no tumour mask" if slide not in auc else "localisation AUC undefined"
                     if pd.isna(value) else f"localisation AUC {value:.3f}")
            names.append(f"attention_{model}_{slide}")
            found[names[-1]] = (read_result_png(picture, "attention heatmap"),
                                f"{model}: {slide} ({where})")
        mean = summary["localisation"]["mean_auc"]
        models.append({"model": model, "dataset": summary["dataset"],
                       "n_slides": summary["n_slides"], "heatmaps": len(heatmaps),
                       "shown": len(names), "figures": names,
                       "with_mask": summary["localisation"]["n_slides_with_mask"],
                       "with_auc": summary["localisation"]["n_slides_with_auc"],
                       "mean_auc": mean, "tumour_masks": summary["tumour_masks"],
                       "slides": localisation.to_dict("records")})
        curve_rows += [{"model": model, **row} for row in summary["top_k"]]
        paired_rows += [{"model": model, "dataset": summary["dataset"], **row}
                        for row in summary["top_k_against_random"]]
    curves = pd.DataFrame(curve_rows)
    found["attention_top_k"] = (
        figures.png(figures.top_k_curves(curves)),
        "Test-slide AUC and accuracy after removing each slide's k most-attended tiles (solid) "
        f"or k random tiles (dashed: {settings['random_repeats']} draws per slide, each "
        "scored on its own; the accuracy is the mean share of draws that leave a slide right, "
        "the AUC the mean of the draws' AUCs, without a band); k = 0 is the full bag; "
        f"{figures.bands_caption([settings['confidence']])}. At least one tile stays.")
    return found, {"models": models, "settings": settings,
                   # the summary's rows, whose missing bounds (the random AUC's) stay None
                   "top_k": curve_rows, "top_k_against_random": paired_rows}
