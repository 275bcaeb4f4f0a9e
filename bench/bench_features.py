"""Benchmark the feature extractor (tile store -> features) against the bare forward.

A tile store is made first (not timed) with `tile_slide` from the test slide at
224 px tiles; `--min-tiles` repeats its tiles into a larger store, for a GPU,
where one small slide is over in milliseconds. The baseline, measured in the
same run, is the bare forward of the same backbone over the same tiles already
in memory: float in [0, 1] on the device, channels-last, under the same
autocast, same batch size, `torch.inference_mode`. It is the model alone;
every row above it adds what the extractor does around the model.

    .venv/bin/python bench/bench_features.py
    .venv/bin/python bench/bench_features.py --device cuda --backbone resnet50_layer3 \\
        --min-tiles 8192 --batch-size 256 --workers 4

Measurements are interleaved (baseline, medrobust, baseline, ...) so a busy
shared machine slows all rows alike; the table shows medians.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would only add noise here

import numpy as np
import torch

from medrobust.device import select_device
from medrobust.features.backbones import build_backbone
from medrobust.features.extract import (FeatureConfig, autocast_dtype, embed_tiles,
                                        extract_slide_features, prepare_model)
from medrobust.io.atomic import atomic_path
from medrobust.io.slide_stores import (TILES_PER_SHARD, create_tile_store, open_feature_store,
                                       open_tile_store, read_tiles, write_tile_shard)
from medrobust.io.slides import open_slide
from medrobust.preprocess.tiling import TilingConfig, tile_slide
from timing import interleaved_medians, machine_line

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SLIDE = ROOT / "tests" / "data" / "CMU-1-Small-Region.svs"


def repeated_store(source: Path, path: Path, n_tiles: int) -> None:
    """A tile store of `n_tiles` tiles: the source store's, repeated (shard by shard)."""
    store = open_tile_store(source)
    tiles = np.asarray(store.tiles[:])
    index = np.arange(n_tiles) % len(tiles)
    with atomic_path(path) as tmp:
        shards = create_tile_store(tmp, n_tiles, tiles.shape[1], store.coords[index],
                                   store.tissue_fraction[index], store.attrs)
        for start in range(0, n_tiles, TILES_PER_SHARD):
            write_tile_shard(shards, start, tiles[index[start:start + TILES_PER_SHARD]])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    parser.add_argument("--target-mpp", type=float, default=None,
                        help="target microns per pixel (default: the slide's own mpp)")
    parser.add_argument("--tile-size", type=int, default=224)
    parser.add_argument("--tissue-threshold", type=float, default=0.0,
                        help="0 keeps every grid tile: more tiles, steadier numbers")
    parser.add_argument("--min-tiles", type=int, default=0,
                        help="repeat the slide's tiles into a store of at least this many")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16")
    parser.add_argument("--workers", type=int, default=1, help="features.loader_workers")
    parser.add_argument("--prefetch", type=int, default=2, help="features.prefetch_batches")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), "
                                                         "cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu-time", action="store_true",
                        help="time CPU seconds of this process (all its threads), not "
                             "wall-clock: steadier on a busy machine, but blind to the "
                             "loader's overlap of reads and forward passes")
    args = parser.parse_args(argv)
    device = select_device(args.device, threads=args.threads)
    if args.cpu_time and device.type == "cuda":
        parser.error("--cpu-time measures CPU work; a GPU run needs wall-clock")
    print(machine_line(f"torch {torch.__version__}"))
    config = FeatureConfig(backbone=args.backbone, weights="random",
                           batch_size=args.batch_size, precision=args.precision,
                           loader_workers=args.workers, prefetch_batches=args.prefetch)

    with tempfile.TemporaryDirectory(prefix="medrobust-bench-") as tmp:
        work = Path(tmp)
        tiles_path = work / "slide.zarr"
        if args.target_mpp is None:
            with open_slide(args.slide) as slide:
                args.target_mpp = slide.mpp
        tiling = TilingConfig(target_mpp=args.target_mpp, tile_size=args.tile_size,
                              tissue_threshold=args.tissue_threshold)
        n = tile_slide(args.slide, tiles_path, tiling, slide_id="bench", label="bench",
                       split="test", source_sha256="not-computed")
        if n < args.min_tiles:
            repeated_store(tiles_path, work / "repeated.zarr", args.min_tiles)
            tiles_path, n = work / "repeated.zarr", args.min_tiles
        store = open_tile_store(tiles_path)
        dtype = autocast_dtype(args.precision, device)
        print(f"\n{args.slide.name} -> {n} tiles of {args.tile_size} px (tile store made "
              f"untimed); backbone {args.backbone} (random weights), batch {args.batch_size}, "
              f"device {device}, autocast {dtype or 'none (fp32)'}, loader "
              f"{args.workers} worker(s) prefetching {args.prefetch}; median of {args.repeats}, "
              f"{'CPU time' if args.cpu_time else 'wall-clock'}")

        backbone = build_backbone(args.backbone, "random", 0)
        model = prepare_model(backbone, device)
        # the baseline's inputs: the same tiles, on the device, float in [0, 1], channels-last
        images = (torch.from_numpy(np.asarray(store.tiles[:])).to(device)
                  .permute(0, 3, 1, 2).float().div_(255))

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()

        def bare_forward() -> torch.Tensor:
            outputs = []
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype,
                                                        enabled=dtype is not None):
                for start in range(0, n, args.batch_size):
                    outputs.append(model(images[start:start + args.batch_size]))
            sync()
            return torch.cat(outputs).float()

        def loop(workers: int):
            return lambda: embed_tiles(store, backbone, args.batch_size, device,
                                       precision=args.precision, workers=workers,
                                       prefetch=args.prefetch)

        out = work / "features.zarr"
        rows = {
            "baseline": bare_forward,
            "embed": loop(args.workers),
            "inline": loop(0),
            "extract": lambda: extract_slide_features(tiles_path, out, config, device),
            "build": lambda: build_backbone(args.backbone, "random", 0),
            # the reads alone, one thread: medrobust's shard reader and zarr's own slicing
            "read_tiles": lambda: [read_tiles(store.tiles, range(start, start + args.batch_size))
                                   for start in range(0, n - args.batch_size + 1,
                                                      args.batch_size)],
            "zarr_read": lambda: [np.asarray(store.tiles[start:start + args.batch_size])
                                  for start in range(0, n - args.batch_size + 1,
                                                     args.batch_size)],
        }
        # the warm-up round covers first-call allocations, cuDNN and oneDNN kernel selection
        medians = interleaved_medians(rows, args.repeats,
                                      time.process_time if args.cpu_time else time.perf_counter)
        reference = bare_forward().cpu().numpy()
        embedded = embed_tiles(store, backbone, args.batch_size, device,
                               precision=args.precision, workers=args.workers,
                               prefetch=args.prefetch)
        written = open_feature_store(out).features
        diff_embed = float(np.abs(embedded - reference).max())
        diff_written = float(np.abs(written - reference).max())

    table = [
        ("baseline: bare forward over in-memory tiles on the device", medians["baseline"], True),
        (f"medrobust embed_tiles, store -> features ({args.workers} reader(s))",
         medians["embed"], True),
        ("  the same, reading inline (loader_workers 0)", medians["inline"], True),
        ("medrobust extract_slide_features (total)", medians["extract"], True),
        ("  of which build_backbone (init + weights sha256)", medians["build"], False),
    ]
    base = medians["baseline"]
    print(f"  {'':62s} {'median s':>9s} {'tiles/s':>9s} {'ratio vs baseline':>18s}")
    for name, seconds, per_tile in table:
        rate, ratio = ((f"{n / seconds:9.1f}", f"{base / seconds:18.2f}") if per_tile
                       else (f"{'-':>9s}", f"{'-':>18s}"))
        print(f"  {name:62s} {seconds:9.3f} {rate} {ratio}")
    print("  ratio = baseline seconds / row seconds (throughput ratio; < 1 means slower "
          "than the baseline)")
    read = n - n % args.batch_size
    print(f"  reads alone, 1 thread, {read} tiles in batches: read_tiles "
          f"{read / medians['read_tiles']:.0f} tiles/s, zarr's own slicing "
          f"{read / medians['zarr_read']:.0f} tiles/s "
          f"({medians['zarr_read'] / medians['read_tiles']:.1f}x)")
    print(f"  features vs the bare forward: max |diff| embed_tiles {diff_embed:.2e}, "
          f"written store {diff_written:.2e}")


if __name__ == "__main__":
    sys.exit(main())
