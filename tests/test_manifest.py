import json
import os
from collections import Counter

import numpy as np
import pytest

from medrobust.data import manifest as manifest_module
from medrobust.data.manifest import (MANIFEST_COLUMNS, begin_dataset, read_manifest,
                                     stratified_split, write_dataset)
from medrobust.errors import ConfigError, InputError

CLASSES = ["benign", "malignant"]


def _rows():
    return [
        {"sample_id": sample_id, "path": f"img/{sample_id}.dcm", "label": label, "split": split,
         "sha256": digit * 64}
        for sample_id, label, split, digit in [("a", "benign", "train", "0"),
                                               ("b", "malignant", "val", "1"),
                                               ("c", "malignant", "test", "2")]
    ]


def test_round_trip(tmp_path):
    path = write_dataset(tmp_path, _rows(), CLASSES, "images")
    assert path == tmp_path / "manifest.csv"
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta == {"classes": CLASSES, "kind": "images"}

    manifest = read_manifest(path)
    assert list(manifest.table.columns) == list(MANIFEST_COLUMNS)
    assert manifest.table["sample_id"].tolist() == ["a", "b", "c"]
    assert manifest.classes == CLASSES and manifest.kind == "images"
    assert manifest.root == tmp_path
    assert manifest.labels.tolist() == [0, 1, 1] and manifest.labels.dtype == np.int64
    assert manifest.label_index("malignant") == 1
    with pytest.raises(InputError, match="no class 'cyst'"):
        manifest.label_index("cyst")
    assert manifest.absolute_path(manifest.table.iloc[1]) == tmp_path / "img" / "b.dcm"


def test_dataset_json_is_written_after_the_manifest(tmp_path, monkeypatch):
    real_write_json = manifest_module.write_json

    def checking_write_json(path, data):
        assert (tmp_path / "manifest.csv").exists()
        real_write_json(path, data)

    monkeypatch.setattr(manifest_module, "write_json", checking_write_json)
    write_dataset(tmp_path, _rows(), CLASSES, "images")
    assert (tmp_path / "dataset.json").exists()


def test_write_dataset_rejects_incomplete_rows(tmp_path):
    rows = _rows()
    del rows[1]["sha256"]
    with pytest.raises(ValueError, match="lacks sha256"):
        write_dataset(tmp_path, rows, CLASSES, "images")
    assert not (tmp_path / "dataset.json").exists()


def test_begin_dataset_removes_the_completion_marker(tmp_path):
    write_dataset(tmp_path, _rows(), CLASSES, "images")
    assert begin_dataset(tmp_path) == tmp_path
    assert not (tmp_path / "dataset.json").exists()


def _write_csv(tmp_path, text, classes=CLASSES):
    (tmp_path / "dataset.json").write_text(json.dumps({"classes": classes, "kind": "images"}))
    path = tmp_path / "manifest.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


HEADER = "sample_id,path,label,split,sha256\n"
GOOD = "a,a.dcm,benign,train,x\n"


