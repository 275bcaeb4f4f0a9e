"""How a slide model holds up when some of its tiles change (docs/mil.md, "Robustness").

Per slide model, on the test slides:

- tile fractions: for each tile perturbation, severity and fraction f, the
  bag with the first ceil(f · n) tiles of the slide's seeded order replaced
  by their perturbed features (`perturbations.slide_tiles`, computed once per
  dataset and shared by its models), every other tile's stored feature kept;
- adversarial tiles: for each k and ε, `attacks.tiles.TilePGD` on the k
  tiles the model attends to most, through the backbone and the MIL head,
  each slide scored under the strongest attack run within (k, ε)
  (`strongest_within_budget`).

Each condition is scored like an evaluation (accuracy and AUC) with the
intervals of `evaluate.statistics`; fraction 0 and ε 0 are the clean bags.
A run folder holds `predictions.csv` (one row per condition and slide),
`metrics.csv` (one row per condition) and `run.json` (settings, units, the
number of test slides).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import zarr

from medrobust.attacks.pgd import PGDParams
from medrobust.attacks.tiles import TilePGD
from medrobust.conditions import perturbation_store_name
from medrobust.config import config_from_mapping
from medrobust.errors import ConfigError, InputError
from medrobust.evaluate.metrics import prediction_table
from medrobust.evaluate.slide_classifier import load_split_bags
from medrobust.evaluate.statistics import classification_statistics, interval_columns
from medrobust.features.extract import (
    AUTOCAST_DTYPES, FeatureConfig, backbone_for, resolved_precision)
from medrobust.io.atomic import atomic_path, write_json
from medrobust.io.slide_stores import open_tile_store, read_tiles
from medrobust.io.zarr_chunks import check_lengths, read_array
from medrobust.logs import get_logger
from medrobust.perturbations import build_perturbation
from medrobust.perturbations.slide_tiles import TEST, perturbed_count
from medrobust.progress import progress

log = get_logger(__name__)
PREDICTIONS, METRICS, RUN = "predictions.csv", "metrics.csv", "run.json"
# what identifies a condition in both tables: kind is clean, tile_fraction or
# adversarial_tiles; fraction, k and epsilon are 0 where nothing of the kind was done (the
# clean point of each curve), perturbation and severity empty
CONDITION_COLUMNS = ("kind", "perturbation", "severity", "fraction", "k", "epsilon")


def _positive_integers(values: Any) -> bool:
    return (isinstance(values, (list, tuple)) and len(values) > 0
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values))


@dataclasses.dataclass(frozen=True)
class AdversarialTilesConfig:
    """`slide_robustness.adversarial`: PGD-L∞ on the top_k most-attended tiles."""

    top_k: Sequence[int] = (1, 4)
    epsilons: Sequence[float] = (2, 8)   # 1/255, as the image attacks
    steps: int = 10
    step_size: float | None = None       # 1/255; None: PGD's 2.5 epsilon / steps per budget
    random_start: bool = True
    seed: int = 0

    def __post_init__(self):
        section = "slide_robustness.adversarial"
        if not _positive_integers(self.top_k):
            raise ConfigError(f"{section}.top_k: must be a list of integers >= 1, "
                              f"got {self.top_k!r}")
        if not isinstance(self.epsilons, (list, tuple)) or not self.epsilons:
            raise ConfigError(f"{section}.epsilons: must be a list of budgets in 1/255")
        for index, epsilon in enumerate(self.epsilons):
            TilePGD.budget_to_image_units(epsilon, section=f"{section}.epsilons.{index}")
        self.pgd_params()

    def pgd_params(self) -> PGDParams:
        return PGDParams.from_mapping({"steps": self.steps, "step_size": self.step_size,
                                       "random_start": self.random_start, "seed": self.seed},
                                      section="slide_robustness.adversarial")


@dataclasses.dataclass(frozen=True)
class SlideRobustnessConfig:
    """The `slide_robustness` section (docs/config.md)."""

    fractions: Sequence[float] = (0.25, 1.0)
    perturbations: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    adversarial: Mapping[str, Any] | None = None
    models: Sequence[str] | None = None  # which models the workflow analyses; None: every one

    def __post_init__(self):
        if not isinstance(self.fractions, (list, tuple)) or not self.fractions or not all(
                isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1
                for f in self.fractions):
            raise ConfigError(f"slide_robustness.fractions: must be a list of numbers in (0, 1], "
                              f"got {self.fractions!r}")
        for name, settings in self.perturbations.items():
            params = {key: value for key, value in settings.items() if key != "severities"}
            for index, severity in enumerate(settings.get("severities", ())):
                try:
                    build_perturbation(name, severity, **params)
                except ConfigError as error:
                    raise ConfigError(f"slide_robustness.perturbations.{name}.severities."
                                      f"{index}: {error}") from None
        self.adversarial_tiles()

    def adversarial_tiles(self) -> AdversarialTilesConfig | None:
        if self.adversarial is None:
            return None
        return config_from_mapping(AdversarialTilesConfig, self.adversarial,
                                   "slide_robustness.adversarial")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "SlideRobustnessConfig":
        return config_from_mapping(cls, mapping, "slide_robustness")


def _condition(kind: str, perturbation: str = "", severity: float | None = None,
               fraction: float = 0.0,
               k: int = 0, epsilon: float = 0.0) -> dict[str, Any]:
    return dict(zip(CONDITION_COLUMNS, (kind, perturbation, severity, fraction, k, epsilon)))


def _probabilities(logits: Sequence[torch.Tensor]) -> np.ndarray:
    return torch.softmax(torch.stack([row.reshape(-1).float().cpu() for row in logits]),
                         dim=1).numpy()


def _open_perturbed(run_dir: Path, severity: float, weights_sha256: str,
                    precision: str) -> zarr.Group:
    path = run_dir / perturbation_store_name(severity)
    try:
        group = zarr.open_group(path, mode="r")
    except (FileNotFoundError, ValueError) as error:
        raise InputError(f"{path}: not a readable perturbed-feature store ({error})") from error
    if group.attrs.get("weights_sha256") != weights_sha256:
        raise InputError(f"{path}: perturbed features come from backbone weights "
                         f"{str(group.attrs.get('weights_sha256'))[:12]}, the model's test "
                         f"features from {weights_sha256[:12]}; rerun the perturbation")
    if group.attrs.get("precision", precision) != precision:  # runs before it was recorded pass
        raise InputError(f"{path}: perturbed features embedded at {group.attrs['precision']}, "
                         f"the test features at {precision}: a perturbed tile would differ by "
                         "the precision too; run the perturbation and feature jobs on one kind "
                         "of device (features.precision)")
    return group


def stored_precision(feature_paths: Sequence[str | os.PathLike], features: FeatureConfig,
                     device: torch.device) -> str:
    """The precision the features were embedded at, as their stores record it; for stores
    written before it was recorded, what `features.precision` means on this job's device."""
    recorded = {zarr.open_group(path, mode="r").attrs.get("precision") for path in feature_paths}
    if recorded == {None}:
        return resolved_precision(features.precision, device)
    if len(recorded) > 1:  # two precisions, or some stores recorded and some not
        names = ", ".join(sorted(str(name or "not recorded") for name in recorded))
        raise InputError(f"the feature stores were embedded at different precisions ({names});"
                         " extract them again on one kind of device")
    return recorded.pop()


