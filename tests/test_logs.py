"""A job's log file holds what went wrong; progress bars stay readable on the console.

Most checks run a tiny script under `script_logging` in a real subprocess, with a
fake `snakemake` object whose log is a file in tmp_path, because what matters
is what lands in that file and on the process's stderr.
"""

import fcntl
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import textwrap
import time
import types
from pathlib import Path

import pytest

from medrobust.logs import describe_job
from medrobust.progress import progress

ROOT = Path(__file__).resolve().parents[1]
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "

JOB = """
import sys, time, types, warnings
from medrobust.logs import script_logging
from medrobust.progress import progress

snakemake = types.SimpleNamespace(log=[sys.argv[1]] if sys.argv[1] else [], rule="demo",
                                  wildcards={{"dataset": "tiny", "model": "m1"}})
with script_logging(snakemake):
{body}
"""


def run_job(tmp_path: Path, body: str, *, env: dict | None = None, name: str = "job",
            log: bool = True, **popen) -> tuple[subprocess.CompletedProcess, str]:
    script = tmp_path / f"{name}.py"
    script.write_text(JOB.format(body=textwrap.indent(textwrap.dedent(body), "    ")))
    log_file = tmp_path / f"{name}.log"
    result = subprocess.run(
        [sys.executable, str(script), str(log_file) if log else ""],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})},
        capture_output=True, text=True, timeout=120, **popen)
    return result, log_file.read_text() if log else ""


def bar_lines(stderr: str) -> list[str]:
    """Lines of stderr that are not log records (nor a traceback's continuation)."""
    return [line for line in stderr.splitlines() if line and not re.match(STAMP, line)
            and not line.startswith((" ", "Traceback", "KeyError"))]


def test_good_run_logs_warnings_and_progress_summaries(tmp_path):
    result, log = run_job(tmp_path, """
        warnings.warn("pixel spacing missing", UserWarning)
        for _ in progress(range(1000), desc="embed slide_000", unit="batch"):
            pass
        with progress(total=3 * 2**20, desc="data.zip", unit="B", unit_scale=True,
                      unit_divisor=1024) as bar:
            bar.update(3 * 2**20)
    """)
    assert result.returncode == 0, result.stderr
    assert re.search(STAMP + r"WARNING py.warnings: .*job.py:\d+: UserWarning: "
                     r"pixel spacing missing\n", log)
    assert re.search(STAMP + r"INFO medrobust.progress: embed slide_000: 1000 batch in "
                     r"\d+\.\d s \((\S+ batch/s|rate n/a)\)\n", log)
    assert re.search(r"data.zip: 3.00MB in \d+\.\d s", log)
    assert "\n\n" not in log  # no blank line after the warning
    # the console gets the same records, each naming the job
    assert "[demo tiny/m1] medrobust.progress: embed slide_000: 1000 batch" in result.stderr


def test_bars_are_sparse_whole_lines_when_stderr_is_not_a_terminal(tmp_path):
    result, _ = run_job(tmp_path, """
        for _ in progress(range(1000), desc="steps", unit="step"):
            time.sleep(0.0005)
    """)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    assert len(bar_lines(result.stderr)) <= 3  # 30 s apart: none for this short loop
    assert len(result.stderr.splitlines()) <= 4


def test_bar_lines_name_the_job_and_never_redraw(tmp_path):
    result, _ = run_job(tmp_path, """
        for _ in progress(range(40), desc="steps", unit="step"):
            time.sleep(0.01)
    """, env={"MEDROBUST_PROGRESS_INTERVAL": "0.1"})
    assert result.returncode == 0, result.stderr
    lines = bar_lines(result.stderr)
    assert 1 <= len(lines) <= 8
    assert "\r" not in result.stderr
    for line in lines:
        assert re.fullmatch(r"\[demo tiny/m1\] steps: +\d+%\|[# 0-9]{20}\| \d+/40 step "
                            r"\[\d\d:\d\d<\d\d:\d\d, +\S+step/s\]", line), line


