"""FLOPs and MFU that tell the truth.

torchtitan 0.2.2 counts ``6 N + 12 L H d_head S`` FLOPs per token, once, from
``training.seq_len``: every token attends to all ``S`` positions (no causal
halving, no document mask, no SkyLadder window), padding and ignored tokens
count as trained, a tied LM head is left out, and an unknown device gets the
A100's peak. This module counts instead, for each batch:

* **Matmuls** (per token, forward ``2 M`` FLOPs, training ``6 M``): ``M`` is
  the number of weights a token passes through in matrix products: the
  attention projections (q, k, v, o; GQA shrinks k and v), the dense SwiGLU
  FFN, or for MoE layers the router, the ``top_k`` routed experts, the shared
  experts and, when scores are applied after the experts, the ``(1 x k) @
  (k x dim)`` combine; plus the LM head, which is a matmul even when tied to
  the embedding (tying removes a parameter, not a product). The embedding
  lookup is not a matmul.
* **Attention** (per attended query-key pair, forward ``4 H d_head`` per
  layer, training ``12 L H d_head``): ``q . k`` and ``p . v`` for every query
  head (GQA does not shrink these). Pairs are counted exactly from the
  batch's segments (:func:`attention_counts`).
* **Every token that runs through the model.** Model FLOPs are those of the
  non-padding tokens, trained or not: ``6 M`` per token plus ``12 L H
  d_head`` per key each of them attends to (``sum len (len + 1) / 2`` per
  segment). An SFT prompt (labels -100) and each document's last token are
  computed forward and backward like any other, so they count; padding does
  not.
* **Two MFUs.** ``mfu_exact`` divides these exact FLOPs by the peak;
  ``mfu_palm`` uses the PaLM / torchtitan convention instead, ``6 N + 12 L
  H d_head S`` per non-padding token with ``S = seq_len`` and ``N`` the
  parameters torchtitan counts (:meth:`FlopsModel.palm_flops_per_token`): it
  is the figure to compare with published MFU.
* **Hardware FLOPs** add what activation checkpointing recomputes in the
  backward (:meth:`FlopsModel.recompute_flops`), on the exact basis. Work the
  attention kernel repeats internally (flash/flex backward recomputing ``q .
  k``) and work on padding are in neither figure.
* **Peak** dense TFLOP/s per device (:data:`PEAK_TFLOPS_BF16`), from
  ``torch.cuda.get_device_name()`` and its properties (never ``lspci``),
  doubled for fp8 where the device has fp8 tensor cores and a float8/MX
  converter is on; unknown devices (the CPU included) have no peak, so MFU is
  "n/a"; ``[metrics] peak_tflops`` overrides.

Everything here is a pure function of model args and segment statistics,
except :class:`FlopsMeter` (the metrics processor's per-log accounting) and
:func:`install_peak_lookup` (which points torchtitan's ``get_peak_flops`` at
our table so that its own log line and MFU use it too).
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from ext.core.errors import ConfigError
from ext.data.counts import AttentionCounts, attention_counts
from ext.data.stats import BatchStats
from ext.model.hf import llama_ffn_dim


# Model families whose attention or layout this module does not describe.
_UNSUPPORTED_FIELDS = {
    "kv_lora_rank": "multi-head latent attention (DeepSeek)",
    "q_lora_rank": "multi-head latent attention (DeepSeek)",
    "interleave_moe_layer_step": "interleaved MoE and chunked attention (Llama-4)",
    "every_n_layers_nope": "chunked attention layers (Llama-4)",
    "sliding_window_size": "sliding-window attention (gpt-oss)",
}
# Names under which model args say that the LM head shares the embedding weight.
_TIED_FIELDS = ("enable_weight_tying", "tie_word_embeddings", "tie_embeddings", "weight_tying")


class UnsupportedModel(ValueError):
    """Model args this FLOPs model does not describe."""


# ----------------------------------------------------------------- model shape


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs and parameter counts depend on, read from model args."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    ffn_hidden: int
    """SwiGLU hidden size of the dense FFN (layers without MoE)."""
    tied_head: bool = False
    qk_norm: bool = False
    moe_layers: int = 0
    num_experts: int = 0
    top_k: int = 0
    shared_experts: int = 0
    moe_hidden: int = 0
    """Hidden size of one routed expert (shared experts: ``shared_experts`` times it)."""
    router_bias: bool = False
    combine_bmm: bool = False
    """MoE outputs are weighted by the scores with a bmm after the experts."""

    @property
    def dense_layers(self) -> int:
        return self.n_layers - self.moe_layers


def model_shape(args: Any) -> ModelShape:
    """Read a torchtitan Llama-3 / Qwen3 style args object (dense or MoE, tied
    or not) with ``getattr``, so subclasses and forks with the same fields work.

    Raises :class:`UnsupportedModel` for families with other attention
    (latent, chunked or sliding-window) or a missing field.
    """
    for name, what in _UNSUPPORTED_FIELDS.items():
        if hasattr(args, name):
            raise UnsupportedModel(f"{type(args).__name__} has {name!r}: {what} is not modelled")
    try:
        dim, n_layers, n_heads = int(args.dim), int(args.n_layers), int(args.n_heads)
        vocab = int(args.vocab_size)
    except AttributeError as exc:
        raise UnsupportedModel(f"{type(args).__name__} lacks {exc.name!r}") from None
    n_kv = int(getattr(args, "n_kv_heads", None) or n_heads)
    head_dim = int(getattr(args, "head_dim", None) or dim // n_heads)
    if getattr(args, "hidden_dim", None):
        ffn = int(args.hidden_dim)
    else:
        ffn = llama_ffn_dim(dim, int(getattr(args, "multiple_of", 256)),
                               getattr(args, "ffn_dim_multiplier", None))
    tied = any(bool(getattr(args, name, False)) for name in _TIED_FIELDS)
    shape = dict(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
        vocab_size=vocab, ffn_hidden=ffn, tied_head=tied, qk_norm=bool(getattr(args, "qk_norm", False)),
    )
    if getattr(args, "moe_enabled", False):
        moe = args.moe_args
        shape.update(
            moe_layers=n_layers,
            num_experts=int(moe.num_experts),
            top_k=int(moe.top_k),
            shared_experts=int(getattr(moe, "num_shared_experts", 0) or 0),
            moe_hidden=int(args.moe_inter_dim),
            router_bias=bool(getattr(moe, "gate_bias", False)),
            combine_bmm=not bool(getattr(moe, "score_before_experts", True)),
        )
    return ModelShape(**shape)


# ------------------------------------------------------------------ parameters


@dataclass(frozen=True)
class ParamCounts:
    total: int
    """Distinct parameters (a tied head is the embedding, counted once)."""
    active: int
    """Parameters a token uses: total minus the routed experts it is not sent to."""
    embedding: int
    """The token embedding (which is also the head when tied)."""


def _attention_weights(s: ModelShape) -> int:
    q_and_o = 2 * s.dim * s.n_heads * s.head_dim
    return q_and_o + 2 * s.dim * s.n_kv_heads * s.head_dim


def _expert_weights(s: ModelShape) -> int:
    return 3 * s.dim * s.moe_hidden


def param_counts(s: ModelShape) -> ParamCounts:
    """Parameter counts as ``model.parameters()`` would give them (norm weights included)."""
    embedding = s.vocab_size * s.dim
    norms = 2 * s.dim + (2 * s.head_dim if s.qk_norm else 0)
    moe = (
        s.dim * s.num_experts + (s.num_experts if s.router_bias else 0)
        + (s.num_experts + s.shared_experts) * _expert_weights(s)
    )
    layers = (
        s.n_layers * (_attention_weights(s) + norms)
        + s.dense_layers * 3 * s.dim * s.ffn_hidden
        + s.moe_layers * moe
    )
    total = embedding + layers + s.dim + (0 if s.tied_head else embedding)
    inactive = s.moe_layers * (s.num_experts - s.top_k) * _expert_weights(s)
    return ParamCounts(total=total, active=total - inactive, embedding=embedding)


# ----------------------------------------------------------------------- FLOPs


def causal_pairs(n: int) -> int:
    """(query, key) pairs of one causal segment of ``n`` tokens: n (n + 1) / 2."""
    return n * (n + 1) // 2


@dataclass(frozen=True)
class Recompute:
    """What ``[activation_checkpoint]`` recomputes in the backward."""

    mode: str = "none"
    option: str = "2"
    """``selective_ac_option``: every N-th block ("N"), or per op ("op")."""
    force_recompute_router: bool = True
    """``per_op_sac_force_recompute_mm_shapes_by_fqns`` names ``moe.router.gate``."""

    @classmethod
    def from_config(cls, ac: Any) -> "Recompute":
        if ac is None:
            return cls()
        forced = getattr(ac, "per_op_sac_force_recompute_mm_shapes_by_fqns", ["moe.router.gate"])
        return cls(
            mode=str(getattr(ac, "mode", "none")),
            option=str(getattr(ac, "selective_ac_option", "2")),
            force_recompute_router=any("router.gate" in f for f in forced),
        )

    def describe(self) -> str:
        if self.mode == "selective":
            return "per-op selective AC" if self.option == "op" else f"selective AC (every {self.option} blocks)"
        names = {"none": "no AC", "full": "full AC", "memory_budget": "memory-budget AC"}
        return names.get(self.mode, self.mode)


@dataclass(frozen=True)
class FlopsModel:
    """Training FLOPs of a model, from its :class:`ModelShape`.

    ``tokens`` and ``pairs`` are the non-padding tokens of a batch and the
    (query, key) pairs their queries attend to; all FLOPs are forward +
    backward (backward = 2 x forward for every product) unless named forward.
    """

    shape: ModelShape

    @classmethod
    def from_args(cls, args: Any) -> "FlopsModel":
        return cls(model_shape(args))

    @property
    def params(self) -> ParamCounts:
        return param_counts(self.shape)

    def _block_weights(self, moe: bool) -> int:
        """Matmul weights per token of one transformer block."""
        s = self.shape
        if not moe:
            return _attention_weights(s) + 3 * s.dim * s.ffn_hidden
        return (
            _attention_weights(s) + s.dim * s.num_experts
            + (s.top_k + s.shared_experts) * _expert_weights(s)
            + (s.top_k * s.dim if s.combine_bmm else 0)
        )

    def _layer_kinds(self) -> list[tuple[bool, int]]:
        return [(False, self.shape.dense_layers), (True, self.shape.moe_layers)]

    def matmul_weights_per_token(self) -> int:
        """``M``: weights a token passes through in matmuls (forward FLOPs = 2 M)."""
        s = self.shape
        blocks = sum(self._block_weights(moe) * n for moe, n in self._layer_kinds())
        return blocks + s.vocab_size * s.dim

    def attention_flops_per_pair(self) -> int:
        """Training FLOPs per attended (query, key) pair, all layers: 12 L H d_head."""
        s = self.shape
        return 12 * s.n_layers * s.n_heads * s.head_dim

    def model_flops(self, tokens: float, pairs: float) -> float:
        """Forward + backward FLOPs of ``tokens`` tokens attending ``pairs`` pairs (exact count)."""
        return 6 * self.matmul_weights_per_token() * tokens + self.attention_flops_per_pair() * pairs

    def attention_flops(self, pairs: float) -> float:
        return self.attention_flops_per_pair() * pairs

    def causal_flops_per_token(self, seq_len: int) -> float:
        """Exact model FLOPs per token of full causal rows of ``seq_len`` tokens."""
        return self.model_flops(seq_len, causal_pairs(seq_len)) / seq_len

    def palm_params(self) -> int:
        """``N`` of the PaLM convention as torchtitan 0.2.2 counts it
        (``get_dense_model_nparams_and_flops`` / ``get_moe_model_nparams_and_flops``):
        the parameters a token uses (norms and, untied, the LM head included; the
        routed experts it is not sent to left out), less the embedding. A tied head
        *is* the embedding, so torchtitan leaves it out of ``N``."""
        p = self.params
        return p.active - p.embedding

    def palm_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token in the PaLM / torchtitan convention:
        ``6 N + 12 L H d_head S`` with ``S = seq_len`` (every token attends to all
        ``S`` positions: no causal halving, no document mask, no window). Equal to
        torchtitan's own ``get_nparams_and_flops`` per-token figure."""
        return 6 * self.palm_params() + self.attention_flops_per_pair() * seq_len

    def _block_forward(self, moe: bool, tokens: float, pairs: float) -> float:
        s = self.shape
        return 2 * self._block_weights(moe) * tokens + 4 * s.n_heads * s.head_dim * pairs

    def _op_sac_block(self, moe: bool, recompute: Recompute) -> int:
        """Matmul weights per token that per-op SAC recomputes in one block.

        torchtitan's policy (``_apply_op_sac``) saves every op on its save list
        (``aten.mm`` and the attention kernels) except every second ``aten.mm``
        counted in forward order, and recomputes everything else; an mm whose
        weight shape is forced (the router gate by default) is recomputed and
        not counted. Routed experts run as ``_grouped_mm`` and the combine as a
        ``bmm``, which are not on the list, so they are recomputed.
        """
        s = self.shape
        qo, kv = s.dim * s.n_heads * s.head_dim, s.dim * s.n_kv_heads * s.head_dim
        counted = [qo, kv, kv, qo]
        always = 0
        if moe:
            if recompute.force_recompute_router:
                always += s.dim * s.num_experts
            else:
                counted.append(s.dim * s.num_experts)
            always += s.top_k * _expert_weights(s) + (s.top_k * s.dim if s.combine_bmm else 0)
            if s.shared_experts:
                counted += [s.dim * s.moe_hidden * s.shared_experts] * 3
        else:
            counted += [s.dim * s.ffn_hidden] * 3
        return always + sum(counted[1::2])

    def recompute_flops(self, tokens: float, pairs: float, recompute: Recompute) -> float | None:
        """FLOPs that activation checkpointing re-executes in the backward.

        ``full``: the forward of every transformer block (matmuls and
        attention; embedding and head are outside the blocks). ``selective``
        with N: the forward of the blocks torchtitan wraps, every N-th (all
        when N is 0). ``selective`` ``op``: see :meth:`_op_sac_block`
        (attention kernels are saved, so no pair FLOPs). ``none``: 0.
        ``memory_budget`` (the compiler decides): None, unknown.
        """
        s = self.shape
        if recompute.mode == "none":
            return 0.0
        if recompute.mode == "full":
            return sum(self._block_forward(moe, tokens, pairs) * n for moe, n in self._layer_kinds())
        if recompute.mode != "selective":
            return None
        if recompute.option == "op":
            return sum(2 * self._op_sac_block(moe, recompute) * tokens * n for moe, n in self._layer_kinds())
        if not recompute.option.isdigit():
            return None
        every = int(recompute.option)
        wrapped = s.n_layers if every == 0 else s.n_layers // every
        blocks = sum(self._block_forward(moe, tokens, pairs) * n for moe, n in self._layer_kinds())
        return blocks / s.n_layers * wrapped

