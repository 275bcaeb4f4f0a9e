"""The metrics summary, the figures and the self-contained HTML report."""

import base64
import json
import re

import numpy as np
import pandas as pd
import pytest

from medrobust.errors import InputError
from medrobust.evaluate.metrics import METRIC_KEYS
from medrobust.io.image_store import write_image_store
from medrobust.report.figures import accuracy_vs_epsilon, example_grid
from medrobust.report.html import at_a_glance, write_report
from medrobust.report.summary import summarize_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def metric(model, condition="clean", kind="clean", accuracy=0.9, auc=0.95, **fields):
    record = dict.fromkeys(METRIC_KEYS)
    record.update(family="image", model=model, dataset="mammograms", condition=condition, kind=kind, n=8,
                  accuracy=accuracy, auc=auc, **fields)
    return record


def attack(model, source, epsilon, accuracy, auc):
    return metric(model, f"fgsm-eps{epsilon}-from-{source}", "attack", accuracy, auc, attack="fgsm",
                  epsilon=epsilon, source_model=source, white_box=model == source)


RECORDS = [
    attack("baseline", "baseline", 8, 0.125, 0.214),
    metric("baseline", accuracy=0.875, auc=0.938),
    attack("baseline", "surrogate", 4, 0.625, 0.711),
    attack("baseline", "baseline", 4, 0.375, 0.402),
    metric("baseline", "gaussian_noise-severity0.05", "perturbation", 0.75, 0.812,
           perturbation="gaussian_noise", severity=0.05),
    metric("denoising", accuracy=0.8125, auc=None),
    attack("denoising", "denoising", 4, 0.5625, 0.633),
    metric("surrogate", accuracy=0.6875, auc=0.777),
    {**metric("abmil", accuracy=0.667, auc=0.891), "family": "slide", "dataset": "slides", "n": 3},
]


@pytest.fixture
def summary_files(tmp_path):
    paths = []
    for index, record in enumerate(RECORDS):
        paths.append(tmp_path / "metrics" / f"{index}.json")
        paths[-1].parent.mkdir(exist_ok=True)
        paths[-1].write_text(json.dumps(record))
    table = summarize_metrics(paths, tmp_path / "robustness.csv", tmp_path / "robustness.json")
    return table, tmp_path / "robustness.csv", tmp_path / "robustness.json"


def test_summary_is_one_tidy_sorted_table(summary_files):
    table, csv_path, json_path = summary_files
    assert list(table.columns) == list(METRIC_KEYS) and len(table) == len(RECORDS)
    baseline = table[table["model"] == "baseline"]
    assert list(baseline["condition"]) == [
        "clean", "fgsm-eps4-from-baseline", "fgsm-eps4-from-surrogate", "fgsm-eps8-from-baseline",
        "gaussian_noise-severity0.05"]
    assert table.loc[table["model"] == "abmil", "family"].item() == "slide"
    assert set(table.loc[table["model"] != "abmil", "family"]) == {"image"}
    pd.testing.assert_frame_equal(pd.read_csv(csv_path)[["model", "accuracy"]],
                                  table[["model", "accuracy"]])
    records = json.loads(json_path.read_text())
    denoising_clean = next(r for r in records if r["model"] == "denoising" and r["kind"] == "clean")
    assert denoising_clean["auc"] is None and denoising_clean["attack"] is None


def test_summary_rejects_a_metrics_file_without_the_keys(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"model": "baseline", "accuracy": 0.5}))
    with pytest.raises(InputError, match="bad.json.*condition"):
        summarize_metrics([path], tmp_path / "s.csv", tmp_path / "s.json")
    assert not (tmp_path / "s.csv").exists()


def write_stores(tmp_path):
    rng = np.random.default_rng(0)
    clean = rng.uniform(0, 1, (5, 1, 8, 8)).astype(np.float32)
    ids = [f"s{i}" for i in range(5)]
    attrs = {"dataset": "mammograms", "classes": ["benign", "malignant"]}
    write_image_store(tmp_path / "clean.zarr", clean, [0, 1, 0, 1, 0],
                      ["train", "test", "test", "test", "val"], ids, attrs)
    adversarial = np.clip(clean[1:4] + rng.choice([-4 / 255, 4 / 255], clean[1:4].shape), 0, 1)
    write_image_store(tmp_path / "adv.zarr", adversarial, [1, 0, 1], ["test"] * 3, ids[1:4],
                      {**attrs, "attack": "fgsm", "epsilon": 4, "source_model": "surrogate"})
    return tmp_path / "clean.zarr", tmp_path / "adv.zarr"


