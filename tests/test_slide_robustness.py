"""Tile-fraction perturbation and adversarial tiles on slide models, end to end on small stores."""

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
import zarr

from medrobust.errors import ConfigError, InputError
from medrobust.evaluate.slide_robustness import (
    PREDICTIONS, RUN, SlideRobustnessConfig, slide_robustness_run)
from medrobust.features.backbones import build_backbone
from medrobust.features.extract import FeatureConfig, extract_slide_features
from medrobust.io.atomic import atomic_path
from medrobust.io.slide_stores import create_tile_store, open_feature_store, open_tile_store
from medrobust.models.mil import ABMIL
from medrobust.models.registry import load_model, save_model
from medrobust.perturbations import build_perturbation
from medrobust.perturbations.slide_tiles import (
    perturbed_count, slide_perturbation_run, tile_order)

CLASSES = ["normal", "tumor"]
FEATURES = FeatureConfig(backbone="resnet18", weights="random", batch_size=4, seed=0)
STATISTICS = {"bootstrap_resamples": 200, "confidence": 0.95, "seed": 0}
SLIDES = [("t1", "normal", "test", 5), ("t2", "tumor", "test", 7), ("t3", "normal", "test", 4),
          ("t4", "tumor", "test", 6), ("r1", "tumor", "train", 5)]


def test_fractions_take_ceil_f_n_tiles_of_a_seeded_order():
    assert perturbed_count(0.1, 30) == 3 and perturbed_count(0.25, 5) == 2
    assert perturbed_count(1.0, 7) == 7 and perturbed_count(0.01, 7) == 1
    order = tile_order(0, "slide_a", 10)
    assert sorted(order) == list(range(10))
    np.testing.assert_array_equal(order, tile_order(0, "slide_a", 10))
    assert not np.array_equal(order, tile_order(1, "slide_a", 10))
    assert not np.array_equal(order, tile_order(0, "slide_b", 10))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    rng = np.random.default_rng(0)
    tiles, features = {}, {}
    for slide_id, label, split, n in SLIDES:
        pixels = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        path = folder / f"{slide_id}.tiles.zarr"
        with atomic_path(path) as tmp:
            create_tile_store(tmp, n, 32, np.zeros((n, 2), np.int64), np.ones(n),
                              {"slide_id": slide_id, "label": label, "split": split})
            zarr.open_array(tmp / "tiles", mode="r+")[:] = pixels
        tiles[slide_id] = path
        features[slide_id] = extract_slide_features(path, folder / f"{slide_id}.features.zarr",
                                                    FEATURES)
    backbone = build_backbone("resnet18", "random", 0)
    torch.manual_seed(0)
    model = ABMIL(512, 2)
    save_model(model, folder / "abmil", {
        "family": "slide", "arch": "abmil", "num_classes": 2, "classes": CLASSES,
        "feature_dim": 512, "backbone": "resnet18", "backbone_weights": "random",
        "backbone_weights_sha256": backbone.weights_sha256, "dataset": "slides",
        "arch_options": {}}, history={})
    return folder, tiles, features, backbone


def _perturbation_run(cohort, name, severities, fractions, out):
    folder, tiles, _, _ = cohort
    slide_perturbation_run(list(tiles.values()), folder / out, name, severities, fractions,
                           seed=3, features=FEATURES)
    return folder / out


def test_perturbed_features_are_the_backbones_on_the_perturbed_8_bit_tiles(cohort):
    folder, tiles, _, backbone = cohort
    run = _perturbation_run(cohort, "gaussian_blur", [1.5], [0.5], "blur_half")
    group = zarr.open_group(run / "severity1.5.zarr", mode="r")
    assert sorted(group.group_keys()) == ["t1", "t2", "t3", "t4"]  # test slides only
    store = open_tile_store(tiles["t2"])
    order = np.asarray(group["t2/order"][:])
    np.testing.assert_array_equal(order, tile_order(3, "t2", 7)[:math.ceil(0.5 * 7)])
    pixels = torch.from_numpy(np.asarray(store.tiles[:])[order]).permute(0, 3, 1, 2) / 255
    blurred = build_perturbation("gaussian_blur", 1.5)(pixels, np.random.default_rng())
    blurred = (blurred * 255).round() / 255
    with torch.no_grad():
        expected = backbone.model(blurred.float())
    np.testing.assert_allclose(group["t2/features"][:], expected.numpy(), rtol=1e-4, atol=1e-5)
    assert group.attrs["weights_sha256"] == backbone.weights_sha256


