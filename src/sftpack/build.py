"""The build pipeline: records -> rendered documents -> tokens + mask -> store.

Streaming and bounded: records are read and rendered in a background thread, batch by
batch, while the tokenizer encodes the previous batch on all cores (quicktok releases the
GIL); each batch is appended to the store as it is done, in file order. The store holds
documents only: rows are a plan over it (`sftpack.view`), so `seq_length`, packing and
shuffling never enter the store or its fingerprint.
"""

from __future__ import annotations

import collections
import functools
import gc
import json
import multiprocessing
import os
import queue
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import xxhash

from . import __version__
from .config import BuildOptions, resolve_seed
from .errors import ConfigError, InputError, SFTPackError, StoreError, error_value
from .plans import PlanStats
from .records import Inputs, Record, RecordReader, _format_of, expand_inputs, fingerprint_inputs
from .store import (
    MANIFEST,
    VERSION,
    LockUnavailable,
    Store,
    StoreWriter,
    clean_stale,
    open_store,
    prepare_target,
    record_defaults,
    sweep,
    target_lock,
    token_dtype,
)
from .templates import ChatTemplate, Planned, Rendered, Schema, Template, make_template
from .tokenize import EncodedBatch, encode_documents
from .tokenizers import AcceleratedTokenizer, QuicktokTokenizer, Tokenizer, load_tokenizer

BATCH_CHARS = 4 << 20  # rendered characters per tokenizer call
SAMPLE_DOCS = 256  # documents on which quicktok must match a HF tokenizer before serving it


@dataclass
class BuildSummary:
    """What a build did, and the rows its recorded plan makes; `reused` is True when an
    up-to-date store was found (nothing was tokenized)."""

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
    packing: str = "concat"
    plan: PlanStats | None = None
    pad: bool = True
    special_tokens: str = "parse"

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / self.seconds if self.seconds > 0 else float("inf")

    def lines(self) -> list[str]:
        head = "reused up-to-date store" if self.reused else "built store"
        out = [
            f"{head}: {self.path}",
            f"  documents:        {self.documents:,}",
            f"  tokens:           {self.tokens:,}",
            f"  sequences:        {self.sequences:,} ({self.packing})",
        ]
        if self.packing == "concat":
            out.append(f"  dropped at tail:  {self.dropped_tokens:,} tokens")
        elif self.plan is not None:
            p = self.plan
            fill = "padding tokens" if self.pad else "empty slots, rows served unpadded"
            out += [
                f"  efficiency:       {p.efficiency:.2%} ({p.padding_tokens:,} {fill})",
                f"  documents split / truncated / dropped: {p.documents_split:,} / {p.documents_truncated:,}"
                f" / {p.documents_dropped:,}",
                f"  tokens lost:      {p.tokens_lost:,}",
            ]
        out.append(f"  supervised:       {self.supervised_tokens:,} label tokens")
        out += [f"  {w}" for w in self.warnings()]
        out.append(f"  tokenizer:        {self.tokenizer}")
        if self.seed is not None:
            out.append(f"  shuffle seed:     {self.seed}")
        if not self.reused:
            out.append(f"  throughput:       {self.mb_per_s:.3g} MB/s of input ({self.seconds:.2f} s)")
        return out

    def warnings(self) -> list[str]:
        out = []
        if self.rows_without_supervision:
            out.append(f"WARNING: {self.rows_without_supervision:,} rows have no supervised token")
        if self.special_token_documents:
            out.append(
                f"WARNING: {self.special_token_documents:,} documents hold special-token strings in their text; "
                + (
                    "they were parsed as special tokens (an injection risk; --special-tokens text keeps them as text)"
                    if self.special_tokens == "parse"
                    else "they were encoded as plain text"
                )
            )
        if self.packing != "concat" and self.plan is not None and self.plan.tokens_lost:
            out.append(
                f"WARNING: the plan loses {self.plan.tokens_lost:,} tokens "
                f"({self.plan.documents_truncated:,} truncated, {self.plan.documents_dropped:,} dropped "
                "documents); overflow='split' keeps them"
            )
        return out


