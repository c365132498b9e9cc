"""The on-disk store: corruption and truncation are caught and named, versions are
checked, token dtypes round-trip at the uint16/uint32 edge, offsets are int64, and no
user-facing check relies on `assert` (the package behaves the same under `python -O`)."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from sftpack.build import BuildOptions, build
from sftpack.cli import main
from sftpack.errors import StoreError
from sftpack.pack import cu_seqlens, mask_cross_document, num_rows, position_ids, row_span, seq_lens
from sftpack.store import (
    ARRAYS,
    MANIFEST,
    StoreWriter,
    open_store,
    read_manifest,
    token_dtype,
    verify_store,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "sftpack"
FILES = [*ARRAYS.values(), MANIFEST]
BIG = 2**32 + 5


def _rows(n: int) -> list[dict]:
    return [
        {"prompt": f"Question {i}: what is {i} plus {i * 7}?", "response": f"It is {i + i * 7}. Done with item {i}."}
        for i in range(n)
    ]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def built_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store_src")
    data = _write_jsonl(root / "data.jsonl", _rows(30))
    summary = build(data, root / "store", BuildOptions(seq_length=16), "llama3", progress=False)
    assert not summary.reused
    return summary.path


@pytest.fixture
def store(built_store, tmp_path) -> Path:
    """A private copy of a small committed store."""
    dst = tmp_path / "store"
    shutil.copytree(built_store, dst)
    return dst


def _flip(path: Path, pos: int, xor: int = 0xFF) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= xor
    path.write_bytes(bytes(data))


def _verify_cli(path: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["verify", str(path)])
    return rc, capsys.readouterr().err


# --------------------------------------------------------------------------- corruption


def test_pristine_store_verifies(store, capsys):
    rc, err = _verify_cli(store, capsys)
    assert rc == 0, err
    s = verify_store(store)
    assert len(s.tokens) == s.manifest["counts"]["tokens"] == s.doc_offsets[-1]
    assert s.manifest["format"] == "sftpack.packed" and s.manifest["version"] == 3


@pytest.mark.parametrize("name", list(ARRAYS.values()))
@pytest.mark.parametrize("where", ["header", "first_data", "middle", "last"])
def test_flipped_array_byte_fails_verify_naming_the_file(store, capsys, name, where):
    path = store / name
    size = path.stat().st_size
    pos = {"header": 20, "first_data": 128, "middle": 128 + (size - 128) // 2, "last": size - 1}[where]
    _flip(path, pos)
    rc, err = _verify_cli(store, capsys)
    assert rc == 1
    assert name in err and "error" in err
    with pytest.raises(StoreError, match=name.replace(".", r"\.")):
        verify_store(store)
    from sftpack import open_packed

    with pytest.raises(StoreError, match=name.replace(".", r"\.")):
        open_packed(store, verify=True)


@pytest.mark.parametrize("where", ["first", "quarter", "middle", "last"])
def test_flipped_manifest_byte_fails_verify_naming_the_manifest(store, capsys, where):
    path = store / MANIFEST
    size = path.stat().st_size
    pos = {"first": 0, "quarter": size // 4, "middle": size // 2, "last": size - 1}[where]
    _flip(path, pos)
    rc, err = _verify_cli(store, capsys)
    assert rc == 1
    assert MANIFEST in err
    with pytest.raises(StoreError, match=r"manifest\.json"):
        open_store(store)


@pytest.mark.parametrize("field", ["seq_length", "documents"])
def test_single_bit_flip_in_a_manifest_value_fails_verify(store, capsys, field):
    """A one-bit flip that keeps the manifest valid JSON (a digit of a number) must still
    be caught by `verify`: the manifest decides the rows (seq_length) and the counts."""
    path = store / MANIFEST
    text = path.read_text()
    key = f'"{field}": '
    pos = text.index(key) + len(key)
    while text[pos + 1].isdigit():
        pos += 1  # last digit of the value
    assert text[pos].isdigit()
    _flip(path, pos, xor=0x01)  # '1' <-> '0', '6' <-> '7', ...: still a valid number
    json.loads(path.read_text())  # still parses
    rc, err = _verify_cli(store, capsys)
    altered = json.loads(path.read_text())
    assert rc == 1, (
        f"verify accepted a manifest whose {field} was altered "
        f"(seq_length now {altered['plan']['seq_length']}, documents now {altered['counts']['documents']})"
    )
    assert MANIFEST in err


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("how", ["minus_one", "half", "empty", "plus_one"])
def test_truncated_file_is_caught_without_verify_naming_it(store, name, how):
    path = store / name
    size = path.stat().st_size
    if how == "plus_one":
        with open(path, "ab") as f:
            f.write(b"\0")
    else:
        new = {"minus_one": size - 1, "half": size // 2, "empty": 0}[how]
        with open(path, "r+b") as f:
            f.truncate(new)
    with pytest.raises(StoreError, match=name.replace(".", r"\.")):
        open_store(store, verify=False)


@pytest.mark.parametrize("name", list(ARRAYS.values()))
def test_missing_array_file_is_named(store, name):
    (store / name).unlink()
    with pytest.raises(StoreError, match=name.replace(".", r"\.")):
        open_store(store)


def test_missing_manifest_is_a_store_error(store, capsys):
    (store / MANIFEST).unlink()
    with pytest.raises(StoreError, match="manifest"):
        open_store(store)
    with pytest.raises(StoreError):
        read_manifest(store)
    rc, err = _verify_cli(store, capsys)
    assert rc == 1 and MANIFEST in err


def test_missing_directory_is_a_store_error(tmp_path, capsys):
    with pytest.raises(StoreError):
        open_store(tmp_path / "nowhere")
    rc, err = _verify_cli(tmp_path / "nowhere", capsys)
    assert rc == 1 and err


@pytest.mark.parametrize("version", [1, 2, 4, 0, "3", None])
def test_unknown_manifest_version_is_refused(store, capsys, version):
    path = store / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["version"] = version
    path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="version") as info:
        open_store(store)
    assert repr(version) in str(info.value) and "rebuild" in str(info.value)
    rc, err = _verify_cli(store, capsys)
    assert rc == 1 and "version" in err


def test_wrong_format_name_is_refused(store):
    path = store / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["format"] = "something.else"
    path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="something.else"):
        open_store(store)


def test_writer_refuses_to_replace_a_directory_that_is_not_a_store(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("user data")
    with pytest.raises(StoreError, match="not an sftpack store"):
        StoreWriter(target, np.uint16)
    assert (target / "notes.txt").read_text() == "user data"
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]


# --------------------------------------------------------------------------- token dtype


@pytest.mark.parametrize(
    "vocab, expected", [(65_535, np.uint16), (65_536, np.uint16), (65_537, np.uint32), (151_936, np.uint32)]
)
def test_token_dtype(vocab, expected):
    assert token_dtype(vocab) == np.dtype(expected)
    # every id of the vocabulary fits, the next one is the first that need not
    assert np.iinfo(token_dtype(vocab)).max >= vocab - 1


@pytest.mark.parametrize("bad", [0, -1])
def test_token_dtype_rejects_empty_vocabulary(bad):
    with pytest.raises(StoreError):
        token_dtype(bad)


def _minimal_manifest(vocab: int) -> dict:
    """What a reader needs besides the files (which the writer adds)."""
    return {"fingerprint": "test", "counts": {"documents": 0, "tokens": 0, "supervised_tokens": 0, "special_token_documents": 0,
                                  "input_bytes": 0}, "options": {"train_on_prompt": True},
            "plan": {"seq_length": 4, "packing": "concat", "overflow": "split", "pad": None, "shuffle": False,
                     "seed": None},
            "view": {"boundaries": False, "mask_cross_document": False},
            "tokenizer": {"name": "test", "vocab_size": vocab}}


@pytest.mark.parametrize("vocab", [65_535, 65_536, 65_537, 151_936])
def test_writer_round_trips_every_id_of_the_vocabulary(tmp_path, vocab):
    ids = np.concatenate([np.arange(vocab, dtype=np.int64), np.arange(vocab - 1, vocab - 300, -1, dtype=np.int64)])
    lengths = np.array([vocab // 3, vocab - vocab // 3, 299], dtype=np.int64)
    assert lengths.sum() == len(ids)
    mask = (ids % 2).astype(np.uint8)
    with StoreWriter(tmp_path / "s", token_dtype(vocab)) as w:
        w.append(ids[:1000], mask[:1000], np.array([1000], dtype=np.int64))
        w.append(ids[1000:], mask[1000:], np.array([lengths[0] - 1000, lengths[1], lengths[2]], dtype=np.int64))
        w.commit(_minimal_manifest(vocab))
    s = open_store(tmp_path / "s", verify=True)
    assert s.tokens.dtype == token_dtype(vocab)
    assert s.manifest["files"]["tokens"]["dtype"] == token_dtype(vocab).name
    np.testing.assert_array_equal(s.tokens.astype(np.int64), ids)
    assert int(s.tokens.max()) == vocab - 1
    np.testing.assert_array_equal(s.loss_mask, mask)
    np.testing.assert_array_equal(s.doc_offsets, [0, 1000, lengths[0], lengths[0] + lengths[1], len(ids)])
    assert s.doc_offsets.dtype == np.int64


# --------------------------------------------------------------------------- int64 offsets


def test_writer_offsets_past_2_to_the_32_are_int64(tmp_path):
    w = StoreWriter(tmp_path / "s", np.uint32)
    try:
        w.n_tokens = BIG  # as if 2**32 + 5 tokens were already written
        w.append(np.arange(6, dtype=np.int64), np.ones(6, dtype=np.uint8), np.array([1, 2, 3], dtype=np.int32))
        assert w.n_tokens == BIG + 6 and isinstance(w.n_tokens, int)
        w.append(np.arange(2, dtype=np.int64), np.ones(2, dtype=np.uint8), np.array([2], dtype=np.int64))
        assert w.n_tokens == BIG + 8
        w._offsets._f.flush()
        offsets = np.fromfile(w._offsets.path, dtype=np.int64, offset=128)
    finally:
        w.abort()
    expected = np.array([0, BIG + 1, BIG + 3, BIG + 6, BIG + 8], dtype=np.int64)
    assert offsets.dtype == np.int64
    np.testing.assert_array_equal(offsets, expected)
    assert [int(x) for x in offsets] == [0, 2**32 + 6, 2**32 + 8, 2**32 + 11, 2**32 + 13]
    assert not (tmp_path / "s").exists() and list(tmp_path.iterdir()) == []


def test_pack_arithmetic_past_2_to_the_32():
    L = 8
    doc_starts = np.array([0, 2**31, BIG - 2, BIG + 3, 2**33], dtype=np.int64)
    start = 2**32  # inside the document that starts at 2**31
    pos = position_ids(doc_starts, start, L)
    expected = [p - max(d for d in doc_starts.tolist() if d <= p) for p in range(start, start + L)]
    assert pos.dtype == np.int64
    assert pos.tolist() == expected
    assert pos.tolist() == [2**31, 2**31 + 1, 2**31 + 2, 0, 1, 2, 3, 4]
    lens = seq_lens(doc_starts, start, L)
    assert lens.tolist() == [3, 5] and int(lens.sum()) == L
    assert cu_seqlens(lens).tolist() == [0, 3, 8]
    # a row that starts exactly on a document start past 2**32
    assert position_ids(doc_starts, BIG + 3, 4).tolist() == [0, 1, 2, 3]
    assert seq_lens(doc_starts, BIG + 3, 4).tolist() == [4]
    # row spans: Python ints and numpy int64 both give exact int64-range results
    for index, seq in [(2**26, 2**7), (np.int64(2**26), np.int64(2**7)), (2**32 + 1, 4096)]:
        s, e = row_span(index, seq)
        assert int(s) == int(index) * int(seq) and int(e) == int(s) + int(seq) + 1
        assert int(s) > 2**32
    assert num_rows(2**40 + 1, 2**20) == 2**20
    # the cross-document label sits at the right place past 2**32
    labels = np.arange(L, dtype=np.int64)
    masked = mask_cross_document(labels, doc_starts, start)
    crossing = [d - start - 1 for d in doc_starts.tolist() if start < d <= start + L]
    assert crossing == [2, 7]
    assert np.flatnonzero(masked == -100).tolist() == crossing


# --------------------------------------------------------------------------- python -O


def test_package_uses_no_assert_statements():
    offenders = []
    for path in sorted(SRC.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        offenders += [f"{path.name}:{node.lineno}" for node in ast.walk(tree) if isinstance(node, ast.Assert)]
    assert len(list(SRC.glob("*.py"))) >= 10
    assert offenders == [], f"assert statements vanish under python -O: {offenders}"


def test_errors_still_raise_under_python_O(built_store, tmp_path):
    script = textwrap.dedent(
        """
        import json, shutil, sys
        from pathlib import Path

        import numpy as np

        from sftpack.build import BuildOptions, build
        from sftpack.errors import ConfigError, InputError, StoreError
        from sftpack.store import StoreWriter, open_store, token_dtype

        if sys.flags.optimize < 1:
            sys.exit("not running under -O")
        src, root = Path(sys.argv[1]), Path(sys.argv[2])
        seen = []

        def expect(exc_type, fn, needle):
            try:
                fn()
            except exc_type as exc:
                if needle not in str(exc):
                    sys.exit(f"{exc_type.__name__} without {needle!r}: {exc}")
                seen.append(exc_type.__name__)
                return
            sys.exit(f"no {exc_type.__name__} raised (expected {needle!r})")

        store = root / "store"
        shutil.copytree(src, store)
        with open(store / "tokens.npy", "r+b") as f:
            f.truncate(200)
        expect(StoreError, lambda: open_store(store), "tokens.npy")
        (store / "manifest.json").unlink()
        expect(StoreError, lambda: open_store(store), "manifest.json")
        flipped = root / "flipped"
        shutil.copytree(src, flipped)
        data = bytearray((flipped / "loss_mask.npy").read_bytes())
        data[-1] ^= 0xFF
        (flipped / "loss_mask.npy").write_bytes(bytes(data))
        expect(StoreError, lambda: open_store(flipped, verify=True), "loss_mask.npy")
        expect(StoreError, lambda: token_dtype(0), "vocabulary")
        bad = root / "bad.jsonl"
        bad.write_text('{"prompt": "a", "response": "b"}\\n{"prompt": "a", "response": 3}\\n')
        expect(InputError, lambda: build(bad, root / "o1", BuildOptions(seq_length=8), "llama3"), "bad.jsonl:2")
        expect(ConfigError, lambda: build(bad, root / "o2", BuildOptions(seq_length=0), "llama3"), "seq_length")
        occupied = root / "occupied"
        occupied.mkdir()
        (occupied / "x").write_text("x")
        expect(StoreError, lambda: StoreWriter(occupied, np.uint16), "not an sftpack store")
        print("OK", " ".join(seen))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-O", "-c", script, str(built_store), str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split() == ["OK"] + ["StoreError"] * 4 + ["InputError", "ConfigError", "StoreError"]


