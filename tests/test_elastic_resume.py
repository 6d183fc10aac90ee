"""Resuming the data stream on another layout (dp ranks x loader workers).

Document identities come from the loader's test hook (EXT_DATA_TRACE): each
trained row lists its document pieces as (source, epoch, global range,
location in its file, tokens). "Exact" here: over a source epoch every record's tokens are
trained once in total across the layout change (no document repeated, none
skipped), checked against one uninterrupted reading of the whole corpus.
"""

from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ext.data.config import Data, resolve_sources
from ext.data.dataset import TRACE_ENV
from ext.data.loader import PackedDataLoader

from .test_loader import make_dataset, write_jsonl

KEYS = ("input", "positions", "segment_ids")


def _corpus(tmp_path: Path, on_exhaustion: str = "drop"):
    a = write_jsonl(tmp_path / "a.jsonl", [f"alpha{i} " + "one two " * (i % 23) for i in range(400)])
    b = write_jsonl(tmp_path / "b.jsonl", [f"bravo{i} " + "three " * (i % 41) for i in range(250)])
    return resolve_sources(Data(datasets=[str(a), str(b)], sampling_probs=[0.6, 0.4],
                                on_exhaustion=[on_exhaustion]))


def _loader(specs, rank: int, world: int, workers: int, buffer_docs: int = 24, seq_len: int = 48):
    cfg = Data(datasets=["x", "y"], buffer_docs=buffer_docs)
    ds = make_dataset(specs, cfg, seq_len=seq_len, dp_rank=rank, dp_world=world)
    kwargs = {"persistent_workers": True} if workers else {}
    return PackedDataLoader(ds, rank, world, KEYS, batch_size=2, num_workers=workers, **kwargs)


def _read_trace(folder: Path, rank: int) -> list[list[list[int]]]:
    """Batches -> rows -> document pieces [source, epoch, range, record, tokens]."""
    path = folder / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _tokens(batches) -> Counter:
    """Tokens trained per document identity (source, epoch, range, record)."""
    out: Counter = Counter()
    for batch in batches:
        for row in batch:
            for s, e, g, r, n in row:
                out[(s, e, g, r)] += n
    return out


def _layout_run(specs, tmp_path, monkeypatch, name, world, workers, batches=None, state=None):
    """Each rank of a layout reads ``batches`` batches (None: to exhaustion) in
    turn, in this process; returns (tokens per document, global loader state)."""
    folder = tmp_path / name
    folder.mkdir()
    monkeypatch.setenv(TRACE_ENV, str(folder))
    loaders = [_loader(specs, r, world, workers) for r in range(world)]
    for loader in loaders:
        if state is not None:
            loader.local_state()  # as the checkpoint load's template does: may start workers
            loader.load_global_state(state)
    for r, loader in enumerate(loaders):
        for i, _ in enumerate(loader, 1):
            if batches is not None and i == batches:
                break
    ranks = [loader.local_state() for loader in loaders]
    end = {"dp_world_size": world, "num_workers": workers, "ranks": ranks}
    return _tokens(b for r in range(world) for b in _read_trace(folder, r)), end


@pytest.fixture
def drop_corpus(tmp_path, monkeypatch):
    specs = _corpus(tmp_path)
    whole, _ = _layout_run(specs, tmp_path, monkeypatch, "whole", 1, 0)
    return specs, whole


def _check_exact(whole: Counter, before: Counter, after: Counter) -> None:
    union = before + after
    assert set(union) == set(whole), (len(set(whole) - set(union)), len(set(union) - set(whole)))
    assert union == whole  # every document's tokens trained once: none repeated, none skipped


@pytest.mark.parametrize("old,new", [((2, 2), (1, 1)), ((1, 2), (2, 1)), ((2, 1), (2, 3)), ((1, 3), (1, 2)),
                                     ((3, 0), (2, 0))], ids=lambda x: f"{x[0]}x{x[1]}")
