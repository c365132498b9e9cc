"""A proof, from a chat template's Jinja syntax tree, that message text only flows to the output.

The chat fast path renders a conversation's skeleton (its message text replaced by
sentinels) once per conversation shape and fills it with each record's text, instead of
rendering every record. That is exact only when the template never looks at the text:
no branch, loop, comparison, length, method or filter other than `trim` may see it, and
the text (or a concatenation holding it) may only be output, concatenated, trimmed or
stored in a variable that is itself held to the same rules. `content_is_verbatim` checks
this conservatively: every construct it does not know makes the answer False (the
template then takes the general path, which renders each record).

Values are classified as PLAIN (cannot hold message text), MESSAGES (the message list or
a slice of it), MESSAGE (one message dict) or CONTENT (may hold message text). Any access
`x['content']` / `x.content` is CONTENT whatever `x` is.
"""

from __future__ import annotations

from typing import Any

PLAIN, CONTENT, MESSAGE, MESSAGES = "plain", "content", "message", "messages"

# tests that look at a value's type only (message text is a string in both renderings)
_TYPE_TESTS = frozenset({"defined", "undefined", "none", "string", "mapping", "sequence", "iterable", "number"})
_DICT_ATTRS = frozenset(dir(dict))
# the loop variable's attributes that hand out items of the sequence looped over
_LOOP_ITEMS = frozenset({"previtem", "nextitem", "cycle", "changed"})


class _Refused(Exception):
    """The template does something the proof does not cover."""


def content_is_verbatim(template_ast: Any) -> bool:
    """Whether message text only reaches the output verbatim or trimmed (see the module
    docstring); `template_ast` is `jinja2.Environment.parse`'s result."""
    bindings: dict[str, str] = {"messages": MESSAGES}
    try:
        for _ in range(8):  # to a fixed point: a name may be used before (above) its assignment
            before = dict(bindings)
            _Checker(bindings).statements(template_ast.body)
            if bindings == before:
                return True
    except _Refused:
        return False
    return False


def _merge(a: str, b: str) -> str:
    if a == b:
        return a
    if {a, b} == {PLAIN, CONTENT}:
        return CONTENT  # CONTENT's rules are the stricter
    raise _Refused


