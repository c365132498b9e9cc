"""Small helpers shared by test modules."""

from __future__ import annotations


def trained_runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive trained tokens (mask 1)."""
    runs: list[list[int]] = []
    prev = 0
    for t, m in zip(ids, mask):
        if m:
            if not prev:
                runs.append([])
            runs[-1].append(t)
        prev = m
    return runs
