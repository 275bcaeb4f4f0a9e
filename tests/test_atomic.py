"""Atomic outputs, and the removal of the temporary siblings that killed jobs leave."""

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medrobust.io.atomic import (
    LOCK_NAME, atomic_path, current_umask, remove_stale_siblings, set_default_mode,
    temporary_sibling, write_json)

SRC = Path(__file__).resolve().parents[1] / "src"


def killed_writer(final: Path, suffix: str = ".partial") -> Path:
    """The temporary sibling a job SIGKILLed in the middle of writing `final` leaves."""
    script = (
        "import os, signal, sys\n"
        "from medrobust.io.atomic import temporary_sibling\n"
        "with temporary_sibling(sys.argv[1], sys.argv[2]) as folder:\n"
        "    (folder / 'half-written').write_bytes(b'x' * 1000)\n"
        "    print(folder, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")
    result = subprocess.run([sys.executable, "-c", script, str(final), suffix],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    assert result.returncode == -signal.SIGKILL, result.stderr
    left = Path(result.stdout.strip())
    assert left.parent == final.parent and (left / "half-written").exists()
    return left


def test_a_write_removes_what_a_killed_write_of_the_same_output_left(tmp_path, caplog):
    final = tmp_path / "clean.csv"
    left = killed_writer(final)
    assert left.name.startswith(".clean.csv.") and left.name.endswith(".partial")

    with caplog.at_level(logging.INFO, logger="medrobust"), atomic_path(final) as tmp:
        tmp.write_text("a,b\n")
    assert final.read_text() == "a,b\n"
    assert not left.exists()
    assert "left by an earlier run that was interrupted" in caplog.text
    assert sorted(path.name for path in tmp_path.iterdir()) == ["clean.csv"]


def test_siblings_of_other_outputs_and_live_writers_are_left_alone(tmp_path):
    final = tmp_path / "clean.csv"
    # another job's output in the same folder, with a name that extends this one's
    other_job = killed_writer(tmp_path / "clean.csv.json")
    json_job = killed_writer(tmp_path / "clean.json")
    not_ours = [tmp_path / ".clean.csv.backup.partial", tmp_path / ".clean.csv.abcdefgh.partial.old"]
    for path in not_ours:
        path.mkdir()
    a_file = tmp_path / ".clean.csv.abcdefgh.partial"  # the pattern, but not a folder
    a_file.write_text("")
    with temporary_sibling(final) as live:  # a writer that is still running holds its lock
        assert remove_stale_siblings(final) == []
        write_json(tmp_path / "clean.csv", {"n": 1})
        assert live.exists()
    for path in (other_job, json_job, *not_ours, a_file):
        assert path.exists(), path


def test_an_unlocked_folder_is_stale_only_when_old(tmp_path):
    """A folder without a lock file: from an older version, or a writer killed before locking."""
    final = tmp_path / "store.zarr"
    young = Path(tempfile.mkdtemp(prefix=".store.zarr.", suffix=".partial", dir=tmp_path))
    old = Path(tempfile.mkdtemp(prefix=".store.zarr.", suffix=".partial", dir=tmp_path))
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    assert remove_stale_siblings(final) == [old]
    assert young.exists() and not old.exists()


def test_the_writer_lock_is_released_when_the_write_ends(tmp_path):
    final = tmp_path / "out.txt"
    with temporary_sibling(final, ".scratch") as folder:
        assert (folder / LOCK_NAME).exists()
    assert not folder.exists()
    with pytest.raises(RuntimeError):
        with atomic_path(final):
            raise RuntimeError("fails half-way")
    assert list(tmp_path.iterdir()) == []


def test_scratch_and_partial_siblings_are_told_apart(tmp_path):
    final = tmp_path / "images.zarr"
    scratch = killed_writer(final, ".scratch")
    partial = killed_writer(final, ".partial")
    assert remove_stale_siblings(final, ".partial") == [partial]
    assert scratch.exists()
    assert remove_stale_siblings(final, ".scratch") == [scratch]


def test_set_default_mode_follows_the_umask(tmp_path):
    path = tmp_path / "weights"
    path.write_bytes(b"")
    os.chmod(path, 0o600)
    previous = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        set_default_mode(path)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o640


def test_write_json_writes_numpy_torch_and_paths_as_json(tmp_path):
    write_json(tmp_path / "values.json", {
        "array": np.arange(3), "one": np.array([7]), "scalar": np.float32(0.5),
        "zero_d": np.array(2), "tensor": torch.tensor([[1, 2]]), "path": Path("a/b")})
    assert json.loads((tmp_path / "values.json").read_text()) == {
        "array": [0, 1, 2], "one": [7], "scalar": 0.5, "zero_d": 2, "tensor": [[1, 2]],
        "path": "a/b"}
    with pytest.raises(TypeError, match="cannot write object to JSON"):
        write_json(tmp_path / "bad.json", {"x": object()})
