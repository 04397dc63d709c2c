"""One attention call, resolved once: `AttnCall` is what the engine, the variants' `attend`
hooks and the shared paths receive instead of a dozen positional arguments.

Where the queries and keys are. Transformers hands a static cache over whole: K covers every
preallocated slot, the filled ones first; the queries are the last filled slots. `build_call`
finds the filled length from the mask (or, without a mask, as transformers' own sdpa function
does) and, outside torch.compile, crops the empty slots, so every path sees the queries as the
last Q of K (`lead` = key slots before the first query). Relative terms only use differences,
which padding does not move. Patterns that place blocks, sinks or counts at positions of a
sample's own sequence get those positions (`positions(absolute=True)`); the eager paths run
each left-padding offset of a batch on its own keys (`offset_groups`, `by_offset`). A call whose
mask is nothing but padding runs each sample's tokens alone, unmasked (`padding_runs`, `alone`),
where the unmasked kernels serve it.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Per-call data of an attention block, added to its call's keyword arguments by a forward
# pre-hook (`hf_relattn.variants.base.track_input`; transformers passes them on to the attention
# function): nothing of a call is kept on the module, so one model can serve several threads
# and several conversations at once.
LAYER_INPUT = "relattn_layer_input"  # the block's input hidden states (routers read it)
CACHE = "relattn_cache"  # the model's KV cache object of this call, if any (MoSA keeps router scores in it)
NATIVE_WINDOW = "sliding_window"  # what transformers passes for a layer with the model's own sliding window

@dataclass
class AttnCall:
    """One attention call: its tensors, options and geometry.

    query (B, Hq, Q, D), key/value (B, Hkv, K, D); `mask` boolean (B, 1, Q, K) (True = attend),
    a caller's additive float mask, or None; `causal` is the one source of truth for causality
    (the call's `is_causal`, else the module's). `lead` is the number of key slots before the
    first query: an int, or a 0-d tensor under torch.compile (where the empty slots of a static
    cache are masked instead of cropped). `inputs` are the keyword arguments the model passed
    (relation_ids, the layer input for routers, the cache). `impl` is the engine path ("auto",
    "dense", "reference", "flex" or "compiled"); `variants` all that act in this call, in the
    order the engine asks them."""

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
    impl: str = "auto"
    variants: tuple[Any, ...] = ()  # the Variant objects (hf_relattn.variants.base sits above this module)
    # (B, H, K) tensors a variant computed for every key of this call (MoSA's router logits):
    # `by_offset` cuts them with the keys
    per_key: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    # (B|1, 1) position of key slot 0 in each sample's own sequence, from the model's
    # position_ids, where the mask cannot tell (`positions_from_ids`); None: counted from the mask
    key_origin: torch.Tensor | None = None

    @property
    def q_slots(self) -> torch.Tensor:
        return self.lead + torch.arange(self.query.shape[2], device=self.query.device)

    @property
    def slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(query slots (Q,), key slots (K,)) when the queries are the last Q of K (eager paths)."""
        k_pos = torch.arange(self.key.shape[2], device=self.query.device)
        return k_pos[k_pos.shape[0] - self.query.shape[2]:], k_pos

    @classmethod
    def of(cls, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None, *,
           causal: bool, scale: float, dropout: float = 0.0, impl: str = "auto") -> AttnCall:
        """A call on raw tensors, without a module (the shared kernels in `hf_relattn.ops`): the
        queries are the last Q of the K keys."""
        return cls(None, query, key, value, mask, causal, scale, dropout, {}, key.shape[2] - query.shape[2], impl)

    def replace(self, **changes: Any) -> AttnCall:
        return dataclasses.replace(self, **changes)

    def key_valid(self) -> torch.Tensor | None:
        """(B, K) True for keys some query may attend (not padding), from a boolean mask."""
        return key_valid(self.mask)

    def query_valid(self) -> torch.Tensor | None:
        """(B, Q) True for queries that are not padding."""
        valid = key_valid(self.mask)
        return None if valid is None else valid[:, self.q_slots]

    @property
    def native_window(self) -> int | None:
        """The layer's own sliding window (Mistral, Qwen2, Gemma 3 configs; ModernBERT's local layers pass
        half their window + 1, flash attention's inclusive bound), which the mask already holds."""
        return self.inputs.get(NATIVE_WINDOW)

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.query, self.key, self.value))


