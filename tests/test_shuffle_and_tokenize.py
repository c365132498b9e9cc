"""Shuffling permutes whole documents; tokenization equals encoding the joined string
`BOS d1 EOS BOS d2 ... EOS BOS dN` (bundled Llama-3, its HF twin, and a SentencePiece model)."""

from __future__ import annotations

import json
import random
import re
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import stored_units, stream_tokens, stream_units
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sftpack import PackedSFTDataset
from sftpack.templates import ALPACA_TEMPLATE

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
BOS_ID, EOS_ID = 128000, 128001


@pytest.fixture(scope="module")
def enc():
    import quicktok

    return quicktok.get_encoding("llama3")


def render(prompt: str, response: str) -> str:
    """The Alpaca document, substituted in one pass (braces in the content stay verbatim)."""
    head, rest = ALPACA_TEMPLATE.split("{instruction}")
    middle, tail = rest.split("{response}")
    return head + prompt + middle + response + tail


def write(path: Path, records: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def tokens(ds) -> list[int]:
    """The stream the dataset's plan reads (`BOS d1 EOS ... BOS dN`, in plan order)."""
    return stream_tokens(ds)


def units(ds) -> list[list[int]]:
    """The document units of the stream, in plan order, from the plan's stream offsets."""
    return stream_units(ds)


def items(ds) -> list[tuple[list[int], list[int]]]:
    return [(ds[i]["input_ids"].tolist(), ds[i]["labels"].tolist()) for i in range(len(ds))]


def marked_records(n: int) -> list[dict]:
    """Distinct records, each carrying a marker `@<i>#` that survives any decoding."""
    rng = random.Random(1234)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    return [
        {
            "prompt": f"@{i}# " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))),
            "response": " ".join(rng.choice(words) for _ in range(rng.randint(1, 20))),
        }
        for i in range(n)
    ]


def order_from_markers(decoded_units: list[str]) -> list[int]:
    order = []
    for text in decoded_units:
        found = re.findall(r"@(\d+)#", text)
        assert len(found) == 1, text
        order.append(int(found[0]))
    return order


def strip_delimiters(unit: list[int]) -> tuple[int, ...]:
    """A unit without its leading BOS and trailing EOS (the last unit has no EOS)."""
    assert unit[0] == BOS_ID
    body = unit[1:]
    if body and body[-1] == EOS_ID:
        body = body[:-1]
    return tuple(body)


# =========================================================================== shuffle


N_DOCS = 40


@pytest.fixture(scope="module")
def shuffle_data(tmp_path_factory):
    path = write(tmp_path_factory.mktemp("shuffle") / "data.jsonl", marked_records(N_DOCS))
    plain = PackedSFTDataset("llama3", path, seq_length=16)
    return path, plain


def test_shuffle_differs_from_file_order(shuffle_data):
    path, plain = shuffle_data
    shuffled = PackedSFTDataset("llama3", path, seq_length=16, shuffle=True, seed=0)
    assert shuffled.summary.documents == plain.summary.documents == N_DOCS
    assert len(tokens(shuffled)) == len(tokens(plain))
    assert tokens(shuffled) != tokens(plain)
    assert items(shuffled) != items(plain)
    # the store itself is never shuffled: both datasets read the same stored documents
    assert stored_units(shuffled) == stored_units(plain)


def test_same_seed_gives_identical_items(shuffle_data):
    path, _ = shuffle_data
    a = PackedSFTDataset("llama3", path, seq_length=16, shuffle=True, seed=1234)
    b = PackedSFTDataset("llama3", path, seq_length=16, shuffle=True, seed=1234)
    assert tokens(a) == tokens(b)
    assert np.asarray(a.store.doc_offsets).tolist() == np.asarray(b.store.doc_offsets).tolist()
    assert items(a) == items(b)
    assert a.summary.seed == b.summary.seed == 1234


def test_different_seeds_differ(shuffle_data):
    path, _ = shuffle_data
    streams = {
        tuple(tokens(PackedSFTDataset("llama3", path, seq_length=16, shuffle=True, seed=seed))) for seed in (1, 2, 3)
    }
    assert len(streams) == 3


