"""Schemas (record -> turns) and templates (turns -> text): what ends up in the token stream."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import quicktok
from helpers import stream_mask, stream_tokens, trained_runs

import sftpack
from sftpack import ConfigError, InputError, PackedSFTDataset, SFTPackError
from sftpack.cli import main

LLAMA3 = quicktok.get_encoding("llama3")
QWEN3 = quicktok.get_encoding("qwen3")
BOS = 128000
EOS = 128001
QWEN_EOS = QWEN3.encode_single_token("<|endoftext|>")

# The Alpaca prompt, written out here (not imported) so that any change to the bundled one shows.
ALPACA_HEAD = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n"
    "\n"
    "### Instruction:\n"
)
ALPACA_MID = "\n\n### Response:\n"


def alpaca(prompt: str, response: str) -> str:
    return ALPACA_HEAD + prompt + ALPACA_MID + response


def llama3_chat(turns: list[tuple[str, str]]) -> str:
    """Meta's Llama-3 chat format, without the leading BOS (the packer adds it)."""
    return "".join(f"<|start_header_id|>{role}<|end_header_id|>\n\n{text.strip()}<|eot_id|>" for role, text in turns)


def llama_ids(text: str) -> list[int]:
    return LLAMA3.encode(text, allowed_special="all")


def qwen_ids(text: str) -> list[int]:
    return QWEN3.encode(text, allowed_special="all")


def llama_stream(texts: list[str]) -> list[int]:
    """The reference stream `BOS d1 EOS BOS d2 ... EOS BOS dN` for rendered documents."""
    out: list[int] = []
    for text in texts:
        out += [BOS, *llama_ids(text), EOS]
    return out[:-1]


def qwen_stream(texts: list[str]) -> list[int]:
    out: list[int] = []
    for text in texts:
        out += [*qwen_ids(text), QWEN_EOS]
    return out[:-1]


def tokens(ds: PackedSFTDataset) -> list[int]:
    """The stream the plan reads (`BOS d1 EOS ... BOS dN`)."""
    return stream_tokens(ds)


def build(path, tokenizer="llama3", seq_length=4, **kwargs) -> PackedSFTDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PackedSFTDataset(tokenizer, path, seq_length=seq_length, **kwargs)


