"""The `http` source: files fetched by URL, each verified, then a labels table.

Every file is downloaded into a staging folder beside the dataset folder,
`resources/.downloads/{dataset}/`, not inside it: Snakemake empties a job's
output folder before the job runs, and an interrupted transfer must survive
that to resume. A plain file is then linked to `resources/{dataset}/<name>`
(a hard link: no second copy); an entry with `extract: true` is unpacked into
the dataset folder, as `unzip` would (`ISIC..._Input.zip` holds
`ISIC..._Input/...`), and its verified archive stays staged so that a rerun
unpacks it again without downloading it again.
`downloads.json` records where every file came from, its sha256 and what an
archive unpacked, so a later run skips an archive already unpacked from the
same verified file.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping, Sequence
from urllib.parse import urlsplit

import requests

from medrobust.data.archives import ArchiveLimits, extract_archive, is_archive
from medrobust.data.download import (
    Checksum,
    ChecksumMismatch,
    RetryPolicy,
    download_file,
    public_url,
)
from medrobust.data.assemble import (
    DEFAULT_SPLITS,
    LabelsTable,
    assign_splits,
    config_classes,
    config_kind,
    link_folder,
    source_section,
    write_samples,
)
from medrobust.data.manifest import begin_dataset
from medrobust.config import config_from_mapping
from medrobust.data.sources import register_source
from medrobust.errors import ConfigError, InputError
from medrobust.io.atomic import write_json
from medrobust.logs import get_logger

log = get_logger(__name__)

RECORD_NAME = "downloads.json"
# what an archive must not unpack over: the dataset's own files
RESERVED = frozenset({RECORD_NAME, "manifest.csv", "dataset.json", "data"})


def staging_dir(out_dir: Path) -> Path:
    """Where a dataset's downloads wait (and resume), outside the dataset folder."""
    return out_dir.parent / ".downloads" / out_dir.name


@dataclass(frozen=True)
class RemoteFile:
    url: str
    sha256: str | None = None
    md5: str | None = None
    name: str | None = None    # path in the dataset folder; default: the URL's last part
    extract: bool = False      # unpack the archive into the dataset folder

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], section: str) -> "RemoteFile":
        remote = config_from_mapping(cls, mapping, section)
        if not isinstance(remote.url, str) or urlsplit(remote.url).scheme not in ("http",
                                                                                "https"):
            raise ConfigError(f"{section}.url must be an http(s) URL, not {remote.url!r}")
        Checksum.from_entry(mapping, section)  # validates the digest now, not mid-download
        name = remote.file_name
        parts = PurePosixPath(name).parts
        if not parts or name.startswith("/") or "\\" in name or {".", ".."} & set(parts):
            raise ConfigError(f"{section}: cannot place {remote.url!r} at {name!r}; give a "
                              f"relative file name with `name`")
        if remote.extract and not is_archive(name):
            raise ConfigError(f"{section}: `extract: true` needs an archive name ending in "
                              f".zip, .tar, .tar.gz, .tgz, .tar.bz2 or .tar.xz, not {name!r}")
        return remote

    @classmethod
    def of(cls, url: str, checksum: Checksum | None, name: str | None = None,
           extract: bool = False) -> "RemoteFile":
        """A file a recipe knows, with the checksum `checksum_for` chose."""
        digest = {checksum.algorithm: checksum.hexdigest} if checksum else {}
        return cls(url=url, name=name, extract=extract, **digest)

    @property
    def checksum(self) -> Checksum | None:
        return Checksum.from_entry({"sha256": self.sha256, "md5": self.md5}, self.url)

    @property
    def file_name(self) -> str:
        return self.name or PurePosixPath(urlsplit(self.url).path).name


@dataclass(frozen=True)
class HttpSource:
    files: Sequence[Mapping[str, Any]]
    labels: Mapping[str, Any]
    splits: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_SPLITS))
    seed: int = 0
    download: Mapping[str, Any] = field(default_factory=dict)  # see RetryPolicy


