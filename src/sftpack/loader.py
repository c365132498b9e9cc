"""Batching: `iterate_batches` (sharded, deterministic, resumable batches) and collate functions."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import ConfigError
from .hf import flatten, piece_starts, row_positions
from .pack import IGNORE_INDEX, cu_seqlens
from .sampling import Schedule, StatefulBatchSampler, fingerprint_of
from .view import hf_labels


def collate(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | list[torch.Tensor] | int]:
    """Stack rows into (B, L) tensors. With boundaries, `seq_lens` stays a list (one per row)
    and `cu_seqlens`/`max_seqlen` describe the batch flattened to B*L tokens (flash-attn varlen).
    Labels are sftpack's reference (shifted) ones, for a loss that does not shift: items served
    with `labels="hf"` are refused (ConfigError), they go to `sftpack.hf.DataCollator`."""
    if len({len(item["input_ids"]) for item in items}) > 1:
        raise ValueError(
            "rows of different lengths (a bfd plan with pad=False) cannot be stacked: "
            "use collate_fn=sftpack.collate_flattened, or pad=True"
        )
    batch: dict[str, torch.Tensor | list[torch.Tensor] | int] = {
        key: torch.stack([item[key] for item in items]) for key in items[0] if key != "seq_lens"
    }
    if "labels" in batch and "input_ids" in batch:
        _refuse_aligned(batch["input_ids"], batch["labels"])  # type: ignore[arg-type]
    if "seq_lens" in items[0]:
        lens = [item["seq_lens"] for item in items]
        flat = torch.cat(lens)
        batch["seq_lens"] = lens
        batch["cu_seqlens"] = torch.from_numpy(cu_seqlens(flat.numpy()))
        batch["max_seqlen"] = int(flat.max())
    return batch


def _refuse_aligned(ids: torch.Tensor, labels: torch.Tensor) -> None:
    """Refuse (B, L) labels that are aligned with `input_ids` (labels="hf": every supervised
    label is its own input token) and not shifted (some supervised label is not the next
    input): a loss without a shift would train each token to predict itself. A batch that
    both conventions fit (no supervision, repeated tokens) passes."""
    ids_, labels_ = ids.numpy(), labels.numpy()  # numpy: cheaper than torch ops on every batch
    if ((labels_[0] != ids_[0]) & (labels_[0] != IGNORE_INDEX)).any():
        return  # the first row is not aligned, so the batch is not (the usual case, decided on one row)
    unsupervised = labels_ == IGNORE_INDEX
    if not ((labels_ == ids_) | unsupervised).all() or unsupervised.all():
        return
    if ((labels_[:, :-1] == ids_[:, 1:]) | unsupervised[:, :-1]).all():
        return
    raise ConfigError(
        "collate got labels aligned with input_ids (a dataset opened with labels='hf'): sftpack.collate and "
        "iterate_batches serve the reference (shifted) labels, for a loss that does not shift them, and these would "
        "train every token to predict itself. Batch them with sftpack.hf.DataCollator (from sftpack.hf import "
        "DataCollator; iterate_batches(..., collate_fn=DataCollator())) for a Hugging Face model, or open the "
        "dataset without labels='hf'"
    )


def collate_flattened(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Padding-free batch of reference (shifted) items for Hugging Face models, in the
    convention of transformers' `DataCollatorWithFlattening`: one (1, B*L) row,
    `position_ids` restarting at 0 for every document piece, labels unshifted (the model
    shifts them) with -100 on each piece's first token, no attention_mask, and
    `use_cache=False` (see `sftpack.hf`). Needs items with boundaries (`boundaries=True` or
    `packing="bfd"`): their `position_ids`, or `seq_lens`, whichever Trainer's
    `remove_unused_columns` left. A piece continuing a document from the previous row
    restarts its positions, so it is never mistaken for the continuation of another row.
    Items served with `labels="hf"` go to `sftpack.hf.DataCollator(padding_free=True)`.
    """
    rows = []
    for r, item in enumerate(items):
        if "position_ids" not in item and "seq_lens" not in item:
            raise ConfigError(
                "collate_flattened needs items with document boundaries (position_ids or seq_lens): open the "
                "dataset with boundaries=True (or packing='bfd')"
            )
        ids = item["input_ids"].numpy().astype(np.int64)
        shifted = item["labels"].numpy().astype(np.int64)
        _check_shifted(ids, shifted, r)
        positions = row_positions(item, len(ids))
        rows.append((ids, hf_labels(shifted, np.diff(np.append(piece_starts(positions), len(ids)))), positions))
    return {**flatten(rows), "use_cache": False}


def _check_shifted(ids: np.ndarray, labels: np.ndarray, row: int) -> None:
    """Reference labels are -100 or the next input token (the last one targets beyond the row)."""
    bad = np.flatnonzero((labels[:-1] != IGNORE_INDEX) & (labels[:-1] != ids[1:]))
    if len(bad):
        raise ConfigError(
            f"collate_flattened takes sftpack's reference (shifted) labels, but row {row} has label "
            f"{int(labels[bad[0]])} at position {int(bad[0])} where the next input is {int(ids[bad[0] + 1])}: "
            "items served with labels='hf' go to sftpack.hf.DataCollator(padding_free=True)"
        )


