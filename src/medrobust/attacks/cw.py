"""Carlini & Wagner's L2 attack (Carlini and Wagner, 2017), with the binary search over c.

Minimises ||x' - x||_2^2 + c * max(Z_y - max_{i != y} Z_i, -kappa) over
x' = (tanh(w) + 1) / 2 with Adam, for `steps` iterations per value of c, and
searches c per image: it starts at `initial_const`, is multiplied by 10 until
an adversarial example is found, then bisected between the largest failing and
the smallest succeeding value, for `binary_search_steps` rounds. The smallest
adversarial example (L2) over the whole search is kept.

C&W minimises the perturbation rather than working within a budget; here the
budget epsilon (an L2 radius in image units) is applied at the end: an image
whose smallest adversarial example lies within epsilon gets it; one whose
smallest example lies further gets it scaled back onto the epsilon sphere
(which may no longer fool the model); one without any gets the clean image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medrobust.attacks.base import Attack, AttackParams, per_image

# atanh of pixels at exactly 0 or 1 is infinite: shrink towards 0.5 first (as Carlini)
_TANH_SHRINK = 1.0 - 1e-6
_NO_UPPER_BOUND = 1e10


@dataclass(frozen=True)
class CWL2Params(AttackParams):
    binary_search_steps: int = 5
    steps: int = 1000
    initial_const: float = 1e-3
    learning_rate: float = 1e-2
    kappa: float = 0.0
    abort_early: bool = True

    def __post_init__(self) -> None:
        self._check_int("binary_search_steps")
        self._check_int("steps")
        self._check_number("initial_const")
        self._check_number("learning_rate")
        self._check_number("kappa", inclusive=True)
        self._check_bool("abort_early")


class _Adam:
    """Adam (Kingma and Ba, 2015) on one tensor, PyTorch's defaults (betas 0.9, 0.999,
    eps 1e-8); a few in-place ops instead of torch.optim's per-step overhead."""

    def __init__(self, tensor: torch.Tensor, learning_rate: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.tensor, self.learning_rate, self.betas, self.eps = tensor, learning_rate, betas, eps
        self.mean = torch.zeros_like(tensor)
        self.square = torch.zeros_like(tensor)
        self.steps = 0

    @torch.no_grad()
    def step(self, gradient: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        self.steps += 1
        self.mean.lerp_(gradient, 1.0 - beta1)
        self.square.mul_(beta2).addcmul_(gradient, gradient, value=1.0 - beta2)
        denominator = (self.square / (1.0 - beta2 ** self.steps)).sqrt_().add_(self.eps)
        self.tensor.addcdiv_(self.mean, denominator,
                             value=-self.learning_rate / (1.0 - beta1 ** self.steps))


class CWL2(Attack):
    """C&W-L2, untargeted, with a per-image binary search over the constant c."""

    Params = CWL2Params
    norm = "l2"
    budget_unit = "image"
    title = "C&W-L2"

    def details(self) -> str:
        p = self.params
        return (f"{p.binary_search_steps} binary-search steps x {p.steps} iterations, "
                f"c0 {p.initial_const:g}, kappa {p.kappa:g}, lr {p.learning_rate:g}"
                f"{', early abort' if p.abort_early else ''}")

    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        p = self.params
        n = len(images)
        w_clean = torch.atanh((images * 2.0 - 1.0) * _TANH_SHRINK)
        lower = torch.zeros(n, device=images.device)
        upper = torch.full((n,), _NO_UPPER_BOUND, device=images.device)
        const = torch.full((n,), p.initial_const, device=images.device)
        best_l2 = torch.full((n,), float("inf"), device=images.device)  # squared
        best = images.clone()
        is_label = None
        # abort a round when the loss stopped falling, checked 10 times per round
        check_every = max(p.steps // 10, 1)
        for search_step in range(p.binary_search_steps):
            if p.binary_search_steps >= 10 and search_step == p.binary_search_steps - 1:
                const = upper.clone()  # Carlini: with many steps, end on the upper bound
            # optimise w = w_clean + modifier directly (the modifier starts at 0 each round)
            w = w_clean.clone().requires_grad_(True)
            adam = _Adam(w, p.learning_rate)
            succeeded = torch.zeros(n, dtype=torch.bool, device=images.device)
            previous = float("inf")
            for step in range(p.steps):
                adversarial = (torch.tanh(w) + 1.0) * 0.5
                l2 = (adversarial - images).square().reshape(n, -1).sum(1)
                logits = self.model(adversarial)
                if is_label is None:
                    is_label = torch.nn.functional.one_hot(labels, logits.shape[1]).bool()
                real = logits.gather(1, labels[:, None]).squeeze(1)
                other = logits.masked_fill(is_label, float("-inf")).amax(1)
                margin = real - other
                loss = (l2 + const * torch.clamp(margin + p.kappa, min=0.0)).sum()
                (gradient,) = torch.autograd.grad(loss, w)
                adam.step(gradient)
                with torch.no_grad():
                    # the iterate just evaluated (before the Adam step), as Carlini
                    fooled = (margin + p.kappa) < 0
                    succeeded |= fooled
                    better = fooled & (l2 < best_l2)
                    best_l2 = torch.where(better, l2.detach(), best_l2)
                    best = torch.where(per_image(better, best), adversarial.detach(), best)
                if p.abort_early and step % check_every == 0:
                    value = loss.item()
                    if value > previous * 0.9999:
                        break
                    previous = value
            # bisect where an upper bound is known, else grow c tenfold on failure
            upper = torch.where(succeeded, torch.minimum(upper, const), upper)
            lower = torch.where(succeeded, lower, torch.maximum(lower, const))
            bounded = upper < _NO_UPPER_BOUND / 10
            const = torch.where(bounded, (lower + upper) / 2,
                                torch.where(succeeded, const, const * 10))
        return self._within_budget(best, best_l2, images)

    def _within_budget(self, best: torch.Tensor, best_l2: torch.Tensor,
                       images: torch.Tensor) -> torch.Tensor:
        distance = best_l2.sqrt()
        found = torch.isfinite(best_l2)
        inside = found & (distance <= self.epsilon)
        scale = torch.where(inside, torch.ones_like(distance), self.epsilon / distance)
        scaled = torch.clamp(images + (best - images) * per_image(scale, images), 0.0, 1.0)
        return torch.where(per_image(inside, images), best,
                           torch.where(per_image(found, images), scaled, images))
