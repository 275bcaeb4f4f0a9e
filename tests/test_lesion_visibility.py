"""Lesion visibility under low-pass filtering, on images where the answer is known."""

import json

import numpy as np
import pandas as pd
import pydicom
import pytest
from test_recipes import FULL, nbia_copy

from medrobust.conditions import has_lesion_annotations, plan_evaluations, plan_lesion_visibility
from medrobust.data.lesions import LesionMask, read_lesion_masks
from medrobust.data.manifest import MANIFEST_NAME, read_manifest
from medrobust.data.sources import fetch_dataset
from medrobust.errors import ConfigError, InputError
from medrobust.evaluate import lesion_visibility as lv
from medrobust.evaluate.statistics import clopper_pearson
from medrobust.evaluate.metrics import METRIC_KEYS, prediction_table
from medrobust.perturbations.fourier import LowPass
from medrobust.preprocess.images import (ImagePreprocessConfig, Placement, build_image_store,
                                        prepare_image)

SIZE = 64


def _disc(centre, radius, size=SIZE):
    rows, cols = np.ogrid[:size, :size]
    return np.hypot(rows - centre[0], cols - centre[1]) <= radius


def _ring_by_definition(mask, width, exclude):
    """Pixels whose distance to the nearest mask pixel is in (1, 1 + width]."""
    ys, xs = np.nonzero(mask)
    rows, cols = np.mgrid[:mask.shape[0], :mask.shape[1]]
    distance = np.min(np.hypot(rows[..., None] - ys, cols[..., None] - xs), axis=-1)
    return (distance > 1) & (distance <= 1 + width) & ~exclude


def test_ring_is_the_band_around_the_lesion_without_other_lesions():
    lesion, other = _disc((20, 20), 2), _disc((20, 25), 1)
    ring = lv.ring_mask(lesion, lesion | other, 3)
    assert np.array_equal(ring, _ring_by_definition(lesion, 3, lesion | other))
    assert not (ring & other).any() and not (ring & lesion).any()


def test_cnr_of_a_speck_on_known_noise():
    rng = np.random.default_rng(0)
    sigma, amplitude = 0.02, 0.1
    image = 0.3 + sigma * rng.standard_normal((SIZE, SIZE))
    speck = np.zeros((SIZE, SIZE), bool)
    speck[32, 32] = True
    image[speck] = 0.3 + amplitude
    ring = lv.ring_mask(speck, speck, 12)
    cnr, _ = lv.lesion_contrast(image, speck, ring, k=3.0)
    background = image[ring]
    assert cnr == pytest.approx((image[speck].mean() - background.mean()) / background.std())
    # on a few hundred ring pixels the sample statistics are close to the noise's own
    assert cnr == pytest.approx(amplitude / sigma, rel=0.1)


@pytest.mark.parametrize("excess, detectable", [(2.9, False), (3.1, True)])
def test_detectable_means_peak_above_ring_mean_by_k_standard_deviations(excess, detectable):
    rng = np.random.default_rng(1)
    image = 0.4 + 0.01 * rng.standard_normal((SIZE, SIZE))
    speck = _disc((30, 30), 1)
    ring = lv.ring_mask(speck, speck, 3)
    image[speck] = image[ring].mean() + excess * image[ring].std()
    assert lv.lesion_contrast(image, speck, ring, k=3.0)[1] is detectable
    assert lv.lesion_contrast(image, speck, ring, k=excess - 0.5)[1] is True


def test_a_small_radius_erases_a_speck_and_leaves_a_large_mass():
    rng = np.random.default_rng(2)
    image = 0.3 + 0.01 * rng.standard_normal((1, 1, SIZE, SIZE))
    speck, mass = np.zeros((SIZE, SIZE), bool), _disc((44, 44), 6)
    speck[16, 16] = True
    image[0, 0][speck] += 0.5
    image[0, 0][mass] += 0.3
    lesions = [lv.StoreLesion(0, "a", "calcification", speck), lv.StoreLesion(0, "a", "mass", mass)]
    config = lv.LesionVisibilityConfig(k=3.0, ring_width=3)
    clean = lv.measure_lesions(image[:, 0], lesions, "clean", config)
    assert clean["detectable"].tolist() == [True, True]
    blurred = LowPass(2.0)(image, None)
    filtered = lv.measure_lesions(blurred[:, 0], lesions, "lowpass-2", config)
    assert filtered["detectable"].tolist() == [False, True]
    assert filtered["cnr"][0] < clean["cnr"][0]


