"""The `synthetic` data source: generated datasets in real file formats.

`source.modality` picks a generator from `MODALITIES` (mammography: DICOM
files; slides: pyramidal TIFF). A generator gets its parsed source config,
the two class names (the second is the positive class) and the dataset
folder, and returns the manifest path. Every file is a function of
`source.seed` alone, so a rerun reproduces the dataset byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
from scipy import ndimage

from medrobust.data.manifest import begin_dataset
from medrobust.config import config_from_mapping
from medrobust.data.sources import register_source
from medrobust.errors import ConfigError, unknown_name


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


@register_source("synthetic")
def fetch_synthetic(dataset_config: Mapping[str, Any], out_dir: Path) -> Path:
    """Generate the dataset described by `dataset_config` into `out_dir`."""
    source = {key: value for key, value in dataset_config["source"].items()
              if key not in ("type", "modality")}
    name = dataset_config["source"].get("modality")
    if name not in MODALITIES:
        raise unknown_name("synthetic modality", name, MODALITIES)
    modality = MODALITIES[name]
    kind = dataset_config.get("kind", modality.kind)
    if kind != modality.kind:
        raise ConfigError(f"synthetic {name} data are of kind {modality.kind!r}, "
                          f"but the dataset says kind {kind!r}")
    classes = list(dataset_config.get("classes") or modality.default_classes)
    if len(classes) != 2 or len(set(classes)) != 2 or not all(isinstance(c, str) for c in classes):
        raise ConfigError(f"synthetic {name} data need two distinct class names "
                          f"(negative, positive), not {classes!r}")
    config = modality.config_type.from_mapping(source)
    return modality.generate(config, classes, begin_dataset(out_dir))


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


# Imported last: the generators register themselves with the names above.
from medrobust.data.synthetic import mammograms, slides  # noqa: E402,F401