def test_fraction_conditions_replace_exactly_the_ordered_tiles_and_adversarial_tiles_hurt(cohort):
    folder, tiles, features, backbone = cohort
    run = _perturbation_run(cohort, "stain_shift", [0.5], [0.5, 1.0], "stain")
    settings = SlideRobustnessConfig.from_mapping({
        "fractions": [0.5, 1.0], "perturbations": {"stain_shift": {"severities": [0.5]}},
        "adversarial": {"top_k": [1, 3], "epsilons": [16], "steps": 3, "step_size": 8}})
    metrics = slide_robustness_run(folder / "abmil", list(features.values()),
                                   list(tiles.values()), {"stain_shift": run}, folder / "out",
                                   settings, FEATURES, STATISTICS)
    predictions = pd.read_csv(folder / "out" / PREDICTIONS)
    assert json.loads((folder / "out" / RUN).read_text())["n_test_slides"] == 4

    # by hand: slide t4 at fraction 0.5 has its first ceil(0.5 * 6) = 3 ordered tiles replaced
    model = load_model(folder / "abmil")
    group = zarr.open_group(run / "severity0.5.zarr", mode="r")
    bag = torch.from_numpy(open_feature_store(features["t4"]).features)
    order = np.asarray(group["t4/order"][:3])
    bag[order] = torch.from_numpy(np.asarray(group["t4/features"][:3]))
    with torch.no_grad():
        expected = torch.softmax(model(bag)[0], dim=0)[1].item()
    row = predictions[(predictions["kind"] == "tile_fraction") & (predictions["fraction"] == 0.5)
                      & (predictions["sample_id"] == "t4")]
    assert row["prob_tumor"].item() == pytest.approx(expected, rel=1e-5)

    # every condition: accuracy is the mean correctness of its rows, inside its interval
    assert len(metrics) == 1 + 2 + 2  # clean, two fractions, k in {1, 3} at one epsilon
    for _, condition in metrics.iterrows():
        rows = predictions[(predictions["kind"] == condition["kind"])
                           & (predictions["fraction"] == condition["fraction"])
                           & (predictions["k"] == condition["k"])]
        assert condition["n"] == len(rows) == 4
        assert condition["accuracy"] == pytest.approx(rows["correct"].mean())
        assert condition["accuracy_low"] <= condition["accuracy"] <= condition["accuracy_high"]

    # the attack lowers the true label's probability on every slide
    def true_probability(kind, k=0):
        rows = predictions[(predictions["kind"] == kind) & (predictions["k"] == k)]
        rows = rows.sort_values("sample_id")
        return np.where(rows["label"] == 1, rows["prob_tumor"], rows["prob_normal"])

    clean = true_probability("clean")
    assert np.all(true_probability("adversarial_tiles", 1) < clean)
    assert np.all(true_probability("adversarial_tiles", 3) < clean)


def test_perturbed_features_from_other_weights_are_refused(cohort):
    folder, tiles, features, _ = cohort
    run = _perturbation_run(cohort, "jpeg", [20], [1.0], "jpeg")
    zarr.open_group(run / "severity20.zarr", mode="r+").attrs["weights_sha256"] = "0" * 64
    settings = SlideRobustnessConfig.from_mapping(
        {"fractions": [1.0], "perturbations": {"jpeg": {"severities": [20]}}})
    with pytest.raises(InputError, match="backbone weights"):
        slide_robustness_run(folder / "abmil", list(features.values()), list(tiles.values()),
                             {"jpeg": run}, folder / "refused", settings, FEATURES, STATISTICS)
    assert not (folder / "refused").exists()


