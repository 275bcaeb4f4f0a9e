"""Archive extraction: good archives unpack, malicious ones are refused whole."""

import io
import os
import stat
import tarfile
import zipfile

import pytest

from fixtures_http import symlink_chain_tar, symlink_chain_zip, zip_bomb
from medrobust.data.archives import (
    ArchiveLimits,
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


def assert_refused(archive, tmp_path, fragment, **options):
    outside = tmp_path / "outside.txt"
    with pytest.raises(UnsafeArchiveError, match=fragment) as error:
        extract_archive(archive, tmp_path / "work" / "out", **options)
    assert str(archive) in str(error.value)
    assert not (tmp_path / "work" / "out").exists()
    assert not outside.exists()
    assert not any(path.name in ("outside.txt", "escaped.txt") for path in tmp_path.rglob("*"))
    # nothing at all was written: no temporary folder is left behind either
    assert not (tmp_path / "work").exists() or list((tmp_path / "work").iterdir()) == []
    return str(error.value)


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
    assert_refused(archive, tmp_path, "member 'up' is a symbolic link \\(to '../../etc'\\)")
    assert_refused(archive, tmp_path, "link 'up' points to '../../etc', outside the target "
                   "folder", zip_links=True)


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


@pytest.mark.parametrize("kind, words", [(tarfile.CHRTYPE, "a character device"),
                                         (tarfile.BLKTYPE, "a block device"),
                                         (tarfile.FIFOTYPE, "a named pipe")])
def test_tar_with_device_file_is_refused(tmp_path, kind, words):
    device = ({"name": "dev", "type": kind, "devmajor": 1, "devminor": 3}, None)
    archive = make_tar(tmp_path / "evil.tar", [file_member("ok.txt"), device], "w")
    message = assert_refused(archive, tmp_path, "device files and pipes are refused")
    assert f"member 'dev' is {words}" in message


@pytest.mark.parametrize("mode", [stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK])
def test_zip_with_device_file_is_refused(tmp_path, mode):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", "a")
        info = zipfile.ZipInfo("dev/null")
        info.create_system, info.external_attr = 3, (mode | 0o666) << 16
        zf.writestr(info, "")
    assert_refused(archive, tmp_path, "member 'dev/null' is a .*device files and pipes")


# --- links made earlier in the same archive ------------------------------------------------

def test_zip_symlink_chain_is_refused_at_its_first_link(tmp_path):
    archive = tmp_path / "chain.zip"
    archive.write_bytes(symlink_chain_zip(levels=2))
    message = assert_refused(archive, tmp_path, "member 'c/up0' is a symbolic link")
    assert "links in zip archives are refused" in message


def test_zip_symlink_chain_with_links_allowed_is_refused_where_it_leaves(tmp_path):
    archive = tmp_path / "chain.zip"
    archive.write_bytes(symlink_chain_zip(levels=2))
    message = assert_refused(archive, tmp_path, "outside the target folder", zip_links=True)
    # c/up0 -> .. lands at the top; c/up0/up1 then sits at the top and climbs out
    assert "link 'c/up0/up1' (through earlier links it lands at 'up1') points to '..'" \
        in message


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_tar_symlink_chain_is_refused_with_medrobusts_message(tmp_path, mode):
    archive = tmp_path / "chain.tar"
    archive.write_bytes(symlink_chain_tar(levels=3, mode=mode))
    message = assert_refused(archive, tmp_path, "link 'c/up0/up1'")
    assert "outside the target folder" in message and "refusing the archive" in message


def test_file_written_through_a_link_redirected_later_is_refused(tmp_path):
    """Each link points inside when made; replacing `x` makes `y` lead out."""
    archive = make_tar(tmp_path / "evil.tar", [
        ({"name": "a/b", "type": tarfile.DIRTYPE}, None),
        link_member("x", "a/b"),
        link_member("y", "x/../.."),     # a/b/../.. = the top: inside
        link_member("x", "a"),           # replaces x: now y is a/../.. = outside
        file_member("y/escaped.txt", b"pwned"),
    ], "w")
    message = assert_refused(archive, tmp_path, "member 'y/escaped.txt' would be written "
                             "outside the target folder through the link")
    assert "'y -> x/../..'" in message and "'x -> a'" in message


def test_link_redirected_later_is_refused_even_unused(tmp_path):
    archive = make_tar(tmp_path / "evil.tar", [
        ({"name": "a/b", "type": tarfile.DIRTYPE}, None),
        link_member("x", "a/b"), link_member("y", "x/../.."), link_member("x", "a"),
    ], "w")
    assert_refused(archive, tmp_path, "link 'y' points to 'x/../..', which leads outside the "
                   "target folder once the whole archive is unpacked")


def test_hard_link_through_a_symlink_out_is_refused(tmp_path):
    archive = make_tar(tmp_path / "evil.tar", [
        ({"name": "d", "type": tarfile.DIRTYPE}, None),
        link_member("d/up", ".."),                          # the top: inside
        link_member("copy", "d/up/../outside.txt", tarfile.LNKTYPE),
    ], "w")
    assert_refused(archive, tmp_path, "hard link 'copy' points to 'd/up/../outside.txt', "
                   "outside the target folder")


def test_links_inside_and_replaced_links_extract_safely(tmp_path):
    (tmp_path / "target.txt").write_bytes(b"untouched")
    archive = make_tar(tmp_path / "fine.tar", [
        file_member("data/a.txt", b"A"),
        link_member("alias", "data"),
        file_member("alias/b.txt", b"B"),                   # written into data/
        link_member("f", "data/a.txt"),
        file_member("f", b"F"),                              # replaces the link f
        link_member("hard", "alias/a.txt", tarfile.LNKTYPE),
    ], "w")
    dest = extract_archive(archive, tmp_path / "out")
    assert (dest / "data/b.txt").read_bytes() == b"B" and (dest / "alias").is_symlink()
    assert not (dest / "f").is_symlink() and (dest / "f").read_bytes() == b"F"
    assert (dest / "data/a.txt").read_bytes() == b"A"
    assert (dest / "hard").read_bytes() == b"A" and not (dest / "hard").is_symlink()
    assert (tmp_path / "target.txt").read_bytes() == b"untouched"


def test_zip_links_inside_are_kept_when_allowed(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {"d/data.txt": "hello"},
                       links=[("d/alias.txt", "data.txt")])
    dest = extract_archive(archive, tmp_path / "out", zip_links=True)
    assert os.readlink(dest / "d/alias.txt") == "data.txt"
    assert (dest / "d/alias.txt").read_text() == "hello"


# --- size and ratio limits ------------------------------------------------------------------

def test_zip_bomb_is_refused_before_anything_is_written(tmp_path):
    archive = tmp_path / "bomb.zip"
    archive.write_bytes(zip_bomb())                          # 100 MiB of zeros in ~460 kB
    message = assert_refused(archive, tmp_path, "compression ratio of 2[0-9][0-9]:1, above "
                             "the limit of 100:1")
    assert "member 'zeros.bin'" in message and "`download.max_compression_ratio`" in message


def test_zip_bomb_passes_a_raised_ratio_limit(tmp_path):
    archive = tmp_path / "bomb.zip"
    archive.write_bytes(zip_bomb(8))
    dest = extract_archive(archive, tmp_path / "out",
                           limits=ArchiveLimits(max_ratio=1000, ratio_floor=0))
    assert (dest / "zeros.bin").stat().st_size == 8 << 20


def test_small_archives_are_not_held_to_the_ratio(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {"labels.csv": "0.0," * 100_000})  # ~600:1
    assert (extract_archive(archive, tmp_path / "out") / "labels.csv").is_file()


def test_unpacked_size_limit_names_the_member(tmp_path):
    archive = make_zip(tmp_path / "big.zip", {"a.bin": os.urandom(600), "b.bin": os.urandom(600)})
    message = assert_refused(archive, tmp_path, "more than 1 kB .* by member 'b.bin'",
                             limits=ArchiveLimits(max_bytes=1000))
    assert "`download.max_unpacked_gb`" in message


def test_tar_bomb_is_refused_from_its_headers(tmp_path):
    archive = make_tar(tmp_path / "bomb.tar.xz",
                       [file_member(f"zeros{i}.bin", bytes(1 << 20)) for i in range(4)], "w:xz")
    assert_refused(archive, tmp_path, "by member 'zeros0.bin', a compression ratio",
                   limits=ArchiveLimits(ratio_floor=0))


def test_zip_member_larger_than_declared_is_cut_by_zipfile(tmp_path):
    """zipfile never returns more than a member declares, so declared sizes bound the
    output; a member that lies fails its CRC and the archive is refused as damaged."""
    archive = make_zip(tmp_path / "liar.zip", {"x.bin": b"x" * 5000})
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("x.bin")
    # shrink the declared size in the central directory entry (file size field)
    central = data.rindex(b"PK\x01\x02")
    data[central + 24:central + 28] = (100).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    with pytest.raises(InputError, match="liar.zip: member 'x.bin' is damaged"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and info.file_size == 5000


def test_damaged_archive_is_an_input_error_not_a_traceback(tmp_path):
    archive = make_tar(tmp_path / "cut.tar.gz", [file_member("a.bin", os.urandom(50_000))])
    archive.write_bytes(archive.read_bytes()[:20_000])
    with pytest.raises(InputError, match="cut.tar.gz: damaged or unreadable archive"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_a_compressed_tar_whose_checksum_fails_is_refused(tmp_path, mode):
    """A damaged stored (uncompressed) deflate block decodes to wrong bytes without a zlib
    error; only the stream's CRC, at its end, tells. tarfile stops after the last member,
    so the extraction reads to the end itself."""
    data = os.urandom(300_000)
    archive = tmp_path / "data.tar"
    options = {"compresslevel": 0} if mode == "w:gz" else {}
    with tarfile.open(archive, mode, **options) as tar:
        info = tarfile.TarInfo("data.bin")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    extract_archive(archive, tmp_path / "good")
    assert (tmp_path / "good" / "data.bin").read_bytes() == data
    if mode != "w:gz":
        return  # their blocks carry their own checks; the clean run above is what matters
    damaged = bytearray(archive.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # inside a stored block: the bytes change, nothing else
    archive.write_bytes(bytes(damaged))
    with pytest.raises(InputError, match="compressed archive is damaged .*CRC check failed"):
        extract_archive(archive, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_encrypted_zip_member_is_refused(tmp_path):
    archive = make_zip(tmp_path / "locked.zip", {"secret.txt": "x"})
    data = bytearray(archive.read_bytes())
    central = data.rindex(b"PK\x01\x02")
    data[central + 8] |= 0x1          # general purpose flag bit 0: encrypted
    archive.write_bytes(bytes(data))
    assert_refused(archive, tmp_path, "member 'secret.txt' is encrypted")


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
