"""Relation-aware attention (Shaw et al. 2018, eqs. 3-4) without materialising anything of size
T x T x d: materialised attention in query chunks of at most `RELATION_CHUNK_ELEMENTS` scores,
label scores q @ A^K^T (B, H, c, R) gathered by label and probabilities summed per label before
@ A^V; causal chunks skip the keys after their last query. In training each chunk is
recomputed in the backward pass (a hand-written autograd Function), so memory stays
O(chunk x K) (Rabe & Staats 2021)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..call import AttnCall

# Scores per chunk of the relational path (one K/V head's query heads x rows x K): 1 MB chunks
# keep its extra memory at that of SDPA at T=4096 and cost no speed (hf-relattn bench kernels
# --suite relative).
RELATION_CHUNK_ELEMENTS = 1 << 18


@dataclass
class RelationTerm:
    """A labelled relation over (query, key) pairs and what each label adds (Shaw et al. 2018).

    With r_ij the label of pair (i, j), the engine computes
        e_ij = q_i . (k_j + key[r_ij]) * scale + bias[h, r_ij],   z_i = sum_j a_ij (v_j + value[r_ij])
    without materialising anything of size T x T x d: q @ key^T gives (B, H, Q, R) label scores
    that are gathered by label, and the probabilities are summed per label before @ value.

    Labels are given for every pair (`labels`: a (1 or B, Q, K) long tensor, or a function of
    (query positions, key positions) giving one, evaluated chunk by chunk), or are clipped 1-D
    relative positions r_ij = clip(j - i, -max_distance, max_distance) + max_distance, computed
    by the engine from positions (cheapest, and what decoding needs).
    Tables are (R, D) shared by all heads or (H, R, D) per head; `bias` is (H, R).
    """

    num_labels: int
    labels: torch.Tensor | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    max_distance: int | None = None
    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    source: str = "labels"  # where given labels come from, for errors (e.g. the model input's name)


def term_labels(term: RelationTerm, q_pos: torch.Tensor, k_pos: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
    """Labels (1|B, c, K') of a term for the query rows `rows` and keys `k_pos`."""
    if callable(term.labels):
        return term.labels(q_pos[rows], k_pos)
    if term.labels is not None:
        return term.labels[:, rows, : k_pos.shape[0]]
    m = term.max_distance
    return ((k_pos[None, :] - q_pos[rows, None]).clamp(-m, m) + m)[None]


class _Band:
    """Clipped relative positions r = clip(j - i, -m, m) + m for c consecutive queries at
    positions p0.. against keys 0..K'-1, in three column ranges: keys before `lo` all have label
    0, keys from `hi` on all have label 2m, and the window [lo, hi) (width c + 2m) holds the
    rest. Per-label values then cost O(c (c + m)) gathers plus two broadcasts, not O(c K')."""

    def __init__(self, q_first: int, rows: int, keys: int, m: int, device: torch.device) -> None:
        self.m = m
        self.lo = max(0, q_first - m)
        self.hi = min(keys, q_first + rows + m)
        cols = torch.arange(self.lo, self.hi, device=device)
        qpos = torch.arange(q_first, q_first + rows, device=device)
        self.window = (cols[None, :] - qpos[:, None]).clamp(-m, m) + m  # (c, hi - lo)

    def add(self, scores: torch.Tensor, per_label: torch.Tensor, shift: bool) -> None:
        """scores[..., j] += per_label[..., r_ij] in place. `shift`: leave out a per-row
        constant (per_label[..., 0]), which a softmax ignores, so the left range costs nothing."""
        if shift:
            per_label = per_label - per_label[..., :1]
        elif self.lo > 0:
            scores[..., : self.lo] += per_label[..., :1]
        index = self.window.expand(*per_label.shape[:2], *self.window.shape)
        scores[..., self.lo : self.hi] += per_label.gather(-1, index)
        if self.hi < scores.shape[-1]:
            scores[..., self.hi :] += per_label[..., 2 * self.m :]

    def sums(self, x: torch.Tensor) -> torch.Tensor:
        """sum_j x[..., j] per label: (B, H, c, 2m + 1)."""
        size = 2 * self.m + 1
        index = self.window.expand(*x.shape[:2], *self.window.shape)
        out = x.new_zeros(*x.shape[:3], size).scatter_add_(-1, index, x[..., self.lo : self.hi])
        if self.lo > 0:
            out[..., 0] += x[..., : self.lo].sum(-1)
        if self.hi < x.shape[-1]:
            out[..., -1] += x[..., self.hi :].sum(-1)
        return out


class _Labels:
    """Arbitrary labels (1|B, c, K'): gathers and scatter-adds over every pair."""

    def __init__(self, labels: torch.Tensor, shape: torch.Size, num_labels: int) -> None:
        self.index = labels[:, None].expand(shape)
        self.num_labels = num_labels

    def add(self, scores: torch.Tensor, per_label: torch.Tensor, shift: bool) -> None:
        scores += per_label.expand(*scores.shape[:3], -1).gather(-1, self.index)

    def sums(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:3], self.num_labels).scatter_add_(-1, self.index, x)


