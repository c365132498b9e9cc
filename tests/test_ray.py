"""engine="ray": the same store, byte for byte, as the local build; faults; no ray import on the local path.

Ray starts once for the module, on loopback with two CPUs (7-12 s here), and its first tasks
start the workers (about as long again)."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_remote_inputs import moto_s3, upload  # noqa: F401  (S3 on loopback, moto's server)
from test_shuffle_and_tokenize import sp_tokenizer  # noqa: F401  (a SentencePiece tokenizer trained offline)

from sftpack import InputError
from sftpack.build import build
from sftpack.config import BuildOptions
from sftpack.store import make_tmp, open_store

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample.jsonl"


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")  # the optional dependency: `pip install sftpack[ray]` (in dev)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def shards(monkeypatch):
    """Small shards, and the results of every Ray map (one list per build)."""
    import sftpack.distributed as d

    monkeypatch.setattr(d, "SHARD_BYTES", 700)  # the sample: four ranges
    runs: list[list[dict]] = []
    run = d._run

    def recorded(*args):
        runs.append(run(*args))
        return runs[-1]

    monkeypatch.setattr(d, "_run", recorded)
    return runs


def same_store(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def same_rows(a: Path, b: Path, options: BuildOptions) -> int:
    from sftpack.view import View

    va, vb = View(open_store(a), options), View(open_store(b), options)
    assert len(va) == len(vb) > 0
    for i in range(len(va)):
        ra, rb = va.item(i), vb.item(i)
        assert ra.keys() == rb.keys() and all(np.array_equal(ra[k], rb[k]) for k in ra)
    return len(va)


def both(tmp_path: Path, inputs, options: BuildOptions, tokenizer=None, progress=False) -> tuple[Path, Path]:
    local, ray = tmp_path / "local", tmp_path / "ray"
    build(inputs, local, options, tokenizer, progress=False)
    build(inputs, ray, BuildOptions(**{**options.__dict__, "engine": "ray"}), tokenizer, progress=progress)
    return local, ray


def no_litter(parent: Path) -> None:
    assert [p.name for p in parent.iterdir() if p.name.startswith(".")] == []


def test_sample_is_byte_identical_with_one_bar_in_input_bytes(ray_local, shards, tmp_path, capsys):
    options = BuildOptions(seq_length=64)
    local, ray = both(tmp_path, SAMPLE, options, progress=True)
    assert len(shards[0]) > 1  # the sample was cut into several byte ranges
    same_store(local, ray)
    same_rows(local, ray, options)
    no_litter(tmp_path)
    bars = capsys.readouterr().err
    size = f"{SAMPLE.stat().st_size / 1000:.2f}k"
    assert f"{size}/{size}" in bars and bars.count("sftpack build") >= 1


def _chat(rng: random.Random, i: int) -> dict:
    words = "pack the documents into rows of tokens with masks and offsets for training".split()
    turns = []
    for t in range(rng.randint(1, 3)):
        turns.append({"role": "user", "content": f"q{i}.{t} " + " ".join(rng.choices(words, k=rng.randint(2, 40)))})
        turns.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 60)))})
    return {"messages": turns}


@pytest.fixture
def corpus(tmp_path) -> list[Path]:
    """Chat records in four formats; the .jsonl files are cut into several ranges."""
    rng = random.Random(11)
    folder = tmp_path / "corpus"
    folder.mkdir()
    recs = [_chat(rng, i) for i in range(260)]
    lines = [json.dumps(r) + "\n" for r in recs]
    (folder / "a.jsonl").write_text("".join(lines[:120]) + "\n", encoding="utf-8")  # a blank last line
    (folder / "b.json").write_text(json.dumps(recs[120:150]), encoding="utf-8")
    with gzip.open(folder / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(lines[150:180])
    (folder / "d.jsonl").write_text("".join(lines[180:240]).rstrip("\n"), encoding="utf-8")  # no final newline
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(recs[240:]), folder / "e.parquet")
    return sorted(folder.iterdir())


def test_generated_chat_corpus_is_byte_identical_under_a_shuffled_bfd_plan(
    ray_local, shards, tmp_path, corpus, monkeypatch
):
    monkeypatch.setattr("sftpack.distributed.SHARD_BYTES", 12000)
    options = BuildOptions(seq_length=128, template="chat", train_on_prompt=False, packing="bfd", shuffle=True, seed=3)
    local, ray = both(tmp_path, corpus, options)
    assert len(shards[0]) > len(corpus)  # files and byte ranges
    same_store(local, ray)
    rows = same_rows(local, ray, options)
    assert rows > 10
    assert same_rows(local, ray, BuildOptions(seq_length=50)) > rows  # and under another plan


def test_a_tokenizer_with_first_in_stream_variants(ray_local, shards, tmp_path, sp_tokenizer):  # noqa: F811
    options = BuildOptions(seq_length=64)
    local, ray = both(tmp_path, SAMPLE, options, tokenizer=sp_tokenizer)
    assert (local / "first_tokens.npy").is_file()
    same_store(local, ray)


def _with_bad_line(folder: Path, at: int) -> tuple[Path, int]:
    rng = random.Random(5)
    lines = [json.dumps(_chat(rng, i)) for i in range(100)]
    lines[at] = '{"messages": [{"role": "user", "content": "unterminated'
    path = folder / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, at + 1


def test_an_error_in_a_later_range_names_the_file_and_line_as_the_local_build(ray_local, shards, tmp_path, monkeypatch):
    monkeypatch.setattr("sftpack.distributed.SHARD_BYTES", 6000)
    path, line = _with_bad_line(tmp_path, 80)
    options = BuildOptions(seq_length=64, template="chat")
    with pytest.raises(InputError) as local:
        build(path, tmp_path / "local", options, progress=False)
    with pytest.raises(InputError) as ray:
        build(path, tmp_path / "ray", BuildOptions(seq_length=64, template="chat", engine="ray"))
    assert str(ray.value) == str(local.value) and f"{path}:{line}:" in str(ray.value)
    assert shards[0][-1]["error"] == "InputError" and shards[0][-1]["index"] > 0

    blank = tmp_path / "a-blank.jsonl"  # cut into ranges, none with a document: it fails first
    blank.write_text("\n" * 13000)
    with pytest.raises(InputError) as local:
        build([blank, path], tmp_path / "local", options, progress=False)
    with pytest.raises(InputError) as ray:
        build([blank, path], tmp_path / "ray", BuildOptions(seq_length=64, template="chat", engine="ray"))
    assert str(ray.value) == str(local.value) == f"{blank}: the file holds no documents (it is empty or blank)"


def test_s3_inputs_read_by_the_workers_give_the_local_store_and_errors(
    ray_local,
    shards,
    tmp_path,
    corpus,
    monkeypatch,
    moto_s3,  # noqa: F811
):
    """Workers open the URI themselves (byte ranges of a .jsonl by seek); the credentials
    travel in the URI here, as the workers started before the test's environment was set."""
    monkeypatch.setattr("sftpack.distributed.SHARD_BYTES", 12000)
    upload(moto_s3, "ray", corpus)
    options = BuildOptions(seq_length=128, template="chat", train_on_prompt=False)
    build(corpus, tmp_path / "local", options, progress=False)
    ray_options = BuildOptions(**{**options.__dict__, "engine": "ray"})
    build(moto_s3.uri("ray/*", credentials="testing:testing"), tmp_path / "ray", ray_options, progress=False)
    assert len(shards[0]) > len(corpus)  # files and byte ranges
    assert not any("testing" in str(r) for r in shards[0])  # no secret in what tasks return
    same_store(tmp_path / "local", tmp_path / "ray")
    no_litter(tmp_path)

    monkeypatch.setattr("sftpack.distributed.SHARD_BYTES", 6000)
    path, line = _with_bad_line(tmp_path, 80)
    upload(moto_s3, "bad", [path])
    with pytest.raises(InputError) as local:
        build(path, tmp_path / "bad-local", BuildOptions(seq_length=64, template="chat"), progress=False)
    with pytest.raises(InputError) as ray:
        uri = moto_s3.uri(f"bad/{path.name}", credentials="testing:testing")
        build(uri, tmp_path / "bad-ray", BuildOptions(seq_length=64, template="chat", engine="ray"))
    assert str(ray.value) == str(local.value).replace(str(path), f"s3://inputs/bad/{path.name}")
    assert f"s3://inputs/bad/{path.name}:{line}:" in str(ray.value) and shards[-1][-1]["index"] > 0

    import sftpack.distributed as d

    plan = d.plan_shards

    def then_replace(*args):  # after the driver planned the shards, before the tasks read them
        planned = plan(*args)
        moto_s3.put("ray/a.jsonl", (tmp_path / "corpus" / "a.jsonl").read_bytes().replace(b"q1.0", b"q9.0"))
        return planned

    monkeypatch.setattr(d, "plan_shards", then_replace)
    with pytest.raises(InputError, match=r"^s3://inputs/ray/a\.jsonl: the file changed since the build began"):
        build(moto_s3.uri("ray/*", credentials="testing:testing"), tmp_path / "moved", ray_options, progress=False)