# ------------------------------------------------------------------------ peak

PEAK_TFLOPS_BF16: dict[str, float] = {
    "A100": 312.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H200": 989.0,
    "H200 NVL": 835.0,
    "B200": 2250.0,
    "MI300X": 1307.0,
    "MI325X": 1307.0,
    "MI355X": 2500.0,
}
"""Dense (no sparsity) bf16 tensor TFLOP/s of one device, from the vendors' data sheets."""

NO_FP8 = frozenset({"A100"})
"""Devices without fp8 tensor cores; every other device runs fp8 at twice its bf16 rate."""

_H100_PCIE_SMS = 114  # H100 SXM and NVL have 132 SMs

_PATTERNS = [  # (regex on the upper-cased device name, kind); first match wins
    (r"(?<![A-Z0-9])A100(?![0-9])", "A100"),
    (r"(?<![A-Z0-9])H100(?![0-9]).*NVL", "H100 NVL"),
    (r"(?<![A-Z0-9])H100(?![0-9]).*PCIE", "H100 PCIe"),
    (r"(?<![A-Z0-9])H100(?![0-9])", "H100 SXM"),
    (r"(?<![A-Z0-9])H200(?![0-9]).*NVL", "H200 NVL"),
    (r"H200(?![0-9])", "H200"),  # GH200's GPU runs at the H200 rate
    (r"(?<![A-Z0-9])B200(?![0-9])", "B200"),  # not GB200 (another rate): unknown
    (r"MI300X", "MI300X"),
    (r"MI325X", "MI325X"),
    (r"MI355X", "MI355X"),
]