def project(x: torch.Tensor, table: torch.Tensor, transpose: bool) -> torch.Tensor:
    """(B, H, c, D) x table (R, D) or (H, R, D): x @ table^T -> (B, H, c, R) if `transpose`,
    else x (B, H, c, R) @ table -> (B, H, c, D)."""
    if table.dim() == 2:
        return torch.matmul(x, table.t() if transpose else table)
    return torch.einsum("bhcd,hrd->bhcr" if transpose else "bhcr,hrd->bhcd", x, table)


def _table_grad(sums: torch.Tensor, x: torch.Tensor, per_head: bool) -> torch.Tensor:
    """Gradient of a (R, D) or (H, R, D) table: sum over batch and rows of sums (B, H, c, R)
    times x (B, H, c, D)."""
    return torch.einsum("bhcr,bhcd->hrd" if per_head else "bhcr,bhcd->rd", sums, x)


@dataclass
class _Rows:
    """What one chunk of query rows shares across heads: its key count, label placements,
    static bias (H, c, K') and mask (bool: True = masked; float: additive)."""

    rows: slice
    keys: int
    places: list[_Band | _Labels]
    bias: torch.Tensor | None
    mask: torch.Tensor | None


@dataclass
class _Plan:
    """Everything but the differentiable tensors: what the chunks of one call compute.

    A chunk is one K/V head with the G query heads that read it and c consecutive queries:
    its scores are one (G*c, D) @ (D, K') matmul per batch entry (grouped heads share K
    without repeating it; G*c rows keep the matmul efficient even when c is small)."""

    terms: Sequence[RelationTerm]
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    mask: torch.Tensor | None
    bias_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]
    causal: bool
    scale: float
    dropout: float
    step: int
    groups: int
    seed: int = 0

    def chunks(self, batch: int, kv_heads: int) -> Iterator[tuple[int, slice, _Rows]]:
        """(K/V head, its query heads, the rows' shared context) per chunk; row chunks outside,
        so what does not depend on the head (labels, masks, static biases) is built once."""
        q_len = self.q_pos.shape[0]
        for start in range(0, q_len, self.step):
            rows = self._rows(slice(start, min(q_len, start + self.step)), batch)
            for kv in range(kv_heads):
                yield kv, slice(kv * self.groups, (kv + 1) * self.groups), rows

    def _rows(self, rows: slice, batch: int) -> _Rows:
        q_len, k_len = self.q_pos.shape[0], self.k_pos.shape[0]
        # positions are contiguous: a causal chunk sees keys up to its last query's position
        keys = k_len - q_len + rows.stop if self.causal else k_len
        count = rows.stop - rows.start
        qp, kp = self.q_pos[rows], self.k_pos[:keys]
        shape = (batch, self.groups, count, keys)
        places: list[_Band | _Labels] = []
        for term in self.terms:
            if term.labels is None:
                places.append(_Band(k_len - q_len + rows.start, count, keys, term.max_distance, qp.device))
            else:
                places.append(_Labels(term_labels(term, self.q_pos, kp, rows), shape, term.num_labels))
        mask = self.mask
        if mask is not None:
            mask = mask[..., :keys] if mask.shape[-2] == 1 else mask[..., rows, :keys]
            mask = ~mask if mask.dtype == torch.bool else mask
        elif self.causal:
            # only the last c keys can lie after a query of this chunk
            mask = kp[keys - count :][None, :] > qp[:, None]
        return _Rows(rows, keys, places, self.bias_fn(qp, kp), mask)

    def probabilities(
        self, qs: torch.Tensor, k: torch.Tensor, heads: slice, rows: _Rows, tables: list[dict[str, torch.Tensor]]
    ) -> torch.Tensor:
        """softmax of one chunk's scores (B, G, c, K'): qs = its scaled queries (B, G, c, D),
        k = its K/V head's keys (B, K', D)."""
        batch, groups, count, dim = qs.shape
        keys = rows.keys
        scores = torch.matmul(qs.reshape(batch, groups * count, dim), k.transpose(-1, -2)).view(batch, groups, count, keys)
        for place, tab in zip(rows.places, tables):
            per_label = None
            if "key" in tab:
                per_label = project(qs, _heads(tab["key"], heads), transpose=True)
            if "bias" in tab:
                bias = tab["bias"][heads][None, :, None, :]
                per_label = bias if per_label is None else per_label + bias
            if per_label is not None:
                place.add(scores, per_label, shift=True)
        if rows.bias is not None:
            scores += rows.bias[heads].to(scores.dtype)
        mask = rows.mask
        if mask is not None:
            if mask.dtype != torch.bool:
                scores += mask
            elif self.mask is None:  # causal, no mask given: the masked part of the last c keys
                scores[..., keys - count :].masked_fill_(mask, torch.finfo(scores.dtype).min)
            else:
                scores.masked_fill_(mask, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1)

    def keep(self, kv: int, rows: slice, like: torch.Tensor) -> torch.Tensor | None:
        """Dropout's scaled keep mask for a chunk, regenerated identically in the backward pass."""
        if self.dropout <= 0:
            return None
        generator = torch.Generator(device=like.device).manual_seed(self.seed + rows.start * 4099 + kv)
        kept = torch.rand(like.shape, generator=generator, device=like.device) >= self.dropout
        return kept.to(like.dtype).div_(1 - self.dropout)


