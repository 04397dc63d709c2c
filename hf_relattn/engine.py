"""The attention engine: one entry point for every variant, registered with transformers.

`relattn_attention` has the signature of transformers' attention interface: it receives
q (B, Hq, Q, D), k/v (B, Hkv, K, D) with possibly fewer K/V heads, the mask built by the
registered mask function (boolean (B, 1, Q, K) or None), and the calling module. It collects
the variants acting in that module (attached by `convert`, or selected by the
`relattn_<name>` flag), resolves the call once (`hf_relattn.call.AttnCall`) and dispatches;
it knows no variant by name, only the axes of the contract (`hf_relattn.variants.base`):

- no variant acts inside attention -> transformers' own sdpa function (zero overhead: an
  identity conversion runs exactly the native kernel);
- eager paths: the variants are asked in axis order (gating, sparsity, the others) to compute
  the call themselves (`Variant.attend`), each given how to compute the rest; the first answer
  wins. What no variant takes goes to the shared score path (`hf_relattn.paths.score_attention`:
  the hooks `score_bias` and `relation_term` over SDPA in chunks or the relational kernel);
- `compiled` (under torch.compile) and `output_attentions=True`: every variant at once over
  materialised scores (`hf_relattn.paths.materialized_attention`), no data-dependent Python;
- `reference` (`force_implementation("reference")`): the materialised formulas, for tests,
  debugging and the naive baseline of benchmarks.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .call import AttnCall, build_call, key_valid, positions_from_ids
from .paths import materialized_attention, score_attention
from .variants.base import (
    CACHE,
    FLAG_PREFIX,
    SPEC_KEY,
    VARIANTS,
    Variant,
    check_composition,
    flag_options,
    flag_variant,
    model_input_names,
    module_variants,
)

__all__ = ["ENGINE_NAME", "FLAG_PREFIX", "IMPLEMENTATIONS", "flag_options", "flag_variant", "force_implementation",
           "implementation", "module_variants", "relattn_attention"]

ENGINE_NAME = "relattn"
IMPLEMENTATIONS = ("auto", "dense", "reference", "flex")
# The order in which the axes may take a call: a head gate wraps the rest, a sparse pattern
# replaces dense attention, score terms and structure changes need nothing of their own.
AXIS_ORDER = ("gating", "sparsity", "values", "scores", "structure")

# The path forced by `force_implementation`, per thread and per asyncio task.
_forced: ContextVar[str] = ContextVar("relattn_implementation", default="auto")


class force_implementation(contextlib.ContextDecorator):  # noqa: N801 (used like a function)
    """Force the engine path inside a `with` block (or a function it decorates): "auto",
    "dense", "reference" or "flex". The setting belongs to the calling thread (a context
    variable): other threads keep theirs. Reusable and re-entrant; called alone it does nothing,
    which it says (a warning) instead of being silently ignored."""

    def __init__(self, name: str) -> None:
        if name not in IMPLEMENTATIONS:
            raise ValueError(f"Unknown implementation {name!r}; valid: {', '.join(IMPLEMENTATIONS)}")
        self.name, self._tokens, self._used = name, [], False

    def __enter__(self) -> force_implementation:
        self._used = True
        self._tokens.append(_forced.set(self.name))
        return self

    def __exit__(self, *exc: Any) -> None:
        _forced.reset(self._tokens.pop())

    def __call__(self, function: Callable[..., Any]) -> Callable[..., Any]:
        self._used = True
        return super().__call__(function)

    def __del__(self) -> None:
        if not getattr(self, "_used", True):
            warnings.warn(f"force_implementation({self.name!r}) was neither entered nor used as a decorator and has no "
                          f"effect: write `with hf_relattn.force_implementation({self.name!r}):`", stacklevel=2)


def implementation() -> str:
    """The path of this call: "compiled" while torch.compile traces (dynamo cannot read a
    context variable, and the materialised path has no data-dependent Python), else the forced one."""
    if torch.compiler.is_compiling():
        return "compiled"
    return _forced.get()


def _check_model_inputs(config: Any, inputs: dict[str, Any]) -> None:
    """Refuse a model input (`Variant.model_inputs`) that no variant of the model's spec reads: it
    would be silently ignored (checked on the model: layers left unconverted may still get it)."""
    spec = getattr(config, SPEC_KEY, None) or {}
    names = {entry.get("name") for entry in spec.get("variants", ())} if isinstance(spec, dict) else set()
    for name in model_input_names():
        if inputs.get(name) is None:
            continue
        owners = sorted(v for v, cls in VARIANTS.items() if name in cls.model_inputs)
        if not names & set(owners):
            raise ValueError(f"{name} were passed but the model has no {' or '.join(map(repr, owners))} variant: convert "
                             f"it first with hf_relattn.convert(model, {owners[0]!r}, ...) (`hf-relattn variants` lists "
                             "its options).")


def relattn_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention entry point registered as "relattn" and "relattn_<flag>" (see module doc)."""
    variants = module_variants(module)
    _check_model_inputs(module.config, kwargs)
    if kwargs.get("softcap") is not None:  # tanh capping of the scores (Gemma 2): no path here applies it
        raise ValueError(f"attention logit softcapping (softcap={kwargs['softcap']}) is not supported by hf_relattn's "
                         "attention paths; use the family's eager attention, or a checkpoint without it")
    impl = implementation()
    wants_probs = bool(kwargs.get("output_attentions"))
    if not variants and not wants_probs and impl in ("auto", "compiled"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if len(variants) > 1 and impl != "compiled":  # what convert and load checked, also for flags set later
        check_composition(variants, f"layer {getattr(module, 'layer_idx', '?')}")
    stream = _streaming_layer(module, kwargs)
    if stream is not None:  # a StreamingCache layer holds only some keys: their mask columns
        if impl == "compiled":
            raise ValueError("StreamingCache is not supported under torch.compile; use it in eager mode")
        attention_mask = stream.kept_mask(attention_mask, query.shape[2], key.shape[2])
    ordered = tuple(sorted(variants, key=lambda v: AXIS_ORDER.index(v.axis)))
    call = build_call(module, query, key, value, attention_mask, dropout, scaling, kwargs, impl, ordered)
    # a causal layer's window may have hidden or dropped cached keys; a bidirectional one
    # (ModernBERT's local layers) has no cache: every key is in the call and visible to itself
    if call.native_window is not None and call.causal and (impl == "compiled" or call.key.shape[2] > call.query.shape[2]):
        call = _count_from_position_ids(call)
    if impl == "compiled" or wants_probs or call.key_origin is not None:
        out, probs = materialized_attention(call, ordered)
        result = out.transpose(1, 2).contiguous(), probs if wants_probs else None
    else:
        result = run(call, ordered), None
    if stream is not None:
        stream.evict(lambda: key_valid(call.mask))
    return result


def run(call: AttnCall, variants: Sequence[Variant]) -> torch.Tensor:
    """(B, Q, H, D): the first of `variants` that computes the call its own way, each given the
    rest of the list as `rest`; else the shared score path over all of them."""
    for i, variant in enumerate(variants):
        out = variant.attend(call, lambda part, later=variants[i + 1:]: run(part, later))
        if out is not None:
            return out
    return score_attention(call, variants)


def _count_from_position_ids(call: AttnCall) -> AttnCall:
    """A call with cached keys (or under torch.compile) on a layer with the model's native sliding
    window: once the sequence is longer than the window, the mask hides each sample's first
    tokens like padding and the window's cache drops them. Variants placing blocks and sinks at
    positions counted from that token then get the keys' positions from the model's position_ids
    (as generate() passes them) and the materialised path (one query row per decoding step);
    variants that need the first keys themselves are refused (full forwards see every key)."""
    needs = [v for v in call.variants if v.sequence_start]
    if not needs:
        return call
    positions = call.inputs.get("position_ids")
    compiling = call.impl == "compiled"
    if not compiling and isinstance(positions, torch.Tensor) and positions.numel() and int(positions.max()) < call.native_window:
        return call  # no token is outside the window yet: the mask still shows every first token
    keys = [v.name for v in needs if v.sequence_start == "keys"]
    if keys:
        raise ValueError(
            f"{keys} read each sample's first keys (a gate's block means, routing over the whole sequence, ids indexing "
            f"it), which a call with cached keys (or under torch.compile) cannot see on a layer with the model's native "
            f"sliding window of {call.native_window} tokens once the sequence is longer: run full forwards "
            "(use_cache=False), or use a model without a native window."
        )
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.shape[-1] != call.query.shape[2]:
        raise ValueError(
            f"{[v.name for v in needs]} count key positions from each sample's first token, which the mask of a layer "
            f"with a native sliding window of {call.native_window} tokens hides in a call with cached keys: the model "
            "must pass position_ids (batch, query length) to its attention (LLaMA-like decoders do)."
        )
    return positions_from_ids(call, positions)


def _streaming_layer(module: nn.Module, inputs: dict[str, Any]) -> Any:
    """The call's KV-cache layer when it evicts keys (hf_relattn.streaming.StreamingLayer), else None."""
    layers = getattr(inputs.get(CACHE), "layers", None)
    idx = getattr(module, "layer_idx", None)
    layer = layers[idx] if layers is not None and idx is not None and idx < len(layers) else None
    return layer if hasattr(layer, "kept_mask") else None
