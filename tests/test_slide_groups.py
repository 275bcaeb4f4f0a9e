"""Slides per job: the grouping of a manifest's slides, and the links from each slide's
usual path to the copy its group job wrote."""

import os
import re

import pytest

from medrobust.errors import ConfigError, InputError
from medrobust.slide_groups import GROUP_PATTERN, group_slides, link_group_member, plan_slide_groups


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


def test_a_slide_path_links_to_its_groups_copy(tmp_path):
    group = tmp_path / "tiles/.groups/group-000000"
    (group / "a.zarr").mkdir(parents=True)
    (group / "a.zarr/zarr.json").write_text("{}")
    log = tmp_path / "logs/a.log"
    link_group_member(group, tmp_path / "tiles/a.zarr", log)
    assert (tmp_path / "tiles/a.zarr").is_symlink()
    assert not os.path.isabs(os.readlink(tmp_path / "tiles/a.zarr"))  # the folder can move
    assert (tmp_path / "tiles/a.zarr/zarr.json").read_text() == "{}"
    assert "a.zarr" in log.read_text()
    with pytest.raises(InputError, match="wrote no b.zarr.*--forcerun"):
        link_group_member(group, tmp_path / "tiles/b.zarr", log)
