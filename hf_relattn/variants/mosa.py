"""MoSA, Mixture of Sparse Attention: Piękos, Csordás & Schmidhuber 2025, "Mixture of Sparse
Attention: Content-Based Learnable Sparse Attention via Expert-Choice Routing".

Every head is an expert that chooses the tokens it processes: a router r = sigmoid(x W_r)
scores each token for each head (x = the attention block's input), the head keeps its
k = max(2, T // sparsity) best tokens (expert choice), attends among them with the causal mask
on their original positions, multiplies each output by the token's router score and puts it
back at its position; tokens a head did not choose get nothing from it. The router is new
(one `relattn_mosa` linear layer per converted layer, initialised like transformers' linear
layers) and MoSA changes what every head computes, so a converted model needs training.
As in this plugin's conversions, the projections still run on every token (a later layer may
need any token), so the saving is in the attention itself: O(k^2) per head instead of O(T^2).

Selection and time. In a full forward the choice is the paper's: the top k of the whole
sequence, so whether token t is chosen depends on the scores of later tokens too (the paper
trains this way). Generation must not look ahead: with a KV cache, the new token at position t
is processed by a head only if it is among the top max(2, (t + 1) // sparsity) tokens of
positions 0..t, and it attends to those tokens only. In the first layer this is exactly what a
full forward of the prefix 0..t computes for its last token; deeper layers attend to keys that
earlier steps cached, computed with the choices of their own steps, so cached generation differs
from uncached generation (`use_cache=False`, a full forward per step) past the first layer, and
speculative decoding (a forward over prompt and draft tokens at once) is refused. The router scores of the cached tokens live in the KV cache itself (its layer
object gains a `relattn_scores` tensor that follows the cache through beam reordering, batch
selection and cropping), so two conversations decoded alternately never mix.

Counts and positions are those of each sample's own tokens: padding never competes, and a
padded sample chooses what it chooses alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer

from .base import (
    CACHE,
    LAYER_INPUT,
    add_router,
    attach,
    check_int_options,
    layer_input,
    register_variant,
)
from ..call import AttnCall, positions
from .sparse_base import SparseVariant, refuse_bidirectional

if TYPE_CHECKING:
    from ..patches import FamilyAdapter

MODULE_NAME = "relattn_mosa"
ROUTER = "mosa_router"  # the call's router logits (AttnCall.per_key)


@register_variant
@dataclass
class MoSA(SparseVariant):
    sparsity: int = 8

    name = "mosa"
    heads_from_config = True
    description = ("Each head routes itself the top T/sparsity tokens (expert choice, learned sigmoid router, "
                   "new parameters: needs training).")
    paper = "Piękos, Csordás & Schmidhuber 2025, Mixture of Sparse Attention (MoSA)"
    limits = ("Learned router (new parameters): needs training before use. Expert choice over a whole sequence "
              "is not causal: generation with the KV cache decodes token by token (each token chooses among the "
              "tokens up to itself), which differs from uncached generation past the first layer; assisted and "
              "prompt-lookup decoding are refused.")
    choice = "expert"
    reference_differs = False  # heads choosing tokens have one formula: `expert_choice_attention` on every path
    looks_ahead = True

    def check_options(self) -> None:
        super().check_options()
        check_int_options(self, "sparsity")

    def check_model(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int]) -> None:
        modules = adapter.attention_modules(model)
        refuse_bidirectional(modules, adapter, layers, "mosa routes tokens of")
        super().check_model(model, adapter, layers)

    def apply(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int], initialize: bool) -> None:
        std = getattr(model.config, "initializer_range", 0.02) if initialize else None
        for idx in layers:
            attn = adapter.attention_modules(model)[idx]
            add_router(attn, adapter, MODULE_NAME, adapter.num_heads(attn.config), std)
            attach(attn, self)

    absolute_positions = True  # token counts are those of each sample's own sequence

    def attend(self, call: AttnCall, rest: Callable[[AttnCall], torch.Tensor]) -> torch.Tensor:
        # the router once per call (it appends to the cache's scores), cut with the keys when
        # the batch runs by left-padding offset
        return super().attend(call.replace(per_key={**call.per_key, ROUTER: self.call_router_logits(call)}), rest)

    def sparse_attention(self, call: AttnCall) -> torch.Tensor:
        """Heads choose their tokens (`expert_choice_attention`), on every path; (B, Q, H, D)."""
        return expert_choice_attention(call, self, call.per_key[ROUTER]).transpose(1, 2).contiguous()

    def dense_pattern(self, call: AttnCall) -> tuple[torch.Tensor, torch.Tensor, None]:
        keep, gate = expert_choice_pattern(call, self, self.call_router_logits(call))
        return keep, gate, None

    @classmethod
    def bench_variants(cls, suite: str, length: int) -> list[MoSA]:
        return [cls(sparsity=8)] if suite == "sparse" else []

    def bench_setup(self, module: nn.Module, generator: torch.Generator) -> Callable[[torch.Tensor], dict[str, Any]]:
        # a random router over random layer inputs, passed as the attention block's pre-hook would
        heads, head_dim = module.num_heads, module.head_dim
        router = nn.Linear(heads * head_dim, heads, bias=False)
        with torch.no_grad():
            router.weight.copy_(0.02 * torch.randn(router.weight.shape, generator=generator))
        setattr(module, MODULE_NAME, router)
        inputs = torch.randn(1, module.bench_length, heads * head_dim, generator=generator)
        return lambda q: {LAYER_INPUT: inputs[:, : q.shape[2]].expand(q.shape[0], -1, -1).to(q.dtype)}

    def computed_pairs(self, module: nn.Module, q: torch.Tensor, k: torch.Tensor) -> float:
        chosen = self.tokens(q.shape[2])  # causal pairs among the chosen tokens of each head
        return chosen * (chosen + 1) / 2

    def call_router_logits(self, call: AttnCall) -> torch.Tensor:
        """`router_logits` of the call (once per call: it appends to the cache's scores)."""
        return self.router_logits(call.module, call.inputs, call.query.shape[2], call.key.shape[2], call.lead)

    def tokens(self, length: int) -> int:
        return min(max(2, length // self.sparsity), length)

    def token_counts(self, lengths: torch.Tensor) -> torch.Tensor:
        """`tokens` of each length in a tensor."""
        return torch.minimum(torch.clamp(torch.div(lengths, self.sparsity, rounding_mode="floor"), min=2), lengths)

    def router_logits(self, module: nn.Module, inputs: dict, q_len: int, k_len: int, cached: Any) -> torch.Tensor:
        """(B, H, cached + Q) router logits of every key position: computed for this call's
        tokens, taken from the KV cache for the `cached` ones before them (kept there when the
        cache was filled)."""
        # float64, then float32: repeated tokens score exactly alike however many rows a call
        # has (a float32 matmul's rounding depends on its shape), so ties break the same way in a
        # full forward and in a decoding step
        router = getattr(module, MODULE_NAME)
        new = torch.nn.functional.linear(layer_input(module, inputs).double(), router.weight.double()).float().transpose(1, 2)
        cache = inputs.get(CACHE)
        if torch.compiler.is_compiling():
            # dynamo cannot give a cache layer its scores (a class change): a compiled full forward
            # leaves the cache without them, and decoding from it says so
            if isinstance(cached, torch.Tensor) or cached:
                raise ValueError("mosa: decoding from a KV cache under torch.compile is not supported; compile the full "
                                 "forward only, and decode without compiling")
            return new
        layer = None if cache is None else scores_layer(cache, module.layer_idx)
        if cached == 0:
            if layer is not None:
                layer.relattn_scores = new
            return new
        past = None if layer is None else layer.relattn_scores
        if past is None or past.shape[-1] < cached or past.shape[0] != new.shape[0]:
            raise ValueError(
                "mosa: decoding with a KV cache needs the router scores of the cached tokens, kept in the cache when "
                "this model filled it outside torch.compile; run the prompt through this model with that cache first "
                "(as generate() does)."
            )
        scores = torch.cat([past[..., :cached], new], dim=-1)  # a longer past: the cache was cropped or copied
        layer.relattn_scores = scores
        return scores


class RouterScores:
    """Marker of KV-cache layers that also hold MoSA's router scores (B, H, T) of their tokens
    (`relattn_scores`), kept in step with the keys when the cache is reordered (beam search),
    selected, repeated or reset (see `_scored_class`)."""

    relattn_scores: torch.Tensor | None = None


def _scored_class(base: type) -> type:
    """`base` (a cache layer class) with router scores: the same object layout, so a layer of
    the cache can take it in place."""

    def follow(name: str, change: Any) -> Any:
        def method(self: Any, *args: Any) -> None:
            getattr(base, name)(self, *args)
            if self.relattn_scores is not None:
                self.relattn_scores = change(self.relattn_scores, *args)
        return method

    methods = {
        "reorder_cache": follow("reorder_cache", lambda s, idx: s.index_select(0, idx.to(s.device))),
        "batch_repeat_interleave": follow("batch_repeat_interleave", lambda s, n: s.repeat_interleave(n, dim=0)),
        "batch_select_indices": follow("batch_select_indices", lambda s, idx: s[idx]),
        "reset": follow("reset", lambda s: None),
    }
    methods = {name: fn for name, fn in methods.items() if hasattr(base, name)}
    return type("RouterScores" + base.__name__, (base, RouterScores), {**methods, "__module__": __name__})


_scored: dict[type, type] = {}
# the cache layers of transformers' dynamic and static caches, ready before any traced call
for _base in (DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer):
    _scored[_base] = _scored_class(_base)
    globals()[_scored[_base].__name__] = _scored[_base]


def scores_layer(cache: Any, layer_idx: int) -> Any:
    """The layer object of `cache` for `layer_idx`, made to carry router scores (its class
    becomes a `RouterScores` subclass of its own, in place, on first use)."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        raise ValueError(f"mosa: cannot keep router scores in a {type(cache).__name__}; use a DynamicCache or StaticCache")
    layer = layers[layer_idx]
    if not isinstance(layer, RouterScores):
        base = type(layer)
        if base not in _scored:
            _scored[base] = _scored_class(base)
            globals()[_scored[base].__name__] = _scored[base]
        layer.__class__ = _scored[base]
    return layer


def expert_choice_pattern(call: AttnCall, variant: MoSA, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MoSA as a mask: (keep (B, H, Q, K), gate (B, H, Q): the router score of tokens a head
    processes, 0 for the others). In a full forward each head keeps the top `tokens(n)` of
    its sample's n tokens; a query after cached keys (decoding) chooses among the tokens up to
    itself, as in `expert_choice_attention`. Padding never competes."""
    batch, heads, q_len, _ = call.query.shape
    k_len = call.key.shape[2]
    if logits.shape[-1] < k_len:  # an uncropped static cache: empty slots after the filled ones
        logits = F.pad(logits, (0, k_len - logits.shape[-1]))
    _, _, valid, _ = positions(call, absolute=True)
    valid = valid if valid is not None else torch.ones(1, k_len, dtype=torch.bool, device=logits.device)
    k_slots, q_slots = torch.arange(k_len, device=logits.device), call.q_slots
    if isinstance(call.lead, int) and call.lead == 0:  # a full forward: one choice over each sample
        horizon = valid[:, None, None, :]  # (1|B, 1, 1, K)
    else:  # each query among the valid tokens up to itself
        horizon = valid[:, None, None, :] & (k_slots[None, :] <= q_slots[:, None])[None, None]  # (1|B, 1, Q, K)
    ranked = logits[:, :, None, :].masked_fill(~horizon, float("-inf"))
    order = torch.argsort(ranked, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(k_len, device=order.device).expand_as(order))
    count = variant.token_counts(horizon.sum(-1, keepdim=True))
    chosen = (rank < count) & horizon  # (B, H, 1|Q, K)
    processed = chosen.expand(batch, heads, q_len, k_len).gather(-1, q_slots[None, None, :, None].expand(batch, heads, q_len, 1))[..., 0]
    keep = chosen & processed[..., None]
    gate = torch.sigmoid(logits).gather(-1, q_slots[None, None, :].expand(batch, heads, q_len)) * processed
    return keep, gate


def _top_tokens(scores: torch.Tensor, count: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions of the `count` best scores per row, ascending; ties go to the earlier position
    (repeated tokens score alike, so the rule must not depend on the sort kernel). `count`: an
    int, or one per batch entry (B,): then (positions (B, H, most), taken (B, H, most)), the
    rows past their count marked not taken (their positions repeat the last one)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    if isinstance(count, int):
        return order[..., :count].sort(dim=-1).values, None
    most, length = int(count.max()), scores.shape[-1]
    taken = torch.arange(most, device=scores.device) < count[:, None, None]
    chosen = torch.where(taken, order[..., :most], length).sort(dim=-1).values
    return chosen.clamp(max=length - 1), chosen < length


def expert_choice_attention(call: AttnCall, variant: MoSA, logits: torch.Tensor) -> torch.Tensor:
    """Heads that choose their tokens (MoSA): each head attends among its chosen tokens only
    (causally by original position), scales by the router score and writes back at the chosen
    positions; (B, H, Q, D), zero where a head chose nothing. A full forward chooses over the
    whole sequence; with a KV cache each new token at position t is processed by the heads for
    which it is among the top tokens of positions 0..t (see `hf_relattn.variants.mosa`).
    `logits` (B, H, K): the router's, of every key. Padding keys never compete, and counts are
    those of each sample's own tokens."""
    query, key, value, scale, dropout = call.query, call.key, call.value, call.scale, call.dropout
    batch, heads, q_len, dim = query.shape
    k_len = key.shape[2]
    groups = heads // key.shape[1]
    valid = call.key_valid()
    ranked = logits if valid is None else logits.masked_fill(~valid[:, None, :], float("-inf"))
    b_idx = torch.arange(batch, device=query.device)[:, None, None]
    kv_idx = (torch.arange(heads, device=query.device) // groups)[None, :, None]
    lowest = torch.finfo(query.dtype).min

    def count(upto: int) -> int | torch.Tensor:
        """Tokens each head keeps among the first `upto` keys (of each sample's valid ones)."""
        if valid is None:
            return variant.tokens(upto)
        return variant.token_counts(valid[:, :upto].sum(-1))

    def attend(q: torch.Tensor, idx: torch.Tensor, allowed: torch.Tensor | None, taken: torch.Tensor | None) -> torch.Tensor:
        """q (B, H, r, D) over the chosen keys idx (B, H, n), allowed (B, H, r, n); None: causal
        among the chosen (ascending positions, no padding), SDPA's causal kernel. `taken`
        (B, H, n): which chosen entries are real (None: all)."""
        if allowed is None and valid is None and taken is None:
            return F.scaled_dot_product_attention(q, key[b_idx, kv_idx, idx], value[b_idx, kv_idx, idx], is_causal=True,
                                                  dropout_p=dropout, scale=scale)
        if allowed is None:
            allowed = idx[..., :, None] >= idx[..., None, :]
        if valid is not None:
            allowed = allowed & valid.gather(1, idx.flatten(1)).view(batch, heads, 1, -1)
        if taken is not None:
            allowed = allowed & taken[..., None, :]
        bias = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill_(~allowed, lowest)
        return F.scaled_dot_product_attention(q, key[b_idx, kv_idx, idx], value[b_idx, kv_idx, idx], attn_mask=bias,
                                              dropout_p=dropout, scale=scale)

    # the call's own boolean mask where it says more than padding and causality (a model's native
    # sliding window): (B, Q, K), applied to the chosen pairs
    seen = call.mask[:, 0].expand(batch, q_len, k_len) if call.mask is not None and call.mask.dtype == torch.bool else None
    gates = torch.sigmoid(logits).to(query.dtype)
    if q_len == k_len:
        idx, taken = _top_tokens(ranked, count(k_len))  # (B, H, n)
        chosen_q = query.gather(2, idx[..., None].expand(-1, -1, -1, dim))
        allowed = None
        if seen is not None:
            rows = seen[:, None].expand(batch, heads, q_len, k_len).gather(2, idx[..., None].expand(-1, -1, -1, k_len))
            allowed = rows.gather(3, idx[:, :, None, :].expand(-1, -1, idx.shape[-1], -1))
        out = attend(chosen_q, idx, allowed, taken) * gates.gather(-1, idx)[..., None]
        # rows that are not taken go to a spare row q_len, dropped after the scatter
        where = idx if taken is None else torch.where(taken, idx, q_len)
        full = query.new_zeros(batch, heads, q_len + 1, value.shape[-1])
        return full.scatter(2, where[..., None].expand(-1, -1, -1, out.shape[-1]), out)[:, :, :q_len]
    outs = []
    for a in range(q_len):  # decoding: each new token chooses among the tokens up to itself
        t = k_len - q_len + a
        idx, taken = _top_tokens(ranked[..., : t + 1], count(t + 1))
        hit = idx == t if taken is None else (idx == t) & taken
        allowed = torch.ones(batch, heads, 1, idx.shape[-1], dtype=torch.bool, device=query.device)
        if seen is not None:
            allowed = seen[:, a][:, None, :].expand(batch, heads, k_len).gather(-1, idx)[:, :, None, :]
        out = attend(query[:, :, a : a + 1], idx, allowed, taken)
        outs.append(torch.where(hit.any(-1)[..., None, None], out * gates[..., t, None, None], 0.0))
    return torch.cat(outs, dim=2)
