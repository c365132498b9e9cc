"""The build on a Ray cluster (`engine="ray"`): the same store, byte for byte, as the local build.

1. Plan (driver): the inputs are cut into shards in input order. A plain `.jsonl` file is
   cut into byte ranges of about `SHARD_BYTES` that begin at line starts (a few bytes are
   read at each cut, never the file); any other file is one shard.
2. Map (Ray Data, one task per shard, retried by Ray on a lost worker): the local build's
   own stages (`RecordReader`, `_encode_all`: render, encode, id checks) write the shard
   as a small store of its own (`StoreWriter`: tokens, mask, offsets, the first-in-stream
   arrays where the tokenizer needs them, checksums, and a manifest naming the build
   fingerprint and the shard's range) in a staging directory beside the target.
3. Reduce: the driver reads only the shards' manifests (array lengths), prefix-sums them
   into each shard's place in the store, and preallocates the store's files at full size in
   the target's temporary directory; Ray tasks (one per shard) copy their shard's arrays
   there at their byte offsets (offsets made global) and return the digests of the
   checksum chunks inside what they wrote; the driver hashes only the chunks that straddle
   two shards and `build` commits. Tokens never pass through the driver.

The staging directory `.NAME.tmp-shards-FINGERPRINT` is a temporary sibling of the target
(`store.clean_stale` and `store.sweep` remove it like any other); only a Ray build of the
same fingerprint keeps it, and reuses a shard there only after checking its checksums, its
fingerprint and its range. It is removed once the store is written. This module imports
ray only when a build runs on it (`import sftpack` and local builds never do).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, errors
from .config import BuildOptions
from .errors import ConfigError, InputError, SFTPackError, StoreError, TokenizerError, error_value
from .records import InputFile, RecordReader, RemoteFile, _check_unchanged, _format_of, _open, _stamp_of
from .store import (
    ALL_ARRAYS,
    ARRAYS,
    MANIFEST,
    NPY_HEADER,
    TMP_MARK,
    ChunkHasher,
    Store,
    StoreWriter,
    _npy_header,
    _remove_tree,
    clean_stale,
    make_tmp,
    mark_tmp,
    open_store,
    owned_tmp,
    target_lock,
    token_dtype,
)
from .templates import Schema
from .tokenizers import Tokenizer, load_tokenizer

SHARD_BYTES = 64 << 20  # input bytes a task reads: large enough that a task lasts seconds
MAX_RETRIES = 3  # attempts Ray makes again for a task whose worker or node died
COPY_BYTES = 1 << 26  # bytes a reduce task copies at a time (bounded memory)


def staging_dir(out: Path, fp: str) -> Path:
    """Where the shards of the build of fingerprint `fp` at `out` are written."""
    return out.parent / f".{out.name}.tmp-shards-{fp[:32]}"


@dataclass(frozen=True)
class _Job:
    """What every task needs, sent once with the map function (small: no tokenizer object)."""

    staging: str
    fingerprint: str
    tokenizer: Any  # the caller's form: a bundled name, an absolute path, a picklable HF object
    tokenizer_fingerprint: str
    options: BuildOptions
    kind: str
    version: str = __version__  # workers run their own sftpack: it must be this one


def plan_shards(reader: RecordReader, shard_bytes: int | None = None) -> list[dict[str, Any]]:
    """Shards in input order: (file, start, length), the file's size and mtime as fingerprinted
    (and a remote file's ETag hash); a remote file is named by its URI, which every task opens."""
    size_limit = shard_bytes or SHARD_BYTES
    shards: list[dict[str, Any]] = []
    for i, (path, stamp) in enumerate(zip(reader.paths, reader.stamps)):
        size = stamp[0]
        cuts = _line_starts(path, size, size_limit) if _format_of(path) == ".jsonl" else []
        bounds = [0, *cuts, size]
        for start, end in zip(bounds, bounds[1:]):
            shards.append(
                {
                    "index": len(shards),
                    "file": i,
                    "path": str(path) if isinstance(path, RemoteFile) else os.path.abspath(path),
                    "root": path.root if isinstance(path, RemoteFile) else "",  # to open it: never shown
                    "object": path.path if isinstance(path, RemoteFile) else "",
                    "start": start,
                    "length": end - start,
                    "ranged": bool(cuts),
                    "size": size,
                    "mtime_ns": stamp[1],
                    "version": stamp[2] if isinstance(path, RemoteFile) else 0,
                    # a local file's inode and ctime: a same-size copy keeping the mtime (`cp -p`) changes them
                    "ino": 0 if isinstance(path, RemoteFile) else stamp[2],
                    "ctime_ns": 0 if isinstance(path, RemoteFile) else stamp[4],
                }
            )
    return shards


def _line_starts(path: InputFile, size: int, step: int) -> list[int]:
    """Line starts near every `step` bytes of a file (the first after each cut)."""
    cuts: list[int] = []
    with _open(path, buffered=False) as f:
        at = step
        while at < size:
            f.seek(at - 1)
            tail = 0
            while True:
                chunk = f.read(1 << 16)
                if not chunk:
                    return cuts  # the last line has no newline: no cut after it
                nl = chunk.find(b"\n")
                if nl >= 0:
                    cut = at - 1 + tail + nl + 1
                    break
                tail += len(chunk)
            if cut >= size:
                break
            cuts.append(cut)
            at = max(cut, at) + step
    return cuts


def encode_on_ray(
    reader: RecordReader,
    out: Path,
    fp: str,
    tok: Tokenizer,
    tokenizer: Any,
    schema: Schema,
    options: BuildOptions,
    writer: StoreWriter,
    progress: bool | None,
) -> int:
    """Fill `writer` as the local build would, with the work done by Ray tasks; returns the
    count of documents holding special-token strings (see `build._encode_all`)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("engine='ray' needs Ray Data: pip install 'sftpack[ray]'") from None
    from .build import _progress_bar

    job = _Job(
        staging=str(staging_dir(out, fp)),
        fingerprint=fp,
        tokenizer=_portable(tokenizer),
        tokenizer_fingerprint=tok.fingerprint(),
        options=options,
        kind=first_kind(reader, schema),
    )
    shards = plan_shards(reader)
    _claim_staging(Path(job.staging))
    started = not ray.is_initialized()
    if started:
        where = options.ray_address or os.environ.get("RAY_ADDRESS")
        try:
            # Ray's own notices (the local instance it started, deprecations) are not the user's concern
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                ray.init(
                    address=options.ray_address,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"cannot start or join Ray at {where or 'this machine'}: {exc}") from None
    elif options.ray_address:
        raise ConfigError(
            f"ray_address={options.ray_address!r} was given, but this process already runs Ray, which the build "
            "uses: drop ray_address, or call ray.shutdown() first"
        )
    try:
        with warnings.catch_warnings():  # Ray Data's deprecation notices of its own settings
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray")
            results = _run(ray, job, shards, _progress_bar(reader.total_bytes, progress))
        documents = 0  # of the current file
        for shard, result in zip(shards, results):  # the first error in input order, as the local build meets it
            if result["error"]:
                raise shard_error(result, shard, reader)
            documents = (documents if shard["start"] else 0) + result["documents"]
            if shard["start"] + shard["length"] == shard["size"] and documents == 0:
                path = reader.paths[shard["file"]]
                raise InputError(path, None, "the file holds no documents (it is empty or blank)")
        for path, stamp in zip(reader.paths, reader.stamps):  # still as fingerprinted, seen from here too
            _check_unchanged(path, stamp, _stamp_of(path))
        _reduce(ray, job, shards, results, writer)
    finally:
        if started:
            ray.shutdown()
    _remove_tree(Path(job.staging))  # every shard is in the store; a leftover is cleaned by the next build
    return sum(result["special_docs"] for result in results)


def _claim_staging(staging: Path) -> None:
    """Create the staging directory, or reuse it if it is sftpack's: a symlink or a directory
    of someone else's at that name is never written into (nor, later, cleaned)."""
    if not os.path.lexists(staging):
        make_tmp(staging)
        return
    if not owned_tmp(staging):
        raise StoreError(
            f"{staging} exists and is not a staging directory of sftpack's (a symlink, a file, or a directory "
            f"without {TMP_MARK}); sftpack will neither write into it nor delete it: move it away and rerun"
        )
    mark_tmp(staging)  # an empty directory (a killed start) is taken over


def _run(ray: Any, job: _Job, shards: list[dict[str, Any]], bar: Any) -> list[dict[str, Any]]:
    """Run the shard tasks; results in shard order, up to (and including) the first shard
    that failed, so that the error reported is the one the local build would meet first."""
    ds = _mapped(ray, shards, functools.partial(run_shard, job))
    done: dict[int, dict[str, Any]] = {}
    first_bad = len(shards)
    quiet = logging.getLogger("ray.data")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # no per-run notices on the user's terminal
    try:
        for row in ds.iter_rows():
            result = dict(row)
            done[result["index"]] = result
            if result["error"]:
                first_bad = min(first_bad, result["index"])
            if bar is not None:
                bar.update(result["bytes"])
            if first_bad < len(shards) and all(i in done for i in range(first_bad)):
                break  # every shard before the failed one is done: its error is the first
    finally:
        quiet.setLevel(level)
        if bar is not None:
            bar.close()
    return [done[i] for i in range(min(first_bad + 1, len(shards)))]


def _mapped(ray: Any, items: list[dict[str, Any]], task: Any) -> Any:
    """A Ray Data dataset of `task` over `items`, one block (one task) each, retried on a lost worker."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one bar, ours, in bytes of input
    ctx.print_on_execution_start = False
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    with warnings.catch_warnings():
        # Ray Data has no named parameter for it yet (2.60 deprecates the generic ones); without
        # it, Ray Data's default retries a task of a lost worker without end
        warnings.simplefilter("ignore")
        try:
            return ds.map(task, num_cpus=1, max_retries=MAX_RETRIES)
        except TypeError:
            return ds.map(task, num_cpus=1)


def first_kind(reader: RecordReader, schema: Schema) -> str:
    """The schema kind, detected on the first record as the local build does (one for all shards)."""
    if schema.name != "auto":
        return schema.name
    first = RecordReader(reader.paths[:1])
    records = iter(first)
    try:
        return schema.detect(next(records))
    finally:
        records.close()  # type: ignore[attr-defined]


def _portable(tokenizer: Any) -> Any:
    """The tokenizer as workers load it: paths made absolute; an object must pickle."""
    if isinstance(tokenizer, (str, os.PathLike)):
        return os.path.abspath(tokenizer) if os.path.exists(tokenizer) else os.fspath(tokenizer)
    if tokenizer is None:
        return None
    import pickle

    try:
        from ray import cloudpickle

        cloudpickle.dumps(tokenizer)
    except (TypeError, ValueError, AttributeError, pickle.PicklingError) as exc:
        raise ConfigError(
            f"engine='ray' loads the tokenizer on every worker, and a {type(tokenizer).__name__} cannot be sent "
            f"there ({exc}): pass a bundled name, or a tokenizer path that every node can read"
        ) from None
    return tokenizer


def _shard_path(job: _Job, shard: dict[str, Any]) -> Path:
    return Path(job.staging) / f"shard-{shard['index']:06d}"


def _shard_key(shard: dict[str, Any]) -> dict[str, Any]:
    return {k: shard[k] for k in ("index", "path", "start", "length", "size", "mtime_ns", "version")}


_TOKENIZERS: dict[str, Tokenizer] = {}  # per worker process: loaded once, used by every shard it runs


def run_shard(job: _Job, shard: dict[str, Any]) -> dict[str, Any]:
    """One task: reuse the verified shard, or build it. Errors sftpack raises on purpose come
    back as values (the driver reports the first in input order, located as file:line)."""
    result = {"index": shard["index"], "bytes": shard["length"], "reused": False, "error": ""}
    result.update(message="", line=-1, unit="")
    path = _shard_path(job, shard)
    try:
        with target_lock(path):
            clean_stale(path)  # an attempt killed while writing left its temporary directory
            store = _verified(path, job, shard)
            result["reused"] = store is not None
            if store is None:
                store = _write_shard(path, job, shard)
    except SFTPackError as exc:
        result.update(error_value(exc))
        return {**result, "documents": 0, "special_docs": 0, "supervised": 0, **dict.fromkeys(_LENGTHS, -1)}
    counts, files = store.manifest["counts"], store.manifest["files"]
    lengths = {f"length_{k}": files[k]["length"] if k in files else -1 for k in ALL_ARRAYS}  # -1: none
    return {
        **result,
        "documents": counts["documents"],
        "special_docs": counts["special_token_documents"],
        "supervised": counts["supervised_tokens"],
        **lengths,
    }


_LENGTHS = [f"length_{k}" for k in ALL_ARRAYS]  # a shard's array lengths, for the reduce's prefix sums


def _verified(path: Path, job: _Job, shard: dict[str, Any]) -> Store | None:
    """The finished shard at `path` when every checksum, the fingerprint and the range match."""
    if not os.path.lexists(path):
        return None
    if path.is_symlink():  # never followed: only the link goes
        path.unlink()
        return None
    try:
        store = open_store(path, verify=True) if (path / MANIFEST).is_file() else None
    except SFTPackError:
        store = None
    if store is not None and store.fingerprint == job.fingerprint and store.manifest.get("shard") == _shard_key(shard):
        return store
    _remove_tree(path)  # damaged, unfinished or of another build: redone
    return None


def _write_shard(path: Path, job: _Job, shard: dict[str, Any]) -> Store:
    from .build import _encode_all, manifest, schema_and_template

    if job.version != __version__:
        raise ConfigError(f"a Ray worker runs sftpack {__version__}, the driver {job.version}: install one everywhere")
    tok = _TOKENIZERS.get(job.tokenizer_fingerprint)
    if tok is None:
        tok = load_tokenizer(job.tokenizer, threads=1)
        if tok.fingerprint() != job.tokenizer_fingerprint:
            raise TokenizerError(
                "the tokenizer a Ray worker loaded differs from the driver's: give a path that holds the same "
                "tokenizer on every node"
            )
        _TOKENIZERS[job.tokenizer_fingerprint] = tok
    schema, template = schema_and_template(job.options, tok)
    source: InputFile = Path(shard["path"])
    if shard["root"]:  # a URI: this task reads it from the file system itself (ranged reads)
        source = RemoteFile(shard["root"], shard["object"], shard["path"])
    reader = RecordReader([source])
    stamp = reader.stamps[0]
    if stamp[:2] != (shard["size"], shard["mtime_ns"]) or (
        (stamp[2] != shard["version"]) if shard["root"] else ((stamp[2], stamp[4]) != (shard["ino"], shard["ctime_ns"]))
    ):
        raise InputError(source, None, "the file changed since the build began; rerun once it is complete")
    records = reader.read_range(0, shard["start"], shard["length"]) if shard["ranged"] else iter(reader)
    with StoreWriter(path, token_dtype(tok.vocab_size)) as writer:
        special = _encode_all(records, tok, schema, template, job.options, writer, kind=job.kind)
        made = manifest(job.fingerprint, tok, job.options, writer, special, shard["length"])
        writer.commit({**made, "shard": _shard_key(shard)})
    return open_store(path)


def reduce_plan(lengths: list[dict[str, int]]) -> tuple[list[dict[str, int]], dict[str, int]]:
    """Where each shard goes in the store, from the shards' array lengths alone (prefix sums).

    Returns, per shard, the element index at which each of its arrays starts in the store's
    array and the value added to its offsets (`base_KEY`; a shard's offsets drop their
    leading 0, which the store has once), and the store's array lengths. Pure arithmetic:
    O(shards) integers, whatever the size of the data."""
    keys = [k for k in ALL_ARRAYS if any(k in shard for shard in lengths)] or list(ARRAYS)
    totals = dict.fromkeys(keys, 0)  # documents for an offsets array, else elements
    places = []
    for shard in lengths:
        # a shard without documents has no first-in-stream arrays: it adds nothing to them
        shard = {**{k: int(k in _TOKENS_OF) for k in keys}, **shard}
        place = {}
        for key in keys:
            if key in _TOKENS_OF:
                place[f"at_{key}"] = totals[key] + 1
                place[f"base_{key}"] = totals[_TOKENS_OF[key]]
            else:
                place[f"at_{key}"] = totals[key]
        for key in keys:
            totals[key] += shard[key] - (key in _TOKENS_OF)
        places.append(place)
    return places, {k: v + (k in _TOKENS_OF) for k, v in totals.items()}


_TOKENS_OF = {"doc_offsets": "tokens", "first_offsets": "first_tokens"}  # the stream an offsets array indexes


def _reduce(
    ray: Any, job: _Job, shards: list[dict[str, Any]], results: list[dict[str, Any]], writer: StoreWriter
) -> None:
    """Assemble the store in `writer` from the shards. The driver prefix-sums the array
    lengths the map tasks returned and preallocates the files; Ray tasks copy the arrays
    and hash every chunk (a chunk by the task whose range holds its first byte, reading the
    next shards' heads for a chunk that runs past its range): the driver reads no shard
    file and no array byte, and the commit only combines the digests."""
    lengths = [{k: int(r[f"length_{k}"]) for k in ALL_ARRAYS if r[f"length_{k}"] >= 0} for r in results]
    places, totals = reduce_plan(lengths)
    sizes = writer.preallocate(totals, sum(int(r["supervised"]) for r in results))
    sources = [str(_shard_path(job, shard)) for shard in shards]
    items = reduce_tasks(places, sources, writer, sizes)
    task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(copy_shard)
    rows = ray.get([task.remote(item) for item in items])
    for row in rows:
        if row["error"]:
            raise StoreError(f"a Ray task could not write the store in {writer.tmp}: {row['error']}")
        for key in totals:
            writer.add_digests(key, *row["digests"][key])


def reduce_tasks(
    places: list[dict[str, int]], sources: list[str], writer: StoreWriter, sizes: dict[str, int]
) -> list[dict[str, Any]]:
    """What each reduce task gets: its shard and place, the preallocated store, and the next
    shards whose heads complete the chunk its range ends inside (when that chunk is its own:
    chunk k is hashed by the task whose range holds byte k * chunk; the first task also
    hashes the chunks of the header)."""
    chunk = writer.chunk
    bounds = {}  # per array: the byte range each shard writes (contiguous, in shard order)
    for key in sizes:
        width = writer.array_dtype(key).itemsize
        starts = [NPY_HEADER + place[f"at_{key}"] * width for place in places]
        bounds[key] = list(zip(starts, [*starts[1:], sizes[key]]))
    items: list[dict[str, Any]] = []
    for i, place in enumerate(places):
        last = i
        for ranges in bounds.values():
            start, end = ranges[i]
            if end % chunk and (i == 0 or end // chunk * chunk >= start):
                while last + 1 < len(places) and ranges[last + 1][0] < (end // chunk + 1) * chunk:
                    last += 1
        items.append(
            {
                **place,
                "index": i,
                "source": sources[i],
                "target": str(writer.tmp),
                "chunk": chunk,
                "sizes": sizes,
                "dtype": writer.dtype.str,
                "follow": [{**places[j], "source": sources[j]} for j in range(i + 1, last + 1)],
            }
        )
    return items


def copy_shard(item: dict[str, Any]) -> dict[str, Any]:
    """One reduce task: write a shard's arrays into the preallocated store at their places
    (offsets made global), fsync, and return the digests of the chunks that begin inside
    what it wrote (the first shard's also those of the header)."""
    out: dict[str, Any] = {"index": item["index"], "error": "", "digests": {}}
    try:
        shard = open_store(item["source"])
        following = [(open_store(f["source"]), f) for f in item["follow"]]
        for key, size in item["sizes"].items():
            values = _values(shard, key, item, np.dtype(item["dtype"]))
            start = NPY_HEADER + item[f"at_{key}"] * values.dtype.itemsize
            hasher = ChunkHasher(0 if item["index"] == 0 else start, item["chunk"])
            if item["index"] == 0:  # the header (and the offsets' leading 0) the driver wrote
                total = (size - NPY_HEADER) // values.dtype.itemsize
                hasher.update(_npy_header(values.dtype, total) + bytes(start - NPY_HEADER))
            _write_at(Path(item["target"]) / ALL_ARRAYS[key], start, values, hasher)
            for store, place in following:  # their heads, up to the end of the chunk this range ends in
                need = -hasher.pos % item["chunk"]
                if need == 0 or hasher.pos >= size:
                    break
                head = _values(store, key, place, values.dtype)[: -(-need // values.dtype.itemsize)]
                hasher.update(memoryview(np.ascontiguousarray(head).data).cast("B")[:need])
            out["digests"][key] = hasher.finish(size)
    except (OSError, SFTPackError) as exc:
        out["error"] = str(exc)
    return out


def _values(shard: Store, key: str, place: dict[str, Any], tokens: np.dtype) -> np.ndarray:
    """What a shard contributes to array `key`: its values, offsets made global (lazily:
    a memory map, shifted piece by piece by `_write_at`); nothing for missing arrays."""
    values = getattr(shard, key)
    if values is None:  # a shard without documents has no first-in-stream arrays
        return np.zeros(0, tokens if key.endswith("tokens") else np.int64 if key in _TOKENS_OF else np.uint8)
    if key in _TOKENS_OF:
        return _Shifted(values[1:], place[f"base_{key}"])  # type: ignore[return-value]
    return values


class _Shifted:
    """Offsets seen with a base added, sliced without reading (a view over the memory map)."""

    def __init__(self, values: np.ndarray, base: int) -> None:
        self.values, self.base, self.dtype = values, base, values.dtype

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, sl: slice) -> np.ndarray:
        return np.asarray(self.values[sl]) + self.base


def _write_at(path: Path, start: int, values: np.ndarray, hasher: ChunkHasher) -> None:
    """Write `values` into the file at byte `start`, in pieces, each also fed to `hasher`."""
    step = max(1, COPY_BYTES // values.dtype.itemsize)
    fd = os.open(path, os.O_WRONLY)
    try:
        at = start
        for lo in range(0, len(values), step):
            view = np.ascontiguousarray(values[lo : lo + step]).data.cast("B")
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], at + done)
            hasher.update(view)
            at += len(view)
        os.fsync(fd)
    finally:
        os.close(fd)


def shard_error(result: dict[str, Any], shard: dict[str, Any], reader: RecordReader) -> SFTPackError:
    """The failed shard's error as the local build raises it: lines counted from the file's start."""
    path = reader.paths[shard["file"]]
    if result["error"] == "InputError":
        line = None if result["line"] < 0 else result["line"]
        if line is not None and shard["start"] > 0:
            line += _newlines(path, shard["start"])
        return InputError(path, line, result["message"], result["unit"])
    kind = getattr(errors, result["error"], SFTPackError)
    return (
        kind(result["message"])
        if isinstance(kind, type) and issubclass(kind, SFTPackError)
        else SFTPackError(result["message"])
    )


def _newlines(path: InputFile, end: int) -> int:
    """Lines before byte `end` (only on an error: the one read of a file's head on the driver)."""
    count, left = 0, end
    with _open(path, buffered=False) as f:
        while left > 0:
            chunk = f.read(min(left, 1 << 22))
            if not chunk:
                break
            count += chunk.count(b"\n")
            left -= len(chunk)
    return count
