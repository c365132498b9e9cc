"""Rendered documents -> one token stream with a per-token loss mask.

Every document becomes a unit `[BOS] ids [EOS]` (BOS where the tokenizer adds one), so
units concatenated give the reference stream `BOS d1 EOS BOS d2 ... EOS BOS dN` once the
final EOS is dropped. Documents are cut at special-token strings and the plain pieces are
encoded in one parallel batch; the special ids are inserted here. This equals encoding
the joined string for tokenizers that split specials out before pre-tokenizing
(byte-level BPE); other tokenizers take `Tokenizer.encode_in_context` instead.

Special tokens written by the template are always ids, on every route; a special-token
string overlapping user content is an id only with `parse_specials` (else it stays text,
the document cut at the template's own special tokens). A special token with HF's
lstrip/rstrip takes the whitespace beside it, as in the joined string.

Loss mask rule (`train_on_prompt=False`): a token is trained when any of its bytes lies
in a trained span, so a token straddling the prompt/response boundary is trained (it
carries response text). Delimiter BOS is never trained; the delimiter EOS is trained
when the template says so (prompt templates: the model must learn to stop).
"""

from __future__ import annotations

import functools
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, chain
from typing import Any, cast

import numpy as np

from .templates import Planned, Rendered, Span
from .tokenizers import Encoded, Tokenizer


@dataclass
class EncodedBatch:
    tokens: np.ndarray  # int64, the units of the batch concatenated
    mask: np.ndarray  # uint8, 1 where the token is a training target
    unit_lengths: np.ndarray  # int64, one per document
    special_docs: int  # documents whose user content holds special-token strings


_TEXT, _ID = 0, 1


