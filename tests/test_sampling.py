"""The batch schedule: epoch orders, rank splits, tails, positions and elastic resume (pure numpy)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sftpack.errors import ConfigError
from sftpack.sampling import Schedule, StatefulBatchSampler, check_resume, epoch_order


def rank_batches(rows, batch_size, world_size, epoch=0, **kw):
    """Every rank's batches of one epoch, from each rank's own schedule."""
    return [list(Schedule(rows, batch_size, world_size, rank, **kw).batches(epoch)) for rank in range(world_size)]


def interleaved(per_rank):
    """The ranks' batches step by step: what the global steps served, in order."""
    steps = {len(b) for b in per_rank}
    assert len(steps) == 1, "ranks got different batch counts"
    return [sum((per_rank[r][k] for r in range(len(per_rank))), []) for k in range(steps.pop())]


@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(0, 120),
    batch_size=st.integers(1, 7),
    world_size=st.sampled_from([1, 2, 3, 4, 8]),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**32),
    epoch=st.integers(0, 5),
)
def test_ranks_cover_every_row_once_with_equal_batch_counts(
    rows, batch_size, world_size, shuffle, drop_last, seed, epoch
):
    kw = {"shuffle": shuffle, "seed": seed, "drop_last": drop_last}
    per_rank = rank_batches(rows, batch_size, world_size, epoch, **kw)
    g = batch_size * world_size
    steps = interleaved(per_rank)  # equal batch counts on every rank
    for r in range(world_size):
        assert len(per_rank[r]) == Schedule(rows, batch_size, world_size, r, **kw).steps
    order = epoch_order(rows, shuffle=shuffle, seed=seed, epoch=epoch)
    stream = [i for step in steps for i in step]
    if world_size == 1 and not drop_last:  # the reference: ceil(rows / B) batches, the last one short
        assert len(steps) == -(-rows // batch_size)
        assert all(len(b) == batch_size for b in steps[:-1])
        assert stream == order.tolist()
    elif drop_last:  # full global batches only; the rows that cannot fill one are left out
        assert len(steps) == rows // g and all(len(b) == g for b in steps)
        assert stream == order[: len(steps) * g].tolist()
        assert len(set(stream)) == len(stream) and rows - len(stream) < g
    else:  # every row once, then the tail completed from the start of the order
        assert len(steps) == -(-rows // g) and all(len(b) == g for b in steps)
        assert sorted(stream[:rows]) == list(range(rows))
        assert stream == [int(order[i % rows]) for i in range(len(stream))]
    # every rank's batches are disjoint from the others' (before padding repeats)
    seen = [set(i for b in per_rank[r] for i in b) for r in range(world_size)]
    if drop_last or rows % g == 0:
        assert sum(map(len, seen)) == len(set().union(*seen))


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 100), batch_size=st.integers(1, 6), world_size=st.sampled_from([1, 2, 3, 4, 8]))
def test_interleaved_ranks_are_the_one_process_order_at_the_global_batch(rows, batch_size, world_size):
    g = batch_size * world_size
    one = list(Schedule(rows, g, 1, shuffle=True, seed=7).batches(3))
    many = interleaved(rank_batches(rows, batch_size, world_size, 3, shuffle=True, seed=7))
    assert len(one) == len(many)
    for a, b in zip(one, many):
        assert b[: len(a)] == a  # the one-process last batch is short; many ranks pad it


def test_orders_depend_on_seed_and_epoch_only():
    a = epoch_order(1000, shuffle=True, seed=3, epoch=0)
    assert np.array_equal(a, epoch_order(1000, shuffle=True, seed=3, epoch=0))
    assert sorted(a.tolist()) == list(range(1000))
    assert not np.array_equal(a, epoch_order(1000, shuffle=True, seed=3, epoch=1))
    assert not np.array_equal(a, epoch_order(1000, shuffle=True, seed=4, epoch=0))
    assert epoch_order(5, shuffle=False, seed=3, epoch=9).tolist() == [0, 1, 2, 3, 4]


