"""Attention as dense pieces over disjoint key sets merged by their log-sum-exps (as
FlashAttention's online softmax merges blocks), the CPU flash kernel that returns the
log-sum-exp, and attention sinks as pieces of their own (Xiao et al. 2024)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .masks import float_mask

# The CPU flash kernel: like SDPA, and it returns each row's log-sum-exp (no gradient through it).
CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def inference_flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float) -> Any:
    """The CPU flash kernel when nothing needs a gradient (its log-sum-exp has none), else None."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    usable = CPU_FLASH is not None and not needs_grad and dropout == 0 and query.device.type == "cpu"
    return CPU_FLASH if usable else None


def layout_setup(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_valid: torch.Tensor | None, size: int, dropout: float
) -> tuple[Any, ...]:
    """Shared start of the pattern layouts: queries as (B, G, g, n, size, D) blocks, K/V and key
    validity padded to n * size, and the CPU flash kernel when no gradient is needed."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    n = -(-length // size)
    pad = n * size - length
    valid = key_valid if key_valid is not None else torch.ones(batch, length, dtype=torch.bool, device=query.device)
    valid = F.pad(valid, (0, pad), value=False)
    q = F.pad(query, (0, 0, 0, pad)).view(batch, kv_heads, heads // kv_heads, n, size, dim)
    k, v = (F.pad(t, (0, 0, 0, pad)) for t in (key, value))
    return q, k, v, valid, n, inference_flash(query, key, value, dropout)


def piece(
    flash: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, static: bool, scale: float,
    dropout: float, causal_block: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of q (B, G, g, X, R, D) over k, v (B, G, 1, X, W, D) under keep (broadcast
    to (B, G, g, X, R, W)) -> output (B, G, g, X, R, D) and log-sum-exp (B, G, g, X, R). Through
    the CPU flash kernel when given (inference; `causal_block`: keep is exactly causal within
    square blocks, so the kernel's own causal mode skips the upper half), else plain matmuls
    with autograd (attention dropout drops this piece's probabilities, which is dropping them
    from the merged softmax)."""
    if flash is not None:
        return fused_piece(flash, q, k, v, keep, static, scale, causal_block and static)
    scores = (torch.matmul(q, k.transpose(-1, -2)) * scale).masked_fill(~keep, torch.finfo(q.dtype).min)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    if dropout > 0:
        probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs, v), lse


def fused_piece(
    flash: Callable[..., tuple[torch.Tensor, torch.Tensor]], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    keep: torch.Tensor, static: bool, scale: float, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`piece` through the CPU flash kernel. The g query heads of a K/V head are stacked as rows
    of one call (no K/V copies per query head) and the X blocks are the kernel's heads, so with
    `static` keep (no padding: the same for every batch entry) one mask serves all calls;
    `causal`: keep is causal within square blocks (one query head per K/V head), the kernel's mode."""
    batch, kv_heads, groups, x, rows, dim = q.shape
    width = k.shape[-2]
    q4 = q.permute(0, 1, 3, 2, 4, 5).reshape(batch * kv_heads, x, groups * rows, dim)
    k4, v4 = (t[:, :, 0].reshape(batch * kv_heads, x, width, t.shape[-1]) for t in (k, v))
    if causal and groups == 1:
        out, lse = flash(q4, k4, v4, 0.0, True, scale=scale)
    else:
        mask = keep[:1].expand(1, 1, groups, x, rows, width) if static else keep.expand(batch, kv_heads, groups, x, rows, width)
        mask = mask.permute(0, 1, 3, 2, 4, 5).reshape(-1, x, groups * rows, width)  # (1 or B*G, X, g*R, W)
        out, lse = flash(q4, k4, v4, 0.0, False, attn_mask=float_mask(mask, q.dtype), scale=scale)
    out = out.view(batch, kv_heads, x, groups, rows, -1).permute(0, 1, 3, 2, 4, 5)
    return out, lse.view(batch, kv_heads, x, groups, rows).permute(0, 1, 3, 2, 4)


@dataclass
class LayoutSinks:
    """What a pattern layout adds to its pieces: the first `tokens` keys for every query (those
    its own pieces do not already cover, by `covered(i, j)`), and a per-head `logit` in the
    softmax denominator."""

    tokens: int
    covered: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    logit: torch.Tensor | None



def sink_pieces(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, extra: LayoutSinks | None, causal: bool,
    scale: float,
) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """A layout's pieces for its sinks: q (B, G, g, n, size, D) as all n * size rows against the
    first `tokens` keys its own pieces do not reach (`sink_piece`), and the sink logit as a
    piece without output whose log-sum-exp is the logit. Shaped as the layout's pieces."""
    if extra is None:
        return []
    batch, kv_heads, groups, n, size, dim = q.shape
    pieces: list[tuple[torch.Tensor | None, torch.Tensor]] = []
    if extra.tokens:
        count = min(extra.tokens, k.shape[2])
        rows = torch.arange(n * size, device=q.device)
        uncovered = ~extra.covered(rows[:, None], rows[None, :count])
        keys = valid[:, None, None, :count]  # (B, 1, 1, count): padding keys stay out
        out, lse = sink_piece(q.reshape(batch, kv_heads * groups, n * size, dim), k, v, count, uncovered, rows, causal, keys, scale)
        pieces.append((out.view(q.shape[:-1] + (-1,)), lse.view(q.shape[:-1])))
    if extra.logit is not None:
        pieces.append((None, extra.logit.float().view(1, kv_heads, groups, 1, 1).expand(batch, -1, -1, n, size)))
    return pieces


def merge(pieces: Sequence[tuple[torch.Tensor | None, torch.Tensor]]) -> torch.Tensor:
    """Outputs of attention over disjoint key sets, merged by their log-sum-exps; a piece with no
    output (None: a sink logit) only adds to the denominator. The weights are computed on the
    (..., rows) log-sum-exps; without autograd the outputs accumulate in place."""
    total = torch.logsumexp(torch.stack([lse.float() for _, lse in pieces]), dim=0)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for piece in pieces for t in piece)
    dtype = next(out.dtype for out, _ in pieces if out is not None)
    merged = None
    for out, lse in pieces:
        if out is None:
            continue
        weight = torch.exp(lse.float() - total)[..., None]
        if merged is None:  # the first piece's tensor is the callers' own: rescaled in place
            merged = out.float() * weight if grad or out.dtype != torch.float32 else out.mul_(weight)
        elif grad:
            merged = merged + out.float() * weight
        else:
            merged.addcmul_(out.float(), weight)
    return merged.to(dtype)  # the kernels' log-sum-exps are float32 whatever the inputs


