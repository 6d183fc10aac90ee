"""Our FLOPs per token against torchtitan 0.2.2's estimate, and the cost of counting.

    .venv/bin/python benchmarks/flops.py [--docs 20000]

For each case, training FLOPs (forward + backward) per token from
``ext.training.flops.flops_report``: full causal rows of ``seq_len``, and a packed
batch of synthetic web-like documents (lognormal lengths, median 400 tokens,
5% longer than 2048; best-fit packed into rows of ``seq_len + 1``), with
attention within documents (document masking) or causal over the row.
``overcount`` is torchtitan's FLOPs of a step over ours minus 1 (for packed
batches torchtitan counts every row token, padding included, ours the
non-padding ones); ``mfu_palm_over_mfu_exact`` is how much higher a run's
``mfu_palm`` (the PaLM / torchtitan convention, per non-padding token) reads
than its ``mfu_exact``. Then the time :func:`ext.data.counts.attention_counts` adds
per row in the loader.

Prints a table, then one JSON object as the last line:
``{"cases": [{model, seq_len, attention, ours, torchtitan, overcount,
mfu_palm_over_mfu_exact}, ...],
"attention_counts_us_per_row": {seq_len: microseconds}}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ext.cli import load_job_config  # noqa: E402
from ext.data.counts import attention_counts  # noqa: E402
from ext.training.flops import flops_report  # noqa: E402

CONFIG = str(REPO / "train_configs" / "llama3_8b_multisource.toml")
CASES = [  # (label, extra config arguments)
    ("Llama-3 8B", ["--model.flavor", "8B"]),
    ("Llama-3.2 1B (tied)", ["--model.flavor", "3.2-1B"]),
    ("Qwen3 30B-A3B (MoE)", ["--model.name", "ext_qwen3", "--model.flavor", "30B-A3B"]),
]


def report(flavor_args: list[str], seq_len: int, masked: bool, docs: int) -> dict:
    argv = ["--job.config_file", CONFIG, *flavor_args, "--training.seq_len", str(seq_len),
            "--skyladder.no-enable"]
    if not masked:
        argv.append("--attention.no-document-masking")
    return flops_report(load_job_config(argv), packed="synthetic", docs=docs)


def counting_cost(seq_len: int, rows: int = 200) -> float:
    """Microseconds per row of attention_counts on packed-like rows of ``seq_len``."""
    rng = np.random.default_rng(0)
    seg = np.cumsum(rng.random((rows, seq_len)) < 1 / 400, axis=1)
    labels = rng.integers(0, 1000, (rows, seq_len))
    start = time.perf_counter()
    for r in range(rows):
        attention_counts(seg[r], labels[r])
    return (time.perf_counter() - start) / rows * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=20000, help="synthetic documents per case")
    args = parser.parse_args()
    cases = []
    for label, flavor_args in CASES:
        for seq_len in (8192, 32768):
            r = report(flavor_args, seq_len, masked=False, docs=args.docs)
            cases.append({"model": label, "seq_len": seq_len, "attention": "causal, full rows",
                          "ours": r["flops_per_token_causal"], "torchtitan": r["torchtitan_flops_per_token"],
                          "overcount": r["torchtitan_overcount_causal"],
                          "mfu_palm_over_mfu_exact": r["mfu_palm_over_mfu_exact_causal"]})
            r = report(flavor_args, seq_len, masked=True, docs=args.docs)
            cases.append({"model": label, "seq_len": seq_len, "attention": "documents, web-like packed",
                          "ours": r["flops_per_token_packed"], "torchtitan": r["torchtitan_flops_per_token"],
                          "overcount": r["torchtitan_overcount_packed"],
                          "mfu_palm_over_mfu_exact": r["mfu_palm_over_mfu_exact_packed"]})
    print(f"{'model':22}{'seq_len':>8}  {'attention':28}{'ours':>12}{'torchtitan':>12}{'overcount':>11}"
          f"{'palm/exact':>12}")
    for c in cases:
        print(f"{c['model']:22}{c['seq_len']:>8}  {c['attention']:28}{c['ours']:>12.4e}"
              f"{c['torchtitan']:>12.4e}{100 * c['overcount']:>+10.1f}%{c['mfu_palm_over_mfu_exact']:>12.3f}")
    cost = {seq: counting_cost(seq) for seq in (2048, 8192, 32768)}
    print("attention_counts per row: " + ", ".join(f"{s}: {us:.0f} us" for s, us in cost.items()))
    print(json.dumps({"cases": cases, "attention_counts_us_per_row": cost, "docs": args.docs}))


if __name__ == "__main__":
    main()
