"""Damaged inputs: a build uses every record of every file or fails with an `InputError`
naming the file (and line where known); never a traceback, never part of a file.

Compressed files are read to their verified end (a complete zstd frame, the gzip CRC and
length); a file written to while it is read is refused."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

import sftpack.records
from sftpack import ConfigError, InputError, open_packed
from sftpack.build import BuildOptions, build


def _records(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(start, start + n)]


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _build(inputs, tmp_path: Path):
    return build(inputs, tmp_path / "store", BuildOptions(seq_length=8), "llama3", progress=False)


def expect_input_error(inputs, tmp_path: Path, where: str, *words: str) -> InputError:
    """The build fails with an InputError starting `where: ` and leaves no store."""
    with pytest.raises(InputError) as info:
        _build(inputs, tmp_path)
    message = str(info.value)
    assert message.startswith(f"{where}: ") or message.startswith(f"{where}:"), message
    for word in words:
        assert word in message, message
    assert not (tmp_path / "store").exists()
    return info.value


def _tokens(path: Path, tmp_path: Path, name: str) -> tuple[list[int], list[int]]:
    """The stored tokens (every document with its EOS) and the stream the plan reads."""
    summary = build(path, tmp_path / name, BuildOptions(seq_length=8), "llama3", progress=False)
    return np.load(summary.path / "tokens.npy").tolist(), open_packed(summary.path).view.stream()[0].tolist()


# --------------------------------------------------------------------------- zstd


def _zstd(data: bytes, **kw) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(**kw).compress(data)


def _zstd_aligned(n_lines: int = 3000) -> bytes:
    """One frame of 128-byte lines: zstd blocks hold 128 KiB, so every block ends on a line
    boundary and a file without its last block still parses line by line."""
    lines = []
    for i in range(n_lines):
        line = json.dumps({"prompt": f"q{i}", "response": "a"})
        lines.append(line[:-1] + ", " + '"pad": "' + "x" * (128 - len(line) - 12) + '"}\n')
    assert all(len(line) == 128 for line in lines)
    return _zstd("".join(lines).encode())


@pytest.mark.parametrize("layout", ["two_frames", "aligned_blocks"])
def test_zstd_cut_by_one_byte_fails(tmp_path, layout):
    """The partial data would build a store of part of the records: it must not."""
    if layout == "two_frames":
        blob = _zstd(_jsonl(_records(50))) + _zstd(_jsonl(_records(50, 50)))
    else:
        blob = _zstd_aligned()
    path = tmp_path / "data.jsonl.zst"
    path.write_bytes(blob[:-1])
    expect_input_error(path, tmp_path, str(path), "truncated", "zstd")


@pytest.mark.parametrize("keep", [1, 4, 9, 0.5])
def test_zstd_cut_anywhere_fails(tmp_path, keep):
    blob = _zstd(_jsonl(_records(300)))
    path = tmp_path / "data.jsonl.zst"
    path.write_bytes(blob[: int(len(blob) * keep) if isinstance(keep, float) else keep])
    expect_input_error(path, tmp_path, str(path), "truncated")


def test_zstd_trailing_garbage_fails(tmp_path):
    path = tmp_path / "data.jsonl.zst"
    path.write_bytes(_zstd(_jsonl(_records(20))) + b"not zstd at all")
    expect_input_error(path, tmp_path, f"{path}:21", "corrupt zstd")


@pytest.mark.parametrize("where", [0.5, -2])
def test_zstd_corrupt_frame_fails(tmp_path, where):
    blob = bytearray(_zstd(_jsonl(_records(100)), write_checksum=True))
    blob[int(len(blob) * where) if isinstance(where, float) else where] ^= 0xFF
    path = tmp_path / "data.jsonl.zst"
    path.write_bytes(bytes(blob))
    expect_input_error(path, tmp_path, str(path), "corrupt zstd")


def test_not_zstd_at_all(tmp_path):
    path = tmp_path / "data.jsonl.zst"
    path.write_bytes(_jsonl(_records(3)))  # plain text under a .zst name
    expect_input_error(path, tmp_path, f"{path}:1", "corrupt zstd")


def test_zstd_many_frames_are_all_read(tmp_path):
    """Concatenated frames (and frames split across read chunks) are one valid stream."""
    records = _records(400)
    blob = b"".join(_zstd(_jsonl(records[i : i + 7])) for i in range(0, len(records), 7))
    path = tmp_path / "data.jsonl.zst"
    path.write_bytes(blob)
    plain = tmp_path / "data.jsonl"
    plain.write_bytes(_jsonl(records))
    assert _tokens(path, tmp_path, "a") == _tokens(plain, tmp_path, "b")


def test_zstd_large_frame_equals_plain(tmp_path):
    records = _records(40000)  # several MB: many blocks and read chunks
    path = tmp_path / "data.jsonl.zst"
    path.write_bytes(_zstd(_jsonl(records), write_checksum=True))
    plain = tmp_path / "data.jsonl"
    plain.write_bytes(_jsonl(records))
    assert _tokens(path, tmp_path, "a") == _tokens(plain, tmp_path, "b")


# --------------------------------------------------------------------------- gzip


@pytest.mark.parametrize("cut", [1, 4, 8, 0.5, 0.1])
def test_gzip_cut_short_fails(tmp_path, cut):
    blob = gzip.compress(_jsonl(_records(300)))
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(blob[: len(blob) - cut] if isinstance(cut, int) else blob[: int(len(blob) * cut)])
    expect_input_error(path, tmp_path, str(path), "truncated", "gzip")


@pytest.mark.parametrize("field", ["crc", "length"])
def test_gzip_trailer_mismatch_fails(tmp_path, field):
    blob = bytearray(gzip.compress(_jsonl(_records(30))))
    blob[-8 if field == "crc" else -4] ^= 0xFF
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(bytes(blob))
    expect_input_error(path, tmp_path, f"{path}:31", "corrupt gzip")


def test_gzip_corrupt_deflate_data_fails(tmp_path):
    blob = bytearray(gzip.compress(_jsonl(_records(300))))
    for i in range(20, 40):
        blob[i] ^= 0x55
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(bytes(blob))
    expect_input_error(path, tmp_path, str(path), "gzip")


def test_gzip_trailing_garbage_fails(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(gzip.compress(_jsonl(_records(10))) + b"garbage")
    expect_input_error(path, tmp_path, f"{path}:11", "corrupt gzip")


def test_not_gzip_at_all(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(_jsonl(_records(3)))
    expect_input_error(path, tmp_path, f"{path}:1", "corrupt gzip")


@pytest.mark.parametrize("fmt", [".jsonl.gz", ".jsonl.zst"])
def test_empty_compressed_file(tmp_path, fmt):
    path = tmp_path / f"data{fmt}"
    path.write_bytes(b"")
    expect_input_error(path, tmp_path, str(path))


# --------------------------------------------------------------------------- parquet


def _parquet_bytes(tmp_path: Path) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "good.parquet.tmp"
    pq.write_table(pa.Table.from_pylist(_records(100)), path, row_group_size=10)
    return path.read_bytes()


@pytest.mark.parametrize("content", ["text", "empty", "truncated", "no_footer"])
def test_broken_parquet_fails(tmp_path, content):
    blob = {
        "text": lambda: _jsonl(_records(3)),
        "empty": lambda: b"",
        "truncated": lambda: _parquet_bytes(tmp_path)[:-1],
        "no_footer": lambda: _parquet_bytes(tmp_path)[: len(_parquet_bytes(tmp_path)) // 2],
    }[content]()
    path = tmp_path / "data.parquet"
    path.write_bytes(blob)
    expect_input_error(path, tmp_path, str(path), "Parquet")


def test_parquet_with_a_corrupt_page_fails(tmp_path):
    blob = bytearray(_parquet_bytes(tmp_path))
    for i in range(8, len(blob) // 2):  # the data pages, not the footer
        blob[i] ^= 0x5A
    path = tmp_path / "data.parquet"
    path.write_bytes(bytes(blob))
    expect_input_error(path, tmp_path, str(path), "Parquet")


# --------------------------------------------------------------------------- JSON


@pytest.mark.parametrize("cut", [1, 2, 10, 0.5])
def test_json_array_cut_short_fails(tmp_path, cut):
    text = json.dumps(_records(50), indent=1)
    path = tmp_path / "data.json"
    path.write_text(text[: len(text) - cut] if isinstance(cut, int) else text[: int(len(text) * cut)])
    expect_input_error(path, tmp_path, str(path), "truncated")


def test_json_array_cut_after_an_element(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(_records(5))[:-1])  # no closing bracket
    expect_input_error(path, tmp_path, f"{path}:1", "ends before the array is closed")


@pytest.mark.parametrize("fmt", [".jsonl", ".json"])
def test_deeply_nested_json_is_an_input_error(tmp_path, fmt):
    record = '{"prompt": "p", "response": "r", "extra": ' + "[" * 3000 + "]" * 3000 + "}"
    path = tmp_path / f"data{fmt}"
    good = json.dumps(_records(1)[0])
    path.write_text(f"{good}\n{record}\n" if fmt == ".jsonl" else f"[{good},\n{record}]")
    expect_input_error(path, tmp_path, f"{path}:2", "nested too deeply")


@pytest.mark.parametrize("fmt", [".jsonl", ".json"])
def test_huge_integer_in_an_extra_field_is_accepted(tmp_path, fmt):
    records = _records(3)
    lines = [json.dumps(r)[:-1] + ', "id": ' + "7" * 5000 + "}" for r in records]
    path = tmp_path / f"data{fmt}"
    path.write_text("\n".join(lines) + "\n" if fmt == ".jsonl" else "[" + ",\n".join(lines) + "]")
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(_jsonl(records))
    assert _tokens(path, tmp_path, "a") == _tokens(plain, tmp_path, "b")


def test_huge_integer_as_a_text_field_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": ' + "9" * 5000 + ', "response": "r"}\n')
    expect_input_error(path, tmp_path, f"{path}:1", "field 'prompt' must be a string")


# --------------------------------------------------------------------------- files that change or are not files


def _mutating_reader(monkeypatch, change):
    """Run `change(path)` right after the first record of a file is read."""
    original = sftpack.records.RecordReader._jsonl

    def reader(self, path, fmt):
        for i, record in enumerate(original(self, path, fmt)):
            yield record
            if i == 0:
                change(path)

    monkeypatch.setattr(sftpack.records.RecordReader, "_jsonl", reader)


@pytest.mark.parametrize("change", ["append", "truncate", "rewrite"])
def test_file_changed_while_read_fails(tmp_path, monkeypatch, change):
    path = tmp_path / "data.jsonl"
    path.write_bytes(_jsonl(_records(20)))

    def mutate(p):
        if change == "append":
            with open(p, "ab") as f:
                f.write(_jsonl(_records(5, 100)))
        elif change == "truncate":
            os.truncate(p, 10)
        else:  # same size, other bytes, later mtime
            data = p.read_bytes().replace(b"answer", b"ANSWER")
            st = p.stat()
            p.write_bytes(data)
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    _mutating_reader(monkeypatch, mutate)
    expect_input_error(path, tmp_path, str(path), "changed while it was read")


def test_fifo_input_is_named_as_a_fifo(tmp_path):
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    expect_input_error(fifo, tmp_path, str(fifo), "named pipe (FIFO)")


def test_fifo_inside_an_input_directory_is_refused(tmp_path):
    """Skipping it would build from the other files alone."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(_jsonl(_records(5)))
    os.mkfifo(folder / "b.jsonl")
    expect_input_error(folder, tmp_path, str(folder / "b.jsonl"), "named pipe (FIFO)")
    expect_input_error(str(folder / "*.jsonl"), tmp_path, str(folder / "b.jsonl"), "named pipe (FIFO)")


