"""An honest report of a packing plan: what it keeps, what it wastes, what it loses.

Pure numpy and text; matplotlib is imported only by `plot` (the `plot` extra), never torch.
Every figure printed is read from `PlanStats` or the lengths, so a report cannot disagree
with the plan it describes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .plans import ConcatPlan, Plan, PlanStats

_EIGHTHS = " ▏▎▍▌▋▊▉"


def length_summary(lengths: np.ndarray) -> dict:
    """count, total, min, mean and p50/p90/p99/max of document lengths (numpy's linear
    percentiles, rounded to ints); zeros for no documents, so a report never fails."""
    a = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if not a.size:
        return dict(count=0, total=0, min=0, mean=0.0, p50=0, p90=0, p99=0, max=0)
    p50, p90, p99 = (int(np.rint(v)) for v in np.percentile(a, [50, 90, 99]))
    return dict(
        count=int(a.size),
        total=int(a.sum()),
        min=int(a.min()),
        mean=float(a.mean()),
        p50=p50,
        p90=p90,
        p99=p99,
        max=int(a.max()),
    )


def _bins(a: np.ndarray, seq_length: int, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) inclusive bounds of log-spaced bins covering `a` and `seq_length`, with
    `seq_length` always an upper bound, so "fits" and "too long" never share a bin."""
    lo = max(1, min(int(a.min()), seq_length))
    hi = max(seq_length, int(a.max()))
    edges = np.unique(np.rint(np.geomspace(lo, hi, max(bins, 1) + 1)).astype(np.int64))
    upper = edges[1:] if len(edges) > 1 else edges
    if seq_length not in upper:  # move the nearest edge (never the top one) onto seq_length
        near = int(np.argmin(np.abs(np.log(upper[:-1]) - np.log(seq_length)))) if len(upper) > 1 else None
        upper = np.unique(np.append(np.delete(upper, near) if near is not None else upper, seq_length))
    lower = np.concatenate(([min(int(a.min()), int(upper[0]))], upper[:-1] + 1))
    return lower, upper


