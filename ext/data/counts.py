"""Tokens and attended (query, key) pairs of packed rows.

These are facts of the rows and their segments, which the data path knows:
non-padding tokens, trained tokens, and how many keys the non-padding
queries attend within their segments or under plain causal attention. The
loader counts them per buffer (one vectorized call) and sends them with
each batch; :mod:`ext.training.flops` turns them into FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

IGNORE_INDEX = -100


@dataclass(frozen=True)
class AttentionCounts:
    real_tokens: int
    """Non-padding tokens: they run through the model forward and backward."""
    trained_tokens: int
    """Non-padding tokens whose label is not -100."""
    pairs: int
    """Keys attended by the non-padding queries when attention is confined to segments."""
    pairs_causal: int
    """Keys attended by the non-padding queries under plain causal attention over the row."""


def attention_counts(segment_ids: Any, labels: Any, valid: Any = None) -> AttentionCounts:
    """Tokens and attended pairs of rows (``[S]`` or ``[B, S]`` arrays or tensors).

    ``valid`` (bool, same shape; None: every token) marks the tokens that are
    not padding. A segment is a run of equal ids within a row; a query
    attends to the keys of its own segment up to itself, so a query at offset
    ``j`` of its segment attends ``j + 1`` keys (``j + 1`` = its row position
    + 1 under plain causal attention). Every non-padding query counts, trained
    or not (an SFT prompt is computed like the answer), so a segment of ``n``
    real tokens contributes ``n (n + 1) / 2`` pairs and padding contributes
    none. ``labels`` (-100 = not trained) only give ``trained_tokens``.
    """
    rows = attention_counts_per_row(segment_ids, labels, valid)
    return AttentionCounts(*(int(column.sum()) for column in rows.T))


def attention_counts_per_row(segment_ids: Any, labels: Any, valid: Any = None) -> np.ndarray:
    """:func:`attention_counts` of each row: int64 ``[rows, 4]`` with columns
    real_tokens, trained_tokens, pairs, pairs_causal (one call for a whole
    buffer costs about what one row costs)."""
    seg = np.asarray(segment_ids)
    lab = np.asarray(labels)
    real = np.ones(seg.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if seg.shape != lab.shape or seg.shape != real.shape:
        raise ValueError(
            f"segment_ids {seg.shape}, labels {lab.shape} and valid {real.shape} differ in shape"
        )
    n = seg.shape[-1] if seg.ndim else 0
    if seg.size == 0:
        return np.zeros((0 if seg.ndim > 1 else 1, 4), dtype=np.int64)
    seg = seg.reshape(-1, n)
    real = real.reshape(seg.shape)
    trained = (lab.reshape(seg.shape) != IGNORE_INDEX) & real
    position = np.arange(1, n + 1, dtype=np.int64)  # keys under plain causal attention
    causal = (real * position).sum(axis=1)
    # A query at row position p in a segment starting at s attends p + 1 - s keys:
    # subtract s once per real query of each segment.
    new = np.ones(seg.shape, dtype=bool)
    new[:, 1:] = seg[:, 1:] != seg[:, :-1]
    starts = np.flatnonzero(new)
    real_per_segment = np.add.reduceat(real.reshape(-1).astype(np.int64), starts)
    offsets = np.bincount(starts // n, weights=(starts % n) * real_per_segment, minlength=seg.shape[0])
    out = np.empty((seg.shape[0], 4), dtype=np.int64)
    out[:, 0] = real.sum(axis=1)
    out[:, 1] = trained.sum(axis=1)
    out[:, 2] = causal - offsets.astype(np.int64)
    out[:, 3] = causal
    return out
