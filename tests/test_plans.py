"""Packing plans (src/sftpack/plans/): checked against brute force and naive references."""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sftpack.errors import SFTPackError
from sftpack.pack import dropped_tail, num_rows, row_span
from sftpack.plans import (
    STRATEGIES,
    AccountingError,
    ConcatPlan,
    Plan,
    PlanError,
    PlanStats,
    Ranges,
    best_fit,
    make_plan,
    plan_bfd,
    plan_concat,
    row_pieces,
    stream_offsets,
)

OVERFLOW = ["split", "truncate", "drop"]

# --------------------------------------------------------------------------- references


def ref_items(lengths, L, overflow):
    """(items, lost) as lists of (doc, start, length), by walking every document."""
    items, lost = [], []
    for d, n in enumerate(lengths):
        if n == 0:
            continue
        if n <= L:
            items.append((d, 0, n))
        elif overflow == "split":
            items += [(d, s, min(L, n - s)) for s in range(0, n, L)]
        elif overflow == "truncate":
            items.append((d, 0, L))
            lost.append((d, L, n - L))
        else:
            lost.append((d, 0, n))
    return items, lost


def ref_bfd(lengths, L, overflow="split"):
    """Best fit decreasing one item at a time, TRL's rule: longest first (ties: document
    order), the smallest remaining capacity that fits, ties to the row that reached it
    first. Returns rows as lists of (doc, start, length)."""
    items, _ = ref_items(lengths, L, overflow)
    items.sort(key=lambda it: -it[2])  # stable
    rows, fifo = [], {}
    for it in items:
        fits = [c for c, q in fifo.items() if q and c >= it[2]]
        if fits:
            cap = min(fits)
            r = fifo[cap].popleft()
        else:
            cap, r = L, len(rows)
            rows.append([])
        rows[r].append(it)
        if cap - it[2] > 0:
            fifo.setdefault(cap - it[2], deque()).append(r)
    return rows


def next_fit(sizes, L):
    rows, load = 0, L + 1
    for x in sizes:
        if load + x > L:
            rows, load = rows + 1, 0
        load += x
    return rows


