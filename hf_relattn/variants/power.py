"""PowerAttention: Chen et al. 2025, "PowerAttention: Exponentially Scaling of Receptive Fields
for Effective Sparse Attention".

Key blocks of `block_size` tokens; the query in block q reads block b when q - b is a power of
two (1, 2, 4, ...), when b holds one of its `window` most recent tokens (the local window,
its own block included), and the first (sink) block. Causal; encoders read the mirrored
blocks too. Parameter-free (flag or convert). With L blocks a query reads O(log L) blocks,
and any token reaches any earlier one in O(log L) layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import check_int_options, register_variant
from .sparse_base import PatternVariant


@register_variant
@dataclass
class Power(PatternVariant):
    block_size: int = 64
    window: int = 128

    name = "power"
    flag = True
    choice = "block"
    description = "Key blocks at power-of-two block distances, a local window and the sink block (PowerAttention)."
    paper = "Chen et al. 2025, PowerAttention: Exponentially Scaling of Receptive Fields for Effective Sparse Attention"
    limits = "A dense-pretrained model loses quality under a sparse pattern until it is trained with it."

    def check_options(self) -> None:
        super().check_options()
        check_int_options(self, "window")

    absolute_positions = True  # blocks and the sink block start at each sample's first token

    def reads(self, i: torch.Tensor, b: torch.Tensor, causal: bool) -> torch.Tensor:
        """May the query at position i read key block b (broadcast)? Power-of-two block
        distance, the blocks of its `window` most recent tokens, and the sink block."""
        bs = self.block_size
        own = torch.div(i, bs, rounding_mode="floor")
        distance = own - b if causal else (own - b).abs()
        power = (distance > 0) & ((distance & (distance - 1)) == 0)
        local = (b * bs + bs - 1 > i - self.window) & (b <= own)
        if not causal:
            local = local | ((b * bs < i + self.window) & (b >= own))
        return power | local | (b == 0)

    def token_blocks(self, module, q_pos, num_blocks, query, key, key_valid, *, causal):
        return self.reads(q_pos[:, None], torch.arange(num_blocks, device=q_pos.device)[None, :], causal)[None, None]

    def pair_mask(self, module, q_pos, k_pos, query, key, key_valid, query_valid=None, *, causal):
        blocks = torch.div(k_pos, self.block_size, rounding_mode="floor")
        return self.reads(q_pos[:, None, :, None], blocks[:, None, None, :], causal)

    @classmethod
    def bench_variants(cls, suite: str, length: int) -> list[Power]:
        return [cls(block_size=64, window=length // 16, sinks=s) for s in (0, 4)] if suite == "sparse" else []
