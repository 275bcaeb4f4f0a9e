"""Validate the workflow config before any job runs.

The JSON schema (workflow/schemas/config.schema.yaml) checks keys and types
and fills defaults; `check_references` then checks what a schema cannot: that
every model names a configured dataset of the right kind, and so on. All
problems are reported at once, each with the dotted path of its key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any, TypeVar

import jsonschema
import yaml

from medrobust.errors import ConfigError

T = TypeVar("T")


def config_from_mapping(cls: type[T], mapping: Mapping[str, Any], section: str) -> T:
    """Build the frozen dataclass `cls` from a config section, naming bad keys.

    Every stage's settings go through here, so an unknown or missing key gets
    the same message wherever it is.
    """
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{section}: expected a mapping, got {type(mapping).__name__}")
    fields = dataclasses.fields(cls)
    names = {field.name for field in fields}
    unknown = sorted(set(mapping) - names)
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(sorted(names))}")
    missing = [field.name for field in fields if field.name not in mapping
               and field.default is dataclasses.MISSING
               and field.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{section}: missing key(s) {', '.join(missing)}")
    return cls(**mapping)


def _with_defaults(validator_class):
    """A validator that also fills in `default` values, as Snakemake's does."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, MutableMapping):
            for key, subschema in properties.items():
                if "default" in subschema and key not in instance:
                    instance[key] = _copy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _copy(value):
    return yaml.safe_load(yaml.safe_dump(value))


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(part) for part in error.absolute_path) or "(top level)"


def _describe(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        return f"unknown key(s): {error.message.split('(')[-1].rstrip(')')}"
    return error.message


def validate_config(config: MutableMapping, schema_path: str | Path) -> MutableMapping:
    """Check `config` in place against the schema and fill defaults."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    problems = [f"{_key_path(error)}: {_describe(error)}" for error in errors]
    if not problems:
        problems = check_references(config)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return config


def check_references(config: Mapping) -> list[str]:
    """Cross-references between config sections that the schema cannot express."""
    datasets = config["datasets"]
    image_models = config.get("image_classifiers", {})
    problems = []

    def expect_dataset(section: str, name: str, model: Mapping, kind: str) -> None:
        dataset = model["dataset"]
        if dataset not in datasets:
            problems.append(f"{section}.{name}.dataset: no dataset named {dataset!r}")
        elif datasets[dataset]["kind"] != kind:
            problems.append(f"{section}.{name}.dataset: {dataset!r} is of kind "
                            f"{datasets[dataset]['kind']!r}, this model needs {kind!r}")

    for name, model in image_models.items():
        expect_dataset("image_classifiers", name, model, "images")
    for name, model in config.get("slide_classifiers", {}).items():
        expect_dataset("slide_classifiers", name, model, "slides")
        if name in image_models:
            problems.append(f"slide_classifiers.{name}: name already used by an image classifier")

    robustness = config.get("robustness", {})
    for key in ("targets", "transfer_sources"):
        for index, name in enumerate(robustness.get(key, [])):
            if name not in image_models:
                problems.append(f"robustness.{key}.{index}: no image classifier named {name!r}")
    for source in robustness.get("transfer_sources", []):
        for target in robustness.get("targets", []):
            if source in image_models and target in image_models and \
                    image_models[source]["dataset"] != image_models[target]["dataset"]:
                problems.append(f"robustness.transfer_sources: {source!r} and target {target!r} "
                                "are trained on different datasets")
    return problems