def test_directory_named_like_data_inside_an_input_directory_is_refused(tmp_path):
    folder = tmp_path / "inputs"
    (folder / "part.parquet").mkdir(parents=True)  # a Spark-style dataset directory
    (folder / "a.jsonl").write_bytes(_jsonl(_records(5)))
    expect_input_error(folder, tmp_path, str(folder / "part.parquet"), "directory")


def test_directory_with_no_data_names_the_formats(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match=r"holds no .*\.jsonl\.zst"):
        _build(folder, tmp_path)


def test_broken_symlink_is_named(tmp_path):
    link = tmp_path / "data.jsonl"
    link.symlink_to(tmp_path / "gone.jsonl")
    with pytest.raises(ConfigError, match="broken symbolic link"):
        _build(link, tmp_path)


def test_unreadable_file_is_an_input_error(tmp_path, monkeypatch):
    """Permission denied (simulated: the tests may run as root, who reads everything)."""
    path = tmp_path / "data.jsonl"
    path.write_bytes(_jsonl(_records(5)))

    def denied(file, *args, **kwargs):
        if os.fspath(file) == os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return open(file, *args, **kwargs)

    monkeypatch.setattr(sftpack.records, "open", denied, raising=False)
    expect_input_error(path, tmp_path, str(path), "Permission denied")
