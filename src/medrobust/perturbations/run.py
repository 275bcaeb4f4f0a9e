"""Perturbed copies of a store's test split (streamed with `medrobust.io.test_split`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from medrobust.conditions import perturbation_store_name
from medrobust.io.atomic import atomic_path
from medrobust.io.image_store import open_image_store
from medrobust.io.test_split import iter_test_batches, write_test_store
from medrobust.logs import get_logger
from medrobust.perturbations import build_perturbation

log = get_logger(__name__)


def perturb_store(clean_store_path: str | os.PathLike, out_path: str | os.PathLike, name: str,
                  severity: float, seed: int, batch_size: int = 64,
                  params: Mapping[str, Any] | None = None,
                  device: str | torch.device = "cpu") -> None:
    """Apply perturbation `name` at `severity` (with its other settings `params`) to the test
    split of a clean store, batch by batch on `device`."""
    params = dict(params or {})
    perturbation = build_perturbation(name, severity, **params)
    store = open_image_store(clean_store_path)
    # one generator for the whole split, drawn in store order: the result
    # depends on the seed only, not on the batch size or the device
    rng = np.random.default_rng(seed)
    batches = (perturbation(torch.as_tensor(images, device=device), rng).cpu().numpy()
               for images, _ in iter_test_batches(store, batch_size, desc=f"{name} {severity:g}"))
    write_test_store(store, out_path, batches,
                     {"perturbation": name, "severity": severity, "seed": seed,
                      "perturbation_params": params,
                      "severity_unit": perturbation.severity_unit})
    log.info("%s: %s at severity %g", Path(out_path).name, name, severity)


def perturbation_run(clean_store_path: str | os.PathLike, out_dir: str | os.PathLike, name: str,
                     severities: Sequence[float], seed: int,
                     params: Mapping[str, Any] | None = None,
                     device: str | torch.device = "cpu") -> None:
    """`perturb_store` at each severity; one store per severity in `out_dir`, written at once.

    The stores are named by `medrobust.conditions.perturbation_store_name`
    (`severity0.05.zarr`); each severity draws from the same seed.
    """
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for severity in severities:
            perturb_store(clean_store_path, Path(tmp) / perturbation_store_name(severity), name,
                          severity, seed, params=params, device=device)
