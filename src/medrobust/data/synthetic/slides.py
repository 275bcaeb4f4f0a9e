"""Synthetic H&E whole-slide images, written as pyramidal tiled TIFF.

A slide is white glass with one to three tissue regions: pink stroma with
scattered small purple nuclei. Tumor slides add one or two tumour regions
whose nuclei are larger, darker and packed much more densely. Colour comes
from Beer-Lambert mixing of a haematoxylin and an eosin stain, as in real
H&E. With `hard_instances`, a hard-instance benchmark for MIL models
(MHIM-MIL's premise): tumour slides of the train and val splits hold one
small salient tumour region and several subtle ones (nuclei only a little
denser, larger and darker than stroma, `SUBTLE_GRADE` of the way), and test
tumour slides hold subtle regions only, so a model that learnt to look at
the salient region alone misses them. The layout (tissue and tumour) is drawn on a coarse grid, one cell per
`MASK_DOWNSAMPLE` level-0 pixels, and that grid is also the tumour mask
written beside the slide.

The TIFF holds one tiled, JPEG-compressed level per `LEVEL_DOWNSAMPLES`
entry, with its resolution in pixels per centimetre, which OpenSlide's
generic TIFF reader reports as `openslide.mpp-x` / `openslide.mpp-y`.
Level 0 is rendered tile by tile; only the next level is held in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import imagecodecs
import numpy as np
import pandas as pd
import tifffile

from medrobust.data.manifest import check_split_fractions, stratified_split, write_dataset
from medrobust.errors import ConfigError
from medrobust.data.synthetic.base import SourceConfig, register_modality, smooth_noise
from medrobust.io.atomic import atomic_path
from medrobust.io.checksums import sha256_file
from medrobust.progress import progress

TILE = 256
LEVEL_DOWNSAMPLES = (1, 4, 16)
MASK_DOWNSAMPLE = 16
JPEG_QUALITY = 90
# optical density of each stain at unit concentration (R, G, B): I = 255 * 10^-OD
HAEMATOXYLIN = np.array([0.45, 0.63, 0.26], dtype=np.float32)
EOSIN = np.array([0.04, 0.29, 0.15], dtype=np.float32)
GLASS = np.array([0.015, 0.015, 0.015], dtype=np.float32)  # bare glass: a faint grey
SUBTLE_GRADE = 0.35  # how far a subtle region's nuclei go from stroma towards tumour


@dataclass(frozen=True)
class SlideConfig(SourceConfig):
    where = "synthetic slides source"

    n_samples: int = 8
    width: int = 2048
    height: int = 1536
    mpp: float = 0.5
    tumor_fraction: float = 0.5
    splits: Mapping[str, float] = field(
        default_factory=lambda: {"train": 0.5, "val": 0.25, "test": 0.25})
    seed: int = 0
    hard_instances: bool = False  # salient and subtle tumour regions (module docstring)

    def __post_init__(self):
        if not isinstance(self.hard_instances, bool):
            raise ConfigError(f"{self.where}: hard_instances must be true or false, "
                              f"not {self.hard_instances!r}")
        self.check_int("n_samples", 1)
        # 32 layout cells a side keep every tissue region at least a few cells wide
        self.check_int("width", 32 * MASK_DOWNSAMPLE)
        self.check_int("height", 32 * MASK_DOWNSAMPLE)
        self.check_number("mpp", 0.05, 20.0)
        self.check_number("tumor_fraction", 0.0, 1.0)
        self.check_int("seed", 0)
        object.__setattr__(self, "splits", check_split_fractions(self.splits))


@dataclass(frozen=True)
class Nuclei:
    """Nuclei of one slide as parallel arrays (level-0 pixels)."""

    x: np.ndarray
    y: np.ndarray
    long_radius: np.ndarray
    short_radius: np.ndarray
    angle: np.ndarray
    stain: np.ndarray    # haematoxylin concentration: darker in tumour nuclei

    def near(self, x0: int, y0: int, size: int) -> np.ndarray:
        """Indices of the nuclei that may reach into a tile."""
        reach = self.long_radius + 1.0
        return np.flatnonzero((self.x + reach >= x0) & (self.x - reach < x0 + size)
                              & (self.y + reach >= y0) & (self.y - reach < y0 + size))


@dataclass(frozen=True)
class Layout:
    """What lies where on one slide, one cell per MASK_DOWNSAMPLE level-0 pixels."""

    tissue: np.ndarray       # > 0 inside tissue; smooth, so edges interpolate well
    tumour: np.ndarray       # bool tumour mask
    texture: np.ndarray      # stroma texture, one value per 4 level-0 pixels
    grade: np.ndarray        # float32: 0 stroma, 1 salient tumour, SUBTLE_GRADE subtle tumour


@register_modality("slides", kind="slides", default_classes=("normal", "tumor"),
                   config_type=SlideConfig)
def generate_slides(config: SlideConfig, classes: list[str], out_dir: Path) -> Path:
    """Write `slides/*.tiff`, `masks/*.png`, `annotations.csv` and the manifest."""
    rng = np.random.default_rng(config.seed)
    n = config.n_samples
    tumour = np.zeros(n, dtype=bool)
    tumour[rng.permutation(n)[:round(n * config.tumor_fraction)]] = True
    labels = [classes[int(flag)] for flag in tumour]
    splits = stratified_split(labels, config.splits, config.seed)

    for folder in ("slides", "masks"):
        (out_dir / folder).mkdir(exist_ok=True)
    rows, annotations = [], []
    for index in progress(range(n), desc="synthetic slides", unit="slide"):
        sample_id = f"slide_{index:03d}"
        slide_rng = np.random.default_rng([config.seed, index])
        regions = ("salient" if not config.hard_instances
                   else "subtle" if splits[index] == "test" else "mixed")
        layout = draw_layout(slide_rng, config.height, config.width, tumour[index], regions)
        nuclei = draw_nuclei(slide_rng, layout, config.mpp)
        relative, mask_relative = f"slides/{sample_id}.tiff", f"masks/{sample_id}.png"
        write_slide(out_dir / relative, slide_rng, layout, nuclei, config)
        (out_dir / mask_relative).write_bytes(
            imagecodecs.png_encode(layout.tumour.astype(np.uint8) * 255))
        rows.append({"sample_id": sample_id, "path": relative, "label": labels[index],
                     "split": splits[index], "sha256": sha256_file(out_dir / relative)})
        annotations.append({"sample_id": sample_id, "mask_path": mask_relative,
                            "mask_downsample": MASK_DOWNSAMPLE})

    with atomic_path(out_dir / "annotations.csv") as tmp:
        pd.DataFrame(annotations).to_csv(tmp, index=False)
    return write_dataset(out_dir, rows, classes, "slides")


def draw_layout(rng: np.random.Generator, height: int, width: int, tumour: bool,
                regions: str = "salient") -> Layout:
    """`regions`: salient (one or two tumour regions), mixed (one small salient region and
    three to six subtle ones) or subtle (three to six subtle ones)."""
    grid = (-(-height // MASK_DOWNSAMPLE), -(-width // MASK_DOWNSAMPLE))
    rows, cols = np.mgrid[0:grid[0], 0:grid[1]] + 0.5
    tissue = np.full(grid, -1.0, dtype=np.float32)
    for _ in range(int(rng.integers(1, 4))):
        tissue = np.maximum(tissue, _ellipse(rng, rows, cols, grid, (0.25, 0.75), (0.14, 0.3)))
    # ragged borders; bounded, so an ellipse's centre cell stays above 0.35
    tissue += np.clip(0.15 * smooth_noise(rng, grid, 3.0), -0.3, 0.3)

    grade = np.zeros(grid, dtype=np.float32)
    if tumour:
        # tumour centres sit well inside tissue; the bounded noise keeps each centre
        # cell positive, so a tumour slide's mask is never empty
        inner = np.argwhere(tissue > 0.35)
        for radius_range, level in _tumour_regions(rng, regions):
            cy, cx = inner[rng.integers(len(inner))] + 0.5
            radius = min(grid) * rng.uniform(*radius_range)
            field = (1.0 - np.hypot(rows - cy, cols - cx) / radius
                     + np.clip(0.25 * smooth_noise(rng, grid, 2.0), -0.5, 0.5))
            grade = np.maximum(grade, np.where(field > 0, np.float32(level), np.float32(0)))
        grade *= tissue > 0

    texture_shape = (-(-height // 4), -(-width // 4))
    texture = (0.7 * smooth_noise(rng, texture_shape, 2.0)
               + 0.5 * smooth_noise(rng, texture_shape, 0.7))
    return Layout(tissue=tissue, tumour=grade > 0, texture=texture, grade=grade)


def _tumour_regions(rng: np.random.Generator, regions: str) -> list[tuple[tuple[float, float], float]]:
    """(radius range as a fraction of the grid's short side, grade) of each tumour region."""
    if regions == "salient":
        return [((0.08, 0.16), 1.0)] * int(rng.integers(1, 3))
    subtle = [((0.05, 0.1), SUBTLE_GRADE)] * int(rng.integers(3, 7))
    return ([((0.03, 0.05), 1.0)] if regions == "mixed" else []) + subtle


def _ellipse(rng, rows, cols, grid, centre_range, axis_range) -> np.ndarray:
    """1 at a random ellipse's centre, 0 on its border, negative outside."""
    cy, cx = (rng.uniform(*centre_range) * grid[0], rng.uniform(*centre_range) * grid[1])
    a, b = rng.uniform(*axis_range) * grid[1], rng.uniform(*axis_range) * grid[0]
    theta = rng.uniform(0, np.pi)
    dy, dx = rows - cy, cols - cx
    u, v = dx * np.cos(theta) + dy * np.sin(theta), -dx * np.sin(theta) + dy * np.cos(theta)
    return (1.0 - np.hypot(u / a, v / b)).astype(np.float32)


def draw_nuclei(rng: np.random.Generator, layout: Layout, mpp: float) -> Nuclei:
    """Scatter nuclei over the tissue: a Poisson count per layout cell."""
    cell_um2 = (MASK_DOWNSAMPLE * mpp) ** 2
    in_tissue = layout.tissue > 0
    # nuclei per square micrometre: sparse in stroma, crowded in tumour
    density = np.where(in_tissue, _blend(0.004, 0.008, layout.grade), 0.0)
    counts = rng.poisson(density * cell_um2)
    cell_rows, cell_cols = np.nonzero(counts)
    cell_rows, cell_cols = (np.repeat(cell_rows, counts[cell_rows, cell_cols]),
                            np.repeat(cell_cols, counts[cell_rows, cell_cols]))
    n = len(cell_rows)
    grade = layout.grade[cell_rows, cell_cols]
    # radii in micrometres: stromal nuclei small and spindly, tumour nuclei big and round
    tumour_long, stroma_long = rng.uniform(4.0, 6.0, n), rng.uniform(2.5, 3.5, n)
    long_um = _blend(stroma_long, tumour_long, grade)
    tumour_aspect, stroma_aspect = rng.uniform(0.75, 1.0, n), rng.uniform(0.45, 0.8, n)
    aspect = _blend(stroma_aspect, tumour_aspect, grade)
    return Nuclei(
        x=(cell_cols + rng.random(n)) * MASK_DOWNSAMPLE,
        y=(cell_rows + rng.random(n)) * MASK_DOWNSAMPLE,
        long_radius=long_um / mpp,
        short_radius=long_um * aspect / mpp,
        angle=rng.uniform(0, np.pi, n),
        # tumour's draw first, as before grades existed: the same seed, the same slides
        stain=_blend(*reversed((rng.uniform(1.3, 1.7, n), rng.uniform(0.8, 1.1, n))), grade),
    )


def _blend(stroma, tumour, grade):
    """Stroma's value at grade 0, tumour's at 1, exactly (so plain slides are unchanged)."""
    return (1 - grade) * stroma + grade * tumour


def write_slide(path: Path, rng: np.random.Generator, layout: Layout, nuclei: Nuclei,
                config: SlideConfig) -> None:
    """Write the pyramid: level 0 streamed tile by tile, each lower level from the one above."""
    shape = (config.height, config.width, 3)
    ratio = LEVEL_DOWNSAMPLES[1] // LEVEL_DOWNSAMPLES[0]
    with tifffile.TiffWriter(path) as tiff:
        level = np.zeros((-(-shape[0] // ratio), -(-shape[1] // ratio), 3), dtype=np.uint8)
        tiles = _level0_tiles(rng, layout, nuclei, shape, level, ratio)  # fills `level`
        _write_level(tiff, tiles, shape, config.mpp, 1, description="medrobust synthetic H&E")
        for index in range(1, len(LEVEL_DOWNSAMPLES)):
            if index > 1:
                factor = LEVEL_DOWNSAMPLES[index] // LEVEL_DOWNSAMPLES[index - 1]
                level = _downsample(level, factor)
            _write_level(tiff, level, level.shape, config.mpp, LEVEL_DOWNSAMPLES[index])


def _write_level(tiff: tifffile.TiffWriter, data, shape, mpp: float, downsample: int,
                 description: str | None = None) -> None:
    pixels_per_cm = 1e4 / (mpp * downsample)
    tiff.write(data, shape=shape, dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
               compression="jpeg", compressionargs={"level": JPEG_QUALITY},
               resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER",
               subfiletype=0 if downsample == 1 else 1, description=description,
               metadata=None, software="medrobust")


def _downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Block mean; a ragged edge is padded with its own last row/column."""
    height, width = -(-image.shape[0] // factor) * factor, -(-image.shape[1] // factor) * factor
    padded = np.pad(image, ((0, height - image.shape[0]), (0, width - image.shape[1]), (0, 0)),
                    mode="edge")
    # sum rows, then columns: two contiguous reductions are much faster than one over (1, 3)
    rows = padded.reshape(height // factor, factor, width, 3).sum(axis=1, dtype=np.uint32)
    blocks = rows.reshape(height // factor, width // factor, factor, 3).sum(axis=2)
    return ((blocks + factor * factor // 2) // (factor * factor)).astype(np.uint8)


def _level0_tiles(rng, layout, nuclei, shape, below, ratio) -> Iterator[np.ndarray]:
    """Yield level-0 tiles in TIFF order, filling `below` (the next level) on the way."""
    for y0 in range(0, shape[0], TILE):
        for x0 in range(0, shape[1], TILE):
            tile = render_tile(rng, layout, nuclei, x0, y0)
            small = _downsample(tile, ratio)
            target = below[y0 // ratio:(y0 + TILE) // ratio, x0 // ratio:(x0 + TILE) // ratio]
            target[...] = small[:target.shape[0], :target.shape[1]]
            yield tile


def render_tile(rng: np.random.Generator, layout: Layout, nuclei: Nuclei,
                x0: int, y0: int) -> np.ndarray:
    """The RGB level-0 tile whose top-left corner is (x0, y0)."""
    density = GLASS + 0.01 * rng.standard_normal((TILE, TILE, 1), dtype=np.float32)
    tissue = np.clip(0.5 + _sample(layout.tissue, x0, y0, MASK_DOWNSAMPLE) / 0.01, 0.0, 1.0)
    if tissue.any():  # about half the tiles of a slide are glass only
        texture = _sample(layout.texture, x0, y0, 4)
        tumour = _sample(layout.grade, x0, y0, MASK_DOWNSAMPLE)
        # stroma: eosin with fibre-like texture and a few clear gaps; tumour stroma is bluer
        eosin = np.clip(0.75 + 0.3 * texture, 0.1, None) * (texture > -1.8)
        nucleus = _nucleus_stain(nuclei, x0, y0)
        eosin *= (1.0 - 0.6 * np.clip(nucleus, 0.0, 1.0)) * tissue
        haematoxylin = (0.08 + 0.12 * tumour + nucleus) * tissue
        density = density + eosin[..., None] * EOSIN + haematoxylin[..., None] * HAEMATOXYLIN
    return np.clip(255.0 * np.exp(-np.log(10.0) * density), 0, 255).astype(np.uint8)


def _sample(grid: np.ndarray, x0: int, y0: int, downsample: int) -> np.ndarray:
    """Bilinear lookup of a per-cell grid at the level-0 pixel centres of one tile."""
    low_y, high_y, frac_y = _axis(y0, grid.shape[0], downsample)
    low_x, high_x, frac_x = _axis(x0, grid.shape[1], downsample)
    top, bottom = grid[low_y], grid[high_y]
    top = top[:, low_x] + (top[:, high_x] - top[:, low_x]) * frac_x
    bottom = bottom[:, low_x] + (bottom[:, high_x] - bottom[:, low_x]) * frac_x
    return top + (bottom - top) * frac_y[:, None]


def _axis(start: int, size: int, downsample: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For TILE pixels from `start`: the grid cells each falls between, and how far along."""
    # cell i's centre is level-0 pixel (i + 0.5) * downsample; beyond the outer ones, hold
    position = np.clip((np.arange(start, start + TILE) + 0.5) / downsample - 0.5, 0, size - 1)
    low = np.floor(position).astype(np.intp)
    return low, np.minimum(low + 1, size - 1), (position - low).astype(np.float32)


def _nucleus_stain(nuclei: Nuclei, x0: int, y0: int) -> np.ndarray:
    """Haematoxylin of the nuclei within one tile (the darkest nucleus wins where they overlap)."""
    stain = np.zeros((TILE, TILE), dtype=np.float32)
    for i in nuclei.near(x0, y0, TILE):
        reach = int(np.ceil(nuclei.long_radius[i])) + 1
        cx, cy = nuclei.x[i] - x0, nuclei.y[i] - y0
        top, left = max(int(cy) - reach, 0), max(int(cx) - reach, 0)
        bottom, right = min(int(cy) + reach + 1, TILE), min(int(cx) + reach + 1, TILE)
        if top >= bottom or left >= right:
            continue
        dy, dx = np.ogrid[top:bottom, left:right]
        dy, dx = dy + 0.5 - cy, dx + 0.5 - cx
        cos, sin = np.cos(nuclei.angle[i]), np.sin(nuclei.angle[i])
        u = (dx * cos + dy * sin) / nuclei.long_radius[i]      # along the long axis
        v = (dy * cos - dx * sin) / nuclei.short_radius[i]
        # about one pixel of soft edge
        inside = np.clip((1.0 - np.hypot(u, v)) * nuclei.short_radius[i] + 0.5, 0.0, 1.0)
        patch = stain[top:bottom, left:right]
        np.maximum(patch, inside * nuclei.stain[i], out=patch)
    return stain
