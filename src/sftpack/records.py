"""Reading input records: JSONL (plain, .gz, .zst), JSON arrays and Parquet.

Each record keeps its provenance (file and 1-based line or row) so that any later
stage can report `file:line`. Files are streamed; nothing here knows about tokens.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Union

import msgspec
import xxhash

from .errors import ConfigError, InputError

PathLike = Union[str, os.PathLike]
Inputs = Union[PathLike, Sequence[PathLike]]

_FORMATS = (".jsonl.gz", ".jsonl.zst", ".jsonl", ".json", ".parquet")


class Record:
    """One input object and where it came from (`unit` is "" for lines, "row " for rows)."""

    __slots__ = ("data", "source", "line", "unit")

    def __init__(self, data: dict[str, Any], source: str, line: int, unit: str = "") -> None:
        self.data, self.source, self.line, self.unit = data, source, line, unit

    def error(self, message: str) -> InputError:
        return InputError(self.source, self.line, message, self.unit)


def expand_inputs(inputs: Inputs) -> list[Path]:
    """Resolve files, directories' children and glob patterns to a sorted, de-duplicated list."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise ConfigError("no input files given")
    found: list[Path] = []
    for item in items:
        text = os.fspath(item)
        if any(ch in text for ch in "*?["):
            matches = [Path(m) for m in glob.glob(text, recursive=True) if os.path.isfile(m)]
            if not matches:
                raise ConfigError(f"input pattern {text!r} matches no file")
            found.extend(matches)
        elif os.path.isdir(text):
            matches = [p for p in Path(text).iterdir() if p.is_file() and _format_of(p, strict=False)]
            if not matches:
                raise ConfigError(f"input directory {text!r} holds no .jsonl/.json/.parquet file")
            found.extend(matches)
        elif os.path.isfile(text):
            found.append(Path(text))
        else:
            raise ConfigError(f"input file {text!r} does not exist")
    for path in found:
        _format_of(path)
    return sorted(set(found), key=lambda p: os.fspath(p))


def _format_of(path: Path, strict: bool = True) -> str | None:
    name = path.name.lower()
    for ext in _FORMATS:
        if name.endswith(ext):
            return ext
    if strict:
        raise ConfigError(f"{path}: unknown input format; expected one of {', '.join(_FORMATS)}")
    return None


def fingerprint_inputs(paths: Sequence[Path]) -> str:
    """A hash of the input files' bytes and formats, in order (not their names or mtimes)."""
    h = xxhash.xxh3_128()
    for path in paths:
        h.update(f"{_format_of(path)}\0".encode())
        with open(path, "rb") as f:
            size = 0
            while chunk := f.read(1 << 22):
                h.update(chunk)
                size += len(chunk)
        h.update(f"\0{size}\0".encode())
    return h.hexdigest()


