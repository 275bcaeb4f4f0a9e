"""One feature job for a group of slides (`datasets.<name>.slides_per_job`, `medrobust.slide_groups`)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import torch

from medrobust.config import FEATURE_LOADER_KEYS
from medrobust.features.extract import FeatureConfig, backbone_for, extract_slide_features
from medrobust.io.slide_stores import open_tile_store
from medrobust.logs import get_logger
from medrobust.progress import progress
from medrobust.slide_groups import GroupWork

log = get_logger(__name__)


def extract_group_features(tile_stores: Sequence[str | os.PathLike], group_dir: str | os.PathLike,
                           config: FeatureConfig, device: torch.device | str = "cpu", *,
                           code: str) -> None:
    """Each tile store's feature store in `group_dir`, under the tile store's name
    (`{slide_id}.zarr`), as `extract_slide_features` writes it for a slide's own job,
    with one backbone built for all of them.

    Slides a failed run with the same settings (the loader's speed settings aside) and
    `code` (the workflow's fingerprint) embedded from the same tile store (same metadata,
    same write time) are kept, not embedded again (`medrobust.slide_groups.GroupWork`).
    """
    settings = {key: value for key, value in dataclasses.asdict(config).items()
                if key not in FEATURE_LOADER_KEYS}
    if Path(config.weights).is_file():  # a weights file replaced under the same name
        stat = Path(config.weights).stat()
        settings["weights_file"] = [stat.st_size, stat.st_mtime_ns]
    work = GroupWork(group_dir, {"features": settings, "device": torch.device(device).type,
                                 "code": code})
    if work.finished:
        log.info("%s: %d slides finished by a failed run are kept", group_dir, work.finished)
    backbone = None  # built for the first slide that needs it
    for tile_store in progress(tile_stores, desc=f"features {work.group_dir.name}", unit="slide"):
        name = Path(tile_store).name
        tiles = {"attrs": open_tile_store(tile_store).attrs,
                 "written_ns": (Path(tile_store) / "zarr.json").stat().st_mtime_ns}
        if work.kept(name, tiles, outputs=[name]):
            continue
        backbone = backbone or backbone_for(config)
        extract_slide_features(tile_store, work.folder / name, config, device, backbone=backbone)
        work.mark_done(name, tiles)
    work.complete({Path(tile_store).name for tile_store in tile_stores})
