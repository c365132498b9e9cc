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


def stream(ds) -> tuple[list[int], list[int]]:
    """The virtual stream of a concat dataset (plan order, the last EOS excluded): the
    reference's `BOS d1 EOS BOS d2 ... EOS BOS dN` tokens and their loss mask."""
    import numpy as np

    toks, mask = ds.view.stream()
    return np.asarray(toks).tolist(), np.asarray(mask).tolist()


def stream_tokens(ds) -> list[int]:
    return stream(ds)[0]


def stream_mask(ds) -> list[int]:
    return stream(ds)[1]


def stream_units(ds, with_mask: bool = False) -> list:
    """The stream cut at the plan's document offsets: one unit per document, in plan order
    (every unit ends with EOS but the last)."""
    import numpy as np

    toks, mask = stream(ds)
    off = np.asarray(ds.view.plan.offsets).tolist()
    if with_mask:
        return [(toks[a:b], mask[a:b]) for a, b in zip(off[:-1], off[1:])]
    return [toks[a:b] for a, b in zip(off[:-1], off[1:])]


def stored_units(ds, with_mask: bool = False) -> list:
    """The stored document units, in file order, each with its trailing EOS."""
    import numpy as np

    t = np.asarray(ds.store.tokens).tolist()
    m = np.asarray(ds.store.loss_mask).tolist()
    off = np.asarray(ds.store.doc_offsets).tolist()
    if with_mask:
        return [(t[a:b], m[a:b]) for a, b in zip(off[:-1], off[1:])]
    return [t[a:b] for a, b in zip(off[:-1], off[1:])]
