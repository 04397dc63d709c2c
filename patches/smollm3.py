"""SmolLM3 family adapter: LLaMA's layout; some layers have no rotary positions
(`no_rope_layers`), where the aligned GQA init's rotation constraint is merely stricter than
needed, and native sliding windows where the config asks for them."""

from __future__ import annotations

from . import register_adapter
from .llama import llama_like

ADAPTER = register_adapter(llama_like("smollm3"))
