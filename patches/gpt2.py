"""GPT-2 family adapter: `h[i].attn` with a fused Conv1D `c_attn` and output `c_proj`, learned
absolute positions (counted from each sample's first token under left padding, as generate
does). Every variant that leaves the projections as they are; gqa/mqa and prune are refused."""

from __future__ import annotations

from typing import Any

from torch import nn

from . import register_adapter
from .llama import FUSED, FusedQKVAdapter, llama_like


class GPT2Adapter(FusedQKVAdapter):
    def layer_modules(self, model: nn.Module) -> list[nn.Module]:
        return list(self.base_model(model).h)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.attn for layer in self.layer_modules(model)]

    def output_projection_site(self, layer: nn.Module) -> tuple[nn.Module, str]:
        return layer.attn, "c_proj"

    def rope_planes(self, config: Any) -> list[tuple[int, int]] | None:
        return None  # learned absolute positions, no rotary planes


ADAPTER = register_adapter(llama_like(
    "gpt2", cls=GPT2Adapter, q_proj="c_attn", k_proj="c_attn", v_proj="c_attn", native_gqa=False,
    lora_targets=("c_attn", "attn.c_proj"), prune_refused=FUSED, gqa_refused=FUSED,
))
