"""The SLURM profile, for real: the tiny workflow submitted through SLURM.

Runs only where a SLURM cluster answers: `sbatch`, `squeue`, `sinfo` and
`scontrol` on PATH, snakemake-executor-plugin-slurm installed
(`pip install -e '.[slurm]'`), and a partition that can take the profile's
largest job (checked with `sbatch --test-only`); otherwise each test is skipped
with the reason. CI does not start SLURM; on a machine of your own (root,
Debian/Ubuntu) start a single-node one with
tests/slurm/start-single-node-slurm.sh and stop it with
stop-single-node-slurm.sh (docs/slurm.md).

The run is the command docs/slurm.md gives users, plus the test cluster's
profile:

    snakemake --workflow-profile workflow/profiles/slurm --profile tests/slurm/profile ...

It is killed (its whole process group, then its SLURM jobs) after
MEDROBUST_SLURM_TEST_TIMEOUT seconds (default 1500; the single-node run on 2
CPUs takes about 8 minutes).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

from workflow_runner import ROOT

TIMEOUT = int(os.environ.get("MEDROBUST_SLURM_TEST_TIMEOUT", "1500"))
pytestmark = [pytest.mark.workflow, pytest.mark.timeout(TIMEOUT + 300)]

TINY = ROOT / "tests/configs/tiny.yaml"
WORKFLOW_PROFILE = ROOT / "workflow/profiles/slurm"
TEST_PROFILE = ROOT / "tests/slurm/profile"
# What the run must have submitted, whatever rules the workflow gains: its per-slide,
# training, attack and report jobs (the rest is read from the run's own job list).
SUBMITTED_AT_LEAST = {"tile_slide", "extract_features", "train_image_classifier",
                      "train_slide_classifier", "attack", "summarize", "report"}
# A job as Snakemake prints it: "[local]rule|checkpoint NAME:", then its indented fields.
JOB = re.compile(r"^(local)?(?:rule|checkpoint) (\w+):\n((?:    .*\n)*)", re.M)


def _command(*args: str, timeout: int = 30) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def _largest_request() -> list[str]:
    """sbatch options for the profile's largest job: most memory, longest
    runtime, its CPUs, one GPU (no rule asks for more than the defaults'
    memory; set-resources only raise runtimes)."""
    profile = yaml.safe_load((WORKFLOW_PROFILE / "config.yaml").read_text())
    entries = [profile.get("default-resources", {}), *profile.get("set-resources", {}).values()]
    mem_mb = max(int(e.get("mem_mb", 0)) for e in entries) or 1000
    runtime = max(int(e.get("runtime", 0)) for e in entries) or 60
    cpus = int(profile.get("default-resources", {}).get("cpus_per_task", 1))
    return [f"--mem={mem_mb}", f"-t{runtime}", f"--cpus-per-task={cpus}", "--gpus=1"]


def _why_no_slurm() -> str | None:
    """None when a SLURM cluster can run the profile's jobs here, else why not."""
    missing = [tool for tool in ("sbatch", "squeue", "sinfo", "scontrol", "srun")
               if shutil.which(tool) is None]
    if missing:
        return f"no SLURM here ({', '.join(missing)} not on PATH); see docs/slurm.md"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm is not installed: pip install -e '.[slurm]'"
    try:
        info = _command("sinfo", "-h", "-o", "%P %a")
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 30 s"
    partitions = [line.split() for line in info.stdout.splitlines() if line.strip()]
    if info.returncode != 0 or not any(avail == "up" for _, avail in partitions):
        return f"no SLURM partition is up (sinfo: {(info.stdout + info.stderr).strip()[:200]!r})"
    request = _largest_request()
    test = _command("sbatch", "--test-only", *request, "--wrap", "true")
    if test.returncode != 0:
        return (f"the default partition cannot take the profile's largest job "
                f"(sbatch --test-only {' '.join(request)}: {test.stderr.strip()[:200]}); "
                "tests/slurm/start-single-node-slurm.sh declares a fake GPU")
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    """Skips every test here unless a SLURM cluster can run the profile's jobs."""
    why = _why_no_slurm()
    if why:
        pytest.skip(why)


def _job_environment() -> dict[str, str]:
    # A GPU job's CUDA_VISIBLE_DEVICES must come from SLURM, not be inherited
    # from here through sbatch --export=ALL.
    return {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}


def _slurm_logs(workdir: Path) -> dict[str, list[Path]]:
    """Per rule, the per-job logs `.snakemake/slurm_logs/rule_<rule>/<wildcards>/<jobid>.log`."""
    logs: dict[str, list[Path]] = {}
    for folder in sorted((workdir / ".snakemake/slurm_logs").glob("rule_*")):
        logs[folder.name.removeprefix("rule_")] = sorted(folder.rglob("*.log"))
    return logs


