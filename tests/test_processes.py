"""The local build in several forked processes (one per core, by byte ranges of the input):
the same store as one process builds, the same errors at the same file:line, and nothing
published when a process dies."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

import sftpack.build as build_module
from sftpack.build import BuildOptions, build
from sftpack.errors import InputError, SFTPackError

WORDS = "the of and to in a is that for café 日本 🚀 <|eot_id|> def return 42".split()


@pytest.fixture
def small_ranges(monkeypatch):
    """Fork for any input, reading about 4 KB per range (many ranges in a small file)."""
    monkeypatch.setattr(build_module, "PROCESS_BYTES", 0)
    monkeypatch.setattr(build_module, "PROCESS_RANGE", (1, 4096))


def _chat(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": "Be brief."}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 30)))})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 60)))})
        rows.append({"messages": messages})
    return rows


def _files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


@pytest.mark.parametrize("train_on_prompt", [True, False])
def test_processes_build_the_store_one_process_builds(tmp_path, jsonl, small_ranges, train_on_prompt, monkeypatch):
    a = jsonl(_chat(300), "a.jsonl")
    b = jsonl(_chat(200, seed=1), "b.jsonl")
    opts = BuildOptions(seq_length=128, template="chat", train_on_prompt=train_on_prompt, packing="bfd")
    forked = []
    original = build_module._encode_forked

    def spy(*args, **kwargs):
        forked.append(args[6])
        return original(*args, **kwargs)

    monkeypatch.setattr(build_module, "_encode_forked", spy)
    one = build([a, b], tmp_path / "one", opts, "llama3", workers=1, progress=False)
    assert not forked
    two = build([a, b], tmp_path / "two", opts, "llama3", workers=2, progress=False)
    assert forked == [2]
    assert (one.documents, one.tokens, one.supervised_tokens, one.special_token_documents) == (
        two.documents,
        two.tokens,
        two.supervised_tokens,
        two.special_token_documents,
    )
    assert one.special_token_documents > 0  # injections counted across ranges too
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_an_error_in_a_later_range_names_the_file_line(tmp_path, jsonl, small_ranges):
    rows: list = _chat(200)
    rows[150] = '{"messages": [{"role": "user", "content": "x"}'  # truncated line
    path = jsonl(rows)
    opts = BuildOptions(seq_length=128, template="chat")
    messages = []
    for workers in (1, 2):
        with pytest.raises(InputError) as info:
            build(path, tmp_path / f"out{workers}", opts, "llama3", workers=workers, progress=False)
        messages.append(str(info.value))
        assert not (tmp_path / f"out{workers}").exists()
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"{path}:151:")
    assert os.path.getsize(path) > 4 * 4096  # the line lies in a later range


def test_a_blank_file_among_others_is_refused_as_one_process_refuses_it(tmp_path, jsonl, small_ranges):
    good = jsonl(_chat(100), "a.jsonl")
    blank = tmp_path / "b.jsonl"
    blank.write_text("\n\n   \n", encoding="utf-8")
    for workers in (1, 2):
        with pytest.raises(InputError, match=rf"^{blank}: the file holds no documents"):
            build([good, blank], tmp_path / f"out{workers}", BuildOptions(seq_length=64, template="chat"), "llama3",
                  workers=workers, progress=False)


def test_a_process_that_dies_publishes_nothing_and_says_what_to_do(tmp_path, jsonl, small_ranges, monkeypatch):
    path = jsonl(_chat(200))
    out = tmp_path / "out"
    opts = BuildOptions(seq_length=128, template="chat")
    build(path, out, opts, "llama3", workers=1, progress=False)
    before = _files(out)
    monkeypatch.setattr(build_module, "_encode_shard", _dies)
    changed = jsonl(_chat(200, seed=5))  # another input: the store at `out` must be rebuilt
    with pytest.raises(SFTPackError, match=r"a build process died.*--workers 1"):
        build(changed, out, opts, "llama3", workers=2, progress=False)
    assert _files(out) == before  # the previous store is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "out"]  # no temporary directory left


_ENCODE_SHARD = build_module._encode_shard


def _dies(shard):  # module-level: the pool sends functions by name
    if shard["index"] == 2:
        os._exit(9)  # killed (out of memory, a signal)
    return _ENCODE_SHARD(shard)


def test_small_or_non_jsonl_inputs_stay_in_one_process(tmp_path, jsonl, monkeypatch):
    rows = _chat(50)
    small = jsonl(rows)
    as_json = tmp_path / "data.json"
    as_json.write_text(json.dumps(rows), encoding="utf-8")
    calls = []
    monkeypatch.setattr(build_module, "_encode_forked", lambda *a, **k: calls.append(a))
    opts = BuildOptions(seq_length=64, template="chat")
    build(small, tmp_path / "a", opts, "llama3", workers=2, progress=False)  # under PROCESS_BYTES
    monkeypatch.setattr(build_module, "PROCESS_BYTES", 0)
    build(as_json, tmp_path / "b", opts, "llama3", workers=2, progress=False)  # not line-splittable
    build(small, tmp_path / "c", opts, "llama3", workers=1, progress=False)  # one worker asked for
    assert calls == []


@pytest.mark.parametrize("quicktok_agrees", [True, False])
def test_a_hugging_face_tokenizer_served_by_quicktok_is_forked_after_its_check(
    tmp_path, jsonl, small_ranges, monkeypatch, hf_llama3, quicktok_agrees
):
    """The HF tokenizer is checked against quicktok on the first documents in the building
    process (as a one-process build checks its first batch); forked processes then encode
    with quicktok, or, where it differs, the HF tokenizer encodes in this process."""
    from sftpack.tokenizers import AcceleratedTokenizer, load_tokenizer

    if not quicktok_agrees:

        def differs(self, texts):
            self.active = self.hf
            return False

        monkeypatch.setattr(AcceleratedTokenizer, "check_sample", differs)
    template = str(Path(__file__).parent / "data" / "chat_templates" / "llama3_1.jinja")
    path = jsonl(_chat(300))
    opts = BuildOptions(seq_length=128, template=template, train_on_prompt=False)
    in_parent = []
    original = build_module._encode_all

    def spy(*args, **kwargs):
        in_parent.append(kwargs.get("sample", True))
        return original(*args, **kwargs)

    monkeypatch.setattr(build_module, "_encode_all", spy)
    stores = {}
    for workers in (1, 2):
        tok = load_tokenizer(hf_llama3)
        assert isinstance(tok, AcceleratedTokenizer)
        in_parent.clear()
        build(path, tmp_path / f"out{workers}", opts, tok, workers=workers, progress=False)
        assert (tok.active is tok.fast) == quicktok_agrees
        if workers == 2:  # forked: the parent encodes nothing, unless the HF tokenizer must
            assert in_parent == ([] if quicktok_agrees else [False])
        stores[workers] = _files(tmp_path / f"out{workers}")
    assert stores[1] == stores[2]


def test_two_forked_builds_at_once_in_one_process_each_build_their_own_store(tmp_path, jsonl, small_ranges):
    """Each pool's workers get their own build's state as they are forked (a module global
    shared by two builds in two threads once mixed their options)."""
    import threading

    a = jsonl(_chat(200), "a.jsonl")
    b = jsonl(_chat(150, seed=2), "b.jsonl")
    jobs = {
        "a": (a, BuildOptions(seq_length=128, template="chat")),
        "b": (b, BuildOptions(seq_length=256, template="chat", train_on_prompt=False)),
    }
    for name, (path, opts) in jobs.items():
        build(path, tmp_path / f"ref_{name}", opts, "llama3", workers=1, progress=False)
    failures = []

    def run(name):
        path, opts = jobs[name]
        try:
            build(path, tmp_path / f"out_{name}", opts, "llama3", workers=2, progress=False)
        except Exception as exc:  # reported below
            failures.append(repr(exc))

    for _ in range(3):
        threads = [threading.Thread(target=run, args=(name,)) for name in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
        for name in jobs:
            assert _files(tmp_path / f"out_{name}") == _files(tmp_path / f"ref_{name}")


_SCRIPT = """
import os, signal, sys, time
sys.path.insert(0, {tests!r})
import sftpack.build as b
from sftpack.cli import main
b.PROCESS_BYTES = 0
b.PROCESS_RANGE = (1, {range_bytes})
encode = b._encode_shard

