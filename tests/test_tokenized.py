"""Token shards (ext/data/tokenized.py, `python -m ext.cli tokenize`): the tokens read
back are the encoder's, the bytes are datatrove's layout, and the folder is refused,
complete or absent, never half-written."""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from ext.cli import main as cli
from ext.data.holdout import holdout_hash
from ext.data.tokenized import (
    METADATA_FILE,
    TokenShard,
    open_token_folder,
    tokenize_source,
    tokenizer_identity,
)
from ext.core.errors import DataError

from .conftest import TOKENIZER, WEB_CORPUS

BOS, EOS = 0, 1  # the shipped tokenizer's


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [json.loads(line)["text"] for line in WEB_CORPUS.read_text().splitlines()[:400]]


def reference(tok: Tokenizer, texts: list[str], bos: int | None = BOS, eos: int | None = EOS) -> list[list[int]]:
    """What the loader trains on: [BOS] + ids without the tokenizer's specials + [EOS]."""
    head, tail = ([bos] if bos is not None else []), ([eos] if eos is not None else [])
    return [head + tok.encode(t, add_special_tokens=False).ids + tail for t in texts]


def read_all(folder: Path, tokenizer_id: str) -> list[list[int]]:
    docs = []
    for shard in open_token_folder(str(folder), tokenizer_id):
        for tokens, where in shard.read(np.arange(len(shard))):
            assert tokens.dtype == np.int32 and where.startswith(shard.path + ":doc ")
            docs.append(tokens.tolist())
    return docs


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f'[job]\ncustom_config_module = "ext.job_config"\n'
                    f'[model]\nhf_assets_path = "{TOKENIZER}"\n[data]\ntext_fields = ["text"]\n{extra}')
    return path


def test_round_trip_uint16_equals_the_encoders_tokens_and_holdout_hashes(tmp_path, tok, texts):
    src = write_jsonl(tmp_path / "web.jsonl", texts)
    info = tokenize_source(str(src), str(tmp_path / "out"), tok, tokenizer_name="shipped",
                           bos_id=BOS, eos_id=EOS, chunk_bytes=40_000)
    assert info["dtype"] == "uint16" and len(info["shards"]) > 3  # cut into several pieces
    assert read_all(tmp_path / "out", tokenizer_identity(tok)) == reference(tok, texts)
    shards = open_token_folder(str(tmp_path / "out"), tokenizer_identity(tok))
    hashes = np.concatenate([s.holdout_hashes(np.arange(len(s))) for s in shards])
    assert hashes.tolist() == [holdout_hash(t) for t in texts]  # the same holdout as the text source
    assert sum(s.nbytes for s in shards) == 2 * info["tokens"] == 2 * sum(map(len, reference(tok, texts)))


def test_read_returns_requested_documents_in_any_order(tmp_path, tok, texts):
    src = write_jsonl(tmp_path / "web.jsonl", texts[:50])
    tokenize_source(str(src), str(tmp_path / "out"), tok, tokenizer_name="t", bos_id=None, eos_id=EOS)
    (shard,) = open_token_folder(str(tmp_path / "out"), tokenizer_identity(tok))
    rows = np.array([49, 0, 17, 17, 3])
    ref = reference(tok, texts[:50], bos=None)
    got = shard.read(rows)
    assert [t.tolist() for t, _ in got] == [ref[r] for r in rows]
    assert got[2][1] == f"{shard.path}:doc 17"


def big_vocab_tokenizer(n: int = 70_000) -> Tokenizer:
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, n)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return t


def test_round_trip_uint32_for_a_vocabulary_over_65536(tmp_path):
    tok = big_vocab_tokenizer()
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{i}" for i in rng.integers(3, 70_000, rng.integers(1, 60))) for _ in range(300)]
    texts.append("w69999 w65536 w65535 w3")
    src = write_jsonl(tmp_path / "big.jsonl", texts)
    info = tokenize_source(str(src), str(tmp_path / "out"), tok, tokenizer_name="big",
                           bos_id=1, eos_id=2, chunk_bytes=4096)
    assert info["dtype"] == "uint32"
    expected = reference(tok, texts, bos=1, eos=2)
    assert expected[-1] == [1, 69999, 65536, 65535, 3, 2]
    assert read_all(tmp_path / "out", tokenizer_identity(tok)) == expected
    first = sorted((tmp_path / "out").glob("*.ds"))[0]
    assert (first.with_suffix(".ds.metadata")).read_text().splitlines()[0] == "big|4"