def messages(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": text} for role, text in turns]}


PAIRS = [("What is 2+2?", "4"), ("Name a colour.", "Blue, like the sky."), ("Say hi", "Hi!")]


# --------------------------------------------------------------------------- schemas


def test_auto_detects_prompt_response(jsonl):
    ds = build(jsonl([{"prompt": p, "response": r} for p, r in PAIRS]))
    assert tokens(ds) == llama_stream([alpaca(p, r) for p, r in PAIRS])
    assert ds.store.doc_offsets.tolist()[0] == 0 and len(ds.store.doc_offsets) == len(PAIRS) + 1
    assert ds.summary.documents == len(PAIRS)


def test_auto_detects_alpaca_and_appends_a_non_empty_input(jsonl):
    rows = [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Say hi", "input": "", "output": "Hi!"},
        {"instruction": "Count to three", "output": "1 2 3"},
    ]
    ds = build(jsonl(rows))
    expected = [
        alpaca("Translate to French.\n\nGood morning", "Bonjour"),
        alpaca("Say hi", "Hi!"),
        alpaca("Count to three", "1 2 3"),
    ]
    assert tokens(ds) == llama_stream(expected)


def test_alpaca_input_of_the_wrong_type_is_an_input_error(jsonl):
    path = jsonl([{"instruction": "a", "output": "b"}, {"instruction": "a", "input": 3, "output": "b"}])
    with pytest.raises(InputError, match=rf"{path}:2: .*'input'"):
        build(path)


def test_auto_detects_openai_messages_multi_turn(jsonl):
    convs = [
        [("system", "You are terse."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Bye"), ("assistant", "Bye.")],
        [("user", "2+2?"), ("assistant", "4")],
    ]
    ds = build(jsonl([messages(*c) for c in convs]), template="chat")
    assert tokens(ds) == llama_stream([llama3_chat(c) for c in convs])


def test_auto_detects_sharegpt_conversations(jsonl):
    conv = [("system", "Be brief."), ("human", "Hi"), ("gpt", "Hello."), ("human", "Bye"), ("gpt", "Bye.")]
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    rows = [{"conversations": [{"from": f, "value": v} for f, v in conv]}] * 2
    ds = build(jsonl(rows), template="chat")
    rendered = llama3_chat([(roles[f], v) for f, v in conv])
    assert tokens(ds) == llama_stream([rendered, rendered])


def test_sharegpt_equals_the_same_conversation_as_messages(jsonl):
    sharegpt = [{"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": r}]} for p, r in PAIRS]
    openai = [messages(("user", p), ("assistant", r)) for p, r in PAIRS]
    a = build(jsonl(sharegpt, "a.jsonl"), template="chat", train_on_prompt=False)
    b = build(jsonl(openai, "b.jsonl"), template="chat", train_on_prompt=False)
    assert tokens(a) == tokens(b)
    assert np.array_equal(np.asarray(a.store.loss_mask), np.asarray(b.store.loss_mask))
    assert stream_mask(a) == stream_mask(b)


def test_explicit_schema_overrides_auto_detection(jsonl):
    # Both shapes in one record: "auto" prefers messages, schema="prompt_response" reads prompt/response.
    row = {**messages(("user", "from messages"), ("assistant", "M")), "prompt": "from prompt", "response": "P"}
    path = jsonl([row, row])
    auto = build(path, template="chat")
    explicit = build(path, schema="prompt_response")
    assert tokens(auto) == llama_stream([llama3_chat([("user", "from messages"), ("assistant", "M")])] * 2)
    assert tokens(explicit) == llama_stream([alpaca("from prompt", "P")] * 2)


def test_explicit_schema_missing_its_field_is_an_input_error(jsonl):
    path = jsonl([{"prompt": "p", "response": "r"}])
    with pytest.raises(InputError, match=rf"{path}:1: .*'messages' is missing"):
        build(path, schema="messages", template="chat")


def test_files_of_two_schemas_name_the_schema_the_record_has(jsonl):
    chat = jsonl([messages(("user", "q"), ("assistant", "a"))], "chat.jsonl")
    share = jsonl([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}], "share.jsonl")
    with pytest.raises(InputError, match=rf"^{share}:1: field 'messages' is missing: this record is sharegpt data, "
                       "but the messages schema detected on the first record applies to every input"):
        build([chat, share], template="chat")
    broken = jsonl([messages(("user", "q"), ("assistant", "a")), {"question": "p"}], "broken.jsonl")
    with pytest.raises(InputError, match=rf"^{broken}:2: field 'messages' is missing$"):  # no schema of its own
        build(broken, template="chat")


def test_unknown_schema_is_a_config_error(jsonl):
    with pytest.raises(ConfigError, match="schema"):
        build(jsonl([{"prompt": "p", "response": "r"}]), schema="csv")


def test_undetectable_record_is_an_input_error(jsonl):
    path = jsonl([{"question": "q", "answer": "a"}])
    with pytest.raises(InputError, match=rf"{path}:1: cannot detect the schema"):
        build(path)


def test_field_remapping_in_the_api(jsonl):
    rows = [{"question": p, "answer": r, "prompt": "decoy", "response": "decoy"} for p, r in PAIRS]
    ds = build(jsonl(rows), fields={"prompt": "question", "response": "answer"})
    assert tokens(ds) == llama_stream([alpaca(p, r) for p, r in PAIRS])


def test_field_remapping_of_messages_keys(jsonl):
    rows = [{"chat": [{"speaker": "user", "text": "Hi"}, {"speaker": "assistant", "text": "Hello."}]}] * 2
    ds = build(jsonl(rows), template="chat", fields={"messages": "chat", "role": "speaker", "content": "text"})
    assert tokens(ds) == llama_stream([llama3_chat([("user", "Hi"), ("assistant", "Hello.")])] * 2)


