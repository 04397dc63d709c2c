"""Phi-3 family adapter: LLaMA's layout with a fused `qkv_proj` (query rows, then K, then V).
Every variant that leaves the projections as they are; gqa/mqa and prune are refused (the fused
matrix is not split and re-fused yet)."""

from __future__ import annotations

from . import register_adapter
from .llama import FUSED, FusedQKVAdapter, llama_like

ADAPTER = register_adapter(llama_like(
    "phi3", cls=FusedQKVAdapter, q_proj="qkv_proj", k_proj="qkv_proj", v_proj="qkv_proj",
    lora_targets=("qkv_proj", "o_proj"), prune_refused=FUSED, gqa_refused=FUSED,
))
