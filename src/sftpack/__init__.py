"""sftpack: supervised fine-tuning data packed into fixed-length training sequences.

`import sftpack` stays light: the torch-facing names load torch on first use. The
build pipeline is `sftpack.build.build` (the module `sftpack.build`).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .errors import ConfigError, InputError, SFTPackError, StoreError, TokenizerError  # noqa: E402

_LAZY = {
    "PackedSFTDataset": "dataset",
    "open_packed": "dataset",
    "iterate_batches": "loader",
    "batch_sampler": "loader",
    "collate": "loader",
    "collate_flattened": "loader",
    "to_hf_dataset": "hf",
    "BuildOptions": "config",
    "BuildSummary": "build",
    "load_tokenizer": "tokenizers",
    "verify_store": "store",
}

__all__ = [
    "PackedSFTDataset",
    "open_packed",
    "iterate_batches",
    "batch_sampler",
    "collate",
    "collate_flattened",
    "to_hf_dataset",
    "BuildOptions",
    "BuildSummary",
    "load_tokenizer",
    "verify_store",
    "SFTPackError",
    "InputError",
    "ConfigError",
    "StoreError",
    "TokenizerError",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sftpack' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)
