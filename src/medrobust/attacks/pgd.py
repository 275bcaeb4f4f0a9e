"""Projected gradient descent (Madry et al., 2018), L-infinity and L2, as in torchattacks.

Both start from a random point in the budget (`random_start`, seeded), take
`steps` steps of `step_size` and return the last iterate. Without a
`step_size` the step is 2.5 epsilon / steps (Madry et al.'s rule), which is
torchattacks' default step (2/255) at its default budget and steps (8/255,
10); a fixed 2/255 at every budget would be a step of 2 epsilon at 1/255,
each one jumping from corner to corner of the ball (docs/attacks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medrobust.attacks.base import Attack, AttackParams, l2_norms, per_image


@dataclass(frozen=True)
class PGDParams(AttackParams):
    steps: int = 10
    step_size: float | None = None  # the budget's units; None: 2.5 epsilon / steps
    random_start: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_int("steps")
        self._check_number("step_size", optional=True)
        self._check_bool("random_start")
        self._check_int("seed", minimum=0)


class PGD(Attack):
    """PGD-L∞: start at clamp(x + U(-eps, eps), 0, 1); step `step_size` * sign(gradient)."""

    Params = PGDParams
    norm = "linf"
    budget_unit = "1/255"
    title = "PGD-L∞"
    relative_step = 2.5

    def start_text(self) -> str:
        return "random start" if self.params.random_start else "no random start"

    def details(self) -> str:
        return f"{self.params.steps} steps, {self.step_text()}, {self.start_text()}"

    def project(self, adversarial: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        # the same arithmetic as torchattacks' PGD (clip the perturbation, then the
        # image), so that outputs from the same start match it bit for bit
        delta = torch.clamp(adversarial - clean, min=-self.epsilon, max=self.epsilon)
        return torch.clamp(clean + delta, min=0.0, max=1.0)

    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        step_size = self.step_size()
        adversarial = images
        if self.params.random_start:
            noise = self.random_uniform(images.shape, -self.epsilon, self.epsilon, images)
            adversarial = torch.clamp(images + noise, 0.0, 1.0)
        for _ in range(self.params.steps):
            stepped = adversarial + step_size * self.loss_gradient(adversarial, labels).sign()
            adversarial = self.project(stepped, images)
        return adversarial


class PGDL2(Attack):
    """PGD-L2: start at a random point of the ball; step `step_size` along g / ||g||_2."""

    Params = PGDParams  # step_size an L2 length in image units
    norm = "l2"
    budget_unit = "image"
    title = "PGD-L2"
    relative_step = 2.5

    start_text = PGD.start_text
    details = PGD.details

    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        step_size = self.step_size()
        adversarial = images
        if self.params.random_start:
            # a Gaussian direction, scaled to a radius drawn from U(0, eps)
            direction = self.random_normal(images.shape, images)
            radius = self.random_uniform((len(images),) + (1,) * (images.dim() - 1), 0.0, 1.0,
                                         images)
            delta = direction * (radius / per_image(l2_norms(direction), images) * self.epsilon)
            adversarial = torch.clamp(images + delta, 0.0, 1.0)
        for _ in range(self.params.steps):
            gradient = self.loss_gradient(adversarial, labels)
            gradient = gradient / per_image(l2_norms(gradient) + 1e-10, gradient)
            adversarial = self.project(adversarial + step_size * gradient, images)
        return adversarial
