"""medrobust's FGSM, I-FGSM, PGD-L∞ and PGD-L2 against torchattacks (the reference library,
METHODS.md section 2), on the same model and inputs: the outputs are bit for bit equal.

torchattacks draws its random start from torch's global generator; medrobust from its own
generator seeded with `seed`. On the CPU both give the same numbers for the same seed, so
"fixed start" is tested twice: without a random start, and with the same seed on both sides.
"""

import pytest
import torch
import torchattacks
from torch import nn

from medrobust.attacks import build_attack


pytestmark = pytest.mark.usefixtures("one_thread")


def conv_model() -> nn.Module:
    """Conv + batch norm + ReLU + linear, 3 classes, fixed random weights and statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 8 * 8, 3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.1, 0.1)
        model[1].running_var.uniform_(0.5, 1.5)
    return model.eval()


def mlp_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.Tanh(), nn.Linear(32, 2)).eval()


MODELS = {"conv": conv_model, "mlp": mlp_model}


def batch(n: int = 16):
    """16 images of 3x16x16; a quarter of the pixels exactly at 0 or 1 (clipping is exercised)."""
    generator = torch.Generator().manual_seed(7)
    images = torch.rand((n, 3, 16, 16), generator=generator)
    edges = torch.rand((n, 3, 16, 16), generator=generator)
    images = torch.where(edges < 0.125, 0.0, torch.where(edges > 0.875, 1.0, images))
    labels = torch.randint(0, 2, (n,), generator=generator)
    return images, labels


def assert_equal(mine: torch.Tensor, reference: torch.Tensor) -> None:
    assert torch.equal(mine, reference), (mine - reference).abs().max().item()
    assert mine.dtype == reference.dtype


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("epsilon", [4, 8, 2.5])
def test_fgsm_equals_torchattacks(model_name, epsilon):
    model = MODELS[model_name]()
    images, labels = batch()
    reference = torchattacks.FGSM(model, eps=epsilon / 255)(images, labels)
    mine = build_attack("fgsm", model, epsilon)(images, labels)
    assert_equal(mine, reference)
    assert not torch.equal(mine, images)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("epsilon, step_size, steps", [(8, 2, 10), (4, 1, 10), (2.5, 0.5, 7)])
def test_ifgsm_with_a_given_step_equals_torchattacks_bim(model_name, epsilon, step_size, steps):
    model = MODELS[model_name]()
    images, labels = batch()
    reference = torchattacks.BIM(model, eps=epsilon / 255, alpha=step_size / 255,
                                 steps=steps)(images, labels)
    mine = build_attack("ifgsm", model, epsilon, {"steps": steps, "step_size": step_size})(
        images, labels)
    assert_equal(mine, reference)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("random_start, seed", [(False, 0), (True, 0), (True, 123)])
def test_pgd_from_the_same_start_equals_torchattacks(model_name, random_start, seed):
    model = MODELS[model_name]()
    images, labels = batch()
    torch.manual_seed(seed)
    reference = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=10,
                                 random_start=random_start)(images, labels)
    mine = build_attack("pgd", model, 8, {"steps": 10, "step_size": 2,
                                          "random_start": random_start, "seed": seed})(images, labels)
    assert_equal(mine, reference)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("random_start, seed", [(False, 0), (True, 0), (True, 123)])
def test_pgd_l2_from_the_same_start_equals_torchattacks(model_name, random_start, seed):
    model = MODELS[model_name]()
    images, labels = batch()
    torch.manual_seed(seed)
    reference = torchattacks.PGDL2(model, eps=0.5, alpha=0.1, steps=10,
                                   random_start=random_start)(images, labels)
    mine = build_attack("pgd_l2", model, 0.5, {"steps": 10, "step_size": 0.1,
                                               "random_start": random_start, "seed": seed})(
        images, labels)
    assert_equal(mine, reference)


def test_a_different_seed_gives_a_different_start():
    model = conv_model()
    images, labels = batch()
    torch.manual_seed(0)
    reference = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=1)(images, labels)
    mine = build_attack("pgd", model, 8, {"steps": 1, "seed": 1})(images, labels)
    assert not torch.equal(mine, reference)
