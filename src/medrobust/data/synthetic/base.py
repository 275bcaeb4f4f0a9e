"""What the synthetic generators share: their config base, the modality registry, noise.

Generators (`mammograms`, `slides`) import from here and register a
modality; `medrobust.data.synthetic` imports them and dispatches on
`source.modality`, so no module imports one that imports it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
from scipy import ndimage

from medrobust.config import config_from_mapping
from medrobust.errors import ConfigError


class SourceConfig:
    """Base of the generators' frozen dataclass configs."""

    where: ClassVar[str]  # names the config section in error messages

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]):
        return config_from_mapping(cls, mapping, cls.where)

    def check_int(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{self.where}: {name} must be an integer >= {minimum}, "
                              f"not {value!r}")

    def check_number(self, name: str, low: float, high: float) -> None:
        value = getattr(self, name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not low <= value <= high:
            raise ConfigError(f"{self.where}: {name} must be a number in [{low:g}, {high:g}], "
                              f"not {value!r}")


Generator = Callable[[Any, list[str], Path], Path]


@dataclass(frozen=True)
class Modality:
    kind: str                          # the dataset kind in dataset.json
    default_classes: tuple[str, str]   # (negative, positive)
    config_type: type[SourceConfig]
    generate: Generator


MODALITIES: dict[str, Modality] = {}


def register_modality(name: str, kind: str, default_classes: tuple[str, str],
                      config_type: type[SourceConfig]) -> Callable[[Generator], Generator]:
    def add(generate: Generator) -> Generator:
        MODALITIES[name] = Modality(kind, default_classes, config_type, generate)
        return generate

    return add


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Unit-variance Gaussian noise smoothed into blobs about `sigma` pixels wide.

    The noise is smoothed on a grid subsampled to about sigma/2 per cell and
    zoomed back, which keeps wide blobs cheap.
    """
    step = max(1, int(sigma // 2))
    small = (-(-shape[0] // step), -(-shape[1] // step))
    noise = ndimage.gaussian_filter(rng.standard_normal(small), sigma / step, mode="wrap")
    noise = ndimage.zoom(noise, step, order=1)[:shape[0], :shape[1]]
    return ((noise - noise.mean()) / (noise.std() + 1e-12)).astype(np.float32)
