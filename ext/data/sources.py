"""Reading one source: shards, the split over readers, epochs, tokenization.

A *reader* is one (data-parallel rank, DataLoader worker) pair; there are
``dp_world_size * num_workers`` of them and each reads a disjoint part of
every source:

- by shard when the source's shard (file) count divides by the number of
  readers: reader ``k`` reads shards ``k, k + R, k + 2R, ...``;
- otherwise by record: reader ``k`` keeps global records ``k, k + R, ...``
  of the concatenated shards. That balances the work, but for jsonl/txt
  every reader indexes every file (R times the scanning); ``python -m
  ext.data.reshard`` rewrites a source into a multiple of R shards.

Within its part a reader visits records in a fresh permutation each epoch
(``shuffle``), seeded by (seed, source, reader, epoch), so a position
``(epoch, pos)`` identifies the next record exactly: that pair is the
source's whole checkpoint state.

Formats: jsonl and txt are read by a line index (byte offsets), so a bad
line can be skipped and reported by file and line; json, parquet, arrow and
Hub datasets are loaded with ``datasets`` (Arrow, memory-mapped).
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from typing import Any, Protocol

import numpy as np

from ext.data.config import SourceSpec
from ext.data.encoders import Skip
from ext.data.holdout import in_holdout
from ext.errors import DataError

logger = logging.getLogger(__name__)

_MAX_WARNINGS_PER_SOURCE = 10
_TOKENIZE_BATCH = 1024


class Shard(Protocol):
    path: str

    def __len__(self) -> int: ...

    def read(self, rows: np.ndarray) -> list[tuple[Any, str]]:
        """The field value of each of ``rows`` (None when malformed) and where/why."""
        ...


def _line_spans(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte (start, end) and 1-based line number of every non-blank line."""
    data = np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) else np.zeros(0, np.uint8)
    newlines = np.flatnonzero(data == 10)
    starts = np.concatenate(([0], newlines + 1))
    ends = np.concatenate((newlines, [len(data)]))
    keep = ends > starts
    # blank lines with only whitespace are rare; they are reported as bad records later
    line_no = np.flatnonzero(keep) + 1
    return starts[keep].astype(np.int64), ends[keep].astype(np.int64), line_no.astype(np.int64)


class LineShard:
    """A jsonl or txt file read through a byte-offset index of its lines."""

    def __init__(self, path: str, text_field: str, is_json: bool):
        self.path = path
        self.text_field = text_field
        self.is_json = is_json
        self.starts, self.ends, self.line_no = _line_spans(path)
        self._file = None

    def __len__(self) -> int:
        return len(self.starts)

    def read(self, rows: np.ndarray) -> list[tuple[Any, str]]:
        if self._file is None:  # opened lazily: after the fork into a worker
            self._file = open(self.path, "rb")
        out = []
        f = self._file
        for r in rows:
            f.seek(self.starts[r])
            raw = f.read(int(self.ends[r] - self.starts[r]))
            where = f"{self.path}:{self.line_no[r]}"
            if not self.is_json:
                out.append((raw.decode("utf-8", errors="replace"), where))
                continue
            try:
                record = json.loads(raw)
            except ValueError as e:
                out.append((None, f"{where}: not valid JSON ({e.msg})"))
                continue
            value = record.get(self.text_field) if isinstance(record, dict) else None
            if value is None:
                out.append((None, f"{where}: no field {self.text_field!r}"))
            else:
                out.append((value, where))
        return out


class ArrowShard:
    """A json/parquet/arrow file, or a Hub split, loaded with ``datasets``."""

    def __init__(self, spec: SourceSpec, path: str):
        from datasets import load_dataset

        self.path = path
        self.text_field = spec.text_field
        if spec.kind == "hub":
            ds = load_dataset(path, split=spec.split)
        else:
            ds = load_dataset(spec.kind, data_files=[path], split="train")
        if self.text_field not in ds.column_names:
            raise DataError(
                f"[data] source {spec.name!r}: {path} has no field {self.text_field!r} "
                f"(columns: {ds.column_names}); set [data] text_fields"
            )
        self.ds = ds.select_columns([self.text_field])

    def __len__(self) -> int:
        return len(self.ds)

    def read(self, rows: np.ndarray) -> list[tuple[Any, str]]:
        values = self.ds[rows.tolist()][self.text_field]
        return [
            (v, f"{self.path}[{r}]") if v is not None
            else (None, f"{self.path}[{r}]: field {self.text_field!r} is empty")
            for v, r in zip(values, rows)
        ]


def open_shards(spec: SourceSpec) -> list[Shard]:
    """Every shard of ``spec`` (a file each; the whole split for a Hub id)."""
    if spec.kind in ("jsonl", "txt"):
        return [LineShard(f, spec.text_field, spec.kind == "jsonl") for f in spec.files]
    if spec.kind == "hub":
        return [ArrowShard(spec, spec.location)]
    return [ArrowShard(spec, f) for f in spec.files]


def split_is_by_shard(n_shards: int, n_readers: int) -> bool:
    return n_shards % n_readers == 0


def reader_records(lengths: list[int], reader: int, n_readers: int) -> tuple[np.ndarray, np.ndarray]:
    """(shard index, row) of every record that ``reader`` owns, in shard order."""
    n_shards = len(lengths)
    if split_is_by_shard(n_shards, n_readers):
        mine = range(reader, n_shards, n_readers)
        shard_ids = [np.full(lengths[s], s, np.int32) for s in mine]
        rows = [np.arange(lengths[s], dtype=np.int64) for s in mine]
    else:
        bounds = np.concatenate(([0], np.cumsum(lengths)))
        global_rows = np.arange(reader, bounds[-1], n_readers, dtype=np.int64)
        shard_of = np.searchsorted(bounds, global_rows, side="right") - 1
        shard_ids = [shard_of.astype(np.int32)]
        rows = [global_rows - bounds[shard_of]]
    if not shard_ids:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    return np.concatenate(shard_ids), np.concatenate(rows)


