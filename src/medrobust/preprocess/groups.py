"""One tiling job for a group of slides (`datasets.<name>.slides_per_job`, `medrobust.slide_groups`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from medrobust.logs import get_logger
from medrobust.preprocess.tiling import TilingConfig, tile_slide
from medrobust.progress import progress

log = get_logger(__name__)


def tile_slide_group(dataset_folder: str | os.PathLike, group_dir: str | os.PathLike,
                     slides: Sequence[Mapping[str, str]], config: TilingConfig,
                     workers: int = 1, on_bad_input: str = "fail") -> dict[str, int]:
    """Tile each slide (its manifest row plus `slide_id`) into `group_dir`, one after another:
    `{slide_id}.zarr` and `{slide_id}.qc.png`, as `tile_slide` writes them for a slide's own job.

    A bad slide is handled by `tile_slide` alone: under "skip" it gets its empty store with
    the reason and the next slide is tiled; under "fail" its InputError, naming the file,
    stops the group. Returns the number of tiles per slide.
    """
    group_dir = Path(group_dir)
    group_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for slide in progress(slides, desc=f"tiling {group_dir.name}", unit="slide"):
        slide_id = slide["slide_id"]
        counts[slide_id] = tile_slide(
            Path(dataset_folder) / slide["path"], group_dir / f"{slide_id}.zarr", config,
            slide_id=slide_id, label=slide["label"], split=slide["split"],
            source_sha256=slide["sha256"], workers=workers,
            qc_path=group_dir / f"{slide_id}.qc.png", on_bad_input=on_bad_input)
    log.info("%s: %d slides, %d tiles, %d slides without tiles", group_dir, len(counts),
             sum(counts.values()), sum(count == 0 for count in counts.values()))
    return counts
