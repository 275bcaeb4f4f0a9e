"""Craft adversarial versions of a clean store's test split on a source model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from medrobust.attacks import build_attack
from medrobust.io.image_store import open_image_store
from medrobust.logs import get_logger
from medrobust.models import load_model
from medrobust.perturbations.run import iter_test_batches, write_test_store

log = get_logger(__name__)


def craft_adversarial_store(source_model_dir: str | os.PathLike,
                            clean_store_path: str | os.PathLike,
                            out_path: str | os.PathLike, attack_name: str, epsilon_255: float,
                            attack_params: Mapping[str, Any] | None = None,
                            device: str | torch.device = "cpu", batch_size: int = 32) -> None:
    """Attack every test image with gradients of the source model; write a test-only store.

    `epsilon_255` is in 1/255 units; `device` is where to run (the caller picks
    it with `medrobust.device.select_device`).
    The store's attrs add `attack`, `epsilon` (1/255 units), `attack_params` and
    `source_model` (the model folder's name) to the clean store's attrs.
    """
    device = torch.device(device)
    model = load_model(source_model_dir, device)
    attack = build_attack(attack_name, model, epsilon_255, attack_params)
    store = open_image_store(clean_store_path)
    source_model = Path(source_model_dir).name
    batches = iter_test_batches(store, batch_size,
                                desc=f"{attack_name} eps {epsilon_255:g}/255 on {source_model}")
    write_test_store(store, out_path, attack.generate(batches, device), {
        "attack": attack_name,
        "epsilon": epsilon_255,
        "attack_params": dict(attack_params or {}),
        "source_model": source_model,
    })
    log.info("wrote %s (%s, eps %g/255, crafted on %s)", out_path, attack_name, epsilon_255,
             source_model)
