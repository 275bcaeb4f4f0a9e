"""Real-dataset sources through the real workflow.

- End to end: a small npz in the official MedMNIST layout, served by a local
  HTTP server, goes through download -> preprocess -> train -> attack /
  perturb -> evaluate -> report (tests/configs/medmnist_tiny.yaml).
- `snakemake -n` with each recipe and source type builds the right DAG
  (tests/configs/dry_run/*.yaml); nothing is downloaded in a dry run.
- A broken download fails the workflow with a message naming the URL, and
  leaves no manifest behind.
"""

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from fixtures_http import LocalServer, write_medmnist_npz
from medrobust.data.download import Checksum
from medrobust.data.http import remote_files
from medrobust.data.manifest import read_manifest
from medrobust.data.sources import check_source_settings
from medrobust.io.image_store import open_image_store
from workflow_runner import ROOT, run_snakemake

pytestmark = pytest.mark.workflow

CONFIGS = ROOT / "tests/configs"
MEDMNIST = CONFIGS / "medmnist_tiny.yaml"
PER_SPLIT = {"train": 40, "val": 20, "test": 20}
CLASSES = ["normal", "pneumonia"]          # pneumoniamnist's label dictionary, in index order
NPZ_PATH = "/zenodo-mirror/pneumoniamnist.npz"


def medmnist_config(tmp_path: Path, url: str, md5: str) -> Path:
    """tests/configs/medmnist_tiny.yaml with the served file's URL and md5 filled in."""
    config = yaml.safe_load(MEDMNIST.read_text())
    config["datasets"]["pneumonia"]["source"].update(url=url, md5=md5)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def failure_text(result) -> str:
    return f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"


# --- end to end on a served MedMNIST npz -------------------------------------

@pytest.fixture(scope="module")
def medmnist_run(tmp_path_factory):
    """One workflow run, with the server up in this process for its duration."""
    tmp = tmp_path_factory.mktemp("medmnist")
    npz = write_medmnist_npz(tmp / "pneumoniamnist.npz", n_classes=2, size=28,
                             per_split=PER_SPLIT, seed=3)
    workdir = tmp / "work"
    workdir.mkdir()
    with LocalServer() as server:
        url = server.serve(NPZ_PATH, npz.read_bytes())
        config = medmnist_config(tmp, url, hashlib.md5(npz.read_bytes()).hexdigest())
        result = run_snakemake(workdir, config, "--cores", "2")
    assert result.returncode == 0, failure_text(result)
    return {"workdir": workdir, "npz": npz, "server_log": list(server.log), "url": url}


def test_the_npz_was_fetched_over_http(medmnist_run):
    assert medmnist_run["server_log"] and all(
        path.split("?")[0] == NPZ_PATH for path in medmnist_run["server_log"])
    workdir = medmnist_run["workdir"]
    # the verified file was staged outside the dataset folder; no partial file is left
    staged = workdir / "resources/.downloads/pneumonia/pneumoniamnist.npz"
    assert staged.read_bytes() == medmnist_run["npz"].read_bytes()
    assert not list((workdir / "resources").rglob("*.part"))


def test_manifest_holds_every_npz_sample_with_recipe_labels(medmnist_run):
    workdir = medmnist_run["workdir"]
    manifest = read_manifest(workdir / "resources/pneumonia/manifest.csv")
    assert manifest.classes == CLASSES and manifest.kind == "images"
    table = manifest.table
    assert len(table) == sum(PER_SPLIT.values())
    assert table["split"].value_counts().to_dict() == PER_SPLIT
    with np.load(medmnist_run["npz"]) as arrays:
        for split, count in PER_SPLIT.items():
            rows = table[table["split"] == split].reset_index(drop=True)
            labels = arrays[f"{split}_labels"][:, 0]
            assert list(rows["sample_id"]) == [f"{split}_{i:06d}" for i in range(count)]
            assert list(rows["label"]) == [CLASSES[value] for value in labels]
            # each PNG holds its npz image, and the manifest's sha256 is the file's
            for index in (0, count - 1):
                path = workdir / "resources/pneumonia" / rows["path"][index]
                assert rows["path"][index] == f"images/{split}/{split}_{index:06d}.png"
                np.testing.assert_array_equal(np.asarray(Image.open(path)),
                                              arrays[f"{split}_images"][index])
                assert hashlib.sha256(path.read_bytes()).hexdigest() == rows["sha256"][index]


