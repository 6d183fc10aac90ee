"""One prepared GPU check: kernels, training speed and MFU, MoE, a loss check.

Every CUDA path of the project (flex and varlen document-masked attention,
the side-stream prefetch with pinned memory, MFU against a real peak,
grouped-GEMM experts, bf16 training, torch.compile with masks) in one short
run, sized for about 7.5 minutes on one H100/H200 including start-up and
compilation. Each part runs in its own try block (a failure is recorded as
an error string and the other parts go on), prints its progress and elapsed
time, and a global deadline (``--deadline-s``) turns whatever has not
started by then into ``"skipped: time budget"``:

1. ``kernels``: flex and varlen attention within documents (several per row,
   web-like lognormal lengths) and within SkyLadder fragments (documents cut
   at a small window grid), grouped-query heads, forward and backward,
   against dense SDPA with the same boolean mask (``ext.model.masks``):
   max abs difference of the output and of dq, dk, dv, in fp32 and bf16
   where the kernel takes them (bf16 results also against the fp32 dense
   reference, next to dense bf16's own difference from it, the noise floor).
2. ``training``: real trainer launches (``python -m torch.distributed.run
   ... -m ext.train``, ``train_configs/debug.toml`` with command-line
   overrides, the shipped corpus): Llama-3.2-1B (``ext_llama3`` flavor
   ``3.2-1B``), bf16, seq 8192, compiled, ``--steps`` timed steps after
   ``--warmup``; tokens/s, ``mfu_palm`` and ``mfu_exact`` over the timed
   steps (from each run's ``train_summary.json`` history) for plain causal,
   document-masked flex, document-masked varlen, flex with a small
   SkyLadder window (vs the full window = the flex run) and causal with the
   prefetch off (vs on = the causal run). Runs go in that priority order.
3. ``moe``: the Qwen3 MoE debug flavor (``debugmodel_moe``: 64 experts, 8 per
   token), one model, forward + backward under bf16 autocast with grouped
   GEMM experts and with the per-expert loop: median step time of each and
   the max difference of logits and gradients.
4. ``loss_check``: 100 steps of ``train_configs/debug.toml`` (flavor
   ``tiny``) on the shipped corpus, bf16: first and last loss and the loss
   at each logged step next to this repository's CPU run of the same config.

``--dry-run`` runs the same code on the CPU: tiny flavors, short rows, few
steps, fp32 training and MoE (CPU autocast to bf16 is slow), no
torch.compile (inductor's CPU build would take minutes). What cannot exist on
a CPU is recorded as ``"skipped: needs CUDA"`` (flex backward, the varlen
kernel, flex and varlen training); the dense reference and every mask
construction still run, flex forward runs eagerly, and varlen runs through
an emulation from dense SDPA (one call per segment), labelled as such. On
the shared 2-core VM it takes 2-3 minutes of wall time (about 95
CPU-seconds), most of it the start-up of its five trainer launches (~10 s
each: torchrun, then ``import ext.train``).

The last line printed is one JSON object::

    {"device": {...}, "dry_run": ..., "kernels": {...}, "training": {...},
     "moe": {...}, "loss_check": {...}, "elapsed_s": ...}

    python benchmarks/gpu_check.py [--dry-run] [--out PATH] [--log-dir DIR]
        [--deadline-s 450] [--flavor 3.2-1B] [--seq-len 8192] [--batch 2]
        [--warmup 5] [--steps 20]
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # the budget counts interpreter start-up and imports too

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

DEBUG_CONFIG = REPO / "train_configs" / "debug.toml"
NEEDS_CUDA = "skipped: needs CUDA"
TIME_BUDGET = "skipped: time budget"

# ./run_train.sh --job.config_file train_configs/debug.toml --training.steps 100
# on the 2-core CPU VM (fp32, dense document masking, seed 0), measured
# 2026-12-01: the loss at each logged step; the GPU loss check runs the same
# config, steps and batch in bf16 with flex.
CPU_REFERENCE_LOSS = {
    "config": "train_configs/debug.toml --training.steps 100 (fp32, dense backend, CPU)",
    "losses": {"1": 8.1015, "10": 7.4537, "20": 5.7946, "30": 5.5636, "40": 5.1525, "50": 4.8193,
               "60": 4.6555, "70": 4.4283, "80": 4.3795, "90": 4.2937, "100": 4.2773},
}


@dataclass(frozen=True)
class Sizes:
    """Everything --dry-run changes (sizes, device, dtype, compile)."""

    device: str
    # kernels
    k_batch: int
    k_seq: int
    k_heads: int
    k_kv_heads: int
    k_head_dim: int
    k_window: int
    # training
    flavor: str
    seq_len: int
    batch: int
    warmup: int
    steps: int
    log_freq: int
    window: int
    compile: bool
    precision: str
    # moe
    moe_flavor: str
    moe_batch: int
    moe_seq: int
    moe_warmup: int
    moe_steps: int
    moe_autocast: bool
    # loss check
    loss_flavor: str
    loss_steps: int
    loss_log_freq: int
    loss_batch: int
    loss_seq: int
    loss_warmup_steps: int
    deadline_s: float


GPU = Sizes(
    device="cuda",
    k_batch=2, k_seq=4096, k_heads=32, k_kv_heads=8, k_head_dim=64, k_window=512,
    flavor="3.2-1B", seq_len=8192, batch=2, warmup=5, steps=20, log_freq=5, window=512,
    compile=True, precision="bfloat16",
    moe_flavor="debugmodel_moe", moe_batch=4, moe_seq=2048, moe_warmup=3, moe_steps=10, moe_autocast=True,
    loss_flavor="tiny", loss_steps=100, loss_log_freq=10, loss_batch=8, loss_seq=256,
    loss_warmup_steps=20, deadline_s=450.0,
)

DRY = Sizes(
    device="cpu",
    k_batch=2, k_seq=256, k_heads=4, k_kv_heads=2, k_head_dim=16, k_window=32,
    flavor="nano", seq_len=128, batch=4, warmup=2, steps=4, log_freq=2, window=32,
    compile=False, precision="float32",
    moe_flavor="tiny_moe", moe_batch=2, moe_seq=64, moe_warmup=1, moe_steps=2, moe_autocast=False,
    loss_flavor="nano", loss_steps=15, loss_log_freq=5, loss_batch=4, loss_seq=128,
    loss_warmup_steps=5, deadline_s=170.0,
)


# ------------------------------------------------------------------ helpers


class Clock:
    """Elapsed time since the script started and the global deadline."""

    def __init__(self, deadline_s: float, start: float):
        self.start = start
        self.deadline_s = deadline_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.deadline_s - self.elapsed()


def log(msg: str) -> None:
    print(msg, flush=True)


def error_text(exc: BaseException) -> str:
    """``Type: message`` plus the innermost frame, on one line."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"error: {type(exc).__name__}: {first[:400]}{where}"


