"""The packed multi-source dataset one reader iterates.

Per buffer: the mixture picks ``buffer_docs`` documents from the sources, the
packer turns them into rows of ``seq_len + 1`` tokens, the rows are shuffled
(seeded; best-fit emits them roughly longest-document-first) and yielded one
by one as training samples.

Exact resume without saving token buffers: the state is the sources' and
the mixture's state *at the start of the current buffer* plus the number of
rows of that buffer already yielded. Restoring re-reads and re-packs that
buffer (both deterministic) and skips the rows already trained on. The row
counter is advanced before a row is yielded, because torchdata snapshots a
worker's state when it hands out a batch.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset, get_worker_info

from ext.attention.skyladder import WindowClock, fragment_segments
from ext.data.chat import split_untrained
from ext.data.config import Data, SourceSpec
from ext.data.mixture import Mixture
from ext.data.packing import pack_documents, rows_to_batch
from ext.flops import attention_counts
from ext.data.sources import Plan, Source, plan_source

# Per-row statistics travel with each sample under this key; the loader
# strips them before the batch reaches the model.
STATS_KEY = "loader_stats"
STATS_FIELDS = ("row_tokens", "pad_tokens", "docs", "cut_docs", "rows", "window",
                "real_tokens", "trained_tokens", "attn_pairs", "attn_pairs_causal")
# The last four are filled in when a row is yielded (after SkyLadder cuts it), by
# ext.flops.attention_counts: non-padding inputs, labels != -100, and the keys the
# non-padding queries attend within their segments / under plain causal attention.
# The metrics processor picks the pair count that matches what the model runs.


def row_statistics(packed: Any, doc_source: np.ndarray, n_sources: int) -> np.ndarray:
    """float64 [n_rows, 10 + n_sources]: row tokens, padding, documents, cut
    documents, 1 (rows), the attention window (filled in when the row is
    yielded, as are the four FLOP counts that follow), then real tokens
    per source. A document split into k pieces counts 1/k in each row holding
    a piece, so sums over rows are exact."""
    n_rows, width = packed.tokens.shape
    out = np.zeros((n_rows, len(STATS_FIELDS) + n_sources))
    if n_rows == 0:
        return out
    out[:, 0] = width
    out[:, 1] = width - packed.n_valid
    seg, doc = packed.segment_ids, packed.doc_index
    starts = np.ones_like(seg, dtype=bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    starts &= doc >= 0
    row_of, col_of = np.nonzero(starts)
    seg_doc = doc[row_of, col_of]
    pieces = np.bincount(seg_doc, minlength=int(doc.max()) + 1)
    weight = 1.0 / pieces[seg_doc]
    out[:, 2] = np.bincount(row_of, weights=weight, minlength=n_rows)
    out[:, 3] = np.bincount(row_of, weights=weight * (pieces[seg_doc] > 1), minlength=n_rows)
    out[:, 4] = 1.0
    out[:, 5] = width - 1
    valid = doc >= 0
    rows_idx = np.nonzero(valid)[0]
    src = doc_source[doc[valid]]
    counts = np.bincount(rows_idx * n_sources + src, minlength=n_rows * n_sources)
    out[:, len(STATS_FIELDS):] = counts.reshape(n_rows, n_sources)
    return out


class PackedMixtureDataset(IterableDataset, Stateful):
    """Rows of packed documents from several sources, for one data-parallel rank.

    Yields ``(sample, labels)`` where ``sample`` holds int64 ``input``,
    ``positions``, ``segment_ids`` (each ``[seq_len]``; with a SkyLadder
    ``window_clock`` the segments are also cut at the window grid) and float64
    per-row statistics under :data:`STATS_KEY`; ``labels`` is int64
    ``[seq_len]`` with -100 on padding and where the next token belongs to
    another document. Iteration ends when every source is spent.
    """

    def __init__(
        self,
        specs: list[SourceSpec],
        cfg: Data,
        encoder: Any,
        pad_id: int,
        seq_len: int,
        dp_rank: int,
        dp_world_size: int,
        seed: int,
        window_clock: WindowClock | None = None,
    ):
        self.specs = specs
        self.window_clock = window_clock
        self.cfg = cfg
        self.encoder = encoder  # TextEncoder or ChatEncoderSpec (ext.data.encoders)
        self.pad_id = pad_id
        self.seq_len = seq_len
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.seed = seed
        # The sources' plans, made once here (in the process that builds the loader) and
        # handed to every worker: each worker then opens only the files of its ranges.
        self.plans: list[Plan] = [plan_source(spec) for spec in specs]
        self._sources: list[Source] | None = None
        self._mixture: Mixture | None = None
        self._pending: dict[str, Any] | None = None
        self._buffer_start: dict[str, Any] | None = None
        self._batch: dict[str, np.ndarray] | None = None
        self._stats: np.ndarray | None = None
        self._row = 0
        self._rows_out = 0  # rows this reader has yielded: the SkyLadder clock

    # -- reader setup -----------------------------------------------------
    def _reader(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.dp_rank * workers + worker, self.dp_world_size * workers

    def _build(self) -> None:
        reader, n_readers = self._reader()
        encoder = self.encoder.build()
        self._sources = [
            Source(plan, i, reader, n_readers, encoder, self.seed, self.cfg.shuffle, self.cfg.bad_records)
            for i, plan in enumerate(self.plans)
        ]
        self._mixture = Mixture([s.prob for s in self.specs], self.cfg.mixture_unit)
        for i, source in enumerate(self._sources):
            if len(source) == 0:  # this reader owns no range of the source
                self._mixture.drop(i)

    # -- state ------------------------------------------------------------
    def _snapshot(self) -> dict[str, Any]:
        assert self._sources is not None and self._mixture is not None
        return {
            "sources": [s.state() for s in self._sources],
            "mixture": copy.deepcopy(self._mixture.state()),
        }

    def _restore(self, snapshot: dict[str, Any]) -> None:
        assert self._sources is not None and self._mixture is not None
        for source, state in zip(self._sources, snapshot["sources"]):
            source.restore(state)
        self._mixture.restore(snapshot["mixture"])

    def state_dict(self) -> dict[str, Any]:
        if self._buffer_start is None:
            return self._pending or {}
        return {"buffer_start": self._buffer_start, "row": self._row, "rows_out": self._rows_out}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict or None
        self._buffer_start = None
        self._batch = None

    # -- iteration --------------------------------------------------------
    def _next_buffer(self) -> bool:
        """Pack the next buffer from the current state; False if no data is left."""
        assert self._sources is not None and self._mixture is not None
        self._buffer_start = self._snapshot()
        docs: list[np.ndarray] = []
        doc_source: list[int] = []
        while len(docs) < self.cfg.buffer_docs:
            s = self._mixture.pick()
            if s is None:
                break
            doc = self._sources[s].next_document()
            if doc is None:
                self._mixture.drop(s)
                continue
            self._mixture.record(s, len(doc))
            docs.append(doc)
            doc_source.append(s)
        if not docs:
            self._batch = None
            return False
        lengths = np.fromiter((len(d) for d in docs), np.int64, len(docs))
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        sources = np.asarray(doc_source, np.int32)
        packed = pack_documents(
            np.concatenate(docs), offsets, self.seq_len + 1, self.pad_id,
            self.cfg.packing, doc_source=sources,
        )
        batch = rows_to_batch(packed, self.cfg.reset_positions)
        if self.encoder.marks_untrained:
            batch["input"], batch["labels"] = split_untrained(batch["input"], batch["labels"])
        stats = row_statistics(packed, sources, len(self.specs))
        # Bad records skipped per source while reading this buffer: counted in its first row.
        bad = [s.bad_count - st["bad"] for s, st in zip(self._sources, self._buffer_start["sources"])]
        stats = np.concatenate((stats, np.zeros((len(stats), len(bad)))), axis=1)
        stats[0, -len(bad):] = bad
        # Best-fit emits rows roughly by document length (long documents first);
        # a seeded shuffle keeps that order out of training and out of the metrics.
        reader, _ = self._reader()
        key = [self.seed, reader, *np.asarray(self._buffer_start["mixture"]["consumed"], np.int64)]
        order = np.random.default_rng(key).permutation(len(stats))
        self._batch = {k: v[order] for k, v in batch.items()}
        self._stats = stats[order]
        self._row = 0
        return True

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        if self._sources is None:
            self._build()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._restore(pending["buffer_start"])
            self._rows_out = pending["rows_out"]
            if self._next_buffer():
                self._row = pending["row"]
        elif self._batch is None:
            self._next_buffer()
        while self._batch is not None:
            if self._row >= len(self._batch["input"]):
                if not self._next_buffer():
                    return
                continue
            i = self._row
            segment_ids, stats = self._batch["segment_ids"][i], self._stats[i].copy()
            if self.window_clock is not None:
                info = get_worker_info()
                window = self.window_clock.window_of_row(
                    self._rows_out, info.id if info else 0, info.num_workers if info else 1
                )
                stats[STATS_FIELDS.index("window")] = window
                if not self.window_clock.within_documents:
                    segment_ids = np.zeros_like(segment_ids)
                if window < len(segment_ids):
                    segment_ids = fragment_segments(segment_ids, window)
            n_valid = stats[STATS_FIELDS.index("row_tokens")] - stats[STATS_FIELDS.index("pad_tokens")]
            real = np.arange(len(segment_ids)) < n_valid  # inputs that are not padding
            counts = attention_counts(segment_ids, self._batch["labels"][i], real)
            at = STATS_FIELDS.index("real_tokens")
            stats[at : at + 4] = counts.real_tokens, counts.trained_tokens, counts.pairs, counts.pairs_causal
            self._row += 1
            self._rows_out += 1
            sample = {
                "input": torch.from_numpy(self._batch["input"][i]),
                "positions": torch.from_numpy(self._batch["positions"][i]),
                "segment_ids": torch.from_numpy(np.ascontiguousarray(segment_ids, np.int64)),
                STATS_KEY: torch.from_numpy(stats),
            }
            yield sample, torch.from_numpy(self._batch["labels"][i])
