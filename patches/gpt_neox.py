"""GPT-NeoX family adapter (Pythia): `layers[i].attention` with a fused `query_key_value` (per
head: its query, key and value rows), the output projection `dense`, partial rotary embeddings.
Pruning splits the matrix and re-fuses the kept heads; gqa/mqa are refused (the forward splits
each head's rows into three equal parts)."""

from __future__ import annotations

import torch
from torch import nn

from . import register_adapter
from .fused import EQUAL_PARTS, FusedQKV
from .llama import LlamaAdapter, llama_like


class GPTNeoXAdapter(FusedQKV, LlamaAdapter):
    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.attention for layer in self.layer_modules(model)]

    def output_projection_site(self, layer: nn.Module) -> tuple[nn.Module, str]:
        return layer.attention, "dense"

    def head_counts(self, attn: nn.Module) -> tuple[int, int]:
        heads = attn.query_key_value.out_features // (3 * self.head_dim(attn.config))
        return heads, heads

    def qkv_layout(self, num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
        # the forward views the output as (heads, 3 * head_dim): head h's q, k, v rows side by side
        if num_heads != num_kv_heads:
            raise ValueError(f"gpt_neox: {EQUAL_PARTS}")
        starts = torch.arange(num_heads)[:, None] * 3 * head_dim + torch.arange(head_dim)
        return starts.flatten(), (starts + head_dim).flatten(), (starts + 2 * head_dim).flatten()


ADAPTER = register_adapter(llama_like(
    "gpt_neox", cls=GPTNeoXAdapter, q_proj="query_key_value", k_proj="query_key_value", v_proj="query_key_value",
    native_gqa=False, lora_targets=("query_key_value", "attention.dense"), gqa_refused=EQUAL_PARTS,
))
