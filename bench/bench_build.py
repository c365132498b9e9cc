#!/usr/bin/env python
"""Build-throughput and memory benchmark for sftpack.

    python bench/bench_build.py            # >= 300 MB corpus (a few minutes)
    python bench/bench_build.py --mb 30    # quick run

Generates a seeded synthetic SFT corpus (JSONL of {"prompt", "response"}) under
bench/out/, then measures, each approach in its own subprocess (so every peak RSS
belongs to one approach):

  a. sftpack build (Python API, timed around build(); plus the CLI, timed wall-clock
     including interpreter start-up), and a few build variants;
  b. the raw tokenizer: quicktok encode_batch on the same Alpaca-rendered documents,
     ~4 MB of text per call, only the encode_batch calls timed;
  c. the reference: render, join with EOS+BOS, encode one giant string with the
     Hugging Face Llama-3 tokenizer (capped subset);
  d. TRL: datasets.load_dataset("json") -> map(Alpaca + HF tokenizer, batched,
     num_proc=2) -> trl.data_utils.pack_dataset (capped subset), if importable;
  e. reopening the store (open_packed) and one shuffled DataLoader epoch over it.

Every MB/s is megabytes (1e6 bytes) of JSONL input per second, so the rows compare.
Ratios only use measurements of this run. Peak RSS is the child's own high-water
mark (wait4 ru_maxrss: the largest single process of the child's tree); "tree MB" is
the sampled peak of the sum of PSS over the child's whole process tree (it matters
for the multi-process TRL pipeline).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
GEN_VERSION = 1
RESULT_TAG = "@@RESULT "
DELIM = "<|end_of_text|><|begin_of_text|>"
MB = 1e6

# --------------------------------------------------------------------------- corpus

_COMMON = (
    "the of and to a in is that for it as with was on be by this are or at from have an not which but can all "
    "will one their there been has more if would when so what about up out into other than then them these "
    "some her him its time only new could also after two how our over first use well way even because any "
    "most people just should each those through where much before while must between both under never "
    "system data model function value result example number file user error process return list string "
    "code question answer problem method approach step input output training function test case class "
    "however therefore example following important different possible specific information provide help "
    "make sure need want know think write explain describe consider calculate implement compare "
    "i you he she we they my your his me us who may like get see now go come take give find tell ask work "
    "seem feel try leave call good great little own old right big high small large next early young few "
    "public bad same able last long year day thing man woman child world life hand part place week company "
    "government point home water room mother area money story fact month lot study book eye job word business "
    "issue side kind head house service friend power hour game line end member law car city community name "
    "president team minute idea body back parent face others level office door health person art war history "
    "party morning reason research girl guy moment air teacher force education here very still again too "
    "always often really already also perhaps quickly simply usually enough almost together since until "
    "although whether without within during against among across toward upon above below each every "
    "algorithm array server client request response database query table index memory thread performance "
    "network security library package version update install configure variable parameter argument loop "
    "recipe story poem essay summary analysis report letter email plan list table chart image design "
    "customer product market price cost sale growth strategy risk quality support feature benefit "
    "temperature energy climate science health patient treatment study theory evidence experiment result"
).split()
_SYLLABLES = (
    "ka ri to na mi ro se lu ven dor tal mar qui pre sta con tri bel gra sel ment tion ing ous ive able "
    "al er ic ly ness ful ist ism ate ize pro com dis un re in ex per ter an el or est ble cal der lin mon "
    "par ser tor val vis"
).split()
_NON_ASCII = (
    "café naïve Zürich résumé façade jalapeño São Paulo München Ångström coöperate déjà vu "
    "日本語 東京 データ 学習 モデル 中文 数据 训练 привет мир данные обучение 안녕하세요 데이터 "
    "Ελληνικά αλφα βήτα مرحبا العربية שלום हिन्दी 🚀 ✅ 🤖 📊 — – … “quoted” ‘single’ € £ ¥ ° ± × ÷ → ← ≤ ≥ ∑ √ ∞ µs"
).split()
_SUFFIXES = [" "] * 70 + [", "] * 8 + [". "] * 7 + [".\n"] * 2 + ["\n\n"] * 2 + ["? ", ": ", "; ", "! ", "\n- ", " (", ") ",
                                                                            "\" ", " \"", "'s ", "\n1. ", "\n## "]
_IDENTS = "x y i j n k data result items values total count buf node key val acc row col idx tmp out path cfg".split()
_CODE_TEMPLATES = [
    "def {a}({b}, {c}={n}):",
    "    \"\"\"Return the {a} of {b}.\"\"\"",
    "    return {b} + {c} * {n}",
    "    for {i} in range(len({b})):",
    "        {b}[{i}] = {c}[{i}] * {n}",
    "    if {b} is None:",
    "        raise ValueError(f\"bad {a}: {{{b}!r}}\")",
    "import numpy as np",
    "from collections import defaultdict",
    "{a} = {{'{b}': {n}, \"{c}\": [1, 2, 3], 'ok': True}}",
    "    {a}.append({b}.get('{c}', {n}))",
    "class {A}:",
    "    def __init__(self, {b}):",
    "        self.{b} = {b}",
    "print(f\"{a} = {{{a}:.3f}}\")",
    "for (int {i} = 0; {i} < {n}; ++{i}) {{",
    "  printf(\"%d\\n\", {b}[{i}]);",
    "}}",
    "SELECT {a}, {b} FROM {c} WHERE {a} > {n} ORDER BY {b};",
    "\tconst {a} = await fetch(`/api/{b}/${{{c}}}`);",
    "let {a}: Vec<u32> = {b}.iter().map(|x| x * {n}).collect();",
    "# {a}: compute the {b} and {c}",
    "    # TODO: handle the empty {b} case",
    "$ pip install {a}=={n}.0",
    "    {a} = np.zeros(({n}, {n}), dtype=np.float32)",
    "    return {{'{a}': {b}, '{c}': {n}}}",
]


def _lognormal(rng, median: float, sigma: float, lo: int, hi: int, size: int):
    import numpy as np

    return np.clip(rng.lognormal(np.log(median), sigma, size), lo, hi).astype(np.int64)


class _Streams:
    """Vectorised text sources: prose (Zipf-weighted words, numbers, punctuation, some
    non-ASCII) and code (lines from templates), produced in large blocks."""

    def __init__(self, rng) -> None:
        import numpy as np

        self.rng = rng
        synth_n = 6000
        n_syl = rng.integers(2, 5, synth_n)
        syl = np.asarray(_SYLLABLES, dtype=object)
        picks = rng.integers(0, len(syl), (synth_n, 4))
        synth = ["".join(syl[picks[k, : n_syl[k]]]) for k in range(synth_n)]
        common = _COMMON + [w.capitalize() for w in _COMMON[:80]]
        numbers = [str(v) for v in rng.integers(0, 100000, 1500)] + [f"{v:.2f}" for v in rng.random(700) * 1000] + \
                  [f"{v}%" for v in rng.integers(0, 100, 100)] + [f"19{v:02d}" for v in range(100)] + \
                  [f"0x{v:04x}" for v in rng.integers(0, 65535, 100)]
        words = common + synth + numbers
        w = np.concatenate([
            1.0 / (np.arange(len(common)) + 2.7),                # Zipf head: common words
            1.0 / (np.arange(synth_n) + 20.0) ** 0.9,            # long tail of rarer words
            np.full(len(numbers), 1.0 / len(numbers)),
        ])
        n_c, n_s = len(common), synth_n
        w[:n_c] *= 0.80 / w[:n_c].sum()                          # ~80% common words
        w[n_c : n_c + n_s] *= 0.16 / w[n_c : n_c + n_s].sum()   # ~16% rarer words
        w[n_c + n_s :] *= 0.04 / w[n_c + n_s :].sum()           # ~4% numbers
        self.words = np.asarray(words, dtype=object)
        self.wp = w / w.sum()
        self.suffixes = np.asarray(_SUFFIXES, dtype=object)
        self.avg_piece = float((self.wp * np.array([len(x) for x in words])).sum()) + \
            float(np.mean([len(s) for s in _SUFFIXES]))
        lines = []
        for _ in range(3000):
            t = _CODE_TEMPLATES[int(rng.integers(len(_CODE_TEMPLATES)))]
            a, b, c, i = (_IDENTS[int(k)] for k in rng.integers(0, len(_IDENTS), 4))
            lines.append(t.format(a=a, b=b, c=c, i=i, A=a.capitalize() + b.capitalize(), n=int(rng.integers(0, 512))))
        self.code_lines = np.asarray([ln + "\n" for ln in lines], dtype=object)
        self.avg_line = float(np.mean([len(x) for x in self.code_lines]))

    def prose(self, chars: int) -> str:
        n = int(chars / self.avg_piece * 1.15) + 64
        parts = []
        total = 0
        while total < chars:
            wi = self.rng.choice(len(self.words), size=n, p=self.wp)
            si = self.rng.integers(0, len(self.suffixes), n)
            pieces = [None] * (2 * n)
            pieces[0::2] = self.words[wi].tolist()
            pieces[1::2] = self.suffixes[si].tolist()
            s = "".join(pieces)
            parts.append(s)
            total += len(s)
        return "".join(parts)

    def code(self, chars: int) -> str:
        n = int(chars / self.avg_line * 1.15) + 16
        parts, total = [], 0
        while total < chars:
            s = "".join(self.code_lines[self.rng.integers(0, len(self.code_lines), n)].tolist())
            parts.append(s)
            total += len(s)
        return "".join(parts)


def _take(src: str, cur: int, n: int, sep: str) -> tuple[str, int]:
    """About n chars of src from the first `sep` boundary at or after cur (code: whole lines)."""
    k = src.find(sep, cur)
    start = cur if k < 0 else k + len(sep)
    text = src[start : start + n]
    if sep == "\n":
        cut = text.rfind("\n")
        text = text[:cut] if cut > 0 else text
    return text.strip(" "), start + n


def _sprinkle(rng, text: str) -> str:
    """Insert 1-6 non-ASCII words (accents, CJK, Cyrillic, emoji, typographic marks)."""
    for _ in range(int(rng.integers(1, 7))):
        pos = text.find(" ", int(rng.integers(0, len(text) + 1)))
        if pos < 0:
            pos = len(text)
        text = f"{text[:pos]} {_NON_ASCII[int(rng.integers(len(_NON_ASCII)))]}{text[pos:]}"
    return text


def generate_corpus(path: Path, mb: float, seed: int) -> dict:
    """Write >= mb MB of JSONL; records are produced in fixed chunks, so a smaller corpus
    is a prefix of a larger one with the same seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    streams = _Streams(rng)
    target = int(mb * MB)
    chunk = 4000
    written = records = 0
    t0 = time.perf_counter()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        while written < target:
            p_len = _lognormal(rng, 260, 0.9, 50, 2000, chunk)
            r_len = _lognormal(rng, 1000, 1.0, 100, 8000, chunk)
            p_code = rng.random(chunk) < 0.08
            r_code = rng.random(chunk) < 0.25
            frac = rng.uniform(0.3, 0.7, chunk)
            intl = rng.random(chunk) < 0.15  # records with some non-ASCII text
            code_p = np.where(p_code, (p_len * frac).astype(np.int64), 0)
            code_r = np.where(r_code, (r_len * frac).astype(np.int64), 0)
            prose = streams.prose(int((p_len + r_len - code_p - code_r).sum() * 1.1) + 10000)
            code = streams.code(int((code_p + code_r).sum() * 1.1) + 10000)
            pc = cc = 0
            out = []
            for k in range(chunk):
                fields = []
                for total, n_code, kind in ((int(p_len[k]), int(code_p[k]), "p"), (int(r_len[k]), int(code_r[k]), "r")):
                    if n_code:
                        head = (total - n_code) // 2
                        a, pc = _take(prose, pc, head, " ")
                        c, cc = _take(code, cc, n_code, "\n")
                        b, pc = _take(prose, pc, total - n_code - head, " ")
                        lang = "python" if kind == "r" else ""
                        fields.append(f"{a}\n\n```{lang}\n{c.rstrip()}\n```\n\n{b}")
                    else:
                        t, pc = _take(prose, pc, total, " ")
                        fields.append(t)
                if intl[k]:
                    fields = [_sprinkle(rng, t) for t in fields]
                out.append(json.dumps({"prompt": fields[0], "response": fields[1]}, ensure_ascii=False))
            blob = "\n".join(out) + "\n"
            f.write(blob)
            written += len(blob.encode("utf-8"))
            records += chunk
    os.replace(tmp, path)
    return {"records": records, "bytes": path.stat().st_size, "seconds": time.perf_counter() - t0}


