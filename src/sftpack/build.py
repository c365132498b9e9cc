"""The build pipeline: records -> rendered documents -> tokens + mask -> store.

Streaming and bounded: records are read and rendered in a background thread, batch by
batch, while the tokenizer encodes the previous batch on all cores (quicktok releases the
GIL); each batch is appended to the store as it is done. Shuffling permutes whole
document units after tokenizing in file order, reading them back from the staged arrays
in bounded chunks, so it never needs all documents in memory.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import re
import secrets
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from . import __version__
from .errors import ConfigError, SFTPackError
from .pack import dropped_tail, num_rows
from .records import Inputs, Record, RecordReader, expand_inputs, fingerprint_inputs
from .store import (MANIFEST, NPY_HEADER, VERSION, StoreWriter, clean_stale, open_store, prepare_target,
                    target_lock, token_dtype)
from .templates import Rendered, Schema, Template, make_template
from .tokenize import EncodedBatch, encode_documents
from .tokenizers import AcceleratedTokenizer, Tokenizer, load_tokenizer

BATCH_CHARS = 4 << 20  # rendered characters per tokenizer call
GATHER_TOKENS = 1 << 22  # tokens per chunk when writing shuffled units
SAMPLE_DOCS = 256  # documents on which quicktok must match a HF tokenizer before serving it


@dataclass(frozen=True)
class BuildOptions:
    """Everything that decides a store's bytes (besides the inputs and the tokenizer).

    seq_length: tokens per row. shuffle/seed: permute documents before packing (seed None:
    a fresh seed, recorded in the manifest). schema/fields: how records are read.
    template: "alpaca", "chat" or a template string/file. train_on_prompt: False masks all
    but response tokens. last_turn_only: train only the last assistant turn.
    special_tokens: "parse" (the reference) or "text" for special-token strings found in
    user content. boundaries: items carry position_ids and seq_lens. mask_cross_document:
    the label that crosses into the next document is -100.
    """

    seq_length: int
    shuffle: bool = False
    seed: int | None = None
    schema: str = "auto"
    fields: Mapping[str, str] = field(default_factory=dict)
    template: str = "alpaca"
    train_on_prompt: bool = True
    last_turn_only: bool = False
    special_tokens: str = "parse"
    boundaries: bool = False
    mask_cross_document: bool = False

    def validate(self) -> None:
        if isinstance(self.seq_length, bool) or not isinstance(self.seq_length, (int, np.integer)):
            raise ConfigError(f"seq_length must be an integer, got {self.seq_length!r}")
        if self.seq_length < 1:
            raise ConfigError(f"seq_length must be >= 1, got {self.seq_length}")
        if self.special_tokens not in ("parse", "text"):
            raise ConfigError(f"special_tokens={self.special_tokens!r} is not one of 'parse', 'text'")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))):
            raise ConfigError(f"seed must be an integer or None, got {self.seed!r}")
        if self.seed is not None and self.seed < 0:  # numpy's generators take non-negative seeds only
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed}")
        Schema(self.schema, self.fields)


@dataclass
class BuildSummary:
    """What a build did; `reused` is True when an up-to-date store was found."""

    path: Path
    documents: int
    tokens: int
    sequences: int
    dropped_tokens: int
    supervised_tokens: int
    rows_without_supervision: int
    special_token_documents: int
    input_bytes: int
    seconds: float
    reused: bool
    tokenizer: str
    seed: int | None

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / self.seconds if self.seconds > 0 else float("inf")

    def lines(self) -> list[str]:
        head = "reused up-to-date store" if self.reused else "built store"
        out = [
            f"{head}: {self.path}",
            f"  documents:        {self.documents:,}",
            f"  tokens:           {self.tokens:,}",
            f"  sequences:        {self.sequences:,}",
            f"  dropped at tail:  {self.dropped_tokens:,} tokens",
            f"  supervised:       {self.supervised_tokens:,} label tokens",
        ]
        if self.rows_without_supervision:
            out.append(f"  WARNING: {self.rows_without_supervision:,} rows have no supervised token")
        if self.special_token_documents:
            out.append(f"  WARNING: {self.special_token_documents:,} documents hold special-token strings in their text")
        out.append(f"  tokenizer:        {self.tokenizer}")
        if self.seed is not None:
            out.append(f"  shuffle seed:     {self.seed}")
        if not self.reused:
            out.append(f"  throughput:       {self.mb_per_s:.3g} MB/s of input ({self.seconds:.2f} s)")
        return out


def fingerprint(reader: RecordReader, tok: Tokenizer, template: Template, schema: Schema, opts: BuildOptions) -> str:
    """Hash of everything that decides the store's bytes (not paths, mtimes or worker counts)."""
    parts = {
        "format_version": VERSION,
        "inputs": fingerprint_inputs(reader.paths, reader.stamps),
        "tokenizer": tok.fingerprint(),
        "template": template.fingerprint(),
        "schema": schema.fingerprint(),
        "options": _options_dict(opts),
    }
    return xxhash.xxh3_128_hexdigest(json.dumps(parts, sort_keys=True).encode())


