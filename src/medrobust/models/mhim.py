"""MHIM-MIL: masked hard instance mining around any slide classifier of `models.mil`.

Tang et al., ICCV 2023 (v1) and its v2, reference code DearCaat/MHIM-MIL. A
teacher, a copy of the architecture initialised from a trained baseline and
then following the student by EMA, scores each instance with the class-aware
instance probability; the student is trained on the bag without its most
salient instances (top ceil(N r_h / r_hr), a random r_hr of them masked), and
without a random `mask_ratio`; the global recycle network compresses a random
part of what is left into `merge_k` EMA-updated query tokens. The loss is
cross-entropy plus `alpha` times a soft cross-entropy between the teacher's
bag feature on the full bag and the student's on the masked one.

MHIM is a way of training: the saved model is the student alone, the same
architecture as its base, so evaluation and every later stage treat it as
any slide classifier. Test-time forward is the student's plain forward.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from medrobust.config import config_from_mapping
from medrobust.errors import ConfigError, check_choice
from medrobust.models.mil import MILClassifier, initialize_weights

SCHEDULES = ("constant", "cosine")
# what of the teacher's starting weights the student starts from: nothing (v2, which
# forces it), the front layer (v1's `--init_stu_type=fc`, in all its README's commands),
# or everything (v1's `all`)
STUDENT_STARTS = ("none", "front", "all")


@dataclass(frozen=True)
class MHIMOptions:
    """A slide classifier's `mhim:` section; defaults from the reference (docs/mil.md)."""

    teacher: str                      # the slide classifier whose weights start the teacher
    momentum: float = 0.9999          # teacher EMA (v1; v2's command line uses 0.9997)
    momentum_schedule: str = "constant"   # cosine: from `momentum` to 1 over training
    init_student: str = "none"        # none (v2), front (v1's README) or all: see STUDENT_STARTS
    mask_ratio: float = 0.0           # random masking (v1's grid 0.5-0.7; v2 0)
    mask_ratio_h: float = 0.01        # high-score masking r_h (grid 0.01, 0.03, 0.05)
    mask_ratio_hr: float = 1.0        # r_hr: fraction of the top candidates masked
    mask_ratio_h_schedule: str = "constant"  # cosine: r_h decays to 0 over training
    recycle: bool = True              # the global recycle network (v2)
    merge_ratio: float = 0.2          # fraction of the remaining instances kept as they are
    merge_k: int = 1                  # query tokens the rest is compressed into
    merge_momentum: float = 0.9999    # EMA of the query tokens
    temperature_teacher: float = 0.1
    temperature_student: float = 1.0
    alpha: float = 0.5                # weight of the consistency loss (v2; v1 0.1 on C16)

    def __post_init__(self):
        for name in ("momentum", "merge_momentum", "mask_ratio", "mask_ratio_h", "merge_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"mhim: {name} must be in [0, 1], not {getattr(self, name)!r}")
        if not 0.0 < self.mask_ratio_hr <= 1.0:
            raise ConfigError(f"mhim: mask_ratio_hr must be in (0, 1], not {self.mask_ratio_hr!r}")
        if self.merge_k < 1 or self.alpha < 0 or min(self.temperature_teacher,
                                                      self.temperature_student) <= 0:
            raise ConfigError("mhim: merge_k must be >= 1, alpha >= 0, temperatures > 0")
        check_choice("mhim: momentum_schedule", self.momentum_schedule, SCHEDULES)
        check_choice("mhim: init_student", self.init_student, STUDENT_STARTS)
        check_choice("mhim: mask_ratio_h_schedule", self.mask_ratio_h_schedule, SCHEDULES)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "MHIMOptions":
        return config_from_mapping(cls, mapping, "mhim")


def cosine_value(start: float, end: float, step: int, total: int) -> float:
    """The reference's per-iteration cosine schedule from `start` (step 0) towards `end`."""
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * step / max(total, 1)))


def high_score_mask(scores: torch.Tensor, ratio: float, random_ratio: float,
                    generator: torch.Generator) -> torch.Tensor:
    """Indices to mask among the highest `scores`: a random `random_ratio` of the top
    ceil(n * ratio / random_ratio); when that exceeds n, a random `ratio` of all (as the
    reference's select_mask_fn)."""
    n = scores.shape[0]
    if ratio <= 0:
        return scores.new_zeros(0, dtype=torch.long)
    candidates_ratio = ratio / random_ratio
    if candidates_ratio > 1:
        candidates_ratio, random_ratio = 1.0, ratio
    candidates = torch.topk(scores, math.ceil(n * candidates_ratio)).indices
    if random_ratio < 1:
        order = torch.randperm(len(candidates), generator=generator).to(candidates.device)
        candidates = candidates[order[:math.ceil(len(candidates) * random_ratio)]]
    return candidates


def random_mask(n: int, ratio: float, generator: torch.Generator,
                device: torch.device) -> torch.Tensor:
    """ceil(n * ratio) indices drawn without replacement."""
    return torch.randperm(n, generator=generator)[:math.ceil(n * ratio)].to(device)


