"""Evaluating an image classifier on clean, adversarial and perturbed stores."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import medrobust.evaluate.image_classifier as evaluate
from medrobust.errors import InputError
from medrobust.evaluate.image_classifier import evaluate_image_classifier
from medrobust.evaluate.metrics import METRIC_KEYS
from medrobust.io.image_store import write_image_store

CLASSES = ["benign", "malignant"]


class MeanThreshold(nn.Module):
    """Predicts class 1 when the mean pixel exceeds 0.5; more confident further away."""

    def forward(self, images):
        score = 10.0 * (images.mean(dim=(1, 2, 3)) - 0.5)
        return torch.stack([-score, score], dim=1)


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    """A model folder; loading it gives MeanThreshold (the real loader is tested elsewhere)."""
    def make(name, classes=CLASSES):
        folder = tmp_path / "models" / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"family": "image", "classes": classes}))
        return folder

    loaded = []

    def load_model(folder, device):
        loaded.append((folder, device))
        return MeanThreshold()

    monkeypatch.setattr(evaluate, "load_model", load_model)
    make.loaded = loaded
    return make


def write_store(path, means, labels, splits, **attrs):
    images = np.stack([np.full((1, 4, 4), mean, np.float32) for mean in means])
    write_image_store(path, images, labels, splits, [f"s{i}" for i in range(len(means))],
                      {"dataset": "mammograms", "classes": CLASSES, **attrs})
    return path


def test_clean_evaluation_scores_the_test_split(tmp_path, model_dir):
    # test samples: means 0.2, 0.8, 0.3, 0.9 with labels 0, 1, 1, 1 -> predictions 0, 1, 0, 1
    store = write_store(tmp_path / "clean.zarr", [0.7, 0.2, 0.8, 0.3, 0.9, 0.1],
                        [1, 0, 1, 1, 1, 0], ["train", "test", "test", "test", "test", "val"])
    folder = model_dir("baseline")

    record = evaluate_image_classifier(folder, store, tmp_path / "out.csv", tmp_path / "out.json",
                                       "clean", device="cpu", batch_size=3)

    written = json.loads((tmp_path / "out.json").read_text())
    assert written == record and list(written) == sorted(METRIC_KEYS)
    assert written["model"] == "baseline" and written["dataset"] == "mammograms"
    assert written["condition"] == "clean" and written["kind"] == "clean"
    assert written["n"] == 4 and written["accuracy"] == 0.75 and written["auc"] == 1.0
    for key in ("attack", "perturbation", "epsilon", "severity", "source_model", "white_box"):
        assert written[key] is None
    table = pd.read_csv(tmp_path / "out.csv")
    assert list(table["sample_id"]) == ["s1", "s2", "s3", "s4"]
    assert list(table["prediction"]) == [0, 1, 0, 1]
    assert list(table["correct"]) == [True, True, False, True]
    assert list(table.columns[-2:]) == ["prob_benign", "prob_malignant"]
    assert model_dir.loaded[0][0] == folder and str(model_dir.loaded[0][1]) == "cpu"


@pytest.mark.parametrize("model, white_box", [("surrogate", True), ("denoising", False)])
def test_attack_evaluation_says_white_or_black_box(tmp_path, model_dir, model, white_box):
    store = write_store(tmp_path / "adv.zarr", [0.6, 0.4], [0, 0], ["test", "test"],
                        attack="fgsm", epsilon=8, source_model="surrogate")
    record = evaluate_image_classifier(model_dir(model), store, tmp_path / "o.csv",
                                       tmp_path / "o.json", "fgsm-eps8-from-surrogate", device="cpu")
    assert record["kind"] == "attack" and record["attack"] == "fgsm" and record["epsilon"] == 8
    assert record["source_model"] == "surrogate" and record["white_box"] is white_box
    assert record["accuracy"] == 0.5 and record["auc"] is None  # one class only: AUC undefined
    assert record["perturbation"] is None and record["severity"] is None


def test_perturbation_evaluation(tmp_path, model_dir):
    store = write_store(tmp_path / "p.zarr", [0.6, 0.4], [1, 0], ["test", "test"],
                        perturbation="lowpass", severity=4.0, seed=0)
    record = evaluate_image_classifier(model_dir("baseline"), store, tmp_path / "o.csv",
                                       tmp_path / "o.json", "lowpass-severity4.0", device="cpu")
    assert record["kind"] == "perturbation" and record["perturbation"] == "lowpass"
    assert record["severity"] == 4.0 and record["white_box"] is None and record["accuracy"] == 1.0


def test_class_order_must_match_the_model(tmp_path, model_dir):
    store = write_store(tmp_path / "clean.zarr", [0.6], [1], ["test"])
    with pytest.raises(InputError, match="classes"):
        evaluate_image_classifier(model_dir("baseline", classes=CLASSES[::-1]), store,
                                  tmp_path / "o.csv", tmp_path / "o.json", "clean", device="cpu")
    assert not (tmp_path / "o.json").exists()
