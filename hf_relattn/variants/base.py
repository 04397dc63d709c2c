"""The contract every attention variant implements, and the variant registry.

A variant is a dataclass whose fields are its options (so `Alibi()`, `GQA(num_key_value_heads=1)`).
Class attributes say which axis of attention it changes (`AXES`: structure, scores,
values, sparsity, gating), describe it and cite its paper. `convert` validates every variant
against the whole model before it modifies anything, then calls `apply` layer by layer;
the attention engine (`hf_relattn.engine`) calls the hooks at run time: a variant that computes
attention its own way implements `attend` (its kernel lives in its module, built from the
shared blocks in `hf_relattn.ops`); the others add score terms (`score_bias`, `relation_term`)
to the shared paths (`hf_relattn.paths`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..call import CACHE, LAYER_INPUT
from ..ops.relational import RelationTerm

if TYPE_CHECKING:
    from torch import nn

    from ..call import AttnCall
    from ..patches import FamilyAdapter

__all__ = ["CACHE", "LAYER_INPUT", "RelationTerm", "Variant", "VARIANTS", "register_variant", "get_variant_class"]

AXES = ("structure", "scores", "values", "sparsity", "gating")
# Sane upper bounds of option values, so a typo (10**12) is refused when the variant is built
# instead of failing in the allocator: token counts (windows, strides, blocks, distances) and
# rows of a learned table (one row per relative distance, bucket or relation label).
MAX_TOKENS = 1 << 24
MAX_TABLE_ROWS = 1 << 16
# Options whose values are data, not text (calibration batches): the command line and bench
# specs do not offer them (`hf-relattn convert --calibrate DATA` builds the batches).
DATA_OPTIONS = ("batches",)


@dataclass
class Variant:
    """Base class: subclasses are dataclasses whose fields are the variant's options."""

    name: ClassVar[str]
    axis: ClassVar[str]
    description: ClassVar[str]
    paper: ClassVar[str]
    # What the variant needs before its numbers mean anything, and its known limits (model cards).
    limits: ClassVar[str] = ""
    # Parameter-free variants that change nothing in the weights can be selected by flag:
    # from_pretrained(..., attn_implementation="relattn_<name>").
    flag: ClassVar[bool] = False
    # True when the variant sizes something per head from the config (tables, slopes, routers,
    # K/V groups): it goes before pruning, which leaves layers with fewer heads.
    heads_from_config: ClassVar[bool] = False
    # True when a forward's choice for a token depends on the tokens after it (MoSA's expert
    # choice): generation then goes token by token, and speculative decoding (one forward over
    # prompt and draft tokens) would compute something else, so it is refused.
    looks_ahead: ClassVar[bool] = False
    # Keyword arguments of the model's forward the variant reads inside attention (e.g. the
    # relation variant's `relation_ids`); the engine refuses them for a model without it.
    model_inputs: ClassVar[tuple[str, ...]] = ()
    # What the variant needs of each sample's first token, which a call with cached keys on a
    # layer with the model's native sliding window cannot see (the window's mask hides it like
    # padding, the window's cache drops it): None (only distances), "positions" (blocks and
    # sinks placed at positions counted from it: the engine then counts them from the model's
    # position_ids) or "keys" (the first keys themselves: a gate's block means, routing over the
    # whole sequence, ids indexing it; refused there).
    sequence_start: ClassVar[str | None] = None

    # ------------------------------------------------------------------ options
    def __post_init__(self) -> None:
        # every way a variant is built (convert, a flag's options, a saved spec) checks its
        # option values here, before anything runs
        self.check_options()

    def check_options(self) -> None:
        """Raise ValueError for option values that are wrong whatever the model (types, ranges,
        bounds); checks that need the model go in `validate`. Subclasses call super()."""

    @classmethod
    def option_names(cls) -> list[str]:
        # read off the class once (torch.compile cannot trace dataclasses.fields)
        names = cls.__dict__.get("_option_names")
        return list(names) if names is not None else [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Variant:
        """Build from user options, rejecting unknown names with the list of valid ones."""
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            valid = ", ".join(cls.option_names()) or "(none)"
            raise ValueError(
                f"Unknown option(s) {unknown} for variant {cls.name!r}; valid options: {valid}, "
                "plus `layers` when converting."
            )
        return cls(**options)

    # Values of options that did not exist when a saved spec was written (a spec without them
    # meant these); `from_saved` fills them in, new conversions get the dataclass defaults.
    legacy_options: ClassVar[dict[str, Any]] = {}

    @classmethod
    def from_saved(cls, options: dict[str, Any]) -> Variant:
        """Build from the options of a saved spec entry (config.relattn)."""
        return cls.from_options({**cls.legacy_options, **options})

    @classmethod
    def fits_on_batches(cls, options: dict[str, Any]) -> bool:
        """True when a conversion with these options would fit its initialisation on calibration
        batches if given them (`batches=`): tools that hold calibration data pass it then."""
        return False

    def spec_name(self) -> str:
        """Name recorded in config.relattn (aliases record their canonical variant)."""
        return self.name

    def options(self) -> dict[str, Any]:
        """JSON-serialisable options (what goes into config.relattn)."""
        return dataclasses.asdict(self)

    # ------------------------------------------------------------- conversion
    def validate(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int]) -> None:
        """Raise ValueError if the variant cannot be converted onto `layers`; must not modify the
        model (variants that fit their initialisation on calibration data do it here)."""
        self.check_model(model, adapter, layers)

    def check_model(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int]) -> None:
        """Raise ValueError if the variant does not fit the model (family, layer and head
        counts): run by `convert` and when a saved spec is loaded. Must not modify anything."""

    def native(self, adapter: FamilyAdapter, num_layers: int, layers: list[int]) -> bool:
        """True when the result is the family's own native architecture (nothing to record)."""
        return False

    def apply(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int], initialize: bool) -> None:
        """Change the model in place for the given layers.

        ``initialize`` is True for a conversion of pretrained weights (values matter) and
        False when an adapted checkpoint is rebuilt from its config (shapes matter; the
        weights are loaded afterwards).
        """
        for idx in layers:
            attach(adapter.attention_modules(model)[idx], self)

    # ------------------------------------------------------------ attention hooks
    def attend(self, call: AttnCall, rest: Callable[[AttnCall], torch.Tensor]) -> torch.Tensor | None:
        """This variant's own attention for the call, (B, Q, H, D), or None: not its case, the
        engine goes on to the layer's next variant and finally to the shared score path.
        `rest(call)` computes the call with the layer's remaining variants (a variant that wraps
        them, as a head gate does, calls it). The engine asks the gating axis first, then sparsity."""
        return None

    def score_bias(
        self, module: nn.Module, num_heads: int, q_pos: torch.Tensor, k_pos: torch.Tensor, *, causal: bool
    ) -> torch.Tensor | None:
        """Additive term on q.k/sqrt(d) for the scores axis in a `causal` (or bidirectional) call:
        (num_heads, Q, K) float32, or None."""
        return None

    def relation_term(
        self, module: nn.Module, num_heads: int, q_pos: torch.Tensor, k_pos: torch.Tensor, inputs: dict[str, Any], *,
        causal: bool
    ) -> RelationTerm | None:
        """Learned relation-aware terms (keys, values, scalar bias by label), or None.

        `inputs` are the extra keyword arguments of the model's forward (e.g. `relation_ids`)."""
        return None

    # ----------------------------------------------------------------- benchmarks
    @classmethod
    def bench_variants(cls, suite: str, length: int) -> list[Variant]:
        """The configurations `hf-relattn bench kernels --suite <suite>` measures at `length`
        tokens ("relative", "sparse", "moh"); none by default."""
        return []

    def bench_setup(self, module: nn.Module, generator: torch.Generator) -> Callable[[torch.Tensor], dict[str, Any]] | None:
        """Give a stand-in attention module (`hf_relattn.kernels.attention_stub`, variant attached)
        random values of what this variant's attention reads (tables, routers); returns the extra
        keyword arguments of a call on queries q, or None."""
        return None

    def bench_label(self, module: nn.Module) -> str:
        """The case name in the kernels benchmark."""
        shown = {k: v for k, v in self.options().items() if k not in ("dense_layers", "sinks", "sink_logit")}
        if hasattr(self, "sinks"):
            shown["sinks"] = self.sinks
        return f"{self.name}({','.join(f'{k}={v}' for k, v in shown.items())})"

    def computed_pairs(self, module: nn.Module, q: torch.Tensor, k: torch.Tensor) -> float | None:
        """(query, key) pairs the variant's attention computes per batch entry and head (the
        kernels benchmark's work column); None: those of dense attention."""
        return None


