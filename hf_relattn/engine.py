"""The attention engine: one entry point for every variant, registered with transformers.

`relattn_attention` has the signature of transformers' attention interface: it receives
q (B, Hq, Q, D), k/v (B, Hkv, K, D) with possibly fewer K/V heads, the mask built by the
registered mask function (boolean (B, 1, Q, K) or None), and the calling module. It collects
the variants acting in that module (attached by `convert`, or selected by the
`relattn_<name>` flag), resolves where the call's queries and keys sit (`AttnCall`) and
dispatches:

- no variant acts inside attention -> transformers' own sdpa function (zero overhead: an
  identity conversion runs exactly the native kernel);
- a score term exists -> `dense`: SDPA with an additive bias, chunked over queries so the
  bias never exceeds `CHUNK_ELEMENTS` floats (memory O(chunk x K), cf. Rabe & Staats 2021);
- a relation term exists (Shaw et al. 2018: learned key/value vectors per relation label) ->
  `relational`: materialised attention in query chunks of at most `RELATION_CHUNK_ELEMENTS`
  scores, label scores q @ A^K^T (B, H, c, R) gathered by label and probabilities summed per
  label before @ A^V, so nothing of size T x T x d exists; causal chunks skip the keys after
  their last query. In training each chunk is recomputed in the backward pass
  (activation checkpointing), so memory stays O(chunk x K) (Rabe & Staats 2021);
- a sparse pattern -> the block-sparse path or the pattern's own layout (see `_sparse`);
- `materialized`: every variant as one attention over materialised (B, H, Q, K) scores, with
  no data-dependent Python: what runs under `torch.compile` and when `output_attentions=True`
  asks for the probabilities;
- `reference`: the materialised formula softmax(q k^T * scale + bias + mask) v, with relation
  terms gathered into (Q, K, D) tensors as transformers v4 BERT's `relative_key` did, for
  tests, debugging and the naive baseline of benchmarks (`force_implementation("reference")`).

Where the queries and keys are. Transformers hands a static cache over whole: K covers every
preallocated slot, the filled ones first; the queries are the last filled slots. `AttnCall`
finds the filled length from the mask (or, without a mask, as transformers' own sdpa function
does) and, outside torch.compile, crops the empty slots, so every path sees the queries as the
last Q of K. Relative terms only use differences, which padding does not move. Patterns that
place blocks, sinks or counts at positions of a sample's own sequence (`absolute_positions`)
get those positions: the eager paths run each left-padding offset of a batch on its own keys
(the sample alone, exactly), the materialised path counts positions from the mask.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .variants.base import ATTACHED, CACHE, RelationTerm, Variant, get_variant_class

ENGINE_NAME = "relattn"
FLAG_PREFIX = "relattn_"
IMPLEMENTATIONS = ("auto", "dense", "reference", "flex")
# Largest additive bias materialised at once (floats); queries are processed in chunks below it.
CHUNK_ELEMENTS = 1 << 24
# Scores per chunk of the relational path (one K/V head's query heads x rows x K): 1 MB chunks
# keep its extra memory at that of SDPA at T=4096 and cost no speed (hf-relattn bench kernels
# --suite relative).
RELATION_CHUNK_ELEMENTS = 1 << 18

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


# ---------------------------------------------------------------------- flag variants
# Flag variants by name and options, built once (variants are immutable option holders).
_flag_variants: dict[tuple[Any, ...], Variant] = {}


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
            if entry["name"] == name:  # a saved spec: options it did not write keep their old meaning
                return {**get_variant_class(name).legacy_options, **entry.get("options", {})}
        return {}
    if "layers" in spec:
        raise ValueError(
            "A flag variant applies to every layer; to choose layers, use "
            f"hf_relattn.convert(model, {name!r}, layers=[...]) instead."
        )
    return dict(spec)


def flag_variant(config: Any) -> Variant | None:
    """The variant selected by `attn_implementation="relattn_<name>"`, if any (looked up by
    name and options, hashable constants torch.compile traces: no serialising per call)."""
    impl = getattr(config, "_attn_implementation", None)
    if not isinstance(impl, str) or not impl.startswith(FLAG_PREFIX):
        return None
    name = impl[len(FLAG_PREFIX):]
    options = flag_options(config, name)
    key = (name, _frozen(options))
    variant = _flag_variants.get(key)
    if variant is None:
        variant = _flag_variants[key] = get_variant_class(name).from_options(options)
    return variant


def _frozen(value: Any) -> Any:
    """A hashable copy of JSON-like options."""
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def module_variants(module: nn.Module) -> tuple[Variant, ...]:
    """Variants acting inside this attention module: attached ones, then the flag's."""
    attached: tuple[Variant, ...] = getattr(module, ATTACHED, ())
    flag = flag_variant(module.config)
    if flag is not None and all(v.name != flag.name for v in attached):
        return attached + (flag,)
    return attached


# ----------------------------------------------------------------------- one call
@dataclass
class AttnCall:
    """One attention call: its tensors, options and geometry, resolved once.

    `lead` is the number of key slots before the first query (the queries sit at slots
    lead .. lead + Q - 1): an int, or a 0-d tensor under torch.compile (where the empty slots of
    a static cache are masked instead of cropped). `inputs` are the keyword arguments the model
    passed (relation_ids, a router's layer input, the cache). `router`: MoSA's router logits
    (B, H, K) of every key, when the layer has it."""

    module: nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    causal: bool
    scale: float
    dropout: float
    inputs: dict[str, Any]
    lead: Any
    router: torch.Tensor | None = None

    @property
    def q_slots(self) -> torch.Tensor:
        return self.lead + torch.arange(self.query.shape[2], device=self.query.device)

    def replace(self, **changes: Any) -> AttnCall:
        return dataclasses.replace(self, **changes)


def _lead(q_len: int, k_len: int, mask: torch.Tensor | None, causal: bool, compiling: bool) -> Any:
    """Key slots before the first query. K = Q (no cache, or a cache holding just these
    tokens) and non-causal calls: none beyond K - Q. Without a mask transformers passes a
    static cache only at prefill, queries first (its sdpa function crops the same way); a
    decoding step without a mask has a dynamic cache, queries last. With a boolean mask, a real
    query's last visible key is itself, so the largest (last visible key - row) over the batch
    is the lead; queries that see nothing (padding everywhere) say nothing."""
    if k_len == q_len or not causal:
        return k_len - q_len
    if mask is None:
        return 0 if q_len > 1 else k_len - 1
    if mask.dtype != torch.bool:
        return k_len - q_len  # a caller's additive mask: the queries are taken to be last
    cols = torch.arange(k_len, device=mask.device)
    last = torch.where(mask, cols, -1).amax(-1)  # (B, 1, Q)
    lead = (last - torch.arange(q_len, device=mask.device)).amax()
    if compiling:
        return lead.clamp(min=0)
    lead = int(lead)
    return lead if lead >= 0 else k_len - q_len


def build_call(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
               dropout: float, scaling: float | None, kwargs: dict[str, Any], compiling: bool) -> AttnCall:
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", False) if causal is None else causal)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    q_len, k_len = query.shape[2], key.shape[2]
    lead = _lead(q_len, k_len, mask, causal, compiling)
    if not compiling and lead + q_len < k_len:  # the empty slots of a static cache
        key, value = key[:, :, : lead + q_len], value[:, :, : lead + q_len]
        mask = None if mask is None else mask[..., : lead + q_len]
    return AttnCall(module, query, key, value, mask, causal, scale, dropout if module.training else 0.0, kwargs, lead)


def _key_valid(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, K) True for keys some query may attend (not padding), from a boolean mask."""
    return mask.any(dim=-2)[:, 0] if mask is not None and mask.dtype == torch.bool else None


def positions(call: AttnCall, absolute: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(q_pos (1|B, Q), k_pos (1|B, K), key_valid (1|B, K) or None, query_valid (1|B, Q) or None).

    Positions are key slots, or with `absolute` positions in each sample's own sequence
    (counted over its valid keys: left padding and gaps move nothing). Empty slots of an
    uncropped static cache are not valid."""
    k_len = call.key.shape[2]
    slots = torch.arange(k_len, device=call.key.device)
    q_slots = call.q_slots
    valid = _key_valid(call.mask)
    if valid is None and call.mask is None and not (isinstance(call.lead, int) and call.lead + call.query.shape[2] == k_len):
        valid = (slots < call.lead + call.query.shape[2])[None]
    if valid is None:
        return q_slots[None], slots[None], None, None
    q_valid = valid[:, q_slots]
    if not absolute:
        return q_slots[None], slots[None], valid, q_valid
    k_pos = valid.long().cumsum(-1) - 1
    return k_pos[:, q_slots], k_pos, valid, q_valid


