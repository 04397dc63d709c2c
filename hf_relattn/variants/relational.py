"""Shared machinery of relation-aware attention (Shaw, Uszkoreit & Vaswani 2018, "Self-Attention
with Relative Position Representations", NAACL): learned vectors a^K_r and a^V_r per relation
label r, added to the keys and values of every (query, key) pair with that label:

    e_ij = q_i . (k_j + a^K_{r_ij}) / sqrt(d),   z_i = sum_j softmax(e)_ij (v_j + a^V_{r_ij})   (eqs. 3-4)

`shaw` labels pairs by clipped relative position, `relation` by caller-supplied ids. Each
converted layer owns one `RelationTables` module (`relattn_<variant>` on the attention module):
tables shared by all heads (the paper's setting) or one per head, zero-initialised so a freshly
converted model computes exactly what it computed before. The engine evaluates the terms
without materialising anything of size T x T x d (`hf_relattn.engine.relational_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..patches import get_adapter
from .base import MAX_TABLE_ROWS, Variant, attach, check_flag

if TYPE_CHECKING:
    from ..patches import FamilyAdapter


class RelationTables(nn.Module):
    """`key` (and `value`) tables: (labels, head_dim), or (heads, labels, head_dim) per head.

    `fixed_zero_labels` leading labels have no stored row: they contribute nothing, always
    (the `relation` variant's label 0, "no relation")."""

    def __init__(
        self, num_labels: int, head_dim: int, heads: int | None, values: bool, fixed_zero_labels: int = 0,
        device: torch.device | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.fixed_zero_labels = fixed_zero_labels
        shape = (num_labels - fixed_zero_labels, head_dim) if heads is None else (heads, num_labels - fixed_zero_labels, head_dim)
        self.key = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
        self.value = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype)) if values else None

    def full(self, table: torch.Tensor | None) -> torch.Tensor | None:
        """The table with its fixed zero rows in front: (R, d) or (H, R, d)."""
        if table is None or not self.fixed_zero_labels:
            return table
        zeros = table.new_zeros(*table.shape[:-2], self.fixed_zero_labels, table.shape[-1])
        return torch.cat([zeros, table], dim=-2)


@dataclass
class RelationalVariant(Variant):
    """Base of `shaw` and `relation`: options `values` and `per_head`, one tables module per layer."""

    values: bool = True
    per_head: bool = False

    axis = "scores"
    fixed_zero_labels = 0

    @property
    def heads_from_config(self) -> bool:  # type: ignore[override]
        return self.per_head  # shared tables do not depend on the heads

    def module_name(self) -> str:
        return f"relattn_{self.name}"

    def num_labels(self, adapter: FamilyAdapter) -> int:
        raise NotImplementedError

    def check_options(self) -> None:
        super().check_options()
        check_flag(self, "values")
        check_flag(self, "per_head")

    def check_model(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int]) -> None:
        modules = adapter.attention_modules(model)
        # each layer's own adapter (CLIPModel: the vision layers' grid labels, the text layers' distances)
        rows = max((self.num_labels(get_adapter(modules[idx].config)) for idx in layers if idx < len(modules)),
                   default=self.num_labels(adapter))
        if rows > MAX_TABLE_ROWS:
            raise ValueError(f"{self.name}: the options give a table of {rows:,} rows on {adapter.model_type}, more than "
                             f"{MAX_TABLE_ROWS:,}; use a smaller max_distance / num_relations")

    def apply(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int], initialize: bool) -> None:
        modules = adapter.attention_modules(model)
        adapter.positions_from_mask(model)  # q . a^K sees each query's own position
        for idx in layers:
            attn = modules[idx]
            # sized as the run time reads them: by the adapter and config of the layer's own module
            # (CLIPModel: the text tower's labels and heads, or the vision tower's grid and heads)
            config, own = attn.config, get_adapter(attn.config)
            reference = getattr(attn, adapter.q_proj).weight
            tables = RelationTables(
                self.num_labels(own), adapter.head_dim(config), adapter.num_heads(config) if self.per_head else None,
                self.values, self.fixed_zero_labels, device=reference.device, dtype=reference.dtype,
            )
            setattr(attn, self.module_name(), tables)
            attach(attn, self)

    def tables(self, module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        tables: RelationTables = getattr(module, self.module_name())
        return tables.full(tables.key), tables.full(tables.value)
