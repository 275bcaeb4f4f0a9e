"""Slides per job: a slide dataset's slides in groups that one tiling job and one
feature job each handle (`datasets.<name>.slides_per_job`, docs/config.md).

A job costs seconds of start-up (Python, torch), more than a small slide's work,
and on a cluster every job is a submission; a group of k slides pays it once.
Groups take the manifest's rows in order, k at a time, and are numbered
(`group-000000`, ...), so appending slides to a cohort adds groups (and reruns
the last one if it was short) without renaming the others.

A group job writes each slide's outputs (tile store and QC picture, or feature
store) into its own folder `groups/{group}/` beside where a slide's own job
would write them, and the dataset's index (`medrobust.slide_index`) lists them
there; the jobs that read a dataset's slides read its index. So a grouped
cohort has no job per slide at all: 30,000 slides in groups of 100 are 600
tiling and 600 feature jobs.

A group job that fails (killed, out of time, a bad slide under "fail") loses its
output folder: Snakemake deletes a failed job's outputs, and a rerun's before it
starts. So a group job writes into `groups/{group}.unfinished/` instead
(`GroupWork`), notes each slide there once both its outputs are written, and
renames the folder to `groups/{group}` when every slide is done. A rerun with
the same settings finds the finished slides and does only the rest.

Only the standard library: the workflow imports this at every parse, and the
input functions call `plan_slide_groups` once per job, so the grouping is
computed once per version of the manifest (as `io.manifest_cache` reads it).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from medrobust.errors import ConfigError, InputError
from medrobust.io.manifest_cache import manifest_rows

GROUPS_FOLDER = "groups"  # results/tiles/{dataset}/groups/{group}, and the same under results/features
GROUP_PATTERN = r"group-\d{6}"
UNFINISHED_SUFFIX = ".unfinished"  # results/tiles/{dataset}/groups/{group}.unfinished


@dataclass(frozen=True)
class SlideGroups:
    members: Mapping[str, tuple[str, ...]]  # group name -> its slide ids, in manifest order
    group_of: Mapping[str, str]             # slide id -> its group's name


def group_slides(slide_ids: list[str], slides_per_job: int) -> SlideGroups:
    """The slides `slides_per_job` at a time, in the given order."""
    if isinstance(slides_per_job, bool) or not isinstance(slides_per_job, int) \
            or slides_per_job < 1:
        raise ConfigError(f"slides_per_job must be a positive integer, not {slides_per_job!r}")
    members = {f"group-{start // slides_per_job:06d}":
               tuple(slide_ids[start:start + slides_per_job])
               for start in range(0, len(slide_ids), slides_per_job)}
    return SlideGroups(members, {slide: group for group, slides in members.items()
                                 for slide in slides})


def plan_slide_groups(manifest: str | os.PathLike, slides_per_job: int) -> SlideGroups:
    """The groups of a downloaded slide dataset's manifest, computed once per version of it."""
    stat = os.stat(manifest)
    return _plan(os.fspath(manifest), stat.st_mtime_ns, stat.st_size, slides_per_job)


@functools.lru_cache(maxsize=8)
def _plan(manifest: str, mtime_ns: int, size: int, slides_per_job: int) -> SlideGroups:
    return group_slides(list(manifest_rows(manifest)), slides_per_job)


def unused_group_folders(stage_dir: str | os.PathLike, listed: list[str]) -> list[Path]:
    """The folders under `stage_dir`/groups that hold none of the `listed` stores: groups a
    failed job left unfinished and never reran, and the groups of an earlier grouping."""
    groups_dir = Path(stage_dir) / GROUPS_FOLDER
    if not groups_dir.is_dir():
        return []
    in_use = {Path(path).parent.name for path in listed if Path(path).parent.parent == groups_dir}
    return sorted(path for path in groups_dir.iterdir() if path.name not in in_use)


class GroupWork:
    """Where a group job writes its slides' outputs, kept across a failed run.

    `job_key`: what decides every slide's outputs besides the slide itself (the job's
    settings and code fingerprint, JSON-able); a different key starts afresh. Per slide,
    a key says what decided its outputs (its manifest row, or its input store's metadata
    and write time): `kept` is true only for a slide noted with an equal key.
    """

    def __init__(self, group_dir: str | os.PathLike, job_key: Any):
        self.group_dir = Path(group_dir)
        self.folder = self.group_dir.with_name(self.group_dir.name + UNFINISHED_SUFFIX)
        self._ledger = self.folder / "finished.json"
        self._job_key = _as_json(job_key)
        state = None
        if self._ledger.is_file():
            try:
                state = json.loads(self._ledger.read_text())
            except ValueError:
                state = None
        if not isinstance(state, dict) or state.get("job") != self._job_key:
            shutil.rmtree(self.folder, ignore_errors=True)  # another run's, or unreadable
            state = {"job": self._job_key, "slides": {}}
        self._finished: dict[str, Any] = state["slides"]
        self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def finished(self) -> int:
        return len(self._finished)

    def kept(self, slide_id: str, *slide_keys: Any, outputs: Iterable[str]) -> bool:
        """Whether a failed run finished the slide with one of `slide_keys` and its `outputs`
        (file names) are still there."""
        return (slide_id in self._finished and self._finished[slide_id] in map(_as_json, slide_keys)
                and all((self.folder / name).exists() for name in outputs))

    def mark_done(self, slide_id: str, slide_key: Any) -> None:
        """Note a slide whose outputs are all written (the ledger is replaced atomically)."""
        self._finished[slide_id] = _as_json(slide_key)
        tmp = self._ledger.with_suffix(".tmp")
        tmp.write_text(json.dumps({"job": self._job_key, "slides": self._finished}))
        os.replace(tmp, self._ledger)

    def complete(self, outputs: set[str]) -> None:
        """Every slide done: the folder, with only `outputs` (file names) in it, becomes the
        group's output folder. Anything else there (a slide the group no longer holds, a
        killed write's temporary) is removed first."""
        for entry in self.folder.iterdir():
            if entry.name not in outputs:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        if self.group_dir.exists():
            shutil.rmtree(self.group_dir)
        os.replace(self.folder, self.group_dir)


def _as_json(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists), so keys compare equal."""
    return json.loads(json.dumps(value))