def test_unknown_field_name_is_a_config_error(jsonl):
    with pytest.raises(ConfigError, match="question"):
        build(jsonl([{"prompt": "p", "response": "r"}]), fields={"question": "prompt"})


def test_field_remapping_via_the_cli(jsonl, tmp_path, capsys):
    rows = [{"question": p, "answer": r} for p, r in PAIRS]
    out = tmp_path / "store"
    code = main(["build", str(jsonl(rows)), "--out", str(out), "--seq-length", "4", "--quiet",
                 "--field", "prompt=question", "--field", "response=answer"])
    assert code == 0
    reopened = sftpack.open_packed(out)
    assert stream_tokens(reopened) == llama_stream([alpaca(p, r) for p, r in PAIRS])
    assert reopened.store.manifest["options"]["fields"] == {"prompt": "question", "response": "answer"}


def test_malformed_cli_field_is_exit_code_1(jsonl, tmp_path, capsys):
    code = main(["build", str(jsonl([{"prompt": "p", "response": "r"}])), "--out", str(tmp_path / "s"),
                 "--seq-length", "4", "--field", "prompt"])
    assert code == 1
    assert "--field" in capsys.readouterr().err


BAD_RECORDS = [
    pytest.param(messages(("user", "Hi"), ("bot", "Hello")), r"messages\[1\]\.role is 'bot'", id="invalid-role"),
    pytest.param({"messages": []}, "empty conversation", id="empty-conversation"),
    pytest.param({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
                 r"messages\[0\]\.content must be a string, got int", id="content-not-a-string"),
    pytest.param({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]},
                 r"messages\[0\]\.content must be a string, got null", id="content-null"),
    pytest.param({"messages": "Hi"}, "'messages' must be a list", id="messages-not-a-list"),
    pytest.param({"messages": {"role": "user", "content": "Hi"}}, "'messages' must be a list", id="messages-a-dict"),
    pytest.param({"messages": ["Hi"]}, r"messages\[0\] must be an object", id="turn-not-an-object"),
    pytest.param(messages(("user", "Hi")), "no assistant turn", id="no-assistant-turn"),
]


@pytest.mark.parametrize("bad, message", BAD_RECORDS)
def test_bad_messages_record_is_an_input_error_with_file_and_line(jsonl, bad, message):
    good = messages(("user", "Hi"), ("assistant", "Hello."))
    path = jsonl([good, good, bad, good])
    with pytest.raises(InputError, match=rf"^{path}:3: .*{message}") as info:
        build(path, template="chat")
    assert info.value.line == 3 and info.value.source == str(path)


