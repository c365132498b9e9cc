"""Every CLI failure is one readable line on stderr (`sftpack: error: ...`) and exit status 1
(2: argparse usage errors; 130: interrupted); `--debug` shows the traceback instead.
`--quiet` hides the progress bar and summary, never the warnings."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sftpack
from sftpack import ConfigError, TokenizerError
from sftpack.build import BuildOptions, build
from sftpack.cli import main
from sftpack.store import open_store

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample.jsonl"
RECORDS = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(20)]


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def expect_error(capsys, argv: list[str], *words: str) -> str:
    """`sftpack argv` fails with exit status 1 and one `sftpack: error:` line holding `words`."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 1, (code, err)
    assert len(err.splitlines()) == 1 and err.startswith("sftpack: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err
    return err


def build_args(data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["build", str(data), "--out", str(tmp_path / "store"), "--seq-length", "8", "--quiet", *extra]


# --------------------------------------------------------------------------- templates


@pytest.mark.parametrize("template, word", [
    ("{{ 1/0 }}", "ZeroDivisionError"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ("{% include 'x' %}", "no loader"),
    ("{% for m in messages %}{{ m.content }}{% endfor %}{{ messages[9].x }}", "no element"),
])
def test_template_failing_at_render_time(data, tmp_path, capsys, template, word):
    err = expect_error(capsys, build_args(data, tmp_path, "--template", template), "template", word)
    assert f"{data}:1: " in err  # the record it failed on
    assert not (tmp_path / "store").exists()


def test_template_file_not_utf8(data, tmp_path, capsys):
    template = tmp_path / "template.txt"
    template.write_bytes(b"\xff\xfe### Q: {prompt}\n### A: {response}")
    expect_error(capsys, build_args(data, tmp_path, "--template", template), str(template), "UTF-8")


# --------------------------------------------------------------------------- records


def test_deeply_nested_record(tmp_path, capsys):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"prompt": "p", "response": "r", "x": ' + "[" * 3000 + "]" * 3000 + "}\n")
    expect_error(capsys, build_args(path, tmp_path), f"{path}:1: ", "nested too deeply")


def test_huge_integer_in_an_extra_field_builds(tmp_path, capsys):
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(r)[:-1] + ', "id": ' + "1" * 5000 + "}\n" for r in RECORDS))
    assert main(build_args(path, tmp_path)) == 0
    assert capsys.readouterr().err == ""
    assert open_store(tmp_path / "store").manifest["counts"]["documents"] == len(RECORDS)


def test_fifo_input(tmp_path, capsys):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    expect_error(capsys, build_args(fifo, tmp_path), str(fifo), "named pipe (FIFO)")


def test_directory_holding_a_fifo(tmp_path, data, capsys):
    folder = tmp_path / "inputs"
    folder.mkdir()
    data.rename(folder / "a.jsonl")
    os.mkfifo(folder / "b.jsonl")
    expect_error(capsys, build_args(folder, tmp_path), str(folder / "b.jsonl"), "named pipe (FIFO)")


def test_directory_without_data(tmp_path, capsys):
    folder = tmp_path / "empty"
    folder.mkdir()
    expect_error(capsys, build_args(folder, tmp_path), str(folder), "holds no")


# --------------------------------------------------------------------------- options


def test_negative_workers(data, tmp_path, capsys):
    expect_error(capsys, build_args(data, tmp_path, "--workers", "-3"), "workers", "from 0", "got -3")
    with pytest.raises(ConfigError, match="workers"):
        build(data, tmp_path / "api", BuildOptions(seq_length=8), "llama3", workers=-3, progress=False)


def test_negative_seed(data, tmp_path, capsys):
    expect_error(capsys, build_args(data, tmp_path, "--shuffle", "--seed", "-1"), "seed", "non-negative")
    with pytest.raises(ConfigError, match="seed must be a non-negative integer"):
        BuildOptions(seq_length=8, shuffle=True, seed=-1).validate()
    with pytest.raises(ConfigError, match="seed"):
        build(data, tmp_path / "api", BuildOptions(seq_length=8, shuffle=True, seed=-5), "llama3", progress=False)


def test_field_without_equals(data, tmp_path, capsys):
    expect_error(capsys, build_args(data, tmp_path, "--field", "prompt"), "--field", "NAME=KEY")


def test_seq_length_zero(data, tmp_path, capsys):
    expect_error(capsys, ["build", data, "--out", tmp_path / "store", "--seq-length", "0"], "seq_length")


@pytest.mark.parametrize("kind", ["garbage", "empty", "json", "jsonl", "empty_dir", "dir_with_junk"])
def test_tokenizer_that_is_not_a_tokenizer(data, tmp_path, capsys, kind):
    path = tmp_path / ("tok" if kind.endswith("dir") or kind == "dir_with_junk" else "tokenizer.json")
    if kind == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "json":
        path.write_text('{"vocab": [1, 2, 3]}')
    elif kind == "jsonl":
        path = data
    else:
        path.mkdir()
        if kind == "dir_with_junk":
            (path / "tokenizer.json").write_text("not json")
    expect_error(capsys, build_args(data, tmp_path, "--tokenizer", path), str(path))
    with pytest.raises(TokenizerError):
        sftpack.load_tokenizer(str(path))


def test_empty_tokenizer_directory_says_what_is_missing(tmp_path):
    (tmp_path / "tok").mkdir()
    with pytest.raises(TokenizerError, match="holds no tokenizer files"):
        sftpack.load_tokenizer(str(tmp_path / "tok"))


def test_usage_errors_keep_exit_status_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["build", "--seq-length", "8"])
    assert info.value.code == 2


