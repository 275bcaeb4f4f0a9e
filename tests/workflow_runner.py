"""Run the real Snakemake command line on a config, in a scratch directory."""

from __future__ import annotations

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
