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


def evaluations():
    """Every (model, condition) the report summarises, as records with their files.

    Built from the config alone; summarize and report read paths from here,
    never by re-deriving them.
    """
    records = []
    targets = set(ROBUSTNESS["targets"])
    for model, settings in IMAGE_CLASSIFIERS.items():
        dataset = settings["dataset"]
        conditions = robustness_conditions(model) if model in targets else ["clean"]
        records += [{"family": "image", "model": model, "dataset": dataset, "condition": c,
                     "store": condition_store(dataset, c),
                     **evaluation_files(dataset, model, c)} for c in conditions]
    for model, settings in SLIDE_CLASSIFIERS.items():
        records.append({"family": "slide", "model": model, "dataset": settings["dataset"],
                        "condition": "clean", "store": None,
                        **evaluation_files(settings["dataset"], model, "clean")})
    return records


def evaluation_files(dataset, model, condition):
    stem = f"results/evaluate/{dataset}/{model}/{condition}"
    return {"metrics": f"{stem}.json", "predictions": f"{stem}.csv"}


def all_metrics(wildcards=None):
    """Every metrics JSON and prediction table the summary reads."""
    return {"metrics": [record["metrics"] for record in evaluations()],
            "predictions": [record["predictions"] for record in evaluations()]}


def trained_models(wildcards=None):
    """Every trained model's folder, by name: its config and history feed the report."""
    return {name: f"results/models/{settings['dataset']}/{name}"
            for name, settings in {**IMAGE_CLASSIFIERS, **SLIDE_CLASSIFIERS}.items()}


def model_histories(wildcards=None):
    return [f"{folder}/history.json" for folder in trained_models().values()]


def dataset_folders(wildcards=None):
    """Raw dataset folders (manifest and source, for provenance) of every dataset a model uses."""
    used = {settings["dataset"] for settings in {**IMAGE_CLASSIFIERS, **SLIDE_CLASSIFIERS}.values()}
    return [f"resources/{dataset}" for dataset in sorted(used)]


def image_stores(wildcards=None):
    """Clean image stores of every image dataset a model uses (class counts, left-out inputs)."""
    used = {settings["dataset"] for settings in IMAGE_CLASSIFIERS.values()}
    return [condition_store(dataset, "clean") for dataset in sorted(used)]


def defenses():
    """Each image model's defense ("none" when undefended), for the paired comparisons."""
    return {name: (settings.get("defense") or {}).get("name", "none")
            for name, settings in IMAGE_CLASSIFIERS.items()}


def report_inputs(wildcards=None):
    """Everything the report page reads besides the summary."""
    records = evaluations()
    return {
        "predictions": [record["predictions"] for record in records],
        "stores": sorted({record["store"] for record in records if record["store"]}),
        "histories": model_histories(),
        "datasets": dataset_folders(),
    }
