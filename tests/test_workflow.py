"""The whole workflow, run by the real Snakemake on the tiny config.

One run (module fixture) feeds every check; the checks read the outputs'
contents against the data contracts in docs/architecture.md.
"""

import json
import re
import zipfile

import pandas as pd
import pytest

from medrobust.io.image_store import open_image_store
from medrobust.io.slide_stores import open_feature_store, open_tile_store
from browser import (  # noqa: F401 (browser, chromium: fixtures)
    broken_images, browser, chromium, covering_element, horizontal_overflow, is_visible,
    open_file, screenshot, table_rows, too_wide_elements, visible_text)
from selenium.webdriver.common.by import By
from workflow_runner import ROOT, run_snakemake

pytestmark = pytest.mark.workflow
TINY = ROOT / "tests/configs/tiny.yaml"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workflow")
    result = run_snakemake(workdir, TINY, "--cores", "2")
    assert result.returncode == 0, result.stderr[-6000:]
    return workdir


def test_image_store_matches_the_contract(workdir):
    store = open_image_store(workdir / "results/preprocessed/mammograms.zarr")
    manifest = pd.read_csv(workdir / "resources/mammograms/manifest.csv")
    assert store.images.shape == (len(manifest), 1, 32, 32)
    assert store.classes == ["benign", "malignant"]
    assert list(store.sample_ids) == list(manifest["sample_id"])
    assert set(store.splits) == {"train", "val", "test"}
    images, _ = store.load("test")
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.05


def test_tile_and_feature_stores_match_the_contract(workdir):
    manifest = pd.read_csv(workdir / "resources/slides/manifest.csv")
    assert len(manifest) == 6
    for slide_id, label in zip(manifest["sample_id"], manifest["label"]):
        tiles = open_tile_store(workdir / f"results/tiles/slides/{slide_id}.zarr")
        assert tiles.attrs["slide_id"] == slide_id and tiles.attrs["label"] == label
        assert tiles.attrs["target_mpp"] == 2.0 and tiles.attrs["tile_size"] == 32
        assert tiles.tiles.shape[1:] == (32, 32, 3) and len(tiles) == len(tiles.coords) > 0
        assert (tiles.tissue_fraction >= 0.5).all()
        # tiles sit on a grid of tile_size_level0 level-0 pixels
        assert (tiles.coords % tiles.attrs["tile_size_level0"] == 0).all()
        features = open_feature_store(workdir / f"results/features/slides/resnet18/{slide_id}.zarr")
        assert features.features.shape == (len(tiles), 512)
        assert features.attrs["backbone"] == "resnet18" and len(features.attrs["weights_sha256"]) == 64


def test_fgsm_lowers_the_baseline_accuracy(workdir):
    metrics = {
        path.stem: json.loads(path.read_text())
        for path in (workdir / "results/evaluate/mammograms/baseline").glob("*.json")
    }
    clean = metrics["clean"]["accuracy"]
    white_box = metrics["fgsm-eps8-from-baseline"]
    assert white_box["white_box"] is True and white_box["epsilon"] == 8
    assert white_box["accuracy"] < clean
    assert metrics["fgsm-eps4-from-baseline"]["accuracy"] < clean


def test_adversarial_store_stays_in_the_epsilon_ball(workdir):
    clean = open_image_store(workdir / "results/preprocessed/mammograms.zarr")
    adversarial = open_image_store(workdir / "results/attacks/mammograms/from_surrogate/fgsm-eps4.zarr")
    images, _ = clean.load("test")
    assert list(adversarial.sample_ids) == list(clean.sample_ids[clean.indices("test")])
    difference = abs(adversarial.images[:] - images)
    assert difference.max() <= 4 / 255 + 1e-6 and difference.max() > 3.9 / 255


# 2 targets x (clean + 2 epsilons x 2 threat models (attack and worst case) x 2 + 1 noise level
# + the mean over perturbations), surrogate clean, abmil clean
SUMMARY_ROWS = 2 * (1 + 4 + 4 + 1 + 1) + 1 + 1


def test_report_holds_the_table_numbers_with_their_intervals(workdir):
    summary = pd.read_csv(workdir / "results/report/robustness.csv")
    html = (workdir / "results/report/index.html").read_text()
    assert len(summary) == SUMMARY_ROWS
    for row in summary.itertuples():
        assert f"{row.accuracy:.3f}" in html
        assert row.accuracy_low <= row.accuracy <= row.accuracy_high
        assert f"[{row.accuracy_low:.3f}, {row.accuracy_high:.3f}]" in html
    comparisons = pd.read_csv(workdir / "results/report/comparisons.csv")
    assert set(comparisons["model"]) == {"denoising"}
    assert set(comparisons["reference_model"]) == {"baseline"}
    assert comparisons["verdict"].isin(["helped", "hurt", "no detectable difference"]).all()
    assert "<img" in html and "http://" not in html and "https://" not in html
    figures = {path.stem for path in (workdir / "results/report/figures").glob("*.png")}
    assert {"accuracy_vs_epsilon", "accuracy_vs_severity", "training_curves_image",
            "training_curves_slide", "perturbation_strip_mammograms_gaussian_noise",
            "fourier_heatmap"} <= figures


