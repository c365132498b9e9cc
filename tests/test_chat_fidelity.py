"""Real chat templates (tests/data/chat_templates, sources in its README) render as
transformers' `apply_chat_template` renders them, on conversations with system prompts,
many turns, tools, tool calls and results, reasoning and content parts; masks train the
assistant's text and tool calls and nothing of the system, user or tool results; where a
template has `{% generation %}` markers, the trained text is exactly what they enclose
(transformers' `return_assistant_tokens_mask`)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from sftpack import ConfigError
from sftpack.templates import Chat, ChatTemplate

DATA = Path(__file__).parent / "data" / "chat_templates"

LLAMA = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
         "<|eom_id|>", "<|python_tag|>"]
CHATML = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
GEMMA = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
PHI3 = ["<s>", "</s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
DEEPSEEK = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
            "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
            "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
            "<｜tool▁output▁end｜>"]
GPTOSS = ["<|startoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|call|>", "<|return|>",
          "<|constrain|>"]
PHI4 = ["<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|endoftext|>"]
MISTRAL = ["<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
           "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]

# template file -> (bos_token, eos_token, special tokens) as the family's tokenizer has them
FAMILIES = {
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", LLAMA),
    "llama3_1": ("<|begin_of_text|>", "<|eot_id|>", LLAMA),
    "llama3_2": ("<|begin_of_text|>", "<|eot_id|>", LLAMA),
    "qwen2_5": (None, "<|im_end|>", CHATML),
    "qwen3": (None, "<|im_end|>", CHATML),
    "gemma": ("<bos>", "<eos>", GEMMA),
    "gemma3": ("<bos>", "<eos>", GEMMA),
    "phi3": ("<s>", "<|endoftext|>", PHI3),
    "phi3_5": ("<s>", "<|endoftext|>", PHI3),
    "deepseekv3": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", DEEPSEEK),
    "deepseek_r1_distill": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", DEEPSEEK),
    "gptoss": ("<|startoftext|>", "<|return|>", GPTOSS),
    "mistral_v3": ("<s>", "</s>", MISTRAL),
    "mistral_v7": ("<s>", "</s>", MISTRAL),
    "phi4": (None, "<|im_end|>", PHI4),
    "smollm3": (None, "<|im_end|>", CHATML),  # has {% generation %} markers of its own
    "smollm3_xml_tools": (None, "<|im_end|>", CHATML),
}
TRAINING = ["llama3_training", "qwen2_5_training", "qwen3_training", "gemma3_training", "phi3_training",
            "deepseekv3_training", "deepseek_r1_distill_training", "gptoss_training"]
for _name in TRAINING:
    FAMILIES[_name] = FAMILIES[_name.removesuffix("_training")]
TRAINING.append("smollm3")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city."}},
                   "required": ["city"]}}}


def call(city: str, id: str = "call12345") -> dict:
    return {"id": id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}


# Every content holds a word of its own (u1, a1, s1, t1, r1, ...), so the tests can tell where it lies.
CORPUS = {
    "system-multi-turn": Chat([
        {"role": "system", "content": "You are terse. s1word"},
        {"role": "user", "content": "What is the capital of France? u1word"},
        {"role": "assistant", "content": "Paris. a1word"},
        {"role": "user", "content": "  And of Italy?\n u2word "},
        {"role": "assistant", "content": "\nRome, since 1871 — «a2word» {{ not jinja }} \"quoted\"\n"},
    ]),
    "no-system": Chat([
        {"role": "user", "content": "Say hi u1word"},
        {"role": "assistant", "content": "Hi! a1word"},
    ]),
    "content-parts": Chat([
        {"role": "user", "content": [{"type": "text", "text": "Parts here u1word"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Parts back a1word"}]},
    ]),
    "tools": Chat([
        {"role": "system", "content": "Use tools. s1word"},
        {"role": "user", "content": "Weather in Paris? u1word"},
        {"role": "assistant", "tool_calls": [call("Paris t1word")]},
        {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "18 C and sunny o1word"},
        {"role": "assistant", "content": "It is 18 C and sunny. a2word"},
    ], tools=[WEATHER]),
    "reasoning-field": Chat([
        {"role": "user", "content": "2+2? u1word"},
        {"role": "assistant", "reasoning_content": "Two and two r1word.", "content": "4 a1word"},
        {"role": "user", "content": "3+3? u2word"},
        {"role": "assistant", "reasoning_content": "Three and three r2word.", "content": "6 a2word"},
    ]),
    # SmolLM3's system flags: /no_think makes the template write an empty think block into each
    # assistant turn (and strips the flag); /system_override replaces its whole system header
    "no-think-flag": Chat([
        {"role": "system", "content": "Be brief. /no_think s1word"},
        {"role": "user", "content": "Hi u1word"},
        {"role": "assistant", "content": "\nHello a1word"},
        {"role": "user", "content": "Bye u2word"},
        {"role": "assistant", "content": "Bye a2word"},
    ]),
    "system-override": Chat([
        {"role": "system", "content": "Only this. s1word /system_override"},
        {"role": "user", "content": "Hi u1word"},
        {"role": "assistant", "content": "Hello a1word"},
    ]),
    # an assistant turn with nothing but an empty think block (Qwen3's non-thinking output)
    "empty-think-turn": Chat([
        {"role": "user", "content": "Hi u1word"},
        {"role": "assistant", "content": "<think>\n\n</think>\n\n"},
        {"role": "user", "content": "Again u2word"},
        {"role": "assistant", "content": "Ok a2word"},
    ]),
    "reasoning-in-content": Chat([
        {"role": "user", "content": "2+2? u1word"},
        {"role": "assistant", "content": "<think>\nTwo and two r1word.\n</think>\n\n4 a1word"},
        {"role": "user", "content": "3+3? u2word"},
        {"role": "assistant", "content": "<think>\nThree and three r2word.\n</think>\n\n6 a2word"},
    ]),
}

ROLE_OF = {"s": "system", "u": "user", "a": "assistant", "t": "tool_call", "o": "tool", "r": "reasoning"}
WORD = re.compile(r"([suator])(\d)word")


@pytest.fixture(scope="module")
def oracle():
    """transformers' apply_chat_template with a given template and special tokens."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=backend)

    def render(name: str, chat: Chat, **kwargs):
        bos, eos, _ = FAMILIES[name]
        return hf.apply_chat_template(copy.deepcopy(chat.messages), tools=chat.tools, tokenize=False,
                                      chat_template=source(name), bos_token=bos, eos_token=eos, **kwargs)

    return render


