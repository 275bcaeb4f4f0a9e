# Config validation, wildcard constraints and the input functions that turn
# the config into the DAG. Everything here is plain Python over `config`.

import json
import os
import re
import sys
from pathlib import Path

from snakemake_interface_executor_plugins.settings import DeploymentMethod

# Jobs import medrobust from this clone's src/, installed or not (e.g. in
# --use-conda environments, which hold only the dependencies).
SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)
os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")])))

# The per-slide rules' shell command (medrobust.slide_jobs) runs the Python a script
# would: this one, or under --sdm conda the environment's `python`, and finds the
# package in src/ by its own variable, since Snakemake drops PYTHONPATH for conda jobs.
# Variables rather than paths in the command: the command is the rules' code to
# Snakemake's rerun triggers, and a moved clone or venv must not rerun every slide.
os.environ.update(MEDROBUST_SRC=SRC)
_deployment = getattr(workflow, "deployment_settings", None)
if _deployment is not None and DeploymentMethod.CONDA in _deployment.deployment_method:
    os.environ.pop("MEDROBUST_PYTHON", None)
else:
    os.environ.update(MEDROBUST_PYTHON=sys.executable)


def slide_job_command(arguments):
    """A per-slide rule's shell command: medrobust.slide_jobs with `arguments`, a shell
    template (`{params.job:q}` and the like)."""
    return " ".join(['PYTHONPATH="$MEDROBUST_SRC${{PYTHONPATH:+:$PYTHONPATH}}"',
                     '"${{MEDROBUST_PYTHON:-python}}" -m medrobust.slide_jobs', arguments])

from medrobust import conditions as plan
from medrobust.config import (DENOISER_MODEL_KEYS, FEATURE_LOADER_KEYS, FEATURE_WEIGHTS, PRETRAINED,
                              defense_labels, image_training, mil_baselines, validate_config)
from medrobust.errors import ConfigError
from medrobust.fingerprint import code_fingerprint as _package_fingerprint
from medrobust.io.manifest_cache import manifest_rows as read_manifest_rows
from medrobust.slide_groups import GROUP_PATTERN, GROUPS_FOLDER, plan_slide_groups


# Every problem of the config, before any job (and before Snakemake deletes any
# output): keys, types, cross-references and every name that selects code, against
# the package's registries. A config that passed those with this code is
# remembered under .snakemake/medrobust/, which spares the next parse the imports.
try:
    validate_config(
        config,
        workflow.source_path("../schemas/config.schema.yaml"),
        cache_dir=Path(".snakemake/medrobust"),
    )
    EVALUATIONS = plan.plan_evaluations(config)  # every (model, condition), with its files
    LESION_PLANS = plan.plan_lesion_visibility(config, EVALUATIONS)  # by dataset
except ConfigError as error:
    raise WorkflowError(str(error)) from None


DATASETS = config["datasets"]
IMAGE_CLASSIFIERS = config["image_classifiers"]
SLIDE_CLASSIFIERS = config["slide_classifiers"]
DENOISERS = config["denoisers"]
DENOISER_RUN = "results/denoisers/{dataset}/{denoiser}"  # train_denoiser's output folder
REPORT_HTML = Path("results/report/index.html").resolve()
# slide datasets tiled and embedded one slide per job, or in groups (slides_per_job > 1)
SLIDES_GROUPED = sorted(name for name, dataset in DATASETS.items()
                        if dataset["kind"] == "slides" and dataset["slides_per_job"] > 1)
SLIDES_ONE_PER_JOB = sorted(name for name, dataset in DATASETS.items()
                            if dataset["kind"] == "slides" and name not in SLIDES_GROUPED)
