"""Builds are atomic and reproducible: SIGKILL at any point never leaves a store that
opens half-written, exceptions re-raise unchanged and commit nothing, the fingerprint
tracks exactly what decides the bytes, and out-of-vocabulary ids are located."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import sftpack.build
import sftpack.store
from sftpack.build import BuildOptions, build
from sftpack.errors import InputError, StoreError
from sftpack.store import MANIFEST, StoreWriter, make_tmp, open_store, read_manifest
from sftpack.tokenizers import Encoded, QuicktokTokenizer, load_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:.*special-token strings:UserWarning")


# --------------------------------------------------------------------------- helpers


def _write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _rows(n: int, tag: str = "") -> list[dict]:
    return [
        {"prompt": f"{tag}Question {i}: how many legs do {i} spiders have?",
         "response": f"{tag}{i} spiders have {8 * i} legs. Item {i} is done."}
        for i in range(n)
    ]


def _files(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.iterdir())}


def _litter(target: Path) -> list[str]:
    prefix = f".{target.name}."
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(prefix))


def _fp(store: Path) -> str:
    return read_manifest(store)["fingerprint"]


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer("llama3", threads=1)


def _gen_big(path: Path, target_bytes: int, seed: int) -> Path:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyzéüß"
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(4000)]
    vocab += ["日本語", "🚀", "x=1;", "[2]", "123456", "don't"]
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        i = 0
        while size < target_bytes:
            row = {"prompt": f"{i}: " + " ".join(rng.choices(vocab, k=rng.randint(20, 80))),
                   "response": " ".join(rng.choices(vocab, k=rng.randint(40, 160)))}
            line = json.dumps(row, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode())
            i += 1
    return path


# --------------------------------------------------------------------------- SIGKILL


def test_sigkill_at_20_random_points_never_leaves_a_half_store(tmp_path, llama3):
    data = _gen_big(tmp_path / "big.jsonl", 7_000_000, seed=1)
    seq, seed = 256, 11

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "sftpack.cli", "build", str(data), "--out", str(out), "--seq-length", str(seq),
                "--workers", "1", "--shuffle", "--seed", str(seed), "--quiet"]

    ref = tmp_path / "ref" / "store"
    started = time.perf_counter()
    proc = subprocess.run(cmd(ref), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    full = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    reference = _files(ref)
    assert set(reference) == {"tokens.npy", "loss_mask.npy", "doc_offsets.npy", MANIFEST}
    open_store(ref, verify=True)

    target = tmp_path / "work" / "store"
    target.parent.mkdir()
    options = BuildOptions(seq_length=seq, shuffle=True, seed=seed)
    rng = random.Random(20240611)
    n = 20
    # stratified over the whole run (start-up, encoding, shuffling, commit) and a bit past it
    delays = [(i + rng.random()) / n * 1.25 * full for i in range(n)]
    rng.shuffle(delays)
    outcomes = {"killed_before_commit": 0, "committed": 0, "exited": 0, "tmp_left": 0}
    for delay in delays:
        errlog = open(tmp_path / "stderr.txt", "w+")
        p = subprocess.Popen(cmd(target), stdout=subprocess.DEVNULL, stderr=errlog, cwd=tmp_path)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        rc = p.wait(timeout=60)
        errlog.seek(0)
        assert rc in (0, -signal.SIGKILL), f"rc={rc}: {errlog.read()}"
        errlog.close()
        if rc == 0:
            outcomes["exited"] += 1
        if any(name.startswith(f".{target.name}.tmp-") for name in _litter(target)):
            outcomes["tmp_left"] += 1
        committed = target.exists()
        if committed:
            # the kill came after the rename: the store is complete, valid and exact
            store = open_store(target, verify=True)
            assert len(store.tokens) == store.manifest["counts"]["tokens"]
            del store
            assert _files(target) == reference
            outcomes["committed"] += 1
        else:
            assert rc != 0, "the build exited 0 without a store at its target"
            with pytest.raises(StoreError):
                open_store(target)
            outcomes["killed_before_commit"] += 1

        summary = build(data, target, options, llama3, workers=1, progress=False)
        assert summary.reused == committed
        assert _files(target) == reference, f"rerun after a kill at {delay:.3f}s differs from the reference"
        assert _litter(target) == [], f"litter after the rerun (kill at {delay:.3f}s): {_litter(target)}"
        shutil.rmtree(target)
    print(f"full build {full:.2f}s; outcomes {outcomes}")
    assert outcomes["killed_before_commit"] >= 1, outcomes
    assert sum(outcomes[k] for k in ("killed_before_commit", "committed")) == n


@pytest.mark.parametrize("state", ["old_left_after_commit", "old_and_tmp_left_before_commit", "tmp_left"])
def test_rerun_clears_what_a_killed_commit_left(tmp_path, llama3, state):
    """The states a SIGKILL inside `StoreWriter.commit` (or before it) can leave behind,
    reproduced exactly; the rerun must leave no `.NAME.tmp-*`/`.NAME.old-*` behind."""
    data = _write_jsonl(tmp_path / "data.jsonl", _rows(20))
    options = BuildOptions(seq_length=16)
    ref = tmp_path / "ref" / "store"
    build(data, ref, options, llama3, progress=False)
    reference = _files(ref)
    target = tmp_path / "work" / "store"
    target.parent.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    old = target.parent / f".store.old-{dead.pid}-0badc0de"
    tmp = target.parent / f".store.tmp-{dead.pid}-5eedf00d"
    if state == "old_left_after_commit":  # killed between os.replace(tmp, target) and rmtree(old)
        shutil.copytree(ref, target)
        shutil.copytree(ref, old)
    elif state == "old_and_tmp_left_before_commit":  # killed between os.replace(target, old) and (tmp, target)
        shutil.copytree(ref, old)
        shutil.copytree(ref, tmp)
    else:  # killed while writing
        make_tmp(tmp)
        (tmp / "tokens.npy").write_bytes(b"\0" * 4096)
    summary = build(data, target, options, llama3, progress=False)
    # a previous store moved aside by a killed commit is put back (and, matching, reused)
    assert summary.reused == state.startswith("old")
    assert _files(target) == reference
    assert _litter(target) == [], _litter(target)


@pytest.mark.parametrize("damage", ["truncate_tokens", "delete_loss_mask"])
def test_damaged_store_at_the_target_is_rebuilt_not_reused(tmp_path, llama3, damage):
    """A store whose manifest matches but whose arrays are damaged is not up to date."""
    data = _write_jsonl(tmp_path / "data.jsonl", _rows(20))
    options = BuildOptions(seq_length=16)
    target = tmp_path / "store"
    build(data, target, options, llama3, progress=False)
    reference = _files(target)
    if damage == "truncate_tokens":
        with open(target / "tokens.npy", "r+b") as f:
            f.truncate(256)
    else:
        (target / "loss_mask.npy").unlink()
    with pytest.raises(StoreError):
        open_store(target)
    summary = build(data, target, options, llama3, progress=False)
    assert not summary.reused, "a damaged store was reported as an up-to-date one"
    assert _files(target) == reference
    open_store(target, verify=True)


# --------------------------------------------------------------------------- exceptions


class Boom(Exception):
    pass


class BoomBase(BaseException):  # like KeyboardInterrupt: not an Exception
    pass


def _inject(monkeypatch, where: str, exc: BaseException) -> dict[str, int]:
    calls = {"n": 0}

    def on_nth(fn, nth, after=False):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == nth and not after:
                raise exc
            out = fn(*args, **kwargs)
            if calls["n"] == nth and after:
                raise exc
            return out

        return wrapper

    if where == "encode_documents":
        monkeypatch.setattr(sftpack.build, "encode_documents", on_nth(sftpack.build.encode_documents, 2))
    elif where.startswith("append"):
        monkeypatch.setattr(StoreWriter, "append", on_nth(StoreWriter.append, 2))
    elif where == "render_in_reader_thread":
        monkeypatch.setattr(sftpack.build, "_render", on_nth(sftpack.build._render, 5))
    elif where == "after_encoding":
        monkeypatch.setattr(sftpack.build, "_encode_all", on_nth(sftpack.build._encode_all, 1, after=True))
    elif where == "checksum_in_commit":
        monkeypatch.setattr(sftpack.store, "checksum", on_nth(sftpack.store.checksum, 2))
    else:
        raise AssertionError(where)
    return calls


@pytest.mark.parametrize("previous", [False, True], ids=["no_previous", "previous_store"])
@pytest.mark.parametrize(
    "where, exc_type",
    [
        ("encode_documents", Boom),
        ("append", Boom),
        ("append_base", BoomBase),
        ("render_in_reader_thread", BoomBase),
        ("after_encoding", Boom),
        ("checksum_in_commit", Boom),
    ],
)
def test_exception_inside_build_reraises_the_original_and_commits_nothing(
    tmp_path, monkeypatch, llama3, where, exc_type, previous
):
    data = _write_jsonl(tmp_path / "data.jsonl", _rows(40))
    target = tmp_path / "out" / "store"
    before = None
    if previous:
        build(data, target, BuildOptions(seq_length=16), llama3, progress=False)
        before = _files(target)
    monkeypatch.setattr(sftpack.build, "BATCH_CHARS", 600)  # several batches
    exc = exc_type("injected failure")
    calls = _inject(monkeypatch, where, exc)
    options = BuildOptions(seq_length=32, train_on_prompt=False)  # other masks than the previous store
    with pytest.raises(exc_type) as info:
        build(data, target, options, llama3, progress=False)
    assert info.value is exc
    assert calls["n"] >= (1 if where == "after_encoding" else 2)
    if previous:
        assert _files(target) == before, "the previous store was modified"
        open_store(target, verify=True)
        assert read_manifest(target)["plan"]["seq_length"] == 16
    else:
        assert not target.exists()
    assert _litter(target) == [], _litter(target)
    assert sorted(p.name for p in target.parent.iterdir()) == (["store"] if previous else [])
    # nothing stays broken: the same build succeeds once the fault is gone
    monkeypatch.undo()
    summary = build(data, target, options, llama3, progress=False)
    assert not summary.reused and read_manifest(target)["plan"]["seq_length"] == 32
    assert _litter(target) == []


# --------------------------------------------------------------------------- fingerprint and cache


@pytest.fixture
def data(tmp_path) -> Path:
    return _write_jsonl(tmp_path / "data.jsonl", _rows(25))


def _rebuilds(first: BuildOptions, second: BuildOptions, data_first: Path, data_second: Path, tok_first, tok_second,
              out: Path) -> None:
    s1 = build(data_first, out, first, tok_first, progress=False)
    fp1 = _fp(out)
    again = build(data_first, out, first, tok_first, progress=False)
    assert not s1.reused and again.reused and _fp(out) == fp1
    s2 = build(data_second, out, second, tok_second, progress=False)
    assert not s2.reused, "a change that decides the bytes did not trigger a rebuild"
    assert _fp(out) != fp1
    open_store(out, verify=True)


def test_changing_one_input_byte_rebuilds(tmp_path, data, llama3):
    raw = bytearray(data.read_bytes())
    pos = raw.index(b"spiders have", len(raw) // 2)
    edited = tmp_path / "edited.jsonl"
    raw[pos] = ord("S")
    edited.write_bytes(bytes(raw))
    assert len(raw) == data.stat().st_size
    opts = BuildOptions(seq_length=16)
    _rebuilds(opts, opts, data, edited, llama3, llama3, tmp_path / "store")
    # and the same edit in place, under the same name
    out = tmp_path / "cache_dir"
    s1 = build(data, None, opts, llama3, cache_dir=out, progress=False)
    data.write_bytes(bytes(raw))
    s2 = build(data, None, opts, llama3, cache_dir=out, progress=False)
    assert not s2.reused and s1.path != s2.path and s2.path.parent == s1.path.parent
    assert s2.path.name == _fp(s2.path) and s1.path.name == _fp(s1.path)


def test_changing_the_template_rebuilds(tmp_path, data, llama3):
    _rebuilds(BuildOptions(seq_length=16), BuildOptions(seq_length=16, template="{prompt}\n{response}"),
              data, data, llama3, llama3, tmp_path / "store")


def test_changing_seq_length_replans_without_rebuilding(tmp_path, data, llama3):
    """seq_length decides rows, not tokens: the store (its fingerprint and array bytes) stays,
    only the defaults it opens with change."""
    out = tmp_path / "store"
    build(data, out, BuildOptions(seq_length=16), llama3, progress=False)
    fp, arrays = _fp(out), {k: v for k, v in _files(out).items() if k != MANIFEST}
    s2 = build(data, out, BuildOptions(seq_length=17, shuffle=True, seed=1, boundaries=True), llama3, progress=False)
    assert s2.reused and _fp(out) == fp
    assert {k: v for k, v in _files(out).items() if k != MANIFEST} == arrays
    manifest = read_manifest(out)
    assert manifest["plan"]["seq_length"] == 17 and manifest["plan"]["seed"] == 1 and manifest["view"]["boundaries"]
    open_store(out, verify=True)


def test_changing_train_on_prompt_rebuilds(tmp_path, data, llama3):
    _rebuilds(BuildOptions(seq_length=16), BuildOptions(seq_length=16, train_on_prompt=False), data, data, llama3,
              llama3, tmp_path / "store")


def test_adding_a_token_to_the_tokenizer_rebuilds(tmp_path, data, hf_llama3):
    n_before = len(hf_llama3)
    extended = copy.deepcopy(hf_llama3)
    assert extended.add_tokens(["<sftpack_extra_token>"]) == 1
    assert len(extended) == n_before + 1
    assert len(hf_llama3) == n_before, "the shared fixture was modified"
    opts = BuildOptions(seq_length=16)
    _rebuilds(opts, opts, data, data, hf_llama3, extended, tmp_path / "store")
    assert read_manifest(tmp_path / "store")["tokenizer"]["vocab_size"] == n_before + 1
    assert len(hf_llama3) == n_before and "<sftpack_extra_token>" not in hf_llama3.get_vocab()


def test_working_directory_does_not_rebuild(tmp_path, data, llama3, monkeypatch):
    out = tmp_path / "store"
    opts = BuildOptions(seq_length=16, shuffle=True, seed=3)
    monkeypatch.chdir(tmp_path)
    s1 = build("data.jsonl", out, opts, llama3, progress=False)
    before = _files(out)
    elsewhere = tmp_path / "a" / "b"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    s2 = build("../../data.jsonl", out, opts, llama3, progress=False)
    assert not s1.reused and s2.reused
    assert _files(out) == before
    # the same bytes under another name and directory are the same input
    shutil.copy(data, elsewhere / "copy.jsonl")
    s3 = build("copy.jsonl", out, opts, llama3, progress=False)
    assert s3.reused and _files(out) == before


def test_mtime_alone_does_not_rebuild(tmp_path, data, llama3):
    out = tmp_path / "store"
    opts = BuildOptions(seq_length=16)
    assert not build(data, out, opts, llama3, progress=False).reused
    before = _files(out)
    st = data.stat()
    os.utime(data, (st.st_atime + 86_400, st.st_mtime + 86_400))
    assert data.stat().st_mtime != st.st_mtime
    assert build(data, out, opts, llama3, progress=False).reused
    assert _files(out) == before


def test_worker_count_does_not_rebuild_or_change_bytes(tmp_path, data):
    opts = BuildOptions(seq_length=16, shuffle=True, seed=3)
    a, b = tmp_path / "a", tmp_path / "b"
    assert not build(data, a, opts, "llama3", workers=1, progress=False).reused
    before = _files(a)
    assert build(data, a, opts, "llama3", workers=2, progress=False).reused
    assert build(data, a, opts, "llama3", workers=0, progress=False).reused
    assert _files(a) == before
    assert not build(data, b, opts, "llama3", workers=2, progress=False).reused
    assert _files(b) == before


def test_pythonhashseed_does_not_change_the_fingerprint_or_bytes(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": f"Say {i} <|eot_id|> twice, {{braces}} and café"},
                      {"role": "assistant", "content": f"{i} {i}"}]}
        for i in range(20)
    ]
    data = _write_jsonl(tmp_path / "chat.jsonl", rows)
    script = textwrap.dedent(
        """
        import json, sys, warnings
        warnings.simplefilter("ignore")
        from sftpack.build import BuildOptions, build
        opts = BuildOptions(seq_length=32, template="chat", shuffle=True, seed=5)
        s = build(sys.argv[1], sys.argv[2], opts, "llama3", progress=False)
        with open(sys.argv[2] + "/manifest.json") as f:
            print(json.dumps({"fingerprint": json.load(f)["fingerprint"], "reused": s.reused}))
        """
    )
    results = []
    for hashseed, out in [("0", "a"), ("1", "a"), ("4242", "b")]:
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        proc = subprocess.run([sys.executable, "-c", script, str(data), str(tmp_path / out)],
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert [r["reused"] for r in results] == [False, True, False]
    assert len({r["fingerprint"] for r in results}) == 1
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_same_inputs_and_seed_give_byte_identical_stores(tmp_path, data, llama3, monkeypatch):
    opts = BuildOptions(seq_length=16, shuffle=True, seed=3)
    s1 = build(data, tmp_path / "one", opts, llama3, progress=False)
    s2 = build(data, tmp_path / "two", opts, "llama3", progress=False)
    assert not s1.reused and not s2.reused and s1.seed == s2.seed == 3
    one = _files(tmp_path / "one")
    assert one == _files(tmp_path / "two")
    # the batch size is a memory knob, not part of the result
    monkeypatch.setattr(sftpack.build, "BATCH_CHARS", 300)
    build(data, tmp_path / "three", opts, llama3, progress=False)
    assert _files(tmp_path / "three") == one
    # the seed is the plan's, not the store's: another seed, the same store bytes, other rows
    build(data, tmp_path / "four", BuildOptions(seq_length=16, shuffle=True, seed=4), llama3, progress=False)
    assert {k: v for k, v in _files(tmp_path / "four").items() if k != MANIFEST} == \
        {k: v for k, v in one.items() if k != MANIFEST}
    from sftpack import open_packed

    t3, t4 = open_packed(tmp_path / "three").view.stream()[0], open_packed(tmp_path / "four").view.stream()[0]
    assert len(t3) == len(t4) and not np.array_equal(t3, t4)
    assert sorted(t3.tolist()) == sorted(t4.tolist())


def test_dataset_cache_dir_reuses_the_fingerprinted_store(tmp_path, data):
    from sftpack import PackedSFTDataset

    cache = tmp_path / "cache"
    ds1 = PackedSFTDataset("llama3", data, seq_length=16, cache_dir=cache)
    ds2 = PackedSFTDataset("llama3", data, seq_length=16, cache_dir=cache)
    assert not ds1.summary.reused and ds2.summary.reused
    assert ds1.path == ds2.path == cache / _fp(ds1.path)
    # plan and view options re-plan the same store: no new entry, unseeded shuffles included
    for kwargs in ({"seq_length": 17}, {"seq_length": 16, "shuffle": True}, {"seq_length": 16, "shuffle": True},
                   {"seq_length": 64, "packing": "bfd", "boundaries": True}):
        ds = PackedSFTDataset("llama3", data, cache_dir=cache, **kwargs)
        assert ds.summary.reused and ds.path == ds1.path and ds.seq_length == kwargs["seq_length"]
    ds3 = PackedSFTDataset("llama3", data, seq_length=16, cache_dir=cache, train_on_prompt=False)
    assert not ds3.summary.reused and ds3.path != ds1.path
    assert sorted(p.name for p in cache.iterdir()) == sorted([ds1.path.name, ds3.path.name])


# --------------------------------------------------------------------------- out-of-vocabulary ids


class SmallVocab(QuicktokTokenizer):
    """llama3 that claims a 1,000-id vocabulary: ordinary text ids fall outside it."""

    def __init__(self) -> None:
        super().__init__("llama3", threads=1)
        self.vocab_size = 1000


class Poisoned(QuicktokTokenizer):
    """llama3 whose encoding of any text containing POISON holds one out-of-range id."""

    def __init__(self, bad_id: int) -> None:
        super().__init__("llama3", threads=1)
        self.bad_id = bad_id

    def encode(self, texts, *, positions=False):
        enc = super().encode(texts, positions=positions)
        ids = np.asarray(enc.ids, dtype=np.int64).copy()
        for i, text in enumerate(texts):
            if "POISON" in text and enc.offsets[i + 1] > enc.offsets[i]:
                ids[enc.offsets[i + 1] - 1] = self.bad_id
        return Encoded(ids, enc.offsets, enc.ends)


def test_out_of_vocabulary_id_names_the_first_record(tmp_path, jsonl):
    path = jsonl(_rows(5))
    with pytest.raises(InputError, match=r"data\.jsonl:1: token id \d+ is outside the vocabulary") as info:
        build(path, tmp_path / "store", BuildOptions(seq_length=8), SmallVocab(), progress=False)
    assert info.value.line == 1 and info.value.source == str(path)
    assert not (tmp_path / "store").exists() and _litter(tmp_path / "store") == []


@pytest.mark.parametrize("bad_id", [128_256, 1 << 32, -1])
@pytest.mark.parametrize("shuffle", [False, True])
def test_out_of_vocabulary_id_names_its_record(tmp_path, jsonl, monkeypatch, bad_id, shuffle):
    rows = _rows(12)
    rows[8]["response"] += " POISON"  # line 9, in a later batch
    first = jsonl(_rows(3, tag="first file "), name="a.jsonl")
    path = jsonl(rows, name="data.jsonl")
    monkeypatch.setattr(sftpack.build, "BATCH_CHARS", 500)
    tok = Poisoned(bad_id)
    with pytest.raises(InputError, match=rf"data\.jsonl:9: token id {bad_id} is outside the vocabulary") as info:
        build([first, path], tmp_path / "store", BuildOptions(seq_length=8, shuffle=shuffle, seed=1), tok,
              progress=False)
    assert info.value.line == 9 and info.value.source == str(path)
    assert not (tmp_path / "store").exists() and _litter(tmp_path / "store") == []
    # the same files without the poison build fine with the same tokenizer
    rows[8]["response"] = rows[8]["response"].replace(" POISON", "")
    jsonl(rows, name="data.jsonl")
    assert build([first, path], tmp_path / "store", BuildOptions(seq_length=8), tok, progress=False).documents == 15
