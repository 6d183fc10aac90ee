"""Segment-aware attention for torchtitan transformer models.

The model takes the loader's ``segment_ids`` (never EOS positions) and
renders them for the backend that ``[attention]`` resolves to:

- "flex" and "varlen": the model's ``attn_type`` is set accordingly, so
  torchtitan's trainer calls :meth:`SegmentMasking.get_attention_masks` and
  passes the result to every layer (and every pipeline stage) through
  torchtitan's own Flex/Varlen wrappers. The varlen wrapper is replaced by
  :class:`GQAVarlenAttention`: torchtitan 0.2.2's does not pass
  ``enable_gqa`` and torch's ``varlen_attn`` refuses fewer key/value heads
  than query heads without it, so every grouped-query model (Llama-3,
  Qwen3) would stop at its first varlen attention call.
- "dense": the model's forward builds the batch's boolean mask
  (:func:`ext.model.masks.dense_mask` of its ``segment_ids``, the same as
  :meth:`SegmentMasking.get_attention_masks` returns) and passes it down as
  every layer's ``attention_masks`` argument, as torchtitan passes flex and
  varlen masks. torchtitan's ``Attention`` takes no mask on its SDPA branch
  (it asserts ``attention_masks is None``), so each layer's attention is the
  model's ``dense_attention`` class, torchtitan's ``Attention`` with
  :class:`DenseMaskAttention` mixed in: its forward lends the mask to its
  inner :class:`DenseMaskSDPA` for that one call and runs torchtitan's
  forward. The mask is thus an argument of every block call: activation
  checkpointing saves it with the block's other inputs and recomputes with
  it, autograd keeps what SDPA's backward needs, and once the step's graph is
  freed nothing refers to it (no module holds it between calls). Pipeline
  parallelism needs flex or varlen: segment ids reach only the first stage,
  so later stages would see plain causal attention.
- "none": plain causal SDPA, torchtitan's default path.
"""

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchtitan.models.attention import VarlenAttentionWrapper, VarlenMetadata

from ext.data.skyladder import masking_requested
from ext.model.attention import resolve_backend
from ext.model.masks import dense_mask, flex_block_mask, varlen_metadata

_ATTN_TYPE = {"none": "sdpa", "dense": "sdpa", "flex": "flex", "varlen": "varlen"}


@dataclass
class SegmentArgs:
    """Mixin for model-args dataclasses: which mask backend the model uses."""

    mask_backend: str = "none"

    def resolve_masking(self, job_config: Any) -> None:
        attention = getattr(job_config, "attention", None)
        if attention is None:
            return
        self.mask_backend = resolve_backend(attention, masking_requested(job_config))
        self.attn_type = _ATTN_TYPE[self.mask_backend]
        if self.mask_backend in ("flex", "varlen"):
            self.attn_mask_type = "block_causal"


def with_segment_args(base: type) -> type:
    """``base`` model-args dataclass extended by :class:`SegmentArgs`."""

    @dataclass
    class Args(SegmentArgs, base):
        def update_from_config(self, job_config: Any, **kwargs: Any) -> None:
            self.resolve_masking(job_config)
            super().update_from_config(job_config, **kwargs)

    Args.__name__ = Args.__qualname__ = f"Segment{base.__name__}"
    return Args


def convert_args(args: Any, cls: type) -> Any:
    """A flavor's args as an instance of the extended ``cls``."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(args)})


class DenseMaskSDPA(nn.Module):
    """SDPA with an explicit boolean mask, behind torchtitan's SDPA-wrapper interface.

    ``mask`` is set by its :class:`DenseMaskAttention` only while that layer's
    attention runs (None otherwise, and for a batch without segment ids)."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, q, k, v, *, scale=None, enable_gqa=False, is_causal=True):
        if self.mask is None:  # a batch without segment ids: each row is one document
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=self.mask, scale=scale, enable_gqa=enable_gqa
        )


