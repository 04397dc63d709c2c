"""Strided sparse attention: Child, Gray, Radford & Sutskever 2019, "Generating Long Sequences
with Sparse Transformers", section 4.2 (one head type mixing both components).

Query i attends the previous `stride` tokens (i - stride < j <= i) and every stride-th token
before it ((i - j) mod stride == 0). Encoders get the symmetric version (|i - j| < stride, or
i - j a multiple of stride). Parameter-free (flag or convert).

Self-attention (prefill, training, encoders) runs as two dense pieces merged by log-sum-exp
(`engine.strided_attention`): the band by blocks of `stride` queries, and the same-residue keys,
which are contiguous sequences of T/stride tokens once positions are laid out residue-major.
Cached decoding, and masks that are more than key padding, take the block-sparse path on key
blocks of `block_size` tokens (there the strided part costs a whole block per strided key).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import check_int_options, register_variant
from .sparse_base import PatternVariant


@register_variant
@dataclass
class Strided(PatternVariant):
    stride: int = 128
    block_size: int = 64

    name = "strided"
    flag = True
    layout = "strided"  # self-attention: engine.strided_attention
    description = "Previous `stride` tokens plus every stride-th token (Sparse Transformer, strided)."
    paper = "Child et al. 2019, Generating Long Sequences with Sparse Transformers"
    limits = (
        "A dense-pretrained model loses quality under a sparse pattern until it is trained with it; cached "
        "decoding reads whole key blocks for single strided keys."
    )

    def check_options(self) -> None:
        super().check_options()
        check_int_options(self, "stride")

    def token_blocks(self, module, q_pos, num_blocks, query, key, key_valid):
        l, bs = self.stride, self.block_size
        start = torch.arange(num_blocks, device=q_pos.device)[None, :] * bs  # (1, N)
        i = q_pos[:, None]
        local = (start <= i + (0 if getattr(module, "is_causal", False) else l - 1)) & (start + bs - 1 > i - l)
        # the first key at or after the block start with j = i (mod l)
        first = start + torch.remainder(i - start, l)
        strided = first <= start + bs - 1
        if getattr(module, "is_causal", False):
            strided = strided & (first <= i)
        return (local | strided)[None, None]

    def allowed(self, module, q_pos, k_pos, num_keys):
        near = (q_pos - k_pos).abs() < self.stride
        return near | (torch.remainder(q_pos - k_pos, self.stride) == 0)
