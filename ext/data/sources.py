"""Reading one source: a global plan of ranges, readers, epochs, bad records.

One reading model for every format. A *reader* is one (data-parallel rank,
DataLoader worker) pair; there are ``R = dp_world_size * num_workers``.

The plan. :func:`plan_source` cuts a source, once per run in the process
that builds the loader, into contiguous *ranges* ``(file, start, stop)`` of
roughly equal size, in a unit each format can seek by:

- plain ``.jsonl``/``.json`` (JSON Lines)/``.txt``: **bytes**. A range owns
  the lines that *start* inside ``[start, stop)`` (the Hadoop split rule), so
  planning needs only file sizes: no line is counted, no file is opened;
- ``.jsonl.gz``/``.jsonl.zst``/``.txt.gz``/``.txt.zst``: **lines**. A
  compressed stream cannot seek, so its lines are counted once (one
  decompression pass per file, cached on disk keyed by path, size and mtime,
  see :func:`count_lines`) and a range ``[first line, last line)`` is read
  by decompressing from the file start and skipping lines (a reader keeps
  its stream open and only rewinds for a range earlier in the same file);
- parquet: **rows**, never across a row group (read with pyarrow row
  groups, one column, no copy into a cache); arrow IPC files (file or stream
  format, as ``datasets`` writes them): rows, memory-mapped; a ``.json``
  file holding one JSON array: its elements (such a file is parsed whole;
  use JSON Lines for big data); token shards (:class:`RowShard`, ready
  token arrays): documents;
- Hub datasets, streamed (``datasets`` streaming mode): one range per data
  file of the split (``IterableDataset.shard``); their sizes are unknown, so
  they are balanced only as well as the dataset's files are. When the split
  has fewer files than there are readers, every reader streams all of it
  and keeps every R-th record (stated in the log).

A range is ``total / 4096`` units long (at most 8 MiB or 65,536 rows; at
least 1), whatever the reader count, so a source has about 4,096 ranges or
more and a reader's share of every pass is equal to within one range.

Who reads what. Epoch ``e`` of a source visits its ranges in the order of a
permutation keyed by (seed, source name, e) (the identity without
``shuffle``); the i-th range of that order goes to reader ``i mod R``. So a
reader opens only the files of its own ranges, every record is read once
per pass, readers finish a pass together (to within one range), and the
global order does not depend on R. Inside a range, records come in chunks
of at most 8,192 in file order, each chunk permuted (keyed by seed, source,
epoch, range, chunk). A reader's position is ``(epoch, k, pos)``: its k-th
range of the epoch, records consumed in it. That triple (with the layout it
belongs to) is the source's whole checkpoint state; restoring re-opens
range k and skips ``pos``. On another reader layout,
:func:`redistribute_source` deals each epoch's unread remainder (rest of
begun ranges, untouched ranges, in the epoch's global order) round-robin to
the new readers, so every record of every epoch is still read once.

Memory per reader: the plan (20 bytes a range), the epoch's permutation,
and one range (<= 8 MiB of text, one parquet row group column, or 8,192
streamed records); files are opened lazily, after the fork into a worker.

Bad records, one policy for every format (``[data] bad_records``): a line
that is not UTF-8 or not JSON, a record that is not an object, a missing or
null field, a string with a lone surrogate, a non-string text, an empty text
(the last two: :mod:`ext.data.encoders`) is skipped, counted per source and
named (``file:line`` for line files, ``file:row N`` otherwise; line numbers
of plain files are counted only when a record must be named), or stops the
run with :class:`DataError` naming it. Lone surrogates never reach the
tokenizer; should the tokenizer still refuse a batch, its records are
encoded one by one and the refused ones are bad records.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import numpy as np

from ext.data.config import SourceSpec
from ext.data.encoders import Skip
from ext.data.holdout import in_holdout
from ext.core.errors import DataError

logger = logging.getLogger(__name__)

_MAX_WARNINGS_PER_SOURCE = 10
_TOKENIZE_BATCH = 1024
CHUNK_RECORDS = 8192  # records per shuffled chunk of a range
MIN_RANGES = 4096  # a source is cut into at least this many ranges (when it is that big)
MAX_RANGE = {"bytes": 8 << 20, "lines": 65536, "rows": 65536, "shards": 1}
_BLOCK = 1 << 20  # bytes read at a time from a stream
COMPRESSED = {".gz": "gzip", ".zst": "zstd"}


@dataclass
class Chunk:
    """Consecutive records of a range: field values (None for a malformed record,
    whose reason is in ``bad``), and each record's location (``shard.locate``)."""

    values: list[Any]
    locs: list[int]
    bad: dict[int, str] = field(default_factory=dict)


class Shard(Protocol):
    """One file (or one Hub data file) of a source, as the plan and a reader see it.

    ``segments()`` (planning, main process): natural blocks ``(start, stop)`` in
    ``unit`` that a range never crosses. ``chunks(start, stop)`` (reader):
    the records of a range in file order, <= ``CHUNK_RECORDS`` per chunk.
    ``locate(loc)``: "file:line" / "file:row N" of a record. ``tokenized``:
    values are ready int32 token arrays (no tokenizer).
    """

    path: str
    unit: str
    tokenized: bool

    def segments(self) -> list[tuple[int, int]]: ...

    def chunks(self, start: int, stop: int) -> Iterator[Chunk]: ...

    def locate(self, loc: int) -> str: ...


class RowShard(Protocol):
    """A shard of ready token documents (``ext.data.tokenized.TokenShard``):
    ``len()`` documents, ``read(rows)`` -> [(int32 tokens, "where")] per row,
    optionally ``holdout_hashes(rows)`` -> float64 content hashes or None."""

    path: str

    def __len__(self) -> int: ...

    def read(self, rows: np.ndarray) -> list[tuple[np.ndarray, str]]: ...


