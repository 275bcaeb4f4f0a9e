"""TransMIL (Shao et al., NeurIPS 2021) as MHIM-MIL's reference code uses it.

After the common front: a CLS token, two pre-norm Nystrom self-attention
layers without feed-forward blocks (512-d, 8 heads x 64, 256 landmarks, 6
pseudo-inverse iterations, a residual depthwise convolution of the values
with kernel 33, dropout 0.1), the PPEG position encoding between them on the
instance tokens, a final LayerNorm, and the CLS token to the predictor.

Where this differs from the reference (lucidrains' nystrom-attention, which
it copies), and why (docs/mil.md): the reference pads a bag with zero tokens
to a multiple of the landmark count and lets them into every softmax, so
even a bag smaller than the landmark count is not attended exactly. Here the
landmarks are segment means over real tokens only (at most one segment per
token), so with at least as many landmarks as tokens the attention is
exact up to the pseudo-inverse iterations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from medrobust.config import config_from_mapping
from medrobust.errors import ConfigError
from medrobust.models.mil import MILClassifier, Pooled, _require, initialize_weights
from medrobust.models.registry import register_slide_classifier


def moore_penrose_pinv(x: torch.Tensor, iterations: int) -> torch.Tensor:
    """Iterative pseudo-inverse of a batch of square matrices (Razavi et al. 2014), as
    Nystromformer's eq. 16; starts from x^T / (max column sum * max row sum)."""
    magnitude = x.abs()
    z = x.transpose(-1, -2) / (magnitude.sum(-1).max() * magnitude.sum(-2).max())
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iterations):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Multi-head self-attention of a sequence `(n, dim)` through Nystrom landmarks."""

    def __init__(self, dim: int, heads: int, head_dim: int, landmarks: int,
                 pinv_iterations: int, residual_kernel: int, dropout: float):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.landmarks, self.pinv_iterations = landmarks, pinv_iterations
        self.to_qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * head_dim, dim), nn.Dropout(dropout))
        # depthwise over the sequence axis, one filter per head
        self.residual = nn.Conv2d(heads, heads, (residual_kernel, 1),
                                  padding=(residual_kernel // 2, 0), groups=heads, bias=False)

    def _landmarks(self, t: torch.Tensor) -> torch.Tensor:
        """Means of consecutive segments of `(heads, n, d)`: `(heads, m, d)`, m <= landmarks.

        Segments have ceil(n / landmarks) tokens; the first takes the shortfall, so
        every segment holds a real token and none averages in padding."""
        n = t.shape[1]
        length = math.ceil(n / self.landmarks)
        count = math.ceil(n / length)
        pad = count * length - n
        sums = F.pad(t, (0, 0, pad, 0)).reshape(t.shape[0], count, length, -1).sum(2)
        sizes = torch.full((count, 1), float(length), device=t.device, dtype=t.dtype)
        sizes[0] -= pad
        return sums / sizes

    def forward(self, x: torch.Tensor, need_cls_attention: bool = False):
        """`(n, dim)` -> `(n, dim)`; with `need_cls_attention` also the attention of token 0
        over tokens 1.. `(heads, n - 1)` and the values of tokens 1.. `(heads, n - 1, head_dim)`."""
        n = x.shape[0]
        q, k, v = (t.reshape(n, self.heads, self.head_dim).transpose(0, 1)
                   for t in self.to_qkv(x).chunk(3, dim=-1))
        q = q * self.head_dim ** -0.5
        q_landmarks, k_landmarks = self._landmarks(q), self._landmarks(k)
        kernel1 = torch.softmax(q @ k_landmarks.transpose(-1, -2), dim=-1)
        kernel2 = moore_penrose_pinv(
            torch.softmax(q_landmarks @ k_landmarks.transpose(-1, -2), dim=-1),
            self.pinv_iterations)
        kernel3 = torch.softmax(q_landmarks @ k.transpose(-1, -2), dim=-1)
        out = (kernel1 @ kernel2) @ (kernel3 @ v)
        out = out + self.residual(v.unsqueeze(0)).squeeze(0)
        out = self.to_out(out.transpose(0, 1).reshape(n, -1))
        if not need_cls_attention:
            return out
        cls_row = (kernel1[:, :1] @ kernel2) @ kernel3
        return out, cls_row[:, 0, 1:], v[:, 1:]


class PPEG(nn.Module):
    """Pyramid position encoding generator: tokens `(n, dim)` laid on a square grid."""

    MIN_SIDE = 7

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, size, padding=size // 2, groups=dim)
                                   for size in (7, 5, 3))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, dim = tokens.shape
        side = math.ceil(math.sqrt(n))
        # fill the square by repeating the first tokens, as the reference does
        grid = torch.cat([tokens, tokens[:side * side - n]])
        if side < self.MIN_SIDE:  # then zeros up to 7 x 7
            grid = F.pad(grid, (0, 0, 0, self.MIN_SIDE ** 2 - side * side))
            side = self.MIN_SIDE
        image = grid.transpose(0, 1).reshape(1, dim, side, side)
        image = image + sum(conv(image) for conv in self.convs)
        return image.reshape(dim, side * side).transpose(0, 1)[:n]


@dataclass(frozen=True)
class TransMILOptions:
    """The `arch_options` of a `transmil` slide classifier (the reference's values)."""

    hidden_dim: int = 512
    dropout: float = 0.25          # after the front
    heads: int = 8
    head_dim: int = 64
    landmarks: int = 256
    pinv_iterations: int = 6
    residual_kernel: int = 33
    attention_dropout: float = 0.1

    def __post_init__(self):
        if min(self.hidden_dim, self.heads, self.head_dim, self.landmarks,
               self.pinv_iterations, self.residual_kernel) < 1 or self.residual_kernel % 2 == 0 \
                or not (0 <= self.dropout < 1 and 0 <= self.attention_dropout < 1):
            raise ConfigError("arch_options (transmil): sizes and counts must be >= 1, "
                              "residual_kernel odd, dropouts in [0, 1)")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "TransMILOptions":
        return config_from_mapping(cls, mapping, "arch_options (transmil)")


class TransLayer(nn.Module):
    """Pre-norm Nystrom attention with a residual; no feed-forward block."""

    def __init__(self, options: TransMILOptions):
        super().__init__()
        self.norm = nn.LayerNorm(options.hidden_dim)
        self.attention = NystromAttention(
            options.hidden_dim, options.heads, options.head_dim, options.landmarks,
            options.pinv_iterations, options.residual_kernel, options.attention_dropout)

    def forward(self, x: torch.Tensor, need_cls_attention: bool = False):
        if not need_cls_attention:
            return x + self.attention(self.norm(x))
        out, cls_attention, values = self.attention(self.norm(x), need_cls_attention=True)
        return x + out, cls_attention, values


@dataclass(frozen=True)
class TransMILScoring:
    cls_attention: torch.Tensor   # (heads, n): layer 1's CLS row
    values: torch.Tensor          # (heads, n, head_dim): layer 1's values of the instances


class TransMIL(MILClassifier):
    def __init__(self, in_dim: int, num_classes: int, options: TransMILOptions = TransMILOptions()):
        super().__init__(in_dim, num_classes, options.hidden_dim, options.dropout)
        self.options = options
        self.cls_token = nn.Parameter(torch.randn(1, options.hidden_dim))
        self.layer1, self.layer2 = TransLayer(options), TransLayer(options)
        self.position = PPEG(options.hidden_dim)
        self.norm = nn.LayerNorm(options.hidden_dim)
        initialize_weights(self)

    def aggregate(self, embeddings: torch.Tensor) -> Pooled:
        x = torch.cat([self.cls_token, embeddings])
        x, cls_attention, values = self.layer1(x, need_cls_attention=True)
        x = torch.cat([x[:1], self.position(x[1:])])
        x = self.norm(self.layer2(x))
        return Pooled(x[0], cls_attention.mean(0), TransMILScoring(cls_attention, values))

    def instance_contributions(self, embeddings, pooled):
        # the reference's get_pseudo_score_trans: each instance's attention-weighted
        # values in layer 1, through that layer's output projection
        scoring = pooled.scoring
        weighted = scoring.cls_attention[..., None] * scoring.values     # (heads, n, d)
        return self.layer1.attention.to_out(weighted.transpose(0, 1).flatten(1))


@register_slide_classifier("transmil", options=TransMILOptions)
def transmil(config: Mapping[str, Any]) -> TransMIL:
    return TransMIL(*_require(config, "transmil"),
                    TransMILOptions.from_mapping(config.get("arch_options") or {}))
