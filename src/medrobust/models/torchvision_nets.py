"""ResNet18, ResNet50 and VGG16 laid out as torchvision lays them out, without importing
torchvision.

Importing torchvision costs about 3 s of CPU in every job that builds a model (it
imports torch._dynamo through torchvision.ops), as much as the work of many of the
default run's jobs; these three networks are all medrobust takes from it. Same module
names, parameter shapes, construction order and initialisation as torchvision 0.17+:
a seeded network equals torchvision's weight for weight, and torchvision's ImageNet
state dicts load unchanged (tests/test_torchvision_nets.py checks both against
torchvision itself). ImageNet weights come from the URLs torchvision uses, through
`torch.hub` into the same cache ($TORCH_HOME/hub/checkpoints), hash-checked.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from medrobust.errors import MedrobustError

# torchvision's ImageNet weights (the file names end in their sha256 prefix, which
# torch.hub checks); the V2 ResNet50 is what torchvision's `DEFAULT` names
IMAGENET_URLS = {
    ("resnet18", "IMAGENET1K_V1"): "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    ("resnet50", "IMAGENET1K_V1"): "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    ("resnet50", "IMAGENET1K_V2"): "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
    ("vgg16", "IMAGENET1K_V1"): "https://download.pytorch.org/models/vgg16-397923af.pth",
}

# VGG16's convolution widths, "M" a 2x2 max-pool (configuration D of Simonyan & Zisserman)
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                512, 512, 512, "M", 512, 512, 512, "M")


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; the shortcut is the input or `downsample` of it."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(_add_shortcut(out, x, self.downsample))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, "ResNet v1.5"), 1x1 expand by 4, with BN."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        return self.relu(_add_shortcut(self.bn3(self.conv3(out)), x, self.downsample))


def _add_shortcut(out: torch.Tensor, x: torch.Tensor, downsample: nn.Module | None) -> torch.Tensor:
    """`out` plus the block's shortcut, in place and after the main path, as torchvision
    does: the order fixes how autograd sums the gradients, so training matches it bit
    for bit."""
    out += x if downsample is None else downsample(x)
    return out


class ResNet(nn.Module):
    """7x7/2 stem, 3x3/2 max-pool, four stages (64-512 channels times the block's
    expansion, strides 1, 2, 2, 2), global average pool, linear classifier."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], blocks_per_stage: tuple[int, ...],
                 num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        in_channels = 64
        for index, (channels, blocks) in enumerate(zip((64, 128, 256, 512), blocks_per_stage)):
            stride = 1 if index == 0 else 2
            stage, in_channels = _resnet_stage(block, in_channels, channels, blocks, stride)
            setattr(self, f"layer{index + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet_stage(block, in_channels: int, channels: int, blocks: int,
                  stride: int) -> tuple[nn.Sequential, int]:
    """A stage's blocks and its output width; the first block adapts the shortcut (built
    before the block, as torchvision does, so seeded weights match)."""
    out_channels = channels * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                   nn.BatchNorm2d(out_channels))
    layers = [block(in_channels, channels, stride, downsample)]
    layers += [block(out_channels, channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers), out_channels


class VGG(nn.Module):
    """`features` (3x3 convs with ReLU, max-pools), 7x7 adaptive pool, three linear layers
    with ReLU and dropout."""

    def __init__(self, layers: tuple[int | str, ...], num_classes: int = 1000,
                 dropout: float = 0.5):
        super().__init__()
        modules: list[nn.Module] = []
        in_channels = 3
        for layer in layers:
            if layer == "M":
                modules.append(nn.MaxPool2d(2, 2))
            else:
                modules += [nn.Conv2d(in_channels, layer, 3, padding=1), nn.ReLU(inplace=True)]
                in_channels = layer
        self.features = nn.Sequential(*modules)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(in_channels * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(4096, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: ResNet(BasicBlock, (2, 2, 2, 2)),
    "resnet50": lambda: ResNet(Bottleneck, (3, 4, 6, 3)),
    "vgg16": lambda: VGG(VGG16_LAYERS),
}


def torchvision_architecture(arch: str, imagenet: str | None = None) -> nn.Module:
    """`arch` for 1000 ImageNet classes, randomly initialised from torch's global
    generator, or with torchvision's `imagenet` weights (e.g. IMAGENET1K_V1), downloaded
    once into torch.hub's cache."""
    net = ARCHITECTURES[arch]()
    if imagenet is None:
        return net
    url = IMAGENET_URLS[(arch, imagenet)]
    try:
        state = torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True)
    except OSError as error:  # no network, a proxy, a full disk
        raise MedrobustError(
            f"could not load {arch} ImageNet weights from {url} ({error}); without "
            f"internet, put {url.rsplit('/', 1)[-1]} in the torch hub cache "
            "($TORCH_HOME/hub/checkpoints) or give that file's path instead of imagenet"
        ) from error
    net.load_state_dict(state)
    return net