def tile_fraction_logits(model: torch.nn.Module, bags, run_dir: Path, severity: float,
                         fraction: float, weights_sha256: str, precision: str,
                         device: torch.device) -> list[torch.Tensor]:
    """Each test bag's logits with its first ceil(f · n) ordered tiles perturbed."""
    group = _open_perturbed(run_dir, severity, weights_sha256, precision)
    logits = []
    for bag in bags:
        if bag.slide_id not in group:
            raise InputError(f"{group.store}: no perturbed features of test slide {bag.slide_id}")
        slide = group[bag.slide_id]
        n = len(bag.features)
        if slide.attrs.get("n_tiles") != n:
            raise InputError(f"{run_dir}: slide {bag.slide_id} has {slide.attrs.get('n_tiles')} "
                             f"perturbed-run tiles, its feature store {n}")
        count = perturbed_count(fraction, n)
        order = torch.as_tensor(read_array(slide["order"], slice(0, count)))
        if len(order) < count:
            raise InputError(f"{run_dir}: slide {bag.slide_id} has features for {len(order)} "
                             f"perturbed tiles, fraction {fraction:g} needs {count}; rerun the "
                             f"perturbation with the current fractions")
        check_lengths(run_dir / perturbation_store_name(severity) / bag.slide_id,
                      {"order": slide["order"], "features": slide["features"]})
        features = bag.features.clone()
        features[order] = torch.as_tensor(read_array(slide["features"], slice(0, count)))
        with torch.inference_mode():
            logits.append(model(features.to(device))[0])
    return logits


def adversarial_tile_logits(attack: TilePGD, bags, tile_stores: Mapping[str, Any], k: int,
                            device: torch.device) -> list[torch.Tensor]:
    """Each test bag's logits after PGD on its k most-attended tiles."""
    logits = []
    for bag in progress(bags, desc=f"tile PGD k={k} {attack.budget()}", unit="slide"):
        store = tile_stores[bag.slide_id]

        def tiles_at(positions, store=store):
            pixels = torch.from_numpy(read_tiles(store.tiles, positions)).to(device)
            return pixels.permute(0, 3, 1, 2).float().div_(255)

        result = attack.attack_slide(bag.features.to(device), tiles_at, bag.label, k)
        logits.append(result.adversarial_logits)
    return logits


