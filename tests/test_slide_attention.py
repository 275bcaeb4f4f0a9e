"""Attention analysis of slide classifiers: heatmaps, localisation AUC, top-k removal
(evaluate/slide_attention.py; the whole rule runs in tests/test_workflow.py)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

import medrobust.models  # noqa: F401 (registers the architectures)
from medrobust.errors import ConfigError, InputError
from medrobust.evaluate import slide_attention
from medrobust.evaluate.slide_attention import (
    AttentionSettings, analyse_slide_attention, bag_scores, localisation_auc, random_kept,
    tile_tumour_fraction, tiles_to_remove, top_k_against_random, top_k_kept, tumour_tiles)
from medrobust.evaluate.statistics import (
    model_auc, paired_comparison, sign_flip_test, t_mean)
from medrobust.io.tumour_masks import TumourAnnotations, TumourMask, rasterise_asap
from medrobust.models.mil import ABMIL
from medrobust.models.registry import SLIDE_CLASSIFIERS, build_model
from medrobust.evaluate.heatmaps import (
    HEATMAP_ALPHA, TUMOUR_CONTOUR, attention_heatmap, heatmap_colours)
from medrobust.preprocess.qc import picture_scale


def _composited(colour, background):
    """PIL's alpha_composite of an RGBA fill over an opaque pixel."""
    colour, background = np.asarray(colour, float), np.asarray(background, float)
    return (colour * HEATMAP_ALPHA + background * (255 - HEATMAP_ALPHA)) / 255


def test_the_most_attended_tile_gets_the_top_colour_in_its_place():
    thumbnail = np.full((60, 80, 3), 255, np.uint8)   # white: the blend is known
    tiles = np.array([[0, 0], [20, 0], [40, 20], [60, 40]], float)
    attention = np.array([0.1, 0.2, 0.6, 0.1])
    picture = np.asarray(attention_heatmap(thumbnail, tiles, 20, attention))
    scale = picture_scale(60, 80)
    top, bottom = heatmap_colours(np.array([1.0, 0.0]))
    centre = lambda tile: tuple(int((c + 10) * scale) for c in tiles[tile][::-1])  # (row, col)
    np.testing.assert_allclose(picture[centre(2)], _composited(top, 255), atol=2)
    np.testing.assert_allclose(picture[centre(0)], _composited(bottom, 255), atol=2)
    np.testing.assert_allclose(picture[centre(3)], _composited(bottom, 255), atol=2)
    # a tile without a square stays the thumbnail, and a colour bar is added on the right
    np.testing.assert_array_equal(picture[int(10 * scale), int(70 * scale)], [255, 255, 255])
    assert picture.shape[1] > round(80 * scale)


def test_heatmap_outlines_the_tumour_mask():
    thumbnail = np.full((40, 40, 3), 255, np.uint8)
    mask = np.zeros((20, 20), bool)   # half the thumbnail's resolution, the same area
    mask[5:15, 5:15] = True
    picture = np.asarray(attention_heatmap(thumbnail, np.zeros((0, 2)), 10, np.zeros(0), mask))
    scale = picture_scale(40, 40)
    assert (picture[int(10 * scale) + 1, int(10 * scale):int(30 * scale)] == TUMOUR_CONTOUR).all(-1).any()
    assert (picture[int(20 * scale), int(20 * scale)] == 255).all()   # inside: not outlined


def test_localisation_auc_is_sklearns_roc_auc_with_the_tumour_rule():
    rng = np.random.default_rng(3)
    fraction = rng.uniform(0, 1, 50)
    fraction[:3] = [0.5, 0.4999, 1.0]   # the threshold itself counts as tumour
    attention = np.round(rng.uniform(0, 1, 50), 1)   # ties, counted half as sklearn does
    expected = roc_auc_score(fraction >= 0.5, attention)
    assert localisation_auc(attention, fraction, 0.5) == pytest.approx(expected, abs=1e-12)
    assert tumour_tiles(fraction, 0.5)[:3].tolist() == [True, False, True]
    assert localisation_auc(attention, np.zeros(50), 0.5) is None   # no tumour tile