def test_settings_are_checked():
    for bad, match in [({"fractions": [0]}, "fractions"), ({"fractions": [1.5]}, "fractions"),
                       ({"perturbations": {"jpeg": {"severities": [0.5]}}}, "jpeg.severities.0"),
                       ({"perturbations": {"smudge": {"severities": [1]}}}, "smudge"),
                       ({"adversarial": {"top_k": [0]}}, "top_k"),
                       ({"adversarial": {"epsilons": [300]}}, "epsilons.0"),
                       ({"adversarial": {"steps": 0}}, "steps"),
                       ({"adversarial": {"k": [1]}}, "unknown key")]:
        with pytest.raises(ConfigError, match=match):
            SlideRobustnessConfig.from_mapping(bad)


def test_the_report_subsection_shows_every_condition_and_says_how_few_slides(cohort):
    from medrobust.report.page import _environment
    from medrobust.report.slide_robustness import slide_robustness_view

    folder, tiles, features, _ = cohort
    run = _perturbation_run(cohort, "gaussian_noise", [0.1], [0.5, 1.0], "noise")
    settings = SlideRobustnessConfig.from_mapping({
        "fractions": [0.5, 1.0], "perturbations": {"gaussian_noise": {"severities": [0.1]}},
        "adversarial": {"top_k": [2], "epsilons": [2, 4], "steps": 1}})
    slide_robustness_run(folder / "abmil", list(features.values()), list(tiles.values()),
                         {"gaussian_noise": run}, folder / "report_run", settings, FEATURES,
                         {**STATISTICS, "confidence": 0.8})
    view, found = slide_robustness_view([folder / "report_run"])
    assert set(found) == {"slide_tile_fraction", "slide_adversarial_tiles"}
    # the captions name the level the intervals were made at
    assert all("80% intervals" in caption and "95%" not in caption
               for _, caption in found.values())
    assert [row["condition"] for row in view["rows"]] == [
        "clean", "gaussian_noise 0.1, 50% of tiles", "gaussian_noise 0.1, 100% of tiles",
        "PGD ε 2/255 on the top 2 tiles", "PGD ε 4/255 on the top 2 tiles"]
    # the page's one line on the attack covers every budget, not the last one run
    assert view["models"][0]["attack"] == \
        "PGD-L∞ on the k most-attended tiles, ε 2/255, ε 4/255; 1 steps, step 5/255 at " \
        "ε 2/255, step 10/255 at ε 4/255, random start"
    assert view["fewest_slides"] == 4
    # each condition says which classes its slides were called: counts of every slide once
    for row in view["rows"]:
        assert sum(int(count) for count in re.findall(r"\d+", row["predicted"])) == row["n"]
    figures = {name: {"src": "", "caption": caption} for name, (_, caption) in found.items()}
    page = _environment().get_template("slide_robustness.html.j2").render(
        slide_robustness=view, figures=figures, small_test_set=200)
    assert "Slides: robustness" in page and "Few test slides" in page
    assert "4 test slides for abmil (2 normal, 2 tumor)" in " ".join(page.split())
    assert "Few test slides" not in _environment().get_template("slide_robustness.html.j2").render(
        slide_robustness=view, figures=figures, small_test_set=4)
    assert slide_robustness_view([]) == (None, {})


def _lines(path, change):
    path.write_text("\n".join(change(path.read_text().splitlines())) + "\n")


@pytest.mark.parametrize("damage, match", [
    # a condition lost from metrics.csv vanished from the page
    (lambda run: _lines(run / "metrics.csv", lambda lines: lines[:2] + lines[3:]),
     r"metrics\.csv: its conditions are not those of .*predictions\.csv"),
    # n = 3 of the 4 slides the predictions hold
    (lambda run: _lines(run / "metrics.csv", lambda lines: [lines[0], lines[1].replace(
        ",4,", ",3,", 1), *lines[2:]]), r"metrics\.csv: n must be the 4 test slides"),
    # the "predicted" cell counted 3 slides for n = 4
    (lambda run: _lines(run / "predictions.csv", lambda lines: lines[:1] + lines[2:]),
     r"predictions\.csv: 11 rows, not one per condition \(3\) and test slide \(4"),
    (lambda run: _lines(run / "metrics.csv", lambda lines: [lines[0], re.sub(
        r"^(clean,,,[^,]*,[^,]*,[^,]*,4,)[^,]*", r"\1high", lines[1]), *lines[2:]]),
     r"metrics\.csv: line 2: accuracy must be a finite number, not 'high'"),
])
def test_a_damaged_run_is_refused_naming_the_file(cohort, tmp_path, damage, match):
    from medrobust.report.slide_robustness import slide_robustness_view

    folder, tiles, features, _ = cohort
    perturbed = _perturbation_run(cohort, "gaussian_noise", [0.1], [0.5, 1.0], "damage_noise")
    settings = SlideRobustnessConfig.from_mapping(
        {"fractions": [0.5, 1.0], "perturbations": {"gaussian_noise": {"severities": [0.1]}}})
    run = tmp_path / "run"
    slide_robustness_run(folder / "abmil", list(features.values()), list(tiles.values()),
                         {"gaussian_noise": perturbed}, run, settings, FEATURES, STATISTICS)
    damage(run)
    with pytest.raises(InputError, match=match):
        slide_robustness_view([run])


