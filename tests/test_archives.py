"""Archive extraction: good archives unpack, malicious ones are refused whole."""

import io
import stat
import tarfile
import zipfile

import pytest

from medrobust.data.archives import (
    UnsafeArchiveError,
    archive_stem,
    extract_archive,
    is_archive,
)
from medrobust.errors import InputError


def make_zip(path, members, links=()):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def make_tar(path, members=(), mode="w:gz"):
    """`members`: (TarInfo fields as a dict, data bytes or None)."""
    with tarfile.open(path, mode) as tar:
        for fields, data in members:
            info = tarfile.TarInfo(fields.pop("name"))
            for key, value in fields.items():
                setattr(info, key, value)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def file_member(name, data=b"x"):
    return {"name": name}, data


def link_member(name, target, kind=tarfile.SYMTYPE):
    return {"name": name, "type": kind, "linkname": target}, None


def test_zip_extracts_nested_folders(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {"top/labels.csv": "a,b\n", "top/img/1.png": "png"})
    dest = extract_archive(archive, tmp_path / "out")
    assert (dest / "top/labels.csv").read_text() == "a,b\n"
    assert (dest / "top/img/1.png").read_text() == "png"


@pytest.mark.parametrize("mode, name", [("w", "a.tar"), ("w:gz", "a.tar.gz"),
                                        ("w:bz2", "a.tar.bz2"), ("w:xz", "a.tar.xz")])
def test_tar_variants_extract_with_inside_links(tmp_path, mode, name):
    archive = make_tar(tmp_path / name, [file_member("d/data.txt", b"hello"),
                                         link_member("d/alias.txt", "data.txt")], mode)
    dest = extract_archive(archive, tmp_path / "out")
    assert (dest / "d/data.txt").read_bytes() == b"hello"
    assert (dest / "d/alias.txt").read_bytes() == b"hello"


def assert_refused(archive, tmp_path, fragment):
    outside = tmp_path / "outside.txt"
    with pytest.raises(UnsafeArchiveError, match=fragment) as error:
        extract_archive(archive, tmp_path / "work" / "out")
    assert str(archive) in str(error.value)
    assert not (tmp_path / "work" / "out").exists()
    assert not outside.exists()
    # nothing at all was written: no temporary folder is left behind either
    assert list((tmp_path / "work").iterdir()) == []


@pytest.mark.parametrize("name", ["../outside.txt", "ok/../../outside.txt",
                                  "..\\outside.txt"])
def test_zip_with_climbing_path_is_refused(tmp_path, name):
    archive = make_zip(tmp_path / "evil.zip", {"fine.txt": "a", name: "b"})
    assert_refused(archive, tmp_path, "climbs out")


@pytest.mark.parametrize("name", ["/tmp/outside.txt", "C:/outside.txt"])
def test_zip_with_absolute_path_is_refused(tmp_path, name):
    archive = make_zip(tmp_path / "evil.zip", {name: "b"})
    assert_refused(archive, tmp_path, "absolute path")


def test_zip_with_link_out_is_refused(tmp_path):
    archive = make_zip(tmp_path / "evil.zip", {"a.txt": "a"}, links=[("up", "../../etc")])
    assert_refused(archive, tmp_path, "outside the target folder")


def test_tar_with_climbing_path_is_refused(tmp_path):
    archive = make_tar(tmp_path / "evil.tar.gz", [file_member("../outside.txt")])
    assert_refused(archive, tmp_path, "climbs out")


def test_tar_with_absolute_path_is_refused(tmp_path):
    archive = make_tar(tmp_path / "evil.tar.gz", [file_member(str(tmp_path / "outside.txt"))])
    assert_refused(archive, tmp_path, "absolute path")


@pytest.mark.parametrize("link", [
    link_member("d/link", "../../outside.txt"),
    link_member("link", "/etc/passwd"),
    link_member("hard", "../outside.txt", tarfile.LNKTYPE),
])
def test_tar_with_link_out_is_refused(tmp_path, link):
    archive = make_tar(tmp_path / "evil.tar", [file_member("d/ok.txt"), link], "w")
    assert_refused(archive, tmp_path, "outside the target folder|absolute path")


def test_tar_with_device_file_is_refused(tmp_path):
    device = ({"name": "dev", "type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}, None)
    archive = make_tar(tmp_path / "evil.tar", [device], "w")
    assert_refused(archive, tmp_path, "device or pipe")


def test_refusing_verifier_leaves_nothing(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {"x.txt": "x"})

    def verify(folder):
        assert (folder / "x.txt").exists()
        raise InputError("checksums do not match")

    with pytest.raises(InputError, match="checksums do not match"):
        extract_archive(archive, tmp_path / "out", verify=verify)
    assert not (tmp_path / "out").exists()


def test_not_an_archive(tmp_path):
    (tmp_path / "plain.zip").write_bytes(b"not really")
    with pytest.raises(InputError, match="not a zip or tar archive"):
        extract_archive(tmp_path / "plain.zip", tmp_path / "out")


def test_archive_names():
    assert archive_stem("ISIC2018_Task3_Training_Input.zip") == "ISIC2018_Task3_Training_Input"
    assert archive_stem("slides.TAR.GZ") == "slides"
    assert is_archive("x.tgz") and not is_archive("x.csv")