def test_seed_without_shuffle_keeps_file_order(shuffle_data):
    path, plain = shuffle_data
    assert tokens(PackedSFTDataset("llama3", path, seq_length=16, shuffle=False, seed=99)) == tokens(plain)


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
def test_shuffled_stream_is_a_permutation_of_whole_documents(shuffle_data, enc, seed):
    path, plain = shuffle_data
    shuffled = PackedSFTDataset("llama3", path, seq_length=16, shuffle=True, seed=seed)
    plain_units, shuffled_units = units(plain), units(shuffled)
    assert len(shuffled_units) == len(plain_units) == N_DOCS
    # every unit is one whole document: BOS first, EOS last except for the stream's last unit
    for unit in shuffled_units[:-1]:
        assert unit[0] == BOS_ID and unit[-1] == EOS_ID
        assert BOS_ID not in unit[1:] and EOS_ID not in unit[:-1]
    assert shuffled_units[-1][0] == BOS_ID and EOS_ID not in shuffled_units[-1]
    assert Counter(map(strip_delimiters, shuffled_units)) == Counter(map(strip_delimiters, plain_units))
    # and the stream is exactly the joined string of the documents in that order
    order = order_from_markers([enc.decode(u) for u in shuffled_units])
    assert sorted(order) == list(range(N_DOCS)) and order != list(range(N_DOCS))
    records = marked_records(N_DOCS)
    texts = [render(records[i]["prompt"], records[i]["response"]) for i in order]
    assert tokens(shuffled) == enc.encode_with_special(BOS + (EOS + BOS).join(texts))
    # the plan's order is that permutation of the stored (file-order) documents
    assert np.asarray(shuffled.view.plan.order).tolist() == order
    stored = stored_units(shuffled)
    assert order_from_markers([enc.decode(u) for u in stored]) == list(range(N_DOCS))
    assert all(u[0] == BOS_ID and u[-1] == EOS_ID for u in stored)


def test_shuffle_without_seed_differs_between_builds(shuffle_data):
    path, plain = shuffle_data
    a = PackedSFTDataset("llama3", path, seq_length=16, shuffle=True)
    b = PackedSFTDataset("llama3", path, seq_length=16, shuffle=True)
    assert a.summary.seed is not None and b.summary.seed is not None
    assert a.summary.seed != b.summary.seed
    assert tokens(a) != tokens(b)
    reference = Counter(map(strip_delimiters, units(plain)))
    assert Counter(map(strip_delimiters, units(a))) == reference == Counter(map(strip_delimiters, units(b)))
    # the drawn seed is recorded: rebuilding with it gives the same items
    again = PackedSFTDataset("llama3", path, seq_length=16, shuffle=True, seed=a.summary.seed)
    assert tokens(again) == tokens(a)


def test_shuffle_moves_loss_masks_with_their_documents(shuffle_data):
    path, _ = shuffle_data
    plain = PackedSFTDataset("llama3", path, seq_length=16, train_on_prompt=False)
    shuffled = PackedSFTDataset("llama3", path, seq_length=16, train_on_prompt=False, shuffle=True, seed=5)

    def pairs(ds):
        out = []
        for tok, mask in stream_units(ds, with_mask=True):
            if tok[-1] == EOS_ID:  # the last unit of a stream has lost its EOS
                tok, mask = tok[:-1], mask[:-1]
            out.append((tuple(tok), tuple(mask)))
        return Counter(out)

    assert tokens(plain) != tokens(shuffled)
    assert pairs(plain) == pairs(shuffled)
    assert any(0 in mask for _, mask in pairs(plain)) and any(1 in mask for _, mask in pairs(plain))


