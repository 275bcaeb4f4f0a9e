"""The denoising-CNN defense of Xue et al. (MICCAI 2019).

The classifier is trained to be insensitive to small input noise and to keep
enough of the image in its early features to reconstruct it:

    L = Lc + lambda_n * Ln + lambda_a * La

- Lc: cross-entropy on the clean image and on the noisy image x + U(-sigma, sigma)
  (clipped to [0, 1]);
- Ln: distance between the flattened last conv features of the clean and of
  the noisy image (the paper's eq. 1);
- La: distance of the clean image to its reconstructions from the clean and
  from the noisy input, by an auto-encoder whose encoder *is* the classifier's
  low/mid conv layers; only the decoder is extra (eq. 2).

`distance` picks what "distance" means. `l2` (the paper's) is the per-image
Euclidean norm, not squared, averaged over the batch: it grows with the
square root of the feature or image size, so lambda_n and lambda_a mean what
they mean in the paper only at its sizes. `mse` is the element-wise mean of
squares (the authors' public code), independent of size and orders of
magnitude smaller: the same lambda is a far weaker defense (docs/defense.md).

At inference the decoder is unused: `forward` returns the classifier's logits.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from medrobust.errors import ConfigError, check_choice
from medrobust.models.image_classifiers import ImageClassifier
from medrobust.config import config_from_mapping
from medrobust.models.registry import register_defense


class Decoder(nn.Sequential):
    """Upsamples low features back to the image: (conv, BN, ReLU, x2 upsample) per octave.

    Bilinear upsampling avoids the checkerboard artefacts of transposed
    convolutions. Convolving before upsampling rather than after does each
    conv at a quarter of the pixels: upsample-then-convolve ran the widest one
    at full resolution, the decoder took 3x as long and a defended training
    step 3.0x a plain one instead of 2.1-2.3x (docs/benchmarks.md). The
    sigmoid keeps reconstructions in [0, 1] like the images.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        octaves = int(math.log2(stride))
        if 2 ** octaves != stride:
            raise ValueError(f"decoder stride must be a power of 2, not {stride}")
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(octaves):
            narrower = max(channels // 2, 16)
            layers += [nn.Conv2d(channels, narrower, 3, padding=1, bias=False),
                       nn.BatchNorm2d(narrower), nn.ReLU(inplace=True),
                       nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)]
            channels = narrower
        layers += [nn.Conv2d(channels, out_channels, 3, padding=1), nn.Sigmoid()]
        super().__init__(*layers)

    def forward(self, low: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        image = super().forward(low)
        if image.shape[-2:] != size:  # sizes that are not a multiple of the stride
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        return image


class DenoisingClassifier(nn.Module):
    """A classifier plus the decoder that branches off its low features."""

    def __init__(self, classifier: ImageClassifier):
        super().__init__()
        self.classifier = classifier
        self.decoder = Decoder(classifier.low_channels, classifier.in_channels,
                               classifier.low_stride)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images)

    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The classifier's features: what guides an HGD denoiser, defended classifier or not."""
        return self.classifier.forward_features(images)

    def forward_train(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits, last conv features and reconstruction, from one pass."""
        features = self.classifier.forward_features(images)
        return {"logits": self.classifier.head(features["last"]),
                "last": features["last"],
                "reconstruction": self.decoder(features["low"], images.shape[-2:])}


DISTANCES = ("l2", "mse")


@register_defense("denoising")
@dataclasses.dataclass(frozen=True)
class DenoisingDefense:
    lambda_n: float
    lambda_a: float
    noise_sigma: float
    distance: str = "l2"

    def __post_init__(self):
        if self.lambda_n < 0 or self.lambda_a < 0:
            raise ConfigError("defense denoising: lambda_n and lambda_a must be >= 0")
        if not 0 <= self.noise_sigma <= 1:
            raise ConfigError("defense denoising: noise_sigma must be in [0, 1] "
                              "(images are in [0, 1])")
        check_choice("defense denoising: distance", self.distance, DISTANCES)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "DenoisingDefense":
        return config_from_mapping(cls, mapping, "defense denoising")

    def wrap(self, classifier: ImageClassifier) -> DenoisingClassifier:
        return DenoisingClassifier(classifier)

    def loss(self, model: DenoisingClassifier, images: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        uniform = torch.rand(images.shape, generator=generator, device=images.device)
        noisy = (images + (2 * uniform - 1) * self.noise_sigma).clamp(0, 1)
        # one pass over clean and noisy together: half the launches, shared BN statistics
        out = model.forward_train(torch.cat([images, noisy]))
        clean, noised = slice(0, len(images)), slice(len(images), None)
        lc = (F.cross_entropy(out["logits"][clean], labels)
              + F.cross_entropy(out["logits"][noised], labels))
        ln = self.distance_between(out["last"][noised], out["last"][clean])
        la = (self.distance_between(out["reconstruction"][clean], images)
              + self.distance_between(out["reconstruction"][noised], images))
        total = lc + self.lambda_n * ln + self.lambda_a * la
        return total, {"lc": lc, "ln": ln, "la": la}

    def distance_between(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Batch mean of the per-image L2 norm of a - b (`l2`), or mean square (`mse`)."""
        if self.distance == "mse":
            return F.mse_loss(a, b)
        # the norm's gradient at 0 (no noise) is taken as 0 by torch, not NaN
        return torch.linalg.vector_norm((a - b).flatten(1), dim=1).mean()
