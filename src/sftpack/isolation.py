"""Document isolation check: packed rows must score every document as if it were alone.

`check_isolation` runs a tiny randomly initialised Llama (CPU and float32 unless `device` /
`dtype` say otherwise; its config's defaults, `use_cache=True` included) over the rows
holding the most documents, twice:

- packed: the path sftpack documents for Hugging Face models, as it is run: the rows served
  with `labels="hf"`, batched by `sftpack.hf.DataCollator` (padded, or padding-free with
  `padding_free=True`), then `model(**batch)`. The batch holds `position_ids` and no
  attention mask; transformers (`masking_utils.find_packed_sequence_indices`) then treats
  every place where the positions do not step by exactly 1 as a document start and builds
  a block-diagonal causal mask, so no token attends to another document. It does so on
  SDPA/eager only when no KV cache is present: the batch's `use_cache=False` sees to it
  (`use_cache=None` leaves it out, and the model's default cache turns the detection off:
  a negative control);
- alone: every document piece of every row by itself, with its own slice of the row's
  positions (a piece that continues a document from an earlier row keeps its continuing
  positions; RoPE only sees position differences, and the same positions are used in
  both runs anyway).

It compares the per-token cross-entropy against the row's labels (ignoring -100). The
label at the last token of a piece that ends at a document boundary targets the next
document's first token (a cross-document label): neither run can predict it from the
piece, and it says nothing about isolation, so those positions are left out; every
other supervised position of the piece (including a row's last position when its
document continues into the next row) is compared. `max_abs_logit_diff` compares the
logits of every position of every piece, supervised or not (reported, not part of
`passed`).

torch and transformers are imported inside the functions, so importing this module
(the CLI does) stays light.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

ATTN_IMPLEMENTATION = "sdpa"
ROWS_PER_BATCH = 2  # rows run through the model at once: logits are rows x seq_length x vocabulary floats


@dataclass(frozen=True)
class PieceResult:
    """One document piece: row, index of the piece in its row, its span in the row,
    the supervised positions compared and their largest loss difference."""

    row: int
    index: int
    start: int
    length: int
    tokens: int
    max_abs_diff: float


@dataclass(frozen=True)
class IsolationReport:
    """The outcome of `check_isolation`.

    rows: rows checked; pieces: document pieces run alone (a document cut by a row end
    counts once per row); tokens: per-token losses compared; max_abs_diff: the largest
    absolute difference of per-token loss between the packed and the alone runs;
    passed: at least one token compared and max_abs_diff <= atol.
    """

    rows: int
    pieces: int
    tokens: int
    max_abs_diff: float
    atol: float
    passed: bool
    max_abs_logit_diff: float = 0.0
    packed_positions: bool = True
    attn_implementation: str = ATTN_IMPLEMENTATION
    padding_free: bool = False
    shared_rows: int = 0  # checked rows holding two or more document pieces: where isolation is at stake
    device: str = "cpu"
    dtype: str = "float32"
    details: tuple[PieceResult, ...] = field(default=(), repr=False)

    @property
    def documents(self) -> int:
        """Alias of `pieces`."""
        return self.pieces

    def lines(self) -> list[str]:
        verdict = "PASSED" if self.passed else "FAILED"
        path = (
            f"sftpack.hf.DataCollator(padding_free={self.padding_free}) -> model(**batch), {self.attn_implementation}"
        )
        if (self.device, self.dtype) != ("cpu", "float32"):
            path += f", {self.device} {self.dtype}"
        return [
            f"isolation check {verdict}",
            f"  path:              {path}",
            f"  rows checked:      {self.rows}",
            f"  document pieces:   {self.pieces}"
            + ("" if self.shared_rows else " (no row holds two: nothing could leak, isolation is untested)"),
            f"  tokens compared:   {self.tokens}",
            f"  max |loss diff|:   {self.max_abs_diff:.3g} (atol {self.atol:g})",
            f"  max |logit diff|:  {self.max_abs_logit_diff:.3g}",
        ]


def tiny_llama(
    vocab_size: int,
    max_positions: int,
    seed: int = 0,
    attn_implementation: str = ATTN_IMPLEMENTATION,
    *,
    device: str = "cpu",
    dtype: str = "float32",
) -> Any:
    """A small randomly initialised `LlamaForCausalLM` (eval mode), its config otherwise
    transformers' defaults (`use_cache=True`, as a pretrained model's is). The weights are
    drawn in float32 on the CPU from `seed`, then moved to `device` and cast to `dtype`
    (a torch dtype name), so every device and dtype starts from the same model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=int(vocab_size),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=int(max_positions),
        tie_word_embeddings=True,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype=torch.float32)  # type: ignore[call-arg]
    model = model.to(device=device, dtype=torch_dtype(dtype))
    model.eval()
    return model


def torch_dtype(name: str) -> Any:
    """The floating torch dtype called `name` ("float32", "bfloat16", ...), else `ConfigError`."""
    import torch

    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype must name a floating torch dtype (float32, bfloat16, float16), got {name!r}")
    return dtype


def _check_rows(rows: Any) -> None:
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ConfigError(f"rows must be an integer >= 1 (the rows to check), got {rows!r}")


