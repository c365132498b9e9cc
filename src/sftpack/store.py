"""The on-disk packed store (format `sftpack.packed`, version 1).

A store directory holds flat `.npy` arrays and a JSON manifest:

- `tokens.npy`: the token stream (uint16 when the vocabulary fits, else uint32)
- `loss_mask.npy`: uint8 per token, 1 where the token is a training target
- `doc_offsets.npy`: int64 start of every document unit, plus the stream length

The writer builds in a temporary sibling directory, fsyncs, writes the manifest last and
renames the directory into place, so a target that holds `manifest.json` is complete.
Readers memory-map the arrays (no pickle anywhere) and check sizes; `verify` checks every
checksum. The writer and the readers share nothing but this format.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from .errors import StoreError

FORMAT = "sftpack.packed"
VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = {"tokens": "tokens.npy", "loss_mask": "loss_mask.npy", "doc_offsets": "doc_offsets.npy"}
NPY_HEADER = 128  # bytes reserved for the .npy v1.0 header of an array written incrementally


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id of the vocabulary (added tokens included) fits, else uint32."""
    if vocab_size < 1:
        raise StoreError(f"vocabulary size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _npy_header(dtype: np.dtype, length: int) -> bytes:
    body = f"{{'descr': '{dtype.str}', 'fortran_order': False, 'shape': ({length},), }}"
    pad = NPY_HEADER - 10 - len(body) - 1
    return b"\x93NUMPY\x01\x00" + (NPY_HEADER - 10).to_bytes(2, "little") + body.encode() + b" " * pad + b"\n"


class _Appender:
    """An .npy file written in pieces: header reserved first, patched on close."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path, self.dtype, self.length = path, np.dtype(dtype), 0
        self._f = open(path, "wb")
        self._f.write(b"\0" * NPY_HEADER)

    def append(self, values: np.ndarray) -> None:
        self._f.write(np.ascontiguousarray(values, dtype=self.dtype).data)
        self.length += len(values)

    def close(self, length: int | None = None) -> None:
        if length is not None:
            self.length = length
            self._f.truncate(NPY_HEADER + length * self.dtype.itemsize)
        self._f.seek(0)
        self._f.write(_npy_header(self.dtype, self.length))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def discard(self) -> None:
        if not self._f.closed:
            self._f.close()


def checksum(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(target: Path) -> None:
    """Remove temporary siblings of `target` left by builds whose process is gone."""
    prefix_tmp, prefix_old = f".{target.name}.tmp-", f".{target.name}.old-"
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        name = entry.name
        if name.startswith(prefix_tmp) or name.startswith(prefix_old):
            pid = name.rsplit("-", 2)[-2]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)


class StoreWriter:
    """Appends document units, then commits atomically (or discards everything).

    Use as a context manager: an exception inside the block discards the temporary
    directory and propagates unchanged; nothing is committed.
    """

    def __init__(self, target: str | os.PathLike, dtype: np.dtype) -> None:
        self.target = Path(target).absolute()
        if self.target.exists() and not (self.target / MANIFEST).exists():
            if not self.target.is_dir() or any(self.target.iterdir()):
                raise StoreError(f"{self.target} exists and is not an sftpack store; refusing to replace it")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(self.target)
        self.tmp = self.target.parent / f".{self.target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self.dtype = np.dtype(dtype)
        self._start_arrays()
        self._done = False

    def _start_arrays(self) -> None:
        self._tokens = _Appender(self.tmp / ARRAYS["tokens"], self.dtype)
        self._mask = _Appender(self.tmp / ARRAYS["loss_mask"], np.dtype(np.uint8))
        self._offsets = _Appender(self.tmp / ARRAYS["doc_offsets"], np.dtype(np.int64))
        self._offsets.append(np.zeros(1, dtype=np.int64))
        self.n_tokens = 0
        self.n_docs = 0

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is not None or not self._done:
            self.abort()
        return False

    def append(self, tokens: np.ndarray, mask: np.ndarray, unit_lengths: np.ndarray) -> None:
        """Append whole document units (tokens and mask of equal length)."""
        self._tokens.append(tokens)
        self._mask.append(mask)
        ends = self.n_tokens + np.cumsum(unit_lengths, dtype=np.int64)
        self._offsets.append(ends)
        self.n_tokens += int(len(tokens))
        self.n_docs += len(unit_lengths)

    def stage(self) -> dict[str, Path]:
        """Set aside what was appended (as finished `staged_*.npy` files, whose paths are
        returned) and start empty arrays, for a pass that writes the units in another order."""
        staged = {}
        for key, appender in (("tokens", self._tokens), ("loss_mask", self._mask), ("doc_offsets", self._offsets)):
            appender.close()
            staged[key] = appender.path.with_name("staged_" + appender.path.name)
            os.replace(appender.path, staged[key])
        self._start_arrays()
        return staged

    def loss_mask(self) -> np.ndarray:
        """The loss mask appended so far, memory-mapped read-only."""
        self._mask._f.flush()
        return np.memmap(self._mask.path, dtype=np.uint8, mode="r", offset=NPY_HEADER, shape=(self.n_tokens,))

    def commit(self, manifest: dict[str, Any], *, drop_last_tokens: int = 0) -> Path:
        """Finish the arrays, write the manifest last and move the store into place."""
        n_tokens = self.n_tokens - drop_last_tokens
        self._tokens.close(n_tokens)
        self._mask.close(n_tokens)
        self._offsets.close()
        if drop_last_tokens:
            offsets = np.load(self._offsets.path, mmap_mode="r+", allow_pickle=False)
            offsets[-1] = n_tokens
            offsets.flush()
            del offsets
            with open(self._offsets.path, "rb+") as f:
                os.fsync(f.fileno())
        for staged in self.tmp.glob("staged_*"):
            staged.unlink()
        files = {}
        for key, name in ARRAYS.items():
            path = self.tmp / name
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            files[key] = {
                "path": name,
                "dtype": arr.dtype.name,
                "length": int(arr.shape[0]),
                "bytes": path.stat().st_size,
                "xxh3_128": checksum(path),
            }
            del arr
        manifest = {"format": FORMAT, "version": VERSION, **manifest, "files": files}
        manifest["checksum"] = _manifest_checksum(manifest)
        tmp_manifest = self.tmp / (MANIFEST + ".part")
        with open(tmp_manifest, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_manifest, self.tmp / MANIFEST)
        _fsync_dir(self.tmp)
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        _fsync_dir(self.target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._done = True
        return self.target

    def abort(self) -> None:
        for a in (self._tokens, self._mask, self._offsets):
            a.discard()
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass(frozen=True)
class Store:
    """A committed store, memory-mapped."""

    path: Path
    manifest: dict[str, Any]
    tokens: np.ndarray
    loss_mask: np.ndarray
    doc_offsets: np.ndarray

    @property
    def doc_starts(self) -> np.ndarray:
        return self.doc_offsets[:-1]


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return xxhash.xxh3_128_hexdigest(json.dumps(body, sort_keys=True).encode())


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    root = Path(path)
    file = root / MANIFEST
    if not file.is_file():
        raise StoreError(f"{root} is not a complete sftpack store: {MANIFEST} is missing (an unfinished build?)")
    try:
        with open(file, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{file}: unreadable manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{file}: not an sftpack store manifest (format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise StoreError(
            f"{file}: store format version {manifest.get('version')!r} is not supported "
            f"(this sftpack reads version {VERSION}); rebuild the store"
        )
    if manifest.get("checksum") != _manifest_checksum(manifest):
        raise StoreError(f"{file}: checksum mismatch (the manifest is corrupt or was edited)")
    return manifest


def open_store(path: str | os.PathLike, *, verify: bool = False) -> Store:
    """Memory-map a committed store, checking file sizes (and checksums with `verify`)."""
    root = Path(path)
    manifest = read_manifest(root)
    arrays = {}
    for key, entry in manifest["files"].items():
        file = root / entry["path"]
        if not file.is_file():
            raise StoreError(f"{file}: missing from the store")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise StoreError(f"{file}: {size} bytes, the manifest says {entry['bytes']} (truncated or altered)")
        if verify and checksum(file) != entry["xxh3_128"]:
            raise StoreError(f"{file}: checksum mismatch (the file is corrupt)")
        try:
            arr = np.load(file, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise StoreError(f"{file}: unreadable array: {exc}") from None
        if arr.dtype.name != entry["dtype"] or arr.shape != (entry["length"],):
            raise StoreError(f"{file}: holds {arr.dtype}{arr.shape}, the manifest says {entry['dtype']}[{entry['length']}]")
        arrays[key] = arr
    for key in ARRAYS:
        if key not in arrays:
            raise StoreError(f"{root}: the manifest lists no {key!r} array")
    offsets = arrays["doc_offsets"]
    if len(arrays["tokens"]) != len(arrays["loss_mask"]) or (len(offsets) and offsets[-1] != len(arrays["tokens"])):
        raise StoreError(f"{root}: array lengths disagree (tokens, loss mask and document offsets)")
    return Store(root, manifest, arrays["tokens"], arrays["loss_mask"], arrays["doc_offsets"])


def verify_store(path: str | os.PathLike) -> Store:
    """Open with every checksum checked; raises `StoreError` naming the bad file."""
    return open_store(path, verify=True)
