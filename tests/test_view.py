"""Plans over one tokenized store: any seq_length, strategy or shuffle is a cheap re-plan
that gives exactly the rows of a separate build, and bfd rows hold whole documents with no
label crossing them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import sftpack.build
from sftpack import PackedSFTDataset, collate, collate_flattened, open_packed
from sftpack.build import BuildOptions, build
from sftpack.cli import main
from sftpack.errors import ConfigError
from sftpack.pack import IGNORE_INDEX

pytestmark = pytest.mark.filterwarnings("ignore:.*special-token strings:UserWarning")


def _docs(path: Path, n: int, seed: int = 0) -> Path:
    """Documents from a few tokens to several hundred: some longer than the seq_lengths tried."""
    rng = random.Random(seed)
    words = "the of and a to in is you that it he was for on are as with his they I at be this have from".split()
    rows = [{"prompt": f"Q{i}: " + " ".join(rng.choices(words, k=rng.choice([1, 3, 20, 60, 200]))),
             "response": " ".join(rng.choices(words, k=rng.choice([1, 5, 30, 120])))} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("view")
    data = _docs(root / "data.jsonl", 120)
    build(data, root / "store", BuildOptions(seq_length=64, train_on_prompt=False), "llama3", progress=False)
    return root / "store"


def _rows(ds) -> list[dict[str, list[int]]]:
    return [{k: v.tolist() for k, v in ds[i].items()} for i in range(len(ds))]


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_seq_lengths_on_one_store_equal_two_builds(store, tmp_path, shuffle):
    data = store.parent / "data.jsonl"
    for L in (17, 256):
        separate = PackedSFTDataset("llama3", data, L, shuffle=shuffle, seed=5, train_on_prompt=False,
                                    boundaries=True, mask_cross_document=True)
        opened = open_packed(store, seq_length=L, shuffle=shuffle, seed=5, boundaries=True, mask_cross_document=True)
        assert len(opened) == len(separate) > 0
        assert _rows(opened) == _rows(separate)


@pytest.mark.parametrize("seed", [None, 3])
def test_concat_rows_are_the_reference_chunks_of_the_stream(store, seed):
    ds = open_packed(store, seq_length=50, shuffle=seed is not None, seed=seed)
    tokens, mask = ds.view.stream()
    assert len(ds) == (len(tokens) - 1) // 50
    for i in range(len(ds)):
        window = tokens[i * 50 : i * 50 + 51]
        labels = np.where(mask[i * 50 + 1 : i * 50 + 51] == 1, window[1:], IGNORE_INDEX)
        assert ds[i]["input_ids"].tolist() == window[:-1].tolist()
        assert ds[i]["labels"].tolist() == labels.tolist()
    if seed is not None:  # the shuffle is a permutation of the stored documents, EOS-joined
        stored = np.asarray(ds.store.tokens)
        assert sorted(tokens.tolist()) == sorted(stored[:-1].tolist())


def test_replanning_never_tokenizes(store, monkeypatch, tmp_path):
    def no(*args, **kwargs):
        raise AssertionError("re-tokenized")

    monkeypatch.setattr(sftpack.build, "encode_documents", no)
    for kwargs in ({"seq_length": 33}, {"packing": "bfd", "seq_length": 128}, {"shuffle": True}):
        assert len(open_packed(store, **kwargs)) > 0
    cache = tmp_path / "cache"
    monkeypatch.undo()
    PackedSFTDataset("llama3", store.parent / "data.jsonl", 64, cache_dir=cache)
    monkeypatch.setattr(sftpack.build, "encode_documents", no)
    ds = PackedSFTDataset("llama3", store.parent / "data.jsonl", 100, shuffle=True, cache_dir=cache, packing="bfd")
    assert ds.summary.reused and len(list(cache.iterdir())) == 1


@pytest.mark.parametrize("L", [1, 7, 64, 300])
@pytest.mark.parametrize("overflow", ["split", "truncate", "drop"])
@pytest.mark.parametrize("pad", [True, False])
def test_bfd_rows_hold_whole_documents_and_no_crossing_label(store, L, overflow, pad):
    try:
        ds = open_packed(store, packing="bfd", seq_length=L, overflow=overflow, pad=pad)
    except ConfigError as exc:  # every document longer than L, dropped: a clear error, not an empty dataset
        assert overflow == "drop" and "nothing to pack" in str(exc)
        return
    offsets = np.asarray(ds.store.doc_offsets)
    tokens, mask = np.asarray(ds.store.tokens, np.int64), np.asarray(ds.store.loss_mask)
    eos = ds.store.manifest["tokenizer"]["eos_id"]
    covered = np.zeros(len(tokens), np.int64)
    for i in range(len(ds)):
        item = {k: v.numpy() for k, v in ds[i].items()}
        pieces = ds.view.plan.row(i)
        n = int(pieces.length.sum())
        assert n <= L and len(item["input_ids"]) == (L if pad else n)
        assert item["seq_lens"].sum() == len(item["input_ids"])
        at = 0
        for d, s, length in zip(pieces.doc.tolist(), pieces.start.tolist(), pieces.length.tolist()):
            a = offsets[d] + s
            covered[a : a + length] += 1
            seg = slice(at, at + length)
            assert item["input_ids"][seg].tolist() == tokens[a : a + length].tolist()
            assert item["position_ids"][seg].tolist() == list(range(length))  # restart: each piece stands alone
            want = np.where(mask[a + 1 : a + length] == 1, tokens[a + 1 : a + length], IGNORE_INDEX)
            assert item["labels"][at : at + length - 1].tolist() == want.tolist()
            assert item["labels"][at + length - 1] == IGNORE_INDEX  # never the next document's token
            at += length
        if pad and n < L:  # padding: EOS (llama3 has no pad token), untrained, its own segment
            assert (item["input_ids"][n:] == eos).all() and (item["labels"][n:] == IGNORE_INDEX).all()
            assert item["position_ids"][n:].tolist() == list(range(L - n)) and item["seq_lens"][-1] == L - n
    # every token is in exactly one row, or accounted as lost
    lost = ds.view.plan.lost
    for d, s, length in zip(lost.doc.tolist(), lost.start.tolist(), lost.length.tolist()):
        covered[offsets[d] + s : offsets[d] + s + length] += 1
    assert (covered == 1).all()
    stats = ds.view.plan.stats
    assert stats.tokens_in == len(tokens) and stats.tokens_packed + stats.tokens_lost == len(tokens)
    lengths = np.diff(offsets)
    assert stats.documents_split == (int((lengths > L).sum()) if overflow == "split" else 0)


def test_pad_false_rows_need_the_flattening_collator(store):
    ds = open_packed(store, packing="bfd", seq_length=300, pad=False)
    items = [ds[0], ds[len(ds) - 1], ds[len(ds) - 2]]  # rows open longest first: the last are the emptiest
    assert len({len(it["input_ids"]) for it in items}) > 1
    with pytest.raises(ValueError, match="collate_flattened"):
        collate(items)
    flat = collate_flattened(items)
    assert flat["input_ids"].shape == (1, sum(len(it["input_ids"]) for it in items))
    starts = (flat["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == sum(len(it["seq_lens"]) for it in items)
    assert all(flat["labels"][0, s].item() == IGNORE_INDEX for s in starts)
    padded = open_packed(store, packing="bfd", seq_length=300)
    assert collate([padded[i] for i in range(3)])["input_ids"].shape == (3, 300)
    last = len(ds) - 1
    assert torch.equal(padded[last]["input_ids"][: len(items[1]["input_ids"])], items[1]["input_ids"])


def test_bfd_beats_concat_on_cut_documents_and_packs_tightly(store):
    bfd = open_packed(store, packing="bfd", seq_length=512).view.plan.stats
    assert bfd.documents_split == 0 and bfd.tokens_lost == 0
    assert bfd.rows <= bfd.lower_bound_rows + 1  # within one row of ceil(tokens / seq_length) here
    concat = open_packed(store, seq_length=512).view.plan.stats
    assert concat.documents_split > 0  # what bfd avoids: documents cut across rows


def test_cli_build_bfd_and_stats(store, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["build", str(store.parent / "data.jsonl"), "--out", str(out), "--seq-length", "128",
                 "--packing", "bfd", "--overflow", "truncate", "--no-pad"]) == 0
    printed = capsys.readouterr().out
    assert "(bfd)" in printed and "efficiency" in printed
    ds = open_packed(out)
    assert ds.options.packing == "bfd" and ds.options.overflow == "truncate" and ds.options.pad is False
    assert main(["stats", str(out), "--seq-length", "256", "--plot", str(tmp_path / "fill.png")]) == 0
    report = capsys.readouterr().out
    assert "seq_length 256" in report and "packing efficiency" in report
    assert (tmp_path / "fill.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for args in (["--seq-length", "256"], ["--seq-length", "96", "--packing", "concat"]):
        assert main(["stats", str(out), *args]) == 0  # the targets stats reports are those the rows serve
        line = next(x for x in capsys.readouterr().out.splitlines() if "supervised labels:" in x)
        ds = open_packed(out, seq_length=int(args[1]), packing=args[-1] if "concat" in args else None)
        served = sum(int((ds[i]["labels"] != IGNORE_INDEX).sum()) for i in range(len(ds)))
        assert line.split()[2] == f"{served:,}"


@pytest.mark.parametrize("kwargs", [{}, {"seq_length": 33, "shuffle": True, "seed": 2},
                                    {"packing": "bfd", "seq_length": 50}, {"packing": "bfd", "seq_length": 7},
                                    {"packing": "bfd", "seq_length": 64, "overflow": "truncate", "pad": False}])
def test_supervision_counts_equal_the_served_labels(store, kwargs):
    """The summary's supervised labels and empty rows, computed from the mask in one pass,
    are exactly what the served rows hold."""
    ds = open_packed(store, **kwargs)
    per_row = [int((ds[i]["labels"] != IGNORE_INDEX).sum()) for i in range(len(ds))]
    assert ds.view.supervision() == (sum(per_row), per_row.count(0))


@pytest.mark.parametrize("overflow", ["split", "truncate", "drop"])
def test_supervised_tokens_lost_are_counted_exactly(store, overflow):
    from sftpack.config import BuildOptions as Options
    from sftpack.view import View

    ds = open_packed(store)
    view = View(ds.store, Options(seq_length=40, packing="bfd", overflow=overflow), count_supervised=True)
    stats, lost = view.plan.stats, view.plan.lost
    offsets, mask = np.asarray(ds.store.doc_offsets), np.asarray(ds.store.loss_mask)
    want = sum(int(mask[offsets[d] + s : offsets[d] + s + n].sum())
               for d, s, n in zip(lost.doc.tolist(), lost.start.tolist(), lost.length.tolist()))
    assert stats.supervised_in == int(mask.sum()) and stats.supervised_lost == want
    assert (want > 0) == (overflow != "split")


# --------------------------------------------------------------------------- found by attacking plans

from test_shuffle_and_tokenize import sp_tokenizer  # noqa: E402, F401  (a fixture)


def test_bfd_documents_are_encoded_as_on_their_own_with_sentencepiece(sp_tokenizer, tmp_path):  # noqa: F811
    """A bfd row's documents stand alone (positions restart, attention is per document), so
    each is the tokenizer's encoding of its own text (+ EOS), not its mid-stream encoding."""
    rows = [{"prompt": f"Say {w} twice.", "response": f"{w} {w}."} for w in ("apple", "Bel", "zebra", "0x1")]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    ds = PackedSFTDataset(sp_tokenizer, data, 512, packing="bfd", pad=False)
    from sftpack.templates import make_template

    template = make_template("alpaca")
    alone = sorted(sp_tokenizer(template.render([("user", r["prompt"]), ("assistant", r["response"])]).text)["input_ids"]
                   + [sp_tokenizer.eos_token_id] for r in rows)
    served = []
    for i in range(len(ds)):
        item = ds[i]
        cuts = np.cumsum(item["seq_lens"].numpy())[:-1]
        served += [piece.tolist() for piece in np.split(item["input_ids"].numpy(), cuts)]
    assert sorted(served) == alone