@pytest.mark.parametrize("text, expected", [
    (HEADER + GOOD + "b,b.dcm,cyst,train,x\n", r"line 3 \(sample_id 'b'\): label 'cyst'"),
    (HEADER + GOOD + "b,b.dcm,benign,training,x\n", r"line 3 \(sample_id 'b'\): split 'training'"),
    (HEADER + GOOD + "b,b.dcm,benign,val,x\n" + "a,c.dcm,benign,test,x\n",
     r"line 4 \(sample_id 'a'\): duplicate sample_id 'a' \(first on line 2\)"),
    (HEADER + ",b.dcm,benign,val,x\n", r"line 2 \(sample_id ''\): empty sample_id"),
    (HEADER + "b,,benign,val,x\n", r"line 2 \(sample_id 'b'\): empty path"),
    ("sample_id,path,label,sha256\na,a.dcm,benign,x\n",
     r"line 1 \(header\) lacks column\(s\) split"),
    (HEADER + GOOD + "b,b.dcm,benign,train,x,extra\n", r"Expected 5 fields in line 3, saw 6"),
    ((HEADER + "caf\xe9,b.dcm,benign,train,x\n").encode("latin-1"),  # an Excel export
     "not a readable CSV manifest"),
])
def test_read_manifest_names_the_bad_row(tmp_path, text, expected):
    path = _write_csv(tmp_path, text)
    with pytest.raises(InputError, match=expected) as error:
        read_manifest(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("sample_id", ["normal/a", "..", ".hidden", "a\\b"])
def test_a_slide_manifest_refuses_ids_that_cannot_name_files(tmp_path, sample_id):
    path = _write_csv(tmp_path, HEADER + GOOD + f"{sample_id},b.svs,benign,test,x\n")
    read_manifest(path)  # images: any id
    (tmp_path / "dataset.json").write_text(json.dumps({"classes": CLASSES, "kind": "slides"}))
    with pytest.raises(InputError, match=r"manifest.csv: line 3: slide id .* cannot name"):
        read_manifest(path)


def test_sample_ids_that_look_like_missing_values_stay_strings(tmp_path):
    path = _write_csv(tmp_path, HEADER + "NA,a.dcm,benign,train,x\n")
    assert read_manifest(path).table["sample_id"].tolist() == ["NA"]


@pytest.mark.parametrize("meta, expected", [
    (None, "not a readable dataset description"),
    ({"classes": ["only"], "kind": "images"}, "at least two distinct names"),
    ({"classes": ["a", "b"], "kind": "videos"}, "`kind` must be one of"),
])
def test_read_manifest_checks_dataset_json(tmp_path, meta, expected):
    path = tmp_path / "manifest.csv"
    path.write_text(HEADER + GOOD)
    if meta is not None:
        (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=expected) as error:
        read_manifest(path)
    assert "dataset.json" in str(error.value)


def test_group_column_follows_the_manifest_columns(tmp_path):
    rows = [{**row, "group": f"HAM_{index:07d}"} for index, row in enumerate(_rows())]
    manifest = read_manifest(write_dataset(tmp_path, rows, CLASSES, "images", ("group",)))
    assert list(manifest.table.columns) == [*MANIFEST_COLUMNS, "group"]
    assert manifest.table["group"].tolist() == ["HAM_0000000", "HAM_0000001", "HAM_0000002"]


def test_stratified_split_divides_every_class():
    labels = ["benign"] * 80 + ["malignant"] * 80
    splits = stratified_split(labels, {"train": 0.6, "val": 0.15, "test": 0.25}, seed=0)
    assert all(isinstance(split, str) for split in splits)
    for label in ("benign", "malignant"):
        counts = Counter(s for s, l in zip(splits, labels) if l == label)
        assert counts == {"train": 48, "val": 12, "test": 20}


def test_stratified_split_five_to_one_with_uneven_classes():
    labels = np.array([0] * 13 + [1] * 7)
    splits = np.array(stratified_split(labels, {"train": 5 / 6, "test": 1 / 6}, seed=3))
    assert Counter(splits[labels == 0]) == {"train": 11, "test": 2}
    assert Counter(splits[labels == 1]) == {"train": 6, "test": 1}


def test_stratified_split_is_seeded():
    labels = [i % 2 for i in range(40)]
    fractions = {"train": 0.5, "val": 0.25, "test": 0.25}
    assert stratified_split(labels, fractions, 7) == stratified_split(labels, fractions, 7)
    assert stratified_split(labels, fractions, 7) != stratified_split(labels, fractions, 8)


def test_stratified_split_keeps_each_group_in_one_split():
    # 60 groups of one to four samples per class, as the images of skin lesions
    rng = np.random.default_rng(0)
    labels, groups = [], []
    for label in ("benign", "malignant"):
        for group in range(60):
            size = int(rng.integers(1, 5))
            labels += [label] * size
            groups += [f"{label}-{group}"] * size
    fractions = {"train": 0.6, "val": 0.15, "test": 0.25}
    splits = stratified_split(labels, fractions, 3, groups)
    split_of = {}
    for group, split in zip(groups, splits):
        assert split_of.setdefault(group, split) == split
    for label in ("benign", "malignant"):
        counts = Counter(s for s, l in zip(splits, labels) if l == label)
        size = labels.count(label)
        # each split misses its share by at most half a group (two samples)
        assert all(abs(counts[name] - share * size) <= 2.5
                   for name, share in fractions.items())
    assert splits == stratified_split(labels, fractions, 3, groups)
    assert splits != stratified_split(labels, fractions, 4, groups)


def test_stratified_split_with_groups_of_one_is_the_plain_split():
    labels = [i % 3 for i in range(50)]
    fractions = {"train": 0.7, "val": 0.1, "test": 0.2}
    plain = stratified_split(labels, fractions, 5)
    assert stratified_split(labels, fractions, 5, [f"g{i}" for i in range(50)]) == plain
    assert stratified_split(labels, fractions, 5, [None] * 50) == plain


def test_stratified_split_divides_a_group_of_two_labels_with_its_rarer_class():
    # 40 patients of two normal images, 10 of whom also have one abnormal image
    labels, groups = [], []
    for patient in range(40):
        labels += ["normal", "normal"] + (["abnormal"] if patient < 10 else [])
        groups += [f"P{patient}"] * (3 if patient < 10 else 2)
    fractions = {"train": 0.6, "val": 0.2, "test": 0.2}
    for seed in range(5):
        splits = stratified_split(labels, fractions, seed, groups)
        by_patient = {}
        for group, split in zip(groups, splits):
            by_patient.setdefault(group, set()).add(split)
        assert all(len(found) == 1 for found in by_patient.values())  # never divided
        abnormal = [split for label, split in zip(labels, splits) if label == "abnormal"]
        # the 10 abnormal patients are spread by the fractions as a class of their own
        assert [abnormal.count(name) for name in ("train", "val", "test")] == [6, 2, 2]


@pytest.mark.parametrize("fractions, expected", [
    ({"train": 0.5, "test": 0.4}, "sum to 1"),
    ({"train": 0.5, "holdout": 0.5}, "unknown split 'holdout'"),
    ({"train": 1.5, "test": -0.5}, "must be a number >= 0"),
])
def test_stratified_split_rejects_bad_fractions(fractions, expected):
    with pytest.raises(ConfigError, match=expected):
        stratified_split([0, 1], fractions, 0)


def test_manifest_rows_cache_reads_once_and_rereads_a_changed_manifest(tmp_path):
    from medrobust.io.manifest_cache import manifest_rows

    path = write_dataset(tmp_path, _rows(), CLASSES, "images")
    first = manifest_rows(path)
    assert list(first) == ["a", "b", "c"] and first["b"]["label"] == "malignant"
    assert manifest_rows(path) is first  # unchanged file: not read again

    rows = _rows()[:2]  # a row fewer: another size
    write_dataset(tmp_path, rows, CLASSES, "images")
    assert list(manifest_rows(path)) == ["a", "b"]

    # same size, other content: only the modification time tells
    stat = path.stat()
    rows[1]["label"] = "benign"
    rows[1]["sha256"] = "1" * 67  # "malignant" -> "benign" is 3 characters shorter
    write_dataset(tmp_path, rows, CLASSES, "images")
    assert path.stat().st_size == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert manifest_rows(path)["b"]["label"] == "benign"
