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


# -- 3. typos get the right fix -----------------------------------------------------------

def _config(tmp_path: Path, old: str, new: str) -> Path:
    text = DEBUG_CONFIG.read_text()
    assert old in text, old
    path = tmp_path / "typo.toml"
    path.write_text(text.replace(old, new).replace('dump_folder = "./outputs/debug"',
                                                   f'dump_folder = "{tmp_path}/out"'))
    return path


def test_misspelled_toml_key_names_section_key_and_the_likely_key(tmp_path, capsys):
    config = _config(tmp_path, "seq_len = 256", "seqlen = 256")
    assert cli(["check", "--job.config_file", str(config)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "[training] seqlen" in lines[0] and "did you mean `seq_len`" in lines[0], err
    assert "Invalid field names" not in err and "NGPU=1" not in err


def test_misspelled_toml_section_is_named_with_the_likely_section(tmp_path, capsys):
    config = _config(tmp_path, "[training]", "[trainig]")
    assert cli(["check", "--job.config_file", str(config)]) == 2
    err = capsys.readouterr().err
    assert "[trainig]" in err and "did you mean [training]" in err, err


def test_misspelled_toml_key_stops_the_trainer_with_the_same_line(tmp_path):
    config = _config(tmp_path, "seq_len = 256", "seqlen = 256")
    proc = run_command(["./run_train.sh", "--job.config_file", str(config)])  # preflight skipped
    assert proc.returncode == 2, proc.output[-3000:]
    assert "did you mean `seq_len`" in proc.output
    assert "Invalid field names" not in proc.output and "Traceback" not in proc.output


def test_command_line_typo_points_to_a_command_that_lists_the_options(capsys):
    import pytest

    with pytest.raises(SystemExit):
        cli(["check", "--job.config_file", str(DEBUG_CONFIG), "--training.seqlen", "4"])
    err = capsys.readouterr().err
    assert "training.seq-len" in err  # tyro's suggestion
    assert f"./run_train.sh --job.config_file {DEBUG_CONFIG} --help" in " ".join(err.replace("│", " ").split()), err
    assert "cli.py --help" not in err
