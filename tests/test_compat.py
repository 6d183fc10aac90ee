"""The torchtitan versions we accept, and the one-line stop for a fork that
lacks the API we build on."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from .conftest import REPO


def _torchtitan_requirement() -> Requirement:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(Requirement(d) for d in deps if Requirement(d).name == "torchtitan")


def test_the_declared_range_takes_0_2_2_and_later_0_2_forks_but_not_0_2_1_or_0_3():
    spec = _torchtitan_requirement().specifier
    for version in ("0.2.2", "0.2.2.post1", "0.2.3", "0.2.3.dev0", "0.2.9"):
        assert spec.contains(version, prereleases=True), version
    for version in ("0.2.1", "0.2.0", "0.3.0", "0.3.0.dev0"):
        assert not spec.contains(version, prereleases=True), version


def test_the_installed_torchtitan_has_every_name_we_build_on():
    from ext.compat import missing_api
    from ext.plugin import required_api

    api = required_api()
    assert "CheckpointManager.__init__" in api["torchtitan.components.checkpoint"]  # from PATCHES
    assert "get_peak_flops" in api["torchtitan.tools.utils"]
    assert missing_api(api) == []


def _fork(tmp_path: Path, edit: str, old: str, new: str) -> Path:
    """A copy of the installed torchtitan with one source edit, first on the path."""
    import torchtitan

    root = tmp_path / "fork"
    shutil.copytree(Path(torchtitan.__path__[0]), root / "torchtitan",
                    ignore=shutil.ignore_patterns("__pycache__", "experiments"))
    (root / "torchtitan" / "experiments").mkdir()
    (root / "torchtitan" / "experiments" / "__init__.py").write_text("")
    path = root / "torchtitan" / edit
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return root


def _import_job_config(fork: Path | None):
    env = {"PATH": "/usr/bin:/bin", **({"PYTHONPATH": str(fork)} if fork else {})}
    return subprocess.run([sys.executable, "-c", "import ext.job_config"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_fork_without_a_method_we_override_stops_at_import_with_one_line(tmp_path):
    fork = _fork(tmp_path, "components/checkpoint.py", "def _find_load_step(", "def _find_step_to_load(")
    proc = _import_job_config(fork)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "lacks torchtitan.components.checkpoint.CheckpointManager._find_load_step" in lines[0]
    assert str(fork) in lines[0]


def test_an_unchanged_copy_imports_cleanly(tmp_path):
    fork = _fork(tmp_path, "__init__.py", "", "")  # no change: the check passes for the copy
    proc = _import_job_config(fork)
    assert proc.returncode == 0, proc.stderr[-3000:]
