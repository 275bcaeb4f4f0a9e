"""Train one MIL slide classifier on per-slide feature stores: one bag per slide.

Bags differ in size, so training steps over one bag at a time (as Ilse et al.
do). The epoch with the best validation accuracy (ties: lower validation loss)
is kept; without validation slides, the last epoch. The same config and seed
give the same weights on the CPU: initialisation and dropout draw from the
seeded global generator inside `fork_rng`, bag order from a CPU generator.

Epochs end with a checkpoint (`medrobust.train.checkpoints`) that a rerun
after a kill resumes from, to the same final weights.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medrobust.errors import ConfigError, InputError, unknown_name
from medrobust.io.slide_stores import open_feature_store
from medrobust.logs import get_logger
from medrobust.progress import progress
from medrobust.config import config_from_mapping
from medrobust.models.registry import SLIDE_CLASSIFIERS, build_model
from medrobust.train.checkpoints import (
    Progress, TrainingCheckpoint, fingerprint, resume, save_kept_epoch, save_progress)

log = get_logger(__name__)
SPLITS = ("train", "val", "test")
# feature store attrs that must agree across a model's slides: they fix what the model was fed
FEATURE_PROVENANCE = ("backbone", "weights", "weights_sha256", "dim")


@dataclasses.dataclass(frozen=True)
class SlideModelConfig:
    """One entry of `slide_classifiers` in config.yaml, plus its dataset's `classes`."""

    dataset: str
    arch: str
    classes: Sequence[str]
    seed: int = 0
    epochs: int = 20
    learning_rate: float = 2e-4
    weight_decay: float = 1e-4
    arch_options: Mapping[str, Any] | None = None  # passed to the architecture's builder

    def __post_init__(self):
        if self.arch not in SLIDE_CLASSIFIERS:
            raise unknown_name("slide classifier", self.arch, SLIDE_CLASSIFIERS)
        if not isinstance(self.classes, Sequence) or isinstance(self.classes, str) \
                or len(set(self.classes)) < 2 or len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"slide classifier: classes must be a list of at least 2 "
                              f"distinct names, not {self.classes!r}")
        if self.epochs < 1 or self.learning_rate <= 0 or self.weight_decay < 0:
            raise ConfigError("slide classifier: epochs must be >= 1, learning_rate > 0, "
                              "weight_decay >= 0")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "SlideModelConfig":
        return config_from_mapping(cls, mapping, "slide classifier")


@dataclasses.dataclass(frozen=True)
class SlideBag:
    slide_id: str
    label: int
    split: str
    features: torch.Tensor     # (n_tiles, dim) float32, CPU


def load_bags(feature_paths: Iterable[str | os.PathLike], classes: Sequence[str]
              ) -> tuple[list[SlideBag], dict[str, Any]]:
    """Every slide with at least one tile as a bag, and the stores' shared provenance attrs.

    Slides without tiles (left out at tiling under `on_bad_input: skip`, their
    reason in the `rejected` attr) are left out with a warning: a bag needs an
    instance.
    """
    bags, provenance = [], None
    for path in feature_paths:
        store = open_feature_store(path)
        missing = [key for key in ("slide_id", "label", "split", *FEATURE_PROVENANCE)
                   if key not in store.attrs]
        if missing:
            raise InputError(f"{store.path}: feature store attrs lack {', '.join(missing)}")
        attrs = store.attrs
        if attrs["label"] not in classes:
            raise InputError(f"{store.path}: label {attrs['label']!r} is not one of the "
                             f"classes {list(classes)}")
        if attrs["split"] not in SPLITS:
            raise InputError(f"{store.path}: split {attrs['split']!r} is not one of {SPLITS}")
        store_provenance = {key: attrs[key] for key in FEATURE_PROVENANCE}
        if provenance is None:
            provenance = store_provenance
        elif store_provenance != provenance:
            raise InputError(f"{store.path}: features {store_provenance} differ from those of "
                             f"the other slides {provenance}")
        if len(store.features) == 0:
            reasons = [entry["reason"] for entry in attrs.get("rejected", [])]
            log.warning("%s: slide %s has no tiles; left out (%s)", store.path, attrs["slide_id"],
                        "; ".join(reasons) or "no tile passed the tissue threshold")
            continue
        bags.append(SlideBag(str(attrs["slide_id"]), classes.index(attrs["label"]),
                             attrs["split"], torch.from_numpy(store.features)))
    if provenance is None:
        raise InputError("no feature stores given")
    return bags, provenance


def bag_logits(model: nn.Module, bags: Sequence[SlideBag], device: torch.device) -> torch.Tensor:
    """Logits `(n_bags, num_classes)` on the CPU, model in eval mode."""
    model.eval()
    with torch.inference_mode():
        return torch.stack([model(bag.features.to(device))[0].float().cpu() for bag in bags])


