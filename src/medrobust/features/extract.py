"""Embed one slide's tiles into a feature store (docs/architecture.md, "Feature store").

The tiles stream from the Zarr tile store in batches that reader threads
fetch ahead of the model (`TileBatches`), so decompression overlaps the
forward pass; on CUDA each batch is decompressed into pinned memory and
copied on a side stream while the batch before it runs, the model runs
channels-last under autocast (`features.precision`), and the features stay on
the device until the slide is done, so no per-batch copy back stalls the queue.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from medrobust.config import config_from_mapping
from medrobust.errors import ConfigError, InputError
from medrobust.features.backbones import Backbone, build_backbone
from medrobust.io.atomic import atomic_path
from medrobust.io.slide_stores import (TILES_PER_SHARD, TileStore, open_tile_store, read_tiles,
                                       write_feature_store)
from medrobust.logs import get_logger
from medrobust.progress import progress

log = get_logger(__name__)
COPIED_ATTRS = ("slide_id", "label", "split")
# features.precision: auto = bf16 under CUDA autocast (tensor cores, fp32's range), fp32 on CPU
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("auto", *AUTOCAST_DTYPES)


@dataclass(frozen=True)
class FeatureConfig:
    backbone: str = "resnet18"
    weights: str = "random"    # random | imagenet | the path of a weights file
    batch_size: int = 64
    seed: int = 0              # initialises `weights: random`
    precision: str = "auto"
    loader_workers: int = 1    # threads reading batches ahead; 0 reads in the model's thread
    prefetch_batches: int = 2  # batches read ahead of the model
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)  # timm.create_model's
    normalization: Mapping[str, Any] | None = None  # {mean, std}: replaces the weights' own

    def __post_init__(self):
        for key, low in (("batch_size", 1), ("loader_workers", 0), ("prefetch_batches", 1)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"features.{key} must be an integer >= {low}, not {value!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"features.precision must be one of {', '.join(PRECISIONS)}, "
                              f"not {self.precision!r}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "FeatureConfig":
        return config_from_mapping(cls, mapping, "features")


def backbone_for(config: FeatureConfig) -> Backbone:
    """The backbone a features config names, with its weights, seed and options."""
    return build_backbone(config.backbone, config.weights, config.seed,
                          model_kwargs=config.model_kwargs, normalization=config.normalization)


def extract_slide_features(tile_store_path: str | os.PathLike, out_path: str | os.PathLike,
                           config: FeatureConfig, device: torch.device | str = "cpu",
                           backbone: Backbone | None = None) -> Path:
    """Embed every tile of a tile store and write the slide's feature store atomically.

    `backbone`: `backbone_for(config)` already built, for a job that embeds several slides
    (building it and hashing its weights cost more than a small slide's forward passes).
    """
    store = open_tile_store(tile_store_path)
    attrs = _slide_attrs(store)
    backbone = backbone or backbone_for(config)
    features = embed_tiles(store, backbone, config.batch_size, torch.device(device),
                           precision=config.precision, workers=config.loader_workers,
                           prefetch=config.prefetch_batches)
    attrs.update(backbone=backbone.name, weights=backbone.weights,
                 weights_sha256=backbone.weights_sha256,
                 precision=resolved_precision(config.precision, device))
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


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `features.precision` on `device`; None runs in fp32."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return AUTOCAST_DTYPES[precision]


def resolved_precision(precision: str, device: torch.device | str) -> str:
    """What `features.precision` means on `device`, by name (fp32, bf16, fp16): stored with
    the features, so a later job that embeds tiles again (tile perturbations, the tile
    attack) can embed them alike or say that it cannot."""
    dtype = autocast_dtype(precision, torch.device(device))
    return next(name for name, value in AUTOCAST_DTYPES.items() if value is dtype)


class TileBatches:
    """uint8 tile batches `(n, T, T, 3)` of an array (Zarr or numpy), read ahead in threads.

    Each batch is read in up to `workers` parts at once, one per thread, and up to
    `prefetch` batches are in flight ahead of the consumer, in order. Parts rather
    than a batch per thread: the model waits for the first batch, and one thread
    reading 256 tiles of 224 px took 30-45 ms, a tenth of the forward passes of an
    8,192-tile slide on an H200. A part holds whole shards' worth of tiles:
    smaller parts re-read shard indexes and cost the readers a seventh of their
    rate (docs/benchmarks.md, "On a GPU"). `read_tiles` decompresses outside the GIL,
    so the reads overlap the model's forward pass.
    `pin` puts each batch in page-locked memory, ready for a non-blocking copy to a GPU.
    """

    def __init__(self, tiles, batch_size: int, workers: int = 1, prefetch: int = 2,
                 pin: bool = False):
        self.tiles, self.batch_size, self.pin = tiles, batch_size, pin
        self.workers, self.prefetch = workers, max(prefetch, 1)
        self.n = int(tiles.shape[0])
        self.starts = range(0, self.n, batch_size)

    def __len__(self) -> int:
        return len(self.starts)

    def _empty(self, start: int) -> torch.Tensor:
        # decompressed straight into (pinned) memory: no copy between read and transfer
        stop = min(start + self.batch_size, self.n)
        return torch.empty((stop - start, *self.tiles.shape[1:]), dtype=torch.uint8,
                           pin_memory=self.pin)

    def _parts(self, start: int, batch: torch.Tensor) -> list[tuple[range, np.ndarray]]:
        """The batch's tile positions in parts, each with its rows of `batch`."""
        rows = batch.numpy()
        share = -(-len(batch) // max(self.workers, 1))
        # a multiple of a shard: the parts align with shards when the batches do
        size = -(-share // TILES_PER_SHARD) * TILES_PER_SHARD
        return [(range(start + first, start + min(first + size, len(batch))),
                 rows[first:first + size]) for first in range(0, len(batch), size)]

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        if self.workers == 0:
            for start in self.starts:
                batch = self._empty(start)
                read_tiles(self.tiles, range(start, start + len(batch)), out=batch.numpy())
                yield start, batch
            return
        with ThreadPoolExecutor(self.workers, thread_name_prefix="tile-reader") as pool:
            pending: deque = deque()

            def handed_out():
                start, batch, reads = pending.popleft()
                for read in reads:
                    read.result()
                return start, batch

            try:
                for start in self.starts:
                    batch = self._empty(start)
                    pending.append((start, batch, [
                        pool.submit(read_tiles, self.tiles, positions, rows)
                        for positions, rows in self._parts(start, batch)]))
                    if len(pending) > self.prefetch:
                        yield handed_out()
                while pending:
                    yield handed_out()
            finally:  # a consumer that stops early leaves no reads running
                for _, _, reads in pending:
                    for read in reads:
                        read.cancel()


def prepare_model(backbone: Backbone, device: torch.device) -> torch.nn.Module:
    """The backbone's module on `device`, channels-last (what cuDNN and oneDNN run fastest;
    uint8 NHWC tiles permuted to NCHW already have that layout)."""
    return backbone.model.to(device, memory_format=torch.channels_last)


def _forward(model: torch.nn.Module, batch: torch.Tensor, device: torch.device,
             dtype: torch.dtype | None) -> torch.Tensor:
    # move uint8 (4x smaller than float) and scale on the device
    images = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype is not None
                else contextlib.nullcontext())
    with autocast:
        return model(images).float()


def _to_device(batch: torch.Tensor, device: torch.device,
               copies: torch.cuda.Stream | None) -> torch.Tensor:
    """The batch on `device`. On CUDA it is copied on the side stream `copies`, so the copy
    of the next batch runs while this one's forward pass does (on the compute stream
    the copy would wait for the forward pass and the next forward pass for the copy)."""
    if copies is None:
        return batch.to(device)
    with torch.cuda.stream(copies):
        moved = batch.to(device, non_blocking=True)
    compute = torch.cuda.current_stream(device)
    compute.wait_stream(copies)
    moved.record_stream(compute)  # allocated on `copies`, used on `compute`
    return moved


def embed_batch(backbone: Backbone, tiles: np.ndarray | torch.Tensor,
                device: torch.device | str = "cpu", precision: str = "auto") -> np.ndarray:
    """Features `(n, dim)` float32 of an in-memory uint8 batch `(n, T, T, 3)` (e.g. tiles
    perturbed before re-embedding), as `embed_tiles` computes them."""
    device = torch.device(device)
    model = prepare_model(backbone, device)
    batch = torch.as_tensor(np.asarray(tiles) if not torch.is_tensor(tiles) else tiles)
    with torch.inference_mode():
        return _forward(model, batch, device, autocast_dtype(precision, device)).cpu().numpy()


def embed_tiles(store: TileStore, backbone: Backbone, batch_size: int,
                device: torch.device, *, precision: str = "auto", workers: int = 1,
                prefetch: int = 2) -> np.ndarray:
    """Features `(n_tiles, dim)` float32 of a tile store, its batches read ahead of the model."""
    model = prepare_model(backbone, device)
    dtype = autocast_dtype(precision, device)
    batches = TileBatches(store.tiles, batch_size, workers, prefetch, pin=device.type == "cuda")
    # filled on the device: copying each batch back would wait for its forward pass
    features = torch.empty((len(store), backbone.dim), dtype=torch.float32, device=device)
    copies = torch.cuda.Stream(device) if device.type == "cuda" else None
    with torch.inference_mode():
        for start, batch in progress(batches, desc=f"embed {store.path.name}", unit="batch"):
            out = _forward(model, _to_device(batch, device, copies), device, dtype)
            if out.shape[1] != backbone.dim:
                raise ConfigError(f"backbone {backbone.name} gives {out.shape[1]} features "
                                  f"per tile, not the {backbone.dim} it declares")
            features[start:start + len(batch)] = out
    return features.cpu().numpy()