# -- record checks ------------------------------------------------------------------

def _check_value(value: Any, text_field: str) -> tuple[Any, str]:
    """(value, "") when usable, else (None, why). Lone surrogates are refused here."""
    if value is None:
        return None, f"field {text_field!r} is null"
    try:
        if isinstance(value, str):
            value.encode("utf-8")
        elif not isinstance(value, (int, float, bool)):
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        return None, f"field {text_field!r} holds a lone surrogate (U+{ord(e.object[e.start]):04X})"
    except (TypeError, ValueError) as e:
        return None, f"field {text_field!r} is not JSON-like ({e})"
    return value, ""


def _decode(raw: bytes) -> tuple[str | None, str]:
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"


def _parse_line(raw: bytes, text_field: str, is_json: bool) -> tuple[Any, str]:
    text, why = _decode(raw)
    if text is None:
        return None, why
    if not is_json:
        return _check_value(text, text_field)
    try:
        record = json.loads(text)
    except ValueError as e:
        return None, f"not valid JSON ({getattr(e, 'msg', e)})"
    except RecursionError:
        return None, "not valid JSON (nested too deeply)"
    if not isinstance(record, dict):
        return None, f"not a JSON object (a {type(record).__name__})"
    if text_field not in record:
        return None, f"no field {text_field!r}"
    return _check_value(_with_sample_fields(text_field, record[text_field], record), text_field)


CONVERSATION_FIELDS = ("messages", "conversations")
SAMPLE_FIELDS = ("tools", "system")
"""Fields of a chat record beside its turns that its template reads: a record
``{"messages": [...], "tools": [...]}`` reaches the chat encoder whole."""


def _with_sample_fields(text_field: str, value: Any, record: Any) -> Any:
    """``value``, or for a conversation field, ``{text_field: value}`` plus the
    record's :data:`SAMPLE_FIELDS` when it has any."""
    if text_field not in CONVERSATION_FIELDS or value is None:
        return value
    extra = {k: record[k] for k in SAMPLE_FIELDS if k in record and record[k] is not None}
    return {text_field: value, **extra} if extra else value


def _lines_to_chunks(lines: Iterator[tuple[int, bytes]], text_field: str, is_json: bool) -> Iterator[Chunk]:
    """(loc, raw line) -> chunks; blank lines are not records."""
    chunk = Chunk([], [])
    for loc, raw in lines:
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw:
            continue
        value, why = _parse_line(raw, text_field, is_json)
        if value is None:
            chunk.bad[len(chunk.values)] = why
        chunk.values.append(value)
        chunk.locs.append(loc)
        if len(chunk.values) == CHUNK_RECORDS:
            yield chunk
            chunk = Chunk([], [])
    if chunk.values:
        yield chunk


def _arrow_values(column: Any, text_field: str, first_row: int, extra: Any = None) -> Chunk:
    """A pyarrow (chunked) array -> a chunk with each value checked. ``extra``:
    a table of the rows' :data:`SAMPLE_FIELDS` columns, merged into each
    conversation value (:func:`_with_sample_fields`)."""
    try:
        raw = column.to_pylist()
        if extra is not None and extra.num_columns:
            raw = [_with_sample_fields(text_field, v, r) for v, r in zip(raw, extra.to_pylist())]
    except Exception:  # e.g. invalid UTF-8 in a string column: find the bad rows one by one
        raw = []
        for i in range(len(column)):
            try:
                raw.append(column[i].as_py())
            except Exception as e:
                raw.append(_Bad(f"unreadable value ({type(e).__name__}: {e})"))
    chunk = Chunk([], [])
    for i, value in enumerate(raw):
        if isinstance(value, _Bad):
            value, why = None, value.why
        else:
            value, why = _check_value(value, text_field)
        if value is None:
            chunk.bad[i] = why
        chunk.values.append(value)
        chunk.locs.append(first_row + i)
    return chunk


@dataclass
class _Bad:
    why: str


# -- line files -----------------------------------------------------------------------

def _split_blocks(blocks: Iterator[bytes], first_loc: int, per_line: bool) -> Iterator[tuple[int, bytes]]:
    """Lines of a byte stream with their location: byte offset (or line index when
    ``per_line``), counted from ``first_loc``."""
    pending = b""
    loc = first_loc
    for block in blocks:
        parts = (pending + block).split(b"\n")
        pending = parts.pop()
        for line in parts:
            yield loc, line
            loc += 1 if per_line else len(line) + 1
    if pending:
        yield loc, pending


