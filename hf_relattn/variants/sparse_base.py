"""Shared contract of the sparse-attention variants (the "sparsity" axis, `variants.base.AXES`).

A sparse variant says, for each query token, which key blocks it may read (`token_blocks`,
blocks of `block_size()` keys aligned to absolute key positions) and which tokens inside
those blocks it may attend (`allowed`). Its `attend` (the sparsity axis, below) runs, in order:
the materialised formula for the "reference" path; the pattern's own kernel (`own_kernel`,
e.g. strided's layout); FlexAttention on GPU (`hf_relattn.ops.flex`); the block-sparse path
(`hf_relattn.ops.blocks`: for each block of queries, the union of its tokens' key blocks,
gathered, with the exact token-level mask inside them; a pattern may replace it with
`blocks_attention`, as MoBA's per-token gate does); SDPA for a layer the pattern leaves dense.
Because the choice is per token at absolute positions, decoding with a KV cache reads the same
blocks as the full forward does for that token.

`PatternVariant` adds attention sinks (Xiao et al. 2024, "Efficient Streaming Language Models
with Attention Sinks"): every query also sees the first `sinks` tokens of its own sample
(causality permitting), and with `sink_logit=True` a learnable logit per head joins the softmax
denominator (as GPT-OSS's `sinks`), letting a head attend to "nothing".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..call import AttnCall, alone, by_offset, offset_groups, padding_runs, positions
from ..ops import flash
from ..ops.blocks import block_sparse_attention, chosen_blocks, query_rows, selected_blocks
from ..ops.flex import FLEX_MIN_TOKENS, flex_sparse_attention
from ..ops.pieces import LayoutSinks
from ..patches import get_adapter
from ..paths import materialized_attention
from .base import Variant, attach, check_flag, check_int_options

if TYPE_CHECKING:
    from torch import nn

    from ..patches import FamilyAdapter


def block_range(first: torch.Tensor, last: torch.Tensor, num_blocks: int, block: int) -> torch.Tensor:
    """(Q, num_blocks) True for the key blocks overlapping token positions [first, last] (per query)."""
    blocks = torch.arange(num_blocks, device=first.device)
    return (blocks[None, :] >= first.clamp(min=0)[:, None] // block) & (blocks[None, :] <= last[:, None] // block)


def refuse_bidirectional(modules: list[Any], adapter: FamilyAdapter, layers: list[int], what: str) -> None:
    """Refuse a causal-only variant (`what` says why: "... a causal decoder") on any of `layers`
    that is bidirectional; every layer is checked (CLIPModel holds a causal and a bidirectional tower)."""
    bidirectional = [idx for idx in layers if not adapter.is_causal(modules[idx])]
    if bidirectional:
        raise ValueError(f"{what} a causal decoder (LLaMA); layers {bidirectional} of this {adapter.model_type} model are "
                         "bidirectional; valid families: llama")


@dataclass
class SparseVariant(Variant):
    """Base of the block-sparse variants; subclasses define the pattern."""

    axis = "sparsity"
    # How a token's choice of key blocks is decided, so the engine knows when the union of a
    # query block's choices needs each token masked to its own: "rule" (`allowed` alone gives
    # the exact pattern), "block" (the same for every token of an absolute key-block-sized
    # query block), "token" (per token, e.g. MoBA's gate).
    choice: ClassVar[str] = "rule"
    # False when the "reference" path runs the variant's own kernel (no independent check)
    reference_differs: ClassVar[bool] = True
    # True when the pattern depends on where tokens are in their own sequence (block boundaries,
    # sink blocks, token counts), not only on their distances: the engine then gives every
    # sample positions that start at its first real token (left padding moves nothing).
    absolute_positions: ClassVar[bool] = False

    @property
    def sequence_start(self) -> str | None:  # type: ignore[override]
        if not self.absolute_positions:
            return None
        return "positions" if self.choice == "rule" else "keys"  # gates and routers read the keys

    def key_block(self, module: nn.Module) -> int:
        """Tokens per key block (blocks start at absolute key position 0)."""
        return self.block_size

    def token_blocks(
        self, module: nn.Module, q_pos: torch.Tensor, num_blocks: int, query: torch.Tensor, key: torch.Tensor,
        key_valid: torch.Tensor | None, *, causal: bool,
    ) -> torch.Tensor | None:
        """(1|B, 1|H, Q, num_blocks) bool: the key blocks each query may read in a `causal` call
        (or a bidirectional one; blocks after the query are removed by the engine). None: this
        layer attends densely (e.g. MoBA's `dense_layers`)."""
        raise NotImplementedError

    def allowed(self, module: nn.Module, q_pos: torch.Tensor, k_pos: torch.Tensor, num_keys: int, *,
                causal: bool) -> torch.Tensor | None:
        """Token-level rule inside the read blocks of a `causal` (or bidirectional) call,
        broadcast over q_pos (..., 1) and k_pos (..., 1, K'), `num_keys` keys in all; None: every
        token of a read block (masking later keys and padding is the engine's)."""
        return None

    def check_options(self) -> None:
        super().check_options()
        if hasattr(self, "block_size"):
            check_int_options(self, "block_size")

    def pair_mask(self, module: nn.Module, q_pos: torch.Tensor, k_pos: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                  key_valid: torch.Tensor | None, query_valid: torch.Tensor | None = None, *, causal: bool) -> torch.Tensor | None:
        """The pattern as a (1|B, 1|H, Q, K) bool mask, causality and padding left to the caller:
        q_pos (1|B, Q) and k_pos (1|B, K) are positions in each sample's own sequence, key_valid
        (1|B, K) and query_valid (1|B, Q) say which tokens are not padding. For the
        materialised paths (reference, torch.compile, output_attentions); None = a dense layer.
        The default is the token rule, exact for patterns whose `choice` is "rule"."""
        return self.allowed(module, q_pos[:, None, :, None], k_pos[:, None, None, :], k_pos.shape[-1], causal=causal)

    # ---------------------------------------------------------------- attention
    def sink_tokens(self, module: nn.Module, num_keys: int) -> int:
        """Leading positions of a sample that every query sees (none without sinks)."""
        return 0

    def sink_logits(self, module: nn.Module) -> torch.Tensor | None:
        """The layer's (heads,) sink logits, or None."""
        return None

    def dense_pattern(self, call: AttnCall) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The pattern for the materialised path: (keep (1|B, 1|H, Q, K) or None for a dense
        layer, row weights (B, H, Q) of each (head, token) output or None, sink logits (H,) or None)."""
        q_pos, k_pos, valid, q_valid = positions(call, self.absolute_positions)
        pattern = self.pair_mask(call.module, q_pos, k_pos, call.query, call.key, valid, q_valid, causal=call.causal)
        sinks = self.sink_tokens(call.module, call.key.shape[2])
        if pattern is not None and sinks:
            pattern = pattern | (k_pos < sinks)[:, None, None, :]
        return pattern, None, self.sink_logits(call.module)

    def attend(self, call: AttnCall, rest: Callable[[AttnCall], torch.Tensor]) -> torch.Tensor:
        """The sparsity axis, (B, Q, H, D). Patterns tied to positions in each sample's own
        sequence run once per left-padding offset of the batch, on that offset's keys: each
        sample exactly as alone. A padded batch runs each sample's tokens alone, unmasked
        (`alone`), where that takes a faster path: training and prefill that the flash kernels
        serve unpadded, and decoding steps of these patterns (which run per offset anyway; MoBA's
        then read K and V once)."""
        if call.impl == "auto" and call.mask is not None and (
                flash.serves(call.replace(mask=None)) or (self.absolute_positions and call.lead)):
            runs = padding_runs(call)
            if runs is not None:
                return alone(call, runs, self.sparse_attention)
        if call.impl != "reference" and self.absolute_positions:
            groups = offset_groups(call, self.name)
            if groups is not None:
                return by_offset(call, groups, self.sparse_attention)
        return self.sparse_attention(call)

    def sparse_attention(self, call: AttnCall) -> torch.Tensor:
        """The pattern's own kernel, flex, the block-sparse path or the materialised reference; (B, Q, H, D)."""
        if call.impl == "reference":
            return materialized_attention(call, [self])[0].transpose(1, 2).contiguous()
        module, query, k_len = call.module, call.query, call.key.shape[2]
        sinks = self.sink_tokens(module, k_len)
        sink = self.sink_logits(module)
        out = self.own_kernel(call, sinks, sink) if call.impl == "auto" else None
        use_flex = call.impl == "flex" or (call.impl == "auto" and query.device.type == "cuda" and call.dropout == 0
                                           and query.shape[2] >= FLEX_MIN_TOKENS)
        if out is None and use_flex:
            out = None if sink is not None else flex_sparse_attention(call, self, sinks)
            if out is None and call.impl == "flex":
                raise ValueError(f"{self.name} (choice {self.choice!r}, sink_logit {getattr(self, 'sink_logit', False)}) "
                                 "has no FlexAttention form; use 'auto'")
        if out is None:
            q_pos, _ = call.slots
            num_blocks = -(-k_len // self.key_block(module))
            chosen = chosen_blocks(self, module, q_pos, num_blocks, query, call.key, call.key_valid(), call.causal)
            if chosen is None:  # a dense layer of the pattern
                if sink is not None:  # the sink logit still joins the softmax
                    return materialized_attention(call, [self])[0].transpose(1, 2).contiguous()
                return sdpa_attention_forward(module, query, call.key, call.value, call.mask, dropout=call.dropout,
                                              scaling=call.scale, is_causal=call.causal)[0]
            out = self.blocks_attention(call, chosen, sinks, sink)
        return out.transpose(1, 2).contiguous()

    def own_kernel(self, call: AttnCall, sinks: int, sink: torch.Tensor | None) -> torch.Tensor | None:
        """The pattern's own kernel for this call, (B, H, Q, D); None: the shared paths."""
        return None

    def blocks_attention(self, call: AttnCall, chosen: torch.Tensor, sinks: int, sink: torch.Tensor | None) -> torch.Tensor:
        """Attention over the key blocks `chosen` (1|B, 1|H, Q, N) per token; (B, H, Q, D)."""
        return block_sparse_attention(call, self, chosen, sinks, sink)

    def computed_pairs(self, module: nn.Module, q: torch.Tensor, k: torch.Tensor) -> float:
        """(query, key) pairs the block-sparse path computes per batch entry and head, averaged
        over heads: the gathered key blocks (whole blocks) times the query rows reading them
        (the work column of `hf-relattn bench kernels`)."""
        length = q.shape[2]
        block = self.key_block(module)
        chosen = chosen_blocks(self, module, torch.arange(length), -(-length // block), q, k, None, causal=True)
        rows = query_rows(self, block, length)
        _, valid = selected_blocks(chosen, rows)
        return float(valid.sum()) * block * rows / (valid.shape[0] * valid.shape[1])


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

    def layout_sinks(self, call: AttnCall, sinks: int, sink: torch.Tensor | None) -> LayoutSinks | None:
        """What an own layout adds to its pieces: the sink keys its pieces do not cover, the sink logit."""
        if not sinks and sink is None:
            return None
        return LayoutSinks(sinks, lambda i, j: self.allowed(call.module, i, j, 0, causal=call.causal), sink)

    def apply(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int], initialize: bool) -> None:
        if self.sequence_start == "positions":
            adapter.positions_from_mask(model)  # position_ids of left-padded calls count from each sample's first token
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
