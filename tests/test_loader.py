"""Worker processes reopen the memory-mapped store and serve the same rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sftpack

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample.jsonl"


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_serve_the_same_rows(context):
    ds = sftpack.PackedSFTDataset("llama3", SAMPLE, 32, boundaries=True, train_on_prompt=False)
    loader = sftpack.iterate_batches(ds, 4, False, num_workers=2, multiprocessing_context=context)
    batches = list(loader)
    assert len(batches) == len(loader) == -(-len(ds) // 4)
    for key in ("input_ids", "labels", "position_ids"):
        served = torch.cat([b[key] for b in batches])
        assert torch.equal(served, torch.stack([ds[i][key] for i in range(len(ds))])), key
