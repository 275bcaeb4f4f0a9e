"""Backbones and per-slide feature extraction, on CPU with tiny tiles and random weights."""

import os
import threading
import urllib.error
from pathlib import Path

from safetensors.torch import save_file

import numpy as np
import pytest
import timm
import torch
import torchvision

from medrobust.errors import ConfigError, InputError, MedrobustError
from medrobust.features import groups
from medrobust.features.backbones import (IMAGENET_MEAN, IMAGENET_STD, backbone_problem,
                                          build_backbone, state_dict_sha256)
from medrobust.features.extract import (FeatureConfig, TileBatches, autocast_dtype, backbone_for,
                                        embed_batch, extract_slide_features)
from medrobust.features.groups import extract_group_features
from medrobust.io.atomic import atomic_path
from medrobust.io.slide_stores import (TILES_PER_SHARD, create_tile_store, open_feature_store,
                                       write_tile_shard)
from medrobust.models.torchvision_nets import IMAGENET_URLS

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


@pytest.mark.parametrize("name, weights", [
    ("resnet18", "IMAGENET1K_V1"),
    ("resnet50", "IMAGENET1K_V2"),
    # CLAM's and TRIDENT's baseline takes torchvision's original weights, not the V2
    ("resnet50_layer3", "IMAGENET1K_V1"),
])
def test_imagenet_weights_are_torchvisions(monkeypatch, name, weights):
    arch = name.removesuffix("_layer3")
    requested = []

    def download(url, progress, check_hash):  # stands in for the download, which tests never do
        requested.append(url)
        return torchvision.models.get_model(arch).state_dict()

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", download)
    backbone = build_backbone(name, "imagenet")
    assert requested == [IMAGENET_URLS[(arch, weights)]]
    assert backbone.weights == "imagenet"


def test_imagenet_weights_offline_say_how_to_fix_it(monkeypatch):
    def offline(url, progress, check_hash):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(MedrobustError, match="torch hub cache"):
        build_backbone("resnet18", "imagenet")


def test_unknown_backbone_weights_and_config_keys_are_config_errors():
    with pytest.raises(ConfigError, match="resnet18"):
        build_backbone("vit_huge")
    with pytest.raises(InputError, match="laion: no such weights file; features.weights takes "
                                         "random, imagenet or the path"):
        build_backbone("resnet18", "laion")
    with pytest.raises(ConfigError, match="batchsize"):
        FeatureConfig.from_mapping({"backbone": "resnet18", "batchsize": 4})
    with pytest.raises(ConfigError, match="batch_size"):
        FeatureConfig.from_mapping({"batch_size": 0})
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16, fp16"):
        FeatureConfig(precision="fp8")
    with pytest.raises(ConfigError, match="loader_workers must be an integer >= 0"):
        FeatureConfig(loader_workers=-1)
    with pytest.raises(ConfigError, match="prefetch_batches must be an integer >= 1"):
        FeatureConfig(prefetch_batches=0)
    with pytest.raises(ConfigError, match="model_kwargs applies to timm backbones only"):
        build_backbone("resnet18", model_kwargs={"drop_rate": 0.1})


def _tile_store(path, tiles, attrs=SLIDE_ATTRS):
    coords = np.arange(2 * len(tiles)).reshape(-1, 2) * 32
    with atomic_path(path) as tmp:
        shards = create_tile_store(tmp, len(tiles), 32, coords, np.ones(len(tiles)), attrs)
        for start in range(0, len(tiles), TILES_PER_SHARD):
            write_tile_shard(shards, start, tiles[start:start + TILES_PER_SHARD])
    return coords


