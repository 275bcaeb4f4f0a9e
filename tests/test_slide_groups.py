"""Slides per job: the grouping of a manifest's slides, and a group job's work kept
across a failure."""

import re

import pytest

from medrobust.errors import ConfigError, InputError
from medrobust.slide_groups import (GROUP_PATTERN, UNFINISHED_SUFFIX, GroupWork, group_slides,
                                   plan_slide_groups, unused_group_folders)


def test_groups_take_the_slides_in_order_k_at_a_time():
    slides = [f"s{i}" for i in range(7)]
    groups = group_slides(slides, 3)
    assert list(groups.members.values()) == [("s0", "s1", "s2"), ("s3", "s4", "s5"), ("s6",)]
    assert all(re.fullmatch(GROUP_PATTERN, name) for name in groups.members)
    assert {slide: groups.group_of[slide] for slide in ("s0", "s5", "s6")} == {
        "s0": "group-000000", "s5": "group-000001", "s6": "group-000002"}
    # appending slides leaves the full groups as they were
    more = group_slides(slides + ["s7", "s8", "s9"], 3)
    assert [more.members[name] for name in list(groups.members)[:2]] == \
        list(groups.members.values())[:2]
    assert list(group_slides(slides, 1).members.values()) == [(slide,) for slide in slides]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="slides_per_job"):
            group_slides(slides, bad)


def test_a_manifest_is_grouped_once_per_version(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("sample_id,path,label,split,sha256\na,a.tif,x,train,0\nb,b.tif,x,test,0\n")
    first = plan_slide_groups(manifest, 1)
    assert plan_slide_groups(manifest, 1) is first
    manifest.write_text(manifest.read_text() + "c,c.tif,x,val,0\n")
    assert list(plan_slide_groups(manifest, 2).members.values()) == [("a", "b"), ("c",)]


def test_group_work_keeps_finished_slides_for_a_rerun_with_the_same_settings(tmp_path):
    group_dir = tmp_path / "groups" / "group-000000"
    work = GroupWork(group_dir, {"tile_size": 224, "code": "abc"})
    assert work.folder == tmp_path / "groups" / f"group-000000{UNFINISHED_SUFFIX}"
    (work.folder / "slide_a.zarr").mkdir()
    work.mark_done("slide_a", {"sha256": "1" * 64})
    # the job dies here; its rerun:
    again = GroupWork(group_dir, {"tile_size": 224, "code": "abc"})
    assert again.finished == 1
    outputs = ["slide_a.zarr"]
    assert again.kept("slide_a", {"sha256": "1" * 64}, outputs=outputs)
    assert again.kept("slide_a", {"sha256": "2" * 64}, {"sha256": "1" * 64}, outputs=outputs)
    assert not again.kept("slide_a", {"sha256": "2" * 64}, outputs=outputs)   # file changed
    assert not again.kept("slide_b", {"sha256": "1" * 64}, outputs=["slide_b.zarr"])
    assert not again.kept("slide_a", {"sha256": "1" * 64}, outputs=[*outputs, "slide_a.qc.png"])
    assert (again.folder / "slide_a.zarr").is_dir()


@pytest.mark.parametrize("ledger", [None, "not json {"])
def test_group_work_starts_afresh_for_other_settings_or_an_unreadable_ledger(tmp_path, ledger):
    group_dir = tmp_path / "group-000000"
    work = GroupWork(group_dir, {"code": "abc"})
    (work.folder / "slide_a.zarr").mkdir()
    work.mark_done("slide_a", {})
    if ledger is None:
        again = GroupWork(group_dir, {"code": "edited"})
    else:
        (work.folder / "finished.json").write_text(ledger)
        again = GroupWork(group_dir, {"code": "abc"})
    assert again.finished == 0 and not again.kept("slide_a", {}, outputs=[])
    assert list(again.folder.iterdir()) == []


def test_a_completed_group_becomes_the_output_folder_with_only_its_outputs(tmp_path):
    group_dir = tmp_path / "group-000000"
    work = GroupWork(group_dir, {"code": "abc"})
    for name in ("slide_a.zarr", "slide_old.zarr", ".slide_b.zarr.x1y2.partial"):
        (work.folder / name).mkdir()   # a member, a former member, a killed write's temporary
    (work.folder / "slide_a.qc.png").write_bytes(b"png")
    work.mark_done("slide_a", {})
    work.complete({"slide_a.zarr", "slide_a.qc.png"})
    assert sorted(path.name for path in group_dir.iterdir()) == ["slide_a.qc.png", "slide_a.zarr"]
    assert not work.folder.exists()


def test_group_folders_no_listed_store_is_in_are_found_for_the_log(tmp_path):
    stage = tmp_path / "results/tiles/cohort"
    for name in ("group-000000", "group-000001", "group-000001.unfinished", "group-000007"):
        (stage / "groups" / name).mkdir(parents=True)
    listed = [str(stage / "groups/group-000000/a.zarr"), str(stage / "groups/group-000001/b.zarr")]
    assert [path.name for path in unused_group_folders(stage, listed)] == [
        "group-000001.unfinished", "group-000007"]
    assert unused_group_folders(tmp_path / "results/tiles/other", listed) == []
