"""MoBA, Mixture of Block Attention: Lu et al. 2025, "MoBA: Mixture of Block Attention for
Long-Context LLMs".

Keys are split into blocks of `block_size`. Each query token reads its own block (causally)
and the `top_k - 1` earlier blocks whose mean key has the largest dot product with it (so
`top_k` counts the own block, as in the paper). The gate is computed per token and per head
from the current keys (padding keys excluded from the means), so a decoding step chooses its
blocks from the KV cache exactly as the full forward does for that token: decoding is sparse
too. `dense_layers=N` keeps the last N layers full (the paper's hybrid).

Where the work goes: long unpadded calls run on the FlashAttention kernels (`moba_attention`:
own blocks causal, the chosen blocks key block by key block over the rows that chose them, as
the paper's variable-length kernels); decoding steps without padding read K once (the scores,
whose block means are the gate) and V once (`decode_attention`); other calls (padding, short)
compute exactly the chosen (token, block) pairs key block by key block (`per_token_blocks`) or,
for one query, gather its own choice (the block-sparse path).

`gate="token"` (default) is the paper's per-token gate: exact, and decoding equals the full
forward; the engine computes exactly the chosen (token, block) pairs, key block by key block.
`gate="block"` gates a whole query block (aligned to the key blocks) by its mean query, so all
its tokens read the same top_k blocks and the block-sparse path runs fused SDPA on them; a
decoding step is then a query block of one token (its own gate), so decoding is not the same
computation as the full forward.
Parameter-free: the gate has no weights (flag or convert). Decoder-only (causal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..call import AttnCall
from ..ops import flash
from ..ops.blocks import key_blocks, pattern_keep
from ..ops.pieces import sink_piece
from .base import MAX_TABLE_ROWS, check_choice, check_int_options, register_variant
from .sparse_base import PatternVariant, refuse_bidirectional

GATES = ("token", "block")
# Queries per call (the last of the keys, no padding) that `decode_attention` takes: decoding
# steps and short drafts; its scores are (queries x keys) per head.
DECODE_MAX_QUERIES = 16


@register_variant
@dataclass
class MoBA(PatternVariant):
    block_size: int = 512
    top_k: int = 3
    dense_layers: int = 0
    gate: str = "token"

    name = "moba"
    flag = True

    @property
    def choice(self) -> str:  # type: ignore[override]
        return "token" if self.gate == "token" else "block"
    description = "Each token reads its own key block and the top_k-1 earlier blocks whose mean key matches its query best (MoBA)."
    paper = "Lu et al. 2025, MoBA: Mixture of Block Attention for Long-Context LLMs"
    limits = (
        "A dense-pretrained model loses quality under block gating until trained; a decoding step "
        "reads every key for its gate, so decoding is about as fast as dense (not faster)."
    )

    def check_options(self) -> None:
        super().check_options()
        check_int_options(self, "top_k", maximum=MAX_TABLE_ROWS)
        check_choice(self, "gate", GATES)
        check_int_options(self, "dense_layers", minimum=0, maximum=MAX_TABLE_ROWS)

    def check_model(self, model, adapter, layers) -> None:
        modules = adapter.attention_modules(model)
        refuse_bidirectional(modules, adapter, layers, "moba gates over earlier key blocks and needs")
        if self.dense_layers > len(modules):
            raise ValueError(f"moba: dense_layers ({self.dense_layers}) exceeds the model's {len(modules)} layers")
        if self.dense_layers and not all(hasattr(modules[idx], "layer_idx") for idx in layers):
            # which layers are last is read off each module's layer_idx at run time
            raise ValueError(f"moba: dense_layers needs attention modules that know their layer index, which "
                             f"{adapter.model_type}'s do not; leave the last layers out of `layers=` instead")
        super().check_model(model, adapter, layers)

    absolute_positions = True  # key blocks start at each sample's first token

    def _dense(self, module) -> bool:
        return bool(self.dense_layers) and module.layer_idx >= module.config.num_hidden_layers - self.dense_layers

    def picks(self, q_pos: torch.Tensor, k_pos: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
              key_valid: torch.Tensor | None, query_valid: torch.Tensor | None, num_blocks: int,
              contiguous: bool = False) -> torch.Tensor:
        """(B, H, Q, min(top_k - 1, num_blocks)) long: the earlier key blocks each query chose by
        q . mean(key block), best first, -1 where it has fewer earlier blocks with keys. Positions
        q_pos (1|B, Q), k_pos (1|B, K) in each sample's own sequence; padding keys (key_valid
        (1|B, K) False) are left out of the means and their blocks, padding queries (query_valid
        (1|B, Q) False) out of a block gate's mean query. `contiguous`: the keys are at positions
        0..K-1 and the queries consecutive (the eager paths), so blocks are reshapes rather than
        scatters, and a block gate chooses once per query block."""
        batch, heads, q_len, dim = query.shape
        kv_heads, k_len = key.shape[1], key.shape[2]
        bs = self.block_size
        width = max(0, min(self.top_k - 1, num_blocks))
        if not width:
            return torch.empty(batch, heads, q_len, 0, dtype=torch.long, device=query.device)
        valid = key_valid if key_valid is not None else torch.ones(1, k_len, dtype=torch.bool, device=key.device)
        last = num_blocks - 1
        weights = valid.float().expand(batch, k_len)
        weighted = key.float() if key_valid is None else key.float() * weights[:, None, :, None]
        if contiguous:  # whole blocks as a view (a decoding step's keys are rarely whole blocks: no padded copy)
            whole = min(k_len // bs, num_blocks)
            sums = weighted[:, :, : whole * bs].unflatten(2, (whole, bs)).sum(3)
            if whole < num_blocks:
                rest = weighted[:, :, whole * bs :].sum(2, keepdim=True)
                sums = torch.cat([sums, F.pad(rest, (0, 0, 0, num_blocks - whole - 1))], 2)
            counts = F.pad(weights, (0, num_blocks * bs - k_len)).view(batch, num_blocks, bs).sum(-1)
        else:
            k_block = torch.div(k_pos, bs, rounding_mode="floor").clamp(0, last).expand(batch, k_len)
            index = k_block[:, None, :, None].expand(-1, kv_heads, -1, dim)
            sums = key.new_zeros(batch, kv_heads, num_blocks, dim, dtype=torch.float32).scatter_add_(2, index, weighted)
            counts = weights.new_zeros(batch, num_blocks).scatter_add_(1, k_block, weights)
        means = (sums / counts.clamp(min=1)[:, None, :, None]).repeat_interleave(heads // kv_heads, dim=1)
        own = torch.div(q_pos, bs, rounding_mode="floor")  # (1|B, Q)
        query = query.float()
        front = 0
        if self.gate == "block":
            # one gate per query block: the mean of its real queries among this call's
            real = (query_valid if query_valid is not None else own >= 0).float().expand(batch, q_len)
            weighted_q = query if query_valid is None else query * real[:, None, :, None]
            if contiguous:  # gate (and choose) per query block, then repeat the choice per token
                front = int(q_pos[0, 0]) % bs
                count = -(-(front + q_len) // bs)
                back = count * bs - front - q_len
                whole = F.pad(weighted_q, (0, 0, front, back)) if front or back else weighted_q  # no copy when whole
                q_counts = F.pad(real, (front, back)).view(batch, count, bs).sum(-1)
                query = whole.unflatten(2, (count, bs)).sum(3) / q_counts.clamp(min=1)[:, None, :, None]
                own = int(q_pos[0, 0]) // bs + torch.arange(count, device=query.device)[None]
            else:
                q_block = own.clamp(0, last).expand(batch, q_len)
                index = q_block[:, None, :, None].expand(-1, heads, -1, dim)
                q_sums = query.new_zeros(batch, heads, num_blocks, dim).scatter_add_(2, index, weighted_q)
                q_counts = real.new_zeros(batch, num_blocks).scatter_add_(1, q_block, real)
                query = (q_sums / q_counts.clamp(min=1)[:, None, :, None]).gather(2, index)
        gate = torch.matmul(query, means.transpose(-1, -2))  # (B, H, Q or query blocks, N)
        earlier = (torch.arange(num_blocks, device=query.device) < own[:, None, :, None]) & (counts > 0)[:, None, None, :]
        picks = best_earlier(gate, earlier, width)
        if contiguous and self.gate == "block":  # per query block -> per token
            picks = picks.repeat_interleave(bs, dim=2)[:, :, front : front + q_len]
        return picks

    def choose(self, q_pos: torch.Tensor, k_pos: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
               key_valid: torch.Tensor | None, query_valid: torch.Tensor | None, num_blocks: int,
               contiguous: bool = False) -> torch.Tensor:
        """(B, H, Q, num_blocks) bool: each query's own block and the earlier blocks it picked
        (`picks`, same arguments)."""
        picks = self.picks(q_pos, k_pos, query, key, key_valid, query_valid, num_blocks, contiguous)
        own = torch.div(q_pos, self.block_size, rounding_mode="floor")[:, None, :]  # (1|B, 1, Q)
        return chosen_of(own, picks, num_blocks)

    def token_blocks(self, module, q_pos, num_blocks, query, key, key_valid, *, causal):
        if self._dense(module):
            return None
        k_pos = torch.arange(key.shape[2], device=q_pos.device)[None]
        q_valid = None if key_valid is None else key_valid[:, key.shape[2] - q_pos.shape[0] :]
        return self.choose(q_pos[None], k_pos, query, key, key_valid, q_valid, num_blocks, contiguous=True)

    def pair_mask(self, module, q_pos, k_pos, query, key, key_valid, query_valid=None, *, causal):
        if self._dense(module):
            return None
        num_blocks = key.shape[2] // self.block_size + 1  # positions lie in 0..K-1
        chosen = self.choose(q_pos, k_pos, query, key, key_valid, query_valid, num_blocks)
        k_block = torch.div(k_pos, self.block_size, rounding_mode="floor").clamp(0, num_blocks - 1)
        return chosen.gather(-1, k_block[:, None, None, :].expand(chosen.shape[0], chosen.shape[1], chosen.shape[2], -1))

    @classmethod
    def bench_variants(cls, suite: str, length: int) -> list[MoBA]:
        if suite != "sparse":
            return []
        return [cls(block_size=512, top_k=3, gate=gate, sinks=s) for s in (0, 4) for gate in GATES]

    def computed_pairs(self, module, q, k) -> float:
        if self.choice != "token":
            return super().computed_pairs(module, q, k)
        # exactly the chosen (token, block) pairs
        length, block = q.shape[2], self.block_size
        chosen = self.token_blocks(module, torch.arange(length), -(-length // block), q, k, None, causal=True)
        chosen = chosen & (torch.arange(chosen.shape[-1])[None, :] <= (torch.arange(length) // block)[:, None])
        return float(chosen.sum()) * block / (chosen.shape[0] * chosen.shape[1])

    def own_kernel(self, call: AttnCall, sinks: int, sink: torch.Tensor | None) -> torch.Tensor | None:
        """Either gate on the flash kernels (`hf_relattn.ops.flash`) for calls they serve
        (`moba_attention`), and decoding steps without padding (`decode_attention`)."""
        if not call.causal or self._dense(call.module):
            return None
        query, key = call.query, call.key
        # the queries are the last of the keys, which are every sample's whole sequence (no padding,
        # no empty static-cache slots, no dropped keys)
        if (not call.dropout and call.key_origin is None and isinstance(call.lead, int)
                and 0 < call.lead == key.shape[2] - query.shape[2]
                and query.shape[2] <= (DECODE_MAX_QUERIES if self.gate == "token" else 1) and only_causal(call.mask, key.shape[2])):
            return decode_attention(self, query, key, call.value, sinks, sink, call.scale)
        if sinks > self.block_size or not flash.serves(call):
            return None
        return moba_attention(self, query, key, call.value, sinks, sink, call.scale)

    def blocks_attention(self, call: AttnCall, chosen: torch.Tensor, sinks: int, sink: torch.Tensor | None) -> torch.Tensor:
        if self.choice == "token" and call.query.shape[2] > 1:  # one query (decoding): its union is its own choice
            return per_token_blocks(call, self, chosen, sinks, sink)
        return super().blocks_attention(call, chosen, sinks, sink)


def per_token_blocks(
    call: AttnCall, variant: MoBA, chosen: torch.Tensor, sinks: int = 0, sink: torch.Tensor | None = None
) -> torch.Tensor:
    """Key-block-major attention for choices made per token (MoBA): for each (batch, head, key
    block), the queries that chose the block attend it, giving a partial output and its
    log-sum-exp; each query then merges its partials (at most its number of chosen blocks).
    Exactly the chosen (token, block) pairs are computed, whether or not neighbouring tokens
    agree, as MoBA's own implementation does with variable-length kernels. The first `sinks`
    keys outside a token's chosen blocks are one more partial (`sink_piece`); `sink` (heads,)
    joins each merge as a partial of zero output."""
    query, key, value, mask, module = call.query, call.key, call.value, call.mask, call.module
    q_pos, _ = call.slots
    causal, scale, dropout = call.causal, call.scale, call.dropout
    batch, heads, q_len, dim = query.shape
    groups = heads // key.shape[1]
    k_len = key.shape[2]
    block = variant.key_block(module)
    chosen = chosen.expand(batch, heads, -1, -1)
    extra = (sinks > 0) + (sink is not None)  # the sink piece and the sink logit: the last slots
    width = max(1, int(chosen.sum(-1).max())) + extra  # partials per token, at most
    slot = chosen.cumsum(-1) - 1  # rank of each chosen block among the token's choices
    places: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    lses: list[torch.Tensor] = []
    # pairs grouped by (batch, head, block): nonzero of (B, H, N, Q) is sorted that way
    num_blocks = chosen.shape[-1]
    kv_heads = key.shape[1]
    # pairs sorted by (batch, head, block, query); one gather of their queries and one of the
    # groups' K/V blocks, split into views (per-group indexing would cost a full-size gradient
    # buffer per group in the backward pass)
    pairs = chosen.transpose(-1, -2).nonzero()
    group_ids, counts = torch.unique_consecutive((pairs[:, 0] * heads + pairs[:, 1]) * num_blocks + pairs[:, 2], return_counts=True)
    g_b, g_h, g_j = group_ids // (heads * num_blocks), group_ids // num_blocks % heads, group_ids % num_blocks
    counts_list = counts.tolist()
    q_parts = torch.split(query.reshape(-1, dim)[(pairs[:, 0] * heads + pairs[:, 1]) * q_len + pairs[:, 3]], counts_list)
    kv_index = (g_b * kv_heads + g_h // groups) * num_blocks + g_j
    k_parts = key_blocks(key, num_blocks, block).flatten(0, 2)[kv_index].unbind(0)
    v_parts = key_blocks(value, num_blocks, block).flatten(0, 2)[kv_index].unbind(0)
    row_parts = torch.split(pairs[:, 3], counts_list)
    lowest = torch.finfo(query.dtype).min
    for g, (b, h, j) in enumerate(zip(g_b.tolist(), g_h.tolist(), g_j.tolist())):
        rows = row_parts[g]
        k0 = j * block
        kpos, qpos = (k0 + torch.arange(block, device=query.device))[None, :], q_pos[rows][:, None]
        scores = torch.matmul(q_parts[g] * scale, k_parts[g].transpose(0, 1))
        # rows ascend: causality matters only for a block reaching past the first query
        keep = pattern_keep((kpos < k_len) if k0 + block > k_len else None, None, variant, module, qpos, kpos, k_len,
                            causal, mask_future=causal and k0 + block - 1 > int(q_pos[rows[0]]))
        if mask is not None:
            cols = kpos.clamp(max=k_len - 1).expand(rows.shape[0], -1)
            m = (mask[b, 0][rows] if mask.shape[-2] > 1 else mask[b, 0, :1].expand(rows.shape[0], -1)).gather(-1, cols)
            m = m if m.dtype == torch.bool else m == 0
            keep = m if keep is None else keep & m
        if keep is not None:
            scores = scores.masked_fill(~keep, lowest)
        top = scores.amax(dim=-1, keepdim=True)
        probs = torch.exp(scores - top)
        total = probs.sum(dim=-1, keepdim=True)
        part_lse = (top + total.log()).squeeze(-1)
        probs = probs / total
        if dropout > 0:  # dropping the block's share of a row = dropping the row's probabilities
            probs = F.dropout(probs, p=dropout)
        places.append(((b * heads + h) * q_len + rows) * width + slot[b, h, rows, j])
        outs.append(torch.matmul(probs, v_parts[g]))
        lses.append(part_lse)
    # one scatter of all partials: (B, H, Q, slots) outputs and log-sum-exps, then the merge
    where = torch.cat(places)
    partial = query.new_zeros(batch * heads * q_len * width, value.shape[-1]).index_put((where,), torch.cat(outs))
    lse = query.new_full((batch * heads * q_len * width,), float("-inf")).index_put((where,), torch.cat(lses))
    partial, lse = partial.view(batch, heads, q_len, width, -1), lse.view(batch, heads, q_len, width)
    if extra:
        parts, logs = [partial[..., : width - extra, :]], [lse[..., : width - extra]]
        if sinks:  # sink keys in blocks the token did not choose
            s_cols = torch.arange(min(sinks, k_len), device=query.device)
            uncovered = ~chosen[..., s_cols // block]
            out_s, lse_s = sink_piece(query, key, value, sinks, uncovered, q_pos, causal, mask, scale)
            parts.append(out_s[..., None, :].to(partial.dtype))
            logs.append(lse_s[..., None].to(lse.dtype))
        if sink is not None:
            parts.append(partial.new_zeros(batch, heads, q_len, 1, partial.shape[-1]))
            logs.append(sink.to(lse.dtype)[None, :, None, None].expand(batch, -1, q_len, 1))
        partial, lse = torch.cat(parts, dim=-2), torch.cat(logs, dim=-1)
    weights = torch.softmax(lse, dim=-1).nan_to_num(0.0)
    return (weights[..., None] * partial).sum(-2)


def best_earlier(gate: torch.Tensor, earlier: torch.Tensor, width: int) -> torch.Tensor:
    """(..., width) long: the `width` blocks of highest `gate` (..., N) among the `earlier` ones
    (broadcast), best first, -1 where there are fewer. `gate` is masked in place."""
    top = gate.masked_fill_(~earlier, float("-inf")).topk(width, dim=-1)
    return top.indices.masked_fill(top.values.isneginf(), -1)


def chosen_of(own: torch.Tensor, picks: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """(..., num_blocks) bool: each query's own block `own` (broadcast to picks' leading shape)
    and its picks (..., k) (-1: none)."""
    index = torch.cat([own.expand(picks.shape[:-1])[..., None], picks], -1)
    # one column past the blocks takes the -1s (no pick) and positions outside the blocks
    index = index.masked_fill((index < 0) | (index >= num_blocks), num_blocks)
    hits = torch.zeros(*picks.shape[:-1], num_blocks + 1, dtype=torch.bool, device=picks.device)
    return hits.scatter_(-1, index, True)[..., :num_blocks]


def moba_attention(variant: MoBA, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sinks: int,
                   logit: torch.Tensor | None, scale: float) -> torch.Tensor:
    """MoBA on the flash kernels, one unpadded causal sequence (B, H, T, D), either gate: each
    query block reads its own key block causally (one piece of views); every token reads the
    top_k - 1 earlier blocks its gate chose (all of them in the first blocks), key block by key
    block (`flash.Picks`: the rows that chose a block, gathered, against a view of it); the first
    `sinks` keys join where block 0 was not chosen."""
    bs = variant.block_size
    batch, heads, length, _ = query.shape
    nb = -(-length // bs)
    positions = torch.arange(length, device=query.device)[None]
    picks = variant.picks(positions, positions, query, key, None, None, nb, contiguous=True)  # (B, H, T, top_k - 1)
    query, key, value = flash.whole_blocks(query, key, value, bs)
    dtype = query.dtype
    own = flash.Piece(0, nb, 0, bs, bs, causal=True)  # each query block's own key block
    plan = []
    for b in range(batch):
        pieces: list[Any] = [own]
        if nb > 1 and picks.shape[-1]:  # rows past the sequence (whole-block padding) choose nothing
            pieces.append(flash.Picks.of(bs, F.pad(picks[b, :, bs:], (0, 0, 0, nb * bs - length), value=-1), bs))
        if sinks and nb > 1:  # block 0's first keys where a row did not choose block 0
            far = F.pad(~(picks[b, :, bs:] == 0).any(-1), (0, nb * bs - length))  # (H, n)
            far = far.unflatten(1, (nb - 1, bs)).transpose(0, 1)[..., None].expand(-1, -1, -1, min(sinks, length))
            pieces.append(flash.Piece(1, nb - 1, 0, 0, far.shape[-1], flash.additive(far.flatten(0, 1), dtype)
                                      .view(*far.shape), empty=~far.any(-1)))
        plan.append(tuple(pieces))
    out = flash.PieceAttention.apply(query, key, value, tuple(plan), bs, scale, logit)
    return out[:, :, :length]


def only_causal(mask: torch.Tensor | None, k_len: int) -> bool:
    """Whether a call's mask (None, boolean or additive, (B|1, 1, Q, K)) lets the last Q of K keys'
    queries see exactly the keys up to their own: no padding (a few queries: cheap to check)."""
    if mask is None:
        return True
    if mask.dim() != 4 or mask.shape[-1] != k_len:
        return False
    q_len = mask.shape[-2]
    causal = torch.arange(k_len, device=mask.device) <= (k_len - q_len + torch.arange(q_len, device=mask.device))[:, None]
    keep = mask if mask.dtype == torch.bool else mask == 0
    return bool((keep == causal).all())


def decode_attention(variant: MoBA, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sinks: int,
                     logit: torch.Tensor | None, scale: float) -> torch.Tensor:
    """MoBA for a few queries at the end of the keys (decoding from a KV cache, no padding), in one
    pass over K and one over V, as dense decoding does: the scores q . k of every key (float32),
    whose block means are the gate (q . mean(k) over a block, by linearity), then the softmax over
    the chosen blocks' keys (own block causal, sinks, the sink logit) and one product with V.
    Reading every key once is what the gate costs anyway (the block means of the current keys);
    gathering the chosen blocks' K/V would cost more than reading them. (B, H, Q, D)."""
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    bs = variant.block_size
    nb = -(-k_len // bs)
    # (B, Hk, groups * Q, D): the query heads of a K/V head as rows, K read once per K/V head
    rows = query.reshape(batch, kv_heads, groups * q_len, dim).float()
    scores = torch.matmul(rows, key.float().transpose(-1, -2))  # (B, Hk, G * Q, K), unscaled
    whole = k_len // bs
    sums = scores[..., : whole * bs].unflatten(-1, (whole, bs)).sum(-1)
    counts = torch.full((nb,), float(bs), device=query.device)
    if whole < nb:  # the last, partial block
        sums = torch.cat([sums, scores[..., whole * bs :].sum(-1, keepdim=True)], -1)
        counts[-1] = k_len - whole * bs
    gate = sums / counts
    q_pos = (k_len - q_len + torch.arange(q_len, device=query.device)).repeat(groups)  # (G * Q,)
    own = torch.div(q_pos, bs, rounding_mode="floor")
    earlier = torch.arange(nb, device=query.device) < own[:, None]
    chosen = chosen_of(own, best_earlier(gate, earlier, max(0, min(variant.top_k - 1, nb))), nb)  # (B, Hk, G * Q, nb)
    k_pos = torch.arange(k_len, device=query.device)
    keep = chosen.repeat_interleave(bs, -1)[..., :k_len] | (k_pos < sinks)
    keep = keep & (k_pos <= q_pos[:, None])
    logits = (scores * scale).masked_fill(~keep, float("-inf"))
    if logit is not None:  # one more zero-valued key scoring each head's sink logit
        per_row = logit.float().view(kv_heads, groups, 1).expand(-1, -1, q_len).reshape(1, kv_heads, groups * q_len, 1)
        logits = torch.cat([logits, per_row.expand(batch, -1, -1, -1)], -1)
    probs = torch.softmax(logits, -1)[..., :k_len]
    out = torch.matmul(probs.to(value.dtype), value)  # (B, Hk, G * Q, D)
    return out.reshape(batch, heads, q_len, -1).to(query.dtype)