def _options_dict(opts: BuildOptions) -> dict[str, Any]:
    d = asdict(opts)
    d["fields"] = dict(sorted(opts.fields.items()))
    d["seed"] = None if opts.seed is None else int(opts.seed)
    d["seq_length"] = int(opts.seq_length)
    return d


def build(
    inputs: Inputs,
    out: str | os.PathLike | None,
    options: BuildOptions,
    tokenizer: Any = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    workers: int = 0,
    progress: bool | None = None,
    force: bool = False,
) -> BuildSummary:
    """Build the store at `out` (or at `cache_dir/<fingerprint>`), or reuse it when its
    fingerprint matches. `workers` (0: all cores) never changes the result."""
    if (out is None) == (cache_dir is None):
        raise ConfigError("give exactly one of out= and cache_dir=")
    started = time.perf_counter()
    options.validate()
    if options.shuffle and options.seed is None:
        options = replace(options, seed=secrets.randbits(63))
    elif not options.shuffle and options.seed is not None:
        options = replace(options, seed=None)  # the seed means nothing unshuffled: keep caches shared
    if out is not None:
        out = prepare_target(out)  # refused before any work: only an empty dir or our own store is replaced
    paths = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer, threads=workers)
    schema = Schema(options.schema, options.fields)
    template = make_template(
        options.template,
        chat_template=tok.chat_template,
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
        special_tokens=list(tok.special_tokens),
        last_turn_only=options.last_turn_only,
    )
    reader = RecordReader(paths)  # records each file's size and mtime: the fingerprint and the read must agree
    fp = fingerprint(reader, tok, template, schema, options)
    if out is None:
        out = prepare_target(Path(cache_dir) / fp)  # type: ignore[arg-type]
    out.parent.mkdir(parents=True, exist_ok=True)
    with target_lock(out, on_wait=lambda: _waiting(out)):
        clean_stale(out)
        if not force and (out / MANIFEST).is_file():
            try:
                store = open_store(out)  # sizes checked: a damaged store is rebuilt, not reused
            except SFTPackError:
                store = None
            if store is not None and store.manifest.get("fingerprint") == fp:
                return _summary(out, store.manifest, time.perf_counter() - started, reused=True)
        return _write_store(reader, out, fp, tok, schema, template, options, progress, started)


def _waiting(out: Path) -> None:
    print(f"sftpack: waiting for another build of {out} to finish", file=sys.stderr, flush=True)


def _write_store(reader: RecordReader, out: Path, fp: str, tok: Tokenizer, schema: Schema, template: Template,
                 options: BuildOptions, progress: bool | None, started: float) -> BuildSummary:
    with StoreWriter(out, token_dtype(tok.vocab_size)) as writer:
        special_docs = _encode_all(reader, tok, schema, template, options, writer, progress)
        if options.shuffle:
            _write_shuffled(writer, options.seed, tok, reader, schema, template, options)
        drop = 1 if tok.eos_id is not None else 0
        n_tokens = writer.n_tokens - drop
        rows, supervised, empty_rows = _supervision(writer, n_tokens, options.seq_length)
        if rows == 0:
            raise ConfigError(
                f"the dataset has {n_tokens} tokens, too few for one row of seq_length {options.seq_length} "
                "(a row needs seq_length + 1 tokens); lower seq_length or add documents"
            )
        if supervised == 0:
            raise ConfigError(
                "no token of the dataset is supervised (every label is masked); check train_on_prompt and the template"
            )
        manifest = {
            "fingerprint": fp,
            "created_by": f"sftpack {__version__}",
            "seq_length": int(options.seq_length),
            "options": _options_dict(options),
            "tokenizer": {
                "name": tok.name,
                "vocab_size": tok.vocab_size,
                "bos_id": tok.bos_id,
                "eos_id": tok.eos_id,
                "adds_bos": tok.adds_bos,
            },
            "counts": {
                "documents": writer.n_docs,
                "tokens": n_tokens,
                "sequences": rows,
                "dropped_tokens": dropped_tail(n_tokens, options.seq_length),
                "supervised_tokens": supervised,
                "rows_without_supervision": empty_rows,
                "special_token_documents": special_docs,
                "input_bytes": reader.total_bytes,
            },
        }
        writer.commit(manifest, drop_last_tokens=drop)
    if special_docs:
        warnings.warn(
            f"{special_docs} documents contain special-token strings in their text; they were "
            + ("parsed as special tokens (the reference behaviour, an injection risk)" if options.special_tokens == "parse"
               else "encoded as plain text"),
            stacklevel=3,
        )
    summary = _summary(out, manifest, time.perf_counter() - started, reused=False)
    summary.tokenizer = tok.summary or tok.name
    return summary