def encode_documents(
    tok: Tokenizer,
    docs: Sequence[Rendered] | Planned,
    *,
    train_on_prompt: bool = True,
    parse_specials: bool = True,
    first_in_stream: bool = False,
    has_specials: bool | None = None,
) -> EncodedBatch:
    """Encode a batch of documents into units (see the module docstring). `has_specials`
    (whether any document holds a special-token string) saves a scan when known. Plain
    conversations, not yet rendered (`Planned`) or rendered from their shapes' plans, are
    encoded from the plans."""
    pattern = tok.special_pattern
    planned = docs if isinstance(docs, Planned) else _plans_of(docs)
    if planned is not None:
        if tok.per_piece_exact and pattern is not None and not tok.special_strips:
            batch = _encode_planned(tok, planned, train_on_prompt)
            if batch is not None:
                return batch
        if isinstance(docs, Planned):
            docs, has_specials = docs.rendered(), None
    docs = cast(Sequence[Rendered], docs)
    if has_specials is None:
        has_specials = pattern is not None and any(pattern.search(d.text) for d in docs)
    if tok.per_piece_exact and not has_specials:
        return _encode_plain(tok, docs, train_on_prompt)
    special_ids = tok.special_tokens
    bos = tok.bos_id if tok.adds_bos else None
    eos = tok.eos_id
    in_context = not tok.per_piece_exact
    kinds: list[int] = []  # per item: _TEXT or _ID
    values: list[int] = []  # text index (for _TEXT) or token id (for _ID)
    starts: list[int] = []  # item start inside its document's text, in chars
    ends: list[int] = []  # _ID items: end inside the text in chars; -1 for delimiters
    items_per_doc: list[int] = []
    texts: list[str] = []
    as_text: list[bool] = []  # per text: its special-token strings stay text (in-context encoding)
    special_docs = 0

    split = tok.special_split

    def add(kind: int, value: int, start: int, end: int) -> None:
        kinds.append(kind)
        values.append(value)
        starts.append(start)
        ends.append(end)

    longest = max(map(len, special_ids), default=0)
    strips = tok.special_strips
    # parsed specials and the plain split route: injections are counted for the batch at once,
    # from the special-token items the split makes (they are the specials the stream gets)
    deferred = parse_specials and pattern is not None and split is not None and not in_context and not strips
    if deferred and all(s and "\0" not in s for s in special_ids):
        kind_of, value_of, start_of, end_of, per_doc, pieces = _split_batch(split, special_ids, docs, bos, eos)
        enc = tok.encode(pieces, positions=_positions(tok, train_on_prompt))
        return _finish_batch(tok, docs, train_on_prompt, True, enc, kind_of, value_of, start_of, end_of, per_doc, 0)
    for doc in docs:
        first_item = len(kinds)
        n_texts = len(texts)
        text = doc.text
        if bos is not None:
            add(_ID, bos, 0, -1)
        # a special-token string overlapping user content: an injection, counted
        parts = None
        if pattern is None or not doc.content or deferred:
            injected = False  # counted for the whole batch below where deferred
        elif split is not None and not in_context and not strips:
            parts = split(text)  # the specials the split finds are the ones the stream gets
            injected = _injected(parts, doc.content)
        else:
            injected = any(_overlapping(pattern, text, s, e, longest) for s, e in doc.content)
        special_docs += injected
        keep_text = injected and not parse_specials
        if keep_text or (strips and not in_context):
            # specials written by the template are ids; with keep_text, one overlapping user
            # content (inside it, or straddling its edge) stays text
            cursor = 0
            for m in pattern.finditer(text):  # type: ignore[union-attr]
                if m.start() < cursor or (keep_text and _overlaps(m.start(), m.end(), doc.content)):
                    continue
                start, end = _stripped(text, m, strips, cursor)
                if start > cursor:
                    add(_TEXT, len(texts), cursor, -1)
                    texts.append(text[cursor:start])
                add(_ID, special_ids[m.group()], start, end)
                cursor = end
            if cursor < len(text):
                add(_TEXT, len(texts), cursor, -1)
                texts.append(text[cursor:])
        elif in_context:
            if text:
                add(_TEXT, len(texts), 0, -1)
                texts.append(text)
        else:
            # split() with a capturing group alternates plain text and special-token strings:
            # [text, special, text, ..., text]; whole lists at a time, no per-piece statements
            if parts is None:
                parts = split(text) if split is not None else [text]
            n = len(parts)
            pos = list(accumulate(map(len, parts), initial=0))
            vals = [0] * n
            vals[0::2] = range(len(texts), len(texts) + (n + 1) // 2)
            vals[1::2] = [special_ids[p] for p in parts[1::2]]
            part_ends = [-1] * n
            part_ends[1::2] = pos[2::2]
            texts.extend(parts[0::2])
            kinds.extend([_TEXT, _ID] * (n // 2) + [_TEXT])  # n is odd: text at both ends
            values.extend(vals)
            starts.extend(pos[:-1])
            ends.extend(part_ends)
        as_text.extend([keep_text] * (len(texts) - n_texts))
        if eos is not None:
            add(_ID, eos, len(text), -1)
        items_per_doc.append(len(kinds) - first_item)

    positions = _positions(tok, train_on_prompt)
    if in_context:
        # the stream's first text is at offset 0 of the joined string only when the first
        # document starts with text (not with a special token written by its template)
        lead = 1 if bos is not None else 0
        head = 1 if first_in_stream and items_per_doc and items_per_doc[0] > lead and kinds[lead] == _TEXT else 0
        enc = tok.encode_in_context(texts[head:], False, positions=positions, as_text=as_text[head:])
        if head:
            enc = _concat(tok.encode_in_context(texts[:1], True, positions=positions, as_text=as_text[:1]), enc)
    else:
        enc = tok.encode(texts, positions=positions)

    return _finish_batch(
        tok, docs, train_on_prompt, deferred, enc, kinds, values, starts, ends, items_per_doc, special_docs
    )


def _positions(tok: Tokenizer, train_on_prompt: bool) -> bool:
    """Whether the mask needs each token's position from the encoder (not from its id)."""
    return not train_on_prompt and tok.char_tables is None


def _finish_batch(
    tok: Tokenizer,
    docs: Sequence[Rendered] | _Targets,
    train_on_prompt: bool,
    deferred: bool,
    enc: Encoded,
    kinds: Sequence[int] | np.ndarray,
    values: Sequence[int] | np.ndarray,
    starts: Sequence[int] | np.ndarray,
    ends: Sequence[int] | np.ndarray,
    items_per_doc: Sequence[int] | np.ndarray,
    special_docs: int,
) -> EncodedBatch:
    """The batch's tokens, units and mask from its items (text pieces and token ids in
    stream order) and the encoded text pieces. `docs`: the documents, or (for a batch
    encoded from its plans, never `deferred`) what the mask needs of them."""
    kind = np.asarray(kinds, dtype=np.int8)
    value = np.asarray(values, dtype=np.int64)
    is_text = kind == _TEXT
    seg_lens = np.diff(enc.offsets)
    item_len = np.ones(len(kind), dtype=np.int64)
    item_len[is_text] = seg_lens[value[is_text]]
    item_start = np.zeros(len(kind) + 1, dtype=np.int64)
    np.cumsum(item_len, out=item_start[1:])
    # the text items' tokens are the pieces' in order (piece k is the k-th text item): the
    # places the token-id items leave
    tokens = np.empty(int(item_start[-1]), dtype=np.int64)
    at_id = item_start[:-1][~is_text]
    tokens[at_id] = value[~is_text]
    is_piece = np.ones(len(tokens), dtype=bool)
    is_piece[at_id] = False
    tokens[is_piece] = enc.ids

    doc_of_item = np.repeat(np.arange(len(docs)), items_per_doc)
    if deferred:
        special_docs = _injected_docs(
            cast(Sequence[Rendered], docs),
            kind,
            np.asarray(starts, dtype=np.int64),
            np.asarray(ends, dtype=np.int64),
            doc_of_item,
        )
    unit_lengths = np.bincount(doc_of_item, weights=item_len, minlength=len(docs)).astype(np.int64)
    if train_on_prompt:
        mask = np.ones(len(tokens), dtype=np.uint8)
    else:
        targets = docs if isinstance(docs, _Targets) else _Targets.of(docs)
        mask = _mask(tok, targets, enc, kind, value, starts, ends, item_len, doc_of_item)
    return EncodedBatch(tokens, mask, unit_lengths, special_docs)


def _split_batch(
    split: Any, special_ids: dict[str, int], docs: Sequence[Rendered], bos: int | None, eos: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """The plain split route's items for the whole batch with one `split` of the texts
    joined by NUL (no special-token string holds one, so no match spans two documents and
    each document's matches are its own): per document BOS, its text pieces and special
    tokens in order, EOS; as (kinds, values, starts, ends, items per document, texts)."""
    n = len(docs)
    lengths = np.fromiter((len(d.text) for d in docs), dtype=np.int64, count=n)
    base = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths + 1, out=base[1:])
    joined = "\0".join(d.text for d in docs)
    parts = split(joined)
    bounds = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, parts), dtype=np.int64, count=len(parts)), out=bounds[1:])
    special_start, special_end = bounds[1:-1:2], bounds[2::2]
    special_doc = np.searchsorted(base, special_start, side="right") - 1
    # text pieces: from each document's start and each special's end to the next special's start or the document's end
    text_start = np.concatenate([base[:-1], special_end])
    text_end = np.concatenate([base[:-1] + lengths, special_start])
    text_doc = np.concatenate([np.arange(n), special_doc])
    order = np.argsort(text_start, kind="stable")
    text_start, text_end, text_doc = text_start[order], np.sort(text_end, kind="stable"), text_doc[order]
    texts = [joined[a:b] for a, b in zip(text_start.tolist(), text_end.tolist())]
    # items: position in the joined text, rank among items at one position (BOS, text, special, EOS)
    m, t = len(special_start), len(texts)
    pos = [text_start, special_start]
    rank = [np.full(t, 1), np.full(m, 2)]
    kind = [np.full(t, _TEXT), np.full(m, _ID)]
    value = [np.arange(t), np.asarray([special_ids[p] for p in parts[1::2]], dtype=np.int64).reshape(-1)]
    end = [np.full(t, -1), special_end]
    doc = [text_doc, special_doc]
    for token, at, r in ((bos, base[:-1], 0), (eos, base[:-1] + lengths, 3)):
        if token is not None:
            pos.append(at)
            rank.append(np.full(n, r))
            kind.append(np.full(n, _ID))
            value.append(np.full(n, token))
            end.append(np.full(n, -1))
            doc.append(np.arange(n))
    all_pos = np.concatenate(pos)
    order = np.lexsort((np.concatenate(rank), all_pos))
    item_doc = np.concatenate(doc)[order]
    starts = all_pos[order] - base[item_doc]
    ends = np.concatenate(end)[order]
    ends = np.where(ends >= 0, ends - base[item_doc], -1)
    items_per_doc = np.bincount(item_doc, minlength=n)
    return (
        np.concatenate(kind)[order].astype(np.int8),
        np.concatenate(value)[order].astype(np.int64),
        starts,
        ends,
        items_per_doc,
        texts,
    )


