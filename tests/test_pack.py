"""Packing plans (src/sftpack/pack.py): pure index arithmetic, checked against brute force."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sftpack.pack import (
    IGNORE_INDEX,
    cu_seqlens,
    dropped_tail,
    labels_from,
    mask_cross_document,
    num_rows,
    position_ids,
    row_span,
    seq_lens,
)

# --------------------------------------------------------------------------- helpers


def rows_of(tokens: np.ndarray, seq_length: int, mask: np.ndarray | None = None):
    """(input_ids, labels) of every row, read the way the dataset reads them."""
    out = []
    for i in range(num_rows(len(tokens), seq_length)):
        start, stop = row_span(i, seq_length)
        window = tokens[start:stop]
        out.append((window[:-1], labels_from(window, None if mask is None else mask[start:stop])))
    return out


def brute_positions(lengths: list[int]) -> np.ndarray:
    """Position of every stream token inside its document, by counting."""
    return np.array([p for n in lengths for p in range(n)], dtype=np.int64)


def brute_owner(lengths: list[int]) -> np.ndarray:
    return np.array([d for d, n in enumerate(lengths) for _ in range(n)], dtype=np.int64)


def starts_of(lengths: list[int]) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)


documents = st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30)
seq_lengths = st.integers(min_value=1, max_value=70)


# --------------------------------------------------------------------------- the reference walkthrough


def test_reference_toy_walkthrough():
    tokens = np.arange(10)
    assert num_rows(10, 4) == 2
    rows = rows_of(tokens, 4)
    assert len(rows) == 2
    assert rows[0][0].tolist() == [0, 1, 2, 3] and rows[0][1].tolist() == [1, 2, 3, 4]
    assert rows[1][0].tolist() == [4, 5, 6, 7] and rows[1][1].tolist() == [5, 6, 7, 8]
    covered = {int(t) for inputs, _ in rows for t in inputs}
    assert 9 not in covered and 9 not in {int(t) for _, labels in rows for t in labels}
    # dropped = stream tokens that are no row's input: 8 (only a label) and 9 (unused)
    assert dropped_tail(10, 4) == len(set(range(10)) - covered) == 2


def test_row_span_reads_l_plus_one_tokens():
    assert row_span(0, 4) == (0, 5)
    assert row_span(1, 4) == (4, 9)
    assert row_span(3, 7) == (21, 29)


# --------------------------------------------------------------------------- num_rows / dropped_tail


@pytest.mark.parametrize(
    "n_tokens, seq_length, rows",
    [
        (0, 4, 0),
        (1, 4, 0),
        (4, 4, 0),  # L tokens: the last input would have no label
        (5, 4, 1),  # L + 1 tokens: exactly one row
        (8, 4, 1),
        (9, 4, 2),
        (2, 1, 1),
        (1, 1, 0),
        (100, 1, 99),
        (100, 99, 1),
        (100, 100, 0),
    ],
)
def test_num_rows_edge_cases(n_tokens, seq_length, rows):
    assert num_rows(n_tokens, seq_length) == rows
    # the definition: as many rows as fit with one extra token for the last label
    assert rows * seq_length + 1 <= max(n_tokens, 1)
    assert (rows + 1) * seq_length + 1 > n_tokens


@pytest.mark.parametrize("seq_length", [0, -1, -100])
def test_num_rows_rejects_non_positive_seq_length(seq_length):
    with pytest.raises(ValueError):
        num_rows(10, seq_length)


@given(n=st.integers(min_value=0, max_value=500), seq_length=seq_lengths)
def test_dropped_tail_counts_tokens_no_row_covers(n, seq_length):
    tokens = np.arange(n)
    covered = {int(t) for inputs, _ in rows_of(tokens, seq_length) for t in inputs}
    assert dropped_tail(n, seq_length) == n - len(covered)
    assert 0 <= dropped_tail(n, seq_length) <= seq_length or n <= seq_length


def test_dropped_tail_small_streams():
    assert dropped_tail(0, 4) == 0
    assert dropped_tail(1, 4) == 1
    assert dropped_tail(4, 4) == 4
    assert dropped_tail(5, 4) == 1
    assert dropped_tail(9, 4) == 1
    assert dropped_tail(12, 4) == 4


# --------------------------------------------------------------------------- labels_from


def test_labels_from_without_mask_is_the_next_token():
    window = np.array([7, 8, 9, 10, 11], dtype=np.uint16)
    labels = labels_from(window, None)
    assert labels.dtype == np.int64
    assert labels.tolist() == [8, 9, 10, 11]
    assert window.tolist() == [7, 8, 9, 10, 11]  # the window is not modified


def test_labels_from_masks_targets_whose_mask_is_zero():
    window = np.array([7, 8, 9, 10, 11])
    mask = np.array([0, 1, 0, 0, 1], dtype=np.uint8)
    # label j targets window[j + 1]: its mask decides, not the mask of the input token
    assert labels_from(window, mask).tolist() == [8, IGNORE_INDEX, IGNORE_INDEX, 11]


def test_labels_from_all_masked_and_all_trained():
    window = np.arange(6)
    assert labels_from(window, np.zeros(6, dtype=np.uint8)).tolist() == [IGNORE_INDEX] * 5
    assert labels_from(window, np.ones(6, dtype=np.uint8)).tolist() == [1, 2, 3, 4, 5]


def test_labels_from_keeps_large_ids_of_unsigned_windows():
    window = np.array([65535, 65534, 1, 65535], dtype=np.uint16)
    labels = labels_from(window, np.array([1, 1, 0, 1], dtype=np.uint8))
    assert labels.dtype == np.int64
    assert labels.tolist() == [65534, IGNORE_INDEX, 65535]
    window32 = np.array([0, 4_000_000_000], dtype=np.uint32)
    assert labels_from(window32, None).tolist() == [4_000_000_000]


@given(data=st.data(), n=st.integers(min_value=2, max_value=300), seq_length=seq_lengths)
def test_labels_from_with_random_masks(data, n, seq_length):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    tokens = rng.integers(0, 128256, size=n)
    mask = rng.integers(0, 2, size=n).astype(np.uint8)
    for i, (inputs, labels) in enumerate(rows_of(tokens, seq_length, mask)):
        for j in range(seq_length):
            target = i * seq_length + j + 1
            expected = int(tokens[target]) if mask[target] else IGNORE_INDEX
            assert labels[j] == expected


# --------------------------------------------------------------------------- stream coverage


@given(doc_lengths=documents, seq_length=seq_lengths, data=st.data())
def test_rows_reproduce_the_stream_prefix(doc_lengths, seq_length, data):
    n = sum(doc_lengths)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    tokens = rng.integers(0, 1000, size=n)
    rows = rows_of(tokens, seq_length)
    assert len(rows) == max(0, (n - 1) // seq_length)
    if not rows:
        assert n < seq_length + 1
        return
    for inputs, labels in rows:
        assert len(inputs) == len(labels) == seq_length
        assert labels[:-1].tolist() == inputs[1:].tolist()
    rebuilt = np.concatenate([inputs for inputs, _ in rows] + [rows[-1][1][-1:]])
    assert rebuilt.tolist() == tokens[: len(rows) * seq_length + 1].tolist()
    # consecutive rows: a row's last label is the next row's first input
    for (_, labels), (next_inputs, _) in zip(rows, rows[1:]):
        assert labels[-1] == next_inputs[0]
    # what is left over is less than one more row
    assert n - (len(rows) * seq_length + 1) < seq_length


# --------------------------------------------------------------------------- position_ids


def test_position_ids_small_example():
    starts = np.array([0, 3, 4, 9])  # documents of lengths 3, 1, 5, and the rest
    assert position_ids(starts, 0, 4).tolist() == [0, 1, 2, 0]
    assert position_ids(starts, 4, 4).tolist() == [0, 1, 2, 3]
    assert position_ids(starts, 8, 4).tolist() == [4, 0, 1, 2]  # continues, then restarts at 9


@given(doc_lengths=documents, seq_length=seq_lengths)
def test_position_ids_restart_at_documents_and_continue_across_rows(doc_lengths, seq_length):
    n = sum(doc_lengths)
    starts = starts_of(doc_lengths)
    expected = brute_positions(doc_lengths)
    start_set = set(starts.tolist())
    for i in range(num_rows(n, seq_length)):
        start = i * seq_length
        pos = position_ids(starts, start, seq_length)
        assert pos.dtype == np.int64 and pos.shape == (seq_length,)
        assert pos.tolist() == expected[start : start + seq_length].tolist()
        for j in range(seq_length):
            # 0 exactly where a document starts; elsewhere one more than the previous token
            assert (pos[j] == 0) == (start + j in start_set)
            if j and start + j not in start_set:
                assert pos[j] == pos[j - 1] + 1
        if i:
            previous = position_ids(starts, start - seq_length, seq_length)
            if start not in start_set:  # a document crossing the row boundary keeps counting
                assert pos[0] == previous[-1] + 1


# --------------------------------------------------------------------------- seq_lens / cu_seqlens


def test_seq_lens_small_example():
    starts = np.array([0, 3, 4, 9])
    assert seq_lens(starts, 0, 4).tolist() == [3, 1]
    assert seq_lens(starts, 4, 4).tolist() == [4]
    assert seq_lens(starts, 8, 4).tolist() == [1, 3]
    assert seq_lens(starts, 3, 6).tolist() == [1, 5]  # a row starting exactly at a document start


@given(doc_lengths=documents, seq_length=seq_lengths)
def test_seq_lens_agree_with_document_offsets(doc_lengths, seq_length):
    n = sum(doc_lengths)
    starts = starts_of(doc_lengths)
    owner = brute_owner(doc_lengths)
    for i in range(num_rows(n, seq_length)):
        start = i * seq_length
        lens = seq_lens(starts, start, seq_length)
        assert lens.dtype == np.int32
        assert int(lens.sum()) == seq_length
        assert (lens > 0).all()
        # brute force: runs of equal document owner inside the row
        row_owner = owner[start : start + seq_length]
        runs = [1]
        for a, b in zip(row_owner, row_owner[1:]):
            if a == b:
                runs[-1] += 1
            else:
                runs.append(1)
        assert lens.tolist() == runs
        # the piece boundaries inside the row are exactly the document starts inside it
        cuts = start + np.cumsum(lens)[:-1]
        inside = [s for s in starts.tolist() if start < s < start + seq_length]
        assert cuts.tolist() == inside
        # each piece restarts positions (or continues the document from the previous row)
        pos = position_ids(starts, start, seq_length)
        piece_starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
        assert all(pos[k] == 0 for k in piece_starts[1:])


def test_cu_seqlens():
    out = cu_seqlens(np.array([3, 1, 5], dtype=np.int32))
    assert out.dtype == np.int32
    assert out.tolist() == [0, 3, 4, 9]
    assert cu_seqlens(np.array([], dtype=np.int32)).tolist() == [0]
    assert cu_seqlens(np.array([7])).tolist() == [0, 7]


@given(lens=st.lists(st.integers(min_value=1, max_value=10_000), max_size=50))
def test_cu_seqlens_is_the_exclusive_prefix_sum(lens):
    out = cu_seqlens(np.array(lens, dtype=np.int32))
    assert out.dtype == np.int32 and len(out) == len(lens) + 1
    assert out[0] == 0
    assert np.diff(out).tolist() == lens
    assert int(out[-1]) == sum(lens)


# --------------------------------------------------------------------------- mask_cross_document


def test_mask_cross_document_small_example():
    starts = np.array([0, 3, 4, 9])
    tokens = np.arange(100, 113)
    labels = labels_from(tokens[4:9], None)  # row at 4, L=4: targets 5, 6, 7, 8
    assert mask_cross_document(labels, starts, 4).tolist() == labels.tolist()
    labels = labels_from(tokens[0:5], None)  # targets 1, 2, 3 (a start), 4 (a start)
    assert mask_cross_document(labels, starts, 0).tolist() == [101, 102, IGNORE_INDEX, IGNORE_INDEX]
    labels = labels_from(tokens[8:13], None)  # targets 9 (a start), 10, 11, 12
    out = mask_cross_document(labels, starts, 8)
    assert out.tolist() == [IGNORE_INDEX, 110, 111, 112]
    assert labels.tolist() == [109, 110, 111, 112]  # the input is not modified


@given(doc_lengths=documents, seq_length=seq_lengths, data=st.data())
def test_mask_cross_document_masks_exactly_labels_targeting_a_document_start(doc_lengths, seq_length, data):
    n = sum(doc_lengths)
    starts = starts_of(doc_lengths)
    start_set = set(starts.tolist())
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    tokens = rng.integers(0, 1000, size=n)
    mask = rng.integers(0, 2, size=n).astype(np.uint8)
    for i in range(num_rows(n, seq_length)):
        start, stop = row_span(i, seq_length)
        labels = labels_from(tokens[start:stop], mask[start:stop])
        out = mask_cross_document(labels, starts, start)
        assert out.shape == labels.shape
        for j in range(seq_length):
            target = start + j + 1
            if target in start_set:
                assert out[j] == IGNORE_INDEX
            else:
                assert out[j] == labels[j]  # untouched, whether trained or already masked


@settings(max_examples=50)
@given(doc_lengths=documents, seq_length=seq_lengths)
def test_boundaries_of_every_row_cover_the_stream(doc_lengths, seq_length):
    """Flattening every row's pieces reproduces the stream's document structure."""
    n = sum(doc_lengths)
    starts = starts_of(doc_lengths)
    rows = num_rows(n, seq_length)
    if not rows:
        return
    all_pos = np.concatenate([position_ids(starts, i * seq_length, seq_length) for i in range(rows)])
    assert all_pos.tolist() == brute_positions(doc_lengths)[: rows * seq_length].tolist()
    cu = cu_seqlens(np.concatenate([seq_lens(starts, i * seq_length, seq_length) for i in range(rows)]))
    assert int(cu[-1]) == rows * seq_length
    # every document start inside the covered range is a piece boundary of the flattened batch
    boundary = set(cu.tolist())
    assert {s for s in starts.tolist() if s < rows * seq_length} <= boundary
