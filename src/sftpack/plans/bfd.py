"""Best-fit decreasing over all documents at once, vectorised by capacity classes.

Items (documents, or pieces of over-long ones) are taken longest first, ties by
(document, start); each goes into the open row with the least remaining capacity that
holds it, ties to the row that reached that capacity first (FIFO); a new row when none
does. This is exactly the algorithm of TRL's `pack_dataset(strategy="bfd")` (Krell et
al. 2021, arXiv 2107.02027; Ding et al. 2024, arXiv 2404.10830) run on the whole dataset
instead of per 1,000-example map batch, so the rows are the same as TRL's with
`map_kwargs={"batch_size": None}`.

Why it can be vectorised: lengths are integers in 1..L. All items of one length l are
consecutive in the order. While they are placed, a row with capacity c >= l (the smallest
such) takes `c // l` of them in a row and drops to `c % l < l`; the next smallest capacity
is then the next open row. So a whole length class is placed by walking the non-empty
capacity buckets upward with `numpy.repeat`, and the Python loop runs once per (length,
bucket) visit instead of once per document. Rows of equal capacity are interchangeable
for the count, so each bucket only keeps a FIFO of row ids.

Zero-length documents are never placed (a row piece of no token would be an empty
sequence in `cu_seqlens`); they are counted as dropped and empty.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from .base import OVERFLOWS, Plan, PlanError, PlanStats, PrefixCounter, Ranges, as_lengths, supervised_lost


class _Buckets:
    """Open rows by remaining capacity 1..L-1: a FIFO of row-id arrays per capacity, and a
    two-level occupancy index (per capacity, per block of 256) so the non-empty capacities
    >= l are found in O(256 + L/256) C steps, not O(L)."""

    SHIFT = 8

    def __init__(self, seq_length: int) -> None:
        self.L = seq_length
        self.count = [0] * (seq_length + 1)
        self.fifo: dict[int, deque] = {}
        self.occupied = np.zeros(seq_length + 1, np.uint8)
        self.blocks = np.zeros((seq_length >> self.SHIFT) + 1, np.int64)

    def _mark(self, capacity: int, on: bool) -> None:
        self.occupied[capacity] = on
        self.blocks[capacity >> self.SHIFT] += 1 if on else -1

    def push(self, capacity: int, rows: np.ndarray) -> None:
        if capacity > 0 and len(rows):  # capacity 0: the row is full, it leaves
            if not self.count[capacity]:
                self._mark(capacity, True)
                self.fifo[capacity] = deque()
            self.fifo[capacity].append(rows)
            self.count[capacity] += len(rows)

    def take(self, capacity: int, m: int) -> np.ndarray:
        """The first m rows of bucket `capacity`, removed from it."""
        q, got, need = self.fifo[capacity], [], m
        while need:
            head = q[0]
            if len(head) <= need:
                got.append(q.popleft())
                need -= len(head)
            else:
                got.append(head[:need])
                q[0] = head[need:]
                need = 0
        self.count[capacity] -= m
        if not self.count[capacity]:
            self._mark(capacity, False)
            del self.fifo[capacity]
        return got[0] if len(got) == 1 else np.concatenate(got)

    def at_least(self, l: int):  # noqa: E741  (l: a length, as in the papers)
        """Non-empty capacities in [l, L), increasing, found lazily block by block. Safe while
        the caller empties the buckets it is given and pushes only below l."""
        shift, L = self.SHIFT, self.L
        b = l >> shift
        for c in self.occupied[l : min((b + 1) << shift, L)].nonzero()[0].tolist():
            yield l + c
        for nb in (self.blocks[b + 1 :].nonzero()[0] + b + 1).tolist():
            lo = nb << shift
            for c in self.occupied[lo : min(lo + (1 << shift), L)].nonzero()[0].tolist():
                yield lo + c


def best_fit(counts: np.ndarray, seq_length: int) -> tuple[np.ndarray, int]:
    """Best-fit decreasing of `counts[l]` items of each length l in 1..seq_length.

    Returns `(row, n_rows)`: `row[i]` is the row of the i-th item in decreasing-length order
    (ties keep their given order); rows are numbered in the order they are opened.
    Cost: O(items) numpy work + O(1) Python steps per length class and per bucket visited.
    """
    L = int(seq_length)
    row = np.empty(int(counts.sum()), np.int64)
    buckets = _Buckets(L)
    n_rows = pos = 0
    for l in (np.flatnonzero(counts[1:])[::-1] + 1).tolist():  # noqa: E741
        k = int(counts[l])
        out, w = row[pos : pos + k], 0
        if l < L:
            for c in buckets.at_least(l):  # open rows that hold l, smallest capacity first
                q, m = c // l, buckets.count[c]
                if m * q <= k - w:  # every row of this bucket takes q items, drops to c % l
                    rows = buckets.take(c, m)
                    out[w : w + m * q] = np.repeat(rows, q)
                    w += m * q
                    buckets.push(c % l, rows)
                else:  # the class ends here: t rows take q, one takes r < q (stays >= l)
                    t, r = divmod(k - w, q)
                    rows = buckets.take(c, t + (r > 0))
                    out[w : w + t * q] = np.repeat(rows[:t], q)
                    out[w + t * q : k] = rows[t:]
                    buckets.push(c % l, rows[:t])
                    buckets.push(c - r * l, rows[t:])
                    w = k
                if w == k:
                    break
        if w < k:  # new rows of capacity L take L // l items each
            q = L // l
            t, r = divmod(k - w, q)
            new = np.arange(n_rows, n_rows + t + (r > 0), dtype=np.int64)
            out[w:] = np.repeat(new, q)[: k - w]
            buckets.push(L - q * l, new[:t])
            buckets.push(L - r * l, new[t:])
            n_rows += len(new)
        pos += k
    return row, n_rows


def _items(lengths: np.ndarray, L: int, overflow: str) -> tuple[Ranges, Ranges]:
    """(items to pack, lost ranges). Items: first every full piece of L tokens (documents of
    exactly L included) in (document, start) order, then one item per document for what
    is left (all of a document shorter than L), in document order; a stable sort on
    decreasing length then breaks ties by (document, start) without expanding all n."""
    over = lengths > L
    if overflow == "split":
        full = lengths // L
        has_full = np.flatnonzero(full)
        f = full[has_full]
        doc_f = np.repeat(has_full, f)
        first = np.cumsum(f) - f
        start_f = (np.arange(len(doc_f), dtype=np.int64) - np.repeat(first, f)) * L
        rest = lengths - full * L
        doc_r = np.flatnonzero(rest)
        doc = np.concatenate((doc_f, doc_r))
        start = np.concatenate((start_f, full[doc_r] * L))
        length = np.concatenate((np.full(len(doc_f), L, np.int64), rest[doc_r]))
        return Ranges(doc, start, length), Ranges.empty()
    keep = (lengths > 0) if overflow == "truncate" else (lengths > 0) & ~over
    doc = np.flatnonzero(keep)
    items = Ranges(doc, np.zeros(len(doc), np.int64), np.minimum(lengths[doc], L))
    lost_doc = np.flatnonzero(over)
    cut = L if overflow == "truncate" else 0
    lost = Ranges(lost_doc, np.full(len(lost_doc), cut, np.int64), lengths[lost_doc] - cut)
    return items, lost


def _decreasing(length: np.ndarray, L: int) -> np.ndarray:
    """Stable order of `length` (values 1..L), longest first: numpy's radix sort on the
    key L - length (8 or 16 bits; two 16-bit passes up to 2**32), O(n)."""
    key = L - length
    if L <= 1 << 16:
        return np.argsort(key.astype(np.uint16 if L > 1 << 8 else np.uint8), kind="stable")
    if L <= 1 << 32:
        low = np.argsort((key & 0xFFFF).astype(np.uint16), kind="stable")
        return low[np.argsort((key >> 16).astype(np.uint16)[low], kind="stable")]
    return np.argsort(key, kind="stable")


def plan_bfd(
    lengths: np.ndarray,
    seq_length: int,
    *,
    overflow: str = "split",
    supervised: np.ndarray | None = None,
    supervised_prefix: PrefixCounter | None = None,
) -> Plan:
    """Pack documents of `lengths` tokens into rows of at most `seq_length` tokens, best fit decreasing.

    `overflow` for documents longer than `seq_length`: "split" (pieces of seq_length
    tokens, the last shorter, each packed as a document), "truncate" (keep the first
    seq_length tokens) or "drop". Rows are numbered in the order they open (longest
    documents first); the loader orders them. Raises `PlanError` on bad input or when no
    token is left to pack.

    Memory: the plan holds 24 bytes per piece + 8 per row (about 28 bytes per document on
    an SFT-like corpus); planning peaks at about 71 bytes per document on top of the
    lengths. Time: 10M documents in about 2 s on one core (bench/bench_pack.py). All
    arrays are int64.
    """
    lengths = as_lengths(lengths, seq_length)
    if overflow not in OVERFLOWS:
        raise PlanError(f"overflow must be one of {OVERFLOWS}, got {overflow!r}")
    L, n = int(seq_length), len(lengths)
    if n == 0:
        raise PlanError("no documents to plan")
    items, lost = _items(lengths, L, overflow)
    if not len(items):
        empty = int((lengths == 0).sum())
        why = (
            "every document is empty"
            if empty == n
            else f"every non-empty document is longer than seq_length {L} and overflow='drop'"
        )
        raise PlanError(f"nothing to pack: {why}")

    counts = np.bincount(items.length, minlength=L + 1)
    row_sorted, n_rows = best_fit(counts, L)
    row_offsets = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(row_sorted, minlength=n_rows), out=row_offsets[1:])
    by_row = np.argsort(row_sorted, kind="stable")  # sorted position of each piece, by row then placement
    del row_sorted
    take = _decreasing(items.length, L)[by_row]  # item index of each piece
    doc = items.doc[take]
    start = items.start[take] if items.start.any() else np.zeros(len(take), np.int64)
    del take
    length = np.repeat(np.arange(L, 0, -1, dtype=np.int64), counts[:0:-1])[by_row]  # sorted lengths, by row
    del by_row

    nonempty = lengths > 0
    over = lengths > L
    packed = int((nonempty & ~over).sum()) + (0 if overflow == "drop" else int(over.sum()))
    sup_in, sup_lost = supervised_lost(lost, lengths, supervised, supervised_prefix)
    stats = PlanStats(
        seq_length=L,
        rows=n_rows,
        documents_in=n,
        documents_packed=packed,
        documents_dropped=n - packed,
        documents_split=int(over.sum()) if overflow == "split" else 0,
        documents_truncated=int(over.sum()) if overflow == "truncate" else 0,
        documents_empty=n - int(nonempty.sum()),
        tokens_in=int(lengths.sum()),
        tokens_packed=int(length.sum()),
        tokens_lost=lost.tokens(),
        supervised_in=sup_in,
        supervised_lost=sup_lost,
    ).check()
    return Plan(L, "bfd", overflow, L, doc, start, length, row_offsets, stats, lost)
