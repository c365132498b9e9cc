#!/usr/bin/env python
"""Loader throughput: one full shuffled epoch at batch 8 x 2048 tokens, one core, no workers.

    python bench/bench_loader.py            # ~60 MB corpus, ~20M tokens
    python bench/bench_loader.py --mb 20    # quick run

Generates the seeded synthetic SFT corpus of bench_build.py (cached under bench/out/), builds
a store from it with `sftpack.build.build` (Llama-3 tokenizer), then measures in this one run,
pinned to one CPU with one torch thread:

  a. sftpack: `iterate_batches(open_packed(store), 8, shuffle=True)`, a full epoch;
  b. the baseline: the same rows (input_ids, labels) in a Hugging Face `datasets` Arrow table
     saved to disk and memory-mapped back (`load_from_disk`), `.with_format("torch")`, through
     `torch.utils.data.DataLoader(batch_size=8, shuffle=True)`, a full epoch.

Then, for information, one epoch of sftpack with boundaries=True and with packing="bfd".
Each side runs `--repeat` epochs (a fresh order each); the best is reported. Tokens/s counts
the input_ids of every batch served; the ratio only uses measurements of this run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def epoch_rate(batches) -> tuple[float, int]:
    """(seconds, tokens) of one pass over `batches`."""
    tokens = 0
    t = time.perf_counter()
    for batch in batches:
        tokens += batch["input_ids"].numel()
    return time.perf_counter() - t, tokens


def hf_table(ds, path: Path):
    """The dataset's rows as a memory-mapped Arrow table with torch formatting."""
    import datasets
    import numpy as np
    import pyarrow as pa

    datasets.disable_progress_bars()

    n, L = len(ds), ds.seq_length
    ids, labels = np.empty((n, L), np.int64), np.empty((n, L), np.int64)
    for i in range(n):
        item = ds.view.item(i)
        ids[i], labels[i] = item["input_ids"], item["labels"]
    offsets = pa.array(np.arange(0, n * L + 1, L, dtype=np.int32))
    table = pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1))),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(labels.reshape(-1))),
        }
    )
    datasets.Dataset(table).save_to_disk(str(path))
    return datasets.load_from_disk(str(path)).with_format("torch")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=60, help="corpus size in MB (default 60: ~20M tokens)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="epochs per side (best is reported)")
    args = ap.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    from bench_build import generate_corpus

    import sftpack
    from sftpack.build import build
    from sftpack.config import make_options

    OUT.mkdir(exist_ok=True)
    corpus = OUT / f"loader-corpus-{args.mb:g}mb-{args.seed}.jsonl"
    if not corpus.exists():
        generate_corpus(corpus, args.mb, args.seed)
    with tempfile.TemporaryDirectory(prefix="sftpack-bench-loader-") as tmp:
        t = time.perf_counter()
        build(corpus, Path(tmp) / "store", make_options(seq_length=args.seq_length), "llama3", progress=False)
        t_build = time.perf_counter() - t
        ds = sftpack.open_packed(Path(tmp) / "store")
        t = time.perf_counter()
        hf = hf_table(ds, Path(tmp) / "arrow")
        t_arrow = time.perf_counter() - t
        print(
            f"corpus {corpus.stat().st_size / 1e6:.0f} MB -> {len(ds):,} rows x {ds.seq_length} tokens "
            f"({len(ds) * ds.seq_length / 1e6:.1f}M tokens); build {t_build:.1f}s, Arrow table {t_arrow:.1f}s"
        )
        print(
            f"one CPU ({os.sched_getaffinity(0) if hasattr(os, 'sched_getaffinity') else '?'}), "
            f"torch threads {torch.get_num_threads()}, num_workers=0, batch {args.batch_size}, shuffled"
        )

        ours = sftpack.iterate_batches(ds, args.batch_size, True, seed=0)
        gen = torch.Generator().manual_seed(0)
        theirs = torch.utils.data.DataLoader(hf, batch_size=args.batch_size, shuffle=True, generator=gen)
        results: dict[str, list[tuple[float, int]]] = {"sftpack iterate_batches": [], "datasets Arrow + torch": []}
        for _ in range(args.repeat):  # alternate, so both sides see the same machine state
            results["sftpack iterate_batches"].append(epoch_rate(ours))
            results["datasets Arrow + torch"].append(epoch_rate(theirs))
        tokens = {name: {n for _, n in runs} for name, runs in results.items()}
        assert tokens["sftpack iterate_batches"] == tokens["datasets Arrow + torch"], tokens  # same rows, all served
        best = {name: max(n / s for s, n in runs) for name, runs in results.items()}
        print(f"{'loader':<26}{'best epoch s':>14}{'Mtokens/s':>12}")
        for name, runs in results.items():
            print(f"{name:<26}{min(s for s, _ in runs):>14.3f}{best[name] / 1e6:>12.1f}")
        for name, kw in (("  with boundaries=True", {"boundaries": True}), ("  packing='bfd'", {"packing": "bfd"})):
            other = sftpack.open_packed(Path(tmp) / "store", **kw)
            s, n = epoch_rate(sftpack.iterate_batches(other, args.batch_size, True, seed=0))
            print(f"{name:<26}{s:>14.3f}{n / s / 1e6:>12.1f}   (for information: one epoch, no baseline)")
        ratio = best["sftpack iterate_batches"] / best["datasets Arrow + torch"]
        print(
            f"sftpack / datasets: {ratio:.1f}x; target >= 10 Mtokens/s: "
            f"{'met' if best['sftpack iterate_batches'] >= 1e7 else 'MISSED'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