def test_bytes_match_datatrove_tokenized_file(tmp_path, tok, texts):
    """Our files, byte for byte, against datatrove's TokenizedFile writer logic
    (tokens struct-packed "<%sH", document ends in tokens "<%sQ", metadata
    "name|token_size\\ncount\\n...") re-implemented here with struct."""
    src = write_jsonl(tmp_path / "web.jsonl", texts[:120])
    tokenize_source(str(src), str(tmp_path / "out"), tok, tokenizer_name="org/tok", bos_id=BOS, eos_id=EOS)
    docs = reference(tok, texts[:120])
    flat = [t for d in docs for t in d]
    ends = np.cumsum([len(d) for d in docs]).tolist()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.ds")) == ["00000.ds"]  # datatrove's readers glob *.ds
    assert (out / "00000.ds").read_bytes() == struct.pack("<%sH" % len(flat), *flat)
    assert (out / "00000.ds.index").read_bytes() == struct.pack("<%sQ" % len(ends), *ends)
    lines = (out / "00000.ds.metadata").read_text().splitlines()
    assert lines[:2] == ["org/tok|2", str(len(flat))]
    # and read the way DatatroveFileDataset does: flat windows of seq_len + 1 tokens
    window = np.frombuffer((out / "00000.ds").read_bytes()[: 2 * 33], np.uint16).astype(np.int64)
    assert window.tolist() == flat[:33]


def test_datatrove_metadata_gives_the_dtype_to_a_bare_shard(tmp_path, tok, texts):
    src = write_jsonl(tmp_path / "web.jsonl", texts[:20])
    tokenize_source(str(src), str(tmp_path / "out"), tok, tokenizer_name="t", bos_id=BOS, eos_id=EOS)
    shard = TokenShard(str(tmp_path / "out" / "00000.ds"))  # no dtype: from 00000.ds.metadata
    assert shard.dtype == np.dtype("<u2") and len(shard) == 20
    assert [t.tolist() for t, _ in shard.read(np.arange(20))] == reference(tok, texts[:20])


def test_cli_tokenizes_gzip_and_zstd_jsonl_in_parallel(tmp_path, capsys, tok, texts):
    data = tmp_path / "data"
    data.mkdir()
    with gzip.open(data / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[:150])
    with pa.CompressedOutputStream(str(data / "b.jsonl.zst"), "zstd") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in texts[150:300]).encode())
    code = cli(["tokenize", str(data), "--out", str(tmp_path / "tok"), "--job.config_file",
                str(write_config(tmp_path)), "--workers", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "300 documents" in captured.out
    assert read_all(tmp_path / "tok", tokenizer_identity(tok)) == reference(tok, texts[:300])
    info = json.loads((tmp_path / "tok" / METADATA_FILE).read_text())
    assert [s["file"] for s in info["shards"]] == ["00000.ds", "00001.ds"]  # one per compressed file
    assert (info["bos_id"], info["eos_id"], info["documents"]) == (BOS, EOS, 300)


def test_cli_follows_add_bos_and_text_field(tmp_path, capsys, tok, texts):
    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts[:30]))
    code = cli(["tokenize", str(src), "--out", str(tmp_path / "tok"), "--job.config_file",
                str(write_config(tmp_path)), "--workers", "1", "--data.no-add_bos",
                "--text-field", "body"])
    assert code == 0, capsys.readouterr().err
    assert read_all(tmp_path / "tok", tokenizer_identity(tok)) == reference(tok, texts[:30], bos=None)


def test_parquet_and_txt_sources(tmp_path, tok, texts):
    table = pa.table({"text": texts[:100], "id": list(range(100))})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=30)
    info = tokenize_source(str(tmp_path / "p.parquet"), str(tmp_path / "pq"), tok, tokenizer_name="t",
                           bos_id=BOS, eos_id=EOS, chunk_bytes=1)
    assert len(info["shards"]) == 4  # one per row group here
    assert read_all(tmp_path / "pq", tokenizer_identity(tok)) == reference(tok, texts[:100])
    lines = [t.replace("\n", " ") for t in texts[:40]]
    (tmp_path / "d.txt").write_text("\n".join(lines[:20]) + "\n\n" + "\n".join(lines[20:]) + "\n")
    tokenize_source(str(tmp_path / "d.txt"), str(tmp_path / "txt"), tok, tokenizer_name="t",
                    bos_id=BOS, eos_id=EOS)
    assert read_all(tmp_path / "txt", tokenizer_identity(tok)) == reference(tok, lines)


