"""A bounded KV cache for long generation: `StreamingCache` (Xiao et al. 2024, "Efficient
Streaming Language Models with Attention Sinks", StreamingLLM).

A decoder layer whose attention is a causal sliding window of `window` keys with `sinks` sink
tokens never reads a key that is neither among the first `sinks` tokens of its sample nor among
the last `window`; such keys can leave the cache for good. `StreamingCache(model)` gives those
layers a `StreamingLayer`, which after every attention call keeps the leading slots (the
samples' left padding and their sinks) and the last `window - 1` keys (the next token reads
them), evicting in steps of `block_size` tokens so that a layer holds at most
`sinks + window + block_size` keys (plus left padding) whatever the generation length. Other
layers keep everything (a `DynamicLayer`).

Keys are cached after RoPE at their original positions, and transformers keeps counting
positions from the cache's full length, so eviction is exact: greedy tokens equal those of a
generation with the whole cache (tested over hundreds of tokens). Unlike StreamingLLM, which
renumbers positions inside its cache to stay within the trained range, positions here keep
growing: past `max_position_embeddings` the model sees positions it was never trained on, as
it would with the whole cache (exact, not extrapolated).

The engine reads the kept layout through the call's cache (`StreamingLayer.kept_mask`) and
calls `evict` after each attention call of the layer. After keys were evicted the cache
decodes one token per call (transformers' generate); calls with several new tokens then, and
rolling back (assisted decoding's `crop`), are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .engine import module_variants
from .patches import get_adapter
from .variants.base import track_input


class StreamingLayer(DynamicLayer):
    """A dynamic cache layer that evicts keys a causal sliding window with sinks cannot see any
    more: slots [0, prefix) and the last `recent` keys stay, `dropped` counts the evicted ones
    between them (positions of later keys keep counting them)."""

    is_croppable = False

    def __init__(self, sinks: int, recent: int, slack: int) -> None:
        super().__init__()
        self.sinks, self.recent, self.slack = sinks, recent, slack
        self.prefix: int | None = None  # set at the first eviction (left padding + sinks)
        self.dropped = 0

    def get_seq_length(self) -> int:
        return super().get_seq_length() + self.dropped

    def held(self) -> int:
        """Keys this layer holds now."""
        return super().get_seq_length()

    def kept_positions(self, device: torch.device) -> torch.Tensor:
        """Original positions of the held keys."""
        held = self.held()
        if not self.dropped:
            return torch.arange(held, device=device)
        return torch.cat([torch.arange(self.prefix, device=device),
                          torch.arange(self.prefix + self.dropped, self.dropped + held, device=device)])

    def kept_mask(self, mask: torch.Tensor | None, q_len: int, k_len: int) -> torch.Tensor | None:
        """The attention mask of the held keys (transformers builds it over every position)."""
        if not self.dropped:
            return mask
        if q_len > 1:
            raise ValueError(
                f"StreamingCache: a call with {q_len} new tokens after keys were evicted; decode one token per call "
                "(model.generate does), or use a DynamicCache"
            )
        if mask is None or mask.shape[-1] == k_len:
            return mask
        return mask[..., self.kept_positions(mask.device)]

    def evict(self, key_valid: Callable[[], torch.Tensor | None]) -> None:
        """After an attention call: drop what no later query can see. `key_valid()` (B, K): keys
        that are not padding, from the call's mask, read at the first eviction only (padding
        leads each row: it stays, with the sinks behind it)."""
        held = self.held()
        if self.prefix is None:
            valid = key_valid()
            first = 0 if valid is None else int(valid.int().argmax(-1).max())
            self.prefix = first + self.sinks
        if held - self.prefix <= self.recent + self.slack:
            return
        keep = slice(held - self.recent, held)
        self.keys = torch.cat([self.keys[..., : self.prefix, :], self.keys[..., keep, :]], dim=-2)
        self.values = torch.cat([self.values[..., : self.prefix, :], self.values[..., keep, :]], dim=-2)
        self.dropped += held - self.prefix - self.recent

    def crop(self, tokens_to_remove: int) -> None:
        if self.dropped:
            raise ValueError("StreamingCache: cannot roll back a layer that evicted keys (assisted decoding crops the cache)")
        super().crop(tokens_to_remove)

    def reset(self) -> None:
        super().reset()
        self.prefix, self.dropped = None, 0


def streaming_window(module: nn.Module) -> Any:
    """The causal sliding-window variant acting in an attention module, or None."""
    if not getattr(module, "is_causal", False):
        return None
    return next((v for v in module_variants(module) if v.name == "sliding_window"), None)


class StreamingCache(DynamicCache):
    """`cache = hf_relattn.StreamingCache(model)`, then `model.generate(ids, cache=cache,
    max_new_tokens=N)`: layers running a causal sliding window hold at most
    `sinks + window + block_size` keys (plus left padding), the others everything (see the
    module doc). Raises if no layer of `model` runs a causal sliding window."""

    def __init__(self, model: nn.Module) -> None:
        layers: list[DynamicLayer] = []
        for attn in get_adapter(model).attention_modules(model):
            window = streaming_window(attn)
            if window is None:
                layers.append(DynamicLayer())
                continue
            layers.append(StreamingLayer(window.sinks, window.window - 1, window.block_size))
            track_input(attn)  # the engine reads the layer through the call's cache
        if not any(isinstance(layer, StreamingLayer) for layer in layers):
            raise ValueError(
                "StreamingCache bounds layers whose attention is a causal sliding window (hf_relattn.convert(model, "
                "'sliding_window', window=W, sinks=S) or attn_implementation='relattn_sliding_window'); this model has none"
            )
        Cache.__init__(self, layers=layers)
