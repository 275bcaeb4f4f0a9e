"""Safe extraction of zip and tar archives (plain, gzip, bzip2, xz).

Extraction plans the whole archive before it writes a byte. Planning walks the
members in order over a model of the folder they make, so a member is judged
by where it would really land, links made by earlier members included (a link
to `..` followed by a file written through it is caught, however long the
chain). It refuses the whole archive, with a message that names the archive
and the member, for:

- an absolute name, or a `..` in a name;
- a member that would land outside the target folder through earlier links,
  or a link whose target lies outside it (checked when made, and again on the
  finished tree, since a later member may replace a link it goes through);
- any link in a zip (no supported dataset ships one), unless the caller
  allows them;
- device files, pipes and sockets;
- more unpacked bytes than `ArchiveLimits.max_bytes`, or a ratio of unpacked
  to archive size above `ArchiveLimits.max_ratio` (a zip bomb). Sizes come from
  the zip's central directory (zipfile never returns more than a member
  declares) or from each tar header as it is read, so a bomb is refused before
  it is inflated.

Files are then written at the paths the plan resolved, which hold no link, and
a file never follows a link at its own name (the link is replaced). Everything
goes to a temporary sibling renamed into place when complete (and, if asked,
verified), so nothing of a refused archive is left anywhere.
"""

from __future__ import annotations

import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator, Sequence

from medrobust.errors import InputError
from medrobust.io.atomic import atomic_path
from medrobust.logs import get_logger

log = get_logger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
GB = 10 ** 9
MAX_LINK_HOPS = 40        # as Linux's limit on symbolic links in one path lookup
_LINK_TARGET_LIMIT = 4096  # bytes read from a zip link member: PATH_MAX
_BLOCK = 1 << 20
# errors the decompressors and archive readers raise on damaged input
_READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError,
                NotImplementedError)


class UnsafeArchiveError(InputError):
    """An archive member would land outside the folder it is extracted to, or the
    archive is not the kind of data it claims to be (device files, a zip bomb)."""


@dataclass(frozen=True)
class ArchiveLimits:
    """How much one archive may unpack to.

    The defaults fit every supported dataset: the largest archive a recipe
    unpacks is a few GB (ISIC 2018 Task 3 images, the RSNA Kaggle zip), and all
    of CBIS-DDSM is 163.6 GB. Real image data compresses far less than 100:1
    (JPEG, PNG, DICOM, TIFF about 1-3:1, CSV label tables about 10-15:1); zeros
    deflate at about 1000:1. The ratio is not checked for archives that unpack
    to less than `ratio_floor` bytes, which cannot fill a disk.
    """

    max_bytes: int = 200 * GB
    max_ratio: float = 100.0
    ratio_floor: int = 64 << 20


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
                    verify: Callable[[Path], None] | None = None, *,
                    limits: ArchiveLimits = ArchiveLimits(),
                    zip_links: bool = False) -> Path:
    """Extract `archive` into the folder `dest`, which appears only when complete.

    `verify(folder)` may inspect the extracted files before they are moved into
    place and raise to refuse them. `zip_links=True` accepts symbolic links in
    a zip (those that stay inside `dest`); tar links are always accepted on
    that condition.
    """
    archive, dest = Path(archive), Path(dest)
    try:
        if zipfile.is_zipfile(archive):
            opened, reader = zipfile.ZipFile(archive), _ZipReader
        elif tarfile.is_tarfile(archive):
            opened, reader = tarfile.open(archive, "r:*"), _TarReader
        else:
            raise InputError(f"{archive}: not a zip or tar archive")
    except _READ_ERRORS + (OSError,) as error:
        raise InputError(f"{archive}: cannot open the archive ({_words(error)})") from None
    with opened:
        source = reader(archive, opened, zip_links)
        plan = _plan(source, limits)        # refuses before anything is written
        with atomic_path(dest) as tmp:
            tmp.mkdir()
            _write(source, plan, tmp)
            source.check_stream()
            if verify is not None:
                verify(tmp)
    log.info("%s: extracted to %s", archive, dest)
    return dest


# --- reading members: zip and tar behind one interface ----------------------------------

@dataclass(frozen=True)
class _Member:
    name: str
    kind: str             # file | dir | symlink | hardlink
    size: int             # bytes a file unpacks to (0 for the rest)
    link: str = ""        # symlink target / hard link source, as stored
    handle: object = None  # the ZipInfo or TarInfo


