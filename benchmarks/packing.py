"""Benchmark the document packers on web-like document lengths.

    .venv/bin/python benchmarks/packing.py [--seq-len 2048] [--docs 200000] ...

Document lengths are lognormal (median ``--median``; ``--sigma`` defaults to the
value that makes ``--long-share`` of documents longer than ``seq_len``), token ids
are random. Documents are packed buffer by buffer (``--buffer-docs`` each, no
carry-over between buffers) with ``"bfd"`` and ``"greedy"``; the timed span runs
from pre-tokenized documents (flat tokens + offsets) to finished batch arrays
(``pack_documents`` + ``rows_to_batch``), on one core. One untimed warm-up buffer
per method comes first (first touches of fresh process memory).

Prints a table, then, as the last line, one JSON object:
``{"bfd": {...}, "greedy": {...}, "config": {...}}`` with per method
``tokens_per_s`` (real tokens / s), ``pad_fraction`` (pad tokens / row tokens),
``cut_fraction`` (cut docs / docs), ``long_fraction`` (docs longer than a row of
``seq_len + 1`` tokens / docs).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ext.data.packing import pack_documents, rows_to_batch  # noqa: E402

VOCAB = 50_000


def sigma_for_long_share(median: float, threshold: float, share: float) -> float:
    """Lognormal sigma with P(length > threshold) = share: ln(threshold / median) = sigma * z_{1-share}."""
    return math.log(threshold / median) / statistics.NormalDist().inv_cdf(1.0 - share)


def make_buffers(args: argparse.Namespace, sigma: float) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(args.seed)
    lengths = np.maximum(1, np.rint(rng.lognormal(math.log(args.median), sigma, args.docs))).astype(np.int64)
    buffers = []
    for start in range(0, args.docs, args.buffer_docs):
        lens = lengths[start : start + args.buffer_docs]
        offsets = np.zeros(lens.shape[0] + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        tokens = rng.integers(0, VOCAB, size=int(offsets[-1]), dtype=np.int32)
        buffers.append((tokens, offsets))
    return buffers


def run(method: str, buffers, C: int, reset_positions: bool) -> dict[str, float]:
    tokens, offsets = buffers[0]
    rows_to_batch(pack_documents(tokens, offsets, C, 0, method), reset_positions)  # warm-up
    seconds = 0.0
    n_tokens = n_row_tokens = n_pad = n_docs = n_cut = n_long = 0
    for tokens, offsets in buffers:
        t0 = time.perf_counter()
        packed = pack_documents(tokens, offsets, C, 0, method)
        batch = rows_to_batch(packed, reset_positions)
        seconds += time.perf_counter() - t0
        n_tokens += packed.n_tokens
        n_row_tokens += packed.n_rows * C
        n_pad += packed.n_pad
        n_docs += packed.n_docs
        n_cut += packed.n_cut_docs
        n_long += packed.n_long_docs
        del packed, batch
    return {
        "tokens_per_s": n_tokens / seconds,
        "pad_fraction": n_pad / n_row_tokens,
        "cut_fraction": n_cut / n_docs,
        "long_fraction": n_long / n_docs,
        "seconds": seconds,
        "tokens": n_tokens,
        "rows": n_row_tokens // C,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--docs", type=int, default=200_000)
    p.add_argument("--buffer-docs", type=int, default=10_000)
    p.add_argument("--median", type=float, default=400.0)
    p.add_argument("--long-share", type=float, default=0.05, help="target share of docs longer than seq_len")
    p.add_argument("--sigma", type=float, default=None, help="lognormal sigma (default: from --long-share)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-reset-positions", action="store_true")
    args = p.parse_args()

    sigma = args.sigma
    if sigma is None:
        sigma = sigma_for_long_share(args.median, args.seq_len, args.long_share)
    C = args.seq_len + 1
    reset = not args.no_reset_positions
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    print(f"sigma = ln({args.seq_len}/{args.median:g}) / z_{1 - args.long_share:g} = {sigma:.4f}")

    buffers = make_buffers(args, sigma)
    # Lower bound on padding for any packer that flushes each buffer: ceil(tokens / C) rows.
    floor_pad = sum(-int(t.shape[0]) % C for t, _ in buffers)
    floor_rows = sum(-(-int(t.shape[0]) // C) for t, _ in buffers)
    results = {m: run(m, buffers, C, reset) for m in ("bfd", "greedy")}

    print(f"{len(buffers)} buffers x {args.buffer_docs} docs, seq_len {args.seq_len} (rows of {C}), one core")
    print(f"{'method':8s} {'Mtok/s':>8s} {'pad %':>8s} {'cut %':>8s} {'long %':>8s} {'rows':>8s} {'s':>7s}")
    for m, r in results.items():
        print(
            f"{m:8s} {r['tokens_per_s'] / 1e6:8.1f} {100 * r['pad_fraction']:8.3f}"
            f" {100 * r['cut_fraction']:8.3f}"
            f" {100 * r['long_fraction']:8.3f} {r['rows']:8d} {r['seconds']:7.2f}"
        )
    floor_fraction = floor_pad / (floor_rows * C)
    print(f"padding floor with per-buffer flush: {100 * floor_fraction:.3f} % ({floor_rows} rows)")
    config = {
        "seq_len": args.seq_len,
        "capacity": C,
        "docs": args.docs,
        "buffer_docs": args.buffer_docs,
        "median": args.median,
        "sigma": sigma,
        "seed": args.seed,
        "reset_positions": reset,
        "pad_fraction_floor": floor_fraction,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }
    keys = ("tokens_per_s", "pad_fraction", "cut_fraction", "long_fraction")
    out = {m: {k: r[k] for k in keys} for m, r in results.items()}
    print(json.dumps({**out, "config": config}))


if __name__ == "__main__":
    main()