class RecordReader:
    """Streams records from files in order; `bytes_read` tracks progress over `total_bytes`."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self.total_bytes = sum(p.stat().st_size for p in self.paths)
        self._done_bytes = 0
        self._raw: BinaryIO | None = None

    @property
    def bytes_read(self) -> int:
        pos = 0
        if self._raw is not None and not self._raw.closed:
            pos = self._raw.tell()
        return self._done_bytes + pos

    def __iter__(self) -> Iterator[Record]:
        for path in self.paths:
            count = 0
            fmt = _format_of(path)
            if fmt == ".parquet":
                reader = self._parquet(path)
            elif fmt == ".json":
                reader = self._json_array(path)
            else:
                reader = self._jsonl(path, fmt)
            for record in reader:
                count += 1
                yield record
            self._done_bytes += path.stat().st_size
            self._raw = None
            if count == 0:
                raise InputError(path, None, "the file holds no documents (it is empty or blank)")

    def _jsonl(self, path: Path, fmt: str) -> Iterator[Record]:
        source = str(path)
        with open(path, "rb") as raw:
            self._raw = raw
            stream: BinaryIO = raw
            if fmt == ".jsonl.gz":
                stream = gzip.GzipFile(fileobj=raw)  # type: ignore[assignment]
            elif fmt == ".jsonl.zst":
                import zstandard

                stream = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))  # type: ignore[assignment]
            fast = msgspec.json.Decoder().decode
            for lineno, raw_line in enumerate(stream, 1):
                if lineno == 1 and raw_line.startswith(b"\xef\xbb\xbf"):
                    raw_line = raw_line[3:]
                if raw_line.isspace() or not raw_line:
                    continue
                try:
                    data = fast(raw_line)
                except (msgspec.DecodeError, UnicodeDecodeError):
                    data = _parse_slow(raw_line, source, lineno)  # exact messages, lenient stdlib JSON
                if type(data) is not dict:
                    raise InputError(source, lineno, f"expected a JSON object, got {_kind(data)}")
                yield Record(data, source, lineno)

    def _json_array(self, path: Path) -> Iterator[Record]:
        """A JSON array of objects, streamed element by element (bounded memory)."""
        source = str(path)
        with open(path, "rb") as raw:
            self._raw = raw
            text = _JsonText(raw, source)
            text.skip_space()
            if not text.startswith("["):
                if text.at_end():
                    return  # empty file: reported as holding no documents
                raise InputError(source, None, "a .json input must hold an array of objects")
            text.advance(1)
            row = 0
            while True:
                text.skip_space()
                if text.startswith("]") and row == 0:
                    text.advance(1)
                    break
                item = text.value()
                row += 1
                if not isinstance(item, dict):
                    raise InputError(source, row, f"expected a JSON object, got {_kind(item)}", "row ")
                yield Record(item, source, row, "row ")
                text.skip_space()
                if text.startswith(","):
                    text.advance(1)
                elif text.startswith("]"):
                    text.advance(1)
                    break
                else:
                    raise InputError(source, text.line, "malformed JSON: expected ',' or ']' after an array element")
            text.skip_space()
            if not text.at_end():
                raise InputError(source, text.line, "malformed JSON: extra data after the array")

    def _parquet(self, path: Path) -> Iterator[Record]:
        import pyarrow.parquet as pq

        source = str(path)
        row = 0
        with open(path, "rb") as raw:
            self._raw = raw
            for batch in pq.ParquetFile(raw).iter_batches(batch_size=4096):
                for item in batch.to_pylist():
                    row += 1
                    yield Record(item, source, row, "row ")


_JSON_SPACE = re.compile(r"[ \t\r\n]*")


class _JsonText:
    """Incrementally decoded UTF-8 text with a cursor, its line number, and one-value parsing."""

    def __init__(self, raw: BinaryIO, source: str) -> None:
        import codecs

        self._raw, self.source = raw, source
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._buf, self._pos, self.line, self._eof, self._first = "", 0, 1, False, True
        self._raw_line = 1  # line count of the bytes decoded so far, for UTF-8 errors

    def _fill(self) -> bool:
        if self._eof:
            return False
        chunk = self._raw.read(1 << 20)
        try:
            text = self._decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as exc:
            line = self._raw_line + chunk.count(b"\n", 0, max(exc.start, 0))
            raise InputError(self.source, line, "invalid UTF-8") from None
        self._raw_line += chunk.count(b"\n")
        if self._first:
            text, self._first = text.removeprefix("\ufeff"), False
        self._eof = not chunk
        self._buf = self._buf[self._pos :] + text
        self._pos = 0
        return True

    def advance(self, n: int) -> None:
        self.line += self._buf.count("\n", self._pos, self._pos + n)
        self._pos += n

    def skip_space(self) -> None:
        while True:
            self.advance(_JSON_SPACE.match(self._buf, self._pos).end() - self._pos)  # type: ignore[union-attr]
            if self._pos < len(self._buf) or not self._fill():
                return

    def startswith(self, token: str) -> bool:
        while len(self._buf) - self._pos < len(token) and self._fill():
            pass
        return self._buf.startswith(token, self._pos)

    def at_end(self) -> bool:
        return not self.startswith(" ") and self._pos >= len(self._buf)

    def value(self) -> Any:
        decoder = json.JSONDecoder()
        while True:
            try:
                item, end = decoder.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as exc:
                if self._fill():
                    continue  # the value may continue in the next chunk
                line = self.line + self._buf.count("\n", self._pos, exc.pos)
                raise InputError(self.source, line, f"malformed JSON: {exc.msg}") from None
            if end == len(self._buf) and self._fill():
                continue  # a number may continue in the next chunk
            self.advance(end - self._pos)
            return item


def _parse_slow(raw_line: bytes, source: str, lineno: int) -> Any:
    try:
        text = raw_line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(source, lineno, f"invalid UTF-8 at byte {exc.start} of the line") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(source, lineno, f"malformed JSON: {exc.msg} (column {exc.colno})") from None


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )
