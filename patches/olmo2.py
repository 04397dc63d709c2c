"""OLMo 2 family adapter: LLaMA's layout, but q_norm/k_norm are RMS norms over all heads of the
projection together (num_heads * head_dim): GQA resizes k_norm with the K heads (its weights
merged per group as the K/V projections are), and pruning is refused (removing a query head
would change the normalisation of the others)."""

from __future__ import annotations

from torch import nn

from . import register_adapter
from .llama import LlamaAdapter, llama_like


class Olmo2Adapter(LlamaAdapter):
    def set_num_kv_heads(self, attn: nn.Module, num_kv_heads: int) -> None:
        super().set_num_kv_heads(attn, num_kv_heads)
        dim, heads = self.head_dim(attn.config), self.num_heads(attn.config)
        old = attn.k_norm.weight
        kv_heads = old.numel() // dim
        if kv_heads == num_kv_heads:
            return
        # each query head's K/V head's weights, averaged over the query heads of a new group
        # (as the K/V projections' "mean" merge); a checkpoint's values replace them on load
        per_query = old.detach().view(kv_heads, dim).repeat_interleave(heads // kv_heads, dim=0)
        merged = per_query.view(num_kv_heads, heads // num_kv_heads, dim).mean(1).reshape(-1)
        attn.k_norm.weight = nn.Parameter(merged.to(old.dtype), requires_grad=old.requires_grad)


ADAPTER = register_adapter(llama_like(
    "olmo2", cls=Olmo2Adapter, prune_refused="q_norm normalises all query heads together, so removing one changes the others",
))