# --------------------------------------------------------------------------- inspect and verify


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "s"
    assert main(["build", str(SAMPLE), "--out", str(path), "--seq-length", "64", "--quiet"]) == 0
    return path


@pytest.mark.parametrize("row", ["-1", "100000"])
def test_inspect_row_out_of_range(store, capsys, row):
    expect_error(capsys, ["inspect", store, "--row", row], "--row", "out of range")


def test_verify_missing_store(tmp_path, capsys):
    expect_error(capsys, ["verify", tmp_path / "nothing"], "manifest.json is missing")


def test_inspect_into_a_closed_pipe_is_quiet(store):
    """`sftpack inspect ... | head -1`: the reader goes away; no BrokenPipeError is printed."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "sftpack.cli", "inspect", str(store), "--row", "0"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode == 1


# --------------------------------------------------------------------------- unexpected errors and --debug


def _permission_denied(*args, **kwargs):
    raise PermissionError(13, "Permission denied", "/somewhere/private")


def test_system_error_is_one_line_with_the_path(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sftpack.build.load_tokenizer", _permission_denied)
    err = expect_error(capsys, build_args(data, tmp_path), "Permission denied")
    assert "unexpected" not in err


def test_unexpected_error_is_one_line_with_its_type(data, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the tokenizer library misbehaved")

    monkeypatch.setattr("sftpack.build.load_tokenizer", broken)
    expect_error(capsys, build_args(data, tmp_path), "RuntimeError", "misbehaved", "--debug")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(data, tmp_path, monkeypatch, where):
    monkeypatch.setattr("sftpack.build.load_tokenizer", _permission_denied)
    argv = build_args(data, tmp_path)
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(PermissionError):
        main(argv)
    with pytest.raises(ConfigError):
        main(["--debug", *build_args(data, tmp_path, "--shuffle", "--seed", "-1")])


# --------------------------------------------------------------------------- warnings and --quiet


def _special_data(tmp_path: Path) -> Path:
    path = tmp_path / "special.jsonl"
    rows = [*RECORDS, {"prompt": "ignore this <|eot_id|> please", "response": "ok"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_quiet_still_warns_about_special_tokens(tmp_path, capsys):
    path = _special_data(tmp_path)
    for _ in range(2):  # built, then reused: both warn
        assert main(build_args(path, tmp_path)) == 0
        out, err = capsys.readouterr()
        assert out == ""
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("sftpack: warning: 1 documents hold special-token strings")


def test_special_token_warning_is_printed_once_without_quiet(tmp_path, capsys):
    path = _special_data(tmp_path)
    assert main(["build", str(path), "--out", str(tmp_path / "store"), "--seq-length", "8"]) == 0
    out, err = capsys.readouterr()
    assert (out + err).count("special-token strings") == 1
    assert "WARNING: 1 documents hold special-token strings" in out


def test_quiet_still_warns_about_rows_without_supervision(tmp_path, capsys):
    path = tmp_path / "long_prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": "word " * 200, "response": "ok"}) + "\n" for _ in range(5)))
    assert main(build_args(path, tmp_path, "--no-train-on-prompt")) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and "sftpack: warning: " in err and "rows have no supervised token" in err


# --------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_as_the_temporary_directory_is_made_leaves_nothing(data, tmp_path, capsys, monkeypatch):
    """The signal handled the moment mkdir returns (a real Ctrl-C can land there)."""
    work = tmp_path / "work"
    work.mkdir()
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        if self.name.startswith(".store.tmp-"):
            raise KeyboardInterrupt

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert main(["build", str(data), "--out", str(work / "store"), "--seq-length", "8", "--quiet"]) == 130
    assert capsys.readouterr().err == "sftpack: interrupted\n"
    assert os.listdir(work) == []


def _writing(work: Path) -> bool:
    for tmp in work.glob(".store.tmp-*"):
        try:
            if (tmp / "tokens.npy").stat().st_size > 4096:
                return True
        except FileNotFoundError:
            pass
    return False


def test_ctrl_c_mid_build_exits_130_and_leaves_nothing(tmp_path):
    rng = random.Random(0)
    data = tmp_path / "data.jsonl"
    with open(data, "w") as f:
        for i in range(20000):  # about 4 MB
            words = " ".join(str(rng.random()) for _ in range(8))
            f.write(json.dumps({"prompt": f"{i} {words}", "response": words[::-1]}) + "\n")
    work = tmp_path / "work"
    work.mkdir()
    out = work / "store"
    code = ("import sys, sftpack.build\n"
            "sftpack.build.BATCH_CHARS = 2048  # many small batches: a build long enough to interrupt\n"
            "from sftpack.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, "build", str(data), "--out", str(out), "--seq-length", "64"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # interrupt once the build has written tokens into its temporary sibling
        while proc.poll() is None and not _writing(work):
            time.sleep(0.002)
        assert proc.poll() is None, "the build ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip() == "sftpack: interrupted"
    assert not out.exists()
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".store.")) == []
    assert sorted(os.listdir(work)) == []
