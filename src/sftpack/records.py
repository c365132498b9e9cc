"""Reading input records: JSONL (plain, .gz, .zst), JSON arrays and Parquet.

Each record keeps its provenance (file and 1-based line or row) so that any later
stage can report `file:line`. Files are streamed; nothing here knows about tokens.
Inputs named by URI (`s3://`, `gs://`, `hdfs://`, `abfs://`, `file://`) are read through
`pyarrow.fs` (imported only then); local paths never go through pyarrow.
"""

from __future__ import annotations

import decimal
import fnmatch
import glob
import gzip
import io
import json
import os
import re
import stat
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Union
from urllib.parse import urlsplit, urlunsplit

import msgspec
import xxhash

from .errors import ConfigError, InputError
from .store import ChunkHasher

PathLike = Union[str, os.PathLike]  # noqa: UP007  (a runtime alias: `|` needs 3.10 objects)
Inputs = Union[PathLike, Sequence[PathLike]]  # noqa: UP007

_FORMATS = (".jsonl.gz", ".jsonl.zst", ".jsonl", ".json", ".parquet")


class Record:
    """One input object and where it came from (`unit` is "" for lines, "row " for rows)."""

    __slots__ = ("data", "source", "line", "unit")

    def __init__(self, data: dict[str, Any], source: str, line: int, unit: str = "") -> None:
        self.data, self.source, self.line, self.unit = data, source, line, unit

    def error(self, message: str) -> InputError:
        return InputError(self.source, self.line, message, self.unit)


_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")


@dataclass(frozen=True)
class RemoteFile:
    """An input on a file system pyarrow understands (`pyarrow.fs.FileSystem.from_uri`).
    `root` is the URI the user gave (query parameters and any credentials in it kept, never
    shown), which every process opens the file system from; `path` the object's path on it;
    `shown` its URI without credentials or query, used in messages and shard manifests."""

    root: str = field(repr=False)
    path: str
    shown: str

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.shown

    def filesystem(self) -> Any:
        return _filesystem(self.root)[0]

    def open(self, buffered: bool = True) -> Any:
        """A seekable reader (pyarrow's `open_input_file`: ranged reads, no local copy);
        buffered, it reads like a local file (lines, `gzip`, zstd)."""
        native = self.filesystem().open_input_file(self.path)
        # each read of the raw file is one ranged GET on S3/GCS: buffer 8 MB at a time
        return io.BufferedReader(_ArrowRaw(native), 8 << 20) if buffered else native

    def stamp(self) -> Stamp:
        """Size, mtime and (where the file system reports one, as S3 does) a hash of the ETag,
        which changes when an object is replaced even within its mtime's second."""
        fs = self.filesystem()
        info = fs.get_file_info(self.path)
        with fs.open_input_file(self.path) as f:
            size, meta = f.size(), f.metadata()
        etag = next((v for k, v in meta.items() if k.lower() == "etag"), b"")
        etag = etag.encode() if isinstance(etag, str) else etag
        version = xxhash.xxh64_intdigest(etag) >> 2 if etag else 0  # fits int64 (shard tables)
        return size, info.mtime_ns or 0, version, 0, 0


InputFile = Union[Path, RemoteFile]  # noqa: UP007

_FILESYSTEMS: dict[str, tuple[Any, str]] = {}  # per process: a URI's file system, made once


def _filesystem(uri: str) -> tuple[Any, str]:
    """`FileSystem.from_uri(uri)`: credentials come from the environment (AWS_*, GOOGLE_*,
    ...) or the URI (`?endpoint_override=...&scheme=http`) as pyarrow reads them."""
    if uri not in _FILESYSTEMS:
        import pyarrow.fs as pafs

        try:
            _FILESYSTEMS[uri] = pafs.FileSystem.from_uri(uri)
        except (ValueError, OSError, TypeError) as exc:  # ArrowInvalid is a ValueError
            raise ConfigError(f"cannot open the file system of {_shown(uri)}: {exc}") from None
    return _FILESYSTEMS[uri]


def _shown(uri: str) -> str:
    """The URI without its query and without `user:secret@` (abfs's `container@` stays)."""
    parts = urlsplit(uri)
    netloc = parts.netloc
    if "@" in netloc and ":" in netloc.rsplit("@", 1)[0]:
        netloc = netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _is_uri(text: str) -> bool:
    return _URI.match(text) is not None


