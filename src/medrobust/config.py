"""Validate the workflow config before any job runs.

Three passes, every problem reported at once with the dotted path of its key:

1. the JSON schema (workflow/schemas/config.schema.yaml) checks keys, types
   and ranges and fills defaults;
2. `check_references` checks what a schema cannot: every model and denoiser
   names a configured dataset of the right kind, an image classifier's
   `pretrained` weights file exists, a classifier's denoiser and a denoiser's
   classifiers exist on the same dataset, robustness and slide_attention name
   configured models, evaluation conditions get distinct names;
3. `check_registries` checks every name that selects code (attack,
   perturbation, defense, denoiser kind, image and slide architecture,
   feature backbone, source type, synthetic modality) against the package's
   registries, and every attack, defense and denoiser parameter and the slide
   robustness settings against the class that takes them.

The top-level `seed` goes to everything random that sets no seed of its
own: models, denoisers, dataset sources, the feature backbone
and the adversarial tiles of `slide_robustness` (`resolve_seeds`) and the
attacks whose Params take a `seed`
(`registry_facts`). The registries import torch (5-10 s), so
`validate_config` can remember a config that passed them:
with a `cache_dir`, a marker named by the hash of what pass 3 reads and of
the package's code (holding the registry facts) skips the imports on the next
parse of the same config with the same code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any, TypeVar

import jsonschema
import yaml

from medrobust.errors import ConfigError, unknown_name

T = TypeVar("T")

# Names that become parts of paths (datasets, models, attacks, perturbations,
# backbones); the schema's `$defs/name` holds the same pattern.
NAME_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9_-][A-Za-z0-9_.-]*$"
# `features.backbone`: a name, or `timm:` and a timm model's name (a path part too)
BACKBONE_PATTERN = r"^(timm:)?" + NAME_PATTERN[1:]
# Keys of an `attacks:` entry that the workflow reads; the others are the attack's Params.
WORKFLOW_ATTACK_KEYS = ("epsilons",)
# Keys of a `denoisers:` entry that name image classifiers its training needs (HGD's guide
# and source; each kind's `models` is a subset): the workflow makes them inputs of the
# training without importing the registries.
DENOISER_MODEL_KEYS = ("guide", "source")


# `pretrained` of an image classifier: these names, or the path of a weights file
PRETRAINED = ("none", "imagenet")
# `weights` of the feature backbone: these names, or the path of a weights file
FEATURE_WEIGHTS = ("random", "imagenet")
# `features` keys that change how fast features are made, not what they are: kept out of
# the rule's params, so tuning them re-extracts nothing
FEATURE_LOADER_KEYS = ("loader_workers", "prefetch_batches")


def pretrained_problem(value: str, names: tuple[str, ...] = PRETRAINED,
                       key: str = "pretrained") -> str | None:
    """Why `value` cannot be an image classifier's `pretrained` (or, with `names` and
    `key`, the feature backbone's `weights`), or None.

    A file is checked here, when the workflow is parsed, for existence only:
    whether its weights fit the architecture is known when the model is built.
    """
    if value in names or Path(value).is_file():
        return None
    where = ("" if Path(value).is_absolute()
             else f" (relative to the working directory {os.getcwd()})")
    return (f"no weights file {value!r}{where}; "
            f"{key} takes {', '.join(names)} or the path of a weights file")


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
                          f"allowed: {', '.join(sorted(names)) or 'none'}")
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
                if isinstance(subschema, Mapping) and "default" in subschema \
                        and key not in instance:
                    instance[key] = _copy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _copy(value):
    return yaml.safe_load(yaml.safe_dump(value))


def _describe(error: jsonschema.ValidationError) -> str:
    if isinstance(error.schema, Mapping) and "x-message" in error.schema:
        return error.schema["x-message"]
    if error.validator == "additionalProperties":
        return f"unknown key(s): {error.message.split('(')[-1].rstrip(')')}"
    if error.validator == "pattern" and error.schema.get("pattern") in (NAME_PATTERN,
                                                                        BACKBONE_PATTERN):
        return (f"{error.instance!r} cannot be a name: names become parts of paths and "
                "may hold only letters, digits, '_', '-' and '.', not start with '.' "
                "nor contain '..'")
    return error.message


def _schema_errors(config: MutableMapping, schema: Mapping) -> list[str]:
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    problems = []
    for error in validator.iter_errors(config):
        path = [str(part) for part in error.absolute_path]
        if "propertyNames" in error.absolute_schema_path:
            path.append(str(error.instance))  # a bad name: the error is about the key itself
        problems.append((path, _describe(error)))
    return [f"{_dotted(path)}: {message}" for path, message in sorted(problems)]


# the largest seed every consumer takes (numpy's legacy seeding; torch takes up to 2^64 - 1,
# and folds and draws add to a seed)
MAX_SEED = 2**32 - 1


def _value_errors(value: Any, path: list[str]) -> list[str]:
    """What the schema does not say: NaN and infinity (every comparison with NaN is false, so
    `minimum` lets it through), and seeds past MAX_SEED anywhere in the config, also in the
    sections whose parameters the registries' classes check (an attack's seed)."""
    if isinstance(value, Mapping):
        return [problem for key, item in value.items()
                for problem in _value_errors(item, [*path, str(key)])]
    if isinstance(value, list):
        return [problem for index, item in enumerate(value)
                for problem in _value_errors(item, [*path, str(index)])]
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{_dotted(path)}: {value} is not a finite number"]
    if path and path[-1] == "seed" and isinstance(value, int) and value > MAX_SEED:
        return [f"{_dotted(path)}: {value} is larger than the largest seed, {MAX_SEED}"]
    return []


def _dotted(path: list[str]) -> str:
    """`attacks.fgsm.epsilons.0`; a part that is no valid name is quoted: `attacks.'../x'`."""
    return ".".join(part if re.match(NAME_PATTERN, part) else repr(part)
                    for part in path) or "(top level)"


def validate_config(config: MutableMapping, schema_path: str | os.PathLike,
                    cache_dir: str | os.PathLike | None = None) -> MutableMapping:
    """Check `config` in place, fill defaults and seeds; ConfigError listing every problem.

    `cache_dir` (the workflow passes `.snakemake/medrobust/`) remembers configs
    that passed the registry checks, see the module docstring.
    """
    schema = yaml.safe_load(Path(schema_path).read_text())
    problems = _schema_errors(config, schema) + _value_errors(config, [])
    if not problems:
        resolve_seeds(config)
        problems = check_references(config) + check_registries_cached(config, cache_dir)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return config


def resolve_seeds(config: MutableMapping) -> MutableMapping:
    """The top-level `seed` for every model, denoiser, dataset source and backbone that sets
    none."""
    seed = config["seed"]
    for section in ("image_classifiers", "slide_classifiers", "denoisers"):
        for model in config.get(section, {}).values():
            model.setdefault("seed", seed)
    for dataset in config["datasets"].values():
        dataset["source"].setdefault("seed", seed)
    config.setdefault("features", {}).setdefault("seed", seed)
    adversarial_tiles = config.get("slide_robustness", {}).get("adversarial")
    if adversarial_tiles is not None:
        adversarial_tiles.setdefault("seed", seed)
    return config


def check_references(config: Mapping) -> list[str]:
    """Cross-references between config sections that the schema cannot express."""
    datasets = config["datasets"]
    image_models = config.get("image_classifiers", {})
    problems = []

    def expect_dataset(section: str, name: str, model: Mapping, kind: str) -> None:
        dataset = model["dataset"]
        if dataset not in datasets:
            problems.append(f"{section}.{name}.dataset: no dataset named {dataset!r}; "
                            f"known: {', '.join(sorted(datasets))}")
        elif datasets[dataset]["kind"] != kind:
            problems.append(f"{section}.{name}.dataset: {dataset!r} is of kind "
                            f"{datasets[dataset]['kind']!r}, this model needs {kind!r}")

    for name, model in image_models.items():
        expect_dataset("image_classifiers", name, model, "images")
        problem = pretrained_problem(model.get("pretrained", "none"))
        if problem:  # a file, so never remembered with the registry checks
            problems.append(f"image_classifiers.{name}.pretrained: {problem}")
    features = config.get("features", {})
    problem = pretrained_problem(features.get("weights", "random"), FEATURE_WEIGHTS, "weights")
    if problem:
        problems.append(f"features.weights: {problem}")
    if features.get("model_kwargs") and not features.get("backbone", "").startswith("timm:"):
        problems.append(f"features.model_kwargs: applies to timm backbones only, not "
                        f"{features.get('backbone')}")
    problems += _check_denoiser_references(config)
    for name, denoiser in config.get("denoisers", {}).items():
        expect_dataset("denoisers", name, denoiser, "images")
    slide_models = config.get("slide_classifiers", {})
    for name, model in slide_models.items():
        expect_dataset("slide_classifiers", name, model, "slides")
        if name in image_models:
            problems.append(f"slide_classifiers.{name}: name already used by an image classifier")
        problems += _check_mhim_teacher(name, model, slide_models)

    for section in ("slide_attention", "slide_robustness"):
        for index, name in enumerate((config.get(section) or {}).get("models") or []):
            if name not in slide_models:
                problems.append(f"{section}.models.{index}: no slide classifier named {name!r}")

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

    for section, key in (("attacks", "epsilons"), ("perturbations", "severities")):
        for name, settings in config.get(section, {}).items():
            for index, value in enumerate(settings[key]):
                if not math.isfinite(value):
                    problems.append(f"{section}.{name}.{key}.{index}: {value!r} is not a finite number")
    if not problems:
        from medrobust.conditions import all_conditions

        try:
            all_conditions(config)
        except ConfigError as error:
            problems.append(f"attacks / perturbations: {error}")
    return problems


def _check_mhim_teacher(name: str, model: Mapping, slide_models: Mapping) -> list[str]:
    """An MHIM model's teacher is a plain slide classifier of the same architecture and data:
    its weights are loaded into a copy of the student."""
    if "mhim" not in model:
        return []
    teacher = model["mhim"]["teacher"]
    path = f"slide_classifiers.{name}.mhim.teacher"
    if teacher not in slide_models:
        return [f"{path}: no slide classifier named {teacher!r}"]
    other = slide_models[teacher]
    if "mhim" in other:
        return [f"{path}: {teacher!r} is itself trained by MHIM-MIL; name its plain baseline"]
    return [f"{path}: {teacher!r} has {key} {other.get(key)!r}, this model {model.get(key)!r}; "
            f"they must agree" for key in ("dataset", "arch", "arch_options")
            + (("cv_folds",) if model.get("cv_folds") else ())  # each fold's teacher: its fold
            if other.get(key) != model.get(key)]


def _check_denoiser_references(config: Mapping) -> list[str]:
    """A classifier's denoiser, and the classifiers a denoiser needs, exist on its dataset."""
    image_models = config.get("image_classifiers", {})
    denoisers = config.get("denoisers", {})
    problems = []

    def same_dataset(path: str, what: str, dataset: str, other: str) -> None:
        if dataset != other:
            problems.append(f"{path}: {what} is trained on dataset {dataset!r}, "
                            f"and must be on {other!r}")

    for name, model in image_models.items():
        denoiser = model.get("denoiser")
        path = f"image_classifiers.{name}.denoiser"
        if denoiser is None:
            continue
        if denoiser not in denoisers:
            problems.append(f"{path}: no denoiser named {denoiser!r}; "
                            f"known: {', '.join(sorted(denoisers)) or 'none'}")
        else:
            same_dataset(path, f"denoiser {denoiser!r}", denoisers[denoiser]["dataset"],
                         model["dataset"])
    for name, denoiser in denoisers.items():
        for role in DENOISER_MODEL_KEYS:
            model = denoiser.get(role)
            if model is None:
                continue
            path = f"denoisers.{name}.{role}"
            if model not in image_models:
                problems.append(f"{path}: no image classifier named {model!r}")
            else:
                same_dataset(path, f"image classifier {model!r}",
                             image_models[model]["dataset"], denoiser["dataset"])
    return problems


