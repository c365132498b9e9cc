"""Batching: `iterate_batches` (the reference API) and collate functions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import ConfigError
from .hf import flatten, piece_starts, row_positions
from .pack import IGNORE_INDEX, cu_seqlens
from .view import hf_labels


def collate(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | list[torch.Tensor] | int]:
    """Stack rows into (B, L) tensors. With boundaries, `seq_lens` stays a list (one per row)
    and `cu_seqlens`/`max_seqlen` describe the batch flattened to B*L tokens (flash-attn varlen)."""
    if len({len(item["input_ids"]) for item in items}) > 1:
        raise ValueError(
            "rows of different lengths (a bfd plan with pad=False) cannot be stacked: "
            "use collate_fn=sftpack.collate_flattened, or pad=True"
        )
    batch: dict[str, torch.Tensor | list[torch.Tensor] | int] = {
        key: torch.stack([item[key] for item in items]) for key in items[0] if key != "seq_lens"
    }
    if "seq_lens" in items[0]:
        lens = [item["seq_lens"] for item in items]
        flat = torch.cat(lens)
        batch["seq_lens"] = lens
        batch["cu_seqlens"] = torch.from_numpy(cu_seqlens(flat.numpy()))
        batch["max_seqlen"] = int(flat.max())
    return batch


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


def iterate_batches(dataset: Dataset, batch_size: int, shuffle: bool, **loader_kwargs) -> DataLoader:
    """A DataLoader of dicts of (B, L) int64 tensors; `len()` is ceil(len(dataset) / batch_size)."""
    loader_kwargs.setdefault("collate_fn", collate)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, **loader_kwargs)
