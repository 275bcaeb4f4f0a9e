"""Pixel denoisers placed before a classifier: MagNet's Reformer and HGD's U-Net.

Both map images in [0, 1] to images in [0, 1] of the same shape and are
trained on their own (`medrobust.train.denoiser`), with the classifier fixed;
at inference a target model that names one is evaluated and attacked as
denoiser -> classifier (`medrobust.models.pipeline`). References, defaults
and departures: docs/denoisers.md.

- `reformer` (Meng & Chen 2017, MagNet): a small auto-encoder of 3x3
  same-padding convolutions with sigmoid activations, trained with MSE to
  reconstruct x from clip(x + v * N(0, 1), 0, 1). Optionally with MagNet's
  detector (`DetectorSettings`; thresholds are fitted at evaluation, where
  the classifier is known: `medrobust.evaluate.detector`).
- `hgd` (Liao et al. 2018, high-level representation guided denoiser): a
  U-Net that predicts a residual, D(x) = x + r(x), trained so that the frozen
  guide classifier's last conv features of D(x_adv) match those of x (the
  "FGD" loss), on FGSM and I-FGSM examples crafted on a source classifier at
  a random budget per image, plus clean and randomly noised images.

Each kind's settings are a frozen dataclass registered under its config
`kind` (`models.registry.DENOISERS`); their defaults live in the config
schema (workflow/schemas/config.schema.yaml), which fills them in.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from medrobust.attacks import build_attack
from medrobust.config import config_from_mapping
from medrobust.errors import ConfigError, check_choice
from medrobust.logs import get_logger
from medrobust.models.registry import register_denoiser

log = get_logger(__name__)

POOLINGS = ("none", "average", "max")
DETECTOR_SCOPES = ("combined", "each")


# --- settings shared by every kind ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DenoiserSettings:
    """What every denoiser entry holds besides its `kind`: its data, seed and training length."""

    dataset: str
    seed: int
    epochs: int
    batch_size: int
    learning_rate: float

    kind: ClassVar[str]  # set by register_denoiser
    models: ClassVar[tuple[str, ...]] = ()  # settings that name classifiers the training needs

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            self._fail("epochs and batch_size must be >= 1")
        if not self.learning_rate > 0:
            self._fail(f"learning_rate must be > 0, got {self.learning_rate!r}")

    def _fail(self, message: str):
        raise ConfigError(f"denoiser {self.kind}: {message}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], section: str | None = None):
        return config_from_mapping(cls, mapping, section or f"denoiser {cls.kind}")


# --- MagNet's Reformer ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DetectorSettings:
    """MagNet's detector on a reformer: which scores, and the false-positive rate to allow.

    Scores: the reconstruction error mean |x - AE(x)|^p (`reconstruction_norm`
    p) and, per temperature T (none: the error alone), the Jensen-Shannon
    divergence between softmax(f(x)/T) and softmax(f(AE(x))/T). An image is
    rejected when any score exceeds its threshold. `scope` says what
    `false_positive_rate` bounds on the validation images: `combined`, the
    fraction rejected by any score; `each`, the fraction each score rejects
    on its own (MagNet's choice: the combined rate is then up to the number
    of scores times it).
    """

    false_positive_rate: float
    temperatures: tuple[float, ...]
    reconstruction_norm: float
    scope: str

    def __post_init__(self):
        if not 0 < self.false_positive_rate < 1:
            raise ConfigError("detector: false_positive_rate must be in (0, 1), got "
                              f"{self.false_positive_rate!r}")
        object.__setattr__(self, "temperatures", tuple(self.temperatures))
        if any(not temperature > 0 for temperature in self.temperatures):
            raise ConfigError(f"detector: temperatures must be > 0, got {list(self.temperatures)}")
        if not self.reconstruction_norm >= 1:
            raise ConfigError("detector: reconstruction_norm must be >= 1, got "
                              f"{self.reconstruction_norm!r}")
        check_choice("detector: scope", self.scope, DETECTOR_SCOPES)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "DetectorSettings":
        return config_from_mapping(cls, mapping, "detector")


class Reformer(nn.Module):
    """MagNet's auto-encoder: 3x3 same-padding convolutions, sigmoid after each.

    Without pooling: conv, conv, conv -> C channels. With pooling: conv,
    pool, conv | conv, upsample (nearest, as Keras' UpSampling2D), conv,
    conv -> C. Odd sides pool to the ceiling and are cropped back.
    """

    def __init__(self, in_channels: int, filters: int, pooling: str):
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.Sigmoid()]

        encoder, decoder = conv(in_channels, filters), conv(filters, filters)
        if pooling != "none":
            pool = nn.AvgPool2d if pooling == "average" else nn.MaxPool2d
            encoder += [pool(2, ceil_mode=True), *conv(filters, filters)]
            decoder += [nn.Upsample(scale_factor=2, mode="nearest"), *conv(filters, filters)]
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder, *conv(filters, in_channels))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        return self.decoder(self.encoder(images))[..., :height, :width]


@register_denoiser("reformer")
@dataclasses.dataclass(frozen=True)
class ReformerSettings(DenoiserSettings):
    noise_std: float
    filters: int
    pooling: str
    detector: DetectorSettings | None = None  # fitted at evaluation; not part of training

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.noise_std <= 1:
            self._fail(f"noise_std must be in (0, 1] (images are in [0, 1]), "
                       f"got {self.noise_std!r}")
        if self.filters < 1:
            self._fail(f"filters must be >= 1, got {self.filters!r}")
        check_choice(f"denoiser {self.kind}: pooling", self.pooling, POOLINGS)
        if isinstance(self.detector, Mapping):
            object.__setattr__(self, "detector", DetectorSettings.from_mapping(self.detector))

    def build(self, in_channels: int) -> Reformer:
        return Reformer(in_channels, self.filters, self.pooling)

    def learning_rate_at(self, epoch: int) -> float:
        return self.learning_rate  # Keras' Adam as MagNet uses it: constant

    def training_examples(self, images, labels, models, generator, device):
        # the noise is drawn afresh in every step (`loss`): the inputs are the clean images
        return images, torch.arange(len(images))

    def loss(self, denoiser, inputs, clean, models, generator):
        noise = torch.randn(inputs.shape, generator=generator, device=inputs.device)
        noisy = (inputs + self.noise_std * noise).clamp(0, 1)
        mse = F.mse_loss(denoiser(noisy), clean)
        return mse, {"mse": mse}


# --- HGD -----------------------------------------------------------------------------------


def _conv_block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _stage(cin: int, cout: int, blocks: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(_conv_block(cin, cout, stride),
                         *(_conv_block(cout, cout) for _ in range(blocks - 1)))


class UNetDenoiser(nn.Module):
    """HGD's denoiser: a U-Net of conv3x3-BN-ReLU blocks that predicts a residual.

    Encoder level i (width `encoder_widths[i]`) starts with a stride-2 block
    for i > 0; decoder level i upsamples the level below bilinearly to level
    i's size, concatenates the encoder's level-i output and applies its
    blocks (width `decoder_widths[i]`); a final 1x1 conv gives the residual
    r(x), and D(x) = clip(x + r(x), 0, 1). Blocks per level: 2 at the top
    level, 3 below, as the reference (its 5-level widths are the defaults).
    """

    def __init__(self, in_channels: int, encoder_widths, decoder_widths):
        super().__init__()

        def blocks(level: int) -> int:
            return 2 if level == 0 else 3

        self.encoder = nn.ModuleList()
        channels = in_channels
        for level, width in enumerate(encoder_widths):
            self.encoder.append(_stage(channels, width, blocks(level), 1 if level == 0 else 2))
            channels = width
        # what reaches decoder level i from below: decoder level i + 1, or the deepest encoder level
        from_below = [*decoder_widths[1:], encoder_widths[-1]]
        self.decoder = nn.ModuleList(
            _stage(from_below[level] + encoder_widths[level], width, blocks(level))
            for level, width in enumerate(decoder_widths))
        self.head = nn.Conv2d(decoder_widths[0], in_channels, 1)

    def residual(self, images: torch.Tensor) -> torch.Tensor:
        levels = []
        x = images
        for stage in self.encoder:
            x = stage(x)
            levels.append(x)
        for level in reversed(range(len(self.decoder))):
            skip = levels[level]
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self.decoder[level](torch.cat([x, skip], dim=1))
        return self.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images + self.residual(images)).clamp(0, 1)


@register_denoiser("hgd")
@dataclasses.dataclass(frozen=True)
class HGDSettings(DenoiserSettings):
    guide: str                    # the classifier whose last conv features guide the denoiser
    source: str                   # the classifier the training examples are crafted on
    encoder_widths: tuple[int, ...]
    decoder_widths: tuple[int, ...]
    epsilon_range: tuple[int, int]  # budgets drawn per image, integers in 1/255
    ifgsm_steps: tuple[int, ...]    # one I-FGSM example per step count (FGSM always)
    clean_and_noise: bool           # also clean and randomly noised inputs

    models: ClassVar[tuple[str, ...]] = ("guide", "source")

    def __post_init__(self):
        super().__post_init__()
        for key in ("encoder_widths", "decoder_widths", "epsilon_range", "ifgsm_steps"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        if not self.encoder_widths or any(width < 1 for width in
                                          self.encoder_widths + self.decoder_widths):
            self._fail("encoder_widths and decoder_widths must hold positive integers")
        if len(self.decoder_widths) != len(self.encoder_widths) - 1:
            self._fail(f"decoder_widths needs one width fewer than encoder_widths "
                       f"({len(self.encoder_widths)}), got {len(self.decoder_widths)}")
        if len(self.epsilon_range) != 2 or not 1 <= self.epsilon_range[0] \
                <= self.epsilon_range[1] <= 255:
            self._fail(f"epsilon_range must be [low, high] with 1 <= low <= high <= 255 "
                       f"(1/255 units), got {list(self.epsilon_range)}")
        if any(steps < 1 for steps in self.ifgsm_steps):
            self._fail(f"ifgsm_steps must be positive, got {list(self.ifgsm_steps)}")

    def build(self, in_channels: int) -> UNetDenoiser:
        return UNetDenoiser(in_channels, self.encoder_widths, self.decoder_widths)

    def learning_rate_at(self, epoch: int) -> float:
        """The reference's schedule: x0.1 after 60 % of the epochs, x0.01 after 90 %."""
        done = (epoch - 1) / self.epochs
        return self.learning_rate * (0.01 if done >= 0.9 else 0.1 if done >= 0.6 else 1.0)

    def training_examples(self, images, labels, models, generator, device):
        """Per clean image: an FGSM example, an I-FGSM example per step count (each at its
        own budget, drawn from `epsilon_range`), then the clean image and a randomly
        signed perturbation at a drawn budget if `clean_and_noise`.

        Crafted once, on `models["source"]`, and kept on the CPU: the reference
        trains on a fixed set of examples too.
        """
        low, high = self.epsilon_range
        count = len(images)
        examples = []
        for attack, params in [("fgsm", {})] + [("ifgsm", {"steps": steps})
                                                for steps in self.ifgsm_steps]:
            budgets = torch.randint(low, high + 1, (count,), generator=generator)
            crafted = torch.empty_like(images)
            for budget in budgets.unique().tolist():
                # one attack per budget: an attack's epsilon is one number for its batch
                chosen = (budgets == budget).nonzero().flatten()
                run = build_attack(attack, models["source"], budget, params)
                for batch in chosen.split(self.batch_size):
                    crafted[batch] = run(images[batch].to(device), labels[batch].to(device)).cpu()
            examples.append(crafted)
            log.info("crafted %d %s examples %s on the source at budgets %d-%d/255", count,
                     attack, params or "", low, high)
        if self.clean_and_noise:
            budgets = torch.randint(low, high + 1, (count, 1, 1, 1), generator=generator) / 255
            signs = torch.randint(0, 2, images.shape, generator=generator) * 2.0 - 1.0
            examples += [images, (images + budgets * signs).clamp(0, 1)]
        return torch.cat(examples), torch.arange(count).repeat(len(examples))

    def loss(self, denoiser, inputs, clean, models, generator):
        """FGD: mean |f(D(x_adv)) - f(x)| over the guide's last conv features."""
        guide = models["guide"]
        with torch.no_grad():
            target = guide.forward_features(clean)["last"]
        l1 = (guide.forward_features(denoiser(inputs))["last"] - target).abs().mean()
        return l1, {"feature_l1": l1}