def run_part(name: str, fn: Callable[[], dict], clock: Clock) -> dict:
    """``fn()`` in its own try block; a failure becomes ``{"error": ...}``."""
    if clock.left() <= 0:
        log(f"== {name}: {TIME_BUDGET} (elapsed {clock.elapsed():.0f} s)")
        return {"status": TIME_BUDGET}
    log(f"== {name} (elapsed {clock.elapsed():.0f} s, {clock.left():.0f} s left)")
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - one failing part must not hide the others
        traceback.print_exc()
        result = {"error": error_text(exc)}
    result["elapsed_s"] = round(time.perf_counter() - start, 1)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the trainer launches that follow need the memory
    log(f"== {name} done in {result['elapsed_s']:.1f} s")
    return result


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def web_like_segments(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """Segment ids ``[batch, seq]`` of rows filled with web-like documents:
    lognormal lengths (median 400 tokens per 2048 of row, 5% longer than a
    row; ``ext.training.flops.web_like_lengths``, the packing benchmark's mix), the
    last document of each row cut at the row end."""
    from ext.training.flops import web_like_lengths

    rows = []
    for r in range(batch):
        lengths = web_like_lengths(seq, seed=seed + r, median=400 * seq / 2048, long_at=seq)  # >= seq tokens
        ends = lengths.cumsum()
        n = int((ends < seq).sum()) + 1
        ids = torch.repeat_interleave(torch.arange(n), torch.from_numpy(lengths[:n]))
        rows.append(ids[:seq])
    return torch.stack(rows)


# ------------------------------------------------------------------ 1. kernels


def emulated_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                         enable_gqa=False):
    """torch's ``varlen_attn`` (CUDA only) from dense SDPA, one segment at a time
    (as tests/test_attention.py emulates it): window (-1, 0) is causal."""
    if window_size not in ((-1, -1), (-1, 0)) or not torch.equal(cu_seq_q, cu_seq_k):
        raise ValueError("the emulation covers equal query/key spans and windows (-1, -1), (-1, 0)")
    outs = []
    for a, b in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=tuple(window_size) == (-1, 0), scale=scale, enable_gqa=enable_gqa)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


