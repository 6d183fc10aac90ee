"""Pack tokenized documents into fixed-length training rows.

Two packers share one output format (:class:`PackedRows`):

``"bfd"`` -- best-fit-decreasing, after Ding et al., "Fewer Truncations Improve
Language Modeling" (arXiv 2404.10830):

1. A document longer than the row capacity ``C`` is split into
   ``ceil(len / C)`` consecutive chunks of at most ``C`` tokens (all but the last
   one full). This is the only cut a document ever gets; every document of at
   most ``C`` tokens lands whole in one row. Exception: a document of
   ``k * C + 1`` tokens would end in a chunk of one token (its EOS), which
   trains nothing (the first token of a segment is never a label) and, in a
   row's last column, is not even an input; there the last two chunks are
   ``C - 1`` and 2 tokens, so the EOS is predicted from the token before it.
   (Chunks do not overlap: each token is delivered once; the label across a
   chunk boundary is lost, one per cut, as in the paper.)
2. Chunks are sorted by length, longest first (stable: ties keep buffer order).
3. Each chunk of length ``s`` goes into the open bin with the smallest remaining
   capacity ``r >= s``; a new bin of capacity ``C`` is opened when none fits.
   Among bins with equal remaining capacity the one that reached that capacity
   first wins (a FIFO per capacity). The search is ``O(log C)``: a max segment
   tree over capacities ``1..C`` whose leaf ``c`` holds ``c`` while at least one
   open bin has exactly ``c`` free slots (else 0); the query is "leftmost leaf
   with value >= s". A bin with no free slot is full and leaves the structure.
4. Every bin becomes a row, in bin-creation order; inside a row the chunks lie
   in placement order, and the tail is padded with ``pad_id``.

``"greedy"`` -- concatenate-and-chunk, what torchtitan's text loader does: the
documents of the buffer are concatenated in buffer order and cut every ``C``
tokens. Each piece of a document that lands in a different row is its own
segment.

Design decision -- no carry-over between buffers: all bins (``"bfd"``) and the
last partial row (``"greedy"``) are emitted when a buffer is packed. Carrying
open bins over would make a row depend on two buffers (and on the order in which
workers/ranks see them), complicating checkpoint/resume of the loader and
mixture accounting; the price is some padding per buffer, which
``benchmarks/packing.py`` measures (well under 1% for ``"bfd"`` with buffers of
10k web documents).

Rows hold ``C = seq_len + 1`` tokens: the trainer uses ``row[:-1]`` as input and
``row[1:]`` as labels (:func:`rows_to_batch`).

Performance: the bin assignment is a sequential Python loop over chunks (one
segment-tree query/update per chunk, no per-token Python work); everything per
token (chunking, scattering tokens, segment ids, document indices, labels,
positions) is vectorized numpy.
"""

from __future__ import annotations

from array import array
from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np

IGNORE_INDEX = -100
"""Label value of positions that must not be trained on (PyTorch's default ``ignore_index``)."""

PackMethod = Literal["bfd", "greedy"]


@dataclass
class PackedRows:
    """Rows packed from one buffer of documents (``n_rows`` rows of ``C`` tokens).

    Per-row arrays:
      tokens:      int32 ``[n_rows, C]``; token ids, the tail after ``n_valid`` is ``pad_id``.
      segment_ids: int32 ``[n_rows, C]``; ``0..k-1`` for the ``k`` segments (document pieces)
                   of the row in layout order; the padding tail, if any, is one extra
                   segment with id ``k``.
      n_valid:     int32 ``[n_rows]``; number of real tokens (they precede the padding).
      doc_index:   int32 ``[n_rows, C]``; index of the source document in the input buffer
                   for each token, ``-1`` on padding.

    Buffer statistics (zero-length documents are ignored and not counted):
      n_docs:        non-empty documents packed.
      n_cut_docs:    documents split over more than one row.
      n_long_docs:   documents longer than ``C``.
      n_tokens:      real tokens (``n_valid.sum()``).
      n_pad:         padding tokens (``n_rows * C - n_tokens``).
      source_tokens: int64 ``[n_sources]``; real tokens per source id.
    """

    tokens: np.ndarray
    segment_ids: np.ndarray
    n_valid: np.ndarray
    doc_index: np.ndarray
    n_docs: int
    n_cut_docs: int
    n_long_docs: int
    n_tokens: int
    n_pad: int
    source_tokens: np.ndarray

    @property
    def n_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def capacity(self) -> int:
        return int(self.tokens.shape[1])


