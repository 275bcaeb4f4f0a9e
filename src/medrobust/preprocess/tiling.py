"""One whole-slide image to a tile store (docs/architecture.md, "Tile store").

The slide is cut into a grid of whole tiles of `tile_size` pixels at
`target_mpp`; a tile is kept when the thumbnail's tissue mask covers at least
`tissue_threshold` of it. Tiles are read one at a time from the pyramid level
closest to (and not coarser than) the target resolution, a row of neighbouring
tiles per read, and resized when that level does not match exactly, so the
slide is never held in memory; dask's threaded scheduler reads parts of shards
in parallel while another thread creates the store, draws and encodes the QC
picture when one is asked for (`qc_path`), compresses each part as soon as it
is read and writes each finished shard, each tile its own chunk.

A slide that cannot be opened or read, states an impossible resolution, or
has no tissue tile is bad input: under `on_bad_input: fail` an InputError
names the file and the problem; under `skip` the slide is left out, which
writes an empty store (`n_tiles` 0) whose `rejected` attr holds the record
`{sample_id, path, reason}` that image stores keep for their left-out images.
Tiling runs one job per slide, so the job still completes its outputs and the
slides after it (features, training, evaluation, report) see which slides
are missing and why; a half-read slide's store is never left behind.

A workflow job also gets its QC picture (`qc_path`, preprocess/qc.py): the
thumbnail the tissue mask came from, the mask's outline and the kept tiles.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import dask
import numpy as np
from PIL import Image

from medrobust.errors import ON_BAD_INPUT, ConfigError, InputError, check_choice
from medrobust.io.atomic import atomic_path
from medrobust.io.checksums import sha256_file
from medrobust.io.slide_stores import (TILES_PER_SHARD, compress_tiles, create_tile_store,
                                       write_compressed_shard)
from medrobust.io.slides import Slide, open_slide
from medrobust.logs import get_logger
from medrobust.progress import progress
from medrobust.config import config_from_mapping
from medrobust.preprocess import positive_number
from medrobust.preprocess.qc import left_out_picture, png_bytes, qc_picture, save_png
from medrobust.preprocess.tissue import tissue_mask

log = get_logger(__name__)
# A mask source coarser than `mask_pixels_per_tile` asks is taken down to this share of
# its pixels per tile side (3 of 4): a pyramid level that close spares decoding a finer one
COARSEST_MASK_SHARE = 0.75
_PART = TILES_PER_SHARD // 4   # tiles per dask task: a quarter of a shard
_RUN_PIXELS = 4096         # widest region read at once, in pixels at the read level


@dataclass(frozen=True)
class TilingConfig:
    target_mpp: float
    tile_size: int
    tissue_threshold: float
    fallback_mpp: float | None = None   # for slides that state no mpp
    # tissue-mask pixels per tile side: 4, about CLAM's and hs2p's; 8 moves fewer tiles at
    # the tissue's edge but costs 9-15x the CPU on a 50,000^2 slide (docs/benchmarks.md)
    mask_pixels_per_tile: int = 4

    def __post_init__(self) -> None:
        positive_number(self.target_mpp, "tiling.target_mpp")
        positive_number(self.tile_size, "tiling.tile_size", integer=True)
        positive_number(self.mask_pixels_per_tile, "tiling.mask_pixels_per_tile", integer=True)
        if self.fallback_mpp is not None:
            positive_number(self.fallback_mpp, "tiling.fallback_mpp")
        threshold = self.tissue_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or not 0 <= threshold <= 1:
            raise ConfigError(f"tiling.tissue_threshold must be a number in [0, 1], "
                              f"not {threshold!r}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "TilingConfig":
        return config_from_mapping(cls, mapping, "tiling")


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one slide lie and how they are read."""

    coords: np.ndarray          # (n, 2) level-0 (x, y) of every whole tile, row by row
    tile_size_level0: int
    level: int
    level_downsample: float
    read_size: int              # pixels read at `level` for one tile


