"""The attention engine: one entry point for every variant, registered with transformers.

`relattn_attention` has the signature of transformers' attention interface: it receives
q (B, Hq, Q, D), k/v (B, Hkv, K, D) with possibly fewer K/V heads, the mask built by the
registered mask function (boolean (B, 1, Q, K) or None), and the calling module. It collects
the variants acting in that module (attached by `convert`, or selected by the
`relattn_<name>` flag) and dispatches:

- no variant acts inside attention -> transformers' own sdpa function (zero overhead: an
  identity conversion runs exactly the native kernel);
- a score term exists -> `dense`: SDPA with an additive bias, chunked over queries so the
  bias never exceeds `CHUNK_ELEMENTS` floats (memory O(chunk x K), cf. Rabe & Staats 2021);
- a relation term exists (Shaw et al. 2018: learned key/value vectors per relation label) ->
  `relational`: materialised attention in query chunks of at most `RELATION_CHUNK_ELEMENTS`
  scores, label scores q @ A^K^T (B, H, c, R) gathered by label and probabilities summed per
  label before @ A^V, so nothing of size T x T x d exists; causal chunks skip the keys after
  their last query. In training each chunk is recomputed in the backward pass
  (activation checkpointing), so memory stays O(chunk x K) (Rabe & Staats 2021);
- `reference`: the materialised formula softmax(q k^T * scale + bias + mask) v, with relation
  terms gathered into (Q, K, D) tensors as transformers v4 BERT's `relative_key` did, for
  tests, debugging and the naive baseline of benchmarks (`force_implementation("reference")`).

Positions are indices in the key/value sequence: the new queries are the last Q of K
(DynamicCache decoding). Relative terms only use differences, so left padding is harmless.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .variants.base import ATTACHED, RelationTerm, Variant, get_variant_class

ENGINE_NAME = "relattn"
FLAG_PREFIX = "relattn_"
IMPLEMENTATIONS = ("auto", "dense", "reference")
# Largest additive bias materialised at once (floats); queries are processed in chunks below it.
CHUNK_ELEMENTS = 1 << 24
# Scores (B x H x rows x K) per chunk of the relational path: about five such temporaries live
# at once (scores, probabilities and their gradients), so 8 MB chunks keep the extra memory
# near that of the q/k/v gradients at T=4096.
RELATION_CHUNK_ELEMENTS = 1 << 21

_forced: list[str] = []


@contextlib.contextmanager
def force_implementation(name: str) -> Iterator[None]:
    """Force the engine path inside a `with` block: "auto", "dense" or "reference"."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"Unknown implementation {name!r}; valid: {', '.join(IMPLEMENTATIONS)}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


# ---------------------------------------------------------------------- flag variants
_flag_cache: dict[tuple[str, str], Variant] = {}


def flag_options(config: Any, name: str) -> dict[str, Any]:
    """Options for flag variant `name` from `config.relattn`.

    `config.relattn` is either the full spec written by `convert` ({"variants": [...]}), whose
    entry named `name` supplies the options, or (with a flag) a plain dict of options, as in
    `from_pretrained(p, attn_implementation="relattn_alibi", relattn={...})`.
    """
    spec = getattr(config, "relattn", None) or {}
    if not isinstance(spec, dict):
        raise ValueError(f"config.relattn must be a dict, got {type(spec).__name__}")
    if "variants" in spec:
        for entry in spec["variants"]:
            if entry["name"] == name:
                return dict(entry.get("options", {}))
        return {}
    if "layers" in spec:
        raise ValueError(
            "A flag variant applies to every layer; to choose layers, use "
            f"hf_relattn.convert(model, {name!r}, layers=[...]) instead."
        )
    return dict(spec)


def flag_variant(config: Any) -> Variant | None:
    """The variant selected by `attn_implementation="relattn_<name>"`, if any."""
    impl = getattr(config, "_attn_implementation", None)
    if not isinstance(impl, str) or not impl.startswith(FLAG_PREFIX):
        return None
    name = impl[len(FLAG_PREFIX):]
    options = flag_options(config, name)
    key = (name, json.dumps(options, sort_keys=True))
    if key not in _flag_cache:
        _flag_cache[key] = get_variant_class(name).from_options(options)
    return _flag_cache[key]