# ---------------------------------------------------------------------------
# Best-fit-decreasing bin assignment
# ---------------------------------------------------------------------------


def _best_fit_decreasing(sizes: np.ndarray, capacity: int) -> tuple[np.ndarray, int]:
    """Assign items (sorted by size, descending, each ``1 <= size <= capacity``) to bins.

    Each item goes to the open bin with the smallest free space that fits it (ties:
    the bin that reached that free space first), else to a new bin.
    Returns ``(dest, n_bins)``: ``dest`` int64 ``[n_items]`` is the flat position
    ``bin * capacity + offset`` where each item starts, bins numbered in creation
    order and items laid out in each bin in placement order.
    """
    C = capacity
    n = int(sizes.shape[0])
    dest = np.empty(n, dtype=np.int64)
    # Fast path: items of exactly C come first (sorted) and each fills a new bin alone.
    n_full = int(np.searchsorted(-sizes, -C, side="right"))
    dest[:n_full] = np.arange(n_full, dtype=np.int64) * C
    if n_full == n:
        return dest, n_full

    size = 1
    while size <= C:  # leaves 0..C (leaf 0 unused, always 0)
        size <<= 1
    tree = [0] * (2 * size)
    fifos: list[deque[int] | None] = [None] * (C + 1)
    out = array("q", bytes(8 * (n - n_full)))
    n_bins = n_full
    k = 0
    # memoryview iteration yields Python ints without building a list.
    for s in memoryview(np.ascontiguousarray(sizes[n_full:], dtype=np.int64)):
        if tree[1] >= s:
            # Leftmost leaf with value >= s: the smallest open capacity that fits.
            i = 1
            while i < size:
                i <<= 1
                if tree[i] < s:
                    i += 1
            r = i - size
            q = fifos[r]
            b = q.popleft()  # type: ignore[union-attr]
            if not q:
                # No bin left with r free: clear leaf r, propagate until the max is unchanged.
                tree[i] = 0
                i >>= 1
                while i:
                    right = tree[2 * i + 1]
                    m = right if right else tree[2 * i]  # leaf value = capacity: right wins
                    if tree[i] == m:
                        break
                    tree[i] = m
                    i >>= 1
            out[k] = b * C + C - r
            r -= s
        else:
            b = n_bins
            n_bins += 1
            out[k] = b * C
            r = C - s
        k += 1
        if r:
            q = fifos[r]
            if q is None:
                q = fifos[r] = deque()
            if not q:
                i = size + r
                tree[i] = r
                i >>= 1
                while i and tree[i] < r:
                    tree[i] = r
                    i >>= 1
            q.append(b)
    dest[n_full:] = np.frombuffer(out, dtype=np.int64)
    return dest, n_bins


# ---------------------------------------------------------------------------
# Row assembly (vectorized)
# ---------------------------------------------------------------------------


