"""Report figures, rendered off-screen (Agg).

Each function returns a `matplotlib.figure.Figure` (tests inspect its
layout); `png` renders it. Figures are built on `Figure` directly, not pyplot, so no
global state or display backend is involved. Every figure uses constrained
layout with its legend outside the axes, so a legend never covers data, and
every curve carries its interval as a band.
"""

from __future__ import annotations

import io
from typing import Collection, Mapping, Sequence

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
LOWPASS_RADIUS = "low-pass radius (cycles per image)"


def bands_caption(confidences: Collection[float]) -> str:
    """A caption's words for the bands of intervals made at these confidence levels."""
    levels = " and ".join(f"{confidence:.0%}" for confidence in sorted(confidences))
    return f"bands are {levels} intervals"


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


# hollow and of different shapes, so points that two models share show both
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")


def model_styles(models: Sequence[str]) -> dict[str, dict[str, str]]:
    """One colour and marker per model across every figure (plot keyword arguments)."""
    return {model: {"color": f"C{index % 10}", "marker": _MARKERS[index % len(_MARKERS)],
                    "markerfacecolor": "none"}
            for index, model in enumerate(sorted(set(models)))}


def _line(axes: Axes, levels: Sequence[float], rows: pd.DataFrame, metric: str = "accuracy",
          **style) -> None:
    """`metric` against `levels` (gaps where it is undefined), with its interval band where
    `rows` has one (`metric`_low and _high)."""
    values = pd.to_numeric(rows[metric], errors="coerce")
    axes.plot(levels, values, **{"marker": "o", **style})
    if f"{metric}_low" in rows:
        axes.fill_between(levels, pd.to_numeric(rows[f"{metric}_low"], errors="coerce"),
                          pd.to_numeric(rows[f"{metric}_high"], errors="coerce"),
                          color=style.get("color"), alpha=0.15, linewidth=0)


def _from_clean(rows: pd.DataFrame, level: str, clean: pd.DataFrame,
                clean_level: float = 0.0) -> tuple[list[float], pd.DataFrame]:
    """The sweep's rows by level, with the clean images at `clean_level`."""
    rows = rows.sort_values(level)
    levels = [float(value) for value in rows[level]]
    if not clean.empty:
        rows, levels = pd.concat([clean.iloc[:1], rows]), [clean_level, *levels]
        order = np.argsort(levels, kind="stable")
        rows, levels = rows.iloc[order], [levels[i] for i in order]
    return levels, rows


def attack_curves(robustness: pd.DataFrame) -> Figure:
    """Accuracy against ε: one panel per attack and, with several attacks, one per norm for
    the worst case over them.

    Solid lines are white-box, dashed transfer; bands are the intervals.
    """
    attacked = robustness[robustness["kind"].isin(["attack", "worst_case"])]
    attacks = attacked[attacked["kind"] == "attack"]
    panels = [(name, attacks[attacks["attack"] == name]) for name in sorted(attacks["attack"].unique())]
    if len(panels) > 1:  # with one attack the worst case repeats its panel
        worst = attacked[attacked["kind"] == "worst_case"]
        panels += [(f"worst case over {NORM_NAMES.get(norm, norm)} attacks",
                    worst[worst["norm"] == norm]) for norm in sorted(worst["norm"].unique())]
    styles = model_styles(robustness["model"])
    figure = _new_figure(3.6 * len(panels) + 2.4, 3.4)
    axes = figure.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for panel, (name, rows) in zip(axes, panels):
        for (model, threat, source), group in rows.groupby(
                ["model", "threat_model", "source_model"], sort=True, dropna=False):
            clean = robustness[(robustness["model"] == model) & (robustness["kind"] == "clean")]
            levels, group = _from_clean(group, "epsilon", clean)
            label = (f"{model}, white-box" if threat == "white-box"
                     else f"{model}, transfer from {source}")
            _line(panel, levels, group, **styles[model], label=label,
                  linestyle="-" if threat == "white-box" else "--")
        norm = rows["norm"].iloc[0] if len(rows) else "linf"
        panel.set(title=name, xlabel=EPSILON_LABELS.get(norm, "ε"), ylim=(-0.02, 1.02))
        panel.grid(alpha=0.3)
    axes[0].set_ylabel(ACCURACY_LABEL)
    _legend_outside(figure, axes)
    return figure


# the sweep's metrics, one row of panels each (summary columns, with _low / _high)
SWEEP_METRICS = (("accuracy", ACCURACY_LABEL), ("auc", "AUC"),
                 ("sensitivity_at_clean_threshold", "sensitivity at the clean operating point"))


def severity_unit(name: str) -> str:
    """A perturbation's severity with its unit, as the axes and tables name it."""
    return getattr(PERTURBATIONS.get(name), "severity_unit", "severity")


