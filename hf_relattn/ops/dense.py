"""Dense attention with score terms: SDPA with an additive bias, chunked over queries so the bias
never exceeds `CHUNK_ELEMENTS` floats (memory O(chunk x K), cf. Rabe & Staats 2021); and the
materialised reference formula softmax(q k^T * scale + bias + mask) v, with relation terms
gathered into (Q, K, D) tensors as transformers v4 BERT's `relative_key` did (tests, debugging,
the naive baseline of benchmarks)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..call import AttnCall
from .masks import additive_mask
from .relational import RelationTerm, term_labels

# Largest additive bias materialised at once (floats); queries are processed in chunks below it.
CHUNK_ELEMENTS = 1 << 24

BiasFn = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def dense_attention(call: AttnCall, bias_fn: BiasFn) -> torch.Tensor:
    """SDPA with an additive bias `bias_fn(q_pos, k_pos)` (H, c, K), in query chunks; (B, Hq, Q, D)."""
    query, key, value, mask = call.query, call.key, call.value, call.mask
    q_pos, k_pos = call.slots
    causal, scale, dropout = call.causal, call.scale, call.dropout
    batch, num_heads, q_len, _ = query.shape
    k_len = key.shape[2]
    gqa = key.shape[1] != num_heads
    if gqa and query.device.type == "cpu" and torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        # torch 2.13's CPU SDPA backward with enable_gqa is ~20x slower than with repeated K/V
        # heads (hf-relattn bench kernels); repeating costs O(H K D) memory, once per call.
        key = key.repeat_interleave(num_heads // key.shape[1], dim=1)
        value = value.repeat_interleave(num_heads // value.shape[1], dim=1)
        gqa = False
    chunk = max(1, CHUNK_ELEMENTS // max(1, batch * num_heads * k_len))
    outs = []
    for start in range(0, q_len, chunk):
        stop = min(q_len, start + chunk)
        qp = q_pos[start:stop]
        m = None if mask is None else mask[..., start:stop, :]
        attn_mask = additive_mask(bias_fn(qp, k_pos), m, qp, k_pos, causal, query.dtype)
        outs.append(
            F.scaled_dot_product_attention(
                query[:, :, start:stop], key, value, attn_mask=attn_mask, dropout_p=dropout, scale=scale, enable_gqa=gqa
            )
        )
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def reference_attention(call: AttnCall, bias_fn: BiasFn, terms: Sequence[RelationTerm] = ()) -> torch.Tensor:
    """softmax(q k^T * scale + bias + mask) v, every matrix materialised, float32 softmax.

    Relation terms are gathered into (1|B, Q, K, D) tensors (per head: (H, 1|B, Q, K, D)),
    exactly the T x T x d materialisation the relational path avoids. (B, Hq, Q, D)."""
    query, key, value, mask = call.query, call.key, call.value, call.mask
    q_pos, k_pos = call.slots
    causal, scale, dropout = call.causal, call.scale, call.dropout
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1).float()
    value = value.repeat_interleave(groups, dim=1).float()
    q = query.float()
    scores = torch.matmul(q, key.transpose(-1, -2)) * scale
    gathered = [(term, term_labels(term, q_pos, k_pos)) for term in terms]
    for term, labels in gathered:
        if term.key is not None:
            table = term.key.float()[labels] if term.key.dim() == 2 else term.key.float()[:, labels]
            pattern = "bhqd,bqkd->bhqk" if term.key.dim() == 2 else "bhqd,hbqkd->bhqk"
            scores = scores + torch.einsum(pattern, q, table) * scale
        if term.bias is not None:
            scores = scores + term.bias.float()[:, labels].transpose(0, 1)
    add = additive_mask(bias_fn(q_pos, k_pos), mask, q_pos, k_pos, causal, torch.float32)
    if add is not None:
        scores = scores.masked_fill(~add, torch.finfo(torch.float32).min) if add.dtype == torch.bool else scores + add
    probs = torch.softmax(scores, dim=-1)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    out = torch.matmul(probs, value)
    for term, labels in gathered:
        if term.value is not None:
            table = term.value.float()[labels] if term.value.dim() == 2 else term.value.float()[:, labels]
            pattern = "bhqk,bqkd->bhqd" if term.value.dim() == 2 else "bhqk,hbqkd->bhqd"
            out = out + torch.einsum(pattern, probs, table)
    return out.to(query.dtype)