def test_a_build_whose_plan_fails_changes_nothing(store, tmp_path):
    data = store.parent / "data.jsonl"
    out = tmp_path / "s"
    build(data, out, BuildOptions(seq_length=64, train_on_prompt=False), "llama3", progress=False)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(ConfigError, match="nothing to pack"):
        build(data, out, BuildOptions(seq_length=1, packing="bfd", overflow="drop", train_on_prompt=False), "llama3",
              progress=False)
    assert (out / "manifest.json").read_bytes() == before and len(open_packed(out)) > 0
    fresh = tmp_path / "fresh"
    with pytest.raises(ConfigError, match="nothing to pack"):
        build(data, fresh, BuildOptions(seq_length=1, packing="bfd", overflow="drop"), "llama3", progress=False)
    assert not fresh.exists() and [p.name for p in tmp_path.iterdir()] == ["s"]


def test_bfd_shuffle_mixes_the_row_order_and_huge_seq_lengths_are_refused(store):
    plain = open_packed(store, packing="bfd", seq_length=128)
    mixed = open_packed(store, packing="bfd", seq_length=128, shuffle=True, seed=4)
    rows = lambda ds: [ds[i]["input_ids"].tolist() for i in range(len(ds))]  # noqa: E731
    assert rows(mixed) != rows(plain) and sorted(rows(mixed)) == sorted(rows(plain))
    assert rows(open_packed(store, packing="bfd", seq_length=128, shuffle=True, seed=4)) == rows(mixed)
    with pytest.raises(ConfigError, match="seq_length"):
        open_packed(store, packing="bfd", seq_length=10**9)


