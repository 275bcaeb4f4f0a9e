"""Gaussian noise, Fourier filters and Fourier-basis noise: their definitions, the registry,
and perturbed stores."""

import numpy as np
import pytest
import torch

from medrobust.errors import ConfigError, InputError
from medrobust.io.image_store import open_image_store, write_image_store
from medrobust.perturbations import (
    PERTURBATIONS, FourierBasisNoise, GaussianNoise, HighPass, LowPass, build_perturbation)
from medrobust.perturbations.fourier import fourier_basis, gaussian_lowpass_mask
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
    assert set(PERTURBATIONS) == {"gaussian_noise", "lowpass", "highpass", "fourier_basis",
                                  "gaussian_blur", "jpeg", "stain_shift"}
    assert isinstance(build_perturbation("lowpass", 4), LowPass)
    with pytest.raises(ConfigError, match="gaussian_noise"):
        build_perturbation("blurr", 1.0)
    with pytest.raises(ConfigError, match="radius"):
        build_perturbation("highpass", 0)
    with pytest.raises(ConfigError, match="severity"):
        build_perturbation("gaussian_noise", -0.1)
    assert build_perturbation("fourier_basis", 2.0, frequency=[3, -1]).frequency == (3, -1)
    with pytest.raises(ConfigError, match="frequency"):
        build_perturbation("fourier_basis", 2.0, frequency=[1.5, 0])
    with pytest.raises(ConfigError, match="lowpass"):
        build_perturbation("lowpass", 2.0, frequency=[1, 1])


# --- the definitions, checked in the frequency domain with numpy's FFT ------------------

@pytest.mark.parametrize("size", [(16, 16), (15, 12)])
def test_the_lowpass_mask_is_real_even_and_one_at_the_zero_frequency(size):
    mask = gaussian_lowpass_mask(*size, radius=2.5)
    # mask(-f) = mask(f): index -k mod n is the mirrored frequency
    mirrored = mask[(-np.arange(size[0])) % size[0]][:, (-np.arange(size[1])) % size[1]]
    np.testing.assert_array_equal(mask, mirrored)
    assert mask[0, 0] == 1.0 and np.all((mask > 0) & (mask <= 1))
    # exp(-d^2 / 2r^2) at d = r (frequency (0, r) for an integer radius)
    assert gaussian_lowpass_mask(16, 16, 3.0)[0, 3] == pytest.approx(np.exp(-0.5))


@pytest.mark.parametrize("filter_class", [LowPass, HighPass])
def test_filters_scale_each_frequency_by_the_mask(filter_class):
    images = random_images(n=2, channels=3, size=12)
    perturbation = filter_class(2.0)
    out = perturbation.apply(images, rng())
    assert np.isrealobj(out) and out.shape == images.shape
    expected = perturbation.mask(12, 12) * np.abs(np.fft.fft2(images.astype(np.float64)))
    np.testing.assert_allclose(np.abs(np.fft.fft2(out)), expected, atol=1e-9)


def test_lowpass_plus_highpass_is_the_identity_on_any_size():
    images = random_images(n=2, channels=1, size=9)
    total = LowPass(1.5).apply(images, rng()) + HighPass(1.5).apply(images, rng())
    np.testing.assert_allclose(total, images, atol=1e-9)


def test_torch_batches_give_the_numpy_results_on_their_device():
    images = random_images()
    for perturbation in (GaussianNoise(0.1), LowPass(2.0), HighPass(2.0),
                         FourierBasisNoise(3.0, (2, 1))):
        expected = perturbation(images, rng(4))
        out = perturbation(torch.from_numpy(images), rng(4))
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        np.testing.assert_array_equal(out.numpy(), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_the_results_are_the_cpus():
    images = random_images(n=4, channels=1, size=32)
    for perturbation in (GaussianNoise(0.1), LowPass(2.0), HighPass(2.0),
                         FourierBasisNoise(3.0, (5, -7))):
        out = perturbation(torch.from_numpy(images).cuda(), rng(4))
        assert out.is_cuda
        np.testing.assert_allclose(out.cpu().numpy(), perturbation(images, rng(4)), atol=1e-6)


@pytest.mark.parametrize("frequency", [(2, 3), (-1, 4), (0, 0), (8, 8), (8, -3), (0, 5)])
def test_the_fourier_basis_is_real_unit_norm_and_only_at_its_frequency_and_mirror(frequency):
    height = width = 16
    basis = fourier_basis(height, width, frequency).numpy()
    assert basis.dtype == np.float64 and basis.shape == (height, width)
    assert np.linalg.norm(basis) == pytest.approx(1.0)
    spectrum = np.fft.fft2(basis)
    i, j = frequency
    support = {(i % height, j % width), (-i % height, -j % width)}
    outside = np.ones((height, width), bool)
    for cell in support:
        outside[cell] = False
    np.testing.assert_allclose(spectrum[outside], 0.0, atol=1e-12)
    assert all(abs(spectrum[cell]) > 0.1 for cell in support)
    # Hermitian symmetry: F(-f) = conj(F(f)) everywhere, so the image is real
    mirrored = spectrum[(-np.arange(height)) % height][:, (-np.arange(width)) % width]
    np.testing.assert_allclose(mirrored, np.conj(spectrum), atol=1e-12)


def test_the_fourier_basis_refuses_a_frequency_beyond_the_spectrum():
    with pytest.raises(ConfigError, match="outside"):
        fourier_basis(16, 16, (9, 0))


def test_basis_noise_has_norm_v_per_channel_a_random_seeded_sign_and_one_frequency():
    images = np.full((6, 3, 16, 16), 0.5, np.float32)
    v = 2.0
    noise = FourierBasisNoise(v, (3, -2)).apply(images, rng(5)) - images
    np.testing.assert_allclose(np.linalg.norm(noise, axis=(-2, -1)), v, rtol=1e-6)
    basis = fourier_basis(16, 16, (3, -2)).numpy()
    signs = np.einsum("ncij,ij->nc", noise, basis) / v
    np.testing.assert_allclose(np.abs(signs), 1.0, rtol=1e-6)  # noise = ±v·U per channel
    assert len(np.unique(signs.round())) == 2  # both signs occur over 18 channels
    np.testing.assert_array_equal(np.sign(signs), rng(5).choice([-1.0, 1.0], size=(6, 3)))
    again = FourierBasisNoise(v, (3, -2)).apply(images, rng(5)) - images
    np.testing.assert_array_equal(noise, again)
    clipped = FourierBasisNoise(50.0, (3, -2))(images, rng(5))
    assert clipped.min() == 0.0 and clipped.max() == 1.0


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
