"""A store seen through a plan: the rows a dataset serves, as numpy arrays (no torch).

`View(store, options)` plans from the stored document lengths alone (never the tokens) and
reads each row's pieces from the memory-mapped arrays:

- concat (the reference): documents in stored order, or permuted by the shuffle seed,
  joined into one virtual stream `BOS d1 EOS BOS d2 ... EOS BOS dN` (the last EOS is not
  part of it); row i holds stream positions `[i*L, i*L + L]`, labels shifted by one.
  A tokenizer that encodes the stream's first document differently (SentencePiece) has
  that variant stored for every document; the plan's first document is read from it.
- bfd: whole documents (or, with overflow="split", pieces of at most L tokens packed as
  documents of their own), no label crosses a document, padded to L with `pad=True`.

Two label conventions (`labels=`): "shifted" (the reference: `labels[j]` is the target of
`input_ids[j]`) and "hf" (Hugging Face: `labels[j]` is `input_ids[j]` or -100, the model
shifts); see `hf_labels`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import BuildOptions, make_options, resolve_seed
from .errors import ConfigError, StoreError
from .pack import IGNORE_INDEX, labels_from, mask_cross_document, position_ids, positions_from_lens, seq_lens
from .plans import ConcatPlan, Plan, PlanError, Ranges, document_order, plan_bfd, plan_concat
from .store import Store


def options_for(store: Store, **given: Any) -> BuildOptions:
    """The options to view `store` with: each given non-None value, else what the build
    recorded (an unshuffled store records no seed: shuffling it without one draws one)."""
    recorded = {**store.manifest["plan"], **store.manifest["view"]}
    return resolve_seed(make_options(**{**recorded, **{k: v for k, v in given.items() if v is not None}}))


LABELS = ("shifted", "hf")


def check_labels(labels: str) -> str:
    """`labels` if it names a label convention, else a `ConfigError` listing them."""
    if labels not in LABELS:
        raise ConfigError(
            f"labels={labels!r} is not one of {', '.join(map(repr, LABELS))}: 'shifted' (the reference, "
            "labels[j] is the target of input_ids[j]) or 'hf' (aligned with input_ids; Hugging Face models shift)"
        )
    return labels


def hf_labels(shifted: np.ndarray, seq_lens: np.ndarray | None = None) -> np.ndarray:
    """Hugging Face labels from a row's shifted ones: `hf[j] = shifted[j - 1]`, so `hf[j]` is
    `input_ids[j]` where trained, else -100 (the model shifts them back).

    `hf[0]` is -100 (nothing in the row precedes it) and `shifted[-1]` is lost: on a concat
    row it is the target of the last input, the next row's first token, which a model that
    sees only this row cannot be asked to predict. With `seq_lens` (document pieces) every
    piece's first label is -100 too: it would be predicted from the previous document, which
    the piece does not attend to.
    """
    out = np.empty_like(shifted)
    out[0] = IGNORE_INDEX
    out[1:] = shifted[:-1]
    if seq_lens is not None:
        out[np.cumsum(seq_lens[:-1], dtype=np.int64)] = IGNORE_INDEX
    return out


class View:
    """Rows of `store` under the plan and serving options of `options`, with labels in the
    convention `labels` ("shifted": the reference; "hf": see `hf_labels`)."""

    def __init__(
        self, store: Store, options: BuildOptions, *, labels: str = "shifted", count_supervised: bool = False
    ) -> None:
        """`count_supervised`: bfd plans also count the supervised tokens they lose (one pass
        over the loss mask; the report's business, not a training job's)."""
        options.validate()
        self.labels = check_labels(labels)
        self.store, self.options = store, options
        self.seq_length = int(options.seq_length)
        tok = store.manifest["tokenizer"]
        pad = tok.get("pad_id")
        self.pad_id = int(pad if pad is not None else tok.get("eos_id") or 0)
        self.pad = options.pad is not False  # bfd: padded unless pad=False
        self.all_trained = bool(store.manifest["options"]["train_on_prompt"])
        bfd = options.packing == "bfd"
        # a bfd row's documents stand alone: each in the encoding it has at the start of a text,
        # where the tokenizer's differs from its in-stream one (SentencePiece)
        first = store.first_tokens is not None and bfd
        self._docs: tuple[np.ndarray, np.ndarray, np.ndarray] = (
            (store.first_tokens, store.first_mask, store.first_offsets)  # type: ignore[assignment]
            if first
            else (store.tokens, store.loss_mask, store.doc_offsets)
        )
        self.lengths = lengths = np.diff(np.asarray(self._docs[2], dtype=np.int64))  # the planned documents
        self._row_order: np.ndarray | None = None
        try:
            if bfd:
                counted = self._supervised_counts() if count_supervised else {}
                self.plan: Plan | ConcatPlan = plan_bfd(lengths, self.seq_length, overflow=options.overflow, **counted)
                self._first = -1
                if options.shuffle and options.seed is not None:  # rows open longest first: serve them mixed
                    self._row_order = np.random.default_rng(int(options.seed)).permutation(self.plan.rows)
            else:
                self.plan, self._first = self._plan_concat(lengths, options)
        except PlanError as exc:
            raise ConfigError(f"{store.path}: {exc}") from None

    def _plan_concat(self, lengths: np.ndarray, options: BuildOptions) -> tuple[ConcatPlan, int]:
        n = len(lengths)
        if options.shuffle and options.seed is None:
            raise ConfigError("a shuffled concat plan needs a seed")
        seed = int(options.seed) if options.shuffle and options.seed is not None else None
        order = document_order(n, seed)
        stream = lengths.copy()
        first = (0 if order is None else int(order[0])) if n else -1
        if self.store.first_offsets is not None and n:
            stream[first] = self.store.first_offsets[first + 1] - self.store.first_offsets[first]
        else:
            first = -1
        if n:  # the stream's last document gives no EOS: nothing follows it
            stream[n - 1 if order is None else order[-1]] -= int(
                self.store.manifest["tokenizer"].get("eos_id") is not None
            )
        return plan_concat(stream, self.seq_length, order=order), first

    def _supervised_counts(self) -> dict[str, Any]:
        """Per-document supervised tokens, and the counter of a document prefix, for plans."""
        _, mask, offsets = self._docs
        offsets = np.asarray(offsets, np.int64)
        before = _ones_before(mask, offsets)

        def prefix(doc: np.ndarray, n: np.ndarray) -> np.ndarray:
            return _ones_before(mask, offsets[doc] + n) - before[doc]

        return {"supervised": np.diff(before), "supervised_prefix": prefix}

    def __len__(self) -> int:
        return self.plan.rows

    def _read(self, doc: int, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.store
        if doc == self._first:  # the stream's first document, in its first-in-stream encoding
            at = int(s.first_offsets[doc]) + start  # type: ignore[index]
            return s.first_tokens[at : at + length], s.first_mask[at : at + length]  # type: ignore[index]
        tokens, mask, offsets = self._docs
        at = int(offsets[doc]) + start
        return tokens[at : at + length], mask[at : at + length]

    def pieces(self, index: int) -> Ranges:
        """The stored token ranges of served row `index`."""
        return self.plan.row(int(self._row_order[index]) if self._row_order is not None else index)

    def window(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Row `index`'s tokens (int64) and loss mask, before label conventions: concat rows
        hold L + 1 tokens (the last is only a label), bfd rows their documents' tokens."""
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for a dataset of {len(self)} rows")
        plan = self.plan
        if isinstance(plan, ConcatPlan) and plan.order is None and self._first < 0:
            start, stop = plan.span(index)  # the stream is the stored tokens: one slice
            return np.asarray(self.store.tokens[start:stop], np.int64), np.asarray(self.store.loss_mask[start:stop])
        pieces = self.pieces(index)
        parts = [
            self._read(d, a, n) for d, a, n in zip(pieces.doc.tolist(), pieces.start.tolist(), pieces.length.tolist())
        ]
        return np.concatenate([p[0] for p in parts]).astype(np.int64), np.concatenate([p[1] for p in parts])

    def item(self, index: int) -> dict[str, np.ndarray]:
        """`input_ids`, `labels` (int64, -100 where untrained; in the view's convention), and
        with boundaries (always for bfd) `position_ids` and `seq_lens`."""
        tokens, mask = self.window(index)
        if isinstance(self.plan, ConcatPlan):
            item = self._concat_item(index, tokens, mask)
        else:
            item = self._packed_item(tokens, mask, self.pieces(index).length)
        if self.labels == "hf":
            item["labels"] = hf_labels(item["labels"], item.get("seq_lens"))
        return item

    def _concat_item(self, index: int, tokens: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        L = self.seq_length
        labels = labels_from(tokens, None if self.all_trained else mask)
        starts = self.plan.offsets[:-1]  # type: ignore[union-attr]
        start = index * L
        if self.options.mask_cross_document:
            labels = mask_cross_document(labels, starts, start)
        item = {"input_ids": tokens[:-1], "labels": labels}
        if self.options.boundaries:
            item["position_ids"] = position_ids(starts, start, L)
            item["seq_lens"] = seq_lens(starts, start, L)
        return item

    def _packed_item(self, tokens: np.ndarray, mask: np.ndarray, lens: np.ndarray) -> dict[str, np.ndarray]:
        n, L = len(tokens), self.seq_length
        starts = np.cumsum(lens) - lens
        labels = np.full(n, IGNORE_INDEX, np.int64)
        labels[:-1] = tokens[1:]
        if not self.all_trained:
            labels[:-1][mask[1:] == 0] = IGNORE_INDEX
        labels[starts + lens - 1] = IGNORE_INDEX  # a piece's last token predicts nothing in it
        positions = positions_from_lens(lens)
        if self.pad and n < L:
            # padding is a segment of its own (positions 0.., labels -100): it attends to nothing real
            fill = L - n
            tokens = np.concatenate((tokens, np.full(fill, self.pad_id, np.int64)))
            labels = np.concatenate((labels, np.full(fill, IGNORE_INDEX, np.int64)))
            positions = np.concatenate((positions, np.arange(fill, dtype=np.int64)))
            lens = np.append(lens, fill)
        return {"input_ids": tokens, "labels": labels, "position_ids": positions, "seq_lens": lens.astype(np.int32)}

    def stream(self) -> tuple[np.ndarray, np.ndarray]:
        """Concat plans: the whole virtual stream (tokens int64, loss mask), as the reference
        would tokenize the documents joined in plan order. O(tokens) memory: for checks."""
        if not isinstance(self.plan, ConcatPlan):
            raise ConfigError("stream() is defined for concat plans; bfd rows are whole documents")
        n = len(self.plan.offsets) - 1
        order = self.plan.order if self.plan.order is not None else np.arange(n)
        lengths = np.diff(self.plan.offsets)
        parts = [self._read(int(d), 0, int(n)) for d, n in zip(order, lengths)]
        return (
            np.concatenate([np.asarray(p[0], np.int64) for p in parts]),
            np.concatenate([np.asarray(p[1]) for p in parts]),
        )

    def pieces_per_row(self) -> np.ndarray:
        """How many document pieces each row holds, in the order rows are served."""
        plan = self.plan.to_plan() if isinstance(self.plan, ConcatPlan) else self.plan
        counts = np.diff(plan.row_offsets)
        return counts if self._row_order is None else counts[self._row_order]

    def supervision(self) -> tuple[int, int]:
        """(supervised labels in all rows, rows without any), from the loss mask read once
        in bounded chunks: a row's labels are its pieces' tokens but the first of each bfd
        piece, or of each concat row (the first input predicts the second)."""
        plan = self.plan.to_plan() if isinstance(self.plan, ConcatPlan) else self.plan
        starts = plan.row_offsets[:-1]
        skip = np.ones(len(plan.doc), np.int64)  # bfd: each piece's first token is no label target
        if isinstance(self.plan, ConcatPlan):
            skip[:] = 0
            skip[starts] = 1  # concat: only the window's first token (the row's L + 1 tokens hold L labels)
        if self.all_trained:
            counts = plan.length - skip
        else:
            first = plan.doc == self._first
            counts = np.zeros(len(plan.doc), np.int64)
            for sel, mask, offsets in (
                (~first, self._docs[1], self._docs[2]),
                (first, self.store.first_mask, self.store.first_offsets),
            ):
                if sel.any() and mask is not None:  # first_* exist wherever a piece reads them
                    a = np.asarray(offsets, np.int64)[plan.doc[sel]] + plan.start[sel] + skip[sel]
                    b = np.asarray(offsets, np.int64)[plan.doc[sel]] + plan.start[sel] + plan.length[sel]
                    ones = _ones_before(mask, np.concatenate((a, b)))
                    counts[sel] = ones[len(a) :] - ones[: len(a)]
        per_row = np.add.reduceat(counts, starts) if len(starts) else np.zeros(0, np.int64)
        per_row[np.diff(plan.row_offsets) == 0] = 0
        return int(per_row.sum()), int((per_row == 0).sum())


def _ones_before(mask: np.ndarray, positions: np.ndarray, step: int = 1 << 18) -> np.ndarray:
    """How many 1s `mask[:p]` holds, for every p of `positions`, reading the mask file in
    chunks (read, not mapped: every mapped page counts in RSS while the map lives). A
    chunk's running count is int32 (at most `step` bytes of at most 255: no overflow) and
    only the wanted positions of it are widened; both buffers are reused, and small enough
    to stay in cache."""
    if step > (1 << 31) // 256:
        raise ValueError(f"step {step} is too large for an int32 running count")
    order = np.argsort(positions, kind="stable")
    sorted_pos = positions[order]
    out = np.empty(len(positions), np.int64)
    buf, running = np.empty(min(step, len(mask)), np.uint8), np.empty(min(step, len(mask)), np.int32)
    carry, done = 0, 0
    filename: str = mask.filename  # type: ignore[attr-defined]
    with open(filename, "rb") as f:
        f.seek(mask.offset)  # type: ignore[attr-defined]
        for lo in range(0, len(mask) + 1, step):
            hi = min(lo + step, len(mask))
            chunk, cum = buf[: hi - lo], running[: hi - lo]
            if f.readinto(chunk.data) != len(chunk):
                raise StoreError(f"{filename}: shorter than its header says (truncated)")
            np.cumsum(chunk, dtype=np.int32, out=cum)  # cum[i]: the 1s of chunk[: i + 1]
            end = int(np.searchsorted(sorted_pos, hi, side="right"))
            at = sorted_pos[done:end] - lo  # 0 ..= hi - lo: the 1s of chunk[:at]
            out[order[done:end]] = carry + (np.where(at > 0, cum[np.maximum(at - 1, 0)], 0) if len(cum) else 0)
            carry, done = carry + (int(cum[-1]) if len(cum) else 0), end
            if hi == len(mask):
                break
    return out