ATTENTION_RUN = "results/attention/{dataset}/{slide_model}"  # slide_attention's output folder
# a slide dataset's stores in one file, read by every job that needs all of them
# (medrobust.slide_index: one DAG edge per job instead of one per slide)
TILE_INDEX = "results/tiles/{dataset}/index.csv"
FEATURE_INDEX = "results/features/{dataset}/{backbone}/index.csv"
CONFIGURED_FEATURE_INDEX = FEATURE_INDEX.format(dataset="{dataset}", backbone=config["features"]["backbone"])


def _alternatives(names):
    """A wildcard regex matching exactly these names (never the empty string)."""
    return "|".join(re.escape(name) for name in sorted(names)) or "(?!)"


wildcard_constraints:
    dataset=_alternatives(DATASETS),
    image_model=_alternatives(IMAGE_CLASSIFIERS),
    slide_model=_alternatives(SLIDE_CLASSIFIERS),
    denoiser=_alternatives(DENOISERS),
    source=_alternatives(IMAGE_CLASSIFIERS),
    perturbation=_alternatives(config["perturbations"]),
    tile_perturbation=_alternatives(config.get("slide_robustness", {}).get("perturbations", {})),
    backbone=_alternatives([config["features"]["backbone"]]),
    slide=r"[^/]+",
    group=GROUP_PATTERN,
    fold=r"\d+",


# On a busy machine, jobs that head the longest remaining chains start first (what
# keeps every core busy to the end): the image store and image training (then attacks,
# evaluation), then the slide study's one chain (tiles, features, base model, MHIM-MIL
# student, attention). Left to itself, the scheduler ran attacks before the last
# trainings and the slide chain last, each time with one core idle (docs/architecture.md).
IMAGE_TRAINING_PRIORITY = 8
SLIDE_STUDY_PRIORITY = 5


# The settings of every bootstrap interval a job computes (seeded, so reruns agree)
INTERVAL_SETTINGS = {
    "bootstrap_resamples": config["report"]["bootstrap_resamples"],
    "confidence": config["report"]["confidence"],
    "seed": config["seed"],
}
# ...and of the paired comparisons' tests, for the jobs that compare (report.alpha)
COMPARISON_SETTINGS = {**INTERVAL_SETTINGS, "alpha": config["report"]["alpha"]}


def code_fingerprint(*subpackages):
    """A rule's `params: code=`: editing these medrobust subpackages reruns the rule.

    Hashes the source files of this clone's src/medrobust/<subpackage>; Snakemake
    reruns a job whose params changed, and what follows it through its outputs.
    """
    return _package_fingerprint(*subpackages, root=SRC)


def dataset_source(wildcards):
    """What the download needs: a change here (and only here) re-fetches."""
    dataset = DATASETS[wildcards.dataset]
    return {"source": dataset["source"], "classes": dataset.get("classes"), "kind": dataset["kind"]}


def source_files(wildcards):
    """A local source's labels table, the download's input: editing it fetches the dataset
    again (the files it names are checked against their sha256 when read). A table that
    is not there is the download's to name."""
    source = DATASETS[wildcards.dataset]["source"]
    if source["type"] != "local":  # the settings passed check_source_settings at parse
        return []
    table = Path(source["root"]).expanduser() / source["labels"]["table"]
    return [str(table)] if table.is_file() else []


def manifest_rows(dataset):
    """The downloaded manifest by sample id; known once the download checkpoint ran."""
    folder = checkpoints.download.get(dataset=dataset).output[0]
    return read_manifest_rows(Path(folder) / "manifest.csv")


def slide_record(wildcards):
    """One slide's manifest row, passed to its tiling job."""
    rows = manifest_rows(wildcards.dataset)
    if wildcards.slide not in rows:
        raise WorkflowError(f"slide {wildcards.slide!r} is not in the manifest of {wildcards.dataset!r}")
    return {**rows[wildcards.slide], "slide_id": wildcards.slide}


def slide_groups(dataset):
    """The dataset's slides in groups of `slides_per_job` (medrobust.slide_groups)."""
    folder = checkpoints.download.get(dataset=dataset).output[0]
    return plan_slide_groups(Path(folder) / "manifest.csv", DATASETS[dataset]["slides_per_job"])


