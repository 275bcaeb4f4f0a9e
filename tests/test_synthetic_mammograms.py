import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom import uid

from medrobust.data.manifest import read_manifest
from medrobust.data.sources import SOURCES
from medrobust.data.synthetic import fetch_synthetic
from medrobust.errors import ConfigError

HEIGHT, WIDTH = 320, 256
MG_FOR_PRESENTATION = uid.DigitalMammographyXRayImageStorageForPresentation


def _config(**source):
    return {"kind": "images", "classes": ["benign", "malignant"],
            "source": {"type": "synthetic", "modality": "mammography", "n_samples": 16,
                       "height": HEIGHT, "width": WIDTH, "malignant_fraction": 0.5,
                       "splits": {"train": 0.5, "val": 0.25, "test": 0.25}, **source}}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("mammograms")
    manifest = read_manifest(fetch_synthetic(_config(), out))
    images = {}
    for _, row in manifest.table.iterrows():
        images[row["sample_id"]] = pydicom.dcmread(manifest.absolute_path(row))
    return manifest, images, pd.read_csv(out / "lesions.csv")


def _display(ds) -> np.ndarray:
    """Stored values mapped so that bright means dense, whatever the photometric."""
    pixels = ds.pixel_array.astype(np.float64)
    return 4095 - pixels if ds.PhotometricInterpretation == "MONOCHROME1" else pixels


def test_manifest_lists_every_image(dataset):
    manifest, images, _ = dataset
    assert manifest.kind == "images" and manifest.classes == ["benign", "malignant"]
    assert len(manifest.table) == 16
    assert manifest.table["label"].value_counts().to_dict() == {"benign": 8, "malignant": 8}
    for label in ("benign", "malignant"):
        splits = manifest.table.loc[manifest.table["label"] == label, "split"]
        assert splits.value_counts().to_dict() == {"train": 4, "val": 2, "test": 2}


def test_dicom_tags_are_those_of_a_screening_mammogram(dataset):
    _, images, _ = dataset
    uids: set[str] = set()
    for ds in images.values():
        assert ds.file_meta.TransferSyntaxUID == uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == MG_FOR_PRESENTATION
        assert ds.SOPClassUID == MG_FOR_PRESENTATION
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "MG"
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
        assert (ds.PixelRepresentation, ds.SamplesPerPixel) == (0, 1)
        assert (ds.Rows, ds.Columns) == (HEIGHT, WIDTH)
        assert ds.ImageLaterality in ("L", "R") and ds.ViewPosition in ("CC", "MLO")
        assert float(ds.RescaleSlope) == 1 and float(ds.RescaleIntercept) == 0
        assert float(ds.WindowWidth) > 0 and 0 <= float(ds.WindowCenter) <= 4095
        assert len(ds.PixelSpacing) == 2 and float(ds.PixelSpacing[0]) > 0
        uids |= {ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID}
    assert len(uids) == 3 * len(images)
    photometrics = {ds.PhotometricInterpretation for ds in images.values()}
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}
    assert {(ds.ImageLaterality, ds.ViewPosition) for ds in images.values()} == {
        ("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO")}