def _plans_of(docs: Sequence[Rendered]) -> Planned | None:
    """The documents as their plans and message text, where every one has a plan."""
    if not docs or any(d.plan is None for d in docs):
        return None
    return Planned([cast(Any, d.plan) for d in docs], [cast(list[str], d.values) for d in docs])


def _encode_planned(tok: Tokenizer, batch: Planned, train_on_prompt: bool) -> EncodedBatch | None:
    """The split route's items, without splitting or rendering: the items, text pieces and
    trained spans of each conversation shape in the batch are worked out once (`_recipe`)
    and laid out for all its documents at once, shifted by the lengths of their message
    text; the pieces are made of their literal text and runs of message text. None where
    the split route must take the batch (a run holding a special-token string, which it
    splits and counts; a shape whose recipe is refused or has no special token)."""
    bos = tok.bos_id if tok.adds_bos else None
    eos = tok.eos_id
    if cast(re.Pattern[str], tok.special_pattern).search("\0".join(chain.from_iterable(batch.values))):
        return None  # (no special-token string holds NUL: a match is inside a run)
    recipes = _recipes(tok, bos, eos)
    groups: dict[Any, list[int]] = {}
    for d, plan in enumerate(batch.plans):
        groups.setdefault(plan, []).append(d)
    shapes = []
    n = len(batch.plans)
    n_items = np.empty(n, dtype=np.int64)
    n_texts = np.empty(n, dtype=np.int64)
    for plan, group in groups.items():
        recipe = recipes.get(plan.literals)
        if recipe is None:
            if len(recipes) >= 4096:
                recipes.clear()
            recipe = recipes[plan.literals] = _recipe(tok, plan.literals, bos, eos)
        if recipe is None:
            return None
        n_items[group], n_texts[group] = recipe.n_items, recipe.n_texts
        shapes.append((plan, recipe, np.asarray(group, dtype=np.int64)))
    item_at = np.zeros(n + 1, dtype=np.int64)  # each document's first item, its first text piece
    np.cumsum(n_items, out=item_at[1:])
    text_at = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(n_texts, out=text_at[1:])
    kinds = np.empty(int(item_at[-1]), dtype=np.int8)
    values = np.empty(int(item_at[-1]), dtype=np.int64)
    starts = np.empty(int(item_at[-1]), dtype=np.int64)
    ends = np.empty(int(item_at[-1]), dtype=np.int64)
    pieces: list[str] = []  # by shape, then by form, then by document
    order = np.empty(int(text_at[-1]), dtype=np.int64)  # the text pieces in stream order, as indices into it
    span_lo, span_hi = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    train_eos = np.empty(n, dtype=bool)
    for plan, recipe, members in shapes:
        runs = [batch.values[d] for d in members.tolist()]
        g, k, width = len(members), plan.cut, len(runs[0])
        lengths = np.fromiter(map(len, chain.from_iterable(runs)), dtype=np.int64, count=g * width).reshape(g, width)
        cum = np.zeros((g, k + 1), dtype=np.int64)  # message text before each literal of the document
        np.cumsum(lengths[:, :k], axis=1, out=cum[:, 1:])
        at = item_at[members][:, None] + np.arange(recipe.n_items)
        kinds[at] = recipe.kinds
        is_text = recipe.kinds == _TEXT
        ids = np.broadcast_to(recipe.ids, at.shape).copy()
        ids[:, is_text] = text_at[members][:, None] + np.arange(recipe.n_texts)
        values[at] = ids
        starts[at] = recipe.start + cum[:, recipe.start_runs]
        ends[at] = np.where(recipe.end_runs < 0, -1, recipe.end + cum[:, recipe.end_runs])
        order[text_at[members][:, None] + np.arange(recipe.n_texts)] = (
            len(pieces) + np.arange(recipe.n_texts) * g + np.arange(g)[:, None]
        )
        for head, between, after in recipe.forms:
            pieces += _planned_texts(head, between, after, runs)
        train_eos[members] = plan.train_eos
        if not train_on_prompt and plan.trained:
            # the plan's spans are (literal, offset) pairs: where each literal starts, per document
            starts_of = np.empty((g, width + 1), dtype=np.int64)
            starts_of[:, 0] = -plan.shift
            np.cumsum(lengths + np.asarray(plan.lengths[:width]), axis=1, out=starts_of[:, 1:])
            starts_of[:, 1:] -= plan.shift
            a, da, b, db = np.asarray(plan.trained, dtype=np.int64).T
            stride = members[:, None] * _STRIDE
            span_lo.append((starts_of[:, a] + da + stride).ravel())
            span_hi.append((starts_of[:, b] + db + stride).ravel())
    texts = list(map(pieces.__getitem__, order.tolist()))
    enc = tok.encode(texts, positions=_positions(tok, train_on_prompt))
    lo, hi = np.concatenate(span_lo), np.concatenate(span_hi)
    targets = _Targets(lo[hi > lo], hi[hi > lo], train_eos)
    return _finish_batch(tok, targets, train_on_prompt, False, enc, kinds, values, starts, ends, n_items, 0)