def optimum(sizes, L):
    """Fewest rows, by exhaustive search (small inputs only)."""
    sizes = sorted(sizes, reverse=True)
    for k in range(-(-sum(sizes) // L), len(sizes) + 1):
        loads = [0] * k

        def place(i):
            if i == len(sizes):
                return True
            for b in {ld: b for b, ld in reversed(list(enumerate(loads)))}.values():  # one per distinct load
                if loads[b] + sizes[i] <= L:
                    loads[b] += sizes[i]
                    if place(i + 1):
                        return True
                    loads[b] -= sizes[i]
            return False

        if place(0):
            return k
    return 0


def rows_of(plan):
    return [list(zip(*(a.tolist() for a in (r.doc, r.start, r.length)))) for r in map(plan.row, range(plan.rows))]


def brute_stream(lengths, order):
    """Every token of the joined stream as (stored doc, offset in doc)."""
    return [(d, k) for d in order for k in range(lengths[d])]


def runs(positions):
    """Consecutive tokens of the same document, as (doc, start, length) pieces."""
    out = []
    for d, k in positions:
        if out and out[-1][0] == d and out[-1][1] + out[-1][2] == k:
            out[-1] = (d, out[-1][1], out[-1][2] + 1)
        else:
            out.append((d, k, 1))
    return out


@st.composite
def corpus(draw, max_docs=25, max_len=None):
    L = draw(st.integers(min_value=1, max_value=24))
    hi = max_len if max_len is not None else 3 * L + 2
    lengths = draw(st.lists(st.integers(min_value=0, max_value=hi), min_size=1, max_size=max_docs))
    return lengths, L


# --------------------------------------------------------------------------- bfd: structure


@given(corpus(), st.sampled_from(OVERFLOW))
def test_bfd_covers_every_token_once_or_accounts_for_it(case, overflow):
    lengths, L = case
    try:
        plan = plan_bfd(lengths, L, overflow=overflow)
    except PlanError:
        items, _ = ref_items(lengths, L, overflow)
        assert not items  # the only reason to refuse: nothing to pack
        return
    covered = {d: [] for d in range(len(lengths))}
    for d, s, n in zip(plan.doc.tolist(), plan.start.tolist(), plan.length.tolist()):
        covered[d].append((s, n, "row"))
    for d, s, n in zip(plan.lost.doc.tolist(), plan.lost.start.tolist(), plan.lost.length.tolist()):
        covered[d].append((s, n, "lost"))
    for d, n in enumerate(lengths):
        spans = sorted(covered[d])
        assert sum(x[1] for x in spans) == n
        pos = 0
        for s, k, _ in spans:  # contiguous, no overlap, no gap, no empty piece
            assert s == pos and k > 0
            pos += k
        kinds = [x[2] for x in spans]
        if n > L and overflow == "truncate":
            assert spans == [(0, L, "row"), (L, n - L, "lost")]
        if n > L and overflow == "drop":
            assert spans == [(0, n, "lost")]
        if overflow == "split" or n <= L:
            assert set(kinds) <= {"row"}
    assert (plan.length > 0).all() and (plan.length <= L).all()


@given(corpus(), st.sampled_from(OVERFLOW))
def test_bfd_rows_hold_whole_documents_or_pieces_and_never_exceed_L(case, overflow):
    lengths, L = case
    try:
        plan = plan_bfd(lengths, L, overflow=overflow)
    except PlanError:
        return
    assert plan.window == L and plan.strategy == "bfd" and plan.overflow == overflow
    assert (plan.row_tokens() <= L).all() and (plan.row_tokens() > 0).all()
    assert plan.row_offsets[0] == 0 and (np.diff(plan.row_offsets) > 0).all()
    for r in map(plan.row, range(plan.rows)):
        assert len(set(r.doc.tolist())) == len(r)  # a document at most once per row
        for d, s, n in zip(r.doc.tolist(), r.start.tolist(), r.length.tolist()):
            full = lengths[d]
            if full <= L:
                assert (s, n) == (0, full)  # whole document
            elif overflow == "split":
                assert s % L == 0 and n == min(L, full - s)  # an L-aligned piece
            else:
                assert (s, n) == (0, L)  # truncated to its first L tokens


@given(corpus(), st.sampled_from(OVERFLOW))
def test_bfd_equals_the_one_item_at_a_time_reference(case, overflow):
    lengths, L = case
    expected = ref_bfd(lengths, L, overflow)
    if not expected:
        with pytest.raises(PlanError):
            plan_bfd(lengths, L, overflow=overflow)
        return
    assert rows_of(plan_bfd(lengths, L, overflow=overflow)) == expected


@given(st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=400), st.integers(min_value=1, max_value=60))
def test_bfd_equals_the_reference_on_larger_inputs(lengths, L):
    """Many items per length class: bucket walks with several rows per capacity."""
    assert rows_of(plan_bfd(lengths, L)) == ref_bfd(lengths, L)


@pytest.mark.parametrize("L", [255, 256, 257, 4096, 65535, 65536, 65537, 100_000])
def test_bfd_equals_the_reference_at_large_seq_lengths(L):
    """Across the sort-key widths (uint8, uint16, int64) and with long documents."""
    rng = np.random.default_rng(L)
    lengths = np.concatenate([rng.integers(0, L + 1, 150), rng.integers(1, 40, 100), rng.integers(L - 3, 3 * L, 20)])
    for overflow in OVERFLOW:
        assert rows_of(plan_bfd(lengths, L, overflow=overflow)) == ref_bfd(lengths.tolist(), L, overflow)


@given(corpus(), st.sampled_from(OVERFLOW))
def test_bfd_accounting_adds_up(case, overflow):
    lengths, L = case
    try:
        plan = plan_bfd(lengths, L, overflow=overflow)
    except PlanError:
        return
    s = plan.stats
    items, lost = ref_items(lengths, L, overflow)
    a = np.array(lengths)
    assert s.documents_in == len(lengths)
    assert s.documents_packed == len({d for d, _, _ in items})
    assert s.documents_dropped == len(lengths) - s.documents_packed
    assert s.documents_empty == int((a == 0).sum())
    assert s.documents_split == (int((a > L).sum()) if overflow == "split" else 0)
    assert s.documents_truncated == (int((a > L).sum()) if overflow == "truncate" else 0)
    assert s.tokens_in == sum(lengths) == s.tokens_packed + s.tokens_lost
    assert s.tokens_packed == sum(n for _, _, n in items) == int(plan.length.sum())
    assert s.tokens_lost == sum(n for _, _, n in lost) == plan.lost.tokens()
    assert s.rows == plan.rows == len(plan)
    assert s.padding_tokens == plan.rows * L - s.tokens_packed == int((L - plan.row_tokens()).sum())
    assert s.efficiency == pytest.approx(s.tokens_packed / (plan.rows * L))
    assert s.check() is s


# --------------------------------------------------------------------------- bfd: quality


@given(corpus(max_len=None))
def test_bfd_is_an_any_fit_packing(case):
    """A row is opened only for a piece that fits no earlier row, and the rows are numbered
    as they open: for rows i < j, row i's final load + row j's first (largest) piece > L."""
    lengths, L = case
    try:
        plan = plan_bfd(lengths, L)
    except PlanError:
        return
    loads = plan.row_tokens()
    first = plan.length[plan.row_offsets[:-1]]
    assert (np.diff(first) <= 0).all()  # rows open in decreasing order of their first piece
    for j in range(1, plan.rows):
        assert (loads[:j] + first[j] > L).all()


@given(corpus(max_len=None))
def test_bfd_never_uses_more_rows_than_next_fit_decreasing(case):
    """Any any-fit packing uses at most the rows of next fit on the same order (each
    next-fit row's items open at most one new row), so BFD <= NFD. (BFD is not always <=
    next fit in input order, nor <= first fit decreasing: those orders differ.)"""
    lengths, L = case
    items, _ = ref_items(lengths, L, "split")
    if not items:
        return
    sizes = sorted((n for _, _, n in items), reverse=True)
    rows = plan_bfd(lengths, L).rows
    assert -(-sum(sizes) // L) <= rows <= next_fit(sizes, L)


@settings(max_examples=150)
@given(st.integers(min_value=2, max_value=20).flatmap(
    lambda L: st.tuples(st.lists(st.integers(min_value=1, max_value=L), min_size=1, max_size=8), st.just(L))))
def test_bfd_against_the_brute_forced_optimum(case):
    """BFD is a heuristic: never below the optimum, within Johnson's 11/9 OPT + 4 bound,
    and optimal when every item is longer than L/2 (one per row)."""
    sizes, L = case
    rows, opt = plan_bfd(sizes, L).rows, optimum(sizes, L)
    assert opt <= rows <= 11 * opt / 9 + 4
    if all(2 * x > L for x in sizes):
        assert rows == opt == len(sizes)


@pytest.mark.parametrize(("sizes", "L", "bfd", "opt"), [
    ([4, 3, 3, 2, 2, 2], 8, 3, 2),      # BFD is not optimal: {4,3}, {3,2,2}, {2} vs {4,2,2}, {3,3,2}
    ([5, 4, 3, 3, 1], 8, 2, 2),          # {5,3}, {4,3,1}
    ([6, 6, 2, 2], 8, 2, 2),
    ([3, 3, 3, 3, 3, 3], 8, 3, 3),       # 2 per row, 2 tokens of padding each
])
def test_bfd_known_answers(sizes, L, bfd, opt):
    assert plan_bfd(sizes, L).rows == bfd
    assert optimum(sizes, L) == opt


def test_bfd_on_a_realistic_corpus_is_within_half_a_percent_of_the_bound():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(400), 1.0, 200_000), 1, 16_384).astype(np.int64)
    for L in (2048, 8192):
        for overflow in OVERFLOW:
            s = plan_bfd(lengths, L, overflow=overflow).stats
            assert s.rows <= 1.005 * s.lower_bound_rows, (L, overflow, s)
            assert s.efficiency > 0.99


