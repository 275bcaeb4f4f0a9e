"""Benchmark `medrobust.preprocess.tiling.tile_slide` against raw OpenSlide reads.

The baseline, measured in the same run over the same tile coordinates, level
and read size, is a plain loop of `openslide.OpenSlide.read_region` converted
to an RGB numpy array: no tissue mask, no resampling, no Zarr writes. With
`--workers 2` a second baseline reads the same tiles from 2 threads (one shared
OpenSlide handle, as medrobust does), so parallel runs are compared with
parallel raw reads too. When the tile has to be resampled (the read level does
not match the target mpp exactly) an extra row adds the same LANCZOS resize to
the baseline, so the resampling share is visible. The goal rows run `tile_slide`
as the issue counts tiling (open, mask, grid, reads, resize, compression, Zarr
writes); an "explain" row adds the QC picture a workflow job also draws and saves.

    .venv/bin/python bench/bench_tiling.py                     # the CMU test slide
    .venv/bin/python bench/bench_tiling.py --synthetic 8192x6144
    .venv/bin/python bench/bench_tiling.py --target-mpp 2.0 --tile-size 64
    .venv/bin/python bench/bench_tiling.py --large 50000x50000 --tile-size 224 256
    .venv/bin/python bench/bench_tiling.py --no-slide --large 50000x50000 --large-discs 40
    .venv/bin/python bench/bench_tiling.py --clock cpu --workers 1 --no-hs2p   # busy machine
    .venv/bin/python bench/bench_tiling.py --pin --workers 1 2   # N threads on N cores

`--large 50000x50000` adds a synthetic pyramidal TIFF of that size (levels 1, 4,
16, 64; 256-px JPEG tiles; mostly glass with patches of the CMU slide's tissue,
so it stays small on disk), made in the temp dir and not timed. Its tissue is
`--large-discs` discs of about 0.4 % of the slide each: the default 4 give a few
hundred tiles, so fixed costs weigh; 40 give a few thousand, as a real slide of
that size has, so the per-tile work does. With hs2p
installed (`pip install -e '.[bench]'`) every slide also gets hs2p's rows:
`hs2p.tile_slide` (its tissue segmentation and grid) plus `extract_tiles_to_tar`
(its reads, JPEG encoding, tar writes) at the same target mpp and tile size.

`--pin` (Linux) runs every row on as many CPU cores as it has threads: the
writer thread of `tile_slide` then shares its workers' cores, as a Snakemake
job of `threads: N` gets N cores on a machine full of jobs, and scaling with
workers is scaling with cores. hs2p's worker processes are pinned alike. The
cores are the first N CPUs the process may use: where a machine numbers two
hyperthreads of one core next to each other, pick the CPUs with `taskset`.

Each measurement is repeated `--repeats` times, interleaved (every row once per
round, after one warm-up round); the table shows the medians. Each slide ends
with the goal ratios: tile_slide against the raw loop with as many threads,
and against hs2p in tiles per second (the two keep different tissue tiles).
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would only add noise here

import numpy as np
import openslide
import zarr
from PIL import Image

from medrobust.io.slide_stores import TILES_PER_SHARD, create_tile_store, write_tile_shard
from medrobust.io.slides import open_slide
from medrobust.preprocess.tiling import TilingConfig, plan_grid, tile_slide, tissue_fractions
from timing import interleaved_medians, machine_line

try:  # bench-only dependency: pip install -e '.[bench]'
    import hs2p
    HAVE_HS2P = True
except ImportError:
    HAVE_HS2P = False

ROOT = Path(__file__).resolve().parents[1]
# cpu: this process's CPU seconds, all its threads; on a machine busy with other work it
# measures the work rather than the wait for a core (hs2p's worker processes are not counted)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
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
    store of medrobust's layout, as tile_slide writes them: isolates what compressing and
    writing cost."""
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
                write_tile_shard(tiles, start, np.stack(batch))
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