def test_parallel_output_equals_serial_output_byte_for_byte(tmp_path, tok, texts):
    src = write_jsonl(tmp_path / "web.jsonl", texts)
    kw = dict(tokenizer_name="t", bos_id=BOS, eos_id=EOS, chunk_bytes=50_000)
    tokenize_source(str(src), str(tmp_path / "serial"), tok, workers=1, **kw)
    tokenize_source(str(src), str(tmp_path / "parallel"), tok, workers=2, **kw)
    names = sorted(os.listdir(tmp_path / "serial"))
    assert len(names) > 10 and names == sorted(os.listdir(tmp_path / "parallel"))
    for name in names:
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "parallel" / name).read_bytes(), name


def test_refuses_a_folder_written_with_another_tokenizer(tmp_path, tok, texts):
    src = write_jsonl(tmp_path / "web.jsonl", texts[:20])
    tokenize_source(str(src), str(tmp_path / "out"), tok, tokenizer_name="shipped", bos_id=BOS, eos_id=EOS)
    other = tokenizer_identity(big_vocab_tokenizer(3000))
    with pytest.raises(DataError) as exc:
        open_token_folder(str(tmp_path / "out"), other)
    msg = str(exc.value)
    assert "\n" not in msg and str(tmp_path / "out") in msg and "another tokenizer" in msg
    assert "python -m ext.cli tokenize" in msg
    with pytest.raises(DataError, match="add_bos/add_eos"):
        open_token_folder(str(tmp_path / "out"), tokenizer_identity(tok), encoding=(None, EOS))
    assert len(open_token_folder(str(tmp_path / "out"), tokenizer_identity(tok), encoding=(BOS, EOS))) == 1


def test_identity_ignores_runtime_settings_but_not_the_vocabulary(tok):
    padded = Tokenizer.from_str(tok.to_str())
    padded.enable_truncation(16)
    padded.enable_padding()
    assert tokenizer_identity(padded) == tokenizer_identity(tok)
    assert tokenizer_identity(big_vocab_tokenizer(3000)) != tokenizer_identity(big_vocab_tokenizer(3001))


def test_refuses_missing_and_truncated_shards(tmp_path, tok, texts):
    src = write_jsonl(tmp_path / "web.jsonl", texts[:60])
    tid = tokenizer_identity(tok)
    for case in ("short_data", "no_index", "index_past_data", "no_metadata"):
        out = tmp_path / case
        tokenize_source(str(src), str(out), tok, tokenizer_name="t", bos_id=BOS, eos_id=EOS)
        ds = out / "00000.ds"
        if case == "short_data":
            ds.write_bytes(ds.read_bytes()[:-100])
        elif case == "no_index":
            (out / "00000.ds.index").unlink()
        elif case == "index_past_data":  # sizes as recorded, last end beyond the data
            index = np.fromfile(out / "00000.ds.index", "<u8")
            index[-1] += 5
            index.tofile(out / "00000.ds.index")
        else:
            (out / METADATA_FILE).unlink()
        with pytest.raises(DataError) as exc:
            open_token_folder(str(out), tid)
        assert "\n" not in str(exc.value) and str(out) in str(exc.value), case


def test_cli_refuses_a_non_empty_out_and_accepts_an_empty_one(tmp_path, capsys, texts):
    src = write_jsonl(tmp_path / "web.jsonl", texts[:10])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["tokenize", str(src), "--out", str(out), "--job.config_file", str(write_config(tmp_path)),
            "--workers", "1"]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an empty folder" in err
    assert os.listdir(out) == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert cli(argv) == 0, capsys.readouterr().err
    assert (out / METADATA_FILE).is_file()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_bad_record_midway_under_error_leaves_no_folder(tmp_path, capsys, tok, texts, workers):
    lines = [json.dumps({"text": t}) for t in texts]
    lines[250] = '{"text": 17}'  # line 251: the field is not a string
    src = tmp_path / "web.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code = cli(["tokenize", str(src), "--out", str(out), "--job.config_file", str(write_config(tmp_path)),
                "--workers", workers, "--chunk-mb", "0.05", "--data.bad_records", "error"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and f"{src}:251" in err and "Traceback" not in err
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["c.toml", "web.jsonl"]  # no temporary folder left either


def test_bad_records_are_skipped_and_counted_under_skip(tmp_path, tok, texts):
    lines = [json.dumps({"text": t}) for t in texts[:30]]
    lines[3], lines[10], lines[20] = "{not json", json.dumps({"other": "x"}), json.dumps({"text": None})
    src = tmp_path / "web.jsonl"
    src.write_text("\n".join(lines) + "\n")
    info = tokenize_source(str(src), str(tmp_path / "out"), tok, tokenizer_name="t", bos_id=BOS, eos_id=EOS)
    assert (info["records"], info["bad_records"], info["documents"]) == (30, 3, 27)
    good = [t for i, t in enumerate(texts[:30]) if i not in (3, 10, 20)]
    assert read_all(tmp_path / "out", tokenizer_identity(tok)) == reference(tok, good)


