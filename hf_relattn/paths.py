"""The two paths every variant takes through its hooks, whatever it is:

- `score_attention`: score terms (`score_bias`: static biases such as ALiBi; `relation_term`:
  learned relation-aware keys, values and biases, Shaw et al. 2018) on top of dense attention:
  SDPA with an additive bias in chunks (`ops.dense`), or the relational kernel (`ops.relational`)
  when a term has learned tables; with none, transformers' own SDPA;
- `materialized_attention`: every axis at once over materialised (B, H, Q, K) scores, with no
  data-dependent Python: what runs under torch.compile and for `output_attentions=True`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .call import AttnCall
from .ops.dense import dense_attention, reference_attention
from .ops.relational import project, relational_attention, term_labels

if TYPE_CHECKING:
    from .variants.base import Variant


def score_attention(call: AttnCall, variants: Sequence[Variant]) -> torch.Tensor:
    """Attention with the variants' score terms (structure variants add none); (B, Q, H, D)."""
    module, query = call.module, call.query
    num_heads, q_len, k_len = query.shape[1], query.shape[2], call.key.shape[2]
    q_pos, k_pos = call.slots
    term_of = {v.name: v.relation_term(module, num_heads, q_pos, k_pos, call.inputs, causal=call.causal) for v in variants}
    terms = [t for t in term_of.values() if t is not None]
    for term in terms:
        if isinstance(term.labels, torch.Tensor) and term.labels.shape[0] not in (1, query.shape[0]):
            raise ValueError(
                f"{term.source} has batch size {term.labels.shape[0]} but the input has {query.shape[0]}: expected "
                f"shape (batch, query length, key length) = ({query.shape[0]}, {q_len}, {k_len})"
            )
    scorers = [v for v in variants if v.axis == "scores"]
    if any(t.key is not None or t.value is not None for t in terms):
        # the relational path: variants with a relation term (e.g. t5_bias's learned bias) act
        # through it, with gradients; score_bias only for the others (static, e.g. ALiBi)
        scorers = [v for v in scorers if term_of[v.name] is None]
    else:
        terms = []  # bias-only terms: their score_bias runs on the SDPA path
    if not scorers and not terms and call.impl == "auto":
        return sdpa_attention_forward(module, query, call.key, call.value, call.mask, dropout=call.dropout,
                                      scaling=call.scale, is_causal=call.causal)[0]

    def bias_fn(qp: torch.Tensor, kp: torch.Tensor) -> torch.Tensor | None:
        biases = [t for t in (v.score_bias(module, num_heads, qp, kp, causal=call.causal) for v in scorers) if t is not None]
        return sum(biases[1:], biases[0]) if biases else None

    if call.impl == "reference":
        out = reference_attention(call, bias_fn, terms)
    elif terms:
        out = relational_attention(call, bias_fn, terms)
    else:
        out = dense_attention(call, bias_fn)
    return out.transpose(1, 2).contiguous()


def materialized_attention(call: AttnCall, variants: Sequence[Variant]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every axis at once over materialised scores: (out (B, H, Q, D), probabilities (B, H, Q, K)).

    scores = q k^T * scale + score biases + relation terms (q . A^K gathered by label), masked
    by the call's mask (or causality) and each sparse variant's `dense_pattern` (at positions in the
    samples' own sequences); softmax in float32 for half precision; out = P v + (P summed per
    label) A^V, times MoSA's router gate or MoH's head weights. No Python depends on tensor
    values, so torch.compile traces it whole; memory is O(B H Q K), as eager attention's.
    The probabilities are zero where a head does not compute a token (MoH, MoSA)."""
    module, query = call.module, call.query
    batch, heads, q_len, _ = query.shape
    groups = heads // call.key.shape[1]
    k_len = call.key.shape[2]
    dtype = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    q = query.to(dtype)
    k = call.key.to(dtype).repeat_interleave(groups, dim=1)
    v = call.value.to(dtype).repeat_interleave(groups, dim=1)
    q_slots, k_slots = call.q_slots, torch.arange(k_len, device=query.device)
    scores = torch.matmul(q, k.transpose(-1, -2)) * call.scale
    placed = []
    for variant in variants:
        term = variant.relation_term(module, heads, q_slots, k_slots, call.inputs, causal=call.causal)
        if term is not None and (term.key is not None or term.value is not None):
            labels = term_labels(term, q_slots, k_slots).expand(batch, q_len, k_len)
            index = labels[:, None].expand(batch, heads, q_len, k_len)
            if term.key is not None:
                scores = scores + project(q, term.key.to(dtype), transpose=True).mul(call.scale).gather(-1, index)
            if term.bias is not None:
                scores = scores + term.bias.to(dtype)[:, labels].transpose(0, 1)
            placed.append((term, index))
        elif variant.axis == "scores":
            bias = variant.score_bias(module, heads, q_slots, k_slots, causal=call.causal)
            if bias is not None:
                scores = scores + bias.to(dtype)
    keep: torch.Tensor | None
    if call.mask is None:
        keep = (k_slots[None, :] <= q_slots[:, None]) if call.causal else None
    elif call.mask.dtype == torch.bool:
        keep = call.mask
    else:
        scores, keep = scores + call.mask.to(dtype), None
    rows = None  # (B, H, Q) weight of each (token, head) output
    sink = None  # (H,) sink logits of a pattern
    for variant in variants:
        if variant.axis != "sparsity":
            continue
        pattern, gate, logit = variant.dense_pattern(call)
        rows = gate if gate is not None else rows
        sink = logit if logit is not None else sink
        if pattern is not None:
            if call.causal:
                pattern = pattern & (k_slots[None, :] <= q_slots[:, None])
            keep = pattern if keep is None else keep & pattern
    if keep is not None:
        scores = scores.masked_fill(~keep, torch.finfo(dtype).min)
    if sink is not None:  # one more column: the sink logit in the denominator, no value
        column = sink.to(dtype)[None, :, None, None].expand(batch, heads, q_len, 1)
        probs = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    if keep is not None:  # rows that see no key (padding queries, tokens MoSA leaves) get nothing
        probs = probs * keep.any(-1, keepdim=True)
    if call.dropout > 0:
        probs = F.dropout(probs, p=call.dropout)
    out = torch.matmul(probs, v)
    for term, index in placed:
        if term.value is not None:
            table = term.value.to(dtype)
            sums = probs.new_zeros(batch, heads, q_len, table.shape[-2]).scatter_add(-1, index, probs)
            out = out + project(sums, table, transpose=False)
    gating = [variant for variant in variants if variant.axis == "gating"]
    if gating:
        weights, used = gating[0].head_weights(module, query, call.query_valid(), call.inputs)
        head_rows = weights.to(dtype).transpose(1, 2)
        rows = head_rows if rows is None else rows * head_rows
        probs = probs * used.transpose(1, 2)[..., None]
    if rows is not None:
        out = out * rows[..., None]
    return out.to(query.dtype), probs