def _planned_texts(head: str, between: range, after: list[str], runs: list[list[str]]) -> list[str]:
    """One text piece of a shape for each document: `head`, then for each j in `between`
    the document's run j and the literal text after it."""
    if not between:
        return [head] * len(runs)
    if len(between) == 1:
        j, tail = between[0], after[0]
        if not tail:
            return [run[j] for run in runs] if not head else [head + run[j] for run in runs]
        return [f"{head}{run[j]}{tail}" for run in runs]
    return ["".join([head, *chain.from_iterable(zip([run[j] for j in between], after))]) for run in runs]


class _Recipe:
    """A conversation shape's items for one tokenizer: kinds, token ids (text items get
    their index later), and each item's start (and special tokens' end; text pieces' end)
    as a constant plus the length of the message text before it (`*_runs`: how many runs)."""

    __slots__ = (
        "kinds",
        "ids",
        "start",
        "start_runs",
        "end",
        "end_runs",
        "text_end",
        "text_end_runs",
        "n_items",
        "n_texts",
        "forms",
    )

    def __init__(
        self,
        literals: tuple[str, ...],
        items: list[tuple[int, int, int, int, int, int]],
        text_ends: list[tuple[int, int]],
    ) -> None:
        columns = np.asarray(items, dtype=np.int64).reshape(-1, 6).T
        self.kinds, self.ids, self.start, self.start_runs, self.end, self.end_runs = columns
        self.kinds = self.kinds.astype(np.int8)
        self.text_end, self.text_end_runs = np.asarray(text_ends, dtype=np.int64).reshape(-1, 2).T
        self.n_items, self.n_texts = len(items), len(text_ends)
        # each text piece as the literal text and runs it is made of: head, then run j and the
        # literal text after it for each j in runs (`_planned_texts` builds them)
        before = list(accumulate(map(len, literals), initial=0))  # literal text before literal k
        starts = [(int(a), int(r)) for k, a, r in zip(self.kinds, self.start, self.start_runs) if k == _TEXT]
        self.forms: list[tuple[str, range, list[str]]] = []
        for (a, r1), (b, r2) in zip(starts, text_ends):
            head, tail = a - before[r1], b - before[r2]
            if r1 == r2:
                self.forms.append((literals[r1][head:tail], range(0), []))
            else:
                after = [*literals[r1 + 1 : r2], literals[r2][:tail]]
                self.forms.append((literals[r1][head:], range(r1, r2), after))


