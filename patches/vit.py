"""ViT family adapter (ViTModel, ViTForImageClassification, ViTForMaskedImageModeling)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from . import FamilyAdapter, register_adapter


@dataclass(frozen=True)
class ViTAdapter(FamilyAdapter):
    # tokens before the patches: [CLS] (ViT, DINOv2), [CLS] and the distillation token (DeiT)
    prefix: int = 1
    spatial = True

    def prefix_tokens(self, config: Any) -> int:
        """Tokens before the patch grid."""
        return self.prefix

    def token_grid(self, config: Any, num_tokens: int) -> tuple[int, int, int]:
        # the prefix tokens, then the patches in row-major order (ViTEmbeddings); the configured
        # grid, or a square one for other image sizes (interpolate_pos_encoding).
        prefix = self.prefix_tokens(config)
        patches = num_tokens - prefix
        image, patch = config.image_size, config.patch_size
        height, width = image if isinstance(image, (tuple, list)) else (image, image)
        patch_h, patch_w = patch if isinstance(patch, (tuple, list)) else (patch, patch)
        rows, cols = height // patch_h, width // patch_w
        if patches == rows * cols:
            return prefix, rows, cols
        side = math.isqrt(max(patches, 0))
        if side * side != patches:
            raise ValueError(
                f"Cannot place {patches} {self.model_type} patch tokens on a grid: expected {rows}x{cols} "
                "(the configured image size) or another square number."
            )
        return prefix, side, side

    def layer_modules(self, model: nn.Module) -> list[nn.Module]:
        # transformers 5.x: ViTModel.layers (no `encoder` wrapper any more)
        return list(self.base_model(model).layers)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        # ViTAttention (transformers 5.x): q_proj/k_proj/v_proj/o_proj, reshapes with -1 heads.
        return [layer.attention for layer in self.layer_modules(model)]

    def output_projection_site(self, layer: nn.Module) -> tuple[nn.Module, str]:
        return layer.attention, "o_proj"

    def set_num_heads(self, attn: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        super().set_num_heads(attn, num_heads, num_kv_heads)
        attn.num_attention_heads = num_heads  # ViTAttention's own count (forward reshapes with -1)


def vit_like(model_type: str, prefix: int = 1, cls: type[ViTAdapter] = ViTAdapter) -> ViTAdapter:
    """The adapter of a vision family with ViT's attention (q_proj/k_proj/v_proj/o_proj on
    `layer.attention`) and `prefix` tokens before the patch grid."""
    return cls(
        model_type=model_type,
        q_proj="q_proj",
        k_proj="k_proj",
        v_proj="v_proj",
        native_gqa=False,
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        tasks=("image-cls",),
        prefix=prefix,
    )


ADAPTER = register_adapter(vit_like("vit"))
