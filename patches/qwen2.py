"""Qwen2 family adapter: LLaMA's module names with biases on q/k/v (GQA surgery and pruning
carry them), and per-layer native sliding windows (`layer_types`, in the mask)."""

from __future__ import annotations

from . import register_adapter
from .llama import llama_like

ADAPTER = register_adapter(llama_like("qwen2"))