def check_int_options(variant: Variant, *options: str, minimum: int = 1, maximum: int = MAX_TOKENS) -> None:
    """Raise ValueError unless each option is an integer (not a bool) in [minimum, maximum]."""
    for option in options:
        value = getattr(variant, option)
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise ValueError(f"{variant.name}: {option} must be an integer in [{minimum}, {maximum:,}], got {value!r}")


def check_number(variant: Variant, option: str, low: float, high: float, *, low_open: bool = False) -> None:
    """Raise ValueError unless the option is a finite real number in [low, high] ((low, high] with low_open)."""
    value = getattr(variant, option)
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or not (low < value if low_open else low <= value) or value > high:
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{variant.name}: {option} must be a number in {bounds}, got {value!r}")


def check_choice(variant: Variant, option: str, choices: Sequence[Any]) -> None:
    """Raise ValueError unless the option is one of `choices`."""
    value = getattr(variant, option)
    if isinstance(value, (list, dict)) or value not in choices:
        raise ValueError(f"{variant.name}: {option} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_flag(variant: Variant, option: str) -> None:
    """Raise ValueError unless the option is True or False."""
    value = getattr(variant, option)
    if not isinstance(value, bool):
        raise ValueError(f"{variant.name}: {option} must be True or False, got {value!r}")


VARIANTS: dict[str, type[Variant]] = {}


def register_variant(cls: type[Variant]) -> type[Variant]:
    if cls.axis not in AXES:
        raise ValueError(f"{cls.__name__}.axis must be one of {AXES}, got {cls.axis!r}")
    cls._option_names = tuple(f.name for f in dataclasses.fields(cls))
    VARIANTS[cls.name] = cls
    return cls


def get_variant_class(name: str) -> type[Variant]:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"Unknown variant {name!r}; valid variants: {', '.join(sorted(VARIANTS))}") from None


