"""Shared contract of the sparse-attention variants (the "sparsity" axis, `variants.base.AXES`).

A sparse variant says, for each query token, which key blocks it may read (`token_blocks`,
blocks of `block_size()` keys aligned to absolute key positions) and which tokens inside
those blocks it may attend (`allowed`). The engine's block-sparse path
(`hf_relattn.engine.block_sparse_attention`) takes, for each block of queries, the union of
its tokens' key blocks, gathers only those, and applies the exact token-level mask (the
pattern, causality, padding) inside them: compute and memory follow the kept blocks. Because
the choice is per token at absolute positions, decoding with a KV cache reads the same blocks
as the full forward does for that token.

`PatternVariant` adds attention sinks (Xiao et al. 2024, "Efficient Streaming Language Models
with Attention Sinks"): every query also sees the first `sinks` tokens of its own sample
(causality permitting), and with `sink_logit=True` a learnable logit per head joins the softmax
denominator (as GPT-OSS's `sinks`), letting a head attend to "nothing".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..patches import get_adapter
from .base import Variant, attach, check_flag, check_int_options

if TYPE_CHECKING:
    from torch import nn

    from ..patches import FamilyAdapter


def block_range(first: torch.Tensor, last: torch.Tensor, num_blocks: int, block: int) -> torch.Tensor:
    """(Q, num_blocks) True for the key blocks overlapping token positions [first, last] (per query)."""
    blocks = torch.arange(num_blocks, device=first.device)
    return (blocks[None, :] >= first.clamp(min=0)[:, None] // block) & (blocks[None, :] <= last[:, None] // block)


@dataclass
class SparseVariant(Variant):
    """Base of the block-sparse variants; subclasses define the pattern."""

    axis = "sparsity"
    # How a token's choice of key blocks is decided, so the engine knows when the union of a
    # query block's choices needs each token masked to its own: "rule" (`allowed` alone gives
    # the exact pattern), "block" (the same for every token of an absolute key-block-sized
    # query block), "token" (per token, e.g. MoBA's gate).
    choice: ClassVar[str] = "rule"
    # A pattern whose self-attention the engine runs in its own dense layout ("strided",
    # "fixed": pieces merged by log-sum-exp) instead of gathering key blocks; None: block path.
    layout: ClassVar[str | None] = None
    # True when the pattern depends on where tokens are in their own sequence (block boundaries,
    # sink blocks, token counts), not only on their distances: the engine then gives every
    # sample positions that start at its first real token (left padding moves nothing).
    absolute_positions: ClassVar[bool] = False

    def key_block(self, module: nn.Module) -> int:
        """Tokens per key block (blocks start at absolute key position 0)."""
        return self.block_size

    def token_blocks(
        self, module: nn.Module, q_pos: torch.Tensor, num_blocks: int, query: torch.Tensor, key: torch.Tensor,
        key_valid: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """(1|B, 1|H, Q, num_blocks) bool: the key blocks each query may read (causality is added
        by the engine). None: this layer attends densely (e.g. MoBA's `dense_layers`)."""
        raise NotImplementedError

    def allowed(self, module: nn.Module, q_pos: torch.Tensor, k_pos: torch.Tensor, num_keys: int) -> torch.Tensor | None:
        """Token-level rule inside the read blocks, broadcast over q_pos (..., 1) and k_pos
        (..., 1, K'), `num_keys` keys in all; None: every token of a read block (causality and
        padding are the engine's)."""
        return None

    def check_options(self) -> None:
        super().check_options()
        if hasattr(self, "block_size"):
            check_int_options(self, "block_size")

    def pair_mask(self, module: nn.Module, q_pos: torch.Tensor, k_pos: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                  key_valid: torch.Tensor | None, query_valid: torch.Tensor | None = None) -> torch.Tensor | None:
        """The pattern as a (1|B, 1|H, Q, K) bool mask, causality and padding left to the caller:
        q_pos (1|B, Q) and k_pos (1|B, K) are positions in each sample's own sequence, key_valid
        (1|B, K) and query_valid (1|B, Q) say which tokens are not padding. For the
        materialised paths (reference, torch.compile, output_attentions); None = a dense layer.
        The default is the token rule, exact for patterns whose `choice` is "rule"."""
        return self.allowed(module, q_pos[:, None, :, None], k_pos[:, None, None, :], k_pos.shape[-1])


# Sink tokens a pattern keeps visible by default: StreamingLLM's 4 (see the README's sink
# measurements on SmolLM2: 1, 4 and 16 sinks recover nearly the same perplexity).
DEFAULT_SINKS = 4
# Most sink tokens accepted (a sink is a key every query reads; thousands defeat the pattern).
MAX_SINKS = 4096
# Initial sink logit: its weight e^(-30 - lse) leaves a converted model unchanged (SmolLM2's
# logits move by 0 in float32: some of its heads have rows with log-sum-exps near -20, where
# -12 moved them by 1.6 and -25 by 6e-5). Finite, so it has a gradient (1e-11 .. 1e-21 on
# SmolLM2), far below AdamW's default epsilon (1e-8): train it with SINK_LOGIT_EPS (finetune
# puts sink logits in an AdamW group of their own), and Adam's normalised steps move it by
# about the learning rate per step.
SINK_LOGIT_INIT = -30.0
SINK_LOGIT_EPS = 1e-30
SINK_LOGIT = "relattn_sink_logit"  # the parameter, (heads,), on the attention module


@dataclass
class PatternVariant(SparseVariant):
    """A sparse pattern with attention sinks: `sinks` (the first tokens of each sample, visible to
    every query) and `sink_logit` (a learnable per-head logit in the softmax denominator).
    Saved specs from before these options existed meant neither (`legacy_options`)."""

    sinks: int = field(default=DEFAULT_SINKS, kw_only=True)
    sink_logit: bool = field(default=False, kw_only=True)

    legacy_options: ClassVar[dict[str, Any]] = {"sinks": 0, "sink_logit": False}
    extra_attributes: ClassVar[tuple[str, ...]] = (SINK_LOGIT,)  # what `detach` removes besides relattn_<name>*

    def check_options(self) -> None:
        super().check_options()
        check_int_options(self, "sinks", minimum=0, maximum=MAX_SINKS)  # first tokens every query sees
        check_flag(self, "sink_logit")

    @property
    def absolute_positions(self) -> bool:  # type: ignore[override]
        # sinks are the first tokens of each sample: positions in its own sequence (patterns
        # placed there anyway say so with a class attribute, which wins over this)
        return self.sinks > 0

    @property
    def heads_from_config(self) -> bool:  # type: ignore[override]
        return self.sink_logit  # one logit per head

    def sink_tokens(self, module: nn.Module, num_keys: int) -> int:
        """Leading positions of a sample that every query sees: `sinks`, after a spatial
        family's prefix tokens ([CLS], ...), which then are sinks too."""
        if not self.sinks:
            return 0
        adapter = get_adapter(module.config)
        prefix = adapter.token_grid(module.config, num_keys)[0] if adapter.spatial else 0
        return prefix + self.sinks

    def apply(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int], initialize: bool) -> None:
        for idx in layers:
            attn = adapter.attention_modules(model)[idx]
            if self.sink_logit:
                like = getattr(attn, adapter.q_proj).weight
                logit = torch.full((adapter.module_num_heads(attn),), SINK_LOGIT_INIT, device=like.device, dtype=like.dtype)
                setattr(attn, SINK_LOGIT, torch.nn.Parameter(logit))
            attach(attn, self)

    def sink_logits(self, module: nn.Module) -> torch.Tensor | None:
        """The layer's (heads,) sink logits, or None."""
        if not self.sink_logit:
            return None
        logit = getattr(module, SINK_LOGIT, None)
        if logit is None:
            raise ValueError(f"{self.name}: sink_logit=True adds a learned logit per head, which a flag cannot hold; "
                             f"use hf_relattn.convert(model, {self.name!r}, sink_logit=True)")
        return logit


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups of `model`'s trainable parameters: sink logits in a group of their
    own with SINK_LOGIT_EPS and no weight decay (which would pull them to 0 whatever the loss)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sinks = [p for n, p in named if n.endswith(SINK_LOGIT)]
    groups: list[dict[str, Any]] = [{"params": [p for n, p in named if not n.endswith(SINK_LOGIT)], "weight_decay": weight_decay}]
    if sinks:
        groups.append({"params": sinks, "weight_decay": 0.0, "eps": SINK_LOGIT_EPS})
    return groups