class Source:
    """One source as seen by one reader: yields tokenized documents in order.

    ``next_document()`` returns the next record's document from ``encoder``
    (see :mod:`ext.data.encoders`) or None once the source is spent under
    ``on_exhaustion = "drop"``. ``state()``/``restore()`` capture the exact
    position. Malformed records follow ``bad_records``; samples the encoder
    refuses (SFT policy) are skipped and counted in ``refused``.
    """

    def __init__(
        self,
        spec: SourceSpec,
        index: int,
        shards: list[Shard],
        reader: int,
        n_readers: int,
        encoder: Any,
        seed: int,
        shuffle: bool,
        bad_records: str,
    ):
        self.spec = spec
        self.index = index
        self.shards = shards
        self.encoder = encoder
        self.seed = seed
        self.reader = reader
        self.shuffle = shuffle
        self.bad_records = bad_records
        self.shard_ids, self.rows = reader_records([len(s) for s in shards], reader, n_readers)
        self.epoch = 0
        self.pos = 0
        self.bad_count = 0
        self.refused: dict[str, int] = {}
        self._order = self._permutation(0)
        self._queue: deque[tuple[int, np.ndarray | None]] = deque()
        self._produced = False  # a document came out in this epoch (unknown after restore: True)

    def __len__(self) -> int:
        return len(self.rows)

    def _permutation(self, epoch: int) -> np.ndarray:
        n = len(self.rows)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        rng = np.random.default_rng([self.seed, self.index, self.reader, epoch])
        return rng.permutation(n)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "bad": self.bad_count}

    def restore(self, state: dict[str, int]) -> None:
        if state["epoch"] != self.epoch:
            self._order = self._permutation(state["epoch"])
        self.epoch, self.pos, self.bad_count = state["epoch"], state["pos"], state["bad"]
        self._queue.clear()
        self._produced = True

    def _fill(self) -> None:
        start = self.pos + len(self._queue)
        picks = self._order[start : start + _TOKENIZE_BATCH]
        if len(picks) == 0:
            return
        shard_ids, rows = self.shard_ids[picks], self.rows[picks]
        results: list[tuple[Any, str]] = [(None, "")] * len(picks)
        for s in np.unique(shard_ids):
            where = np.flatnonzero(shard_ids == s)
            for i, item in zip(where, self.shards[s].read(rows[where])):
                results[i] = item
        good = [i for i, (value, _) in enumerate(results) if value is not None]
        other_side = self._other_side_of_holdout(results, good)
        good = [i for i in good if i not in other_side]
        docs: list[np.ndarray | Skip] = [Skip("", bad=True)] * len(picks)
        for i, doc in zip(good, self.encoder.encode_batch([results[i][0] for i in good])):
            docs[i] = doc
        for k, doc in enumerate(docs):
            if k in other_side:
                doc = None
            elif isinstance(doc, Skip):
                where = results[k][1]
                self._skip(doc, f"{where}: {doc.reason}" if doc.reason else where)
                doc = None
            self._queue.append((start + k, doc))

    def _other_side_of_holdout(self, results: list[tuple[Any, str]], good: list[int]) -> set[int]:
        """Records this reader skips: held out (training) or not held out (``heldout_only``)."""
        if self.spec.holdout <= 0:
            return set()
        return {i for i in good if in_holdout(results[i][0], self.spec.holdout) != self.spec.heldout_only}

    def _skip(self, skip: Skip, why: str) -> None:
        if not skip.bad:
            self.refused[skip.reason] = self.refused.get(skip.reason, 0) + 1
            n = sum(self.refused.values())
            if n <= _MAX_WARNINGS_PER_SOURCE or n & (n - 1) == 0:  # first few, then at powers of 2
                logger.warning(
                    f"[sft] source {self.spec.name!r} (reader {self.reader}): skipping sample at {why}; "
                    f"skipped so far: {dict(self.refused)}"
                )
            return
        if self.bad_records == "error":
            raise DataError(f"[data] source {self.spec.name!r}: bad record at {why}; "
                            "fix the record or set [data] bad_records = \"skip\"")
        self.bad_count += 1
        if self.bad_count <= _MAX_WARNINGS_PER_SOURCE:
            logger.warning(f"[data] source {self.spec.name!r}: skipping bad record at {why}")

    def next_document(self) -> np.ndarray | None:
        while True:
            if self.pos >= len(self.rows):
                if self.spec.on_exhaustion == "drop" or len(self.rows) == 0:
                    return None
                if not self._produced:  # restarting would loop forever
                    logger.warning(
                        f"[data] source {self.spec.name!r} (reader {self.reader}): a whole epoch gave "
                        "no document (every record held out, malformed or refused); leaving the mixture"
                    )
                    return None
                self._produced = False
                self.epoch += 1
                self.pos = 0
                self._order = self._permutation(self.epoch)
                self._queue.clear()
                logger.info(
                    f"[data] source {self.spec.name!r} (reader {self.reader}): epoch "
                    f"{self.epoch + 1} begins{' (reshuffled)' if self.shuffle else ''}"
                )
            if not self._queue:
                self._fill()
            pos, doc = self._queue.popleft()
            self.pos = pos + 1
            if doc is not None and len(doc):
                self._produced = True
                return doc
