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
positions 0..t (router scores of earlier tokens are kept per layer during generation), and it
attends to those tokens only. This is exactly what a full forward of the prefix 0..t computes
for its last token; earlier tokens were processed with the choices of their own steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .base import (
    INPUT,
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
SCORES = "_relattn_mosa_scores"  # router logits of the tokens so far, for generation


@register_variant
@dataclass
class MoSA(SparseVariant):
    sparsity: int = 8

    name = "mosa"
    heads_from_config = True
    description = ("Each head routes itself the top T/sparsity tokens (expert choice, learned sigmoid router, "
                   "new parameters: needs training).")
    paper = "Piękos, Csordás & Schmidhuber 2025, Mixture of Sparse Attention (MoSA)"
    limits = "Learned router (new parameters): needs training before use."
    choice = "expert"

    def validate(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int]) -> None:
        check_int_options(self, "sparsity")
        modules = adapter.attention_modules(model)
        if not getattr(modules[layers[0]], "is_causal", False):
            raise ValueError("mosa routes tokens of a causal decoder (LLaMA); valid families: llama")
        super().validate(model, adapter, layers)

    def apply(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int], initialize: bool) -> None:
        std = getattr(model.config, "initializer_range", 0.02) if initialize else None
        for idx in layers:
            attn = adapter.attention_modules(model)[idx]
            add_router(attn, adapter, MODULE_NAME, adapter.num_heads(model.config), std)
            attach(attn, self)

    def tokens(self, length: int) -> int:
        return min(max(2, length // self.sparsity), length)

    def router_logits(self, module: nn.Module, q_len: int, k_len: int) -> torch.Tensor:
        """(B, H, K) router logits of every key position: computed for the new tokens, kept
        from earlier calls for the cached ones (generation)."""
        new = getattr(module, MODULE_NAME)(layer_input(module)).transpose(1, 2).float()
        setattr(module, INPUT, None)  # do not hold on to the activations after the call
        if q_len == k_len:
            setattr(module, SCORES, new)
            return new
        past = getattr(module, SCORES, None)
        if past is not None and past.shape[-1] > k_len - q_len:
            # decoding again from an earlier (copied) cache: its positions are the first ones kept
            past = past[..., : k_len - q_len]
        if past is None or past.shape[-1] != k_len - q_len or past.shape[0] != new.shape[0]:
            raise ValueError(
                "mosa: decoding with a KV cache needs the router scores of the cached tokens, kept when this "
                "model built the cache; run the prompt through this model first (as generate() does)."
            )
        scores = torch.cat([past, new], dim=-1)
        setattr(module, SCORES, scores)
        return scores