def plan_grid(slide: Slide, config: TilingConfig) -> TileGrid:
    downsample = config.target_mpp / slide.mpp
    if downsample < 1:
        log.warning("%s: target_mpp %g is finer than the slide's %g; tiles are upsampled",
                    slide.path, config.target_mpp, slide.mpp)
    tile_size_level0 = max(1, round(config.tile_size * downsample))
    level = slide.best_level(downsample)
    level_downsample = float(slide.level_downsamples[level])
    width, height = slide.dimensions
    xs = np.arange(0, width - tile_size_level0 + 1, tile_size_level0, dtype=np.int64)
    ys = np.arange(0, height - tile_size_level0 + 1, tile_size_level0, dtype=np.int64)
    coords = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
    return TileGrid(coords, tile_size_level0, level, level_downsample,
                    read_size=max(1, round(tile_size_level0 / level_downsample)))


def tissue_map(slide: Slide, grid: TileGrid,
               pixels_per_tile: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The thumbnail the tissue is found on (about `pixels_per_tile` per tile side, from the
    cheapest source that gives at least COARSEST_MASK_SHARE of that), its tissue mask, and
    its downsample."""
    wanted = grid.tile_size_level0 / pixels_per_tile
    thumbnail, downsample = slide.thumbnail(wanted, wanted / COARSEST_MASK_SHARE)
    return thumbnail, tissue_mask(thumbnail), downsample


def mask_fractions(mask: np.ndarray, downsample: float, grid: TileGrid) -> np.ndarray:
    """Fraction of each grid tile that a tissue mask (`downsample` times level 0) covers."""
    if not len(grid.coords):
        return np.zeros(0, np.float32)
    height, width = mask.shape
    # a summed-area table gives every tile's mask sum in O(1)
    table = np.pad(mask.cumsum(axis=0).cumsum(axis=1), ((1, 0), (1, 0)))
    start = np.floor(grid.coords / downsample).astype(np.int64)
    stop = np.ceil((grid.coords + grid.tile_size_level0) / downsample).astype(np.int64)
    x0, y0 = np.minimum(start[:, 0], width - 1), np.minimum(start[:, 1], height - 1)
    x1 = np.clip(stop[:, 0], x0 + 1, width)
    y1 = np.clip(stop[:, 1], y0 + 1, height)
    covered = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    return (covered / ((y1 - y0) * (x1 - x0))).astype(np.float32)


def tissue_fractions(slide: Slide, grid: TileGrid, pixels_per_tile: int) -> np.ndarray:
    """Fraction of each grid tile that the thumbnail's tissue mask covers."""
    _, mask, downsample = tissue_map(slide, grid, pixels_per_tile)
    return mask_fractions(mask, downsample, grid)


def tile_slide(slide_path: str | os.PathLike, out_path: str | os.PathLike, config: TilingConfig,
               slide_id: str, label: str, split: str, source_sha256: str | None = None,
               workers: int = 1, qc_path: str | os.PathLike | None = None,
               on_bad_input: str = "fail") -> int:
    """Write the slide's tile store at `out_path` (atomically); return the number of tiles.

    `label` is the slide's class name; `source_sha256` is the manifest's
    checksum of the slide file, computed (streamed) when not given. A bad
    slide raises InputError, or under `on_bad_input` "skip" gets an empty
    store with the reason (0 tiles). `qc_path`, if given, gets the QC picture
    (a card with the reason for a slide that could not be read).
    """
    check_choice("on_bad_input", on_bad_input, ON_BAD_INPUT)
    out_path = Path(out_path)
    png = None  # the QC picture's PNG bytes, once encoded
    try:
        with open_slide(slide_path, config.fallback_mpp) as slide:
            grid = plan_grid(slide, config)
            thumbnail, mask, mask_downsample = tissue_map(slide, grid,
                                                          config.mask_pixels_per_tile)
            fractions = mask_fractions(mask, mask_downsample, grid)
            keep = fractions >= config.tissue_threshold
            coords, fractions = grid.coords[keep], fractions[keep]

            def qc_png() -> bytes:
                return png_bytes(qc_picture(thumbnail, mask, coords / mask_downsample,
                                            grid.tile_size_level0 / mask_downsample))

            if len(coords) == 0:
                # only `skip` keeps the picture: `fail` raises before anything is saved
                if qc_path is not None and on_bad_input == "skip":
                    png = qc_png()
                if len(grid.coords) == 0:  # no threshold can help
                    width, height = slide.dimensions
                    raise InputError(
                        f"{slide_path}: no tissue: the slide ({width} x {height} px at "
                        f"{slide.mpp:g} µm/px) is smaller than one {config.tile_size}-px tile "
                        f"at {config.target_mpp:g} µm/px ({grid.tile_size_level0} px of it)")
                raise InputError(f"{slide_path}: no tissue: no tile has tissue_fraction >= "
                                 f"{config.tissue_threshold:g} among {len(grid.coords)} grid "
                                 "tiles (lower tiling.tissue_threshold if the QC picture shows "
                                 "tissue)")
            attrs = {
                **_store_attrs(config, slide_path, slide_id, label, split, rejected=[]),
                "tile_size_level0": grid.tile_size_level0, "level": grid.level,
                "level_downsample": grid.level_downsample, "slide_mpp": slide.mpp,
                "source_sha256": source_sha256 or sha256_file(slide_path),
            }
            with atomic_path(out_path) as tmp, \
                    ThreadPoolExecutor(1, thread_name_prefix="tile-writer") as writer:
                # the writer thread makes the store, then draws and encodes the QC picture
                # (if asked for) while the tiles are read: about 12 ms of work on the CMU
                # slide that would otherwise come before or after the reads
                tiles = writer.submit(create_tile_store, tmp, len(coords), config.tile_size,
                                      coords, fractions, attrs)
                encoded = writer.submit(qc_png) if qc_path is not None else None
                try:
                    _read_tiles(slide, grid, coords, tiles, writer, config.tile_size, workers,
                                slide_id)
                finally:
                    png = encoded.result() if encoded is not None else None
    except InputError as error:
        if on_bad_input == "fail":
            raise InputError(f"{error} (set on_bad_input: skip to leave the slide out)") \
                from error
        _write_left_out(out_path, config, slide_path, slide_id, label, split, str(error))
        coords = ()
        if qc_path is not None and png is None:  # not even a thumbnail could be read
            png = png_bytes(left_out_picture(str(error)))
    else:
        log.info("%s: kept %d of %d tiles -> %s", slide_path, len(coords), len(grid.coords),
                 out_path)
    if qc_path is not None:
        save_png(png, qc_path)
    return len(coords)


def _store_attrs(config: TilingConfig, slide_path: str | os.PathLike, slide_id: str, label: str,
                 split: str, rejected: list[dict[str, str]]) -> dict:
    """The attrs every tile store has, whether the slide was tiled or left out."""
    return {"slide_id": slide_id, "label": label, "split": split,
            "tile_size": config.tile_size, "target_mpp": config.target_mpp,
            "source_path": str(slide_path), "tissue_threshold": config.tissue_threshold,
            "rejected": rejected}


def _write_left_out(out_path: Path, config: TilingConfig, slide_path: str | os.PathLike,
                    slide_id: str, label: str, split: str, reason: str) -> None:
    """The empty store of a slide left out under `on_bad_input: skip`, with the reason."""
    log.warning("left out slide %s: %s", slide_id, reason)
    attrs = _store_attrs(config, slide_path, slide_id, label, split, rejected=[
        {"sample_id": slide_id, "path": str(slide_path), "reason": reason}])
    with atomic_path(out_path) as tmp:
        create_tile_store(tmp, 0, config.tile_size, np.zeros((0, 2)), np.zeros(0), attrs)


def _read_tiles(slide: Slide, grid: TileGrid, coords: np.ndarray, tiles: Future,
                writer: ThreadPoolExecutor, tile_size: int, workers: int, slide_id: str) -> None:
    """Read, resize and store every tile, a whole shard per write (docs/benchmarks.md, "Tiling").

    `workers` threads read parts of shards (dask); the one `writer` thread,
    after making the store (`tiles`, its future), compresses each part as soon
    as it is read and writes a shard's file once all its parts are compressed,
    so compression overlaps the reads, even on a slide of one shard. A part is
    a quarter shard, so a slide of a few shards still keeps every worker
    reading. There is one dask task per worker, each reading the next unread
    part until none is left: parts taken in order read the slide front to back,
    and dask's scheduler, at about 0.3 ms of the GIL per task, is not paid per
    part. Neighbouring tiles of a grid row are read in one region and cut
    apart: fewer OpenSlide calls and less per-tile Python.

    A failed read stops the parts not yet started and is raised only once every
    task has returned: dask raises at the first failure while other tasks are
    still inside OpenSlide, and the caller's closing the slide under them made
    OpenSlide abort the whole process (`tc->outstanding == 0`), skip or not.
    """
    read_size = grid.read_size
    longest_run = max(1, _RUN_PIXELS // read_size)
    bar = progress(total=len(coords), desc=f"tile {slide_id}", unit="tile")
    next_part = threading.Lock()
    parts = iter(range(0, len(coords), _PART))
    # at most this many read parts wait for the writer, so memory stays bounded
    waiting = threading.BoundedSemaphore(2 * max(1, workers) + 2)
    compressed: dict[int, list] = {}  # shard start -> its chunks; the writer thread's alone
    failed = threading.Event()

    def compress(start: int, batch: np.ndarray) -> None:
        try:
            shard = start - start % TILES_PER_SHARD
            size = min(TILES_PER_SHARD, len(coords) - shard)
            chunks = compressed.setdefault(shard, [None] * size)
            chunks[start - shard:start - shard + len(batch)] = compress_tiles(batch)
            if all(chunk is not None for chunk in chunks):
                write_compressed_shard(tiles.result(), shard, compressed.pop(shard))
        finally:
            waiting.release()
        bar.update(len(batch))

    def read_parts() -> tuple[list[Future], BaseException | None]:
        """One worker's task: its parts' writes, and the error that stopped it if any."""
        written: list[Future] = []
        while not failed.is_set():  # else another part failed: the slide is left, not read on
            with next_part:
                start = next(parts, None)
            if start is None:
                break
            try:
                future = read_and_submit(start)
            except BaseException as error:  # handed back, so dask waits for the other parts
                failed.set()
                return written, error
            if future is None:
                break
            written.append(future)
        return written, None

    def read_and_submit(start: int) -> Future | None:
        stop = min(start + _PART, len(coords))
        batch = np.empty((stop - start, tile_size, tile_size, 3), np.uint8)
        for first, count in _row_runs(coords[start:stop], grid.tile_size_level0, longest_run):
            if failed.is_set():
                return None
            xs = coords[start + first:start + first + count, 0].tolist()
            y = int(coords[start + first, 1])
            # each tile's offset in the region, rounded as a read of that tile alone would be
            # (Python's round, like numpy's rint, rounds halves to even; on a run of a few
            # tiles it costs a fraction of numpy's per-call overhead)
            offsets = [round((x - xs[0]) / grid.level_downsample) for x in xs]
            region = slide.read_rgb((xs[0], y), grid.level, (offsets[-1] + read_size, read_size))
            for index, left in enumerate(offsets, start=first):
                tile = region[:, left:left + read_size]
                if read_size != tile_size:
                    tile = np.asarray(Image.fromarray(tile).resize(
                        (tile_size, tile_size), Image.Resampling.LANCZOS))
                batch[index] = tile
        waiting.acquire()
        return writer.submit(compress, start, batch)

    with bar:
        tasks = [dask.delayed(read_parts)()
                 for _ in range(max(1, min(workers, -(-len(coords) // _PART))))]
        # num_workers stays `workers` whatever the slide's size: dask keeps one thread pool
        # per num_workers for the life of the process, which tiles a group's slides in turn
        results = dask.compute(*tasks, scheduler="threads", num_workers=max(1, workers))
        for _, error in results:
            if error is not None:
                raise error
        for written, _ in results:
            for future in written:
                future.result()  # a failed compression or write raises here


def _row_runs(coords: np.ndarray, step: int, longest: int) -> list[tuple[int, int]]:
    """(first index, length) of each run of adjacent tiles in one grid row, at most `longest`."""
    runs: list[tuple[int, int]] = []
    for index in range(len(coords)):
        if runs and runs[-1][1] < longest \
                and coords[index, 1] == coords[index - 1, 1] \
                and coords[index, 0] - coords[index - 1, 0] == step:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((index, 1))
    return runs
