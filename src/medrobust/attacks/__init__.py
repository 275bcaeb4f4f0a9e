"""Adversarial attacks, by config name.

`ATTACKS` maps the names used under `attacks:` in config.yaml to attack
classes. Each class declares its `norm` ("linf" / "l2"), the `budget_unit` its
budget and step sizes are given in ("1/255" for L-infinity, "image" for an L2
radius in image units) and its settings as a frozen `Params` dataclass.

`resolve_attack` checks a name, a budget and the settings (what config
validation needs, no model involved); `build_attack` also builds the attack on
a model. Details, defaults and references: docs/attacks.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from medrobust.attacks.apgd import APGDCE
from medrobust.attacks.base import Attack, AttackParams
from medrobust.attacks.cw import CWL2
from medrobust.attacks.fgsm import FGSM, IFGSM
from medrobust.attacks.pgd import PGD, PGDL2
from medrobust.attacks.square import Square
from medrobust.errors import unknown_name

ATTACKS: dict[str, type[Attack]] = {
    "fgsm": FGSM,
    "ifgsm": IFGSM,
    "pgd": PGD,
    "pgd_l2": PGDL2,
    "cw_l2": CWL2,
    "apgd_ce": APGDCE,
    "square": Square,
}


@dataclass(frozen=True)
class AttackSpec:
    """A checked attack configuration: which class, the budget as given and in image units."""

    name: str
    attack_class: type[Attack]
    epsilon: float          # as given in config, in attack_class.budget_unit
    epsilon_image: float    # in image units
    params: AttackParams


def resolve_attack(name: str, epsilon: float, params: Mapping[str, Any] | None = None,
                   section: str | None = None) -> AttackSpec:
    """Check an attack's name, budget (in its own units) and settings; raise ConfigError.

    `section` prefixes the messages (default `attacks.<name>`).
    """
    try:
        attack_class = ATTACKS[name]
    except KeyError:
        raise unknown_name("attack", name, ATTACKS) from None
    section = section or f"attacks.{name}"
    epsilon_image = attack_class.budget_to_image_units(epsilon, section=section)
    return AttackSpec(name, attack_class, epsilon, epsilon_image,
                      attack_class.Params.from_mapping(params, section=section))


def build_attack(name: str, model: nn.Module, epsilon: float,
                 params: Mapping[str, Any] | None = None, *,
                 generator: torch.Generator | None = None) -> Attack:
    """The attack `name` on `model`; `epsilon` in the attack's own units, as in config
    (L-infinity attacks: 1/255, so 8 means 8/255; L2 attacks: a radius in image units)."""
    spec = resolve_attack(name, epsilon, params)
    return spec.attack_class(model, spec.epsilon_image, spec.params, generator=generator)


__all__ = ["APGDCE", "ATTACKS", "Attack", "AttackParams", "AttackSpec", "CWL2", "FGSM", "IFGSM",
           "PGD", "PGDL2", "Square", "build_attack", "resolve_attack"]