def _recipe(tok: Tokenizer, literals: tuple[str, ...], bos: int | None, eos: int | None) -> _Recipe | None:
    """The items of documents made of `literals` with message text between (see
    `_encode_planned`); None where a special token could straddle a literal's edge (message
    text beside it could complete one), or where the literals hold no special token."""
    literal = _literals(tok)
    ids = tok.special_tokens
    items: list[tuple[int, int, int, int, int, int]] = []  # kind, id, start, its runs, end, its runs
    text_ends: list[tuple[int, int]] = []
    if bos is not None:
        items.append((_ID, bos, 0, 0, 0, -1))
    pos = runs = 0  # the position: pos + the length of the first `runs` runs of message text
    piece = (0, 0)
    last = len(literals) - 1
    for k, text in enumerate(literals):
        runs = k
        parts, head, tail, inside = literal(text)
        if (k and head) or (k < last and tail) or (0 < k < last and inside):
            return None
        pos += len(parts[0])
        for j in range(1, len(parts), 2):
            items.append((_TEXT, 0, *piece, 0, -1))
            text_ends.append((pos, runs))
            special = parts[j]
            items.append((_ID, ids[special], pos, runs, pos + len(special), runs))
            pos += len(special)
            piece = (pos, runs)
            pos += len(parts[j + 1])
    items.append((_TEXT, 0, *piece, 0, -1))
    text_ends.append((pos, runs))
    if eos is not None:
        items.append((_ID, eos, pos, runs, 0, -1))
    if not any(end_runs >= 0 for _, _, _, _, _, end_runs in items):
        return None  # no special token: the split route takes it
    return _Recipe(literals, *_known_texts(tok, literals, items, text_ends))


def _known_texts(
    tok: Tokenizer,
    literals: tuple[str, ...],
    items: list[tuple[int, int, int, int, int, int]],
    text_ends: list[tuple[int, int]],
) -> tuple[list[tuple[int, int, int, int, int, int]], list[tuple[int, int]]]:
    """`items` with each text piece made of literal text alone (no message text: the same
    in every document) replaced by its tokens, encoded once here: one token item each,
    over its characters, and none for an empty piece. Only message text is then encoded
    per document. A piece whose tokens split a character stays a text piece."""
    before = list(accumulate(map(len, literals), initial=0))  # literal text before literal k
    kept: list[tuple[int, int, int, int, int, int]] = []
    kept_ends: list[tuple[int, int]] = []
    ends = iter(text_ends)
    for item in items:
        if item[0] != _TEXT:
            kept.append(item)
            continue
        (start, runs), (end, end_runs) = item[2:4], next(ends)
        if runs == end_runs:
            text = literals[runs][start - before[runs] : end - before[runs]]
            ids = tok.encode([text]).ids.tolist() if text else []
            lengths = tok.char_lengths(ids)
            if lengths is not None and sum(lengths) == len(text):
                for token, length in zip(ids, lengths):
                    kept.append((_ID, token, start, runs, start + length, runs))
                    start += length
                continue
        kept.append(item)
        kept_ends.append((end, end_runs))
    return kept, kept_ends


_RECIPES: weakref.WeakKeyDictionary[Tokenizer, dict[Any, Any]] = weakref.WeakKeyDictionary()


def _recipes(tok: Tokenizer, bos: int | None, eos: int | None) -> dict[tuple[str, ...], _Recipe | None]:
    """`tok`'s recipes by literals (delimiters as given), for the engine that encodes now
    (a recipe holds the tokens of its literal text)."""
    by_delimiters = _RECIPES.setdefault(getattr(tok, "active", tok), {})
    return by_delimiters.setdefault((bos, eos), {})


_LITERALS: weakref.WeakKeyDictionary[Tokenizer, Any] = weakref.WeakKeyDictionary()