def test_a_condition_that_calls_every_slide_one_class_says_so():
    from medrobust.report.slide_robustness import _predicted

    classes = ["normal", "tumor"]
    assert _predicted(pd.Series([1, 1, 1]), classes) == "all 3 tumor"
    assert _predicted(pd.Series([1, 0, 1]), classes) == "1 normal, 2 tumor"


def test_adversarial_rows_of_three_classes_compare_no_auc():
    """Their slides come from different attack runs (strongest_within_budget): no macro AUC."""
    from medrobust.report.slide_robustness import base_comparisons

    def predictions(seed: int) -> pd.DataFrame:
        rng = np.random.default_rng(seed)
        rows = []
        for kind, k, epsilon in (("clean", 0, 0.0), ("adversarial_tiles", 1, 8.0)):
            for index in range(12):
                probabilities = rng.dirichlet([1, 1, 1])
                rows.append({"sample_id": f"s{index}", "label": index % 3, "kind": kind,
                             "perturbation": None, "severity": None, "fraction": 0.0, "k": k,
                             "epsilon": epsilon, **{f"prob_{name}": value for name, value
                                                    in zip(("a", "b", "c"), probabilities)}})
        return pd.DataFrame(rows)

    runs = [{"model": "mhim_abmil", "dataset": "slides"}, {"model": "abmil", "dataset": "slides"}]
    rows = {row["kind"]: row for row in base_comparisons(
        runs, [predictions(0), predictions(1)], {"mhim_abmil": "abmil"},
        {"n_resamples": 50, "seed": 0, "confidence": 0.95, "alpha": 0.05})}
    assert rows["clean"]["auc_difference"] is not None
    assert rows["adversarial_tiles"]["auc_difference"] is None
    assert rows["adversarial_tiles"]["accuracy_difference"] is not None


