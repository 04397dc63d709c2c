"""Strided sparse attention: Child, Gray, Radford & Sutskever 2019, "Generating Long Sequences
with Sparse Transformers", section 4.2 (one head type mixing both components).

Query i attends the previous `stride` tokens (i - stride < j <= i) and every stride-th token
before it ((i - j) mod stride == 0). Encoders get the symmetric version (|i - j| < stride, or
i - j a multiple of stride). Parameter-free (flag or convert).

Long self-attention without padding (prefill, training) runs on the CPU flash kernels forward
and backward (`strided_flash`): the band as a sliding window of keys per query block, and the
same-residue keys as residue classes (queries and keys `stride` apart), merged by log-sum-exp.
Other self-attention (key padding) runs as two dense pieces the same way (`strided_attention`).
Cached decoding, and masks that are more than key padding, take the block-sparse path on key
blocks of `block_size` tokens (there the strided part costs a whole block per strided key).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..call import AttnCall
from ..ops import flash
from ..ops.masks import plain_key_padding
from ..ops.pieces import LayoutSinks, layout_setup, merge, piece, sink_pieces
from .base import check_int_options, register_variant
from .sparse_base import PatternVariant


@register_variant
@dataclass
class Strided(PatternVariant):
    stride: int = 128
    block_size: int = 64

    name = "strided"
    flag = True
    description = "Previous `stride` tokens plus every stride-th token (Sparse Transformer, strided)."
    paper = "Child et al. 2019, Generating Long Sequences with Sparse Transformers"
    limits = (
        "A dense-pretrained model loses quality under a sparse pattern until it is trained with it; cached "
        "decoding reads whole key blocks for single strided keys."
    )

    def check_options(self) -> None:
        super().check_options()
        check_int_options(self, "stride")

    def token_blocks(self, module, q_pos, num_blocks, query, key, key_valid, *, causal):
        l, bs = self.stride, self.block_size
        start = torch.arange(num_blocks, device=q_pos.device)[None, :] * bs  # (1, N)
        i = q_pos[:, None]
        local = (start <= i + (0 if causal else l - 1)) & (start + bs - 1 > i - l)
        # the first key at or after the block start with j = i (mod l)
        first = start + torch.remainder(i - start, l)
        strided = first <= start + bs - 1
        if causal:
            strided = strided & (first <= i)
        return (local | strided)[None, None]

    def allowed(self, module, q_pos, k_pos, num_keys, *, causal):
        near = (q_pos - k_pos).abs() < self.stride
        return near | (torch.remainder(q_pos - k_pos, self.stride) == 0)

    @classmethod
    def bench_variants(cls, suite: str, length: int) -> list[Strided]:
        return [cls(stride=256, block_size=64, sinks=s) for s in (0, 4)] if suite == "sparse" else []

    def own_kernel(self, call: AttnCall, sinks: int, sink: torch.Tensor | None) -> torch.Tensor | None:
        if flash.serves(call):  # long self-attention without padding: FlashAttention pieces, forward and backward
            return strided_flash(call.query, call.key, call.value, self.stride, call.causal, sinks, sink, call.scale)
        # self-attention whose mask is only key padding: the strided layout (the block path reads
        # whole key blocks for single strided keys)
        valid = plain_key_padding(call.mask, call.causal) if call.query.shape[2] == call.key.shape[2] else False
        if valid is False:
            return None
        return strided_attention(call.query, call.key, call.value, valid, self.stride, call.causal, call.scale, call.dropout,
                                 self.layout_sinks(call, sinks, sink))

    def computed_pairs(self, module, q, k) -> float:
        # the band blocks plus the residue sequences
        length = q.shape[2]
        return float(length * ((2 if module.is_causal else 3) * self.stride + -(-length // self.stride)))


def strided_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_valid: torch.Tensor | None, stride: int,
    causal: bool, scale: float, dropout: float, sinks: LayoutSinks | None = None,
) -> torch.Tensor:
    """The strided pattern of Child et al. 2019 as two dense pieces merged by log-sum-exp, for
    self-attention without a cache (Q = K): (B, Hq, T, D) -> (B, Hq, T, D).

    The band |i - j| < stride runs by blocks of `stride` queries over their 2 (causal) or 3
    neighbouring key blocks (a strided view of K/V, no gather). The same-residue keys (i - j a
    non-zero multiple of stride) are contiguous in the residue-major layout (position a*s + r
    -> [r, a]): T/stride sequences of T/stride tokens, attended densely."""
    batch, heads, length, dim = query.shape
    s = stride
    q, k, v, valid, n, flash = layout_setup(query, key, value, key_valid, s, dropout)
    static = key_valid is None
    # band: query block a reads the key blocks a-1, a (and a+1 unless causal)
    width = (2 if causal else 3) * s
    front, back = s, 0 if causal else s
    k_win, v_win = (F.pad(t, (0, 0, front, back)).unfold(2, width, s).transpose(-1, -2)[:, :, None] for t in (k, v))
    u = torch.arange(s, device=query.device)[:, None]
    t = torch.arange(width, device=query.device)[None, :]
    near = (t > u) & (t < u + 2 * s) & ((t <= u + s) if causal else True)  # |i - j| < s, j <= i when causal
    keep_band = near & F.pad(valid, (front, back), value=False).unfold(1, width, s)[:, None, None, :, None, :]
    band = piece(flash, q, k_win, v_win, keep_band, static, scale, dropout)
    # same residue: position a*s + r at [r, a]
    k_r, v_r = (t.view(batch, k.shape[1], n, s, dim).transpose(-3, -2)[:, :, None] for t in (k, v))  # (B, G, 1, s, n, D)
    a = torch.arange(n, device=query.device)
    other = (a[None, :] < a[:, None]) if causal else (a[None, :] != a[:, None])  # key index b vs query index a
    keep_res = other & valid.view(batch, n, s).transpose(1, 2)[:, None, None, :, None, :]
    out_r, lse_r = piece(flash, q.transpose(-3, -2), k_r, v_r, keep_res, static, scale, dropout)
    extra = sink_pieces(q, k, v, valid, sinks, causal, scale)
    out = merge([band, (out_r.transpose(-3, -2), lse_r.transpose(-2, -1)), *extra])
    return out.reshape(batch, heads, n * s, -1)[:, :, :length]


def strided_flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, stride: int, causal: bool, sinks: int,
                  logit: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The strided pattern of one unpadded sequence (B, H, T, D) on the flash kernels: the band
    |i - j| < stride (j <= i when causal) by blocks of FLASH_ROWS queries, and for each residue r
    the keys j = i (mod stride) outside the band, the sequence r, r + stride, ... read by the same
    residue's queries (a view: queries and keys `stride` apart); the first `sinks` keys where
    neither reaches them."""
    length = query.shape[2]
    rows = flash.FLASH_ROWS
    unit = rows * stride // math.gcd(rows, stride)  # whole query blocks and whole residue sequences
    padded = -(-length // unit) * unit
    if padded != length:
        query, key, value = (F.pad(t, (0, 0, 0, padded - length)) for t in (query, key, value))
    dtype, device = query.dtype, query.device
    after = 0 if causal else stride - 1
    pieces = flash.sliding_pieces(padded // rows, rows, length, *flash.aligned(-(stride - 1), stride - 1 + rows + after),
                                  lambda qpos, kpos: (kpos > qpos - stride) & (kpos < qpos + stride) & ((kpos <= qpos) | (not causal)),
                                  dtype, device)
    n = padded // stride
    a = torch.arange(n, device=device)
    pos = a[None, :] * stride + torch.arange(stride, device=device)[:, None]  # (stride, n): residue r, index a
    qpos, kpos = pos[:, :, None], pos[:, None, :]
    other = (a[None, :] < a[:, None]) if causal else (a[None, :] != a[:, None])
    keep = other[None] & (kpos < length) & (qpos < length) | (qpos >= length) & (kpos < qpos)
    pieces.append(flash.Piece(0, stride, 0, 1, n, flash.additive(keep, dtype), empty=~keep.any(-1)[:, None], spread=stride))
    if sinks:  # the first keys that neither the band nor the residue reaches
        nb = padded // rows
        qpos = torch.arange(nb, device=device)[:, None, None] * rows + torch.arange(rows, device=device)[:, None]
        kpos = torch.arange(min(sinks, length), device=device)[None, None, :]
        far = ((qpos - kpos).abs() >= stride) & (torch.remainder(qpos - kpos, stride) != 0) & (qpos < length)
        far = far & (kpos <= qpos) if causal else far
        pieces.append(flash.Piece(0, nb, 0, 0, kpos.shape[-1], flash.additive(far, dtype), empty=~far.any(-1)[:, None]))
    out = flash.PieceAttention.apply(query, key, value, tuple(pieces), rows, scale, logit)
    return out[:, :, :length]
