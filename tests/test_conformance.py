"""The reference packed SFT dataset, reproduced bit for bit (both tokenizer routes)."""

from __future__ import annotations

import json

import pytest
import torch

from sftpack import PackedSFTDataset, iterate_batches, open_packed


def _expected(conformance):
    with open(conformance / "tokenized_sft_sample.json") as f:
        return json.load(f)


@pytest.mark.parametrize("route", ["bundled", "hf", "hf-unaccelerated"])
def test_conformance_fixture_is_reproduced_exactly(conformance, hf_llama3, route):
    from sftpack.tokenizers import load_tokenizer

    tokenizer = {
        "bundled": "llama3",
        "hf": hf_llama3,
        "hf-unaccelerated": load_tokenizer(hf_llama3, accelerate=False),
    }[route]
    ds = PackedSFTDataset(tokenizer, conformance / "sft_sample.jsonl", seq_length=32, shuffle=False)
    expected = _expected(conformance)
    assert len(ds) == len(expected) == 75
    for i, item in enumerate(expected):
        got = ds[i]
        assert got["input_ids"].dtype == torch.int64 and got["input_ids"].shape == (32,)
        assert got["input_ids"].tolist() == item["input_ids"], f"row {i} input_ids"
        assert got["labels"].tolist() == item["labels"], f"row {i} labels"
    assert ds.summary.tokens == 2430
    if route == "hf":  # a byte-level BPE HF tokenizer is served by quicktok after a sample check
        assert "encoded by quicktok, identical on 5 sample texts" in ds.summary.tokenizer


def test_template_file_matches_the_bundled_alpaca(conformance):
    from sftpack.templates import ALPACA_TEMPLATE

    assert (conformance / "alpaca_sft.prompt").read_text() == ALPACA_TEMPLATE


def test_reference_batching(conformance):
    ds = PackedSFTDataset("llama3", conformance / "sft_sample.jsonl", seq_length=32)
    batches = iterate_batches(ds, batch_size=8, shuffle=True)
    assert len(batches) == 10
    shapes = [tuple(b["input_ids"].shape) for b in batches]
    assert shapes[:-1] == [(8, 32)] * 9 and shapes[-1] == (3, 32)
    for b in batches:
        assert b["input_ids"].dtype == torch.int64 and b["labels"].dtype == torch.int64


def test_cli_round_trip(conformance, tmp_path, capsys):
    from sftpack.cli import main

    out = tmp_path / "store"
    assert main(["build", str(conformance / "sft_sample.jsonl"), "--out", str(out), "--seq-length", "32"]) == 0
    printed = capsys.readouterr().out
    assert "sequences:        75" in printed and "documents:        5" in printed
    reopened = open_packed(out)
    expected = _expected(conformance)
    assert len(reopened) == 75
    assert all(reopened[i]["input_ids"].tolist() == expected[i]["input_ids"] for i in range(75))
    assert all(reopened[i]["labels"].tolist() == expected[i]["labels"] for i in range(75))
