"""Attention transfer: train each converted layer's attention to reproduce the original's.

LoLCATs (Zhang et al. 2025, "LoLCATs: On Low-Rank Linearizing of Large Language Models",
ICLR 2025) converts attention layer by layer: record every attention block's input and output
on the original model, then train only the new attention of that layer, fed the original
input, to reproduce the original output (MSE). No full-model backward is needed, and every
layer starts its training from the original model's hidden states (teacher forcing), so
errors do not compound during calibration.

`calibrate(model, reference, batches)` does this for every variant and family:
- converted layers are those whose attention module carries a variant, or whose attention
  parameters differ in name or shape from the reference's (e.g. GQA's K/V projections);
- what trains: `train="attention"` (default) every parameter of the layer's attention block
  (projections, tables, routers, sink logits); `train="new"` only what the conversion added
  or resized; everything else is frozen and bit-identical afterwards;
- AdamW with a cosine decay over `steps` per layer, cycling through the batches. The default
  lr 1e-5 suits pretrained projections (measured on SmolLM2 MQA, 100 steps: relative error
  0.65 -> 0.18 at 1e-5, 0.31 at 3e-5, no progress at 3e-4); sink logits get their own lr,
  SINK_LOGIT_LR (Adam moves a parameter by about lr per step, and a sink logit starts 10-20
  units from where it matters);
- eval-mode numerics (no dropout); a layer whose error did not decrease is put back as it was;
- recordings stay in memory up to `memory_limit` bytes, else they are spilled to a temporary
  folder and read back one layer at a time.

`text_batches` builds calibration batches from a text file or table (what `hf-relattn convert
--calibrate DATA` uses).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .batches import batch_list, eval_mode, on_device, token_mask
from .patches import base_model_type, get_adapter
from .variants.base import ATTACHED, CACHE, LAYER_INPUT
from .variants.sparse_base import SINK_LOGIT, optimizer_groups

TRAIN_SELECTIONS = ("attention", "new")
INPUTS = ("reference", "converted")


class _Stop(Exception):
    """Raised by a hook to end a forward once the layer of interest has its input."""
SINK_LOGIT_LR = 0.1  # Adam moves a parameter by about lr per step; a sink logit starts 10-20 units from where it matters


@dataclass
class CalibrationReport:
    """Per converted layer: relative error |y - y_ref|^2 / |y_ref|^2 of the attention block's
    output over the calibration tokens, before and after transfer."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = ["| layer | trained params | error before | error after | kept |", "|---:|---:|---:|---:|:--|"]
        for r in self.rows:
            lines.append(f"| {r['layer']} | {r['parameters']:,} | {r['before']:.4g} | {r['after']:.4g} | {'yes' if r['kept'] else 'no (reverted)'} |")
        before = sum(r["before"] for r in self.rows) / max(len(self.rows), 1)
        after = sum(r["after"] for r in self.rows) / max(len(self.rows), 1)
        lines.append(f"| mean | | {before:.4g} | {after:.4g} | {self.seconds:.0f} s |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "seconds": self.seconds}


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def converted_layers(model: nn.Module, reference: nn.Module) -> list[int]:
    """Layers whose attention carries a variant or whose attention parameters differ in name or
    shape from the reference's."""
    adapter = get_adapter(model)
    blocks, ref_blocks = adapter.attention_blocks(model), adapter.attention_blocks(reference)
    modules = adapter.attention_modules(model)
    layers = []
    for idx, (block, ref) in enumerate(zip(blocks, ref_blocks)):
        shapes = {n: p.shape for n, p in block.named_parameters()}
        ref_shapes = {n: p.shape for n, p in ref.named_parameters()}
        if getattr(modules[idx], ATTACHED, ()) or shapes != ref_shapes:
            layers.append(idx)
    return layers


def _new_parameters(block: nn.Module, ref: nn.Module) -> list[str]:
    ref_shapes = {n: p.shape for n, p in ref.named_parameters()}
    return [n for n, p in block.named_parameters() if ref_shapes.get(n) != p.shape or ".relattn_" in f".{n}"]


def _check(model: nn.Module, reference: nn.Module, layers: Iterable[int] | None, train: str) -> list[int]:
    if reference is model:
        raise ValueError("calibrate: reference must be the model before conversion (a separate copy), not the model itself")
    adapter = get_adapter(model)
    ref_adapter = get_adapter(reference)
    if ref_adapter is not adapter:
        raise ValueError(f"calibrate: reference is a {base_model_type(reference.config.model_type)} model and the converted "
                         f"model a {base_model_type(model.config.model_type)} model; pass the model before conversion")
    for key in ("hidden_size", "num_attention_heads"):
        if getattr(model.config, key, None) != getattr(reference.config, key, None):
            raise ValueError(f"calibrate: reference has {key}={getattr(reference.config, key, None)}, the model "
                             f"{getattr(model.config, key, None)}; pass the model before conversion")
    num = len(adapter.attention_blocks(model))
    if len(adapter.attention_blocks(reference)) != num:
        raise ValueError(f"calibrate: reference has {len(adapter.attention_blocks(reference))} layers, the model {num}")
    if train not in TRAIN_SELECTIONS:
        raise ValueError(f"calibrate: unknown train={train!r}; valid: {', '.join(TRAIN_SELECTIONS)}")
    found = converted_layers(model, reference)
    if layers is None:
        if not found:
            raise ValueError("calibrate: the model is not converted (no attention layer differs from the reference); "
                             "convert it first (hf_relattn.convert)")
        chosen = found
    else:
        chosen = sorted({int(i) % num for i in layers})
        if not chosen or any(not -num <= int(i) < num for i in layers):
            raise ValueError(f"calibrate: layers must be indices in 0..{num - 1}, got {list(layers)}")
    if train == "new":
        blocks, refs = adapter.attention_blocks(model), adapter.attention_blocks(reference)
        empty = [i for i in chosen if not _new_parameters(blocks[i], refs[i])]
        if empty:
            raise ValueError(f"calibrate: train='new' but layers {empty} have no new or resized attention parameters "
                             "(e.g. a sliding window without sink_logit); use train='attention'")
    return chosen


class _Records:
    """Per layer and batch: (reference input, reference output, the model's call arguments,
    token mask). In memory until they hold `limit` bytes of hidden states, then all of them go
    to `spill` as one file per layer and batch."""

    def __init__(self, spill: Path, limit: int) -> None:
        self.spill, self.limit, self.bytes = spill, limit, 0
        self.folder: Path | None = None
        self.memory: dict[tuple[int, int], tuple[Any, ...]] = {}

    def put(self, layer: int, index: int, item: tuple[Any, ...]) -> None:
        self.bytes += sum(t.numel() * t.element_size() for t in item[:2])
        if self.folder is None and self.bytes > self.limit:
            self.folder = self.spill
            for (i, j), old in self.memory.items():
                torch.save(old, self.folder / f"{i}-{j}.pt")
            self.memory.clear()
        if self.folder is None:
            self.memory[layer, index] = item
        else:
            torch.save(item, self.folder / f"{layer}-{index}.pt")

    def get(self, layer: int, count: int) -> list[tuple[Any, ...]]:
        if self.folder is None:
            return [self.memory[layer, i] for i in range(count)]
        return [torch.load(self.folder / f"{layer}-{i}.pt", weights_only=False) for i in range(count)]

    def drop(self, layer: int, count: int) -> None:
        for i in range(count):
            if self.folder is None:
                self.memory.pop((layer, i), None)
            else:
                (self.folder / f"{layer}-{i}.pt").unlink(missing_ok=True)


def _record(model: nn.Module, reference: nn.Module, layers: list[int], batches: list[Mapping[str, Any]], records: _Records) -> int:
    """Fill `records`; returns the number of real tokens of the batches."""
    adapter = get_adapter(model)
    blocks, refs = adapter.attention_blocks(model), adapter.attention_blocks(reference)
    current: dict[int, list[Any]] = {}

    def ref_hook(idx: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        current.setdefault(idx, [None, None, None])[:2] = [_hidden(args, kwargs).detach(), _first(output).detach()]

    def call_hook(idx: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        rest = {k: v for k, v in kwargs.items() if k not in ("hidden_states", LAYER_INPUT, CACHE, "cache", "past_key_values")}
        current.setdefault(idx, [None, None, None])[2] = (args[1:], rest)

    handles = [refs[i].register_forward_hook(lambda m, a, k, o, i=i: ref_hook(i, m, a, k, o), with_kwargs=True) for i in layers]
    handles += [blocks[i].register_forward_pre_hook(lambda m, a, k, i=i: call_hook(i, m, a, k), with_kwargs=True) for i in layers]
    try:
        with torch.no_grad(), eval_mode(model), eval_mode(reference):
            tokens = 0
            for index, batch in enumerate(batches):
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                if "pixel_values" not in inputs:
                    inputs["use_cache"] = False
                current.clear()
                reference(**on_device(inputs, next(reference.parameters()).device))
                model(**on_device(inputs, next(model.parameters()).device))
                valid = token_mask(batch)
                for idx in layers:
                    ref_in, ref_out, call = current[idx]
                    records.put(idx, index, (ref_in, ref_out, call, valid))
                tokens += int(valid.sum()) if valid is not None else current[layers[0]][0].shape[:-1].numel()
    finally:
        for handle in handles:
            handle.remove()
    return tokens


def _converted_inputs(model: nn.Module, block: nn.Module, batches: list[Mapping[str, Any]]) -> list[torch.Tensor]:
    """The block's input hidden states when the (partly calibrated) converted model runs each
    batch; the forward stops at the block."""
    seen: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append(_hidden(args, kwargs).detach())
        raise _Stop

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                if "pixel_values" not in inputs:
                    inputs["use_cache"] = False
                try:
                    model(**on_device(inputs, device))
                except _Stop:
                    pass
    finally:
        handle.remove()
    return seen


def _error(block: nn.Module, items: list[tuple[Any, ...]], device: torch.device, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared error, sum of squared reference) over the real tokens of `items`."""
    err = torch.zeros((), dtype=torch.float64, device=device)
    ref_energy = torch.zeros((), dtype=torch.float64, device=device)
    for ref_in, ref_out, (args, kwargs), valid in items:
        with torch.set_grad_enabled(grad):
            out = _first(block(ref_in.to(device), *args, **kwargs))
        diff = (out.float() - ref_out.to(device).float()).pow(2).sum(-1)
        energy = ref_out.to(device).float().pow(2).sum(-1)
        if valid is not None and diff.dim() == 2:
            diff, energy = diff[valid.to(device)], energy[valid.to(device)]
        err = err + diff.sum().double()
        ref_energy = ref_energy + energy.sum().double()
    return err, ref_energy


def calibrate(
    model: nn.Module,
    reference: nn.Module,
    batches: Any,
    *,
    steps: int = 100,
    lr: float = 1e-5,
    layers: Iterable[int] | None = None,
    train: str = "attention",
    inputs: str = "reference",
    memory_limit: int = 2 * 1024**3,
    progress: bool = True,
    verbose: bool = True,
) -> CalibrationReport:
    """Attention transfer (LoLCATs, Zhang et al. 2025): per converted layer, train its attention
    block, fed the reference's input, to reproduce the reference's output (MSE over real tokens).

    `reference` is the model before conversion; `batches` an iterable of dicts of model inputs
    (`input_ids`/`attention_mask` or `pixel_values`). `steps` optimizer steps per layer (one
    batch each, cycling), AdamW at `lr` with cosine decay. Returns (and prints with `verbose`)
    the per-layer relative error before/after. Every check runs before anything changes.

    `inputs="reference"` (LoLCATs) feeds every layer the reference's hidden states;
    `inputs="converted"` feeds layer l what the converted model, its layers before l already
    calibrated, gives it (the sequential scheme of GPTQ, Frantar et al. 2023), so each layer also
    learns to undo the drift of the layers below; the target stays the reference's output. It
    costs one partial forward over the batches per layer."""
    items = batch_list(batches, "calibrate")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"calibrate: steps must be an integer >= 0, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"calibrate: lr must be a number > 0, got {lr!r}")
    if inputs not in INPUTS:
        raise ValueError(f"calibrate: unknown inputs={inputs!r}; valid: {', '.join(INPUTS)}")
    chosen = _check(model, reference, layers, train)
    adapter = get_adapter(model)
    blocks, refs = adapter.attention_blocks(model), adapter.attention_blocks(reference)
    start = time.perf_counter()

    report = CalibrationReport()
    flags = {p: p.requires_grad for p in model.parameters()}
    trained: list[nn.Parameter] = []
    with tempfile.TemporaryDirectory(prefix="relattn-calibrate-") as spill:
        records = _Records(Path(spill), memory_limit)
        tokens = _record(model, reference, chosen, items, records)
        device = next(model.parameters()).device
        bar = tqdm(total=len(chosen) * steps, desc="calibrate", disable=not progress)
        try:
            with eval_mode(model):
                for idx in chosen:
                    block = blocks[idx]
                    names = [n for n, _ in block.named_parameters()] if train == "attention" else _new_parameters(block, refs[idx])
                    wanted = {id(p) for n, p in block.named_parameters() if n in names}
                    for p in model.parameters():
                        p.requires_grad_(id(p) in wanted)
                    params = [p for p in model.parameters() if p.requires_grad]
                    trained += params
                    saved = [p.detach().clone() for p in params]
                    recorded = records.get(idx, len(items))
                    if inputs == "converted":
                        own = _converted_inputs(model, block, items)
                        recorded = [(x, *rest) for x, (_, *rest) in zip(own, recorded)]
                    err, energy = _error(block, recorded, device)
                    before = float(err / energy.clamp(min=1e-300))
                    if steps:
                        groups = optimizer_groups(model, 0.0)
                        for group in groups:
                            if any(p is q for p in group["params"] for q in _sink_logits(block)):
                                group["lr"] = SINK_LOGIT_LR
                        optimizer = torch.optim.AdamW(groups, lr=lr)
                        base = [g.get("lr", lr) for g in optimizer.param_groups]
                        for step in range(steps):
                            for group, peak in zip(optimizer.param_groups, base):
                                group["lr"] = peak * 0.5 * (1 + math.cos(math.pi * step / steps))
                            item = recorded[step % len(recorded)]
                            sq, ref_sq = _error(block, [item], device, grad=True)
                            loss = sq / ref_sq.clamp(min=1e-300)
                            optimizer.zero_grad(set_to_none=True)
                            loss.backward()
                            optimizer.step()
                            bar.update(1)
                        optimizer.zero_grad(set_to_none=True)
                    err, energy = _error(block, recorded, device)
                    after = float(err / energy.clamp(min=1e-300))
                    kept = after < before or not steps
                    if not kept:
                        with torch.no_grad():
                            for p, value in zip(params, saved):
                                p.copy_(value)
                        after = before
                    report.rows.append({"layer": idx, "parameters": sum(p.numel() for p in params), "before": before,
                                        "after": after, "kept": kept})
                    records.drop(idx, len(items))
                    bar.set_postfix(layer=idx, error=f"{after:.3g}")
        finally:
            bar.close()
            for p in trained:
                p.grad = None
            for p, flag in flags.items():
                p.requires_grad_(flag)
    report.seconds = time.perf_counter() - start
    if verbose:
        spilled = f", recordings spilled to disk ({records.bytes / 2**30:.1f} GiB)" if records.folder else ""
        print(f"Attention transfer: {len(chosen)} layers, {steps} steps each, {len(items)} batches ({tokens} tokens), lr {lr}{spilled}")
        print(report)
    return report


def _sink_logits(block: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in block.named_parameters() if n.endswith(SINK_LOGIT)]


def text_batches(path: str, model: nn.Module, tokenizer: Any, *, tokens: int = 16384, block: int = 512,
                 batch_size: int = 4, text_column: str = "sentence") -> list[dict[str, torch.Tensor]]:
    """Calibration batches of about `tokens` real tokens from a text source (a text file, or a
    .tsv/.csv/.jsonl/save_to_disk table with a `text_column`: `hf_relattn.data`, as finetune reads).

    Causal LMs get the text packed into blocks of `block` tokens, `labels` = `input_ids` (so
    head importance has a loss); encoders get one row per sequence (truncated to `block`),
    padded per batch, no labels."""
    from . import data as D

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
