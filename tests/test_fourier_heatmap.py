"""The Fourier heat map: its grid, and error rates checked against a model whose errors are
known frequency by frequency."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import medrobust.evaluate.fourier_heatmap as heatmap_module
from medrobust.errors import ConfigError, InputError
from medrobust.evaluate.fourier_heatmap import (
    HEATMAP_COLUMNS, HeatmapConfig, fourier_heatmap, grid_frequencies, read_heatmap)
from medrobust.io.image_store import write_image_store
from medrobust.perturbations.fourier import fourier_basis
from medrobust.report import figures

CLASSES = ["benign", "malignant"]
SIZE = 8


class SeesOneFrequency(nn.Module):
    """Says malignant when the image has energy at one frequency (its basis image's
    projection is large), else benign: basis noise fools it only at that frequency."""

    def __init__(self, frequency):
        super().__init__()
        self.basis = fourier_basis(SIZE, SIZE, frequency).float()

    def forward(self, images):
        projection = (images[:, 0] * self.basis).sum(dim=(-2, -1)).abs()
        score = 10.0 * (projection - 0.5)
        return torch.stack([-score, score], dim=1)


@pytest.fixture
def clean_store(tmp_path):
    """Six benign test images of constant grey (no energy away from the zero frequency)
    and one training image."""
    images = np.full((7, 1, SIZE, SIZE), 0.5, np.float32)
    splits = ["test"] * 6 + ["train"]
    write_image_store(tmp_path / "clean.zarr", images, np.zeros(7, np.int64), splits,
                      [f"s{i}" for i in range(7)], {"dataset": "mammograms", "classes": CLASSES})
    return tmp_path / "clean.zarr"


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    folder = tmp_path / "models" / "baseline"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"family": "image", "classes": CLASSES}))
    model = SeesOneFrequency((2, -1))
    monkeypatch.setattr(heatmap_module, "load_pipeline", lambda *args: model)
    return folder


def test_the_grid_spans_the_spectrum_in_evenly_spaced_integer_frequencies():
    np.testing.assert_array_equal(grid_frequencies(64, 9, None), [-32, -24, -16, -8, 0, 8, 16,
                                                                  24, 32])
    np.testing.assert_array_equal(grid_frequencies(15, 5, 4), [-4, -2, 0, 2, 4])
    with pytest.raises(ConfigError, match="Nyquist"):
        grid_frequencies(16, 5, 9)
    with pytest.raises(ConfigError, match="distinct"):
        grid_frequencies(16, 9, 2)
    with pytest.raises(ConfigError, match="odd"):
        HeatmapConfig(grid_size=4)
    with pytest.raises(ConfigError, match="unknown"):
        HeatmapConfig.from_mapping({"grid": 3})


def test_the_error_rate_is_one_exactly_at_the_frequency_the_model_sees(tmp_path, clean_store,
                                                                      model_dir):
    out = tmp_path / "heatmap.csv"
    settings = {"grid_size": 9, "max_frequency": 4, "norm": 1.0, "batch_size": 4}
    table = fourier_heatmap(model_dir, clean_store, out, settings, seed=0)
    assert list(table.columns) == list(HEATMAP_COLUMNS) and len(table) == 81
    pd.testing.assert_frame_equal(read_heatmap(out), table)
    assert (table["n"] == 6).all() and (table["norm"] == 1.0).all()
    assert set(table["model"]) == {"baseline"} and set(table["dataset"]) == {"mammograms"}
    fooled = table[table["error_rate"] > 0]
    # the basis at (2, -1) and its mirror (-2, 1) are the same image
    assert sorted(zip(fooled["row_frequency"], fooled["column_frequency"])) == [(-2, 1), (2, -1)]
    assert (fooled["error_rate"] == 1.0).all() and (fooled["errors"] == 6).all()
    # a weaker noise stays below the model's threshold everywhere
    weak = fourier_heatmap(model_dir, clean_store, out, {**settings, "norm": 0.4}, seed=0)
    assert (weak["error_rate"] == 0).all()


def test_the_heat_map_figure_has_one_panel_per_model_on_one_scale(tmp_path, clean_store,
                                                                 model_dir):
    settings = {"grid_size": 5, "norm": 1.0}
    table = fourier_heatmap(model_dir, clean_store, tmp_path / "a.csv", settings, seed=0)
    figure = figures.fourier_heatmaps({"baseline": table, "other": table.assign(model="other")})
    panels = [axes for axes in figure.axes if axes.get_images()]
    assert [axes.get_title().split(" ")[0] for axes in panels] == ["baseline", "other"]
    assert all("cycles per image" in axes.get_xlabel() for axes in panels)
    assert all(axes.get_images()[0].get_clim() == (0.0, 1.0) for axes in panels)
    assert figures.png(figure).startswith(b"\x89PNG")


def test_a_heat_map_table_without_its_columns_is_refused(tmp_path):
    (tmp_path / "bad.csv").write_text("model,error_rate\nbaseline,0.5\n")
    with pytest.raises(InputError, match="bad.csv"):
        read_heatmap(tmp_path / "bad.csv")


@pytest.mark.parametrize("damage, match", [
    (lambda lines: lines[:7] + lines[8:],
     r"a Fourier heat map holds a square grid, each cell once; this one has 24 cells"),
    (lambda lines: lines[:3] + [lines[3].rsplit(",", 1)[0] + ",nan"] + lines[4:],
     r"line 4: error_rate must be a finite number, not empty or NaN"),
    (lambda lines: lines[:5] + [lines[5].rsplit(",", 1)[0] + ",high"] + lines[6:],
     r"line 6: error_rate must be a finite number, not 'high'"),
])
def test_a_damaged_heat_map_is_refused_naming_it(tmp_path, clean_store, model_dir, damage,
                                                 match):
    """A lost cell, or an error rate that is no number, was drawn as a hole (or a word gave
    matplotlib's TypeError)."""
    out = tmp_path / "heatmap.csv"
    fourier_heatmap(model_dir, clean_store, out, {"grid_size": 5, "norm": 1.0}, seed=0)
    out.write_text("\n".join(damage(out.read_text().splitlines())) + "\n")
    with pytest.raises(InputError, match=rf"heatmap\.csv: {match}"):
        read_heatmap(out)


def test_a_heat_map_cut_short_is_refused_naming_it(tmp_path, clean_store, model_dir):
    out = tmp_path / "heatmap.csv"
    fourier_heatmap(model_dir, clean_store, out, {"grid_size": 5, "norm": 1.0}, seed=0)
    out.write_bytes(out.read_bytes()[:300])
    with pytest.raises(InputError, match=r"heatmap\.csv: the Fourier heat map is cut short"):
        read_heatmap(out)
