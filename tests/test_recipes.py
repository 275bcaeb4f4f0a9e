"""Recipes: label parsing on fixtures in the real table formats, and their downloads."""

import csv
import hashlib
import io
import logging
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fixtures_http import write_medmnist_npz
from medrobust.data.assemble import Sample
from medrobust.data.download import ChecksumMismatch, DownloadError
from medrobust.data.manifest import read_manifest
from medrobust.data.recipes import RECIPES, camelyon16, cbis_ddsm, medmnist
from medrobust.data.recipes.rsna_pneumonia import CredentialsMissing
from medrobust.data.sources import SOURCES, fetch_dataset
from medrobust.errors import ConfigError, InputError

FIXTURES = Path(__file__).parent / "data" / "recipes"
FAST = {"attempts": 2, "backoff_s": 0}


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def zip_bytes(members: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def dicom_bytes(rows: int, columns: int, value: int = 0) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"  # digital mammography
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.PixelData = np.full((rows, columns), value, np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_every_recipe_is_registered(tmp_path):
    with pytest.raises(ConfigError, match="unknown data source 'medmnst'.*medmnist"):
        fetch_dataset({"source": {"type": "medmnst"}}, tmp_path)
    assert set(RECIPES) <= set(SOURCES)


# --- MedMNIST --------------------------------------------------------------------------

def medmnist_config(url=None, **source):
    return {"source": {"type": "medmnist", "flag": "pneumoniamnist", "size": 28,
                       "download": FAST, **({"url": url} if url else {}), **source}}


def test_medmnist_npz_becomes_one_png_per_sample(http_server, tmp_path):
    npz = write_medmnist_npz(tmp_path / "pneumoniamnist.npz")
    url = http_server.serve("/pneumoniamnist.npz", npz.read_bytes())
    config = medmnist_config(url, md5=md5(npz.read_bytes()))
    manifest = read_manifest(fetch_dataset(config, tmp_path / "pneumonia"))
    assert manifest.classes == ["normal", "pneumonia"] and manifest.kind == "images"
    table = manifest.table
    assert table["split"].value_counts().to_dict() == {"train": 8, "val": 4, "test": 4}
    arrays = np.load(npz)
    for split in ("train", "test"):
        rows = table[table["split"] == split].reset_index(drop=True)
        for index in (0, len(rows) - 1):
            pixels = np.asarray(Image.open(manifest.root / rows.loc[index, "path"]))
            assert np.array_equal(pixels, arrays[f"{split}_images"][index])
            label = int(arrays[f"{split}_labels"][index, 0])
            assert rows.loc[index, "label"] == manifest.classes[label]
            data = (manifest.root / rows.loc[index, "path"]).read_bytes()
            assert rows.loc[index, "sha256"] == sha256(data)


def test_medmnist_rgb_flag_at_64_px(tmp_path):
    npz = write_medmnist_npz(tmp_path / "bloodmnist_64.npz", n_classes=8, size=64, channels=3)
    config = {"source": {"type": "medmnist", "flag": "bloodmnist", "size": 64,
                         "path": str(npz), "md5": md5(npz.read_bytes())}}
    manifest = read_manifest(fetch_dataset(config, tmp_path / "blood"))
    assert manifest.classes[0] == "basophil" and len(manifest.classes) == 8
    first = Image.open(manifest.root / manifest.table.loc[0, "path"])
    assert first.mode == "RGB" and first.size == (64, 64)


def test_medmnist_chestmnist_needs_a_finding(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
        labels = np.zeros((4, 14), np.uint8)
        labels[[0, 2], 6] = 1                                   # column 6: pneumonia
        labels[1, 0] = 1
        arrays[f"{split}_labels"] = labels
    np.savez_compressed(tmp_path / "chestmnist.npz", **arrays)
    source = {"type": "medmnist", "flag": "chestmnist", "path": str(tmp_path / "chestmnist.npz"),
              "md5": md5((tmp_path / "chestmnist.npz").read_bytes())}
    with pytest.raises(ConfigError, match="multi-label.*finding"):
        fetch_dataset({"source": source}, tmp_path / "chest")
    manifest = read_manifest(fetch_dataset({"source": {**source, "finding": "pneumonia"}},
                                           tmp_path / "chest"))
    assert manifest.classes == ["no pneumonia", "pneumonia"]
    assert manifest.table["label"].tolist()[:4] == ["pneumonia", "no pneumonia",
                                                    "pneumonia", "no pneumonia"]


def test_medmnist_label_outside_the_classes_names_the_row(tmp_path):
    npz = write_medmnist_npz(tmp_path / "x.npz", n_classes=3)  # pneumoniamnist has two
    config = {"source": {"type": "medmnist", "flag": "pneumoniamnist", "path": str(npz),
                         "md5": md5(npz.read_bytes())}}
    with pytest.raises(InputError, match="train_labels\\[2\\] is 2, not a class index 0..1"):
        fetch_dataset(config, tmp_path / "out")


def test_medmnist_official_checksum_guards_a_mirror(http_server, tmp_path):
    npz = write_medmnist_npz(tmp_path / "pneumoniamnist.npz")
    url = http_server.serve("/mirror/pneumoniamnist.npz", npz.read_bytes())
    with pytest.raises(ChecksumMismatch, match="28209eda62fecd6e6a2d98b1501bb15f"):
        fetch_dataset(medmnist_config(url), tmp_path / "out")   # no md5: the official one
    assert not (tmp_path / ".downloads" / "out" / "pneumoniamnist.npz").exists()
    with pytest.raises(ChecksumMismatch):
        fetch_dataset({"source": {"type": "medmnist", "flag": "pneumoniamnist",
                                  "path": str(npz)}}, tmp_path / "out")


def test_medmnist_table_covers_every_2d_flag_and_size():
    assert len(medmnist.FLAGS) == 12
    for info in medmnist.FLAGS.values():
        assert set(info.md5) == {28, 64, 128, 224}
        assert all(len(digest) == 32 and int(digest, 16) >= 0 for digest in info.md5.values())
    assert medmnist.official_url("pneumoniamnist", 28) \
        == "https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1"
    assert medmnist.official_url("dermamnist", 224).endswith("/dermamnist_224.npz?download=1")


@pytest.mark.parametrize("source, fragment", [
    ({"flag": "pneumonia"}, "unknown MedMNIST 2D flag 'pneumonia'; known: bloodmnist"),
    ({"flag": "pneumoniamnist", "size": 32}, "size must be one of 28, 64, 128, 224"),
    ({"flag": "organmnist3d"}, "unknown MedMNIST 2D flag"),
    ({"flag": "pneumoniamnist", "finding": "x"}, "chestmnist only"),
    ({"flag": "pneumoniamnist", "sizes": 28}, "unknown key\\(s\\) sizes"),
])
def test_medmnist_config_errors(tmp_path, source, fragment):
    with pytest.raises(ConfigError, match=fragment):
        fetch_dataset({"source": {"type": "medmnist", **source}}, tmp_path / "out")


def test_recipe_classes_must_match_the_config(tmp_path):
    config = {"classes": ["pneumonia", "normal"], "source": {"type": "medmnist",
                                                           "flag": "pneumoniamnist"}}
    with pytest.raises(ConfigError, match="\\['normal', 'pneumonia'\\] \\(in that order\\)"):
        fetch_dataset(config, tmp_path / "out")


# --- ISIC 2018 Task 3 ---------------------------------------------------------------------

ISIC_TABLE = FIXTURES / "isic2018" / "ISIC2018_Task3_Training_GroundTruth.csv"
ISIC_GROUPINGS = "ISIC2018_Task3_Training_LesionGroupings.csv"


def isic_copy(root: Path, table: Path = ISIC_TABLE, groupings: Path | None = None):
    """The layout of the two unpacked challenge archives, with tiny JPEGs, and the lesion
    groupings CSV beside them (`groupings`, default: the one beside `table`, if any)."""
    (root / "ISIC2018_Task3_Training_GroundTruth").mkdir(parents=True)
    shutil.copy(table, root / "ISIC2018_Task3_Training_GroundTruth")
    groupings = groupings or table.with_name(ISIC_GROUPINGS)
    if groupings.is_file():
        shutil.copy(groupings, root / ISIC_GROUPINGS)
    images = root / "ISIC2018_Task3_Training_Input"
    images.mkdir()
    with open(table) as handle:
        for row in csv.DictReader(handle):
            Image.new("RGB", (6, 4), (10, 20, 30)).save(images / f"{row['image']}.jpg")
    return root


def big_isic_table(path: Path, counts: dict, lesion_sizes=(1,)) -> Path:
    """A ground truth with `counts` images per class, and its lesion groupings beside it:
    each class's images in lesions of `lesion_sizes` images, in turn."""
    classes = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    lines, number = ["image," + ",".join(classes)], 24306
    groupings, lesion = ["image,lesion_id,diagnosis_confirm_type"], 0
    for label, count in counts.items():
        left, turn = count, 0
        while left:
            size = min(lesion_sizes[turn % len(lesion_sizes)], left)
            for _ in range(size):
                lines.append(f"ISIC_{number:07d}," + ",".join("1.0" if c == label else "0.0"
                                                               for c in classes))
                groupings.append(f"ISIC_{number:07d},HAM_{lesion:07d},histo")
                number += 1
            left, turn, lesion = left - size, turn + 1, lesion + 1
    path.write_text("\n".join(lines) + "\n")
    path.with_name(ISIC_GROUPINGS).write_text("\n".join(groupings) + "\n")
    return path


def test_isic_all_seven_classes_from_a_local_copy(tmp_path):
    root = isic_copy(tmp_path / "isic")
    config = {"source": {"type": "isic2018", "root": str(root), "seed": 1}}
    manifest = read_manifest(fetch_dataset(config, tmp_path / "out"))
    assert manifest.classes == ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    labels = dict(zip(manifest.table["sample_id"], manifest.table["label"], strict=True))
    assert len(labels) == 21
    assert (labels["ISIC_0024306"], labels["ISIC_0024308"], labels["ISIC_0024313"]) \
        == ("NV", "MEL", "AKIEC")
    assert manifest.table.loc[0, "path"].startswith("data/ISIC2018_Task3_Training_Input/")


def test_isic_skin4_caps_nv_with_the_seed_and_splits_5_to_1(tmp_path):
    table = big_isic_table(tmp_path / "ISIC2018_Task3_Training_GroundTruth.csv",
                           {"MEL": 30, "NV": 90, "BCC": 24, "AKIEC": 5, "BKL": 18, "DF": 3,
                            "VASC": 3})
    root = isic_copy(tmp_path / "isic", table)

    def run(seed, out):
        config = {"source": {"type": "isic2018", "root": str(root), "selection": "skin4",
                             "nv_cap": 36, "seed": seed}}
        return read_manifest(fetch_dataset(config, tmp_path / out)).table

    table = run(0, "a")
    assert sorted(set(table["label"])) == ["BCC", "BKL", "MEL", "NV"]
    counts = table.groupby(["label", "split"]).size().unstack().to_dict("index")
    assert counts == {"BCC": {"test": 4, "train": 20}, "BKL": {"test": 3, "train": 15},
                      "MEL": {"test": 5, "train": 25}, "NV": {"test": 6, "train": 30}}
    assert table.equals(run(0, "b"))                      # the seed fixes the draw
    nv = lambda t: set(t[t["label"] == "NV"]["sample_id"])  # noqa: E731
    assert nv(run(1, "c")) != nv(table)


def test_isic_row_not_one_hot_is_named(tmp_path):
    table = tmp_path / "ISIC2018_Task3_Training_GroundTruth.csv"
    rows = ISIC_TABLE.read_text().splitlines()
    rows[3] = "ISIC_0024308,1.0,1.0,0.0,0.0,0.0,0.0,0.0"
    table.write_text("\n".join(rows) + "\n")
    root = isic_copy(tmp_path / "isic", table)
    with pytest.raises(InputError, match="line 4 \\(image 'ISIC_0024308'\\): expected 1.0 in "
                                         "exactly one"):
        fetch_dataset({"source": {"type": "isic2018", "root": str(root)}}, tmp_path / "out")


SKIN_COUNTS = {"MEL": 30, "NV": 90, "BCC": 24, "AKIEC": 5, "BKL": 18, "DF": 3, "VASC": 3}


def isic_skin4(tmp_path, out, lesion_sizes=(1, 2, 3), **source):
    """The skin4 manifest of a 173-image table whose lesions have one to three images."""
    table = tmp_path / "gt" / "ISIC2018_Task3_Training_GroundTruth.csv"
    if not table.exists():
        table.parent.mkdir()
        big_isic_table(table, SKIN_COUNTS, lesion_sizes)
        isic_copy(tmp_path / "isic", table)
    config = {"source": {"type": "isic2018", "root": str(tmp_path / "isic"),
                         "selection": "skin4", "nv_cap": 36, "seed": 0, **source}}
    return read_manifest(fetch_dataset(config, tmp_path / out)).table


def test_isic_images_of_one_lesion_never_straddle_the_splits(tmp_path):
    table = isic_skin4(tmp_path, "a")
    lesions = dict(line.split(",")[:2] for line in
                   (tmp_path / "gt" / ISIC_GROUPINGS).read_text().splitlines()[1:])
    # the manifest carries each image's lesion, and a lesion has one split
    assert table["group"].tolist() == [lesions[image] for image in table["sample_id"]]
    assert table.groupby("group")["split"].nunique().max() == 1
    assert (table.groupby("group").size() > 1).sum() >= 20     # lesions that could straddle
    # stratified: each class about 5:1, within half a lesion (1.5 images) of its share
    for label, rows in table.groupby("label"):
        assert abs((rows["split"] == "test").sum() - len(rows) / 6) <= 1.5, label
    # reproducible with the seed, another seed another split
    assert table.equals(isic_skin4(tmp_path, "b"))
    assert not table["split"].equals(isic_skin4(tmp_path, "c", seed=1)["split"])


def test_isic_nv_cap_keeps_whole_lesions(tmp_path):
    table = isic_skin4(tmp_path, "a")
    nv = table[table["label"] == "NV"]
    # the cap (36) reached or passed by the last lesion drawn, which has at most 3 images
    assert 36 <= len(nv) < 36 + 3
    # no NV lesion cut: each kept lesion has all its images
    lesions = [line.split(",")[1] for line in
               (tmp_path / "gt" / ISIC_GROUPINGS).read_text().splitlines()[1:]]
    assert nv.groupby("group").size().to_dict() == {lesion: lesions.count(lesion)
                                                    for lesion in set(nv["group"])}
    assert set(nv["group"]) != set(isic_skin4(tmp_path, "b", seed=1).query("label == 'NV'")
                                   ["group"])


def test_isic_split_by_image_is_the_old_split(tmp_path):
    table = isic_skin4(tmp_path, "a", split_by="image")
    assert "group" not in table.columns
    # what the recipe gave before it split by lesion, on this table with this seed
    test = [306, 321, 327, 331, 332, 338, 343, 351, 376, 382, 399, 427, 435, 440, 441, 467,
            468, 470]
    assert sorted(int(image[-3:]) for image in table.query("split == 'test'")["sample_id"]) \
        == test
    assert len(table.query("label == 'NV'")) == 36
    # it needs no groupings file
    (tmp_path / "isic" / ISIC_GROUPINGS).unlink()
    assert table.equals(isic_skin4(tmp_path, "b", split_by="image"))


def isic_with_groupings(tmp_path, text: str | bytes) -> dict:
    """The 21-image local copy with `text` as its lesion groupings."""
    groupings = tmp_path / ISIC_GROUPINGS
    if isinstance(text, bytes):
        groupings.write_bytes(text)
    else:
        groupings.write_text(text)
    root = isic_copy(tmp_path / "isic", groupings=groupings)
    return {"source": {"type": "isic2018", "root": str(root)}}


def test_isic_lesion_with_two_diagnoses_is_named(tmp_path):
    text = (ISIC_TABLE.with_name(ISIC_GROUPINGS).read_text()
            .replace("ISIC_0024307,HAM_0004000", "ISIC_0024307,HAM_0002730"))
    with pytest.raises(InputError, match="lesion HAM_0002730 has images of two diagnoses in "
                                         ".*GroundTruth.csv: ISIC_0024307 NV \\(line 3\\) "
                                         "and ISIC_0024308 MEL \\(line 4\\)") as error:
        fetch_dataset(isic_with_groupings(tmp_path, text), tmp_path / "out")
    assert str(error.value).startswith(str(tmp_path / "isic" / ISIC_GROUPINGS))


def test_isic_local_copy_without_groupings_says_where_to_get_them(tmp_path):
    root = isic_copy(tmp_path / "isic")
    (root / ISIC_GROUPINGS).unlink()
    with pytest.raises(InputError) as error:
        fetch_dataset({"source": {"type": "isic2018", "root": str(root)}}, tmp_path / "out")
    message = str(error.value)
    assert f"expected one {ISIC_GROUPINGS}, found no file" in message
    assert f"https://isic-challenge-data.s3.amazonaws.com/2018/{ISIC_GROUPINGS}" in message
    assert "`split_by: image`" in message


GROUPINGS_LINES = ISIC_TABLE.with_name(ISIC_GROUPINGS).read_text().splitlines()


@pytest.mark.parametrize("text, fragment", [
    ("image,lesion\nISIC_0024306,HAM_0000118\n", "line 1 \\(header\\) has no column\\(s\\) "
                                                "lesion_id"),
    ("image,lesion_id,diagnosis_confirm_type\n", "the table has a header but no rows"),
    (b"\xff\xd8\xff\xe0 a JPEG, not the table", "not UTF-8 text"),
    ("\n".join(GROUPINGS_LINES[:5] + ["ISIC_0024310,,consensus"] + GROUPINGS_LINES[6:]),
     "line 6 \\(image 'ISIC_0024310'\\): empty image or lesion_id cell"),
    ("\n".join(GROUPINGS_LINES + [GROUPINGS_LINES[4]]),
     "line 23 \\(image 'ISIC_0024309'\\): sample id 'ISIC_0024309' is also on line 5"),
    # a download cut short: the images past line 11 have no lesion
    ("\n".join(GROUPINGS_LINES[:11]), "no lesion for 11 image\\(s\\) of .*GroundTruth.csv "
                                      "\\(first: ISIC_0024316, line 12\\)"),
])
def test_isic_damaged_groupings_are_named(tmp_path, text, fragment):
    with pytest.raises(InputError, match=fragment) as error:
        fetch_dataset(isic_with_groupings(tmp_path, text), tmp_path / "out")
    assert ISIC_GROUPINGS in str(error.value)


def test_isic_image_only_in_the_groupings_is_left_out_and_said(tmp_path, caplog):
    text = "\n".join(GROUPINGS_LINES + ["ISIC_0099999,HAM_0009999,histo"])
    with caplog.at_level(logging.WARNING):
        manifest = read_manifest(fetch_dataset(isic_with_groupings(tmp_path, text),
                                               tmp_path / "out"))
    assert len(manifest.table) == 21 and "ISIC_0099999" not in set(manifest.table["sample_id"])
    assert (f"{ISIC_GROUPINGS}: 1 image(s) are not in " in caplog.text
            and "(first: ISIC_0099999); they are left out" in caplog.text)


def isic_archives(tmp_path):
    """The challenge's three files as served: two zips and the plain groupings CSV."""
    root = isic_copy(tmp_path / "copy")
    archives = {}
    for folder in ("ISIC2018_Task3_Training_Input", "ISIC2018_Task3_Training_GroundTruth"):
        archives[f"{folder}.zip"] = zip_bytes({
            f"{folder}/{path.name}": path.read_bytes() for path in (root / folder).iterdir()})
    archives[ISIC_GROUPINGS] = (root / ISIC_GROUPINGS).read_bytes()
    return archives


def test_isic_download_needs_pinned_checksums_or_consent(http_server, tmp_path, caplog):
    archives = isic_archives(tmp_path)
    for name, data in archives.items():
        http_server.serve(f"/2018/{name}", data)
    source = {"type": "isic2018", "base_url": http_server.base_url + "/2018", "download": FAST}
    with pytest.raises(ConfigError) as error:
        fetch_dataset({"source": source}, tmp_path / "out")
    assert "sha256sum ISIC2018_Task3_Training_Input.zip" in str(error.value)
    assert "allow_unverified: true" in str(error.value)
    assert http_server.log == []

    pinned = {name: {"sha256": sha256(data)} for name, data in archives.items()}
    manifest = read_manifest(fetch_dataset({"source": {**source, "checksums": pinned}},
                                           tmp_path / "out"))
    assert len(manifest.table) == 21
    assert manifest.table.loc[0, "path"].startswith("ISIC2018_Task3_Training_Input/")

    with caplog.at_level(logging.WARNING):
        fetch_dataset({"source": {**source, "allow_unverified": True}}, tmp_path / "again")
    record = (tmp_path / "again" / "downloads.json").read_text()
    assert all(sha256(data) in record for data in archives.values())
    assert "unverified" in caplog.text


def test_isic_download_fetches_the_lesion_groupings_verified(http_server, tmp_path):
    archives = isic_archives(tmp_path)
    for name, data in archives.items():
        http_server.serve(f"/2018/{name}", data)
    pinned = {name: {"sha256": sha256(data)} for name, data in archives.items()}
    source = {"type": "isic2018", "base_url": http_server.base_url + "/2018", "download": FAST}
    # pinning the two zips is not enough: the groupings are checked like them
    with pytest.raises(ConfigError, match=f"no checksum is published for {ISIC_GROUPINGS}"):
        fetch_dataset({"source": {**source, "checksums": {
            name: pin for name, pin in pinned.items() if name != ISIC_GROUPINGS}}},
            tmp_path / "out")
    manifest = read_manifest(fetch_dataset({"source": {**source, "checksums": pinned}},
                                           tmp_path / "out"))
    assert manifest.table.groupby("group")["split"].nunique().max() == 1
    assert len(set(manifest.table["group"])) == 15             # 21 images of 15 lesions
    assert sha256(archives[ISIC_GROUPINGS]) in (tmp_path / "out" / "downloads.json").read_text()
    # split by image, the groupings are neither needed nor fetched
    http_server.log.clear()
    fetch_dataset({"source": {**source, "checksums": pinned, "split_by": "image"}},
                  tmp_path / "by_image")
    assert not any(ISIC_GROUPINGS in path for path in http_server.log)


# --- RSNA Pneumonia ---------------------------------------------------------------------

RSNA_TABLE = FIXTURES / "rsna_pneumonia" / "stage_2_detailed_class_info.csv"


def rsna_files(table: Path = RSNA_TABLE) -> dict:
    with open(table) as handle:
        patients = {row["patientId"] for row in csv.DictReader(handle)}
    files = {f"stage_2_train_images/{patient}.dcm": dicom_bytes(8, 8) for patient in patients}
    files["stage_2_test_images/ffff0000-test.dcm"] = dicom_bytes(8, 8)  # unlabelled: ignored
    files["stage_2_detailed_class_info.csv"] = table.read_bytes()
    files["stage_2_train_labels.csv"] = b"patientId,x,y,width,height,Target\n"
    return files


def write_tree(root: Path, files: dict) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_rsna_three_classes_one_sample_per_patient(tmp_path):
    root = write_tree(tmp_path / "rsna", rsna_files())
    manifest = read_manifest(fetch_dataset({"source": {"type": "rsna_pneumonia",
                                                       "root": str(root)}}, tmp_path / "out"))
    assert manifest.classes == ["Normal", "No Lung Opacity / Not Normal", "Lung Opacity"]
    labels = dict(zip(manifest.table["sample_id"], manifest.table["label"], strict=True))
    assert len(labels) == 13                                   # 16 rows, 3 patients repeat
    assert labels["00436515-870c-4b36-a041-de91049b9ab4"] == "Lung Opacity"
    assert labels["003d8fa0-6bf1-40ed-b54c-ac657f8495c5"] == "Normal"
    assert labels["0004cfab-14fd-4e49-80ba-63a80b6bddd6"] == "No Lung Opacity / Not Normal"
    assert all(path.endswith(".dcm") for path in manifest.table["path"])


@pytest.mark.parametrize("line, text, fragment", [
    (7, "00436515-870c-4b36-a041-de91049b9ab4,Normal",
     "line 7 \\(patientId '00436515.*'Normal' contradicts 'Lung Opacity' on line 6"),
    (3, "00313ee0-9eaa-42f4-b0ab-c148ed3241cd,Pneumonia",
     "line 3 \\(patientId '00313ee0.*label 'Pneumonia' is not one of the classes"),
])
def test_rsna_bad_rows_are_named(tmp_path, line, text, fragment):
    lines = RSNA_TABLE.read_text().splitlines()
    lines[line - 1] = text
    table = tmp_path / "stage_2_detailed_class_info.csv"
    table.write_text("\n".join(lines) + "\n")
    root = write_tree(tmp_path / "rsna", rsna_files(table))
    with pytest.raises(InputError, match=fragment):
        fetch_dataset({"source": {"type": "rsna_pneumonia", "root": str(root)}},
                      tmp_path / "out")


def rsna_served(http_server, tmp_path, **behaviour):
    archive = zip_bytes(rsna_files())
    http_server.serve("/api/v1/competitions/data/download-all/"
                      "rsna-pneumonia-detection-challenge", archive, **behaviour)
    return {"type": "rsna_pneumonia", "kaggle_api": http_server.base_url + "/api/v1",
            "checksums": {"rsna-pneumonia-detection-challenge.zip": {"sha256": sha256(archive)}},
            "download": FAST}


def test_rsna_from_kaggle_with_environment_credentials(http_server, tmp_path, monkeypatch,
                                                       caplog):
    monkeypatch.setenv("KAGGLE_USERNAME", "radiologist")
    monkeypatch.setenv("KAGGLE_KEY", "0123secretkey")
    source = rsna_served(http_server, tmp_path, auth=("radiologist", "0123secretkey"))
    with caplog.at_level(logging.DEBUG):
        manifest = read_manifest(fetch_dataset({"source": source}, tmp_path / "out"))
    assert len(manifest.table) == 13
    assert "0123secretkey" not in caplog.text


def test_rsna_credentials_from_kaggle_json(http_server, tmp_path, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle"))
    (tmp_path / "kaggle").mkdir()
    (tmp_path / "kaggle" / "kaggle.json").write_text('{"username": "u1", "key": "k1"}')
    source = rsna_served(http_server, tmp_path, auth=("u1", "k1"))
    assert len(read_manifest(fetch_dataset({"source": source}, tmp_path / "out")).table) == 13


def test_rsna_without_credentials_says_what_to_do(http_server, tmp_path, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "none"))
    source = rsna_served(http_server, tmp_path)
    with pytest.raises(CredentialsMissing) as error:
        fetch_dataset({"source": source}, tmp_path / "out")
    message = str(error.value)
    for fragment in ("kaggle.json", "KAGGLE_USERNAME", "https://www.kaggle.com/settings",
                     "rsna-pneumonia-detection-challenge/rules", "`root`"):
        assert fragment in message
    assert http_server.log == []


@pytest.mark.parametrize("behaviour, fragment", [
    ({"auth": ("someone", "else")}, "rejected the API token"),
    ({"status": 403}, "accept the competition rules"),
])
def test_rsna_kaggle_refusals_are_explained(http_server, tmp_path, monkeypatch, behaviour,
                                           fragment):
    monkeypatch.setenv("KAGGLE_USERNAME", "radiologist")
    monkeypatch.setenv("KAGGLE_KEY", "0123secretkey")
    with pytest.raises(DownloadError, match=fragment) as error:
        fetch_dataset({"source": rsna_served(http_server, tmp_path, **behaviour)},
                      tmp_path / "out")
    assert "0123secretkey" not in str(error.value)


# --- CBIS-DDSM --------------------------------------------------------------------------

FULL, CROP = (40, 30), (10, 12)   # (rows, columns) of a mammogram and of a cropped ROI


def cbis_rows(abnormality="both"):
    tables = [key for key in cbis_ddsm.DESCRIPTIONS if abnormality in (key[0], "both")]
    return [row for key in tables for row in cbis_ddsm.read_description(
        FIXTURES / "cbis_ddsm" / cbis_ddsm.DESCRIPTIONS[key][0], *key)]


def cbis_series(rows, swap=()):
    """Series UID -> {file name: DICOM bytes}: mammograms, and ROI series with mask + crop.

    Files are named as TCIA names them (1-1.dcm, 1-2.dcm), not as the CSV does;
    in series listed in `swap` the crop comes first.
    """
    series = {}
    for row in rows:
        series[cbis_ddsm.series_uid(row.paths["image file path"])] = {
            "1-1.dcm": dicom_bytes(*FULL)}
        roi = cbis_ddsm.series_uid(row.paths["ROI mask file path"])
        crop = cbis_ddsm.series_uid(row.paths["cropped image file path"])
        mask, cropped = dicom_bytes(*FULL, value=255), dicom_bytes(*CROP)
        if roi == crop:
            series[roi] = ({"1-1.dcm": cropped, "1-2.dcm": mask} if roi in swap
                           else {"1-1.dcm": mask, "1-2.dcm": cropped})
        else:
            series[roi], series[crop] = {"1-1.dcm": mask}, {"1-1.dcm": cropped}
    return series


def nbia_copy(root: Path, swap=()) -> Path:
    """A local copy as the NBIA Data Retriever saves it: folders + metadata.csv."""
    (root / "CBIS-DDSM").mkdir(parents=True)
    for name, _ in cbis_ddsm.DESCRIPTIONS.values():
        shutil.copy(FIXTURES / "cbis_ddsm" / name, root / name)
    lines = ["Series UID,Collection,Subject ID,Number of Images,File Location"]
    for index, (uid, files) in enumerate(cbis_series(cbis_rows(), swap).items()):
        location = f"./CBIS-DDSM/case-{index}/07-20-2016-DDSM-{index}/1.000000-images-{index}"
        write_tree(root / "CBIS-DDSM", {f"{location[12:]}/{n}": d for n, d in files.items()})
        lines.append(f"{uid},CBIS-DDSM,case-{index},{len(files)},{location}")
    (root / "CBIS-DDSM" / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def test_cbis_labels_splits_and_masks_from_an_nbia_copy(tmp_path):
    swapped = cbis_ddsm.series_uid(cbis_rows()[4].paths["ROI mask file path"])  # P_00009
    root = nbia_copy(tmp_path / "cbis", swap={swapped})
    config = {"classes": ["benign", "malignant"],
              "source": {"type": "cbis_ddsm", "root": str(root), "val_fraction": 0.4}}
    manifest = read_manifest(fetch_dataset(config, tmp_path / "out"))
    table = manifest.table.set_index("sample_id")
    assert len(table) == 12                          # 13 abnormalities on 12 mammograms
    assert table.loc["Mass-Training_P_00004_LEFT_CC", "label"] == "malignant"  # 1 of 2 is
    assert table.loc["Mass-Training_P_00009_RIGHT_CC", "label"] == "benign"   # w/o callback
    assert table.loc["Calc-Test_P_00041_RIGHT_MLO", "split"] == "test"
    assert set(table["split"]) == {"train", "val", "test"}
    # the two views of one patient stay together
    assert table.loc["Mass-Training_P_00001_LEFT_CC", "split"] \
        == table.loc["Mass-Training_P_00001_LEFT_MLO", "split"]
    # and the manifest says whose they are, for the report's warning on clustered images
    assert table.loc["Mass-Training_P_00001_LEFT_MLO", "group"] == "P_00001"
    assert table.loc["Calc-Test_P_00041_RIGHT_MLO", "group"] == "P_00041"
    with open(manifest.root / "rois.csv") as handle:
        rois = list(csv.DictReader(handle))
    assert len(rois) == 13
    assert {roi["lesion_type"] for roi in rois} == {"mass", "calcification"}
    for roi in rois:                                 # each mask has the mammogram's size
        header = pydicom.dcmread(manifest.root / roi["mask_path"], stop_before_pixels=True)
        assert (header.Rows, header.Columns) == FULL


def test_cbis_unknown_pathology_is_named(tmp_path):
    table = tmp_path / "mass_case_description_train_set.csv"
    text = (FIXTURES / "cbis_ddsm" / table.name).read_text()
    table.write_text(text.replace("BENIGN_WITHOUT_CALLBACK", "UNCERTAIN"))
    with pytest.raises(InputError, match="line 8 \\(patient_id 'P_00009'\\): pathology "
                                         "'UNCERTAIN'"):
        cbis_ddsm.read_description(table, "mass", "train")


def tcia_served(http_server, rows, corrupt=()):
    for uid, files in cbis_series(rows).items():
        listing = "Filename,MD5Hash\n" + "".join(
            f"{name},{'0' * 32 if uid in corrupt else md5(data)}\n" for name, data in files.items())
        http_server.serve(f"/nbia/getImageWithMD5Hash?SeriesInstanceUID={uid}",
                          zip_bytes({**files, "md5hashes.csv": listing}))
    pins = {}
    for key in ("mass", "train"), ("mass", "test"):
        name = cbis_ddsm.DESCRIPTIONS[key][0]
        data = (FIXTURES / "cbis_ddsm" / name).read_bytes()
        http_server.serve(f"/wiki/{name}", data)
        pins[name] = {"md5": md5(data)}
    return {"type": "cbis_ddsm", "abnormality": "mass", "tables_url": http_server.base_url
            + "/wiki", "tcia_api": http_server.base_url + "/nbia", "checksums": pins,
            "val_fraction": 0, "download": FAST}


def test_cbis_from_tcia_series_checked_against_their_md5_lists(http_server, tmp_path):
    source = tcia_served(http_server, cbis_rows("mass"))
    manifest = read_manifest(fetch_dataset({"source": source}, tmp_path / "out"))
    assert len(manifest.table) == 8
    assert manifest.table.loc[0, "path"].startswith("series/1.3.6.1.4.1.9590.100.1.2.")
    assert not list((tmp_path / ".downloads" / "out").glob("*.zip"))


def test_cbis_tcia_series_with_a_bad_md5_is_not_kept(http_server, tmp_path):
    rows = cbis_rows("mass")
    bad = cbis_ddsm.series_uid(rows[0].paths["image file path"])
    with pytest.raises(ChecksumMismatch, match=f"series {bad}"):
        fetch_dataset({"source": tcia_served(http_server, rows, corrupt={bad})},
                      tmp_path / "out")
    assert not (tmp_path / "out" / "series" / bad).exists()
    assert not (tmp_path / ".downloads" / "out" / f"{bad}.zip").exists()


def test_cbis_tcia_manifest_limits_the_download(http_server, tmp_path):
    rows = cbis_rows("mass")
    keep = rows[0]                                          # P_00001 LEFT CC
    uids = [cbis_ddsm.series_uid(keep.paths[column]) for column in cbis_ddsm.PATH_COLUMNS]
    manifest_file = tmp_path / "subset.tcia"
    manifest_file.write_text("downloadServerUrl=https://example.org\nincludeAnnotation=true\n"
                             "noOfrRetry=4\ndatabasketId=x.tcia\nmanifestVersion=3.0\n"
                             "ListOfSeriesToDownload=\n" + "\n".join(uids) + "\n")
    source = {**tcia_served(http_server, rows), "tcia_manifest": str(manifest_file)}
    manifest = read_manifest(fetch_dataset({"source": source}, tmp_path / "out"))
    assert manifest.table["sample_id"].tolist() == ["Mass-Training_P_00001_LEFT_CC"]
    assert sorted(p.name for p in (tmp_path / "out" / "series").iterdir()) == sorted(set(uids))


# --- CAMELYON16 -------------------------------------------------------------------------

def test_camelyon_reference_tables_in_both_forms(tmp_path):
    expected = {"test_001": "tumor", "test_002": "normal", "test_003": "tumor",
                "test_004": "normal"}
    for name in ("reference.csv", "evaluation_reference.csv"):
        assert camelyon16.read_reference(FIXTURES / "camelyon16" / name) == expected
    bad = tmp_path / "reference.csv"
    bad.write_text("test_001,Tumor,Macro\n\ntest_002,Negative\n")
    with pytest.raises(InputError, match="line 3 \\(slide 'test_002'\\): class 'Negative'"):
        camelyon16.read_reference(bad)
    # the same slide twice would let the second row's class replace the first's
    bad.write_text("test_001,Tumor\ntest_002,Normal\ntest_001.tif,Normal\n")
    with pytest.raises(InputError, match="line 3: sample id 'test_001' is also on line 1"):
        camelyon16.read_reference(bad)


SLIDES = ["normal_001", "normal_002", "tumor_001", "tumor_002", "test_001", "test_002",
          "test_003", "test_004"]


def annotation(slide):
    return f'<ASAP_Annotations><Annotations><Annotation Name="{slide}"/></Annotations>' \
           f'</ASAP_Annotations>'.encode()


def test_camelyon_from_a_copy_in_the_challenge_layout(tmp_path):
    root = tmp_path / "CAMELYON16"
    files = {f"training/{s.split('_')[0]}/{s}.tif": s.encode() for s in SLIDES[:4]}
    files.update({f"testing/images/{s}.tif": s.encode() for s in SLIDES[4:]})
    files["training/tumor/tumor_001_mask.tif"] = b"not a slide"
    files["testing/reference.csv"] = (FIXTURES / "camelyon16" / "reference.csv").read_bytes()
    files["training/lesion_annotations.zip"] = zip_bytes(
        {f"{s}.xml": annotation(s) for s in ("tumor_001", "tumor_002")})
    files["testing/lesion_annotations.zip"] = zip_bytes(
        {f"{s}.xml": annotation(s) for s in ("test_001", "test_003")})
    write_tree(root, files)
    config = {"kind": "slides", "classes": ["normal", "tumor"],
              "source": {"type": "camelyon16", "root": str(root), "val_fraction": 0.5}}
    manifest = read_manifest(fetch_dataset(config, tmp_path / "out"))
    table = manifest.table.set_index("sample_id")
    assert manifest.kind == "slides" and sorted(table.index) == sorted(SLIDES)
    assert table.loc["test_003", "label"] == "tumor" and table.loc["test_004", "split"] == "test"
    assert table.loc["tumor_001", "path"] == "data/training/tumor/tumor_001.tif"
    assert sorted(table[table["split"] == "val"]["label"]) == ["normal", "tumor"]
    with open(manifest.root / "lesion_annotations.csv") as handle:
        annotations = {row["sample_id"]: row["annotation_path"] for row in csv.DictReader(handle)}
    assert sorted(annotations) == ["test_001", "test_003", "tumor_001", "tumor_002"]
    assert (manifest.root / annotations["test_003"]).read_bytes() == annotation("test_003")


def camelyon_mirror(http_server, corrupt=None):
    """A mirror laid out like the AWS bucket, with the organisers' checksums.md5."""
    files = {f"images/{s}.tif": f"slide {s}".encode() for s in SLIDES}
    files.update({f"annotations/{s}.xml": annotation(s) for s in ("tumor_001", "test_001")})
    files["evaluation/reference.csv"] = \
        (FIXTURES / "camelyon16" / "evaluation_reference.csv").read_bytes()
    listing = "".join(f"{md5(data)} *{name}\n" for name, data in sorted(files.items()))
    if corrupt:
        files[corrupt] = b"flipped bits"
    for name, data in {**files, "checksums.md5": listing.encode()}.items():
        http_server.serve(f"/CAMELYON16/{name}", data)
    return http_server.base_url + "/CAMELYON16"


def test_camelyon_from_a_mirror_verified_by_checksums_md5(http_server, tmp_path):
    source = {"type": "camelyon16", "mirror": camelyon_mirror(http_server),
              "slides": ["normal_001", "tumor_001", "test_001", "test_002"],
              "val_fraction": 0, "download": FAST}
    manifest = read_manifest(fetch_dataset({"source": source}, tmp_path / "out"))
    table = manifest.table.set_index("sample_id")
    assert dict(table["label"]) == {"normal_001": "normal", "test_001": "tumor",
                                    "test_002": "normal", "tumor_001": "tumor"}
    assert table.loc["tumor_001", "sha256"] == sha256(b"slide tumor_001")
    assert (manifest.root / "annotations" / "test_001.xml").exists()
    assert "/CAMELYON16/images/normal_002.tif" not in http_server.log   # not asked for


def test_camelyon_slide_that_fails_its_md5_is_refused(http_server, tmp_path):
    source = {"type": "camelyon16", "mirror": camelyon_mirror(http_server, "images/tumor_001.tif"),
              "slides": ["tumor_001"], "download": FAST}
    with pytest.raises(ChecksumMismatch, match="tumor_001.tif"):
        fetch_dataset({"source": source}, tmp_path / "out")
    assert not (tmp_path / "out" / "images" / "tumor_001.tif").exists()


def test_camelyon_unknown_slide_id_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="slides must be ids like"):
        fetch_dataset({"source": {"type": "camelyon16", "slides": ["tumour_1"]}},
                      tmp_path / "out")


def test_recipe_kind_must_match_the_config(tmp_path):
    config = {"kind": "images", "source": {"type": "camelyon16", "root": str(tmp_path)}}
    with pytest.raises(ConfigError, match="kind 'slides', not 'images'"):
        fetch_dataset(config, tmp_path / "out")


def test_incomplete_local_copy_says_where_the_table_comes_from(tmp_path):
    (tmp_path / "copy").mkdir()
    with pytest.raises(InputError, match="no file; the description CSVs are on the "
                                         "collection's page"):
        fetch_dataset({"source": {"type": "cbis_ddsm", "root": str(tmp_path / "copy")}},
                      tmp_path / "out")


# --- mirrors: checksum advice; split sizes against the official dataset's ----------------

def test_medmnist_mirror_mismatch_says_how_to_pin_its_own_file(http_server, tmp_path):
    npz = write_medmnist_npz(tmp_path / "pneumoniamnist.npz").read_bytes()
    url = http_server.serve("/mirror/pneumoniamnist.npz", npz)
    with pytest.raises(ChecksumMismatch) as error:
        fetch_dataset(medmnist_config(url), tmp_path / "out")
    message = str(error.value)
    assert "28209eda62fecd6e6a2d98b1501bb15f" in message               # what was expected
    assert f"came from `url: {url}`, a mirror you set in place of the official " \
           f"https://zenodo.org/records/10519652/files/pneumoniamnist.npz" in message
    assert f"`sha256: {sha256(npz)}` (or `md5: {md5(npz)}`) beside `url`" in message
    # following the advice works
    manifest = read_manifest(fetch_dataset(medmnist_config(url, sha256=sha256(npz)),
                                           tmp_path / "out"))
    assert len(manifest.table) == 16


def test_checksum_mismatch_from_the_official_url_gives_no_mirror_advice(http_server,
                                                                        tmp_path):
    from medrobust.data.download import Checksum, download_file
    from medrobust.data.http import mirror_advice
    url = http_server.serve("/data.bin", b"data")
    folder = url.rsplit("/", 1)[0]
    for chosen in (None, folder + "/"):   # not set, or set to the official URL itself
        with pytest.raises(ChecksumMismatch) as error, \
                mirror_advice("base_url", chosen, folder):
            download_file(url, tmp_path / "data.bin", Checksum("md5", "0" * 32))
        assert "mirror" not in str(error.value)


def test_isic_mirror_mismatch_says_how_to_pin_in_checksums(http_server, tmp_path):
    archives = isic_archives(tmp_path)
    for name, data in archives.items():
        http_server.serve(f"/mirror/{name}", data)
    pinned = {name: {"sha256": "0" * 64} for name in archives}   # the official ones, say
    source = {"type": "isic2018", "base_url": http_server.base_url + "/mirror",
              "download": FAST, "checksums": pinned}
    with pytest.raises(ChecksumMismatch) as error:
        fetch_dataset({"source": source}, tmp_path / "out")
    name = "ISIC2018_Task3_Training_Input.zip"
    data = archives[name]
    assert (f"`checksums: {{{name}: {{sha256: {sha256(data)}}}}}` (or `md5: {md5(data)}`)"
            in str(error.value))
    assert "`base_url: http://127.0.0.1:" in str(error.value)


def test_medmnist_split_sizes_other_than_the_official_ones_are_a_warning(tmp_path, caplog):
    npz = write_medmnist_npz(tmp_path / "breastmnist.npz")
    config = {"source": {"type": "medmnist", "flag": "breastmnist", "path": str(npz),
                         "md5": md5(npz.read_bytes())}}
    with caplog.at_level(logging.WARNING):
        fetch_dataset(config, tmp_path / "out")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert ["breastmnist (28 px): the data has train 8 / val 4 / test 4 samples, but the "
            "official dataset has train 546 / val 78 / test 156 (n_samples in medmnist "
            "3.0.2); this is not the official copy, and results on it are not comparable "
            "with published ones"] == [w for w in warnings if "official dataset" in w]


def test_split_sizes_equal_to_the_official_ones_give_no_warning(caplog):
    from medrobust.data.http import warn_if_splits_differ
    official = dict(zip(("train", "val", "test"), medmnist.OFFICIAL_SPLITS["retinamnist"]))
    with caplog.at_level(logging.WARNING):
        assert not warn_if_splits_differ("retinamnist", dict(official), official, "x")
        assert warn_if_splits_differ("retinamnist", {**official, "val": 119}, official, "x")
    assert len(caplog.records) == 1 and "val 119" in caplog.records[0].getMessage()
    assert medmnist.OFFICIAL_SPLITS["pneumoniamnist"] == (4708, 524, 624)
    assert set(medmnist.OFFICIAL_SPLITS) == set(medmnist.FLAGS)


def test_isic_table_with_other_than_10015_images_is_a_warning(tmp_path, caplog):
    root = isic_copy(tmp_path / "isic")
    with caplog.at_level(logging.WARNING):
        fetch_dataset({"source": {"type": "isic2018", "root": str(root)}}, tmp_path / "out")
    assert "ISIC 2018 Task 3: the data has training 21 samples, but the official dataset " \
           "has training 10,015 (HAM10000)" in caplog.text
