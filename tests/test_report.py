"""The summary tables (intervals, worst cases, paired verdicts), the figures and the page.

A miniature result tree (dataset folder, image stores, predictions, metrics,
trained-model folders) is written with known per-image correctness, so every
number the summary and the page state can be checked against a hand count.
"""

import base64
import dataclasses
import io
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from medrobust import config as config_module
from medrobust.attacks import build_attack
from medrobust.data.manifest import write_dataset
from medrobust.errors import ConfigError, InputError
from medrobust.evaluate.metrics import METRIC_KEYS, Evaluation
from medrobust.evaluate.operating_point import choose_operating_point
from medrobust.evaluate.statistics import clopper_pearson, holm_adjusted, operating_threshold
from medrobust.io.atomic import atomic_path, write_json
from medrobust.io.image_store import write_image_store
from medrobust.io.slide_stores import create_tile_store
from medrobust.perturbations import GaussianNoise
from medrobust.report import figures, page
from medrobust.report.page import (Predictions, mil_headline, one_class_models, recipe_rows,
                                   write_report)
from medrobust.report.provenance import EVERY_RUN, applicable_config, stages_run
from medrobust.report.summary import (
    SUMMARY_COLUMNS, StatisticsConfig, summarize, summarize_evaluations)
from workflow_runner import ROOT

PNG = b"\x89PNG\r\n\x1a\n"
CLASSES = ["benign", "malignant"]
N_TEST = 40
LABELS = np.array([0, 1] * (N_TEST // 2))
IDS = [f"m{i:03d}" for i in range(N_TEST)]
STATISTICS = {"bootstrap_resamples": 1000, "confidence": 0.95, "alpha": 0.05, "seed": 0}


def correct_on(*ranges):
    mask = np.zeros(N_TEST, bool)
    for start, stop in ranges:
        mask[start:stop] = True
    return mask


# per (model, condition): which test images the model gets right
OUTCOMES = {
    ("baseline", "clean"): correct_on((0, 34)),
    ("baseline", "fgsm-eps8-from-surrogate"): correct_on((0, 20)),
    ("baseline", "ifgsm-eps8-from-surrogate"): correct_on((10, 30)),
    ("baseline", "fgsm-eps2.5-from-surrogate"): correct_on((0, 30)),
    ("baseline", "fgsm-eps8-from-baseline"): correct_on((0, 2)),
    ("baseline", "gaussian_noise-severity0.05"): correct_on((0, 30)),
    ("baseline", "gaussian_noise-severity0.1"): correct_on((0, 20)),
    ("denoising", "clean"): correct_on((0, 33)),
    ("denoising", "fgsm-eps8-from-surrogate"): correct_on((0, 38)),
    ("denoising", "ifgsm-eps8-from-surrogate"): correct_on((0, 37)),
    ("denoising", "fgsm-eps2.5-from-surrogate"): correct_on((0, 31)),
    ("denoising", "fgsm-eps8-from-denoising"): correct_on((0, 3)),
    ("denoising", "gaussian_noise-severity0.05"): correct_on((0, 30)),
    ("denoising", "gaussian_noise-severity0.1"): correct_on((0, 21)),
    ("surrogate", "clean"): correct_on((0, 30)),
}


def describe(model, condition):
    """The metrics JSON's description of a condition named as the workflow names it."""
    fields = dict.fromkeys(METRIC_KEYS)
    fields.update(family="image", model=model, dataset="mammograms", condition=condition,
                  kind="clean")
    match = re.fullmatch(r"(\w+)-eps([\d.]+)-from-(\w+)", condition)
    if match:
        fields.update(kind="attack", attack=match[1], epsilon=float(match[2]), norm="linf",
                      source_model=match[3], white_box=match[3] == model)
    match = re.fullmatch(r"(\w+)-severity([\d.]+)", condition)
    if match:
        fields.update(kind="perturbation", perturbation=match[1], severity=float(match[2]))
    return fields


def store_path(root, condition):
    return str(root / "stores" / f"{condition.replace('-from-' , '_from_')}.zarr")


def lesion_folder(root):
    """A lesion visibility run's output for `mammograms`, as its job writes it."""
    folder = root / "mammograms"
    folder.mkdir(parents=True)
    levels = [("clean", None), ("lowpass-8", 8.0), ("lowpass-2", 2.0)]
    pd.DataFrame([{"level": level, "radius": radius, "lesion_type": kind, "n_lesions": 10,
                   "n_images": 4, "cnr_mean": 3.0, "cnr_median": 2.9, "detectable": 0.7,
                   "detectable_low": 0.35, "detectable_high": 0.93}
                  for level, radius in levels for kind in ("mass", "calcification")]
                 ).to_csv(folder / "visibility.csv", index=False)
    pd.DataFrame([{"model": "baseline", "level": level, "radius": radius, "group": group,
                   "n_positives": 5, "sensitivity": 0.6, "sensitivity_low": 0.15,
                   "sensitivity_high": 0.95}
                  for level, radius in levels for group in ("calcification only", "mass only")]
                 ).to_csv(folder / "sensitivity.csv", index=False)
    crop = np.full((3, 16, 16), 0.4, np.float32)
    np.savez_compressed(folder / "crops.npz", radii=np.array([np.inf, 8.0, 2.0]), image_shape=[8, 8],
                        calcification=crop, calcification_sample=np.array("m1"),
                        mass=crop, mass_sample=np.array("m2"))
    return folder


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """The miniature result tree and the summary written from it."""
    root = tmp_path_factory.mktemp("results")
    rng = np.random.default_rng(0)
    # the raw dataset: 20 train, 40 test
    dataset = root / "resources" / "mammograms"
    dataset.mkdir(parents=True)
    # two test images per patient (the manifest's group column)
    rows = [{"sample_id": sample, "path": f"{sample}.dcm", "label": CLASSES[label],
             "split": "test", "sha256": "0" * 64, "group": f"p{index // 2}"}
            for index, (sample, label) in enumerate(zip(IDS, LABELS))]
    rows += [{"sample_id": f"t{i}", "path": f"t{i}.dcm", "label": CLASSES[i % 2],
              "split": "train", "sha256": "0" * 64, "group": f"q{i}"} for i in range(20)]
    write_dataset(dataset, rows, CLASSES, "images", ("group",))
    clean = rng.uniform(0, 1, (N_TEST, 1, 8, 8)).astype(np.float32)
    attrs = {"dataset": "mammograms", "classes": CLASSES,
             "rejected": [{"sample_id": "m999", "path": "m999.dcm",
                           "reason": "m999.dcm: truncated DICOM"}]}
    write_image_store(store_path(root, "clean"), clean, LABELS, ["test"] * N_TEST, IDS, attrs)
    evaluations = []
    for (model, condition), correct in OUTCOMES.items():
        description = describe(model, condition)
        if condition != "clean" and not (root / store_path(root, condition)).exists():
            extra = {key: description[key] for key in ("attack", "epsilon", "source_model",
                                                        "perturbation", "severity")
                     if description[key] is not None}
            changed = np.clip(clean + rng.choice([-2 / 255, 2 / 255], clean.shape), 0, 1)
            write_image_store(store_path(root, condition), changed, LABELS, ["test"] * N_TEST,
                              IDS, {**attrs, **extra})
        true_probability = np.where(correct, 0.8, 0.3) + rng.uniform(-0.05, 0.05, N_TEST)
        probabilities = np.zeros((N_TEST, 2))
        probabilities[np.arange(N_TEST), LABELS] = true_probability
        probabilities[np.arange(N_TEST), 1 - LABELS] = 1 - true_probability
        stem = root / "evaluate" / model / condition
        stem.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"sample_id": IDS, "label": LABELS, "prediction": probabilities.argmax(1),
                      "correct": correct, "prob_benign": probabilities[:, 0],
                      "prob_malignant": probabilities[:, 1]}).to_csv(f"{stem}.csv", index=False)
        (stem.parent / f"{condition}.json").write_text(json.dumps(
            {**description, "n": N_TEST, "accuracy": float(correct.mean()), "auc": 0.5}))
        operating_point = stem.parent / "operating_point.json"
        if not operating_point.exists():  # chosen on 12 val images, as the evaluation does
            val_labels = np.array([0, 1] * 6)
            val_scores = np.clip(0.3 + 0.4 * val_labels + rng.normal(0, 0.2, 12), 0, 1)
            write_json(operating_point, choose_operating_point(
                model, val_labels, np.stack([1 - val_scores, val_scores], axis=1), CLASSES))
        evaluations.append({"family": "image", "model": model, "dataset": "mammograms",
                            "condition": condition, "store": store_path(root, condition),
                            "metrics": f"{stem}.json", "predictions": f"{stem}.csv",
                            "operating_point": str(operating_point)})
    models = {}
    for model in ("baseline", "denoising", "surrogate"):
        folder = root / "models" / model
        folder.mkdir(parents=True)
        defense = ({"name": "denoising", "lambda_n": 1.0} if model == "denoising"
                   else {"name": "none"})
        (folder / "config.json").write_text(json.dumps(
            {"family": "image", "arch": "resnet18", "dataset": "mammograms", "seed": 0,
             "defense": defense}))
        (folder / "history.json").write_text(json.dumps({
            "epochs": [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e,
                        "val_accuracy": 0.5 + e / 10} for e in (1, 2, 3)],
            # the denoising model's validation never beat its first epoch
            "best_epoch": 1 if model == "denoising" else 2, "selected_by": "val_accuracy",
            "device": "cpu",
            "recipe": {"optimizer": "AdamW", "learning_rate": 0.001, "weight_decay": 0.0001,
                       "schedule": "constant", "batch_size": 16, "epochs": 3,
                       "augmentation": "random horizontal and vertical flips",
                       "defense": defense}}))
        models[model] = str(folder)
    out = root / "report"
    summarize_evaluations(evaluations, {"baseline": "none", "denoising": "denoising",
                                        "surrogate": "none"}, STATISTICS,
                          out / "robustness.csv", out / "robustness.json",
                          out / "per_class.csv", out / "comparisons.csv")
    config = {
        "device": "cpu", "seed": 0,
        "datasets": {"mammograms": {"kind": "images", "classes": CLASSES,
                                    "source": {"type": "local", "root": "/data/<script>x</script>"},
                                    "preprocess": {"image_size": 8},
                                    "tiling": {"tile_size": 224}},
                     "unused": {"kind": "images", "source": {"type": "synthetic"}}},
        "image_classifiers": {m: {"dataset": "mammograms", "arch": "resnet18"} for m in models},
        "slide_classifiers": {}, "features": {"backbone": "resnet18"},
        "attacks": {"fgsm": {"epsilons": [2.5, 8]}}, "robustness": {"targets": ["baseline"]},
    }
    config["image_classifiers"]["denoising"]["defense"] = {"name": "denoising"}
    heatmap = root / "fourier_heatmap" / "baseline.csv"
    heatmap.parent.mkdir()
    pd.DataFrame([{"model": "baseline", "dataset": "mammograms", "row_frequency": i,
                   "column_frequency": j, "norm": 4.0, "n": N_TEST, "errors": abs(i) + abs(j),
                   "error_rate": (abs(i) + abs(j)) / N_TEST}
                  for i in (-4, 0, 4) for j in (-4, 0, 4)]).to_csv(heatmap, index=False)
    config["lesion_visibility"] = {"k": 2.5}
    write_report(out / "robustness.json", out / "index.html", out / "figures",
                 out / "defense_tables.csv", evaluations=evaluations, models=models, datasets=[str(dataset)],
                 settings={"n_examples": 2, "small_test_set": 200}, config=config,
                 repository=str(root), heatmaps={"baseline": str(heatmap)},
                 lesion_folders=[lesion_folder(root / "lesions")],
                 slide_comparisons_csv=out / "slide_comparisons.csv")
    return {"root": root, "out": out, "evaluations": evaluations}


