"""ModernBERT family adapter: `layers[i].attn` (ModernBertAttention) with a fused `Wqkv` (query
rows, then K, then V: the forward splits it into equal thirds) and its output projection `Wo`,
rotary positions (rotate_half layout, as LLaMA), bidirectional attention, and alternating
global / local layers (`config.layer_types`): a local layer passes `sliding_window` to the
attention function and its mask (`create_bidirectional_sliding_window_mask`) keeps only keys
within `local_attention // 2` tokens on either side, so every variant intersects that window.

Transformers 5.24's ModernBERT model code no longer unpads its inputs for flash attention: every
attention function gets padded (B, H, T, D) tensors, so the engine sees ordinary padding masks.
Every variant; pruning splits Wqkv, keeps the remaining heads' rows of each third and re-fuses
it; gqa/mqa are refused: the forward splits Wqkv into three equal parts, so K/V heads cannot be
fewer than query heads."""

from __future__ import annotations

from torch import nn

from . import register_adapter
from .fused import EQUAL_PARTS, FusedQKV
from .llama import LlamaAdapter, llama_like


class ModernBertAdapter(FusedQKV, LlamaAdapter):
    """LLaMA's rotary planes and position numbering (`positions_from_mask`: a left-padded
    sample's RoPE positions counted from its first token, for Shaw's key term); ModernBERT's
    module names and fused projection."""

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        # ModernBertAttention: Wqkv/Wo, calls the attention interface itself
        return [layer.attn for layer in self.layer_modules(model)]

    def output_projection_site(self, layer: nn.Module) -> tuple[nn.Module, str]:
        return layer.attn, "Wo"

    def head_counts(self, attn: nn.Module) -> tuple[int, int]:
        # Wqkv holds three equal parts (Q, K, V) of heads x head_dim rows each
        heads = attn.Wqkv.out_features // (3 * self.head_dim(attn.config))
        return heads, heads


ADAPTER = register_adapter(llama_like(
    "modernbert", cls=ModernBertAdapter, q_proj="Wqkv", k_proj="Wqkv", v_proj="Wqkv", native_gqa=False,
    # `Wo` alone would also match the MLP's output projection (layers[i].mlp.Wo)
    lora_targets=("Wqkv", "attn.Wo"), tasks=("masked-lm", "seq-cls"),
    gqa_refused=EQUAL_PARTS,
))