def train_slide_classifier(feature_paths: Sequence[str | os.PathLike],
                           model_dir: str | os.PathLike, model_config: Mapping[str, Any],
                           device: str | torch.device = "cpu",
                           checkpoint_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train, select the best epoch, save to `model_dir`; returns the history.

    Resumes from the checkpoint of an interrupted run of the same config on
    the same bags; `checkpoint_dir` defaults to `.checkpoints/{model}` beside
    `model_dir`.
    """
    spec = SlideModelConfig.from_mapping(model_config)
    classes = list(spec.classes)
    device = torch.device(device)
    bags, provenance = load_bags(feature_paths, classes)
    train = [bag for bag in bags if bag.split == "train"]
    val = [bag for bag in bags if bag.split == "val"]
    if len(train) < 2:
        raise InputError(f"the train split needs at least 2 slides with tiles, has {len(train)}")
    config = {
        "family": "slide", "arch": spec.arch, "num_classes": len(classes), "classes": classes,
        "feature_dim": provenance["dim"], "backbone": provenance["backbone"],
        "backbone_weights": provenance["weights"],
        "backbone_weights_sha256": provenance["weights_sha256"],
        "arch_options": dict(spec.arch_options or {}), "dataset": spec.dataset,
        "seed": spec.seed, "training": {"epochs": spec.epochs,
                                        "learning_rate": spec.learning_rate,
                                        "weight_decay": spec.weight_decay},
    }
    name = Path(model_dir).name
    log.info("training %s (%s) on %d train / %d val slides (%s features), device %s",
             name, spec.arch, len(train), len(val), provenance["backbone"], device)
    started = time.perf_counter()
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(spec.seed)
        model = build_model(config).to(device)
        config["arch_options"] = dataclasses.asdict(model.options)  # defaults filled in
        bags_used = [(bag.slide_id, bag.label, bag.split, len(bag.features))
                     for bag in train + val]
        checkpoint = TrainingCheckpoint(
            model_dir, fingerprint(config, bags_used, device.type), checkpoint_dir)
        best_state, history = _fit(model, spec, device, name, train, val, checkpoint)
    return save_kept_epoch(model, best_state, model_dir, config, history, checkpoint, name, started)


def _fit(model: nn.Module, spec: SlideModelConfig, device: torch.device, name: str,
         train: list[SlideBag], val: list[SlideBag],
         checkpoint: TrainingCheckpoint) -> tuple[dict, dict[str, Any]]:
    # Adam with L2 weight decay, as in Ilse et al.
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.learning_rate,
                                 weight_decay=spec.weight_decay)
    order_generator = torch.Generator().manual_seed(spec.seed)
    generators = {"order": order_generator}
    state = resume(checkpoint, model, optimizer, generators, device, name, spec.epochs)
    epochs, best, best_state, done = state.epochs, state.best, state.best_state, state.done
    for epoch in progress(range(done + 1, spec.epochs + 1), desc=f"{name}", unit="epoch"):
        model.train()
        total_loss, correct = 0.0, 0
        for index in torch.randperm(len(train), generator=order_generator).tolist():
            bag = train[index]
            logits, _ = model(bag.features.to(device))
            loss = F.cross_entropy(logits.unsqueeze(0), torch.tensor([bag.label], device=device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach())
            correct += int(int(logits.argmax()) == bag.label)
        record = {"epoch": epoch, "train_loss": total_loss / len(train),
                  "train_accuracy": correct / len(train), **_validate(model, val, device)}
        epochs.append(record)
        log.info("%s epoch %d/%d: %s", name, epoch, spec.epochs,
                 ", ".join(f"{key} {value:.4f}" for key, value in record.items()
                           if key != "epoch" and value is not None))
        score = (record["val_accuracy"], -record["val_loss"]) if val else (epoch,)
        if best is None or score > best[0]:
            best = (score, epoch)
            best_state = copy.deepcopy(model.state_dict())
        if epoch < spec.epochs and checkpoint.due():  # the last: the model is saved next
            save_progress(checkpoint, epoch, model, optimizer, generators, device,
                          Progress(epochs, epoch, best, best_state))
    recipe = {"optimizer": "Adam", "learning_rate": spec.learning_rate,
              "weight_decay": spec.weight_decay, "schedule": "constant", "batch_size": 1,
              "epochs": spec.epochs, "augmentation": "none (bag order shuffled)",
              "defense": {"name": "none"}}
    return best_state, {"epochs": epochs, "best_epoch": best[1],
                        "selected_by": "val_accuracy" if val else "last_epoch",
                        "recipe": recipe, "device": str(device)}


def _validate(model: nn.Module, val: list[SlideBag], device: torch.device) -> dict[str, float | None]:
    if not val:
        return {"val_loss": None, "val_accuracy": None}
    logits = bag_logits(model, val, device)
    labels = torch.tensor([bag.label for bag in val])
    return {"val_loss": float(F.cross_entropy(logits, labels)),
            "val_accuracy": float((logits.argmax(1) == labels).float().mean())}
