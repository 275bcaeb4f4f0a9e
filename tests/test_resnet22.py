"""The `resnet22` screening classifier against NYU's layout, and with what uses a classifier."""

import pytest
import torch
import torch.nn.functional as F

from medrobust.attacks import build_attack
from medrobust.errors import ConfigError
from medrobust.models import build_model, load_model, save_model
from medrobust.models.registry import build_defense

pytestmark = pytest.mark.usefixtures("one_thread")


def resnet22_config(**overrides):
    return {"family": "image", "arch": "resnet22", "num_classes": 2, "in_channels": 1,
            **overrides}


def expected_parameters(in_channels: int, num_classes: int) -> int:
    """Counted from the description in METHODS.md section 4, not from the code."""
    def batchnorm(c):
        return 2 * c  # weight and bias

    def block(c_in, c_out, stride):
        shortcut = c_in * c_out if stride != 1 or c_in != c_out else 0  # 1x1, no bias
        return (batchnorm(c_in) + 9 * c_in * c_out + batchnorm(c_out) + 9 * c_out * c_out
                + shortcut)

    total = 7 * 7 * in_channels * 16  # stem, no bias
    c_in = 16
    for width, stride in zip((16, 32, 64, 128, 256), (1, 2, 2, 2, 2)):
        total += block(c_in, width, stride) + block(width, width, 1)
        c_in = width
    total += batchnorm(256)                      # final BN
    total += 256 * 256 + 256                     # FC 256 -> 256
    total += 256 * num_classes + num_classes     # class head
    return total


@pytest.mark.parametrize("channels, classes", [(1, 2), (3, 4)])
def test_parameter_count_is_the_reference_layouts(channels, classes):
    model = build_model(resnet22_config(in_channels=channels, num_classes=classes))
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(channels, classes)


@pytest.mark.parametrize("height, width, last", [
    (64, 64, (1, 1)),
    # a mammogram's aspect: 7x7/2 and 3x3/2 without padding, then four stride-2 stages
    (160, 120, (3, 2)),
])
def test_any_input_size_gives_logits_and_the_features_defenses_need(height, width, last):
    model = build_model(resnet22_config()).eval()
    with torch.no_grad():
        features = model.forward_features(torch.rand(2, 1, height, width))
        logits = model(torch.rand(2, 1, height, width))
    assert logits.shape == (2, 2)
    assert features["low"].shape[:2] == (2, model.low_channels) == (2, 32)
    assert features["last"].shape == (2, 256, *last)


def test_downsampling_blocks_take_a_1x1_shortcut_of_the_pre_activation():
    model = build_model(resnet22_config())
    stages = [model.encoder.layer1, model.encoder.layer2, model.body.layer3,
              model.body.layer4, model.body.layer5]
    shortcuts = [[block.shortcut for block in stage] for stage in stages]
    assert shortcuts[0] == [None, None]  # stride 1, 16 -> 16
    for stage in shortcuts[1:]:
        assert stage[1] is None
        assert stage[0].kernel_size == (1, 1) and stage[0].stride == (2, 2)
    block = model.encoder.layer2[0]
    seen = []
    block.shortcut.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.randn(1, 16, 8, 8)
    block.eval()(x)
    torch.testing.assert_close(seen[0], F.relu(block.bn1(x)))


def test_it_trains_a_step():
    model = build_model(resnet22_config(normalization="per_image")).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images, labels = torch.rand(4, 1, 48, 40), torch.tensor([0, 1, 0, 1])
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_per_image_standardisation_ignores_each_images_brightness_and_contrast():
    model = build_model(resnet22_config(normalization="per_image")).eval()
    images = torch.rand(3, 1, 40, 40)
    scale = torch.tensor([0.5, 1.0, 2.0]).view(-1, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(images * scale + 0.1), model(images),
                                   rtol=1e-4, atol=1e-4)
        standardised = model.normalize(images)
    assert standardised.mean(dim=(1, 2, 3)).abs().max() < 1e-5
    torch.testing.assert_close(standardised.std(dim=(1, 2, 3), correction=0), torch.ones(3))
    # a blank image is centred, not divided by zero
    assert model.normalize(torch.full((1, 1, 8, 8), 0.3)).abs().max() < 1e-4


def test_an_unknown_normalisation_and_pretrained_weights_are_refused():
    with pytest.raises(ConfigError, match="normalization must be one of imagenet, per_image"):
        build_model(resnet22_config(normalization="zscore"))
    with pytest.raises(ConfigError, match="resnet22 has no pretrained weights"):
        build_model(resnet22_config(pretrained="imagenet"))


def test_the_denoising_defense_trains_on_it():
    defense = {"name": "denoising", "lambda_n": 1.0, "lambda_a": 10.0, "noise_sigma": 0.03}
    model = build_model(resnet22_config(defense=defense)).train()
    images = torch.rand(4, 1, 56, 48)
    loss, parts = build_defense(defense).loss(model, images, torch.tensor([0, 1, 0, 1]),
                                              torch.Generator().manual_seed(0))
    loss.backward()
    assert set(parts) == {"lc", "ln", "la"} and torch.isfinite(loss)
    assert all(p.grad is not None for p in model.decoder.parameters())


@pytest.mark.parametrize("name, epsilon", [("fgsm", 8), ("pgd", 8)])
def test_attacks_stay_in_budget_on_it(name, epsilon):
    model = build_model(resnet22_config()).eval()
    images, labels = torch.rand(4, 1, 48, 48), torch.tensor([0, 1, 0, 1])
    adversarial = build_attack(name, model, epsilon, {"steps": 3} if name == "pgd" else {},
                               generator=torch.Generator().manual_seed(0))(images, labels)
    change = (adversarial - images).abs()
    assert change.max() <= epsilon / 255 + 1e-6 and change.max() > 0
    with torch.no_grad():
        assert F.cross_entropy(model(adversarial), labels) > F.cross_entropy(model(images), labels)


def test_a_saved_resnet22_reloads_with_its_normalisation(tmp_path):
    config = resnet22_config(normalization="per_image")
    model = build_model(config).eval()
    save_model(model, tmp_path, config, {})
    loaded = load_model(tmp_path)
    images = torch.rand(2, 1, 40, 40)
    assert loaded.normalization == "per_image"
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))