def table(results, name):
    return pd.read_csv(results["out"] / f"{name}.csv", dtype={"epsilon": str, "severity": str})


def row(frame, model, condition):
    rows = frame[(frame["model"] == model) & (frame["condition"] == condition)]
    assert len(rows) == 1, (model, condition)
    return rows.iloc[0]


def test_every_number_has_its_interval(results):
    robustness = table(results, "robustness")
    assert list(robustness.columns) == list(SUMMARY_COLUMNS)
    for metric in ("accuracy", "balanced_accuracy", "sensitivity", "specificity"):
        values = robustness.dropna(subset=[metric])
        assert len(values) > 0
        assert (values[f"{metric}_low"] <= values[metric] + 1e-9).all()
        assert (values[metric] <= values[f"{metric}_high"] + 1e-9).all()
    clean = row(robustness, "baseline", "clean")
    exact = clopper_pearson(34, N_TEST)
    assert clean["accuracy"] == pytest.approx(34 / N_TEST)
    assert (clean["accuracy_low"], clean["accuracy_high"]) == pytest.approx(
        (exact.low, exact.high), abs=1e-4)
    assert clean["positive_class"] == "malignant"
    # sensitivity of malignant: the odd indices below 34 are right, 17 of 20
    assert clean["sensitivity"] == pytest.approx(17 / 20)


def test_sensitivity_at_the_clean_operating_point_keeps_the_clean_threshold(results):
    robustness = table(results, "robustness")
    evaluations = {(e["model"], e["condition"]): pd.read_csv(e["predictions"])
                   for e in results["evaluations"]}
    record = next(e for e in results["evaluations"] if e["model"] == "baseline")
    threshold = row(robustness, "baseline", "clean")["clean_threshold"]
    # the evaluation's choice on the val split, not one refitted to the test images
    assert threshold == pytest.approx(
        json.loads(open(record["operating_point"]).read())["threshold"], abs=1e-6)
    clean = evaluations[("baseline", "clean")]
    assert threshold != operating_threshold(clean["label"], clean["prob_malignant"])
    for condition in ("clean", "gaussian_noise-severity0.1", "fgsm-eps8-from-surrogate"):
        frame = evaluations[("baseline", condition)]
        summary = row(robustness, "baseline", condition)
        assert summary["clean_threshold"] == threshold  # chosen once, on clean images
        caught = int((frame["prob_malignant"][frame["label"] == 1] >= threshold).sum())
        assert summary["sensitivity_at_clean_threshold"] == pytest.approx(caught / 20, abs=1e-4)
        exact = clopper_pearson(caught, 20)
        assert (summary["sensitivity_at_clean_threshold_low"],
                summary["sensitivity_at_clean_threshold_high"]) == pytest.approx(
            (exact.low, exact.high), abs=1e-4)


def test_sweep_curves_show_accuracy_auc_and_sensitivity_in_the_perturbations_units(results):
    summary = json.loads((results["out"] / "robustness.json").read_text())
    robustness = pd.DataFrame(summary["robustness"])
    robustness["severity"] = pd.to_numeric(robustness["severity"])
    figure = figures.perturbation_curves(robustness)
    axes = [panel for panel in figure.axes if panel.get_ylabel() or panel.get_xlabel()]
    assert [panel.get_ylabel() for panel in figure.axes] == [
        "accuracy (fraction of test images)", "AUC", "sensitivity at the clean operating point"]
    assert figure.axes[-1].get_xlabel() == GaussianNoise.severity_unit
    assert "σ" in GaussianNoise.severity_unit
    assert all(panel.collections for panel in axes)  # the interval bands
    page = (results["out"] / "index.html").read_text()
    assert f"gaussian_noise: {GaussianNoise.severity_unit}" in page


def test_epsilon_and_severity_are_written_as_given(results):
    robustness = table(results, "robustness")
    assert set(robustness["epsilon"].dropna()) == {"2.5", "8"}
    assert set(robustness["severity"].dropna()) == {"0.05", "0.1"}
    assert "worst-case-linf-eps2.5-transfer" in set(robustness["condition"])


def test_worst_case_counts_an_image_only_if_it_survives_every_attack(results):
    robustness = table(results, "robustness")
    worst = row(robustness, "baseline", "worst-case-linf-eps8-transfer")
    # fgsm keeps images 0-19, ifgsm 10-29: both only 10-19
    assert worst["accuracy"] == pytest.approx(10 / N_TEST)
    assert worst["kind"] == "worst_case" and worst["attack"] == "fgsm+ifgsm"
    assert pd.isna(worst["auc"])
    assert row(robustness, "baseline", "worst-case-linf-eps8-white-box")["accuracy"] == pytest.approx(
        2 / N_TEST)
    mean = row(robustness, "baseline", "mean-perturbation")
    assert mean["accuracy"] == pytest.approx((30 + 20) / (2 * N_TEST))
    assert mean["accuracy_low"] < mean["accuracy"] < mean["accuracy_high"]


