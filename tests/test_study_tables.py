"""The denoising study's tables, built from a summary of known per-image correctness.

Two resnet18 targets with different λ and a vgg16 target, FGSM and I-FGSM at
ε 4 and 8 transferred from a surrogate and white-box, C&W-L2 transferred only:
every row, column, value and interval is checked against a hand count.
"""

import numpy as np
import pandas as pd
import pytest

from medrobust.attacks import ATTACKS
from medrobust.evaluate.metrics import METRIC_KEYS, Evaluation
from medrobust.evaluate.statistics import clopper_pearson
from medrobust.report.study_tables import (
    DEFENSE_TABLE_COLUMNS, defense_setting, defense_table_frame, defense_tables, setting_label)
from medrobust.report.summary import StatisticsConfig, summarize

CLASSES = ["benign", "malignant"]
N = 40
LABELS = np.array([0, 1] * (N // 2))
FGSM, IFGSM, CW = (ATTACKS[name].title for name in ("fgsm", "ifgsm", "cw_l2"))


def correct_on(stop):
    """Images 0 .. stop-1 right, the rest wrong."""
    return np.arange(N) < stop


def evaluation(model, correct, **attack):
    description = dict.fromkeys(METRIC_KEYS)
    description.update(family="image", model=model, dataset="skin", kind="clean",
                       condition="clean")
    if attack:
        source = attack["source_model"]
        description.update(kind="attack", white_box=source == model,
                           condition=f"{attack['attack']}-eps{attack['epsilon']:g}-from-{source}",
                           **attack)
    probabilities = np.zeros((N, 2))
    true = np.where(correct, 0.8, 0.3)
    probabilities[np.arange(N), LABELS] = true
    probabilities[np.arange(N), 1 - LABELS] = 1 - true
    return Evaluation(description, np.array([f"s{i}" for i in range(N)]), LABELS,
                      probabilities, CLASSES)


def attacked(model, name, epsilon, source, stop):
    norm = "l2" if name == "cw_l2" else "linf"
    return evaluation(model, correct_on(stop), attack=name, epsilon=float(epsilon), norm=norm,
                      source_model=source)


# images each target keeps right: clean, then per (attack, ε) from the surrogate and white-box
CLEAN = {"weak": 34, "paper": 32, "vgg": 30}
TRANSFER = {"weak": {("fgsm", 4): 20, ("fgsm", 8): 12, ("ifgsm", 4): 18, ("ifgsm", 8): 10,
                     ("cw_l2", 0.5): 25},
            "paper": {("fgsm", 4): 31, ("fgsm", 8): 29, ("ifgsm", 4): 30, ("ifgsm", 8): 27,
                      ("cw_l2", 0.5): 28},
            "vgg": {("fgsm", 4): 22, ("fgsm", 8): 15, ("ifgsm", 4): 21, ("ifgsm", 8): 14,
                    ("cw_l2", 0.5): 20}}
WHITE_BOX = {"weak": {("fgsm", 4): 6, ("fgsm", 8): 2, ("ifgsm", 4): 4, ("ifgsm", 8): 1},
             "paper": {("fgsm", 4): 9, ("fgsm", 8): 5, ("ifgsm", 4): 7, ("ifgsm", 8): 3}}
CONFIGS = {
    "weak": {"dataset": "skin", "arch": "resnet18",
             "defense": {"name": "denoising", "lambda_n": 0.1, "lambda_a": 0.0,
                         "noise_sigma": 0.03}},
    "paper": {"dataset": "skin", "arch": "resnet18",
              "defense": {"name": "denoising", "lambda_n": 1.0, "lambda_a": 10.0,
                          "noise_sigma": 0.03, "distance": "l2"}},
    "vgg": {"dataset": "skin", "arch": "vgg16", "defense": {"name": "none"}},
    "surrogate": {"dataset": "skin", "arch": "resnet18", "defense": {"name": "none"}},
}


@pytest.fixture(scope="module")
def tables():
    evaluations = [evaluation(model, correct_on(stop)) for model, stop in
                   {**CLEAN, "surrogate": 30}.items()]
    for model, runs in TRANSFER.items():
        evaluations += [attacked(model, name, eps, "surrogate", stop)
                        for (name, eps), stop in runs.items()]
    for model, runs in WHITE_BOX.items():
        evaluations += [attacked(model, name, eps, model, stop)
                        for (name, eps), stop in runs.items()]
    summary = summarize(evaluations, {}, StatisticsConfig())
    return defense_tables(summary.robustness, CONFIGS)


def accuracy_and_interval(cell):
    return cell["accuracy"], cell["accuracy_low"], cell["accuracy_high"]


def expected(stop):
    exact = clopper_pearson(stop, N)
    return pytest.approx((stop / N, exact.low, exact.high))


def test_one_table_per_architecture_and_attack_source(tables):
    keys = [(t.dataset, t.arch, t.threat_model, t.source_model, t.source_arch) for t in tables]
    assert keys == [
        ("skin", "resnet18", "transfer", "surrogate", "resnet18"),
        ("skin", "resnet18", "white-box", None, None),
        ("skin", "vgg16", "transfer", "surrogate", "resnet18")]  # vgg: no white-box attack ran
    assert "transferred from surrogate (resnet18)" in tables[0].title
    assert "white-box" in tables[1].title


def test_rows_are_the_targets_defense_settings(tables):
    transfer, white_box, vgg = tables
    for table in (transfer, white_box):
        assert [(row.model, row.label) for row in table.rows] == [
            ("weak", "λn 0.1, λa 0"), ("paper", "λn 1, λa 10, distance l2")]
    assert [(row.model, row.label) for row in vgg.rows] == [("vgg", "none")]


def test_columns_are_what_ran_clean_then_attacks_then_worst_cases(tables):
    transfer, white_box, _ = tables
    assert transfer.columns == [
        "clean", f"{FGSM} ε=4/255", f"{FGSM} ε=8/255", f"{IFGSM} ε=4/255", f"{IFGSM} ε=8/255",
        f"{CW} ε=0.5", "worst case L∞ ε=4/255", "worst case L∞ ε=8/255", "worst case L2 ε=0.5"]
    assert white_box.columns == [
        "clean", f"{FGSM} ε=4/255", f"{FGSM} ε=8/255", f"{IFGSM} ε=4/255", f"{IFGSM} ε=8/255",
        "worst case L∞ ε=4/255", "worst case L∞ ε=8/255"]


def test_cells_hold_accuracy_with_its_exact_interval(tables):
    transfer, white_box, _ = tables
    for table, runs in ((transfer, TRANSFER), (white_box, WHITE_BOX)):
        for row in table.rows:
            assert accuracy_and_interval(row.cells[0]) == expected(CLEAN[row.model])
            attacks = [(name, eps) for name, eps in runs[row.model]]
            attacks.sort(key=lambda attack: list(ATTACKS).index(attack[0]))
            for (name, eps), cell in zip(attacks, row.cells[1:]):
                assert (cell["attack"], cell["epsilon"]) == (name, eps)
                assert accuracy_and_interval(cell) == expected(runs[row.model][(name, eps)])
                assert cell["auc"] is not None and not np.isnan(cell["auc"])
    # the worst case keeps an image only if every attack at the budget left it right
    weak = transfer.rows[0]
    assert accuracy_and_interval(weak.cells[6]) == expected(18)  # min(FGSM 20, I-FGSM 18) at ε 4
    assert accuracy_and_interval(weak.cells[7]) == expected(10)
    assert accuracy_and_interval(weak.cells[8]) == expected(25)  # C&W alone at L2 0.5
    assert np.isnan(weak.cells[7]["auc"])
    paper = white_box.rows[1]
    assert [cell["condition"] for cell in paper.cells[1:3]] == [
        "fgsm-eps4-from-paper", "fgsm-eps8-from-paper"]
    assert accuracy_and_interval(paper.cells[6]) == expected(3)


def test_the_csv_holds_one_line_per_cell_in_page_order(tables):
    frame = defense_table_frame(tables)
    assert list(frame.columns) == list(DEFENSE_TABLE_COLUMNS)
    assert len(frame) == 2 * 9 + 2 * 7 + 1 * 9
    line = frame[(frame["model"] == "paper") & (frame["threat_model"] == "transfer")
                 & (frame["column"] == f"{IFGSM} ε=8/255")].iloc[0]
    assert (line["lambda_n"], line["lambda_a"], line["distance"], line["setting"]) == (
        1.0, 10.0, "l2", "λn 1, λa 10, distance l2")
    assert (line["accuracy"], line["accuracy_low"], line["accuracy_high"]) == expected(27)
    assert line["source_model"] == "surrogate" and line["source_arch"] == "resnet18"
    assert pd.isna(frame.loc[frame["model"] == "vgg", "lambda_n"]).all()


def test_a_second_transfer_source_gets_its_own_table():
    evaluations = [evaluation("paper", correct_on(32)),
                   attacked("paper", "fgsm", 8, "surrogate", 20),
                   attacked("paper", "fgsm", 8, "other", 25)]
    configs = {**CONFIGS, "other": {"dataset": "skin", "arch": "vgg16"}}
    first, second = defense_tables(summarize(evaluations, {}, StatisticsConfig()).robustness,
                                   configs)
    assert (first.source_model, second.source_model) == ("surrogate", "other")
    assert second.source_arch == "vgg16"
    assert accuracy_and_interval(first.rows[0].cells[1]) == expected(20)
    assert accuracy_and_interval(second.rows[0].cells[1]) == expected(25)
    # the summary's transfer worst case spans both sources: its header says so
    assert first.columns[2] == "worst case L∞ ε=8/255 over transfers from other, surrogate"
    assert accuracy_and_interval(first.rows[0].cells[2]) == expected(20)


def test_a_row_label_shows_a_denoiser_and_says_none_without_a_defense():
    assert setting_label(defense_setting({"defense": {"name": "none"}})) == "none"
    assert setting_label(defense_setting({})) == "none"
    setting = defense_setting({"denoiser": "reformer",
                               "defense": {"name": "denoising", "lambda_n": 1, "lambda_a": 0}})
    assert setting_label(setting) == "denoiser reformer, λn 1, λa 0"
