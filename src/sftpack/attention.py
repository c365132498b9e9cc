"""Document-causal attention for torch's FlexAttention, from the rows' `seq_lens`.

A packed row holds several documents; each token may attend only to earlier tokens of its
own document. `document_block_mask` turns the `seq_lens` of a batch (each row's document
pieces, as items with boundaries carry them and `sftpack.collate` keeps them) into a
`BlockMask` for `torch.nn.attention.flex_attention.flex_attention`, whose block sparsity
skips the blocks between documents instead of computing and masking them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from .errors import ConfigError


def document_ids(seq_lens: Sequence[Any] | torch.Tensor | np.ndarray) -> torch.Tensor:
    """(B, L) int32: the index of the document piece each token belongs to, per row.

    `seq_lens`: one 1-D sequence of piece lengths per row (a (B, k) tensor or array, or a list of
    1-D tensors / lists of possibly different k), or a single 1-D one for one row. Every
    row must have the same total length L.
    """
    if isinstance(seq_lens, np.ndarray):  # (B, k) or (k,), as a tensor of the same shape
        seq_lens = torch.from_numpy(seq_lens)
    rows = [seq_lens] if isinstance(seq_lens, torch.Tensor) and seq_lens.ndim == 1 else list(seq_lens)
    if rows and not isinstance(rows[0], (torch.Tensor, Sequence)):  # a flat list of ints: one row
        rows = [rows]
    if not rows:
        raise ConfigError("seq_lens is empty: there is no row to mask")
    lens = [_lengths(r, b) for b, r in enumerate(rows)]
    totals = {int(x.sum()) for x in lens}
    if len(totals) != 1:
        raise ConfigError(f"every row's seq_lens must sum to the same length (got {sorted(totals)})")
    return torch.stack([torch.repeat_interleave(torch.arange(len(x)), x) for x in lens]).to(torch.int32)


def _lengths(row: Any, index: int) -> torch.Tensor:
    """Row `index`'s piece lengths as int64, refused unless integers >= 0 (no silent truncation)."""
    x = torch.as_tensor(row).reshape(-1)
    if x.numel() and (x.dtype == torch.bool or x.is_floating_point() or x.is_complex()):
        raise ConfigError(f"seq_lens of row {index} must be integers, got {x.dtype}: {x.tolist()}")
    x = x.to(torch.int64)
    if (x < 0).any():
        raise ConfigError(f"seq_lens of row {index} must be >= 0, got {x.tolist()}")
    return x


def document_block_mask(
    seq_lens: Sequence[Any] | torch.Tensor | np.ndarray,
    *,
    device: str | torch.device = "cpu",
    block_size: int = 128,
    compile: bool = False,
) -> BlockMask:
    """A document-causal `BlockMask` of shape (B, 1, L, L): query q attends to key k when
    both are in the same document piece of the row and k <= q. For `flex_attention(q, k, v,
    block_mask=...)` with q, k, v of shape (B, H, L, D); heads share the mask.
    `compile=True` builds the mask with torch.compile (for long rows on GPU)."""
    docs = document_ids(seq_lens).to(device)
    batch, length = docs.shape

    def document_causal(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return (docs[b, q] == docs[b, kv]) & (q >= kv)

    return create_block_mask(
        document_causal, batch, None, length, length, device=device, BLOCK_SIZE=block_size, _compile=compile
    )