# --------------------------------------------------------------------------- engine
def _model_has(config: Any, name: str) -> bool:
    """True when the adapted model's spec (config.relattn) converts some layer to `name`
    (checked on the model: layers left unconverted may still receive the input)."""
    spec = getattr(config, "relattn", None) or {}
    return any(entry.get("name") == name for entry in spec.get("variants", ())) if isinstance(spec, dict) else False


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
    if kwargs.get("relation_ids") is not None and not _model_has(module.config, "relation"):
        raise ValueError(
            "relation_ids were passed but the model has no 'relation' variant: convert it first with "
            "hf_relattn.convert(model, 'relation', num_relations=N)."
        )
    impl = implementation()
    wants_probs = bool(kwargs.get("output_attentions"))
    if not variants and not wants_probs and impl in ("auto", "compiled"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    stream = _streaming_layer(module, kwargs)
    if stream is not None:  # a StreamingCache layer holds only some keys: their mask columns
        if impl == "compiled":
            raise ValueError("StreamingCache is not supported under torch.compile; use it in eager mode")
        attention_mask = stream.kept_mask(attention_mask, query.shape[2], key.shape[2])
    call = build_call(module, query, key, value, attention_mask, dropout, scaling, kwargs, impl == "compiled")
    out, probs = _dispatch(call, variants, impl, wants_probs)
    if stream is not None:
        stream.evict(lambda: _key_valid(call.mask))
    return out, probs


def _streaming_layer(module: nn.Module, inputs: dict[str, Any]) -> Any:
    """The call's KV-cache layer when it evicts keys (hf_relattn.streaming.StreamingLayer), else None."""
    layers = getattr(inputs.get(CACHE), "layers", None)
    idx = getattr(module, "layer_idx", None)
    layer = layers[idx] if layers is not None and idx is not None and idx < len(layers) else None
    return layer if hasattr(layer, "kept_mask") else None


def _dispatch(call: AttnCall, variants: Sequence[Variant], impl: str, wants_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out (B, Q, H, D), probabilities or None) of a call with variants."""
    module = call.module
    mosa = next((v for v in variants if getattr(v, "choice", None) == "expert"), None)
    if mosa is not None:
        call.router = mosa.router_logits(module, call.inputs, call.query.shape[2], call.key.shape[2], call.lead)
    if impl == "compiled" or wants_probs:
        out, probs = materialized_attention(call, variants)
        return out.transpose(1, 2).contiguous(), probs if wants_probs else None
    gating = [v for v in variants if v.axis == "gating"]
    others = [v for v in variants if v.axis != "gating"]
    if not gating:
        return _attention(call, others, impl), None
    # the gating axis (MoH): per-token head weights on the heads' outputs
    weights, used = gating[0].head_weights(module, call.query, _query_valid(call), call.inputs)
    plain = all(v.axis == "structure" for v in others) and call.inputs.get("relation_ids") is None
    # short inputs and decoding steps compute every head: below ROUTED_MIN_TOKENS the per-head
    # calls cost more than they save, and a step's cost is reading the KV cache
    if plain and call.query.shape[2] >= ROUTED_MIN_TOKENS and not module.training and not torch.is_grad_enabled() and impl == "auto":
        out = head_routed_attention(call.query, call.key, call.value, call.mask, used, call.causal, call.scale)
    else:
        out = _attention(call, others, impl)
    return out * weights[..., None], None


def _query_valid(call: AttnCall) -> torch.Tensor | None:
    """(B, Q) True for queries that are not padding."""
    valid = _key_valid(call.mask)
    return None if valid is None else valid[:, call.q_slots]


def _attention(call: AttnCall, variants: Sequence[Variant], impl: str) -> torch.Tensor:
    """Attention with the structure, scores, values and sparsity axes; output (B, Q, H, D)."""
    module, query = call.module, call.query
    num_heads, q_len, k_len = query.shape[1], query.shape[2], call.key.shape[2]
    k_pos = torch.arange(k_len, device=query.device)
    q_pos = k_pos[k_len - q_len:]
    term_of = {v.name: v.relation_term(module, num_heads, q_pos, k_pos, call.inputs) for v in variants}
    terms = [t for t in term_of.values() if t is not None]
    for term in terms:
        if isinstance(term.labels, torch.Tensor) and term.labels.shape[0] not in (1, query.shape[0]):
            raise ValueError(
                f"relation_ids has batch size {term.labels.shape[0]} but the input has {query.shape[0]}: expected "
                f"shape (batch, query length, key length) = ({query.shape[0]}, {q_len}, {k_len})"
            )
    scorers = [v for v in variants if v.axis == "scores"]
    if any(t.key is not None or t.value is not None for t in terms):
        # the relational path: variants with a relation term (e.g. t5_bias's learned bias) act
        # through it, with gradients; score_bias only for the others (static, e.g. ALiBi)
        scorers = [v for v in scorers if term_of[v.name] is None]
    else:
        terms = []  # bias-only terms: their score_bias runs on the SDPA path
    sparse = [v for v in variants if v.axis == "sparsity"]
    if sparse:
        if len(sparse) > 1 or scorers or terms:
            names = [v.name for v in sparse] + [v.name for v in scorers] + ["relation term"] * len(terms)
            raise ValueError(f"A sparse variant acts alone inside attention (with gqa); this layer has {names}")
        return _sparse(call, sparse[0], impl)
    if not scorers and not terms and impl == "auto":
        return sdpa_attention_forward(module, query, call.key, call.value, call.mask, dropout=call.dropout,
                                      scaling=call.scale, is_causal=call.causal)[0]

    def bias_fn(qp: torch.Tensor, kp: torch.Tensor) -> torch.Tensor | None:
        biases = [t for t in (v.score_bias(module, num_heads, qp, kp) for v in scorers) if t is not None]
        return sum(biases[1:], biases[0]) if biases else None

    if impl == "reference":
        run = partial(reference_attention, terms=terms)
    elif terms:
        run = partial(relational_attention, terms=terms)
    else:
        run = dense_attention
    out = run(query, call.key, call.value, call.mask, bias_fn, q_pos, k_pos, call.causal, call.scale, call.dropout)
    return out.transpose(1, 2).contiguous()


def _sparse(call: AttnCall, variant: Any, impl: str) -> torch.Tensor:
    """The sparsity axis (B, Q, H, D). Patterns tied to positions in each sample's own sequence
    run once per left-padding offset of the batch, on that offset's keys: each sample exactly
    as alone."""
    if impl != "reference" and variant.absolute_positions:
        groups = _offset_groups(call, variant)
        if groups is not None:
            return _by_offset(call, groups, lambda part: _sparse_paths(part, variant, impl))
    return _sparse_paths(call, variant, impl)


def _offset_groups(call: AttnCall, variant: Any) -> list[tuple[int, list[int]]] | None:
    """[(offset, batch rows)] of the samples' first real key slots; None when all are 0."""
    valid = _key_valid(call.mask)
    if valid is None:
        return None
    first = valid.int().argmax(-1)
    k_len = valid.shape[-1]
    count = valid.sum(-1)
    last = k_len - 1 - valid.flip(-1).int().argmax(-1)
    if bool(((count > 0) & (last - first + 1 != count)).any()):
        raise ValueError(
            f"{variant.name} places its pattern at positions of each sample's own sequence, which needs each sample's "
            "tokens to be one contiguous run (left or right padding); this attention mask has gaps inside a sample."
        )
    if not bool(first.any()):
        return None
    groups: dict[int, list[int]] = {}
    for row, offset in enumerate(first.tolist()):
        groups.setdefault(offset, []).append(row)
    return sorted(groups.items())


def _by_offset(call: AttnCall, groups: list[tuple[int, list[int]]], run: Callable[[AttnCall], torch.Tensor]) -> torch.Tensor:
    """`run` on each group's samples with the keys before its offset (and the queries there,
    which are padding) left out; their outputs are zero."""
    batch, heads, q_len, _ = call.query.shape
    out = call.query.new_zeros(batch, q_len, heads, call.value.shape[-1])
    for offset, rows in groups:
        skip = max(0, offset - call.lead)
        if skip >= q_len:
            continue
        idx = torch.tensor(rows, device=call.query.device)
        mask = call.mask[idx]
        part = call.replace(
            query=call.query[idx, :, skip:], key=call.key[idx, :, offset:], value=call.value[idx, :, offset:],
            mask=(mask[..., skip:, offset:] if mask.shape[-2] > 1 else mask[..., offset:]),
            lead=call.lead + skip - offset, router=None if call.router is None else call.router[idx, :, offset:],
        )
        out[idx, skip:] = run(part)
    return out


def _sparse_paths(call: AttnCall, variant: Any, impl: str) -> torch.Tensor:
    """The block-sparse path, a pattern's own layout, flex, or the masked reference; (B, Q, H, D)."""
    module, query, key, value, mask = call.module, call.query, call.key, call.value, call.mask
    causal, scale, drop = call.causal, call.scale, call.dropout
    k_len = key.shape[2]
    k_pos = torch.arange(k_len, device=query.device)
    q_pos = k_pos[k_len - query.shape[2]:]
    if variant.choice == "expert":  # MoSA: heads choose their tokens
        out = expert_choice_attention(query, key, value, mask, variant, call.router, scale, drop)
        return out.transpose(1, 2).contiguous()
    if impl == "reference":
        out, _ = materialized_attention(call, [variant])
        return out.transpose(1, 2).contiguous()
    sinks = variant.sink_tokens(module, k_len)
    sink = variant.sink_logits(module)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    # self-attention of a pattern with its own dense layout (the block path reads whole key
    # blocks for scattered keys); fixed's own blocks are large, so its training keeps the block
    # path, whose SDPA calls have a fused backward (the layout's plain matmuls were 0.77x dense)
    if impl == "auto" and variant.layout and query.shape[2] == k_len and not (variant.layout == "fixed" and training):
        valid = _plain_key_padding(mask, causal)
        if valid is not False:
            extra = _layout_sinks(module, variant, sinks, sink)
            if variant.layout == "strided":
                out = strided_attention(query, key, value, valid, variant.stride, causal, scale, drop, extra)
            else:
                out = fixed_attention(query, key, value, valid, variant.block, variant.summary, causal, scale, drop, extra)
            return out.transpose(1, 2).contiguous()
    out = None
    use_flex = impl == "flex" or (impl == "auto" and query.device.type == "cuda" and drop == 0 and query.shape[2] >= FLEX_MIN_TOKENS)
    if use_flex:
        out = None if sink is not None else flex_sparse_attention(query, key, value, mask, variant, module, q_pos, k_pos, causal, scale, sinks)
        if out is None and impl == "flex":
            raise ValueError(f"{variant.name} (choice {variant.choice!r}, sink_logit {variant.sink_logit}) has no FlexAttention form; use 'auto'")
    if out is None:
        out = block_sparse_attention(query, key, value, mask, variant, module, q_pos, k_pos, causal, scale, drop, sinks, sink)
    if out is None:  # a dense layer of the pattern
        if sink is not None:  # the sink logit still joins the softmax
            return materialized_attention(call, [variant])[0].transpose(1, 2).contiguous()
        return sdpa_attention_forward(module, query, key, value, mask, dropout=drop, scaling=scale, is_causal=causal)[0]
    return out.transpose(1, 2).contiguous()


@dataclass
class _LayoutSinks:
    """What a pattern layout adds to its pieces: the first `tokens` keys for every query (those
    its own pieces do not already cover, by `covered(i, j)`), and a per-head `logit` in the
    softmax denominator."""

    tokens: int
    covered: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    logit: torch.Tensor | None


def _layout_sinks(module: nn.Module, variant: Any, sinks: int, sink: torch.Tensor | None) -> _LayoutSinks | None:
    if not sinks and sink is None:
        return None
    return _LayoutSinks(sinks, lambda i, j: variant.allowed(module, i, j, 0), sink)


# The last mask `_plain_key_padding` read (weakly) and its answer: every layer of a forward
# passes the same mask object, so the O(B Q K) comparison runs once per forward. One tuple,
# read once per call, so threads at worst recompute.
_plain_seen: tuple[Any, bool, Any] | None = None


def _plain_key_padding(mask: torch.Tensor | None, causal: bool) -> torch.Tensor | None | bool:
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


# The CPU flash kernel: like SDPA, and it returns each row's log-sum-exp (no gradient through it).
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _inference_flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float) -> Any:
    """The CPU flash kernel when nothing needs a gradient (its log-sum-exp has none), else None."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    usable = _CPU_FLASH is not None and not needs_grad and dropout == 0 and query.device.type == "cpu"
    return _CPU_FLASH if usable else None


def _layout_setup(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_valid: torch.Tensor | None, size: int, dropout: float
) -> tuple[Any, ...]:
    """Shared start of the pattern layouts: queries as (B, G, g, n, size, D) blocks, K/V and key
    validity padded to n * size, and the CPU flash kernel when no gradient is needed."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    n = -(-length // size)
    pad = n * size - length
    valid = key_valid if key_valid is not None else torch.ones(batch, length, dtype=torch.bool, device=query.device)
    valid = F.pad(valid, (0, pad), value=False)
    q = F.pad(query, (0, 0, 0, pad)).view(batch, kv_heads, heads // kv_heads, n, size, dim)
    k, v = (F.pad(t, (0, 0, 0, pad)) for t in (key, value))
    return q, k, v, valid, n, _inference_flash(query, key, value, dropout)


def _piece(
    flash: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, static: bool, scale: float,
    dropout: float, causal_block: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of q (B, G, g, X, R, D) over k, v (B, G, 1, X, W, D) under keep (broadcast
    to (B, G, g, X, R, W)) -> output (B, G, g, X, R, D) and log-sum-exp (B, G, g, X, R). Through
    the CPU flash kernel when given (inference; `causal_block`: keep is exactly causal within
    square blocks, so the kernel's own causal mode skips the upper half), else plain matmuls
    with autograd (attention dropout drops this piece's probabilities, which is dropping them
    from the merged softmax)."""
    if flash is not None:
        return _fused_piece(flash, q, k, v, keep, static, scale, causal_block and static)
    scores = (torch.matmul(q, k.transpose(-1, -2)) * scale).masked_fill(~keep, torch.finfo(q.dtype).min)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    if dropout > 0:
        probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs, v), lse


def _sink_pieces(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, extra: _LayoutSinks | None, causal: bool,
    scale: float,
) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """A layout's pieces for its sinks: q (B, G, g, n, size, D) as all n * size rows against the
    first `tokens` keys its own pieces do not reach (`_sink_piece`), and the sink logit as a
    piece without output whose log-sum-exp is the logit. Shaped as the layout's pieces."""
    if extra is None:
        return []
    batch, kv_heads, groups, n, size, dim = q.shape
    pieces: list[tuple[torch.Tensor | None, torch.Tensor]] = []
    if extra.tokens:
        count = min(extra.tokens, k.shape[2])
        rows = torch.arange(n * size, device=q.device)
        uncovered = ~extra.covered(rows[:, None], rows[None, :count])
        keys = valid[:, None, None, :count]  # (B, 1, 1, count): padding keys stay out
        out, lse = _sink_piece(q.reshape(batch, kv_heads * groups, n * size, dim), k, v, count, uncovered, rows, causal, keys, scale)
        pieces.append((out.view(q.shape[:-1] + (-1,)), lse.view(q.shape[:-1])))
    if extra.logit is not None:
        pieces.append((None, extra.logit.float().view(1, kv_heads, groups, 1, 1).expand(batch, -1, -1, n, size)))
    return pieces


def _merge(pieces: Sequence[tuple[torch.Tensor | None, torch.Tensor]]) -> torch.Tensor:
    """Outputs of attention over disjoint key sets, merged by their log-sum-exps; a piece with no
    output (None: a sink logit) only adds to the denominator. The weights are computed on the
    (..., rows) log-sum-exps; without autograd the outputs accumulate in place."""
    total = torch.logsumexp(torch.stack([lse.float() for _, lse in pieces]), dim=0)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for piece in pieces for t in piece)
    dtype = next(out.dtype for out, _ in pieces if out is not None)
    merged = None
    for out, lse in pieces:
        if out is None:
            continue
        weight = torch.exp(lse.float() - total)[..., None]
        if merged is None:  # the first piece's tensor is the callers' own: rescaled in place
            merged = out.float() * weight if grad or out.dtype != torch.float32 else out.mul_(weight)
        elif grad:
            merged = merged + out.float() * weight
        else:
            merged.addcmul_(out.float(), weight)
    return merged.to(dtype)  # the kernels' log-sum-exps are float32 whatever the inputs


def strided_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_valid: torch.Tensor | None, stride: int,
    causal: bool, scale: float, dropout: float, sinks: _LayoutSinks | None = None,
) -> torch.Tensor:
    """The strided pattern of Child et al. 2019 as two dense pieces merged by log-sum-exp, for
    self-attention without a cache (Q = K): (B, Hq, T, D) -> (B, Hq, T, D).

    The band |i - j| < stride runs by blocks of `stride` queries over their 2 (causal) or 3
    neighbouring key blocks (a strided view of K/V, no gather). The same-residue keys (i - j a
    non-zero multiple of stride) are contiguous in the residue-major layout (position a*s + r
    -> [r, a]): T/stride sequences of T/stride tokens, attended densely."""
    batch, heads, length, dim = query.shape
    s = stride
    q, k, v, valid, n, flash = _layout_setup(query, key, value, key_valid, s, dropout)
    static = key_valid is None
    # band: query block a reads the key blocks a-1, a (and a+1 unless causal)
    width = (2 if causal else 3) * s
    front, back = s, 0 if causal else s
    k_win, v_win = (F.pad(t, (0, 0, front, back)).unfold(2, width, s).transpose(-1, -2)[:, :, None] for t in (k, v))
    u = torch.arange(s, device=query.device)[:, None]
    t = torch.arange(width, device=query.device)[None, :]
    near = (t > u) & (t < u + 2 * s) & ((t <= u + s) if causal else True)  # |i - j| < s, j <= i when causal
    keep_band = near & F.pad(valid, (front, back), value=False).unfold(1, width, s)[:, None, None, :, None, :]
    band = _piece(flash, q, k_win, v_win, keep_band, static, scale, dropout)
    # same residue: position a*s + r at [r, a]
    k_r, v_r = (t.view(batch, k.shape[1], n, s, dim).transpose(-3, -2)[:, :, None] for t in (k, v))  # (B, G, 1, s, n, D)
    a = torch.arange(n, device=query.device)
    other = (a[None, :] < a[:, None]) if causal else (a[None, :] != a[:, None])  # key index b vs query index a
    keep_res = other & valid.view(batch, n, s).transpose(1, 2)[:, None, None, :, None, :]
    out_r, lse_r = _piece(flash, q.transpose(-3, -2), k_r, v_r, keep_res, static, scale, dropout)
    extra = _sink_pieces(q, k, v, valid, sinks, causal, scale)
    out = _merge([band, (out_r.transpose(-3, -2), lse_r.transpose(-2, -1)), *extra])
    return out.reshape(batch, heads, n * s, -1)[:, :, :length]


def fixed_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_valid: torch.Tensor | None, block: int,
    summary: int, causal: bool, scale: float, dropout: float, sinks: _LayoutSinks | None = None,
) -> torch.Tensor:
    """The fixed pattern of Child et al. 2019 as two dense pieces merged by log-sum-exp, for
    self-attention without a cache: each query's own block of `block` tokens (causal inside
    for decoders; blocks as a batch, K/V as views), and the last `summary` tokens of the other
    blocks (earlier ones for decoders), gathered once into n * summary keys that every query
    reads under a block mask. (B, Hq, T, D) -> (B, Hq, T, D)."""
    batch, heads, length, dim = query.shape
    q, k, v, valid, n, flash = _layout_setup(query, key, value, key_valid, block, dropout)
    static = key_valid is None
    kv_heads = k.shape[1]
    blocks = valid.view(batch, n, block)
    kb, vb = (t.view(batch, kv_heads, n, block, dim)[:, :, None] for t in (k, v))  # (B, G, 1, n, block, D)
    inside = torch.ones(block, block, dtype=torch.bool, device=query.device)
    inside = inside.tril() if causal else inside
    own = _piece(flash, q, kb, vb, inside & blocks[:, None, None, :, None, :], static, scale, dropout, causal_block=causal)
    ks, vs = (t[:, :, :, :, block - summary :].reshape(batch, kv_heads, 1, 1, n * summary, dim) for t in (kb, vb))
    q_block = torch.arange(n * block, device=query.device) // block
    k_block = torch.arange(n * summary, device=query.device) // summary
    other = (k_block[None, :] < q_block[:, None]) if causal else (k_block[None, :] != q_block[:, None])
    keep_sum = other & blocks[:, :, block - summary :].reshape(batch, 1, 1, 1, 1, n * summary)
    out_s, lse_s = _piece(flash, q.reshape(batch, kv_heads, -1, 1, n * block, dim), ks, vs, keep_sum, static, scale, dropout)
    extra = _sink_pieces(q, k, v, valid, sinks, causal, scale)
    out = _merge([own, (out_s.view(own[0].shape), lse_s.view(own[1].shape)), *extra])
    return out.reshape(batch, heads, n * block, -1)[:, :, :length]


