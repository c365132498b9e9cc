#!/usr/bin/env python
"""The local build against engine="ray" with 1 and 2 CPUs, on this machine, in one run.

    python bench/bench_ray.py            # 16 MB corpus, about a minute on 2 cores
    python bench/bench_ray.py --mb 64

Generates a seeded JSONL corpus (four files of {"prompt", "response"}) under a temporary
directory and builds it: locally (the tokenizer's threads on every core), then on a local
Ray started with 1, then 2 CPUs; each after a warm-up build (imports, worker start-up and
the tokenizer load are not counted; Ray's own start is printed apart). Every store is checked
byte-identical to the local one. Also timed, for docs/ray.md: the driver's serial steps,
the input fingerprint (a hash of every input byte), a full checksum pass over the store (what
`verify` does), and the reduce: its wall time (Ray tasks copy the shards into the store) and
the driver's serial part of it (prefix sums, the tasks' arguments, preallocating the files,
taking the tasks' chunk digests and combining them into the commit's checksums), per GB of
store and per shard.
MB/s are 1e6 bytes of input a second.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

WORDS = (
    "the of and to a in is that for it as with was on be by this are or at from have an not which but can all "
    "system data model function value result example number file user error process return list string code "
    "question answer problem method approach step input output training test case class pack rows tokens"
).split()


def corpus(folder: Path, mb: float, files: int = 4) -> list[Path]:
    rng = random.Random(0)
    paths = []
    per_file = int(mb * 1e6 / files)
    for i in range(files):
        path = folder / f"part-{i}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            size = 0
            while size < per_file:
                rec = {
                    "prompt": " ".join(rng.choices(WORDS, k=rng.randint(5, 80))),
                    "response": " ".join(rng.choices(WORDS, k=rng.randint(20, 400))),
                }
                line = json.dumps(rec) + "\n"
                f.write(line)
                size += len(line)
        paths.append(path)
    return paths


def same(a: Path, b: Path) -> bool:
    return all((a / p.name).read_bytes() == p.read_bytes() for p in b.iterdir())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=16.0, help="corpus size in MB")
    ap.add_argument("--shard-mb", type=float, default=2.0, help="input MB a Ray task reads")
    args = ap.parse_args()

    import ray
    from _timing import timed

    import sftpack.distributed as d
    import sftpack.store
    from sftpack.build import build
    from sftpack.config import BuildOptions
    from sftpack.records import RecordReader, fingerprint_inputs
    from sftpack.store import ALL_ARRAYS, checksum

    tmp = Path(tempfile.mkdtemp(prefix="sftpack-bench-ray-"))
    try:
        paths = corpus(tmp, args.mb)
        total = sum(p.stat().st_size for p in paths) / 1e6
        opts = BuildOptions(seq_length=2048)
        print(f"corpus: {total:.1f} MB in {len(paths)} files, shards of {args.shard_mb} MB; {os.cpu_count()} cores")

        build(paths[0], tmp / "warm", opts, progress=False)  # imports and the tokenizer load, as for Ray below
        t = time.perf_counter()
        local = build(paths, tmp / "local", opts, progress=False)
        local_s = time.perf_counter() - t
        print(f"local build:        {total / local_s:7.2f} MB/s ({local_s:.2f} s, {local.tokens:,} tokens)")

        t = time.perf_counter()
        fingerprint_inputs(paths)
        fp_s = time.perf_counter() - t
        store_bytes = sum(
            (tmp / "local" / n).stat().st_size for n in ALL_ARRAYS.values() if (tmp / "local" / n).exists()
        )
        t = time.perf_counter()
        for n in ALL_ARRAYS.values():
            if (tmp / "local" / n).exists():
                checksum(tmp / "local" / n)
        ck_s = time.perf_counter() - t

        d.SHARD_BYTES = int(args.shard_mb * 1e6)
        spent = {"reduce": 0.0, "serial": 0.0}

        timed(spent, d, "_reduce", "reduce")  # all of it: the tasks' copies included
        driver_steps = ((d, "reduce_plan"), (d, "reduce_tasks"))
        for owner, name in (*driver_steps, *((sftpack.store.StoreWriter, n) for n in ("preallocate", "add_digests"))):
            timed(spent, owner, name, "serial")  # the driver's own steps (Ray workers are other processes)
        timed(spent, sftpack.store, "checksum", "serial")  # the commit: chunk 0 and the straddling chunks
        rates = {}
        for cpus in (1, 2):
            t = time.perf_counter()
            ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
            init_s = time.perf_counter() - t
            try:
                build(paths[0], tmp / "warm", BuildOptions(seq_length=2048, engine="ray"), progress=False, force=True)
                spent.update(reduce=0.0, serial=0.0)
                t = time.perf_counter()
                build(paths, tmp / f"ray{cpus}", BuildOptions(seq_length=2048, engine="ray"), progress=False)
                ray_s = time.perf_counter() - t
            finally:
                ray.shutdown()
            rates[cpus] = total / ray_s
            ok = "identical" if same(tmp / "local", tmp / f"ray{cpus}") else "DIFFERENT"
            print(
                f"ray, {cpus} CPU{'s' if cpus > 1 else ' '}:         {rates[cpus]:7.2f} MB/s ({ray_s:.2f} s; ray.init "
                f"{init_s:.1f} s apart; reduce {spent['reduce']:.2f} s, of which driver {spent['serial']:.3f} s) "
                f"store {ok}"
            )
            serial = dict(spent)
        local_rate = total / local_s
        print(
            f"ratios: ray 1 CPU / local = {rates[1] / local_rate:.2f}, ray 2 CPUs / local = {rates[2] / local_rate:.2f}"
        )
        print(f"        ray 2 CPUs / ray 1 CPU = {rates[2] / rates[1]:.2f}")
        print(
            f"driver serial steps: input fingerprint {total / fp_s:,.0f} MB/s of input; store checksums "
            f"{store_bytes / 1e6 / ck_s:,.0f} MB/s of store ({store_bytes / 1e6 / total:.2f} store MB per input MB)"
        )
        n_shards = len(d.plan_shards(RecordReader(paths)))
        print(
            f"reduce, driver's serial part (2 CPUs): {serial['serial'] / (store_bytes / 1e9):.3f} s per GB of store, "
            f"{serial['serial'] / n_shards * 1e3:.2f} ms per shard ({n_shards} shards); the whole reduce "
            f"{serial['reduce'] / (store_bytes / 1e9):.2f} s per GB"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