def key_valid(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, K) True for keys some query may attend (not padding), from a boolean mask."""
    return mask.any(dim=-2)[:, 0] if mask is not None and mask.dtype == torch.bool else None


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
               dropout: float, scaling: float | None, kwargs: dict[str, Any], impl: str,
               variants: tuple[Any, ...] = ()) -> AttnCall:
    """The call transformers made, with causality, scale, dropout and the filled key slots resolved."""
    compiling = impl == "compiled"
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", False) if causal is None else causal)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    q_len, k_len = query.shape[2], key.shape[2]
    lead = _lead(q_len, k_len, mask, causal, compiling)
    if not compiling and lead + q_len < k_len:  # the empty slots of a static cache
        key, value = key[:, :, : lead + q_len], value[:, :, : lead + q_len]
        mask = None if mask is None else mask[..., : lead + q_len]
    return AttnCall(module, query, key, value, mask, causal, scale, dropout if module.training else 0.0, kwargs, lead,
                    impl, variants)


def positions(call: AttnCall, absolute: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(q_pos (1|B, Q), k_pos (1|B, K), key_valid (1|B, K) or None, query_valid (1|B, Q) or None).

    Positions are key slots, or with `absolute` positions in each sample's own sequence
    (counted over its valid keys: left padding and gaps move nothing). Empty slots of an
    uncropped static cache are not valid."""
    k_len = call.key.shape[2]
    slots = torch.arange(k_len, device=call.key.device)
    q_slots = call.q_slots
    valid = key_valid(call.mask)
    if absolute and call.key_origin is not None:
        k_pos = call.key_origin + slots
        live = (k_pos >= 0) & (slots < call.lead + call.query.shape[2])  # not padding, not an empty static slot
        valid = live if valid is None else valid & live
        return k_pos[:, q_slots], k_pos, valid, valid[:, q_slots]
    if valid is None and call.mask is None and not (isinstance(call.lead, int) and call.lead + call.query.shape[2] == k_len):
        valid = (slots < call.lead + call.query.shape[2])[None]
    if valid is None:
        return q_slots[None], slots[None], None, None
    q_valid = valid[:, q_slots]
    if not absolute:
        return q_slots[None], slots[None], valid, q_valid
    k_pos = valid.long().cumsum(-1) - 1
    return k_pos[:, q_slots], k_pos, valid, q_valid


def positions_from_ids(call: AttnCall, position_ids: torch.Tensor) -> AttnCall:
    """The call with each sample's key positions counted from the model's position_ids (B|1, Q)
    of its queries: the keys are the tokens before and up to the last query, in order (every
    cache, the sliding-window ones included, keeps them so), so key slot j sits at
    position_ids[:, -1] - (lead + Q - 1 - j)."""
    last = position_ids[:, -1:].to(call.query.device)
    return call.replace(key_origin=last - (call.lead + call.query.shape[2] - 1))


def offset_groups(call: AttnCall, who: str) -> list[tuple[int, list[int]]] | None:
    """[(offset, batch rows)] of the samples' first real key slots; None when all are 0. `who`
    names the variant in the error for a mask with gaps inside a sample."""
    valid = key_valid(call.mask)
    if valid is None:
        return None
    first = valid.int().argmax(-1)
    k_len = valid.shape[-1]
    count = valid.sum(-1)
    last = k_len - 1 - valid.flip(-1).int().argmax(-1)
    if bool(((count > 0) & (last - first + 1 != count)).any()):
        raise ValueError(
            f"{who} places its pattern at positions of each sample's own sequence, which needs each sample's "
            "tokens to be one contiguous run (left or right padding); this attention mask has gaps inside a sample."
        )
    if not bool(first.any()):
        return None
    groups: dict[int, list[int]] = {}
    for row, offset in enumerate(first.tolist()):
        groups.setdefault(offset, []).append(row)
    return sorted(groups.items())


def by_offset(call: AttnCall, groups: list[tuple[int, list[int]]], run: Callable[[AttnCall], torch.Tensor]) -> torch.Tensor:
    """`run` on each group's samples with the keys before its offset (and the queries there,
    which are padding) left out; their outputs are zero. (B, Q, H, D)."""
    q_len, k_len = call.query.shape[2], call.key.shape[2]
    return _by_samples(call, [(rows, max(0, offset - call.lead), q_len, offset, k_len) for offset, rows in groups], run,
                       masked=True)


