"""CLIP family adapters: the text tower (`clip_text_model`: CLIPTextModel), the vision tower
(`clip_vision_model`: CLIPVisionModel) and the two-tower model (`clip`: CLIPModel, and
CLIPForImageClassification, which holds only the vision tower).

Both towers are stacks of `CLIPEncoderLayer` whose `self_attn` (CLIPAttention) has separate
q_proj/k_proj/v_proj/out_proj and reshapes with -1 heads, so K/V projections with fewer heads
(GQA/MQA) and pruned heads need no other change. CLIPAttention's `is_causal` is False in both
towers: the text tower passes `is_causal=True` with each call (and a causal mask), which the
engine reads first; `is_causal(attn)` says so for the checks made before any call (MoBA, MoSA).

The two-tower adapter lists the text layers first, then the vision layers (`layers=[0, 1]` on a
2 + 2 layer CLIPModel is the text tower). Each attention module keeps its tower's own config
(CLIPTextConfig, CLIPVisionConfig), so at run time the variants find the tower's adapter
(`get_adapter(module.config)`): the vision layers get the patch grid, the text layers causality,
and tables, routers and K/V groups are sized by each tower's own head count and width.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from . import FamilyAdapter, get_adapter, register_adapter
from .vit import ViTAdapter

PROJECTIONS = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "native_gqa": False,
               "lora_targets": ("q_proj", "k_proj", "v_proj", "out_proj")}
# CLIPModel hands its keyword arguments to both towers, and a tower's attention sees only the
# tower's sub-config, not the model's variant spec (which is on the top config)
INPUTS_REFUSED = (
    "CLIPModel passes its keyword arguments (relation_ids) to both towers, whose sequences differ, and a tower's "
    "attention sees only its sub-config, not the model's variant spec; convert CLIPTextModel or CLIPVisionModel alone"
)


class CLIPTowerMixin:
    """What both towers share: `encoder.layers[i].self_attn`, output projection `out_proj`."""

    def layer_modules(self, model: nn.Module) -> list[nn.Module]:
        # CLIPTextModel / CLIPVisionModel are their own base model; the *WithProjection heads
        # name the tower in base_model_prefix
        return list(self.base_model(model).encoder.layers)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.self_attn for layer in self.layer_modules(model)]

    def output_projection_site(self, layer: nn.Module) -> tuple[nn.Module, str]:
        return layer.self_attn, "out_proj"

    def set_num_heads(self, attn: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        super().set_num_heads(attn, num_heads, num_kv_heads)  # type: ignore[misc]
        attn.num_heads = num_heads  # CLIPAttention's own count (its forward reshapes with -1 heads)


class CLIPTextAdapter(CLIPTowerMixin, FamilyAdapter):
    def is_causal(self, attn: nn.Module) -> bool:
        return True  # CLIPTextModel calls every layer with is_causal=True and a causal mask


class CLIPVisionAdapter(CLIPTowerMixin, ViTAdapter):
    """[CLS], then the patches in row-major order (CLIPVisionEmbeddings), as ViT."""


class CLIPAdapter(FamilyAdapter):
    """CLIPModel (text layers, then vision layers) and CLIPForImageClassification (vision layers)."""

    def towers(self, model: nn.Module) -> list[tuple[nn.Module, FamilyAdapter]]:
        base = self.base_model(model)
        return [(getattr(base, name), ADAPTERS_BY_TOWER[name]) for name in ("text_model", "vision_model") if hasattr(base, name)]

    def layer_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer for tower, adapter in self.towers(model) for layer in adapter.layer_modules(tower)]

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.self_attn for layer in self.layer_modules(model)]

    def output_projection_site(self, layer: nn.Module) -> tuple[nn.Module, str]:
        return layer.self_attn, "out_proj"

    def set_num_heads(self, attn: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        get_adapter(attn.config).set_num_heads(attn, num_heads, num_kv_heads)

    def is_causal(self, attn: nn.Module) -> bool:
        return get_adapter(attn.config).is_causal(attn)

    def num_heads(self, config: Any) -> int:
        if hasattr(config, "text_config") or hasattr(config, "vision_config"):
            # the towers may differ (ViT-B/32: 8 text heads, 12 vision heads): ask a module's config
            raise TypeError("CLIP's towers have their own head counts: pass a tower's config (module.config)")
        return super().num_heads(config)


TEXT = register_adapter(CLIPTextAdapter(model_type="clip_text_model", tasks=(), inputs_refused=None, **PROJECTIONS))
VISION = register_adapter(CLIPVisionAdapter(model_type="clip_vision_model", tasks=(), prefix=1, **PROJECTIONS))
ADAPTER = register_adapter(CLIPAdapter(model_type="clip", tasks=("image-cls",), inputs_refused=INPUTS_REFUSED, **PROJECTIONS))
ADAPTERS_BY_TOWER = {"text_model": TEXT, "vision_model": VISION}