def _summary(path: Path, manifest: dict[str, Any], seconds: float, reused: bool) -> BuildSummary:
    c = manifest["counts"]
    return BuildSummary(
        path=path,
        documents=c["documents"],
        tokens=c["tokens"],
        sequences=c["sequences"],
        dropped_tokens=c["dropped_tokens"],
        supervised_tokens=c["supervised_tokens"],
        rows_without_supervision=c["rows_without_supervision"],
        special_token_documents=c["special_token_documents"],
        input_bytes=c["input_bytes"],
        seconds=seconds,
        reused=reused,
        tokenizer=manifest["tokenizer"]["name"],
        seed=manifest["options"]["seed"],
    )


def _render(record: Record, schema: Schema, kind: str, template: Template) -> Rendered:
    try:
        return template.render(schema.turns(record, kind))
    except ConfigError as exc:
        raise record.error(str(exc)) from None


def _check_encodable(records: list[Record], docs: list[Rendered]) -> None:
    """Name the record whose text is not valid Unicode (tokenizers reject lone surrogates)."""
    for record, doc in zip(records, docs):
        try:
            doc.text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise record.error(f"text cannot be encoded as UTF-8 ({exc.reason}: a lone surrogate?)") from None


def _batches(reader: RecordReader, schema: Schema, template: Template,
             specials: re.Pattern[str] | None) -> Iterator[tuple[list[Record], list[Rendered], bool]]:
    """Batches of (records, rendered documents, whether any holds a special-token string)."""
    records: list[Record] = []
    docs: list[Rendered] = []
    size = 0
    kind = None
    has_specials = False
    for record in reader:
        if kind is None:
            kind = schema.detect(record)
        doc = _render(record, schema, kind, template)
        records.append(record)
        docs.append(doc)
        size += len(doc.text)
        if not has_specials and specials is not None and specials.search(doc.text):
            has_specials = True
        if size >= BATCH_CHARS:
            yield records, docs, has_specials
            records, docs, size, has_specials = [], [], 0, False
    if docs:
        yield records, docs, has_specials


