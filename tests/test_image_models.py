"""Image classifiers, the denoising defense, and saving/loading models."""

import json
import os
import re

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

from medrobust.errors import ConfigError, InputError, MedrobustError
from medrobust.models import build_model, load_model, save_model
from medrobust.models.denoising import DenoisingClassifier, DenoisingDefense
from medrobust.models.image_classifiers import adapt_first_conv, resnet18
from medrobust.models.registry import build_defense

DENOISING = {"name": "denoising", "lambda_n": 0.1, "lambda_a": 1.0, "noise_sigma": 0.05}


pytestmark = pytest.mark.usefixtures("one_thread")


def image_config(**overrides):
    return {"family": "image", "arch": "resnet18", "num_classes": 3, "in_channels": 1,
            **overrides}


@pytest.mark.parametrize("arch, last_shape", [("resnet18", (512, 1, 1)), ("vgg16", (512, 2, 2))])
@pytest.mark.parametrize("channels", [1, 3])
def test_classifier_shapes(arch, last_shape, channels):
    model = build_model(image_config(arch=arch, in_channels=channels)).eval()
    images = torch.rand(2, channels, 32, 32)
    with torch.no_grad():
        features = model.forward_features(images)
        logits = model(images)
    assert logits.shape == (2, 3)
    assert features["low"].shape == (2, model.low_channels, 32 // model.low_stride,
                                     32 // model.low_stride)
    assert features["last"].shape == (2, *last_shape)


def test_normalisation_is_inside_the_model():
    model = resnet18(num_classes=2, in_channels=1).eval()
    seen = []
    model.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    images = torch.rand(2, 1, 32, 32)
    model(images)
    grey_mean, grey_std = (0.485 + 0.456 + 0.406) / 3, (0.229 + 0.224 + 0.225) / 3
    torch.testing.assert_close(seen[0], (images - grey_mean) / grey_std)
    # the statistics travel with the weights
    assert {"mean", "std"} <= set(model.state_dict())


def test_adapted_first_conv_sees_grey_as_rgb_did():
    rgb = nn.Conv2d(3, 8, 3, padding=1, bias=True)
    grey = adapt_first_conv(rgb, 1)
    images = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(grey(images), rgb(images.expand(-1, 3, -1, -1)))
    assert adapt_first_conv(rgb, 3) is rgb


@pytest.mark.parametrize("defense", [None, DENOISING])
def test_save_load_round_trip_gives_identical_logits(tmp_path, defense):
    config = image_config(defense=defense, classes=["a", "b", "c"])
    model = build_model(config)
    model.train()  # move the BatchNorm running statistics away from their defaults
    model(torch.rand(4, 1, 32, 32))
    model.eval()
    images = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        expected = model(images)
    save_model(model, tmp_path / "m", config, {"epochs": []})

    loaded = load_model(tmp_path / "m")
    assert not loaded.training
    assert isinstance(loaded, DenoisingClassifier) == (defense is not None)
    with torch.no_grad():
        assert torch.equal(loaded(images), expected)
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == config
    assert json.loads((tmp_path / "m" / "history.json").read_text()) == {"epochs": []}


def test_load_model_names_missing_and_mismatched_files(tmp_path):
    with pytest.raises(InputError, match="config.json"):
        load_model(tmp_path)
    config = image_config()
    save_model(build_model(config), tmp_path, config, {})
    (tmp_path / "config.json").write_text(json.dumps(image_config(in_channels=3)))
    with pytest.raises(InputError, match="model.safetensors"):
        load_model(tmp_path)
    # a config saved wrong or edited by hand names the file, whatever it lacks
    for broken, problem in (({**config, "in_channels": "one"}, "invalid literal"),
                            ({key: value for key, value in config.items()
                              if key != "num_classes"}, "lacks 'num_classes'"),
                            ([1, 2], "must hold one object")):
        (tmp_path / "config.json").write_text(json.dumps(broken))
        with pytest.raises(InputError, match=f"config.json: .*{problem}"):
            load_model(tmp_path)


def test_weights_with_non_finite_values_are_refused_naming_the_file(tmp_path):
    config = image_config()
    model = build_model(config)
    save_model(model, tmp_path / "m", config, {})
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(weights)
    state["head.fc.weight"][0, :3] = float("nan")
    state["head.fc.bias"][1] = float("inf")
    save_file(state, weights)
    with pytest.raises(InputError) as error:
        load_model(tmp_path / "m")
    message = str(error.value)
    assert message.startswith(f"{weights}: the weights hold NaN or infinite values")
    assert "head.fc.weight: 3 values" in message and "head.fc.bias: 1 value" in message
    assert f"delete {tmp_path / 'm'} and retrain it" in message

    with torch.no_grad():
        model.head.fc.weight[0, 0] = float("nan")
    with pytest.raises(MedrobustError, match="training diverged.*nothing was saved"):
        save_model(model, tmp_path / "diverged", config, {})
    assert not (tmp_path / "diverged").exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_saved_model_files_follow_the_umask(tmp_path, umask, mode):
    """Not owner-only (safetensors' 0600): a team on a shared cluster reads the weights."""
    previous = os.umask(umask)
    try:
        save_model(build_model(image_config()), tmp_path / "m", image_config(), {})
    finally:
        os.umask(previous)
    for name in ("model.safetensors", "config.json", "history.json"):
        assert (tmp_path / "m" / name).stat().st_mode & 0o777 == mode, name


def test_unknown_names_raise_config_error_listing_known_ones():
    with pytest.raises(ConfigError, match="resnet18, resnet22, vgg16"):
        build_model(image_config(arch="alexnet"))
    with pytest.raises(ConfigError, match="family"):
        build_model(image_config(family="video"))
    with pytest.raises(ConfigError, match="denoising, none"):
        build_defense({"name": "magic"})
    with pytest.raises(ConfigError, match="lambda_x"):
        build_defense({**DENOISING, "lambda_x": 1})
    with pytest.raises(ConfigError, match="noise_sigma"):
        build_defense({"name": "denoising", "lambda_n": 0.1, "lambda_a": 1.0})
    with pytest.raises(ConfigError, match="distance must be one of l2, mse, not 'l1'"):
        build_defense({**DENOISING, "distance": "l1"})


# --- pretrained weights from a local file ---------------------------------------------

@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    """A torchvision ResNet18 state dict (random, seeded: no internet here), as a file."""
    torch.manual_seed(7)
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18-local.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("channels", [1, 3])
def test_pretrained_weights_come_from_a_local_file(imagenet_like, tmp_path, suffix, channels):
    path, state = imagenet_like
    if suffix == ".safetensors":
        path = tmp_path / "resnet18-local.safetensors"
        save_file({key: value.contiguous() for key, value in state.items()}, path)
    model = build_model(image_config(pretrained=str(path), in_channels=channels))
    weights = model.state_dict()
    assert torch.equal(weights["body.layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])
    assert torch.equal(weights["encoder.bn1.running_var"], state["bn1.running_var"])
    # grey inputs: the RGB kernels averaged and spread (adapt_first_conv)
    expected_conv1 = state["conv1.weight"] if channels == 3 else \
        state["conv1.weight"].mean(dim=1, keepdim=True) * 3
    torch.testing.assert_close(weights["encoder.conv1.weight"], expected_conv1)
    assert weights["head.fc.weight"].shape == (3, 512)  # a new head for the 3 classes


def test_a_saved_model_rebuilds_without_its_pretrained_file(imagenet_like, tmp_path):
    path, _ = imagenet_like
    copy = tmp_path / "weights.pth"
    copy.write_bytes(path.read_bytes())
    config = image_config(pretrained=str(copy))
    save_model(build_model(config), tmp_path / "m", config, {})
    copy.unlink()
    load_model(tmp_path / "m")


def _misfits(state):
    truncated = {key: value for key, value in state.items() if not key.startswith("layer4.")}
    return {
        "truncated": (truncated, r"do not fit torchvision's resnet18 \(missing: "
                                 r"layer4\.0\.conv1\.weight, .* and \d+ more\)"),
        "prefixed": ({f"module.{key}": value for key, value in state.items()},
                     r"missing: conv1\.weight, .*; unexpected: module\.conv1\.weight"),
        "other head": ({**state, "fc.weight": torch.zeros(2, 512), "fc.bias": torch.zeros(2)},
                       r"of another shape: fc\.weight \(2, 512\) for \(1000, 512\), "
                       r"fc\.bias \(2,\) for \(1000,\)\)"),
        "a checkpoint": ({"epoch": 3, "state_dict": state}, "not a state dict"),
        "NaN": ({**state, "fc.bias": torch.full((1000,), float("nan"))},
                r"NaN or infinite values \(fc\.bias: 1000 values\)"),
    }


@pytest.mark.parametrize("case", ["truncated", "prefixed", "other head", "a checkpoint", "NaN",
                                  "not weights"])
def test_a_weights_file_that_does_not_fit_is_refused_naming_it(imagenet_like, tmp_path, case):
    path = tmp_path / "weights.pth"
    if case == "not weights":
        path.write_text("<html>a login page</html>")
        message = "not a readable weights file"
    else:
        content, message = _misfits(imagenet_like[1])[case]
        torch.save(content, path)
    with pytest.raises(InputError, match=f"^{re.escape(str(path))}: .*{message}"):
        build_model(image_config(pretrained=str(path)))


def denoising_losses(sigma, size=32, distance="l2"):
    model = DenoisingClassifier(resnet18(num_classes=2, in_channels=1)).train()
    defense = DenoisingDefense(lambda_n=0.1, lambda_a=1.0, noise_sigma=sigma, distance=distance)
    images, labels = torch.rand(4, 1, size, size), torch.tensor([0, 1, 0, 1])
    total, parts = defense.loss(model, images, labels, torch.Generator().manual_seed(0))
    return model, total, parts


def test_l2_distance_is_the_per_image_norm_averaged_over_the_batch():
    a = torch.zeros(2, 2, 1, 2)
    b = torch.tensor([[[[3.0, 4.0]], [[0.0, 0.0]]],     # image 0: |(3, 4, 0, 0)| = 5
                      [[[1.0, 2.0]], [[2.0, 0.0]]]])    # image 1: |(1, 2, 2, 0)| = 3
    l2 = DenoisingDefense(lambda_n=1, lambda_a=1, noise_sigma=0.1)
    mse = DenoisingDefense(lambda_n=1, lambda_a=1, noise_sigma=0.1, distance="mse")
    assert l2.distance == "l2"  # the paper's is the default
    assert l2.distance_between(a, b) == pytest.approx(4.0)
    assert mse.distance_between(a, b) == pytest.approx((9 + 16 + 1 + 4 + 4) / 8)


@pytest.mark.parametrize("distance", ["l2", "mse"])
def test_ln_and_la_are_the_papers_equations_under_l2(distance):
    """Ln and La recomputed by hand from one pass over the same clean and noisy images."""
    model = DenoisingClassifier(resnet18(num_classes=2, in_channels=1)).train()
    defense = DenoisingDefense(lambda_n=1, lambda_a=1, noise_sigma=0.05, distance=distance)
    images, labels = torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 0, 1])
    _, parts = defense.loss(model, images, labels, torch.Generator().manual_seed(0))
    uniform = torch.rand(images.shape, generator=torch.Generator().manual_seed(0))
    noisy = (images + (2 * uniform - 1) * 0.05).clamp(0, 1)
    with torch.no_grad():
        out = model.forward_train(torch.cat([images, noisy]))
    last, rebuilt = out["last"].flatten(1), out["reconstruction"].flatten(1)
    pixels = images.flatten(1)
    if distance == "l2":  # eq. (1) and (2): norms per image, mean over the batch
        ln = (last[4:] - last[:4]).norm(dim=1).mean()
        la = ((pixels - rebuilt[:4]).norm(dim=1) + (pixels - rebuilt[4:]).norm(dim=1)).mean()
    else:
        ln = ((last[4:] - last[:4]) ** 2).mean()
        la = ((pixels - rebuilt[:4]) ** 2).mean() + ((pixels - rebuilt[4:]) ** 2).mean()
    torch.testing.assert_close(parts["ln"].detach(), ln)
    torch.testing.assert_close(parts["la"].detach(), la)


def test_l2_and_mse_give_different_defenses():
    torch.manual_seed(0)
    _, _, l2 = denoising_losses(sigma=0.05)
    torch.manual_seed(0)
    _, _, mse = denoising_losses(sigma=0.05, distance="mse")
    torch.testing.assert_close(l2["lc"], mse["lc"])  # same model, images and noise
    # a norm over 512 features (512x1x1) or 1024 pixels: far larger than a mean square
    assert l2["ln"] > 10 * mse["ln"] and l2["la"] > 10 * mse["la"]


def test_denoising_loss_components():
    _, total, parts = denoising_losses(sigma=0.05)
    assert set(parts) == {"lc", "ln", "la"}
    assert all(torch.isfinite(value) for value in parts.values())
    assert parts["ln"] > 0 and parts["la"] > 0
    torch.testing.assert_close(total, parts["lc"] + 0.1 * parts["ln"] + 1.0 * parts["la"])


@pytest.mark.parametrize("distance", ["l2", "mse"])
def test_feature_distance_vanishes_without_noise_and_gradients_stay_finite(distance):
    model, total, parts = denoising_losses(sigma=0.0, distance=distance)
    assert parts["ln"] == 0
    total.backward()  # the L2 norm's gradient at 0 must not be NaN
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_reconstruction_gradients_reach_decoder_and_shared_encoder():
    model, _, parts = denoising_losses(sigma=0.05, size=36)  # not a multiple of the stride
    parts["la"].backward()
    decoder_grads = [p.grad for p in model.decoder.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in decoder_grads)
    assert model.classifier.encoder.conv1.weight.grad.abs().sum() > 0
    # the reconstruction branch does not touch the classifier's later layers
    assert all(p.grad is None for p in model.classifier.body.parameters())


def test_denoising_classifier_predicts_like_its_classifier():
    model = DenoisingClassifier(resnet18(num_classes=2, in_channels=1)).eval()
    images = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), model.classifier(images))
