"""Tissue detection and slide tiling into tile stores."""

import contextlib
import dataclasses
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import google_crc32c
import numpy as np
import openslide
import pytest
import tifffile
import zarr
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu
from skimage.morphology import closing, disk, opening
from skimage.transform import resize

import medrobust.io.file_reads as file_reads
from medrobust.errors import ConfigError, InputError
from medrobust.io.checksums import sha256_file
from medrobust.io.slide_stores import (TILE_CODEC, TILES_PER_SHARD, create_tile_store,
                                       open_tile_store, read_tiles, write_tile_shard)
from medrobust.io.slides import MAX_SLIDE_MPP, Slide, open_slide
from medrobust.io.zarr_chunks import create_array
from medrobust.preprocess.qc import CONTOUR, QC_MAX_SIDE, QC_MIN_SIDE, qc_picture
from medrobust.preprocess import groups, tiling
from medrobust.preprocess.tiling import TilingConfig, plan_grid, tile_slide, tissue_map
from medrobust.preprocess.tissue import (MAX_SATURATION, MIN_SATURATION, hsv_saturation,
                                         tissue_mask)

DATA = Path(__file__).parent / "data"
CMU = DATA / "CMU-1-Small-Region.svs"
BOXES = DATA / "boxes.tiff"
BOXES_MPP = 0.5  # boxes.tiff states 72 dpi, which no slide has
CMU_MPP = 0.499
TILE_ATTRS = {"slide_id", "label", "split", "tile_size", "tile_size_level0", "target_mpp",
              "level", "level_downsample", "slide_mpp", "source_path", "source_sha256",
              "tissue_threshold", "n_tiles", "rejected"}


def test_tissue_mask_finds_the_tissue_of_a_real_slide():
    with open_slide(CMU) as slide:
        thumbnail, _ = slide.thumbnail(8)  # (371, 278)
    mask = tissue_mask(thumbnail)
    assert mask.dtype == bool and mask.shape == thumbnail.shape[:2]
    assert 0.2 < mask.mean() < 0.6
    assert mask[200:240, 110:150].mean() > 0.95  # the middle of the tissue strip
    assert mask[:60, :60].mean() < 0.05           # glass in the top-left corner


