"""The package's layers and its one install step (docs/architecture.md).

The layer contract lives in pyproject.toml ([tool.importlinter]); it is run
here with import-linter, on the real package, so an upward import or a
cycle fails the suite. The second test breaks a copy of the package on
purpose to show the contract does catch it.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import REPO

LINT = str(Path(sys.executable).with_name("lint-imports"))


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([LINT, "--no-cache", "--config", str(cwd / "pyproject.toml")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_layers_import_only_downward_and_no_package_has_a_cycle():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_the_contract_fails_on_an_upward_import_and_on_a_cycle(tmp_path):
    shutil.copytree(REPO / "ext", tmp_path / "ext", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    mixture = tmp_path / "ext" / "data" / "mixture.py"
    mixture.write_text(mixture.read_text() + "\nimport ext.training.flops  # upward: data -> training\n")
    upward = _lint(tmp_path)
    assert upward.returncode != 0
    assert "ext.data.mixture -> ext.training.flops" in upward.stdout

    mixture.write_text((REPO / "ext" / "data" / "mixture.py").read_text())
    packing = tmp_path / "ext" / "data" / "packing.py"
    packing.write_text(packing.read_text() + "\nimport ext.data.mixture  # with the next line, a cycle\n")
    mixture.write_text(mixture.read_text() + "\nimport ext.data.packing\n")
    cycle = _lint(tmp_path)
    assert cycle.returncode != 0
    assert "No import cycles between the modules of a package BROKEN" in cycle.stdout


def test_every_patch_is_named_once_and_applied_by_the_install_step():
    import ext.job_config  # noqa: F401  (runs ext.plugin.install once)
    from ext.core.device import accelerator_present
    from ext.plugin import PATCHES

    targets = [t for patch in PATCHES for t in patch.targets]
    assert len(targets) == len(set(targets))
    for patch in PATCHES:
        module, function = patch.installer.split(":")
        assert callable(getattr(importlib.import_module(module), function)), patch.installer
        if not patch.at_install or patch.installer.endswith("install_commit_hold"):
            continue  # per run (needs the run's config), or a test hook off unless its variable is set
        if patch.installer.endswith("install_cpu_support") and accelerator_present():
            continue
        for target in patch.targets:
            module, attribute = target.split(":")
            obj = importlib.import_module(module)
            for part in attribute.split("."):
                obj = getattr(obj, part)
            if callable(obj):  # a replaced function: ours now
                assert obj.__module__.startswith("ext."), (target, obj.__module__)
            else:  # a replaced device global (CPU hosts)
                assert obj == "cpu" or type(obj).__module__.startswith("ext."), (target, obj)