@register_source("http", HttpSource)
def fetch_http(dataset_config: Mapping[str, Any], out_dir: Path) -> Path:
    options = config_from_mapping(HttpSource, source_section(dataset_config), "source (http)")
    files = remote_files(options.files, "source.files")
    for index, remote in enumerate(files):
        if remote.checksum is None:
            raise ConfigError(f"source.files[{index}] ({remote.url}): give its `sha256` or "
                              f"`md5`; downloads are verified")
    labels = LabelsTable.from_mapping(options.labels)
    classes, kind = config_classes(dataset_config), config_kind(dataset_config)
    out_dir = begin_dataset(out_dir)
    fetch_files(files, out_dir, RetryPolicy.from_mapping(options.download))
    samples = assign_splits(labels.read(out_dir, classes), options.splits, options.seed)
    return write_samples(out_dir, samples, classes, kind)


def remote_files(entries: Any, section: str) -> list[RemoteFile]:
    if not isinstance(entries, Sequence) or isinstance(entries, (str, bytes)) or not entries:
        raise ConfigError(f"{section} must list at least one {{url, sha256 | md5}} entry")
    files = [RemoteFile.from_mapping(entry, f"{section}[{index}]")
             for index, entry in enumerate(entries)]
    names = [remote.file_name for remote in files]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"{section}: several entries would land at {', '.join(duplicates)}; "
                          f"tell them apart with `name`")
    return files


@dataclass(frozen=True)
class Fetched:
    path: Path     # the file; for an archive, the dataset folder it was unpacked into
    sha256: str    # of the downloaded file (the archive itself, for one that was unpacked)


def fetch_files(files: Sequence[RemoteFile], out_dir: Path, policy: RetryPolicy, *,
                auth: tuple[str, str] | None = None,
                session: requests.Session | None = None) -> dict[str, Fetched]:
    """Download (and unpack) every file into `out_dir`; return file name -> what landed.

    A file without a checksum is fetched unverified: callers allow that only
    where the user opted in. Its sha256 lands in `downloads.json` so that it
    can be pinned in the config.
    """
    record_path = out_dir / RECORD_NAME
    record = _read_record(record_path)
    session = session or requests.Session()
    placed = {}
    for remote in files:
        name = remote.file_name
        provenance = {"url": public_url(remote.url),
                      "checksum": str(remote.checksum) if remote.checksum else None}
        done = record.get(name, {})
        if remote.extract and {k: done.get(k) for k in provenance} == provenance \
                and all((out_dir / entry).exists() for entry in done.get("unpacked", [])):
            log.info("%s: already unpacked from %s", name, provenance["url"])
            placed[name] = Fetched(out_dir, done["sha256"])
            continue
        got = download_file(remote.url, staging_dir(out_dir) / name, remote.checksum,
                            auth=auth, policy=policy, session=session)
        if remote.extract:
            provenance["unpacked"] = _unpack(got.path, out_dir, policy.archive_limits)
            placed[name] = Fetched(out_dir, got.sha256)
        else:
            placed[name] = Fetched(_place(got.path, out_dir / name), got.sha256)
        record[name] = {**provenance, "sha256": got.sha256}
        write_json(record_path, record)
    return placed