def _literals(tok: Tokenizer) -> Any:
    """`tok`'s cached view of a template literal: (its split at special tokens, whether it
    starts with a proper suffix of a special token, ends with a proper prefix of one, or
    lies inside one): the ways text beside it could complete a special token."""
    cached = _LITERALS.get(tok)
    if cached is not None:
        return cached
    specials = list(tok.special_tokens)
    prefixes = {s[:j] for s in specials for j in range(1, len(s))}
    suffixes = {s[j:] for s in specials for j in range(1, len(s))}
    longest = max(map(len, specials), default=0)
    split = cast(Any, tok.special_split)

    @functools.lru_cache(maxsize=4096)
    def literal(text: str) -> tuple[list[str], bool, bool, bool]:
        reach = range(1, min(len(text), longest) + 1)
        return (
            split(text),
            any(text[:j] in suffixes for j in reach),
            any(text[-j:] in prefixes for j in reach),
            len(text) < longest and any(text in s for s in specials),
        )

    _LITERALS[tok] = literal
    return literal


def _encode_plain(tok: Tokenizer, docs: Sequence[Rendered], train_on_prompt: bool) -> EncodedBatch:
    """The common case, vectorised: no special-token string anywhere, one text piece per document."""
    n = len(docs)
    enc = tok.encode([d.text for d in docs], positions=_positions(tok, train_on_prompt))
    slots = ([tok.bos_id] if tok.adds_bos else []) + [None] + ([tok.eos_id] if tok.eos_id is not None else [])
    text_slot = slots.index(None)
    k = len(slots)
    seg_lens = np.diff(enc.offsets)
    item_len = np.ones((n, k), dtype=np.int64)
    item_len[:, text_slot] = seg_lens
    unit_lengths = item_len.sum(axis=1)
    unit_start = np.concatenate(([0], np.cumsum(unit_lengths)[:-1]))
    tokens = np.empty(int(unit_lengths.sum()), dtype=enc.ids.dtype)
    is_delim = np.ones(len(tokens), dtype=bool)
    for slot, token in enumerate(slots):
        first = unit_start + item_len[:, :slot].sum(axis=1)
        if token is not None:
            tokens[first] = token
    is_delim[np.repeat(unit_start + text_slot - enc.offsets[:-1], seg_lens) + np.arange(len(enc.ids))] = False
    tokens[~is_delim] = enc.ids
    if train_on_prompt:
        return EncodedBatch(tokens, np.ones(len(tokens), dtype=np.uint8), unit_lengths, 0)
    if tok.char_tables is None and all(len(d.trained) <= 1 for d in docs):  # prompt templates: one span each
        mask = np.zeros(len(tokens), dtype=np.uint8)
        mask[~is_delim] = _single_span_mask(tok, docs, enc)
        if tok.eos_id is not None:
            mask[unit_start + unit_lengths - 1] = np.fromiter((d.train_eos for d in docs), dtype=bool, count=n)
        return EncodedBatch(tokens, mask, unit_lengths, 0)
    kind = np.tile(np.asarray([_ID if t is not None else _TEXT for t in slots], dtype=np.int8), n)
    value = np.tile(np.asarray([t if t is not None else 0 for t in slots], dtype=np.int64), (n, 1))
    value[:, text_slot] = np.arange(n)
    lengths = np.fromiter((len(d.text) for d in docs), dtype=np.int64, count=n)
    starts = np.zeros((n, k), dtype=np.int64)
    if tok.eos_id is not None:
        starts[:, -1] = lengths
    ends = np.full(n * k, -1, dtype=np.int64)
    mask = _mask(
        tok,
        _Targets.of(docs),
        enc,
        kind,
        value.ravel(),
        starts.ravel(),
        ends,
        item_len.ravel(),
        np.repeat(np.arange(n), k),
    )
    return EncodedBatch(tokens, mask, unit_lengths, 0)


def _token_starts(enc: Encoded) -> np.ndarray:
    """Each token's start inside its text: as encoded, else the previous token's end (0 for
    a text's first)."""
    if enc.starts is not None:
        return enc.starts
    ends = cast(np.ndarray, enc.ends)  # encoded with positions=True
    starts = np.empty_like(ends)
    starts[1:] = ends[:-1]
    starts[enc.offsets[:-1][np.diff(enc.offsets) > 0]] = 0
    return starts


def _single_span_mask(tok: Tokenizer, docs: Sequence[Rendered], enc: Encoded) -> np.ndarray:
    """The text tokens' mask when each document has at most one trained span, in each
    document's own coordinates (no global search needed)."""
    n = len(docs)
    seg_lens = np.diff(enc.offsets)
    starts = _token_starts(enc)
    ends = np.maximum(cast(np.ndarray, enc.ends), starts + 1)  # zero-width tokens attach to the next character
    lo = np.zeros(n, dtype=np.int64)
    hi = np.zeros(n, dtype=np.int64)
    for d, doc in enumerate(docs):
        if doc.trained:
            lo[d], hi[d] = doc.trained[0]
    lo[hi <= lo] = np.iinfo(np.int64).max  # an empty span trains nothing
    token_doc = np.repeat(np.arange(n), seg_lens)
    return ((ends > lo[token_doc]) & (starts < hi[token_doc])).astype(np.uint8)


