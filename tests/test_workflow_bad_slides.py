"""A cohort with bad slides, through the real workflow: under `on_bad_input: skip` each
is left out with its reason and the run completes; under `fail` its tiling job stops
the run naming the file. Both with one slide per job and with slides in groups
(`slides_per_job`), where a bad slide shares its jobs with good ones."""

import itertools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml

from medrobust.data.synthetic.slides import SlideConfig, generate_slides
from medrobust.io.slide_stores import open_feature_store, open_tile_store
from medrobust.slide_groups import plan_slide_groups
from workflow_runner import job_counts, run_snakemake

pytestmark = pytest.mark.workflow
CLASSES = ["normal", "tumor"]
# slide id -> (what is wrong, a phrase of the reason the tiler gives)
BAD = {"truncated": "the first 3000 bytes of a good slide", "notes": "a text file named .tif",
       "blank": "a slide of bare glass"}
REASONS = {"truncated": "OpenSlide cannot open it", "notes": "OpenSlide cannot open it",
           "blank": "no tissue"}


def cohort(root):
    """4 tiny synthetic slides (one per class in train, one in val, one in test) and the
    three bad ones in test, with a labels table naming every file."""
    manifest = generate_slides(SlideConfig(n_samples=4, width=512, height=512, seed=3),
                               CLASSES, root)
    rows = [line.split(",") for line in manifest.read_text().splitlines()[1:]]
    seen = {label: 0 for label in CLASSES}   # of each class: train, then val (normal) or test
    lines = []
    for _, path, label, _, _ in rows:
        split = "train" if not seen[label] else "val" if label == "normal" else "test"
        seen[label] += 1
        lines.append(f"{path},{label},{split},{Path(path).stem}")
    good = root / rows[0][1]
    (root / "slides/truncated.tiff").write_bytes(good.read_bytes()[:3000])
    (root / "slides/notes.tif").write_text("scanner log, not an image\n")
    tifffile.imwrite(root / "slides/blank.tiff", np.full((512, 512, 3), 245, np.uint8),
                     tile=(256, 256), photometric="rgb", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")
    lines += ["slides/truncated.tiff,tumor,test,truncated", "slides/notes.tif,normal,test,notes",
              "slides/blank.tiff,normal,test,blank"]
    (root / "labels.csv").write_text("path,label,split,id\n" + "\n".join(lines) + "\n")
    return [row[0] for row in rows]


@pytest.fixture(scope="module", params=[1, 3], ids=["one_per_job", "groups_of_3"])
def run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    good = cohort(root)
    workdir = tmp_path_factory.mktemp("workflow")
    config = {
        "device": "cpu", "seed": 0, "on_bad_input": "skip",
        "datasets": {"cohort": {
            "kind": "slides", "classes": CLASSES,
            "source": {"type": "local", "root": str(root),
                       "labels": {"table": "labels.csv", "split_column": "split",
                                  "id_column": "id"}},
            "tiling": {"target_mpp": 2.0, "tile_size": 32, "tissue_threshold": 0.5},
            "slides_per_job": request.param}},
        "features": {"backbone": "resnet18", "weights": "random", "batch_size": 64},
        "slide_classifiers": {"abmil": {"dataset": "cohort", "arch": "abmil", "seed": 0,
                                        "epochs": 2}},
        # the slide robustness study too: a bad slide must leave all of it complete
        "slide_robustness": {"fractions": [1.0],
                             "perturbations": {"stain_shift": {"severities": [0.2]}},
                             "adversarial": {"top_k": [1], "epsilons": [8], "steps": 2}},
    }
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = run_snakemake(workdir, configfile, "--cores", "2")
    assert result.returncode == 0, result.stderr[-6000:]
    return {"workdir": workdir, "configfile": configfile, "good": good,
            "slides_per_job": request.param}


def indexed(workdir, index, kind):
    """{slide id: path} of one kind of store, as the dataset's index lists them."""
    table = pd.read_csv(workdir / index)
    return {slide: workdir / path for slide, path in zip(table["slide_id"], table[kind])}


def test_bad_slides_are_left_out_with_their_reason(run):
    workdir = run["workdir"]
    tiles = indexed(workdir, "results/tiles/cohort/index.csv", "tiles")
    features = indexed(workdir, "results/features/cohort/resnet18/index.csv", "features")
    qc = indexed(workdir, "results/tiles/cohort/index.csv", "qc")
    assert set(tiles) == set(features) == set(qc) == set(REASONS) | set(run["good"])
    for slide, reason in REASONS.items():
        store = open_tile_store(tiles[slide])
        [record] = store.attrs["rejected"]
        assert len(store) == 0 and record["sample_id"] == slide and reason in record["reason"]
        assert record["path"].endswith(("tiff", "tif")) and slide in record["path"]
        embedded = open_feature_store(features[slide])
        assert len(embedded.features) == 0 and embedded.attrs["rejected"] == [record]
    for slide in run["good"]:
        store = open_tile_store(tiles[slide])
        assert len(store) > 0 and store.attrs["rejected"] == []
        assert open_feature_store(features[slide]).attrs["slide_id"] == slide
    assert all(path.is_file() for path in qc.values())


def test_the_report_lists_the_left_out_slides_and_shows_the_qc_pictures(run):
    page = (run["workdir"] / "results/report/index.html").read_text()
    assert "3 input(s) left out" in page
    for slide, reason in REASONS.items():
        assert f'<td class="name">{slide}</td>' in page and reason in page
    assert "Slides: quality control" in page
    figures = run["workdir"] / "results/report/figures"
    assert {path.name for path in figures.glob("slide_qc_*.png")} == {
        f"slide_qc_cohort_{slide}.png" for slide in [*REASONS, *run["good"]]}
    assert page.count("green: tissue outline") == 2 * len(run["good"])  # alt text, caption
    # the slide robustness study ran on the slides that remain, each condition once
    assert "Slides: robustness" in page
    metrics = pd.read_csv(run["workdir"] / "results/slide_robustness/cohort/abmil/metrics.csv")
    assert set(metrics["kind"]) == {"clean", "tile_fraction", "adversarial_tiles"}
    assert (metrics["n"] == metrics["n"].iloc[0]).all() and metrics["n"].iloc[0] > 0


def test_grouped_slides_run_in_one_job_per_group_and_no_job_per_slide(run):
    workdir, k = run["workdir"], run["slides_per_job"]
    n_slides = len(run["good"]) + len(BAD)
    n_groups = -(-n_slides // k)  # ceiling
    tiles = indexed(workdir, "results/tiles/cohort/index.csv", "tiles")
    if k == 1:
        assert len(list((workdir / "benchmarks/tile_slide/cohort").glob("*.tsv"))) == n_slides
        assert not (workdir / "results/tiles/cohort/groups").exists()
        assert {path.parent for path in tiles.values()} == {workdir / "results/tiles/cohort"}
        return
    for stage in ("tile_slide_group/cohort", "extract_features_group/cohort/resnet18"):
        assert len(list((workdir / "benchmarks" / stage).glob("*.tsv"))) == n_groups
    # no job per slide: every log is a group's, a dataset's, a model's or a perturbation's
    assert {path.name for path in (workdir / "logs").iterdir()} == {
        "download", "tile_slide_group", "extract_features_group", "index_slide_tiles",
        "index_slide_features", "train_slide_classifier", "evaluate_slide_classifier",
        "perturb_slide_tiles", "slide_robustness", "summarize.log", "report.log"}
    groups = sorted((workdir / "results/tiles/cohort/groups").iterdir())
    assert [len(list(group.glob("*.zarr"))) for group in groups] == \
        [k] * (n_slides // k) + ([n_slides % k] if n_slides % k else [])
    # the indexes list each slide's stores in its group's folders
    features = indexed(workdir, "results/features/cohort/resnet18/index.csv", "features")
    for slide in [*run["good"], *BAD]:
        assert tiles[slide].parent.parent.name == features[slide].parent.parent.name == "groups"
        assert tiles[slide].parent.name == features[slide].parent.name
    # a folder no run uses (here: of an earlier grouping) is named in the index job's log
    # and left alone
    stale = workdir / "results/tiles/cohort/groups/group-000099"
    stale.mkdir()
    result = run_snakemake(workdir, run["configfile"], "--cores", "1",
                           "--forcerun", "index_slide_tiles", "results/tiles/cohort/index.csv")
    assert result.returncode == 0, result.stderr[-3000:]
    log = (workdir / "logs/index_slide_tiles/cohort.log").read_text()
    assert "1 folder(s) that this run does not use (group-000099)" in log
    assert stale.is_dir()
    stale.rmdir()


def test_under_fail_a_bad_slide_stops_the_run_naming_the_file(run, tmp_path):
    workdir = tmp_path / "fail"
    shutil.copytree(run["workdir"] / "resources", workdir / "resources", symlinks=True)
    if run["slides_per_job"] == 1:
        target = "results/tiles/cohort/notes.zarr"
    else:   # the group that holds notes.tif
        [(group, members)] = [(group, slides) for group, slides in plan_slide_groups(
            workdir / "resources/cohort/manifest.csv", run["slides_per_job"]).members.items()
            if "notes" in slides]
        target = f"results/tiles/cohort/groups/{group}"
    result = run_snakemake(workdir, run["configfile"], "--cores", "1", target,
                           "--config", "on_bad_input=fail")
    assert result.returncode != 0
    if run["slides_per_job"] == 1:
        log = (workdir / "logs/tile_slide/cohort/notes.log").read_text()
        assert "notes.tif: OpenSlide cannot open it" in log and "on_bad_input: skip" in log
    else:  # the group stops at its first bad slide, which may come before notes.tif
        [log] = [path.read_text() for path in (workdir / "logs/tile_slide_group").rglob("*.log")]
        assert re.search(r"slides/(truncated\.tiff|notes\.tif): OpenSlide cannot open it", log)
        assert "on_bad_input: skip" in log
        # the failed group has no output; the slide it finished waits for the rerun
        assert not (workdir / target).exists()
        unfinished = workdir / f"{target}.unfinished"
        ledger = unfinished / "finished.json"
        finished = json.loads(ledger.read_text())["slides"] if ledger.exists() else {}
        assert list(finished) == list(itertools.takewhile(lambda slide: slide not in BAD, members))
        assert all((unfinished / f"{slide}.zarr").is_dir() for slide in finished)
    assert not (workdir / "results/tiles/cohort/notes.zarr").exists()


def test_loader_settings_rerun_nothing_and_feature_settings_rerun_the_features(run):
    """The loader's speed settings are the feature jobs' resources, not params: only
    the report (which shows the config) reruns when they change."""
    workdir, configfile = run["workdir"], run["configfile"]
    n_slides = len(run["good"]) + len(BAD)
    embed, n_jobs = (("extract_features", n_slides) if run["slides_per_job"] == 1 else
                     ("extract_features_group", -(-n_slides // run["slides_per_job"])))

    def dry_run(**features):
        config = yaml.safe_load(configfile.read_text())
        config["features"].update(features)
        changed = workdir / "changed.yaml"
        changed.write_text(yaml.safe_dump(config))
        result = run_snakemake(workdir, changed, "--dry-run", "--printshellcmds",
                               "--set-resources", f"{embed}:loader_workers=3")
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout + result.stderr

    # nor do the slide robustness jobs, which embed perturbed and attacked tiles
    assert job_counts(dry_run(loader_workers=0, prefetch_batches=5)) == {"report": 1, "all": 1}
    output = dry_run(batch_size=8)
    assert job_counts(output)[embed] == n_jobs
    if embed == "extract_features":  # its shell command carries the resource
        commands = re.findall(r"-m medrobust.slide_jobs extract_features .*", output)
        assert len(commands) == n_jobs
        assert all("--loader-workers 3 " in command for command in commands)