def device_kind(name: str, sm_count: int | None = None) -> str | None:
    """Our table's key for a device name (``torch.cuda.get_device_name()``), or None."""
    upper = name.upper()
    for pattern, kind in _PATTERNS:
        if re.search(pattern, upper):
            if kind == "H100 SXM" and sm_count == _H100_PCIE_SMS:
                return "H100 PCIe"
            return kind
    return None


def table_peak_tflops(kind: str | None, fp8: bool) -> float | None:
    """Dense peak TFLOP/s of a device kind (fp8 where it has fp8 tensor cores)."""
    if kind is None:
        return None
    bf16 = PEAK_TFLOPS_BF16[kind]
    return 2 * bf16 if fp8 and kind not in NO_FP8 else bf16


def fp8_converters_on(converters: Iterable[str]) -> bool:
    """Whether ``[model] converters`` make the linear layers run in fp8 (float8 or MX)."""
    return any(c.split(".")[-1] in ("float8", "mx") for c in converters)


@dataclass(frozen=True)
class Peak:
    device: str
    tflops: float | None
    """Dense peak of one device in TFLOP/s; None when unknown (MFU is n/a)."""
    dtype: str
    source: str
    """"table" (detected), "config" (``[metrics] peak_tflops``) or "unknown"."""

    def describe(self) -> str:
        if self.tflops is None:
            return f"peak unknown for {self.device!r}"
        how = "from [metrics] peak_tflops" if self.source == "config" else self.dtype
        return f"peak {self.tflops:g} TFLOP/s ({how}, {self.device})"