def image_training(config: Mapping, model: Mapping) -> dict[str, Any]:
    """The training an image classifier runs with: `image_training` under its own
    `training` overrides."""
    return {**config.get("image_training", {}), **(model.get("training") or {})}


def defense_labels(config: Mapping) -> dict[str, str]:
    """What each image model is defended with, for the report: its pixel denoiser, its
    training defense and low-pass augmentation (the intervention of the mammography study),
    joined with " + " (`reformer + denoising`); "none" without any. Slide models trained by
    MHIM-MIL: "MHIM-MIL"."""
    denoisers = config.get("denoisers", {})
    labels = {}
    for name, model in config.get("image_classifiers", {}).items():
        parts = []
        denoiser = model.get("denoiser")
        if denoiser is not None:
            kind = denoisers[denoiser]["kind"]
            parts.append(denoiser if denoiser == kind else f"{denoiser} ({kind})")
        defense = (model.get("defense") or {}).get("name", "none")
        if defense != "none":
            parts.append(defense)
        if image_training(config, model).get("lowpass_augment"):
            parts.append("low-pass augmentation")
        labels[name] = " + ".join(parts) or "none"
    labels.update({name: "MHIM-MIL" for name in mil_baselines(config)})
    return labels


def mil_baselines(config: Mapping) -> dict[str, str]:
    """Each slide classifier trained by MHIM-MIL, with the model it is compared against in the
    report: its teacher, the same architecture trained plainly (docs/mil.md)."""
    return {name: model["mhim"]["teacher"]
            for name, model in config.get("slide_classifiers", {}).items() if model.get("mhim")}