def _overlaps(start: int, end: int, spans: Sequence[Span]) -> bool:
    """Whether [start, end) shares a character with one of the spans (user content)."""
    return any(start < e and s < end for s, e in spans)


def _stripped(text: str, m: re.Match[str], strips: dict[str, tuple[bool, bool]], cursor: int) -> tuple[int, int]:
    """A special token's span as HF cuts it: with lstrip/rstrip it takes the whitespace
    beside it (never reaching back before `cursor`, the previous token's end)."""
    start, end = m.span()
    lstrip, rstrip = strips.get(m.group(), (False, False))
    while lstrip and start > cursor and text[start - 1].isspace():
        start -= 1
    while rstrip and end < len(text) and text[end].isspace():
        end += 1
    return start, end


def _injected(parts: list[str], content: Sequence[Span]) -> bool:
    """Whether a special-token string of a split text ([text, special, text, ...]) overlaps
    a non-empty content span (lies in it, or straddles its edge)."""
    if len(parts) == 1:
        return False
    spans = sorted((s, e) for s, e in content if e > s)
    if not spans:
        return False
    pos, k = len(parts[0]), 0
    for i in range(1, len(parts), 2):
        start = pos
        pos += len(parts[i])
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        if k == len(spans):
            return False
        if spans[k][0] < pos:
            return True
        pos += len(parts[i + 1])
    return False


def _injected_docs(
    docs: Sequence[Rendered], kind: np.ndarray, starts: np.ndarray, ends: np.ndarray, doc_of_item: np.ndarray
) -> int:
    """How many documents have a special-token item overlapping their content (the batch's
    texts joined by one separator: one coordinate system, one search)."""
    special = (kind == _ID) & (ends >= 0)
    if not special.any():
        return 0
    n = len(docs)
    base = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.fromiter((len(d.text) + 1 for d in docs), dtype=np.int64, count=n), out=base[1:])
    flat = [p for d in docs for span in d.content if span[1] > span[0] for p in span]
    if not flat:
        return 0
    spans = np.asarray(flat, dtype=np.int64).reshape(-1, 2)
    span_doc = np.repeat(np.arange(n), [sum(1 for a, b in d.content if b > a) for d in docs])
    lo, hi = spans[:, 0] + base[span_doc], spans[:, 1] + base[span_doc]
    order = np.argsort(lo, kind="stable")
    lo, hi = lo[order], np.maximum.accumulate(hi[order])
    item_doc = doc_of_item[special]
    s_lo, s_hi = starts[special] + base[item_doc], ends[special] + base[item_doc]
    k = np.searchsorted(lo, s_hi, side="left") - 1
    hit = (k >= 0) & (hi[np.maximum(k, 0)] > s_lo)
    return len(np.unique(item_doc[hit]))


def _overlapping(pattern: re.Pattern[str], text: str, start: int, end: int, longest: int) -> bool:
    """Whether a special-token string overlaps text[start:end]: lies in it, or straddles an
    edge (user text completed by the template's characters must not make a special token)."""
    if end <= start:
        return False
    lo, hi = max(start - longest + 1, 0), min(end + longest - 1, len(text))
    return any(m.start() < end and start < m.end() for m in pattern.finditer(text, lo, hi))


def _concat(a: Encoded, b: Encoded) -> Encoded:
    ends = None if a.ends is None or b.ends is None else np.concatenate([a.ends, b.ends])
    return Encoded(np.concatenate([a.ids, b.ids]), np.concatenate([a.offsets, b.offsets[1:] + a.offsets[-1]]), ends)


def _mask(
    tok: Tokenizer,
    targets: _Targets,
    enc: Encoded,
    kind: np.ndarray,
    value: np.ndarray,
    starts: Sequence[int] | np.ndarray,
    ends: Sequence[int] | np.ndarray,
    item_len: np.ndarray,
    doc_of_item: np.ndarray,
) -> np.ndarray:
    """1 for tokens overlapping a trained span of their document, for the whole batch at
    once: every token's [start, end) in characters, the documents laid `_STRIDE` apart on
    one increasing coordinate; each span then covers one run of tokens, found by two binary
    searches, and the runs are marked."""
    if tok.char_tables is not None:
        return _mask_from_ids(tok, targets, enc, kind, value, starts, ends, item_len, doc_of_item)
    start_arr = np.asarray(starts, dtype=np.int64) + doc_of_item * _STRIDE
    end_arr = np.asarray(ends, dtype=np.int64)
    is_text = kind == _TEXT
    # text tokens inside their piece; special tokens over their text; delimiters (BOS, EOS)
    # empty at their place
    item_of_token = np.repeat(np.arange(len(kind)), item_len)
    lo = start_arr[item_of_token]
    hi = np.where(end_arr >= 0, end_arr + doc_of_item * _STRIDE, start_arr)[item_of_token]
    text_tok = is_text[item_of_token]
    piece_lo = lo[text_tok]
    lo[text_tok] = piece_lo + _token_starts(enc)
    hi[text_tok] = piece_lo + cast(np.ndarray, enc.ends)
    hi = np.maximum(hi, lo + 1)  # zero-width tokens attach to the next character
    first = np.searchsorted(hi, targets.lo, side="right")  # the first token ending after the span starts
    stop = np.searchsorted(lo, targets.hi, side="left")  # the first token starting at or after its end
    return _marked(tok, targets, first, stop, kind, value, end_arr, item_len, doc_of_item)


