"""Shared contract of the sparse-attention variants (the "sparsity" axis of DESIGN.md).

A sparse variant says, for each query token, which key blocks it may read (`token_blocks`,
blocks of `block_size()` keys aligned to absolute key positions) and which tokens inside
those blocks it may attend (`allowed`). The engine's block-sparse path
(`hf_relattn.engine.block_sparse_attention`) takes, for each block of queries, the union of
its tokens' key blocks, gathers only those, and applies the exact token-level mask (the
pattern, causality, padding) inside them: compute and memory follow the kept blocks. Because
the choice is per token at absolute positions, decoding with a KV cache reads the same blocks
as the full forward does for that token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from .base import Variant, check_int_options

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

    def validate(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int]) -> None:
        if hasattr(self, "block_size"):
            check_int_options(self, "block_size")
        attached = [v for v in getattr(adapter.attention_modules(model)[layers[0]], "relattn_variants", ()) if v.name != self.name]
        clash = [v.name for v in attached if v.axis in ("scores", "sparsity")]
        if clash:
            raise ValueError(f"{self.name} cannot be combined with {clash} in the same layer (yet); valid: gqa")

    def pair_mask(self, module: nn.Module, q_pos: torch.Tensor, k_pos: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                  key_valid: torch.Tensor | None, query_valid: torch.Tensor | None = None) -> torch.Tensor | None:
        """The pattern as a (1|B, 1|H, Q, K) bool mask, causality and padding left to the caller:
        q_pos (1|B, Q) and k_pos (1|B, K) are positions in each sample's own sequence, key_valid
        (1|B, K) and query_valid (1|B, Q) say which tokens are not padding. For the
        materialised paths (reference, torch.compile, output_attentions); None = a dense layer.
        The default is the token rule, exact for patterns whose `choice` is "rule"."""
        return self.allowed(module, q_pos[:, None, :, None], k_pos[:, None, None, :], k_pos.shape[-1])
