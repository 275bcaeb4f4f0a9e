"""The `local` source: an existing folder plus a labels table."""

import hashlib

import pytest

from medrobust.data.manifest import read_manifest
from medrobust.data.sources import fetch_dataset
from medrobust.errors import ConfigError, InputError


def make_folder(root, rows, header="filename,finding", table="labels.csv", sep=","):
    """Files images/<name> with distinct bytes, and a labels table listing `rows`."""
    (root / "images").mkdir(parents=True)
    lines = [header]
    for index, row in enumerate(rows):
        name = row[0]
        (root / "images" / name).write_bytes(f"image {index}".encode())
        lines.append(sep.join(row))
    (root / table).write_text("\n".join(lines) + "\n")
    return root


def dataset(root, classes=("normal", "pneumonia"), **labels):
    labels = {"table": "labels.csv", "path_column": "filename", "label_column": "finding",
              "path_template": "images/{}", **labels}
    return {"kind": "images", "classes": list(classes),
            "source": {"type": "local", "root": str(root), "labels": labels,
                       "splits": {"train": 0.5, "test": 0.5}, "seed": 3}}


ROWS = [("a.png", "NORMAL"), ("b.png", "NORMAL"), ("c.png", "PNEUMONIA"),
        ("d.png", "PNEUMONIA"), ("e.png", "UNSURE")]
LABEL_MAP = {"NORMAL": "normal", "PNEUMONIA": "pneumonia", "UNSURE": None}


def test_local_folder_becomes_a_manifest(tmp_path):
    root = make_folder(tmp_path / "xray", ROWS)
    path = fetch_dataset(dataset(root, label_map=LABEL_MAP), tmp_path / "resources" / "xray")
    manifest = read_manifest(path)
    table = manifest.table.set_index("sample_id")
    assert list(table.index) == ["a", "b", "c", "d"]          # UNSURE was dropped
    assert table.loc["c", "label"] == "pneumonia"
    assert table.loc["a", "path"] == "data/images/a.png"      # through the link, not a copy
    assert (manifest.root / "data").is_symlink()
    assert table.loc["a", "sha256"] == hashlib.sha256(b"image 0").hexdigest()
    # stratified: one of each class in each split
    assert sorted(table.groupby("split")["label"].apply(sorted).tolist()) \
        == [["normal", "pneumonia"]] * 2
    assert manifest.classes == ["normal", "pneumonia"] and manifest.kind == "images"


def test_same_seed_same_splits(tmp_path):
    root = make_folder(tmp_path / "xray", ROWS)
    config = dataset(root, label_map=LABEL_MAP)
    first = read_manifest(fetch_dataset(config, tmp_path / "one")).table
    second = read_manifest(fetch_dataset(config, tmp_path / "two")).table
    assert first["split"].tolist() == second["split"].tolist()


def test_split_column_and_id_column_and_tsv(tmp_path):
    rows = [("a.png", "0", "train", "p1"), ("b.png", "1", "val", "p2"),
            ("c.png", "1", "test", "p3")]
    root = make_folder(tmp_path / "x", rows, header="filename\tfinding\tsplit\tid",
                       table="labels.tsv", sep="\t")
    config = dataset(root, table="labels.tsv", split_column="split", id_column="id",
                     label_map={0: "normal", 1: "pneumonia"})   # YAML reads these keys as ints
    table = read_manifest(fetch_dataset(config, tmp_path / "out")).table
    assert table[["sample_id", "label", "split"]].values.tolist() == [
        ["p1", "normal", "train"], ["p2", "pneumonia", "val"], ["p3", "pneumonia", "test"]]


def test_group_column_keeps_a_patient_in_one_split_and_reaches_the_manifest(tmp_path):
    # 12 patients of 3 images; 4 have a pneumonia image beside their normal ones
    rows = [(f"p{patient}_{view}.png", "PNEUMONIA" if patient < 4 and view == 0 else "NORMAL",
             f"P{patient}" if patient else "")  # patient 0's cells are empty: each alone
            for patient in range(12) for view in range(3)]
    root = make_folder(tmp_path / "xray", rows, header="filename,finding,patient")
    config = dataset(root, label_map=LABEL_MAP, group_column="patient")
    manifest = read_manifest(fetch_dataset(config, tmp_path / "out"))
    table = manifest.table
    assert (table.groupby("group")["split"].nunique() == 1).all()   # never divided
    assert table["group"].tolist() == [""] * 3 + [f"P{p}" for p in range(1, 12) for _ in "abc"]
    assert manifest.groups["p0_0"] is None and manifest.groups["p5_2"] == "P5"
    assert table[table["label"] == "pneumonia"]["split"].value_counts().to_dict() \
        == {"train": 2, "test": 2}


