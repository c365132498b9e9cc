"""GPU check: packed rows through attention score every document as if it were alone.

The CPU test suite checks document isolation on CPU in float32 (`sftpack.isolation`). The GPU runs other
kernels (SDPA's flash / memory-efficient kernels, compiled FlexAttention, flash-attn varlen) and
bfloat16, where a wrong mask or a kernel that ignores one would show. This script takes the rows of a bfd
store holding the most document pieces and compares, for every piece, a tiny random Llama's logits and
per-token loss on the packed row against the same tokens run alone, for:

  (a) SDPA through `sftpack.hf.DataCollator` (padded rows, and `padding_free=True`): transformers finds
      the documents from `position_ids` (this is `sftpack.isolation.check_isolation`, run on the device);
  (b) `flex_attention` with `sftpack.attention.document_block_mask` (the mask built compiled on CUDA) as
      the model's attention mask; alone, a piece sits at the start of a row under a plain causal mask
      (nothing precedes it and causality hides what follows), so one shape is compiled once;
  (c) transformers' `flash_attention_2` (flash-attn varlen from `position_ids`), only if `flash_attn` imports.

Each dtype also runs negative controls (the packed rows under a plain causal mask: documents attend to
each other), which must differ by more than the tolerance, else the check could not have failed.
A timing (packed forward vs each document alone, tokens/s) is printed as information only.

    python bench/gpu_check.py                              # builds a store from examples/sample.jsonl
    python bench/gpu_check.py --store DIR --device cpu     # a bfd store with pad=True (the default)

Exits 1 when any case fails.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sftpack import open_packed
from sftpack.attention import document_block_mask
from sftpack.isolation import _token_loss, check_isolation, rows_to_check, tiny_llama

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample.jsonl"
# (per-token loss, logit) absolute tolerances. float32: rounding of reductions of other lengths;
# bfloat16: a few units in the last place of logits of order 1 (its epsilon is 2**-7 = 0.0078).
TOLERANCES = {"float32": (1e-4, 1e-4), "bfloat16": (2e-2, 5e-2)}


def tolerances(dtype: str) -> tuple[float, float]:
    """(loss, logit) tolerances of `dtype`; a half-precision dtype other than bfloat16 gets bfloat16's."""
    return TOLERANCES.get(dtype, TOLERANCES["bfloat16"])


def log(*parts: Any) -> None:
    print(*parts, flush=True)


def build_store(out: Path, seq_length: int) -> Path:
    """A bfd store of the bundled sample (needs sftpack's build dependencies, quicktok included)."""
    from sftpack.build import BuildOptions, build

    return Path(build(SAMPLE, out, BuildOptions(seq_length=seq_length, packing="bfd"), "llama3", progress=False).path)


