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

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer

from .base import (
    CACHE,
    add_router,
    attach,
    check_int_options,
    layer_input,
    register_variant,
)
from .sparse_base import SparseVariant

if TYPE_CHECKING:
    from ..patches import FamilyAdapter

MODULE_NAME = "relattn_mosa"


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
    looks_ahead = True

    def check_options(self) -> None:
        super().check_options()
        check_int_options(self, "sparsity")

    def check_model(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int]) -> None:
        modules = adapter.attention_modules(model)
        if not getattr(modules[layers[0]], "is_causal", False):
            raise ValueError("mosa routes tokens of a causal decoder (LLaMA); valid families: llama")
        super().check_model(model, adapter, layers)

    def apply(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int], initialize: bool) -> None:
        std = getattr(model.config, "initializer_range", 0.02) if initialize else None
        for idx in layers:
            attn = adapter.attention_modules(model)[idx]
            add_router(attn, adapter, MODULE_NAME, adapter.num_heads(model.config), std)
            attach(attn, self)

    absolute_positions = True  # token counts are those of each sample's own sequence

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
