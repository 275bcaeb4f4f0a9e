"""Image classifiers (ResNet18, VGG16 as torchvision has them; NYU's screening ResNet-22) cut into
encoder, body and head.

Every classifier takes images in [0, 1] and normalises them itself, so attacks
and perturbations work in pixel space: with the ImageNet statistics
(`imagenet`), or each image by its own mean and standard deviation
(`per_image`, as NYU's breast cancer classifier standardises its inputs). The cut points give the defenses the
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
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from medrobust.errors import ConfigError, InputError, check_choice
from medrobust.models.registry import (
    describe_nonfinite, nonfinite_tensors, register_image_classifier)
from medrobust.models.torchvision_nets import torchvision_architecture

# ImageNet statistics; grey images take their channel average (as timm does)
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
_PRETRAINED = "IMAGENET1K_V1"
NORMALIZATIONS = ("imagenet", "per_image")
# a blank image (std 0) is centred, not divided by zero or by the rounding of its mean;
# far below the spread of any image with content in [0, 1]
_STD_FLOOR = 1e-3


class ImageClassifier(nn.Module):
    """normalise -> encoder (low features) -> body (last conv features) -> head (logits)."""

    def __init__(self, encoder: nn.Module, body: nn.Module, head: nn.Module, in_channels: int,
                 low_channels: int, low_stride: int, normalization: str = "imagenet"):
        super().__init__()
        check_choice("image classifier: normalization", normalization, NORMALIZATIONS)
        self.encoder, self.body, self.head = encoder, body, head
        self.in_channels = in_channels
        self.low_channels = low_channels  # what a decoder on `low` receives
        self.low_stride = low_stride
        self.normalization = normalization
        self.register_buffer("mean", _channel_stats(_MEAN, in_channels))
        self.register_buffer("std", _channel_stats(_STD, in_channels))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if self.normalization == "per_image":
            mean = images.mean(dim=(1, 2, 3), keepdim=True)
            std = images.std(dim=(1, 2, 3), keepdim=True, correction=0).clamp_min(_STD_FLOOR)
            return (images - mean) / std
        return (images - self.mean) / self.std

    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        low = self.encoder(self.normalize(images))
        return {"low": low, "last": self.body(low)}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images)["last"])


@register_image_classifier("resnet18")
def resnet18(num_classes: int, in_channels: int, pretrained: str = "none",
             normalization: str = "imagenet") -> ImageClassifier:
    net = torchvision_net("resnet18", pretrained)
    encoder = nn.Sequential(OrderedDict(
        conv1=adapt_first_conv(net.conv1, in_channels), bn1=net.bn1, relu=net.relu,
        maxpool=net.maxpool, layer1=net.layer1, layer2=net.layer2))
    body = nn.Sequential(OrderedDict(layer3=net.layer3, layer4=net.layer4))
    head = nn.Sequential(OrderedDict(
        avgpool=net.avgpool, flatten=nn.Flatten(1),
        fc=nn.Linear(net.fc.in_features, num_classes)))
    return ImageClassifier(encoder, body, head, in_channels, low_channels=128, low_stride=8,
                           normalization=normalization)


@register_image_classifier("vgg16")
def vgg16(num_classes: int, in_channels: int, pretrained: str = "none",
          normalization: str = "imagenet") -> ImageClassifier:
    net = torchvision_net("vgg16", pretrained)
    features = net.features
    features[0] = adapt_first_conv(features[0], in_channels)
    # encoder: blocks 1-3 (to the third max-pool); body: the conv layers of blocks 4-5
    encoder, body, last_pool = features[:17], features[17:30], features[30]
    classifier = net.classifier
    classifier[-1] = nn.Linear(classifier[-1].in_features, num_classes)
    head = nn.Sequential(OrderedDict(
        pool5=last_pool, avgpool=net.avgpool, flatten=nn.Flatten(1), classifier=classifier))
    return ImageClassifier(encoder, body, head, in_channels, low_channels=256, low_stride=8,
                           normalization=normalization)


class PreActBlock(nn.Module):
    """A pre-activation basic block (He et al. 2016, "identity mappings"): BN, ReLU, 3x3
    conv, BN, ReLU, 3x3 conv, plus the input; a block that changes stride or width takes
    its shortcut through a 1x1 conv of the pre-activation, as NYU's BasicBlockV2."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(in_channels, channels, 1, stride, bias=False)
                         if stride != 1 or in_channels != channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        return out + residual