def flex_case(store: Path, rows: int, seed: int, device: str, dtype: str, control: bool = False) -> tuple[float, float]:
    """(b): max |loss diff| and max |logit diff| over every piece of the checked rows, packed under
    `document_block_mask(seq_lens)` vs alone; `control=True` packs under a plain causal mask instead."""
    ds = open_packed(store, boundaries=True)
    chosen = rows_to_check(ds, rows)
    items = [ds[r] for r in chosen]
    length = ds.seq_length
    if any(len(item["input_ids"]) != length for item in items):
        raise SystemExit(f"{store}: rows of different lengths (pad=False); open or build it with pad=True")
    vocab = int(ds.store.manifest["tokenizer"]["vocab_size"])
    model = tiny_llama(vocab, length, seed, "flex_attention", device=device, dtype=dtype)
    compile_mask = torch.device(device).type == "cuda"
    batch = len(items)
    causal = document_block_mask([[length]] * batch, device=device, compile=compile_mask)

    def forward(ids: torch.Tensor, positions: torch.Tensor, mask: Any) -> torch.Tensor:
        with torch.no_grad():
            out = model(
                input_ids=ids.to(device), position_ids=positions.to(device), attention_mask=mask, use_cache=False
            )
        return out.logits.float()

    ids = torch.stack([item["input_ids"] for item in items])
    positions = torch.stack([item["position_ids"] for item in items])
    seq_lens = [item["seq_lens"] for item in items]
    mask = causal if control else document_block_mask(seq_lens, device=device, compile=compile_mask)
    packed = forward(ids, positions, mask)

    pieces = []  # (row in batch, start, length)
    for b, lens in enumerate(seq_lens):
        start = 0
        for n in lens.tolist():
            pieces.append((b, start, n))
            start += n
    max_loss = max_logit = 0.0
    filler = int(items[0]["input_ids"][-1])
    for i in range(0, len(pieces), batch):  # alone: `batch` pieces at a time, the packed batch's shape
        chunk = pieces[i : i + batch]
        alone_ids = torch.full((batch, length), filler, dtype=ids.dtype)
        alone_pos = torch.arange(length).repeat(batch, 1)
        for j, (b, s, n) in enumerate(chunk):
            alone_ids[j, :n] = ids[b, s : s + n]
            alone_pos[j, :n] = positions[b, s : s + n]
        alone = forward(alone_ids, alone_pos, causal)
        for j, (b, s, n) in enumerate(chunk):
            labels = items[b]["labels"][s : s + n].to(device)
            a, p = alone[j, :n], packed[b, s : s + n]
            compare = labels != -100
            if compare.any():
                loss_diff = (_token_loss(a, labels) - _token_loss(p, labels)).abs()[compare]
                max_loss = max(max_loss, float(loss_diff.max()))
            max_logit = max(max_logit, float((a - p).abs().max()))
    return max_loss, max_logit


def timing(store: Path, rows: int, seed: int, device: str, dtype: str, reps: int = 5) -> str:
    """Information only: real tokens/s of the packed rows in one forward vs each document alone (SDPA)."""
    import sftpack.hf

    ds = open_packed(store, boundaries=True)
    chosen = rows_to_check(ds, rows)
    real = ds.view.pieces_per_row()  # documents per row, padding excluded
    hf = ds.with_labels("hf")
    batch = {k: v.to(device) for k, v in sftpack.hf.DataCollator()([hf[r] for r in chosen]).items() if k != "use_cache"}
    model = tiny_llama(
        int(ds.store.manifest["tokenizer"]["vocab_size"]), ds.seq_length, seed, device=device, dtype=dtype
    )
    docs = []
    for b, r in enumerate(chosen):
        start = 0
        for n in ds[r]["seq_lens"].tolist()[: int(real[r])]:
            docs.append(
                (batch["input_ids"][b : b + 1, start : start + n], batch["position_ids"][b : b + 1, start : start + n])
            )
            start += n
    tokens = sum(ids.shape[1] for ids, _ in docs)

    def clock(fn: Callable[[], None]) -> float:
        for _ in range(2):
            fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / reps

    def packed() -> None:
        with torch.no_grad():
            model(**batch, use_cache=False)

    def alone() -> None:
        with torch.no_grad():
            for ids, pos in docs:
                model(input_ids=ids, position_ids=pos, use_cache=False)

    t_packed, t_alone = clock(packed), clock(alone)
    return (
        f"timing ({dtype}, sdpa, {tokens} real tokens, {len(docs)} documents, {len(chosen)} rows of {ds.seq_length}): "
        f"packed {tokens / t_packed:,.0f} tokens/s, alone {tokens / t_alone:,.0f} tokens/s, "
        f"packed/alone {t_alone / t_packed:.1f}x (information only)"
    )