def test_image_store_keeps_the_npz_splits_and_classes(medmnist_run):
    workdir = medmnist_run["workdir"]
    store = open_image_store(workdir / "results/preprocessed/pneumonia.zarr")
    manifest = pd.read_csv(workdir / "resources/pneumonia/manifest.csv")
    total = sum(PER_SPLIT.values())
    assert store.images.shape == (total, 1, 28, 28)
    assert store.classes == CLASSES and store.attrs["image_size"] == 28
    assert list(store.sample_ids) == list(manifest["sample_id"])
    assert {split: len(store.indices(split)) for split in PER_SPLIT} == PER_SPLIT
    assert list(store.labels[:]) == [CLASSES.index(label) for label in manifest["label"]]
    with np.load(medmnist_run["npz"]) as arrays:
        test_images, _ = store.load("test")
        np.testing.assert_allclose(test_images[:, 0], arrays["test_images"] / 255.0, atol=1 / 255)


def test_report_has_a_row_per_model_and_condition(medmnist_run):
    workdir = medmnist_run["workdir"]
    summary = pd.read_csv(workdir / "results/report/robustness.csv")
    rows = set(zip(summary["model"], summary["condition"]))
    assert rows == {
        ("target", "clean"),
        ("target", "fgsm-eps8-from-target"),
        ("target", "fgsm-eps8-from-source"),
        ("target", "gaussian_noise-severity0.05"),
        ("target", "worst-case-linf-eps8-transfer"),
        ("target", "worst-case-linf-eps8-white-box"),
        ("target", "mean-perturbation"),
        ("source", "clean"),
    }
    assert (summary["dataset"] == "pneumonia").all()
    assert (summary["n"] == PER_SPLIT["test"]).all()
    assert summary["accuracy"].between(0, 1).all()
    html = (workdir / "results/report/index.html").read_text()
    assert "pneumonia" in html and "<img" in html


# --- snakemake -n with each recipe -------------------------------------------

IMAGE_JOBS = {"download": 1, "preprocess_images": 1, "train_image_classifier": 1,
              "evaluate_image_classifier": 1, "summarize": 1, "report": 1, "all": 1}
# the slides a dataset holds are known only once its download checkpoint ran:
# tile_slide / extract_features jobs join the DAG after it; the indexes that list
# them are planned before (their paths do not depend on the slides)
SLIDE_JOBS = {"download": 1, "index_slide_tiles": 1, "index_slide_features": 1,
              "train_slide_classifier": 1, "evaluate_slide_classifier": 1,
              "summarize": 1, "report": 1, "all": 1}
RECIPES = {
    "medmnist": ("chest", IMAGE_JOBS),
    "isic2018": ("skin", IMAGE_JOBS),
    "rsna_pneumonia": ("rsna", IMAGE_JOBS),
    "cbis_ddsm": ("ddsm", IMAGE_JOBS),
    "camelyon16": ("camelyon", SLIDE_JOBS),
    "local": ("xrays", IMAGE_JOBS),
    "http": ("derm", IMAGE_JOBS),
}


def job_stats(output: str) -> dict[str, int]:
    """The `Job stats:` table of a Snakemake (dry) run, without its total."""
    table = output.split("Job stats:", 1)[1]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)\s*$", table, flags=re.MULTILINE))
    counts.pop("total", None)
    return {job: int(count) for job, count in counts.items()}


