"""Training-step throughput with plain causal vs document-masked attention.

On the available device, for a small Llama-style model on rows packed from
web-like document lengths:

- ``causal_tokens_per_s``: forward + backward tokens/s, plain causal SDPA;
- ``docmask_tokens_per_s``: the same with document masking on the backend
  that ``[attention] backend = "auto"`` picks (flex on CUDA, dense on CPU);
- ``mask_build_fraction``: time to build that backend's mask from segment
  ids, as a fraction of the masked step;
- ``flex_max_abs_diff`` / ``varlen_max_abs_diff``: attention outputs of flex
  and varlen against the dense SDPA reference in bf16 (GPU only, else null).

Targets (GPU): mask building < 2% of step time; document masking no slower
than causal on flex and varlen. The last line printed is one JSON object.

    python benchmarks/attention.py [--seq-len 2048] [--batch 4] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ext.attention.masks import dense_mask, flex_block_mask, varlen_metadata  # noqa: E402
from ext.models.llama3 import SegmentLlama3, SegmentLlama3Args  # noqa: E402


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


def step_tokens_per_s(backend: str, args, device, dtype, segment_ids) -> tuple[float, float]:
    """(tokens/s of forward+backward, seconds per mask build) for ``backend``."""
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
    model.to(dtype)
    tokens = torch.randint(0, 2048, (args.batch, args.seq_len), device=device)

    def build():
        if backend == "flex":
            return flex_block_mask(segment_ids)
        if backend == "varlen":
            from torchtitan.models.attention import VarlenMetadata

            m = varlen_metadata(segment_ids)
            return VarlenMetadata(m.cu_seqlens, m.cu_seqlens, m.max_seqlen, m.max_seqlen)
        return dense_mask(segment_ids) if backend == "dense" else None

    def step():
        masks = build() if backend in ("flex", "varlen") else None
        out = model(tokens, attention_masks=masks,
                    segment_ids=segment_ids if backend == "dense" else None)
        out.float().square().mean().backward()

    for _ in range(args.warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    per_step = (time.perf_counter() - start) / args.steps
    build_s = 0.0
    if backend != "none":
        build()
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            build()
        sync(device)
        build_s = (time.perf_counter() - start) / args.steps
    return args.batch * args.seq_len / per_step, build_s / per_step


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
    meta = varlen_metadata(segment_ids)
    packed = [t.transpose(1, 2).reshape(b * s, heads, head_dim) for t in (q, k, v)]
    var = varlen_attn(*packed, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen)
    var = var.view(b, s, heads, head_dim).transpose(1, 2)
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
    parser.add_argument("--steps", type=int, default=10 if cuda else 3)
    parser.add_argument("--warmup", type=int, default=3 if cuda else 1)
    args = parser.parse_args()

    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    segment_ids = web_like_segments(args.batch, args.seq_len).to(device)
    backend = "flex" if cuda else "dense"
    causal, _ = step_tokens_per_s("none", args, device, dtype, segment_ids)
    docmask, build_fraction = step_tokens_per_s(backend, args, device, dtype, segment_ids)
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "backend": backend,
        "causal_tokens_per_s": causal,
        "docmask_tokens_per_s": docmask,
        "mask_build_fraction": build_fraction,
        **kernel_diffs(device, segment_ids),
    }
    if cuda:
        result["varlen_docmask_tokens_per_s"], result["varlen_mask_build_fraction"] = step_tokens_per_s(
            "varlen", args, device, dtype, segment_ids
        )
    result["config"] = vars(args)
    print(f"{result['device']}: causal {causal:,.0f} tok/s, document-masked ({backend}) "
          f"{docmask:,.0f} tok/s, mask build {100 * build_fraction:.2f}% of the step")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
