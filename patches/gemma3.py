"""Gemma 3 text family adapter (`gemma3_text`: Gemma3ForCausalLM): LLaMA's layout with per-head
q_norm/k_norm (weights shared by the heads, as Qwen3), a head dimension that is not
hidden/heads, `query_pre_attn_scalar` scaling (passed to the engine as `scaling`) and local
layers with a native sliding window (`layer_types`, in the mask). Transformers 5.2x passes no
attention softcapping for Gemma 3 (the engine refuses a `softcap` it cannot apply)."""

from __future__ import annotations

from . import register_adapter
from .llama import llama_like

ADAPTER = register_adapter(llama_like("gemma3_text"))
