"""Chunked file checksums (store format 3): equal to a plain reference computation, the
same whether one writer appends or many write disjoint ranges, and a flipped byte is found.
Also the Ray reduce's own steps (plan, preallocate, copy at offsets) without Ray."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sftpack.store
from sftpack.config import BuildOptions
from sftpack.distributed import copy_shard, reduce_plan, reduce_tasks
from sftpack.errors import StoreError
from sftpack.store import (
    ALL_ARRAYS,
    ARRAYS,
    MANIFEST,
    ChunkHasher,
    StoreWriter,
    checksum,
    open_store,
    read_manifest,
    verify_store,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


def reference(data: bytes, chunk: int) -> str:
    """The definition, spelled out: xxh3_128 over the xxh3_128 digests of the chunks."""
    digests = b"".join(xxhash.xxh3_128_digest(data[i : i + chunk]) for i in range(0, len(data), chunk))
    return xxhash.xxh3_128_hexdigest(digests)


@FAST
@given(chunk=st.integers(1, 40), extra=st.integers(-3, 3), chunks=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_checksum_of_a_file_equals_the_reference_around_chunk_boundaries(tmp_path_factory, chunk, extra, chunks, seed):
    size = max(0, chunks * chunk + extra)
    data = random.Random(seed).randbytes(size)
    path = tmp_path_factory.mktemp("c") / "f"
    path.write_bytes(data)
    assert checksum(path, chunk=chunk) == reference(data, chunk)


@FAST
@given(
    chunk=st.integers(1, 32),
    size=st.integers(0, 300),
    cuts=st.lists(st.integers(0, 300), max_size=6),
    pieces=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_ranges_hashed_apart_combine_to_the_reference_reading_only_straddling_chunks(
    tmp_path_factory, monkeypatch_module, chunk, size, cuts, pieces, seed
):
    """Writers of disjoint ranges each hash the chunks inside theirs (fed in pieces of any
    size); `checksum` reads exactly the other chunks (at most one per range boundary)."""
    data = random.Random(seed).randbytes(size)
    path = tmp_path_factory.mktemp("r") / "f"
    path.write_bytes(data)
    bounds = sorted({0, size, *(c for c in cuts if c < size)})
    known: dict[int, bytes] = {}
    for lo, hi in zip(bounds, bounds[1:]):
        hasher = ChunkHasher(lo, chunk)
        for at in range(lo, hi, pieces):
            hasher.update(data[at : min(hi, at + pieces)])
        first, run = hasher.finish(size)
        if run:
            known[first] = run
    read: list[int] = []
    real = sftpack.store._chunk_digest
    monkeypatch_module.setattr(sftpack.store, "_chunk_digest", lambda b: read.append(len(b)) or real(b))
    assert checksum(path, known, chunk) == reference(data, chunk)
    covered = sum(len(run) // 16 for run in known.values())
    assert len(read) == -(-size // chunk) - covered <= len(bounds) - 1


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as m:
        yield m


def _docs(rng: random.Random, n: int) -> list[np.ndarray]:
    return [np.array([rng.randrange(1000) for _ in range(rng.randint(1, 40))], np.uint16) for _ in range(n)]


def _append_all(writer: StoreWriter, docs: list[np.ndarray], first: bool = False) -> None:
    for doc in docs:
        writer.append(doc, (doc % 2).astype(np.uint8), np.array([len(doc)]))
        if first:
            writer.append_first(doc + 1, (doc % 3 == 0).astype(np.uint8), np.array([len(doc)]))


def _manifest(writer: StoreWriter) -> dict:
    """A manifest that passes the store's shape checks (what a build records, made up)."""
    options = BuildOptions(seq_length=16)
    counts = {"documents": writer.n_docs, "tokens": writer.n_tokens, "supervised_tokens": writer.n_supervised}
    return {
        "fingerprint": "f",
        **{section: options.group(section) for section in ("options", "plan", "view")},
        "options": options.group("store"),
        "tokenizer": {"name": "made-up", "vocab_size": 1001},
        "counts": {**counts, "special_token_documents": 0, "input_bytes": 0},
    }


