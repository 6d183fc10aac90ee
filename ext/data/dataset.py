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

Another layout (dp ranks x workers): :meth:`PackedMixtureDataset.redistribute`
hands every buffer in flight whole to one new reader (re-packed from its
saved start as before, only its untrained rows yielded: no token moves) and
deals the sources' remainders by global order; see docs/data.md.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Iterator

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset, get_worker_info

from ext.data.skyladder import WindowClock, fragment_segments
from ext.data.chat import split_untrained
from ext.data.config import Data, SourceSpec
from ext.data.mixture import Mixture, redistribute_mixture
from ext.data.packing import pack_documents, rows_to_batch
from ext.core.errors import DataError
from ext.data.counts import attention_counts_per_row
from ext.data.stats import ROW_STATS, RowStatsLayout
from ext.data.sources import Plan, Source, fresh_source_state, plan_source, redistribute_source

# Test hook (documented in docs/development.md): with EXT_DATA_TRACE set, every sample
# also carries "trace", int64 [seq_len + 1, 5]: one line per document piece in
# the row, (source, epoch, global range, location in the file, tokens), padded with -1; the
# loader strips it and appends it to EXT_DATA_TRACE/rank<dp rank>.jsonl.
TRACE_ENV = "EXT_DATA_TRACE"


def row_statistics(packed: Any, doc_source: np.ndarray, layout: RowStatsLayout) -> np.ndarray:
    """float64 ``[n_rows, layout.width]``: each row's statistics vector
    (:class:`ext.data.stats.RowStatsLayout`): row tokens, padding, documents,
    cut documents, 1 (rows), the attention window (``seq_len``; SkyLadder sets
    it when the row is yielded), real tokens per source; the four FLOP counts
    and the bad records are filled in by :class:`PackedMixtureDataset`. A
    document split into k pieces counts 1/k in each row holding a piece, so
    sums over rows are exact."""
    n_rows, width = packed.tokens.shape
    out = layout.zeros(n_rows)
    if n_rows == 0:
        return out
    col = layout.column
    out[:, col("row_tokens")] = width
    out[:, col("pad_tokens")] = width - packed.n_valid
    seg, doc = packed.segment_ids, packed.doc_index
    starts = np.ones_like(seg, dtype=bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    starts &= doc >= 0
    row_of, col_of = np.nonzero(starts)
    seg_doc = doc[row_of, col_of]
    pieces = np.bincount(seg_doc, minlength=int(doc.max()) + 1)
    weight = 1.0 / pieces[seg_doc]
    out[:, col("docs")] = np.bincount(row_of, weights=weight, minlength=n_rows)
    out[:, col("cut_docs")] = np.bincount(row_of, weights=weight * (pieces[seg_doc] > 1), minlength=n_rows)
    out[:, col("rows")] = 1.0
    out[:, col("window")] = width - 1
    n_sources = len(layout.sources)
    valid = doc >= 0
    rows_idx = np.nonzero(valid)[0]
    src = doc_source[doc[valid]]
    counts = np.bincount(rows_idx * n_sources + src, minlength=n_rows * n_sources)
    out[:, layout.source_tokens] = counts.reshape(n_rows, n_sources)
    return out


class PackedMixtureDataset(IterableDataset, Stateful):
    """Rows of packed documents from several sources, for one data-parallel rank.

    Yields ``(sample, labels)`` where ``sample`` holds int64 ``input``,
    ``positions``, ``segment_ids`` (each ``[seq_len]``; with a SkyLadder
    ``window_clock`` the segments are also cut at the window grid) and the
    row's statistics vector under :data:`ext.data.stats.ROW_STATS` (laid out
    by :attr:`stats_layout`; the packed loader's collation sums a batch's
    vectors into one typed :class:`ext.data.stats.BatchStats`, see that
    module); ``labels`` is int64 ``[seq_len]`` with -100 on padding and where
    the next token belongs to another document. Iteration ends when every
    source is spent.
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
        self.stats_layout = RowStatsLayout(tuple(spec.name for spec in specs))
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
        self._rows_out = 0  # rows this reader has yielded since its layout began
        self._rows_base = 0  # rows all readers had yielded when this layout began
        self._buffer_end: dict[str, Any] | None = None  # state after packing the current buffer
        self._key = 0  # reader id that keys the current buffer's row shuffle
        self._own = True  # the current buffer is this reader's own stream (else: handed over)
        self._adopted: list[dict[str, Any]] = []  # handed-over buffers still to finish
        self._own_next: dict[str, Any] | None = None  # own stream, to take up after them
        # Set by the loader after a layout change: worker id -> this reader's new state.
        self.by_worker: dict[int, dict[str, Any]] | None = None
        self._trace = bool(os.environ.get(TRACE_ENV))
        self._trace_ids: np.ndarray | None = None
        self._trace_docs: np.ndarray | None = None

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
        """``pending``: buffers to finish, in order, each as (``start``: sources and
        mixture when it was packed, ``row``: rows of it already yielded, ``key``:
        the reader id that keys its row shuffle, ``own``: whether it belongs to
        this reader's own stream); ``next``: the own stream's state after them;
        ``rows_out``/``rows_base``: rows yielded by this reader in this layout /
        by all readers before it; ``reader``/``readers``: the layout."""
        if self._buffer_start is None:
            return self._pending or {}
        current = {"start": self._buffer_start, "row": self._row, "key": self._key, "own": self._own}
        reader, readers = self._reader()
        return {"pending": [current, *self._adopted], "next": self._buffer_end if self._own else self._own_next,
                "rows_out": self._rows_out, "rows_base": self._rows_base, "reader": reader, "readers": readers}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict or None
        self._buffer_start = None
        self._batch = None

    def _fresh_state(self, reader: int, readers: int) -> dict[str, Any]:
        """The state of a reader that has yielded nothing yet."""
        return {"pending": [], "rows_out": 0, "rows_base": 0, "reader": reader, "readers": readers,
                "next": {"sources": [fresh_source_state(reader, readers) for _ in self.specs],
                         "mixture": {"consumed": [0.0] * len(self.specs),
                                     "active": [s.prob > 0 for s in self.specs]}}}

    def redistribute(self, old: list[dict[str, Any]], n_new: int) -> tuple[list[dict[str, Any]], str]:
        """States for ``n_new`` readers that continue the stream of the old readers
        (``old[r]``: reader r's state, r = dp rank * workers + worker).

        Every buffer in flight (packed, partly yielded) is handed over whole to one
        new reader (buffer i to reader i mod ``n_new``), which re-packs it from its
        saved start exactly as its old reader did and yields only its remaining
        rows, before its own stream. The own streams continue from the sources'
        positions after those buffers: each source's unread remainder is dealt by
        :func:`ext.data.sources.redistribute_source`; the mixture's counters are
        summed and split (:func:`ext.data.mixture.redistribute_mixture`); the row
        clock (SkyLadder) continues from the global row count.
        """
        states = []
        for r, st in enumerate(old):
            if not st:
                st = self._fresh_state(r, len(old))
            elif "next" not in st or st["next"] is None:
                raise DataError("[data] this checkpoint's loader state predates resuming on another layout "
                                "(dp ranks x workers); resume it on its own layout")
            states.append(st)
        adopted = [{**d, "own": False} for st in states for d in st["pending"]]
        rows = states[0].get("rows_base", 0) + sum(st["rows_out"] for st in states)
        lines = []
        per_source = []
        for i, plan in enumerate(self.plans):
            new, line = redistribute_source(plan, [st["next"]["sources"][i] for st in states], n_new,
                                            self.seed, self.cfg.shuffle)
            per_source.append(new)
            lines.append(line)
        mixture = redistribute_mixture([st["next"]["mixture"] for st in states], n_new)
        out = [{"pending": adopted[j::n_new], "rows_out": 0, "rows_base": rows, "reader": j, "readers": n_new,
                "next": {"sources": [src[j] for src in per_source], "mixture": copy.deepcopy(mixture)}}
               for j in range(n_new)]
        summary = (f"{len(adopted)} buffer(s) in flight handed over whole (none re-packed differently, no "
                   f"token moved); sources' remainders dealt by global order: {'; '.join(lines)}; "
                   f"mixture counters summed and split; row clock continues at global row {rows}")
        return out, summary

    # -- iteration --------------------------------------------------------
    def _take_state(self, state: dict[str, Any]) -> None:
        if "buffer_start" in state:  # a state saved before handed-over buffers existed
            state = {"pending": [{"start": state["buffer_start"], "row": state["row"],
                                  "key": self._reader()[0], "own": True}],
                     "next": None, "rows_out": state["rows_out"]}
        self._rows_out = state["rows_out"]
        self._rows_base = state.get("rows_base", 0)
        self._adopted = list(state["pending"])
        self._own_next = state["next"]
        self._own = not self._adopted
        if not self._adopted:
            self._restore(state["next"])
            self._own_next = None

    def _advance(self) -> bool:
        """Make the next buffer current: a handed-over one, else the own stream's next."""
        while self._adopted:
            pending = self._adopted.pop(0)
            self._restore(pending["start"])
            if self._next_buffer(pending["key"]):
                self._own = pending["own"]
                self._row = pending["row"]
                if self._own:
                    self._own_next = None
                return True
        if not self._own and self._own_next is not None:
            self._restore(self._own_next)
        self._own, self._own_next = True, None
        return self._next_buffer(self._reader()[0])

    def _next_buffer(self, key: int) -> bool:
        """Pack the next buffer from the current state (rows shuffled by ``key``);
        False if no data is left."""
        assert self._sources is not None and self._mixture is not None
        self._buffer_start = self._snapshot()
        self._key = key
        ids: list[tuple[int, ...]] = []
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
            if self._trace:
                ids.append((s, *self._sources[s].last_id))
        self._buffer_end = self._snapshot()
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
        layout = self.stats_layout
        stats = row_statistics(packed, sources, layout)
        # Bad records skipped per source while reading this buffer: counted in the
        # first row it yields (after the shuffle below), so they show at once.
        bad = [s.bad_count - st["bad"] for s, st in zip(self._sources, self._buffer_start["sources"])]
        # Best-fit emits rows roughly by document length (long documents first);
        # a seeded shuffle keeps that order out of training and out of the metrics.
        shuffle_key = [self.seed, key, *np.asarray(self._buffer_start["mixture"]["consumed"], np.int64)]
        order = np.random.default_rng(shuffle_key).permutation(len(stats))
        self._batch = {k: v[order] for k, v in batch.items()}
        self._stats = stats[order]
        self._stats[0, layout.bad_records] = bad
        # FLOP counts of every row as packed (one vectorized call per buffer); a row
        # that SkyLadder cuts further is counted again when it is yielded.
        n_valid = self._stats[:, layout.column("row_tokens")] - self._stats[:, layout.column("pad_tokens")]
        seg = self._batch["segment_ids"]
        self._counts = attention_counts_per_row(seg, self._batch["labels"], np.arange(seg.shape[1]) < n_valid[:, None])
        if self._trace:
            self._trace_ids = np.asarray(ids, np.int64)
            self._trace_docs = packed.doc_index[order]
        self._row = 0
        return True

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        if self._sources is None:
            self._build()
        if self._pending is None and self.by_worker is not None:
            info = get_worker_info()
            self._pending = self.by_worker.get(info.id if info else 0)
            self.by_worker = None
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._take_state(pending)
            if not self._advance():
                return
        elif self._batch is None:
            if not self._advance():
                return
        while self._batch is not None:
            if self._row >= len(self._batch["input"]):
                if not self._advance():
                    return
                continue
            i = self._row
            layout = self.stats_layout
            segment_ids, stats = self._batch["segment_ids"][i], self._stats[i].copy()
            counts = self._counts[i]
            if self.window_clock is not None:
                info = get_worker_info()
                base = self._rows_base // (self.window_clock.local_batch * self.dp_world_size)
                window = self.window_clock.window_of_row(
                    self._rows_out, info.id if info else 0, info.num_workers if info else 1, base
                )
                stats[layout.column("window")] = window
                cut = not self.window_clock.within_documents or window < len(segment_ids)
                if not self.window_clock.within_documents:
                    segment_ids = np.zeros_like(segment_ids)
                if window < len(segment_ids):
                    segment_ids = fragment_segments(segment_ids, window)
                if cut:
                    n_valid = stats[layout.column("row_tokens")] - stats[layout.column("pad_tokens")]
                    real = np.arange(len(segment_ids)) < n_valid  # inputs that are not padding
                    counts = attention_counts_per_row(segment_ids, self._batch["labels"][i], real)[0]
            stats[layout.attention] = counts
            self._row += 1
            self._rows_out += 1
            sample = {
                "input": torch.from_numpy(self._batch["input"][i]),
                "positions": torch.from_numpy(self._batch["positions"][i]),
                "segment_ids": torch.from_numpy(np.ascontiguousarray(segment_ids, np.int64)),
                ROW_STATS: torch.from_numpy(stats),
            }
            if self._trace:
                sample["trace"] = torch.from_numpy(self._row_trace(i))
            yield sample, torch.from_numpy(self._batch["labels"][i])

    def _row_trace(self, i: int) -> np.ndarray:
        """Test hook: (source, epoch, global range, location, tokens) per document piece of row i."""
        docs = self._trace_docs[i]
        out = np.full((len(docs), 5), -1, np.int64)
        found, counts = np.unique(docs[docs >= 0], return_counts=True)
        out[: len(found), :4] = self._trace_ids[found]
        out[: len(found), 4] = counts
        return out
