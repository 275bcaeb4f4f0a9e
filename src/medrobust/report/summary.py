"""Every evaluation in one set of tables, each number with its 95% interval.

Inputs are the evaluators' outputs: per (model, condition) a metrics JSON (what
the model was fed) and a prediction table (per-sample labels and
probabilities). From the predictions this module computes, with
`medrobust.evaluate.statistics`:

- one row per (model, condition) with intervals for accuracy, balanced
  accuracy, AUC, sensitivity and specificity (robustness.csv), and for
  two-class models the sensitivity at the clean operating point: the
  threshold its evaluation chose on the clean val split
  (`evaluate.operating_point`), kept fixed under every condition;
- derived rows per attacked model: the *worst case* at each epsilon and
  threat model (an image counts as robust only if it survives every attack run
  there, as RobustBench counts) and the *mean over perturbations*;
- per-class numbers and confusion matrices (per_class.csv);
- paired comparisons of every defended model against every undefended target
  of its dataset on the same test images (comparisons.csv): McNemar's exact
  test, intervals of the accuracy and AUC differences
  (statistics.paired_comparison), and a verdict; each pair's headline
  comparisons (clean, worst cases, the mean over perturbations) also with
  Holm-adjusted p-values and verdicts, as one family.

Where a dataset's manifest puts test images in groups (`group`: the patient,
the lesion), accuracy, the two-class and per-class AUCs, the mean over
perturbations, the accuracy and two-class AUC differences and the paired tests
count the groups, not the images (`statistics`' clusters).

docs/report.md documents every column.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from medrobust.config import config_from_mapping
from medrobust.data.manifest import MANIFEST_NAME, read_manifest
from medrobust.errors import ConfigError, InputError
from medrobust.evaluate.metrics import (
    DESCRIPTION_KEYS, Evaluation, pairing_order, read_evaluation)
from medrobust.evaluate.operating_point import read_operating_point
from medrobust.evaluate.statistics import (
    CLUSTERED_MOVER, COMPARISON_KEYS, CONFIDENCE, N_RESAMPLES, Clustering, Interval, auc_caveat,
    classification_statistics, cluster_index, comparison_columns, count_comparison,
    holm_adjusted, interval_columns, mcnemar_exact, paired_comparison, sensitivity_at_threshold,
    t_mean)
from medrobust.io.atomic import atomic_path, write_json
from medrobust.logs import get_logger

log = get_logger(__name__)

# metrics with an interval, in column order; each gives <name>, <name>_low, <name>_high
INTERVAL_METRICS = ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity",
                    "sensitivity_at_clean_threshold")
SUMMARY_COLUMNS = (*DESCRIPTION_KEYS, "threat_model", "n", "positive_class", "clean_threshold",
                   *(f"{metric}{suffix}" for metric in INTERVAL_METRICS
                     for suffix in ("", "_low", "_high")))
PER_CLASS_COLUMNS = ("family", "model", "dataset", "condition", "class", "support",
                     *(f"{metric}{suffix}" for metric in ("sensitivity", "specificity", "auc")
                       for suffix in ("", "_low", "_high")))
PAIRED_COLUMNS = COMPARISON_KEYS  # statistics.comparison_columns' keys, in its order
COMPARISON_COLUMNS = ("dataset", "reference_model", "model", "defense", "condition", "kind",
                      "attack", "epsilon", "threat_model", "source_model", "perturbation",
                      "severity", *PAIRED_COLUMNS, "family_p_value", "family_verdict",
                      "family_auc_caveat")
# the comparisons a pair of models is judged by on the page; the rest are per condition
HEADLINE_KINDS = ("clean", "worst_case", "mean_perturbation")
MASKING_COLUMNS = ("dataset", "model", "norm", "epsilon", "gradient_attacks",
                   "gradient_free_attacks", "n", "fooled_only_by_gradient_free",
                   "fooled_only_by_gradient", "p_value", "flagged")
_KIND_ORDER = {"clean": 0, "attack": 1, "worst_case": 2, "perturbation": 3,
               "mean_perturbation": 4}
# the page rounds these again, to 3: from 4 it would round twice (0.24651 -> 0.2465 -> 0.246)
_DECIMALS = 6


@dataclasses.dataclass(frozen=True)
class StatisticsConfig:
    """How intervals and tests are computed (the `report` section's statistics keys)."""

    bootstrap_resamples: int = N_RESAMPLES
    confidence: float = CONFIDENCE
    alpha: float = 0.05
    seed: int = 0

    def __post_init__(self):
        if self.bootstrap_resamples < 1000:
            raise ConfigError("report.bootstrap_resamples must be at least 1000, "
                             f"not {self.bootstrap_resamples}")
        if not 0.5 < self.confidence < 1 or not 0 < self.alpha < 0.5:
            raise ConfigError("report.confidence must lie in (0.5, 1) and alpha in (0, 0.5)")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "StatisticsConfig":
        return config_from_mapping(cls, mapping, "report statistics")

    def sampling(self) -> dict[str, Any]:
        return {"n_resamples": self.bootstrap_resamples, "seed": self.seed,
                "confidence": self.confidence}


def threat_model(description: Mapping[str, Any]) -> str | None:
    if description["kind"] != "attack":
        return None
    return "white-box" if description["white_box"] else "transfer"


def _row(description: Mapping[str, Any], statistics: Mapping[str, Any],
         classes: Sequence[str]) -> dict[str, Any]:
    row = {**description, "threat_model": description.get("threat_model") or threat_model(description),
           "n": statistics["n"],
           "positive_class": classes[1] if len(classes) == 2 else None,
           "clean_threshold": statistics.get("clean_threshold")}
    for metric in INTERVAL_METRICS:
        row.update(interval_columns(metric, statistics.get(metric)))
    return row


def _per_class_rows(description: Mapping[str, Any], statistics: Mapping[str, Any]) -> list[dict]:
    rows = []
    for name, numbers in statistics["per_class"].items():
        row = {key: description[key] for key in ("family", "model", "dataset", "condition")}
        row.update({"class": name, "support": numbers["support"]})
        for metric in ("sensitivity", "specificity", "auc"):
            row.update(interval_columns(metric, numbers.get(metric)))
        rows.append(row)
    return rows


@dataclasses.dataclass(frozen=True)
class Survival:
    """Per test image, how many of a model's perturbation conditions left it correct."""

    model: str
    sample_ids: np.ndarray
    survived: np.ndarray     # integer counts, in the order of sample_ids
    conditions: int

    @property
    def fraction(self) -> np.ndarray:
        return self.survived / self.conditions

    def aligned(self, sample_ids: np.ndarray) -> "Survival":
        """The same counts in the order of `sample_ids` (which must be the same set)."""
        order = pairing_order(self.sample_ids, sample_ids,
                              f"{self.model}'s mean over perturbations")
        return self if order is None else dataclasses.replace(
            self, sample_ids=sample_ids, survived=self.survived[order])


def worst_case(evaluations: Sequence[Evaluation]) -> Evaluation:
    """Per image, the attack's outcome that is worst for the model.

    An image is robust only if every attack left it correct; among equals the
    lowest probability of the true class is kept, so the probabilities stay
    those of one real adversarial image each.
    """
    first = evaluations[0]
    aligned = [evaluation.aligned(first.sample_ids) for evaluation in evaluations]
    rows = np.arange(len(first.labels))
    # sort key per attack: (still correct, probability of the true class)
    keys = np.stack([evaluation.correct * 2.0 + evaluation.probabilities[rows, first.labels]
                     for evaluation in aligned])
    chosen = keys.argmin(axis=0)
    probabilities = np.stack([evaluation.probabilities for evaluation in aligned])[chosen, rows]
    return dataclasses.replace(first, probabilities=probabilities)


def _condition_key(description: Mapping[str, Any]) -> tuple:
    """What makes two models' conditions the same test for a paired comparison."""
    kind = description["kind"]
    if kind == "attack":
        source = None if description["white_box"] else description["source_model"]
        return (kind, description["attack"], description["norm"], float(description["epsilon"]),
                threat_model(description), source)
    if kind == "perturbation":
        return (kind, description["perturbation"], float(description["severity"]))
    if kind == "worst_case":
        return (kind, description["norm"], float(description["epsilon"]),
                description["threat_model"])
    return (kind,)


def sample_clusters(groups: Mapping[str, Mapping[str, str | None]] | None, dataset: str,
                    sample_ids: np.ndarray) -> np.ndarray | None:
    """Each test image's group for the clustered statistics, in the order of `sample_ids`;
    None where the dataset's manifest has no groups. An image without one (None) is a group
    of its own, as `statistics` reads a None key."""
    group_of = (groups or {}).get(dataset)
    if group_of is None:
        return None
    missing = [str(sample) for sample in sample_ids if str(sample) not in group_of]
    if missing:
        raise InputError(f"{dataset}'s {MANIFEST_NAME} has no sample(s) {', '.join(missing[:5])} "
                         "that its evaluations scored")
    return np.array([group_of[str(sample)] for sample in sample_ids], dtype=object)


def clustering_methods(datasets: Sequence[str]) -> dict[str, str]:
    """The summary's `interval_methods` entries for datasets whose test images come in groups."""
    if not datasets:
        return {}
    names = ', '.join(sorted(datasets))
    return {f"with the manifest's groups ({names}): accuracy, "
            "sensitivity, specificity (also per class and at the clean operating point)":
                "Korn-Graubard over the groups (exact binomial at the clustered effective "
                "size); balanced accuracy (with more classes the macro sensitivity) the MOVER "
                "of the classes' Korn-Graubard recalls where no group holds two classes "
                "(`grouped_balanced_accuracy`), else per sample",
            f"with the manifest's groups ({names}): AUC of two classes, per-class "
            "(one-vs-rest) AUC, and the AUC difference between two models of two classes":
                "Newcombe's score interval at the clustered effective sizes (Obuchowski's "
                "clustered variance over DeLong's, k - 1 degrees of freedom); the difference "
                "the MOVER of those with Obuchowski's correlation",
            f"with the manifest's groups ({names}): macro AUC and specificity of more "
            "classes, and the macro AUC difference":
                "cluster bootstrap, percentile (whole groups drawn within their classes; "
                "no degrees-of-freedom correction)",
            f"with the manifest's groups ({names}): accuracy difference "
            "and the mean over perturbations and its difference":
                "Student t over the groups (ratio estimator, linearised variance, k - 1 "
                "degrees of freedom; Wald-type); exact sign-flip test of the per-group sums "
                "for the difference"}


@dataclasses.dataclass
class Summary:
    """The tables summarize() writes."""

    robustness: pd.DataFrame
    per_class: pd.DataFrame
    comparisons: pd.DataFrame
    gradient_masking: pd.DataFrame
    confusion_matrices: list[dict[str, Any]]
    settings: dict[str, Any]


def summarize(evaluations: Iterable[Evaluation], defenses: Mapping[str, str],
              statistics: StatisticsConfig = StatisticsConfig(),
              baselines: Mapping[str, str] | None = None,
              thresholds: Mapping[str, float | None] | None = None,
              groups: Mapping[str, Mapping[str, str | None]] | None = None) -> Summary:
    """All tables from the evaluations; `defenses` maps each model to its defense or "none";
    `baselines` maps a model to the one model it is compared against instead (an MHIM-MIL
    slide model to its base model, `config.mil_baselines`); `thresholds` a two-class
    model to its operating point on P(classes[1]) (None or absent: none); `groups` a
    dataset to each sample's group (`Manifest.groups`; None or absent: every sample
    independent)."""
    by_model: dict[tuple[str, str], list[Evaluation]] = {}
    for evaluation in evaluations:
        key = (evaluation.description["dataset"], evaluation.description["model"])
        by_model.setdefault(key, []).append(evaluation)
    sampling = statistics.sampling()
    rows, per_class, matrices = [], [], []
    paired: dict[tuple[str, str], dict[tuple, tuple[str, Evaluation | Survival]]] = {}
    clustered: set[str] = set()
    balanced: set[str] = set()   # datasets whose balanced accuracy counted groups

    def clusters_of(dataset: str, sample_ids: np.ndarray) -> Clustering | None:
        """The samples' groups, numbered once for every statistic of one evaluation."""
        clustering = cluster_index(sample_clusters(groups, dataset, sample_ids),
                                   len(sample_ids))
        if clustering is not None:
            clustered.add(dataset)
        return clustering

    for key, model_evaluations in by_model.items():
        threshold = (thresholds or {}).get(key[1])

        def statistics_of(outcome: Evaluation) -> dict:
            clustering = clusters_of(key[0], outcome.sample_ids)
            stats = classification_statistics(outcome.labels, outcome.probabilities,
                                              outcome.classes, **sampling, clusters=clustering)
            if threshold is not None:
                stats["clean_threshold"] = threshold
                stats["sensitivity_at_clean_threshold"] = sensitivity_at_threshold(
                    outcome.labels, outcome.probabilities[:, 1], threshold,
                    statistics.confidence, clustering)
            return stats

        for evaluation in model_evaluations:
            stats = statistics_of(evaluation)
            if stats["balanced_accuracy"].method == CLUSTERED_MOVER:
                balanced.add(key[0])
            rows.append(_row(evaluation.description, stats, evaluation.classes))
            per_class += _per_class_rows(evaluation.description, stats)
            matrices.append({**{k: evaluation.description[k] for k in
                                ("family", "model", "dataset", "condition")},
                             "classes": evaluation.classes,
                             "matrix": stats["confusion_matrix"]})
            paired.setdefault(key, {})[_condition_key(evaluation.description)] = (
                {**evaluation.description, "threat_model": threat_model(evaluation.description)},
                evaluation)
        for description, outcome in _derived(model_evaluations):
            if isinstance(outcome, Evaluation):
                stats = statistics_of(outcome)
                stats["auc"] = None  # images of different attacks: no one ranking to score
                rows.append(_row(description, stats, outcome.classes))
            else:
                rows.append({**description, "threat_model": None, "n": len(outcome.sample_ids),
                             **interval_columns("accuracy", t_mean(
                                 outcome.fraction, statistics.confidence,
                                 clusters=clusters_of(key[0], outcome.sample_ids)))})
            paired[key][_condition_key(description)] = (description, outcome)
    comparisons = _comparisons(paired, defenses, statistics, baselines or {}, groups)
    settings = {**sampling, "alpha": statistics.alpha,
                "interval_methods": {
                    "accuracy, sensitivity and specificity (two classes)":
                        "exact binomial (Clopper-Pearson)",
                    "sensitivity at the clean operating point (two classes)":
                        "exact binomial (Clopper-Pearson), the threshold (maximal Youden's J "
                        "on the model's clean validation predictions) taken as fixed",
                    "AUC of two classes, per-class (one-vs-rest) AUC":
                        "Newcombe's score interval (Mann-Whitney, method 5)",
                    "balanced accuracy (with more classes also the macro sensitivity)":
                        "MOVER of the per-class recalls' Wilson score intervals",
                    "macro AUC and specificity (more classes)":
                        "stratified bootstrap over test samples (percentile)",
                    "mean over perturbations": "Student t over the test images",
                    "accuracy difference between two models":
                        "Newcombe's paired score interval (method 10); McNemar's exact test",
                    "AUC difference between two models": "two classes: MOVER of Newcombe's "
                        "AUC intervals with DeLong's correlation; more: paired stratified "
                        "bootstrap (percentile)",
                    "mean over perturbations, difference between two models":
                        "paired Student t; exact sign-flip (permutation) test",
                    **clustering_methods(sorted(clustered))}}
    if clustered:   # absent without groups: the settings stay as they were
        settings["grouped_datasets"] = sorted(clustered)
        settings["grouped_balanced_accuracy"] = sorted(balanced)
    return Summary(robustness=_ordered(pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))),
                   per_class=pd.DataFrame(per_class, columns=list(PER_CLASS_COLUMNS)),
                   comparisons=pd.DataFrame(comparisons, columns=list(COMPARISON_COLUMNS)),
                   gradient_masking=pd.DataFrame(
                       gradient_masking_checks(by_model, statistics, groups),
                       columns=list(MASKING_COLUMNS)),
                   confusion_matrices=matrices, settings=settings)


