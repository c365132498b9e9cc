"""Cost of the open-time store checks at 10 million documents.

Writes a synthetic store (10M documents of 1-8 tokens), then times, in one run:
- baseline: memory-mapping the three arrays with numpy alone (no checks);
- `open_store`: manifest shape, names, sizes, dtypes and the offsets scan (the path every
  `open_packed` and cache reuse takes);
- `open_store(verify=True)`: every checksum and every id against the vocabulary.

    python bench/bench_open.py [--docs 10000000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from sftpack.store import ARRAYS, StoreWriter, open_store, token_dtype


def _best(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=10_000_000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    vocab = 128_256
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        with StoreWriter(path, token_dtype(vocab)) as w:
            for lo in range(0, args.docs, 1_000_000):
                lengths = rng.integers(1, 9, size=min(1_000_000, args.docs - lo))
                n = int(lengths.sum())
                w.append(rng.integers(0, vocab, n), np.ones(n, np.uint8), lengths)
            w.commit({"fingerprint": "bench", "counts": {"documents": 0, "tokens": 0, "supervised_tokens": 0, "special_token_documents": 0,
                                  "input_bytes": 0}, "options": {"train_on_prompt": True},
                      "plan": {"seq_length": 2048, "packing": "concat", "overflow": "split", "pad": None,
                               "shuffle": False, "seed": None},
                      "view": {"boundaries": False, "mask_cross_document": False},
                      "tokenizer": {"name": "bench", "vocab_size": vocab}})
        open_store(path)  # warm the page cache, as a reopen after a build would find it
        base = _best(lambda: [np.load(path / name, mmap_mode="r") for name in ARRAYS.values()])
        checked = _best(lambda: open_store(path))
        verified = _best(lambda: open_store(path, verify=True), repeat=2)
        store = open_store(path)
        print(f"store: {args.docs:,} documents, {len(store.tokens):,} tokens, "
              f"{sum(f.stat().st_size for f in path.iterdir()) / 1e6:.0f} MB")
        print(f"{'open':<28}{'seconds':>10}{'vs numpy mmap':>15}")
        for name, t in (("numpy mmap (baseline)", base), ("open_store", checked), ("open_store(verify=True)", verified)):
            print(f"{name:<28}{t:>10.4f}{t / base:>14.1f}x")


if __name__ == "__main__":
    main()
