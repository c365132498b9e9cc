#!/usr/bin/env python
"""Packing-plan benchmark: sftpack's best-fit-decreasing plan vs TRL's `pack_dataset`.

    python bench/bench_pack.py                 # all corpora, 10M-document timings
    python bench/bench_pack.py --docs 1000000 --no-trl --no-corpus   # quick

On the same document lengths, in one run, on one core (BLAS/OpenMP threads 1, the
process pinned to one CPU):

  1. sftpack `plan_bfd(overflow="truncate")` vs TRL `pack_dataset(ds, L, strategy="bfd")`
     (which truncates too) on a subset (`--trl-docs`): time, documents/s and their ratio,
     efficiency and rows vs the bound ceil(tokens / L). TRL runs with its default map
     batches of 1,000 examples (what users get) and once with the whole subset in one batch
     (`map_kwargs={"batch_size": None}`), whose rows must equal sftpack's (checked).
  2. sftpack alone on `--docs` documents (default 10M): every overflow policy, wall and
     CPU time, rows vs bound, and the planner's peak memory per document.

Corpora: `lognormal` (SFT-like: median 400 tokens, sigma 1, cap 16k), `pareto` (long tail,
alpha 1.2, scale 60, cap 128k: many documents longer than L), and `bench_build` (the
lengths of bench/bench_build.py's generated corpus, Alpaca-rendered and tokenized with
the bundled Llama-3 tokenizer plus BOS and EOS, resampled to the wanted count).

Timings on a shared machine vary; the best of `--repeat` runs is reported, wall and CPU.
Ratios only, no assertions on time.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE.parent / "src"))

from sftpack.plans import plan_bfd, plan_concat  # noqa: E402

# --------------------------------------------------------------------------- corpora


def lognormal(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(400), 1.0, n), 1, 16_384).astype(np.int64)


def pareto(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip((rng.pareto(1.2, n) + 1) * 60, 1, 131_072).astype(np.int64)


def bench_build_lengths(mb: float, seed: int) -> np.ndarray:
    """Token counts of bench_build's corpus (Alpaca + Llama-3 + BOS/EOS), cached under bench/out/."""
    cache = OUT / f"pack_lengths_{mb:g}mb_seed{seed}.npy"
    if cache.exists():
        return np.load(cache)
    sys.path.insert(0, str(HERE))
    import json

    import quicktok
    from bench_build import GEN_VERSION, generate_corpus

    from sftpack.templates import ALPACA_TEMPLATE

    OUT.mkdir(parents=True, exist_ok=True)
    corpus = OUT / f"corpus_{mb:g}mb_seed{seed}_v{GEN_VERSION}.jsonl"  # the name bench_build.py --mb uses
    if not corpus.exists():
        print(f"  generating {corpus.name} ...", flush=True)
        generate_corpus(corpus, mb, seed)
    enc = quicktok.get_encoding("llama3")
    with open(corpus, "rb") as f:
        docs = [ALPACA_TEMPLATE.format(instruction=r["prompt"], response=r["response"]) for r in map(json.loads, f)]
    _, offsets = enc.encode_batch(docs, 0, False)
    lengths = np.diff(np.asarray(offsets, dtype=np.int64)) + 2
    np.save(cache, lengths)
    return lengths


def resample(lengths: np.ndarray, n: int, seed: int = 2) -> np.ndarray:
    if len(lengths) >= n:
        return lengths[:n].copy()
    return np.random.default_rng(seed).choice(lengths, n)


# --------------------------------------------------------------------------- measuring


