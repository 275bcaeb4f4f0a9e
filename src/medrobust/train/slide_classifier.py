"""Train one MIL slide classifier on per-slide feature stores: one bag per slide.

Bags differ in size, so training steps over one bag at a time (as Ilse et al.
and MHIM-MIL do), with Adam and a per-epoch cosine learning-rate schedule. The
epoch with the best validation AUC (ties: lower validation loss) is kept,
and training stops once `patience` epochs pass without a better one; a
validation split of one class has no AUC, and then the lowest validation
loss decides; without validation slides, the last epoch is kept. The test
split is never read here. The same config and seed give the same weights on
the CPU: initialisation and dropout draw from the seeded global generator
inside `fork_rng`, bag order and masks from CPU generators.

A model with an `mhim:` section is trained by MHIM-MIL (`models.mhim`): its
teacher starts from the saved weights of the slide classifier it names
(`teacher_dir`), which must be the same architecture on the same features.

Epochs end with a checkpoint (`medrobust.train.checkpoints`) that a rerun
after a kill resumes from, to the same final weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medrobust.config import config_from_mapping
from medrobust.errors import ConfigError, InputError, unknown_name
from medrobust.evaluate.metrics import classification_metrics
from medrobust.io.slide_stores import open_feature_store
from medrobust.logs import get_logger
from medrobust.models.mhim import MHIM, MHIMOptions
from medrobust.models.registry import CONFIG_FILE, SLIDE_CLASSIFIERS, build_model, load_model
from medrobust.progress import progress
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
    weight_decay: float = 1e-5
    patience: int = 20            # epochs without a better validation AUC before stopping
    arch_options: Mapping[str, Any] | None = None  # passed to the architecture's builder
    mhim: Mapping[str, Any] | None = None          # MHIM-MIL training (models.mhim.MHIMOptions)
    cv_folds: int | None = None   # k-fold cross-validation over the train and val slides

    def __post_init__(self):
        if self.arch not in SLIDE_CLASSIFIERS:
            raise unknown_name("slide classifier", self.arch, SLIDE_CLASSIFIERS)
        if not isinstance(self.classes, Sequence) or isinstance(self.classes, str) \
                or len(set(self.classes)) < 2 or len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"slide classifier: classes must be a list of at least 2 "
                              f"distinct names, not {self.classes!r}")
        if self.epochs < 1 or self.learning_rate <= 0 or self.weight_decay < 0 \
                or self.patience < 1:
            raise ConfigError("slide classifier: epochs and patience must be >= 1, "
                              "learning_rate > 0, weight_decay >= 0")
        if self.mhim is not None:
            MHIMOptions.from_mapping(self.mhim)
        if self.cv_folds is not None and (isinstance(self.cv_folds, bool)
                                          or not isinstance(self.cv_folds, int)
                                          or self.cv_folds < 2):
            raise ConfigError(f"slide classifier: cv_folds must be an integer >= 2, "
                              f"not {self.cv_folds!r}")

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


def cv_folds(labels: Sequence[int], n_folds: int, seed: int) -> list[int]:
    """Each sample's fold, stratified: every class's samples, in a seeded random order,
    dealt to the folds in turn, so each fold holds its share of every class (the first
    folds one more where a class does not divide evenly)."""
    rng = np.random.default_rng(seed)
    folds = [0] * len(labels)
    dealt = 0
    for label in sorted(set(labels)):
        members = [index for index, value in enumerate(labels) if value == label]
        for position, index in enumerate(rng.permutation(members)):
            folds[index] = (dealt + position) % n_folds
        dealt += len(members)  # the next class starts where this one stopped
    return folds


def fold_split(bags: Sequence[SlideBag], n_folds: int, fold: int,
               seed: int) -> tuple[list[SlideBag], list[SlideBag]]:
    """Train and validation bags of one cross-validation fold over the train and val
    slides (the test split stays out): validation is the fold, training the rest."""
    if not 0 <= fold < n_folds:
        raise ConfigError(f"fold {fold} is not one of 0..{n_folds - 1}")
    pool = sorted((bag for bag in bags if bag.split in ("train", "val")),
                  key=lambda bag: bag.slide_id)  # the folds do not depend on store order
    if len(pool) < 2 * n_folds:
        raise InputError(f"cv_folds {n_folds}: the train and val splits hold {len(pool)} "
                         f"slides with tiles, fewer than 2 per fold")
    folds = cv_folds([bag.label for bag in pool], n_folds, seed)
    return ([bag for bag, k in zip(pool, folds) if k != fold],
            [bag for bag, k in zip(pool, folds) if k == fold])


def train_slide_classifier(feature_paths: Sequence[str | os.PathLike],
                           model_dir: str | os.PathLike, model_config: Mapping[str, Any],
                           device: str | torch.device = "cpu",
                           checkpoint_dir: str | os.PathLike | None = None,
                           teacher_dir: str | os.PathLike | None = None,
                           fold: int | None = None, fold_seed: int = 0) -> dict[str, Any]:
    """Train, select the best epoch, save to `model_dir`; returns the history.

    `teacher_dir`: the saved model an `mhim:` config's teacher starts from.
    `fold`: train cross-validation fold `fold` of the config's `cv_folds`
    (`fold_split`, folds drawn with `fold_seed`) instead of the dataset's own
    train and val splits. Resumes from the checkpoint of an interrupted run of
    the same config on the same bags; `checkpoint_dir` defaults to
    `.checkpoints/{model}` beside `model_dir`.
    """
    spec = SlideModelConfig.from_mapping(model_config)
    classes = list(spec.classes)
    device = torch.device(device)
    bags, provenance = load_bags(feature_paths, classes)
    if fold is None:
        train = [bag for bag in bags if bag.split == "train"]
        val = [bag for bag in bags if bag.split == "val"]
    elif spec.cv_folds is None:
        raise ConfigError(f"{model_dir}: fold {fold} asked of a model without cv_folds")
    else:
        train, val = fold_split(bags, spec.cv_folds, fold, fold_seed)
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
                                        "weight_decay": spec.weight_decay,
                                        "patience": spec.patience},
    }
    mhim = None if spec.mhim is None else MHIMOptions.from_mapping(spec.mhim)
    if mhim is not None:
        config["training"]["mhim"] = dataclasses.asdict(mhim)
    if fold is not None:
        config["training"]["cv"] = {"folds": spec.cv_folds, "fold": fold, "seed": fold_seed,
                                    "val_slides": [bag.slide_id for bag in val]}
    name = Path(model_dir).name
    log.info("training %s (%s%s) on %d train / %d val slides (%s features), device %s",
             name, spec.arch, ", MHIM-MIL" if mhim else "", len(train), len(val),
             provenance["backbone"], device)
    started = time.perf_counter()
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(spec.seed)
        model = build_model(config).to(device)
        config["arch_options"] = dataclasses.asdict(model.options)  # defaults filled in
        trainee, teacher = model, []
        if mhim is not None:
            teacher_state = teacher_weights(teacher_dir, mhim.teacher, config)
            teacher = [teacher_state[key] for key in sorted(teacher_state)]
            trainee = MHIM(model, teacher_state, mhim).to(device)
        bags_used = [(bag.slide_id, bag.label, part, len(bag.features))
                     for part, bags_of in (("train", train), ("val", val)) for bag in bags_of]
        # the features and the teacher themselves: tiles cut anew give the same counts,
        # and a retrained teacher the same config
        checkpoint = TrainingCheckpoint(
            model_dir, fingerprint(config, bags_used, device.type,
                                   *(bag.features for bag in [*train, *val]), *teacher),
            checkpoint_dir)
        best_state, history = _fit(trainee, spec, device, name, train, val, checkpoint)
    trainee.load_state_dict(best_state)
    return save_kept_epoch(model, model.state_dict(), model_dir, config, history, checkpoint,
                           name, started)


def teacher_weights(teacher_dir: str | os.PathLike | None, teacher: str,
                    config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The saved weights of MHIM's teacher, after checking they fit the student's config."""
    if teacher_dir is None:
        raise ConfigError(f"mhim: the teacher {teacher!r} must be trained first; "
                          f"no teacher model folder was given")
    teacher_dir = Path(teacher_dir)
    model = load_model(teacher_dir)
    saved = json.loads((teacher_dir / CONFIG_FILE).read_text())
    for key in ("arch", "arch_options", "classes", "backbone", "backbone_weights_sha256"):
        if saved.get(key) != config[key]:
            raise InputError(f"{teacher_dir / CONFIG_FILE}: the MHIM teacher's {key} "
                             f"{saved.get(key)!r} differs from the student's {config[key]!r}")
    return model.state_dict()