def test_figures_are_png(tmp_path, summary_files):
    table, _, _ = summary_files
    clean, adversarial = write_stores(tmp_path)
    assert accuracy_vs_epsilon(table[table["family"] == "image"]).startswith(PNG)
    assert example_grid(clean, adversarial, n_examples=2).startswith(PNG)
    write_image_store(tmp_path / "other.zarr", np.zeros((1, 1, 8, 8), np.float32), [0], ["test"],
                      ["elsewhere"], {"classes": ["benign", "malignant"]})
    with pytest.raises(InputError, match="elsewhere"):
        example_grid(clean, tmp_path / "other.zarr", n_examples=1)


def section(page, table_class):
    start = page.index(f'<table class="{table_class}">')
    return page[start:page.index("</table>", start)]


def test_report_is_self_contained_and_shows_the_summary_numbers(tmp_path, summary_files):
    _, csv_path, _ = summary_files
    clean, adversarial = write_stores(tmp_path)
    out = tmp_path / "report" / "index.html"

    write_report(csv_path, out, [clean], [adversarial], n_examples=2,
                 config={"attacks": {"fgsm": {"epsilons": [4, 8]}}, "robustness": {"white_box": True}})

    page = out.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "<link" not in page and "<script" not in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3  # epsilon curves, severity curves, one example grid
    assert all(base64.b64decode(image).startswith(PNG) for image in images)

    robustness = section(page, "robustness")
    summary = pd.read_csv(csv_path)
    for row in summary[summary["family"] == "image"].itertuples():
        assert f"{row.accuracy:.3f}" in robustness
        if not pd.isna(row.auc):
            assert f"AUC {row.auc:.3f}" in robustness
    assert "white-box" in robustness and "black-box from surrogate" in robustness
    assert "FGSM &epsilon;=4/255" in robustness and "abmil" not in robustness
    # the baseline row in column order: clean, eps 4 white-box, eps 4 transfer, eps 8, noise
    baseline = robustness[robustness.index(">baseline<"):]
    baseline = baseline[:baseline.index("</tr>")]
    assert re.findall(r'class="acc">([0-9.]+)<', baseline) == ["0.875", "0.375", "0.625", "0.125",
                                                                "0.750"]
    slides = section(page, "slides")
    assert "abmil" in slides and "0.667" in slides and "0.891" in slides
    metrics = section(page, "metrics")
    for row in summary.itertuples():
        assert f"{row.accuracy:.3f}" in metrics
    assert "How to read this" in page and "&quot;epsilons&quot;" in page


def test_report_pairs_each_adversarial_store_with_its_datasets_clean_store(tmp_path, summary_files):
    _, csv_path, _ = summary_files
    clean, adversarial = write_stores(tmp_path)
    write_image_store(tmp_path / "other.zarr", np.zeros((1, 1, 8, 8), np.float32), [0], ["test"],
                      ["s0"], {"dataset": "chest", "classes": ["normal", "pneumonia"]})
    with pytest.raises(InputError, match="chest"):
        write_report(csv_path, tmp_path / "index.html", [clean],
                     [adversarial, tmp_path / "other.zarr"], n_examples=1)
    assert not (tmp_path / "index.html").exists()
    write_report(csv_path, tmp_path / "index.html", [clean], [adversarial], n_examples=0)
    assert "Example images" not in (tmp_path / "index.html").read_text()


def test_at_a_glance_compares_each_defense_with_each_undefended_model(summary_files):
    table = summary_files[0]
    images = table[table["family"] == "image"]
    config = {"image_classifiers": {"baseline": {}, "surrogate": {},
                                    "denoising": {"defense": {"name": "denoising"}}}}
    text = re.sub(r"<[^>]+>", "", at_a_glance(images, config))
    # baseline white-box: mean(0.375, 0.125) = 0.25; denoising white-box: 0.5625
    assert "white-box +0.312" in text and "under white-box attacks the defense helped" in text
    assert "clean -0.062" in text  # 0.8125 - 0.875
    assert "surrogate" not in text  # never attacked, so not summarised
    worse = images.assign(accuracy=images["accuracy"].where(images["model"] != "denoising", 0.0))
    assert "did not help" in at_a_glance(worse, config)


def test_at_a_glance_judges_a_defense_on_transfer_attacks_when_there_are_any(summary_files):
    """Xue et al.'s setting is black-box: a defense that gains white-box but loses
    under transfer did not help."""
    images = summary_files[0]
    images = images[images["family"] == "image"]
    transfer = pd.DataFrame([attack("denoising", "surrogate", 4, 0.5, 0.6)])
    config = {"image_classifiers": {"denoising": {"defense": {"name": "denoising"}}}}
    text = re.sub(r"<[^>]+>", "", at_a_glance(pd.concat([images, transfer]), config))
    # white-box: denoising 0.5625 vs baseline 0.25; transfer: 0.5 vs 0.625
    assert "white-box +0.312" in text and "transfer -0.125" in text
    assert "under transfer attacks the defense did not help" in text
