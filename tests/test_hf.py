"""Hugging Face Trainer and TRL SFTTrainer train on sftpack's rows and masks.

The reference: sftpack's own rows (labels="shifted") run through the tiny Llama with an
explicit block-diagonal causal mask built from the rows' document pieces, each token's loss
against its shifted label, leaving out the targets a piece cannot see (the label of a
piece's last token: the next document's first token, or the next row's). The same per-token
losses (as a multiset) and their mean must come out of `Trainer.compute_loss` and
`SFTTrainer.compute_loss` on their own dataloaders, padded and padding-free.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sftpack import ConfigError, collate_flattened, open_packed
from sftpack.build import BuildOptions, build
from sftpack.hf import DataCollator, to_hf_dataset
from sftpack.isolation import tiny_llama

SEQ = 40
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa naïve café 東京 ok".split()
# (train_on_prompt, packing): without and with masks, over both kinds of plan
STORES = {"all-concat": (True, "concat"), "masked-bfd": (False, "bfd")}


def _records(n: int = 14, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5))),
            "response": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9))),
        }
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from conftest import write_jsonl

    root = tmp_path_factory.mktemp("hf")
    data = write_jsonl(root / "data.jsonl", _records())
    out = {}
    for name, (train_on_prompt, packing) in STORES.items():
        opts = BuildOptions(
            seq_length=SEQ,
            template="Q: {prompt}\nA: {response}",
            train_on_prompt=train_on_prompt,
            packing=packing,
            boundaries=True,
        )
        out[name] = build(data, root / name, opts, "llama3").path
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_llama(128256, SEQ)


@pytest.fixture(scope="module")
def reference(stores, model):
    return {name: _reference_losses(model, path) for name, path in stores.items()}


@pytest.fixture(scope="module")
def tokenizer():
    """A two-token tokenizer: TRL wants one for its pad token, and it cannot encode the rows,
    so any tokenizer call on them would fail the test."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<pad>": 0, "<eos>": 1}, unk_token="<pad>")))
    tok.pad_token, tok.eos_token = "<pad>", "<eos>"
    return tok


def _reference_losses(model, path) -> torch.Tensor:
    """Per-token losses of sftpack's reference rows, documents isolated by an explicit mask."""
    ds = open_packed(path)
    items = [ds[i] for i in range(len(ds))]
    ids = torch.stack([it["input_ids"] for it in items])
    labels = torch.stack([it["labels"] for it in items]).clone()
    positions = torch.stack([it["position_ids"] for it in items])
    mask = torch.zeros(len(items), 1, SEQ, SEQ, dtype=torch.bool)
    for r, it in enumerate(items):
        a = 0
        for n in it["seq_lens"].tolist():
            mask[r, 0, a : a + n, a : a + n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
            labels[r, a + n - 1] = -100  # its target is outside the piece
            a += n
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False).logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    return loss[labels.flatten() != -100]


def _assert_same(per_token: list[torch.Tensor], means: list[float], reference: torch.Tensor) -> None:
    got = torch.cat(per_token)
    assert len(got) == len(reference) > 40
    assert torch.allclose(got.sort().values, reference.sort().values, atol=1e-4), (got - reference).abs().max()
    assert np.allclose([m for m in means], [float(t.mean()) for t in per_token], atol=1e-5)
    total = sum(m * len(t) for m, t in zip(means, per_token)) / len(got)
    assert abs(total - float(reference.mean())) < 1e-5


@pytest.mark.parametrize("padding_free", [False, True])
@pytest.mark.parametrize("store", list(STORES))
def test_trainer_compute_loss_equals_reference(stores, model, reference, tmp_path, store, padding_free):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = Trainer(
        model=copy.deepcopy(model),
        args=args,
        train_dataset=open_packed(stores[store], labels="hf"),
        data_collator=DataCollator(padding_free=padding_free),
    )
    per_token, means = [], []
    with torch.no_grad():
        for batch in trainer.get_train_dataloader():  # Trainer has dropped seq_lens (remove_unused_columns)
            assert "seq_lens" not in batch and batch["use_cache"] is False
            loss, out = trainer.compute_loss(trainer.model, batch, return_outputs=True)
            labels = batch["labels"][:, 1:].flatten()
            token = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels, ignore_index=-100, reduction="none")
            per_token.append(token[labels != -100])
            means.append(float(loss))
    _assert_same(per_token, means, reference[store])


