"""Raw files to Zarr stores: image datasets to one image store, slides to tile stores."""

from __future__ import annotations

from typing import Any

from medrobust.errors import ConfigError


def positive_number(value: Any, key: str, integer: bool = False) -> None:
    """ConfigError unless `value` is a number > 0 (an int when `integer`)."""
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        what = "a positive integer" if integer else "a positive number"
        raise ConfigError(f"{key} must be {what}, not {value!r}")