def strongest_within_budget(runs: Mapping[tuple[float, int], Sequence[torch.Tensor]],
                            clean: Sequence[torch.Tensor], labels: Sequence[int],
                            slide_ids: Sequence[str]
                            ) -> tuple[dict[tuple[float, int], list[torch.Tensor]],
                                       list[dict[str, Any]]]:
    """Each (epsilon, k)'s logits under the strongest attack run within its budget.

    The threat models nest: the top k' tiles lie among the top k (one ranking, by the
    clean bag's attention) and an epsilon' ball inside an epsilon one, so an attack run
    at k' <= k and epsilon' <= epsilon is also an attack at (k, epsilon), and so is the
    clean slide (no perturbation, budget (0, 0)). Per slide the strongest of them is kept:
    the one that gets it wrong, then the one with the highest loss of its label (among
    equals the budget's own run, then the first in `runs`, then the clean slide). So
    accuracy cannot rise with k or epsilon, nor above the clean one; with two classes the
    AUC cannot either (the highest loss of a slide's label is its worst score), with more
    it can. A single PGD run is not monotone in k and epsilon: the second value lists each
    (budget, slide) where another candidate won (its budget, and whether that changed the
    slide's correctness: then the run at the budget fell short).
    """
    def strength(logits: torch.Tensor, label: int) -> tuple[bool, float]:
        logits = logits.reshape(-1).float().cpu()
        return (int(logits.argmax()) != label,
                float(-torch.log_softmax(logits, dim=0)[label]))

    candidates = {**runs, (0.0, 0): clean}
    # each candidate's strength on each slide, once: every larger budget compares it again
    strengths = {budget: [strength(row, label) for row, label in zip(logits, labels)]
                 for budget, logits in candidates.items()}
    strongest, replaced = {}, []
    for epsilon, k in runs:
        # own first: another candidate replaces it only if strictly stronger
        inside = [(epsilon, k)] + [budget for budget in candidates if budget != (epsilon, k)
                                   and budget[0] <= epsilon and budget[1] <= k]
        chosen = []
        for index, slide_id in enumerate(slide_ids):
            best = max(inside, key=lambda budget: strengths[budget][index])
            chosen.append(candidates[best][index])
            if best != (epsilon, k):
                replaced.append({"k": k, "epsilon": epsilon, "slide_id": slide_id,
                                 "from_k": best[1], "from_epsilon": best[0],
                                 "changed_correctness": strengths[(epsilon, k)][index][0]
                                 != strengths[best][index][0]})
        strongest[(epsilon, k)] = chosen
    return strongest, replaced


def _metrics_row(condition: Mapping[str, Any], labels: np.ndarray, probabilities: np.ndarray,
                 classes: list[str], statistics: Mapping[str, Any]) -> dict[str, Any]:
    stats = classification_statistics(labels, probabilities, classes,
                                      n_resamples=statistics["bootstrap_resamples"],
                                      seed=statistics["seed"],
                                      confidence=statistics["confidence"])
    return {**condition, "n": stats["n"], **interval_columns("accuracy", stats["accuracy"]),
            **interval_columns("auc", stats["auc"])}


