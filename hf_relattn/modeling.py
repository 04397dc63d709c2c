"""Adapted model types: how a converted model is saved, reloaded, and refused without the plugin.

For every supported family (`llama`, `bert`, `vit`) the import registers a config type
`relattn_<family>` (a subclass of the family's config) and, for each of the family's task
heads known to the Auto classes, a model subclass `Relattn<Head>` registered with the same
Auto class. A converted model becomes an instance of these subclasses in place; its config
carries the variant spec under the key `relattn`:

    {"format": 1, "variants": [{"name": "gqa", "options": {...}, "layers": [0, 1]}, ...]}

On load, the subclass first builds the family's native model from the config, then replays
the spec's structural changes (shapes only), so the checkpoint's weights fit exactly.
Plain transformers does not know `relattn_<family>` and refuses the folder loudly.
A model whose change is expressible natively (GQA/MQA on every LLaMA layer) stays native.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import transformers
from torch import nn
from transformers import (
    AttentionInterface,
    AutoConfig,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.auto import modeling_auto
from transformers.models.auto.auto_factory import _BaseAutoModelClass

from .engine import ENGINE_NAME, FLAG_PREFIX, relattn_attention
from .patches import ADAPTED_PREFIX, ADAPTERS, get_adapter
from .variants.base import VARIANTS, get_variant_class

SPEC_KEY = "relattn"
SPEC_FORMAT = 1

_config_classes: dict[str, type] = {}
_model_classes: dict[type, type] = {}


# Called with (model, folder) after an adapted model's save_pretrained: the plugin writes the
# remote code there (hf_relattn.remote); the remote copy of this module has none.
SAVE_HOOKS: list[Any] = []

# hf_relattn.push_to_hub, set by the plugin: an adapted model's push_to_hub and
# save_pretrained(push_to_hub=True) upload with our model card (the remote copy uses transformers').
PUSH_HOOKS: list[Any] = []
PUSH_OPTIONS = ("repo_id", "private", "commit_message")

# Model inputs that variants read inside attention (passed through the models' **kwargs).
ATTENTION_INPUTS = ("relation_ids",)


def is_adapted(model_or_config: Any) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return str(getattr(config, "model_type", "")).startswith(ADAPTED_PREFIX)


def spec_of(config: Any) -> dict[str, Any]:
    """The variant spec of an adapted config (empty spec otherwise)."""
    spec = getattr(config, SPEC_KEY, None) if is_adapted(config) else None
    return spec if spec else {"format": SPEC_FORMAT, "variants": []}


def rebuild_from_spec(model: nn.Module, spec: dict[str, Any]) -> None:
    """Replay the spec's changes on a freshly built native model (shapes, not values)."""
    if "variants" not in spec:
        raise ValueError(
            "config.relattn of an adapted checkpoint must be its variant spec ({'format': 1, 'variants': [...]}); "
            f"got {spec!r}. Options for a flag variant go with attn_implementation='relattn_<name>' on a native model."
        )
    if spec.get("format", SPEC_FORMAT) != SPEC_FORMAT:
        raise ValueError(f"Unsupported relattn spec format {spec.get('format')!r}; this plugin reads {SPEC_FORMAT}")
    adapter = get_adapter(model)
    for entry in spec.get("variants", []):
        variant = get_variant_class(entry["name"]).from_options(entry.get("options", {}))
        variant.apply(model, adapter, list(entry["layers"]), initialize=False)


def _adapted_config_class(base: type) -> type:
    model_type = ADAPTED_PREFIX + base.model_type
    if model_type not in _config_classes:
        _config_classes[model_type] = type(
            "Relattn" + base.__name__,
            (base,),
            {"model_type": model_type, "__module__": __name__, "__doc__": f"{base.__name__} adapted by hf_relattn."},
        )
        globals()[_config_classes[model_type].__name__] = _config_classes[model_type]
    return _config_classes[model_type]