def _place(staged: Path, dest: Path) -> Path:
    """Put a verified download at `dest`: a hard link, or a copy across file systems."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove(dest)
    try:
        os.link(staged, dest)
    except OSError:
        shutil.copy2(staged, dest)
    return dest


def _unpack(archive: Path, out_dir: Path, limits: ArchiveLimits) -> list[str]:
    """Extract `archive` beside it, then move each top-level entry into `out_dir`.

    Extraction happens in the staging folder: an archive refused half-way
    (extract_archive refuses before writing anything anyway) leaves nothing in
    the dataset folder.
    """
    unpacked = extract_archive(archive, archive.with_name(archive.name + ".unpacked"),
                               limits=limits)
    try:
        entries = sorted(entry.name for entry in unpacked.iterdir())
        clash = sorted(set(entries) & RESERVED)
        if clash:
            raise InputError(f"{archive}: holds {', '.join(clash)} at its top level, which "
                             f"would overwrite the dataset's own files")
        for entry in entries:
            _remove(out_dir / entry)
            os.replace(unpacked / entry, out_dir / entry)
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)
    return entries


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _read_record(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except ValueError as error:
        raise InputError(f"{path}: unreadable download record ({error}); delete it") from error
    return record if isinstance(record, dict) else {}


def checksum_for(file_name: str, published: Checksum | None, pinned: Mapping[str, Any],
                 allow_unverified: bool, section: str) -> Checksum | None:
    """The checksum a recipe downloads `file_name` against.

    A checksum pinned in the config (`checksums: {file_name: {sha256: ...}}`)
    wins over the published one. Where nothing is published the user must pin
    one, or opt in to an unverified download with `allow_unverified: true`.
    """
    if file_name in pinned:
        entry = pinned[file_name]
        checksum = Checksum.from_entry(entry if isinstance(entry, Mapping) else {},
                                       f"{section}.checksums.{file_name}")
        if checksum is None:
            raise ConfigError(f"{section}.checksums.{file_name}: give `sha256: <hex>` or "
                              f"`md5: <hex>`")
        return checksum
    if published is not None:
        return published
    if allow_unverified:
        log.warning("%s: %s has no published checksum; downloading it unverified as "
                    "allowed (pin the sha256 that %s records)", section, file_name, RECORD_NAME)
        return None
    raise ConfigError(
        f"{section}: no checksum is published for {file_name}, and downloads are verified. "
        f"If you already have the file, run `sha256sum {file_name}` and set "
        f"`checksums: {{{file_name}: {{sha256: <hex>}}}}` in the source; or set "
        f"`allow_unverified: true` once, and pin the sha256 that {RECORD_NAME} then records.")


def obtain_data(root: str | None, files: Sequence[RemoteFile], out_dir: Path,
                download: Mapping[str, Any], auth: tuple[str, str] | None = None) -> Path:
    """The folder that holds a recipe's raw data.

    With `root` (a copy the user has) it is linked in as `data/`; otherwise
    `files` are downloaded into `out_dir`, which is returned.
    """
    if root is not None:
        return link_folder(root, out_dir / "data")
    fetch_files(files, out_dir, RetryPolicy.from_mapping(download), auth=auth)
    return out_dir


@contextmanager
def mirror_advice(setting: str, chosen: str | None, official: str,
                  pin: str = "checksums") -> Iterator[None]:
    """Say how to pin a mirror's own file when its checksum does not match.

    Wraps a recipe's downloads from `chosen`, the URL the user set with
    `setting` in place of `official`. A ChecksumMismatch there gains the
    sha256 and md5 of the file that arrived and where to put one: `pin` is
    "checksums" (`checksums: {<file>: {sha256: ...}}`) or "source" (`sha256:`
    beside the URL, as medmnist takes it).
    """
    try:
        yield
    except ChecksumMismatch as error:
        if not chosen or chosen.rstrip("/") == official.rstrip("/") or not error.digests:
            raise
        sha256, md5 = error.digests.get("sha256"), error.digests.get("md5")
        name = error.name or "the file"
        if pin == "source":
            how = f"`sha256: {sha256}` (or `md5: {md5}`) beside `{setting}`"
        else:
            how = f"`checksums: {{{name}: {{sha256: {sha256}}}}}` (or `md5: {md5}`)"
        raise ChecksumMismatch(
            f"{error} {name} came from `{setting}: {public_url(chosen)}`, a mirror you set in "
            f"place of the official {public_url(official)}. If the mirror serves a different "
            f"copy on purpose and you trust it, pin that copy's own checksum in the source: "
            f"{how}.", error.status, url=error.url, name=error.name,
            digests=error.digests) from None


def warn_if_splits_differ(what: str, counts: Mapping[str, int], official: Mapping[str, int],
                          reference: str) -> bool:
    """Warn (and return True) when the samples per split differ from the official dataset's.

    `what` names the data (e.g. "pneumoniamnist (28 px)"), `reference` where
    the official numbers come from.
    """
    got = {split: int(counts.get(split, 0)) for split in official}
    if got == {split: int(count) for split, count in official.items()}:
        return False

    def listed(numbers: Mapping[str, int]) -> str:
        return " / ".join(f"{split} {count:,}" for split, count in numbers.items())

    log.warning("%s: the data has %s samples, but the official dataset has %s (%s); this is "
                "not the official copy, and results on it are not comparable with published "
                "ones", what, listed(got), listed(official), reference)
    return True
