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
        source = str(path)
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
            raise InputError(source, line, f"invalid UTF-8 at byte {column} of the line") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(source, exc.lineno, f"malformed JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(data, list):
            raise InputError(source, None, f"a .json input must hold an array of objects, got {_kind(data)}")
        for i, item in enumerate(data, 1):
            if not isinstance(item, dict):
                raise InputError(source, i, f"expected a JSON object, got {_kind(item)}", "row ")
            yield Record(item, source, i, "row ")

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
