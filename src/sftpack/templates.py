"""Records -> rendered text plus the character spans that are trained.

Two stages, both pure: a *schema* turns a record into a `Chat` (message dicts in the
Hugging Face convention, and the conversation's tools), and a *template* renders it into
one document string, reporting which character spans are trained (when
`train_on_prompt=False`) and which hold the data's own text (where a special-token string
is an injection, not markup).

Chat templates render exactly as transformers' `apply_chat_template(messages, tools=...,
tokenize=False)` does: the same immutable sandbox, globals and filters (`raise_exception`,
`strftime_now`, transformers' `tojson`, `dict`, `namespace`, the `{% generation %}` tag), the
same message normalization (keys holding None dropped, reasoning fields aliased).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from itertools import accumulate
from operator import add
from typing import Any

import xxhash

from .errors import ConfigError, InputError
from .records import Record
from .verbatim import content_is_verbatim

Turns = list[tuple[str, str]]
Span = tuple[int, int]
Message = dict[str, Any]

SCHEMAS = ("auto", "prompt_response", "alpaca", "messages", "sharegpt")
ROLES = ("system", "developer", "user", "assistant", "tool", "ipython", "function")
REASONING_MODES = ("train", "mask", "rendered")
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
# transformers' names for a message's reasoning, the first being the one chat templates read
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# canonical field name -> default key in the record
DEFAULT_FIELDS = {
    "prompt": "prompt",
    "response": "response",
    "instruction": "instruction",
    "input": "input",
    "output": "output",
    "messages": "messages",
    "role": "role",
    "content": "content",
    "conversations": "conversations",
    "from": "from",
    "value": "value",
    "tools": "tools",
}

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n"
    "\n"
    "### Instruction:\n"
    "{instruction}\n"
    "\n"
    "### Response:\n"
    "{response}"
)

# The Stanford Alpaca prompts (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT): the response
# follows "### Response:" directly; a record with a non-empty input takes the first.
STANFORD_ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:{response}"
)
STANFORD_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:{response}"
)

# Meta's Llama-3 instruct chat format (the template shipped with Llama-3-8B-Instruct).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


class Rendered:
    """One document: its text, the trained spans, the user-content spans, and whether the
    delimiter EOS that closes it is trained (for prompt templates: the model must learn to stop)."""

    __slots__ = ("text", "trained", "content", "train_eos", "plan", "values")

    def __init__(
        self,
        text: str,
        trained: tuple[Span, ...],
        content: tuple[Span, ...],
        train_eos: bool,
        plan: _Plan | None = None,
        values: list[str] | None = None,
    ) -> None:
        self.text, self.trained, self.content, self.train_eos = text, trained, content, train_eos
        # where known (the chat fast path): the plan of the conversation's shape and the
        # message text it was applied to (`plan.apply(values)` gives this document)
        self.plan, self.values = plan, values


class Chat:
    """One conversation as chat templates see it: message dicts (`role`; `content`, a string
    or a list of content parts; any other keys such as `tool_calls`, `reasoning_content`,
    `weight`), the conversation's `tools`, and for Alpaca records the instruction and input
    apart (the Stanford prompt shows them apart)."""

    __slots__ = ("messages", "tools", "instruction", "input")

    def __init__(
        self,
        messages: list[Message],
        tools: list[Any] | None = None,
        instruction: str | None = None,
        input: str | None = None,
    ) -> None:
        self.messages, self.tools, self.instruction, self.input = messages, tools, instruction, input


def as_chat(turns: Chat | Sequence[tuple[str, str]] | Sequence[Message]) -> Chat:
    """A `Chat` from a `Chat`, `(role, content)` pairs or message dicts."""
    if isinstance(turns, Chat):
        return turns
    return Chat([dict(t) if isinstance(t, Mapping) else {"role": t[0], "content": t[1]} for t in turns])


def trains(message: Message) -> bool:
    """Whether a message is a training target: an assistant message whose `weight` is not 0
    (OpenAI fine-tuning files) and whose `train` flag is not false."""
    return message.get("role") == "assistant" and message.get("weight", 1) != 0 and message.get("train", True)


def _where(i: int, key: str = "messages") -> str:
    """A message as the user finds it: its JSON index and its ordinal."""
    return f"{key}[{i}] (message {i + 1})"


# --------------------------------------------------------------------------- schemas


class Schema:
    """Reads conversations out of records of one schema, with remappable field names."""

    def __init__(self, name: str = "auto", fields: Mapping[str, str] | None = None) -> None:
        if name not in SCHEMAS:
            raise ConfigError(f"schema={name!r} is not one of {', '.join(SCHEMAS)}")
        unknown = set(fields or {}) - set(DEFAULT_FIELDS)
        if unknown:
            raise ConfigError(
                f"unknown field name(s) {sorted(unknown)} in the field map; valid: {', '.join(DEFAULT_FIELDS)}"
            )
        self.name = name
        self.fields = {**DEFAULT_FIELDS, **(fields or {})}

    def detect(self, record: Record) -> str:
        """The schema of `record` (for "auto"), decided from the keys it has."""
        if self.name != "auto":
            return self.name
        f, keys = self.fields, record.data.keys()
        if f["messages"] in keys:
            return "messages"
        if f["conversations"] in keys:
            return "sharegpt"
        if f["instruction"] in keys and f["output"] in keys:
            return "alpaca"
        if f["prompt"] in keys or f["response"] in keys:
            return "prompt_response"
        raise record.error(
            f"cannot detect the schema from keys {sorted(keys)}; expected "
            f"{f['prompt']!r}/{f['response']!r}, {f['instruction']!r}/{f['output']!r}, "
            f"{f['messages']!r} or {f['conversations']!r} (or pass schema=... and a field map)"
        )

    def fingerprint(self) -> str:
        return f"{self.name}:{sorted(self.fields.items())}"

    def turns(self, record: Record, schema: str) -> Chat:
        """The record's conversation (`InputError` naming file:line and the message)."""
        try:
            return self._turns(record, schema)
        except InputError as exc:
            if self.name != "auto" or not exc.reason.endswith(" is missing"):
                raise
            try:
                own = self.detect(record)
            except InputError:
                raise exc from None
            if own == schema:
                raise
            raise InputError(
                exc.source,
                exc.line,
                f"{exc.reason}: this record is {own} data, but the {schema} schema detected on the first record "
                "applies to every input; build the files of each schema separately",
                exc.unit,
            ) from None

    def plain(self, record: Record, schema: str) -> list[Any] | None:
        """The record's message list where `ChatTemplate.plain` may take it (messages data
        without tools); None otherwise (`turns` reads the record)."""
        if schema != "messages":
            return None
        data = record.data
        tools = data.get(self.fields["tools"])
        if tools is not None and tools != "":
            return None
        messages = data.get(self.fields["messages"])
        return messages if type(messages) is list and messages else None

    def _turns(self, record: Record, schema: str) -> Chat:
        f = self.fields
        if schema == "prompt_response":
            prompt, response = _text(record, f["prompt"]), _text(record, f["response"])
            return Chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
        if schema == "alpaca":
            instruction = prompt = _text(record, f["instruction"])
            extra = record.data.get(f["input"])
            if extra is not None:
                if not isinstance(extra, str):
                    raise record.error(f"field {f['input']!r} must be a string, got {type(extra).__name__}")
                if extra:
                    prompt = f"{prompt}\n\n{extra}"
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": _text(record, f["output"])},
            ]
            return Chat(messages, instruction=instruction, input=extra or "")
        tools = _tools(record, f["tools"])
        if schema == "messages":
            return Chat(_messages(record, f["messages"], f["role"], f["content"]), tools)
        return Chat(_sharegpt(record, f["conversations"], f["from"], f["value"]), tools)


