"""Fixed sparse attention: Child, Gray, Radford & Sutskever 2019, "Generating Long Sequences
with Sparse Transformers", section 4.2.

Query i attends its own block of `block` tokens (floor(j / block) == floor(i / block)) and the
last `summary` tokens of every block (j mod block >= block - summary): of the earlier blocks
for decoders (causal), of all blocks for encoders. Parameter-free (flag or convert).
Long causal self-attention without padding runs on the CPU flash kernels forward and backward
(`fixed_flash`). Other self-attention runs as two dense pieces merged by log-sum-exp (`fixed_attention`): the
own blocks as a batch, and the summaries gathered once into T / block * summary keys. Cached
decoding reads key blocks of gcd(block, summary) tokens: exactly the own block and the summaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..call import AttnCall
from ..ops import flash
from ..ops.masks import plain_key_padding
from ..ops.pieces import LayoutSinks, layout_setup, merge, piece, sink_pieces
from .base import check_int_options, register_variant
from .sparse_base import PatternVariant


@register_variant
@dataclass
class Fixed(PatternVariant):
    block: int = 128
    summary: int = 16

    name = "fixed"
    flag = True
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

    def token_blocks(self, module, q_pos, num_blocks, query, key, key_valid, *, causal):
        g = self.key_block(module)
        start = torch.arange(num_blocks, device=q_pos.device)[None, :] * g
        own = start // self.block == (q_pos // self.block)[:, None]
        summary = torch.remainder(start, self.block) >= self.block - self.summary
        return (own | summary)[None, None]

    def allowed(self, module, q_pos, k_pos, num_keys, *, causal):
        own = torch.div(k_pos, self.block, rounding_mode="floor") == torch.div(q_pos, self.block, rounding_mode="floor")
        return own | (torch.remainder(k_pos, self.block) >= self.block - self.summary)

    @classmethod
    def bench_variants(cls, suite: str, length: int) -> list[Fixed]:
        if suite != "sparse":
            return []
        return [cls(block=length // 8, summary=min(64, length // 8), sinks=s) for s in (0, 4)]

    def own_kernel(self, call: AttnCall, sinks: int, sink: torch.Tensor | None) -> torch.Tensor | None:
        # long causal self-attention without padding, forward and backward; its pieces hold the
        # sinks of block 0 (more sinks reach into later blocks' non-summary keys: the other paths)
        if call.causal and sinks <= self.block and flash.serves(call):
            return fixed_flash(call.query, call.key, call.value, self.block, self.summary, sinks, sink, call.scale)
        # self-attention whose mask is only key padding, at inference: the fixed layout. Its own
        # blocks are large, so training keeps the block path, whose SDPA calls have a fused
        # backward (the layout's plain matmuls were 0.77x dense)
        if call.needs_grad or call.query.shape[2] != call.key.shape[2]:
            return None
        valid = plain_key_padding(call.mask, call.causal)
        if valid is False:
            return None
        return fixed_attention(call.query, call.key, call.value, valid, self.block, self.summary, call.causal, call.scale,
                               call.dropout, self.layout_sinks(call, sinks, sink))


def fixed_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_valid: torch.Tensor | None, block: int,
    summary: int, causal: bool, scale: float, dropout: float, sinks: LayoutSinks | None = None,
) -> torch.Tensor:
    """The fixed pattern of Child et al. 2019 as two dense pieces merged by log-sum-exp, for
    self-attention without a cache: each query's own block of `block` tokens (causal inside
    for decoders; blocks as a batch, K/V as views), and the last `summary` tokens of the other
    blocks (earlier ones for decoders), gathered once into n * summary keys that every query
    reads under a block mask. (B, Hq, T, D) -> (B, Hq, T, D)."""
    batch, heads, length, dim = query.shape
    q, k, v, valid, n, flash = layout_setup(query, key, value, key_valid, block, dropout)
    static = key_valid is None
    kv_heads = k.shape[1]
    blocks = valid.view(batch, n, block)
    kb, vb = (t.view(batch, kv_heads, n, block, dim)[:, :, None] for t in (k, v))  # (B, G, 1, n, block, D)
    inside = torch.ones(block, block, dtype=torch.bool, device=query.device)
    inside = inside.tril() if causal else inside
    own = piece(flash, q, kb, vb, inside & blocks[:, None, None, :, None, :], static, scale, dropout, causal_block=causal)
    ks, vs = (t[:, :, :, :, block - summary :].reshape(batch, kv_heads, 1, 1, n * summary, dim) for t in (kb, vb))
    q_block = torch.arange(n * block, device=query.device) // block
    k_block = torch.arange(n * summary, device=query.device) // summary
    other = (k_block[None, :] < q_block[:, None]) if causal else (k_block[None, :] != q_block[:, None])
    keep_sum = other & blocks[:, :, block - summary :].reshape(batch, 1, 1, 1, 1, n * summary)
    out_s, lse_s = piece(flash, q.reshape(batch, kv_heads, -1, 1, n * block, dim), ks, vs, keep_sum, static, scale, dropout)
    extra = sink_pieces(q, k, v, valid, sinks, causal, scale)
    out = merge([own, (out_s.view(own[0].shape), lse_s.view(own[1].shape)), *extra])
    return out.reshape(batch, heads, n * block, -1)[:, :, :length]


def fixed_flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block: int, summary: int, sinks: int,
                logit: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The causal fixed pattern of one unpadded sequence (B, H, T, D) on the flash kernels: each
    block of `block` queries reads its own block (the kernel's causal mode) and the summaries of
    the earlier blocks (gathered in units of gcd(block, summary) keys); the first `sinks` keys
    where no summary holds them."""
    length = query.shape[2]
    query, key, value = flash.whole_blocks(query, key, value, block)
    nb = query.shape[2] // block
    unit = math.gcd(block, summary)
    per = block // unit  # gather units per block; its summary: the last summary // unit of them
    pieces = [flash.Piece(0, nb, 0, block, block, causal=True)]
    for i in range(1, nb):  # block i reads the summaries of blocks 0 .. i - 1
        ids = [m * per + u for m in range(i) for u in range(per - summary // unit, per)]
        pieces.append(flash.Piece(i, 1, 0, unit, len(ids) * unit, index=torch.tensor([ids], device=query.device)))
    uncovered = min(sinks, block - summary, length)  # sink keys outside block 0's summary
    if uncovered > 0 and nb > 1:
        pieces.append(flash.Piece(1, nb - 1, 0, 0, uncovered))
    out = flash.PieceAttention.apply(query, key, value, tuple(pieces), block, scale, logit)
    return out[:, :, :length]