def current_device() -> tuple[str, int | None]:
    """Name and SM/CU count of the current CUDA/ROCm device, or ("cpu", None)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return torch.cuda.get_device_name(index), getattr(props, "multi_processor_count", None)


def resolve_peak(configured_tflops: float = 0.0, fp8: bool = False,
                 device: tuple[str, int | None] | None = None) -> Peak:
    """The peak to divide by: ``configured_tflops`` when > 0, else the table's."""
    if configured_tflops < 0 or math.isnan(configured_tflops):
        raise ConfigError(
            f"[metrics] peak_tflops = {configured_tflops}: must be >= 0 (0 detects the device)"
        )
    name, sms = device if device is not None else current_device()
    dtype = "fp8" if fp8 else "bf16"
    if configured_tflops > 0:
        return Peak(name, float(configured_tflops), dtype, "config")
    tflops = table_peak_tflops(device_kind(name, sms), fp8)
    return Peak(name, tflops, dtype, "table" if tflops is not None else "unknown")


def install_peak_lookup(peak: Peak) -> None:
    """Make torchtitan's ``get_peak_flops`` return ``peak`` (NaN when unknown).

    torchtitan 0.2.2 runs ``lspci`` there (a warning on every host without
    it) and falls back to the A100 for devices it does not know; the trainer
    logs that value as the peak used for MFU. With this it logs ours.
    """
    import torchtitan.tools.utils as tt_utils

    flops = peak.tflops * 1e12 if peak.tflops is not None else float("nan")
    tt_utils.get_peak_flops = lambda device_name=None: flops


