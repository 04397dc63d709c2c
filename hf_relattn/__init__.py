"""hf_relattn: attention variants from the literature inside pretrained Hugging Face models.

Importing the package registers, and changes nothing else:
- the engine as attention function "relattn" and every parameter-free variant as
  "relattn_<name>" in transformers' `AttentionInterface`, each with the sdpa mask function in
  `AttentionMaskInterface` (without it the function would silently get no padding mask);
- the adapted model types `relattn_<family>` with `AutoConfig` and the Auto model classes;
- `relattn` as a known config attribute (default None), so that
  `from_pretrained(p, attn_implementation="relattn_alibi", relattn={...})` passes options.
"""

from __future__ import annotations

from transformers import AttentionInterface, PreTrainedConfig
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .convert import convert
from .engine import ENGINE_NAME, FLAG_PREFIX, force_implementation, relattn_attention
from .heads import head_gates, head_importance
from .modeling import SPEC_KEY, is_adapted, register_model_types
from .variants import VARIANTS

__version__ = "0.1.0"
__all__ = [
    "__version__",
    "attention_names",
    "convert",
    "force_implementation",
    "head_gates",
    "head_importance",
    "is_adapted",
    "variants",
]


def variants() -> dict[str, str]:
    """Every variant: name -> one-line description and its paper."""
    return {name: f"{cls.description} [{cls.paper}]" for name, cls in sorted(VARIANTS.items())}


def attention_names() -> list[str]:
    """Names accepted by `attn_implementation=`: the engine and every flag variant."""
    return [ENGINE_NAME] + [FLAG_PREFIX + name for name, cls in sorted(VARIANTS.items()) if cls.flag]


def _register() -> None:
    for name in attention_names():
        AttentionInterface.register(name, relattn_attention)
        AttentionMaskInterface.register(name, sdpa_mask)
    if not hasattr(PreTrainedConfig, SPEC_KEY):
        # class-level default only: vanilla configs keep writing no `relattn` key
        setattr(PreTrainedConfig, SPEC_KEY, None)
    register_model_types()


_register()

