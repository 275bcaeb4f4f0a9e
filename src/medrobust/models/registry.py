"""Registries that map config names to models and defenses; saving and loading models.

Builders register under the name a config uses for them (as timm does):

- image classifiers: `builder(num_classes, in_channels, pretrained: str, normalization: str)
  -> ImageClassifier`, `pretrained` being none, imagenet or the path of a weights file,
  `normalization` imagenet or per_image (`models.image_classifiers`); an
  `ImageClassifier` provides `forward_features` (`low` and `last` features), which
  the denoising defense and HGD need;
- slide classifiers: `builder(config: Mapping) -> nn.Module`, given the whole
  resolved model config, with the dataclass of its `arch_options` as
  `builder.options` (`models.mil`, `models.transmil`);
- defenses: a frozen dataclass with `from_mapping`, `wrap(classifier)` (the model
  that is trained, saved and evaluated) and `loss(model, images, labels,
  generator)` (the training objective);
- pixel denoisers (`denoisers:` in config, by `kind`): a frozen dataclass of
  the kind's settings, see `DenoiserKind` (`models.pixel_denoisers`).

A saved model is a folder holding `model.safetensors`, `config.json` (the
resolved config, enough to rebuild the architecture) and `history.json`.
Weights with non-finite values (a run that diverged) are refused on both
ends, and files get the user's umask (a team on a shared cluster reads them).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Protocol, TypeVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from medrobust.config import config_from_mapping
from medrobust.errors import RERUN, ConfigError, InputError, MedrobustError, unknown_name
from medrobust.io.result_files import read_result_record
from medrobust.io.atomic import atomic_path, set_default_mode, write_json

IMAGE_CLASSIFIERS: dict[str, Callable[..., nn.Module]] = {}
SLIDE_CLASSIFIERS: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {}
DEFENSES: dict[str, type] = {}
DENOISERS: dict[str, type] = {}

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"

T = TypeVar("T")


def register_image_classifier(name: str):
    def add(builder):
        IMAGE_CLASSIFIERS[name] = builder
        return builder

    return add


def register_slide_classifier(name: str, options: type | None = None):
    """`options`: the frozen dataclass of the architecture's `arch_options`, which the
    config check reads (`builder.options`)."""
    def add(builder):
        builder.options = options
        SLIDE_CLASSIFIERS[name] = builder
        return builder

    return add


def register_defense(name: str):
    def add(cls):
        cls.name = name  # the name `defense_config` writes back into config.json
        DEFENSES[name] = cls
        return cls

    return add


def register_denoiser(kind: str):
    def add(cls):
        cls.kind = kind  # what config.json records, to rebuild the architecture
        DENOISERS[kind] = cls
        return cls

    return add


class Defense(Protocol):
    name: ClassVar[str]

    def wrap(self, classifier: nn.Module) -> nn.Module: ...

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total training loss and its named components (empty when it has none)."""


@register_defense("none")
@dataclasses.dataclass(frozen=True)
class NoDefense:
    """Plain training: cross-entropy on the clean images."""

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "NoDefense":
        return config_from_mapping(cls, mapping, "defense none")

    def wrap(self, classifier: nn.Module) -> nn.Module:
        return classifier

    def loss(self, model, images, labels, generator):
        return F.cross_entropy(model(images), labels), {}


