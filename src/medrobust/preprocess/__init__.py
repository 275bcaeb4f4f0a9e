"""Raw files to Zarr stores: image datasets to one image store, slides to tile stores."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

from medrobust.errors import ConfigError

T = TypeVar("T")


def config_from_mapping(cls: type[T], mapping: Mapping[str, Any], section: str) -> T:
    """Build the frozen dataclass `cls` from a config section, naming bad keys."""
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{section}: expected a mapping, got {type(mapping).__name__}")
    fields = dataclasses.fields(cls)
    names = {field.name for field in fields}
    unknown = sorted(set(mapping) - names)
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(sorted(names))}")
    missing = [field.name for field in fields if field.name not in mapping
               and field.default is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{section}: missing key(s) {', '.join(missing)}")
    return cls(**mapping)


def positive_number(value: Any, key: str, integer: bool = False) -> None:
    """ConfigError unless `value` is a number > 0 (an int when `integer`)."""
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        what = "a positive integer" if integer else "a positive number"
        raise ConfigError(f"{key} must be {what}, not {value!r}")

