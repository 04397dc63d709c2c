"""T5 relative position bias: Raffel et al. 2020, "Exploring the Limits of Transfer Learning with
a Unified Text-to-Text Transformer" (JMLR), section 2.1.

Each layer learns one scalar per (bucket, head), added to the attention scores. The relative
position j - i is mapped to `num_buckets` buckets: exact buckets for small distances, then
logarithmically wider ones up to `max_distance`, beyond which everything shares the last bucket.
Encoders (bidirectional) split the buckets between the two directions; decoders (causal) only
see j <= i and use all buckets for the past. The table is zero-initialised, so a freshly
converted model gives exactly the original outputs. Unlike T5, which shares one table across
layers, every converted layer gets its own (the issue's "per layer"), stored as the attention
module's `relattn_t5_bias` embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .base import MAX_TABLE_ROWS, RelationTerm, Variant, attach, check_int_options, register_variant

if TYPE_CHECKING:
    from ..patches import FamilyAdapter

MODULE_NAME = "relattn_t5_bias"


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """Bucket index of each relative position j - i (Raffel et al. 2020)."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # log-spaced buckets from max_exact to max_distance; float32 math as in the paper's code
    scaled = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (scaled * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


@register_variant
@dataclass
class T5Bias(Variant):
    num_buckets: int = 32
    max_distance: int = 128

    name = "t5_bias"
    heads_from_config = True
    axis = "scores"
    description = "Learned scalar bias per head on log-bucketed relative positions (per layer, zero-init)."
    paper = "Raffel et al. 2020, Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer (T5)"
    limits = "Zero-initialised bias tables: untrained they change nothing."

    def check_options(self) -> None:
        super().check_options()
        check_int_options(self, "num_buckets", maximum=MAX_TABLE_ROWS)
        check_int_options(self, "max_distance")
        if self.num_buckets < 4:
            raise ValueError(f"{self.name}: num_buckets must be at least 4 (two exact buckets per direction), got {self.num_buckets}")
        if self.max_distance <= self.num_buckets // 2:
            raise ValueError(
                f"{self.name}: max_distance ({self.max_distance}) must exceed num_buckets // 2 ({self.num_buckets // 2})"
            )

    def apply(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int], initialize: bool) -> None:
        modules = adapter.attention_modules(model)
        for idx in layers:
            attn = modules[idx]
            heads = adapter.num_heads(attn.config)  # the layer's own config: CLIP's towers differ
            reference = getattr(attn, adapter.q_proj).weight
            table = nn.Embedding(self.num_buckets, heads, device=reference.device, dtype=reference.dtype)
            if initialize:
                nn.init.zeros_(table.weight)
            setattr(attn, MODULE_NAME, table)
            attach(attn, self)

    def relation_term(
        self, module: nn.Module, num_heads: int, q_pos: torch.Tensor, k_pos: torch.Tensor, inputs: dict[str, Any], *,
        causal: bool
    ) -> RelationTerm:
        # Used when the layer also has Shaw/relation terms: the bias is then one more label table.
        bidirectional = not causal

        def buckets(qp: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
            return relative_position_bucket(kp[None, :] - qp[:, None], bidirectional, self.num_buckets, self.max_distance)[None]

        return RelationTerm(self.num_buckets, labels=buckets, bias=getattr(module, MODULE_NAME).weight.t())

    def score_bias(
        self, module: nn.Module, num_heads: int, q_pos: torch.Tensor, k_pos: torch.Tensor, *, causal: bool
    ) -> torch.Tensor:
        buckets = relative_position_bucket(
            k_pos[None, :] - q_pos[:, None], not causal, self.num_buckets, self.max_distance
        )
        return getattr(module, MODULE_NAME)(buckets).permute(2, 0, 1).float()
