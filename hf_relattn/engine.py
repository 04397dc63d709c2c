"""The attention engine: one entry point for every variant, registered with transformers.

`relattn_attention` has the signature of transformers' attention interface: it receives
q (B, Hq, Q, D), k/v (B, Hkv, K, D) with possibly fewer K/V heads, the mask built by the
registered mask function (boolean (B, 1, Q, K) or None), and the calling module. It collects
the variants acting in that module (attached by `convert`, or selected by the
`relattn_<name>` flag) and dispatches:

- no variant acts inside attention -> transformers' own sdpa function (zero overhead: an
  identity conversion runs exactly the native kernel);
- a score term exists -> `dense`: SDPA with an additive bias, chunked over queries so the
  bias never exceeds `CHUNK_ELEMENTS` floats (memory O(chunk x K), cf. Rabe & Staats 2021);
- `reference`: the materialised formula softmax(q k^T * scale + bias + mask) v, for
  debugging and short sequences (select with `force_implementation("reference")`).

Positions are indices in the key/value sequence: the new queries are the last Q of K
(DynamicCache decoding). Relative terms only use differences, so left padding is harmless.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .variants.base import ATTACHED, Variant, get_variant_class

ENGINE_NAME = "relattn"
FLAG_PREFIX = "relattn_"
IMPLEMENTATIONS = ("auto", "dense", "reference")
# Largest additive bias materialised at once (floats); queries are processed in chunks below it.
CHUNK_ELEMENTS = 1 << 24

_forced: list[str] = []


@contextlib.contextmanager
def force_implementation(name: str) -> Iterator[None]:
    """Force the engine path inside a `with` block: "auto", "dense" or "reference"."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"Unknown implementation {name!r}; valid: {', '.join(IMPLEMENTATIONS)}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


# ---------------------------------------------------------------------- flag variants
_flag_cache: dict[tuple[str, str], Variant] = {}


def flag_options(config: Any, name: str) -> dict[str, Any]:
    """Options for flag variant `name` from `config.relattn`.

    `config.relattn` is either the full spec written by `convert` ({"variants": [...]}), whose
    entry named `name` supplies the options, or (with a flag) a plain dict of options, as in
    `from_pretrained(p, attn_implementation="relattn_alibi", relattn={...})`.
    """
    spec = getattr(config, "relattn", None) or {}
    if not isinstance(spec, dict):
        raise ValueError(f"config.relattn must be a dict, got {type(spec).__name__}")
    if "variants" in spec:
        for entry in spec["variants"]:
            if entry["name"] == name:
                return dict(entry.get("options", {}))
        return {}
    if "layers" in spec:
        raise ValueError(
            "A flag variant applies to every layer; to choose layers, use "
            f"hf_relattn.convert(model, {name!r}, layers=[...]) instead."
        )
    return dict(spec)


def flag_variant(config: Any) -> Variant | None:
    """The variant selected by `attn_implementation="relattn_<name>"`, if any."""
    impl = getattr(config, "_attn_implementation", None)
    if not isinstance(impl, str) or not impl.startswith(FLAG_PREFIX):
        return None
    name = impl[len(FLAG_PREFIX):]
    options = flag_options(config, name)
    key = (name, json.dumps(options, sort_keys=True))
    if key not in _flag_cache:
        _flag_cache[key] = get_variant_class(name).from_options(options)
    return _flag_cache[key]


def module_variants(module: nn.Module) -> tuple[Variant, ...]:
    """Variants acting inside this attention module: attached ones, then the flag's."""
    attached: tuple[Variant, ...] = getattr(module, ATTACHED, ())
    flag = flag_variant(module.config)
    if flag is not None and all(v.name != flag.name for v in attached):
        return attached + (flag,)
    return attached


# --------------------------------------------------------------------------- engine
def relattn_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention entry point registered as "relattn" and "relattn_<flag>" (see module doc)."""
    variants = module_variants(module)
    scorers = [v for v in variants if v.axis == "scores"]
    impl = _forced[-1] if _forced else "auto"
    if not scorers and impl == "auto":
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    num_heads, q_len, k_len = query.shape[1], query.shape[2], key.shape[2]
    device = query.device
    k_pos = torch.arange(k_len, device=device)
    q_pos = k_pos[k_len - q_len:]
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling

    def bias_fn(qp: torch.Tensor) -> torch.Tensor | None:
        terms = [t for t in (v.score_bias(module, num_heads, qp, k_pos) for v in scorers) if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    run = reference_attention if impl == "reference" else dense_attention
    out = run(query, key, value, attention_mask, bias_fn, q_pos, k_pos, causal, scale, dropout if module.training else 0.0)
    return out.transpose(1, 2).contiguous(), None


def _additive_mask(
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


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    bias_fn: Callable[[torch.Tensor], torch.Tensor | None],
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    scale: float,
    dropout: float,
) -> torch.Tensor:
    """SDPA with an additive bias, in query chunks; returns (B, Hq, Q, D)."""
    batch, num_heads, q_len, _ = query.shape
    k_len = key.shape[2]
    gqa = key.shape[1] != num_heads
    if gqa and query.device.type == "cpu" and torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        # torch 2.13's CPU SDPA backward with enable_gqa is ~20x slower than with repeated K/V
        # heads (hf-relattn bench kernels); repeating costs O(H K D) memory, once per call.
        key = key.repeat_interleave(num_heads // key.shape[1], dim=1)
        value = value.repeat_interleave(num_heads // value.shape[1], dim=1)
        gqa = False
    chunk = max(1, CHUNK_ELEMENTS // max(1, batch * num_heads * k_len))
    outs = []
    for start in range(0, q_len, chunk):
        stop = min(q_len, start + chunk)
        qp = q_pos[start:stop]
        m = None if mask is None else mask[..., start:stop, :]
        attn_mask = _additive_mask(bias_fn(qp), m, qp, k_pos, causal, query.dtype)
        outs.append(
            F.scaled_dot_product_attention(
                query[:, :, start:stop], key, value, attn_mask=attn_mask, dropout_p=dropout, scale=scale, enable_gqa=gqa
            )
        )
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    bias_fn: Callable[[torch.Tensor], torch.Tensor | None],
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    scale: float,
    dropout: float,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias + mask) v, every matrix materialised, float32 softmax."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    add = _additive_mask(bias_fn(q_pos), mask, q_pos, k_pos, causal, torch.float32)
    if add is not None:
        scores = scores.masked_fill(~add, torch.finfo(torch.float32).min) if add.dtype == torch.bool else scores + add
    probs = torch.softmax(scores, dim=-1)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, value.float()).to(query.dtype)
