"""Document packing (ext.data.packing): best-fit-decreasing and greedy concatenate-and-chunk.

Each test states one behaviour and checks it against an independent, brute-force
reference written with plain Python loops.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ext.data.packing import IGNORE_INDEX, PackedRows, pack_documents, rows_to_batch

PAD = -7  # distinct from every token id drawn below


def row_to_sample(
    tokens_row: np.ndarray, segment_ids_row: np.ndarray, n_valid: int, reset_positions: bool
) -> dict[str, np.ndarray]:
    """One row (``[C]`` tokens and segment ids, ``n_valid`` real tokens) as a sample.

    The reference for :func:`rows_to_batch`, one row at a time: ``input``/``labels``/
    ``positions`` int64 ``[C - 1]``, ``segment_ids`` int32 ``[C - 1]``. Written
    independently of it (per segment, not per token) so that the two check each other.
    """
    tok = np.asarray(tokens_row)
    seg = np.asarray(segment_ids_row)
    C = tok.shape[0]
    L = C - 1
    nv = int(n_valid)
    labels = np.full(L, IGNORE_INDEX, dtype=np.int64)
    positions = np.arange(L, dtype=np.int64)
    # Segment boundaries [b_k, b_{k+1}) over the full row.
    bounds = np.concatenate(([0], np.flatnonzero(np.diff(seg)) + 1, [C]))
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        if reset_positions:
            positions[a:min(b, L)] -= a
        if a < nv:  # a real segment: tokens a..b-2 predict a+1..b-1
            labels[a : b - 1] = tok[a + 1 : b]
    return {
        "input": tok[:-1].astype(np.int64),
        "labels": labels,
        "positions": positions,
        "segment_ids": seg[:-1].astype(np.int32),
    }


def make_buffer(rng: np.random.Generator, n_docs: int, max_len: int, p_empty: float = 0.05):
    """Random documents: (tokens int32, offsets int64, lengths list[int]); some empty."""
    lengths = rng.integers(1, max_len + 1, size=n_docs)
    lengths[rng.random(n_docs) < p_empty] = 0
    offsets = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = rng.integers(0, 1000, size=int(offsets[-1]), dtype=np.int32)
    return tokens, offsets, [int(x) for x in lengths]


def docs_of(tokens: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    return [tokens[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


def random_cases(n_cases: int, seed: int):
    """(tokens, offsets, lengths, C) for small capacities, where ties and long docs are common."""
    rng = np.random.default_rng(seed)
    for _ in range(n_cases):
        C = int(rng.integers(2, 24))
        n_docs = int(rng.integers(0, 40))
        yield (*make_buffer(rng, n_docs, max_len=int(rng.integers(1, 3 * C + 1))), C)


# --- brute-force references ------------------------------------------------------------


def reference_chunk_bounds(n: int, C: int) -> list[tuple[int, int]]:
    """ceil(n / C) consecutive chunks, all full but the last; a last chunk of
    one token (n = k*C + 1, C > 2) takes one more token from the chunk before."""
    k = math.ceil(n / C)
    if k == 0:
        return []
    lengths = [C] * (k - 1) + [n - C * (k - 1)]
    if k > 1 and lengths[-1] == 1 and C > 2:
        lengths[-2:] = [C - 1, 2]
    bounds, start = [], 0
    for length in lengths:
        bounds.append((start, start + length))
        start += length
    return bounds


def reference_bfd_rows(docs: list[list[int]], C: int) -> list[list[tuple[int, list[int]]]]:
    """Best-fit-decreasing by linear scan: rows as lists of (doc, piece tokens) in layout order.

    Ties between bins with the same free space go to the bin that reached that free
    space first (the packer's FIFO per capacity).
    """
    chunks = []
    for d, toks in enumerate(docs):
        for j, (start, stop) in enumerate(reference_chunk_bounds(len(toks), C)):
            chunks.append((d, toks[start:stop]))
    chunks.sort(key=lambda c: -len(c[1]))  # stable
    rows: list[list[tuple[int, list[int]]]] = []
    free: list[int] = []
    since: list[int] = []  # step at which each bin got its current free space
    for step, (d, piece) in enumerate(chunks):
        s = len(piece)
        fits = [b for b in range(len(rows)) if free[b] >= s]
        if fits:
            b = min(fits, key=lambda b: (free[b], since[b]))
        else:
            b = len(rows)
            rows.append([])
            free.append(C)
            since.append(step)
        rows[b].append((d, piece))
        free[b] -= s
        since[b] = step
    return rows


def reference_greedy_rows(docs: list[list[int]], C: int) -> list[list[tuple[int, list[int]]]]:
    """Concatenate in buffer order and cut every C tokens."""
    stream = [(d, t) for d, toks in enumerate(docs) for t in toks]
    rows = []
    for r in range(0, len(stream), C):
        row: list[tuple[int, list[int]]] = []
        for d, t in stream[r : r + C]:
            if row and row[-1][0] == d:
                row[-1][1].append(t)
            else:
                row.append((d, [t]))
        rows.append(row)
    return rows


def rows_as_lists(packed: PackedRows) -> list[list[tuple[int, list[int]]]]:
    """The packed rows as (doc, piece tokens) lists, read through doc_index and segment_ids."""
    out = []
    for r in range(packed.n_rows):
        row: list[tuple[int, list[int]]] = []
        prev_seg = None
        for c in range(packed.n_valid[r]):
            d, seg, t = int(packed.doc_index[r, c]), int(packed.segment_ids[r, c]), int(packed.tokens[r, c])
            if seg != prev_seg:
                row.append((d, []))
                prev_seg = seg
            row[-1][1].append(t)
        out.append(row)
    return out


def reference_sample(tokens: list[int], segs: list[int], n_valid: int, reset: bool) -> dict[str, list[int]]:
    """Labels/positions token by token, straight from the definitions."""
    L = len(tokens) - 1
    labels, positions = [], []
    pos = 0
    for j in range(L):
        same = segs[j + 1] == segs[j]
        labels.append(tokens[j + 1] if same and j + 1 < n_valid else IGNORE_INDEX)
        if j > 0 and segs[j] != segs[j - 1]:
            pos = 0
        positions.append(pos if reset else j)
        pos += 1
    return {"input": tokens[:-1], "labels": labels, "positions": positions, "segment_ids": segs[:-1]}


# --- layout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["bfd", "greedy"])
def test_every_document_token_appears_once_in_order(method):
    for tokens, offsets, lengths, C in random_cases(60, seed=1):
        packed = pack_documents(tokens, offsets, C, PAD, method)
        got: dict[int, list[int]] = {}
        for d, t in zip(packed.doc_index.ravel().tolist(), packed.tokens.ravel().tolist()):
            if d >= 0:
                got.setdefault(d, []).append(t)
        expected = {d: toks for d, toks in enumerate(docs_of(tokens, offsets)) if toks}
        assert got == expected


@pytest.mark.parametrize("method", ["bfd", "greedy"])
def test_rows_hold_at_most_c_tokens_and_pad_only_the_tail(method):
    for tokens, offsets, lengths, C in random_cases(60, seed=2):
        packed = pack_documents(tokens, offsets, C, PAD, method)
        n = packed.n_rows
        assert packed.tokens.shape == packed.segment_ids.shape == packed.doc_index.shape == (n, C)
        assert packed.tokens.dtype == packed.segment_ids.dtype == packed.doc_index.dtype == np.int32
        assert packed.n_valid.dtype == np.int32 and packed.n_valid.shape == (n,)
        for r in range(n):
            nv = int(packed.n_valid[r])
            assert 1 <= nv <= C
            assert (packed.doc_index[r, :nv] >= 0).all() and (packed.doc_index[r, nv:] == -1).all()
            assert (packed.tokens[r, nv:] == PAD).all() and (packed.tokens[r, :nv] != PAD).all()


def test_bfd_cuts_only_long_documents_into_ceil_len_over_c_pieces():
    for tokens, offsets, lengths, C in random_cases(60, seed=3):
        packed = pack_documents(tokens, offsets, C, PAD, "bfd")
        pieces: dict[int, list[int]] = {}
        for row in rows_as_lists(packed):
            for d, piece in row:
                pieces.setdefault(d, []).append(len(piece))
        for d, n in enumerate(lengths):
            if n == 0:
                assert d not in pieces
                continue
            assert pieces[d] == [b - a for a, b in reference_chunk_bounds(n, C)]


def test_segment_ids_number_the_pieces_of_each_row_and_the_padding_tail():
    for method in ("bfd", "greedy"):
        for tokens, offsets, lengths, C in random_cases(60, seed=4):
            packed = pack_documents(tokens, offsets, C, PAD, method)
            for r in range(packed.n_rows):
                docs = packed.doc_index[r].tolist()
                expected, k = [], 0
                for c in range(C):
                    if c > 0 and docs[c] != docs[c - 1]:
                        k += 1
                    expected.append(k)
                assert packed.segment_ids[r].tolist() == expected


def test_bfd_matches_brute_force_best_fit_decreasing():
    for tokens, offsets, lengths, C in random_cases(150, seed=5):
        packed = pack_documents(tokens, offsets, C, PAD, "bfd")
        assert rows_as_lists(packed) == reference_bfd_rows(docs_of(tokens, offsets), C)


def test_bfd_matches_brute_force_on_a_realistic_buffer():
    rng = np.random.default_rng(6)
    C = 257
    lengths = np.maximum(1, rng.lognormal(np.log(50), 1.0, size=600).astype(np.int64))
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    tokens = rng.integers(0, 1000, size=int(offsets[-1]), dtype=np.int32)
    packed = pack_documents(tokens, offsets, C, PAD, "bfd")
    assert rows_as_lists(packed) == reference_bfd_rows(docs_of(tokens, offsets), C)


def test_bfd_places_each_chunk_in_the_tightest_bin():
    # C=10, lengths 7, 6, 4, 3: 7 -> new bin (3 free), 6 -> new bin (4 free),
    # 4 -> the bin with exactly 4 free (not the first-fit one), 3 -> the bin with 3 free.
    tokens = np.arange(20, dtype=np.int32)
    offsets = np.array([0, 3, 10, 14, 20])  # docs of 3, 7, 4, 6 tokens
    packed = pack_documents(tokens, offsets, 10, PAD, "bfd")
    assert packed.doc_index.tolist() == [[1] * 7 + [0] * 3, [3] * 6 + [2] * 4]
    assert packed.n_pad == 0


def test_bfd_rows_follow_bin_creation_and_pieces_placement_order():
    # C=10, docs 2, 5, 4: sorted 5 (bin 0), 4 (bin 0, 1 free left), 2 (new bin 1).
    tokens = np.arange(11, dtype=np.int32)
    packed = pack_documents(tokens, np.array([0, 2, 7, 11]), 10, PAD, "bfd")
    assert packed.doc_index.tolist() == [[1] * 5 + [2] * 4 + [-1], [0] * 2 + [-1] * 8]
    assert packed.tokens[0, :9].tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert packed.segment_ids.tolist() == [[0] * 5 + [1] * 4 + [2], [0] * 2 + [1] * 8]


def test_bfd_pads_inner_rows_when_documents_arrive_longest_first():
    # C=10, docs 6 then 5 tokens: each gets its own row, both rows padded.
    tokens = np.arange(11, dtype=np.int32)
    packed = pack_documents(tokens, np.array([0, 6, 11]), 10, PAD, "bfd")
    assert packed.tokens.tolist() == [list(range(6)) + [PAD] * 4, list(range(6, 11)) + [PAD] * 5]
    assert packed.n_valid.tolist() == [6, 5] and packed.n_pad == 9


def test_bfd_gather_in_several_blocks_matches_brute_force(monkeypatch):
    # Rows are gathered in blocks of rows; make blocks tiny so that boundaries are crossed.
    import ext.data.packing as packing

    for block in (1, 7, 40):
        monkeypatch.setattr(packing, "_GATHER_BLOCK", block)
        for tokens, offsets, lengths, C in random_cases(30, seed=13):
            packed = pack_documents(tokens, offsets, C, PAD, "bfd")
            assert rows_as_lists(packed) == reference_bfd_rows(docs_of(tokens, offsets), C)
            assert (packed.tokens[packed.doc_index == -1] == PAD).all()


def test_greedy_matches_concatenate_and_chunk():
    for tokens, offsets, lengths, C in random_cases(80, seed=7):
        packed = pack_documents(tokens, offsets, C, PAD, "greedy")
        assert rows_as_lists(packed) == reference_greedy_rows(docs_of(tokens, offsets), C)


def test_greedy_cuts_every_document_crossing_a_row_boundary():
    for tokens, offsets, lengths, C in random_cases(80, seed=8):
        packed = pack_documents(tokens, offsets, C, PAD, "greedy")
        cut, pos = 0, 0
        for n in lengths:
            if n:
                cut += pos // C != (pos + n - 1) // C
                pos += n
        assert packed.n_cut_docs == cut


def test_document_of_exactly_c_tokens_fills_one_row_alone():
    C = 9
    tokens = np.arange(2 * C + 3, dtype=np.int32)
    offsets = np.array([0, 2, 2 + C, 2 * C + 3])  # docs of 2, C, C+1 tokens
    for method in ("bfd",):
        packed = pack_documents(tokens, offsets, C, PAD, method)
        full = [r for r in range(packed.n_rows) if (packed.doc_index[r] == 1).any()]
        assert len(full) == 1
        assert packed.doc_index[full[0]].tolist() == [1] * C
        assert packed.segment_ids[full[0]].tolist() == [0] * C
        assert packed.n_valid[full[0]] == C
        assert packed.n_cut_docs == 1  # only the doc of C+1 tokens
    packed = pack_documents(tokens[: C], np.array([0, C]), C, PAD, "greedy")
    assert packed.tokens.tolist() == [tokens[:C].tolist()] and packed.n_pad == 0 and packed.n_cut_docs == 0


def test_empty_input_gives_zero_rows():
    for tokens, offsets in [
        (np.zeros(0, np.int32), np.array([0])),
        (np.zeros(0, np.int32), np.array([0, 0, 0])),
        (np.arange(5, dtype=np.int32), np.array([3, 3])),
    ]:
        for method in ("bfd", "greedy"):
            packed = pack_documents(tokens, offsets, 8, PAD, method)
            assert packed.tokens.shape == packed.segment_ids.shape == packed.doc_index.shape == (0, 8)
            assert packed.n_valid.shape == (0,)
            assert (packed.n_docs, packed.n_tokens, packed.n_pad, packed.n_cut_docs) == (0, 0, 0, 0)
            batch = rows_to_batch(packed, reset_positions=True)
            assert all(v.shape == (0, 7) for v in batch.values())


def test_offsets_need_not_start_at_zero_and_tokens_may_be_int64():
    tokens = np.arange(100, 130, dtype=np.int64)
    packed = pack_documents(tokens, np.array([5, 9, 20]), 8, PAD, "bfd")
    assert packed.tokens.dtype == np.int32
    assert sorted(packed.tokens[packed.doc_index >= 0].tolist()) == list(range(105, 120))


# --- statistics -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["bfd", "greedy"])
def test_stats_agree_with_recomputation(method):
    rng = np.random.default_rng(9)
    for tokens, offsets, lengths, C in random_cases(60, seed=10):
        source = rng.integers(0, 3, size=len(lengths))
        packed = pack_documents(tokens, offsets, C, PAD, method, doc_source=source, n_sources=3)
        assert packed.n_docs == sum(n > 0 for n in lengths)
        assert packed.n_tokens == sum(lengths) == int(packed.n_valid.sum())
        assert packed.n_pad == int((packed.doc_index == -1).sum()) == packed.n_rows * C - sum(lengths)
        assert packed.n_long_docs == sum(n > C for n in lengths)
        rows_of = {}
        for r in range(packed.n_rows):
            for d in set(packed.doc_index[r].tolist()) - {-1}:
                rows_of.setdefault(d, set()).add(r)
        assert packed.n_cut_docs == sum(len(rs) > 1 for rs in rows_of.values())
        if method == "bfd":
            assert packed.n_cut_docs == packed.n_long_docs
        expected = [sum(n for n, s in zip(lengths, source) if s == k) for k in range(3)]
        assert packed.source_tokens.dtype == np.int64 and packed.source_tokens.tolist() == expected


# --- samples and batches --------------------------------------------------------------------


@pytest.mark.parametrize("reset", [True, False])
@pytest.mark.parametrize("method", ["bfd", "greedy"])
def test_row_to_sample_matches_token_by_token_definition(method, reset):
    for tokens, offsets, lengths, C in random_cases(40, seed=11):
        packed = pack_documents(tokens, offsets, C, PAD, method)
        for r in range(packed.n_rows):
            sample = row_to_sample(packed.tokens[r], packed.segment_ids[r], int(packed.n_valid[r]), reset)
            ref = reference_sample(
                packed.tokens[r].tolist(), packed.segment_ids[r].tolist(), int(packed.n_valid[r]), reset
            )
            assert {k: v.tolist() for k, v in sample.items()} == ref
            assert {k: v.dtype for k, v in sample.items()} == {
                "input": np.int64, "labels": np.int64, "positions": np.int64, "segment_ids": np.int32,
            }


@pytest.mark.parametrize("reset", [True, False])
@pytest.mark.parametrize("method", ["bfd", "greedy"])
def test_rows_to_batch_equals_row_to_sample_row_by_row(method, reset):
    for tokens, offsets, lengths, C in random_cases(60, seed=12):
        packed = pack_documents(tokens, offsets, C, PAD, method)
        batch = rows_to_batch(packed, reset_positions=reset)
        for key, value in batch.items():
            assert value.shape == (packed.n_rows, C - 1) and value.flags.c_contiguous
        for r in range(packed.n_rows):
            sample = row_to_sample(packed.tokens[r], packed.segment_ids[r], int(packed.n_valid[r]), reset)
            for key, value in sample.items():
                assert value.dtype == batch[key].dtype
                np.testing.assert_array_equal(batch[key][r], value, err_msg=key)


def test_labels_ignore_exactly_document_ends_and_padding():
    # C=6; rows: [A A A B B pad] -> labels A A(-> A) | A->B dropped | B | B->pad dropped
    tokens = np.array([1, 2, 3, 4, 5], dtype=np.int32)
    packed = pack_documents(tokens, np.array([0, 3, 5]), 6, 0, "greedy")
    batch = rows_to_batch(packed, reset_positions=True)
    assert batch["input"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch["labels"].tolist() == [[2, 3, -100, 5, -100]]
    assert batch["positions"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1]]
    assert rows_to_batch(packed, reset_positions=False)["positions"].tolist() == [[0, 1, 2, 3, 4]]


def test_invalid_arguments_are_rejected():
    tokens = np.arange(4, dtype=np.int32)
    with pytest.raises(ValueError, match="method"):
        pack_documents(tokens, np.array([0, 4]), 8, PAD, "first-fit")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="capacity"):
        pack_documents(tokens, np.array([0, 4]), 1, PAD, "bfd")
    with pytest.raises(ValueError, match="offsets"):
        pack_documents(tokens, np.array([0, 3, 2]), 8, PAD, "bfd")
    with pytest.raises(ValueError, match="offsets"):
        pack_documents(tokens, np.array([0, 5]), 8, PAD, "bfd")
    with pytest.raises(ValueError, match="doc_source"):
        pack_documents(tokens, np.array([0, 4]), 8, PAD, "bfd", doc_source=np.array([0, 1]))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_document_of_k_c_plus_one_tokens_keeps_its_eos_trained(k):
    """Its last token (the EOS) must be a label, wherever its chunk lands in a row."""
    C = 9
    lengths = [k * C + 1, 4, 4]  # the short ones fill rows so chunks land in several columns
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    tokens = np.arange(1, int(offsets[-1]) + 1, dtype=np.int32)
    eos = int(tokens[lengths[0] - 1])
    packed = pack_documents(tokens, offsets, C, PAD, "bfd")
    batch = rows_to_batch(packed, reset_positions=False)
    trained = batch["labels"][batch["labels"] != IGNORE_INDEX].tolist()
    assert trained.count(eos) == 1
    pieces = [len(piece) for row in rows_as_lists(packed) for d, piece in row if d == 0]
    assert sorted(pieces) == sorted([C] * (k - 1) + [C - 1, 2])
    # each token of the document is still delivered exactly once
    delivered = [t for row in rows_as_lists(packed) for d, piece in row if d == 0 for t in piece]
    assert sorted(delivered) == tokens[: lengths[0]].tolist()
