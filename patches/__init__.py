"""One adapter per model family: the only code that knows a family's module and weight names.

An adapter answers, for its family: where the attention modules are (in layer order), what
their query/key/value/output projections are called, how many heads they have, which tasks it trains for, what LoRA targets, and whether its native config can express grouped
K/V heads, and which modules are causal before any call (`is_causal`; at run time the engine
reads the call's own `is_causal`, else the module's).
Adapters are keyed by `config.model_type` (as liger-kernel does), with the `relattn_` prefix of
adapted checkpoints stripped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

ADAPTED_PREFIX = "relattn_"


@dataclass(frozen=True)
class FamilyAdapter:
    model_type: str
    # Names of the projections inside one attention module.
    q_proj: str
    k_proj: str
    v_proj: str
    # LoRA targets: module-name suffixes of every attention projection, output included.
    lora_targets: tuple[str, ...]
    # Training tasks the family supports (finetune --task).
    tasks: tuple[str, ...]
    # True when the family's own config can say `num_key_value_heads` (e.g. LLaMA), so a
    # model whose every layer has G K/V heads is a plain native checkpoint.
    native_gqa: bool
    # Why removing query heads cannot leave the others as they were (e.g. a norm over all heads
    # together), or None: `prune` refuses the family with this reason.
    prune_refused: str | None = None
    # Why K/V heads cannot be merged here (e.g. a fused QKV projection not split yet), or None.
    gqa_refused: str | None = None
    # Why variants that read extra model inputs (`relation_ids`) cannot run here, or None.
    inputs_refused: str | None = None
    # True when tokens are image patches on a 2-D grid (`token_grid` gives the geometry).
    spatial: ClassVar[bool] = False

    def base_model(self, model: nn.Module) -> nn.Module:
        """The bare backbone (LlamaModel, BertModel, ViTModel) inside any task head."""
        base = getattr(model, "base_model", model)
        return base

    def layer_modules(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """The module of each layer that calls the attention interface, in layer order."""
        raise NotImplementedError

    def attention_blocks(self, model: nn.Module) -> list[nn.Module]:
        """The whole attention block of each layer (projections in and out): `--train attention`."""
        return self.attention_modules(model)

    def num_heads(self, config: Any) -> int:
        return config.num_attention_heads

    def head_dim(self, config: Any) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def module_num_heads(self, attn: nn.Module) -> int:
        """Query heads of one attention module, read off its query projection.

        Equals `num_heads(config)` unless heads were pruned (`prune` variant), which changes
        single modules while the config keeps the original count."""
        return getattr(attn, self.q_proj).out_features // self.head_dim(attn.config)

    def output_projection_site(self, layer: nn.Module) -> tuple[nn.Module, str]:
        """(parent module, attribute name) of a layer's attention output projection: the linear
        map whose input is the concatenated head outputs (head h = columns h*D .. (h+1)*D)."""
        raise NotImplementedError

    def output_projections(self, model: nn.Module) -> list[nn.Module]:
        """The attention output projection of each layer, in layer order."""
        return [getattr(*self.output_projection_site(layer)) for layer in self.layer_modules(model)]

    def set_output_projection(self, model: nn.Module, layer_idx: int, module: nn.Module) -> None:
        """Replace layer `layer_idx`'s attention output projection."""
        parent, name = self.output_projection_site(self.layer_modules(model)[layer_idx])
        setattr(parent, name, module)

    def projections(self, attn: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
        """The (query, key, value) projections of one module, for weight surgery. Families with
        one fused matrix (`patches.fused`) return nn.Linear copies of its rows: change them, then
        write them back with `set_projections`."""
        return getattr(attn, self.q_proj), getattr(attn, self.k_proj), getattr(attn, self.v_proj)

    def set_projections(self, attn: nn.Module, query: nn.Module, key: nn.Module, value: nn.Module) -> None:
        """Install (resized) query, key and value projections (re-fused where the family fuses them)."""
        for name, proj in zip((self.q_proj, self.k_proj, self.v_proj), (query, key, value)):
            setattr(attn, name, proj)

    def projection_sites(self, attn: nn.Module) -> tuple[tuple[nn.Module, torch.Tensor | None], ...]:
        """Where the model computes the query, key and value of one module: (module, output rows
        or None for all) each, for forward hooks that read them."""
        return tuple((proj, None) for proj in (getattr(attn, self.q_proj), getattr(attn, self.k_proj), getattr(attn, self.v_proj)))

    def as_linear(self, module: nn.Module) -> nn.Module:
        """An output projection as an nn.Linear (GPT-2's Conv1D: a copy; `set_output_projection`
        takes an nn.Linear back); other modules as they are."""
        return module

    def set_num_heads(self, attn: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        """Keep a module's bookkeeping consistent after query-head surgery (head pruning).

        transformers' sdpa/eager functions repeat K/V by `num_key_value_groups` when the module
        has it (LLaMA always; BERT/ViT once K/V heads were grouped)."""
        groups = num_heads // num_kv_heads
        if hasattr(attn, "num_key_value_groups") or groups != 1:
            attn.num_key_value_groups = groups

    def num_kv_heads(self, attn: nn.Module) -> int:
        """K/V heads of one attention module, read off its key projection."""
        return getattr(attn, self.k_proj).out_features // self.head_dim(attn.config)

    def set_num_kv_heads(self, attn: nn.Module, num_kv_heads: int) -> None:
        """Keep the module's own bookkeeping consistent after K/V surgery.

        `num_key_value_groups` is what transformers' sdpa/eager functions read to repeat K/V.
        """
        attn.num_key_value_groups = self.num_heads(attn.config) // num_kv_heads

    def is_causal(self, attn: nn.Module) -> bool:
        """True when the module attends only earlier tokens: its own `is_causal` (LLaMA), unless
        the family passes causality with each call instead (CLIP's text tower)."""
        return bool(getattr(attn, "is_causal", False))

    def token_grid(self, config: Any, num_tokens: int) -> tuple[int, int, int]:
        """(prefix tokens, grid rows, grid columns) of a spatial family's token sequence."""
        raise TypeError(f"{self.model_type} tokens are a sequence, not a 2-D grid")

    def positions_from_mask(self, model: nn.Module) -> None:
        """Make the backbone count token positions in each sample's own sequence when the caller
        gives an attention mask but no position ids (for terms that see absolute positions
        through the queries, e.g. Shaw's on RoPE). Families without such positions: nothing."""

    def rope_planes(self, config: Any) -> list[tuple[int, int]] | None:
        """The (dim, dim) pairs of a head that rotary embeddings rotate together, or None for
        a family without rotary positions (any orthogonal map of a key head is then harmless)."""
        return None

    def set_config_kv_heads(self, config: Any, num_kv_heads: int) -> None:
        if not self.native_gqa:
            raise TypeError(f"{self.model_type} has no native num_key_value_heads")
        config.num_key_value_heads = num_kv_heads


ADAPTERS: dict[str, FamilyAdapter] = {}


def register_adapter(adapter: FamilyAdapter) -> FamilyAdapter:
    ADAPTERS[adapter.model_type] = adapter
    return adapter


def base_model_type(model_type: str) -> str:
    return model_type[len(ADAPTED_PREFIX):] if model_type.startswith(ADAPTED_PREFIX) else model_type


def get_adapter(model_or_config: Any) -> FamilyAdapter:
    """The adapter for a model (or config); a clear error names the supported families."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = base_model_type(getattr(config, "model_type", "") or "")
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise ValueError(
            f"Unsupported architecture {model_type or type(model_or_config).__name__!r}: "
            f"hf_relattn supports {', '.join(sorted(ADAPTERS))}."
        ) from None


from . import (  # noqa: E402,F401  (each registers itself)
    bert,
    clip,
    deit,
    dinov2,
    dinov2_with_registers,
    distilbert,
    gemma3,
    gpt2,
    gpt_neox,
    llama,
    mistral,
    modernbert,
    olmo2,
    phi3,
    qwen2,
    qwen3,
    roberta,
    smollm3,
    vit,
    xlm_roberta,
)
