"""Package structure: every module imports on its own, no import cycles, every import declared."""

import ast
import json
import os
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
# conda-forge names that differ from the PyPI distribution's
CONDA_NAMES = {"torch": "pytorch", "matplotlib": "matplotlib-base"}


def package_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((SRC / "medrobust").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def import_time_imports(path: Path) -> list[ast.Import | ast.ImportFrom]:
    """The import statements a module runs when it is imported (not those inside functions)."""
    found = []

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(ast.iter_child_nodes(node))

    visit(ast.parse(path.read_text()).body)
    return found


def internal_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    targets = set()
    for node in import_time_imports(path):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names if alias.name in modules)
        elif node.module and node.level == 0:
            if node.module in modules:
                targets.add(node.module)
            targets.update(f"{node.module}.{alias.name}" for alias in node.names
                           if f"{node.module}.{alias.name}" in modules)
    return targets


def test_no_import_cycles():
    """No module imports (at import time) one that imports it back, directly or not.

    A package's `__init__` importing its submodules is fine; a submodule then
    importing from its half-initialised package is the cycle this forbids.
    """
    modules = package_modules()
    graph = {name: internal_imports(path, modules) - {name} for name, path in modules.items()}
    cycles, state = [], {}

    def walk(name, stack):
        state[name] = "open"
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                walk(target, stack)
        stack.pop()
        state[name] = "done"

    for name in graph:
        if name not in state:
            walk(name, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_module_imports_on_its_own():
    """Each module is the first of the package to be imported, in a fresh package state."""
    script = """
import importlib, json, sys, traceback
failures = {}
for name in json.loads(sys.argv[1]):
    for loaded in [key for key in sys.modules if key == "medrobust" or key.startswith("medrobust.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failures[name] = traceback.format_exc(limit=3)
print(json.dumps(failures))
"""
    names = sorted(package_modules())
    result = subprocess.run([sys.executable, "-c", script, json.dumps(names)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    assert result.returncode == 0, result.stderr
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(f"{name}:\n{error}" for name, error in failures.items())


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_distributions() -> dict[str, set[str]]:
    """Distribution (normalised) -> the package modules that import it."""
    by_module = packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    found: dict[str, set[str]] = {}
    for name, path in package_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top in stdlib or top in ("medrobust", "__future__"):
                    continue
                assert top in by_module, f"{path}: imports {top!r}, which no installed " \
                                         f"distribution provides"
                for distribution in by_module[top]:
                    found.setdefault(normalise(distribution), set()).add(name)
    return found


def declared_pypi() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {normalise(re.match(r"[A-Za-z0-9_.-]+", spec).group())
            for spec in project["dependencies"]}


def declared_conda() -> set[str]:
    """The conda environment's packages, those it installs with pip included."""
    environment = yaml.safe_load((ROOT / "envs" / "medrobust.yaml").read_text())
    specs = [spec for spec in environment["dependencies"] if isinstance(spec, str)]
    specs += [spec for entry in environment["dependencies"] if isinstance(entry, dict)
              for spec in entry.get("pip", [])]
    return {normalise(re.match(r"[A-Za-z0-9_.-]+", spec).group()) for spec in specs}


def test_every_imported_distribution_is_declared():
    imported = imported_distributions()
    assert "pillow" in imported  # the check sees through import names (PIL -> Pillow)
    pypi, conda = declared_pypi(), declared_conda()
    missing_pypi = {dist: sorted(users) for dist, users in imported.items() if dist not in pypi}
    missing_conda = {dist: sorted(users) for dist, users in imported.items()
                     if normalise(CONDA_NAMES.get(dist, dist)) not in conda}
    assert not missing_pypi, f"imported but not in pyproject.toml dependencies: {missing_pypi}"
    assert not missing_conda, f"imported but not in envs/medrobust.yaml: {missing_conda}"
