"""One tiling job for a group of slides (`datasets.<name>.slides_per_job`, `medrobust.slide_groups`)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping, Sequence

import zarr

from medrobust.logs import get_logger
from medrobust.preprocess.tiling import TilingConfig, tile_slide
from medrobust.progress import progress
from medrobust.slide_groups import GroupWork

log = get_logger(__name__)


def tile_slide_group(dataset_folder: str | os.PathLike, group_dir: str | os.PathLike,
                     slides: Sequence[Mapping[str, str]], config: TilingConfig, *, code: str,
                     workers: int = 1, on_bad_input: str = "fail") -> dict[str, int | None]:
    """Tile each slide (its manifest row plus `slide_id`) into `group_dir`, one after another:
    `{slide_id}.zarr` and `{slide_id}.qc.png`, as `tile_slide` writes them for a slide's own job.

    A bad slide is handled by `tile_slide` alone: under "skip" it gets its empty store with
    the reason and the next slide is tiled; under "fail" its InputError, naming the file,
    stops the group. Slides a failed run with the same tiling settings and `code` (the
    workflow's fingerprint) finished are kept, not tiled again; a slide it left out is kept
    only under "skip" (`medrobust.slide_groups.GroupWork`). Returns the number of tiles per
    slide tiled now (None for a kept slide).
    """
    work = GroupWork(group_dir, {"tiling": dataclasses.asdict(config), "code": code})
    if work.finished:
        log.info("%s: %d slides finished by a failed run are kept", group_dir, work.finished)
    counts: dict[str, int | None] = {}
    for slide in progress(slides, desc=f"tiling {work.group_dir.name}", unit="slide"):
        slide_id, row = slide["slide_id"], dict(slide)
        kept_keys = [{"row": row, "left_out": False}]
        if on_bad_input == "skip":
            kept_keys.append({"row": row, "left_out": True})
        if work.kept(slide_id, *kept_keys, outputs=_outputs(slide_id)):
            counts[slide_id] = None
            continue
        counts[slide_id] = tile_slide(
            Path(dataset_folder) / slide["path"], work.folder / f"{slide_id}.zarr", config,
            slide_id=slide_id, label=slide["label"], split=slide["split"],
            source_sha256=slide["sha256"], workers=workers,
            qc_path=work.folder / f"{slide_id}.qc.png", on_bad_input=on_bad_input)
        work.mark_done(slide_id, {"row": row, "left_out": counts[slide_id] == 0})
    work.complete({name for slide in slides for name in _outputs(slide["slide_id"])})
    # the group's totals, not this run's: a kept slide's store records its tiles
    n_tiles = [count if count is not None
               else zarr.open_group(work.group_dir / f"{slide_id}.zarr", mode="r").attrs["n_tiles"]
               for slide_id, count in counts.items()]
    log.info("%s: %d slides (%d kept from a failed run), %d tiles, %d slides without tiles",
             group_dir, len(counts), sum(count is None for count in counts.values()),
             sum(n_tiles), n_tiles.count(0))
    return counts


def _outputs(slide_id: str) -> tuple[str, str]:
    """A slide's files in its group's folder: tile store and QC picture."""
    return f"{slide_id}.zarr", f"{slide_id}.qc.png"