class _ZipReader:
    def __init__(self, archive: Path, zf: zipfile.ZipFile, allow_links: bool):
        self.archive, self.zf, self.allow_links = archive, zf, allow_links

    def check_stream(self) -> None:
        """Nothing to do: zipfile checks each member's CRC as it is read."""

    def members(self) -> Iterator[_Member]:
        for info in self.zf.infolist():
            name = info.filename
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            if info.flag_bits & 0x1:
                raise UnsafeArchiveError(f"{self.archive}: member {name!r} is encrypted, which "
                                         f"medrobust cannot unpack; refusing the archive")
            if kind == stat.S_IFLNK:
                target = self._link_target(info)
                if not self.allow_links:
                    raise UnsafeArchiveError(
                        f"{self.archive}: member {name!r} is a symbolic link (to {target!r}); "
                        f"links in zip archives are refused, as no supported dataset needs "
                        f"them; refusing the archive")
                yield _Member(name, "symlink", 0, target, info)
            elif kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise _special(self.archive, name, kind)
            elif info.is_dir():
                yield _Member(name, "dir", 0, handle=info)
            else:
                yield _Member(name, "file", info.file_size, handle=info)

    def _link_target(self, info: zipfile.ZipInfo) -> str:
        with self.zf.open(info) as handle:
            target = handle.read(_LINK_TARGET_LIMIT + 1)
        if len(target) > _LINK_TARGET_LIMIT:
            raise UnsafeArchiveError(f"{self.archive}: link {info.filename!r} has a target "
                                     f"longer than {_LINK_TARGET_LIMIT} bytes; refusing the "
                                     f"archive")
        return target.decode("utf-8", "surrogateescape")

    def open(self, member: _Member) -> IO[bytes]:
        return self.zf.open(member.handle)


class _TarReader:
    def __init__(self, archive: Path, tar: tarfile.TarFile, allow_links: bool):
        self.archive, self.tar = archive, tar

    def members(self) -> Iterator[_Member]:
        # one header at a time: a bomb is refused before the rest is inflated
        for info in self.tar:
            if info.isreg():
                yield _Member(info.name, "file", info.size, handle=info)
            elif info.isdir():
                yield _Member(info.name, "dir", 0, handle=info)
            elif info.issym():
                yield _Member(info.name, "symlink", 0, info.linkname, info)
            elif info.islnk():
                yield _Member(info.name, "hardlink", 0, info.linkname, info)
            else:
                kind = {tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK,
                        tarfile.FIFOTYPE: stat.S_IFIFO}.get(info.type, -1)
                raise _special(self.archive, info.name, kind)

    def check_stream(self) -> None:
        """Read the compressed stream to its end, where gzip, bz2 and xz check their CRC of
        the whole: tarfile stops after the last member, and a damaged stored (uncompressed)
        deflate block yields wrong bytes without any other error."""
        try:
            while self.tar.fileobj.read(_BLOCK):
                pass
        except _READ_ERRORS + (OSError,) as error:
            raise InputError(f"{self.archive}: the compressed archive is damaged "
                             f"({_words(error)}); nothing was kept") from None

    def open(self, member: _Member) -> IO[bytes]:
        handle = self.tar.extractfile(member.handle)
        if handle is None:
            raise InputError(f"{self.archive}: member {member.name!r} has no data")
        return handle


def _special(archive: Path, name: str, kind: int) -> UnsafeArchiveError:
    what = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
            stat.S_IFIFO: "a named pipe", stat.S_IFSOCK: "a socket"}.get(
                kind, "of an unknown type")
    return UnsafeArchiveError(f"{archive}: member {name!r} is {what}, not a file, folder or "
                              f"link; device files and pipes are refused; refusing the archive")


# --- planning: where each member would really land --------------------------------------

@dataclass(frozen=True)
class _Step:
    member: _Member
    path: tuple[str, ...]            # where it lands, relative to the target folder, no link in it
    source: tuple[str, ...] = ()     # a hard link: the file it copies


def _split(path: str) -> list[str]:
    return [part for part in path.replace("\\", "/").split("/") if part not in ("", ".")]


def _is_absolute(path: str) -> bool:
    posix = path.replace("\\", "/")
    return posix.startswith("/") or (len(posix) > 1 and posix[1] == ":" and posix[0].isalpha())


class _Outside(Exception):
    """A path leaves the target folder; `via` lists the links it went through."""

    def __init__(self, via: list[str]):
        super().__init__()
        self.via = via

    def chain(self) -> str:
        if not self.via:
            return ""
        return (" through the link(s) " + ", then ".join(repr(link) for link in self.via)
                + " made earlier in the archive")