def source(name: str) -> str:
    return (DATA / f"{name}.jinja").read_text(encoding="utf-8")


def template(name: str, **kwargs) -> ChatTemplate:
    bos, eos, specials = FAMILIES[name]
    return ChatTemplate(source(name), bos_token=bos, eos_token=eos, special_tokens=specials, **kwargs)


CASES = [(name, conv) for name in FAMILIES for conv in CORPUS]


@pytest.mark.parametrize("name, conv", CASES)
def test_renders_as_transformers_and_trains_the_assistant_only(oracle, name, conv):
    chat = CORPUS[conv]
    t = template(name)
    try:
        expected = oracle(name, chat)
    except Exception as exc:  # the template refuses the conversation: so must sftpack, saying why
        with pytest.raises(ConfigError, match="the chat template failed"):
            t.render_text(chat)
        assert str(exc)
        return
    assert t.render_text(chat) == expected
    doc = t.render(chat)
    head = t.bos_token if t.bos_token and expected.startswith(t.bos_token) else ""
    assert expected.startswith(head + doc.text)
    tail = expected[len(head + doc.text):]
    assert tail in ("", t.eos_token) or (not t.bos_token and tail.rstrip() == t.eos_token)
    last = chat.messages[-1]
    words = WORD.findall(str(last.get("content")))
    if tail.strip() and last["role"] == "assistant" and words and all(f"{a}{b}word" in doc.text for a, b in words):
        assert doc.train_eos  # the template's final end of turn is the delimiter EOS: trained
    trained = [False] * len(doc.text)
    for s, e in doc.trained:
        trained[s:e] = [True] * (e - s)
    seen = set()
    for m in WORD.finditer(doc.text):
        role = ROLE_OF[m.group(1)]
        seen.add(role)
        flags = set(trained[m.start():m.end()])
        if role in ("assistant", "tool_call", "reasoning"):
            assert flags == {True}, f"{m.group()} ({role}) not trained"
        else:
            assert flags == {False}, f"{m.group()} ({role}) trained"
    if "a1word" in doc.text:
        assert doc.trained