def _expand_remote(uri: str) -> list[RemoteFile]:
    """A URI's files, as `expand_inputs` finds local ones: one object, a directory's
    (prefix's) data files, or a glob's matches (`*`, `[...]`, `**`; a `?` starts the URI's
    query) listed from the pattern's fixed head. Listed entries carry their type: no further request per file."""
    import pyarrow.fs as pafs

    parts = urlsplit(uri)
    segments = parts.path.split("/")
    magic = [i for i, seg in enumerate(segments) if any(ch in seg for ch in "*?[")]
    if magic:
        head, pattern = segments[: magic[0]], segments[magic[0] :]
        root = urlunsplit((parts.scheme, parts.netloc, "/".join(head) + "/", parts.query, ""))
    else:
        root, pattern = uri, []
    fs, base = _filesystem(root)
    base = base.rstrip("/") or base

    def remote(path: str) -> RemoteFile:
        tail = path[len(base) :] if path.startswith(base) else "/" + path
        return RemoteFile(root, path, _shown(root).rstrip("/") + tail)

    try:
        if pattern:
            recursive = len(pattern) > 1 or "**" in pattern
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=recursive, allow_not_found=True))
            infos = [i for i in infos if _glob_match(i.path[len(base) :].lstrip("/").split("/"), pattern)]
            if not infos:
                raise ConfigError(f"input pattern {_shown(uri)!r} matches no file")
        else:
            info = fs.get_file_info(base)
            if info.type == pafs.FileType.NotFound:
                raise InputError(
                    _shown(uri), None, "does not exist (no such object or prefix; check the URI and credentials)"
                )
            if info.type != pafs.FileType.Directory:
                return [remote(info.path)]
            infos = [
                i for i in fs.get_file_info(pafs.FileSelector(base)) if _format_of(Path(i.base_name), strict=False)
            ]
            if not infos:
                raise ConfigError(f"input directory {_shown(uri)!r} holds no {', '.join(_FORMATS)} file")
    except OSError as exc:
        raise InputError(_shown(uri), None, f"cannot list the files: {exc}") from None
    found = []
    for info in infos:
        if info.type == pafs.FileType.Directory:
            if not _format_of(Path(info.base_name), strict=False):
                continue  # as locally: a matched directory is skipped unless named like data
            raise InputError(remote(info.path), None, _A_DIRECTORY)
        found.append(remote(info.path))
    return found


def _glob_match(parts: list[str], pattern: list[str]) -> bool:
    """`glob` semantics on path segments: `**` spans any number of them; a wildcard does
    not match a hidden name."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(
            _glob_match(parts[i:], pattern[1:])
            for i in range(len(parts) + 1)
            if not any(p.startswith(".") for p in parts[:i])
        )
    if not parts or (parts[0].startswith(".") and not pattern[0].startswith(".")):
        return False
    return fnmatch.fnmatchcase(parts[0], pattern[0]) and _glob_match(parts[1:], pattern[1:])


def expand_inputs(inputs: Inputs) -> list[InputFile]:
    """Resolve files, directories' children and glob patterns to a sorted, de-duplicated list
    (local paths, or `RemoteFile`s for URIs such as `s3://bucket/dir/*.jsonl`)."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise ConfigError("no input files given")
    found: list[Path] = []
    remote: list[RemoteFile] = []
    for item in items:
        text = os.fspath(item)
        if isinstance(item, str) and _is_uri(text):
            remote.extend(_expand_remote(text))
        elif any(ch in text for ch in "*?["):
            # a matched directory is skipped unless it is named like data (Spark's `x.parquet/`)
            matches = [
                Path(m)
                for m in glob.glob(text, recursive=True)
                if not os.path.isdir(m) or _format_of(Path(m), strict=False)
            ]
            if not matches:
                raise ConfigError(f"input pattern {text!r} matches no file")
            found.extend(matches)
        elif os.path.isdir(text):
            try:
                matches = [p for p in Path(text).iterdir() if _format_of(p, strict=False)]
            except OSError as exc:
                raise InputError(text, None, f"cannot list the directory: {exc.strerror or exc}") from None
            if not matches:
                raise ConfigError(f"input directory {text!r} holds no {', '.join(_FORMATS)} file")
            found.extend(matches)
        else:
            found.append(Path(text))
    for path in found:
        _check_regular(path)
        _format_of(path)
    for file in remote:
        _format_of(file)
    if not remote:
        local: list[Path] = sorted(set(found), key=lambda p: os.fspath(p))
        return list(local)
    both: set[InputFile] = {*found, *remote}
    return sorted(both, key=lambda p: str(p) if isinstance(p, RemoteFile) else os.fspath(p))


