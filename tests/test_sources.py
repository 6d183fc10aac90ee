"""The reading layer: every format, one bad-record policy, the plan, balance, streaming.

All on real files the tests write (gzip, zstd, parquet, arrow, JSON arrays)
and the real tokenizer."""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer
from torchdata.stateful_dataloader import StatefulDataLoader

from ext.data.config import Data, SourceSpec, resolve_sources
from ext.data.dataset import PackedMixtureDataset
from ext.data.encoders import TextEncoder
from ext.data.loader import PackedDataLoader
from ext.data.sources import Source, count_lines, plan_source
from ext.core.errors import DataError

from .conftest import TOKENIZER, assert_resumes_exactly

TOK = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
BOS, EOS, PAD = 0, 1, 2


def numbered(prefix: str, ids) -> list[str]:
    return [f"{prefix}{i} " + "word " * (i % 5) for i in ids]


def jsonl_bytes(records: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def write(path: Path, data: bytes) -> Path:
    """``data`` to ``path``, compressed as its extension says (.gz, .zst)."""
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    elif path.suffix == ".zst":
        with pa.output_stream(str(path), compression="zstd") as out:
            out.write(data)
    else:
        path.write_bytes(data)
    return path


def write_table(path: Path, texts: list, row_group_size: int = 7, stream: bool = False) -> Path:
    table = pa.table({"text": pa.array(texts, pa.string()), "n": list(range(len(texts)))})
    if path.suffix == ".parquet":
        pq.write_table(table, path, row_group_size=row_group_size)
    else:
        with pa.OSFile(str(path), "wb") as sink:
            writer = (pa.ipc.new_stream if stream else pa.ipc.new_file)(sink, table.schema)
            writer.write_table(table, max_chunksize=row_group_size)
            writer.close()
    return path


def spec_of(location, **kw) -> SourceSpec:
    (spec,) = resolve_sources(Data(datasets=[str(location)], on_exhaustion=["drop"], **kw))
    return spec


def read_all(spec: SourceSpec, reader=0, n_readers=1, bad_records="skip", shuffle=False, seed=0):
    """Every document one reader gets in one pass, decoded."""
    source = Source(plan_source(spec), 0, reader, n_readers, TextEncoder(TOK, None, None), seed, shuffle, bad_records)
    out = []
    while (doc := source.next_document()) is not None:
        out.append(TOK.decode(doc.tolist()))
    return out, source


def make_dataset(specs, cfg: Data, seq_len=64, dp_rank=0, dp_world=1, seed=0):
    return PackedMixtureDataset(specs, cfg, TextEncoder(TOK, BOS, EOS), PAD, seq_len, dp_rank, dp_world, seed)


def doc_names(batches) -> list[str]:
    names = []
    for sample, _labels in batches:
        inputs, segs = np.atleast_2d(sample["input"].numpy()), np.atleast_2d(sample["segment_ids"].numpy())
        for x, s in zip(inputs, segs):
            for seg in np.unique(s):
                names += re.findall(r"[a-z]+\d+", TOK.decode(x[s == seg].tolist(), skip_special_tokens=True))
    return names


# -- every format reads the same documents ------------------------------------------------

TEXTS = numbered("doc", range(30))
LINE_FORMATS = ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.json"]


@pytest.mark.parametrize("name", LINE_FORMATS + ["a.txt", "a.txt.gz", "a.parquet", "arrow-file.arrow",
                                                 "arrow-stream.arrow", "array.json"])
def test_every_format_reads_every_record_once_in_order(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".parquet") or name.endswith(".arrow"):
        write_table(path, TEXTS, stream="stream" in name)
    elif name == "array.json":
        path.write_text(json.dumps([{"text": t} for t in TEXTS]))
    elif ".txt" in name:
        write(path, ("\n".join(TEXTS) + "\n").encode())
    else:
        write(path, jsonl_bytes([{"text": t} for t in TEXTS]))
    docs, source = read_all(spec_of(path))
    assert docs == TEXTS and source.bad_count == 0


# -- one bad-record policy -------------------------------------------------------------------

BAD_LINES = [
    (b'{"text": "good0"}', None),
    (b'{not json', "not valid JSON"),
    (b'{"text": "caf\xe9"}', "not valid UTF-8 (byte 0xe9"),
    (b'{"text": "lone \\ud800 surrogate"}', "field 'text' holds a lone surrogate (U+D800)"),
    (b'{"text": null}', "field 'text' is null"),
    (b'{"body": "x"}', "no field 'text'"),
    (b'{"text": 7}', "field is not a string"),
    (b'{"text": ""}', "empty text"),
    (b'["text"]', "not a JSON object"),
    (b'{"text": "good1"}', None),
]


@pytest.mark.parametrize("name", LINE_FORMATS)
def test_bad_lines_are_skipped_counted_and_named_by_file_and_line(tmp_path, name, caplog):
    path = write(tmp_path / name, b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    with caplog.at_level(logging.WARNING):
        docs, source = read_all(spec_of(path))
    assert docs == ["good0", "good1"]
    assert source.bad_count == 8
    for line_no, (_, why) in enumerate(BAD_LINES, 1):
        if why is not None:
            assert f"{path}:{line_no}: {why}" in caplog.text


@pytest.mark.parametrize("line_no", [2, 3, 4, 5, 6, 7, 8, 9])
def test_each_bad_line_stops_the_run_with_its_location_under_error(tmp_path, line_no):
    lines = [b'{"text": "good"}'] * 12
    lines[line_no - 1] = BAD_LINES[line_no - 1][0]
    path = write(tmp_path / "a.jsonl.zst", b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:{line_no}: .*bad_records = \"skip\""):
        read_all(spec_of(path), bad_records="error")


def test_a_lone_surrogate_costs_only_its_record_not_its_batch(tmp_path):
    records = [{"text": f"ok{i}"} for i in range(2000)]
    records[1500] = {"text": "bad \ud800"}
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))  # json escapes it as \ud800
    docs, source = read_all(spec_of(path))
    assert len(docs) == 1999 and source.bad_count == 1


