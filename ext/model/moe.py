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
- Load balancing, two ways (``[moe]``):

  * auxiliary loss (``aux_loss_coeff``, default 1e-3, Qwen3's
    ``router_aux_loss_coef``): the Switch-Transformer loss that HF's Qwen3-MoE
    trains with, ``num_experts * sum_i f_i * P_i`` per MoE layer (``f_i``:
    fraction of the token-to-expert assignments that went to expert ``i``,
    ``P_i``: mean router probability of expert ``i``), averaged over the MoE
    layers, added to the objective in the router's gate (:class:`BalancedGate`;
    see :func:`attach_aux_loss` for the scale). It only changes the router
    weights, which HF holds: an export routes exactly as the trained model.
  * auxiliary-loss-free bias update (DeepSeek-V3, arXiv 2408.15664;
    ``load_balance_coeff``, default 0 = off): each MoE layer keeps an
    ``expert_bias`` buffer (checkpointed) that is added to the scores for
    *choosing* experts only (the combine weights stay unbiased). Before every
    optimizer step the tokens each expert received are summed over the
    micro-batches and the data-parallel ranks, and the bias moves by
    ``coeff * sign(mean - count)`` (recentred to mean zero): under-used
    experts become more likely. torchtitan's own Qwen3 spec never registers
    that hook (its optimizer builder is the plain one), so there the bias
    stays 0; our ``ext_qwen3`` uses torchtitan's
    ``build_optimizers_with_moe_load_balancing``, which does. HF's
    Qwen3-MoE has no such bias: a model trained with it cannot be exported
    faithfully, so exports refuse nonzero biases unless
    ``allow_routing_drift`` / ``--allow-routing-drift`` says otherwise.
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

import os
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.overrides import TorchFunctionMode
from torchtitan.models.moe import MoE, MoEArgs
from torchtitan.models.moe.moe import GroupedExperts

from ext.core.errors import ConfigError

IMPLEMENTATIONS = ("grouped", "loop")
QWEN3_AUX_LOSS_COEFF = 1e-3  # router_aux_loss_coef of the released Qwen3-MoE configs


@dataclass
class MoEConfig:
    """The ``[moe]`` section: settings for model flavors that have MoE layers."""

    implementation: Literal["grouped", "loop"] = "grouped"
    """
    How the routed experts run: "grouped" (torch._grouped_mm over tokens
    sorted by expert; bf16 on GPU, the model's dtype on CPU) or "loop" (one
    matmul chain per expert; slower, kept as the reference).
    """

    aux_loss_coeff: float = QWEN3_AUX_LOSS_COEFF
    """
    Weight of the auxiliary load-balancing loss (Switch Transformer / Qwen3-MoE:
    ``num_experts * sum_i f_i * P_i`` per MoE layer, averaged over the layers;
    see ext/model/moe.py) in the training objective. 1e-3 is Qwen3's
    ``router_aux_loss_coef``. It trains only the router weights, so an HF
    export routes as the trained model. 0 turns it off.
    """

    load_balance_coeff: float = 0.0
    """
    Step size of the auxiliary-loss-free load balancing (DeepSeek-V3): before
    each optimizer step every expert's routing bias moves by this much towards
    balance (sign of mean load minus its load), e.g. 1e-3. 0 (default): off,
    no bias. HF's Qwen3-MoE has no routing bias, so a model trained with it
    routes differently once exported: exports refuse it unless
    ``allow_routing_drift``. Applies to every MoE flavor, in place of the
    flavor's own value.
    """

    allow_routing_drift: bool = False
    """
    Let ``[checkpoint] last_save_in_hf`` (and ``dcp-to-hf`` given this config)
    write a Hugging Face folder although ``load_balance_coeff`` > 0: the folder
    then routes without the trained biases (other experts for some tokens,
    other logits). false: such a run is refused before training starts.
    """


@dataclass
class BalancedMoEArgs(MoEArgs):
    """torchtitan's MoEArgs plus the auxiliary load-balancing loss of :class:`RoutedMoE`."""

    aux_loss_coeff: float = 0.0
    """Weight of the balancing loss in the objective (0: none)."""

    aux_loss_tokens_per_step: int = 0
    """Token positions per optimizer step over all ranks and micro-batches
    (``global_batch_size * seq_len``); 0: every forward is a whole step."""


def balanced_moe_args(moe_args: MoEArgs, **changes: Any) -> BalancedMoEArgs:
    """``moe_args`` as :class:`BalancedMoEArgs` (a copy), with ``changes`` applied."""
    values = {f.name: getattr(moe_args, f.name) for f in fields(moe_args)}
    return BalancedMoEArgs(**{**values, **changes})


