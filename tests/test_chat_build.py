"""Chat data as it really is, through whole builds: tool messages, tool calls, conversation
tools, content parts, ShareGPT function calls, reasoning, per-message weights; no doubled end
of turn without BOS; masks equal transformers' `return_assistant_tokens_mask`; errors name
file:line and the message; the Stanford Alpaca prompt."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import quicktok
from helpers import stored_units, stream, trained_runs

from sftpack import InputError, PackedSFTDataset
from sftpack.tokenizers import QuicktokTokenizer

DATA = Path(__file__).parent / "data"
TEMPLATES = DATA / "chat_templates"
QWEN3 = quicktok.get_encoding("qwen3")
LLAMA3 = quicktok.get_encoding("llama3")
IM_END = QWEN3.encode_single_token("<|im_end|>")
NEWLINE = QWEN3.encode_ordinary("\n")


def build(path, tokenizer="llama3", seq_length=16, **kwargs) -> PackedSFTDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PackedSFTDataset(tokenizer, path, seq_length=seq_length, **kwargs)


def qwen_like(name: str = "qwen2_5") -> QuicktokTokenizer:
    """Qwen as its Hugging Face tokenizer is set up: no BOS, EOS <|im_end|>, its chat template."""
    return QuicktokTokenizer("qwen3", bos_token=None, eos_token="<|im_end|>",
                             chat_template=(TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8"))


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TOOL_CHAT = {
    "tools": [WEATHER],
    "messages": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 C"},
        {"role": "assistant", "content": "It is 18 C."},
    ],
}


@pytest.mark.parametrize("train_on_prompt", [True, False])
def test_no_doubled_end_of_turn_without_bos(jsonl, train_on_prompt):
    rows = [TOOL_CHAT, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]
    ds = build(jsonl(rows * 2), qwen_like(), template="chat", train_on_prompt=train_on_prompt)
    for ids, mask in stored_units(ds, with_mask=True):
        assert ids[-1] == IM_END and ids[-2] != IM_END and ids[-1 - len(NEWLINE):-1] != NEWLINE
        assert QWEN3.decode(ids).endswith("<|im_end|>") and "<|im_end|>\n<|im_end|>" not in QWEN3.decode(ids)
        assert mask[-1] == 1  # the conversation ends with an assistant turn: its end of turn is trained
    ids, _ = stream(ds)
    text = QWEN3.decode(ids)
    assert "18 C.<|im_end|><|im_start|>system\nYou are Qwen" in text and "Hello!<|im_end|><|im_start|>system\nUse" in text
    if not train_on_prompt:
        runs = [QWEN3.decode(r) for r in trained_runs(*stored_units(ds, with_mask=True)[0])]
        assert runs == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                        "It is 18 C.<|im_end|>"]


def test_tool_calls_tools_and_content_parts_are_accepted_and_masked(jsonl):
    ds = build(jsonl([TOOL_CHAT] * 2), qwen_like(), template="chat", train_on_prompt=False)
    ids, mask = stored_units(ds, with_mask=True)[0]
    text = QWEN3.decode(ids)
    assert '"name": "get_weather"' in text and "<tool_response>\n18 C\n</tool_response>" in text
    untrained = QWEN3.decode([t for t, m in zip(ids, mask) if not m])
    for held_out in ("Use tools.", "Weather in Paris?", "18 C\n</tool_response>", "<tools>"):
        assert held_out in untrained


def test_sharegpt_function_call_and_observation_equal_openai_tool_messages(jsonl):
    sharegpt = {
        "tools": json.dumps([WEATHER]),  # LLaMA-Factory stores them as a JSON string
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
            {"from": "observation", "value": "18 C"},
            {"from": "gpt", "value": "It is 18 C."},
        ],
    }
    openai = {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 C"},
        {"role": "assistant", "content": "It is 18 C."},
    ]}
    a = build(jsonl([sharegpt] * 2, "a.jsonl"), qwen_like(), template="chat", train_on_prompt=False)
    b = build(jsonl([openai] * 2, "b.jsonl"), qwen_like(), template="chat", train_on_prompt=False)
    assert stream(a) == stream(b)
    assert "<tool_call>" in QWEN3.decode(stream(a)[0])


def test_llama31_ipython_tool_results_are_not_trained(jsonl):
    template = str(TEMPLATES / "llama3_1.jinja")
    row = {"messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "ipython", "content": "18 C"},
        {"role": "assistant", "content": "It is 18 C."},
    ], "tools": [WEATHER]}
    ds = build(jsonl([row] * 2), template=template, train_on_prompt=False)
    runs = [LLAMA3.decode(r) for r in trained_runs(*stored_units(ds, with_mask=True)[0])]
    assert runs == ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', "It is 18 C.<|eot_id|>"]


@pytest.mark.parametrize("train_on_prompt", [True, False])
def test_qwen3_think_content_is_accepted(jsonl, train_on_prompt):
    rows = [{"messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4"},
    ]}] * 2
    ds = build(jsonl(rows), qwen_like("qwen3"), template="chat", train_on_prompt=train_on_prompt)
    ids, mask = stored_units(ds, with_mask=True)[0]
    assert QWEN3.decode(ids) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nTwo and two.\n</think>\n\n4<|im_end|>"
    if not train_on_prompt:
        assert [QWEN3.decode(r) for r in trained_runs(ids, mask)] == ["<think>\nTwo and two.\n</think>\n\n4<|im_end|>"]


def test_masks_equal_transformers_assistant_masks(jsonl, hf_llama3):
    source = (TEMPLATES / "llama3_training.jinja").read_text(encoding="utf-8")
    convs = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
         {"role": "assistant", "content": " Hello!\n"}, {"role": "user", "content": "Bye"},
         {"role": "assistant", "content": "Bye, café 🚀."}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    ]
    ds = build(jsonl([{"messages": c} for c in convs]), hf_llama3, template=source, train_on_prompt=False)
    for (ids, mask), conv in zip(stored_units(ds, with_mask=True), convs):
        out = hf_llama3.apply_chat_template(conv, chat_template=source, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        assert ids[:-1] == out["input_ids"]  # the unit: the rendering (its BOS the delimiter) and EOS
        assert mask[:-1] == out["assistant_masks"]
        assert sum(mask) > 0


def test_per_message_weight_and_train_flag(jsonl):
    row = {"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "first", "weight": 0},
        {"role": "user", "content": "b"}, {"role": "assistant", "content": "second", "weight": 1},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "third", "train": False},
    ]}
    ds = build(jsonl([row] * 2), template="chat", train_on_prompt=False)
    runs = [LLAMA3.decode(r) for r in trained_runs(*stored_units(ds, with_mask=True)[0])]
    assert runs == ["second<|eot_id|>"]


@pytest.mark.parametrize(
    "bad, message",
    [
        pytest.param({"role": "assistant", "content": "x", "weight": 2}, r"messages\[1\]\.weight must be 0 or 1.*message 2",
                     id="weight"),
        pytest.param({"role": "assistant", "content": 5}, r"messages\[1\]\.content must be a string.*message 2",
                     id="content"),
        pytest.param({"role": "assistant", "content": [{"text": "x"}]}, r"messages\[1\]\.content\[0\].*message 2",
                     id="content-part"),
        pytest.param({"role": "assistant", "content": "x", "tool_calls": "f()"}, r"tool_calls must be a list.*message 2",
                     id="tool-calls"),
        pytest.param({"role": "assistant", "content": "x", "weight": True}, r"weight must be 0 or 1.*message 2",
                     id="weight-bool"),
        pytest.param({"role": "assistant", "content": [{"type": "text", "text": "see"}, {"type": "image", "url": "x"}]},
                     r"content\[1\] is a 'image' content part \(message 2\): sftpack packs text", id="image-part"),
    ],
)
def test_bad_messages_name_file_line_and_message(jsonl, bad, message):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    path = jsonl([good, {"messages": [{"role": "user", "content": "Hi"}, bad]}])
    with pytest.raises(InputError, match=rf"^{path}:2: .*{message}"):
        build(path, template="chat")


def test_template_errors_and_unfollowable_templates_name_file_line_and_what_to_do(jsonl):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    strict = "{% for m in messages %}{% if m.content == 'boom' %}{{ raise_exception('no boom') }}{% endif %}{{ m.content }}{% endfor %}"
    path = jsonl([good, good, {"messages": [{"role": "user", "content": "boom"}, {"role": "assistant", "content": "x"}]}])
    with pytest.raises(InputError, match=rf"^{path}:3: the chat template failed: no boom"):
        build(path, template=strict)
    # output that depends on the answer's value: the answer cannot be located; the message names it
    branching = "{% for m in messages %}{{ m.role }}: {% if m.content|length > 3 %}long{% else %}{{ m.content }}{% endif %}\n{% endfor %}"
    path = jsonl([good, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a long answer"}]}],
                 "b.jsonl")
    with pytest.raises(InputError, match=rf"^{path}:2: .*messages\[1\] \(message 2\).*generation"):
        build(path, template=branching, train_on_prompt=False)


def test_prompt_templates_refuse_tool_messages_naming_them(jsonl):
    path = jsonl([TOOL_CHAT])
    with pytest.raises(InputError, match=rf"^{path}:1: .*template='chat'"):
        build(path, template="Q: {prompt}\nA: {response}")


def test_stanford_alpaca_is_the_stanford_prompt(jsonl):
    stanford = json.loads((DATA / "stanford_alpaca_prompt.json").read_text(encoding="utf-8"))
    rows = [
        {"instruction": "Translate to French.", "input": "Good morning {x}", "output": "Bonjour"},
        {"instruction": "Say hi", "input": "", "output": "Hi!"},
        {"instruction": "Count to three", "output": "1 2 3"},
    ]
    ds = build(jsonl(rows), template="stanford_alpaca", train_on_prompt=False)
    for (ids, mask), row in zip(stored_units(ds, with_mask=True), rows):
        key = "prompt_input" if row.get("input", "") != "" else "prompt_no_input"
        source = stanford[key].format_map(row)  # as Stanford's train.py formats it
        assert ids == [128000, *LLAMA3.encode_ordinary(source + row["output"]), 128001]
        assert LLAMA3.decode([t for t, m in zip(ids, mask) if m]) == row["output"] + "<|end_of_text|>"
    assert "### Input:\nGood morning {x}\n\n### Response:Bonjour" in LLAMA3.decode(stream(ds)[0])


def test_the_default_alpaca_template_is_unchanged_by_stanford(jsonl):
    rows = [{"instruction": "Translate.", "input": "Good morning", "output": "Bonjour"}]
    ds = build(jsonl(rows * 2))
    assert "Translate.\n\nGood morning\n\n### Response:\nBonjour" in LLAMA3.decode(stream(ds)[0])
    assert np.asarray(ds.store.tokens).tolist()[0] == 128000


def test_reasoning_option_flows_through_the_build(jsonl):
    rows = [{"messages": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4"},
    ]}] * 2
    ds = build(jsonl(rows), qwen_like("qwen3"), template="chat", train_on_prompt=False, reasoning="mask")
    ids, mask = stored_units(ds, with_mask=True)[0]
    assert [QWEN3.decode(r) for r in trained_runs(ids, mask)] == ["4<|im_end|>"]
    assert ds.store.manifest["options"]["reasoning"] == "mask"


def test_records_of_one_shape_are_each_checked_against_their_own_rendering(jsonl):
    # the skeleton is cached per shape; a record whose text takes another branch of the
    # template is still located right (its own rendering is walked, not the skeleton trusted)
    template = ("{% for m in messages %}{{ m.role }}: {% if m.content == 'secret' %}[redacted]"
                "{% else %}{{ m.content }}{% endif %}<|eot_id|>{% endfor %}")
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in [("hello", "world"), ("secret", "answer"), ("hi", "there")]]
    ds = build(jsonl(rows), template=template, train_on_prompt=False)
    runs = [[LLAMA3.decode(r) for r in trained_runs(ids, mask)] for ids, mask in stored_units(ds, with_mask=True)]
    assert runs == [[" world<|eot_id|>"], [" answer<|eot_id|>"], [" there<|eot_id|>"]]  # " world": one token
    assert "[redacted]" in LLAMA3.decode(stored_units(ds)[1])


def test_an_empty_think_turn_trains_its_block_and_end_of_turn(jsonl):
    """Qwen3's non-thinking output (an empty think block, no text) still trains what the
    template wrote for it and its <|im_end|>, as the generation masks of qwen3_training do."""
    rows = [{"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\n\n</think>\n\n"},
    ]}] * 2
    ds = build(jsonl(rows), qwen_like("qwen3"), template="chat", train_on_prompt=False)
    ids, mask = stored_units(ds, with_mask=True)[0]
    assert [QWEN3.decode(r) for r in trained_runs(ids, mask)] == ["<think>\n\n</think>\n\n<|im_end|>"]


def test_a_template_that_refuses_tool_calls_names_file_line(jsonl):
    """Phi-4's template reads every message's content: transformers fails on a tool call
    without content, and so does the build, naming the record."""
    phi4 = QuicktokTokenizer("qwen3", bos_token=None, eos_token="<|im_end|>",
                             chat_template=(TEMPLATES / "phi4.jinja").read_text(encoding="utf-8"))
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    path = jsonl([good, TOOL_CHAT])
    with pytest.raises(InputError, match=rf"^{path}:2: the chat template failed: .*content"):
        build(path, phi4, template="chat")


def test_template_args_reach_the_template_and_the_fingerprint(jsonl, tmp_path, capsys):
    """--template-arg / template_args: SmolLM3's enable_thinking=false writes "/no_think"
    into every document; it is recorded in the manifest, and a store built without it (or
    with another value) is another store, never reused for it."""
    from sftpack.cli import main

    path = jsonl([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}] * 3)
    smollm3 = str(TEMPLATES / "smollm3.jinja")
    tok = QuicktokTokenizer("qwen3", bos_token=None, eos_token="<|im_end|>")

    def text(ds) -> str:
        return QWEN3.decode(stream(ds)[0])

    plain = build(path, tok, 64, template=smollm3, cache_dir=tmp_path / "c")
    off = build(path, tok, 64, template=smollm3, template_args={"enable_thinking": False}, cache_dir=tmp_path / "c")
    on = build(path, tok, 64, template=smollm3, template_args={"enable_thinking": True}, cache_dir=tmp_path / "c")
    assert "/no_think" in text(off) and "/no_think" not in text(plain) and "/think" in text(plain)
    assert text(on) == text(plain)  # the template's default
    assert len({plain.path, off.path, on.path}) == 3  # three fingerprints: none reused for another
    manifest = json.loads((Path(off.path) / "manifest.json").read_text())
    assert manifest["options"]["template_args"] == {"enable_thinking": False}
    assert "template_args" not in json.loads((Path(plain.path) / "manifest.json").read_text())["options"]

    out = tmp_path / "cli"
    assert main(["build", str(path), "--out", str(out), "--template", smollm3, "--tokenizer", "qwen3",
                 "--seq-length", "64", "--template-arg", "enable_thinking=false", "--quiet"]) == 0
    assert json.loads((out / "manifest.json").read_text())["options"]["template_args"] == {"enable_thinking": False}
    assert main(["build", str(path), "--out", str(tmp_path / "bad"), "--template-arg", "x=1", "--seq-length",
                 "64", "--quiet"]) == 1
    assert "variables of a Jinja chat template" in capsys.readouterr().err
    assert main(["build", str(path), "--out", str(tmp_path / "bad"), "--template", smollm3, "--tokenizer",
                 "qwen3", "--template-arg", "enable_thinking", "--seq-length", "64", "--quiet"]) == 1
    assert "NAME=VALUE" in capsys.readouterr().err


def _warned(path, tok, **kwargs) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PackedSFTDataset(tok, path, seq_length=16, **kwargs)
    return [str(w.message) for w in caught if "chat template" in str(w.message)]


REASONED = {"messages": [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "reasoning_content": "Two and two.", "content": "4"},
    {"role": "user", "content": "3+3?"},
    {"role": "assistant", "reasoning_content": "Three and three.", "content": "6"},
]}


def test_a_template_that_drops_tool_calls_or_all_reasoning_is_warned_of(jsonl):
    """Data the template does not render is not trained: a build says so (tool calls the
    bundled Llama-3 template drops, reasoning no turn of which is rendered), and stays quiet
    where the template renders them (Llama 3.1 tool calls; Qwen3 renders the last turn's
    reasoning) or reasoning is not trained anyway."""
    tools, reasoned = jsonl([TOOL_CHAT] * 3, "tools.jsonl"), jsonl([REASONED] * 3, "reasoned.jsonl")
    dropped = _warned(tools, "llama3", template="chat")
    assert len(dropped) == 1 and "tool calls of 3 of 3 assistant messages" in dropped[0], dropped
    llama31 = str(TEMPLATES / "llama3_1.jinja")
    assert _warned(tools, "llama3", template=llama31) == []
    dropped = _warned(reasoned, "llama3", template="chat")
    assert len(dropped) == 1 and "reasoning of none of the 6 assistant messages" in dropped[0], dropped
    assert _warned(reasoned, "llama3", template="chat", reasoning="mask") == []
    assert _warned(reasoned, qwen_like("qwen3"), template="chat") == []
    think = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>r</think>a"}]}
    think = jsonl([think] * 2, "think.jsonl")  # reasoning in the content: Llama 3 writes it as it is
    assert _warned(think, "llama3", template="chat") == []
    assert _warned(think, qwen_like("qwen3"), template="chat") == []
    r1 = str(TEMPLATES / "deepseek_r1_distill.jinja")  # cuts every answer's reasoning
    assert "reasoning of none of the 2" in _warned(think, "llama3", template=r1)[0]


def test_a_store_is_not_reused_for_template_args_that_render_differently(jsonl, tmp_path):
    """Nested key order is kept by tojson (as transformers' is): xml_tools with the keys in
    another order render another text, so the store built first must not be reused for it."""
    from sftpack.templates import ChatTemplate

    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    path = jsonl([row])
    src = ("{{ bos_token }}{{ tools_json | tojson }}{% for m in messages %}<|start_header_id|>{{ m.role }}"
           "<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{% endfor %}")
    first, second = {"tools_json": [{"name": "f", "type": "x"}]}, {"tools_json": [{"type": "x", "name": "f"}]}
    build(path, "llama3", 8, template=src, template_args=first, cache_dir=tmp_path / "c")
    ds = build(path, "llama3", 8, template=src, template_args=second, cache_dir=tmp_path / "c")
    expected = ChatTemplate(src, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                            template_args=second).render_text(row["messages"])
    assert LLAMA3.decode(stored_units(ds)[0]).startswith(expected)


def test_cli_template_arg_that_json_reads_as_nan_is_text(jsonl, tmp_path, capsys):
    """--template-arg NAME=VALUE: "the value as JSON where it parses, else as text"; NaN and
    Infinity are not JSON (json.loads takes them as floats the options then refuse)."""
    from sftpack.cli import main

    path = jsonl([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}])
    out = tmp_path / "o"
    rc = main(["build", str(path), "--out", str(out), "--template", str(TEMPLATES / "smollm3.jinja"),
               "--tokenizer", "qwen3", "--seq-length", "64", "--template-arg", "x=NaN", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["options"]["template_args"] == {"x": "NaN"}


def test_the_unrendered_check_is_bounded_in_one_long_record(jsonl, monkeypatch):
    """The check stops after 64 messages with tool calls or reasoning, but inside one record
    it renders the whole conversation once per such message: an agentic trajectory of n tool
    calls costs n + 1 renders of n turns (1,000 calls: 25 s here, 255 renders' time)."""
    from sftpack import build as build_mod
    from sftpack.records import RecordReader
    from sftpack.templates import ChatTemplate, Schema

    messages = []
    for i in range(200):
        messages += [{"role": "user", "content": f"q{i}"},
                     {"role": "assistant", "content": None, "tool_calls": [
                         {"type": "function", "function": {"name": "f", "arguments": {"a": i}}}]},
                     {"role": "tool", "content": "r"}, {"role": "assistant", "content": f"a{i}"}]
    path = jsonl([{"messages": messages}])
    template = ChatTemplate((TEMPLATES / "qwen2_5.jinja").read_text(encoding="utf-8"), bos_token=None,
                            eos_token="<|im_end|>")
    renders = []
    real = ChatTemplate.render_text
    monkeypatch.setattr(ChatTemplate, "render_text", lambda self, turns: renders.append(1) or real(self, turns))
    assert build_mod._unrendered(RecordReader([Path(path)]), Schema("auto", {}), template) == []
    assert len(renders) <= 65, len(renders)


def test_a_template_arg_holding_the_fast_paths_markers_is_rendered_as_it_is(jsonl):
    """The fast path renders a skeleton with marker strings for the messages' text and fills
    them in; it is ruled out where the template, BOS or EOS hold a marker, but not where a
    template arg does: the arg's "⦃0⦄" was filled with the user's text (a silently wrong store).
    (A build without the fast path refuses such an arg as a template that cannot be masked.)"""
    from sftpack.templates import ChatTemplate

    src = ("{{ bos_token }}{% if greet %}<|start_header_id|>system<|end_header_id|>\n\n{{ greet }}<|eot_id|>"
           "{% endif %}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
           "{{ m.content | trim }}<|eot_id|>{% endfor %}")
    args = {"greet": "\u29830\u2984 \u29831\u2984"}
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    try:
        ds = build(jsonl([row] * 2), "llama3", 8, template=src, template_args=args)
    except InputError as exc:
        assert "differently depending on its text" in str(exc)
        return
    expected = ChatTemplate(src, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                            template_args=args).render_text(row["messages"])
    assert LLAMA3.decode(stored_units(ds)[0]) == expected + "<|end_of_text|>"