@pytest.mark.parametrize("name", TRAINING)
@pytest.mark.parametrize("conv", list(CORPUS))
def test_generation_markers_train_exactly_what_transformers_masks(oracle, name, conv):
    from transformers.utils.chat_template_utils import render_jinja_template

    chat = CORPUS[conv]
    bos, eos, _ = FAMILIES[name]

    def masks(messages):
        return render_jinja_template(
            conversations=[copy.deepcopy(messages)], tools=chat.tools, chat_template=source(name),
            return_assistant_tokens_mask=True, bos_token=bos, eos_token=eos)

    try:
        rendered, indices = masks(chat.messages)
    except Exception:
        # a template that renders string content only: sftpack joins text parts (documented), so
        # transformers given the joined strings is the oracle; a template refusing those too is refused
        joined = [{**m, "content": "".join(p["text"] for p in m["content"])} if isinstance(m.get("content"), list)
                  else m for m in chat.messages]
        try:
            rendered, indices = masks(joined)
        except Exception:
            with pytest.raises(ConfigError, match="the chat template failed"):
                template(name).render(chat)
            return
    t = template(name)
    doc = t.render(chat)
    head = len(bos) if bos and rendered[0].startswith(bos) else 0
    expected = [(s - head, min(e - head, len(doc.text))) for s, e in indices[0] if e > s]
    assert list(doc.trained) == [(s, e) for s, e in expected if e > s]


def test_qwen3_trains_the_last_turns_reasoning_and_drops_none(oracle):
    t = template("qwen3")
    chat = CORPUS["reasoning-in-content"]
    doc = t.render(chat)
    trained = "".join(doc.text[s:e] for s, e in doc.trained)
    # the template renders only the last turn's reasoning; earlier turns' answers are still trained
    assert "r1word" not in doc.text and "r2word" in trained and "a1word" in trained
    assert trained.endswith("6 a2word")  # the final <|im_end|> is the delimiter EOS, trained
    assert doc.train_eos


def test_reasoning_mask_and_rendered_only(oracle):
    chat = CORPUS["reasoning-in-content"]
    masked = template("qwen3", reasoning="mask").render(chat)
    trained = "".join(masked.text[s:e] for s, e in masked.trained)
    assert "r2word" not in trained and "<think>" not in trained and "6 a2word" in trained and "a1word" in trained
    rendered = template("qwen3", reasoning="rendered").render(chat)
    trained = "".join(rendered.text[s:e] for s, e in rendered.trained)
    assert "a1word" not in trained  # its reasoning was dropped by the template: not trained
    assert "r2word" in trained and "a2word" in trained


@pytest.mark.parametrize("key, value", [("weight", 0), ("train", False)])
@pytest.mark.parametrize("name", ["qwen2_5", "llama3_training"])
def test_weight_zero_or_train_false_leaves_a_turn_untrained(name, key, value):
    chat = copy.deepcopy(CORPUS["system-multi-turn"])
    chat.messages[2][key] = value
    doc = template(name).render(chat)
    trained = "".join(doc.text[s:e] for s, e in doc.trained)
    assert "a1word" not in trained and "a2word" in trained
    assert "a1word" in doc.text


def test_strftime_now_and_tojson_are_transformers(oracle):
    import datetime

    src = "{{ strftime_now('%Y-%m-%d') }}|{{ messages[0].content | tojson }}|{{ {'b': 1, 'a': [1]} | tojson(indent=2, sort_keys=True) }}"
    t = ChatTemplate(src, bos_token=None, eos_token=None)
    chat = Chat([{"role": "user", "content": "<a & 'b'> é"}, {"role": "assistant", "content": "x"}])
    text = t.render_text(chat)
    assert text.split("|")[0] == datetime.date.today().isoformat()
    assert text.split("|")[1] == '"<a & \'b\'> é"'  # not HTML-escaped, not ASCII-escaped
    assert text.split("|", 2)[2] == '{\n  "a": [\n    1\n  ],\n  "b": 1\n}'


def test_the_sandbox_is_immutable():
    t = ChatTemplate("{% set x = messages.append(1) %}{{ messages }}", bos_token=None, eos_token=None)
    with pytest.raises(ConfigError, match="the chat template failed"):
        t.render_text(Chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]))


def trained_pieces(t: ChatTemplate, chat: Chat) -> list[str]:
    """sftpack's trained text, piece by piece, with the delimiter EOS where it stands for the
    template's final end of turn."""
    doc = t.render(chat)
    pieces = [doc.text[s:e] for s, e in doc.trained]
    if doc.train_eos:
        if pieces and doc.trained[-1][1] == len(doc.text):
            pieces[-1] += t.eos_token
        else:
            pieces.append(t.eos_token)
    return pieces


