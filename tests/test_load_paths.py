"""Load and build paths around adapted checkpoints that must never give a vanilla model silently.

Reference for every check: the Auto class's load of the same folder (the adapted model), or the
model's own outputs; each adapted folder holds a conversion that changes the computation, so a
vanilla model would give different numbers.
"""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch
from conftest import tiny_bert, tiny_llama, tiny_vit
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    ViTForImageClassification,
    ViTModel,
)
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

import hf_relattn
from hf_relattn.modeling import adapted_class

FAMILIES = {
    # family: (build the task model, its Auto class, the conversions)
    "llama": (tiny_llama, AutoModelForCausalLM, [("gqa", {"num_key_value_heads": 2, "layers": [0]}), ("alibi", {})]),
    "bert": (tiny_bert, AutoModelForSequenceClassification, [("alibi", {})]),
    "vit": (tiny_vit, AutoModelForImageClassification, [("alibi", {})]),
}
# (family, concrete class, the Auto class a user should take for it)
CONCRETE = [
    ("llama", LlamaForCausalLM, AutoModelForCausalLM),
    ("llama", LlamaModel, AutoModel),
    ("bert", BertForSequenceClassification, AutoModelForSequenceClassification),
    ("bert", BertModel, AutoModel),
    ("vit", ViTForImageClassification, AutoModelForImageClassification),
    ("vit", ViTModel, AutoModel),
]
IDS = pytest.mark.parametrize("family, concrete, auto", CONCRETE, ids=[c.__name__ for _, c, _ in CONCRETE])