def prefix_file(src: Path, dst: Path, mb: float) -> Path:
    """The first whole lines of src totalling >= mb MB (src itself when it is smaller)."""
    cap = int(mb * MB)
    if src.stat().st_size <= cap:
        return src
    if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst
    n = 0
    with open(src, "rb") as f, open(dst, "wb") as g:
        for line in f:
            g.write(line)
            n += len(line)
            if n >= cap:
                break
    return dst


# --------------------------------------------------------------------------- workers (run in subprocesses)


def _rss_now() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def make_hf_llama3():
    """The HF Llama-3 tokenizer the tests use (tests/hf_llama3.py), built offline."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from hf_llama3 import build_hf_llama3

    return build_hf_llama3()


def _iter_docs(path: str):
    from sftpack.templates import ALPACA_TEMPLATE

    fmt = ALPACA_TEMPLATE.format
    with open(path, "rb") as f:
        for line in f:
            rec = json.loads(line)
            yield fmt(instruction=rec["prompt"], response=rec["response"])


def _cpu_self() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return ru.ru_utime + ru.ru_stime


def w_build(a: dict) -> dict:
    import sftpack.build as B

    before = _rss_now()
    opts = B.BuildOptions(seq_length=a["seq_length"], shuffle=a.get("shuffle", False), seed=a.get("seed"),
                          train_on_prompt=a.get("train_on_prompt", True))
    c0 = _cpu_self()
    t0 = time.perf_counter()
    s = B.build(a["input"], a["out"], opts, "llama3", workers=0, progress=False, force=True)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "build_cpu_s": _cpu_self() - c0, "summary_seconds": s.seconds, "input_bytes": s.input_bytes, "tokens": s.tokens,
            "documents": s.documents, "sequences": s.sequences, "rss_before_mb": before.get("VmRSS")}


def w_raw(a: dict) -> dict:
    import quicktok

    enc = quicktok.get_encoding("llama3")
    batch_chars = int(a.get("batch_chars", 4 << 20))
    t_enc = cpu_enc = 0.0
    tokens = docs_n = 0
    t0 = time.perf_counter()
    batch, size = [], 0

    def flush():
        nonlocal t_enc, cpu_enc, tokens, batch, size
        c = _cpu_self()
        t = time.perf_counter()
        ids, offsets = enc.encode_batch(batch, 0, False)
        t_enc += time.perf_counter() - t
        cpu_enc += _cpu_self() - c
        tokens += len(ids)
        batch, size = [], 0

    for doc in _iter_docs(a["input"]):
        batch.append(doc)
        size += len(doc)
        docs_n += 1
        if size >= batch_chars:
            flush()
    if batch:
        flush()
    return {"seconds": t_enc, "encode_cpu_s": cpu_enc, "wall_incl_read_render": time.perf_counter() - t0,
            "tokens": tokens,
            "documents": docs_n, "input_bytes": os.path.getsize(a["input"])}


def w_hf_ref(a: dict) -> dict:
    import torch

    t = time.perf_counter()
    tok = make_hf_llama3()
    t_tok = time.perf_counter() - t
    t0 = time.perf_counter()
    docs = list(_iter_docs(a["input"]))
    text = DELIM.join(docs)
    n_docs = len(docs)
    del docs
    t1 = time.perf_counter()
    ids = tok(text)["input_ids"]
    t2 = time.perf_counter()
    tokens = torch.tensor(ids)
    L = a["seq_length"]
    n = (len(tokens) - 1) // L
    rows = tokens[: n * L + 1]  # inputs rows[i*L:(i+1)*L], labels shifted by one
    t3 = time.perf_counter()
    if a.get("save_ids"):
        import numpy as np

        np.save(a["save_ids"], tokens.numpy().astype(np.uint32))
    return {"seconds": t3 - t0, "phase_render_join": t1 - t0, "phase_encode": t2 - t1, "phase_tensor": t3 - t2,
            "tokenizer_construct_s": t_tok, "tokens": len(ids), "documents": n_docs, "sequences": n,
            "input_bytes": os.path.getsize(a["input"]), "_keep": int(rows[-1])}


def w_trl(a: dict) -> dict:
    cache = a["cache"]
    os.environ["HF_DATASETS_CACHE"] = cache
    import datasets
    from trl.data_utils import pack_dataset

    from sftpack.templates import ALPACA_TEMPLATE

    datasets.disable_progress_bars()
    tok = make_hf_llama3()
    eos = tok.eos_token_id
    fmt = ALPACA_TEMPLATE.format

    def fmt_tok(batch):
        texts = [fmt(instruction=p, response=r) for p, r in zip(batch["prompt"], batch["response"])]
        ids = tok(texts)["input_ids"]  # BOS prepended by the post-processor
        return {"input_ids": [x + [eos] for x in ids]}

    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=a["input"], split="train", cache_dir=cache)
    t1 = time.perf_counter()
    ds = ds.map(fmt_tok, batched=True, num_proc=a.get("num_proc", 2), remove_columns=ds.column_names)
    t2 = time.perf_counter()
    packed = pack_dataset(ds, a["seq_length"], strategy=a.get("strategy", "bfd"))
    t3 = time.perf_counter()
    return {"seconds": t3 - t0, "phase_load": t1 - t0, "phase_map": t2 - t1, "phase_pack": t3 - t2,
            "rows": len(packed), "documents": len(ds), "input_bytes": os.path.getsize(a["input"]),
            "strategy": a.get("strategy", "bfd")}


def w_serve(a: dict) -> dict:
    t0 = time.perf_counter()
    import sftpack
    import torch  # noqa: F401  (import cost reported separately from open time)
    from sftpack.dataset import open_packed
    from sftpack.loader import iterate_batches

    t_import = time.perf_counter() - t0
    t = time.perf_counter()
    ds = open_packed(a["store"])
    t_open = time.perf_counter() - t
    n_rows = len(ds)
    t = time.perf_counter()
    sftpack.open_packed(a["store"], verify=True)
    t_verify = time.perf_counter() - t
    torch.manual_seed(0)
    loader = iterate_batches(ds, batch_size=a["batch_size"], shuffle=True)
    rows = toks = batches = 0
    t = time.perf_counter()
    first = None
    for batch in loader:
        x = batch["input_ids"]
        if first is None:
            first = time.perf_counter() - t
        rows += x.shape[0]
        toks += x.numel()
        batches += 1
    t_epoch = time.perf_counter() - t
    return {"import_s": t_import, "open_s": t_open, "open_verify_s": t_verify, "rows": rows, "dataset_rows": n_rows,
            "tokens": toks, "batches": batches, "epoch_s": t_epoch, "first_batch_s": first}


WORKERS = {"build": w_build, "raw": w_raw, "hf_ref": w_hf_ref, "trl": w_trl, "serve": w_serve}


def worker_main(name: str, args_json: str) -> None:
    res = WORKERS[name](json.loads(args_json))
    res.update({"self_" + k: v for k, v in _rss_now().items()})
    sys.stdout.flush()
    print(RESULT_TAG + json.dumps(res), flush=True)


# --------------------------------------------------------------------------- orchestration


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _proc_kb(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kb(pid: int) -> int:
    return _proc_kb(f"/proc/{pid}/smaps_rollup", "Pss:")


def _anon_kb(pid: int) -> int:
    """Anonymous resident memory (heap, arrays), without file-backed pages such as memory maps."""
    return _proc_kb(f"/proc/{pid}/status", "RssAnon:")


class TreeSampler(threading.Thread):
    """Samples the sums of PSS and of anonymous RSS over a process tree; keeps the peaks."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak_kb, self.anon_kb, self.max_procs = pid, interval, 0, 0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            kids = _children_map()
            tree, todo = [], [self.pid]
            while todo:
                p = todo.pop()
                tree.append(p)
                todo.extend(kids.get(p, []))
            total = sum(_pss_kb(p) for p in tree)
            self.peak_kb = max(self.peak_kb, total)
            self.anon_kb = max(self.anon_kb, sum(_anon_kb(p) for p in tree))
            self.max_procs = max(self.max_procs, len(tree))
            self.stop.wait(self.interval)