# -- the loader takes a token folder as a source ----------------------------------------------


def _loader_config(tmp_path: Path, location: Path, extra: str = ""):
    from torchtitan.config import ConfigManager

    toml = tmp_path / f"loader-{location.name}.toml"
    toml.write_text(f'[job]\ncustom_config_module = "ext.job_config"\n[model]\nhf_assets_path = "{TOKENIZER}"\n'
                    f'[data]\ndatasets = ["{location}"]\nnum_workers = 0\nbuffer_docs = 64\n'
                    f'on_exhaustion = ["drop"]\n{extra}[training]\nseq_len = 128\nlocal_batch_size = 4\n')
    return ConfigManager().parse_args(["--job.config_file", str(toml)])


def _epoch_documents(cfg) -> list[tuple[int, ...]]:
    """Every document (token span between segment starts, BOS..EOS) the loader yields over one epoch."""
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    from ext.data.loader import build_packed_dataloader

    loader = build_packed_dataloader(1, 0, HuggingFaceTokenizer(str(TOKENIZER)), cfg)
    docs = []
    for sample, labels in loader:
        for row, seg, lab in zip(sample["input"].numpy(), sample["segment_ids"].numpy(), labels.numpy()):
            starts = np.flatnonzero(np.diff(seg, prepend=-1))
            for a, b in zip(starts, list(starts[1:]) + [len(row)]):
                last = [int(lab[b - 1])] if b == len(row) and lab[b - 1] >= 0 else []  # the row's last column
                docs.append(tuple(row[a:b].tolist()) + tuple(last))
    return docs


def test_the_loader_delivers_a_token_folder_as_it_delivers_the_text(tmp_path, capsys):
    """Same documents, same tokens, each once per epoch; padding rows aside."""
    corpus = tmp_path / "web.jsonl"
    corpus.write_text("".join(WEB_CORPUS.read_text().splitlines(keepends=True)[:300]))
    code = cli(["tokenize", str(corpus), "--out", str(tmp_path / "tok"), "--job.config_file",
                str(write_config(tmp_path))])
    assert code == 0, capsys.readouterr().err
    from_text = _epoch_documents(_loader_config(tmp_path, corpus))
    from_tokens = _epoch_documents(_loader_config(tmp_path, tmp_path / "tok"))
    real = lambda docs: sorted(d for d in docs if d[0] == BOS)  # noqa: E731  (padding tails start with EOS)
    assert len(real(from_text)) == 300
    assert real(from_tokens) == real(from_text)


def test_the_loader_refuses_a_token_folder_of_another_tokenizer_with_one_line(tmp_path, capsys):
    corpus = tmp_path / "web.jsonl"
    corpus.write_text("".join(WEB_CORPUS.read_text().splitlines(keepends=True)[:20]))
    cli(["tokenize", str(corpus), "--out", str(tmp_path / "tok"), "--job.config_file",
         str(write_config(tmp_path))])
    cfg = _loader_config(tmp_path, tmp_path / "tok", extra="add_bos = false\n")
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    from ext.data.loader import build_packed_dataloader

    with pytest.raises(DataError, match=r"has documents wrapped in BOS \d+ / EOS \d+ but the config adds BOS None"):
        build_packed_dataloader(1, 0, HuggingFaceTokenizer(str(TOKENIZER)), cfg)
    info = json.loads((tmp_path / "tok" / METADATA_FILE).read_text())
    info["tokenizer"]["id"] = "sha256:" + "0" * 64
    (tmp_path / "tok" / METADATA_FILE).write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"was written with another tokenizer"):
        build_packed_dataloader(1, 0, HuggingFaceTokenizer(str(TOKENIZER)), _loader_config(tmp_path, tmp_path / "tok"))


def test_a_folder_of_datatrove_files_without_our_metadata_is_one_config_error(tmp_path):
    from ext.data.config import Data, resolve_sources
    from ext.core.errors import ConfigError

    folder = tmp_path / "dt"
    folder.mkdir()
    (folder / "00000.ds").write_bytes(b"\0\0")
    with pytest.raises(ConfigError, match=r"holds .ds files but not the tokenizer identity"):
        resolve_sources(Data(datasets=[str(folder)]))
