"""Benchmark `medrobust.preprocess.tiling.tile_slide` against raw OpenSlide reads.

The baseline, measured in the same run over the same tile coordinates, level
and read size, is a plain loop of `openslide.OpenSlide.read_region` converted
to an RGB numpy array: no tissue mask, no resampling, no Zarr writes. With
`--workers 2` a second baseline reads the same tiles from 2 threads (one shared
OpenSlide handle, as medrobust does), so parallel runs are compared with
parallel raw reads too. When the tile has to be resampled (the read level does
not match the target mpp exactly) an extra row adds the same LANCZOS resize to
the baseline, so the resampling share is visible.

    .venv/bin/python bench/bench_tiling.py                     # the CMU test slide
    .venv/bin/python bench/bench_tiling.py --synthetic 8192x6144
    .venv/bin/python bench/bench_tiling.py --target-mpp 2.0 --tile-size 64

Each measurement is repeated `--repeats` times, interleaved (every row once per
round, after one warm-up round); the table shows the medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would only add noise here

import numpy as np
import openslide
from PIL import Image

from medrobust.io.slide_stores import TILES_PER_SHARD, create_tile_store
from medrobust.io.slides import open_slide
from medrobust.preprocess.tiling import TilingConfig, plan_grid, tile_slide, tissue_fractions
from timing import interleaved_medians, machine_line

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SLIDE = ROOT / "tests" / "data" / "CMU-1-Small-Region.svs"


def baseline_reader(path: Path, coords: np.ndarray, level: int, read_size: int,
                    workers: int, resize_to: int | None = None):
    """A function reading every tile with plain read_region -> RGB numpy."""
    size = (read_size, read_size)

    def read_all() -> None:
        handle = openslide.OpenSlide(str(path))
        try:
            def read(xy) -> np.ndarray:
                region = handle.read_region((int(xy[0]), int(xy[1])), level, size).convert("RGB")
                if resize_to is not None:
                    region = region.resize((resize_to, resize_to), Image.Resampling.LANCZOS)
                return np.asarray(region)

            if workers == 1:
                for xy in coords:
                    read(xy)
            else:
                with ThreadPoolExecutor(workers) as pool:
                    for _ in pool.map(read, coords):
                        pass
        finally:
            handle.close()

    return read_all


def zarr_writer(path: Path, coords: np.ndarray, level: int, read_size: int, tile_size: int,
                out: Path):
    """Raw reads (resized as medrobust does) written a whole shard per call into a tile
    store of medrobust's layout: isolates what compressing and writing cost."""
    size = (read_size, read_size)

    def read_and_write() -> None:
        handle = openslide.OpenSlide(str(path))
        try:
            tiles = create_tile_store(out, len(coords), tile_size, coords,
                                      np.ones(len(coords), np.float32), {})
            for start in range(0, len(coords), TILES_PER_SHARD):
                batch = []
                for xy in coords[start:start + TILES_PER_SHARD]:
                    region = handle.read_region((int(xy[0]), int(xy[1])), level,
                                                size).convert("RGB")
                    if read_size != tile_size:
                        region = region.resize((tile_size, tile_size), Image.Resampling.LANCZOS)
                    batch.append(np.asarray(region))
                tiles[start:start + len(batch)] = np.stack(batch)
        finally:
            handle.close()
            shutil.rmtree(out, ignore_errors=True)

    return read_and_write


def make_synthetic(size: str, out_dir: Path) -> Path:
    from medrobust.data.synthetic.slides import SlideConfig, draw_layout, draw_nuclei, write_slide
    width, height = (int(part) for part in size.lower().split("x"))
    config = SlideConfig(n_samples=1, width=width, height=height, mpp=0.5)
    rng = np.random.default_rng(0)
    layout = draw_layout(rng, height, width, tumour=True)
    nuclei = draw_nuclei(rng, layout, config.mpp)
    path = out_dir / f"synthetic_{width}x{height}.tiff"
    start = time.perf_counter()
    write_slide(path, rng, layout, nuclei, config)
    print(f"  (made {path.name} in {time.perf_counter() - start:.1f} s, not timed)")
    return path