# --------------------------------------------------------------------------- bfd: determinism


@given(corpus(), st.sampled_from(OVERFLOW), st.randoms(use_true_random=False))
def test_bfd_is_deterministic_and_depends_only_on_lengths(case, overflow, rnd):
    lengths, L = case
    try:
        a = plan_bfd(lengths, L, overflow=overflow)
    except PlanError:
        return
    assert a.equals(plan_bfd(np.array(lengths, dtype=np.int32), L, overflow=overflow))
    assert a.equals(plan_bfd(list(lengths), L, overflow=overflow))
    # relabelling the documents relabels the plan: the same row shapes; with no tied lengths,
    # the same documents in the same places
    perm = list(range(len(lengths)))
    rnd.shuffle(perm)
    b = plan_bfd([lengths[p] for p in perm], L, overflow=overflow)
    assert np.array_equal(a.row_offsets, b.row_offsets) and np.array_equal(a.length, b.length)
    if len(set(lengths)) == len(lengths) and max(lengths) <= L:
        assert np.array_equal(np.array(perm)[b.doc], a.doc) and np.array_equal(a.start, b.start)


def test_bfd_ties_go_by_document_index():
    plan = plan_bfd([3, 5, 3, 5, 3], 8)
    assert rows_of(plan) == [[(1, 0, 5), (0, 0, 3)], [(3, 0, 5), (2, 0, 3)], [(4, 0, 3)]]