def test_tissue_mask_of_blank_and_full_slides():
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(240, 3, (64, 64, 3)), 0, 255).astype(np.uint8)
    pink = np.clip(rng.normal((200, 120, 170), 10, (64, 64, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(glass).any()
    assert tissue_mask(pink).all()  # all tissue: Otsu must not split it in two


def skimage_tissue_mask(rgb):
    """tissue_mask as skimage's own functions compute it: rgb2hsv, closing, opening."""
    saturation = ndimage.median_filter(rgb2hsv(rgb)[..., 1], size=3)
    threshold = MIN_SATURATION
    if np.ptp(saturation) > 0:
        threshold = np.clip(threshold_otsu(saturation), MIN_SATURATION, MAX_SATURATION)
    return opening(closing(saturation > threshold, disk(2)), disk(1))


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (2, 3), (5, 5), (9, 40), (64, 48)])
def test_tissue_mask_is_skimages_at_every_size_and_border(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(20):  # speckled glass and tissue: every morphology step changes pixels
        glass = rng.normal(235, 4, (*shape, 3))
        tissue = rng.normal((190, 110, 165), 25, (*shape, 3))
        rgb = np.clip(np.where(rng.random((*shape, 1)) < rng.random(), tissue, glass), 0, 255)
        rgb = rgb.astype(np.uint8)
        np.testing.assert_array_equal(tissue_mask(rgb), skimage_tissue_mask(rgb))
    with open_slide(CMU) as slide:
        thumbnail, _ = slide.thumbnail(8)
    np.testing.assert_array_equal(tissue_mask(thumbnail), skimage_tissue_mask(thumbnail))


def test_hsv_saturation_is_rgb2hsvs():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rgb[0, :3] = [(0, 0, 0), (90, 90, 90), (255, 0, 0)]   # black, grey, pure red
    np.testing.assert_array_equal(hsv_saturation(rgb), rgb2hsv(rgb)[..., 1])
    assert hsv_saturation(rgb)[0, :3].tolist() == [0, 0, 1]


@pytest.mark.parametrize("pixels_per_tile, level", [(4, 3), (8, 2), (16, 1)])
def test_the_tissue_mask_comes_from_the_coarsest_level_fine_enough(pixels_per_tile, level):
    # boxes.tiff downsamples 1, 2, 4.016, 8.086; 32-pixel tiles at level 0
    config = TilingConfig(target_mpp=BOXES_MPP, tile_size=32, tissue_threshold=0.5,
                          fallback_mpp=BOXES_MPP, mask_pixels_per_tile=pixels_per_tile)
    with open_slide(BOXES, BOXES_MPP) as slide:
        grid = plan_grid(slide, config)
        thumbnail, mask, downsample = tissue_map(slide, grid, pixels_per_tile)
        assert downsample == pytest.approx(slide.level_downsamples[level])
    # at least 3/4 of the pixels per tile side asked for
    assert 0.75 * pixels_per_tile <= 32 / downsample
    assert mask.shape == thumbnail.shape[:2]


def test_whole_shards_written_directly_are_zarrs_bytes_and_read_back(tmp_path):
    rng = np.random.default_rng(0)
    for n_tiles in (70, 5):   # a full shard and a partial last one; fewer tiles than a shard
        tiles = rng.integers(0, 256, (n_tiles, 16, 16, 3), dtype=np.uint8)
        ours, _ = (create_tile_store(tmp_path / f"{name}{n_tiles}.zarr", n_tiles, 16,
                                     np.zeros((n_tiles, 2)), np.zeros(n_tiles), {})
                   for name in ("ours", "zarr"))
        zarrs = zarr.open_array(tmp_path / f"zarr{n_tiles}.zarr" / "tiles", mode="r+")
        for start in range(0, n_tiles, 64):
            write_tile_shard(ours, start, tiles[start:start + 64])
            zarrs[start:start + 64] = tiles[start:start + 64]
        shards = sorted(path.relative_to(tmp_path / f"zarr{n_tiles}.zarr")
                        for path in (tmp_path / f"zarr{n_tiles}.zarr").rglob("c/*/0/0/0"))
        assert len(shards) == -(-n_tiles // 64)
        for shard in shards:
            assert (tmp_path / f"ours{n_tiles}.zarr" / shard).read_bytes() == \
                (tmp_path / f"zarr{n_tiles}.zarr" / shard).read_bytes()
        np.testing.assert_array_equal(
            zarr.open_array(tmp_path / f"ours{n_tiles}.zarr" / "tiles", mode="r")[:], tiles)
    # zarr leaves an all-zero (fill value) tile out of its shard; ours stores it, read the same
    tiles[1] = 0
    write_tile_shard(ours, 0, tiles)
    np.testing.assert_array_equal(open_tile_store(tmp_path / "ours5.zarr").tiles[:], tiles)
    with pytest.raises(ValueError, match="not one whole shard"):
        write_tile_shard(ours, 1, tiles[:4])


@pytest.mark.parametrize("n_tiles", [70, 5, 0])
def test_a_new_tile_store_has_the_files_zarr_itself_writes(tmp_path, n_tiles):
    rng = np.random.default_rng(3)
    coords, fractions = rng.integers(1, 10**6, (n_tiles, 2)), rng.random(n_tiles)
    attrs = {"slide_id": "s", "slide_mpp": 0.2527, "level": 2,
             "rejected": [{"sample_id": "s", "reason": "ünïcode"}]}
    create_tile_store(tmp_path / "ours.zarr", n_tiles, 16, coords, fractions, attrs)
    # the store as zarr's API makes it (create_tile_store's code before it wrote the files),
    # marked as every chunk written
    group = zarr.open_group(tmp_path / "zarr.zarr", mode="w",
                            attributes={**attrs, "n_tiles": n_tiles})
    create_array(group, "coords", data=coords.astype(np.int64))
    create_array(group, "tissue_fraction", data=fractions.astype(np.float32))
    create_array(group, "tiles", shape=(n_tiles, 16, 16, 3), chunks=(1, 16, 16, 3), dtype="uint8",
                 shards=(min(n_tiles, 64), 16, 16, 3) if n_tiles else None,
                 compressors=TILE_CODEC)
    files = {name: sorted(path.relative_to(tmp_path / name) for path in
                          (tmp_path / name).rglob("*") if path.is_file())
             for name in ("ours.zarr", "zarr.zarr")}
    assert files["ours.zarr"] == files["zarr.zarr"]
    assert len(files["ours.zarr"]) == 4 + 2 * bool(n_tiles)  # zarr.json x4, a chunk x2
    for file in files["ours.zarr"]:
        ours, theirs = ((tmp_path / name / file).read_bytes() for name in ("ours.zarr", "zarr.zarr"))
        if file.name == "zarr.json":
            assert json.loads(ours) == json.loads(theirs), file
        else:
            assert ours == theirs, file
    store = open_tile_store(tmp_path / "ours.zarr")
    np.testing.assert_array_equal(store.coords, coords)
    np.testing.assert_array_equal(store.tissue_fraction, fractions.astype(np.float32))
    assert store.attrs == {**attrs, "n_tiles": n_tiles}
    assert len(store) == n_tiles and store.tiles.shape[1:] == (16, 16, 3)
    with pytest.raises(FileExistsError):  # never mixed with an older store's files
        create_tile_store(tmp_path / "ours.zarr", n_tiles, 16, coords, fractions, attrs)


def test_read_tiles_reads_what_zarr_reads_in_any_order(tmp_path):
    rng = np.random.default_rng(1)
    tiles = rng.integers(0, 256, (150, 8, 8, 3), dtype=np.uint8)
    tiles[3] = 0      # zarr leaves an all-zero tile out of its shard
    tiles[64:128] = 0  # and this shard is never written: zarr reads the fill value
    # a tile store's layout, written by zarr itself (unmarked), the partial last shard too
    array = zarr.create_array(tmp_path / "tiles.zarr", data=tiles, shards=(64, 8, 8, 3),
                              chunks=(1, 8, 8, 3), compressors=TILE_CODEC)
    assert not list((tmp_path / "tiles.zarr").rglob("c/1/0/0/0"))
    unsorted = [149, 3, 0, 70, 64, 128, 3, 5, 63]
    plain = zarr.create_array(tmp_path / "plain.zarr", data=tiles, chunks=(7, 8, 8, 3))
    # sharded like a tile store but a tile split across two chunks: zarr's read, not ours
    split = zarr.create_array(tmp_path / "split.zarr", data=tiles, shards=(8, 8, 8, 3),
                              chunks=(1, 4, 8, 3), compressors=TILE_CODEC)
    for source in (array, plain, split, tiles):
        for positions in (unsorted, range(60, 140), range(0), [149]):
            np.testing.assert_array_equal(read_tiles(source, positions), tiles[list(positions)])
    out = np.empty((3, 8, 8, 3), dtype=np.uint8)
    assert read_tiles(array, [2, 1, 0], out=out) is out
    np.testing.assert_array_equal(out, tiles[[2, 1, 0]])
    with pytest.raises(ValueError, match="out must be"):
        read_tiles(array, [2, 1], out=out)
    with pytest.raises(IndexError, match="0..149"):
        read_tiles(array, [150])


def _one_shard_store(tmp_path):
    """A store of 64 random 8-px tiles in one shard: its tiles array and the shard's file."""
    tiles = np.random.default_rng(2).integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    shards = create_tile_store(tmp_path / "tiles.zarr", 64, 8, np.zeros((64, 2)),
                               np.zeros(64), {})
    write_tile_shard(shards, 0, tiles)
    shard = tmp_path / "tiles.zarr" / "tiles" / "c" / "0" / "0" / "0" / "0"
    return open_tile_store(tmp_path / "tiles.zarr").tiles, shard


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:-1] + bytes([data[-1] ^ 1]), "index fails its checksum"),
    (lambda data: data[:-600], "index fails its checksum"),
    (lambda data: b"\0\0\0\0" + data[4:], "a tile does not decompress"),
    # the first tile's blosc header: a stored size and first block far beyond the chunk
    # (c-blosc trusted them and read outside the file's bytes: a crash, not an error)
    (lambda data: data[:12] + (2**30 + 100).to_bytes(4, "little") + (2**30).to_bytes(4, "little")
     + data[20:], "says 1073741924 bytes stored"),
    # a decoded size short of a tile: part of the tile would be left as it was
    (lambda data: data[:4] + (8 * 8 * 3 - 1).to_bytes(4, "little") + data[8:], "191 decoded"),
])
def test_a_damaged_tile_shard_is_an_error_naming_its_file(tmp_path, damage, message):
    array, shard = _one_shard_store(tmp_path)
    shard.write_bytes(damage(shard.read_bytes()))
    with pytest.raises(InputError, match=f"{shard}: damaged tile shard .*{message}"):
        read_tiles(array, range(64))