def test_patients_in_test_and_training_by_the_split_column_are_named(tmp_path, caplog):
    rows = [("a.png", "NORMAL", "train", "P1"), ("b.png", "NORMAL", "test", "P1"),
            ("c.png", "PNEUMONIA", "test", "P2"), ("d.png", "PNEUMONIA", "val", "P3")]
    root = make_folder(tmp_path / "xray", rows, header="filename,finding,split,patient")
    config = dataset(root, label_map=LABEL_MAP, split_column="split", group_column="patient")
    with caplog.at_level("WARNING"):
        fetch_dataset(config, tmp_path / "out")
    assert "1 group(s) ('group' column: patients or lesions) have samples in the test split " \
           "and in train or val (first: P1)" in caplog.text


def test_unknown_label_names_the_row(tmp_path):
    root = make_folder(tmp_path / "xray", ROWS)
    with pytest.raises(InputError) as error:
        fetch_dataset(dataset(root, label_map={"NORMAL": "normal", "PNEUMONIA": "pneumonia"}),
                      tmp_path / "out")
    message = str(error.value)
    assert "labels.csv: line 6" in message and "'e.png'" in message and "'UNSURE'" in message
    assert "label_map" in message
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_label_mapped_to_a_missing_class_is_reported(tmp_path):
    root = make_folder(tmp_path / "xray", ROWS[:2])
    with pytest.raises(InputError, match="line 2.*'NORMAL'.*maps to 'healthy'"):
        fetch_dataset(dataset(root, label_map={"NORMAL": "healthy"}), tmp_path / "out")


def test_missing_file_names_the_row(tmp_path):
    root = make_folder(tmp_path / "xray", ROWS[:4])
    (root / "images" / "c.png").unlink()
    with pytest.raises(InputError, match="line 4 \\(filename 'c.png'\\): no file"):
        fetch_dataset(dataset(root, label_map=LABEL_MAP), tmp_path / "out")


def test_duplicate_sample_id_names_both_lines(tmp_path):
    rows = [("a.svs", "tumor", "s1"), ("b.svs", "normal", "s2"), ("c.svs", "normal", "s1")]
    root = make_folder(tmp_path / "slides", rows, header="filename,finding,slide")
    config = {**dataset(root, classes=("normal", "tumor"), id_column="slide"), "kind": "slides"}
    with pytest.raises(InputError) as error:
        fetch_dataset(config, tmp_path / "out")
    message = str(error.value)
    assert "labels.csv: line 4" in message and "'s1' is also on line 2" in message
    assert not (tmp_path / "out" / "dataset.json").exists()
    # two paths with the same name but different extensions share the default id
    root = make_folder(tmp_path / "two", [("x.tif", "normal"), ("x.svs", "tumor")])
    with pytest.raises(InputError, match="line 3 .*'x' is also on line 2"):
        fetch_dataset(dataset(root, classes=("normal", "tumor")), tmp_path / "out2")


def test_slides_in_subfolders_need_ids_of_their_own(tmp_path):
    """The default id is the path less its extension; a slide's id names its tile and
    feature stores, so `normal/a` would put them in subfolders that a group job's
    completion removed (tiles lost without an error). Refused before any checksum."""
    rows = [("normal/a.svs", "normal"), ("tumor/b.svs", "tumor")]
    root = tmp_path / "slides"
    for folder in ("normal", "tumor"):
        (root / "images" / folder).mkdir(parents=True)
    for name, _ in rows:
        (root / "images" / name).write_bytes(name.encode())
    (root / "labels.csv").write_text("filename,finding\n" + "".join(
        f"{name},{label}\n" for name, label in rows))
    config = {**dataset(root, classes=("normal", "tumor")), "kind": "slides"}
    with pytest.raises(InputError, match=r"slide id 'normal/a' cannot name.*id_column") as error:
        fetch_dataset(config, tmp_path / "out")
    assert "normal/a.svs" in str(error.value)
    assert not (tmp_path / "out" / "dataset.json").exists()
    # images keep such ids: they name no file
    images = {**dataset(root, classes=("normal", "tumor")), "kind": "images"}
    fetch_dataset(images, tmp_path / "images_out")
    assert set(read_manifest(tmp_path / "images_out" / "manifest.csv").table["sample_id"]) \
        == {"normal/a", "tumor/b"}


