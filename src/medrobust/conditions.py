"""Evaluation conditions as records, built once from the config, and their paths.

A condition is what a target model is fed: the clean test split, adversarial
test images (an attack at a budget ε, crafted on a source model) or perturbed
test images (a perturbation at a severity). The workflow builds every
condition from the config here and derives everything else from the record:
the evaluation's name and files, and the image store it reads. Nothing splits
a name back into its parts.

Path templates are the rules' output patterns too (workflow/rules/*.smk), so
a path is spelled in one place. One job covers a whole run: every attack at
every budget from one source model, every severity of a perturbation, every
condition of one model's evaluation. Each run is a folder written at once, holding one
store (or one pair of tables) per budget, severity or condition: a job costs
seconds of start-up, a few times what a small one computes.

Numbers become path parts through `number_label`: integers as written,
decimals in positional notation (ε = 2.5 -> `eps2.5.zarr`, severity 1e-05 ->
`severity0.00001.zarr`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any, Mapping

from medrobust.errors import ConfigError

CLEAN_STORE = "results/preprocessed/{dataset}.zarr"
ATTACK_RUN = "results/attacks/{dataset}/from_{source}"
ATTACK_STORE = "{attack}-eps{eps}.zarr"  # in ATTACK_RUN, one per attack and budget
PERTURBATION_RUN = "results/perturbations/{dataset}/{perturbation}"
PERTURBATION_STORE = "severity{severity}.zarr"  # in PERTURBATION_RUN, one per severity
EVALUATION_RUN = "results/evaluate/{dataset}/{model}"
DETECTOR_FILE = "detector.json"  # in EVALUATION_RUN, for a model with MagNet's detector
# in EVALUATION_RUN, every model's: the threshold chosen on its clean val predictions
OPERATING_POINT_FILE = "operating_point.json"
FOURIER_HEATMAP = "results/fourier_heatmap/{dataset}/{model}.csv"
LESION_VISIBILITY_RUN = "results/lesion_visibility/{dataset}"
LOWPASS = "lowpass"  # the perturbation the lesion visibility analysis sweeps
# slide robustness (docs/mil.md): perturbed tile features shared by a dataset's models, and
# each slide model's tile-fraction and adversarial-tile run
SLIDE_PERTURBATION_RUN = "results/slide_perturbations/{dataset}/{backbone}/{tile_perturbation}"
SLIDE_ROBUSTNESS_RUN = "results/slide_robustness/{dataset}/{model}"


def number_label(value: int | float) -> str:
    """A budget or severity as a path part: `8`, `2.5`, `0.05`, `0.00001`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"expected a number, not {value!r}")
    if isinstance(value, int):
        text = str(value)
    else:
        if not math.isfinite(value):
            raise ConfigError(f"expected a finite number, not {value!r}")
        text = repr(value)
        if "e" in text:  # 1e-05 -> 0.00001: no exponent in paths
            text = format(Decimal(text), "f")
    if text.startswith("-"):
        raise ConfigError(f"expected a number >= 0, not {value!r}")
    return text


def attack_store_name(attack: str, epsilon: int | float) -> str:
    """The store of one attack and budget inside an attack run: `fgsm-eps8.zarr`."""
    return ATTACK_STORE.format(attack=attack, eps=number_label(epsilon))


def perturbation_store_name(severity: int | float) -> str:
    """The store of one severity inside a perturbation run: `severity0.05.zarr`."""
    return PERTURBATION_STORE.format(severity=number_label(severity))