def module_variants(module: nn.Module) -> tuple[Variant, ...]:
    """Variants acting inside this attention module: attached ones, then the flag's."""
    attached: tuple[Variant, ...] = getattr(module, ATTACHED, ())
    flag = flag_variant(module.config)
    if flag is not None and all(v.name != flag.name for v in attached):
        return attached + (flag,)
    return attached


# --------------------------------------------------------------------------- engine
def _model_has(config: Any, name: str) -> bool:
    """True when the adapted model's spec (config.relattn) converts some layer to `name`
    (checked on the model: layers left unconverted may still receive the input)."""
    spec = getattr(config, "relattn", None) or {}
    return any(entry.get("name") == name for entry in spec.get("variants", ())) if isinstance(spec, dict) else False


def relattn_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention entry point registered as "relattn" and "relattn_<flag>" (see module doc)."""
    variants = module_variants(module)
    num_heads, q_len, k_len = query.shape[1], query.shape[2], key.shape[2]
    device = query.device
    k_pos = torch.arange(k_len, device=device)
    q_pos = k_pos[k_len - q_len:]
    terms = [t for t in (v.relation_term(module, num_heads, q_pos, k_pos, kwargs) for v in variants) if t is not None]
    if kwargs.get("relation_ids") is not None and not _model_has(module.config, "relation"):
        raise ValueError(
            "relation_ids were passed but the model has no 'relation' variant: convert it first with "
            "hf_relattn.convert(model, 'relation', num_relations=N)."
        )
    for term in terms:
        if term.labels is not None and term.labels.shape[0] not in (1, query.shape[0]):
            raise ValueError(
                f"relation_ids has batch size {term.labels.shape[0]} but the input has {query.shape[0]}: expected "
                f"shape (batch, query length, key length) = ({query.shape[0]}, {q_len}, {k_len})"
            )
    scorers = [v for v in variants if v.axis == "scores"]
    impl = _forced[-1] if _forced else "auto"
    if not scorers and not terms and impl == "auto":
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling

    def bias_fn(qp: torch.Tensor, kp: torch.Tensor) -> torch.Tensor | None:
        biases = [t for t in (v.score_bias(module, num_heads, qp, kp) for v in scorers) if t is not None]
        return sum(biases[1:], biases[0]) if biases else None

    if impl == "reference":
        run = partial(reference_attention, terms=terms)
    elif terms:
        run = partial(relational_attention, terms=terms)
    else:
        run = dense_attention
    out = run(query, key, value, attention_mask, bias_fn, q_pos, k_pos, causal, scale, dropout if module.training else 0.0)
    return out.transpose(1, 2).contiguous(), None


def _additive_mask(
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    qp: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """bias (H, c, K) + mask (B, 1, c, K) -> one float additive mask; masked entries get the
    dtype's minimum (not -inf, so fully padded query rows stay finite, as in transformers)."""
    if mask is None and causal:
        mask = (k_pos[None, :] <= qp[:, None])[None, None]
    if mask is not None and mask.dtype != torch.bool:
        # an additive float mask given by the caller
        return mask.to(dtype) if bias is None else (bias[None] + mask.float()).to(dtype)
    if bias is None:
        return mask
    if mask is None:
        return bias[None].to(dtype)
    # fill after the cast: float32's minimum would round to -inf in bfloat16/float16
    return bias[None].to(dtype).masked_fill(~mask, torch.finfo(dtype).min)


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    bias_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None],
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    scale: float,
    dropout: float,
) -> torch.Tensor:
    """SDPA with an additive bias, in query chunks; returns (B, Hq, Q, D)."""
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
        attn_mask = _additive_mask(bias_fn(qp, k_pos), m, qp, k_pos, causal, query.dtype)
        outs.append(
            F.scaled_dot_product_attention(
                query[:, :, start:stop], key, value, attn_mask=attn_mask, dropout_p=dropout, scale=scale, enable_gqa=gqa
            )
        )
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    bias_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None],
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    scale: float,
    dropout: float,
    terms: Sequence[RelationTerm] = (),
) -> torch.Tensor:
    """softmax(q k^T * scale + bias + mask) v, every matrix materialised, float32 softmax.

    Relation terms are gathered into (1|B, Q, K, D) tensors (per head: (H, 1|B, Q, K, D)),
    exactly the T x T x d materialisation the relational path avoids."""
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
    add = _additive_mask(bias_fn(q_pos, k_pos), mask, q_pos, k_pos, causal, torch.float32)
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


