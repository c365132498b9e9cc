"""`PackedSFTDataset` and `open_packed`: torch datasets over a store seen through a plan.

Items: `input_ids` and `labels` (int64, -100 where untrained), plus `position_ids` (int64)
and `seq_lens` (int32) with `boundaries=True` and always with `packing="bfd"`.

`labels="shifted"` (default, the reference): `labels[j]` is the target of `input_ids[j]`.
`labels="hf"`: Hugging Face's convention, `labels[j]` is `input_ids[j]` or -100 and the
model shifts (see `sftpack.view.hf_labels` for the one target a concat row loses).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from .config import BuildOptions, make_options, resolve_seed
from .errors import StoreError
from .store import Store, open_store
from .view import View, check_labels, options_for

if TYPE_CHECKING:
    from .build import BuildSummary


class PackedSFTDataset(Dataset):
    """Build (or reuse) a store of tokenized SFT records, then serve its rows.

    `tokenizer`: a bundled name ("llama3" by default), a HF tokenizer object or path.
    `cache_dir`: keep the store there, keyed by its fingerprint, and reuse it whenever
    the inputs, tokenizer, template and masking options match: `seq_length`, `packing`,
    `overflow`, `pad`, `shuffle`/`seed`, `boundaries` and `mask_cross_document` only re-plan.
    Without it the store lives in a temporary directory owned by the dataset. Other
    keyword options: see `sftpack.BuildOptions`. `labels`: "shifted" (the reference) or
    "hf" (for Hugging Face models, which shift labels themselves).
    """

    def __init__(
        self,
        tokenizer: Any,
        dataset_path: str | os.PathLike | list[str | os.PathLike],
        seq_length: int,
        shuffle: bool = False,
        seed: int | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        workers: int = 0,
        labels: str = "shifted",
        **options: Any,
    ) -> None:
        self.labels = check_labels(labels)
        if labels == "hf":  # HF models see a row's documents as one sequence unless told where they start
            options.setdefault("boundaries", True)
        opts = resolve_seed(make_options(seq_length=seq_length, shuffle=shuffle, seed=seed, **options))
        self._tmp = None
        if cache_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="sftpack-")
            out: Path | None = Path(self._tmp.name) / "store"
        else:
            out = None
        from .build import build  # only building imports the build pipeline: views never do

        self.summary: BuildSummary | None = build(
            dataset_path, out, opts, tokenizer, workers=workers, progress=False, cache_dir=cache_dir
        )
        self._attach(open_store(self.summary.path), opts)

    @classmethod
    def from_store(cls, store: Store, options: BuildOptions, *, labels: str = "shifted") -> PackedSFTDataset:
        self = cls.__new__(cls)
        self._tmp = None
        self.summary = None
        self.labels = check_labels(labels)
        self._attach(store, options)
        return self

    def with_labels(self, labels: str) -> PackedSFTDataset:
        """The same rows (same store and plan) in another label convention; "hf" rows carry
        their document boundaries (`position_ids`), without which a HF model lets a row's
        documents attend to each other."""
        if labels == self.labels:
            return self
        options = replace(self.options, boundaries=True) if labels == "hf" else self.options
        return PackedSFTDataset.from_store(self.store, options, labels=labels)

    def _attach(self, store: Store, options: BuildOptions) -> None:
        self.store, self.path, self.options = store, store.path, options
        self.view = View(store, options, labels=self.labels)
        self.seq_length = int(options.seq_length)
        self._identity = _identity(store)

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if index < 0:
            index += len(self)
        return {k: torch.from_numpy(v) for k, v in self.view.item(index).items()}

    # Worker processes reopen the memory maps (and re-plan) instead of receiving copies.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["store"] = state["view"] = state["_tmp"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        store = open_store(self.path)
        if _identity(store) != self._identity:
            raise StoreError(
                f"{self.path} was replaced by another build since this dataset opened it; "
                "recreate the dataset (and its DataLoader) to serve the new store"
            )
        self._attach(store, self.options)

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What decides the rows and their order: the store's fingerprint and the plan options
        that matter to it. Loader states carry it and refuse to resume over another."""
        o, bfd = self.options, self.options.packing == "bfd"
        return {
            "store": self.store.fingerprint,
            "seq_length": int(o.seq_length),
            "packing": o.packing,
            "overflow": o.overflow if bfd else None,
            "pad": (o.pad is not False) if bfd else None,
            "shuffle": bool(o.shuffle),
            "seed": o.seed if o.shuffle else None,
        }


def _identity(store: Store) -> tuple[str, dict[str, str]]:
    """What a worker that reopens the store by path must find again: the same tokens (the
    recorded plan defaults may change; they are not what the dataset serves)."""
    return store.fingerprint, {k: v["xxh3_128_chunked"]["digest"] for k, v in store.manifest["files"].items()}


def open_packed(
    path: str | os.PathLike,
    *,
    seq_length: int | None = None,
    packing: str | None = None,
    overflow: str | None = None,
    pad: bool | None = None,
    shuffle: bool | None = None,
    seed: int | None = None,
    boundaries: bool | None = None,
    mask_cross_document: bool | None = None,
    verify: bool = False,
    labels: str = "shifted",
) -> PackedSFTDataset:
    """Reopen a built store as a dataset, planned anew where an option is given (`None`:
    as recorded at build). Never re-tokenizes; `verify` checks every checksum first.
    `labels="hf"` serves labels aligned with `input_ids` for Hugging Face models (Trainer,
    TRL), which shift them, and then boundaries default to True (`position_ids` restarting
    at every document, so that HF models keep documents apart); the default "shifted" is the
    reference's convention."""
    if check_labels(labels) == "hf" and boundaries is None:
        boundaries = True
    store = open_store(path, verify=verify)
    options = options_for(
        store,
        seq_length=seq_length,
        packing=packing,
        overflow=overflow,
        pad=pad,
        shuffle=shuffle,
        seed=seed,
        boundaries=boundaries,
        mask_cross_document=mask_cross_document,
    )
    return PackedSFTDataset.from_store(store, options, labels=labels)
