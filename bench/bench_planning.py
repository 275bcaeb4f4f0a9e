"""Benchmark planning a slide cohort: `snakemake -n` of medrobust against a bare workflow.

For each cohort size N, a temporary folder gets N placeholder slide files (empty:
planning never opens them) and a labels table, and three workflows download it:

- medrobust: the embedded config.yaml with its `slides` dataset turned into a
  `local` source over that folder (every other dataset and model as shipped);
  `snakemake resources/slides` runs the real download checkpoint (links the
  folder, hashes the files, writes the manifest).
- bare: a Snakefile of the same shape and nothing else: a download checkpoint
  writing an N-row manifest, one tile and one feature job per slide (shell
  rules), and a train and an evaluate job whose input functions list the N
  feature stores from the manifest (read once per call, as any workflow would).
- bare+directives: the same, with the per-slide rules declared as medrobust's
  are (a params function, threads, priority, resources, log, benchmark, conda,
  and a shell command that uses the params), which Snakemake sets up per job
  even in a dry run.

Then `snakemake -n` of each workflow's default target is timed (wall clock,
the whole process: parse, config validation, DAG). All plan 2N per-slide
jobs behind the checkpoint; medrobust plans its image branch (tens of jobs) and
two index jobs too. With `--slides-per-job K` medrobust is also planned with the
cohort in groups of K slides per tiling and feature job
(`datasets.<name>.slides_per_job`): 2N/K group jobs and no job per slide,
printed as its own column and ratio.

    .venv/bin/python bench/bench_planning.py                  # N = 1000 3000 10000
    .venv/bin/python bench/bench_planning.py --sizes 500 2000 --repeats 3
    .venv/bin/python bench/bench_planning.py --sizes 10000 --slides-per-job 100
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import snakemake
import yaml

from timing import machine_line

ROOT = Path(__file__).resolve().parents[1]

BARE_SNAKEFILE = '''\
import csv
from pathlib import Path


def feature_stores(wildcards):
    folder = checkpoints.download.get(dataset=wildcards.dataset).output[0]
    with open(Path(folder) / "manifest.csv", newline="") as handle:
        return [f"results/features/{wildcards.dataset}/{row['sample_id']}.zarr"
                for row in csv.DictReader(handle)]


rule all:
    input:
        "results/evaluation/slides/metrics.json",


checkpoint download:
    output:
        directory("resources/{dataset}"),
    params:
        n=config["slides"],
    run:
        Path(output[0]).mkdir(parents=True)
        with open(Path(output[0]) / "manifest.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sample_id", "path", "label", "split", "sha256"])
            for index in range(params.n):
                writer.writerow([f"slide_{index:06d}", f"data/slide_{index:06d}.tiff",
                                 "tumor" if index % 2 else "normal", "train", "0" * 64])


rule tile_slide:
    input:
        "resources/{dataset}",
    output:
        directory("results/tiles/{dataset}/{slide}.zarr"),
__TILE_SLIDE__

rule extract_features:
    input:
        "results/tiles/{dataset}/{slide}.zarr",
    output:
        directory("results/features/{dataset}/{slide}.zarr"),
__EXTRACT_FEATURES__

rule train:
    input:
        feature_stores,
    output:
        "results/models/{dataset}/model.safetensors",
    shell:
        "touch {output}"


rule evaluate:
    input:
        feature_stores,
        model="results/models/{dataset}/model.safetensors",
    output:
        "results/evaluation/{dataset}/metrics.json",
    shell:
        "touch {output}"
'''

# How the bare workflow's per-slide rules run: a shell command, or ("directives") as
# medrobust's do, with a params function, threads, priority, resources, log,
# benchmark and conda environment. Snakemake's own work per job differs between
# the two; the second isolates what medrobust adds beyond it.
PLAIN_BODY = '''\
    shell:
        "mkdir -p {output}"
'''
DIRECTIVES_BODY = '''\
    params:
        slide=lambda wildcards: wildcards.slide,
    threads: 1
    priority: 5
    resources:
        mem_mb=4000,
    log:
        "logs/RULE/{dataset}/{slide}.log",
    benchmark:
        "benchmarks/RULE/{dataset}/{slide}.tsv",
    conda:
        "environment.yaml"
    shell:
        "echo {params.slide:q} > {log:q}; mkdir -p {output:q}"
'''


def snakemake_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", *args]


def run(command: list[str], cwd: Path) -> float:
    """Seconds `command` took; its output goes to a log file, shown if it fails."""
    log = cwd / "bench.log"
    start = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run(command, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed in {cwd}:\n{log.read_text()[-3000:]}")
    return seconds


def medrobust_cohort(work: Path, n: int, slides_per_job: int | None) -> Path:
    """A workdir whose config tiles a local cohort of n placeholder slides, one per job
    (config.yaml) and, if given, `slides_per_job` per job (grouped.yaml); downloaded."""
    data = work / "cohort"
    data.mkdir(parents=True)
    lines = ["path,label"]
    for index in range(n):
        name = f"slide_{index:06d}.tiff"
        (data / name).touch()
        lines.append(f"{name},{'tumor' if index % 2 else 'normal'}")
    (data / "labels.csv").write_text("\n".join(lines) + "\n")
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    slides = config["datasets"]["slides"]
    slides["source"] = {"type": "local", "root": str(data), "labels": {"table": "labels.csv"}}
    workdir = work / "medrobust"
    workdir.mkdir()
    slides["slides_per_job"] = 1
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    if slides_per_job is not None:
        slides["slides_per_job"] = slides_per_job
        (workdir / "grouped.yaml").write_text(yaml.safe_dump(config))
    run(medrobust_args(workdir, "--cores", "1", "resources/slides"), workdir)
    return workdir


def medrobust_args(workdir: Path, *args: str, configfile: str = "config.yaml") -> list[str]:
    return snakemake_command("--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
                             "--configfile", str(workdir / configfile), *args)


def bare_cohort(work: Path, n: int, body: str, name: str) -> Path:
    """The bare workflow, its per-slide rules run by `body`, downloaded for n slides."""
    workdir = work / name
    workdir.mkdir()
    snakefile = BARE_SNAKEFILE
    for rule in ("tile_slide", "extract_features"):
        snakefile = snakefile.replace(f"__{rule.upper()}__", body.replace("RULE", rule))
    (workdir / "Snakefile").write_text(snakefile)
    (workdir / "environment.yaml").write_text("channels: [conda-forge]\ndependencies: [python]\n")
    run(snakemake_command("--cores", "1", "resources/slides", "--config", f"slides={n}"), workdir)
    return workdir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000],
                        help="cohort sizes N (default 1000 3000 10000)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed `snakemake -n` runs per workflow and size, interleaved; "
                             "the median counts (default 1)")
    parser.add_argument("--slides-per-job", type=int, default=None, metavar="K",
                        help="also plan medrobust with K slides per tiling and feature job")
    args = parser.parse_args(argv)
    k = args.slides_per_job
    print(machine_line(f"snakemake {snakemake.__version__}"))
    grouped_header = "" if k is None else f" {f'grouped({k}) s':>14s} {'ratio':>6s} {'vs 1/job':>8s}"
    print(f"{'N slides':>9s} {'medrobust s':>12s} {'bare s':>8s} {'ratio':>6s} "
          f"{'bare+directives s':>18s} {'ratio':>6s} "
          f"{'medrobust s/1000 slides':>24s}{grouped_header}")
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="medrobust-planning-") as tmp:
            work = Path(tmp)
            workdirs = {"medrobust": medrobust_cohort(work, n, k),
                        "bare": bare_cohort(work, n, PLAIN_BODY, "bare"),
                        "directives": bare_cohort(work, n, DIRECTIVES_BODY, "directives")}
            times: dict[str, list[float]] = {name: [] for name in (*workdirs, "grouped")}
            for _ in range(args.repeats):  # interleaved, so load on a shared machine hits all
                medrobust = workdirs["medrobust"]
                times["medrobust"].append(run(medrobust_args(medrobust, "-n"), medrobust))
                for name in ("bare", "directives"):
                    times[name].append(run(snakemake_command("-n", "--config", f"slides={n}"),
                                           workdirs[name]))
                if k is not None:
                    times["grouped"].append(run(medrobust_args(
                        medrobust, "-n", configfile="grouped.yaml"), medrobust))
        ours, bare, directives = (statistics.median(times[name])
                                  for name in ("medrobust", "bare", "directives"))
        grouped = ""
        if k is not None:
            seconds = statistics.median(times["grouped"])
            grouped = f" {seconds:14.1f} {seconds / bare:6.2f} {seconds / ours:8.2f}"
        print(f"{n:9d} {ours:12.1f} {bare:8.1f} {ours / bare:6.2f} "
              f"{directives:18.1f} {ours / directives:6.2f} "
              f"{1000 * ours / n:24.2f}{grouped}", flush=True)
    print("ratio = medrobust seconds / that workflow's seconds (goal <= 1.5 against the bare "
          "workflow at 10,000 slides); bare+directives: the bare workflow with medrobust's "
          "per-slide directives (log, benchmark, conda, resources, params); "
          "vs 1/job = grouped seconds / one-slide-per-job seconds")


if __name__ == "__main__":
    sys.exit(main())
