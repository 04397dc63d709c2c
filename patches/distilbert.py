"""DistilBERT family adapter: `transformer.layer[i].attention` (DistilBertSelfAttention) with
q_lin/k_lin/v_lin and its output projection out_lin in the same module; it reshapes with -1
heads, so shrunk K/V projections give Hkv < Hq heads."""

from __future__ import annotations

from torch import nn

from . import FamilyAdapter, register_adapter


class DistilBertAdapter(FamilyAdapter):
    def layer_modules(self, model: nn.Module) -> list[nn.Module]:
        base = self.base_model(model)
        return list(getattr(base, "transformer", base).layer)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.attention for layer in self.layer_modules(model)]

    def output_projection_site(self, layer: nn.Module) -> tuple[nn.Module, str]:
        return layer.attention, "out_lin"

    def set_num_heads(self, attn: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        super().set_num_heads(attn, num_heads, num_kv_heads)
        attn.n_heads = num_heads  # the module's own count (its forward reshapes with -1)


ADAPTER = register_adapter(
    DistilBertAdapter(
        model_type="distilbert",
        q_proj="q_lin",
        k_proj="k_lin",
        v_proj="v_lin",
        native_gqa=False,
        lora_targets=("q_lin", "k_lin", "v_lin", "out_lin"),
        tasks=("masked-lm", "seq-cls"),
    )
)
