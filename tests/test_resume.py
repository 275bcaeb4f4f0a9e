"""A training job killed mid-epoch resumes from its last checkpoint to the same final weights."""

import json
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook
from test_mil import CLASSES, _synthetic_slides
from test_train_image_classifier import make_store

from medrobust.train import checkpoints
from medrobust.train.checkpoints import CHECKPOINTS_DIR, TrainingCheckpoint, checkpoint_dir_for
from medrobust.train.image_classifier import train_image_classifier
from medrobust.train.slide_classifier import train_slide_classifier

SRC = Path(__file__).resolve().parents[1] / "src"
# 16 train images in batches of 8: 2 optimiser steps an epoch; the denoising
# defense draws noise, the flips draw from the batch generator
IMAGE_MODEL = {"dataset": "squares", "arch": "resnet18", "seed": 5,
               "defense": {"name": "denoising", "lambda_n": 0.1, "lambda_a": 1.0,
                           "noise_sigma": 0.05}}
IMAGE_TRAINING = {"epochs": 4, "batch_size": 8, "learning_rate": 0.001, "weight_decay": 1e-4}
IMAGE_STEPS_PER_EPOCH = 2
# 12 train slides, one step per bag; dropout draws from the global generator
SLIDE_MODEL = {"dataset": "slides", "arch": "abmil", "seed": 2, "epochs": 6,
               "learning_rate": 0.01, "weight_decay": 1e-4, "classes": CLASSES,
               "arch_options": {"hidden_dim": 16, "attention_dim": 8, "dropout": 0.3}}
SLIDE_STEPS_PER_EPOCH = 12