def test_defense_is_judged_by_a_paired_test_on_the_same_images(results):
    comparisons = table(results, "comparisons")
    assert set(comparisons["reference_model"]) == {"baseline"}  # the surrogate is not attacked
    worst = row(comparisons, "denoising", "worst-case-linf-eps8-transfer")
    # denoising survives both attacks on 0-36, baseline on 10-19
    assert (worst["only_model_correct"], worst["only_reference_correct"]) == (27, 0)
    assert worst["verdict"] == "helped" and worst["p_value"] < 0.001
    assert worst["accuracy_difference"] == pytest.approx((37 - 10) / N_TEST)
    assert worst["accuracy_difference_low"] > 0
    clean = row(comparisons, "denoising", "clean")
    assert (clean["only_reference_correct"], clean["only_model_correct"]) == (1, 0)
    assert clean["verdict"] == "no detectable difference"
    assert clean["accuracy_difference_low"] < 0 <= clean["accuracy_difference_high"]
    assert clean["smallest_detectable_difference"] == pytest.approx(6 / N_TEST)
    # the mean over perturbations: the exact sign-flip test on per-image counts (image 20 only)
    mean = row(comparisons, "denoising", "mean-perturbation")
    assert mean["test"] == "exact sign-flip test" and mean["p_value"] == 1.0
    assert (mean["only_model_correct"], mean["only_reference_correct"]) == (1, 0)
    assert mean["verdict"] == "no detectable difference"
    # 6 images one perturbation (of 2) apart, not 6 images
    assert mean["smallest_detectable_difference"] == pytest.approx(6 / N_TEST / 2)
    white_box = row(comparisons, "denoising", "fgsm-eps8-from-denoising")
    assert white_box["threat_model"] == "white-box"  # paired with the baseline's own white-box


def test_an_adjusted_verdict_gets_the_auc_caveat_against_it():
    """Holm turned "helped" into "no detectable difference"; the AUC interval above 0 then
    disagrees with the verdict shown, and the caveat must say so (it was computed against the
    unadjusted verdict and left out)."""
    from medrobust.report.summary import _judged_as_families

    def headline(kind, p_value, verdict):
        return {"dataset": "d", "reference_model": "r", "model": "m", "kind": kind,
                "p_value": p_value, "verdict": verdict, "auc_difference": 0.04,
                "auc_difference_low": 0.01, "auc_difference_high": 0.07}

    rows = _judged_as_families([headline("clean", 0.03, "helped"),
                                headline("worst_case", 0.2, "no detectable difference"),
                                headline("worst_case", 0.03, "helped")], 0.05)
    assert [row["family_verdict"] for row in rows] == ["no detectable difference"] * 3
    assert [row["family_auc_caveat"] for row in rows] == ["AUC higher"] * 3


def test_a_pairs_headline_verdicts_are_judged_as_one_family(results):
    comparisons = table(results, "comparisons")
    pair = comparisons[comparisons["model"] == "denoising"]
    headline = pair[pair["kind"].isin(["clean", "worst_case", "mean_perturbation"])]
    assert len(headline) > 2
    np.testing.assert_allclose(headline["family_p_value"],
                               holm_adjusted(headline["p_value"].to_numpy()), atol=1e-6)
    assert (headline["family_p_value"] >= headline["p_value"] - 1e-9).all()
    significant = headline["family_p_value"] < STATISTICS["alpha"]
    assert (headline["family_verdict"][significant] == headline["verdict"][significant]).all()
    assert (headline["family_verdict"][~significant] == "no detectable difference").all()
    rest = pair[~pair.index.isin(headline.index)]
    assert len(rest) and rest["family_p_value"].isna().all()
    assert rest["family_verdict"].isna().all()
    # the page's list of verdicts shows the adjusted verdict and both p-values
    html = (results["out"] / "index.html").read_text()
    assert "Holm-adjusted p" in html and "alone p" in html


def test_per_class_numbers_and_confusion_matrices(results):
    per_class = table(results, "per_class")
    clean = per_class[(per_class["model"] == "baseline") & (per_class["condition"] == "clean")]
    assert list(clean["class"]) == CLASSES and list(clean["support"]) == [20, 20]
    summary = json.loads((results["out"] / "robustness.json").read_text())
    matrix = next(item for item in summary["confusion_matrices"]
                  if item["model"] == "baseline" and item["condition"] == "clean")
    assert matrix["matrix"] == [[17, 3], [3, 17]]
    assert summary["settings"]["n_resamples"] == 1000


def test_a_prediction_table_that_disagrees_with_its_metrics_is_refused(results, tmp_path):
    record = dict(results["evaluations"][0])
    metrics = json.loads(open(record["metrics"]).read())
    (tmp_path / "m.json").write_text(json.dumps({**metrics, "n": 39}))
    record["metrics"] = str(tmp_path / "m.json")
    with pytest.raises(InputError, match=r"clean\.csv: 40 rows.*n = 39"):
        summarize_evaluations([record], {}, STATISTICS, *(tmp_path / f"{name}" for name in
                                                          ("a.csv", "a.json", "b.csv", "c.csv")))
    assert not list(tmp_path.glob("a.*"))


@pytest.mark.parametrize("edit", [{"epsilon": "four"}, {"kind": "perturbation"},
                                  {"kind": "attacked"}])
def test_a_metrics_json_that_describes_no_condition_is_refused(results, tmp_path, edit):
    """A budget that is not a number raised a bare ValueError in the summary's pairing."""
    record = dict(next(r for r in results["evaluations"] if r["condition"] != "clean"
                       and "eps" in r["condition"]))
    metrics = json.loads(open(record["metrics"]).read())
    (tmp_path / "m.json").write_text(json.dumps({**metrics, **edit}))
    record["metrics"] = str(tmp_path / "m.json")
    with pytest.raises(InputError, match=r"m\.json: kind .* describes no condition"):
        summarize_evaluations([record], {}, STATISTICS, *(tmp_path / f"{name}" for name in
                                                          ("a.csv", "a.json", "b.csv", "c.csv")))


@pytest.mark.parametrize("column, value", [
    ("prob_malignant", "5.0"), ("prob_malignant", "abc"), ("prob_benign", ""), ("label", "7")])
def test_a_damaged_prediction_table_is_refused_naming_the_line(results, tmp_path, column,
                                                               value):
    """A probability of 5 would have entered the statistics as a number; a word or an
    empty cell raised a bare ValueError that named no file."""
    record = dict(results["evaluations"][0])
    table = pd.read_csv(record["predictions"], dtype=str, keep_default_na=False)
    table.loc[3, column] = value
    table.to_csv(tmp_path / "damaged.csv", index=False)
    record["predictions"] = str(tmp_path / "damaged.csv")
    with pytest.raises(InputError, match=r"damaged\.csv: line 5: .*the table is damaged"):
        summarize_evaluations([record], {}, STATISTICS, *(tmp_path / f"{name}" for name in
                                                          ("a.csv", "a.json", "b.csv", "c.csv")))


def test_the_example_figures_read_predictions_as_the_summary_does(results, tmp_path):
    """The report reads each evaluation's table itself (after summarize, which Snakemake
    does not rerun for a file edited inside its folder): a row gone is an error naming it."""
    record = dict(results["evaluations"][0])
    predictions = Predictions([record])
    assert predictions.lookup(record["model"], record["condition"], IDS[0])[0] in CLASSES
    lines = open(record["predictions"]).read().splitlines()
    (tmp_path / "cut.csv").write_text("\n".join(lines[:-1]) + "\n")
    record["predictions"] = str(tmp_path / "cut.csv")
    with pytest.raises(InputError, match=r"cut\.csv: 39 rows, but .* counts n = 40"):
        Predictions([record]).lookup(record["model"], record["condition"], IDS[0])


def test_too_few_bootstrap_resamples_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="bootstrap_resamples"):
        summarize_evaluations([], {}, {**STATISTICS, "bootstrap_resamples": 100},
                              *(tmp_path / name for name in ("a.csv", "a.json", "b.csv", "c.csv")))


