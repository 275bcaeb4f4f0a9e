"""The Fourier heat map (Yin et al. 2019): a model's error rate under Fourier-basis noise at
every frequency of a grid.

One call per model: the model loads once, the clean test split is read once,
batch by batch, and every batch is perturbed at every frequency of the grid
in memory (no store per frequency), so the cost is the forward passes alone:
(distinct frequencies) x (test images). U_ij and U_-i-j are the same image,
so each mirrored pair is computed once and its error rate written for both
cells. Each frequency draws its signs from its own generator, seeded by
(seed, frequency), so a cell does not depend on the grid around it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from medrobust.config import config_from_mapping
from medrobust.errors import RERUN, ConfigError, InputError
from medrobust.io.atomic import atomic_path
from medrobust.io.image_store import open_image_store
from medrobust.io.result_files import read_result_table
from medrobust.io.test_split import iter_test_batches
from medrobust.logs import get_logger
from medrobust.models.pipeline import load_pipeline
from medrobust.models.registry import check_model_classes
from medrobust.perturbations.fourier import FourierBasisNoise

log = get_logger(__name__)

HEATMAP_COLUMNS = ("model", "dataset", "row_frequency", "column_frequency", "norm", "n",
                   "errors", "error_rate")


@dataclasses.dataclass(frozen=True)
class HeatmapConfig:
    """The `fourier_heatmap` section (docs/config.md)."""

    grid_size: int = 9           # frequencies per axis, odd so that 0 is one of them
    max_frequency: int | None = None  # cycles per image at the grid's edge; None: Nyquist
    norm: float = 4.0            # v, the L2 norm of the basis noise per channel
    batch_size: int = 64

    def __post_init__(self):
        if self.grid_size < 1 or self.grid_size % 2 == 0:
            raise ConfigError(f"fourier_heatmap.grid_size must be odd and >= 1, not "
                              f"{self.grid_size}")
        if self.max_frequency is not None and self.max_frequency < 1:
            raise ConfigError("fourier_heatmap.max_frequency must be >= 1")
        if not self.norm > 0 or self.batch_size < 1:
            raise ConfigError("fourier_heatmap.norm must be > 0 and batch_size >= 1")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "HeatmapConfig":
        return config_from_mapping(cls, mapping, "fourier_heatmap")


def grid_frequencies(size: int, grid_size: int, max_frequency: int | None) -> np.ndarray:
    """The grid's frequencies along an axis of `size` pixels: evenly spaced integers in
    [-f, f], f = max_frequency or the Nyquist frequency size // 2."""
    nyquist = size // 2
    edge = nyquist if max_frequency is None else max_frequency
    if edge > nyquist:
        raise ConfigError(f"fourier_heatmap.max_frequency {edge} exceeds the Nyquist frequency "
                          f"{nyquist} of {size}-pixel images")
    values = np.rint(np.linspace(-edge, edge, grid_size)).astype(int)
    if len(np.unique(values)) != grid_size:
        raise ConfigError(f"fourier_heatmap: {grid_size} frequencies do not fit between "
                          f"-{edge} and {edge} as distinct integers; lower grid_size")
    return values


def _canonical(frequency: tuple[int, int], height: int, width: int) -> tuple[int, int]:
    """One representative of {(i, j), (-i, -j)}, as signed frequencies: the pair gives the
    same basis image."""
    def signed(value: int, size: int) -> int:
        value %= size
        return value - size if value > size // 2 else value

    i, j = frequency
    return min((signed(i, height), signed(j, width)), (signed(-i, height), signed(-j, width)))


def fourier_heatmap(model_dir: str | os.PathLike, clean_store_path: str | os.PathLike,
                    out_csv: str | os.PathLike, settings: Mapping[str, Any] | HeatmapConfig,
                    seed: int, device: str | torch.device = "cpu",
                    denoiser_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Error rate of the model under basis noise of norm v at every grid frequency (i, j).

    Writes one row per grid cell (HEATMAP_COLUMNS): i = `row_frequency`
    (cycles per image down), j = `column_frequency` (across).
    """
    model_dir, device = Path(model_dir), torch.device(device)
    settings = (settings if isinstance(settings, HeatmapConfig)
                else HeatmapConfig.from_mapping(settings))
    store = open_image_store(clean_store_path)
    check_model_classes(model_dir, store.classes, store.path)
    height, width = store.images.shape[-2:]
    rows = grid_frequencies(height, settings.grid_size, settings.max_frequency)
    columns = grid_frequencies(width, settings.grid_size, settings.max_frequency)
    cells = [(int(i), int(j)) for i in rows for j in columns]
    distinct = sorted({_canonical(cell, height, width) for cell in cells})
    noises = {key: FourierBasisNoise(settings.norm, key) for key in distinct}
    generators = {key: np.random.default_rng([seed, key[0] % height, key[1] % width])
                  for key in distinct}
    errors = dict.fromkeys(distinct, 0)
    model = load_pipeline(model_dir, denoiser_dir, device)
    n = 0
    with torch.inference_mode():
        for images, labels in iter_test_batches(store, settings.batch_size,
                                                desc=f"Fourier heat map {model_dir.name}"):
            images = torch.as_tensor(images, dtype=torch.float32, device=device)
            labels = torch.as_tensor(labels, device=device)
            n += len(labels)
            for key in distinct:
                perturbed = noises[key](images, generators[key])
                errors[key] += int((model(perturbed).argmax(dim=1) != labels).sum())
    if n == 0:
        raise InputError(f"{store.path}: no test images for the Fourier heat map")
    table = pd.DataFrame(
        [{"model": model_dir.name, "dataset": store.attrs.get("dataset"), "row_frequency": i,
          "column_frequency": j, "norm": settings.norm, "n": n,
          "errors": errors[_canonical((i, j), height, width)],
          "error_rate": errors[_canonical((i, j), height, width)] / n} for i, j in cells],
        columns=list(HEATMAP_COLUMNS))
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    log.info("%s: Fourier heat map over %d frequencies (%d distinct) x %d test images, "
             "error rate %.3f to %.3f", model_dir.name, len(cells), len(distinct), n,
             table["error_rate"].min(), table["error_rate"].max())
    return table


def read_heatmap(path: str | os.PathLike) -> pd.DataFrame:
    """A heat-map table as `fourier_heatmap` wrote it, checked: every cell of the grid once,
    each with a finite error rate (a missing or empty cell would show as a hole)."""
    table = read_result_table(path, "Fourier heat map", HEATMAP_COLUMNS,
                              finite=HEATMAP_COLUMNS[2:])
    rows, columns = (table[axis].unique() for axis in ("row_frequency", "column_frequency"))
    # the writer's grid is square (grid_size frequencies on both axes), each cell once
    if len(rows) != len(columns) or len(table) != len(rows) * len(columns) \
            or table.duplicated(["row_frequency", "column_frequency"]).any():
        raise InputError(f"{path}: a Fourier heat map holds a square grid, each cell once; "
                         f"this one has {len(table)} cells over {len(rows)} row and "
                         f"{len(columns)} column frequencies; {RERUN}")
    return table
