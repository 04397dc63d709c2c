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