def _by_samples(call: AttnCall, parts: list[tuple[list[int], int, int, int, int]], run: Callable[[AttnCall], torch.Tensor],
                masked: bool) -> torch.Tensor:
    """`run` on each part (batch rows, queries [first, last), keys [start, end)) of the call, its
    mask cut alike (`masked`) or dropped; the other outputs are zero. (B, Q, H, D)."""
    batch, heads, q_len, _ = call.query.shape
    out = call.query.new_zeros(batch, q_len, heads, call.value.shape[-1])
    for rows, first, last, start, end in parts:
        if first >= last:
            continue
        # consecutive samples as a slice: views, not copies
        pick: Any = slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else torch.tensor(
            rows, device=call.query.device)
        mask = call.mask[pick] if masked else None
        if mask is not None:
            mask = mask[..., first:last, start:end] if mask.shape[-2] > 1 else mask[..., start:end]
        part = call.replace(query=call.query[pick, :, first:last], key=call.key[pick, :, start:end],
                            value=call.value[pick, :, start:end], mask=mask, lead=call.lead + first - start,
                            per_key={name: t[pick, :, start:end] for name, t in call.per_key.items()})
        out[pick, first:last] = run(part)
    return out

# transformers hands the same mask to every layer of a forward: its check is done once
# (weak reference: nothing is kept alive, and a freed mask's address cannot alias a new one)
_RUNS_SEEN: list[Any] = [None]
CHECK_ROWS = 1024  # mask rows `padding_runs` compares at once


def padding_runs(call: AttnCall) -> list[tuple[int, int, list[int]]] | None:
    """[(start, end, batch rows)] when the call's mask is nothing but padding, else None: a
    boolean (B|1, 1, Q, K) mask under which each sample's tokens are one run of key slots
    [start, end) (with cached keys, left padding: end = K), each of the run's queries sees
    exactly the run's keys (up to itself when causal), and no query sees a key outside the runs
    (the other slots are padding: their queries may see the run's keys, as transformers'
    right-padding rows do, and nothing reads their keys). Checked exactly, once per mask."""
    mask, batch, k_len = call.mask, call.query.shape[0], call.key.shape[2]
    if (mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or call.key_origin is not None
            or not isinstance(call.lead, int) or tuple(mask.shape[-2:]) != (call.query.shape[2], k_len)
            or call.lead + call.query.shape[2] != k_len):
        return None
    root = mask if mask._base is None else mask._base
    # an inference tensor has no version counter to tell an edit in place: checked in every layer
    key = None if root.is_inference() else (mask.storage_offset(), tuple(mask.shape), mask.stride(), root._version,
                                            call.causal, batch)
    seen = _RUNS_SEEN[0]
    if key is not None and seen is not None and seen[0]() is root and seen[1] == key:
        return seen[2]
    runs = _runs(mask.expand(batch, -1, -1, -1), call.causal)
    if key is not None:
        _RUNS_SEEN[0] = (weakref.ref(root), key, runs)
    return runs


def _runs(mask: torch.Tensor, causal: bool) -> list[tuple[int, int, list[int]]] | None:
    """`padding_runs` on a (B, 1, Q, K) boolean mask whose queries are the last Q key slots: the
    last query's keys as each sample's run (it sees every real key under a padding mask), then
    every query's row checked against it, CHECK_ROWS rows at a time (the expected causal rows
    are built per chunk, never Q x K)."""
    q_len, k_len = mask.shape[-2:]
    lead = k_len - q_len
    last = mask[:, 0, -1]
    count = last.sum(-1).tolist()
    first = last.int().argmax(-1).tolist()
    groups: dict[tuple[int, int], list[int]] = {}
    for b, (start, n) in enumerate(zip(first, count)):
        end = start + n
        rows = mask[b, 0]
        if ((n and not bool(last[b, start:end].all())) or (lead and n and end != k_len) or bool(rows[:, :start].any())
                or bool(rows[:, end:].any())):
            return None
        cols = torch.arange(n, device=mask.device)
        for r in range(max(0, start - lead), max(0, end - lead), CHECK_ROWS):  # the run's queries
            r_end = min(end - lead, r + CHECK_ROWS)
            part = rows[r:r_end, start:end]
            seen = cols <= torch.arange(r + lead - start, r_end + lead - start, device=mask.device)[:, None]
            if not (torch.equal(part, seen) if causal else bool(part.all())):
                return None
        groups.setdefault((start, end), []).append(b)
    return [(start, end, rows) for (start, end), rows in sorted(groups.items())]


def alone(call: AttnCall, runs: list[tuple[int, int, list[int]]], run: Callable[[AttnCall], torch.Tensor]) -> torch.Tensor:
    """`run` on each run's samples as if unpadded: their keys [start, end) and the queries among
    them, without a mask; the padding slots' outputs are zero (as `by_offset`'s). (B, Q, H, D)."""
    parts = [(rows, max(0, start - call.lead), max(0, end - call.lead), start, end) for start, end, rows in runs]
    return _by_samples(call, parts, run, masked=False)