def test_visibility_table_counts_detectable_lesions_with_intervals_over_images():
    measures = pd.DataFrame({"sample_id": ["a", "b", "c", "a"], "level": ["clean"] * 4,
                             "lesion_type": ["calcification"] * 3 + ["mass"],
                             "cnr": [1.0, 2.0, 6.0, 4.0], "detectable": [True, False, True, True]})
    table = lv.visibility_table(measures, 0.95).set_index("lesion_type")
    assert table.loc["calcification", "detectable"] == pytest.approx(2 / 3)
    assert table.loc["calcification", "cnr_mean"] == pytest.approx(3.0)
    assert table.loc["calcification", "cnr_median"] == pytest.approx(2.0)
    assert 0 < table.loc["calcification", "detectable_low"] < 2 / 3 < table.loc[
        "calcification", "detectable_high"] < 1
    assert table.loc["mass", "n_lesions"] == 1 and table.loc["calcification", "n_images"] == 3
    # one lesion per image: nothing is clustered, the exact interval as before
    exact = clopper_pearson(2, 3)
    assert (table.loc["calcification", "detectable_low"],
            table.loc["calcification", "detectable_high"]) == pytest.approx((exact.low, exact.high))


def test_lesions_of_one_image_count_once_in_the_visibility_interval():
    """Four images of ten specks each, all of an image detectable or none: four draws."""
    measures = pd.DataFrame({"sample_id": np.repeat(list("abcd"), 10), "level": "clean",
                             "lesion_type": "calcification", "cnr": 1.0,
                             "detectable": np.repeat([True, True, True, False], 10)})
    row = lv.visibility_table(measures, 0.95).iloc[0]
    assert (row["n_lesions"], row["n_images"], row["detectable"]) == (40, 4, 0.75)
    assert row["detectable_low"] < clopper_pearson(3, 4).low


def _evaluation(folder, sample_ids, labels, predicted):
    """An evaluation's metrics JSON and prediction table, as the evaluators write them."""
    probabilities = np.where(np.eye(2, dtype=bool)[predicted], 0.9, 0.1)
    table = prediction_table(sample_ids, np.array(labels), probabilities, ["benign", "malignant"])
    table.to_csv(folder / "lowpass-severity4.csv", index=False)
    record = {key: None for key in METRIC_KEYS} | {"n": len(sample_ids), "kind": "perturbation",
                                                   "severity": 4.0}
    (folder / "lowpass-severity4.json").write_text(json.dumps(record))
    return {"model": "m", "level": "lowpass-4", "metrics": folder / "lowpass-severity4.json",
            "predictions": folder / "lowpass-severity4.csv"}


def test_sensitivity_per_lesion_group(tmp_path):
    record = _evaluation(tmp_path, ["c1", "c2", "c3", "m1", "m2", "b1", "both"],
                         [1, 1, 1, 1, 1, 0, 1], [1, 0, 0, 1, 1, 1, 1])
    lesions = [lv.StoreLesion(i, sample, kind, np.ones((2, 2), bool)) for i, (sample, kind) in
               enumerate([("c1", "calcification"), ("c2", "calcification"), ("c3", "calcification"),
                          ("m1", "mass"), ("m2", "mass"), ("both", "mass"),
                          ("both", "calcification")])]
    groups = lv.lesion_groups(lesions)
    assert "both" not in groups
    table = lv.sensitivity_table([record], groups, positive=1,
                                 confidence=0.95).set_index("group")
    assert table.loc["calcification only", "n_positives"] == 3
    assert table.loc["calcification only", "sensitivity"] == pytest.approx(1 / 3)
    assert table.loc["mass only", "sensitivity"] == 1.0
    assert table.loc["mass only", "sensitivity_low"] < 1.0


