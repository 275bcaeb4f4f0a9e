"""Image classifiers (torchvision ResNet18, VGG16) cut into encoder, body and head.

Every classifier takes images in [0, 1] and normalises them itself, so attacks
and perturbations work in pixel space. The cut points give the defenses the
features they need: `low` (the encoder's low/mid conv features, where the
denoising auto-encoder branches off) and `last` (the last conv features,
before pooling).

Pretrained weights are torchvision's ImageNet weights, downloaded from its hub
(`imagenet`) or read from a local file of the same state dict (for machines
without internet, e.g. `~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth`
copied from one that has it), before the head and the first conv are adapted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from medrobust.errors import InputError
from medrobust.models.registry import (
    describe_nonfinite, nonfinite_tensors, register_image_classifier)

# ImageNet statistics; grey images take their channel average (as timm does)
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
_PRETRAINED = "IMAGENET1K_V1"


class ImageClassifier(nn.Module):
    """normalise -> encoder (low features) -> body (last conv features) -> head (logits)."""

    def __init__(self, encoder: nn.Module, body: nn.Module, head: nn.Module, in_channels: int,
                 low_channels: int, low_stride: int):
        super().__init__()
        self.encoder, self.body, self.head = encoder, body, head
        self.in_channels = in_channels
        self.low_channels = low_channels  # what a decoder on `low` receives
        self.low_stride = low_stride
        self.register_buffer("mean", _channel_stats(_MEAN, in_channels))
        self.register_buffer("std", _channel_stats(_STD, in_channels))

    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        low = self.encoder((images - self.mean) / self.std)
        return {"low": low, "last": self.body(low)}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images)["last"])


@register_image_classifier("resnet18")
def resnet18(num_classes: int, in_channels: int, pretrained: str = "none") -> ImageClassifier:
    net = torchvision_net("resnet18", pretrained)
    encoder = nn.Sequential(OrderedDict(
        conv1=adapt_first_conv(net.conv1, in_channels), bn1=net.bn1, relu=net.relu,
        maxpool=net.maxpool, layer1=net.layer1, layer2=net.layer2))
    body = nn.Sequential(OrderedDict(layer3=net.layer3, layer4=net.layer4))
    head = nn.Sequential(OrderedDict(
        avgpool=net.avgpool, flatten=nn.Flatten(1),
        fc=nn.Linear(net.fc.in_features, num_classes)))
    return ImageClassifier(encoder, body, head, in_channels, low_channels=128, low_stride=8)


@register_image_classifier("vgg16")
def vgg16(num_classes: int, in_channels: int, pretrained: str = "none") -> ImageClassifier:
    net = torchvision_net("vgg16", pretrained)
    features = net.features
    features[0] = adapt_first_conv(features[0], in_channels)
    # encoder: blocks 1-3 (to the third max-pool); body: the conv layers of blocks 4-5
    encoder, body, last_pool = features[:17], features[17:30], features[30]
    classifier = net.classifier
    classifier[-1] = nn.Linear(classifier[-1].in_features, num_classes)
    head = nn.Sequential(OrderedDict(
        pool5=last_pool, avgpool=net.avgpool, flatten=nn.Flatten(1), classifier=classifier))
    return ImageClassifier(encoder, body, head, in_channels, low_channels=256, low_stride=8)


def torchvision_net(arch: str, pretrained: str) -> nn.Module:
    """torchvision's `arch` with random weights (`none`), ImageNet weights from the
    hub (`imagenet`) or the weights in the file `pretrained`."""
    if pretrained == "imagenet":
        return torchvision.models.get_model(arch, weights=_PRETRAINED)
    net = torchvision.models.get_model(arch)
    if pretrained != "none":
        load_weights_file(net, Path(pretrained), arch)
    return net


def load_weights_file(net: nn.Module, path: Path, arch: str) -> None:
    """Load a state dict file (torch.save'd, read with weights_only, or safetensors)
    into `net`; InputError naming the file when it is unreadable or does not fit."""
    try:
        state = (load_file(str(path)) if path.suffix == ".safetensors"
                 else torch.load(path, map_location="cpu", weights_only=True))
    except Exception as error:  # pickle, zip, safetensors and weights_only refusals alike
        raise InputError(f"{path}: not a readable weights file ({error})") from error
    if not isinstance(state, Mapping) or \
            not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise InputError(f"{path}: not a state dict (names to tensors), as "
                         f"torch.save(model.state_dict(), path) writes")
    expected = net.state_dict()
    misfits = [(label, keys) for label, keys in (
        ("missing", [key for key in expected if key not in state]),
        ("unexpected", [key for key in state if key not in expected]),
        ("of another shape", [f"{key} {tuple(state[key].shape)} for "
                              f"{tuple(expected[key].shape)}" for key in expected
                              if key in state and state[key].shape != expected[key].shape]),
    ) if keys]
    if misfits:
        raise InputError(f"{path}: the weights do not fit torchvision's {arch} (" + "; ".join(
            f"{label}: {_some(keys)}" for label, keys in misfits) + ")")
    bad = nonfinite_tensors(state)
    if bad:
        raise InputError(f"{path}: the weights hold NaN or infinite values "
                         f"({describe_nonfinite(bad)})")
    net.load_state_dict(state)


def _some(items: Sequence[str], limit: int = 3) -> str:
    more = len(items) - limit
    return ", ".join(items[:limit]) + (f" and {more} more" if more > 0 else "")


def adapt_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """The RGB conv for `in_channels` inputs, computing the same map on grey images.

    The RGB kernels are averaged and spread over the new channels (timm's rule),
    so pretrained filters carry over; for random weights a sum of three random
    kernels has the variance a fresh one-channel kernel would.
    """
    if in_channels == conv.in_channels:
        return conv
    adapted = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                        conv.padding, conv.dilation, conv.groups, conv.bias is not None)
    with torch.no_grad():
        kernel = conv.weight.mean(dim=1, keepdim=True) * (conv.in_channels / in_channels)
        adapted.weight.copy_(kernel.expand(-1, in_channels, -1, -1))
        if conv.bias is not None:
            adapted.bias.copy_(conv.bias)
    return adapted


def _channel_stats(values: tuple[float, ...], channels: int) -> torch.Tensor:
    if channels != len(values):
        values = (sum(values) / len(values),) * channels
    return torch.tensor(values, dtype=torch.float32).view(1, channels, 1, 1)