def _derived(evaluations: Sequence[Evaluation]) -> list[tuple[dict, Evaluation | Survival]]:
    """Worst case per (norm, epsilon, threat model), and the per-image mean over perturbations."""
    first = evaluations[0].description
    base = {key: None for key in DESCRIPTION_KEYS}
    base.update({key: first[key] for key in ("family", "model", "dataset")})
    derived = []
    for (norm, epsilon, threat), group in sorted(attacks_by_budget(evaluations).items()):
        names = sorted({evaluation.description["attack"] for evaluation in group})
        sources = sorted({evaluation.description["source_model"] for evaluation in group})
        derived.append(({**base, "condition": f"worst-case-{norm}-eps{epsilon:g}-{threat}",
                         "kind": "worst_case", "attack": "+".join(names), "epsilon": epsilon,
                         "norm": norm,
                         "source_model": "+".join(sources), "white_box": threat == "white-box",
                         "threat_model": threat}, worst_case(group)))
    perturbed = [e for e in evaluations if e.description["kind"] == "perturbation"]
    if perturbed:
        reference = perturbed[0].sample_ids
        survived = np.sum([e.aligned(reference).correct for e in perturbed], axis=0)
        derived.append(({**base, "condition": "mean-perturbation", "kind": "mean_perturbation",
                         "perturbation": "+".join(sorted({e.description["perturbation"]
                                                          for e in perturbed}))},
                        Survival(first["model"], reference, survived.astype(np.int64),
                                 len(perturbed))))
    return derived


