"""Phi-3 family adapter: LLaMA's layout with a fused `qkv_proj` (every query head's rows, then
K's, then V's). GQA/MQA split the matrix, merge the K/V rows and re-fuse it (on every layer the
result is a plain Phi-3 checkpoint with fewer `num_key_value_heads`). Pruning is refused: the
forward takes the number of query rows from the model config, so one layer cannot lose heads."""

from __future__ import annotations

from torch import nn

from . import register_adapter
from .fused import FusedQKV
from .llama import LlamaAdapter, llama_like


class Phi3Adapter(FusedQKV, LlamaAdapter):
    def head_counts(self, attn: nn.Module) -> tuple[int, int]:
        kv_heads = attn.num_key_value_heads
        return getattr(attn, self.q_proj).out_features // self.head_dim(attn.config) - 2 * kv_heads, kv_heads

    def set_num_kv_heads(self, attn: nn.Module, num_kv_heads: int) -> None:
        super().set_num_kv_heads(attn, num_kv_heads)
        attn.num_key_value_heads = num_kv_heads  # where Phi3Attention's forward cuts K from V


ADAPTER = register_adapter(llama_like(
    "phi3", cls=Phi3Adapter, q_proj="qkv_proj", k_proj="qkv_proj", v_proj="qkv_proj",
    lora_targets=("qkv_proj", "o_proj"),
    prune_refused="its forward takes the number of query rows from the model config (num_attention_heads), so one "
                  "layer cannot lose query heads",
))