@dataclass(frozen=True)
class Condition:
    """One evaluation condition; `kind` is clean, attack or perturbation."""

    kind: str
    attack: str | None = None
    epsilon: int | float | None = None   # in the attack's units (1/255 for L-infinity)
    source: str | None = None            # the model the attack is crafted on
    perturbation: str | None = None
    severity: int | float | None = None

    @property
    def name(self) -> str:
        """The evaluation's file stem: `clean`, `fgsm-eps8-from-surrogate`, `gaussian_noise-severity0.1`."""
        if self.kind == "clean":
            return "clean"
        if self.kind == "attack":
            return f"{self.attack}-eps{number_label(self.epsilon)}-from-{self.source}"
        return f"{self.perturbation}-severity{number_label(self.severity)}"

    def run(self, dataset: str) -> str:
        """The job output that holds this condition's store: the clean store itself, or
        the folder of a whole attack run (every attack and budget from one source) or
        perturbation run (every severity)."""
        if self.kind == "clean":
            return CLEAN_STORE.format(dataset=dataset)
        if self.kind == "attack":
            return ATTACK_RUN.format(dataset=dataset, source=self.source)
        return PERTURBATION_RUN.format(dataset=dataset, perturbation=self.perturbation)

    def store(self, dataset: str) -> str:
        """The image store of `dataset` this condition feeds the model."""
        if self.kind == "clean":
            return self.run(dataset)
        if self.kind == "attack":
            return f"{self.run(dataset)}/{attack_store_name(self.attack, self.epsilon)}"
        return f"{self.run(dataset)}/{perturbation_store_name(self.severity)}"

    def record(self) -> dict[str, Any]:
        return {"condition": self.name, **asdict(self)}


CLEAN = Condition("clean")


def attack_conditions(config: Mapping[str, Any], target: str) -> list[Condition]:
    """Every attack, budget and source model the config asks for against `target`."""
    robustness = config.get("robustness", {})
    sources = list(robustness.get("transfer_sources", []))
    if robustness.get("white_box", True) and target not in sources:
        sources.append(target)
    return [Condition("attack", attack=attack, epsilon=epsilon, source=source)
            for attack, settings in config.get("attacks", {}).items()
            for epsilon in settings["epsilons"]
            for source in sources]


def perturbation_conditions(config: Mapping[str, Any]) -> list[Condition]:
    return [Condition("perturbation", perturbation=perturbation, severity=severity)
            for perturbation, settings in config.get("perturbations", {}).items()
            for severity in settings["severities"]]


def model_conditions(config: Mapping[str, Any], model: str) -> list[Condition]:
    """The conditions an image model is evaluated under: all of them for a target, else clean."""
    if model not in config.get("robustness", {}).get("targets", []):
        return [CLEAN]
    return [CLEAN, *attack_conditions(config, model), *perturbation_conditions(config)]


def all_conditions(config: Mapping[str, Any]) -> dict[str, Condition]:
    """Every condition of every image model, by name; two conditions sharing a name are refused."""
    conditions: dict[str, Condition] = {}
    clashes = []
    for model in config.get("image_classifiers", {}):
        for condition in model_conditions(config, model):
            known = conditions.setdefault(condition.name, condition)
            if known != condition:
                clashes.append(f"{_describe(known)} and {_describe(condition)} would both be "
                               f"evaluated as {condition.name!r}; rename one")
    if clashes:
        raise ConfigError("; ".join(sorted(set(clashes))))
    return conditions


def _describe(condition: Condition) -> str:
    if condition.kind == "attack":
        return (f"attack {condition.attack!r} at {number_label(condition.epsilon)} "
                f"from {condition.source!r}")
    return f"perturbation {condition.perturbation!r} at {number_label(condition.severity)}"


def evaluation_tables(condition: str) -> dict[str, str]:
    """The files of one condition in an evaluation run: metrics JSON and predictions CSV."""
    return {"metrics": f"{condition}.json", "predictions": f"{condition}.csv"}


def evaluation_files(dataset: str, model: str, condition: str) -> dict[str, str]:
    """The evaluation run (the job output) of `model`, its tables for `condition` and the
    model's operating point."""
    run = EVALUATION_RUN.format(dataset=dataset, model=model)
    return {"evaluation_run": run, "operating_point": f"{run}/{OPERATING_POINT_FILE}",
            **{kind: f"{run}/{name}" for kind, name in evaluation_tables(condition).items()}}