def slide_robustness_run(model_dir: str | os.PathLike, feature_paths: Sequence[str | os.PathLike],
                         tile_paths: Sequence[str | os.PathLike],
                         perturbation_runs: Mapping[str, str | os.PathLike],
                         out_dir: str | os.PathLike, settings: SlideRobustnessConfig,
                         features: FeatureConfig, statistics: Mapping[str, Any],
                         device: str | torch.device = "cpu") -> pd.DataFrame:
    """Score the model's test slides under every tile-fraction and adversarial-tile condition;
    write the run folder (module docstring) at once. Returns the metrics table.

    `perturbation_runs`: each configured tile perturbation's run folder;
    `statistics`: bootstrap_resamples, confidence and seed of the intervals.
    """
    model_dir, device = Path(model_dir), torch.device(device)
    model, config, bags = load_split_bags(model_dir, feature_paths, TEST, device)
    classes = list(config["classes"])
    labels = np.array([bag.label for bag in bags])
    weights_sha256 = config["backbone_weights_sha256"]
    precision = stored_precision(feature_paths, features, device)

    conditions: list[tuple[dict[str, Any], list[torch.Tensor]]] = []
    with torch.inference_mode():
        clean = [model(bag.features.to(device))[0] for bag in bags]
    conditions.append((_condition("clean"), clean))
    for name, entry in settings.perturbations.items():
        for severity in entry["severities"]:
            for fraction in sorted(settings.fractions):
                logits = tile_fraction_logits(model, bags, Path(perturbation_runs[name]),
                                              severity, fraction, weights_sha256, precision,
                                              device)
                conditions.append((_condition("tile_fraction", name, severity, fraction), logits))
    adversarial = settings.adversarial_tiles()
    attack_description, attack_params, replaced = None, None, []
    if adversarial is not None:
        backbone = backbone_for(features)
        if backbone.weights_sha256 != weights_sha256:
            raise InputError(f"{model_dir}: trained on features of weights {weights_sha256[:12]}, "
                             f"the configured backbone {backbone.name} has "
                             f"{backbone.weights_sha256[:12]}")
        backbone.model.to(device)
        stores = {str(store.attrs["slide_id"]): store for store in map(open_tile_store, tile_paths)}
        missing = [bag.slide_id for bag in bags if bag.slide_id not in stores]
        if missing:
            raise InputError(f"{model_dir.name}: no tile store given for test slide(s) "
                             f"{', '.join(missing)}")
        for bag in bags:  # row i of the features is tile i of the store, or the attack is off
            if len(stores[bag.slide_id]) != len(bag.features):
                raise InputError(f"{stores[bag.slide_id].path}: {len(stores[bag.slide_id])} "
                                 f"tiles, the feature store of slide {bag.slide_id} "
                                 f"{len(bag.features)}; they must come from one tiling "
                                 f"(rerun the feature extraction)")
        attacks = {epsilon: TilePGD(backbone.model, model, TilePGD.to_image_units(epsilon),
                                    adversarial.pgd_params(),
                                    autocast_dtype=AUTOCAST_DTYPES[precision])  # as stored
                   for epsilon in adversarial.epsilons}
        first = next(iter(attacks.values()))
        steps = {attack.step_text() for attack in attacks.values()}  # default: ε's share
        step = first.step_text() if len(steps) == 1 else ", ".join(
            f"{attack.step_text()} at {attack.budget()}" for attack in attacks.values())
        attack_description = (
            f"{first.title}, " + ", ".join(attack.budget() for attack in attacks.values())
            + f"; {first.params.steps} steps, {step}, {first.start_text()}")
        attack_params = {attack.budget(): attack.resolved_params()
                         for attack in attacks.values()}
        runs = {(epsilon, k): adversarial_tile_logits(attack, bags, stores, k, device)
                for epsilon, attack in attacks.items() for k in adversarial.top_k}
        strongest, replaced = strongest_within_budget(
            runs, clean, labels.tolist(), [bag.slide_id for bag in bags])
        for (epsilon, k), logits in strongest.items():
            conditions.append((_condition("adversarial_tiles", k=k, epsilon=epsilon), logits))
        changed = sum(entry["changed_correctness"] for entry in replaced)
        if changed:
            log.warning("%s: at %d (budget, slide) pairs the attack run at the budget left the "
                        "slide right where one at a smaller k or epsilon (or the clean slide) "
                        "had it wrong; each is scored under the stronger (run.json "
                        "replaced_by_smaller_budget): PGD falls short there, more steps would "
                        "help", model_dir.name, changed)

    predictions, metrics = [], []
    for condition, logits in conditions:
        probabilities = _probabilities(logits)
        table = prediction_table([bag.slide_id for bag in bags], labels, probabilities, classes)
        predictions.append(table.assign(**condition))
        row = _metrics_row(condition, labels, probabilities, classes, statistics)
        if condition["kind"] == "adversarial_tiles" and len(classes) > 2:
            # slides of different runs: no bound on a macro AUC (strongest_within_budget)
            row.update(auc=None, auc_low=None, auc_high=None)
        metrics.append(row)
    metrics_table = pd.DataFrame(metrics).assign(model=model_dir.name, dataset=config["dataset"])
    units = {name: build_perturbation(name, entry["severities"][0],
                                      **{key: value for key, value in entry.items()
                                         if key != "severities"}).severity_unit
             for name, entry in settings.perturbations.items()}
    run = {"model": model_dir.name, "dataset": config["dataset"], "n_test_slides": len(bags),
           "class_counts": {name: int((labels == index).sum())
                            for index, name in enumerate(classes)},
           "fractions": sorted(settings.fractions), "severity_units": units,
           "adversarial": dataclasses.asdict(adversarial) if adversarial else None,
           "attack": attack_description, "attack_params": attack_params,
           "replaced_by_smaller_budget": replaced,
           "statistics": dict(statistics)}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        pd.concat(predictions, ignore_index=True).to_csv(tmp / PREDICTIONS, index=False)
        metrics_table.to_csv(tmp / METRICS, index=False)
        write_json(tmp / RUN, run)
    log.info("%s: %d conditions over %d test slides", model_dir.name, len(conditions), len(bags))
    return metrics_table