def test_tile_shards_read_in_pieces_are_read_whole(tmp_path, monkeypatch):
    # one pread may return part of what it is asked on a network file system
    tiles = np.random.default_rng(4).integers(0, 256, (70, 16, 16, 3), dtype=np.uint8)
    shards = create_tile_store(tmp_path / "tiles.zarr", 70, 16, np.zeros((70, 2)),
                               np.zeros(70), {})
    for start in (0, 64):
        write_tile_shard(shards, start, tiles[start:start + 64])
    array = open_tile_store(tmp_path / "tiles.zarr").tiles
    pread = file_reads.os.pread
    monkeypatch.setattr(file_reads.os, "pread",
                        lambda fd, count, offset: pread(fd, min(count, 100), offset))
    np.testing.assert_array_equal(read_tiles(array, [69, 3, 64, 0]), tiles[[69, 3, 64, 0]])


def _damaged_shard(tmp_path, damage):
    """A one-shard store of 64 random 8-px tiles, its shard file passed through
    `damage(body, index)` -> (body, index) and its index's checksum recomputed, so
    only what the index says is wrong."""
    array, shard = _one_shard_store(tmp_path)
    data, index_bytes = shard.read_bytes(), 64 * 16 + 4
    body, index = damage(data[:-index_bytes], np.frombuffer(
        data[-index_bytes:-4], "<u8").reshape(64, 2).copy())
    raw = index.astype("<u8").tobytes()
    shard.write_bytes(body + raw + google_crc32c.value(raw).to_bytes(4, "little"))
    return array, shard


def _chunk_header(chunk, at, value):
    def damage(body, index):
        start = int(index[chunk, 0]) + at
        return body[:start] + value.to_bytes(4, "little") + body[start + 4:], index
    return damage


def _index_entry(chunk, offset=None, length=None):
    def damage(body, index):
        index[chunk] = (index[chunk, 0] if offset is None else offset,
                        index[chunk, 1] if length is None else length)
        return body, index
    return damage


@pytest.mark.parametrize("damage, message", [
    # a chunk after the first: its header is checked too, whatever the selection
    (_chunk_header(40, 12, 2**30 + 100), "1073741924 bytes stored"),
    (_chunk_header(40, 4, 8 * 8 * 3 - 1), "191 decoded"),
    # index entries whose checksum is right
    (_index_entry(63, length=8), "8 bytes, shorter than a blosc header"),
    (_index_entry(40, length=0), "shorter than a blosc header"),
    (_index_entry(40, offset=2**63, length=208), "points outside the file"),
    (_index_entry(40, length=2**40), "points outside the file"),
    # offset + length wrapping past 2**64 to a small number: numpy's negative indexing
    # had read the header from the end of the data, and blosc past it
    (_index_entry(40, offset=2**64 - 2**20, length=2**20 + 5), "points outside the file"),
    (_index_entry(40, offset=2**64 - 8, length=8 * 8 * 3), "points outside the file"),
])
def test_a_damaged_chunk_or_index_entry_is_an_error_in_any_selection(tmp_path, damage, message):
    array, shard = _damaged_shard(tmp_path, damage)
    for positions in ([63, 40, 2, 40, 0, 63], [40, 63], range(64)):
        with pytest.raises(InputError, match=f"{shard}: damaged tile shard .*{message}"):
            read_tiles(array, positions)


def test_tiling_config_rejects_unknown_and_bad_values():
    config = TilingConfig.from_mapping({"target_mpp": 2.0, "tile_size": 64,
                                        "tissue_threshold": 0.5})
    assert config.fallback_mpp is None
    with pytest.raises(ConfigError, match="tile_sise"):
        TilingConfig.from_mapping({"target_mpp": 2.0, "tile_sise": 64, "tissue_threshold": 0.5})
    with pytest.raises(ConfigError, match="tissue_threshold"):
        TilingConfig(target_mpp=2.0, tile_size=64, tissue_threshold=1.5)
    with pytest.raises(ConfigError, match="tile_size"):
        TilingConfig(target_mpp=2.0, tile_size=0, tissue_threshold=0.5)
    with pytest.raises(ConfigError, match="mask_pixels_per_tile"):
        TilingConfig(target_mpp=2.0, tile_size=64, tissue_threshold=0.5, mask_pixels_per_tile=2.5)