# ---------------------------------------------------------- per-log accounting


class FlopsMeter:
    """Turns the loader's per-window counts into throughput, FLOP/s and MFU.

    One per metrics processor. :meth:`window` takes the tokens torchtitan
    counted since the last log, the loader's statistics of the same batches
    (an :class:`ext.data.stats.BatchStats`, summed; ``None`` with torchtitan's
    own loader: every token is then real and trained and every row one causal
    segment of ``seq_len``) and the seconds since the last log, and returns
    per-device metrics. ``masked``
    says whether the model confines attention to segments (then pairs within
    segments count, else plain causal pairs over the row).

    Two model-FLOPs figures, each named: ``exact`` (matmuls plus the pairs
    really attended) and ``palm`` (``6 N + 12 L H d_head S`` per token, the
    PaLM / torchtitan convention that published MFU uses), both over the
    non-padding tokens; ``mfu_exact`` and ``mfu_palm`` divide them by the peak.
    """

    def __init__(self, model: FlopsModel, peak: Peak, recompute: Recompute, masked: bool,
                 seq_len: int, devices_per_batch: int = 1):
        self.model = model
        self.peak = peak
        self.recompute = recompute
        self.masked = masked
        self.seq_len = seq_len
        self.devices_per_batch = max(devices_per_batch, 1)
        self.palm_per_token = model.palm_flops_per_token(seq_len)
        self.timed = {"real": 0.0, "trained": 0.0, "exact": 0.0, "palm": 0.0, "hardware": 0.0,
                      "hardware_known": True}
        self.last: dict[str, float] = {}

    def describe(self) -> str:
        seq = self.seq_len
        attention = "within segments" if self.masked else "causal"
        peak = self.peak.describe() if self.peak.tflops is not None else "MFU n/a"
        return (
            f"model FLOPs per token of a full causal row of {seq}: exact "
            f"{self.model.causal_flops_per_token(seq):.4g} (counted per batch: non-padding tokens, "
            f"pairs {attention}), palm {self.palm_per_token:.4g} (6N + 12 L H d S, the published-MFU "
            f"convention); hardware FLOPs with {self.recompute.describe()}; {peak}"
        )

    def counts(self, ntokens: int, stats: BatchStats | None) -> tuple[float, float, float]:
        """(non-padding tokens, trained tokens, attended pairs) of the window."""
        if stats is None:
            rows = ntokens / self.seq_len
            return float(ntokens), float(ntokens), rows * causal_pairs(self.seq_len)
        pairs = stats.attn_pairs if self.masked else stats.attn_pairs_causal
        return float(stats.real_tokens), float(stats.trained_tokens), float(pairs)

    def window(self, ntokens: int, stats: BatchStats | None, seconds: float) -> dict[str, float]:
        real, trained, pairs = self.counts(ntokens, stats)
        exact = self.model.model_flops(real, pairs)
        palm = self.palm_per_token * real
        recompute = self.model.recompute_flops(real, pairs, self.recompute)
        device_seconds = max(seconds, 1e-12) * self.devices_per_batch
        metrics = {
            "flops/tps": ntokens / device_seconds,
            "flops/tps_real": real / device_seconds,
            "flops/tps_trained": trained / device_seconds,
            "flops/trained_fraction": trained / max(ntokens, 1),
            "flops/model_flops_exact": exact,
            "flops/model_flops_palm": palm,
            "flops/attention_fraction": self.model.attention_flops(pairs) / exact if exact else 0.0,
            "flops/model_tflops_exact": exact / device_seconds / 1e12,
            "flops/model_tflops_palm": palm / device_seconds / 1e12,
        }
        if recompute is not None:
            metrics["flops/hardware_tflops"] = (exact + recompute) / device_seconds / 1e12
        if self.peak.tflops is not None:
            metrics["flops/mfu_palm(%)"] = 100 * metrics["flops/model_tflops_palm"] / self.peak.tflops
            metrics["flops/mfu_exact(%)"] = 100 * metrics["flops/model_tflops_exact"] / self.peak.tflops
            if recompute is not None:
                metrics["flops/hfu(%)"] = 100 * metrics["flops/hardware_tflops"] / self.peak.tflops
        self.last = {"real": real, "trained": trained, "exact": exact, "palm": palm,
                     "hardware": exact + recompute if recompute is not None else math.nan}
        return metrics

    def flops_per_token(self, ntokens: int) -> float:
        """PaLM-convention FLOPs of the last window per token torchtitan counted
        (padding included), so that torchtitan's own ``tflops`` and ``mfu``
        columns show ``mfu_palm`` (torchtitan's convention, without padding)."""
        return max(self.last.get("palm", 0.0) / max(ntokens, 1), 1e-9)

    def add_last_to_timed(self) -> None:
        for key in ("real", "trained", "exact", "palm"):
            self.timed[key] += self.last.get(key, 0.0)
        hardware = self.last.get("hardware", math.nan)
        if math.isnan(hardware):
            self.timed["hardware_known"] = False
        else:
            self.timed["hardware"] += hardware

    def summary(self, seconds: float) -> dict[str, Any]:
        """Per-device rates over the timed span (for ``train_summary.json``)."""
        if seconds <= 0:
            return {}
        device_seconds = seconds * self.devices_per_batch
        exact = self.timed["exact"] / device_seconds / 1e12
        palm = self.timed["palm"] / device_seconds / 1e12
        hardware = self.timed["hardware"] / device_seconds / 1e12 if self.timed["hardware_known"] else None
        peak = self.peak.tflops
        return {
            "real_tokens_per_second_per_device": self.timed["real"] / device_seconds,
            "trained_tokens_per_second_per_device": self.timed["trained"] / device_seconds,
            "model_tflops_exact_per_device": exact,
            "model_tflops_palm_per_device": palm,
            "hardware_tflops_per_device": hardware,
            "peak_tflops": peak,
            "device": self.peak.device,
            "mfu_palm_pct": 100 * palm / peak if peak else None,
            "mfu_exact_pct": 100 * exact / peak if peak else None,
            "hfu_pct": 100 * hardware / peak if peak and hardware is not None else None,
        }

    def line(self, metrics: dict[str, float]) -> str:
        """The console line of one log step."""
        def pct(key: str) -> str:
            v = metrics.get(key)
            return f"{v:.2f}%" if v is not None else "n/a"

        hw = metrics.get("flops/hardware_tflops")
        hfu = metrics.get("flops/hfu(%)")
        return (
            f"flops: tps {metrics['flops/tps']:,.0f} all, {metrics['flops/tps_real']:,.0f} non-pad, "
            f"{metrics['flops/tps_trained']:,.0f} trained  "
            f"model TFLOP/s palm {metrics['flops/model_tflops_palm']:.3g} exact "
            f"{metrics['flops/model_tflops_exact']:.3g} (attention "
            f"{100 * metrics['flops/attention_fraction']:.1f}%)  "
            f"hw {f'{hw:.3g} TFLOP/s' if hw is not None else 'n/a'}  "
            f"mfu_palm {pct('flops/mfu_palm(%)')}  mfu_exact {pct('flops/mfu_exact(%)')}"
            + (f"  hfu {hfu:.2f}%" if hfu is not None else "")
        )


