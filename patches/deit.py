"""DeiT family adapter: ViT's attention and layers, with two tokens before the patches ([CLS]
and the distillation token), which 2-D relative positions and windows treat as prefix tokens."""

from __future__ import annotations

from . import register_adapter
from .vit import vit_like

ADAPTER = register_adapter(vit_like("deit", prefix=2))