def attacks_by_budget(evaluations: Sequence[Evaluation]) -> dict[tuple, list[Evaluation]]:
    """A model's attack evaluations grouped by (norm, epsilon, threat model)."""
    groups: dict[tuple, list[Evaluation]] = {}
    for evaluation in evaluations:
        description = evaluation.description
        if description["kind"] == "attack":
            key = (description["norm"], float(description["epsilon"]), threat_model(description))
            groups.setdefault(key, []).append(evaluation)
    return groups


def gradient_free_attacks() -> frozenset[str]:
    """Names of the registered attacks that use no gradients (the check for gradient masking)."""
    from medrobust.attacks import ATTACKS  # imports torch: only when there are attacks

    return frozenset(name for name, attack in ATTACKS.items() if attack.gradient_free)


def gradient_masking_checks(by_model: Mapping[tuple[str, str], Sequence[Evaluation]],
                            statistics: StatisticsConfig,
                            groups: Mapping[str, Mapping[str, str | None]] | None = None,
                            ) -> list[dict[str, Any]]:
    """Does a gradient-free attack fool images the gradient attacks at the same budget did not?

    Per model and white-box budget with both kinds of attack: the worst case of
    each kind per image, compared by McNemar's exact test (with the dataset's
    `groups`, the sign-flip test of the per-group sums). A model is flagged
    when the gradient-free attack is significantly stronger: its gradients
    mislead the gradient attacks (Athalye et al. 2018), so their numbers
    overstate its robustness.
    """
    checks = []
    free = None
    for (dataset, model), evaluations in by_model.items():
        for (norm, epsilon, threat), group in sorted(attacks_by_budget(evaluations).items()):
            if threat != "white-box":
                continue
            free = gradient_free_attacks() if free is None else free
            blind = [e for e in group if e.description["attack"] in free]
            guided = [e for e in group if e.description["attack"] not in free]
            if not blind or not guided:
                continue
            blind_case, guided_case = worst_case(blind), worst_case(guided)
            test = mcnemar_exact(guided_case.correct, blind_case.aligned(
                guided_case.sample_ids).correct,
                sample_clusters(groups, dataset, guided_case.sample_ids))
            only_blind = test["only_a_correct"]  # survived the gradient attacks, not the other
            checks.append({
                "dataset": dataset, "model": model, "norm": norm, "epsilon": epsilon,
                "gradient_attacks": "+".join(sorted({e.description["attack"] for e in guided})),
                "gradient_free_attacks": "+".join(sorted({e.description["attack"]
                                                          for e in blind})),
                "n": test["n"], "fooled_only_by_gradient_free": only_blind,
                "fooled_only_by_gradient": test["only_b_correct"],
                "p_value": test["p_value"],
                "flagged": bool(test["p_value"] < statistics.alpha
                                and only_blind > test["only_b_correct"])})
    return checks


