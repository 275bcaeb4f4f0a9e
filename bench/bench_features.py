"""Benchmark `medrobust.features.extract.extract_slide_features` against a plain forward.

A tile store is made first (not timed) with `tile_slide` from the test slide at
224 px tiles. The baseline, measured in the same run, is a plain loop of the
same backbone (`medrobust.features.backbones.build_backbone`) over the same
tiles already in memory as float tensors in [0, 1], same batch size, under
`torch.inference_mode`. The ratio shows what the Zarr read of the tiles, the
uint8 -> float conversion, building the backbone (random init + weights
hash) and writing the feature store cost on top of the model itself.

    .venv/bin/python bench/bench_features.py
    .venv/bin/python bench/bench_features.py --batch-size 32 --repeats 5

Measurements are interleaved (baseline, medrobust, baseline, ...) so a busy
shared machine slows both alike; the table shows medians.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would only add noise here

import numpy as np
import torch

from medrobust.features.backbones import build_backbone
from medrobust.features.extract import FeatureConfig, extract_slide_features
from medrobust.io.slide_stores import open_feature_store, open_tile_store
from medrobust.preprocess.tiling import TilingConfig, tile_slide
from timing import interleaved_medians, machine_line

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SLIDE = ROOT / "tests" / "data" / "CMU-1-Small-Region.svs"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    parser.add_argument("--target-mpp", type=float, default=None,
                        help="target microns per pixel (default: the slide's own mpp)")
    parser.add_argument("--tile-size", type=int, default=224)
    parser.add_argument("--tissue-threshold", type=float, default=0.0,
                        help="0 keeps every grid tile: more tiles, steadier numbers")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line(f"torch {torch.__version__}"))

    with tempfile.TemporaryDirectory(prefix="medrobust-bench-") as tmp:
        work = Path(tmp)
        tiles_path = work / "slide.zarr"
        if args.target_mpp is None:
            from medrobust.io.slides import open_slide
            with open_slide(args.slide) as slide:
                args.target_mpp = slide.mpp
        tiling = TilingConfig(target_mpp=args.target_mpp, tile_size=args.tile_size,
                              tissue_threshold=args.tissue_threshold)
        n = tile_slide(args.slide, tiles_path, tiling, slide_id="bench", label="bench",
                       split="test", source_sha256="not-computed")
        store = open_tile_store(tiles_path)
        config = FeatureConfig(backbone=args.backbone, weights="random",
                               batch_size=args.batch_size)
        print(f"\n{args.slide.name} -> {n} tiles of {args.tile_size} px (tile store made "
              f"untimed); backbone {args.backbone} (random weights), batch {args.batch_size}, "
              f"median of {args.repeats}")

        # the baseline's inputs: the same tiles, in memory, already float in [0, 1]
        images = torch.from_numpy(np.asarray(store.tiles[:])).permute(0, 3, 1, 2).float() / 255
        model = build_backbone(args.backbone, "random", 0).model

        def baseline() -> None:
            with torch.inference_mode():
                for start in range(0, n, args.batch_size):
                    model(images[start:start + args.batch_size])

        def build_only() -> None:
            build_backbone(args.backbone, "random", 0)

        out = work / "features.zarr"

        def medrobust_extract() -> None:
            extract_slide_features(tiles_path, out, config, device="cpu")

        # the warm-up round covers first-call allocations and oneDNN kernel selection
        medians = interleaved_medians({"baseline": baseline, "build": build_only,
                                       "medrobust": medrobust_extract}, args.repeats)
        # correctness: the last run's features against the plain forward
        with torch.inference_mode():
            reference = model(images[:args.batch_size]).numpy()
        written = open_feature_store(out).features[:args.batch_size]
        max_diff = float(np.abs(written - reference).max())

    rows = [
        ("baseline: model(batch) over in-memory float tiles", medians["baseline"], True),
        ("medrobust extract_slide_features (total)", medians["medrobust"], True),
        ("  of which build_backbone (init + weights sha256)", medians["build"], False),
        ("  total minus build_backbone", max(medians["medrobust"] - medians["build"], 1e-9), True),
    ]
    base = medians["baseline"]
    print(f"  {'':52s} {'median s':>9s} {'tiles/s':>9s} {'ratio vs baseline':>18s}")
    for name, seconds, per_tile in rows:
        rate = f"{n / seconds:9.1f}" if per_tile else f"{'-':>9s}"
        print(f"  {name:52s} {seconds:9.3f} {rate} {base / seconds:18.2f}")
    print("  ratio = baseline seconds / row seconds (throughput ratio; < 1 means slower "
          "than the baseline)")
    print(f"  features written by medrobust vs baseline forward: max |diff| = {max_diff:.2e}")


if __name__ == "__main__":
    sys.exit(main())