@pytest.mark.parametrize(
    "bad, message",
    [
        pytest.param({"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "x"}]},
                     r"conversations\[1\]\.from is 'robot'", id="invalid-role"),
        pytest.param({"conversations": []}, "empty conversation", id="empty"),
        pytest.param({"conversations": [{"from": "human", "value": ["Hi"]}, {"from": "gpt", "value": "x"}]},
                     r"conversations\[0\]\.value must be a string, got list", id="value-not-a-string"),
        pytest.param({"conversations": "Hi"}, "'conversations' must be a list", id="not-a-list"),
    ],
)
def test_bad_sharegpt_record_is_an_input_error_with_file_and_line(jsonl, bad, message):
    good = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
    path = jsonl([good, bad])
    with pytest.raises(InputError, match=rf"^{path}:2: .*{message}"):
        build(path, template="chat")


@pytest.mark.parametrize(
    "bad, message",
    [
        pytest.param({"prompt": 3, "response": "r"}, "'prompt' must be a string, got int", id="prompt-int"),
        pytest.param({"prompt": "p", "response": ["r"]}, "'response' must be a string, got list", id="response-list"),
        pytest.param({"prompt": "p"}, "'response' is missing", id="response-missing"),
    ],
)
def test_bad_prompt_response_record_is_an_input_error_with_file_and_line(jsonl, bad, message):
    path = jsonl([{"prompt": "p", "response": "r"}, bad])
    with pytest.raises(InputError, match=rf"^{path}:2: .*{message}"):
        build(path)


def test_input_errors_are_reported_by_the_cli_with_file_and_line(jsonl, tmp_path, capsys):
    path = jsonl([messages(("user", "Hi"), ("assistant", "Hello.")), {"messages": []}])
    code = main(["build", str(path), "--out", str(tmp_path / "s"), "--seq-length", "4", "--template", "chat"])
    assert code == 1
    assert f"{path}:2:" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_system_turn_with_a_template_lacking_a_system_slot_is_an_input_error(jsonl):
    path = jsonl([messages(("system", "S"), ("user", "Hi"), ("assistant", "Hello."))])
    with pytest.raises(InputError, match=rf"{path}:1: .*system"):
        build(path)  # the Alpaca template has no {system}


# --------------------------------------------------------------------------- prompt templates


def test_alpaca_default_output_is_unchanged(jsonl):
    rows = [{"instruction": "Give a synonym of big.", "output": "Large."}, {"instruction": "x", "output": "y"}]
    ds = build(jsonl(rows))
    text = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nGive a synonym of big.\n\n### Response:\nLarge."
    )
    first = [BOS, *LLAMA3.encode(text), EOS]
    assert tokens(ds)[: len(first)] == first
    assert ds.view.plan.offsets.tolist() == [0, len(first), len(tokens(ds))]
    # stored units keep every EOS, the last document's included
    assert ds.store.doc_offsets.tolist() == [0, len(first), len(tokens(ds)) + 1]
    assert ds.store.tokens.tolist() == tokens(ds) + [EOS]
    assert tokens(build(jsonl(rows, "b.jsonl"), template="alpaca")) == tokens(ds)


def test_custom_template_string(jsonl):
    template = "### Q\n{prompt}\n### A\n{response}"
    ds = build(jsonl([{"prompt": p, "response": r} for p, r in PAIRS]), template=template)
    assert tokens(ds) == llama_stream([f"### Q\n{p}\n### A\n{r}" for p, r in PAIRS])


def test_custom_template_accepts_the_instruction_placeholder(jsonl):
    ds = build(jsonl([{"instruction": p, "output": r} for p, r in PAIRS]), template="I: {instruction} O: {response}")
    assert tokens(ds) == llama_stream([f"I: {p} O: {r}" for p, r in PAIRS])


def test_custom_template_from_a_file(jsonl, tmp_path):
    template = "<question>\n{prompt}\n</question>\n{response}"
    file = tmp_path / "my.prompt"
    file.write_text(template, encoding="utf-8")
    rows = [{"prompt": p, "response": r} for p, r in PAIRS]
    from_file = build(jsonl(rows), template=str(file))
    from_string = build(jsonl(rows, "b.jsonl"), template=template)
    assert tokens(from_file) == llama_stream([f"<question>\n{p}\n</question>\n{r}" for p, r in PAIRS])
    assert tokens(from_file) == tokens(from_string)


def test_template_without_placeholders_is_a_config_error(jsonl, tmp_path):
    path = jsonl([{"prompt": "p", "response": "r"}])
    with pytest.raises(ConfigError):
        build(path, template="{prompt} only")
    with pytest.raises(ConfigError):
        build(path, template=str(tmp_path / "no-such-template.txt"))


def test_literal_braces_in_a_template_are_kept(jsonl):
    ds = build(jsonl([{"prompt": "p", "response": "r"}] * 2), template='{"q": "{prompt}", "a": {response}} {0} {}')
    assert tokens(ds) == llama_stream(['{"q": "p", "a": r} {0} {}'] * 2)


