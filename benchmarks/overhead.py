"""Training throughput: our trainer and loader against stock torchtitan's.

Both sides train the same model (torchtitan's Llama-3 ``debugmodel`` by
default, plain causal attention), with the same tokenizer, text, seq_len,
batch, optimizer and device, in fresh processes started from this one:

- ``ext``: ``python -m ext.train`` (our Trainer, ``[input_pipeline] prefetch``
  on), train spec ``ext_llama3``, our packed loader (``[data]``, default
  best-fit packing and ``num_workers``) on a jsonl copy of the shipped web
  corpus; document masking off so the model computes the same thing;
- ``torchtitan``: ``python -m torchtitan.train`` (torchtitan's Trainer), its
  ``llama3`` spec and its own text loader (``training.dataset = "c4_test"``,
  ``training.dataset_path`` pointing at the same file, in the layout its
  c4_test loader reads). On a CPU host it names ``ext.job_config`` only for
  the CPU support that stock torchtitan lacks (device globals; it changes
  neither the Trainer nor the spec); with a GPU it runs unmodified.

Throughput is tokens/s per device from torchtitan's own ``tps`` log figure,
over the logged windows after ``--warmup`` steps (total tokens over total
time), best of ``--repeats`` runs, sides interleaved (the machine is noisy);
the JSON also gives every run and the ratio of the medians.
With CUDA the script also runs ours with the prefetch off, on the same model
and on the small ``nano`` model where copies weigh more.

Target: ext / torchtitan >= 0.95. The last line printed is one JSON object.

    python benchmarks/overhead.py [--flavor debugmodel] [--seq-len 256] [--batch 8]
        [--steps 30] [--warmup 10] [--log-freq 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "ext" / "assets" / "data" / "web.jsonl"
TOKENIZER = REPO / "ext" / "assets" / "tokenizer"
TPS = re.compile(r"step:\s*(\d+)\s.*?tps:\s*([\d,]+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def base_args(args: argparse.Namespace, dump: Path, cuda: bool) -> list[str]:
    """Settings both sides share (torchtitan's own keys only)."""
    return [
        "--model.flavor", args.flavor, "--model.hf_assets_path", str(TOKENIZER),
        "--training.seq_len", str(args.seq_len), "--training.local_batch_size", str(args.batch),
        "--training.steps", str(args.steps), "--training.max_norm", "1.0",
        "--training.mixed_precision_param", "bfloat16" if cuda else "float32",
        "--optimizer.name", "AdamW", "--optimizer.lr", "3e-3",
        "--optimizer.implementation", "fused" if cuda else "foreach",
        "--lr_scheduler.warmup_steps", "2",
        "--metrics.log_freq", str(args.log_freq), "--metrics.no-enable-tensorboard",
        "--checkpoint.no-enable", "--activation_checkpoint.mode", "none", "--debug.seed", "0",
        "--job.dump_folder", str(dump),
    ]


def steady_tokens_per_s(output: str, warmup: int) -> float:
    """Tokens/s over the logged windows that start at or after step ``warmup``."""
    logged = [(int(s), float(t.replace(",", ""))) for s, t in TPS.findall(ANSI.sub("", output))]
    windows = [(prev, step, tps) for (prev, _), (step, tps) in zip(logged, logged[1:]) if prev >= warmup]
    if not windows:
        raise SystemExit(f"no logged window starts after step {warmup}; raise --steps\n{output[-3000:]}")
    steps = sum(step - prev for prev, step, _ in windows)
    seconds_per_token = sum((step - prev) / tps for prev, step, tps in windows)
    return steps / seconds_per_token  # equal tokens per step: total tokens / total time


def run(module: str, extra: list[str], args: argparse.Namespace, dump: Path, cuda: bool) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", module, *base_args(args, dump, cuda), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(dump.parent / "hf_cache"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"{module} failed ({proc.returncode}):\n{' '.join(cmd)}\n{output[-4000:]}")
    return steady_tokens_per_s(output, args.warmup)


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", default="debugmodel", help="a llama3 flavor both specs have")
    parser.add_argument("--seq-len", type=int, default=2048 if cuda else 256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60 if cuda else 30)
    parser.add_argument("--warmup", type=int, default=20 if cuda else 10, help="steps not timed")
    parser.add_argument("--log-freq", type=int, default=10 if cuda else 5)
    parser.add_argument("--repeats", type=int, default=3, help="best of N runs of each side")
    parser.add_argument("--num-workers", default="auto", help="our loader's [data] num_workers")
    parser.add_argument("--small-flavor", default="nano", help="GPU only: model for prefetch on/off")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus_dir = tmp / "corpus"  # what torchtitan's c4_test loader reads: a folder of json lines
        corpus_dir.mkdir()
        corpus = corpus_dir / "web.json"
        corpus.write_text(CORPUS.read_text() * 4)
        ours = ["--job.custom_config_module", "ext.job_config", "--model.name", "ext_llama3",
                "--data.datasets", str(corpus), "--data.num_workers", args.num_workers,
                "--attention.no-document-masking"]
        stock = ["--model.name", "llama3", "--training.dataset", "c4_test",
                 "--training.dataset_path", str(corpus_dir)]
        if not cuda:
            stock += ["--job.custom_config_module", "ext.job_config"]  # CPU support only
        sides = {"ext": ("ext.train", ours), "torchtitan": ("torchtitan.train", stock)}
        if cuda:
            sides["ext_prefetch_off"] = ("ext.train", [*ours, "--input_pipeline.no-prefetch"])
            small = ["--model.flavor", args.small_flavor]
            sides["small_prefetch_on"] = ("ext.train", [*ours, *small])
            sides["small_prefetch_off"] = ("ext.train", [*ours, *small, "--input_pipeline.no-prefetch"])
        runs: dict[str, list[float]] = {name: [] for name in sides}
        for r in range(args.repeats):
            for name, (module, extra) in sides.items():
                tps = run(module, extra, args, tmp / f"{name}_{r}", cuda)
                runs[name].append(tps)
                print(f"repeat {r + 1}: {name:<20} {tps:12,.0f} tokens/s", flush=True)

    best = {name: max(values) for name, values in runs.items()}
    result = {
        "ext_tokens_per_s": best["ext"],
        "torchtitan_tokens_per_s": best["torchtitan"],
        "ratio": best["ext"] / best["torchtitan"],
        # The ratio of the medians is the figure to trust when single runs scatter.
        "median_ratio": statistics.median(runs["ext"]) / statistics.median(runs["torchtitan"]),
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
    }
    if cuda:
        result["ext_prefetch_off_tokens_per_s"] = best["ext_prefetch_off"]
        result["prefetch_speedup"] = best["ext"] / best["ext_prefetch_off"]
        result[f"{args.small_flavor}_prefetch_on_tokens_per_s"] = best["small_prefetch_on"]
        result[f"{args.small_flavor}_prefetch_off_tokens_per_s"] = best["small_prefetch_off"]
        result[f"{args.small_flavor}_prefetch_speedup"] = best["small_prefetch_on"] / best["small_prefetch_off"]
    result["runs"] = {name: [round(v, 1) for v in values] for name, values in runs.items()}
    result["config"] = vars(args)
    print(f"{result['device']}: ext {result['ext_tokens_per_s']:,.0f} tok/s, torchtitan "
          f"{result['torchtitan_tokens_per_s']:,.0f} tok/s, ratio {result['ratio']:.3f}, "
          f"ratio of medians {result['median_ratio']:.3f} (target >= 0.95)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