def test_an_mhim_model_is_compared_with_its_base_slide_by_slide_under_each_condition():
    """10 slides, two conditions. Under stain shift the base gets 8 slides wrong that the
    MHIM model gets right; the tables come in different slide orders."""
    from medrobust.report.slide_robustness import base_comparisons

    def predictions(wrong: set[int], seed: int) -> pd.DataFrame:
        rows = []
        for kind, extra in (("clean", {}), ("tile_fraction", {"perturbation": "stain_shift",
                                                               "severity": 0.2,
                                                               "fraction": 0.5})):
            for index in range(10):
                label = index % 2
                p_tumor = 0.9 if label == 1 else 0.1
                if kind == "tile_fraction" and index in wrong:
                    p_tumor = 1 - p_tumor
                rows.append({"sample_id": f"s{index}", "label": label,
                             "prob_normal": 1 - p_tumor, "prob_tumor": p_tumor, "kind": kind,
                             "perturbation": None, "severity": None, "fraction": 0.0, "k": 0,
                             "epsilon": 0.0, **extra})
        return pd.DataFrame(rows).sample(frac=1, random_state=seed)

    runs = [{"model": "mhim_abmil", "dataset": "slides"}, {"model": "abmil", "dataset": "slides"}]
    rows = base_comparisons(runs, [predictions(set(), 0), predictions(set(range(8)), 1)],
                            {"mhim_abmil": "abmil"},
                            {"n_resamples": 200, "seed": 0, "confidence": 0.95, "alpha": 0.05})
    by_label = {row["label"]: row for row in rows}
    assert set(by_label) == {"clean", "stain_shift 0.2, 50% of tiles"}
    assert by_label["clean"]["verdict"] == "no detectable difference"
    shifted = by_label["stain_shift 0.2, 50% of tiles"]
    assert (shifted["reference_model"], shifted["n"]) == ("abmil", 10)
    assert (shifted["only_reference_correct"], shifted["only_model_correct"]) == (0, 8)
    assert shifted["accuracy_difference"] == pytest.approx(0.8)
    assert shifted["verdict"] == "helped"
    # slide_comparisons.csv holds them, with the dataset and the page's condition labels
    from medrobust.report.page import AGAINST_BASE, SLIDE_COMPARISON_COLUMNS, \
        slide_comparison_frame
    frame = slide_comparison_frame(rows, [])
    assert list(frame.columns) == list(SLIDE_COMPARISON_COLUMNS)
    assert set(frame["condition"]) == set(by_label) and (frame["dataset"] == "slides").all()
    assert (frame["comparison"] == AGAINST_BASE).all()
    shifted_row = frame.set_index("condition").loc["stain_shift 0.2, 50% of tiles"]
    assert shifted_row["only_model_correct"] == 8
    assert (shifted_row["kind"], shifted_row["perturbation"], shifted_row["severity"],
            shifted_row["fraction"]) == ("tile_fraction", "stain_shift", 0.2, 0.5)
    # the page shows them in the comparisons table the clean comparison uses
    from medrobust.report.page import _environment, comparison_row
    view = {"models": [{"model": "abmil", "n": 10, "class_counts": {"normal": 5, "tumor": 5},
                        "attack": None}], "rows": [], "severity_units": {}, "fewest_slides": 10,
            "comparisons": [comparison_row(row, row["label"]) for row in rows], "alpha": 0.05}
    page = " ".join(_environment().get_template("slide_robustness.html.j2").render(
        slide_robustness=view, figures={}, small_test_set=4).split())
    assert "mhim_abmil against abmil under each condition" in page
    assert "not adjusted for the table's many rows: at α = 0.05" in page
    assert "stain_shift 0.2, 50% of tiles" in page and "helped" in page
    # fractions 0.5 and 0.504 both read "50% of tiles" but are two conditions
    def with_close_fraction(table: pd.DataFrame) -> pd.DataFrame:
        return pd.concat([table, table[table["kind"] == "tile_fraction"].assign(fraction=0.504)])

    settings = {"n_resamples": 200, "seed": 0, "confidence": 0.95, "alpha": 0.05}
    assert len(base_comparisons(runs, [with_close_fraction(predictions(set(), 0)),
                                       with_close_fraction(predictions(set(range(8)), 1))],
                                {"mhim_abmil": "abmil"}, settings)) == 3
    # the two runs must have scored the same slides
    fewer = predictions(set(), 0).query("sample_id != 's9'")
    with pytest.raises(InputError, match="different test slides"):
        base_comparisons(runs, [fewer, predictions(set(range(8)), 1)], {"mhim_abmil": "abmil"},
                         {"n_resamples": 200, "seed": 0, "confidence": 0.95, "alpha": 0.05})
    # a model without its base among the runs is not compared
    assert base_comparisons(runs[:1], [predictions(set(), 0)], {"mhim_abmil": "abmil"},
                            {"n_resamples": 200, "seed": 0, "confidence": 0.95,
                             "alpha": 0.05}) == []


def test_perturbed_features_of_another_precision_are_refused(cohort):
    """Features and tile perturbations record the precision they were embedded at (fp32
    on a CPU); a run embedded at bf16 would move every perturbed tile by bf16's rounding
    too, so it is refused by name rather than read as the perturbation's effect."""
    folder, tiles, features, _ = cohort
    assert {zarr.open_group(path, mode="r").attrs["precision"]
            for path in features.values()} == {"fp32"}
    run = _perturbation_run(cohort, "gaussian_noise", [0.1], [0.5], "noise_bf16")
    group = zarr.open_group(run / "severity0.1.zarr", mode="r+")
    assert group.attrs["precision"] == "fp32"
    group.attrs["precision"] = "bf16"
    settings = SlideRobustnessConfig.from_mapping({
        "fractions": [0.5], "perturbations": {"gaussian_noise": {"severities": [0.1]}}})
    with pytest.raises(InputError, match="embedded at bf16, the test features at fp32"):
        slide_robustness_run(folder / "abmil", list(features.values()), list(tiles.values()),
                             {"gaussian_noise": run}, folder / "refused", settings, FEATURES,
                             STATISTICS)
    assert not (folder / "refused").exists()