def best_of(fn, repeat: int):
    """(result, best wall s, best CPU s)."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        c, t = time.process_time(), time.perf_counter()
        out = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return out, min(walls), min(cpus)


def trl_dataset(lengths: np.ndarray):
    """A datasets.Dataset whose example d is `lengths[d]` tokens, every token = d (int32)."""
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    return datasets.Dataset(InMemoryTable(pa.table({"input_ids": ids})))


def trl_rows(packed):
    """(docs, piece lengths, row offsets) of a TRL-packed dataset, read from its arrow columns."""
    t = packed.with_format("arrow")[:]
    ids = t.column("input_ids").combine_chunks()
    sl = t.column("seq_lengths").combine_chunks()
    pieces = sl.values.to_numpy().astype(np.int64)
    row_offsets = sl.offsets.to_numpy().astype(np.int64)
    starts = np.concatenate(([0], np.cumsum(pieces)[:-1]))
    values = ids.values.to_numpy()
    base = ids.offsets.to_numpy()[0]
    return values[base + starts].astype(np.int64), pieces, row_offsets


def run_trl(lengths: np.ndarray, L: int, batch_size):
    from trl.data_utils import pack_dataset

    ds = trl_dataset(lengths)
    kw = {} if batch_size == "default" else {"map_kwargs": {"batch_size": batch_size}}
    c, t = time.process_time(), time.perf_counter()
    packed = pack_dataset(ds, L, strategy="bfd", **kw)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return packed, wall, cpu


def eff(tokens: int, rows: int, L: int) -> float:
    return tokens / (rows * L)


# --------------------------------------------------------------------------- main


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{platform.python_implementation()} {platform.python_version()}, numpy {np.__version__}, {cpu}, "
            f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=10_000_000, help="documents for the sftpack-only timings")
    ap.add_argument("--trl-docs", type=int, default=200_000, help="subset for the TRL comparison")
    ap.add_argument("--seq-lengths", default="2048,8192")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--corpus-mb", type=float, default=30, help="bench_build corpus to take lengths from")
    ap.add_argument("--seed", type=int, default=1234, help="bench_build corpus seed")
    ap.add_argument("--no-corpus", action="store_true", help="skip the bench_build corpus")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the process to one CPU")
    args = ap.parse_args()
    seq_lengths = [int(x) for x in args.seq_lengths.split(",")]

    if not args.no_pin and hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        print(f"pinned to CPU {cpu}; thread env vars = 1")
    print(machine(), flush=True)

    corpora = {"lognormal": lognormal(args.docs), "pareto": pareto(args.docs)}
    if not args.no_corpus:
        t = time.perf_counter()
        src = bench_build_lengths(args.corpus_mb, args.seed)
        print(f"bench_build corpus: {len(src):,} documents tokenized (median {int(np.median(src))}, "
              f"p99 {int(np.percentile(src, 99))}, max {src.max()} tokens) in {time.perf_counter() - t:.1f} s; "
              f"resampled to {args.docs:,}", flush=True)
        corpora["bench_build"] = resample(src, args.docs)
    for name, x in corpora.items():
        print(f"  {name:<12} median {int(np.median(x)):>5}  mean {x.mean():7.1f}  p99 {int(np.percentile(x, 99)):>6}  "
              f"max {x.max():>6}  > 2048: {(x > 2048).mean():.2%}  > 8192: {(x > 8192).mean():.2%}")

    # ---- 1. vs TRL on a subset
    have_trl = False
    if not args.no_trl:
        try:
            import datasets

            import trl.data_utils  # noqa: F401

            datasets.disable_progress_bars()
            os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="bench_pack_hf"))
            have_trl = True
        except ImportError as e:
            print(f"TRL comparison skipped ({e}); install with: .venv/bin/pip install -c constraints.txt trl datasets")
    if have_trl:
        n = args.trl_docs
        print(f"\n## sftpack plan_bfd(overflow='truncate') vs TRL pack_dataset(strategy='bfd'), first {n:,} documents, one core")
        print("TRL batch 1000: its default (map batches of 1,000 examples, each packed alone); "
              "TRL global: batch_size=None (one batch)")
        hdr = ("| corpus | L | docs | sftpack s (cpu) | TRL batch 1000 s (cpu) | TRL global s (cpu) | docs/s sftpack | "
               "docs/s TRL 1000 | ratio vs 1000 | ratio vs global | eff sftpack | eff TRL 1000 | eff TRL global | "
               "rows sftpack / TRL 1000 / bound | same rows as TRL global |")
        print(hdr)
        print("|" + "|".join(["---"] * (hdr.count("|") - 1)) + "|")
        for name, all_lengths in corpora.items():
            x = all_lengths[:n]
            for L in seq_lengths:
                plan, w, c = best_of(lambda: plan_bfd(x, L, overflow="truncate"), args.repeat)
                bound = -(-int(np.minimum(x, L).sum()) // L)
                p1000, w1, c1 = run_trl(x, L, "default")
                pg, wg, cg = run_trl(x, L, None)
                tok = int(np.minimum(x, L).sum())
                d, pieces, ro = trl_rows(pg)
                same = (np.array_equal(d, plan.doc) and np.array_equal(pieces, plan.length)
                        and np.array_equal(ro, plan.row_offsets))
                print(f"| {name} | {L} | {n:,} | {w:.3f} ({c:.3f}) | {w1:.2f} ({c1:.2f}) | {wg:.2f} ({cg:.2f}) | "
                      f"{n / w:,.0f} | {n / w1:,.0f} | {w1 / w:.0f}x | {wg / w:.0f}x | {plan.stats.efficiency:.4%} | "
                      f"{eff(tok, len(p1000), L):.4%} | {eff(tok, len(pg), L):.4%} | "
                      f"{plan.rows:,} / {len(p1000):,} / {bound:,} | {'yes' if same else 'NO'} |", flush=True)
                del p1000, pg

    # ---- 2. sftpack alone at scale
    print(f"\n## sftpack alone, {args.docs:,} documents, one core (best of {args.repeat})")
    hdr = "| corpus | L | overflow | wall s | cpu s | M docs/s | rows | bound ceil(tokens/L) | rows over bound | efficiency | tokens lost |"
    print(hdr)
    print("|" + "|".join(["---"] * (hdr.count("|") - 1)) + "|")
    for name, x in corpora.items():
        for L in seq_lengths:
            for overflow in ("split", "truncate", "drop"):
                plan, w, c = best_of(lambda: plan_bfd(x, L, overflow=overflow), args.repeat)
                s = plan.stats
                print(f"| {name} | {L} | {overflow} | {w:.2f} | {c:.2f} | {args.docs / w / 1e6:.2f} | {s.rows:,} | "
                      f"{s.lower_bound_rows:,} | {s.rows / s.lower_bound_rows - 1:.4%} | {s.efficiency:.4%} | "
                      f"{s.tokens_lost / s.tokens_in:.2%} |", flush=True)
                del plan
    x = corpora["lognormal"]
    _, w, c = best_of(lambda: plan_concat(x, seq_lengths[0], seed=0), args.repeat)
    print(f"\nconcat (shuffled, seed 0), lognormal, L={seq_lengths[0]}: {w:.2f} s wall, {c:.2f} s cpu")

    # ---- memory
    L = seq_lengths[0]
    tracemalloc.start()
    plan = plan_bfd(x, L)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    held = sum(a.nbytes for a in (plan.doc, plan.start, plan.length, plan.row_offsets))
    print(f"memory, lognormal, L={L}, split: planner peak {peak / 1e6:,.0f} MB = {peak / len(x):.0f} B/document "
          f"(input lengths not counted); the plan holds {held / 1e6:,.0f} MB = {held / len(x):.1f} B/document")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
