"""Packed rows with restarting position_ids score every document as if it were alone."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest

from sftpack import open_packed
from sftpack.build import BuildOptions, build
from sftpack.errors import ConfigError
from sftpack.isolation import IsolationReport, check_isolation
from sftpack.pack import row_span

SEQ = 64
TERSE = "Q: {prompt}\nA: {response}"  # short documents: many pieces per row
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu naïve café 東京 ok".split()


def _records(n: int = 40, seed: int = 0, short: bool = False) -> list[dict]:
    rng = random.Random(seed)
    hi_p, hi_r = (4, 6) if short else (40, 70)
    out = []
    for _ in range(n):
        out.append({
            "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, hi_p))),
            "response": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, hi_r))),
        })
    return out


def _store(jsonl, tmp_path, name="store", short=False, **options):
    path = jsonl(_records(short=short), name=f"{name}.jsonl")
    summary = build(path, tmp_path / name, BuildOptions(seq_length=SEQ, **options), "llama3")
    return summary.path


def _expected_counts(path, rows):
    """Pieces and compared tokens, derived from the stream's document offsets and mask."""
    ds = open_packed(path)
    starts = np.asarray(ds.view.plan.offsets)[:-1]
    _, mask = ds.view.stream()
    per_row = [1 + int(((starts > row_span(r, SEQ)[0]) & (starts < row_span(r, SEQ)[0] + SEQ)).sum())
               for r in range(len(ds))]
    chosen = sorted(sorted(range(len(ds)), key=lambda r: -per_row[r])[:rows])  # the most pieces, first rows on ties
    pieces = tokens = 0
    for r in chosen:
        lo, hi = row_span(r, SEQ)
        pieces += per_row[r]
        trained = np.asarray(mask[lo + 1 : hi]).astype(bool)
        if ds.store.manifest["options"]["train_on_prompt"]:
            trained[:] = True
        crossing = np.isin(np.arange(lo + 1, hi), starts)  # target is a document's first token
        tokens += int((trained & ~crossing).sum())
    return len(chosen), pieces, tokens


@pytest.mark.parametrize("train_on_prompt", [True, False])
def test_packed_rows_match_documents_run_alone(jsonl, tmp_path, train_on_prompt):
    path = _store(jsonl, tmp_path, boundaries=True, train_on_prompt=train_on_prompt)
    report = check_isolation(path)
    assert isinstance(report, IsolationReport)
    assert report.passed, report.lines()
    assert report.max_abs_diff <= report.atol == 1e-4
    assert report.max_abs_logit_diff <= 1e-4
    assert (report.rows, report.pieces, report.tokens) == _expected_counts(path, 4)
    assert report.pieces > report.rows  # the rows checked do hold several documents


def test_every_row_of_short_documents(jsonl, tmp_path):
    path = _store(jsonl, tmp_path, short=True, template=TERSE, boundaries=True)
    ds = open_packed(path)
    report = check_isolation(path, rows=len(ds), seed=3)
    assert report.passed, report.lines()
    assert (report.rows, report.pieces, report.tokens) == _expected_counts(path, len(ds))
    assert report.pieces >= 3 * report.rows  # several pieces per row, continuing ones included
    assert any(int(ds[r]["position_ids"][0]) > 0 for r in range(len(ds)))  # continuing pieces were checked


def test_negative_control_without_position_ids_fails(jsonl, tmp_path):
    path = _store(jsonl, tmp_path, boundaries=True)
    good = check_isolation(path)
    bad = check_isolation(path, packed_positions=False)
    assert good.passed and not bad.passed
    assert bad.max_abs_diff > 100 * bad.atol
    assert (bad.rows, bad.pieces, bad.tokens) == (good.rows, good.pieces, good.tokens)
    later = [p for p in bad.details if p.index > 0 and p.tokens > 0]
    assert later, "the rows checked must hold pieces after the first"
    # Pieces after the first see the documents before them; the first piece of a row sees
    # nothing else (it only gets positions 0.. instead of its own, which RoPE ignores).
    assert all(p.max_abs_diff > 10 * bad.atol for p in later)
    assert all(p.max_abs_diff <= bad.atol for p in bad.details if p.index == 0)


def test_store_without_boundaries_and_eager_attention(jsonl, tmp_path):
    with_b = _store(jsonl, tmp_path, name="b", boundaries=True)
    without = _store(jsonl, tmp_path, name="nob", boundaries=False)
    a = check_isolation(with_b, rows=6)
    b = check_isolation(without, rows=6, attn_implementation="eager")
    assert a.passed and b.passed
    assert (a.rows, a.pieces, a.tokens) == (b.rows, b.pieces, b.tokens)
    assert [(p.row, p.start, p.length) for p in a.details] == [(p.row, p.start, p.length) for p in b.details]