def test_row_runs_join_only_adjacent_tiles_of_one_row_up_to_the_longest():
    from medrobust.preprocess.tiling import _row_runs

    step = 10
    # row 0: x 0, 10, 20, 30 (adjacent), then a gap to 50; row 1 starts at x 60
    coords = np.array([[0, 0], [10, 0], [20, 0], [30, 0], [50, 0], [60, 10], [70, 10]])
    assert _row_runs(coords, step, longest=8) == [(0, 4), (4, 1), (5, 2)]
    assert _row_runs(coords, step, longest=3) == [(0, 3), (3, 1), (4, 1), (5, 2)]
    # the last tile of a row and the first of the next are never joined, even if x fits
    assert _row_runs(np.array([[0, 0], [10, 10]]), step, longest=8) == [(0, 1), (1, 1)]


@pytest.mark.parametrize("workers", [1, 3])
def test_tiles_at_level0_lie_on_the_grid_and_match_openslide(tmp_path, workers):
    out = tmp_path / "cmu.zarr"
    config = TilingConfig(target_mpp=CMU_MPP, tile_size=128, tissue_threshold=0.5)
    n_tiles = tile_slide(CMU, out, config, "cmu", "tumor", "train", workers=workers)
    store = open_tile_store(out)
    assert set(store.attrs) == TILE_ATTRS
    assert store.attrs["n_tiles"] == n_tiles == len(store) > 50
    assert store.attrs["source_sha256"] == sha256_file(CMU)
    assert (store.attrs["level"], store.attrs["tile_size_level0"]) == (0, 128)
    assert store.tiles.shape == (n_tiles, 128, 128, 3) and store.tiles.dtype == np.uint8
    assert store.tiles.chunks == (1, 128, 128, 3)
    assert (store.coords % 128 == 0).all()
    assert (store.coords + 128 <= (2220, 2967)).all()
    assert (store.tissue_fraction >= 0.5).all()
    reference = openslide.OpenSlide(CMU)
    # every tile: shards are filled in parts by several workers, the last ones partly
    assert n_tiles % TILES_PER_SHARD % 16
    for index in range(n_tiles):
        x, y = map(int, store.coords[index])
        expected = np.asarray(reference.read_region((x, y), 0, (128, 128)).convert("RGB"))
        np.testing.assert_array_equal(store.tiles[index], expected)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_slide_is_read_front_to_back(tmp_path, monkeypatch, workers):
    # parts taken out of order would leave many shards half-filled in memory at once
    locations: dict[int, list] = {}  # per reading thread
    read_rgb = Slide.read_rgb

    def recording(self, location, level, size):
        # (y, x): row-major order
        locations.setdefault(threading.get_ident(), []).append(location[::-1])
        return read_rgb(self, location, level, size)

    monkeypatch.setattr(Slide, "read_rgb", recording)
    config = TilingConfig(target_mpp=CMU_MPP, tile_size=64, tissue_threshold=0.5)
    tile_slide(CMU, tmp_path / "cmu.zarr", config, "cmu", "tumor", "train", workers=workers)
    reads = [read for thread in locations.values() for read in thread]
    assert len(reads) > 10
    assert all(thread == sorted(thread) for thread in locations.values())


def test_tiling_slides_of_any_size_in_one_process_reuses_its_reading_threads(tmp_path):
    # a group job tiles its slides in turn; dask keeps a thread pool per num_workers
    def tile(tile_size):
        config = TilingConfig(target_mpp=CMU_MPP, tile_size=tile_size, tissue_threshold=0.0)
        tile_slide(CMU, tmp_path / f"{tile_size}.zarr", config, "cmu", "tumor", "train",
                   workers=4)

    def threads() -> int:  # less zarr's file I/O pool, which grows as it likes
        return sum(not thread.name.startswith("asyncio") for thread in threading.enumerate())

    tile(200)  # 10 parts: every worker reads
    before = threads()
    for tile_size in (1024, 512, 400):  # 1, 2 and 3 parts
        tile(tile_size)
    assert threads() == before


@pytest.fixture
def noise_pyramid(tmp_path):
    """Three levels of independent noise (downsamples 1, 2, about 4.03), stored losslessly:
    a tile one pixel off shows."""
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.tiff"
    with tifffile.TiffWriter(path) as tiff:
        for index, (width, height) in enumerate([(660, 528), (330, 264), (164, 131)]):
            tiff.write(rng.integers(0, 256, (height, width, 3), np.uint8), tile=(64, 64),
                       photometric="rgb", compression="zlib", subfiletype=int(index > 0),
                       metadata=None)
    return path


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("downsample, level, step, read_size", [
    (2.0625, 1, 33, 16),   # level downsample 2: offsets 16.5 k, halves rounded to even
    (4.3, 2, 69, 17),      # level downsample ~4.03: offsets ~17.13 k, resized to 16
])
def test_tiles_of_a_row_sit_at_offsets_rounded_as_a_read_of_each_alone(
        tmp_path, noise_pyramid, workers, downsample, level, step, read_size):
    config = TilingConfig(target_mpp=downsample * 0.5, tile_size=16, tissue_threshold=0.0,
                          fallback_mpp=0.5)
    tile_slide(noise_pyramid, tmp_path / "noise.zarr", config, "noise", "normal", "test",
               workers=workers)
    store = open_tile_store(tmp_path / "noise.zarr")
    assert (store.attrs["level"], store.attrs["tile_size_level0"]) == (level, step)
    reference = openslide.OpenSlide(noise_pyramid)
    level_downsample = reference.level_downsamples[level]
    pixels = np.asarray(reference.read_region((0, 0), level, reference.level_dimensions[level])
                        .convert("RGB"))
    checked = 0
    for index, (x, y) in enumerate(store.coords.tolist()):
        top = y / level_downsample
        if not top.is_integer():  # OpenSlide resamples a region starting between two pixels
            continue
        left = int(np.rint(x / level_downsample))  # each row is one run from x = 0
        expected = pixels[int(top):int(top) + read_size, left:left + read_size]
        if read_size != 16:
            expected = np.asarray(Image.fromarray(expected).resize(
                (16, 16), Image.Resampling.LANCZOS))
        np.testing.assert_array_equal(store.tiles[index], expected, err_msg=f"tile at {x, y}")
        checked += 1
    assert checked >= 9