@pytest.mark.parametrize("template", ["alpaca", "Q: {prompt}\nA: {response}"])
def test_braces_in_content_come_out_verbatim(jsonl, template):
    prompt = "Fill in {response} and {prompt}, also {0} and {instruction} and {{x}} and {"
    response = "Here: {response} {0} {} }{ {{prompt}}"
    ds = build(jsonl([{"prompt": prompt, "response": response}] * 2), template=template)
    render = alpaca if template == "alpaca" else (lambda p, r: f"Q: {p}\nA: {r}")
    assert tokens(ds) == llama_stream([render(prompt, response)] * 2)
    doc = np.asarray(ds.store.tokens[1 : ds.store.doc_offsets[1] - 1]).tolist()
    assert LLAMA3.decode(doc) == render(prompt, response)


def test_braces_in_chat_content_come_out_verbatim(jsonl):
    conv = [("user", "{{ messages }} {% raw %} {response}"), ("assistant", "{0} {{ bos_token }} {%- endfor %}")]
    ds = build(jsonl([messages(*conv)] * 2), template="chat")
    assert tokens(ds) == llama_stream([llama3_chat(conv)] * 2)


# --------------------------------------------------------------------------- chat templates


def test_chat_template_renders_the_llama3_format(jsonl):
    conv = [("system", "You are helpful."), ("user", "What is the capital of France?"),
            ("assistant", "Paris."), ("user", "And of Italy?"), ("assistant", "Rome.")]
    ds = build(jsonl([messages(*conv), messages(*conv[1:3])]), template="chat")
    first = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd of Italy?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nRome.<|eot_id|>"
    )
    second = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
    )
    assert tokens(ds) == llama_ids(first) + [EOS] + llama_ids(second)
    specials = {LLAMA3.encode_single_token(s) for s in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}
    assert specials <= set(tokens(ds))  # the template's markup is special ids, not text


def test_chat_template_trims_content_like_the_reference(jsonl):
    conv = [("user", "  Hi there \n"), ("assistant", "\n Hello. ")]
    ds = build(jsonl([messages(*conv)] * 2), template="chat", train_on_prompt=False)
    assert tokens(ds) == llama_stream([llama3_chat(conv)] * 2)
    trained = [t for t, m in zip(tokens(ds), stream_mask(ds)) if m]
    assert LLAMA3.decode(trained) == "Hello.<|eot_id|>" * 2


def test_template_chat_needs_a_tokenizer_chat_template(jsonl):
    with pytest.raises(ConfigError, match="chat template"):
        build(jsonl([messages(("user", "Hi"), ("assistant", "Hello."))]), tokenizer="qwen3", template="chat")


def test_unparsable_jinja_template_is_a_config_error(jsonl):
    with pytest.raises(ConfigError, match="does not parse"):
        build(jsonl([messages(("user", "Hi"), ("assistant", "Hello."))]), template="{% for m in messages %}{{ m }")


def _assert_one_bos_per_document(ds: PackedSFTDataset, n_docs: int) -> None:
    # the stream (plan offsets) and the stored units (store offsets) alike
    for ids, offsets in ((ds.view.stream()[0], ds.view.plan.offsets), (ds.store.tokens, ds.store.doc_offsets)):
        ids = np.asarray(ids).astype(np.int64)
        starts = np.asarray(offsets)[:-1]
        assert len(starts) == n_docs
        assert not np.any((ids[:-1] == BOS) & (ids[1:] == BOS)), "doubled BOS"
        assert int((ids == BOS).sum()) == n_docs
        assert np.flatnonzero(ids == BOS).tolist() == starts.tolist()


def test_bundled_chat_template_emitting_bos_gives_no_doubled_bos(jsonl):
    from sftpack.templates import LLAMA3_CHAT_TEMPLATE

    assert "bos_token" in LLAMA3_CHAT_TEMPLATE  # the case under test: the template emits BOS itself
    convs = [messages(("user", f"Question {i}?"), ("assistant", f"Answer {i}.")) for i in range(4)]
    ds = build(jsonl(convs), template="chat")
    _assert_one_bos_per_document(ds, 4)
    assert tokens(ds)[:2] == [BOS, LLAMA3.encode_single_token("<|start_header_id|>")]


