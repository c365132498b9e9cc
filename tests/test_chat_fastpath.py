"""The chat fast path (a skeleton per conversation shape, filled with the record's text):
taken only where the template's syntax tree proves message text is output verbatim or
trimmed, and then byte-identical to rendering every record, down to the stores."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest

import sftpack.templates as templates
from sftpack import PackedSFTDataset
from sftpack.errors import ConfigError
from sftpack.templates import make_template
from sftpack.tokenize import encode_documents

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
SPECIALS = ["<s>", "</s>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<end_of_turn>", "<|end|>"]
# verbatim templates: text only output, concatenated, trimmed (also a concatenation trimmed)
OWN = (
    "{% for m in messages %}{{ ('[' + m.role + '] ' + m.content + ' ') | trim }}\n{% endfor %}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{% set c = m['content'] %}{{ ns.n ~ ':' ~ c ~ '|' }}{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}",
)
# templates that look at or change the text: refused (the general path renders them)
LOOKING = (
    "{% for m in messages %}{{ m.content | upper }}{% endfor %}",
    "{% for m in messages %}{{ m.content.upper() }}{% endfor %}",
    "{% for m in messages %}{% if m.content %}{{ m.content }}{% endif %}{% endfor %}",
    "{% for m in messages %}{% if '</think>' in m.content %}x{% endif %}{{ m.content }}{% endfor %}",
    "{% for m in messages %}{{ m.content | length }}{{ m.content }}{% endfor %}",
    "{% for m in messages %}{% set c = m.content %}{% if c == 'x' %}!{% endif %}{{ c }}{% endfor %}",
    "{% for m in messages %}{{ m.content | tojson }}{% endfor %}",
    "{% for m in messages %}{{ m | tojson }}{% endfor %}",
    "{{ messages }}",
    "{% for m in messages %}{{ m.content[:3] }}{% endfor %}",
    "{% for m in messages %}{{ m.content.split('x')[0] }}{% endfor %}",
    "{% for m in messages %}{{ loop.previtem | tojson }}{{ m.content }}{% endfor %}",
    "{% for m in messages %}{% set l = loop %}{{ l.nextitem }}{{ m.content }}{% endfor %}",
    "{% for m in messages %}{{ m.get('content') }}{% endfor %}",
    "{% for m in messages %}{{ (m.content ~ '') * 2 }}{% endfor %}",
    "{% for m in messages %}{{ '%s' % m.content }}{% endfor %}",
    "{% for m in messages %}{{ m.content if m.content else 'empty' }}{% endfor %}",
    "{% macro show(x) %}{{ x }}{% endmacro %}{% for m in messages %}{{ show(m.content) }}{% endfor %}",
    "{% for m in messages %}{% for ch in m.content %}{{ ch }}{% endfor %}{% endfor %}",
    "{{ strftime_now('%d') }}{% for m in messages %}{{ m.content }}{% endfor %}",
    "{% for m in messages|map(attribute='content') %}{{ m }}{% endfor %}",
    "{% for m in messages %}{% set ns = namespace(c=m.content) %}{{ ns.c }}{% endfor %}",
)
PIECES = [
    "hi",
    "the",
    "café",
    " ",
    "\n",
    "<think>",
    "</think>",
    "{{x}}",
    "\u29830\u2984",
    "'q'",
    '"d"',
    "\\",
    "日本",
    "<|eot_id|>",
    "\t",
]


def corpus(n: int, seed: int = 0) -> list[dict]:
    """Conversations with edge whitespace, blank and empty turns, think tags, specials,
    sentinel look-alikes, weights and tool-free extra keys."""
    rng = random.Random(seed)

    def text() -> str:
        body = "".join(rng.choice(PIECES) + rng.choice(["", " "]) for _ in range(rng.randint(0, 7)))
        return rng.choice(["", " ", "\n", "  \n"]) + body + rng.choice(["", " ", "\n\n"])

    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": text()}] if rng.random() < 0.4 else []
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": text()})
            messages.append({"role": "assistant", "content": text()})
            if rng.random() < 0.1:
                messages[-1]["weight"] = 0
        rows.append({"messages": messages})
    return rows


def rendered(template, rows) -> list:
    out = []
    for row in rows:
        try:
            doc = template.render([dict(m) for m in row["messages"]])
            out.append((doc.text, doc.trained, doc.content, doc.train_eos))
        except Exception as exc:  # the same error on both paths
            out.append(repr(exc))
    return out


def pair(source: str, **kwargs):
    kwargs = {"bos_token": "<s>", "eos_token": "</s>", "special_tokens": SPECIALS, **kwargs}
    fast = make_template(source, **kwargs)
    slow = make_template(source, **kwargs)
    slow._verbatim = False
    return fast, slow


VERBATIM = [
    (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    for name in ("llama3", "llama3_training", "gemma", "phi3", "phi3_training")
] + list(OWN)


@pytest.mark.parametrize("source", VERBATIM, ids=lambda s: str(hash(s))[-6:])
@pytest.mark.parametrize(
    "options",
    [{}, {"last_turn_only": True}, {"reasoning": "mask"}, {"reasoning": "rendered"}, {"bos_token": None}],
)
def test_fast_path_renders_what_every_record_rendered_gives(source, options):
    fast, slow = pair(source, **options)
    assert fast.fast_path
    rows = corpus(150)
    assert rendered(fast, rows) == rendered(slow, rows)
    assert fast._filled and not slow._filled  # the fast path was taken, and only there
    # most records came from their shape's plan (spans derived once per shape), with their pieces
    plans = [e.plan for e in fast._filled.values() if e is not None]
    assert any(isinstance(p, templates._Plan) for p in plans)
    docs = [fast.render([dict(m) for m in row["messages"]]) for row in rows[:40] if _renders(fast, row)]
    for doc in docs:
        if doc.plan is not None:  # the text is its shape's literals with the message text between
            literals, values = doc.plan.literals, doc.values[: doc.plan.cut]
            assert len(values) == len(literals) - 1
            assert "".join(x for pair in zip(literals, [*values, ""]) for x in pair) == doc.text


def _renders(template, row) -> bool:
    try:
        template.render([dict(m) for m in row["messages"]])
        return True
    except ConfigError:
        return False


@pytest.mark.parametrize("source", LOOKING)
def test_templates_that_look_at_the_text_are_not_fast_pathed(source):
    fast, _ = pair(source)
    assert not fast.fast_path
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " yes "}]
    try:
        doc = fast.render(chat)
    except ConfigError:
        return  # refused as before (the text cannot be located)
    assert doc.text == fast.render_text(chat) and not fast._filled


def test_a_template_that_transforms_the_text_is_still_correct():
    fast, slow = pair(
        "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}{{ m.content | upper }}"
        "{% endgeneration %}{% else %}{{ m.content | upper }}{% endif %}</s>{% endfor %}"
    )
    assert not fast.fast_path
    doc = fast.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}])
    assert doc.text == "<user>HI</s><assistant>YES</s>"
    assert [doc.text[a:b] for a, b in doc.trained] == ["YES"]


def test_fast_and_general_path_build_byte_identical_stores(tmp_path, monkeypatch):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in corpus(300, seed=1)), encoding="utf-8")
    stores = {}
    filled = []
    original = templates.ChatTemplate._render_filled

    def spy(self, chat):
        out = original(self, chat)
        filled.append(out is not None)
        return out

    monkeypatch.setattr(templates.ChatTemplate, "_render_filled", spy)
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(templates, "content_is_verbatim", lambda _ast: False)
        for train_on_prompt in (True, False):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = PackedSFTDataset(
                    "llama3",
                    path,
                    seq_length=64,
                    template="chat",
                    train_on_prompt=train_on_prompt,
                    cache_dir=tmp_path / f"cache{fast}{train_on_prompt}",
                )
            stores[fast, train_on_prompt] = {f.name: f.read_bytes() for f in sorted(Path(ds.path).glob("*.npy"))}
    assert sum(filled) > 200 and not any(filled[len(filled) // 2 :])  # the fast path, then never
    for train_on_prompt in (True, False):
        assert stores[True, train_on_prompt] == stores[False, train_on_prompt]
        assert len(stores[True, train_on_prompt]) >= 3  # tokens, masks, offsets compared
    masks = np.load(Path(ds.path) / "loss_mask.npy")
    assert 0 < masks.sum() < len(masks)  # the masked build trains some tokens and not others


class _PerDocument:
    """A tokenizer whose special tokens include one holding NUL: the per-document split route."""

    def __init__(self, tok) -> None:
        self._tok = tok
        self.special_tokens = {**tok.special_tokens, "\0never": 0}

    def __getattr__(self, name):
        return getattr(self._tok, name)


@pytest.mark.parametrize("train_on_prompt", [True, False])
def test_one_split_for_the_batch_equals_one_per_document(train_on_prompt):
    from sftpack.tokenize import encode_documents
    from sftpack.tokenizers import load_tokenizer

    tok = load_tokenizer("llama3")
    template = _bundled_chat(tok)
    docs = []
    for row in corpus(400, seed=2):
        try:
            docs.append(template.render(row["messages"]))
        except ConfigError:
            pass
    assert any("<|eot_id|>" in doc.text[s:e] for doc in docs for s, e in doc.content)  # injections too
    batched = encode_documents(tok, docs, train_on_prompt=train_on_prompt)
    alone = encode_documents(_PerDocument(tok), docs, train_on_prompt=train_on_prompt)
    assert batched.special_docs == alone.special_docs > 0
    for field in ("tokens", "mask", "unit_lengths"):
        assert np.array_equal(getattr(batched, field), getattr(alone, field))


def _encoded(tok, docs, train_on_prompt):
    from sftpack.tokenize import encode_documents

    return encode_documents(tok, docs, train_on_prompt=train_on_prompt)


def _without_pieces(docs):
    from sftpack.templates import Rendered

    return [Rendered(d.text, d.trained, d.content, d.train_eos) for d in docs]


def _bundled_chat(tok):
    """`tok`'s own chat template, as a build with template="chat" makes it."""
    from sftpack.build import schema_and_template
    from sftpack.config import BuildOptions

    return schema_and_template(BuildOptions(seq_length=1, template="chat"), tok)[1]


