"""Evaluation conditions as records, built once from the config, and their paths.

A condition is what a target model is fed: the clean test split, adversarial
test images (an attack at a budget ε, crafted on a source model) or perturbed
test images (a perturbation at a severity). The workflow builds every
condition from the config here and derives everything else from the record:
the evaluation's name and files, and the image store it reads. Nothing splits
a name back into its parts.

Path templates are the rules' output patterns too (workflow/rules/*.smk), so
a path is spelled in one place. Numbers become path parts through
`number_label`: integers as written, decimals in positional notation
(ε = 2.5 -> `eps2.5`, severity 1e-05 -> `severity0.00001`), matched by the
`NUMBER` wildcard pattern.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any, Mapping

from medrobust.errors import ConfigError

CLEAN_STORE = "results/preprocessed/{dataset}.zarr"
ATTACK_STORE = "results/attacks/{dataset}/{attack}/eps{eps}/from_{source}.zarr"
PERTURBATION_STORE = "results/perturbations/{dataset}/{perturbation}/severity{severity}.zarr"
EVALUATION = "results/evaluate/{dataset}/{model}/{condition}"

NUMBER = r"\d+(?:\.\d+)?"  # what number_label writes, as a wildcard pattern


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
        if "e" in text:  # 1e-05 -> 0.00001: no exponent, so paths match NUMBER
            text = format(Decimal(text), "f")
    if text.startswith("-"):
        raise ConfigError(f"expected a number >= 0, not {value!r}")
    return text


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

    def store(self, dataset: str) -> str:
        """The image store of `dataset` this condition feeds the model."""
        if self.kind == "clean":
            return CLEAN_STORE.format(dataset=dataset)
        if self.kind == "attack":
            return ATTACK_STORE.format(dataset=dataset, attack=self.attack,
                                       eps=number_label(self.epsilon), source=self.source)
        return PERTURBATION_STORE.format(dataset=dataset, perturbation=self.perturbation,
                                         severity=number_label(self.severity))

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


def evaluation_files(dataset: str, model: str, condition: str) -> dict[str, str]:
    stem = EVALUATION.format(dataset=dataset, model=model, condition=condition)
    return {"metrics": f"{stem}.json", "predictions": f"{stem}.csv"}


def plan_evaluations(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every (model, condition) the report summarises, as records with their files.

    A record holds `family, model, dataset`, the condition's fields (`condition`
    (its name), `kind, attack, epsilon, source, perturbation, severity`), the
    image `store` it reads (None for slide models) and its `metrics` and
    `predictions` files.
    """
    records = []
    for model, settings in config.get("image_classifiers", {}).items():
        dataset = settings["dataset"]
        for condition in model_conditions(config, model):
            records.append({"family": "image", "model": model, "dataset": dataset,
                            **condition.record(), "store": condition.store(dataset),
                            **evaluation_files(dataset, model, condition.name)})
    for model, settings in config.get("slide_classifiers", {}).items():
        dataset = settings["dataset"]
        records.append({"family": "slide", "model": model, "dataset": dataset,
                        **CLEAN.record(), "store": None,
                        **evaluation_files(dataset, model, CLEAN.name)})
    return records


def attack_budgets(config: Mapping[str, Any]) -> dict[tuple[str, str], int | float]:
    """(attack, budget as in paths) -> the budget as configured."""
    return {(attack, number_label(epsilon)): epsilon
            for attack, settings in config.get("attacks", {}).items()
            for epsilon in settings["epsilons"]}


def perturbation_severities(config: Mapping[str, Any]) -> dict[tuple[str, str], int | float]:
    """(perturbation, severity as in paths) -> the severity as configured."""
    return {(perturbation, number_label(severity)): severity
            for perturbation, settings in config.get("perturbations", {}).items()
            for severity in settings["severities"]}
