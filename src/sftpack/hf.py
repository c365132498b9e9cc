"""Hugging Face glue: a collator for `transformers.Trainer` and TRL, and `to_hf_dataset`.

Hugging Face causal LMs shift `labels` themselves, so they must get labels aligned with
`input_ids` (`open_packed(dir, labels="hf")`), never sftpack's reference labels, which are
already shifted: the loss would look normal and train on the token after next.
`DataCollator` refuses shifted labels (a supervised label that differs from its input
token cannot be an aligned one).

Documents stay isolated without an attention mask: every batch carries `position_ids`
restarting at 0 for each document, from which transformers builds a block-diagonal
causal mask (`masking_utils.find_packed_sequence_indices`, or flash-attn varlen). On SDPA
and eager attention transformers only does so when no KV cache object is present, and a
model's config defaults to `use_cache=True` (train mode too), so every batch also carries
`use_cache=False`.

torch is imported here; transformers and datasets only inside the functions that need them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import ConfigError
from .pack import IGNORE_INDEX, positions_from_lens

if TYPE_CHECKING:
    import datasets

    from .dataset import PackedSFTDataset

_Row = tuple[np.ndarray, np.ndarray, np.ndarray]  # input_ids, labels, position_ids (int64)


def _int64(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.numpy()
    return np.asarray(value, dtype=np.int64)


def piece_starts(positions: np.ndarray) -> np.ndarray:
    """Indices where a document piece starts: 0 and wherever positions do not step by 1
    (transformers' rule for packed sequences)."""
    if len(positions) == 0:
        return np.zeros(0, np.int64)
    return np.concatenate(([0], np.flatnonzero(np.diff(positions) != 1) + 1))


def row_positions(feature: Mapping[str, Any], n: int) -> np.ndarray:
    """A feature's positions: its `position_ids`, else from its piece lengths (`seq_lens`,
    or TRL's `seq_lengths`), else one sequence 0..n-1."""
    if "position_ids" in feature:
        return _int64(feature["position_ids"])
    for key in ("seq_lens", "seq_lengths"):
        if key in feature:
            return positions_from_lens(_int64(feature[key]))
    return np.arange(n, dtype=np.int64)


def check_hf_labels(input_ids: np.ndarray, labels: np.ndarray, row: int = 0) -> None:
    """Raise `ConfigError` unless every label is -100 or the input token at its position
    (Hugging Face's convention): shifted labels fail on any supervised token that differs
    from the token before it."""
    bad = np.flatnonzero((labels != IGNORE_INDEX) & (labels != input_ids))
    if len(bad):
        j = int(bad[0])
        raise ConfigError(
            f"labels are not aligned with input_ids (row {row}, position {j}: label {int(labels[j])}, "
            f"input {int(input_ids[j])}): these are sftpack's reference labels, already shifted, and a "
            "Hugging Face model would shift them again and train on the token after next. Open the dataset "
            "with sftpack.open_packed(dir, labels='hf') (or PackedSFTDataset(..., labels='hf'))"
        )


POSITION_KEYS = ("position_ids", "seq_lens", "seq_lengths")


def _features(features: Sequence[Mapping[str, Any]]) -> list[_Row]:
    """The rows of a batch, checked: 1-D, labels aligned, and positions from all or none (a
    row without them would be taken as one document, attending across its documents)."""
    with_positions = [any(key in f for key in POSITION_KEYS) for f in features]
    if any(with_positions) and not all(with_positions):
        r = with_positions.index(False)
        raise ConfigError(
            f"feature {r} has no document boundaries ({', '.join(POSITION_KEYS)}) but others of the batch do: "
            "it would be treated as one document attending across its documents. Batch items of one dataset "
            "opened with the same options (boundaries=True or packing='bfd')"
        )
    rows = []
    for r, feature in enumerate(features):
        if "input_ids" not in feature or "labels" not in feature:
            raise ConfigError(f"feature {r} has keys {sorted(feature)}; the collator needs input_ids and labels")
        ids, labels = _int64(feature["input_ids"]), _int64(feature["labels"])
        if ids.ndim != 1 or labels.ndim != 1:
            raise ConfigError(
                f"feature {r}: input_ids and labels must be 1-D (one row each; the collator makes the batch), "
                f"got shapes {ids.shape} and {labels.shape}"
            )
        positions = row_positions(feature, len(ids))
        if not len(ids) == len(labels) == len(positions):
            raise ConfigError(f"feature {r}: input_ids, labels and positions have different lengths")
        check_hf_labels(ids, labels, r)
        rows.append((ids, labels, positions))
    return rows


def stack(rows: Sequence[_Row], pad_id: int) -> dict[str, torch.Tensor]:
    """(B, L) tensors; shorter rows are padded to the longest with a segment of their own
    (positions 0.., labels -100), so no attention mask is needed."""
    n = max(len(r[0]) for r in rows)
    out = np.empty((3, len(rows), n), np.int64)
    for b, (ids, labels, positions) in enumerate(rows):
        k, fill = len(ids), n - len(ids)
        out[0, b, :k], out[1, b, :k], out[2, b, :k] = ids, labels, positions
        out[0, b, k:], out[1, b, k:], out[2, b, k:] = pad_id, IGNORE_INDEX, np.arange(fill)
    return {
        "input_ids": torch.from_numpy(out[0]),
        "labels": torch.from_numpy(out[1]),
        "position_ids": torch.from_numpy(out[2]),
    }


def flatten(rows: Sequence[_Row]) -> dict[str, torch.Tensor]:
    """One (1, N) row, as transformers' `DataCollatorWithFlattening` builds it: each row's
    first label is -100 (its predecessor is another row) and a piece that continues a
    document from an earlier row restarts its positions at 0, so it is never taken for the
    continuation of the row before it (RoPE sees only position differences)."""
    ids, labels, positions = [], [], []
    for i, lab, pos in rows:
        lab, pos = lab.copy(), pos.copy()
        if len(lab):
            lab[0] = IGNORE_INDEX
            starts = piece_starts(pos)
            end = int(starts[1]) if len(starts) > 1 else len(pos)
            pos[:end] -= pos[0]
        ids.append(i)
        labels.append(lab)
        positions.append(pos)
    return {
        "input_ids": torch.from_numpy(np.concatenate(ids))[None],
        "labels": torch.from_numpy(np.concatenate(labels))[None],
        "position_ids": torch.from_numpy(np.concatenate(positions))[None],
    }


@dataclass(frozen=True)
class DataCollator:
    """Batches `labels="hf"` items for Hugging Face models, under `Trainer`'s defaults.

    Works from `input_ids` and `labels`, with positions from `position_ids`, else the piece
    lengths `seq_lens` (or TRL's `seq_lengths`), else one sequence per row; so it works
    after `remove_unused_columns` has dropped whichever of them the model does not take.
    Refuses shifted (reference) labels with a `ConfigError`.

    padding_free=False: (B, L) `input_ids`, `labels`, `position_ids` (rows of unequal
    length padded with `pad_id` as a segment of their own). True: one (1, B*L) row, as
    `DataCollatorWithFlattening`. Neither has an attention_mask: documents are isolated by
    `position_ids`. `use_cache`: put into every batch (default False, which transformers
    needs on SDPA/eager to isolate documents; None leaves it out).
    """

    padding_free: bool = False
    pad_id: int = 0
    use_cache: bool | None = False

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ConfigError("the collator got an empty batch")
        rows = _features(features)
        batch: dict[str, Any] = flatten(rows) if self.padding_free else stack(rows, self.pad_id)
        if self.use_cache is not None:
            batch["use_cache"] = self.use_cache
        return batch


def _rows(dataset: PackedSFTDataset, pieces: bool):
    """Rows of `dataset` (hf labels) as Arrow-friendly int32 arrays."""
    view = dataset.view
    for i in range(len(dataset)):
        item = view.item(i)
        row = {"input_ids": item["input_ids"].astype(np.int32), "labels": item["labels"].astype(np.int32)}
        if pieces:
            row["position_ids"] = item["position_ids"].astype(np.int32)
            row["seq_lengths"] = item["seq_lens"].astype(np.int32)
        yield row


def _check_cache_dir(cache_dir: str | os.PathLike) -> None:
    """Refuse a cache_dir that is, or lies under, something other than a directory."""
    path = Path(cache_dir).absolute()
    for at in (path, *path.parents):
        if at.exists():
            if not at.is_dir():
                raise ConfigError(
                    f"to_hf_dataset(cache_dir={str(cache_dir)!r}): {at} is not a directory; "
                    "pass a directory (it is created if missing) or leave cache_dir out"
                )
            return


def to_hf_dataset(
    dataset: PackedSFTDataset, *, streaming: bool = False, cache_dir: str | None = None
) -> datasets.Dataset | datasets.IterableDataset:
    """`dataset`'s rows as a Hugging Face dataset for TRL's `SFTTrainer`, always with
    `labels="hf"` labels (a reference dataset is converted: same rows, aligned labels).

    Columns: `input_ids`, `labels` (int32 lists; TRL takes a dataset with `input_ids` as
    tokenized and a `labels` column as final, so nothing is re-tokenized or re-masked) and,
    with boundaries (always for bfd), `position_ids` and `seq_lengths` (the document pieces
    of the row): `Trainer` keeps the first (a model input), TRL the second (its padding-free
    collator computes positions from it), and `DataCollator` takes either.
    Written row by row: `streaming=False` gives an Arrow-backed `datasets.Dataset`
    (written once to `cache_dir`, the datasets cache by default, memory-mapped);
    `streaming=True` an `IterableDataset` read straight from the store.
    """
    import datasets

    if cache_dir is not None:
        _check_cache_dir(cache_dir)
    hf = dataset.with_labels("hf")
    pieces = bool(hf.options.boundaries or hf.options.packing == "bfd")
    columns = {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
    }
    if pieces:
        columns["position_ids"] = datasets.List(datasets.Value("int32"))
        columns["seq_lengths"] = datasets.List(datasets.Value("int32"))
    features = datasets.Features(columns)
    kwargs = {"dataset": hf, "pieces": pieces}
    if streaming:
        return datasets.IterableDataset.from_generator(_rows, features=features, gen_kwargs=kwargs)
    return datasets.Dataset.from_generator(_rows, features=features, gen_kwargs=kwargs, cache_dir=cache_dir)
