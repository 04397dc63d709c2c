"""MoBA, Mixture of Block Attention: Lu et al. 2025, "MoBA: Mixture of Block Attention for
Long-Context LLMs".

Keys are split into blocks of `block_size`. Each query token reads its own block (causally)
and the `top_k - 1` earlier blocks whose mean key has the largest dot product with it (so
`top_k` counts the own block, as in the paper). The gate is computed per token and per head
from the current keys (padding keys excluded from the means), so a decoding step chooses its
blocks from the KV cache exactly as the full forward does for that token: decoding is sparse
too. The engine gathers, per block of queries, the union of its tokens' choices and masks each
token to its own. `dense_layers=N` keeps the last N layers full (the paper's hybrid).

`gate="token"` (default) is the paper's per-token gate: exact, and decoding equals the full
forward; the engine computes exactly the chosen (token, block) pairs, key block by key block.
`gate="block"` gates a whole query block (aligned to the key blocks) by its mean query, so all
its tokens read the same top_k blocks and the block-sparse path runs fused SDPA on them; a
decoding step is then a query block of one token (its own gate), so decoding is not the same
computation as the full forward.
Parameter-free: the gate has no weights (flag or convert). Decoder-only (causal).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import MAX_TABLE_ROWS, check_choice, check_int_options, register_variant
from .sparse_base import PatternVariant

GATES = ("token", "block")


@register_variant
@dataclass
class MoBA(PatternVariant):
    block_size: int = 512
    top_k: int = 3
    dense_layers: int = 0
    gate: str = "token"

    name = "moba"
    flag = True

    @property
    def choice(self) -> str:  # type: ignore[override]
        return "token" if self.gate == "token" else "block"
    description = "Each token reads its own key block and the top_k-1 earlier blocks whose mean key matches its query best (MoBA)."
    paper = "Lu et al. 2025, MoBA: Mixture of Block Attention for Long-Context LLMs"
    limits = (
        "A dense-pretrained model loses quality under block gating until trained; decoding is slower "
        "than dense at 8k context on CPU (each step gathers every head's chosen K/V blocks)."
    )

    def check_options(self) -> None:
        super().check_options()
        check_int_options(self, "top_k", maximum=MAX_TABLE_ROWS)
        check_choice(self, "gate", GATES)
        check_int_options(self, "dense_layers", minimum=0, maximum=MAX_TABLE_ROWS)

    def check_model(self, model, adapter, layers) -> None:
        modules = adapter.attention_modules(model)
        if not getattr(modules[layers[0]], "is_causal", False):
            raise ValueError("moba gates over earlier key blocks and needs a causal decoder (LLaMA); valid families: llama")
        if self.dense_layers > len(modules):
            raise ValueError(f"moba: dense_layers ({self.dense_layers}) exceeds the model's {len(modules)} layers")
        super().check_model(model, adapter, layers)

    absolute_positions = True  # key blocks start at each sample's first token

    def _dense(self, module) -> bool:
        return bool(self.dense_layers) and module.layer_idx >= module.config.num_hidden_layers - self.dense_layers

    def choose(self, q_pos: torch.Tensor, k_pos: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
               key_valid: torch.Tensor | None, query_valid: torch.Tensor | None, num_blocks: int,
               contiguous: bool = False) -> torch.Tensor:
        """(B, H, Q, num_blocks) bool: each query's own block and its top_k - 1 earlier blocks by
        q . mean(key block). Positions q_pos (1|B, Q), k_pos (1|B, K) in each sample's own
        sequence; padding keys (key_valid (1|B, K) False) are left out of the means and their
        blocks, padding queries (query_valid (1|B, Q) False) out of a block gate's mean query.
        `contiguous`: the keys are at positions 0..K-1 and the queries consecutive (the eager
        paths), so blocks are reshapes rather than scatters."""
        batch, heads, q_len, dim = query.shape
        kv_heads, k_len = key.shape[1], key.shape[2]
        bs = self.block_size
        valid = key_valid if key_valid is not None else torch.ones(1, k_len, dtype=torch.bool, device=key.device)
        last = num_blocks - 1
        weights = valid.float().expand(batch, k_len)
        weighted = key.float() if key_valid is None else key.float() * weights[:, None, :, None]
        if contiguous:
            pad = num_blocks * bs - k_len
            sums = F.pad(weighted, (0, 0, 0, pad)).view(batch, kv_heads, num_blocks, bs, dim).sum(3)
            counts = F.pad(weights, (0, pad)).view(batch, num_blocks, bs).sum(-1)
        else:
            k_block = torch.div(k_pos, bs, rounding_mode="floor").clamp(0, last).expand(batch, k_len)
            index = k_block[:, None, :, None].expand(-1, kv_heads, -1, dim)
            sums = key.new_zeros(batch, kv_heads, num_blocks, dim, dtype=torch.float32).scatter_add_(2, index, weighted)
            counts = weights.new_zeros(batch, num_blocks).scatter_add_(1, k_block, weights)
        means = (sums / counts.clamp(min=1)[:, None, :, None]).repeat_interleave(heads // kv_heads, dim=1)
        own = torch.div(q_pos, bs, rounding_mode="floor")  # (1|B, Q)
        query = query.float()
        if self.gate == "block":
            # one gate per query block: the mean of its real queries among this call's
            real = (query_valid if query_valid is not None else own >= 0).float().expand(batch, q_len)
            weighted_q = query if query_valid is None else query * real[:, None, :, None]
            if contiguous:
                front = int(q_pos[0, 0]) % bs
                count = -(-(front + q_len) // bs)
                back = count * bs - front - q_len
                q_sums = F.pad(weighted_q, (0, 0, front, back)).view(batch, heads, count, bs, dim).sum(3)
                q_counts = F.pad(real, (front, back)).view(batch, count, bs).sum(-1)
                q_means = q_sums / q_counts.clamp(min=1)[:, None, :, None]
                # gate per query block, then per token (N scores per token, not D)
                gate = torch.matmul(q_means, means.transpose(-1, -2)).repeat_interleave(bs, dim=2)[:, :, front : front + q_len]
            else:
                q_block = own.clamp(0, last).expand(batch, q_len)
                index = q_block[:, None, :, None].expand(-1, heads, -1, dim)
                q_sums = query.new_zeros(batch, heads, num_blocks, dim).scatter_add_(2, index, weighted_q)
                q_counts = real.new_zeros(batch, num_blocks).scatter_add_(1, q_block, real)
                query = (q_sums / q_counts.clamp(min=1)[:, None, :, None]).gather(2, index)
        if not (contiguous and self.gate == "block"):
            gate = torch.matmul(query, means.transpose(-1, -2))  # (B, H, Q, N)
        blocks = torch.arange(num_blocks, device=query.device)
        own = own[:, None, :, None]
        earlier = (blocks < own) & (counts > 0)[:, None, None, :]
        chosen = blocks == own
        picks = min(self.top_k - 1, num_blocks)
        if picks > 0:
            gate = gate.masked_fill(~earlier, float("-inf"))
            top = gate.topk(picks, dim=-1)
            chosen = chosen | (torch.zeros_like(gate, dtype=torch.bool).scatter_(-1, top.indices, True) & earlier)
        return chosen.expand(batch, heads, -1, -1)

    def token_blocks(self, module, q_pos, num_blocks, query, key, key_valid):
        if self._dense(module):
            return None
        k_pos = torch.arange(key.shape[2], device=q_pos.device)[None]
        q_valid = None if key_valid is None else key_valid[:, key.shape[2] - q_pos.shape[0] :]
        return self.choose(q_pos[None], k_pos, query, key, key_valid, q_valid, num_blocks, contiguous=True)

    def pair_mask(self, module, q_pos, k_pos, query, key, key_valid, query_valid=None):
        if self._dense(module):
            return None
        num_blocks = key.shape[2] // self.block_size + 1  # positions lie in 0..K-1
        chosen = self.choose(q_pos, k_pos, query, key, key_valid, query_valid, num_blocks)
        k_block = torch.div(k_pos, self.block_size, rounding_mode="floor").clamp(0, num_blocks - 1)
        return chosen.gather(-1, k_block[:, None, None, :].expand(chosen.shape[0], chosen.shape[1], chosen.shape[2], -1))