def test_the_precision_is_the_feature_stores_and_must_be_one(cohort, tmp_path):
    """Stores that record no precision (written before it was recorded) fall back to what
    features.precision means here; a mix, recorded or not, is refused."""
    from medrobust.evaluate.slide_robustness import stored_precision

    _, _, features, _ = cohort
    paths = []
    for name, recorded in [("a", None), ("b", None), ("c", "bf16")]:
        path = tmp_path / f"{name}.zarr"
        group = zarr.open_group(path, mode="w")
        if recorded:
            group.attrs["precision"] = recorded
        paths.append(path)
    assert stored_precision(paths[:2], FEATURES, torch.device("cpu")) == "fp32"
    assert stored_precision(paths[2:], FEATURES, torch.device("cpu")) == "bf16"
    with pytest.raises(InputError, match="bf16, not recorded"):
        stored_precision(paths, FEATURES, torch.device("cpu"))
    assert stored_precision(list(features.values()), FEATURES, torch.device("cpu")) == "fp32"


def test_the_tile_fraction_figure_has_a_row_per_perturbation_and_a_column_per_severity():
    from medrobust.report.figures import tile_fraction_curves

    rows = [{"model": "abmil", "kind": "clean", "perturbation": None, "severity": None,
             "fraction": 0.0, "accuracy": 0.9, "accuracy_low": 0.8, "accuracy_high": 1.0,
             "auc": 0.95, "auc_low": 0.9, "auc_high": 1.0}]
    for name, severities in (("jpeg", [20, 50]), ("stain_shift", [0.2])):
        for severity in severities:
            for fraction in (0.5, 1.0):
                rows.append({**rows[0], "kind": "tile_fraction", "perturbation": name,
                             "severity": severity, "fraction": fraction, "accuracy": 0.7})
    figure = tile_fraction_curves(pd.DataFrame(rows))
    shown = [axes for axes in figure.axes if axes.get_visible()]
    # jpeg: 2 severities x (accuracy, AUC); stain_shift: 1 x 2, its second column hidden
    assert len(figure.axes) == 8 and len(shown) == 6
    assert sorted(axes.get_title() for axes in shown if axes.get_title()) == [
        "jpeg, severity 20", "jpeg, severity 50", "stain_shift, severity 0.2"]
    assert all(axes.lines for axes in shown)


def test_the_attacked_tiles_are_read_and_embedded_as_the_feature_store_was(cohort):
    """The seam between the feature job and the tile attack: tiles read from the tile store
    by `adversarial_tile_logits` (uint8 NHWC -> float NCHW in [0, 1]) and embedded by the
    configured backbone give the stored features back, so at a zero budget the attacked
    slides' logits are the clean ones. A wrong scale, channel order or backbone would not."""
    from medrobust.attacks.tiles import TilePGD
    from medrobust.evaluate.slide_classifier import load_split_bags
    from medrobust.evaluate.slide_robustness import adversarial_tile_logits

    folder, tiles, features, backbone = cohort
    model, _, bags = load_split_bags(folder / "abmil", list(features.values()), "test",
                                     torch.device("cpu"))
    stores = {slide_id: open_tile_store(path) for slide_id, path in tiles.items()}
    attack = TilePGD(backbone.model, model, 0.0)
    for k in (1, 7):  # one tile; every tile of every slide
        logits = adversarial_tile_logits(attack, bags, stores, k, torch.device("cpu"))
        for bag, attacked in zip(bags, logits):
            with torch.no_grad():
                clean = model(bag.features)[0]
            np.testing.assert_allclose(attacked, clean, rtol=1e-5, atol=1e-5)