def _dense(q, k, v, mask):
    """The reference: SDPA with the boolean mask, key/value heads repeated
    (so that any SDPA backend that takes a mask can run it)."""
    groups = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=mask)


def _forward_backward(fn, q, k, v, grad_out, backward: bool):
    """Output and (dq, dk, dv) of ``fn`` (grads None when ``backward`` is False)."""
    q, k, v = (t.detach().clone().requires_grad_(backward) for t in (q, k, v))
    if not backward:
        with torch.no_grad():
            return fn(q, k, v), None
    out = fn(q, k, v)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), (q.grad, k.grad, v.grad)


def _compare(got, want, prefix: str = "") -> dict[str, float]:
    out, grads = got
    ref_out, ref_grads = want
    result = {f"{prefix}out": max_diff(out, ref_out)}
    if grads is not None:
        for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            result[f"{prefix}{name}"] = max_diff(g, r)
    return result


def kernels_part(sizes: Sizes) -> dict:
    from ext.model.masks import dense_mask, flex_block_mask, varlen_metadata
    from ext.data.skyladder import fragment_segments
    from ext.model.segments import packed_varlen_attention
    from torchtitan.models.attention import VarlenMetadata

    device = torch.device(sizes.device)
    cuda = device.type == "cuda"
    B, S, H, Hkv, D = sizes.k_batch, sizes.k_seq, sizes.k_heads, sizes.k_kv_heads, sizes.k_head_dim
    docs = web_like_segments(B, S)
    cases = {
        "documents": docs,
        f"skyladder_w{sizes.k_window}": torch.from_numpy(fragment_segments(docs.numpy(), sizes.k_window)),
    }
    if cuda:
        from torch.nn.attention.flex_attention import flex_attention
        from torch.nn.attention.varlen import varlen_attn

        flex_fn = torch.compile(flex_attention)
        flex_kernel, varlen_kernel = "flex_attention, torch.compile", "torch.nn.attention.varlen.varlen_attn"
    else:
        from torch.nn.attention.flex_attention import flex_attention as flex_fn

        varlen_attn = emulated_varlen_attn
        flex_kernel = "flex_attention eager (CPU: unfused, forward only)"
        varlen_kernel = "emulated: dense SDPA per segment (the CUDA kernel is not run)"
    result: dict[str, Any] = {
        "shape": {"batch": B, "seq": S, "heads": H, "kv_heads": Hkv, "head_dim": D},
        "flex_kernel": flex_kernel, "varlen_kernel": varlen_kernel,
        "reference": "F.scaled_dot_product_attention with ext.model.masks.dense_mask",
        "cases": {},
    }
    g = torch.Generator().manual_seed(0)
    q32 = torch.randn(B, H, S, D, generator=g).to(device)
    k32 = torch.randn(B, Hkv, S, D, generator=g).to(device)
    v32 = torch.randn(B, Hkv, S, D, generator=g).to(device)
    grad_out = torch.randn(B, H, S, D, generator=g).to(device)
    for case, seg_cpu in cases.items():
        seg = seg_cpu.to(device)
        lengths = [torch.unique_consecutive(row, return_counts=True)[1] for row in seg_cpu]
        entry: dict[str, Any] = {"segments_per_row": [len(n) for n in lengths],
                                 "max_segment_len": max(int(n.max()) for n in lengths)}
        for builder, key in ((dense_mask, "dense"), (flex_block_mask, "flex"), (varlen_metadata, "varlen")):
            built = builder(seg)  # the first flex call compiles create_block_mask: time the second
            sync(device)
            t = time.perf_counter()
            built = builder(seg)
            sync(device)
            entry[f"{key}_mask_build_ms"] = round(1000 * (time.perf_counter() - t), 2)
            if key == "dense":
                mask = built
            elif key == "flex":
                block_mask = built
            else:
                meta = built
        vmeta = VarlenMetadata(meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen)
        dense32 = _forward_backward(lambda q, k, v: _dense(q, k, v, mask), q32, k32, v32, grad_out, True)

        def varlen_call(q, k, v):
            out = packed_varlen_attention(varlen_attn, q, k, v, vmeta)
            return out.view(B, S, H, D).transpose(1, 2)

        def flex_call(q, k, v):
            return flex_fn(q, k, v, block_mask=block_mask, enable_gqa=True)

        for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            q, k, v = (t.to(dtype) for t in (q32, k32, v32))
            per: dict[str, Any] = {}
            if dtype == torch.float32:
                want = dense32
            else:
                want = _forward_backward(lambda q, k, v: _dense(q, k, v, mask), q, k, v, grad_out, True)
                per["dense_vs_dense_fp32"] = _compare(want, dense32)
            for backend, call in (("flex", flex_call), ("varlen", varlen_call)):
                try:
                    if backend == "varlen" and cuda and dtype == torch.float32:
                        # flash varlen takes fp16/bf16; record what the kernel says
                        try:
                            _forward_backward(call, q, k, v, grad_out, False)
                        except Exception as exc:  # noqa: BLE001
                            per[backend] = f"unsupported: {error_text(exc).removeprefix('error: ')[:200]}"
                            continue
                    backward = cuda or backend == "varlen"  # CPU flex has no backward
                    got = _forward_backward(call, q, k, v, grad_out, backward)
                    diffs = _compare(got, want)
                    if not backward:
                        diffs["backward"] = f"{NEEDS_CUDA} (FlexAttention has no CPU backward)"
                    if dtype == torch.bfloat16:
                        diffs.update(_compare(got, dense32, prefix="vs_fp32_"))
                    if not cuda and backend == "varlen":
                        diffs["kernel"] = f"{NEEDS_CUDA}; these figures are of the emulation"
                    per[backend] = diffs
                except Exception as exc:  # noqa: BLE001
                    per[backend] = error_text(exc)
            entry[dtype_name] = per
        result["cases"][case] = entry
        log(f"kernels {case}: " + json.dumps({k: v for k, v in entry.items() if k in ("fp32", "bf16")}))
    return result


