"""ABMIL, slide-classifier training and evaluation on tiny synthetic feature stores
(TransMIL: tests/test_transmil.py, MHIM-MIL: tests/test_mhim.py)."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from medrobust.errors import ConfigError, InputError
from medrobust.evaluate.slide_classifier import evaluate_slide_classifier
from medrobust.io.atomic import atomic_path
from medrobust.io.slide_stores import write_feature_store
from medrobust.models.mil import ABMIL, ABMILOptions, Pooled
from medrobust.models.registry import build_model, load_model, save_model
from medrobust.train.slide_classifier import train_slide_classifier

CLASSES = ["normal", "tumor"]
PROVENANCE = {"backbone": "resnet18", "weights": "random", "weights_sha256": "ab" * 32}


def _model(in_dim=8, num_classes=3):
    torch.manual_seed(0)
    return ABMIL(in_dim, num_classes, ABMILOptions(hidden_dim=16, attention_dim=8)).eval()


def test_attention_is_a_distribution_over_the_bag():
    with torch.no_grad():
        logits, weights = _model()(torch.randn(7, 8))
    assert logits.shape == (3,)
    assert weights.shape == (7,)
    assert (weights >= 0).all()
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6)


def test_bag_logits_do_not_depend_on_instance_order():
    model, bag = _model(), torch.randn(9, 8)
    order = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    logits, weights = model(bag)
    shuffled_logits, shuffled_weights = model(bag[order])
    torch.testing.assert_close(shuffled_logits, logits)
    torch.testing.assert_close(shuffled_weights, weights[order])


def test_stages_compose_to_forward():
    """The parts a wrapper such as MHIM-MIL uses give the same bag logits."""
    model, bag = _model(), torch.randn(5, 8)
    embeddings = model.embed_instances(bag)
    pooled = model.aggregate(embeddings)
    weights = torch.softmax(model.attention_scores(embeddings), dim=0)
    assert embeddings.shape == (5, 16) and pooled.feature.shape == (16,)
    torch.testing.assert_close(pooled.attention, weights)
    torch.testing.assert_close(pooled.feature, weights @ embeddings)
    torch.testing.assert_close(model.classify(pooled.feature), model(bag)[0])
    assert model.classify(embeddings).shape == (5, 3)  # per-instance logits


@pytest.mark.parametrize("gated", [False, True])
def test_attention_is_plain_relu_or_tanh_sigmoid_gated(gated):
    """Plain: w^T relu(V h); gated: w^T (tanh(V h) * sigmoid(U h)), none with biases."""
    torch.manual_seed(0)
    model = ABMIL(8, 2, ABMILOptions(hidden_dim=6, attention_dim=4), gated=gated).eval()
    h = torch.randn(5, 6)
    v, w = model.attention_v[0].weight, model.attention_w.weight
    if gated:
        u = model.attention_u[0].weight
        expected = (torch.tanh(h @ v.T) * torch.sigmoid(h @ u.T)) @ w.T
    else:
        assert model.attention_u is None
        expected = torch.relu(h @ v.T) @ w.T
    torch.testing.assert_close(model.attention_scores(h), expected.squeeze(1))
    assert all(layer.bias is None for layer in model.modules()
               if isinstance(layer, torch.nn.Linear) and layer not in (model.front[0],
                                                                       model.predictor))


def test_front_and_predictor_are_the_references():
    model = build_model({"family": "slide", "arch": "gated_abmil", "feature_dim": 1024,
                         "num_classes": 2})
    assert model.gated and model.options == ABMILOptions(hidden_dim=512, attention_dim=128,
                                                         dropout=0.25)
    linear, relu, dropout = model.front
    assert (linear.in_features, linear.out_features) == (1024, 512)
    assert isinstance(relu, torch.nn.ReLU) and dropout.p == 0.25
    assert (model.predictor.in_features, model.predictor.out_features) == (512, 2)


def test_instance_probability_is_class_aware():
    """p_i = max_c softmax_c(W (a_i h_i) + b[0]), the reference's pseudo score: b[0] is
    added to every class, so the softmax cancels it."""
    model, bag = _model(), torch.randn(6, 8)
    with torch.no_grad():
        model.predictor.bias.copy_(torch.tensor([2.0, -1.0, 0.5]))
    embeddings = model.embed_instances(bag)
    pooled = model.aggregate(embeddings)
    contributions = pooled.attention[:, None] * embeddings
    logits = contributions @ model.predictor.weight.T + model.predictor.bias[0]
    torch.testing.assert_close(model.instance_probability(embeddings, pooled),
                               torch.softmax(logits, dim=1).max(dim=1).values)


def test_evidence_against_the_bias_favoured_class_outranks_no_evidence():
    """A large bias towards class 0 must not rank an instance that points to class 1
    below an instance that points nowhere (with the bias added it would: 0.88 < 0.95)."""
    model = ABMIL(2, 2, ABMILOptions(hidden_dim=2, attention_dim=2)).eval()
    with torch.no_grad():
        model.predictor.weight.copy_(torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
        model.predictor.bias.copy_(torch.tensor([3.0, 0.0]))
    embeddings = torch.tensor([[0.0, 2.0], [0.0, 0.0]])  # to class 1; nothing
    pooled = Pooled(torch.zeros(2), torch.tensor([0.5, 0.5]))
    towards_class_1, neutral = model.instance_probability(embeddings, pooled).tolist()
    assert towards_class_1 > neutral


@pytest.mark.parametrize("arch", ["abmil", "gated_abmil", "transmil"])
@pytest.mark.parametrize("n", [1, 1000])
def test_every_architecture_takes_bags_of_one_and_of_a_thousand(arch, n):
    torch.manual_seed(0)
    options = {"hidden_dim": 16, **({"heads": 2, "head_dim": 8} if arch == "transmil" else {})}
    model = build_model({"family": "slide", "arch": arch, "feature_dim": 8, "num_classes": 3,
                         "arch_options": options}).eval()
    with torch.no_grad():
        logits, attention = model(torch.randn(n, 8))
    assert logits.shape == (3,) and attention.shape == (n,)
    assert torch.isfinite(logits).all() and torch.isfinite(attention).all()


def test_empty_or_misshapen_bags_are_clear_errors():
    with pytest.raises(InputError, match="empty bag"):
        _model()(torch.zeros(0, 8))
    with pytest.raises(InputError, match=r"\(n, 8\)"):
        _model()(torch.zeros(4, 5))


def test_registered_builder_reads_the_resolved_config():
    config = {"family": "slide", "arch": "abmil", "feature_dim": 8, "num_classes": 2,
              "arch_options": {"hidden_dim": 12}}
    model = build_model(config)
    assert isinstance(model, ABMIL)
    assert model.options == ABMILOptions(hidden_dim=12)
    assert model(torch.randn(3, 8))[0].shape == (2,)
    with pytest.raises(ConfigError, match="hiden_dim"):
        build_model({**config, "arch_options": {"hiden_dim": 12}})


def _feature_store(path, slide_id, label, split, features):
    features = np.asarray(features, dtype=np.float32)
    attrs = {"slide_id": slide_id, "label": label, "split": split, **PROVENANCE}
    with atomic_path(path) as tmp:
        write_feature_store(tmp, features, np.zeros((len(features), 2), np.int64), attrs)
    return path


def _synthetic_slides(folder, counts={"train": 12, "val": 4, "test": 4}, dim=8):
    """Negative bags: noise instances; positive bags: the same plus 2 instances of a key pattern."""
    rng = np.random.default_rng(0)
    key = np.zeros(dim)
    key[0] = 4.0
    paths = []
    for split, count in counts.items():
        for index in range(count):
            tumor = index % 2 == 1
            bag = rng.normal(0, 1, (int(rng.integers(6, 12)), dim))
            if tumor:
                bag[:2] = key + rng.normal(0, 0.3, (2, dim))
            paths.append(_feature_store(folder / f"{split}{index}.zarr", f"{split}{index}",
                                        CLASSES[tumor], split, bag))
    return paths


def _train(feature_paths, model_dir, fold_arguments=None, **overrides):
    config = {"dataset": "slides", "arch": "abmil", "seed": 0, "epochs": 12,
              "learning_rate": 0.01, "weight_decay": 1e-4, "classes": CLASSES,
              "arch_options": {"hidden_dim": 16, "attention_dim": 8}, **overrides}
    return train_slide_classifier(feature_paths, model_dir, config, device="cpu",
                                  **(fold_arguments or {}))


def test_training_learns_key_instances_and_is_reproducible(tmp_path):
    paths = _synthetic_slides(tmp_path / "features")
    paths.append(_feature_store(tmp_path / "features/blank.zarr", "blank", "normal", "train",
                                np.zeros((0, 8))))  # a slide without tissue is left out
    history = _train(paths, tmp_path / "model")
    assert len(history["epochs"]) == 12 and history["selected_by"] == "val_auc"
    best = history["epochs"][history["best_epoch"] - 1]
    assert best["val_auc"] == 1.0
    tied = [epoch for epoch in history["epochs"] if epoch["val_auc"] == 1.0]
    assert best == min(tied, key=lambda epoch: epoch["val_loss"])  # ties: lower val loss
    assert len(tied) > 1
    assert best["train_loss"] < history["epochs"][0]["train_loss"]

    config = json.loads((tmp_path / "model/config.json").read_text())
    assert {key: config[key] for key in ("family", "arch", "num_classes", "classes",
                                         "feature_dim", "backbone")} == \
        {"family": "slide", "arch": "abmil", "num_classes": 2, "classes": CLASSES,
         "feature_dim": 8, "backbone": "resnet18"}
    assert config["arch_options"] == {"hidden_dim": 16, "attention_dim": 8, "dropout": 0.25}

    metrics = evaluate_slide_classifier(tmp_path / "model", paths, tmp_path / "evaluation")
    assert (metrics["n"], metrics["accuracy"], metrics["auc"]) == (4, 1.0, 1.0)

    _train(paths, tmp_path / "again")
    first, second = (load_file(tmp_path / name / "model.safetensors") for name in ("model", "again"))
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_training_rejects_unknown_keys_and_labels(tmp_path):
    paths = _synthetic_slides(tmp_path / "features", counts={"train": 2})
    with pytest.raises(ConfigError, match="epoch"):
        _train(paths, tmp_path / "model", epoch=3)
    with pytest.raises(InputError, match="'tumor' is not one of"):
        _train(paths, tmp_path / "model", classes=["normal", "cancer"])


def _hand_model(model_dir):
    """An ABMIL whose bag logits are the mean of relu(features): 2 features, 2 classes."""
    model = ABMIL(2, 2, ABMILOptions(hidden_dim=2, attention_dim=1))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()  # attention scores all 0: uniform weights
        model.front[0].weight.copy_(torch.eye(2))
        model.predictor.weight.copy_(torch.eye(2))
    config = {"family": "slide", "arch": "abmil", "num_classes": 2, "classes": CLASSES,
              "feature_dim": 2, "backbone": "resnet18", "backbone_weights": "random",
              "backbone_weights_sha256": PROVENANCE["weights_sha256"], "dataset": "slides",
              "arch_options": {"hidden_dim": 2, "attention_dim": 1, "dropout": 0.0}}
    save_model(model, model_dir, config, history={})


def test_evaluation_matches_a_hand_computation(tmp_path):
    _hand_model(tmp_path / "hand")
    slides = [  # id, label, split, features -> P(tumor) = sigmoid(mean[1] - mean[0])
        ("s1", "normal", "test", [[2, 0], [0, 0]]),   # sigmoid(-1), right
        ("s2", "tumor", "test", [[0, 3]]),            # sigmoid(3), right
        ("s3", "tumor", "test", [[1, 0]]),            # sigmoid(-1), wrong
        ("s4", "normal", "test", [[0, 1], [0, 1]]),   # sigmoid(1), wrong
        ("s5", "tumor", "train", [[0, 9]]),           # other split: not evaluated
        ("s6", "tumor", "test", np.zeros((0, 2))),    # no tiles: left out
        ("v1", "normal", "val", [[0, 2]]),            # val: sigmoid(2), the operating point's
        ("v2", "tumor", "val", [[0, 4]]),             # sigmoid(4)
    ]
    paths = [_feature_store(tmp_path / f"{slide}.zarr", slide, label, split, features)
             for slide, label, split, features in slides]
    metrics = evaluate_slide_classifier(tmp_path / "hand", paths, tmp_path / "out")

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    table = pd.read_csv(tmp_path / "out/clean.csv")
    assert list(table.columns) == ["sample_id", "label", "prediction", "correct",
                                   "prob_normal", "prob_tumor"]
    assert table["sample_id"].tolist() == ["s1", "s2", "s3", "s4"]
    assert table["label"].tolist() == [0, 1, 1, 0]
    assert table["prediction"].tolist() == [0, 1, 0, 1]
    np.testing.assert_allclose(table["prob_tumor"], [sigmoid(-1), sigmoid(3), sigmoid(-1),
                                                     sigmoid(1)], rtol=1e-6)
    # AUC by pair counting: tumor probs {s2, s3} against normal {s1, s4}: 1 + 1 + 0.5 + 0
    expected = {"family": "slide", "model": "hand", "dataset": "slides", "condition": "clean",
                "kind": "clean",
                "attack": None, "perturbation": None, "epsilon": None, "norm": None, "severity": None,
                "source_model": None, "white_box": None, "detection_rate": None, "n": 4,
                "accuracy": 0.5, "auc": 0.625}
    assert json.loads((tmp_path / "out/clean.json").read_text()) == expected
    assert metrics == expected
    # chosen on the val slides, midway between their scores; the test slides' own best
    # threshold would lie between sigmoid(-1) and sigmoid(1)
    point = json.loads((tmp_path / "out/operating_point.json").read_text())
    assert point["threshold"] == pytest.approx((sigmoid(2) + sigmoid(4)) / 2, rel=1e-6)
    assert (point["chosen_on"], point["n"], point["n_positive"]) == ("val", 2, 1)


def test_evaluation_refuses_features_from_other_weights(tmp_path):
    _hand_model(tmp_path / "hand")
    path = _feature_store(tmp_path / "s1.zarr", "s1", "normal", "test", [[1, 0]])
    with atomic_path(path) as tmp:  # same slide, embedded with other weights
        write_feature_store(tmp, np.ones((1, 2)), np.zeros((1, 2)),
                            {"slide_id": "s1", "label": "normal", "split": "test",
                             **PROVENANCE, "weights_sha256": "cd" * 32})
    with pytest.raises(InputError, match="trained on resnet18 features"):
        evaluate_slide_classifier(tmp_path / "hand", [path], tmp_path / "c")
    assert not (tmp_path / "c").exists()
    assert isinstance(load_model(tmp_path / "hand"), ABMIL)


def test_training_never_reads_the_test_split(tmp_path):
    paths = _synthetic_slides(tmp_path / "features")
    history = _train(paths, tmp_path / "model", epochs=3)
    for path in paths:  # other test slides: the same weights
        if "test" in path.name:
            _feature_store(path, path.stem, "tumor", "test", np.full((5, 8), 9.0))
    again = _train(paths, tmp_path / "again", epochs=3)
    first, second = (load_file(tmp_path / name / "model.safetensors") for name in ("model", "again"))
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert history["epochs"] == again["epochs"] and history["recipe"]["schedule"] == "cosine"


def test_training_stops_after_patience_epochs_without_a_better_validation_auc(tmp_path):
    paths = _synthetic_slides(tmp_path / "features")
    history = _train(paths, tmp_path / "model", epochs=30, patience=2)
    aucs = [epoch["val_auc"] for epoch in history["epochs"]]
    best = history["best_epoch"]
    assert len(aucs) == best + 2 < 30  # stopped two epochs after the kept one
    assert all(auc <= aucs[best - 1] for auc in aucs)


def test_mhim_trains_a_student_from_a_teacher_model(tmp_path):
    paths = _synthetic_slides(tmp_path / "features")
    _train(paths, tmp_path / "base", epochs=4)
    mhim = {"teacher": "base", "mask_ratio_h": 0.2, "mask_ratio": 0.1, "merge_ratio": 0.5,
            "merge_k": 2}
    history = train_slide_classifier(
        paths, tmp_path / "mhim",
        {"dataset": "slides", "arch": "abmil", "seed": 0, "epochs": 3, "learning_rate": 0.01,
         "classes": CLASSES, "arch_options": {"hidden_dim": 16, "attention_dim": 8},
         "mhim": mhim}, teacher_dir=tmp_path / "base")
    first = history["epochs"][0]
    assert 0.2 < first["train_masked_fraction"] < 0.5 and first["train_consistency"] > 0
    config = json.loads((tmp_path / "mhim/config.json").read_text())
    assert config["arch"] == "abmil" and config["training"]["mhim"]["teacher"] == "base"
    # the saved model is the student alone, loadable as any slide classifier
    assert isinstance(load_model(tmp_path / "mhim"), ABMIL)
    with pytest.raises(InputError, match="teacher's arch_options"):
        train_slide_classifier(
            paths, tmp_path / "bad",
            {"dataset": "slides", "arch": "abmil", "classes": CLASSES, "epochs": 1,
             "arch_options": {"hidden_dim": 12}, "mhim": mhim}, teacher_dir=tmp_path / "base")
