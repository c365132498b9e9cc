"""iterate_batches in training jobs: resume matrix, workers, fingerprints, StatefulDataLoader,
and a 2-process torch.distributed run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sftpack
from sftpack.errors import ConfigError

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample.jsonl"
EPOCHS = 2


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    cache = tmp_path_factory.mktemp("loader-cache")
    return sftpack.PackedSFTDataset("llama3", SAMPLE, 16, boundaries=True, cache_dir=cache).path


@pytest.fixture(scope="module")
def ds(store):
    return sftpack.open_packed(store, shuffle=True, seed=3)


def take(loader, count, save_every=False):
    """`count` batches from successive passes (epochs), as a training loop sees them, and the
    loader's state after the last; `save_every` calls state_dict() after every batch."""
    out = []
    while len(out) < count:
        for batch in loader:
            out.append(batch)
            if save_every:
                loader.state_dict()
            if len(out) == count:
                break
    return out, json.loads(json.dumps(loader.state_dict()))


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if key == "seq_lens":
                assert all(torch.equal(p, q) for p, q in zip(x[key], y[key]))
            elif isinstance(x[key], torch.Tensor):
                assert torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


def make(ds, workers, **kw):
    return sftpack.iterate_batches(ds, 4, True, seed=11, num_workers=workers, **kw)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_matrix(ds, workers):
    per_epoch = len(make(ds, workers))
    assert per_epoch == -(-len(ds) // 4)
    total = EPOCHS * per_epoch
    reference, _ = take(make(ds, 0), total)
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(reference, reference[per_epoch:]))
    k_random = int(torch.randint(2, per_epoch - 1, (1,), generator=torch.Generator().manual_seed(workers)))
    for k in (0, 1, k_random, per_epoch - 1, per_epoch, per_epoch + 2):  # last batch, epoch boundary, next epoch
        head, state = take(make(ds, workers), k)
        resumed = make(ds, workers)
        resumed.load_state_dict(state)
        tail, _ = take(resumed, total - k)
        same(head + tail, reference)
    # two resumes in a row
    head, state = take(make(ds, workers), 3)
    again = make(ds, workers)
    again.load_state_dict(state)
    middle, state = take(again, per_epoch)
    last = make(ds, workers)
    last.load_state_dict(state)
    tail, _ = take(last, total - 3 - per_epoch)
    same(head + middle + tail, reference)


def test_workers_and_state_dict_calls_leave_the_order_alone(ds):
    reference, _ = take(make(ds, 0), 2 * len(make(ds, 0)))
    watched, _ = take(make(ds, 0), len(reference), save_every=True)
    same(watched, reference)
    workers, _ = take(make(ds, 2, persistent_workers=True), len(reference), save_every=True)
    same(workers, reference)


def test_set_epoch_loop_after_a_resume(ds):
    """The usual loop (`set_epoch(e)` then a pass) resumed with the epoch it was in."""
    loader = make(ds, 0)
    reference = []
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        reference += list(loader)
    first = make(ds, 0)
    first.set_epoch(0)
    head = []
    for batch in first:
        head.append(batch)
        if len(head) == len(first):  # saved after the epoch's last batch, before the pass ended
            break
    state = first.state_dict()
    resumed = make(ds, 0)
    resumed.load_state_dict(state)
    tail = []
    for epoch in range(state["epoch"], EPOCHS):
        resumed.set_epoch(epoch)
        tail += list(resumed)
    same(head + tail, reference)


def test_load_state_dict_during_a_pass_stops_it(ds):
    """A rewind inside a pass: the old pass must not go on serving batches the position does
    not count (a resume would then train them twice)."""
    reference, _ = take(make(ds, 0), 4)
    loader = make(ds, 0)
    start = loader.state_dict()
    it = iter(loader)
    same([next(it) for _ in range(3)], reference[:3])
    loader.load_state_dict(start)
    with pytest.raises(ConfigError, match="call it between passes"):
        next(it)
    assert loader.state_dict() == start
    head, state = take(loader, 2)
    same(head, reference[:2])
    assert state["rows"] == 2 * 4
    older, newer = iter(loader), iter(loader)
    same([next(older), next(newer)], reference[2:4])
    with pytest.raises(ConfigError, match="another pass"):
        next(older)