def _written(root: Path) -> dict:
    return json.loads((root / MANIFEST).read_text())["files"]


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_writer_records_the_reference_checksum_and_verify_names_a_flipped_mid_chunk_byte(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(sftpack.store, "CHUNK", chunk)
    out = tmp_path / "s"
    with StoreWriter(out, np.uint16) as writer:
        _append_all(writer, _docs(random.Random(1), 80))
        writer.commit(_manifest(writer))
    for key, entry in _written(out).items():
        data = (out / entry["path"]).read_bytes()
        assert entry["xxh3_128_chunked"] == {"chunk": chunk, "digest": reference(data, chunk)}, key
    monkeypatch.setattr(sftpack.store, "CHUNK", 1 << 20)  # a reader takes the chunk from the manifest
    for name in ARRAYS.values():
        path = out / name
        data = bytearray(path.read_bytes())
        at = min(len(data) - 1, (len(data) // 2 // chunk) * chunk + chunk // 2)  # inside a chunk, not at its edge
        data[at] ^= 0x10
        path.write_bytes(bytes(data))
        with pytest.raises(StoreError, match=f"{name}: checksum mismatch"):
            verify_store(out)
        data[at] ^= 0x10
        path.write_bytes(bytes(data))
    verify_store(out)


def test_a_store_of_format_version_2_is_refused_with_rebuild_and_still_replaced_by_a_build(tmp_path):
    out = tmp_path / "s"
    with StoreWriter(out, np.uint16) as writer:
        _append_all(writer, _docs(random.Random(2), 5))
        writer.commit(_manifest(writer))
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["version"] = 2
    for entry in manifest["files"].values():
        entry["xxh3_128"] = entry.pop("xxh3_128_chunked")["digest"]
    manifest["checksum"] = sftpack.store._manifest_checksum(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="version 2 is not supported.*rebuild"):
        open_store(out)
    with StoreWriter(out, np.uint16) as writer:  # an older store of ours: replaced, not refused
        _append_all(writer, _docs(random.Random(2), 5))
        writer.commit(_manifest(writer))
    assert read_manifest(out)["version"] == sftpack.store.VERSION


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    sizes=st.lists(st.integers(0, 12), min_size=1, max_size=4),
    chunk=st.sampled_from([1, 5, 64, 200, 1 << 20]),
    first=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_reduce_by_offsets_gives_the_appended_store_byte_for_byte(
    tmp_path_factory, monkeypatch_module, sizes, chunk, first, seed
):
    """Shards copied into a preallocated store at their prefix-sum places, each copy
    hashing its chunks (as Ray tasks do), equal one writer appending every document."""
    monkeypatch_module.setattr(sftpack.store, "CHUNK", chunk)
    root = tmp_path_factory.mktemp("reduce")
    rng = random.Random(seed)
    parts = [_docs(rng, n) for n in sizes]
    shards = []
    for i, docs in enumerate(parts):
        with StoreWriter(root / f"shard-{i}", np.uint16) as writer:
            _append_all(writer, docs, first)
            writer.commit(_manifest(writer))
        shards.append(root / f"shard-{i}")
    with StoreWriter(root / "appended", np.uint16) as writer:
        _append_all(writer, [d for docs in parts for d in docs], first)
        writer.commit(_manifest(writer))

    lengths = [{k: e["length"] for k, e in _written(s).items()} for s in shards]
    places, totals = reduce_plan(lengths)
    first = first and sum(sizes) > 0  # no document at all: no first-in-stream arrays either
    assert set(totals) == set(ALL_ARRAYS if first else ARRAYS)
    read: list[int] = []
    real = sftpack.store._chunk_digest
    monkeypatch_module.setattr(sftpack.store, "_chunk_digest", lambda b: read.append(len(b)) or real(b))
    with StoreWriter(root / "reduced", np.uint16) as writer:
        supervised = sum(int(np.count_nonzero(open_store(s).loss_mask)) for s in shards)
        sizes_ = writer.preallocate(totals, supervised)
        items = reduce_tasks(places, [str(s) for s in shards], writer, sizes_)
        for item in reversed(items):  # in any order, as Ray runs them
            row = copy_shard(item)
            assert row["error"] == ""
            for key in totals:
                writer.add_digests(key, *row["digests"][key])
        writer.commit(_manifest(writer))
    assert read == []  # every chunk was hashed by the copies: the commit read no array byte
    monkeypatch_module.setattr(sftpack.store, "_chunk_digest", real)
    for name in [*(ALL_ARRAYS if first else ARRAYS).values(), MANIFEST]:
        assert (root / "appended" / name).read_bytes() == (root / "reduced" / name).read_bytes(), name
    verify_store(root / "reduced")


def test_a_preallocated_store_killed_before_commit_opens_as_nothing(tmp_path):
    """The files sit at full size in the temporary directory; without the manifest nothing
    there (nor at the target) opens as a store, and the writer's exit removes it."""
    with pytest.raises(KeyboardInterrupt):
        with StoreWriter(tmp_path / "s", np.uint16) as writer:
            writer.preallocate({"tokens": 10, "loss_mask": 10, "doc_offsets": 3}, 4)
            assert (writer.tmp / "tokens.npy").stat().st_size == 128 + 20
            with pytest.raises(StoreError, match="manifest.json is missing"):
                open_store(writer.tmp)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_input_fingerprint_is_the_chunked_hash_that_aligned_ranges_can_compute_apart(tmp_path, monkeypatch):
    """Per file: format, size, and xxh3_128 over its chunks' digests; workers hashing
    aligned ranges of the file apart give the same chunk digests (so the same value)."""
    import sftpack.records as records

    monkeypatch.setattr(records, "INPUT_CHUNK", 50)
    rng = random.Random(4)
    files = []
    for name, size in (("a.jsonl", 0), ("b.jsonl", 50), ("c.json", 333)):
        (tmp_path / name).write_bytes(rng.randbytes(size))
        files.append(tmp_path / name)

    def per_file(data: bytes) -> bytes:
        return bytes.fromhex(reference(data, 50))

    expected = xxhash.xxh3_128()
    for path in files:
        data = path.read_bytes()
        expected.update(f"{path.suffix}\0".encode() + f"\0{len(data)}\0".encode() + per_file(data))
        runs = b""
        for lo in range(0, len(data), 100):  # two chunks a worker
            hasher = ChunkHasher(lo, 50)
            hasher.update(data[lo : lo + 100])
            runs += hasher.finish(len(data))[1]
        assert xxhash.xxh3_128_digest(runs) == per_file(data)
    assert records.fingerprint_inputs(files) == expected.hexdigest()
    (tmp_path / "c.json").write_bytes(files[2].read_bytes()[:-1] + b"!")
    assert records.fingerprint_inputs(files) != expected.hexdigest()