def _clean_position(panels: Sequence[Axes], name: str, levels: Sequence[float]) -> float:
    """Where a perturbation's panels draw the clean test set: at the severity that leaves
    images as they are, or, where that is infinite (a low-pass radius, a JPEG quality),
    right of the largest severity on a log axis, marked "clean"."""
    clean = float(getattr(PERTURBATIONS.get(name), "clean_severity", 0.0))
    if np.isfinite(clean):
        return clean
    for panel in panels:  # each row's panel gets the axis; the position is the same on all
        position = _levels_axis(panel, levels)["clean"]
    return position


def perturbation_curves(robustness: pd.DataFrame) -> Figure:
    """Accuracy, AUC and sensitivity at the clean operating point against severity: one column
    of panels per perturbation, severity in its own units; rows of a metric with no values
    (e.g. AUC or sensitivity with more than two classes) are left out."""
    perturbed = robustness[robustness["kind"] == "perturbation"]
    names = sorted(perturbed["perturbation"].unique())
    metrics = [(metric, label) for metric, label in SWEEP_METRICS
               if metric in perturbed and perturbed[metric].notna().any()]
    styles = model_styles(robustness["model"])
    figure = _new_figure(3.8 * len(names) + 2.0, 3.0 * len(metrics) + 0.4)
    axes = figure.subplots(len(metrics), len(names), squeeze=False, sharey="row")
    for column, name in enumerate(names):
        sweep = perturbed[perturbed["perturbation"] == name]
        clean_x = _clean_position(axes[:, column], name, sweep["severity"].unique())
        for model, group in sweep.groupby("model"):
            clean = robustness[(robustness["model"] == model) & (robustness["kind"] == "clean")]
            levels, group = _from_clean(group, "severity", clean, clean_x)
            for row, (metric, _) in enumerate(metrics):
                _line(axes[row, column], levels, group, metric, **styles[model],
                      label=model)
        axes[0, column].set_title(name)
        for row in range(len(metrics)):
            axes[row, column].set(ylim=(-0.02, 1.02))
            axes[row, column].grid(alpha=0.3)
        axes[-1, column].set_xlabel(severity_unit(name))
    for row, (_, label) in enumerate(metrics):
        axes[row, 0].set_ylabel(label)
    _legend_outside(figure, axes.ravel())
    return figure


def fourier_heatmaps(tables: Mapping[str, pd.DataFrame]) -> Figure:
    """One Fourier heat map per model (Yin et al. 2019): the error rate under basis noise at
    each frequency (i down, j across, in cycles per image), zero frequency in the centre,
    on one colour scale from 0 to 1."""
    models = sorted(tables)
    figure = _new_figure(3.4 * len(models) + 1.2, 3.4)
    axes = figure.subplots(1, len(models), squeeze=False)[0]
    image = None
    for panel, model in zip(axes, models):
        table = tables[model]
        grid = table.pivot(index="row_frequency", columns="column_frequency",
                           values="error_rate").sort_index().sort_index(axis=1)
        image = panel.imshow(grid.to_numpy(), cmap="viridis", vmin=0.0, vmax=1.0,
                             origin="upper", interpolation="nearest")
        panel.set_xticks(range(len(grid.columns)), [str(v) for v in grid.columns],
                         fontsize="x-small", rotation=90)
        panel.set_yticks(range(len(grid.index)), [str(v) for v in grid.index],
                         fontsize="x-small")
        panel.set(title=f"{model} (v = {table['norm'].iloc[0]:g}, n = {table['n'].iloc[0]})",
                  xlabel="j, cycles per image across", ylabel="i, cycles per image down")
    if image is not None:
        figure.colorbar(image, ax=list(axes), label="error rate under basis noise")
    return figure


