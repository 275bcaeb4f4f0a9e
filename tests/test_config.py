"""Config validation: bad configs stop the run before any job, naming the key."""

import copy
import re

import pytest
import yaml

from medrobust import config as config_module
from medrobust.config import (BACKBONE_PATTERN, NAME_PATTERN, check_registries, registry_view,
                              validate_config)
from medrobust.config_docs import MissingDescription, generate
from medrobust.errors import ConfigError
from workflow_runner import ROOT, run_snakemake

SCHEMA = ROOT / "workflow/schemas/config.schema.yaml"


@pytest.fixture
def config():
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def _set(path, value):
    """An edit that sets the dotted `path` (created as needed) to `value`."""
    def edit(config):
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return edit


def _rename(section, old, new):
    def edit(config):
        config[section][new] = config[section].pop(old)
        if section == "image_classifiers":  # keep robustness pointing at it
            config["robustness"]["targets"] = [new if name == old else name
                                               for name in config["robustness"]["targets"]]
    return edit


def _add_denoisers(config):
    """MagNet's reformer (with its detector) and HGD on the mammograms, and classifiers
    behind them."""
    config["denoisers"] = {
        "R": {"kind": "reformer", "dataset": "mammograms", "detector": {}},
        "H": {"kind": "hgd", "dataset": "mammograms", "guide": "baseline", "source": "surrogate"},
    }
    models = config["image_classifiers"]
    models["baseline_r"] = {**models["baseline"], "denoiser": "R"}
    models["denoising_r"] = {**models["denoising"], "denoiser": "R"}
    models["baseline_h"] = {**models["baseline"], "denoiser": "H"}
    return config


def _with_denoisers(edit):
    def both(config):
        edit(_add_denoisers(config))
    return both


def test_default_config_is_valid_and_defaults_are_filled(config):
    del config["report"]
    validate_config(config, SCHEMA)
    assert config["report"] == {"n_examples": 4, "bootstrap_resamples": 1000, "confidence": 0.95,
                                "alpha": 0.05, "small_test_set": 200}


def test_training_defaults_fill_image_training_not_a_models_overrides(config):
    """A model's `training` filled with defaults would override image_training's values."""
    config["image_training"] = {"epochs": 12, "batch_size": 32, "learning_rate": 0.001,
                                "weight_decay": 0.0001, "optimizer": "sgd"}
    config["image_classifiers"]["denoising"]["training"] = {"epochs": 3}
    validate_config(config, SCHEMA)
    assert config["image_training"] == {"epochs": 12, "batch_size": 32, "learning_rate": 0.001,
                                        "weight_decay": 0.0001, "augment": True,
                                        "optimizer": "sgd", "momentum": 0.9, "schedule": "none",
                                        "step_size": 30, "gamma": 0.1}
    assert config["image_classifiers"]["denoising"]["training"] == {"epochs": 3}


def test_defaults_apply_only_to_their_kind_of_dataset(config):
    del config["datasets"]["mammograms"]["preprocess"], config["datasets"]["slides"]["tiling"]
    validate_config(config, SCHEMA)
    assert config["datasets"]["mammograms"]["preprocess"] == {"image_size": 64}
    assert "tiling" not in config["datasets"]["mammograms"]
    assert config["datasets"]["slides"]["tiling"] == {"target_mpp": 0.5, "tile_size": 224,
                                                      "tissue_threshold": 0.5,
                                                      "mask_pixels_per_tile": 4}
    assert "preprocess" not in config["datasets"]["slides"]


def test_a_section_for_the_other_kind_of_dataset_is_refused(config):
    config["datasets"]["mammograms"]["tiling"] = {"tile_size": 64}
    config["datasets"]["slides"]["preprocess"] = {}
    with pytest.raises(ConfigError) as error:
        validate_config(config, SCHEMA)
    assert "datasets.mammograms.tiling: applies to slide datasets only" in str(error.value)
    assert "datasets.slides.preprocess: applies to image datasets only" in str(error.value)