class Batches:
    """This rank's batches of `dataset`, epoch after epoch, resumable (see `iterate_batches`).

    A torch `DataLoader` (built once, so `persistent_workers` persist) fetches the rows the
    schedule picks; the position counts the batches handed to the caller, not those its workers
    prefetched. A pass left early is continued by the next one.
    """

    def __init__(
        self, dataset: Dataset, sampler: StatefulBatchSampler, collate_fn: Any, loader_kwargs: dict[str, Any]
    ) -> None:
        self.dataset, self.sampler = dataset, sampler
        self.loader = DataLoader(dataset, batch_sampler=_Feed(sampler), collate_fn=collate_fn, **loader_kwargs)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def __len__(self) -> int:
        """Batches in a whole epoch on this rank (a resumed pass serves the rest of them)."""
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        """One pass. `set_epoch` or `load_state_dict` during it, or another pass begun, stops
        it (ConfigError) at its next batch, so the position is always what was handed out."""
        sampler = self.sampler
        generation, epoch = sampler.begin(), sampler.epoch
        for batch in self.loader:
            sampler.check(generation)
            sampler.step += 1
            yield batch
        sampler.check(generation)
        sampler.finish(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Serve epoch `epoch` next, from its start; the current epoch keeps its position (so
        `loader.set_epoch(e)` at the top of a training loop is safe after a resume)."""
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """Where this loader stands: a small JSON-serialisable dict, the same on every rank."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: the next batch is the one an uninterrupted run would serve
        next. Refused (ConfigError) over another dataset, seed, shuffle or global batch size."""
        self.sampler.load_state_dict(state)


class _Feed:
    """The DataLoader's batch sampler: one pass from the sampler's position, leaving the
    position to `Batches`, which counts what it hands out (workers read ahead)."""

    def __init__(self, sampler: StatefulBatchSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        return self.sampler.schedule.batches(self.sampler.epoch, self.sampler.step)


def distributed_rank_world() -> tuple[int, int]:
    """torch.distributed's (rank, world size) when a process group is initialised, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batch_sampler(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    *,
    seed: int = 0,
    drop_last: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
) -> StatefulBatchSampler:
    """The batch sampler `iterate_batches` serves from, for a DataLoader of your own, e.g.
    torchdata's `StatefulDataLoader(ds, batch_sampler=batch_sampler(ds, 8, True),
    collate_fn=sftpack.collate)`, whose state then carries the sampler's. Same arguments.
    Resume through the DataLoader's `load_state_dict` (it applies at its next pass); the
    sampler's own `set_epoch`/`load_state_dict` during a pass stop that pass (ConfigError)."""
    if rank is None or world_size is None:
        dist_rank, dist_world = distributed_rank_world()
        if world_size is None:
            world_size = dist_world
        if rank is None:
            if dist_world != world_size:
                raise ConfigError(f"world_size={world_size} was given without rank=: pass rank= too")
            rank = dist_rank
    rows = len(dataset)  # type: ignore[arg-type]
    schedule = Schedule(
        rows=rows,
        batch_size=batch_size,
        world_size=world_size,
        rank=rank,
        shuffle=bool(shuffle),
        seed=seed,
        drop_last=bool(drop_last),
    )
    return StatefulBatchSampler(schedule, fingerprint_of(dataset, rows))


def iterate_batches(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    *,
    seed: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    collate_fn: Any = None,
    **loader_kwargs: Any,
) -> Batches:
    """Batches of `dataset` (dicts of (B, L) int64 tensors with the default `collate`) for one
    rank of a training job, deterministic and resumable.

    Epoch e serves the rows in an order drawn from `(seed, e)` (shuffled) or in order; global
    step k takes the next `batch_size * world_size` rows and this rank the `rank`-th
    `batch_size` of them (`sftpack.sampling` has the rules, tail included). `rank` and
    `world_size` default to torch.distributed's when it is initialised, else 0 and 1. On one
    process `len()` is ceil(rows / batch_size), the last batch short unless `drop_last`; over
    several every rank gets the same number of batches, the last global batch completed by
    repeating rows from the start of the order (`drop_last=True`: dropped instead).
    `set_epoch(e)`, `state_dict()` and `load_state_dict(state)` make a restarted (or resized,
    same global batch) job continue the row stream exactly. Other keyword arguments go to
    torch's DataLoader (`pin_memory`, `persistent_workers`, `multiprocessing_context`, ...).
    """
    for key in ("sampler", "batch_sampler"):
        if key in loader_kwargs:
            raise ConfigError(f"iterate_batches picks the rows itself: drop the DataLoader argument {key}=")
    sampler = batch_sampler(
        dataset, batch_size, shuffle, seed=seed, drop_last=drop_last, rank=rank, world_size=world_size
    )
    kwargs = {"num_workers": num_workers, **loader_kwargs}
    return Batches(dataset, sampler, collate if collate_fn is None else collate_fn, kwargs)
