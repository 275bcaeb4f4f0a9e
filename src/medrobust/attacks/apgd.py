"""APGD-CE (Croce and Hein, 2020): PGD with momentum and a step size that adapts itself.

L-infinity, cross-entropy loss. From a random start, `steps` iterations of

    z       = P(x_k + eta * sign(grad f(x_k)))
    x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1})),   a = 0.75 (a = 1 at k = 0)

with eta = 2 eps at first. At checkpoints w_j = ceil(p_j * steps), p_0 = 0,
p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), eta is halved
and the iterate reset to the highest-loss point so far, per image, when

1. the loss rose in fewer than rho * (w_j - w_{j-1}) of the steps since the
   last checkpoint, or
2. eta was not halved at the last checkpoint and the highest loss has not
   improved since it.

Each image ends as its last misclassified iterate if there was one, else its
highest-loss point. `restarts` > 1 runs again, from new random starts, on the
images not yet misclassified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from medrobust.attacks.base import Attack, AttackParams, per_image, project_linf

MOMENTUM = 0.75  # "a" above; fixed in the paper


def checkpoints(steps: int) -> list[int]:
    """Iterations (1-based, <= steps) after which APGD checks its step size."""
    fractions = [0.0, 0.22]
    while True:
        following = fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06)
        if following > 1.0:
            break
        fractions.append(following)
    # round() first: 0.22 + 0.19 + 0.16 + 0.13 is 0.7000000000000001
    iterations = {math.ceil(round(fraction * steps, 6)) for fraction in fractions[1:]}
    return sorted(w for w in iterations if 1 <= w <= steps)


@dataclass(frozen=True)
class APGDParams(AttackParams):
    steps: int = 100
    restarts: int = 1
    rho: float = 0.75
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_int("steps")
        self._check_int("restarts")
        self._check_number("rho", maximum=1.0)
        self._check_int("seed", minimum=0)


class APGDCE(Attack):
    """APGD with the cross-entropy loss, L-infinity."""

    Params = APGDParams
    norm = "linf"
    budget_unit = "1/255"
    title = "APGD-CE (L∞)"

    def details(self) -> str:
        restarts = self.params.restarts
        return (f"{self.params.steps} steps, {restarts} restart{'s' if restarts > 1 else ''}, "
                f"rho {self.params.rho:g}")

    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        result = images.clone()
        fooled = torch.zeros(len(images), dtype=torch.bool, device=images.device)
        best_loss = torch.full((len(images),), float("-inf"), device=images.device)
        for _ in range(self.params.restarts):
            todo = (~fooled).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            adversarial, loss, fooled_now = self._single_run(images[todo], labels[todo])
            # misclassified beats any loss; otherwise keep the highest loss
            take = fooled_now | (loss > best_loss[todo])
            result[todo[take]] = adversarial[take]
            best_loss[todo] = torch.maximum(best_loss[todo], loss)
            fooled[todo] = fooled_now
        return result

    def _single_run(self, x: torch.Tensor, y: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        eps, steps = self.epsilon, self.params.steps
        # random start: uniform noise scaled so its largest pixel is at +-eps (as autoattack)
        noise = self.random_uniform(x.shape, -1.0, 1.0, x)
        noise = noise / per_image(noise.reshape(len(x), -1).abs().amax(1), x)
        current = torch.clamp(x + eps * noise, 0.0, 1.0)
        loss, gradient, logits = self.losses_and_gradient(current, y)

        step_size = torch.full((len(x),), 2.0 * eps, device=x.device)
        best, best_loss, best_gradient = current.clone(), loss.clone(), gradient.clone()
        fooled = logits.argmax(1) != y
        fooled_at = torch.where(per_image(fooled, x), current, x)
        previous = current
        increases = torch.zeros(len(x), device=x.device)
        checks = checkpoints(steps)
        last_check = 0
        best_loss_at_check = best_loss.clone()
        halved_at_check = torch.zeros(len(x), dtype=torch.bool, device=x.device)

        for k in range(steps):
            with torch.no_grad():
                z = project_linf(current + per_image(step_size, x) * gradient.sign(), x, eps)
                if k > 0:
                    z = project_linf(current + MOMENTUM * (z - current)
                                     + (1.0 - MOMENTUM) * (current - previous), x, eps)
                previous, current = current, z
            new_loss, gradient, logits = self.losses_and_gradient(current, y)
            increases += (new_loss > loss).float()
            loss = new_loss

            now_fooled = logits.argmax(1) != y
            fooled_at = torch.where(per_image(now_fooled, x), current, fooled_at)
            fooled |= now_fooled
            improved = loss > best_loss
            best = torch.where(per_image(improved, x), current, best)
            best_gradient = torch.where(per_image(improved, x), gradient, best_gradient)
            best_loss = torch.where(improved, loss, best_loss)

            if k + 1 in checks:
                interval = k + 1 - last_check
                oscillating = increases < self.params.rho * interval
                stalled = ~halved_at_check & (best_loss <= best_loss_at_check)
                halve = oscillating | stalled
                step_size = torch.where(halve, step_size / 2.0, step_size)
                # restart the halved ones from their best point (its gradient is kept)
                current = torch.where(per_image(halve, x), best, current)
                gradient = torch.where(per_image(halve, x), best_gradient, gradient)
                loss = torch.where(halve, best_loss, loss)
                halved_at_check = halve
                best_loss_at_check = best_loss.clone()
                increases.zero_()
                last_check = k + 1

        self.last_step_size = step_size  # per image of the last run (diagnostics, tests)
        adversarial = torch.where(per_image(fooled, x), fooled_at, best)
        return adversarial, best_loss, fooled
