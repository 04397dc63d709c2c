"""Fixed sparse attention: Child, Gray, Radford & Sutskever 2019, "Generating Long Sequences
with Sparse Transformers", section 4.2.

Query i attends its own block of `block` tokens (floor(j / block) == floor(i / block)) and the
last `summary` tokens of every block (j mod block >= block - summary): of the earlier blocks
for decoders (causal), of all blocks for encoders. Parameter-free (flag or convert).
Self-attention runs as two dense pieces merged by log-sum-exp (`engine.fixed_attention`): the
own blocks as a batch, and the summaries gathered once into T / block * summary keys. Cached
decoding reads key blocks of gcd(block, summary) tokens: exactly the own block and the summaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import check_int_options, register_variant
from .sparse_base import PatternVariant


@register_variant
@dataclass
class Fixed(PatternVariant):
    block: int = 128
    summary: int = 16

    name = "fixed"
    flag = True
    layout = "fixed"  # self-attention: engine.fixed_attention
    absolute_positions = True  # blocks start at each sample's first token
    description = "Own block of `block` tokens plus the last `summary` tokens of every block (Sparse Transformer, fixed)."
    paper = "Child et al. 2019, Generating Long Sequences with Sparse Transformers"
    limits = "A dense-pretrained model loses quality under a sparse pattern until it is trained with it."

    def check_options(self) -> None:
        super().check_options()
        check_int_options(self, "block", "summary")
        if self.summary > self.block:
            raise ValueError(f"fixed: summary ({self.summary}) must not exceed block ({self.block})")

    def key_block(self, module) -> int:
        return math.gcd(self.block, self.summary)

    def token_blocks(self, module, q_pos, num_blocks, query, key, key_valid):
        g = self.key_block(module)
        start = torch.arange(num_blocks, device=q_pos.device)[None, :] * g
        own = start // self.block == (q_pos // self.block)[:, None]
        summary = torch.remainder(start, self.block) >= self.block - self.summary
        return (own | summary)[None, None]

    def allowed(self, module, q_pos, k_pos, num_keys):
        own = torch.div(k_pos, self.block, rounding_mode="floor") == torch.div(q_pos, self.block, rounding_mode="floor")
        return own | (torch.remainder(k_pos, self.block) >= self.block - self.summary)
