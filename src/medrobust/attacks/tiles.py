"""Adversarial tiles: PGD-L∞ in pixel space on the k most-attended tiles of one slide.

torchattacks and the project's image attacks take a model from images to
logits; a slide model takes a bag of tile features. `TileBag` closes that
gap: it is the slide's logits as a function of the pixels of a few of its
tiles, through the feature backbone and the MIL head, with every other tile's
stored feature fixed. `TilePGD` is the project's `PGD` on that module, so the
random start, the signed steps, the projection and the seeded draws are
PGD's own; what it adds is choosing the tiles (the clean bag's k highest
attention weights) and putting the attacked features back into the bag.

The loss is the cross-entropy of the slide's true label (maximised), the
budget ε is per pixel of the attacked tiles, in 1/255 as for the image
attacks; untouched tiles keep their stored features bit for bit.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from medrobust.attacks.base import frozen
from medrobust.attacks.pgd import PGD


class TileBag(nn.Module):
    """Pixels of some tiles `(k, 3, T, T)` in [0, 1] -> the slide's logits `(1, C)`.

    `hold(features, positions)` sets the slide: its stored features `(n, dim)`
    and which rows the given tiles replace. `autocast_dtype` is the precision the
    stored features were embedded at (features.extract.autocast_dtype; None: fp32):
    the tiles are embedded at the same, so the attacked rows differ from the stored
    ones by the attack, not also by bf16's rounding (about as large as 1/255 of a
    tile's pixels on a ResNet18).
    """

    def __init__(self, backbone: nn.Module, mil: nn.Module,
                 autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.backbone = backbone
        self.mil = mil
        self.autocast_dtype = autocast_dtype
        self.features: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None

    def hold(self, features: torch.Tensor, positions: torch.Tensor) -> None:
        self.features, self.positions = features.detach(), positions

    def bag(self, tiles: torch.Tensor) -> torch.Tensor:
        """The slide's bag with the held rows replaced by the tiles' features."""
        autocast = (torch.autocast(tiles.device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        with autocast:
            embedded = self.backbone(tiles)
        embedded = embedded.to(self.features.dtype)
        # out of place, so the gradient flows to the tiles and the stored rows stay untouched
        return self.features.index_put((self.positions,), embedded)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        logits, _ = self.mil(self.bag(tiles))
        return logits.reshape(1, -1)


@dataclass(frozen=True)
class TileAttack:
    """One slide's attack: which tiles, their clean and adversarial pixels, the bags' logits."""

    positions: np.ndarray          # (k,) tile indices, most-attended first
    clean_tiles: torch.Tensor      # (k, 3, T, T)
    adversarial_tiles: torch.Tensor
    features: torch.Tensor         # (n, dim) the bag with the attacked tiles' new features
    clean_logits: torch.Tensor     # (C,)
    adversarial_logits: torch.Tensor


def most_attended(attention: torch.Tensor, k: int) -> np.ndarray:
    """Indices of the k largest attention weights (all tiles if fewer), largest first;
    ties go to the lower index, so the choice is reproducible."""
    order = np.argsort(-attention.detach().cpu().double().numpy(), kind="stable")
    return order[:k]


class TilePGD(PGD):
    """PGD-L∞ on a slide's k most-attended tiles through backbone and MIL head."""

    title = "PGD-L∞ on the k most-attended tiles"

    def __init__(self, backbone: nn.Module, mil: nn.Module, epsilon: float, params=None, *,
                 generator: torch.Generator | None = None,
                 autocast_dtype: torch.dtype | None = None):
        # eval mode throughout, for the clean and attacked bags too (no dropout)
        super().__init__(TileBag(backbone, mil, autocast_dtype).eval(), epsilon, params,
                         generator=generator)

    def attack_slide(self, features: torch.Tensor, read_tiles: Callable[[np.ndarray], torch.Tensor],
                     label: int, k: int) -> TileAttack:
        """Attack the k most-attended tiles of the bag `features` (on the attack's device).

        `read_tiles(positions)` gives those tiles' pixels `(k, 3, T, T)` in [0, 1]
        on the features' device.
        """
        bag_model: TileBag = self.model
        # eval mode for the tile choice and both bags too, not only the PGD steps: a model
        # left in train mode would pick tiles and score slides with dropout on
        with frozen(bag_model):
            with torch.no_grad():
                clean_logits, attention = bag_model.mil(features)
            positions = most_attended(attention, k)
            tiles = read_tiles(positions)
            index = torch.as_tensor(positions, device=features.device)
            bag_model.hold(features, index)
            labels = torch.tensor([label], device=features.device)
            adversarial = self(tiles, labels)
            with torch.no_grad():
                attacked = bag_model.bag(adversarial)
                adversarial_logits, _ = bag_model.mil(attacked)
        return TileAttack(positions, tiles, adversarial, attacked, clean_logits.reshape(-1),
                          adversarial_logits.reshape(-1))
