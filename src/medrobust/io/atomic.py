"""Write outputs so that a crash never leaves one that looks complete.

Everything is written under a temporary sibling name and renamed into place
only when complete; rename is atomic within one file system.

Temporary siblings are hidden folders named `.{output name}.XXXXXXXX.partial`
(preprocessing's scratch space: `.scratch`). A job that is killed (SIGKILL,
out of memory, a cluster's time limit) cannot remove its own, so every write
first removes the stale siblings of the output it is about to write. That
rests on one assumption, which Snakemake guarantees: it never runs two jobs
for the same output at once (and locks the working directory against a
second Snakemake). Siblings are still checked before removal: only folders
matching the output's own name exactly are considered (a job writing
`clean.csv` never touches the siblings of `clean.json` in the same folder),
and a folder whose writer is alive keeps it, since each writer holds an
exclusive lock (`flock`) on a file inside its folder for as long as it writes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from medrobust.logs import get_logger

log = get_logger(__name__)

PARTIAL = ".partial"
SCRATCH = ".scratch"
LOCK_NAME = ".in-use.lock"
# A folder without a lock file is either from before writers took locks or
# from a writer killed in the microseconds between creating it and locking;
# one this young might be a live writer in that gap, so it is left alone.
UNLOCKED_GRACE_S = 600.0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _sibling_pattern(final: Path, suffix: str) -> re.Pattern:
    # tempfile.mkdtemp's random part: 8 characters of [a-z0-9_]
    return re.compile(rf"\.{re.escape(final.name)}\.[a-z0-9_]{{8}}{re.escape(suffix)}")


def _in_use(folder: Path) -> bool:
    """Whether a live process still writes in `folder` (holds its lock)."""
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR)
    except FileNotFoundError:
        try:
            age = time.time() - folder.stat().st_mtime
        except FileNotFoundError:
            return True  # gone already: nothing to do
        return age < UNLOCKED_GRACE_S
    except OSError:
        return True  # cannot tell: keep it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        # no locks on this file system: rely on Snakemake's one job per output
        return False
    finally:
        os.close(fd)  # releases the lock if it was taken
    return False


def remove_stale_siblings(final: str | os.PathLike, suffix: str = PARTIAL) -> list[Path]:
    """Remove the temporary siblings (`suffix`) that killed writers of `final` left.

    Only folders named like `final`'s own temporary siblings and not locked by
    a live writer are removed; returns them.
    """
    final = Path(final)
    pattern = _sibling_pattern(final, suffix)
    removed = []
    try:
        entries = list(os.scandir(final.parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not pattern.fullmatch(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        folder = Path(entry.path)
        if _in_use(folder):
            log.debug("%s: in use by another writer; left alone", folder)
            continue
        shutil.rmtree(folder, ignore_errors=True)
        log.info("removed %s, left by an earlier run that was interrupted", folder)
        removed.append(folder)
    return removed


def _lock(folder: Path):
    """Hold an exclusive lock on a file in `folder`; the handle keeps it (or None)."""
    handle = open(folder / LOCK_NAME, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            handle.close()
            raise
        # no locks on this file system: the folder is protected by the
        # one-job-per-output assumption alone
    return handle


@contextlib.contextmanager
def temporary_sibling(final: str | os.PathLike, suffix: str = PARTIAL) -> Iterator[Path]:
    """A fresh hidden folder beside `final`, `.{name}.XXXXXXXX{suffix}`, removed on exit.

    Stale siblings of the same output from interrupted runs are removed first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(final, suffix)
    folder = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent))
    try:
        lock = _lock(folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        lock.close()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; move it to `final` on success.

    Works for files and directories (Zarr stores). On error the temporary
    path is removed and `final` is left untouched; a temporary left by a
    killed run of the same output is removed by the next write.
    """
    final = Path(final)
    with temporary_sibling(final, PARTIAL) as folder:
        tmp = folder / final.name
        yield tmp
        if final.exists() or final.is_symlink():
            _remove(final)
        os.replace(tmp, final)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe)
    os.umask(mask)
    return mask


def set_default_mode(path: str | os.PathLike) -> None:
    """Give a file the permissions a plain `open()` would have: 0o666 less the umask.

    For files that a library creates owner-only (safetensors writes 0600),
    which a team on a shared cluster could not read.
    """
    os.chmod(path, 0o666 & ~current_umask())


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=json_default) + "\n")


def json_default(value):
    """`json.dumps`'s `default`: numpy and torch arrays and scalars, paths."""
    if hasattr(value, "tolist"):  # 0-d arrays and numpy scalars give Python scalars
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