def fingerprint(reader: RecordReader, tok: Tokenizer, template: Template, schema: Schema, opts: BuildOptions) -> str:
    """Hash of what decides the store's bytes: input bytes, tokenizer, template, schema,
    the store options, the format version. Not paths, mtimes, worker counts, nor any plan
    or view option (those are chosen when the store is opened)."""
    parts = {
        "format_version": VERSION,
        "inputs": fingerprint_inputs(reader.paths, reader.stamps),
        "tokenizer": tok.fingerprint(),
        "template": template.fingerprint(),
        "schema": schema.fingerprint(),
        "options": opts.group("store"),
    }
    return xxhash.xxh3_128_hexdigest(json.dumps(parts, sort_keys=True).encode())


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
    fingerprint matches; then plan it as `options` say. `workers` (0: all cores) never
    changes the result. Plan and view options are recorded as the store's defaults."""
    if (out is None) == (cache_dir is None):
        raise ConfigError("give exactly one of out= and cache_dir=")
    started = time.perf_counter()
    options.validate()
    options = resolve_seed(options)
    if out is not None:
        out = prepare_target(out)  # refused before any work: only an empty dir or our own store is replaced
    paths = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer, threads=workers)
    schema, template = schema_and_template(options, tok)
    reader = RecordReader(paths)  # records each file's size and mtime: the fingerprint and the read must agree
    fp = fingerprint(reader, tok, template, schema, options)
    if out is None:
        sweep(Path(cache_dir), keep=_staging(Path(cache_dir) / fp, fp, options))  # type: ignore[arg-type]
        out = prepare_target(Path(cache_dir) / fp)  # type: ignore[arg-type]
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with target_lock(out, on_wait=lambda: _waiting(out)):
            clean_stale(out, keep=_staging(out, fp, options))
            store = None if force else _up_to_date(out, fp)
            if store is not None:
                summary = summarize(store, options, 0.0, reused=True)  # a plan that fails changes nothing
                if cache_dir is None and _recorded(store.manifest) != _recorded_of(options):
                    # the same tokens, opened by default with this build's plan from now on: no re-tokenizing
                    record_defaults(out, **_recorded_of(options))
            else:
                summary = _write_store(reader, out, fp, tok, schema, template, options, progress, tokenizer, workers)
                for message in _unrendered(reader, schema, template):
                    warnings.warn(message, stacklevel=2)
    except LockUnavailable as exc:
        # a read-only cache or store: an up-to-date store there is still served, as built
        store = None if force else _up_to_date(out, fp)
        if store is None:
            raise StoreError(
                f"{exc}; the store there is missing or out of date and the directory cannot be "
                "written: build it somewhere writable"
            ) from None
        summary = summarize(store, options, 0.0, reused=True)
    summary.seconds = time.perf_counter() - started
    if not summary.reused:
        summary.tokenizer = tok.summary or tok.name
        if summary.special_token_documents:
            warnings.warn(
                f"{summary.special_token_documents} documents contain special-token strings in their text; they "
                + (
                    "were parsed as special tokens (the reference behaviour, an injection risk)"
                    if options.special_tokens == "parse"
                    else "were encoded as plain text"
                ),
                stacklevel=2,
            )
    return summary


def schema_and_template(options: BuildOptions, tok: Tokenizer) -> tuple[Schema, Template]:
    """The schema and template `options` name, for `tok` (every engine's workers make them so)."""
    schema = Schema(options.schema, options.fields)
    template = make_template(
        options.template,
        chat_template=tok.chat_template,
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
        special_tokens=list(tok.special_tokens),
        last_turn_only=options.last_turn_only,
        reasoning=options.reasoning,
        template_args=options.template_args,
    )
    return schema, template


def _staging(out: Path, fp: str, options: BuildOptions) -> Path | None:
    """The shards a Ray build of `fp` may reuse (checked one by one before reuse)."""
    if options.engine != "ray":
        return None
    from .distributed import staging_dir

    return staging_dir(out, fp)


def _up_to_date(out: Path, fp: str) -> Store | None:
    """The store at `out` when it is complete, undamaged (sizes checked) and of fingerprint `fp`."""
    if not (out / MANIFEST).is_file():
        return None
    try:
        store = open_store(out)
    except SFTPackError:
        return None  # damaged: rebuilt, not reused
    return store if store.fingerprint == fp else None


def _recorded_of(options: BuildOptions) -> dict[str, Any]:
    return {"plan": options.group("plan"), "view": options.group("view")}


def _recorded(manifest: dict[str, Any]) -> dict[str, Any]:
    return {"plan": manifest["plan"], "view": manifest["view"]}


def _waiting(out: Path) -> None:
    print(f"sftpack: waiting for another build of {out} to finish", file=sys.stderr, flush=True)


