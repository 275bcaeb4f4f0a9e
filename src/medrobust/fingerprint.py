"""Fingerprints of the package's source code, for Snakemake's rerun triggers.

Each rule carries `params: code=code_fingerprint(...)` over the subpackages
its job runs (e.g. `attacks`), so that editing them reruns that stage and,
through its outputs, what follows it; Snakemake reruns a job whose params
changed. Only source files count (`SOURCE_SUFFIXES`: the modules and the
report's templates, not caches or data), read as bytes: cheap enough to
compute on every parse (under 20 ms for all rules together).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

PACKAGE = "medrobust"
SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the folder that holds medrobust/
# modules, and the page templates and style the report renders with
SOURCE_SUFFIXES = (".py", ".j2", ".css")


def code_fingerprint(*parts: str, root: str | os.PathLike = SOURCE_ROOT) -> str:
    """sha256 (hex, 16 digits) over the source files of `medrobust.<part>` for each part.

    A part is a subpackage (`"attacks"`: every module under it) or a module
    (`"config"`: config.py). Paths relative to `root` enter the hash, so a
    renamed or added module changes it too. A part that does not exist is an
    error rather than a constant fingerprint that would never trigger a rerun.
    """
    if not parts:
        raise ValueError("code_fingerprint needs at least one subpackage or module")
    return _fingerprint(tuple(parts), str(Path(root).resolve()))


def package_fingerprint(root: str | os.PathLike = SOURCE_ROOT) -> str:
    """The fingerprint of every module of the package (what the registries may import)."""
    return _fingerprint(("",), str(Path(root).resolve()))


def _fingerprint(parts: tuple[str, ...], root: str) -> str:
    digest = hashlib.sha256()
    for path in _source_files(parts, Path(root)):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _source_files(parts: tuple[str, ...], root: Path) -> list[Path]:
    files = set()
    for part in parts:
        base = root / PACKAGE / Path(*part.split(".")) if part else root / PACKAGE
        if base.is_dir():
            files.update(path for path in base.rglob("*")
                         if path.suffix in SOURCE_SUFFIXES and "__pycache__" not in path.parts)
        elif base.with_suffix(".py").is_file():
            files.add(base.with_suffix(".py"))
        else:
            raise ValueError(f"code_fingerprint: no {PACKAGE}.{part} under {root}")
    return sorted(files)
