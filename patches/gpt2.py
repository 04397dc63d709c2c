"""GPT-2 family adapter: `h[i].attn` with a fused Conv1D `c_attn` (Q, K, V columns) and output
Conv1D `c_proj`, learned absolute positions (numbered as the caller passes them: generate()
counts them from each sample's first token, a plain forward by slot). Pruning splits `c_attn`, keeps the remaining heads' rows and
re-fuses it (the module's `split_size` follows); gqa/mqa are refused (the forward splits the
fused output into three equal parts)."""

from __future__ import annotations

from typing import Any

from torch import nn

from . import register_adapter
from .fused import EQUAL_PARTS, FusedQKV, as_conv1d, as_linear
from .llama import LlamaAdapter, llama_like


class GPT2Adapter(FusedQKV, LlamaAdapter):
    def layer_modules(self, model: nn.Module) -> list[nn.Module]:
        return list(self.base_model(model).h)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.attn for layer in self.layer_modules(model)]

    def output_projection_site(self, layer: nn.Module) -> tuple[nn.Module, str]:
        return layer.attn, "c_proj"

    def rope_planes(self, config: Any) -> list[tuple[int, int]] | None:
        return None  # learned absolute positions, no rotary planes

    def positions_from_mask(self, model: nn.Module) -> None:
        # learned absolute positions: renumbering a left-padded caller's tokens would change what
        # the model computes (transformers numbers them by slot); with rotary positions it does not
        return None

    def head_counts(self, attn: nn.Module) -> tuple[int, int]:
        heads = attn.split_size // self.head_dim(attn.config)
        return heads, heads

    def as_linear(self, module: nn.Module) -> nn.Module:
        return as_linear(module)

    def set_output_projection(self, model: nn.Module, layer_idx: int, module: nn.Module) -> None:
        super().set_output_projection(model, layer_idx, as_conv1d(module) if type(module) is nn.Linear else module)

    def set_num_heads(self, attn: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        super().set_num_heads(attn, num_heads, num_kv_heads)
        attn.split_size = num_heads * self.head_dim(attn.config)  # where the forward cuts Q, K and V apart
        attn.num_heads = num_heads


ADAPTER = register_adapter(llama_like(
    "gpt2", cls=GPT2Adapter, q_proj="c_attn", k_proj="c_attn", v_proj="c_attn", native_gqa=False,
    lora_targets=("c_attn", "attn.c_proj"), gqa_refused=EQUAL_PARTS,
))