def _check_regular(path: Path) -> None:
    """Refuse what is not a regular file, saying what it is: anything named like data is
    refused rather than skipped, so that no data is silently left out."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        what = "is a broken symbolic link" if os.path.islink(path) else "does not exist"
        raise ConfigError(f"input file {os.fspath(path)!r} {what}") from None
    except OSError as exc:
        raise InputError(path, None, f"cannot access the file: {exc.strerror or exc}") from None
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise InputError(path, None, _A_DIRECTORY)
    kind = (
        "a named pipe (FIFO)"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "not a regular file"
    )
    raise InputError(
        path,
        None,
        f"is {kind}, not a regular file; sftpack reads every input twice "
        "(to fingerprint it, then to build): save the data to a file first",
    )


_A_DIRECTORY = (
    "is a directory inside an input directory or pattern; directories are "
    "not searched recursively: pass it (or a glob of its files) as an input"
)


def _format_of(path: InputFile, strict: bool = True) -> str | None:
    name = path.name.lower()
    for ext in _FORMATS:
        if name.endswith(ext):
            return ext
    if strict:
        raise ConfigError(f"{path}: unknown input format; expected one of {', '.join(_FORMATS)}")
    return None


Stamp = tuple[int, int, int, int, int]


INPUT_CHUNK = 8 << 20  # bytes per hashed chunk of an input file (a task's range is a multiple of it)


def fingerprint_inputs(paths: Sequence[InputFile], stamps: Sequence[Stamp] | None = None) -> str:
    """A hash of the input files' bytes and formats, in order (not their names or mtimes).
    `stamps` (a `RecordReader`'s): the files must still be as the reader found them, so the
    hash describes exactly what the reader reads.

    Per file: its format, its size and the chunked `xxh3_128` of its bytes (as the store's
    checksums, over `INPUT_CHUNK`-byte chunks), so that workers may hash aligned ranges of
    one big file apart and one process combine them into the same value."""
    h = xxhash.xxh3_128()
    for i, path in enumerate(paths):
        h.update(f"{_format_of(path)}\0".encode())
        with _open(path, buffered=False) as f:
            before = path.stamp() if isinstance(path, RemoteFile) else _stamp(os.fstat(f.fileno()))
            if stamps is not None:
                _check_unchanged(path, stamps[i], before)
            size = 0
            chunks = ChunkHasher(0, INPUT_CHUNK)
            try:
                while chunk := f.read(1 << 22):
                    chunks.update(chunk)
                    size += len(chunk)
            except OSError as exc:
                raise InputError(path, None, f"cannot read the file: {exc.strerror or exc}") from None
            _check_unchanged(
                path, before, path.stamp() if isinstance(path, RemoteFile) else _stamp(os.fstat(f.fileno())), size
            )
        h.update(f"\0{size}\0".encode())
        h.update(xxhash.xxh3_128_digest(chunks.finish(size)[1]))
    return h.hexdigest()


def _open(path: InputFile, buffered: bool = True) -> BinaryIO:
    """A local file as `open` gives it; a remote one through pyarrow (unbuffered: its own
    reader, for Parquet and plain block reads)."""
    try:
        if isinstance(path, RemoteFile):
            return path.open(buffered)  # type: ignore[no-any-return,unused-ignore]
        return open(path, "rb")
    except OSError as exc:
        raise InputError(path, None, f"cannot read the file: {exc.strerror or exc}") from None


def _stamp_of(path: InputFile) -> Stamp:
    """The file's `Stamp` now (a local path's `stat`, a remote file's `RemoteFile.stamp`)."""
    return path.stamp() if isinstance(path, RemoteFile) else _stamp(path.stat())


class _ArrowRaw(io.RawIOBase):
    """A pyarrow input file as a raw stream, so that `io.BufferedReader` (lines), `gzip`
    and the zstd reader read it as they read a local file."""

    def __init__(self, native: Any) -> None:
        self._native = native

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return int(self._native.readinto(buffer))

    def seek(self, pos: int, whence: int = 0) -> int:
        return int(self._native.seek(pos, whence))

    def tell(self) -> int:
        return int(self._native.tell())

    def close(self) -> None:
        self._native.close()
        super().close()


def _stamp(st: os.stat_result) -> Stamp:
    """What changes when a file does: size, mtime, and inode/ctime (a same-size copy that
    keeps the mtime, `cp -p` or `rsync -t`, still gets a new inode or ctime)."""
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns


def _check_unchanged(path: InputFile, before: Stamp, after: Stamp, size: int | None = None) -> None:
    """A file written to while it is read gives a store of neither version (and a fingerprint
    that does not describe it): refuse it."""
    if after != before or (size is not None and size != before[0]):
        raise InputError(
            path,
            None,
            f"the file changed while it was read ({before[0]:,} bytes, then {after[0]:,}); rerun once it is complete",
        )


class RecordReader:
    """Streams records from files in order; `bytes_read` tracks progress over `total_bytes`."""

    def __init__(self, paths: Sequence[InputFile]) -> None:
        self.paths = list(paths)
        self.stamps: list[Stamp] = []  # each file's `_stamp`, checked again after reading
        for path in self.paths:
            try:
                self.stamps.append(_stamp_of(path))
            except OSError as exc:
                raise InputError(path, None, f"cannot access the file: {exc.strerror or exc}") from None
        self.total_bytes = sum(stamp[0] for stamp in self.stamps)
        self._done_bytes = 0
        self._raw: BinaryIO | None = None

    @property
    def bytes_read(self) -> int:
        pos = 0
        if self._raw is not None and not self._raw.closed:
            pos = self._raw.tell()
        return self._done_bytes + pos

    def __iter__(self) -> Iterator[Record]:
        for path, stamp in zip(self.paths, self.stamps):
            count = 0
            fmt = _format_of(path)
            if fmt == ".parquet":
                reader = self._parquet(path)
            elif fmt == ".json":
                reader = self._json_array(path)
            else:
                reader = self._jsonl(path, fmt or "")
            try:
                for record in reader:
                    count += 1
                    yield record
                after = _stamp_of(path)
            except OSError as exc:  # a failing disk or network file system
                raise InputError(path, None, f"cannot read the file: {exc.strerror or exc}") from None
            _check_unchanged(path, stamp, after)
            self._done_bytes += stamp[0]
            self._raw = None
            if count == 0:
                raise InputError(path, None, "the file holds no documents (it is empty or blank)")

    def read_range(self, index: int, start: int, length: int) -> Iterator[Record]:
        """The records of bytes `[start, start + length)` of plain JSONL file `index`, a range
        that begins and ends at line starts (a shard of a distributed build). Lines are
        numbered from the range's first line as 1: the caller adds the lines before it."""
        path = self.paths[index]
        if _format_of(path) != ".jsonl":
            raise ConfigError(f"{path}: only plain .jsonl files are read by byte ranges")
        try:
            yield from self._jsonl(path, ".jsonl", start, length)
            after = _stamp_of(path)
        except OSError as exc:
            raise InputError(path, None, f"cannot read the file: {exc.strerror or exc}") from None
        _check_unchanged(path, self.stamps[index], after)

    def _jsonl(self, path: InputFile, fmt: str, start: int = 0, length: int | None = None) -> Iterator[Record]:
        source = str(path)
        lineno = 0
        with _open(path) as raw:
            self._raw = raw
            if start:
                raw.seek(start)
            left = length  # bytes of the range not read yet (None: to the end)
            stream: BinaryIO = raw
            if fmt == ".jsonl.gz":
                stream = gzip.GzipFile(fileobj=raw)  # type: ignore[assignment]  # checks CRC and length
            elif fmt == ".jsonl.zst":
                stream = io.BufferedReader(_ZstdReader(raw), 1 << 20)
            fast = msgspec.json.Decoder().decode
            try:
                for lineno, raw_line in enumerate(stream, 1):
                    if left is not None:
                        if left <= 0:
                            break
                        left -= len(raw_line)
                    if lineno == 1 and start == 0 and raw_line.startswith(b"\xef\xbb\xbf"):
                        raw_line = raw_line[3:]
                    if raw_line.isspace() or not raw_line:
                        continue
                    try:
                        data = fast(raw_line)
                    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                        data = _parse_slow(raw_line, source, lineno)  # exact messages, lenient stdlib JSON
                    if type(data) is not dict:
                        raise InputError(source, lineno, f"expected a JSON object, got {_kind(data)}")
                    yield Record(data, source, lineno)
            except (EOFError, OSError, zlib.error) as exc:
                # the error comes while the next line is read: the lines before it are intact
                kind = "gzip" if fmt == ".jsonl.gz" else "zstd"
                if isinstance(exc, EOFError):
                    message = f"the file is truncated: its {kind} data ends early (an interrupted download or copy?)"
                elif isinstance(exc, (gzip.BadGzipFile, zlib.error, _CorruptData)):
                    message = f"corrupt {kind} data ({exc})"
                else:
                    message = f"cannot read the file: {exc.strerror or exc}"
                raise InputError(source, lineno + 1, message) from None

    def _json_array(self, path: InputFile) -> Iterator[Record]:
        """A JSON array of objects, streamed element by element (bounded memory)."""
        source = str(path)
        with _open(path) if isinstance(path, RemoteFile) else open(path, "rb") as raw:
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
                elif text.at_end():
                    raise InputError(source, text.line, "the file ends before the array is closed (truncated?)")
                else:
                    raise InputError(source, text.line, "malformed JSON: expected ',' or ']' after an array element")
            text.skip_space()
            if not text.at_end():
                raise InputError(source, text.line, "malformed JSON: extra data after the array")

    def _parquet(self, path: InputFile) -> Iterator[Record]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        source = str(path)
        row = 0
        with _open(path, buffered=False) as raw:  # a remote file: pyarrow's own reader
            self._raw = raw
            try:
                batches = pq.ParquetFile(raw).iter_batches(batch_size=4096)
            except (pa.ArrowException, OSError) as exc:
                message = f"not a readable Parquet file (truncated, or not Parquet?): {exc}"
                raise InputError(source, None, message) from None
            while True:
                try:
                    batch = next(batches, None)
                except (pa.ArrowException, OSError) as exc:
                    raise InputError(source, row + 1, f"corrupt Parquet data: {exc}", "row ") from None
                if batch is None:
                    return
                for item in batch.to_pylist():
                    row += 1
                    yield Record(item, source, row, "row ")


class _CorruptData(OSError):
    """Compressed data that does not decode (gzip reports its own as `BadGzipFile`)."""


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of every zstd frame in `raw`, one after the other, each checked
    to its end: zstandard's `stream_reader` ends quietly when the file ends inside a frame,
    which would build a store from part of the data. Raises EOFError there instead."""

    def __init__(self, raw: BinaryIO) -> None:
        import zstandard

        self._raw, self._dctx, self._zstd_error = raw, zstandard.ZstdDecompressor(), zstandard.ZstdError
        self._frame: Any = None  # the current frame's decompressor; None between frames
        self._in, self._in_pos = b"", 0
        self._out, self._out_pos = b"", 0
        self._step = 1 << 10  # grows to 64 KiB after the first call unless the data expands a lot

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._out_pos >= len(self._out):
            if not self._decompress_more():
                return 0
        n = min(len(buffer), len(self._out) - self._out_pos)
        buffer[:n] = memoryview(self._out)[self._out_pos : self._out_pos + n]
        self._out_pos += n
        return n

    def _decompress_more(self) -> bool:
        if self._in_pos >= len(self._in):
            self._in, self._in_pos = self._raw.read(1 << 20), 0
            if not self._in:
                if self._frame is not None:
                    raise EOFError("the file ends inside a zstd frame")
                return False
        if self._frame is None:
            self._frame = self._dctx.decompressobj()
        piece = self._in[self._in_pos : self._in_pos + self._step]
        self._in_pos += len(piece)
        try:
            self._out, self._out_pos = self._frame.decompress(piece), 0
        except self._zstd_error as exc:
            raise _CorruptData(str(exc)) from None
        # feed less where the data expands a lot, so that one call's output stays a few MB
        self._step = max(64, min(1 << 16, (4 << 20) * len(piece) // max(len(self._out), 1)))
        if self._frame.eof:  # the frame is complete (checksum included); the next may follow
            self._in_pos -= len(self._frame.unused_data)
            self._frame = None
        return True


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
        decoder = json.JSONDecoder(parse_int=_int)
        while True:
            try:
                item, end = decoder.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as exc:
                if self._fill():
                    continue  # the value may continue in the next chunk
                line = self.line + self._buf.count("\n", self._pos, exc.pos)
                ends = exc.pos >= len(self._buf) or exc.msg.startswith("Unterminated string")
                raise InputError(
                    self.source,
                    line,
                    f"malformed JSON: {exc.msg}" + ("; the file ends inside this value (truncated?)" if ends else ""),
                ) from None
            except RecursionError:
                raise InputError(self.source, self.line, _TOO_DEEP) from None
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
        return json.loads(text, parse_int=_int)
    except json.JSONDecodeError as exc:
        raise InputError(source, lineno, f"malformed JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise InputError(source, lineno, _TOO_DEEP) from None


_TOO_DEEP = "JSON nested too deeply (the parser allows about 1,000 levels of arrays and objects)"


def _int(digits: str) -> int | decimal.Decimal:
    """A JSON integer; one past Python's int-parsing limit (4,300 digits) stays exact as a
    Decimal, which parses in linear time (an integer is never text sftpack uses: such a
    value is an ignored extra field, or an error naming the field)."""
    try:
        return int(digits)
    except ValueError:
        return decimal.Decimal(digits)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )
