#!/usr/bin/env python
"""Where a chat build's time goes besides tokenizing: its phases, as shares of the build.

    python bench/bench_fixed_costs.py [--mb 20] [--runs 3] [--workers 0]

Builds bench/out/chat_<mb>mb.jsonl (made by bench_chat.py's generator when missing) with the
bundled Llama-3 chat template, assistant turns only, `--runs` times in this process, and times
(by wrapping them) the encode engine, the commit, the plan check inside it (`summarize` of the
finished store), the fsyncs (summed over threads: the commit's run beside its check, so they
may exceed what they add to it), and build()'s own work before and after. Prints each run's phases
in ms and their share of that run's build (the baseline of the same run); the best run last.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()

    from _timing import timed
    from bench_chat import corpus

    import sftpack.build as B
    import sftpack.store as S
    from sftpack.build import BuildOptions, build
    from sftpack.tokenizers import load_tokenizer

    (HERE / "out").mkdir(exist_ok=True)
    data = corpus(HERE / "out" / f"chat_{args.mb:g}mb.jsonl", args.mb)
    spent: dict[str, float] = collections.defaultdict(float)

    timed(spent, B, "_write_store", "write_store")
    timed(spent, B, "_encode_forked", "encode")
    timed(spent, B, "_encode_all", "encode")  # the one-process engine (a forked build calls it only in workers)
    timed(spent, S.StoreWriter, "commit", "commit")
    timed(spent, B, "summarize", "plan check")
    timed(spent, os, "fsync", "fsyncs")

    tok = load_tokenizer("llama3")
    opts = BuildOptions(seq_length=2048, template="chat", train_on_prompt=False)
    out = HERE / "out" / "fixed_costs_store"
    best = None
    for run in range(args.runs):
        shutil.rmtree(out, ignore_errors=True)
        spent.clear()
        total = build(data, out, opts, tok, workers=args.workers, progress=False).seconds
        spent["build() before/after"] = total - spent.pop("write_store")
        line = "  ".join(f"{k} {v * 1e3:.0f} ms ({v / total:.1%})" for k, v in spent.items())
        print(f"run {run + 1}: build {total * 1e3:.0f} ms  {line}")
        best = total if best is None else min(best, total)
    shutil.rmtree(out, ignore_errors=True)
    print(f"best build: {best * 1e3:.0f} ms ({data.stat().st_size / 1e6 / best:.1f} MB/s)")


if __name__ == "__main__":
    main()