def training_curves(histories: Mapping[str, Mapping]) -> Figure:
    """Loss and validation accuracy per epoch for each model, and validation AUC where the
    histories record it (slide models select their epoch by it); a star marks the epoch kept."""
    styles = model_styles(list(histories))
    panels = [("train_loss", "training loss (with any defense terms)"),
              ("val_loss", "validation loss (cross-entropy)"),
              ("val_accuracy", "validation accuracy")]
    if any(record.get("val_auc") is not None
           for history in histories.values() for record in history["epochs"]):
        panels.append(("val_auc", "validation AUC"))
    figure = _new_figure(4.0 * len(panels), 3.2)
    axes = figure.subplots(1, len(panels))
    for panel, (key, title) in zip(axes, panels):
        plotted: list[float] = []
        for model, history in sorted(histories.items()):
            epochs = [record["epoch"] for record in history["epochs"]
                      if record.get(key) is not None]
            values = [record[key] for record in history["epochs"] if record.get(key) is not None]
            if not values:
                continue
            plotted += values
            panel.plot(epochs, values, color=styles[model]["color"], label=model)
            if history["best_epoch"] in epochs:
                kept = epochs.index(history["best_epoch"])
                panel.plot(epochs[kept], values[kept], marker="*", markersize=12,
                           color=styles[model]["color"], linestyle="none")
        panel.set(title=title, xlabel="epoch")
        panel.grid(alpha=0.3)
        if key in ("val_accuracy", "val_auc"):
            panel.set_ylim(-0.02, 1.02)
        elif plotted and min(plotted) > 0 and max(plotted) > 10 * min(plotted):
            # a defense's loss terms can be 100x the others' cross-entropy: on a linear
            # scale every other model's curve would lie flat on 0
            panel.set_yscale("log")
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
    # room under each picture for its text (a line per model), so that it cannot run into
    # the titles of the row below
    lines = max(text.count("\n") + 1 for row in rows for _, _, text in row)
    figure = _new_figure(2.3 * n_columns + 0.6, (2.45 + 0.2 * lines) * n_rows + 0.4)
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


def _levels_axis(axes: Axes, levels: Sequence[float],
                 label: str | None = None) -> dict[str, float]:
    """x positions of the levels of a perturbation that weakens as its level grows (a
    low-pass radius): each level (log scale), and clean right of the largest, where the
    perturbation's strength runs out."""
    levels = sorted(float(level) for level in levels)
    clean = 2.0 * levels[-1]
    axes.set_xscale("log")
    axes.set_xticks([*levels, clean], [f"{level:g}" for level in levels] + ["clean"])
    axes.minorticks_off()
    if label is not None:
        axes.set_xlabel(label)
    return {"clean": clean}


def lesion_visibility_curves(visibility: pd.DataFrame, sensitivity: pd.DataFrame) -> Figure:
    """Lesion visibility against the low-pass radius beside each model's sensitivity.

    Left: the fraction of lesions still detectable (bands clustered by image); middle:
    the median contrast-to-noise ratio; right: sensitivity on calcification-only
    (solid) and mass-only (dashed) positives, per model.
    """
    radii = [float(r) for r in visibility["radius"].dropna().unique()]
    figure = _new_figure(13.0, 3.4)
    axes = figure.subplots(1, 3)
    # visibility in black and grey, so it is not read as one of the models' colours
    lesion_styles = {"calcification": ("black", "-"), "mass": ("grey", "--"),
                     "calcification only": (None, "-"), "mass only": (None, "--")}

    def x_of(rows: pd.DataFrame, positions: Mapping[str, float]) -> list[float]:
        return [positions["clean"] if pd.isna(r) else float(r) for r in rows["radius"]]

    for panel, column, title in ((axes[0], "detectable", "lesions still detectable"),
                                 (axes[1], "cnr_median", "median contrast-to-noise ratio")):
        positions = _levels_axis(panel, radii, LOWPASS_RADIUS)
        for lesion_type, rows in visibility.groupby("lesion_type", sort=True):
            colour, line = lesion_styles[lesion_type]
            rows = rows.assign(x=x_of(rows, positions)).sort_values("x")
            _line(panel, rows["x"], rows, column, color=colour, linestyle=line,
                  label=f"{lesion_type} (visibility)")
        panel.set(title=title)
        panel.grid(alpha=0.3)
    axes[0].set(ylim=(-0.02, 1.02), ylabel="fraction of lesions")
    axes[1].axhline(0.0, color="grey", linewidth=0.8)
    positions = _levels_axis(axes[2], radii, LOWPASS_RADIUS)
    styles = model_styles(sensitivity["model"]) if len(sensitivity) else {}
    for (model, group), rows in sensitivity.groupby(["model", "group"], sort=True):
        rows = rows.assign(x=x_of(rows, positions)).sort_values("x")
        n = int(rows["n_positives"].max())
        _line(axes[2], rows["x"], rows, "sensitivity", **styles[model],
              linestyle=lesion_styles[group][1], label=f"{model}: {group} (n = {n})")
    axes[2].set(title="model sensitivity", ylim=(-0.02, 1.02),
                ylabel="fraction of malignant images found")
    axes[2].grid(alpha=0.3)
    _legend_outside(figure, axes)
    return figure


# --- slide robustness (report.slide_robustness) ---------------------------------------------

SLIDE_METRICS = (("accuracy", "accuracy (fraction of test slides)"), ("auc", "AUC"))


