"""Backbones and per-slide feature extraction, on CPU with tiny tiles and random weights."""

import urllib.error

import numpy as np
import pytest
import torch
import torchvision

from medrobust.errors import ConfigError, InputError, MedrobustError
from medrobust.features.backbones import IMAGENET_MEAN, build_backbone, state_dict_sha256
from medrobust.features.extract import FeatureConfig, extract_slide_features
from medrobust.io.atomic import atomic_path
from medrobust.io.slide_stores import create_tile_store, open_feature_store

SLIDE_ATTRS = {"slide_id": "slide_a", "label": "tumor", "split": "val", "tile_size": 32}


@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("resnet50", 2048)])
def test_backbone_maps_unit_range_tiles_to_pooled_features(name, dim):
    backbone = build_backbone(name, "random", seed=0)
    assert backbone.dim == dim
    assert not backbone.model.training
    assert backbone.model(torch.rand(2, 3, 32, 32)).shape == (2, dim)


def test_normalisation_is_inside_the_model():
    normalize = build_backbone("resnet18").model[0]
    mean_colour = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert torch.allclose(normalize(mean_colour), torch.zeros(1, 3, 2, 2), atol=1e-6)


def test_random_weights_follow_the_seed_not_the_global_generator():
    torch.manual_seed(123)
    first = build_backbone("resnet18", "random", seed=0)
    torch.manual_seed(456)
    second = build_backbone("resnet18", "random", seed=0)
    other = build_backbone("resnet18", "random", seed=1)
    assert first.weights_sha256 == second.weights_sha256
    assert first.weights_sha256 != other.weights_sha256
    tiles = torch.rand(2, 3, 32, 32)
    assert torch.equal(first.model(tiles), second.model(tiles))


def test_weights_hash_sees_a_single_changed_value():
    backbone = build_backbone("resnet18")
    assert state_dict_sha256(backbone.model) == backbone.weights_sha256
    with torch.no_grad():
        backbone.model[1].conv1.weight[0, 0, 0, 0] += 1e-3
    assert state_dict_sha256(backbone.model) != backbone.weights_sha256


def test_imagenet_weights_are_asked_of_torchvision(monkeypatch):
    requested, real_resnet18 = [], torchvision.models.resnet18

    def fake_resnet18(weights=None):  # stands in for the download, which tests never do
        requested.append(weights)
        return real_resnet18(weights=None)

    monkeypatch.setattr(torchvision.models, "resnet18", fake_resnet18)
    backbone = build_backbone("resnet18", "imagenet")
    assert requested == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1]
    assert (backbone.weights, backbone.dim) == ("imagenet", 512)


def test_imagenet_weights_offline_say_how_to_fix_it(monkeypatch):
    def offline(weights=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models, "resnet18", offline)
    with pytest.raises(MedrobustError, match="torch hub cache"):
        build_backbone("resnet18", "imagenet")


def test_unknown_backbone_weights_and_config_keys_are_config_errors():
    with pytest.raises(ConfigError, match="resnet18"):
        build_backbone("vit_huge")
    with pytest.raises(ConfigError, match="imagenet"):
        build_backbone("resnet18", "laion")
    with pytest.raises(ConfigError, match="batchsize"):
        FeatureConfig.from_mapping({"backbone": "resnet18", "batchsize": 4})
    with pytest.raises(ConfigError, match="batch_size"):
        FeatureConfig.from_mapping({"batch_size": 0})


def _tile_store(path, tiles, attrs=SLIDE_ATTRS):
    coords = np.arange(2 * len(tiles)).reshape(-1, 2) * 32
    with atomic_path(path) as tmp:
        array = create_tile_store(tmp, len(tiles), 32, coords, np.ones(len(tiles)), attrs)
        if len(tiles):
            array[:] = tiles
    return coords


def test_extraction_embeds_every_tile_in_batches(tmp_path):
    tiles = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    coords = _tile_store(tmp_path / "tiles.zarr", tiles)
    config = FeatureConfig.from_mapping({"backbone": "resnet18", "weights": "random",
                                         "batch_size": 2})
    extract_slide_features(tmp_path / "tiles.zarr", tmp_path / "features.zarr", config, "cpu")

    store = open_feature_store(tmp_path / "features.zarr")
    backbone = build_backbone("resnet18", "random", seed=0)
    with torch.no_grad():  # all tiles at once, scaled to [0, 1]
        expected = backbone.model(torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255)
    assert store.features.shape == (5, 512)
    np.testing.assert_allclose(store.features, expected.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(store.coords, coords)
    assert {key: store.attrs[key] for key in ("slide_id", "label", "split")} == \
        {"slide_id": "slide_a", "label": "tumor", "split": "val"}
    assert store.attrs["backbone"] == "resnet18"
    assert store.attrs["weights"] == "random"
    assert store.attrs["weights_sha256"] == backbone.weights_sha256
    assert store.attrs["dim"] == 512


def test_empty_tile_store_gives_empty_feature_store(tmp_path):
    _tile_store(tmp_path / "tiles.zarr", np.zeros((0, 32, 32, 3), np.uint8))
    extract_slide_features(tmp_path / "tiles.zarr", tmp_path / "features.zarr", FeatureConfig())
    store = open_feature_store(tmp_path / "features.zarr")
    assert store.features.shape == (0, 512)
    assert store.attrs["slide_id"] == "slide_a"


def test_tile_store_without_labels_is_an_input_error(tmp_path):
    _tile_store(tmp_path / "tiles.zarr", np.zeros((1, 32, 32, 3), np.uint8),
                attrs={"slide_id": "slide_a"})
    with pytest.raises(InputError, match="label, split"):
        extract_slide_features(tmp_path / "tiles.zarr", tmp_path / "features.zarr",
                               FeatureConfig())
    assert not (tmp_path / "features.zarr").exists()
