"""Per-slide Zarr stores: tiles (after tiling) and features (after embedding).

Tiles: chunk = one tile (any tile reads alone), grouped into shards of
`TILES_PER_SHARD` tiles, one file each. Writers write whole shards, so parallel
writers never share one, and a shard costs one file write instead of one per
tile (5x faster tiling, docs/benchmarks.md). `write_tile_shard` writes a shard
file's bytes itself, in the layout zarr's sharding codec reads, without zarr's
per-chunk work, and `read_tiles` reads them back the same way; `create_tile_store`
writes the store's metadata files itself too. Layouts are in docs/architecture.md.
Every chunk is written and each array marked so (`medrobust.io.zarr_chunks`): a
missing tile or feature chunk is an error, not zeros.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import google_crc32c
import numpy as np
from numcodecs import blosc
from numcodecs.zstd import Zstd
import zarr
from zarr.codecs import (BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec,
                         ShardingCodecIndexLocation, ZstdCodec)
from zarr.storage import LocalStore

from medrobust.errors import InputError
from medrobust.io.atomic import json_default
from medrobust.io.file_reads import read_at
from medrobust.io.zarr_chunks import (DAMAGED, EVERY_CHUNK_WRITTEN, check_lengths, create_array,
                                      read_array)

TILES_PER_SHARD = 64
# LZ4 in blosc (a core zarr v3 codec): on H&E tiles 4 % larger than zstd level 1, 3-4x
# faster to compress and decompress, so the tiler's writer thread and the feature
# loader's readers need a fraction of the CPU (docs/benchmarks.md, "Tiling")
TILE_CODEC = BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle", typesize=1)
# TILE_CODEC's settings for numcodecs' blosc functions, which write_tile_shard calls
# directly: numcodecs.Blosc's bytes, less its per-call checks (uint8 tiles: the typesize is
# 1 without saying so, as numcodecs < 0.16 cannot). read_tiles decompresses with the same
# module; a chunk's header names its compressor, so any blosc tile store reads
_TILE_CNAME, _TILE_CLEVEL = TILE_CODEC.cname.value.encode(), TILE_CODEC.clevel
_TILE_SHUFFLE = {"noshuffle": blosc.NOSHUFFLE, "shuffle": blosc.SHUFFLE,
                 "bitshuffle": blosc.BITSHUFFLE}[TILE_CODEC.shuffle.value]
# zarr's default codecs for a numeric array (coords, tissue fractions), and the same zstd
# settings as numcodecs' codec, which compresses the one chunk create_tile_store writes
_SMALL_ARRAY_CODECS = (BytesCodec(), ZstdCodec(level=0, checksum=False))
_SMALL_ARRAY_ZSTD = Zstd(level=0, checksum=False)
_BLOSC_HEADER = 16  # version, versionlz, flags, typesize; uint32 nbytes, blocksize, cbytes
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
class TileShards:
    """Where and how `write_tile_shard` writes a new tile store's shards: the `tiles` array's
    folder (from `create_tile_store`), its number of tiles and the tiles per shard."""
    folder: Path
    n_tiles: int
    per_shard: int


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
    store = TileStore(path, group["tiles"], read_array(group["coords"]),
                      read_array(group["tissue_fraction"]), dict(group.attrs))
    check_lengths(path, {"tiles": store.tiles, "coords": store.coords,
                         "tissue_fraction": store.tissue_fraction},
                  store.attrs.get("n_tiles"), "n_tiles")
    return store


def create_tile_store(path: Path, n_tiles: int, tile_size: int, coords: np.ndarray,
                      tissue_fraction: np.ndarray, attrs: dict[str, Any]) -> TileShards:
    """Write the store's metadata, coords and tissue fractions; return its `tiles` array for
    `write_tile_shard` to fill, a whole shard per call, one writer per shard.

    The files are the ones `zarr.open_group(path, mode="w", attributes=...)` and
    `create_array` write (a test compares them): each node's zarr.json as zarr v3
    defines it, with the codecs' JSON from zarr's own codec classes. (From about
    16,000 tiles zarr would split `coords` into chunks; here it stays one chunk,
    read at once.) Writing them here takes about 1.5 ms alone and 6-11 ms in the
    tiler's writer thread beside two readers; through zarr's event loop it took
    10-17 ms alone and 36 ms beside them (docs/benchmarks.md).

    Call inside `medrobust.io.atomic.atomic_path`, with a `path` that does not exist
    yet, so a half-filled store never appears at its final path.
    """
    path = Path(path)
    path.mkdir(parents=True)
    _write_zarr_json(path, {"attributes": {**attrs, "n_tiles": int(n_tiles)},
                            "zarr_format": 3, "node_type": "group"})
    _write_small_array(path / "coords", np.asarray(coords, dtype="<i8").reshape(-1, 2))
    _write_small_array(path / "tissue_fraction", np.asarray(tissue_fraction, dtype="<f4"))
    tile = (tile_size, tile_size, 3)
    per_shard = min(n_tiles, TILES_PER_SHARD)
    # zarr cannot shard an empty array: an empty store's tiles are plain chunks
    codecs = [BytesCodec(endian=None), TILE_CODEC]
    if per_shard:
        codecs = [ShardingCodec(chunk_shape=(1, *tile), codecs=codecs,
                                index_codecs=[BytesCodec(), Crc32cCodec()],
                                index_location=ShardingCodecIndexLocation.end)]
    (path / "tiles").mkdir()
    _write_zarr_json(path / "tiles", _array_metadata((n_tiles, *tile), np.dtype(np.uint8),
                                                     (max(1, per_shard), *tile), codecs))
    return TileShards(path / "tiles", n_tiles, per_shard)


def _array_metadata(shape: tuple[int, ...], dtype: np.dtype, chunk_shape: tuple[int, ...],
                    codecs: Sequence) -> dict[str, Any]:
    """An array's zarr.json document (zarr v3): regular chunks, "c/"-prefixed keys, marked
    as every chunk written (`medrobust.io.zarr_chunks`)."""
    return {"shape": list(shape), "data_type": dtype.name,
            "chunk_grid": {"name": "regular",
                           "configuration": {"chunk_shape": list(chunk_shape)}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": dtype.type(0).item(), "codecs": [codec.to_dict() for codec in codecs],
            "attributes": {EVERY_CHUNK_WRITTEN: True}, "zarr_format": 3, "node_type": "array",
            "storage_transformers": []}


def _write_small_array(folder: Path, data: np.ndarray) -> None:
    """`data` (little-endian) as one chunk, compressed with zarr's default codecs for numbers."""
    folder.mkdir()
    _write_zarr_json(folder, _array_metadata(data.shape, data.dtype,
                                             (max(1, len(data)), *data.shape[1:]),
                                             _SMALL_ARRAY_CODECS))
    if len(data):
        chunk = folder.joinpath("c", *["0"] * data.ndim)
        chunk.parent.mkdir(parents=True)
        chunk.write_bytes(_SMALL_ARRAY_ZSTD.encode(np.ascontiguousarray(data)))


