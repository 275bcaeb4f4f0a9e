"""The shared machinery of gradient attacks: one attack = one small subclass.

Images are float tensors in [0, 1] (normalisation lives inside the model), so
an attack works in pixel space, keeps every adversarial image within
`epsilon` (L-infinity, image units) of its clean image, and clips to [0, 1].
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medrobust.errors import ConfigError
from medrobust.config import config_from_mapping


@dataclass(frozen=True)
class AttackParams:
    """An attack's settings besides epsilon; attacks with settings subclass it."""

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None, section: str = "attack"):
        return config_from_mapping(cls, mapping or {}, section)


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
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


class Attack(ABC):
    """An L-infinity attack on a classifier whose forward takes images in [0, 1]."""

    Params: ClassVar[type[AttackParams]] = AttackParams

    def __init__(self, model: nn.Module, epsilon: float, params: AttackParams | None = None):
        if not (math.isfinite(epsilon) and 0.0 <= epsilon <= 1.0):
            raise ConfigError(f"{type(self).__name__}: epsilon must lie in [0, 1] "
                              f"(image units), got {epsilon}")
        self.model = model
        self.epsilon = float(epsilon)
        self.params = params if params is not None else self.Params()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Adversarial versions of one batch, on the batch's device, detached."""
        clean = images.detach()
        # gradients are needed even when the caller runs under torch.no_grad()
        with _frozen(self.model), torch.enable_grad():
            adversarial = self.perturb(clean, labels.detach())
        return adversarial.detach()

    @abstractmethod
    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The attack itself; called with the model frozen."""

    def generate(self, batches: Iterable[tuple[np.ndarray, np.ndarray]],
                 device: torch.device) -> Iterator[np.ndarray]:
        """Attack (images, labels) numpy batches on `device`, yielding numpy batches."""
        for images, labels in batches:
            adversarial = self(torch.as_tensor(images, dtype=torch.float32, device=device),
                               torch.as_tensor(labels, dtype=torch.int64, device=device))
            yield adversarial.cpu().numpy()

    def loss_gradient(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Gradient of the cross-entropy loss with respect to the images only."""
        images = images.clone().requires_grad_(True)
        loss = F.cross_entropy(self.model(images), labels)
        (gradient,) = torch.autograd.grad(loss, images)
        return gradient

    def signed_step(self, adversarial: torch.Tensor, clean: torch.Tensor, labels: torch.Tensor,
                    step_size: float) -> torch.Tensor:
        """One ascent step along the gradient's sign, projected back into the eps ball."""
        stepped = adversarial + step_size * self.loss_gradient(adversarial, labels).sign()
        return self.project(stepped, clean)

    def project(self, adversarial: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """Nearest point within `epsilon` of `clean` (L-infinity) and within [0, 1]."""
        bounded = torch.minimum(torch.maximum(adversarial, clean - self.epsilon), clean + self.epsilon)
        return bounded.clamp(0.0, 1.0)
