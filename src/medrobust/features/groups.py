"""One feature job for a group of slides (`datasets.<name>.slides_per_job`, `medrobust.slide_groups`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from medrobust.features.extract import FeatureConfig, backbone_for, extract_slide_features
from medrobust.progress import progress


def extract_group_features(tile_stores: Sequence[str | os.PathLike], group_dir: str | os.PathLike,
                           config: FeatureConfig, device: torch.device | str = "cpu") -> None:
    """Each tile store's feature store in `group_dir`, under the tile store's name
    (`{slide_id}.zarr`), as `extract_slide_features` writes it for a slide's own job,
    with one backbone built for all of them."""
    group_dir = Path(group_dir)
    group_dir.mkdir(parents=True, exist_ok=True)
    backbone = backbone_for(config)
    for tile_store in progress(tile_stores, desc=f"features {group_dir.name}", unit="slide"):
        extract_slide_features(tile_store, group_dir / Path(tile_store).name, config, device,
                               backbone=backbone)