def test_curves_have_bands_unit_labels_and_legends_clear_of_the_data(results):
    summary = json.loads((results["out"] / "robustness.json").read_text())
    robustness = pd.DataFrame(summary["robustness"])
    robustness["epsilon"] = pd.to_numeric(robustness["epsilon"])
    figure = figures.attack_curves(robustness)
    figure.draw_without_rendering()
    axes = figure.axes
    assert [panel.get_title() for panel in axes] == ["fgsm", "ifgsm", "worst case over L∞ attacks"]
    assert all("1/255" in panel.get_xlabel() for panel in axes)
    assert "fraction of test images" in axes[0].get_ylabel()
    assert all(panel.collections for panel in axes)  # the interval bands
    legend = figure.legends[0].get_window_extent()
    assert not any(legend.overlaps(panel.get_window_extent()) for panel in axes)
    assert figures.png(figure).startswith(PNG)


def test_slide_training_curves_plot_validation_auc_and_loss_per_epoch():
    history = {"best_epoch": 2, "epochs": [
        {"epoch": 1, "train_loss": 0.7, "val_loss": 0.69, "val_accuracy": 0.5, "val_auc": 0.6},
        {"epoch": 2, "train_loss": 0.5, "val_loss": 0.55, "val_accuracy": 0.75, "val_auc": 0.9},
        {"epoch": 3, "train_loss": 0.4, "val_loss": 0.60, "val_accuracy": 0.75, "val_auc": 0.8}]}
    figure = figures.training_curves({"abmil": history})
    panels = {panel.get_title(): panel for panel in figure.axes}
    assert {"validation AUC", "validation loss (cross-entropy)"} <= set(panels)
    auc_line = panels["validation AUC"].get_lines()[0]
    assert list(auc_line.get_ydata()) == [0.6, 0.9, 0.8]
    star = panels["validation AUC"].get_lines()[1]  # the kept epoch
    assert list(star.get_xdata()) == [2] and list(star.get_ydata()) == [0.9]
    loss_line = panels["validation loss (cross-entropy)"].get_lines()[0]
    assert list(loss_line.get_ydata()) == [0.69, 0.55, 0.60]
    # image models record no AUC per epoch: no empty panel for them
    image = {"best_epoch": 1, "epochs": [{"epoch": 1, "train_loss": 0.7, "val_loss": 0.6,
                                          "val_accuracy": 0.5}]}
    titles = [panel.get_title() for panel in figures.training_curves({"baseline": image}).axes]
    assert "validation AUC" not in titles


def test_a_training_history_without_its_epochs_is_refused_naming_it(results, tmp_path):
    """The training curves met it as a KeyError naming no file."""
    folder = shutil.copytree(results["root"] / "models" / "baseline", tmp_path / "baseline")
    history = json.loads((folder / "history.json").read_text())
    (folder / "history.json").write_text(json.dumps({**history, "best_epoch": 99}))
    with pytest.raises(InputError, match=r"baseline/history\.json: the epoch kept, 99, is not "
                                         r"among its epochs"):
        page.read_histories({"baseline": str(folder)})
    del history["epochs"]
    (folder / "history.json").write_text(json.dumps(history))
    with pytest.raises(InputError, match=r"baseline/history\.json: the training history lacks "
                                         r"epochs"):
        page.read_histories({"baseline": str(folder)})


@pytest.mark.parametrize("damage, match", [
    (lambda summary: summary["robustness"][1].update(accuracy="high"),
     r"robustness\.json: robustness row 2: accuracy must be a number"),
    (lambda summary: summary.pop("gradient_masking"),
     r"robustness\.json: the robustness summary lacks gradient_masking"),
])
def test_a_damaged_summary_is_refused_naming_it(results, tmp_path, damage, match):
    """A word for a number gave a raw ValueError, a lost table a KeyError."""
    summary = json.loads((results["out"] / "robustness.json").read_text())
    damage(summary)
    (tmp_path / "robustness.json").write_text(json.dumps(summary))
    with pytest.raises(InputError, match=match):
        page.load_summary(tmp_path / "robustness.json")


def test_lesion_visibility_section_shows_visibility_beside_sensitivity(results):
    page = (results["out"] / "index.html").read_text()
    section = page[page.index('id="lesions"'):]
    assert "Mammography: microcalcification visibility" in section
    assert "k = 2.5 of" in section                      # the configured k, not a default
    assert "calcification only" in section and "[0.350, 0.930]" in section
    files = {path.stem for path in (results["out"] / "figures").glob("*.png")}
    assert {"lesion_visibility_mammograms", "lesion_crops_mammograms"} <= files
    folder = results["root"] / "lesions" / "mammograms"
    figure = figures.lesion_visibility_curves(pd.read_csv(folder / "visibility.csv"),
                                              pd.read_csv(folder / "sensitivity.csv"))
    figure.draw_without_rendering()
    axes = figure.axes
    assert [label.get_text() for label in axes[0].get_xticklabels()] == ["2", "8", "clean"]
    assert axes[0].collections and axes[2].collections  # exact interval bands (CNR has none)
    legend = figure.legends[0].get_window_extent()
    assert not any(legend.overlaps(panel.get_window_extent()) for panel in axes)


def test_figures_are_written_as_files_and_inlined(results):
    files = {path.stem: path.read_bytes() for path in (results["out"] / "figures").glob("*.png")}
    assert {"accuracy_vs_epsilon", "accuracy_vs_severity", "training_curves_image",
            "perturbation_strip_mammograms_gaussian_noise", "fourier_heatmap"} <= set(files)
    assert {"examples_mammograms_fgsm_eps8_from_surrogate", "examples_mammograms_ifgsm_eps8_from_surrogate",
            "examples_mammograms_fgsm_eps8_from_baseline"} <= set(files)
    page = (results["out"] / "index.html").read_text()
    inlined = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert sorted(base64.b64decode(data) for data in inlined) == sorted(files.values())