def _write_zarr_json(folder: Path, document: dict[str, Any]) -> None:
    (folder / "zarr.json").write_text(json.dumps(document, indent=2, default=json_default))


def write_tile_shard(tiles: TileShards, start: int, batch: np.ndarray) -> None:
    """Store `batch` as `tiles[start:start + len(batch)]`, one whole shard, as the shard file.

    The file is what zarr's sharding codec (index at the end) reads: each tile
    compressed alone, back to back, then the index of (offset, length) per chunk
    of the shard as little-endian uint64 and the index's crc32c. zarr's own
    `tiles[a:b] = batch` writes the same bytes, plus about 1 ms of per-chunk
    pipeline work per tile (docs/benchmarks.md). `tiles` is what `create_tile_store`
    returns; its metadata names the codecs this layout matches.
    """
    write_compressed_shard(tiles, start, compress_tiles(batch))


def compress_tiles(batch: np.ndarray) -> list[bytes]:
    """Each tile of `batch` compressed alone, as a tile store's chunk (outside the GIL)."""
    return [blosc.compress(np.ascontiguousarray(tile), _TILE_CNAME, _TILE_CLEVEL, _TILE_SHUFFLE)
            for tile in batch]


def write_compressed_shard(tiles: TileShards, start: int, chunks: Sequence[bytes]) -> None:
    """`write_tile_shard` of tiles already compressed by `compress_tiles` (a tiler compresses
    each part of a shard as soon as it is read)."""
    per_shard = tiles.per_shard
    if not per_shard or start % per_shard \
            or not 0 < len(chunks) <= min(per_shard, tiles.n_tiles - start):
        raise ValueError(f"tiles {start}:{start + len(chunks)} are not one whole shard of "
                         f"{per_shard} tiles in an array of {tiles.n_tiles}")
    index = np.full((per_shard, 2), _NO_CHUNK, dtype="<u8")
    index[:len(chunks), 1] = [len(chunk) for chunk in chunks]
    index[:len(chunks), 0] = np.cumsum(index[:len(chunks), 1]) - index[:len(chunks), 1]
    index_bytes = index.tobytes()
    # the default chunk key encoding of create_tile_store's metadata: c/{shard}/0/0/0
    path = tiles.folder.joinpath("c", str(start // per_shard), "0", "0", "0")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        file.writelines(chunks)
        file.write(index_bytes)
        file.write(google_crc32c.value(index_bytes).to_bytes(4, "little"))


def _shard_folder(tiles: zarr.Array) -> Path | None:
    """Where a tile array's shard files lie, if it has `create_tile_store`'s layout (one
    tile per chunk, blosc, index at the end with its crc32c, in a local store); else None."""
    codecs = tiles.metadata.codecs
    if not (isinstance(tiles.store_path.store, LocalStore) and len(codecs) == 1
            and isinstance(codecs[0], ShardingCodec)):
        return None
    sharding = codecs[0]
    whole_tiles = tiles.chunks[1:] == tiles.shape[1:] == tiles.shards[1:]
    if (sharding.index_location != ShardingCodecIndexLocation.end or tiles.chunks[0] != 1
            or not whole_tiles or tiles.dtype != np.uint8
            or [type(codec) for codec in sharding.codecs] != [BytesCodec, BloscCodec]
            or [type(codec) for codec in sharding.index_codecs] != [BytesCodec, Crc32cCodec]):
        return None
    return Path(tiles.store_path.store.root) / tiles.store_path.path


def read_tiles(tiles: zarr.Array | np.ndarray, positions: Sequence[int] | np.ndarray,
               out: np.ndarray | None = None) -> np.ndarray:
    """`tiles[positions]`, `(k, T, T, 3)` uint8 in the order given, into `out` if given.

    A tile store's shards are read as files: one read of the index and one of the
    bytes the wanted tiles span per shard, each tile decompressed straight into
    `out` (numcodecs' blosc, outside the GIL, so reader threads scale; the chunks'
    headers are checked for the whole shard at once, so little Python runs per
    tile). zarr's own read costs about 0.8 ms of per-chunk pipeline work per tile,
    5x the decompression (docs/benchmarks.md, "Features"). Any other array (numpy,
    another layout) is read by indexing.
    """
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    shape = (len(positions), *tiles.shape[1:])
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    elif out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous uint8 {shape}, not {out.dtype} {out.shape}")
    if len(positions) and (positions.min() < 0 or positions.max() >= tiles.shape[0]):
        raise IndexError(f"tile positions must lie in 0..{tiles.shape[0] - 1}")
    folder = _shard_folder(tiles) if isinstance(tiles, zarr.Array) else None
    if folder is None:
        out[...] = tiles.oindex[positions] if isinstance(tiles, zarr.Array) else tiles[positions]
        return out
    per_shard = tiles.shards[0]
    shards = positions // per_shard
    # an absent tile is zarr's fill value, unless every tile was written (create_tile_store)
    fill_value = None if tiles.attrs.get(EVERY_CHUNK_WRITTEN) else tiles.fill_value
    for shard in np.unique(shards):
        rows = np.flatnonzero(shards == shard)
        path = folder / tiles.metadata.encode_chunk_key((int(shard), 0, 0, 0))
        _read_shard(path, per_shard, positions[rows] % per_shard, rows, out, fill_value)
    return out


def _read_shard(path: Path, per_shard: int, within: np.ndarray, rows: np.ndarray,
                out: np.ndarray, fill_value: int | None) -> None:
    """Decompress the shard file's tiles `within` into `out[rows]`; an absent shard or
    tile is `fill_value`, or damage where that is None."""
    try:
        file = open(path, "rb")
    except FileNotFoundError:  # zarr's meaning of a shard never written: the fill value
        if fill_value is None:
            raise InputError(f"{path}: tile shard missing; {DAMAGED}") from None
        out[rows] = fill_value
        return
    index_size = per_shard * 16 + 4
    with file:
        size = os.fstat(file.fileno()).st_size
        raw = read_at(file.fileno(), index_size, size - index_size) if size >= index_size else b""
        if (len(raw) != index_size or google_crc32c.value(raw[:-4])
                != int.from_bytes(raw[-4:], "little")):
            raise InputError(f"{path}: damaged tile shard (its index fails its checksum)")
        index = np.frombuffer(raw, dtype="<u8", count=per_shard * 2).reshape(per_shard, 2)[within]
        stored = index[:, 0] != _NO_CHUNK
        if fill_value is None and not stored.all():
            raise InputError(f"{path}: damaged tile shard (its tile "
                             f"{int(within[np.argmin(stored)])} is not stored)")
        # inside the file's bytes before its index: so offset + length neither wraps past
        # 2**64 nor reaches 2**63 (the chunks' starts below are int64)
        offsets, lengths, limit = index[stored, 0], index[stored, 1], size - index_size
        if (offsets > limit).any() or (lengths > limit - offsets).any():
            raise InputError(f"{path}: damaged tile shard (its index points outside the file)")
        first = int(offsets.min()) if len(offsets) else 0
        end = int((offsets + lengths).max()) if len(offsets) else 0
        data = memoryview(read_at(file.fileno(), end - first, first))
    if len(data) != end - first:
        raise InputError(f"{path}: damaged tile shard (shorter than its index says)")
    starts = np.where(stored, index[:, 0] - first, 0).astype(np.int64)
    try:
        _check_blosc_headers(data, starts[stored], lengths.astype(np.int64), out[0].nbytes)
        for row, start, length, present in zip(rows.tolist(), starts.tolist(),
                                               index[:, 1].tolist(), stored.tolist()):
            if present:
                blosc.decompress(data[start:start + length], out[row])
            else:
                out[row] = fill_value
    except (RuntimeError, ValueError) as error:
        raise InputError(f"{path}: damaged tile shard (a tile does not decompress: "
                         f"{error})") from error


def _check_blosc_headers(data: memoryview, starts: np.ndarray, lengths: np.ndarray,
                         tile_bytes: int) -> None:
    """ValueError unless each chunk's blosc header (at `starts` in `data`) states the chunk's
    own length (`lengths`) and one tile's bytes.

    c-blosc trusts the header's compressed size: a damaged one made it read past
    the chunk and crash the process, and a short decoded size would leave part of
    the tile unwritten.
    """
    short = lengths < _BLOSC_HEADER
    if short.any():
        raise ValueError(f"{lengths[short][0]} bytes, shorter than a blosc header")
    headers = np.frombuffer(data, np.uint8)[starts[:, None] + np.arange(_BLOSC_HEADER)]
    fields = headers.view("<u4")  # version bytes, decoded size, block size, stored size
    bad = np.flatnonzero((fields[:, 3] != lengths) | (fields[:, 1] != tile_bytes))
    if len(bad):
        decoded, stored, length = fields[bad[0], 1], fields[bad[0], 3], lengths[bad[0]]
        raise ValueError(f"the blosc header says {stored} bytes stored and {decoded} decoded, "
                         f"not {length} and {tile_bytes}")


def open_feature_store(path: str | os.PathLike) -> FeatureStore:
    path = Path(path)
    group = _open_group(path, ("features", "coords"))
    store = FeatureStore(path, read_array(group["features"]).astype(np.float32, copy=False),
                         read_array(group["coords"]), dict(group.attrs))
    check_lengths(path, {"features": store.features, "coords": store.coords},
                  store.attrs.get("n_tiles"), "n_tiles")
    return store


def write_feature_store(path: Path, features: np.ndarray, coords: np.ndarray,
                        attrs: dict[str, Any]) -> None:
    """Write a slide's features; call inside `atomic_path`."""
    group = zarr.open_group(path, mode="w")
    features = np.asarray(features, dtype=np.float32)
    rows = max(1, min(len(features), 4096))
    create_array(group, "features", data=features, chunks=(rows, features.shape[1]))
    create_array(group, "coords", data=np.asarray(coords, dtype=np.int64).reshape(-1, 2))
    group.attrs.update({**attrs, "dim": int(features.shape[1]), "n_tiles": len(features)})
