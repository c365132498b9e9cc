"""Input files: every bad input is an `InputError` naming `file:line` (or `file:row N`);
tolerated variations and other formats give exactly the tokens of the clean .jsonl."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

import sftpack
from sftpack import ConfigError, InputError, PackedSFTDataset, SFTPackError, TokenizerError

RECORDS = [
    {"prompt": "What is 2 + 2?", "response": "4"},
    {"prompt": "Translate 'chat' into English.", "response": "cat 🐱"},
    {"prompt": "日本語で挨拶して", "response": "こんにちは、世界！"},
    {"prompt": "Braces: {response} and {prompt} stay", "response": "ok {x}"},
    {"prompt": "  leading and trailing spaces  ", "response": "tabs\tand\nnewlines\n\n"},
    {"prompt": "combining e\u0301 and ZWJ 👩\u200d💻", "response": "done."},
]


def _line(record) -> str:
    return json.dumps(record, ensure_ascii=False)


def build_ds(path, seq_length: int = 8, **kw) -> PackedSFTDataset:
    return PackedSFTDataset("llama3", path, seq_length=seq_length, **kw)


def stream(ds: PackedSFTDataset) -> tuple[list[int], list[int], list[int]]:
    """The stream the plan reads (tokens, loss mask) and its document offsets."""
    tokens, mask = ds.view.stream()
    return tokens.tolist(), mask.tolist(), np.asarray(ds.view.plan.offsets).tolist()


def items(ds: PackedSFTDataset) -> list[tuple[list[int], list[int]]]:
    return [(ds[i]["input_ids"].tolist(), ds[i]["labels"].tolist()) for i in range(len(ds))]


@pytest.fixture
def clean(jsonl):
    """The records as a clean .jsonl, and what it builds to."""
    path = jsonl(RECORDS, name="clean.jsonl")
    ds = build_ds(path)
    assert ds.summary.documents == len(RECORDS)
    assert len(ds) > 3
    return ds


def assert_same(ds: PackedSFTDataset, reference: PackedSFTDataset) -> None:
    assert stream(ds) == stream(reference)
    assert items(ds) == items(reference)
    assert ds.summary.documents == reference.summary.documents


def expect_input_error(path, where: str, *reason_words: str, **kw) -> InputError:
    """Build `path`; it must fail with an InputError whose message starts with `where: `."""
    with pytest.raises(InputError) as info:
        build_ds(path, **kw)
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, SFTPackError)
    message = str(err)
    assert message.startswith(f"{where}: "), message
    for word in reason_words:
        assert word in message, message
    return err


# --------------------------------------------------------------------------- bad JSONL lines


GOOD = _line(RECORDS[0])


@pytest.mark.parametrize(
    "bad_line, words",
    [
        ('{"prompt": "a", "response": ', ["malformed JSON"]),
        ('{"prompt": "a" "response": "b"}', ["malformed JSON"]),
        ("{'prompt': 'a', 'response': 'b'}", ["malformed JSON"]),
        ('{"prompt": "a", "response": "b"} trailing', ["malformed JSON"]),
        ('[{"prompt": "a", "response": "b"}]', ["expected a JSON object", "array"]),
        ('"just a string"', ["expected a JSON object", "string"]),
        ("42", ["expected a JSON object", "number"]),
        ("3.5", ["expected a JSON object", "number"]),
        ("null", ["expected a JSON object", "null"]),
        ("true", ["expected a JSON object", "boolean"]),
    ],
)
def test_bad_json_line_names_file_and_line(jsonl, bad_line, words):
    path = jsonl([GOOD, bad_line, GOOD])
    err = expect_input_error(path, f"{path}:2", *words)
    assert err.source == str(path) and err.line == 2


def test_missing_field_message_is_exact(jsonl):
    path = jsonl([GOOD, {"prompt": "only a prompt"}, GOOD])
    with pytest.raises(InputError) as info:
        build_ds(path)
    assert str(info.value) == f"{path}:2: field 'response' is missing"


def test_missing_prompt_field(jsonl):
    path = jsonl([GOOD, GOOD, {"response": "only a response", "extra": 1}])
    expect_input_error(path, f"{path}:3", "field 'prompt' is missing")


@pytest.mark.parametrize(
    "value, type_word",
    [(5, "int"), (1.5, "float"), (None, "null"), (["a", "b"], "list"), ({"text": "a"}, "dict"), (True, "bool")],
)
@pytest.mark.parametrize("field", ["prompt", "response"])
def test_non_string_field(jsonl, field, value, type_word):
    record = dict(RECORDS[1])
    record[field] = value
    path = jsonl([GOOD, GOOD, GOOD, record])
    expect_input_error(path, f"{path}:4", f"field '{field}'", "must be a string", type_word)


def test_line_numbers_count_blank_lines(jsonl):
    path = jsonl([GOOD, "", "   ", GOOD, "", '{"prompt": 1, "response": "x"}'])
    expect_input_error(path, f"{path}:6", "must be a string")


def test_invalid_utf8_bytes(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "caf\xe9 \xff", "response": "x"}\n' + GOOD.encode() + b"\n")
    expect_input_error(path, f"{path}:2", "UTF-8")


def test_truncated_utf8_sequence_at_end_of_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + GOOD.encode() + b"\n" + '{"prompt": "日本"'.encode()[:-2] + b"\n")
    expect_input_error(path, f"{path}:3", "UTF-8")


@pytest.mark.parametrize("field", ["prompt", "response"])
def test_lone_surrogate(jsonl, field):
    other = "response" if field == "prompt" else "prompt"
    line = '{"%s": "broken \\ud800 text", "%s": "fine"}' % (field, other)
    path = jsonl([GOOD, line])
    assert "\\ud800" in path.read_text()  # the JSON escape, not a raw surrogate
    expect_input_error(path, f"{path}:2", "UTF-8")


def test_escaped_surrogate_pair_is_accepted_and_equals_the_raw_character(jsonl):
    escaped = jsonl(['{"prompt": "smile \\ud83d\\ude00", "response": "ok"}'], name="escaped.jsonl")
    raw = jsonl([{"prompt": "smile 😀", "response": "ok"}], name="raw.jsonl")
    assert stream(build_ds(escaped, seq_length=4)) == stream(build_ds(raw, seq_length=4))


def test_empty_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"")
    err = expect_input_error(path, str(path))
    assert err.source == str(path)


@pytest.mark.parametrize("content", [b"\n", b"\n\n\n", b"  \n\t\n \r\n", b"\xef\xbb\xbf\n\n"])
def test_file_with_only_blank_lines(tmp_path, content):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    expect_input_error(path, str(path))


def test_empty_file_among_several_is_named(jsonl, tmp_path):
    a = jsonl(RECORDS, name="a.jsonl")
    b = tmp_path / "b.jsonl"
    b.write_text("\n\n")
    with pytest.raises(InputError) as info:
        build_ds([a, b])
    assert str(info.value).startswith(f"{b}: ")


# --------------------------------------------------------------------------- bad options and tokenizers


@pytest.mark.parametrize("seq_length", [0, -1, -4096])
def test_seq_length_below_one(jsonl, seq_length):
    path = jsonl(RECORDS)
    with pytest.raises(ConfigError) as info:
        build_ds(path, seq_length=seq_length)
    assert isinstance(info.value, ValueError)
    assert "seq_length" in str(info.value)


def test_dataset_shorter_than_one_row(jsonl):
    """One short document and seq_length above its length: no row fits. Either an empty
    dataset, or an error that says so (not one blaming the loss mask or the template)."""
    path = jsonl([{"prompt": "hi", "response": "yo"}])
    one = build_ds(path, seq_length=1)
    n_tokens = len(one.view.stream()[0])  # the stream's length: a row needs one token more
    assert one.summary.tokens == n_tokens
    try:
        ds = build_ds(path, seq_length=n_tokens)
    except SFTPackError as exc:
        message = str(exc)
        assert "seq_length" in message or "row" in message or "short" in message, message
        assert "train_on_prompt" not in message, message
    else:
        assert len(ds) == 0
        assert ds.summary.sequences == 0


@pytest.mark.parametrize("seq_length", [2.0, "8", True])
def test_seq_length_not_an_integer(jsonl, seq_length):
    with pytest.raises(ConfigError, match="seq_length"):
        build_ds(jsonl(RECORDS), seq_length=seq_length)


def test_cli_rejects_seq_length_zero(jsonl, tmp_path, capsys):
    from sftpack.cli import main

    out = tmp_path / "store"
    assert main(["build", str(jsonl(RECORDS)), "--out", str(out), "--seq-length", "0", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sftpack: error: ") and "seq_length" in err
    assert not out.exists()


def _wordlevel_without_delimiters():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate("below is an instruction response what".split())}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return raw


def test_tokenizer_without_eos_and_bos_object(jsonl):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=_wordlevel_without_delimiters(), unk_token="[UNK]")
    assert tok.eos_token is None and tok.bos_token is None
    with pytest.raises(TokenizerError) as info:
        PackedSFTDataset(tok, jsonl(RECORDS), seq_length=4)
    assert isinstance(info.value, ValueError)
    assert "EOS" in str(info.value) and "BOS" in str(info.value)
    with pytest.raises(TokenizerError):
        sftpack.load_tokenizer(tok)


def test_tokenizer_without_eos_and_bos_file_and_cli(jsonl, tmp_path, capsys):
    from sftpack.cli import main

    tok_file = tmp_path / "tokenizer.json"
    _wordlevel_without_delimiters().save(str(tok_file))
    with pytest.raises(TokenizerError):
        PackedSFTDataset(str(tok_file), jsonl(RECORDS), seq_length=4)
    out = tmp_path / "store"
    code = main(["build", str(jsonl(RECORDS)), "--out", str(out), "--seq-length", "4", "--tokenizer", str(tok_file)])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("sftpack: error: ") and "EOS" in err
    assert not out.exists()


# --------------------------------------------------------------------------- tolerated variations


def test_blank_lines_are_skipped(tmp_path, clean):
    path = tmp_path / "blank.jsonl"
    lines = ["", *(x for r in RECORDS for x in (_line(r), "", "   \t ")), "", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    assert_same(build_ds(path), clean)


def test_utf8_bom_at_file_start(tmp_path, clean):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(_line(r) + "\n" for r in RECORDS).encode())
    assert_same(build_ds(path), clean)


def test_crlf_line_endings(tmp_path, clean):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes("".join(_line(r) + "\r\n" for r in RECORDS).encode() + b"\r\n")
    assert_same(build_ds(path), clean)


def test_bom_crlf_and_no_final_newline(tmp_path, clean):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(_line(r) for r in RECORDS).encode())
    assert_same(build_ds(path), clean)


def test_extra_fields_are_ignored(jsonl, clean):
    noisy = [{"id": i, **r, "meta": {"source": "x", "tags": [1, None]}, "score": 0.5} for i, r in enumerate(RECORDS)]
    assert_same(build_ds(jsonl(noisy, name="noisy.jsonl")), clean)


def test_ascii_escaped_json_equals_raw_utf8(tmp_path, clean):
    path = tmp_path / "ascii.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=True) + "\n" for r in RECORDS), encoding="ascii")
    assert_same(build_ds(path), clean)


def test_unicode_line_separators_inside_strings_do_not_split_lines(tmp_path):
    records = [{"prompt": "a\u2028b\u2029c\x85d\x0ce\x1cf", "response": "g\u2028"}, RECORDS[0]]
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
    escaped = tmp_path / "escaped.jsonl"
    escaped.write_text("".join(json.dumps(r) + "\n" for r in records))
    ds = build_ds(raw, seq_length=4)
    assert ds.summary.documents == 2
    assert stream(ds) == stream(build_ds(escaped, seq_length=4))


# --------------------------------------------------------------------------- other formats


def _jsonl_bytes(records) -> bytes:
    return "".join(_line(r) + "\n" for r in records).encode()


def _write(path: Path, fmt: str, records) -> Path:
    if fmt == ".jsonl.gz":
        path.write_bytes(gzip.compress(_jsonl_bytes(records)))
    elif fmt == ".jsonl.zst":
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(_jsonl_bytes(records)))
    elif fmt == ".json":
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    elif fmt == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        path.write_bytes(_jsonl_bytes(records))
    return path


FORMATS = [".jsonl.gz", ".jsonl.zst", ".json", ".parquet"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_gives_the_same_items_as_jsonl(tmp_path, clean, fmt):
    path = _write(tmp_path / f"data{fmt}", fmt, RECORDS)
    assert_same(build_ds(path), clean)


def test_gzip_with_several_members(tmp_path, clean):
    path = tmp_path / "multi.jsonl.gz"
    path.write_bytes(gzip.compress(_jsonl_bytes(RECORDS[:2])) + gzip.compress(_jsonl_bytes(RECORDS[2:])))
    assert_same(build_ds(path), clean)


def test_zstd_with_several_frames(tmp_path, clean):
    """Concatenated zstd frames are one valid .zst stream (`zstd -d` reads them all)."""
    import zstandard

    path = tmp_path / "multi.jsonl.zst"
    c = zstandard.ZstdCompressor()
    path.write_bytes(c.compress(_jsonl_bytes(RECORDS[:2])) + c.compress(_jsonl_bytes(RECORDS[2:])))
    assert_same(build_ds(path), clean)


def test_zstd_streamed_frame_without_content_size(tmp_path, clean):
    import io

    import zstandard

    buf = io.BytesIO()
    with zstandard.ZstdCompressor(write_content_size=False).stream_writer(buf, closefd=False) as w:
        for r in RECORDS:
            w.write((_line(r) + "\n").encode())
    path = tmp_path / "streamed.jsonl.zst"
    path.write_bytes(buf.getvalue())
    assert_same(build_ds(path), clean)


def test_json_array_with_bom(tmp_path, clean):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(RECORDS).encode())
    assert_same(build_ds(path), clean)


def test_parquet_with_extra_columns_and_several_row_groups(tmp_path, clean):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{**r, "id": i, "weight": 0.5 * i} for i, r in enumerate(RECORDS)]
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    assert_same(build_ds(path), clean)


@pytest.mark.parametrize("fmt", [".jsonl.gz", ".jsonl.zst"])
def test_compressed_jsonl_errors_name_file_and_line(tmp_path, fmt):
    path = _write(tmp_path / f"data{fmt}", fmt, [RECORDS[0], RECORDS[1], {"prompt": "no response"}])
    expect_input_error(path, f"{path}:3", "field 'response' is missing")


def test_compressed_jsonl_malformed_line(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(gzip.compress(GOOD.encode() + b"\n{oops\n"))
    expect_input_error(path, f"{path}:2", "malformed JSON")


def test_json_array_errors_name_the_row(tmp_path):
    path = _write(tmp_path / "data.json", ".json", [RECORDS[0], {"prompt": "no response"}])
    with pytest.raises(InputError) as info:
        build_ds(path)
    assert str(info.value) == f"{path}:row 2: field 'response' is missing"


@pytest.mark.parametrize("item, words", [([1, 2], ["array"]), ("text", ["string"]), (7, ["number"])])
def test_json_array_non_object_item(tmp_path, item, words):
    path = _write(tmp_path / "data.json", ".json", [RECORDS[0], RECORDS[1], item])
    expect_input_error(path, f"{path}:row 3", "expected a JSON object", *words)


def test_json_array_non_string_value(tmp_path):
    path = _write(tmp_path / "data.json", ".json", [RECORDS[0], {"prompt": "p", "response": None}])
    expect_input_error(path, f"{path}:row 2", "must be a string", "null")


def test_json_array_lone_surrogate(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[%s, {"prompt": "x \\udc00", "response": "y"}]' % GOOD)
    expect_input_error(path, f"{path}:row 2", "UTF-8")


def test_json_malformed_names_the_text_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"prompt": "a", "response": "b"},\n  {"prompt": "c" "response": "d"}\n]\n')
    expect_input_error(path, f"{path}:3", "malformed JSON")


def test_json_not_an_array(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS[0]))
    expect_input_error(path, str(path), "array")


def test_json_empty_array(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("[]")
    expect_input_error(path, str(path))


def test_json_invalid_utf8_names_a_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(b'[\n  {"prompt": "a", "response": "b"},\n  {"prompt": "\xff", "response": "d"}\n]\n')
    err = expect_input_error(path, f"{path}:3", "UTF-8")
    assert err.line == 3


def test_parquet_errors_name_the_row_across_batches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 4100  # more than one 4096-row batch
    prompts = [f"question {i}" for i in range(n)]
    responses: list = [f"answer {i}" for i in range(n)]
    responses[4099] = None
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"prompt": prompts, "response": responses}), path, row_group_size=1000)
    expect_input_error(path, f"{path}:row 4100", "field 'response'", "null")


def test_parquet_non_string_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "response": [1, 2]}), path)
    expect_input_error(path, f"{path}:row 1", "must be a string", "int")


def test_parquet_without_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "response": pa.array([], pa.string())}), path)
    expect_input_error(path, str(path))


# --------------------------------------------------------------------------- several files


@pytest.fixture
def parts(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    paths = [
        _write(folder / "a.jsonl", ".jsonl", RECORDS[:2]),
        _write(folder / "b.jsonl", ".jsonl", RECORDS[2:3]),
        _write(folder / "c.jsonl", ".jsonl", RECORDS[3:]),
    ]
    return folder, paths


def test_several_files_are_read_in_sorted_order(parts, clean):
    _, (a, b, c) = parts
    assert_same(build_ds([c, a, b]), clean)
    assert_same(build_ds([str(b), str(c), str(a)]), clean)


def test_glob_and_directory_inputs(parts, clean):
    folder, _ = parts
    assert_same(build_ds(str(folder / "*.jsonl")), clean)
    assert_same(build_ds(folder), clean)


def test_mixed_formats_in_sorted_order(tmp_path, clean):
    folder = tmp_path / "mixed"
    folder.mkdir()
    _write(folder / "1.parquet", ".parquet", RECORDS[:1])
    _write(folder / "2.json", ".json", RECORDS[1:3])
    _write(folder / "3.jsonl.zst", ".jsonl.zst", RECORDS[3:4])
    _write(folder / "4.jsonl.gz", ".jsonl.gz", RECORDS[4:])
    assert_same(build_ds(str(folder / "*")), clean)
    assert_same(build_ds(folder), clean)


def test_error_in_a_later_file_names_that_file_and_its_own_line(parts):
    folder, (a, b, c) = parts
    c.write_text(_line(RECORDS[3]) + "\n" + '{"prompt": "x", "response": 3}\n')
    expect_input_error([c, b, a], f"{c}:2", "must be a string")
    expect_input_error(str(folder / "*.jsonl"), f"{c}:2", "must be a string")


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(ConfigError):
        build_ds(str(tmp_path / "*.jsonl"))


def test_missing_input_file(tmp_path):
    with pytest.raises(ConfigError):
        build_ds(tmp_path / "absent.jsonl")


# --------------------------------------------------------------------------- failed CLI builds leave nothing


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _bad_input(tmp_path: Path, n_good: int = 40) -> Path:
    path = tmp_path / "inputs" / "bad.jsonl"
    path.parent.mkdir(exist_ok=True)
    lines = [_line({"prompt": f"question {i}", "response": f"answer {i}"}) for i in range(n_good)]
    lines.append('{"prompt": "the last one", "response": ["not", "a", "string"]}')
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("small_batches", [False, True])
def test_failed_cli_build_creates_nothing(tmp_path, capsys, monkeypatch, small_batches):
    from sftpack.cli import main

    if small_batches:  # several batches are written to the store before the error
        monkeypatch.setattr("sftpack.build.BATCH_CHARS", 64)
    bad = _bad_input(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "store"
    code = main(["build", str(bad), "--out", str(out), "--seq-length", "8", "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"sftpack: error: {bad}:41: ")
    assert not out.exists()
    assert list(work.iterdir()) == []  # no temporary sibling left either


@pytest.mark.parametrize("extra", [[], ["--force"], ["--shuffle", "--seed", "3"]])
def test_failed_cli_build_keeps_the_previous_store(tmp_path, jsonl, capsys, monkeypatch, extra):
    from sftpack.cli import main

    monkeypatch.setattr("sftpack.build.BATCH_CHARS", 64)
    good = jsonl(RECORDS)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "store"
    assert main(["build", str(good), "--out", str(out), "--seq-length", "8", "--quiet"]) == 0
    before = _snapshot(work)
    expected = items(sftpack.open_packed(out))
    assert before and expected

    bad = _bad_input(tmp_path)
    code = main(["build", str(bad), "--out", str(out), "--seq-length", "8", "--quiet", *extra])
    assert code == 1
    assert f"{bad}:41: " in capsys.readouterr().err
    assert _snapshot(work) == before  # the store, byte for byte, and nothing beside it
    assert sorted(os.listdir(work)) == ["store"]
    assert items(sftpack.open_packed(out, verify=True)) == expected


def test_failed_library_build_leaves_no_temporary_directory(tmp_path):
    from sftpack.build import BuildOptions, build

    bad = _bad_input(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(InputError):
        build(bad, work / "store", BuildOptions(seq_length=8))
    assert list(work.iterdir()) == []
