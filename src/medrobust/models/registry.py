"""Registries that map config names to models and defenses; saving and loading models.

Builders register under the name a config uses for them (as timm does):

- image classifiers: `builder(num_classes, in_channels, pretrained: bool) -> ImageClassifier`
  (`models.image_classifiers`);
- slide classifiers: `builder(config: Mapping) -> nn.Module`, given the whole
  resolved model config (`models.mil`);
- defenses: a frozen dataclass with `from_mapping`, `wrap(classifier)` (the model
  that is trained, saved and evaluated) and `loss(model, images, labels,
  generator)` (the training objective).

A saved model is a folder holding `model.safetensors`, `config.json` (the
resolved config, enough to rebuild the architecture) and `history.json`.
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
from medrobust.errors import ConfigError, InputError, unknown_name
from medrobust.io.atomic import atomic_path, write_json

IMAGE_CLASSIFIERS: dict[str, Callable[..., nn.Module]] = {}
SLIDE_CLASSIFIERS: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {}
DEFENSES: dict[str, type] = {}

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"

T = TypeVar("T")


def register_image_classifier(name: str):
    def add(builder):
        IMAGE_CLASSIFIERS[name] = builder
        return builder

    return add


def register_slide_classifier(name: str):
    def add(builder):
        SLIDE_CLASSIFIERS[name] = builder
        return builder

    return add


def register_defense(name: str):
    def add(cls):
        cls.name = name  # the name `defense_config` writes back into config.json
        DEFENSES[name] = cls
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


def build_defense(config: Mapping[str, Any] | None) -> Defense:
    """The defense a model config's `defense` section names; absent means none."""
    settings = dict(config or {"name": "none"})
    if "name" not in settings:
        raise ConfigError(f"defense needs a name; known: {', '.join(sorted(DEFENSES))}")
    name = settings.pop("name")
    if name not in DEFENSES:
        raise unknown_name("defense", name, DEFENSES)
    return DEFENSES[name].from_mapping(settings)


def defense_config(defense: Defense) -> dict[str, Any]:
    """The resolved `defense` section, defaults filled in, for config.json."""
    return {"name": defense.name, **dataclasses.asdict(defense)}


def build_model(config: Mapping[str, Any], *, load_pretrained: bool = True) -> nn.Module:
    """The model a resolved config describes, with fresh (or pretrained) weights.

    `load_pretrained=False` skips downloading pretrained weights, for when the
    weights come from a saved file anyway.
    """
    family = config.get("family")
    if family == "image":
        builder = _lookup(IMAGE_CLASSIFIERS, "image classifier", _require(config, "arch"))
        classifier = builder(
            num_classes=int(_require(config, "num_classes")),
            in_channels=int(_require(config, "in_channels")),
            pretrained=load_pretrained and config.get("pretrained", "none") == "imagenet",
        )
        return build_defense(config.get("defense")).wrap(classifier)
    if family == "slide":
        return _lookup(SLIDE_CLASSIFIERS, "slide classifier", _require(config, "arch"))(config)
    raise ConfigError(f"model family must be 'image' or 'slide', not {family!r}")


def save_model(model: nn.Module, model_dir: str | os.PathLike, config: Mapping[str, Any],
               history: Any) -> None:
    """Write weights, resolved config and history; config.json goes last."""
    model_dir = Path(model_dir)
    # safetensors wants contiguous CPU tensors that share no memory
    state = {key: value.detach().cpu().contiguous().clone()
             for key, value in model.state_dict().items()}
    with atomic_path(model_dir / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json(model_dir / HISTORY_FILE, history)
    write_json(model_dir / CONFIG_FILE, dict(config))


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
    model = build_model(config, load_pretrained=False)
    try:
        model.load_state_dict(load_file(str(weights_path)))
    except (SafetensorError, RuntimeError) as error:
        raise InputError(f"{weights_path}: weights do not fit the model in {config_path} "
                         f"({error})") from error
    return model.to(device).eval()


def _require(config: Mapping[str, Any], key: str) -> Any:
    if key not in config:
        raise ConfigError(f"model config lacks {key!r}")
    return config[key]


def _lookup(registry: Mapping[str, T], kind: str, name: str) -> T:
    if name not in registry:
        raise unknown_name(kind, name, registry)
    return registry[name]
