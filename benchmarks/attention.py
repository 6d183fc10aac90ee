"""Training-step throughput with plain causal vs document-masked attention.

On the available device, for a small Llama-style model on rows packed from
web-like document lengths, in ``--rounds`` interleaved rounds (each round
times ``--steps`` steps of every side, the order of the sides alternating
from round to round, so that drift of a shared machine hits both alike):

- ``causal_tokens_per_s``: median over rounds of forward + backward tokens/s,
  plain causal SDPA;
- ``docmask_tokens_per_s``: the same with document masking on the backend
  that ``[attention] backend = "auto"`` picks (flex on CUDA, dense on CPU);
  on CUDA also ``varlen_docmask_tokens_per_s``;
- ``docmask_over_causal``: median and range over rounds of the per-round
  ratio (the ``per_round`` lists hold every round's tokens/s);
- ``mask_build_fraction``: time to build that backend's mask from segment
  ids, as a fraction of the median masked step;
- ``flex_max_abs_diff`` / ``varlen_max_abs_diff``: attention outputs of flex
  and (causal) varlen against the dense SDPA reference in bf16 (GPU only,
  else null).

The model is built in float32 and only its floating-point tensors are cast
to the run's dtype: the complex64 RoPE table stays complex (``model.to``
would cast it to a real dtype and drop its imaginary part).

Targets (GPU): mask building < 2% of step time; document masking no slower
than causal on flex and varlen. The last line printed is one JSON object.

    python benchmarks/attention.py [--seq-len 2048] [--batch 4] [--steps 10] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ext.model.masks import dense_mask, flex_block_mask, varlen_metadata  # noqa: E402
from ext.model.llama3 import SegmentLlama3, SegmentLlama3Args  # noqa: E402
from ext.model.segments import packed_varlen_attention  # noqa: E402


def web_like_segments(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """Segment ids of rows filled with lognormal document lengths (median 400 * seq/2048)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        lengths = []
        while sum(lengths) < seq:
            lengths.append(max(1, int(rng.lognormal(np.log(400 * seq / 2048), 1.0))))
        lengths[-1] -= sum(lengths) - seq
        rows.append(np.repeat(np.arange(len(lengths)), lengths))
    return torch.from_numpy(np.stack(rows))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cast_floating(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast the floating-point parameters and buffers of ``model`` to ``dtype``;
    complex buffers (the RoPE ``freqs_cis``) and integer ones keep theirs."""
    return model._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)


def build_model(backend: str, args, device: torch.device, dtype: torch.dtype) -> SegmentLlama3:
    """The benchmark's model for ``backend`` ("none" = plain causal SDPA, "dense",
    "flex", "varlen"): seeded float32 init, then :func:`cast_floating`."""
    model_args = SegmentLlama3Args(
        dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads // 2,
        vocab_size=2048, multiple_of=64, max_seq_len=args.seq_len, mask_backend=backend,
        attn_type={"none": "sdpa", "dense": "sdpa"}.get(backend, backend),
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = SegmentLlama3(model_args)
        with torch.no_grad():
            model.init_weights()
    return cast_floating(model, dtype)


def varlen_meta(segment_ids: torch.Tensor):
    from torchtitan.models.attention import VarlenMetadata

    m = varlen_metadata(segment_ids)
    return VarlenMetadata(m.cu_seqlens, m.cu_seqlens, m.max_seqlen, m.max_seqlen)


def mask_builder(backend: str, segment_ids: torch.Tensor) -> Callable[[], object]:
    if backend == "flex":
        return lambda: flex_block_mask(segment_ids)
    if backend == "varlen":
        return lambda: varlen_meta(segment_ids)
    if backend == "dense":
        return lambda: dense_mask(segment_ids)
    return lambda: None


def step_fn(backend: str, model, tokens, segment_ids) -> Callable[[], None]:
    """One forward + backward of ``model``, its mask built from segment ids inside the step."""
    build = mask_builder(backend, segment_ids)

    def step():
        masks = build() if backend in ("flex", "varlen") else None
        out = model(tokens, attention_masks=masks, segment_ids=segment_ids if backend == "dense" else None)
        out.float().square().mean().backward()

    return step


def timed(fn: Callable[[], object], n: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``n`` calls."""
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - start) / n