def test_both_photometrics_decode_to_a_bright_breast_on_dark_background(dataset):
    _, images, _ = dataset
    breast_means = {"MONOCHROME1": [], "MONOCHROME2": []}
    for ds in images.values():
        pixels = ds.pixel_array
        assert pixels.shape == (HEIGHT, WIDTH) and pixels.max() <= 4095
        image = _display(ds)
        wall, far = (slice(0, 8), slice(-8, None))
        if ds.ImageLaterality == "R":
            wall, far = far, wall
        middle = slice(HEIGHT // 2 - 8, HEIGHT // 2 + 8)
        breast = image[middle, wall].mean()
        background = max(image[:8, far].mean(), image[-8:, far].mean())
        assert background < 0.1 * 4095 < 0.2 * 4095 < breast
        breast_means[ds.PhotometricInterpretation].append(breast)
    # after decoding, the two photometrics look alike
    difference = np.mean(breast_means["MONOCHROME1"]) - np.mean(breast_means["MONOCHROME2"])
    assert abs(difference) < 0.1 * 4095


def test_window_covers_the_decoded_breast(dataset):
    _, images, _ = dataset
    for ds in images.values():
        stored = ds.pixel_array.astype(np.float64)
        low = float(ds.WindowCenter) - float(ds.WindowWidth) / 2
        high = float(ds.WindowCenter) + float(ds.WindowWidth) / 2
        tissue = stored[(_display(ds) > 0.2 * 4095)]
        assert np.mean((tissue >= low) & (tissue <= high)) > 0.95


def test_lesions_mark_malignant_images_only(dataset):
    manifest, _, lesions = dataset
    assert list(lesions.columns) == ["sample_id", "lesion_type", "x", "y", "radius"]
    malignant = set(manifest.table.loc[manifest.table["label"] == "malignant", "sample_id"])
    assert set(lesions["sample_id"]) == malignant
    assert set(lesions["lesion_type"]) == {"mass", "calcification"}
    for _, group in lesions.groupby("sample_id"):
        kinds = set(group["lesion_type"])
        assert len(kinds) == 1
        if kinds == {"calcification"}:
            assert 5 <= len(group) <= 10
            # 1.6-2.4% of the short side: at least one pixel of the default 64 px store
            scale = min(HEIGHT, WIDTH)
            assert group["radius"].between(0.016 * scale - 0.05, 0.024 * scale + 0.05).all()
        else:
            assert len(group) == 1


def test_calcification_specks_are_bright_at_their_positions(dataset):
    _, images, lesions = dataset
    specks = lesions[lesions["lesion_type"] == "calcification"]
    for sample_id, group in specks.groupby("sample_id"):
        image = _display(images[sample_id])
        rows, cols = np.ogrid[:image.shape[0], :image.shape[1]]
        on_specks = np.logical_or.reduce([np.hypot(rows - y, cols - x) <= r + 1 for x, y, r in
                                          zip(group["x"], group["y"], group["radius"])])
        breast = image[(image > 0.2 * 4095) & ~on_specks]   # the tissue around them
        for x, y in zip(group["x"], group["y"]):
            assert image[y, x] >= 0.9 * 4095 > np.percentile(breast, 99)
        # specks, not a blob: only the specks' own few pixels are that bright
        bright = int((image >= 0.9 * 4095).sum())
        assert len(group) <= bright <= (np.pi * (group["radius"] + 0.5) ** 2).sum()


def test_masses_are_brighter_than_the_surrounding_tissue(dataset):
    _, images, lesions = dataset
    for _, mass in lesions[lesions["lesion_type"] == "mass"].iterrows():
        image = _display(images[mass["sample_id"]])
        y, x = int(mass["y"]), int(mass["x"])
        breast = image[image > 0.2 * 4095]
        assert image[y - 2:y + 3, x - 2:x + 3].mean() > np.percentile(breast, 95)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    small = {"n_samples": 4, "height": 96, "width": 80}
    digests = {}
    for name, seed in (("first", 3), ("again", 3), ("other", 4)):
        manifest = read_manifest(fetch_synthetic(_config(seed=seed, **small), tmp_path / name))
        digests[name] = manifest.table["sha256"].tolist()
    assert digests["first"] == digests["again"]
    assert (tmp_path / "first" / "lesions.csv").read_bytes() == (
        tmp_path / "again" / "lesions.csv").read_bytes()
    assert not set(digests["first"]) & set(digests["other"])


def test_registered_as_the_synthetic_source():
    assert SOURCES["synthetic"] is fetch_synthetic


def test_default_classes(tmp_path):
    config = _config(n_samples=2, height=64, width=64)
    del config["classes"]
    manifest = read_manifest(fetch_synthetic(config, tmp_path))
    assert manifest.classes == ["benign", "malignant"]


@pytest.mark.parametrize("change, expected", [
    ({"source": {"type": "synthetic", "modality": "mammography", "colour": "red"}},
     r"unknown key\(s\) colour"),
    ({"source": {"type": "synthetic", "modality": "ultrasound"}},
     "unknown synthetic modality 'ultrasound'; known: mammography, slides"),
    ({"source": {"type": "synthetic", "modality": "mammography", "n_samples": 0}},
     "n_samples must be an integer >= 1"),
    ({"source": {"type": "synthetic", "modality": "mammography", "malignant_fraction": 2}},
     r"malignant_fraction must be a number in \[0, 1\]"),
    ({"source": {"type": "synthetic", "modality": "mammography", "splits": {"train": 0.9}}},
     "sum to 1"),
    ({"kind": "slides"}, "kind 'images'"),
    ({"classes": ["a", "b", "c"]}, "two distinct class names"),
])
def test_config_errors(tmp_path, change, expected):
    config = {**_config(), **change}
    with pytest.raises(ConfigError, match=expected):
        fetch_synthetic(config, tmp_path)