def _comparisons(paired, defenses: Mapping[str, str], statistics: StatisticsConfig,
                 baselines: Mapping[str, str],
                 groups: Mapping[str, Mapping[str, str | None]] | None = None,
                 ) -> list[dict[str, Any]]:
    """Each defended model against each undefended model of its dataset that was put under
    attack or perturbation, and each model with a baseline against it alone, condition by
    condition."""
    rows = []
    sampling = statistics.sampling()
    for (dataset, model), conditions in paired.items():
        baseline = baselines.get(model)
        if baseline is None and defenses.get(model, "none") == "none":
            continue
        for (other_dataset, reference), reference_conditions in paired.items():
            if other_dataset != dataset:
                continue
            if baseline is not None:
                if reference != baseline:
                    continue
            elif (defenses.get(reference, "none") != "none"
                    or not any(key[0] != "clean" for key in reference_conditions)):
                continue
            for key, (description, outcome) in conditions.items():
                if key not in reference_conditions:
                    continue
                reference_outcome = reference_conditions[key][1]
                clusters = sample_clusters(groups, dataset, outcome.sample_ids)
                row = {"dataset": dataset, "reference_model": reference, "model": model,
                       "defense": defenses[model],
                       **{column: description.get(column) for column in
                          ("condition", "kind", "attack", "epsilon", "threat_model",
                           "source_model", "perturbation", "severity")}}
                if isinstance(outcome, Evaluation):
                    reference_outcome = reference_outcome.aligned(outcome.sample_ids)
                    result = paired_comparison(outcome.labels, reference_outcome.probabilities,
                                               outcome.probabilities, alpha=statistics.alpha,
                                               clusters=clusters, **sampling)
                    row.update(comparison_columns(result, with_auc=key[0] != "worst_case"))
                else:
                    reference_outcome = reference_outcome.aligned(outcome.sample_ids)
                    row.update(count_comparison(
                        reference_outcome.survived, reference_outcome.conditions,
                        outcome.survived, outcome.conditions, statistics.confidence,
                        statistics.alpha, clusters))
                rows.append(row)
    return _judged_as_families(rows, statistics.alpha)


