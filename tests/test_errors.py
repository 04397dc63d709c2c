"""Every invalid request fails with a clear ValueError *before* the model is touched, and
adapted models refuse attention backends that would silently drop their variants."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from conftest import assert_same_state, state_copy, tiny_bert, tiny_llama, tiny_vit
from reference import attention_modules
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, OPTConfig, OPTForCausalLM

import hf_relattn
from hf_relattn.variants.base import ATTACHED


# ------------------------------------------------------------------------------ helpers
def _build(kind: str) -> torch.nn.Module:
    if kind == "llama":
        return tiny_llama()
    if kind == "bert":
        return tiny_bert()
    if kind == "vit":
        return tiny_vit()
    if kind == "llama_adapted":  # already converted once: its spec must survive a failed call
        model = tiny_llama()
        hf_relattn.convert(model, "gqa", num_key_value_heads=2, layers=[0])
        hf_relattn.convert(model, "alibi", layers=[1])
        return model
    if kind == "bert_adapted":
        model = tiny_bert()
        hf_relattn.convert(model, "mqa", layers=[1])
        return model
    raise AssertionError(kind)


def _snapshot(model: torch.nn.Module) -> dict:
    return {
        "type": type(model),
        "config_type": type(model.config),
        "config": copy.deepcopy(model.config.to_dict()),
        "attn": model.config._attn_implementation,
        "state": state_copy(model),
        "attached": [tuple(getattr(m, ATTACHED, ())) for m in attention_modules(model)],
        "kv_groups": [getattr(m, "num_key_value_groups", None) for m in attention_modules(model)],
    }


def _assert_unchanged(before: dict, model: torch.nn.Module) -> None:
    assert type(model) is before["type"]
    assert type(model.config) is before["config_type"]
    assert model.config.to_dict() == before["config"]
    assert model.config._attn_implementation == before["attn"]
    assert_same_state(before["state"], model)
    assert [tuple(getattr(m, ATTACHED, ())) for m in attention_modules(model)] == before["attached"]
    assert [getattr(m, "num_key_value_groups", None) for m in attention_modules(model)] == before["kv_groups"]


def _assert_refused(model, variant: str, kwargs: dict, fragments: list[str]) -> str:
    before = _snapshot(model)
    with pytest.raises(ValueError) as info:
        hf_relattn.convert(model, variant, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    _assert_unchanged(before, model)
    return message


KINDS = ["llama", "bert", "vit", "llama_adapted", "bert_adapted"]

# (variant, options, fragments the message must contain); all tiny models have 4 heads, 2 layers
CASES = {
    "unknown_variant": ("rope", {}, ["'rope'", "gqa", "mqa", "alibi"]),
    "g_not_divisor": ("gqa", {"num_key_value_heads": 3}, ["3", "4", "[1, 2, 4]"]),
    "g_too_large": ("gqa", {"num_key_value_heads": 8}, ["[1, 2, 4]"]),
    "g_zero": ("gqa", {"num_key_value_heads": 0}, ["integer in [1,"]),
    "g_negative": ("gqa", {"num_key_value_heads": -2}, ["integer in [1,"]),
    "g_float": ("gqa", {"num_key_value_heads": 2.0}, ["integer", "2.0"]),
    "g_str": ("gqa", {"num_key_value_heads": "2"}, ["integer"]),
    "g_bool": ("gqa", {"num_key_value_heads": True}, ["integer"]),
    "g_missing": ("gqa", {}, ["num_key_value_heads", "integer"]),
    "unknown_option": ("gqa", {"num_key_value_heads": 2, "groups": 2}, ["groups", "num_key_value_heads", "init"]),
    "unknown_option_alibi": ("alibi", {"max_bias": 8}, ["max_bias", "alibi"]),
    "bad_init": ("gqa", {"num_key_value_heads": 2, "init": "median"}, ["median", "mean", "first", "random"]),
    "mqa_g2": ("mqa", {"num_key_value_heads": 2}, ["mqa", "gqa"]),
    "layer_out_of_range": ("gqa", {"num_key_value_heads": 2, "layers": [0, 2]}, ["2", "out of range", "0..1"]),
    "layer_negative_out_of_range": ("alibi", {"layers": [-3]}, ["-3", "out of range"]),
    "layer_int_out_of_range": ("mqa", {"layers": 7}, ["7", "out of range"]),
    "layer_str": ("gqa", {"num_key_value_heads": 2, "layers": ["0"]}, ["integers", "'0'"]),
    "layer_float": ("alibi", {"layers": [1.0]}, ["integers", "1.0"]),
    "layer_bool": ("alibi", {"layers": [True]}, ["integers"]),
    "layers_empty": ("gqa", {"num_key_value_heads": 2, "layers": []}, ["empty"]),
    "layers_empty_tuple": ("alibi", {"layers": ()}, ["empty"]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_invalid_convert_leaves_model_untouched(kind: str, case: str, ids, pixels) -> None:
    model = _build(kind)
    inputs = {"pixel_values": pixels} if kind == "vit" else {"input_ids": ids}
    with torch.no_grad():
        before = model(**inputs, output_hidden_states=True).hidden_states[-1]
    variant, options, fragments = CASES[case]
    _assert_refused(model, variant, options, fragments)
    # and it still computes exactly what it did
    with torch.no_grad():
        after = model(**inputs, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_divisor_list_follows_head_count() -> None:
    model = tiny_llama(heads=6)
    message = _assert_refused(model, "gqa", {"num_key_value_heads": 4}, ["6"])
    assert re.search(r"\[1, 2, 3, 6\]", message), message


def test_unsupported_model_names_supported_families() -> None:
    torch.manual_seed(0)
    # OPT: a family the plugin does not adapt (GPT-2 was the example until issue 18 added it)
    config = OPTConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, ffn_dim=64, vocab_size=97,
                       max_position_embeddings=64, word_embed_proj_dim=32)
    model = OPTForCausalLM(config).eval()
    for variant, options in [("gqa", {"num_key_value_heads": 2}), ("alibi", {}), ("mqa", {"layers": [0]})]:
        message = _assert_refused(model, variant, options, ["opt", "llama", "bert", "vit"])
        assert "Unsupported" in message


def test_valid_conversion_after_refusals_matches_fresh_conversion(ids) -> None:
    """Refused calls leave no residue: a later valid conversion equals one on a fresh model."""
    model = tiny_llama()
    for case in ("g_not_divisor", "layer_out_of_range", "bad_init", "unknown_option"):
        variant, options, _ = CASES[case]
        with pytest.raises(ValueError):
            hf_relattn.convert(model, variant, **options)
    fresh = tiny_llama()
    for m in (model, fresh):
        hf_relattn.convert(m, "gqa", num_key_value_heads=2, layers=[1])
    assert model.config.relattn == fresh.config.relattn
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fresh(ids).logits, atol=0, rtol=0)


# ---------------------------------------------------------- adapted models and backends
@pytest.mark.parametrize("requested", ["eager", "flex_attention"])
@pytest.mark.parametrize("kind", ["llama_adapted", "bert_adapted"])
def test_adapted_model_refuses_other_backends(kind: str, requested: str, ids) -> None:
    model = _build(kind)
    before = _snapshot(model)
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True).hidden_states[-1]
    with pytest.raises(ValueError) as info:
        model.set_attn_implementation(requested)
    message = str(info.value)
    assert repr(requested) in message and "'relattn'" in message
    _assert_unchanged(before, model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, output_hidden_states=True).hidden_states[-1], reference, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["llama_adapted", "bert_adapted"])
def test_adapted_model_maps_sdpa_to_engine(kind: str, ids) -> None:
    """"sdpa" (the transformers default) is served by the engine, keeping the variants."""
    model = _build(kind)
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True).hidden_states[-1]
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "relattn"
    with torch.no_grad():
        torch.testing.assert_close(model(ids, output_hidden_states=True).hidden_states[-1], reference, atol=0, rtol=0)


@pytest.mark.parametrize(
    "kind, auto_cls", [("llama_adapted", AutoModelForCausalLM), ("bert_adapted", AutoModelForSequenceClassification)]
)
def test_adapted_checkpoint_refuses_eager_at_load(kind, auto_cls, tmp_path) -> None:
    _build(kind).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="eager"):
        auto_cls.from_pretrained(tmp_path, attn_implementation="eager")


def test_native_gqa_model_keeps_every_backend(ids) -> None:
    """GQA on every LLaMA layer is a plain LLaMA: eager is fine and equals the engine."""
    model = tiny_llama()
    hf_relattn.convert(model, "gqa", num_key_value_heads=2)
    with torch.no_grad():
        sdpa = model(ids).logits
        model.set_attn_implementation("eager")
        eager = model(ids).logits
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=0)


# ------------------------------------------------------------------- corrupt checkpoints
def _rewrite_spec(path, edit) -> None:
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg["relattn"])
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (lambda spec: spec.update(format=2), ["format", "2"]),
        (lambda spec: spec["variants"][0].update(name="rope"), ["rope", "gqa", "alibi"]),
        (lambda spec: spec["variants"][0]["options"].update(groups=2), ["groups", "num_key_value_heads"]),
    ],
    ids=["format", "variant", "option"],
)
def test_corrupt_spec_fails_loudly_at_load(edit, fragments, tmp_path) -> None:
    _build("llama_adapted").save_pretrained(tmp_path)
    _rewrite_spec(tmp_path, edit)
    with pytest.raises(ValueError) as info:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    for fragment in fragments:
        assert fragment in str(info.value)
