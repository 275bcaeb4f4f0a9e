"""Report figures, rendered off-screen (Agg).

Each function returns a `matplotlib.figure.Figure` (tests inspect its
layout); `png` renders it. Figures are built on `Figure` directly, not pyplot, so no
global state or display backend is involved. Every figure uses constrained
layout with its legend outside the axes, so a legend never covers data, and
every curve carries its interval as a band.
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from medrobust.perturbations import PERTURBATIONS

_DPI = 100
EPSILON_LABELS = {"linf": "ε (L∞ budget, 1/255 of the intensity range)",
                  "l2": "ε (L2 radius, image units in [0, 1])"}
NORM_NAMES = {"linf": "L∞", "l2": "L2"}
ACCURACY_LABEL = "accuracy (fraction of test images)"


def png(figure: Figure) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _legend_outside(figure: Figure, axes: Sequence[Axes]) -> None:
    """One legend for all panels, right of them, with each label once."""
    entries: dict[str, object] = {}
    for panel in axes:
        for handle, label in zip(*panel.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        figure.legend(list(entries.values()), list(entries), loc="outside right upper",
                      fontsize="small")


def model_colours(models: Sequence[str]) -> dict[str, str]:
    """One colour per model across every figure."""
    return {model: f"C{index % 10}" for index, model in enumerate(sorted(set(models)))}


def _line(axes: Axes, levels: Sequence[float], rows: pd.DataFrame, **style) -> None:
    """Accuracy with its interval band against `levels`."""
    axes.plot(levels, rows["accuracy"], marker="o", **style)
    axes.fill_between(levels, rows["accuracy_low"], rows["accuracy_high"],
                      color=style.get("color"), alpha=0.15, linewidth=0)


def _from_clean(rows: pd.DataFrame, level: str,
                clean: pd.DataFrame) -> tuple[list[float], pd.DataFrame]:
    """The sweep's rows by level, starting at level 0 with the clean images."""
    rows = rows.sort_values(level)
    levels = [float(value) for value in rows[level]]
    if not clean.empty:
        rows, levels = pd.concat([clean.iloc[:1], rows]), [0.0, *levels]
    return levels, rows


def attack_curves(robustness: pd.DataFrame) -> Figure:
    """Accuracy against ε: one panel per attack and, with several attacks, one per norm for
    the worst case over them.

    Solid lines are white-box, dashed transfer; bands are 95% intervals.
    """
    attacked = robustness[robustness["kind"].isin(["attack", "worst_case"])]
    attacks = attacked[attacked["kind"] == "attack"]
    panels = [(name, attacks[attacks["attack"] == name]) for name in sorted(attacks["attack"].unique())]
    if len(panels) > 1:  # with one attack the worst case repeats its panel
        worst = attacked[attacked["kind"] == "worst_case"]
        panels += [(f"worst case over {NORM_NAMES.get(norm, norm)} attacks",
                    worst[worst["norm"] == norm]) for norm in sorted(worst["norm"].unique())]
    colours = model_colours(robustness["model"])
    figure = _new_figure(3.6 * len(panels) + 2.4, 3.4)
    axes = figure.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for panel, (name, rows) in zip(axes, panels):
        for (model, threat, source), group in rows.groupby(
                ["model", "threat_model", "source_model"], sort=True, dropna=False):
            clean = robustness[(robustness["model"] == model) & (robustness["kind"] == "clean")]
            levels, group = _from_clean(group, "epsilon", clean)
            label = (f"{model}, white-box" if threat == "white-box"
                     else f"{model}, transfer from {source}")
            _line(panel, levels, group, color=colours[model], label=label,
                  linestyle="-" if threat == "white-box" else "--")
        norm = rows["norm"].iloc[0] if len(rows) else "linf"
        panel.set(title=name, xlabel=EPSILON_LABELS.get(norm, "ε"), ylim=(-0.02, 1.02))
        panel.grid(alpha=0.3)
    axes[0].set_ylabel(ACCURACY_LABEL)
    _legend_outside(figure, axes)
    return figure


def perturbation_curves(robustness: pd.DataFrame) -> Figure:
    """Accuracy against severity, one panel per perturbation, in its own units."""
    perturbed = robustness[robustness["kind"] == "perturbation"]
    names = sorted(perturbed["perturbation"].unique())
    colours = model_colours(robustness["model"])
    figure = _new_figure(3.8 * len(names) + 2.0, 3.4)
    axes = figure.subplots(1, len(names), squeeze=False, sharey=True)[0]
    for panel, name in zip(axes, names):
        for model, group in perturbed[perturbed["perturbation"] == name].groupby("model"):
            clean = robustness[(robustness["model"] == model) & (robustness["kind"] == "clean")]
            levels, group = _from_clean(group, "severity", clean)
            _line(panel, levels, group, color=colours[model], label=model)
        unit = getattr(PERTURBATIONS.get(name), "severity_unit", "severity")
        panel.set(title=name, xlabel=unit, ylim=(-0.02, 1.02))
        panel.grid(alpha=0.3)
    axes[0].set_ylabel(ACCURACY_LABEL)
    _legend_outside(figure, axes)
    return figure


