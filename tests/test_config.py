"""Config validation: bad configs stop the run before any job, naming the key."""

import copy
from pathlib import Path

import pytest
import yaml

from medrobust.config import validate_config
from medrobust.errors import ConfigError
from workflow_runner import ROOT, run_snakemake

SCHEMA = ROOT / "workflow/schemas/config.schema.yaml"


@pytest.fixture
def config():
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def test_default_config_is_valid_and_defaults_are_filled(config):
    del config["report"]
    validate_config(config, SCHEMA)
    assert config["report"] == {"n_examples": 4, "bootstrap_resamples": 1000, "confidence": 0.95,
                                "alpha": 0.05, "small_test_set": 200}


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
         "robustness.targets.2: no image classifier named 'ghost'"),
    ],
)
def test_cross_references_are_checked(config, edit, message):
    edit(config)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(config, SCHEMA)


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
    assert "dataset=chest" in result.stdout
    assert "mammograms" not in result.stdout and "train_slide_classifier" not in result.stdout