# Runs one training job and SIGKILLs it (no clean-up, as the OOM killer or a
# cluster's time limit would) right after optimiser step `kill_after_steps`.
KILLED_JOB = r"""
import json, os, signal, sys
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import medrobust.train.checkpoints

torch.set_num_threads(1)
medrobust.train.checkpoints.WORK_PER_WRITE = 0.0  # a checkpoint after every epoch
job = json.loads(sys.argv[1])
steps = 0

def kill_mid_epoch(optimizer, args, kwargs):
    global steps
    steps += 1
    if steps == job["kill_after_steps"]:
        os.kill(os.getpid(), signal.SIGKILL)

register_optimizer_step_post_hook(kill_mid_epoch)
if job["family"] == "image":
    from medrobust.train.image_classifier import train_image_classifier
    train_image_classifier(job["store"], job["model_dir"], job["model"], job["training"], "cpu")
else:
    from medrobust.train.slide_classifier import train_slide_classifier
    train_slide_classifier(job["features"], job["model_dir"], job["model"], "cpu")
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def run_killed_job(job: dict) -> None:
    result = subprocess.run([sys.executable, "-c", KILLED_JOB, json.dumps(job)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]


def only_checkpoint(model_dir: Path) -> dict:
    found = list(checkpoint_dir_for(model_dir).glob("*.pt"))
    assert len(found) == 1, found
    return torch.load(found[0], weights_only=True)


def assert_same_weights(first: Path, second: Path) -> None:
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"weights differ in {different}"


def test_image_training_killed_mid_epoch_resumes_to_the_same_weights(tmp_path, caplog):
    store = make_store(tmp_path / "squares.zarr", n_train=16, n_val=8, size=16)
    models = tmp_path / "models" / "squares"
    train_image_classifier(store, models / "whole", IMAGE_MODEL, IMAGE_TRAINING, "cpu")
    assert list((models / CHECKPOINTS_DIR).iterdir()) == []  # removed once the model is saved

    # killed in epoch 3, after 1 of its 2 steps
    run_killed_job({"family": "image", "store": str(store), "model_dir": str(models / "killed"),
                    "model": IMAGE_MODEL, "training": IMAGE_TRAINING,
                    "kill_after_steps": 2 * IMAGE_STEPS_PER_EPOCH + 1})
    assert not (models / "killed" / "model.safetensors").exists()
    checkpoint = only_checkpoint(models / "killed")
    assert checkpoint["epoch"] == 2 and len(checkpoint["history"]) == 2
    # the kept epoch's weights are stored apart only when it is not the last one (which of
    # the two wins depends on the CPU's floating point: epoch 1 on some machines, 2 on others)
    assert checkpoint["best_epoch"] in (1, 2)
    assert (checkpoint["best_state"] is None) == (checkpoint["best_epoch"] == 2)

    with caplog.at_level(logging.INFO, logger="medrobust"):
        history = train_image_classifier(store, models / "killed", IMAGE_MODEL, IMAGE_TRAINING,
                                         "cpu")
    assert "killed: resuming after epoch 2 of 4" in caplog.text
    assert [record["epoch"] for record in history["epochs"]] == [1, 2, 3, 4]
    assert_same_weights(models / "whole", models / "killed")
    assert json.loads((models / "killed" / "history.json").read_text()) == \
        json.loads((models / "whole" / "history.json").read_text())
    assert list((models / CHECKPOINTS_DIR).iterdir()) == []


def test_a_learning_rate_schedule_resumes_where_it_stopped(tmp_path, caplog):
    """Killed with two epochs to go: a schedule restarted from epoch 0 would give them
    other learning rates (the optimiser's saved rate alone only fixes the next epoch)."""
    training = {**IMAGE_TRAINING, "optimizer": "sgd", "learning_rate": 0.01,
                "schedule": "cosine"}
    store = make_store(tmp_path / "squares.zarr", n_train=16, n_val=8, size=16)
    models = tmp_path / "models" / "squares"
    whole = train_image_classifier(store, models / "whole", IMAGE_MODEL, training, "cpu")

    # killed in epoch 3, after 1 of its 2 steps
    run_killed_job({"family": "image", "store": str(store), "model_dir": str(models / "killed"),
                    "model": IMAGE_MODEL, "training": training,
                    "kill_after_steps": 2 * IMAGE_STEPS_PER_EPOCH + 1})
    checkpoint = only_checkpoint(models / "killed")
    assert checkpoint["epoch"] == 2 and checkpoint["scheduler"]["last_epoch"] == 2

    with caplog.at_level(logging.INFO, logger="medrobust"):
        resumed = train_image_classifier(store, models / "killed", IMAGE_MODEL, training, "cpu")
    assert "killed: resuming after epoch 2 of 4" in caplog.text
    rates = [record["learning_rate"] for record in resumed["epochs"]]
    assert rates == pytest.approx([0.01 * (1 + math.cos(math.pi * epoch / 4)) / 2
                                   for epoch in range(4)])
    assert rates == [record["learning_rate"] for record in whole["epochs"]]
    assert_same_weights(models / "whole", models / "killed")


def test_slide_training_killed_mid_epoch_resumes_to_the_same_weights(tmp_path, caplog):
    features = [str(path) for path in _synthetic_slides(tmp_path / "features")]
    models = tmp_path / "models" / "slides"
    train_slide_classifier(features, models / "whole", SLIDE_MODEL, "cpu")

    # killed in epoch 5, after 5 of its 12 steps
    run_killed_job({"family": "slide", "features": features, "model_dir": str(models / "killed"),
                    "model": SLIDE_MODEL, "kill_after_steps": 4 * SLIDE_STEPS_PER_EPOCH + 5})
    checkpoint = only_checkpoint(models / "killed")
    assert checkpoint["epoch"] == 4
    # the best epoch's weights are stored apart only when they are not the checkpoint's model
    assert (checkpoint["best_state"] is None) == (checkpoint["best_epoch"] == 4)

    with caplog.at_level(logging.INFO, logger="medrobust"):
        train_slide_classifier(features, models / "killed", SLIDE_MODEL, "cpu")
    assert "killed: resuming after epoch 4 of 6" in caplog.text
    assert_same_weights(models / "whole", models / "killed")
    assert list((models / CHECKPOINTS_DIR).iterdir()) == []


class Crash(Exception):
    pass


def crash_after(steps: int):
    count = 0

    def hook(optimizer, args, kwargs):
        nonlocal count
        count += 1
        if count == steps:
            raise Crash

    return register_optimizer_step_post_hook(hook)


def test_an_edited_config_starts_afresh_and_removes_the_stale_checkpoint(tmp_path, caplog):
    store = make_store(tmp_path / "squares.zarr", n_train=16, n_val=8, size=16)
    model_dir = tmp_path / "models" / "squares" / "baseline"
    training = {**IMAGE_TRAINING, "epochs": 2}
    handle = crash_after(IMAGE_STEPS_PER_EPOCH + 1)  # in epoch 2
    try:
        with pytest.raises(Crash):
            train_image_classifier(store, model_dir, IMAGE_MODEL, training, "cpu")
    finally:
        handle.remove()
    stale = list(checkpoint_dir_for(model_dir).glob("*.pt"))
    assert len(stale) == 1

    edited = {**training, "learning_rate": 0.002}
    with caplog.at_level(logging.INFO, logger="medrobust"):
        history = train_image_classifier(store, model_dir, IMAGE_MODEL, edited, "cpu")
    assert "resuming" not in caplog.text
    assert "removing the checkpoint of a run with another config" in caplog.text
    assert history["recipe"]["learning_rate"] == 0.002 and len(history["epochs"]) == 2
    assert not stale[0].exists() and not checkpoint_dir_for(model_dir).exists()


def test_edited_training_code_or_other_features_start_afresh(tmp_path, monkeypatch, caplog):
    """A checkpoint is keyed by the training code too: a bug fixed after a crash must not
    keep the epochs the bug trained. A slide model's key holds its features themselves:
    slides cut anew have the same tile counts."""
    features = [str(path) for path in _synthetic_slides(tmp_path / "features")]
    model_dir = tmp_path / "models" / "slides" / "abmil"
    handle = crash_after(SLIDE_STEPS_PER_EPOCH + 3)  # in epoch 2
    try:
        with pytest.raises(Crash):
            train_slide_classifier(features, model_dir, SLIDE_MODEL, "cpu")
    finally:
        handle.remove()
    (stale,) = checkpoint_dir_for(model_dir).glob("*.pt")
    key = TrainingCheckpoint(model_dir, "a key").key
    monkeypatch.setattr(checkpoints, "code_fingerprint", lambda *parts: "edited code")
    assert TrainingCheckpoint(model_dir, "a key").key != key
    monkeypatch.undo()
    # the same slides, tile counts and config, one feature changed
    from medrobust.io.slide_stores import open_feature_store
    import zarr
    first = zarr.open_group(features[0], mode="r+")["features"]
    first[0, 0] = float(first[0, 0]) + 1.0
    assert len(open_feature_store(features[0]).features) == first.shape[0]
    with caplog.at_level(logging.INFO, logger="medrobust"):
        train_slide_classifier(features, model_dir, SLIDE_MODEL, "cpu")
    assert "resuming" not in caplog.text and not stale.exists()


def test_checkpoint_lives_beside_the_model_folder_not_in_it(tmp_path):
    model_dir = tmp_path / "results" / "models" / "ds" / "baseline"
    assert checkpoint_dir_for(model_dir) == \
        tmp_path / "results" / "models" / "ds" / ".checkpoints" / "baseline"


def test_epochs_much_shorter_than_a_checkpoint_write_share_one(tmp_path, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(checkpoints.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(checkpoints, "atomic_path", slow_atomic_path(now, seconds=2.0))
    checkpoint = TrainingCheckpoint(tmp_path / "m", "key")
    assert checkpoint.due()  # the first of a run
    checkpoint.save({"epoch": 1})
    now[0] += 5.0  # a 5 s epoch: less than 4 times the 2 s write
    assert not checkpoint.due()
    now[0] += 3.0  # 8 s of training since it
    assert checkpoint.due()
    assert torch.load(checkpoint.path, weights_only=True)["epoch"] == 1


def slow_atomic_path(now, seconds):
    real = checkpoints.atomic_path

    def atomic_path(path):
        now[0] += seconds
        return real(path)

    return atomic_path
