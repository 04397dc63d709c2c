"""`convert`: apply a variant to a loaded model in place, all-or-nothing."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from .engine import ENGINE_NAME, flag_variant, module_variants
from .modeling import SPEC_KEY, is_adapted, make_adapted, spec_of
from .patches import get_adapter
from .variants.base import Variant, check_composition, detach, get_variant_class


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


def convert(model: PreTrainedModel, variant: str, *, layers: int | Iterable[int] | None = None, replace: bool = False,
            **options: Any) -> PreTrainedModel:
    """Apply attention variant `variant` to `model` in place and return it.

    `layers` selects the decoder/encoder layers (default all; negative indices count from the
    end). Other keyword arguments are the variant's options (see `hf_relattn.variants()`).
    A variant already on one of the layers (by an earlier `convert`, or on every layer by its
    `attn_implementation` flag) is refused unless `replace=True`, which starts it afresh there
    (its trained tables are dropped); structure variants (gqa/mqa, prune) act on the current
    weights again instead. Every check runs before anything is modified, and a failure while
    converting restores the model: on error the model is left as it was.
    """
    adapter = get_adapter(model)
    spec_variant = get_variant_class(variant).from_options(options)
    modules = adapter.attention_modules(model)
    num_layers = len(modules)
    layer_list = resolve_layers(layers, num_layers)
    _check_pruned(model, adapter, spec_variant, layer_list)
    flag = flag_variant(model.config)  # a runtime flag (e.g. relattn_alibi) is kept by persisting it
    redo = _already_converted(model, spec_variant, layer_list)
    replaces_flag = flag is not None and flag.name == spec_variant.name
    if (redo or replaces_flag) and not replace and spec_variant.axis != "structure":
        where = f"layers {redo}" if redo else f"every layer (attn_implementation='relattn_{flag.name}')"
        raise ValueError(
            f"{spec_variant.name} is already on {where}; converting again would start it afresh there (dropping what it "
            f"learned or its options). Pass replace=True (--replace on the command line) to do that"
            + (", which keeps it only on the layers given" if replaces_flag else "") + "."
        )
    if replaces_flag:
        flag = None  # the conversion takes the flag's place, on the layers given
    for idx in layer_list:  # what the layer runs now (the flag included), the new variant replacing its namesake
        kept = [v for v in module_variants(modules[idx]) if v.name != spec_variant.name]
        check_composition([*kept, spec_variant], f"layer {idx}")
    spec_variant.validate(model, adapter, layer_list)

    with _restored_on_error(model, adapter, layer_list, spec_variant):
        # it no longer is the checkpoint its name_or_path names (PEFT records that as an adapter's
        # base model); saving names the new folder
        model.name_or_path = ""
        native = spec_variant.native(adapter, num_layers, layer_list)
        if not native:
            make_adapted(model)
        for idx in redo if spec_variant.axis != "structure" else ():
            detach(modules[idx], spec_variant)
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


def _already_converted(model: PreTrainedModel, variant: Variant, layers: list[int]) -> list[int]:
    """The given layers on which the saved spec already has `variant` (by its recorded name)."""
    entries = spec_of(model.config)["variants"]
    return sorted({i for e in entries if e.get("name") == variant.spec_name() for i in e.get("layers", ()) if i in layers})


class _restored_on_error:
    """Context manager: if converting fails, put back the model's class, config and modules
    (their parameters, submodules and hooks, in the same container objects), so `convert` is
    all-or-nothing. Only structure variants (gqa/mqa, prune) change existing weights in place:
    for them the listed layers' attention-block values are copied to CPU memory while converting
    (weights offloaded to the meta device have no values to copy; they are not changed here)."""

    def __init__(self, model: PreTrainedModel, adapter: Any, layers: Iterable[int], variant: Variant) -> None:
        self.model, self.config = model, model.config
        self.saved = (type(model), type(model.config), copy.deepcopy(model.config.__dict__))
        # every module's own state: references, and the contents of its containers
        self.modules = {m: _module_state(m) for m in model.modules()}
        blocks = [adapter.attention_blocks(model)[i] for i in layers] if variant.axis == "structure" else []
        self.values = {p: (p.detach().to("cpu", copy=True), p.device)
                       for b in blocks for p in (*b.parameters(), *b.buffers()) if not p.is_meta}

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, error: Any, trace: Any) -> bool:
        if kind is None:
            return False
        model_class, config_class, config_state = self.saved
        for module, state in self.modules.items():
            module.__dict__.clear()
            for key, (value, contents) in state.items():
                if contents is not None:  # the same container object (hook handles keep pointing at it)
                    value.clear()
                    value.extend(contents) if isinstance(value, list) else value.update(contents)
                module.__dict__[key] = value
        with torch.no_grad():
            for tensor, (value, device) in self.values.items():
                tensor.data = value.to(device)
        self.model.__class__ = model_class
        self.config.__class__ = config_class
        self.config.__dict__.clear()
        self.config.__dict__.update(config_state)
        return False


def _module_state(module: nn.Module) -> dict[str, tuple[Any, Any]]:
    """A module's __dict__ as (value, a copy of its contents when it is a container)."""
    return {k: (v, copy.copy(v) if isinstance(v, (dict, list, set)) else None) for k, v in module.__dict__.items()}


def _check_pruned(model: PreTrainedModel, adapter: Any, variant: Any, layers: list[int]) -> None:
    """Variants sized by the config's head count go before pruning (which leaves fewer heads)."""
    if not variant.heads_from_config:
        return
    modules = adapter.attention_modules(model)
    for idx in layers:
        heads = adapter.num_heads(modules[idx].config)  # the layer's own config: CLIP's towers differ
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
