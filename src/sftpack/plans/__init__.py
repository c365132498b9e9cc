"""Packing plans: which stored token ranges make each training row, from document lengths alone.

Pure numpy, no I/O, no torch. One module per strategy, one entry in `STRATEGIES`:

- `concat` (`plan_concat`): the reference concat-and-chunk, bit-exact with `sftpack.pack`,
  kept arithmetic (`ConcatPlan`; `.to_plan()` materialises it).
- `bfd` (`plan_bfd`): best-fit decreasing over all documents, whole documents per row,
  over-long ones split, truncated or dropped (`Plan`).

Both give `rows`, `row(i) -> Ranges(doc, start, length)`, `stats` (`PlanStats`, checked)
and `lost` (the ranges in no row).
"""

from __future__ import annotations

from collections.abc import Callable

from .base import OVERFLOWS, AccountingError, Plan, PlanError, PlanStats, PrefixCounter, Ranges
from .bfd import best_fit, plan_bfd
from .concat import ConcatPlan, document_order, plan_concat, row_pieces, span_pieces, stream_offsets

#: strategy name -> planner(lengths, seq_length, **options)
STRATEGIES: dict[str, Callable[..., Plan | ConcatPlan]] = {"concat": plan_concat, "bfd": plan_bfd}


def make_plan(strategy: str, lengths, seq_length: int, **options) -> Plan | ConcatPlan:
    """Plan with the named strategy (`STRATEGIES`); options go to its planner."""
    try:
        planner = STRATEGIES[strategy]
    except KeyError:
        raise PlanError(f"unknown packing strategy {strategy!r}; choose from {sorted(STRATEGIES)}") from None
    return planner(lengths, seq_length, **options)


__all__ = [
    "AccountingError",
    "ConcatPlan",
    "document_order",
    "OVERFLOWS",
    "Plan",
    "PlanError",
    "PlanStats",
    "PrefixCounter",
    "Ranges",
    "STRATEGIES",
    "best_fit",
    "make_plan",
    "plan_bfd",
    "plan_concat",
    "row_pieces",
    "span_pieces",
    "stream_offsets",
]
