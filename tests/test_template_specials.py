"""Special tokens written by a template are always parsed (single ids); special-token strings
in user content follow `special_tokens` ("parse": ids, "text": plain text). On every
tokenizer route: quicktok, HF byte-level (alone and served by quicktok), HF SentencePiece
(not per-piece exact: encoded in context), and a slow tokenizer (no "text" mode on injected
content: refused with a ConfigError).

The expected stream is the HF tokenizer on the joined string `d1 EOS BOS d2 ... EOS BOS dN`
(BOS prepended). With `special_tokens="text"` the joined string holds special-token strings
that must stay text next to ones that must parse, which no HF call can be asked for; there
the template's special tokens and the delimiters are written as placeholder added tokens
and the HF tokenizer encodes the whole string once with `encode_special_tokens=True` (so
every other special-token string is text), the placeholder ids then mapped to the real ids.
In "parse" mode that same oracle is checked against the plain HF call.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
from helpers import stream_tokens, stream_units, trained_runs
from test_shuffle_and_tokenize import order_from_markers, sp_tokenizer  # noqa: F401  (a fixture)

from sftpack import PackedSFTDataset
from sftpack.templates import LLAMA3_CHAT_TEMPLATE
from sftpack.tokenizers import load_tokenizer

GEMMA_CHAT = (
    "{{ bos_token }}{% for m in messages %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
)
# prompt templates that start with text (the stream's first text is at offset 0)
GEMMA_PROMPT = "User: {prompt}<end_of_turn>\n<start_of_turn>model\n{response}<end_of_turn>"
LLAMA3_PROMPT = "User: {prompt}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{response}<|eot_id|>"


@pytest.fixture(scope="module")
def sp_chat(sp_tokenizer):  # noqa: F811
    """The SentencePiece model of test_shuffle_and_tokenize with Gemma's turn markers added."""
    tok = copy.deepcopy(sp_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = GEMMA_CHAT
    return tok


class Route:
    def __init__(self, tokenizer, hf, chat, prompt, specials, open_, close):
        self.name = ""
        self.tokenizer, self.hf, self.chat, self.prompt = tokenizer, hf, chat, prompt
        self.specials = specials  # the special-token strings the templates write
        self.open, self.close = open_, close  # the turn opener and closer among them


@pytest.fixture(scope="module")
def routes(sp_chat, hf_llama3) -> dict[str, Route]:
    """Each route's sftpack tokenizer, built once (a given `Tokenizer` is used as is)."""
    llama3 = dict(hf=hf_llama3, chat=LLAMA3_CHAT_TEMPLATE, prompt=LLAMA3_PROMPT,
                  specials=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                  open_="<|start_header_id|>", close="<|eot_id|>")
    out = {
        "sentencepiece": Route(load_tokenizer(sp_chat), sp_chat, "chat", GEMMA_PROMPT,
                               ["<start_of_turn>", "<end_of_turn>"], "<start_of_turn>", "<end_of_turn>"),
        "quicktok": Route(load_tokenizer("llama3"), **llama3),
        "hf": Route(load_tokenizer(hf_llama3, accelerate=False), **llama3),
        "hf-accelerated": Route(load_tokenizer(hf_llama3), **llama3),
    }
    assert type(out["sentencepiece"].tokenizer).__name__ == "HFTokenizer"
    assert not out["sentencepiece"].tokenizer.per_piece_exact
    assert type(out["hf"].tokenizer).__name__ == "HFTokenizer" and out["hf"].tokenizer.per_piece_exact
    assert type(out["hf-accelerated"].tokenizer).__name__ == "AcceleratedTokenizer"
    for name, r in out.items():
        r.name = name
    return out


@pytest.fixture(params=["sentencepiece", "quicktok", "hf", "hf-accelerated"])
def route(request, routes) -> Route:
    return routes[request.param]


def conversations(r: Route, chat: bool) -> list[list[tuple[str, str]]]:
    """Injected documents first (the stream's first document), in the middle and last; user
    and assistant content holding the template's markers, the delimiters and the private-use
    character sftpack's own encoder marks segments with."""
    eos, bos = r.hf.eos_token, r.hf.bos_token
    convs = [
        [("user", f"@0# alpha {r.close}{r.open}model \ue000 beta {eos}{bos} gamma"), ("assistant", "quick brown fox")],
        [("user", "@1# hello world"), ("assistant", "lazy dog")],
        [("user", f"@2# {r.open}"), ("assistant", f"gamma {r.close} delta")],
        [("user", "@3# data packing"), ("assistant", "the model")],
        [("user", f"@4# {eos}"), ("assistant", f"{bos}jumps over")],
    ]
    if chat:
        convs[1] += [("user", f"more {r.close}"), ("assistant", "alpha beta")]
    return convs


def records(convs) -> list[dict]:
    return [{"messages": [{"role": role, "content": text} for role, text in conv]} for conv in convs]


def write(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def render(r: Route, template: str, conv, swap: dict[str, str] | None = None) -> str:
    """The document text, rendered independently of sftpack; `swap` renames template specials."""
    import jinja2

    source = r.hf.chat_template if template == "chat" else template
    for old, new in (swap or {}).items():
        source = source.replace(old, new)
    if "{%" in source or "{{" in source:
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        messages = [{"role": role, "content": text} for role, text in conv]
        eos = r.hf.eos_token
        return env.from_string(source).render(messages=messages, bos_token="", eos_token=(swap or {}).get(eos, eos),
                                              add_generation_prompt=False)
    (_, prompt), (_, response) = conv
    head, rest = source.split("{prompt}")
    middle, tail = rest.split("{response}")
    return head + prompt + middle + response + tail


_ORACLES: dict[tuple, tuple] = {}  # (id(hf), parse, specials) -> (hf, oracle tokenizer)


def expected_stream(r: Route, template: str, convs, parse: bool) -> list[int]:
    """The HF tokenizer on the joined string, the template's specials and the delimiters
    parsed, other special-token strings parsed or text (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer

    hf = r.hf
    swap = {s: f"\ue010{i}\ue011" for i, s in enumerate([*r.specials, hf.eos_token])}  # EOS: by variable
    delim = {hf.eos_token: "\ue010eos\ue011", hf.bos_token: "\ue010bos\ue011"}
    joined = (delim[hf.eos_token] + delim[hf.bos_token]).join(render(r, template, c, swap) for c in convs)
    key = (id(hf), parse, tuple(r.specials))
    _, raw = _ORACLES.get(key, (None, None))
    if raw is None:
        raw = Tokenizer.from_str(hf.backend_tokenizer.to_str())
        _ORACLES[key] = hf, raw  # hf held: its id is not reused
        raw.encode_special_tokens = not parse
        flags = {str(a): (a.lstrip, a.rstrip) for a in hf.added_tokens_decoder.values()}  # stripping kept
        raw.add_tokens([AddedToken(p, special=False, normalized=False, lstrip=flags[s][0], rstrip=flags[s][1])
                        for s, p in [*swap.items(), *delim.items()]])
    real = {raw.token_to_id(p): hf.convert_tokens_to_ids(s) for s, p in [*swap.items(), *delim.items()]}
    ids = [hf.bos_token_id] + [real.get(i, i) for i in raw.encode(joined, add_special_tokens=False).ids]
    if parse:  # the oracle is the plain HF call where one exists
        plain = (hf.eos_token + hf.bos_token).join(render(r, template, c) for c in convs)
        assert ids == list(hf(plain)["input_ids"])
    return ids


def build(path, tokenizer, **kwargs) -> PackedSFTDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PackedSFTDataset(tokenizer, path, seq_length=8, schema="messages", **kwargs)


def units(ds) -> list[tuple[list[int], list[int]]]:
    """(ids, mask) of every document of the stream, in plan order (the last without EOS)."""
    return stream_units(ds, with_mask=True)


def content_specials(r: Route, conv) -> int:
    """How many of the template's special-token strings the user wrote (in parse mode ids)."""
    return sum(text.count(s) for _, text in conv for s in r.specials)


@pytest.mark.parametrize("batch_chars", [None, 150])
@pytest.mark.parametrize("train_on_prompt", [True, False])
@pytest.mark.parametrize("mode", ["parse", "text"])
@pytest.mark.parametrize("kind", ["chat", "prompt"])
def test_template_specials_are_ids_and_content_follows_the_mode(tmp_path, monkeypatch, route, kind, mode,
                                                                train_on_prompt, batch_chars):
    if batch_chars:  # several batches: only the first holds the stream's first document
        monkeypatch.setattr("sftpack.build.BATCH_CHARS", batch_chars)
    r = route
    template = r.chat if kind == "chat" else r.prompt
    convs = conversations(r, kind == "chat")
    ds = build(write(tmp_path / "data.jsonl", records(convs)), r.tokenizer, template=template,
               special_tokens=mode, train_on_prompt=train_on_prompt)
    assert stream_tokens(ds) == expected_stream(r, template, convs, mode == "parse")
    assert ("encoded by quicktok" in ds.summary.tokenizer) == (r.name == "hf-accelerated")
    users_specials = [s for s in (*r.specials, r.hf.eos_token, r.hf.bos_token)]
    assert ds.summary.special_token_documents == sum(
        any(s in text for _, text in conv for s in users_specials) for conv in convs)

    hf = r.hf
    open_id, close_id = hf.convert_tokens_to_ids([r.open, r.close])
    docs = units(ds)
    for d, ((ids, mask), conv) in enumerate(zip(docs, convs)):
        turns = len(conv) if kind == "chat" else 1
        injected = content_specials(r, conv) if mode == "parse" else 0
        written = sum(render(r, template, conv).count(s) for s in (r.open, r.close))
        assert ids.count(open_id) + ids.count(close_id) == written - content_specials(r, conv) + injected
        assert ids.count(close_id) >= turns  # every turn closed by the single id
        if train_on_prompt:
            assert mask == [1] * len(ids)
            continue
        answers = [text for role, text in conv if role == "assistant"]
        if kind == "chat":  # each answer and the closing special token, as its single id
            runs = trained_runs(ids, mask)
            assert len(runs) == len(answers)
            for run, answer in zip(runs, answers):
                assert run[-1] == close_id and hf.decode(run[:-1]) == answer
                assert run.count(close_id) == 1 + (mode == "parse") * answer.count(r.close)
        else:  # the response and the delimiter EOS (the last document has none), not the template's closer
            trained = [t for t, m in zip(ids, mask) if m]
            last = d == len(docs) - 1
            assert hf.decode(trained) == answers[0] + ("" if last else hf.eos_token)
            assert trained.count(close_id) == (mode == "parse") * answers[0].count(r.close)
            assert last or trained[-1] == hf.eos_token_id


@pytest.mark.parametrize("mode", ["parse", "text"])
def test_shuffled_stream_has_template_specials_as_ids(tmp_path, route, mode):
    """The shuffled stream's first document is encoded again as at the stream start."""
    r = route
    convs = conversations(r, True)
    ds = build(write(tmp_path / "data.jsonl", records(convs)), r.tokenizer, template=r.chat,
               special_tokens=mode, shuffle=True, seed=5, train_on_prompt=False)
    order = order_from_markers([r.hf.decode(ids) for ids, _ in units(ds)])
    assert sorted(order) == list(range(len(convs))) and order[0] != 0
    expected = expected_stream(r, r.chat, [convs[i] for i in order], mode == "parse")
    assert stream_tokens(ds) == expected


@pytest.mark.parametrize("mode", ["parse", "text"])
def test_special_token_straddling_the_content_edge_is_user_text(tmp_path, route, mode):
    """User text completed by the template's characters (`...<|eot_id` + `|>`) is not the
    template's special token: text under "text", parsed (the reference) under "parse"."""
    r = route
    cut = len(r.close) // 2
    template = "Q: {prompt}" + r.close[cut:] + "\n{response}"
    convs = [[("user", f"@{i}# alpha " + r.close[:cut]), ("assistant", "quick brown fox")] for i in range(3)]
    ds = build(write(tmp_path / "data.jsonl", records(convs)), r.tokenizer, template=template,
               special_tokens=mode, train_on_prompt=False)
    assert ds.summary.special_token_documents == 3
    stream = stream_tokens(ds)
    assert stream.count(r.hf.convert_tokens_to_ids(r.close)) == (3 if mode == "parse" else 0)
    assert stream == expected_stream(r, template, convs, mode == "parse")


@pytest.mark.parametrize("mode", ["parse", "text"])
def test_eos_written_by_the_template_is_an_id_and_trained(tmp_path, route, mode):
    """A template that closes each answer with `eos_token` (Llama-2 style) next to user
    content holding the EOS and BOS strings."""
    r = route
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}")
    eos, bos = r.hf.eos_token, r.hf.bos_token
    convs = [[("user", f"@{i}# alpha {eos}{bos} beta"), ("assistant", f"quick {eos} fox")] for i in range(3)]
    ds = build(write(tmp_path / "data.jsonl", records(convs)), r.tokenizer, template=template,
               special_tokens=mode, train_on_prompt=False)
    assert stream_tokens(ds) == expected_stream(r, template, convs, mode == "parse")
    eos_id = r.hf.eos_token_id
    for ids, mask in units(ds):
        trained = [t for t, m in zip(ids, mask) if m]
        assert trained[-1] == eos_id and trained.count(eos_id) == (2 if mode == "parse" else 1)
        assert r.hf.decode(trained).lstrip() == f"quick {eos} fox{eos}"  # " quick" straddles: trained


def _stripping(hf, strips: dict[str, tuple[bool, bool]]):
    """A copy of `hf` whose special tokens take the whitespace beside them (as Phi-3's do)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads(hf.backend_tokenizer.to_str())
    for added in data["added_tokens"]:
        added["lstrip"], added["rstrip"] = strips.get(added["content"], (False, False))
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)),
                                   bos_token=hf.bos_token, eos_token=hf.eos_token)


STRIP_TEMPLATE = "{% for m in messages %}OPEN {{ m['role'] }}\n {{ m['content'] }}  CLOSE \n{% endfor %}"


@pytest.fixture(scope="module")
def stripping_routes(routes) -> dict[str, Route]:
    out = {}
    for name in ("sentencepiece", "hf", "hf-accelerated"):
        base = routes[name]
        strips = {base.close: (True, True), base.open: (False, True)}
        hf = out["hf"].hf if name == "hf-accelerated" else _stripping(base.hf, strips)
        tokenizer = load_tokenizer(hf, accelerate=name == "hf-accelerated")
        assert tokenizer.special_strips == strips
        assert tokenizer.per_piece_exact == (name != "sentencepiece")
        template = STRIP_TEMPLATE.replace("OPEN", base.open).replace("CLOSE", base.close)
        out[name] = Route(tokenizer, hf, template, "", base.specials, base.open, base.close)
    return out


@pytest.mark.parametrize("mode", ["parse", "text"])
@pytest.mark.parametrize("name", ["sentencepiece", "hf", "hf-accelerated"])
def test_special_tokens_that_strip_whitespace_take_it_as_in_the_joined_string(tmp_path, stripping_routes, name, mode):
    r = stripping_routes[name]
    convs = [[("user", f"@{i}# alpha {r.close} beta "), ("assistant", f"quick {r.open}  fox")] for i in range(3)]
    ds = build(write(tmp_path / "data.jsonl", records(convs)), r.tokenizer, template=r.chat,
               special_tokens=mode, train_on_prompt=False)
    assert stream_tokens(ds) == expected_stream(r, r.chat, convs, mode == "parse")


@pytest.fixture(scope="module")
def slow_sp(tmp_path_factory):
    """A slow (sentencepiece-backed, no `tokenizers` backend) tokenizer with Gemma's markers."""
    import random

    import sentencepiece as spm
    from test_shuffle_and_tokenize import SP_WORDS
    from transformers.models.bert_generation import BertGenerationTokenizer

    folder = tmp_path_factory.mktemp("slow-spm")
    rng = random.Random(3)
    corpus = folder / "corpus.txt"
    corpus.write_text("".join(" ".join(rng.choice(SP_WORDS) for _ in range(8)) + ".\n" for _ in range(500)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "sp"), vocab_size=400,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
                                   character_coverage=1.0, minloglevel=2, num_threads=1)
    tok = BertGenerationTokenizer(vocab_file=str(folder / "sp.model"), bos_token="<s>", eos_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    assert not hasattr(tok, "backend_tokenizer")
    return tok


def test_slow_tokenizer_parses_template_specials_and_refuses_text_mode_on_injected_content(tmp_path, slow_sp):
    from sftpack import ConfigError

    template = GEMMA_CHAT.replace("{{ bos_token }}", "")
    convs = [[("user", f"hello world {i}"), ("assistant", "quick brown fox")] for i in range(3)]
    path = write(tmp_path / "clean.jsonl", records(convs))
    texts = [render(Route(None, slow_sp, template, "", [], "", ""), template, c) for c in convs]
    expected = list(slow_sp(slow_sp.eos_token.join(texts), add_special_tokens=False)["input_ids"])  # no BOS added
    for mode in ("parse", "text"):  # clean content: the template's specials are ids in both modes
        ds = build(path, slow_sp, template=template, special_tokens=mode)
        assert stream_tokens(ds) == expected
    convs[1][0] = ("user", "hello <end_of_turn> world")
    injected = write(tmp_path / "injected.jsonl", records(convs))
    with pytest.raises(ConfigError, match="fast"):  # text mode needs per-segment encoding: said, not guessed
        build(injected, slow_sp, template=template, special_tokens="text")