def peak_from_config(job_config: Any) -> Peak:
    """The run's peak: ``[metrics] peak_tflops``, else this device's from the table
    (fp8 when ``[model] converters`` quantize linears to float8 or MX)."""
    metrics = getattr(job_config, "metrics", None)
    return resolve_peak(
        float(getattr(metrics, "peak_tflops", 0.0) or 0.0),
        fp8_converters_on(getattr(job_config.model, "converters", None) or []),
    )


def build_meter(job_config: Any, model_args: Any, peak: Peak, devices_per_batch: int = 1) -> FlopsMeter:
    """The meter of a training run; raises :class:`UnsupportedModel` for other model families."""
    from ext.data.skyladder import masking_requested

    return FlopsMeter(
        FlopsModel.from_args(model_args), peak,
        Recompute.from_config(getattr(job_config, "activation_checkpoint", None)),
        masked=masking_requested(job_config), seq_len=job_config.training.seq_len,
        devices_per_batch=devices_per_batch,
    )


# ------------------------------------------------------------------- reports


def web_like_lengths(n_docs: int, seed: int = 0, median: float = 400.0,
                     long_share: float = 0.05, long_at: int = 2048) -> np.ndarray:
    """Lognormal document lengths with the given median and a ``long_share`` of
    documents longer than ``long_at`` tokens (the packing benchmark's web-like mix)."""
    sigma = math.log(long_at / median) / statistics.NormalDist().inv_cdf(1.0 - long_share)
    rng = np.random.default_rng(seed)
    return np.maximum(1, np.rint(rng.lognormal(math.log(median), sigma, n_docs))).astype(np.int64)


