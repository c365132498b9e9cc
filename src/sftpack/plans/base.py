"""The plan types shared by every strategy: `Ranges`, `PlanStats`, `Plan`, `PlanError`.

A plan is computed from document lengths alone and names, for every row, the stored token
ranges `(doc, start, length)` that make it (`start` counts from the document's first token).
Everything here is pure numpy: no I/O, no torch. Offsets, counts and indices are int64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import SFTPackError

#: `supervised_prefix(doc, n)`: supervised tokens among the first `n[i]` tokens of
#: document `doc[i]` (both int64 arrays; returns an int array of the same shape). The
#: caller reads it from the store's loss mask; plans only call it for partly lost documents.
PrefixCounter = Callable[[np.ndarray, np.ndarray], np.ndarray]

OVERFLOWS = ("split", "truncate", "drop")


class PlanError(SFTPackError):
    """A plan cannot be made (bad lengths or options, or no row at all). A `ValueError`."""


class AccountingError(PlanError):
    """A plan's accounting does not add up (documents or tokens in != packed + lost)."""


def _frozen(a: np.ndarray) -> np.ndarray:
    """A read-only int64 view (a copy only when the dtype or layout differs)."""
    a = np.ascontiguousarray(a, dtype=np.int64).view()
    a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)
class Ranges:
    """Token ranges of stored documents: `doc[i]`, from `start[i]`, `length[i]` tokens (int64, read-only)."""

    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray

    def __post_init__(self) -> None:
        for name in ("doc", "start", "length"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        if not len(self.doc) == len(self.start) == len(self.length):
            raise PlanError("Ranges arrays must have equal lengths")

    def __len__(self) -> int:
        return len(self.doc)

    def tokens(self) -> int:
        return int(self.length.sum())

    def equals(self, other: Ranges) -> bool:
        return all(np.array_equal(getattr(self, k), getattr(other, k)) for k in ("doc", "start", "length"))

    @staticmethod
    def empty() -> Ranges:
        z = np.zeros(0, np.int64)
        return Ranges(z, z, z)


@dataclass(frozen=True)
class PlanStats:
    """What a plan keeps and loses. `check()` verifies the two conservation laws.

    Documents: `documents_in = documents_packed + documents_dropped`; `documents_split` and
    `documents_truncated` are packed documents (in several rows / cut short);
    `documents_empty` (zero tokens, in no row) are counted among the dropped.
    Tokens (row inputs): `tokens_in = tokens_packed + tokens_lost`.
    `supervised_*` count loss-mask tokens, token by token like `tokens_*` (which labels a
    row trains is the view's business); `None` when unknown (no counts given, or partly lost
    documents and no `supervised_prefix`).
    """

    seq_length: int
    rows: int
    documents_in: int
    documents_packed: int
    documents_dropped: int
    documents_split: int
    documents_truncated: int
    documents_empty: int
    tokens_in: int
    tokens_packed: int
    tokens_lost: int
    supervised_in: int | None = None
    supervised_lost: int | None = None

    @property
    def capacity(self) -> int:
        return self.rows * self.seq_length

    @property
    def padding_tokens(self) -> int:
        """Row slots no token fills: `rows * seq_length - tokens_packed`."""
        return self.capacity - self.tokens_packed

    @property
    def efficiency(self) -> float:
        """`tokens_packed / (rows * seq_length)` (0.0 without rows)."""
        return self.tokens_packed / self.capacity if self.rows else 0.0

    @property
    def lower_bound_rows(self) -> int:
        """`ceil(tokens_packed / seq_length)`: no plan of these tokens has fewer rows."""
        return -(-self.tokens_packed // self.seq_length)

    def check(self) -> PlanStats:
        """Raise `AccountingError` unless the counts add up; return self."""
        problems = []
        if self.documents_in != self.documents_packed + self.documents_dropped:
            problems.append(
                f"documents in {self.documents_in} != packed {self.documents_packed} + dropped {self.documents_dropped}"
            )
        if self.tokens_in != self.tokens_packed + self.tokens_lost:
            problems.append(f"tokens in {self.tokens_in} != packed {self.tokens_packed} + lost {self.tokens_lost}")
        if not (
            0 <= self.documents_split <= self.documents_packed
            and 0 <= self.documents_truncated <= self.documents_packed
        ):
            problems.append("split/truncated documents must be packed documents")
        if not 0 <= self.documents_empty <= self.documents_dropped:
            problems.append("empty documents must be counted among the dropped")
        if min(self.rows, self.tokens_packed, self.tokens_lost, self.documents_packed, self.documents_dropped) < 0:
            problems.append("negative count")
        if self.padding_tokens < 0:
            problems.append(f"rows hold {self.tokens_packed} tokens, more than rows * seq_length = {self.capacity}")
        if self.supervised_lost is not None and not 0 <= self.supervised_lost <= (self.supervised_in or 0):
            problems.append(f"supervised lost {self.supervised_lost} not within 0..{self.supervised_in}")
        if problems:
            raise AccountingError("plan accounting: " + "; ".join(problems))
        return self


@dataclass(frozen=True, eq=False)
class Plan:
    """Rows as flat pieces: row i is pieces `row_offsets[i]:row_offsets[i+1]` of
    (`doc`, `start`, `length`), in order. `lost` lists every token range in no row.

    `window` is the most tokens a row holds: `seq_length` for packed strategies (rows are
    padded later), `seq_length + 1` for concat (L inputs plus the last label, shared with the
    next row). Memory: 24 bytes per piece + 8 per row + 24 per lost range; the arrays are
    read-only, so a plan can be shared between loader workers.
    """

    seq_length: int
    strategy: str
    overflow: str
    window: int
    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray
    row_offsets: np.ndarray
    stats: PlanStats
    lost: Ranges = field(default_factory=Ranges.empty)

    def __post_init__(self) -> None:
        for name in ("doc", "start", "length", "row_offsets"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        if len(self.row_offsets) != self.stats.rows + 1 or self.row_offsets[-1] != len(self.doc):
            raise PlanError("row_offsets must have rows + 1 entries ending at the piece count")

    @property
    def rows(self) -> int:
        return len(self.row_offsets) - 1

    def __repr__(self) -> str:
        return (
            f"Plan(strategy={self.strategy!r}, overflow={self.overflow!r}, seq_length={self.seq_length}, "
            f"rows={self.rows}, pieces={len(self.doc)}, lost={len(self.lost)}, "
            f"efficiency={self.stats.efficiency:.4f})"
        )

    def __len__(self) -> int:
        return self.rows

    def row(self, index: int) -> Ranges:
        """The pieces of row `index` (read-only views)."""
        if not -self.rows <= index < self.rows:
            raise IndexError(f"row {index} out of range for {self.rows} rows")
        index %= self.rows
        a, b = self.row_offsets[index], self.row_offsets[index + 1]
        return Ranges(self.doc[a:b], self.start[a:b], self.length[a:b])

    def row_tokens(self) -> np.ndarray:
        """Tokens in every row (int64, one per row)."""
        c = np.concatenate(([0], np.cumsum(self.length)))
        return c[self.row_offsets[1:]] - c[self.row_offsets[:-1]]

    def stream_starts(self, doc_offsets: np.ndarray) -> np.ndarray:
        """Absolute store position of every piece, given the store's `doc_offsets`."""
        return np.asarray(doc_offsets, dtype=np.int64)[self.doc] + self.start

    def equals(self, other: Plan) -> bool:
        """Same rows, pieces, lost ranges and stats."""
        return (
            self.seq_length == other.seq_length
            and self.strategy == other.strategy
            and self.overflow == other.overflow
            and self.window == other.window
            and self.stats == other.stats
            and np.array_equal(self.row_offsets, other.row_offsets)
            and Ranges(self.doc, self.start, self.length).equals(Ranges(other.doc, other.start, other.length))
            and self.lost.equals(other.lost)
        )


# --------------------------------------------------------------------------- helpers for strategies


def as_lengths(lengths: np.ndarray, seq_length: int) -> np.ndarray:
    """Validate document lengths (1-D, integer, >= 0) and seq_length (int >= 1); int64 copy-free when possible."""
    if isinstance(seq_length, (bool, np.bool_)) or not isinstance(seq_length, (int, np.integer)) or seq_length < 1:
        raise PlanError(f"seq_length must be an integer >= 1, got {seq_length!r}")
    a = np.asarray(lengths)
    if a.ndim != 1:
        raise PlanError(f"lengths must be 1-D, got shape {a.shape}")
    if a.size == 0:
        return np.zeros(0, np.int64)
    if a.dtype.kind not in "iu":
        raise PlanError(f"lengths must be integers, got dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if a.min() < 0:
        raise PlanError(f"lengths must be >= 0; document {int(np.argmin(a))} has {int(a.min())}")
    return a


def supervised_lost(
    lost: Ranges, lengths: np.ndarray, supervised: np.ndarray | None, supervised_prefix: PrefixCounter | None
) -> tuple[int | None, int | None]:
    """(supervised tokens in, supervised tokens in the `lost` ranges), or None where unknown.

    Whole lost documents use the per-document counts; a partly lost document needs
    `supervised_prefix` (supervised tokens before a cut), called once for all of them.
    """
    if supervised is None:
        return None, None
    s = np.asarray(supervised)
    if s.shape != lengths.shape or (s.size and s.dtype.kind not in "iu"):
        raise PlanError(f"supervised must be one integer count per document, shape {lengths.shape}")
    s = s.astype(np.int64, copy=False)
    if s.size and (s.min() < 0 or (s > lengths).any()):
        raise PlanError("supervised counts must lie within 0..length of their document")
    total = int(s.sum())
    if not len(lost):
        return total, 0
    doc, a, n = lost.doc, lost.start, lost.length
    b = a + n

    def prefix(at: np.ndarray) -> np.ndarray | None:
        full = lengths[doc]
        out = np.where(at >= full, s[doc], 0)
        inner = (at > 0) & (at < full)
        if inner.any():
            if supervised_prefix is None:
                return None
            got = np.asarray(supervised_prefix(doc[inner], at[inner]), dtype=np.int64).reshape(-1)
            if (
                got.shape != (int(inner.sum()),)
                or (got < 0).any()
                or (got > np.minimum(at[inner], s[doc[inner]])).any()
            ):
                raise PlanError("supervised_prefix returned counts outside 0..min(n, supervised)")
            out[inner] = got
        return out

    hi, lo = prefix(b), prefix(a)
    if hi is None or lo is None:
        return total, None
    return total, int((hi - lo).sum())
