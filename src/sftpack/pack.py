"""Packing plans: pure index arithmetic over a token stream (numpy only, no I/O).

Concat-and-chunk (the reference): `n = (N - 1) // L` rows; row i covers stream positions
`[i*L, i*L + L + 1)`: inputs are the first L tokens, labels the last L. The incomplete
tail is dropped and reported. Document boundaries come from the stored document offsets
(the start of every document unit), never from token ids.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100


def num_rows(n_tokens: int, seq_length: int) -> int:
    """Rows of the concat-and-chunk plan: `(n_tokens - 1) // seq_length` (0 when too short)."""
    if seq_length < 1:
        raise ValueError("seq_length must be >= 1")
    return max(0, (int(n_tokens) - 1) // seq_length)


def dropped_tail(n_tokens: int, seq_length: int) -> int:
    """Tokens of the stream that no row's inputs cover."""
    return int(n_tokens) - num_rows(n_tokens, seq_length) * seq_length if n_tokens else 0


def row_span(index: int, seq_length: int) -> tuple[int, int]:
    """Stream range `[start, stop)` row `index` reads: L inputs plus one for the last label."""
    start = index * seq_length
    return start, start + seq_length + 1


def labels_from(window: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Labels for a window of L + 1 tokens: the next token, or -100 where its mask is 0."""
    labels = window[1:].astype(np.int64)
    if mask is not None:
        labels[mask[1:] == 0] = IGNORE_INDEX
    return labels


def position_ids(doc_starts: np.ndarray, start: int, length: int) -> np.ndarray:
    """Position of each token of `[start, start + length)` inside its document.

    `doc_starts` is the sorted start offset of every document (the first is 0). A document
    that began in an earlier row continues its count.
    """
    pos = np.arange(start, start + length, dtype=np.int64)
    owner = np.searchsorted(doc_starts, pos, side="right") - 1
    return pos - doc_starts[owner]


def positions_from_lens(lens: np.ndarray) -> np.ndarray:
    """`position_ids` of a row of document pieces of lengths `lens`: 0, 1, ... for each."""
    lens = np.asarray(lens, np.int64)
    return np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)


def seq_lens(doc_starts: np.ndarray, start: int, length: int) -> np.ndarray:
    """Lengths of the document pieces of `[start, start + length)`, in order, summing to length."""
    lo = np.searchsorted(doc_starts, start, side="right")
    hi = np.searchsorted(doc_starts, start + length, side="left")
    cuts = np.concatenate(([start], doc_starts[lo:hi], [start + length]))
    return np.diff(cuts).astype(np.int32)


def cu_seqlens(lens: np.ndarray) -> np.ndarray:
    """Cumulative sequence lengths `[0, l0, l0 + l1, ...]` (int32), as flash-attn varlen takes them."""
    out = np.zeros(len(lens) + 1, dtype=np.int32)
    np.cumsum(lens, out=out[1:])
    return out


def mask_cross_document(labels: np.ndarray, doc_starts: np.ndarray, start: int) -> np.ndarray:
    """Set to -100 the labels whose target token starts a new document (crosses a boundary)."""
    length = len(labels)
    lo = np.searchsorted(doc_starts, start + 1, side="left")
    hi = np.searchsorted(doc_starts, start + length + 1, side="left")
    out = labels.copy()
    out[doc_starts[lo:hi] - start - 1] = IGNORE_INDEX
    return out
