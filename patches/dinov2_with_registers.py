"""DINOv2 with registers (Darcet et al. 2024, "Vision Transformers Need Registers"): DINOv2's
layers, with `num_register_tokens` learned tokens between [CLS] and the patches, which 2-D
relative positions and windows treat as prefix tokens (special labels, global in windows)."""

from __future__ import annotations

from typing import Any

from . import register_adapter
from .dinov2 import Dinov2Adapter
from .vit import vit_like


class Dinov2RegistersAdapter(Dinov2Adapter):
    def prefix_tokens(self, config: Any) -> int:
        return 1 + config.num_register_tokens  # [CLS], then the registers (Dinov2WithRegistersEmbeddings)


ADAPTER = register_adapter(vit_like("dinov2_with_registers", cls=Dinov2RegistersAdapter))