def group_members(wildcards):
    """The slide ids of one group."""
    members = slide_groups(wildcards.dataset).members
    if wildcards.group not in members:
        raise WorkflowError(f"{wildcards.group!r} is not a slide group of {wildcards.dataset!r} "
                            f"(it has {len(members)})")
    return members[wildcards.group]


def group_slide_records(wildcards):
    """The manifest rows of a group's slides, passed to its tiling job."""
    rows = manifest_rows(wildcards.dataset)
    return [{**rows[slide], "slide_id": slide} for slide in group_members(wildcards)]


def slide_datasets():
    """The slide datasets some slide classifier uses."""
    return sorted({settings["dataset"] for settings in SLIDE_CLASSIFIERS.values()})


# Where each slide's tiling and feature outputs are: `{stage}/{slide}.{suffix}` with a
# job per slide, `{stage}/groups/{group}/{slide}.{suffix}` with slides in groups
# (medrobust.slide_groups). The dataset's indexes list them; nothing else needs them.
TILES_STAGE = "results/tiles/{dataset}"
FEATURES_STAGE = "results/features/{dataset}/{backbone}"


def slide_outputs(stage, suffix, wildcards):
    """Every slide's output of `stage` with `suffix` (zarr, qc.png), in manifest order."""
    folder = stage.format(**dict(wildcards.items()))
    slides = manifest_rows(wildcards.dataset)
    if wildcards.dataset not in SLIDES_GROUPED:
        return [f"{folder}/{slide}.{suffix}" for slide in slides]
    group_of = slide_groups(wildcards.dataset).group_of
    return [f"{folder}/{GROUPS_FOLDER}/{group_of[slide]}/{slide}.{suffix}" for slide in slides]


def stage_jobs_outputs(stage):
    """Input function of an index: what the stage's jobs write, a store per slide or a
    folder per group (a QC picture comes from the same job as its tile store)."""
    def outputs(wildcards):
        if wildcards.dataset not in SLIDES_GROUPED:
            return slide_outputs(stage, "zarr", wildcards)
        folder = stage.format(**dict(wildcards.items()))
        return [f"{folder}/{GROUPS_FOLDER}/{group}" for group in slide_groups(wildcards.dataset).members]
    return outputs


def slide_model_folder(wildcards, model=None):
    """A slide model's folder, or with a {fold} wildcard its cross-validation fold's."""
    folder = f"results/models/{wildcards.dataset}/{model or wildcards.slide_model}"
    return f"{folder}/folds/{wildcards.fold}" if "fold" in wildcards.keys() else folder


def tile_perturbations():
    """The tile perturbations of `slide_robustness`, by name."""
    return config["slide_robustness"]["perturbations"]


def slide_perturbation_runs(wildcards):
    """Each tile perturbation's run of the dataset, by perturbation name."""
    return {name: plan.SLIDE_PERTURBATION_RUN.format(dataset=wildcards.dataset,
                                                      backbone=config["features"]["backbone"],
                                                      tile_perturbation=name)
            for name in tile_perturbations()}


def slide_robustness_runs(wildcards=None):
    """The robustness run of each slide model `slide_robustness.models` names (left out: every
    slide model); none without a `slide_robustness` section."""
    return [plan.SLIDE_ROBUSTNESS_RUN.format(dataset=SLIDE_CLASSIFIERS[name]["dataset"],
                                             model=name)
            for name in plan.slide_robustness_models(config)]


def slide_robustness_settings(wildcards):
    """What decides a model's robustness run: `slide_robustness` without the list of models."""
    return {key: value for key, value in config["slide_robustness"].items() if key != "models"}


def attention_runs(wildcards=None):
    """The attention analysis folder of every slide classifier `slide_attention` names."""
    return [ATTENTION_RUN.format(dataset=SLIDE_CLASSIFIERS[model]["dataset"], slide_model=model)
            for model in config["slide_attention"]["models"]]