def _text(record: Record, key: str) -> str:
    try:
        value = record.data[key]
    except KeyError:
        raise record.error(f"field {key!r} is missing") from None
    if not isinstance(value, str):
        raise record.error(f"field {key!r} must be a string, got {_type(value)}")
    return value


def _tools(record: Record, key: str) -> list[Any] | None:
    """The conversation's tool schemas: a list of objects, or that list as a JSON string
    (LLaMA-Factory's ShareGPT files store it so)."""
    tools = record.data.get(key)
    if tools is None or tools == "":
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise record.error(f"field {key!r} is a string but not JSON ({exc.msg}); give a list of tool schemas")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise record.error(f"field {key!r} must be a list of tool schemas (objects), got {_type(tools)}")
    return tools


def _items(record: Record, key: str) -> list[Any]:
    try:
        items = record.data[key]
    except KeyError:
        raise record.error(f"field {key!r} is missing") from None
    if not isinstance(items, list):
        raise record.error(f"field {key!r} must be a list of turns, got {_type(items)}")
    if not items:
        raise record.error(f"field {key!r} is an empty conversation")
    return items


def _messages(record: Record, key: str, role_key: str, text_key: str) -> list[Message]:
    messages: list[Message] = []
    for i, item in enumerate(_items(record, key)):
        if not isinstance(item, dict):
            raise record.error(f"{key}[{i}] must be an object, got {_type(item)} (message {i + 1})")
        if len(item) == 2 and role_key != text_key and type(item.get(text_key)) is str and item.get(role_key) in ROLES:
            messages.append({"role": item[role_key], "content": item[text_key]})  # the common case, as below
            continue
        # as transformers normalizes: keys holding None are dropped (OpenAI writes content=None)
        message = {k: v for k, v in item.items() if v is not None and k not in (role_key, text_key)}
        role = item.get(role_key)
        if role not in ROLES:
            raise record.error(f"{key}[{i}].{role_key} is {role!r} (message {i + 1}); valid roles: {', '.join(ROLES)}")
        message["role"] = role
        if item.get(text_key) is not None:
            message["content"] = item[text_key]
        _check_message(record, message, f"{key}[{i}]", i, text_key)
        messages.append(message)
    if not any(m["role"] == "assistant" for m in messages):
        raise record.error(f"field {key!r} has no assistant turn: nothing to train on")
    return messages


def _sharegpt(record: Record, key: str, role_key: str, text_key: str) -> list[Message]:
    """ShareGPT turns: human/gpt/system, and LLaMA-Factory's function_call (a JSON tool call
    or list of them, made the assistant's `tool_calls`) and observation (a tool result)."""
    messages: list[Message] = []
    for i, item in enumerate(_items(record, key)):
        if not isinstance(item, dict):
            raise record.error(f"{key}[{i}] must be an object, got {_type(item)} (message {i + 1})")
        source, value = item.get(role_key), item.get(text_key)
        if source not in _SHAREGPT_ROLES:
            raise record.error(
                f"{key}[{i}].{role_key} is {source!r} (message {i + 1}); valid: {', '.join(_SHAREGPT_ROLES)}"
            )
        if not isinstance(value, str):
            raise record.error(f"{key}[{i}].{text_key} must be a string, got {_type(value)}")
        extra = {k: v for k, v in item.items() if v is not None and k not in (role_key, text_key)}
        if source == "function_call":
            messages.append({**extra, "role": "assistant", "tool_calls": _function_calls(record, value, key, i)})
        else:
            messages.append({**extra, "role": _SHAREGPT_ROLES[str(source)], "content": value})
        _check_message(record, messages[-1], f"{key}[{i}]", i, text_key)
    if not any(m["role"] == "assistant" for m in messages):
        raise record.error(f"field {key!r} has no assistant turn: nothing to train on")
    return messages


def _function_calls(record: Record, value: str, key: str, i: int) -> list[Message]:
    try:
        calls = json.loads(value)
    except json.JSONDecodeError as exc:
        raise record.error(
            f"{_where(i, key)} is a function_call whose value is not JSON ({exc.msg}); "
            'write it as {"name": ..., "arguments": {...}}'
        ) from None
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise record.error(f'{_where(i, key)}: a function_call must be {{"name": ..., "arguments": {{...}}}}')
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass  # kept as the string it is
        out.append({"type": "function", "function": {"name": call["name"], "arguments": arguments}})
    return out


def _check_message(record: Record, message: Message, where: str, i: int, text_key: str) -> None:
    content = message.get("content")
    if content is None:
        if message["role"] == "assistant" and message.get("tool_calls"):
            pass
        else:
            raise record.error(f"{where}.{text_key} must be a string, got null (message {i + 1})")
    elif isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise record.error(
                    f"{where}.{text_key}[{j}] must be a content part such as "
                    f'{{"type": "text", "text": "..."}}, got {_type(part)} (message {i + 1})'
                )
            if part["type"] != "text":  # its repr would be rendered (and trained) as if it were text
                raise record.error(
                    f"{where}.{text_key}[{j}] is a {part['type']!r} content part (message {i + 1}): sftpack packs "
                    "text; keep only the text parts of this conversation, or drop it"
                )
            if not isinstance(part.get("text"), str):
                raise record.error(f"{where}.{text_key}[{j}].text must be a string (message {i + 1})")
    elif not isinstance(content, str):
        raise record.error(
            f"{where}.{text_key} must be a string, got {_type(content)} (message {i + 1}); "
            'or a list of content parts [{"type": "text", "text": "..."}]'
        )
    calls = message.get("tool_calls")
    if calls is not None and not (isinstance(calls, list) and all(isinstance(c, dict) for c in calls)):
        raise record.error(f"{where}.tool_calls must be a list of objects, got {_type(calls)} (message {i + 1})")
    if "weight" in message and (type(message["weight"]) is not int or message["weight"] not in (0, 1)):
        raise record.error(f"{where}.weight must be 0 or 1, got {message['weight']!r} (message {i + 1})")
    if "train" in message and not isinstance(message["train"], bool):
        raise record.error(f"{where}.train must be true or false, got {message['train']!r} (message {i + 1})")


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _plain_content(message: Message, i: int) -> str:
    """A message's text for prompt templates: a string, or its text parts joined."""
    content = message.get("content")
    if message.get("tool_calls") or message.get("role") not in ("system", "user", "assistant"):
        raise ConfigError(
            f"{_where(i)} is a {message.get('role')} message{' with tool calls' if message.get('tool_calls') else ''}"
            "; a prompt/response template cannot show it: use template='chat' or a chat template file"
        )
    if isinstance(content, list):
        if any(p.get("type") != "text" for p in content):
            raise ConfigError(f"{_where(i)} has non-text content parts; a prompt template shows text only")
        return "".join(p["text"] for p in content)
    return content if isinstance(content, str) else ""


# --------------------------------------------------------------------------- prompt templates


