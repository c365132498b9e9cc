"""Never lose a user's data: `--out` replaces only an empty directory or sftpack's own
complete store, builds of one target are serialised by a kernel lock (not PIDs), faults
(full disk, failed rename) leave the previous store in place and nothing behind, and a
store is validated before a row is served."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import sftpack.build
import sftpack.store
from sftpack import PackedSFTDataset, open_packed
from sftpack.build import BuildOptions, build
from sftpack.cli import main
from sftpack.config import make_options
from sftpack.errors import StoreError
from sftpack.store import (
    MANIFEST,
    StoreWriter,
    _manifest_checksum,
    checksum,
    checksum_entry,
    make_tmp,
    open_store,
    read_manifest,
)
from sftpack.tokenizers import load_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:.*special-token strings:UserWarning")
SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample.jsonl"
OPTIONS = BuildOptions(seq_length=16)
OTHER = BuildOptions(seq_length=8, train_on_prompt=False)  # other tokens' masks: a different store


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer("llama3", threads=1)


def _rows(n: int, tag: str = "") -> list[dict]:
    return [{"prompt": f"{tag}Question {i}: what is {i} times 3?", "response": f"{tag}It is {3 * i}."} for i in range(n)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes): what must survive a refused build."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _litter(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


# --------------------------------------------------------------------------- what --out may replace


def test_issue_example_a_data_dir_with_a_manifest_is_refused_and_kept(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(SAMPLE, data / "train.jsonl")
    (data / MANIFEST).write_text("{}")
    before = _tree(data)
    rc = main(["build", str(data / "train.jsonl"), "--out", str(data), "--seq-length", "64", "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err
    assert str(data) in err and "not an sftpack store" in err
    assert _tree(data) == before
    # `--out .` in the same directory
    monkeypatch.chdir(data)
    assert main(["build", "train.jsonl", "--out", ".", "--seq-length", "64", "--quiet"]) == 1
    assert _tree(data) == before


@pytest.mark.parametrize("case", ["user_file", "file_target", "store_plus_user_file", "forged_manifest",
                                  "nested_user_dir"])
def test_refused_targets_are_left_untouched_before_any_work(tmp_path, llama3, monkeypatch, case):
    data = _jsonl(tmp_path / "data.jsonl", _rows(30))
    target = tmp_path / "target"
    if case == "file_target":
        target.write_text("precious")
    else:
        target.mkdir()
        if case == "user_file":
            (target / "notes.txt").write_text("precious")
        elif case == "store_plus_user_file":
            build(data, target, OPTIONS, llama3, progress=False)
            (target / "notes.txt").write_text("precious")
        elif case == "forged_manifest":  # names the format, but its checksum does not pass
            (target / MANIFEST).write_text(json.dumps({"format": "sftpack.packed", "version": 1, "checksum": "0"}))
            (target / "tokens.npy").write_text("precious")
        else:
            (target / "sub").mkdir()
            (target / "sub" / "x").write_text("precious")
    before = _tree(tmp_path)
    monkeypatch.setattr(sftpack.build, "load_tokenizer", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(StoreError, match="choose another --out") as info:
        build(data, target, BuildOptions(seq_length=8), llama3, progress=False)
    assert str(target) in str(info.value)
    assert _tree(tmp_path) == before
    assert _litter(target) == []


def test_empty_directory_and_own_store_are_replaced(tmp_path, llama3):
    data = _jsonl(tmp_path / "data.jsonl", _rows(30))
    target = tmp_path / "target"
    target.mkdir()
    build(data, target, OPTIONS, llama3, progress=False)
    assert read_manifest(target)["plan"]["seq_length"] == 16
    build(data, target, OTHER, llama3, progress=False)  # its own complete store
    assert read_manifest(target)["plan"]["seq_length"] == 8
    (target / "loss_mask.npy").unlink()  # a damaged own store is still its own: rebuilt
    build(data, target, OTHER, llama3, progress=False)
    open_store(target, verify=True)
    assert _litter(target) == []


def test_symlinked_out_is_followed_and_the_link_kept(tmp_path, llama3):
    data = _jsonl(tmp_path / "data.jsonl", _rows(30))
    real = tmp_path / "disk" / "store"
    real.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    summary = build(data, link, OPTIONS, llama3, progress=False)
    assert link.is_symlink() and summary.path == real
    open_store(link, verify=True)
    assert build(data, link, OPTIONS, llama3, progress=False).reused
    # a link to a user's directory is refused like the directory itself
    user = tmp_path / "home"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    other = tmp_path / "link2"
    other.symlink_to(user, target_is_directory=True)
    with pytest.raises(StoreError, match="not an sftpack store"):
        build(data, other, OPTIONS, llama3, progress=False)
    assert (user / "thesis.tex").read_text() == "precious" and other.is_symlink()
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(StoreError, match="does not exist"):
        build(data, dangling, OPTIONS, llama3, progress=False)
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()


def _try_mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def test_mount_point_out_is_refused(tmp_path, llama3, monkeypatch):
    data = _jsonl(tmp_path / "data.jsonl", _rows(30))
    mnt = tmp_path / "mnt"
    if _try_mount_tmpfs(mnt, "4m"):
        try:
            with pytest.raises(StoreError, match="mount point"):
                build(data, mnt, OPTIONS, llama3, progress=False)
            build(data, mnt / "store", OPTIONS, llama3, progress=False)  # the suggested fix works
        finally:
            subprocess.run(["umount", "--lazy", str(mnt)], check=True)
    else:  # no privilege to mount here: the same check, through the predicate it uses
        mnt.mkdir(exist_ok=True)
        monkeypatch.setattr(sftpack.store.os.path, "ismount", lambda p: Path(p) == mnt)
        with pytest.raises(StoreError, match="mount point"):
            build(data, mnt, OPTIONS, llama3, progress=False)


def test_cache_dir_entry_that_is_not_a_store_is_refused(tmp_path):
    data = _jsonl(tmp_path / "data.jsonl", _rows(30))
    cache = tmp_path / "cache"
    entry = PackedSFTDataset("llama3", data, seq_length=16, cache_dir=cache).path
    shutil.rmtree(entry)
    entry.mkdir()
    (entry / "notes.txt").write_text("precious")
    with pytest.raises(StoreError, match="not an sftpack store"):
        PackedSFTDataset("llama3", data, seq_length=16, cache_dir=cache)
    assert (entry / "notes.txt").read_text() == "precious"


def test_file_put_into_the_target_during_the_build_survives(tmp_path, llama3, monkeypatch):
    data = _jsonl(tmp_path / "data.jsonl", _rows(30))
    target = tmp_path / "store"
    build(data, target, OPTIONS, llama3, progress=False)
    encode_all = sftpack.build._encode_all

    def meanwhile(*args, **kwargs):
        (target / "notes.txt").write_text("written by the user mid-build")
        return encode_all(*args, **kwargs)

    monkeypatch.setattr(sftpack.build, "_encode_all", meanwhile)
    with pytest.raises(StoreError, match="not an sftpack store"):
        build(data, target, OTHER, llama3, progress=False)
    assert (target / "notes.txt").read_text() == "written by the user mid-build"
    assert read_manifest(target)["plan"]["seq_length"] == 16
    assert _litter(target) == []


# --------------------------------------------------------------------------- concurrent builds


def _builder_script(data: Path, cache: Path | None, out: Path | None, seq: int = 64, hold: float = 0.0) -> str:
    """A build in its own process; `hold` seconds of pause after tokenizing (its temporary
    directory exists then), so that builds started together surely overlap."""
    dest = f"cache_dir={str(cache)!r}" if cache else ""
    return textwrap.dedent(f"""
        import json, sys, time
        import sftpack.build
        from sftpack.build import BuildOptions, build
        encode_all = sftpack.build._encode_all
        def held(*a, **k):
            out = encode_all(*a, **k)
            time.sleep({hold})
            return out
        sftpack.build._encode_all = held
        s = build({str(data)!r}, {str(out) if out else None!r}, BuildOptions(seq_length={seq}), "llama3",
                  progress=False, workers=1, {dest})
        print(json.dumps({{"reused": s.reused, "path": str(s.path), "sequences": s.sequences}}))
    """)


def _big(path: Path, n: int = 12_000) -> Path:
    return _jsonl(path, [{"prompt": f"Item {i}: " + "lorem ipsum dolor " * 20, "response": f"answer {i} " * 30}
                         for i in range(n)])


def test_four_processes_on_one_cache_dir_build_once(tmp_path):
    data = _big(tmp_path / "data.jsonl")
    cache = tmp_path / "cache"
    script = _builder_script(data, cache, None, hold=1.0)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["reused"] for r in results) == [False, True, True, True], results
    assert len({r["path"] for r in results}) == 1 and len({r["sequences"] for r in results}) == 1
    store = Path(results[0]["path"])
    open_store(store, verify=True)
    assert sorted(p.name for p in cache.iterdir()) == [store.name]  # no lock, tmp or old left


def _unshare_prefix() -> list[str]:
    """Run a command in a new PID namespace when this machine allows it (as a container would)."""
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    return ["unshare", "--pid", "--fork", "--mount-proc"] if probe.returncode == 0 else []


def test_builders_in_separate_pid_namespaces_do_not_delete_each_others_work(tmp_path):
    """A builder that cannot see the other's PID must neither delete its temporary directory
    nor overwrite its store: both end with a true summary of the same store."""
    data = _big(tmp_path / "data.jsonl")
    out = tmp_path / "store"
    first = subprocess.Popen([sys.executable, "-c", _builder_script(data, None, out, hold=3.0)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(n.startswith(".store.tmp-") for n in os.listdir(tmp_path)) and first.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    second = subprocess.run([*_unshare_prefix(), sys.executable, "-c", _builder_script(data, None, out)], capture_output=True, text=True,
                            timeout=300)
    out1, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert second.returncode == 0, second.stderr
    r1, r2 = json.loads(out1.splitlines()[-1]), json.loads(second.stdout.splitlines()[-1])
    assert (r1["reused"], r2["reused"]) == (False, True)
    assert r1["sequences"] == r2["sequences"] == len(open_packed(out))
    open_store(out, verify=True)
    assert _litter(out) == []


def test_concurrent_builds_with_different_options_each_tell_the_truth(tmp_path):
    """Two builds of one --out with different seq_lengths: they run one after the other and
    each summary describes the store that build wrote."""
    data = _big(tmp_path / "data.jsonl", 6000)
    out = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-c", _builder_script(data, None, out, seq, hold=1.0)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seq in (64, 128)]
    results = []
    for p in procs:
        o, e = p.communicate(timeout=300)
        assert p.returncode == 0, e
        results.append(json.loads(o.splitlines()[-1]))
    stream = read_manifest(out)["counts"]["tokens"] - 1  # the last document's EOS is not in the stream
    assert sorted(r["reused"] for r in results) == [False, True]  # one tokenizes, the other re-plans
    for seq, r in zip((64, 128), results):
        assert r["sequences"] == (stream - 1) // seq
    open_store(out, verify=True)
    assert _litter(out) == []


# --------------------------------------------------------------------------- faults


def test_disk_full_fails_cleanly_and_frees_the_disk(tmp_path, llama3, monkeypatch):
    small = _jsonl(tmp_path / "small.jsonl", _rows(30))
    big = _big(tmp_path / "big.jsonl", 4000)
    disk = tmp_path / "disk"
    mounted = _try_mount_tmpfs(disk, "1m")
    if not mounted:  # no privilege to mount: the disk fills after 64 KiB of array writes
        disk.mkdir()
        written = {"n": 0}
        real_write = sftpack.store._Appender.append

        def append(self, values):
            written["n"] += np.asarray(values).nbytes
            if written["n"] > 1 << 16:
                raise OSError(errno.ENOSPC, "No space left on device")
            real_write(self, values)

        monkeypatch.setattr(sftpack.store._Appender, "append", append)
    try:
        target = disk / "store"
        build(small, target, OPTIONS, llama3, progress=False)
        before = _tree(disk)
        with pytest.raises(OSError) as info:
            build(big, target, OPTIONS, llama3, progress=False)
        assert info.value.errno == errno.ENOSPC
        assert _tree(disk) == before, "the previous store changed or the temporary directory stayed"
        assert sorted(os.listdir(disk)) == ["store"]
        open_store(target, verify=True)
    finally:
        if mounted:
            subprocess.run(["umount", "--lazy", str(disk)], check=True)


def test_cleanup_tolerates_errors_and_reports_the_first(tmp_path, monkeypatch):
    def failing_discard(self):
        self._f.close()
        raise OSError(errno.ENOSPC, "No space left on device (again, while closing)")

    monkeypatch.setattr(sftpack.store._Appender, "discard", failing_discard)
    target = tmp_path / "store"
    with pytest.raises(RuntimeError) as info:
        with StoreWriter(target, np.uint16) as writer:
            writer.append(np.arange(10), np.ones(10, np.uint8), np.array([10]))
            raise RuntimeError("the original failure")
    assert str(info.value) == "the original failure"  # the original is what propagates
    assert any("No space left" in note for note in getattr(info.value, "__notes__", []))
    assert not writer.tmp.exists() and list(tmp_path.iterdir()) == []


def test_failed_final_rename_puts_the_previous_store_back(tmp_path, llama3, monkeypatch):
    data = _jsonl(tmp_path / "data.jsonl", _rows(30))
    target = tmp_path / "store"
    build(data, target, OPTIONS, llama3, progress=False)
    before = _tree(target)
    real_replace = os.replace

    def replace(src, dst):
        if ".store.tmp-" in str(src) and Path(dst) == target:
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(sftpack.store.os, "replace", replace)
    with pytest.raises(OSError, match="Input/output"):
        build(data, target, OTHER, llama3, progress=False)
    assert _tree(target) == before
    assert _litter(target) == []
    monkeypatch.undo()
    assert build(data, target, OPTIONS, llama3, progress=False).reused


# --------------------------------------------------------------------------- stores validated before serving


@pytest.fixture
def store(tmp_path, llama3) -> Path:
    data = _jsonl(tmp_path / "data.jsonl", _rows(40))
    return build(data, tmp_path / "store", BuildOptions(seq_length=16, boundaries=True), llama3, progress=False).path


def _edit(store: Path, edit_manifest=None, **arrays: np.ndarray) -> None:
    """Hand-edit a store as an attacker would: new arrays and/or manifest fields, with every
    size and checksum recomputed so that only the structural checks can catch it."""
    manifest = json.loads((store / MANIFEST).read_text())
    for key, values in arrays.items():
        name = manifest["files"][key]["path"]
        np.save(store / name, values)
        manifest["files"][key].update(length=len(values), dtype=values.dtype.name, bytes=(store / name).stat().st_size,
                                      xxh3_128_chunked=checksum_entry(store / name))
    if edit_manifest is not None:
        edit_manifest(manifest)
    manifest["checksum"] = _manifest_checksum(manifest)
    (store / MANIFEST).write_text(json.dumps(manifest))


def _offsets(store: Path) -> np.ndarray:
    return np.load(store / "doc_offsets.npy").copy()


@pytest.mark.parametrize("damage", ["not_from_zero", "decreasing", "past_the_end", "short_of_the_end"])
def test_impossible_offsets_are_refused_on_open(store, damage):
    off = _offsets(store)
    if damage == "not_from_zero":
        off[0] = 885
        off[1:] = np.maximum(off[1:], 885)
    elif damage == "decreasing":
        off[3], off[4] = off[4], off[3]
    elif damage == "past_the_end":
        off[-2] = off[-1] + 100
        off[-1] = off[-2]
    else:
        off[-1] -= 1
    _edit(store, doc_offsets=off)
    with pytest.raises(StoreError, match="offsets"):
        open_packed(store)


@pytest.mark.parametrize("path", ["../../x", "/etc/passwd", "sub/tokens.npy", "loss_mask.npy"])
def test_file_entries_must_be_the_plain_names(store, path):
    def edit(m):
        m["files"]["tokens"]["path"] = path

    _edit(store, edit)
    with pytest.raises(StoreError, match="plain name"):
        open_packed(store)


def test_symlinked_array_is_refused(store, tmp_path):
    outside = tmp_path / "outside.npy"
    shutil.copy(store / "tokens.npy", outside)
    (store / "tokens.npy").unlink()
    (store / "tokens.npy").symlink_to(outside)
    with pytest.raises(StoreError, match="regular file"):
        open_packed(store)


@pytest.mark.parametrize("key, values", [("tokens", np.zeros(10, np.float32)), ("doc_offsets", np.zeros(2, np.float64)),
                                         ("loss_mask", np.zeros(10, np.int64))])
def test_non_integer_or_wrong_dtypes_are_refused(store, key, values):
    _edit(store, **{key: values})
    with pytest.raises(StoreError, match="dtype"):
        open_packed(store)


@pytest.mark.parametrize("path, value", [(("plan", "seq_length"), 0), (("plan", "seq_length"), "16"),
                                         (("plan", "seq_length"), -3), (("plan", "packing"), "zigzag"),
                                         (("plan", "seed"), -1), (("view", "boundaries"), "yes"),
                                         (("options",), None), (("tokenizer",), {"name": "llama3"}),
                                         (("tokenizer", "pad_id"), -5)])
def test_manifest_fields_a_reader_uses_are_checked(store, path, value):
    def edit(m):
        node = m
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    _edit(store, edit)
    with pytest.raises(StoreError):
        open_packed(store)


def test_verify_checks_every_id_is_inside_the_vocabulary(store):
    tokens = np.load(store / "tokens.npy").copy()
    tokens[7] = 128_256 + 5  # llama3's vocabulary has 128,256 ids; still fits uint32
    _edit(store, tokens=tokens)
    open_packed(store)  # the cheap open checks structure only
    with pytest.raises(StoreError, match="outside the vocabulary"):
        open_packed(store, verify=True)
    assert main(["verify", str(store)]) == 1


# --------------------------------------------------------------------------- a dataset never switches stores


def test_worker_reopening_a_replaced_store_is_refused(tmp_path, llama3):
    data = _jsonl(tmp_path / "data.jsonl", _rows(40))
    target = tmp_path / "store"
    build(data, target, OPTIONS, llama3, progress=False)
    ds = open_packed(target)
    blob = pickle.dumps(ds)  # what a DataLoader worker receives
    assert len(pickle.loads(blob)) == len(ds)  # same store: fine
    build(data, target, BuildOptions(seq_length=8), llama3, progress=False)  # the same tokens, other defaults
    assert len(pickle.loads(blob)) == len(ds)  # still the same tokens: a worker serves them as planned
    build(data, target, OTHER, llama3, progress=False)
    with pytest.raises(StoreError, match="replaced"):
        pickle.loads(blob)


# --------------------------------------------------------------------------- fuzz: only sftpack errors, never an impossible row


def _serve_all(path: Path) -> None:
    ds = open_packed(path)
    for i in range(len(ds)):
        item = ds[i]
        assert item["input_ids"].shape == (ds.seq_length,) and item["labels"].shape == (ds.seq_length,)
        if "position_ids" in item:
            assert int(item["position_ids"].min()) >= 0
            lens = item["seq_lens"]
            assert int(lens.min()) >= 0 and int(lens.sum()) == ds.seq_length


def test_fuzzed_manifests_and_offsets_give_store_errors_or_sound_rows(store):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    pristine = {p.name: p.read_bytes() for p in store.iterdir()}
    manifest = json.loads(pristine[MANIFEST])
    leaves = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        leaves.append(path)

    walk(manifest, ())
    leaves = [p for p in leaves if p and p[-1] != "checksum"]
    values = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.text(max_size=12),
                       st.just("../tokens.npy"), st.just("float32"), st.lists(st.integers(), max_size=2))

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(edits=st.lists(st.tuples(st.sampled_from(leaves), values), min_size=1, max_size=3),
           flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=3))
    def run(edits, flips):
        for name, data in pristine.items():
            (store / name).write_bytes(data)
        offsets = bytearray(pristine["doc_offsets.npy"])
        for pos, xor in flips:
            i = 128 + pos % (len(offsets) - 128)
            offsets[i] ^= xor
        (store / "doc_offsets.npy").write_bytes(bytes(offsets))
        m = json.loads(pristine[MANIFEST])
        m["files"]["doc_offsets"]["xxh3_128_chunked"]["digest"] = checksum(store / "doc_offsets.npy")
        for path, value in edits:
            node = m
            for key in path[:-1]:
                node = node[key] if isinstance(node, dict) and key in node else None
                if node is None:
                    break
            if isinstance(node, dict):
                node[path[-1]] = value
        m["checksum"] = _manifest_checksum(m)
        (store / MANIFEST).write_text(json.dumps(m))
        try:
            _serve_all(store)
        except StoreError:
            pass

    run()


def test_input_changed_between_fingerprint_and_read_is_refused(tmp_path, llama3, monkeypatch):
    """The fingerprint must describe the bytes the store is built from: a file appended to
    after the reader recorded it (before hashing) fails the build instead of caching a lie."""
    from sftpack.errors import InputError
    from sftpack.records import RecordReader

    data = _jsonl(tmp_path / "data.jsonl", _rows(30))

    class Appended(RecordReader):
        def __init__(self, paths):
            super().__init__(paths)
            with open(data, "a", encoding="utf-8") as f:
                f.write(json.dumps({"prompt": "late", "response": "record"}) + "\n")

    monkeypatch.setattr(sftpack.build, "RecordReader", Appended)
    with pytest.raises(InputError, match="changed while it was read"):
        build(data, tmp_path / "store", OPTIONS, llama3, progress=False)
    assert not (tmp_path / "store").exists()


# --------------------------------------------------------------------------- found by attacking the fixes


def test_open_while_the_store_is_replaced_never_mixes_two_builds(tmp_path, llama3, monkeypatch):
    """The manifest and arrays are opened one by one: a store renamed into place meanwhile
    must not give the manifest of one build with the arrays of another."""
    data = _jsonl(tmp_path / "data.jsonl", _rows(30))
    target = tmp_path / "store"
    build(data, target, OPTIONS, llama3, progress=False)
    other = tmp_path / "other"
    build(_jsonl(tmp_path / "more.jsonl", _rows(45, "x")), other, OPTIONS, llama3, progress=False)
    real_load, swapped = np.load, {"done": False}

    def load_then_swap(file, *args, **kwargs):
        out = real_load(file, *args, **kwargs)
        if not swapped["done"]:  # a build commits right after the reader mapped its first array
            swapped["done"] = True
            os.replace(target, tmp_path / "gone")
            os.replace(other, target)
        return out

    monkeypatch.setattr(sftpack.store.np, "load", load_then_swap)
    store = open_store(target)
    assert swapped["done"]
    assert store.fingerprint == read_manifest(target)["fingerprint"]
    assert len(store.tokens) == read_manifest(target)["counts"]["tokens"]  # all from the new build


def test_a_directory_named_like_a_store_file_is_not_owned(store, llama3):
    data = store.parent / "data.jsonl"
    (store / "first_tokens.npy").mkdir()
    (store / "first_tokens.npy" / "thesis.tex").write_text("precious")
    with pytest.raises(StoreError, match="not an sftpack store"):
        build(data, store, OTHER, llama3, progress=False)
    assert (store / "first_tokens.npy" / "thesis.tex").read_text() == "precious"


def test_manifest_symlink_and_repeated_offsets_are_refused(store, tmp_path):
    off = _offsets(store)
    off[2] = off[1]  # a zero-length document: no build makes one (every unit holds its EOS)
    _edit(store, doc_offsets=off)
    with pytest.raises(StoreError, match="offsets"):
        open_packed(store)
    outside = tmp_path / "elsewhere.json"
    shutil.move(store / MANIFEST, outside)
    (store / MANIFEST).symlink_to(outside)
    with pytest.raises(StoreError, match="not a regular file"):
        open_packed(store)


def test_out_that_is_the_current_directory_is_refused(tmp_path, llama3, monkeypatch):
    data = _jsonl(tmp_path / "data.jsonl", _rows(30))
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    with pytest.raises(StoreError, match="current directory"):
        build(data, ".", OPTIONS, llama3, progress=False)
    assert empty.is_dir() and Path.cwd() == empty


def test_read_only_store_and_cache_are_still_served(tmp_path, llama3, monkeypatch):
    data = _jsonl(tmp_path / "data.jsonl", _rows(30))
    build(data, tmp_path / "ro" / "store", OPTIONS, llama3, progress=False)
    PackedSFTDataset("llama3", data, 16, cache_dir=tmp_path / "ro" / "cache")
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).endswith(".lock") and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(sftpack.store.os, "open", read_only)
    assert build(data, tmp_path / "ro" / "store", OPTIONS, llama3, progress=False).reused
    assert PackedSFTDataset("llama3", data, 16, cache_dir=tmp_path / "ro" / "cache").summary.reused
    with pytest.raises(StoreError, match="cannot be written"):
        build(data, tmp_path / "ro" / "store", OTHER, llama3, progress=False)


def test_a_killed_cache_build_is_swept_by_the_next_build_of_any_entry(tmp_path):
    data = _jsonl(tmp_path / "data.jsonl", _rows(30))
    cache = tmp_path / "cache"
    cache.mkdir()
    stale_tmp = cache / ".0123abcd.tmp-999999-deadbeef"  # another entry's build, killed by the OOM killer
    make_tmp(stale_tmp)
    (stale_tmp / "tokens.npy").write_bytes(b"\0" * 4096)
    (cache / ".0123abcd.lock").write_text("")
    ds = PackedSFTDataset("llama3", data, 16, cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir()) == [ds.path.name]


def _user_dirs_named_like_leftovers(where, name):
    """A user's directories (and a symlink) that merely have the names of a build's leftovers."""
    (tmp := where / f".{name}.tmp-draft").mkdir()
    (tmp / "thesis.tex").write_text("chapter 1")
    (old := where / f".{name}.old-2024").mkdir()
    (old / "settings.ini").write_text("[user]")
    (where / "elsewhere").mkdir()
    (where / "elsewhere" / "keep.txt").write_text("keep")
    (where / f".{name}.tmp-link").symlink_to(where / "elsewhere")
    return {tmp / "thesis.tex": "chapter 1", old / "settings.ini": "[user]", where / "elsewhere" / "keep.txt": "keep"}


def test_only_what_sftpack_marked_is_cleaned_as_a_leftover(tmp_path):
    """Cleanup deletes a directory only when sftpack can tell it made it (its mark inside,
    a complete store of its own, or an empty one): a user's `.NAME.tmp-*`/`.NAME.old-*`
    directories beside --out or in a cache, and symlinks named so, are left alone."""
    data = _jsonl(tmp_path / "data.jsonl", _rows(30))
    cache = tmp_path / "cache"
    cache.mkdir()
    files = _user_dirs_named_like_leftovers(cache, "0123abcd")
    files |= _user_dirs_named_like_leftovers(tmp_path, "store")
    PackedSFTDataset("llama3", data, 16, cache_dir=cache)
    build(data, tmp_path / "store", make_options(seq_length=16), "llama3", progress=False)
    for path, text in files.items():
        assert path.read_text() == text
    assert (tmp_path / ".store.tmp-link").is_symlink()


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    data = _big(tmp_path / "big.jsonl", 12_000)
    out = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "sftpack.cli", "build", str(data), "--out", str(out),
                             "--seq-length", "64", "--quiet", "--workers", "1"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(n.startswith(".store.tmp-") for n in os.listdir(tmp_path)):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip() == "sftpack: terminated"
    assert not out.exists() and _litter(out) == []


def test_same_size_copy_keeping_the_mtime_is_a_change(tmp_path, llama3, monkeypatch):
    """`cp -p` / `rsync -t` of other bytes of the same size between the stamp and the hash."""
    from sftpack.errors import InputError
    from sftpack.records import RecordReader

    data = _jsonl(tmp_path / "data.jsonl", _rows(30))
    twin = tmp_path / "twin.jsonl"
    twin.write_bytes(data.read_bytes().replace(b"Question", b"Qvestion"))
    stat = data.stat()

    class Replaced(RecordReader):
        def __init__(self, paths):
            super().__init__(paths)
            os.replace(twin, data)
            os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    monkeypatch.setattr(sftpack.build, "RecordReader", Replaced)
    with pytest.raises(InputError, match="changed while it was read"):
        build(data, tmp_path / "store", OPTIONS, llama3, progress=False)


def test_a_cache_entry_named_dot_dot_never_cleans_beside_the_cache(tmp_path):
    """`cache/..tmp-x` names the target `..`: the sweep must not clean the cache's parent."""
    data = _jsonl(tmp_path / "data.jsonl", _rows(30))
    cache = tmp_path / "cache"
    cache.mkdir()
    make_tmp(cache / "..tmp-x")
    make_tmp(tmp_path / ".cache.tmp-user")  # beside the cache: not the sweep's business
    PackedSFTDataset("llama3", data, 16, cache_dir=cache)
    assert (tmp_path / ".cache.tmp-user").is_dir()


def test_a_plan_that_fails_at_commit_names_the_output_not_the_temporary_directory(tmp_path):
    data = _jsonl(tmp_path / "data.jsonl", _rows(2))
    with pytest.raises(sftpack.ConfigError) as err:
        build(data, tmp_path / "out", make_options(seq_length=4096), "llama3", progress=False)
    assert str(err.value).startswith(f"{tmp_path / 'out'}: ") and ".tmp-" not in str(err.value)
    assert not (tmp_path / "out").exists() and _litter(tmp_path / "out") == []