class _Tree:
    """The folder as the members made so far leave it: path -> file | dir | link."""

    def __init__(self, archive: Path):
        self.archive = archive
        self.kinds: dict[tuple[str, ...], str] = {(): "dir"}
        self.links: dict[tuple[str, ...], str] = {}

    def resolve(self, parts: Sequence[str], name: str) -> tuple[str, ...] | None:
        """The real location of `parts` after following the links made so far.

        Raises _Outside if it leaves the target folder. None: the path goes
        through a file (a broken link target, which is harmless).
        """
        path: list[str] = []
        todo = list(parts)
        via: list[str] = []
        while todo:
            part = todo.pop(0)
            if part == "..":
                if not path:
                    raise _Outside(via)
                path.pop()
                continue
            here = (*path, part)
            kind = self.kinds.get(here)
            if kind == "link":
                target = self.links[here]
                via.append(f"{'/'.join(here)} -> {target}")
                if len(via) > MAX_LINK_HOPS:
                    raise UnsafeArchiveError(f"{self.archive}: member {name!r} goes through more "
                                             f"than {MAX_LINK_HOPS} links (a loop); refusing "
                                             f"the archive")
                if _is_absolute(target):
                    raise _Outside(via)
                todo = _split(target) + todo
                continue
            if kind == "file" and todo:
                return None
            path.append(part)
        return tuple(path)

    def place(self, path: tuple[str, ...], kind: str, name: str) -> None:
        """Record `path` as made, with the folders above it."""
        for depth in range(1, len(path)):
            parent = path[:depth]
            existing = self.kinds.setdefault(parent, "dir")
            if existing != "dir":  # cannot happen: resolve() followed links, stopped at files
                raise self._conflict(name, parent, existing)
        existing = self.kinds.get(path)
        if existing == "dir" and kind != "dir":
            raise UnsafeArchiveError(f"{self.archive}: member {name!r} would replace the folder "
                                     f"{'/'.join(path)!r} made earlier in the archive; refusing "
                                     f"the archive")
        if existing in ("file", "link") and kind == "dir":
            raise self._conflict(name, path, existing)
        self.kinds[path] = kind
        self.links.pop(path, None)

    def _conflict(self, name: str, path: tuple[str, ...], existing: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(f"{self.archive}: member {name!r} needs a folder at "
                                  f"{'/'.join(path)!r}, which an earlier member made a "
                                  f"{existing}; refusing the archive")


def _member_parts(archive: Path, name: str) -> list[str]:
    """The path components of a member name; refuse absolute, climbing and empty names."""
    if _is_absolute(name):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; "
                                 f"refusing the archive")
    parts = _split(name)
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} climbs out of the target "
                                 f"folder with '..'; refusing the archive")
    if "\x00" in name:
        raise UnsafeArchiveError(f"{archive}: member {name!r} has a NUL byte in its name; "
                                 f"refusing the archive")
    return parts


class _Budget:
    """Unpacked bytes so far, against the size and ratio limits."""

    def __init__(self, archive: Path, limits: ArchiveLimits):
        self.archive, self.limits = archive, limits
        self.packed = max(archive.stat().st_size, 1)
        self.total = 0

    def add(self, size: int, name: str) -> None:
        self.total += size
        limits, total = self.limits, self.total
        if total > limits.max_bytes:
            raise UnsafeArchiveError(
                f"{self.archive}: would unpack to more than {_size(limits.max_bytes)} (the limit, "
                f"`download.max_unpacked_gb` in the source) by member {name!r}, "
                f"{_size(total)} so far; refusing the archive. If you trust it, raise the limit.")
        ratio = total / self.packed
        if total > limits.ratio_floor and ratio > limits.max_ratio:
            raise UnsafeArchiveError(
                f"{self.archive}: would unpack {_size(self.packed)} to {_size(total)} or more by "
                f"member {name!r}, a compression ratio of {ratio:.0f}:1, above the limit of "
                f"{limits.max_ratio:g}:1 (`download.max_compression_ratio` in the source); "
                f"this is what a zip bomb looks like, so the archive is refused. If you trust "
                f"it, raise the limit.")


def _plan(source: _ZipReader | _TarReader, limits: ArchiveLimits) -> list[_Step]:
    archive = source.archive
    tree, budget, steps = _Tree(archive), _Budget(archive, limits), []
    sizes: dict[tuple[str, ...], int] = {}
    try:
        for member in source.members():
            steps.append(_plan_member(archive, member, tree, budget, sizes))
    except (*_READ_ERRORS, OSError) as error:   # bz2 reports a damaged stream as OSError
        raise InputError(f"{archive}: damaged or unreadable archive ({_words(error)})") from None
    # a later member may have replaced a link that an earlier link goes through
    for path, target in tree.links.items():
        name = "/".join(path)
        try:
            tree.resolve([*path[:-1], *_split(target)], name)
        except _Outside as outside:
            raise UnsafeArchiveError(
                f"{archive}: link {name!r} points to {target!r}, which leads outside the "
                f"target folder once the whole archive is unpacked{outside.chain()}; "
                f"refusing the archive") from None
    return [step for step in steps if step is not None]