# ------------------------------------------------------------------ trainer launches


def launch(name: str, overrides: list[str], dump: Path, log_dir: Path, clock: Clock,
           config: Path = DEBUG_CONFIG, grace_s: float = 15.0) -> dict:
    """One real training run: ``torch.distributed.run -m ext.train`` with
    ``config`` and ``overrides``; returns its train_summary.json (or raises).
    Killed (the process group this function started) when the deadline plus
    ``grace_s`` passes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "ext.train", "--job.config_file", str(config), *overrides,
           "--job.dump_folder", str(dump)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "EXT_SKIP_PREFLIGHT": "1"}
    log_path = log_dir / f"{name}.log"
    log(f"  {name}: {' '.join(cmd[3:])}")
    start = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(clock.left() + grace_s, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"killed at the time budget after {time.perf_counter() - start:.0f} s")
    seconds = time.perf_counter() - start
    if rc != 0:
        tail = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()][-6:]
        raise RuntimeError(f"exit {rc} after {seconds:.0f} s: " + " | ".join(s[-300:] for s in tail))
    summary = json.loads((dump / "train_summary.json").read_text())
    summary["wall_s"] = seconds
    return summary


def steady_figures(summary: dict, warmup: int) -> dict:
    """Tokens/s and MFU over the logged windows that start at or after step
    ``warmup`` (compilation and warm-up excluded), time-weighted."""
    history = summary["history"]
    seconds = tokens = 0.0
    weighted = {"mfu_palm_pct": 0.0, "mfu_exact_pct": 0.0, "trained_tokens_per_s": 0.0}
    have_mfu = True
    for prev, cur in zip(history, history[1:]):
        if prev["step"] < warmup or "flops/tps" not in cur:
            continue
        steps = cur["step"] - prev["step"]
        tps = cur["flops/tps"]
        window_s = steps / tps  # tokens per step cancel: every step has the same rows
        seconds += window_s
        tokens += steps
        weighted["trained_tokens_per_s"] += cur.get("flops/tps_trained", math.nan) * window_s
        if "flops/mfu_palm(%)" in cur:
            weighted["mfu_palm_pct"] += cur["flops/mfu_palm(%)"] * window_s
            weighted["mfu_exact_pct"] += cur["flops/mfu_exact(%)"] * window_s
        else:
            have_mfu = False
    if seconds == 0:
        raise RuntimeError(f"no logged window starts at or after step {warmup}")
    return {
        "timed_steps": int(tokens),
        "tokens_per_s": tokens / seconds,
        "trained_tokens_per_s": weighted["trained_tokens_per_s"] / seconds,
        "mfu_palm_pct": weighted["mfu_palm_pct"] / seconds if have_mfu else None,
        "mfu_exact_pct": weighted["mfu_exact_pct"] / seconds if have_mfu else None,
    }


def run_record(summary: dict, warmup: int) -> dict:
    figures = steady_figures(summary, warmup)
    return {
        **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in figures.items()},
        "first_loss": round(summary["first_loss"], 4), "last_loss": round(summary["last_loss"], 4),
        "summary_tokens_per_s": summary.get("tokens_per_second_per_device"),
        "summary_mfu_palm_pct": summary.get("mfu_palm_pct"),
        "summary_mfu_exact_pct": summary.get("mfu_exact_pct"),
        "peak_tflops": summary.get("peak_tflops"), "device": summary.get("device"),
        "wall_s": round(summary["wall_s"], 1),
    }


def common_overrides(sizes: Sizes, cuda: bool) -> list[str]:
    args = [
        "--model.flavor", sizes.flavor,
        "--training.seq_len", str(sizes.seq_len), "--training.local_batch_size", str(sizes.batch),
        "--training.steps", str(sizes.warmup + sizes.steps),
        "--training.mixed_precision_param", sizes.precision,
        "--optimizer.implementation", "fused" if cuda else "foreach",
        "--metrics.log_freq", str(sizes.log_freq), "--metrics.no-enable-tensorboard",
        "--checkpoint.no-enable", "--activation_checkpoint.mode", "none", "--debug.seed", "0",
    ]
    if sizes.compile:
        args.append("--compile.enable")
    return args


def training_runs(sizes: Sizes, cuda: bool) -> dict[str, list[str] | str]:
    """Run name -> overrides, in priority order (a string: the reason it is skipped)."""
    window = ["--skyladder.enable", "--skyladder.schedule", "rate", "--skyladder.init_window",
              str(sizes.window), "--skyladder.rate", "1000000"]  # the window stays at init_window
    masked = "flex" if cuda else "dense"
    runs: dict[str, list[str] | str] = {
        "flex_docmask": ["--attention.backend", "flex"] if cuda else NEEDS_CUDA,
        "causal": ["--attention.no-document-masking"],
        "varlen_docmask": ["--attention.backend", "varlen"] if cuda else NEEDS_CUDA,
    }
    if not cuda:  # the CPU stand-in for the masked runs
        runs["dense_docmask"] = ["--attention.backend", "dense"]
    runs[f"{masked}_skyladder_w{sizes.window}"] = ["--attention.backend", masked, *window]
    runs["causal_prefetch_off"] = ["--attention.no-document-masking", "--input_pipeline.no-prefetch"]
    return runs


DRY_PARSE_ONLY = ("dense_skyladder_w32", "causal_prefetch_off")
"""Dry-run runs whose options are parsed by the trainer's config parser but not
launched: each launch costs ~12 s of start-up on the 2-core CI machine, and
these differ from the launched ones only by options."""


def parse_only(overrides: list[str]) -> str:
    """Parse ``overrides`` as the trainer would (our sections included); a bad
    option raises. Returns what the dry run records for the run."""
    from torchtitan.config import ConfigManager

    import ext.job_config  # noqa: F401  (our sections)

    try:
        ConfigManager().parse_args(["--job.config_file", str(DEBUG_CONFIG), *overrides])
    except SystemExit as exc:  # the parser exits on a bad option
        raise ValueError(f"the trainer's parser refused the options (exit {exc.code})") from None
    return "skipped: dry run: options parsed by the trainer's parser, not launched"


def training_part(sizes: Sizes, clock: Clock, tmp: Path, log_dir: Path) -> dict:
    cuda = sizes.device == "cuda"
    result: dict[str, Any] = {
        "config": {"flavor": sizes.flavor, "seq_len": sizes.seq_len, "local_batch_size": sizes.batch,
                   "warmup_steps": sizes.warmup, "timed_steps": sizes.steps, "compile": sizes.compile,
                   "precision": sizes.precision, "data": "train_configs/debug.toml [data] (shipped web corpus)",
                   "skyladder_window": sizes.window},
        "runs": {},
    }
    base = common_overrides(sizes, cuda)
    walls: list[float] = []
    for name, overrides in training_runs(sizes, cuda).items():
        if isinstance(overrides, str):
            result["runs"][name] = overrides
            continue
        shortest = min(walls) if walls else 0.0
        if clock.left() <= 0 or (walls and clock.left() < 0.7 * shortest):
            result["runs"][name] = (f"{TIME_BUDGET} ({clock.left():.0f} s left, the shortest run "
                                    f"took {shortest:.0f} s)")
            log(f"  {name}: {result['runs'][name]}")
            continue
        if not cuda and name in DRY_PARSE_ONLY:
            try:
                result["runs"][name] = parse_only([*base, *overrides])
            except Exception as exc:  # noqa: BLE001
                result["runs"][name] = error_text(exc)
            log(f"  {name}: {result['runs'][name]}")
            continue
        try:
            summary = launch(name, [*base, *overrides], tmp / name, log_dir, clock)
            walls.append(summary["wall_s"])
            result["runs"][name] = run_record(summary, sizes.warmup)
            log(f"  {name}: " + json.dumps(result["runs"][name]))
        except TimeoutError as exc:
            result["runs"][name] = f"{TIME_BUDGET} ({exc})"
        except Exception as exc:  # noqa: BLE001
            result["runs"][name] = error_text(exc)
            log(f"  {name}: {result['runs'][name]}")
    runs = result["runs"]

    def ratio(a: str, b: str) -> float | str:
        ra, rb = runs.get(a), runs.get(b)
        if isinstance(ra, dict) and isinstance(rb, dict):
            return round(ra["tokens_per_s"] / rb["tokens_per_s"], 3)
        return "n/a: " + ", ".join(f"{n} {'missing' if r is None else 'not run'}"
                                   for n, r in ((a, ra), (b, rb)) if not isinstance(r, dict))

    masked = "flex" if cuda else "dense"
    result["ratios"] = {
        "flex_docmask_over_causal": ratio("flex_docmask", "causal"),
        "varlen_docmask_over_causal": ratio("varlen_docmask", "causal"),
        "prefetch_on_over_off": ratio("causal", "causal_prefetch_off"),
        f"skyladder_w{sizes.window}_over_full_window": ratio(f"{masked}_skyladder_w{sizes.window}",
                                                             f"{masked}_docmask"),
    }
    if not cuda:
        result["ratios"]["dense_docmask_over_causal"] = ratio("dense_docmask", "causal")
    return result


# ------------------------------------------------------------------ 3. MoE


def moe_part(sizes: Sizes) -> dict:
    from torchtitan.models.moe.moe import GroupedExperts

    from ext.model.qwen3 import SegmentQwen3, qwen3_flavors

    device = torch.device(sizes.device)
    args = qwen3_flavors()[sizes.moe_flavor]
    args.max_seq_len = max(args.max_seq_len, sizes.moe_seq)
    torch.manual_seed(0)
    with torch.device(device):
        model = SegmentQwen3(args)
        with torch.no_grad():
            model.init_weights(buffer_device=device)
    model.train()
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    if not experts:
        raise RuntimeError(f"flavor {sizes.moe_flavor!r} has no MoE experts")
    tokens = torch.randint(0, args.vocab_size, (sizes.moe_batch, sizes.moe_seq),
                           generator=torch.Generator().manual_seed(0)).to(device)

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=sizes.moe_autocast):
            logits = model(tokens)
        logits.float().logsumexp(-1).mean().backward()
        return logits.detach()

    out: dict[str, Any] = {
        "flavor": sizes.moe_flavor, "experts": args.moe_args.num_experts, "top_k": args.moe_args.top_k,
        "tokens": sizes.moe_batch * sizes.moe_seq, "precision": "bf16 autocast, fp32 weights" if sizes.moe_autocast else "fp32",
    }
    results = {}
    for name, grouped in (("grouped", True), ("loop", False)):
        for m in experts:
            m.use_grouped_mm = grouped
        times = []
        logits = None
        for i in range(sizes.moe_warmup + sizes.moe_steps):
            sync(device)
            t = time.perf_counter()
            y = step()
            sync(device)
            if i == 0:
                logits = y
                grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            if i >= sizes.moe_warmup:
                times.append(time.perf_counter() - t)
        results[name] = (logits, grads)
        out[f"{name}_step_s"] = statistics.median(times)
        log(f"  moe {name}: {out[f'{name}_step_s']:.4f} s per forward+backward")
    (lg, gg), (ll, gl) = results["grouped"], results["loop"]
    out["loop_over_grouped"] = out["loop_step_s"] / out["grouped_step_s"]
    out["logits_max_abs_diff"] = max_diff(lg, ll)
    out["logits_max_abs"] = ll.float().abs().max().item()
    out["grad_max_abs_diff"] = max(max_diff(gg[n], gl[n]) for n in gl)
    worst = max(gl, key=lambda n: max_diff(gg[n], gl[n]))
    out["grad_max_abs_diff_param"] = worst
    out["grad_max_abs_of_that_param"] = gl[worst].float().abs().max().item()
    return out


# ------------------------------------------------------------------ 4. loss check


def loss_check_part(sizes: Sizes, clock: Clock, tmp: Path, log_dir: Path) -> dict:
    cuda = sizes.device == "cuda"
    overrides = [
        "--model.flavor", sizes.loss_flavor, "--training.steps", str(sizes.loss_steps),
        "--training.seq_len", str(sizes.loss_seq), "--training.local_batch_size", str(sizes.loss_batch),
        "--lr_scheduler.warmup_steps", str(sizes.loss_warmup_steps),
        "--metrics.log_freq", str(sizes.loss_log_freq), "--metrics.no-enable-tensorboard",
        "--training.mixed_precision_param", sizes.precision,
        "--optimizer.implementation", "fused" if cuda else "foreach",
    ]
    summary = launch("loss_check", overrides, tmp / "loss_check", log_dir, clock)
    losses = {str(h["step"]): round(h["loss"], 4) for h in summary["history"]}
    result = {
        "config": f"train_configs/debug.toml, flavor {sizes.loss_flavor}, {sizes.loss_steps} steps, "
                  f"batch {sizes.loss_batch} x {sizes.loss_seq}, {sizes.precision}",
        "first_loss": round(summary["first_loss"], 4), "last_loss": round(summary["last_loss"], 4),
        "losses": losses,
        "falls": summary["last_loss"] < summary["first_loss"] - 0.5,
        "tokens_per_s": summary.get("tokens_per_second_per_device"),
        "wall_s": round(summary["wall_s"], 1),
    }
    reference = CPU_REFERENCE_LOSS["losses"] if cuda else {}
    common = [s for s in losses if s in reference]
    if common:
        result["cpu_reference"] = CPU_REFERENCE_LOSS
        result["max_abs_diff_to_cpu"] = round(max(abs(losses[s] - reference[s]) for s in common), 4)
    return result


# ------------------------------------------------------------------ main


def device_info(sizes: Sizes) -> dict:
    from ext.training.flops import resolve_peak

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "cpu_count": os.cpu_count()}
    if sizes.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(name=torch.cuda.get_device_name(0), sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info["name"] = "cpu"
    peak = resolve_peak()
    info["peak_tflops_bf16"] = peak.tflops
    info["peak"] = peak.describe()
    return info


class OneLineParser(argparse.ArgumentParser):
    """Bad input: one line on stderr saying what is wrong, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"gpu_check: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Sizes]:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU rehearsal: tiny flavors, short rows, few steps")
    parser.add_argument("--out", type=Path, help="also write the JSON to this file")
    parser.add_argument("--log-dir", type=Path, help="keep the trainer logs here (default: a temporary folder)")
    parser.add_argument("--deadline-s", type=float, help="global time budget (GPU 450, dry run 170)")
    parser.add_argument("--flavor", help="ext_llama3 flavor of the training part (GPU default 3.2-1B)")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--batch", type=int, help="local batch size of the training part")
    parser.add_argument("--warmup", type=int, help="training steps not timed")
    parser.add_argument("--steps", type=int, help="timed training steps")
    parser.add_argument("--no-compile", action="store_true", help="training part without torch.compile")
    parser.add_argument("--parts", default="kernels,moe,loss_check,training",
                        help="comma-separated parts to run, in this order (the others: 'skipped: not selected')")
    args = parser.parse_args(argv)
    sizes = DRY if args.dry_run else GPU
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or use --dry-run for the CPU rehearsal")
    changes = {k: v for k, v in (("flavor", args.flavor), ("seq_len", args.seq_len), ("batch", args.batch),
                                 ("warmup", args.warmup), ("steps", args.steps),
                                 ("deadline_s", args.deadline_s)) if v is not None}
    if args.no_compile:
        changes["compile"] = False
    for key in ("seq_len", "batch", "steps", "deadline_s"):
        if key in changes and changes[key] <= 0:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {changes[key]}")
    if "warmup" in changes and changes["warmup"] < 1:
        parser.error("--warmup must be at least 1 (step 1 compiles and is never timed)")
    sizes = replace(sizes, **changes)
    from ext.model.llama3 import llama3_flavors

    if sizes.flavor not in llama3_flavors():
        parser.error(f"--flavor {sizes.flavor!r} is not an ext_llama3 flavor; use one of "
                     f"{', '.join(sorted(llama3_flavors()))}")
    if sizes.warmup % sizes.log_freq or sizes.steps % sizes.log_freq:
        parser.error(f"--warmup and --steps must be multiples of the log frequency {sizes.log_freq}")
    unknown = set(args.parts.split(",")) - {"kernels", "moe", "loss_check", "training"}
    if unknown:
        parser.error(f"--parts: unknown part(s) {sorted(unknown)}; use kernels, moe, loss_check, training")
    return args, sizes