# --------------------------------------------------------------------------- bfd: edge cases


def test_bfd_documents_of_exactly_L_and_L_plus_one():
    L = 8
    plan = plan_bfd([8, 9, 8, 1], L)
    assert rows_of(plan) == [[(0, 0, 8)], [(1, 0, 8)], [(2, 0, 8)], [(1, 8, 1), (3, 0, 1)]]
    assert plan.stats.documents_split == 1 and plan.stats.tokens_lost == 0
    t = plan_bfd([8, 9, 8, 1], L, overflow="truncate")
    assert rows_of(t) == [[(0, 0, 8)], [(1, 0, 8)], [(2, 0, 8)], [(3, 0, 1)]]
    assert t.stats.tokens_lost == 1 and t.stats.documents_truncated == 1
    assert t.lost.equals(Ranges(np.array([1]), np.array([8]), np.array([1])))
    d = plan_bfd([8, 9, 8, 1], L, overflow="drop")
    assert rows_of(d) == [[(0, 0, 8)], [(2, 0, 8)], [(3, 0, 1)]]
    assert d.stats.documents_dropped == 1 and d.stats.tokens_lost == 9


def test_bfd_seq_length_one():
    plan = plan_bfd([1, 3, 0, 2], 1)
    assert plan.rows == 6 and (plan.length == 1).all()
    assert rows_of(plan)[:4] == [[(0, 0, 1)], [(1, 0, 1)], [(1, 1, 1)], [(1, 2, 1)]]
    t = plan_bfd([1, 3, 0, 2], 1, overflow="truncate")
    assert t.rows == 3 and t.stats.tokens_lost == 3 and t.stats.efficiency == 1.0


def test_bfd_every_document_over_long():
    assert plan_bfd([10, 20], 4).rows == 8  # 7 pieces of 4 tokens, one of 2
    assert plan_bfd([10, 20], 4, overflow="truncate").rows == 2
    with pytest.raises(PlanError, match="longer than seq_length 4 and overflow='drop'"):
        plan_bfd([10, 20], 4, overflow="drop")


def test_bfd_zero_length_documents_are_dropped_as_empty():
    plan = plan_bfd([0, 3, 0], 4)
    assert rows_of(plan) == [[(1, 0, 3)]]
    s = plan.stats
    assert (s.documents_packed, s.documents_dropped, s.documents_empty, s.tokens_lost) == (1, 2, 2, 0)
    with pytest.raises(PlanError, match="every document is empty"):
        plan_bfd([0, 0], 4)


def test_bfd_empty_input_and_bad_arguments():
    with pytest.raises(PlanError, match="no documents"):
        plan_bfd([], 4)
    for bad in ([[1, 2]], [1.5, 2.0], [3, -1]):
        with pytest.raises(PlanError):
            plan_bfd(bad, 4)
    for L in (0, -3, 2.0, True):
        with pytest.raises(PlanError, match="seq_length"):
            plan_bfd([1], L)
    with pytest.raises(PlanError, match="overflow"):
        plan_bfd([1], 4, overflow="wrap")
    assert issubclass(PlanError, ValueError) and issubclass(PlanError, SFTPackError)


def test_best_fit_from_counts():
    counts = np.zeros(9, np.int64)
    counts[[5, 3]] = [2, 3]  # lengths 5, 5, 3, 3, 3 at L = 8
    row, n = best_fit(counts, 8)
    assert row.tolist() == [0, 1, 0, 1, 2] and n == 3


# --------------------------------------------------------------------------- plan objects


def test_plans_are_read_only():
    plan = plan_bfd([3, 4, 9], 4)
    for a in (plan.doc, plan.start, plan.length, plan.row_offsets, plan.lost.doc, plan.row(0).doc):
        with pytest.raises(ValueError):
            a[0] = 7
    with pytest.raises(AttributeError):
        plan.seq_length = 5
    c = plan_concat([3, 4, 9], 4, seed=1)
    with pytest.raises(ValueError):
        c.offsets[0] = 1
    with pytest.raises(IndexError):
        plan.row(plan.rows)
    assert plan.row(-1).equals(plan.row(plan.rows - 1))