def test_bootstrap_with_fewer_than_1000_resamples_is_refused(config):
    config["report"]["bootstrap_resamples"] = 200
    with pytest.raises(ConfigError, match="report.bootstrap_resamples"):
        validate_config(config, SCHEMA)


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda c: c["image_training"].update(epochz=3), "image_training: unknown key(s): 'epochz'"),
        (lambda c: c["image_classifiers"]["baseline"].update(seed="x"), "image_classifiers.baseline.seed"),
        (lambda c: c["datasets"]["mammograms"].pop("kind"), "datasets.mammograms: 'kind' is a required"),
        (lambda c: c.update(device="tpu"), "device: 'tpu' is not one of"),
        (lambda c: c["attacks"]["fgsm"].update(epsilons=[0]), "attacks.fgsm.epsilons.0"),
        (lambda c: c["image_training"].update(optimizer="sdg"),
         "image_training.optimizer: 'sdg' is not one of ['adam', 'sgd']"),
        (lambda c: c["image_classifiers"]["denoising"].update(training={"schedule": "cosin"}),
         "image_classifiers.denoising.training.schedule: 'cosin' is not one of"),
        (lambda c: c["image_training"].update(momentum=1), "image_training.momentum"),
        (lambda c: c["image_training"].update(step_size=0), "image_training.step_size"),
        (lambda c: c["image_training"].update(gamma=0), "image_training.gamma"),
        (_with_denoisers(lambda c: c["denoisers"]["H"].pop("guide")),
         "denoisers.H: 'guide' is a required property"),
        (_with_denoisers(_set("denoisers.R.pooling", "sum")),
         "denoisers.R.pooling: 'sum' is not one of"),
        (_with_denoisers(_set("denoisers.R.detector.false_positive_rate", 2)),
         "denoisers.R.detector.false_positive_rate"),
        (_with_denoisers(_set("denoisers.R.detector.temperature", [10])),
         "denoisers.R.detector: unknown key(s): 'temperature'"),
        # NaN passes every `minimum`; infinity and huge seeds fail later, after outputs are gone
        (_set("datasets.slides.tiling.target_mpp", float("nan")),
         "datasets.slides.tiling.target_mpp: nan is not a finite number"),
        (_set("image_training.learning_rate", float("inf")),
         "image_training.learning_rate: inf is not a finite number"),
        (_set("attacks.fgsm.epsilons", [2, float("nan")]),
         "attacks.fgsm.epsilons.1: nan is not a finite number"),
        (lambda c: c.update(seed=2**70), "seed: 1180591620717411303424 is larger than"),
        (_set("image_classifiers.baseline.seed", 2**32), "image_classifiers.baseline.seed"),
    ],
)
def test_schema_errors_name_the_key(config, edit, key):
    edit(config)
    with pytest.raises(ConfigError) as error:
        validate_config(config, SCHEMA)
    assert key in str(error.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["image_classifiers"]["baseline"].update(dataset="nope"),
         "image_classifiers.baseline.dataset: no dataset named 'nope'"),
        (lambda c: c["slide_classifiers"]["abmil"].update(dataset="mammograms"),
         "slide_classifiers.abmil.dataset: 'mammograms' is of kind 'images'"),
        (lambda c: c["robustness"]["targets"].append("ghost"),
         "robustness.targets.[0-9]+: no image classifier named 'ghost'"),
        (lambda c: c["slide_attention"]["models"].append("ghost"),
         "slide_attention.models.2: no slide classifier named 'ghost'"),
        (_set("slide_robustness.models", ["abmil", "ghost"]),
         "slide_robustness.models.1: no slide classifier named 'ghost'"),
        (_set("slide_classifiers.abmil.mhim", {"teacher": "ghost"}),
         "slide_classifiers.abmil.mhim.teacher: no slide classifier named 'ghost'"),
        (_set("slide_classifiers.abmil.mhim", {"teacher": "abmil"}),
         "slide_classifiers.abmil.mhim.teacher: 'abmil' is itself trained by MHIM-MIL"),
        (lambda c: c["slide_classifiers"].update(
            mhim={**c["slide_classifiers"]["abmil"], "arch": "transmil",
                  "mhim": {"teacher": "abmil"}}),
         "slide_classifiers.mhim.mhim.teacher: 'abmil' has arch 'abmil', this model 'transmil'"),
        (_with_denoisers(_set("image_classifiers.baseline.denoiser", "R2")),
         "image_classifiers.baseline.denoiser: no denoiser named 'R2'; known: H, R"),
        (_with_denoisers(_set("denoisers.H.guide", "ghost")),
         "denoisers.H.guide: no image classifier named 'ghost'"),
        (_with_denoisers(_set("denoisers.R.dataset", "slides")),
         "denoisers.R.dataset: 'slides' is of kind 'slides', this model needs 'images'"),
        (_with_denoisers(lambda c: c["datasets"].update(other=c["datasets"]["mammograms"])
                         or c["denoisers"]["R"].update(dataset="other")),
         "image_classifiers.baseline_r.denoiser: denoiser 'R' is trained on dataset 'other', "
         "and must be on 'mammograms'"),
        (_with_denoisers(lambda c: c["datasets"].update(other=c["datasets"]["mammograms"])
                         or c["image_classifiers"]["surrogate"].update(dataset="other")),
         "denoisers.H.source: image classifier 'surrogate' is trained on dataset 'other', "
         "and must be on 'mammograms'"),
    ],
)
def test_cross_references_are_checked(config, edit, message):
    edit(config)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(config, SCHEMA)


