"""Tissue detection and slide tiling into tile stores."""

import logging
from pathlib import Path

import numpy as np
import openslide
import pytest
from skimage.color import rgb2hsv
from skimage.transform import resize

from medrobust.errors import ConfigError, InputError
from medrobust.io.checksums import sha256_file
from medrobust.io.slide_stores import open_tile_store
from medrobust.io.slides import open_slide
from medrobust.preprocess.tiling import TilingConfig, tile_slide
from medrobust.preprocess.tissue import tissue_mask

DATA = Path(__file__).parent / "data"
CMU = DATA / "CMU-1-Small-Region.svs"
BOXES = DATA / "boxes.tiff"
CMU_MPP = 0.499
TILE_ATTRS = {"slide_id", "label", "split", "tile_size", "tile_size_level0", "target_mpp",
              "level", "level_downsample", "slide_mpp", "source_path", "source_sha256",
              "tissue_threshold", "n_tiles"}


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


def test_row_runs_join_only_adjacent_tiles_of_one_row_up_to_the_longest():
    from medrobust.preprocess.tiling import _row_runs

    step = 10
    # row 0: x 0, 10, 20, 30 (adjacent), then a gap to 50; row 1 starts at x 60
    coords = np.array([[0, 0], [10, 0], [20, 0], [30, 0], [50, 0], [60, 10], [70, 10]])
    assert _row_runs(coords, step, longest=8) == [(0, 4), (4, 1), (5, 2)]
    assert _row_runs(coords, step, longest=3) == [(0, 3), (3, 1), (4, 1), (5, 2)]
    # the last tile of a row and the first of the next are never joined, even if x fits
    assert _row_runs(np.array([[0, 0], [10, 10]]), step, longest=8) == [(0, 1), (1, 1)]


def test_tiles_at_level0_lie_on_the_grid_and_match_openslide(tmp_path):
    out = tmp_path / "cmu.zarr"
    config = TilingConfig(target_mpp=CMU_MPP, tile_size=128, tissue_threshold=0.5)
    n_tiles = tile_slide(CMU, out, config, "cmu", "tumor", "train", workers=2)
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
    for index in (0, n_tiles // 2, n_tiles - 1):
        x, y = map(int, store.coords[index])
        expected = np.asarray(reference.read_region((x, y), 0, (128, 128)).convert("RGB"))
        np.testing.assert_array_equal(store.tiles[index], expected)


def test_tiles_come_from_the_matching_pyramid_level(tmp_path):
    with open_slide(BOXES) as slide:
        mpp = slide.mpp
    out = tmp_path / "boxes.zarr"
    config = TilingConfig(target_mpp=2 * mpp, tile_size=16, tissue_threshold=0.5)
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


@pytest.mark.parametrize("slide_path, tile_size", [
    ("white", 32),                       # no tissue anywhere
    (DATA / "small.svs", 64),            # smaller than one tile
])
def test_a_slide_without_tissue_tiles_gives_an_empty_store(tmp_path, caplog, write_tiff,
                                                            slide_path, tile_size):
    if slide_path == "white":
        slide_path = write_tiff("white.tiff", np.full((256, 320, 3), 250, np.uint8), mpp=0.5)
    with open_slide(slide_path) as slide:
        mpp = slide.mpp
    out = tmp_path / "empty.zarr"
    config = TilingConfig(target_mpp=mpp, tile_size=tile_size, tissue_threshold=0.5)
    with caplog.at_level(logging.WARNING):
        assert tile_slide(slide_path, out, config, "s", "normal", "val") == 0
    store = open_tile_store(out)
    assert store.attrs["n_tiles"] == 0
    assert store.tiles.shape == (0, tile_size, tile_size, 3) and store.coords.shape == (0, 2)
    assert "empty tile store" in caplog.text


def test_fallback_mpp_sets_the_grid_of_a_slide_without_mpp(tmp_path, write_tiff):
    image = np.full((128, 128, 3), (200, 100, 160), np.uint8)
    path = write_tiff("nores.tiff", image, mpp=None)
    config = TilingConfig(target_mpp=1.0, tile_size=32, tissue_threshold=0.5, fallback_mpp=0.5)
    tile_slide(path, tmp_path / "t.zarr", config, "s", "tumor", "train")
    store = open_tile_store(tmp_path / "t.zarr")
    assert store.attrs["slide_mpp"] == 0.5 and store.attrs["tile_size_level0"] == 64
    assert len(store) == 4


def test_a_corrupt_slide_fails_without_leaving_a_store(tmp_path, corrupt_tiff):
    out = tmp_path / "out" / "corrupt.zarr"
    with open_slide(corrupt_tiff) as slide:
        mpp = slide.mpp
    config = TilingConfig(target_mpp=mpp, tile_size=32, tissue_threshold=0.0)
    with pytest.raises(InputError, match="corrupt") as caught:
        tile_slide(corrupt_tiff, out, config, "s", "tumor", "train", workers=2)
    assert str(corrupt_tiff) in str(caught.value)
    assert list(out.parent.iterdir()) == []
