"""Train one image classifier (optionally with a defense) on an image store.

The epoch with the best validation accuracy (ties: lower validation loss) is
kept; without validation images, the last epoch. The same config and seed give
the same weights on the CPU: initialisation and dropout draw from the seeded
global generator inside `fork_rng`, batch order and flips from a CPU
generator, and defense noise from a generator on the training device.

Epochs end with a checkpoint (`medrobust.train.checkpoints`) that a rerun
after a kill resumes from, to the same final weights.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from medrobust.errors import ConfigError, InputError, check_choice, unknown_name
from medrobust.io.image_store import open_image_store
from medrobust.logs import get_logger
from medrobust.progress import progress
from medrobust.config import PRETRAINED, config_from_mapping, pretrained_problem
from medrobust.io.checksums import sha256_file
from medrobust.models.image_classifiers import NORMALIZATIONS
from medrobust.models.registry import (
    IMAGE_CLASSIFIERS, Defense, build_defense, build_model, defense_config)
from medrobust.train.augmentation import LowPassAugmentation
from medrobust.train.checkpoints import (
    Progress, TrainingCheckpoint, fingerprint, resume, save_kept_epoch, save_progress)

log = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class ImageModelConfig:
    """One entry of `image_classifiers` in config.yaml."""

    dataset: str
    arch: str
    seed: int = 0
    defense: Mapping[str, Any] | None = None
    pretrained: str = "none"
    normalization: str = "imagenet"

    def __post_init__(self):
        if self.arch not in IMAGE_CLASSIFIERS:
            raise unknown_name("image classifier", self.arch, IMAGE_CLASSIFIERS)
        check_choice("image classifier: normalization", self.normalization, NORMALIZATIONS)
        problem = pretrained_problem(self.pretrained)
        if problem:
            raise ConfigError(f"image classifier: pretrained: {problem}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "ImageModelConfig":
        return config_from_mapping(cls, mapping, "image classifier")


OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("none", "step", "cosine")


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """The `image_training` section of config.yaml (a model's `training` over it).

    `adam` is AdamW (weight decay decoupled from the adaptive step); `sgd` is
    SGD with momentum and L2 weight decay, the paper's optimiser. Schedules
    change the learning rate once per epoch: `step` multiplies it by `gamma`
    every `step_size` epochs, `cosine` anneals it to 0 over `epochs`.
    """

    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    augment: bool = True  # random horizontal and vertical flips
    optimizer: str = "adam"
    momentum: float = 0.9  # sgd only
    schedule: str = "none"
    step_size: int = 30  # step only; 30 and 0.1 as torchvision's ResNet recipe
    gamma: float = 0.1  # step only
    lowpass_augment: Mapping[str, Any] | None = None  # LowPassAugmentation's settings

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("image_training: epochs and batch_size must be >= 1")
        if self.learning_rate <= 0 or self.weight_decay < 0:
            raise ConfigError("image_training: learning_rate must be > 0, weight_decay >= 0")
        check_choice("image_training: optimizer", self.optimizer, OPTIMIZERS)
        check_choice("image_training: schedule", self.schedule, SCHEDULES)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"image_training: momentum must be in [0, 1), not {self.momentum}")
        if self.step_size < 1 or not 0 < self.gamma <= 1:
            raise ConfigError("image_training: step_size must be >= 1 and gamma in (0, 1]")
        self.lowpass()  # checks the settings now, not at the first batch

    def lowpass(self) -> LowPassAugmentation | None:
        return (None if self.lowpass_augment is None
                else LowPassAugmentation.from_mapping(self.lowpass_augment))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "TrainingConfig":
        return config_from_mapping(cls, mapping, "image_training")

    def make_optimizer(self, parameters) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(parameters, lr=self.learning_rate, momentum=self.momentum,
                                   weight_decay=self.weight_decay)
        return torch.optim.AdamW(parameters, lr=self.learning_rate,
                                 weight_decay=self.weight_decay)

    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> LRScheduler | None:
        """The per-epoch learning-rate schedule; None for a constant rate."""
        if self.schedule == "step":
            return torch.optim.lr_scheduler.StepLR(optimizer, self.step_size, self.gamma)
        if self.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs)
        return None

    def recipe(self) -> dict[str, Any]:
        """The optimiser and schedule in words, for the history and the report."""
        optimizer = f"SGD, momentum {self.momentum}" if self.optimizer == "sgd" else "AdamW"
        schedule = {"none": "constant",
                    "step": f"step: ×{self.gamma} every {self.step_size} epochs",
                    "cosine": f"cosine to 0 over {self.epochs} epochs"}[self.schedule]
        return {"optimizer": optimizer, "learning_rate": self.learning_rate,
                "weight_decay": self.weight_decay, "schedule": schedule}


def train_image_classifier(store_path: str | os.PathLike, model_dir: str | os.PathLike,
                           model_config: Mapping[str, Any], training_config: Mapping[str, Any],
                           device: str | torch.device = "cpu",
                           checkpoint_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train, select the best epoch, save to `model_dir`; returns the history.

    Resumes from the checkpoint of an interrupted run of the same config on
    the same data; `checkpoint_dir` defaults to `.checkpoints/{model}` beside
    `model_dir`.
    """
    spec = ImageModelConfig.from_mapping(model_config)
    training = TrainingConfig.from_mapping(training_config)
    defense = build_defense(spec.defense)
    device = torch.device(device)
    store = open_image_store(store_path)
    (train_images, train_labels), (val_images, val_labels) = training_splits(store)
    labels = torch.cat([train_labels, val_labels])
    if len(store.classes) < 2 or labels.min() < 0 or labels.max() >= len(store.classes):
        raise InputError(f"{store.path}: labels do not fit the classes {store.classes}")
    config = {
        "family": "image", "arch": spec.arch, "pretrained": spec.pretrained,
        "normalization": spec.normalization,
        "num_classes": len(store.classes), "in_channels": int(train_images.shape[1]),
        "classes": store.classes, "image_size": list(train_images.shape[-2:]),
        "defense": defense_config(defense), "training": dataclasses.asdict(training),
        "seed": spec.seed, "dataset": spec.dataset,
    }
    if spec.pretrained not in PRETRAINED:  # a weights file: which one, whatever its path
        config["pretrained_sha256"] = sha256_file(spec.pretrained)
    name = Path(model_dir).name
    checkpoint = TrainingCheckpoint(model_dir, fingerprint(
        config, store.attrs, store.sample_ids, store.labels, store.splits, device.type),
        checkpoint_dir)
    log.info("training %s (%s, defense %s) on %d train / %d val images of %s, device %s",
             name, spec.arch, config["defense"]["name"], len(train_images), len(val_images),
             store.path, device)
    started = time.perf_counter()
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(spec.seed)
        model = build_model(config).to(device)
        best_state, history = _fit(model, defense, training, spec.seed, device, name,
                                   (train_images, train_labels), (val_images, val_labels),
                                   checkpoint)
    return save_kept_epoch(model, best_state, model_dir, config, history, checkpoint, name, started)


def _fit(model: nn.Module, defense: Defense, training: TrainingConfig, seed: int,
         device: torch.device, name: str, train: tuple[torch.Tensor, torch.Tensor],
         val: tuple[torch.Tensor, torch.Tensor],
         checkpoint: TrainingCheckpoint) -> tuple[dict, dict[str, Any]]:
    optimizer = training.make_optimizer(model.parameters())
    scheduler = training.make_scheduler(optimizer)
    data_generator = torch.Generator().manual_seed(seed)
    lowpass = training.lowpass()
    noise_generator = torch.Generator(device=device).manual_seed(seed)
    generators = {"data": data_generator, "noise": noise_generator}
    state = resume(checkpoint, model, optimizer, generators, device, name, training.epochs,
                   scheduler)
    epochs, best, best_state, done = state.epochs, state.best, state.best_state, state.done
    for epoch in range(done + 1, training.epochs + 1):
        model.train()
        totals: dict[str, float] = {}
        learning_rate = optimizer.param_groups[0]["lr"]  # this epoch's; the schedule moves it after
        batches = shuffled_batches(len(train[0]), training.batch_size, data_generator)
        for index in progress(batches, desc=f"{name} epoch {epoch}/{training.epochs}",
                              unit="batch", leave=False):
            images = train[0][index]
            if training.augment:
                images = _random_flips(images, data_generator)
            images, labels = images.to(device), train[1][index].to(device)
            if lowpass is not None:  # on the device: FFTs on the GPU when there is one
                images = lowpass.apply(images, data_generator)
            loss, components = defense.loss(model, images, labels, noise_generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for key, value in {"loss": loss, **components}.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach()) * len(index)
        if scheduler is not None:
            scheduler.step()
        record = {"epoch": epoch, "learning_rate": learning_rate,
                  **{f"train_{key}": value / len(train[0]) for key, value in totals.items()}}
        recalibrate_batchnorm(model, train[0], training.batch_size, device)
        record.update(_validate(model, val, training.batch_size, device))
        epochs.append(record)
        log.info("%s epoch %d/%d: %s", name, epoch, training.epochs,
                 ", ".join(f"{key} {value:.4f}" for key, value in record.items()
                           if key != "epoch" and value is not None))
        score = (record["val_accuracy"], -record["val_loss"]) if len(val[0]) else (epoch,)
        if best is None or score > best[0]:
            best = (score, epoch)
            best_state = copy.deepcopy(model.state_dict())
        if epoch < training.epochs and checkpoint.due():  # the last: the model is saved next
            save_progress(checkpoint, epoch, model, optimizer, generators, device,
                          Progress(epochs, epoch, best, best_state), scheduler)
    augmentations = (["random horizontal and vertical flips"] if training.augment else []) + \
        ([lowpass.describe()] if lowpass is not None else [])
    recipe = {**training.recipe(), "batch_size": training.batch_size, "epochs": training.epochs,
              "augmentation": "; ".join(augmentations) or "none",
              "defense": defense_config(defense)}
    return best_state, {"epochs": epochs, "best_epoch": best[1],
                        "selected_by": "val_accuracy" if len(val[0]) else "last_epoch",
                        "recipe": recipe, "device": str(device)}


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int,
                          device: torch.device) -> None:
    """Re-estimate BatchNorm statistics on the training images with the current weights.

    With a few steps per epoch the running averages still mostly hold the
    statistics of early weights, and eval-mode predictions collapse to one
    class; a plain average over one pass fixes that ("precise BN").
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over this pass
    model.train()
    for index in torch.arange(len(images)).split(batch_size):
        model(images[index].to(device))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


@torch.no_grad()
def _validate(model: nn.Module, val: tuple[torch.Tensor, torch.Tensor], batch_size: int,
              device: torch.device) -> dict[str, float | None]:
    if not len(val[0]):
        return {"val_loss": None, "val_accuracy": None}
    model.eval()
    loss, correct = 0.0, 0
    for index in torch.arange(len(val[0])).split(batch_size):
        logits = model(val[0][index].to(device))
        labels = val[1][index].to(device)
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
    return {"val_loss": loss / len(val[0]), "val_accuracy": correct / len(val[0])}


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Indices of `n` samples in random batches of `batch_size`."""
    batches = list(torch.randperm(n, generator=generator).split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()  # BatchNorm cannot train on a batch of one; reshuffled next epoch
    return batches


def _random_flips(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    for dim in (-1, -2):
        flip = (torch.rand(len(images), generator=generator) < 0.5).view(-1, 1, 1, 1)
        images = torch.where(flip, images.flip(dim), images)
    return images


def training_splits(store) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                    tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) of the train and of the val split; fewer than 2 train images is an
    InputError naming the store."""
    train, val = split_tensors(store, "train"), split_tensors(store, "val")
    if len(train[0]) < 2:
        raise InputError(f"{store.path}: the train split needs at least 2 images, "
                         f"has {len(train[0])}")
    return train, val


def split_tensors(store, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The images (float32) and labels (int64) of one split of an image store."""
    images, labels = store.load(split)
    return (torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)),
            torch.from_numpy(np.asarray(labels, dtype=np.int64)))