class DenseMaskAttention:
    """Mixin over torchtitan's (Llama-3 or Qwen3) ``Attention`` with a
    :class:`DenseMaskSDPA` inside: ``attention_masks`` is the batch's boolean
    mask (or None: plain causal). torchtitan's forward projects, rotates and
    calls ``inner_attention`` on its SDPA branch, which takes no mask, so the
    mask is handed to ``inner_attention`` for the duration of this call only.
    A model names its class as ``SegmentMasking.dense_attention``."""

    inner_attention: DenseMaskSDPA

    def forward(self, x, freqs_cis, attention_masks, positions=None):
        inner = self.inner_attention
        inner.mask = attention_masks
        try:
            return super().forward(x, freqs_cis, None, positions)
        finally:
            inner.mask = None


def packed_varlen_attention(attn_fn, xq, xk, xv, meta: VarlenMetadata, scale=None):
    """``attn_fn`` (torch's ``varlen_attn`` signature) over the batch's rows
    packed into one sequence: inputs ``(bs, heads, seq, head_dim)``, output
    ``(bs * seq, n_heads, head_dim)``, causal within each ``cu_seqlens`` span,
    grouped-query when there are fewer key/value heads than query heads."""
    return attn_fn(
        xq.transpose(1, 2).flatten(0, 1),
        xk.transpose(1, 2).flatten(0, 1),
        xv.transpose(1, 2).flatten(0, 1),
        meta.cu_seq_q, meta.cu_seq_k, meta.max_q, meta.max_k,
        scale=scale,
        window_size=(-1, 0),  # causal
        enable_gqa=xq.size(1) != xk.size(1),
    )


class GQAVarlenAttention(VarlenAttentionWrapper):
    """torchtitan's varlen wrapper (its compiled ``varlen_attn``), with grouped-query attention."""

    def forward(self, xq, xk, xv, attention_masks: VarlenMetadata, scale=None):
        attn_fn = VarlenAttentionWrapper._compiled_varlen_attn  # via the class: not a bound method
        return packed_varlen_attention(attn_fn, xq, xk, xv, attention_masks, scale)


class SegmentMasking:
    """Mixin for torchtitan ``Transformer`` classes (``self.layers[i].attention``)."""

    model_args: Any
    layers: nn.ModuleDict
    dense_attention: type
    """torchtitan's ``Attention`` class of the model with :class:`DenseMaskAttention` mixed in."""

    def install_segment_attention(self) -> None:
        for layer in self.layers.values():
            attention = layer.attention
            if self.model_args.mask_backend == "dense":
                if type(attention) not in self.dense_attention.__mro__:
                    raise TypeError(f"{type(attention).__name__} is not a base of {self.dense_attention.__name__}")
                attention.__class__ = self.dense_attention  # a subclass: same weights, new forward
                attention.inner_attention = DenseMaskSDPA()
            elif self.model_args.mask_backend == "varlen":
                attention.inner_attention = GQAVarlenAttention()

    def get_attention_masks(self, input_batch, tokenizer, extra_inputs=None):
        """The backend's mask of the batch's segments (dense: the boolean
        ``[B, 1, S, S]`` mask); without ``segment_ids`` (generation, eval
        harnesses, plain token batches) each row is one document, i.e. plain
        causal attention."""
        segment_ids = (extra_inputs or {}).get("segment_ids")
        if segment_ids is None:
            tokens = input_batch["input"] if isinstance(input_batch, dict) else input_batch
            segment_ids = torch.zeros(tokens.shape, dtype=torch.int32, device=tokens.device)
        if self.model_args.mask_backend == "dense":
            return dense_mask(segment_ids)
        if self.model_args.mask_backend == "flex":
            return flex_block_mask(segment_ids)
        meta = varlen_metadata(segment_ids)
        return VarlenMetadata(meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen)

    def forward(self, tokens, attention_masks=None, positions=None, segment_ids=None):
        """The base model's forward. Dense backend: ``attention_masks`` (the
        boolean mask, passed to every layer) is built here from ``segment_ids``
        when not given; with neither, attention is plain causal."""
        if self.model_args.mask_backend == "dense" and attention_masks is None and segment_ids is not None:
            attention_masks = dense_mask(segment_ids)
        return super().forward(tokens, attention_masks=attention_masks, positions=positions)
