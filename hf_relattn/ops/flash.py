"""FlashAttention on the CPU for patterns made of key windows, forward and backward (Dao et al.
2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness": online
softmax, the log-sum-exp kept, probabilities recomputed in the backward).

Queries go in blocks of R rows, (BH, nb, R, D). A `Piece` pairs a run of query blocks with one
window of keys per block: block i reads the keys [start + i * step, start + i * step + length)
of the (padded) key sequence, an `as_strided` view of K/V, no copy (step R slides a band along
the diagonal, step 0 gives every block the same keys: attention sinks). torch's CPU flash kernel
computes a piece, its mask shared by the blocks or one per block; pieces over the same queries
are merged by their log-sum-exps. The backward calls the kernel's backward per piece with the
merged output and log-sum-exp, which are what each piece's probabilities are under the whole
softmax (FlashAttention's backward over split keys), and adds the key gradients back through
the same windows. Memory: the blocked queries, padded K/V, the output and log-sum-exp (O(T)),
and per kernel call what the kernel itself holds; the backward runs in chunks of blocks so the
windows' key gradients stay under FLASH_CHUNK_ELEMENTS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..call import AttnCall

FORWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
# Floats of windowed key gradients one backward kernel call may return (then they are added back).
FLASH_CHUNK_ELEMENTS = 1 << 22
# Tokens from which a band pattern runs on these kernels (shorter calls: the block-sparse path).
FLASH_MIN_TOKENS = 512
# Query rows per block (per query head): the window is before + rows + after keys wide.
FLASH_ROWS = 64


@dataclass(frozen=True)
class Piece:
    """Query blocks [first, first + count), block i reading keys [start + i * step, + length) of
    the padded keys, under `mask` (additive float, (1, 1 | count, R, length), or None) and the
    kernel's own causal mask (`causal`: row r sees window keys up to r). `empty` (1, 1 | count, R)
    marks rows that see no key of this piece (the kernel then reports a log-sum-exp of 0)."""

    first: int
    count: int
    start: int
    step: int
    length: int
    mask: torch.Tensor | None = None
    causal: bool = False
    empty: torch.Tensor | None = None

    def part(self, a: int, b: int) -> Piece:
        """Blocks [first + a, first + b) of this piece."""
        per_block = self.mask is not None and self.mask.shape[1] > 1
        return Piece(self.first + a, b - a, self.start, self.step, self.length,
                     self.mask[:, a:b] if per_block else self.mask, self.causal,
                     self.empty[:, a:b] if self.empty is not None and self.empty.shape[1] > 1 else self.empty)


def windows(t: torch.Tensor, piece: Piece) -> torch.Tensor:
    """(BH, count, length, D) view of the piece's key windows in t (BH, Tk, D), contiguous."""
    bh, _, dim = t.shape
    offset = t.storage_offset() + (piece.start + piece.first * piece.step) * dim
    return t.as_strided((bh, piece.count, piece.length, dim), (t.stride(0), piece.step * dim, dim, 1), offset)


def add_windows(target: torch.Tensor, grads: torch.Tensor, piece: Piece) -> None:
    """Add gradients of the piece's windows (BH, count, length, D) back to target (BH, Tk, D)."""
    if piece.step == 0:  # every block read the same keys
        target[:, piece.start : piece.start + piece.length] += grads.sum(1)
        return
    bh, _, dim = target.shape
    base = target.storage_offset() + (piece.start + piece.first * piece.step) * dim
    for s in range(0, piece.length, piece.step):  # within one sub-block the windows do not overlap
        width = min(piece.step, piece.length - s)
        view = target.as_strided((bh, piece.count, width, dim), (target.stride(0), piece.step * dim, dim, 1), base + s * dim)
        view += grads[:, :, s : s + width]


def _merge(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor) -> None:
    """Merge a piece (out, lse) into the running ones over the same rows, in place."""
    total = torch.logaddexp(lse, part_lse)
    seen = ~torch.isneginf(total)
    old = torch.where(seen, torch.exp(lse - total), 0.0)
    new = torch.where(seen, torch.exp(part_lse - total), 0.0)
    out.mul_(old[..., None]).add_(part_out.float() * new[..., None])
    lse.copy_(total)


class PieceAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v over the union of the pieces' keys (see the module doc), with an
    optional sink logit per row in every denominator; q (BH, nb, R, D), k/v (BH, Tk, D), all
    contiguous; returns (BH, nb, R, D)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pieces: Sequence[Piece], scale: float,
                logit: torch.Tensor | None) -> torch.Tensor:
        # merged in float32 (returned in q's dtype); a block's first piece is copied in, not merged
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        seen = [False] * q.shape[1]
        for piece in pieces:
            rows = slice(piece.first, piece.first + piece.count)
            part, part_lse = FORWARD(q[:, rows], windows(k, piece), windows(v, piece), 0.0, piece.causal,
                                     attn_mask=piece.mask, scale=scale)
            if piece.empty is not None:
                part_lse = part_lse.masked_fill(piece.empty, float("-inf"))
            if not any(seen[rows]):
                out[:, rows], lse[:, rows] = part, part_lse
            elif all(seen[rows]):
                _merge(out[:, rows], lse[:, rows], part, part_lse)
            else:
                raise AssertionError("pieces must cover whole runs of blocks in order")  # band_attention's are
            seen[rows] = [True] * piece.count
        if not all(seen):
            raise AssertionError("every query block needs a piece")
        if logit is not None:  # a logit with a zero value: only the denominator grows
            total = torch.logaddexp(lse, logit.float().expand_as(lse))
            out.mul_(torch.exp(lse - total)[..., None])
            lse = total
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, logit)
        ctx.pieces, ctx.scale = pieces, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse, logit = ctx.saved_tensors
        grad = grad.contiguous()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for piece in ctx.pieces:
            per_block = q.shape[0] * piece.length * q.shape[-1]
            step = max(1, FLASH_CHUNK_ELEMENTS // max(1, per_block))
            for a in range(0, piece.count, step):
                part = piece.part(a, min(piece.count, a + step))
                rows = slice(part.first, part.first + part.count)
                gq, gk, gv = BACKWARD(grad[:, rows], q[:, rows], windows(k, part), windows(v, part), out[:, rows],
                                      lse[:, rows], 0.0, part.causal, attn_mask=part.mask, scale=ctx.scale)
                dq[:, rows] += gq
                add_windows(dk, gk, part)
                add_windows(dv, gv, part)
        dlogit = None
        if logit is not None and ctx.needs_input_grad[5]:
            # d lse / d logit = p_sink; d loss / d logit = -p_sink * rowsum(dO * O)
            p_sink = torch.exp(logit.float() - lse)
            dlogit = -(p_sink * (grad.float() * out.float()).sum(-1))
            dlogit = dlogit.sum_to_size(logit.shape).to(logit.dtype)
        return dq, dk, dv, None, None, dlogit


def piece_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pieces: Sequence[Piece], scale: float,
                    logit: torch.Tensor | None = None) -> torch.Tensor:
    """`PieceAttention` (the kernels need float32 log-sum-exps and contiguous inputs)."""
    return PieceAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), tuple(pieces), scale, logit)


def band_call(call: AttnCall, before: int, after: int, sinks: int, logit: torch.Tensor | None) -> torch.Tensor | None:
    """`band_attention` for a call it serves exactly: CPU, no attention dropout, no cached keys, no
    mask (transformers passes none without padding or a native window), at least
    FLASH_MIN_TOKENS tokens; (B, H, Q, D), else None (the caller's other paths)."""
    query, key = call.query, call.key
    if (FORWARD is None or BACKWARD is None or query.device.type != "cpu" or call.dropout or call.mask is not None
            or key.shape[2] != query.shape[2] or query.shape[2] < FLASH_MIN_TOKENS):
        return None
    return band_attention(query, key, call.value, before, after, sinks, logit, call.scale, FLASH_ROWS)