def test_page_states_intervals_verdicts_warnings_and_provenance(results):
    page = (results["out"] / "index.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "<script" not in page and "&lt;script&gt;" in page  # the config's value, escaped
    glance = page[page.index('id="glance"'):page.index('id="attacks"')]
    assert "Small test set: mammograms has only 40 test images" in glance
    assert "smaller than 0.150 (6 images)" in glance
    exact = clopper_pearson(34, N_TEST)  # the baseline's clean accuracy
    assert f"0.850</span><span class=\"interval\">[{exact.low:.3f}, {exact.high:.3f}]" in glance
    assert re.search(r"worst case L∞ ε=8/255, transfer: <span class=\"verdict helped\">helped",
                     glance)
    assert "no detectable difference at n = 40" in glance
    assert "true \\ predicted" in page and "m999.dcm: truncated DICOM" in page
    assert "AdamW, lr 0.001" in page and "2 (val_accuracy)" in page
    assert re.search(r"<b>Kept its first epoch: denoising</b> \(mammograms\)\s+trained 3 "
                     r"epochs, and its val accuracy never\s+beat the first one's", glance)
    assert "Kept its first epoch: baseline" not in glance
    assert "Stand-ins" not in glance  # its one dataset in use is a local folder
    # the fixture's test images come two per patient
    assert re.search(r"Test images that are not independent:</b>\s+mammograms's 40 test "
                     r"images come from\s+20 patients or lesions", glance)
    assert "p = &lt;" not in page and "p = <" not in page  # "p < 0.001" in a sentence
    for field in ("git commit", "torch", "CUDA (torch build)", "manifest.csv sha256"):
        assert field in page
    assert "not a git checkout" in page  # the fixture's repository folder is none


def test_a_run_on_stand_ins_says_so_at_the_top():
    """The default run's synthetic data and random slide features, named where a reader
    starts, not only in the configuration at the bottom."""
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config_module.validate_config(config, ROOT / "workflow/schemas/config.schema.yaml")
    notes = page.stand_in_notes(config)
    assert notes == ["mammograms: synthetic mammography data", "slides: synthetic slides data",
                     "slide features from a randomly initialised resnet18 (features.weights: "
                     "random), not a trained extractor"]


def test_page_and_csv_show_the_studys_tables_with_intervals(results):
    page = (results["out"] / "index.html").read_text()
    study = page[page.index('id="attacks"'):page.index("Paired comparisons")]
    titles = re.findall(r"<h3>(.*?)</h3>", study)
    assert titles == ["mammograms, resnet18 targets: black-box, attacks transferred from "
                      "surrogate (resnet18)",
                      "mammograms, resnet18 targets: white-box, each attacked with its own gradients"]
    transfer = study[:study.index(titles[1])]
    headers = re.findall(r"<th>(.*?)</th>", transfer)
    assert headers == ["clean", "FGSM (L∞) ε=2.5/255", "FGSM (L∞) ε=8/255",
                       "I-FGSM (L∞) ε=8/255", "worst case L∞ ε=2.5/255", "worst case L∞ ε=8/255"]
    assert "Small test set: n = 40 test images" in transfer
    rows = re.findall(r'<tr><td class="name">(.*?)</td><td class="name">(.*?)</td>', transfer)
    assert rows == [("none", "baseline"), ("λn 1", "denoising")]
    exact = clopper_pearson(37, N_TEST)  # the denoising model under I-FGSM ε 8 from the surrogate
    assert (f'0.925</span><span class="interval">[{exact.low:.3f}, {exact.high:.3f}]'
            in transfer.split("denoising</td>")[1])
    csv = pd.read_csv(results["out"] / "defense_tables.csv")
    assert len(csv) == 2 * 6 + 2 * 3
    # no slide study here: its comparisons table is a header alone
    from medrobust.report.page import SLIDE_COMPARISON_COLUMNS
    slide_comparisons = pd.read_csv(results["out"] / "slide_comparisons.csv")
    assert list(slide_comparisons.columns) == list(SLIDE_COMPARISON_COLUMNS)
    assert slide_comparisons.empty
    line = csv[(csv["model"] == "denoising") & (csv["column"] == "I-FGSM (L∞) ε=8/255")].iloc[0]
    assert (line["setting"], line["threat_model"], line["source_model"]) == (
        "λn 1", "transfer", "surrogate")
    assert (line["accuracy"], line["accuracy_low"], line["accuracy_high"]) == pytest.approx(
        (0.925, exact.low, exact.high), abs=1e-4)


def test_config_shows_only_the_keys_that_acted():
    config = {
        "device": "cpu",
        "datasets": {"a": {"kind": "images", "preprocess": {}, "tiling": {"tile_size": 224}},
                     "b": {"kind": "slides", "tiling": {}}},
        "image_classifiers": {"m": {"dataset": "a"}}, "image_training": {"epochs": 1},
        "slide_classifiers": {}, "features": {"backbone": "resnet18"},
        "attacks": {"fgsm": {}}, "perturbations": {}, "robustness": {"targets": []},
    }
    shown = applicable_config(config)
    assert shown["datasets"] == {"a": {"kind": "images", "preprocess": {}}}
    assert "features" not in shown and "slide_classifiers" not in shown
    assert "attacks" not in shown and "robustness" not in shown
    assert shown["image_training"] == {"epochs": 1} and shown["device"] == "cpu"


SCHEMA = ROOT / "workflow/schemas/config.schema.yaml"
SLIDE_SECTIONS = {"slide_classifiers", "features", "slide_attention", "slide_robustness"}
IMAGE_SECTIONS = {"image_classifiers", "image_training", "attacks", "perturbations",
                  "robustness", "fourier_heatmap", "lesion_visibility"}


def test_every_config_section_acts_on_every_run_or_belongs_to_a_stage():
    """A section the schema gains must say when it acts, or the page would show it always."""
    sections = set(yaml.safe_load(SCHEMA.read_text())["properties"])
    assert set(EVERY_RUN) | set(stages_run({})) == sections
    assert not set(EVERY_RUN) & set(stages_run({}))


def test_config_of_an_image_only_run_lacks_the_slide_sections_and_the_other_way_round():
    """The page once showed an image-only run's `slide_attention: {models: []}` and
    `lesion_visibility: {k: 3}`, though it claims settings of stages not run are left out."""
    default = yaml.safe_load((ROOT / "config.yaml").read_text())
    image_only = {**default, "slide_classifiers": {},
                  "slide_attention": {**default["slide_attention"], "models": []},
                  "slide_robustness": {**default["slide_robustness"], "models": []}}
    slide_only = {**default, "image_classifiers": {},
                  "robustness": {"targets": [], "transfer_sources": []}}
    shown = {name: set(applicable_config(config_module.validate_config(config, SCHEMA)))
             for name, config in [("image", image_only), ("slide", slide_only)]}
    assert IMAGE_SECTIONS <= shown["image"] and not SLIDE_SECTIONS & shown["image"]
    assert SLIDE_SECTIONS <= shown["slide"] and not IMAGE_SECTIONS & shown["slide"]
    assert set(EVERY_RUN) <= shown["image"] & shown["slide"]


class Quantised(nn.Module):
    """A classifier behind a non-differentiable input step: rounding passes no gradient,
    the textbook case of gradient masking."""

    def __init__(self, round_input: bool):
        super().__init__()
        self.round_input = round_input
        self.linear = nn.Linear(64, 2)

    def forward(self, images):
        if self.round_input:
            images = torch.round(images * 4) / 4
        return self.linear(images.flatten(1))


def white_box_evaluations(model, attacks):
    """The model's clean and white-box evaluations under each (name, attack) on 64 images."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(64, 1, 8, 8, generator=generator)
    with torch.no_grad():
        labels = model(torch.round(images * 4) / 4).argmax(1)  # right on every clean image
    evaluations = []
    for name, attack in [("clean", None), *attacks]:
        adversarial = images if attack is None else attack.perturb(images, labels)
        with torch.no_grad():
            probabilities = torch.softmax(model(adversarial), 1).double().numpy()
        condition = "clean" if attack is None else f"{name}-eps32-from-target"
        description = describe("target", condition)
        if attack is not None:
            description.update(attack=name, source_model="target", white_box=True)
        evaluations.append(Evaluation(description, np.array([f"i{i}" for i in range(64)]),
                                      labels.numpy(), probabilities, CLASSES))
    return evaluations


@pytest.mark.parametrize("round_input, flagged", [(True, True), (False, False)])
def test_a_gradient_free_attack_stronger_than_pgd_flags_gradient_masking(round_input, flagged):
    torch.manual_seed(0)
    model = Quantised(round_input).eval()
    attacks = [("pgd", build_attack("pgd", model, 32, {"steps": 10, "step_size": 8})),
               ("square", build_attack("square", model, 32, {"queries": 200}))]
    summary = summarize(white_box_evaluations(model, attacks), {},
                        StatisticsConfig(**STATISTICS))
    check = summary.gradient_masking.iloc[0]
    assert (check["gradient_attacks"], check["gradient_free_attacks"]) == ("pgd", "square")
    assert bool(check["flagged"]) is flagged
    if flagged:  # rounding hid every gradient: PGD moved nothing that Square could not
        assert check["fooled_only_by_gradient_free"] > 10 and check["fooled_only_by_gradient"] == 0
        # the same images from 2 patients: two groups all one way are no evidence (p = 0.5)
        groups = {"mammograms": {f"i{i}": f"P{i % 2}" for i in range(64)}}
        clustered = summarize(white_box_evaluations(model, attacks), {},
                              StatisticsConfig(**STATISTICS), groups=groups)
        check = clustered.gradient_masking.iloc[0]
        assert check["p_value"] == 0.5 and not check["flagged"]


@pytest.mark.parametrize("kind, unit", [("images", "image"), ("slides", "slide")])
@pytest.mark.parametrize("balanced", [True, False])
def test_the_warning_of_samples_in_groups_names_them_and_what_still_counts_them_alone(
        kind, unit, balanced):
    from medrobust.report.page import _environment

    macros = _environment().get_template("macros.html.j2").module
    item = {"dataset": "cohort", "kind": kind, "test_samples": 30, "test_groups": 12}
    grouped = " ".join(str(macros.not_independent(
        {**item, "grouped": True, "balanced_grouped": balanced})).split())
    assert f"Test {unit}s that are not independent:</b> cohort's 30 test {unit}s come from " \
           "12 patients or lesions" in grouped
    counted, _, alone = grouped.partition("Still per")
    assert bool(alone) is (kind == "slides" or not balanced)   # else nothing is left per image
    assert f"count these groups, not the {unit}s" in counted
    assert ("gradient-masking" in counted) is (kind == "images")
    assert ("balanced accuracy" in counted) is balanced
    assert ("balanced accuracy" in alone) is not balanced
    assert ("slide robustness" in alone) is (kind == "slides")
    assert "macro AUC" in counted          # no class counts: more than two classes may be
    two = " ".join(str(macros.not_independent(
        {**item, "grouped": True, "balanced_grouped": balanced,
         "counts": [("benign", [1]), ("malignant", [1])]})).split())
    assert "more than two classes" not in two
    assert ("Still per" in two) is (kind == "slides" or not balanced)
    one_left = " ".join(str(macros.not_independent(
        {**item, "kind": "images", "grouped": True, "balanced_grouped": True})).split())
    assert "Still per" not in one_left     # nothing is left per image
    plain = " ".join(str(macros.not_independent({**item, "grouped": False})).split())
    assert f"Every interval and test on this page treats each {unit} as independent" in plain


def test_a_cell_of_a_model_behind_a_detector_shows_what_it_rejected():
    from medrobust.report.page import _accuracy_cell, _environment

    row = pd.Series({"accuracy": 0.5, "accuracy_low": 0.3, "accuracy_high": 0.7, "auc": None,
                     "auc_low": None, "auc_high": None, "detection_rate": 0.125})
    macros = _environment().get_template("macros.html.j2").module
    assert "detector rejects 12.5%" in str(macros.accuracy_cell(_accuracy_cell(row)))
    plain = _accuracy_cell(row.drop("detection_rate"))
    assert plain["detection_rate"] is None
    assert "detector" not in str(macros.accuracy_cell(plain))
    assert "detector" not in str(macros.accuracy_cell(_accuracy_cell(
        row.replace({0.125: float("nan")}))))


def perturbation_evaluations(model, survived, n_conditions=7):
    """A model's evaluations under `n_conditions` noise levels, image i right under the first
    `survived[i]` of them."""
    survived = np.asarray(survived)
    labels = np.arange(len(survived)) % 2
    ids = np.array([f"m{i:03d}" for i in range(len(survived))])
    evaluations = []
    for level in range(n_conditions):
        correct = survived > level
        true_probability = np.where(correct, 0.8, 0.3)
        probabilities = np.stack([np.where(labels == 0, true_probability, 1 - true_probability),
                                  np.where(labels == 1, true_probability, 1 - true_probability)],
                                 1)
        description = describe(model, f"gaussian_noise-severity0.{level + 1}")
        evaluations.append(Evaluation(description, ids, labels, probabilities, CLASSES))
    return evaluations


@pytest.mark.parametrize("gains, losses, verdict", [
    # twelve images survive one more perturbation of 7, two lose all 7: the sign test
    # called this significant and the mean (-0.007) made it "hurt"
    (12, 2, "no detectable difference"),
    (16, 0, "helped")])
def test_the_mean_over_perturbations_is_judged_by_how_much_each_image_moved(gains, losses,
                                                                           verdict):
    reference = np.array([3] * gains + [7] * losses + [4] * 10)
    model = reference + np.array([1] * gains + [-7] * losses + [0] * 10)
    summary = summarize([*perturbation_evaluations("baseline", reference),
                         *perturbation_evaluations("denoising", model)],
                        {"baseline": "none", "denoising": "denoising"},
                        StatisticsConfig(**STATISTICS))
    comparison = summary.comparisons.set_index("condition").loc["mean-perturbation"]
    assert comparison["verdict"] == verdict
    assert comparison["accuracy_difference"] == pytest.approx((gains - 7 * losses) / 7 /
                                                              len(model))
    if losses:   # the sign-flip test: sums at least |12 - 14| = 2 units from 0
        assert comparison["p_value"] > 0.5
    else:        # every one of 16 images better: 2 / 2^16
        assert comparison["p_value"] == pytest.approx(2 * 0.5 ** 16)


def test_means_over_perturbations_are_paired_by_image_not_by_position():
    reference = perturbation_evaluations("baseline", [0, 7, 0, 7])
    model = [dataclasses.replace(e, sample_ids=e.sample_ids[::-1], labels=e.labels[::-1],
                                 probabilities=e.probabilities[::-1])
             for e in perturbation_evaluations("denoising", [0, 7, 0, 7])]
    summary = summarize([*reference, *model], {"baseline": "none", "denoising": "denoising"},
                        StatisticsConfig(**STATISTICS))
    comparison = summary.comparisons.set_index("condition").loc["mean-perturbation"]
    assert comparison["accuracy_difference"] == 0.0 and comparison["p_value"] == 1.0


def slide_evaluation(model, *right):
    """A slide model's clean evaluation of 30 test slides, right on the `right` ranges."""
    correct = np.zeros(30, bool)
    for start, stop in right:
        correct[start:stop] = True
    labels = np.arange(30) % 2
    true_probability = np.where(correct, 0.8, 0.3)
    probabilities = np.stack([np.where(labels == 0, true_probability, 1 - true_probability),
                              np.where(labels == 1, true_probability, 1 - true_probability)], 1)
    description = {**describe(model, "clean"), "family": "slide", "dataset": "slides"}
    return Evaluation(description, np.array([f"s{i}" for i in range(30)]), labels,
                      probabilities, ["normal", "tumor"])


def test_an_mhim_model_is_compared_with_its_base_model_alone():
    evaluations = [slide_evaluation("abmil", (0, 12)),
                   slide_evaluation("mhim_abmil", (0, 12), (20, 30)),
                   slide_evaluation("transmil", (0, 30))]
    config = {"slide_classifiers": {
        "abmil": {"dataset": "slides", "arch": "abmil"},
        "transmil": {"dataset": "slides", "arch": "transmil"},
        "mhim_abmil": {"dataset": "slides", "arch": "abmil", "mhim": {"teacher": "abmil"}}}}
    baselines = config_module.mil_baselines(config)
    assert baselines == {"mhim_abmil": "abmil"}
    summary = summarize(evaluations, config_module.defense_labels(config),
                        StatisticsConfig(**STATISTICS), baselines)
    [comparison] = summary.comparisons.to_dict("records")  # not against transmil
    assert (comparison["model"], comparison["reference_model"]) == ("mhim_abmil", "abmil")
    assert comparison["defense"] == "MHIM-MIL" and comparison["condition"] == "clean"
    # slides 20-29 right only for MHIM: McNemar's exact test, 10 to 0
    assert (comparison["only_model_correct"], comparison["only_reference_correct"]) == (10, 0)
    assert comparison["p_value"] == pytest.approx(2 * 0.5 ** 10)
    assert comparison["verdict"] == "helped"
    assert comparison["accuracy_difference"] == pytest.approx(10 / 30)
    # without baselines, slide models evaluated clean only are not compared
    assert summarize(evaluations, {}, StatisticsConfig(**STATISTICS)).comparisons.empty


def test_a_low_pass_sweep_draws_the_clean_test_set_right_of_its_widest_radius():
    # the clean images are the limit of a growing radius: drawn at radius 0 they would sit
    # beside the harshest filter and the curve would seem to fall and then recover
    rows = [{"model": "m", "kind": "clean", "perturbation": None, "severity": None,
             "accuracy": 0.9}]
    rows += [{"model": "m", "kind": "perturbation", "perturbation": name, "severity": severity,
              "accuracy": accuracy}
             for name, severity, accuracy in (("lowpass", 2.0, 0.5), ("lowpass", 8.0, 0.7),
                                              ("gaussian_noise", 0.1, 0.6))]
    robustness = pd.DataFrame(rows)
    for column in ("accuracy_low", "accuracy_high"):
        robustness[column] = robustness["accuracy"]
    figure = figures.perturbation_curves(robustness)
    noise, lowpass = figure.axes[:2]  # one column per perturbation, sorted by name
    assert lowpass.get_title() == "lowpass" and lowpass.get_xscale() == "log"
    assert [text.get_text() for text in lowpass.get_xticklabels()] == ["2", "8", "clean"]
    [line] = lowpass.get_lines()
    assert list(line.get_xdata()) == [2.0, 8.0, 16.0]
    assert list(line.get_ydata()) == [0.5, 0.7, 0.9]
    [line] = noise.get_lines()  # noise is gone at σ 0: the clean set starts its curve
    assert list(line.get_xdata()) == [0.0, 0.1] and list(line.get_ydata()) == [0.9, 0.6]


def test_a_model_that_predicts_one_class_for_every_clean_input_is_flagged():
    def matrix(model, condition, counts, family="slide"):
        return {"model": model, "condition": condition, "dataset": "slides", "family": family,
                "classes": ["normal", "tumor"], "matrix": counts}

    flagged = one_class_models([
        matrix("mhim", "clean", [[0, 8], [0, 8]]),          # tumour for every slide
        matrix("abmil", "clean", [[8, 0], [6, 2]]),         # both classes predicted
        matrix("abmil", "stain_shift", [[0, 8], [0, 8]]),   # only the clean set counts
        matrix("cnn", "clean", [[5, 0], [5, 0]], family="image")])
    assert flagged == [
        {"dataset": "slides", "model": "mhim", "class": "tumor", "n": 16, "unit": "slides"},
        {"dataset": "slides", "model": "cnn", "class": "normal", "n": 10, "unit": "images"}]


@pytest.mark.parametrize("verdict, words", [("helped", "beats"), ("hurt", "does worse than"),
                                            ("no detectable difference", "shows no detectable difference from")])
def test_the_mhim_section_says_in_words_whether_mhim_beats_its_base(verdict, words):
    pair = {"model": "mhim_abmil", "reference": "abmil",
            "rows": [{"kind": "worst_case", "verdict": "helped"},
                     {"kind": "clean", "verdict": verdict}]}
    assert mil_headline(pair) == f"mhim_abmil {words} abmil on the clean test slides"
    assert mil_headline({**pair, "rows": pair["rows"][:1]}) is None


def test_the_training_table_names_an_mhim_model_as_at_a_glance_does():
    history = {"epochs": [{}], "recipe": {"defense": {"name": "none"}, "mhim": {"teacher": "a"}}}
    plain = {"epochs": [{}], "recipe": {"defense": {"name": "none"}}}
    rows = recipe_rows({"mhim": {"history": history, "config": {"family": "slide"}},
                        "a": {"history": plain, "config": {"family": "slide"}}})
    assert [row["defense"] for row in rows] == ["MHIM-MIL", "none"]
    assert rows[0]["recipe"]["mhim"] == {"teacher": "a"}  # its settings stay in the recipe


def test_losses_of_different_magnitudes_share_a_log_scale():
    def history(losses):
        return {"epochs": [{"epoch": e, "train_loss": loss, "val_loss": loss / 2,
                            "val_accuracy": 0.5} for e, loss in enumerate(losses, 1)],
                "best_epoch": 1}

    figure = figures.training_curves({"denoising": history([575.0, 310.0]),
                                      "baseline": history([0.7, 0.3])})
    assert [panel.get_yscale() for panel in figure.axes[:3]] == ["log", "log", "linear"]
    alike = figures.training_curves({"a": history([0.7, 0.3]), "b": history([0.8, 0.2])})
    assert alike.axes[0].get_yscale() == "linear"


def test_models_that_share_a_point_both_show_there():
    # the same colour order as before, plus a marker of its own, hollow: where two models'
    # curves coincide (0.5 after a collapse) both markers stay visible
    styles = figures.model_styles(["b", "a", "b", "c"])
    assert list(styles) == ["a", "b", "c"]
    assert [style["color"] for style in styles.values()] == ["C0", "C1", "C2"]
    assert len({style["marker"] for style in styles.values()}) == 3
    assert all(style["markerfacecolor"] == "none" for style in styles.values())


def png_bytes(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (4, 4), shade).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_qc_pictures_on_the_page_are_the_left_out_slides_first_then_the_test_slides(
        tmp_path, monkeypatch):
    monkeypatch.setattr(page, "MAX_QC_FIGURES", 3)
    splits = ["train", "val", "test", "train", "test", "train"]
    rejected = {3: [{"slide": "s3", "reason": "no tissue"}]}
    pairs = []
    for i, split in enumerate(splits):
        store = tmp_path / f"s{i}.zarr"
        attrs = {"slide_id": f"s{i}", "label": "tumor", "split": split, "tile_size": 32,
                 "target_mpp": 1.0, "tissue_threshold": 0.5, "rejected": rejected.get(i, [])}
        with atomic_path(store) as tmp:
            create_tile_store(tmp, 0, 32, np.zeros((0, 2)), np.zeros(0), attrs)
        picture = tmp_path / f"s{i}.png"
        picture.write_bytes(png_bytes(i))
        pairs.append((store, picture))
    index = tmp_path / "cohort" / "index.csv"
    index.parent.mkdir()
    pd.DataFrame({"split": splits, "tiles": [str(store) for store, _ in pairs],
                  "qc": [str(picture) for _, picture in pairs],
                  "n_slides": len(pairs)}).to_csv(index, index=False)
    shown = page.slide_qc_figures(page.read_slide_tiles([index]))
    # in the index's order within each group: left out, then test, then the rest
    assert list(shown) == ["slide_qc_cohort_s3", "slide_qc_cohort_s2", "slide_qc_cohort_s4"]
    assert shown["slide_qc_cohort_s3"] == (png_bytes(3), "cohort/s3 (tumor, train): left out, "
                                                          "no tissue")


def test_the_data_table_counts_the_samples_kept_not_the_manifests(tmp_path):
    """A truncated DICOM, or a slide with no tissue, left out under `on_bad_input: skip` is
    not counted: the table once said 4 train where training used 3."""
    def manifest(name, kind, splits):
        rows = [{"sample_id": f"{name}{i}", "path": f"{name}{i}", "label": CLASSES[i % 2],
                 "split": split, "sha256": "0" * 64} for i, split in enumerate(splits)]
        write_dataset(tmp_path / name, rows, CLASSES, kind)
        return tmp_path / name

    images = manifest("mammo", "images", ["train"] * 4 + ["test"] * 2)
    slides = manifest("cohort", "slides", ["train"] * 2 + ["test"] * 2)
    store = str(tmp_path / "clean.zarr")
    write_image_store(store, np.zeros((5, 1, 4, 4)), [0, 1, 1, 0, 1], ["train"] * 3 + ["test"] * 2,
                      ["mammo0", "mammo1", "mammo3", "mammo4", "mammo5"],
                      {"rejected": [{"sample_id": "mammo2", "path": "mammo2",
                                     "reason": "mammo2: truncated DICOM"}]})
    clean = {"family": "image", "condition": "clean", "dataset": "mammo", "store": store}
    no_tissue = {"sample_id": "cohort3", "path": "cohort3", "reason": "no tissue"}
    tiles = {"cohort": [({"rejected": [no_tissue] if i == 3 else []}, None) for i in range(4)]}
    rows = {row["dataset"]: row for row in page.dataset_rows([images, slides], [clean], tiles)}
    assert rows["mammo"]["splits"] == ["train", "test", "all"]
    assert rows["mammo"]["counts"] == [("benign", [1, 1, 2]), ("malignant", [2, 1, 3])]
    assert [item["sample_id"] for item in rows["mammo"]["left_out"]] == ["mammo2"]
    assert rows["cohort"]["counts"] == [("benign", [1, 1, 2]), ("malignant", [1, 0, 1])]
    assert rows["cohort"]["left_out"] == [no_tissue]


def test_a_test_set_of_images_that_share_patients_is_flagged(tmp_path):
    """CBIS-DDSM's two views of a breast, ISIC's images of one lesion: the intervals treat
    them as independent, so the page says they are too narrow there."""
    def manifest(name, groups):
        rows = [{"sample_id": f"{name}{i}", "path": f"{name}{i}", "label": CLASSES[i % 2],
                 "split": "test", "sha256": "0" * 64, "group": group}
                for i, group in enumerate(groups)]
        write_dataset(tmp_path / name, rows, CLASSES, "images", ("group",))
        return tmp_path / name

    views = manifest("ddsm", ["P1", "P1", "P2", "P2", "P3", ""])
    single = manifest("rsna", ["a", "b", "c", ""])
    rows = page.dataset_rows([views, single], [])
    # a sample without a group is a group of its own
    assert [(row["test_samples"], row["test_groups"]) for row in rows] == [(6, 4), (4, 4)]
    assert [row["dataset"] for row in page.clustered_test_sets(rows)] == ["ddsm"]
    # the summary counted ddsm's groups where it could: the page says which numbers it did
    [flagged] = page.clustered_test_sets(rows)
    assert not flagged["grouped"]
    [flagged] = page.clustered_test_sets(rows, {"grouped_datasets": ["ddsm"]})
    assert flagged["grouped"]


@pytest.mark.parametrize("damage, problem", [
    (lambda data: data[:len(data) // 2], ".+"),
    (lambda data: data[:-2], "no whole end chunk at its end"),
    (lambda data: b"png of s0", "no PNG header")], ids=["cut", "cut in its end", "not a PNG"])
def test_a_damaged_qc_picture_is_refused_naming_it(tmp_path, damage, problem):
    """Embedded as it was, it showed on the page as a broken image."""
    picture = tmp_path / "s0.png"
    picture.write_bytes(damage(png_bytes(0)))
    attrs = {"slide_id": "s0", "label": "tumor", "split": "test",
             "rejected": [{"slide": "s0", "reason": "no tissue"}]}
    with pytest.raises(InputError, match=rf"s0\.png: damaged PNG QC picture \({problem}\); "
                                         "rerun the job that wrote it"):
        page.slide_qc_figures({"cohort": [(attrs, picture)]})


def test_the_text_under_a_picture_stays_clear_of_the_row_below():
    """Three models' predictions under each picture ran into the next row's titles."""
    image = np.zeros((1, 16, 16), np.float32)
    text = "\n".join(f"model_{i}: benign 0.99 ✓" for i in range(3))
    figure = figures.image_panel_grid([[(image, "clean", text)] * 4] * 2, ["one", "two"], "t")
    figure.draw_without_rendering()
    upper, lower = figure.axes[0], figure.axes[4]
    assert upper.xaxis.label.get_window_extent().y0 > lower.title.get_window_extent().y1


def test_a_perturbations_severities_run_from_the_mildest_to_the_harshest():
    """A low-pass filter is harsher as its radius shrinks: its columns once ran 2 to 16 in one
    table and 16 to 2 in the next."""
    rows = [{"kind": "clean", "perturbation": None, "severity": None}]
    rows += [{"kind": "perturbation", "perturbation": name, "severity": severity}
             for name in ("lowpass", "gaussian_noise") for severity in (2.0, 16.0, 4.0)]
    robustness = pd.DataFrame([{**dict.fromkeys(METRIC_KEYS), "model": "m", "dataset": "d",
                                "family": "image", "threat_model": None, **row}
                               for row in rows])
    headers = page.study_table(robustness, ["perturbation"])["headers"]
    assert headers == ["clean", *(f"gaussian_noise severity {s}" for s in (2, 4, 16)),
                       *(f"lowpass severity {s}" for s in (16, 4, 2))], headers


# ---------------------------------------------------------------- test images in groups

def outcome_evaluations():
    """OUTCOMES' evaluations in memory: right ones at 0.8 on the true class, wrong at 0.3."""
    evaluations = []
    for (model, condition), correct in OUTCOMES.items():
        true_probability = np.where(correct, 0.8, 0.3)
        probabilities = np.zeros((N_TEST, 2))
        probabilities[np.arange(N_TEST), LABELS] = true_probability
        probabilities[np.arange(N_TEST), 1 - LABELS] = 1 - true_probability
        evaluations.append(Evaluation(describe(model, condition), np.array(IDS), LABELS,
                                      probabilities, CLASSES))
    return evaluations


DEFENSES = {"baseline": "none", "denoising": "denoising", "surrogate": "none"}


def test_groups_of_one_image_each_leave_the_summary_as_it_was():
    def summary_with(groups):
        return summarize(outcome_evaluations(), DEFENSES, StatisticsConfig(**STATISTICS),
                         groups=groups)

    today = summary_with(None)
    for groups in ({"mammograms": {sample: f"patient {sample}" for sample in IDS}},
                   {"mammograms": dict.fromkeys(IDS)},   # empty cells: groups of their own
                   {"other": {"x": "p"}}):
        summary = summary_with(groups)
        for name in ("robustness", "per_class", "comparisons"):
            pd.testing.assert_frame_equal(getattr(summary, name), getattr(today, name))
        assert summary.settings == today.settings


def test_images_of_one_patient_are_counted_as_one_patient():
    # images 0-19 of ten patients, two each; the other 20 each their own
    groups = {"mammograms": {sample: f"p{i // 2}" if i < 20 else None
                             for i, sample in enumerate(IDS)}}
    today = summarize(outcome_evaluations(), DEFENSES, StatisticsConfig(**STATISTICS))
    grouped = summarize(outcome_evaluations(), DEFENSES, StatisticsConfig(**STATISTICS),
                        groups=groups)
    clean, clean_today = (row(summary.robustness, "baseline", "clean")
                          for summary in (grouped, today))
    assert clean["accuracy"] == clean_today["accuracy"]
    assert clean["accuracy_low"] != clean_today["accuracy_low"]      # Korn-Graubard
    assert clean["auc"] == clean_today["auc"]
    assert clean["auc_low"] < clean_today["auc_low"]                 # Obuchowski's deff
    comparisons = grouped.comparisons.set_index(["model", "condition"])
    clean_difference = today.comparisons.set_index(["model", "condition"]).loc[
        ("denoising", "clean")]
    assert comparisons.loc[("denoising", "clean"), "auc_difference_low"] < \
        clean_difference["auc_difference_low"]          # the clustered AUC intervals
    for condition in ("clean", "fgsm-eps8-from-surrogate", "mean-perturbation"):
        assert comparisons.loc[("denoising", condition), "test"] == \
            "exact sign-flip test of per-group sums"
    # under ifgsm images 0-9 (patients p0-p4) and 30-36 (their own) are right only for the
    # model: 17 images, but 12 groups whose signs flip, all of them one way
    ifgsm = comparisons.loc[("denoising", "ifgsm-eps8-from-surrogate")]
    assert ifgsm["only_model_correct"] == 17 and ifgsm["only_reference_correct"] == 0
    assert ifgsm["p_value"] == pytest.approx(2 * 0.5 ** 12)
    today_ifgsm = today.comparisons.set_index(["model", "condition"]).loc[
        ("denoising", "ifgsm-eps8-from-surrogate")]
    assert today_ifgsm["p_value"] == pytest.approx(2 * 0.5 ** 17)
    methods = grouped.settings["interval_methods"]
    assert any(key.startswith("with the manifest's groups (mammograms)") for key in methods)
    # balanced accuracy counts the patients only where none has images of two classes
    labels = dict(zip(IDS, outcome_evaluations()[0].labels))
    assert not any(labels[IDS[2 * p]] == labels[IDS[2 * p + 1]] for p in range(10))  # 2 classes
    assert grouped.settings["grouped_balanced_accuracy"] == []
    assert clean["balanced_accuracy_low"] == clean_today["balanced_accuracy_low"]
    # images 0-19 in groups of four cut by class: each group holds one class
    by_class = {"mammograms": {sample: f"q{i // 4}-{labels[sample]}" if i < 20 else None
                               for i, sample in enumerate(IDS)}}
    within = summarize(outcome_evaluations(), DEFENSES, StatisticsConfig(**STATISTICS),
                       groups=by_class)
    assert within.settings["grouped_balanced_accuracy"] == ["mammograms"]
    assert row(within.robustness, "baseline", "clean")["balanced_accuracy_low"] \
        != clean_today["balanced_accuracy_low"]
    assert not any("groups" in key for key in today.settings["interval_methods"])
    assert grouped.settings["grouped_datasets"] == ["mammograms"]
    assert "grouped_datasets" not in today.settings


def test_the_summary_reads_the_groups_from_the_dataset_manifests(results, tmp_path):
    dataset = results["root"] / "resources" / "mammograms"   # two test images per patient
    outputs = [tmp_path / name for name in ("r.csv", "r.json", "p.csv", "c.csv")]
    summary = summarize_evaluations(results["evaluations"], DEFENSES, STATISTICS, *outputs,
                                    dataset_folders=[str(dataset)])
    assert set(summary.comparisons["test"]) == {"exact sign-flip test of per-group sums"}
    assert (pd.read_csv(outputs[3])["test"] == "exact sign-flip test of per-group sums").all()