def test_resume_on_another_layout_trains_every_document_once(drop_corpus, tmp_path, monkeypatch, caplog, old, new):
    specs, whole = drop_corpus
    before, state = _layout_run(specs, tmp_path, monkeypatch, "before", *old, batches=7)
    assert 0 < sum(before.values()) < sum(whole.values()) / 2
    with caplog.at_level("WARNING"):
        after, _ = _layout_run(specs, tmp_path, monkeypatch, "after", *new, state=state)
    _check_exact(whole, before, after)
    said = [r.message for r in caplog.records if "resuming on another layout" in r.message]
    assert len(said) == 1 and f"{old[0]} dp rank(s) x {old[1]} worker(s)" in said[0], said


def test_two_layout_changes_in_a_row_stay_exact(drop_corpus, tmp_path, monkeypatch):
    specs, whole = drop_corpus
    first, state = _layout_run(specs, tmp_path, monkeypatch, "first", 2, 2, batches=5)
    second, state = _layout_run(specs, tmp_path, monkeypatch, "second", 3, 1, batches=6, state=state)
    third, _ = _layout_run(specs, tmp_path, monkeypatch, "third", 1, 2, state=state)
    _check_exact(whole, first + second, third)


def test_same_layout_resume_after_handed_over_buffers_is_bit_exact(tmp_path, monkeypatch):
    """A reader still finishing handed-over buffers saves a state that resumes bit-exactly."""
    specs = _corpus(tmp_path)
    _, state = _layout_run(specs, tmp_path, monkeypatch, "before", 2, 2, batches=4)

    def resumed():
        loader = _loader(specs, 0, 1, 1)
        loader.load_global_state(state)
        return loader

    straight = [batch for _, batch in zip(range(30), resumed())]
    first = resumed()
    it = iter(first)
    for _ in range(3):  # still inside the handed-over buffers (4 of them)
        next(it)
    mid = pickle.loads(first.state_dict()["global"])
    again = _loader(specs, 0, 1, 1)
    again.load_global_state(mid)
    rest = [batch for _, batch in zip(range(27), again)]
    for (s1, l1), (s2, l2) in zip(straight[3:], rest):
        assert all(np.array_equal(s1[k], s2[k]) for k in KEYS) and np.array_equal(l1, l2)


def test_restart_sources_keep_each_epoch_whole_across_readers_at_different_epochs(tmp_path, monkeypatch):
    specs = _corpus(tmp_path, "restart")
    folder = tmp_path / "t"
    folder.mkdir()
    monkeypatch.setenv(TRACE_ENV, str(folder))
    # reader 0 reads further than reader 1: at the change they are in different epochs
    loaders = [_loader(specs, r, 2, 0) for r in range(2)]
    for loader, n in zip(loaders, (150, 20)):
        for i, _ in enumerate(loader, 1):
            if i == n:
                break
    before = _tokens(b for r in range(2) for b in _read_trace(folder, r))
    assert {e for (_, e, _, _) in before} == {0, 1}
    state = {"dp_world_size": 2, "num_workers": 0, "ranks": [lo.local_state() for lo in loaders]}
    after_folder = tmp_path / "after"
    after_folder.mkdir()
    monkeypatch.setenv(TRACE_ENV, str(after_folder))
    new = [_loader(specs, r, 3, 0) for r in range(3)]
    for loader in new:
        loader.load_global_state(state)
        for i, _ in enumerate(loader, 1):
            if i == 250:
                break
    after = _tokens(b for r in range(3) for b in _read_trace(after_folder, r))
    union = before + after
    epochs = [{(s, g, r): n for (s, e, g, r), n in union.items() if e == epoch} for epoch in (0, 1)]
    # every record of epochs 1 and 2 trained once, with its full length (the same in both)
    assert len(epochs[0]) == 650 and epochs[0] == epochs[1]


# -- real runs: torchrun, gloo, the trainer's checkpoints ---------------------------------

STEP, STEPS, GLOBAL_BATCH = 3, 6, 4


