"""Registry of tile-embedding backbones: a config `features.backbone` names one builder.

Three kinds of name:

- a registered name (`resnet18`, `resnet50`, `resnet50_layer3`): torchvision's
  ResNets (`models.torchvision_nets`); `resnet50_layer3` is ResNet50 cut after
  layer3 and average-pooled (1024-d), the patch encoder CLAM and TRIDENT use as
  their baseline;
- `timm:<model name>`: any timm model (timm is imported only for such a name), its
  classifier removed (`num_classes=0`), e.g. a pathology foundation model's
  architecture (docs/features.md, "A pathology foundation model from a local file: UNI");
- either, with `weights` the path of a local weights file (`.safetensors`, or
  a state dict saved with torch.save, read with `weights_only=True`).

`build_backbone` returns a `Backbone`: a module in eval mode mapping float
tiles in [0, 1], shape `(N, 3, T, T)`, to features `(N, dim)`. Input
normalisation is part of the module (docs/architecture.md), so callers only
scale uint8 tiles to [0, 1].
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from medrobust.errors import ConfigError, InputError, MedrobustError, unknown_name
from medrobust.models.image_classifiers import load_weights_file, torchvision_net

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# `weights` names; anything else is the path of a weights file
WEIGHTS_NAMES = ("random", "imagenet")
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class Backbone:
    name: str
    weights: str
    model: nn.Module          # eval mode; (N, 3, T, T) in [0, 1] -> (N, dim)
    dim: int
    mean: tuple[float, ...]   # the normalisation applied inside `model`
    std: tuple[float, ...]
    weights_sha256: str


@dataclass(frozen=True)
class Trunk:
    """What a builder makes: the network without its input normalisation."""
    module: nn.Module         # (N, 3, T, T) normalised -> (N, dim)
    dim: int
    mean: tuple[float, ...]   # the normalisation its weights expect
    std: tuple[float, ...]


Builder = Callable[[str, int], Trunk]  # (weights, seed) -> Trunk
BACKBONES: dict[str, Builder] = {}


def register_backbone(name: str) -> Callable[[Builder], Builder]:
    def add(builder: Builder) -> Builder:
        BACKBONES[name] = builder
        return builder

    return add


def build_backbone(name: str, weights: str = "random", seed: int = 0, *,
                   model_kwargs: Mapping[str, Any] | None = None,
                   normalization: Mapping[str, Sequence[float]] | None = None) -> Backbone:
    """The backbone `name` with `weights` (random, imagenet or a weights file's path).

    `model_kwargs` go to `timm.create_model` (timm backbones only);
    `normalization` ({mean, std}) replaces the weights' own.
    """
    if name.startswith(TIMM_PREFIX):
        trunk = _timm_trunk(name[len(TIMM_PREFIX):], weights, seed, dict(model_kwargs or {}))
    else:
        if model_kwargs:
            raise ConfigError(f"features.model_kwargs applies to timm backbones only, "
                              f"not {name}")
        try:
            builder = BACKBONES[name]
        except KeyError:
            raise unknown_name("backbone", name, [*BACKBONES, f"{TIMM_PREFIX}<model name>"]) \
                from None
        trunk = builder(weights, seed)
    mean, std = trunk.mean, trunk.std
    if normalization is not None:
        mean, std = (tuple(float(v) for v in normalization[key]) for key in ("mean", "std"))
    model = nn.Sequential(Normalize(mean, std), trunk.module).eval()
    model.requires_grad_(False)
    return Backbone(name, weights, model, trunk.dim, mean, std, state_dict_sha256(model))


def backbone_problem(name: str) -> str | None:
    """Why `name` selects no backbone, or None; imports timm only for a `timm:` name."""
    if name.startswith(TIMM_PREFIX):
        model_name = name[len(TIMM_PREFIX):]
        try:
            timm = _import_timm(name)
        except ConfigError as error:
            return str(error)
        if not timm.is_model(model_name):
            return (f"timm has no model {model_name!r} (timm.list_models() lists them; "
                    f"a pretrained tag after a dot is allowed)")
        return None
    if name in BACKBONES:
        return None
    return str(unknown_name("feature backbone", name,
                            [*BACKBONES, f"{TIMM_PREFIX}<model name>"]))


def state_dict_sha256(module: nn.Module) -> str:
    """Hash of every tensor in the state dict (names, dtypes, shapes, bytes), in key order.

    Identifies the weights a feature store was computed with, independent of
    how they were stored or loaded.
    """
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # a byte view works for every dtype, bfloat16 included, where numpy would not
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Normalize(nn.Module):
    """Per-channel (x - mean) / std; buffers, so they are part of the weights hash."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    # a private RNG stream: the same seed gives the same weights, whatever ran before
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _weights_file(weights: str) -> Path:
    path = Path(weights)
    if not path.is_file():
        raise InputError(f"{path}: no such weights file; features.weights takes "
                         f"{', '.join(WEIGHTS_NAMES)} or the path of a weights file "
                         f"(.safetensors, or a state dict saved with torch.save)")
    return path


def _torchvision_resnet(name: str, imagenet: str, weights: str, seed: int) -> nn.Module:
    """torchvision's ResNet `name` with random (seeded) weights, its `imagenet` weights
    (cached under $TORCH_HOME/hub) or a local file's (the whole network's, whatever part
    is kept)."""
    if weights == "random":
        return _seeded(seed, lambda: torchvision_net(name, "none"))
    pretrained = weights if weights == "imagenet" else str(_weights_file(weights))
    return torchvision_net(name, pretrained, imagenet)


def _pooled_resnet(name: str, imagenet: str, weights: str, seed: int) -> Trunk:
    """A ResNet with its classifier removed: the global-average-pooled features."""
    resnet = _torchvision_resnet(name, imagenet, weights, seed)
    dim = resnet.fc.in_features
    resnet.fc = nn.Identity()  # avgpool + flatten stay: (N, dim)
    return Trunk(resnet, dim, IMAGENET_MEAN, IMAGENET_STD)


@register_backbone("resnet18")
def resnet18(weights: str, seed: int) -> Trunk:
    return _pooled_resnet("resnet18", "IMAGENET1K_V1", weights, seed)


@register_backbone("resnet50")
def resnet50(weights: str, seed: int) -> Trunk:
    return _pooled_resnet("resnet50", "IMAGENET1K_V2", weights, seed)


@register_backbone("resnet50_layer3")
def resnet50_layer3(weights: str, seed: int) -> Trunk:
    """ResNet50 up to layer3, average-pooled: 1024-d, CLAM's and TRIDENT's baseline.

    Their ImageNet weights are torchvision's original ones (V1, timm's
    `resnet50.tv_in1k`), not the V2 that `resnet50` takes.
    """
    resnet = _torchvision_resnet("resnet50", "IMAGENET1K_V1", weights, seed)
    trunk = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                          resnet.layer1, resnet.layer2, resnet.layer3,
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    return Trunk(trunk, resnet.layer3[-1].conv3.out_channels, IMAGENET_MEAN, IMAGENET_STD)


def _import_timm(name: str):
    try:
        import timm
    except ImportError:
        raise ConfigError(f"backbone {name} needs timm, a medrobust dependency: pip install timm") \
            from None
    return timm


def _timm_trunk(model_name: str, weights: str, seed: int, model_kwargs: dict) -> Trunk:
    """timm's `model_name` without its classifier (`num_classes=0`): pooled features."""
    name = TIMM_PREFIX + model_name
    timm = _import_timm(name)
    if not timm.is_model(model_name):
        raise ConfigError(f"backbone {name}: timm has no model {model_name!r}")
    pretrained = weights == "imagenet"  # timm's default pretrained weights for the name

    def create() -> nn.Module:
        try:
            return timm.create_model(model_name, pretrained=pretrained, num_classes=0,
                                     **model_kwargs)
        except TypeError as error:  # a keyword the architecture does not take
            raise ConfigError(f"features.model_kwargs for {name}: {error}") from error
        except (OSError, RuntimeError) as error:  # hub download or cache trouble
            raise MedrobustError(
                f"could not load timm's pretrained weights for {model_name} ({error}); "
                "without internet, give the path of a local weights file as weights") \
                from error

    model = _seeded(seed, create)
    if weights not in WEIGHTS_NAMES:
        load_weights_file(model, _weights_file(weights), f"timm's {model_name}")
    config = model.pretrained_cfg
    # the pooled width: the pre-logits layer where there is one (MobileNetV3), else the trunk's
    dim = getattr(model, "head_hidden_size", None) or model.num_features
    return Trunk(model, int(dim), tuple(config.get("mean", IMAGENET_MEAN)),
                 tuple(config.get("std", IMAGENET_STD)))
