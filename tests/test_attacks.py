"""Attacks: exact steps, budgets and clipping, settings and units, seeding, each attack's
own behaviour (C&W's search, APGD's checkpoints, Square's queries), the adversarial store.

Equality with torchattacks is in test_attacks_reference.py.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medrobust.attacks import (APGDCE, ATTACKS, CWL2, FGSM, IFGSM, PGD, PGDL2, Square,
                               build_attack, resolve_attack)
from medrobust.attacks.apgd import checkpoints
from medrobust.attacks.run import craft_attack_run
from medrobust.attacks.square import fraction_changed
from medrobust.errors import ConfigError
from medrobust.io.image_store import open_image_store, write_image_store
from medrobust.models import build_model, save_model

EPS = 8 / 255

# small settings for every attack, so each test runs in well under a second
FAST = {
    "fgsm": {},
    "ifgsm": {"steps": 5},
    "pgd": {"steps": 5},
    "pgd_l2": {"steps": 5, "step_size": 0.1},
    "cw_l2": {"binary_search_steps": 3, "steps": 30},
    "apgd_ce": {"steps": 10},
    "square": {"queries": 50},
}
# budgets in each attack's own units (fractional on purpose)
BUDGETS = {"fgsm": 6.5, "ifgsm": 6.5, "pgd": 6.5, "pgd_l2": 0.3, "cw_l2": 0.3,
           "apgd_ce": 6.5, "square": 6.5}


pytestmark = pytest.mark.usefixtures("one_thread")


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


def small_mlp_model() -> nn.Module:
    """Weights scaled down, so that fooling it takes a perturbation of a few /255."""
    model = mlp_model()
    with torch.no_grad():
        model[1].weight.mul_(0.1)
    return model


def interior_batch(model: nn.Module, n: int = 64, seed: int = 2):
    """Images away from 0 and 1 (no clipping at 8/255), labelled by the model itself."""
    images = 0.1 + 0.8 * torch.rand((n, 3, 4, 4), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        labels = model(images).argmax(1)
    return images, labels


def accuracy(model, images, labels) -> float:
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def fooled(model, images, labels) -> torch.Tensor:
    with torch.no_grad():
        return model(images).argmax(1) != labels


def l2(adversarial, images) -> torch.Tensor:
    return (adversarial - images).double().flatten(1).norm(dim=1)


# --- FGSM / I-FGSM ----------------------------------------------------------------------

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


def test_ifgsm_defaults_to_ten_steps_of_eps_over_steps_and_takes_an_explicit_step():
    model = linear_model()
    attack = build_attack("ifgsm", model, 8)
    assert attack.params.steps == 10 and attack.params.step_size is None
    assert attack.step_size() == pytest.approx(8 / 255 / 10)
    assert build_attack("ifgsm", model, 8, {"step_size": 2}).step_size() == pytest.approx(2 / 255)
    # one step of 1/255 on a linear model moves every pixel by exactly 1/255
    images, labels = interior_batch(model, n=8)
    one_step = build_attack("ifgsm", model, 8, {"steps": 1, "step_size": 1})(images, labels)
    torch.testing.assert_close((one_step - images).abs(), torch.full_like(images, 1 / 255),
                               rtol=0, atol=1e-6)


# --- every attack: range, budget, model state -----------------------------------------------

@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_stays_in_the_unit_range_and_in_its_budget(name):
    model = mlp_model()
    generator = torch.Generator().manual_seed(3)
    # half the pixels at or near the bounds of [0, 1], half anywhere
    edges = torch.where(torch.rand((16, 3, 4, 4), generator=generator) > 0.5,
                        torch.tensor(1.0), torch.tensor(0.0))
    anywhere = torch.rand((16, 3, 4, 4), generator=generator)
    images = torch.where(torch.rand((16, 3, 4, 4), generator=generator) > 0.5, edges, anywhere)
    with torch.no_grad():
        labels = model(images).argmax(1)
    attack = build_attack(name, model, BUDGETS[name], FAST[name])

    adversarial = attack(images, labels)

    assert adversarial.shape == images.shape and adversarial.dtype == images.dtype
    assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    assert not torch.equal(adversarial, images)
    if attack.norm == "linf":
        assert attack.epsilon == pytest.approx(BUDGETS[name] / 255)
        assert (adversarial - images).abs().max() <= attack.epsilon + 1e-6
    else:
        assert attack.epsilon == BUDGETS[name]
        assert l2(adversarial, images).max() <= attack.epsilon * (1 + 1e-5)


@pytest.mark.parametrize("attack_class", [FGSM, IFGSM])
def test_pixels_pushed_past_a_bound_stop_exactly_on_it(attack_class):
    model = linear_model()
    images = torch.where(torch.rand((8, 3, 4, 4), generator=torch.Generator().manual_seed(3)) > 0.5,
                         torch.tensor(0.99), torch.tensor(0.01))
    labels = torch.zeros(8, dtype=torch.int64)
    adversarial = attack_class(model, EPS)(images, labels)
    assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    assert torch.any(adversarial == 1.0) and torch.any(adversarial == 0.0)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_leaves_the_model_as_it_found_it(name):
    model = mlp_model().train()
    model[1].weight.requires_grad_(False)
    before = [parameter.requires_grad for parameter in model.parameters()]
    images, labels = interior_batch(model, n=8)

    with torch.no_grad():
        adversarial = build_attack(name, model, BUDGETS[name], FAST[name])(images, labels)

    assert not torch.equal(adversarial, images)
    assert [parameter.requires_grad for parameter in model.parameters()] == before
    assert model.training and all(module.training for module in model.modules())
    assert all(parameter.grad is None for parameter in model.parameters())


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_a_zero_budget_returns_the_clean_images(name):
    model = mlp_model()
    images, labels = interior_batch(model, n=4)
    assert torch.equal(build_attack(name, model, 0, FAST[name])(images, labels), images)


# --- settings, units, registry -----------------------------------------------------------------

def test_attack_classes_declare_their_norm_and_budget_unit():
    assert {name: (cls.norm, cls.budget_unit) for name, cls in ATTACKS.items()} == {
        "fgsm": ("linf", "1/255"), "ifgsm": ("linf", "1/255"), "pgd": ("linf", "1/255"),
        "pgd_l2": ("l2", "image"), "cw_l2": ("l2", "image"), "apgd_ce": ("linf", "1/255"),
        "square": ("linf", "1/255")}
    assert {name for name, cls in ATTACKS.items() if cls.gradient_free} == {"square"}


def test_build_attack_from_config():
    model = linear_model()
    attack = build_attack("ifgsm", model, 4, {"steps": 3})
    assert isinstance(attack, IFGSM) and attack.params.steps == 3
    assert attack.epsilon == pytest.approx(4 / 255)
    assert build_attack("pgd", model, 2.5).epsilon == pytest.approx(2.5 / 255)
    assert build_attack("pgd_l2", model, 0.75).epsilon == 0.75
    assert build_attack("cw_l2", model, 3).epsilon == 3.0
    with pytest.raises(ConfigError, match="stpes"):
        build_attack("ifgsm", model, 4, {"stpes": 3})
    with pytest.raises(ConfigError, match="steps"):
        build_attack("fgsm", model, 4, {"steps": 3})
    with pytest.raises(ConfigError, match="attacks.ifgsm.steps: must be a positive integer"):
        build_attack("ifgsm", model, 4, {"steps": 0})
    with pytest.raises(ConfigError, match="apgd_ce, cw_l2, fgsm, ifgsm, pgd, pgd_l2, square"):
        build_attack("pgd_linf", model, 4)


@pytest.mark.parametrize("name, epsilon", [
    ("fgsm", 300), ("pgd", -1), ("pgd", True), ("pgd", "8"), ("pgd_l2", -0.5),
    ("cw_l2", math.inf), ("square", math.nan)])
def test_bad_budgets_are_config_errors(name, epsilon):
    with pytest.raises(ConfigError, match=f"attacks.{name}: epsilon must be"):
        resolve_attack(name, epsilon)


@pytest.mark.parametrize("name", ["fgsm", "pgd", "apgd_ce", "square"])
def test_an_linf_budget_written_as_a_fraction_is_refused_with_its_1_255_value(name):
    with pytest.raises(ConfigError, match=r"epsilon 0\.03 means 0\.03/255.* write 7\.65"):
        resolve_attack(name, 0.03)
    assert resolve_attack(name, 0.5).epsilon_image == pytest.approx(0.5 / 255)
    assert resolve_attack("pgd_l2", 0.03).epsilon_image == 0.03  # L2 radii are image units


@pytest.mark.parametrize("name, settings, key", [
    ("ifgsm", {"step_size": True}, "step_size"),
    ("ifgsm", {"steps": 2.0}, "steps"),
    ("pgd", {"steps": 0}, "steps"),
    ("pgd", {"step_size": -1}, "step_size"),
    ("pgd", {"random_start": "yes"}, "random_start"),
    ("pgd_l2", {"seed": -1}, "seed"),
    ("pgd_l2", {"step_size": 0}, "step_size"),
    ("cw_l2", {"binary_search_steps": 1.5}, "binary_search_steps"),
    ("cw_l2", {"kappa": -1}, "kappa"),
    ("cw_l2", {"learning_rate": 0}, "learning_rate"),
    ("cw_l2", {"initial_const": "1e-3"}, "initial_const"),
    ("cw_l2", {"abort_early": 1}, "abort_early"),
    ("apgd_ce", {"rho": 1.5}, "rho"),
    ("apgd_ce", {"restarts": 0}, "restarts"),
    ("square", {"queries": 0}, "queries"),
    ("square", {"p_init": 0}, "p_init"),
])
def test_bad_settings_are_config_errors_naming_the_key(name, settings, key):
    with pytest.raises(ConfigError, match=rf"attacks\.{name}\.{key}: must be"):
        resolve_attack(name, 4, settings)
    with pytest.raises(ConfigError, match=rf"^{key}: must be"):
        ATTACKS[name].Params(**settings)


def test_resolve_attack_checks_a_config_entry_without_a_model():
    spec = resolve_attack("pgd", 2, {"steps": 20, "step_size": 0.5})
    assert spec.attack_class is PGD and spec.epsilon == 2
    assert spec.epsilon_image == pytest.approx(2 / 255)
    assert spec.params == PGD.Params(steps=20, step_size=0.5)
    assert spec.params.to_dict() == {"steps": 20, "step_size": 0.5, "random_start": True, "seed": 0}
    # integers are accepted for numbers and stored as floats
    assert isinstance(resolve_attack("pgd", 2, {"step_size": 1}).params.step_size, float)


def test_defaults_and_descriptions():
    model = linear_model()
    described = {name: build_attack(name, model, BUDGETS[name]).describe() for name in ATTACKS}
    assert described == {
        "fgsm": "FGSM (L∞), ε 6.5/255",
        "ifgsm": "I-FGSM (L∞), ε 6.5/255, 10 steps, step 0.65/255",
        "pgd": "PGD-L∞, ε 6.5/255, 10 steps, step 1.625/255, random start",  # 2.5 ε / steps
        "pgd_l2": "PGD-L2, ε 0.3, 10 steps, step 0.075, random start",
        "cw_l2": "C&W-L2, ε 0.3, 5 binary-search steps x 1000 iterations, c0 0.001, "
                 "kappa 0, lr 0.01, early abort",
        "apgd_ce": "APGD-CE (L∞), ε 6.5/255, 100 steps, 1 restart, rho 0.75",
        "square": "Square (L∞), ε 6.5/255, 5000 queries, p_init 0.8",
    }


# --- seeding ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pgd", "pgd_l2", "apgd_ce", "square"])
def test_seeded_attacks_are_reproducible(name):
    model = mlp_model()
    images, labels = interior_batch(model, n=8)
    settings = {**FAST[name], "seed": 5}
    first = build_attack(name, model, BUDGETS[name], settings)(images, labels)
    again = build_attack(name, model, BUDGETS[name], settings)(images, labels)
    other = build_attack(name, model, BUDGETS[name], {**settings, "seed": 6})(images, labels)
    given = build_attack(name, model, BUDGETS[name], settings,
                         generator=torch.Generator().manual_seed(5))(images, labels)
    assert torch.equal(first, again) and torch.equal(first, given)
    assert not torch.equal(first, other)


def test_pgd_without_random_start_is_deterministic_and_starts_at_the_image():
    model = mlp_model()
    images, labels = interior_batch(model, n=8)
    settings = {"random_start": False, "steps": 1, "step_size": 2}
    one = build_attack("pgd", model, 8, {**settings, "seed": 1})(images, labels)
    two = build_attack("pgd", model, 8, {**settings, "seed": 2})(images, labels)
    assert torch.equal(one, two)
    # one step of 2/255 from the clean image
    torch.testing.assert_close((one - images).abs(), torch.full_like(images, 2 / 255),
                               rtol=0, atol=1e-6)


# --- C&W --------------------------------------------------------------------------------------

def test_cw_finds_the_minimal_l2_perturbation_of_a_linear_model():
    """For 2-class logits Wx + b the nearest adversarial point is at |margin| / ||w_0 - w_1||."""
    model = linear_model()
    images, _ = interior_batch(model, n=16)
    weight = model[1].weight.detach()
    with torch.no_grad():  # the boundary through the middle of the images
        model[1].bias.copy_(torch.tensor([-0.5, 0.5]) * ((weight[0] - weight[1]) @ torch.full((48,), 0.5)))
        logits = model(images)
    labels = logits.argmax(1)
    exact = ((logits[:, 0] - logits[:, 1]).abs() / (weight[0] - weight[1]).norm()).double()
    assert exact.max() < 0.6 and len(set(labels.tolist())) == 2

    attack = CWL2(model, 10.0, CWL2.Params(binary_search_steps=6, steps=200))
    adversarial = attack(images, labels)

    assert fooled(model, adversarial, labels).all()
    ratio = l2(adversarial, images) / exact
    assert ratio.min() >= 0.999 and torch.median(ratio) <= 1.05, ratio


def test_cw_binary_search_finds_examples_that_the_first_constant_misses():
    model = small_mlp_model()
    images, labels = interior_batch(model, n=16)
    one_round = CWL2(model, 10.0, CWL2.Params(binary_search_steps=1, steps=50))(images, labels)
    searched = CWL2(model, 10.0, CWL2.Params(binary_search_steps=5, steps=50))(images, labels)
    # c = 1e-3 alone is far too small; growing it tenfold per round finds them
    assert fooled(model, one_round, labels).float().mean() < 0.5
    assert fooled(model, searched, labels).all()


def test_cw_applies_the_budget_at_the_end():
    model = small_mlp_model()
    images, labels = interior_batch(model, n=16)
    settings = CWL2.Params(binary_search_steps=5, steps=50)
    free = CWL2(model, 10.0, settings)(images, labels)
    distances = l2(free, images)
    budget = float(distances.median())
    bounded = CWL2(model, budget, settings)(images, labels)
    inside = distances <= budget
    # within the budget: the same examples; beyond it: scaled back onto the sphere
    assert torch.equal(bounded[inside], free[inside])
    torch.testing.assert_close(l2(bounded[~inside], images[~inside]),
                               torch.full(((~inside).sum(),), budget, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    assert fooled(model, bounded[inside], labels[inside]).all()


def test_cw_examples_are_smaller_than_pgd_l2_examples_at_matched_success():
    """C&W minimises the perturbation; PGD-L2 ends on the sphere of its budget. Find the
    smallest PGD-L2 budget that fools at least as many images as C&W, then compare the
    median L2 of the successful examples."""
    model = small_mlp_model()
    images, labels = interior_batch(model, n=32)
    cw = CWL2(model, 10.0, CWL2.Params(binary_search_steps=5, steps=100))(images, labels)
    cw_success = fooled(model, cw, labels)
    for budget in np.arange(0.05, 3.0, 0.05):
        pgd = PGDL2(model, float(budget), PGDL2.Params(steps=20, step_size=budget / 4))(images, labels)
        pgd_success = fooled(model, pgd, labels)
        if pgd_success.sum() >= cw_success.sum():
            break
    cw_median = l2(cw, images)[cw_success].median()
    pgd_median = l2(pgd, images)[pgd_success].median()
    assert cw_success.float().mean() >= 0.9
    assert cw_median < 0.8 * pgd_median, (float(cw_median), float(pgd_median), budget)


# --- APGD --------------------------------------------------------------------------------------

def test_apgd_checkpoints_follow_the_paper():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (Croce and Hein 2020, section 3.2)
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(10) == [3, 5, 6, 7, 8, 9, 10]
    assert checkpoints(1) == [1]


def test_apgd_halves_its_step_size_on_either_condition():
    """Scripted per-image losses (call k evaluates x_k): 0 rises every step (never halved);
    1 is flat (condition 1 at all 8 checkpoints); 2 rises to 22, drops and rises again below
    its best (condition 2 at 41, 70, 87, 99); 3 starts at its best and rises below it
    (condition 2 from the first checkpoint: 22, 57, 80, 93)."""
    model = mlp_model()
    images, labels = interior_batch(model, n=4)
    attack = APGDCE(model, 4 / 255, APGDCE.Params(steps=100))
    calls = []

    def scripted(x, y):
        k = float(len(calls))
        calls.append(k)
        losses = torch.tensor([k, 0.0, k if k <= 22 else k - 100, 100.0 if k == 0 else k - 100])
        logits = F.one_hot(y, 3).float() * 10  # never misclassified
        return losses, torch.ones_like(x), logits

    attack.losses_and_gradient = scripted
    attack(images, labels)

    assert len(calls) == 101
    halvings = torch.log2(2 * attack.epsilon / attack.last_step_size).round()
    assert halvings.tolist() == [0, 8, 4, 4]


def test_apgd_is_at_least_as_strong_as_pgd_with_the_same_steps():
    model = small_mlp_model()
    images, labels = interior_batch(model, n=64)
    apgd = APGDCE(model, 3 / 255, APGDCE.Params(steps=20))(images, labels)
    pgd = PGD(model, 3 / 255, PGD.Params(steps=20, step_size=0.75))(images, labels)
    apgd_rate = fooled(model, apgd, labels).float().mean()
    pgd_rate = fooled(model, pgd, labels).float().mean()
    assert 0.0 < pgd_rate <= apgd_rate < 1.0, (float(pgd_rate), float(apgd_rate))


def test_apgd_restarts_only_retry_the_images_not_yet_fooled():
    model = small_mlp_model()
    images, labels = interior_batch(model, n=32)
    once = APGDCE(model, 2 / 255, APGDCE.Params(steps=10))(images, labels)
    thrice = APGDCE(model, 2 / 255, APGDCE.Params(steps=10, restarts=3))(images, labels)
    fooled_once, fooled_thrice = fooled(model, once, labels), fooled(model, thrice, labels)
    # the first run is the same; later runs only add
    assert torch.equal(once[fooled_once], thrice[fooled_once])
    assert fooled_thrice.sum() >= fooled_once.sum()


# --- Square ------------------------------------------------------------------------------------

class Quantised(nn.Module):
    """Rounds its input to 8 levels first: the loss gradient is zero almost everywhere."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model(torch.round(images * 8) / 8)


