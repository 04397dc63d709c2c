"""GPT-NeoX family adapter (Pythia): `layers[i].attention` with a fused `query_key_value`, the
output projection `dense`, partial rotary embeddings. Every variant that leaves the projections
as they are; gqa/mqa and prune are refused (the fused matrix is not split yet)."""

from __future__ import annotations

from torch import nn

from . import register_adapter
from .llama import FUSED, FusedQKVAdapter, llama_like


class GPTNeoXAdapter(FusedQKVAdapter):
    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.attention for layer in self.layer_modules(model)]

    def output_projection_site(self, layer: nn.Module) -> tuple[nn.Module, str]:
        return layer.attention, "dense"


ADAPTER = register_adapter(llama_like(
    "gpt_neox", cls=GPTNeoXAdapter, q_proj="query_key_value", k_proj="query_key_value", v_proj="query_key_value",
    native_gqa=False, lora_targets=("query_key_value", "attention.dense"), prune_refused=FUSED, gqa_refused=FUSED,
))
