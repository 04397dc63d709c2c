"""DINOv2 family adapter: ViT's attention (q_proj/k_proj/v_proj/o_proj) in `encoder.layer`,
[CLS] before the patches. (Register tokens belong to `dinov2_with_registers`, another model type.)"""

from __future__ import annotations

from torch import nn

from . import register_adapter
from .vit import ViTAdapter, vit_like


class Dinov2Adapter(ViTAdapter):
    def layer_modules(self, model: nn.Module) -> list[nn.Module]:
        base = self.base_model(model)
        return list(getattr(base, "encoder", base).layer)  # Dinov2Encoder is a PreTrainedModel of its own


ADAPTER = register_adapter(vit_like("dinov2", cls=Dinov2Adapter))