def _synced_files(monkeypatch, name: str, fail: OSError | None = None, delay: float = 0.0) -> list[str]:
    """Record the file names that `os.<name>` is called on (optionally failing, or slow)."""
    import os
    import time

    real, seen = getattr(os, name), []

    def call(fd: int) -> None:
        time.sleep(delay)
        seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)  # the descriptor is still this file's
        if fail is not None:
            raise fail
        real(fd)

    monkeypatch.setattr(os, name, call)
    return seen


MIB_OF_TOKENS = np.arange(1 << 19, dtype=np.uint16)  # 1 MiB a piece


def test_appended_data_is_synced_early_and_every_file_again_at_commit(tmp_path, monkeypatch):
    early = _synced_files(monkeypatch, "fdatasync")
    final = _synced_files(monkeypatch, "fsync")
    target = tmp_path / "store"
    with StoreWriter(target, np.uint16) as writer:
        for _ in range(3):
            writer.append(MIB_OF_TOKENS, np.ones(len(MIB_OF_TOKENS), np.uint8), np.array([len(MIB_OF_TOKENS)]))
        writer._stop_syncer()  # the early syncs started so far are done
        assert "tokens.npy" in early and final == []  # written while the build goes on, before the commit
        writer.commit({"fingerprint": "x", "counts": {}})
    assert {"tokens.npy", "loss_mask.npy", "doc_offsets.npy"} <= set(final)  # the guarantee stays the commit's
    assert np.array_equal(np.load(target / "tokens.npy")[-len(MIB_OF_TOKENS) :], MIB_OF_TOKENS)


