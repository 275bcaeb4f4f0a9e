"""Embed one slide's tiles into a feature store (docs/architecture.md, "Feature store")."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from medrobust.errors import ConfigError, InputError
from medrobust.features.backbones import Backbone, build_backbone
from medrobust.io.atomic import atomic_path
from medrobust.io.slide_stores import TileStore, open_tile_store, write_feature_store
from medrobust.logs import get_logger
from medrobust.progress import progress
from medrobust.config import config_from_mapping

log = get_logger(__name__)
COPIED_ATTRS = ("slide_id", "label", "split")


@dataclass(frozen=True)
class FeatureConfig:
    backbone: str = "resnet18"
    weights: str = "random"
    batch_size: int = 64
    seed: int = 0              # initialises `weights: random`

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"features.batch_size must be a positive integer, "
                              f"not {self.batch_size!r}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "FeatureConfig":
        return config_from_mapping(cls, mapping, "features")


def extract_slide_features(tile_store_path: str | os.PathLike, out_path: str | os.PathLike,
                           config: FeatureConfig, device: torch.device | str = "cpu") -> Path:
    """Embed every tile of a tile store and write the slide's feature store atomically."""
    store = open_tile_store(tile_store_path)
    attrs = _slide_attrs(store)
    backbone = build_backbone(config.backbone, config.weights, config.seed)
    features = embed_tiles(store, backbone, config.batch_size, torch.device(device))
    attrs.update(backbone=backbone.name, weights=backbone.weights,
                 weights_sha256=backbone.weights_sha256)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        write_feature_store(tmp, features, store.coords, attrs)
    log.info("%s: %d tiles -> features %s", attrs["slide_id"], len(features), out_path)
    return out_path


def _slide_attrs(store: TileStore) -> dict[str, Any]:
    missing = [key for key in COPIED_ATTRS if key not in store.attrs]
    if missing:
        raise InputError(f"{store.path}: tile store attrs lack {', '.join(missing)}")
    tiles = store.tiles
    if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise InputError(f"{store.path}: tiles must be uint8 (n, T, T, 3), "
                         f"found {tiles.dtype} {tiles.shape}")
    # a slide left out at tiling carries its reason on, for training and evaluation to report
    return {**{key: store.attrs[key] for key in COPIED_ATTRS},
            "rejected": store.attrs.get("rejected", [])}


def embed_tiles(store: TileStore, backbone: Backbone, batch_size: int,
                device: torch.device) -> np.ndarray:
    """Features `(n_tiles, dim)`, reading the lazy tile array one batch at a time."""
    model = backbone.model.to(device)
    features = np.zeros((len(store), backbone.dim), dtype=np.float32)
    starts = range(0, len(store), batch_size)
    with torch.inference_mode():
        for start in progress(starts, desc=f"embed {store.path.name}", unit="batch"):
            batch = np.asarray(store.tiles[start:start + batch_size])
            # move uint8 (4x smaller than float) and scale on the device
            images = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().div_(255)
            features[start:start + len(batch)] = model(images).float().cpu().numpy()
    return features
