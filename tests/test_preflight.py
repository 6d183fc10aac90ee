"""Preflight: a catalogue of bad configs and inputs, each with its one-line message;
plus global seeding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ext.cli import main as cli

from .conftest import DEBUG_CONFIG, PREFLIGHT, TOKENIZER, read_summary, run_command, run_train


def base_toml(tmp_path: Path, extra: str = "", replace: dict[str, str] | None = None) -> Path:
    text = DEBUG_CONFIG.read_text().replace('dump_folder = "./outputs/debug"', f'dump_folder = "{tmp_path}/out"')
    for old, new in (replace or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "config.toml"
    path.write_text(text + "\n" + extra)
    return path


def problems(capsys, config: Path, *args: str) -> str:
    code = cli(["check", "--job.config_file", str(config), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def tokenizer_copy(tmp_path: Path, drop_template: bool = False, extra_tokens: int = 0) -> Path:
    folder = tmp_path / "tok"
    shutil.copytree(TOKENIZER, folder)
    if drop_template:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg.pop("chat_template")
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    if extra_tokens:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tok.add_tokens([f"extra{i}" for i in range(extra_tokens)])
        tok.save(str(folder / "tokenizer.json"))
    return folder


def jsonl(path: Path, n: int = 3) -> Path:
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(n)))
    return path


# (id, setup(tmp_path) -> (extra toml, replacements, cli args), expected substring)
CASES = [
    ("unknown-key", lambda t: ("", {"summary_file = ": "sumary_file = "}, []), "sumary_file"),
    ("wrong-type-int", lambda t: ("", {"seq_len = 256": 'seq_len = "long"'}, []),
     "[training] seq_len = 'long': expected int"),
    ("wrong-type-list", lambda t: ("", {"sampling_probs = [1.0]": 'sampling_probs = "all"'}, []),
     "[data] sampling_probs = 'all': expected list[float]"),
    ("wrong-literal", lambda t: ("", {'packing = "bfd"': 'packing = "best"'}, []),
     "[data] packing = 'best': expected one of 'bfd', 'greedy'"),
    ("probs-mismatch", lambda t: ("", {"sampling_probs = [1.0]": "sampling_probs = [0.5, 0.5]"}, []),
     "[data] sampling_probs has 2 entries but datasets has 1"),
    ("negative-prob", lambda t: ("", {"sampling_probs = [1.0]": "sampling_probs = [-1.0]"}, []),
     "[data] sampling_probs[0] = -1.0: must be a finite number >= 0"),
    ("zero-probs", lambda t: ("", {}, ["--data.datasets", f"{jsonl(t / 'a.jsonl')},{jsonl(t / 'b.jsonl')}",
                                       "--data.sampling_probs", "0", "0"]), "sampling_probs sum to 0"),
    ("missing-data-file", lambda t: ("", {}, ["--data.datasets", str(t / "nope.jsonl")]), "does not exist"),
    ("empty-source", lambda t: ("", {}, ["--data.datasets", str(jsonl(t / "e.jsonl", 0))]), "has no records"),
    ("mixed-folder", lambda t: ("", {}, ["--data.datasets", str(_mixed_folder(t))]), "mixes data file kinds"),
    ("bad-exhaustion", lambda t: ("", {}, ["--data.on_exhaustion", "loop"]), "[data] on_exhaustion[0] = 'loop'"),
    ("bad-workers", lambda t: ("", {'num_workers = "auto"': 'num_workers = "many"'}, []), "[data] num_workers = 'many'"),
    ("unknown-model", lambda t: ("", {}, ["--model.name", "gpt9"]), "not a registered train spec"),
    ("unknown-flavor", lambda t: ("", {}, ["--model.flavor", "huge"]), "[model] flavor = 'huge' is not a flavor"),
    ("missing-assets", lambda t: ("", {}, ["--model.hf_assets_path", str(t / "none")]), "is not a folder"),
    ("no-tokenizer-file", lambda t: ("", {}, ["--model.hf_assets_path", str(_empty_dir(t))]), "has no tokenizer.json"),
    ("corrupt-tokenizer", lambda t: ("", {}, ["--model.hf_assets_path", str(_corrupt_tokenizer(t))]),
     "tokenizer.json cannot be loaded"),
    ("vocab-too-big", lambda t: ("", {}, ["--model.hf_assets_path", str(tokenizer_copy(t, extra_tokens=5))]),
     "the tokenizer has 2053 tokens but flavor 'tiny' has vocab_size 2048"),
    ("dump-under-file", lambda t: ("", {}, ["--job.dump_folder", str(_a_file(t) / "out")]), "is a file, not a folder"),
    ("dump-unwritable", lambda t: ("", {}, ["--job.dump_folder", "/proc/no_such_place/out"]),
     "[job] dump_folder '/proc/no_such_place/out': cannot write in /proc"),
    ("checkpoint-unwritable", lambda t: ("", {}, ["--checkpoint.enable", "--checkpoint.folder", "/proc/ckpt"]),
     "[checkpoint] folder '/proc/ckpt': cannot write in /proc"),
    ("seq-len-zero", lambda t: ("", {}, ["--training.seq_len", "0"]), "[training] seq_len = 0: must be >= 1"),
    ("global-batch", lambda t: ("", {}, ["--training.global_batch_size", "12"]),
     "global_batch_size = 12 is not a multiple of local_batch_size x data-parallel degree = 8 x 1"),
    ("tp-does-not-divide", lambda t: ("", {}, ["--parallelism.tensor_parallel_degree", "3"]),
     "does not divide the 1 processes"),
    ("degrees-vs-processes", lambda t: ("", {}, ["--parallelism.data_parallel_shard_degree", "4"]),
     "the degrees multiply to 4 but 1 process(es) run"),
    ("flex-on-cpu", lambda t: ("", {}, ["--attention.backend", "flex"]), "needs a CUDA GPU"),
    ("skyladder-without-data", lambda t: ("", {'datasets = ["./ext/assets/data/web.jsonl"]': "datasets = []"},
                                          ["--skyladder.enable"]),
     "[skyladder] enable = true needs the [data] loader"),
    ("skyladder-window", lambda t: ("", {}, ["--skyladder.enable", "--skyladder.init_window", "999"]),
     "[skyladder] init_window = 999"),
    ("skyladder-rounding", lambda t: ("", {}, ["--skyladder.enable", "--skyladder.rounding", "512"]),
     "[skyladder] rounding = 512 exceeds the full window 256"),
    ("skyladder-horizon", lambda t: ("", {}, ["--skyladder.enable", "--skyladder.schedule", "lin"]),
     "needs horizon_steps > 0"),
    ("cp-with-masks", lambda t: ("", {}, ["--parallelism.context_parallel_degree", "2"]),
     "context_parallel_degree > 1 is not supported with segment masks"),
    ("sft-no-template", lambda t: ("", {}, ["--sft.enable", "--model.hf_assets_path",
                                            str(tokenizer_copy(t, drop_template=True))]), "has no chat template"),
    ("sft-template-file", lambda t: ("", {}, ["--sft.enable", "--sft.template_file", str(t / "x.jinja")]),
     "[sft] template_file"),
    ("negative-lr", lambda t: ("", {}, ["--optimizer.lr", "-0.1"]), "[optimizer] lr = -0.1: must be > 0"),
    ("bad-schedule", lambda t: ("", {}, ["--lr_scheduler.schedule", "zigzag"]), "[lr_scheduler]"),
    ("missing-initial-load", lambda t: ("", {}, ["--checkpoint.initial_load_path", str(t / "ckpt")]),
     "[checkpoint] initial_load_path"),
]


def _mixed_folder(t: Path) -> Path:
    folder = t / "mixed"
    folder.mkdir()
    jsonl(folder / "a.jsonl")
    (folder / "b.txt").write_text("x\n")
    return folder


def _empty_dir(t: Path) -> Path:
    (t / "empty").mkdir()
    return t / "empty"


def _corrupt_tokenizer(t: Path) -> Path:
    folder = tokenizer_copy(t)
    (folder / "tokenizer.json").write_text("{ this is not a tokenizer")
    return folder


def _a_file(t: Path) -> Path:
    (t / "afile").write_text("x")
    return t / "afile"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_reported_in_one_line(tmp_path, capsys, case):
    _, setup, expected = case
    extra, replace, args = setup(tmp_path)
    err = problems(capsys, base_toml(tmp_path, extra, replace), *args)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert any(expected in line for line in lines), err
    assert not (tmp_path / "out").exists()  # nothing created


def test_missing_and_invalid_config_files(tmp_path, capsys):
    assert "does not exist" in problems(capsys, tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[training\nseq_len = 1\n")
    assert "not valid TOML" in problems(capsys, bad)


def test_every_problem_is_reported_in_one_run(tmp_path, capsys):
    err = problems(capsys, base_toml(tmp_path), "--training.seq_len", "0", "--model.flavor", "huge",
                   "--optimizer.lr", "-1", "--attention.backend", "varlen")
    for expected in ("seq_len = 0", "flavor = 'huge'", "lr = -1", "needs a CUDA GPU"):
        assert expected in err
    assert "4 problem(s)" in err


def test_shipped_configs_pass_except_for_missing_real_assets(capsys):
    for config in sorted(DEBUG_CONFIG.parent.glob("debug*.toml")):
        assert cli(["check", "--job.config_file", str(config)]) == 0, capsys.readouterr().err


def test_run_train_stops_before_torchrun_with_exit_2_and_creates_nothing(tmp_path):
    proc = run_command(["./run_train.sh", "--job.config_file", str(DEBUG_CONFIG), "--job.dump_folder",
                        str(tmp_path / "out"), "--training.seq_len", "0"], env=PREFLIGHT)
    assert proc.returncode == 2
    assert "error: [training] seq_len = 0" in proc.stderr
    assert "Traceback" not in proc.output and "ext.launch" not in proc.output
    assert not (tmp_path / "out").exists()


# -- seeding -------------------------------------------------------------------------------

@pytest.mark.slow
def test_same_seed_same_losses_different_seed_different_losses(tmp_path):
    def losses(name: str, seed: int) -> list[float]:
        run_train(["--job.config_file", str(DEBUG_CONFIG), "--job.dump_folder", str(tmp_path / name),
                   "--training.steps", "4", "--metrics.log_freq", "1", "--debug.seed", str(seed),
                   "--data.num_workers", "1"])
        return [h["loss"] for h in read_summary(tmp_path / name)["history"]]

    first, again, other = losses("a", 11), losses("b", 11), losses("c", 12)
    assert first == again
    assert first != other