class _Killed(KeyboardInterrupt):
    pass


def test_killed_driver_leaves_no_store_and_a_rerun_redoes_only_the_corrupted_shard(
    ray_local, shards, tmp_path, monkeypatch
):
    import sftpack.distributed as d

    options = BuildOptions(seq_length=64, engine="ray")
    out = tmp_path / "out"

    def killed(*args):
        raise _Killed()

    with monkeypatch.context() as m:
        m.setattr(d, "_reduce", killed)  # the driver dies after every task finished
        with pytest.raises(_Killed):
            build(SAMPLE, out, options)
    assert not out.exists()
    (staging,) = [p for p in tmp_path.iterdir() if ".tmp-shards-" in p.name]
    done = sorted(staging.glob("shard-*"))
    assert len(done) == len(shards[0]) > 2
    tokens = done[1] / "tokens.npy"
    data = bytearray(tokens.read_bytes())
    data[-1] ^= 1  # same size: only the checksum tells
    tokens.write_bytes(bytes(data))

    build(SAMPLE, out, options)
    assert [r["reused"] for r in shards[1]] == [i != 1 for i in range(len(done))]
    build(SAMPLE, tmp_path / "local", BuildOptions(seq_length=64), progress=False)
    same_store(tmp_path / "local", out)
    no_litter(tmp_path)

    with monkeypatch.context() as m:  # killed again: a local build of the target cleans the shards
        m.setattr(d, "_reduce", killed)
        with pytest.raises(_Killed):
            build(SAMPLE, out, options, force=True)
    assert any(".tmp-shards-" in p.name for p in tmp_path.iterdir())
    open_store(out)  # the previous store is untouched
    build(SAMPLE, out, BuildOptions(seq_length=64), force=True, progress=False)
    no_litter(tmp_path)