_GATHER_BLOCK = 1 << 20  # tokens per gather block (an 8 MiB int64 index)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` over pairs ``(s, n)`` with ``n >= 1`` (int64).

    Vectorized as a cumulative sum of steps: +1 inside a range, a jump at each range start.
    """
    total = int(lengths.sum())
    step = np.ones(total, dtype=np.int64)
    if total == 0:
        return step
    first = np.cumsum(lengths) - lengths  # where each range begins in the output
    step[0] = starts[0]
    step[first[1:]] = starts[1:] - (starts[:-1] + lengths[:-1]) + 1
    return np.cumsum(step, out=step)


def _assemble(
    tokens: np.ndarray,
    src: np.ndarray,
    length: np.ndarray,
    doc: np.ndarray,
    dest: np.ndarray,
    n_rows: int,
    C: int,
    pad_id: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Copy pieces ``tokens[src:src+length]`` to flat row positions ``dest``.

    Pieces (``length >= 1``) must be sorted by ``dest`` and fill each row from
    column 0 without gaps, so that the real tokens of the rows, read row-major,
    are the pieces in order. Every row must get at least one piece.
    Returns ``(tokens, segment_ids, n_valid, doc_index)`` as in :class:`PackedRows`.
    """
    n_valid = np.zeros(n_rows, dtype=np.int32)
    if n_rows == 0:
        empty = np.zeros((0, C), dtype=np.int32)
        return empty, empty.copy(), n_valid, empty.copy()
    n = dest.shape[0]
    row = dest // C
    col = dest - row * C
    # First/last piece of each row; rank of each piece (= its segment id) in its row.
    new_row = np.empty(n, dtype=bool)
    new_row[0] = True
    np.not_equal(row[1:], row[:-1], out=new_row[1:])
    last = np.empty(n, dtype=bool)
    last[:-1] = new_row[1:]
    last[-1] = True
    n_valid[row[last]] = (col + length)[last]
    piece = np.arange(n, dtype=np.int64)
    rank = piece - np.maximum.accumulate(np.where(new_row, piece, 0))

    # The padding tail of a row is one more piece: doc -1, segment id = pieces in the row.
    pad_rows = np.flatnonzero(n_valid < C)
    pad_dest = pad_rows * C + n_valid[pad_rows]
    pad_len = C - n_valid[pad_rows].astype(np.int64)
    if pad_rows.shape[0]:
        order = np.argsort(np.concatenate((dest, pad_dest)), kind="stable")  # merge 2 sorted runs
        all_len = np.concatenate((length, pad_len))[order]
        all_doc = np.concatenate((doc, np.full(pad_rows.shape[0], -1, dtype=doc.dtype)))[order]
        all_rank = np.concatenate((rank, (rank[last] + 1)[pad_rows]))[order]
        all_src = np.concatenate((src, np.zeros(pad_rows.shape[0], dtype=src.dtype)))[order]
    else:
        all_len, all_doc, all_rank, all_src = length, doc, rank, src

    doc_index = np.repeat(all_doc.astype(np.int32, copy=False), all_len).reshape(n_rows, C)
    seg = np.repeat(all_rank.astype(np.int32, copy=False), all_len).reshape(n_rows, C)

    total = int(length.sum())
    if int(dest[-1] + length[-1]) == total and bool(np.all(src[1:] == src[:-1] + length[:-1])):
        # Only the last row is padded and the pieces are contiguous in the source
        # (greedy packing): one copy.
        out = np.empty(n_rows * C, dtype=np.int32)
        out[:total] = tokens[src[0] : src[0] + total]
        out[total:] = pad_id
        return out.reshape(n_rows, C), seg, n_valid, doc_index
    # Gather over all positions (padding pieces read from source 0, clipped), then
    # overwrite the padding. Done in blocks of rows so that the int64 index array
    # stays small enough to be recycled by the allocator (no fresh page faults).
    out = np.empty(n_rows * C, dtype=np.int32)
    all_dest = np.cumsum(all_len) - all_len
    rows_per_block = max(1, _GATHER_BLOCK // C)
    for r0 in range(0, n_rows, rows_per_block):
        r1 = min(n_rows, r0 + rows_per_block)
        k0, k1 = np.searchsorted(all_dest, (r0 * C, r1 * C))
        np.take(tokens, _ranges(all_src[k0:k1], all_len[k0:k1]), mode="clip", out=out[r0 * C : r1 * C])
    if pad_rows.shape[0]:
        out[_ranges(pad_dest, pad_len)] = pad_id
    return out.reshape(n_rows, C), seg, n_valid, doc_index


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def pack_documents(
    tokens: np.ndarray,
    offsets: np.ndarray,
    capacity: int,
    pad_id: int,
    method: PackMethod,
    doc_source: np.ndarray | None = None,
    n_sources: int | None = None,
) -> PackedRows:
    """Pack a buffer of documents into rows of ``capacity`` (= ``seq_len + 1``) tokens.

    Args:
      tokens: 1-D integer array (int32 expected) holding all documents back to back.
      offsets: 1-D integer array of length ``n_docs + 1``, non-decreasing;
        document ``i`` is ``tokens[offsets[i]:offsets[i+1]]``. Empty documents are ignored.
      capacity: row length ``C >= 2``.
      pad_id: token id of the padding tail (must fit int32).
      method: ``"bfd"`` (best-fit-decreasing) or ``"greedy"`` (concatenate and chunk);
        see the module docstring.
      doc_source: optional non-negative integer array ``[n_docs]``: the data source
        of each document (default: all 0); only feeds ``source_tokens``.
      n_sources: optional minimum length of ``source_tokens``.

    Returns:
      :class:`PackedRows`. Zero rows (arrays of shape ``[0, C]``) when there are no tokens.
      Every real token appears exactly once; ``"bfd"`` cuts only documents longer
      than ``C`` (into ``ceil(len / C)`` pieces); ``"greedy"`` cuts every document
      that crosses a row boundary.
    """
    C = int(capacity)
    if C < 2:
        raise ValueError(f"capacity must be >= 2 (seq_len + 1), got {capacity}")
    if not np.iinfo(np.int32).min <= int(pad_id) <= np.iinfo(np.int32).max:
        raise ValueError(f"pad_id {pad_id} does not fit int32")
    if method not in ("bfd", "greedy"):
        raise ValueError(f"method must be 'bfd' or 'greedy', got {method!r}")
    tokens = np.asarray(tokens)
    offsets = np.asarray(offsets)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array, got {tokens.dtype} {tokens.shape}")
    if offsets.ndim != 1 or offsets.shape[0] < 1 or not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError("offsets must be a 1-D integer array of length n_docs + 1")
    offsets = offsets.astype(np.int64, copy=False)
    lengths = np.diff(offsets)
    if lengths.size and (lengths.min() < 0 or offsets[0] < 0 or offsets[-1] > tokens.shape[0]):
        raise ValueError("offsets must be non-decreasing and within tokens")
    n_in = int(lengths.shape[0])
    if doc_source is None:
        source = np.zeros(n_in, dtype=np.int64)
    else:
        source = np.asarray(doc_source)
        if source.shape != (n_in,) or not np.issubdtype(source.dtype, np.integer):
            raise ValueError(f"doc_source must be an integer array of shape ({n_in},)")
        if n_in and source.min() < 0:
            raise ValueError("doc_source ids must be non-negative")
    if tokens.dtype != np.int32:
        tokens = tokens.astype(np.int32)

    docs = np.flatnonzero(lengths)  # non-empty documents, buffer order
    doc_len = lengths[docs]
    doc_start = offsets[docs]
    n_tokens = int(doc_len.sum())
    source_tokens = np.bincount(
        source[docs], weights=doc_len, minlength=int(n_sources or 0)
    ).astype(np.int64)
    n_long = int(np.count_nonzero(doc_len > C))

    if method == "bfd":
        # 1. Chunk documents longer than C.
        n_chunks = (doc_len + (C - 1)) // C
        if n_long:
            piece_doc = np.repeat(docs, n_chunks)
            first = np.cumsum(n_chunks) - n_chunks
            j = np.arange(piece_doc.shape[0], dtype=np.int64) - np.repeat(first, n_chunks)
            piece_src = np.repeat(doc_start, n_chunks) + j * C
            piece_len = np.minimum(np.repeat(doc_len, n_chunks) - j * C, C)
            # A last chunk of one token (a document of k*C + 1 tokens: its EOS)
            # would train nothing; it takes the previous chunk's last token.
            k = np.repeat(n_chunks, n_chunks)
            lone = (np.repeat(doc_len % C == 1, n_chunks)) & (k > 1) & (C > 2)
            piece_len = piece_len - (lone & (j == k - 2)) + (lone & (j == k - 1))
            piece_src = piece_src - (lone & (j == k - 1))
        else:
            piece_doc, piece_src, piece_len = docs, doc_start, doc_len
        # 2. Sort by length, descending, stable.
        order = np.argsort(-piece_len, kind="stable")
        piece_doc, piece_src, piece_len = piece_doc[order], piece_src[order], piece_len[order]
        # 3. Best fit.
        dest, n_rows = _best_fit_decreasing(piece_len, C)
        # 4. Layout order: by destination.
        order = np.argsort(dest)
        piece_doc, piece_src, piece_len, dest = (
            piece_doc[order], piece_src[order], piece_len[order], dest[order]
        )
        n_cut = n_long
    else:
        # Position of each document in the concatenation, then split at row boundaries.
        pos = np.cumsum(doc_len) - doc_len
        first_row = pos // C
        last_row = (pos + doc_len - 1) // C
        n_pieces = last_row - first_row + 1
        n_rows = (n_tokens + C - 1) // C
        n_cut = int(np.count_nonzero(n_pieces > 1))
        if n_cut:
            piece_doc = np.repeat(docs, n_pieces)
            first = np.cumsum(n_pieces) - n_pieces
            j = np.arange(piece_doc.shape[0], dtype=np.int64) - np.repeat(first, n_pieces)
            rep_pos = np.repeat(pos, n_pieces)
            row_start = (np.repeat(first_row, n_pieces) + j) * C
            dest = np.maximum(row_start, rep_pos)
            piece_len = np.minimum(row_start + C, rep_pos + np.repeat(doc_len, n_pieces)) - dest
            piece_src = np.repeat(doc_start, n_pieces) + (dest - rep_pos)
        else:
            piece_doc, piece_src, piece_len, dest = docs, doc_start, doc_len, pos

    out_tok, seg, n_valid, out_doc = _assemble(
        tokens, piece_src, piece_len, piece_doc, dest, int(n_rows), C, int(pad_id)
    )
    return PackedRows(
        tokens=out_tok,
        segment_ids=seg,
        n_valid=n_valid,
        doc_index=out_doc,
        n_docs=int(docs.shape[0]),
        n_cut_docs=n_cut,
        n_long_docs=n_long,
        n_tokens=n_tokens,
        n_pad=int(n_rows) * C - n_tokens,
        source_tokens=source_tokens,
    )


def rows_to_batch(packed: PackedRows, reset_positions: bool) -> dict[str, np.ndarray]:
    """Turn all packed rows into model inputs at once (``L = C - 1 = seq_len``).

    Returns C-contiguous arrays of shape ``[n_rows, L]``:
      input:       int64, ``tokens[:, :-1]``.
      labels:      int64, ``tokens[:, 1:]`` where the next token is in the same segment
                   and is not padding, else ``-100`` (the last token of a document never
                   predicts the next document; padding is never a target).
      positions:   int64, ``0, 1, ...`` restarting at every segment start (the padding
                   tail included) when ``reset_positions``, else ``arange(L)`` per row.
      segment_ids: int32, ``segment_ids[:, :-1]``.
    """
    return _batch(packed.tokens, packed.segment_ids, packed.n_valid, reset_positions)


def _batch(
    tokens: np.ndarray, seg: np.ndarray, n_valid: np.ndarray, reset_positions: bool
) -> dict[str, np.ndarray]:
    n, C = tokens.shape
    L = C - 1
    inp = tokens[:, :-1].astype(np.int64)
    labels = tokens[:, 1:].astype(np.int64)
    segment_ids = np.ascontiguousarray(seg[:, :-1])
    # b: flat [n, L] index of each column j whose next token j+1 starts a new segment
    # (a new document piece, or the padding tail): its label is dropped.
    b = np.flatnonzero(seg[:, 1:] != seg[:, :-1])
    flat_labels = labels.reshape(-1)
    flat_labels[b] = IGNORE_INDEX
    # Inside the padding tail (columns j >= n_valid) nothing is a target either.
    nv = n_valid.astype(np.int64)
    tail = np.flatnonzero(nv < L)
    if tail.shape[0]:
        flat_labels[_ranges(tail * L + nv[tail], L - nv[tail])] = IGNORE_INDEX
    if reset_positions:
        # Segment starts (flat): every row start, and j + 1 after each boundary j
        # that is not the last column. Positions = running count reset to 0 at each.
        starts = np.concatenate((np.arange(n, dtype=np.int64) * L, b[b % L != L - 1] + 1))
        starts.sort()
        step = np.ones(n * L, dtype=np.int64)
        if starts.shape[0]:
            step[starts[0]] = 0
            step[starts[1:]] = 1 - np.diff(starts)
        positions = np.cumsum(step, out=step).reshape(n, L)
    else:
        positions = np.empty((n, L), dtype=np.int64)
        positions[:] = np.arange(L, dtype=np.int64)
    return {"input": inp, "labels": labels, "positions": positions, "segment_ids": segment_ids}