def mhim_teacher_weights(wildcards):
    """An MHIM-MIL model's teacher weights (so its train job runs first), of the same fold
    for a fold's model; none otherwise."""
    mhim = SLIDE_CLASSIFIERS[wildcards.slide_model].get("mhim")
    if mhim is None:
        return []
    return f"{slide_model_folder(wildcards, mhim['teacher'])}/model.safetensors"


def slide_model_config(wildcards):
    """What trains a slide classifier, with its dataset's classes. `cv_folds` reaches only
    its fold jobs, so setting it retrains nothing trained on the dataset's own splits."""
    model = dict(SLIDE_CLASSIFIERS[wildcards.slide_model])
    folds = model.pop("cv_folds", None)
    if "fold" in wildcards.keys():
        if folds is None or int(wildcards.fold) >= folds:
            raise WorkflowError(f"{wildcards.slide_model!r} has no cross-validation fold "
                                f"{wildcards.fold} (cv_folds: {folds})")
        model["cv_folds"] = folds
    return {**model, "classes": DATASETS[wildcards.dataset].get("classes")}


def cv_fold_weights(wildcards):
    """Every cross-validation fold's weights of a slide model."""
    folds = SLIDE_CLASSIFIERS[wildcards.slide_model].get("cv_folds") or 0
    return [f"results/models/{wildcards.dataset}/{wildcards.slide_model}/folds/{fold}/"
            "model.safetensors" for fold in range(folds)]


def cv_results(wildcards=None):
    """The cross-validation summary of every slide model with cv_folds, for the report."""
    return [f"results/cv/{settings['dataset']}/{name}.json"
            for name, settings in sorted(SLIDE_CLASSIFIERS.items()) if settings.get("cv_folds")]


def image_model_config(wildcards):
    """What trains an image classifier: its entry without the denoiser it later sits behind
    (adding one retrains nothing), with `image_training` under its own overrides."""
    model = {key: value for key, value in IMAGE_CLASSIFIERS[wildcards.image_model].items()
             if key != "denoiser"}
    return {**model, "training": image_training(config, model)}


def pretrained_weights_file(wildcards):
    """A model's local pretrained weights file, if it names one: an input, so a newer
    file retrains it."""
    pretrained = IMAGE_CLASSIFIERS[wildcards.image_model]["pretrained"]
    return [] if pretrained in PRETRAINED else [pretrained]


# The backbone's local weights file, if `features.weights` names one: an input, so a
# newer file re-extracts the features. Constants, not input functions: the feature
# jobs are one per slide, and Snakemake calls a function once per job.
FEATURE_WEIGHTS_FILE = ([] if config["features"]["weights"] in FEATURE_WEIGHTS
                        else [config["features"]["weights"]])
# what decides a slide's features: `features` without the loader's speed settings
FEATURE_PARAMS = {key: value for key, value in config["features"].items()
                  if key not in FEATURE_LOADER_KEYS}
# ... and those settings, as resources of the feature jobs: how a job runs, not what
# it computes, so changing them (or `--set-resources`) reruns nothing
FEATURE_LOADER = {key: config["features"][key] for key in FEATURE_LOADER_KEYS}
# what the per-slide feature job computes with, for its shell command (medrobust.slide_jobs)
FEATURE_JOB = json.dumps({"features": FEATURE_PARAMS, "device": config["device"]})


def denoiser_folder(model):
    """The folder of the pixel denoiser an image model sits behind when evaluated and
    attacked, or None."""
    name = IMAGE_CLASSIFIERS[model].get("denoiser")
    if name is None:
        return None
    return DENOISER_RUN.format(dataset=DENOISERS[name]["dataset"], denoiser=name)


def denoiser_weights(model):
    """The denoiser's weights, an input of the model's evaluation and of attacks crafted on it."""
    folder = denoiser_folder(model)
    return [] if folder is None else [f"{folder}/model.safetensors"]


