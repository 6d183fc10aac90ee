"""Token shards: a source tokenized once, offline, read back memory-mapped.

Layout (datatrove's ``DocumentTokenizer`` format, so folders move both ways
between datatrove and us). A folder holds, per shard ``NNNNN.ds``:

- ``NNNNN.ds``: the documents' token ids back to back, little-endian
  ``uint16`` when the tokenizer's vocabulary has at most 65536 entries, else
  ``uint32`` (datatrove's rule: ``token_size = 4 if vocab > 65536 else 2``);
- ``NNNNN.ds.index``: little-endian ``uint64``, one per document: the end of
  that document in tokens (exclusive); document ``i`` is
  ``ds[index[i-1]:index[i]]`` with ``index[-1] = 0``;
- ``NNNNN.ds.metadata``: text, datatrove's: ``"{tokenizer name}|{token
  size in bytes}"``, the token count, the count in words (e.g. ``1.2 MT``);
- ``NNNNN.ds.hash`` (ours, datatrove ignores it): little-endian ``uint64``
  per document, BLAKE2b-64 of the document's text as
  :func:`ext.data.holdout.holdout_hash` computes it, so a hash holdout keeps
  out exactly the documents it would keep out of the text source;

plus one ``ext_tokenized.json`` for the folder: the tokenizer's identity
(:func:`tokenizer_identity`), the BOS/EOS ids added to every document, the
dtype, the source, and per shard its document and token counts (what
:func:`open_token_folder` checks). Verified against datatrove's source
(``pipeline/tokens/tokenizer.py`` ``TokenizedFile``, ``merger.py``,
``utils/dataset.py`` ``DatatroveFolderDataset``, main branch, 2026-08): index
= ``struct.pack("<%sQ", *doc_ends)`` with ends counted in tokens; tokens
``"<H"``/``"<I"``; the metadata's first line ``name|token_size``; readers glob
``*.ds`` (our extra files do not match).

Documents are what the loader's :class:`ext.data.encoders.TextEncoder` makes
of the text: ``[BOS] + ids + [EOS]`` (each when given), ids encoded without
the tokenizer's own special tokens. Records are read with the loader's rules
(:mod:`ext.data.sources`): a jsonl line that is not JSON, lacks the text
field or whose field is not a string is a bad record (``bad_records``:
"skip" counts it, "error" stops); a txt file is one document per non-empty
line. Formats: .jsonl and .txt, each also gzip (.gz) or zstd (.zst)
compressed (read here: the loader's shard readers take neither compressed
kind), and .parquet.

Work is split by size: an uncompressed file into pieces of about
``chunk_bytes`` cut at line ends, a parquet file by row groups, a
compressed file is one piece. Each piece becomes one output shard, so the
output (names and bytes) is the same whatever the number of workers.
Everything is written into a hidden temporary folder next to the target
and renamed onto it at the end: the target either does not exist (or is
the empty folder it was) or is complete.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from ext.core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

METADATA_FILE = "ext_tokenized.json"
FORMAT = "datatrove-ds"
FORMAT_VERSION = 1
DEFAULT_CHUNK_BYTES = 64 << 20
_BATCH = 1024
_MAX_REPORTED_BAD = 10
# file suffix -> (kind, compression)
_SUFFIXES = {
    ".jsonl": ("jsonl", ""), ".jsonl.gz": ("jsonl", "gzip"), ".jsonl.zst": ("jsonl", "zstd"),
    ".txt": ("txt", ""), ".txt.gz": ("txt", "gzip"), ".txt.zst": ("txt", "zstd"),
    ".parquet": ("parquet", ""),
}


# ----------------------------------------------------------------------- identity


def tokenizer_identity(tokenizer: Any) -> str:
    """``"sha256:<hex>"`` of a ``tokenizers.Tokenizer``'s serialized JSON.

    The JSON is canonicalized (keys sorted) and stripped of what does not
    change the ids the loader encodes: ``truncation`` and ``padding`` (runtime
    settings) and ``post_processor`` (the loader encodes without special
    tokens and adds BOS/EOS itself; those ids are recorded separately). Two
    tokenizers with the same vocabulary, merges, normalizer, pre-tokenizer and
    added tokens have the same identity; a ``tokenizers`` release that changes
    its serialization could change it too (then tokenize again).
    """
    spec = json.loads(tokenizer.to_str())
    for key in ("truncation", "padding", "post_processor"):
        spec.pop(key, None)
    canonical = json.dumps(spec, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """datatrove's choice: uint16 for vocabularies of at most 65536 ids, else uint32."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


