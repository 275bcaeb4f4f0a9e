"""medrobust's ResNet18/50 and VGG16 against torchvision's own (the reference here only)."""

import subprocess
import sys
import urllib.error

import pytest
import torch
import torchvision

from medrobust.errors import MedrobustError
from medrobust.models import image_classifiers
from medrobust.models.registry import build_defense, build_model
from medrobust.models.torchvision_nets import ARCHITECTURES, IMAGENET_URLS, torchvision_architecture


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_a_seeded_network_equals_torchvisions_weight_for_weight(arch):
    torch.manual_seed(11)
    ours = torchvision_architecture(arch).state_dict()
    torch.manual_seed(11)
    reference = torchvision.models.get_model(arch).state_dict()
    assert list(ours) == list(reference)
    different = [key for key in reference if not torch.equal(ours[key], reference[key])]
    assert not different


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_torchvisions_weights_give_torchvisions_outputs(arch):
    torch.manual_seed(5)
    reference = torchvision.models.get_model(arch).eval()
    with torch.no_grad():  # BN statistics away from their defaults, so BN's wiring shows
        for name, buffer in reference.named_buffers():
            if name.endswith("running_mean") or name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    ours = torchvision_architecture(arch).eval()
    ours.load_state_dict(reference.state_dict())
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), reference(images), rtol=0, atol=0)


def test_training_the_denoising_defense_matches_torchvisions_resnet18_bit_for_bit(monkeypatch):
    # the shortcut is added in place after the main path, as torchvision does; adding it
    # out of place gave the same forward values but differently rounded training
    # (119 of 122 tensors apart after 3 steps), so the default run's results moved
    config = {"family": "image", "arch": "resnet18", "num_classes": 2, "in_channels": 1,
              "pretrained": "none", "normalization": "imagenet",
              "defense": {"name": "denoising", "lambda_n": 1.0, "lambda_a": 10.0,
                          "noise_sigma": 0.0314, "distance": "l2"}}

    def train(architecture):
        monkeypatch.setattr(image_classifiers, "torchvision_architecture", architecture)
        torch.manual_seed(0)
        model = build_model(config).train()
        defense = build_defense(config["defense"])
        optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
        noise, data = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
        for _ in range(3):
            images = torch.rand(32, 1, 64, 64, generator=data)
            labels = torch.randint(0, 2, (32,), generator=data)
            optimizer.zero_grad()
            defense.loss(model, images, labels, noise)[0].backward()
            optimizer.step()
        return model.state_dict()

    ours = train(torchvision_architecture)
    reference = train(lambda arch, imagenet=None: torchvision.models.get_model(arch))
    assert [key for key in reference if not torch.equal(ours[key], reference[key])] == []


def test_imagenet_weights_come_from_torchvisions_urls(monkeypatch):
    weights = {("resnet18", "IMAGENET1K_V1"): torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
               ("resnet50", "IMAGENET1K_V1"): torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
               ("resnet50", "IMAGENET1K_V2"): torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
               ("vgg16", "IMAGENET1K_V1"): torchvision.models.VGG16_Weights.IMAGENET1K_V1}
    assert IMAGENET_URLS == {key: value.url for key, value in weights.items()}

    requested = []

    def download(url, progress, check_hash):  # tests never download
        requested.append((url, check_hash))
        torch.manual_seed(2)
        return torchvision.models.resnet18().state_dict()

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", download)
    net = torchvision_architecture("resnet18", "IMAGENET1K_V1")
    assert requested == [(IMAGENET_URLS[("resnet18", "IMAGENET1K_V1")], True)]
    torch.manual_seed(2)
    assert torch.equal(net.fc.weight, torchvision.models.resnet18().fc.weight)


def test_imagenet_weights_offline_say_how_to_fix_it(monkeypatch):
    def offline(url, progress, check_hash):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(MedrobustError, match=r"resnet18-f37072fd\.pth in the torch hub cache"):
        torchvision_architecture("resnet18", "IMAGENET1K_V1")


def test_model_building_jobs_do_not_import_torchvision():
    # the point of the module: torchvision's import (torch._dynamo with it) costs each job
    # ~3 s of CPU; timm backbones (imported only for a timm: name) still bring it
    modules = ["medrobust.models", "medrobust.features.backbones", "medrobust.attacks.run",
               "medrobust.train.image_classifier", "medrobust.evaluate.image_classifier"]
    code = (f"import sys; import {', '.join(modules)}; "
            "print(sorted(name for name in ('torchvision', 'torch._dynamo') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"