def test_a_state_from_another_dataset_is_refused(store, ds):
    _, state = take(make(ds, 0), 2)
    other = sftpack.open_packed(store, shuffle=True, seed=3, seq_length=8)
    with pytest.raises(ConfigError, match=r"another dataset.*seq_length: 16 in the state, 8 here"):
        make(other, 0).load_state_dict(state)
    reshuffled = sftpack.open_packed(store, shuffle=True, seed=4)
    with pytest.raises(ConfigError, match=r"seed: 3 in the state, 4 here"):
        make(reshuffled, 0).load_state_dict(state)
    with pytest.raises(ConfigError, match="seed=11"):
        sftpack.iterate_batches(ds, 4, True, seed=12).load_state_dict(state)
    make(sftpack.open_packed(store, shuffle=True, seed=3), 0).load_state_dict(state)  # the same dataset reopened


def test_elastic_resume_through_the_loader(ds):
    """Saved by one process at batch 6, resumed by 2 ranks at batch 3: each global step's rows
    are the rows the one-process run serves."""
    one = sftpack.iterate_batches(ds, 6, True, seed=2)
    reference, _ = take(one, len(one))
    _, state = take(sftpack.iterate_batches(ds, 6, True, seed=2), 4)
    ranks = [sftpack.iterate_batches(ds, 3, True, seed=2, rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(state)
    streams = [list(loader) for loader in ranks]
    assert len(streams[0]) == len(streams[1]) == len(reference) - 4
    for k, (a, b) in enumerate(zip(*streams)):
        ids = torch.cat([a["input_ids"], b["input_ids"]])
        want = reference[4 + k]["input_ids"]
        assert torch.equal(ids[: len(want)], want)


@pytest.mark.parametrize("workers", [0, 2])
def test_inside_torchdata_stateful_dataloader(ds, workers):
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader():
        sampler = sftpack.batch_sampler(ds, 4, True, seed=5)
        return StatefulDataLoader(ds, batch_sampler=sampler, collate_fn=sftpack.collate, num_workers=workers)

    dl = loader()
    reference = list(dl) + list(dl)  # two epochs: the second pass serves epoch 1
    per_epoch = len(dl)
    for k in (1, per_epoch - 2, per_epoch):
        first = loader()
        it, head = iter(first), []
        for _ in range(k):
            head.append(next(it))
        state = first.state_dict()
        del it
        resumed = loader()
        resumed.load_state_dict(state)
        tail = list(resumed)
        same(head + tail, reference[:per_epoch])
        same(list(resumed), reference[per_epoch:])
    finished = loader()
    list(finished)
    resumed = loader()
    resumed.load_state_dict(finished.state_dict())  # saved after the pass ended: the next epoch follows
    same(list(resumed), reference[per_epoch:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    import sftpack

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 23
        def __getitem__(self, i):
            return {"input_ids": torch.tensor([i])}

    dist.init_process_group("gloo", init_method=sys.argv[1], rank=int(sys.argv[2]), world_size=2)
    loader = sftpack.iterate_batches(Rows(), 3, True, seed=9)  # rank and world size from torch.distributed
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        epochs.append([b["input_ids"].flatten().tolist() for b in loader])
    counts = torch.tensor([len(epochs[0])])
    dist.all_reduce(counts)  # a collective per rank: both reach it
    json.dump({"len": len(loader), "epochs": epochs, "total": int(counts)}, open(sys.argv[3], "w"))
    dist.destroy_process_group()
    """
)


def test_two_process_gloo_ranks_are_disjoint_and_cover_every_row(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    url = f"tcp://127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), url, str(rank), str(tmp_path / f"rank{rank}.json")],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for rank in range(2)
    ]
    try:
        for p in procs:
            assert p.wait(timeout=120) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert out[0]["len"] == out[1]["len"] == 4  # ceil(23 / 6) global steps
    assert out[0]["total"] == 8
    for epoch in range(2):
        batches = [out[r]["epochs"][epoch] for r in range(2)]
        assert len(batches[0]) == len(batches[1]) == 4
        stream = [i for k in range(4) for r in range(2) for i in batches[r][k]]
        assert len(stream) == 24 and stream[23] == stream[0]  # the tail completed from the start of the order
        rows0 = [i for b in batches[0] for i in b]
        rows1 = [i for b in batches[1] for i in b][:-1]  # less that repeated row
        assert set(rows0).isdisjoint(rows1)
        assert sorted(rows0 + rows1) == list(range(23))
    assert out[0]["epochs"][0] != out[0]["epochs"][1]
