"""Train one pixel denoiser (a `denoisers:` entry) on an image store.

The kind (`medrobust.models.pixel_denoisers`) supplies the architecture, the
training inputs for the clean images (the clean images themselves for the
reformer, which noises them in every step; crafted adversarial, clean and
noised images for HGD), the loss and the learning rate per epoch; this module
runs the loop the kinds share: Adam, shuffled batches, BatchNorm statistics
re-estimated before each validation, and the epoch with the lowest validation
loss kept (the last epoch without validation images). Validation inputs are
built the same way from the validation split, with their own seeded draws,
so every epoch is scored on the same inputs.

Classifiers the kind needs (HGD's guide and source) are loaded from their
model folders, frozen and in eval mode; a denoiser trains in front of a
fixed classifier. Epochs end with a checkpoint a rerun resumes from
(`medrobust.train.checkpoints`), keyed by the config, the data, the device
type and those classifiers' weights.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from medrobust.errors import ConfigError
from medrobust.io.checksums import sha256_file
from medrobust.io.image_store import open_image_store
from medrobust.logs import get_logger
from medrobust.models.registry import (
    WEIGHTS_FILE, DenoiserKind, build_denoiser, build_model, check_model_classes, load_model)
from medrobust.progress import progress
from medrobust.train.checkpoints import (
    Progress, TrainingCheckpoint, fingerprint, resume, save_kept_epoch, save_progress)
from medrobust.train.image_classifier import (
    recalibrate_batchnorm, shuffled_batches, training_splits)

log = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class Examples:
    """The denoiser's inputs, and for each the position of its clean image in `clean`."""

    inputs: torch.Tensor
    index: torch.Tensor
    clean: torch.Tensor

    def batch(self, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index].to(device), self.clean[self.index[index]].to(device)