@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k_removes_exactly_the_k_most_attended_tiles(k):
    rng = np.random.default_rng(k)
    attention = rng.permutation(10) / 10.0
    kept = top_k_kept(attention, k)
    removed = np.setdiff1d(np.arange(10), kept)
    assert len(removed) == k
    assert set(removed) == set(np.argsort(attention)[-k:])
    assert attention[kept].max() < attention[removed].min()
    assert len(random_kept(10, k, np.random.default_rng(0))) == 10 - k


def test_a_slide_with_at_most_k_tiles_keeps_its_least_attended_tile():
    attention = np.array([0.5, 0.1, 0.4])
    assert tiles_to_remove(3, 8) == 2
    assert top_k_kept(attention, 8).tolist() == [1]
    assert top_k_kept(attention, 3).tolist() == [1]
    assert len(random_kept(3, 8, np.random.default_rng(0))) == 1
    assert top_k_kept(np.array([0.7]), 1).tolist() == [0]


@pytest.mark.parametrize("arch", sorted(SLIDE_CLASSIFIERS))
def test_every_slide_classifier_gives_one_attention_weight_per_tile(arch):
    torch.manual_seed(0)
    model = build_model({"family": "slide", "arch": arch, "num_classes": 2, "feature_dim": 6,
                         "arch_options": {"hidden_dim": 16}}).eval()
    probabilities, attention = bag_scores(model, torch.randn(9, 6), torch.device("cpu"))
    assert probabilities.shape == (2,) and probabilities.sum() == pytest.approx(1, abs=1e-6)
    assert attention.shape == (9,) and (attention >= 0).all()
    # ABMIL: a distribution over the tiles; TransMIL: the CLS row without the CLS itself
    assert 0 < attention.sum() <= 1 + 1e-3


def test_tumour_fraction_is_the_share_of_each_tile_in_the_mask():
    mask = np.zeros((8, 8), bool)   # 4 level-0 pixels per mask pixel
    mask[:, :4] = True              # the left half of a 32 x 32 slide
    coords = np.array([[0, 0], [8, 0], [16, 16], [24, 24]])
    fraction = tile_tumour_fraction(TumourMask(mask, 4.0), coords, 16)
    np.testing.assert_allclose(fraction, [1.0, 0.5, 0.0, 0.0])


ASAP = """<?xml version="1.0"?>
<ASAP_Annotations><Annotations>
<Annotation Name="a" Type="Polygon" PartOfGroup="_0"><Coordinates>
<Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="40" Y="0"/>
<Coordinate Order="2" X="40" Y="40"/><Coordinate Order="3" X="0" Y="40"/></Coordinates></Annotation>
<Annotation Name="b" Type="Polygon" PartOfGroup="_2"><Coordinates>
<Coordinate Order="0" X="20" Y="20"/><Coordinate Order="1" X="40" Y="20"/>
<Coordinate Order="2" X="40" Y="40"/><Coordinate Order="3" X="20" Y="40"/></Coordinates></Annotation>
</Annotations></ASAP_Annotations>"""