# --- names that select code, against the registries ---------------------------------


def registry_view(config: Mapping) -> dict[str, Any]:
    """The part of the config that `check_registries` reads (and its cache key hashes)."""
    return {
        "datasets": {name: {"kind": dataset["kind"], "source": dataset["source"]}
                     for name, dataset in config["datasets"].items()},
        "image_classifiers": {name: {"arch": model["arch"], "defense": model.get("defense"),
                                     "training": image_training(config, model)}
                              for name, model in config.get("image_classifiers", {}).items()},
        "denoisers": config.get("denoisers", {}),
        "slide_classifiers": {name: {key: model.get(key) for key in ("arch", "arch_options", "mhim")}
                              for name, model in config.get("slide_classifiers", {}).items()},
        "features": {"backbone": config.get("features", {}).get("backbone", "resnet18")},
        "attacks": config.get("attacks", {}),
        "perturbations": config.get("perturbations", {}),
        "fourier_heatmap": config.get("fourier_heatmap"),
        "slide_robustness": config.get("slide_robustness"),
    }


def check_registries(view: Mapping) -> list[str]:
    """Every name that selects code, and every attack, defense and denoiser parameter, in the
    registries.

    Takes the config's `registry_view`. Imports the registries (and so torch):
    the names are those of the code that will run, and a new attack or
    architecture is covered as soon as it registers.
    """
    # imported here: the registries import torch, and import this module
    from medrobust import attacks, perturbations
    from medrobust.data import sources
    from medrobust.features import backbones
    from medrobust.models import registry

    sources._load_builtin_sources()
    from medrobust.data.synthetic import MODALITIES

    problems = []

    def lookup(path: str, kind: str, name: str, known: Mapping) -> bool:
        if name in known:
            return True
        problems.append(f"{path}: {unknown_name(kind, name, known)}")
        return False

    for name, dataset in view["datasets"].items():
        source = dataset["source"]
        path = f"datasets.{name}.source"
        if not lookup(f"{path}.type", "source type", source["type"], sources.SOURCES):
            continue
        if source["type"] == "synthetic":
            problems += _check_synthetic(path, source, MODALITIES)
        try:
            sources.check_source_settings(source)
        except ConfigError as error:
            problems.append(f"datasets.{name}: {error}")
    from medrobust.train.image_classifier import TrainingConfig

    for name, model in view["image_classifiers"].items():
        path = f"image_classifiers.{name}"
        lookup(f"{path}.arch", "image classifier architecture", model["arch"],
               registry.IMAGE_CLASSIFIERS)
        # the schema leaves image_training's numbers optional: a config without image
        # classifiers needs none; one with them fails here, not in its first training job
        problems += _check_params(TrainingConfig, model["training"],
                                  f"{path}.training (image_training under it)")
        defense = dict(model["defense"] or {})
        if defense and lookup(f"{path}.defense.name", "defense", defense["name"], registry.DEFENSES):
            cls = registry.DEFENSES[defense.pop("name")]
            problems += _check_params(cls, defense, f"{path}.defense")
    for name, denoiser in view["denoisers"].items():
        path = f"denoisers.{name}"
        if lookup(f"{path}.kind", "denoiser kind", denoiser["kind"], registry.DENOISERS):
            settings = {key: value for key, value in denoiser.items() if key != "kind"}
            problems += _check_params(registry.DENOISERS[denoiser["kind"]], settings, path)
    from medrobust.models.mhim import MHIMOptions

    for name, model in view["slide_classifiers"].items():
        path = f"slide_classifiers.{name}"
        if lookup(f"{path}.arch", "slide classifier architecture", model["arch"],
                  registry.SLIDE_CLASSIFIERS):
            problems += _check_params(registry.SLIDE_CLASSIFIERS[model["arch"]].options,
                                      model["arch_options"] or {}, f"{path}.arch_options")
        if model["mhim"] is not None:
            problems += _check_params(MHIMOptions, model["mhim"], f"{path}.mhim")
    problem = backbones.backbone_problem(view["features"]["backbone"])
    if problem:
        problems.append(f"features.backbone: {problem}")
    resolve_attack = getattr(attacks, "resolve_attack", None)  # checks a budget in its units
    for name, settings in view["attacks"].items():
        if lookup(f"attacks.{name}", "attack", name, attacks.ATTACKS):
            params = {key: value for key, value in settings.items()
                      if key not in WORKFLOW_ATTACK_KEYS}
            bad = _check_params(attacks.ATTACKS[name].Params, params, f"attacks.{name}",
                                also_allowed=WORKFLOW_ATTACK_KEYS)
            problems += bad
            for index, epsilon in enumerate(settings["epsilons"]):
                if resolve_attack is None or bad:
                    break
                try:
                    resolve_attack(name, epsilon, params, section=f"attacks.{name}.epsilons.{index}")
                except (ConfigError, TypeError, ValueError) as error:
                    problems.append(_with_path(str(error), f"attacks.{name}.epsilons.{index}"))
    for name, settings in view["perturbations"].items():
        if lookup(f"perturbations.{name}", "perturbation", name, perturbations.PERTURBATIONS):
            params = {key: value for key, value in settings.items() if key != "severities"}
            for index, severity in enumerate(settings["severities"]):
                try:
                    perturbations.build_perturbation(name, severity, **params)
                except (ConfigError, TypeError, ValueError) as error:
                    problems.append(f"perturbations.{name}.severities.{index}: {error}")
    if view.get("fourier_heatmap") is not None:
        from medrobust.evaluate.fourier_heatmap import HeatmapConfig

        try:
            HeatmapConfig.from_mapping(view["fourier_heatmap"])
        except ConfigError as error:
            problems.append(str(error))
    if view.get("slide_robustness") is not None:
        from medrobust.evaluate.slide_robustness import SlideRobustnessConfig

        try:
            SlideRobustnessConfig.from_mapping(view["slide_robustness"])
        except ConfigError as error:
            problems.append(str(error))
    return problems


