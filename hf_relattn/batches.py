"""Calibration batches: what `head_importance`, `convert(..., batches=...)` and `calibrate` take.

A batch is a dict of model inputs (`input_ids`/`attention_mask`, or `pixel_values`, plus
`labels` where a loss is needed). These helpers check them once, before anything changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn


def batch_list(batches: Any, who: str, *, labels: bool = False) -> list[Mapping[str, Any]]:
    """`batches` (one dict or an iterable of dicts) as a non-empty list, checked."""
    if batches is None:
        raise ValueError(f"{who}: batches is required (an iterable of dicts of model inputs, e.g. input_ids/attention_mask)")
    if isinstance(batches, Mapping):
        batches = [batches]
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise ValueError(f"{who}: batches must be a dict of model inputs or an iterable of them, got {type(batches).__name__}")
    items = list(batches)
    if not items:
        raise ValueError(f"{who}: batches is empty")
    for item in items:
        if not isinstance(item, Mapping) or not any(k in item for k in ("input_ids", "inputs_embeds", "pixel_values")):
            raise ValueError(f"{who}: each batch must be a dict of model inputs with input_ids, inputs_embeds or pixel_values; "
                             f"got {type(item).__name__} {sorted(item) if isinstance(item, Mapping) else ''}")
        if labels and "labels" not in item:
            raise ValueError(f"{who}: each batch must be a dict of model inputs including `labels`")
    return items


def on_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def token_mask(batch: Mapping[str, Any]) -> torch.Tensor | None:
    """(B, T) bool of the real (non-padding) tokens, or None when every token is real."""
    mask = batch.get("attention_mask")
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval-mode numerics (no dropout), every module's train/eval mode restored on exit."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def text_batches(path: str, model: nn.Module, tokenizer: Any, *, tokens: int = 16384, block: int = 512,
                 batch_size: int = 4, text_column: str = "sentence") -> list[dict[str, torch.Tensor]]:
    """Calibration batches of about `tokens` real tokens from a text source (a text file, or a
    .tsv/.csv/.jsonl/save_to_disk table with a `text_column`, as `hf_relattn.finetune` reads).

    Causal LMs get the text packed into blocks of `block` tokens, `labels` = `input_ids` (so
    head importance has a loss); encoders get one row per sequence (truncated to `block`),
    padded per batch, no labels."""
    from .finetune import data as D

    if tokenizer is None:
        raise ValueError("calibration data is text: the model needs a tokenizer")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1 or block < 2 or batch_size < 1:
        raise ValueError(f"calibration tokens, block and batch size must be positive integers, got {tokens}, {block}, {batch_size}")
    raw = D.load_raw(path)
    column = "text" if "text" in raw.column_names else text_column
    if column not in raw.column_names:
        raise ValueError(f"calibration data {path}: no column {column!r} (columns: {raw.column_names})")
    causal = any(name.endswith("ForCausalLM") for name in (model.config.architectures or [type(model).__name__])) or \
        type(model).__name__.endswith("ForCausalLM")
    batches: list[dict[str, torch.Tensor]] = []
    if causal:
        ids: list[int] = []
        for text in raw[column]:
            ids += tokenizer(str(text)).input_ids
            if len(ids) >= tokens:
                break
        blocks = [ids[i:i + block] for i in range(0, min(len(ids), tokens) - block + 1, block)] or [ids[:block]]
        for i in range(0, len(blocks), batch_size):
            chunk = torch.tensor(blocks[i:i + batch_size]) if len({len(b) for b in blocks[i:i + batch_size]}) == 1 else torch.tensor(blocks[i:i + 1])
            batches.append({"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": chunk.clone()})
        return batches
    seen, rows = 0, [str(t) for t in raw[column] if str(t).strip()]
    for i in range(0, len(rows), batch_size):
        enc = tokenizer(rows[i:i + batch_size], padding=True, truncation=True, max_length=block, return_tensors="pt")
        batches.append(dict(enc))
        seen += int(enc["attention_mask"].sum())
        if seen >= tokens:
            break
    return batches
