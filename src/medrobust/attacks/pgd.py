"""Projected gradient descent (Madry et al., 2018), L-infinity and L2, as in torchattacks.

Both start from a random point in the budget (`random_start`, seeded), take
`steps` steps of an explicit `step_size` and return the last iterate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medrobust.attacks.base import Attack, AttackParams, l2_norms, per_image


@dataclass(frozen=True)
class PGDParams(AttackParams):
    steps: int = 10
    step_size: float = 2.0  # 1/255 units
    random_start: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_int("steps")
        self._check_number("step_size")
        self._check_bool("random_start")
        self._check_int("seed", minimum=0)


class PGD(Attack):
    """PGD-L∞: start at clamp(x + U(-eps, eps), 0, 1); step `step_size` * sign(gradient)."""

    Params = PGDParams
    norm = "linf"
    budget_unit = "1/255"
    title = "PGD-L∞"

    def details(self) -> str:
        start = "random start" if self.params.random_start else "no random start"
        return f"{self.params.steps} steps, step {self.params.step_size:g}/255, {start}"

    def project(self, adversarial: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        # the same arithmetic as torchattacks' PGD (clip the perturbation, then the
        # image), so that outputs from the same start match it bit for bit
        delta = torch.clamp(adversarial - clean, min=-self.epsilon, max=self.epsilon)
        return torch.clamp(clean + delta, min=0.0, max=1.0)

    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        step_size = self.to_image_units(self.params.step_size)
        adversarial = images
        if self.params.random_start:
            noise = self.random_uniform(images.shape, -self.epsilon, self.epsilon, images)
            adversarial = torch.clamp(images + noise, 0.0, 1.0)
        for _ in range(self.params.steps):
            stepped = adversarial + step_size * self.loss_gradient(adversarial, labels).sign()
            adversarial = self.project(stepped, images)
        return adversarial


@dataclass(frozen=True)
class PGDL2Params(PGDParams):
    step_size: float = 0.2  # image units (an L2 length)


class PGDL2(Attack):
    """PGD-L2: start at a random point of the ball; step `step_size` along g / ||g||_2."""

    Params = PGDL2Params
    norm = "l2"
    budget_unit = "image"
    title = "PGD-L2"

    def details(self) -> str:
        start = "random start" if self.params.random_start else "no random start"
        return f"{self.params.steps} steps, step {self.params.step_size:g}, {start}"

    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        step_size = self.params.step_size
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