ATTACHED = "relattn_variants"


def _call_inputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    hidden = args[0] if args else kwargs["hidden_states"]
    # the attention block's cache argument: `cache` (transformers 5.2x), `past_key_values`
    # (older), `layer_past` (GPT-NeoX)
    cache = next((kwargs[k] for k in ("cache", "past_key_values", "layer_past") if kwargs.get(k) is not None), None)
    return args, {**kwargs, LAYER_INPUT: hidden, CACHE: cache}


def track_input(module: nn.Module) -> None:
    """Pass the attention block's input (and the KV cache) to the attention function of each
    call, for variants whose router reads it (MoSA, MoH); registered once per module."""
    if not getattr(module, "_relattn_input_hook", False):
        module.register_forward_pre_hook(_call_inputs, with_kwargs=True)
        module._relattn_input_hook = True


def add_router(attn: nn.Module, adapter: FamilyAdapter, name: str, outputs: int, std: float | None) -> None:
    """A bias-free linear router from the layer input (hidden size) to `outputs`, on the query
    projection's device and dtype, stored as `name` and fed by `track_input`; initialised
    N(0, std), zero with std=0, left as built with std=None (a checkpoint fills it)."""
    like = getattr(attn, adapter.q_proj).weight
    router = torch.nn.Linear(attn.config.hidden_size, outputs, bias=False, device=like.device, dtype=like.dtype)
    if std is not None:
        torch.nn.init.normal_(router.weight, std=std) if std > 0 else torch.nn.init.zeros_(router.weight)
    setattr(attn, name, router)
    track_input(attn)