def summarize(store: Store, options: BuildOptions, seconds: float, reused: bool) -> BuildSummary:
    """The summary of `store` planned as `options` say (one pass over the rows' labels)."""
    from .view import View

    view = View(store, options, count_supervised=True)
    supervised, empty = view.supervision()
    if supervised == 0:
        raise ConfigError(
            f"{store.path}: no label of the planned rows is supervised (every label is masked); check "
            "train_on_prompt and the template"
        )
    c, stats = store.manifest["counts"], view.plan.stats
    return BuildSummary(
        path=store.path,
        documents=c["documents"],
        tokens=stats.tokens_in,
        sequences=len(view),
        dropped_tokens=stats.tokens_lost,
        supervised_tokens=supervised,
        rows_without_supervision=empty,
        special_token_documents=c["special_token_documents"],
        input_bytes=c["input_bytes"],
        seconds=seconds,
        reused=reused,
        tokenizer=store.manifest["tokenizer"]["name"],
        seed=options.seed if options.shuffle else None,
        packing=options.packing,
        plan=stats,
        pad=view.pad,
        special_tokens=options.special_tokens,
    )


def _write_store(
    reader: RecordReader,
    out: Path,
    fp: str,
    tok: Tokenizer,
    schema: Schema,
    template: Template,
    options: BuildOptions,
    progress: bool | None,
    tokenizer: Any = None,
    workers: int = 0,
) -> BuildSummary:
    """Write the store, and summarize it as `options` plan it before it is published: a
    plan that cannot be made leaves the previous store (or nothing) in place. The engine
    fills the writer; `tokenizer` (the caller's form of it) is what Ray workers load."""
    checked: list[BuildSummary] = []
    with StoreWriter(out, token_dtype(tok.vocab_size)) as writer:
        if options.engine == "ray":
            from .distributed import encode_on_ray  # only a Ray build imports ray

            special_docs = encode_on_ray(reader, out, fp, tok, tokenizer, schema, options, writer, progress)
        else:
            bar = _progress_bar(reader.total_bytes, progress)
            try:
                procs = _processes(reader, tok, workers)
                if procs > 1:
                    done = None if bar is None else bar.update
                    special_docs = _encode_forked(reader, tok, schema, template, options, writer, procs, done)
                else:
                    on_batch = None if bar is None else lambda: bar.update(reader.bytes_read - bar.n)
                    special_docs = _encode_all(reader, tok, schema, template, options, writer, on_batch=on_batch)
            finally:
                if bar is not None:
                    bar.close()
        if writer.n_supervised == 0:
            raise ConfigError(
                "no token of the dataset is supervised (every label is masked); check train_on_prompt and the template"
            )

        def check(tmp: Path) -> None:  # the plan of the finished store, before it is published
            try:
                checked.append(summarize(open_store(tmp), options, 0.0, reused=False))
            except ConfigError as exc:  # named by where the user asked for it, not the temporary directory
                raise ConfigError(str(exc).replace(str(tmp), str(out))) from None

        writer.commit(manifest(fp, tok, options, writer, special_docs, reader.total_bytes), check=check)
    checked[0].path = out
    return checked[0]


def _unrendered(reader: RecordReader, schema: Schema, template: Template) -> list[str]:
    """Warnings for what the data holds and the chat template does not render (so it is not
    trained), from the first records: any tool call, or every turn's reasoning."""
    if not isinstance(template, ChatTemplate):
        return []
    counts = [0, 0, 0, 0]
    kind = None
    try:
        for n, record in enumerate(RecordReader(reader.paths)):
            if n == SAMPLE_DOCS or counts[0] + counts[2] >= 64:
                break
            kind = kind or schema.detect(record)
            counts = [
                a + b
                for a, b in zip(counts, template.unrendered(schema.turns(record, kind), 64 - counts[0] - counts[2]))
            ]
    except SFTPackError:
        pass  # (the build read them: a file changed since)
    calls, dropped_calls, reasoning, dropped_reasoning = counts
    out = []
    if dropped_calls:
        out.append(
            f"the chat template does not render the tool calls of {dropped_calls} of {calls} assistant messages "
            "that have them (in the first records): they are not in the store, nor trained; use a template that "
            "renders tool calls (Llama 3.1's, Qwen's, Mistral's, ...; the bundled Llama-3 'chat' renders none)"
        )
    if reasoning and dropped_reasoning == reasoning and template.reasoning == "train":
        out.append(
            f"the chat template renders the reasoning of none of the {reasoning} assistant messages that have it "
            "(in the first records): it is not in the store, nor trained; use a template that renders reasoning "
            "(Qwen3's, DeepSeek-R1's, SmolLM3's, ...)"
        )
    return out


