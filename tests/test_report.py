"""The packing report prints what the plan did: numbers checked against values worked out by hand."""

from __future__ import annotations

import builtins
import math
import re
from pathlib import Path

import numpy as np
import pytest

from sftpack import report
from sftpack.errors import ConfigError
from sftpack.plans import plan_bfd, plan_concat

LENGTHS = np.array([5, 3, 8, 2, 11])
L = 8

# By hand, best fit decreasing at seq_length 8:
#   split:    items 8(d2) 8(d4[0:8]) 5(d0) 3(d1) 3(d4[8:11]) 2(d3) -> rows [8] [8] [5,3] [3,2]
#   truncate: items 8 8(d4[0:8]) 5 3 2                            -> rows [8] [8] [5,3] [2]
#   drop:     items 8 5 3 2                                       -> rows [8] [5,3] [2]
HAND = {
    "split": dict(rows=4, packed=29, lost=0, fill=[8, 8, 8, 5], split=1, truncated=0, dropped=0),
    "truncate": dict(rows=4, packed=26, lost=3, fill=[8, 8, 8, 2], split=0, truncated=1, dropped=0),
    "drop": dict(rows=3, packed=18, lost=11, fill=[8, 8, 2], split=0, truncated=0, dropped=1),
}


def field(lines: list[str], label: str) -> str:
    (hit,) = [ln for ln in lines if ln.startswith(f"  {label}:")]
    return hit.split(":", 1)[1].strip()


def histogram_counts(lines: list[str]) -> list[int]:
    return [int(m.group(1).replace(",", "")) for ln in lines if (m := re.match(r"\s*[\d,]+-[\d,]+ .* ([\d,]+)$", ln))]


@pytest.mark.parametrize("overflow", sorted(HAND))
def test_report_numbers_match_the_hand_plan(overflow):
    h = HAND[overflow]
    plan = plan_bfd(LENGTHS, L, overflow=overflow)
    lines = report.report_lines(plan.stats, LENGTHS)
    assert field(lines, "documents") == f"5 in, {5 - h['dropped']} packed"
    lb = math.ceil(h["packed"] / L)
    assert field(lines, "rows").startswith(f"{h['rows']} (lower bound {lb} ")
    assert field(lines, "packing efficiency").startswith(f"{100 * h['packed'] / (h['rows'] * L):.2f}% ")
    assert field(lines, "padding tokens") == str(h["rows"] * L - h["packed"])
    assert field(lines, "documents split") == str(h["split"])
    assert field(lines, "documents truncated") == str(h["truncated"])
    assert field(lines, "documents dropped") == f"{h['dropped']} (0 empty)"
    assert field(lines, "tokens lost") == f"{h['lost']} of 29 ({100 * h['lost'] / 29:.2f}%)"
    assert field(lines, "supervised lost") == "unknown"
    assert sorted(report.row_fill(plan).tolist()) == sorted(h["fill"])
    # the warning appears exactly when a token is lost
    assert any("WARNING" in ln for ln in lines) == (h["lost"] > 0)


def test_efficiency_percent_has_two_decimals_and_thousands_separators():
    lengths = np.full(3000, 1000)  # 2 per row of 2048: 1,500 rows, 48 pad each
    lines = report.report_lines(plan_bfd(lengths, 2048).stats, lengths)
    assert field(lines, "packing efficiency") == "97.66% (3,000,000 tokens / 1,500 rows x 2,048)"
    assert field(lines, "padding tokens") == "72,000"
    assert field(lines, "rows").startswith("1,500 (lower bound 1,465 ")


def test_supervised_losses_are_counted_or_called_unknown():
    sup = LENGTHS.copy()  # every token supervised
    drop = plan_bfd(LENGTHS, L, overflow="drop", supervised=sup).stats
    lines = report.report_lines(drop, LENGTHS)
    assert field(lines, "supervised lost") == "11 of 29 (37.93%)"
    assert "  WARNING: 11 supervised tokens lost: the model never trains on them" in lines
    # truncation loses part of a document: without a prefix counter that is unknown, and said so
    trunc = plan_bfd(LENGTHS, L, overflow="truncate", supervised=sup).stats
    assert trunc.supervised_lost is None
    lines = report.report_lines(trunc, LENGTHS)
    assert field(lines, "supervised lost") == "unknown"
    assert "  WARNING: 3 tokens lost; how many were supervised is unknown" in lines
    # tokens lost, none of them supervised: still a warning, no false alarm about training
    none_sup = plan_bfd(LENGTHS, L, overflow="drop", supervised=np.array([5, 3, 8, 2, 0])).stats
    lines = report.report_lines(none_sup, LENGTHS)
    assert "  WARNING: 11 tokens lost (none supervised)" in lines
    ok = plan_bfd(LENGTHS, L, overflow="split", supervised=sup).stats
    lines = report.report_lines(ok, LENGTHS)
    assert field(lines, "supervised lost") == "0 of 29 (0.00%)" and not any("WARNING" in ln for ln in lines)


