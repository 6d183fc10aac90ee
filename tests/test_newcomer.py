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


# -- 4. every problem once ------------------------------------------------------------------

def _errors(capsys, *args: str) -> tuple[list[str], str]:
    assert cli(["check", "--job.config_file", str(DEBUG_CONFIG), *args]) == 2
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.startswith("error:")], err


def test_a_missing_data_path_is_reported_once(tmp_path, capsys):
    lines, err = _errors(capsys, "--data.datasets", str(tmp_path / "nope.jsonl"))
    assert len(lines) == 1 and "nope.jsonl" in lines[0], err
    assert "1 problem(s)" in err


def test_a_sampling_probs_mismatch_is_reported_once(capsys):
    lines, err = _errors(capsys, "--data.sampling_probs", "0.5", "0.5")
    assert lines == ["error: [data] sampling_probs has 2 entries but datasets has 1"], err


def test_every_missing_source_is_reported(tmp_path, capsys):
    missing = [str(tmp_path / n) for n in ("web", "code", "math")]
    lines, err = _errors(capsys, "--data.datasets", ",".join(missing), "--data.sampling_probs", "0.6", "0.2", "0.2")
    for i, path in enumerate(missing):
        assert sum(f"datasets[{i}] '{path}'" in line for line in lines) == 1, err
    assert "3 problem(s)" in err


def test_check_of_a_config_without_its_assets_prints_only_its_problems():
    proc = run_command([".venv/bin/python", "-m", "ext.cli", "check", "--job.config_file",
                        "train_configs/llama3_8b_multisource.toml"])
    assert proc.returncode == 2
    assert "HF assets path" not in proc.output  # torchtitan's unprefixed warning
    assert all(line.startswith("error:") for line in proc.stderr.splitlines()[:-1]), proc.stderr
    for source in ("/data/web", "/data/code", "/data/math"):
        assert proc.stderr.count(f"'{source}' does not exist") == 1, proc.stderr


# -- 5, 6. the log of a short CPU run, output redirected ---------------------------------------

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """The debug config for 3 steps (log_freq 10, warmup 20) on two sources, 2 processes (FSDP over
    gloo), output captured (not a terminal)."""
    out = tmp_path_factory.mktemp("short") / "out"
    data = DEBUG_CONFIG.parent.parent / "ext" / "assets" / "data"
    proc = run_command(["./run_train.sh", "--job.config_file", str(DEBUG_CONFIG), "--training.steps", "3",
                        "--job.dump_folder", str(out), "--data.datasets", f"{data / 'web.jsonl'},{data / 'code.jsonl'}",
                        "--data.sampling_probs", "0.6", "0.4"], env={"NPROC": "2"})
    assert proc.returncode == 0, proc.output[-4000:]
    return proc, out


def test_a_short_run_records_its_last_step(short_run):
    from .conftest import read_summary

    _, out = short_run
    summary = read_summary(out)
    assert [h["step"] for h in summary["history"]] == [1, 3]
    assert summary["last_loss"] == summary["history"][-1]["loss"] != summary["first_loss"]


# -- 2. the preflight says what will not work ----------------------------------------------

def test_check_prints_the_memory_estimate(capsys):
    assert cli(["check", "--job.config_file", str(DEBUG_CONFIG)]) == 0
    out = capsys.readouterr().out
    assert "memory estimate per process:" in out and "(1,311,872 parameters)" in out, out  # as the trainer logs


def test_a_config_far_too_big_for_the_device_is_refused_with_the_numbers(capsys):
    lines, err = _errors(capsys, "--model.flavor", "3.2-1B", "--training.seq_len", "262144")
    memory = [line for line in lines if "GiB per process needed" in line]
    assert len(memory) == 1, err
    assert "seq_len 262144 x local_batch_size 8" in memory[0] and "activations" in memory[0]


def test_memory_estimate_scales_with_sharding_and_checkpointing():
    from ext.cli import load_job_config
    from ext.training.memory import estimate

    def est(*args: str):
        return estimate(load_job_config(["--job.config_file", str(DEBUG_CONFIG), *args]), 4, 4, False)

    one = est("--parallelism.data_parallel_shard_degree", "1", "--parallelism.data_parallel_replicate_degree", "4")
    four = est("--parallelism.data_parallel_shard_degree", "4")
    assert four.states_bytes * 4 == one.states_bytes == 16 * 1_311_872
    none = est("--activation_checkpoint.mode", "none")
    full = est("--activation_checkpoint.mode", "full")
    assert full.activations_bytes < none.activations_bytes