def _fused_piece(
    flash: Callable[..., tuple[torch.Tensor, torch.Tensor]], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    keep: torch.Tensor, static: bool, scale: float, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_piece` through the CPU flash kernel. The g query heads of a K/V head are stacked as rows
    of one call (no K/V copies per query head) and the X blocks are the kernel's heads, so with
    `static` keep (no padding: the same for every batch entry) one mask serves all calls;
    `causal`: keep is causal within square blocks (one query head per K/V head), the kernel's mode."""
    batch, kv_heads, groups, x, rows, dim = q.shape
    width = k.shape[-2]
    q4 = q.permute(0, 1, 3, 2, 4, 5).reshape(batch * kv_heads, x, groups * rows, dim)
    k4, v4 = (t[:, :, 0].reshape(batch * kv_heads, x, width, t.shape[-1]) for t in (k, v))
    if causal and groups == 1:
        out, lse = flash(q4, k4, v4, 0.0, True, scale=scale)
    else:
        mask = keep[:1].expand(1, 1, groups, x, rows, width) if static else keep.expand(batch, kv_heads, groups, x, rows, width)
        mask = mask.permute(0, 1, 3, 2, 4, 5).reshape(-1, x, groups * rows, width)  # (1 or B*G, X, g*R, W)
        out, lse = flash(q4, k4, v4, 0.0, False, attn_mask=_float_mask(mask, q.dtype), scale=scale)
    out = out.view(batch, kv_heads, x, groups, rows, -1).permute(0, 1, 3, 2, 4, 5)
    return out, lse.view(batch, kv_heads, x, groups, rows).permute(0, 1, 3, 2, 4)


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
    bias_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None],
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
        attn_mask = _additive_mask(bias_fn(qp, k_pos), m, qp, k_pos, causal, query.dtype)
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
    bias_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None],
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    scale: float,
    dropout: float,
    terms: Sequence[RelationTerm] = (),
) -> torch.Tensor:
    """softmax(q k^T * scale + bias + mask) v, every matrix materialised, float32 softmax.

    Relation terms are gathered into (1|B, Q, K, D) tensors (per head: (H, 1|B, Q, K, D)),
    exactly the T x T x d materialisation the relational path avoids."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1).float()
    value = value.repeat_interleave(groups, dim=1).float()
    q = query.float()
    scores = torch.matmul(q, key.transpose(-1, -2)) * scale
    gathered = [(term, term_labels(term, q_pos, k_pos)) for term in terms]
    for term, labels in gathered:
        if term.key is not None:
            table = term.key.float()[labels] if term.key.dim() == 2 else term.key.float()[:, labels]
            pattern = "bhqd,bqkd->bhqk" if term.key.dim() == 2 else "bhqd,hbqkd->bhqk"
            scores = scores + torch.einsum(pattern, q, table) * scale
        if term.bias is not None:
            scores = scores + term.bias.float()[:, labels].transpose(0, 1)
    add = _additive_mask(bias_fn(q_pos, k_pos), mask, q_pos, k_pos, causal, torch.float32)
    if add is not None:
        scores = scores.masked_fill(~add, torch.finfo(torch.float32).min) if add.dtype == torch.bool else scores + add
    probs = torch.softmax(scores, dim=-1)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    out = torch.matmul(probs, value)
    for term, labels in gathered:
        if term.value is not None:
            table = term.value.float()[labels] if term.value.dim() == 2 else term.value.float()[:, labels]
            pattern = "bhqk,bqkd->bhqd" if term.value.dim() == 2 else "bhqk,hbqkd->bhqd"
            out = out + torch.einsum(pattern, probs, table)
    return out.to(query.dtype)


# ------------------------------------------------------------------ materialised path
def materialized_attention(call: AttnCall, variants: Sequence[Variant]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every axis at once over materialised scores: (out (B, H, Q, D), probabilities (B, H, Q, K)).

    scores = q k^T * scale + score biases + relation terms (q . A^K gathered by label), masked
    by the call's mask (or causality) and each sparse variant's `pair_mask` at positions in the
    samples' own sequences; softmax in float32 for half precision; out = P v + (P summed per
    label) A^V, times MoSA's router gate or MoH's head weights. No Python depends on tensor
    values, so torch.compile traces it whole; memory is O(B H Q K), as eager attention's.
    The probabilities are zero where a head does not compute a token (MoH, MoSA)."""
    module, query = call.module, call.query
    batch, heads, q_len, _ = query.shape
    groups = heads // call.key.shape[1]
    k_len = call.key.shape[2]
    dtype = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    q = query.to(dtype)
    k = call.key.to(dtype).repeat_interleave(groups, dim=1)
    v = call.value.to(dtype).repeat_interleave(groups, dim=1)
    q_slots, k_slots = call.q_slots, torch.arange(k_len, device=query.device)
    scores = torch.matmul(q, k.transpose(-1, -2)) * call.scale
    placed = []
    for variant in variants:
        term = variant.relation_term(module, heads, q_slots, k_slots, call.inputs)
        if term is not None and (term.key is not None or term.value is not None):
            labels = term_labels(term, q_slots, k_slots).expand(batch, q_len, k_len)
            index = labels[:, None].expand(batch, heads, q_len, k_len)
            if term.key is not None:
                scores = scores + _project(q, term.key.to(dtype), transpose=True).mul(call.scale).gather(-1, index)
            if term.bias is not None:
                scores = scores + term.bias.to(dtype)[:, labels].transpose(0, 1)
            placed.append((term, index))
        elif variant.axis == "scores":
            bias = variant.score_bias(module, heads, q_slots, k_slots)
            if bias is not None:
                scores = scores + bias.to(dtype)
    keep: torch.Tensor | None
    if call.mask is None:
        keep = (k_slots[None, :] <= q_slots[:, None]) if call.causal else None
    elif call.mask.dtype == torch.bool:
        keep = call.mask
    else:
        scores, keep = scores + call.mask.to(dtype), None
    rows = None  # (B, H, Q) weight of each (token, head) output
    sink = None  # (H,) sink logits of a pattern
    for variant in variants:
        if variant.axis != "sparsity":
            continue
        if variant.choice == "expert":
            pattern, rows = _expert_choice_pattern(call, variant)
        else:
            q_pos, k_pos, valid, q_valid = positions(call, variant.absolute_positions)
            pattern = variant.pair_mask(module, q_pos, k_pos, query, call.key, valid, q_valid)
            sinks = variant.sink_tokens(module, k_len)
            if pattern is not None and sinks:
                pattern = pattern | (k_pos < sinks)[:, None, None, :]
            sink = variant.sink_logits(module)
        if pattern is not None:
            if call.causal:
                pattern = pattern & (k_slots[None, :] <= q_slots[:, None])
            keep = pattern if keep is None else keep & pattern
    if keep is not None:
        scores = scores.masked_fill(~keep, torch.finfo(dtype).min)
    if sink is not None:  # one more column: the sink logit in the denominator, no value
        column = sink.to(dtype)[None, :, None, None].expand(batch, heads, q_len, 1)
        probs = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    if keep is not None:  # rows that see no key (padding queries, tokens MoSA leaves) get nothing
        probs = probs * keep.any(-1, keepdim=True)
    if call.dropout > 0:
        probs = F.dropout(probs, p=call.dropout)
    out = torch.matmul(probs, v)
    for term, index in placed:
        if term.value is not None:
            table = term.value.to(dtype)
            sums = probs.new_zeros(batch, heads, q_len, table.shape[-2]).scatter_add(-1, index, probs)
            out = out + _project(sums, table, transpose=False)
    gating = [variant for variant in variants if variant.axis == "gating"]
    if gating:
        weights, used = gating[0].head_weights(module, query, _query_valid(call), call.inputs)
        head_rows = weights.to(dtype).transpose(1, 2)
        rows = head_rows if rows is None else rows * head_rows
        probs = probs * used.transpose(1, 2)[..., None]
    if rows is not None:
        out = out * rows[..., None]
    return out.to(query.dtype), probs


def _expert_choice_pattern(call: AttnCall, variant: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """MoSA as a mask: (keep (B, H, Q, K), gate (B, H, Q): the router score of tokens a head
    processes, 0 for the others). In a full forward each head keeps the top `tokens(n)` of
    its sample's n tokens; a query after cached keys (decoding) chooses among the tokens up to
    itself, as in `expert_choice_attention`. Padding never competes."""
    batch, heads, q_len, _ = call.query.shape
    k_len = call.key.shape[2]
    logits = call.router
    if logits.shape[-1] < k_len:  # an uncropped static cache: empty slots after the filled ones
        logits = F.pad(logits, (0, k_len - logits.shape[-1]))
    _, _, valid, _ = positions(call, absolute=True)
    valid = valid if valid is not None else torch.ones(1, k_len, dtype=torch.bool, device=logits.device)
    k_slots, q_slots = torch.arange(k_len, device=logits.device), call.q_slots
    if isinstance(call.lead, int) and call.lead == 0:  # a full forward: one choice over each sample
        horizon = valid[:, None, None, :]  # (1|B, 1, 1, K)
    else:  # each query among the valid tokens up to itself
        horizon = valid[:, None, None, :] & (k_slots[None, :] <= q_slots[:, None])[None, None]  # (1|B, 1, Q, K)
    ranked = logits[:, :, None, :].masked_fill(~horizon, float("-inf"))
    order = torch.argsort(ranked, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(k_len, device=order.device).expand_as(order))
    count = variant.token_counts(horizon.sum(-1, keepdim=True))
    chosen = (rank < count) & horizon  # (B, H, 1|Q, K)
    processed = chosen.expand(batch, heads, q_len, k_len).gather(-1, q_slots[None, None, :, None].expand(batch, heads, q_len, 1))[..., 0]
    keep = chosen & processed[..., None]
    gate = torch.sigmoid(logits).gather(-1, q_slots[None, None, :].expand(batch, heads, q_len)) * processed
    return keep, gate


# ----------------------------------------------------------------- relational path
def term_labels(term: RelationTerm, q_pos: torch.Tensor, k_pos: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
    """Labels (1|B, c, K') of a term for the query rows `rows` and keys `k_pos`."""
    if callable(term.labels):
        return term.labels(q_pos[rows], k_pos)
    if term.labels is not None:
        return term.labels[:, rows, : k_pos.shape[0]]
    m = term.max_distance
    return ((k_pos[None, :] - q_pos[rows, None]).clamp(-m, m) + m)[None]


class _Band:
    """Clipped relative positions r = clip(j - i, -m, m) + m for c consecutive queries at
    positions p0.. against keys 0..K'-1, in three column ranges: keys before `lo` all have label
    0, keys from `hi` on all have label 2m, and the window [lo, hi) (width c + 2m) holds the
    rest. Per-label values then cost O(c (c + m)) gathers plus two broadcasts, not O(c K')."""

    def __init__(self, q_first: int, rows: int, keys: int, m: int, device: torch.device) -> None:
        self.m = m
        self.lo = max(0, q_first - m)
        self.hi = min(keys, q_first + rows + m)
        cols = torch.arange(self.lo, self.hi, device=device)
        qpos = torch.arange(q_first, q_first + rows, device=device)
        self.window = (cols[None, :] - qpos[:, None]).clamp(-m, m) + m  # (c, hi - lo)

    def add(self, scores: torch.Tensor, per_label: torch.Tensor, shift: bool) -> None:
        """scores[..., j] += per_label[..., r_ij] in place. `shift`: leave out a per-row
        constant (per_label[..., 0]), which a softmax ignores, so the left range costs nothing."""
        if shift:
            per_label = per_label - per_label[..., :1]
        elif self.lo > 0:
            scores[..., : self.lo] += per_label[..., :1]
        index = self.window.expand(*per_label.shape[:2], *self.window.shape)
        scores[..., self.lo : self.hi] += per_label.gather(-1, index)
        if self.hi < scores.shape[-1]:
            scores[..., self.hi :] += per_label[..., 2 * self.m :]

    def sums(self, x: torch.Tensor) -> torch.Tensor:
        """sum_j x[..., j] per label: (B, H, c, 2m + 1)."""
        size = 2 * self.m + 1
        index = self.window.expand(*x.shape[:2], *self.window.shape)
        out = x.new_zeros(*x.shape[:3], size).scatter_add_(-1, index, x[..., self.lo : self.hi])
        if self.lo > 0:
            out[..., 0] += x[..., : self.lo].sum(-1)
        if self.hi < x.shape[-1]:
            out[..., -1] += x[..., self.hi :].sum(-1)
        return out


class _Labels:
    """Arbitrary labels (1|B, c, K'): gathers and scatter-adds over every pair."""

    def __init__(self, labels: torch.Tensor, shape: torch.Size, num_labels: int) -> None:
        self.index = labels[:, None].expand(shape)
        self.num_labels = num_labels

    def add(self, scores: torch.Tensor, per_label: torch.Tensor, shift: bool) -> None:
        scores += per_label.expand(*scores.shape[:3], -1).gather(-1, self.index)

    def sums(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:3], self.num_labels).scatter_add_(-1, self.index, x)


def _project(x: torch.Tensor, table: torch.Tensor, transpose: bool) -> torch.Tensor:
    """(B, H, c, D) x table (R, D) or (H, R, D): x @ table^T -> (B, H, c, R) if `transpose`,
    else x (B, H, c, R) @ table -> (B, H, c, D)."""
    if table.dim() == 2:
        return torch.matmul(x, table.t() if transpose else table)
    return torch.einsum("bhcd,hrd->bhcr" if transpose else "bhcr,hrd->bhcd", x, table)


def _table_grad(sums: torch.Tensor, x: torch.Tensor, per_head: bool) -> torch.Tensor:
    """Gradient of a (R, D) or (H, R, D) table: sum over batch and rows of sums (B, H, c, R)
    times x (B, H, c, D)."""
    return torch.einsum("bhcr,bhcd->hrd" if per_head else "bhcr,bhcd->rd", sums, x)


@dataclass
class _Rows:
    """What one chunk of query rows shares across heads: its key count, label placements,
    static bias (H, c, K') and mask (bool: True = masked; float: additive)."""

    rows: slice
    keys: int
    places: list[_Band | _Labels]
    bias: torch.Tensor | None
    mask: torch.Tensor | None


@dataclass
class _Plan:
    """Everything but the differentiable tensors: what the chunks of one call compute.

    A chunk is one K/V head with the G query heads that read it and c consecutive queries:
    its scores are one (G*c, D) @ (D, K') matmul per batch entry (grouped heads share K
    without repeating it; G*c rows keep the matmul efficient even when c is small)."""

    terms: Sequence[RelationTerm]
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    mask: torch.Tensor | None
    bias_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]
    causal: bool
    scale: float
    dropout: float
    step: int
    groups: int
    seed: int = 0

    def chunks(self, batch: int, kv_heads: int) -> Iterator[tuple[int, slice, _Rows]]:
        """(K/V head, its query heads, the rows' shared context) per chunk; row chunks outside,
        so what does not depend on the head (labels, masks, static biases) is built once."""
        q_len = self.q_pos.shape[0]
        for start in range(0, q_len, self.step):
            rows = self._rows(slice(start, min(q_len, start + self.step)), batch)
            for kv in range(kv_heads):
                yield kv, slice(kv * self.groups, (kv + 1) * self.groups), rows

    def _rows(self, rows: slice, batch: int) -> _Rows:
        q_len, k_len = self.q_pos.shape[0], self.k_pos.shape[0]
        # positions are contiguous: a causal chunk sees keys up to its last query's position
        keys = k_len - q_len + rows.stop if self.causal else k_len
        count = rows.stop - rows.start
        qp, kp = self.q_pos[rows], self.k_pos[:keys]
        shape = (batch, self.groups, count, keys)
        places: list[_Band | _Labels] = []
        for term in self.terms:
            if term.labels is None:
                places.append(_Band(k_len - q_len + rows.start, count, keys, term.max_distance, qp.device))
            else:
                places.append(_Labels(term_labels(term, self.q_pos, kp, rows), shape, term.num_labels))
        mask = self.mask
        if mask is not None:
            mask = mask[..., :keys] if mask.shape[-2] == 1 else mask[..., rows, :keys]
            mask = ~mask if mask.dtype == torch.bool else mask
        elif self.causal:
            # only the last c keys can lie after a query of this chunk
            mask = kp[keys - count :][None, :] > qp[:, None]
        return _Rows(rows, keys, places, self.bias_fn(qp, kp), mask)

    def probabilities(
        self, qs: torch.Tensor, k: torch.Tensor, heads: slice, rows: _Rows, tables: list[dict[str, torch.Tensor]]
    ) -> torch.Tensor:
        """softmax of one chunk's scores (B, G, c, K'): qs = its scaled queries (B, G, c, D),
        k = its K/V head's keys (B, K', D)."""
        batch, groups, count, dim = qs.shape
        keys = rows.keys
        scores = torch.matmul(qs.reshape(batch, groups * count, dim), k.transpose(-1, -2)).view(batch, groups, count, keys)
        for place, tab in zip(rows.places, tables):
            per_label = None
            if "key" in tab:
                per_label = _project(qs, _heads(tab["key"], heads), transpose=True)
            if "bias" in tab:
                bias = tab["bias"][heads][None, :, None, :]
                per_label = bias if per_label is None else per_label + bias
            if per_label is not None:
                place.add(scores, per_label, shift=True)
        if rows.bias is not None:
            scores += rows.bias[heads].to(scores.dtype)
        mask = rows.mask
        if mask is not None:
            if mask.dtype != torch.bool:
                scores += mask
            elif self.mask is None:  # causal, no mask given: the masked part of the last c keys
                scores[..., keys - count :].masked_fill_(mask, torch.finfo(scores.dtype).min)
            else:
                scores.masked_fill_(mask, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1)

    def keep(self, kv: int, rows: slice, like: torch.Tensor) -> torch.Tensor | None:
        """Dropout's scaled keep mask for a chunk, regenerated identically in the backward pass."""
        if self.dropout <= 0:
            return None
        generator = torch.Generator(device=like.device).manual_seed(self.seed + rows.start * 4099 + kv)
        kept = torch.rand(like.shape, generator=generator, device=like.device) >= self.dropout
        return kept.to(like.dtype).div_(1 - self.dropout)


def _heads(table: torch.Tensor, heads: slice) -> torch.Tensor:
    """A (R, D) table shared by all heads, or the given heads of a per-head (H, R, D) one."""
    return table if table.dim() == 2 else table[heads]


def _tables(terms: Sequence[RelationTerm], flat: Sequence[torch.Tensor | None]) -> list[dict[str, torch.Tensor]]:
    """The flat (key, value, bias) list of every term, as one dict per term (present tables only)."""
    return [
        {name: t for name, t in zip(("key", "value", "bias"), flat[3 * i : 3 * i + 3]) if t is not None}
        for i in range(len(terms))
    ]


class _RelationalAttention(torch.autograd.Function):
    """Shaw et al. 2018, eqs. 3-4, in chunks (see `_Plan`) with a hand-written backward pass
    that recomputes each chunk's probabilities (Rabe & Staats 2021; FlashAttention's recipe), so
    memory stays O(chunk) in training too: out, dq, dk, dv and the tables' gradients are the
    only full-size tensors."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _Plan, *flat: torch.Tensor | None) -> torch.Tensor:
        tables = _tables(plan.terms, flat)
        batch, heads, q_len, _ = q.shape
        # (B, Q, H, D) storage: the layout transformers wants back, so no copy follows
        out = q.new_empty(batch, q_len, heads, v.shape[-1]).transpose(1, 2)
        for kv, hs, chunk in plan.chunks(batch, k.shape[1]):
            rows, keys, places = chunk.rows, chunk.keys, chunk.places
            qs = q[:, hs, rows] * plan.scale
            probs = plan.probabilities(qs, k[:, kv, :keys], hs, chunk, tables)
            keep = plan.keep(kv, rows, probs)
            if keep is not None:
                probs.mul_(keep)
            b, g, c, _ = probs.shape
            o = torch.matmul(probs.view(b, g * c, keys), v[:, kv, :keys]).view(b, g, c, -1)
            for tab, place in zip(tables, places):
                if "value" in tab:
                    o += _project(place.sums(probs), _heads(tab["value"], hs), transpose=False)
            out[:, hs, rows] = o
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, *flat)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, *flat = ctx.saved_tensors
        plan: _Plan = ctx.plan
        tables = _tables(plan.terms, flat)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dtables = [{name: torch.zeros_like(t) for name, t in tab.items()} for tab in tables]
        for kv, hs, chunk in plan.chunks(q.shape[0], k.shape[1]):
            rows, keys, places = chunk.rows, chunk.keys, chunk.places
            qs = q[:, hs, rows] * plan.scale
            probs = plan.probabilities(qs, k[:, kv, :keys], hs, chunk, tables)
            b, g, c, _ = probs.shape
            do = grad_out[:, hs, rows]
            do_flat = do.reshape(b, g * c, -1)
            keep = plan.keep(kv, rows, probs)
            dropped = probs if keep is None else probs * keep
            # value side: out = dropped @ (v + A^V)
            dprobs = torch.matmul(do_flat, v[:, kv, :keys].transpose(-1, -2)).view(b, g, c, keys)
            dv[:, kv, :keys].baddbmm_(dropped.view(b, g * c, keys).transpose(-1, -2), do_flat)
            for tab, dtab, place in zip(tables, dtables, places):
                if "value" in tab:
                    table = _heads(tab["value"], hs)
                    place.add(dprobs, _project(do, table, transpose=True), shift=False)
                    grad = _table_grad(place.sums(dropped), do, table.dim() == 3)
                    _heads(dtab["value"], hs).add_(grad)
            if keep is not None:
                dprobs.mul_(keep)
                row_dot = (probs * dprobs).sum(-1, keepdim=True)
            else:
                row_dot = (do * out[:, hs, rows]).sum(-1, keepdim=True)  # = sum_j P_ij dP_ij
            dscores = dprobs.sub_(row_dot).mul_(probs)
            del probs, dropped
            # score side: scores = qs @ (k + A^K)^T + bias
            ds_flat = dscores.view(b, g * c, keys)
            dqs = torch.matmul(ds_flat, k[:, kv, :keys]).view(b, g, c, -1)
            dk[:, kv, :keys].baddbmm_(ds_flat.transpose(-1, -2), qs.reshape(b, g * c, -1))
            for tab, dtab, place in zip(tables, dtables, places):
                if "key" in tab or "bias" in tab:
                    sums = place.sums(dscores)
                    if "key" in tab:
                        table = _heads(tab["key"], hs)
                        dqs += _project(sums, table, transpose=False)
                        _heads(dtab["key"], hs).add_(_table_grad(sums, qs, table.dim() == 3))
                    if "bias" in tab:
                        dtab["bias"][hs] += sums.sum(dim=(0, 2))
            dq[:, hs, rows] = dqs * plan.scale
        grads: list[torch.Tensor | None] = []
        for i, tab in enumerate(dtables):
            grads += [tab.get(name) if flat[3 * i + j] is not None else None for j, name in enumerate(("key", "value", "bias"))]
        return (dq, dk, dv, None, *grads)


def relational_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    bias_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None],
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    scale: float,
    dropout: float,
    terms: Sequence[RelationTerm] = (),
) -> torch.Tensor:
    """Relation-aware attention (Shaw et al. 2018, eqs. 3-4) in query chunks; (B, Hq, Q, D).

    Per chunk of c queries: scores q k^T * scale (B, H, c, K') plus each label's score gathered
    by label (clipped relative positions: a band, see `_Band`), static biases, mask, softmax,
    probs @ v plus (probs summed per label) @ A^V. Causal chunks stop at their last query's
    position (K' <= K); grouped K/V heads are never repeated. The backward pass is written out
    (`_RelationalAttention`). Low-precision inputs run in float32.
    """
    batch, num_heads, q_len, _ = query.shape
    dtype = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    k_len, groups = key.shape[2], num_heads // key.shape[1]
    step = max(1, min(q_len, RELATION_CHUNK_ELEMENTS // max(1, batch * groups * k_len)))
    flat = [t if t is None else t.to(dtype) for term in terms for t in (term.key, term.value, term.bias)]
    plan = _Plan(terms, q_pos, k_pos, mask, bias_fn, causal, scale, dropout, step, groups)
    if dropout > 0:
        plan.seed = int(torch.randint(0, 2**62, (), device="cpu"))
    out = _RelationalAttention.apply(query.to(dtype), key.to(dtype), value.to(dtype), plan, *flat)
    return out.to(query.dtype)


# -------------------------------------------------------------------- block-sparse path
# Scores (and gathered K/V) per chunk of query blocks in the block-sparse path.
SPARSE_CHUNK_ELEMENTS = 1 << 22
# Query tokens from which inference reads the sinks outside a query block's gathered keys as a
# piece merged by log-sum-exp (below, e.g. decoding steps, their blocks are gathered).
SINK_MERGE_MIN_TOKENS = 128
# Query rows per block of the block-sparse path (a multiple of the key block): each query block
# copies its key blocks once, so taller query blocks copy less per FLOP.
SPARSE_QUERY_TOKENS = 128


def chosen_blocks(
    variant: Any, module: nn.Module, q_pos: torch.Tensor, num_blocks: int, query: torch.Tensor, key: torch.Tensor,
    key_valid: torch.Tensor | None, causal: bool,
) -> torch.Tensor | None:
    """The variant's key-block choice per token (1|B, 1|H, Q, N), without blocks after the
    token's own when causal; None for a dense layer."""
    chosen = variant.token_blocks(module, q_pos, num_blocks, query, key, key_valid)
    if chosen is None or not causal:
        return chosen
    block = variant.key_block(module)
    return chosen & (torch.arange(num_blocks, device=q_pos.device)[None, :] <= (q_pos // block)[:, None])


def query_rows(variant: Any, block: int, q_len: int) -> int:
    """Query rows per block of the block-sparse path: taller blocks copy K/V less per FLOP, but
    when the choice of key blocks varies by query block (power, MoBA) a taller block reads the
    union of more choices; decoding takes a block of the new tokens only."""
    rows = block * max(1, SPARSE_QUERY_TOKENS // block) if variant.choice == "rule" else block
    return min(rows, q_len)


def _key_blocks(t: torch.Tensor, num_blocks: int, block: int) -> torch.Tensor:
    """(B, H, K, D) -> (B, H, num_blocks, block, D), zero-padding the last block (a view when
    K fills the blocks exactly: a KV cache is not copied)."""
    pad = num_blocks * block - t.shape[2]
    return (F.pad(t, (0, 0, 0, pad)) if pad else t).reshape(*t.shape[:2], num_blocks, block, t.shape[-1])


def _pattern_keep(
    base: torch.Tensor | None, choice: torch.Tensor | None, variant: Any, module: nn.Module, rows: torch.Tensor,
    kpos: torch.Tensor, k_len: int, causal: bool, sinks: int = 0,
) -> torch.Tensor | None:
    """Which gathered keys each query attends (None = all): among real key slots (`base`), the
    pattern's (the token's own block `choice` and the variant's token rule) and the first
    `sinks` positions, causally; query positions `rows` (..., 1), key positions `kpos` (..., 1, K')."""
    keep = choice
    rule = variant.allowed(module, rows, kpos, k_len)
    if rule is not None:
        keep = rule if keep is None else keep & rule
    if sinks and keep is not None:
        keep = keep | (kpos < sinks)
    for extra in (base, (kpos <= rows) if causal else None):
        if extra is not None:
            keep = extra if keep is None else keep & extra
    return keep


def _sink_column(bias: torch.Tensor, sink: torch.Tensor, hx: int, gx: int, rows: int) -> torch.Tensor:
    """`bias` (P, 1|hx, ..., gx * rows, C) with one more column holding each query head's sink
    logit (head = K/V-index * gx + g): the score of a zero key whose value is zero, which is the
    logit's place in the softmax denominator. -> (P, hx, ..., gx * rows, C + 1)."""
    column = sink.to(bias.dtype).view(hx, gx, 1).expand(hx, gx, rows).reshape(hx, gx * rows, 1)
    column = column.view(1, hx, *([1] * (bias.dim() - 4)), gx * rows, 1)
    shape = (bias.shape[0], hx, *bias.shape[2:-1], 1)
    return torch.cat([bias.expand(*shape[:-1], bias.shape[-1]), column.expand(shape)], dim=-1)


def _zero_key(t: torch.Tensor) -> torch.Tensor:
    """K or V (..., C, D) with one more key of zeros (see `_sink_column`)."""
    return F.pad(t, (0, 0, 0, 1))


def _selected_blocks(token_blocks: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of queries, the union of its tokens' key blocks as index lists.

    token_blocks (Bs, Hs, Q, N) bool -> (indices (Bs, Hs, nq, S) ascending, valid (Bs, Hs, nq, S)),
    S = the largest union; shorter lists are padded with block 0, marked invalid."""
    bs, hs, q_len, num = token_blocks.shape
    nq = -(-q_len // block)
    padded = F.pad(token_blocks, (0, 0, 0, nq * block - q_len))
    union = padded.view(bs, hs, nq, block, num).any(3)
    counts = union.sum(-1)
    width = max(1, int(counts.max()))
    order = torch.argsort((~union).to(torch.uint8), dim=-1, stable=True)[..., :width]
    valid = torch.arange(width, device=union.device) < counts[..., None]
    return torch.where(valid, order, 0), valid


def _chunks(count: int, step: int, flags: list[bool] | None) -> Iterator[tuple[slice, bool]]:
    """Slices of at most `step` query blocks, each split where `flags` (per block) changes."""
    for a in range(0, count, step):
        end = min(count, a + step)
        while a < end:
            b = a + 1
            while flags is not None and b < end and flags[b] == flags[a]:
                b += 1
            b = end if flags is None else b
            yield slice(a, b), bool(flags is not None and flags[a])
            a = b


def _sink_scores(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sinks: int, uncovered: torch.Tensor, q_pos: torch.Tensor,
    causal: bool, mask: torch.Tensor | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of every query (B, H, Q, D) against the first `sinks` keys where `uncovered`
    (1|B, 1|H, Q, S) says the main path did not read them, causally and as the mask allows
    (float32, masked ones at the minimum): ((B, H, Q, S), their values (B, H, S, D) float32)."""
    count = min(sinks, key.shape[2])
    groups = query.shape[1] // key.shape[1]
    k, v = (t[:, :, :count].float().repeat_interleave(groups, dim=1) for t in (key, value))
    scores = torch.matmul(query.float(), k.transpose(-1, -2)) * scale
    keep = uncovered[..., :count]
    if causal:
        keep = keep & (torch.arange(count, device=query.device)[None, :] <= q_pos[:, None])
    if mask is not None:
        m = mask[..., :count]
        keep = keep & (m if m.dtype == torch.bool else m == 0)
    return scores.masked_fill(~keep, torch.finfo(torch.float32).min), v


def _sink_piece(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sinks: int, uncovered: torch.Tensor, q_pos: torch.Tensor,
    causal: bool, mask: torch.Tensor | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_sink_scores` as a piece to merge by log-sum-exp: (out (B, H, Q, D) float32, lse (B, H, Q)),
    by plain matmuls (autograd flows)."""
    scores, v = _sink_scores(query, key, value, sinks, uncovered, q_pos, causal, mask, scale)
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]), v), lse


def _with_sinks(
    out: torch.Tensor, lse: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sinks: int,
    uncovered: torch.Tensor | None, q_pos: torch.Tensor, causal: bool, mask: torch.Tensor | None, scale: float,
    sink: torch.Tensor | None,
) -> torch.Tensor:
    """The main path's (out, lse) (B, H, Q, ...) with the sinks it did not read and the sink
    logit joined to every softmax: weights from the (B, H, Q) log-sum-exps, the main output
    rescaled and the sinks' probabilities @ values added, in place (inference only: the main
    path's log-sum-exp comes from the flash kernel, which has no gradient for it)."""
    total = lse.float()
    if sinks:
        scores, v = _sink_scores(query, key, value, sinks, uncovered, q_pos, causal, mask, scale)
        total = torch.logaddexp(total, torch.logsumexp(scores, dim=-1))
    if sink is not None:
        total = torch.logaddexp(total, sink.float()[None, :, None])
    merged = out.float() if out.dtype != torch.float32 else out.contiguous()
    merged.mul_(torch.exp(lse.float() - total)[..., None])
    if sinks:
        batch, heads, q_len, dim = merged.shape
        probs = torch.exp(scores - total[..., None])
        merged.view(batch * heads, q_len, dim).baddbmm_(probs.reshape(batch * heads, q_len, -1), v.reshape(batch * heads, -1, dim))
    return merged.to(out.dtype)


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    variant: Any,
    module: nn.Module,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    scale: float,
    dropout: float,
    sinks: int = 0,
    sink: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Attention computed only on the key blocks a sparse variant keeps; (B, Hq, Q, D), or None
    when the variant leaves this layer dense.

    Queries go in blocks of the variant's key-block size. For each query block, the key blocks
    any of its tokens may read are gathered (K/V heads shared by a group of query heads are
    gathered once, unless the choice differs per head, as MoBA's), and SDPA runs on them with
    the exact token-level mask: the pattern's rule, the token's own block choice, causality,
    padding. Compute and memory are proportional to the gathered blocks; autograd flows
    through the gathers. Chunks of query blocks keep the gathered K/V under
    SPARSE_CHUNK_ELEMENTS floats.

    Sinks (the first `sinks` positions, for every query) inside the gathered blocks are kept by
    the mask. At inference the sinks outside them are a small piece of their own merged by
    log-sum-exp (the CPU flash kernel returns the main path's), so a sink costs no extra block;
    with autograd their blocks join every union instead. `sink` (heads,): a logit per head in
    every softmax denominator (a piece of zero output, or a zero key with that score)."""
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    block = variant.key_block(module)
    num_blocks = -(-k_len // block)
    chosen = chosen_blocks(variant, module, q_pos, num_blocks, query, key, _key_valid(mask), causal)
    if chosen is None:
        return None
    if variant.choice == "token" and q_len > 1:  # one query (decoding): its union is its own choice
        return _per_token_blocks(query, key, value, mask, chosen, variant, module, q_pos, k_pos, causal, scale, dropout,
                                 sinks, sink)
    # long inference calls read the sinks outside the gathered blocks as a merged piece; short
    # ones (decoding) copy them in: fewer, cheaper operations per step
    merge_sinks = (sinks or sink is not None) and q_len >= SINK_MERGE_MIN_TOKENS
    flash = _inference_flash(query, key, value, dropout) if merge_sinks else None
    union_sinks = sinks if flash is None else 0  # sinks added to the gathered blocks (autograd)
    per_head = chosen.shape[1] > 1
    qb = query_rows(variant, block, q_len)
    sel, sel_valid = _selected_blocks(chosen, qb)
    nq, width = sel.shape[2], sel.shape[3]
    # each query head choosing its own blocks (per_head) indexes K/V through its K/V head
    hx, gx = (heads, 1) if per_head else (kv_heads, groups)
    q = F.pad(query, (0, 0, 0, nq * qb - q_len)).view(batch, hx, gx, nq, qb, dim)
    qp = F.pad(q_pos, (0, nq * qb - q_len), value=int(q_pos[-1])).view(nq, qb)
    full_mask = mask
    if mask is not None:  # rows padded to whole query blocks, once
        mask = F.pad(mask, (0, 0, 0, nq * qb - q_len)) if mask.shape[-2] > 1 else mask.expand(-1, -1, nq * qb, -1)
    lowest = torch.finfo(query.dtype).min
    s_cols = torch.arange(min(sinks, k_len), device=query.device)

    def finish(outs: list[torch.Tensor], lses: list[torch.Tensor], uncovered: torch.Tensor | None) -> torch.Tensor:
        # query blocks back in order; at inference the sinks outside them and the sink logit merged in
        out = torch.cat(outs, dim=3) if len(outs) > 1 else outs[0]
        out = out.reshape(batch, heads, nq * qb, -1)[:, :, :q_len]
        if flash is None:
            return out
        lse = (torch.cat(lses, dim=3) if len(lses) > 1 else lses[0]).reshape(batch, heads, nq * qb)[:, :, :q_len]
        return _with_sinks(out, lse, query, key, value, sinks, uncovered, q_pos, causal, full_mask, scale, sink)

    def attend(qc: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if flash is not None:
            return flash(qc, k, v, 0.0, False, attn_mask=bias, scale=scale)
        if sink is not None:  # a zero key scoring each head's sink logit
            bias, k, v = _sink_column(bias, sink, hx, gx, qb), _zero_key(k), _zero_key(v)
        return F.scaled_dot_product_attention(qc, k, v, attn_mask=bias, dropout_p=dropout, scale=scale), None

    # the union of a query block's choices may hold blocks some of its tokens did not choose
    aligned = (k_len - q_len) % block == 0
    own_needed = variant.choice == "token" or (variant.choice == "block" and not (qb == 1 or aligned and qb == block))
    # sink blocks joining the union are whole for nobody: each token keeps to its own choice there
    own_needed = own_needed or bool(union_sinks and variant.choice != "rule")
    if not own_needed and sel.shape[:2] == (1, 1) and bool(((sel[..., 1:] - sel[..., :-1] == 1) | ~sel_valid[..., 1:]).all()):
        # every query block reads one run of consecutive key blocks (e.g. a sliding window):
        # attend on slices of K/V, no copies (with autograd, the sinks before the run: a copy)
        outs, lses, leads = [], [], []
        for i in range(nq):
            first, count = int(sel[0, 0, i, 0]), int(sel_valid[0, 0, i].sum())
            k0, k1 = first * block, min(k_len, (first + count) * block)
            lead = min(union_sinks, k0)  # sink keys put before the run
            leads.append(min(sinks, k0))
            kpos, rows = torch.cat([k_pos[:lead], k_pos[k0:k1]])[None, :], qp[i][:, None]
            keep = _pattern_keep(None, None, variant, module, rows, kpos, k_len, causal, sinks)
            keep = torch.ones(1, 1, qb, kpos.shape[-1], dtype=torch.bool, device=query.device) if keep is None else keep[None, None]
            if mask is not None:
                m = mask[:, :, i * qb : (i + 1) * qb, kpos[0]] if lead else mask[:, :, i * qb : (i + 1) * qb, k0:k1]
                keep = keep & (m if m.dtype == torch.bool else m == 0)
            if gx > 1:
                keep = keep[:, :, None].expand(-1, -1, gx, -1, -1).reshape(keep.shape[0], 1, gx * qb, -1)
            bias = torch.zeros(keep.shape, dtype=query.dtype, device=query.device).masked_fill_(~keep, lowest)
            k_run, v_run = key[:, :, k0:k1], value[:, :, k0:k1]
            if lead:
                k_run, v_run = torch.cat([key[:, :, :lead], k_run], dim=2), torch.cat([value[:, :, :lead], v_run], dim=2)
            out, lse = attend(q[:, :, :, i].reshape(batch, hx, gx * qb, dim), k_run, v_run, bias)
            outs.append(out.view(batch, hx, gx, 1, qb, -1))
            if lse is not None:
                lses.append(lse.view(batch, hx, gx, 1, qb))
        # sinks left of a query block's run are not read by it
        lead_of = torch.tensor(leads, device=query.device).repeat_interleave(qb)[:q_len]
        return finish(outs, lses, (s_cols[None, :] < lead_of[:, None])[None, None])
    chosen_rows = F.pad(chosen, (0, 0, 0, nq * qb - q_len)).view(*chosen.shape[:2], nq, qb, num_blocks)
    union = None
    if flash is not None and sinks:  # the sinks whose blocks a query block does not gather
        union = torch.zeros(*sel.shape[:3], num_blocks + 1, dtype=torch.bool, device=query.device)
        union = union.scatter_(-1, torch.where(sel_valid, sel, num_blocks), True)[..., :num_blocks]  # (Bs, Hs, nq, N)
    if union_sinks:  # the sink blocks join every query block's union (the mask keeps their sink keys)
        sink_blocks = torch.arange(num_blocks, device=query.device) < -(-union_sinks // block)
        sel, sel_valid = _selected_blocks(chosen | sink_blocks, qb)
        width = sel.shape[3]
    offsets = torch.arange(block, device=query.device)
    b_idx = torch.arange(batch, device=query.device)[:, None, None, None]
    h_idx = (torch.arange(hx, device=query.device) // (groups if per_head else 1))[None, :, None, None]
    step = max(1, SPARSE_CHUNK_ELEMENTS // max(1, batch * hx * width * block * max(qb * gx, dim)))
    outs, lses = [], []
    kb, vb = (_key_blocks(t, num_blocks, block) for t in (key, value))
    # query blocks gated whole (aligned, no rule, no padding) that read `width` blocks, their own
    # last, share one mask: earlier blocks whole, the own block causal
    tail_causal = None
    if (variant.choice == "block" and not own_needed and mask is None and causal and qb == block and k_len % block == 0
            and not union_sinks and (sink is None or flash is not None)
            and variant.allowed(module, qp[:1, :, None], k_pos[None, None, :1], k_len) is None):
        tail_causal = torch.ones(qb, width * block, dtype=torch.bool, device=query.device)
        tail_causal[:, -block:] = torch.ones(qb, block, dtype=torch.bool, device=query.device).tril()
        tail_causal = _float_mask(tail_causal, query.dtype)[None, None].expand(gx, 1, -1, -1).reshape(1, 1, gx * qb, -1)
    whole = sel_valid.flatten(0, 1).all(0).all(-1).tolist() if tail_causal is not None else None
    for c, shared_mask in _chunks(nq, step, whole):
        sidx = sel[..., c, :]  # (Bs, Hs, n, S): Bs, Hs are 1 unless the choice depends on them
        n = sidx.shape[2]
        idx = sidx.expand(batch, hx, -1, -1)
        k_sel = kb[b_idx, h_idx, idx].reshape(batch * hx, n, width * block, -1)
        v_sel = vb[b_idx, h_idx, idx].reshape(batch * hx, n, width * block, -1)
        qc = q[:, :, :, c].permute(0, 1, 3, 2, 4, 5).reshape(batch * hx, n, gx * qb, dim)
        if shared_mask:
            bias = tail_causal
        else:
            # the token-level mask, as small as its dependencies allow: (1|B, 1|hx, n, bq, S * bs)
            kpos = (sidx[..., None] * block + offsets).reshape(*sidx.shape[:2], n, 1, width * block)
            rows = qp[c][None, None, :, :, None]  # (1, 1, n, bq, 1)
            base = sel_valid[..., c, :].repeat_interleave(block, dim=-1)[..., None, :] & (kpos < k_len)
            own = None
            if own_needed:
                own = chosen_rows[..., c, :, :].gather(-1, sidx[..., None, :].expand(-1, -1, -1, qb, -1)).repeat_interleave(block, dim=-1)
            keep = _pattern_keep(base, own, variant, module, rows, kpos, k_len, causal, sinks)
            if mask is not None:
                m = mask.view(mask.shape[0], 1, nq, qb, k_len)[:, :, c]
                if m.dtype != torch.bool:
                    m = m == 0
                cols = kpos.clamp(max=k_len - 1).expand(m.shape[0], -1, -1, qb, -1)
                keep = keep & m.expand(-1, cols.shape[1], -1, -1, -1).gather(-1, cols)
            if gx > 1:  # grouped query heads share the gathered K/V: (G * bq) rows per query block
                keep = keep[:, :, :, None].expand(-1, -1, -1, gx, -1, -1).reshape(*keep.shape[:3], gx * qb, width * block)
            bias = torch.zeros(keep.shape, dtype=query.dtype, device=query.device).masked_fill_(~keep, lowest)
            if sink is not None and flash is None:  # a zero key scoring each head's sink logit
                bias, k_sel, v_sel = _sink_column(bias, sink, hx, gx, qb), _zero_key(k_sel), _zero_key(v_sel)
            if bias.shape[:2] == (1, 1):
                bias = bias[0]  # (1, n, rows, S * bs): broadcast over batch and heads
            else:
                bias = bias.expand(batch, hx, -1, -1, -1).reshape(batch * hx, n, gx * qb, -1)
        if flash is not None:
            out, lse = flash(qc, k_sel, v_sel, 0.0, False, attn_mask=bias, scale=scale)
            lses.append(lse.view(batch, hx, n, gx, qb).permute(0, 1, 3, 2, 4))
        else:
            out = F.scaled_dot_product_attention(qc, k_sel, v_sel, attn_mask=bias, dropout_p=dropout, scale=scale)
        outs.append(out.view(batch, hx, n, gx, qb, -1).permute(0, 1, 3, 2, 4, 5))
    uncovered = None
    if union is not None:  # (Bs, Hs, Q, S): the sink key's block is not among its query block's
        per_query = union.repeat_interleave(qb, dim=2)[:, :, :q_len]
        uncovered = ~per_query[..., s_cols // block]
        uncovered = uncovered if per_head else uncovered.expand(-1, groups, -1, -1) if uncovered.shape[1] > 1 else uncovered
    return finish(outs, lses, uncovered)


def _per_token_blocks(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, chosen: torch.Tensor,
    variant: Any, module: nn.Module, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, scale: float, dropout: float,
    sinks: int = 0, sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """Key-block-major attention for choices made per token (MoBA): for each (batch, head, key
    block), the queries that chose the block attend it, giving a partial output and its
    log-sum-exp; each query then merges its partials (at most its number of chosen blocks).
    Exactly the chosen (token, block) pairs are computed, whether or not neighbouring tokens
    agree, as MoBA's own implementation does with variable-length kernels. The first `sinks`
    keys outside a token's chosen blocks are one more partial (`_sink_piece`); `sink` (heads,)
    joins each merge as a partial of zero output."""
    batch, heads, q_len, dim = query.shape
    groups = heads // key.shape[1]
    k_len = key.shape[2]
    block = variant.key_block(module)
    chosen = chosen.expand(batch, heads, -1, -1)
    extra = (sinks > 0) + (sink is not None)  # the sink piece and the sink logit: the last slots
    width = max(1, int(chosen.sum(-1).max())) + extra  # partials per token, at most
    slot = chosen.cumsum(-1) - 1  # rank of each chosen block among the token's choices
    places: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    lses: list[torch.Tensor] = []
    # pairs grouped by (batch, head, block): nonzero of (B, H, N, Q) is sorted that way
    num_blocks = chosen.shape[-1]
    kv_heads = key.shape[1]
    # pairs sorted by (batch, head, block, query); one gather of their queries and one of the
    # groups' K/V blocks, split into views (per-group indexing would cost a full-size gradient
    # buffer per group in the backward pass)
    pairs = chosen.transpose(-1, -2).nonzero()
    group_ids, counts = torch.unique_consecutive((pairs[:, 0] * heads + pairs[:, 1]) * num_blocks + pairs[:, 2], return_counts=True)
    g_b, g_h, g_j = group_ids // (heads * num_blocks), group_ids // num_blocks % heads, group_ids % num_blocks
    counts_list = counts.tolist()
    q_parts = torch.split(query.reshape(-1, dim)[(pairs[:, 0] * heads + pairs[:, 1]) * q_len + pairs[:, 3]], counts_list)
    kv_index = (g_b * kv_heads + g_h // groups) * num_blocks + g_j
    k_parts = _key_blocks(key, num_blocks, block).flatten(0, 2)[kv_index].unbind(0)
    v_parts = _key_blocks(value, num_blocks, block).flatten(0, 2)[kv_index].unbind(0)
    row_parts = torch.split(pairs[:, 3], counts_list)
    lowest = torch.finfo(query.dtype).min
    for g, (b, h, j) in enumerate(zip(g_b.tolist(), g_h.tolist(), g_j.tolist())):
        rows = row_parts[g]
        k0 = j * block
        kpos, qpos = (k0 + torch.arange(block, device=query.device))[None, :], q_pos[rows][:, None]
        scores = torch.matmul(q_parts[g] * scale, k_parts[g].transpose(0, 1))
        # rows ascend: causality matters only for a block reaching past the first query
        keep = _pattern_keep((kpos < k_len) if k0 + block > k_len else None, None, variant, module, qpos, kpos, k_len,
                             causal and k0 + block - 1 > int(q_pos[rows[0]]))
        if mask is not None:
            cols = kpos.clamp(max=k_len - 1).expand(rows.shape[0], -1)
            m = (mask[b, 0][rows] if mask.shape[-2] > 1 else mask[b, 0, :1].expand(rows.shape[0], -1)).gather(-1, cols)
            m = m if m.dtype == torch.bool else m == 0
            keep = m if keep is None else keep & m
        if keep is not None:
            scores = scores.masked_fill(~keep, lowest)
        top = scores.amax(dim=-1, keepdim=True)
        probs = torch.exp(scores - top)
        total = probs.sum(dim=-1, keepdim=True)
        part_lse = (top + total.log()).squeeze(-1)
        probs = probs / total
        if dropout > 0:  # dropping the block's share of a row = dropping the row's probabilities
            probs = F.dropout(probs, p=dropout)
        places.append(((b * heads + h) * q_len + rows) * width + slot[b, h, rows, j])
        outs.append(torch.matmul(probs, v_parts[g]))
        lses.append(part_lse)
    # one scatter of all partials: (B, H, Q, slots) outputs and log-sum-exps, then the merge
    where = torch.cat(places)
    partial = query.new_zeros(batch * heads * q_len * width, value.shape[-1]).index_put((where,), torch.cat(outs))
    lse = query.new_full((batch * heads * q_len * width,), float("-inf")).index_put((where,), torch.cat(lses))
    partial, lse = partial.view(batch, heads, q_len, width, -1), lse.view(batch, heads, q_len, width)
    if extra:
        parts, logs = [partial[..., : width - extra, :]], [lse[..., : width - extra]]
        if sinks:  # sink keys in blocks the token did not choose
            s_cols = torch.arange(min(sinks, k_len), device=query.device)
            uncovered = ~chosen[..., s_cols // block]
            out_s, lse_s = _sink_piece(query, key, value, sinks, uncovered, q_pos, causal, mask, scale)
            parts.append(out_s[..., None, :].to(partial.dtype))
            logs.append(lse_s[..., None].to(lse.dtype))
        if sink is not None:
            parts.append(partial.new_zeros(batch, heads, q_len, 1, partial.shape[-1]))
            logs.append(sink.to(lse.dtype)[None, :, None, None].expand(batch, -1, q_len, 1))
        partial, lse = torch.cat(parts, dim=-2), torch.cat(logs, dim=-1)
    weights = torch.softmax(lse, dim=-1).nan_to_num(0.0)
    return (weights[..., None] * partial).sum(-2)


# Query tokens from which MoH inference computes only the selected (token, head) pairs
# (`hf-relattn bench kernels --suite moh`: below ~256 the per-head calls cost more than they save).
ROUTED_MIN_TOKENS = 256
# Selected query rows per masked SDPA call of the head-routed path (padding, cached prefixes).
ROUTED_QUERY_ROWS = 512
# Positions per window of the head-routed causal path.
ROUTED_WINDOW = 256


def head_routed_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, used: torch.Tensor,
    causal: bool, scale: float,
) -> torch.Tensor:
    """Inference for heads chosen per token (MoH): only the (token, head) pairs in `used`
    (B, Q, H) are computed, each over all keys (causal by original position); the others get
    zeros. Returns (B, Q, H, D).

    Heads every token uses run as one plain SDPA call. Causal without padding, the other heads
    go by windows of ROUTED_WINDOW positions, all heads at once (`_windowed_causal`).
    Otherwise (padding, a cached prefix, encoders): per head, masked calls on runs of its tokens."""
    batch, heads, q_len, _ = query.shape
    k_len, groups = key.shape[2], heads // key.shape[1]
    offset = k_len - q_len
    out = query.new_zeros(batch, heads, q_len, value.shape[-1])
    flash = _CPU_FLASH
    windowed = causal and mask is None and offset == 0 and flash is not None and query.device.type == "cpu"
    for b in range(batch):
        counts = used[b].sum(0)
        full = (counts == q_len).nonzero().squeeze(-1) if mask is None and (offset == 0 or q_len == 1) else counts[:0]
        if full.numel():  # heads every token uses
            hs, kv = _head_run(full), _head_run(full // groups)
            out[b, hs] = F.scaled_dot_product_attention(query[b : b + 1, hs], key[b : b + 1, kv], value[b : b + 1, kv],
                                                        is_causal=causal and q_len > 1, scale=scale)[0]
        partial = ((counts > 0) & (counts < q_len)).nonzero().squeeze(-1) if full.numel() else (counts > 0).nonzero().squeeze(-1)
        if windowed and partial.numel():
            hs, kv = _head_run(partial), _head_run(partial // groups)
            out[b, hs] = _windowed_causal(query[b, hs], used[b][:, hs], key[b, kv], value[b, kv], scale, flash)
            continue
        for h in partial.tolist():
            rows = used[b, :, h].nonzero().squeeze(-1)
            k, v = key[b : b + 1, h // groups : h // groups + 1], value[b : b + 1, h // groups : h // groups + 1]
            parts = []
            for start in range(0, rows.numel(), ROUTED_QUERY_ROWS):
                r = rows[start : start + ROUTED_QUERY_ROWS]
                last = int(r[-1]) + offset + 1 if causal else k_len
                keep = None if mask is None else mask[b : b + 1, :, r if mask.shape[-2] > 1 else slice(None), :last]
                if causal:
                    order = torch.arange(last, device=query.device)[None, :] <= (r + offset)[:, None]
                    keep = order if keep is None else keep & order
                parts.append(F.scaled_dot_product_attention(query[b : b + 1, h : h + 1, r], k[:, :, :last], v[:, :, :last],
                                                            attn_mask=_float_mask(keep, query.dtype), scale=scale))
            out[b, h].index_copy_(0, rows, torch.cat(parts, dim=2)[0, 0])
    return out.transpose(1, 2)


def _head_run(index: torch.Tensor) -> torch.Tensor | slice:
    """Head indices as a slice when they are one ascending run (no copy), else as given."""
    first, n = int(index[0]), index.numel()
    return slice(first, first + n) if bool((index == torch.arange(first, first + n, device=index.device)).all()) else index


def _windowed_causal(q: torch.Tensor, used: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, flash: Any) -> torch.Tensor:
    """Causal attention of heads over their own tokens: q, k, v (H, T, D), used (T, H) ->
    (H, T, D), zero where unused. By windows of ROUTED_WINDOW positions: each window's chosen
    queries (padded to the window's largest count over heads) read the keys before the window
    without a mask, in one call for all heads, and the window's own keys with a small causal
    mask, in one call for all windows; the two are merged by log-sum-exp (the CPU flash
    kernel returns it; inference only)."""
    size = ROUTED_WINDOW
    heads, length, dim = q.shape
    count = -(-length // size)
    chosen = F.pad(used.t(), (0, count * size - length)).view(heads, count, size)
    slot = chosen.cumsum(-1) - 1  # rank of a chosen token among its window's, per head
    width = chosen.sum(-1).amax(0)  # (windows,) queries per window after padding
    h_idx, w_idx, t_idx = chosen.nonzero(as_tuple=True)
    s_idx = slot[h_idx, w_idx, t_idx]
    most = int(width.max())
    qw = q.new_zeros(count, heads, most, dim)
    qw[w_idx, h_idx, s_idx] = q[h_idx, w_idx * size + t_idx]
    reach = torch.full((count, heads, most), -1, dtype=torch.long, device=q.device)
    reach[w_idx, h_idx, s_idx] = t_idx
    near = _float_mask(torch.arange(size, device=q.device) <= reach[..., None], q.dtype)
    pad = count * size - length
    kw, vw = ((F.pad(t, (0, 0, 0, pad)) if pad else t).view(heads, count, size, dim).transpose(0, 1) for t in (k, v))
    merged, lse = flash(qw, kw, vw, 0.0, False, attn_mask=near, scale=scale)
    for w in range(1, count):
        n = int(width[w])
        if n == 0:
            continue
        o1, l1 = flash(qw[w : w + 1, :, :n], k[None, :, : w * size], v[None, :, : w * size], 0.0, False, scale=scale)
        o2, l2 = merged[w : w + 1, :, :n], lse[w : w + 1, :, :n]
        top = torch.maximum(l1, l2)
        w1, w2 = (l1 - top).exp_()[..., None], (l2 - top).exp_()[..., None]
        merged[w : w + 1, :, :n] = (o1 * w1 + o2 * w2) / (w1 + w2)
    out = q.new_zeros(heads, count * size, v.shape[-1])
    out[h_idx, w_idx * size + t_idx] = merged[w_idx, h_idx, s_idx]
    return out[:, :length]


def _float_mask(keep: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean keep-mask as an additive one (masked: the dtype's minimum, so a query row with
    no key stays finite, as in transformers); float masks pass through."""
    if keep is None or keep.dtype != torch.bool:
        return keep
    return torch.where(keep, torch.zeros((), dtype=dtype, device=keep.device), torch.finfo(dtype).min)


def _top_tokens(scores: torch.Tensor, count: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions of the `count` best scores per row, ascending; ties go to the earlier position
    (repeated tokens score alike, so the rule must not depend on the sort kernel). `count`: an
    int, or one per batch entry (B,): then (positions (B, H, most), taken (B, H, most)), the
    rows past their count marked not taken (their positions repeat the last one)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    if isinstance(count, int):
        return order[..., :count].sort(dim=-1).values, None
    most, length = int(count.max()), scores.shape[-1]
    taken = torch.arange(most, device=scores.device) < count[:, None, None]
    chosen = torch.where(taken, order[..., :most], length).sort(dim=-1).values
    return chosen.clamp(max=length - 1), chosen < length


def expert_choice_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, variant: Any,
    logits: torch.Tensor, scale: float, dropout: float,
) -> torch.Tensor:
    """Heads that choose their tokens (MoSA): each head attends among its chosen tokens only
    (causally by original position), scales by the router score and writes back at the chosen
    positions; (B, H, Q, D), zero where a head chose nothing. A full forward chooses over the
    whole sequence; with a KV cache each new token at position t is processed by the heads for
    which it is among the top tokens of positions 0..t (see `hf_relattn.variants.mosa`).
    `logits` (B, H, K): the router's, of every key. Padding keys never compete, and counts are
    those of each sample's own tokens."""
    batch, heads, q_len, dim = query.shape
    k_len = key.shape[2]
    groups = heads // key.shape[1]
    valid = _key_valid(mask)
    ranked = logits if valid is None else logits.masked_fill(~valid[:, None, :], float("-inf"))
    b_idx = torch.arange(batch, device=query.device)[:, None, None]
    kv_idx = (torch.arange(heads, device=query.device) // groups)[None, :, None]
    lowest = torch.finfo(query.dtype).min

    def count(upto: int) -> int | torch.Tensor:
        """Tokens each head keeps among the first `upto` keys (of each sample's valid ones)."""
        if valid is None:
            return variant.tokens(upto)
        return variant.token_counts(valid[:, :upto].sum(-1))

    def attend(q: torch.Tensor, idx: torch.Tensor, allowed: torch.Tensor | None, taken: torch.Tensor | None) -> torch.Tensor:
        """q (B, H, r, D) over the chosen keys idx (B, H, n), allowed (B, H, r, n); None: causal
        among the chosen (ascending positions, no padding), SDPA's causal kernel. `taken`
        (B, H, n): which chosen entries are real (None: all)."""
        if allowed is None and valid is None and taken is None:
            return F.scaled_dot_product_attention(q, key[b_idx, kv_idx, idx], value[b_idx, kv_idx, idx], is_causal=True,
                                                  dropout_p=dropout, scale=scale)
        if allowed is None:
            allowed = idx[..., :, None] >= idx[..., None, :]
        if valid is not None:
            allowed = allowed & valid.gather(1, idx.flatten(1)).view(batch, heads, 1, -1)
        if taken is not None:
            allowed = allowed & taken[..., None, :]
        bias = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill_(~allowed, lowest)
        return F.scaled_dot_product_attention(q, key[b_idx, kv_idx, idx], value[b_idx, kv_idx, idx], attn_mask=bias,
                                              dropout_p=dropout, scale=scale)

    gates = torch.sigmoid(logits).to(query.dtype)
    if q_len == k_len:
        idx, taken = _top_tokens(ranked, count(k_len))  # (B, H, n)
        chosen_q = query.gather(2, idx[..., None].expand(-1, -1, -1, dim))
        out = attend(chosen_q, idx, None, taken) * gates.gather(-1, idx)[..., None]
        # rows that are not taken go to a spare row q_len, dropped after the scatter
        where = idx if taken is None else torch.where(taken, idx, q_len)
        full = query.new_zeros(batch, heads, q_len + 1, value.shape[-1])
        return full.scatter(2, where[..., None].expand(-1, -1, -1, out.shape[-1]), out)[:, :, :q_len]
    outs = []
    for a in range(q_len):  # decoding: each new token chooses among the tokens up to itself
        t = k_len - q_len + a
        idx, taken = _top_tokens(ranked[..., : t + 1], count(t + 1))
        hit = idx == t if taken is None else (idx == t) & taken
        out = attend(query[:, :, a : a + 1], idx, torch.ones(batch, heads, 1, idx.shape[-1], dtype=torch.bool, device=query.device), taken)
        outs.append(torch.where(hit.any(-1)[..., None, None], out * gates[..., t, None, None], 0.0))
    return torch.cat(outs, dim=2)


# ------------------------------------------------------------------------ FlexAttention path
# From this many query tokens on, static sparse patterns on GPU run through compiled
# FlexAttention (compiling costs seconds per new shape, which only long sequences repay). On
# CPU it runs only when forced: torch 2.13 has no FlexAttention backward there, and in a
# benchmark alternating patterns it was slower than the block-sparse path (block masks rebuilt,
# recompiles).
FLEX_MIN_TOKENS = 4096
_compiled_flex: Callable[..., torch.Tensor] | None = None
_block_masks: dict[tuple[Any, ...], Any] = {}


def flex_sparse_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, variant: Any,
    module: nn.Module, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, scale: float, sinks: int = 0,
) -> torch.Tensor | None:
    """A static pattern (the same for every batch entry and head) as a FlexAttention BlockMask,
    run by compiled `flex_attention`; None for patterns chosen per head or per token (MoBA, MoSA).
    The first `sinks` keys are visible to every query."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if variant.choice not in ("rule", "block"):
        return None
    batch, heads, q_len, _ = query.shape
    k_len = key.shape[2]
    block = variant.key_block(module)
    num_blocks = -(-k_len // block)
    chosen = variant.token_blocks(module, q_pos, num_blocks, query, key, None)
    if chosen is None or chosen.shape[:2] != (1, 1):
        return None
    valid = _key_valid(mask)
    # every layer of a forward shares the pattern: build its block mask once
    # the variant and the mask are held weakly and compared by identity: an id reused by a
    # new object never finds another's block mask
    cache_key = (q_len, k_len, causal, sinks, query.device, None if valid is None else mask._version)
    cached = _block_masks.get(cache_key)
    block_mask = None
    if cached is not None and cached[0]() is variant and (valid is None or cached[1]() is mask):
        block_mask = cached[2]
    if block_mask is None:
        table, offset = chosen[0, 0], k_len - q_len

        def mask_mod(b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
            position = qi + offset
            keep = table[qi, ki // block]
            rule = variant.allowed(module, position, ki, k_len)
            if rule is not None:
                keep = keep & rule
            if sinks:
                keep = keep | (ki < sinks)
            if causal:
                keep = keep & (ki <= position)
            if valid is not None:
                keep = keep & valid[b, ki]
            return keep

        _block_masks.clear()
        block_mask = create_block_mask(mask_mod, batch if valid is not None else None, None, q_len, k_len,
                                       device=query.device, BLOCK_SIZE=128)
        _block_masks[cache_key] = (weakref.ref(variant), None if valid is None else weakref.ref(mask), block_mask)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=key.shape[1] != heads)
