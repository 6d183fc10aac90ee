"""Render per-token segment ids into each attention backend's mask.

Segment ids (int, ``[batch, seq]``) are the one currency between the loader
and the model: documents, SFT samples and SkyLadder fragments are all
segments, and a segment is a contiguous run of equal ids within a row. A
query may attend to a key iff both lie in the same segment and the key is
not after the query. Three renderings of that rule:

- :func:`dense_mask`: a boolean ``[batch, 1, seq, seq]`` for SDPA. Runs
  everywhere (the CPU path) and is the reference the others are tested
  against.
- :func:`segment_mask_mod` / :func:`flex_block_mask`: a FlexAttention
  ``mask_mod`` and its ``BlockMask`` (GPU kernels; fully masked blocks are
  skipped, so document masking costs less than plain causal).
- :func:`varlen_metadata`: cumulative sequence lengths over the flattened
  batch for varlen (flash) attention; every segment is its own sequence.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def dense_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """bool ``[B, 1, S, S]``: True where query ``q`` may attend to key ``k``."""
    same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)
    seq = segment_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril_()
    return (same & causal).unsqueeze(1)


def segment_mask_mod(segment_ids: torch.Tensor):
    """FlexAttention mask_mod allowing exactly the pairs :func:`dense_mask` allows."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (segment_ids[b, q_idx] == segment_ids[b, kv_idx])

    return mask_mod


def flex_block_mask(segment_ids: torch.Tensor, block_size: int = 128):
    """The FlexAttention ``BlockMask`` of ``segment_ids`` (built on their device)."""
    from torchtitan.models.attention import create_attention_mask

    batch, seq = segment_ids.shape
    return create_attention_mask(
        segment_mask_mod(segment_ids), batch, None, seq, seq,
        device=segment_ids.device, BLOCK_SIZE=block_size,
    )


class VarlenSegments(NamedTuple):
    """Inputs of varlen attention for a batch flattened to ``[B * S]`` tokens."""

    cu_seqlens: torch.Tensor  # int32 [n_segments + 1]: start of each segment, then B * S
    max_seqlen: int


def varlen_metadata(segment_ids: torch.Tensor) -> VarlenSegments:
    """Segment starts over the flattened batch (a new row always starts one)."""
    batch, seq = segment_ids.shape
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    flat_starts = torch.nonzero(starts.flatten(), as_tuple=True)[0].to(torch.int32)
    total = torch.tensor([batch * seq], dtype=torch.int32, device=segment_ids.device)
    cu = torch.cat((flat_starts, total))
    return VarlenSegments(cu, int((cu[1:] - cu[:-1]).max().item()))


def varlen_allowed_pairs(meta: VarlenSegments, batch: int, seq: int) -> torch.Tensor:
    """bool ``[B, 1, S, S]`` of the (query, key) pairs varlen attention computes:
    causal within each ``cu_seqlens`` run. For tests against :func:`dense_mask`."""
    lengths = (meta.cu_seqlens[1:] - meta.cu_seqlens[:-1]).long()
    run = torch.repeat_interleave(torch.arange(len(lengths)), lengths).view(batch, seq)
    same = run.unsqueeze(2) == run.unsqueeze(1)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril_()
    return (same & causal).unsqueeze(1)
