"""Pixel denoisers: MagNet's reformer and detector, HGD's U-Net, their training, and the
denoiser -> classifier pipeline that evaluation and attacks use."""

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from medrobust.attacks.run import craft_attack_run
from medrobust.errors import ConfigError, InputError
from medrobust.evaluate.detector import (
    fit_detector, fit_thresholds, jensen_shannon, rejections)
from medrobust.evaluate.image_classifier import evaluate_image_classifier
from medrobust.io.image_store import open_image_store, write_image_store
from medrobust.models import build_model, load_model, save_model
from medrobust.models.image_classifiers import ImageClassifier
from medrobust.models.pipeline import DenoisedClassifier, load_pipeline
from medrobust.models.pixel_denoisers import Reformer, UNetDenoiser
from medrobust.models.registry import IMAGE_CLASSIFIERS, build_denoiser
from medrobust.train.denoiser import train_denoiser
from workflow_runner import ROOT, run_snakemake

CLASSES = ["a", "b"]
SIZE = 8
COMMON = {"dataset": "toy", "seed": 0, "epochs": 20, "batch_size": 8, "learning_rate": 0.01}
REFORMER = {"kind": "reformer", **COMMON, "noise_std": 0.2, "filters": 3, "pooling": "none"}
HGD = {"kind": "hgd", **COMMON, "epochs": 2, "batch_size": 16, "guide": "guide",
       "source": "source", "encoder_widths": [4, 8], "decoder_widths": [4],
       "epsilon_range": [1, 16], "ifgsm_steps": [2, 4], "clean_and_noise": True}
DETECTOR = {"false_positive_rate": 0.05, "temperatures": [10, 40], "reconstruction_norm": 1,
            "scope": "combined"}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_classifier(num_classes, in_channels, pretrained=False, normalization="imagenet"):
    """A two-conv classifier with the cut points of the real ones (last conv features)."""
    return ImageClassifier(
        nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(6, num_classes)),
        in_channels, low_channels=4, low_stride=1, normalization=normalization)


@pytest.fixture(autouse=True)
def tiny_arch(monkeypatch):
    monkeypatch.setitem(IMAGE_CLASSIFIERS, "tiny", tiny_classifier)


