#!/usr/bin/env python
"""Chat-data build throughput against the raw tokenizer call and against TRL, in one run.

    python bench/bench_chat.py [--mb 20] [--trl-mb 2]

Generates a seeded multi-turn OpenAI-messages corpus under bench/out/ and times:
- the raw tokenizer: quicktok's encode_batch on the rendered documents' text pieces (special
  tokens cut out, as sftpack does): the baseline every ratio is against;
- sftpack builds with the bundled Llama-3 chat template, training on everything and on the
  assistant turns only, in one process with one tokenizer thread and with the default (a
  process per core for JSONL of 16 MB or more); best of three first builds each;
- sftpack and TRL on the same conversations with the same Hugging Face Llama-3 tokenizer
  (built offline) and TRL's generation-marked training template: sftpack's build with
  --no-train-on-prompt against TRL's own preprocessing, `SFTTrainer._prepare_dataset` with
  `assistant_only_loss=True` (apply_chat_template with return_assistant_tokens_mask, labels),
  on the first --trl-mb MB of the corpus (TRL is slow), both in MB/s of JSONL input.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

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


def head(path: Path, mb: float) -> Path:
    """The first lines of `path` up to `mb` MB, as a file of their own."""
    out = path.with_name(f"{path.stem}_head{mb:g}.jsonl")
    if not out.exists():
        with open(path, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
            size = 0
            for line in f:
                if size >= mb * 1e6:
                    break
                g.write(line)
                size += len(line.encode())
    return out


def trl_preprocess(path: Path, hf, template: str) -> float:
    """Seconds TRL's SFTTrainer takes to prepare the dataset with assistant_only_loss."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    datasets.disable_caching()
    datasets.logging.disable_progress_bar()
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    dataset = datasets.Dataset.from_list(rows)
    args = SFTConfig(output_dir=str(HERE / "out" / "trl"), assistant_only_loss=True, max_length=None,
                     report_to=[], dataset_num_proc=None, use_cpu=True, bf16=False)
    fake = SimpleNamespace(_tokenizer=hf, chat_template=template, completion_only_loss=False)
    started = time.perf_counter()
    prepared = SFTTrainer._prepare_dataset(fake, dataset, hf, args, packing=False, formatting_func=None,
                                           dataset_name="train")
    seconds = time.perf_counter() - started
    assert "labels" in prepared.column_names and len(prepared) == len(rows)
    return seconds


def best_build(path: Path, out: Path, options, tok, workers: int = 0) -> float:
    """The best of three first builds (the store from the run before removed, untimed)."""
    from sftpack.build import build

    best = float("inf")
    for _ in range(3):
        shutil.rmtree(out, ignore_errors=True)
        best = min(best, build(path, out, options, tok, workers=workers, progress=False).seconds)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=20)
    parser.add_argument("--trl-mb", type=float, default=2)
    args = parser.parse_args()
    (HERE / "out").mkdir(exist_ok=True)
    path = corpus(HERE / "out" / f"chat_{args.mb:g}mb.jsonl", args.mb)
    small = head(path, args.trl_mb)
    mb, small_mb = os.path.getsize(path) / 1e6, os.path.getsize(small) / 1e6

    sys.path.insert(0, str(HERE.parent / "tests"))
    from hf_llama3 import build_hf_llama3

    from sftpack.build import BuildOptions, _batches
    from sftpack.records import RecordReader, expand_inputs
    from sftpack.templates import Planned, Schema, make_template
    from sftpack.tokenizers import load_tokenizer

    tok = load_tokenizer("llama3")
    template = make_template("chat", chat_template=tok.chat_template, bos_token=tok.bos_token,
                             eos_token=tok.eos_token, special_tokens=list(tok.special_tokens))
    started = time.perf_counter()  # what a build does before encoding: plain conversations are not rendered
    planned = list(_batches(RecordReader(expand_inputs(path)), Schema(), template, None, planned=True))
    render_s = time.perf_counter() - started
    batches = [[d.text for d in (docs.rendered() if isinstance(docs, Planned) else docs)] for _, docs, _ in planned]
    pieces = [[p for p in tok.special_split(text)[0::2] if p] for texts in batches for text in texts]
    flat = [p for doc in pieces for p in doc]
    raw_s = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for i in range(0, len(flat), 20000):
            tok.encode(flat[i : i + 20000])
        raw_s = min(raw_s, time.perf_counter() - started)

    rows = [("raw tokenizer: quicktok encode_batch on the rendered pieces", raw_s, mb),
            ("read + plan (JSON, conversation shapes, message text), one thread", render_s, mb)]
    del planned, batches, pieces, flat  # the builds below run in a process as light as the command line's
    gc.collect()
    for train_on_prompt in (True, False):
        for workers, how in ((1, "one process, one thread"), (0, f"{os.cpu_count()} processes")):
            options = BuildOptions(seq_length=2048, template="chat", train_on_prompt=train_on_prompt)
            seconds = best_build(path, HERE / "out" / "chat_store", options, tok, workers)
            rows.append((f"sftpack build --template chat{'' if train_on_prompt else ' --no-train-on-prompt'} ({how})",
                         seconds, mb))

    import trl

    hf = build_hf_llama3()
    fast_hf = load_tokenizer(hf)  # served by quicktok (checked equal to the HF tokenizer), loaded outside the timing
    training = (Path(trl.__file__).parent / "chat_templates" / "llama3_training.jinja").read_text(encoding="utf-8")
    sftpack_small = best_build(small, HERE / "out" / "chat_store_hf", BuildOptions(seq_length=2048, template=training,
                               train_on_prompt=False), fast_hf)
    rows.append((f"sftpack, HF Llama-3 + TRL training template, {small_mb:.1f} MB", sftpack_small, small_mb))
    trl_s = trl_preprocess(small, hf, training)
    rows.append((f"TRL SFTTrainer preprocessing, assistant_only_loss, {small_mb:.1f} MB", trl_s, small_mb))

    raw_rate = mb / raw_s
    print(f"corpus {path.name}: {mb:.1f} MB JSONL; {os.cpu_count()} cores; python {sys.version.split()[0]}")
    print(f"{'approach':70} {'sec':>6} {'MB/s':>7} {'x raw':>6}")
    for name, seconds, size in rows:
        print(f"{name:70} {seconds:6.2f} {size / seconds:7.1f} {size / seconds / raw_rate:6.2f}")
    print(f"sftpack vs TRL on the same {small_mb:.1f} MB: {trl_s / sftpack_small:.1f}x faster (sftpack's fixed "
          "build costs included: fingerprint, tokenizer check, store commit)")
    masked = min(r[1] for r in rows if "--no-train-on-prompt" in r[0])
    print(f"throughput, sftpack --no-train-on-prompt on {mb:.0f} MB vs TRL: {mb / masked / (small_mb / trl_s):.1f}x")


if __name__ == "__main__":
    main()
