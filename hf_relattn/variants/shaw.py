"""Relative position representations: Shaw, Uszkoreit & Vaswani 2018, "Self-Attention with
Relative Position Representations" (NAACL), eqs. 3-5.

Pair (i, j) gets the label r_ij = clip(j - i, -k, k) (2k + 1 labels, k = `max_distance`), and
learned vectors a^K_r, a^V_r are added to key j and value j when query i attends to it
(`values=False` drops a^V: the paper found keys alone nearly as good). As in the paper's big
model, one table per layer is shared by all heads (`per_head=True`: one per head). Tables start
at zero, so a converted model is exactly the original until it is trained.

- LLaMA: on top of RoPE (queries are already rotated); distances are key-index differences,
  so KV-cache decoding sees the right distance to every cached key.
- BERT: bidirectional, the role of v4's removed `relative_key_query` embeddings, without the
  T x T x d tensor.
- ViT: pairs of patches are labelled by their 2-D offset (dy, dx), each clipped to [-k, k]
  ((2k + 1)^2 labels), plus three labels for pairs involving [CLS] (CLS->patch, patch->CLS,
  CLS->CLS), as BEiT's relative position bias does (Bao et al. 2022).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..patches import get_adapter
from .base import MAX_TABLE_ROWS, RelationTerm, check_int_options, register_variant
from .relational import RelationalVariant, RelationTables

if TYPE_CHECKING:
    from ..patches import FamilyAdapter


def grid_labels(
    q_idx: torch.Tensor, k_idx: torch.Tensor, prefix: int, cols: int, max_distance: int
) -> torch.Tensor:
    """(Q, K) labels of token pairs on a 2-D grid after `prefix` special tokens (see module doc)."""
    k = max_distance
    width = 2 * k + 1

    def coords(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patch = (idx - prefix).clamp(min=0)
        return patch // cols, patch % cols

    qy, qx = coords(q_idx)
    ky, kx = coords(k_idx)
    dy = (ky[None, :] - qy[:, None]).clamp(-k, k) + k
    dx = (kx[None, :] - qx[:, None]).clamp(-k, k) + k
    labels = dy * width + dx
    q_special = (q_idx < prefix)[:, None]
    k_special = (k_idx < prefix)[None, :]
    base = width * width
    labels = torch.where(q_special & ~k_special, base, labels)
    labels = torch.where(~q_special & k_special, base + 1, labels)
    return torch.where(q_special & k_special, base + 2, labels)


@register_variant
@dataclass
class Shaw(RelationalVariant):
    max_distance: int = 16

    name = "shaw"
    description = (
        "Learned key (and value) vectors per clipped relative position, per layer, zero-init; "
        "2-D patch offsets plus [CLS] labels on ViT."
    )
    paper = "Shaw, Uszkoreit & Vaswani 2018, Self-Attention with Relative Position Representations, NAACL"
    limits = "Zero-initialised relative-position tables: untrained they change nothing."

    def check_options(self) -> None:
        check_int_options(self, "max_distance", maximum=MAX_TABLE_ROWS)
        super().check_options()

    def num_labels(self, adapter: FamilyAdapter) -> int:
        width = 2 * self.max_distance + 1
        return width * width + 3 if adapter.spatial else width

    def relation_term(
        self, module: nn.Module, num_heads: int, q_pos: torch.Tensor, k_pos: torch.Tensor, inputs: dict[str, Any], *,
        causal: bool
    ) -> RelationTerm:
        adapter = get_adapter(module.config)
        key, value = self.tables(module)
        if not adapter.spatial:
            return RelationTerm(self.num_labels(adapter), max_distance=self.max_distance, key=key, value=value)
        prefix, _, cols = adapter.token_grid(module.config, k_pos.shape[0])
        labels = grid_labels(q_pos, k_pos, prefix, cols, self.max_distance)
        return RelationTerm(self.num_labels(adapter), labels=labels[None], key=key, value=value)

    @classmethod
    def bench_variants(cls, suite: str, length: int) -> list[Shaw]:
        return [cls(max_distance=16)] if suite == "relative" else []

    def bench_setup(self, module: nn.Module, generator: torch.Generator) -> None:
        # keys and values, shared tables, random
        tables = RelationTables(self.num_labels(get_adapter(module.config)), module.head_dim, None, values=True)
        with torch.no_grad():
            for table in (tables.key, tables.value):
                table.copy_(0.1 * torch.randn(table.shape, generator=generator))
        setattr(module, self.module_name(), tables)
        return None

