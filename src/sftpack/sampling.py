"""Which rows each rank trains on, in which order, and where a resumed job picks up (pure numpy).

One epoch is one pass over a global row order: a permutation drawn from `(seed, epoch)` when
shuffling, else the rows in order. Global step k takes the next `global_batch = batch_size *
world_size` rows of it and rank r trains on the r-th block of `batch_size` of them, so the
ranks' batches interleaved are the one-process order at batch `global_batch`. The tail:

- one process: the last batch is short (`drop_last=False`, the reference) or dropped;
- several: every rank gets the same number of batches, so that no rank waits on a collective
  the others never reach. `drop_last=False` (default, like torch's `DistributedSampler`)
  completes the last global batch with rows repeated from the start of the epoch's order;
  `drop_last=True` drops the rows that do not fill a global batch.

A position is the number of global rows consumed in the epoch: it is the same on every rank and
stays valid when the job resumes at another world size with the same global batch.
No torch and no I/O here: `sftpack.loader` drives it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError

STATE_FORMAT = "sftpack.batches"
STATE_VERSION = 1


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def epoch_order(rows: int, *, shuffle: bool, seed: int = 0, epoch: int = 0) -> np.ndarray:
    """The epoch's global row order (int64): a permutation drawn from `(seed, epoch)` alone
    (the same on every rank, every run, every world size), or `arange(rows)` unshuffled."""
    rows = _check_int("rows", rows, 0)
    if not shuffle:
        return np.arange(rows, dtype=np.int64)
    rng = np.random.default_rng([_check_int("seed", seed, 0), _check_int("epoch", epoch, 0)])
    return rng.permutation(rows).astype(np.int64, copy=False)


def divisors(n: int) -> list[int]:
    """The world sizes a global batch of `n` rows splits over evenly."""
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Schedule:
    """The batches of one rank: `rows` rows served `batch_size` at a time per rank over
    `world_size` ranks. Validated at construction; every method is pure."""

    rows: int
    batch_size: int
    world_size: int = 1
    rank: int = 0
    shuffle: bool = False
    seed: int = 0
    drop_last: bool = False

    def __post_init__(self) -> None:
        _check_int("rows", self.rows, 0)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("world_size", self.world_size, 1)
        _check_int("seed", self.seed, 0)
        if _check_int("rank", self.rank, 0) >= self.world_size:
            raise ConfigError(f"rank must be below world_size={self.world_size}, got {self.rank}")

    @property
    def global_batch(self) -> int:
        """Rows of one global step, over all ranks."""
        return self.batch_size * self.world_size

    @property
    def padded(self) -> bool:
        """Whether the last global step repeats rows from the start of the order."""
        return self.world_size > 1 and not self.drop_last and self.rows % self.global_batch != 0

    @property
    def steps(self) -> int:
        """Batches per epoch, the same on every rank."""
        if self.drop_last:
            return self.rows // self.global_batch
        return -(-self.rows // self.global_batch)

    @property
    def epoch_rows(self) -> int:
        """Global rows one whole epoch consumes (repeated rows counted, dropped ones not)."""
        return self.rows if self.world_size == 1 and not self.drop_last else self.steps * self.global_batch

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's global row stream: the order, dropped rows cut, padding appended."""
        order = epoch_order(self.rows, shuffle=self.shuffle, seed=self.seed, epoch=epoch)
        if self.padded:
            return np.resize(order, self.epoch_rows)  # repeats from the start, however often it must
        return order[: self.epoch_rows]

    def step_rows(self, stream: np.ndarray, step: int) -> np.ndarray:
        """The global rows of step `step` of `stream` (from `order`), all ranks together."""
        g = self.global_batch
        return stream[step * g : (step + 1) * g]

    def rank_rows(self, stream: np.ndarray, step: int, rank: int | None = None) -> np.ndarray:
        """The rows `rank` (default: this schedule's) trains on at step `step`."""
        r = self.rank if rank is None else rank
        return self.step_rows(stream, step)[r * self.batch_size : (r + 1) * self.batch_size]

    def batches(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        """This rank's batches of `epoch` from step `start` on, as lists of row indices."""
        stream = self.order(epoch)
        for step in range(start, self.steps):
            yield self.rank_rows(stream, step).tolist()

    def rows_after(self, steps: int) -> int:
        """The position (global rows consumed in the epoch) after `steps` steps."""
        return min(_check_int("steps", steps, 0) * self.global_batch, self.epoch_rows)

    def steps_after(self, rows: int) -> int:
        """The steps done at position `rows` (inverse of `rows_after`; a position saved with
        another tail rule clamps to this epoch's end). Refuses a position inside a step or
        beyond the longest epoch any tail rule gives (`ceil(rows / global_batch)` steps)."""
        rows = _check_int("rows", rows, 0)
        end = -(-self.rows // self.global_batch) * self.global_batch
        if rows > end:
            raise ConfigError(
                f"position {rows} (rows consumed) is beyond the end of an epoch of {self.rows} rows "
                f"(at most {end} with a global batch of {self.global_batch}): the state is not one this loader saved"
            )
        if rows % self.global_batch == 0:
            return min(rows // self.global_batch, self.steps)
        if rows >= self.rows:  # the end of an epoch whose last batch was short
            return self.steps
        raise ConfigError(
            f"position {rows} (rows consumed) falls inside a global batch of {self.global_batch}: "
            "the state was not saved by a loader with this global batch size"
        )


def check_resume(saved_batch: int, saved_world: int, batch_size: int, world_size: int) -> None:
    """An elastic resume keeps the global batch: refuse any other split, saying what works."""
    g, here = saved_batch * saved_world, batch_size * world_size
    if g == here:
        return
    saved = f"the state was saved with batch_size={saved_batch} x world_size={saved_world} (global batch {g})"
    if g % world_size == 0:
        raise ConfigError(
            f"{saved}; this loader has batch_size={batch_size} x world_size={world_size} (global batch {here}): "
            f"resume with batch_size={g // world_size} at world_size={world_size} to continue the same row stream"
        )
    raise ConfigError(
        f"{saved}; a global batch of {g} does not split evenly over world_size={world_size}: "
        f"resume on a world size of {', '.join(map(str, divisors(g)))} (batch_size = {g} / world size)"
    )


STATE_KEYS = ("format", "version", "fingerprint", "seed", "shuffle", "epoch", "rows", "world_size", "batch_size")


def check_state(state: Any) -> dict[str, Any]:
    """`state` as a loader state, validated whole: exactly `STATE_KEYS`, integers (not bools)
    in range, `shuffle` a bool, `fingerprint` a mapping; else a `ConfigError` naming the field."""
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        raise ConfigError("not an sftpack loader state (no 'format': 'sftpack.batches' entry)")
    version = state.get("version")
    if isinstance(version, bool) or version != STATE_VERSION:
        raise ConfigError(
            f"loader state version {version!r} is not understood by this sftpack (it reads version {STATE_VERSION})"
        )
    missing, unknown = [k for k in STATE_KEYS if k not in state], sorted(map(str, set(state) - set(STATE_KEYS)))
    if missing or unknown:
        problems = [f"lacks {', '.join(missing)}"] if missing else []
        problems += [f"has unknown fields {', '.join(unknown)}"] if unknown else []
        raise ConfigError(f"the loader state {' and '.join(problems)}: pass the dict state_dict() returned, unchanged")
    if not isinstance(state["fingerprint"], Mapping):
        raise ConfigError(f"the loader state's fingerprint must be a mapping, got {state['fingerprint']!r}")
    if not isinstance(state["shuffle"], bool):
        raise ConfigError(f"the loader state's shuffle must be True or False, got {state['shuffle']!r}")
    for key, low in (("seed", 0), ("epoch", 0), ("rows", 0), ("world_size", 1), ("batch_size", 1)):
        _check_int(f"the loader state's {key}", state[key], low)
    return dict(state)


def check_fingerprint(saved: Mapping[str, Any], here: Mapping[str, Any]) -> None:
    """Refuse a state saved over another dataset, naming what differs."""
    if dict(saved) == dict(here):
        return
    diff = [
        f"{key}: {saved.get(key, '(absent)')!r} in the state, {here.get(key, '(absent)')!r} here"
        for key in sorted(set(saved) | set(here))
        if saved.get(key) != here.get(key)
    ]
    raise ConfigError(
        "the loader state was saved over another dataset (" + "; ".join(diff) + "): "
        "resume with the dataset it was saved with (same store and plan options)"
    )


class StatefulBatchSampler:
    """This rank's batches epoch after epoch, with a resumable position (torch-free).

    Usable as a torch `DataLoader(batch_sampler=...)` and as the batch sampler of torchdata's
    `StatefulDataLoader`, whose state then carries this one's. An iteration serves the current
    epoch from the current position; when it runs out the position moves to the next epoch's
    start. `set_epoch(e)` picks epoch e (from its start, unless e is the current epoch: then the
    position stays, so a resumed job may call it again for the epoch it was in).
    """

    def __init__(self, schedule: Schedule, fingerprint: Mapping[str, Any] | None = None) -> None:
        self.schedule = schedule
        self.fingerprint = dict(fingerprint if fingerprint is not None else {"rows": schedule.rows})
        self.epoch = 0
        self.step = 0  # batches of the epoch served
        self.generation = 0  # bumped by each pass begun and each position set: a stale pass stops

    def __len__(self) -> int:
        """Batches in a whole epoch, on this rank."""
        return self.schedule.steps

    def __iter__(self) -> Iterator[list[int]]:
        generation, epoch = self.begin(), self.epoch
        for batch in self.schedule.batches(epoch, self.step):
            self.check(generation)
            self.step += 1
            yield batch
        self.check(generation)
        self.finish(epoch)

    def begin(self) -> int:
        """Start a pass: the token its `check` calls take. An earlier pass still open stops."""
        self.generation += 1
        return self.generation

    def check(self, generation: int) -> None:
        """Refuse to go on with a pass (ConfigError) once the position was set under it
        (`set_epoch` to another epoch, `load_state_dict`) or a newer pass began: its batches
        would no longer be the ones the position counts."""
        if generation != self.generation:
            raise ConfigError(
                "set_epoch or load_state_dict was called during a pass over the batches (or another pass "
                "was started): call it between passes, and start a new pass after it"
            )

    def finish(self, epoch: int) -> None:
        """The pass over `epoch` ran out: the next one serves the following epoch."""
        if self.epoch == epoch:
            self.epoch, self.step = epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        epoch = _check_int("epoch", epoch, 0)
        if epoch != self.epoch:
            self.epoch, self.step = epoch, 0
            self.generation += 1

    def state_dict(self) -> dict[str, Any]:
        """Small, JSON-serialisable and the same on every rank."""
        s = self.schedule
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "fingerprint": dict(self.fingerprint),
            "seed": s.seed,
            "shuffle": s.shuffle,
            "epoch": self.epoch,
            "rows": s.rows_after(self.step),
            "world_size": s.world_size,
            "batch_size": s.batch_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue where `state` stopped; refused (ConfigError) over another dataset, seed,
        shuffle or global batch size. Another world size is fine if the global batch is kept.
        A pass open over this sampler stops at its next batch (see `check`)."""
        state = check_state(state)
        s = self.schedule
        check_fingerprint(state["fingerprint"], self.fingerprint)
        for key in ("seed", "shuffle"):
            if state[key] != getattr(s, key):
                raise ConfigError(
                    f"the loader state was saved with {key}={state[key]!r}, this loader has {key}={getattr(s, key)!r}: "
                    f"pass {key}={state[key]!r} to resume the same order"
                )
        check_resume(int(state["batch_size"]), int(state["world_size"]), s.batch_size, s.world_size)
        self.epoch, self.step = int(state["epoch"]), s.steps_after(state["rows"])
        self.generation += 1


def fingerprint_of(dataset: Any, rows: int) -> dict[str, Any]:
    """A dataset's identity for loader states: its `fingerprint` (a mapping or a string) where
    it has one, plus its row count (all a plain dataset offers)."""
    fp = getattr(dataset, "fingerprint", None)
    if isinstance(fp, Mapping):
        out = dict(fp)
    elif isinstance(fp, str):
        out = {"dataset": fp}
    else:
        out = {}
    out["rows"] = int(rows)
    return out


__all__ = [
    "STATE_FORMAT",
    "STATE_KEYS",
    "STATE_VERSION",
    "Schedule",
    "StatefulBatchSampler",
    "check_fingerprint",
    "check_resume",
    "check_state",
    "divisors",
    "epoch_order",
    "fingerprint_of",
]
