"""GPU slots: concurrent jobs claim different GPUs; a scheduler's choice is kept."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from medrobust.device import select_device
from medrobust.errors import ConfigError

CLAIM = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from medrobust.device import claim_gpu
    index = claim_gpu(n_gpus=2, lock_dir=Path(sys.argv[1]))
    import os
    print(index, os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
    time.sleep(float(sys.argv[2]))
""")


def claim(lock_dir, hold_s, env=None):
    environment = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    environment.update(env or {})
    return subprocess.Popen([sys.executable, "-c", CLAIM, str(lock_dir), str(hold_s)],
                            stdout=subprocess.PIPE, text=True, env=environment)


def test_concurrent_jobs_get_different_gpus_and_free_them_on_exit(tmp_path):
    first = claim(tmp_path, 3)
    first_line = first.stdout.readline().split()
    second = claim(tmp_path, 0)
    second_line = second.communicate()[0].split()
    assert first_line == ["0", "0"] and second_line == ["1", "1"]
    first.wait()
    third = claim(tmp_path, 0)
    assert third.communicate()[0].split() == ["0", "0"]  # the lock died with its process


def test_a_scheduler_choice_is_kept(tmp_path):
    job = claim(tmp_path, 0, env={"CUDA_VISIBLE_DEVICES": "3"})
    assert job.communicate()[0].split() == ["None", "3"]


def test_device_preferences():
    assert select_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert select_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            select_device("cuda")
    with pytest.raises(ConfigError, match="auto, cpu or cuda"):
        select_device("gpu")


def test_job_threads_cap_torch_threads():
    """A job's Snakemake threads become torch's CPU thread pool (in a fresh
    process: the pool size is process-wide)."""
    probe = ("import torch; from medrobust.device import select_device; "
             "select_device('cpu', threads=1); print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1"]
