"""Records -> rendered text plus the character spans that are trained.

Two stages, both pure: a *schema* turns a record into turns `[(role, content)]`, and a
*template* renders turns into one document string, reporting which character spans are
response text (trained when `train_on_prompt=False`) and which are user content (where a
special-token string is an injection, not markup).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import xxhash

from .errors import ConfigError
from .records import Record

Turns = list[tuple[str, str]]
Span = tuple[int, int]

SCHEMAS = ("auto", "prompt_response", "alpaca", "messages", "sharegpt")
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
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

    __slots__ = ("text", "trained", "content", "train_eos")

    def __init__(self, text: str, trained: tuple[Span, ...], content: tuple[Span, ...], train_eos: bool) -> None:
        self.text, self.trained, self.content, self.train_eos = text, trained, content, train_eos


# --------------------------------------------------------------------------- schemas


class Schema:
    """Reads turns out of records of one schema, with remappable field names."""

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

    def turns(self, record: Record, schema: str) -> Turns:
        f = self.fields
        if schema == "prompt_response":
            return [("user", _text(record, f["prompt"])), ("assistant", _text(record, f["response"]))]
        if schema == "alpaca":
            prompt = _text(record, f["instruction"])
            extra = record.data.get(f["input"])
            if extra is not None:
                if not isinstance(extra, str):
                    raise record.error(f"field {f['input']!r} must be a string, got {type(extra).__name__}")
                if extra:
                    prompt = f"{prompt}\n\n{extra}"
            return [("user", prompt), ("assistant", _text(record, f["output"]))]
        if schema == "messages":
            return _conversation(record, f["messages"], f["role"], f["content"], {r: r for r in ROLES})
        return _conversation(record, f["conversations"], f["from"], f["value"], _SHAREGPT_ROLES)


def _text(record: Record, key: str) -> str:
    try:
        value = record.data[key]
    except KeyError:
        raise record.error(f"field {key!r} is missing") from None
    if not isinstance(value, str):
        raise record.error(f"field {key!r} must be a string, got {_type(value)}")
    return value


def _conversation(record: Record, key: str, role_key: str, text_key: str, roles: Mapping[str, str]) -> Turns:
    try:
        items = record.data[key]
    except KeyError:
        raise record.error(f"field {key!r} is missing") from None
    if not isinstance(items, list):
        raise record.error(f"field {key!r} must be a list of turns, got {_type(items)}")
    if not items:
        raise record.error(f"field {key!r} is an empty conversation")
    turns: Turns = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise record.error(f"{key}[{i}] must be an object, got {_type(item)}")
        role, text = item.get(role_key), item.get(text_key)
        if role not in roles:
            raise record.error(f"{key}[{i}].{role_key} is {role!r}; valid roles: {', '.join(roles)}")
        if not isinstance(text, str):
            raise record.error(f"{key}[{i}].{text_key} must be a string, got {_type(text)}")
        turns.append((roles[str(role)], text))
    if not any(role == "assistant" for role, _ in turns):
        raise record.error(f"field {key!r} has no assistant turn: nothing to train on")
    return turns


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# --------------------------------------------------------------------------- templates


class PromptTemplate:
    """A string with `{prompt}` (or `{instruction}`) and `{response}` placeholders.

    Substitution is a single pass: braces inside the content come out verbatim, and any
    other brace in the template is literal text.
    """

    _PLACEHOLDER = re.compile(r"\{(prompt|instruction|response|system)\}")

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
        return "prompt:" + xxhash.xxh3_64_hexdigest(self.source.encode())

    def render(self, turns: Turns) -> Rendered:
        if self._simple and len(turns) == 2 and turns[0][0] == "user" and turns[1][0] == "assistant":
            # the common case, without the general loop
            lit = self.literals
            prompt, response = turns[0][1], turns[1][1]
            p0 = len(lit[0])
            r0 = p0 + len(prompt) + len(lit[1])
            r1 = r0 + len(response)
            text = "".join((lit[0], prompt, lit[1], response, lit[2]))
            return Rendered(text, ((r0, r1),), ((p0, p0 + len(prompt)), (r0, r1)), True)
        values: dict[str, str] = {}
        for role, text in turns:
            slot = {"user": "prompt", "assistant": "response", "system": "system"}[role]
            if slot in values:
                raise ConfigError(
                    f"a prompt/response template takes one {role} turn; use template='chat' for multi-turn data"
                )
            values[slot] = text
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
            if slot == "response":
                trained.append(span)
            out.append(value)
            out.append(literal)
            pos += len(value) + len(literal)
        return Rendered("".join(out), tuple(trained), tuple(content), True)


@lru_cache(maxsize=1)
def _sandbox() -> Any:
    """The environment chat templates render in: Jinja's immutable sandbox, configured as
    transformers configures it, with the sandbox's attribute verdicts cached (they depend
    only on the object's type and the attribute name)."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        _verdicts: dict[tuple[type, str], bool] = {}

        def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
            key = (type(obj), attr)
            verdict = self._verdicts.get(key)
            if verdict is None:
                verdict = self._verdicts[key] = super().is_safe_attribute(obj, attr, value)
            return verdict

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env