def test_a_task_whose_worker_dies_is_retried(ray_local, shards, tmp_path, monkeypatch):
    import sftpack.distributed as d

    marker = tmp_path / "died"

    def dies_once(job, shard):
        from sftpack.distributed import run_shard

        if shard["index"] == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # the worker process is lost, as on a dead node
        return run_shard(job, shard)

    monkeypatch.setattr(d, "run_shard", dies_once)
    local, ray = both(tmp_path, SAMPLE, BuildOptions(seq_length=64))
    assert marker.exists()
    same_store(local, ray)


def test_cli_engine_flag(ray_local, shards, tmp_path, capsys):
    from sftpack.cli import main

    assert main(["build", str(SAMPLE), "--out", str(tmp_path / "s"), "--seq-length", "64", "--engine", "ray"]) == 0
    assert "built store" in capsys.readouterr().out
    build(SAMPLE, tmp_path / "local", BuildOptions(seq_length=64), progress=False)
    same_store(tmp_path / "local", tmp_path / "s")
    argv = ["build", str(SAMPLE), "--out", str(tmp_path / "t"), "--seq-length", "64", "--ray-address", "x:1"]
    assert main(argv) == 1
    assert "needs engine='ray'" in capsys.readouterr().err


def test_import_and_a_local_build_never_import_ray(tmp_path):
    code = (
        "import sys, sftpack\n"
        "from sftpack.build import build\n"
        "from sftpack.config import BuildOptions\n"
        "import sftpack.cli\n"
        f"build({str(SAMPLE)!r}, {str(tmp_path / 's')!r}, BuildOptions(seq_length=64), progress=False)\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert (tmp_path / "s" / "manifest.json").is_file()


def test_packed_dataset_takes_engine_ray(ray_local, shards):
    from sftpack import PackedSFTDataset

    local = PackedSFTDataset(None, SAMPLE, 48, packing="bfd")
    ray = PackedSFTDataset(None, SAMPLE, 48, packing="bfd", engine="ray")
    assert len(ray) == len(local) > 1
    for i in range(len(local)):
        assert all(local[i][k].equal(ray[i][k]) for k in local[i])


def test_a_cache_dir_build_reuses_its_shards_after_a_killed_driver(ray_local, shards, tmp_path, monkeypatch):
    import sftpack.distributed as d

    options = BuildOptions(seq_length=64, engine="ray")
    with monkeypatch.context() as m:
        m.setattr(d, "_reduce", lambda *a: (_ for _ in ()).throw(_Killed()))
        with pytest.raises(_Killed):
            build(SAMPLE, None, options, cache_dir=tmp_path)
    summary = build(SAMPLE, None, options, cache_dir=tmp_path)  # the cache's sweep keeps this build's shards
    assert [r["reused"] for r in shards[1]] == [True] * len(shards[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == [summary.path.name]


def test_a_users_directory_or_symlink_at_the_staging_name_is_never_written_or_deleted(ray_local, tmp_path):
    """Only a staging directory sftpack marked is used (and cleaned); a shard path that is a
    symlink (to a user's store, say) is unlinked, never followed."""
    from sftpack.distributed import staging_dir
    from sftpack.errors import StoreError

    options = BuildOptions(seq_length=64, engine="ray")
    build(SAMPLE, tmp_path / "a", BuildOptions(seq_length=64), progress=False)
    staging = staging_dir(tmp_path / "out", open_store(tmp_path / "a").fingerprint)
    staging.mkdir()
    (staging / "MY_THESIS.txt").write_text("years of work")
    with pytest.raises(StoreError, match="not a staging directory of sftpack's"):
        build(SAMPLE, tmp_path / "out", options, progress=False)
    assert (staging / "MY_THESIS.txt").read_text() == "years of work"
    (staging / "MY_THESIS.txt").rename(tmp_path / "thesis.txt")
    staging.rmdir()
    staging.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(StoreError, match="not a staging directory of sftpack's"):
        build(SAMPLE, tmp_path / "out", options, progress=False)
    assert list((tmp_path / "elsewhere").iterdir()) == []
    staging.unlink()
    make_tmp(staging)
    user_store = tmp_path / "a"  # a user's production store, linked where a shard would be
    before = {p.name: p.read_bytes() for p in user_store.iterdir()}
    (staging / "shard-000000").symlink_to(user_store, target_is_directory=True)
    build(SAMPLE, tmp_path / "out", options, progress=False)
    assert {p.name: p.read_bytes() for p in user_store.iterdir()} == before
    same_store(tmp_path / "out", tmp_path / "a")


@pytest.mark.parametrize("chunk", [64, 1000], ids=["several_chunks_per_shard", "chunks_across_shards"])
def test_reduce_by_offsets_reads_no_array_byte_on_the_driver(ray_local, shards, tmp_path, monkeypatch, chunk):
    """Tasks copy their shard's part of every array and hash the chunks that begin in it
    (those running past it with the next shards' heads): the driver reads no array byte."""
    import sftpack.store

    monkeypatch.setattr(sftpack.store, "CHUNK", chunk)
    options = BuildOptions(seq_length=64)
    build(SAMPLE, tmp_path / "local", options, progress=False)
    read: list[int] = []
    real = sftpack.store._chunk_digest
    monkeypatch.setattr(sftpack.store, "_chunk_digest", lambda b: read.append(len(b)) or real(b))
    build(SAMPLE, tmp_path / "ray", BuildOptions(seq_length=64, engine="ray"), progress=False)
    same_store(tmp_path / "local", tmp_path / "ray")
    files = open_store(tmp_path / "ray", verify=True).manifest["files"]
    assert all(e["xxh3_128_chunked"]["chunk"] == chunk for e in files.values())
    chunks = sum(-(-e["bytes"] // chunk) for e in files.values())
    assert len(read) == chunks  # open_store(verify=True) above: the build itself read none


def test_a_driver_killed_during_the_reduce_leaves_nothing_that_opens_as_a_store(
    ray_local, shards, tmp_path, monkeypatch
):
    """Killed (no cleanup, as by SIGKILL) after the tasks wrote into the preallocated store:
    the temporary directory holds full-size arrays and no manifest; the next build removes it."""
    from sftpack.errors import StoreError
    from sftpack.store import StoreWriter

    options = BuildOptions(seq_length=64, engine="ray")
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(StoreWriter, "add_digests", lambda *a: (_ for _ in ()).throw(_Killed()))
        m.setattr(StoreWriter, "abort", lambda self: None)
        with pytest.raises(_Killed):
            build(SAMPLE, out, options)
    assert not out.exists()
    (tmp,) = [p for p in tmp_path.iterdir() if ".tmp-" in p.name and ".tmp-shards-" not in p.name]
    assert (tmp / "tokens.npy").stat().st_size > 128
    with pytest.raises(StoreError, match="missing"):
        open_store(tmp)
    build(SAMPLE, out, options)
    assert all(r["reused"] for r in shards[-1])
    build(SAMPLE, tmp_path / "local", BuildOptions(seq_length=64), progress=False)
    same_store(tmp_path / "local", out)
    no_litter(tmp_path)


def test_ray_address_is_refused_when_this_process_already_runs_ray(ray_local, tmp_path):
    from sftpack.errors import ConfigError

    with pytest.raises(ConfigError, match="already runs Ray"):
        build(SAMPLE, tmp_path / "out", BuildOptions(seq_length=64, engine="ray", ray_address="10.0.0.1:6379"))
    assert not (tmp_path / "out").exists()