def _inputs(family: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    if family == "vit":
        return {"pixel_values": torch.randn(2, 1, 16, 16)}
    return {"input_ids": torch.randint(3, 90, (2, 11))}


def _output(model: torch.nn.Module, family: str) -> torch.Tensor:
    """Logits of a task model, the last hidden state of a bare backbone."""
    with torch.no_grad():
        out = model.eval()(**_inputs(family))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _convert(model, conversions):
    for name, options in conversions:
        options = dict(options)
        hf_relattn.convert(model, name, layers=options.pop("layers", None), **options)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> folder of its converted task model (random init, then the conversions)."""
    out = {}
    for family, (build, _, conversions) in FAMILIES.items():
        out[family] = tmp_path_factory.mktemp(f"adapted-{family}")
        _convert(build(), conversions).save_pretrained(out[family])
    return out


def _loads_as_adapted_or_refuses(load, auto, folder, family) -> None:
    """`load()` either gives the adapted model (same outputs as the Auto class's load) or
    raises a ValueError that names the problem and the Auto class to use."""
    reference = auto.from_pretrained(folder)
    assert type(reference).__name__.startswith("Relattn")
    try:
        model = load()
    except ValueError as err:
        message = str(err)
        assert "hf_relattn" in message and "adapted" in message, message
        assert f"{auto.__name__}.from_pretrained(" in message, message
        return
    assert hf_relattn.is_adapted(model), f"{type(model).__name__}: a vanilla model"
    torch.testing.assert_close(_output(model, family), _output(reference, family), atol=0, rtol=0)


# ------------------------------------------------------------- 1. concrete classes
@IDS
def test_concrete_class_load_of_an_adapted_folder(family, concrete, auto, folders) -> None:
    folder = folders[family]
    _loads_as_adapted_or_refuses(lambda: concrete.from_pretrained(folder), auto, folder, family)


@IDS
def test_adapted_config_given_to_a_concrete_class(family, concrete, auto, folders) -> None:
    folder = folders[family]
    _loads_as_adapted_or_refuses(
        lambda: concrete.from_pretrained(folder, config=AutoConfig.from_pretrained(folder)), auto, folder, family
    )
    # the engine requested explicitly, as an adapted model's own config holds it
    _loads_as_adapted_or_refuses(
        lambda: concrete.from_pretrained(folder, config=AutoConfig.from_pretrained(folder), attn_implementation="relattn"),
        auto, folder, family,
    )

    def build_then_load_weights(config):
        model = concrete(config)  # the Auto class's load of the same head has the same weight names
        model.load_state_dict(auto.from_pretrained(folder).state_dict())
        return model

    _loads_as_adapted_or_refuses(lambda: build_then_load_weights(AutoConfig.from_pretrained(folder)), auto, folder, family)
    in_memory = auto.from_pretrained(folder).config  # holds _attn_implementation "relattn"
    assert in_memory._attn_implementation == "relattn"
    _loads_as_adapted_or_refuses(lambda: build_then_load_weights(in_memory), auto, folder, family)


def test_refusal_comes_before_any_weight_is_read(folders, tmp_path) -> None:
    """The concrete-class refusal happens while config.json is parsed: no weights needed."""
    (tmp_path / "config.json").write_text((folders["llama"] / "config.json").read_text())
    with pytest.raises(ValueError, match=r"AutoModelForCausalLM\.from_pretrained\(") as err:
        LlamaForCausalLM.from_pretrained(tmp_path)
    assert "'relattn_llama'" in str(err.value) and "alibi" in str(err.value) and "gqa" in str(err.value)
    with pytest.raises(ValueError, match="AutoConfig"):
        LlamaConfig.from_pretrained(tmp_path)


def test_legitimate_flows_still_work(folders, tmp_path) -> None:
    """Flag options on native models, Auto loads, from_config, deepcopy/pickle/to_dict/save of
    adapted configs, and converting a model loaded with a concrete class."""
    ids = _inputs("llama")["input_ids"]
    tiny_llama().save_pretrained(tmp_path / "native")
    options = {"window": 3, "block_size": 4}
    flagged = LlamaForCausalLM.from_pretrained(tmp_path / "native", attn_implementation="relattn_sliding_window", relattn=options)
    assert type(flagged) is LlamaForCausalLM and flagged.config.relattn == options
    converted = hf_relattn.convert(LlamaForCausalLM.from_pretrained(tmp_path / "native"), "sliding_window", **options)
    native = LlamaForCausalLM.from_pretrained(tmp_path / "native").eval()
    with torch.no_grad():
        expected = converted.eval()(ids).logits
        torch.testing.assert_close(flagged.eval()(ids).logits, expected, atol=1e-6, rtol=0)
        assert not torch.allclose(native(ids).logits, expected, atol=1e-4)
    # a plain options dict is fine on a native config; a full spec is not
    config = LlamaConfig()
    config.relattn = options
    assert config.to_dict()["relattn"] == options
    with pytest.raises(ValueError, match="AutoModelFor"):
        config.relattn = {"format": 1, "variants": []}
    assert config.relattn == options

    adapted = AutoConfig.from_pretrained(folders["llama"])
    spec = adapted.relattn
    assert spec["variants"] and type(adapted).__name__ == "RelattnLlamaConfig"
    for clone in (copy.deepcopy(adapted), pickle.loads(pickle.dumps(adapted))):
        assert type(clone) is type(adapted) and clone.relattn == spec
    assert adapted.to_dict()["relattn"] == spec and adapted.to_diff_dict()["relattn"] == spec
    adapted.save_pretrained(tmp_path / "config-only")
    assert AutoConfig.from_pretrained(tmp_path / "config-only").relattn == spec
    built = AutoModelForCausalLM.from_config(adapted)
    assert type(built).__name__ == "RelattnLlamaForCausalLM"
    assert built.model.layers[0].self_attn.k_proj.out_features == 2 * 16
    # set_attn_implementation on an adapted model (its config guards model building only)
    built.set_attn_implementation("sdpa")
    assert built.config._attn_implementation == "relattn"


# ---------------------------------------------------------- 2. output_hidden_states
BACKBONES = {
    "llama": lambda: tiny_llama().model,
    "bert": lambda: tiny_bert().bert,
    "vit": lambda: tiny_vit().vit,
}


def _check_hidden_states(model, family) -> None:
    with torch.no_grad():
        out = model.eval()(**_inputs(family), output_hidden_states=True)
    assert out.hidden_states is not None, f"{type(model).__name__}: no hidden states"
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    last = out.hidden_states[-1]
    if family == "vit":  # ViT's last_hidden_state is after its final layer norm
        last = model.layernorm(last)
    torch.testing.assert_close(last, out.last_hidden_state, atol=1e-6, rtol=0)
    # the first is the embedding output, the layers' input
    embeddings = model.embed_tokens(_inputs(family)["input_ids"]) if family == "llama" else None
    if embeddings is not None:
        torch.testing.assert_close(out.hidden_states[0], embeddings, atol=0, rtol=0)


@pytest.mark.parametrize("family", list(BACKBONES))
def test_hidden_states_of_a_converted_backbone(family, tmp_path) -> None:
    model = BACKBONES[family]()
    before = _output(model, family)
    # as in a fresh process: no Relattn<Backbone> built yet, whose __init__ would register the
    # class for output capture (the registry is keyed by str(class))
    dict.pop(_CAN_RECORD_REGISTRY, str(adapted_class(type(model))), None)
    hf_relattn.convert(model, "alibi")
    assert type(model).__name__.startswith("Relattn")
    assert not torch.allclose(_output(model, family), before, atol=1e-6)  # the conversion changed it
    _check_hidden_states(model, family)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    _check_hidden_states(loaded, family)
    torch.testing.assert_close(_output(loaded, family), _output(model, family), atol=0, rtol=0)


# ------------------------------------------------------------------ 3. signatures
@pytest.mark.parametrize("native", [LlamaForCausalLM, LlamaModel, BertModel, BertForSequenceClassification, ViTModel,
                                    ViTForImageClassification])
def test_adapted_class_keeps_the_native_signature(native) -> None:
    cls = adapted_class(native)
    assert cls is not native and issubclass(cls, native)
    assert inspect.signature(cls.__init__) == inspect.signature(native.__init__)
    assert inspect.signature(cls) == inspect.signature(native)


def test_native_init_arguments_reach_the_adapted_class(tmp_path) -> None:
    bert = hf_relattn.convert(tiny_bert().bert, "alibi")
    bert.save_pretrained(tmp_path / "bert")
    full = AutoModel.from_pretrained(tmp_path / "bert")
    assert "add_pooling_layer" in inspect.signature(type(full).__init__).parameters
    bare = AutoModel.from_pretrained(tmp_path / "bert", add_pooling_layer=False)
    assert type(bare) is type(full) and full.pooler is not None and bare.pooler is None
    torch.testing.assert_close(_output(bare, "bert"), _output(full, "bert"), atol=0, rtol=0)
    built = type(full)(AutoConfig.from_pretrained(tmp_path / "bert"), add_pooling_layer=False)
    assert built.pooler is None and hf_relattn.is_adapted(built)

    vit = hf_relattn.convert(tiny_vit().vit, "alibi")
    vit.save_pretrained(tmp_path / "vit")
    masked = AutoModel.from_pretrained(tmp_path / "vit", use_mask_token=True)
    assert masked.embeddings.mask_token is not None
    assert type(masked)(AutoConfig.from_pretrained(tmp_path / "vit"), use_mask_token=True).embeddings.mask_token is not None


def test_native_config_classes_untouched_by_the_guard() -> None:
    """Building native models from native configs (and reading `relattn`) is unchanged."""
    for config in (LlamaConfig(), BertConfig()):
        assert config.relattn is None and "relattn" not in config.to_dict()
    assert type(LlamaModel(LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=32,
                                       num_attention_heads=2, vocab_size=50))) is LlamaModel
