"""Mixture-of-experts: the ``[moe]`` section and the expert computation.

The MoE layer is torchtitan's (``torchtitan.models.moe.MoE``), as its Qwen3
model builds it. What it does, read from torchtitan 0.2.2:

- Routing: token choice, top-k. The router is a bias-free linear gate; scores
  are softmax (Qwen3) or sigmoid in fp32 over all experts; each token picks
  its ``top_k`` experts; with ``route_norm`` (Qwen3's ``norm_topk_prob``) the
  k scores are renormalized to sum to 1, then scaled by ``route_scale``. The
  expert outputs are combined with those scores after the experts
  (``score_before_experts = False`` for Qwen3). Optional node-limited routing
  (``num_expert_groups``) is off for Qwen3.
- Load balancing: auxiliary-loss-free bias update (DeepSeek-V3, arXiv
  2408.15664), no auxiliary loss. Each MoE layer keeps an ``expert_bias``
  buffer (checkpointed) that is added to the scores for *choosing* experts
  only (the combine weights stay unbiased). Before every optimizer step the
  tokens each expert received are summed over the micro-batches and the
  data-parallel ranks, and the bias moves by ``coeff * sign(mean - count)``
  (recentred to mean zero): under-used experts become more likely.
  torchtitan's own Qwen3 spec never registers that hook (its optimizer
  builder is the plain one), so there the bias stays 0; our ``ext_qwen3``
  uses torchtitan's ``build_optimizers_with_moe_load_balancing``, which does.
  HF Qwen3-MoE was trained with an auxiliary loss instead
  (``router_aux_loss_coef``); nothing here computes one.
- Capacity: none. Routing is dropless: every token reaches all of its k
  experts however unbalanced the load, so compute per expert varies with
  the batch. For the grouped GEMM on GPU each expert's group of tokens is
  padded with zero rows to a multiple of 8 (at least 8, also for an expert
  with no tokens; 16 or 32 with float8/mxfp8), dropped again afterwards.
- Expert computation (``[moe] implementation``): "grouped" runs the experts
  as three ``torch._grouped_mm`` calls over the tokens sorted by expert;
  "loop" runs one matmul chain per expert in a Python loop (one host sync
  per layer for the per-expert token counts).
- CPU: torchtitan's MoE does not run on CPU as shipped (the token counts use
  ``torch.histc`` on int64, a CUDA-only kernel, and the group padding is a
  Triton kernel). :class:`RoutedMoE` counts with ``bincount`` on CPU and
  :class:`Experts` calls ``torch._grouped_mm`` there directly, unpadded and
  in the activations' dtype (the CPU kernel takes fp32 and bf16). On GPU
  both are torchtitan's code unchanged, where the grouped path casts to
  bf16 whatever the model dtype.
"""

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.overrides import TorchFunctionMode
from torchtitan.models.moe import MoE, MoEArgs
from torchtitan.models.moe.moe import GroupedExperts

from ext.errors import ConfigError

IMPLEMENTATIONS = ("grouped", "loop")


@dataclass
class MoEConfig:
    """The ``[moe]`` section: settings for model flavors that have MoE layers."""

    implementation: Literal["grouped", "loop"] = "grouped"
    """
    How the routed experts run: "grouped" (torch._grouped_mm over tokens
    sorted by expert; bf16 on GPU, the model's dtype on CPU) or "loop" (one
    matmul chain per expert; slower, kept as the reference).
    """

    load_balance_coeff: float = 1e-3
    """
    Step size of the auxiliary-loss-free load balancing: before each optimizer
    step every expert's routing bias moves by this much towards balance
    (sign of mean load minus its load). 0 turns balancing off (no bias).
    Applies to every MoE flavor, in place of the flavor's own value.
    """


def moe_args_from_config(moe_args: MoEArgs, job_config: Any) -> MoEArgs:
    """A copy of ``moe_args`` with the ``[moe]`` section applied (validated)."""
    section = getattr(job_config, "moe", None)
    if section is None:
        return moe_args
    if section.implementation not in IMPLEMENTATIONS:
        raise ConfigError(
            f"[moe] implementation = {section.implementation!r} is unknown; use \"grouped\" or \"loop\""
        )
    if section.load_balance_coeff < 0:
        raise ConfigError(
            f"[moe] load_balance_coeff = {section.load_balance_coeff} is negative; use 0 (off) or a small positive step such as 1e-3"
        )
    return replace(
        moe_args,
        use_grouped_mm=section.implementation == "grouped",
        load_balance_coeff=section.load_balance_coeff or None,
    )


def _grouped_experts(
    w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, x: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """SwiGLU experts over ``x`` sorted by expert, ``counts[e]`` rows each, in x's dtype."""
    ends = torch.cumsum(counts, dim=0, dtype=torch.int32)
    gate = torch._grouped_mm(x, w1.transpose(-2, -1), offs=ends)
    up = torch._grouped_mm(x, w3.transpose(-2, -1), offs=ends)
    return torch._grouped_mm(F.silu(gate) * up, w2.transpose(-2, -1), offs=ends)


class Experts(GroupedExperts):
    """torchtitan's GroupedExperts, with a grouped path that runs on CPU.

    Parameters, initialization, expert parallelism and the loop path are
    torchtitan's. On CPU, "grouped" calls ``torch._grouped_mm`` directly, in
    the activations' dtype and without padding the groups: torchtitan's
    padding step is a Triton kernel (GPU only), and the CPU kernel needs no
    alignment.
    """

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        if self.use_grouped_mm and x.device.type == "cpu" and not isinstance(self.w1, DTensor):
            return _grouped_experts(self.w1, self.w2, self.w3, x, num_tokens_per_expert)
        return super().forward(x, num_tokens_per_expert)


class _IntegerHistcAsBincount(TorchFunctionMode):
    """``torch.histc(indices, bins=n, min=0, max=n)`` of integer indices as a bincount.

    torchtitan counts tokens per expert with ``histc`` on int64 expert
    indices, which only the CUDA kernel accepts. Any other call passes through.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.histc and not args[0].is_floating_point():
            params = dict(zip(("bins", "min", "max"), args[1:]), **kwargs)
            bins = params.get("bins", 100)
            if params.get("min", 0) == 0 and params.get("max", 0) == bins:
                return torch.bincount(args[0].reshape(-1), minlength=bins)
        return func(*args, **kwargs)


class RoutedMoE(MoE):
    """torchtitan's MoE layer with :class:`Experts`, runnable on CPU."""

    def __init__(self, moe_args: MoEArgs, dim: int, hidden_dim: int):
        super().__init__(moe_args, dim=dim, hidden_dim=hidden_dim)
        self.experts = Experts(dim, hidden_dim, moe_args.num_experts, moe_args.use_grouped_mm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        with _IntegerHistcAsBincount():
            return super().forward(x)


def install_routed_moe(model: nn.Module) -> None:
    """Replace every MoE layer of a torchtitan Qwen3 model by :class:`RoutedMoE` (before init)."""
    args = model.model_args
    for block in model.layers.values():
        if getattr(block, "moe", None) is None:
            continue
        with torch.device(block.moe.experts.w1.device):
            block.moe = RoutedMoE(args.moe_args, dim=args.dim, hidden_dim=args.moe_inter_dim)