def manifest(
    fp: str, tok: Tokenizer, options: BuildOptions, writer: StoreWriter, special_docs: int, input_bytes: int
) -> dict[str, Any]:
    """The manifest of what `writer` holds (a store, or a distributed build's shard)."""
    return {
        "fingerprint": fp,
        "created_by": f"sftpack {__version__}",
        "options": options.group("store"),
        "plan": options.group("plan"),
        "view": options.group("view"),
        "tokenizer": {
            "name": tok.name,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
            "adds_bos": tok.adds_bos,
        },
        "counts": {
            "documents": writer.n_docs,
            "tokens": writer.n_tokens,
            "supervised_tokens": writer.n_supervised,
            "special_token_documents": special_docs,
            "input_bytes": input_bytes,
        },
    }


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


def _batches(
    reader: Iterable[Record],
    schema: Schema,
    template: Template,
    specials: re.Pattern[str] | None,
    kind: str | None = None,
    planned: bool = False,
) -> Iterator[tuple[list[Record], list[Rendered] | Planned, bool]]:
    """Batches of (records, rendered documents, whether any holds a special-token string).
    `kind`: the schema kind (default: detected on the first record). With `planned`, a batch
    of plain conversations whose shapes have plans comes unrendered (`Planned`; its flag
    is not computed), and is rendered as soon as a record of it needs rendering."""
    records: list[Record] = []
    docs: list[Rendered] = []
    plain = template.plain if planned and isinstance(template, ChatTemplate) else None
    role_key, text_key = schema.fields["role"], schema.fields["content"]
    fast = Planned()
    size = 0
    has_specials = False
    for record in reader:
        if kind is None:
            kind = schema.detect(record)
        found = None
        if plain is not None and not docs:
            messages = schema.plain(record, kind)
            if messages is not None:
                found = plain(messages, role_key, text_key)
        if found is not None:
            plan, values = found
            fast.plans.append(plan)
            fast.values.append(values)
            size += plan.chars + sum(map(len, values[: plan.cut]))
        else:
            if fast:  # the batch is rendered from here on
                docs = fast.rendered()
                fast = Planned()
                has_specials = specials is not None and any(specials.search(d.text) for d in docs)
            doc = _render(record, schema, kind, template)
            docs.append(doc)
            size += len(doc.text)
            if not has_specials and specials is not None and specials.search(doc.text):
                has_specials = True
        records.append(record)
        if size >= BATCH_CHARS:
            yield records, fast if fast else docs, has_specials
            records, docs, fast, size, has_specials = [], [], Planned(), 0, False
    if records:
        yield records, fast if fast else docs, has_specials


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


def _encode_all(
    stream: Iterable[Record],
    tok: Tokenizer,
    schema: Schema,
    template: Template,
    opts: BuildOptions,
    writer: _Sink,
    *,
    kind: str | None = None,
    on_batch: Callable[[], object] | None = None,
    sample: bool = True,
) -> int:
    """Read and render in one thread, encode in this one (the tokenizer's threads do the
    work), check ids and append to the store in a third, in order, at most two batches behind.
    Every engine's stage: the local build runs it on all records, a Ray task on one shard's.
    `sample`: check quicktok against the HF tokenizer it serves on the first batch.
    Returns how many documents hold special-token strings in their user content."""
    special_docs = 0
    first_batch = sample
    pending: collections.deque[Future[None]] = collections.deque()

    def store(batch: EncodedBatch, first: EncodedBatch | None, records: list[Record]) -> None:
        _check_ids(batch.tokens, batch.unit_lengths, records, tok.vocab_size)
        writer.append(batch.tokens, batch.mask, batch.unit_lengths)
        if first is not None:
            _check_ids(first.tokens, first.unit_lengths, records, tok.vocab_size)
            writer.append_first(first.tokens, first.mask, first.unit_lengths)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sftpack-write") as write:
        try:
            # plain conversations come unrendered where the encoder takes them so (per-piece-exact tokenizers)
            batches = _batches(stream, schema, template, tok.special_pattern, kind, planned=tok.per_piece_exact)
            for records, docs, has_specials in _prefetch(batches):
                try:
                    if first_batch and isinstance(tok, AcceleratedTokenizer):
                        head = docs.rendered(SAMPLE_DOCS) if isinstance(docs, Planned) else docs[:SAMPLE_DOCS]
                        tok.check_sample([d.text for d in head])
                    encode = functools.partial(
                        encode_documents,
                        tok,
                        train_on_prompt=opts.train_on_prompt,
                        parse_specials=opts.special_tokens == "parse",
                    )
                    batch = encode(docs, has_specials=has_specials)
                    # any document may open a plan's stream: keep each one's first-in-stream encoding
                    # where the tokenizer's differs (SentencePiece), so that no plan re-tokenizes
                    first = (
                        None
                        if tok.per_piece_exact
                        else _concat_batches(
                            [encode([doc], first_in_stream=True) for doc in cast(list[Rendered], docs)]
                        )
                    )
                except Exception:
                    # raises the located error when that is the cause
                    _check_encodable(records, docs.rendered() if isinstance(docs, Planned) else docs)
                    raise
                first_batch = False
                special_docs += batch.special_docs
                pending.append(write.submit(store, batch, first, records))
                while len(pending) > 2:
                    pending.popleft().result()
                if on_batch is not None:
                    on_batch()
            while pending:
                pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
    return special_docs


