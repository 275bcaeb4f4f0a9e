"""Multiple-instance slide classifiers over bags of tile features.

Every architecture has the shape MHIM-MIL's reference code gives its
baselines (DearCaat/MHIM-MIL, docs/mil.md): a front (Linear in -> 512, ReLU,
Dropout 0.25) embeds each instance, an aggregator pools the embeddings into
one bag feature, and a linear predictor classifies it. The stages are separate
methods (`embed_instances`, `aggregate`, `classify`, `instance_probability`)
so that MHIM-MIL (`models.mhim`) can score instances with a teacher, drop
some, and pool the rest with the student's weights.

- `abmil`: attention MIL (Ilse, Tomczak and Welling, ICML 2018), attention
  Linear 512 -> 128, ReLU, Linear 128 -> 1 as in the reference;
- `gated_abmil`: the gated variant, tanh(V h) * sigmoid(U h) (Ilse et al. eq. 9);
- `transmil`: TransMIL as MHIM-MIL uses it (`models.transmil`).

A slide classifier built from config keeps its resolved `arch_options` as
`.options` (a frozen dataclass), which the trainer writes to config.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from medrobust.config import config_from_mapping
from medrobust.errors import ConfigError, InputError
from medrobust.models.registry import register_slide_classifier


def initialize_weights(module: nn.Module) -> None:
    """The reference's initialisation (from CLAM): Xavier-normal linear weights, zero biases."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_normal_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.LayerNorm):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


@dataclass(frozen=True)
class Pooled:
    """What an aggregator gives: the bag feature `(hidden_dim,)`, the attention each instance
    got `(n,)` (for heatmaps and top-k analyses), and what `instance_probability` needs."""

    feature: torch.Tensor
    attention: torch.Tensor
    scoring: Any = None


class MILClassifier(nn.Module):
    """A bag `(n, in_dim)` -> logits `(num_classes,)` and attention `(n,)`."""

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.in_dim = in_dim
        self.front = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.predictor = nn.Linear(hidden_dim, num_classes)

    def embed_instances(self, bag: torch.Tensor) -> torch.Tensor:
        """Instance embeddings `(n, hidden_dim)` of a bag of features `(n, in_dim)`."""
        if bag.ndim != 2 or bag.shape[1] != self.in_dim:
            raise InputError(f"{type(self).__name__} expects a bag of shape (n, {self.in_dim}), "
                             f"got {tuple(bag.shape)}")
        if bag.shape[0] == 0:
            raise InputError(f"{type(self).__name__} got an empty bag (a slide without tiles); "
                             f"it needs at least one instance")
        return self.front(bag)

    def aggregate(self, embeddings: torch.Tensor) -> Pooled:
        raise NotImplementedError

    def classify(self, feature: torch.Tensor) -> torch.Tensor:
        """Logits `(..., num_classes)` of a bag feature, or of instance features."""
        return self.predictor(feature)

    def instance_probability(self, embeddings: torch.Tensor, pooled: Pooled) -> torch.Tensor:
        """MHIM-MIL v2's class-aware instance probability `(n,)`: max_c softmax_c of the
        predictor's weights applied to each instance's contribution to the bag feature.

        Without the predictor's bias, as the reference computes it (it adds class 0's bias
        to every class, which the softmax cancels): a contribution is about 1/n of the bag
        feature, so a bag-level bias would outweigh it and rank an instance's evidence
        against the favoured class below no evidence at all (docs/mil.md)."""
        contributions = self.instance_contributions(embeddings, pooled)
        return torch.softmax(F.linear(contributions, self.predictor.weight), dim=-1).amax(dim=-1)

    def instance_contributions(self, embeddings: torch.Tensor, pooled: Pooled) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.aggregate(self.embed_instances(bag))
        return self.classify(pooled.feature), pooled.attention


@dataclass(frozen=True)
class ABMILOptions:
    """The `arch_options` of an `abmil` or `gated_abmil` slide classifier."""

    hidden_dim: int = 512      # the front's output, L in Ilse et al.
    attention_dim: int = 128   # attention hidden size, D in Ilse et al.
    dropout: float = 0.25      # after the front

    def __post_init__(self):
        if self.hidden_dim < 1 or self.attention_dim < 1 or not 0 <= self.dropout < 1:
            raise ConfigError("arch_options (abmil): hidden_dim and attention_dim must be >= 1, "
                              "dropout in [0, 1)")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "ABMILOptions":
        return config_from_mapping(cls, mapping, "arch_options (abmil)")


class ABMIL(MILClassifier):
    """Attention MIL; `gated` multiplies a sigmoid gate into the attention's hidden layer."""

    def __init__(self, in_dim: int, num_classes: int, options: ABMILOptions = ABMILOptions(),
                 gated: bool = False):
        super().__init__(in_dim, num_classes, options.hidden_dim, options.dropout)
        self.options, self.gated = options, gated
        # no biases in the attention, as the reference's DAttention
        hidden, width = options.hidden_dim, options.attention_dim
        self.attention_v = nn.Sequential(nn.Linear(hidden, width, bias=False),
                                         nn.Tanh() if gated else nn.ReLU())
        self.attention_u = (nn.Sequential(nn.Linear(hidden, width, bias=False), nn.Sigmoid())
                            if gated else None)
        self.attention_w = nn.Linear(width, 1, bias=False)
        initialize_weights(self)

    def attention_scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Unnormalised attention `(n,)`; its softmax over the bag gives the weights."""
        hidden = self.attention_v(embeddings)
        if self.attention_u is not None:
            hidden = hidden * self.attention_u(embeddings)
        return self.attention_w(hidden).squeeze(-1)

    def aggregate(self, embeddings: torch.Tensor) -> Pooled:
        weights = torch.softmax(self.attention_scores(embeddings), dim=0)
        return Pooled(weights @ embeddings, weights)

    def instance_contributions(self, embeddings, pooled):
        # a_i h_i: the bag feature is their sum
        return pooled.attention[:, None] * embeddings


def _require(config: Mapping[str, Any], arch: str) -> tuple[int, int]:
    missing = [key for key in ("feature_dim", "num_classes") if key not in config]
    if missing:
        raise ConfigError(f"{arch} model config lacks {', '.join(missing)}")
    return int(config["feature_dim"]), int(config["num_classes"])


@register_slide_classifier("abmil", options=ABMILOptions)
def abmil(config: Mapping[str, Any]) -> ABMIL:
    """Build from a resolved slide model config (`feature_dim`, `num_classes`, `arch_options`)."""
    return ABMIL(*_require(config, "abmil"),
                 ABMILOptions.from_mapping(config.get("arch_options") or {}))


@register_slide_classifier("gated_abmil", options=ABMILOptions)
def gated_abmil(config: Mapping[str, Any]) -> ABMIL:
    return ABMIL(*_require(config, "gated_abmil"),
                 ABMILOptions.from_mapping(config.get("arch_options") or {}), gated=True)