class DenoiserKind(Protocol):
    """The settings of one kind of pixel denoiser (a config entry under `denoisers:`).

    `models` names the settings that name image classifiers the training needs
    (HGD: the classifier that guides it and the one that crafts its examples);
    training (`medrobust.train.denoiser`) loads them and passes them by those names.
    """

    kind: ClassVar[str]
    models: ClassVar[tuple[str, ...]]
    dataset: str
    seed: int
    epochs: int
    batch_size: int

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], section: str | None = None): ...

    def build(self, in_channels: int) -> nn.Module:
        """The denoiser, images in [0, 1] -> images in [0, 1] of the same shape."""

    def learning_rate_at(self, epoch: int) -> float:
        """Adam's learning rate in `epoch` (1-based)."""

    def training_examples(self, images: torch.Tensor, labels: torch.Tensor,
                          models: Mapping[str, nn.Module], generator: torch.Generator,
                          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoiser's inputs for these clean images, and for each the index of its clean image."""

    def loss(self, denoiser: nn.Module, inputs: torch.Tensor, clean: torch.Tensor,
             models: Mapping[str, nn.Module], generator: torch.Generator
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of a batch and its named components."""


def build_defense(config: Mapping[str, Any] | None) -> Defense:
    """The defense a model config's `defense` section names; absent means none."""
    settings = dict(config or {"name": "none"})
    if "name" not in settings:
        raise ConfigError(f"defense needs a name; known: {', '.join(sorted(DEFENSES))}")
    name = settings.pop("name")
    if name not in DEFENSES:
        raise unknown_name("defense", name, DEFENSES)
    return DEFENSES[name].from_mapping(settings)


def build_denoiser(config: Mapping[str, Any]) -> DenoiserKind:
    """The checked settings of a `denoisers:` entry; its `kind` picks the class."""
    settings = dict(config)
    if "kind" not in settings:
        raise ConfigError(f"denoiser needs a kind; known: {', '.join(sorted(DENOISERS))}")
    return _lookup(DENOISERS, "denoiser kind", settings.pop("kind")).from_mapping(settings)


def defense_config(defense: Defense) -> dict[str, Any]:
    """The resolved `defense` section, defaults filled in, for config.json."""
    return {"name": defense.name, **dataclasses.asdict(defense)}


def build_model(config: Mapping[str, Any], *, load_pretrained: bool = True) -> nn.Module:
    """The model a resolved config describes, with fresh (or pretrained) weights.

    `load_pretrained=False` skips downloading (or reading) pretrained weights,
    for when the weights come from a saved model anyway.
    """
    family = config.get("family")
    if family == "image":
        builder = _lookup(IMAGE_CLASSIFIERS, "image classifier", _require(config, "arch"))
        classifier = builder(
            num_classes=int(_require(config, "num_classes")),
            in_channels=int(_require(config, "in_channels")),
            pretrained=config.get("pretrained", "none") if load_pretrained else "none",
            # saved before the option existed: the ImageNet statistics
            normalization=config.get("normalization", "imagenet"),
        )
        return build_defense(config.get("defense")).wrap(classifier)
    if family == "slide":
        return _lookup(SLIDE_CLASSIFIERS, "slide classifier", _require(config, "arch"))(config)
    if family == "denoiser":
        settings = {"kind": _require(config, "kind"), **_require(config, "settings")}
        return build_denoiser(settings).build(int(_require(config, "in_channels")))
    raise ConfigError(f"model family must be 'image', 'slide' or 'denoiser', not {family!r}")


def save_model(model: nn.Module, model_dir: str | os.PathLike, config: Mapping[str, Any],
               history: Any) -> None:
    """Write weights, resolved config and history; config.json goes last.

    Refuses weights with non-finite values: no later stage could use them.
    """
    model_dir = Path(model_dir)
    # safetensors wants contiguous CPU tensors that share no memory
    state = {key: value.detach().cpu().contiguous().clone()
             for key, value in model.state_dict().items()}
    bad = nonfinite_tensors(state)
    if bad:
        raise MedrobustError(
            f"{model_dir}: the trained weights hold NaN or infinite values "
            f"({describe_nonfinite(bad)}); training diverged. Lower the learning rate (or "
            f"change the config) and rerun; nothing was saved")
    with atomic_path(model_dir / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
        set_default_mode(tmp)  # safetensors creates the file owner-only (0600)
    write_json(model_dir / HISTORY_FILE, history)
    write_json(model_dir / CONFIG_FILE, dict(config))


def read_history(model_dir: str | os.PathLike) -> dict[str, Any]:
    """A saved model's training history (`save_model`): its epochs, each a record with its
    epoch, and the epoch kept, one of them; InputError naming the file otherwise."""
    path = Path(model_dir) / HISTORY_FILE
    history = read_result_record(path, "training history", ("epochs", "best_epoch"))
    epochs = history["epochs"]
    if not isinstance(epochs, list) or not all(
            isinstance(record, dict) and "epoch" in record for record in epochs):
        raise InputError(f"{path}: epochs must be a list of records, each with its epoch; "
                         f"{RERUN}")
    if history["best_epoch"] not in [record["epoch"] for record in epochs]:
        raise InputError(f"{path}: the epoch kept, {history['best_epoch']!r}, is not among its "
                         f"epochs; {RERUN}")
    return history


def check_model_classes(model_dir: str | os.PathLike, classes: list[str], where: Any) -> None:
    """Refuse data (`where`) whose classes differ from the model's, in names or order: the
    order fixes the integer labels, and a mismatch would score silently wrong."""
    config_path = Path(model_dir) / CONFIG_FILE
    try:
        model_classes = json.loads(config_path.read_text()).get("classes")
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"{config_path}: unreadable model config ({error})") from error
    if model_classes != list(classes):
        raise InputError(f"{config_path}: model classes {model_classes} differ from the "
                         f"classes {list(classes)} of {where}")


def load_model(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a saved model from its config and weights, in eval mode."""
    model_dir = Path(model_dir)
    config_path, weights_path = model_dir / CONFIG_FILE, model_dir / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise InputError(f"{path}: missing; {model_dir} is not a saved model")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{config_path}: not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise InputError(f"{config_path}: a model config must hold one object")
    try:
        model = build_model(config, load_pretrained=False)
    except (ConfigError, TypeError, ValueError) as error:  # a config saved wrong or edited
        raise InputError(f"{config_path}: {error}; not a model this code can build") from error
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise InputError(f"{weights_path}: not a readable safetensors file ({error})") from error
    bad = nonfinite_tensors(state)
    if bad:
        raise InputError(f"{weights_path}: the weights hold NaN or infinite values "
                         f"({describe_nonfinite(bad)}); the model cannot make predictions. "
                         f"Its training diverged or the file is damaged: delete {model_dir} "
                         f"and retrain it")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise InputError(f"{weights_path}: weights do not fit the model in {config_path} "
                         f"({error})") from error
    return model.to(device).eval()


def nonfinite_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Floating-point tensors with NaN or infinite entries, and how many each has."""
    counts = {key: int((~torch.isfinite(value)).sum()) for key, value in state.items()
              if value.is_floating_point()}
    return {key: count for key, count in counts.items() if count}


def describe_nonfinite(bad: Mapping[str, int], limit: int = 3) -> str:
    """E.g. 'head.fc.weight: 3 values, head.fc.bias: 1 value and 2 more tensors'."""
    shown = [f"{key}: {count} value{'s' if count != 1 else ''}"
             for key, count in list(bad.items())[:limit]]
    more = len(bad) - limit
    return ", ".join(shown) + (f" and {more} more tensor{'s' if more != 1 else ''}"
                               if more > 0 else "")


def _require(config: Mapping[str, Any], key: str) -> Any:
    if key not in config:
        raise ConfigError(f"model config lacks {key!r}")
    return config[key]


def _lookup(registry: Mapping[str, T], kind: str, name: str) -> T:
    if name not in registry:
        raise unknown_name(kind, name, registry)
    return registry[name]