class Counting(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.calls, self.images = model, 0, 0

    def forward(self, images):
        self.calls += 1
        self.images += len(images)
        return self.model(images)


def test_square_succeeds_where_masked_gradients_stop_gradient_attacks():
    model = Quantised(mlp_model()).eval()
    images, labels = interior_batch(model, n=16)
    gradient_free = Square(model, 16 / 255, Square.Params(queries=50))(images, labels)
    for attack in (FGSM(model, 16 / 255), IFGSM(model, 16 / 255)):
        assert torch.equal(attack(images, labels), images)  # zero gradient: no move
    assert fooled(model, gradient_free, labels).float().mean() >= 0.5


@pytest.mark.parametrize("queries", [1, 2, 30])
def test_square_spends_at_most_its_query_budget(queries):
    model = Counting(mlp_model()).eval()
    images, labels = interior_batch(model.model, n=8)
    Square(model, 4 / 255, Square.Params(queries=queries))(images, labels)
    assert model.calls <= queries and model.images <= queries * len(images)
    if queries == 1:
        assert model.calls == 1  # the vertical-stripe start only


def test_square_stops_querying_images_once_they_are_fooled():
    model = Counting(mlp_model()).eval()
    images, labels = interior_batch(model.model, n=8)
    adversarial = Square(model, 32 / 255, Square.Params(queries=200))(images, labels)
    assert fooled(model.model, adversarial, labels).all()
    assert model.calls < 200 and model.images < model.calls * len(images)


def test_square_schedule_halves_p_on_the_papers_iterations():
    assert fraction_changed(0.8, 0, 10000) == 0.8
    assert fraction_changed(0.8, 11, 10000) == 0.4
    assert fraction_changed(0.8, 9000, 10000) == 0.8 / 512
    assert fraction_changed(0.8, 100, 1000) == 0.8 / 16  # rescaled: 100 of 1000 is 1000 of 10000


# --- GPU -----------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attacks_run_on_the_gpu(name):
    model = mlp_model()
    images, labels = interior_batch(model, n=8)
    model.cuda()
    adversarial = build_attack(name, model, BUDGETS[name], FAST[name])(images.cuda(), labels.cuda())
    assert adversarial.is_cuda
    assert adversarial.min() >= 0 and adversarial.max() <= 1


# --- the adversarial store ------------------------------------------------------------------

def test_an_attack_run_attacks_the_test_split_with_every_attack_at_every_budget(tmp_path):
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

    craft_attack_run(tmp_path / "surrogate", tmp_path / "clean.zarr", tmp_path / "run",
                     {"pgd": {"epsilons": [8, 2.5], "steps": 2}, "fgsm": {"epsilons": [4]}},
                     device="cpu", batch_size=2)

    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == [
        "fgsm-eps4.zarr", "pgd-eps2.5.zarr", "pgd-eps8.zarr"]
    assert open_image_store(tmp_path / "run/fgsm-eps4.zarr").attrs["attack"] == "fgsm"
    store = open_image_store(tmp_path / "run/pgd-eps8.zarr")
    assert list(store.sample_ids) == ["s1", "s3", "s4"]
    assert list(store.labels) == [1, 1, 0] and set(store.splits) == {"test"}
    assert store.attrs["attack"] == "pgd" and store.attrs["epsilon"] == 8
    assert store.attrs["norm"] == "linf" and store.attrs["budget_unit"] == "1/255"
    # the step taken without a step_size: 2.5 ε / steps
    assert store.attrs["attack_params"] == {"steps": 2, "step_size": 10.0, "random_start": True,
                                            "seed": 0}
    assert store.attrs["attack_description"] == \
        "PGD-L∞, ε 8/255, 2 steps, step 10/255, random start"
    assert store.attrs["source_model"] == "surrogate"
    assert store.attrs["dataset"] == "mammograms" and store.classes == ["benign", "malignant"]
    adversarial, _ = store.load("test")
    difference = np.abs(adversarial - images[[1, 3, 4]])
    assert difference.max() <= 8 / 255 + 1e-6 and difference.max() > 1 / 255
    smaller = open_image_store(tmp_path / "run/pgd-eps2.5.zarr")
    assert smaller.attrs["epsilon"] == 2.5
    difference = np.abs(smaller.load("test")[0] - images[[1, 3, 4]])
    assert 1 / 255 < difference.max() <= 2.5 / 255 + 1e-6


def test_an_attack_run_records_an_l2_budget_as_given(tmp_path):
    config = {"family": "image", "arch": "resnet18", "num_classes": 2, "in_channels": 1,
              "classes": ["a", "b"]}
    torch.manual_seed(0)
    save_model(build_model(config).eval(), tmp_path / "m", config, history=[])
    images = np.random.default_rng(1).uniform(0, 1, (2, 1, 16, 16)).astype(np.float32)
    write_image_store(tmp_path / "clean.zarr", images, [0, 1], ["test", "test"], ["a", "b"],
                      {"dataset": "d", "classes": ["a", "b"], "channels": 1})

    craft_attack_run(tmp_path / "m", tmp_path / "clean.zarr", tmp_path / "run",
                     {"pgd_l2": {"epsilons": [0.25], "steps": 2, "step_size": 0.1}})

    store = open_image_store(tmp_path / "run/pgd_l2-eps0.25.zarr")
    assert store.attrs["epsilon"] == 0.25 and store.attrs["norm"] == "l2"
    assert store.attrs["budget_unit"] == "image"
    assert store.attrs["attack_params"]["step_size"] == 0.1
    adversarial, _ = store.load("test")
    assert np.linalg.norm((adversarial - images).reshape(2, -1), axis=1).max() <= 0.25 + 1e-5