def transformers_pieces(name: str, chat: Chat) -> list[str]:
    """The text `return_assistant_tokens_mask` trains, piece by piece, without the newline
    after an end-of-turn token (sftpack's documented difference: the newline is not the
    model's output)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    bos, eos, _ = FAMILIES[name]
    rendered, indices = render_jinja_template(
        conversations=[copy.deepcopy(chat.messages)], tools=chat.tools, chat_template=source(name),
        return_assistant_tokens_mask=True, bos_token=bos, eos_token=eos)
    return [rendered[0][s:e].removesuffix("\n") for s, e in indices[0] if e > s]


EMPTY_LAST = {
    "empty-think-last": Chat([{"role": "user", "content": "Hi u1word"},
                              {"role": "assistant", "content": "<think>\n\n</think>\n\n"}]),
    "empty-content-last": Chat([{"role": "user", "content": "Hi u1word"}, {"role": "assistant", "content": ""}]),
}


@pytest.mark.parametrize("base, training, conv", [
    ("qwen3", "qwen3_training", "empty-think-last"),
    ("qwen3", "qwen3_training", "empty-content-last"),
    ("gemma3", "gemma3_training", "empty-think-last"),
    ("gemma3", "gemma3_training", "empty-content-last"),
    ("gemma3", "gemma3_training", "empty-think-turn"),
])
def test_an_empty_or_reasoning_only_turn_trains_what_generation_masks_train(base, training, conv):
    """transformers' masks on TRL's *_training templates train such a turn: Qwen3's empty think
    block the template wrote and the end of turn. sftpack on the template without markers
    trains the same text (the model must learn to stop)."""
    chat = EMPTY_LAST.get(conv) or CORPUS[conv]
    expected = transformers_pieces(training, chat)
    assert expected and all(p.endswith(FAMILIES[base][1] if base == "qwen3" else "<end_of_turn>") for p in expected)
    assert trained_pieces(template(base), chat) == expected


@pytest.mark.parametrize("reasoning", ["train", "rendered"])
@pytest.mark.parametrize("name", [n for n in FAMILIES if n not in TRAINING])
def test_a_turn_whose_text_is_not_rendered_trains_its_end_of_turn(name, reasoning):
    """A turn with only an empty think block: whatever of it the template renders (the block,
    or nothing where it drops earlier reasoning) is trained through its end-of-turn token; it
    has no reasoning to drop, so reasoning='rendered' trains it too."""
    chat = CORPUS["empty-think-turn"]
    t = template(name, reasoning=reasoning)
    doc = t.render(chat)
    u1, u2 = doc.text.index("u1word"), doc.text.index("u2word")
    middle = [doc.text[max(s, u1):min(e, u2)] for s, e in doc.trained if s < u2 and e > u1]
    assert len(middle) == 1, middle
    specials = FAMILIES[name][2]
    assert any(middle[0].endswith(x) for x in specials), middle  # its end of turn
    assert not any(middle[0].startswith(x) for x in ("<|im_start|>", "<start_of_turn>", "<|start_header_id|>")), middle


TOOL_TURNS = Chat([
    {"role": "user", "content": "Weather in Paris and Rome? u1word"},
    {"role": "assistant", "tool_calls": [call("Paris t1word", "call12345")]},
    {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "18 C o1word"},
    {"role": "assistant", "tool_calls": [call("Rome t2word", "call67890")]},
    {"role": "tool", "tool_call_id": "call67890", "name": "get_weather", "content": "21 C o2word"},
    {"role": "assistant", "content": "Paris 18 C, Rome 21 C. a1word"},
], tools=[WEATHER])


@pytest.mark.parametrize("name", ["mistral_v3", "mistral_v7"])
def test_mistral_tool_calls_are_trained_from_the_tool_calls_token_and_results_are_not(oracle, name):
    """Mistral templates have no generation prompt: the assistant's output starts after "[/INST]"
    or "[/TOOL_RESULTS]", so its "[TOOL_CALLS]" token and the call JSON are trained, through
    the EOS that ends the call; the results are not."""
    t = template(name)
    assert t.render_text(TOOL_TURNS) == oracle(name, TOOL_TURNS)
    doc = t.render(TOOL_TURNS)
    pieces = [doc.text[s:e] for s, e in doc.trained]
    assert len(pieces) == 3, pieces
    for piece, word in zip(pieces[:2], ("t1word", "t2word")):
        assert piece.startswith("[TOOL_CALLS]") and piece.endswith("</s>") and word in piece
    assert pieces[2] == "Paris 18 C, Rome 21 C. a1word</s>"
    trained = "".join(pieces)
    assert "[TOOL_RESULTS]" not in trained and "[/TOOL_RESULTS]" not in trained and "o1word" not in trained
    assert "[INST]" not in trained and "[/INST]" not in trained


@pytest.mark.parametrize("name", ["smollm3", "smollm3_xml_tools"])
def test_smollm3_no_think_flag_trains_the_think_block_it_writes(oracle, name):
    chat = CORPUS["no-think-flag"]
    expected = oracle(name, chat)
    assert "Reasoning Mode: /no_think" in expected and "/no_think s1word" not in expected
    pieces = trained_pieces(template(name), chat)
    # (SmolLM3's own markers enclose the header and the newline after the end of turn too)
    answers = [p.split("<think>\n\n</think>\n")[-1].removesuffix("\n") for p in pieces]
    assert answers == ["Hello a1word<|im_end|>", "Bye a2word<|im_end|>"]
    assert all("<think>\n\n</think>\n" in p for p in pieces)


ARGS = [("smollm3", {"enable_thinking": False}), ("smollm3", {"enable_thinking": True}),
        ("smollm3_xml_tools", {"enable_thinking": False}), ("qwen3", {"enable_thinking": False}),
        ("smollm3_xml_tools", {"xml_tools": [{"type": "function", "function": {"name": "get_weather",
                                                                               "parameters": {}}}]})]


@pytest.mark.parametrize("name, args", ARGS)
@pytest.mark.parametrize("conv", ["system-multi-turn", "no-system", "tools", "reasoning-field"])
def test_template_args_render_as_apply_chat_template_kwargs(oracle, name, args, conv):
    """`template_args` are the `**kwargs` of apply_chat_template: variables of the template."""
    chat = CORPUS[conv]
    t = template(name, template_args=args)
    expected = oracle(name, chat, **args)
    assert t.render_text(chat) == expected
    doc = t.render(chat)
    assert doc.text in expected and doc.trained  # rendered, not only its text, and trained
    if name.startswith("smollm3") and "enable_thinking" in args and conv != "reasoning-field":
        # (the argument reaches the template: SmolLM3 writes its reasoning mode into the system prompt)
        assert ("/no_think" in expected) == (not args["enable_thinking"]), expected
        assert ("/no_think" in doc.text) == (not args["enable_thinking"])


@pytest.mark.parametrize("args, error", [
    ({"messages": []}, "passed by sftpack itself"),
    ({"bos_token": "<s>"}, "passed by sftpack itself"),
    ({"not a name": 1}, "not a variable name"),
    ({"x": object()}, "must be JSON"),
    ({"x": float("nan")}, "must be JSON"),
    (["enable_thinking"], "must be a mapping"),
])
def test_template_args_that_cannot_be_passed_are_refused(args, error):
    with pytest.raises(ConfigError, match=error):
        template("smollm3", template_args=args)


@pytest.mark.parametrize("a, b", [
    ({"x": {"b": 1, "a": 2}}, {"x": {"a": 2, "b": 1}}),  # nested key order: tojson (and transformers) keep it
    ({"x": (1, 2)}, {"x": [1, 2]}),  # a tuple renders "(1, 2)", a list "[1, 2]"
])
def test_template_args_that_render_differently_have_different_fingerprints(a, b):
    """The fingerprint keys the store: args equal under sort_keys JSON but rendered differently
    must not share one (else a store built with `a` is reused for `b`, with `a`'s text)."""
    src = "{% for m in messages %}{{ m.content }}{% endfor %}|{{ x }}|{{ x | tojson }}"
    ta, tb = (ChatTemplate(src, bos_token=None, eos_token=None, template_args=args) for args in (a, b))
    chat = CORPUS["no-system"]
    if ta.render_text(chat) != tb.render_text(chat):
        assert ta.fingerprint() != tb.fingerprint()


def test_a_template_arg_named_self_is_a_variable_not_a_python_clash(oracle):
    """Variables reach Jinja as a mapping: "self" (any identifier) is a variable like the
    others, not a clash with Template.render's own parameter at build time."""
    chat = CORPUS["no-system"]
    assert template("qwen3", template_args={"self": 1}).render_text(chat) == oracle("qwen3", chat)


def test_a_template_that_reads_the_clock_is_another_store_on_another_day(monkeypatch):
    """Llama 3.2 writes today's date (strftime_now): its fingerprint holds the date, so a
    store built yesterday is not reused for today's rendering; other templates' do not."""
    import datetime

    class Day(datetime.datetime):
        day_of = datetime.datetime(2026, 1, 1)

        @classmethod
        def now(cls, tz=None):
            return cls.day_of

    monkeypatch.setattr(datetime, "datetime", Day)
    fingerprints = {}
    for day in (datetime.datetime(2026, 1, 1), datetime.datetime(2026, 1, 2)):
        Day.day_of = day
        fingerprints[day.day] = (template("llama3_2").fingerprint(), template("qwen3").fingerprint())
    assert fingerprints[1][0] != fingerprints[2][0]  # reads the clock
    assert fingerprints[1][1] == fingerprints[2][1]  # does not