def tokens_per_step(job_config: Any) -> int:
    """Token positions one optimizer step trains on, over all ranks and micro-batches:
    ``global_batch_size * seq_len``, the global batch resolved as torchtitan's
    Trainer does (-1: ``local_batch_size`` times the data-parallel degree, with
    ``data_parallel_shard_degree = -1`` filling the world size)."""
    training, par = job_config.training, job_config.parallelism
    global_batch = training.global_batch_size
    if global_batch < 0:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
        else:
            world = int(os.environ.get("WORLD_SIZE", 1))
        shard = par.data_parallel_shard_degree
        if shard < 0:
            others = (par.data_parallel_replicate_degree * par.context_parallel_degree
                      * par.tensor_parallel_degree * par.pipeline_parallel_degree)
            shard = max(world // others, 1)
        global_batch = training.local_batch_size * par.data_parallel_replicate_degree * shard
    return global_batch * training.seq_len


def moe_args_from_config(moe_args: MoEArgs, job_config: Any) -> BalancedMoEArgs:
    """A copy of ``moe_args`` with the ``[moe]`` section applied (validated).

    Raises ConfigError for an unknown implementation, a negative coefficient,
    an auxiliary loss with a non-softmax router, and ``[checkpoint]
    last_save_in_hf`` with bias balancing on (``load_balance_coeff`` > 0) but
    without ``allow_routing_drift``: HF's MoE has no routing bias, so that
    final save would not be the trained model (refused before training).
    """
    section = getattr(job_config, "moe", None)
    if section is None:
        return balanced_moe_args(moe_args)
    if section.implementation not in IMPLEMENTATIONS:
        raise ConfigError(
            f"[moe] implementation = {section.implementation!r} is unknown; use \"grouped\" or \"loop\""
        )
    for key in ("load_balance_coeff", "aux_loss_coeff"):
        if getattr(section, key) < 0:
            raise ConfigError(
                f"[moe] {key} = {getattr(section, key)} is negative; use 0 (off) or a small positive value such as 1e-3"
            )
    if section.aux_loss_coeff and moe_args.score_func != "softmax":
        raise ConfigError(
            f"[moe] aux_loss_coeff = {section.aux_loss_coeff}: the auxiliary loss is defined for softmax "
            f"routers, this flavor's is {moe_args.score_func!r}; set aux_loss_coeff = 0"
        )
    checkpoint = getattr(job_config, "checkpoint", None)
    if (section.load_balance_coeff and not section.allow_routing_drift and checkpoint is not None
            and checkpoint.enable and checkpoint.last_save_in_hf):
        raise ConfigError(
            f"[checkpoint] last_save_in_hf with [moe] load_balance_coeff = {section.load_balance_coeff}: "
            "the trained routing biases have no Hugging Face form, so the saved model would route "
            "differently; use [moe] aux_loss_coeff (load_balance_coeff = 0), or set [moe] "
            "allow_routing_drift = true to write it anyway"
        )
    return balanced_moe_args(
        moe_args,
        use_grouped_mm=section.implementation == "grouped",
        load_balance_coeff=section.load_balance_coeff or None,
        aux_loss_coeff=section.aux_loss_coeff,
        aux_loss_tokens_per_step=tokens_per_step(job_config),
    )


class _AddAuxLossGradient(torch.autograd.Function):
    """Identity on ``out``; backward also sends ``scale`` as the gradient of ``aux``."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_aux = torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad_out.device)
        return grad_out, grad_aux, None


def attach_aux_loss(out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
    """``out`` unchanged, with ``scale * aux`` added to whatever objective is
    backpropagated through it (``aux`` is a scalar with a graph to the router).

    No side channel into the trainer's loss: the gradient ``scale * d aux``
    joins the backward pass at ``out`` (the router logits). :class:`BalancedGate` uses
    ``scale = coeff / moe_layers * tokens / tokens_per_step``, where ``tokens``
    is the number of token positions of this forward and ``tokens_per_step``
    those of the whole optimizer step over every micro-batch and
    data-parallel rank (``global_batch_size * seq_len``). torchtitan divides
    the summed token loss by the global count of valid tokens and sums the
    gradients of micro-batches and ranks, so the objective becomes

        mean token loss + coeff * sum_slices (tokens_slice / tokens_per_step) * mean_layers aux_slice

    i.e. the balancing term is a token-weighted *mean* over the micro-batches
    and ranks of the per-slice loss, independent of how the global batch is
    split (gradient accumulation, data or context parallelism). The
    statistics ``f_i`` and ``P_i`` are those of one slice (one micro-batch on
    one rank), as in HF's loss per forward. Positions not trained on
    (padding, -100 labels) still route tokens and are counted.
    """
    return _AddAuxLossGradient.apply(out, aux, scale)


def balancing_loss(probs: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer / Qwen3-MoE load-balancing loss of one layer.

    ``probs``: ``(tokens, num_experts)`` router probabilities (softmax, with a
    graph); ``selected``: ``(tokens, top_k)`` chosen experts. Returns
    ``num_experts * sum_i f_i * P_i`` with ``f_i`` = assignments to expert i
    per token (sums to top_k; no gradient) and ``P_i`` = mean probability of
    expert i: HF's ``load_balancing_loss_func`` for one layer (top_k at
    perfect balance, num_experts * top_k at worst).
    """
    num_experts = probs.shape[-1]
    with torch.no_grad():
        counts = torch.zeros(num_experts, dtype=torch.float32, device=probs.device)
        counts.scatter_add_(0, selected.reshape(-1), torch.ones(selected.numel(), device=probs.device))
        fraction = counts / probs.shape[0]
    return num_experts * (fraction * probs.float().mean(dim=0)).sum()


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


class BalancedGate(nn.Linear):
    """The router's linear gate, which also adds the auxiliary balancing loss.

    Returns the router logits unchanged; while training (grad enabled, weight
    trainable) it attaches ``scale * balancing_loss`` to them
    (:func:`attach_aux_loss`), computed from these logits: the softmax
    probabilities and the experts chosen from them as torchtitan's router
    chooses (``choice_bias``, the layer's ``expert_bias`` when bias balancing
    is on too, is added for the choice only). Nothing is recomputed but the
    softmax and top-k: no extra matmul, so the FLOPs are the model's.
    """

    def __init__(self, dim: int, num_experts: int, *, bias: bool, top_k: int, coeff: float,
                 moe_layers: int, tokens_per_step: int):
        super().__init__(dim, num_experts, bias=bias)
        self.top_k, self.coeff = top_k, coeff
        self.moe_layers, self.tokens_per_step = moe_layers, tokens_per_step
        self.choice_bias: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        if not (self.coeff and torch.is_grad_enabled() and self.weight.requires_grad):
            return logits
        probs = F.softmax(logits.float(), dim=-1)
        with torch.no_grad():
            choice = probs if self.choice_bias is None else probs + self.choice_bias
            selected = torch.topk(choice, k=self.top_k, dim=-1).indices
        scale = self.coeff / self.moe_layers
        if self.tokens_per_step:
            scale *= x.shape[0] / self.tokens_per_step
        return attach_aux_loss(logits, balancing_loss(probs, selected), scale)


class RoutedMoE(MoE):
    """torchtitan's MoE layer with :class:`Experts`, runnable on CPU, and the
    auxiliary balancing loss of ``moe_args.aux_loss_coeff`` in its router's
    gate (:class:`BalancedGate`; ``moe_layers``: MoE layers in the model,
    over which the loss is averaged)."""

    def __init__(self, moe_args: MoEArgs, dim: int, hidden_dim: int, moe_layers: int = 1):
        super().__init__(moe_args, dim=dim, hidden_dim=hidden_dim)
        self.experts = Experts(dim, hidden_dim, moe_args.num_experts, moe_args.use_grouped_mm)
        self.router.gate = BalancedGate(
            dim, moe_args.num_experts, bias=moe_args.gate_bias, top_k=moe_args.top_k,
            coeff=float(getattr(moe_args, "aux_loss_coeff", 0.0) or 0.0), moe_layers=moe_layers,
            tokens_per_step=int(getattr(moe_args, "aux_loss_tokens_per_step", 0) or 0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.router.gate.choice_bias = self.expert_bias
        if x.device.type != "cpu":
            return super().forward(x)
        with _IntegerHistcAsBincount():
            return super().forward(x)


def install_routed_moe(model: nn.Module) -> None:
    """Replace every MoE layer of a torchtitan Qwen3 model by :class:`RoutedMoE` (before init)."""
    args = model.model_args
    blocks = [b for b in model.layers.values() if getattr(b, "moe", None) is not None]
    for block in blocks:
        with torch.device(block.moe.experts.w1.device):
            block.moe = RoutedMoE(args.moe_args, dim=args.dim, hidden_dim=args.moe_inter_dim,
                                  moe_layers=len(blocks))