def flash_attn_missing() -> str | None:
    """Why flash-attn cannot be checked here, or None when it can."""
    try:
        importlib.import_module("flash_attn")
    except Exception as e:  # ImportError, or a broken build raising something else
        return f"flash_attn does not import ({type(e).__name__}: {e})"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, help="a bfd store (pad=True); default: build one from the sample")
    ap.add_argument("--seq-length", type=int, default=512, help="of the store built when --store is not given")
    ap.add_argument("--rows", type=int, default=4, help="rows holding the most document pieces to check")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-timing", action="store_true")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here: run with --device cpu")

    import transformers

    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    log(f"{where}; torch {torch.__version__} (CUDA {torch.version.cuda}); transformers {transformers.__version__}")
    tmp = None
    store = args.store
    if store is None:
        tmp = tempfile.TemporaryDirectory()
        store = build_store(Path(tmp.name) / "store", args.seq_length)
    ds = open_packed(store, boundaries=True)
    chosen = rows_to_check(ds, args.rows)
    log(
        f"store {store}: {len(ds)} rows of {ds.seq_length} ({ds.view.plan.__class__.__name__}); rows checked "
        f"{chosen}, document pieces {[int(ds.view.pieces_per_row()[r]) for r in chosen]}"
    )

    results: list[tuple[str, str, float, float, str]] = []  # case, dtype, loss diff, logit diff, verdict

    def record(case: str, dtype: str, loss: float, logit: float, control: bool = False) -> None:
        tol_loss, tol_logit = tolerances(dtype)
        within = loss <= tol_loss and logit <= tol_logit
        # a control must differ (the mask matters on these rows); a case must not
        verdict = "PASS" if within != control else "FAIL"
        results.append((case, dtype, loss, logit, verdict))
        log(
            f"{verdict}  {case:<52} {dtype:<9} max|loss diff| {loss:.3g} (tol {tol_loss:g})  "
            f"max|logit diff| {logit:.3g} (tol {tol_logit:g})"
        )

    def collator_cases(label: str, attn: str, dtype: str) -> None:
        """The documented HF path, padded and padding-free, with attention `attn`."""
        for padding_free in (False, True):
            t = time.perf_counter()
            rep = check_isolation(
                store,
                args.rows,
                args.seed,
                tolerances(dtype)[0],
                padding_free=padding_free,
                attn_implementation=attn,
                device=args.device,
                dtype=dtype,
            )
            if not rep.shared_rows:
                raise SystemExit("no checked row holds two documents: isolation is untested; pick another store")
            record(
                f"{label}, DataCollator(padding_free={padding_free})", dtype, rep.max_abs_diff, rep.max_abs_logit_diff
            )
            log(f"      {rep.pieces} pieces, {rep.tokens} tokens compared, {time.perf_counter() - t:.1f} s")

    missing_flash = flash_attn_missing()
    for dtype in args.dtypes.split(","):
        collator_cases("(a) sdpa", "sdpa", dtype)
        rep = check_isolation(store, args.rows, args.seed, packed_positions=False, device=args.device, dtype=dtype)
        record("control: sdpa, no position_ids (must differ)", dtype, rep.max_abs_diff, rep.max_abs_logit_diff, True)
        t = time.perf_counter()
        record(
            "(b) flex_attention + document_block_mask",
            dtype,
            *flex_case(store, args.rows, args.seed, args.device, dtype),
        )
        log(f"      {time.perf_counter() - t:.1f} s (compiles included)")
        record(
            "control: flex_attention, causal mask (must differ)",
            dtype,
            *flex_case(store, args.rows, args.seed, args.device, dtype, control=True),
            control=True,
        )
        if missing_flash is None and args.device.startswith("cuda") and dtype != "float32":
            collator_cases("(c) flash_attention_2", "flash_attention_2", dtype)
    if missing_flash is not None:
        log(f"SKIP  (c) flash_attention_2: not checked, {missing_flash}")
    elif not args.device.startswith("cuda"):
        log("SKIP  (c) flash_attention_2: needs CUDA")
    if not args.no_timing:
        for dtype in args.dtypes.split(","):
            log(timing(store, args.rows, args.seed, args.device, dtype))
    failed = [r for r in results if r[4] == "FAIL"]
    log(f"{'FAIL' if failed else 'PASS'}: {len(results) - len(failed)}/{len(results)} cases as expected on {where}")
    if tmp is not None:
        tmp.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
