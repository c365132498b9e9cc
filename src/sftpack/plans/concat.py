"""Concat-and-chunk, the reference plan, as arithmetic over cumulative document lengths.

Documents (in stored order, or permuted by `np.random.default_rng(seed).permutation(n)`)
are joined into one virtual stream of N tokens; `rows = (N - 1) // L` and row i reads
stream positions `[i*L, i*L + L + 1)` (L inputs plus one for the last label), exactly
`sftpack.pack.num_rows` / `row_span`. The tail `[rows*L, N)` is lost and reported. Nothing
is materialised per row: a row's pieces come from two binary searches over the stream
offsets. Memory: 16 bytes per document (order and offsets, int64).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..pack import dropped_tail, num_rows, row_span
from .base import Plan, PlanError, PlanStats, PrefixCounter, Ranges, as_lengths, supervised_lost


def stream_offsets(lengths: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """Start of every document in the stream, then N (int64, n + 1 entries); `order[j]` is
    the stored document at stream place j (None: stored order)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths if order is None else lengths[order], out=out[1:])
    return out


def span_pieces(offsets: np.ndarray, order: np.ndarray | None, start: int, stop: int) -> Ranges:
    """The stored pieces `(doc, start, length)` that make stream positions `[start, stop)`, in
    stream order; empty documents give no piece."""
    n_tokens = int(offsets[-1])
    if not 0 <= start <= stop <= n_tokens:
        raise PlanError(f"span [{start}, {stop}) outside the stream of {n_tokens} tokens")
    lo = int(np.searchsorted(offsets, start, side="right")) - 1
    hi = int(np.searchsorted(offsets, stop, side="left"))
    places = np.arange(max(lo, 0), hi)
    a = np.maximum(offsets[places], start)
    b = np.minimum(offsets[places + 1], stop)
    keep = b > a
    places, a, b = places[keep], a[keep], b[keep]
    docs = places if order is None else order[places]
    return Ranges(docs, a - offsets[places], b - a)


def row_pieces(offsets: np.ndarray, order: np.ndarray | None, index: int, seq_length: int) -> Ranges:
    """Pieces of concat row `index`: the L + 1 stream tokens of `sftpack.pack.row_span`."""
    start, stop = row_span(index, seq_length)
    return span_pieces(offsets, order, start, stop)


@dataclass(frozen=True, eq=False)
class ConcatPlan:
    """The concat plan, arithmetic: same `rows` / `row(i)` / `stats` / `lost` as `Plan`.

    `order[j]` is the stored document at stream place j (None: stored order); `offsets`
    are the stream offsets (`stream_offsets`). `to_plan()` materialises the pieces.
    """

    seq_length: int
    offsets: np.ndarray
    order: np.ndarray | None
    stats: PlanStats
    lost: Ranges
    strategy: str = "concat"
    overflow: str = "split"

    @property
    def window(self) -> int:
        return self.seq_length + 1

    @property
    def rows(self) -> int:
        return self.stats.rows

    def __len__(self) -> int:
        return self.rows

    def span(self, index: int) -> tuple[int, int]:
        """Stream positions `[start, stop)` of row `index` (`sftpack.pack.row_span`)."""
        if not -self.rows <= index < self.rows:
            raise IndexError(f"row {index} out of range for {self.rows} rows")
        return row_span(index % self.rows, self.seq_length)

    def row(self, index: int) -> Ranges:
        start, stop = self.span(index)
        return span_pieces(self.offsets, self.order, start, stop)

    def to_plan(self) -> Plan:
        """The same rows as explicit pieces (O(rows + documents) memory)."""
        L, R = self.seq_length, self.rows
        starts = np.arange(R, dtype=np.int64) * L
        lo = np.searchsorted(self.offsets, starts, side="right") - 1
        hi = np.searchsorted(self.offsets, starts + L + 1, side="left")
        counts = hi - lo
        row = np.repeat(np.arange(R, dtype=np.int64), counts)
        first = np.cumsum(counts) - counts
        place = np.repeat(lo, counts) + (np.arange(len(row), dtype=np.int64) - np.repeat(first, counts))
        a = np.maximum(self.offsets[place], starts[row])
        b = np.minimum(self.offsets[place + 1], starts[row] + L + 1)
        keep = b > a
        row, place, a, b = row[keep], place[keep], a[keep], b[keep]
        row_offsets = np.zeros(R + 1, np.int64)
        np.cumsum(np.bincount(row, minlength=R), out=row_offsets[1:])
        docs = place if self.order is None else self.order[place]
        return Plan(
            L,
            self.strategy,
            self.overflow,
            L + 1,
            docs,
            a - self.offsets[place],
            b - a,
            row_offsets,
            self.stats,
            self.lost,
        )


def document_order(n: int, seed: int | None) -> np.ndarray | None:
    """The shuffle of `n` documents for `seed` (None: stored order): the reference's document
    shuffle, as a permutation of stored documents."""
    return None if seed is None else np.random.default_rng(seed).permutation(n).astype(np.int64)


def plan_concat(
    lengths: np.ndarray,
    seq_length: int,
    *,
    seed: int | None = None,
    order: np.ndarray | None = None,
    supervised: np.ndarray | None = None,
    supervised_prefix: PrefixCounter | None = None,
) -> ConcatPlan:
    """Concat-and-chunk over documents of `lengths` tokens (stored order, or shuffled with
    `np.random.default_rng(seed).permutation(n)` when `seed` is given; or in a given
    `order`, that of `document_order(n, seed)` for a caller that needs it too).

    Raises `PlanError` when the stream cannot fill one row (it needs `seq_length + 1` tokens).
    """
    lengths = as_lengths(lengths, seq_length)
    L, n = int(seq_length), len(lengths)
    if order is None:
        order = document_order(n, seed)
    else:
        order = np.array(order, dtype=np.int64)
    offsets = stream_offsets(lengths, order)
    N = int(offsets[-1])
    R = num_rows(N, L)
    if R == 0:
        raise PlanError(
            f"{n} documents of {N} tokens in all are too few for one row of seq_length {L} "
            f"(a concat row needs seq_length + 1 tokens)"
        )
    cut = R * L  # inputs end here; [cut, N) is the tail
    a, b = offsets[:-1], offsets[1:]
    nonempty = b > a
    packed = nonempty & (a < cut)
    last = np.minimum(b, cut) - 1
    split = packed & (a // L != last // L)
    truncated = packed & (b > cut)
    # lost ranges: the part of the cut document past `cut`, then whole documents
    tail = nonempty & (b > cut)
    places = np.flatnonzero(tail)
    ls = np.maximum(a[places], cut)
    docs = places if order is None else order[places]
    lost = Ranges(docs, ls - a[places], b[places] - ls)
    sup_in, sup_lost = supervised_lost(lost, lengths, supervised, supervised_prefix)
    stats = PlanStats(
        seq_length=L,
        rows=R,
        documents_in=n,
        documents_packed=int(packed.sum()),
        documents_dropped=n - int(packed.sum()),
        documents_split=int(split.sum()),
        documents_truncated=int(truncated.sum()),
        documents_empty=int((~nonempty).sum()),
        tokens_in=N,
        tokens_packed=cut,
        tokens_lost=dropped_tail(N, L),
        supervised_in=sup_in,
        supervised_lost=sup_lost,
    ).check()
    offsets.flags.writeable = False
    if order is not None:
        order.flags.writeable = False
    return ConcatPlan(L, offsets, order, stats, lost)