def test_report_has_the_study_tables_of_what_the_config_ran(workdir):
    tables = pd.read_csv(workdir / "results/report/defense_tables.csv")
    html = (workdir / "results/report/index.html").read_text()
    # the tiny config: FGSM at 4 and 8 from the surrogate and white-box, two resnet18 targets
    for (threat, source), table in tables.groupby(
            ["threat_model", tables["source_model"].fillna("")], sort=False):
        assert list(table["column"].unique()) == [
            "clean", "FGSM (L∞) ε=4/255", "FGSM (L∞) ε=8/255", "worst case L∞ ε=4/255",
            "worst case L∞ ε=8/255"], (threat, source)
        settings = dict(zip(table["model"], table["setting"]))
        assert settings["baseline"] == "none" and settings["denoising"].startswith(
            "λn 0.1, λa 1"), settings
    assert list(tables["threat_model"].unique()) == ["transfer", "white-box"]
    assert "attacks transferred from surrogate (resnet18)" in html
    # every cell is the summary's number for that model and condition
    summary = pd.read_csv(workdir / "results/report/robustness.csv")
    cells = tables.merge(summary, on=["model", "condition"], suffixes=("", "_summary"))
    assert len(cells) == len(tables) == 2 * 2 * 5
    for metric in ("accuracy", "accuracy_low", "accuracy_high"):
        assert (cells[metric] == cells[f"{metric}_summary"]).all()


def test_slide_attention_covers_every_test_slide(workdir):
    """Per-tile attention, a heatmap per test slide, localisation AUC and top-k rows."""
    from sklearn.metrics import roc_auc_score

    run = workdir / "results/attention/slides/abmil"
    manifest = pd.read_csv(workdir / "resources/slides/manifest.csv")
    test = sorted(manifest.loc[manifest["split"] == "test", "sample_id"])
    tiles = pd.read_csv(run / "tiles.csv")
    assert sorted(tiles["slide_id"].unique()) == test
    assert sorted(path.stem for path in (run / "heatmaps").glob("*.png")) == test
    top_k = pd.read_csv(run / "top_k.csv")
    localisation = pd.read_csv(run / "localisation.csv").set_index("slide_id")
    labels = manifest.set_index("sample_id")["label"]
    checked = 0
    for slide, group in tiles.groupby("slide_id"):
        features = open_feature_store(workdir / f"results/features/slides/resnet18/{slide}.zarr")
        assert (group[["x", "y"]].to_numpy() == features.coords).all()
        assert group["attention"].sum() == pytest.approx(1, abs=1e-4)   # ABMIL's softmax
        assert group["tumour_fraction"].between(0, 1).all()   # synthetic slides have masks
        # the masks line up with the slides: only a tumour slide's tiles touch its mask
        assert (group["tumour_fraction"].max() > 0) == (labels[slide] == "tumor"), slide
        tumour = group["tumour_fraction"] >= 0.5   # tumour_threshold's default
        if tumour.any() and not tumour.all():
            assert localisation.loc[slide, "auc"] == pytest.approx(
                roc_auc_score(tumour, group["attention"]))
            checked += 1
        else:
            assert pd.isna(localisation.loc[slide, "auc"])
        rows = top_k[top_k["slide_id"] == slide]
        assert sorted(zip(rows["k"], rows["removal"], rows["draw"])) == [   # random_repeats 2
            (0, "none", -1), (1, "random", 0), (1, "random", 1), (1, "top", -1),
            (4, "random", 0), (4, "random", 1), (4, "top", -1)]
        assert (rows["n_removed"] == rows["k"].clip(upper=len(group) - 1)).all()
    assert checked > 0  # at least one test slide's localisation AUC was checked
    html = (workdir / "results/report/index.html").read_text()
    assert "Slides: attention" in html and "mean localisation AUC" in html
    figures = {path.stem for path in (workdir / "results/report/figures").glob("*.png")}
    assert {"attention_top_k", *(f"attention_abmil_{slide}" for slide in test)} <= figures
    # the top-k removals against random ones, per k, in the slide comparisons table too
    comparisons = pd.read_csv(workdir / "results/report/slide_comparisons.csv")
    summary = json.loads((run / "summary.json").read_text())
    assert list(comparisons["condition"]) == [
        f"k = {row['k']}" for row in summary["top_k_against_random"]] == ["k = 1", "k = 4"]
    assert (comparisons["model"] == "abmil").all() and (comparisons["n"] == len(test)).all()
    assert (comparisons["kind"] == "top_k_removal").all() and list(comparisons["k"]) == [1, 4]
    assert list(comparisons["p_value"]) == pytest.approx(
        [row["p_value"] for row in summary["top_k_against_random"]])