def packed_counts(lengths: np.ndarray, seq_len: int, method: str = "bfd") -> tuple[AttentionCounts, int]:
    """Pack documents of ``lengths`` into rows of ``seq_len + 1`` with our packer
    and count them as the loader does; returns (counts, rows)."""
    from ext.data.packing import pack_documents, rows_to_batch

    offsets = np.concatenate(([0], np.cumsum(lengths)))
    tokens = np.ones(int(offsets[-1]), dtype=np.int32)
    packed = pack_documents(tokens, offsets, seq_len + 1, 0, method)
    batch = rows_to_batch(packed, False)
    return attention_counts(batch["segment_ids"], batch["labels"], real_inputs(packed.n_valid, seq_len)), \
        packed.n_rows


def real_inputs(n_valid: Any, seq_len: int) -> np.ndarray:
    """bool ``[rows, seq_len]``: the model inputs that are not padding, for rows of
    ``seq_len + 1`` packed tokens of which the first ``n_valid`` are real."""
    return np.arange(seq_len) < np.asarray(n_valid).reshape(-1, 1)


def _meta_model(model_cls: type, model_args: Any) -> Any:
    import torch

    with torch.device("meta"):
        return model_cls(model_args)


def torchtitan_estimate(
    model_cls: type, model_args: Any, seq_len: int, model: Any = None
) -> tuple[int, float]:
    """torchtitan's own (params, FLOPs per token), from a model built on the meta
    device: the ``get_nparams_and_flops`` of the first torchtitan class among the
    args' bases (our specs' subclasses may correct it)."""
    own = next((c for c in type(model_args).__mro__
                if c.__module__.startswith("torchtitan.") and "get_nparams_and_flops" in vars(c)), None)
    method = own.get_nparams_and_flops if own is not None else type(model_args).get_nparams_and_flops
    model = model if model is not None else _meta_model(model_cls, model_args)
    params, flops = method(model_args, model, seq_len)
    return int(params), float(flops)


def model_param_count(model_cls: type, model_args: Any) -> int:
    """Distinct parameters of the model built on the meta device."""
    return sum(p.numel() for p in _meta_model(model_cls, model_args).parameters())


def _data_counts(job_config: Any, rows: int) -> tuple[AttentionCounts, int, int]:
    """Count ``rows`` rows of the config's own ``[data]`` loader (one process, no
    workers, SkyLadder off); returns (counts, rows, row tokens)."""
    from torchtitan.components.tokenizer import build_hf_tokenizer

    from ext.data.loader import build_packed_dataloader

    job_config.data.num_workers = "0"
    job_config.skyladder.enable = False
    loader = build_packed_dataloader(
        dp_world_size=1, dp_rank=0, tokenizer=build_hf_tokenizer(job_config), job_config=job_config
    )
    batches = max(1, math.ceil(rows / job_config.training.local_batch_size))
    n_tokens = 0
    total = BatchStats()  # the statistics of this loader's batches, as the loader hands them out
    for _, (_, labels, stats) in zip(range(batches), loader.batches_with_stats()):
        n_tokens += labels.numel()
        total += stats
    return total.attention_counts, total.rows, n_tokens


def _missing_data(job_config: Any) -> str | None:
    """Why the config's own ``[data]`` rows cannot be read here (a tokenizer or a
    local source that is not on this machine), or None."""
    import os

    from ext.data.config import looks_like_hub_id

    assets = job_config.model.hf_assets_path
    if not any(os.path.isfile(os.path.join(assets, f)) for f in ("tokenizer.json", "vocab.json", "vocab.txt")):
        return f"[model] hf_assets_path {assets!r} has no tokenizer (tokenizer.json, vocab.json or vocab.txt)"
    for i, location in enumerate(job_config.data.datasets):
        if not os.path.exists(location) and not looks_like_hub_id(location):
            return f"[data] datasets[{i}] {location!r} does not exist"
    return None


