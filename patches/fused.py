"""Fused query/key/value projections: one matrix whose output rows hold Q, K and V in a
family-specific order (Phi-3 `qkv_proj`, GPT-NeoX `query_key_value`, GPT-2's Conv1D `c_attn`).

Weight surgery (GQA merging, head pruning) works on three separate `nn.Linear`: `projections`
splits the fused matrix into copies of its rows, `set_projections` writes three (resized)
parts back as one module of the original type, in the family's order (`qkv_layout`). Whether a
family's forward can run the result is the family's own question (`gqa_refused`/`prune_refused`
say why not: GPT-2 and GPT-NeoX split the fused output into equal Q, K and V parts, Phi-3 takes
its query rows' count from the model config).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import FamilyAdapter

# Why a family's forward cannot give K/V fewer heads than Q.
EQUAL_PARTS = ("its forward splits the fused q/k/v output into three equal parts, so K/V cannot have fewer heads "
               "than the queries")


def as_linear(module: nn.Module) -> nn.Module:
    """A Conv1D (GPT-2: weight (in, out)) as an equal nn.Linear copy; anything else as it is."""
    if type(module) is not Conv1D:
        return module
    linear = nn.Linear(module.weight.shape[0], module.nf, device=module.weight.device, dtype=module.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(module.weight.T)
        linear.bias.copy_(module.bias)
    linear.weight.requires_grad_(module.weight.requires_grad)
    linear.bias.requires_grad_(module.bias.requires_grad)
    return linear


def as_conv1d(linear: nn.Linear) -> Conv1D:
    """The Conv1D computing what `linear` computes (GPT-2's checkpoints store Conv1D weights)."""
    conv = Conv1D(linear.out_features, linear.in_features)
    conv.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
        else:
            conv.bias.zero_()
    conv.weight.requires_grad_(linear.weight.requires_grad)
    conv.bias.requires_grad_(linear.weight.requires_grad if linear.bias is None else linear.bias.requires_grad)
    return conv


class FusedQKV(FamilyAdapter):
    """The adapter of a family whose `q_proj` (= `k_proj` = `v_proj`) names one fused matrix."""

    def head_counts(self, attn: nn.Module) -> tuple[int, int]:
        """(query heads, K/V heads) of one module, read off the module (after surgery too)."""
        raise NotImplementedError

    def qkv_layout(self, num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
        """Output rows of Q, K and V in the fused matrix: every query head, then K's, then V's."""
        q, kv = num_heads * head_dim, num_kv_heads * head_dim
        rows = torch.arange(q + 2 * kv)
        return rows[:q], rows[q:q + kv], rows[q + kv:]

    def module_num_heads(self, attn: nn.Module) -> int:
        return self.head_counts(attn)[0]

    def num_kv_heads(self, attn: nn.Module) -> int:
        return self.head_counts(attn)[1]

    def projection_sites(self, attn: nn.Module) -> tuple[tuple[nn.Module, torch.Tensor | None], ...]:
        fused = getattr(attn, self.q_proj)
        return tuple((fused, rows) for rows in self.qkv_layout(*self.head_counts(attn), self.head_dim(attn.config)))

    def projections(self, attn: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
        fused = getattr(attn, self.q_proj)
        whole = as_linear(fused)
        if type(whole) is not nn.Linear:
            return fused, fused, fused  # e.g. a LoRA wrapper: surgery refuses it by type
        parts = []
        for rows in self.qkv_layout(*self.head_counts(attn), self.head_dim(attn.config)):
            rows = rows.to(whole.weight.device)
            part = nn.Linear(whole.in_features, len(rows), bias=whole.bias is not None, device=whole.weight.device,
                             dtype=whole.weight.dtype)
            with torch.no_grad():
                part.weight.copy_(whole.weight[rows])
                if part.bias is not None:
                    part.bias.copy_(whole.bias[rows])
            part.weight.requires_grad_(whole.weight.requires_grad)
            if part.bias is not None:
                part.bias.requires_grad_(whole.bias.requires_grad)
            parts.append(part)
        return tuple(parts)

    def set_projections(self, attn: nn.Module, query: nn.Module, key: nn.Module, value: nn.Module) -> None:
        dim = self.head_dim(attn.config)
        layout = self.qkv_layout(query.out_features // dim, key.out_features // dim, dim)
        total = sum(len(rows) for rows in layout)
        has_bias = query.bias is not None
        fused = nn.Linear(query.in_features, total, bias=has_bias, device=query.weight.device, dtype=query.weight.dtype)
        with torch.no_grad():
            for rows, part in zip(layout, (query, key, value)):
                rows = rows.to(part.weight.device)
                fused.weight[rows] = part.weight
                if has_bias:
                    fused.bias[rows] = part.bias
        fused.weight.requires_grad_(query.weight.requires_grad)
        if has_bias:
            fused.bias.requires_grad_(query.bias.requires_grad)
        old = getattr(attn, self.q_proj)
        setattr(attn, self.q_proj, as_conv1d(fused) if type(old) is Conv1D else fused)
