"""collate_flattened against transformers' DataCollatorWithFlattening, and the varlen
fields of the default collate."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import DataCollatorWithFlattening

from sftpack import iterate_batches, open_packed
from sftpack.build import BuildOptions, build
from sftpack.errors import ConfigError
from sftpack.loader import collate, collate_flattened
from sftpack.pack import row_span

SEQ = 64
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu naïve café 東京 ok".split()


def _records(n: int = 40, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        hi = 6 if i % 3 == 0 else 60  # short and long documents: rows of one to many pieces
        out.append({
            "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, hi))),
            "response": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, hi))),
        })
    return out


def _dataset(jsonl, tmp_path, **options):
    options.setdefault("template", "Q: {prompt}\nA: {response}")
    path = jsonl(_records())
    summary = build(path, tmp_path / "store", BuildOptions(seq_length=SEQ, boundaries=True, **options), "llama3")
    return open_packed(summary.path)


def _hf_features(ds, rows):
    """One HF feature per document piece, its labels in HF (unshifted) form.

    Two independent derivations must agree: from our shifted labels (hf[p] = ours[p - 1])
    and from the stream itself (token p when it is trained, by the loss mask)."""
    train_all = ds.store.manifest["options"]["train_on_prompt"]
    stream_tokens, stream_mask = ds.view.stream()
    features = []
    for r in rows:
        item = ds[r]
        start, _ = row_span(r, SEQ)
        offset = 0
        for n in item["seq_lens"].tolist():
            ids = item["input_ids"][offset : offset + n]
            hf = torch.full((n,), -100, dtype=torch.int64)
            hf[1:] = item["labels"][offset : offset + n - 1]
            stream = np.asarray(stream_tokens[start + offset : start + offset + n], dtype=np.int64)
            trained = np.ones(n, bool) if train_all else np.asarray(
                stream_mask[start + offset : start + offset + n]).astype(bool)
            from_store = np.where(trained, stream, -100)
            assert hf[1:].tolist() == from_store[1:].tolist()
            assert ids.tolist() == stream.tolist()
            features.append({"input_ids": ids.tolist(), "labels": hf.tolist()})
            offset += n
        assert offset == SEQ
    return features


@pytest.mark.parametrize("train_on_prompt", [True, False])
def test_collate_flattened_matches_hf(jsonl, tmp_path, train_on_prompt):
    ds = _dataset(jsonl, tmp_path, train_on_prompt=train_on_prompt)
    assert len(ds) >= 8
    hf = DataCollatorWithFlattening(return_tensors="pt")
    n_pieces = []
    for rows in ([0], [0, 1, 2, 3], list(range(len(ds) - 5, len(ds))), list(range(len(ds)))):
        ours = collate_flattened([ds[r] for r in rows])
        features = _hf_features(ds, rows)
        ref = hf(features)
        n_pieces.append(len(features))
        for key in ("input_ids", "labels", "position_ids"):
            assert ours[key].dtype == ref[key].dtype == torch.int64, key
            assert ours[key].shape == ref[key].shape == (1, len(rows) * SEQ), key
            assert torch.equal(ours[key], ref[key]), (key, rows)
        assert "attention_mask" not in ours
        if not train_on_prompt:
            assert (ours["labels"] == -100).sum() > len(features)  # masked prompts, beyond the separators
    assert n_pieces[-1] > 2 * len(ds)  # many rows hold several pieces
    # some row starts with a piece that continues a document of the previous row
    assert any(int(ds[r]["position_ids"][0]) > 0 for r in range(len(ds)))


def test_collate_flattened_restarts_continuing_pieces(jsonl, tmp_path):
    ds = _dataset(jsonl, tmp_path)
    r = next(r for r in range(len(ds)) if int(ds[r]["position_ids"][0]) > 0)
    item = ds[r]
    out = collate_flattened([ds[r - 1], item])
    first = int(item["seq_lens"][0])
    pos = out["position_ids"][0, SEQ : SEQ + first]
    assert pos.tolist() == list(range(first))
    assert int(out["labels"][0, SEQ]) == -100


def test_collate_flattened_needs_boundaries(jsonl, tmp_path):
    path = jsonl(_records())
    summary = build(path, tmp_path / "plain", BuildOptions(seq_length=SEQ), "llama3")
    ds = open_packed(summary.path)
    with pytest.raises(ValueError, match="boundaries"):
        collate_flattened([ds[0], ds[1]])


def _check_varlen(batch, items):
    lens = [item["seq_lens"] for item in items]
    flat = np.concatenate([x.numpy() for x in lens]).astype(np.int64)
    expected = np.concatenate(([0], np.cumsum(flat)))
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens"].tolist() == expected.tolist()
    assert int(batch["cu_seqlens"][-1]) == len(items) * SEQ
    assert isinstance(batch["max_seqlen"], int) and batch["max_seqlen"] == int(flat.max())
    assert len(batch["seq_lens"]) == len(items)
    assert all(torch.equal(a, b) for a, b in zip(batch["seq_lens"], lens))
    for key in ("input_ids", "labels", "position_ids"):
        assert batch[key].shape == (len(items), SEQ)
        assert torch.equal(batch[key], torch.stack([item[key] for item in items]))


def test_collate_varlen_fields(jsonl, tmp_path):
    ds = _dataset(jsonl, tmp_path, train_on_prompt=False)
    rows = [0, 3, 1, len(ds) - 1, 5]
    items = [ds[r] for r in rows]
    batch = collate(items)
    _check_varlen(batch, items)
    # the same boundaries as transformers' flash-attention kwargs for the pieces
    ref = DataCollatorWithFlattening(return_tensors="pt", return_flash_attn_kwargs=True)(_hf_features(ds, rows))
    assert batch["cu_seqlens"].tolist() == ref["cu_seq_lens_q"].tolist()
    assert batch["max_seqlen"] == int(ref["max_length_q"])


def test_iterate_batches_with_boundaries(jsonl, tmp_path):
    ds = _dataset(jsonl, tmp_path)
    loader = iterate_batches(ds, 4, shuffle=False)
    assert len(loader) == -(-len(ds) // 4)
    seen = 0
    for batch in loader:
        assert {"input_ids", "labels", "position_ids", "seq_lens", "cu_seqlens", "max_seqlen"} <= set(batch)
        items = [ds[seen + i] for i in range(batch["input_ids"].shape[0])]
        _check_varlen(batch, items)
        seen += len(items)
    assert seen == len(ds)


def test_collate_refuses_hf_labels(jsonl, tmp_path):
    """labels='hf' items through the default collate: a loss that does not shift would train
    every token to predict itself. The Hugging Face collator takes them."""
    from sftpack.hf import DataCollator

    hf = _dataset(jsonl, tmp_path).with_labels("hf")
    with pytest.raises(ConfigError, match=r"labels='hf'.*sftpack\.hf\.DataCollator"):
        collate([hf[0], hf[1]])
    with pytest.raises(ConfigError, match="DataCollator"):
        next(iter(iterate_batches(hf, 4, shuffle=False)))
    batch = next(iter(iterate_batches(hf, 4, shuffle=False, collate_fn=DataCollator())))
    assert torch.equal(batch["labels"], torch.stack([hf[r]["labels"] for r in range(4)]))
    # a batch both conventions fit (a repeated token, or nothing supervised) is no evidence
    same = {"input_ids": torch.tensor([7, 7, 7]), "labels": torch.tensor([-100, 7, 7])}
    assert collate([same])["labels"].tolist() == [[-100, 7, 7]]
    none = {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.full((3,), -100)}
    assert collate([none])["input_ids"].tolist() == [[1, 2, 3]]
