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

from .base import check_int_options, register_variant
from .sparse_base import SparseVariant

GATES = ("token", "block")


@register_variant
@dataclass
class MoBA(SparseVariant):
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

    def validate(self, model, adapter, layers) -> None:
        check_int_options(self, "top_k")
        if self.gate not in GATES:
            raise ValueError(f"moba: gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        check_int_options(self, "dense_layers", minimum=0)
        modules = adapter.attention_modules(model)
        if not getattr(modules[layers[0]], "is_causal", False):
            raise ValueError("moba gates over earlier key blocks and needs a causal decoder (LLaMA); valid families: llama")
        if self.dense_layers > len(modules):
            raise ValueError(f"moba: dense_layers ({self.dense_layers}) exceeds the model's {len(modules)} layers")
        super().validate(model, adapter, layers)

    def token_blocks(self, module, q_pos, num_blocks, query, key, key_valid):
        num_layers = module.config.num_hidden_layers
        if self.dense_layers and module.layer_idx >= num_layers - self.dense_layers:
            return None
        batch, heads, _, dim = query.shape
        kv_heads, k_len = key.shape[1], key.shape[2]
        bs = self.block_size
        # mean key of every block (padding keys left out)
        pad = num_blocks * bs - k_len
        weights = key.new_ones(batch, k_len) if key_valid is None else key_valid.to(key.dtype)
        counts = torch.nn.functional.pad(weights, (0, pad)).view(batch, num_blocks, bs).sum(-1)
        keys = key if key_valid is None else key * weights[:, None, :, None]
        keys = torch.nn.functional.pad(keys, (0, 0, 0, pad)) if pad else keys
        means = keys.reshape(batch, kv_heads, num_blocks, bs, dim).sum(3) / counts.clamp(min=1)[:, None, :, None]
        means = means.repeat_interleave(heads // kv_heads, dim=1)
        own = (q_pos // bs)[:, None]
        if self.gate == "block":
            # one gate per query block: its mean query (over this call's queries in the block)
            slots = (q_pos // bs) - int(q_pos[0]) // bs
            sums = query.new_zeros(batch, heads, int(slots[-1]) + 1, dim).index_add_(2, slots, query)
            sizes = torch.bincount(slots).to(query.dtype)[None, None, :, None]
            query = (sums / sizes)[:, :, slots]
        gate = torch.matmul(query, means.transpose(-1, -2))  # (B, H, Q, N)
        blocks = torch.arange(num_blocks, device=q_pos.device)[None, :]
        earlier = (blocks < own)[None, None] & (counts > 0)[:, None, None, :]
        chosen = blocks == own
        picks = min(self.top_k - 1, num_blocks)
        if picks > 0:
            gate = gate.masked_fill(~earlier, float("-inf"))
            top = gate.topk(picks, dim=-1)
            picked = torch.zeros_like(gate, dtype=torch.bool).scatter_(-1, top.indices, True) & earlier
            chosen = chosen | picked
        return chosen.expand(batch, heads, -1, -1)