def test_shuffle_result_does_not_depend_on_batch_and_chunk_sizes(shuffle_data, monkeypatch):
    path, _ = shuffle_data
    reference = PackedSFTDataset("llama3", path, seq_length=16, shuffle=True, seed=11)
    # the shuffle is now a plan over the stored documents (no gather chunks at build): only
    # the tokenizer batches are cut at build, and neither store nor stream may depend on them
    monkeypatch.setattr("sftpack.build.BATCH_CHARS", 300)
    small = PackedSFTDataset("llama3", path, seq_length=16, shuffle=True, seed=11)
    assert not small.summary.reused
    assert stored_units(small, with_mask=True) == stored_units(reference, with_mask=True)
    assert tokens(small) == tokens(reference)
    assert items(small) == items(reference)


# =========================================================================== special-token strings


SPECIAL_RECORDS = [
    {"prompt": "plain question", "response": "plain answer"},
    {"prompt": f"stop here {EOS} and go on", "response": "fine"},
    {"prompt": "chat turn<|eot_id|>", "response": "ok"},
    {"prompt": "no specials", "response": "ends with a turn marker<|eot_id|>"},
    {"prompt": f"{BOS}{BOS}", "response": f"x{EOS}y<|start_header_id|>user<|end_header_id|>"},
    {"prompt": "almost <|end_of_text| or <|eot_id but not quite", "response": "<| |>"},
    {"prompt": "reserved <|reserved_special_token_5|> id", "response": "z"},
]
SPECIAL_DOCS = 5  # records 1, 2, 3, 4, 6 hold complete special-token strings


@pytest.fixture(scope="module")
def special_path(tmp_path_factory):
    return write(tmp_path_factory.mktemp("specials") / "data.jsonl", SPECIAL_RECORDS)


@pytest.fixture(params=["bundled", "hf"])
def llama3_tokenizer(request):
    if request.param == "bundled":
        return "llama3"
    return request.getfixturevalue("hf_llama3")


def _special_texts():
    return [render(r["prompt"], r["response"]) for r in SPECIAL_RECORDS]


def test_special_token_strings_are_parsed_like_the_joined_string(special_path, enc, llama3_tokenizer):
    with pytest.warns(UserWarning, match="special-token"):
        ds = PackedSFTDataset(llama3_tokenizer, special_path, seq_length=8)
    expected = enc.encode_with_special(BOS + (EOS + BOS).join(_special_texts()))
    assert tokens(ds) == expected
    assert ds.summary.special_token_documents == SPECIAL_DOCS
    assert 128009 in expected  # <|eot_id|> was parsed, the comparison is not vacuous


def test_special_token_strings_as_text(special_path, enc, llama3_tokenizer):
    with pytest.warns(UserWarning, match="plain text"):
        ds = PackedSFTDataset(llama3_tokenizer, special_path, seq_length=8, special_tokens="text")
    expected = [BOS_ID]
    for i, text in enumerate(_special_texts()):
        if i:
            expected += [EOS_ID, BOS_ID]
        expected += enc.encode_ordinary(text)
    assert tokens(ds) == expected
    assert ds.summary.special_token_documents == SPECIAL_DOCS
    specials = [t for t in tokens(ds) if t >= 128000]
    assert specials == [BOS_ID] + [EOS_ID, BOS_ID] * (len(SPECIAL_RECORDS) - 1)


def test_no_warning_without_special_token_strings(shuffle_data):
    path, _ = shuffle_data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = PackedSFTDataset("llama3", path, seq_length=16)
    assert not [w for w in caught if "special-token" in str(w.message)]
    assert ds.summary.special_token_documents == 0


# =========================================================================== unicode exactness


FRAGMENTS = [
    "{response}", "{prompt}", "{instruction}", "{{", "}}", "{", "}", "{x}", "%s", "$1",
    "🚀", "👩‍💻", "🇯🇵", "😀😀", "日本語", "中文字符", "한국어", "العربية", "עברית",
    "e\u0301", "a\u0308\u0323", "\u200b", "\u200d", "\ufeff", "\u00a0", "\u2028", "\x85",
    " ", "  ", "   \n", "\n\n\n", "\t\t", " \t \n ", "\r\n", "\r",
    "don't", "'s", "'LL", "123456789", "3.14", "...", "!!", "--", "__init__",
    "### Response:", "### Instruction:\n", "<|", "|>", "<|eot_id|>", "\\", '"', "\x00",
]


