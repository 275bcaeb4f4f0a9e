"""Image files to an image store: readers, resizing, channels, bad-input policy."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medrobust.errors import ConfigError, InputError
from medrobust.io.checksums import sha256_file
from medrobust.io.image_store import open_image_store
from medrobust.io.images import read_image, read_photo
from medrobust.preprocess.images import ImagePreprocessConfig, build_image_store, prepare_image

CT = Path(get_testdata_file("CT_small.dcm"))
SRC = Path(__file__).resolve().parents[1] / "src"
SIZE = ImagePreprocessConfig(image_size=16)


def _gray(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)


def _rgb(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_dataset(root: Path, files: dict[str, np.ndarray | Path], kind: str = "images") -> Path:
    """A dataset folder: PNGs from arrays, copies of Paths, then manifest + dataset.json."""
    root.mkdir(parents=True)
    rows = []
    for index, (sample_id, content) in enumerate(files.items()):
        if isinstance(content, Path):
            name = f"{sample_id}{content.suffix}"
            shutil.copy(content, root / name)
        else:
            name = f"{sample_id}.png"
            Image.fromarray(content).save(root / name)
        rows.append({"sample_id": sample_id, "path": name,
                     "label": ("benign", "malignant")[index % 2],
                     "split": ("train", "val", "test")[index % 3],
                     "sha256": sha256_file(root / name)})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    (root / "dataset.json").write_text(json.dumps({"classes": ["benign", "malignant"],
                                                   "kind": kind}))
    return root / "manifest.csv"


# --- readers -----------------------------------------------------------------

def test_read_photo_gray_colour_and_16_bit(tmp_path):
    gray, rgb = _gray(5, 7, 0), _rgb(5, 7, 1)
    Image.fromarray(gray).save(tmp_path / "g.png")
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=100, subsampling=0)
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "deep.png")
    np.testing.assert_allclose(read_photo(tmp_path / "g.png"), gray / 255.0, atol=1e-6)
    colour = read_image(tmp_path / "c.jpg")
    assert colour.shape == (5, 7, 3) and colour.dtype == np.float32
    assert np.abs(colour - rgb / 255.0).mean() < 0.05  # JPEG is lossy
    deep = read_image(tmp_path / "deep.png")
    assert deep.dtype == np.float32 and deep.max() == 1.0


def test_read_image_dispatches_dicom_by_suffix_and_by_content(tmp_path):
    shutil.copy(CT, tmp_path / "no_suffix")
    shutil.copy(CT, tmp_path / "exported.jpg")   # some exports name DICOM files .jpg
    by_suffix = read_image(CT)
    assert by_suffix.shape == (128, 128) and 0 <= by_suffix.min() <= by_suffix.max() <= 1
    np.testing.assert_array_equal(read_image(tmp_path / "no_suffix"), by_suffix)
    np.testing.assert_array_equal(read_image(tmp_path / "exported.jpg"), by_suffix)


def test_bad_photos_raise_input_errors_naming_them(tmp_path):
    Image.fromarray(_rgb(64, 64, 2)).save(tmp_path / "whole.png")
    cut = tmp_path / "cut.png"
    cut.write_bytes((tmp_path / "whole.png").read_bytes()[:2000])
    junk = tmp_path / "junk.jpg"
    junk.write_text("no image here")
    for path, message in ((cut, "truncated or corrupt"), (junk, "not a readable image"),
                          (tmp_path / "gone.png", "not found"),
                          (tmp_path / "scan.gif", "unsupported image format")):
        with pytest.raises(InputError, match=message) as caught:
            read_image(path)
        assert str(path) in str(caught.value)


# --- resizing and channels ---------------------------------------------------------

def test_prepare_pads_tall_images_to_a_centred_square():
    tall = np.ones((40, 20), np.float32)
    square = prepare_image(tall, 20, channels=1)
    assert square.shape == (1, 20, 20) and square.dtype == np.float32
    assert square[0, :, :4].max() < 0.05 and square[0, :, -4:].max() < 0.05  # black padding
    np.testing.assert_allclose(square[0, :, 6:14], 1.0, atol=0.01)  # the image, unstretched


def test_prepare_is_anti_aliased():
    checkerboard = (np.indices((64, 64)).sum(axis=0) % 2).astype(np.float32)
    small = prepare_image(checkerboard, 8, channels=1)
    np.testing.assert_allclose(small, 0.5, atol=0.05)  # not a pattern of 0s and 1s


def test_prepare_converts_channels():
    gray = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    as_rgb = prepare_image(gray, 8, channels=3)
    assert as_rgb.shape == (3, 8, 8)
    np.testing.assert_array_equal(as_rgb[0], as_rgb[2])
    red = np.zeros((8, 8, 3), np.float32)
    red[..., 0] = 1.0
    as_gray = prepare_image(red, 8, channels=1)
    assert as_gray.shape == (1, 8, 8) and 0.1 < as_gray.mean() < 0.4  # red is dark in luma


# --- the store ---------------------------------------------------------------------

def test_store_has_the_contract_shapes_and_attrs(tmp_path):
    manifest = write_dataset(tmp_path / "mammo", {
        "a": _gray(30, 20, 0), "b": _gray(32, 24, 1), "c": _rgb(20, 20, 2), "d": CT,
        "e": _gray(16, 16, 3)})
    out = build_image_store(manifest, tmp_path / "out" / "mammo.zarr", SIZE)
    store = open_image_store(out)
    assert store.images.shape == (5, 1, 16, 16) and store.images.dtype == np.float32
    assert store.images.chunks == (1, 1, 16, 16)
    images = np.asarray(store.images[:])
    assert 0 <= images.min() and images.max() <= 1
    assert list(store.sample_ids) == ["a", "b", "c", "d", "e"]
    assert store.labels.tolist() == [0, 1, 0, 1, 0]
    assert list(store.splits) == ["train", "val", "test", "train", "val"]
    assert store.attrs["dataset"] == "mammo"
    assert store.attrs["classes"] == ["benign", "malignant"]
    assert (store.attrs["image_size"], store.attrs["channels"]) == (16, 1)
    assert store.attrs["source_manifest_sha256"] == sha256_file(manifest)
    assert store.attrs["rejected"] == []
    np.testing.assert_allclose(images[3], prepare_image(read_image(CT), 16, 1), atol=1e-6)
    assert sorted(p.name for p in out.parent.iterdir()) == ["mammo.zarr"]  # no scratch left


def test_colour_is_decided_by_the_first_readable_image(tmp_path):
    manifest = write_dataset(tmp_path / "skin", {"a": _rgb(20, 20, 0), "b": _gray(20, 20, 1)})
    store = open_image_store(build_image_store(manifest, tmp_path / "skin.zarr", SIZE))
    assert store.images.shape == (2, 3, 16, 16) and store.attrs["channels"] == 3
    converted = np.asarray(store.images[1])
    np.testing.assert_array_equal(converted[0], converted[1])


def test_parallel_reading_keeps_manifest_order(tmp_path):
    files = {f"s{index:02d}": _gray(20 + index, 20, index) for index in range(12)}
    manifest = write_dataset(tmp_path / "data", files)
    one = open_image_store(build_image_store(manifest, tmp_path / "one.zarr", SIZE))
    two = open_image_store(build_image_store(manifest, tmp_path / "two.zarr", SIZE, workers=3))
    assert list(two.sample_ids) == sorted(files)
    np.testing.assert_array_equal(np.asarray(one.images[:]), np.asarray(two.images[:]))


@pytest.fixture
def dataset_with_bad_files(tmp_path) -> Path:
    """Six rows: a good PNG, a truncated PNG, a good one, a file changed after the
    manifest, a deleted file and a last good one."""
    manifest = write_dataset(tmp_path / "data", {
        "ok1": _gray(20, 20, 0), "cut": _gray(64, 64, 1), "ok2": _gray(20, 20, 2),
        "changed": _gray(20, 20, 3), "gone": _gray(20, 20, 4), "ok3": _gray(20, 20, 5)})
    root = manifest.parent
    content = (root / "cut.png").read_bytes()
    (root / "cut.png").write_bytes(content[:len(content) // 2])
    Image.fromarray(_gray(20, 20, 99)).save(root / "changed.png")
    (root / "gone.png").unlink()
    # the truncated file must fail on decoding, not on its checksum
    table = pd.read_csv(manifest)
    table.loc[table.sample_id == "cut", "sha256"] = sha256_file(root / "cut.png")
    table.to_csv(manifest, index=False)
    return manifest


def test_fail_policy_lists_every_bad_file_and_writes_nothing(tmp_path, dataset_with_bad_files):
    out = tmp_path / "out" / "data.zarr"
    with pytest.raises(InputError) as caught:
        build_image_store(dataset_with_bad_files, out, SIZE, on_bad_input="fail", workers=2)
    message = str(caught.value)
    root = dataset_with_bad_files.parent
    assert "3 image(s) are unreadable" in message
    assert f"{root / 'cut.png'}: image data truncated" in message
    assert f"{root / 'changed.png'}: sha256" in message
    assert f"{root / 'gone.png'}: file not found" in message
    assert list(out.parent.iterdir()) == []


def test_skip_policy_leaves_bad_files_out_and_lists_them(tmp_path, dataset_with_bad_files,
                                                         caplog):
    with caplog.at_level(logging.WARNING):
        out = build_image_store(dataset_with_bad_files, tmp_path / "data.zarr", SIZE,
                                on_bad_input="skip", workers=2)
    store = open_image_store(out)
    assert list(store.sample_ids) == ["ok1", "ok2", "ok3"]
    assert store.labels.tolist() == [0, 0, 1]
    assert [entry["sample_id"] for entry in store.attrs["rejected"]] == ["cut", "changed", "gone"]
    assert store.attrs["rejected"][0]["path"] == "cut.png"
    assert "truncated" in store.attrs["rejected"][0]["reason"]
    assert "left out 3 unreadable image(s)" in caplog.text


def test_a_file_that_cannot_be_read_is_that_samples_problem(tmp_path):
    """A file that cannot be read while hashing (no permission; here a folder, which root
    cannot read either) is named; in a store, a folder where a file should be is said to be
    one, and skip leaves the sample out."""
    from medrobust.io.checksums import sha256_file

    (tmp_path / "folder.png").mkdir()
    with pytest.raises(InputError, match=r"folder.png: cannot read file \(Is a directory\)"):
        sha256_file(tmp_path / "folder.png")
    manifest = write_dataset(tmp_path / "data", {"ok": _gray(20, 20, 0), "odd": _gray(20, 20, 1)})
    (manifest.parent / "odd.png").unlink()
    (manifest.parent / "odd.png").mkdir()
    store = open_image_store(build_image_store(manifest, tmp_path / "data.zarr", SIZE,
                                               on_bad_input="skip"))
    assert list(store.sample_ids) == ["ok"]
    assert store.attrs["rejected"][0]["reason"].endswith("odd.png: not a file")


def test_a_dataset_with_no_readable_image_fails_even_when_skipping(tmp_path):
    manifest = write_dataset(tmp_path / "data", {"a": _gray(8, 8, 0)})
    (manifest.parent / "a.png").write_bytes(b"broken")
    with pytest.raises(InputError, match="no image is readable"):
        build_image_store(manifest, tmp_path / "x.zarr", SIZE, on_bad_input="skip")


def test_config_and_policy_are_checked(tmp_path):
    assert ImagePreprocessConfig.from_mapping({"image_size": 64}).image_size == 64
    with pytest.raises(ConfigError, match="image_sise"):
        ImagePreprocessConfig.from_mapping({"image_sise": 64})
    with pytest.raises(ConfigError, match="image_size"):
        ImagePreprocessConfig(image_size=0)
    manifest = write_dataset(tmp_path / "data", {"a": _gray(8, 8, 0)})
    with pytest.raises(ConfigError, match="on_bad_input"):
        build_image_store(manifest, tmp_path / "x.zarr", SIZE, on_bad_input="ignore")
    slides = write_dataset(tmp_path / "slides", {"a": _gray(8, 8, 0)}, kind="slides")
    with pytest.raises(InputError, match="kind 'images'"):
        build_image_store(slides, tmp_path / "y.zarr", SIZE)


def test_a_rerun_removes_the_scratch_copy_a_killed_run_left(tmp_path):
    """Killed while resizing, a run leaves its float32 scratch copy; the next run removes it."""
    manifest = write_dataset(tmp_path / "ds", {f"s{i}": _gray(20, 30, i) for i in range(4)})
    out = tmp_path / "preprocessed" / "ds.zarr"
    script = (
        "import os, signal, sys\n"
        "import medrobust.preprocess.images as images\n"
        "from medrobust.preprocess.images import ImagePreprocessConfig, build_image_store\n"
        "prepare, calls = images.prepare_image, []\n"
        "def prepare_then_die(*args):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return prepare(*args)\n"
        "images.prepare_image = prepare_then_die\n"
        "build_image_store(sys.argv[1], sys.argv[2], ImagePreprocessConfig(image_size=16))\n")
    result = subprocess.run([sys.executable, "-c", script, str(manifest), str(out)],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    assert result.returncode == -signal.SIGKILL, result.stderr
    left = [path for path in out.parent.iterdir() if path.name.endswith(".scratch")]
    assert len(left) == 1 and (left[0] / "images.npy").exists() and not out.exists()

    build_image_store(manifest, out, SIZE)
    assert sorted(path.name for path in out.parent.iterdir()) == ["ds.zarr"]
