"""Throughput of reading token shards (ext/data/tokenized.py) into packed rows.

    .venv/bin/python benchmarks/tokenized.py [--tokens 50e6] [--seq-len 2048] [--rounds 5]

Setup (untimed): the shipped web corpus is tokenized with
``tokenize_source`` (BOS/EOS added, as the loader does); its shard is then
repeated, index offsets shifted, into ``--shards`` shards holding about
``--tokens`` tokens, with an ``ext_tokenized.json`` of the same form, and
opened with ``open_token_folder``. Files are in the page cache (just written).

Timed, per round, on one core, documents in a fresh random order over all
shards (what a shuffling reader does):

- ``read_only_tokens_per_s``: ``TokenShard.read`` in batches of 1024 documents
  (the loader's read batch), each batch grouped by shard;
- ``pretokenized_tokens_per_s``: the same reads, buffers of ``--buffer-docs``
  documents concatenated and packed best-fit into rows of ``seq_len + 1``
  tokens (``pack_documents`` + ``rows_to_batch``: input, labels, positions,
  segment ids), as the loader does per buffer.

``pack_share_of_time`` = 1 - read time / read-and-pack time (medians).
Tokens are real (document) tokens, BOS/EOS included. The median over
``--rounds`` rounds is reported (the machine is shared). The last line printed
is one JSON object.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ext.data.packing import pack_documents, rows_to_batch  # noqa: E402
from ext.data.tokenized import METADATA_FILE, TokenShard, open_token_folder, tokenize_source, tokenizer_identity  # noqa: E402

CORPUS = REPO / "ext" / "assets" / "data" / "web.jsonl"
TOKENIZER = REPO / "ext" / "assets" / "tokenizer" / "tokenizer.json"
READ_BATCH = 1024  # ext.data.sources reads this many records at a time


def build_folder(folder: Path, tokens: float, n_shards: int) -> tuple[str, dict]:
    """A token folder of about ``tokens`` tokens in ``n_shards`` shards; returns (tokenizer id, metadata)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER))
    seed = folder / "seed"
    info = tokenize_source(str(CORPUS), str(seed), tok, tokenizer_name=str(TOKENIZER.parent), bos_id=0, eos_id=1)
    data = (seed / "00000.ds").read_bytes()
    index = np.fromfile(seed / "00000.ds.index", "<u8")
    hashes = (seed / "00000.ds.hash").read_bytes()
    copies = max(int(round(tokens / n_shards / info["tokens"])), 1)
    out = folder / "tokens"
    out.mkdir()
    shards = []
    for s in range(n_shards):
        name = f"{s:05d}.ds"
        (out / name).write_bytes(data * copies)
        ends = np.concatenate([index + c * info["tokens"] for c in range(copies)]).astype("<u8")
        ends.tofile(out / f"{name}.index")
        (out / f"{name}.hash").write_bytes(hashes * copies)
        (out / f"{name}.metadata").write_text(f"{info['tokenizer']['name']}|2\n{info['tokens'] * copies}\n")
        shards.append({"file": name, "source": "benchmark copy", "documents": len(ends),
                       "tokens": info["tokens"] * copies})
    meta = dict(info, shards=shards, documents=sum(s["documents"] for s in shards),
                tokens=sum(s["tokens"] for s in shards))
    (out / METADATA_FILE).write_text(json.dumps(meta))
    return tokenizer_identity(tok), meta


def read_batches(shards: list[TokenShard], order: np.ndarray, shard_of: np.ndarray, row_of: np.ndarray):
    """Yield the documents of ``order`` (global document numbers), READ_BATCH at a time, in order."""
    for b in range(0, len(order), READ_BATCH):
        picks = order[b : b + READ_BATCH]
        sids, rows = shard_of[picks], row_of[picks]
        docs: list[np.ndarray | None] = [None] * len(picks)
        for s in np.unique(sids):
            where = np.flatnonzero(sids == s)
            for i, (tokens, _) in zip(where, shards[s].read(rows[where])):
                docs[i] = tokens
        yield docs


def one_round(shards, order, shard_of, row_of, seq_len: int, buffer_docs: int, pack: bool) -> tuple[float, int, int]:
    """(seconds, real tokens, rows) for reading (and packing) every document once."""
    start = time.perf_counter()
    n_tokens = n_rows = 0
    buffer: list[np.ndarray] = []
    for docs in read_batches(shards, order, shard_of, row_of):
        if not pack:
            n_tokens += sum(len(d) for d in docs)
            continue
        buffer.extend(docs)
        if len(buffer) >= buffer_docs:
            n_tokens, n_rows = _pack(buffer[:buffer_docs], seq_len, n_tokens, n_rows)
            buffer = buffer[buffer_docs:]
    if pack and buffer:
        n_tokens, n_rows = _pack(buffer, seq_len, n_tokens, n_rows)
    return time.perf_counter() - start, n_tokens, n_rows


def _pack(docs: list[np.ndarray], seq_len: int, n_tokens: int, n_rows: int) -> tuple[int, int]:
    lengths = np.fromiter((len(d) for d in docs), np.int64, len(docs))
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    packed = pack_documents(np.concatenate(docs), offsets, seq_len + 1, 1, "bfd")
    rows_to_batch(packed, False)
    return n_tokens + packed.n_tokens, n_rows + packed.n_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=float, default=50e6, help="tokens in the generated folder")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--buffer-docs", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tid, meta = build_folder(Path(tmp), args.tokens, args.shards)
        shards = open_token_folder(str(Path(tmp) / "tokens"), tid, encoding=(0, 1))
        lengths = [len(s) for s in shards]
        shard_of = np.repeat(np.arange(len(shards)), lengths)
        row_of = np.concatenate([np.arange(n) for n in lengths])
        read_s, pack_s = [], []
        for r in range(args.rounds):  # interleaved: this machine is shared and noisy
            order = np.random.default_rng(r).permutation(len(shard_of))
            s, read_tokens, _ = one_round(shards, order, shard_of, row_of, args.seq_len, args.buffer_docs, False)
            read_s.append(s)
            s, packed_tokens, rows = one_round(shards, order, shard_of, row_of, args.seq_len, args.buffer_docs, True)
            pack_s.append(s)
            assert read_tokens == packed_tokens == meta["tokens"], (read_tokens, packed_tokens, meta["tokens"])
    result = {
        "pretokenized_tokens_per_s": meta["tokens"] / statistics.median(pack_s),
        "read_only_tokens_per_s": meta["tokens"] / statistics.median(read_s),
        "pack_share_of_time": 1 - statistics.median(read_s) / statistics.median(pack_s),
        "tokens": meta["tokens"],
        "documents": meta["documents"],
        "mean_doc_tokens": meta["tokens"] / meta["documents"],
        "rows": rows,
        "seq_len": args.seq_len,
        "buffer_docs": args.buffer_docs,
        "shards": args.shards,
        "rounds": args.rounds,
        "round_seconds_packed": [round(s, 3) for s in pack_s],
        "round_seconds_read": [round(s, 3) for s in read_s],
        "goal_tokens_per_s": 20e6,
    }
    print(f"read only:       {result['read_only_tokens_per_s']:,.0f} tokens/s")
    print(f"read + pack:     {result['pretokenized_tokens_per_s']:,.0f} tokens/s (goal >= 20M per rank)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
