"""Shared fixtures: the conformance files and a Hugging Face Llama-3 tokenizer built offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance" / "cs336"


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


@pytest.fixture(scope="session")
def conformance() -> Path:
    if not CONFORMANCE.is_dir():
        pytest.skip("../shared/conformance/cs336 is absent")
    return CONFORMANCE


@pytest.fixture(scope="session")
def hf_llama3():
    """The Meta-Llama-3 HF tokenizer, rebuilt from quicktok's bundled ranks with
    transformers' TikTokenConverter (special tokens parsed in text, BOS prepended)."""
    import quicktok
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    enc = quicktok.get_encoding("llama3")
    ranks = {enc.decode_single_token_bytes(i): i for i in range(128000)}
    specials = sorted(enc.special_tokens_set, key=enc.encode_single_token)

    class FromRanks(TikTokenConverter):
        def load_tiktoken_bpe(self, _url):
            return ranks

    backend = FromRanks(vocab_file="llama3", extra_special_tokens=specials).converted()
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", 128000)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
    )


@pytest.fixture
def jsonl(tmp_path):
    """Write rows (dicts, or raw strings for broken lines) to a .jsonl file and return its path."""

    def make(rows: list, name: str = "data.jsonl") -> Path:
        return write_jsonl(tmp_path / name, rows)

    return make