def band_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, before: int, after: int, sinks: int,
                   logit: torch.Tensor | None, scale: float, rows: int) -> torch.Tensor:
    """Attention of each query i over the keys i - before <= j <= i + after (a band: `after` 0
    is causal) and the first `sinks` keys, with `logit` (heads,) in every denominator; query
    (B, H, T, D), key/value (B, Hkv, T, D) of one sequence without padding; (B, H, T, D).

    Blocks of `rows` queries (the query heads of a K/V head stacked, so K/V are read once per
    group) each read one window of before + rows + after keys, under a mask that is the same for
    every block away from the ends; the sinks outside the band are a piece of their own."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    nb = -(-length // rows)
    padded = nb * rows
    dtype, device = query.dtype, query.device
    q = torch.nn.functional.pad(query, (0, 0, 0, padded - length)).view(batch, kv_heads, groups, nb, rows, dim)
    q = q.permute(0, 1, 3, 2, 4, 5).reshape(batch * kv_heads, nb, groups * rows, dim)
    # keys padded in front by `before` (block i's windows start at padded rows i * rows and
    # i * rows + before) and at the end
    k, v = (torch.nn.functional.pad(t, (0, 0, before, padded - length + after)).reshape(batch * kv_heads, -1, dim)
            for t in (key, value))
    blocks = torch.arange(nb, device=device)
    r = torch.arange(rows, device=device)[:, None]
    qpos = blocks[:, None, None] * rows + r  # (nb, rows, 1)

    def additive(keep: torch.Tensor) -> torch.Tensor:  # (n, rows, W) -> (1, n, groups * rows, W)
        zero = torch.zeros((), dtype=dtype, device=device)
        return torch.where(keep, zero, torch.finfo(dtype).min).repeat(1, groups, 1)[None]

    def window(start: int, width: int, keep: Any) -> list[Piece]:
        """Pieces of the window [block * rows + start - before, + width) (padded start: + before):
        `keep(qpos, kpos)` gives the band; a run of blocks whose keys and queries are all real
        shares one mask (the band is the same for each), the others get their own."""
        c = torch.arange(width, device=device)[None, None, :]
        first = (before - start + rows - 1) // rows  # blocks whose windows start before key 0
        clean = [i >= first and i * rows + start - before + width <= length and (i + 1) * rows <= length for i in range(nb)]
        out, i = [], 0
        while i < nb:
            j = i
            while j < nb and clean[j] == clean[i]:
                j += 1
            kpos = blocks[i:j if not clean[i] else i + 1, None, None] * rows + start - before + c  # (n, 1, width)
            q_at = qpos[i:j if not clean[i] else i + 1]
            # padded query rows see any key that is not before key 0 (finite log-sum-exps, outputs dropped)
            mask = keep(q_at, kpos) & (kpos >= 0) & ((kpos < length) | (q_at >= length)) | (q_at >= length) & (kpos >= 0)
            empty = None if clean[i] else ~mask.any(-1)
            out.append(Piece(i, j - i, start, rows, width, additive(mask),
                             empty=empty.repeat(1, groups)[None] if empty is not None and bool(empty.any()) else None))
            i = j
        return out

    pieces = window(0, before + rows + after, lambda qp, kp: (kp >= qp - before) & (kp <= qp + after))
    if sinks:  # the first keys, for the queries whose band does not reach them
        kpos = torch.arange(min(sinks, length), device=device)[None, None, :]
        keep = ((kpos < qpos - before) | (kpos > qpos + after)) & (qpos < length)
        keep = keep & (kpos <= qpos) if after == 0 else keep
        empty = ~keep.any(-1).repeat(1, groups)  # (nb, groups * rows)
        pieces.append(Piece(0, nb, before, 0, kpos.shape[-1], additive(keep), empty=empty[None]))
    if logit is not None:  # row g * rows + r of K/V head h belongs to query head h * groups + g
        logit = logit.view(kv_heads, groups, 1).expand(kv_heads, groups, rows).reshape(kv_heads, 1, groups * rows)
        logit = logit.repeat(batch, 1, 1)
    out = piece_attention(q, k, v, pieces, scale, logit)
    out = out.view(batch, kv_heads, nb, groups, rows, dim).permute(0, 1, 3, 2, 4, 5).reshape(batch, heads, padded, dim)
    return out[:, :, :length]