def test_camelyon_polygons_are_filled_and_exclusions_cut_out(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations/tumor_001.xml").write_text(ASAP)
    (tmp_path / "lesion_annotations.csv").write_text(
        "sample_id,annotation_path\ntumor_001,annotations/tumor_001.xml\n")
    annotations = TumourAnnotations(tmp_path)
    mask = annotations.mask("tumor_001", (80, 80), 4.0)
    assert mask.mask.shape == (20, 20) and mask.downsample == 4.0
    assert mask.mask[2, 2] and not mask.mask[7, 7] and not mask.mask[15, 15]
    assert annotations.mask("normal_001", (80, 80), 4.0) is None   # no annotation: unknown
    (tmp_path / "bad.xml").write_text("<ASAP")
    with pytest.raises(InputError, match="bad.xml"):
        rasterise_asap(tmp_path / "bad.xml", (8, 8), 1.0)


def test_settings_reject_bad_values():
    assert AttentionSettings.from_mapping({"models": ["abmil"], "top_k": [1, 3]}).top_k == (1, 3)
    with pytest.raises(ConfigError, match="top_k"):
        AttentionSettings.from_mapping({"top_k": [0]})
    with pytest.raises(ConfigError, match="tumour_threshold"):
        AttentionSettings.from_mapping({"tumour_threshold": 0})


CLASSES = ["normal", "tumor"]


def _probabilities(labels, p_true):
    """(normal, tumor) probabilities of slides whose true class gets `p_true`."""
    p_tumor = np.where(labels == 1, p_true, 1 - p_true)
    return np.stack([1 - p_tumor, p_tumor], axis=1)


def _top_k_rows(k, labels, top, draws):
    """One k's rows of a top-k table: per slide (label index `labels[i]`) the top-k removal
    with probability `top[i]` of the true class, and random draw d with `draws[d][i]`."""
    rows = []
    for removal, draw, p_true in [("top", -1, top),
                                  *(("random", d, p) for d, p in enumerate(draws))]:
        for index, (label, (p_normal, p_tumor)) in enumerate(
                zip(labels, _probabilities(labels, p_true))):
            rows.append({"slide_id": f"s{index}", "label": CLASSES[label], "k": k,
                         "removal": removal, "draw": draw, "n_tiles": 10, "n_removed": k,
                         "prob_normal": p_normal, "prob_tumor": p_tumor})
    return rows


def test_top_k_removal_is_compared_with_random_removal_slide_by_slide():
    """10 slides: random removal leaves all right, most-attended removal gets 8 wrong;
    the rows come shuffled, so only pairing by slide id gives 8 slides that differ."""
    top = np.where(np.arange(10) >= 8, 0.9, 0.1)
    rows = _top_k_rows(2, np.arange(10) % 2, top, [np.full(10, 0.9)])
    rows.append({"slide_id": "s0", "label": "normal", "k": 0, "removal": "none", "draw": -1,
                 "prob_normal": 0.9, "prob_tumor": 0.1})
    table = pd.DataFrame(rows).sample(frac=1, random_state=0)
    (row,) = top_k_against_random(table, CLASSES, 0.95, 0.05)
    assert (row["k"], row["n"]) == (2, 10)
    assert (row["only_reference_correct"], row["only_model_correct"]) == (8, 0)
    assert (row["reference_accuracy"], row["accuracy"]) == (1.0, pytest.approx(0.2))
    assert row["accuracy_difference"] == pytest.approx(-0.8)
    assert row["accuracy_difference_high"] < 0
    assert row["p_value"] == pytest.approx(2 * 0.5 ** 8) and row["verdict"] == "hurt"


def test_the_random_control_scores_each_draw_not_their_mean():
    """16 slides, two random draws each: the first leaves every slide right (0.9 for the
    true class), the second none (0.4). One random removal is right half the time, but the
    draws' mean probability (0.65) is right on every slide: as the reference, that ensemble
    made the top-k removal, right on 8 slides, read as "hurt" (p = 2/2^8). Scored draw by
    draw, the top-k removal is as good as a random one."""
    labels = np.arange(16) % 2
    top = np.where(np.arange(16) < 8, 0.6, 0.4)
    draws = [np.full(16, 0.9), np.full(16, 0.4)]
    table = pd.DataFrame(_top_k_rows(2, labels, top, draws)).sample(frac=1, random_state=1)
    averaged = paired_comparison(labels, _probabilities(labels, np.mean(draws, axis=0)),
                                 _probabilities(labels, top))
    assert averaged["accuracy_a"].estimate == 1.0 and averaged["verdict"] == "hurt"

    (row,) = top_k_against_random(table, CLASSES, 0.95, 0.05)
    assert (row["n"], row["reference_accuracy"], row["accuracy"]) == (16, 0.5, 0.5)
    assert row["accuracy_difference"] == 0.0 and row["p_value"] == pytest.approx(1.0)
    assert (row["verdict"], row["test"]) == ("no detectable difference", "exact sign-flip test")
    # the draws' AUCs are 1 and 0, the top-k removal's 0.5; their mean's would be 1
    assert row["auc_difference"] == 0.0 and row["auc_difference_low"] is None
    summary = slide_attention._top_k_summary(table, CLASSES, 200, 0.95, 0)
    control = next(item for item in summary if item["removal"] == "random")
    assert (control["n"], control["accuracy"], control["auc"]) == (16, 0.5, 0.5)
    assert control["auc_low"] is None and control["auc_high"] is None


def test_the_top_k_p_value_is_the_sign_flip_test_of_the_per_slide_differences():
    """Per slide R * (top-k removal correct) - (random draws correct), from shuffled rows;
    the accuracy difference is their paired t interval over R."""
    rng = np.random.default_rng(4)
    labels, repeats = np.arange(14) % 2, 3
    top = rng.uniform(0, 1, 14)
    draws = [rng.uniform(0.2, 1, 14) for _ in range(repeats)]
    table = pd.DataFrame(_top_k_rows(4, labels, top, draws)).sample(frac=1, random_state=2)
    differences = repeats * (top > 0.5) - (np.array(draws) > 0.5).sum(axis=0)
    assert len(set(differences)) > 2   # not McNemar's yes/no in disguise

    (row,) = top_k_against_random(table, CLASSES, 0.95, 0.05)
    assert row["p_value"] == pytest.approx(sign_flip_test(differences)["p_value"])
    expected = t_mean(differences / repeats, 0.95, bounds=(-1, 1))
    assert (row["accuracy_difference"], row["accuracy_difference_low"],
            row["accuracy_difference_high"]) == pytest.approx(
        (expected.estimate, expected.low, expected.high))
    assert row["reference_accuracy"] == pytest.approx(np.mean(np.array(draws) > 0.5))
    assert (row["only_reference_correct"], row["only_model_correct"]) == (
        (differences < 0).sum(), (differences > 0).sum())
    draw_aucs = [model_auc(labels, _probabilities(labels, draw)) for draw in draws]
    assert row["auc_difference"] == pytest.approx(
        model_auc(labels, _probabilities(labels, top)) - np.mean(draw_aucs))
    with pytest.raises(InputError, match="not one random row per slide and draw"):
        top_k_against_random(table.drop(table.index[(table["removal"] == "random")][:1]),
                             CLASSES, 0.95, 0.05)


def test_top_k_table_has_a_row_per_random_draw_and_the_summary_compares_them(
        tmp_path, monkeypatch):
    """A real ABMIL on six slides of 2 to 8 tiles, top_k [1, 3], three draws: top_k.csv
    holds each draw, and the summary's comparison is the one its rows give."""
    torch.manual_seed(0)
    model = ABMIL(6, 2).eval()
    slides = [slide_attention._Slide(f"s{index}", index % 2, torch.randn(n, 6) * 3,
                                     np.zeros((n, 2)), {})
              for index, n in enumerate([5, 7, 2, 6, 4, 8])]
    config = {"classes": CLASSES, "dataset": "slides", "arch": "abmil"}
    monkeypatch.setattr(slide_attention, "_test_slides", lambda *args: (model, config, slides))
    monkeypatch.setattr(slide_attention, "_heatmap", lambda *args: None)   # no slide files
    summary = analyse_slide_attention(tmp_path / "abmil", [], [], tmp_path, tmp_path / "run",
                                      AttentionSettings(top_k=(1, 3), random_repeats=3),
                                      n_resamples=200)
    table = pd.read_csv(tmp_path / "run" / "top_k.csv", dtype={"slide_id": str})
    random = table[table["removal"] == "random"]
    assert len(random) == 6 * 2 * 3
    assert all(sorted(group) == [0, 1, 2] for _, group in random.groupby(["slide_id", "k"])["draw"])
    assert (table.loc[table["removal"] != "random", "draw"] == -1).all()
    assert len(table) == 6 * (1 + 2 * (1 + 3))
    assert summary["top_k_against_random"] == top_k_against_random(table, CLASSES, 0.95, 0.05)


def test_top_k_curves_draw_removal_and_random_from_the_full_bag():
    from medrobust.report.figures import top_k_curves

    rows = pd.DataFrame([
        {"model": model, "k": k, "removal": removal, "auc": 0.9 - 0.1 * k, "auc_low": 0.5,
         "auc_high": 1.0, "accuracy": 0.8, "accuracy_low": 0.4, "accuracy_high": 0.9}
        for model in ("abmil", "transmil")
        for k, removal in ((0, "none"), (1, "top"), (2, "top"), (1, "random"), (2, "random"))])
    figure = top_k_curves(rows)
    for panel in figure.axes:
        lines = panel.get_lines()
        assert len(lines) == 4   # two models, removal and random each
        assert all(list(line.get_xdata()) == [0, 1, 2] for line in lines)
        assert sorted(line.get_linestyle() for line in lines) == ["-", "-", "--", "--"]
    assert len(figure.legends[0].get_texts()) == 4


def _attention_run(folder):
    """A slide_attention job's folder as analyse_slide_attention writes it: three test slides,
    two with a tumour mask (one of them with tumour tiles only, so no AUC), top_k [1, 2]."""
    from medrobust.evaluate.attention_files import HEATMAPS, LOCALISATION_TABLE, SUMMARY

    (folder / HEATMAPS).mkdir(parents=True)
    for slide in ("s1", "s2", "s3"):
        attention_heatmap(np.zeros((8, 8, 3), np.uint8), np.array([[0, 0]]), 4,
                          np.array([1.0])).save(folder / HEATMAPS / f"{slide}.png")
    pd.DataFrame({"slide_id": ["s1", "s2"], "label": ["tumor", "tumor"], "n_tiles": [9, 4],
                  "n_tumour_tiles": [3, 4], "auc": [0.75, None]}
                 ).to_csv(folder / LOCALISATION_TABLE, index=False)
    interval = {"auc": 0.5, "auc_low": 0.1, "auc_high": 0.9, "accuracy": 0.6,
                "accuracy_low": 0.2, "accuracy_high": 0.9}
    top_k = [{"k": k, "removal": removal, "n": 3, "mean_removed": k, **interval,
              **({"auc_low": None, "auc_high": None} if removal == "random" else {})}
             for k, removal in ((0, "none"), (1, "random"), (1, "top"), (2, "random"),
                                (2, "top"))]
    (folder / SUMMARY).write_text(json.dumps({
        "model": "abmil", "dataset": "slides", "arch": "abmil", "classes": ["normal", "tumor"],
        "n_slides": 3, "settings": {"top_k": [1, 2], "random_repeats": 5, "confidence": 0.95},
        "tumour_masks": True,
        "localisation": {"n_slides_with_mask": 2, "n_slides_with_auc": 1, "mean_auc": None},
        "top_k": top_k, "top_k_against_random": []}))
    return folder


def test_an_attention_run_as_written_is_shown_whole(tmp_path):
    from medrobust.report.slide_attention import attention_section

    found, section = attention_section([_attention_run(tmp_path)])
    (model,) = section["models"]
    assert (model["heatmaps"], model["with_mask"], len(model["slides"])) == (3, 2, 2)
    assert "attention_abmil_s3" in found and len(section["top_k"]) == 5
    # the random removal's AUC has no interval: none shown, not a NaN one ("[–, –]")
    random = [row for row in section["top_k"] if row["removal"] == "random"]
    assert all(row["auc_low"] is None and row["auc_high"] is None for row in random)


@pytest.mark.parametrize("damage, match", [
    # a lost row read as one slide fewer than the summary counts
    (lambda run: (run / "localisation.csv").write_text(
        "".join((run / "localisation.csv").read_text().splitlines(True)[:2])),
     r"localisation\.csv: 1 slides, .*summary\.json counts 2 with a tumour mask"),
    (lambda run: (run / "localisation.csv").write_bytes(
        (run / "localisation.csv").read_bytes()[:70]),
     r"localisation\.csv: the localisation table is cut short"),
    # 2 of 3 heatmaps shown, silently
    (lambda run: (run / "heatmaps" / "s3.png").unlink(),
     r"heatmaps: 2 heatmaps, not one per test slide of .*summary\.json \(3\)"),
    (lambda run: (run / "summary.json").write_text((run / "summary.json").read_text().replace(
        '"auc": 0.5', '"auc": NaN', 1)), r"summary\.json: top_k must hold"),
    (lambda run: (run / "summary.json").write_text("[]"),
     r"summary\.json: the attention summary must hold one JSON object"),
])
def test_a_damaged_attention_run_is_refused_naming_the_file(tmp_path, damage, match):
    from medrobust.report.slide_attention import attention_section

    damage(_attention_run(tmp_path))
    with pytest.raises(InputError, match=match):
        attention_section([tmp_path])


def test_a_heatmap_cut_short_is_refused_naming_it(tmp_path):
    """Embedded as it was, it showed on the page as a broken image."""
    from medrobust.report.slide_attention import attention_section

    heatmap = _attention_run(tmp_path) / "heatmaps" / "s1.png"
    heatmap.write_bytes(heatmap.read_bytes()[:-40])
    with pytest.raises(InputError, match=r"s1\.png: damaged PNG attention heatmap"):
        attention_section([tmp_path])