def run_child(cmd: list[str], label: str, env: dict | None = None, timeout: float | None = None) -> dict:
    """Run cmd; return its RESULT dict (if any) plus wall time, wait4 maxrss and tree PSS peak."""
    log_dir = OUT / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    so, se = log_dir / f"{label}.out", log_dir / f"{label}.err"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(so, "wb") as fo, open(se, "wb") as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=full_env, cwd=ROOT)
        sampler = TreeSampler(p.pid)
        sampler.start()
        killer = None
        if timeout:
            killer = threading.Timer(timeout, p.kill)
            killer.start()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        if killer:
            killer.cancel()
        sampler.stop.set()
        sampler.join()
    res: dict = {}
    for line in so.read_text(errors="replace").splitlines():
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG) :])
    res.update({"wall": wall, "maxrss_mb": ru.ru_maxrss / 1024, "tree_pss_mb": sampler.peak_kb / 1024,
                "anon_mb": sampler.anon_kb / 1024, "cpu_s": ru.ru_utime + ru.ru_stime, "procs": sampler.max_procs, "rc": p.returncode,
                "loadavg_after": os.getloadavg()[0]})
    if p.returncode != 0:
        err = se.read_text(errors="replace").strip().splitlines()
        res["error"] = " | ".join(err[-3:]) if err else f"exit code {p.returncode}"
    return res


