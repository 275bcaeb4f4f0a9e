"""The report's "Slides: attention" section, from the slide_attention jobs' folders
(evaluate/slide_attention.py): heatmaps, the localisation table, top-k curves."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from medrobust.errors import InputError
from medrobust.evaluate.attention_files import HEATMAPS, LOCALISATION_TABLE, SUMMARY
from medrobust.report import figures

MAX_HEATMAPS = 24   # per model: the page inlines each one


def _summary(run: Path) -> dict[str, Any]:
    try:
        return json.loads((run / SUMMARY).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"{run / SUMMARY}: unreadable attention summary ({error})") from error


def attention_section(runs: Sequence[str | os.PathLike],
                      ) -> tuple[dict[str, tuple[bytes, str]], dict[str, Any] | None]:
    """The section's figures (name -> PNG, caption) and its template values; (no figures,
    None) without runs."""
    if not runs:
        return {}, None
    found, models, curve_rows, paired_rows = {}, [], [], []
    for run in map(Path, runs):
        summary = _summary(run)
        settings = summary["settings"]   # the same for every model: one config section
        model = summary["model"]
        localisation = pd.read_csv(run / LOCALISATION_TABLE, dtype={"slide_id": str})
        auc = dict(zip(localisation["slide_id"], localisation["auc"]))
        heatmaps = sorted((run / HEATMAPS).glob("*.png"))
        names = []
        for picture in heatmaps[:MAX_HEATMAPS]:
            slide = picture.stem
            value = auc.get(slide)
            where = ("no tumour mask" if slide not in auc else "localisation AUC undefined"
                     if pd.isna(value) else f"localisation AUC {value:.3f}")
            names.append(f"attention_{model}_{slide}")
            found[names[-1]] = (figures.read_png(picture, "attention heatmap"),
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
        f"or k random tiles (dashed, mean probability over {settings['random_repeats']} "
        f"draws); k = 0 is the full bag; {figures.bands_caption([settings['confidence']])}. "
        "At least one tile stays.")
    return found, {"models": models, "settings": settings,
                   "top_k": curves.to_dict("records"), "top_k_against_random": paired_rows}