def test_txt_with_a_non_utf8_byte_is_a_bad_record_not_a_replacement_character(tmp_path, caplog):
    path = write(tmp_path / "a.txt", b"first line\nbad \xff byte\nlast line\n")
    with caplog.at_level(logging.WARNING):
        docs, source = read_all(spec_of(path))
    assert docs == ["first line", "last line"] and source.bad_count == 1
    assert f"{path}:2: not valid UTF-8 (byte 0xff at column 5)" in caplog.text


@pytest.mark.parametrize("name", ["a.parquet", "a.arrow"])
def test_columnar_bad_values_are_skipped_and_named_by_row(tmp_path, name, caplog):
    path = write_table(tmp_path / name, ["good0", None, "", "good1"], row_group_size=3)
    with caplog.at_level(logging.WARNING):
        docs, source = read_all(spec_of(path))
    assert docs == ["good0", "good1"] and source.bad_count == 2
    assert f"{path}:row 1: field 'text' is null" in caplog.text and f"{path}:row 2: empty text" in caplog.text
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:row 1: field 'text' is null"):
        read_all(spec_of(path), bad_records="error")


def test_a_json_file_beside_jsonl_files_follows_the_same_policy(tmp_path, caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write(folder / "a.jsonl", jsonl_bytes([{"text": "alpha0"}]) + b"{broken\n")
    write(folder / "b.json", jsonl_bytes([{"text": "bravo0"}, {"text": None}]))
    with caplog.at_level(logging.WARNING):
        docs, source = read_all(spec_of(folder))
    assert sorted(docs) == ["alpha0", "bravo0"] and source.bad_count == 2
    assert f"{folder / 'a.jsonl'}:2: not valid JSON" in caplog.text
    assert f"{folder / 'b.json'}:2: field 'text' is null" in caplog.text


def test_missing_column_is_one_clear_error(tmp_path):
    path = write_table(tmp_path / "a.parquet", ["x"])
    with pytest.raises(DataError, match=r"has no field 'body' \(columns: \['text', 'n'\]\); set \[data\] text_fields"):
        plan_source(spec_of(path, text_fields=["body"]))


def test_parquet_is_read_in_place_not_copied_into_a_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    path = write_table(tmp_path / "a.parquet", TEXTS)
    docs, _ = read_all(spec_of(path))
    assert docs == TEXTS and not cache.exists()


def test_compressed_line_counts_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("EXT_DATA_CACHE", str(tmp_path / "cache"))
    path = write(tmp_path / "a.jsonl.zst", jsonl_bytes([{"text": t} for t in TEXTS]))
    assert count_lines(str(path)) == 30
    assert len(os.listdir(tmp_path / "cache")) == 1
    write(path, jsonl_bytes([{"text": t} for t in TEXTS[:10]]))
    os.utime(path, ns=(1, 1))  # a changed file is counted again
    assert count_lines(str(path)) == 10


# -- balanced reading -------------------------------------------------------------------------

def unequal_folder(tmp_path: Path, sizes: list[int]) -> tuple[Path, list[str]]:
    folder = tmp_path / "unequal"
    folder.mkdir()
    names, start = [], 0
    for k, n in enumerate(sizes):
        texts = numbered(f"d{k}x", range(start, start + n))
        write(folder / f"part{k}.jsonl", jsonl_bytes([{"text": t} for t in texts]))
        names += [re.findall(r"[a-z0-9]+x\d+", t)[0] for t in texts]
        start += n
    return folder, names


def rank_batches(spec: SourceSpec, rank: int, buffer_docs: int) -> list[list[str]]:
    """Document names per batch of one rank (2 ranks x 2 workers), read to the end."""
    ds = make_dataset([spec], Data(datasets=["x"], buffer_docs=buffer_docs), dp_rank=rank, dp_world=2)
    out = []
    for batch in StatefulDataLoader(ds, batch_size=4, num_workers=2):
        out.append(doc_names_unequal(batch))
    return out


def doc_names_unequal(batch) -> list[str]:
    sample, _ = batch
    names = []
    for x, s in zip(sample["input"].numpy(), sample["segment_ids"].numpy()):
        for seg in np.unique(s):
            names += re.findall(r"[a-z0-9]+x\d+", TOK.decode(x[s == seg].tolist(), skip_special_tokens=True))
    return names


def test_unequal_files_are_read_at_equal_rates_over_one_pass(tmp_path):
    """40/40/40/200 documents over 2 ranks x 2 workers: the first pass delivers every
    document once, up to the buffer the ranks stop in (what the shared stop keeps)."""
    folder, names = unequal_folder(tmp_path, [40, 40, 40, 200])
    spec = spec_of(folder)
    per_rank = [rank_batches(spec, rank, buffer_docs=8) for rank in range(2)]
    both = min(len(b) for b in per_rank)  # every rank stops at the batch the first one runs out
    seen = [n for batches in per_rank for batch in batches[:both] for n in batch]
    counts = {n: seen.count(n) for n in names}
    assert max(counts.values()) == 1  # none twice in one pass
    assert sum(c == 0 for c in counts.values()) <= 2 * 8  # missed: at most one buffer per rank
    assert not set(seen) - set(names)


def test_drop_delivers_at_least_99_percent_of_an_unequal_epoch_before_the_shared_stop(tmp_path):
    folder, names = unequal_folder(tmp_path, [400, 400, 400, 2000])
    spec = spec_of(folder)
    per_rank = [rank_batches(spec, rank, buffer_docs=16) for rank in range(2)]
    both = min(len(b) for b in per_rank)
    delivered = {n for batches in per_rank for batch in batches[:both] for n in batch}
    assert len(delivered) >= 0.99 * len(names), len(delivered) / len(names)


def test_the_plan_does_not_depend_on_the_reader_count_and_splits_by_size(tmp_path):
    folder, _ = unequal_folder(tmp_path, [40, 40, 40, 200])
    plan = plan_source(spec_of(folder))
    sizes = plan.stop - plan.start
    assert plan.unit == "bytes" and plan.total == sum(os.path.getsize(p) for p in spec_of(folder).files)
    assert len(plan) >= 3000 and sizes.max() - sizes.min() <= 1  # ~equal bytes per range, across files
    order = np.random.default_rng([0, 1, 0]).permutation(len(plan))
    for n_readers in (3, 4, 7):  # every reader's share of a pass: equal to within 1%
        shares = np.array([sizes[order[r::n_readers]].sum() for r in range(n_readers)])
        assert shares.max() - shares.min() <= 0.01 * shares.mean()


# -- memory and reading bounded by the reader's part ---------------------------------------------

def bytes_read() -> int:
    """Bytes this process has read through system calls (Linux /proc/self/io rchar)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def test_a_reader_reads_only_its_share_of_the_corpus_and_the_plan_reads_nothing(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    for k in range(8):
        write(folder / f"p{k}.jsonl", jsonl_bytes([{"text": f"f{k}r{i} " + "pad " * 60} for i in range(3000)]))
    total = sum(os.path.getsize(p) for p in folder.iterdir())
    spec = spec_of(folder)
    before = bytes_read()
    plan = plan_source(spec)  # plain JSON Lines: planned from file sizes alone
    assert bytes_read() - before < 64 * 1024
    assert plan.file.nbytes + plan.start.nbytes + plan.stop.nbytes <= 20 * len(plan) < 200_000
    before = bytes_read()
    docs, _ = read_all(spec, reader=1, n_readers=4, shuffle=True)
    share = bytes_read() - before
    assert 0.24 * total < share < 0.35 * total  # its quarter (plus the line crossing each range end)
    assert abs(len(docs) - 8 * 3000 / 4) <= 8


# -- streamed Hub datasets (offline: a local folder opened in streaming mode) ----------------------

def hub_folder(tmp_path: Path, n_files: int, per_file: int) -> tuple[SourceSpec, list[str]]:
    folder = tmp_path / "hub"
    (folder / "data").mkdir(parents=True)
    names = []
    for k in range(n_files):
        texts = numbered("hub", range(k * per_file, (k + 1) * per_file))
        write_table(folder / "data" / f"train-{k:05d}-of-{n_files:05d}.parquet", texts, row_group_size=5)
        names += [t.split()[0] for t in texts]
    spec = SourceSpec(name="hub", location=str(folder), kind="hub", files=(), split="train",
                      text_field="text", prob=1.0, on_exhaustion="drop")
    return spec, names


@pytest.mark.parametrize("n_files, n_readers", [(4, 2), (2, 4)], ids=["file-per-range", "striped"])
def test_a_streamed_split_is_read_once_over_the_readers(tmp_path, n_files, n_readers, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    spec, names = hub_folder(tmp_path, n_files, 12)
    plan = plan_source(spec)
    assert plan.unit == "shards" and len(plan) == n_files
    seen = []
    for reader in range(n_readers):
        docs, _ = read_all(spec, reader, n_readers, shuffle=True)
        seen += [d.split()[0] for d in docs]
    assert sorted(seen) == sorted(names)
    assert not (tmp_path / "hf-cache").exists() or not list((tmp_path / "hf-cache").rglob("*.arrow"))


def test_a_streamed_split_resumes_exactly_with_workers(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    spec, _ = hub_folder(tmp_path, 4, 40)
    spec = SourceSpec(**{**spec.__dict__, "on_exhaustion": "restart"})
    cfg = Data(datasets=["x"], buffer_docs=16)

    def loader():
        return PackedDataLoader(make_dataset([spec], cfg, seq_len=32), 0, 1, ("input", "positions", "segment_ids"),
                                batch_size=2, num_workers=2, persistent_workers=True)

    assert_resumes_exactly(loader, total=40, stop=13)


# -- exact resume over compressed and columnar files ------------------------------------------------

def test_resume_is_bitwise_exact_over_zst_and_parquet_sources_with_workers(tmp_path):
    a = write(tmp_path / "a.jsonl.zst", jsonl_bytes([{"text": t} for t in numbered("alpha", range(300))]))
    b = write_table(tmp_path / "b.parquet", numbered("bravo", range(200)), row_group_size=33)
    specs = resolve_sources(Data(datasets=[str(a), str(b)], sampling_probs=[0.6, 0.4]))
    cfg = Data(datasets=["x", "y"], buffer_docs=32)

    def loader():
        return PackedDataLoader(make_dataset(specs, cfg), 0, 1, ("input", "positions", "segment_ids"),
                                batch_size=4, num_workers=2, persistent_workers=True)

    assert_resumes_exactly(loader, total=80, stop=37)  # past one epoch of each source


# -- ready token documents and skip counts in the loader stats ------------------------------------

def test_token_shards_go_through_the_plan_without_the_tokenizer(tmp_path):
    tokenized = pytest.importorskip("ext.data.tokenized")
    docs = [np.arange(n, dtype=np.uint16) + 10 for n in (3, 5, 2, 7, 4, 6)]
    for k in range(2):
        part = docs[k * 3 : (k + 1) * 3]
        np.concatenate(part).tofile(tmp_path / f"p{k}.ds")
        np.cumsum([len(d) for d in part]).astype("<u8").tofile(tmp_path / f"p{k}.ds.index")
    from ext.data.sources import TokenRows

    shards = [TokenRows(tokenized.TokenShard(str(tmp_path / f"p{k}.ds"), "uint16")) for k in range(2)]
    spec = SourceSpec(name="tok", location=str(tmp_path), kind="tokens", files=(), split="train",
                      text_field="text", prob=1.0, on_exhaustion="drop")
    plan = plan_source(spec, shards)
    seen = []
    for reader in range(2):
        source = Source(plan, 0, reader, 2, None, 0, True, "skip")  # no encoder: never called
        while (doc := source.next_document()) is not None:
            assert doc.dtype == np.int32
            seen.append(doc.tolist())
    assert sorted(seen) == sorted(d.astype(np.int32).tolist() for d in docs)


def test_bad_record_counts_reach_the_loader_stats(tmp_path):
    from ext.data.stats import BatchStats

    path = write(tmp_path / "a.jsonl", jsonl_bytes([{"text": t} for t in numbered("ok", range(50))]
                                                   + [{"text": None}] * 3 + [{"text": ""}] * 2))
    (spec,) = resolve_sources(Data(datasets=[str(path)], on_exhaustion=["drop"]))
    loader = PackedDataLoader(make_dataset([spec], Data(datasets=["x"], buffer_docs=8)), 0, 1, ("input",),
                              batch_size=2, num_workers=2)
    total = sum((stats for _, _, stats in loader.batches_with_stats()), BatchStats())
    assert total.bad_records == {"a": 5}