def _fit(model: nn.Module, spec: SlideModelConfig, device: torch.device, name: str,
         train: list[SlideBag], val: list[SlideBag],
         checkpoint: TrainingCheckpoint) -> tuple[dict, dict[str, Any]]:
    """Train `model` (a slide classifier, or MHIM around one); its best epoch's state."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                 lr=spec.learning_rate, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=spec.epochs)
    order_generator = torch.Generator().manual_seed(spec.seed)
    mask_generator = torch.Generator().manual_seed(spec.seed + 1)
    generators = {"order": order_generator, "mask": mask_generator}
    state = resume(checkpoint, model, optimizer, generators, device, name, spec.epochs, scheduler)
    epochs, best, best_state, done = state.epochs, state.best, state.best_state, state.done
    selected_by = _selection(val)
    total_steps = spec.epochs * len(train)
    for epoch in progress(range(done + 1, spec.epochs + 1), desc=f"{name}", unit="epoch"):
        model.train()
        sums: dict[str, float] = {}
        for position, index in enumerate(torch.randperm(len(train),
                                                        generator=order_generator).tolist()):
            bag = train[index]
            features, label = bag.features.to(device), torch.tensor(bag.label, device=device)
            step = (epoch - 1) * len(train) + position
            if isinstance(model, MHIM):
                loss, logits, parts = model.loss(features, label, step, total_steps,
                                                 mask_generator)
                parts["masked_fraction"] = parts.pop("masked") / len(features)
            else:
                logits, _ = model(features)
                loss, parts = F.cross_entropy(logits.unsqueeze(0), label.view(1)), {}
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if isinstance(model, MHIM):
                model.update_teacher(model.momentum(step, total_steps))
            for key, value in {"loss": float(loss.detach()),
                               "accuracy": float(int(logits.argmax()) == bag.label),
                               **parts}.items():
                sums[key] = sums.get(key, 0.0) + value
        scheduler.step()
        record = {"epoch": epoch, **{f"train_{key}": value / len(train)
                                     for key, value in sums.items()},
                  **_validate(model, val, device)}
        epochs.append(record)
        log.info("%s epoch %d/%d: %s", name, epoch, spec.epochs,
                 ", ".join(f"{key} {value:.4f}" for key, value in record.items()
                           if key != "epoch" and value is not None))
        score = {"val_auc": lambda: (record["val_auc"], -record["val_loss"]),
                 "val_loss": lambda: (-record["val_loss"],),
                 "last_epoch": lambda: (epoch,)}[selected_by]()
        if best is None or score > best[0]:
            best = (score, epoch)
            best_state = copy.deepcopy(model.state_dict())
        stop = epoch - best[1] >= spec.patience
        if stop:
            log.info("%s: no better %s for %d epochs; stopping after epoch %d", name,
                     selected_by, spec.patience, epoch)
        elif epoch < spec.epochs and checkpoint.due():  # the last: the model is saved next
            save_progress(checkpoint, epoch, model, optimizer, generators, device,
                          Progress(epochs, epoch, best, best_state), scheduler)
        if stop:
            break
    recipe = {"optimizer": "Adam", "learning_rate": spec.learning_rate,
              "weight_decay": spec.weight_decay, "schedule": "cosine", "batch_size": 1,
              "epochs": spec.epochs, "patience": spec.patience,
              "augmentation": "none (bag order shuffled)",
              "defense": {"name": "none"}}
    if isinstance(model, MHIM):
        recipe["mhim"] = dataclasses.asdict(model.options)
    return best_state, {"epochs": epochs, "best_epoch": best[1], "selected_by": selected_by,
                        "recipe": recipe, "device": str(device)}


def _selection(val: list[SlideBag]) -> str:
    """What picks the kept epoch: validation AUC where the split has two classes or more."""
    if not val:
        return "last_epoch"
    return "val_auc" if len({bag.label for bag in val}) > 1 else "val_loss"


def _validate(model: nn.Module, val: list[SlideBag], device: torch.device) -> dict[str, float | None]:
    if not val:
        return {"val_loss": None, "val_accuracy": None, "val_auc": None}
    logits = bag_logits(model, val, device)
    labels = torch.tensor([bag.label for bag in val])
    metrics = classification_metrics(labels.numpy(), torch.softmax(logits, 1).numpy())
    return {"val_loss": float(F.cross_entropy(logits, labels)),
            "val_accuracy": metrics["accuracy"], "val_auc": metrics["auc"]}