class _Checker:
    def __init__(self, bindings: dict[str, str]) -> None:
        self.bindings = bindings

    def bind(self, name: str, kind: str) -> None:
        self.bindings[name] = _merge(self.bindings.get(name, kind), kind)

    # ------------------------------------------------------------ statements

    def statements(self, body: list[Any]) -> None:
        for node in body:
            self.statement(node)

    def statement(self, node: Any) -> None:
        from jinja2 import nodes

        if isinstance(node, nodes.Output):
            for child in node.nodes:
                if isinstance(child, nodes.TemplateData):
                    continue
                if self.kind(child) not in (PLAIN, CONTENT):
                    raise _Refused  # a message dict rendered as text
        elif isinstance(node, nodes.Assign):
            kind = self.kind(node.node)
            if isinstance(node.target, nodes.Name):
                self.bind(node.target.name, kind)
            elif kind != PLAIN:
                raise _Refused  # tuple unpacking or namespace attributes of message values
            elif isinstance(node.target, nodes.Tuple):
                for item in node.target.items:
                    if not isinstance(item, nodes.Name):
                        raise _Refused
                    self.bind(item.name, PLAIN)
            elif not isinstance(node.target, nodes.NSRef):
                raise _Refused
        elif isinstance(node, nodes.If):
            self.plain(node.test)
            self.statements(node.body)
            for branch in node.elif_:
                self.statement(branch)
            self.statements(node.else_)
        elif isinstance(node, nodes.For):
            if node.recursive or not isinstance(node.target, (nodes.Name, nodes.Tuple)):
                raise _Refused
            kind = self.kind(node.iter)
            if isinstance(node.target, nodes.Name) and kind == MESSAGES:
                self.bind(node.target.name, MESSAGE)
            elif kind == PLAIN:
                names = node.target.items if isinstance(node.target, nodes.Tuple) else [node.target]
                for name in names:
                    if not isinstance(name, nodes.Name):
                        raise _Refused
                    self.bind(name.name, PLAIN)
            else:
                raise _Refused
            if node.test is not None:
                self.plain(node.test)
            self.statements(node.body)
            self.statements(node.else_)
        elif isinstance(node, nodes.CallBlock):
            call = node.call
            # only sftpack's {% generation %} block (it records where its output lies)
            if not (
                isinstance(call, nodes.Call)
                and isinstance(call.node, nodes.ExtensionAttribute)
                and call.node.name == "_generation"
                and not call.args
                and not call.kwargs
                and call.dyn_args is None
                and call.dyn_kwargs is None
                and not node.args
            ):
                raise _Refused
            self.statements(node.body)
        elif isinstance(node, (nodes.Continue, nodes.Break)):
            pass
        else:
            raise _Refused  # macros, includes, blocks, filter blocks, {% set %} blocks, ...

    # ------------------------------------------------------------ expressions

    def plain(self, node: Any) -> None:
        if self.kind(node) != PLAIN:
            raise _Refused

    def kind(self, node: Any) -> str:  # noqa: C901 (one branch per node type)
        from jinja2 import nodes

        if isinstance(node, (nodes.Const, nodes.TemplateData)):
            return PLAIN
        if isinstance(node, nodes.Name):
            if node.name == "loop":
                raise _Refused  # the loop object hands out the items looped over (previtem, ...)
            return self.bindings.get(node.name, PLAIN)
        if isinstance(node, (nodes.Getattr, nodes.Getitem)):
            key = node.attr if isinstance(node, nodes.Getattr) else node.arg
            if isinstance(key, nodes.Const):
                key = key.value
            if key == "content":
                self.kind(node.node)  # whatever holds it must itself pass
                return CONTENT
            if isinstance(node.node, nodes.Name) and node.node.name == "loop":
                if not isinstance(key, str) or key in _LOOP_ITEMS:
                    raise _Refused
                return PLAIN  # index0, first, last, length, ...
            base = self.kind(node.node)
            if base == MESSAGES:
                if isinstance(key, nodes.Slice):
                    for part in (key.start, key.stop, key.step):
                        if part is not None:
                            self.plain(part)
                    return MESSAGES
                if isinstance(key, str) or isinstance(node, nodes.Getattr):
                    raise _Refused  # a list's method
                if isinstance(key, nodes.Node):
                    self.plain(key)
                return MESSAGE
            if base == MESSAGE:
                if not isinstance(key, str) or key in _DICT_ATTRS:
                    raise _Refused  # computed keys, .get(), .items(), ...
                return PLAIN  # another field: not message text
            if base == CONTENT:
                raise _Refused  # indexing, slicing or a method of the text
            if isinstance(key, nodes.Node):
                self.plain(key)
            return PLAIN
        if isinstance(node, nodes.Filter):
            if node.node is None or node.dyn_args is not None or node.dyn_kwargs is not None:
                raise _Refused
            base = self.kind(node.node)
            if base == CONTENT:
                if node.name != "trim" or node.args or node.kwargs:
                    raise _Refused
                return CONTENT
            if base == MESSAGES and node.name in ("first", "last") and not node.args and not node.kwargs:
                return MESSAGE
            if base in (MESSAGES, MESSAGE) and node.name not in ("length", "count"):
                raise _Refused
            self.arguments(node)
            return PLAIN
        if isinstance(node, nodes.Test):
            base = self.kind(node.node)
            if base != PLAIN and (node.name not in _TYPE_TESTS or node.args or node.kwargs):
                raise _Refused
            self.arguments(node)
            return PLAIN
        if isinstance(node, (nodes.Add, nodes.Concat)):
            operands = [node.left, node.right] if isinstance(node, nodes.Add) else node.nodes
            kinds = {self.kind(x) for x in operands}
            if not kinds <= {PLAIN, CONTENT}:
                raise _Refused
            return CONTENT if CONTENT in kinds else PLAIN
        if isinstance(node, nodes.CondExpr):
            self.plain(node.test)
            kinds = {self.kind(x) for x in (node.expr1, node.expr2) if x is not None}
            if len(kinds) == 1:
                return kinds.pop()
            return _merge(*kinds)
        if isinstance(node, nodes.Call):
            if node.dyn_args is not None or node.dyn_kwargs is not None:
                raise _Refused
            if isinstance(node.node, nodes.Name) and node.node.name == "strftime_now":
                raise _Refused  # today's date: not a function of the conversation shape
            self.plain(node.node)
            self.arguments(node)
            return PLAIN
        if isinstance(node, nodes.Compare):
            self.plain(node.expr)
            for op in node.ops:
                self.plain(op.expr)
            return PLAIN
        if isinstance(node, (nodes.BinExpr,)):
            self.plain(node.left)
            self.plain(node.right)
            return PLAIN
        if isinstance(node, nodes.UnaryExpr):
            self.plain(node.node)
            return PLAIN
        if isinstance(node, (nodes.List, nodes.Tuple)):
            for item in node.items:
                self.plain(item)
            return PLAIN
        if isinstance(node, nodes.Dict):
            for pair in node.items:
                self.plain(pair.key)
                self.plain(pair.value)
            return PLAIN
        raise _Refused

    def arguments(self, node: Any) -> None:
        for arg in node.args:
            self.plain(arg)
        for keyword in node.kwargs:
            self.plain(keyword.value)