@pytest.mark.parametrize("route", ["hf", "hf-unaccelerated"])
def test_chat_template_emitting_bos_gives_no_doubled_bos_with_a_hf_tokenizer(jsonl, hf_llama3, route):
    from sftpack.templates import LLAMA3_CHAT_TEMPLATE
    from sftpack.tokenizers import load_tokenizer

    tok = hf_llama3 if route == "hf" else load_tokenizer(hf_llama3, accelerate=False)
    convs = [messages(("user", f"Question {i}?"), ("assistant", f"Answer {i}.")) for i in range(3)]
    ds = build(jsonl(convs), tokenizer=tok, template=LLAMA3_CHAT_TEMPLATE, train_on_prompt=False)
    _assert_one_bos_per_document(ds, 3)
    texts = [llama3_chat([("user", f"Question {i}?"), ("assistant", f"Answer {i}.")]) for i in range(3)]
    assert tokens(ds) == llama_stream(texts)


def test_custom_jinja_template_emitting_bos_string_gives_no_doubled_bos(jsonl):
    template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    ds = build(jsonl([messages(("user", "Hi"), ("assistant", "Yo"))] * 3), template=template)
    _assert_one_bos_per_document(ds, 3)
    assert tokens(ds) == llama_stream(["[user] Hi\n[assistant] Yo\n"] * 3)


QWEN_CHAT = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
)


def test_qwen3_documents_are_joined_by_eos_alone(jsonl):
    ds = build(jsonl([{"prompt": p, "response": r} for p, r in PAIRS]), tokenizer="qwen3",
               template="Q: {prompt}\nA: {response}")
    texts = [f"Q: {p}\nA: {r}" for p, r in PAIRS]
    assert tokens(ds) == qwen_stream(texts)
    assert tokens(ds)[0] == QWEN3.encode("Q: ")[0]  # the stream does not start with a BOS
    lengths = [len(qwen_ids(t)) + 1 for t in texts]
    assert ds.view.plan.offsets.tolist() == [0, *np.cumsum(lengths)[:-1].tolist(), len(tokens(ds))]
    assert ds.store.doc_offsets.tolist() == [0, *np.cumsum(lengths).tolist()]  # stored units keep every EOS
    assert "<|begin_of_text|>" not in QWEN3.decode(tokens(ds))


def test_qwen3_with_the_alpaca_template(jsonl):
    ds = build(jsonl([{"prompt": p, "response": r} for p, r in PAIRS]), tokenizer="qwen3")
    assert tokens(ds) == qwen_stream([alpaca(p, r) for p, r in PAIRS])
    assert ds.store.manifest["tokenizer"]["bos_id"] is None and ds.store.manifest["tokenizer"]["adds_bos"] is False


def test_custom_jinja_chat_template_with_qwen3(jsonl):
    convs = [
        [("system", "Be kind."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "Bye!")],
        [("user", "2+2?"), ("assistant", "4")],
    ]
    ds = build(jsonl([messages(*c) for c in convs]), tokenizer="qwen3", template=QWEN_CHAT, train_on_prompt=False)
    texts = ["".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in c) for c in convs]
    assert tokens(ds) == qwen_stream(texts)
    im_start = QWEN3.encode_single_token("<|im_start|>")
    assert tokens(ds)[0] == im_start
    ids, mask = tokens(ds), stream_mask(ds)
    runs = trained_runs(ids, mask)
    assert [QWEN3.decode(r) for r in runs] == ["Hello!<|im_end|>", "Bye!<|im_end|>", "4<|im_end|>"]


def test_chat_template_from_a_file(jsonl, tmp_path):
    file = tmp_path / "qwen.jinja"
    file.write_text(QWEN_CHAT, encoding="utf-8")
    conv = [("user", "Hi"), ("assistant", "Hello!")]
    ds = build(jsonl([messages(*conv)] * 2), tokenizer="qwen3", template=str(file))
    text = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    assert tokens(ds) == qwen_stream([text, text])


def test_every_build_error_is_an_sftpack_error(jsonl):
    with pytest.raises(SFTPackError):
        build(jsonl([{"messages": 1}]), template="chat")