def run_worker(name: str, args: dict, label: str, **kw) -> dict:
    return run_child([sys.executable, str(Path(__file__).resolve()), "--_worker", name, "--_args", json.dumps(args)],
                     label, **kw)


def machine_info() -> list[str]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    from importlib import metadata

    vers = []
    for pkg in ("sftpack", "quicktok-v1", "numpy", "torch", "tokenizers", "transformers", "datasets", "trl"):
        try:
            vers.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            vers.append(f"{pkg} -")
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return [
        f"date:     {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine:  nproc={affinity} (os.cpu_count={os.cpu_count()}), CPU: {cpu}, RAM {mem}",
        f"python:   {platform.python_version()} ({platform.platform()})",
        f"packages: {', '.join(vers)}",
    ]


def trl_available() -> str | None:
    r = subprocess.run([sys.executable, "-c", "import datasets, trl.data_utils; trl.data_utils.pack_dataset"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return (r.stderr.strip().splitlines() or ["import failed"])[-1]
    return None


def fmt(x, spec=".1f", none="-"):
    return none if x is None else format(x, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=300, help="corpus size in MB (default 300)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--hf-cap-mb", type=float, default=20, help="subset for the one-giant-string HF reference")
    ap.add_argument("--trl-cap-mb", type=float, default=50, help="subset for the TRL baseline")
    ap.add_argument("--trl-strategy", default="bfd", choices=("bfd", "bfd_split", "wrapped"))
    ap.add_argument("--repeat", type=int, default=5, help="runs of raw tokenizer and build (best is used)")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-extras", action="store_true", help="skip the build variants (shuffle, masks, CLI)")
    ap.add_argument("--rss-scaling", action="store_true",
                    help="also build at 1/4 of the corpus (half and full are always measured)")
    ap.add_argument("--regen", action="store_true", help="regenerate the corpus even if cached")
    ap.add_argument("--keep", action="store_true", help="keep the built stores under bench/out/")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_args", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        worker_main(args._worker, args._args)
        return 0

    started = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    print("\n".join(machine_info()), flush=True)
    load0 = os.getloadavg()
    print(f"load:     {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} (1/5/15 min) at start", flush=True)

    # ---- corpus
    tag = f"{args.mb:g}mb_seed{args.seed}_v{GEN_VERSION}"
    corpus = OUT / f"corpus_{tag}.jsonl"
    if args.regen or not corpus.exists():
        print(f"generating {corpus.relative_to(ROOT)} ...", flush=True)
        g = generate_corpus(corpus, args.mb, args.seed)
        print(f"  {g['records']:,} records, {g['bytes'] / MB:.1f} MB in {g['seconds']:.1f} s "
              f"({g['bytes'] / MB / g['seconds']:.0f} MB/s)", flush=True)
    else:
        print(f"reusing {corpus.relative_to(ROOT)}", flush=True)
    size = corpus.stat().st_size
    half = prefix_file(corpus, OUT / f"half_{tag}.jsonl", size / 2 / MB)
    quarter = prefix_file(corpus, OUT / f"quarter_{tag}.jsonl", size / 4 / MB) if args.rss_scaling else None
    hf_in = prefix_file(corpus, OUT / f"cap{args.hf_cap_mb:g}_{tag}.jsonl", args.hf_cap_mb)
    trl_in = prefix_file(corpus, OUT / f"cap{args.trl_cap_mb:g}_{tag}.jsonl", args.trl_cap_mb)
    _corpus_stats(corpus)
    # warm the page cache for everyone alike
    with open(corpus, "rb") as f:
        while f.read(1 << 24):
            pass

    stores = OUT / "stores"
    shutil.rmtree(stores, ignore_errors=True)
    stores.mkdir()
    L = args.seq_length
    R: dict[str, dict] = {}

    def step(label, fn):
        print(f"[{time.perf_counter() - started:6.1f}s] {label} ...", flush=True)
        r = fn()
        R[label] = r
        if r.get("error"):
            print(f"    FAILED: {r['error']}", flush=True)
        else:
            mbs = r["input_bytes"] / MB / r["seconds"] if r.get("seconds") and r.get("input_bytes") else None
            print(f"    {fmt(r.get('seconds'), '.2f')} s, {fmt(mbs)} MB/s, peak RSS {r['maxrss_mb']:.0f} MB, "
                  f"wall {r['wall']:.1f} s", flush=True)
        return r

    # raw tokenizer and sftpack build, interleaved and repeated: the best run of each is the
    # least disturbed by anything else on the machine; the median is shown too.
    runs: dict[str, list[dict]] = {"raw": [], "build": []}
    for i in range(args.repeat):
        runs["raw"].append(step(f"raw#{i + 1}", lambda: run_worker("raw", {"input": str(corpus)}, f"raw{i + 1}")))
        shutil.rmtree(stores / "main", ignore_errors=True)
        runs["build"].append(step(f"build#{i + 1}", lambda: run_worker(
            "build", {"input": str(corpus), "out": str(stores / "main"), "seq_length": L}, f"build{i + 1}")))
    for key, rs in runs.items():
        R[key] = _best_of(rs)
    R["paired"] = [b["input_bytes"] / b["seconds"] / (r["input_bytes"] / r["seconds"])
                   for r, b in zip(runs["raw"], runs["build"]) if not r.get("error") and not b.get("error")]
    step("build_half", lambda: run_worker("build", {"input": str(half), "out": str(stores / "half"),
                                                    "seq_length": L}, "build_half"))
    if quarter is not None:
        step("build_quarter", lambda: run_worker("build", {"input": str(quarter), "out": str(stores / "quarter"),
                                                           "seq_length": L}, "build_quarter"))
    if not args.no_extras:
        step("build_shuffle", lambda: run_worker("build", {"input": str(corpus), "out": str(stores / "shuf"),
                                                           "seq_length": L, "shuffle": True, "seed": 0},
                                                 "build_shuffle"))
        shutil.rmtree(stores / "shuf", ignore_errors=True)
        step("build_mask", lambda: run_worker("build", {"input": str(corpus), "out": str(stores / "mask"),
                                                        "seq_length": L, "train_on_prompt": False}, "build_mask"))
        shutil.rmtree(stores / "mask", ignore_errors=True)

        def cli():
            r = run_child([sys.executable, "-m", "sftpack.cli", "build", str(corpus), "--out", str(stores / "cli"),
                           "--seq-length", str(L), "--quiet", "--force"], "build_cli")
            r.update({"seconds": r["wall"], "input_bytes": size})
            return r

        step("build_cli", cli)
        shutil.rmtree(stores / "cli", ignore_errors=True)
    if not args.no_hf:
        ref_ids = OUT / "hf_ref_ids.npy"
        step("hf_ref", lambda: run_worker("hf_ref", {"input": str(hf_in), "seq_length": L,
                                                     "save_ids": str(ref_ids)}, "hf_ref"))
        if not R["hf_ref"].get("error"):
            # exactness: sftpack's stream on the same subset must equal the reference's ids
            step("build_subset", lambda: run_worker("build", {"input": str(hf_in), "out": str(stores / "subset"),
                                                              "seq_length": L}, "build_subset"))
            R["exact"] = _compare_streams(ref_ids, stores / "subset")
            print(f"    exactness vs reference on the subset: {R['exact']}", flush=True)
            shutil.rmtree(stores / "subset", ignore_errors=True)
        ref_ids.unlink(missing_ok=True)
    trl_missing = "disabled (--no-trl)" if args.no_trl else trl_available()
    if trl_missing is None:
        cache = Path(tempfile.mkdtemp(prefix="hfcache-", dir=OUT))
        try:
            step("trl", lambda: run_worker("trl", {"input": str(trl_in), "seq_length": L, "cache": str(cache),
                                                   "strategy": args.trl_strategy, "num_proc": 2}, "trl"))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    step("serve", lambda: run_worker("serve", {"store": str(stores / "main"), "batch_size": args.batch_size},
                                     "serve"))
    if not args.keep:
        shutil.rmtree(stores, ignore_errors=True)

    report(R, args, corpus, size, hf_in, trl_in, trl_missing, time.perf_counter() - started, load0)
    return 0


def _best_of(rs: list[dict]) -> dict:
    ok = [r for r in rs if not r.get("error")]
    if not ok:
        return rs[-1]
    best = dict(min(ok, key=lambda r: r["seconds"]))
    secs = sorted(r["seconds"] for r in ok)
    best["all_seconds"] = [r["seconds"] for r in ok]
    best["median_seconds"] = secs[len(secs) // 2]
    best["maxrss_mb"] = max(r["maxrss_mb"] for r in ok)
    best["tree_pss_mb"] = max(r["tree_pss_mb"] for r in ok)
    best["anon_mb"] = max(r["anon_mb"] for r in ok)
    return best


def _compare_streams(ref_ids: Path, store: Path) -> str:
    import numpy as np

    ref = np.load(ref_ids, mmap_mode="r")
    got = np.load(store / "tokens.npy", mmap_mode="r")
    if len(ref) != len(got):
        return f"MISMATCH: reference {len(ref):,} tokens, sftpack {len(got):,}"
    diff = np.flatnonzero(np.asarray(ref) != np.asarray(got))
    if len(diff):
        return f"MISMATCH: {len(diff):,} of {len(ref):,} tokens differ, first at {int(diff[0]):,}"
    return f"identical ({len(ref):,} tokens)"


def _corpus_stats(path: Path) -> None:
    import numpy as np

    p, r, nonascii, code = [], [], 0, 0
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            if i >= 20000:
                break
            rec = json.loads(line)
            p.append(len(rec["prompt"]))
            r.append(len(rec["response"]))
            nonascii += not (rec["prompt"] + rec["response"]).isascii()
            code += "```" in rec["response"]
    p, r = np.array(p), np.array(r)
    q = lambda a: "/".join(str(int(v)) for v in np.percentile(a, [5, 50, 95]))  # noqa: E731
    print(f"  corpus (first {len(p):,} records): prompt chars p5/p50/p95 {q(p)} (min {p.min()}, max {p.max()}); "
          f"response {q(r)} (min {r.min()}, max {r.max()}); non-ASCII records {nonascii / len(p):.0%}, "
          f"responses with code {code / len(p):.0%}", flush=True)


def report(R, args, corpus, size, hf_in, trl_in, trl_missing, total_s, load0) -> None:
    def mbs(key):
        r = R.get(key)
        if not r or r.get("error") or not r.get("seconds"):
            return None
        return r["input_bytes"] / MB / r["seconds"]

    raw, sft = mbs("raw"), mbs("build")
    if R.get("raw") and not R["raw"].get("error"):
        R["raw_seq"] = {**R["raw"], "seconds": R["raw"]["wall_incl_read_render"]}
    rows = [
        ("raw", "raw tokenizer: quicktok encode_batch only (4 MB batches, all threads)"),
        ("raw_seq", "  same run, JSON parse + render + encode_batch, sequential (no overlap)"),
        ("build", "sftpack build (API, build() wall)"),
        ("build_cli", "sftpack build (CLI, process wall incl. start-up)"),
        ("build_shuffle", "sftpack build --shuffle"),
        ("build_mask", "sftpack build --no-train-on-prompt"),
        ("build_half", "sftpack build, half corpus"),
        ("build_quarter", "sftpack build, quarter corpus"),
        ("hf_ref", f"reference: one giant string, HF tokenizer ({hf_in.stat().st_size / MB:.0f} MB subset)"),
        ("trl", f"TRL: load_dataset+map(HF, num_proc=2)+pack_dataset[{args.trl_strategy}] "
                f"({trl_in.stat().st_size / MB:.0f} MB subset)"),
    ]
    print()
    print(f"corpus: {corpus.relative_to(ROOT)}  {size / MB:.1f} MB JSONL, seq_length {args.seq_length}; "
          "MB = 1e6 bytes of JSONL input")
    head = (f"{'approach':<78} {'MB in':>6} {'sec':>7} {'MB/s':>6} {'x raw':>6} {'x sft':>6} {'RSS MB':>7} "
            f"{'tree MB':>7} {'anon MB':>7} {'CPU s':>6}")
    print(head)
    print("-" * len(head))
    for key, name in rows:
        if key == "trl" and trl_missing is not None:
            print(f"{'TRL baseline':<78} not available: {trl_missing}")
            continue
        r = R.get(key)
        if r is None:
            continue
        if r.get("error"):
            print(f"{name:<78} FAILED: {r['error'][:120]}")
            continue
        v = mbs(key)
        print(f"{name:<78} {r['input_bytes'] / MB:>6.1f} {r['seconds']:>7.2f} {fmt(v):>6} "
              f"{fmt(v / raw if v and raw else None, '.2f'):>6} {fmt(v / sft if v and sft else None, '.2f'):>6} "
              f"{r['maxrss_mb']:>7.0f} {r['tree_pss_mb']:>7.0f} {r['anon_mb']:>7.0f} {r['cpu_s']:>6.1f}")
    print("-" * len(head))
    print("sec: the timed region (raw: encode_batch calls only; build: build(); CLI: process wall; others: see below)."
          f" raw and build: best of {args.repeat} interleaved runs.")
    print("RSS MB: wait4 ru_maxrss of the child (largest process of its tree); tree MB: sampled peak of summed PSS "
          "over the child's process tree (every 0.25 s); anon MB: sampled peak of summed RssAnon (heap and arrays, "
          "not memory-mapped file pages, which the kernel can drop); CPU s: user+sys of the whole child process (incl. imports, "
          "and for raw the untimed JSON parsing and rendering).")
    for key in ("raw", "build"):
        r = R.get(key)
        if r and r.get("all_seconds"):
            print(f"  {key} runs: " + ", ".join(f"{x:.2f}" for x in r["all_seconds"]) +
                  f" s (median {r['median_seconds']:.2f} s = {r['input_bytes'] / MB / r['median_seconds']:.1f} MB/s)")

    s = R.get("serve")
    if s and not s.get("error"):
        print(f"reopen:  open_packed {s['open_s'] * 1e3:.1f} ms, open_packed(verify=True) {s['open_verify_s']:.2f} s "
              f"(import sftpack+torch {s['import_s']:.2f} s, not included)")
        print(f"epoch:   iterate_batches(batch_size={args.batch_size}, shuffle=True), {s['batches']:,} batches, "
              f"{s['rows']:,} rows in {s['epoch_s']:.2f} s = {s['rows'] / s['epoch_s']:,.0f} rows/s, "
              f"{s['tokens'] / s['epoch_s'] / 1e6:.2f} M tokens/s; peak RSS {s['maxrss_mb']:.0f} MB "
              f"(anonymous {s['anon_mb']:.0f} MB; the rest is the memory-mapped store)")
    elif s:
        print(f"serve FAILED: {s['error']}")

    details = []
    b = R.get("build")
    if b and not b.get("error"):
        details.append(f"build: {b['documents']:,} docs, {b['tokens']:,} tokens, {b['sequences']:,} rows; "
                       f"RSS after imports {fmt(b.get('rss_before_mb'), '.0f')} MB, "
                       f"process wall {b['wall']:.1f} s")
    r = R.get("raw")
    if r and not r.get("error"):
        expect = r["tokens"] + 2 * r["documents"] - 1  # + BOS and EOS per document, - the final EOS
        same = "?" if not b or b.get("error") else ("matches" if b["tokens"] == expect else
                                                     f"MISMATCH (sftpack {b['tokens']:,})")
        details.append(f"raw: {r['tokens']:,} tokens; + BOS/EOS per doc - final EOS = {expect:,}: sftpack stream "
                       f"{same}; read+render+encode in one thread then encode (not overlapped): "
                       f"{r['wall_incl_read_render']:.1f} s = {r['input_bytes'] / MB / r['wall_incl_read_render']:.1f} "
                       "MB/s")
    h = R.get("hf_ref")
    if h and not h.get("error"):
        details.append(f"hf_ref: render+join {h['phase_render_join']:.1f} s, encode {h['phase_encode']:.1f} s, "
                       f"tensor {h['phase_tensor']:.1f} s ({h['tokens']:,} tokens); tokenizer construction "
                       f"{h['tokenizer_construct_s']:.1f} s not timed")
    t = R.get("trl")
    if t and not t.get("error"):
        details.append(f"trl: load {t['phase_load']:.1f} s, map {t['phase_map']:.1f} s, pack {t['phase_pack']:.1f} s; "
                       f"{t['documents']:,} docs -> {t['rows']:,} rows; up to {t['procs']} processes")
    if R.get("exact"):
        details.append(f"exactness: sftpack stream vs the HF one-giant-string reference on the "
                       f"{hf_in.stat().st_size / MB:.0f} MB subset: {R['exact']}")
    for d in details:
        print("  " + d)

    print()
    print("RSS vs input size (sftpack build):")
    for key in ("build_quarter", "build_half", "build"):
        r = R.get(key)
        if r and not r.get("error"):
            print(f"  {r['input_bytes'] / MB:>8.1f} MB input -> peak RSS {r['maxrss_mb']:.0f} MB, "
                  f"peak anonymous {r['anon_mb']:.0f} MB (after imports {fmt(r.get('rss_before_mb'), '.0f')} MB)")

    print()
    print("goals:")
    if sft and raw:
        ok = sft >= 0.7 * raw
        print(f"  build >= 0.7x raw tokenizer: {sft:.1f} / {raw:.1f} MB/s = {sft / raw:.2f}x  "
              f"{'PASS' if ok else 'FAIL'}  (best of each)")
        paired = sorted(R.get("paired") or [])
        if paired:
            print(f"    per-pair ratios (build run i / raw run i, back to back): "
                  f"{', '.join(f'{x:.2f}' for x in R['paired'])}; median {paired[len(paired) // 2]:.2f}x")
        r, b = R["raw"], R["build"]
        if r.get("encode_cpu_s") and b.get("build_cpu_s"):
            print(f"    CPU time (less sensitive to other load): raw encode_batch {r['encode_cpu_s']:.1f} CPU-s "
                  f"({r['encode_cpu_s'] / r['seconds']:.2f} cores busy), raw incl. JSON+render "
                  f"{r['cpu_s']:.1f} CPU-s (whole process), sftpack build() {b['build_cpu_s']:.1f} CPU-s "
                  f"({b['build_cpu_s'] / b['seconds']:.2f} cores busy)")
    else:
        print("  build >= 0.7x raw tokenizer: not measured")
    tv = mbs("trl")
    if sft and tv:
        ok = sft >= 8 * tv
        print(f"  build >= 8x TRL:             {sft:.1f} / {tv:.1f} MB/s = {sft / tv:.1f}x  {'PASS' if ok else 'FAIL'}")
    else:
        print(f"  build >= 8x TRL:             not measured ({trl_missing or 'TRL run failed'})")
    load1 = os.getloadavg()
    print(f"\nload average at start {load0[0]:.2f}, at end {load1[0]:.2f} (nproc {os.cpu_count()}); "
          "other work on the machine makes every number noisy")
    print(f"total benchmark time {total_s:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