def detector_settings(model):
    """MagNet's detector on the model's reformer (fitted in its evaluation), or None."""
    name = IMAGE_CLASSIFIERS[model].get("denoiser")
    return None if name is None else DENOISERS[name].get("detector")


def denoiser_training(wildcards):
    """A denoiser's settings as its training reads them: the detector only acts at evaluation,
    so changing it retrains nothing."""
    return {key: value for key, value in DENOISERS[wildcards.denoiser].items() if key != "detector"}


def denoiser_models(wildcards):
    """The model folders of the classifiers a denoiser's training needs, by setting (HGD's
    guide and source)."""
    settings = DENOISERS[wildcards.denoiser]
    return {key: trained_models()[settings[key]] for key in DENOISER_MODEL_KEYS if key in settings}


def denoiser_inputs(wildcards):
    """A denoiser training's inputs: the clean store and its classifiers' weights, by setting."""
    return {"images": plan.CLEAN.store(wildcards.dataset),
            **{key: f"{folder}/model.safetensors"
               for key, folder in denoiser_models(wildcards).items()}}


def evaluations():
    """Every (model, condition) the report summarises, as records with their files.

    Built from the config alone; summarize and report read paths from here,
    never by re-deriving them.
    """
    return EVALUATIONS


def evaluation_runs(wildcards=None):
    """Every evaluation run (one per model) whose metrics and predictions the summary reads."""
    return sorted({record["evaluation_run"] for record in evaluations()})


def trained_models(wildcards=None):
    """Every trained model's folder, by name: its config and history feed the report."""
    return {name: f"results/models/{settings['dataset']}/{name}"
            for name, settings in {**IMAGE_CLASSIFIERS, **SLIDE_CLASSIFIERS}.items()}


def model_histories(wildcards=None):
    return [f"{folder}/history.json" for folder in trained_models().values()]


def dataset_folders(wildcards=None):
    """Raw dataset folders (manifest and source: provenance, and the groups the summary's
    clustered statistics read) of every dataset a model uses."""
    used = {settings["dataset"] for settings in {**IMAGE_CLASSIFIERS, **SLIDE_CLASSIFIERS}.values()}
    return [f"resources/{dataset}" for dataset in sorted(used)]


def defenses():
    """Each image model's defenses ("none" when undefended) and each MHIM-MIL slide model's
    "MHIM-MIL", for the paired comparisons."""
    return defense_labels(config)


def perturbation_settings(name, entries=None):
    """A perturbation's settings besides its severities (e.g. fourier_basis's frequency), from
    `entries` (default: the `perturbations` section)."""
    entries = config["perturbations"] if entries is None else entries
    return {key: value for key, value in entries[name].items() if key != "severities"}
def lesion_visibility_runs():
    """The lesion visibility analyses the report shows, one folder per dataset."""
    return [settings["run"] for _, settings in sorted(LESION_PLANS.items())]


def report_inputs(wildcards=None):
    """Everything the report page reads besides the summary."""
    records = evaluations()
    return {
        "evaluations": evaluation_runs(),
        "lesion_visibility": lesion_visibility_runs(),
        "stores": sorted({record["store_run"] for record in records if record["store_run"]}),
        "histories": model_histories(),
        "datasets": dataset_folders(),
        # left-out slides' reasons and the QC pictures
        "tile_indexes": [TILE_INDEX.format(dataset=dataset) for dataset in slide_datasets()],
        "heatmaps": list(plan.fourier_heatmap_tables(config).values()),
        "attention": attention_runs(),
    }


def report_is_current():
    """Whether this run made or confirmed the report: its job is in the DAG and the page exists.

    False after `snakemake some/target` that does not lead to the report, and
    when the page is missing (e.g. after --touch).
    """
    dag = workflow.dag
    return (dag is not None and REPORT_HTML.is_file()
            and any(job.rule.name == "report" for job in dag.jobs))
