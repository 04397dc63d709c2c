"""Head pruning: Michel, Levy & Neubig 2019, "Are Sixteen Heads Really Better than One?"
(NeurIPS 2019).

`convert(model, "prune", heads={layer: [head, ...]})` PHYSICALLY removes the listed query
heads (choose them with `hf_relattn.head_importance`, the paper's score). Removing head h of a
layer with head size D deletes
- rows h*D .. (h+1)*D of the query projection (weight and bias),
- columns h*D .. (h+1)*D of the attention output projection (LLaMA/ViT `o_proj`, BERT
  `attention.output.dense`); its bias is kept,
- the K/V heads no remaining query head uses (BERT/ViT: one K/V head per query head, so the
  same rows of key and value).

Every remaining head computes exactly what it computed before: the pruned model equals the
original with the pruned heads' outputs set to zero before the output projection.

Grouped K/V heads (LLaMA GQA, e.g. SmolLM2: 9 query / 3 K/V heads). transformers gives query
head i the K/V head i // (H / G): contiguous, equal groups. After pruning, the remaining query
heads form runs of consecutive heads that share a K/V head, and runs may be uneven (9/3
without head 0: runs 2, 3, 3). The layer gets the largest uniform group size g' that keeps
every head's K/V head: g' = gcd of the run lengths, and each run of n heads gets n / g'
copies of its K/V head (rows duplicated), one per g' consecutive query heads. Runs that are
already even keep one K/V head each (9/3 without heads 0, 3, 6: g' = 2, 3 K/V heads); a K/V
head whose queries are all gone is dropped. Duplicated K/V heads are independent parameters
from then on (fine-tuning may let them drift apart); the KV cache holds every copy.

Pruning a layer again (a second `convert`) indexes the heads of the CURRENT layer, as it is
after the earlier pruning: on a 4-head layer, heads={0: [1]} and then heads={0: [1]} removes
the original heads 1 and 2. K/V heads duplicated by the first pruning count as distinct K/V
heads in the second. The spec in config.relattn then records the successive steps as a list,
`heads=[{0: [1]}, {0: [1]}]` (accepted by `convert` too), so a reload replays them in order.
Layer keys may be strings ("0", as JSON writes them); they are normalised to integers. `heads`
may also be JSON text (`hf-relattn convert ... --variant prune --heads '{"0": [1, 3]}'`).

The config keeps the original `num_attention_heads` (different layers may have different
counts); a module's own count is `adapter.module_num_heads(attn)`. Prune before adding
variants sized by the config's head count (`heads_from_config`: gqa, alibi, t5_bias, mosa,
per-head shaw/relation tables): layers that already carry one (or a model running such a flag
variant) are refused, and `convert` refuses them on pruned layers. Patterns and MoH read each
layer's own heads and work either way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .base import ATTACHED, SPEC_KEY, Variant, flag_variant, register_variant

if TYPE_CHECKING:
    from ..patches import FamilyAdapter

Steps = list[dict[int, list[int]]]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def kv_layout(num_heads: int, num_kv_heads: int, kept: list[int]) -> tuple[list[int], int]:
    """K/V heads after pruning: (source K/V head of each new K/V head, new group size g').

    Query head i of the current layer uses K/V head i // (num_heads / num_kv_heads); `kept`
    are the remaining query heads in order. Each run of n kept heads sharing K/V head k gets
    n / g' copies of k, g' = gcd of the run lengths, so new query head j uses new K/V head
    j // g' and every kept head still reads its own K/V head.
    """
    per_kv = num_heads // num_kv_heads
    runs: dict[int, int] = {}
    for head in kept:
        runs[head // per_kv] = runs.get(head // per_kv, 0) + 1
    group = math.gcd(*runs.values())
    return [kv for kv, count in runs.items() for _ in range(count // group)], group


def _rows(heads: list[int], head_dim: int, device: torch.device) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim, device=device) for h in heads])


def _resized(old: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None, initialize: bool) -> nn.Linear:
    """A new Linear holding rows/columns of `old` (values only when `initialize`)."""
    new = nn.Linear(
        old.in_features if cols is None else len(cols),
        old.out_features if rows is None else len(rows),
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    if initialize:
        with torch.no_grad():
            weight = old.weight if rows is None else old.weight[rows]
            new.weight.copy_(weight if cols is None else weight[:, cols])
            if new.bias is not None:
                new.bias.copy_(old.bias if rows is None else old.bias[rows])
    new.weight.requires_grad_(old.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    return new


def prune_layer(model: nn.Module, adapter: FamilyAdapter, layer_idx: int, removed: list[int], initialize: bool) -> None:
    """Remove query heads `removed` (indices of the current layer) from one layer in place."""
    attn = adapter.attention_modules(model)[layer_idx]
    head_dim = adapter.head_dim(attn.config)
    num_heads, num_kv_heads = adapter.module_num_heads(attn), adapter.num_kv_heads(attn)
    gone = set(removed)
    kept = [h for h in range(num_heads) if h not in gone]
    kv_sources, _ = kv_layout(num_heads, num_kv_heads, kept)
    query, key, value = adapter.projections(attn)  # copies where the family fuses them
    device = query.weight.device
    q_rows, kv_rows = _rows(kept, head_dim, device), _rows(kv_sources, head_dim, device)
    adapter.set_projections(attn, _resized(query, q_rows, None, initialize), _resized(key, kv_rows, None, initialize),
                            _resized(value, kv_rows, None, initialize))
    out = adapter.as_linear(adapter.output_projections(model)[layer_idx])
    adapter.set_output_projection(model, layer_idx, _resized(out, None, q_rows, initialize))
    adapter.set_num_heads(attn, len(kept), len(kv_sources))


@register_variant
@dataclass
class Prune(Variant):
    heads: Any = None

    name = "prune"
    axis = "structure"
    description = (
        "Head pruning: physically removes the given query heads {layer: [head, ...]} (their K/V heads when unused; "
        "uneven GQA groups are split with duplicated K/V heads), remaining heads unchanged."
    )
    paper = "Michel, Levy & Neubig 2019, Are Sixteen Heads Really Better than One? (NeurIPS)"
    limits = (
        "Removed heads are gone for good; quality depends on which heads were removed (fine-tune "
        "afterwards)."
    )

    # ----------------------------------------------------------------- options
    def steps(self) -> Steps:
        """`heads` as a list of pruning steps {layer: sorted heads} with integer keys.

        Raises ValueError on a malformed option (checked before anything is modified)."""
        heads = self.heads
        if heads is None:
            raise ValueError("prune: option heads is required, e.g. heads={0: [1, 3], 2: [0]} (layer -> head indices)")
        if isinstance(heads, str):  # the command line passes JSON: --heads '{"0": [1, 3]}'
            try:
                heads = json.loads(heads)
            except json.JSONDecodeError:
                raise ValueError(f"prune: heads given as text must be JSON like '{{\"0\": [1, 3]}}', got {heads!r}") from None
        raw = [heads] if isinstance(heads, Mapping) else heads
        if not isinstance(raw, (list, tuple)) or not raw or not all(isinstance(step, Mapping) for step in raw):
            raise ValueError(
                f"prune: heads must be a mapping {{layer: [head, ...]}} (or a list of such mappings, one per "
                f"successive pruning), got {heads!r}"
            )
        steps: Steps = []
        for step in raw:
            normal: dict[int, list[int]] = {}
            for key, value in step.items():
                layer = key
                if isinstance(key, str) and key.isdigit():
                    layer = int(key)  # JSON object keys are strings
                if not _is_int(layer) or layer < 0:
                    raise ValueError(f"prune: layer keys of heads must be non-negative integers, got {key!r}")
                if layer in normal:
                    raise ValueError(f"prune: layer {layer} appears twice in heads ({list(step)})")
                if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                    raise ValueError(f"prune: heads[{layer}] must be a list of head indices, got {value!r}")  # noqa: TRY004
                bad = [h for h in value if not _is_int(h)]
                if bad:
                    raise ValueError(f"prune: head indices must be integers; heads[{layer}] has {bad}")
                dups = sorted({h for h in value if list(value).count(h) > 1})
                if dups:
                    raise ValueError(f"prune: heads[{layer}] lists head(s) {dups} more than once")
                if value:
                    normal[layer] = sorted(value)
            if normal:
                steps.append(normal)
        if not steps:
            raise ValueError(f"prune: heads={heads!r} names no head to remove")
        return steps

    def options(self) -> dict[str, Any]:
        # After `apply(initialize=True)`, the layers' whole pruning history (earlier conversions
        # included): the spec entry must rebuild the current shapes on its own.
        steps = getattr(self, "_history", None) or self.steps()
        return {"heads": steps[0] if len(steps) == 1 else steps}

    # -------------------------------------------------------------- conversion
    def validate(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int]) -> None:
        num_layers = len(adapter.attention_modules(model))  # out-of-range layers: check_model's error
        named = sorted({layer for step in self.steps() for layer in step if layer < num_layers} - set(layers))
        if named:
            raise ValueError(f"prune: heads names layer {named[0]}, which is not among the converted layers {layers}")
        self.check_model(model, adapter, layers)

    def check_model(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int]) -> None:
        if adapter.prune_refused:
            from ..patches import ADAPTERS

            valid = ", ".join(sorted(name for name, a in ADAPTERS.items() if not a.prune_refused))
            raise ValueError(f"prune: not for {adapter.model_type}: {adapter.prune_refused}; valid families: {valid}")
        steps = self.steps()
        modules = adapter.attention_modules(model)
        counts = {idx: adapter.module_num_heads(attn) for idx, attn in enumerate(modules)}
        for step in steps:
            for layer, removed in step.items():
                if layer >= len(modules):
                    raise ValueError(
                        f"prune: unknown layer {layer}: the model has {len(modules)} layers (0..{len(modules) - 1})"
                    )
                if layer not in layers:
                    continue  # a saved entry whose other layers a later prune took over; convert refuses it (validate)
                count = counts[layer]
                original = adapter.num_heads(modules[layer].config)  # the layer's own config (CLIP's towers differ)
                now = "" if count == original else " (after earlier pruning; indices are of the current layer)"
                out = [h for h in removed if not 0 <= h < count]
                if out:
                    raise ValueError(
                        f"prune: head index {out[0]} out of range for layer {layer}, which has {count} heads{now}: "
                        f"valid 0..{count - 1}"
                    )
                if len(removed) >= count:
                    raise ValueError(
                        f"prune: heads[{layer}] would remove all {count} heads of layer {layer}{now}; keep at least one"
                    )
                counts[layer] = count - len(removed)
                attn = modules[layer]
                for proj in (*adapter.projections(attn), adapter.as_linear(adapter.output_projections(model)[layer])):
                    if type(proj) is not nn.Linear:
                        raise ValueError(
                            f"prune: layer {layer} has a {type(proj).__name__} projection; prune needs plain nn.Linear "
                            "projections (prune before adding adapters such as LoRA)"
                        )
                acting = [v.name for v in getattr(attn, ATTACHED, ()) if v.heads_from_config]
                if acting:
                    raise ValueError(
                        f"prune: layer {layer} already has variant(s) {acting} acting inside attention, whose terms are "
                        "per head; prune first, then convert to them"
                    )
        flag = flag_variant(model.config)
        if flag is not None and flag.heads_from_config:
            raise ValueError(
                f"prune: the model runs flag variant {flag.name!r} (attn_implementation='relattn_{flag.name}'), whose "
                "terms are per head; prune a model without it, then select the flag again"
            )

    def apply(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int], initialize: bool) -> None:
        selected = set(layers)
        steps = self.steps()
        for step in steps:
            for layer, removed in sorted(step.items()):
                if layer in selected:
                    prune_layer(model, adapter, layer, removed, initialize)
        if initialize:
            self._history = self._merged_history(model, layers, steps)

    def _merged_history(self, model: nn.Module, layers: list[int], steps: Steps) -> Steps:
        """Earlier prune entries of the spec on `layers` followed by `steps`, per layer.

        `convert` records this variant's entry on `layers` and drops earlier entries of the
        same variant there, so the new entry carries the earlier steps of those layers."""
        spec = getattr(model.config, SPEC_KEY, None) or {}
        history: dict[int, list[list[int]]] = {layer: [] for layer in layers}
        for entry in spec.get("variants", []):
            if entry["name"] != self.name:
                continue
            for earlier in Prune(**entry.get("options", {})).steps():
                for layer, removed in earlier.items():
                    if layer in history and layer in entry["layers"]:
                        history[layer].append(removed)
        for step in steps:
            for layer, removed in step.items():
                history[layer].append(removed)
        depth = max(len(h) for h in history.values())
        return [{layer: h[k] for layer, h in sorted(history.items()) if k < len(h)} for k in range(depth)]