def downloaded(tmp_path: Path, config: dict):
    """`config` run up to its downloads in tmp_path/work: that folder, and a dry run there
    (a function returning its output)."""
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    workdir = tmp_path / "work"
    workdir.mkdir()
    fetched = run_snakemake(workdir, config_path, "--cores", "1", "--until", "download",
                            timeout=120)
    assert fetched.returncode == 0, failure_text(fetched)

    def dry_run() -> str:
        result = run_snakemake(workdir, config_path, "--dry-run", "--cores", "1", timeout=120)
        assert result.returncode == 0, failure_text(result)
        return result.stdout + result.stderr

    return workdir, dry_run


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_dry_run_shows_the_recipe_dag(recipe, tmp_path):
    dataset, expected = RECIPES[recipe]
    config_path = CONFIGS / "dry_run" / f"{recipe}.yaml"
    config = yaml.safe_load(config_path.read_text())
    assert list(config["datasets"]) == [dataset]
    assert config["datasets"][dataset]["source"]["type"] == recipe

    result = run_snakemake(tmp_path, config_path, "--dry-run", "--cores", "1", timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, failure_text(result)
    assert job_stats(output) == expected
    assert re.search(rf"^checkpoint download:\n(?:    .*\n)*?    wildcards: dataset={dataset}$",
                     output, re.MULTILINE)
    if recipe == "camelyon16":
        # the slides are unknown until the checkpoint ran: no tile or feature job yet
        assert "rule tile_slide" not in output and "rule extract_features" not in output
        assert "DAG of jobs will be updated after completion" in output
        assert "input: <TBD>" in output
    else:
        assert f"output: results/preprocessed/{dataset}.zarr" in output
    # a dry run touches nothing: no data folder, no download
    assert not (tmp_path / "resources").exists()


def test_dry_run_configs_are_valid_for_their_sources():
    """Each dry-run config's source passes its own checks, those the parse runs and, for
    http, its file list's (each entry pinned by a checksum); recipe pins are well formed."""
    for recipe, (dataset, _) in RECIPES.items():
        config = yaml.safe_load((CONFIGS / "dry_run" / f"{recipe}.yaml").read_text())
        source = config["datasets"][dataset]["source"]
        check_source_settings(source)
        if recipe == "http":
            assert all(remote.checksum for remote in remote_files(source["files"], "files"))
        for name, entry in source.get("checksums", {}).items():
            assert Checksum.from_entry(entry, name) is not None


def test_slide_jobs_join_the_dag_once_the_download_checkpoint_ran(http_server, tmp_path):
    """CAMELYON16 from a local mirror: after the download, the dry run has per-slide jobs."""
    config = yaml.safe_load((CONFIGS / "dry_run" / "camelyon16.yaml").read_text())
    source = config["datasets"]["camelyon"]["source"]
    slides = source["slides"]
    files = {f"images/{slide}.tif": f"slide {slide}".encode() for slide in slides}
    files["annotations/tumor_001.xml"] = b"<ASAP_Annotations/>"
    files["evaluation/reference.csv"] = (
        ROOT / "tests/data/recipes/camelyon16/evaluation_reference.csv").read_bytes()
    listing = "".join(f"{hashlib.md5(data).hexdigest()} *{name}\n" for name, data in files.items())
    for name, data in {**files, "checksums.md5": listing.encode()}.items():
        http_server.serve(f"/CAMELYON16/{name}", data)
    source.update(mirror=http_server.base_url + "/CAMELYON16",
                  download={"attempts": 2, "backoff_s": 0})
    workdir, dry_run = downloaded(tmp_path, config)
    assert sorted(read_manifest(workdir / "resources/camelyon/manifest.csv").table["sample_id"]) \
        == sorted(slides)
    output = dry_run()
    assert job_stats(output) == {"tile_slide": 3, "extract_features": 3,
                                 **{job: n for job, n in SLIDE_JOBS.items() if job != "download"}}
    for slide in slides:
        assert f"output: results/tiles/camelyon/{slide}.zarr" in output
        assert f"output: results/features/camelyon/resnet18/{slide}.zarr" in output


def test_an_edited_labels_table_fetches_the_local_dataset_again(tmp_path):
    config = yaml.safe_load((CONFIGS / "dry_run" / "local.yaml").read_text())
    root = tmp_path / "xrays"
    (root / "images").mkdir(parents=True)
    rows = ["filename,finding"]
    for index in range(10):
        Image.new("L", (16, 16), 20 * index).save(root / "images" / f"{index}.png")
        rows.append(f"{index}.png,{'NORMAL' if index % 2 else 'PNEUMONIA'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    config["datasets"]["xrays"]["source"]["root"] = str(root)
    _, dry_run = downloaded(tmp_path, config)
    assert "download" not in job_stats(dry_run())
    (root / "labels.csv").write_text("\n".join(rows).replace("0.png,PNEUMONIA", "0.png,NORMAL"))
    assert job_stats(dry_run())["download"] == 1


# --- a broken download ---------------------------------------------------------

@pytest.mark.parametrize("broken", ["404", "wrong_md5"])
def test_broken_download_fails_clearly_and_leaves_no_manifest(broken, http_server, tmp_path):
    npz = write_medmnist_npz(tmp_path / "pneumoniamnist.npz", per_split={"train": 4, "val": 2,
                                                                          "test": 2})
    body = npz.read_bytes()
    if broken == "404":
        url = http_server.base_url + "/missing/pneumoniamnist.npz"   # nothing served there
        md5 = hashlib.md5(body).hexdigest()
    else:
        url = http_server.serve(NPZ_PATH, body)
        md5 = "0" * 32
    config = medmnist_config(tmp_path, url, md5)
    workdir = tmp_path / "work"
    workdir.mkdir()

    result = run_snakemake(workdir, config, "--cores", "1", timeout=120)
    assert result.returncode != 0, failure_text(result)
    log = (workdir / "logs/download/pneumonia.log").read_text()
    assert url in log, log
    assert "Traceback" not in log, log
    if broken == "404":
        assert "HTTP 404" in log and "check the URL" in log, log
        assert len(http_server.log) == 1   # 404 is not retried
    else:
        assert "md5" in log and "0" * 32 in log and hashlib.md5(body).hexdigest() in log, log
    assert not (workdir / "resources/pneumonia/manifest.csv").exists()
    assert not (workdir / "resources/pneumonia/dataset.json").exists()
    # Snakemake removed the failed checkpoint's folder; no (partial) npz is kept anywhere
    assert not (workdir / "resources/pneumonia").exists()
    assert not [path for path in (workdir / "resources").rglob("*") if path.is_file()]
    assert "logs/download/pneumonia.log" in result.stderr + result.stdout