class PlainLineShard:
    """An uncompressed jsonl/txt file, planned in bytes (no index, no line count)."""

    unit = "bytes"
    tokenized = False

    def __init__(self, path: str, text_field: str, is_json: bool):
        self.path, self.text_field, self.is_json = path, text_field, is_json
        self._file = None
        self._known_lines: tuple[int, int] = (0, 1)  # (byte offset, its line number)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}

    def segments(self) -> list[tuple[int, int]]:
        size = os.path.getsize(self.path)
        return [(0, size)] if size else []

    def _open(self) -> int:
        if self._file is None:  # opened lazily: after the fork into a worker
            self._file = os.open(self.path, os.O_RDONLY)
        return self._file

    def __del__(self) -> None:
        if getattr(self, "_file", None) is not None:
            os.close(self._file)

    def _read_to_newline(self, fd: int, offset: int, step: int) -> bytes:
        """Bytes from ``offset`` through the next newline (or the end of the file)."""
        out = []
        while True:
            block = os.pread(fd, step, offset)
            if not block:
                break
            cut = block.find(b"\n")
            if cut >= 0:
                out.append(block[: cut + 1])
                break
            out.append(block)
            offset += len(block)
            step = min(step * 2, _BLOCK)
        return b"".join(out)

    def chunks(self, start: int, stop: int) -> Iterator[Chunk]:
        fd = self._open()  # positioned reads of exactly the range (plus the line crossing its end)
        head = 1 if start > 0 else 0
        block = os.pread(fd, stop - start + head, start - head)
        begin = start
        if head:  # a line that starts before `start` belongs to the previous range
            if block[:1] != b"\n":
                cut = block.find(b"\n")
                if cut < 0:
                    return  # one line covers the whole range; it starts before it
                begin = start - head + cut + 1
            block = block[begin - start + head :]
        if not block:
            return
        if not block.endswith(b"\n"):
            # the last line may run past `stop`: read on in steps that start small
            mean_line = len(block) // max(block.count(b"\n"), 1)
            block += self._read_to_newline(fd, stop, min(_BLOCK, max(128, mean_line)))
        yield from _lines_to_chunks(_split_blocks(iter((block,)), begin, False), self.text_field, self.is_json)

    def locate(self, loc: int) -> str:
        """``path:line`` of the line starting at byte ``loc`` (newlines counted on demand)."""
        offset, line = self._known_lines
        if loc < offset:
            offset, line = 0, 1
        with open(self.path, "rb") as f:
            f.seek(offset)
            while offset < loc:
                block = f.read(min(_BLOCK * 16, loc - offset))
                if not block:
                    break
                line += block.count(b"\n")
                offset += len(block)
        self._known_lines = (loc, line)
        return f"{self.path}:{line}"


def _cache_dir() -> str:
    base = os.environ.get("EXT_DATA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torchtitan-ext", "data"
    )
    return base


def _stream_blocks(path: str) -> Iterator[bytes]:
    import pyarrow as pa

    compression = COMPRESSED.get(os.path.splitext(path)[1].lower())
    with pa.input_stream(path, compression=compression) as stream:
        while True:
            block = stream.read(_BLOCK)
            if not block:
                return
            yield block


def count_lines(path: str) -> int:
    """Lines of a (compressed) file: one decompression pass, cached on disk.

    The cache (``$EXT_DATA_CACHE``, default ``~/.cache/torchtitan-ext/data``)
    holds one small file per (path, size, mtime), so a changed file is
    counted again; an unwritable cache only costs the count next run.
    """
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    cache = os.path.join(_cache_dir(), f"lines-{key}")
    try:
        with open(cache) as f:
            return int(f.read())
    except (OSError, ValueError):
        pass
    n, last = 0, b"\n"
    try:
        for block in _stream_blocks(path):
            n += block.count(b"\n")
            last = block[-1:]
    except OSError as e:
        raise DataError(f"cannot decompress {path}: {e}; check the file (e.g. zstd -t / gzip -t)") from None
    n += last != b"\n"
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = f"{cache}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(str(n))
        os.replace(tmp, cache)
    except OSError:
        pass
    return n


class CompressedLineShard:
    """A .gz/.zst jsonl/txt file, planned in lines (counted once, cached)."""

    unit = "lines"
    tokenized = False

    def __init__(self, path: str, text_field: str, is_json: bool):
        self.path, self.text_field, self.is_json = path, text_field, is_json
        self._lines: Iterator[tuple[int, bytes]] | None = None
        self._next = 0  # index of the line self._lines yields next

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_lines": None, "_next": 0}

    def segments(self) -> list[tuple[int, int]]:
        n = count_lines(self.path)
        return [(0, n)] if n else []

    def _read(self, start: int, stop: int) -> Iterator[tuple[int, bytes]]:
        if self._lines is None or start < self._next:  # rewind: decompress from the start
            self._lines, self._next = _split_blocks(_stream_blocks(self.path), 0, True), 0
        try:
            while self._next < stop:
                loc, line = next(self._lines)
                self._next = loc + 1
                if loc >= start:
                    yield loc, line
        except StopIteration:
            self._lines = None
        except OSError as e:
            self._lines = None
            raise DataError(f"cannot decompress {self.path} (line {self._next + 1}): {e}; "
                            "check or rewrite the file") from None

    def chunks(self, start: int, stop: int) -> Iterator[Chunk]:
        yield from _lines_to_chunks(self._read(start, stop), self.text_field, self.is_json)

    def locate(self, loc: int) -> str:
        return f"{self.path}:{loc + 1}"


# -- columnar files ----------------------------------------------------------------------

def _missing_field(spec_name: str, path: str, text_field: str, columns: list[str]) -> DataError:
    return DataError(f"[data] source {spec_name!r}: {path} has no field {text_field!r} "
                     f"(columns: {columns}); set [data] text_fields")


class ParquetShard:
    """A parquet file, planned in rows within row groups; one column read per row group."""

    unit = "rows"
    tokenized = False

    def __init__(self, path: str, text_field: str, source: str):
        self.path, self.text_field, self.source = path, text_field, source
        self._file = None
        self._group: tuple[int, Any, Any] | None = None  # (row group, its column, its SAMPLE_FIELDS): the last read
        self._group_starts: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_group": None}

    def _open(self):
        import pyarrow.parquet as pq

        if self._file is None:
            try:
                self._file = pq.ParquetFile(self.path, memory_map=True)
            except Exception as e:
                raise DataError(f"[data] source {self.source!r}: cannot read parquet file {self.path} "
                                f"({type(e).__name__}: {e}); fix or remove it") from None
        return self._file

    def segments(self) -> list[tuple[int, int]]:
        pf = self._open()
        names = pf.schema_arrow.names
        if self.text_field not in names:
            raise _missing_field(self.source, self.path, self.text_field, names)
        rows = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        self._file = None
        starts = np.concatenate(([0], np.cumsum(rows))).astype(np.int64)
        self._group_starts = starts
        return [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:]) if b > a]

    def chunks(self, start: int, stop: int) -> Iterator[Chunk]:
        pf = self._open()
        if self._group_starts is None:
            rows = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            self._group_starts = np.concatenate(([0], np.cumsum(rows))).astype(np.int64)
        g = int(np.searchsorted(self._group_starts, start, side="right") - 1)
        if self._group is None or self._group[0] != g:
            extra = []
            if self.text_field in CONVERSATION_FIELDS:
                extra = [k for k in SAMPLE_FIELDS if k in pf.schema_arrow.names]
            table = pf.read_row_group(g, columns=[self.text_field, *extra])
            self._group = (g, table.column(0), table.select(extra))
        _, column, extra_table = self._group
        base = int(self._group_starts[g])
        for a in range(start, stop, CHUNK_RECORDS):
            b = min(a + CHUNK_RECORDS, stop)
            yield _arrow_values(column.slice(a - base, b - a), self.text_field, a,
                                extra_table.slice(a - base, b - a))

    def locate(self, loc: int) -> str:
        return f"{self.path}:row {loc}"


