"""run_train.sh's own interface (no training)."""

from __future__ import annotations

from .conftest import run_command


def test_help_explains_every_knob_without_setting_anything_up():
    proc = run_command(["./run_train.sh", "--help"])
    assert proc.returncode == 0
    for knob in ("NGPU", "NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "--job.config_file"):
        assert knob in proc.stdout, knob


def test_trainer_errors_reach_the_caller_as_a_non_zero_exit():
    proc = run_command(["./run_train.sh", "--job.config_file", "train_configs/debug.toml", "--no.such-option", "1"])
    assert proc.returncode != 0