def smooth_images(n, seed=0, size=SIZE):
    """Planes a*y + b*x + c: an auto-encoder with 3x3 kernels can learn to smooth noise off them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    return np.stack([np.clip(a * yy + b * xx + c, 0, 1)[None]
                     for a, b, c in rng.uniform(-0.4, 0.4, (n, 3)) + [0, 0, 0.5]]
                    ).astype(np.float32)


def write_store(path, images, splits, **attrs):
    labels = (images.mean(axis=(1, 2, 3)) > 0.5).astype(np.int64)
    write_image_store(path, images, labels, splits, [f"s{i}" for i in range(len(images))],
                      {"dataset": "toy", "classes": CLASSES, "image_size": images.shape[-1],
                       "channels": 1, **attrs})
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    splits = ["train"] * 32 + ["val"] * 40 + ["test"] * 16
    return write_store(tmp_path_factory.mktemp("data") / "toy.zarr", smooth_images(88), splits)


def save_classifier(folder, seed=0, size=SIZE):
    torch.manual_seed(seed)
    config = {"family": "image", "arch": "tiny", "num_classes": 2, "in_channels": 1,
              "classes": CLASSES, "dataset": "toy", "image_size": [size, size]}
    save_model(build_model(config), folder, config, {})
    return folder


@pytest.fixture(scope="module")
def detector_store(tmp_path_factory):
    """More images of the same kind: enough validation images to resolve a rate of 10 %."""
    splits = ["val"] * 300 + ["test"] * 200
    return write_store(tmp_path_factory.mktemp("data") / "many.zarr", smooth_images(500, seed=2),
                       splits)


@pytest.fixture(scope="module")
def reformer_dir(store, tmp_path_factory):
    folder = tmp_path_factory.mktemp("denoisers") / "reformer"
    train_denoiser(store, folder, REFORMER)
    return folder


# --- the architectures ------------------------------------------------------------------


@pytest.mark.parametrize("pooling, convs", [("none", 3), ("average", 5), ("max", 5)])
@pytest.mark.parametrize("shape", [(8, 8), (9, 7)])
def test_reformer_is_magnets_sigmoid_auto_encoder(pooling, convs, shape):
    reformer = build_denoiser({**REFORMER, "pooling": pooling}).build(in_channels=3)
    assert isinstance(reformer, Reformer)
    layers = list(reformer.modules())
    assert [m.kernel_size for m in layers if isinstance(m, nn.Conv2d)] == [(3, 3)] * convs
    assert [m.out_channels for m in layers if isinstance(m, nn.Conv2d)] == [3] * (convs - 1) + [3]
    assert sum(isinstance(m, nn.Sigmoid) for m in layers) == convs
    images = torch.rand(2, 3, *shape)
    with torch.no_grad():
        out = reformer(images)
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize("shape", [(16, 16), (13, 11)])
def test_hgd_unet_predicts_a_residual_within_0_1(shape):
    unet = build_denoiser({**HGD, "encoder_widths": [4, 8, 8], "decoder_widths": [4, 6]}).build(1)
    assert isinstance(unet, UNetDenoiser)
    # conv3x3-BN-ReLU blocks: 2 at the top level, 3 below, in encoder and decoder
    assert [len(stage) for stage in unet.encoder] == [2, 3, 3]
    assert [len(stage) for stage in unet.decoder] == [2, 3]
    assert [stage[0][0].stride for stage in unet.encoder] == [(1, 1), (2, 2), (2, 2)]
    images = torch.rand(3, 1, *shape) * 1.4 - 0.2
    images = images.clamp(0, 1)
    unet.eval()
    with torch.no_grad():
        out = unet(images)
        assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
        unet.head.weight.zero_()
        unet.head.bias.zero_()
        assert torch.equal(unet(images), images)  # D(x) = x + r(x): no residual, no change


def test_hgd_reference_widths_build():
    unet = build_denoiser({**HGD, "encoder_widths": [64, 128, 256, 256, 256],
                           "decoder_widths": [64, 128, 256, 256]}).build(3)
    assert [stage[-1][0].out_channels for stage in unet.encoder] == [64, 128, 256, 256, 256]
    assert [stage[-1][0].out_channels for stage in unet.decoder] == [64, 128, 256, 256]
    assert unet.head.kernel_size == (1, 1) and unet.head.out_channels == 3


@pytest.mark.parametrize("settings, key", [
    ({**REFORMER, "pooling": "sum"}, "pooling"),
    ({**REFORMER, "noise_std": 0}, "noise_std"),
    ({**HGD, "decoder_widths": [4, 4]}, "decoder_widths"),
    ({**HGD, "epsilon_range": [8, 4]}, "epsilon_range"),
    ({**REFORMER, "detector": {**DETECTOR, "false_positive_rate": 1.5}}, "false_positive_rate"),
    ({**REFORMER, "detector": {**DETECTOR, "reconstruction_norm": 0.5}}, "reconstruction_norm"),
    ({**REFORMER, "detector": {**DETECTOR, "temperatures": [10, -1]}}, "temperatures"),
])
def test_bad_settings_are_refused_naming_the_key(settings, key):
    with pytest.raises(ConfigError, match=key):
        build_denoiser(settings)


def test_an_unknown_kind_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown denoiser kind 'reformr'; known: hgd, reformer"):
        build_denoiser({**REFORMER, "kind": "reformr"})


# --- training -----------------------------------------------------------------------------


def test_the_reformer_removes_noise_after_a_few_steps(store, reformer_dir):
    reformer = load_model(reformer_dir)
    untrained = build_denoiser(REFORMER).build(1).eval()
    clean = torch.from_numpy(smooth_images(64, seed=1))
    noisy = (clean + 0.2 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
             ).clamp(0, 1)
    with torch.no_grad():
        error = {"noisy": float(((noisy - clean) ** 2).mean()),
                 "untrained": float(((untrained(noisy) - clean) ** 2).mean()),
                 "trained": float(((reformer(noisy) - clean) ** 2).mean())}
    assert error["trained"] < 0.5 * error["noisy"] and error["untrained"] > error["noisy"], error
    history = json.loads((reformer_dir / "history.json").read_text())
    assert len(history["epochs"]) == 20 and history["selected_by"] == "val_loss"
    losses = [epoch["val_loss"] for epoch in history["epochs"]]
    assert history["best_epoch"] == 1 + losses.index(min(losses))
    config = json.loads((reformer_dir / "config.json").read_text())
    assert config["family"] == "denoiser" and config["kind"] == "reformer"
    assert config["in_channels"] == 1 and config["image_size"] == [SIZE, SIZE]
    assert config["settings"]["noise_std"] == 0.2 and config["settings"]["detector"] is None


def test_the_hgd_loss_is_the_l1_distance_of_the_guides_last_conv_features():
    spec = build_denoiser(HGD)
    guide = tiny_classifier(2, 1).eval().requires_grad_(False)
    denoiser = spec.build(1)
    inputs = torch.rand(4, 1, SIZE, SIZE)
    clean = torch.rand(4, 1, SIZE, SIZE).requires_grad_(True)
    loss, components = spec.loss(denoiser, inputs, clean, {"guide": guide}, None)
    expected = (guide.forward_features(denoiser(inputs))["last"]
                - guide.forward_features(clean)["last"]).abs().mean()
    assert torch.allclose(loss, expected) and components == {"feature_l1": loss}
    loss.backward()
    assert clean.grad is None  # the clean image's features are the fixed target
    assert all(p.grad is not None for p in denoiser.parameters())


def test_hgd_examples_are_fgsm_and_ifgsm_at_a_budget_drawn_per_image(store, tmp_path):
    spec = build_denoiser({**HGD, "epsilon_range": [2, 16]})
    source = load_model(save_classifier(tmp_path / "source"))
    images, labels = open_image_store(store).load("train")
    images, labels = torch.from_numpy(images), torch.from_numpy(labels)
    inputs, index = spec.training_examples(images, labels, {"source": source},
                                           torch.Generator().manual_seed(0), torch.device("cpu"))
    n = len(images)
    assert inputs.shape == (5 * n, 1, SIZE, SIZE)  # fgsm, ifgsm 2 and 4 steps, clean, noise
    assert torch.equal(index, torch.arange(n).repeat(5))
    delta = (inputs - images[index]).abs().flatten(1).amax(1) * 255
    fgsm, ifgsm2, ifgsm4, clean, noise = delta.split(n)
    assert delta.max() <= 16 + 1e-3 and torch.equal(clean, torch.zeros(n))
    # FGSM and noise step exactly their budget: integers from the range, not all the same
    for drawn in (fgsm, noise):
        assert torch.allclose(drawn, drawn.round(), atol=1e-3) and drawn.min() >= 2 - 1e-3
        assert len(drawn.round().unique()) > 3
    assert (ifgsm2 > 0).all() and (ifgsm4 > 0).all()


def test_hgd_trains_from_crafted_examples_and_saves_a_loadable_denoiser(store, tmp_path):
    models = {"guide": save_classifier(tmp_path / "guide"),
              "source": save_classifier(tmp_path / "source", seed=1)}
    history = train_denoiser(store, tmp_path / "hgd", HGD, models=models)
    assert isinstance(load_model(tmp_path / "hgd"), UNetDenoiser)
    assert history["recipe"]["training_inputs"] == 5 * 32
    assert history["recipe"]["validation_inputs"] == 5 * 40
    config = json.loads((tmp_path / "hgd/config.json").read_text())
    assert config["models"] == {"guide": "guide", "source": "source"}
    assert config["settings"]["encoder_widths"] == [4, 8]


def test_an_interrupted_training_resumes_to_the_same_weights(store, tmp_path, monkeypatch,
                                                             caplog):
    """Killed after its epochs, before saving: the rerun resumes from the checkpoint (the
    examples crafted again from the seed, the generators restored) to the same weights."""
    import medrobust.train.checkpoints as checkpoints  # saves the kept epoch for every trainer

    models = {"guide": save_classifier(tmp_path / "guide"),
              "source": save_classifier(tmp_path / "source", seed=1)}
    settings = {**HGD, "epochs": 3}
    train_denoiser(store, tmp_path / "whole", settings, models=models)
    save_model = checkpoints.save_model

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "save_model", killed)
    with pytest.raises(KeyboardInterrupt):
        train_denoiser(store, tmp_path / "resumed", settings, models=models)
    assert list((tmp_path / ".checkpoints/resumed").glob("*.pt"))
    monkeypatch.setattr(checkpoints, "save_model", save_model)
    with caplog.at_level("INFO", logger="medrobust.train.checkpoints"):
        train_denoiser(store, tmp_path / "resumed", settings, models=models)
    assert "resumed: resuming after epoch" in caplog.text
    whole = load_model(tmp_path / "whole").state_dict()
    resumed = load_model(tmp_path / "resumed").state_dict()
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)
    assert not (tmp_path / ".checkpoints/resumed").exists()


def test_hgd_learning_rate_drops_at_60_and_90_percent():
    spec = build_denoiser({**HGD, "epochs": 10, "learning_rate": 0.01})
    rates = [spec.learning_rate_at(epoch) for epoch in range(1, 11)]
    assert rates == pytest.approx([0.01] * 6 + [0.001] * 3 + [0.0001])


def test_hgd_refuses_a_classifier_of_other_classes(store, tmp_path):
    models = {"guide": save_classifier(tmp_path / "guide"),
              "source": save_classifier(tmp_path / "source")}
    config = json.loads((models["source"] / "config.json").read_text())
    (models["source"] / "config.json").write_text(json.dumps({**config, "classes": ["x", "y"]}))
    with pytest.raises(InputError, match=r"source/config.json: model classes \['x', 'y'\]"):
        train_denoiser(store, tmp_path / "hgd", HGD, models=models)


# --- the detector -------------------------------------------------------------------------


def test_jensen_shannon_divergence():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.9, 0.1]])
    q = torch.tensor([[0.0, 1.0], [0.5, 0.5], [0.2, 0.8]])
    divergence = jensen_shannon(p, q)
    assert divergence[0] == pytest.approx(math.log(2)) and divergence[1] == 0
    m = (p[2] + q[2]) / 2
    kl = lambda a, b: float((a * (a / b).log()).sum())  # noqa: E731
    assert divergence[2] == pytest.approx(0.5 * kl(p[2], m) + 0.5 * kl(q[2], m))
    assert torch.allclose(divergence, jensen_shannon(q, p))


@pytest.mark.parametrize("rate", [0.01, 0.005, 0.05])
def test_thresholds_reject_the_chosen_rate_of_validation_images(rate):
    rng = np.random.default_rng(0)
    scores = {name: rng.normal(size=2000) for name in ("a", "b", "c")}
    allowed = math.floor(rate * 2000)
    each = fit_thresholds(scores, rate, "each")
    for name, threshold in each.items():  # MagNet: every score rejects the rate on its own
        assert (scores[name] > threshold).sum() == allowed
    combined = fit_thresholds(scores, rate, "combined")
    rejected = rejections(scores, combined).sum()
    assert allowed - 2 <= rejected <= allowed  # all three together: at most the rate
    assert rejections(scores, each).sum() > allowed


def test_too_few_validation_images_reject_none():
    scores = {"a": np.arange(10.0)}
    assert rejections(scores, fit_thresholds(scores, 0.05, "combined")).sum() == 0


def test_the_fitted_detector_holds_its_rate_on_validation_images(detector_store, reformer_dir,
                                                                 tmp_path):
    model = load_pipeline(save_classifier(tmp_path / "classifier"), reformer_dir)
    detector, logits = fit_detector(model, {**DETECTOR, "false_positive_rate": 0.1},
                                    open_image_store(detector_store), torch.device("cpu"),
                                    batch_size=64)
    assert set(detector.thresholds) == {"reconstruction_error_p1", "jsd_T10", "jsd_T40"}
    assert detector.n_validation == 300 and 0.09 <= detector.validation_rejection_rate <= 0.1
    val_images, _ = open_image_store(detector_store).load("val")
    val_logits, rejected = detector.predict(model, torch.from_numpy(val_images))
    assert rejected.mean() == detector.validation_rejection_rate  # whole batch = batches
    # the fitting pass's logits are the pipeline's own prediction, in store order
    torch.testing.assert_close(logits, val_logits)


def test_evaluation_records_detection_and_clean_false_positive_rates(detector_store,
                                                                     reformer_dir, tmp_path):
    store = detector_store
    classifier = save_classifier(tmp_path / "target")
    test_images, _ = open_image_store(store).load("test")
    noisy = (test_images + np.random.default_rng(0).normal(0, 0.3, test_images.shape)).clip(0, 1)
    noisy_store = write_store(tmp_path / "noisy.zarr", noisy.astype(np.float32),
                              ["test"] * len(noisy), perturbation="gaussian_noise",
                              severity=0.3)
    records = evaluate_image_classifier(
        classifier, {"clean": store, "noise": noisy_store}, store, tmp_path / "run",
        denoiser_dir=reformer_dir, detector={**DETECTOR, "false_positive_rate": 0.1})
    # on clean test images, the false positives: about the 10 % allowed on validation images
    assert 0.03 <= records["clean"]["detection_rate"] <= 0.2
    assert records["noise"]["detection_rate"] > 0.9  # heavy noise: the reformer cannot rebuild it
    table = pd.read_csv(tmp_path / "run/noise.csv")
    assert list(table.columns[:5]) == ["sample_id", "label", "prediction", "correct", "rejected"]
    detector = json.loads((tmp_path / "run/detector.json").read_text())
    assert detector["n_validation"] == 300 and detector["validation_false_positive_rate"] <= 0.1
    assert detector["settings"]["scope"] == "combined"


def test_the_detector_needs_a_reformer(store, tmp_path):
    with pytest.raises(InputError, match="reformer"):
        evaluate_image_classifier(save_classifier(tmp_path / "target"), {"clean": store},
                                  store, tmp_path / "run", detector=DETECTOR)
    assert not (tmp_path / "run").exists()


# --- denoiser -> classifier ---------------------------------------------------------------


def test_the_pipeline_is_the_classifier_behind_the_denoiser(reformer_dir, tmp_path):
    classifier_dir = save_classifier(tmp_path / "target")
    alone = load_pipeline(classifier_dir)
    assert isinstance(alone, ImageClassifier)
    pipeline = load_pipeline(classifier_dir, reformer_dir)
    assert isinstance(pipeline, DenoisedClassifier) and not pipeline.training
    images = torch.rand(3, 1, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(pipeline(images), alone(load_model(reformer_dir)(images)))


def test_a_denoiser_of_another_image_size_is_refused(reformer_dir, tmp_path):
    classifier_dir = save_classifier(tmp_path / "target", size=16)
    with pytest.raises(InputError, match=r"reformer/config.json: the denoiser's image_size "
                                         r"\[8, 8\] differs from \[16, 16\] in .*target/config"):
        load_pipeline(classifier_dir, reformer_dir)


def test_white_box_attacks_differentiate_through_the_denoiser(store, reformer_dir, tmp_path):
    """A reformer that outputs a constant hides every gradient: FGSM through it changes nothing."""
    classifier_dir = save_classifier(tmp_path / "target")
    flat = tmp_path / "flat"
    reformer = load_model(reformer_dir)
    with torch.no_grad():
        last = reformer.decoder[-2]
        last.weight.zero_()
        last.bias.zero_()
    save_model(reformer, flat, json.loads((reformer_dir / "config.json").read_text()), {})
    clean, _ = open_image_store(store).load("test")
    for denoiser, changed in ((None, True), (flat, False)):
        out = tmp_path / f"fgsm-{changed}"
        craft_attack_run(classifier_dir, store, out, {"fgsm": {"epsilons": [8]}},
                         denoiser_dir=denoiser)
        adversarial = open_image_store(out / "fgsm-eps8.zarr").images[:]
        assert bool(np.abs(adversarial - clean).max() > 7 / 255) is changed


# --- the workflow -------------------------------------------------------------------------


def dry_run_jobs(output: str) -> dict[str, dict[str, str]]:
    """The jobs of a `snakemake -n` listing by their first output: rule and input line."""
    jobs = {}
    for block in re.split(r"^rule ", output, flags=re.MULTILINE)[1:]:
        fields = dict(re.findall(r"^    (\w+): (.*)$", block, flags=re.MULTILINE))
        if "output" in fields:
            jobs[fields["output"].split(", ")[0]] = {
                "rule": block.split(":", 1)[0], "input": fields.get("input", "").split(", ")}
    return jobs


def test_dry_run_trains_both_denoisers_and_puts_them_before_their_classifiers(tmp_path):
    """Table 4's combinations as config lines (tests/configs/dry_run/denoisers.yaml)."""
    result = run_snakemake(tmp_path, ROOT / "tests/configs/dry_run/denoisers.yaml", "--dry-run",
                           "--cores", "1", timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    jobs = dry_run_jobs(output)
    reformer = "results/denoisers/mammograms/R/model.safetensors"
    hgd = "results/denoisers/mammograms/HGD/model.safetensors"
    assert jobs[reformer] == {"rule": "train_denoiser",
                              "input": ["results/preprocessed/mammograms.zarr"]}
    # HGD trains on examples crafted on the source, guided by the baseline's features
    assert jobs[hgd]["rule"] == "train_denoiser"
    assert set(jobs[hgd]["input"]) == {"results/preprocessed/mammograms.zarr",
                                       "results/models/mammograms/baseline/model.safetensors",
                                       "results/models/mammograms/surrogate/model.safetensors"}
    for model, denoiser in (("R", reformer), ("R_Ln_La", reformer), ("HGD_Ln_La", hgd)):
        # evaluated behind its denoiser, and white-box attacked through it
        assert denoiser in jobs[f"results/evaluate/mammograms/{model}"]["input"]
        assert denoiser in jobs[f"results/attacks/mammograms/from_{model}"]["input"]
    # the baseline and the surrogate (black-box attacks are crafted on it alone) have none
    for job in ("results/evaluate/mammograms/baseline",
                "results/attacks/mammograms/from_surrogate"):
        assert not any("denoisers" in path for path in jobs[job]["input"])
    # a classifier is trained as without its denoiser: the denoiser is no input of its training
    assert jobs["results/models/mammograms/R_Ln/model.safetensors"]["input"] == [
        "results/preprocessed/mammograms.zarr"]
    assert not (tmp_path / "results").exists()
