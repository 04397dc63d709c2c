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

from typing import Any

from .convert import convert
from .engine import force_implementation
from .heads import head_gates, head_importance
from .modeling import (
    PUSH_HOOKS,
    SAVE_HOOKS,
    attention_names,
    is_adapted,
    register_attention,
    register_model_types,
)
from .remote import write_remote_code
from .streaming import StreamingCache
from .transfer import CalibrationReport, calibrate
from .variants import VARIANTS
from .variants.moh import moh_aux_loss
from .variants.sparse_base import optimizer_groups
from .version import __version__

__all__ = [
    "__version__",
    "attention_names",
    "calibrate",
    "CalibrationReport",
    "convert",
    "force_implementation",
    "head_gates",
    "head_importance",
    "is_adapted",
    "moh_aux_loss",
    "optimizer_groups",
    "push_to_hub",
    "StreamingCache",
    "variants",
]


def push_to_hub(model_or_folder: Any, repo_id: str, **options: Any) -> str:
    """Upload an adapted checkpoint (a folder or a model) with our model card: see
    `hf_relattn.hub.push_to_hub`, imported on first use (importing the package does not load the
    Hub code)."""
    from .hub import push_to_hub as push

    return push(model_or_folder, repo_id, **options)


def variants() -> dict[str, str]:
    """Every variant: name -> one-line description and its paper."""
    return {name: f"{cls.description} [{cls.paper}]" for name, cls in sorted(VARIANTS.items())}


def _register() -> None:
    register_attention()
    register_model_types()
    SAVE_HOOKS.append(write_remote_code)
    PUSH_HOOKS.append(push_to_hub)


_register()