def test_concat_plan_rows_are_full_and_its_tail_is_a_loss():
    lengths = np.arange(1, 40)  # 780 tokens: (780 - 1) // 64 = 12 rows, tail 12 tokens
    plan = plan_concat(lengths, 64)
    assert report.row_fill(plan).tolist() == [64] * 12
    assert report.row_fill(plan.to_plan()).tolist() == [64] * 12  # the shared label is not a row token
    lines = report.report_lines(plan.stats, lengths, pad=False)
    assert field(lines, "packing efficiency").startswith("100.00% ")
    assert field(lines, "tokens lost") == "12 of 780 (1.54%)"
    assert any(ln.startswith("  WARNING: 12 tokens lost") for ln in lines)


def test_length_summary_matches_numpy():
    rng = np.random.default_rng(1)
    a = np.rint(rng.lognormal(5, 1.2, 1_000)).astype(np.int64)  # (n - 1) * q / 100 not whole: interpolated
    d = report.length_summary(a)
    assert d["count"] == 1_000 and d["total"] == int(a.sum()) and d["min"] == int(a.min())
    assert d["max"] == int(a.max()) and d["mean"] == pytest.approx(a.mean())
    for q in (50, 90, 99):
        assert d[f"p{q}"] == int(np.rint(np.percentile(a, q)))
    assert all(isinstance(d[k], int) for k in ("count", "total", "min", "p50", "p90", "p99", "max"))
    lines = report.report_lines(plan_bfd(a, 512).stats, a)
    assert field(lines, "document lengths").startswith(
        f"min {a.min():,}, p50 {int(np.rint(np.percentile(a, 50))):,}, p90 {int(np.rint(np.percentile(a, 90))):,}")


@pytest.mark.parametrize("seed, seq_length", [(0, 2048), (1, 64), (2, 100_000), (3, 3)])
def test_histogram_counts_every_document_once(seed, seq_length):
    rng = np.random.default_rng(seed)
    a = np.rint(rng.lognormal(6, 1.3, 5_000)).astype(np.int64)
    a[:3] = 0  # empty documents are counted too
    lines = report.text_histogram(a, seq_length)
    assert sum(histogram_counts(lines)) == len(a)
    over = int((a > seq_length).sum())
    assert lines[-1] == f"documents over seq_length: {over:,} ({100 * over / len(a):.2f}%)"
    # the marker sits between the bins that fit and the bins that do not
    m = lines.index(f"--- seq_length {seq_length:,} ---")
    assert sum(histogram_counts(lines[m:])) == over
    assert set("".join(lines)) <= set("0123456789,-.%()▏▎▍▌▋▊▉█ abcdeghilmnoqrstuv_:")


def test_histogram_small_case_by_hand():
    lines = report.text_histogram(LENGTHS, L, bins=12, width=10)
    assert sum(histogram_counts(lines)) == 5
    m = lines.index("--- seq_length 8 ---")
    assert sum(histogram_counts(lines[:m])) == 4 and sum(histogram_counts(lines[m:])) == 1
    assert lines[-1] == "documents over seq_length: 1 (20.00%)"
    assert max(len(ln) for ln in lines if "-" in ln and "---" not in ln) <= 5 + 1 + 10 + 1 + 1


def test_plot_writes_a_png_atomically(tmp_path: Path):
    mimg = pytest.importorskip("matplotlib.image")
    rng = np.random.default_rng(0)
    a = np.rint(rng.lognormal(6, 1, 20_000)).astype(np.int64) + 1
    plan = plan_bfd(a, 2048)
    out = report.plot(plan.stats, a, report.row_fill(plan), tmp_path / "pack.png")
    assert out == tmp_path / "pack.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert mimg.imread(out).shape[:2] == (400, 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["pack.png"]  # no temporary file left


def test_plot_failure_leaves_no_temp_file(tmp_path: Path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    plan = plan_bfd(LENGTHS, L)
    with pytest.raises(OSError, match="disk full"):
        report.plot(plan.stats, LENGTHS, report.row_fill(plan), tmp_path / "pack.png")
    assert list(tmp_path.iterdir()) == []


def test_plot_without_matplotlib_is_a_config_error(tmp_path: Path, monkeypatch):
    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    plan = plan_bfd(LENGTHS, L)
    with pytest.raises(ConfigError, match=r"--plot needs matplotlib: pip install 'sftpack\[plot\]'"):
        report.plot(plan.stats, LENGTHS, report.row_fill(plan), tmp_path / "pack.png")
    assert list(tmp_path.iterdir()) == []


def test_report_imports_neither_torch_nor_matplotlib():
    import subprocess
    import sys

    code = ("import sys, sftpack.report; "
            "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