class ChatTemplate:
    """A Jinja chat template (Hugging Face convention), rendered in a sandbox.

    Trained spans are each assistant message's content plus the special-token string
    that directly follows it (the end-of-turn marker, so the model learns to stop).
    A leading BOS string is removed: the packer inserts BOS itself.
    """

    def __init__(
        self,
        source: str,
        *,
        bos_token: str | None,
        eos_token: str | None,
        special_tokens: Sequence[str] = (),
        last_turn_only: bool = False,
    ) -> None:
        from jinja2.exceptions import TemplateError

        env = _sandbox()
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise ConfigError(f"the chat template does not parse: {exc}") from None
        except Exception as exc:  # RecursionError on absurd nesting, ...
            raise ConfigError(f"the chat template does not parse: {_describe(exc)}") from None
        self.source = source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self.last_turn_only = last_turn_only
        self._specials = sorted((s for s in special_tokens if s), key=len, reverse=True)
        self._marked_cache: dict[tuple[str, ...], tuple[str, list[str], list[tuple[int, int]]]] = {}

    def fingerprint(self) -> str:
        return f"chat:{xxhash.xxh3_64_hexdigest(self.source.encode())}:{self.last_turn_only}"

    def _render(self, turns: Turns) -> str:
        from jinja2.exceptions import TemplateError

        messages = [{"role": role, "content": text} for role, text in turns]
        try:
            text = self._template.render(
                messages=messages, bos_token=self.bos_token, eos_token=self.eos_token, add_generation_prompt=False
            )
        except TemplateError as exc:
            raise ConfigError(f"the chat template failed: {exc}") from None
        except Exception as exc:  # the template's own bug: {{ 1/0 }}, endless macro recursion, {% include %}
            raise ConfigError(f"the chat template failed: {_describe(exc)}") from None
        if self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token) :]
        return text

    def _marked(self, roles: tuple[str, ...]) -> tuple[str, list[str], list[tuple[int, int]]]:
        """The template rendered with a marker as every content (cached per role sequence:
        conversations mostly share a few shapes), and the markers' (position, turn) in order."""
        cached = self._marked_cache.get(roles)
        if cached is None:
            markers = [f"\ue000{i}\ue001" for i in range(len(roles))]
            marked = self._render(list(zip(roles, markers)))
            found = sorted((marked.find(m), i) for i, m in enumerate(markers) if m in marked)
            cached = (marked, markers, found)
            if len(self._marked_cache) < 1024:
                self._marked_cache[roles] = cached
        return cached

    def render(self, turns: Turns) -> Rendered:
        # Where each turn's content lies is found structurally, not by searching for it: the
        # template is rendered once with a unique marker in place of every content, and the
        # real rendering is walked literal by literal against it.
        text = self._render(turns)
        marked, markers, found = self._marked(tuple(role for role, _ in turns))
        spans: dict[int, Span] = {}
        pos = mark_pos = 0
        for k, (at, i) in enumerate(found):
            literal = marked[mark_pos:at]
            if not text.startswith(literal, pos):
                raise ConfigError("the chat template renders differently depending on the message content")
            pos += len(literal)
            mark_pos = at + len(markers[i])
            following = marked[mark_pos : found[k + 1][0] if k + 1 < len(found) else len(marked)]
            value = turns[i][1]
            for candidate in (value, value.strip(), value.lstrip(), value.rstrip()):
                if text.startswith(candidate, pos) and text.startswith(following, pos + len(candidate)):
                    spans[i] = (pos, pos + len(candidate))
                    pos += len(candidate)
                    break
            else:
                raise ConfigError(
                    f"the chat template changed the content of turn {i} beyond trimming; "
                    "cannot tell which characters are response text"
                )
        if text[pos:] != marked[mark_pos:]:
            raise ConfigError("the chat template renders differently depending on the message content")
        assistants = [i for i, (role, _) in enumerate(turns) if role == "assistant" and i in spans]
        if not assistants:
            raise ConfigError("the chat template does not render any assistant message")
        trained: list[Span] = []
        for i in assistants[-1:] if self.last_turn_only else assistants:
            start, end = spans[i]
            for special in self._specials:
                if text.startswith(special, end):
                    end += len(special)
                    break
            trained.append((start, end))
        content = tuple(spans[i] for i in sorted(spans))
        return Rendered(text, tuple(trained), content, False)


def _describe(exc: BaseException) -> str:
    """`Type: message` on one line (a template's bug is shown, not a traceback)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


Template = PromptTemplate | ChatTemplate


def make_template(
    spec: str,
    *,
    chat_template: str | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    special_tokens: Sequence[str] = (),
    last_turn_only: bool = False,
) -> Template:
    """Resolve `template=`: "alpaca", "chat", a template string, or a path to a template file."""
    if spec == "alpaca":
        return PromptTemplate(ALPACA_TEMPLATE)
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
            f"template={spec!r} is not 'alpaca', 'chat', a template string with {{prompt}}/{{response}} "
            "placeholders, or an existing template file"
        )
    if "{%" in source or "{{" in source:
        return ChatTemplate(
            source,
            bos_token=bos_token,
            eos_token=eos_token,
            special_tokens=special_tokens,
            last_turn_only=last_turn_only,
        )
    return PromptTemplate(source)
