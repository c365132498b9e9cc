"""The on-disk packed store (format `sftpack.packed`, version 3).

A store directory holds flat `.npy` arrays and a JSON manifest:

- `tokens.npy`: the token stream (uint16 when the vocabulary fits, else uint32)
- `loss_mask.npy`: uint8 per token, 1 where the token is a training target
- `doc_offsets.npy`: int64 start of every document unit, plus the stream length

The writer builds in a temporary sibling directory, fsyncs, writes the manifest last and
renames the directory into place, so a target that holds `manifest.json` is complete
(appended data is also fdatasynced in the background as it grows, so the commit's fsyncs
find little left to write).
Readers memory-map the arrays (no pickle anywhere) and check sizes; `verify` checks every
checksum. The writer and the readers share nothing but this format.

A file's checksum (version 3) is `xxh3_128` over the concatenated 16-byte `xxh3_128`
digests of its `chunk`-byte chunks (the last one shorter): the writer hashes each chunk as
it appends it (no re-read at commit), and a distributed build's tasks hash the chunks
inside the byte ranges they write while the driver hashes only the chunks that straddle
two ranges (`ChunkHasher`, `checksum(path, known=...)`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import xxhash

from .errors import StoreError

FORMAT = "sftpack.packed"
VERSION = 3  # 3: chunked file checksums (`xxh3_128_chunked`); 2 hashed each file in one sequence
CHUNK = 1 << 20  # bytes per checksum chunk; recorded per file, so a reader takes it from the manifest
MAX_CHUNK = 1 << 30
DIGEST = 16  # bytes of one chunk's xxh3_128 digest
MANIFEST = "manifest.json"
TMP_MARK = ".sftpack-tmp"  # inside every temporary directory sftpack makes: only those are cleaned
_MARK_TEXT = b"a temporary directory of an sftpack build: removed by the next build\n"
ARRAYS = {"tokens": "tokens.npy", "loss_mask": "loss_mask.npy", "doc_offsets": "doc_offsets.npy"}
# tokenizers whose first document of a stream encodes differently (SentencePiece) also
# store that variant of every document, so that any plan may put any document first
FIRST_ARRAYS = {
    "first_tokens": "first_tokens.npy",
    "first_mask": "first_mask.npy",
    "first_offsets": "first_offsets.npy",
}
ALL_ARRAYS = {**ARRAYS, **FIRST_ARRAYS}
NPY_HEADER = 128  # bytes reserved for the .npy v1.0 header of an array written incrementally
EARLY_SYNC = 1 << 20  # bytes appended to a file before a background fdatasync makes them durable


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id of the vocabulary (added tokens included) fits, else uint32."""
    if vocab_size < 1:
        raise StoreError(f"vocabulary size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _npy_header(dtype: np.dtype, length: int) -> bytes:
    body = f"{{'descr': '{dtype.str}', 'fortran_order': False, 'shape': ({length},), }}"
    pad = NPY_HEADER - 10 - len(body) - 1
    return b"\x93NUMPY\x01\x00" + (NPY_HEADER - 10).to_bytes(2, "little") + body.encode() + b" " * pad + b"\n"


class ChunkHasher:
    """The digests of a file's `chunk`-byte chunks that lie wholly inside the byte range
    written through `update`, which starts at `start` and goes on in order.

    Chunk k covers bytes [k * chunk, (k + 1) * chunk) of the file; the last chunk ends at
    the file's end. `finish(size)` returns `(first, run)`: the digests of chunks
    first, first + 1, ... concatenated (`DIGEST` bytes each; `run` is empty when no chunk
    lies inside the range). A chunk that begins before `start` is left to whoever knows its
    head (`checksum` reads it)."""

    def __init__(self, start: int, chunk: int) -> None:
        if chunk < 1:
            raise StoreError(f"checksum chunk must be positive, got {chunk}")
        self.chunk, self.pos = chunk, start
        self.first = -(-start // chunk)  # the first chunk that begins inside the range
        self._run = bytearray()
        self._h = xxhash.xxh3_128()
        self._inside = start % chunk == 0

    def update(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            piece = view[: self.chunk - self.pos % self.chunk]
            if self._inside:
                self._h.update(piece)
            self.pos += len(piece)
            view = view[len(piece) :]
            if self.pos % self.chunk == 0:
                if self._inside:
                    self._run += self._h.digest()
                    self._h.reset()
                self._inside = True

    def finish(self, size: int) -> tuple[int, bytes]:
        """The run of digests, the last (short) chunk included when the range ends at `size`."""
        if self._inside and self.pos == size and self.pos % self.chunk:
            self._run += self._h.digest()
        return self.first, bytes(self._run)


class _Appender:
    """An .npy file written in pieces: header reserved first, patched by `finish`. Chunk
    digests are computed as the data goes by; chunk 0, which holds the header, by `finish`
    from the data it holds, kept meanwhile (a chunk no larger than the header: read then).

    `background(fn, *args)` runs a sync in another thread: an fdatasync of the file every
    `EARLY_SYNC` bytes (one at a time), so that the disk writes and flushes its cache while
    the build goes on, and the fsync of `finish`, which then finds little left. The early
    syncs add no guarantee and take none away: the fsync still runs, and `synced` raises the
    error of any of them (a write error is reported once per open file, to whichever sync
    comes first)."""

    def __init__(self, path: Path, dtype: np.dtype, chunk: int, background: Callable[..., Future[None]]) -> None:
        self.path, self.dtype, self.length = path, np.dtype(dtype), 0
        self._hash = ChunkHasher(NPY_HEADER, chunk)
        self.digests: dict[int, bytes] = {}
        self._head = bytearray()  # the data in chunk 0, after the header
        self._head_room = chunk - NPY_HEADER if chunk > NPY_HEADER else 0
        self._background, self._unsynced = background, 0
        self._syncing: Future[None] | None = None  # the sync in flight (early or final), or a failed one
        self._f = open(path, "wb")
        self._f.write(b"\0" * NPY_HEADER)

    def append(self, values: np.ndarray) -> None:
        data = np.ascontiguousarray(values, dtype=self.dtype)
        self._f.write(data.data)
        self._hash.update(data)
        if len(self._head) < self._head_room:
            self._head += data.data.cast("B")[: self._head_room - len(self._head)]
        self.length += len(values)
        self._unsynced += data.nbytes
        if self._unsynced >= EARLY_SYNC:
            if self._syncing is None or (self._syncing.done() and self._syncing.exception() is None):
                self._f.flush()
                self._syncing = self._background(os.fdatasync, self._f.fileno())  # a failed one is kept
                self._unsynced = 0

    def synced(self) -> None:
        """Wait for the sync in flight (the file stays open meanwhile); raise its error."""
        if self._syncing is not None:
            self._syncing.result()
            self._syncing = None

    def finish(self) -> None:
        """Write the header, know every digest, and fsync and close the file in the background
        (`synced` waits for that)."""
        self.synced()
        header = _npy_header(self.dtype, self.length)
        self._f.seek(0)
        self._f.write(header)
        self._f.flush()
        first, run = self._hash.finish(NPY_HEADER + self.length * self.dtype.itemsize)
        if self._head_room:  # chunk 0: the header and the data after it (the whole file when shorter)
            first, run = 0, _chunk_digest(header + self._head) + run
        self.digests = {first: run} if run else {}
        self._syncing = self._background(self._fsync_close)

    def _fsync_close(self) -> None:
        os.fsync(self._f.fileno())
        self._f.close()

    def discard(self) -> None:
        if self._syncing is not None:  # its descriptor must not be closed (and reused) under it
            wait_futures([self._syncing])
        if not self._f.closed:
            self._f.close()


def checksum(path: Path, known: dict[int, bytes] | None = None, chunk: int | None = None) -> str:
    """The file's chunked checksum: xxh3_128 over the xxh3_128 digests of its chunks.
    `known`: runs of digests already computed (first chunk index -> concatenated digests,
    as `ChunkHasher.finish` gives them); every other chunk is read and hashed here."""
    chunk = chunk or CHUNK
    known = known or {}
    size = os.stat(path).st_size
    n = -(-size // chunk)
    h = xxhash.xxh3_128()
    with contextlib.ExitStack() as stack:
        f, buf = None, bytearray()  # opened for the first chunk not known
        k = 0
        while k < n:
            run = known.get(k)
            if run:
                run = run[: (n - k) * DIGEST]
                h.update(run)
                k += len(run) // DIGEST
                continue
            if f is None:
                f, buf = stack.enter_context(open(path, "rb", buffering=0)), bytearray(min(chunk, size))
            f.seek(k * chunk)
            got = 0
            while got < len(buf) and (step := f.readinto(memoryview(buf)[got:])):
                got += step
            h.update(_chunk_digest(memoryview(buf)[:got]))
            k += 1
    return h.hexdigest()


def _chunk_digest(data: Any) -> bytes:
    return xxhash.xxh3_128_digest(data)


def checksum_entry(path: Path, known: dict[int, bytes] | None = None, chunk: int | None = None) -> dict[str, Any]:
    """What a manifest's file entry records under `xxh3_128_chunked`."""
    chunk = chunk or CHUNK
    return {"chunk": chunk, "digest": checksum(path, known, chunk)}


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (main thread; elsewhere a no-op)."""
    signals = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LockUnavailable(StoreError):
    """The build lock cannot be created (a read-only or foreign directory)."""


@contextlib.contextmanager
def target_lock(target: Path, on_wait: Callable[[], None] | None = None, *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive `flock` on `.NAME.lock` beside `target` for the whole build.

    A kernel lock, not a PID: it holds across containers, and across nodes on file systems
    with working locks (NFSv4, Lustre, local disks). Waiters block until the holder is done
    (`on_wait` is called once first); with `wait=False` this yields False at once instead.
    The holder unlinks the file before unlocking; a waiter that then gets the lock of the
    unlinked file sees its inode gone and takes a fresh one.
    """
    path = target.parent / f".{target.name}.lock"
    waited = False
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LockUnavailable(f"cannot create the build lock {path}: {exc.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    os.close(fd)
                    yield False
                    return
                if not waited and on_wait is not None:
                    on_wait()
                waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    try:
        yield True
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass  # already gone (a hand cleanup): the lock itself is released on close
        os.close(fd)


def sweep(directory: Path, keep: Path | None = None) -> None:
    """Clean what killed builds left in `directory` (a cache) for any target no build holds:
    a cache entry whose inputs changed is never built again, so its own next build would
    never clean it. `keep`: as for `clean_stale`."""
    names = set()
    for entry in directory.iterdir() if directory.is_dir() else ():
        for mark in (".tmp-", ".old-"):
            if entry.name.startswith(".") and mark in entry.name:
                names.add(entry.name[1 : entry.name.rindex(mark)])
    names -= {"", ".", ".."}  # `directory / ".."` would clean beside the cache, outside it
    for name in sorted(names):
        try:
            with target_lock(directory / name, wait=False) as held:
                if held:
                    clean_stale(directory / name, keep=keep)
        except LockUnavailable:
            return


def clean_stale(target: Path, keep: Path | None = None) -> None:
    """Remove what builds of `target` killed before they finished left beside it.

    Call only while holding `target_lock(target)`: no other build of `target` can then be
    running, so every temporary sibling is stale. A previous store moved aside by a commit
    that was killed between its two renames is put back first, so nothing is lost. `keep`:
    a temporary sibling the caller reuses (a Ray build's verified shards).
    """
    parent = target.parent
    if not parent.is_dir():
        return
    tmp, old = f".{target.name}.tmp-", f".{target.name}.old-"
    entries = sorted(parent.iterdir())
    if not os.path.lexists(target):
        for entry in entries:
            if entry.name.startswith(old) and not entry.is_symlink() and owned_store(entry):
                os.replace(entry, target)
                break
    for entry in entries:
        if (entry.name.startswith(tmp) or entry.name.startswith(old)) and entry != keep and owned_tmp(entry):
            _remove_tree(entry)


def make_tmp(path: Path) -> None:
    """Create the temporary directory `path`, marked as sftpack's (see `owned_tmp`)."""
    path.mkdir()
    mark_tmp(path)


def mark_tmp(path: Path) -> None:
    """Mark the directory `path` as a temporary one of sftpack's: `clean_stale` may remove it."""
    (path / TMP_MARK).write_bytes(_MARK_TEXT)


def owned_tmp(path: Path) -> bool:
    """True for a directory that sftpack may delete as a leftover of its own builds: one it
    marked (`make_tmp`), a complete store of its own, or an empty one. A symlink, a file or a
    user's directory that happens to have such a name is never touched."""
    if path.is_symlink() or not path.is_dir():
        return False
    mark = path / TMP_MARK
    try:
        if not mark.is_symlink() and mark.is_file() and mark.read_bytes() == _MARK_TEXT:
            return True
    except OSError:
        return False
    return owned_store(path) or not any(path.iterdir())


def _remove_tree(path: Path) -> OSError | None:
    """Delete a directory sftpack made; return the first error instead of raising it (a
    full disk must not stop the cleanup that frees it)."""
    errors: list[OSError] = []
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=lambda fn, p, exc: errors.append(exc))  # type: ignore[arg-type]
    else:
        shutil.rmtree(path, onerror=lambda fn, p, info: errors.append(info[1]))  # type: ignore[arg-type]
    return errors[0] if errors else None


def owned_store(path: Path) -> bool:
    """True when `path` is a directory holding an sftpack store and nothing else: its
    manifest names sftpack's format and passes its checksum, every other entry is a regular
    file named as one of the store's files. Only such a directory (or an empty one) may be
    replaced."""
    try:
        read_manifest(path, any_version=True)  # a store of an older format is still ours to replace
    except StoreError:
        return False
    own = {MANIFEST, MANIFEST + ".part", *ALL_ARRAYS.values()}
    return all(e.name in own and e.is_file() and not e.is_symlink() for e in path.iterdir())


def prepare_target(target: str | os.PathLike) -> Path:
    """The directory a build may write, or a `StoreError` before any work is done.

    sftpack replaces only an empty directory or its own complete store. A symlink is
    followed (the store replaces the directory it points to; the link stays); a dangling
    link, a file, a mount point (it cannot be renamed) and any other directory are refused.
    """
    path = Path(target).absolute()
    if path.is_symlink():
        try:
            resolved = path.resolve(strict=False)
        except (RuntimeError, OSError) as exc:  # a symlink loop
            raise StoreError(f"{path} is a symlink that cannot be resolved ({exc}); choose another --out") from None
        if not resolved.exists():
            raise StoreError(
                f"{path} is a symlink to {resolved}, which does not exist; create it or choose another --out"
            )
        path = resolved
    if not path.exists():
        return path
    if path == Path.cwd() or path in Path.cwd().parents:
        raise StoreError(
            f"{path} is the current directory (or holds it): sftpack replaces a store by renaming "
            "a new directory into place, which would leave your shell in a deleted directory; "
            "choose another --out, such as ./store"
        )
    if not path.is_dir():
        raise StoreError(f"{path} exists and is not a directory; sftpack will not replace it: choose another --out")
    if os.path.ismount(path):
        raise StoreError(
            f"{path} is a mount point, which sftpack cannot replace atomically; "
            f"use a directory inside it, e.g. {path / 'store'}"
        )
    if any(path.iterdir()) and not owned_store(path):
        raise StoreError(
            f"{path} is not empty and is not an sftpack store; sftpack replaces only an empty directory "
            "or its own complete store: choose another --out (nothing was changed)"
        )
    return path


class StoreWriter:
    """Appends document units, then commits atomically (or discards everything).

    Use as a context manager: an exception inside the block discards the temporary
    directory and propagates unchanged; nothing is committed.
    """

    def __init__(self, target: str | os.PathLike, dtype: np.dtype) -> None:
        self.target = prepare_target(target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.target.parent / f".{self.target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.dtype = np.dtype(dtype)
        self.chunk = CHUNK  # checksum chunk of this store's files
        self._done = False
        self._appenders: dict[str, _Appender] = {}
        self._syncer: ThreadPoolExecutor | None = None  # early fdatasyncs (`_Appender`), started on demand
        self._known: dict[str, dict[int, bytes]] | None = None  # preallocated: digests from elsewhere
        try:
            make_tmp(self.tmp)  # inside: a Ctrl-C handled as mkdir returns must remove it too
            self._start_arrays()
        except BaseException:
            self.abort()
            raise

    def _start_arrays(self) -> None:
        self._tokens, self._mask, self._offsets = self._arrays(ARRAYS)
        self.n_tokens = 0
        self.n_docs = 0
        self.n_supervised = 0  # mask 1s, counted as they are written: no pass over the file after
        self._first: tuple[_Appender, _Appender, _Appender] | None = None
        self._first_tokens = 0

    def array_dtype(self, key: str) -> np.dtype:
        """The dtype of array `key` (an `ALL_ARRAYS` key) in this store."""
        return self.dtype if key.endswith("tokens") else np.dtype(np.int64 if key.endswith("offsets") else np.uint8)

    def _arrays(self, names: dict[str, str]) -> tuple[_Appender, _Appender, _Appender]:
        tokens, mask, offsets = (
            _Appender(self.tmp / n, self.array_dtype(k), self.chunk, self._in_background) for k, n in names.items()
        )
        self._appenders.update(zip(names, (tokens, mask, offsets)))
        offsets.append(np.zeros(1, dtype=np.int64))
        return tokens, mask, offsets

    def preallocate(self, lengths: dict[str, int], n_supervised: int) -> dict[str, int]:
        """Size every array at once, for writers in other processes (a distributed build's
        reduce): each file gets its final header and size (sparse; document offsets start
        with their 0) and nothing is appended here. The writers fill the data at their byte
        offsets and hand their chunk digests back through `add_digests`. `lengths` holds the
        length of every array of the store (`ARRAYS`, or `ALL_ARRAYS`); returns file sizes."""
        if set(lengths) not in (set(ARRAYS), set(ALL_ARRAYS)):
            raise StoreError(f"preallocate needs the length of every array, got {sorted(lengths)}")
        for appender in self._appenders.values():
            appender.discard()
        self._appenders = {}
        self._known = {key: {} for key in lengths}
        sizes = {}
        for key, length in lengths.items():
            dtype = self.array_dtype(key)
            sizes[key] = NPY_HEADER + length * dtype.itemsize
            with open(self.tmp / ALL_ARRAYS[key], "wb") as f:
                f.write(_npy_header(dtype, length))
                if key.endswith("offsets"):
                    f.write(np.zeros(1, np.int64).tobytes())
                f.truncate(sizes[key])
                f.flush()
                os.fsync(f.fileno())
        self.n_tokens, self.n_docs, self.n_supervised = lengths["tokens"], lengths["doc_offsets"] - 1, n_supervised
        self._first_tokens = lengths.get("first_tokens", 0)
        return sizes

    def _in_background(self, fn: Callable[..., None], *args: Any) -> Future[None]:
        """`fn(*args)` in the sync threads (started on demand): one sync at a time per file, the
        early ones while appending and the fsyncs of the commit."""
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(max_workers=len(ALL_ARRAYS), thread_name_prefix="sftpack-sync")
        return self._syncer.submit(fn, *args)

    def _stop_syncer(self) -> None:
        if self._syncer is not None:
            self._syncer.shutdown(wait=True)
            self._syncer = None

    def add_digests(self, key: str, first: int, run: bytes) -> None:
        """Digests of consecutive chunks of preallocated array `key`, computed by its writers."""
        if self._known is None:
            raise StoreError("add_digests is for a preallocated store")
        if run:
            self._known[key][first] = run

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Literal[False]:
        if exc_type is not None or not self._done:
            error = self.abort()
            if error is not None and exc is not None and hasattr(exc, "add_note"):
                exc.add_note(f"sftpack: removing {self.tmp} failed too: {error}")
        return False

    def append(self, tokens: np.ndarray, mask: np.ndarray, unit_lengths: np.ndarray) -> None:
        """Append whole document units (tokens and mask of equal length)."""
        self._tokens.append(tokens)
        self._mask.append(mask)
        self.n_supervised += int(np.count_nonzero(mask))
        self._offsets.append(self.n_tokens + np.cumsum(unit_lengths, dtype=np.int64))
        self.n_tokens += int(len(tokens))
        self.n_docs += len(unit_lengths)

    def append_first(self, tokens: np.ndarray, mask: np.ndarray, unit_lengths: np.ndarray) -> None:
        """Append the first-in-stream variant of the same units (`FIRST_ARRAYS`)."""
        if self._first is None:
            self._first = self._arrays(FIRST_ARRAYS)
        t, m, o = self._first
        t.append(tokens)
        m.append(mask)
        o.append(self._first_tokens + np.cumsum(unit_lengths, dtype=np.int64))
        self._first_tokens += int(len(tokens))

    def commit(self, manifest: dict[str, Any], check: Callable[[Path], object] | None = None) -> Path:
        """Finish the arrays, write the manifest last and move the store into place.
        `check(tmp)` runs on the finished store before it is published; raising aborts."""
        files = {}
        appenders = list(self._appenders.values())
        for appender in appenders:
            appender.finish()  # the files' fsyncs run at once, beside what follows
        try:
            known = self._known if self._known is not None else {k: a.digests for k, a in self._appenders.items()}
            for key in ALL_ARRAYS:
                if key not in known:
                    continue
                path = self.tmp / ALL_ARRAYS[key]
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
                files[key] = {
                    "path": ALL_ARRAYS[key],
                    "dtype": arr.dtype.name,
                    "length": int(arr.shape[0]),
                    "bytes": path.stat().st_size,
                    "xxh3_128_chunked": checksum_entry(path, known[key], self.chunk),
                }
                del arr
            counts = {**manifest.get("counts", {}), "documents": self.n_docs, "tokens": self.n_tokens}
            counts["supervised_tokens"] = self.n_supervised  # what was written, whatever the caller counted
            full = {"format": FORMAT, "version": VERSION, **manifest, "counts": counts, "files": files}
            _write_manifest(self.tmp, full)
            if check is not None:
                check(self.tmp)
        finally:  # every file durable before anything is published; an fsync's error comes first
            for appender in appenders:
                appender.synced()
        self._stop_syncer()
        prepare_target(self.target)  # still empty or our own store: nothing was put there meanwhile
        (self.tmp / TMP_MARK).unlink()  # a complete store now: `owned_tmp` knows it without the mark
        old = None
        with _signals_deferred():  # Ctrl-C between the two renames would leave no store at the target
            if os.path.lexists(self.target):
                old = self.target.parent / f".{self.target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                os.replace(self.target, old)
            try:
                os.replace(self.tmp, self.target)
            except BaseException:
                if old is not None:
                    os.replace(old, self.target)  # the previous store goes back where it was
                raise
            self._done = True
        _fsync_dir(self.target.parent)
        if old is not None:
            with contextlib.suppress(OSError):  # a removal cut short then leaves a marked leftover
                mark_tmp(old)
            _remove_tree(old)  # best effort: a leftover is removed by the next build of this target
        return self.target

    def abort(self) -> OSError | None:
        """Remove the temporary directory. Never raises: on a full disk closing a file fails
        again, and that must not keep the disk full. Returns the first error met."""
        first: OSError | None = None
        for appender in self._appenders.values():
            try:
                appender.discard()
            except OSError as exc:
                first = first or exc
        self._stop_syncer()
        removal = _remove_tree(self.tmp) if os.path.lexists(self.tmp) else None
        return first or removal


@dataclass(frozen=True)
class Store:
    """A committed store, memory-mapped."""

    path: Path
    manifest: dict[str, Any]
    tokens: np.ndarray
    loss_mask: np.ndarray
    doc_offsets: np.ndarray
    first_tokens: np.ndarray | None = None  # FIRST_ARRAYS, where the tokenizer needs them
    first_mask: np.ndarray | None = None
    first_offsets: np.ndarray | None = None

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return xxhash.xxh3_128_hexdigest(json.dumps(body, sort_keys=True).encode())


_ARRAY_DTYPES = {
    "tokens": ("uint16", "uint32"),
    "loss_mask": ("uint8",),
    "doc_offsets": ("int64",),
    "first_tokens": ("uint16", "uint32"),
    "first_mask": ("uint8",),
    "first_offsets": ("int64",),
}


def _shape_error(manifest: dict[str, Any]) -> str | None:
    """Why a checksum-valid manifest still cannot describe a store this version can serve
    (a hand edit with a recomputed checksum), or None."""
    from .config import OVERFLOWS, PACKINGS

    def count(v: Any, low: int = 0) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    def section(name: str) -> dict[str, Any]:
        value = manifest.get(name)
        return value if isinstance(value, dict) else {}

    options, plan, view = section("options"), section("plan"), section("view")
    tok, counts = section("tokenizer"), manifest.get("counts")
    if not isinstance(manifest.get("fingerprint"), str):
        return "no fingerprint"
    if not isinstance(options.get("train_on_prompt"), bool):
        return "options.train_on_prompt is missing or not a boolean"
    if not count(plan.get("seq_length"), 1):
        return f"plan.seq_length {plan.get('seq_length')!r} is not a positive integer"
    if plan.get("packing") not in PACKINGS or plan.get("overflow") not in OVERFLOWS:
        return "plan.packing or plan.overflow is not a known value"
    if not isinstance(plan.get("shuffle"), bool) or plan.get("pad") not in (True, False, None):
        return "plan.shuffle or plan.pad is not a boolean"
    if plan.get("seed") is not None and not count(plan.get("seed")):
        return "plan.seed is not a non-negative integer"
    if not all(isinstance(view.get(k), bool) for k in ("boundaries", "mask_cross_document")):
        return "view options are missing or not booleans"
    if not count(tok.get("vocab_size"), 1) or not isinstance(tok.get("name"), str):
        return "the tokenizer record has no name or vocabulary size"
    if not all(tok.get(k) is None or count(tok.get(k)) for k in ("bos_id", "eos_id", "pad_id")):
        return "the tokenizer's special ids are not non-negative integers"
    needed = ("documents", "tokens", "supervised_tokens", "special_token_documents", "input_bytes")
    if not isinstance(counts, dict) or not all(count(counts.get(k)) for k in needed):
        return f"counts must hold non-negative integers {needed}"
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) not in (set(ARRAYS), set(ALL_ARRAYS)):
        return f"files must list exactly {sorted(ARRAYS)} (and, for some tokenizers, {sorted(FIRST_ARRAYS)})"
    for key, entry in files.items():
        # exact names only: an entry may never point outside the store (`../x`, `/etc/passwd`)
        if not isinstance(entry, dict) or entry.get("path") != ALL_ARRAYS[key]:
            return f"file entry {key!r} must be the plain name {ALL_ARRAYS[key]!r}"
        if entry.get("dtype") not in _ARRAY_DTYPES[key]:
            return f"{key} dtype {entry.get('dtype')!r} is not one of {_ARRAY_DTYPES[key]}"
        hashed = entry.get("xxh3_128_chunked")
        if (
            not count(entry.get("length"))
            or not count(entry.get("bytes"))
            or not isinstance(hashed, dict)
            or not isinstance(hashed.get("digest"), str)
            or not count(hashed.get("chunk"), 1)
            or hashed["chunk"] > MAX_CHUNK
        ):
            return f"file entry {key!r} lacks a length, size or chunked checksum (chunk of 1 B to 1 GiB)"
    if any(files[k]["dtype"] != token_dtype(tok["vocab_size"]).name for k in ("tokens", "first_tokens") if k in files):
        return "the token dtype does not match the vocabulary size"
    if counts["documents"] != files["doc_offsets"]["length"] - 1 or counts["tokens"] != files["tokens"]["length"]:
        return "counts.documents or counts.tokens disagree with the arrays"
    if counts["supervised_tokens"] > counts["tokens"] or counts["special_token_documents"] > counts["documents"]:
        return "counts.supervised_tokens or counts.special_token_documents exceed the tokens or documents"
    return None


def read_manifest(path: str | os.PathLike, *, any_version: bool = False) -> dict[str, Any]:
    """The manifest of a complete store, checked: format, version, checksum and shape.
    `any_version`: only the format and the checksum (is it a store sftpack wrote at all?)."""
    root = Path(path)
    file = root / MANIFEST
    if file.is_symlink() or not file.is_file():
        what = "is not a regular file" if os.path.lexists(file) else "is missing (an unfinished build?)"
        raise StoreError(f"{root} is not a complete sftpack store: {MANIFEST} {what}")
    try:
        with open(file, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise StoreError(f"{file}: unreadable manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise StoreError(f"{file}: not an sftpack store manifest (format {found!r})")
    if any_version:
        if manifest.get("checksum") != _manifest_checksum(manifest):
            raise StoreError(f"{file}: checksum mismatch (the manifest is corrupt or was edited)")
        return manifest
    if manifest.get("version") != VERSION:
        raise StoreError(
            f"{file}: store format version {manifest.get('version')!r} is not supported "
            f"(this sftpack reads version {VERSION}); rebuild the store"
        )
    if manifest.get("checksum") != _manifest_checksum(manifest):
        raise StoreError(f"{file}: checksum mismatch (the manifest is corrupt or was edited)")
    problem = _shape_error(manifest)
    if problem is not None:
        raise StoreError(f"{file}: {problem}; rebuild the store")
    return manifest


def _check_offsets(root: Path, offsets: np.ndarray, n_tokens: int) -> None:
    """Offsets must start at 0, never decrease and end at the token count: anything else
    would serve negative positions or rows from outside the stream. One pass over the
    offsets (8 bytes a document), in chunks so the check does not hold them in memory."""
    if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != n_tokens:
        raise StoreError(f"{root}: document offsets must start at 0 and end at the token count ({n_tokens})")
    step = 1 << 22
    for lo in range(0, len(offsets) - 1, step):
        chunk = np.asarray(offsets[lo : lo + step + 1])
        if (chunk[1:] <= chunk[:-1]).any():  # every unit holds at least its EOS or BOS
            raise StoreError(f"{root}: document offsets do not increase (the store is corrupt); rebuild it")


def open_store(path: str | os.PathLike, *, verify: bool = False) -> Store:
    """Memory-map a committed store after the checks that keep impossible rows from being
    served: manifest shape, file names and sizes, array dtypes and lengths, offsets.
    `verify` also checks every checksum and that every id lies inside the vocabulary.

    A build replaces a store by renaming a directory into place; the manifest and arrays
    are opened one by one, so the directory must be the same one before and after (else
    they could come from two builds): a replacement seen meanwhile means opening again."""
    root = Path(path)
    for _ in range(5):
        before = _dir_id(root)
        try:
            store = _open_once(root, verify)
        except StoreError:
            if _dir_id(root) == before:
                raise
            continue  # its files disagreed because it was replaced meanwhile: open the new one
        if _dir_id(root) == before:
            return store
    raise StoreError(f"{root} was replaced five times while it was opened; try again once its builds are done")


def _dir_id(root: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(root)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _open_once(root: Path, verify: bool) -> Store:
    manifest = read_manifest(root)
    arrays = {}
    for key, entry in manifest["files"].items():
        file = root / entry["path"]
        if file.is_symlink() or not file.is_file():
            raise StoreError(f"{file}: missing from the store (or not a regular file)")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise StoreError(f"{file}: {size} bytes, the manifest says {entry['bytes']} (truncated or altered)")
        hashed = entry["xxh3_128_chunked"]
        if verify and checksum(file, chunk=hashed["chunk"]) != hashed["digest"]:
            raise StoreError(f"{file}: checksum mismatch (the file is corrupt)")
        try:
            arr = np.load(file, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise StoreError(f"{file}: unreadable array: {exc}") from None
        if arr.dtype.name != entry["dtype"] or arr.shape != (entry["length"],):
            raise StoreError(
                f"{file}: holds {arr.dtype}{arr.shape}, the manifest says {entry['dtype']}[{entry['length']}]"
            )
        arrays[key] = arr
    pairs = [("tokens", "loss_mask", "doc_offsets")]
    if "first_tokens" in arrays:
        pairs.append(("first_tokens", "first_mask", "first_offsets"))
        if len(arrays["first_offsets"]) != len(arrays["doc_offsets"]):
            raise StoreError(f"{root}: first-document variants do not cover every document")
    vocab = manifest["tokenizer"]["vocab_size"]
    for tokens_key, mask_key, offsets_key in pairs:
        tokens = arrays[tokens_key]
        if len(tokens) != len(arrays[mask_key]):
            raise StoreError(f"{root}: array lengths disagree ({tokens_key} and {mask_key})")
        _check_offsets(root, arrays[offsets_key], len(tokens))
        for lo in range(0, len(tokens) if verify else 0, 1 << 24):
            if int(tokens[lo : lo + (1 << 24)].max()) >= vocab:
                raise StoreError(
                    f"{root / ALL_ARRAYS[tokens_key]}: holds a token id outside the vocabulary (size {vocab})"
                )
    if verify:
        mask = arrays["loss_mask"]
        ones = sum(int(np.count_nonzero(mask[lo : lo + (1 << 24)])) for lo in range(0, len(mask), 1 << 24))
        if ones != manifest["counts"]["supervised_tokens"]:
            raise StoreError(f"{root}: counts.supervised_tokens is not the loss mask's count of trained tokens")
    return Store(root, manifest, **arrays)


def record_defaults(path: Path, **sections: dict[str, Any]) -> None:
    """Replace sections of a complete store's manifest (the plan and view it opens with by
    default), atomically: the arrays and the fingerprint stay as they are."""
    _write_manifest(path, {**read_manifest(path), **sections})


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Checksum `manifest` and put it in `directory` atomically (written aside, fsynced, renamed)."""
    manifest["checksum"] = _manifest_checksum(manifest)
    part = directory / (MANIFEST + ".part")
    with open(part, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, directory / MANIFEST)
    _fsync_dir(directory)


def verify_store(path: str | os.PathLike) -> Store:
    """Open with every checksum checked; raises `StoreError` naming the bad file."""
    return open_store(path, verify=True)