def _heads(table: torch.Tensor, heads: slice) -> torch.Tensor:
    """A (R, D) table shared by all heads, or the given heads of a per-head (H, R, D) one."""
    return table if table.dim() == 2 else table[heads]


def _tables(terms: Sequence[RelationTerm], flat: Sequence[torch.Tensor | None]) -> list[dict[str, torch.Tensor]]:
    """The flat (key, value, bias) list of every term, as one dict per term (present tables only)."""
    return [
        {name: t for name, t in zip(("key", "value", "bias"), flat[3 * i : 3 * i + 3]) if t is not None}
        for i in range(len(terms))
    ]


class _RelationalAttention(torch.autograd.Function):
    """Shaw et al. 2018, eqs. 3-4, in chunks (see `_Plan`) with a hand-written backward pass
    that recomputes each chunk's probabilities (Rabe & Staats 2021; FlashAttention's recipe), so
    memory stays O(chunk) in training too: out, dq, dk, dv and the tables' gradients are the
    only full-size tensors."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _Plan, *flat: torch.Tensor | None) -> torch.Tensor:
        tables = _tables(plan.terms, flat)
        batch, heads, q_len, _ = q.shape
        # (B, Q, H, D) storage: the layout transformers wants back, so no copy follows
        out = q.new_empty(batch, q_len, heads, v.shape[-1]).transpose(1, 2)
        for kv, hs, chunk in plan.chunks(batch, k.shape[1]):
            rows, keys, places = chunk.rows, chunk.keys, chunk.places
            qs = q[:, hs, rows] * plan.scale
            probs = plan.probabilities(qs, k[:, kv, :keys], hs, chunk, tables)
            keep = plan.keep(kv, rows, probs)
            if keep is not None:
                probs.mul_(keep)
            b, g, c, _ = probs.shape
            o = torch.matmul(probs.view(b, g * c, keys), v[:, kv, :keys]).view(b, g, c, -1)
            for tab, place in zip(tables, places):
                if "value" in tab:
                    o += project(place.sums(probs), _heads(tab["value"], hs), transpose=False)
            out[:, hs, rows] = o
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, *flat)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, *flat = ctx.saved_tensors
        plan: _Plan = ctx.plan
        tables = _tables(plan.terms, flat)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dtables = [{name: torch.zeros_like(t) for name, t in tab.items()} for tab in tables]
        for kv, hs, chunk in plan.chunks(q.shape[0], k.shape[1]):
            rows, keys, places = chunk.rows, chunk.keys, chunk.places
            qs = q[:, hs, rows] * plan.scale
            probs = plan.probabilities(qs, k[:, kv, :keys], hs, chunk, tables)
            b, g, c, _ = probs.shape
            do = grad_out[:, hs, rows]
            do_flat = do.reshape(b, g * c, -1)
            keep = plan.keep(kv, rows, probs)
            dropped = probs if keep is None else probs * keep
            # value side: out = dropped @ (v + A^V)
            dprobs = torch.matmul(do_flat, v[:, kv, :keys].transpose(-1, -2)).view(b, g, c, keys)
            dv[:, kv, :keys].baddbmm_(dropped.view(b, g * c, keys).transpose(-1, -2), do_flat)
            for tab, dtab, place in zip(tables, dtables, places):
                if "value" in tab:
                    table = _heads(tab["value"], hs)
                    place.add(dprobs, project(do, table, transpose=True), shift=False)
                    grad = _table_grad(place.sums(dropped), do, table.dim() == 3)
                    _heads(dtab["value"], hs).add_(grad)
            if keep is not None:
                dprobs.mul_(keep)
                row_dot = (probs * dprobs).sum(-1, keepdim=True)
            else:
                row_dot = (do * out[:, hs, rows]).sum(-1, keepdim=True)  # = sum_j P_ij dP_ij
            dscores = dprobs.sub_(row_dot).mul_(probs)
            del probs, dropped
            # score side: scores = qs @ (k + A^K)^T + bias
            ds_flat = dscores.view(b, g * c, keys)
            dqs = torch.matmul(ds_flat, k[:, kv, :keys]).view(b, g, c, -1)
            dk[:, kv, :keys].baddbmm_(ds_flat.transpose(-1, -2), qs.reshape(b, g * c, -1))
            for tab, dtab, place in zip(tables, dtables, places):
                if "key" in tab or "bias" in tab:
                    sums = place.sums(dscores)
                    if "key" in tab:
                        table = _heads(tab["key"], hs)
                        dqs += project(sums, table, transpose=False)
                        _heads(dtab["key"], hs).add_(_table_grad(sums, qs, table.dim() == 3))
                    if "bias" in tab:
                        dtab["bias"][hs] += sums.sum(dim=(0, 2))
            dq[:, hs, rows] = dqs * plan.scale
        grads: list[torch.Tensor | None] = []
        for i, tab in enumerate(dtables):
            grads += [tab.get(name) if flat[3 * i + j] is not None else None for j, name in enumerate(("key", "value", "bias"))]
        return (dq, dk, dv, None, *grads)


def relational_attention(
    call: AttnCall, bias_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None], terms: Sequence[RelationTerm] = ()
) -> torch.Tensor:
    """Relation-aware attention (Shaw et al. 2018, eqs. 3-4) in query chunks; (B, Hq, Q, D).

    Per chunk of c queries: scores q k^T * scale (B, H, c, K') plus each label's score gathered
    by label (clipped relative positions: a band, see `_Band`), static biases, mask, softmax,
    probs @ v plus (probs summed per label) @ A^V. Causal chunks stop at their last query's
    position (K' <= K); grouped K/V heads are never repeated. The backward pass is written out
    (`_RelationalAttention`). Low-precision inputs run in float32. `bias_fn(q_pos, k_pos)`: static
    biases (H, c, K') of the other score terms.
    """
    query, key, value, mask = call.query, call.key, call.value, call.mask
    q_pos, k_pos = call.slots
    causal, scale, dropout = call.causal, call.scale, call.dropout
    batch, num_heads, q_len, _ = query.shape
    dtype = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    k_len, groups = key.shape[2], num_heads // key.shape[1]
    step = max(1, min(q_len, RELATION_CHUNK_ELEMENTS // max(1, batch * groups * k_len)))
    flat = [t if t is None else t.to(dtype) for term in terms for t in (term.key, term.value, term.bias)]
    plan = _Plan(terms, q_pos, k_pos, mask, bias_fn, causal, scale, dropout, step, groups)
    if dropout > 0:
        plan.seed = int(torch.randint(0, 2**62, (), device="cpu"))
    out = _RelationalAttention.apply(query.to(dtype), key.to(dtype), value.to(dtype), plan, *flat)
    return out.to(query.dtype)
