"""FlexAttention with sftpack's document BlockMask equals SDPA with the explicit mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from sftpack import ConfigError
from sftpack.attention import document_block_mask, document_ids


def _explicit_mask(rows: list[list[int]]) -> torch.Tensor:
    """(B, 1, L, L) bool, token by token: same piece and not in the future."""
    length = sum(rows[0])
    mask = torch.zeros(len(rows), 1, length, length, dtype=torch.bool)
    for b, lens in enumerate(rows):
        owner = [i for i, n in enumerate(lens) for _ in range(n)]
        for q in range(length):
            for k in range(q + 1):
                mask[b, 0, q, k] = owner[q] == owner[k]
    return mask


@pytest.mark.parametrize("block_size", [128, 16])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_with_the_block_mask_equals_sdpa(block_size):
    torch.manual_seed(0)
    rows = [[5, 17, 1, 9, 32], [64], [1] * 8 + [56], [30, 30, 4]]  # L = 64: one-token and whole-row documents
    batch, heads, length, dim = len(rows), 2, 64, 8
    q, k, v = (torch.randn(batch, heads, length, dim) for _ in range(3))
    block_mask = document_block_mask([torch.tensor(r, dtype=torch.int32) for r in rows], block_size=block_size)
    assert block_mask.shape == (batch, 1, length, length)
    flex = flex_attention(q, k, v, block_mask=block_mask)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=_explicit_mask(rows))
    assert torch.allclose(flex, sdpa, atol=1e-5), (flex - sdpa).abs().max()
    # a plain causal mask over the same rows differs wherever a row holds several documents
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.allclose(flex[0], causal[0], atol=1e-3) and torch.allclose(flex[1], causal[1], atol=1e-5)
    # exactly the blocks holding an allowed pair are computed: those wholly between documents are skipped
    if block_size < length:
        n = length // block_size
        blocks = _explicit_mask(rows).reshape(batch, 1, n, block_size, n, block_size).any(-1).any(-2)
        assert torch.equal(block_mask.to_dense().bool(), blocks)
        assert blocks.sum() < batch * n * (n + 1) // 2  # fewer than causal attention computes


def test_document_ids_and_errors():
    assert document_ids(torch.tensor([2, 1, 3])).tolist() == [[0, 0, 1, 2, 2, 2]]
    assert document_ids([[3, 3], [6]]).tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]]
    with pytest.raises(ConfigError, match="same length"):
        document_ids([[3, 3], [5]])
    with pytest.raises(ConfigError, match="empty"):
        document_ids([])
    with pytest.raises(ConfigError, match=r"row 1 must be >= 0"):  # every row is checked, not the first only
        document_ids([[2, 2], [5, -1]])
    with pytest.raises(ConfigError, match="row 0 must be integers"):
        document_ids([[1.5, 2.5]])
    with pytest.raises(ConfigError, match="row 0 must be integers"):
        document_ids(torch.tensor([2.0, 2.0]))
    assert document_ids(np.array([[2, 2], [1, 3]], np.int32)).tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
