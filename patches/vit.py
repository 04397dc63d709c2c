"""ViT family adapter (ViTModel, ViTForImageClassification, ViTForMaskedImageModeling)."""

from __future__ import annotations

from torch import nn

from . import FamilyAdapter, register_adapter


class ViTAdapter(FamilyAdapter):
    def layer_modules(self, model: nn.Module) -> list[nn.Module]:
        # transformers 5.x: ViTModel.layers (no `encoder` wrapper any more)
        return list(self.base_model(model).layers)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        # ViTAttention (transformers 5.x): q_proj/k_proj/v_proj/o_proj, reshapes with -1 heads.
        return [layer.attention for layer in self.layer_modules(model)]


ADAPTER = register_adapter(
    ViTAdapter(
        model_type="vit",
        q_proj="q_proj",
        k_proj="k_proj",
        v_proj="v_proj",
        native_gqa=False,
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        tasks=("image-cls",),
    )
)