def random_doc(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(0, 10)):
        if rng.random() < 0.6:
            parts.append(rng.choice(FRAGMENTS))
        else:
            parts.append("".join(chr(rng.choice([rng.randint(32, 126), rng.randint(160, 0x2FFF),
                                                  rng.randint(0x1F300, 0x1FAFF)]))
                                 for _ in range(rng.randint(1, 8))))
    return "".join(parts)


def _random_records(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": random_doc(rng), "response": random_doc(rng)} for _ in range(n)]


@pytest.mark.parametrize("route, batch_chars", [("bundled", None), ("bundled", 500), ("hf", None)])
def test_random_unicode_documents_equal_the_joined_string(tmp_path, enc, request, route, batch_chars, monkeypatch):
    llama3_tokenizer = "llama3" if route == "bundled" else request.getfixturevalue("hf_llama3")
    if batch_chars:  # many batches: the result must not depend on where batches are cut
        monkeypatch.setattr("sftpack.build.BATCH_CHARS", batch_chars)
    records = _random_records(2024, 150)
    path = write(tmp_path / "unicode.jsonl", records)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = PackedSFTDataset(llama3_tokenizer, path, seq_length=32)
    texts = [render(r["prompt"], r["response"]) for r in records]
    assert tokens(ds) == enc.encode_with_special(BOS + (EOS + BOS).join(texts))
    # every document, braces included, decodes back verbatim
    for text, unit in zip(texts, units(ds)):
        assert enc.decode(list(strip_delimiters(unit))) == text


text_strategy = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)),
    max_size=6,
).map("".join)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=st.lists(st.fixed_dictionaries({"prompt": text_strategy, "response": text_strategy}),
                        min_size=1, max_size=6),
       seq_length=st.integers(1, 40))
def test_hypothesis_documents_equal_the_joined_string(records, seq_length):
    import quicktok

    enc = quicktok.get_encoding("llama3")
    texts = [render(r["prompt"], r["response"]) for r in records]
    expected = enc.encode_with_special(BOS + (EOS + BOS).join(texts))
    assume(len(expected) > seq_length)  # at least one row (shorter streams: see test_inputs.py)
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp) / "data.jsonl", records)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = PackedSFTDataset("llama3", path, seq_length=seq_length)
        assert tokens(ds) == expected
        assert len(ds) == (len(expected) - 1) // seq_length >= 1
        for i in (0, len(ds) - 1):
            row = ds[i]
            start = i * seq_length
            assert row["input_ids"].tolist() == expected[start : start + seq_length]
            assert row["labels"].tolist() == expected[start + 1 : start + seq_length + 1]


# =========================================================================== SentencePiece