def test_two_jobs_side_by_side_interleave_whole_lines(tmp_path):
    body = """
        for _ in progress(range(300), desc="epoch 1/1", unit="batch"):
            time.sleep(0.002)
    """
    scripts = []
    for name in ("a", "b"):
        script = tmp_path / f"{name}.py"
        script.write_text(JOB.format(body=textwrap.indent(textwrap.dedent(body), "    "))
                          .replace('rule="demo"', f'rule="train_{name}"'))
        scripts.append(script)
    read, write = os.pipe()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MEDROBUST_PROGRESS_INTERVAL": "0.02"}
    jobs = [subprocess.Popen([sys.executable, str(script), ""], stderr=write, env=env)
            for script in scripts]
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        console = pipe.read().decode()
    assert [job.wait(timeout=120) for job in jobs] == [0, 0]
    assert "\r" not in console
    lines = console.splitlines()
    named = [line for line in lines if line.startswith("[train_")]
    assert {line.split("]")[0] for line in named} == {"[train_a tiny/m1", "[train_b tiny/m1"}
    for line in lines:
        assert (re.fullmatch(r"\[train_[ab] tiny/m1\] epoch 1/1: .* \d+/300 batch \[.*\]", line)
                or re.match(STAMP + r"INFO \[train_[ab] tiny/m1\] medrobust.progress: "
                            r"epoch 1/1: 300 batch in", line)), line