def slow(shard):
    with open({pids!r}, "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    if {mode!r} == "worker dies" and shard["index"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer does
    if {mode!r} == "parent killed":
        time.sleep(0.5)
    return encode(shard)

b._encode_shard = slow
sys.exit(main(["build", {data!r}, "--out", {out!r}, "--template", "chat", "--seq-length", "64", "--quiet",
               "--workers", "2"]))
"""


def _script(tmp_path, data, mode, range_bytes=4096):
    import subprocess
    import sys

    code = _SCRIPT.format(tests=str(Path(__file__).parent), pids=str(tmp_path / "pids"), mode=mode, data=str(data),
                          out=str(tmp_path / "out"), range_bytes=range_bytes)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0  # a zombie is dead


def test_a_worker_killed_fails_the_command_line_build_at_once(tmp_path, jsonl):
    """The pool ends the other workers with SIGTERM: they must not run the command line's
    SIGTERM handler (one caught writing its result retried forever, and the build hung)."""
    data = jsonl(_chat(3000))  # ranges whose results outgrow a pipe's buffer: a worker blocks writing one
    proc = _script(tmp_path, data, "worker dies", range_bytes=1 << 19)
    try:
        _, err = proc.communicate(timeout=90)
    except Exception:
        proc.kill()
        raise
    assert proc.returncode == 1 and "a build process died" in err, err
    assert not (tmp_path / "out").exists()


def test_a_killed_build_takes_its_workers_with_it(tmp_path, jsonl):
    """SIGKILL of the building process: its workers die too (they held its lock, and the
    next build of the same --out waited for them forever), and the next build succeeds."""
    import signal
    import time

    data = jsonl(_chat(400))
    proc = _script(tmp_path, data, "parent killed")
    pids: set[int] = set()
    for _ in range(200):
        if (tmp_path / "pids").exists():
            pids = {int(p) for p in (tmp_path / "pids").read_text().split()}
        if len(pids) >= 2:
            break
        time.sleep(0.05)
    assert len(pids) >= 2, proc.communicate(timeout=60)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)
    summary = build(data, tmp_path / "out", BuildOptions(seq_length=64, template="chat"), "llama3", workers=1,
                    progress=False)
    assert summary.documents == 400