def _judged_as_families(rows: list[dict[str, Any]], alpha: float) -> list[dict[str, Any]]:
    """Each pair of models' headline comparisons (clean, each worst case, the mean over
    perturbations) as one family: Holm-adjusted p-values and the verdicts they give, so
    that "helped" or "hurt" somewhere among a pair's six or so headlines is not a 26 %
    chance when nothing differs. Other rows (each attack and severity) stay per condition."""
    families: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        row.update(family_p_value=None, family_verdict=None, family_auc_caveat=None)
        if row["kind"] in HEADLINE_KINDS:
            key = (row["dataset"], row["reference_model"], row["model"])
            families.setdefault(key, []).append(row)
    for family in families.values():
        for row, p_value in zip(family, holm_adjusted([row["p_value"] for row in family])):
            row["family_p_value"] = float(p_value)
            row["family_verdict"] = (row["verdict"] if p_value < alpha
                                     else "no detectable difference")
            # the caveat is against the verdict shown: an adjusted verdict may need one
            row["family_auc_caveat"] = auc_caveat(row["family_verdict"], Interval(
                row["auc_difference"], row["auc_difference_low"], row["auc_difference_high"],
                ""))
    return rows


def _ordered(table: pd.DataFrame) -> pd.DataFrame:
    """Stable order: family, dataset, model, then clean, attacks, worst cases, perturbations."""
    order = table.assign(_kind=table["kind"].map(_KIND_ORDER))
    order = order.sort_values(["family", "dataset", "model", "_kind", "attack", "norm", "epsilon",
                               "threat_model", "source_model", "perturbation", "severity"],
                              na_position="first", kind="stable")
    return table.loc[order.index].reset_index(drop=True)


