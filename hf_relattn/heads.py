"""Per-head gates and head importance scores: Michel, Levy & Neubig 2019, "Are Sixteen Heads
Really Better than One?" (NeurIPS 2019).

The paper puts a gate xi_h on each head's output, Att(x) = sum_h xi_h W_o^h head_h(x), and
scores head h by the expected sensitivity of the loss to its gate at xi = 1,
I_h = E_x |dL(x) / d xi_h|, then normalises the scores of each layer by their L2 norm (the
paper's code, exponent 2). Heads with the lowest scores are the first to prune
(`hf_relattn.convert(model, "prune", heads=...)`).

Here the gates multiply the head outputs at the input of the attention output projection
(LLaMA/ViT `o_proj`, BERT `attention.output.dense`), through forward pre-hooks, so they work
with every attention implementation and variant that keeps the heads' concatenated layout.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from .batches import batch_list, eval_mode, on_device
from .patches import get_adapter

PAPER = "Michel, Levy & Neubig 2019, Are Sixteen Heads Really Better than One? (NeurIPS)"


def _gate_heads(gate: torch.Tensor, layer: int, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    x = args[0]
    heads = gate.shape[0]
    if x.shape[-1] % heads:
        raise RuntimeError(f"head_gates: layer {layer}'s output projection input has {x.shape[-1]} features, not {heads} heads")
    gated = x.unflatten(-1, (heads, x.shape[-1] // heads)) * gate.to(x.dtype)[:, None]
    return (gated.flatten(-2), *args[1:])


@contextlib.contextmanager
def head_gates(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Install a gate on every head's output (Michel et al. 2019), removed on exit.

    Yields one float32 vector per layer (length: that layer's current number of query heads,
    which pruning may have reduced), initialised to ones and requiring grad. Head h's output
    is multiplied by gate[h] just before the attention output projection, so a gate of 0 is
    the head removed and `loss.backward()` fills `gate.grad` with dL/d(gate). Set values in
    place (`with torch.no_grad(): gates[layer][head] = 0.0`) to mask or scale heads.
    """
    adapter = get_adapter(model)
    attentions = adapter.attention_modules(model)
    projections = adapter.output_projections(model)
    handles = []
    try:
        gates = []
        for layer, (attn, proj) in enumerate(zip(attentions, projections)):
            device = next(proj.parameters()).device
            gate = torch.ones(adapter.module_num_heads(attn), dtype=torch.float32, device=device, requires_grad=True)
            handles.append(proj.register_forward_pre_hook(partial(_gate_heads, gate, layer)))
            gates.append(gate)
        yield gates
    finally:
        for handle in handles:
            handle.remove()


def head_importance(model: nn.Module, batches: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> torch.Tensor:
    """Head importance scores of Michel et al. 2019, shape [num_layers, num_heads], float32, CPU.

    `batches` is one dict of model inputs including `labels` (so the model returns a loss), or
    an iterable of such dicts. For each batch the loss is differentiated with respect to the
    head gates at 1.0 (`head_gates`) and |dL/d gate| is accumulated over the batches; each
    layer's row is then divided by its L2 norm. The layer-wise normalisation of the paper's code
    is the only one applied (no global min-max rescaling), and the sum over batches is not
    averaged (a constant factor the normalisation removes).

    Runs in eval mode (no dropout) and restores every module's train/eval mode afterwards.
    Only the gates are differentiated (`torch.autograd.grad`): the parameters' `.grad` are left
    exactly as they were. Layers whose heads were pruned have fewer heads than the widest layer:
    their rows are padded with NaN after their last head.
    """
    batches = batch_list(batches, "head_importance", labels=True)
    device = next(model.parameters()).device
    with eval_mode(model), torch.enable_grad(), head_gates(model) as gates:
        total = [torch.zeros_like(gate, requires_grad=False) for gate in gates]
        for batch in batches:
            output = model(**on_device(batch, device))
            loss = output["loss"] if isinstance(output, Mapping) else getattr(output, "loss", None)
            if loss is None:
                raise ValueError(f"head_importance: {type(model).__name__} returned no loss for the given labels")
            grads = torch.autograd.grad(loss, gates, allow_unused=True)
            for acc, grad in zip(total, grads):
                if grad is not None:
                    acc += grad.detach().abs()
    width = max(len(t) for t in total)
    scores = torch.full((len(total), width), math.nan, dtype=torch.float32)
    for layer, acc in enumerate(total):
        acc = acc.float().cpu()
        scores[layer, : len(acc)] = acc / (acc.norm(p=2) + 1e-20)
    return scores
