"""FGSM (Goodfellow et al., 2015) and its iterative form I-FGSM / BIM (Kurakin et al., 2017)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medrobust.attacks.base import Attack, AttackParams


class FGSM(Attack):
    """One step of size epsilon along the sign of the loss gradient (L-infinity)."""

    norm = "linf"
    budget_unit = "1/255"
    title = "FGSM (L∞)"

    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # a step of exactly epsilon per pixel cannot leave the eps ball: only clip to [0, 1]
        stepped = images + self.epsilon * self.loss_gradient(images, labels).sign()
        return torch.clamp(stepped, 0.0, 1.0)


@dataclass(frozen=True)
class IFGSMParams(AttackParams):
    steps: int = 10
    step_size: float | None = None  # 1/255 units; None: epsilon / steps

    def __post_init__(self) -> None:
        self._check_int("steps")
        self._check_number("step_size", optional=True)


class IFGSM(Attack):
    """`steps` FGSM steps from the clean image, each projected into the eps ball (no random start).

    Step size `step_size`/255, or epsilon / steps when not given.
    """

    Params = IFGSMParams
    norm = "linf"
    budget_unit = "1/255"
    title = "I-FGSM (L∞)"
    relative_step = 1.0  # Kurakin et al.: epsilon / steps

    def details(self) -> str:
        return f"{self.params.steps} steps, {self.step_text()}"

    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        step_size = self.step_size()
        adversarial = images
        for _ in range(self.params.steps):
            adversarial = self.signed_step(adversarial, images, labels, step_size)
        return adversarial
