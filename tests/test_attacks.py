"""FGSM / I-FGSM: exact step, eps ball, clipping, frozen model, config, adversarial store."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medrobust.attacks import ATTACKS, FGSM, IFGSM, build_attack
from medrobust.attacks.run import craft_adversarial_store
from medrobust.errors import ConfigError
from medrobust.io.image_store import open_image_store, write_image_store
from medrobust.models import build_model, save_model

EPS = 8 / 255


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return module


def linear_model() -> nn.Module:
    return seeded(nn.Sequential(nn.Flatten(), nn.Linear(48, 2)), 0).eval()


def mlp_model() -> nn.Module:
    return seeded(nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Tanh(), nn.Linear(16, 3)), 1).eval()


def interior_batch(model: nn.Module, n: int = 64):
    """Images away from 0 and 1 (no clipping at 8/255), labelled by the model itself."""
    images = 0.1 + 0.8 * torch.rand((n, 3, 4, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        labels = model(images).argmax(1)
    return images, labels


def accuracy(model, images, labels) -> float:
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def test_fgsm_moves_every_pixel_by_eps_along_the_gradient_sign():
    model = linear_model()
    images, labels = interior_batch(model)
    inputs = images.clone().requires_grad_(True)
    F.cross_entropy(model(inputs), labels).backward()
    expected = images + EPS * inputs.grad.sign()

    adversarial = FGSM(model, EPS)(images, labels)

    assert torch.all(inputs.grad != 0)
    torch.testing.assert_close(adversarial, expected, rtol=0, atol=1e-6)
    assert accuracy(model, images, labels) == 1.0
    assert accuracy(model, adversarial, labels) < 0.8


def test_ifgsm_stays_in_the_eps_ball_and_is_at_least_as_strong_as_fgsm():
    model = mlp_model()
    images, labels = interior_batch(model)
    fgsm = FGSM(model, EPS)(images, labels)
    ifgsm = IFGSM(model, EPS, IFGSM.Params(steps=10))(images, labels)

    assert (ifgsm - images).abs().max() <= EPS + 1e-6
    assert not torch.equal(ifgsm, fgsm)
    with torch.no_grad():
        loss_fgsm = F.cross_entropy(model(fgsm), labels)
        loss_ifgsm = F.cross_entropy(model(ifgsm), labels)
    assert loss_ifgsm >= loss_fgsm
    assert accuracy(model, ifgsm, labels) <= accuracy(model, fgsm, labels) < 1.0


@pytest.mark.parametrize("attack_class", [FGSM, IFGSM])
def test_attacks_clip_to_the_unit_range(attack_class):
    model = linear_model()
    images = torch.where(torch.rand((8, 3, 4, 4), generator=torch.Generator().manual_seed(3)) > 0.5,
                         torch.tensor(0.99), torch.tensor(0.01))
    labels = torch.zeros(8, dtype=torch.int64)
    adversarial = attack_class(model, EPS)(images, labels)
    assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    # pixels pushed past a bound stop exactly on it
    assert torch.any(adversarial == 1.0) and torch.any(adversarial == 0.0)


def test_attack_leaves_the_model_as_it_found_it():
    model = mlp_model().train()
    model[1].weight.requires_grad_(False)
    before = [parameter.requires_grad for parameter in model.parameters()]
    images, labels = interior_batch(model, n=8)

    with torch.no_grad():
        adversarial = IFGSM(model, EPS, IFGSM.Params(steps=2))(images, labels)

    assert not torch.equal(adversarial, images)

    assert [parameter.requires_grad for parameter in model.parameters()] == before
    assert model.training and all(module.training for module in model.modules())
    assert all(parameter.grad is None for parameter in model.parameters())


def test_build_attack_from_config():
    model = linear_model()
    attack = build_attack("ifgsm", model, 4, {"steps": 3})
    assert isinstance(attack, IFGSM) and attack.params.steps == 3
    assert attack.epsilon == pytest.approx(4 / 255)
    assert set(ATTACKS) == {"fgsm", "ifgsm"}
    with pytest.raises(ConfigError, match="stpes"):
        build_attack("ifgsm", model, 4, {"stpes": 3})
    with pytest.raises(ConfigError, match="steps"):
        build_attack("fgsm", model, 4, {"steps": 3})
    with pytest.raises(ConfigError, match="positive integer"):
        build_attack("ifgsm", model, 4, {"steps": 0})
    with pytest.raises(ConfigError, match="fgsm, ifgsm"):
        build_attack("pgd", model, 4)
    with pytest.raises(ConfigError, match="epsilon"):
        build_attack("fgsm", model, 300)


def test_craft_adversarial_store_attacks_the_test_split_of_a_saved_model(tmp_path):
    config = {"family": "image", "arch": "resnet18", "num_classes": 2, "in_channels": 1,
              "classes": ["benign", "malignant"]}
    torch.manual_seed(0)
    model = build_model(config).eval()
    save_model(model, tmp_path / "surrogate", config, history=[])
    rng = np.random.default_rng(0)
    images = rng.uniform(0.2, 0.8, (6, 1, 16, 16)).astype(np.float32)
    write_image_store(tmp_path / "clean.zarr", images, [0, 1, 0, 1, 0, 0],
                      ["train", "test", "val", "test", "test", "train"],
                      [f"s{i}" for i in range(6)],
                      {"dataset": "mammograms", "classes": ["benign", "malignant"], "channels": 1})

    craft_adversarial_store(tmp_path / "surrogate", tmp_path / "clean.zarr", tmp_path / "adv.zarr",
                            "ifgsm", 8, {"steps": 2}, device="cpu", batch_size=2)

    store = open_image_store(tmp_path / "adv.zarr")
    assert list(store.sample_ids) == ["s1", "s3", "s4"]
    assert list(store.labels) == [1, 1, 0] and set(store.splits) == {"test"}
    assert store.attrs["attack"] == "ifgsm" and store.attrs["epsilon"] == 8
    assert store.attrs["source_model"] == "surrogate"
    assert store.attrs["attack_params"] == {"steps": 2}
    assert store.attrs["dataset"] == "mammograms" and store.classes == ["benign", "malignant"]
    adversarial, _ = store.load("test")
    difference = np.abs(adversarial - images[[1, 3, 4]])
    assert difference.max() <= 8 / 255 + 1e-6 and difference.max() > 1 / 255
