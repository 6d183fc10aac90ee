"""The packed multi-source loader, on real files, the real tokenizer and torchdata."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer
from torchdata.stateful_dataloader import StatefulDataLoader
from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.config import ConfigManager

import ext.job_config  # noqa: F401
from ext.data.config import Data, resolve_sources
from ext.data.dataset import PackedMixtureDataset
from ext.data.encoders import TextEncoder
from ext.data.loader import PackedDataLoader, build_packed_dataloader, resolve_num_workers
from ext.data.stats import BatchStats
from ext.core.errors import ConfigError, DataError

from ext.training.metrics import data_window_metrics

from .conftest import TOKENIZER, assert_resumes_exactly

TOK = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
BOS, EOS, PAD = 0, 1, 2


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def numbered_docs(prefix: str, ids: range) -> list[str]:
    return [f"{prefix}{i} " + "word " * (i % 7) for i in ids]


def make_dataset(specs, cfg: Data, seq_len=64, dp_rank=0, dp_world=1, seed=0):
    return PackedMixtureDataset(specs, cfg, TextEncoder(TOK, BOS, EOS), PAD, seq_len, dp_rank, dp_world, seed)


def segments(sample_input: np.ndarray, seg: np.ndarray) -> list[np.ndarray]:
    """Token runs of each segment of a row's input (the row's last token is not in the input)."""
    return [sample_input[seg == s] for s in np.unique(seg)]


def doc_names(batches) -> list[str]:
    """The ``[a-z]+N`` names of the documents in ``batches`` (rows or batches of rows)."""
    names = []
    for sample, _labels in batches:
        inputs, segs = np.atleast_2d(sample["input"].numpy()), np.atleast_2d(sample["segment_ids"].numpy())
        for x, s in zip(inputs, segs):
            for run in segments(x, s):
                text = TOK.decode(run.tolist(), skip_special_tokens=True)
                names += re.findall(r"[a-z]+\d+", text)
    return names


# -- config --------------------------------------------------------------------

def test_mismatched_probabilities_are_a_config_error(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", ["x"])
    with pytest.raises(ConfigError, match=r"\[data\] sampling_probs has 1 entries but datasets has 2"):
        resolve_sources(Data(datasets=[str(f), str(f)], sampling_probs=[1.0], names=["a", "b"]))


@pytest.mark.parametrize("probs", [[-0.1, 1.0], [0.0, 0.0], [float("nan"), 1.0]])
def test_invalid_probabilities_are_a_config_error(tmp_path, probs):
    f = write_jsonl(tmp_path / "a.jsonl", ["x"])
    with pytest.raises(ConfigError, match=r"\[data\] sampling_probs"):
        resolve_sources(Data(datasets=[str(f), str(f)], sampling_probs=probs, names=["a", "b"]))


def test_probabilities_are_normalized_and_per_source_lists_broadcast(tmp_path):
    a, b = write_jsonl(tmp_path / "a.jsonl", ["x"]), write_jsonl(tmp_path / "b.jsonl", ["y"])
    specs = resolve_sources(Data(datasets=[str(a), str(b)], sampling_probs=[3, 1], on_exhaustion=["drop"]))
    assert [s.prob for s in specs] == [0.75, 0.25]
    assert [s.name for s in specs] == ["a", "b"] and {s.on_exhaustion for s in specs} == {"drop"}


def test_missing_location_says_what_to_give(tmp_path):
    with pytest.raises(ConfigError, match=r"datasets\[0\] .* does not exist"):
        resolve_sources(Data(datasets=[str(tmp_path / "nope.jsonl")]))


def test_data_section_parses_from_toml(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[job]\ncustom_config_module = "ext.job_config"\n[data]\n'
                    'datasets = ["a", "b"]\nsampling_probs = [0.5, 0.5]\npacking = "greedy"\n')
    cfg = ConfigManager().parse_args(["--job.config_file", str(toml)])
    assert cfg.data.datasets == ["a", "b"] and cfg.data.packing == "greedy"


# -- mixture ---------------------------------------------------------------------

def single_token_words(n: int) -> list[str]:
    """``n`` words that the tokenizer encodes, after a space, as one token each."""
    words = [t[1:] for t in sorted(TOK.get_vocab()) if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 3]
    return [w for w in words if len(TOK.encode(" " + w, add_special_tokens=False).ids) == 1][:n]


def test_realized_token_shares_match_targets_over_a_million_tokens(tmp_path):
    rng = np.random.default_rng(0)
    vocab = single_token_words(15)
    groups = [vocab[0:5], vocab[5:10], vocab[10:15]]  # disjoint token sets, one per source
    medians = [30, 120, 400]  # very different document lengths
    paths = []
    for k, (group, median) in enumerate(zip(groups, medians)):
        lengths = np.maximum(1, rng.lognormal(np.log(median), 0.8, 500).astype(int))
        texts = [" " + " ".join(rng.choice(group, int(n))) for n in lengths]
        paths.append(write_jsonl(tmp_path / f"s{k}.jsonl", texts))
    probs = [0.5, 0.3, 0.2]
    specs = resolve_sources(Data(datasets=[str(p) for p in paths], sampling_probs=probs))
    ds = make_dataset(specs, Data(datasets=["x"] * 3, buffer_docs=512), seq_len=1024)
    group_ids = [np.array([TOK.token_to_id("Ġ" + w) for w in g]) for g in groups]
    counts = np.zeros(3)
    for sample, labels in ds:
        for run in segments(sample["input"].numpy(), sample["segment_ids"].numpy()):
            owner = [k for k, ids in enumerate(group_ids) if np.isin(run, ids).any()]
            if owner:  # a document's segment: its tokens, BOS and EOS included
                (k,) = owner
                counts[k] += len(run)
        if counts.sum() >= 1_000_000:
            break
    shares = counts / counts.sum()
    assert np.allclose(shares, probs, atol=0.02), shares


# -- sharding ----------------------------------------------------------------------

@pytest.mark.parametrize("n_files", [4, 3], ids=["by-shard", "by-record"])
def test_two_ranks_times_two_workers_read_disjoint_parts_that_cover_the_epoch(tmp_path, n_files):
    docs = numbered_docs("doc", range(200))
    folder = tmp_path / "src"
    folder.mkdir()
    for k in range(n_files):
        write_jsonl(folder / f"part{k}.jsonl", docs[k::n_files])
    specs = resolve_sources(Data(datasets=[str(folder)], on_exhaustion=["drop"]))
    seen = []
    for rank in range(2):
        ds = make_dataset(specs, Data(datasets=["x"], buffer_docs=16), dp_rank=rank, dp_world=2)
        names = doc_names(StatefulDataLoader(ds, batch_size=4, num_workers=2))
        seen.append(names)
    assert sorted(seen[0] + seen[1]) == sorted(f"doc{i}" for i in range(200))
    assert not set(seen[0]) & set(seen[1])


def test_restart_begins_a_reshuffled_epoch(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", numbered_docs("doc", range(40)))
    specs = resolve_sources(Data(datasets=[str(f)]))
    ds = make_dataset(specs, Data(datasets=["x"], buffer_docs=10))
    names: list[str] = []
    for item in ds:
        names += doc_names([item])
        if len(names) >= 80:
            break
    first, second = names[:40], names[40:80]
    assert sorted(first) == sorted(second) == sorted(f"doc{i}" for i in range(40))
    assert first != second


# -- exact resume --------------------------------------------------------------------

def test_resume_after_batch_k_reproduces_the_uninterrupted_batches(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [f"alpha{i} " + "one two " * (i % 50) for i in range(300)])
    b = write_jsonl(tmp_path / "b.jsonl", [f"bravo{i} " + "three " * (i % 90) for i in range(200)])
    specs = resolve_sources(Data(datasets=[str(a), str(b)], sampling_probs=[0.7, 0.3]))
    cfg = Data(datasets=["x", "y"], buffer_docs=64)

    def loader():  # what the trainer checkpoints: torchtitan's dp-rank-keyed, pickled state
        return PackedDataLoader(make_dataset(specs, cfg), 0, 1, ("input", "positions", "segment_ids"),
                                batch_size=4, num_workers=2, persistent_workers=True)

    assert_resumes_exactly(loader, total=60, stop=23)


# -- bad records and empty sources ------------------------------------------------------

def test_malformed_line_is_skipped_counted_and_named(tmp_path, caplog):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"text": "good0"}) + "\n{not json\n" + json.dumps({"txt": "x"}) + "\n"
                 + json.dumps({"text": "good1"}) + "\n")
    specs = resolve_sources(Data(datasets=[str(f)], on_exhaustion=["drop"]))
    ds = make_dataset(specs, Data(datasets=["x"]))
    with caplog.at_level(logging.WARNING):
        names = doc_names(ds)
    assert sorted(names) == ["good0", "good1"]
    assert ds._sources[0].bad_count == 2
    assert f"{f}:2: not valid JSON" in caplog.text and f"{f}:3: no field 'text'" in caplog.text


def test_malformed_line_is_an_error_when_configured(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text("{oops\n")
    specs = resolve_sources(Data(datasets=[str(f)]))
    with pytest.raises(DataError, match=rf"{re.escape(str(f))}:1"):
        list(make_dataset(specs, Data(datasets=["x"], bad_records="error")))


def test_empty_source_is_a_clear_error_at_build(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", ["hello"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    toml = tmp_path / "c.toml"
    toml.write_text(f'[job]\ncustom_config_module = "ext.job_config"\n[data]\n'
                    f'datasets = ["{good}", "{empty}"]\n')
    cfg = ConfigManager().parse_args(["--job.config_file", str(toml)])
    with pytest.raises(ConfigError, match=r"source 'empty' .* has no records"):
        build_packed_dataloader(1, 0, HuggingFaceTokenizer(str(TOKENIZER)), cfg)


# -- the loader the trainer sees -----------------------------------------------------------

def test_trainer_batches_carry_only_model_inputs_and_feed_the_metrics(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", numbered_docs("alpha", range(100)))
    toml = tmp_path / "c.toml"
    toml.write_text(f'[job]\ncustom_config_module = "ext.job_config"\n[data]\ndatasets = ["{a}"]\n'
                    'reset_positions = true\nnum_workers = "0"\n[training]\nseq_len = 32\nlocal_batch_size = 2\n')
    cfg = ConfigManager().parse_args(["--job.config_file", str(toml)])
    loader = build_packed_dataloader(1, 0, HuggingFaceTokenizer(str(TOKENIZER)), cfg)
    sample, labels = next(iter(loader))  # what torchtitan's own loop reads
    assert set(sample) == {"input", "positions", "segment_ids"}  # document masking is on by default
    assert sample["input"].shape == labels.shape == (2, 32)
    sample, labels, stats = next(loader.batches_with_stats())  # what our Trainer reads
    assert set(sample) == {"input", "positions", "segment_ids"}
    metrics = data_window_metrics(stats)
    assert metrics["data/mix/a"] == pytest.approx(1.0)
    assert 0 <= metrics["data/pad_fraction"] < 1


def test_auto_workers_come_from_cores_whatever_the_file_count(tmp_path, monkeypatch):
    f = write_jsonl(tmp_path / "a.jsonl", ["x"])
    specs = resolve_sources(Data(datasets=[str(f)]))
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_num_workers("auto", specs, dp_world_size=1) == 7  # 16/2 - 1: one file splits by size
    assert resolve_num_workers("3", specs, dp_world_size=1) == 3  # explicit wins
    assert resolve_num_workers(2, specs, dp_world_size=1) == 2  # a TOML integer


@pytest.mark.parametrize("value, expected", [("2", 2), ('"2"', 2), ('"auto"', "auto")])
def test_num_workers_takes_an_integer_or_auto_in_toml(tmp_path, value, expected):
    from ext.preflight import field_types

    toml = tmp_path / "c.toml"
    toml.write_text(f'[job]\ncustom_config_module = "ext.job_config"\n[data]\nnum_workers = {value}\n')
    cfg = ConfigManager().parse_args(["--job.config_file", str(toml)])
    assert cfg.data.num_workers in (expected, str(expected))
    assert [p for p in field_types(cfg, None) if "num_workers" in p] == []
    cli = ConfigManager().parse_args(["--job.config_file", str(toml), "--data.num_workers", "3"])
    assert cli.data.num_workers == 3


@pytest.mark.parametrize("value", [-1, "many", True])
def test_num_workers_refuses_other_values(tmp_path, value):
    from ext.data.config import parse_num_workers

    with pytest.raises(ConfigError, match=r"\[data\] num_workers = .*: use \"auto\" or an integer >= 0"):
        parse_num_workers(value)


def test_segment_ids_stay_out_of_the_batch_when_nothing_is_masked(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", numbered_docs("alpha", range(20)))
    toml = tmp_path / "c.toml"
    toml.write_text(f'[job]\ncustom_config_module = "ext.job_config"\n[data]\ndatasets = ["{a}"]\n'
                    'num_workers = "0"\n[attention]\ndocument_masking = false\n'
                    '[training]\nseq_len = 32\nlocal_batch_size = 2\n')
    cfg = ConfigManager().parse_args(["--job.config_file", str(toml)])
    sample, _ = next(iter(build_packed_dataloader(1, 0, HuggingFaceTokenizer(str(TOKENIZER)), cfg)))
    assert set(sample) == {"input"}


# -- loader statistics: typed, per loader ---------------------------------------------------

def packed_loader(tmp_path: Path, name: str, sources: dict[str, Path], workers: int, seq_len: int = 32):
    """``build_packed_dataloader`` on ``sources`` (name -> jsonl), each read once."""
    toml = tmp_path / f"{name}.toml"
    toml.write_text(
        f'[job]\ncustom_config_module = "ext.job_config"\n[data]\n'
        f'datasets = {json.dumps([str(p) for p in sources.values()])}\nnames = {json.dumps(list(sources))}\n'
        f'on_exhaustion = ["drop"]\nbuffer_docs = 16\nnum_workers = "{workers}"\n'
        f'[training]\nseq_len = {seq_len}\nlocal_batch_size = 3\n'
    )
    cfg = ConfigManager().parse_args(["--job.config_file", str(toml)])
    return build_packed_dataloader(1, 0, HuggingFaceTokenizer(str(TOKENIZER)), cfg)


def two_sources(tmp_path: Path) -> dict[str, Path]:
    """Source "a": documents of 3 to ~45 tokens (rows of 33 cut some); source "b":
    short ones and two bad records."""
    a = write_jsonl(tmp_path / "a.jsonl", [f"alpha{i} " + "word " * (i % 41) for i in range(60)])
    b = write_jsonl(tmp_path / "b.jsonl", numbered_docs("bravo", range(40)))
    b.write_text(b.read_text() + "{not json\n" + json.dumps({"txt": "no text field"}) + "\n")
    return {"a": a, "b": b}


def brute_force_pairs(seg: np.ndarray, real: np.ndarray) -> tuple[int, int]:
    """(pairs within segments, causal pairs) attended by the real queries of one row."""
    n = len(seg)
    keys = np.tril(np.ones((n, n), dtype=bool))  # [query, key]: key <= query
    same = seg[:, None] == seg[None, :]
    return int((keys & same)[real].sum()), int(keys[real].sum())


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_statistics_are_named_fields_equal_to_what_the_rows_contain(tmp_path, monkeypatch, workers):
    # The reference for each row comes from the batch itself and from the trace hook
    # (the document pieces of every row, with their tokens), not from the loader's counts.
    monkeypatch.setenv("EXT_DATA_TRACE", str(tmp_path))
    seq_len = 32
    loader = packed_loader(tmp_path, "c", two_sources(tmp_path), workers, seq_len)
    batches = [(sample, labels, stats) for sample, labels, stats in loader.batches_with_stats()]
    traces = [json.loads(line) for line in (tmp_path / "rank0.jsonl").read_text().splitlines()]
    assert len(traces) == len(batches) > 5
    pieces: dict[tuple, int] = {}  # document -> pieces over the whole epoch (all of it is read)
    for trace in traces:
        for row in trace:
            for p in row:
                pieces[tuple(p[:4])] = pieces.get(tuple(p[:4]), 0) + 1
    assert max(pieces.values()) > 1  # the cut-document case is exercised
    total = BatchStats()
    for (sample, labels, stats), trace in zip(batches, traces):
        assert type(stats) is BatchStats
        rows = len(labels)
        n_valid = np.array([sum(p[4] for p in row) for row in trace])  # non-padding of seq_len + 1
        real = np.arange(seq_len)[None, :] < n_valid[:, None]
        pairs = [brute_force_pairs(s, r) for s, r in zip(sample["segment_ids"].numpy(), real)]
        assert stats.rows == rows
        assert stats.row_tokens == rows * (seq_len + 1)
        assert stats.pad_tokens == int((seq_len + 1 - n_valid).sum())
        assert stats.docs == pytest.approx(sum(1 / pieces[tuple(p[:4])] for row in trace for p in row))
        assert stats.cut_docs == pytest.approx(
            sum(1 / pieces[tuple(p[:4])] for row in trace for p in row if pieces[tuple(p[:4])] > 1))
        assert stats.real_tokens == int(real.sum())
        assert stats.trained_tokens == int((labels != -100).sum())
        assert stats.attn_pairs == sum(p for p, _ in pairs)
        assert stats.attn_pairs_causal == sum(c for _, c in pairs)
        assert stats.window_sum == rows * seq_len and stats.max_window == seq_len  # no SkyLadder
        assert stats.source_tokens == {name: sum(p[4] for row in trace for p in row if p[0] == k)
                                       for k, name in enumerate(["a", "b"])}
        total += stats
    assert total.bad_records == {"a": 0, "b": 2}
    assert total.rows == sum(len(labels) for _, labels, _ in batches)
    assert total.docs == pytest.approx(100)  # every document of both sources, once
    assert total.attention_counts.real_tokens == total.real_tokens


def test_two_loaders_in_one_process_keep_their_own_statistics(tmp_path):
    sources = two_sources(tmp_path)
    only_a, only_b = {"a": sources["a"]}, {"b": sources["b"]}
    alone_a = [s for _, _, s in packed_loader(tmp_path, "a", only_a, 0).batches_with_stats()]
    alone_b = [s for _, _, s in packed_loader(tmp_path, "b", only_b, 2).batches_with_stats()]
    # both built before either is read (b last), then read in turns, one in worker processes
    first, second = packed_loader(tmp_path, "a", only_a, 0), packed_loader(tmp_path, "b", only_b, 2)
    got: dict[str, list[BatchStats]] = {"a": [], "b": []}
    readers = {"a": first.batches_with_stats(), "b": second.batches_with_stats()}
    while readers:
        for name, batches in list(readers.items()):
            batch = next(batches, None)
            if batch is None:
                del readers[name]
            else:
                got[name].append(batch[2])
    assert got["a"] == alone_a and got["b"] == alone_b
    assert all(set(s.source_tokens) == set(s.bad_records) == {"a"} for s in got["a"])
    assert all(set(s.source_tokens) == set(s.bad_records) == {"b"} for s in got["b"])
    assert sum(got["a"], BatchStats()).bad_records == {"a": 0}
    assert sum(got["b"], BatchStats()).bad_records == {"b": 2}
    for name, stats in got.items():
        assert data_window_metrics(sum(stats, BatchStats()))[f"data/mix/{name}"] == pytest.approx(1.0)