def train_denoiser(store_path: str | os.PathLike, out_dir: str | os.PathLike,
                   settings: Mapping[str, Any],
                   models: Mapping[str, str | os.PathLike] | None = None,
                   device: str | torch.device = "cpu",
                   checkpoint_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train the denoiser `settings` describes, keep the best epoch, save it to `out_dir`.

    `models` maps each classifier the kind needs (its `models`, e.g. HGD's
    `guide` and `source`) to its saved model folder. Returns the history.
    """
    spec = build_denoiser(settings)
    models = models or {}
    missing = [role for role in spec.models if role not in models]
    if missing:
        raise ConfigError(f"denoiser {spec.kind}: needs the model folder of "
                          f"{', '.join(missing)}")
    device = torch.device(device)
    store = open_image_store(store_path)
    (train_images, train_labels), (val_images, val_labels) = training_splits(store)
    classifiers = {role: _frozen_classifier(models[role], store.classes, device)
                   for role in spec.models}
    config = {
        "family": "denoiser", "kind": spec.kind, "dataset": spec.dataset,
        "in_channels": int(train_images.shape[1]), "image_size": list(train_images.shape[-2:]),
        "classes": store.classes, "settings": dataclasses.asdict(spec),
        "models": {role: Path(models[role]).name for role in spec.models},
    }
    name = Path(out_dir).name
    checkpoint = TrainingCheckpoint(out_dir, fingerprint(
        config, store.attrs, store.sample_ids, store.labels, store.splits, device.type,
        {role: sha256_file(Path(models[role]) / WEIGHTS_FILE) for role in spec.models}),
        checkpoint_dir)
    log.info("training denoiser %s (%s) on %d train / %d val images of %s, device %s",
             name, spec.kind, len(train_images), len(val_images), store.path, device)
    started = time.perf_counter()
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(spec.seed)
        denoiser = build_model(config).to(device)
        # crafted from the seed alone, so a resumed run trains on the same examples
        crafting = torch.Generator().manual_seed(spec.seed)
        train = Examples(*spec.training_examples(train_images, train_labels, classifiers,
                                                 crafting, device), train_images)
        val = Examples(*spec.training_examples(val_images, val_labels, classifiers,
                                               crafting, device), val_images)
        best_state, history = _fit(denoiser, spec, classifiers, train, val, device, name,
                                   checkpoint)
    return save_kept_epoch(denoiser, best_state, out_dir, config, history, checkpoint, name, started)


def _frozen_classifier(model_dir: str | os.PathLike, classes: list[str],
                       device: torch.device) -> nn.Module:
    # crafting uses the store's labels as the model's classes
    check_model_classes(model_dir, classes, "the store")
    return load_model(model_dir, device).requires_grad_(False)


def _fit(denoiser: nn.Module, spec: DenoiserKind, classifiers: Mapping[str, nn.Module],
         train: Examples, val: Examples, device: torch.device, name: str,
         checkpoint: TrainingCheckpoint) -> tuple[dict, dict[str, Any]]:
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=spec.learning_rate_at(1))
    data_generator = torch.Generator().manual_seed(spec.seed)
    noise_generator = torch.Generator(device=device).manual_seed(spec.seed)
    generators = {"data": data_generator, "noise": noise_generator}
    state = resume(checkpoint, denoiser, optimizer, generators, device, name, spec.epochs)
    epochs, best, best_state = state.epochs, state.best, state.best_state
    for epoch in range(state.done + 1, spec.epochs + 1):
        learning_rate = spec.learning_rate_at(epoch)
        for group in optimizer.param_groups:  # the schedule is a function of the epoch alone
            group["lr"] = learning_rate
        denoiser.train()
        totals: dict[str, float] = {}
        batches = shuffled_batches(len(train.inputs), spec.batch_size, data_generator)
        for index in progress(batches, desc=f"{name} epoch {epoch}/{spec.epochs}",
                              unit="batch", leave=False):
            inputs, clean = train.batch(index, device)
            loss, components = spec.loss(denoiser, inputs, clean, classifiers, noise_generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for key, value in {"loss": loss, **components}.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach()) * len(index)
        record = {"epoch": epoch, "learning_rate": learning_rate,
                  **{f"train_{key}": value / len(train.inputs) for key, value in totals.items()}}
        recalibrate_batchnorm(denoiser, train.inputs, spec.batch_size, device)
        record["val_loss"] = _validation_loss(denoiser, spec, classifiers, val, device)
        epochs.append(record)
        log.info("%s epoch %d/%d: %s", name, epoch, spec.epochs,
                 ", ".join(f"{key} {value:.4g}" for key, value in record.items()
                           if key != "epoch" and value is not None))
        score = (-record["val_loss"],) if len(val.inputs) else (epoch,)
        if best is None or score > best[0]:
            best = (score, epoch)
            best_state = copy.deepcopy(denoiser.state_dict())
        if epoch < spec.epochs and checkpoint.due():  # the last: the denoiser is saved next
            save_progress(checkpoint, epoch, denoiser, optimizer, generators, device,
                          Progress(epochs, epoch, best, best_state))
    recipe = {"optimizer": "Adam", "batch_size": spec.batch_size, "epochs": spec.epochs,
              "learning_rate": spec.learning_rate, "training_inputs": len(train.inputs),
              "validation_inputs": len(val.inputs)}
    return best_state, {"epochs": epochs, "best_epoch": best[1],
                        "selected_by": "val_loss" if len(val.inputs) else "last_epoch",
                        "recipe": recipe, "device": str(device)}


@torch.no_grad()
def _validation_loss(denoiser: nn.Module, spec: DenoiserKind,
                     classifiers: Mapping[str, nn.Module], val: Examples,
                     device: torch.device) -> float | None:
    if not len(val.inputs):
        return None
    denoiser.eval()
    # the same draws (the reformer's noise) in every epoch: scores comparable across epochs
    generator = torch.Generator(device=device).manual_seed(spec.seed)
    total = 0.0
    for index in torch.arange(len(val.inputs)).split(spec.batch_size):
        inputs, clean = val.batch(index, device)
        total += float(spec.loss(denoiser, inputs, clean, classifiers, generator)[0]) * len(index)
    return total / len(val.inputs)