def sink_scores(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sinks: int, uncovered: torch.Tensor, q_pos: torch.Tensor,
    causal: bool, mask: torch.Tensor | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of every query (B, H, Q, D) against the first `sinks` keys where `uncovered`
    (1|B, 1|H, Q, S) says the main path did not read them, causally and as the mask allows
    (float32, masked ones at the minimum): ((B, H, Q, S), their values (B, H, S, D) float32)."""
    count = min(sinks, key.shape[2])
    groups = query.shape[1] // key.shape[1]
    k, v = (t[:, :, :count].float().repeat_interleave(groups, dim=1) for t in (key, value))
    scores = torch.matmul(query.float(), k.transpose(-1, -2)) * scale
    keep = uncovered[..., :count]
    if causal:
        keep = keep & (torch.arange(count, device=query.device)[None, :] <= q_pos[:, None])
    if mask is not None:
        m = mask[..., :count]
        keep = keep & (m if m.dtype == torch.bool else m == 0)
    return scores.masked_fill(~keep, torch.finfo(torch.float32).min), v


def sink_piece(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sinks: int, uncovered: torch.Tensor, q_pos: torch.Tensor,
    causal: bool, mask: torch.Tensor | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sink_scores` as a piece to merge by log-sum-exp: (out (B, H, Q, D) float32, lse (B, H, Q)),
    by plain matmuls (autograd flows)."""
    scores, v = sink_scores(query, key, value, sinks, uncovered, q_pos, causal, mask, scale)
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]), v), lse


def with_sinks(
    out: torch.Tensor, lse: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sinks: int,
    uncovered: torch.Tensor | None, q_pos: torch.Tensor, causal: bool, mask: torch.Tensor | None, scale: float,
    sink: torch.Tensor | None,
) -> torch.Tensor:
    """The main path's (out, lse) (B, H, Q, ...) with the sinks it did not read and the sink
    logit joined to every softmax: weights from the (B, H, Q) log-sum-exps, the main output
    rescaled and the sinks' probabilities @ values added, in place (inference only: the main
    path's log-sum-exp comes from the flash kernel, which has no gradient for it)."""
    total = lse.float()
    if sinks:
        scores, v = sink_scores(query, key, value, sinks, uncovered, q_pos, causal, mask, scale)
        total = torch.logaddexp(total, torch.logsumexp(scores, dim=-1))
    if sink is not None:
        total = torch.logaddexp(total, sink.float()[None, :, None])
    merged = out.float() if out.dtype != torch.float32 else out.contiguous()
    merged.mul_(torch.exp(lse.float() - total)[..., None])
    if sinks:
        batch, heads, q_len, dim = merged.shape
        probs = torch.exp(scores - total[..., None])
        merged.view(batch * heads, q_len, dim).baddbmm_(probs.reshape(batch * heads, q_len, -1), v.reshape(batch * heads, -1, dim))
    return merged.to(out.dtype)