def _plan_member(archive: Path, member: _Member, tree: _Tree, budget: _Budget,
                 sizes: dict[tuple[str, ...], int]) -> _Step | None:
    name = member.name
    parts = _member_parts(archive, name)
    if not parts:
        if member.kind == "dir":
            return None  # "./": the target folder itself
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an empty name; refusing "
                                 f"the archive")
    # the folders above it, following earlier links; its own name is not followed (a link
    # there is replaced), except by a folder, which goes where that link points
    try:
        parent = tree.resolve(parts[:-1], name)
        path = None if parent is None else (*parent, parts[-1])
        if path is not None and member.kind == "dir" and tree.kinds.get(path) == "link":
            path = tree.resolve(path, name)
    except _Outside as outside:
        raise UnsafeArchiveError(f"{archive}: member {name!r} would be written outside the "
                                 f"target folder{outside.chain()}; refusing the archive") from None
    if path is None or (member.kind == "dir" and tree.kinds.get(path) == "file"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} needs a folder where an earlier "
                                 f"member made a file; refusing the archive")
    landing = ("" if list(path) == parts else
               f" (through earlier links it lands at {'/'.join(path)!r})")
    source: tuple[str, ...] = ()
    if member.kind in ("symlink", "hardlink"):
        kind = "hard link" if member.kind == "hardlink" else "link"
        if _is_absolute(member.link):
            raise UnsafeArchiveError(f"{archive}: {kind} {name!r} points to the absolute path "
                                     f"{member.link!r}; refusing the archive")
        # a symbolic link's target is read from its folder, a hard link's from the top
        base = list(path[:-1]) if member.kind == "symlink" else []
        try:
            resolved = tree.resolve([*base, *_split(member.link)], name)
        except _Outside as outside:
            raise UnsafeArchiveError(f"{archive}: {kind} {name!r}{landing} points to "
                                     f"{member.link!r}, outside the target folder"
                                     f"{outside.chain()}; refusing the archive") from None
        if member.kind == "hardlink":
            if resolved is None or tree.kinds.get(resolved) != "file":
                raise UnsafeArchiveError(f"{archive}: hard link {name!r} points to "
                                         f"{member.link!r}, which is not a file earlier in the "
                                         f"archive; refusing the archive")
            source = resolved
    size = sizes[source] if member.kind == "hardlink" else member.size
    budget.add(size, name)
    tree.place(path, {"symlink": "link", "hardlink": "file"}.get(member.kind, member.kind),
               name)
    if member.kind == "symlink":
        tree.links[path] = member.link
    sizes[path] = size
    return _Step(member, path, source)


# --- writing the plan --------------------------------------------------------------------

def _write(source: _ZipReader | _TarReader, steps: list[_Step], root: Path) -> None:
    archive = source.archive
    real_root = os.path.realpath(root)
    for step in steps:
        member = step.member
        target = root.joinpath(*step.path)
        try:
            if member.kind == "dir":
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            # a second line of defence: the plan put it inside, and so must the file system
            if os.path.commonpath([os.path.realpath(target.parent), real_root]) != real_root:
                raise UnsafeArchiveError(f"{archive}: member {member.name!r} would land "
                                         f"outside the target folder; refusing the archive")
            if target.is_symlink() or target.exists():
                target.unlink()   # a file or link made earlier: replaced, never followed
            if member.kind == "symlink":
                os.symlink(member.link, target)
            elif member.kind == "hardlink":
                shutil.copyfile(root.joinpath(*step.source), target, follow_symlinks=False)
            else:
                _copy_member(source, member, target)
        except _READ_ERRORS as error:
            raise InputError(f"{archive}: member {member.name!r} is damaged "
                             f"({_words(error)})") from None
        except OSError as error:
            raise InputError(f"{archive}: cannot write member {member.name!r} to {target}: "
                             f"{error.strerror or error}") from None


def _copy_member(source: _ZipReader | _TarReader, member: _Member, target: Path) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with source.open(member) as reader, open(os.open(target, flags, 0o644), "wb") as sink:
        written = 0
        while True:
            try:
                block = reader.read(_BLOCK)
            except OSError as error:   # bz2: a damaged stream
                raise InputError(f"{source.archive}: member {member.name!r} is damaged "
                                 f"({_words(error)})") from None
            if not block:
                break
            written += len(block)
            if written > member.size:  # never more than planned, whatever the archive says
                raise UnsafeArchiveError(f"{source.archive}: member {member.name!r} holds more "
                                         f"than the {member.size} bytes it declares; refusing "
                                         f"the archive")
            sink.write(block)


def _size(count: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.3g} {unit}"
        count /= 1000
    return f"{count:.3g} TB"


def _words(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
