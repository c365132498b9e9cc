"""Exception types. Every user-facing problem is an `SFTPackError`, a `ValueError`."""

from __future__ import annotations

import os
from typing import Any


class SFTPackError(ValueError):
    """Base class of every error sftpack raises on purpose."""


class InputError(SFTPackError):
    """A problem in an input file, located as `file:line` (or `file:row`)."""

    def __init__(self, source: str | os.PathLike | object, line: int | None, message: str, unit: str = "") -> None:
        self.source = str(source)
        self.line = line
        self.reason = message
        self.unit = unit
        where = self.source if line is None else f"{self.source}:{unit}{line}"
        super().__init__(f"{where}: {message}")


class ConfigError(SFTPackError):
    """An option has a value sftpack cannot use; the message names the option."""


class TokenizerError(SFTPackError):
    """The tokenizer cannot be loaded or lacks what packing needs (EOS/BOS)."""


class StoreError(SFTPackError):
    """A packed store on disk is missing, incomplete, of an unknown version or corrupt."""


def error_value(exc: SFTPackError) -> dict[str, Any]:
    """An error raised in a worker (a process, a Ray task) as a value the builder can
    receive; `distributed.shard_error` makes it again, located in the whole file."""
    if isinstance(exc, InputError):
        line = -1 if exc.line is None else exc.line
        return {"error": "InputError", "message": exc.reason, "line": line, "unit": exc.unit}
    return {"error": type(exc).__name__, "message": str(exc), "line": -1, "unit": ""}
