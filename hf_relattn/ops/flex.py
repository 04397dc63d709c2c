"""Static sparse patterns as a FlexAttention block mask, run by compiled `flex_attention`: the
GPU path of the sparsity axis (see `flex_sparse_attention`)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from ..call import AttnCall

# From this many query tokens on, static sparse patterns on GPU run through compiled
# FlexAttention (compiling costs seconds per new shape, which only long sequences repay). On
# CPU it runs only when forced: torch 2.13 has no FlexAttention backward there, and in a
# benchmark alternating patterns it was slower than the block-sparse path (block masks rebuilt,
# recompiles).
FLEX_MIN_TOKENS = 4096
_compiled_flex: Callable[..., torch.Tensor] | None = None
_block_masks: dict[tuple[Any, ...], Any] = {}


def flex_sparse_attention(call: AttnCall, variant: Any, sinks: int = 0) -> torch.Tensor | None:
    """A static pattern (the same for every batch entry and head) as a FlexAttention BlockMask,
    run by compiled `flex_attention`; None for patterns chosen per head or per token.
    The first `sinks` keys are visible to every query."""
    global _compiled_flex
    query, key, value, mask, module, causal, scale = call.query, call.key, call.value, call.mask, call.module, call.causal, call.scale
    q_pos, _ = call.slots
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if variant.choice not in ("rule", "block"):
        return None
    batch, heads, q_len, _ = query.shape
    k_len = key.shape[2]
    block = variant.key_block(module)
    num_blocks = -(-k_len // block)
    chosen = variant.token_blocks(module, q_pos, num_blocks, query, key, None, causal=causal)
    if chosen is None or chosen.shape[:2] != (1, 1):
        return None
    # the mask transformers built holds padding and a native sliding window (Mistral's causal
    # one, ModernBERT's bidirectional one on its local layers): the pattern must intersect all
    # of it, not only its padded keys
    masked = mask is not None and mask.dtype == torch.bool
    allowed = mask[:, 0].expand(batch, q_len, k_len) if masked else None
    # every layer of a forward shares the pattern: build its block mask once
    # the variant and the mask are held weakly and compared by identity: an id reused by a
    # new object never finds another's block mask
    # an inference tensor has no version counter to tell an edit in place: built in every layer
    reuse = not (masked and mask.is_inference())
    cache_key = (q_len, k_len, causal, sinks, query.device, mask._version if masked and reuse else None)
    cached = _block_masks.get(cache_key) if reuse else None
    block_mask = None
    if cached is not None and cached[0]() is variant and (not masked or cached[1]() is mask):
        block_mask = cached[2]
    if block_mask is None:
        table, offset = chosen[0, 0], k_len - q_len

        def mask_mod(b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
            position = qi + offset
            keep = table[qi, ki // block]
            rule = variant.allowed(module, position, ki, k_len, causal=causal)
            if rule is not None:
                keep = keep & rule
            if sinks:
                keep = keep | (ki < sinks)
            if causal:
                keep = keep & (ki <= position)
            if allowed is not None:
                keep = keep & allowed[b, qi, ki]
            return keep

        _block_masks.clear()
        block_mask = create_block_mask(mask_mod, batch if masked else None, None, q_len, k_len,
                                       device=query.device, BLOCK_SIZE=128)
        if reuse:
            _block_masks[cache_key] = (weakref.ref(variant), weakref.ref(mask) if masked else None, block_mask)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=key.shape[1] != heads)
