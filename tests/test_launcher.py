"""run_train.sh's own interface (no training)."""

from __future__ import annotations

from .conftest import PREFLIGHT, run_command


def test_help_explains_every_knob_without_setting_anything_up():
    proc = run_command(["./run_train.sh", "--help"])
    assert proc.returncode == 0
    for knob in ("NGPU", "NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "--job.config_file"):
        assert knob in proc.stdout, knob


def test_trainer_errors_reach_the_caller_as_a_non_zero_exit():
    proc = run_command(["./run_train.sh", "--job.config_file", "train_configs/debug.toml", "--no.such-option", "1"],
                       env=PREFLIGHT)
    assert proc.returncode != 0


def test_the_preflight_can_be_skipped(tmp_path):
    args = ["--job.config_file", "train_configs/debug.toml", "--job.dump_folder", str(tmp_path / "out"),
            "--training.seq_len", "0"]
    checked = run_command(["./run_train.sh", *args], env=PREFLIGHT)
    assert checked.returncode == 2 and "error: [training] seq_len = 0" in checked.stderr
    skipped = run_command(["./run_train.sh", *args], env={"EXT_SKIP_PREFLIGHT": "1"})
    assert skipped.returncode not in (0, 2)  # the trainer itself fails
    assert "error: [training] seq_len = 0" not in skipped.stderr
    assert "-m ext.launch" in skipped.output


def test_launcher_exit_codes_follow_the_failed_rank():
    from ext.launch import exit_code

    assert exit_code(2) == 2
    assert exit_code(-9) == 137  # SIGKILL, as a shell reports it
    assert exit_code(0) == 1  # a failure is never reported as success