LARGE_DOWNSAMPLES = (1, 4, 16, 64)
LARGE_CELL = 1024   # level-0 pixels per cell of the tissue layout


def make_large(size: str, out_dir: Path, discs: int = 4) -> Path:
    """A large pyramidal TIFF, mostly glass: `discs` discs of tissue copied from the CMU slide."""
    import tifffile
    from medrobust.data.synthetic.slides import JPEG_QUALITY, TILE

    width, height = (int(part) for part in size.lower().split("x"))
    with open_slide(DEFAULT_SLIDE) as cmu:
        texture = cmu.read_rgb((0, 0), 0, cmu.dimensions)
    # a whole number of the coarsest level's pixels, so every level repeats the texture with
    # the same level-0 period and shows the same tissue as level 0
    coarsest = LARGE_DOWNSAMPLES[-1]
    texture = texture[:len(texture) // coarsest * coarsest,
                      :texture.shape[1] // coarsest * coarsest]
    rng = np.random.default_rng(0)
    cells_y, cells_x = -(-height // LARGE_CELL), -(-width // LARGE_CELL)
    yy, xx = np.mgrid[:cells_y, :cells_x]
    tissue = np.zeros((cells_y, cells_x), bool)
    for _ in range(discs):  # each about 0.4 % of the slide (4: hundreds of tiles)
        cy, cx = rng.uniform(0.15, 0.85, 2) * (cells_y, cells_x)
        tissue |= (yy - cy) ** 2 + (xx - cx) ** 2 < (0.035 * min(cells_y, cells_x)) ** 2
    glass = np.full((TILE, TILE, 3), 243, np.uint8)

    def level_tiles(downsample: int):
        small = np.asarray(Image.fromarray(texture).reduce(downsample))
        level_height, level_width = -(-height // downsample), -(-width // downsample)
        for top in range(0, level_height, TILE):
            rows = np.arange(top, top + TILE)
            cell_rows = np.minimum(rows * downsample // LARGE_CELL, cells_y - 1)
            for left in range(0, level_width, TILE):
                cols = np.arange(left, left + TILE)
                cell_cols = np.minimum(cols * downsample // LARGE_CELL, cells_x - 1)
                mask = tissue[np.ix_(cell_rows, cell_cols)]
                if not mask.any():
                    yield glass
                    continue
                tile = small[np.ix_(rows % small.shape[0], cols % small.shape[1])]
                yield np.where(mask[..., None], tile, glass)

    path = out_dir / f"large_{width}x{height}_{discs}discs.tiff"
    start = time.perf_counter()
    mpp = 0.5
    with tifffile.TiffWriter(path, bigtiff=True) as tiff:
        for downsample in LARGE_DOWNSAMPLES:
            shape = (-(-height // downsample), -(-width // downsample), 3)
            pixels_per_cm = 1e4 / (mpp * downsample)
            tiff.write(level_tiles(downsample), shape=shape, dtype=np.uint8, tile=(TILE, TILE),
                       photometric="rgb", compression="jpeg",
                       compressionargs={"level": JPEG_QUALITY},
                       resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER",
                       subfiletype=0 if downsample == 1 else 1, metadata=None)
    print(f"  (made {path.name}, {path.stat().st_size / 2**20:.0f} MiB, in "
          f"{time.perf_counter() - start:.1f} s, not timed)")
    return path


def hs2p_tiler(path: Path, target_mpp: float, tile_size: int, workers: int, out: Path):
    """hs2p's whole pipeline for one slide: segmentation and grid, then tiles to a tar of JPEGs."""
    import hs2p
    from hs2p.api import extract_tiles_to_tar

    config = hs2p.TilingConfig(requested_spacing_um=target_mpp, requested_tile_size_px=tile_size,
                               tolerance=0.05, overlap=0.0, backend="openslide")
    counts = []

    def run() -> None:
        result = hs2p.tile_slide(hs2p.SlideSpec(sample_id="bench", image_path=path),
                                 tiling=config, segmentation=hs2p.SegmentationConfig(method="hsv"),
                                 num_workers=workers)
        extract_tiles_to_tar(result, out, num_workers=workers)
        counts.append(len(result.x))
        shutil.rmtree(out)

    return run, counts


def set_affinity(cpus: list[int]) -> None:
    """Every thread of this process on `cpus`."""
    for thread in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(thread), cpus)
        except ProcessLookupError:  # the thread ended meanwhile
            pass


def pinned(function, cores: int):
    """`function`, run with every thread of this process (and the threads and processes
    it starts) on the first `cores` of the CPUs it may use."""
    allowed = sorted(os.sched_getaffinity(0))
    if cores > len(allowed):
        raise SystemExit(f"--pin: a row of {cores} threads needs {cores} cores; this process "
                         f"may use {len(allowed)}")

    def run() -> None:
        set_affinity(allowed[:cores])
        try:
            function()
        finally:
            set_affinity(allowed)

    return run


def tile_and_discard(path: Path, config: TilingConfig, out: Path, workers: int = 1,
                     qc: Path | None = None) -> None:
    """`tile_slide` as a workflow job calls it (the checksum given), its store removed after."""
    tile_slide(path, out, config, slide_id="bench", label="bench", split="test",
               source_sha256="not-computed", workers=workers, qc_path=qc)
    shutil.rmtree(out)


def tile_in_this_process(path: Path, config: TilingConfig, out: Path,
                         cpu: int | None) -> None:
    """One worker process's part of `parallel_processes`: the whole slide, 1 worker."""
    if cpu is not None:
        set_affinity([cpu])
    tile_and_discard(path, config, out)


def parallel_processes(pool: ProcessPoolExecutor, processes: int, path: Path,
                       config: TilingConfig, work: Path, pin: bool):
    """`processes` processes tiling the whole slide at once, each with 1 worker: what
    worker processes instead of threads could reach, free of the GIL. The pool's
    processes start (and import) in the warm-up round, which is not timed; with --pin
    each is on a core of its own."""
    cpus = sorted(os.sched_getaffinity(0))

    def run() -> None:
        jobs = [pool.submit(tile_in_this_process, path, config, work / f"process_{index}.zarr",
                            cpus[index] if pin else None) for index in range(processes)]
        for job in jobs:
            job.result()

    return run


def bench_slide(path: Path, tile_size: int, args, work: Path) -> None:
    with open_slide(path) as slide:
        target_mpp = args.target_mpp if args.target_mpp is not None else slide.mpp
        config = TilingConfig(target_mpp=target_mpp, tile_size=tile_size,
                              tissue_threshold=args.tissue_threshold,
                              mask_pixels_per_tile=args.mask_pixels_per_tile)
        grid = plan_grid(slide, config)
        fractions = tissue_fractions(slide, grid, config.mask_pixels_per_tile)
        coords = grid.coords[fractions >= config.tissue_threshold]
        dims = slide.dimensions
    n = len(coords)
    print(f"\n{path.name}: {dims[0]}x{dims[1]} level 0, mpp {slide.mpp:g}; target_mpp "
          f"{target_mpp:g}, tile {tile_size} px -> read {grid.read_size} px at level "
          f"{grid.level} (downsample {grid.level_downsample:g}); {n} of {len(grid.coords)} "
          f"grid tiles kept (tissue >= {config.tissue_threshold:g}); median of {args.repeats}"
          + ("; each row on as many cores as it has threads" if args.pin else ""))
    if n == 0:
        print("  no tiles kept; nothing to time")
        return
    resample = grid.read_size != tile_size

    setups: list[tuple[str, object, int]] = []   # (name, function, threads)

    def setup_only() -> None:  # what tile_slide does before reading any tile
        with open_slide(path) as s:
            tissue_fractions(s, plan_grid(s, config), config.mask_pixels_per_tile)

    for workers in args.workers:
        setups.append((f"baseline: read_region -> RGB, {workers} thread(s)",
                       baseline_reader(path, coords, grid.level, grid.read_size, workers),
                       workers))
        if resample:
            setups.append((f"baseline + LANCZOS resize to {tile_size}, {workers} thread(s)",
                           baseline_reader(path, coords, grid.level, grid.read_size, workers,
                                           tile_size), workers))
    setups.append(("medrobust setup only (open, grid, tissue mask)", setup_only, 0))
    setups.append(("explain: baseline + Zarr writes of whole shards, 1 thread",
                   zarr_writer(path, coords, grid.level, grid.read_size, tile_size,
                               work / "raw.zarr"), 1))
    for workers in args.workers:
        run_tiling = functools.partial(tile_and_discard, path, config,
                                       work / f"tiles_w{workers}.zarr", workers)
        setups.append((f"medrobust tile_slide, workers={workers}", run_tiling, workers))
        # what a workflow job does: the QC picture too (drawn while tiles are read)
        setups.append((f"explain: tile_slide + QC picture, workers={workers}",
                       functools.partial(run_tiling, qc=work / f"qc_w{workers}.png"), workers))
    # the cpu clock counts this process alone, which only waits for the worker processes
    processes = ([workers for workers in args.workers if workers > 1]
                 if args.clock == "wall" else [])
    pool = ProcessPoolExecutor(max(processes), mp_context=multiprocessing.get_context("spawn")) \
        if processes else None
    for workers in processes:
        setups.append((f"explain: {workers} processes at once, each tile_slide workers=1",
                       parallel_processes(pool, workers, path, config, work, args.pin), workers))
    hs2p_counts = {}
    if HAVE_HS2P:
        for workers in args.workers:
            run, hs2p_counts[workers] = hs2p_tiler(path, target_mpp, tile_size, workers,
                                                   work / f"hs2p_w{workers}")
            setups.append((f"hs2p tile_slide + extract_tiles_to_tar, workers={workers}",
                           run, workers))

    try:
        medians = interleaved_medians({name: pinned(function, max(1, threads)) if args.pin
                                       else function for name, function, threads in setups},
                                      args.repeats, clock=CLOCKS[args.clock])
    finally:
        if pool is not None:
            pool.shutdown()

    def tiles(name: str, threads: int) -> int:
        """Tiles a row keeps: hs2p its own, the processes row every process the slide's."""
        if name.startswith("hs2p"):
            return hs2p_counts[threads][-1]
        return threads * n if " processes at once" in name else n

    rows = [(name, medians[name], threads, tiles(name, threads)) for name, _, threads in setups]
    setup = next(seconds for name, seconds, *_ in rows if name.startswith("medrobust setup"))
    ours = {threads: seconds for name, seconds, threads, _ in rows
            if name.startswith("medrobust tile_slide")}
    for workers in args.workers:
        if ours[workers] > setup:  # else load noise swamped the difference: no row
            rows.append((f"  tile_slide minus setup (per-tile part), workers={workers}",
                         ours[workers] - setup, workers, n))

    base = {threads: seconds for name, seconds, threads, _ in rows
            if name.startswith("baseline: ")}
    print(f"  {'':56s} {'median s':>9s} {'tiles':>6s} {'tiles/s':>9s} {'vs 1-thread':>12s} "
          f"{'vs same-threads':>16s}")
    for name, seconds, threads, count in rows:
        rate = f"{count / seconds:9.1f}" if threads else f"{'-':>9s}"
        same = f"{base[threads] / seconds:.2f}" if threads in base and count == n else ""
        vs_one = f"{base[args.workers[0]] / seconds:.2f}" if count == n else ""
        print(f"  {name:56s} {seconds:9.3f} {count:6d} {rate} {vs_one:>12s} {same:>16s}")
    print("  vs = raw-loop seconds / row seconds over the same tiles (< 1: slower than the raw "
          "loop); hs2p keeps its own tiles, so it is compared in tiles/s below")
    hs2p_seconds = {threads: seconds for name, seconds, threads, _ in rows
                    if name.startswith("hs2p")}
    goals = []
    for w in args.workers:
        goal = f"workers={w}: {base[w] / ours[w]:.2f}x the raw loop (goal >= 0.9)"
        if w in hs2p_seconds:
            hs2p_rate = hs2p_counts[w][-1] / hs2p_seconds[w]
            goal += f", {n / ours[w] / hs2p_rate:.2f}x hs2p's tiles/s (goal >= 1.5)"
        goals.append(goal)
    print(f"  GOALS {path.name} {tile_size} px: " + "; ".join(goals))
    together = {threads: seconds for name, seconds, threads, _ in rows
                if " processes at once" in name}
    if 1 in args.workers and together:
        print(f"  SCALING {path.name} {tile_size} px, tiles/s against 1 worker's: " + "; ".join(
            f"{w} workers: raw loop {base[1] / base[w]:.2f}x, tile_slide threads "
            f"{ours[1] / ours[w]:.2f}x, {w} processes {w * ours[1] / seconds:.2f}x"
            for w, seconds in together.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, default=DEFAULT_SLIDE,
                        help="slide to tile (default: tests/data/CMU-1-Small-Region.svs)")
    parser.add_argument("--synthetic", metavar="WxH",
                        help="also benchmark a synthetic pyramidal TIFF of this size, "
                             "e.g. 8192x6144 (generation is not timed, about 7 s)")
    parser.add_argument("--large", metavar="WxH",
                        help="also benchmark a large, mostly-glass pyramidal TIFF, e.g. "
                             "50000x50000 (generation is not timed)")
    parser.add_argument("--large-discs", type=int, default=4, metavar="N",
                        help="discs of tissue on the --large slide, each about 0.4 %% of it "
                             "(default 4: a few hundred tiles; 40: a few thousand)")
    parser.add_argument("--no-hs2p", action="store_true", help="leave out hs2p's rows")
    parser.add_argument("--no-slide", action="store_true",
                        help="skip --slide (only the synthetic slide)")
    parser.add_argument("--target-mpp", type=float, default=None,
                        help="target microns per pixel (default: the slide's own mpp)")
    parser.add_argument("--tile-size", type=int, nargs="+", default=[256],
                        help="tile sizes in pixels, each timed separately (default 256)")
    parser.add_argument("--tissue-threshold", type=float, default=0.5)
    parser.add_argument("--mask-pixels-per-tile", type=int,
                        default=TilingConfig.__dataclass_fields__["mask_pixels_per_tile"].default,
                        help="tiling.mask_pixels_per_tile (default: the config's default)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="thread counts to time; the first is the reference (default 1 2)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pin", action="store_true",
                        help="run each row on as many CPU cores as it has threads (Linux)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall-clock seconds (default) or the process's CPU seconds")
    args = parser.parse_args(argv)
    if args.pin and not hasattr(os, "sched_setaffinity"):
        parser.error("--pin sets CPU affinity, which this platform's Python cannot (Linux only)")
    global HAVE_HS2P
    HAVE_HS2P = HAVE_HS2P and not args.no_hs2p

    print(machine_line(f"openslide {openslide.__library_version__} "
                       f"(openslide-python {openslide.__version__}), zarr {zarr.__version__}, "
                       + (f"hs2p {hs2p.__version__}" if HAVE_HS2P else "no hs2p")))
    with tempfile.TemporaryDirectory(prefix="medrobust-bench-") as tmp:
        work = Path(tmp)
        slides = [] if args.no_slide else [args.slide]
        if args.synthetic:
            slides.append(make_synthetic(args.synthetic, work))
        if args.large:
            slides.append(make_large(args.large, work, args.large_discs))
        for path in slides:
            for tile_size in args.tile_size:
                bench_slide(path, tile_size, args, work)


if __name__ == "__main__":
    sys.exit(main())
