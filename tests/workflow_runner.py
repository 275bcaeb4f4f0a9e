"""Run the real Snakemake command line on a config, in a scratch directory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]


def run_snakemake(workdir: Path, configfile: Path, *args: str, timeout: int = 900):
    return subprocess.run(
        [*SNAKEMAKE, "--directory", str(workdir), "--configfile", str(configfile), *args],
        capture_output=True, text=True, timeout=timeout,
    )


def job_counts(output: str) -> dict[str, int]:
    """{rule: jobs} from the `Job stats` table of a dry run ({} when nothing is to be done)."""
    if "Nothing to be done" in output:
        return {}
    table = output.split("Job stats:", 1)[1].split("total", 1)[0]
    return {match[1]: int(match[2]) for match in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}