# ------------------------------------------------------------------------- reader


class TokenShard:
    """One ``.ds`` file (with its ``.ds.index``) as a shard of documents.

    ``len(shard)`` is the number of documents; ``nbytes`` the bytes of token
    data. Files are memory-mapped on the first :meth:`read` (after a
    DataLoader worker's fork), never read whole. ``dtype``: the token dtype
    (uint16/uint32); None reads it from the datatrove ``.ds.metadata`` file
    (``name|2`` or ``name|4``).
    """

    def __init__(self, path: str, dtype: np.dtype | str | None = None):
        self.path = path
        self.index_path = path + ".index"
        if dtype is None:
            dtype = _dtype_from_datatrove_metadata(path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        for p in (path, self.index_path):
            if not os.path.isfile(p):
                raise DataError(f"token shard {p} is missing; write the folder again with "
                                "`python -m ext.cli tokenize`")
        self._n_docs = os.path.getsize(self.index_path) // 8
        self.nbytes = os.path.getsize(path)
        self._data: np.ndarray | None = None
        self._ends: np.ndarray | None = None
        self._hashes: np.ndarray | None = None

    def __len__(self) -> int:
        return self._n_docs

    @property
    def n_tokens(self) -> int:
        return self.nbytes // self.dtype.itemsize

    def _open(self) -> None:
        # plain ndarray views of the maps: slicing a np.memmap subclass costs microseconds per slice
        n = self.n_tokens
        self._data = (np.memmap(self.path, self.dtype, "r", shape=(n,)).view(np.ndarray)
                      if n else np.zeros(0, self.dtype))
        self._ends = (np.memmap(self.index_path, "<u8", "r", shape=(self._n_docs,)).view(np.ndarray)
                      if self._n_docs else np.zeros(0, "<u8"))

    def bounds(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int64 (start, end) in tokens of each of ``rows`` (document numbers)."""
        if self._ends is None:
            self._open()
        assert self._ends is not None
        rows = np.asarray(rows, np.int64)
        ends = self._ends[rows].astype(np.int64)
        starts = np.where(rows > 0, self._ends[np.maximum(rows - 1, 0)].astype(np.int64), 0)
        return starts, ends

    def read(self, rows: np.ndarray) -> list[tuple[np.ndarray, str]]:
        """Each of ``rows``' tokens as an int32 array, with ``"{path}:doc {row}"``.

        ``rows``: document numbers in ``[0, len(self))``, any order, repeats
        allowed. Only those documents' tokens are read (and copied, to int32).
        """
        starts, ends = self.bounds(rows)
        data = self._data
        assert data is not None
        return [
            (data[s:e].astype(np.int32), f"{self.path}:doc {r}")
            for s, e, r in zip(starts.tolist(), ends.tolist(), np.asarray(rows).tolist())
        ]

    def holdout_hashes(self, rows: np.ndarray) -> np.ndarray | None:
        """float64 ``holdout_hash`` of each of ``rows``' text (what
        :func:`ext.data.holdout.in_holdout` compares), or None when the shard
        has no ``.ds.hash`` file (a folder written by datatrove)."""
        if self._hashes is None:
            path = self.path + ".hash"
            if not os.path.isfile(path):
                return None
            self._hashes = (np.memmap(path, "<u8", "r", shape=(self._n_docs,))
                            if self._n_docs else np.zeros(0, "<u8"))
        return self._hashes[np.asarray(rows, np.int64)].astype(np.float64) / float(2**64)


def _dtype_from_datatrove_metadata(path: str) -> np.dtype:
    meta = path + ".metadata"
    try:
        with open(meta) as f:
            first = f.readline().strip()
    except OSError:
        raise DataError(f"token shard {path}: no {os.path.basename(meta)} to tell uint16 from uint32; "
                        "give the dtype or write the folder again with `python -m ext.cli tokenize`") from None
    size = first.rpartition("|")[2]
    if size not in ("2", "4"):
        raise DataError(f"{meta}: first line {first!r} does not end in |2 or |4 (token size); "
                        "write the folder again with `python -m ext.cli tokenize`")
    return np.dtype("<u2") if size == "2" else np.dtype("<u4")


def read_token_metadata(path: str) -> dict[str, Any]:
    """The ``ext_tokenized.json`` of token folder ``path``; DataError (one line) when
    there is none or it is unreadable."""
    meta = os.path.join(path, METADATA_FILE)
    if not os.path.isfile(meta):
        has_ds = os.path.isdir(path) and any(n.endswith(".ds") for n in os.listdir(path))
        why = ("it holds .ds files but not the tokenizer identity (written by datatrove?), so the "
               "tokenizer cannot be checked; tokenize the source with `python -m ext.cli tokenize`"
               if has_ds else "it is not a token folder; write one with `python -m ext.cli tokenize`")
        raise DataError(f"token folder {path}: no {METADATA_FILE}; {why}")
    try:
        with open(meta) as f:
            info = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"{meta} is unreadable ({' '.join(str(exc).split())}); "
                        "write the folder again with `python -m ext.cli tokenize`") from None
    if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{meta}: format {info.get('format')!r} version {info.get('format_version')!r}, "
                        f"expected {FORMAT!r} version {FORMAT_VERSION}; write the folder again")
    return info


def open_token_folder(
    path: str,
    tokenizer_id: str,
    encoding: tuple[int | None, int | None] | None = None,
) -> list[TokenShard]:
    """The shards of token folder ``path``, in order, after checking them.

    ``tokenizer_id``: :func:`tokenizer_identity` of the tokenizer training
    uses. ``encoding``: the (BOS id, EOS id) the loader would add to each
    document (None for "none"); when given, a folder written with other ones
    is refused too (``None`` as a whole: not checked).

    Raises DataError with one line (what, where, the fix) when the folder has
    no readable ``ext_tokenized.json``, was written with another tokenizer or
    other BOS/EOS, or a shard file is missing or its size disagrees with the
    counts recorded (a truncated copy: e.g. the index ends past the data).
    Reads only file sizes and each index's last entry.
    """
    info = read_token_metadata(path)
    tok = info["tokenizer"]
    if tok["id"] != tokenizer_id:
        raise DataError(
            f"token folder {path} was written with another tokenizer ({tok['name']!r}, {tok['id'][:19]}) "
            f"than the configured one ({tokenizer_id[:19]}); tokenize the source again with this config: "
            f"python -m ext.cli tokenize SOURCE --out NEW_DIR --job.config_file CONFIG"
        )
    if encoding is not None and (info["bos_id"], info["eos_id"]) != tuple(encoding):
        raise DataError(
            f"token folder {path} has documents wrapped in BOS {info['bos_id']} / EOS {info['eos_id']} "
            f"but the config adds BOS {encoding[0]} / EOS {encoding[1]} ([data] add_bos/add_eos); "
            "match them or tokenize the source again with this config"
        )
    dtype = np.dtype(info["dtype"])
    shards = []
    for entry in info["shards"]:
        shard_path = os.path.join(path, entry["file"])
        shard = TokenShard(shard_path, dtype)
        if len(shard) != entry["documents"] or shard.n_tokens != entry["tokens"] \
                or shard.nbytes % dtype.itemsize:
            raise DataError(
                f"token shard {shard_path} holds {len(shard)} documents / {shard.nbytes} bytes but "
                f"{METADATA_FILE} records {entry['documents']} / {entry['tokens'] * dtype.itemsize} "
                "(truncated or replaced); copy or write the folder again"
            )
        if len(shard):
            _, end = shard.bounds(np.array([len(shard) - 1]))
            if int(end[0]) != shard.n_tokens:
                raise DataError(
                    f"token shard {shard_path}: its index ends at token {int(end[0])} but the data holds "
                    f"{shard.n_tokens} tokens (truncated or corrupt); copy or write the folder again"
                )
        shards.append(shard)
    return shards


# ------------------------------------------------------------------------- writer


@dataclass(frozen=True)
class _Piece:
    """One unit of work, one output shard: a byte range of a line file, a run of
    parquet row groups, or a whole compressed file."""

    number: int
    path: str
    kind: str  # jsonl | txt | parquet
    compression: str  # "" | gzip | zstd
    start: int = 0  # byte range (uncompressed line files)
    end: int = -1
    first_line: int = 1  # 1-based number of the line at `start`
    row_groups: tuple[int, ...] = ()
    size: int = 0  # input bytes, for progress

    @property
    def label(self) -> str:
        if self.row_groups:
            return f"{self.path}[row groups {self.row_groups[0]}-{self.row_groups[-1]}]"
        if self.end >= 0:
            return f"{self.path}[bytes {self.start}-{self.end}]"
        return self.path


def _kind_of(path: str) -> tuple[str, str] | None:
    low = path.lower()
    for suffix, kc in sorted(_SUFFIXES.items(), key=lambda kv: -len(kv[0])):
        if low.endswith(suffix):
            return kc
    return None


def input_files(source: str) -> list[str]:
    """The data files of ``source`` (a file, a folder or a glob), sorted.

    A folder contributes its files with a supported suffix (not starting with
    "." or "_"); a glob its matches (``**`` recurses). ConfigError when there
    is none or a named file has an unsupported suffix.
    """
    supported = ", ".join(_SUFFIXES)
    if os.path.isfile(source):
        if _kind_of(source) is None:
            raise ConfigError(f"cannot tokenize {source!r}: unsupported file kind; use one of {supported}")
        return [source]
    if os.path.isdir(source):
        names = sorted(n for n in os.listdir(source) if not n.startswith((".", "_")))
        files = [os.path.join(source, n) for n in names
                 if os.path.isfile(os.path.join(source, n)) and _kind_of(n) is not None]
    elif glob.has_magic(source):
        files = sorted(f for f in glob.glob(source, recursive=True) if os.path.isfile(f) and _kind_of(f))
    else:
        raise ConfigError(f"{source!r} does not exist; give a data file, a folder or a glob")
    if not files:
        raise ConfigError(f"{source!r} holds no data files ({supported}); point at data files")
    return files


def _line_pieces(path: str, chunk_bytes: int, number: int) -> list[_Piece]:
    """Cut an uncompressed line file into ranges of about ``chunk_bytes`` ending at newlines."""
    size = os.path.getsize(path)
    kind = _kind_of(path)[0]  # type: ignore[index]
    if size <= chunk_bytes:
        return [_Piece(number, path, kind, "", 0, size, 1, size=size)]
    data = np.memmap(path, np.uint8, "r")
    pieces, start, line = [], 0, 1
    while start < size:
        target = start + chunk_bytes
        if target >= size:
            end = size
        else:
            nl = np.flatnonzero(data[target : target + (1 << 20)] == 10)
            probe = target
            while not len(nl) and probe < size:  # a line longer than 1 MiB
                probe += 1 << 20
                nl = np.flatnonzero(data[probe : probe + (1 << 20)] == 10)
                if len(nl):
                    nl = nl + (probe - target)
            end = size if not len(nl) else target + int(nl[0]) + 1
        pieces.append(_Piece(number + len(pieces), path, kind, "", start, end, line, size=end - start))
        line += int(np.count_nonzero(data[start:end] == 10))
        start = end
    del data
    return pieces


def _parquet_pieces(path: str, chunk_bytes: int, number: int) -> list[_Piece]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    pieces: list[_Piece] = []
    groups: list[int] = []
    size = 0
    for g in range(meta.num_row_groups):
        groups.append(g)
        size += meta.row_group(g).total_byte_size
        if size >= chunk_bytes:
            pieces.append(_Piece(number + len(pieces), path, "parquet", "", row_groups=tuple(groups), size=size))
            groups, size = [], 0
    if groups or not pieces:
        pieces.append(_Piece(number + len(pieces), path, "parquet", "", row_groups=tuple(groups), size=size))
    return pieces


def plan_pieces(files: list[str], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[_Piece]:
    """Work units, in output order (file order, then position in the file)."""
    pieces: list[_Piece] = []
    for path in files:
        kind, compression = _kind_of(path)  # type: ignore[misc]
        if kind == "parquet":
            pieces += _parquet_pieces(path, chunk_bytes, len(pieces))
        elif compression:
            pieces.append(_Piece(len(pieces), path, kind, compression, size=os.path.getsize(path)))
        else:
            pieces += _line_pieces(path, chunk_bytes, len(pieces))
    return pieces


def _open_stream(path: str, compression: str) -> Any:
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        import pyarrow as pa  # zstd without another dependency

        return pa.CompressedInputStream(pa.OSFile(path, "rb"), "zstd")
    return open(path, "rb")


def _lines(piece: _Piece) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes without the newline) of the piece's non-empty lines."""
    line = piece.first_line
    if not piece.compression:
        with open(piece.path, "rb") as f:
            f.seek(piece.start)
            blob = f.read(piece.end - piece.start)
        for raw in blob.split(b"\n"):
            if raw:
                yield line, raw
            line += 1
        return
    rest = b""
    with _open_stream(piece.path, piece.compression) as f:
        while True:
            block = f.read(16 << 20)
            if not block:
                break
            parts = (rest + block).split(b"\n")
            rest = parts.pop()
            for raw in parts:
                if raw:
                    yield line, raw
                line += 1
    if rest:
        yield line, rest


def _records(piece: _Piece, text_field: str) -> Iterator[tuple[Any, str]]:
    """(field value or None when malformed, where / why) of each record of the piece,
    with the loader's rules (:class:`ext.data.sources.LineShard`, ``ArrowShard``)."""
    if piece.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(piece.path)
        if text_field not in pf.schema_arrow.names:
            raise DataError(f"{piece.path} has no field {text_field!r} (columns: {pf.schema_arrow.names}); "
                            "set [data] text_fields or --text-field")
        row = sum(pf.metadata.row_group(g).num_rows for g in range(piece.row_groups[0])) if piece.row_groups else 0
        for batch in pf.iter_batches(row_groups=list(piece.row_groups), columns=[text_field]):
            for value in batch.column(0).to_pylist():
                where = f"{piece.path}[{row}]"
                yield (value, where) if value is not None else (None, f"{where}: field {text_field!r} is empty")
                row += 1
        return
    for line, raw in _lines(piece):
        where = f"{piece.path}:{line}"
        if piece.kind == "txt":
            yield raw.decode("utf-8", errors="replace"), where
            continue
        try:
            record = json.loads(raw)
        except ValueError as e:
            yield None, f"{where}: not valid JSON ({getattr(e, 'msg', e)})"
            continue
        value = record.get(text_field) if isinstance(record, dict) else None
        yield (value, where) if value is not None else (None, f"{where}: no field {text_field!r}")


@dataclass(frozen=True)
class _Job:
    """What every worker needs (picklable: the tokenizer travels as its JSON)."""

    tokenizer_json: str
    bos_id: int | None
    eos_id: int | None
    dtype: str
    text_field: str
    bad_records: str
    out_dir: str
    tokenizer_name: str


@dataclass
class _PieceResult:
    number: int
    file: str
    source: str
    documents: int
    tokens: int
    records: int
    bad: int
    empty: int
    bad_examples: list[str]
    size: int


_WORKER: dict[str, Any] = {}


def _init_worker(job: _Job) -> None:
    from tokenizers import Tokenizer

    from ext.data.encoders import TextEncoder

    _WORKER["job"] = job
    _WORKER["encoder"] = TextEncoder(Tokenizer.from_str(job.tokenizer_json), job.bos_id, job.eos_id)


def _metric(n: int) -> str:
    """A count in words, as datatrove's metadata third line (``humanize.metric(n, "T")``)."""
    for power, prefix in ((12, "T"), (9, "G"), (6, "M"), (3, "k")):
        if n >= 10**power:
            return f"{n / 10**power:.3g} {prefix}T"
    return f"{n} T"


def _write_piece(piece: _Piece) -> _PieceResult:
    """Tokenize one piece into ``{number:05d}.ds`` (+ .index, .hash, .metadata) in the job's folder."""
    from ext.data.encoders import Skip

    job: _Job = _WORKER["job"]
    encoder = _WORKER["encoder"]
    dtype = np.dtype(job.dtype)
    limit = np.iinfo(dtype).max
    name = f"{piece.number:05d}.ds"
    base = os.path.join(job.out_dir, name)
    ends: list[np.ndarray] = []
    hashes: list[int] = []
    written = records = bad = empty = 0
    examples: list[str] = []

    def flush(batch: list[tuple[Any, str]], out: Any) -> None:
        nonlocal written, records, bad, empty
        records += len(batch)
        docs: list[Any] = [Skip("", bad=True)] * len(batch)
        good = [i for i, (v, _) in enumerate(batch) if v is not None]
        for i, doc in zip(good, encoder.encode_batch([batch[i][0] for i in good])):
            docs[i] = doc
        keep: list[np.ndarray] = []
        for (value, where), doc in zip(batch, docs):
            if isinstance(doc, Skip):
                why = f"{where}: {doc.reason}" if doc.reason else where
                if job.bad_records == "error":
                    raise DataError(f"bad record at {why}; fix the record or set [data] bad_records = \"skip\"")
                bad += 1
                if len(examples) < _MAX_REPORTED_BAD:
                    examples.append(why)
                continue
            if not len(doc):  # the loader skips empty documents too
                empty += 1
                continue
            keep.append(doc)
            hashes.append(_blake2b64(value))
        if not keep:
            return
        flat = np.concatenate(keep)
        if flat.size and (int(flat.max()) > limit or int(flat.min()) < 0):
            raise DataError(f"{piece.label}: token id {int(flat.max())} does not fit {dtype.name}")
        out.write(flat.astype(dtype).tobytes())
        lengths = np.fromiter((len(d) for d in keep), np.uint64, len(keep))
        ends.append(written + np.cumsum(lengths, dtype=np.uint64))
        written += int(flat.size)

    with open(base, "wb") as out:
        batch: list[tuple[Any, str]] = []
        for item in _records(piece, job.text_field):
            batch.append(item)
            if len(batch) == _BATCH:
                flush(batch, out)
                batch = []
        if batch:
            flush(batch, out)
        out.flush()
        os.fsync(out.fileno())
    index = np.concatenate(ends).astype("<u8") if ends else np.zeros(0, "<u8")
    _write_file(base + ".index", index.tobytes())
    _write_file(base + ".hash", np.asarray(hashes, "<u8").tobytes())
    _write_file(base + ".metadata",
                f"{job.tokenizer_name}|{dtype.itemsize}\n{written}\n{_metric(written)}".encode())
    return _PieceResult(piece.number, name, piece.label, len(index), written, records, bad, empty,
                        examples, piece.size)


def _blake2b64(text: str) -> int:
    """The integer behind :func:`ext.data.holdout.holdout_hash` of a string (hash / 2**64)."""
    data = text.encode("utf-8", errors="surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _check_out(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(f"--out {out!r} exists and is not an empty folder; give a new or empty folder "
                          "(nothing was written)")


def tokenize_source(
    source: str,
    out: str,
    tokenizer: Any,
    *,
    tokenizer_name: str,
    bos_id: int | None,
    eos_id: int | None,
    text_field: str = "text",
    bad_records: str = "skip",
    workers: int = 1,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Callable[[int, int, int], None] | None = None,
) -> dict[str, Any]:
    """Tokenize every record of ``source`` into the token folder ``out``.

    ``source``: a file, folder or glob (:func:`input_files`). ``tokenizer``: a
    ``tokenizers.Tokenizer``; ``tokenizer_name`` (its path or Hub name) goes
    into the metadata; ``bos_id``/``eos_id`` (None: none) wrap every document
    exactly as the loader's TextEncoder does. ``workers`` processes (spawned;
    1: in this process) tokenize pieces of about ``chunk_bytes`` input bytes,
    one output shard each; the output does not depend on ``workers``.
    ``progress(done_bytes, total_bytes, tokens)`` is called as pieces finish.

    ``out`` must not exist or be an empty folder (ConfigError otherwise). It
    appears complete, renamed from a temporary folder beside it, or not at
    all: on any error the temporary folder is removed. Returns the
    ``ext_tokenized.json`` written. Raises DataError (one line) for a bad
    record under ``bad_records = "error"`` or an unreadable input.
    """
    if bad_records not in ("skip", "error"):
        raise ConfigError(f"[data] bad_records = {bad_records!r}: use \"skip\" or \"error\"")
    if workers < 1:
        raise ConfigError(f"--workers {workers}: must be >= 1")
    out = os.path.abspath(out)
    _check_out(out)
    files = input_files(source)
    pieces = plan_pieces(files, chunk_bytes)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.tmp-")
    job = _Job(tokenizer.to_str(), bos_id, eos_id, dtype.str, text_field, bad_records, tmp, tokenizer_name)
    total = sum(p.size for p in pieces)
    results: list[_PieceResult] = []
    try:
        done = tokens = 0
        if workers == 1 or len(pieces) == 1:
            saved = dict(_WORKER)
            _init_worker(job)
            try:
                for piece in pieces:
                    results.append(_write_piece(piece))
                    done, tokens = done + piece.size, tokens + results[-1].tokens
                    if progress:
                        progress(done, total, tokens)
            finally:
                _WORKER.clear()
                _WORKER.update(saved)
        else:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")  # no fork after torch/tokenizers threads
            with ctx.Pool(min(workers, len(pieces)), initializer=_init_worker, initargs=(job,)) as pool:
                for result in pool.imap_unordered(_write_piece, pieces):
                    results.append(result)
                    done, tokens = done + result.size, tokens + result.tokens
                    if progress:
                        progress(done, total, tokens)
        results.sort(key=lambda r: r.number)
        info = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "layout": ("datatrove DocumentTokenizer: NNNNN.ds = little-endian token ids, NNNNN.ds.index = "
                       "uint64 document end offsets in tokens, NNNNN.ds.metadata = 'name|token_size', "
                       "token count; NNNNN.ds.hash = uint64 BLAKE2b-64 of each document's text (holdout)"),
            "tokenizer": {"name": tokenizer_name, "id": tokenizer_identity(tokenizer), "vocab_size": vocab},
            "bos_id": bos_id,
            "eos_id": eos_id,
            "dtype": dtype.name,
            "source": source,
            "text_field": text_field,
            "records": sum(r.records for r in results),
            "bad_records": sum(r.bad for r in results),
            "empty_documents": sum(r.empty for r in results),
            "documents": sum(r.documents for r in results),
            "tokens": sum(r.tokens for r in results),
            "shards": [{"file": r.file, "source": r.source, "documents": r.documents, "tokens": r.tokens}
                       for r in results],
        }
        for r in results:
            for why in r.bad_examples:
                logger.warning(f"skipped bad record at {why}")
        _write_file(os.path.join(tmp, METADATA_FILE), (json.dumps(info, indent=1) + "\n").encode())
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp made it 0700
        try:
            os.rename(tmp, out)  # atomic; replaces an empty folder
        except OSError as exc:
            raise ConfigError(f"--out {out!r} could not be created ({exc.strerror}); it must be a new or "
                              "empty folder (nothing was written)") from None
        _fsync_dir(parent)
        return info
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def summary_line(info: dict[str, Any], out: str) -> str:
    """One line describing a written token folder (what the CLI prints)."""
    bad = f", {info['bad_records']} bad record(s) skipped" if info["bad_records"] else ""
    return (f"{out}: {info['documents']:,} documents, {info['tokens']:,} tokens ({info['dtype']}) in "
            f"{len(info['shards'])} shard(s), tokenizer {info['tokenizer']['name']!r}{bad}")


__all__ = [
    "METADATA_FILE", "TokenShard", "input_files", "open_token_folder", "plan_pieces",
    "read_token_metadata", "summary_line", "token_dtype", "tokenize_source", "tokenizer_identity",
]