def training_curves(histories: Mapping[str, Mapping]) -> Figure:
    """Loss and validation accuracy per epoch for each model; a star marks the epoch kept."""
    colours = model_colours(list(histories))
    figure = _new_figure(12.0, 3.2)
    axes = figure.subplots(1, 3)
    panels = (("train_loss", "training loss (with any defense terms)"), ("val_loss", "validation loss (cross-entropy)"),
              ("val_accuracy", "validation accuracy"))
    for panel, (key, title) in zip(axes, panels):
        for model, history in sorted(histories.items()):
            epochs = [record["epoch"] for record in history["epochs"]
                      if record.get(key) is not None]
            values = [record[key] for record in history["epochs"] if record.get(key) is not None]
            if not values:
                continue
            panel.plot(epochs, values, color=colours[model], label=model)
            if history["best_epoch"] in epochs:
                kept = epochs.index(history["best_epoch"])
                panel.plot(epochs[kept], values[kept], marker="*", markersize=12,
                           color=colours[model], linestyle="none")
        panel.set(title=title, xlabel="epoch")
        panel.grid(alpha=0.3)
    axes[2].set_ylim(-0.02, 1.02)
    _legend_outside(figure, axes)
    return figure


def _show(axes: Axes, image: np.ndarray) -> None:
    """One (C, H, W) image in [0, 1]: grey for one channel, RGB for three."""
    picture = image[0] if image.shape[0] == 1 else np.moveaxis(image[:3], 0, -1)
    axes.imshow(np.clip(picture, 0.0, 1.0), cmap="gray", vmin=0.0, vmax=1.0)
    axes.set_xticks([])
    axes.set_yticks([])


def prediction_lines(predictions: Mapping[str, tuple[str, float, bool]]) -> str:
    """"model: class 0.83 ✓" per model, as printed under a picture."""
    return "\n".join(f"{model}: {name} {confidence:.2f} {'✓' if correct else '✗'}"
                     for model, (name, confidence, correct) in predictions.items())


def image_panel_grid(rows: Sequence[Sequence[tuple[np.ndarray, str, str]]],
                     row_labels: Sequence[str], title: str) -> Figure:
    """A grid of images; each cell is (image (C, H, W), title, text under the picture).

    Used for both the example images (clean / attacked / difference, with each
    model's prediction under each picture) and the perturbation strips (one
    image at every severity).
    """
    n_rows, n_columns = len(rows), max(len(row) for row in rows)
    figure = _new_figure(2.3 * n_columns + 0.6, 2.75 * n_rows + 0.4)
    axes = figure.subplots(n_rows, n_columns, squeeze=False)
    for row_axes, cells, row_label in zip(axes, rows, row_labels):
        for panel, (image, cell_title, text) in zip(row_axes, cells):
            _show(panel, image)
            panel.set_title(cell_title, fontsize="small")
            panel.set_xlabel(text, fontsize="x-small", loc="left")
        for panel in row_axes[len(cells):]:
            panel.set_axis_off()
        row_axes[0].set_ylabel(row_label, fontsize="small")
    figure.suptitle(title, fontsize="medium")
    return figure


def top_k_curves(rows: pd.DataFrame) -> Figure:
    """AUC and accuracy of slide classifiers against the number of tiles removed: one colour
    per model, solid for the most-attended tiles, dashed for as many random tiles; k = 0 is
    the full bag, shared by both lines. Columns: model, k, removal (none/top/random), and
    auc, accuracy with their _low/_high interval bounds."""
    colours = model_colours(rows["model"])
    figure = _new_figure(10.0, 3.4)
    axes = figure.subplots(1, 2, sharey=True)
    for panel, metric in zip(axes, ("auc", "accuracy")):
        for model, group in rows.groupby("model"):
            full = group[group["removal"] == "none"]
            for removal, style in (("top", "-"), ("random", "--")):
                line = pd.concat([full, group[group["removal"] == removal]]).sort_values("k")
                label = f"{model}: {'most-attended' if removal == 'top' else 'random'} tiles removed"
                panel.plot(line["k"], line[metric], marker="o", linestyle=style,
                           color=colours[model], label=label)
                panel.fill_between(line["k"], line[f"{metric}_low"].astype(float),
                                   line[f"{metric}_high"].astype(float), color=colours[model],
                                   alpha=0.1, linewidth=0)
        panel.set(title=f"{'AUC' if metric == 'auc' else 'accuracy'} of the test slides",
                  xlabel="tiles removed per slide (k)", ylim=(-0.02, 1.02))
        panel.grid(alpha=0.3)
    _legend_outside(figure, axes)
    return figure
