"""Where `embed_tiles`' time goes on a GPU: the bare forward, then each part it adds, alone.

Rows (same backbone, tiles, batch and autocast as bench_features.py, all on CUDA):

- the bare forward over float tiles already on the device (bench_features.py's baseline);
- uint8 batches already on the device, converted there (the conversion's cost);
- pinned uint8 batches in host memory copied on the compute stream, then on a side
  stream (the host-to-device copy's cost, and what overlapping it saves);
- the reader alone (`TileBatches` with N threads into pinned memory, no model),
  and its first batch alone (how long the model waits before its first forward pass);
- `embed_tiles` with N reader threads: all of it together.

    .venv/bin/python bench/bench_features_breakdown.py --backbone resnet50_layer3 --tiles 8192
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch

from bench_features import DEFAULT_SLIDE, repeated_store
from medrobust.features.backbones import build_backbone
from medrobust.features.extract import TileBatches, _to_device, embed_tiles, prepare_model
from medrobust.io.slide_stores import open_tile_store
from medrobust.io.slides import open_slide
from medrobust.preprocess.tiling import TilingConfig, tile_slide
from timing import interleaved_medians, machine_line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50_layer3")
    parser.add_argument("--tiles", type=int, default=8192, help="the CMU slide's tiles, repeated")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--readers", type=int, nargs="+", default=[4, 8, 12])
    parser.add_argument("--prefetch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_features_breakdown.py measures a GPU; none is available")
    device = torch.device("cuda")
    print(machine_line(f"torch {torch.__version__}"))
    with tempfile.TemporaryDirectory(prefix="medrobust-bench-") as tmp:
        work = Path(tmp)
        with open_slide(DEFAULT_SLIDE) as slide:
            mpp = slide.mpp
        tile_slide(DEFAULT_SLIDE, work / "slide.zarr",
                   TilingConfig(target_mpp=mpp, tile_size=224, tissue_threshold=0.0),
                   slide_id="bench", label="bench", split="test", source_sha256="not-computed")
        repeated_store(work / "slide.zarr", work / "repeated.zarr", args.tiles)
        store = open_tile_store(work / "repeated.zarr")
        backbone = build_backbone(args.backbone, "random", 0)
        model = prepare_model(backbone, device)
        size = args.batch_size
        host = torch.from_numpy(np.asarray(store.tiles[:]))
        pinned = [host[start:start + size].pin_memory() for start in range(0, args.tiles, size)]
        on_device = [batch.to(device) for batch in pinned]
        floats = [batch.permute(0, 3, 1, 2).float().div_(255) for batch in on_device]
        copies = torch.cuda.Stream(device)

        def forward(batches, prepare) -> None:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                for batch in batches:
                    model(prepare(batch))

        def to_float(batch: torch.Tensor) -> torch.Tensor:
            return batch.permute(0, 3, 1, 2).float().div_(255)

        def read_only(readers: int) -> None:
            for _ in TileBatches(store.tiles, size, readers, args.prefetch, pin=True):
                pass

        rows = {
            "bare forward, float tiles on the device": lambda: forward(floats, lambda b: b),
            "uint8 batches on the device, converted there": lambda: forward(on_device, to_float),
            "pinned batches, copied on the compute stream": lambda: forward(
                pinned, lambda b: to_float(b.to(device, non_blocking=True))),
            "pinned batches, copied on a side stream": lambda: forward(
                pinned, lambda b: to_float(_to_device(b, device, copies))),
        }
        for readers in args.readers:
            rows[f"the reader alone, {readers} threads"] = (lambda r: lambda: read_only(r))(readers)
        for readers in args.readers:
            rows[f"embed_tiles, {readers} reader threads"] = (
                lambda r: lambda: embed_tiles(store, backbone, size, device, workers=r,
                                              prefetch=args.prefetch))(readers)

        def synced(function):
            def run() -> None:
                function()
                torch.cuda.synchronize(device)
            return run

        medians = interleaved_medians({name: synced(f) for name, f in rows.items()},
                                      args.repeats, time.perf_counter)
        first_batch = {readers: first_batch_seconds(store.tiles, size, readers, args.prefetch,
                                                    args.repeats)
                       for readers in sorted({1, *args.readers})}
    base = medians["bare forward, float tiles on the device"]
    print(f"\n{args.backbone}, {args.tiles} tiles of 224 px, batch {size}, bf16 autocast, "
          f"median of {args.repeats}")
    print(f"  {'':48s} {'median s':>9s} {'tiles/s':>9s} {'ratio':>6s}")
    for name, seconds in medians.items():
        print(f"  {name:48s} {seconds:9.3f} {args.tiles / seconds:9.0f} {base / seconds:6.2f}")
    print("  ratio = bare-forward seconds / row seconds")
    for readers, seconds in first_batch.items():
        print(f"  the model's wait for the first batch, {readers} reader threads: "
              f"{seconds * 1e3:.1f} ms (median)")


def first_batch_seconds(tiles, size: int, readers: int, prefetch: int, repeats: int) -> float:
    """Median seconds until `TileBatches` hands out its first batch."""
    waits = []
    for _ in range(repeats + 1):  # the first round warms up the pinned-memory cache
        batches = iter(TileBatches(tiles, size, readers, prefetch, pin=True))
        began = time.perf_counter()
        next(batches)
        waits.append(time.perf_counter() - began)
        batches.close()
    return float(np.median(waits[1:]))


if __name__ == "__main__":
    sys.exit(main())
