"""Adversarial attacks, by config name.

`ATTACKS` maps the names used under `attacks:` in config.yaml to attack
classes; `build_attack` turns a name, a model, an epsilon in 1/255 units and
the attack's config settings into a ready attack.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from medrobust.attacks.base import Attack, AttackParams
from medrobust.attacks.fgsm import FGSM, IFGSM
from medrobust.errors import unknown_name

ATTACKS: dict[str, type[Attack]] = {"fgsm": FGSM, "ifgsm": IFGSM}


def build_attack(name: str, model: nn.Module, epsilon_255: float,
                 params: Mapping[str, Any] | None = None) -> Attack:
    """The attack `name` on `model`; `epsilon_255` is in 1/255 units as in config."""
    try:
        attack_class = ATTACKS[name]
    except KeyError:
        raise unknown_name("attack", name, ATTACKS) from None
    return attack_class(model, epsilon_255 / 255.0,
                        attack_class.Params.from_mapping(params, section=f"attacks.{name}"))


__all__ = ["ATTACKS", "Attack", "AttackParams", "FGSM", "IFGSM", "build_attack"]