def plan_evaluations(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every (model, condition) the report summarises, as records with their files.

    A record holds `family, model, dataset`, the condition's fields (`condition`
    (its name), `kind, attack, epsilon, source, perturbation, severity`), the
    image `store` it reads (None for slide models) and its `metrics` and
    `predictions` files, the model's `operating_point` file, and the job outputs
    that hold them: `store_run` (see `Condition.run`; None for slide models) and
    `evaluation_run`. Two
    conditions that would share a name are refused (`all_conditions`).
    """
    all_conditions(config)
    records = []
    for model, settings in config.get("image_classifiers", {}).items():
        dataset = settings["dataset"]
        for condition in model_conditions(config, model):
            records.append({"family": "image", "model": model, "dataset": dataset,
                            **condition.record(), "store": condition.store(dataset),
                            "store_run": condition.run(dataset),
                            **evaluation_files(dataset, model, condition.name)})
    for model, settings in config.get("slide_classifiers", {}).items():
        dataset = settings["dataset"]
        records.append({"family": "slide", "model": model, "dataset": dataset,
                        **CLEAN.record(), "store": None, "store_run": None,
                        **evaluation_files(dataset, model, CLEAN.name)})
    return records


def model_condition_stores(config: Mapping[str, Any], model: str) -> dict[str, str]:
    """An image model's evaluation conditions: name -> the store it reads."""
    dataset = config["image_classifiers"][model]["dataset"]
    return {condition.name: condition.store(dataset)
            for condition in model_conditions(config, model)}


def model_condition_runs(config: Mapping[str, Any], model: str) -> list[str]:
    """The job outputs an image model's evaluation reads (each once)."""
    dataset = config["image_classifiers"][model]["dataset"]
    return list(dict.fromkeys(condition.run(dataset)
                              for condition in model_conditions(config, model)))


def fourier_heatmap_tables(config: Mapping[str, Any]) -> dict[str, str]:
    """The Fourier heat map of each robustness target, by model, when the config asks for them
    (a `fourier_heatmap` section); else none."""
    if config.get("fourier_heatmap") is None:
        return {}
    return {model: FOURIER_HEATMAP.format(dataset=config["image_classifiers"][model]["dataset"],
                                          model=model)
            for model in config.get("robustness", {}).get("targets", [])}
def has_lesion_annotations(source: Mapping[str, Any]) -> bool:
    """Whether a dataset's source writes a lesion table (read by `medrobust.data.lesions`)."""
    return (source.get("type") == "cbis_ddsm"
            or (source.get("type") == "synthetic" and source.get("modality") == "mammography"))


def plan_lesion_visibility(config: Mapping[str, Any],
                           evaluations: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per image dataset with lesion annotations and a low-pass sweep: what its analysis reads.

    Each entry: `run` (the job's output folder), `radii` (the low-pass
    severities), `evaluations` (`model, severity, metrics, predictions` of the clean
    and low-pass conditions of every model evaluated under low-pass) and
    `evaluation_runs` (the job outputs holding them).
    """
    if LOWPASS not in config.get("perturbations", {}):
        return {}
    plans = {}
    for dataset, settings in config["datasets"].items():
        if settings["kind"] != "images" or not has_lesion_annotations(settings["source"]):
            continue
        swept = {record["model"] for record in evaluations if record["dataset"] == dataset
                 and record["perturbation"] == LOWPASS}
        if not swept:
            continue
        records = [record for record in evaluations if record["model"] in swept
                   and record["kind"] in ("clean", "perturbation")
                   and record["perturbation"] in (None, LOWPASS)]
        plans[dataset] = {
            "run": LESION_VISIBILITY_RUN.format(dataset=dataset),
            "radii": list(config["perturbations"][LOWPASS]["severities"]),
            "evaluations": [{key: record[key]
                             for key in ("model", "severity", "metrics", "predictions")}
                            for record in records],
            "evaluation_runs": sorted({record["evaluation_run"] for record in records}),
        }
    return plans


def slide_robustness_models(config: Mapping[str, Any]) -> list[str]:
    """The slide models `slide_robustness.models` names (left out: every slide model), sorted;
    none without a `slide_robustness` section."""
    section = config.get("slide_robustness")
    if section is None:
        return []
    models = section.get("models")
    return [name for name in sorted(config.get("slide_classifiers", {}))
            if models is None or name in models]
