"""A store's missing or damaged chunk is an error naming it, never zeros
(medrobust.io.zarr_chunks, in the image, tile and feature stores)."""

import json

import google_crc32c
import numpy as np
import pytest
import zarr

from medrobust.errors import InputError
from medrobust.io.atomic import atomic_path
from medrobust.io.image_store import open_image_store, write_image_store
from medrobust.io.slide_stores import (create_tile_store, open_feature_store, open_tile_store,
                                       read_tiles, write_feature_store, write_tile_shard)
from medrobust.io.zarr_chunks import read_array


def _cut(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_a_feature_store_with_a_chunk_deleted_or_cut_is_refused(tmp_path):
    features = np.zeros((5, 4), np.float32)   # all zeros: zarr alone would not write the chunk
    features[4] = 1
    with atomic_path(tmp_path / "features.zarr") as tmp:
        write_feature_store(tmp, features, np.zeros((5, 2)), {"slide_id": "s"})
    np.testing.assert_array_equal(open_feature_store(tmp_path / "features.zarr").features, features)
    chunk = tmp_path / "features.zarr" / "features" / "c" / "0" / "0"
    _cut(chunk)
    with pytest.raises(InputError, match=r"features\.zarr/features: a chunk does not decode"):
        open_feature_store(tmp_path / "features.zarr")
    chunk.unlink()
    with pytest.raises(InputError, match=f"{chunk}: chunk \\(0, 0\\) of this array is missing"):
        open_feature_store(tmp_path / "features.zarr")


def test_an_image_store_with_an_image_deleted_or_its_labels_cut_is_refused(tmp_path):
    images = np.zeros((3, 1, 4, 4), np.float32)
    images[2] = 0.5
    write_image_store(tmp_path / "images.zarr", images, [0, 1, 0], ["train", "test", "test"],
                      ["a", "b", "c"], {"classes": ["x", "y"]})
    store = open_image_store(tmp_path / "images.zarr")
    np.testing.assert_array_equal(store.load("test")[0], images[1:])
    chunk = tmp_path / "images.zarr" / "images" / "c" / "1" / "0" / "0" / "0"
    chunk.unlink()
    np.testing.assert_array_equal(store.read([2, 0]), images[[2, 0]])  # other images still read
    with pytest.raises(InputError, match=f"{chunk}: chunk \\(1, 0, 0, 0\\) of this array is "
                                         "missing; the store is damaged"):
        store.load("test")
    _cut(tmp_path / "images.zarr" / "labels" / "c" / "0")
    with pytest.raises(InputError, match=r"images\.zarr/labels: a chunk does not decode"):
        open_image_store(tmp_path / "images.zarr")


def test_a_tile_store_with_a_shard_deleted_or_a_tile_unlisted_is_refused(tmp_path):
    tiles = np.zeros((70, 8, 8, 3), np.uint8)
    tiles[1] = 7
    with atomic_path(tmp_path / "tiles.zarr") as tmp:
        shards = create_tile_store(tmp, 70, 8, np.zeros((70, 2)), np.zeros(70), {})
        write_tile_shard(shards, 0, tiles[:64])
        write_tile_shard(shards, 64, tiles[64:])
    store = open_tile_store(tmp_path / "tiles.zarr")
    np.testing.assert_array_equal(read_tiles(store.tiles, range(70)), tiles)
    shard = tmp_path / "tiles.zarr" / "tiles" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    shard.unlink()
    np.testing.assert_array_equal(read_tiles(store.tiles, [65, 69]), tiles[[65, 69]])
    with pytest.raises(InputError, match=f"{shard}: tile shard missing; the store is damaged"):
        read_tiles(store.tiles, [69, 3])
    # tile 5's index entry says "not stored", with the index's checksum made to match
    index_start = len(data) - 64 * 16 - 4
    data[index_start + 5 * 16:index_start + 6 * 16] = b"\xff" * 16
    data[-4:] = google_crc32c.value(bytes(data[index_start:-4])).to_bytes(4, "little")
    shard.write_bytes(bytes(data))
    np.testing.assert_array_equal(read_tiles(store.tiles, [4, 6]), tiles[[4, 6]])
    with pytest.raises(InputError, match=f"{shard}: damaged tile shard \\(its tile 5 is not "
                                         "stored\\)"):
        read_tiles(store.tiles, [4, 5])
    (tmp_path / "tiles.zarr" / "coords" / "c" / "0" / "0").unlink()
    with pytest.raises(InputError, match=r"coords/c/0/0: chunk \(0, 0\) of this array is missing"):
        open_tile_store(tmp_path / "tiles.zarr")


def _edit_shape(array_folder, rows):
    metadata = json.loads((array_folder / "zarr.json").read_text())
    metadata["shape"][0] = rows
    (array_folder / "zarr.json").write_text(json.dumps(metadata))


def test_a_store_whose_arrays_disagree_on_their_rows_is_refused(tmp_path):
    """An array's metadata edited to fewer rows read as a shorter array: a slide's tiles
    dropped, or images scored against the wrong labels."""
    with atomic_path(tmp_path / "features.zarr") as tmp:
        write_feature_store(tmp, np.ones((5, 4)), np.zeros((5, 2)), {"slide_id": "s"})
    _edit_shape(tmp_path / "features.zarr" / "features", 3)
    with pytest.raises(InputError, match=r"features\.zarr: its arrays disagree on the number "
                                         r"of rows \(features 3, coords 5, n_tiles 5\)"):
        open_feature_store(tmp_path / "features.zarr")
    write_image_store(tmp_path / "images.zarr", np.zeros((3, 1, 4, 4)), [0, 1, 0],
                      ["test"] * 3, ["a", "b", "c"], {"classes": ["x", "y"]})
    _edit_shape(tmp_path / "images.zarr" / "splits", 2)
    with pytest.raises(InputError, match=r"images\.zarr: .*\(images 3, labels 3, splits 2, "
                                         r"sample_ids 3, n_images 3\)"):
        open_image_store(tmp_path / "images.zarr")


def test_an_array_written_by_zarr_itself_keeps_zarrs_reading(tmp_path):
    """Without the mark (zarr's own stores, or medrobust's before it), an absent chunk may be
    one zarr chose not to write, so it reads as the fill value, as zarr reads it."""
    array = zarr.create_array(tmp_path / "plain.zarr", data=np.arange(6.0).reshape(3, 2),
                              chunks=(1, 2))
    (tmp_path / "plain.zarr" / "c" / "1" / "0").unlink()
    np.testing.assert_array_equal(read_array(array, [1, 2]), [[0, 0], [4, 5]])