class ArrowShard:
    """An Arrow IPC file (file or stream format), memory-mapped, planned in rows."""

    unit = "rows"
    tokenized = False

    def __init__(self, path: str, text_field: str, source: str):
        self.path, self.text_field, self.source = path, text_field, source
        self._table = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_table": None}

    def _open(self):
        import pyarrow as pa

        if self._table is None:
            try:
                source = pa.memory_map(self.path)
                try:
                    table = pa.ipc.open_file(source).read_all()
                except pa.ArrowInvalid:
                    table = pa.ipc.open_stream(pa.memory_map(self.path)).read_all()
            except Exception as e:
                raise DataError(f"[data] source {self.source!r}: cannot read arrow file {self.path} "
                                f"({type(e).__name__}: {e}); fix or remove it") from None
            if self.text_field not in table.column_names:
                raise _missing_field(self.source, self.path, self.text_field, table.column_names)
            extra = []
            if self.text_field in CONVERSATION_FIELDS:
                extra = [k for k in SAMPLE_FIELDS if k in table.column_names]
            self._table = table.select([self.text_field, *extra])
        return self._table

    def segments(self) -> list[tuple[int, int]]:
        n = self._open().num_rows
        self._table = None
        return [(0, n)] if n else []

    def chunks(self, start: int, stop: int) -> Iterator[Chunk]:
        table = self._open()
        column, extra = table.column(0), table.select(table.column_names[1:])
        for a in range(start, stop, CHUNK_RECORDS):
            b = min(a + CHUNK_RECORDS, stop)
            yield _arrow_values(column.slice(a, b - a), self.text_field, a, extra.slice(a, b - a))

    def locate(self, loc: int) -> str:
        return f"{self.path}:row {loc}"


class JsonArrayShard:
    """A .json file holding one JSON array of records (parsed whole when read)."""

    unit = "rows"
    tokenized = False

    def __init__(self, path: str, text_field: str, source: str):
        self.path, self.text_field, self.source = path, text_field, source
        self._records: list | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_records": None}

    def _open(self) -> list:
        if self._records is None:
            with open(self.path, "rb") as f:
                raw = f.read()
            text, why = _decode(raw)
            try:
                if text is None:
                    raise ValueError(why)
                records = json.loads(text)
            except ValueError as e:
                raise DataError(f"[data] source {self.source!r}: {self.path} is not a valid JSON array "
                                f"({getattr(e, 'msg', e)}); fix it or write it as JSON Lines") from None
            if not isinstance(records, list):
                raise DataError(f"[data] source {self.source!r}: {self.path} is JSON but not an array of "
                                "records; write it as JSON Lines (one record per line)")
            self._records = records
        return self._records

    def segments(self) -> list[tuple[int, int]]:
        n = len(self._open())
        self._records = None
        return [(0, n)] if n else []

    def chunks(self, start: int, stop: int) -> Iterator[Chunk]:
        records = self._open()
        for a in range(start, stop, CHUNK_RECORDS):
            chunk = Chunk([], [])
            for i in range(a, min(a + CHUNK_RECORDS, stop)):
                r = records[i]
                if not isinstance(r, dict):
                    value, why = None, f"not a JSON object (a {type(r).__name__})"
                elif self.text_field not in r:
                    value, why = None, f"no field {self.text_field!r}"
                else:
                    value, why = _check_value(r[self.text_field], self.text_field)
                if value is None:
                    chunk.bad[len(chunk.values)] = why
                chunk.values.append(value)
                chunk.locs.append(i)
            yield chunk

    def locate(self, loc: int) -> str:
        return f"{self.path}:element {loc}"


