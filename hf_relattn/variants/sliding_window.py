"""Sliding-window (local) attention: each query attends the `window` nearest keys.

Decoders: query i attends keys i - window < j <= i (as Mistral's and transformers'
`sliding_window`); encoders: |i - j| < window. ViT: a 2-D neighbourhood, patches whose row and
column each differ by less than `window` (blocked local attention as in HaloNet, Vaswani et al.
2021, and neighbourhood attention, Hassani et al. 2023), with [CLS] global (it attends and is
attended by every token). Local attention in transformers goes back to Parmar et al. 2018
(Image Transformer) and Child et al. 2019; Beltagy et al. 2020 (Longformer) for encoders.
Parameter-free: by flag (`attn_implementation="relattn_sliding_window"`) or `convert`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..ops import flash
from ..patches import get_adapter
from .base import check_int_options, register_variant
from .sparse_base import PatternVariant, block_range

if TYPE_CHECKING:
    from torch import nn

    from ..call import AttnCall
    from ..patches import FamilyAdapter


@register_variant
@dataclass
class SlidingWindow(PatternVariant):
    window: int = 512
    block_size: int = 64

    name = "sliding_window"
    flag = True
    description = "Each query attends its `window` nearest keys (causal: the previous ones; ViT: a 2-D patch neighbourhood, CLS global)."
    paper = "Child et al. 2019; Beltagy et al. 2020 (Longformer); Vaswani et al. 2021 (HaloNet)"
    limits = "A dense-pretrained model loses quality under a sparse pattern until it is trained with it."

    def check_options(self) -> None:
        super().check_options()
        check_int_options(self, "window")

    def _grid(self, module: nn.Module, num_tokens: int) -> tuple[int, int, int] | None:
        adapter = get_adapter(module.config)
        return adapter.token_grid(module.config, num_tokens) if adapter.spatial else None

    def token_blocks(self, module, q_pos, num_blocks, query, key, key_valid, *, causal):
        w, block = self.window, self.block_size
        grid = self._grid(module, key.shape[2])
        if grid is not None:
            prefix, _, cols = grid
            first = torch.where(q_pos < prefix, 0, q_pos - (w - 1) * cols - (cols - 1))
            last = torch.where(q_pos < prefix, key.shape[2] - 1, q_pos + (w - 1) * cols + (cols - 1))
            return (block_range(first, last, num_blocks, block) | (torch.arange(num_blocks, device=q_pos.device) < -(-prefix // block)))[None, None]
        last = q_pos if causal else q_pos + w - 1
        return block_range(q_pos - w + 1, last, num_blocks, block)[None, None]

    def own_kernel(self, call: AttnCall, sinks: int, sink: torch.Tensor | None) -> torch.Tensor | None:
        """A 1-D window is a band: FlashAttention over each query block's window of keys
        (`hf_relattn.ops.flash`), forward and backward, for long calls without padding or cache."""
        if self._grid(call.module, call.key.shape[2]) is not None or not flash.serves(call):
            return None
        return flash.band_attention(call.query, call.key, call.value, self.window - 1, 0 if call.causal else self.window - 1,
                                    sinks, sink, call.scale, flash.band_rows(self.window))

    def allowed(self, module, q_pos, k_pos, num_keys, *, causal):
        grid = self._grid(module, num_keys)
        if grid is not None:
            prefix, _, cols = grid
            qp, kp = (q_pos - prefix).clamp(min=0), (k_pos - prefix).clamp(min=0)
            near = ((qp // cols - kp // cols).abs() < self.window) & ((qp % cols - kp % cols).abs() < self.window)
            return near | (q_pos < prefix) | (k_pos < prefix)
        if causal:
            return k_pos > q_pos - self.window
        return (k_pos - q_pos).abs() < self.window

    @classmethod
    def bench_variants(cls, suite: str, length: int) -> list[SlidingWindow]:
        return [cls(window=length // 8, block_size=64, sinks=s) for s in (0, 4)] if suite == "sparse" else []
