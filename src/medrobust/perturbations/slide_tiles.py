"""Perturbed features for a fraction of each test slide's tiles (docs/mil.md, "Robustness").

For one perturbation of a slide dataset, at every severity: each test slide's
tiles are put in a seeded random order (the same order for every
perturbation and severity, from the seed and the slide id), the first
ceil(f_max · n) of them are read from the tile store, perturbed, rounded back
to 8 bits (tiles are 8-bit images, as a scanner would give them) and embedded
again with the dataset's backbone (`features.extract.embed_batch`). A
fraction f then means the first ceil(f · n) tiles of that order, so the
fractions nest, and every model of the dataset reads the same features: they
are computed once per (dataset, backbone, perturbation, severity).

Layout of a run folder: one Zarr group per severity (`severity2.zarr`), one
subgroup per test slide with `order` (the perturbed tiles' indices, in order)
and `features` (their new features, row i for tile order[i]); attrs name the
perturbation, severity, its settings, the seed and the backbone's weights.
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import zarr

from medrobust.conditions import perturbation_store_name
from medrobust.errors import InputError
from medrobust.features.backbones import Backbone
from medrobust.features.extract import FeatureConfig, backbone_for, embed_batch, resolved_precision
from medrobust.io.atomic import atomic_path
from medrobust.io.slide_stores import TileStore, open_tile_store, read_tiles
from medrobust.io.zarr_chunks import create_array
from medrobust.logs import get_logger
from medrobust.perturbations import Perturbation, build_perturbation

log = get_logger(__name__)
TEST = "test"
# tiles perturbed and embedded at a time: bounds memory on slides of thousands of tiles
CHUNK = 512


def slide_generator(seed: int, slide_id: str, stream: int) -> np.random.Generator:
    """A generator fixed by the seed and the slide (not by its place in a list); stream 0
    orders the tiles, stream 1 draws the perturbation's random numbers."""
    return np.random.default_rng([seed, zlib.crc32(slide_id.encode()), stream])


def tile_order(seed: int, slide_id: str, n_tiles: int) -> np.ndarray:
    """The slide's tiles in the seeded order in which fractions take them."""
    return slide_generator(seed, slide_id, 0).permutation(n_tiles)


def perturbed_count(fraction: float, n_tiles: int) -> int:
    """Tiles perturbed at `fraction`: ceil(f · n), so any f > 0 perturbs at least one."""
    # rounded first: 0.1 * 30 is 3.0000000000000004 in floating point, which is 3 tiles
    return min(n_tiles, math.ceil(round(fraction * n_tiles, 9)))


def perturb_tiles(tiles: np.ndarray, perturbation: Perturbation, rng: np.random.Generator,
                  device: torch.device) -> np.ndarray:
    """uint8 tiles `(k, T, T, 3)` -> perturbed uint8 tiles, the perturbation run on `device`."""
    images = torch.from_numpy(tiles).to(device).permute(0, 3, 1, 2).float().div_(255)
    perturbed = perturbation(images, rng)
    return perturbed.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def perturbed_slide_features(store: TileStore, backbone: Backbone, perturbation: Perturbation,
                             count: int, seed: int, batch_size: int, device: torch.device,
                             precision: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """The order's first `count` tiles and their features after the perturbation."""
    slide_id = str(store.attrs["slide_id"])
    order = tile_order(seed, slide_id, len(store))[:count]
    rng = slide_generator(seed, slide_id, 1)
    features = np.zeros((count, backbone.dim), dtype=np.float32)
    for start in range(0, count, CHUNK):
        positions = order[start:start + CHUNK]
        tiles = perturb_tiles(read_tiles(store.tiles, positions), perturbation, rng, device)
        # CHUNK (not batch_size) sets the random draws, so features do not depend on the batch
        for offset in range(0, len(tiles), batch_size):
            features[start + offset:start + offset + batch_size] = embed_batch(
                backbone, tiles[offset:offset + batch_size], device, precision)
    return order, features


def slide_perturbation_run(tile_store_paths: Sequence[str | os.PathLike],
                           out_dir: str | os.PathLike, name: str, severities: Sequence[float],
                           fractions: Sequence[float], seed: int, features: FeatureConfig,
                           params: Mapping[str, Any] | None = None,
                           device: str | torch.device = "cpu") -> None:
    """Perturbed features of every test slide among `tile_store_paths` at each severity,
    for fractions up to max(`fractions`); one Zarr group per severity in `out_dir`."""
    params = dict(params or {})
    device = torch.device(device)
    backbone = backbone_for(features)
    stores = [store for store in map(open_tile_store, tile_store_paths)
              if store.attrs.get("split") == TEST and len(store) > 0]
    if not stores:
        raise InputError(f"no test slide with tiles among {len(tile_store_paths)} tile stores "
                         f"(e.g. {next(iter(tile_store_paths), 'none')})")
    largest = max(fractions)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for severity in severities:
            perturbation = build_perturbation(name, severity, **params)
            group = zarr.open_group(Path(tmp) / perturbation_store_name(severity), mode="w")
            group.attrs.update(perturbation=name, severity=severity, perturbation_params=params,
                               severity_unit=perturbation.severity_unit, seed=seed,
                               max_fraction=largest, backbone=backbone.name,
                               weights=backbone.weights, weights_sha256=backbone.weights_sha256,
                               precision=resolved_precision(features.precision, device))
            for store in stores:
                order, embedded = perturbed_slide_features(
                    store, backbone, perturbation, perturbed_count(largest, len(store)), seed,
                    features.batch_size, device, features.precision)
                slide = group.create_group(str(store.attrs["slide_id"]))
                create_array(slide, "order", data=order.astype(np.int64))
                create_array(slide, "features", data=embedded)
                slide.attrs["n_tiles"] = len(store)
            log.info("%s %g: %d test slides, up to %.0f%% of their tiles", name, severity,
                     len(stores), 100 * largest)