def interleaved_rounds(steps: dict[str, Callable[[], None]], rounds: int, n: int,
                       device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of every side, per round; the order of the sides is
    reversed every other round."""
    names = list(steps)
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            out[name].append(timed(steps[name], n, device))
    return out


def varlen_output(attn_fn, q, k, v, segment_ids) -> torch.Tensor:
    """Attention of ``q, k, v`` (``[b, heads, s, head_dim]``) within the documents of
    ``segment_ids`` through ``attn_fn`` (``varlen_attn``'s signature), called as the
    model calls it (:func:`ext.model.segments.packed_varlen_attention`: causal)."""
    b, heads, s, head_dim = q.shape
    out = packed_varlen_attention(attn_fn, q, k, v, varlen_meta(segment_ids))
    return out.view(b, s, heads, head_dim).transpose(1, 2)


def kernel_diffs(device, segment_ids, heads: int = 8, head_dim: int = 64) -> dict[str, float | None]:
    """Max |flex - dense| and |varlen - dense| of attention outputs in bf16 (CUDA only)."""
    if device.type != "cuda":
        return {"flex_max_abs_diff": None, "varlen_max_abs_diff": None}
    from torch.nn.attention.flex_attention import flex_attention
    from torch.nn.attention.varlen import varlen_attn

    b, s = segment_ids.shape
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, heads, s, head_dim, device=device, dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(segment_ids))
    flex = torch.compile(flex_attention)(q, k, v, block_mask=flex_block_mask(segment_ids))
    var = varlen_output(varlen_attn, q, k, v, segment_ids)
    return {
        "flex_max_abs_diff": (flex.float() - ref.float()).abs().max().item(),
        "varlen_max_abs_diff": (var.float() - ref.float()).abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--seq-len", type=int, default=2048 if cuda else 512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dim", type=int, default=512 if cuda else 128)
    parser.add_argument("--layers", type=int, default=4 if cuda else 2)
    parser.add_argument("--heads", type=int, default=8 if cuda else 4)
    parser.add_argument("--steps", type=int, default=10 if cuda else 3, help="steps per side per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3 if cuda else 1)
    args = parser.parse_args()

    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    segment_ids = web_like_segments(args.batch, args.seq_len).to(device)
    tokens = torch.randint(0, 2048, (args.batch, args.seq_len), device=device)
    backend = "flex" if cuda else "dense"
    sides = {"causal": "none", "docmask": backend, **({"varlen_docmask": "varlen"} if cuda else {})}
    steps = {}
    for name, side_backend in sides.items():
        steps[name] = step_fn(side_backend, build_model(side_backend, args, device, dtype), tokens, segment_ids)
        for _ in range(args.warmup):
            steps[name]()
    per_round = interleaved_rounds(steps, args.rounds, args.steps, device)
    tps = {name: [args.batch * args.seq_len / s for s in secs] for name, secs in per_round.items()}
    median = {name: statistics.median(v) for name, v in tps.items()}
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "backend": backend,
        "causal_tokens_per_s": median["causal"],
        "docmask_tokens_per_s": median["docmask"],
    }
    for name in sides:
        if name == "causal":
            continue
        ratios = [m / c for m, c in zip(tps[name], tps["causal"])]
        result[f"{name}_over_causal"] = {"median": statistics.median(ratios),
                                         "min": min(ratios), "max": max(ratios)}
        build_s = timed(mask_builder(sides[name], segment_ids), args.steps, device)
        prefix = "" if name == "docmask" else "varlen_"
        result[f"{prefix}mask_build_fraction"] = build_s / statistics.median(per_round[name])
        if name != "docmask":
            result[f"{name}_tokens_per_s"] = median[name]
    result.update(kernel_diffs(device, segment_ids))
    result["per_round_tokens_per_s"] = tps
    result["config"] = vars(args)
    r = result["docmask_over_causal"]
    print(f"{result['device']}: median of {args.rounds} interleaved rounds: causal {median['causal']:,.0f} tok/s, "
          f"document-masked ({backend}) {median['docmask']:,.0f} tok/s, masked/causal {r['median']:.2f} "
          f"(rounds {r['min']:.2f}-{r['max']:.2f}), mask build {100 * result['mask_build_fraction']:.2f}% "
          f"of the step")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
