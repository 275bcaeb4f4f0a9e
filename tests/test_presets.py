"""Every preset under presets/ is a config the workflow accepts, with the jobs its study needs
(image presets: a train, evaluate and attack job per model; slide presets: train and evaluate,
and with cv_folds a train job per fold and one evaluation of the folds)."""

import re

import pytest
import yaml

from workflow_runner import ROOT, run_snakemake

PRESETS = sorted((ROOT / "presets").glob("*.yaml"))


def job_counts(output: str) -> dict[str, int]:
    table = output.split("Job stats:", 1)[1].split("total", 1)[0]
    return {match[1]: int(match[2]) for match in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_every_preset_is_listed_in_the_presets_readme():
    readme = (ROOT / "presets/README.md").read_text()
    assert PRESETS and all(f"`{path.name}`" in readme for path in PRESETS)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda path: path.stem)
def test_a_preset_passes_a_dry_run_with_a_job_per_model(preset):
    # from the clone's root, as a user runs it (paths in presets are relative to it);
    # --forceall: results a developer's own run left there must not hide jobs
    result = run_snakemake(ROOT, preset, "--dry-run", "--forceall", "--quiet", "rules",
                           timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    config = yaml.safe_load(preset.read_text())
    jobs = job_counts(output)
    for family in ("image", "slide"):
        models = config.get(f"{family}_classifiers", {})
        assert jobs.get(f"train_{family}_classifier", 0) == len(models)
        assert jobs.get(f"evaluate_{family}_classifier", 0) == len(models)
    folds = [model["cv_folds"] for model in config.get("slide_classifiers", {}).values()
             if "cv_folds" in model]
    assert jobs.get("train_slide_fold", 0) == sum(folds)  # one job per fold
    assert jobs.get("evaluate_slide_folds", 0) == len(folds)
    assert jobs.get("train_denoiser", 0) == len(config.get("denoisers", {}))
    robustness = config.get("robustness", {})
    sources = set(robustness.get("transfer_sources", [])) | set(robustness.get("targets", []))
    assert jobs.get("attack", 0) == len(sources)
    # slide robustness: one job per slide model, one per tile perturbation of each slide dataset
    slide_robustness = config.get("slide_robustness")
    slide_models = config.get("slide_classifiers", {})
    assert jobs.get("slide_robustness", 0) == (len(slide_models) if slide_robustness else 0)
    slide_datasets = {model["dataset"] for model in slide_models.values()}
    assert jobs.get("perturb_slide_tiles", 0) == (
        len(slide_robustness["perturbations"]) * len(slide_datasets) if slide_robustness else 0)
