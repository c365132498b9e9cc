"""A timer the benches wrap around library functions: where a build spends its time."""

from __future__ import annotations

import time
from typing import Any


def timed(spent: dict[str, float], owner: object, name: str, label: str) -> None:
    """Replace `owner.name` by a wrapper that adds each call's seconds to `spent[label]`."""
    real = getattr(owner, name)

    def call(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            spent[label] += time.perf_counter() - t

    setattr(owner, name, call)