def bench_slide(path: Path, args, work: Path) -> None:
    with open_slide(path) as slide:
        target_mpp = args.target_mpp if args.target_mpp is not None else slide.mpp
        config = TilingConfig(target_mpp=target_mpp, tile_size=args.tile_size,
                              tissue_threshold=args.tissue_threshold)
        grid = plan_grid(slide, config)
        fractions = tissue_fractions(slide, grid)
        coords = grid.coords[fractions >= config.tissue_threshold]
        dims = slide.dimensions
    n = len(coords)
    print(f"\n{path.name}: {dims[0]}x{dims[1]} level 0, mpp {slide.mpp:g}; target_mpp "
          f"{target_mpp:g}, tile {args.tile_size} px -> read {grid.read_size} px at level "
          f"{grid.level} (downsample {grid.level_downsample:g}); {n} of {len(grid.coords)} "
          f"grid tiles kept (tissue >= {config.tissue_threshold:g}); median of {args.repeats}")
    if n == 0:
        print("  no tiles kept; nothing to time")
        return
    resample = grid.read_size != args.tile_size

    setups: list[tuple[str, object, int]] = []   # (name, function, threads)

    def setup_only() -> None:  # what tile_slide does before reading any tile
        with open_slide(path) as s:
            tissue_fractions(s, plan_grid(s, config))

    for workers in args.workers:
        setups.append((f"baseline: read_region -> RGB, {workers} thread(s)",
                       baseline_reader(path, coords, grid.level, grid.read_size, workers),
                       workers))
        if resample:
            setups.append((f"baseline + LANCZOS resize to {args.tile_size}, {workers} thread(s)",
                           baseline_reader(path, coords, grid.level, grid.read_size, workers,
                                           args.tile_size), workers))
    setups.append(("medrobust setup only (open, grid, tissue mask)", setup_only, 0))
    setups.append(("explain: baseline + Zarr writes of whole shards, 1 thread",
                   zarr_writer(path, coords, grid.level, grid.read_size, args.tile_size,
                               work / "raw.zarr"), 1))
    for workers in args.workers:
        def run_tiling(workers=workers, out=work / f"tiles_w{workers}.zarr") -> None:
            tile_slide(path, out, config, slide_id="bench", label="bench", split="test",
                       source_sha256="not-computed", workers=workers)
            shutil.rmtree(out)

        setups.append((f"medrobust tile_slide, workers={workers}", run_tiling, workers))

    medians = interleaved_medians({name: function for name, function, _ in setups}, args.repeats)
    rows = [(name, medians[name], threads) for name, _, threads in setups]
    setup = next(seconds for name, seconds, _ in rows if name.startswith("medrobust setup"))
    for workers in args.workers:
        total = next(seconds for name, seconds, threads in rows
                     if name.startswith("medrobust tile_slide") and threads == workers)
        rows.append((f"  tile_slide minus setup (per-tile part), workers={workers}",
                     max(total - setup, 1e-9), workers))

    base = {threads: seconds for name, seconds, threads in rows
            if name.startswith("baseline: ")}
    print(f"  {'':54s} {'median s':>9s} {'tiles/s':>9s} {'ratio vs 1-thread':>18s} "
          f"{'ratio vs same-threads':>22s}")
    for name, seconds, threads in rows:
        rate = n / seconds
        vs_one = base[args.workers[0]] / seconds
        same = f"{base[threads] / seconds:.2f}" if threads in base else ""
        rate_text = f"{rate:9.1f}" if threads else f"{'-':>9s}"
        print(f"  {name:54s} {seconds:9.3f} {rate_text} {vs_one:18.2f} {same:>22s}")
    print("  ratio = baseline seconds / row seconds (throughput ratio; < 1 means slower "
          "than the baseline)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, default=DEFAULT_SLIDE,
                        help="slide to tile (default: tests/data/CMU-1-Small-Region.svs)")
    parser.add_argument("--synthetic", metavar="WxH",
                        help="also benchmark a synthetic pyramidal TIFF of this size, "
                             "e.g. 8192x6144 (generation is not timed, about 7 s)")
    parser.add_argument("--no-slide", action="store_true",
                        help="skip --slide (only the synthetic slide)")
    parser.add_argument("--target-mpp", type=float, default=None,
                        help="target microns per pixel (default: the slide's own mpp)")
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--tissue-threshold", type=float, default=0.5)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="thread counts to time; the first is the reference (default 1 2)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    print(machine_line(f"openslide {openslide.__library_version__} "
                       f"(openslide-python {openslide.__version__})"))
    with tempfile.TemporaryDirectory(prefix="medrobust-bench-") as tmp:
        work = Path(tmp)
        slides = [] if args.no_slide else [args.slide]
        if args.synthetic:
            slides.append(make_synthetic(args.synthetic, work))
        for path in slides:
            bench_slide(path, args, work)


if __name__ == "__main__":
    sys.exit(main())
