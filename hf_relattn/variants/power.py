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

from ..call import AttnCall
from ..ops import flash
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

    def own_kernel(self, call: AttnCall, sinks: int, sink: torch.Tensor | None) -> torch.Tensor | None:
        """Causal calls the flash kernels serve (`hf_relattn.ops.flash`), as two pieces per query
        block: the blocks of its local window (a sliding window of keys, masked by `reads`) and
        the farther blocks it reads (power-of-two distances and the sink block, gathered). The
        sinks lie in the sink block, which every query reads."""
        if not call.causal or sinks > self.block_size or not flash.serves(call):
            return None
        return power_attention(self, call.query, call.key, call.value, sink, call.scale)

    @classmethod
    def bench_variants(cls, suite: str, length: int) -> list[Power]:
        return [cls(block_size=64, window=length // 16, sinks=s) for s in (0, 4)] if suite == "sparse" else []


def power_attention(variant: Power, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, logit: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    """Causal PowerAttention of one unpadded sequence (B, H, T, D) on the flash kernels: query
    blocks of `block_size` tokens; the local piece is the window of the `near` blocks up to the
    query's own, under `reads`; the far piece gathers the earlier blocks it reads (power-of-two
    distances beyond the window, and block 0)."""
    bs = variant.block_size
    length = query.shape[2]
    query, key, value = flash.whole_blocks(query, key, value, bs)
    nb = query.shape[2] // bs
    dtype, device = query.dtype, query.device
    near = (variant.window + bs - 2) // bs  # the farthest block a token's local window reaches back

    def local(qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        return variant.reads(qpos, torch.div(kpos, bs, rounding_mode="floor"), True) & (kpos <= qpos)

    # from block near + 1 on, block 0 is out of the window and `local` depends on distances only
    pieces = flash.sliding_pieces(nb, bs, length, -near * bs, (near + 1) * bs, local, dtype, device, first_shared=near + 1)
    far = [[q - d for d in (1 << k for k in range(nb.bit_length())) if near < d <= q] for q in range(nb)]
    far = [blocks + ([0] if q > near and 0 not in blocks else []) for q, blocks in enumerate(far)]
    width = max(1, max(len(blocks) for blocks in far))
    if any(far):
        index = torch.tensor([blocks + [0] * (width - len(blocks)) for blocks in far], device=device)
        valid = torch.tensor([[n < len(blocks) for n in range(width)] for blocks in far], device=device)
        keep = valid.repeat_interleave(bs, dim=1)[:, None, :]  # whole earlier blocks: one mask row for all rows
        pieces.append(flash.Piece(0, nb, 0, bs, width * bs, flash.additive(keep, dtype), empty=~valid.any(-1)[:, None, None],
                                  index=index))
    out = flash.PieceAttention.apply(query, key, value, tuple(pieces), bs, scale, logit)
    return out[:, :, :length]
