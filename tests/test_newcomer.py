"""Issue 22, a newcomer's first hour: help, spellings, messages and logs that
tell the truth the first time."""

from __future__ import annotations

import re
from pathlib import Path

from ext.cli import main as cli

from .conftest import DEBUG_CONFIG, PREFLIGHT, run_command


# -- 1. help and option spellings --------------------------------------------------------

def test_trainer_help_lists_our_sections_beside_torchtitans():
    proc = run_command(["./run_train.sh", "--trainer-help"])
    assert proc.returncode == 0, proc.output[-3000:]
    for section in ("data", "sft", "eval", "skyladder", "attention", "moe", "preemption", "input_pipeline",
                    "training", "parallelism"):
        assert f"{section.replace('_', '-')} options" in proc.stdout, section  # tyro shows hyphens


def test_hyphenated_config_file_option_is_accepted_by_the_check(capsys):
    assert cli(["check", "--job.config-file", str(DEBUG_CONFIG)]) == 0, capsys.readouterr().err
    assert cli(["check", f"--job.config-file={DEBUG_CONFIG}"]) == 0, capsys.readouterr().err


def test_hyphenated_options_count_as_given_for_the_layout_defaults():
    from ext.train import with_layout_defaults

    argv = ["--job.config-file", str(DEBUG_CONFIG), "--parallelism.data-parallel-shard-degree", "8"]
    assert with_layout_defaults(argv, 16, 8) == argv  # given, so no HSDP default added
