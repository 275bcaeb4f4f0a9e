# Config validation, wildcard constraints and the input functions that turn
# the config into the DAG. Everything here is plain Python over `config`.

import csv
import os
import sys
from pathlib import Path

# Jobs import medrobust from this clone's src/, installed or not (e.g. in
# --use-conda environments, which hold only the dependencies).
SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)
os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")])))

from medrobust.config import validate_config
from medrobust.errors import ConfigError


try:
    validate_config(config, workflow.source_path("../schemas/config.schema.yaml"))
except ConfigError as error:
    raise WorkflowError(str(error)) from None


DATASETS = config["datasets"]
IMAGE_CLASSIFIERS = config["image_classifiers"]
SLIDE_CLASSIFIERS = config["slide_classifiers"]
ROBUSTNESS = config["robustness"]
REPORT_HTML = Path("results/report/index.html").resolve()


def _alternatives(names):
    """A wildcard regex matching exactly these names (never the empty string)."""
    return "|".join(sorted(names)) or "(?!)"


wildcard_constraints:
    dataset=_alternatives(DATASETS),
    image_model=_alternatives(IMAGE_CLASSIFIERS),
    slide_model=_alternatives(SLIDE_CLASSIFIERS),
    source=_alternatives(IMAGE_CLASSIFIERS),
    attack=_alternatives(config["attacks"]),
    perturbation=_alternatives(config["perturbations"]),
    eps=r"\d+",
    slide=r"[^/]+",


def dataset_source(wildcards):
    """What the download needs: a change here (and only here) re-fetches."""
    dataset = DATASETS[wildcards.dataset]
    return {"source": dataset["source"], "classes": dataset.get("classes"), "kind": dataset["kind"]}


def manifest_rows(dataset):
    """The downloaded manifest by sample id; known once the download checkpoint ran."""
    folder = checkpoints.download.get(dataset=dataset).output[0]
    with open(Path(folder) / "manifest.csv", newline="") as handle:
        return {row["sample_id"]: row for row in csv.DictReader(handle)}


def slide_record(wildcards):
    """One slide's manifest row, passed to its tiling job."""
    rows = manifest_rows(wildcards.dataset)
    if wildcards.slide not in rows:
        raise WorkflowError(f"slide {wildcards.slide!r} is not in the manifest of {wildcards.dataset!r}")
    return {**rows[wildcards.slide], "slide_id": wildcards.slide}


def slide_feature_stores(wildcards):
    """Every slide's feature store of the model's dataset."""
    dataset = SLIDE_CLASSIFIERS[wildcards.slide_model]["dataset"]
    backbone = config["features"]["backbone"]
    return [
        f"results/features/{dataset}/{backbone}/{slide}.zarr"
        for slide in manifest_rows(dataset)
    ]


def image_model_config(wildcards):
    model = IMAGE_CLASSIFIERS[wildcards.image_model]
    return {**model, "training": {**config["image_training"], **model.get("training", {})}}


def model_files(dataset, model):
    return f"results/models/{dataset}/{model}/model.safetensors"


def image_model_files(wildcards):
    return model_files(IMAGE_CLASSIFIERS[wildcards.image_model]["dataset"], wildcards.image_model)


def attack_settings(wildcards):
    return {k: v for k, v in config["attacks"][wildcards.attack].items() if k != "epsilons"}


# Evaluation conditions: what a target model is fed. `clean` is the
# preprocessed test split; the others are stores of adversarial or perturbed
# test images (docs/architecture.md, "Evaluation").
def attack_conditions(target):
    sources = list(ROBUSTNESS["transfer_sources"]) + ([target] if ROBUSTNESS["white_box"] else [])
    return [
        f"{attack}-eps{eps}-from-{source}"
        for attack, settings in config["attacks"].items()
        for eps in settings["epsilons"]
        for source in sources
    ]


def perturbation_conditions():
    return [
        f"{perturbation}-severity{severity}"
        for perturbation, settings in config["perturbations"].items()
        for severity in settings["severities"]
    ]


def robustness_conditions(target):
    return ["clean"] + attack_conditions(target) + perturbation_conditions()


def condition_store(dataset, condition):
    """The image store a condition names."""
    if condition == "clean":
        return f"results/preprocessed/{dataset}.zarr"
    for attack in config["attacks"]:
        prefix = f"{attack}-eps"
        if condition.startswith(prefix) and "-from-" in condition:
            eps, source = condition[len(prefix) :].split("-from-", 1)
            return f"results/attacks/{dataset}/{attack}/eps{eps}/from_{source}.zarr"
    for perturbation in config["perturbations"]:
        prefix = f"{perturbation}-severity"
        if condition.startswith(prefix):
            severity = condition[len(prefix) :]
            return f"results/perturbations/{dataset}/{perturbation}/severity{severity}.zarr"
    raise WorkflowError(f"unknown evaluation condition {condition!r}")


def all_metrics(wildcards=None):
    """Every metrics JSON the report summarises."""
    paths = []
    targets = set(ROBUSTNESS["targets"])
    for model, settings in IMAGE_CLASSIFIERS.items():
        conditions = robustness_conditions(model) if model in targets else ["clean"]
        paths += [f"results/evaluate/{settings['dataset']}/{model}/{c}.json" for c in conditions]
    for model, settings in SLIDE_CLASSIFIERS.items():
        paths.append(f"results/evaluate/{settings['dataset']}/{model}/clean.json")
    return paths


def report_images(wildcards=None):
    """Stores shown as pictures: the first target's test images, clean and attacked."""
    if not ROBUSTNESS["targets"]:
        return {"clean": [], "adversarial": []}
    target = ROBUSTNESS["targets"][0]
    dataset = IMAGE_CLASSIFIERS[target]["dataset"]
    return {
        "clean": [condition_store(dataset, "clean")],
        "adversarial": [condition_store(dataset, c) for c in attack_conditions(target)],
    }
