"""File digests, streamed so that large slides and archives never sit in memory."""

from __future__ import annotations

import hashlib
import os

from medrobust.errors import InputError

_BLOCK = 1 << 20


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """The file's hex digest; InputError naming it where the file itself cannot be read (no
    permission, a folder, gone), so that `on_bad_input: skip` can leave its sample out. The
    machine's problems (too many open files, an I/O error) are raised as they are."""
    digest = hashlib.new(algorithm)
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(_BLOCK), b""):
                digest.update(block)
    except (PermissionError, IsADirectoryError, NotADirectoryError,
            FileNotFoundError) as error:
        raise InputError(f"{path}: cannot read file ({error.strerror or error})") from error
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")
