"""The streamed .json-array reader: same objects as json.load, across chunk boundaries."""

from __future__ import annotations

import json
import random

import pytest

from sftpack.errors import InputError
from sftpack.records import RecordReader


@pytest.mark.parametrize("indent", [None, 2])
def test_streamed_json_array_equals_json_load(tmp_path, indent):
    rng = random.Random(indent or 0)
    records = [
        {"prompt": "é 😀 {x} " * rng.randint(1, 4000), "response": "line\n" * rng.randint(0, 2000), "n": 10**20 + i,
         "nested": [1.5, None, True, {"k": "v"}]}
        for i in range(300)
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records, indent=indent, ensure_ascii=False), encoding="utf-8")
    assert path.stat().st_size > 3 << 20  # several 1 MB read chunks
    got = list(RecordReader([path]))
    assert [r.data for r in got] == records
    assert [r.line for r in got] == list(range(1, 301)) and got[0].unit == "row "


def test_malformed_json_deep_in_the_file_names_its_line(tmp_path):
    lines = ["["] + [json.dumps({"prompt": "p" * 5000, "response": "r"}) + "," for _ in range(400)]
    lines.append('{"prompt": "p", "response": }')
    lines.append("]")
    path = tmp_path / "data.json"
    path.write_text("\n".join(lines))
    with pytest.raises(InputError, match=rf"data\.json:{len(lines) - 1}: malformed JSON"):
        list(RecordReader([path]))


def test_invalid_utf8_deep_in_the_file_names_its_line(tmp_path):
    body = b"[\n" + b",\n".join(b'{"prompt": "%s", "response": "r"}' % (b"p" * 5000) for _ in range(400))
    path = tmp_path / "data.json"
    path.write_bytes(body + b',\n{"prompt": "\xff", "response": "r"}\n]')
    with pytest.raises(InputError, match=r"data\.json:402: invalid UTF-8"):
        list(RecordReader([path]))