def adapted_class(base: type) -> type:
    """The `Relattn<Base>` subclass of a native model class (created once)."""
    if base in _model_classes.values():
        return base
    if base in _model_classes:
        return _model_classes[base]
    config_cls = _adapted_config_class(base.config_class)

    def __init__(self: PreTrainedModel, config: Any, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, config, *args, **kwargs)
        rebuild_from_spec(self, spec_of(config))

    def get_correct_attn_implementation(self: PreTrainedModel, requested: str | None, is_init_check: bool = False) -> str:
        # The variants only run inside the plugin's engine; any other backend would silently
        # drop them, so refuse it.
        requested = ENGINE_NAME if requested in (None, "sdpa") else requested
        if requested != ENGINE_NAME and not requested.startswith(FLAG_PREFIX):
            raise ValueError(
                f"{type(self).__name__} is adapted by hf_relattn and needs attn_implementation={ENGINE_NAME!r} "
                f"(or a '{FLAG_PREFIX}<flag>' variant), not {requested!r}."
            )
        return base.get_correct_attn_implementation(self, requested, is_init_check)

    def _validate_model_kwargs(self: PreTrainedModel, model_kwargs: dict[str, Any]) -> None:
        # generate() rejects inputs missing from forward's signature; the `relation` variant's
        # relation_ids reach attention through **kwargs (the engine cuts them to each step).
        base._validate_model_kwargs(self, {k: v for k, v in model_kwargs.items() if k not in ATTENTION_INPUTS})

    def save_pretrained(self: PreTrainedModel, save_directory: Any, *args: Any, push_to_hub: bool = False, **kwargs: Any) -> Any:
        # weights and config, then the self-contained modeling code for trust_remote_code loads;
        # an upload comes after both (transformers' own would run before the code is written)
        ours = push_to_hub and PUSH_HOOKS
        hub = {k: kwargs.pop(k) for k in PUSH_OPTIONS if k in kwargs} if ours else {}
        result = base.save_pretrained(self, save_directory, *args, push_to_hub=push_to_hub and not ours, **kwargs)
        if kwargs.get("is_main_process", True):
            for hook in SAVE_HOOKS:
                hook(self, save_directory)
            if ours:
                PUSH_HOOKS[0](save_directory, hub.pop("repo_id", None) or Path(save_directory).name, token=kwargs.get("token"), **hub)
        return result

    def push_to_hub(self: PreTrainedModel, repo_id: str, *args: Any, **kwargs: Any) -> Any:
        # transformers' push_to_hub writes its own README; ours carries the variant spec and results
        if not PUSH_HOOKS:
            return base.push_to_hub(self, repo_id, *args, **kwargs)
        unknown = sorted(set(kwargs) - set(PUSH_OPTIONS) - {"token"})
        if args or unknown:
            raise TypeError(f"push_to_hub of an adapted model takes repo_id and {', '.join(PUSH_OPTIONS[1:])}, token; "
                            f"got {list(args) + unknown} (see hf_relattn.push_to_hub for results= and dry_run=)")
        return PUSH_HOOKS[0](self, repo_id, **kwargs)

    methods = {"_validate_model_kwargs": _validate_model_kwargs} if hasattr(base, "_validate_model_kwargs") else {}
    cls = type(
        "Relattn" + base.__name__,
        (base,),
        {
            **methods,
            "config_class": config_cls,
            "__init__": __init__,
            "get_correct_attn_implementation": get_correct_attn_implementation,
            "save_pretrained": save_pretrained,
            "push_to_hub": push_to_hub,
            "__module__": __name__,
            "__doc__": f"{base.__name__} with hf_relattn attention variants (spec in config.relattn).",
        },
    )
    _model_classes[base] = cls
    globals()[cls.__name__] = cls
    return cls


def make_adapted(model: PreTrainedModel) -> None:
    """Turn a native model into its adapted type in place (class and config class)."""
    if is_adapted(model):
        return
    model.__class__ = adapted_class(type(model))
    model.config.__class__ = _adapted_config_class(type(model.config))
    # A config read from config.json (every from_pretrained model) holds `model_type` as an
    # instance attribute, which would shadow the adapted class's and make is_adapted() False.
    model.config.model_type = type(model.config).model_type
    setattr(model.config, SPEC_KEY, {"format": SPEC_FORMAT, "variants": []})


def _auto_classes() -> list[type]:
    return [
        obj
        for obj in vars(modeling_auto).values()
        if inspect.isclass(obj) and issubclass(obj, _BaseAutoModelClass) and getattr(obj, "_model_mapping", None) is not None
    ]


def register_model_types() -> None:
    """Register `relattn_<family>` with AutoConfig and every Auto class the family supports."""
    for model_type in ADAPTERS:
        base_config = AutoConfig.for_model(model_type).__class__
        config_cls = _adapted_config_class(base_config)
        if config_cls.model_type not in transformers.CONFIG_MAPPING:
            AutoConfig.register(config_cls.model_type, config_cls)
        for auto_cls in _auto_classes():
            class_name = auto_cls._model_mapping._model_mapping.get(model_type)
            if not isinstance(class_name, str) or not hasattr(transformers, class_name):
                continue
            auto_cls.register(config_cls, adapted_class(getattr(transformers, class_name)), exist_ok=True)


def attention_names() -> list[str]:
    """Names accepted by `attn_implementation=`: the engine and every flag variant."""
    return [ENGINE_NAME] + [FLAG_PREFIX + name for name, cls in sorted(VARIANTS.items()) if cls.flag]


def register_attention() -> None:
    """Register the engine under every attention name, each with the sdpa mask function (without
    it the function would get no padding mask), and `relattn` as a known config attribute."""
    for name in attention_names():
        AttentionInterface.register(name, relattn_attention)
        AttentionMaskInterface.register(name, sdpa_mask)
    if not hasattr(PreTrainedConfig, SPEC_KEY):
        # class-level default only: vanilla configs keep writing no `relattn` key
        setattr(PreTrainedConfig, SPEC_KEY, None)