def test_stream_starts_map_pieces_into_the_store():
    plan = plan_bfd([3, 9, 2], 4)
    doc_offsets = np.array([0, 3, 12, 14])
    starts = plan.stream_starts(doc_offsets)
    tokens = np.repeat([0, 1, 2], [3, 9, 2])  # token = owning document
    for s, d, n in zip(starts, plan.doc, plan.length):
        assert (tokens[s : s + n] == d).all()


def test_check_raises_a_specific_error():
    good = plan_bfd([3, 4, 9], 4, overflow="truncate").stats
    fields = good.__dict__
    for change in ({"tokens_lost": good.tokens_lost + 1}, {"documents_dropped": 1}, {"documents_empty": 2},
                   {"rows": 1}, {"documents_split": 5}, {"supervised_in": 1, "supervised_lost": 2}):
        with pytest.raises(AccountingError, match="plan accounting"):
            PlanStats(**{**fields, **change}).check()


def test_make_plan_registry():
    assert set(STRATEGIES) == {"concat", "bfd"}
    assert make_plan("bfd", [3, 4], 4, overflow="drop").equals(plan_bfd([3, 4], 4, overflow="drop"))
    assert isinstance(make_plan("concat", [3, 4], 4), ConcatPlan)
    with pytest.raises(PlanError, match="unknown packing strategy"):
        make_plan("ffd", [3], 4)


# --------------------------------------------------------------------------- concat


@given(corpus(max_len=30), st.one_of(st.none(), st.integers(min_value=0, max_value=2**32)))
def test_concat_matches_the_materialised_stream(case, seed):
    lengths, L = case
    n = len(lengths)
    order = list(range(n)) if seed is None else np.random.default_rng(seed).permutation(n).tolist()
    stream = brute_stream(lengths, order)
    if num_rows(len(stream), L) == 0:
        with pytest.raises(PlanError, match="too few for one row"):
            plan_concat(lengths, L, seed=seed)
        return
    plan = plan_concat(lengths, L, seed=seed)
    assert plan.rows == num_rows(len(stream), L) and plan.window == L + 1
    materialised = plan.to_plan()
    assert isinstance(materialised, Plan) and materialised.rows == plan.rows
    for i in range(plan.rows):
        start, stop = row_span(i, L)
        assert plan.span(i) == (start, stop)
        expected = runs(stream[start:stop])
        got = plan.row(i)
        assert list(zip(got.doc.tolist(), got.start.tolist(), got.length.tolist())) == expected
        assert materialised.row(i).equals(got)
        assert row_pieces(plan.offsets, plan.order, i, L).equals(got)
    tail = runs(stream[plan.rows * L :])
    assert list(zip(plan.lost.doc.tolist(), plan.lost.start.tolist(), plan.lost.length.tolist())) == tail
    s = plan.stats
    assert s.tokens_lost == dropped_tail(len(stream), L) == plan.lost.tokens()
    assert s.tokens_packed == plan.rows * L and s.efficiency == 1.0 and s.padding_tokens == 0
    in_rows = {d for d, _ in stream[: plan.rows * L]}
    assert s.documents_packed == len(in_rows) and s.documents_dropped == n - len(in_rows)
    assert s.documents_empty == sum(1 for x in lengths if x == 0)
    row_sets = {}
    for p, (d, _) in enumerate(stream[: plan.rows * L]):
        row_sets.setdefault(d, set()).add(p // L)
    assert s.documents_split == sum(1 for v in row_sets.values() if len(v) > 1)
    assert s.documents_truncated == sum(1 for d, _, _ in tail if d in in_rows)


@given(st.integers(min_value=1, max_value=3000), st.integers(min_value=1, max_value=64))
def test_concat_identity_order_is_the_pack_arithmetic(n_tokens, L):
    """One document per token or one big document: rows and spans are sftpack.pack's."""
    for lengths in ([n_tokens], [1] * n_tokens):
        if num_rows(n_tokens, L) == 0:
            with pytest.raises(PlanError):
                plan_concat(lengths, L)
            continue
        plan = plan_concat(lengths, L)
        assert plan.rows == num_rows(n_tokens, L)
        assert plan.stats.tokens_lost == dropped_tail(n_tokens, L)
        for i in (0, plan.rows - 1):
            a, b = row_span(i, L)
            r = plan.row(i)
            if len(lengths) == 1:
                assert r.equals(Ranges([0], [a], [b - a]))
            else:
                assert r.doc.tolist() == list(range(a, b))


def test_concat_shuffle_is_the_build_permutation():
    lengths = np.arange(1, 40)
    plan = plan_concat(lengths, 16, seed=7)
    order = np.random.default_rng(7).permutation(len(lengths))
    assert np.array_equal(plan.order, order)
    assert np.array_equal(plan.offsets, stream_offsets(lengths, order))
    assert plan_concat(lengths, 16, seed=7).to_plan().equals(plan.to_plan())


def test_concat_errors():
    with pytest.raises(PlanError, match="too few"):
        plan_concat([], 4)
    with pytest.raises(PlanError, match="too few"):
        plan_concat([2, 2], 4)  # 4 tokens: a row needs 5
    assert plan_concat([2, 3], 4).rows == 1
    with pytest.raises(IndexError):
        plan_concat([2, 3], 4).row(1)


# --------------------------------------------------------------------------- supervised accounting


def _masks(data, lengths):
    return [np.array(data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)), dtype=np.int64) for n in lengths]