def test_an_unreachable_hub_dataset_is_one_line_with_the_offline_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    lines, err = _errors(capsys, "--data.datasets", "HuggingFaceFW/fineweb-edu")
    hub = [line for line in lines if "HuggingFaceFW/fineweb-edu" in line]
    assert len(hub) == 1, err
    assert "HF_HUB_OFFLINE" in hub[0] and "local copy" in hub[0] and "huggingface-cli download" in hub[0]


def test_a_cached_hub_dataset_passes_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "hub" / "datasets--HuggingFaceFW--fineweb-edu" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("x")
    code = cli(["check", "--job.config_file", str(DEBUG_CONFIG), "--data.datasets", "HuggingFaceFW/fineweb-edu"])
    err = capsys.readouterr().err
    assert "fineweb-edu" not in err, err
    assert code == 0, err


def test_a_verifiers_environment_id_that_does_not_resolve_is_named(capsys):
    lines, err = _errors(capsys, "--eval.verifiers_envs", "tests.verifiers_echo,acme/no-such-env@1.0")
    bad = [line for line in lines if "no-such-env" in line]
    assert len(bad) == 1, err
    assert "no_such_env" in bad[0] and "PYTHONPATH" in bad[0] and "__all__" in bad[0]
    assert not any("'tests.verifiers_echo' does not resolve" in line for line in lines), err  # a module here


def test_more_processes_than_cores_and_the_grown_global_batch_are_said(capsys, monkeypatch):
    import os

    cores = len(os.sched_getaffinity(0))
    n = 4 * cores
    monkeypatch.setenv("WORLD_SIZE", str(n))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(n))
    assert cli(["check", "--job.config_file", str(DEBUG_CONFIG)]) == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert f"warning: {n} processes on {cores} CPU core(s)" in out, out
    assert f"global batch {8 * n} rows = local_batch_size 8 x {n} data-parallel ranks" in out, out


def test_a_redirected_log_has_no_colour_codes(short_run):
    proc, _ = short_run
    assert "\x1b[" not in proc.output


def test_the_lr_is_printed_at_log_steps_only(short_run):
    proc, _ = short_run
    assert not re.search(r"step:\s+2\s", proc.output), proc.output[-3000:]  # log_freq 10: steps 1 and 3
    assert re.search(r"step:\s+3\s.*lr:", proc.output) or re.search(r"step:\s+3\s", proc.output)


def test_known_harmless_cpu_warnings_are_not_repeated(short_run):
    proc, _ = short_run
    for noise in ("set_vital", "CPU Autocast", "In CPU autocast", "model.safetensors.index.json",
                  "TORCH_NCCL_ASYNC_ERROR_HANDLING", "may not have complete support on cpu device mesh"):
        assert noise not in proc.output, noise


def test_one_mfu_figure_when_the_peak_is_unknown(short_run):
    proc, _ = short_run
    assert "mfu: nan" not in proc.output and "MFU: nan" not in proc.output
    assert "mfu_palm n/a" in proc.output


def test_one_truth_about_warmup_longer_than_the_run(short_run):
    proc, _ = short_run  # warmup_steps 20, 3 steps: torchtitan warms up over the 3
    assert "warmup 20" not in proc.output, [line for line in proc.output.splitlines() if "armup" in line]
    assert "Adjusting warmup steps" not in proc.output
    assert "LR schedule torchtitan: warmup 3 " in proc.output


# -- 8. small ones --------------------------------------------------------------------------

def test_the_mixture_line_shows_the_runs_share_beside_the_windows(short_run):
    proc, out = short_run
    lines = [line for line in proc.output.splitlines() if "- data: " in line]
    assert len(lines) == 2, proc.output[-3000:]  # steps 1 and 3
    first = re.findall(r"(web|code) ([\d.]+)% \(run ([\d.]+)%\)", lines[0])
    assert {name for name, _, _ in first} == {"web", "code"}, lines[0]
    assert all(window == run for _, window, run in first)  # at step 1 the window is the run
    last = {name: float(run) for name, run in re.findall(r"(web|code) [\d.]+% \(run ([\d.]+)%\)", lines[1])}
    assert abs(sum(last.values()) - 100) < 0.2


@pytest.mark.parametrize("command", ["lr-schedule", "flops"])
def test_tools_that_read_a_config_refuse_to_run_without_one(capsys, command):
    assert cli([command]) == 2
    err = capsys.readouterr().err
    assert f"{command} needs --job.config_file" in err, err


