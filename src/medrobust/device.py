"""Run-time device choice, and one GPU per concurrent job.

Snakemake's `--resources gpu=N` only counts GPUs; it does not say which one a
job may use. A GPU job therefore claims a free GPU index with an exclusive
file lock (held until the process exits) and sets CUDA_VISIBLE_DEVICES before
torch initialises CUDA. Where a scheduler has already set
CUDA_VISIBLE_DEVICES (SLURM does), that choice is kept.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

from medrobust.errors import ConfigError
from medrobust.logs import get_logger

log = get_logger(__name__)
_LOCK_DIR = Path(os.environ.get("MEDROBUST_GPU_LOCK_DIR", tempfile.gettempdir()))
_held_locks: list = []  # keeps the lock files open for the life of the process


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def claim_gpu(n_gpus: int | None = None, lock_dir: Path = _LOCK_DIR) -> int | None:
    """Claim a free GPU slot and pin this process to it; None if there is none.

    Call before the first CUDA call. Returns the claimed index.
    """
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return None
    n_gpus = _gpu_count() if n_gpus is None else n_gpus
    for index in range(n_gpus):
        handle = open(lock_dir / f"medrobust-gpu{index}.lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _held_locks.append(handle)
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
        log.info("claimed GPU %d", index)
        return index
    if n_gpus:
        log.warning("all %d GPUs are claimed by other jobs; sharing GPU 0", n_gpus)
    return None


def select_device(preference: str = "auto", threads: int | None = None):
    """`auto` takes a GPU when one is present, else the CPU.

    `threads` (a job's Snakemake `threads`) caps torch's CPU thread pool: by
    default torch takes every core, so concurrent jobs would oversubscribe them.
    """
    import torch

    if preference not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, not {preference!r}")
    if threads:
        torch.set_num_threads(threads)
    if preference == "cpu":
        return torch.device("cpu")
    claim_gpu()
    if torch.cuda.is_available():
        return torch.device("cuda")
    if preference == "cuda":
        raise ConfigError("device: cuda was asked for but no CUDA GPU is visible")
    return torch.device("cpu")
