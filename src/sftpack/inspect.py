"""`sftpack inspect`: one row decoded, with document boundaries and untrained tokens marked."""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from .errors import ConfigError, TokenizerError
from .store import open_store
from .tokenizers import load_tokenizer
from .view import View, options_for

_DIM, _GREEN, _BOLD, _RESET = "\x1b[2m", "\x1b[32m", "\x1b[1;35m", "\x1b[0m"


def render_row(path: str | os.PathLike, row: int, *, tokenizer: Any = None, color: str = "auto") -> str:
    """Row `row` of the store (planned as recorded) as text: trained tokens plain (green on
    a terminal), tokens that are not training targets inside `[~ ~]` (dim), and
    `|> doc N <|` where stored document N starts."""
    store = open_store(path)
    manifest = store.manifest
    view = View(store, options_for(store))
    L, n = view.seq_length, len(view)
    if not 0 <= row < n:
        raise ConfigError(f"--row {row} is out of range: the store has {n} rows")
    try:
        tok = load_tokenizer(tokenizer or manifest["tokenizer"]["name"])
    except TokenizerError as exc:
        raise TokenizerError(f"{exc}; pass the tokenizer the store was built with (--tokenizer)") from None
    use_color = color == "always" or (color == "auto" and sys.stdout.isatty())
    tokens, mask = view.window(row)
    ids, trained = tokens[:L].tolist(), mask[:L].astype(bool).tolist()
    pieces_of_row = view.pieces(row)
    at = np.concatenate(([0], np.cumsum(pieces_of_row.length)[:-1]))
    doc_at = {int(a): int(d) for a, d, s in zip(at, pieces_of_row.doc, pieces_of_row.start) if s == 0 and a < L}

    out = [
        f"row {row} of {n} ({view.options.packing}, seq_length {L}); "
        + ("trained tokens green, untrained dim" if use_color else "untrained tokens inside [~ ~]")
    ]
    if len(pieces_of_row) and pieces_of_row.start[0] != 0:
        out.append(f"(continues document {int(pieces_of_row.doc[0])})")
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

    for p, (token, is_trained) in enumerate(zip(ids, trained)):
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