@pytest.mark.parametrize("workers, prefetch", [(0, 1), (1, 2), (3, 1)])
def test_extraction_embeds_every_tile_in_batches(tmp_path, workers, prefetch):
    tiles = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    coords = _tile_store(tmp_path / "tiles.zarr", tiles)
    config = FeatureConfig.from_mapping({"backbone": "resnet18", "weights": "random",
                                         "batch_size": 2, "loader_workers": workers,
                                         "prefetch_batches": prefetch})
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
    assert store.attrs["precision"] == "fp32"  # what precision "auto" means on a CPU


def test_empty_tile_store_gives_empty_feature_store(tmp_path):
    _tile_store(tmp_path / "tiles.zarr", np.zeros((0, 32, 32, 3), np.uint8))
    extract_slide_features(tmp_path / "tiles.zarr", tmp_path / "features.zarr", FeatureConfig())
    store = open_feature_store(tmp_path / "features.zarr")
    assert store.features.shape == (0, 512)
    assert store.attrs["slide_id"] == "slide_a"


def test_a_group_job_builds_one_backbone_and_writes_what_slide_jobs_write(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    stores = []
    for name in ("slide_a", "slide_b", "slide_c"):
        stores.append(tmp_path / "tiles" / f"{name}.zarr")
        _tile_store(stores[-1], rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8),
                    {**SLIDE_ATTRS, "slide_id": name})
    config = FeatureConfig.from_mapping({"backbone": "resnet18", "batch_size": 2})
    for store in stores:
        extract_slide_features(store, tmp_path / "alone" / store.name, config)

    built = []
    monkeypatch.setattr(groups, "backbone_for",
                        lambda config: built.append(config) or backbone_for(config))
    extract_group_features(stores, tmp_path / "group", config, code="abc")
    assert len(built) == 1
    for store in stores:
        alone, grouped = (open_feature_store(tmp_path / folder / store.name)
                          for folder in ("alone", "group"))
        np.testing.assert_array_equal(grouped.features, alone.features)
        assert grouped.attrs == alone.attrs


def test_a_failed_group_job_keeps_its_embedded_slides_for_the_rerun(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    stores = [tmp_path / "tiles" / f"{name}.zarr" for name in ("slide_a", "slide_b", "slide_c")]
    for store in stores[:2]:
        _tile_store(store, rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
                    {**SLIDE_ATTRS, "slide_id": store.stem})
    _tile_store(stores[2], np.zeros((1, 32, 32, 3), np.uint8), {"slide_id": "slide_c"})
    config = FeatureConfig.from_mapping({"backbone": "resnet18", "batch_size": 2})
    group_dir = tmp_path / "features" / "groups" / "group-000000"
    with pytest.raises(InputError, match="slide_c.zarr"):   # it has no label
        extract_group_features(stores, group_dir, config, code="abc")
    assert not group_dir.exists()

    _tile_store(stores[2], np.zeros((1, 32, 32, 3), np.uint8),   # tiled again, labelled
                {**SLIDE_ATTRS, "slide_id": "slide_c"})
    _tile_store(stores[0], rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),  # tiled again:
                {**SLIDE_ATTRS, "slide_id": "slide_a"})   # same attrs, other tiles
    embedded = []
    monkeypatch.setattr(groups, "extract_slide_features",
                        lambda store, *args, **kwargs: embedded.append(Path(store).name)
                        or extract_slide_features(store, *args, **kwargs))
    extract_group_features(stores, group_dir, config, code="abc")
    assert embedded == ["slide_a.zarr", "slide_c.zarr"]
    for store in stores:
        features = open_feature_store(group_dir / store.name)
        assert features.attrs["slide_id"] == store.stem and len(features.features) > 0


