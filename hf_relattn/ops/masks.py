"""Masks: boolean keep-masks as additive float masks, and key-padding detection."""

from __future__ import annotations

import weakref
from typing import Any

import torch

def float_mask(keep: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean keep-mask as an additive one (masked: the dtype's minimum, so a query row with
    no key stays finite, as in transformers); float masks pass through."""
    if keep is None or keep.dtype != torch.bool:
        return keep
    return torch.where(keep, torch.zeros((), dtype=dtype, device=keep.device), torch.finfo(dtype).min)


def additive_mask(
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    qp: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """bias (H, c, K) + mask (B, 1, c, K) -> one float additive mask; masked entries get the
    dtype's minimum (not -inf, so fully padded query rows stay finite, as in transformers)."""
    if mask is None and causal:
        mask = (k_pos[None, :] <= qp[:, None])[None, None]
    if mask is not None and mask.dtype != torch.bool:
        # an additive float mask given by the caller
        return mask.to(dtype) if bias is None else (bias[None] + mask.float()).to(dtype)
    if bias is None:
        return mask
    if mask is None:
        return bias[None].to(dtype)
    # fill after the cast: float32's minimum would round to -inf in bfloat16/float16
    return bias[None].to(dtype).masked_fill(~mask, torch.finfo(dtype).min)


# The last mask `plain_key_padding` read (weakly) and its answer: every layer of a forward
# passes the same mask object, so the O(B Q K) comparison runs once per forward. One tuple,
# read once per call, so threads at worst recompute.
_plain_seen: tuple[Any, bool, Any] | None = None


def plain_key_padding(mask: torch.Tensor | None, causal: bool) -> torch.Tensor | None | bool:
    """The (B, K) key validity when a self-attention mask is nothing but key padding (and the
    causality the engine applies anyway); None without a mask; False when it says more."""
    global _plain_seen
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.shape[1] != 1:
        return False
    seen = _plain_seen
    if seen is not None and seen[0]() is mask and seen[1] == causal:
        return seen[2]
    answer = _key_padding_of(mask, causal)
    _plain_seen = (weakref.ref(mask), causal, answer)
    return answer


def _key_padding_of(mask: torch.Tensor, causal: bool) -> torch.Tensor | bool:
    valid = mask.any(dim=-2)[:, 0]
    q_len, k_len = mask.shape[-2], mask.shape[-1]
    if q_len == 1:  # one key-padding row for every query
        return valid
    expected = valid[:, None, None, :].expand(-1, 1, q_len, -1)
    if causal:
        expected = expected & torch.ones(q_len, k_len, dtype=torch.bool, device=mask.device).tril()
    return valid if torch.equal(mask, expected) else False
