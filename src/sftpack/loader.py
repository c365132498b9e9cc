"""Batching: `iterate_batches` (the reference API) and collate functions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .pack import IGNORE_INDEX, cu_seqlens


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


def collate_flattened(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Padding-free batch for Hugging Face models, in the convention of transformers'
    `DataCollatorWithFlattening`: one (1, B*L) row, `position_ids` restarting at 0 for
    every document piece, labels unshifted (the model shifts them) with -100 on each
    piece's first token, and no attention_mask. Needs items built with `boundaries=True`.
    A piece continuing a document from the previous row restarts its positions, so no
    piece can be mistaken for the continuation of another row's last document.
    """
    if "seq_lens" not in items[0]:
        raise ValueError(
            "collate_flattened needs items with seq_lens: open the dataset with boundaries=True (or packing='bfd'); "
            "with Hugging Face's Trainer also pass TrainingArguments(remove_unused_columns=False), which would "
            "otherwise drop seq_lens before the collator sees it"
        )
    input_ids, labels, positions = [], [], []
    for item in items:
        lens = item["seq_lens"].numpy().astype(np.int64)
        starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
        pos = np.arange(int(lens.sum())) - np.repeat(starts, lens)
        shifted = np.full(len(pos), IGNORE_INDEX, dtype=np.int64)
        shifted[1:] = item["labels"].numpy()[:-1]
        shifted[starts] = IGNORE_INDEX
        input_ids.append(item["input_ids"])
        labels.append(torch.from_numpy(shifted))
        positions.append(torch.from_numpy(pos))
    return {
        "input_ids": torch.cat(input_ids)[None],
        "labels": torch.cat(labels)[None],
        "position_ids": torch.cat(positions)[None],
    }


def iterate_batches(dataset: Dataset, batch_size: int, shuffle: bool, **loader_kwargs) -> DataLoader:
    """A DataLoader of dicts of (B, L) int64 tensors; `len()` is ceil(len(dataset) / batch_size)."""
    loader_kwargs.setdefault("collate_fn", collate)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, **loader_kwargs)
