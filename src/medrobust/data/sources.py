"""Registry of data sources: a config `source.type` names one fetcher.

A fetcher takes the dataset's config section and the dataset folder
(`resources/{dataset}/`), puts the raw files there and writes
`manifest.csv` (see `medrobust.data.manifest`). It returns the manifest path.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping

from medrobust.config import config_from_mapping
from medrobust.data.assemble import LabelsTable, source_section
from medrobust.data.download import RetryPolicy
from medrobust.data.manifest import SPLITS, check_split_fractions, read_manifest
from medrobust.errors import ConfigError, unknown_name
from medrobust.logs import get_logger

log = get_logger(__name__)

Fetcher = Callable[[Mapping[str, Any], Path], Path]
SOURCES: dict[str, Fetcher] = {}
# each source's settings class (a frozen dataclass, with `from_mapping` where it checks more),
# so that `check_source_settings` can check a config before any job runs
SOURCE_SETTINGS: dict[str, type] = {}


def register_source(name: str, settings: type | None = None) -> Callable[[Fetcher], Fetcher]:
    def add(fetcher: Fetcher) -> Fetcher:
        SOURCES[name] = fetcher
        if settings is not None:
            SOURCE_SETTINGS[name] = settings
        return fetcher

    return add


def check_source_settings(source: Mapping[str, Any]) -> None:
    """ConfigError for a wrong setting of a registered source, found without touching disk
    or network: its settings class, and the sections several sources share (`labels`,
    `splits`, `download`), as the fetcher will read them."""
    _load_builtin_sources()
    cls = SOURCE_SETTINGS.get(source["type"])
    if cls is None:
        return
    section = source_section({"source": source})
    settings = (cls.from_mapping(section) if hasattr(cls, "from_mapping")
                else config_from_mapping(cls, section, f"source ({source['type']})"))
    if hasattr(settings, "labels"):
        LabelsTable.from_mapping(settings.labels)
    if getattr(settings, "splits", None) is not None:
        check_split_fractions(settings.splits)
    if hasattr(settings, "download"):
        RetryPolicy.from_mapping(settings.download)


def fetch_dataset(dataset_config: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Fetch one dataset into `out_dir` and return its manifest path."""
    _load_builtin_sources()
    source = dataset_config.get("source")
    if not isinstance(source, Mapping) or "type" not in source:
        raise ConfigError("dataset config needs a `source` with a `type`")
    try:
        fetcher = SOURCES[source["type"]]
    except KeyError:
        raise unknown_name("data source", source["type"], SOURCES) from None
    started = time.perf_counter()
    manifest_path = fetcher(dataset_config, Path(out_dir))
    _log_fetched(source["type"], manifest_path, time.perf_counter() - started)
    return manifest_path


def _log_fetched(source_type: str, manifest_path: Path, seconds: float) -> None:
    manifest = read_manifest(manifest_path)
    splits = manifest.table["split"].value_counts()
    log.info("%s: %d %s from source %r (%s; classes %s) in %.1f s", manifest_path.parent,
             len(manifest.table), manifest.kind, source_type,
             ", ".join(f"{split} {splits.get(split, 0)}" for split in SPLITS),
             ", ".join(manifest.classes), seconds)


def _load_builtin_sources() -> None:
    # importing the modules registers their sources
    from medrobust.data import http, local, recipes, synthetic  # noqa: F401