def test_a_failed_early_sync_fails_the_commit_and_publishes_nothing(tmp_path, monkeypatch):
    import errno

    # the kernel reports a write error once per open file: an early sync that saw it must not be the only one
    _synced_files(monkeypatch, "fdatasync", fail=OSError(errno.EIO, "Input/output error"))
    target = tmp_path / "store"
    with pytest.raises(OSError) as info:
        with StoreWriter(target, np.uint16) as writer:
            for _ in range(2):
                writer.append(MIB_OF_TOKENS, np.ones(len(MIB_OF_TOKENS), np.uint8), np.array([len(MIB_OF_TOKENS)]))
            writer.commit({"fingerprint": "x", "counts": {}})
    assert info.value.errno == errno.EIO
    assert list(tmp_path.iterdir()) == []


def test_an_aborted_writer_closes_no_file_under_its_early_sync(tmp_path, monkeypatch):
    seen = _synced_files(monkeypatch, "fdatasync", delay=0.2)  # still running when the block raises
    with pytest.raises(RuntimeError):
        with StoreWriter(tmp_path / "store", np.uint16) as writer:
            writer.append(MIB_OF_TOKENS, np.ones(len(MIB_OF_TOKENS), np.uint8), np.array([len(MIB_OF_TOKENS)]))
            raise RuntimeError("the build failed")
    assert seen == ["tokens.npy"]  # its descriptor was still open (and still the tokens file) when it ran
    assert list(tmp_path.iterdir()) == []