def _brute_supervised_lost(lost, masks):
    return sum(int(masks[d][s : s + n].sum()) for d, s, n in zip(lost.doc, lost.start, lost.length))


@given(corpus(max_len=30), st.sampled_from(["concat"] + OVERFLOW), st.data())
def test_supervised_tokens_lost(case, strategy, data):
    lengths, L = case
    masks = _masks(data, lengths)
    counts = np.array([int(m.sum()) for m in masks], dtype=np.int64)
    calls = []

    def prefix(doc, n):
        calls.append(len(doc))
        assert ((n > 0) & (n < np.array(lengths)[doc])).all()  # only asked about real cuts
        return np.array([int(masks[d][:k].sum()) for d, k in zip(doc, n)])

    def make(**kw):
        if strategy == "concat":
            return plan_concat(lengths, L, seed=3, **kw)
        return plan_bfd(lengths, L, overflow=strategy, **kw)

    try:
        plan = make(supervised=counts, supervised_prefix=prefix)
    except PlanError:
        return
    assert len(calls) <= 1  # one batched call
    s = plan.stats
    assert s.supervised_in == int(counts.sum())
    assert s.supervised_lost == _brute_supervised_lost(plan.lost, masks)
    partial = any(0 < st_ or st_ + n < lengths[d] for d, st_, n in zip(plan.lost.doc, plan.lost.start, plan.lost.length))
    without = make(supervised=counts).stats
    assert without.supervised_lost == (None if partial else s.supervised_lost)
    assert make().stats.supervised_in is None


def test_supervised_validation():
    with pytest.raises(PlanError, match="one integer count per document"):
        plan_bfd([3, 4], 4, supervised=[1])
    with pytest.raises(PlanError, match="within 0..length"):
        plan_bfd([3, 4], 4, supervised=[4, 0])
    with pytest.raises(PlanError, match="supervised_prefix returned"):
        plan_bfd([3, 9], 4, overflow="truncate", supervised=[1, 9], supervised_prefix=lambda d, n: n + 1)


# --------------------------------------------------------------------------- TRL


def test_bfd_rows_equal_trl_pack_bfd():
    """TRL's `_pack_bfd` on one batch holding every example gives the same rows."""
    import pyarrow as pa
    from trl.data_utils import _pack_bfd as pack  # private: if it moves, find its new home
    rng = np.random.default_rng(5)
    lengths = np.concatenate([rng.integers(1, 40, 300), [0, 32, 33, 64, 65, 100]])
    L = 32
    ids = [[d] * int(n) for d, n in enumerate(lengths)]  # a token names its document
    for overflow in ("split", "truncate"):
        out = pack(pa.table({"input_ids": ids}), L, on_seq_length_overflow=overflow).to_pydict()
        trl_rows = [list(zip(itertools.accumulate([0] + s[:-1]), s)) for s in out["seq_lengths"]]
        trl_docs = [[row[a] for a, _ in r] for row, r in zip(out["input_ids"], trl_rows)]
        plan = plan_bfd(lengths, L, overflow=overflow)
        assert [r.doc.tolist() for r in map(plan.row, range(plan.rows))] == trl_docs
        assert [r.length.tolist() for r in map(plan.row, range(plan.rows))] == out["seq_lengths"]
