"""Mistral family adapter: LLaMA's module names; a native sliding window (config.sliding_window)
that transformers writes into the attention mask, which the engine applies on every path."""

from __future__ import annotations

from . import register_adapter
from .llama import llama_like

ADAPTER = register_adapter(llama_like("mistral"))