def test_a_pretrained_weights_file_must_exist_at_every_parse(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative path is from the working directory
    config["image_classifiers"]["baseline"]["pretrained"] = "weights/resnet18.pth"
    with pytest.raises(ConfigError, match=r"image_classifiers\.baseline\.pretrained: no weights "
                                          r"file 'weights/resnet18\.pth' \(relative to the "
                                          r"working directory .*\); pretrained takes none, "
                                          r"imagenet or the path of a weights file"):
        validate_config(copy.deepcopy(config), SCHEMA, cache_dir=tmp_path / "cache")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights/resnet18.pth").write_bytes(b"")
    validate_config(copy.deepcopy(config), SCHEMA, cache_dir=tmp_path / "cache")
    # a config that passed is remembered, its file is not
    (tmp_path / "weights/resnet18.pth").unlink()
    with pytest.raises(ConfigError, match=r"image_classifiers\.baseline\.pretrained"):
        validate_config(copy.deepcopy(config), SCHEMA, cache_dir=tmp_path / "cache")


def test_bad_config_stops_snakemake_before_any_job(config, tmp_path):
    bad = copy.deepcopy(config)
    bad["datasets"]["mammograms"]["preprocess"]["image_sise"] = 64
    configfile = tmp_path / "bad.yaml"
    configfile.write_text(yaml.safe_dump(bad))
    result = run_snakemake(tmp_path, configfile, "--cores", "1", timeout=120)
    assert result.returncode != 0
    assert "datasets.mammograms.preprocess: unknown key(s): 'image_sise'" in result.stderr + result.stdout
    assert not (tmp_path / "resources").exists()


def test_a_configfile_replaces_the_default_config():
    """From the clone's root, config.yaml's datasets and models must not leak in."""
    import subprocess

    from workflow_runner import SNAKEMAKE

    result = subprocess.run(
        [*SNAKEMAKE, "--dry-run", "--configfile", str(ROOT / "tests/configs/dry_run/medmnist.yaml")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    # the planned jobs and their wildcards; a job's "reason:" may quote the params of an
    # earlier run in this checkout (.snakemake's records), which are not this plan
    planned = "\n".join(line for line in result.stdout.splitlines()
                         if not line.lstrip().startswith("reason:"))
    assert "dataset=chest" in planned
    assert "mammograms" not in planned and "train_slide_classifier" not in planned


# --- names that select code, checked against the registries -----------------------------

# one of each kind: (edit, the problem line that names the key and the known names)
BAD_NAMES = {
    "attack": (_rename("attacks", "fgsm", "fgsn"), r"attacks\.fgsn: unknown attack 'fgsn'; known: .*fgsm"),
    "perturbation": (_rename("perturbations", "gaussian_noise", "gausian_noise"),
                     r"perturbations\.gausian_noise: unknown perturbation 'gausian_noise'; "
                     r"known: .*gaussian_noise"),
    "defense": (_set("image_classifiers.denoising.defense.name", "denoiser"),
                r"image_classifiers\.denoising\.defense\.name: unknown defense 'denoiser'; "
                r"known: .*denoising"),
    "image architecture": (_set("image_classifiers.baseline.arch", "resnet81"),
                           r"image_classifiers\.baseline\.arch: unknown image classifier "
                           r"architecture 'resnet81'; known: .*resnet18"),
    "slide architecture": (_set("slide_classifiers.abmil.arch", "abmill"),
                           r"slide_classifiers\.abmil\.arch: unknown slide classifier "
                           r"architecture 'abmill'; known: abmil, gated_abmil, transmil"),
    "backbone": (_set("features.backbone", "resnet81"),
                 r"features\.backbone: unknown feature backbone 'resnet81'; known: .*resnet18"),
    "source type": (_set("datasets.mammograms.source.type", "synthetik"),
                    r"datasets\.mammograms\.source\.type: unknown source type 'synthetik'; "
                    r"known: .*synthetic"),
    "recipe": (lambda c: c["datasets"]["mammograms"].update(source={"type": "medmnst", "flag": "x"}),
               r"datasets\.mammograms\.source\.type: unknown source type 'medmnst'; "
               r"known: .*medmnist"),
    "synthetic modality": (_set("datasets.slides.source.modality", "slide"),
                           r"datasets\.slides\.source\.modality: unknown synthetic modality "
                           r"'slide'; known: mammography, slides"),
    "denoiser kind": (_with_denoisers(_set("denoisers.R.kind", "reformr")),
                      r"denoisers\.R\.kind: unknown denoiser kind 'reformr'; known: hgd, reformer"),
}

BAD_PARAMETERS = {
    "attack parameter": (_set("attacks.fgsm.steps", 3),
                         r"attacks\.fgsm\.steps: unknown key; allowed: epsilons"),
    "attack parameter value": (lambda c: c["attacks"].update(ifgsm={"epsilons": [4], "steps": 0}),
                               r"attacks\.ifgsm: .*steps"),
    "attack budget": (_set("attacks.fgsm.epsilons", [300]),
                      r"attacks\.fgsm(\.epsilons\.0)?: .*300"),
    "attack budget as a fraction": (_set("attacks.pgd.epsilons", [8, 0.03]),
                                    r"attacks\.pgd\.epsilons\.1: epsilon 0\.03 means 0\.03/255"),
    "defense parameter": (_set("image_classifiers.denoising.defense.lambda_x", 1.0),
                          r"image_classifiers\.denoising\.defense\.lambda_x: unknown key; "
                          r"allowed: .*lambda_n"),
    "missing defense parameter": (lambda c: c["image_classifiers"]["denoising"]["defense"]
                                  .pop("noise_sigma"),
                                  r"image_classifiers\.denoising\.defense: missing key\(s\) "
                                  r"noise_sigma"),
    "slide architecture option": (_set("slide_classifiers.abmil.arch_options", {"heads": 8}),
                                  r"slide_classifiers\.abmil\.arch_options\.heads: unknown key; "
                                  r"allowed: attention_dim, dropout, hidden_dim"),
    "mhim setting value": (_set("slide_classifiers.abmil.mhim", {"teacher": "b",
                                                                 "merge_k": 0}),
                           r"slide_classifiers\.abmil\.mhim\.merge_k"),
    "defense parameter value": (_set("image_classifiers.denoising.defense.lambda_n", -1),
                                r"image_classifiers\.denoising\.defense: .*lambda_n"),
    "perturbation setting": (_set("perturbations.fourier_basis",
                                  {"severities": [4], "frequency": [1, 0.5]}),
                             r"perturbations\.fourier_basis\.severities\.0: .*frequency must "
                             r"be two integers"),
    "perturbation setting it does not take": (_set("perturbations.gaussian_noise.frequency",
                                                   [1, 1]),
                                              r"perturbations\.gaussian_noise\.severities\.0: "
                                              r"perturbation 'gaussian_noise': .*frequency"),
    "Fourier heat map grid": (_set("fourier_heatmap", {"grid_size": 8}),
                              r"fourier_heatmap\.grid_size must be odd"),
    "tile perturbation name": (_set("slide_robustness.perturbations",
                                    {"blurr": {"severities": [1]}}),
                               r"slide_robustness\.perturbations\.blurr\.severities\.0: unknown "
                               r"perturbation 'blurr'; known: .*stain_shift"),
    "tile perturbation severity": (_set("slide_robustness.perturbations.jpeg",
                                        {"severities": [0.5]}),
                                   r"slide_robustness\.perturbations\.jpeg\.severities\.0: "
                                   r".*quality"),
    "tile attack budget": (_set("slide_robustness.adversarial.step_size", 0),
                           r"slide_robustness\.adversarial\.step_size"),
    "defense distance": (_set("image_classifiers.denoising.defense.distance", "L2"),
                         r"image_classifiers\.denoising\.defense: .*distance must be one of "
                         r"l2, mse, not 'L2'"),
    "synthetic source setting": (_set("datasets.mammograms.source.n_sample", 10),
                                 r"datasets\.mammograms\.source\.n_sample: unknown key"),
    "local source's labels table setting": (
        _set("datasets.mammograms.source", {"type": "local", "root": "/nowhere",
                                             "labels": {"table": "l.csv", "path_colum": "f"}}),
        r"datasets\.mammograms: source\.labels: unknown key\(s\) path_colum"),
    "local source's split name": (
        _set("datasets.mammograms.source", {"type": "local", "root": "/nowhere",
                                             "labels": {"table": "l.csv"},
                                             "splits": {"train": 0.8, "validation": 0.2}}),
        r"datasets\.mammograms: splits: unknown split 'validation'"),
    "local source's labels as a string": (
        _set("datasets.mammograms.source", {"type": "local", "root": "/nowhere",
                                             "labels": "labels.csv"}),
        r"datasets\.mammograms: source\.labels: expected a mapping, got str"),
    "local source's root as a number": (
        _set("datasets.mammograms.source", {"type": "local", "root": 5,
                                             "labels": {"table": "l.csv"}}),
        r"datasets\.mammograms: source \(local\): root must be the path of a folder, not 5"),
    "recipe's download setting": (
        _set("datasets.mammograms.source", {"type": "medmnist", "flag": "breastmnist",
                                             "download": {"attempt": 3}}),
        r"datasets\.mammograms: source\.download: unknown key\(s\) attempt"),
    "denoiser parameter of the other kind": (
        _with_denoisers(_set("denoisers.R.guide", "baseline")),
        r"denoisers\.R\.guide: unknown key; allowed: .*noise_std"),
    "detector on hgd": (_with_denoisers(_set("denoisers.H.detector", {})),
                        r"denoisers\.H\.detector: unknown key; allowed: .*encoder_widths"),
    "denoiser parameter value": (_with_denoisers(_set("denoisers.H.decoder_widths", [8, 8])),
                                 r"denoisers\.H: .*decoder_widths needs one width fewer"),
}


@pytest.mark.parametrize("edit, message", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_a_name_that_selects_no_code_is_refused_with_the_known_names(config, edit, message):
    edit(config)
    with pytest.raises(ConfigError) as error:
        validate_config(config, SCHEMA)
    assert re.search(message, str(error.value)), str(error.value)


@pytest.mark.parametrize("edit, message", BAD_PARAMETERS.values(), ids=BAD_PARAMETERS.keys())
def test_attack_defense_and_source_parameters_are_checked_by_their_classes(config, edit, message):
    edit(config)
    with pytest.raises(ConfigError) as error:
        validate_config(config, SCHEMA)
    assert re.search(message, str(error.value)), str(error.value)


def test_image_training_numbers_are_required_where_image_classifiers_train(config):
    """The schema cannot require them (a slides-only config has no image_training); the
    check of what each model trains with does, at parse time, not in its training job."""
    del config["image_training"]
    with pytest.raises(ConfigError) as error:
        validate_config(copy.deepcopy(config), SCHEMA)
    assert ("image_classifiers.baseline.training (image_training under it): missing key(s) "
            "epochs, batch_size, learning_rate, weight_decay") in str(error.value)
    # a model's own training may give them
    for model in config["image_classifiers"].values():
        model["training"] = {"epochs": 1, "batch_size": 8, "learning_rate": 0.01,
                             "weight_decay": 0.0}
    validate_config(config, SCHEMA)
    for model in config["image_classifiers"].values():
        model["training"]["learning_rate"] = -1
    with pytest.raises(ConfigError, match="training.learning_rate: -1 is less than"):
        validate_config(config, SCHEMA)


def test_the_denoising_distance_defaults_to_the_papers_l2_only_for_that_defense(config):
    del config["image_classifiers"]["denoising"]["defense"]["distance"]
    config["image_classifiers"]["baseline"]["defense"] = {"name": "none"}
    validate_config(config, SCHEMA)
    assert config["image_classifiers"]["denoising"]["defense"]["distance"] == "l2"
    assert config["image_classifiers"]["baseline"]["defense"] == {"name": "none"}


def test_every_problem_is_listed_at_once(config):
    kinds = [kind for kind in BAD_NAMES if kind != "recipe"]  # recipe replaces the source type
    for kind in kinds:
        BAD_NAMES[kind][0](config)
    with pytest.raises(ConfigError) as error:
        validate_config(config, SCHEMA)
    for kind in kinds:
        assert re.search(BAD_NAMES[kind][1], str(error.value)), kind


def test_names_come_from_the_registries_not_copies(config, monkeypatch):
    """A newly registered attack is known at once (the registry is the only list)."""
    from medrobust.attacks import ATTACKS, FGSM

    monkeypatch.setitem(ATTACKS, "brand_new", FGSM)
    config["attacks"]["brand_new"] = {"epsilons": [1]}
    validate_config(config, SCHEMA)


def test_every_registered_attack_validates_with_its_defaults(config):
    from medrobust.attacks import ATTACKS

    config["attacks"] = {name: {"epsilons": [1]} for name in ATTACKS}
    validate_config(config, SCHEMA)


def test_each_denoiser_kind_gets_its_defaults_and_the_seed(config):
    _add_denoisers(config)
    config["seed"] = 3
    validate_config(config, SCHEMA)
    reformer, hgd = config["denoisers"]["R"], config["denoisers"]["H"]
    assert reformer == {"kind": "reformer", "dataset": "mammograms", "seed": 3, "epochs": 100,
                        "batch_size": 256, "learning_rate": 0.001, "noise_std": 0.025,
                        "filters": 3, "pooling": "none",
                        "detector": {"false_positive_rate": 0.005, "temperatures": [10, 40],
                                     "reconstruction_norm": 1, "scope": "combined"}}
    assert hgd == {"kind": "hgd", "dataset": "mammograms", "guide": "baseline",
                   "source": "surrogate", "seed": 3, "epochs": 20, "batch_size": 32,
                   "learning_rate": 0.01, "encoder_widths": [64, 128, 256, 256, 256],
                   "decoder_widths": [64, 128, 256, 256], "epsilon_range": [1, 16],
                   "ifgsm_steps": [2, 4], "clean_and_noise": True}


def test_every_registered_denoiser_kind_validates_with_the_schema_defaults(config):
    """The schema holds the kinds' defaults: a kind whose settings it lacks fails here."""
    from medrobust.models.registry import DENOISERS

    config["denoisers"] = {kind: {"kind": kind, "dataset": "mammograms",
                                  **{role: "baseline" for role in cls.models}}
                           for kind, cls in DENOISERS.items()}
    validate_config(config, SCHEMA)


def test_the_workflow_knows_every_setting_that_names_a_classifier():
    """common.smk makes DENOISER_MODEL_KEYS inputs of a denoiser's training without
    importing the registry; every kind's `models` must be among them."""
    from medrobust.models.registry import DENOISERS

    for cls in DENOISERS.values():
        assert set(cls.models) <= set(config_module.DENOISER_MODEL_KEYS), cls.kind


def test_denoisers_combine_with_any_defense_as_config_lines(config):
    """Table 4 of Xue et al.: R, R + Ln, R + La, R + Ln + La, and the same for HGD."""
    _add_denoisers(config)
    models = config["image_classifiers"]
    lambdas = {"Ln": {"lambda_n": 1.0, "lambda_a": 0.0}, "La": {"lambda_n": 0.0, "lambda_a": 10.0},
               "Ln_La": {"lambda_n": 1.0, "lambda_a": 10.0}}
    for denoiser in ("R", "H"):
        for label, settings in lambdas.items():
            models[f"{denoiser}_{label}"] = {
                "dataset": "mammograms", "arch": "resnet18", "denoiser": denoiser,
                "defense": {"name": "denoising", "noise_sigma": 0.03, **settings}}
    validate_config(config, SCHEMA)
    labels = config_module.defense_labels(config)
    assert labels["baseline"] == "none" and labels["denoising"] == "denoising"
    assert labels["lowpass_augmented"] == "low-pass augmentation"
    # augmentation for every model, as the models train with it
    config["image_training"]["lowpass_augment"] = {"probability": 0.5, "radius": [2, 16]}
    assert config_module.defense_labels(config)["baseline"] == "low-pass augmentation"
    assert labels["baseline_r"] == "R (reformer)" and labels["baseline_h"] == "H (hgd)"
    assert labels["H_Ln_La"] == "H (hgd) + denoising"


# --- names that become paths ------------------------------------------------------------

@pytest.mark.parametrize("name", ["../escape", "a/b", "a|b", "..", ".hidden", "a..b", "", "a b",
                                  "ümlaut"])
@pytest.mark.parametrize("section", ["datasets", "image_classifiers", "attacks", "perturbations",
                                     "denoisers"])
def test_names_that_would_be_unsafe_in_paths_are_refused(config, section, name):
    _add_denoisers(config)
    config[section][name] = next(iter(config[section].values()))
    with pytest.raises(ConfigError) as error:
        validate_config(config, SCHEMA)
    assert f"{section}.{name!r}: {name!r} cannot be a name" in str(error.value)


@pytest.mark.parametrize("name", ["a.b", "resnet-18", "x_1", "A9", "v1.2-rc_3"])
def test_safe_names_pass_the_pattern(name):
    assert re.match(NAME_PATTERN, name)


def test_an_unsafe_backbone_is_refused(config):
    config["features"]["backbone"] = "../../x"
    with pytest.raises(ConfigError, match=r"features\.backbone: '\.\./\.\./x' cannot be a name"):
        validate_config(config, SCHEMA)


def test_the_schema_and_the_package_share_the_name_pattern():
    schema = yaml.safe_load(SCHEMA.read_text())
    assert schema["$defs"]["name"]["pattern"] == NAME_PATTERN
    assert schema["properties"]["features"]["properties"]["backbone"]["pattern"] == \
        BACKBONE_PATTERN


def test_a_timm_backbone_passes_and_an_unknown_timm_model_is_refused(config):
    config["features"]["backbone"] = "timm:test_vit"
    validate_config(copy.deepcopy(config), SCHEMA)
    config["features"]["backbone"] = "timm:no_such_net"
    with pytest.raises(ConfigError, match=r"features\.backbone: timm has no model 'no_such_net'"):
        validate_config(config, SCHEMA)
    config["features"]["backbone"] = "timm:../x"
    with pytest.raises(ConfigError, match=r"features\.backbone: 'timm:\.\./x' cannot be a name"):
        validate_config(config, SCHEMA)


def test_a_feature_weights_file_must_exist_at_every_parse(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config["features"]["weights"] = "weights/uni.safetensors"
    with pytest.raises(ConfigError, match=r"features\.weights: no weights file "
                                          r"'weights/uni\.safetensors' \(relative to the "
                                          r"working directory .*\); weights takes random, "
                                          r"imagenet or the path of a weights file"):
        validate_config(copy.deepcopy(config), SCHEMA, cache_dir=tmp_path / "cache")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights/uni.safetensors").write_bytes(b"")
    validate_config(copy.deepcopy(config), SCHEMA, cache_dir=tmp_path / "cache")


def test_model_kwargs_need_a_timm_backbone(config):
    config["features"]["model_kwargs"] = {"init_values": 1e-5}
    with pytest.raises(ConfigError, match=r"features\.model_kwargs: applies to timm backbones "
                                          r"only, not resnet18"):
        validate_config(copy.deepcopy(config), SCHEMA)
    config["features"]["backbone"] = "timm:test_vit"
    validate_config(config, SCHEMA)


# --- budgets and conditions -------------------------------------------------------------

def test_decimal_budgets_and_severities_are_accepted(config):
    config["attacks"]["fgsm"]["epsilons"] = [2.5, 0.5, 8]
    config["perturbations"]["gaussian_noise"]["severities"] = [0.5]
    validate_config(config, SCHEMA)


def test_the_same_budget_twice_is_refused(config):
    config["attacks"]["fgsm"]["epsilons"] = [4, 4.0]
    with pytest.raises(ConfigError, match=r"attacks\.fgsm\.epsilons: .*non-unique"):
        validate_config(config, SCHEMA)


def test_conditions_that_would_share_a_name_are_refused(config):
    """Names may hold '-', so two conditions could spell the same file name; refused."""
    for name in ("y-eps2-from-z", "z"):
        config["image_classifiers"][name] = {"dataset": "mammograms", "arch": "resnet18"}
    config["robustness"]["transfer_sources"] = ["y-eps2-from-z", "z"]
    # x at 1 from y-eps2-from-z and x-eps1-from-y at 2 from z: both x-eps1-from-y-eps2-from-z
    config["attacks"] = {"x": {"epsilons": [1]}, "x-eps1-from-y": {"epsilons": [2]}}
    schema = yaml.safe_load(SCHEMA.read_text())
    assert config_module._schema_errors(config, schema) == []
    problems = config_module.check_references(config)
    assert any("attack 'x' at 1 from 'y-eps2-from-z' and attack 'x-eps1-from-y' at 2 from 'z' "
               "would both be evaluated as 'x-eps1-from-y-eps2-from-z'" in problem
               for problem in problems), problems


# --- seeds --------------------------------------------------------------------------------

def test_the_top_level_seed_reaches_everything_that_sets_none(config):
    config["seed"] = 7
    del config["image_classifiers"]["baseline"]["seed"], config["slide_classifiers"]["abmil"]["seed"]
    config["datasets"]["slides"]["source"]["seed"] = 3     # a dataset's own seed wins
    config["image_classifiers"]["surrogate"]["seed"] = 1   # and a model's
    validate_config(config, SCHEMA)
    assert config["image_classifiers"]["baseline"]["seed"] == 7
    assert config["slide_classifiers"]["abmil"]["seed"] == 7
    assert config["image_classifiers"]["surrogate"]["seed"] == 1
    assert config["datasets"]["mammograms"]["source"]["seed"] == 7
    assert config["datasets"]["slides"]["source"]["seed"] == 3
    assert config["features"]["seed"] == 7


def test_attacks_that_draw_random_numbers_get_the_seed(config):
    from medrobust.attacks import ATTACKS

    seeded = [name for name, cls in ATTACKS.items()
              if "seed" in {field.name for field in __import__("dataclasses").fields(cls.Params)}]
    if not seeded:
        pytest.skip("no registered attack draws random numbers")
    config["seed"] = 5
    config["attacks"] = {name: {"epsilons": [1]} for name in ATTACKS}
    validate_config(config, SCHEMA)
    assert {name for name, settings in config["attacks"].items() if settings.get("seed") == 5} \
        == set(seeded)


# --- the registry check's memory ----------------------------------------------------------

def test_a_config_that_passed_is_not_checked_again_with_the_same_code(config, tmp_path, monkeypatch):
    validate_config(copy.deepcopy(config), SCHEMA, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("registries-ok-*"))) == 1

    def fail(view):
        raise AssertionError("registries checked again")

    monkeypatch.setattr(config_module, "check_registries", fail)
    again = copy.deepcopy(config)
    validate_config(again, SCHEMA, cache_dir=tmp_path)
    assert again["features"]["seed"] == 0  # seeds resolved all the same
    changed = copy.deepcopy(config)
    changed["attacks"]["fgsm"]["epsilons"] = [2]
    with pytest.raises(AssertionError, match="checked again"):
        validate_config(changed, SCHEMA, cache_dir=tmp_path)


def test_a_failing_config_is_not_remembered(config, tmp_path):
    config["image_classifiers"]["baseline"]["arch"] = "resnet81"
    for _ in range(2):
        with pytest.raises(ConfigError, match="resnet81"):
            validate_config(copy.deepcopy(config), SCHEMA, cache_dir=tmp_path)
    assert list(tmp_path.glob("registries-ok-*")) == []


def test_check_registries_reads_only_its_view(config):
    validate_config(config, SCHEMA)
    assert check_registries(registry_view(config)) == []


# --- the generated reference page -----------------------------------------------------------

def test_docs_config_md_is_generated_from_the_schema():
    """Regenerate with `PYTHONPATH=src python -m medrobust.config_docs > docs/config.md`."""
    expected = generate(yaml.safe_load(SCHEMA.read_text()))
    assert (ROOT / "docs/config.md").read_text() == expected


def test_every_key_has_a_description_and_appears_in_the_docs():
    schema = yaml.safe_load(SCHEMA.read_text())
    page = generate(schema)
    for key in ("seed", "datasets.<name>.tiling.tile_size", "attacks.<name>.epsilons",
                "report.alpha", "features.backbone", "image_classifiers.<name>.defense.name"):
        assert f"| `{key}` |" in page
    # defaults beside a `$ref` add to the shared section's keys, for that use only
    assert '| `image_training.optimizer` | one of `adam`, `sgd` | `"adam"` |' in page
    assert "| `image_classifiers.<name>.training.optimizer` | one of `adam`, `sgd` |  |" in page
    del schema["properties"]["report"]["properties"]["alpha"]["description"]
    with pytest.raises(MissingDescription, match="report.alpha"):
        generate(schema)


# --- through snakemake: failing before any job ---------------------------------------------

def _write(tmp_path, config, name="config.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("edit, message", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_dry_run_fails_on_a_bad_name_with_its_key_and_the_known_names(config, tmp_path, edit,
                                                                        message):
    edit(config)
    result = run_snakemake(tmp_path, _write(tmp_path, config), "--dry-run", timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert re.search(message, output), output[-3000:]
    assert "invalid config:" in output and "Job stats" not in output


@pytest.mark.parametrize("name", ["../../escape", "a|b"])
def test_dry_run_refuses_an_attack_name_that_is_unsafe_in_paths(config, tmp_path, name):
    workdir = tmp_path / "deep" / "work"
    workdir.mkdir(parents=True)
    config["attacks"][name] = {"epsilons": [4]}
    result = run_snakemake(workdir, _write(workdir, config), "--dry-run", timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"attacks.{name!r}: {name!r} cannot be a name" in output, output[-3000:]
    # nothing made outside the working directory (no escape/, no logs/ next to it)
    assert sorted(path.name for path in tmp_path.rglob("*")
                  if workdir not in path.parents and path != workdir) == ["deep"]


def test_a_misspelled_arch_deletes_no_trained_model(config, tmp_path):
    """Snakemake empties a job's outputs before it runs; the config must fail before that."""
    model = tmp_path / "results/models/mammograms/baseline"
    model.mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "history.json"):
        (model / name).write_text("trained")
    config["image_classifiers"]["baseline"]["arch"] = "resnet81"
    result = run_snakemake(tmp_path, _write(tmp_path, config), "--cores", "1",
                           "results/models/mammograms/baseline/model.safetensors", timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "image_classifiers.baseline.arch: unknown image classifier architecture" in output
    assert "rule train_image_classifier" not in output
    assert sorted(path.name for path in model.iterdir()) == ["config.json", "history.json",
                                                             "model.safetensors"]
    assert all((model / name).read_text() == "trained" for name in ("model.safetensors",))


def test_decimal_budgets_and_severities_run_through_a_dry_run(config, tmp_path):
    config["attacks"] = {"fgsm": {"epsilons": [2.5, 0.5]}}
    config["perturbations"]["gaussian_noise"]["severities"] = [0.5, 0.00001]
    result = run_snakemake(tmp_path, _write(tmp_path, config), "--dry-run", timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    # one job per source covers every attack and budget; one per model every condition
    for path in ("results/attacks/mammograms/from_surrogate",
                 "results/attacks/mammograms/from_baseline",
                 "results/perturbations/mammograms/gaussian_noise",
                 "results/evaluate/mammograms/denoising"):
        assert f"output: {path}" in output, path


def test_the_summary_reads_the_manifests_of_the_image_datasets(tmp_path):
    """Their `group` column (CBIS-DDSM: the patient) is what the clustered intervals and
    tests count; the summary gets the folder the download checkpoint writes."""
    result = run_snakemake(tmp_path, ROOT / "tests/configs/dry_run/cbis_ddsm.yaml",
                           "--dry-run", "--cores", "1", timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    [block] = [block for block in re.split(r"^rule ", output, flags=re.MULTILINE)
               if block.startswith("summarize:")]
    inputs = re.search(r"^    input: (.*)$", block, flags=re.MULTILINE)[1].split(", ")
    assert "resources/ddsm" in inputs
