"""`sftpack inspect`: one row decoded, with document boundaries and untrained tokens marked."""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from .pack import num_rows, row_span
from .errors import ConfigError, TokenizerError
from .store import open_store
from .tokenizers import load_tokenizer

_DIM, _GREEN, _BOLD, _RESET = "\x1b[2m", "\x1b[32m", "\x1b[1;35m", "\x1b[0m"


def render_row(path: str | os.PathLike, row: int, *, tokenizer: Any = None, color: str = "auto") -> str:
    """Row `row` of the store as text: trained tokens plain (green on a terminal), tokens
    that are not training targets inside `[~ ~]` (dim), and `|> doc N <|` where a document starts."""
    store = open_store(path)
    manifest = store.manifest
    L = int(manifest["seq_length"])
    n = num_rows(len(store.tokens), L)
    if not 0 <= row < n:
        raise ConfigError(f"--row {row} is out of range: the store has {n} rows")
    try:
        tok = load_tokenizer(tokenizer or manifest["tokenizer"]["name"])
    except TokenizerError as exc:
        raise TokenizerError(f"{exc}; pass the tokenizer the store was built with (--tokenizer)") from None
    use_color = color == "always" or (color == "auto" and sys.stdout.isatty())
    start, _ = row_span(row, L)
    ids = np.asarray(store.tokens[start : start + L], dtype=np.int64)
    trained = np.asarray(store.loss_mask[start : start + L]).astype(bool)
    starts = store.doc_starts
    first_doc = int(np.searchsorted(starts, start, side="right")) - 1
    doc_at = {int(s) - start: int(i) for i, s in enumerate(starts[first_doc:], first_doc) if start <= s < start + L}

    out = [f"row {row} of {n} (tokens {start}..{start + L - 1}); "
           + ("trained tokens green, untrained dim" if use_color else "untrained tokens inside [~ ~]")]
    if first_doc >= 0 and 0 not in doc_at:
        out.append(f"(continues document {first_doc})")
    pieces: list[str] = []
    run: list[int] = []
    run_trained = None

    def flush() -> None:
        if not run:
            return
        text = tok.decode(run)
        if use_color:
            pieces.append((_GREEN if run_trained else _DIM) + text + _RESET)
        else:
            pieces.append(text if run_trained else f"[~{text}~]")
        run.clear()

    for p, (token, is_trained) in enumerate(zip(ids.tolist(), trained.tolist())):
        if p in doc_at or is_trained != run_trained:
            flush()
            run_trained = is_trained
        if p in doc_at:
            marker = f"|> doc {doc_at[p]} <|"
            pieces.append(_BOLD + marker + _RESET if use_color else marker)
        run.append(token)
    flush()
    out.append("".join(pieces))
    return "\n".join(out)