def main(argv: list[str] | None = None) -> dict:
    args, sizes = parse_args(argv)
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    clock = Clock(sizes.deadline_s, STARTED)
    result: dict[str, Any] = {"device": device_info(sizes), "dry_run": args.dry_run, "sizes": asdict(sizes)}
    log(f"gpu_check: {result['device']['name']}, torch {torch.__version__}, "
        f"{'dry run (CPU)' if args.dry_run else 'GPU'}, deadline {sizes.deadline_s:.0f} s")
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp_name:
        tmp = Path(tmp_name)
        log_dir = args.log_dir or tmp / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        runners = {
            "kernels": lambda: kernels_part(sizes),
            "moe": lambda: moe_part(sizes),
            "loss_check": lambda: loss_check_part(sizes, clock, tmp, log_dir),
            "training": lambda: training_part(sizes, clock, tmp, log_dir),
        }
        for name in ("kernels", "moe", "loss_check", "training"):
            if name not in parts:
                result[name] = {"status": "skipped: not selected (--parts)"}
        for name in parts:
            result[name] = run_part(name, runners[name], clock)
    result["elapsed_s"] = round(clock.elapsed(), 1)
    ordered = {k: result[k] for k in ("device", "dry_run", "kernels", "training", "moe", "loss_check",
                                      "elapsed_s", "sizes")}
    line = json.dumps(ordered, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    log(f"gpu_check: done in {result['elapsed_s']:.0f} s")
    print(line, flush=True)
    return ordered


if __name__ == "__main__":
    main()