def kept_indices(n: int, masked: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The instances not masked, in bag order; never none: if every instance is masked,
    the lowest-scored stays (the reference would pass the student an empty bag)."""
    keep = torch.ones(n, dtype=torch.bool, device=scores.device)
    keep[masked] = False
    if not keep.any():
        keep[scores.argmin()] = True
    return keep.nonzero().squeeze(1)


class GlobalRecycle(nn.Module):
    """MHIM-MIL v2's global recycle network: instances `(n, dim)` -> a random `merge_ratio`
    of them kept as they are plus `k` tokens, cross-attention of `k` query tokens over the
    rest. The queries are a buffer (no gradient) that follows the outputs by EMA."""

    def __init__(self, dim: int, k: int, merge_ratio: float, momentum: float,
                 heads: int = 8, head_dim: int = 64, dropout: float = 0.1):
        super().__init__()
        self.merge_ratio, self.momentum, self.heads = merge_ratio, momentum, heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * head_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * head_dim, dim), nn.Dropout(dropout))
        self.attention_dropout = nn.Dropout(dropout)
        initialize_weights(self)  # the reference's MHIM initialises every submodule so
        # initialised as VPT's prompts, as the reference
        bound = math.sqrt(6.0 / (3 * 16 * 16 + dim))
        self.register_buffer("queries", torch.empty(k, dim).uniform_(-bound, bound))

    def cross_attention(self, instances: torch.Tensor) -> torch.Tensor:
        """`(m, dim)` -> `(k, dim)`: the queries attend over the (normalised) instances."""
        k = self.queries.shape[0]
        # a copy: the EMA update changes the buffer in place before the backward pass
        q = self.to_q(self.norm(self.queries.clone())).reshape(k, self.heads, -1).transpose(0, 1)
        key, value = (t.reshape(len(instances), self.heads, -1).transpose(0, 1)
                      for t in self.to_kv(self.norm(instances)).chunk(2, dim=-1))
        weights = torch.softmax(q @ key.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        out = self.attention_dropout(weights) @ value
        return self.to_out(out.transpose(0, 1).reshape(k, -1))

    def forward(self, instances: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = instances.shape[0]
        order = torch.randperm(n, generator=generator).to(instances.device)
        kept, rest = order[:int(n * self.merge_ratio)], order[int(n * self.merge_ratio):]
        if len(rest) == 0:
            return instances
        merged = self.cross_attention(instances[rest])
        with torch.no_grad():
            self.queries.mul_(self.momentum).add_(merged.detach(), alpha=1 - self.momentum)
        return torch.cat([instances[kept.sort().values], merged])


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor,
                       temperature_student: float, temperature_teacher: float) -> torch.Tensor:
    """-sum softmax(teacher / T_t) * log_softmax(student / T_s), on bag features."""
    return -(F.softmax(teacher / temperature_teacher, dim=-1)
             * F.log_softmax(student / temperature_student, dim=-1)).sum(-1)


class MHIM(nn.Module):
    """Student, EMA teacher and recycle network; `loss` is one training step's objective.

    The teacher runs in train mode (dropout on), as the reference's does."""

    def __init__(self, student: MILClassifier, teacher_state: Mapping[str, torch.Tensor],
                 options: MHIMOptions):
        super().__init__()
        self.options = options
        self.student = student
        self.teacher = copy.deepcopy(student)
        self.teacher.load_state_dict(teacher_state)
        self.teacher.requires_grad_(False)
        if options.init_student == "front":
            self.student.front.load_state_dict(self.teacher.front.state_dict())
        elif options.init_student == "all":
            self.student.load_state_dict(self.teacher.state_dict())
        self.recycle = (GlobalRecycle(student.options.hidden_dim, options.merge_k, options.merge_ratio,
                                      options.merge_momentum) if options.recycle else None)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.student(bag)

    def mask_ratio_h(self, step: int, total: int) -> float:
        if self.options.mask_ratio_h_schedule == "cosine":
            return cosine_value(self.options.mask_ratio_h, 0.0, step, total)
        return self.options.mask_ratio_h

    def momentum(self, step: int, total: int) -> float:
        if self.options.momentum_schedule == "cosine":
            return cosine_value(self.options.momentum, 1.0, step, total)
        return self.options.momentum

    def masked_instances(self, scores: torch.Tensor, step: int, total: int,
                         generator: torch.Generator) -> torch.Tensor:
        """The union of the high-score and the random mask."""
        options = self.options
        masked = torch.cat([
            high_score_mask(scores, self.mask_ratio_h(step, total), options.mask_ratio_hr,
                            generator),
            random_mask(len(scores), options.mask_ratio, generator, scores.device)])
        return masked.unique()

    def loss(self, bag: torch.Tensor, label: torch.Tensor, step: int, total: int,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(total loss, student logits on the masked bag, its parts) for one bag."""
        self.teacher.train(self.training)
        with torch.no_grad():
            embeddings = self.teacher.embed_instances(bag)
            pooled = self.teacher.aggregate(embeddings)
            scores = self.teacher.instance_probability(embeddings, pooled)
        masked = self.masked_instances(scores, step, total, generator)
        keep = kept_indices(len(bag), masked, scores)
        instances = self.student.embed_instances(bag)[keep]
        if self.recycle is not None:
            instances = self.recycle(instances, generator)
        feature = self.student.aggregate(instances).feature
        logits = self.student.classify(feature)
        classification = F.cross_entropy(logits.unsqueeze(0), label.view(1))
        consistency = soft_cross_entropy(feature, pooled.feature, self.options.temperature_student,
                                         self.options.temperature_teacher)
        total_loss = classification + self.options.alpha * consistency
        return total_loss, logits, {"ce": float(classification.detach()),
                                    "consistency": float(consistency.detach()),
                                    "masked": len(bag) - len(keep)}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """theta_t <- m theta_t + (1 - m) theta_s, over parameters (as the reference)."""
        for teacher, student in zip(self.teacher.parameters(), self.student.parameters()):
            teacher.mul_(momentum).add_(student.detach(), alpha=1 - momentum)