def test_lr_schedule_without_matplotlib_says_how_to_get_the_plot(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:
        pytest.skip("matplotlib is installed here")
    assert cli(["lr-schedule", "--job.config_file", str(DEBUG_CONFIG), "--plot", str(tmp_path / "lr.png")]) == 0
    captured = capsys.readouterr()
    assert "no plot: matplotlib is not installed (pip install matplotlib" in captured.out, captured
    assert not (tmp_path / "lr.png").exists()


def test_reshard_is_a_cli_tool_and_its_folder_is_readable_by_others(tmp_path, capsys):
    import os
    import stat

    src = tmp_path / "docs.jsonl"
    src.write_text("".join('{"text": "doc %d"}\n' % i for i in range(6)))
    out = tmp_path / "shards"
    old = os.umask(0o022)
    try:
        assert cli(["reshard", str(src), "--num-shards", "2", "--out", str(out), "--no-progress"]) == 0
    finally:
        os.umask(old)
    assert len(list(out.glob("*.parquet"))) == 2
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_debug_configs_point_only_to_what_exists():
    for config in sorted(DEBUG_CONFIG.parent.glob("debug*.toml")):
        assert "the checkpoint configs" not in config.read_text(), config


def test_building_the_environment_says_each_step_before_it(tmp_path):
    """scripts/setup_env.sh on a copy of the repo's manifests, with a stand-in interpreter that
    creates a venv whose python only records what it was asked (no download)."""
    import shutil
    import stat
    import subprocess

    repo = DEBUG_CONFIG.parent.parent
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("scripts/setup_env.sh", "requirements.lock", "pyproject.toml"):
        shutil.copy(repo / name, root / name)
    fake = tmp_path / "python3"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        "if [[ \"$1 $2\" == \"-m venv\" ]]; then mkdir -p \"$3/bin\"; cp \"$0\" \"$3/bin/python\"; exit 0; fi\n"
        "echo \"python $*\" >> \"$(dirname \"$0\")/calls\"\n"
        "[[ \"$1\" == \"-c\" && \"$2\" == *print* ]] && echo 'torch x torchtitan y'\n"
        "[[ \"$1\" == \"-c\" && \"$2\" == *+cpu* ]] && exit 1\n"
        "exit 0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in __import__("os").environ.items() if k != "EXT_SKIP_SETUP"}
    proc = subprocess.run(["bash", str(root / "scripts" / "setup_env.sh")], env={**env, "PYTHON": str(fake)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    steps = [line for line in proc.stderr.splitlines() if line.startswith("setup: [")]
    assert [s[:12] for s in steps] == ["setup: [1/3]", "setup: [2/3]", "setup: [3/3]"], proc.stderr
    assert "torch==" in steps[1]


# -- 7. evaluation is bounded by default ------------------------------------------------------

EVAL_CONFIG = DEBUG_CONFIG.parent / "debug_eval.toml"


def test_the_check_says_how_much_one_evaluation_reads(capsys):
    assert cli(["check", "--job.config_file", str(EVAL_CONFIG)]) == 0
    err = capsys.readouterr().err
    assert ("note: [eval] each evaluation (at step 1, every 50 steps and the last) reads at most 262,144 "
            "held-out tokens per source = 128 batch(es) of 8 x 256 per rank") in err, err
    assert cli(["check", "--job.config_file", str(EVAL_CONFIG), "--eval.tokens_per_source", "0"]) == 0
    assert "reads the whole held-out part" in capsys.readouterr().err


def _heldout_batches(*args: str) -> dict[str, int]:
    from torchtitan.components.tokenizer import build_hf_tokenizer

    from ext.cli import load_job_config
    from ext.training.eval import HeldOutValidator

    cfg = load_job_config(["--job.config_file", str(EVAL_CONFIG), *args])
    validator = HeldOutValidator(cfg, 1, 0, build_hf_tokenizer(cfg), None, None, None, None, None)
    real = {}
    for name, batches in validator._build_batches():
        real[name] = sum(int(b[1].ne(-100).any(dim=1).sum()) for b in batches)  # rows holding held-out text
    return real


def test_an_evaluation_reads_at_most_its_token_budget_per_source():
    bounded = _heldout_batches("--eval.tokens_per_source", "4096")  # 16 rows of 256
    assert bounded == {"web": 16, "code": 16, "math": 16}
    whole = _heldout_batches("--eval.tokens_per_source", "0")
    assert all(whole[name] > 16 for name in whole), whole


def test_the_check_prints_no_unprefixed_warmup_warning(capsys):
    import logging

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.records = []

        def emit(self, record):
            self.records.append(record.getMessage())

    keep = Keep()
    logging.getLogger().addHandler(keep)
    try:
        assert cli(["check", "--job.config_file", str(DEBUG_CONFIG), "--training.steps", "2"]) == 0
    finally:
        logging.getLogger().removeHandler(keep)
    assert not any("Warmup steps" in m for m in keep.records), keep.records
