"""What produced the numbers: code, libraries, device, data and the config that applies.

A reader of a report months later must be able to tell which commit, which
library versions, which device and which bytes of data stand behind a table.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from medrobust import __version__
from medrobust import conditions as plan
from medrobust.data.manifest import DATASET_NAME, MANIFEST_NAME, read_manifest
from medrobust.io.checksums import sha256_file

# distributions whose versions change numbers or formats, in the order a reader looks
KEY_LIBRARIES = ("snakemake", "torch", "torchvision", "numpy", "scipy", "scikit-learn", "pandas",
                 "zarr", "dask", "pydicom", "openslide-python", "openslide-bin", "tifffile",
                 "imagecodecs", "simplejpeg", "matplotlib", "jinja2")


def git_commit(repository: str | os.PathLike) -> str:
    """The checkout's commit, marked when it has uncommitted changes; else "not a git checkout"."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repository), *args], capture_output=True,
                              text=True, timeout=20, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    return f"{commit} (with uncommitted changes)" if dirty else commit


def library_versions(names: Iterable[str] = KEY_LIBRARIES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def compute_environment() -> dict[str, str]:
    """Python, CUDA and the devices this process sees (the report job's host)."""
    import torch

    cuda = torch.version.cuda or "none (CPU build)"
    if torch.cuda.is_available():
        devices = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        devices = "no GPU visible"
    environment = {"Python": f"{platform.python_version()} ({sys.executable})",
                   "platform": platform.platform(), "CUDA (torch build)": cuda,
                   "GPUs (report host)": devices}
    try:
        import openslide

        environment["OpenSlide library"] = openslide.__library_version__
    except (ImportError, OSError, AttributeError):
        environment["OpenSlide library"] = "not available"
    return environment


def dataset_provenance(folder: str | os.PathLike, config: Mapping[str, Any]) -> dict[str, Any]:
    """A raw dataset's source (from the config), manifest checksum and size."""
    folder = Path(folder)
    manifest = read_manifest(folder / MANIFEST_NAME)
    source = dict((config.get("datasets", {}).get(folder.name) or {}).get("source") or {})
    return {"dataset": folder.name, "kind": manifest.kind, "samples": len(manifest.table),
            "classes": manifest.classes, "source": source,
            "manifest_sha256": sha256_file(manifest.path),
            "dataset_json_sha256": sha256_file(folder / DATASET_NAME)}


def class_counts(labels: Iterable[str], splits: Iterable[str]) -> pd.DataFrame:
    """Samples per class (rows) and split (columns), with totals."""
    table = pd.crosstab(pd.Series(list(labels), name="class"),
                        pd.Series(list(splits), name="split"))
    order = [split for split in ("train", "val", "test") if split in table.columns]
    table = table[order]
    table["all"] = table.sum(axis=1)
    return table


# the config's sections that act on every run; every other one holds a stage's settings
# (`stages_run`), and tests/test_report.py checks the two cover the schema's sections
EVERY_RUN = ("device", "seed", "on_bad_input", "datasets", "report")


def stages_run(config: Mapping[str, Any]) -> dict[str, bool]:
    """Whether each stage a config section sets ran, by section: where the workflow plans the
    stage's jobs with a `medrobust.conditions` function, from that function."""
    image_models = dict(config.get("image_classifiers") or {})
    slide_models = dict(config.get("slide_classifiers") or {})
    attacked = bool((config.get("robustness") or {}).get("targets"))
    return {"image_classifiers": bool(image_models), "image_training": bool(image_models),
            "denoisers": any(model.get("denoiser") for model in image_models.values()),
            "slide_classifiers": bool(slide_models), "features": bool(slide_models),
            "slide_attention": bool((config.get("slide_attention") or {}).get("models")),
            "slide_robustness": bool(plan.slide_robustness_models(config)),
            "attacks": attacked, "perturbations": attacked, "robustness": attacked,
            "fourier_heatmap": bool(plan.fourier_heatmap_tables(config)),
            "lesion_visibility": bool(plan.plan_lesion_visibility(
                config, plan.plan_evaluations(config)))}


def applicable_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config without the parts that did not act on this run.

    The settings of every stage that did not run (`stages_run`), datasets no
    model uses and a dataset's keys for the other kind of data are left out.
    """
    image_models = dict(config.get("image_classifiers") or {})
    slide_models = dict(config.get("slide_classifiers") or {})
    used = {settings["dataset"] for settings in {**image_models, **slide_models}.values()}
    datasets = {}
    for name, settings in (config.get("datasets") or {}).items():
        if name not in used:
            continue
        other_kind = "tiling" if settings.get("kind") == "images" else "preprocess"
        datasets[name] = {key: value for key, value in settings.items() if key != other_kind}
    ran = stages_run(config)
    return {key: datasets if key == "datasets" else value for key, value in config.items()
            if key in EVERY_RUN or ran.get(key, True)}


def provenance(repository: str | os.PathLike, dataset_folders: Iterable[str | os.PathLike],
               config: Mapping[str, Any], training_devices: Mapping[str, str]) -> dict[str, Any]:
    """Everything the report's provenance section lists."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "medrobust": __version__,
        "git commit": git_commit(repository),
        "environment": compute_environment(),
        "libraries": library_versions(),
        "device setting": str(config.get("device", "auto")),
        "training devices": dict(training_devices),
        "datasets": [dataset_provenance(folder, config) for folder in dataset_folders],
    }