def test_mask_cross_document_store(jsonl, tmp_path):
    path = _store(jsonl, tmp_path, boundaries=True, mask_cross_document=True)
    report = check_isolation(path)
    assert report.passed
    assert report.tokens == _expected_counts(path, 4)[2]


def test_rows_beyond_the_store_are_clamped(jsonl, tmp_path):
    data = jsonl(_records(n=8), name="few.jsonl")
    path = build(data, tmp_path / "few", BuildOptions(seq_length=SEQ, boundaries=True), "llama3").path
    n = len(open_packed(path))
    report = check_isolation(path, rows=n + 5)
    assert report.rows == n and report.passed


def test_module_imports_without_torch():
    code = "import sys, sftpack.isolation; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_documented_path_as_run_with_the_default_cache(jsonl, tmp_path, capsys):
    """check-isolation runs the collator's batch through a model whose config keeps
    use_cache=True: padded (the tests above) and padding-free pass, and leaving
    use_cache=False out of the batch (transformers' default cache, which turns off
    packed-sequence detection on SDPA) fails."""
    from sftpack.cli import main
    from sftpack.isolation import tiny_llama

    assert tiny_llama(64, 16).config.use_cache is True
    path = _store(jsonl, tmp_path, boundaries=True)
    assert main(["check-isolation", str(path), "--rows", "2", "--padding-free"]) == 0
    out = capsys.readouterr().out
    assert "isolation check PASSED" in out and "DataCollator(padding_free=True)" in out
    cached = check_isolation(path, rows=2, use_cache=None)
    assert not cached.passed and cached.max_abs_diff > 100 * cached.atol
    assert f"tokens compared:   {cached.tokens}" in out and cached.pieces > 2


def test_unpadded_bfd_rows_of_different_lengths(jsonl, tmp_path):
    path = _store(jsonl, tmp_path, short=True, packing="bfd", pad=False, shuffle=True, seed=1)
    ds = open_packed(path)
    rows = 6
    assert len({len(ds[r]["input_ids"]) for r in range(rows)}) > 1  # ragged rows, some of several pieces
    assert max(len(ds[r]["seq_lens"]) for r in range(rows)) > 1
    for padding_free in (False, True):
        report = check_isolation(path, rows=rows, padding_free=padding_free)
        assert report.passed and report.rows == rows
        checked = sorted({d.row for d in report.details})
        assert len(checked) == rows
        assert min(len(ds[r]["seq_lens"]) for r in checked) >= max(
            len(ds[r]["seq_lens"]) for r in range(len(ds)) if r not in checked)  # the rows with the most pieces
        assert report.pieces == sum(len(ds[r]["seq_lens"]) for r in checked)
        assert report.tokens == sum(int((ds[r]["labels"] != -100).sum()) for r in checked)
        assert not check_isolation(path, rows=rows, padding_free=padding_free, packed_positions=False).passed


def test_rows_below_one_are_refused(tmp_path):
    for rows in (0, -1):
        with pytest.raises(ConfigError, match="rows must be an integer >= 1"):
            check_isolation(tmp_path, rows=rows)


def test_rows_holding_several_documents_are_the_ones_checked(jsonl, tmp_path):
    """bfd puts the split pieces of long documents first, one per row: checking the first
    rows would test nothing. The rows with the most pieces are checked, and leaking fails."""
    long = [{"prompt": "alpha " * 90, "response": "beta " * 90} for _ in range(6)]
    path = jsonl(long + _records(short=True), name="mixed.jsonl")
    store = build(path, tmp_path / "mixed", BuildOptions(seq_length=SEQ, packing="bfd"), "llama3").path
    ds = open_packed(store)
    assert all(len(ds[r]["seq_lens"]) == 1 for r in range(4))  # the first rows: one piece each
    good = check_isolation(store, rows=4)
    bad = check_isolation(store, rows=4, packed_positions=False)
    assert good.passed and good.shared_rows == 4 and not bad.passed
    assert {d.row for d in good.details}.isdisjoint(range(4))


def test_the_model_is_placed_in_another_dtype_from_the_same_weights(tmp_path):
    """bench/gpu_check.py runs the check in bfloat16 on CUDA: the model there must be the
    float32 model's weights, cast; a non-floating dtype is refused before a store is read."""
    import torch

    from sftpack.isolation import tiny_llama

    full, half = tiny_llama(64, 16, seed=3), tiny_llama(64, 16, seed=3, dtype="bfloat16")
    weights = dict(half.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in weights.values())
    assert all(torch.equal(p.to(torch.bfloat16), weights[name]) for name, p in full.named_parameters())
    assert not torch.equal(tiny_llama(64, 16, seed=4).lm_head.weight, full.lm_head.weight)
    for dtype in ("int64", "bool", "no_such_dtype"):
        with pytest.raises(ConfigError, match="dtype must name a floating torch dtype"):
            check_isolation(tmp_path / "absent", dtype=dtype)
