"""Square attack, L-infinity (Andriushchenko, Croce, Flammarion and Hein, ECCV 2020).

Gradient-free: it only queries the model's logits. It starts from vertical
stripes (each column of each channel at x +- eps), then repeatedly proposes,
per image, a random s x s window set to x +- eps (one random sign per channel)
and keeps the proposal when it lowers the margin loss Z_y - max_{i != y} Z_i.
The window side s follows the paper's schedule for the fraction p of pixels
changed, p_init halved at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000
and 8000 of a 10,000-query run (rescaled to `queries`). An image stops being
queried once it is misclassified; each image costs at most `queries` forward
passes in all, the start included.

A gradient-free attack that succeeds where the gradient attacks fail at the
same budget is the standard sign of gradient masking (METHODS.md section 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from medrobust.attacks.base import Attack, AttackParams, per_image

# proposals that change nothing (the window already at the drawn signs) are redrawn,
# as in the authors' code, at most this many times
_REDRAWS = 10
_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
             (6000, 128), (8000, 256))


def fraction_changed(p_init: float, iteration: int, queries: int) -> float:
    """The paper's piecewise-constant schedule for p, rescaled to `queries`."""
    it = int(iteration / queries * 10000)
    for bound, divisor in _SCHEDULE:
        if it <= bound:
            return p_init / divisor
    return p_init / 512


@dataclass(frozen=True)
class SquareParams(AttackParams):
    queries: int = 5000
    p_init: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_int("queries")
        self._check_number("p_init", maximum=1.0)
        self._check_int("seed", minimum=0)


class Square(Attack):
    """Square attack, L-infinity, margin loss, untargeted."""

    Params = SquareParams
    norm = "linf"
    budget_unit = "1/255"
    title = "Square (L∞)"
    gradient_free = True

    def details(self) -> str:
        return f"{self.params.queries} queries, p_init {self.params.p_init:g}"

    def margins(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Z_y - max_{i != y} Z_i per image (<= 0: misclassified)."""
        logits = self.model(images)
        real = logits.gather(1, labels[:, None]).squeeze(1)
        is_label = torch.nn.functional.one_hot(labels, logits.shape[1]).bool()
        return real - logits.masked_fill(is_label, float("-inf")).amax(1)

    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._run(images, labels)

    def _run(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        eps, queries = self.epsilon, self.params.queries
        stripes = self.random_sign((n, c, 1, w), x)
        best = torch.clamp(x + eps * stripes, 0.0, 1.0)
        margin = self.margins(best, y)
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        for iteration in range(queries - 1):
            todo = (margin > 0).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            p = fraction_changed(self.params.p_init, iteration, queries)
            side = int(round(math.sqrt(p * h * w)))
            side = min(max(side, 1), max(min(h, w) - 1, 1))
            x_todo, best_todo = x[todo], best[todo]
            top = self.random_int(h - side + 1, (len(todo),), x.device)
            left = self.random_int(w - side + 1, (len(todo),), x.device)
            in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)
            in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)
            window = (in_rows[:, None, :, None] & in_cols[:, None, None, :])
            proposal = self._propose(x_todo, best_todo, window, eps)
            new_margin = self.margins(proposal, y[todo])
            better = new_margin < margin[todo]
            best[todo] = torch.where(per_image(better, proposal), proposal, best_todo)
            margin[todo] = torch.where(better, new_margin, margin[todo])
        return best

    def _propose(self, x: torch.Tensor, best: torch.Tensor, window: torch.Tensor,
                 eps: float) -> torch.Tensor:
        """`best` with its window set to x +- eps, redrawing signs that change nothing."""
        n, c = x.shape[:2]
        proposal = best
        redraw = torch.ones(n, dtype=torch.bool, device=x.device)
        for _ in range(_REDRAWS):
            signs = self.random_sign((n, c, 1, 1), x)
            candidate = torch.clamp(torch.where(window, x + eps * signs, best), 0.0, 1.0)
            proposal = torch.where(per_image(redraw, x), candidate, proposal)
            changed = ((proposal - best).abs() >= 1e-7).reshape(n, -1).any(1)
            redraw = ~changed
            if not bool(redraw.any()):
                break
        return proposal
