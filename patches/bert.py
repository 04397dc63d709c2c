"""BERT family adapter (BertModel and every task head on it)."""

from __future__ import annotations

from torch import nn

from . import FamilyAdapter, register_adapter


class BertAdapter(FamilyAdapter):
    def layer_modules(self, model: nn.Module) -> list[nn.Module]:
        return list(self.base_model(model).encoder.layer)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        # BertSelfAttention (query/key/value); its output projection lives in BertSelfOutput.
        # It reshapes K/V with -1 heads, so shrunk K/V projections give Hkv < Hq heads.
        return [layer.attention.self for layer in self.layer_modules(model)]

    def attention_blocks(self, model: nn.Module) -> list[nn.Module]:
        return [layer.attention for layer in self.layer_modules(model)]

    def output_projection_site(self, layer: nn.Module) -> tuple[nn.Module, str]:
        return layer.attention.output, "dense"  # BertSelfOutput.dense

    def set_num_heads(self, attn: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        super().set_num_heads(attn, num_heads, num_kv_heads)
        # BertSelfAttention's own counts (its forward reshapes with -1 heads; kept for readers)
        attn.num_attention_heads = num_heads
        attn.all_head_size = num_heads * attn.attention_head_size


def bert_like(model_type: str) -> BertAdapter:
    """The adapter of an encoder family with BERT's layout (`encoder.layer[i].attention.self`
    with query/key/value, output projection in `attention.output.dense`)."""
    return BertAdapter(
        model_type=model_type,
        q_proj="query",
        k_proj="key",
        v_proj="value",
        native_gqa=False,
        lora_targets=("query", "key", "value", "attention.output.dense"),
        tasks=("masked-lm", "seq-cls"),
    )


ADAPTER = register_adapter(bert_like("bert"))