class PromptTemplate:
    """A string with `{prompt}` (or `{instruction}`) and `{response}` placeholders.

    Substitution is a single pass: braces inside the content come out verbatim, and any
    other brace in the template is literal text.
    """

    _PLACEHOLDER = re.compile(r"\{(prompt|instruction|response|system|input)\}")

    def __init__(self, source: str) -> None:
        pieces = self._PLACEHOLDER.split(source)
        self.literals = pieces[0::2]
        self.slots = ["prompt" if s == "instruction" else s for s in pieces[1::2]]
        if self.slots.count("response") != 1 or self.slots.count("prompt") != 1:
            raise ConfigError(
                "a template string needs exactly one {prompt} (or {instruction}) and one {response} placeholder"
            )
        self.source = source
        self._simple = self.slots == ["prompt", "response"]

    def fingerprint(self) -> str:
        # "{input}" became a placeholder (it was literal text): such templates hash anew
        kind = "prompt2:" if "input" in self.slots else "prompt:"
        return kind + xxhash.xxh3_64_hexdigest(self.source.encode())

    def render(self, turns: Chat | Sequence[Any]) -> Rendered:
        chat = as_chat(turns)
        messages = chat.messages
        if (
            self._simple
            and len(messages) == 2
            and messages[0].get("role") == "user"
            and messages[1].get("role") == "assistant"
            and type(messages[0].get("content")) is str
            and type(messages[1].get("content")) is str
            and len(messages[1]) == 2
        ):
            # the common case, without the general loop
            lit = self.literals
            prompt, response = messages[0]["content"], messages[1]["content"]
            p0 = len(lit[0])
            r0 = p0 + len(prompt) + len(lit[1])
            r1 = r0 + len(response)
            text = "".join((lit[0], prompt, lit[1], response, lit[2]))
            return Rendered(text, ((r0, r1),), ((p0, p0 + len(prompt)), (r0, r1)), True)
        values: dict[str, str] = {}
        trained_response = True
        if chat.tools:
            raise ConfigError(
                "the conversation has tools; a prompt/response template cannot show them: "
                "use template='chat' or a chat template file"
            )
        for i, message in enumerate(messages):
            role = message.get("role")
            slot = {"user": "prompt", "assistant": "response", "system": "system"}.get(str(role), "")
            text = _plain_content(message, i)
            if slot in values:
                raise ConfigError(
                    f"a prompt/response template takes one {role} turn ({_where(i)} is another); "
                    "use template='chat' for multi-turn data"
                )
            values[slot] = text
            if role == "assistant":
                trained_response = trains(message)
        if "input" in self.slots:
            values["prompt"], values["input"] = chat.instruction or values.get("prompt", ""), chat.input or ""
        if "system" in values and "system" not in self.slots:
            raise ConfigError("the record has a system turn but the template has no {system} placeholder")
        out = [self.literals[0]]
        pos = len(self.literals[0])
        trained: list[Span] = []
        content: list[Span] = []
        for slot, literal in zip(self.slots, self.literals[1:]):
            value = values.get(slot, "")
            span = (pos, pos + len(value))
            content.append(span)
            if slot == "response" and trained_response:
                trained.append(span)
            out.append(value)
            out.append(literal)
            pos += len(value) + len(literal)
        return Rendered("".join(out), tuple(trained), tuple(content), trained_response)


class StanfordAlpacaTemplate:
    """The Stanford Alpaca prompt: the "### Input:" prompt and its preamble for a record with
    a non-empty input, the other prompt otherwise; the response follows "### Response:"."""

    def __init__(self) -> None:
        self._with_input = PromptTemplate(STANFORD_ALPACA_INPUT)
        self._without = PromptTemplate(STANFORD_ALPACA_NO_INPUT)

    def fingerprint(self) -> str:
        return "stanford_alpaca:1"

    def render(self, turns: Chat | Sequence[Any]) -> Rendered:
        chat = as_chat(turns)
        if chat.input:
            return self._with_input.render(chat)
        if chat.instruction is not None:  # an Alpaca record: the instruction alone, not merged
            return self._without.render(Chat(chat.messages, instruction=chat.instruction, input=""))
        return self._without.render(chat)


# --------------------------------------------------------------------------- chat templates

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