@pytest.mark.parametrize("table, message", [
    ("filename,finding\na.png,NORMAL\nb.png,NORMAL,extra\n",
     r"labels.csv: line 3 has 3 cells, the header 2"),
    ("filename,finding\na.png,NORMAL\n.,NORMAL\n", r"line 3 \(filename '.'\): .* names no file"),
    ("filename,finding\n\xe9.png,NORMAL\n".encode("latin-1"), "labels.csv: not UTF-8 text"),
])
def test_a_malformed_labels_table_names_the_table_and_line(tmp_path, table, message):
    root = make_folder(tmp_path / "data", [("a.png", "NORMAL"), ("b.png", "NORMAL")])
    (root / "labels.csv").write_bytes(table if isinstance(table, bytes) else table.encode())
    config = dataset(root, label_map={"NORMAL": "normal"})
    with pytest.raises(InputError, match=message):
        fetch_dataset(config, tmp_path / "out")


def test_bad_split_value_names_the_row(tmp_path):
    root = make_folder(tmp_path / "x", [("a.png", "normal", "training")],
                       header="filename,finding,split")
    with pytest.raises(InputError, match="line 2.*split 'training'"):
        fetch_dataset(dataset(root, split_column="split"), tmp_path / "out")


def test_missing_column_lists_the_header(tmp_path):
    root = make_folder(tmp_path / "xray", ROWS)
    with pytest.raises(InputError, match="no column\\(s\\) diagnosis; it has: filename, finding$"):
        fetch_dataset(dataset(root, label_column="diagnosis"), tmp_path / "out")
    # a spreadsheet's semicolons in a .csv: the header reads as one name
    root = make_folder(tmp_path / "semicolons", ROWS, header="filename;finding", sep=";")
    with pytest.raises(InputError, match="it has: filename;finding \\(it looks separated by ;: "
                                         "a .csv table is read with commas"):
        fetch_dataset(dataset(root), tmp_path / "out2")


def test_a_path_outside_the_folder_or_a_folder_that_is_a_file_is_refused(tmp_path):
    root = make_folder(tmp_path / "xray", ROWS[:4])
    (tmp_path / "elsewhere.png").write_bytes(b"x")
    for cell, template in (("../../elsewhere.png", "images/{}"),
                           (str(tmp_path / "elsewhere.png"), "{}")):
        (root / "labels.csv").write_text(f"filename,finding\n{cell},NORMAL\n")
        with pytest.raises(InputError, match=f"line 2 .*: .*elsewhere.png is not inside "
                                             f"{root}; name the files relative to that folder"):
            fetch_dataset(dataset(root, label_map=LABEL_MAP, path_template=template),
                          tmp_path / "out")
    # inside the folder after all, through '..' or in full: the manifest's path is the file's
    (root / "labels.csv").write_text(f"filename,finding\nimages/../images/a.png,NORMAL\n"
                                     f"images/b.png,PNEUMONIA\n"
                                     f"{root / 'images' / 'c.png'},NORMAL\n")
    manifest = read_manifest(fetch_dataset(dataset(root, label_map=LABEL_MAP, path_template="{}"),
                                           tmp_path / "in"))
    assert manifest.table["path"].tolist() == ["data/images/a.png", "data/images/b.png",
                                               "data/images/c.png"]
    assert (manifest.root / manifest.table["path"][0]).read_bytes() == b"image 0"
    with pytest.raises(InputError, match="labels.csv is a file, not a folder"):
        fetch_dataset(dataset(root / "labels.csv"), tmp_path / "out")


def test_unknown_config_key_is_named(tmp_path):
    config = dataset(tmp_path)
    config["source"]["roots"] = "typo"
    with pytest.raises(ConfigError, match="unknown key\\(s\\) roots"):
        fetch_dataset(config, tmp_path / "out")
    config = dataset(tmp_path, columns="x")
    with pytest.raises(ConfigError, match="source.labels: unknown key\\(s\\) columns"):
        fetch_dataset(config, tmp_path / "out")


def test_missing_folder_and_missing_classes(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        fetch_dataset(dataset(tmp_path / "nowhere"), tmp_path / "out")
    config = dataset(make_folder(tmp_path / "xray", ROWS))
    del config["classes"]
    with pytest.raises(ConfigError, match="classes"):
        fetch_dataset(config, tmp_path / "out")


def test_an_empty_split_and_a_file_in_two_splits_are_warned_of(tmp_path, caplog):
    root = make_folder(tmp_path / "xray", ROWS[:4])
    rows = ["filename,finding,split", "a.png,NORMAL,train", "b.png,NORMAL,test",
            "c.png,PNEUMONIA,train", "d.png,PNEUMONIA,test"]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "images" / "b.png").write_bytes((root / "images" / "a.png").read_bytes())
    with caplog.at_level("WARNING"):
        fetch_dataset(dataset(root, label_map=LABEL_MAP, split_column="split"), tmp_path / "out")
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert any("no val samples: models are kept from their last epoch" in text
               for text in warnings), warnings
    assert any("1 file(s) are in more than one split under different sample ids (same sha256)"
               ", which leaks them between splits: a (train), b (test)" in text
               for text in warnings), warnings
