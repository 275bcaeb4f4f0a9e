"""Craft adversarial versions of a clean store's test split on a source model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from medrobust.attacks import build_attack
from medrobust.conditions import attack_store_name
from medrobust.config import WORKFLOW_ATTACK_KEYS
from medrobust.io.atomic import atomic_path
from medrobust.io.image_store import ImageStore, open_image_store
from medrobust.logs import get_logger
from medrobust.models.pipeline import load_pipeline
from medrobust.io.test_split import iter_test_batches, write_test_store

log = get_logger(__name__)


def craft_attack_run(source_model_dir: str | os.PathLike, clean_store_path: str | os.PathLike,
                     out_dir: str | os.PathLike, attacks: Mapping[str, Mapping[str, Any]],
                     device: str | torch.device = "cpu", batch_size: int = 32,
                     denoiser_dir: str | os.PathLike | None = None) -> None:
    """Attack every test image with each attack at each of its budgets; one store each.

    `attacks` maps an attack's config name to its config entry (`epsilons` and
    the attack's settings). The stores are named by
    `medrobust.conditions.attack_store_name` (`fgsm-eps8.zarr`); `out_dir`
    appears only once all are written. The source model loads once; with
    `denoiser_dir` it is attacked behind that denoiser, gradients through both
    (`models.pipeline`).
    """
    device = torch.device(device)
    model = load_pipeline(source_model_dir, denoiser_dir, device)
    store = open_image_store(clean_store_path)
    source = Path(source_model_dir).name
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name, entry in attacks.items():
            settings = {key: value for key, value in entry.items()
                        if key not in WORKFLOW_ATTACK_KEYS}
            for epsilon in entry["epsilons"]:
                craft_adversarial_store(model, source, store, tmp / attack_store_name(name, epsilon),
                                        name, epsilon, settings, device, batch_size)
    log.info("wrote %s: %s, crafted on %s", out_dir, ", ".join(attacks), source)


def craft_adversarial_store(model: torch.nn.Module, source_model: str, store: ImageStore,
                            out_path: str | os.PathLike, attack_name: str, epsilon: float,
                            attack_params: Mapping[str, Any] | None, device: torch.device,
                            batch_size: int) -> None:
    """Attack every test image of `store` with gradients of `model`; write a test-only store.

    `epsilon` is in the attack's own units, as in config (1/255 for L-infinity
    attacks, an L2 radius in image units for L2 attacks); `device` is where to
    run (the caller picks it with `medrobust.device.select_device`).
    The store's attrs add to the clean store's attrs: `attack` (the config
    name), `epsilon` (as given), `norm` ("linf" / "l2"), `budget_unit`
    ("1/255" / "image"), `attack_params` (every setting, defaults included),
    `attack_description` (one line for reports) and `source_model` (the source
    model folder's name).
    """
    if isinstance(epsilon, float) and epsilon.is_integer():
        epsilon = int(epsilon)  # 4.0 -> 4, as config writes it
    attack = build_attack(attack_name, model, epsilon, attack_params)
    batches = iter_test_batches(store, batch_size,
                                desc=f"{attack_name} {attack.budget()} on {source_model}")
    write_test_store(store, out_path, attack.generate(batches, device), {
        "attack": attack_name,
        "epsilon": epsilon,
        "norm": attack.norm,
        "budget_unit": attack.budget_unit,
        "attack_params": attack.resolved_params(),
        "attack_description": attack.describe(),
        "source_model": source_model,
    })
    log.info("%s: %s, crafted on %s", Path(out_path).name, attack.describe(), source_model)
