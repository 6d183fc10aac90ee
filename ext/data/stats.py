"""Loader statistics as explicit, typed state: :class:`BatchStats`.

What the packed loader measured about the rows of one batch (padding,
documents, the realized mixture, bad records skipped, the SkyLadder window
and the counts :mod:`ext.training.flops` turns into FLOPs), as a frozen
dataclass with named fields. Nothing here is process-global: every loader
hands out its own figures, so two loaders in one process (training and a
FLOPs report, two tests) never mix them.

How the figures travel (the design decision; issue 23, "no side channels"):

1. Workers compute every row's figures vectorized, once per packed buffer
   (:func:`ext.data.dataset.row_statistics`, :mod:`ext.data.counts`), into
   one float64 vector per row laid out by :class:`RowStatsLayout`. A row
   carries its vector under :data:`ROW_STATS` from the dataset to the
   collation only: one small tensor per row is what torch's default
   collation stacks in one call (a dataclass or named tuple per row costs
   one collation per field, a few percent of the token-folder loader's
   throughput), and datasets read without our loader keep default
   collation. Only :class:`RowStatsLayout` knows where a figure sits; no
   reader indexes the vector.
2. :class:`PackedDataLoader <ext.data.loader.PackedDataLoader>` collates
   with :class:`StatsCollate`: in the worker, the rows' vectors of a batch
   are summed into one :class:`BatchStats`, and the batch becomes
   ``(inputs, labels, BatchStats)``: a picklable object crosses the worker
   boundary, not a positional tensor.
3. The loader hands the object out next to its batch:
   ``PackedDataLoader.batches_with_stats()`` yields ``(inputs, labels,
   BatchStats)``; its ``__iter__`` (torchtitan's contract, what torchtitan's
   own training loop reads) yields ``(inputs, labels)`` and hands the
   statistics to its ``stats_sink`` when one is set
   (:func:`ext.training.metrics.connect_loader_stats`), else drops them.
4. Our Trainer (:mod:`ext.training.trainer`) passes each batch's
   ``BatchStats`` to the metrics processor (``add_loader_stats``) when that
   batch is trained on (a batch read ahead keeps its figures until then);
   the processor sums them per log window (``+``). The FLOPs report and the
   tests sum the figures of the loader they built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from ext.data.counts import AttentionCounts

ROW_STATS = "row_stats"
"""Sample key of a row's statistics vector (dataset -> collation only; see the module doc)."""

FIGURES = ("row_tokens", "pad_tokens", "docs", "cut_docs", "rows", "window",
           "real_tokens", "trained_tokens", "attn_pairs", "attn_pairs_causal")
"""Per-row figures of the vector, before the per-source columns. The last four are
the columns of :func:`ext.data.counts.attention_counts_per_row` in its order."""

_COLUMN = {name: i for i, name in enumerate(FIGURES)}
_ATTENTION = slice(_COLUMN["real_tokens"], _COLUMN["attn_pairs_causal"] + 1)


@dataclass(frozen=True)
class BatchStats:
    """What the packed loader measured about the rows of one batch, or the sum
    of several batches (``a + b``; ``sum(stats, BatchStats())``).

    Token counts are over the packed rows of ``seq_len + 1`` tokens (the
    model reads the first ``seq_len`` as inputs). The dicts are keyed by
    source name, in ``[data] datasets`` order, and are not to be modified.
    """

    rows: int = 0
    """Rows (samples)."""
    row_tokens: int = 0
    """Tokens of the packed rows, padding included: ``rows x (seq_len + 1)``."""
    pad_tokens: int = 0
    """Padding tokens of the packed rows."""
    docs: float = 0.0
    """Documents; a document cut into k pieces counts 1/k in each row holding a piece,
    so sums over rows are exact."""
    cut_docs: float = 0.0
    """Documents cut into several pieces, counted like ``docs``."""
    window_sum: int = 0
    """Sum over the rows of their attention window (``seq_len`` without SkyLadder):
    the mean window is ``window_sum / rows``."""
    max_window: int = 0
    """Largest attention window of the rows (SkyLadder: the window of the batch)."""
    real_tokens: int = 0
    """Non-padding inputs: they run through the model forward and backward."""
    trained_tokens: int = 0
    """Non-padding inputs whose label is not -100."""
    attn_pairs: int = 0
    """(query, key) pairs the non-padding queries attend within their segments."""
    attn_pairs_causal: int = 0
    """(query, key) pairs the non-padding queries attend under plain causal attention."""
    source_tokens: dict[str, int] = field(default_factory=dict)
    """Non-padding tokens of the packed rows per source."""
    bad_records: dict[str, int] = field(default_factory=dict)
    """Bad records skipped per source while reading these rows' buffers (counted with
    the first row a buffer yields)."""

    @property
    def attention_counts(self) -> AttentionCounts:
        """The four counts :mod:`ext.training.flops` turns into FLOPs."""
        return AttentionCounts(self.real_tokens, self.trained_tokens, self.attn_pairs, self.attn_pairs_causal)

    def __add__(self, other: "BatchStats") -> "BatchStats":
        if not isinstance(other, BatchStats):
            return NotImplemented
        return BatchStats(
            rows=self.rows + other.rows,
            row_tokens=self.row_tokens + other.row_tokens,
            pad_tokens=self.pad_tokens + other.pad_tokens,
            docs=self.docs + other.docs,
            cut_docs=self.cut_docs + other.cut_docs,
            window_sum=self.window_sum + other.window_sum,
            max_window=max(self.max_window, other.max_window),
            real_tokens=self.real_tokens + other.real_tokens,
            trained_tokens=self.trained_tokens + other.trained_tokens,
            attn_pairs=self.attn_pairs + other.attn_pairs,
            attn_pairs_causal=self.attn_pairs_causal + other.attn_pairs_causal,
            source_tokens=_add_counts(self.source_tokens, other.source_tokens),
            bad_records=_add_counts(self.bad_records, other.bad_records),
        )


