"""The `synthetic` data source: generated datasets in real file formats.

`source.modality` picks a generator from `MODALITIES` (mammography: DICOM
files; slides: pyramidal TIFF); generators register themselves there with
`base.register_modality`. A generator gets its parsed source config,
the two class names (the second is the positive class) and the dataset
folder, and returns the manifest path. Every file is a function of
`source.seed` alone, so a rerun reproduces the dataset byte for byte.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from medrobust.data.manifest import begin_dataset
from medrobust.data.sources import register_source
from medrobust.data.synthetic import mammograms, slides  # noqa: F401  (registers them)
from medrobust.data.synthetic.base import MODALITIES
from medrobust.errors import ConfigError, unknown_name


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
