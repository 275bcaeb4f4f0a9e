"""Gaussian blur, JPEG and stain shift against their definitions."""

import numpy as np
import pytest
import torch
from skimage.color import hed2rgb, rgb2hed
from skimage.filters import gaussian

from medrobust.errors import ConfigError, InputError
from medrobust.perturbations import JPEG, GaussianBlur, StainShift, build_perturbation


def rng(seed=0):
    return np.random.default_rng(seed)


def random_images(n=3, channels=3, size=32, seed=1):
    return rng(seed).uniform(0.0, 1.0, (n, channels, size, size)).astype(np.float32)


def smooth_images(n=2, channels=3, size=64):
    """Soft gradients and blobs: what JPEG is made for (random noise is its worst case)."""
    y, x = np.mgrid[0:size, 0:size] / size
    images = [0.2 + 0.6 * np.stack([x * (i % channels + 1) / channels, y,
                                    0.5 + 0.3 * np.sin(6 * x + i)][:channels])
              for i in range(n)]
    return np.clip(np.stack(images), 0, 1).astype(np.float32)


def high_frequency_energy(images):
    spectrum = np.abs(np.fft.fft2(images)) ** 2
    frequencies = np.abs(np.fft.fftfreq(images.shape[-1]))
    high = (frequencies[:, None] > 0.25) | (frequencies[None, :] > 0.25)
    return spectrum[..., high].sum()


def test_blur_keeps_the_mean_and_lowers_the_high_frequency_energy():
    images = random_images()
    blurred = GaussianBlur(1.5)(images, rng())
    np.testing.assert_allclose(blurred.mean(axis=(-2, -1)), images.mean(axis=(-2, -1)), atol=0.01)
    assert high_frequency_energy(blurred) < 0.05 * high_frequency_energy(images)
    stronger = GaussianBlur(3.0)(images, rng())
    assert high_frequency_energy(stronger) < high_frequency_energy(blurred)


def test_blur_is_skimages_gaussian_filter_and_zero_is_the_identity():
    images = random_images(n=2, size=24)
    expected = np.stack([[gaussian(channel.astype(np.float64), sigma=1.2, mode="reflect",
                                   truncate=4.0) for channel in image] for image in images])
    # skimage's "reflect" is numpy's "symmetric" (the edge pixel repeated); torch's reflect
    # is numpy's "reflect": they differ at the borders only
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6))
    np.testing.assert_allclose(GaussianBlur(1.2)(images, rng())[inner], expected[inner], atol=1e-5)
    np.testing.assert_array_equal(GaussianBlur(0)(images, rng()), images)
    constant = np.full((1, 1, 8, 8), 0.4, np.float32)
    np.testing.assert_allclose(GaussianBlur(20.0)(constant, rng()), constant, atol=1e-6)


def test_jpeg_at_quality_100_is_near_the_identity_and_lower_quality_differs_more():
    images = smooth_images()
    errors = [np.abs(JPEG(quality)(images, rng()) - images).mean() for quality in (100, 50, 10)]
    assert errors[0] < 0.01
    assert errors[0] < errors[1] < errors[2]
    grey = smooth_images(channels=1)
    assert np.abs(JPEG(100)(grey, rng()) - grey).max() < 0.02
    out = JPEG(10)(images, rng())
    assert out.shape == images.shape and out.dtype == np.float32


def test_jpeg_checks_quality_and_channels():
    for quality in (0, 101, 50.5):
        with pytest.raises(ConfigError, match="quality"):
            build_perturbation("jpeg", quality)
    with pytest.raises(InputError, match="channels"):
        JPEG(50)(random_images(channels=2), rng())


def test_stain_shift_at_severity_zero_is_the_identity_and_stays_in_range():
    images = random_images()
    np.testing.assert_allclose(StainShift(0.0)(images, rng()), images, atol=1e-5)
    for severity in (0.05, 0.5, 2.0):
        out = StainShift(severity)(images, rng())
        assert out.min() >= 0.0 and out.max() <= 1.0 and out.shape == images.shape


def test_stain_shift_scales_and_shifts_each_stain_as_drawn():
    """The definition with skimage's own conversions: hed2rgb(α·rgb2hed(x) + β), α, β per image
    and stain from U(1-σ, 1+σ) and U(-σ, σ), drawn in that order."""
    # colours with positive H, E, D concentrations, where skimage's clip at 0 does not act
    images = np.clip(hed2rgb(rng(3).uniform(0.02, 0.1, (2, 16, 16, 3))), 0, 1)
    images = images.transpose(0, 3, 1, 2).astype(np.float32)
    sigma = 0.3
    draws = rng(7)
    scale = draws.uniform(1 - sigma, 1 + sigma, (2, 3))
    bias = draws.uniform(-sigma, sigma, (2, 3))
    expected = np.stack([
        np.clip(hed2rgb(rgb2hed(image.transpose(1, 2, 0).astype(np.float64)) * a + b), 0, 1)
        for image, a, b in zip(images, scale, bias)]).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(StainShift(sigma)(images, rng(7)), expected, atol=1e-5)
    with pytest.raises(InputError, match="RGB"):
        StainShift(0.1)(random_images(channels=1), rng())


@pytest.mark.parametrize("name, severity",
                         [("gaussian_blur", 2.0), ("jpeg", 30), ("stain_shift", 0.2)])
def test_torch_batches_give_the_numpy_results(name, severity):
    images = random_images()
    perturbation = build_perturbation(name, severity)
    from_numpy = perturbation(images, rng(5))
    from_torch = perturbation(torch.from_numpy(images), rng(5))
    assert isinstance(from_torch, torch.Tensor)
    np.testing.assert_allclose(from_torch.numpy(), from_numpy, atol=1e-6)
