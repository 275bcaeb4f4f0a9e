"""Evaluation conditions: records built once from the config, names and paths derived from them."""

import pytest

from medrobust.conditions import (
    CLEAN, Condition, all_conditions, model_condition_runs, model_condition_stores,
    model_conditions, number_label, plan_evaluations)
from medrobust.errors import ConfigError

CONFIG = {
    "image_classifiers": {"baseline": {"dataset": "mammo"}, "surrogate": {"dataset": "mammo"}},
    "slide_classifiers": {"abmil": {"dataset": "slides"}},
    "attacks": {"fgsm": {"epsilons": [8, 2.5]}, "pgd_l2": {"epsilons": [0.5]}},
    "perturbations": {"gaussian_noise": {"severities": [0.05, 1.0e-5]}},
    "robustness": {"targets": ["baseline"], "transfer_sources": ["surrogate"], "white_box": True},
}


@pytest.mark.parametrize("value, label", [(8, "8"), (2.5, "2.5"), (0.5, "0.5"), (0.05, "0.05"),
                                          (1.0, "1.0"), (1e-05, "0.00001"), (1e16, "10000000000000000")])
def test_numbers_become_path_parts_without_exponents(value, label):
    import re

    assert number_label(value) == label
    assert re.fullmatch(r"\d+(\.\d+)?", label)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1, True, "8"])
def test_numbers_that_cannot_be_path_parts_are_refused(value):
    with pytest.raises(ConfigError):
        number_label(value)


def test_a_condition_gives_its_name_and_store():
    attack = Condition("attack", attack="fgsm", epsilon=2.5, source="surrogate")
    assert attack.name == "fgsm-eps2.5-from-surrogate"
    assert attack.run("mammo") == "results/attacks/mammo/from_surrogate"
    assert attack.store("mammo") == "results/attacks/mammo/from_surrogate/fgsm-eps2.5.zarr"
    noise = Condition("perturbation", perturbation="gaussian_noise", severity=0.05)
    assert noise.name == "gaussian_noise-severity0.05"
    assert noise.run("mammo") == "results/perturbations/mammo/gaussian_noise"
    assert noise.store("mammo") == "results/perturbations/mammo/gaussian_noise/severity0.05.zarr"
    assert CLEAN.name == "clean"
    assert CLEAN.store("mammo") == CLEAN.run("mammo") == "results/preprocessed/mammo.zarr"


def test_targets_get_every_condition_others_only_clean():
    names = [condition.name for condition in model_conditions(CONFIG, "baseline")]
    assert names == ["clean",
                     "fgsm-eps8-from-surrogate", "fgsm-eps8-from-baseline",
                     "fgsm-eps2.5-from-surrogate", "fgsm-eps2.5-from-baseline",
                     "pgd_l2-eps0.5-from-surrogate", "pgd_l2-eps0.5-from-baseline",
                     "gaussian_noise-severity0.05", "gaussian_noise-severity0.00001"]
    assert model_conditions(CONFIG, "surrogate") == [CLEAN]


def test_a_target_that_is_also_a_transfer_source_is_attacked_once():
    config = {**CONFIG, "robustness": {"targets": ["baseline"],
                                       "transfer_sources": ["baseline"], "white_box": True}}
    names = [c.name for c in model_conditions(config, "baseline") if c.kind == "attack"]
    assert len(names) == len(set(names)) == 3


def test_evaluation_records_carry_the_condition_fields_and_files():
    records = plan_evaluations(CONFIG)
    by_key = {(record["model"], record["condition"]): record for record in records}
    record = by_key[("baseline", "fgsm-eps2.5-from-surrogate")]
    assert record == {
        "family": "image", "model": "baseline", "dataset": "mammo",
        "condition": "fgsm-eps2.5-from-surrogate", "kind": "attack", "attack": "fgsm",
        "epsilon": 2.5, "source": "surrogate", "perturbation": None, "severity": None,
        "store": "results/attacks/mammo/from_surrogate/fgsm-eps2.5.zarr",
        "store_run": "results/attacks/mammo/from_surrogate",
        "evaluation_run": "results/evaluate/mammo/baseline",
        "operating_point": "results/evaluate/mammo/baseline/operating_point.json",
        "metrics": "results/evaluate/mammo/baseline/fgsm-eps2.5-from-surrogate.json",
        "predictions": "results/evaluate/mammo/baseline/fgsm-eps2.5-from-surrogate.csv"}
    slide = by_key[("abmil", "clean")]
    assert slide["family"] == "slide" and slide["store"] is None and slide["kind"] == "clean"
    assert slide["metrics"] == "results/evaluate/slides/abmil/clean.json"
    assert len(records) == 9 + 1 + 1


def test_every_condition_by_name_with_the_budget_as_configured():
    conditions = all_conditions(CONFIG)
    assert conditions["fgsm-eps2.5-from-baseline"].epsilon == 2.5
    assert conditions["gaussian_noise-severity0.00001"].severity == 1e-5


def test_one_evaluation_job_reads_each_run_once_and_every_store_by_condition():
    runs = model_condition_runs(CONFIG, "baseline")
    assert runs == ["results/preprocessed/mammo.zarr",
                    "results/attacks/mammo/from_surrogate",
                    "results/attacks/mammo/from_baseline",
                    "results/perturbations/mammo/gaussian_noise"]
    stores = model_condition_stores(CONFIG, "baseline")
    assert len(stores) == 9
    assert stores["fgsm-eps8-from-baseline"] == "results/attacks/mammo/from_baseline/fgsm-eps8.zarr"
    assert all(store.startswith(tuple(runs)) for store in stores.values())
    assert model_condition_stores(CONFIG, "surrogate") == {
        "clean": "results/preprocessed/mammo.zarr"}