def rows_to_check(ds: Any, rows: int) -> list[int]:
    """The `rows` rows of `ds` holding the most document pieces (first rows on ties), in order."""
    import numpy as np

    _check_rows(rows)
    return sorted(np.argsort(-ds.view.pieces_per_row(), kind="stable")[:rows].tolist())


def _forward(model: Any, input_ids: Any, position_ids: Any | None) -> Any:
    import torch

    with torch.no_grad():
        out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    return out.logits.float()


def _token_loss(logits: Any, labels: Any) -> Any:
    import torch.nn.functional as F

    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).reshape(labels.shape)


def check_isolation(
    path: str | os.PathLike,
    rows: int = 4,
    seed: int = 0,
    atol: float = 1e-4,
    *,
    packed_positions: bool = True,
    attn_implementation: str = ATTN_IMPLEMENTATION,
    padding_free: bool = False,
    use_cache: bool | None = False,
    device: str = "cpu",
    dtype: str = "float32",
) -> IsolationReport:
    """Check that the store at `path` scores each document piece of `rows` rows (those
    holding the most document pieces) the same packed as alone (see the module docstring).

    Works on any store: with `boundaries` the rows' own `position_ids`/`seq_lens` are used,
    otherwise they are computed from the stored document offsets; rows of different lengths
    (bfd with pad=False) are each compared at their own length. `packed_positions=False`
    runs the packed rows without position_ids (plain causal attention across documents):
    a negative control that must fail on rows holding more than one document.
    `padding_free` and `use_cache` are the collator's (see the module docstring). `device`
    and `dtype` place the model (`bench/gpu_check.py` runs this on CUDA in bfloat16 too).
    """
    import torch

    from .dataset import open_packed
    from .hf import DataCollator
    from .plans import ConcatPlan

    _check_rows(rows)  # both before the store is opened
    torch_dtype(dtype)
    ds = open_packed(path, boundaries=True)  # the plan's own positions and document pieces
    if len(ds) < 1:
        raise ConfigError(f"{path}: the store has no rows to check")
    L = ds.seq_length
    vocab_size = int(ds.store.manifest["tokenizer"]["vocab_size"])
    # the rows holding the most document pieces (the first rows of a bfd plan hold one split piece each)
    plan = ds.view.plan
    chosen = rows_to_check(ds, rows)
    n_rows = len(chosen)
    rows_of = {r: ds[r] for r in chosen}  # a few rows: the model's logits, not these, need bounding
    max_pos = max(int(item["position_ids"].max()) for item in rows_of.values()) + 1
    model = tiny_llama(vocab_size, max(L, max_pos), seed, attn_implementation, device=device, dtype=dtype)
    hf = ds.with_labels("hf")
    collator = DataCollator(padding_free=padding_free, use_cache=use_cache)

    details: list[PieceResult] = []
    max_diff = 0.0
    max_logit_diff = 0.0
    tokens = 0
    # concat: a piece's last label targets the next document where one starts right after it
    # (bfd rows already label each piece's last token -100)
    cut_at = set(plan.offsets.tolist()) if isinstance(plan, ConcatPlan) else set()
    for group in (chosen[i : i + ROWS_PER_BATCH] for i in range(0, n_rows, ROWS_PER_BATCH)):  # bounded memory
        # rows may differ in length (bfd with pad=False): each is kept at its own length
        items = [rows_of[r] for r in group]
        lengths = [len(item["input_ids"]) for item in items]
        batch = collator([hf[r] for r in group])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if not packed_positions:
            del batch["position_ids"]
        with torch.no_grad():
            logits = model(**batch).logits.float()
        # padded: row r is logits[r, :its length] (the rest is the collator's padding segment)
        packed = torch.split(logits[0], lengths) if padding_free else [logits[k, :n] for k, n in enumerate(lengths)]
        for r, item, packed_logits in zip(group, items, packed):
            labels, positions, ids = (item[k].to(device) for k in ("labels", "position_ids", "input_ids"))
            positions, ids = positions[None], ids[None]
            packed_loss = _token_loss(packed_logits, labels)
            offset = 0
            for k, n in enumerate(item["seq_lens"].tolist()):
                sl = slice(offset, offset + n)
                piece_logits = _forward(model, ids[:, sl], positions[:, sl])[0]
                piece_labels = labels[sl]
                piece_loss = _token_loss(piece_logits, piece_labels)
                compare = piece_labels != -100
                if r * L + offset + n in cut_at:  # the last label targets the next document (concat)
                    compare[-1] = False
                diff = (piece_loss - packed_loss[sl]).abs()[compare]
                piece_max = float(diff.max()) if diff.numel() else 0.0
                max_logit_diff = max(max_logit_diff, float((piece_logits - packed_logits[sl]).abs().max()))
                details.append(PieceResult(r, k, offset, n, int(compare.sum()), piece_max))
                tokens += int(compare.sum())
                max_diff = max(max_diff, piece_max)
                offset += n

    return IsolationReport(
        shared_rows=len({d.row for d in details if d.index > 0}),
        rows=n_rows,
        pieces=len(details),
        tokens=tokens,
        max_abs_diff=max_diff,
        atol=float(atol),
        passed=tokens > 0 and max_diff <= atol,
        max_abs_logit_diff=max_logit_diff,
        packed_positions=packed_positions,
        attn_implementation=attn_implementation,
        padding_free=padding_free,
        device=str(device),
        dtype=str(dtype),
        details=tuple(details),
    )
