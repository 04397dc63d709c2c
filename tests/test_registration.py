"""What `import hf_relattn` registers in transformers, and what it leaves alone."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import tiny_bert, tiny_llama, tiny_vit
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    LlamaConfig,
    LlamaForCausalLM,
    ModernBertConfig,
    PreTrainedConfig,
    ViTConfig,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import hf_relattn
from hf_relattn.engine import relattn_attention
from hf_relattn.variants.base import VARIANTS

NAMES = ["relattn", "relattn_alibi", "relattn_fixed", "relattn_moba", "relattn_power", "relattn_sliding_window", "relattn_strided"]


@pytest.mark.parametrize("name", NAMES)
def test_attention_function_registered_globally(name: str) -> None:
    assert name in transformers.AttentionInterface._global_mapping
    assert transformers.AttentionInterface._global_mapping[name] is relattn_attention
    # a fresh interface instance (what every model uses) and the shared one both see it
    assert transformers.AttentionInterface()[name] is relattn_attention
    assert name in ALL_ATTENTION_FUNCTIONS.valid_keys()


@pytest.mark.parametrize("name", NAMES)
def test_mask_function_registered_globally(name: str) -> None:
    # without it, transformers would build no padding mask for the name
    assert name in AttentionMaskInterface._global_mapping
    assert AttentionMaskInterface._global_mapping[name] is sdpa_mask
    assert AttentionMaskInterface()[name] is sdpa_mask


def test_attention_names_are_exactly_the_registered_ones() -> None:
    assert sorted(hf_relattn.attention_names()) == NAMES
    ours = {k for k in transformers.AttentionInterface._global_mapping if k.startswith("relattn")}
    assert ours == set(NAMES)  # gqa/mqa change weights, so they are no flags


def test_variants_listing() -> None:
    listing = hf_relattn.variants()
    assert set(listing) == {"gqa", "mqa", "alibi", "t5_bias", "shaw", "relation", "sliding_window", "strided", "fixed", "moba", "power", "mosa", "prune", "moh"}
    papers = {"gqa": ["Ainslie", "2023"], "mqa": ["Shazeer", "2019"], "alibi": ["Press", "2022"], "t5_bias": ["Raffel", "2020"],
              "shaw": ["Shaw", "2018"], "relation": ["Shaw", "2018"], "sliding_window": ["Child", "2019"],
              "strided": ["Child", "2019"], "fixed": ["Child", "2019"], "moba": ["Lu", "2025"], "power": ["Chen", "2025"],
              "mosa": ["Piękos", "2025"], "prune": ["Michel", "2019"], "moh": ["Jin", "2024"]}
    assert all(VARIANTS[name].limits for name in listing), "every variant states its limits (model cards show them)"
    for name, text in listing.items():
        assert isinstance(text, str)
        description, _, paper = text.partition(" [")
        assert len(description) > 20, name
        assert paper.endswith("]"), name
        for word in papers[name]:
            assert word in paper, (name, word)


@pytest.mark.parametrize(
    "family, base_config, autos",
    [
        ("llama", LlamaConfig, [AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification]),
        ("bert", BertConfig, [AutoModel, AutoModelForSequenceClassification]),
        ("vit", ViTConfig, [AutoModel, AutoModelForImageClassification]),
        ("modernbert", ModernBertConfig, [AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification]),
    ],
)
def test_adapted_model_types_registered(family, base_config, autos) -> None:
    model_type = f"relattn_{family}"
    assert model_type in transformers.CONFIG_MAPPING
    config_cls = transformers.CONFIG_MAPPING[model_type]
    assert issubclass(config_cls, base_config) and config_cls is not base_config
    assert config_cls.model_type == model_type
    config = AutoConfig.for_model(model_type)
    assert isinstance(config, config_cls)
    for auto in autos:
        model_cls = auto._model_mapping[config_cls]
        native_cls = auto._model_mapping[base_config]
        assert issubclass(model_cls, native_cls) and model_cls is not native_cls
        assert model_cls.__name__ == "Relattn" + native_cls.__name__


def test_auto_from_config_builds_adapted_model() -> None:
    """AutoModelFor*.from_config on an adapted config replays the spec (shapes)."""
    spec = {"format": 1, "variants": [{"name": "gqa", "options": {"num_key_value_heads": 1, "init": "mean"}, "layers": [1]}]}
    native = tiny_llama()
    kwargs = {k: v for k, v in native.config.to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("relattn_llama", **kwargs, relattn=spec)
    assert config.model_type == "relattn_llama" and config.relattn == spec
    model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == "RelattnLlamaForCausalLM"
    assert model.model.layers[0].self_attn.k_proj.out_features == native.model.layers[0].self_attn.k_proj.out_features
    assert model.model.layers[1].self_attn.k_proj.out_features == 16
    assert model.model.layers[1].self_attn.v_proj.out_features == 16


def test_config_default_is_class_level() -> None:
    assert PreTrainedConfig.relattn is None
    for config in (LlamaConfig(), BertConfig(), ViTConfig()):
        assert config.relattn is None
        assert "relattn" not in vars(config)
        assert "relattn" not in config.to_dict()
        assert "relattn" not in config.to_diff_dict()


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert, tiny_vit])
def test_vanilla_checkpoint_has_no_relattn_key(build, tmp_path) -> None:
    model = build()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "relattn" not in saved
    assert not saved["model_type"].startswith("relattn")
    assert not hf_relattn.is_adapted(model)


def test_flag_by_from_pretrained_equals_set_attn_implementation(ids, tmp_path) -> None:
    """The registered flag name is accepted both at load time and afterwards, same result,
    and it really changes the computation (the function is used, not a silent fallback)."""
    tiny_llama().save_pretrained(tmp_path)
    native = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    flagged = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="relattn_alibi").eval()
    assert flagged.config._attn_implementation == "relattn_alibi"
    assert type(flagged) is LlamaForCausalLM  # a flag changes no weights and no class
    later = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    later.set_attn_implementation("relattn_alibi")
    with torch.no_grad():
        a, b, c = native(ids).logits, flagged(ids).logits, later(ids).logits
    torch.testing.assert_close(b, c, atol=0, rtol=0)
    assert (a - b).abs().max() > 1e-3
    # the engine name alone, with no variant, is exactly native attention
    engine = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="relattn").eval()
    with torch.no_grad():
        torch.testing.assert_close(engine(ids).logits, a, atol=1e-6, rtol=0)