def test_a_damaged_prediction_table_is_refused_naming_it(tmp_path):
    """The evaluations are read as the summary reads them: a word where the probabilities
    are, or a row gone, would otherwise change a sensitivity without a word."""
    record = _evaluation(tmp_path, ["c1", "c2", "m1"], [1, 1, 1], [1, 0, 1])
    lines = record["predictions"].read_text().splitlines()
    record["predictions"].write_text("\n".join([*lines[:2], *lines[3:]]) + "\n")
    with pytest.raises(InputError, match=r"lowpass-severity4.csv: 2 rows, but .* counts n = 3"):
        lv.sensitivity_table([record], {}, 1, 0.95)
    lines[2] = lines[2].replace("0.1", "x", 1)
    record["predictions"].write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"lowpass-severity4.csv: line 3: the label must be"):
        lv.sensitivity_table([record], {}, 1, 0.95)


def test_masks_reach_the_store_grid_where_the_preprocessing_puts_the_image():
    # 320 x 256 is padded by 32 columns each side to 320 x 320, then shrunk 5 times
    raw = np.zeros((320, 256), bool)
    raw[np.hypot(*np.ogrid[-150:170, -100:156]) <= 5] = True
    geometry = {"s": Placement().geometry(raw.shape, (SIZE, SIZE), pad_right=False)}
    [lesion] = lv.to_store_grid([LesionMask("s", "calcification", raw)], {"s": 0},
                                geometry, (SIZE, SIZE))
    ys, xs = np.nonzero(lesion.mask)
    assert np.mean(ys) == pytest.approx(150 / 5, abs=0.6)
    assert np.mean(xs) == pytest.approx((100 + 32) / 5, abs=0.6)
    assert 1 <= lesion.mask.sum() <= 9


@pytest.mark.parametrize("flipped", [False, True])
def test_masks_follow_the_breast_crop_flip_and_a_non_square_store(flipped):
    # the lesion's store mask must sit where the preprocessing itself puts the same
    # disc: crop the raw image, flip it, pad on the right, resize to 48 x 64
    raw = np.zeros((400, 300), bool)
    raw[np.hypot(*np.ogrid[-250:150, -180:120]) <= 9] = True
    top, left, shape = 40, 60, (48, 64)
    view = raw[top:360, left:280]
    if flipped:
        view = view[:, ::-1]
    placed = prepare_image(view.astype(np.float32), shape, 1, pad_right=True)[0]
    geometry = {"s": Placement(top, left, flipped).geometry(view.shape, shape, pad_right=True)}
    [lesion] = lv.to_store_grid([LesionMask("s", "mass", raw)], {"s": 0}, geometry, shape)
    assert lesion.mask.shape == shape
    expected = placed >= 0.5 * placed.max()
    ys, xs = np.nonzero(lesion.mask)
    want_ys, want_xs = np.nonzero(expected)
    assert np.mean(ys) == pytest.approx(np.mean(want_ys), abs=0.5)
    assert np.mean(xs) == pytest.approx(np.mean(want_xs), abs=0.5)
    assert abs(int(lesion.mask.sum()) - int(expected.sum())) <= 2


def test_a_lesion_the_crop_cut_away_is_left_out():
    raw = np.zeros((100, 100), bool)
    raw[2:5, 2:5] = True
    geometry = {"s": Placement(50, 50, False).geometry((50, 50), (SIZE, SIZE), pad_right=True)}
    assert lv.to_store_grid([LesionMask("s", "calcification", raw)], {"s": 0},
                            geometry, (SIZE, SIZE)) == []


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="lesion_visibility.k"):
        lv.LesionVisibilityConfig(k=0)
    with pytest.raises(ConfigError, match="ring_width"):
        lv.LesionVisibilityConfig(ring_width=0)
    with pytest.raises(ConfigError, match="unknown key"):
        lv.LesionVisibilityConfig.from_mapping({"sigma": 3})


def test_which_sources_carry_lesions():
    assert has_lesion_annotations({"type": "synthetic", "modality": "mammography"})
    assert has_lesion_annotations({"type": "cbis_ddsm"})
    assert not has_lesion_annotations({"type": "synthetic", "modality": "slides"})
    assert not has_lesion_annotations({"type": "medmnist"})