def _run_args(tmp_path: Path, dump: Path, ranks: int, workers: int) -> list[str]:
    """The shipped multi-source debug config on two small sources read once ("drop")."""
    import re

    from .test_checkpoint import MULTISOURCE

    a = write_jsonl(tmp_path / "a.jsonl", [f"alpha{i} " + "one two " * (i % 23) for i in range(160)])
    b = write_jsonl(tmp_path / "b.jsonl", [f"bravo{i} " + "three " * (i % 41) for i in range(100)])
    toml = MULTISOURCE.read_text()
    toml = re.sub(r"datasets = \[[^\]]*\]", f'datasets = ["{a}", "{b}"]', toml)
    for key, value in (("names", '["a", "b"]'), ("sampling_probs", "[0.6, 0.4]"), ("on_exhaustion", '["drop"]')):
        toml = re.sub(rf"\n{key} = [^\n]*", f"\n{key} = {value}", toml)
    config = tmp_path / "elastic.toml"
    config.write_text(toml)
    return ["--job.config_file", str(config), "--job.dump_folder", str(dump),
            "--data.buffer_docs", "32", "--data.num_workers", str(workers),
            "--training.seq_len", "64", "--training.global_batch_size", str(GLOBAL_BATCH),
            "--training.local_batch_size", "2", "--skyladder.horizon_steps", "5", "--metrics.log_freq", "1",
            "--checkpoint.enable", "--checkpoint.interval", str(STEP), "--checkpoint.no-last-save-model-only"]


def _in_process_rest(args: list[str], folder: Path, state: dict | None, monkeypatch) -> Counter:
    """Every document a 1-rank, 0-worker loader yields from ``state`` to exhaustion."""
    from torchtitan.components.tokenizer import HuggingFaceTokenizer
    from torchtitan.config import ConfigManager

    from ext.data.loader import build_packed_dataloader

    from .conftest import TOKENIZER

    folder.mkdir()
    monkeypatch.setenv(TRACE_ENV, str(folder))
    cfg = ConfigManager().parse_args([*args, "--data.num_workers", "0"])
    loader = build_packed_dataloader(dp_world_size=1, dp_rank=0, tokenizer=HuggingFaceTokenizer(str(TOKENIZER)),
                                     job_config=cfg)
    if state is not None:
        loader.load_global_state(state)
    for _ in loader:
        pass
    return _tokens(_read_trace(folder, 0))


def _trained(folder: Path, ranks: int, batches_per_rank: int) -> Counter:
    """Tokens per document of the batches the steps trained (the trace also holds the batch read ahead)."""
    return _tokens(b for r in range(ranks) for b in _read_trace(folder, r)[:batches_per_rank])


@pytest.mark.slow
@pytest.mark.parametrize("old,new", [((2, 2), (1, 1)), ((1, 2), (2, 1)), ((2, 1), (2, 3))],
                         ids=lambda x: f"{x[0]}x{x[1]}")
def test_a_real_run_resumed_on_another_layout_trains_every_document_once(tmp_path, monkeypatch, old, new):
    from ext.data.skyladder import skyladder_window

    from .conftest import read_summary, run_train

    dump = tmp_path / "run"
    (before, after) = (tmp_path / "before", tmp_path / "after")
    before.mkdir()
    after.mkdir()
    run_train([*_run_args(tmp_path, dump, *old), "--training.steps", str(STEP)], nproc=old[0],
              env={TRACE_ENV: str(before)})
    resumed = run_train([*_run_args(tmp_path, dump, *new), "--training.steps", str(STEPS)], nproc=new[0],
                        env={TRACE_ENV: str(after)})
    assert resumed.output.count("resuming on another layout") == 1, resumed.output[-3000:]
    per_step = lambda ranks: GLOBAL_BATCH // (2 * ranks)  # noqa: E731 (local batch 2)
    trained = (_trained(before, old[0], STEP * per_step(old[0]))
               + _trained(after, new[0], (STEPS - STEP) * per_step(new[0])))
    with open(after / "loader_state.pkl", "rb") as f:  # what the save of step STEPS holds
        final = pickle.load(f)
    args = _run_args(tmp_path, dump, *new)
    rest = _in_process_rest(args, tmp_path / "rest", final, monkeypatch)
    whole = _in_process_rest(args, tmp_path / "whole", None, monkeypatch)
    _check_exact(whole, trained, rest)
    # the SkyLadder window follows the global optimizer step across the change
    history = read_summary(dump)["history"]
    assert [e["step"] for e in history] == list(range(STEP + 1, STEPS + 1))
    from ext.data.skyladder import SkyLadder

    sky = SkyLadder(enable=True, schedule="sin", init_window=32, horizon_steps=5, rounding=16)
    for entry in history:
        assert entry["data/attention_window"] == skyladder_window(sky, entry["step"] - 1, 64, STEPS), entry
