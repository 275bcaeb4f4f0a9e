"""The slide index: a dataset's per-slide stores listed in one file (medrobust.slide_index)."""

from pathlib import Path

import pytest

from medrobust.errors import InputError
from medrobust.slide_index import read_slide_index, write_slide_index

SLIDES = [("slide_a", "train"), ("slide_b", "test"), ("slide_c", "val"), ("slide_d", "test")]


@pytest.fixture
def manifest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # the indexed paths, relative as the workflow writes them
    for dataset in ("cohort", "one", "two"):
        for slide, _ in SLIDES:
            Path(f"results/tiles/{dataset}/{slide}.zarr").mkdir(parents=True)
            Path(f"results/tiles/{dataset}/{slide}.qc.png").touch()
    path = tmp_path / "manifest.csv"
    path.write_text("sample_id,path,label,split\n" + "".join(
        f"{slide},slides/{slide}.tiff,tumor,{split}\n" for slide, split in SLIDES))
    return path


def tile_outputs(dataset="cohort"):
    return {"tiles": [f"results/tiles/{dataset}/{slide}.zarr" for slide, _ in SLIDES],
            "qc": [f"results/tiles/{dataset}/{slide}.qc.png" for slide, _ in SLIDES]}


def test_index_lists_every_kind_in_manifest_order_and_filters_by_split(manifest, tmp_path):
    index = tmp_path / "index.csv"
    write_slide_index(manifest, index, tile_outputs())
    assert index.read_text().splitlines()[:2] == [
        "slide_id,split,tiles,qc,n_slides",
        "slide_a,train,results/tiles/cohort/slide_a.zarr,results/tiles/cohort/slide_a.qc.png,4"]
    assert read_slide_index(index, "tiles") == tile_outputs()["tiles"]
    assert read_slide_index(index, "qc") == tile_outputs()["qc"]
    assert read_slide_index(index, "tiles", split="test") == [
        "results/tiles/cohort/slide_b.zarr", "results/tiles/cohort/slide_d.zarr"]


def test_several_indexes_read_as_one_list_in_the_given_order(manifest, tmp_path):
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    write_slide_index(manifest, first, tile_outputs("one"))
    write_slide_index(manifest, second, tile_outputs("two"))
    assert read_slide_index([second, first], "qc") == tile_outputs("two")["qc"] + tile_outputs("one")["qc"]


def test_paths_out_of_manifest_order_are_refused_naming_the_path(manifest, tmp_path):
    stores = [f"results/tiles/cohort/{slide}.zarr" for slide, _ in SLIDES]
    stores[1], stores[2] = stores[2], stores[1]
    index = tmp_path / "index.csv"
    with pytest.raises(InputError, match=r"slide_c\.zarr is not slide 'slide_b'"):
        write_slide_index(manifest, index, {"features": stores})
    assert not index.exists()


def test_a_missing_slide_is_refused_naming_the_manifest(manifest, tmp_path):
    stores = [f"results/tiles/cohort/{slide}.zarr" for slide, _ in SLIDES[:3]]
    with pytest.raises(InputError, match=r"manifest\.csv: 4 slides, but 3 features paths"):
        write_slide_index(manifest, tmp_path / "index.csv", {"features": stores})


def test_a_listed_store_that_is_not_there_is_refused_naming_it(manifest, tmp_path):
    Path("results/tiles/cohort/slide_c.qc.png").unlink()   # deleted by hand
    with pytest.raises(InputError, match=r"slide_c\.qc\.png: slide 'slide_c'.s qc is missing"):
        write_slide_index(manifest, tmp_path / "index.csv", tile_outputs())
    assert not (tmp_path / "index.csv").exists()


def test_slide_ids_that_prefix_each_other_keep_their_own_paths(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("sample_id,split\na,train\na.qc,test\n")   # ids "a" and "a.qc"
    right = {"qc": [str(tmp_path / "t/a.qc.png"), str(tmp_path / "t/a.qc.qc.png")]}
    (tmp_path / "t").mkdir()
    for path in right["qc"]:
        Path(path).touch()
    write_slide_index(manifest, tmp_path / "index.csv", right)
    assert read_slide_index(tmp_path / "index.csv", "qc", split="test") == [right["qc"][1]]
    with pytest.raises(InputError, match=r"t/a\.qc\.png is not slide 'a\.qc'"):
        write_slide_index(manifest, tmp_path / "index.csv", {"qc": right["qc"][::-1]})


def test_reading_a_file_that_is_not_such_an_index_names_it(manifest, tmp_path):
    index = tmp_path / "index.csv"
    write_slide_index(manifest, index, tile_outputs())
    with pytest.raises(InputError, match=r"index\.csv: not a slide index with a 'features' column"):
        read_slide_index(index, "features")


def test_an_index_cut_anywhere_in_its_rows_is_refused_naming_the_line(manifest, tmp_path):
    """A cut mid-line gave None or a shortened path for the last slide, naming no file;
    a cut at a line boundary was read as fewer slides."""
    index = tmp_path / "index.csv"
    write_slide_index(manifest, index, tile_outputs())
    text = index.read_text()
    for end in range(text.index("\n") + 1, len(text) - 1):   # all but the last newline
        index.write_text(text[:end])
        with pytest.raises(InputError, match=r"index\.csv: line [2-5]: .* damaged or cut short"):
            read_slide_index(index, "qc")
    index.write_text(text[:-2])   # in the last row's count: "...slide_d.qc.png,"
    with pytest.raises(InputError, match=r"line 5: n_slides is '', but there are 4 slide rows"):
        read_slide_index(index, "tiles")
    index.write_text(text[:-5])   # in its last path, "...slide_d.qc.p": 4 cells for 5
    with pytest.raises(InputError, match=r"line 5: 4 cells for the header's 5"):
        read_slide_index(index, "tiles")
    index.write_text(text[:-1])   # only the last newline: every slide is there
    assert read_slide_index(index, "qc") == tile_outputs()["qc"]


@pytest.mark.parametrize("removed", [[4], [2], [1, 2, 3, 4]], ids=["last", "middle", "all"])
def test_an_index_with_rows_removed_is_refused(manifest, tmp_path, removed):
    index = tmp_path / "index.csv"
    write_slide_index(manifest, index, tile_outputs())
    lines = index.read_text().splitlines(keepends=True)
    index.write_text("".join(line for number, line in enumerate(lines) if number not in removed))
    left = len(lines) - 1 - len(removed)
    with pytest.raises(InputError, match=(rf"index\.csv: line 2: n_slides is '4', but there are "
                                          rf"{left} slide rows" if left else
                                          r"index\.csv: line 2: 0 cells for the header's 5")):
        read_slide_index(index, "tiles", split="test")


def test_a_manifest_without_slides_is_not_indexed(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("sample_id,split\n")
    with pytest.raises(InputError, match=r"manifest\.csv: no slides to index"):
        write_slide_index(manifest, tmp_path / "index.csv", {"qc": []})
