"""FGSM (Goodfellow et al., 2015) and its iterative form I-FGSM / BIM (Kurakin et al., 2017)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medrobust.attacks.base import Attack, AttackParams
from medrobust.errors import ConfigError


class FGSM(Attack):
    """One step of size epsilon along the sign of the loss gradient."""

    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.signed_step(images, images, labels, self.epsilon)


@dataclass(frozen=True)
class IFGSMParams(AttackParams):
    steps: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"ifgsm: steps must be a positive integer, got {self.steps!r}")


class IFGSM(Attack):
    """`steps` FGSM steps of size epsilon / steps, each projected into the eps ball."""

    Params = IFGSMParams

    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        step_size = self.epsilon / self.params.steps
        adversarial = images
        for _ in range(self.params.steps):
            adversarial = self.signed_step(adversarial, images, labels, step_size)
        return adversarial
