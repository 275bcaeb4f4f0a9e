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

    def load_pipeline(folder, denoiser_dir, device):
        loaded.append((folder, device))
        return MeanThreshold()

    monkeypatch.setattr(evaluate, "load_pipeline", load_pipeline)
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

    records = evaluate_image_classifier(folder, {"clean": store}, store, tmp_path / "run",
                                        device="cpu", batch_size=3)

    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == [
        "clean.csv", "clean.json", "operating_point.json"]
    written = json.loads((tmp_path / "run/clean.json").read_text())
    assert written == records["clean"] and list(written) == sorted(METRIC_KEYS)
    assert written["model"] == "baseline" and written["dataset"] == "mammograms"
    assert written["condition"] == "clean" and written["kind"] == "clean"
    assert written["n"] == 4 and written["accuracy"] == 0.75 and written["auc"] == 1.0
    for key in ("attack", "perturbation", "epsilon", "severity", "source_model", "white_box",
                "detection_rate"):
        assert written[key] is None
    table = pd.read_csv(tmp_path / "run/clean.csv")
    assert list(table["sample_id"]) == ["s1", "s2", "s3", "s4"]
    assert list(table["prediction"]) == [0, 1, 0, 1]
    assert list(table["correct"]) == [True, True, False, True]
    assert list(table.columns[-2:]) == ["prob_benign", "prob_malignant"]
    assert model_dir.loaded[0][0] == folder and str(model_dir.loaded[0][1]) == "cpu"


@pytest.mark.parametrize("model, white_box", [("surrogate", True), ("denoising", False)])
def test_attack_evaluation_says_white_or_black_box(tmp_path, model_dir, model, white_box):
    store = write_store(tmp_path / "adv.zarr", [0.6, 0.4], [0, 0], ["test", "test"],
                        attack="fgsm", epsilon=8, source_model="surrogate")
    name = "fgsm-eps8-from-surrogate"
    record = evaluate_image_classifier(model_dir(model), {name: store}, store,
                                       tmp_path / "run")[name]
    assert record["kind"] == "attack" and record["attack"] == "fgsm" and record["epsilon"] == 8
    assert record["source_model"] == "surrogate" and record["white_box"] is white_box
    assert record["accuracy"] == 0.5 and record["auc"] is None  # one class only: AUC undefined
    assert record["perturbation"] is None and record["severity"] is None


def test_perturbation_evaluation(tmp_path, model_dir):
    store = write_store(tmp_path / "p.zarr", [0.6, 0.4], [1, 0], ["test", "test"],
                        perturbation="lowpass", severity=4.0, seed=0)
    name = "lowpass-severity4.0"
    record = evaluate_image_classifier(model_dir("baseline"), {name: store}, store,
                                       tmp_path / "run")[name]
    assert record["kind"] == "perturbation" and record["perturbation"] == "lowpass"
    assert record["severity"] == 4.0 and record["white_box"] is None and record["accuracy"] == 1.0


def test_one_job_evaluates_every_condition_with_one_model_load(tmp_path, model_dir):
    clean = write_store(tmp_path / "clean.zarr", [0.2, 0.8], [0, 1], ["test", "test"])
    noisy = write_store(tmp_path / "noisy.zarr", [0.6, 0.8], [0, 1], ["test", "test"],
                        perturbation="gaussian_noise", severity=0.1, seed=0)
    records = evaluate_image_classifier(model_dir("baseline"), {"clean": clean, "noise": noisy},
                                        clean, tmp_path / "run")
    assert records["clean"]["accuracy"] == 1.0 and records["noise"]["accuracy"] == 0.5
    assert len(model_dir.loaded) == 1
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == [
        "clean.csv", "clean.json", "noise.csv", "noise.json", "operating_point.json"]


def test_class_order_must_match_the_model_and_nothing_is_written(tmp_path, model_dir):
    clean = write_store(tmp_path / "clean.zarr", [0.6], [1], ["test"])
    swapped = write_store(tmp_path / "swapped.zarr", [0.6], [1], ["test"],
                          classes=CLASSES[::-1])
    with pytest.raises(InputError, match="swapped.zarr.*classes|classes.*swapped.zarr"):
        evaluate_image_classifier(model_dir("baseline"), {"clean": clean, "odd": swapped},
                                  clean, tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists() and list(tmp_path.glob(".run*")) == []


def test_the_operating_point_is_chosen_on_the_val_split_not_the_test_split(tmp_path,
                                                                          model_dir):
    # val: means 0.35 (benign), 0.45 (malignant), 0.7 (malignant): P(malignant) separates
    # them between 0.35's and 0.45's scores; test: 0.45 benign, 0.55 malignant
    store = write_store(tmp_path / "clean.zarr", [0.35, 0.45, 0.7, 0.45, 0.55, 0.9],
                        [0, 1, 1, 0, 1, 0], ["val", "val", "val", "test", "test", "train"])
    evaluate_image_classifier(model_dir("baseline"), {"clean": store}, store, tmp_path / "run")
    point = json.loads((tmp_path / "run/operating_point.json").read_text())
    scores = torch.softmax(MeanThreshold()(torch.tensor([0.35, 0.45]).view(2, 1, 1, 1)), 1)
    assert point["threshold"] == pytest.approx(float(scores[:, 1].mean()))
    assert point["threshold"] < 0.4   # chosen on the two test images, it would be 0.5
    assert (point["chosen_on"], point["n"], point["n_positive"], point["positive_class"]) == (
        "val", 3, 2, "malignant")


@pytest.mark.parametrize("splits, reason", [
    (["test", "test", "train"], "the val split's 0 sample"),
    (["test", "test", "val"], "only malignant cases")])
def test_without_both_classes_in_val_the_operating_point_is_empty_and_says_why(
        tmp_path, model_dir, splits, reason):
    store = write_store(tmp_path / "clean.zarr", [0.2, 0.8, 0.7], [0, 1, 1], splits)
    evaluate_image_classifier(model_dir("baseline"), {"clean": store}, store, tmp_path / "run")
    point = json.loads((tmp_path / "run/operating_point.json").read_text())
    assert point["threshold"] is None and reason in point["reason"]
