"""Multiple-instance slide classifiers over bags of tile features.

ABMIL (Ilse, Tomczak and Welling, "Attention-based deep multiple instance
learning", ICML 2018) with gated attention. Its stages are separate methods
(`embed_instances`, `attention`, `bag_embedding`, `classify`) so that a wrapper
such as MHIM-MIL can score instances with a teacher, drop some, and pool the
rest with the same weights.

A slide classifier built from config keeps its resolved `arch_options` as
`.options` (a frozen dataclass), which the trainer writes to config.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from medrobust.errors import ConfigError, InputError
from medrobust.config import config_from_mapping
from medrobust.models.registry import register_slide_classifier


@dataclass(frozen=True)
class ABMILOptions:
    """The `arch_options` of an `arch: abmil` slide classifier."""

    hidden_dim: int = 256      # instance embedding size (L in the paper)
    attention_dim: int = 128   # attention hidden size (D in the paper)
    dropout: float = 0.0

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "ABMILOptions":
        return config_from_mapping(cls, mapping, "arch_options (abmil)")


class ABMIL(nn.Module):
    """Gated-attention MIL: a bag `(n, in_dim)` -> logits `(num_classes,)` and attention `(n,)`."""

    def __init__(self, in_dim: int, num_classes: int, options: ABMILOptions = ABMILOptions()):
        super().__init__()
        self.in_dim = in_dim
        self.options = options
        self.embed = nn.Sequential(nn.Linear(in_dim, options.hidden_dim), nn.ReLU(),
                                   nn.Dropout(options.dropout))
        # gated attention: w^T (tanh(V h) * sigmoid(U h)), Ilse et al. eq. 9
        self.attention_v = nn.Sequential(nn.Linear(options.hidden_dim, options.attention_dim),
                                         nn.Tanh())
        self.attention_u = nn.Sequential(nn.Linear(options.hidden_dim, options.attention_dim),
                                         nn.Sigmoid())
        self.attention_w = nn.Linear(options.attention_dim, 1)
        self.classifier = nn.Linear(options.hidden_dim, num_classes)

    def embed_instances(self, bag: torch.Tensor) -> torch.Tensor:
        """Instance embeddings `(n, hidden_dim)` of a bag of features `(n, in_dim)`."""
        if bag.ndim != 2 or bag.shape[1] != self.in_dim:
            raise InputError(f"ABMIL expects a bag of shape (n, {self.in_dim}), "
                             f"got {tuple(bag.shape)}")
        if bag.shape[0] == 0:
            raise InputError("ABMIL got an empty bag (a slide without tiles); "
                             "it needs at least one instance")
        return self.embed(bag)

    def attention(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Unnormalised attention scores `(n,)`; softmax over the bag gives the weights."""
        gate = self.attention_v(embeddings) * self.attention_u(embeddings)
        return self.attention_w(gate).squeeze(-1)

    def bag_embedding(self, embeddings: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The attention-weighted mean `(hidden_dim,)` of instance embeddings `(n, hidden_dim)`."""
        return weights @ embeddings

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """Logits `(..., num_classes)` of a bag embedding, or of instance embeddings."""
        return self.classifier(embedding)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.embed_instances(bag)
        weights = torch.softmax(self.attention(embeddings), dim=0)
        return self.classify(self.bag_embedding(embeddings, weights)), weights


@register_slide_classifier("abmil")
def abmil(config: Mapping[str, Any]) -> ABMIL:
    """Build from a resolved slide model config (`feature_dim`, `num_classes`, `arch_options`)."""
    missing = [key for key in ("feature_dim", "num_classes") if key not in config]
    if missing:
        raise ConfigError(f"abmil model config lacks {', '.join(missing)}")
    return ABMIL(int(config["feature_dim"]), int(config["num_classes"]),
                 ABMILOptions.from_mapping(config.get("arch_options", {})))
