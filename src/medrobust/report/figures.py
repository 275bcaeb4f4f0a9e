"""Report figures, rendered off-screen (Agg) and returned as PNG bytes.

Figures are built on `matplotlib.figure.Figure` directly, not pyplot, so no
global state or display backend is involved.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from medrobust.errors import InputError
from medrobust.io.image_store import open_image_store

_DPI = 100


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    return buffer.getvalue()


def _model_colours(summary: pd.DataFrame) -> dict[str, str]:
    # one colour per model across every panel
    return {model: f"C{index % 10}" for index, model in enumerate(sorted(summary["model"].unique()))}


def _clean_accuracy(summary: pd.DataFrame) -> dict[str, float]:
    clean = summary[summary["kind"] == "clean"]
    return dict(zip(clean["model"], clean["accuracy"]))


def _plot_sweep(axes: Axes, rows: pd.DataFrame, level: str, clean: float | None, **style) -> None:
    """Accuracy against `level`, starting from the clean accuracy at level 0."""
    rows = rows.sort_values(level)
    levels, accuracy = list(rows[level]), list(rows["accuracy"])
    if clean is not None:
        levels, accuracy = [0.0, *levels], [clean, *accuracy]
    axes.plot(levels, accuracy, marker="o", **style)


def _sweep_figure(summary: pd.DataFrame, kind: str, name_column: str, level: str, xlabel: str,
                  line_groups: list[str]) -> bytes:
    """One panel per attack / perturbation name, one line per model (and line group)."""
    rows = summary[summary["kind"] == kind]
    names = sorted(rows[name_column].unique())
    colours, clean = _model_colours(summary), _clean_accuracy(summary)
    figure = Figure(figsize=(4.2 * len(names), 3.4))
    for axes, name in zip(figure.subplots(1, len(names), squeeze=False)[0], names):
        for keys, group in rows[rows[name_column] == name].groupby(line_groups, sort=True):
            model, source = (keys + (None,))[:2]
            transfer = source is not None and source != model
            label = model if source is None else f"{model}, {'from ' + source if transfer else 'white-box'}"
            _plot_sweep(axes, group, level, clean.get(model), color=colours[model], label=label,
                        linestyle="--" if transfer else "-")
        axes.set(title=name, xlabel=xlabel, ylabel="accuracy", ylim=(-0.02, 1.02))
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    return _png(figure)


def accuracy_vs_epsilon(summary: pd.DataFrame) -> bytes:
    """Per attack: accuracy against epsilon for each model, white-box solid, transfer dashed."""
    return _sweep_figure(summary, "attack", "attack", "epsilon", "epsilon (1/255)",
                         ["model", "source_model"])


def accuracy_vs_severity(summary: pd.DataFrame) -> bytes:
    """Per perturbation: accuracy against severity for each model."""
    return _sweep_figure(summary, "perturbation", "perturbation", "severity", "severity",
                         ["model"])


def _show(axes: Axes, image: np.ndarray, title: str | None) -> None:
    """One (C, H, W) image in [0, 1]: grey for one channel, RGB for three."""
    picture = image[0] if image.shape[0] == 1 else np.moveaxis(image[:3], 0, -1)
    axes.imshow(np.clip(picture, 0.0, 1.0), cmap="gray", vmin=0.0, vmax=1.0)
    axes.set_axis_off()
    if title:
        axes.set_title(title, fontsize="small")


def store_title(attrs: dict) -> str:
    """What a derived store holds, in words."""
    if "attack" in attrs:
        return (f"{attrs['attack']} eps {attrs['epsilon']:g}/255, "
                f"crafted on {attrs.get('source_model')}")
    if "perturbation" in attrs:
        return f"{attrs['perturbation']} severity {attrs['severity']:g}"
    return "clean"


def example_grid(clean_store_path: str | os.PathLike, derived_store_path: str | os.PathLike,
                 n_examples: int) -> bytes:
    """Rows of test samples: clean, adversarial (or perturbed), and their difference amplified.

    The difference is shown around mid-grey, scaled so the largest change spans
    the full range; the title says by how much it was amplified.
    """
    clean, derived = open_image_store(clean_store_path), open_image_store(derived_store_path)
    n = min(n_examples, len(derived.sample_ids))
    if n < 1:
        raise InputError(f"{derived_store_path}: no images to show")
    position = {sample_id: index for index, sample_id in enumerate(clean.sample_ids)}
    missing = [s for s in derived.sample_ids[:n] if s not in position]
    if missing:
        raise InputError(f"{clean_store_path}: lacks samples {missing} of {derived_store_path}")
    changed = np.asarray(derived.images[:n])
    original = np.asarray(clean.images.get_orthogonal_selection(
        (np.array([position[s] for s in derived.sample_ids[:n]]),)))
    difference = changed - original
    largest = float(np.abs(difference).max())
    gain = 0.5 / largest if largest > 0 else 1.0
    titles = ["clean", "attacked" if "attack" in derived.attrs else "perturbed",
              f"difference x{gain:.0f}"]
    figure = Figure(figsize=(3 * 1.7, n * 1.7 + 0.4))
    for row, axes in enumerate(figure.subplots(n, 3, squeeze=False)):
        for column, image in enumerate((original[row], changed[row], 0.5 + gain * difference[row])):
            _show(axes[column], image, titles[column] if row == 0 else None)
    figure.suptitle(store_title(derived.attrs), fontsize="medium")
    return _png(figure)
