"""LLaMA family adapter (LlamaModel and every task head on it)."""

from __future__ import annotations

from torch import nn

from . import FamilyAdapter, register_adapter


class LlamaAdapter(FamilyAdapter):
    def layer_modules(self, model: nn.Module) -> list[nn.Module]:
        return list(self.base_model(model).layers)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        # LlamaAttention: q_proj/k_proj/v_proj/o_proj, calls the attention interface itself.
        return [layer.self_attn for layer in self.layer_modules(model)]

    def output_projection_site(self, layer: nn.Module) -> tuple[nn.Module, str]:
        return layer.self_attn, "o_proj"


ADAPTER = register_adapter(
    LlamaAdapter(
        model_type="llama",
        q_proj="q_proj",
        k_proj="k_proj",
        v_proj="v_proj",
        native_gqa=True,
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        tasks=("causal-lm", "seq-cls"),
    )
)
