"""The `local` source: a folder the user already has plus a labels table.

The labels table (CSV or TSV) names each file and its label. The folder is linked, not copied, into
`resources/{dataset}/data`, so the manifest's relative paths resolve without
duplicating gigabytes. Labels pass through `label_map` and must then name one
of the dataset's classes; anything else is an InputError naming the table row.
The table parsing and manifest writing it shares with the other sources live
in `medrobust.data.assemble`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from medrobust.config import config_from_mapping
from medrobust.data.assemble import (
    DEFAULT_SPLITS,
    LabelsTable,
    assign_splits,
    config_classes,
    config_kind,
    link_folder,
    source_section,
    write_samples,
)
from medrobust.data.manifest import begin_dataset
from medrobust.data.sources import register_source
from medrobust.errors import ConfigError


@dataclass(frozen=True)
class LocalSource:
    root: str
    labels: Mapping[str, Any]
    splits: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_SPLITS))
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.root, str) or not self.root:
            raise ConfigError(f"source (local): root must be the path of a folder, not "
                              f"{self.root!r}")


@register_source("local", LocalSource)
def fetch_local(dataset_config: Mapping[str, Any], out_dir: Path) -> Path:
    options = config_from_mapping(LocalSource, source_section(dataset_config), "source (local)")
    labels = LabelsTable.from_mapping(options.labels)
    classes, kind = config_classes(dataset_config), config_kind(dataset_config)
    out_dir = begin_dataset(out_dir)
    data_root = link_folder(options.root, out_dir / "data")
    samples = labels.read(data_root, classes)
    samples = assign_splits(samples, options.splits, options.seed)
    return write_samples(out_dir, samples, classes, kind)