def _planned_taken(monkeypatch) -> list[bool]:
    """Whether each batch from here on took the route from plans (`_encode_planned`)."""
    import sftpack.tokenize as tokenize

    taken = []
    original = tokenize._encode_planned

    def spy(*args):
        out = original(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(tokenize, "_encode_planned", spy)
    return taken


STRADDLING = (  # literals that text beside them can complete into a special token
    "{% for m in messages %}<|eot{{ m.content }}_id|>{% endfor %}",
    "{% for m in messages %}[{{ m.content }}_id|><|start_header_id|>{{ m.role }}{% endfor %}",
    "{% for m in messages %}<|eot{{ m.content }}\n{% endfor %}",
    "{% for m in messages %}[{{ m.role }}{{ m.content }}eot_{{ m.content }}{% endfor %}",
)


@pytest.mark.parametrize("train_on_prompt", [True, False])
@pytest.mark.parametrize("source", ["llama3", *STRADDLING])
def test_documents_cut_from_their_literals_equal_the_split_of_their_text(source, train_on_prompt, monkeypatch):
    """The fast path's documents are cut into pieces from their shape's literals (the
    message text checked); the result must be the split of the text itself, also where a
    literal could form a special token with the text beside it (then the text is split)."""
    from sftpack.tokenizers import load_tokenizer

    tok = load_tokenizer("llama3")
    template = make_template(
        tok.chat_template if source == "llama3" else source,
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
        special_tokens=list(tok.special_tokens),
    )
    assert template.fast_path
    rng = random.Random(3)
    pieces = ["hi", " the", "café", "日本", "🚀", "\n", "<|", "|>", "eot", "_id", "|>x", "<|eot", "_id|>", " "]
    rows = [
        [
            {"role": "user", "content": "q" + "".join(rng.choices(pieces, k=rng.randint(0, 8)))},
            {"role": "assistant", "content": "a" + "".join(rng.choices(pieces, k=rng.randint(0, 8)))},
        ]
        for _ in range(300)
    ]
    docs = [template.render(r) for r in rows]
    assert sum(d.plan is not None for d in docs) > 250
    taken = _planned_taken(monkeypatch)
    for chunk in (docs[:100], docs[100:200], docs[200:]):
        clean = [d for d in chunk if not any(tok.special_pattern.search(v) for v in d.values or ["<|eot_id|>"])]
        assert clean
        for batch in (chunk, clean):
            via_literals = _encoded(tok, batch, train_on_prompt)
            via_split = _encoded(tok, _without_pieces(batch), train_on_prompt)
            for field in ("tokens", "mask", "unit_lengths"):
                assert np.array_equal(getattr(via_literals, field), getattr(via_split, field))
            assert via_literals.special_docs == via_split.special_docs
    # llama3's literals are safe: clean batches take the literals; straddling ones never do
    assert any(taken) == (source == "llama3")


# templates whose runs do not take the messages in order, or take one twice
REORDERING = (
    "{% for m in messages if m.role != 'system' %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content }}<|eot_id|>{% endfor %}{% for m in messages if m.role == 'system' %}"
    "<|start_header_id|>system<|end_header_id|>{{ m.content }}<|eot_id|>{% endfor %}",
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>{{ m.content }}<|eot_id|>"
    "{% if loop.last %}[{{ m.content }}]{% endif %}{% endfor %}",
)
PLANNED = [
    (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    for name in ("llama3", "llama3_training", "phi3", "phi3_training", "phi4", "gemma")
]
# literal text standing alone between special tokens (the same in every document: encoded
# once per shape): characters the tokenizers split into byte tokens (it stays a text piece),
# and trained spans that begin and end inside such text
KNOWN_TEXT = (
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
    "ünï 🦙🪿 ⿰ <|eot_id|>{% endfor %}",
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>{% if m.role == 'assistant' %}"
    "Reply n{% generation %}ow<|eot_id|>{{ m.content }}<|eot_id|>ok{% endgeneration %}ay then<|eot_id|>"
    "{% else %}{{ m.content }}<|eot_id|>{% endif %}{% endfor %}",
)
PLANNED += [*OWN, *REORDERING, *STRADDLING, *KNOWN_TEXT]


def plain_rows(n: int, seed: int, specials: bool = False) -> list[list[dict]]:
    """Plain conversations (role and non-blank string content): shapes of 1-3 exchanges,
    with or without a system prompt, edge whitespace, unicode; some text holding a special token."""
    rng = random.Random(seed)
    words = ["hi", "the", "café", "日本", "🚀", "x\ny", "{{x}}", "\u29830\u2984", "\t", "  "]
    if specials:
        words += ["<|eot_id|>", "<|end|>", "<s>"]

    def text() -> str:
        body = "w" + "".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(rng.randint(0, 6)))
        return rng.choice(["", "", " ", "\n"]) + body + rng.choice(["", "", " ", "\n\n"])

    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": text()}] if rng.random() < 0.4 else []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        rows.append(messages)
    return rows


@pytest.mark.parametrize("train_on_prompt", [True, False])
@pytest.mark.parametrize("tokenizer", ["llama3", "qwen3"])
@pytest.mark.parametrize("source", PLANNED, ids=lambda s: str(hash(s))[-6:])
def test_plain_conversations_encoded_from_their_plans_equal_their_rendered_documents(
    source, tokenizer, train_on_prompt, monkeypatch
):
    """A batch of plain conversations is encoded from its shapes' plans and message text,
    never rendered: the tokens, mask and units must be those of the rendered documents, for
    every shape in one batch, runs taken out of order or twice, the BOS / EOS cuts of
    tokenizers with and without BOS, and batches that must fall back (a special token in
    the text, literals a special token could straddle)."""
    from sftpack.templates import Planned
    from sftpack.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer)
    template = make_template(
        source, bos_token=tok.bos_token, eos_token=tok.eos_token, special_tokens=list(tok.special_tokens)
    )
    taken = _planned_taken(monkeypatch)
    for seed, specials in ((4, False), (5, True)):
        batch = Planned()
        for messages in plain_rows(200, seed, specials):
            found = template.plain(messages)
            if found is not None:
                batch.plans.append(found[0])
                batch.values.append(found[1])
                doc = template.render(messages)  # the plan gives what rendering the record gives
                again = found[0].apply(found[1])
                assert (again.text, again.trained, again.content, again.train_eos) == (
                    doc.text,
                    doc.trained,
                    doc.content,
                    doc.train_eos,
                )
        if not batch:
            continue
        planned = encode_documents(tok, batch, train_on_prompt=train_on_prompt)
        rendered = encode_documents(tok, _without_pieces(batch.rendered()), train_on_prompt=train_on_prompt)
        for field in ("tokens", "mask", "unit_lengths"):
            assert np.array_equal(getattr(planned, field), getattr(rendered, field))
        assert planned.special_docs == rendered.special_docs
    if tokenizer == "llama3" and source in (PLANNED[0], PLANNED[1], *REORDERING, *KNOWN_TEXT):
        assert taken[0] and not taken[1]  # clean text takes the plans; text holding a special falls back
    if source in STRADDLING:
        assert not any(taken)


