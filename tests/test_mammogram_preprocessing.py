"""Mammograms as screening models see them: breast crop, one laterality, any aspect, full
precision (medrobust.preprocess.mammograms through build_image_store)."""

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from test_preprocess_images import write_dataset

from medrobust.data.manifest import read_manifest
from medrobust.data.synthetic import fetch_synthetic
from medrobust.errors import ConfigError
from medrobust.io.dicom import read_dicom_laterality
from medrobust.io.image_store import open_image_store
from medrobust.preprocess.images import ImagePreprocessConfig, build_image_store, prepare_image
from medrobust.preprocess.mammograms import breast_mask, chest_wall_side, crop_to_breast

SCREENING = {"image_size": [80, 64], "breast_crop": True, "uniform_laterality": True}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Eight synthetic DICOM mammograms: both sides, both views, both photometrics."""
    out = tmp_path_factory.mktemp("mammograms")
    config = {"kind": "images", "classes": ["benign", "malignant"],
              "source": {"type": "synthetic", "modality": "mammography", "n_samples": 8,
                         "height": 160, "width": 128, "malignant_fraction": 0.5,
                         "splits": {"train": 0.5, "val": 0.25, "test": 0.25}}}
    return read_manifest(fetch_synthetic(config, out))


def store_of(manifest_path, out, **preprocess):
    return open_image_store(build_image_store(manifest_path, out,
                                              ImagePreprocessConfig(**preprocess)))


def tissue_halves(image):
    """Sums of the left and right halves of a stored (C, H, W) image."""
    half = image.shape[-1] // 2
    return image[..., :half].sum(), image[..., -half:].sum()


def mirrored(ds: pydicom.Dataset, laterality: str | None) -> pydicom.Dataset:
    """The same breast seen from the other side: pixels flipped left to right."""
    copy = pydicom.dcmread(ds.filename)
    copy.PixelData = np.ascontiguousarray(copy.pixel_array[:, ::-1]).tobytes()
    if laterality is None:
        del copy.ImageLaterality
    else:
        copy.ImageLaterality = laterality
    return copy


@pytest.mark.parametrize("tags", [True, False], ids=["laterality tag", "from the image"])
def test_a_right_and_a_left_breast_come_out_the_same_way_round(synthetic, tmp_path, tags):
    row = synthetic.table.iloc[0]
    left = pydicom.dcmread(synthetic.absolute_path(row))
    assert left.ImageLaterality == "L"
    if not tags:
        del left.ImageLaterality
    files = {}
    for name, ds in (("left", left), ("right", mirrored(left, "R" if tags else None))):
        ds.save_as(tmp_path / f"{name}.dcm")
        files[name] = tmp_path / f"{name}.dcm"
    manifest = write_dataset(tmp_path / "pair", files)

    store = store_of(manifest, tmp_path / "pair.zarr", **SCREENING)
    np.testing.assert_allclose(store.images[0], store.images[1], atol=1e-6)
    # the chest wall (and the pectoral muscle, on this CC view none) on the left
    left_sum, right_sum = tissue_halves(store.images[0])
    assert left_sum > right_sum
    # without the option they stay mirror images of each other
    kept = store_of(manifest, tmp_path / "kept.zarr", image_size=[80, 64], breast_crop=True)
    np.testing.assert_allclose(kept.images[0], kept.images[1][..., ::-1], atol=1e-6)
    assert not np.allclose(kept.images[0], kept.images[1], atol=1e-3)


def test_every_synthetic_mammogram_has_its_chest_wall_on_the_left(synthetic, tmp_path):
    sides = {read_dicom_laterality(synthetic.absolute_path(row))
             for _, row in synthetic.table.iterrows()}
    assert sides == {"L", "R"}
    store = store_of(synthetic.path, tmp_path / "screening.zarr", **SCREENING)
    assert store.images.shape == (8, 1, 80, 64)
    for image in store.images[:]:
        left_sum, right_sum = tissue_halves(image)
        assert left_sum > 1.1 * right_sum
        # padded on the nipple's side: the chest wall is the left edge
        assert image[0, :, 0].mean() > 0.1 and image[0, :, -1].mean() < 0.05
    assert store.attrs["breast_crop"] and store.attrs["uniform_laterality"]
    assert store.attrs["image_size"] == [80, 64]


def test_the_crop_keeps_the_breast_and_its_pectoral_muscle_and_drops_a_marker():
    image = np.zeros((100, 80), dtype=np.float32)
    rows, cols = np.mgrid[0:100, 0:80]
    breast = np.hypot(cols / 50, (rows - 50) / 40) < 1  # against the left edge, rows 10-90
    image[breast] = 0.4
    pectoral = breast & (cols / 20 + (rows - 10) / 30 < 1)  # brighter, in the upper corner
    image[pectoral] = 0.7
    image[92:98, 70:78] = 0.95  # a burned-in marker, brightest of all but apart
    mask = breast_mask(image)
    assert mask[pectoral].all() and mask[breast].all()
    assert not mask[92:98, 70:78].any()
    assert crop_to_breast(image).shape == (rows[breast].max() - rows[breast].min() + 1,
                                           cols[breast].max() + 1)


def test_without_a_laterality_the_side_with_more_tissue_is_the_chest_wall():
    image = np.zeros((20, 20), dtype=np.float32)
    image[:, 14:] = 0.5
    image[5:15, 8:14] = 0.3  # the breast thins towards the nipple, on the left
    assert chest_wall_side(image, None) == "R"
    assert chest_wall_side(image[:, ::-1], None) == "L"
    assert chest_wall_side(image, "L") == "L"  # a tag wins over the pixels


def _twelve_bit_dicom(path, pixels, **tags):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.set_pixel_data(pixels.astype(np.uint16), "MONOCHROME2", 12)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_twelve_bit_values_reach_the_store_unquantised(tmp_path):
    # a breast of 2048 distinct 12-bit values against a black background, no window:
    # read as (value - 0) / 4095; an 8-bit step anywhere would leave at most 256 levels
    pixels = np.zeros((64, 64), dtype=np.uint16)
    pixels[:, :32] = 2048 + np.arange(64 * 32).reshape(64, 32)
    pixels[0, 63] = 4095  # the stretch reaches 4095, so a level is 1/4095
    path = _twelve_bit_dicom(tmp_path / "ramp.dcm", pixels, Laterality="L")
    manifest = write_dataset(tmp_path / "ramp", {"ramp": path})
    store = store_of(manifest, tmp_path / "ramp.zarr", image_size=[64, 32], breast_crop=True,
                     uniform_laterality=True)
    stored = store.images[0, 0]
    assert store.images.dtype == np.float32
    np.testing.assert_allclose(stored * 4095, pixels[:, :32], atol=1e-3)
    assert len(np.unique(np.round(stored * 4095))) == 64 * 32


def test_laterality_comes_from_image_laterality_then_laterality(tmp_path, synthetic):
    path = synthetic.absolute_path(synthetic.table.iloc[0])
    assert read_dicom_laterality(path) == "L"
    pixels = np.zeros((8, 8))
    assert read_dicom_laterality(_twelve_bit_dicom(tmp_path / "a.dcm", pixels,
                                                   Laterality="R")) == "R"
    assert read_dicom_laterality(_twelve_bit_dicom(tmp_path / "b.dcm", pixels,
                                                   ImageLaterality="L", Laterality="R")) == "L"
    assert read_dicom_laterality(_twelve_bit_dicom(tmp_path / "c.dcm", pixels,
                                                   ImageLaterality="B")) is None
    assert read_dicom_laterality(get_testdata_file("CT_small.dcm")) is None


def test_a_non_square_size_pads_to_its_aspect_centred_or_on_the_right():
    image = np.ones((20, 20), dtype=np.float32)
    out = prepare_image(image, (40, 20), 1)
    assert out.shape == (1, 40, 20)
    np.testing.assert_allclose(out[0, 10:30], 1.0, atol=1e-6)
    np.testing.assert_allclose(out[0, :10], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[0, 30:], 0.0, atol=1e-6)
    wide = prepare_image(image, (20, 40), 1, pad_right=True)
    np.testing.assert_allclose(wide[0, :, :20], 1.0, atol=1e-6)
    np.testing.assert_allclose(wide[0, :, 20:], 0.0, atol=1e-6)


@pytest.mark.parametrize("settings, message", [
    ({"image_size": [64]}, "image_size must be a side or"),
    ({"image_size": [64, 0]}, "image_size must be a positive integer"),
    ({"image_size": 64, "breast_crop": "yes"}, "breast_crop must be true or false"),
])
def test_bad_preprocess_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        ImagePreprocessConfig.from_mapping(settings)


@pytest.mark.parametrize("laterality", ["L", "R"])
def test_the_store_records_where_each_source_pixel_landed(tmp_path, laterality):
    # a breast against the chest wall of its side, a bright 3x3 speck inside it
    pixels = np.zeros((120, 90), dtype=np.uint16)
    rows, cols = np.mgrid[0:120, 0:90]
    from_wall = cols - 5 if laterality == "L" else 84 - cols
    pixels[(np.hypot(from_wall / 60, (rows - 62) / 45) < 1) & (from_wall >= 0)] = 1500
    speck_x, speck_y = (30, 50) if laterality == "L" else (59, 50)
    pixels[speck_y - 1:speck_y + 2, speck_x - 1:speck_x + 2] = 4000
    path = _twelve_bit_dicom(tmp_path / "breast.dcm", pixels, ImageLaterality=laterality)
    manifest = write_dataset(tmp_path / "one", {"breast": path})
    store = store_of(manifest, tmp_path / "one.zarr", **SCREENING)
    sx, tx, sy, ty = store.attrs["geometry"]["breast"]
    # the speck's centre (pixel centres at i + 0.5) to the store's pixel indices
    x, y = sx * (speck_x + 0.5) + tx - 0.5, sy * (speck_y + 0.5) + ty - 0.5
    brightest = np.unravel_index(np.argmax(store.images[0, 0]), (80, 64))
    assert abs(brightest[0] - y) <= 1 and abs(brightest[1] - x) <= 1
    assert (sx < 0) == (laterality == "R")