SP_WORDS = (
    "below is an instruction that describes a task write response appropriately completes the request "
    "alpha beta gamma delta epsilon quick brown fox jumps over lazy dog hello world data packing model"
).split()


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    """A tiny SentencePiece BPE model trained here, served as a Hugging Face Llama tokenizer.

    transformers 5 converts a `tokenizer.model` with protobuf, which is not installed, so the
    vocabulary is read with sentencepiece itself and the merges derived the way transformers'
    SentencePieceExtractor derives them (`generate_merges`).
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    folder = tmp_path_factory.mktemp("spm")
    rng = random.Random(7)
    corpus = folder / "corpus.txt"
    with open(corpus, "w", encoding="utf-8") as f:
        for _ in range(3000):
            f.write(" ".join(rng.choice(SP_WORDS) for _ in range(rng.randint(3, 15))) + ".\n")
        f.write("### Instruction:\n### Response:\n0123456789 @#:,.!?'\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "sp"), vocab_size=400, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        minloglevel=2, num_threads=1,
    )
    sp = spm.SentencePieceProcessor(model_file=str(folder / "sp.model"))
    assert sp.id_to_piece(1) == "<s>" and sp.id_to_piece(2) == "</s>"
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tok = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), add_bos_token=True)
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"
    assert tok("hello world")["input_ids"][0] == tok.bos_token_id == 1
    return tok


def _sp_records(n: int = 12) -> list[dict]:
    recs = marked_records(max(n, 5))
    recs[0]["prompt"] = " " + recs[0]["prompt"] + " and {instruction}"
    recs[1]["prompt"] += "  two  spaces\nand a newline\n"
    recs[2]["response"] = " leading space, trailing space "
    recs[3]["prompt"] += " unicode: café 日本 🚀 {response}"
    recs[4]["response"] = "\n\nnewlines first"
    return recs[:n]


def _sp_expected(tok, texts: list[str]) -> list[int]:
    """`tok(d1 + EOS + BOS + d2 ...)` with special tokens added (BOS prepended)."""
    return list(tok((tok.eos_token + tok.bos_token).join(texts), add_special_tokens=True)["input_ids"])


def test_sentencepiece_tokenizer_is_detected_as_not_per_piece_exact(sp_tokenizer):
    from sftpack.tokenizers import HFTokenizer

    wrapped = HFTokenizer(sp_tokenizer)
    assert wrapped.per_piece_exact is False
    assert wrapped.adds_bos is True
    assert wrapped.delimiter == [sp_tokenizer.eos_token_id, sp_tokenizer.bos_token_id]


@pytest.mark.parametrize("batch_chars", [None, 600])
def test_sentencepiece_stream_equals_the_joined_string(tmp_path, sp_tokenizer, batch_chars, monkeypatch):
    if batch_chars:  # several batches of two or more documents
        monkeypatch.setattr("sftpack.build.BATCH_CHARS", batch_chars)
    records = _sp_records()
    path = write(tmp_path / "data.jsonl", records)
    ds = PackedSFTDataset(sp_tokenizer, path, seq_length=16)
    texts = [render(r["prompt"], r["response"]) for r in records]
    expected = _sp_expected(sp_tokenizer, texts)
    assert expected[0] == sp_tokenizer.bos_token_id
    assert tokens(ds) == expected
    # per-piece encoding would differ here: the comparison exercises the in-context path
    pieces = [sp_tokenizer.bos_token_id]
    for i, text in enumerate(texts):
        if i:
            pieces += [sp_tokenizer.eos_token_id, sp_tokenizer.bos_token_id]
        pieces += sp_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert pieces != expected


def test_sentencepiece_single_document(tmp_path, sp_tokenizer):
    records = _sp_records(1)
    path = write(tmp_path / "one.jsonl", records)
    ds = PackedSFTDataset(sp_tokenizer, path, seq_length=4)
    text = render(records[0]["prompt"], records[0]["response"])
    assert tokens(ds) == list(sp_tokenizer(text)["input_ids"])


def test_sentencepiece_shuffled_stream_equals_the_joined_string_in_shuffled_order(tmp_path, sp_tokenizer):
    records = _sp_records()
    path = write(tmp_path / "data.jsonl", records)
    ds = PackedSFTDataset(sp_tokenizer, path, seq_length=16, shuffle=True, seed=3)
    order = order_from_markers([sp_tokenizer.decode(u) for u in units(ds)])
    assert sorted(order) == list(range(len(records)))
    texts = [render(records[i]["prompt"], records[i]["response"]) for i in order]
    assert tokens(ds) == _sp_expected(sp_tokenizer, texts)


def test_sentencepiece_special_strings_as_text(tmp_path, sp_tokenizer):
    records = _sp_records(6)
    records[2]["prompt"] += " </s> injected <s> here"
    path = write(tmp_path / "data.jsonl", records)
    with pytest.warns(UserWarning, match="plain text"):
        ds = PackedSFTDataset(sp_tokenizer, path, seq_length=8, special_tokens="text")
    stream = tokens(ds)
    eos, bos = sp_tokenizer.eos_token_id, sp_tokenizer.bos_token_id
    # only the delimiters are EOS/BOS ids; the injected strings stay text
    assert [t for t in stream if t in (eos, bos)] == [bos] + [eos, bos] * (len(records) - 1)
    assert "</s> injected <s> here" in sp_tokenizer.decode(units(ds)[2])
