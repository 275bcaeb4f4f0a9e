"""Safe extraction of zip and tar archives (plain, gzip, bzip2, xz).

Every member is checked before anything is written: an absolute path, a `..`
that climbs out, a link whose target lies outside the target folder, or a
device file refuses the whole archive. Extraction goes to a temporary sibling
that is renamed into place when complete (and, if asked, verified).
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path
from typing import Callable

from medrobust.errors import InputError
from medrobust.io.atomic import atomic_path
from medrobust.logs import get_logger

log = get_logger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_DRIVE = re.compile(r"^[A-Za-z]:")


class UnsafeArchiveError(InputError):
    """An archive member would land outside the folder it is extracted to."""


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def archive_stem(name: str) -> str:
    """`name` without its archive suffix: `images.tar.gz` -> `images`."""
    lower = name.lower()
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike,
                    verify: Callable[[Path], None] | None = None) -> Path:
    """Extract `archive` into the folder `dest`, which appears only when complete.

    `verify(folder)` may inspect the extracted files before they are moved into
    place and raise to refuse them.
    """
    archive, dest = Path(archive), Path(dest)
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, tmp)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, tmp)
        else:
            raise InputError(f"{archive}: not a zip or tar archive")
        if verify is not None:
            verify(tmp)
    log.info("%s: extracted to %s", archive, dest)
    return dest


def _member_parts(archive: Path, name: str) -> tuple[str, ...]:
    """The path components of a member name; refuse absolute and climbing names."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or _DRIVE.match(posix):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; "
                                 f"refusing the archive")
    parts = tuple(part for part in posix.split("/") if part not in ("", "."))
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} climbs out of the target "
                                 f"folder with '..'; refusing the archive")
    return parts


def _check_link(archive: Path, name: str, target: str, relative_to_member: bool) -> None:
    """Refuse a link whose target, read from inside the archive, leaves it."""
    target = target.replace("\\", "/")
    if target.startswith("/") or _DRIVE.match(target):
        raise UnsafeArchiveError(f"{archive}: link {name!r} points to the absolute path "
                                 f"{target!r}; refusing the archive")
    base = posixpath.dirname("/".join(_member_parts(archive, name))) if relative_to_member else ""
    resolved = posixpath.normpath(posixpath.join(base, target))
    if resolved == ".." or resolved.startswith("../"):
        raise UnsafeArchiveError(f"{archive}: link {name!r} points to {target!r}, outside "
                                 f"the target folder; refusing the archive")


def _extract_zip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        links = {}
        for info in members:
            _member_parts(archive, info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                links[info.filename] = zf.read(info).decode()
                _check_link(archive, info.filename, links[info.filename], True)
        for info in members:
            target = dest.joinpath(*_member_parts(archive, info.filename))
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if info.filename in links:
                os.symlink(links[info.filename], target)
            else:
                with zf.open(info) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 20)


def _extract_tar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for member in members:
            _member_parts(archive, member.name)
            if member.issym():
                _check_link(archive, member.name, member.linkname, True)
            elif member.islnk():
                _check_link(archive, member.name, member.linkname, False)
            elif not (member.isfile() or member.isdir()):
                raise UnsafeArchiveError(f"{archive}: member {member.name!r} is a device or "
                                         f"pipe; refusing the archive")
        # the standard library's own guard as a second line of defence
        tar.extractall(dest, members=members, filter="data")