def test_a_feature_group_embeds_again_when_its_weights_file_is_replaced(tmp_path, monkeypatch):
    stores = [tmp_path / "tiles" / f"{name}.zarr" for name in ("slide_a", "slide_b")]
    for store in stores:
        _tile_store(store, np.zeros((1, 32, 32, 3), np.uint8), {**SLIDE_ATTRS, "slide_id": store.stem})
    weights = tmp_path / "pathology.safetensors"
    weights.write_bytes(b"first")
    config = FeatureConfig.from_mapping({"backbone": "resnet18", "weights": str(weights)})
    embedded, failing = [], {"slide_b.zarr"}

    def embed(store, out, *args, **kwargs):   # stands in for the backbone's forward passes
        embedded.append(Path(store).name)
        if Path(store).name in failing:
            raise InputError(f"{store}: unreadable")
        Path(out).mkdir()

    monkeypatch.setattr(groups, "backbone_for", lambda config: "backbone")
    monkeypatch.setattr(groups, "extract_slide_features", embed)
    group_dir = tmp_path / "features" / "groups" / "group-000000"
    with pytest.raises(InputError):
        extract_group_features(stores, group_dir, config, code="abc")
    failing.clear()
    weights.write_bytes(b"other")   # same name and size, new weights
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    embedded.clear()
    extract_group_features(stores, group_dir, config, code="abc")
    assert embedded == ["slide_a.zarr", "slide_b.zarr"]


def test_tile_store_without_labels_is_an_input_error(tmp_path):
    _tile_store(tmp_path / "tiles.zarr", np.zeros((1, 32, 32, 3), np.uint8),
                attrs={"slide_id": "slide_a"})
    with pytest.raises(InputError, match="label, split"):
        extract_slide_features(tmp_path / "tiles.zarr", tmp_path / "features.zarr",
                               FeatureConfig())
    assert not (tmp_path / "features.zarr").exists()


# --- the loader and the precision ---------------------------------------------------------


@pytest.mark.parametrize("workers, prefetch", [(0, 1), (1, 1), (2, 3), (4, 8)])
def test_tile_batches_come_in_order_and_cover_every_tile_once(workers, prefetch):
    tiles = np.arange(11 * 2 * 2 * 3, dtype=np.uint8).reshape(11, 2, 2, 3)
    batches = TileBatches(tiles, 4, workers=workers, prefetch=prefetch)
    got = list(batches)
    assert len(batches) == 3
    assert [start for start, _ in got] == [0, 4, 8]
    assert [len(batch) for _, batch in got] == [4, 4, 3]
    np.testing.assert_array_equal(torch.cat([batch for _, batch in got]).numpy(), tiles)


@pytest.mark.parametrize("workers", [3, 4])
def test_the_readers_share_each_batch_in_parts_of_whole_shards(workers):
    both_halves = threading.Barrier(2, timeout=10)
    reads = []

    class Halves:  # passes only once two threads read the first batch's halves at the same time
        shape = (2 * 128 + 5, 2, 2, 3)

        def __getitem__(self, positions):
            reads.append((int(positions[0]), len(positions)))
            if positions[0] < 128:
                both_halves.wait()
            return np.zeros((len(positions), 2, 2, 3), np.uint8)

    # 3 or 4 readers, yet parts of a shard (64 tiles), not of 43 or 32
    batches = list(TileBatches(Halves(), 128, workers=workers, prefetch=1))
    assert [len(batch) for _, batch in batches] == [128, 128, 5]
    assert sorted(reads) == [(0, 64), (64, 64), (128, 64), (192, 64), (256, 5)]


def test_a_consumer_that_stops_early_leaves_no_reader_behind():
    reads = []

    class Counting:  # an array that records which batches were read
        shape = (100, 2, 2, 3)

        def __getitem__(self, positions):
            reads.append(positions[0])
            return np.zeros((len(positions), 2, 2, 3), np.uint8)

    for start, _ in TileBatches(Counting(), 5, workers=1, prefetch=2):
        if start == 5:
            break
    # read ahead by at most `prefetch` (+ the one being handed out), never the whole array
    assert len(reads) <= 5


def test_auto_precision_is_bf16_on_cuda_and_fp32_on_cpu():
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert autocast_dtype("fp32", torch.device("cuda")) is None
    assert autocast_dtype("fp16", torch.device("cpu")) == torch.float16


