"""PGD on a slide's most-attended tiles: budget, untouched tiles, loss, and a constructed flip."""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medrobust.attacks.pgd import PGDParams
from medrobust.attacks.tiles import TileBag, TilePGD, most_attended
from medrobust.models.mil import ABMIL, ABMILOptions

EPS = 8 / 255


class TinyBackbone(nn.Module):
    """A small conv net: tiles (k, 3, 8, 8) -> features (k, 6)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, tiles):
        return torch.tanh(self.conv(tiles)).mean(dim=(-2, -1))


def slide(n=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tiles = torch.rand(n, 3, 8, 8, generator=generator)
    return tiles


def attack_setup(k=3, steps=10):
    backbone = TinyBackbone().eval()
    torch.manual_seed(1)
    mil = ABMIL(6, 2).eval()
    tiles = slide()
    with torch.no_grad():
        features = backbone(tiles)
        logits, _ = mil(features)
    label = int(logits.argmax())  # attack the prediction, so the loss starts low
    attack = TilePGD(backbone, mil, EPS, PGDParams(steps=steps, step_size=2.0, seed=0))
    result = attack.attack_slide(features, lambda positions: tiles[positions], label, k)
    return backbone, mil, tiles, features, label, result


def test_attacked_tiles_stay_in_the_budget_and_the_rest_are_untouched():
    backbone, mil, tiles, features, label, result = attack_setup()
    clean, adversarial = result.clean_tiles, result.adversarial_tiles
    assert torch.equal(clean, tiles[result.positions])
    assert (adversarial - clean).abs().max() <= EPS + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert (adversarial - clean).abs().max() > EPS / 2  # it moved
    others = np.setdiff1d(np.arange(len(tiles)), result.positions)
    assert torch.equal(result.features[others], features[others])
    with torch.no_grad():
        np.testing.assert_allclose(result.features[result.positions], backbone(adversarial),
                                   atol=1e-6)


def test_the_attacked_tiles_are_the_most_attended():
    backbone, mil, tiles, features, label, result = attack_setup(k=4)
    with torch.no_grad():
        _, attention = mil(features)
    top = torch.topk(attention, 4).indices.numpy()
    np.testing.assert_array_equal(result.positions, top)
    assert list(most_attended(torch.tensor([0.1, 0.5, 0.5, 0.2]), 2)) == [1, 2]
    assert len(most_attended(torch.tensor([0.3, 0.7]), 5)) == 2


def test_the_loss_of_the_true_label_increases_beyond_what_random_noise_does():
    """Above the loss of 20 random points of the same budget: an attack whose gradient
    steps did nothing (its random start alone) would not be."""
    backbone, mil, tiles, features, label, result = attack_setup()
    target = torch.tensor([label])
    clean_loss = F.cross_entropy(result.clean_logits[None], target)
    adversarial_loss = F.cross_entropy(result.adversarial_logits[None], target)
    assert adversarial_loss > clean_loss
    with torch.no_grad():
        np.testing.assert_allclose(result.adversarial_logits, mil(result.features)[0], atol=1e-6)
        bag = TileBag(backbone, mil)
        bag.hold(features, torch.as_tensor(result.positions))
        generator = torch.Generator().manual_seed(3)
        clean = result.clean_tiles
        random_losses = [F.cross_entropy(bag((clean + EPS * (2 * torch.rand(
            clean.shape, generator=generator) - 1)).clamp(0, 1)), target) for _ in range(20)]
    assert adversarial_loss > max(random_losses)


def test_a_zero_budget_changes_nothing():
    backbone, mil = TinyBackbone().eval(), ABMIL(6, 2).eval()
    tiles = slide()
    with torch.no_grad():
        features = backbone(tiles)
    result = TilePGD(backbone, mil, 0.0).attack_slide(features, lambda p: tiles[p], 0, 2)
    assert torch.equal(result.adversarial_tiles, result.clean_tiles)
    assert torch.equal(result.features, features)


def test_the_attacked_tiles_are_embedded_at_the_stored_features_precision():
    """Features stored under bf16 autocast: the attack embeds its tiles the same way, so a
    zero budget gives back the stored rows exactly; in fp32 they would differ by bf16's
    rounding, a change the attack did not make."""
    backbone, mil = TinyBackbone().eval(), ABMIL(6, 2).eval()
    tiles = slide()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        stored = backbone(tiles).float()
    same = TilePGD(backbone, mil, 0.0, autocast_dtype=torch.bfloat16).attack_slide(
        stored, lambda p: tiles[p], 0, 3)
    assert torch.equal(same.features, stored)
    fp32 = TilePGD(backbone, mil, 0.0).attack_slide(stored, lambda p: tiles[p], 0, 3)
    assert not torch.equal(fp32.features, stored)


class MeanIntensity(nn.Module):
    def forward(self, tiles):
        return tiles.mean(dim=(1, 2, 3))[:, None]


class MeanBag(nn.Module):
    """Uniform attention; logit of 'tumour' = 50 * (mean tile intensity - 0.5)."""

    def forward(self, bag):
        attention = torch.full((len(bag),), 1.0 / len(bag))
        score = 50.0 * ((attention[:, None] * bag).sum() - 0.5)
        return torch.stack([torch.zeros(()), score]), attention


def test_on_a_constructed_model_the_attack_flips_a_slide_that_random_noise_does_not():
    """10 tiles at 0.51: tumour (mean 0.51 > 0.5). Moving 5 tiles by -8/255 (0.031) takes the
    mean to 0.494: normal. A random ±8/255 pattern on the same tiles averages out."""
    tiles = torch.full((10, 3, 16, 16), 0.51)
    backbone, mil = MeanIntensity(), MeanBag()
    features = backbone(tiles)
    attack = TilePGD(backbone, mil, EPS, PGDParams(steps=5, step_size=2.0, seed=0))
    result = attack.attack_slide(features, lambda positions: tiles[positions], 1, 5)
    assert int(result.clean_logits.argmax()) == 1
    assert int(result.adversarial_logits.argmax()) == 0
    generator = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (5, 3, 16, 16), generator=generator) * 2.0 - 1.0
    noisy = tiles.clone()
    noisy[result.positions] = (tiles[result.positions] + EPS * signs).clamp(0, 1)
    bag = TileBag(backbone, mil)
    bag.hold(features, torch.as_tensor(result.positions))
    assert int(bag(noisy[result.positions]).argmax()) == 1


def test_the_whole_slide_is_attacked_in_eval_mode_and_the_models_are_left_as_found():
    """Tile choice, clean and attacked bags without dropout even if the MIL head was left in
    train mode; its mode, parameters and requires_grad as they were afterwards."""
    backbone = TinyBackbone().eval()
    torch.manual_seed(1)
    mil = ABMIL(6, 2, ABMILOptions(dropout=0.5)).eval()
    tiles = slide()
    with torch.no_grad():
        features = backbone(tiles)
        expected, _ = mil(features)
    before = {name: value.clone() for name, value in mil.state_dict().items()}
    attack = TilePGD(backbone, mil, EPS, PGDParams(steps=3, seed=0))
    mil.train()
    result = attack.attack_slide(features, lambda positions: tiles[positions], 0, 3)
    assert torch.equal(result.clean_logits, expected.reshape(-1))
    with torch.no_grad():
        mil.eval()
        np.testing.assert_allclose(result.adversarial_logits, mil(result.features)[0].reshape(-1),
                                   atol=1e-6)
    mil.train()
    attack.attack_slide(features, lambda positions: tiles[positions], 0, 3)
    assert mil.training and all(parameter.requires_grad for parameter in mil.parameters())
    assert all(torch.equal(value, before[name]) for name, value in mil.state_dict().items())