def text_histogram(lengths: np.ndarray, seq_length: int, bins: int = 12, width: int = 40) -> list[str]:
    """Document lengths as text bars (log-spaced bins, `lo-hi  bar  count`), a
    `--- seq_length N ---` line where longer documents start, and how many are longer."""
    a = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if not a.size:
        return ["(no documents)"]
    lower, upper = _bins(a, seq_length, bins)
    counts = np.bincount(np.searchsorted(upper, a, side="left"), minlength=len(upper))
    top, w = max(int(counts.max()), 1), len(f"{int(upper[-1]):,}")
    out = []
    for lo, hi, n in zip(lower.tolist(), upper.tolist(), counts.tolist()):
        eighths = int(round(n * width * 8 / top)) or (1 if n else 0)  # a non-empty bin always shows
        bar = "█" * (eighths // 8) + (_EIGHTHS[eighths % 8] if eighths % 8 else "")
        out.append(f"{lo:>{w},}-{hi:<{w},} {bar:<{width}} {n:,}")
        if hi == seq_length:
            out.append(f"--- seq_length {seq_length:,} ---")
    over = int((a > seq_length).sum())
    out.append(f"documents over seq_length: {over:,} ({100 * over / a.size:.2f}%)")
    return out


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "0.00%"


def report_lines(
    stats: PlanStats,
    lengths: np.ndarray,
    *,
    pad: bool | None = None,
    labels: tuple[int, int] | None = None,
) -> list[str]:
    """The summary to print: counts with nothing rounded away, losses named, a WARNING
    whenever a token is lost. `pad`: True says rows are padded to seq_length, False that
    they are served unpadded (flattened), None says nothing about it. `labels`: (supervised
    labels the rows serve, supervised tokens in the store), where counted."""
    s, L = stats, stats.seq_length
    sup = (
        "unknown"
        if s.supervised_lost is None
        else (f"{s.supervised_lost:,} of {s.supervised_in:,} ({_pct(s.supervised_lost, s.supervised_in or 0)})")
    )
    pad_note = {None: "", True: " (rows padded to seq_length)", False: " row slots left empty (rows served unpadded)"}[
        pad
    ]
    extra = s.rows - s.lower_bound_rows
    fields = [
        ("documents", f"{s.documents_in:,} in, {s.documents_packed:,} packed"),
        (
            "rows",
            f"{s.rows:,} (lower bound {s.lower_bound_rows:,} = ceil(packed tokens / seq_length); "
            f"{extra:+,} rows, {_pct(extra, s.lower_bound_rows)})",
        ),
        ("packing efficiency", f"{100 * s.efficiency:.2f}% ({s.tokens_packed:,} tokens / {s.rows:,} rows x {L:,})"),
        ("padding tokens", f"{s.padding_tokens:,}{pad_note}"),
        ("documents split", f"{s.documents_split:,}"),
        ("documents truncated", f"{s.documents_truncated:,}"),
        ("documents dropped", f"{s.documents_dropped:,} ({s.documents_empty:,} empty)"),
        ("tokens lost", f"{s.tokens_lost:,} of {s.tokens_in:,} ({_pct(s.tokens_lost, s.tokens_in)})"),
        ("supervised lost", sup),
    ]
    if labels is not None:
        served, supervised = labels
        fields.append(
            (
                "supervised labels",
                f"{served:,} of {supervised:,} supervised tokens are targets "
                f"({supervised - served:,} not: lost tokens, and each row's (concat) or piece's (bfd) first token)",
            )
        )
    out = [f"packing report (seq_length {L:,}):"] + [f"  {k + ':':<21}{v}" for k, v in fields]
    if s.tokens_lost:
        out.append(
            f"  WARNING: {s.supervised_lost:,} supervised tokens lost: the model never trains on them"
            if s.supervised_lost
            else f"  WARNING: {s.tokens_lost:,} tokens lost; how many were supervised is unknown"
            if s.supervised_lost is None
            else f"  WARNING: {s.tokens_lost:,} tokens lost (none supervised)"
        )
    d = length_summary(lengths)
    out.append(
        f"  {'document lengths:':<21}min {d['min']:,}, p50 {d['p50']:,}, p90 {d['p90']:,}, "
        f"p99 {d['p99']:,}, max {d['max']:,}, mean {d['mean']:,.1f}"
    )
    out += ["    " + line for line in text_histogram(lengths, L)]
    return out


def row_fill(plan: Plan | ConcatPlan) -> np.ndarray:
    """Input tokens in each row (int64). Concat rows are always full; a materialised concat
    `Plan` holds seq_length + 1 tokens per row (the shared last label), counted as seq_length."""
    if isinstance(plan, ConcatPlan):
        return np.full(plan.rows, plan.seq_length, np.int64)
    if isinstance(plan, Plan):
        return np.minimum(plan.row_tokens(), plan.seq_length)
    raise TypeError(f"row_fill needs a Plan or ConcatPlan, got {type(plan).__name__}")


def plot(stats: PlanStats, lengths: np.ndarray, row_fill: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a 1000x400 PNG: document lengths (log x, a line at seq_length) and row fill (log y).
    Written to a temporary sibling and renamed, so `path` is never a half-written file."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'sftpack[plot]'") from None
    path, L = Path(path), stats.seq_length
    a = np.asarray(lengths, dtype=np.int64).reshape(-1)
    fill = np.asarray(row_fill, dtype=np.float64).reshape(-1) / L
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    hi = max(L, int(a.max()) if a.size else L)
    lo = max(1, int(a.min()) if a.size else 1)
    left.hist(np.maximum(a, 1), bins=np.geomspace(lo, hi + 1, 60), color="tab:blue")
    left.set_xscale("log")
    left.axvline(L, color="tab:red", linestyle="--", label=f"seq_length {L:,}")
    left.set(title=f"document lengths ({int((a > L).sum()):,} over seq_length)", xlabel="tokens", ylabel="documents")
    left.legend()
    right.hist(fill, bins=np.linspace(0, 1, 51), color="tab:green")
    right.set_yscale("log")  # the few part-filled rows stay visible beside thousands of full ones
    right.set(
        title=f"row fill (efficiency {100 * stats.efficiency:.2f}%)",
        xlabel="tokens per row / seq_length",
        ylabel="rows",
        xlim=(0, 1),
    )
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