def test_commit_reads_back_no_array_to_checksum_it(tmp_path, monkeypatch):
    # every chunk digest, chunk 0 (the header's) included, is computed as the data is written
    import sftpack.store

    opened = []
    def recorded(file, mode="r", *args, **kwargs):
        opened.append((Path(file).name, mode))
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(sftpack.store, "open", recorded, raising=False)  # the module's own opens
    target = tmp_path / "store"
    with StoreWriter(target, np.uint16) as writer:
        for n in (1 << 19, 1 << 19, 3, 1 << 19):  # files of several chunks, one of less than a chunk (offsets)
            writer.append(MIB_OF_TOKENS[:n], np.ones(n, np.uint8), np.array([n]))
        writer.commit({"fingerprint": "x", "counts": {}})
    assert [name for name, mode in opened if "r" in mode and name.endswith(".npy")] == []
    assert {name for name, mode in opened if "w" in mode} >= {"tokens.npy", "loss_mask.npy", "doc_offsets.npy"}
    for key, name in ARRAYS.items():  # the recorded checksums are the files' own
        entry = read_manifest(target, any_version=True)["files"][key]["xxh3_128_chunked"]
        assert entry["digest"] == sftpack.store.checksum(target / name, chunk=entry["chunk"])


def _fsync_events(monkeypatch, hold: threading.Event | None = None, fail: OSError | None = None) -> list[str]:
    """Record the fsyncs of array files and the renames, in order; an array's fsync first waits
    for `hold` (at most 10 s) or fails with `fail`."""
    import os

    real_fsync, real_replace, events = os.fsync, os.replace, []

    def fsync(fd: int) -> None:
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        if name.endswith(".npy"):
            if hold is not None:
                events.append(f"{name} waited" if hold.wait(10) else f"{name} timed out")
            if fail is not None:
                raise fail
        real_fsync(fd)
        events.append(f"fsynced {name}")

    def replace(src, dst) -> None:
        real_replace(src, dst)
        events.append(f"renamed to {Path(dst).name}")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_commit_fsyncs_beside_the_check_and_publishes_after_them(tmp_path, monkeypatch):
    checked = threading.Event()
    events = _fsync_events(monkeypatch, hold=checked)  # an array's fsync waits until the check has run
    target = tmp_path / "store"
    with StoreWriter(target, np.uint16) as writer:
        writer.append(MIB_OF_TOKENS, np.ones(len(MIB_OF_TOKENS), np.uint8), np.array([len(MIB_OF_TOKENS)]))
        writer.commit({"fingerprint": "x", "counts": {}}, check=lambda tmp: checked.set())
    assert "tokens.npy waited" in events  # the check ran while the fsyncs were in flight
    published = events.index("renamed to store")
    for name in ARRAYS.values():
        assert events.index(f"fsynced {name}") < published  # each file durable before the store is published


def test_a_failed_fsync_at_commit_fails_it_before_a_failed_check(tmp_path, monkeypatch):
    import errno

    from sftpack.errors import ConfigError

    _fsync_events(monkeypatch, fail=OSError(errno.EIO, "Input/output error"))

    def check(tmp: Path) -> None:
        raise ConfigError("no plan")

    target = tmp_path / "store"
    with pytest.raises(OSError) as info:  # as when the fsyncs ran before the check
        with StoreWriter(target, np.uint16) as writer:
            writer.append(MIB_OF_TOKENS, np.ones(len(MIB_OF_TOKENS), np.uint8), np.array([len(MIB_OF_TOKENS)]))
            writer.commit({"fingerprint": "x", "counts": {}}, check=check)
    assert info.value.errno == errno.EIO
    assert list(tmp_path.iterdir()) == []
