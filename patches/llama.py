"""LLaMA family adapter (LlamaModel and every task head on it)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import FamilyAdapter, register_adapter


class LlamaAdapter(FamilyAdapter):
    def layer_modules(self, model: nn.Module) -> list[nn.Module]:
        return list(self.base_model(model).layers)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        # LlamaAttention: q_proj/k_proj/v_proj/o_proj, calls the attention interface itself.
        return [layer.self_attn for layer in self.layer_modules(model)]

    def output_projection_site(self, layer: nn.Module) -> tuple[nn.Module, str]:
        return layer.self_attn, "o_proj"

    def rope_planes(self, config: Any) -> list[tuple[int, int]] | None:
        # rotate_half layout: dims i and i + D/2 form one rotary plane
        half = self.head_dim(config) // 2
        return [(i, i + half) for i in range(half)]

    def positions_from_mask(self, model: nn.Module) -> None:
        # LlamaModel numbers tokens by their index when no position_ids are given, so a
        # left-padded sample's queries are rotated by RoPE as if it were longer: harmless for
        # q.k (relative), not for q . a^K (Shaw's key term). Number them as generate() does.
        backbone = self.base_model(model)
        if not getattr(backbone, "_relattn_positions_hook", False):
            backbone.register_forward_pre_hook(_positions_from_mask, with_kwargs=True)
            backbone._relattn_positions_hook = True


def _positions_from_mask(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if kwargs.get("position_ids") is not None or len(args) > 2 or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    length = (ids if ids is not None else embeds).shape[1]
    if mask.shape[1] < length:
        return None
    # without padding this is transformers' own numbering (past length + index)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
    return args, {**kwargs, "position_ids": positions}


def llama_like(model_type: str, cls: type[LlamaAdapter] = LlamaAdapter, **changes: Any) -> LlamaAdapter:
    """The adapter of a decoder family with LLaMA's layout: `model.layers[i].self_attn` with
    q_proj/k_proj/v_proj/o_proj, rotate_half RoPE, a native num_key_value_heads (`changes`:
    other field values)."""
    fields = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "native_gqa": True,
              "lora_targets": ("q_proj", "k_proj", "v_proj", "o_proj"), "tasks": ("causal-lm", "seq-cls")}
    return cls(model_type=model_type, **{**fields, **changes})


ADAPTER = register_adapter(llama_like("llama"))
