"""Per-epoch training checkpoints, so that a killed training job resumes where it stopped.

After an epoch a trainer writes everything the remaining epochs depend on:
the model, the optimiser (its moments and step counts), the learning-rate
schedule's state where there is one (a constant rate has none), every random
generator the loop draws from (the global torch generator that
initialisation and dropout use, the CUDA one on a GPU, and the trainer's own
batch/flip, bag-order and noise generators), the epoch, the history so far
and the best epoch's weights. A rerun loads it and continues
with the next epoch; on the CPU the final weights are bit for bit those of an
uninterrupted run (tests/test_resume.py kills a training job mid-epoch).

When: after every epoch but the last (the model itself is saved right
after it), except that an epoch shorter than `WORK_PER_WRITE` times the last
checkpoint's write waits for the next: a ResNet-18 checkpoint is ~180 MB and
takes a fraction of a second, longer than an epoch of the default run, while
a real dataset's epochs take minutes and each gets its checkpoint. A kill
then loses at most a few seconds more than the epoch it interrupted.

Where: beside the model folder, never inside it, so that nothing Snakemake
removes before a job (its outputs) takes the checkpoint with it:

    results/models/{dataset}/.checkpoints/{model}/{key}.pt

`key` is a hash of the resolved model and training config, the training data
(store attrs, sample ids, labels, splits; a slide model's features and MHIM
teacher themselves), the device type and the training code
(`TRAINING_CODE`): a run whose config, data or code changed starts afresh
instead of resuming a stale run (a bug fixed after a crash must not keep the
epochs the bug trained), and the stale checkpoint is removed. The checkpoint is removed once the model is
saved. Checkpoints are written atomically (`medrobust.io.atomic`), so a kill
while writing one leaves the previous epoch's.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch.optim.lr_scheduler import LRScheduler

from medrobust.fingerprint import code_fingerprint
from medrobust.io.atomic import atomic_path
from medrobust.logs import get_logger
from medrobust.models.registry import save_model

log = get_logger(__name__)

CHECKPOINTS_DIR = ".checkpoints"
SUFFIX = ".pt"
FORMAT = 2  # bump when the checkpoint's content changes, so old ones are not resumed
# the code a training run runs (the train rules' fingerprints together): part of every key
TRAINING_CODE = ("train", "models", "attacks")
# seconds of training between checkpoints per second that writing one takes:
# checkpoints cost at most 1/(1 + WORK_PER_WRITE) of the training time
WORK_PER_WRITE = 4.0


def checkpoint_dir_for(model_dir: str | os.PathLike) -> Path:
    """`{parent}/.checkpoints/{model}` for the model folder `{parent}/{model}`."""
    model_dir = Path(model_dir)
    return model_dir.parent / CHECKPOINTS_DIR / model_dir.name


def fingerprint(*parts: Any) -> str:
    """A short hash of JSON-able values and arrays, stable across runs and machines."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, (np.ndarray, torch.Tensor)):
            array = part.numpy() if isinstance(part, torch.Tensor) else part
            digest.update(json.dumps([str(array.dtype), list(array.shape)]).encode())
            digest.update(json.dumps(array.tolist()).encode() if array.dtype.kind in "OT"
                          else np.ascontiguousarray(array).tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


class TrainingCheckpoint:
    """The checkpoint of one model's training run, keyed by what the run depends on."""

    def __init__(self, model_dir: str | os.PathLike, key: str,
                 checkpoint_dir: str | os.PathLike | None = None):
        self.folder = Path(checkpoint_dir) if checkpoint_dir else checkpoint_dir_for(model_dir)
        self.key = f"v{FORMAT}-{fingerprint(key, code_fingerprint(*TRAINING_CODE))}"
        self.path = self.folder / f"{self.key}{SUFFIX}"
        self._written_at: float | None = None
        self._write_s = 0.0

    def load(self) -> dict[str, Any] | None:
        """This run's checkpoint, or None; checkpoints of other configs are removed."""
        for other in sorted(self.folder.glob(f"*{SUFFIX}")) if self.folder.is_dir() else ():
            if other != self.path:
                log.info("%s: removing the checkpoint of a run with another config or "
                         "other data; this run starts afresh", other)
                other.unlink(missing_ok=True)
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # a damaged checkpoint costs a restart, not the run
            log.warning("%s: unreadable checkpoint (%s); training starts afresh",
                        self.path, error)
            return None
        if not isinstance(state, dict) or state.get("key") != self.key:
            log.warning("%s: checkpoint of another run; training starts afresh", self.path)
            return None
        return state

    def due(self) -> bool:
        """Whether to write one now: the first time in a run, then once the training
        since the last one took `WORK_PER_WRITE` times as long as writing it."""
        return self._written_at is None or \
            time.perf_counter() - self._written_at >= WORK_PER_WRITE * self._write_s

    def save(self, state: Mapping[str, Any]) -> None:
        started = time.perf_counter()
        with atomic_path(self.path) as tmp:
            torch.save({**state, "key": self.key}, tmp)
        self._written_at = time.perf_counter()
        self._write_s = self._written_at - started

    def remove(self) -> None:
        """Remove the checkpoint (the model is saved), and its folder once empty.

        The shared `.checkpoints` folder stays: another model's job may be
        about to write its first checkpoint there.
        """
        self.path.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:  # not empty, or gone
            pass


def rng_state(generators: Mapping[str, torch.Generator], device: torch.device) -> dict:
    """The states of the global torch generator(s) and the trainer's own generators."""
    state = {"torch": torch.get_rng_state(),
             "generators": {name: generator.get_state()
                            for name, generator in generators.items()}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator],
                      device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    for name, generator in generators.items():
        generator.set_state(state["generators"][name])


@dataclasses.dataclass
class Progress:
    """Where a training loop stands: the history, the epochs done and the best epoch so far."""

    epochs: list[dict[str, Any]]
    done: int = 0
    best: tuple | None = None          # (score, epoch)
    best_state: dict | None = None


def resume(checkpoint: TrainingCheckpoint, model: torch.nn.Module,
           optimizer: torch.optim.Optimizer, generators: Mapping[str, torch.Generator],
           device: torch.device, name: str, total_epochs: int,
           scheduler: LRScheduler | None = None) -> Progress:
    """Restore model, optimiser, schedule and generators from the checkpoint if there is one.

    Both trainers resume the same way; a fresh run starts from `Progress([])`.
    """
    saved = checkpoint.load()
    if saved is None:
        return Progress([])
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if scheduler is not None:  # the key hashes the config: a schedule's run saved one
        scheduler.load_state_dict(saved["scheduler"])
    restore_rng_state(saved["rng"], generators, device)
    # None: the best epoch is the checkpoint's own (not stored twice)
    best_state = (copy.deepcopy(saved["model"]) if saved["best_state"] is None
                  else saved["best_state"])
    log.info("%s: resuming after epoch %d of %d from %s", name, saved["epoch"], total_epochs,
             checkpoint.path)
    return Progress(saved["history"], saved["epoch"],
                    (tuple(saved["best_score"]), saved["best_epoch"]), best_state)


def save_progress(checkpoint: TrainingCheckpoint, epoch: int, model: torch.nn.Module,
                  optimizer: torch.optim.Optimizer, generators: Mapping[str, torch.Generator],
                  device: torch.device, progress: Progress,
                  scheduler: LRScheduler | None = None) -> None:
    """Write what `resume` restores, after `epoch`."""
    best_score, best_epoch = progress.best
    checkpoint.save({"epoch": epoch, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(),
                     "scheduler": None if scheduler is None else scheduler.state_dict(),
                     "rng": rng_state(generators, device), "history": progress.epochs,
                     "best_state": None if best_epoch == epoch else progress.best_state,
                     "best_score": list(best_score), "best_epoch": best_epoch})


def save_kept_epoch(model: torch.nn.Module, best_state: Mapping[str, torch.Tensor],
                    out_dir: str | os.PathLike, config: Mapping[str, Any],
                    history: Mapping[str, Any], checkpoint: TrainingCheckpoint, name: str,
                    started: float) -> Mapping[str, Any]:
    """Save the kept epoch's weights as the model, then drop the checkpoint (every trainer's
    last step); `started` is the `time.perf_counter()` of the training's start."""
    model.load_state_dict(best_state)
    save_model(model, out_dir, config, history)
    checkpoint.remove()
    log.info("%s: kept epoch %d (%s); trained in %.1f s", name, history["best_epoch"],
             history["selected_by"], time.perf_counter() - started)
    return history
