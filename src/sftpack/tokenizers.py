"""One small interface over quicktok and Hugging Face tokenizers.

The packer needs: ids for many texts at once (with each token's end position when loss
masks are computed), the special tokens, BOS/EOS, the vocabulary size and a fingerprint
of everything that decides the ids. `load_tokenizer` accepts a bundled name
("llama3", "qwen3", "cl100k_base", "o200k_base"), a Hugging Face tokenizer object, a
path to a HF tokenizer directory or tokenizer.json, or a quicktok encoding.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import cached_property, lru_cache
from typing import Any

import numpy as np
import xxhash

from .errors import ConfigError, TokenizerError

DEFAULT_TOKENIZER = "llama3"
# bundled quicktok encoding -> (BOS string or None, EOS string)
_BUNDLED = {
    "llama3": ("<|begin_of_text|>", "<|end_of_text|>"),
    "qwen3": (None, "<|endoftext|>"),
    "cl100k_base": (None, "<|endoftext|>"),
    "o200k_base": (None, "<|endoftext|>"),
}
# A fixed text whose ids capture the pre-tokenizer and merges in the fingerprint.
_PROBE = "Hello, world! 123456 don't  \n\n\tcafé 日本語 🚀 x=1;y=[2]  "


_TRIE_DEPTH = 100  # the longest special token the trie takes (see `_special_pattern`)


@lru_cache(maxsize=8)
def _special_pattern(specials: tuple[str, ...]) -> re.Pattern[str]:
    """The specials as a trie (faster to compile and to search than their alternation, with
    the same matches): at each character the longer continuation is tried first, so a
    special token that prefixes another never wins where the longer one matches. The trie
    is built and compiled a level per character: a special token longer than `_TRIE_DEPTH`
    takes the alternation, longest first (the same matches), within Python's recursion limit."""
    if max(map(len, specials), default=0) > _TRIE_DEPTH:
        return re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")
    trie: dict[str, Any] = {}
    for special in specials:
        node = trie
        for char in special:
            node = node.setdefault(char, {})
        node[""] = {}  # a special token ends here

    def regex(node: dict[str, Any]) -> str:
        branches = [re.escape(char) + regex(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return re.compile("(" + regex(trie) + ")")


class Encoded:
    """Ids of many texts: text i is `ids[offsets[i]:offsets[i+1]]`. `ends` (when asked
    for) holds each token's end inside its text in characters; `starts` its start where
    that is not the previous token's end (a token that begins inside a character another
    token began: its bytes cover characters [start, end))."""

    __slots__ = ("ids", "offsets", "ends", "starts")

    def __init__(
        self, ids: np.ndarray, offsets: np.ndarray, ends: np.ndarray | None, starts: np.ndarray | None = None
    ) -> None:
        self.ids, self.offsets, self.ends, self.starts = ids, offsets, ends, starts


class Tokenizer(ABC):
    """What the packer needs from a tokenizer."""

    name: str
    bos_token: str | None
    eos_token: str | None
    bos_id: int | None
    eos_id: int | None
    adds_bos: bool
    vocab_size: int
    special_tokens: dict[str, int]
    pad_id: int | None = None  # what padded rows are filled with (EOS where there is none)
    # special tokens that take the whitespace beside them (HF AddedToken lstrip, rstrip)
    special_strips: dict[str, tuple[bool, bool]] = {}
    chat_template: str | None = None
    # True when encoding pieces cut at special tokens gives the joined string's ids.
    per_piece_exact: bool = True
    summary: str = ""

    @abstractmethod
    def encode(self, texts: Sequence[str], *, positions: bool = False) -> Encoded:
        """Encode plain texts (special-token strings are text here, never parsed)."""

    def encode_in_context(
        self, texts: Sequence[str], first: bool, *, positions: bool = False, as_text: Sequence[bool] | None = None
    ) -> Encoded:
        """Encode whole documents exactly as inside the joined stream (specials parsed, or
        kept as text where `as_text`): each as if preceded by the EOS+BOS delimiter, or at
        the stream start if `first`."""
        raise NotImplementedError

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def fingerprint(self) -> str: ...

    @cached_property
    def special_pattern(self) -> re.Pattern[str] | None:
        """Matches any special-token string (one capturing group, so `split` keeps them)."""
        return _special_pattern(tuple(sorted(self.special_tokens))) if self.special_tokens else None

    @property
    def char_tables(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per id, how many characters its bytes begin and whether its first byte continues
        one (byte-level engines): a token's characters then follow from the ids alone."""
        return None

    def char_lengths(self, ids: Sequence[int]) -> list[int] | None:
        """Each token's length in characters, where every one of `ids` is whole characters
        (its bytes decode alone); else None. Lets a known text stand as its tokens."""
        return None

    @property
    def special_split(self) -> Any:
        """`split` that alternates plain text and special-token strings, or None."""
        return None if self.special_pattern is None else self.special_pattern.split

    def check_delimiters(self) -> None:
        if self.eos_id is None and self.bos_id is None:
            raise TokenizerError(
                f"tokenizer {self.name!r} has neither an EOS nor a BOS token; documents cannot be delimited"
            )

    @property
    def delimiter(self) -> list[int]:
        """Ids inserted between documents: EOS then BOS (whichever exist)."""
        return [i for i in (self.eos_id, self.bos_id if self.adds_bos else None) if i is not None]


class QuicktokTokenizer(Tokenizer):
    """quicktok: exact byte-level BPE, batched on native threads (the fast path)."""

    def __init__(
        self,
        encoding: Any,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
        threads: int = 0,
    ) -> None:
        import quicktok

        if isinstance(encoding, str):
            try:
                encoding = quicktok.get_encoding(encoding)
            except (RuntimeError, KeyError) as exc:
                raise TokenizerError(f"quicktok has no encoding {encoding!r}: {exc}") from None
        self._enc = encoding
        self.name = encoding.name
        self.threads = threads
        self.special_tokens = {s: encoding.encode_single_token(s) for s in encoding.special_tokens_set}
        if bos_token is None and eos_token is None and self.name in _BUNDLED:
            bos_token, eos_token = _BUNDLED[self.name]
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = self.special_tokens.get(bos_token) if bos_token else None
        self.eos_id = self.special_tokens.get(eos_token) if eos_token else None
        self.adds_bos = self.bos_id is not None
        self.vocab_size = int(encoding.n_vocab)
        if chat_template is None and self.name == "llama3":
            from .templates import LLAMA3_CHAT_TEMPLATE

            chat_template = LLAMA3_CHAT_TEMPLATE
        self.chat_template = chat_template
        self.check_delimiters()

    @cached_property
    def _token_bytes(self) -> list[bytes | None]:
        """Every id's bytes (None for an id the encoding does not define)."""
        out: list[bytes | None] = []
        for i in range(self.vocab_size):
            try:
                out.append(self._enc.decode_single_token_bytes(i))
            except KeyError:
                out.append(None)
        return out

    @property
    def char_tables(self) -> tuple[np.ndarray, np.ndarray] | None:
        return self._token_chars

    def char_lengths(self, ids: Sequence[int]) -> list[int] | None:
        lengths = []
        for i in ids:
            try:
                lengths.append(len(self._enc.decode_single_token_bytes(i).decode("utf-8")))
            except (KeyError, UnicodeDecodeError):  # part of a character (byte-level BPE splits some)
                return None
        return lengths

    @cached_property
    def _token_chars(self) -> tuple[np.ndarray, np.ndarray]:
        """Per id: how many characters its bytes begin (bytes that are not UTF-8
        continuation bytes), and whether its first byte continues a character."""
        tokens = [b or b"" for b in self._token_bytes]
        lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
        starts = np.cumsum(lengths) - lengths
        continues = (np.frombuffer(b"".join(tokens), dtype=np.uint8) & 0xC0) == 0x80
        begins = np.add.reduceat(np.append(~continues, False).astype(np.int64), starts)
        begins[lengths == 0] = 0
        inside = np.zeros(len(tokens), dtype=np.int64)
        inside[lengths > 0] = continues[starts[lengths > 0]]
        return begins, inside

    def encode(self, texts: Sequence[str], *, positions: bool = False) -> Encoded:
        ids, offsets = self._enc.encode_batch(list(texts), self.threads, False)
        if not positions:
            return Encoded(ids, offsets, None)
        # characters from the bytes: a token covers the characters its bytes belong to, so
        # one that begins inside a character (byte-level BPE splits some) starts at it
        begins, inside = self._token_chars
        cum = np.cumsum(begins[ids])
        first = offsets[:-1][offsets[:-1] < offsets[1:]]
        ends = cum - np.repeat(cum[first] - begins[ids[first]], np.diff(offsets)[offsets[:-1] < offsets[1:]])
        starts = ends - begins[ids] - inside[ids]
        return Encoded(ids, offsets, ends, starts)

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    def fingerprint(self) -> str:
        # hashing the vocabulary costs a tenth of a second: once per tokenizer and settings
        key = (tuple(sorted(self.special_tokens.items())), self.bos_token, self.eos_token, self.adds_bos)
        cached = self.__dict__.get("_fingerprint_memo")
        if cached is None or cached[0] != key:
            self.__dict__["_fingerprint_memo"] = cached = (key, self._fingerprint())
        return cached[1]

    def _fingerprint(self) -> str:
        h = xxhash.xxh3_128()
        for token in self._token_bytes:
            h.update(b"<none>" if token is None else token)
            h.update(b"\0")
        h.update(repr(sorted(self.special_tokens.items())).encode())
        h.update(repr(self._enc.encode_ordinary(_PROBE)).encode())
        h.update(repr((self.bos_token, self.eos_token, self.adds_bos)).encode())
        return h.hexdigest()


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer (fast or slow). Per-piece encoding is used when a probe
    shows it equals the joined string (byte-level BPE); otherwise each document is encoded
    behind the delimiter it follows in the stream, which keeps the joined-string result
    for SentencePiece-style tokenizers that add a prefix space per segment."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        self.bos_token, self.eos_token = tokenizer.bos_token, tokenizer.eos_token
        self.bos_id, self.eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        self.check_delimiters()
        first = tokenizer("a")["input_ids"]
        self.adds_bos = self.bos_id is not None and bool(first) and first[0] == self.bos_id
        self.vocab_size = len(tokenizer)
        self.special_tokens = {
            t: tokenizer.convert_tokens_to_ids(t) for t in getattr(tokenizer, "all_special_tokens", [])
        }
        decoder = getattr(tokenizer, "added_tokens_decoder", {})
        for token_id, added in decoder.items():
            if getattr(added, "special", False):
                self.special_tokens[str(added)] = int(token_id)
        self.special_strips = {
            str(a): (bool(a.lstrip), bool(a.rstrip))
            for a in decoder.values()
            if str(a) in self.special_tokens and (getattr(a, "lstrip", False) or getattr(a, "rstrip", False))
        }
        self.chat_template = getattr(tokenizer, "chat_template", None)
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._fingerprint: str | None = None
        if self._backend is not None:
            from tokenizers import Tokenizer as RawTokenizer

            self.json = self._backend.to_str()  # the state this wrapper encodes with, serialized once
            self._plain = RawTokenizer.from_str(self.json)
            self._plain.encode_special_tokens = True
            self._plain.no_padding()
            self._plain.no_truncation()
        self._marked: tuple[str, Any] | None = None  # (marker, private copy) for `_encode_as_text`
        self._delim_text = "".join(t for t in (self.eos_token, self.bos_token if self.adds_bos else None) if t)
        self.per_piece_exact = self._backend is not None and self._probe_per_piece()

    def _probe_per_piece(self) -> bool:
        docs = ["Hello world.", " leading space", "two\nlines", "x", _PROBE]
        joined = self._encode_specials([self._delim_text.join(docs)])[0]
        pieces: list[int] = []
        for i, doc in enumerate(docs):
            if i:
                pieces.extend(self.delimiter)
            pieces.extend(int(t) for t in self.encode([doc]).ids)
        return pieces == joined

    def _encode_specials(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self._tok(list(texts), add_special_tokens=False)["input_ids"]]

    def encode(self, texts: Sequence[str], *, positions: bool = False) -> Encoded:
        if self._backend is None:
            raise TokenizerError("per-piece encoding needs a fast (tokenizers-backed) tokenizer")
        encodings = (
            self._plain.encode_batch_fast(list(texts), add_special_tokens=False)
            if not positions
            else self._plain.encode_batch(list(texts), add_special_tokens=False)
        )
        return _pack_encodings([e.ids for e in encodings], [e.offsets for e in encodings] if positions else None, 0)

    def encode_in_context(
        self, texts: Sequence[str], first: bool, *, positions: bool = False, as_text: Sequence[bool] | None = None
    ) -> Encoded:
        plain = [i for i, flag in enumerate(as_text or ()) if flag]
        if (positions or plain) and self._backend is None:
            raise ConfigError(
                "loss masks (train_on_prompt=False) and special_tokens='text' need a fast "
                "(tokenizers-backed) version of this tokenizer"
            )
        id_lists: list[Sequence[int]] = [()] * len(texts)
        offs: list[Sequence[tuple[int, int]]] = [()] * len(texts)
        parsed = sorted(set(range(len(texts))) - set(plain))
        if parsed:
            prefix = "" if first else self._delim_text
            skip = 0 if first else len(self.delimiter)
            full = [prefix + texts[i] for i in parsed]
            if positions:
                encodings = self._backend.encode_batch(full, add_special_tokens=False)  # type: ignore[union-attr]
                lists = [list(e.ids) for e in encodings]
                for i, e in zip(parsed, encodings):
                    offs[i] = [(a - len(prefix), b - len(prefix)) for a, b in e.offsets[skip:]]
            else:
                lists = self._encode_specials(full)
            for i, ids in zip(parsed, lists):
                if list(ids[:skip]) != self.delimiter[:skip]:
                    raise TokenizerError(f"tokenizer {self.name!r} does not encode its EOS/BOS strings as single ids")
                id_lists[i] = ids[skip:]
        if plain:
            for i, (ids, o) in zip(plain, self._encode_as_text([texts[i] for i in plain], first)):
                id_lists[i], offs[i] = ids, o
        return _pack_encodings(id_lists, offs if positions else None, 0)

    def _encode_as_text(self, texts: Sequence[str], first: bool) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Texts with special-token strings kept as text, each encoded as a segment of the
        joined string that follows a parsed token (the delimiter, or a special written by the
        template), or at the stream start if `first`. Behind a token, a segment is its own
        split: what it is cut from matters only through SentencePiece's prefix space (added
        at offset 0 only), so a private non-special marker token stands in front of it."""
        if first:
            encodings = self._plain.encode_batch(list(texts), add_special_tokens=False)
            return [(list(e.ids), list(e.offsets)) for e in encodings]
        marker = "\ue000"
        while any(marker in t for t in texts):  # the marker must not occur in the text itself
            marker += "\ue000"
        if self._marked is None or self._marked[0] != marker:
            from tokenizers import AddedToken
            from tokenizers import Tokenizer as RawTokenizer

            raw = RawTokenizer.from_str(self.json)
            raw.encode_special_tokens = True
            raw.no_padding()
            raw.no_truncation()
            raw.add_tokens([AddedToken(marker, special=False, normalized=False)])
            self._marked = (marker, raw)
        raw = self._marked[1]
        out = []
        for e in raw.encode_batch([marker + t for t in texts], add_special_tokens=False):
            if not e.offsets or e.offsets[0] != (0, len(marker)):
                raise TokenizerError(f"tokenizer {self.name!r} does not keep an added token whole")
            out.append((list(e.ids[1:]), [(a - len(marker), b - len(marker)) for a, b in e.offsets[1:]]))
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        h = xxhash.xxh3_128()
        if self._backend is not None:
            h.update(self.json.encode())
        else:
            try:
                vocab = sorted(self._tok.get_vocab().items())
            except (AttributeError, NotImplementedError) as exc:
                raise TokenizerError(f"cannot fingerprint tokenizer {self.name!r}: {exc}") from None
            h.update(repr(vocab).encode())
            h.update(repr(self._tok(_PROBE, add_special_tokens=False)["input_ids"]).encode())
        h.update(repr(sorted(self.special_tokens.items())).encode())
        h.update(repr((self.bos_token, self.eos_token, self.adds_bos, self.chat_template)).encode())
        return h.hexdigest()


def _pack_encodings(
    id_lists: Sequence[Sequence[int]], offsets: Sequence[Sequence[tuple[int, int]]] | None, shift: int
) -> Encoded:
    lengths = np.fromiter((len(ids) for ids in id_lists), dtype=np.int64, count=len(id_lists))
    bounds = np.zeros(len(id_lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=bounds[1:])
    ids = np.fromiter((t for seq in id_lists for t in seq), dtype=np.int64, count=int(bounds[-1]))
    ends = None
    if offsets is not None:
        ends = np.fromiter((e for seq in offsets for _, e in seq), dtype=np.int64, count=int(bounds[-1])) - shift
        # A token's end never precedes the previous token's (SentencePiece prefix tokens are empty).
        ends = np.maximum(ends, 0)
    return Encoded(ids, bounds, ends)


class AcceleratedTokenizer(Tokenizer):
    """A HF tokenizer served by quicktok's engine (about 10x faster on byte-level BPE).

    quicktok's importer converts and verifies the vocabulary; `check_sample` then compares
    both engines on the user's own first documents and falls back to the HF tokenizer for
    good on any difference. Everything else (ids, specials, fingerprint) is the HF one's.
    """

    def __init__(self, hf: HFTokenizer, fast: QuicktokTokenizer) -> None:
        self.hf, self.fast = hf, fast
        for attr in (
            "name",
            "bos_token",
            "eos_token",
            "bos_id",
            "eos_id",
            "pad_id",
            "adds_bos",
            "vocab_size",
            "special_tokens",
            "special_strips",
            "chat_template",
            "per_piece_exact",
        ):
            setattr(self, attr, getattr(hf, attr))
        self.active: Tokenizer = fast
        self.summary = f"{hf.name} (Hugging Face; encoded by quicktok)"

    def check_sample(self, texts: Sequence[str]) -> bool:
        """Use quicktok only if it gives the HF ids on these texts; returns whether it does."""
        if self.active is self.fast:
            a, b = self.fast.encode(texts), self.hf.encode(texts)
            if not (np.array_equal(a.offsets, b.offsets) and np.array_equal(a.ids, b.ids)):
                self.active = self.hf
                self.summary = f"{self.hf.name} (Hugging Face; quicktok differed on the sample, not used)"
            else:
                self.summary = (
                    f"{self.hf.name} (Hugging Face; encoded by quicktok, identical on {len(texts)} sample texts)"
                )
        return self.active is self.fast

    @property
    def char_tables(self) -> tuple[np.ndarray, np.ndarray] | None:
        return self.active.char_tables

    def char_lengths(self, ids: Sequence[int]) -> list[int] | None:
        return self.active.char_lengths(ids)

    def encode(self, texts: Sequence[str], *, positions: bool = False) -> Encoded:
        return self.active.encode(texts, positions=positions)

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(ids)

    def fingerprint(self) -> str:
        return self.hf.fingerprint()


def cache_home() -> str:
    """sftpack's user cache: $SFTPACK_CACHE, else $XDG_CACHE_HOME/sftpack or ~/.cache/sftpack."""
    return os.environ.get("SFTPACK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "sftpack"
    )


def _accelerate(hf: HFTokenizer) -> Tokenizer:
    """Wrap `hf` with quicktok's engine when quicktok's importer accepts it, else return it."""
    if hf._backend is None or not hf.per_piece_exact:
        hf.summary = f"{hf.name} (Hugging Face)"
        return hf
    import contextlib
    import io

    import quicktok

    fp = hf.fingerprint()[:24]
    name = f"sftpack_{fp}"
    data_dir = os.path.join(cache_home(), "quicktok", fp)
    try:
        if not os.path.exists(os.path.join(data_dir, name + ".enc")):
            os.makedirs(data_dir, exist_ok=True)
            source = os.path.join(data_dir, "tokenizer.json")
            with open(source, "w", encoding="utf-8") as f:
                f.write(hf.json)
            with contextlib.redirect_stdout(io.StringIO()):
                quicktok.import_tokenizer(source, name, data_dir=data_dir)
        enc = quicktok.get_encoding(name, data_dir=data_dir)
        fast = QuicktokTokenizer(enc, bos_token=hf.bos_token, eos_token=hf.eos_token, chat_template=hf.chat_template)
    except Exception as exc:  # quicktok refused (unsupported pre-tokenizer, normalizer, ...): keep HF
        hf.summary = f"{hf.name} (Hugging Face; quicktok import refused: {str(exc).splitlines()[0][:80]})"
        return hf
    if (
        fast.special_tokens != {k: v for k, v in hf.special_tokens.items() if k in fast.special_tokens}
        or fast.vocab_size > hf.vocab_size
    ):
        hf.summary = f"{hf.name} (Hugging Face; quicktok's special tokens differ, not used)"
        return hf
    return AcceleratedTokenizer(hf, fast)


def load_tokenizer(spec: Any = None, *, threads: int = 0, accelerate: bool = True) -> Tokenizer:
    """Resolve any accepted tokenizer form to a `Tokenizer`. A Hugging Face byte-level BPE
    tokenizer is served by quicktok when `accelerate` and quicktok reproduces it; a
    `Tokenizer` is used as given (one loaded with `accelerate=False` stays so)."""
    tok = _resolve(spec, threads)
    if accelerate and isinstance(tok, HFTokenizer) and tok is not spec:
        return _accelerate(tok)
    if isinstance(tok, HFTokenizer) and not tok.summary:
        tok.summary = f"{tok.name} (Hugging Face)"
    return tok


def _resolve(spec: Any, threads: int) -> Tokenizer:
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or not 0 <= threads <= 4096:
        raise ConfigError(f"workers must be an integer from 0 (all cores) to 4096, got {threads!r}")
    if spec is None:
        spec = DEFAULT_TOKENIZER
    if isinstance(spec, Tokenizer):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        if text in _BUNDLED or (not os.path.exists(text) and "/" not in text and os.sep not in text):
            return QuicktokTokenizer(text, threads=threads)
        if not os.path.exists(text):
            raise TokenizerError(
                f"tokenizer {text!r} is neither a bundled name ({', '.join(_BUNDLED)}) nor an existing path"
            )
        return HFTokenizer(_load_hf(text))
    if type(spec).__module__.startswith("quicktok"):
        return QuicktokTokenizer(spec, threads=threads)
    if hasattr(spec, "convert_tokens_to_ids") and callable(spec):
        return HFTokenizer(spec)
    raise TokenizerError(f"unsupported tokenizer object of type {type(spec).__name__}")


_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _load_hf(path: str) -> Any:
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in _HF_FILES):
        raise TokenizerError(f"directory {path} holds no tokenizer files (expected one of {', '.join(_HF_FILES)})")
    if not os.path.isdir(path) and not os.path.isfile(path):
        raise TokenizerError(f"tokenizer path {path} is not a regular file or a directory")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    directory = path if os.path.isdir(path) else os.path.dirname(path) or "."
    try:
        if os.path.isdir(path) or os.path.exists(os.path.join(directory, "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(directory, local_files_only=True)
        tok = PreTrainedTokenizerFast(tokenizer_file=path)
    except Exception as exc:  # the tokenizers library raises bare Exceptions for a file it cannot parse
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TokenizerError(
            f"cannot load a Hugging Face tokenizer from {path} ({reason}); pass a bundled name "
            f"({', '.join(_BUNDLED)}), a tokenizer directory or a tokenizer.json"
        ) from None
    added = {t.content for t in tok.added_tokens_decoder.values()}
    for attr, names in (
        ("eos_token", ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|im_end|>")),
        ("bos_token", ("<|begin_of_text|>", "<s>", "<bos>")),
    ):
        for name in names:
            if name in added:
                setattr(tok, attr, name)
                break
    return tok