def test_cbis_ddsm_roi_masks_become_lesions(tmp_path):
    root = nbia_copy(tmp_path / "cbis")
    config = {"classes": ["benign", "malignant"],
              "source": {"type": "cbis_ddsm", "root": str(root), "val_fraction": 0.4}}
    manifest = read_manifest(fetch_dataset(config, tmp_path / "out"))
    lesions = read_lesion_masks(manifest.root, set(manifest.table["sample_id"]))
    assert len(lesions) == 13                          # one per abnormality
    assert {lesion.lesion_type for lesion in lesions} == {"mass", "calcification"}
    for lesion in lesions:                             # the fixture's masks cover the image
        assert lesion.mask.shape == FULL and lesion.mask.all()


def test_a_dataset_without_a_lesion_table_is_named(tmp_path):
    with pytest.raises(InputError, match="no lesion table"):
        read_lesion_masks(tmp_path, {"a"})


def test_an_unknown_lesion_type_is_named(tmp_path):
    (tmp_path / "rois.csv").write_text("sample_id,lesion_type,mask_path\na,cyst,m.dcm\n")
    with pytest.raises(InputError, match="rois.csv: unknown lesion_type"):
        read_lesion_masks(tmp_path, {"a"})


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("mammograms")
    config = {"kind": "images", "classes": ["benign", "malignant"],
              "source": {"type": "synthetic", "modality": "mammography", "n_samples": 24,
                         "height": 320, "width": 256, "malignant_fraction": 0.5,
                         "splits": {"train": 0.5, "val": 0.1, "test": 0.4}}}
    manifest = fetch_dataset(config, root / "raw")
    store = build_image_store(manifest, root / "store.zarr", ImagePreprocessConfig(SIZE))
    return root, manifest.parent, store


def test_synthetic_lesions_follow_their_table(synthetic):
    _, raw, _ = synthetic
    table = pd.read_csv(raw / "lesions.csv")
    lesions = read_lesion_masks(raw, set(table["sample_id"]))
    assert len(lesions) == len(table)
    for lesion, row in zip(lesions, table.itertuples()):
        header = pydicom.dcmread(raw / f"dicom/{row.sample_id}.dcm", stop_before_pixels=True)
        assert lesion.mask.shape == (header.Rows, header.Columns)
        assert lesion.mask[row.y, row.x]
        assert lesion.mask.sum() == pytest.approx(np.pi * row.radius ** 2, rel=0.35)


def test_the_run_writes_every_table_and_the_crops(synthetic, tmp_path):
    root, raw, store = synthetic
    out = tmp_path / "visibility"
    lv.lesion_visibility_run(raw, store, out, [8, 2], [], {"k": 3.0, "ring_width": 3}, 0.95)
    visibility = pd.read_csv(out / lv.FILES["visibility"])
    assert list(visibility["level"].unique()) == ["clean", "lowpass-8", "lowpass-2"]
    specks = visibility[visibility["lesion_type"] == "calcification"].set_index("level")
    # the default's specks are visible on the clean store and gone at 2 cycles per image
    assert specks.loc["clean", "detectable"] > 0.8
    assert specks.loc["lowpass-2", "detectable"] < specks.loc["clean", "detectable"]
    crops = np.load(out / lv.FILES["crops"])
    assert crops["calcification"].shape[0] == 3 and crops["mass"].shape[0] == 3
    assert pd.read_csv(out / lv.FILES["lesions"])["level"].nunique() == 3


def _lines(path, change):
    path.write_text("\n".join(change(path.read_text().splitlines())) + "\n")


