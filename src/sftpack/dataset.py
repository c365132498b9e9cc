"""`PackedSFTDataset` and `open_packed`: torch views over a memory-mapped store.

Items are rows of the concat-and-chunk plan: `input_ids` and `labels` (int64, shape (L,)),
plus `position_ids` (int64) and `seq_lens` (int32) with `boundaries=True`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .build import BuildOptions, BuildSummary, build
from .pack import labels_from, mask_cross_document, num_rows, position_ids, row_span, seq_lens
from .errors import StoreError
from .store import Store, open_store


class PackedSFTDataset(Dataset):
    """Build (or reuse) a packed store from SFT records, then serve its rows.

    `tokenizer`: a bundled name ("llama3" by default), a HF tokenizer object or path.
    `cache_dir`: keep the store there, keyed by its fingerprint, and reuse it when every
    input matches; without it the store lives in a temporary directory owned by the dataset.
    """

    def __init__(
        self,
        tokenizer: Any,
        dataset_path: str | os.PathLike | list[str | os.PathLike],
        seq_length: int,
        shuffle: bool = False,
        seed: int | None = None,
        *,
        schema: str = "auto",
        template: str = "alpaca",
        train_on_prompt: bool = True,
        boundaries: bool = False,
        fields: Mapping[str, str] | None = None,
        last_turn_only: bool = False,
        special_tokens: str = "parse",
        mask_cross_document: bool = False,
        cache_dir: str | os.PathLike | None = None,
        workers: int = 0,
    ) -> None:
        options = BuildOptions(
            seq_length=seq_length,
            shuffle=shuffle,
            seed=seed,
            schema=schema,
            fields=dict(fields or {}),
            template=template,
            train_on_prompt=train_on_prompt,
            last_turn_only=last_turn_only,
            special_tokens=special_tokens,
            boundaries=boundaries,
            mask_cross_document=mask_cross_document,
        )
        self._tmp = None
        if cache_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="sftpack-")
            self.summary: BuildSummary = build(dataset_path, Path(self._tmp.name) / "store", options, tokenizer,
                                               workers=workers, progress=False)
        else:
            self.summary = build(dataset_path, None, options, tokenizer, workers=workers, progress=False,
                                 cache_dir=cache_dir)
        self._attach(open_store(self.summary.path))

    @classmethod
    def from_store(cls, store: Store) -> PackedSFTDataset:
        self = cls.__new__(cls)
        self._tmp = None
        self.summary = None  # type: ignore[assignment]
        self._attach(store)
        return self

    def _attach(self, store: Store) -> None:
        self.store = store
        self.path = store.path
        manifest = store.manifest
        self._manifest_checksum = manifest["checksum"]  # workers reopen by path: same store or an error
        options = manifest["options"]
        self.seq_length = int(manifest["seq_length"])
        self.boundaries = bool(options["boundaries"])
        self.mask_cross_document = bool(options["mask_cross_document"])
        self._all_trained = bool(options["train_on_prompt"])
        self._len = num_rows(len(store.tokens), self.seq_length)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"row {index} out of range for a dataset of {self._len} rows")
        start, stop = row_span(index, self.seq_length)
        window = np.array(self.store.tokens[start:stop], dtype=np.int64)
        mask = None if self._all_trained else np.asarray(self.store.loss_mask[start:stop])
        labels = labels_from(window, mask)
        doc_starts = self.store.doc_starts
        if self.mask_cross_document:
            labels = mask_cross_document(labels, doc_starts, start)
        item = {"input_ids": torch.from_numpy(window[:-1]), "labels": torch.from_numpy(labels)}
        if self.boundaries:
            item["position_ids"] = torch.from_numpy(position_ids(doc_starts, start, self.seq_length))
            item["seq_lens"] = torch.from_numpy(seq_lens(doc_starts, start, self.seq_length))
        return item

    # Worker processes reopen the memory maps instead of receiving copies of them.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["store"] = None
        state["_tmp"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.store = open_store(self.path)
        if self.store.manifest["checksum"] != self._manifest_checksum:
            raise StoreError(
                f"{self.path} was replaced by another build since this dataset opened it; "
                "recreate the dataset (and its DataLoader) to serve the new store"
            )


def open_packed(path: str | os.PathLike, *, verify: bool = False) -> PackedSFTDataset:
    """Reopen a built store as a dataset with the same items (checksums checked with `verify`)."""
    return PackedSFTDataset.from_store(open_store(path, verify=verify))