def test_tiles_come_from_the_matching_pyramid_level(tmp_path):
    out = tmp_path / "boxes.zarr"
    config = TilingConfig(target_mpp=2 * BOXES_MPP, tile_size=16, tissue_threshold=0.5,
                          fallback_mpp=BOXES_MPP)
    tile_slide(BOXES, out, config, "boxes", "normal", "test", source_sha256="abc")
    store = open_tile_store(out)
    assert store.attrs["source_sha256"] == "abc"
    assert (store.attrs["level"], store.attrs["level_downsample"]) == (1, 2.0)
    assert store.attrs["tile_size_level0"] == 32 and (store.coords % 32 == 0).all()
    reference = openslide.OpenSlide(BOXES)
    kept = {tuple(xy) for xy in store.coords.tolist()}
    for x in range(0, 300 - 31, 32):
        for y in range(0, 250 - 31, 32):
            region = np.asarray(reference.read_region((x, y), 0, (32, 32)).convert("RGB"))
            coloured = (rgb2hsv(region)[..., 1] > 0.5).mean()  # the boxes are saturated
            if (x, y) in kept:
                assert coloured > 0.25
                index = store.coords.tolist().index([x, y])
                level1 = reference.read_region((x, y), 1, (16, 16)).convert("RGB")
                np.testing.assert_array_equal(store.tiles[index], np.asarray(level1))
            else:
                assert coloured < 0.75