def _add_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {name: a.get(name, 0) + b.get(name, 0) for name in (*a, *(n for n in b if n not in a))}


@dataclass(frozen=True)
class RowStatsLayout:
    """Where each figure sits in a row's statistics vector (float64): the
    :data:`FIGURES`, then the non-padding tokens of each source, then the
    bad records of each source. The contract between the dataset, which
    writes the vectors, and :meth:`batch_stats`, which reads them."""

    sources: tuple[str, ...]
    """Source names, in ``[data] datasets`` order."""

    @property
    def width(self) -> int:
        return len(FIGURES) + 2 * len(self.sources)

    @staticmethod
    def column(figure: str) -> int:
        """Column of one of the :data:`FIGURES`."""
        return _COLUMN[figure]

    @property
    def attention(self) -> slice:
        """The columns of :func:`ext.data.counts.attention_counts_per_row`."""
        return _ATTENTION

    @property
    def source_tokens(self) -> slice:
        return slice(len(FIGURES), len(FIGURES) + len(self.sources))

    @property
    def bad_records(self) -> slice:
        return slice(len(FIGURES) + len(self.sources), self.width)

    def zeros(self, n_rows: int) -> np.ndarray:
        return np.zeros((n_rows, self.width))

    def batch_stats(self, rows: torch.Tensor) -> BatchStats:
        """The :class:`BatchStats` of a batch: its rows' vectors (``[rows, width]``) summed."""
        if rows.ndim != 2 or rows.shape[1] != self.width:
            raise ValueError(f"row statistics of shape {tuple(rows.shape)}: expected [rows, {self.width}] "
                             f"for the sources {list(self.sources)}")
        total = rows.sum(dim=0).tolist()
        figure = dict(zip(FIGURES, total))
        n = len(self.sources)
        at = len(FIGURES)
        return BatchStats(
            rows=int(figure["rows"]),
            row_tokens=int(figure["row_tokens"]),
            pad_tokens=int(figure["pad_tokens"]),
            docs=figure["docs"],
            cut_docs=figure["cut_docs"],
            window_sum=int(figure["window"]),
            max_window=int(rows[:, _COLUMN["window"]].max()) if len(rows) else 0,
            real_tokens=int(figure["real_tokens"]),
            trained_tokens=int(figure["trained_tokens"]),
            attn_pairs=int(figure["attn_pairs"]),
            attn_pairs_causal=int(figure["attn_pairs_causal"]),
            source_tokens=dict(zip(self.sources, map(int, total[at : at + n]))),
            bad_records=dict(zip(self.sources, map(int, total[at + n : at + 2 * n]))),
        )


@dataclass(frozen=True)
class StatsCollate:
    """``collate_fn`` of the packed loader: torch's default collation of the rows,
    their statistics vectors summed into one :class:`BatchStats` (in the worker).
    Returns ``(inputs, labels, BatchStats)``."""

    layout: RowStatsLayout

    def __call__(self, rows: list[Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor, BatchStats]:
        sample, labels = default_collate(rows)
        return sample, labels, self.layout.batch_stats(sample.pop(ROW_STATS))
