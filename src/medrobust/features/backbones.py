"""Registry of tile-embedding backbones: a config `features.backbone` names one builder.

A builder takes the weights name (`random` or a pretrained set) and a seed and
returns a `Backbone`: a module in eval mode mapping float tiles in [0, 1],
shape `(N, 3, T, T)`, to features `(N, dim)`. Input normalisation is part of
the module (docs/architecture.md), so callers only scale uint8 tiles to [0, 1].
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
import torchvision
from torch import nn

from medrobust.errors import ConfigError, MedrobustError, unknown_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Backbone:
    name: str
    weights: str
    model: nn.Module          # eval mode; (N, 3, T, T) in [0, 1] -> (N, dim)
    dim: int
    mean: tuple[float, ...]   # the normalisation applied inside `model`
    std: tuple[float, ...]
    weights_sha256: str


Builder = Callable[[str, int], Backbone]
BACKBONES: dict[str, Builder] = {}


def register_backbone(name: str) -> Callable[[Builder], Builder]:
    def add(builder: Builder) -> Builder:
        BACKBONES[name] = builder
        return builder

    return add


def build_backbone(name: str, weights: str = "random", seed: int = 0) -> Backbone:
    try:
        builder = BACKBONES[name]
    except KeyError:
        raise unknown_name("backbone", name, BACKBONES) from None
    return builder(weights, seed)


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


def _finish(name: str, weights: str, trunk: nn.Module, dim: int) -> Backbone:
    model = nn.Sequential(Normalize(IMAGENET_MEAN, IMAGENET_STD), trunk).eval()
    model.requires_grad_(False)
    return Backbone(name, weights, model, dim, IMAGENET_MEAN, IMAGENET_STD,
                    state_dict_sha256(model))


def _torchvision_resnet(name: str, weights_enum, weights: str, seed: int) -> Backbone:
    """A torchvision ResNet with its classifier removed: the global-average-pooled features."""
    known = ("random", "imagenet")
    if weights not in known:
        raise ConfigError(f"unknown weights {weights!r} for backbone {name}; known: {', '.join(known)}")
    constructor = getattr(torchvision.models, name)
    if weights == "random":
        # a private RNG stream: the same seed gives the same weights, whatever ran before
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            resnet = constructor(weights=None)
    else:
        try:
            resnet = constructor(weights=weights_enum)  # cached under $TORCH_HOME/hub
        except OSError as error:
            raise MedrobustError(
                f"could not load {name} ImageNet weights ({error}); without internet, "
                f"put {weights_enum.url.rsplit('/', 1)[-1]} in the torch hub cache "
                "($TORCH_HOME/hub/checkpoints) or use weights: random") from error
    dim = resnet.fc.in_features
    resnet.fc = nn.Identity()  # avgpool + flatten stay: (N, dim)
    return _finish(name, weights, resnet, dim)


@register_backbone("resnet18")
def resnet18(weights: str, seed: int) -> Backbone:
    return _torchvision_resnet("resnet18", torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
                               weights, seed)


@register_backbone("resnet50")
def resnet50(weights: str, seed: int) -> Backbone:
    return _torchvision_resnet("resnet50", torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
                               weights, seed)