# NYU's single-view ResNet-22 (Wu et al. 2019, nyukat/breast_cancer_classifier)
RESNET22_STEM_FILTERS = 16
RESNET22_STRIDES = (1, 2, 2, 2, 2)
RESNET22_BLOCKS_PER_STAGE = 2
RESNET22_HIDDEN = 256


@register_image_classifier("resnet22")
def resnet22(num_classes: int, in_channels: int, pretrained: str = "none",
             normalization: str = "imagenet") -> ImageClassifier:
    """The screening classifier's view network: 7x7/2 conv (16 filters, no padding), 3x3/2
    max-pool, five stages of two pre-activation blocks (strides 1, 2, 2, 2, 2; widths 16 to
    256, doubling), BN and ReLU, global average pool, FC 256 -> 256 and ReLU, then the class
    layer. Fully convolutional up to the pool, so any input size of at least 11 pixels.

    No pretrained weights exist outside NYU's multi-view checkpoints; `low` (where the
    denoising defense's decoder branches off) is after the second stage (32 channels,
    stride 8), as ResNet18's is after its second of four.
    """
    if pretrained != "none":
        raise ConfigError(f"resnet22 has no pretrained weights (pretrained: {pretrained!r}); "
                          "train it from scratch with pretrained: none")
    widths = [RESNET22_STEM_FILTERS * 2**index for index in range(len(RESNET22_STRIDES))]
    stages, previous = [], RESNET22_STEM_FILTERS
    for width, stride in zip(widths, RESNET22_STRIDES):
        blocks = [PreActBlock(previous, width, stride)]
        blocks += [PreActBlock(width, width, 1) for _ in range(RESNET22_BLOCKS_PER_STAGE - 1)]
        stages.append(nn.Sequential(*blocks))
        previous = width
    encoder = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(in_channels, RESNET22_STEM_FILTERS, 7, 2, padding=0, bias=False),
        maxpool=nn.MaxPool2d(3, 2, padding=0), layer1=stages[0], layer2=stages[1]))
    body = nn.Sequential(OrderedDict(
        layer3=stages[2], layer4=stages[3], layer5=stages[4],
        final_bn=nn.BatchNorm2d(previous), relu=nn.ReLU()))
    head = nn.Sequential(OrderedDict(
        avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1),
        hidden=nn.Linear(previous, RESNET22_HIDDEN), relu=nn.ReLU(),
        fc=nn.Linear(RESNET22_HIDDEN, num_classes)))
    return ImageClassifier(encoder, body, head, in_channels, low_channels=widths[1],
                           low_stride=8, normalization=normalization)


def torchvision_net(arch: str, pretrained: str, imagenet: str = _PRETRAINED) -> nn.Module:
    """torchvision's `arch` with random weights (`none`), its `imagenet` weights from the
    hub (`imagenet`) or the weights in the file `pretrained` (the whole network's state
    dict, as torchvision saves it)."""
    if pretrained == "imagenet":
        return torchvision_architecture(arch, imagenet)
    net = torchvision_architecture(arch)
    if pretrained != "none":
        load_weights_file(net, Path(pretrained), f"torchvision's {arch}")
    return net


def load_weights_file(net: nn.Module, path: Path, what: str) -> None:
    """Load a state dict file (torch.save'd, read with weights_only, or safetensors)
    into `net` (`what`, for messages); InputError naming the file when it is unreadable
    or does not fit."""
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
        raise InputError(f"{path}: the weights do not fit {what} (" + "; ".join(
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