# ----------------------------------------------------------------- relational path
def term_labels(term: RelationTerm, q_pos: torch.Tensor, k_pos: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
    """Labels (1|B, c, K') of a term for the query rows `rows` and keys `k_pos`."""
    if term.labels is not None:
        return term.labels[:, rows, : k_pos.shape[0]]
    m = term.max_distance
    return ((k_pos[None, :] - q_pos[rows, None]).clamp(-m, m) + m)[None]


def _label_scores(q: torch.Tensor, term: RelationTerm) -> torch.Tensor | None:
    """What each label adds to each query's scores, (B, H, c, R) (q already scaled), or None."""
    out = None
    if term.key is not None:
        table = term.key.to(q.dtype)
        out = torch.matmul(q, table.t()) if table.dim() == 2 else torch.einsum("bhcd,hrd->bhcr", q, table)
    if term.bias is not None:
        bias = term.bias.to(q.dtype)[:, None, :]
        out = bias.expand(q.shape[0], -1, q.shape[2], -1) if out is None else out + bias
    return out


def _mix_values(sums: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Probabilities summed per label (B, H, c, R) @ the value table -> (B, H, c, D)."""
    table = table.to(sums.dtype)
    return torch.matmul(sums, table) if table.dim() == 2 else torch.einsum("bhcr,hrd->bhcd", sums, table)


class _Band:
    """Clipped relative positions r = clip(j - i, -m, m) for c consecutive queries at positions
    p0.. against keys 0..K'-1, split in three column ranges: keys before `lo` all have label -m,
    keys from `hi` on all have label +m, and the window [lo, hi) (width c + 2m) holds the rest.
    Relation terms then cost O(c (c + m)) gathers plus two broadcasts instead of O(c K') ones."""

    def __init__(self, q_first: int, rows: int, keys: int, m: int, device: torch.device) -> None:
        self.m = m
        self.lo = max(0, q_first - m)
        self.hi = min(keys, q_first + rows + m)
        cols = torch.arange(self.lo, self.hi, device=device)
        qpos = torch.arange(q_first, q_first + rows, device=device)
        self.window = (cols[None, :] - qpos[:, None]).clamp(-m, m) + m  # (c, hi - lo)

    def add_scores(self, scores: torch.Tensor, label_scores: torch.Tensor) -> torch.Tensor:
        # softmax ignores a per-row constant: shifting by the label -m score empties the left range
        shifted = label_scores - label_scores[..., :1]
        index = self.window.expand(*scores.shape[:2], *self.window.shape)
        scores[..., self.lo : self.hi] += shifted.gather(-1, index)
        if self.hi < scores.shape[-1]:
            scores[..., self.hi :] += shifted[..., 2 * self.m :]
        return scores

    def label_sums(self, probs: torch.Tensor) -> torch.Tensor:
        size = 2 * self.m + 1
        index = self.window.expand(*probs.shape[:2], *self.window.shape)
        sums = probs.new_zeros(*probs.shape[:3], size).scatter_add(-1, index, probs[..., self.lo : self.hi])
        if self.lo > 0:
            sums = sums + F.pad(probs[..., : self.lo].sum(-1, keepdim=True), (0, size - 1))
        if self.hi < probs.shape[-1]:
            sums = sums + F.pad(probs[..., self.hi :].sum(-1, keepdim=True), (size - 1, 0))
        return sums


def _relational_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    rows: slice,
    bias_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None],
    terms: Sequence[RelationTerm],
    causal: bool,
    scale: float,
    dropout: float,
) -> torch.Tensor:
    """One chunk of queries q (B, H, c, D) against keys k_pos; see `relational_attention`."""
    q = q * scale
    scores = torch.matmul(q, k.transpose(-1, -2))
    qp = q_pos[rows]
    shape = scores.shape
    q_first = int(q_pos[0]) + rows.start
    placed = []  # (term, band or expanded labels)
    for term in terms:
        if term.labels is None:
            place = _Band(q_first, shape[2], shape[3], term.max_distance, q.device)
        else:
            place = term.labels[:, rows, : shape[3]][:, None].expand(shape)
        placed.append((term, place))
        label_scores = _label_scores(q, term)
        if label_scores is None:
            continue
        if isinstance(place, _Band):
            scores = place.add_scores(scores, label_scores)
        else:
            scores = scores + label_scores.gather(-1, place)
    bias = bias_fn(qp, k_pos)
    if mask is None and causal and bias is None:
        # only the last c keys can lie after a query of this chunk
        tail = slice(shape[3] - shape[2], shape[3])
        future = k_pos[tail][None, :] > qp[:, None]
        scores[..., tail] = scores[..., tail].masked_fill(future, torch.finfo(scores.dtype).min)
    else:
        add = _additive_mask(bias, mask, qp, k_pos, causal, scores.dtype)
        if add is not None:
            scores = scores.masked_fill(~add, torch.finfo(scores.dtype).min) if add.dtype == torch.bool else scores + add
    probs = torch.softmax(scores, dim=-1)
    if dropout > 0:
        probs = F.dropout(probs, p=dropout)
    out = torch.matmul(probs, v)
    for term, place in placed:
        if term.value is None:
            continue
        if isinstance(place, _Band):
            sums = place.label_sums(probs)
        else:
            sums = probs.new_zeros(*shape[:3], term.num_labels).scatter_add(-1, place, probs)
        out = out + _mix_values(sums, term.value)
    return out


def relational_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    bias_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None],
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    scale: float,
    dropout: float,
    terms: Sequence[RelationTerm] = (),
) -> torch.Tensor:
    """Relation-aware attention (Shaw et al. 2018, eqs. 3-4) in query chunks; (B, Hq, Q, D).

    Per chunk of c queries: scores q k^T * scale (B, H, c, K') plus the gathered label scores,
    mask, softmax, probs @ v plus (probs summed per label) @ A^V. Causal chunks stop at their
    last query's position (K' <= K). With gradients each chunk is checkpointed: the backward
    pass recomputes it, so no chunk's scores outlive it. Low-precision inputs run in float32.
    """
    batch, num_heads, q_len, _ = query.shape
    groups = num_heads // key.shape[1]
    dtype = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    q = query.to(dtype)
    k = key.repeat_interleave(groups, dim=1).to(dtype) if groups > 1 else key.to(dtype)
    v = value.repeat_interleave(groups, dim=1).to(dtype) if groups > 1 else value.to(dtype)
    k_len = k.shape[2]
    step = max(1, min(q_len, RELATION_CHUNK_ELEMENTS // max(1, batch * num_heads * k_len)))
    tables = [t for term in terms for t in (term.key, term.value, term.bias) if t is not None]
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *tables))
    outs = []
    for start in range(0, q_len, step):
        stop = min(q_len, start + step)
        # positions are contiguous: a causal chunk's last query sits at key index k_len - q_len + stop - 1
        k_stop = k_len - q_len + stop if causal else k_len
        m = None
        if mask is not None:
            m = mask[..., :k_stop] if mask.shape[-2] == 1 else mask[..., start:stop, :k_stop]
        fn = partial(
            _relational_chunk, q_pos=q_pos, k_pos=k_pos[:k_stop], rows=slice(start, stop), bias_fn=bias_fn,
            terms=terms, causal=causal, scale=scale, dropout=dropout,
        )
        args = (q[:, :, start:stop], k[:, :, :k_stop], v[:, :, :k_stop], m)
        outs.append(checkpoint(fn, *args, use_reentrant=False) if recompute else fn(*args))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.to(query.dtype)
