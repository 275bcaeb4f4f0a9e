"""Low-pass augmentation (medrobust.train.augmentation) against the Gaussian mask's definition."""

import json

import numpy as np
import pytest
import torch
from test_train_image_classifier import make_store

from medrobust.errors import ConfigError
from medrobust.train.augmentation import LowPassAugmentation
from medrobust.train.image_classifier import train_image_classifier

pytestmark = pytest.mark.usefixtures("one_thread")


def centred_mask(height: int, width: int, radius: float) -> np.ndarray:
    """exp(-d^2 / 2r^2), d the distance to the centre of the fftshift-ed spectrum, shifted
    back to fft2's layout (Oleszkiewicz et al.'s filter, written out again here)."""
    rows, cols = np.mgrid[0:height, 0:width]
    d2 = (rows - height // 2) ** 2 + (cols - width // 2) ** 2
    return np.fft.ifftshift(np.exp(-d2 / (2.0 * radius**2)))


def spectra(images: torch.Tensor) -> np.ndarray:
    return np.fft.fft2(images.double().numpy())


def test_a_filtered_batch_has_its_spectrum_multiplied_by_the_mask():
    images = torch.rand(3, 2, 24, 20, generator=torch.Generator().manual_seed(1))
    augmentation = LowPassAugmentation(probability=1.0, radius=[3.0, 3.0])
    out = augmentation.apply(images, torch.Generator().manual_seed(0))
    expected = spectra(images) * centred_mask(24, 20, 3.0)
    np.testing.assert_allclose(spectra(out), expected, atol=1e-3)
    # the mean (zero frequency) is kept, the finest detail all but gone
    assert abs(spectra(out)[0, 0, 12, 10]) < 1e-3 * abs(spectra(images)[0, 0, 12, 10])


def test_each_image_gets_its_own_radius_from_the_range():
    images = torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    out = LowPassAugmentation(probability=1.0, radius=[2.0, 8.0]).apply(
        images, torch.Generator().manual_seed(0))
    ratio = np.abs(spectra(out)[:, 0, 0, 1] / spectra(images)[:, 0, 0, 1])
    # one cycle per image along x: the mask there is exp(-1 / 2r^2)
    radii = np.sqrt(-1.0 / (2.0 * np.log(ratio)))
    assert np.all((radii > 2.0 - 1e-3) & (radii < 8.0 + 1e-3))
    assert radii.std() > 0.5
    for image, radius in zip(range(16), radii):  # and the whole spectrum follows that radius
        np.testing.assert_allclose(spectra(out)[image], spectra(images)[image]
                                   * centred_mask(32, 32, radius), atol=1e-3)


def test_probability_picks_images_and_leaves_the_others_untouched():
    images = torch.rand(400, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    out = LowPassAugmentation(probability=0.3, radius=[2.0, 4.0]).apply(
        images, torch.Generator().manual_seed(0))
    changed = (out != images).flatten(1).any(1)
    assert 0.22 < changed.float().mean() < 0.38
    assert torch.equal(out[~changed], images[~changed])
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("settings, message", [
    ({"probability": 0.0, "radius": [2, 4]}, "probability must be in"),
    ({"probability": 0.5, "radius": [4, 2]}, "radius must be"),
    ({"probability": 0.5, "radius": [0, 2]}, "radius must be"),
    ({"probability": 0.5}, "missing key"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        LowPassAugmentation.from_mapping(settings)


def test_training_with_it_runs_and_says_so(tmp_path):
    store = make_store(tmp_path / "squares.zarr", n_train=16, n_val=8, size=24)
    lowpass = {"probability": 0.5, "radius": [2, 6]}
    training = {"epochs": 1, "batch_size": 8, "learning_rate": 0.001, "weight_decay": 0.0,
                "lowpass_augment": lowpass}
    history = train_image_classifier(store, tmp_path / "model",
                                     {"dataset": "squares", "arch": "resnet22"}, training)
    assert "Fourier low-pass" in history["recipe"]["augmentation"]
    assert "random horizontal and vertical flips" in history["recipe"]["augmentation"]
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["training"]["lowpass_augment"] == lowpass
    with pytest.raises(ConfigError, match="lowpass_augment: probability"):
        train_image_classifier(store, tmp_path / "bad", {"dataset": "squares", "arch": "resnet22"},
                               {**training, "lowpass_augment": {"probability": 2, "radius": [1, 2]}})