def _plain_forward(name, tiles, **options):
    """The definition: a freshly built backbone on float tiles in [0, 1], NCHW, fp32."""
    backbone = build_backbone(name, "random", seed=0, **options)
    with torch.no_grad():
        return backbone.model(torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255).numpy()


def test_an_in_memory_batch_embeds_as_the_plain_forward_and_bf16_is_really_bf16():
    tiles = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    expected = _plain_forward("resnet18", tiles)
    backbone = build_backbone("resnet18", "random", seed=0)
    np.testing.assert_allclose(embed_batch(backbone, tiles, "cpu"), expected,
                               rtol=1e-4, atol=1e-5)
    reduced = embed_batch(backbone, torch.from_numpy(tiles), "cpu", precision="bf16")
    assert reduced.dtype == np.float32
    # bf16 keeps 8 bits of mantissa: close, yet not the fp32 numbers
    assert not np.allclose(reduced, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(reduced, expected, rtol=0.1, atol=0.05 * np.abs(expected).max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_on_a_gpu_the_store_embeds_as_on_the_cpu(tmp_path, precision):
    tiles = np.random.default_rng(4).integers(0, 256, (70, 32, 32, 3), dtype=np.uint8)
    _tile_store(tmp_path / "tiles.zarr", tiles)
    config = FeatureConfig(batch_size=16, precision=precision, loader_workers=2)
    extract_slide_features(tmp_path / "tiles.zarr", tmp_path / "features.zarr", config, "cuda")
    features = open_feature_store(tmp_path / "features.zarr").features
    expected = _plain_forward("resnet18", tiles)
    # cuDNN convolutions take TF32 by default on Ampere and newer: close, not equal; bf16 looser
    tolerance = 1e-2 if precision == "fp32" else 0.1
    np.testing.assert_allclose(features, expected, rtol=tolerance,
                               atol=tolerance * np.abs(expected).max())


# --- backbones: the CLAM/TRIDENT baseline, timm, local weight files ----------------------


def _layer3_features(resnet, tiles):
    """ResNet50 cut after layer3 and average-pooled, written out from its definition."""
    x = (tiles - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / \
        torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
    x = resnet.layer3(resnet.layer2(resnet.layer1(x)))
    return x.mean(dim=(2, 3))


def test_resnet50_layer3_is_resnet50_cut_after_layer3_and_pooled():
    backbone = build_backbone("resnet50_layer3", "random", seed=3)
    torch.manual_seed(3)
    resnet = torchvision.models.resnet50().eval()
    tiles = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = _layer3_features(resnet, tiles)
        assert backbone.dim == 1024
        torch.testing.assert_close(backbone.model(tiles), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_local_weights_file_is_loaded_weights_only(tmp_path, suffix):
    torch.manual_seed(7)
    resnet = torchvision.models.resnet50().eval()
    path = tmp_path / f"resnet50{suffix}"
    state = {key: value.contiguous() for key, value in resnet.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    backbone = build_backbone("resnet50_layer3", str(path))
    tiles = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone.model(tiles), _layer3_features(resnet, tiles),
                                   rtol=1e-4, atol=1e-5)
    assert backbone.weights == str(path)
    assert backbone.weights_sha256 != build_backbone("resnet50_layer3").weights_sha256


def test_a_weights_file_that_holds_a_pickled_object_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"conv1.weight": torch.zeros(1), "evil": print}, path)  # not weights-only
    with pytest.raises(InputError, match=f"{path}: not a readable weights file"):
        build_backbone("resnet18", str(path))


def test_bad_weights_files_are_named_with_what_is_wrong(tmp_path):
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(InputError, match=f"{missing}: no such weights file"):
        build_backbone("resnet50_layer3", str(missing))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match=f"{garbage}: not a readable weights file"):
        build_backbone("resnet50_layer3", str(garbage))
    state = torchvision.models.resnet18().state_dict()
    partial = tmp_path / "partial.pth"
    torch.save({key: value for key, value in state.items() if not key.startswith("layer4")},
               partial)
    with pytest.raises(InputError, match=rf"{partial}: the weights do not fit torchvision's "
                                         r"resnet18 \(missing: layer4"):
        build_backbone("resnet18", str(partial))
    extra = tmp_path / "extra.pth"
    torch.save({**state, "head.weight": torch.zeros(2, 2)}, extra)
    with pytest.raises(InputError, match=r"unexpected: head\.weight"):
        build_backbone("resnet18", str(extra))


def test_a_timm_backbone_is_the_timm_model_without_its_classifier():
    backbone = build_backbone("timm:test_resnet", "random", seed=5)
    torch.manual_seed(5)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=0).eval()
    config = model.pretrained_cfg
    assert (backbone.mean, backbone.std) == (tuple(config["mean"]), tuple(config["std"]))
    tiles = torch.rand(2, 3, 32, 32)
    normalised = (tiles - torch.tensor(config["mean"]).view(1, 3, 1, 1)) / \
        torch.tensor(config["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model(normalised)
        assert backbone.dim == model.num_features == expected.shape[1]
        torch.testing.assert_close(backbone.model(tiles), expected, rtol=1e-4, atol=1e-5)
    assert build_backbone("timm:test_resnet", seed=5).weights_sha256 == backbone.weights_sha256
    assert build_backbone("timm:test_resnet", seed=6).weights_sha256 != backbone.weights_sha256


def test_a_timm_backbone_takes_model_kwargs_a_weights_file_and_a_normalisation(tmp_path):
    # a ViT made for 64 px tiles, as a foundation model's config would give it
    kwargs = {"img_size": 64}
    torch.manual_seed(11)
    source = timm.create_model("test_vit", num_classes=0, **kwargs).eval()
    path = tmp_path / "vit.safetensors"
    save_file({key: value.contiguous() for key, value in source.state_dict().items()}, path)
    normalization = {"mean": [0.7, 0.6, 0.7], "std": [0.2, 0.25, 0.18]}
    backbone = build_backbone("timm:test_vit", str(path), model_kwargs=kwargs,
                              normalization=normalization)
    tiles = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    images = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(normalization["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(normalization["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = source((images - mean) / std).numpy()
    np.testing.assert_allclose(embed_batch(backbone, tiles), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match=rf"{path}: the weights do not fit timm's test_vit"):
        build_backbone("timm:test_vit", str(path))  # 160 px position embeddings: other shapes


def test_timm_names_and_keywords_are_checked():
    assert backbone_problem("timm:test_vit") is None
    assert backbone_problem("resnet50_layer3") is None
    assert "timm has no model 'no_such_net'" in backbone_problem("timm:no_such_net")
    assert "unknown feature backbone 'vit'" in backbone_problem("vit")
    with pytest.raises(ConfigError, match="timm has no model"):
        build_backbone("timm:no_such_net")
    with pytest.raises(ConfigError, match="features.model_kwargs for timm:test_resnet"):
        build_backbone("timm:test_resnet", model_kwargs={"no_such_keyword": 1})


def test_a_timm_backbone_extracts_a_slide(tmp_path):
    tiles = np.random.default_rng(3).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    _tile_store(tmp_path / "tiles.zarr", tiles)
    config = FeatureConfig.from_mapping({"backbone": "timm:test_resnet", "batch_size": 2})
    extract_slide_features(tmp_path / "tiles.zarr", tmp_path / "features.zarr", config)
    store = open_feature_store(tmp_path / "features.zarr")
    np.testing.assert_allclose(store.features, _plain_forward("timm:test_resnet", tiles),
                               rtol=1e-4, atol=1e-5)
    assert store.attrs["backbone"] == "timm:test_resnet"