def test_tiles_are_resized_when_no_level_matches(tmp_path):
    out = tmp_path / "cmu.zarr"
    config = TilingConfig(target_mpp=CMU_MPP * 2.5, tile_size=32, tissue_threshold=0.9)
    tile_slide(CMU, out, config, "cmu", "tumor", "train")
    store = open_tile_store(out)
    assert (store.attrs["level"], store.attrs["tile_size_level0"]) == (0, 80)
    reference = openslide.OpenSlide(CMU)
    x, y = map(int, store.coords[len(store) // 2])
    region = np.asarray(reference.read_region((x, y), 0, (80, 80)).convert("RGB"))
    expected = resize(region, (32, 32), anti_aliasing=True, preserve_range=True)
    assert np.abs(store.tiles[len(store) // 2] - expected).mean() < 6


@pytest.mark.parametrize("slide_path, tile_size, why", [
    ("white", 32, "no tile has tissue_fraction >= 0.5 among 80 grid tiles"),
    (DATA / "small.svs", 64, r"the slide \(16 x 16 px at 0\.499 µm/px\) is smaller than one "
                             r"64-px tile at 0\.499 µm/px \(64 px of it\)"),
])
def test_a_slide_without_tissue_tiles_is_bad_input(tmp_path, write_tiff, slide_path, tile_size,
                                                   why):
    if slide_path == "white":
        slide_path = write_tiff("white.tiff", np.full((256, 320, 3), 250, np.uint8), mpp=0.5)
    with open_slide(slide_path) as slide:
        mpp = slide.mpp
    out, qc = tmp_path / "empty.zarr", tmp_path / "empty.qc.png"
    config = TilingConfig(target_mpp=mpp, tile_size=tile_size, tissue_threshold=0.5)
    with pytest.raises(InputError, match=f"no tissue: {why}.*on_bad_input: skip") as caught:
        tile_slide(slide_path, out, config, "s", "normal", "val", qc_path=qc)
    assert str(slide_path) in str(caught.value)
    assert not out.exists() and not qc.exists()
    # skip: an empty store that says why, and the thumbnail (the reader can check for tissue)
    assert tile_slide(slide_path, out, config, "s", "normal", "val", qc_path=qc,
                      on_bad_input="skip") == 0
    store = open_tile_store(out)
    assert store.attrs["n_tiles"] == 0
    assert store.tiles.shape == (0, tile_size, tile_size, 3) and store.coords.shape == (0, 2)
    [record] = store.attrs["rejected"]
    assert record["sample_id"] == "s" and record["path"] == str(slide_path)
    assert "no tissue" in record["reason"]
    with Image.open(qc) as picture:
        assert picture.format == "PNG" and picture.size[0] > 0


def truncated(tmp_path):
    """boxes.tiff cut to its first 3000 bytes: the header survives, the tiles do not."""
    path = tmp_path / "truncated.tiff"
    path.write_bytes((DATA / "boxes.tiff").read_bytes()[:3000])
    return path


def not_a_slide(tmp_path):
    path = tmp_path / "notes.tif"
    path.write_text("scanner log, not an image\n")
    return path


@pytest.mark.parametrize("make, problem", [(truncated, "truncated"),
                                           (not_a_slide, "cannot open")])
def test_an_unreadable_slide_fails_or_is_left_out(tmp_path, make, problem):
    path = make(tmp_path)
    out, qc = tmp_path / "out" / "s.zarr", tmp_path / "out" / "s.qc.png"
    config = TilingConfig(target_mpp=1.0, tile_size=16, tissue_threshold=0.5, fallback_mpp=0.5)
    with pytest.raises(InputError, match=problem) as caught:
        tile_slide(path, out, config, "s", "tumor", "test", qc_path=qc)
    assert str(path) in str(caught.value)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    assert tile_slide(path, out, config, "s", "tumor", "test", qc_path=qc,
                      on_bad_input="skip") == 0
    [record] = open_tile_store(out).attrs["rejected"]
    assert record["reason"] == str(caught.value).removesuffix(
        " (set on_bad_input: skip to leave the slide out)")
    with Image.open(qc) as picture:  # a card with the reason, in place of a thumbnail
        assert picture.width == QC_MAX_SIDE


def test_fallback_mpp_sets_the_grid_of_a_slide_without_mpp(tmp_path, write_tiff):
    image = np.full((128, 128, 3), (200, 100, 160), np.uint8)
    path = write_tiff("nores.tiff", image, mpp=None)
    config = TilingConfig(target_mpp=1.0, tile_size=32, tissue_threshold=0.5, fallback_mpp=0.5)
    tile_slide(path, tmp_path / "t.zarr", config, "s", "tumor", "train")
    store = open_tile_store(tmp_path / "t.zarr")
    assert store.attrs["slide_mpp"] == 0.5 and store.attrs["tile_size_level0"] == 64
    assert len(store) == 4


def test_a_72_dpi_tiff_is_refused_unless_fallback_mpp_is_set(tmp_path):
    # the resolution tags of a TIFF saved by an image editor: 72 dots per inch
    path = tmp_path / "screen.tiff"
    image = np.full((128, 128, 3), (200, 100, 160), np.uint8)
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb", resolution=(72, 72),
                     resolutionunit="INCH")
    with openslide.OpenSlide(path) as raw:
        stated = float(raw.properties[openslide.PROPERTY_NAME_MPP_X])
    assert stated == pytest.approx(25400 / 72) and stated > MAX_SLIDE_MPP
    config = TilingConfig(target_mpp=1.0, tile_size=32, tissue_threshold=0.5)
    with pytest.raises(InputError, match="352.8 µm/px.*tiling.fallback_mpp") as caught:
        tile_slide(path, tmp_path / "t.zarr", config, "s", "tumor", "train")
    assert str(path) in str(caught.value)
    config = TilingConfig(target_mpp=1.0, tile_size=32, tissue_threshold=0.5, fallback_mpp=0.5)
    tile_slide(path, tmp_path / "t.zarr", config, "s", "tumor", "train")
    store = open_tile_store(tmp_path / "t.zarr")
    assert store.attrs["slide_mpp"] == 0.5 and len(store) == 4


def test_qc_picture_draws_the_tissue_outline_and_the_kept_tiles():
    thumbnail = np.full((400, 500, 3), 240, np.uint8)   # within the size limits: not scaled
    mask = np.zeros((400, 500), bool)
    mask[80:320, 100:400] = True
    picture = np.asarray(qc_picture(thumbnail, mask, np.array([[150, 120]]), 60))
    assert picture.shape == (400, 500, 3)
    assert (picture[80, 250] == CONTOUR).all() and (picture[200, 100] == CONTOUR).all()
    inside_tile = picture[150, 180]
    assert inside_tile[2] > inside_tile[0]          # tinted blue
    assert (picture[250, 300] == 240).all()         # tissue without a tile: untouched
    assert (picture[5, 5] == 240).all()             # glass
    # a large thumbnail is shrunk and a small one enlarged, the tiles where they belong
    big = np.asarray(qc_picture(np.full((2000, 1000, 3), 240, np.uint8),
                                np.zeros((2000, 1000), bool), np.array([[500, 1000]]), 100))
    assert big.shape == (QC_MAX_SIDE, QC_MAX_SIDE // 2, 3)
    assert big[280, 140, 2] > big[280, 140, 0] and (big[240, 140] == 240).all()
    small = np.asarray(qc_picture(np.full((30, 20, 3), 240, np.uint8), np.zeros((30, 20), bool),
                                  np.array([[10, 20]]), 5))
    assert small.shape == (QC_MIN_SIDE * 3 // 2, QC_MIN_SIDE, 3)   # 16 times
    assert small[360, 200, 2] > small[360, 200, 0] and (small[300, 200] == 240).all()


def test_tiling_writes_a_qc_picture_of_the_slide(tmp_path):
    config = TilingConfig(target_mpp=CMU_MPP * 4, tile_size=32, tissue_threshold=0.5,
                          mask_pixels_per_tile=8)
    qc = tmp_path / "cmu.qc.png"
    n_tiles = tile_slide(CMU, tmp_path / "cmu.zarr", config, "cmu", "tumor", "train",
                         qc_path=qc)
    with Image.open(qc) as picture:
        pixels = np.asarray(picture.convert("RGB")).astype(int)
    # the thumbnail the mask came from: 8 mask pixels per 128-pixel tile, (185, 139) from
    # the file's own thumbnail, enlarged to the smallest picture width
    with open_slide(CMU) as slide:
        thumbnail, downsample = slide.thumbnail(128 / 8, 128 / 6)
    scale = QC_MIN_SIDE / 139
    size = (QC_MIN_SIDE, round(185 * scale))
    assert thumbnail.shape == (185, 139, 3) and pixels.shape == (*size[::-1], 3)
    under_all = np.asarray(Image.fromarray(thumbnail).resize(size, Image.Resampling.BILINEAR))
    assert (pixels == CONTOUR).all(axis=-1).sum() > 50
    store = open_tile_store(tmp_path / "cmu.zarr")
    centres = ((store.coords + 64) / downsample * scale).astype(int)
    drawn = pixels[centres[:, 1], centres[:, 0]]
    under = under_all[centres[:, 1], centres[:, 0]].astype(int)
    # every kept tile is tinted towards blue, where the tissue outline (holes) does not cross
    tinted = ~(drawn == CONTOUR).all(axis=1)
    assert len(drawn) == n_tiles and tinted.mean() > 0.8
    assert (drawn[tinted, 0] < under[tinted, 0]).all()
    assert (drawn[tinted, 2] >= under[tinted, 2]).all()


def test_without_a_qc_path_no_picture_is_drawn_or_encoded(tmp_path, monkeypatch, write_tiff):
    def refuse(*args, **kwargs):
        raise AssertionError("a QC picture that nobody asked for")

    for name in ("qc_picture", "left_out_picture", "png_bytes"):
        monkeypatch.setattr(tiling, name, refuse)
    config = TilingConfig(target_mpp=CMU_MPP * 4, tile_size=32, tissue_threshold=0.5)
    assert tile_slide(CMU, tmp_path / "cmu.zarr", config, "cmu", "tumor", "train",
                      workers=2) > 0
    white = write_tiff("white.tiff", np.full((256, 320, 3), 250, np.uint8), mpp=0.5)
    config = TilingConfig(target_mpp=0.5, tile_size=32, tissue_threshold=0.5, fallback_mpp=0.5)
    for slide in (white, not_a_slide(tmp_path)):  # no tissue; cannot be opened
        assert tile_slide(slide, tmp_path / f"{slide.stem}.zarr", config, "s", "normal",
                          "val", on_bad_input="skip") == 0
        with pytest.raises(InputError):
            tile_slide(slide, tmp_path / f"{slide.stem}.fail.zarr", config, "s", "normal",
                       "val", qc_path=tmp_path / "unused.png")
    assert not list(tmp_path.glob("*.png"))


def test_a_corrupt_slide_fails_without_leaving_a_store(tmp_path, corrupt_tiff):
    out = tmp_path / "out" / "corrupt.zarr"
    config = TilingConfig(target_mpp=BOXES_MPP, tile_size=32, tissue_threshold=0.0,
                          fallback_mpp=BOXES_MPP)
    with pytest.raises(InputError, match="corrupt") as caught:
        tile_slide(corrupt_tiff, out, config, "s", "tumor", "train", workers=2)
    assert str(corrupt_tiff) in str(caught.value)
    assert list(out.parent.iterdir()) == []
    # skip: the tiles read before the bad one are dropped with the store; the thumbnail
    # (from an intact coarser level) still makes the QC picture
    qc = out.parent / "corrupt.qc.png"
    assert tile_slide(corrupt_tiff, out, config, "s", "tumor", "train", workers=2, qc_path=qc,
                      on_bad_input="skip") == 0
    store = open_tile_store(out)
    assert len(store) == 0 and "corrupt" in store.attrs["rejected"][0]["reason"]
    assert sorted(path.name for path in out.parent.iterdir()) == ["corrupt.qc.png",
                                                                  "corrupt.zarr"]
    with Image.open(qc) as picture, open_slide(corrupt_tiff, BOXES_MPP) as slide:
        thumbnail, _ = slide.thumbnail(32 / 8)
        assert picture.height / picture.width == pytest.approx(
            thumbnail.shape[0] / thumbnail.shape[1], rel=0.02)  # not the card's


def test_a_failed_read_waits_for_the_other_readers_before_the_slide_is_closed(tmp_path,
                                                                             monkeypatch):
    # dask raises at a task's failure while others still read; closing the slide under a
    # read inside OpenSlide aborts the process (SIGABRT), so no read may outlive the slide
    read, close = Slide.read_rgb, Slide.close
    lock, calls, inside, inside_at_close = threading.Lock(), [0], [0], []

    def slow_or_failing_read(self, *args):
        with lock:
            calls[0] += 1
            failing = calls[0] == 2
            inside[0] += not failing
        if failing:
            raise InputError(f"{self.path}: cannot read region (injected)")
        try:
            time.sleep(0.2)  # the other readers are mid-read when the second read fails
            return read(self, *args)
        finally:
            with lock:
                inside[0] -= 1

    def recording_close(self):
        inside_at_close.append(inside[0])
        close(self)

    monkeypatch.setattr(Slide, "read_rgb", slow_or_failing_read)
    monkeypatch.setattr(Slide, "close", recording_close)
    config = TilingConfig(target_mpp=CMU_MPP, tile_size=64, tissue_threshold=0.0)
    out = tmp_path / "cmu.zarr"
    assert tile_slide(CMU, out, config, "s", "tumor", "train", workers=3,
                      on_bad_input="skip") == 0
    assert inside_at_close == [0]
    assert "injected" in open_tile_store(out).attrs["rejected"][0]["reason"]
    assert calls[0] <= 3 + 3  # the readers stop after their current read, not at the end


def test_a_dicom_whole_slide_image_is_tiled(tmp_path):
    path = DATA / "boxes_0.dcm"   # one file of a two-file series
    config = TilingConfig(target_mpp=0.499, tile_size=8, tissue_threshold=0.0)
    assert tile_slide(path, tmp_path / "d.zarr", config, "d", "tumor", "test") == 4
    store = open_tile_store(tmp_path / "d.zarr")
    reference = openslide.OpenSlide(path)
    for tile, (x, y) in zip(store.tiles[:], store.coords.tolist()):
        expected = reference.read_region((x, y), 0, (8, 8)).convert("RGB")
        np.testing.assert_array_equal(tile, np.asarray(expected))


GROUP_CONFIG = TilingConfig(target_mpp=BOXES_MPP, tile_size=32, tissue_threshold=0.5,
                            fallback_mpp=BOXES_MPP)


def group_of_slides(tmp_path, good: str, bad: str) -> tuple[Path, list[dict], Path]:
    """A data folder of boxes.tiff copies named by `good` and truncated ones by `bad`
    (`ab` -> a.tiff, b.tiff), their manifest rows, and a group's output folder."""
    data = tmp_path / "data"
    data.mkdir()
    for name in good:
        (data / f"{name}.tiff").write_bytes(BOXES.read_bytes())
    for name in bad:
        truncated(data).rename(data / f"{name}.tiff")
    slides = [{"slide_id": name, "path": f"{name}.tiff", "label": "tumor", "split": "train",
               "sha256": sha256_file(data / f"{name}.tiff")} for name in sorted(good + bad)]
    return data, slides, tmp_path / "tiles" / "groups" / "group-000000"


def counting_tile_slide(monkeypatch) -> list[str]:
    """The file names `tile_slide` is called with from a group job, from now on."""
    tiled = []
    monkeypatch.setattr(groups, "tile_slide",
                        lambda path, *args, **kwargs: tiled.append(path.name)
                        or tile_slide(path, *args, **kwargs))
    return tiled


@pytest.mark.parametrize("rerun_code, retiled", [("abc", ["c.tiff"]),
                                                   ("edited", ["a.tiff", "b.tiff", "c.tiff"])])
def test_a_failed_group_job_keeps_its_finished_slides_for_the_rerun(tmp_path, monkeypatch,
                                                                    rerun_code, retiled):
    """Under "fail" a bad slide stops its group job; once it is fixed, the rerun tiles only
    it (with the code unchanged) and the group folder holds every slide."""
    data, slides, group_dir = group_of_slides(tmp_path, good="ab", bad="c")
    config = GROUP_CONFIG
    with pytest.raises(InputError, match="c.tiff"):
        groups.tile_slide_group(data, group_dir, slides, config, code="abc")
    assert not group_dir.exists()

    (data / "c.tiff").write_bytes(BOXES.read_bytes())   # the bad slide replaced
    slides[2]["sha256"] = sha256_file(data / "c.tiff")
    tiled = counting_tile_slide(monkeypatch)
    counts = groups.tile_slide_group(data, group_dir, slides, config, code=rerun_code)
    assert tiled == retiled
    assert [count is None for count in counts.values()] == [
        f"{name}.tiff" not in retiled for name in "abc"]
    assert sorted(path.name for path in group_dir.iterdir()) == [
        f"{name}.{suffix}" for name in "abc" for suffix in ("qc.png", "zarr")]
    assert list(group_dir.parent.iterdir()) == [group_dir]   # no unfinished folder left
    reference = open_tile_store(group_dir / "a.zarr").tiles[:]
    for name in "abc":
        store = open_tile_store(group_dir / f"{name}.zarr")
        assert store.attrs["source_sha256"] == slides["abc".index(name)]["sha256"]
        np.testing.assert_array_equal(store.tiles[:], reference)   # the same image


def test_a_resumed_group_job_counts_the_tiles_of_the_slides_it_kept(tmp_path, monkeypatch,
                                                                   caplog):
    """Its log line once counted only the slides tiled in the rerun: c's tiles alone, and no
    slide without tiles though the failed run had left b out."""
    data, slides, group_dir = group_of_slides(tmp_path, good="ac", bad="b")
    def killed_at_c(path, *args, **kwargs):
        if path.name == "c.tiff":
            raise MemoryError("killed")
        return tile_slide(path, *args, **kwargs)

    monkeypatch.setattr(groups, "tile_slide", killed_at_c)
    with pytest.raises(MemoryError):   # a killed job: a tiled, b left out, c not done
        groups.tile_slide_group(data, group_dir, slides, GROUP_CONFIG, code="abc",
                                on_bad_input="skip")
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="medrobust.preprocess.groups"):
        counts = groups.tile_slide_group(data, group_dir, slides, GROUP_CONFIG, code="abc",
                                         on_bad_input="skip")
    assert counts["a"] is None and counts["b"] is None and counts["c"] > 0
    n_tiles = sum(open_tile_store(group_dir / f"{name}.zarr").attrs["n_tiles"] for name in "ac")
    assert (f"3 slides (2 kept from a failed run), {n_tiles} tiles, 1 slides without tiles"
            in caplog.text)


def test_after_a_bad_slide_stops_its_group_skip_keeps_the_finished_slides(tmp_path, monkeypatch):
    """The failure's advice (set on_bad_input: skip) costs no finished slide; a slide the
    skip run left out is kept under skip, tiled again under fail."""
    data, slides, group_dir = group_of_slides(tmp_path, good="a", bad="b")
    config = GROUP_CONFIG
    with pytest.raises(InputError, match="b.tiff"):
        groups.tile_slide_group(data, group_dir, slides, config, code="abc")
    tiled = counting_tile_slide(monkeypatch)
    counts = groups.tile_slide_group(data, group_dir, slides, config, code="abc",
                                     on_bad_input="skip")
    assert tiled == ["b.tiff"] and counts == {"a": None, "b": 0}

    # a failed run had left b out under skip (its ledger, written here); the rerun keeps
    # that only under skip, and under fail tiles b again, which stops the group again;
    # a slide whose files are gone is tiled again
    shutil.rmtree(group_dir)
    for on_bad_input, deleted, retiled in (("skip", None, []), ("fail", None, ["b.tiff"]),
                                           ("skip", "a.qc.png", ["a.tiff"])):
        work = groups.GroupWork(group_dir, {"tiling": dataclasses.asdict(config), "code": "abc"})
        for slide, left_out in (("a", False), ("b", True)):
            store = work.folder / f"{slide}.zarr"
            if not store.exists():   # a kept slide's store is read for the group's tile count
                create_tile_store(store, 0, config.tile_size, np.zeros((0, 2)), np.zeros(0), {})
            (work.folder / f"{slide}.qc.png").touch()
            work.mark_done(slide, {"row": slides["ab".index(slide)], "left_out": left_out})
        if deleted:
            (work.folder / deleted).unlink()
        tiled.clear()
        with pytest.raises(InputError) if on_bad_input == "fail" else contextlib.nullcontext():
            groups.tile_slide_group(data, group_dir, slides, config, code="abc",
                                    on_bad_input=on_bad_input)
        assert tiled == retiled
        shutil.rmtree(group_dir, ignore_errors=True)
