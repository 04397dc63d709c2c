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
from .sparse_base import SparseVariant


@register_variant
@dataclass
class Power(SparseVariant):
    block_size: int = 64
    window: int = 128

    name = "power"
    flag = True
    choice = "block"
    description = "Key blocks at power-of-two block distances, a local window and the sink block (PowerAttention)."
    paper = "Chen et al. 2025, PowerAttention: Exponentially Scaling of Receptive Fields for Effective Sparse Attention"
    limits = "A dense-pretrained model loses quality under a sparse pattern until it is trained with it."

    def validate(self, model, adapter, layers) -> None:
        check_int_options(self, "window")
        super().validate(model, adapter, layers)

    def token_blocks(self, module, q_pos, num_blocks, query, key, key_valid):
        bs = self.block_size
        blocks = torch.arange(num_blocks, device=q_pos.device)[None, :]
        own = (q_pos // bs)[:, None]
        distance = own - blocks
        if not getattr(module, "is_causal", False):
            distance = distance.abs()
        power = (distance > 0) & ((distance & (distance - 1)) == 0)
        i = q_pos[:, None]
        local = (blocks * bs + bs - 1 > i - self.window) & (blocks <= own)
        if not getattr(module, "is_causal", False):
            local = local | ((blocks * bs < i + self.window) & (blocks >= own))
        return (power | local | (blocks == 0))[None, None]