@pytest.mark.parametrize("damage, match", [
    # a lost row or a cut file drew the curves from fewer points
    (lambda out: _lines(out / "visibility.csv", lambda lines: lines[:2] + lines[3:]),
     r"visibility\.csv: its rows are not one per level, lesion_type \(3 levels"),
    (lambda out: _lines(out / "sensitivity.csv", lambda lines: lines[:3]),
     r"sensitivity\.csv: its rows are not one per level, model, group \(3 levels in "
     r".*visibility\.csv\)"),
    (lambda out: (out / "sensitivity.csv").write_bytes(
        (out / "sensitivity.csv").read_bytes()[:200]),
     r"sensitivity\.csv: the lesion sensitivity table is cut short"),
    # shown as "–"
    (lambda out: _lines(out / "visibility.csv", lambda lines: [
        *lines[:2], ",".join(lines[2].split(",")[:7] + ["nan"] + lines[2].split(",")[8:]),
        *lines[3:]]), r"visibility\.csv: line 3: detectable must be a finite number"),
    (lambda out: (out / "crops.npz").write_bytes((out / "crops.npz").read_bytes()[:1000]),
     r"crops\.npz: unreadable lesion crops"),
])
def test_the_report_refuses_a_damaged_run_naming_the_file(synthetic, tmp_path, damage, match):
    from medrobust.io.image_store import open_image_store
    from medrobust.report.page import lesion_visibility_views

    _, raw, store = synthetic
    images = open_image_store(store)
    test = images.indices("test")
    # a model right on every image
    files = _evaluation(tmp_path, images.sample_ids[test], images.labels[test],
                        images.labels[test])
    out = tmp_path / "mammograms"
    lv.lesion_visibility_run(raw, store, out, [8, 2],
                             [{"model": "m", "severity": severity, "metrics": files["metrics"],
                               "predictions": files["predictions"]}
                              for severity in (None, 8, 2)],
                             {"k": 3.0, "ring_width": 3}, 0.95)
    assert lesion_visibility_views([out], 3.0, 0.95)[0][0]["dataset"] == "mammograms"
    damage(out)
    with pytest.raises(InputError, match=match):
        lesion_visibility_views([out], 3.0, 0.95)


def test_lesions_land_on_their_specks_in_a_cropped_flipped_non_square_store(synthetic, tmp_path):
    # screening-style preprocessing moves every image differently; the masks must follow
    root, raw, _ = synthetic
    store = build_image_store(raw / MANIFEST_NAME, tmp_path / "screening.zarr",
                              ImagePreprocessConfig([80, 48], breast_crop=True,
                                                    uniform_laterality=True))
    out = tmp_path / "visibility"
    lv.lesion_visibility_run(raw, store, out, [2], [], {"k": 3.0, "ring_width": 3}, 0.95)
    specks = pd.read_csv(out / lv.FILES["visibility"]).set_index(["lesion_type", "level"])
    assert specks.loc[("calcification", "clean"), "detectable"] > 0.8
    assert specks.loc[("mass", "clean"), "cnr_median"] > 1.0
    assert np.load(out / lv.FILES["crops"])["image_shape"].tolist() == [80, 48]


def _plan_config(perturbations):
    return {"datasets": {"mammo": {"kind": "images",
                                   "source": {"type": "synthetic", "modality": "mammography"}},
                         "chest": {"kind": "images", "source": {"type": "medmnist"}}},
            "image_classifiers": {"a": {"dataset": "mammo"}, "b": {"dataset": "mammo"},
                                  "c": {"dataset": "chest"}},
            "attacks": {"fgsm": {"epsilons": [4]}},
            "perturbations": perturbations,
            "robustness": {"targets": ["a", "c"], "transfer_sources": [], "white_box": True}}


def test_the_plan_covers_annotated_datasets_with_a_lowpass_sweep():
    config = _plan_config({"lowpass": {"severities": [8, 2]},
                           "gaussian_noise": {"severities": [0.1]}})
    plans = plan_lesion_visibility(config, plan_evaluations(config))
    assert list(plans) == ["mammo"]          # chest has no lesion table
    plan = plans["mammo"]
    assert plan["run"] == "results/lesion_visibility/mammo" and plan["radii"] == [8, 2]
    # model a only (b is not evaluated under lowpass): clean and each radius, no attack or noise
    assert [(r["model"], r["severity"]) for r in plan["evaluations"]] == [
        ("a", None), ("a", 8), ("a", 2)]
    assert plan["evaluations"][1]["predictions"].endswith("a/lowpass-severity8.csv")
    assert plan["evaluation_runs"] == ["results/evaluate/mammo/a"]
    without = _plan_config({"gaussian_noise": {"severities": [0.1]}})
    assert plan_lesion_visibility(without, plan_evaluations(without)) == {}
