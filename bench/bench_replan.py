"""Re-planning an existing store vs building it, in one run.

Builds the bench corpus once (the baseline), then opens the same store with other plans:
a new seq_length, bfd at two seq_lengths, a shuffle. Each open plans from document lengths
alone; the ratio to the build is what changing a plan option costs (goal: at most 2%).
A second `build` with only plan options changed reuses the store (no tokenizing).

    python bench/bench_replan.py [--mb 300]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_build import GEN_VERSION, OUT, generate_corpus  # noqa: E402

from sftpack import open_packed  # noqa: E402
from sftpack.build import BuildOptions, build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=300)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    corpus = OUT / f"corpus_{args.mb:g}mb_seed{args.seed}_v{GEN_VERSION}.jsonl"
    if not corpus.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        generate_corpus(corpus, args.mb, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        t = time.perf_counter()
        summary = build(corpus, store, BuildOptions(seq_length=2048), "llama3", progress=False)
        built = time.perf_counter() - t
        print(f"corpus {corpus.stat().st_size / 1e6:.0f} MB: {summary.documents:,} documents, "
              f"{summary.tokens:,} tokens; build {built:.2f} s")
        print(f"{'plan':<34}{'open s':>9}{'vs build':>10}{'rows':>12}{'efficiency':>12}")
        for kw in ({"seq_length": 4096}, {"packing": "bfd", "seq_length": 2048},
                   {"packing": "bfd", "seq_length": 8192}, {"shuffle": True, "seed": 1}):
            t = time.perf_counter()
            ds = open_packed(store, **kw)
            took = time.perf_counter() - t
            label = ", ".join(f"{k}={v}" for k, v in kw.items())
            print(f"{label:<34}{took:>9.3f}{took / built:>10.2%}{len(ds):>12,}{ds.view.plan.stats.efficiency:>12.2%}")
        t = time.perf_counter()
        again = build(corpus, store, BuildOptions(seq_length=4096, packing="bfd"), "llama3", progress=False)
        took = time.perf_counter() - t
        print(f"build again with only plan options changed: {took:.2f} s ({took / built:.1%} of the build; "
              f"reused={again.reused}: fingerprinting the input and the summary pass, no tokenizing)")
        shutil.rmtree(store)


if __name__ == "__main__":
    main()
