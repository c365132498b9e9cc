"""Typed options, written once: the API keywords, the CLI flags, the fingerprints and the
manifest all come from the fields below.

Three groups, by what a change costs (see ../shared/docs/design.md):
- `store`: decides token ids and masks. In the store's fingerprint; a change re-tokenizes.
- `plan`: decides which stored tokens make each row. Chosen when a dataset is opened;
  a change re-plans from document lengths, never re-tokenizes.
- `view`: decides how a row is served (extra keys, label masking). Free to change.
- `run`: decides how a build runs (`engine`, `ray_address`), never what it makes: in no
  fingerprint, not recorded in the manifest.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from .errors import ConfigError

PACKINGS = ("concat", "bfd")
OVERFLOWS = ("split", "truncate", "drop")
SPECIAL_TOKENS = ("parse", "text")
ENGINES = ("local", "ray")
MAX_SEQ_LENGTH = 1 << 24  # 16M tokens a row: far past any model; bfd plans and padded rows cost O(seq_length)


def _opt(
    group: str,
    help: str,
    default: Any = MISSING,
    *,
    flag: str | None = None,
    choices: tuple[str, ...] = (),
    factory: Any = MISSING,
) -> Any:
    meta = {"group": group, "help": help, "flag": flag, "choices": choices}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _is_int(value: Any) -> bool:
    import numpy as np

    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class BuildOptions:
    """Every option of a build and of the dataset it serves (see the module docstring for
    the three groups). `None` plan/view values mean "as recorded in the store" when a
    store is reopened with `open_packed`."""

    seq_length: int = _opt("plan", "tokens per row")
    packing: str = _opt(
        "plan",
        "concat: the reference's one stream cut into rows; bfd: whole documents, best-fit decreasing",
        "concat",
        choices=PACKINGS,
    )
    overflow: str = _opt(
        "plan", "bfd, documents longer than seq_length: split into pieces, truncate or drop", "split", choices=OVERFLOWS
    )
    pad: bool | None = _opt(
        "plan", "bfd rows padded to seq_length (default); --no-pad: their real length", None, flag="--no-pad"
    )
    shuffle: bool = _opt("plan", "shuffle documents before packing", False)
    seed: int | None = _opt("plan", "shuffle seed (default: a fresh one, recorded)", None)
    schema: str = _opt("store", "auto, prompt_response, alpaca, messages, sharegpt", "auto")
    fields: Mapping[str, str] = _opt("store", "rename a field: NAME=KEY", factory=dict, flag="--field")
    template: str = _opt("store", "alpaca, stanford_alpaca, chat, a template string or a template file", "alpaca")
    train_on_prompt: bool = _opt(
        "store",
        "train on every token (the reference); --no-train-on-prompt: response tokens only",
        True,
        flag="--no-train-on-prompt",
    )
    last_turn_only: bool = _opt("store", "train only the last assistant turn", False)
    reasoning: str = _opt(
        "store",
        "assistant reasoning (<think>, reasoning_content): train it (default), mask it, or 'rendered': train only "
        "the turns whose reasoning the template renders (Qwen3 and DeepSeek-R1 drop earlier turns' reasoning)",
        "train",
        choices=("train", "mask", "rendered"),
    )
    template_args: Mapping[str, Any] = _opt(
        "store",
        "a variable for the chat template, as apply_chat_template(**kwargs) passes it: NAME=VALUE, the value as "
        "JSON where it parses (enable_thinking=false), else as text",
        factory=dict,
        flag="--template-arg",
    )
    special_tokens: str = _opt(
        "store",
        "special-token strings in user text: parse them (reference) or keep them as text",
        "parse",
        choices=SPECIAL_TOKENS,
    )
    boundaries: bool = _opt("view", "rows carry position_ids and seq_lens", False)
    mask_cross_document: bool = _opt("view", "mask labels that cross into the next document", False)
    engine: str = _opt(
        "run",
        "local: this machine; ray: a Ray cluster (pip install sftpack[ray]), the same store",
        "local",
        choices=ENGINES,
    )
    ray_address: str | None = _opt(
        "run", "with --engine ray: the cluster to join (default: $RAY_ADDRESS, else a local Ray)", None
    )

    def validate(self) -> None:
        """Raise `ConfigError` naming the option and its valid values."""
        if not _is_int(self.seq_length) or not 1 <= self.seq_length <= MAX_SEQ_LENGTH:
            raise ConfigError(f"seq_length must be an integer from 1 to {MAX_SEQ_LENGTH:,}, got {self.seq_length!r}")
        for f in fields(self):
            value, choices = getattr(self, f.name), f.metadata["choices"]
            if choices and value not in choices:
                raise ConfigError(f"{f.name}={value!r} is not one of {', '.join(map(repr, choices))}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ConfigError(f"seed must be a non-negative integer or None, got {self.seed!r}")
        if self.pad is not None and not isinstance(self.pad, bool):
            raise ConfigError(f"pad must be True, False or None, got {self.pad!r}")
        for name in ("shuffle", "train_on_prompt", "last_turn_only", "boundaries", "mask_cross_document"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.ray_address is not None and (not isinstance(self.ray_address, str) or self.engine != "ray"):
            raise ConfigError(f"ray_address={self.ray_address!r} needs engine='ray' and a string address")
        from .templates import Schema, check_template_args

        Schema(self.schema, self.fields)
        check_template_args(self.template_args)

    def group(self, name: str) -> dict[str, Any]:
        """The options of one group as plain JSON values (for fingerprints and manifests)."""
        out = {}
        for f in fields(self):
            if f.metadata["group"] == name:
                value = getattr(self, f.name)
                if f.name == "template_args" and not value:
                    continue  # (absent, as in the stores built before the option: their fingerprints hold)
                out[f.name] = (
                    dict(sorted(value.items()))
                    if isinstance(value, Mapping)
                    else (int(value) if _is_int(value) else value)
                )
        return out


def resolve_seed(options: BuildOptions) -> BuildOptions:
    """A shuffle without a seed draws a fresh one (recorded); a seed without a shuffle means nothing."""
    if options.shuffle and options.seed is None:
        return replace(options, seed=secrets.randbits(63))
    if not options.shuffle and options.seed is not None:
        return replace(options, seed=None)
    return options


def make_options(**given: Any) -> BuildOptions:
    """`BuildOptions(**given)`, an unknown name being a `ConfigError` that lists the valid ones."""
    known = {f.name for f in fields(BuildOptions)}
    if set(given) - known:
        raise ConfigError(f"unknown option(s) {sorted(set(given) - known)}; the options are {sorted(known)}")
    return BuildOptions(**given)


def option_fields(group: str | None = None) -> list[Any]:
    """The dataclass fields of `BuildOptions` (of one group), for the CLI and the API."""
    return [f for f in fields(BuildOptions) if group is None or f.metadata["group"] == group]
