"""Training image classifiers on a tiny store with an obvious signal."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from medrobust.errors import ConfigError
from medrobust.io.image_store import open_image_store, write_image_store
from medrobust.models import load_model
from medrobust.models.denoising import DenoisingClassifier
from medrobust.train.image_classifier import train_image_classifier

TRAINING = {"epochs": 4, "batch_size": 8, "learning_rate": 0.001, "weight_decay": 0.0001}
MODEL = {"dataset": "squares", "arch": "resnet18", "seed": 0}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_store(path, n_train=32, n_val=16, size=32):
    """Dim noise; class `square` adds a bright 12x12 square somewhere."""
    rng = np.random.default_rng(0)
    n = n_train + n_val
    labels = np.arange(n) % 2
    images = rng.uniform(0, 0.3, (n, 1, size, size)).astype(np.float32)
    for image, label in zip(images, labels):
        if label:
            y, x = rng.integers(0, size - 12, 2)
            image[0, y:y + 12, x:x + 12] = 1.0
    splits = ["train"] * n_train + ["val"] * n_val
    write_image_store(path, images, labels, splits, [f"s{i}" for i in range(n)],
                      {"dataset": "squares", "classes": ["empty", "square"], "image_size": size,
                       "channels": 1})
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("data") / "squares.zarr")


def test_training_learns_the_squares_and_saves_a_loadable_model(store, tmp_path):
    history = train_image_classifier(store, tmp_path / "baseline", MODEL, TRAINING, "cpu")

    assert [record["epoch"] for record in history["epochs"]] == [1, 2, 3, 4]
    best = history["epochs"][history["best_epoch"] - 1]
    assert best["val_accuracy"] >= 0.9
    assert best["val_accuracy"] == max(record["val_accuracy"] for record in history["epochs"])
    config = json.loads((tmp_path / "baseline" / "config.json").read_text())
    assert config == {
        "family": "image", "arch": "resnet18", "pretrained": "none",
        "normalization": "imagenet", "num_classes": 2,
        "in_channels": 1, "classes": ["empty", "square"], "image_size": [32, 32],
        "defense": {"name": "none"},
        "training": {**TRAINING, "augment": True, "optimizer": "adam", "momentum": 0.9,
                     "schedule": "none", "step_size": 30, "gamma": 0.1,
                     "lowpass_augment": None},
        "seed": 0, "dataset": "squares"}
    assert history["recipe"]["optimizer"] == "AdamW"
    assert history["recipe"]["schedule"] == "constant"
    assert [record["learning_rate"] for record in history["epochs"]] == [0.001] * 4
    saved_history = json.loads((tmp_path / "baseline" / "history.json").read_text())
    assert saved_history == history
    # the saved weights are the best epoch's: they reproduce its validation accuracy
    images, labels = open_image_store(store).load("val")
    with torch.no_grad():
        predictions = load_model(tmp_path / "baseline")(torch.from_numpy(images)).argmax(1)
    assert (predictions.numpy() == labels).mean() == best["val_accuracy"]


def test_same_seed_same_weights_other_seed_other_weights(store, tmp_path):
    short = {**TRAINING, "epochs": 1}
    for name, seed, global_seed in (("a", 3, 0), ("b", 3, 1), ("c", 4, 0)):
        torch.manual_seed(global_seed)  # the global generator's state must not matter
        train_image_classifier(store, tmp_path / name, {**MODEL, "seed": seed}, short, "cpu")
    a, b, c = (load_file(tmp_path / name / "model.safetensors") for name in "abc")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], c[key]) for key in a)


def test_denoising_training_records_loss_components(store, tmp_path):
    defense = {"name": "denoising", "lambda_n": 0.1, "lambda_a": 1.0, "noise_sigma": 0.0314}
    history = train_image_classifier(store, tmp_path / "denoising",
                                     {**MODEL, "defense": defense},
                                     {**TRAINING, "epochs": 1, "augment": False}, "cpu")
    record = history["epochs"][0]
    assert {"train_loss", "train_lc", "train_ln", "train_la", "val_loss", "val_accuracy"} \
        <= set(record)
    assert record["train_loss"] == pytest.approx(
        record["train_lc"] + 0.1 * record["train_ln"] + record["train_la"])
    assert isinstance(load_model(tmp_path / "denoising"), DenoisingClassifier)
    config = json.loads((tmp_path / "denoising" / "config.json").read_text())
    assert config["defense"] == {**defense, "distance": "l2"}  # the default, recorded


def test_training_from_a_local_weights_file_records_which_file(store, tmp_path):
    weights = tmp_path / "resnet18-local.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    model = {**MODEL, "pretrained": str(weights)}
    train_image_classifier(store, tmp_path / "m", model, {**TRAINING, "epochs": 1}, "cpu")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["pretrained"] == str(weights)
    assert config["pretrained_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_without_validation_images_the_last_epoch_is_kept(tmp_path):
    store = make_store(tmp_path / "train_only.zarr", n_train=8, n_val=0, size=16)
    history = train_image_classifier(store, tmp_path / "m", MODEL,
                                     {**TRAINING, "epochs": 2}, "cpu")
    assert history["best_epoch"] == 2 and history["selected_by"] == "last_epoch"
    assert history["epochs"][-1]["val_accuracy"] is None


@pytest.mark.parametrize("schedule, rates", [
    ({"schedule": "step", "step_size": 2, "gamma": 0.5}, [0.01, 0.01, 0.005, 0.005]),
    ({"schedule": "cosine"}, [0.01 * (1 + math.cos(math.pi * epoch / 4)) / 2
                              for epoch in range(4)]),
])
def test_sgd_with_a_schedule_as_the_paper_trained(store, tmp_path, schedule, rates):
    seen = []
    handle = register_optimizer_step_post_hook(
        lambda optimizer, args, kwargs: seen.append(
            (type(optimizer).__name__, optimizer.param_groups[0]["momentum"])))
    training = {**TRAINING, "optimizer": "sgd", "momentum": 0.8, "learning_rate": 0.01,
                **schedule}
    try:
        history = train_image_classifier(store, tmp_path / "sgd", MODEL, training, "cpu")
    finally:
        handle.remove()
    assert set(seen) == {("SGD", 0.8)}
    assert [record["learning_rate"] for record in history["epochs"]] == pytest.approx(rates)
    assert history["recipe"]["optimizer"] == "SGD, momentum 0.8"
    assert history["recipe"]["schedule"] == {"step": "step: ×0.5 every 2 epochs",
                                             "cosine": "cosine to 0 over 4 epochs"}[
                                                 schedule["schedule"]]
    recorded = json.loads((tmp_path / "sgd" / "config.json").read_text())["training"]
    assert recorded == {**TRAINING, "augment": True, "momentum": 0.8, "step_size": 30,
                        "gamma": 0.1, "lowpass_augment": None, **training}


@pytest.mark.parametrize("model, training, key", [
    ({**MODEL, "depth": 3}, TRAINING, "depth"),
    (MODEL, {**TRAINING, "nesterov": True}, "nesterov"),
    (MODEL, {**TRAINING, "optimizer": "sgdd"}, "optimizer must be one of adam, sgd, not 'sgdd'"),
    (MODEL, {**TRAINING, "schedule": "cosin"}, "schedule must be one of none, step, cosine"),
    (MODEL, {**TRAINING, "momentum": 1.0}, "momentum"),
    (MODEL, {**TRAINING, "schedule": "step", "gamma": 0}, "gamma"),
    (MODEL, {**TRAINING, "schedule": "step", "step_size": 0}, "step_size"),
    (MODEL, {"epochs": 1}, "batch_size"),
    ({**MODEL, "arch": "alexnet"}, TRAINING, "alexnet"),
    ({**MODEL, "pretrained": "radimagenet"}, TRAINING, "pretrained"),
    ({**MODEL, "pretrained": "/nowhere/resnet18.pth"}, TRAINING,
     "pretrained: no weights file '/nowhere/resnet18.pth'; pretrained takes"),
])
def test_bad_config_is_refused_before_training(store, tmp_path, model, training, key):
    with pytest.raises(ConfigError, match=key):
        train_image_classifier(store, tmp_path / "m", model, training, "cpu")
    assert not (tmp_path / "m").exists()