PROCESS_BYTES = 16 << 20  # inputs smaller than this are built in this process (forking costs more)
# the bytes a forked process reads at a time, at least and at most: what the building process
# holds is (processes + 1) ranges' arrays, flat in the input's size
PROCESS_RANGE = 1 << 20, 4 << 20
_FORKED: tuple[Any, ...] | None = None  # in a forked worker: what its build hands it (`_start_worker`)


class _Sink(Protocol):
    def append(self, tokens: np.ndarray, mask: np.ndarray, unit_lengths: np.ndarray) -> None: ...

    def append_first(self, tokens: np.ndarray, mask: np.ndarray, unit_lengths: np.ndarray) -> None: ...


def _processes(reader: RecordReader, tok: Tokenizer, workers: int) -> int:
    """How many processes read, render and encode: one per core (or `workers`) where that
    pays and is safe (Linux's fork, quicktok, local plain JSONL of some size), else 1.
    Rendering is Python (one core per process); quicktok is fork-safe."""
    if sys.platform != "linux" or _engine(tok) is None or reader.total_bytes < PROCESS_BYTES:
        return 1
    if not all(isinstance(p, Path) and _format_of(p) == ".jsonl" for p in reader.paths):
        return 1
    return workers if workers > 0 else len(os.sched_getaffinity(0))


def _engine(tok: Tokenizer) -> QuicktokTokenizer | None:
    """The quicktok engine that encodes for `tok` (itself, or the one serving a HF tokenizer)."""
    if type(tok) is QuicktokTokenizer:
        return tok
    if type(tok) is AcceleratedTokenizer and type(tok.fast) is QuicktokTokenizer:
        return tok.fast
    return None


def _sampled(reader: RecordReader, tok: Tokenizer, schema: Schema, template: Template, kind: str) -> bool:
    """Whether quicktok serves `tok` after the check on the first documents (as the first
    batch of a one-process build checks them): a HF tokenizer it differs from is used alone."""
    if not isinstance(tok, AcceleratedTokenizer):
        return True
    docs = []
    for record in RecordReader(reader.paths):
        docs.append(_render(record, schema, kind, template).text)
        if len(docs) == SAMPLE_DOCS:
            break
    return tok.check_sample(docs)