def test_report_reads_right_in_a_browser(workdir, browser):
    """What a reader sees in headless Chromium, not only what the HTML holds."""
    open_file(browser, workdir / "results/report/index.html")
    screenshot(browser, workdir / "report.png")
    assert broken_images(browser) == []
    assert horizontal_overflow(browser) == 0, too_wide_elements(browser)
    text = visible_text(browser)
    headings = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "h2")]
    assert headings[:6] == ["At a glance", "Study 1: adversarial attacks and defenses",
                            "Study 2: perturbation sweeps", "Study 3: slide classifiers",
                            "Slides: attention",
                            "Every condition: sensitivity, specificity, balanced accuracy"]
    # the attention heatmaps and the QC pictures share rows, not one per row
    heatmaps = browser.find_elements(By.CSS_SELECTOR, "#slide-attention .gallery figure")
    assert len(heatmaps) == 2 and heatmaps[0].location["y"] == heatmaps[1].location["y"]
    qc = browser.find_elements(By.CSS_SELECTOR, "#slide-qc .gallery figure")
    assert len(qc) >= 2 and qc[0].location["y"] == qc[1].location["y"]
    assert headings[-4:] == ["Slides: quality control", "Data", "Provenance", "Configuration"]
    # the small-test-set warnings are on screen, before the tables
    warnings = [warning for warning in browser.find_elements(By.CSS_SELECTOR, "#glance .warning")
                if warning.text.startswith("Small test set")]
    assert len(warnings) == 2 and all(is_visible(warning) for warning in warnings)
    assert "mammograms has only 20 test images" in warnings[0].text
    assert "slides has only 2 test slides" in warnings[1].text
    assert "Stand-ins, not real data: mammograms: synthetic mammography data" in text
    assert "This run did not test the slide models' robustness" in text
    # at a glance: every model, each number with its interval beneath it
    glance = table_rows(browser.find_element(By.CSS_SELECTOR, "table.glance"))
    assert glance[0][:5] == ["dataset", "model", "defense", "test n", "clean"]
    assert "mean over perturbations" in glance[0][-1]
    models = {row[1]: row for row in glance[1:]}
    assert set(models) == {"baseline", "denoising", "surrogate", "abmil"}
    assert all(re.fullmatch(r"\d\.\d{3}\n\[\d\.\d{3}, \d\.\d{3}\]", cell)
               for cell in models["baseline"][4:])
    assert re.search(r"worst case L∞ ε=8/255, transfer: (helped|hurt|no detectable difference at "
                     r"n = 20) \(difference [+-]\d\.\d{3} \[", text)
    # every figure is drawn, on screen at a readable size, nothing overlapping it
    images = browser.find_elements(By.CSS_SELECTOR, "figure img")
    assert len(images) == len(list((workdir / "results/report/figures").glob("*.png")))
    for image in images:
        assert is_visible(image) and image.size["width"] >= 300, image.get_attribute("alt")
        assert covering_element(image) is None
    # the per-class details stay collapsed until opened
    assert "Per-class sensitivity" in text and "one-vs-rest) and AUC" in text
    assert "specificity (one-vs-rest)</th>" not in text
    assert "git commit" in text and "manifest.csv sha256" in text


def test_second_run_has_nothing_to_do(workdir):
    result = run_snakemake(workdir, TINY, "--cores", "2", "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Nothing to be done" in result.stdout + result.stderr


def test_snakemake_report_packs_the_marked_outputs(workdir):
    """`snakemake --report` (the rules' report() outputs) works on a finished run."""
    result = run_snakemake(workdir, TINY, "--report", "snakemake-report.zip")
    assert result.returncode == 0, result.stderr[-3000:]
    names = zipfile.ZipFile(workdir / "snakemake-report.zip").namelist()
    assert {name.rsplit("/", 1)[-1] for name in names} >= {"index.html", "robustness.csv"}


def test_lint_is_clean(tmp_path):
    """`snakemake --lint` exits 1 on any lint; the default config is the one linted."""
    result = run_snakemake(tmp_path, ROOT / "config.yaml", "--lint", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Congratulations, your workflow is in a good condition" in result.stderr + result.stdout
