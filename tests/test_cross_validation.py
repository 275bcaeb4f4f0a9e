"""k-fold cross-validation of slide classifiers: stratified seeded folds over the train and
val slides, one model per fold validated on its own fold, each scored on the fixed test
split, and the mean and spread across folds."""

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from medrobust.errors import ConfigError, InputError
from medrobust.evaluate.cross_validation import SPREAD, evaluate_folds
from medrobust.evaluate.statistics import across_folds
from medrobust.train.slide_classifier import SlideBag, cv_folds, fold_split
from test_mil import _synthetic_slides, _train


@pytest.mark.parametrize("counts, k", [((13, 8), 5), ((6, 6), 3), ((7, 2), 2)])
def test_folds_are_stratified_disjoint_and_seeded(counts, k):
    labels = [0] * counts[0] + [1] * counts[1]
    folds = cv_folds(labels, k, seed=3)
    assert len(folds) == len(labels) and set(folds) <= set(range(k))
    for label, count in enumerate(counts):  # every fold holds its share of each class
        per_fold = Counter(fold for fold, value in zip(folds, labels) if value == label)
        assert sorted(per_fold[fold] for fold in range(k)) in (
            [count // k] * (k - count % k) + [count // k + 1] * (count % k),)
    sizes = Counter(folds)
    assert max(sizes.values()) - min(sizes[fold] for fold in range(k)) <= 1
    assert cv_folds(labels, k, seed=3) == folds
    assert any(cv_folds(labels, k, seed=seed) != folds for seed in range(4, 10))


def test_a_fold_validates_on_its_own_slides_and_never_sees_the_test_split():
    bags = [SlideBag(f"s{i:02d}", i % 2, ["train", "val", "test"][i % 3], None)
            for i in range(30)]
    pool = {bag.slide_id for bag in bags if bag.split != "test"}
    vals = []
    for fold in range(4):
        train, val = fold_split(bags, 4, fold, seed=0)
        assert {bag.slide_id for bag in train} | {bag.slide_id for bag in val} == pool
        assert not {bag.slide_id for bag in train} & {bag.slide_id for bag in val}
        vals.append({bag.slide_id for bag in val})
    assert set().union(*vals) == pool and sum(map(len, vals)) == len(pool)  # a partition
    # the store order does not change the folds
    assert fold_split(bags[::-1], 4, 2, seed=0)[1] == fold_split(bags, 4, 2, seed=0)[1]
    with pytest.raises(ConfigError, match="fold 4"):
        fold_split(bags, 4, 4, seed=0)
    with pytest.raises(InputError, match="fewer than 2 per fold"):
        fold_split(bags[:6], 4, 0, seed=0)


def test_spread_is_the_standard_deviation_across_folds():
    assert across_folds([0.6, 0.8, 1.0]) == {"mean": pytest.approx(0.8),
                                             "sd": pytest.approx(0.2), "n": 3}
    assert across_folds([0.5, None, 0.7]) == {"mean": pytest.approx(0.6),
                                              "sd": pytest.approx(0.02 ** 0.5), "n": 2}
    assert across_folds([None]) == {"mean": None, "sd": None, "n": 0}


def test_each_fold_model_is_scored_on_the_test_split(tmp_path):
    paths = _synthetic_slides(tmp_path / "features", counts={"train": 12, "val": 6, "test": 6})
    folders = [tmp_path / "abmil" / "folds" / str(fold) for fold in range(3)]
    histories = []
    for fold, folder in enumerate(folders):
        histories.append(_train(paths, folder, epochs=4, cv_folds=3,
                                fold_arguments={"fold": fold}))
        config = json.loads((folder / "config.json").read_text())
        cv = config["training"]["cv"]
        assert (cv["folds"], cv["fold"], len(cv["val_slides"])) == (3, fold, 6)
        assert not any(slide.startswith("test") for slide in cv["val_slides"])
    result = evaluate_folds(folders, paths, tmp_path / "cv.json", tmp_path / "cv.csv")
    assert result["model"] == "abmil" and result["folds"] == 3 and result["spread"] == SPREAD
    rows = result["per_fold"]
    assert [row["fold"] for row in rows] == [0, 1, 2] and all(row["n_test"] == 6 for row in rows)
    for row, history in zip(rows, histories):
        kept = history["epochs"][history["best_epoch"] - 1]
        assert row["best_epoch"] == history["best_epoch"] and row["val_auc"] == kept["val_auc"]
    for key in ("val_auc", "test_accuracy", "test_auc"):
        values = [row[key] for row in rows]
        assert result["across_folds"][key]["mean"] == pytest.approx(np.mean(values))
        assert result["across_folds"][key]["sd"] == pytest.approx(np.std(values, ddof=1))
    table = pd.read_csv(tmp_path / "cv.csv", dtype={"fold": str})
    assert list(table["fold"]) == ["0", "1", "2", "mean", "sd"]
    with pytest.raises(ConfigError, match="without cv_folds"):
        _train(paths, tmp_path / "plain", epochs=1, fold_arguments={"fold": 0})
