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

Load paths that would silently drop the variants are refused (transformers would build the
family's native model from whatever fits and report the rest only in its load report):

- A concrete class, `LlamaForCausalLM.from_pretrained(adapted_folder)`, reads config.json with
  its own config class (`LlamaConfig.from_pretrained`), which sets the spec as a plain
  attribute. `config.relattn` is a data descriptor on `PreTrainedConfig` (installed by
  `register_attention`, class-level value None, instance value in the instance `__dict__`, so
  it serialises as before) that refuses a full spec (a dict with "variants") on a config whose
  *class* is not an adapted config class (class-level model_type without `relattn_`). The
  error comes while the config is parsed, before any model is built, and names the Auto class
  to use. A plain options dict (no "variants") stays allowed everywhere: it is how
  `from_pretrained(p, attn_implementation="relattn_alibi", relattn={...})` passes a flag's
  options to a native model. (Hooking the concrete model classes instead would mean patching
  transformers' classes; the config attribute is ours already.)
- An adapted config given to a native class, `LlamaForCausalLM(adapted_config)` or
  `LlamaForCausalLM.from_pretrained(folder, config=AutoConfig.from_pretrained(folder))`: the
  native class cannot replay the spec, so it must not be built. Every model's
  `PreTrainedModel.__init__` stores its resolved attention implementation on its config
  (`config._attn_implementation_internal = ...`); the adapted config class checks that
  assignment when it comes from `PreTrainedModel.__init__` (the caller's frame) and refuses it
  for a model class that is not adapted, unless an adapted model is being built with this
  config (its native backbone, e.g. the `LlamaModel` inside `RelattnLlamaForCausalLM`, shares
  the config). Other assignments pass unchecked: a requested implementation set through
  `config._attn_implementation` (from_pretrained's `attn_implementation=`), an adapted model's
  `set_attn_implementation` (its own check refuses non-engine backends), and direct
  assignments that bypass the adapted class's check on purpose (reference tests). A check on
  the value alone could not tell a native class's "sdpa" from a requested "sdpa", nor catch a
  native class given a config that already says "relattn".
- Continuous batching (`generate_batch`, `init_continuous_batching`,
  `generate(cache_implementation="paged")`) switches attention to transformers' paged
  implementations, which know nothing of the variants: adapted classes refuse it.

Adapted classes keep their native class's `__init__` signature (`__signature__`), register
with transformers' output-capture registry (`output_hidden_states`/`output_attentions`, keyed
by class), and a converted model forgets the `name_or_path` of the model it was converted
from until it is saved (then it names the saved folder), so tools that record a base model
(PEFT's `base_model_name_or_path`) point at the adapted weights, not the unconverted ones.
"""

from __future__ import annotations

import inspect
import sys
from contextvars import ContextVar
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

try:  # checkpoint key renamings (transformers >= 5.x), looked up by class name, then model_type
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
except ImportError:  # pragma: no cover
    get_checkpoint_conversion_mapping = register_checkpoint_conversion_mapping = None

try:  # output capture (output_hidden_states / output_attentions) is registered per model class
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
except ImportError:  # pragma: no cover (transformers without the registry)
    _CAN_RECORD_REGISTRY = None

from .engine import ENGINE_NAME, FLAG_PREFIX, flag_options, module_variants, relattn_attention
from .patches import ADAPTED_PREFIX, ADAPTERS, get_adapter
from .variants.base import ATTACHED, SPEC_KEY, VARIANTS, check_composition, get_variant_class, model_input_names

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
# generate() arguments (or generation config fields) that ask for speculative decoding
SPECULATIVE = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")



def is_adapted(model_or_config: Any) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return str(getattr(config, "model_type", "")).startswith(ADAPTED_PREFIX)


def spec_of(config: Any) -> dict[str, Any]:
    """The variant spec of an adapted config (empty spec otherwise)."""
    spec = getattr(config, SPEC_KEY, None) if is_adapted(config) else None
    return spec if spec else {"format": SPEC_FORMAT, "variants": []}


def rebuild_from_spec(model: nn.Module, spec: Any) -> None:
    """Replay the spec's changes on a freshly built native model (shapes, not values).

    Every entry is checked first, as `convert` checks a conversion (names, option values, layer
    indices, fit to the model, the variants' combination on each layer); a hand-edited or
    truncated spec is refused with the entry it comes from, before anything is built."""
    where = f"config.relattn of {getattr(model.config, '_name_or_path', '') or 'this adapted checkpoint'}"
    if not isinstance(spec, dict) or "variants" not in spec:
        raise ValueError(
            f"{where} must be its variant spec ({{'format': {SPEC_FORMAT}, 'variants': [...]}}); got {spec!r}. Options "
            "for a flag variant go with attn_implementation='relattn_<name>' on a native model."
        )
    if spec.get("format", SPEC_FORMAT) != SPEC_FORMAT:
        raise ValueError(f"{where}: unsupported spec format {spec.get('format')!r}; this plugin reads {SPEC_FORMAT}")
    entries = spec["variants"]
    if not isinstance(entries, list):
        # empty is possible: a native conversion of every layer (gqa) can supersede the only entry
        raise ValueError(f"{where}: 'variants' must be a list of entries, got {entries!r}")
    adapter = get_adapter(model)
    num_layers = len(adapter.attention_modules(model))
    for number, entry in enumerate(entries):
        try:
            variant, layers = _spec_entry(entry, num_layers)
            variant.check_model(model, adapter, layers)
        except ValueError as error:
            raise ValueError(f"{where}, entry {number} ({entry.get('name') if isinstance(entry, dict) else entry!r}): {error}") from None
        variant.apply(model, adapter, layers, initialize=False)
    check_layers(model, where)


def _spec_entry(entry: Any, num_layers: int) -> tuple[Any, list[int]]:
    """(variant, layers) of one saved spec entry, every field checked."""
    if not isinstance(entry, dict) or set(entry) - {"name", "options", "layers"} or "name" not in entry:
        raise ValueError(f"an entry is a dict with 'name', 'options' and 'layers'; got {entry!r}")
    options = entry.get("options", {})
    if not isinstance(options, dict):
        raise ValueError(f"options must be a dict, got {options!r}")
    variant = get_variant_class(entry["name"]).from_saved(options)
    layers = entry.get("layers")
    if (not isinstance(layers, list) or not layers or len(set(map(str, layers))) != len(layers)
            or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers for i in layers)):
        raise ValueError(f"layers must be a non-empty list of distinct layer indices in 0..{num_layers - 1}, got {layers!r}")
    return variant, layers


def check_layers(model: nn.Module, where: str) -> None:
    """Raise unless each layer's variants (attached, and a flag's) can act together."""
    for idx, module in enumerate(get_adapter(model).attention_modules(model)):
        check_composition(module_variants(module), f"{where}: layer {idx}")


# ------------------------------------------------------------- refusing silent vanilla loads
# Class attribute of every adapted model class (this module's and its remote copies').
ADAPTED_MARK = "_relattn_adapted"
# Ids of the configs an adapted model is being built with, in this thread/task: the native
# backbone an adapted task model builds inside (e.g. its LlamaModel) shares that config.
_BUILDING: ContextVar[tuple[int, ...]] = ContextVar("relattn_building", default=())
_MODEL_INIT_CODE = inspect.unwrap(PreTrainedModel.__init__).__code__


def _is_adapted_config_class(cls: type) -> bool:
    return str(getattr(cls, "model_type", "") or "").startswith(ADAPTED_PREFIX)


def _auto_class_name(family: str, class_name: str | None) -> str | None:
    """The Auto class that maps `family` to the native class `class_name` (shortest name first:
    AutoModel rather than AutoModelForTextEncoding)."""
    if not class_name:
        return None
    class_name = class_name[len("Relattn"):] if class_name.startswith("Relattn") else class_name
    names = [auto.__name__ for auto in auto_classes() if mapped_class_name(auto, family) == class_name]
    return min(names, key=len) if names else None


def _spec_names(spec: Any) -> str:
    entries = spec.get("variants") if isinstance(spec, dict) else None
    names = [str(e.get("name")) for e in entries or () if isinstance(e, dict)]
    return ", ".join(dict.fromkeys(names)) or "none"


def _concrete_config_error(config: PreTrainedConfig, spec: dict[str, Any]) -> ValueError:
    family = type(config).model_type
    architectures = config.__dict__.get("architectures") or []
    auto = next(filter(None, (_auto_class_name(family, name) for name in architectures)), None)
    where = getattr(config, "_name_or_path", "") or "This checkpoint"
    model_type = config.__dict__.get("model_type") or ADAPTED_PREFIX + (family or "<family>")
    example = f"{auto}.from_pretrained(path)" if auto else "AutoModelFor<Task>.from_pretrained(path)"
    native = next((n[len("Relattn"):] if n.startswith("Relattn") else n for n in architectures), None)
    return ValueError(
        f"{where} is an hf_relattn adapted checkpoint (model_type {model_type!r}, variants: {_spec_names(spec)}), "
        f"but it is being read with {type(config).__name__}, the config class of native {repr(family) + ' ' if family else ''}model classes"
        f"{f' (e.g. {native})' if native else ''}: they would load it as a vanilla model and silently drop the variants "
        f"and their weights. Load it with the Auto class: {example} (AutoModel.from_pretrained(path) for the bare "
        "backbone, AutoConfig.from_pretrained(path) for the config alone)."
    )


class _SpecAttribute:
    """`config.relattn` on every `PreTrainedConfig` (see the module docstring).

    Class-level value None (a vanilla config writes no `relattn` key); an instance's value
    lives in its `__dict__`, so `to_dict`, deepcopy and pickling see it as before. Setting a
    full variant spec on a config whose class is not an adapted config class raises."""

    def __get__(self, config: Any, owner: type | None = None) -> Any:
        return None if config is None else config.__dict__.get(SPEC_KEY)

    def __set__(self, config: Any, value: Any) -> None:
        if isinstance(value, dict) and "variants" in value and not _is_adapted_config_class(type(config)):
            raise _concrete_config_error(config, value)
        config.__dict__[SPEC_KEY] = value

    def __delete__(self, config: Any) -> None:
        config.__dict__.pop(SPEC_KEY, None)


def check_attention_weights(model: nn.Module, info: dict[str, Any]) -> None:
    """Raise if a load left attention-block weights missing, or found variant weights
    (`relattn_*`) or attention weights the model has no place for."""
    blocks = set(get_adapter(model).attention_blocks(model))
    prefixes = tuple(f"{name}." for name, module in model.named_modules() if module in blocks)
    missing = sorted(k for k in info.get("missing_keys", ()) if k.startswith(prefixes))
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if "relattn_" in k or k.startswith(prefixes))
    if missing or unexpected:
        spec = _spec_names(getattr(model.config, SPEC_KEY, None))
        details = "; ".join(f"{what} {keys[:4]}{' ...' if len(keys) > 4 else ''} ({len(keys)} in all)"
                            for what, keys in (("missing", missing), ("not used", unexpected)) if keys)
        raise ValueError(
            f"{getattr(model.config, '_name_or_path', '') or 'This checkpoint'}: its weights do not match its variant spec "
            f"(config.relattn: {spec}): {details}. The spec or the weights were edited or come from different models; "
            "re-save the model with save_pretrained, or restore the checkpoint's config.json."
        )


def _check_model_class(config: PreTrainedConfig, caller: Any) -> None:
    """Refuse building a native (not adapted) model class with an adapted config: called when
    `PreTrainedModel.__init__` (frame `caller`) stores the model's attention implementation."""
    if caller is None or caller.f_code is not _MODEL_INIT_CODE:
        return
    model = caller.f_locals.get("self")
    if model is None or getattr(type(model), ADAPTED_MARK, False) or id(config) in _BUILDING.get():
        return
    name = type(model).__name__
    auto = _auto_class_name(type(config).model_type[len(ADAPTED_PREFIX):], name) or "AutoModelFor<Task>"
    raise ValueError(
        f"{name} cannot be built from {type(config).__name__}: that is the config of an hf_relattn adapted model "
        f"(model_type {config.model_type!r}, variants: {_spec_names(getattr(config, SPEC_KEY, None))}), and {name} is the "
        f"native class, which would silently drop the variants (and their weights). Build the adapted class with the Auto "
        f"class instead: {auto}.from_pretrained(path) or {auto}.from_config(config) (it is Relattn{name} in hf_relattn.modeling)."
    )


def adapted_config_class(base: type) -> type:
    """The `Relattn<Config>` subclass of a native config class (created once), model_type `relattn_<family>`."""
    model_type = ADAPTED_PREFIX + base.model_type
    if model_type not in _config_classes:

        def __setattr__(self: PreTrainedConfig, key: str, value: Any) -> None:
            if key == "_attn_implementation_internal":
                _check_model_class(self, sys._getframe(1))
            base.__setattr__(self, key, value)

        _config_classes[model_type] = type(
            "Relattn" + base.__name__,
            (base,),
            {
                "model_type": model_type,
                "__setattr__": __setattr__,
                "__module__": __name__,
                "__doc__": f"{base.__name__} adapted by hf_relattn.",
            },
        )
        globals()[_config_classes[model_type].__name__] = _config_classes[model_type]
    return _config_classes[model_type]


def _register_output_capture(cls: type) -> None:
    """Register a model class for output capture, as `PreTrainedModel.__init__` does for its
    instance's class (the registry is keyed by str(class): a model whose class changed in
    place, or an unpickled one whose __init__ never ran, would not be in it)."""
    if _CAN_RECORD_REGISTRY is not None:
        dict.__setitem__(_CAN_RECORD_REGISTRY, str(cls), cls._can_record_outputs)


def _register_key_renamings(base: type, cls: type) -> None:
    """Give `Relattn<Base>` the renamings of legacy checkpoint keys that transformers keeps for
    `<Base>` by class name (e.g. ViTModel: attention.attention.query -> attention.q_proj): without
    them an adapted checkpoint loaded into another head (AutoModel of a classifier) matches no weight."""
    if get_checkpoint_conversion_mapping is None:
        return
    renamings = get_checkpoint_conversion_mapping(base.__name__)
    if renamings and get_checkpoint_conversion_mapping(cls.__name__) is None:
        register_checkpoint_conversion_mapping(cls.__name__, renamings)


def _engine_on_sub_configs(config: Any) -> None:
    """Before an adapted model is built: every sub-config (at any depth) asks for the engine too.

    A composite model's sub-models (CLIPModel's towers) resolve their own attention
    implementation from their sub-config; with none requested (a plain from_pretrained) they
    would pick sdpa and silently drop the variants attached to their layers. A sub-config that
    already asks for the engine or a flag keeps it."""
    top = getattr(config, "_attn_implementation", None)
    wanted = top if isinstance(top, str) and top.startswith(ENGINE_NAME) else ENGINE_NAME
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if isinstance(sub, PreTrainedConfig):
            own = getattr(sub, "_attn_implementation", None)
            if not (isinstance(own, str) and own.startswith(ENGINE_NAME)):
                sub._attn_implementation = wanted
            _engine_on_sub_configs(sub)


def adapted_class(base: type) -> type:
    """The `Relattn<Base>` subclass of a native model class (created once)."""
    if base in _model_classes.values():
        return base
    if base in _model_classes:
        return _model_classes[base]
    config_cls = adapted_config_class(base.config_class)

    def __init__(self: PreTrainedModel, config: Any, *args: Any, **kwargs: Any) -> None:
        _engine_on_sub_configs(config)
        token = _BUILDING.set((*_BUILDING.get(), id(config)))
        try:
            base.__init__(self, config, *args, **kwargs)
        finally:
            _BUILDING.reset(token)
        rebuild_from_spec(self, getattr(config, SPEC_KEY, None))

    # tools (and transformers' own tests) read the native signature, e.g. add_pooling_layer
    __init__.__signature__ = inspect.signature(base.__init__)

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
        base._validate_model_kwargs(self, {k: v for k, v in model_kwargs.items() if k not in model_input_names()})

    def save_pretrained(self: PreTrainedModel, save_directory: Any, *args: Any, push_to_hub: bool = False, **kwargs: Any) -> Any:
        # weights and config, then the self-contained modeling code for trust_remote_code loads;
        # an upload comes after both (transformers' own would run before the code is written)
        ours = push_to_hub and PUSH_HOOKS
        hub = {k: kwargs.pop(k) for k in PUSH_OPTIONS if k in kwargs} if ours else {}
        result = base.save_pretrained(self, save_directory, *args, push_to_hub=push_to_hub and not ours, **kwargs)
        if not self.name_or_path:
            # converted in memory: the saved folder is now where this model's weights live
            self.name_or_path = str(Path(save_directory).resolve())
        if kwargs.get("is_main_process", True):
            for hook in SAVE_HOOKS:
                hook(self, save_directory)
            if ours:
                PUSH_HOOKS[0](save_directory, hub.pop("repo_id", None) or Path(save_directory).name, token=kwargs.get("token"), **hub)
        return result

    def from_pretrained(cls: type, *args: Any, **kwargs: Any) -> Any:
        # transformers reports weights the model does not have, or lacks, only in its load
        # report (and initialises the lacking ones at random): in an attention block that means
        # the spec and the weights disagree (a hand-edited spec), so the load fails instead
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = base.from_pretrained.__func__(cls, *args, output_loading_info=True, **kwargs)
        check_attention_weights(model, info)
        return (model, info) if wants_info else model

    def push_to_hub(self: PreTrainedModel, repo_id: str, *args: Any, **kwargs: Any) -> Any:
        # transformers' push_to_hub writes its own README; ours carries the variant spec and results
        if not PUSH_HOOKS:
            return base.push_to_hub(self, repo_id, *args, **kwargs)
        unknown = sorted(set(kwargs) - set(PUSH_OPTIONS) - {"token"})
        if args or unknown:
            raise TypeError(f"push_to_hub of an adapted model takes repo_id and {', '.join(PUSH_OPTIONS[1:])}, token; "
                            f"got {list(args) + unknown} (see hf_relattn.push_to_hub for results= and dry_run=)")
        origin = self.name_or_path  # the hook saves into a temporary folder first
        try:
            return PUSH_HOOKS[0](self, repo_id, **kwargs)
        finally:
            self.name_or_path = origin

    def init_continuous_batching(self: PreTrainedModel, *args: Any, **kwargs: Any) -> Any:
        # transformers' continuous batching switches attention to 'paged|eager', 'sdpa' or flash
        # attention (paged KV cache, packed sequences), none of which applies the variants
        raise ValueError(
            f"{type(self).__name__} is adapted by hf_relattn (variants: {_spec_names(spec_of(self.config))}): continuous batching "
            "(generate_batch, init_continuous_batching, generate(cache_implementation='paged')) is not supported, because "
            "transformers runs it with its paged attention implementations ('paged|eager', 'sdpa', flash attention), which "
            f"would drop the variants; the variants run only in attn_implementation={ENGINE_NAME!r}. Use model.generate(...) "
            "(dynamic or static cache, batched with padding) instead."
        )

    def generate(self: PreTrainedModel, *args: Any, **kwargs: Any) -> Any:
        # speculative decoding runs prompt and draft tokens as one forward: for a variant whose
        # choices look at later tokens (MoSA) that is not what decoding token by token computes
        config = kwargs.get("generation_config") or self.generation_config
        asked = [k for k in SPECULATIVE if kwargs.get(k) is not None or getattr(config, k, None) is not None]
        ahead = sorted({v.name for m in self.modules() for v in getattr(m, ATTACHED, ()) if v.looks_ahead}) if asked else []
        if ahead:
            raise ValueError(
                f"{', '.join(asked)}: speculative decoding is not supported with {', '.join(ahead)}, whose choice for a token "
                "depends on the later tokens of a forward (a forward over prompt and draft tokens would choose differently "
                "from decoding token by token). Use model.generate(...) without it."
            )
        return base.generate(self, *args, **kwargs)

    methods = {"_validate_model_kwargs": _validate_model_kwargs} if hasattr(base, "_validate_model_kwargs") else {}
    if hasattr(base, "init_continuous_batching"):
        methods["init_continuous_batching"] = init_continuous_batching
    if hasattr(base, "generate"):
        methods["generate"] = generate
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
            "from_pretrained": classmethod(from_pretrained),
            ADAPTED_MARK: True,
            "__module__": __name__,
            "__doc__": f"{base.__name__} with hf_relattn attention variants (spec in config.relattn).",
        },
    )
    _model_classes[base] = cls
    _register_output_capture(cls)
    _register_key_renamings(base, cls)
    globals()[cls.__name__] = cls
    return cls


def make_adapted(model: PreTrainedModel) -> None:
    """Turn a native model into its adapted type in place (class and config class).

    Called before every conversion that is not expressible natively (`convert` also forgets the
    model's `name_or_path`, as PEFT records it as an adapter's base model, until it is saved;
    `config._name_or_path` keeps the origin for model cards)."""
    if is_adapted(model):
        return
    model.__class__ = adapted_class(type(model))
    _register_output_capture(type(model))
    model.config.__class__ = adapted_config_class(type(model.config))
    # A config read from config.json (every from_pretrained model) holds `model_type` as an
    # instance attribute, which would shadow the adapted class's and make is_adapted() False.
    model.config.model_type = type(model.config).model_type
    setattr(model.config, SPEC_KEY, {"format": SPEC_FORMAT, "variants": []})


def auto_classes() -> list[type]:
    """Every Auto model class of transformers (AutoModel, AutoModelForCausalLM, ...)."""
    return [
        obj
        for obj in vars(modeling_auto).values()
        if inspect.isclass(obj) and issubclass(obj, _BaseAutoModelClass) and getattr(obj, "_model_mapping", None) is not None
    ]


def mapped_class_name(auto_cls: type, family: str) -> str | None:
    """The native class an Auto class builds for `family` (the default one where it lists
    several, as DeiT's image classifier with and without teacher), or None."""
    name = auto_cls._model_mapping._model_mapping.get(family)
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    return name if isinstance(name, str) and hasattr(transformers, name) else None


def register_model_types() -> None:
    """Register `relattn_<family>` with AutoConfig and every Auto class the family supports."""
    for model_type in ADAPTERS:
        base_config = AutoConfig.for_model(model_type).__class__
        config_cls = adapted_config_class(base_config)
        if config_cls.model_type not in transformers.CONFIG_MAPPING:
            AutoConfig.register(config_cls.model_type, config_cls)

        for auto_cls in auto_classes():
            class_name = mapped_class_name(auto_cls, model_type)
            if class_name is None:
                continue
            native = getattr(transformers, class_name)
            if getattr(native, "config_class", None) is not base_config:
                # an Auto class may map the model type to a model of another family (e.g. a
                # multimodal model built around it): not this family's class to adapt
                continue
            auto_cls.register(config_cls, adapted_class(native), exist_ok=True)


def check_attention_request(model: PreTrainedModel, requested: Any, built: bool = False) -> None:
    """Refuse a `relattn*` attention implementation that would fail later or be silently wrong:
    an unknown name, a family the plugin does not adapt, or flag options (config.relattn) that
    are not valid for the flag's variant. Runs when a model is built or switched, before any
    forward."""
    if not isinstance(requested, str) or not requested.startswith(ENGINE_NAME):
        return
    names = attention_names()
    if requested not in names:
        raise ValueError(f"Unknown hf_relattn attention implementation {requested!r}; valid: {', '.join(names)} "
                         "(hf_relattn.variants() describes each variant)")
    get_adapter(model.config)  # unsupported family: the same error as convert gives
    if requested.startswith(FLAG_PREFIX):
        name = requested[len(FLAG_PREFIX):]
        flag = get_variant_class(name).from_options(flag_options(model.config, name))
        adapter = get_adapter(model.config)
        if built:  # the layers exist: the checks a conversion onto every layer would make
            layers = adapter.attention_modules(model)
            flag.check_model(model, adapter, list(range(len(layers))))
            for idx, module in enumerate(layers):
                attached = [v for v in getattr(module, ATTACHED, ()) if v.name != flag.name]
                check_composition([*attached, flag], f"attn_implementation={requested!r}: layer {idx}")
        _share_flag_options(model.config, name)


def _share_flag_options(config: Any, name: str) -> None:
    """Give every sub-config (at any depth) the flag's options of `config`.

    transformers hands a flag to the sub-models of a composite model (CLIPModel's towers), whose
    attention modules read `relattn` off their own sub-config: without this they would run the
    flag with its default options (a window of 512 instead of the 2 asked), silently."""
    options = flag_options(config, name)
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if isinstance(sub, PreTrainedConfig):
            if options:
                setattr(sub, SPEC_KEY, dict(options))
            elif hasattr(sub, SPEC_KEY):
                delattr(sub, SPEC_KEY)
            _share_flag_options(sub, name)


def _wrap_attention_checks(cls: type) -> None:
    """Wrap transformers' `get_correct_attn_implementation` (every attn_implementation request of
    every model passes through it, at build and at `set_attn_implementation`) and `post_init`
    (the end of every model's `__init__`, when its layers exist: from_pretrained and from_config
    only check the request before) with `check_attention_request`: only our names are affected."""
    get_correct, post_init = cls.get_correct_attn_implementation, cls.post_init

    def get_correct_attn_implementation(self: PreTrainedModel, requested: str | None, is_init_check: bool = False) -> str:
        check_attention_request(self, requested, built=not is_init_check)
        return get_correct(self, requested, is_init_check)

    def post_init_checked(self: PreTrainedModel, *args: Any, **kwargs: Any) -> Any:
        result = post_init(self, *args, **kwargs)
        requested = getattr(self.config, "_attn_implementation", None)
        if isinstance(requested, str) and requested.startswith(FLAG_PREFIX):
            check_attention_request(self, requested, built=True)
        return result

    setattr(get_correct_attn_implementation, ADAPTED_MARK, True)
    cls.get_correct_attn_implementation = get_correct_attn_implementation
    cls.post_init = post_init_checked


def _refusing_attention_inputs(function: Any) -> Any:
    """transformers' sdpa function, refusing the inputs only the plugin's variants read (e.g.
    `relation_ids`): a model without those variants would otherwise ignore them silently."""

    def attention(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        given = [name for name in model_input_names() if kwargs.get(name) is not None]
        if given:
            owners = sorted(v for v, cls in VARIANTS.items() if set(given) & set(cls.model_inputs))
            raise ValueError(
                f"{', '.join(given)} passed to a model whose attention cannot use them ({type(module).__name__} runs "
                f"transformers' sdpa attention, which would ignore them): convert it first to {' or '.join(map(repr, owners))}, "
                f"e.g. hf_relattn.convert(model, {owners[0]!r}, ...)."
            )
        return function(module, *args, **kwargs)

    setattr(attention, ADAPTED_MARK, True)
    return attention


def attention_names() -> list[str]:
    """Names accepted by `attn_implementation=`: the engine and every flag variant."""
    return [ENGINE_NAME] + [FLAG_PREFIX + name for name, cls in sorted(VARIANTS.items()) if cls.flag]


def register_attention() -> None:
    """Register the engine under every attention name, each with the sdpa mask function (without
    it the function would get no padding mask), and `relattn` as a known config attribute."""
    for name in attention_names():
        AttentionInterface.register(name, relattn_attention)
        AttentionMaskInterface.register(name, sdpa_mask)
    if not getattr(PreTrainedModel.get_correct_attn_implementation, ADAPTED_MARK, False):
        _wrap_attention_checks(PreTrainedModel)
    sdpa = AttentionInterface._global_mapping.get("sdpa")
    if sdpa is not None and not getattr(sdpa, ADAPTED_MARK, False):
        AttentionInterface.register("sdpa", _refusing_attention_inputs(sdpa))
    if not hasattr(vars(PreTrainedConfig).get(SPEC_KEY), "__set__"):
        # class-level value None: vanilla configs keep writing no `relattn` key; refuses a full
        # spec on a native config class (see the module docstring). A copy of this module
        # (remote code) may have installed it first: one is enough.
        setattr(PreTrainedConfig, SPEC_KEY, _SpecAttribute())