def _check_params(cls: type, params: Mapping[str, Any], path: str,
                  also_allowed: tuple[str, ...] = ()) -> list[str]:
    """Unknown, missing and bad values of the parameters a dataclass `cls` takes."""
    if dataclasses.is_dataclass(cls):
        fields = dataclasses.fields(cls)
        allowed = sorted({field.name for field in fields} | set(also_allowed))
        unknown = [key for key in params if key not in allowed]
        if unknown:
            return [f"{path}.{key}: unknown key; allowed: {', '.join(allowed) or 'none'}"
                    for key in unknown]
    try:
        config_from_mapping(cls, params, path)
    except (ConfigError, TypeError, ValueError) as error:
        return [_with_path(str(error), path)]
    return []


def _with_path(message: str, path: str) -> str:
    return message if message.startswith(f"{path}:") else f"{path}: {message}"


def _check_synthetic(path: str, source: Mapping[str, Any], modalities: Mapping) -> list[str]:
    name = source.get("modality")
    if name not in modalities:
        return [f"{path}.modality: {unknown_name('synthetic modality', str(name), modalities)}"]
    settings = {key: value for key, value in source.items() if key not in ("type", "modality")}
    return _check_params(modalities[name].config_type, settings, path)


def config_digest(view: Mapping[str, Any], code: str) -> str:
    text = json.dumps({"view": view, "code": code}, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def registry_facts(view: Mapping) -> dict[str, Any]:
    """What the registries say about the configured items that the config needs filled in:
    the attacks that draw random numbers (their Params take a `seed`)."""
    from medrobust.attacks import ATTACKS

    return {"seeded_attacks": sorted(
        name for name in view["attacks"]
        if "seed" in {field.name for field in dataclasses.fields(ATTACKS[name].Params)})}


def apply_registry_facts(config: MutableMapping, facts: Mapping[str, Any]) -> None:
    for name in facts["seeded_attacks"]:
        config["attacks"][name].setdefault("seed", config["seed"])


MARKER_PREFIX = "registries-ok-"
KEPT_MARKERS = 32


def check_registries_cached(config: MutableMapping,
                            cache_dir: str | os.PathLike | None) -> list[str]:
    """`check_registries` (then `registry_facts` applied), skipped when this view of the
    config passed with this code before.

    Only passes are remembered, with their facts: a failing config is checked
    (and its problems listed) on every parse. The newest KEPT_MARKERS stay.
    """
    view = registry_view(config)
    marker = None
    if cache_dir is not None:
        from medrobust.fingerprint import package_fingerprint

        marker = Path(cache_dir) / f"{MARKER_PREFIX}{config_digest(view, package_fingerprint())}"
        try:
            apply_registry_facts(config, json.loads(marker.read_text()))
            return []
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no marker (or a damaged one): check
    problems = check_registries(view)
    if problems:
        return problems
    facts = registry_facts(view)
    apply_registry_facts(config, facts)
    if marker is not None:
        _remember(marker, facts)
    return []


def _remember(marker: Path, facts: Mapping[str, Any]) -> None:
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        partial = marker.with_name(f".{marker.name}.{os.getpid()}")
        partial.write_text(json.dumps(facts, sort_keys=True) + "\n")
        partial.replace(marker)
        markers = sorted(marker.parent.glob(f"{MARKER_PREFIX}*"), key=lambda path: path.stat().st_mtime)
        for old in markers[:-KEPT_MARKERS]:
            old.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only working directory only costs the check next time