def test_a_tile_store_that_is_not_the_features_tiling_is_refused(cohort, tmp_path):
    """The attack reads tile i for feature row i: a tile store of another tiling (one tile
    more) would have the wrong tiles attacked, silently."""
    folder, tiles, features, _ = cohort
    n = 8  # t2's features have 7 rows
    other = tmp_path / "t2.tiles.zarr"
    with atomic_path(other) as tmp:
        create_tile_store(tmp, n, 32, np.zeros((n, 2), np.int64), np.ones(n),
                          {"slide_id": "t2", "label": "tumor", "split": "test"})
    settings = SlideRobustnessConfig.from_mapping(
        {"fractions": [1.0], "adversarial": {"top_k": [1], "epsilons": [8], "steps": 1}})
    with pytest.raises(InputError, match=r"t2\.tiles\.zarr: 8 tiles, the feature store of "
                                         r"slide t2 7"):
        slide_robustness_run(folder / "abmil", list(features.values()),
                             [*(path for slide, path in tiles.items() if slide != "t2"), other],
                             {}, tmp_path / "out", settings, FEATURES, STATISTICS)


def test_each_budget_is_scored_under_the_strongest_attack_run_within_it(cohort, monkeypatch):
    """The threat models nest (top 1 tile among the top 3; 2/255 inside 16/255), so an attack
    that fooled a slide at (k 1, ε 2) fools it at (k 3, ε 16) too: accuracy cannot rise with
    k or ε. A PGD run that missed there is replaced by the stronger, and run.json says so."""
    import medrobust.evaluate.slide_robustness as module

    folder, tiles, features, _ = cohort
    fooled = {(2.0, 1): {"t1", "t2"}, (2.0, 3): {"t1"}, (16.0, 1): {"t2"}, (16.0, 3): set()}

    def fake_attack(attack, bags, stores, k, device):
        epsilon = round(attack.epsilon * 255, 6)
        return [torch.tensor([4.0, -4.0]) if (bag.slide_id in fooled[(epsilon, k)])
                != (bag.label == 0) else torch.tensor([-4.0, 4.0]) for bag in bags]

    monkeypatch.setattr(module, "adversarial_tile_logits", fake_attack)
    settings = SlideRobustnessConfig.from_mapping(
        {"fractions": [1.0], "adversarial": {"top_k": [1, 3], "epsilons": [2, 16]}})
    metrics = slide_robustness_run(folder / "abmil", list(features.values()),
                                   list(tiles.values()), {}, folder / "nested", settings,
                                   FEATURES, STATISTICS)
    accuracy = metrics[metrics["kind"] == "adversarial_tiles"].set_index(
        ["epsilon", "k"])["accuracy"]
    predictions = pd.read_csv(folder / "nested" / PREDICTIONS)
    clean = predictions[predictions["kind"] == "clean"].set_index("sample_id")["correct"]
    # the fake attack leaves t3, t4 right; the clean model has one of them wrong, and the
    # clean slide is within every budget
    [clean_wrong] = [slide for slide in ("t3", "t4") if not clean[slide]]
    # t1, t2 wrong wherever a smaller budget fooled them, and the clean-wrong slide everywhere
    assert accuracy.to_dict() == {(2.0, 1): 0.25, (2.0, 3): 0.25, (16.0, 1): 0.25,
                                  (16.0, 3): 0.25}
    replaced = json.loads((folder / "nested" / RUN).read_text())["replaced_by_smaller_budget"]
    # where a stronger candidate changed the slide's correctness (others only its loss)
    assert sorted((entry["epsilon"], entry["k"], entry["slide_id"], entry["from_epsilon"],
                   entry["from_k"]) for entry in replaced if entry["changed_correctness"]) \
        == sorted([(2, 3, "t2", 2, 1), (16, 1, "t1", 2, 1), (16, 3, "t1", 2, 1),
                   (16, 3, "t2", 2, 1)]
                  + [(epsilon, k, clean_wrong, 0, 0) for epsilon in (2, 16) for k in (1, 3)])
    row = predictions[(predictions["kind"] == "adversarial_tiles") & (predictions["k"] == 3)
                      & (predictions["epsilon"] == 16) & (predictions["sample_id"] == "t2")]
    assert not row["correct"].item()
    # the page says it, per model
    from medrobust.report.page import _environment
    from medrobust.report.slide_robustness import slide_robustness_view

    view, found = slide_robustness_view([folder / "nested"])
    assert view["models"][0]["fell_short"] == 8
    page = " ".join(_environment().get_template("slide_robustness.html.j2").render(
        slide_robustness=view, figures={}, small_test_set=4).split())
    assert "The tile attack falls short for abmil.</b> At 8 (budget, slide) pairs" in page


