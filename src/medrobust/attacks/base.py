"""The shared machinery of attacks: one attack = one small subclass of `Attack`.

Images are float tensors in [0, 1] (normalisation lives inside the model), so
an attack works in pixel space, keeps every adversarial image within its
budget of the clean image, and clips to [0, 1].

Each attack class declares its threat model:

- `norm`: `"linf"` or `"l2"`, the norm its budget is measured in;
- `budget_unit`: the unit its budget (and step sizes) are given in by config:
  `"1/255"` for L-infinity attacks (epsilon 8 means 8/255), `"image"` for L2
  attacks (a radius in image units, images in [0, 1]).

`Attack(model, epsilon, params)` takes epsilon in **image units**; use
`budget_to_image_units` (or `medrobust.attacks.build_attack`) to convert a
config budget. Settings besides epsilon are a frozen `Params` dataclass whose
`__post_init__` raises `ConfigError` naming the bad key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from numbers import Real
from typing import Any, ClassVar, Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medrobust.config import config_from_mapping
from medrobust.errors import ConfigError

NORMS = ("linf", "l2")
# the smallest L-infinity budget taken (1/255 units): a quarter of one 8-bit grey level;
# anything smaller is a fraction of the range written in the wrong unit, not a budget
SMALLEST_LINF_BUDGET = 0.25


# --- settings -----------------------------------------------------------------------------

def _is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class AttackParams:
    """An attack's settings besides epsilon; attacks with settings subclass it.

    Subclasses check their fields in `__post_init__` with the `_check_*`
    helpers, which raise `ConfigError` naming the key; `from_mapping` adds the
    config section in front (`attacks.pgd.steps: ...`).
    """

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None, section: str = "attack"):
        try:
            return config_from_mapping(cls, mapping or {}, section)
        except ConfigError as error:
            message = str(error)
            if message.startswith(section):
                raise
            raise ConfigError(f"{section}.{message}") from None

    def to_dict(self) -> dict[str, Any]:
        """Every setting, defaults included (what a store's `attack_params` records)."""
        return dataclasses.asdict(self)

    # helpers for __post_init__ (frozen: normalise with object.__setattr__)
    def _check_int(self, key: str, minimum: int = 1) -> None:
        value = getattr(self, key)
        if not _is_integer(value) or value < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise ConfigError(f"{key}: must be {kind}, got {value!r}")
        object.__setattr__(self, key, int(value))

    def _check_number(self, key: str, *, minimum: float = 0.0, inclusive: bool = False,
                      maximum: float | None = None, optional: bool = False) -> None:
        value = getattr(self, key)
        if value is None and optional:
            return
        ok = _is_number(value) and math.isfinite(value) and (
            value >= minimum if inclusive else value > minimum) and (
            maximum is None or value <= maximum)
        if not ok:
            bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
            if maximum is not None:
                bound += f" and <= {maximum:g}"
            raise ConfigError(f"{key}: must be a number {bound}"
                              f"{' or null' if optional else ''}, got {value!r}")
        object.__setattr__(self, key, float(value))

    def _check_bool(self, key: str) -> None:
        value = getattr(self, key)
        if not isinstance(value, (bool, np.bool_)):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        object.__setattr__(self, key, bool(value))


# --- the attack -----------------------------------------------------------------------------

@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients while attacking; restore both after."""
    requires_grad = [parameter.requires_grad for parameter in model.parameters()]
    training = [module.training for module in model.modules()]
    model.eval()
    model.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(model.parameters(), requires_grad):
            parameter.requires_grad_(flag)
        for module, flag in zip(model.modules(), training):
            module.training = flag


def _format(value: float) -> str:
    return f"{value:g}"


class Attack(ABC):
    """An attack on a classifier whose forward takes images in [0, 1] and returns logits.

    Subclasses set `norm`, `budget_unit`, `title` (and `Params` when they have
    settings) and implement `perturb`. `epsilon` is in image units.
    """

    Params: ClassVar[type[AttackParams]] = AttackParams
    norm: ClassVar[str] = "linf"
    budget_unit: ClassVar[str] = "1/255"
    title: ClassVar[str] = "attack"
    # uses no gradients: the report's check for gradient masking compares these with the rest
    gradient_free: ClassVar[bool] = False
    # attacks with a `step_size` setting: the step without one, in multiples of epsilon / steps
    relative_step: ClassVar[float | None] = None

    def __init__(self, model: nn.Module, epsilon: float, params: AttackParams | None = None, *,
                 generator: torch.Generator | None = None):
        self.check_image_budget(epsilon)
        if params is not None and not isinstance(params, self.Params):
            raise ConfigError(f"{type(self).__name__}: params must be {self.Params.__name__}, "
                              f"got {type(params).__name__}")
        self.model = model
        self.epsilon = float(epsilon)
        self.params = params if params is not None else self.Params()
        seed = getattr(self.params, "seed", None)  # attacks that draw random numbers have one
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
        self.generator = generator

    # budgets and units
    @classmethod
    def check_image_budget(cls, epsilon: float) -> None:
        """`epsilon` (image units) must be a finite number >= 0, and <= 1 for L-infinity."""
        upper = 1.0 if cls.norm == "linf" else math.inf
        if not (_is_number(epsilon) and math.isfinite(epsilon) and 0.0 <= epsilon <= upper):
            bound = "in [0, 1]" if cls.norm == "linf" else "a finite number >= 0"
            raise ConfigError(f"{cls.__name__}: epsilon must be {bound} (image units), got {epsilon!r}")

    @classmethod
    def to_image_units(cls, value: float) -> float:
        """A budget or step size in this attack's `budget_unit` -> image units."""
        return float(value) / 255.0 if cls.budget_unit == "1/255" else float(value)

    @classmethod
    def budget_to_image_units(cls, epsilon: float, section: str = "epsilon") -> float:
        """Validate a config budget (in `budget_unit`) and convert it to image units."""
        upper = 255.0 if cls.budget_unit == "1/255" else math.inf
        if not (_is_number(epsilon) and math.isfinite(epsilon) and 0.0 <= epsilon <= upper):
            bound = "in [0, 255] (1/255 units)" if upper == 255.0 else \
                "a finite number >= 0 (L2 radius, image units)"
            raise ConfigError(f"{section}: epsilon must be {bound}, got {epsilon!r}")
        if upper == 255.0 and 0.0 < epsilon < SMALLEST_LINF_BUDGET:
            # a fraction of the intensity range (0.03, as many papers write it) would
            # otherwise run silently as 0.03/255, an attack that changes nothing
            raise ConfigError(
                f"{section}: epsilon {epsilon!r} means {epsilon!r}/255, under a quarter of one "
                f"grey level; budgets are in 1/255 units: for {epsilon!r} of the intensity "
                f"range write {_format(round(epsilon * 255.0, 4))}")
        return cls.to_image_units(epsilon)

    def budget(self) -> str:
        """The budget as config gives it: 'ε 8/255' or 'ε 0.5' (an L2 radius)."""
        if self.budget_unit == "1/255":
            return f"ε {_format(round(self.epsilon * 255.0, 6))}/255"
        return f"ε {_format(self.epsilon)}"

    def describe(self) -> str:
        """A line for reports: the attack and its norm (`title`), budget and settings."""
        details = self.details()
        return f"{self.title}, {self.budget()}" + (f", {details}" if details else "")

    def details(self) -> str:
        """The settings part of `describe`; attacks with settings override it."""
        return ""

    def step_size(self) -> float:
        """The step in image units: the configured `step_size` (in `budget_unit`), or
        `relative_step` * epsilon / steps without one."""
        if self.params.step_size is None:
            return self.relative_step * self.epsilon / self.params.steps
        return self.to_image_units(self.params.step_size)

    def step_text(self) -> str:
        """The step as config gives it: 'step 2/255' or 'step 0.125' (an L2 length)."""
        if self.budget_unit == "1/255":
            return f"step {_format(round(self.step_size() * 255.0, 6))}/255"
        return f"step {_format(round(self.step_size(), 6))}"

    def resolved_params(self) -> dict[str, Any]:
        """The settings with their defaults, and the step taken where none was given."""
        params = self.params.to_dict()
        if self.relative_step is not None and params["step_size"] is None:
            scale = 255.0 if self.budget_unit == "1/255" else 1.0
            # 12 significant digits: 2/255 back as 2.0, a tiny L2 step not rounded to 0
            params["step_size"] = float(f"{self.step_size() * scale:.12g}")
        return params

    # running
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Adversarial versions of one batch, on the batch's device, detached."""
        clean = images.detach()
        if self.epsilon == 0.0 or len(clean) == 0:
            return clean.clone()
        # gradients are needed even when the caller runs under torch.no_grad()
        with frozen(self.model), torch.enable_grad():
            adversarial = self.perturb(clean, labels.detach())
        return adversarial.detach()

    @abstractmethod
    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The attack itself; called with the model frozen and epsilon > 0."""

    def generate(self, batches: Iterable[tuple[np.ndarray, np.ndarray]],
                 device: torch.device) -> Iterator[np.ndarray]:
        """Attack (images, labels) numpy batches on `device`, yielding numpy batches."""
        for images, labels in batches:
            adversarial = self(torch.as_tensor(images, dtype=torch.float32, device=device),
                               torch.as_tensor(labels, dtype=torch.int64, device=device))
            yield adversarial.cpu().numpy()

    # gradients
    def loss_gradient(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Gradient of the batch-mean cross-entropy with respect to the images only."""
        images = images.detach().requires_grad_(True)  # shares memory, no copy
        loss = F.cross_entropy(self.model(images), labels)
        (gradient,) = torch.autograd.grad(loss, images)
        return gradient

    def losses_and_gradient(self, images: torch.Tensor, labels: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-image cross-entropy, the gradient of their sum, and the logits (all detached)."""
        images = images.detach().requires_grad_(True)
        logits = self.model(images)
        losses = F.cross_entropy(logits, labels, reduction="none")
        (gradient,) = torch.autograd.grad(losses.sum(), images)
        return losses.detach(), gradient, logits.detach()

    def signed_step(self, adversarial: torch.Tensor, clean: torch.Tensor, labels: torch.Tensor,
                    step_size: float) -> torch.Tensor:
        """One ascent step along the gradient's sign, projected back into the budget."""
        stepped = adversarial + step_size * self.loss_gradient(adversarial, labels).sign()
        return self.project(stepped, clean)

    # projections
    def project(self, adversarial: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """Back into the budget around `clean` (by `norm`), then into [0, 1]."""
        if self.norm == "linf":
            return project_linf(adversarial, clean, self.epsilon)
        return project_l2(adversarial, clean, self.epsilon)

    # seeded random numbers, drawn on the generator's device (CPU by default) so a
    # seed gives the same draws on CPU and GPU runs
    def _generator_device(self) -> torch.device:
        return self.generator.device if self.generator is not None else torch.device("cpu")

    def random_uniform(self, shape, low: float, high: float, like: torch.Tensor) -> torch.Tensor:
        draw = torch.empty(shape, dtype=like.dtype, device=self._generator_device())
        return draw.uniform_(low, high, generator=self.generator).to(like.device)

    def random_normal(self, shape, like: torch.Tensor) -> torch.Tensor:
        draw = torch.empty(shape, dtype=like.dtype, device=self._generator_device())
        return draw.normal_(generator=self.generator).to(like.device)

    def random_sign(self, shape, like: torch.Tensor) -> torch.Tensor:
        bits = torch.randint(0, 2, shape, generator=self.generator, device=self._generator_device())
        return (bits.to(device=like.device, dtype=like.dtype) * 2.0 - 1.0)

    def random_int(self, high: int, shape, device: torch.device) -> torch.Tensor:
        """Integers in [0, high)."""
        draw = torch.randint(0, high, shape, generator=self.generator,
                             device=self._generator_device())
        return draw.to(device)


def project_linf(adversarial: torch.Tensor, clean: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Nearest point within `epsilon` of `clean` (L-infinity) and within [0, 1]."""
    bounded = torch.minimum(torch.maximum(adversarial, clean - epsilon), clean + epsilon)
    return bounded.clamp(0.0, 1.0)


def l2_norms(tensor: torch.Tensor) -> torch.Tensor:
    """Per-image L2 norm, shape (N,)."""
    return torch.norm(tensor.reshape(len(tensor), -1), p=2, dim=1)


def per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) values shaped to broadcast over (N, C, H, W) images."""
    return values.reshape((-1,) + (1,) * (like.dim() - 1))


def project_l2(adversarial: torch.Tensor, clean: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Scale the perturbation back onto the L2 ball of radius `epsilon`, then clip to [0, 1].

    Clipping moves pixels towards the clean image (itself in [0, 1]), so the
    result stays in the ball.
    """
    delta = adversarial - clean
    factor = torch.clamp(epsilon / l2_norms(delta), max=1.0)  # norm 0 -> inf -> 1
    return torch.clamp(clean + delta * per_image(factor, delta), 0.0, 1.0)