def _run_on_terminal(tmp_path: Path, body: str, in_job: bool) -> str:
    """The bytes a script writes to stderr when stderr is a (pseudo-)terminal."""
    script = tmp_path / "tty.py"
    if in_job:
        script.write_text(JOB.format(body=textwrap.indent(textwrap.dedent(body), "    ")))
    else:
        script.write_text("import time\nfrom medrobust.progress import progress\n"
                          + textwrap.dedent(body))
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    job = subprocess.Popen([sys.executable, str(script), ""], stderr=follower,
                           stdout=subprocess.DEVNULL,
                           env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    os.close(follower)
    chunks, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the follower side closed
                break
            if not data:
                break
            chunks.append(data)
        elif job.poll() is not None:
            break
    os.close(leader)
    assert job.wait(timeout=120) == 0
    return b"".join(chunks).decode()


def test_a_terminal_outside_the_workflow_gets_the_usual_redrawn_bar(tmp_path):
    output = _run_on_terminal(tmp_path, """
        for _ in progress(range(200), desc="steps", unit="step", mininterval=0):
            time.sleep(0.002)
    """, in_job=False)
    assert "\r" in output and "steps:" in output


def test_a_terminal_inside_a_workflow_job_gets_whole_lines(tmp_path):
    output = _run_on_terminal(tmp_path, """
        for _ in progress(range(200), desc="steps", unit="step"):
            time.sleep(0.002)
    """, in_job=True)
    # the pty turns "\n" into "\r\n"; a redraw would be a "\r" not followed by "\n"
    assert not re.search("\r(?!\n)", output)
    assert "[demo tiny/m1] medrobust.progress: steps: 200 step in" in output


def test_a_bug_leaves_its_full_traceback_in_the_log_file(tmp_path):
    result, log = run_job(tmp_path, """
        def find(table):
            return table["missing column"]
        find({})
    """)
    assert result.returncode == 1
    assert re.search(STAMP + r"CRITICAL medrobust: unexpected KeyError \(a bug", log)
    assert "Traceback (most recent call last):" in log
    assert 'return table["missing column"]' in log
    assert log.rstrip().endswith("KeyError: 'missing column'")
    # on the console once (from the log record), not a second time from the interpreter
    assert result.stderr.count("Traceback (most recent call last):") == 1


def test_a_user_error_stays_one_clear_line(tmp_path):
    result, log = run_job(tmp_path, """
        from medrobust.errors import InputError
        raise InputError("scan.dcm: not a DICOM file")
    """)
    assert result.returncode == 1
    assert re.fullmatch(STAMP + r"ERROR medrobust: scan.dcm: not a DICOM file\n", log)
    assert "Traceback" not in result.stderr


def test_an_interrupted_loop_says_where_it_stopped(tmp_path):
    result, log = run_job(tmp_path, """
        with progress(total=10, desc="preprocess tiny", unit="image") as bar:
            bar.update(4)
            raise RuntimeError("disk full")
    """)
    assert result.returncode == 1
    assert re.search(r"preprocess tiny: stopped at 4 image of 10 image after \d+\.\d s", log)
    assert log.index("stopped at") < log.index("Traceback")


def test_the_download_script_says_what_it_fetched(tmp_path):
    """workflow/scripts/download.py, run as Snakemake would, writes a non-empty log."""
    out = tmp_path / "resources" / "mammograms"
    dataset = {"kind": "images", "classes": ["benign", "malignant"],
               "source": {"type": "synthetic", "modality": "mammography", "n_samples": 4,
                          "height": 96, "width": 80,
                          "splits": {"train": 0.5, "val": 0.25, "test": 0.25}}}
    result, log = run_job(tmp_path, f"""
        import runpy
        snakemake.params = types.SimpleNamespace(dataset={dataset!r})
        snakemake.output = [{str(out)!r}]
        runpy.run_path({str(ROOT / "workflow/scripts/download.py")!r},
                       init_globals={{"snakemake": snakemake}})
    """)
    assert result.returncode == 0, result.stderr
    assert re.search(r"synthetic mammograms: 4 image in \d+\.\d s", log)
    assert re.search(rf"{re.escape(str(out))}: 4 images from source 'synthetic' "
                     r"\(train \d, val \d, test \d; classes benign, malignant\) in \d+\.\d s",
                     log)


def test_describe_job_names_the_rule_and_its_wildcards():
    assert describe_job(types.SimpleNamespace(rule="attack", wildcards={
        "dataset": "mammograms", "attack": "fgsm", "eps": "8"})) == "attack mammograms/fgsm/8"
    assert describe_job(types.SimpleNamespace(rule="summarize", wildcards={})) == "summarize"
    assert describe_job(types.SimpleNamespace()) is None


def test_summary_in_process(caplog):
    with caplog.at_level(logging.INFO, logger="medrobust.progress"):
        for _ in progress(iter(range(7)), desc="unknown length", unit="slide"):
            pass
        bar = progress(total=5, desc="resumed.bin", unit="B", unit_scale=True, initial=2)
        bar.update(3)
        bar.close()
        bar.close()  # a second close logs nothing more
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert re.fullmatch(r"unknown length: 7 slide in \d+\.\d s \((\S+ slide/s|rate n/a)\)",
                        messages[0])
    assert messages[1].startswith("resumed.bin: 3.00B in ")  # counts what this run moved


@pytest.mark.parametrize("value, expected", [("2.5", 2.5), ("nonsense", 30.0)])
def test_the_interval_can_be_set_from_the_environment(monkeypatch, value, expected):
    from medrobust.progress import line_interval

    monkeypatch.setenv("MEDROBUST_PROGRESS_INTERVAL", value)
    assert line_interval(terminal=False) == expected


def test_a_shell_jobs_name_comes_from_its_log_path():
    from medrobust.slide_jobs import job_name

    assert job_name("tile_slide", "logs/tile_slide/cohort/slide_001.log") == \
        "tile_slide cohort/slide_001"
    assert job_name("extract_features", "/w/logs/extract_features/c/resnet18/s.log") == \
        "extract_features c/resnet18/s"
    assert job_name("tile_slide", "/data/tile_slide/w/logs/tile_slide/c/s.log") == \
        "tile_slide c/s"
    assert job_name("tile_slide", "elsewhere.log") == "tile_slide"
