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


@lru_cache(maxsize=8)
def _special_pattern(specials: tuple[str, ...]) -> re.Pattern[str]:
    # longest first, so that a special token that prefixes another never wins
    return re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")


class Encoded:
    """Ids of many texts: text i is `ids[offsets[i]:offsets[i+1]]`; `ends` (when asked
    for) holds each token's end position inside its text, in the tokenizer's `unit`."""

    __slots__ = ("ids", "offsets", "ends")

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, ends: np.ndarray | None) -> None:
        self.ids, self.offsets, self.ends = ids, offsets, ends


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
    chat_template: str | None = None
    unit: str = "byte"  # positions in `Encoded.ends`: "byte" (UTF-8) or "char"
    # True when encoding pieces cut at special tokens gives the joined string's ids.
    per_piece_exact: bool = True
    summary: str = ""

    @abstractmethod
    def encode(self, texts: Sequence[str], *, positions: bool = False) -> Encoded:
        """Encode plain texts (special-token strings are text here, never parsed)."""

    def encode_in_context(self, texts: Sequence[str], first: bool, *, positions: bool = False,
                          as_text: Sequence[bool] | None = None) -> Encoded:
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

    def __init__(self, encoding: Any, *, bos_token: str | None = None, eos_token: str | None = None,
                 chat_template: str | None = None, threads: int = 0) -> None:
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

    @cached_property
    def _token_nbytes(self) -> np.ndarray:
        return np.fromiter((len(b or b"") for b in self._token_bytes), dtype=np.int64, count=self.vocab_size)

    def encode(self, texts: Sequence[str], *, positions: bool = False) -> Encoded:
        ids, offsets = self._enc.encode_batch(list(texts), self.threads, False)
        ends = None
        if positions:
            cum = np.cumsum(self._token_nbytes[ids])
            first = offsets[:-1]
            before = np.where(first > 0, cum[np.maximum(first - 1, 0)] if len(cum) else 0, 0)
            ends = cum - np.repeat(before, np.diff(offsets))
        return Encoded(ids, offsets, ends)

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    def fingerprint(self) -> str:
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

    unit = "char"

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        self.bos_token, self.eos_token = tokenizer.bos_token, tokenizer.eos_token
        self.bos_id, self.eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.check_delimiters()
        first = tokenizer("a")["input_ids"]
        self.adds_bos = self.bos_id is not None and bool(first) and first[0] == self.bos_id
        self.vocab_size = len(tokenizer)
        self.special_tokens = {
            t: tokenizer.convert_tokens_to_ids(t) for t in getattr(tokenizer, "all_special_tokens", [])
        }
        for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
            if getattr(added, "special", False):
                self.special_tokens[str(added)] = int(token_id)
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
        encodings = self._plain.encode_batch_fast(list(texts), add_special_tokens=False) if not positions \
            else self._plain.encode_batch(list(texts), add_special_tokens=False)
        return _pack_encodings([e.ids for e in encodings], [e.offsets for e in encodings] if positions else None, 0)

    def encode_in_context(self, texts: Sequence[str], first: bool, *, positions: bool = False,
                          as_text: Sequence[bool] | None = None) -> Encoded:
        if not texts:
            return Encoded(np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64),
                           np.zeros(0, dtype=np.int64) if positions else None)
        prefix = "" if first else self._delim_text
        skip = 0 if first else len(self.delimiter)
        full = [prefix + t for t in texts]
        if positions or (as_text is not None and any(as_text)):
            if self._backend is None:
                raise ConfigError(
                    "loss masks (train_on_prompt=False) and special_tokens='text' need a fast "
                    "(tokenizers-backed) version of this tokenizer"
                )
            encodings = self._backend.encode_batch(full, add_special_tokens=False)
            id_lists, offs = [list(e.ids) for e in encodings], [list(e.offsets) for e in encodings]
        else:
            id_lists, offs = self._encode_specials(full), None
        for ids in id_lists:
            if list(ids[:skip]) != self.delimiter[:skip]:
                raise TokenizerError(f"tokenizer {self.name!r} does not encode its EOS/BOS strings as single ids")
        id_lists = [ids[skip:] for ids in id_lists]
        if offs is not None:
            offs = [o[skip:] for o in offs]
        for i, plain in enumerate(as_text or ()):
            if plain:
                id_lists[i], offs[i] = self._plain_in_context(full[i], len(prefix))  # type: ignore[index]
        return _pack_encodings(id_lists, offs if positions else None, len(prefix))

    def _plain_in_context(self, full: str, prefix: int) -> tuple[list[int], list[tuple[int, int]]]:
        """`full[prefix:]` with special-token strings as text, behind the delimiter text when
        no token straddles it (else alone); offsets stay relative to `full`."""
        enc = self._plain.encode(full, add_special_tokens=False)
        keep = [k for k, (start, _) in enumerate(enc.offsets) if start >= prefix]
        if prefix and keep and any(end > prefix for start, end in enc.offsets[: keep[0]]):
            enc = self._plain.encode(full[prefix:], add_special_tokens=False)
            return list(enc.ids), [(s + prefix, e + prefix) for s, e in enc.offsets]
        return [enc.ids[k] for k in keep], [enc.offsets[k] for k in keep]

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