def layer_input(module: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The input of the current call of an attention block with `track_input` (from the call's
    keyword arguments `inputs`)."""
    x = inputs.get(LAYER_INPUT)
    if x is None:
        raise RuntimeError(f"{type(module).__name__} was called without its input; was it converted with a router variant?")
    return x


def check_composition(variants: Sequence[Variant], where: str) -> None:
    """Raise ValueError unless the variants can act together inside one attention call (what the
    engine runs; order does not matter). Structure variants (gqa, prune) combine with anything;
    scores variants (alibi, shaw, t5_bias, relation) add up; a layer has at most one sparsity
    variant, which does not take score terms; and at most one gating variant (MoH)."""
    names = [v.name for v in variants]
    dup = sorted({n for n in names if names.count(n) > 1})
    by_axis = {axis: [v.name for v in variants if v.axis == axis] for axis in AXES}
    problem = None
    if dup:
        problem = f"{dup} appears twice"
    elif len(by_axis["sparsity"]) > 1:
        problem = f"two sparse patterns {by_axis['sparsity']} (one per layer)"
    elif by_axis["sparsity"] and by_axis["scores"]:
        problem = f"a sparse pattern {by_axis['sparsity']} with score terms {by_axis['scores']}"
    elif len(by_axis["gating"]) > 1:
        problem = f"two head gates {by_axis['gating']} (one per layer)"
    if problem:
        raise ValueError(
            f"{where}: cannot combine {names}: {problem}. Supported on one layer: any of gqa/mqa and prune, with either "
            "score terms (alibi, shaw, t5_bias, relation; any number) or one sparse pattern (sliding_window, strided, "
            "fixed, power, moba, mosa), plus at most one moh (README: 'Combining variants')."
        )


def owned_attributes(module: nn.Module, variant: Variant) -> list[str]:
    """Names of the parameters and submodules `variant` added to an attention module: they are
    named `relattn_<variant>...`; pattern variants' sink logits too (see sparse_base)."""
    prefixes = (f"relattn_{variant.name}", *getattr(variant, "extra_attributes", ()))
    return [n for n in (*module._parameters, *module._modules, *module._buffers) if n.startswith(prefixes)]


def detach(module: nn.Module, variant: Variant) -> None:
    """Remove `variant` and what it added from an attention module (before converting it again)."""
    for name in owned_attributes(module, variant):
        delattr(module, name)
    setattr(module, ATTACHED, tuple(v for v in getattr(module, ATTACHED, ()) if v.name != variant.name))


def attach(module: nn.Module, variant: Variant) -> None:
    """Record that `variant` acts inside this attention module (read by the engine)."""
    current = tuple(v for v in getattr(module, ATTACHED, ()) if v.name != variant.name)
    setattr(module, ATTACHED, current + (variant,))


def model_input_names() -> tuple[str, ...]:
    """Every model input some registered variant reads inside attention (`Variant.model_inputs`)."""
    return tuple(sorted({name for cls in VARIANTS.values() for name in cls.model_inputs}))


# ------------------------------------------------------------- variants of a module
SPEC_KEY = "relattn"  # config.relattn: the spec convert writes, or a flag's options
FLAG_PREFIX = "relattn_"  # attn_implementation="relattn_<name>" selects a flag variant
# Flag variants by name and options, built once (variants are immutable option holders).
_flag_variants: dict[tuple[Any, ...], Variant] = {}


def flag_options(config: Any, name: str) -> dict[str, Any]:
    """Options for flag variant `name` from `config.relattn`.

    `config.relattn` is either the full spec written by `convert` ({"variants": [...]}), whose
    entry named `name` supplies the options, or (with a flag) a plain dict of options, as in
    `from_pretrained(p, attn_implementation="relattn_alibi", relattn={...})`.
    """
    spec = getattr(config, SPEC_KEY, None) or {}
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