def tile_fraction_curves(metrics: pd.DataFrame) -> Figure:
    """Slide accuracy and AUC against the fraction of tiles perturbed: a row of panels per
    perturbation and metric, a column per severity (a preset's 5 perturbations at 3
    severities would be unreadable in one row), one line per model, fraction 0 the clean
    bags; bands are the intervals."""
    sweeps = metrics[metrics["kind"] == "tile_fraction"]
    severities = {name: sorted({float(value) for value in group["severity"].dropna()})
                  for name, group in sweeps.groupby("perturbation")}
    columns = max(len(values) for values in severities.values())
    per_block = len(SLIDE_METRICS)
    styles = model_styles(metrics["model"])
    figure = _new_figure(3.4 * columns + 2.4, 2.8 * per_block * len(severities))
    axes = figure.subplots(per_block * len(severities), columns, squeeze=False, sharey=True)
    for block, (name, values) in enumerate(severities.items()):
        for column in range(columns):
            panels = [axes[block * per_block + row][column] for row in range(per_block)]
            if column >= len(values):  # this perturbation has fewer severities
                for panel in panels:
                    panel.set_visible(False)
                continue
            severity = values[column]
            for model, rows in sweeps[(sweeps["perturbation"] == name)
                                      & (sweeps["severity"] == severity)].groupby("model"):
                clean = metrics[(metrics["model"] == model) & (metrics["kind"] == "clean")]
                levels, rows = _from_clean(rows, "fraction", clean)
                for panel, (metric, _) in zip(panels, SLIDE_METRICS):
                    _line(panel, levels, rows, metric, **styles[model], label=model)
            for row, (panel, (metric, label)) in enumerate(zip(panels, SLIDE_METRICS)):
                panel.set(ylim=(-0.02, 1.02), xlim=(-0.03, 1.03))
                panel.grid(alpha=0.3)
                if row == 0:
                    panel.set_title(f"{name}, severity {severity:g}")
                if row == per_block - 1:
                    panel.set_xlabel("fraction of each slide's tiles perturbed")
                if column == 0:
                    panel.set_ylabel(label)
    _legend_outside(figure, [panel for panel in axes.ravel() if panel.get_visible()])
    return figure


def adversarial_tile_curves(metrics: pd.DataFrame) -> Figure:
    """Slide accuracy and AUC against k, the most-attended tiles attacked: one line per model
    and ε, k = 0 the clean bags; bands are the intervals."""
    attacked = metrics[metrics["kind"] == "adversarial_tiles"]
    styles = model_styles(metrics["model"])
    epsilons = sorted(attacked["epsilon"].unique())
    lines = dict(zip(epsilons, ["-", "--", ":", "-."] * len(epsilons)))
    figure = _new_figure(3.6 * len(SLIDE_METRICS) + 2.4, 3.2)
    axes = figure.subplots(1, len(SLIDE_METRICS), squeeze=False, sharey=True)[0]
    for (model, epsilon), rows in attacked.groupby(["model", "epsilon"]):
        clean = metrics[(metrics["model"] == model) & (metrics["kind"] == "clean")]
        levels, rows = _from_clean(rows, "k", clean)
        for panel, (metric, _) in zip(axes, SLIDE_METRICS):
            _line(panel, levels, rows, metric, **styles[model],
                  linestyle=lines[epsilon], label=f"{model}, ε {epsilon:g}/255")
    for panel, (metric, label) in zip(axes, SLIDE_METRICS):
        panel.set(xlabel="k, most-attended tiles attacked (PGD-L∞)", ylabel=label,
                  ylim=(-0.02, 1.02))
        panel.grid(alpha=0.3)
    _legend_outside(figure, axes)
    return figure


def top_k_curves(rows: pd.DataFrame) -> Figure:
    """AUC and accuracy of slide classifiers against the number of tiles removed: one colour
    per model, solid for the most-attended tiles, dashed for as many random tiles; k = 0 is
    the full bag, shared by both lines. Columns: model, k, removal (none/top/random), and
    auc, accuracy with their _low/_high interval bounds."""
    styles = model_styles(rows["model"])
    figure = _new_figure(10.0, 3.4)
    axes = figure.subplots(1, 2, sharey=True)
    for panel, metric in zip(axes, ("auc", "accuracy")):
        for model, group in rows.groupby("model"):
            full = group[group["removal"] == "none"]
            for removal, style in (("top", "-"), ("random", "--")):
                line = pd.concat([full, group[group["removal"] == removal]]).sort_values("k")
                label = f"{model}: {'most-attended' if removal == 'top' else 'random'} tiles removed"
                _line(panel, line["k"], line, metric, linestyle=style, label=label,
                      **styles[model])
        panel.set(title=f"{'AUC' if metric == 'auc' else 'accuracy'} of the test slides",
                  xlabel="tiles removed per slide (k)", ylim=(-0.02, 1.02))
        panel.grid(alpha=0.3)
    _legend_outside(figure, axes)
    return figure