def rounded(table: pd.DataFrame) -> pd.DataFrame:
    """Floats to a sensible precision; epsilon and severity as given in the config."""
    table = table.copy()
    for column in table.columns:
        if column in ("epsilon", "severity"):
            table[column] = table[column].map(
                lambda value: None if _missing(value) else f"{float(value):g}")
        elif pd.api.types.is_float_dtype(table[column]):
            table[column] = table[column].round(_DECIMALS)
    return table


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    return table.astype(object).where(table.notna(), None).to_dict(orient="records")


def write_summary(summary: Summary, out_csv: str | os.PathLike, out_json: str | os.PathLike,
                  per_class_csv: str | os.PathLike, comparisons_csv: str | os.PathLike) -> None:
    """robustness.csv, per_class.csv, comparisons.csv, and all of it (with the gradient-masking
    checks) in robustness.json."""
    tables = {"robustness": rounded(summary.robustness), "per_class": rounded(summary.per_class),
              "comparisons": rounded(summary.comparisons),
              "gradient_masking": rounded(summary.gradient_masking)}
    for path, table in zip((out_csv, per_class_csv, comparisons_csv), tables.values()):
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False)
    write_json(out_json, {"settings": summary.settings,
                          **{name: _records(table) for name, table in tables.items()},
                          "confusion_matrices": summary.confusion_matrices})


