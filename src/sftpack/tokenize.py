"""Rendered documents -> one token stream with a per-token loss mask.

Every document becomes a unit `[BOS] ids [EOS]` (BOS where the tokenizer adds one), so
units concatenated give the reference stream `BOS d1 EOS BOS d2 ... EOS BOS dN` once the
final EOS is dropped. Documents are cut at special-token strings and the plain pieces are
encoded in one parallel batch; the special ids are inserted here. This equals encoding
the joined string for tokenizers that split specials out before pre-tokenizing
(byte-level BPE); other tokenizers take `Tokenizer.encode_in_context` instead.

Loss mask rule (`train_on_prompt=False`): a token is trained when any of its bytes lies
in a trained span, so a token straddling the prompt/response boundary is trained (it
carries response text). Delimiter BOS is never trained; the delimiter EOS is trained
when the template says so (prompt templates: the model must learn to stop).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .templates import Rendered, Span
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
    docs: Sequence[Rendered],
    *,
    train_on_prompt: bool = True,
    parse_specials: bool = True,
    first_in_stream: bool = False,
) -> EncodedBatch:
    """Encode a batch of documents into units (see the module docstring)."""
    pattern = tok.special_pattern
    if train_on_prompt and tok.per_piece_exact and (pattern is None or not any(pattern.search(d.text) for d in docs)):
        return _encode_plain(tok, docs)
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
    as_text: list[bool] = []  # in-context documents whose special-token strings stay text
    special_docs = 0

    for doc in docs:
        first_item = len(kinds)
        text = doc.text
        if bos is not None:
            kinds.append(_ID), values.append(bos), starts.append(0), ends.append(-1)
        matches = list(pattern.finditer(text)) if pattern is not None else []
        injected = bool(matches) and any(_inside(m.start(), doc.content) for m in matches)
        special_docs += injected
        if in_context:
            if text:
                kinds.append(_TEXT), values.append(len(texts)), starts.append(0), ends.append(-1)
                texts.append(text)
                as_text.append(injected and not parse_specials)
        else:
            cursor = 0
            for m in matches:
                if not parse_specials and _inside(m.start(), doc.content):
                    continue  # user text that looks like a special token stays text
                if m.start() > cursor:
                    kinds.append(_TEXT), values.append(len(texts)), starts.append(cursor), ends.append(-1)
                    texts.append(text[cursor : m.start()])
                kinds.append(_ID), values.append(special_ids[m.group()]), starts.append(m.start()), ends.append(m.end())
                cursor = m.end()
            if cursor < len(text):
                kinds.append(_TEXT), values.append(len(texts)), starts.append(cursor), ends.append(-1)
                texts.append(text[cursor:])
        if eos is not None:
            kinds.append(_ID), values.append(eos), starts.append(len(text)), ends.append(-1)
        items_per_doc.append(len(kinds) - first_item)

    positions = not train_on_prompt
    if in_context:
        head = 1 if first_in_stream and texts and docs[0].text else 0
        enc = tok.encode_in_context(texts[head:], False, positions=positions, as_text=as_text[head:])
        if head:
            enc = _concat(tok.encode_in_context(texts[:1], True, positions=positions, as_text=as_text[:1]), enc)
    else:
        enc = tok.encode(texts, positions=positions)

    kind = np.asarray(kinds, dtype=np.int8)
    value = np.asarray(values, dtype=np.int64)
    is_text = kind == _TEXT
    seg_lens = np.diff(enc.offsets)
    item_len = np.ones(len(kind), dtype=np.int64)
    item_len[is_text] = seg_lens[value[is_text]]
    item_start = np.zeros(len(kind) + 1, dtype=np.int64)
    np.cumsum(item_len, out=item_start[1:])
    tokens = np.empty(int(item_start[-1]), dtype=np.int64)
    tokens[item_start[:-1][~is_text]] = value[~is_text]
    text_item_start = item_start[:-1][is_text]
    tokens[np.repeat(text_item_start - enc.offsets[:-1], seg_lens) + np.arange(len(enc.ids))] = enc.ids

    doc_of_item = np.repeat(np.arange(len(docs)), items_per_doc)
    unit_lengths = np.bincount(doc_of_item, weights=item_len, minlength=len(docs)).astype(np.int64)
    if train_on_prompt:
        mask = np.ones(len(tokens), dtype=np.uint8)
    else:
        mask = _mask(tok, docs, enc, kind, value, starts, ends, item_len, doc_of_item, texts)
    return EncodedBatch(tokens, mask, unit_lengths, special_docs)


def _encode_plain(tok: Tokenizer, docs: Sequence[Rendered]) -> EncodedBatch:
    """The common case, fully vectorised: no special-token string anywhere, no loss mask."""
    enc = tok.encode([d.text for d in docs])
    head = [tok.bos_id] if tok.adds_bos else []
    tail = [tok.eos_id] if tok.eos_id is not None else []
    extra = len(head) + len(tail)
    lengths = np.diff(enc.offsets) + extra
    n = len(docs)
    tokens = np.empty(len(enc.ids) + extra * n, dtype=enc.ids.dtype)
    unit_start = enc.offsets[:-1] + extra * np.arange(n)
    if head:
        tokens[unit_start] = head[0]
    if tail:
        tokens[unit_start + lengths - 1] = tail[0]
    keep = np.ones(len(tokens), dtype=bool)
    if head:
        keep[unit_start] = False
    if tail:
        keep[unit_start + lengths - 1] = False
    tokens[keep] = enc.ids
    return EncodedBatch(tokens, np.ones(len(tokens), dtype=np.uint8), lengths.astype(np.int64), 0)


def _inside(pos: int, spans: Sequence[Span]) -> bool:
    return any(s <= pos < e for s, e in spans)


def _concat(a: Encoded, b: Encoded) -> Encoded:
    ends = None if a.ends is None or b.ends is None else np.concatenate([a.ends, b.ends])
    return Encoded(np.concatenate([a.ids, b.ids]), np.concatenate([a.offsets, b.offsets[1:] + a.offsets[-1]]), ends)


def _mask(tok: Tokenizer, docs: Sequence[Rendered], enc: Encoded, kind: np.ndarray, value: np.ndarray,
          starts: list[int], ends: list[int], item_len: np.ndarray, doc_of_item: np.ndarray,
          texts: list[str]) -> np.ndarray:
    """1 for tokens overlapping a trained span of their document (positions in `tok.unit`)."""
    to_unit = _byte_positions if tok.unit == "byte" else _char_positions
    # Per document: a base offset in one global coordinate system, so all spans of the
    # batch can be searched at once.
    unit_len = [to_unit(d.text, [len(d.text)])[0] for d in docs]
    base = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(np.asarray(unit_len, dtype=np.int64) + 1, out=base[1:])
    span_lo: list[int] = []
    span_hi: list[int] = []
    for d, doc in enumerate(docs):
        flat = [p for span in doc.trained for p in span]
        conv = to_unit(doc.text, flat)
        for i in range(0, len(conv), 2):
            if conv[i + 1] > conv[i]:
                span_lo.append(conv[i] + int(base[d])), span_hi.append(conv[i + 1] + int(base[d]))
    item_lo = np.empty(len(kind), dtype=np.int64)
    item_hi = np.empty(len(kind), dtype=np.int64)
    for i, (d, s, e) in enumerate(zip(doc_of_item.tolist(), starts, ends)):
        text = docs[d].text
        lo, hi = to_unit(text, [s, e if e >= 0 else s])
        item_lo[i], item_hi[i] = lo + base[d], hi + base[d]

    n = int(item_len.sum())
    lo = np.repeat(item_lo, item_len)
    hi = np.repeat(item_hi, item_len)
    is_text = kind == _TEXT
    if is_text.any():
        # tokens of text items: [start of piece + previous end, start of piece + own end)
        token_item = np.repeat(np.arange(len(kind)), item_len)
        text_tok = is_text[token_item]
        piece_ends = enc.ends
        prev = np.empty_like(piece_ends)
        prev[1:] = piece_ends[:-1]
        prev[enc.offsets[:-1][np.diff(enc.offsets) > 0]] = 0
        piece_lo = lo[text_tok]
        lo[text_tok] = piece_lo + prev
        hi[text_tok] = piece_lo + piece_ends
    hi = np.maximum(hi, lo + 1)  # zero-width tokens attach to the next character
    span_lo_a = np.asarray(span_lo, dtype=np.int64)
    span_hi_a = np.asarray(span_hi, dtype=np.int64)
    k = np.searchsorted(span_lo_a, hi, side="left")
    mask = (k > 0) & (span_hi_a[np.maximum(k - 1, 0)] > lo) if len(span_lo_a) else np.zeros(n, dtype=bool)
    # delimiters: BOS never trained; EOS trained when the document's template asks for it
    delim_items = np.flatnonzero((kind == _ID) & (np.asarray(ends) < 0))
    item_first_token = np.concatenate(([0], np.cumsum(item_len)[:-1]))
    eos = tok.eos_id
    for i in delim_items.tolist():
        d = int(doc_of_item[i])
        mask[item_first_token[i]] = value[i] == eos and docs[d].train_eos
    return mask.astype(np.uint8)


def _byte_positions(text: str, positions: list[int]) -> list[int]:
    if text.isascii():
        return positions
    return [len(text[:p].encode("utf-8")) for p in positions]


def _char_positions(text: str, positions: list[int]) -> list[int]:
    return positions