def test_batches_of_plain_and_other_records_are_the_rendered_batches():
    """`_batches` hands plain conversations over unrendered; a batch switches to rendered
    documents at its first record that is not plain (tools, blank text, think tags, weights),
    and the batches and their documents are those of rendering every record."""
    from sftpack.build import _batches
    from sftpack.records import Record
    from sftpack.templates import Planned, Schema
    from sftpack.tokenizers import load_tokenizer

    tok = load_tokenizer("llama3")
    template = _bundled_chat(tok)
    rows = [{"messages": m} for m in plain_rows(3000, seed=6)]
    others = [
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>r</think>a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
    ]
    for at, row in zip((10, 1500, 2990, 2999), others):
        rows.insert(at, row)
    records = [Record(r, "x.jsonl", i + 1) for i, r in enumerate(rows)]

    def flat(planned):
        out = []
        for batch_records, docs, _ in _batches(records, Schema(), template, tok.special_pattern, planned=planned):
            kinds = isinstance(docs, Planned)
            docs = docs.rendered() if kinds else docs
            out.append((len(batch_records), kinds, [(d.text, d.trained, d.content, d.train_eos) for d in docs]))
        return out

    import sftpack.build as build

    original = build.BATCH_CHARS
    try:
        build.BATCH_CHARS = 20_000  # several batches
        planned, rendered = flat(True), flat(False)
    finally:
        build.BATCH_CHARS = original
    assert [(n, d) for n, _, d in planned] == [(n, d) for n, _, d in rendered]
    assert len(planned) > 4
    assert [k for _, k, _ in planned].count(True) >= len(planned) - 4  # only batches with another record rendered
    assert not any(k for _, k, _ in rendered)


# --------------------------------------------------------------------------- found by differential testing
# (each passes on 96ab2ec, the code before plain conversations were encoded from their plans)


@pytest.mark.parametrize("tokenizer", ["llama3", "qwen3"])
def test_a_batch_whose_text_pieces_are_all_empty_masks_like_any_other(tokenizer):
    """A document made of special tokens only (its text pieces all empty, so the tokenizer
    returns no ids at all): the mask from ids must not index the empty id array."""
    from sftpack.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer)
    special = "<|eot_id|>" if tokenizer == "llama3" else "<|im_end|>"
    template = make_template(
        "{% for m in messages %}{{ m.content }}{% endfor %}",
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
        special_tokens=list(tok.special_tokens),
    )
    doc = template.render([{"role": "user", "content": special}, {"role": "assistant", "content": special}])
    batch = encode_documents(tok, [doc], train_on_prompt=False)
    sid = tok.special_tokens[special]
    body = [i for i, t in enumerate(batch.tokens.tolist()) if t == sid]
    assert len(body) == 2
    assert batch.mask[body].tolist() == [0, 1]  # the user's special is prompt, the assistant's trained
