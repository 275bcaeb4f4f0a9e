"""Editing a stage's code reruns that stage and what follows; the success message.

Runs the real Snakemake on a copy of the workflow and the package (so the
tests edit the copy, never this tree) over outputs that are placeholders
marked up to date with `--touch`: no job really runs, the DAG and Snakemake's
rerun decisions (the rules' `code` params, see medrobust.fingerprint) are real.
"""

import shutil
import subprocess
import sys

import pytest
import yaml

from medrobust.fingerprint import code_fingerprint
from workflow_runner import ROOT, job_counts

CONFIG = {
    "device": "cpu",
    "datasets": {"mammograms": {"kind": "images", "classes": ["benign", "malignant"],
                                "source": {"type": "synthetic", "modality": "mammography",
                                           "n_samples": 64}}},
    "image_classifiers": {"baseline": {"dataset": "mammograms", "arch": "resnet18"},
                          "surrogate": {"dataset": "mammograms", "arch": "resnet18"}},
    "image_training": {"epochs": 1, "batch_size": 8, "learning_rate": 0.001,
                       "weight_decay": 0.0},
    "attacks": {"fgsm": {"epsilons": [2.5, 8]}},
    "perturbations": {"gaussian_noise": {"severities": [0.1]}},
    "robustness": {"targets": ["baseline"], "transfer_sources": ["surrogate"]},
}
FILE_SUFFIXES = (".json", ".csv", ".html", ".safetensors")


class Copy:
    """A copy of the workflow and package, a working directory, and Snakemake on them."""

    def __init__(self, root):
        self.repo, self.workdir = root / "repo", root / "work"
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
        self.repo.mkdir()
        for name in ("Snakefile", "workflow", "envs"):
            source = ROOT / name
            copy = shutil.copytree if source.is_dir() else shutil.copy2
            copy(source, self.repo / name, **({"ignore": ignore} if source.is_dir() else {}))
        shutil.copytree(ROOT / "src/medrobust", self.repo / "src/medrobust", ignore=ignore)
        self.workdir.mkdir()
        self.configfile = self.workdir / "config.yaml"
        self.configfile.write_text(yaml.safe_dump(CONFIG))

    def snakemake(self, *args):
        result = subprocess.run(
            [sys.executable, "-m", "snakemake", "--snakefile", str(self.repo / "Snakefile"),
             "--directory", str(self.workdir), "--configfile", str(self.configfile), *args],
            capture_output=True, text=True, timeout=600)
        return result, result.stdout + result.stderr

    def edit(self, module):
        path = self.repo / "src/medrobust" / module
        path.write_text(path.read_text() + "\n# edited by tests/test_reruns.py\n")

    def placeholders(self):
        """Every output of the DAG as an empty file or folder, then marked up to date."""
        result, output = self.snakemake("--dry-run", "--summary")
        assert result.returncode == 0, output[-3000:]
        for line in result.stdout.splitlines()[1:]:
            path = self.workdir / line.split("\t")[0]
            if path.suffix in FILE_SUFFIXES:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("placeholder")
            else:
                path.mkdir(parents=True, exist_ok=True)
        # every job, so that every output gets its metadata (params included)
        result, output = self.snakemake("--touch", "--forceall", "--cores", "1")
        assert result.returncode == 0, output[-3000:]


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    copy = Copy(tmp_path_factory.mktemp("reruns"))
    copy.placeholders()
    return copy


def test_fingerprints_cover_only_the_named_subpackages(tmp_path):
    shutil.copytree(ROOT / "src/medrobust", tmp_path / "medrobust",
                    ignore=shutil.ignore_patterns("__pycache__"))
    before = {part: code_fingerprint(part, root=tmp_path) for part in ("attacks", "report", "config")}
    (tmp_path / "medrobust/attacks/__init__.py").write_text(
        (tmp_path / "medrobust/attacks/__init__.py").read_text() + "# edit\n")
    after = {part: code_fingerprint(part, root=tmp_path) for part in ("attacks", "report", "config")}
    assert after["attacks"] != before["attacks"]
    assert after["report"] == before["report"] and after["config"] == before["config"]
    (tmp_path / "medrobust/attacks/new_attack.py").write_text("")
    assert code_fingerprint("attacks", root=tmp_path) != after["attacks"]
    with pytest.raises(ValueError, match="no medrobust.atacks"):
        code_fingerprint("atacks", root=tmp_path)


def test_placeholders_are_up_to_date(copy):
    result, output = copy.snakemake("--dry-run")
    assert result.returncode == 0, output[-3000:]
    assert job_counts(output) == {}


@pytest.mark.parametrize("module, expected", [
    # one attack job per source (every attack and budget), one evaluation job per model
    ("attacks/fgsm.py", {"attack": 2, "evaluate_image_classifier": 1, "summarize": 1, "report": 1,
                         "all": 1}),
    ("perturbations/gaussian_noise.py", {"perturb": 1, "evaluate_image_classifier": 1,
                                         "summarize": 1, "report": 1, "all": 1}),
    # the page and its templates rerun the report alone; the statistics rerun what they score
    ("report/page.py", {"report": 1, "all": 1}),
    ("report/templates/report.html.j2", {"report": 1, "all": 1}),
    ("report/summary.py", {"summarize": 1, "report": 1, "all": 1}),
    ("evaluate/statistics.py", {"evaluate_image_classifier": 2, "summarize": 1, "report": 1,
                                "all": 1}),
    ("models/registry.py", {"train_image_classifier": 2, "attack": 2,
                            "evaluate_image_classifier": 2, "summarize": 1, "report": 1,
                            "all": 1}),
])
def test_editing_a_stage_reruns_it_and_what_follows_only(copy, module, expected):
    original = (copy.repo / "src/medrobust" / module).read_text()
    copy.edit(module)
    try:
        result, output = copy.snakemake("--dry-run")
        assert result.returncode == 0, output[-3000:]
        assert job_counts(output) == expected
        assert "Params have changed since last execution" in output
    finally:
        (copy.repo / "src/medrobust" / module).write_text(original)
    result, output = copy.snakemake("--dry-run")
    assert job_counts(output) == {}, "the edit undone, nothing is to be done again"


def test_the_report_path_is_printed_only_when_the_report_is_made_or_current(copy):
    report = copy.workdir / "results/report/index.html"
    # a run that reaches the report (its code changed) names it
    copy.edit("report/page.py")
    result, output = copy.snakemake("--touch", "--cores", "1")
    assert result.returncode == 0, output[-3000:]
    assert f"medrobust report: {report}" in output
    # a run for another target does not, though an (older) report exists
    copy.edit("train/image_classifier.py")
    result, output = copy.snakemake("--touch", "--cores", "1",
                                    "results/models/mammograms/baseline/model.safetensors")
    assert result.returncode == 0, output[-3000:]
    assert "train_image_classifier" in output and "medrobust report" not in output
    # nor does a run that leaves no report behind (--touch makes no missing file)
    report.unlink()
    result, output = copy.snakemake("--touch", "--cores", "1")
    assert result.returncode == 0, output[-3000:]
    assert "rule report" in output and "medrobust report" not in output