def _cancel_jobs_of(workdir: Path) -> None:
    """Cancel the jobs this run left, running or pending: those of this user
    whose working directory (sbatch -D) is the run's; pending jobs have no
    log file yet, so the logs cannot name them all."""
    queue = _command("squeue", "-h", "-u", str(os.getuid()), "-o", "%i %Z", timeout=60)
    ids = [line.split(" ", 1)[0] for line in queue.stdout.splitlines()
           if line.partition(" ")[2] == str(workdir)]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory):
    """The tiny workflow under the SLURM profile; (workdir, stderr)."""
    workdir = tmp_path_factory.mktemp("slurm")
    command = [
        sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
        "--directory", str(workdir), "--configfile", str(TINY),
        "--workflow-profile", str(WORKFLOW_PROFILE), "--profile", str(TEST_PROFILE),
    ]
    # Its own process group, so that a hard timeout also ends the local
    # download job; Snakemake waiting on SLURM may ignore SIGTERM, hence SIGKILL.
    process = subprocess.Popen(command, cwd=ROOT, env=_job_environment(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        _cancel_jobs_of(workdir)
        pytest.fail(f"snakemake under the SLURM profile ran past {TIMEOUT} s; "
                    f"killed it and cancelled its jobs\n{stderr[-6000:]}")
    assert process.returncode == 0, stderr[-6000:]
    return workdir, stderr


def test_the_workflow_completes_under_slurm(slurm_run):
    workdir, _ = slurm_run
    assert (workdir / "results/report/index.html").stat().st_size > 0
    summary = pd.read_csv(workdir / "results/report/robustness.csv")
    # 2 targets x (clean, 4 attacks, 4 worst cases, 1 noise level, the mean over perturbations),
    # surrogate clean, abmil clean
    assert len(summary) == 2 * 11 + 1 + 1


def test_download_runs_on_the_submit_host(slurm_run):
    workdir, stderr = slurm_run
    for dataset in ("mammograms", "slides"):
        assert (workdir / f"resources/{dataset}/manifest.csv").is_file()
    assert "localcheckpoint download:" in stderr
    assert "download" not in _slurm_logs(workdir)


def _submitted_jobs(stderr: str) -> list[tuple[str, bool]]:
    """(rule, asks for a GPU) of each job the run did not run locally, from its log."""
    jobs = []
    for local, rule, fields in JOB.findall(stderr):
        if not local:
            jobs.append((rule, re.search(r"^    resources: .*\bgpu=1\b", fields, re.M) is not None))
    return jobs


def test_every_other_job_went_through_slurm(slurm_run):
    workdir, stderr = slurm_run
    logs = _slurm_logs(workdir)
    planned = Counter(rule for rule, _ in _submitted_jobs(stderr))
    assert SUBMITTED_AT_LEAST <= set(planned), planned
    assert {rule: len(files) for rule, files in logs.items()} == planned
    for rule, files in logs.items():
        for log in files:
            assert log.stem.isdigit(), f"{log} is not named by a SLURM job id"
            text = log.read_text()
            assert f"(Rule: {rule})" in text and "1 of 1 steps (100%) done" in text, log


def test_gpu_rules_are_submitted_with_a_gpu(slurm_run):
    """SLURM's record of each job (kept for MinJobAge after it ends): the jobs
    that ask `gpu=1` hold a GPU, the others none."""
    workdir, stderr = slurm_run
    asks_gpu = dict(_submitted_jobs(stderr))  # per rule: every job of a rule asks alike
    seen = {"gpu": 0, "cpu": 0}
    for rule, files in _slurm_logs(workdir).items():
        for log in files:
            record = _command("scontrol", "-o", "show", "job", log.stem)
            if record.returncode != 0:  # purged already
                continue
            assert "JobState=COMPLETED" in record.stdout, record.stdout
            has_gpu = re.search(r"TresPerJob=\S*gres[:/]gpu[:=]1\b", record.stdout) is not None
            assert has_gpu == asks_gpu[rule], f"{rule}: {record.stdout}"
            seen["gpu" if has_gpu else "cpu"] += 1
    assert seen["gpu"] and seen["cpu"], f"SLURM no longer knows enough of the jobs: {seen}"


def test_medrobust_keeps_the_gpu_slurm_assigns():
    """In a --gpus=1 job SLURM sets CUDA_VISIBLE_DEVICES and medrobust does not
    claim a GPU of its own; without one, medrobust claims GPU 0 itself."""
    probe = ("import os; from medrobust.device import claim_gpu; "
             "before = os.environ.get('CUDA_VISIBLE_DEVICES'); claimed = claim_gpu(n_gpus=1); "
             "print('RESULT', before, claimed, os.environ.get('CUDA_VISIBLE_DEVICES'))")
    env = {**_job_environment(), "PYTHONPATH": str(ROOT / "src")}

    def probe_in_job(*gpu_options: str) -> list[str]:
        run = subprocess.run(
            ["srun", "--mem=1000", "-t5", "--ntasks=1", "--cpus-per-task=1", *gpu_options,
             sys.executable, "-c", probe],
            capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr
        return re.search(r"^RESULT (.*)$", run.stdout, re.M).group(1).split()

    before, claimed, after = probe_in_job("--gpus=1")
    assert before != "None" and claimed == "None" and after == before
    # no GPU from SLURM: medrobust's own lock-file claim picks one
    before, claimed, after = probe_in_job()
    assert before == "None" and after == claimed
