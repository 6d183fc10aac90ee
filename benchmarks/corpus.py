"""Corpus-scale reading: memory per loader worker and time to the first batch.

Generates (once; reused when present) a JSON Lines corpus of ``--files``
files of unequal sizes (file k holds a share proportional to k + 1) totalling
``--size-gb`` GB, then runs the packed loader as ``--ranks`` data-parallel
ranks (one process each, at the same time) x ``--workers`` DataLoader
workers, reading ``--batches`` batches per rank with the test tokenizer.

Measured, per rank: the time from building the dataset (the plan of every
source included) to the first batch; the main process's plan time and its
RSS growth; per worker, its peak RSS (VmHWM) minus its RSS when it started
(what the worker added on top of the forked parent), read from /proc.

Prints one JSON object (and a short table on stderr)::

    python benchmarks/corpus.py --size-gb 2 --out /tmp/corpus-2g
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOKENIZER = ROOT / "ext" / "assets" / "tokenizer"


def _status(pid: int | str, key: str) -> int:
    """A /proc/PID/status memory field in bytes (e.g. VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def generate(out: Path, size_gb: float, n_files: int, seed: int = 0) -> dict:
    """Write the corpus unless a complete one is there; return its description."""
    marker = out / "_complete.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info["size_gb"] == size_gb and info["files"] == n_files:
            return info
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = np.array(["the", "data", "loader", "reads", "ranges", "of", "bytes", "token", "model",
                      "train", "corpus", "shard", "memory", "bounded", "worker", "rank", "epoch",
                      "plan", "record", "line", "balanced", "split", "size", "file"])
    pool = " ".join(rng.choice(words, 2_000_000))  # ~12 MB of text to cut documents from
    weights = np.arange(1, n_files + 1, dtype=np.float64)
    targets = (weights / weights.sum() * size_gb * 1e9).astype(np.int64)
    docs = 0
    for k, target in enumerate(targets):
        path = out / f"part-{k:03d}.jsonl"
        written = 0
        with open(path, "w") as f:
            while written < target:
                lengths = np.maximum(20, rng.lognormal(np.log(2000), 0.8, 4096).astype(np.int64))
                starts = rng.integers(0, len(pool) - lengths.max() - 1, len(lengths))
                block = "".join(
                    json.dumps({"text": f"doc{docs + i} " + pool[s : s + n]}) + "\n"
                    for i, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist()))
                )
                docs += len(lengths)
                f.write(block)
                written += len(block)
    info = {"size_gb": size_gb, "files": n_files, "bytes": int(sum(p.stat().st_size for p in out.glob("*.jsonl"))),
            "documents": docs}
    marker.write_text(json.dumps(info))
    return info


def _worker_start(worker_id: int) -> None:
    from ext.data.loader import init_worker

    init_worker(worker_id)
    start_file = os.environ["CORPUS_BENCH_DIR"] + f"/worker-{os.getpid()}.start"
    with open(start_file, "w") as f:
        f.write(str(_status("self", "VmRSS")))


def run_rank(rank: int, args: argparse.Namespace, result: "mp.Queue") -> None:
    import torch
    from tokenizers import Tokenizer
    from torchdata.stateful_dataloader import StatefulDataLoader

    from ext.data.config import Data, resolve_sources
    from ext.data.dataset import PackedMixtureDataset
    from ext.data.encoders import TextEncoder

    torch.set_num_threads(1)
    tok = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    rss0 = _status("self", "VmRSS")
    t0 = time.perf_counter()
    specs = resolve_sources(Data(datasets=[args.out]))
    ds = PackedMixtureDataset(specs, Data(datasets=["x"], buffer_docs=args.buffer_docs), TextEncoder(tok, 0, 1),
                              2, args.seq_len, rank, args.ranks, seed=0)
    plan_s = time.perf_counter() - t0
    plan_rss = _status("self", "VmRSS") - rss0
    loader = StatefulDataLoader(ds, batch_size=args.batch, num_workers=args.workers, worker_init_fn=_worker_start,
                                persistent_workers=True)
    it = iter(loader)
    next(it)
    first_batch_s = time.perf_counter() - t0
    for _ in range(args.batches - 1):
        next(it)
    total_s = time.perf_counter() - t0
    workers = [w.pid for w in it._workers]
    added = []
    for pid in workers:
        start = int(Path(os.environ["CORPUS_BENCH_DIR"], f"worker-{pid}.start").read_text())
        added.append(_status(pid, "VmHWM") - start)
    result.put({
        "rank": rank, "plan_s": round(plan_s, 3), "plan_ranges": len(ds.plans[0]),
        "main_rss_added_by_plan_mb": round(plan_rss / 2**20, 1),
        "first_batch_s": round(first_batch_s, 2), "batches": args.batches,
        "batches_per_s_after_first": round((args.batches - 1) / max(total_s - first_batch_s, 1e-9), 2),
        "worker_peak_rss_added_mb": [round(a / 2**20, 1) for a in added],
    })
    del it, loader


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--out", default="/tmp/ext-corpus-bench")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--buffer-docs", type=int, default=2048)
    args = parser.parse_args()

    t = time.perf_counter()
    info = generate(Path(args.out), args.size_gb, args.files)
    gen_s = time.perf_counter() - t
    os.environ["CORPUS_BENCH_DIR"] = args.out
    ctx = mp.get_context("fork")
    result = ctx.Queue()
    procs = [ctx.Process(target=run_rank, args=(r, args, result)) for r in range(args.ranks)]
    for p in procs:
        p.start()
    import queue

    got = []
    while len(got) < len(procs):
        try:
            got.append(result.get(timeout=5))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                print("a rank failed (see its traceback above)", file=sys.stderr)
                return 1
    ranks = sorted(got, key=lambda r: r["rank"])
    for p in procs:
        p.join()
    worst = max(a for r in ranks for a in r["worker_peak_rss_added_mb"])
    report = {
        "corpus": {**info, "generate_or_reuse_s": round(gen_s, 1)},
        "ranks": args.ranks, "workers_per_rank": args.workers, "batch": args.batch, "seq_len": args.seq_len,
        "per_rank": ranks,
        "worst_worker_peak_rss_added_mb": worst,
        "max_first_batch_s": max(r["first_batch_s"] for r in ranks),
    }
    print(json.dumps(report, indent=1))
    print(f"{'rank':>4} {'plan s':>7} {'ranges':>7} {'first batch s':>14} {'worker RSS added MB':>22}", file=sys.stderr)
    for r in ranks:
        print(f"{r['rank']:>4} {r['plan_s']:>7} {r['plan_ranges']:>7} {r['first_batch_s']:>14} "
              f"{str(r['worker_peak_rss_added_mb']):>22}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