@dataclass
class _Targets:
    """What a batch's mask needs of its documents: every non-empty trained span's start and
    end (the documents `_STRIDE` apart), and whether each document's EOS is trained."""

    lo: np.ndarray
    hi: np.ndarray
    train_eos: np.ndarray

    def __len__(self) -> int:
        return len(self.train_eos)

    @staticmethod
    def of(docs: Sequence[Rendered]) -> _Targets:
        spans = [(d * _STRIDE + a, d * _STRIDE + b) for d, doc in enumerate(docs) for a, b in doc.trained if b > a]
        bounds = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
        train_eos = np.fromiter((d.train_eos for d in docs), dtype=bool, count=len(docs))
        return _Targets(bounds[:, 0], bounds[:, 1], train_eos)


def _marked(
    tok: Tokenizer,
    targets: _Targets,
    first: np.ndarray,
    stop: np.ndarray,
    kind: np.ndarray,
    value: np.ndarray,
    ends: np.ndarray,
    item_len: np.ndarray,
    doc_of_item: np.ndarray,
) -> np.ndarray:
    """The mask with tokens [first, stop) of every span trained, and the delimiters: BOS
    never trained, EOS trained when the document's template asks for it."""
    stream_at = np.concatenate(([0], np.cumsum(item_len)[:-1]))  # each item's first token in the stream
    total = int(item_len.sum())
    runs = first < stop
    marks = np.zeros(total + 1, dtype=np.int32)  # +1 where a run starts, -1 where one ends
    np.add.at(marks, first[runs], 1)
    np.add.at(marks, stop[runs], -1)
    mask = np.cumsum(marks[:-1], dtype=np.int32) > 0
    delim = np.flatnonzero((kind != _TEXT) & (ends < 0))
    mask[stream_at[delim]] = (value[delim] == tok.eos_id) & targets.train_eos[doc_of_item[delim]]
    return mask.view(np.uint8)


_STRIDE = 1 << 40  # from one document's start to the next's in `_mask`: more than any document's length


def _mask_from_ids(
    tok: Tokenizer,
    targets: _Targets,
    enc: Encoded,
    kind: np.ndarray,
    value: np.ndarray,
    starts: Sequence[int] | np.ndarray,
    ends: Sequence[int] | np.ndarray,
    item_len: np.ndarray,
    doc_of_item: np.ndarray,
) -> np.ndarray:
    """`_mask` for byte-level engines, from the ids alone: the characters the text tokens
    begin, accumulated over the batch, rise monotonically, so the token where a span starts
    or ends inside a text piece is one binary search; nothing is computed per token but that
    sum and the marks."""
    begins, inside = cast(tuple[np.ndarray, np.ndarray], tok.char_tables)
    ids = enc.ids
    cum = np.cumsum(begins[ids])
    offsets = enc.offsets
    base = np.zeros(len(offsets) - 1, dtype=np.int64)  # characters begun before each piece
    after = offsets[:-1] > 0
    base[after] = cum[offsets[:-1][after] - 1]
    item_at = np.asarray(starts, dtype=np.int64) + doc_of_item * _STRIDE
    stream_at = np.concatenate(([0], np.cumsum(item_len)[:-1]))  # each item's first token in the stream
    is_text = kind == _TEXT
    lo, hi = targets.lo, targets.hi
    # the first trained token: in the item holding the span's first character
    item = np.searchsorted(item_at, lo, side="right") - 1
    first = stream_at[item].copy()
    text = is_text[item]
    piece = value[item[text]]
    at = np.searchsorted(cum, base[piece] + lo[text] - item_at[item[text]], side="right")  # the first ending after
    first[text] += at - offsets[piece]
    # the first token past it: in the item holding the span's last character
    item = np.searchsorted(item_at, hi - 1, side="right") - 1
    stop = stream_at[item] + 1
    text = is_text[item]
    piece = value[item[text]]
    target = base[piece] + hi[text] - item_at[item[text]]
    t = np.searchsorted(cum, target, side="left") + 1  # the token after the one holding the last character
    end = offsets[piece + 1]
    while True:  # tokens that begin inside that character (byte-level BPE splits some) hold it too
        inner = t < end
        inner[inner] = cum[t[inner] - 1] - inside[ids[t[inner]]] < target[inner]
        if not inner.any():
            break
        t[inner] += 1
    stop[text] = stream_at[item[text]] + t - offsets[piece]
    return _marked(tok, targets, first, stop, kind, value, np.asarray(ends, dtype=np.int64), item_len, doc_of_item)