def summarize_evaluations(records: Sequence[Mapping[str, Any]], defenses: Mapping[str, str],
                          statistics: Mapping[str, Any], out_csv: str | os.PathLike,
                          out_json: str | os.PathLike, per_class_csv: str | os.PathLike,
                          comparisons_csv: str | os.PathLike,
                          baselines: Mapping[str, str] | None = None,
                          dataset_folders: Sequence[str | os.PathLike] = ()) -> Summary:
    """Read every evaluation record ({metrics, predictions, operating_point} paths) and write
    the tables; the manifests in `dataset_folders` (resources/{dataset}) say which test
    images share a patient or lesion."""
    settings = StatisticsConfig.from_mapping(statistics)
    evaluations = [read_evaluation(record["metrics"], record["predictions"])
                   for record in records]
    points = {record["model"]: record["operating_point"] for record in records}
    thresholds = {model: read_operating_point(path)["threshold"] for model, path in points.items()}
    groups = {Path(folder).name: read_manifest(Path(folder) / MANIFEST_NAME).groups
              for folder in dataset_folders}
    summary = summarize(evaluations, defenses, settings, baselines, thresholds, groups)
    write_summary(summary, out_csv, out_json, per_class_csv, comparisons_csv)
    log.info("summarised %d evaluations into %d rows and %d paired comparisons",
             len(evaluations), len(summary.robustness), len(summary.comparisons))
    return summary


__all__ = ["COMPARISON_COLUMNS", "HEADLINE_KINDS", "INTERVAL_METRICS", "MASKING_COLUMNS",
           "PAIRED_COLUMNS",
           "PER_CLASS_COLUMNS", "SUMMARY_COLUMNS",
           "StatisticsConfig", "Summary", "read_evaluation", "rounded", "summarize",
           "summarize_evaluations", "write_summary"]
