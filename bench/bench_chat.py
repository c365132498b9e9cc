#!/usr/bin/env python
"""Chat-data build throughput: `--template chat` builds against the raw tokenizer call.

    python bench/bench_chat.py [--mb 50]

Generates a seeded multi-turn OpenAI-messages corpus under bench/out/, renders it once
with the bundled Llama-3 chat template to time quicktok's ordinary-path encode_batch on
the rendered pieces (special tokens cut out, as sftpack does), then times sftpack builds
with train_on_prompt on and off. Ratios are against the raw call measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which "
         "but have an they you were her she there can all their one café def return 42 3.14").split()


def corpus(path: Path, mb: float, seed: int = 0) -> Path:
    if path.exists():
        return path
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        size = 0
        while size < mb * 1e6:
            messages = [{"role": "system", "content": "You are a helpful assistant."}]
            for _ in range(rng.randint(1, 4)):
                messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(10, 150)))})
                messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(20, 400)))})
            line = json.dumps({"messages": messages}) + "\n"
            f.write(line)
            size += len(line)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=50)
    args = parser.parse_args()
    (HERE / "out").mkdir(exist_ok=True)
    path = corpus(HERE / "out" / f"chat_{args.mb:g}mb.jsonl", args.mb)
    mb = os.path.getsize(path) / 1e6

    from sftpack.build import BuildOptions, _batches, build
    from sftpack.records import RecordReader, expand_inputs
    from sftpack.templates import Schema, make_template
    from sftpack.tokenizers import load_tokenizer

    tok = load_tokenizer("llama3")
    template = make_template("chat", chat_template=tok.chat_template, bos_token=tok.bos_token,
                             eos_token=tok.eos_token, special_tokens=list(tok.special_tokens))
    started = time.perf_counter()
    batches = [[d.text for d in docs] for _, docs, _ in _batches(RecordReader(expand_inputs(path)), Schema(), template,
                                                                 None)]
    render_s = time.perf_counter() - started
    pieces = [[p for p in tok.special_split(text)[0::2] if p] for texts in batches for text in texts]
    flat = [p for doc in pieces for p in doc]
    started = time.perf_counter()
    for i in range(0, len(flat), 20000):
        tok.encode(flat[i : i + 20000])
    raw_s = time.perf_counter() - started

    rows = [("raw tokenizer: quicktok encode_batch on the rendered pieces", raw_s),
            ("read + render (JSON, Jinja chat template), one thread", render_s)]
    for train_on_prompt in (True, False):
        summary = build(path, HERE / "out" / "chat_store", BuildOptions(seq_length=2048, template="chat",
                        train_on_prompt=train_on_prompt), tok, progress=False, force=True)
        rows.append((f"sftpack build --template chat{'' if train_on_prompt else ' --no-train-on-prompt'}",
                     summary.seconds))
    print(f"corpus {path.name}: {mb:.1f} MB JSONL; {os.cpu_count()} cores; python {sys.version.split()[0]}")
    print(f"{'approach':64} {'sec':>6} {'MB/s':>7} {'x raw':>6}")
    for name, seconds in rows:
        print(f"{name:64} {seconds:6.2f} {mb / seconds:7.1f} {raw_s / seconds:6.2f}")


if __name__ == "__main__":
    main()