def _is_json_array(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        while not head:
            block = f.read(4096)
            if not block:
                return False
            head = block.lstrip(b" \t\r\n")
    return head.startswith(b"[")


# -- ready token documents and Hub streams ------------------------------------------------

class TokenRows:
    """Adapter: a :class:`RowShard` of ready token documents as a :class:`Shard`."""

    unit = "rows"
    tokenized = True

    def __init__(self, shard: RowShard):
        self.shard = shard
        self.path = shard.path

    def segments(self) -> list[tuple[int, int]]:
        n = len(self.shard)
        return [(0, n)] if n else []

    def chunks(self, start: int, stop: int) -> Iterator[Chunk]:
        for a in range(start, stop, CHUNK_RECORDS):
            rows = np.arange(a, min(a + CHUNK_RECORDS, stop), dtype=np.int64)
            docs = self.shard.read(rows)
            yield Chunk([tokens for tokens, _ in docs], rows.tolist())

    def holdout_hashes(self, rows: np.ndarray) -> np.ndarray | None:
        fn = getattr(self.shard, "holdout_hashes", None)
        return fn(rows) if fn is not None else None

    def locate(self, loc: int) -> str:
        return f"{self.path}:doc {loc}"


class HubShard:
    """Data file ``index`` of ``n`` of a streamed ``datasets`` split (one range).

    ``keep = (stride, offset)``: keep only records ``offset, offset + stride, ...``
    (used when the split has fewer files than there are readers).
    """

    unit = "shards"
    tokenized = False

    def __init__(self, dataset: Any, index: int, n: int, text_field: str, name: str):
        self.dataset, self.index, self.n, self.text_field = dataset, index, n, text_field
        self.path = f"{name} (file {index + 1} of {n})"
        self.keep = (1, 0)

    def segments(self) -> list[tuple[int, int]]:
        return [(0, 1)]

    def chunks(self, start: int, stop: int) -> Iterator[Chunk]:
        stride, offset = self.keep
        part = self.dataset.shard(num_shards=self.n, index=self.index, contiguous=True)
        chunk = Chunk([], [])
        i = -1
        records = iter(part)
        while True:
            try:
                record = next(records)
            except StopIteration:
                break
            except Exception as e:  # a broken file of the stream: nothing after it is readable
                chunk.bad[len(chunk.values)] = (f"unreadable from here on ({type(e).__name__}: "
                                                f"{' '.join(str(e).split())[:200]}); rest of the file skipped")
                chunk.values.append(None)
                chunk.locs.append(i + 1)
                break
            i += 1
            if i % stride != offset:
                continue
            value, why = (_check_value(_with_sample_fields(self.text_field, record.get(self.text_field), record),
                                       self.text_field)
                          if self.text_field in record else (None, f"no field {self.text_field!r}"))
            if value is None:
                chunk.bad[len(chunk.values)] = why
            chunk.values.append(value)
            chunk.locs.append(i)
            if len(chunk.values) == CHUNK_RECORDS:
                yield chunk
                chunk = Chunk([], [])
        if chunk.values:
            yield chunk

    def locate(self, loc: int) -> str:
        return f"{self.path}:record {loc}"


def open_hub_stream(spec: SourceSpec) -> Any:
    """The split of ``spec`` as a ``datasets`` IterableDataset (streaming: nothing downloaded whole)."""
    from datasets import load_dataset

    try:
        ds = load_dataset(spec.location, split=spec.split, streaming=True)
    except Exception as e:
        raise DataError(f"[data] source {spec.name!r}: cannot open {spec.location!r} split {spec.split!r} "
                        f"for streaming ({type(e).__name__}: {' '.join(str(e).split())[:300]}); check the "
                        "id, the split ([data] splits) and the network") from None
    names = ds.column_names
    if names is not None and spec.text_field not in names:
        raise _missing_field(spec.name, spec.location, spec.text_field, list(names))
    if names is not None:
        ds = ds.select_columns([spec.text_field])
    return ds


# -- the plan --------------------------------------------------------------------------------

def open_shards(spec: SourceSpec) -> list[Shard]:
    """The shards of ``spec`` (unopened: files are opened when read)."""
    if spec.kind == "hub":
        ds = open_hub_stream(spec)
        n = max(int(ds.n_shards), 1)
        return [HubShard(ds, i, n, spec.text_field, f"{spec.location}[{spec.split}]") for i in range(n)]
    if spec.kind == "tokens":
        from ext.data.tokenized import TokenShard

        return [TokenRows(TokenShard(f)) for f in spec.files]
    shards: list[Shard] = []
    for f in spec.files:
        lower = f.lower()
        compressed = os.path.splitext(lower)[1] in COMPRESSED
        if spec.kind == "parquet":
            shards.append(ParquetShard(f, spec.text_field, spec.name))
        elif spec.kind == "arrow":
            shards.append(ArrowShard(f, spec.text_field, spec.name))
        elif spec.kind == "txt" or lower.endswith((".txt", ".txt.gz", ".txt.zst")):
            shards.append((CompressedLineShard if compressed else PlainLineShard)(f, spec.text_field, False))
        elif lower.endswith(".json") and _is_json_array(f):
            shards.append(JsonArrayShard(f, spec.text_field, spec.name))
        else:
            shards.append((CompressedLineShard if compressed else PlainLineShard)(f, spec.text_field, True))
    return shards


@dataclass
class Plan:
    """A source cut into ranges: range ``i`` is records ``[start[i], stop[i])`` of
    ``shards[file[i]]`` in the shards' ``unit``. Built once (:func:`plan_source`)
    and handed to every reader; compact (20 bytes a range)."""

    spec: SourceSpec
    shards: list[Shard]
    file: np.ndarray  # int32
    start: np.ndarray  # int64
    stop: np.ndarray  # int64
    unit: str

    def __len__(self) -> int:
        return len(self.file)

    @property
    def total(self) -> int:
        return int((self.stop - self.start).sum())

    def has_records(self) -> bool:
        """Whether any range holds a record (plain text files: a non-blank byte)."""
        if self.unit != "bytes":
            return len(self) > 0
        for shard in self.shards:
            with open(shard.path, "rb") as f:
                while block := f.read(_BLOCK):
                    if block.strip():
                        return True
        return False


def range_size(total: int, unit: str) -> int:
    """Units per range: total / MIN_RANGES, within [1, MAX_RANGE[unit]]."""
    return int(min(MAX_RANGE[unit], max(1, math.ceil(total / MIN_RANGES))))


def plan_ranges(segments: list[list[tuple[int, int]]], unit: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(file, start, stop) of every range: each segment cut into equal parts of at
    most :func:`range_size` units (independent of the reader count)."""
    total = sum(b - a for segs in segments for a, b in segs)
    target = range_size(total, unit)
    files, starts, stops = [], [], []
    for f, segs in enumerate(segments):
        for a, b in segs:
            n = math.ceil((b - a) / target)
            edges = a + (np.arange(n + 1, dtype=np.int64) * (b - a)) // n
            files.append(np.full(n, f, np.int32))
            starts.append(edges[:-1])
            stops.append(edges[1:])
    if not files:
        return np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(files), np.concatenate(starts), np.concatenate(stops)


def plan_source(spec: SourceSpec, shards: list[Shard] | None = None) -> Plan:
    """Plan ``spec`` (or the given shards: e.g. :class:`TokenRows` of token shards)."""
    shards = open_shards(spec) if shards is None else shards
    units = {s.unit for s in shards}
    if len(units) > 1:  # plain and compressed line files together: count every file's lines
        shards = [CompressedLineShard(s.path, s.text_field, s.is_json) if isinstance(s, PlainLineShard) else s
                  for s in shards]
        units = {"lines"}
    unit = units.pop() if units else "rows"
    file, start, stop = plan_ranges([s.segments() for s in shards], unit)
    return Plan(spec, shards, file, start, stop, unit)


def _source_key(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def epoch_order(n: int, seed: int, key: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The global order of a source's ``n`` ranges in ``epoch`` (independent of readers)."""
    if shuffle:
        return np.random.default_rng([seed, key, epoch]).permutation(n)
    return np.arange(n, dtype=np.int64)


def fresh_source_state(reader: int, n_readers: int) -> dict[str, Any]:
    return {"epoch": 0, "range": 0, "pos": 0, "bad": 0, "reader": reader, "readers": n_readers}


def _reader_items(plan: Plan, seed: int, shuffle: bool, state: dict[str, Any], epoch: int,
                  cache: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(global ranges, first untrained record of each) of an old reader's part of ``epoch``."""
    custom = (state.get("custom") or {}).get(str(epoch))
    if custom is not None:
        return np.asarray(custom[0], np.int64), np.asarray(custom[1], np.int64)
    if epoch not in cache:
        cache[epoch] = epoch_order(len(plan), seed, _source_key(plan.spec.name), epoch, shuffle)
    ranges = cache[epoch][state["reader"] :: state["readers"]]
    return ranges, np.zeros(len(ranges), np.int64)


def redistribute_source(plan: Plan, states: list[dict[str, Any]], n_new: int, seed: int,
                        shuffle: bool) -> tuple[list[dict[str, Any]], str]:
    """New positions for ``n_new`` readers continuing the old readers' ``states``.

    For every epoch from the least to the most advanced old reader, the
    remainder is what no old reader has consumed: the rest of a range a
    reader was inside (from its next record), the ranges after it in that
    reader's part, and every part of a reader that had not reached that epoch
    yet. The remainder is put in the epoch's global order and dealt
    round-robin (item i to new reader i mod ``n_new``); the epochs after
    follow the ordinary order (``order[j::n_new]``). Each record of each
    epoch is thus read once across the change. Returns the states and a
    one-line summary. Hub splits read striped (fewer data files than
    readers) cannot be dealt by range: every new reader restarts the least
    advanced old reader's current range (records may repeat; said in the log).
    """
    key = _source_key(plan.spec.name)
    striped = plan.unit == "shards" and (len(plan) < n_new or any(len(plan) < s["readers"] for s in states))
    e_min = min(s["epoch"] for s in states)
    e_max = max(s["epoch"] for s in states)
    if striped:
        k = min(s["range"] for s in states if s["epoch"] == e_min)
        return ([{**fresh_source_state(j, n_new), "epoch": e_min, "range": k} for j in range(n_new)],
                f"{plan.spec.name!r}: a striped Hub split, restarted at file {k} of epoch {e_min + 1} "
                "(records of that file may repeat)")
    cache: dict[int, np.ndarray] = {}
    custom: list[dict[str, list]] = [{} for _ in range(n_new)]
    summary = []
    for epoch in range(e_min, e_max + 1):
        ranges, firsts = [], []
        for s in states:
            if s["epoch"] > epoch:
                continue
            r, f = _reader_items(plan, seed, shuffle, s, epoch, cache)
            if s["epoch"] == epoch:
                k = s["range"]
                r, f = r[k:], f[k:].copy()
                if len(f):
                    f[0] = max(f[0], s["pos"])
            ranges.append(r)
            firsts.append(f)
        r = np.concatenate(ranges) if ranges else np.zeros(0, np.int64)
        f = np.concatenate(firsts) if firsts else np.zeros(0, np.int64)
        if epoch not in cache:
            cache[epoch] = epoch_order(len(plan), seed, key, epoch, shuffle)
        rank = np.empty(len(plan), np.int64)
        rank[cache[epoch]] = np.arange(len(plan))
        by_order = np.argsort(rank[r], kind="stable")
        r, f = r[by_order], f[by_order]
        for j in range(n_new):
            custom[j][str(epoch)] = [r[j::n_new].tolist(), f[j::n_new].tolist()]
        summary.append(f"epoch {epoch + 1}: {len(r)} range(s) left ({int((f > 0).sum())} begun)")
    out = [{**fresh_source_state(j, n_new), "epoch": e_min, "custom": custom[j]} for j in range(n_new)]
    return out, f"{plan.spec.name!r}: " + ", ".join(summary)


class Source:
    """One source as seen by one reader: yields documents in a fixed order.

    ``next_document()`` returns the next record's document (int32 tokens,
    from ``encoder`` or ready in the shard) or None once the source is spent
    under ``on_exhaustion = "drop"``. ``state()``/``restore()`` capture the
    exact position ``(epoch, range, pos)``. Malformed records follow
    ``bad_records``; samples the encoder refuses (SFT policy) are skipped
    and counted in ``refused``.
    """

    def __init__(
        self,
        plan: Plan,
        index: int,
        reader: int,
        n_readers: int,
        encoder: Any,
        seed: int,
        shuffle: bool,
        bad_records: str,
    ):
        self.plan = plan
        self.spec = plan.spec
        self.index = index
        self.encoder = encoder
        self.seed = seed
        self.reader = reader
        self.n_readers = n_readers
        self.shuffle = shuffle
        self.bad_records = bad_records
        self.key = _source_key(plan.spec.name)
        # A Hub split with fewer files than readers: everyone streams it all, keeping every R-th record.
        self.striped = plan.unit == "shards" and len(plan) < n_readers
        self.shards = list(plan.shards)
        if self.striped:
            self.shards = [copy.copy(s) for s in plan.shards]
            for shard in self.shards:
                shard.keep = (n_readers, reader)
        # After a layout change: epoch -> (global ranges, records of each already trained)
        # for the epochs whose remainder was dealt anew (see redistribute_source).
        self.custom: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._custom_state: dict[str, Any] = {}
        self.epoch = 0
        self.k = 0  # index of the current range among this reader's ranges of the epoch
        self.pos = 0  # records of that range consumed
        self.bad_count = 0
        self.refused: dict[str, int] = {}
        self._mine = self._my_ranges(0)
        self._queue: deque[tuple[int, int, np.ndarray | None, int]] = deque()
        self._fill_k, self._fill_pos = 0, 0
        self._chunks: Iterator[Chunk] | None = None
        self._chunk: Chunk | None = None
        self._chunk_base = 0  # position of the current chunk's first record in its range
        self._chunk_at = 0  # next record of the current chunk to encode
        self._produced = False  # a document came out in this epoch (unknown after restore: True)
        self.last_id: tuple[int, int, int] = (0, -1, 0)  # (epoch, global range, location) of the last document

    def __len__(self) -> int:
        """Ranges this reader reads in the current epoch."""
        return len(self._mine)

    def _my_ranges(self, epoch: int) -> np.ndarray:
        if epoch in self.custom:  # this epoch's part was dealt after a layout change
            return self.custom[epoch][0]
        order = epoch_order(len(self.plan), self.seed, self.key, epoch, self.shuffle)
        return order if self.striped else order[self.reader :: self.n_readers]

    def _first_record(self, k: int) -> int:
        """Records of the reader's k-th range already trained before a layout change."""
        custom = self.custom.get(self.epoch)
        return int(custom[1][k]) if custom is not None and k < len(custom[1]) else 0

    def _set_reader(self, reader: int, n_readers: int) -> None:
        if (reader, n_readers) == (self.reader, self.n_readers):
            return
        self.reader, self.n_readers = reader, n_readers
        self.striped = self.plan.unit == "shards" and len(self.plan) < n_readers
        self.shards = list(self.plan.shards)
        if self.striped:
            self.shards = [copy.copy(s) for s in self.plan.shards]
            for shard in self.shards:
                shard.keep = (n_readers, reader)

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "range": self.k, "pos": self.pos, "bad": self.bad_count,
                                 "reader": self.reader, "readers": self.n_readers}
        if self.custom:
            state["custom"] = self._custom_state
        return state

    def restore(self, state: dict[str, Any]) -> None:
        """Take position ``state`` (self-contained: it names its reader layout, so a
        reader can also restore another reader's position, e.g. to finish its buffer)."""
        self._set_reader(state.get("reader", self.reader), state.get("readers", self.n_readers))
        custom = state.get("custom") or {}
        if custom is not self._custom_state:
            self._custom_state = custom
            self.custom = {int(e): (np.asarray(r, np.int64), np.asarray(p, np.int64))
                           for e, (r, p) in custom.items()}
        self._mine = self._my_ranges(state["epoch"])
        self.epoch, self.k, self.pos, self.bad_count = state["epoch"], state["range"], state["pos"], state["bad"]
        self._queue.clear()
        self._seek(self.k, self.pos)
        self._produced = True

    # -- reading ---------------------------------------------------------------------
    def _seek(self, k: int, pos: int) -> None:
        self._fill_k, self._fill_pos = k, pos
        self._chunks, self._chunk = None, None

    def _next_chunk(self) -> bool:
        """Load the chunk holding record ``_fill_pos`` of range ``_fill_k``; False past the last range."""
        while self._fill_k < len(self._mine):
            g = int(self._mine[self._fill_k])
            if self._chunks is None:
                self._fill_pos = max(self._fill_pos, self._first_record(self._fill_k))
                shard = self.shards[self.plan.file[g]]
                self._chunks = shard.chunks(int(self.plan.start[g]), int(self.plan.stop[g]))
                self._chunk_base, self._chunk_no = 0, 0
                self._chunk = None
            elif self._chunk is not None:
                self._chunk_base += len(self._chunk.values)
                self._chunk_no += 1
            chunk = next(self._chunks, None)
            if chunk is None:  # range done: the next one starts at its record 0
                self._fill_k, self._fill_pos = self._fill_k + 1, 0
                self._chunks = self._chunk = None
                continue
            self._chunk = chunk
            if self._chunk_base + len(chunk.values) <= self._fill_pos:
                continue  # restoring: skip whole chunks already consumed
            if self.shuffle:
                perm = np.random.default_rng([self.seed, self.key, self.epoch, g, self._chunk_no]).permutation(
                    len(chunk.values))
                chunk.values = [chunk.values[i] for i in perm]
                chunk.locs = [chunk.locs[i] for i in perm]
                where = {int(j): i for j, i in enumerate(perm)}
                chunk.bad = {j: chunk.bad[i] for j, i in where.items() if i in chunk.bad}
            self._chunk_at = self._fill_pos - self._chunk_base
            return True
        return False

    def _fill(self) -> bool:
        """Encode the next batch of records into the queue; False at the end of the epoch.

        A batch gathers up to ``_TOKENIZE_BATCH`` records across chunks and
        ranges: the tokenizer is fastest on large batches, and ranges of a
        small source hold only a few records. Reading ahead changes no state:
        a source's position is that of the last document taken from the queue.
        """
        spans = []  # (range k, chunk base, chunk, a, b, shard): records a..b-1 of a chunk
        n = 0
        while n < _TOKENIZE_BATCH:
            if self._chunk is None or self._chunk_at >= len(self._chunk.values):
                if not self._next_chunk():
                    break
            chunk, a = self._chunk, self._chunk_at
            b = min(a + _TOKENIZE_BATCH - n, len(chunk.values))
            shard = self.shards[self.plan.file[int(self._mine[self._fill_k])]]
            spans.append((self._fill_k, self._chunk_base, chunk, a, b, shard))
            n += b - a
            self._chunk_at = b
            self._fill_pos = self._chunk_base + b
        if not spans:
            return False
        for (k, base, chunk, a, _, _), docs in zip(spans, self._encode(spans)):
            for i, doc in enumerate(docs, start=a):
                self._queue.append((k, base + i + 1, doc, chunk.locs[i]))
        return True

    def _encode(self, spans: list[tuple]) -> list[list[np.ndarray | None]]:
        """The documents of each span's records (None: skipped, counted, named),
        with one tokenizer call for all spans."""
        out: list[list[np.ndarray | None]] = []
        todo: list[tuple[list[np.ndarray | None], int, Shard, Chunk, int, Any]] = []
        for _, _, chunk, a, b, shard in spans:
            values = chunk.values[a:b]
            good = [i for i, v in enumerate(values) if v is not None]
            for i, v in enumerate(values):
                if v is None:
                    self._skip(Skip(chunk.bad.get(a + i, "malformed"), bad=True), shard, chunk.locs[a + i])
            if self.spec.holdout > 0:
                good = [i for i in good
                        if self._in_holdout(shard, values[i], chunk.locs[a + i]) == self.spec.heldout_only]
            docs: list[np.ndarray | None] = [None] * len(values)
            out.append(docs)
            for i in good:
                if shard.tokenized:
                    docs[i] = values[i]
                else:
                    todo.append((docs, i, shard, chunk, a, values[i]))
        encoded = self._encode_values([t[-1] for t in todo]) if todo else []
        for (docs, i, shard, chunk, a, _), doc in zip(todo, encoded):
            if isinstance(doc, Skip):
                self._skip(doc, shard, chunk.locs[a + i])
            else:
                docs[i] = doc
        return out

    def _encode_values(self, values: list[Any]) -> list[np.ndarray | Skip]:
        try:
            return self.encoder.encode_batch(values)
        except Exception:  # the tokenizer refused the batch: find the record(s) it refuses
            out: list[np.ndarray | Skip] = []
            for v in values:
                try:
                    out.extend(self.encoder.encode_batch([v]))
                except Exception as e:
                    out.append(Skip(f"the tokenizer refused it ({type(e).__name__}: {e})", bad=True))
            return out

    def _in_holdout(self, shard: Shard, value: Any, loc: int) -> bool:
        if shard.tokenized:
            hashes = shard.holdout_hashes(np.array([loc]))
            if hashes is None:
                raise DataError(f"[eval] source {self.spec.name!r}: token shard {shard.path} has no content "
                                "hashes, so no hash holdout can be carved out of it; hold out a separate "
                                "[eval] dataset instead")
            return bool(hashes[0] < self.spec.holdout)
        return in_holdout(value, self.spec.holdout)

    def _skip(self, skip: Skip, shard: Shard, loc: int) -> None:
        if not skip.bad:
            self.refused[skip.reason] = self.refused.get(skip.reason, 0) + 1
            n = sum(self.refused.values())
            if n <= _MAX_WARNINGS_PER_SOURCE or n & (n - 1) == 0:  # first few, then at powers of 2
                logger.warning(
                    f"[sft] source {self.spec.name!r} (reader {self.reader}): skipping sample at "
                    f"{shard.locate(loc)}: {skip.reason}; skipped so far: {dict(self.refused)}"
                )
            return
        if self.bad_records == "error":
            raise DataError(f"[data] source {self.spec.name!r}: bad record at {shard.locate(loc)}: "
                            f"{skip.reason}; fix the record or set [data] bad_records = \"skip\"")
        self.bad_count += 1
        if self.bad_count <= _MAX_WARNINGS_PER_SOURCE:
            logger.warning(f"[data] source {self.spec.name!r}: skipping bad record at "
                           f"{shard.locate(loc)}: {skip.reason}")

    def _new_epoch(self) -> None:
        self.epoch += 1
        if self.custom and min(self.custom) < self.epoch:
            self.custom = {e: c for e, c in self.custom.items() if e >= self.epoch}
            self._custom_state = {str(e): c for e, c in self._custom_state.items() if int(e) >= self.epoch}
        self.k = self.pos = 0
        self._mine = self._my_ranges(self.epoch)
        self._queue.clear()
        self._seek(0, 0)
        logger.info(
            f"[data] source {self.spec.name!r} (reader {self.reader}): epoch "
            f"{self.epoch + 1} begins{' (reshuffled)' if self.shuffle else ''}"
        )

    def next_document(self) -> np.ndarray | None:
        while True:
            if not self._queue and not self._fill():
                if self.spec.on_exhaustion == "drop" or len(self.plan) == 0:
                    self.k, self.pos = len(self._mine), 0
                    return None
                if not self._produced:  # restarting would loop forever
                    logger.warning(
                        f"[data] source {self.spec.name!r} (reader {self.reader}): a whole epoch gave "
                        "no document (every record of its part held out, malformed or refused, or the "
                        "part is empty); leaving the mixture"
                    )
                    return None
                self._produced = False
                self._new_epoch()
                continue
            if not self._queue:
                continue
            k, pos, doc, loc = self._queue.popleft()
            self.k, self.pos = k, pos
            if doc is not None and len(doc):
                self._produced = True
                self.last_id = (self.epoch, int(self._mine[k]), loc)
                return doc