@lru_cache(maxsize=1)
def _sandbox() -> Any:
    """The environment chat templates render in: Jinja's immutable sandbox configured as
    transformers configures it (its globals, filters and `{% generation %}` tag), with the
    sandbox's attribute verdicts cached (they depend only on the object's type and the name)."""
    from contextvars import ContextVar
    from datetime import datetime

    import jinja2
    import jinja2.nodes
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    tracking: ContextVar[tuple[list[str], list[Span]] | None] = ContextVar("sftpack_generation", default=None)

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}`: records where the block's output lies."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generation", []), [], [], body).set_lineno(lineno)

        def _generation(self, caller: Any) -> str:
            rv = caller()
            tracked = tracking.get()
            if tracked is not None:
                blocks, spans = tracked
                start = sum(map(len, blocks))
                spans.append((start, start + len(rv)))
            return str(rv)

    class Sandbox(ImmutableSandboxedEnvironment):
        _verdicts: dict[tuple[type, str], bool] = {}
        generation_tracking = tracking

        def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
            key = (type(obj), attr)
            verdict = self._verdicts.get(key)
            if verdict is None:
                verdict = self._verdicts[key] = super().is_safe_attribute(obj, attr, value)
            return verdict

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805  (Jinja's Namespace signature)
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check_name(name)
            Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace: {name!r}"
                )

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


def _alias_reasoning(message: Message) -> Message:
    """As transformers does: reasoning given under any of its names is passed as both
    `reasoning_content` and `thinking` (gpt-oss templates read the latter)."""
    for key in _REASONING_FIELDS:
        value = message.get(key)
        if value is not None:
            return {"thinking": value, **message, "reasoning_content": value}
    return message


# Sentinels stand for the runs of message text in the skeleton rendering: rare printable
# brackets, which neither JSON (tojson) nor Python's repr (a list rendered as text) escapes.
_S0, _S1 = "\u2983", "\u2984"
_SENTINEL = re.compile("\u2983([0-9]+)\u2984")
_TAG = re.compile(r"(</?think>)")
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


_SENTINELS = [f"{_S0}{k}{_S1}" for k in range(64)]


def _sentinel(k: int) -> str:
    return _SENTINELS[k] if k < 64 else f"{_S0}{k}{_S1}"


class _Runs:
    """The runs of text a skeleton stands in for: (message index, is reasoning, text)."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[tuple[int, bool, str]] = []

    def mark(self, value: str, message: int, reasoning: bool) -> str:
        """`value` with each run of text between `<think>` tags and inside its edge
        whitespace replaced by a sentinel: tags and whitespace stay, so that templates that
        split at `</think>` or strip see the same structure as in the real rendering."""
        core = value.strip()
        items = self.items
        if not core:
            items.append((message, reasoning, value))
            return _sentinel(len(items) - 1)
        if "think>" not in core:  # the common case: one run inside the edge whitespace
            items.append((message, reasoning, core))
            if len(core) == len(value):
                return _sentinel(len(items) - 1)
            at = len(value) - len(value.lstrip())
            return f"{value[:at]}{_sentinel(len(items) - 1)}{value[at + len(core) :]}"
        out = []
        opens, closes = value.find(_THINK_OPEN), value.find(_THINK_CLOSE)
        # text before a </think> without its opening tag is reasoning too (R1 output starts inside it)
        think = reasoning or (closes >= 0 and not 0 <= opens < closes)
        for k, piece in enumerate(_TAG.split(value)):
            if k % 2:
                out.append(piece)
                if piece == _THINK_OPEN:
                    think = True
                elif piece == _THINK_CLOSE:
                    think = reasoning
                continue
            core = piece.strip()
            if core:
                at = piece.index(core[0])
                self.items.append((message, think, core))
                piece = f"{piece[:at]}{_S0}{len(self.items) - 1}{_S1}{piece[at + len(core) :]}"
            out.append(piece)
        return "".join(out)

    def mark_value(self, value: Any, message: int) -> Any:
        """Tool-call arguments: every string inside marked, keys and other values kept."""
        if isinstance(value, str):
            return self.mark(value, message, False)
        if isinstance(value, dict):
            return {k: self.mark_value(v, message) for k, v in value.items()}
        if isinstance(value, list):
            return [self.mark_value(v, message) for v in value]
        return value


def _mark_message(runs: _Runs, message: Message, i: int) -> Message:
    content = message.get("content")
    if len(message) == 2 and type(content) is str:  # the common case: role and content
        return {"role": message["role"], "content": runs.mark(content, i, False)}
    out = dict(message)
    if isinstance(content, str):
        out["content"] = runs.mark(content, i, False)
    elif isinstance(content, list):
        out["content"] = [
            {**p, "text": runs.mark(p["text"], i, False)}
            if isinstance(p, dict) and isinstance(p.get("text"), str)
            else p
            for p in content
        ]
    for key in _REASONING_FIELDS:
        if isinstance(message.get(key), str):
            out[key] = runs.mark(message[key], i, True)
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        marked = []
        for call in calls:
            if isinstance(call, dict):
                call = dict(call)
                function = call.get("function")
                if isinstance(function, dict) and "arguments" in function:
                    call["function"] = {**function, "arguments": runs.mark_value(function["arguments"], i)}
                elif "arguments" in call:
                    call["arguments"] = runs.mark_value(call["arguments"], i)
            marked.append(call)
        out["tool_calls"] = marked
    return out


class _Unaligned(Exception):
    """The real rendering does not follow the skeleton."""


def _candidates(value: str) -> Iterator[str]:
    """How a run may come out: verbatim, JSON-escaped (tojson), trimmed, ASCII-escaped, gone."""
    yield value
    seen = {value}
    for make in (
        lambda: json.dumps(value, ensure_ascii=False)[1:-1],
        value.strip,
        value.lstrip,
        value.rstrip,
        lambda: json.dumps(value)[1:-1],
        lambda: "",
    ):
        candidate = make()
        if candidate not in seen:
            seen.add(candidate)
            yield candidate


Skeleton = tuple[list[str], list[int]]


def _split_skeleton(skeleton: str) -> Skeleton:
    """A skeleton as its literal pieces and, between them, the runs its sentinels stand for."""
    pieces = _SENTINEL.split(skeleton)
    return pieces[0::2], [int(r) for r in pieces[1::2]]


class _Filled:
    """A skeleton for the fast path: its literal pieces, the runs between them, and each
    `{% generation %}` span's ends as (literal index, offset in it)."""

    __slots__ = ("literals", "ids", "spans", "before", "owners", "plan")

    def __init__(self, skeleton: str, spans: list[Span]) -> None:
        self.literals, self.ids = _split_skeleton(skeleton)
        # the literal text before run k: literals 0..k
        self.before = list(accumulate(map(len, self.literals[: len(self.ids)])))
        self.owners: tuple[list[int], list[bool]] | None = None  # each run's message and whether reasoning
        bounds = []  # (start, end) of each literal in the skeleton
        pos = 0
        for k, literal in enumerate(self.literals):
            bounds.append((pos, pos + len(literal)))
            if k < len(self.ids):
                pos += len(literal) + len(f"{_S0}{self.ids[k]}{_S1}")
        self.spans = [(_in_literal(bounds, a), _in_literal(bounds, b)) for a, b in spans]
        self.plan: _Plan | bool | None = None  # the spans as a function of the text: None until derived

    def fill(self, values: list[str]) -> tuple[str, list[Span], list[tuple[int, int, int, bool]]]:
        """The rendering with `values` at the runs, its generation spans and its runs."""
        lengths = list(map(len, values))
        starts = list(map(add, self.before, accumulate(lengths, initial=0)))
        ends = list(map(add, starts, lengths))
        pieces: list[str] = [""] * (2 * len(values) + 1)
        pieces[0::2] = self.literals
        pieces[1::2] = values
        occurrences = list(zip(starts, ends, *self.owners))  # type: ignore[misc]
        generated = []
        if self.spans:
            literal_at = [0, *ends]  # where literal k starts: after run k - 1
            generated = [(literal_at[a] + da, literal_at[b] + db) for (a, da), (b, db) in self.spans]
        return "".join(pieces), generated, occurrences


class _Plan:
    """A conversation shape's document as a function of its message text: everything
    `ChatTemplate.render` computes after filling the skeleton (trained spans, content spans,
    the BOS / EOS cuts) looks only at the literal text between the runs, so its positions
    are (literal index, offset) pairs, derived once from one rendering and checked on it."""

    __slots__ = ("literals", "lengths", "chars", "shift", "cut", "trained", "content", "train_eos")

    def __init__(self, literals: list[str], shift: int, cut: tuple[int, int], rendered: Rendered, at: Any) -> None:
        k, off = cut
        # the document's literals: the BOS cut from the first, the EOS cut from the last (k)
        kept = literals[:k] + [literals[k][:off]]
        kept[0] = kept[0][shift:]
        self.literals, self.shift, self.cut, self.train_eos = tuple(kept), shift, k, rendered.train_eos
        self.chars = sum(map(len, kept))  # the document's length less its message text
        self.lengths = list(map(len, literals))
        self.trained = [(*at(a), *at(b)) for a, b in rendered.trained]
        self.content = [(*at(a), *at(b)) for a, b in rendered.content]

    @staticmethod
    def derive(entry: _Filled, values: list[str], rendered: Rendered, bos: str, eos: str) -> _Plan | None:
        """The plan of `entry`'s shape from `rendered` (its rendering with `values`), or None
        where a result may depend on the message text (a BOS / EOS cut that could reach into
        it, a position inside a run) or the plan does not give `rendered` back."""
        literals = entry.literals
        full = entry.fill(values)[0]
        shift = len(bos) if bos and full.startswith(bos) else 0
        if bos and len(literals[0]) < len(bos) and (shift or bos.startswith(literals[0])):
            return None  # the BOS cut may depend on the text after literal 0
        if eos and not bos and len(literals) > 1 and len(literals[-1].rstrip()) < len(eos):
            return None  # the EOS cut may reach into the last run
        starts = list(accumulate((len(lit) + len(v) for lit, v in zip(literals, values)), initial=0))

        def at(position: int) -> tuple[int, int]:
            p = position + shift
            for k, start in enumerate(starts):
                if start <= p <= start + len(literals[k]):
                    return k, p - start
            raise _Unaligned

        cut = shift + len(rendered.text)
        try:
            plan = _Plan(literals, shift, at(cut - shift), rendered, at)
        except _Unaligned:
            return None
        again = plan.apply(values)
        same = (again.text, again.trained, again.content, again.train_eos) == (
            rendered.text,
            rendered.trained,
            rendered.content,
            rendered.train_eos,
        )
        return plan if same else None

    def apply(self, values: list[str]) -> Rendered:
        starts = list(accumulate(map(add, self.lengths, map(len, values)), initial=-self.shift))
        trained = tuple([(starts[a] + da, starts[b] + db) for a, da, b, db in self.trained])
        content = tuple([(starts[a] + da, starts[b] + db) for a, da, b, db in self.content])
        k = self.cut
        segments: list[str] = [""] * (2 * k + 1)
        segments[0::2] = self.literals
        segments[1::2] = values[:k]
        return Rendered("".join(segments), trained, content, self.train_eos, self, values)


class Planned:
    """A batch of plain conversations, not rendered: each one's shape plan and its message
    text in the order the plan takes it (`ChatTemplate.plain`). The encoder works from these
    alone; `rendered()` gives the documents where it cannot."""

    __slots__ = ("plans", "values")

    def __init__(self, plans: list[_Plan] | None = None, values: list[list[str]] | None = None) -> None:
        self.plans: list[_Plan] = plans or []
        self.values: list[list[str]] = values or []

    def __len__(self) -> int:
        return len(self.plans)

    def rendered(self, limit: int | None = None) -> list[Rendered]:
        return [plan.apply(values) for plan, values in zip(self.plans[:limit], self.values[:limit])]


def _in_literal(bounds: list[Span], position: int) -> tuple[int, int]:
    """(literal index, offset) of a skeleton position; a position inside a sentinel cannot
    be mapped (a block cannot end inside a value it outputs whole)."""
    for k, (start, end) in enumerate(bounds):
        if start <= position <= end:
            return k, position - start
    raise _Unaligned


def _align(text: str, skeleton: Skeleton, runs: _Runs) -> list[tuple[int, int, int]]:
    """Where each sentinel of the skeleton lies in the real text: (start, end, run), in order.
    The skeleton's literal text must equal the real text's between them; a run may come out
    verbatim, trimmed or JSON-escaped (tojson)."""
    literals, ids = skeleton
    items = runs.items
    if ids and max(ids) >= len(items):
        raise _Unaligned
    out: list[tuple[int, int, int]] = []
    startswith = text.startswith
    if not startswith(literals[0]):
        raise _Unaligned
    pos = len(literals[0])
    for run, following in zip(ids, literals[1:]):
        for candidate in _candidates(items[run][2]):
            end = pos + len(candidate)
            if startswith(candidate, pos) and startswith(following, end):
                out.append((pos, end, run))
                pos = end + len(following)
                break
        else:
            raise _Unaligned
    if pos != len(text):
        raise _Unaligned
    return out


class ChatTemplate:
    """A Jinja chat template (Hugging Face convention), rendered as transformers renders it.

    Trained text (see `render`): with `{% generation %}` markers, what they enclose (as
    transformers' `return_assistant_tokens_mask`); otherwise each trained assistant
    message from after the generation prompt (the header inference writes) through its
    end-of-turn token. A leading BOS string is removed (the packer inserts BOS itself); for
    tokenizers without BOS a trailing EOS string too (the delimiter EOS stands for it).
    """

    def __init__(
        self,
        source: str,
        *,
        bos_token: str | None,
        eos_token: str | None,
        special_tokens: Sequence[str] = (),
        last_turn_only: bool = False,
        reasoning: str = "train",
        template_args: Mapping[str, Any] | None = None,
    ) -> None:
        from jinja2.exceptions import TemplateError

        check_template_args(template_args or {})
        # as JSON reads them back (the manifest's form: a tuple is a list), nested keys in their order (tojson keeps it)
        self.template_args: dict[str, Any] = json.loads(json.dumps(dict(template_args or {})))
        if reasoning not in REASONING_MODES:
            raise ConfigError(f"reasoning={reasoning!r} is not one of {', '.join(map(repr, REASONING_MODES))}")
        env = _sandbox()
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise ConfigError(f"the chat template does not parse: {exc}") from None
        except Exception as exc:  # RecursionError on absurd nesting, ...
            raise ConfigError(f"the chat template does not parse: {_describe(exc)}") from None
        self._tracking = env.generation_tracking
        self.source = source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self.last_turn_only = last_turn_only
        self.reasoning = reasoning
        self.has_generation = _GENERATION.search(source) is not None
        self._specials = sorted((s for s in special_tokens if s), key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, self._specials))) if self._specials else None
        self._markers: tuple[list[str], str | None, str] | None = None
        self._skeletons: dict[Any, Skeleton] = {}
        # the fast path (see `_render_filled`): proven from the syntax tree, never assumed
        self._verbatim = (
            content_is_verbatim(env.parse(source))
            and _S0 not in source + self.bos_token + self.eos_token + json.dumps(self.template_args, ensure_ascii=False)
            and _S1 not in source + self.bos_token + self.eos_token + json.dumps(self.template_args, ensure_ascii=False)
        )
        self._filled: dict[Any, _Filled | None] = {}
        # by `plain`'s shapes: the plan and the order its runs take the messages (None where none)
        self._plans: dict[tuple[Any, ...], tuple[_Plan, list[int] | None] | None] = {}

    @property
    def fast_path(self) -> bool:
        """Whether plain conversations are rendered from a skeleton per conversation shape
        (the template was proven to output message text only verbatim or trimmed)."""
        return self._verbatim

    def fingerprint(self) -> str:
        """What decides the rendering: the source and options, the arguments, and for a template
        that reads the clock (Llama 3.2's date line) today's date: a store built on another day
        holds another date, and is not reused (pin one with a template argument: date_string)."""
        args = f":{json.dumps(dict(sorted(self.template_args.items())))}" if self.template_args else ""
        if "strftime_now" in self.source:
            from datetime import datetime

            args += f":{datetime.now():%Y-%m-%d}"
        return f"chat2:{xxhash.xxh3_64_hexdigest(self.source.encode())}:{self.last_turn_only}:{self.reasoning}{args}"

    # ---------------------------------------------------------------- rendering

    def _render(
        self, messages: list[Message], tools: Any, generation: bool = False, prompt: bool = False
    ) -> tuple[str, list[Span]]:
        from jinja2.exceptions import TemplateError

        variables = {
            **self.template_args,
            "messages": [_alias_reasoning(m) for m in messages],
            "tools": tools,
            "documents": None,
            "add_generation_prompt": prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        spans: list[Span] = []
        try:
            if generation:
                blocks: list[str] = []
                token = self._tracking.set((blocks, spans))
                try:
                    for block in self._template.generate(variables):
                        blocks.append(block)
                finally:
                    self._tracking.reset(token)
                text = "".join(blocks)
            else:
                text = self._template.render(variables)
        except TemplateError as exc:
            raise ConfigError(f"the chat template failed: {exc}") from None
        except Exception as exc:  # the template's own bug: {{ 1/0 }}, endless macro recursion, {% include %}
            raise ConfigError(f"the chat template failed: {_describe(exc)}") from None
        return text, spans

    def render_text(self, turns: Chat | Sequence[Any]) -> str:
        """Exactly what `apply_chat_template(messages, tools=tools, tokenize=False)` renders."""
        chat = as_chat(turns)
        return self._render(chat.messages, chat.tools)[0]

    def unrendered(self, turns: Chat | Sequence[Any], limit: int = 64) -> tuple[int, int, int, int]:
        """(assistant messages with tool calls, of those the ones whose tool calls the template
        does not render, messages with reasoning, of those the ones whose reasoning it does not
        render): a message's part is not rendered where the text is the same without it. At most
        `limit` parts are looked at (each costs a render of the whole conversation)."""
        chat = as_chat(turns)
        if not any(
            m.get("tool_calls") or any(m.get(k) for k in _REASONING_FIELDS) or _THINK_CLOSE in str(m.get("content"))
            for m in chat.messages
            if m.get("role") == "assistant"
        ):
            return 0, 0, 0, 0  # (nothing to look for: not rendered)
        try:
            text = self.render_text(chat)
        except ConfigError:
            return 0, 0, 0, 0
        counts = [0, 0, 0, 0]
        for i, m in enumerate(chat.messages):
            if m.get("role") != "assistant":
                continue
            if counts[0] + counts[2] >= limit:
                break
            content = m.get("content")
            without: list[tuple[int, Message]] = []
            if m.get("tool_calls"):
                without.append((0, {k: v for k, v in m.items() if k != "tool_calls"}))
            fields = [k for k in _REASONING_FIELDS if m.get(k)]
            if fields:
                without.append((2, {k: v for k, v in m.items() if k not in fields}))
            elif isinstance(content, str) and _THINK_CLOSE in content:  # reasoning in the content
                without.append((2, {**m, "content": content.split(_THINK_CLOSE)[-1].lstrip("\n")}))
            for at, message in without:
                counts[at] += 1
                try:
                    same = self.render_text(Chat([*chat.messages[:i], message, *chat.messages[i + 1 :]], chat.tools))
                except ConfigError:
                    continue
                counts[at + 1] += same == text
        calls, dropped_calls, reasoning, dropped_reasoning = counts
        return calls, dropped_calls, reasoning, dropped_reasoning

    def _turn_markers(self) -> tuple[list[str], str | None, str]:
        """The generation prompt (what inference writes before the model's turn; with its
        shorter forms up to a special token), the end-of-turn text, and what stands between
        a user's text and the assistant's (the prompt of templates without a generation-prompt
        branch, such as Mistral's "[/INST]"), found once by rendering probes. Empty / None where the
        template has none or refuses the probe."""
        if self._markers is None:
            prompts: list[str] = []
            end: str | None = None
            user_closing = ""
            probe = [{"role": "user", "content": f"{_S0}0{_S1}"}]
            try:
                bare, _ = self._render(probe, None)
                with_prompt, _ = self._render(probe, None, prompt=True)
                if with_prompt.startswith(bare) and len(with_prompt) > len(bare):
                    g = with_prompt[len(bare) :]
                    prompts.append(g)
                    for m in reversed(list(self._special_re.finditer(g)) if self._special_re else []):
                        if g[: m.end()] not in prompts:
                            prompts.append(g[: m.end()])
            except ConfigError:
                pass
            try:
                answered, _ = self._render(probe + [{"role": "assistant", "content": f"{_S0}1{_S1}"}], None)
                between = answered.split(f"{_S0}0{_S1}")[-1].split(f"{_S0}1{_S1}")
                user_closing = between[0] if len(between) == 2 else ""
                after = answered.split(f"{_S0}1{_S1}")[-1] if f"{_S0}1{_S1}" in answered else ""
                closing = self._special_re.search(after) if self._special_re else None
                end = after[: closing.end()] if closing else (after.rstrip() or None)
            except ConfigError:
                pass
            self._markers = (prompts, end, user_closing)
        return self._markers

    def render(self, turns: Chat | Sequence[Any]) -> Rendered:
        """The document and its spans. Where the message text lies is found structurally: the
        template is rendered again with a sentinel for every run of message text (tags such
        as <think> and edge whitespace kept), and the real rendering is walked against it."""
        chat = as_chat(turns)
        filled = self._render_filled(chat)
        occurrences: list[tuple[int, int, int, bool]] | None
        if filled is not None:
            entry, values = filled
            if isinstance(entry.plan, _Plan):
                return entry.plan.apply(values)
            text, generated, occurrences = entry.fill(values)
            rendered = self._spans(chat, text, generated, occurrences)
            if entry.plan is None:
                plan = _Plan.derive(entry, values, rendered, self.bos_token, self.eos_token)
                entry.plan = plan if plan is not None else False
                if plan is not None:
                    return plan.apply(values)  # the same document, with its literals
            return rendered
        else:
            try:
                text, generated = self._render(chat.messages, chat.tools, generation=self.has_generation)
            except ConfigError:
                flat = _joined_text_parts(chat.messages)
                if flat is None:
                    raise
                # a template that renders string content only (transformers fails there): text parts joined
                chat = Chat(flat, chat.tools, chat.instruction, chat.input)
                text, generated = self._render(chat.messages, chat.tools, generation=self.has_generation)
            occurrences = self._locate(text, chat)
        return self._spans(chat, text, generated, occurrences)

    def _spans(
        self,
        chat: Chat,
        text: str,
        generated: list[Span],
        occurrences: list[tuple[int, int, int, bool]] | None,
    ) -> Rendered:
        """The document from its rendering, its generation spans and its runs of message text."""
        messages = chat.messages
        if occurrences is None:
            if not self.has_generation:
                raise ConfigError(self._unaligned_message(chat))
            occurrences = []
        runs_of: dict[int, list[tuple[int, int, bool]]] = {}
        for start, end, message, reasoning in occurrences:
            runs_of.setdefault(message, []).append((start, end, reasoning))
        targets = [i for i, m in enumerate(messages) if trains(m)]
        if self.reasoning == "rendered":
            targets = [i for i in targets if not self._dropped_reasoning(messages[i], runs_of.get(i, []))]
        if self.has_generation:
            trained = self._generation_spans(generated, messages, runs_of, targets)
        else:
            trained = self._regions(text, occurrences, targets)
        if not trained and not any(m.get("role") == "assistant" for m in messages):
            raise ConfigError("the chat template does not render any assistant message")
        if self.reasoning == "mask":
            holes = []
            for i in targets:
                start, end = self._reasoning_span(runs_of.get(i, []))
                if end > start:
                    # the opening <think> before it, where no other text lies in between
                    previous = max((e for s, e, _, _ in occurrences if e <= start), default=0)
                    opening = text.rfind(_THINK_OPEN, previous, start)
                    holes.append((opening if opening >= 0 else start, end))
            trained = _subtract(trained, holes)
        content = [(s, e) for s, e, _, _ in occurrences]
        return self._finish(text, trained, content)

    def _render_filled(self, chat: Chat) -> tuple[_Filled, list[str]] | None:
        """The fast path: the skeleton of the conversation's shape and the text to fill it
        with (`_Filled.fill` gives the rendering, without rendering it). Exact where
        `content_is_verbatim` proved that the template only outputs message text (verbatim or
        trimmed, never looked at): both renderings then take the same path and differ only in
        the text standing at the sentinels. Taken for plain conversations
        (role and non-blank string content, no tools); None elsewhere (render as usual)."""
        if not self._verbatim or chat.tools is not None:
            return None
        runs = _Runs()
        mark = runs.mark
        shape = []
        for i, m in enumerate(chat.messages):
            content = m.get("content")
            # blank text: its whole value is one run, which trim would not give back
            if len(m) != 2 or "role" not in m or type(content) is not str or not content.strip():
                return None
            shape.append((m["role"], mark(content, i, False)))
        key = tuple(shape)
        if key in self._filled:
            entry = self._filled[key]
        else:
            marked = [{"role": role, "content": content} for role, content in key]
            try:
                entry = _Filled(*self._render(marked, None, generation=self.has_generation))
            except (ConfigError, _Unaligned):
                entry = None  # the general path renders it and reports the error
            if len(self._filled) >= 4096:
                self._filled.clear()
            self._filled[key] = entry
        if entry is None:
            return None
        items = runs.items
        if entry.owners is None:  # the runs' messages: a function of the shape (the key) too
            if entry.ids and max(entry.ids) >= len(items):
                return None
            entry.owners = ([items[r][0] for r in entry.ids], [items[r][1] for r in entry.ids])
        return entry, [items[r][2] for r in entry.ids]

    def plain(
        self, messages: list[Any], role_key: str = "role", text_key: str = "content"
    ) -> tuple[_Plan, list[str]] | None:
        """The shape plan and the message text (in the plan's order) that `render` would apply
        to these raw messages, found without building the conversation: for plain messages
        (a role and non-blank string content alone, no think tag) of a shape with a plan;
        None otherwise (render the record). The shape is what `_render_filled` keys its
        skeletons by: the roles, and each content's edge whitespace."""
        if not self._verbatim or role_key == text_key:
            return None
        key: list[Any] = []
        cores: list[str] = []
        for m in messages:
            if type(m) is not dict or len(m) != 2:
                return None
            role, content = m.get(role_key), m.get(text_key)
            if type(content) is not str or type(role) is not str:
                return None
            core = content.strip()
            if not core or "think>" in core:
                return None
            if len(core) == len(content):
                key.append(role)
            else:
                at = len(content) - len(content.lstrip())
                key.append((role, content[:at], content[at + len(core) :]))
            cores.append(core)
        shape = tuple(key)
        try:
            found = self._plans[shape]
        except KeyError:  # (a lookup, then a read, could miss an entry another thread cleared)
            if len(self._plans) >= 4096:
                self._plans.clear()
            found = self._plans[shape] = self._plan_of(
                [{"role": m[role_key], "content": m[text_key]} for m in messages]
            )
        if found is None:
            return None
        plan, order = found
        return plan, cores if order is None else [cores[r] for r in order]

    def _plan_of(self, messages: list[Message]) -> tuple[_Plan, list[int] | None] | None:
        """The plan of a plain conversation's shape, derived and checked on it by `render`,
        and the order its runs take the messages' text (None: message order)."""
        roles = [m["role"] for m in messages]
        if "assistant" not in roles or any(r not in ROLES for r in roles):
            return None  # `Schema.turns` reports it
        chat = Chat(messages)
        try:
            self.render(chat)
        except ConfigError:
            return None  # the record's own rendering reports it
        filled = self._render_filled(chat)
        if filled is None or not isinstance(filled[0].plan, _Plan):
            return None
        ids = filled[0].ids
        return filled[0].plan, None if ids == list(range(len(messages))) else ids

    def _locate(self, text: str, chat: Chat) -> list[tuple[int, int, int, bool]] | None:
        """(start, end, message, is reasoning) of every rendered run of message text, or None
        where the rendering depends on the text beyond what sentinels can stand in for. The
        skeleton is a function of the marked conversation alone: cached by it (conversations
        share a few shapes), so a record costs one rendering, its own."""
        for assistants_only in (False, True):
            runs = _Runs()
            marked = [
                _mark_message(runs, m, i) if not assistants_only or m.get("role") == "assistant" else m
                for i, m in enumerate(chat.messages)
            ]
            key = _freeze(marked, chat.tools)
            skeleton = self._skeletons.get(key) if key is not None else None
            try:
                if skeleton is None:
                    skeleton = _split_skeleton(self._render(marked, chat.tools)[0])
                    if key is not None:
                        if len(self._skeletons) >= 4096:
                            self._skeletons.clear()
                        self._skeletons[key] = skeleton
                found = _align(text, skeleton, runs)
            except (ConfigError, _Unaligned):
                continue
            return [(s, e, runs.items[r][0], runs.items[r][1]) for s, e, r in found]
        return None

    def _unaligned_message(self, chat: Chat) -> str:
        """Name the first assistant message whose text changes the template's output beyond
        what can be followed."""
        for i, m in enumerate(chat.messages):
            if m.get("role") != "assistant":
                continue
            runs = _Runs()
            marked = [_mark_message(runs, x, j) if j == i else x for j, x in enumerate(chat.messages)]
            try:
                text = self._render(chat.messages, chat.tools)[0]
                _align(text, _split_skeleton(self._render(marked, chat.tools)[0]), runs)
            except (ConfigError, _Unaligned):
                return (
                    f"the chat template renders {_where(i)} differently depending on its text, so which "
                    "characters are the response cannot be told; add {% generation %} markers around the "
                    "assistant output in the template (as TRL's *_training.jinja templates do) or use "
                    "train_on_prompt"
                )
        return (
            "the chat template renders the conversation differently depending on the message text; add "
            "{% generation %} markers around the assistant output in the template"
        )

    @staticmethod
    def _dropped_reasoning(message: Message, runs: list[tuple[int, int, bool]]) -> bool:
        """Whether the message carries reasoning that the template did not render (an empty
        think block, Qwen3's non-thinking output, carries none)."""
        has = any(isinstance(message.get(k), str) and message[k].strip() for k in _REASONING_FIELDS)
        content = message.get("content")
        if not has and isinstance(content, str) and _THINK_CLOSE in content:
            has = bool(content.split(_THINK_CLOSE)[0].replace(_THINK_OPEN, "").strip())
        return has and not any(reasoning for _, _, reasoning in runs)

    @staticmethod
    def _reasoning_span(runs: list[tuple[int, int, bool]]) -> Span:
        """From the message's first reasoning run to where its answer starts (or its last
        reasoning run ends): the reasoning block with its tags."""
        reasoning = [(s, e) for s, e, r in runs if r]
        if not reasoning:
            return (0, 0)
        start, last = reasoning[0][0], max(e for _, e in reasoning)
        answers = [s for s, _, r in runs if not r and s >= last]
        return (start, min(answers) if answers else last)

    def _generation_spans(
        self,
        generated: list[Span],
        messages: list[Message],
        runs_of: dict[int, list[tuple[int, int, bool]]],
        targets: list[int],
    ) -> list[Span]:
        """The `{% generation %}` spans of the trained messages: spans are matched to messages
        by the message text they hold (all of them where every assistant message trains)."""
        spans = [s for s in generated if s[1] > s[0]]
        assistants = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if targets == assistants and not self.last_turn_only:
            return spans
        owned: list[Span] = []
        for i in targets:
            runs = runs_of.get(i)
            if runs is None:
                raise ConfigError(
                    f"{_where(i)}: cannot tell which {{% generation %}} block holds it (for weight, train, "
                    "last_turn_only or reasoning='rendered'); its text is not found in the rendering"
                )
            owned += [s for s in spans if any(s[0] <= a and b <= s[1] for a, b, _ in runs)]
        owned = sorted(set(owned))
        return owned[-1:] if self.last_turn_only else owned

    def _regions(
        self,
        text: str,
        occurrences: list[tuple[int, int, int, bool]],
        targets: list[int],
    ) -> list[Span]:
        """Each trained message from where the model's output starts (after the generation
        prompt; templates without one, such as Mistral's: after what closes the turn before,
        so that "[TOOL_CALLS]" is the assistant's) to the end-of-turn token after its last
        run of text. A message none of whose text is rendered (empty content, a bare
        `<think></think>`, tool calls the template drops) is found between its neighbours:
        its turn is trained as transformers' generation masks train it, down to its end of
        turn (the model must learn to stop)."""
        prompts, end_marker, closing = self._turn_markers()
        trained: list[Span] = []
        # occurrences come in text order: a message's first and last, and its neighbours
        first_at: dict[int, int] = {}
        last_at: dict[int, int] = {}
        for k, occurrence in enumerate(occurrences):
            first_at.setdefault(occurrence[2], k)
            last_at[occurrence[2]] = k
        for i in targets[-1:] if self.last_turn_only else targets:
            a = first_at.get(i)
            if a is None:
                span = self._runless_region(text, occurrences, i, prompts, end_marker, closing)
                if span is not None:
                    trained.append(span)
                continue
            b = last_at[i]
            first, last = occurrences[a][0], occurrences[b][1]
            before = occurrences[a - 1][1] if a else 0
            after = occurrences[b + 1][0] if b + 1 < len(occurrences) else len(text)
            start = self._output_start(text, before, first, prompts, closing, backwards=True)
            end = self._turn_end(text, last, after, end_marker)
            if end > start:
                trained.append((start, end))
        return trained

    def _output_start(
        self, text: str, before: int, limit: int, prompts: list[str], closing: str, backwards: bool
    ) -> int:
        """Where the model's output starts in text[before:limit]: after the generation prompt,
        or (templates without one) after what stands between a user's text and the
        assistant's, else after the first special token that closes the previous turn (a
        tool result's) and the assistant header after it; `limit` where none is."""
        find = text.rfind if backwards else text.find
        for g in prompts:
            at = find(g, before, limit)
            if at >= 0:
                return at + len(g)
        if prompts or not before:
            return limit
        if closing:
            at = find(closing, before, limit)
            if at >= 0:
                return at + len(closing)
        m = self._special_re.search(text, before, limit) if self._special_re is not None else None
        if m is None:
            return limit
        # an assistant header after the special token (as after a user turn's): the prompt's
        header = self._special_re.search(closing) if closing and self._special_re is not None else None
        rest = closing[header.end() :] if header else ""
        return m.end() + len(rest) if rest and text.startswith(rest, m.end()) else m.end()

    def _turn_end(self, text: str, last: int, after: int, end_marker: str | None) -> int:
        """The end of the end-of-turn token after `last` (before `after`); `last` if none."""
        at = text.find(end_marker, last, after) if end_marker else -1
        if at >= 0:
            return at + len(end_marker)  # type: ignore[arg-type]
        if self._special_re is not None:
            m = self._special_re.search(text, last, after)
            if m:
                return m.end()
        return last

    def _runless_region(
        self,
        text: str,
        occurrences: list[tuple[int, int, int, bool]],
        i: int,
        prompts: list[str],
        end_marker: str | None,
        closing: str,
    ) -> Span | None:
        """The turn of message i, none of whose text is rendered: between the text of the
        messages just before and after it, from where the output starts to the end of turn.
        None where that cannot be told (a neighbour has no text of its own, or the template
        renders messages out of order)."""
        before = max((e for _, e, owner, _ in occurrences if owner < i), default=0)
        after = min((s for s, _, owner, _ in occurrences if owner > i), default=len(text))
        previous = max((owner for _, _, owner, _ in occurrences if owner < i), default=-1)
        following = min((owner for _, _, owner, _ in occurrences if owner > i), default=-1)
        if previous != i - 1 or following not in (i + 1, -1) or after < before:
            return None
        start = self._output_start(text, before, after, prompts, closing, backwards=False)
        if start >= after:
            return None
        end = self._turn_end(text, start, after, end_marker)
        return (start, end) if end > start else None

    def _finish(self, text: str, trained: list[Span], content: list[Span]) -> Rendered:
        """Cut the leading BOS string, and for a tokenizer without BOS a trailing EOS string
        with the whitespace after it: documents are joined by the EOS alone there, which then
        stands for the template's (trained when the cut one was), so no end of turn doubles.
        With a BOS the reference's "EOS BOS" boundary is kept as it is."""
        shift = 0
        if self.bos_token and text.startswith(self.bos_token):
            shift = len(self.bos_token)
            text = text[shift:]
        train_eos = False
        cut = len(text)
        if self.eos_token and not self.bos_token:
            stripped = text.rstrip()
            if stripped.endswith(self.eos_token):
                cut = len(stripped) - len(self.eos_token)
                at = cut + shift
                train_eos = any(s <= at < e for s, e in trained)
                text = text[:cut]

        # spans in the cut text's coordinates (content spans may be empty: an empty message)
        kept = tuple(
            (max(s - shift, 0), min(e - shift, cut)) for s, e in sorted(trained) if min(e - shift, cut) > s - shift
        )
        spans = tuple((max(s - shift, 0), min(e - shift, cut)) for s, e in content if s - shift <= cut)
        return Rendered(text, tuple(x for x in kept if x[1] > x[0]), spans, train_eos)


def _freeze(messages: list[Message], tools: Any) -> Any:
    """A hashable key for a marked conversation: message items as tuples where the values
    are plain, else the JSON text; None where it cannot be had."""
    out: list[Any] = []
    for m in messages:
        items = tuple(m.items())
        if all(type(v) in (str, int, bool, float) for _, v in items):
            out.append(items)
        else:
            try:
                out.append(json.dumps(m, sort_keys=True))
            except (TypeError, ValueError):
                return None
    if tools is not None:
        try:
            out.append(json.dumps(tools, sort_keys=True))
        except (TypeError, ValueError):
            return None
    return tuple(out)


def _joined_text_parts(messages: list[Message]) -> list[Message] | None:
    """The messages with list content made of text parts only joined into strings (None if
    there is none such, or a part is not text)."""
    lists = [m for m in messages if isinstance(m.get("content"), list)]
    if not lists or any(p.get("type") != "text" for m in lists for p in m["content"]):
        return None
    return [
        {**m, "content": "".join(p["text"] for p in m["content"])} if isinstance(m.get("content"), list) else m
        for m in messages
    ]


def _subtract(spans: list[Span], holes: list[Span]) -> list[Span]:
    out = []
    for s, e in spans:
        pieces = [(s, e)]
        for hs, he in holes:
            if he <= hs:
                continue
            pieces = [p for a, b in pieces for p in ((a, min(b, hs)), (max(a, he), b)) if p[1] > p[0]]
        out += pieces
    return out


def _describe(exc: BaseException) -> str:
    """`Type: message` on one line (a template's bug is shown, not a traceback)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


Template = PromptTemplate | StanfordAlpacaTemplate | ChatTemplate
NAMED = ("alpaca", "stanford_alpaca", "chat")


# what sftpack passes a chat template itself, or defines for it: not to be given again
_RESERVED_ARGS = (
    "messages",
    "tools",
    "documents",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
    "raise_exception",
    "strftime_now",
)


def check_template_args(args: Any) -> None:
    """Chat template variables (`template_args`): a mapping of names to JSON values (they are
    recorded in the manifest), none of them one sftpack passes itself."""
    if not isinstance(args, Mapping):
        raise ConfigError(f"template_args must be a mapping of names to values, got {_type(args)}")
    for name, value in args.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"template_args: {name!r} is not a variable name")
        if name in _RESERVED_ARGS:
            raise ConfigError(
                f"template_args: {name!r} is passed by sftpack itself (from the data and the tokenizer); "
                "it cannot be given"
            )
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise ConfigError(
                f"template_args: the value of {name!r} must be JSON (text, a number, true/false, null, a list "
                f"or an object), got {_type(value)}"
            ) from None


def make_template(
    spec: str,
    *,
    chat_template: str | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    special_tokens: Sequence[str] = (),
    last_turn_only: bool = False,
    reasoning: str = "train",
    template_args: Mapping[str, Any] | None = None,
) -> Template:
    """Resolve `template=`: "alpaca", "stanford_alpaca", "chat", a template string, or a path
    to a template file. `template_args`: variables for a chat template (its `**kwargs`)."""
    if spec in ("alpaca", "stanford_alpaca"):
        return _prompt_template(
            PromptTemplate(ALPACA_TEMPLATE) if spec == "alpaca" else StanfordAlpacaTemplate(), template_args
        )
    if spec == "chat":
        if not chat_template:
            raise ConfigError(
                "template='chat' needs a tokenizer with a chat template (the bundled 'llama3' has one); "
                "pass a template string or file instead"
            )
        source = chat_template
    elif "{" not in spec and os.path.isfile(spec):
        try:
            with open(spec, encoding="utf-8") as f:
                source = f.read()
        except UnicodeDecodeError as exc:
            raise ConfigError(f"template file {spec!r} is not UTF-8 (byte {exc.start}): save it as UTF-8") from None
        except OSError as exc:
            raise ConfigError(f"cannot read template file {spec!r}: {exc.strerror or exc}") from None
    elif "{" in spec:
        source = spec
    else:
        raise ConfigError(
            f"template={spec!r} is not 'alpaca', 'stanford_alpaca', 'chat', a template string with "
            "{prompt}/{response} placeholders, or an existing template file"
        )
    if "{%" in source or "{{" in source:
        return ChatTemplate(
            source,
            bos_token=bos_token,
            eos_token=eos_token,
            special_tokens=special_tokens,
            last_turn_only=last_turn_only,
            reasoning=reasoning,
            template_args=template_args,
        )
    return _prompt_template(PromptTemplate(source), template_args)


def _prompt_template(template: Template, template_args: Mapping[str, Any] | None) -> Template:
    if template_args:
        raise ConfigError(
            "template_args are variables of a Jinja chat template; this template is a prompt template (placeholders)"
        )
    return template
