"""Gaussian noise and Fourier filters: their properties, the registry, and perturbed stores."""

import numpy as np
import pytest

from medrobust.errors import ConfigError, InputError
from medrobust.io.image_store import open_image_store, write_image_store
from medrobust.perturbations import PERTURBATIONS, GaussianNoise, HighPass, LowPass, build_perturbation
from medrobust.perturbations.run import perturb_store, perturbation_run


def rng(seed=0):
    return np.random.default_rng(seed)


def random_images(n=3, channels=2, size=16, seed=1):
    return rng(seed).uniform(0.0, 1.0, (n, channels, size, size)).astype(np.float32)


def test_gaussian_noise_has_the_severity_as_std_and_is_seeded():
    images = np.full((4, 1, 32, 32), 0.5, np.float32)
    noisy = GaussianNoise(0.05)(images, rng(0))
    assert noisy.dtype == np.float32 and noisy.shape == images.shape
    assert np.std(noisy - images) == pytest.approx(0.05, rel=0.05)
    assert abs(np.mean(noisy - images)) < 0.005
    np.testing.assert_array_equal(noisy, GaussianNoise(0.05)(images, rng(0)))
    assert not np.array_equal(noisy, GaussianNoise(0.05)(images, rng(1)))


def test_perturbations_clip_to_the_unit_range():
    images = random_images()
    for perturbation in (GaussianNoise(1.0), HighPass(2.0), LowPass(1.0)):
        out = perturbation(images, rng())
        assert out.min() >= 0.0 and out.max() <= 1.0


def test_lowpass_keeps_a_constant_image_and_removes_the_finest_detail():
    constant = np.full((1, 1, 16, 16), 0.3, np.float32)
    np.testing.assert_allclose(LowPass(2.0)(constant, rng()), constant, atol=1e-6)
    checkerboard = (np.indices((16, 16)).sum(axis=0) % 2).astype(np.float32)[None, None]
    smoothed = LowPass(2.0)(checkerboard, rng())
    np.testing.assert_allclose(smoothed, 0.5, atol=1e-6)


def test_lowpass_with_a_huge_radius_is_the_identity():
    images = random_images()
    np.testing.assert_allclose(LowPass(1e6)(images, rng()), images, atol=1e-5)


def test_highpass_removes_the_mean_and_complements_the_lowpass():
    images = random_images()
    high = HighPass(3.0).apply(images, rng())
    np.testing.assert_allclose(high.mean(axis=(-2, -1)), 0.0, atol=1e-9)
    low = LowPass(3.0).apply(images, rng())
    np.testing.assert_allclose(low + high, images, atol=1e-6)


def test_registry_and_severity_checks():
    assert set(PERTURBATIONS) == {"gaussian_noise", "lowpass", "highpass"}
    assert isinstance(build_perturbation("lowpass", 4), LowPass)
    with pytest.raises(ConfigError, match="gaussian_noise"):
        build_perturbation("blur", 1.0)
    with pytest.raises(ConfigError, match="radius"):
        build_perturbation("highpass", 0)
    with pytest.raises(ConfigError, match="severity"):
        build_perturbation("gaussian_noise", -0.1)


def write_clean_store(path, splits):
    images = random_images(n=len(splits), channels=1, size=8, seed=3)
    labels = np.arange(len(splits)) % 2
    ids = [f"s{i}" for i in range(len(splits))]
    write_image_store(path, images, labels, splits, ids,
                      {"dataset": "mammograms", "classes": ["benign", "malignant"], "image_size": 8})
    return images, labels


def test_perturb_store_writes_the_perturbed_test_split(tmp_path):
    splits = ["train", "test", "test", "val", "test", "test", "test"]
    images, labels = write_clean_store(tmp_path / "clean.zarr", splits)
    test = [i for i, split in enumerate(splits) if split == "test"]

    perturb_store(tmp_path / "clean.zarr", tmp_path / "a.zarr", "gaussian_noise", 0.1, seed=7,
                  batch_size=2)
    perturb_store(tmp_path / "clean.zarr", tmp_path / "b.zarr", "gaussian_noise", 0.1, seed=7,
                  batch_size=64)

    store = open_image_store(tmp_path / "a.zarr")
    assert list(store.sample_ids) == [f"s{i}" for i in test]
    assert list(store.labels) == list(labels[test]) and set(store.splits) == {"test"}
    assert store.attrs["perturbation"] == "gaussian_noise" and store.attrs["severity"] == 0.1
    assert store.attrs["seed"] == 7 and store.attrs["dataset"] == "mammograms"
    assert store.classes == ["benign", "malignant"] and store.attrs["image_size"] == 8
    perturbed, _ = store.load()
    expected = GaussianNoise(0.1)(images[test], np.random.default_rng(7))
    np.testing.assert_array_equal(perturbed, expected)
    # the seed fixes the noise, whatever the batch size
    np.testing.assert_array_equal(open_image_store(tmp_path / "b.zarr").load()[0], perturbed)


def test_a_perturbation_run_holds_one_store_per_severity(tmp_path):
    images, _ = write_clean_store(tmp_path / "clean.zarr", ["test", "test", "train"])
    perturbation_run(tmp_path / "clean.zarr", tmp_path / "noise", "gaussian_noise",
                     [0.05, 1e-5], seed=3)
    assert sorted(path.name for path in (tmp_path / "noise").iterdir()) == [
        "severity0.00001.zarr", "severity0.05.zarr"]
    for severity, name in ((0.05, "severity0.05.zarr"), (1e-5, "severity0.00001.zarr")):
        store = open_image_store(tmp_path / "noise" / name)
        assert store.attrs["severity"] == severity
        expected = GaussianNoise(severity)(images[:2], np.random.default_rng(3))
        np.testing.assert_array_equal(store.load()[0], expected)


def test_a_perturbation_run_that_fails_leaves_no_folder(tmp_path):
    write_clean_store(tmp_path / "clean.zarr", ["test", "train"])
    with pytest.raises(Exception):
        perturbation_run(tmp_path / "clean.zarr", tmp_path / "noise", "gaussian_noise",
                         [0.05, -1.0], seed=0)
    assert not (tmp_path / "noise").exists() and list(tmp_path.glob(".noise*")) == []


def test_perturb_store_rejects_a_store_without_test_samples(tmp_path):
    write_clean_store(tmp_path / "clean.zarr", ["train", "val"])
    with pytest.raises(InputError, match="no test samples"):
        perturb_store(tmp_path / "clean.zarr", tmp_path / "out.zarr", "lowpass", 2.0, seed=0)
    assert not (tmp_path / "out.zarr").exists()
