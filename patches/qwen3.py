"""Qwen3 family adapter: LLaMA's module names plus q_norm/k_norm, RMS norms over one head's
dimension with weights shared by the heads: merging or removing heads leaves them as they are
(GQA merges the K/V projections, whose outputs the shared k_norm then normalises per head)."""

from __future__ import annotations

from . import register_adapter
from .llama import llama_like

ADAPTER = register_adapter(llama_like("qwen3"))