def test_a_stronger_smaller_budget_that_changes_no_slide_is_recorded_as_unchanged():
    from medrobust.evaluate.slide_robustness import strongest_within_budget

    right, less_right, wrong = (torch.tensor(values) for values in
                                ([-4.0, 4.0], [-1.0, 1.0], [4.0, -4.0]))
    runs = {(2.0, 1): [less_right, wrong], (8.0, 1): [right, wrong]}
    strongest, replaced = strongest_within_budget(runs, [right, right], [1, 1], ["a", "b"])
    # at 8/255 slide a keeps 2/255's higher loss, still right: recorded, correctness unchanged
    assert torch.equal(strongest[(8.0, 1)][0], less_right)
    assert replaced == [{"k": 1, "epsilon": 8.0, "slide_id": "a", "from_k": 1,
                         "from_epsilon": 2.0, "changed_correctness": False}]
    # a wrong clean slide stays wrong under an attack run that happened to set it right
    strongest, replaced = strongest_within_budget({(8.0, 1): [right]}, [wrong], [1], ["a"])
    assert torch.equal(strongest[(8.0, 1)][0], wrong) and replaced[0]["changed_correctness"]


class _MeanIntensity(torch.nn.Module):
    def forward(self, tiles):
        return tiles.mean(dim=(1, 2, 3))[:, None]


class _Window(torch.nn.Module):
    """Uniform attention over mean tile intensity m; 'normal' only while |m - target| < width."""

    def __init__(self, target, width):
        super().__init__()
        self.target, self.width = target, width

    def forward(self, bag):
        attention = torch.full((len(bag),), 1.0 / len(bag))
        m = (attention[:, None] * bag).sum()
        return torch.stack([torch.zeros(()), 2000.0 * ((m - self.target).abs() - self.width)]), \
            attention


def test_the_default_step_is_a_quarter_of_each_budget_over_ten_steps_and_finds_what_2_255_misses():
    """A slide called normal only if its tiles' mean intensity lands within 0.25/255 of
    0.5 + 0.6/255. At ε 1/255 a 2/255 step (2 ε) jumps from one corner of the ball to the other
    and never lands there; 2.5 ε / steps = 0.25/255 walks in."""
    from medrobust.attacks.tiles import TilePGD
    from medrobust.evaluate.slide_robustness import AdversarialTilesConfig

    tiles = torch.full((4, 3, 8, 8), 0.5)
    backbone, mil = _MeanIntensity(), _Window(0.5 + 0.6 / 255, 0.25 / 255)
    features = backbone(tiles)

    def step(config, epsilon):  # in 1/255
        return TilePGD(backbone, mil, epsilon / 255, config.pgd_params()).step_size() * 255

    default = AdversarialTilesConfig(epsilons=[1, 8])
    assert step(default, 8) == pytest.approx(2.0)    # torchattacks' at 8/255
    assert step(default, 1) == pytest.approx(0.25)
    assert step(AdversarialTilesConfig(epsilons=[1], steps=5), 1) == pytest.approx(0.5)
    assert step(AdversarialTilesConfig(epsilons=[1], step_size=2), 1) == pytest.approx(2.0)

    def called(config):
        attack = TilePGD(backbone, mil, 1 / 255, config.pgd_params())
        result = attack.attack_slide(features, lambda positions: tiles[positions], 1, 4)
        assert int(result.clean_logits.argmax()) == 1
        return int(result.adversarial_logits.argmax())

    assert called(AdversarialTilesConfig(epsilons=[1], step_size=2)) == 1  # missed
    assert called(default) == 0
