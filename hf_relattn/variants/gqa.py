"""GQA / MQA uptraining: Ainslie et al. 2023, "GQA: Training Generalized Multi-Query
Transformer Models from Multi-Head Checkpoints" (EMNLP 2023); MQA: Shazeer 2019, "Fast
Transformer Decoding: One Write-Head is All You Need".

Weight surgery on the key and value projections. Query head i uses K/V head i // (H / G)
(contiguous groups, as transformers' `repeat_kv`). Each new K/V head is initialised from the
heads its group replaces:
- "mean" (the paper's choice): mean of the group's original heads;
- "first": the group's first head (the paper's ablation);
- "random": fresh N(0, initializer_range) weights and zero bias (the paper's ablation).
The source may itself be grouped (SmolLM2: 9 query / 3 K/V heads): the original K/V head of
every query head is expanded first, so 3 -> 1 pools the existing groups and any G dividing H
works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .base import Variant, register_variant

if TYPE_CHECKING:
    from ..patches import FamilyAdapter

INITS = ("mean", "first", "random")


def regroup_heads(weight: torch.Tensor, num_heads: int, num_kv_heads: int, groups: int, init: str) -> torch.Tensor:
    """K/V projection rows (num_kv_heads * D, ...) -> (groups * D, ...) per `init` ("mean"/"first")."""
    rest = weight.shape[1:]
    per_kv = weight.reshape(num_kv_heads, -1, *rest)
    # K/V head used by each query head in the source model
    per_query = per_kv[torch.arange(num_heads, device=weight.device) // (num_heads // num_kv_heads)]
    grouped = per_query.reshape(groups, num_heads // groups, *per_query.shape[1:])
    out = grouped.float().mean(dim=1) if init == "mean" else grouped[:, 0]
    return out.reshape(-1, *rest).to(weight.dtype)


@register_variant
@dataclass
class GQA(Variant):
    num_key_value_heads: int | None = None
    init: str = "mean"

    name = "gqa"
    heads_from_config = True
    axis = "structure"
    description = "Grouped-query attention: K/V heads mean-pooled into G groups (uptraining recipe)."
    paper = "Ainslie et al. 2023, GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints"
    limits = (
        "K/V heads are pooled from a multi-head checkpoint: quality needs uptraining (Ainslie et al. "
        "2023 use about 5% of the pre-training compute)."
    )

    def validate(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int]) -> None:
        groups = self.num_key_value_heads
        heads = adapter.num_heads(model.config)
        if isinstance(groups, bool) or not isinstance(groups, int):
            raise ValueError(f"{self.name}: num_key_value_heads must be an integer, got {groups!r}")
        if groups <= 0:
            raise ValueError(f"{self.name}: num_key_value_heads must be positive, got {groups}")
        if heads % groups:
            divisors = [g for g in range(1, heads + 1) if heads % g == 0]
            raise ValueError(
                f"{self.name}: num_key_value_heads={groups} does not divide the {heads} attention heads; "
                f"valid values: {divisors}"
            )
        if self.init not in INITS:
            raise ValueError(f"{self.name}: unknown init {self.init!r}; valid: {', '.join(INITS)}")

    def native(self, adapter: FamilyAdapter, num_layers: int, layers: list[int]) -> bool:
        """On every layer of a family whose config has num_key_value_heads, the result is native."""
        return adapter.native_gqa and sorted(layers) == list(range(num_layers))

    def apply(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int], initialize: bool) -> None:
        groups = self.num_key_value_heads
        heads = adapter.num_heads(model.config)
        std = getattr(model.config, "initializer_range", 0.02)
        modules = adapter.attention_modules(model)
        for idx in layers:
            attn = modules[idx]
            kv_heads = adapter.num_kv_heads(attn)
            for proj_name in (adapter.k_proj, adapter.v_proj):
                old = getattr(attn, proj_name)
                new = nn.Linear(
                    old.in_features,
                    groups * adapter.head_dim(model.config),
                    bias=old.bias is not None,
                    device=old.weight.device,
                    dtype=old.weight.dtype,
                )
                if initialize:
                    with torch.no_grad():
                        if self.init == "random":
                            new.weight.normal_(0.0, std)
                            if new.bias is not None:
                                new.bias.zero_()
                        else:
                            new.weight.copy_(regroup_heads(old.weight, heads, kv_heads, groups, self.init))
                            if new.bias is not None:
                                new.bias.copy_(regroup_heads(old.bias, heads, kv_heads, groups, self.init))
                new.weight.requires_grad_(old.weight.requires_grad)
                if new.bias is not None:
                    new.bias.requires_grad_(old.bias.requires_grad)
                setattr(attn, proj_name, new)
            adapter.set_num_kv_heads(attn, groups)
        if self.native(adapter, len(modules), layers):
            adapter.set_config_kv_heads(model.config, groups)


@register_variant
@dataclass
class MQA(GQA):
    num_key_value_heads: int | None = 1

    name = "mqa"
    description = "Multi-query attention: one shared K/V head (GQA with G=1), mean-pooled."
    paper = "Shazeer 2019, Fast Transformer Decoding: One Write-Head is All You Need; Ainslie et al. 2023 (uptraining)"
    limits = (
        "One K/V head pooled from many: quality needs uptraining (Ainslie et al. 2023 use about 5% of "
        "the pre-training compute)."
    )

    def spec_name(self) -> str:
        return GQA.name

    def validate(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int]) -> None:
        if self.num_key_value_heads != 1:
            raise ValueError(f"mqa means num_key_value_heads=1 (got {self.num_key_value_heads}); use 'gqa' for G > 1")
        super().validate(model, adapter, layers)
