"""Block-sparse attention: per block of queries, only the key blocks a pattern keeps, with the
exact token-level mask inside them (compute and memory follow the kept blocks).

A pattern is any object with the sparse contract of `hf_relattn.variants.sparse_base`:
`choice` ("rule", "block", "token"), `key_block(module)`, `token_blocks(...)` and
`allowed(...)`; this module knows no particular pattern."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..call import AttnCall
from .masks import float_mask
from .pieces import inference_flash, with_sinks

# Scores (and gathered K/V) per chunk of query blocks in the block-sparse path.
SPARSE_CHUNK_ELEMENTS = 1 << 22
# Query tokens from which inference reads the sinks outside a query block's gathered keys as a
# piece merged by log-sum-exp (below, e.g. decoding steps, their blocks are gathered).
SINK_MERGE_MIN_TOKENS = 128
# Query rows per block of the block-sparse path (a multiple of the key block): each query block
# copies its key blocks once, so taller query blocks copy less per FLOP.
SPARSE_QUERY_TOKENS = 128


def chosen_blocks(
    variant: Any, module: nn.Module, q_pos: torch.Tensor, num_blocks: int, query: torch.Tensor, key: torch.Tensor,
    key_valid: torch.Tensor | None, causal: bool,
) -> torch.Tensor | None:
    """The variant's key-block choice per token (1|B, 1|H, Q, N), without blocks after the
    token's own when causal; None for a dense layer."""
    chosen = variant.token_blocks(module, q_pos, num_blocks, query, key, key_valid, causal=causal)
    if chosen is None or not causal:
        return chosen
    block = variant.key_block(module)
    return chosen & (torch.arange(num_blocks, device=q_pos.device)[None, :] <= (q_pos // block)[:, None])


def query_rows(variant: Any, block: int, q_len: int) -> int:
    """Query rows per block of the block-sparse path: taller blocks copy K/V less per FLOP, but
    when the choice of key blocks varies by query block ("block", "token") a taller block reads the
    union of more choices; decoding takes a block of the new tokens only."""
    rows = block * max(1, SPARSE_QUERY_TOKENS // block) if variant.choice == "rule" else block
    return min(rows, q_len)


def key_blocks(t: torch.Tensor, num_blocks: int, block: int) -> torch.Tensor:
    """(B, H, K, D) -> (B, H, num_blocks, block, D), zero-padding the last block (a view when
    K fills the blocks exactly: a KV cache is not copied)."""
    pad = num_blocks * block - t.shape[2]
    return (F.pad(t, (0, 0, 0, pad)) if pad else t).reshape(*t.shape[:2], num_blocks, block, t.shape[-1])


def rows_at(t: torch.Tensor, b_idx: torch.Tensor, h_idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """t[b_idx, h_idx, pos] for t (B, H, K, D) (indices broadcast): whole rows copied by one
    index_select when t is contiguous (a KV cache), advanced indexing otherwise."""
    if not t.is_contiguous():
        return t[b_idx, h_idx, pos]
    flat = ((b_idx * t.shape[1] + h_idx) * t.shape[2] + pos)
    return t.view(-1, t.shape[-1]).index_select(0, flat.flatten()).view(*flat.shape, t.shape[-1])


def pattern_keep(
    base: torch.Tensor | None, choice: torch.Tensor | None, variant: Any, module: nn.Module, rows: torch.Tensor,
    kpos: torch.Tensor, k_len: int, causal: bool, sinks: int = 0, mask_future: bool | None = None,
) -> torch.Tensor | None:
    """Which gathered keys each query attends (None = all): among real key slots (`base`), the
    pattern's (the token's own block `choice` and the variant's token rule for a `causal` call)
    and the first `sinks` positions, without later keys when `mask_future` (default: `causal`;
    False where none can be later); query positions `rows` (..., 1), key positions `kpos` (..., 1, K')."""
    keep = choice
    rule = variant.allowed(module, rows, kpos, k_len, causal=causal)
    if rule is not None:
        keep = rule if keep is None else keep & rule
    if sinks and keep is not None:
        keep = keep | (kpos < sinks)
    for extra in (base, (kpos <= rows) if (causal if mask_future is None else mask_future) else None):
        if extra is not None:
            keep = extra if keep is None else keep & extra
    return keep


def sink_column(bias: torch.Tensor, sink: torch.Tensor, hx: int, gx: int, rows: int) -> torch.Tensor:
    """`bias` (P, 1|hx, ..., gx * rows, C) with one more column holding each query head's sink
    logit (head = K/V-index * gx + g): the score of a zero key whose value is zero, which is the
    logit's place in the softmax denominator. -> (P, hx, ..., gx * rows, C + 1)."""
    column = sink.to(bias.dtype).view(hx, gx, 1).expand(hx, gx, rows).reshape(hx, gx * rows, 1)
    column = column.view(1, hx, *([1] * (bias.dim() - 4)), gx * rows, 1)
    shape = (bias.shape[0], hx, *bias.shape[2:-1], 1)
    return torch.cat([bias.expand(*shape[:-1], bias.shape[-1]), column.expand(shape)], dim=-1)


def zero_key(t: torch.Tensor) -> torch.Tensor:
    """K or V (..., C, D) with one more key of zeros (see `sink_column`)."""
    return F.pad(t, (0, 0, 0, 1))


def selected_blocks(token_blocks: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of queries, the union of its tokens' key blocks as index lists.

    token_blocks (Bs, Hs, Q, N) bool -> (indices (Bs, Hs, nq, S) ascending, valid (Bs, Hs, nq, S)),
    S = the largest union; shorter lists are padded with block 0, marked invalid."""
    bs, hs, q_len, num = token_blocks.shape
    nq = -(-q_len // block)
    padded = F.pad(token_blocks, (0, 0, 0, nq * block - q_len))
    union = padded.view(bs, hs, nq, block, num).any(3)
    counts = union.sum(-1)
    width = max(1, int(counts.max()))
    order = torch.argsort((~union).to(torch.uint8), dim=-1, stable=True)[..., :width]
    valid = torch.arange(width, device=union.device) < counts[..., None]
    return torch.where(valid, order, 0), valid


def block_chunks(count: int, step: int, flags: list[bool] | None) -> Iterator[tuple[slice, bool]]:
    """Slices of at most `step` query blocks, each split where `flags` (per block) changes."""
    for a in range(0, count, step):
        end = min(count, a + step)
        while a < end:
            b = a + 1
            while flags is not None and b < end and flags[b] == flags[a]:
                b += 1
            b = end if flags is None else b
            yield slice(a, b), bool(flags is not None and flags[a])
            a = b


def block_sparse_attention(
    call: AttnCall, variant: Any, chosen: torch.Tensor, sinks: int = 0, sink: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention computed only on the key blocks a sparse pattern keeps (`chosen`, per token, from
    `chosen_blocks`); (B, Hq, Q, D).

    Queries go in blocks of the variant's key-block size. For each query block, the key blocks
    any of its tokens may read are gathered (K/V heads shared by a group of query heads are
    gathered once, unless the choice differs per head), and SDPA runs on them with
    the exact token-level mask: the pattern's rule, the token's own block choice, causality,
    padding. Compute and memory are proportional to the gathered blocks; autograd flows
    through the gathers. Chunks of query blocks keep the gathered K/V under
    SPARSE_CHUNK_ELEMENTS floats.

    Sinks (the first `sinks` positions, for every query) inside the gathered blocks are kept by
    the mask. At inference the sinks outside them are a small piece of their own merged by
    log-sum-exp (the CPU flash kernel returns the main path's), so a sink costs no extra block;
    with autograd their blocks join every union instead. `sink` (heads,): a logit per head in
    every softmax denominator (a piece of zero output, or a zero key with that score)."""
    query, key, value, mask, module = call.query, call.key, call.value, call.mask, call.module
    q_pos, k_pos = call.slots
    causal, scale, dropout = call.causal, call.scale, call.dropout
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    block = variant.key_block(module)
    num_blocks = chosen.shape[-1]
    # long inference calls read the sinks outside the gathered blocks as a merged piece; short
    # ones (decoding) copy them in: fewer, cheaper operations per step
    merge_sinks = (sinks or sink is not None) and q_len >= SINK_MERGE_MIN_TOKENS
    flash = inference_flash(query, key, value, dropout) if merge_sinks else None
    union_sinks = sinks if flash is None else 0  # sinks added to the gathered blocks (autograd)
    per_head = chosen.shape[1] > 1
    qb = query_rows(variant, block, q_len)
    sel, sel_valid = selected_blocks(chosen, qb)
    nq, width = sel.shape[2], sel.shape[3]
    # each query head choosing its own blocks (per_head) indexes K/V through its K/V head
    hx, gx = (heads, 1) if per_head else (kv_heads, groups)
    q = F.pad(query, (0, 0, 0, nq * qb - q_len)).view(batch, hx, gx, nq, qb, dim)
    qp = F.pad(q_pos, (0, nq * qb - q_len), value=int(q_pos[-1])).view(nq, qb)
    full_mask = mask
    if mask is not None:  # rows padded to whole query blocks, once
        mask = F.pad(mask, (0, 0, 0, nq * qb - q_len)) if mask.shape[-2] > 1 else mask.expand(-1, -1, nq * qb, -1)
    lowest = torch.finfo(query.dtype).min
    s_cols = torch.arange(min(sinks, k_len), device=query.device)

    def finish(outs: list[torch.Tensor], lses: list[torch.Tensor], uncovered: torch.Tensor | None) -> torch.Tensor:
        # query blocks back in order; at inference the sinks outside them and the sink logit merged in
        out = torch.cat(outs, dim=3) if len(outs) > 1 else outs[0]
        out = out.reshape(batch, heads, nq * qb, -1)[:, :, :q_len]
        if flash is None:
            return out
        lse = (torch.cat(lses, dim=3) if len(lses) > 1 else lses[0]).reshape(batch, heads, nq * qb)[:, :, :q_len]
        return with_sinks(out, lse, query, key, value, sinks, uncovered, q_pos, causal, full_mask, scale, sink)

    def attend(qc: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if flash is not None:
            return flash(qc, k, v, 0.0, False, attn_mask=bias, scale=scale)
        if sink is not None:  # a zero key scoring each head's sink logit
            bias, k, v = sink_column(bias, sink, hx, gx, qb), zero_key(k), zero_key(v)
        return F.scaled_dot_product_attention(qc, k, v, attn_mask=bias, dropout_p=dropout, scale=scale), None

    # the union of a query block's choices may hold blocks some of its tokens did not choose
    aligned = (k_len - q_len) % block == 0
    own_needed = variant.choice == "token" or (variant.choice == "block" and not (qb == 1 or aligned and qb == block))
    # sink blocks joining the union are whole for nobody: each token keeps to its own choice there
    own_needed = own_needed or bool(union_sinks and variant.choice != "rule")
    if not own_needed and sel.shape[:2] == (1, 1) and bool(((sel[..., 1:] - sel[..., :-1] == 1) | ~sel_valid[..., 1:]).all()):
        # every query block reads one run of consecutive key blocks (e.g. a sliding window):
        # attend on slices of K/V, no copies (with autograd, the sinks before the run: a copy)
        outs, lses, leads = [], [], []
        for i in range(nq):
            first, count = int(sel[0, 0, i, 0]), int(sel_valid[0, 0, i].sum())
            k0, k1 = first * block, min(k_len, (first + count) * block)
            lead = min(union_sinks, k0)  # sink keys put before the run
            leads.append(min(sinks, k0))
            kpos, rows = torch.cat([k_pos[:lead], k_pos[k0:k1]])[None, :], qp[i][:, None]
            keep = pattern_keep(None, None, variant, module, rows, kpos, k_len, causal, sinks)
            keep = torch.ones(1, 1, qb, kpos.shape[-1], dtype=torch.bool, device=query.device) if keep is None else keep[None, None]
            if mask is not None:
                m = mask[:, :, i * qb : (i + 1) * qb, kpos[0]] if lead else mask[:, :, i * qb : (i + 1) * qb, k0:k1]
                keep = keep & (m if m.dtype == torch.bool else m == 0)
            if gx > 1:
                keep = keep[:, :, None].expand(-1, -1, gx, -1, -1).reshape(keep.shape[0], 1, gx * qb, -1)
            bias = torch.zeros(keep.shape, dtype=query.dtype, device=query.device).masked_fill_(~keep, lowest)
            k_run, v_run = key[:, :, k0:k1], value[:, :, k0:k1]
            if lead:
                k_run, v_run = torch.cat([key[:, :, :lead], k_run], dim=2), torch.cat([value[:, :, :lead], v_run], dim=2)
            out, lse = attend(q[:, :, :, i].reshape(batch, hx, gx * qb, dim), k_run, v_run, bias)
            outs.append(out.view(batch, hx, gx, 1, qb, -1))
            if lse is not None:
                lses.append(lse.view(batch, hx, gx, 1, qb))
        # sinks left of a query block's run are not read by it
        lead_of = torch.tensor(leads, device=query.device).repeat_interleave(qb)[:q_len]
        return finish(outs, lses, (s_cols[None, :] < lead_of[:, None])[None, None])
    chosen_rows = F.pad(chosen, (0, 0, 0, nq * qb - q_len)).view(*chosen.shape[:2], nq, qb, num_blocks)
    union = None
    if flash is not None and sinks:  # the sinks whose blocks a query block does not gather
        union = torch.zeros(*sel.shape[:3], num_blocks + 1, dtype=torch.bool, device=query.device)
        union = union.scatter_(-1, torch.where(sel_valid, sel, num_blocks), True)[..., :num_blocks]  # (Bs, Hs, nq, N)
    if union_sinks:  # the sink blocks join every query block's union (the mask keeps their sink keys)
        sink_blocks = torch.arange(num_blocks, device=query.device) < -(-union_sinks // block)
        sel, sel_valid = selected_blocks(chosen | sink_blocks, qb)
        width = sel.shape[3]
    offsets = torch.arange(block, device=query.device)
    b_idx = torch.arange(batch, device=query.device)[:, None, None, None]
    h_idx = (torch.arange(hx, device=query.device) // (groups if per_head else 1))[None, :, None, None]
    step = max(1, SPARSE_CHUNK_ELEMENTS // max(1, batch * hx * width * block * max(qb * gx, dim)))
    outs, lses = [], []
    # query blocks gated whole (aligned, no rule, no padding) that read `width` blocks, their own
    # last, share one mask: earlier blocks whole, the own block causal
    tail_causal = None
    if (variant.choice == "block" and not own_needed and mask is None and causal and qb == block and k_len % block == 0
            and not union_sinks and (sink is None or flash is not None)
            and variant.allowed(module, qp[:1, :, None], k_pos[None, None, :1], k_len, causal=causal) is None):
        tail_causal = torch.ones(qb, width * block, dtype=torch.bool, device=query.device)
        tail_causal[:, -block:] = torch.ones(qb, block, dtype=torch.bool, device=query.device).tril()
        tail_causal = float_mask(tail_causal, query.dtype)[None, None].expand(gx, 1, -1, -1).reshape(1, 1, gx * qb, -1)
    whole = sel_valid.flatten(0, 1).all(0).all(-1).tolist() if tail_causal is not None else None
    for c, shared_mask in block_chunks(nq, step, whole):
        sidx = sel[..., c, :]  # (Bs, Hs, n, S): Bs, Hs are 1 unless the choice depends on them
        n = sidx.shape[2]
        idx = sidx.expand(batch, hx, -1, -1)
        # the blocks' keys gathered by position (no padded copy of a KV cache): past the last key,
        # the last key stands in, masked out below (kpos < k_len)
        pos = (idx[..., None] * block + offsets).clamp(max=k_len - 1).flatten(-2)  # (B, hx, n, S * bs)
        k_sel, v_sel = (rows_at(t, b_idx, h_idx, pos).reshape(batch * hx, n, width * block, -1) for t in (key, value))
        qc = q[:, :, :, c].permute(0, 1, 3, 2, 4, 5).reshape(batch * hx, n, gx * qb, dim)
        if shared_mask:
            bias = tail_causal
        else:
            # the token-level mask, as small as its dependencies allow: (1|B, 1|hx, n, bq, S * bs)
            kpos = (sidx[..., None] * block + offsets).reshape(*sidx.shape[:2], n, 1, width * block)
            rows = qp[c][None, None, :, :, None]  # (1, 1, n, bq, 1)
            base = sel_valid[..., c, :].repeat_interleave(block, dim=-1)[..., None, :] & (kpos < k_len)
            own = None
            if own_needed:
                own = chosen_rows[..., c, :, :].gather(-1, sidx[..., None, :].expand(-1, -1, -1, qb, -1)).repeat_interleave(block, dim=-1)
            keep = pattern_keep(base, own, variant, module, rows, kpos, k_len, causal, sinks)
            if mask is not None:
                m = mask.view(mask.shape[0], 1, nq, qb, k_len)[:, :, c]
                if m.dtype != torch.bool:
                    m = m == 0
                cols = kpos.clamp(max=k_len - 1).expand(m.shape[0], -1, -1, qb, -1)
                keep = keep & m.expand(-1, cols.shape[1], -1, -1, -1).gather(-1, cols)
            if gx > 1:  # grouped query heads share the gathered K/V: (G * bq) rows per query block
                keep = keep[:, :, :, None].expand(-1, -1, -1, gx, -1, -1).reshape(*keep.shape[:3], gx * qb, width * block)
            bias = torch.zeros(keep.shape, dtype=query.dtype, device=query.device).masked_fill_(~keep, lowest)
            if sink is not None and flash is None:  # a zero key scoring each head's sink logit
                bias, k_sel, v_sel = sink_column(bias, sink, hx, gx, qb), zero_key(k_sel), zero_key(v_sel)
            if bias.shape[:2] == (1, 1):
                bias = bias[0]  # (1, n, rows, S * bs): broadcast over batch and heads
            else:
                bias = bias.expand(batch, hx, -1, -1, -1).reshape(batch * hx, n, gx * qb, -1)
        if flash is not None:
            out, lse = flash(qc, k_sel, v_sel, 0.0, False, attn_mask=bias, scale=scale)
            lses.append(lse.view(batch, hx, n, gx, qb).permute(0, 1, 3, 2, 4))
        else:
            out = F.scaled_dot_product_attention(qc, k_sel, v_sel, attn_mask=bias, dropout_p=dropout, scale=scale)
        outs.append(out.view(batch, hx, n, gx, qb, -1).permute(0, 1, 3, 2, 4, 5))
    uncovered = None
    if union is not None:  # (Bs, Hs, Q, S): the sink key's block is not among its query block's
        per_query = union.repeat_interleave(qb, dim=2)[:, :, :q_len]
        uncovered = ~per_query[..., s_cols // block]
        uncovered = uncovered if per_head else uncovered.expand(-1, groups, -1, -1) if uncovered.shape[1] > 1 else uncovered
    return finish(outs, lses, uncovered)
