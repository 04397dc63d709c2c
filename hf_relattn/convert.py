"""`convert`: apply a variant to a loaded model in place, all-or-nothing."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from transformers import PreTrainedModel

from .engine import ENGINE_NAME, flag_variant
from .modeling import SPEC_KEY, is_adapted, make_adapted
from .patches import get_adapter
from .variants.base import get_variant_class


def resolve_layers(layers: int | Iterable[int] | None, num_layers: int) -> list[int]:
    """`layers` -> sorted unique indices; negative indices count from the end (like Python)."""
    if layers is None:
        return list(range(num_layers))
    items = [layers] if isinstance(layers, int) else list(layers)
    resolved = set()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise ValueError(f"layers must be integers, got {item!r}")
        if not -num_layers <= item < num_layers:
            raise ValueError(f"layer index {item} out of range: the model has {num_layers} layers (0..{num_layers - 1})")
        resolved.add(item % num_layers)
    if not resolved:
        raise ValueError("layers is empty: pass None for all layers or a list of layer indices")
    return sorted(resolved)


def convert(model: PreTrainedModel, variant: str, *, layers: int | Iterable[int] | None = None, **options: Any) -> PreTrainedModel:
    """Apply attention variant `variant` to `model` in place and return it.

    `layers` selects the decoder/encoder layers (default all; negative indices count from the
    end). Other keyword arguments are the variant's options (see `hf_relattn.variants()`).
    Every check runs before anything is modified: on error the model is left as it was.
    """
    adapter = get_adapter(model)
    spec_variant = get_variant_class(variant).from_options(options)
    num_layers = len(adapter.attention_modules(model))
    layer_list = resolve_layers(layers, num_layers)
    _check_pruned(model, adapter, spec_variant, layer_list)
    spec_variant.validate(model, adapter, layer_list)
    flag = flag_variant(model.config)  # a runtime flag (e.g. relattn_alibi) is kept by persisting it

    # --- from here on the model changes
    # it no longer is the checkpoint its name_or_path names (PEFT records that as an adapter's
    # base model); saving names the new folder
    model.name_or_path = ""
    native = spec_variant.native(adapter, num_layers, layer_list)
    if not native:
        make_adapted(model)
    spec_variant.apply(model, adapter, layer_list, initialize=True)
    if is_adapted(model):
        _record(model, spec_variant.spec_name(), spec_variant.options(), [] if native else layer_list, covers_all=native)
        if flag is not None:
            # An adapted checkpoint must reload as it runs now; flags are not saved by
            # transformers, so the flag's variant becomes part of the spec on every layer.
            all_layers = list(range(num_layers))
            flag.apply(model, adapter, all_layers, initialize=True)
            _record(model, flag.spec_name(), flag.options(), all_layers, covers_all=False)
        model.set_attn_implementation(ENGINE_NAME)
    return model


def _check_pruned(model: PreTrainedModel, adapter: Any, variant: Any, layers: list[int]) -> None:
    """Variants sized by the config's head count go before pruning (which leaves fewer heads)."""
    if not variant.heads_from_config:
        return
    heads = adapter.num_heads(model.config)
    modules = adapter.attention_modules(model)
    for idx in layers:
        if adapter.module_num_heads(modules[idx]) != heads:
            raise ValueError(
                f"{variant.name}: layer {idx} has {adapter.module_num_heads(modules[idx])} of the model's {heads} heads after "
                f"pruning; apply {variant.name} before pruning (it sizes per-head weights from the config)"
            )


def _record(model: PreTrainedModel, name: str, options: dict[str, Any], layers: list[int], covers_all: bool) -> None:
    """Append a spec entry; a later entry of the same variant supersedes it on shared layers."""
    spec = getattr(model.config, SPEC_KEY)
    entries = []
    for entry in spec["variants"]:
        if entry["name"] == name:
            kept = [] if covers_all else [i for i in entry["layers"] if i not in layers]
            if not kept:
                continue
            entry = {**entry, "layers": kept}
        entries.append(entry)
    if layers:
        entries.append({"name": name, "options": options, "layers": layers})
    spec["variants"] = entries