def test_quiet_build_still_warns_when_the_plan_loses_tokens(store, tmp_path, capsys):
    assert main(["build", str(store.parent / "data.jsonl"), "--out", str(tmp_path / "q"), "--seq-length", "40",
                 "--packing", "bfd", "--overflow", "truncate", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "sftpack: warning: the plan loses" in err


@pytest.mark.parametrize("step", [1, 3, 64, 1 << 18])
def test_ones_before_equals_a_prefix_sum_across_chunks(tmp_path, step):
    # counts of every position, chunk edges included, and mask bytes above 1 (a sum, not a count of nonzeros)
    from sftpack.view import _ones_before

    rng = np.random.default_rng(step)
    mask = rng.integers(0, 256, 1000).astype(np.uint8)
    mask[:300] = rng.integers(0, 2, 300)
    np.save(tmp_path / "mask.npy", mask)
    mapped = np.load(tmp_path / "mask.npy", mmap_mode="r")
    positions = np.concatenate((rng.integers(0, 1001, 200), [0, 1000, 999, 1, step, step - 1, 2 * step]))
    positions = positions[positions <= 1000]
    expected = np.concatenate(([0], np.cumsum(mask, dtype=np.int64)))[positions]
    assert np.array_equal(_ones_before(mapped, positions, step), expected)


def test_ones_before_names_a_truncated_mask(tmp_path):
    from sftpack.errors import StoreError
    from sftpack.view import _ones_before

    np.save(tmp_path / "mask.npy", np.ones(100, np.uint8))
    mapped = np.load(tmp_path / "mask.npy", mmap_mode="r")
    with open(tmp_path / "mask.npy", "r+b") as f:
        f.truncate(mapped.offset + 50)
    with pytest.raises(StoreError, match="shorter than its header"):
        _ones_before(mapped, np.array([100]), 16)