@settings(max_examples=100, deadline=None)
@given(
    rows=st.integers(0, 90),
    batch_size=st.integers(1, 5),
    world_size=st.sampled_from([1, 2, 3, 4, 8]),
    drop_last=st.booleans(),
)
def test_positions_invert(rows, batch_size, world_size, drop_last):
    s = Schedule(rows, batch_size, world_size, drop_last=drop_last)
    for k in range(s.steps + 1):
        assert s.steps_after(s.rows_after(k)) == k
    assert s.rows_after(s.steps) == s.epoch_rows


def test_position_inside_a_step_is_refused():
    with pytest.raises(ConfigError, match="inside a global batch of 8"):
        Schedule(100, 4, 2).steps_after(12)


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="rank must be below world_size=2"):
        Schedule(10, 2, 2, rank=2)
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1"):
        Schedule(10, 0)
    with pytest.raises(ConfigError, match="seed"):
        Schedule(10, 2, seed=-1)


def run(samplers, steps):
    """`steps` global steps from samplers (one per rank) in lockstep: each step's rows, all ranks."""

    def passes(sampler):
        while True:  # one pass after another, as a training loop over epochs would
            yield from sampler

    its = [passes(s) for s in samplers]
    out = []
    for _ in range(steps):
        out.append([i for it in its for i in next(it)])
    return out


