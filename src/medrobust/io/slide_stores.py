"""Per-slide Zarr stores: tiles (after tiling) and features (after embedding).

Tiles: chunk = one tile (any tile reads alone), grouped into shards of
`TILES_PER_SHARD` tiles, one file each. Writers write whole shards, so parallel
writers never share one, and a shard costs one file write instead of one per
tile (5x faster tiling, docs/benchmarks.md). Layouts are in docs/architecture.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from medrobust.errors import InputError

TILES_PER_SHARD = 64
# zstd level 1: as small as zarr's default (level 3) on H&E tiles, 3x faster to write
# (docs/benchmarks.md, "Tiling")
TILE_CODEC = ZstdCodec(level=1)


@dataclass(frozen=True)
class TileStore:
    path: Path
    tiles: zarr.Array          # (n, T, T, 3) uint8, lazy
    coords: np.ndarray         # (n, 2) level-0 x, y
    tissue_fraction: np.ndarray
    attrs: dict[str, Any]

    def __len__(self) -> int:
        return int(self.tiles.shape[0])


@dataclass(frozen=True)
class FeatureStore:
    path: Path
    features: np.ndarray       # (n, dim) float32
    coords: np.ndarray
    attrs: dict[str, Any]


def _open_group(path: Path, arrays: tuple[str, ...]) -> zarr.Group:
    try:
        group = zarr.open_group(path, mode="r")
        missing = [name for name in arrays if name not in group]
    except (FileNotFoundError, ValueError) as error:
        raise InputError(f"{path}: not a readable Zarr store ({error})") from error
    if missing:
        raise InputError(f"{path}: store lacks array(s) {', '.join(missing)}")
    return group


def open_tile_store(path: str | os.PathLike) -> TileStore:
    path = Path(path)
    group = _open_group(path, ("tiles", "coords", "tissue_fraction"))
    return TileStore(path, group["tiles"], np.asarray(group["coords"][:]),
                     np.asarray(group["tissue_fraction"][:]), dict(group.attrs))


def create_tile_store(path: Path, n_tiles: int, tile_size: int, coords: np.ndarray,
                      tissue_fraction: np.ndarray, attrs: dict[str, Any]) -> zarr.Array:
    """Create the store's arrays and return `tiles` for the caller to fill.

    Fill it in whole shards (`tiles[i:i + TILES_PER_SHARD]`, i a multiple of
    TILES_PER_SHARD), one writer per shard.

    Call inside `medrobust.io.atomic.atomic_path` so a half-filled store never
    appears at its final path.
    """
    group = zarr.open_group(path, mode="w")
    group.create_array("coords", data=np.asarray(coords, dtype=np.int64).reshape(-1, 2))
    group.create_array("tissue_fraction", data=np.asarray(tissue_fraction, dtype=np.float32))
    group.attrs.update({**attrs, "n_tiles": int(n_tiles)})
    tile = (tile_size, tile_size, 3)
    return group.create_array("tiles", shape=(n_tiles, *tile), chunks=(1, *tile), dtype="uint8",
                              shards=(min(n_tiles, TILES_PER_SHARD), *tile) if n_tiles else None,
                              compressors=TILE_CODEC)


def open_feature_store(path: str | os.PathLike) -> FeatureStore:
    path = Path(path)
    group = _open_group(path, ("features", "coords"))
    return FeatureStore(path, np.asarray(group["features"][:], dtype=np.float32),
                        np.asarray(group["coords"][:]), dict(group.attrs))


def write_feature_store(path: Path, features: np.ndarray, coords: np.ndarray,
                        attrs: dict[str, Any]) -> None:
    """Write a slide's features; call inside `atomic_path`."""
    group = zarr.open_group(path, mode="w")
    features = np.asarray(features, dtype=np.float32)
    rows = max(1, min(len(features), 4096))
    group.create_array("features", data=features, chunks=(rows, features.shape[1]))
    group.create_array("coords", data=np.asarray(coords, dtype=np.int64).reshape(-1, 2))
    group.attrs.update({**attrs, "dim": int(features.shape[1]), "n_tiles": len(features)})