@pytest.mark.parametrize("padding_free", [False, True])
@pytest.mark.parametrize("store", list(STORES))
def test_sft_trainer_compute_loss_equals_reference(
    stores, model, reference, tokenizer, tmp_path, monkeypatch, store, padding_free
):
    from trl import SFTConfig, SFTTrainer

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the rows were re-tokenized")

    for method in ("__call__", "encode", "apply_chat_template"):
        monkeypatch.setattr(type(tokenizer), method, no_tokenizing)
    args = SFTConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, max_length=None, padding_free=padding_free
    )
    trainer = SFTTrainer(
        model=copy.deepcopy(model),
        args=args,
        train_dataset=to_hf_dataset(open_packed(stores[store]), cache_dir=str(tmp_path / "arrow")),
        processing_class=tokenizer,
        data_collator=None if padding_free else DataCollator(),
    )
    per_token, means = [], []
    # the per-token log-probs TRL's loss is made of, from the model call compute_loss makes
    hook = trainer.model.register_forward_hook(lambda m, a, out: per_token.append(-out.log_probs[out.label_mask]))
    with torch.no_grad():
        for batch in trainer.get_train_dataloader():
            assert "attention_mask" not in batch
            assert batch["position_ids"].shape == batch["input_ids"].shape
            means.append(float(trainer.compute_loss(trainer.model, batch)))
    hook.remove()
    _assert_same(per_token, means, reference[store])


def test_hf_labels_are_the_reference_labels_moved_one_right(stores):
    for path in stores.values():
        ref, hf = open_packed(path), open_packed(path, labels="hf")
        lost = 0
        for i in range(len(ref)):
            a, b = ref[i], hf[i]
            assert torch.equal(a["input_ids"], b["input_ids"])
            assert torch.equal(a["position_ids"], b["position_ids"])
            trained = b["labels"] != -100
            assert torch.equal(b["labels"][trained], b["input_ids"][trained])  # aligned with the inputs
            starts = torch.cumsum(a["seq_lens"], 0)[:-1].long()
            assert (b["labels"][starts] == -100).all() and b["labels"][0] == -100
            expected = torch.cat((torch.tensor([-100]), a["labels"][:-1]))
            expected[starts] = -100
            assert torch.equal(b["labels"], expected)
            lost += int(a["labels"][-1] != -100)
        if ref.options.packing == "concat":
            assert lost > 0  # the one target per row that lies in the next row
            assert any(int(ref[i]["position_ids"][0]) > 0 for i in range(len(ref)))  # rows continuing a document
        else:
            assert lost == 0


def test_shifted_labels_reaching_the_hf_collator_raise(stores, tmp_path):
    from transformers import Trainer, TrainingArguments

    path = stores["all-concat"]
    ref = open_packed(path)
    for padding_free in (False, True):
        with pytest.raises(ConfigError, match="labels='hf'"):
            DataCollator(padding_free=padding_free)([ref[0], ref[1]])
    # as a new user would: Trainer with the HF collator and the default dataset
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = Trainer(model=tiny_llama(128256, SEQ), args=args, train_dataset=ref, data_collator=DataCollator())
    with pytest.raises(ConfigError, match="labels='hf'"):
        next(iter(trainer.get_train_dataloader()))
    # and the other way round: HF items are refused by the reference flattening collator
    hf = open_packed(path, labels="hf")
    with pytest.raises(ConfigError, match="DataCollator"):
        collate_flattened([hf[0], hf[1]])
    assert torch.equal(
        collate_flattened([ref[0], ref[1]])["labels"], DataCollator(padding_free=True)([hf[0], hf[1]])["labels"]
    )


def test_to_hf_dataset_converts_and_streams(stores, tmp_path):
    path = stores["masked-bfd"]
    hf = open_packed(path, labels="hf")
    arrow = to_hf_dataset(open_packed(path), cache_dir=str(tmp_path))  # a reference dataset: converted
    stream = to_hf_dataset(hf, streaming=True)
    assert arrow.column_names == ["input_ids", "labels", "position_ids", "seq_lengths"]
    assert len(arrow) == len(hf)
    for i, (a, s) in enumerate(zip(arrow, stream)):
        item = hf[i]
        for key, col in (("input_ids", "input_ids"), ("labels", "labels"), ("position_ids", "position_ids")):
            assert a[col] == s[col] == item[key].tolist()
        assert a["seq_lengths"] == item["seq_lens"].tolist()


def test_collator_positions_from_any_key(stores):
    ds = open_packed(stores["all-concat"], labels="hf")
    items = [ds[i] for i in range(3)]
    full = DataCollator()(items)
    from_lens = DataCollator()([{k: v for k, v in it.items() if k != "position_ids"} for it in items])
    trl_style = DataCollator()(
        [
            {
                "input_ids": it["input_ids"].tolist(),
                "labels": it["labels"].tolist(),
                "seq_lengths": it["seq_lens"].tolist(),
            }
            for it in items
        ]
    )
    pos = torch.stack([it["position_ids"] for it in items])
    assert torch.equal(full["position_ids"], pos)
    restarted = pos - torch.where(
        torch.arange(SEQ) < torch.stack([it["seq_lens"][0] for it in items])[:, None], pos[:, :1], 0
    )
    assert torch.equal(from_lens["position_ids"], restarted) and torch.equal(trl_style["position_ids"], restarted)
    flat = DataCollator(padding_free=True)(items)
    assert flat["input_ids"].shape == (1, 3 * SEQ)
    assert torch.equal(flat["position_ids"][0], restarted.flatten())
    ragged = DataCollator(pad_id=7)([items[0], {k: v[:10] for k, v in items[1].items() if k != "seq_lens"}])
    assert ragged["input_ids"][1, 10:].eq(7).all() and ragged["labels"][1, 10:].eq(-100).all()
    assert ragged["position_ids"][1, 10:].tolist() == list(range(SEQ - 10))