def samplers_at(world_size, state=None, rows=101, g=12, drop_last=False):
    out = []
    for rank in range(world_size):
        s = StatefulBatchSampler(
            Schedule(rows, g // world_size, world_size, rank, shuffle=True, seed=5, drop_last=drop_last)
        )
        if state is not None:
            s.load_state_dict(json.loads(json.dumps(state)))  # states survive JSON
        out.append(s)
    return out


@pytest.mark.parametrize("drop_last", [False, True])
def test_elastic_resume_1_2_4_3_keeps_every_global_step(drop_last):
    rows, g = 101, 12
    ref = samplers_at(1, rows=rows, g=g, drop_last=drop_last)[0]
    per_epoch = len(ref)
    reference = run([ref], 2 * per_epoch)  # two epochs, one process, global batch 12
    got, state = [], None
    for world_size, steps in ((1, 3), (2, 2), (4, per_epoch - 5 + 1), (3, per_epoch - 1)):
        samplers = samplers_at(world_size, state, rows, g, drop_last)
        got += run(samplers, steps)
        states = [s.state_dict() for s in samplers]
        assert all(st == states[0] for st in states), "ranks disagree on the position"
        state = states[0]
    assert len(got) == len(reference)
    order0 = epoch_order(rows, shuffle=True, seed=5, epoch=0)
    for k, (a, b) in enumerate(zip(reference, got)):
        assert a == b[: len(a)], k  # the same rows at every global step
        assert b[len(a) :] == order0[: len(b) - len(a)].tolist() or k >= per_epoch  # tail padding: from the start


def test_elastic_resume_refusals_say_what_works():
    (s,) = samplers_at(1)
    state = s.state_dict()
    with pytest.raises(ConfigError, match=r"world size of 1, 2, 3, 4, 6, 12 \(batch_size = 12 / world size\)"):
        StatefulBatchSampler(Schedule(101, 2, 5, 0, shuffle=True, seed=5)).load_state_dict(state)
    with pytest.raises(ConfigError, match="resume with batch_size=3 at world_size=4"):
        StatefulBatchSampler(Schedule(101, 4, 4, 0, shuffle=True, seed=5)).load_state_dict(state)
    check_resume(12, 1, 6, 2)  # the same global batch: accepted


def test_state_checks():
    (s,) = samplers_at(1)
    state = s.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert set(state) == {
        "format",
        "version",
        "fingerprint",
        "seed",
        "shuffle",
        "epoch",
        "rows",
        "world_size",
        "batch_size",
    }
    other = StatefulBatchSampler(Schedule(101, 12, shuffle=True, seed=6))
    with pytest.raises(ConfigError, match="seed=5.*pass seed=5"):
        other.load_state_dict(state)
    other = StatefulBatchSampler(Schedule(100, 12, shuffle=True, seed=5))
    with pytest.raises(ConfigError, match="another dataset.*rows: 101 in the state, 100 here"):
        other.load_state_dict(state)
    with pytest.raises(ConfigError, match="version 99"):
        s.load_state_dict({**state, "version": 99})
    with pytest.raises(ConfigError, match="not an sftpack loader state"):
        s.load_state_dict({"epoch": 0})


def test_set_epoch_keeps_the_position_of_the_current_epoch_only():
    s = StatefulBatchSampler(Schedule(30, 4, shuffle=True, seed=1))
    it = iter(s)
    first = [next(it) for _ in range(3)]
    s.set_epoch(0)
    assert s.state_dict()["rows"] == 12
    assert next(iter(s)) == list(Schedule(30, 4, shuffle=True, seed=1).batches(0))[3]
    s.set_epoch(2)
    assert (s.epoch, s.state_dict()["rows"]) == (2, 0)
    assert next(iter(s)) == list(Schedule(30, 4, shuffle=True, seed=1).batches(2))[0] != first[0]


def test_a_pass_that_runs_out_moves_to_the_next_epoch():
    s = StatefulBatchSampler(Schedule(10, 4, shuffle=True, seed=1))
    e0, e1 = list(s), list(s)
    assert len(e0) == len(e1) == 3 and e0 != e1
    assert e1 == list(Schedule(10, 4, shuffle=True, seed=1).batches(1))
    assert (s.epoch, s.step) == (2, 0)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"seed": None}, "lacks seed"),
        ({"fingerprint": None}, "lacks fingerprint"),
        ({"extra": 1}, "unknown fields extra"),
        ({"batch_size": "12"}, "batch_size must be an integer >= 1"),
        ({"batch_size": 12.9}, "batch_size must be an integer >= 1"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"batch_size": -12, "world_size": -1}, "world_size must be an integer >= 1"),
        ({"shuffle": 1}, "shuffle must be True or False"),
        ({"seed": True}, "seed must be an integer >= 0"),
        ({"epoch": False}, "epoch must be an integer >= 0"),
        ({"version": True}, "version True"),
        ({"fingerprint": "101"}, "fingerprint must be a mapping"),
        ({"rows": 10**12}, "beyond the end of an epoch of 101 rows"),
        ({"rows": 120}, "beyond the end of an epoch of 101 rows"),
    ],
)
def test_a_state_is_validated_whole(change, field):
    (s,) = samplers_at(1)
    state = s.state_dict()
    for key, value in change.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    fresh = StatefulBatchSampler(Schedule(101, 12, shuffle=True, seed=5))
    with pytest.raises(ConfigError, match=field):
        fresh.load_state_dict(state)
    assert (fresh.epoch, fresh.step) == (0, 0)
    fresh.load_state_dict({**s.state_dict(), "rows": 108})  # the end of the longest tail: accepted
    assert fresh.step == 9


def test_a_position_set_during_a_pass_stops_it():
    """The pass can no longer hand out batches the position does not count: resumed batches
    would be trained twice (or skipped)."""
    schedule = Schedule(30, 4, shuffle=True, seed=1)
    s = StatefulBatchSampler(schedule)
    start = s.state_dict()
    it = iter(s)
    served = [next(it) for _ in range(3)]
    s.load_state_dict(start)
    with pytest.raises(ConfigError, match="between passes"):
        next(it)
    assert s.state_dict() == start
    assert next(iter(s)) == served[0]  # a new pass serves from the loaded position
    it = iter(s)
    next(it)
    s.set_epoch(3)
    with pytest.raises(ConfigError, match="between passes"):
        next(it)
    older, newer = iter(s), iter(s)
    next(older)
    assert next(newer) == list(schedule.batches(3))[1]
    with pytest.raises(ConfigError, match="another pass"):
        next(older)
    last = iter(s)
    for _ in range(len(s) - 2):
        next(last)
    s.load_state_dict(start)  # after the last batch, before the pass ran out: no move to the next epoch
    with pytest.raises(ConfigError):
        next(last)
    assert s.state_dict() == start