def _encode_forked(
    reader: RecordReader,
    tok: Tokenizer,
    schema: Schema,
    template: Template,
    opts: BuildOptions,
    writer: StoreWriter,
    procs: int,
    done: Callable[[int], object] | None,
) -> int:
    """`_encode_all` over line-aligned byte ranges of the inputs in `procs` forked processes,
    appended to `writer` in input order (the same store as one process writes), at most
    one range per process ahead. Errors are raised as one process raises them."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from .distributed import first_kind, plan_shards, shard_error

    least, most = PROCESS_RANGE
    shards = plan_shards(reader, max(least, min(most, reader.total_bytes // (4 * procs) + 1)))
    kind = first_kind(reader, schema)
    if not _sampled(reader, tok, schema, template, kind):  # the HF tokenizer encodes: in this process
        return _encode_all(reader, tok, schema, template, opts, writer, sample=False)
    # handed to the workers as they are forked (not pickled, not shared with another build)
    state = (reader, tok, schema, template, opts, kind, token_dtype(tok.vocab_size))
    special_docs = documents = 0
    pending: collections.deque[tuple[dict[str, Any], Future[dict[str, Any]]]] = collections.deque()
    context = multiprocessing.get_context("fork")
    try:
        with ProcessPoolExecutor(procs, context, _start_worker, (state, os.getpid())) as pool:
            todo = iter(shards)
            # the workers fork at the first submit; with this process's objects frozen, their
            # collections leave them alone (else they write to, and so copy, every page of a
            # large process: a notebook holding a dataset)
            gc.freeze()
            try:
                for shard in todo:
                    pending.append((shard, pool.submit(_encode_shard, shard)))
                    if len(pending) > procs:
                        break
            finally:
                gc.unfreeze()
            while pending:
                shard, future = pending.popleft()
                result = future.result()
                for shard_next in todo:
                    pending.append((shard_next, pool.submit(_encode_shard, shard_next)))
                    break
                if "error" in result:
                    raise shard_error(result["error"], shard, reader)
                for batch in result["batches"]:
                    writer.append(*batch)
                for batch in result["first"]:
                    writer.append_first(*batch)
                documents = (documents if shard["start"] else 0) + result["documents"]
                if shard["start"] + shard["length"] == shard["size"] and documents == 0:
                    raise InputError(
                        reader.paths[shard["file"]], None, "the file holds no documents (it is empty or blank)"
                    )
                special_docs += result["special"]
                if done is not None:
                    done(shard["length"])
    except BrokenProcessPool:  # from a result, or from a submit after a worker died
        raise SFTPackError(
            "a build process died (out of memory?); rebuild with fewer workers (--workers 1: one process)"
        ) from None
    finally:
        for _, future in pending:
            future.cancel()
    return special_docs


def _start_worker(state: tuple[Any, ...], parent: int) -> None:
    """A forked worker's start: its build's state; signals left to the building process
    (Ctrl-C is its to handle, SIGTERM ends a worker at once, as the pool stops them), and
    death with it (Linux's parent-death signal): a killed build leaves no worker holding
    its lock and temporary files."""
    global _FORKED
    _FORKED = state
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the building process died before that took effect
        os._exit(1)


class _Kept:
    """A forked worker's sink: the batches, sent back to the building process."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype
        self.batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.first: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.documents = 0

    def append(self, tokens: np.ndarray, mask: np.ndarray, unit_lengths: np.ndarray) -> None:
        self.batches.append((tokens.astype(self.dtype), mask, unit_lengths))
        self.documents += len(unit_lengths)

    def append_first(self, tokens: np.ndarray, mask: np.ndarray, unit_lengths: np.ndarray) -> None:
        self.first.append((tokens.astype(self.dtype), mask, unit_lengths))


def _encode_shard(shard: dict[str, Any]) -> dict[str, Any]:
    """In a forked worker: one byte range's batches, or the error sftpack raised, as a value."""
    if _FORKED is None:
        raise RuntimeError("sftpack's build workers must be forked by the building process")
    reader, tok, schema, template, opts, kind, dtype = _FORKED
    cast(QuicktokTokenizer, _engine(tok)).threads = 1  # this process's copy: one core each
    kept = _Kept(dtype)
    try:
        records = reader.read_range(shard["file"], shard["start"], shard["length"])
        special = _encode_all(records, tok, schema, template, opts, kept, kind=kind, sample=False)
    except SFTPackError as exc:
        return {"error": error_value(exc)}
    return {"batches": kept.batches, "first": kept.first, "special": special, "documents": kept.documents}


def _concat_batches(batches: list[EncodedBatch]) -> EncodedBatch:
    return replace(
        batches[0],
        tokens=np.concatenate([b.tokens for b in batches]),
        mask=np.concatenate([b.mask for b in batches]),
        unit_lengths=np.concatenate([b.unit_lengths for b in batches]),
    )


def _check_ids(tokens: np.ndarray, unit_lengths: np.ndarray, records: list[Record], vocab_size: int) -> None:
    if len(tokens) and (int(tokens.max()) >= vocab_size or int(tokens.min()) < 0):
        bad = int(np.flatnonzero((tokens >= vocab_size) | (tokens < 0))[0])
        doc = int(np.searchsorted(np.cumsum(unit_lengths), bad, side="right"))
        raise records[doc].error(f"token id {int(tokens[bad])} is outside the vocabulary (size {vocab_size})")


def _progress_bar(total: int, progress: bool | None) -> Any:
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="sftpack build", file=sys.stderr)
