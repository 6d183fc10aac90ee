"""MoE layer forward + backward: grouped GEMM experts vs the per-expert loop.

One MoE layer as ``ext_qwen3`` builds it (torchtitan's router and MoE with
:class:`ext.model.moe.Experts`): 128 experts, 8 per token, softmax
routing with renormalized top-k, as in Qwen3-30B-A3B, on ``--tokens``
tokens of random activations. On a GPU the layer has Qwen3-30B-A3B's
widths (dim 2048, experts 768) and 16384 tokens; a CPU gets a quarter of
the widths (512, 192) and 2048 tokens, so that a step takes seconds:

- ``grouped_step_s``: seconds per forward + backward with ``[moe]
  implementation = "grouped"`` (``torch._grouped_mm``);
- ``loop_step_s``: the same with ``"loop"`` (one matmul chain per expert);
- ``max_abs_diff``: largest difference of the two outputs (same weights).

Both runs share the weights and the inputs; each figure is the median of
``--steps`` timed steps after ``--warmup``, in bf16 on a GPU and fp32 (what
CPU training runs in) on a CPU. On an idle 2-core CPU the run takes about
30 s, mostly in the loop path's backward. The last line printed is one JSON
object.

    python benchmarks/moe.py [--tokens N] [--dtype bfloat16] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torchtitan.models.moe import MoEArgs  # noqa: E402

from ext.model.moe import RoutedMoE  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_layer(args, grouped: bool, device, dtype) -> RoutedMoE:
    moe_args = MoEArgs(
        num_experts=args.experts, num_shared_experts=0, top_k=args.top_k, score_func="softmax",
        route_norm=True, route_scale=1.0, score_before_experts=False, use_grouped_mm=grouped,
    )
    torch.manual_seed(0)
    with torch.device(device):
        layer = RoutedMoE(moe_args, dim=args.dim, hidden_dim=args.hidden)
        with torch.no_grad():
            layer.init_weights(0.02, device)
    return layer.to(dtype)


def time_steps(layer, x, args, device) -> tuple[float, torch.Tensor]:
    """Median seconds of forward + backward, and the output of the first forward."""
    out = None
    times = []
    for i in range(args.warmup + args.steps):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        sync(device)
        start = time.perf_counter()
        y = layer(x)
        y.float().square().mean().backward()
        sync(device)
        if out is None:
            out = y.detach()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--tokens", type=int, default=16384 if cuda else 2048)
    parser.add_argument("--dim", type=int, default=2048 if cuda else 512)
    parser.add_argument("--hidden", type=int, default=768 if cuda else 192)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16" if cuda else "float32")
    parser.add_argument("--steps", type=int, default=10 if cuda else 2)
    parser.add_argument("--warmup", type=int, default=3 if cuda else 1)
    args = parser.parse_args()

    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    x = torch.randn(1, args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
    grouped_s, grouped_out = time_steps(build_layer(args, True, device, dtype), x, args, device)
    loop_s, loop_out = time_steps(build_layer(args, False, device, dtype), x, args, device)
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "grouped_step_s": grouped_s,
        "loop_step_s": loop_s,
        "speedup": loop_s / grouped_s,
        "max_abs_diff": (grouped_out.float() - loop_out.float()).abs().max().item(),
        "threads": torch.get_num_threads(),
        "config": vars(args),
    }
    print(f"{result['device']} {args.dtype}, {args.tokens} tokens, {args.experts} experts top-{args.top_k}: "
          f"grouped {grouped_s:.3f} s, loop {loop_s:.3f} s per forward+backward "
          f"({result['speedup']:.2f}x)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