def _prefetch(it: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run `it` in a background thread, `depth` items ahead; exceptions re-raise here."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("done", None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            q.put(("error", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()


def _encode_all(reader: RecordReader, tok: Tokenizer, schema: Schema, template: Template, opts: BuildOptions,
                writer: StoreWriter, progress: bool | None) -> int:
    """Read and render in one thread, encode in this one (the tokenizer's threads do the
    work), check ids and append to the store in a third, in order, at most two batches behind.
    Returns how many documents hold special-token strings in their user content."""
    bar = _progress_bar(reader.total_bytes, progress)
    special_docs = 0
    first_batch = True
    pending: collections.deque[Future[None]] = collections.deque()

    def store(batch: EncodedBatch, records: list[Record]) -> None:
        _check_ids(batch.tokens, batch.unit_lengths, records, tok.vocab_size)
        writer.append(batch.tokens, batch.mask, batch.unit_lengths)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sftpack-write") as write:
        try:
            for records, docs, has_specials in _prefetch(_batches(reader, schema, template, tok.special_pattern)):
                try:
                    if first_batch and isinstance(tok, AcceleratedTokenizer):
                        tok.check_sample([d.text for d in docs[:SAMPLE_DOCS]])
                    batch = encode_documents(
                        tok,
                        docs,
                        train_on_prompt=opts.train_on_prompt,
                        parse_specials=opts.special_tokens == "parse",
                        first_in_stream=first_batch and not opts.shuffle,
                        has_specials=has_specials,
                    )
                except Exception:
                    _check_encodable(records, docs)  # raises the located error when that is the cause
                    raise
                first_batch = False
                special_docs += batch.special_docs
                pending.append(write.submit(store, batch, records))
                while len(pending) > 2:
                    pending.popleft().result()
                if bar is not None:
                    bar.update(reader.bytes_read - bar.n)
            while pending:
                pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
            if bar is not None:
                bar.close()
    return special_docs


def _check_ids(tokens: np.ndarray, unit_lengths: np.ndarray, records: list[Record], vocab_size: int) -> None:
    if len(tokens) and (int(tokens.max()) >= vocab_size or int(tokens.min()) < 0):
        bad = int(np.flatnonzero((tokens >= vocab_size) | (tokens < 0))[0])
        doc = int(np.searchsorted(np.cumsum(unit_lengths), bad, side="right"))
        raise records[doc].error(f"token id {int(tokens[bad])} is outside the vocabulary (size {vocab_size})")


def _write_shuffled(writer: StoreWriter, seed: int | None, tok: Tokenizer, reader: RecordReader, schema: Schema,
                    template: Template, opts: BuildOptions) -> None:
    staged = writer.stage()
    offsets = np.load(staged["doc_offsets"], allow_pickle=False)
    n_docs = len(offsets) - 1
    order = np.random.default_rng(seed).permutation(n_docs)
    lengths = np.diff(offsets)[order]
    if not tok.per_piece_exact and n_docs:
        # The stream's first document is encoded as at the start of the joined string.
        first = _first_unit(reader, schema, template, opts, tok, int(order[0]))
        writer.append(first.tokens, first.mask, first.unit_lengths)
        order, lengths = order[1:], lengths[1:]
    ends = np.cumsum(lengths)
    cut = 0
    with open(staged["tokens"], "rb") as token_file, open(staged["loss_mask"], "rb") as mask_file:
        while cut < len(order):
            base = ends[cut - 1] if cut else 0
            stop = max(cut + 1, int(np.searchsorted(ends, base + GATHER_TOKENS, side="right")))
            chunk, chunk_lengths = order[cut:stop], lengths[cut:stop]
            starts = offsets[chunk]
            writer.append(
                _read_units(token_file, writer.dtype, starts, chunk_lengths),
                _read_units(mask_file, np.dtype(np.uint8), starts, chunk_lengths),
                chunk_lengths,
            )
            cut = stop


def _read_units(f: Any, dtype: np.dtype, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Read the given token ranges of a staged .npy file into one array, with positional reads
    (a memory map would count every page it faults in, and its neighbours, in RSS)."""
    out = np.empty(int(lengths.sum()), dtype=dtype)
    view = memoryview(out).cast("B")
    size = dtype.itemsize
    fd = f.fileno()
    pos = 0
    for start, length in zip(starts.tolist(), lengths.tolist()):
        n = length * size
        if os.preadv(fd, [view[pos : pos + n]], NPY_HEADER + start * size) != n:
            raise SFTPackError(f"{f.name}: staged array is shorter than its offsets")
        pos += n
    return out


def _first_unit(reader: RecordReader, schema: Schema, template: Template, opts: BuildOptions, tok: Tokenizer,
                index: int) -> Any:
    kind = None
    for i, record in enumerate(RecordReader(reader.paths)):
        kind = kind or schema.detect(record)
        if i == index:
            doc = _render(record, schema, kind, template)
            return encode_documents(tok, [doc], train_on_prompt=opts.train_on_prompt,
                                    parse_specials=opts.special_tokens == "parse", first_in_stream=True)
    raise SFTPackError("input changed during the build")


def _supervision(writer: StoreWriter, n_tokens: int, seq_length: int) -> tuple[int, int, int]:
    """(rows, supervised label tokens in rows, rows whose labels are all masked)."""
    rows = num_rows(n_tokens, seq_length)
    supervised = empty = 0
    step = max(1, (1 << 22) // seq_length)
    path = writer.loss_mask_path()
    for r in range(0, rows, step):
        r_end = min(rows, r + step)
        # read, not mapped: every page of a map counts in RSS while it is mapped
        labels = np.fromfile(path, dtype=np.uint8, count=(r_end - r) * seq_length,
                             offset=NPY_HEADER + r * seq_length + 1).reshape(r_end - r, seq_length)
        per_row = labels.sum(axis=1, dtype=np.int64)
        supervised += int(per_row.sum())
        empty += int((per_row == 0).sum())
    return rows, supervised, empty


def _progress_bar(total: int, progress: bool | None) -> Any:
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="sftpack build", file=sys.stderr)