def _pack_encodings(id_lists: Sequence[Sequence[int]], offsets: Sequence[Sequence[tuple[int, int]]] | None,
                    shift: int) -> Encoded:
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
        for attr in ("name", "bos_token", "eos_token", "bos_id", "eos_id", "adds_bos", "vocab_size",
                     "special_tokens", "chat_template", "per_piece_exact"):
            setattr(self, attr, getattr(hf, attr))
        self.active: Tokenizer = fast
        self.summary = f"{hf.name} (Hugging Face; encoded by quicktok)"

    @property
    def unit(self) -> str:  # type: ignore[override]
        return self.active.unit

    def check_sample(self, texts: Sequence[str]) -> bool:
        """Use quicktok only if it gives the HF ids on these texts; returns whether it does."""
        if self.active is self.fast:
            a, b = self.fast.encode(texts), self.hf.encode(texts)
            if not (np.array_equal(a.offsets, b.offsets) and np.array_equal(a.ids, b.ids)):
                self.active = self.hf
                self.summary = f"{self.hf.name} (Hugging Face; quicktok differed on the sample, not used)"
            else:
                self.summary = f"{self.hf.name} (Hugging Face; encoded by quicktok, identical on {len(texts)} sample texts)"
        return self.active is self.fast

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
    if fast.special_tokens != {k: v for k, v in hf.special_tokens.items() if k in fast.special_tokens} or \
            fast.vocab_size > hf.vocab_size:
        hf.summary = f"{hf.name} (Hugging Face; quicktok's special tokens differ, not used)"
        return hf
    return AcceleratedTokenizer(hf, fast)


def load_tokenizer(spec: Any = None, *, threads: int = 0, accelerate: bool = True) -> Tokenizer:
    """Resolve any accepted tokenizer form to a `Tokenizer`. A Hugging Face byte-level BPE
    tokenizer is served by quicktok when `accelerate` and quicktok reproduces it."""
    tok = _resolve(spec, threads)
    if accelerate and isinstance(tok, HFTokenizer):
        return _accelerate(tok)
    return tok


def _resolve(spec: Any, threads: int) -> Tokenizer:
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


def _load_hf(path: str) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    directory = path if os.path.isdir(path) else os.path.dirname(path) or "."
    try:
        if os.path.isdir(path) or os.path.exists(os.path.join(directory, "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(directory, local_files_only=True)
        tok = PreTrainedTokenizerFast(tokenizer_file=path)
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot load a Hugging Face tokenizer from {path}: {exc}") from None
    added = {t.content for t in tok.added_tokens_decoder.values()}
    for attr, names in (("eos_token", ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|im_end|>")),
                        ("bos_token", ("<|begin_of_text|>", "<s>", "<bos>"))):
        for name in names:
            if name in added:
                setattr(tok, attr, name)
                break
    return tok