def test_collator_and_cache_dir_refusals(stores, tmp_path):
    ds = open_packed(stores["all-concat"], labels="hf")
    items = [ds[i] for i in range(2)]
    bare = {"input_ids": items[1]["input_ids"], "labels": items[1]["labels"]}  # no boundaries: one document
    for padding_free in (False, True):
        with pytest.raises(ConfigError, match="feature 1 has no document boundaries"):
            DataCollator(padding_free=padding_free)([items[0], bare])
    with pytest.raises(ConfigError, match=r"must be 1-D.*\(1, 2\)"):
        DataCollator()([{"input_ids": torch.tensor([[1, 2]]), "labels": torch.tensor([[1, 2]])}])
    DataCollator()([bare, bare])  # none with boundaries: each row one sequence, as documented
    afile = tmp_path / "afile"
    afile.write_text("keep")
    for cache_dir in (afile, afile / "below"):
        with pytest.raises(ConfigError, match="afile is not a directory"):
            to_hf_dataset(ds, cache_dir=str(cache_dir))
    assert afile.read_text() == "keep"


def test_one_training_step_under_trainer_defaults(stores, model, reference, tmp_path):
    """The whole loop (accelerate, gradient step) takes the collator's batches; one batch
    holds every row, so the step's loss is the reference's mean."""
    from transformers import Trainer, TrainingArguments

    ds = open_packed(stores["masked-bfd"], labels="hf")
    assert len(ds) <= 8  # one batch at the default batch size
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1)
    trainer = Trainer(model=copy.deepcopy(model), args=args, train_dataset=ds, data_collator=DataCollator())
    out = trainer.train()
    assert abs(out.training_loss - float(reference["masked-bfd"].mean())) < 1e-5


def test_the_label_option(stores, tmp_path):
    import pickle

    from conftest import write_jsonl

    from sftpack import PackedSFTDataset

    path = stores["all-concat"]
    with pytest.raises(ConfigError, match="'shifted'.*'hf'"):
        open_packed(path, labels="unshifted")
    hf = open_packed(path, labels="hf")
    again = pickle.loads(pickle.dumps(hf))  # DataLoader workers reopen it
    assert again.labels == "hf" and torch.equal(again[1]["labels"], hf[1]["labels"])
    assert hf.with_labels("shifted").labels == "shifted" and torch.equal(
        hf.with_labels("shifted")[1]["labels"], open_packed(path)[1]["labels"]
    )
    built = PackedSFTDataset(
        "llama3",
        write_jsonl(tmp_path / "d.jsonl", _records()),
        SEQ,
        labels="hf",
        template="Q: {prompt}\nA: {response}",
        boundaries=True,
    )
    assert torch.equal(built[2]["labels"], hf[2]["labels"])


def test_hf_labels_carry_document_boundaries_on_a_store_built_without_them(tmp_path):
    """The documented HF path on a default (concat, no boundaries) store: rows still tell the
    model where documents start, so a HF model never lets them attend to each other."""
    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "data.jsonl", _records())
    path = build(data, tmp_path / "s", BuildOptions(seq_length=SEQ), "llama3").path
    assert open_packed(path).options.boundaries is False
    bos = open_packed(path).store.manifest["tokenizer"]["bos_id"]
    for ds in (open_packed(path, labels="hf"), open_packed(path).with_labels("hf")):
        assert ds.options.boundaries is True
        for i in range(len(ds)):
            item = ds[i]
            starts = (item["input_ids"] == bos).nonzero().flatten().tolist()
            assert all(item["position_ids"][s] == 0 for s in starts)  # every document restarts at 0
            assert int(item["seq_lens"].sum()) == SEQ
        batch = DataCollator(padding_free=True)([ds[0], ds[1]])
        assert int((batch["position_ids"] == 0).sum()) >= 2
    hf = to_hf_dataset(open_packed(path), cache_dir=str(tmp_path / "cache"))
    assert "position_ids" in hf.column_names and "seq_lengths" in hf.column_names
    assert open_packed(path, labels="hf", boundaries=False).options.boundaries is False  # an explicit choice stands
