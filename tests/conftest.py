"""Shared helpers: real training runs through run_train.sh and stock torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "ext" / "assets" / "tokenizer"
WEB_CORPUS = REPO / "ext" / "assets" / "data" / "web.jsonl"
DEBUG_CONFIG = REPO / "train_configs" / "debug.toml"


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("EXT_SKIP_SETUP", "1")  # run_tests.sh has already set up .venv
    # The preflight (its own interpreter, ~5 s) is tested by the tests that pass
    # PREFLIGHT; the other runs start the trainer directly.
    env.setdefault("EXT_SKIP_PREFLIGHT", "1")
    env.update(extra or {})
    return env


def run_command(cmd: list[str], env: dict[str, str] | None = None, timeout: int = 600):
    """Run ``cmd`` from the repo root; return the CompletedProcess (output captured)."""
    proc = subprocess.run(
        cmd, cwd=REPO, env=_env(env), capture_output=True, text=True, timeout=timeout
    )
    proc.output = proc.stdout + proc.stderr  # type: ignore[attr-defined]
    return proc


PREFLIGHT = {"EXT_SKIP_PREFLIGHT": "0"}


def run_train(args: list[str], nproc: int = 1, env: dict[str, str] | None = None):
    """``./run_train.sh ARGS`` with NPROC processes; fails the test on a non-zero exit."""
    proc = run_command(["./run_train.sh", *args], env={"NPROC": str(nproc), **(env or {})})
    assert proc.returncode == 0, proc.output[-6000:]
    return proc


def read_summary(dump_folder: Path) -> dict:
    return json.loads((Path(dump_folder) / "train_summary.json").read_text())


def write_repeated_corpus(path: Path, n_docs: int) -> int:
    """Write ``n_docs`` copies of one document; return ``seq_len`` so that every
    packed row is that same document (BOS + text + EOS = seq_len + 1 tokens). Any
    split over ranks then yields the same global batch."""
    from transformers import AutoTokenizer

    text = "the river runs past the old mill and the miller counts seven sacks of grain"
    n_tokens = len(AutoTokenizer.from_pretrained(str(TOKENIZER))(text, add_special_tokens=False)["input_ids"])
    path.write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(n_docs)))
    return n_tokens + 1


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


def assert_resumes_exactly(loader, total: int, stop: int, keys=("input", "positions", "segment_ids")) -> None:
    """A loader restored from its state after ``stop`` batches yields batches
    ``stop + 1 .. total`` of an uninterrupted one, bit for bit. ``loader()``
    builds a fresh loader (what the trainer checkpoints: its state_dict)."""
    import numpy as np

    straight = [batch for _, batch in zip(range(total), loader())]
    first = loader()
    it = iter(first)
    for _ in range(stop):
        next(it)
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [batch for _, batch in zip(range(total - stop), resumed)]
    assert len(rest) == total - stop
    for (s1, l1), (s2, l2) in zip(straight[stop:], rest):
        assert all(np.array_equal(s1[k], s2[k]) for k in keys)
        assert np.array_equal(l1, l2)
