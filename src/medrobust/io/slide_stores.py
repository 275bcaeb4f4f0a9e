"""Per-slide Zarr stores: tiles (after tiling) and features (after embedding).

Tiles: chunk = one tile (any tile reads alone), grouped into shards of
`TILES_PER_SHARD` tiles, one file each. Writers write whole shards, so parallel
writers never share one, and a shard costs one file write instead of one per
tile (5x faster tiling, docs/benchmarks.md). `write_tile_shard` writes a shard
file's bytes itself, in the layout zarr's sharding codec reads, without zarr's
per-chunk work. Layouts are in docs/architecture.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.storage import LocalStore

from medrobust.errors import InputError

TILES_PER_SHARD = 64
# zstd level 1: as small as zarr's default (level 3) on H&E tiles, 3x faster to write
# (docs/benchmarks.md, "Tiling")
TILE_CODEC = ZstdCodec(level=1)
# the same compressor as TILE_CODEC (zarr's zstd codec wraps numcodecs'), for write_tile_shard
_TILE_COMPRESSOR = numcodecs.Zstd(level=TILE_CODEC.level, checksum=TILE_CODEC.checksum)
_NO_CHUNK = 2**64 - 1   # a shard index entry's offset and length for a chunk not stored


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
    # attrs given at creation: one metadata write, where attrs.update writes one per key
    group = zarr.open_group(path, mode="w", attributes={**attrs, "n_tiles": int(n_tiles)})
    group.create_array("coords", data=np.asarray(coords, dtype=np.int64).reshape(-1, 2))
    group.create_array("tissue_fraction", data=np.asarray(tissue_fraction, dtype=np.float32))
    tile = (tile_size, tile_size, 3)
    return group.create_array("tiles", shape=(n_tiles, *tile), chunks=(1, *tile), dtype="uint8",
                              shards=(min(n_tiles, TILES_PER_SHARD), *tile) if n_tiles else None,
                              compressors=TILE_CODEC)


def write_tile_shard(tiles: zarr.Array, start: int, batch: np.ndarray) -> None:
    """Store `batch` as `tiles[start:start + len(batch)]`, one whole shard, as the shard file.

    The file is what zarr's sharding codec (index at the end) reads: each tile
    compressed alone, back to back, then the index of (offset, length) per chunk
    of the shard as little-endian uint64 and the index's crc32c. zarr's own
    `tiles[a:b] = batch` writes the same bytes, plus about 1 ms of per-chunk
    pipeline work per tile (docs/benchmarks.md). `tiles` is an array from
    `create_tile_store`, whose codecs this layout matches.
    """
    per_shard = tiles.shards[0]
    if start % per_shard or not 0 < len(batch) <= min(per_shard, tiles.shape[0] - start):
        raise ValueError(f"tiles {start}:{start + len(batch)} are not one whole shard of "
                         f"{per_shard} tiles in an array of {tiles.shape[0]}")
    store = tiles.store_path.store
    if not isinstance(store, LocalStore):
        raise TypeError(f"write_tile_shard writes files; {store} is not a local store")
    chunks = [_TILE_COMPRESSOR.encode(np.ascontiguousarray(tile)) for tile in batch]
    index = np.full((per_shard, 2), _NO_CHUNK, dtype="<u8")
    index[:len(chunks), 1] = [len(chunk) for chunk in chunks]
    index[:len(chunks), 0] = np.cumsum(index[:len(chunks), 1]) - index[:len(chunks), 1]
    index_bytes = index.tobytes()
    key = tiles.metadata.encode_chunk_key((start // per_shard, 0, 0, 0))
    path = Path(store.root) / tiles.store_path.path / key
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        file.writelines(chunks)
        file.write(index_bytes)
        file.write(google_crc32c.value(index_bytes).to_bytes(4, "little"))


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
