"""Shared fixtures: the conformance files and a Hugging Face Llama-3 tokenizer built offline."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# CI runs the property tests on a fixed seed sequence, so a red CI is reproducible; local runs
# keep exploring new examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

sys.path.insert(0, str(Path(__file__).parent))

CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance" / "cs336"


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Keep sftpack's user cache (quicktok imports of HF tokenizers) inside the test session."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SFTPACK_CACHE", str(tmp_path_factory.mktemp("sftpack-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def conformance() -> Path:
    if not CONFORMANCE.is_dir():
        pytest.skip("../shared/conformance/cs336 is absent")
    return CONFORMANCE


@pytest.fixture(scope="session")
def hf_llama3():
    """The Meta-Llama-3 HF tokenizer, rebuilt offline (see tests/hf_llama3.py)."""
    from hf_llama3 import build_hf_llama3

    return build_hf_llama3()


@pytest.fixture
def jsonl(tmp_path):
    """Write rows (dicts, or raw strings for broken lines) to a .jsonl file and return its path."""

    def make(rows: list, name: str = "data.jsonl") -> Path:
        return write_jsonl(tmp_path / name, rows)

    return make