def flops_report(job_config: Any, packed: str = "auto", docs: int = 10000, rows: int = 64) -> dict[str, Any]:
    """What ``python -m ext.cli flops`` prints, for a parsed JobConfig.

    FLOPs per token are per non-padding token (trained or not): exact
    (``flops_per_token_causal`` / ``_packed``) and in the PaLM / torchtitan
    convention (``flops_per_token_palm``, which ``mfu_palm`` uses); the
    ``mfu_palm_over_mfu_exact_*`` ratios say how much higher a run's
    ``mfu_palm`` reads than its ``mfu_exact``.

    ``packed``: where the "typical packed batch" comes from: "data" (``rows``
    rows of the config's ``[data]`` sources, tokenized and packed by our
    loader), "synthetic" (``docs`` web-like documents, :func:`web_like_lengths`,
    packed best-fit into rows of ``seq_len + 1``) or "auto" (data when
    ``[data] datasets`` is set and its tokenizer and local sources are here,
    else synthetic, with ``packed_note`` saying why). Pairs are counted within documents when the
    config masks attention by documents, else causally over each row;
    SkyLadder windows are not applied (they depend on the step).
    """
    import copy

    from torchtitan.protocols.train_spec import get_train_spec

    from ext.data.skyladder import masking_requested

    name, flavor = job_config.model.name, job_config.model.flavor
    try:
        spec = get_train_spec(name)
    except ValueError:
        raise ConfigError(f"[model] name = {name!r} is not a registered train spec") from None
    if flavor not in spec.model_args:
        raise ConfigError(
            f"[model] flavor = {flavor!r} is not a flavor of {name}: use one of {sorted(spec.model_args)}"
        )
    args = copy.deepcopy(spec.model_args[flavor])
    args.update_from_config(job_config)
    try:
        model = FlopsModel.from_args(args)
    except UnsupportedModel as exc:
        raise ConfigError(f"[model] {name} {flavor}: {exc}") from None
    seq = job_config.training.seq_len
    params = model.params
    meta = _meta_model(spec.model_cls, args)
    built = sum(p.numel() for p in meta.parameters())
    tt_params, tt_flops = torchtitan_estimate(spec.model_cls, args, seq, meta)
    masked = masking_requested(job_config)
    note = None
    if packed == "auto":
        packed = "data" if job_config.data.datasets else "synthetic"
        missing = _missing_data(job_config) if packed == "data" else None
        if missing:
            packed = "synthetic"
            note = f"{missing}: the packed batch is {docs} synthetic web-like documents instead"
    if packed == "data":
        if not job_config.data.datasets:
            raise ConfigError("--packed data needs [data] datasets in the config; use --packed synthetic")
        missing = _missing_data(job_config)
        if missing:
            raise ConfigError(f"--packed data: {missing}; provide it or use --packed synthetic")
        counts, n_rows, row_tokens = _data_counts(job_config, rows)
    elif packed == "synthetic":
        counts, n_rows = packed_counts(web_like_lengths(docs), seq)
        row_tokens = n_rows * seq
    else:
        raise ConfigError(f"--packed {packed!r}: use auto, data or synthetic")
    pairs = counts.pairs if masked else counts.pairs_causal
    packed_flops = model.model_flops(counts.real_tokens, pairs)
    causal = model.causal_flops_per_token(seq)
    palm = model.palm_flops_per_token(seq)
    return {
        "params_total": params.total,
        "params_active": params.active,
        "params_embedding": params.embedding,
        "flops_per_token_causal": causal,
        "flops_per_token_packed": packed_flops / max(counts.real_tokens, 1),
        "flops_per_token_palm": palm,
        # a run's mfu_palm / mfu_exact (both count the same non-padding tokens)
        "mfu_palm_over_mfu_exact_causal": palm / causal,
        "mfu_palm_over_mfu_exact_packed": palm * counts.real_tokens / packed_flops if packed_flops else None,
        "model": f"{name} {flavor}",
        "seq_len": seq,
        "params_of_built_model": built,
        "packed_source": packed,
        "packed_note": note,
        "packed_attention": "documents" if masked else "causal",
        "packed_rows": n_rows,
        "packed_real_fraction": counts.real_tokens / max(row_tokens, 1),
        "packed_trained_fraction": counts.trained_tokens / max(row_tokens, 1),
        "packed_pairs_per_token": pairs / max(counts.real_tokens, 1),
        "torchtitan_params": tt_params,
        "torchtitan_flops_per_token": tt_flops,
        "torchtitan_overcount_causal": tt_flops / causal - 1,
        "torchtitan_overcount_packed": tt_flops * row_tokens / packed_flops - 1 if packed_flops else None,
    }


def peak_setting(cfg: Any, launch: Any) -> Iterable[str]:
    """A bad ``[metrics] peak_tflops``, reported by ``python -m ext.cli check`` before training."""
    value = float(getattr(getattr(cfg, "metrics", None), "peak_tflops", 0.0) or 0.0)
    if value < 0 or math.isnan(value):
        yield f"[metrics] peak_tflops = {value}: must be >= 0 (0 detects the device)"
