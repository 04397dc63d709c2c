"""save_pretrained / from_pretrained round trips of converted models, and the no-plugin refusal.

The reference is always the model before saving: same class, same state dict, identical logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_same_state, state_copy, tiny_bert, tiny_llama, tiny_vit
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    LlamaForCausalLM,
)

import hf_relattn

GQA2 = {"name": "gqa", "options": {"num_key_value_heads": 2, "init": "mean"}}
ALIBI = {"name": "alibi", "options": {}}


def _config_json(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _round_trip(model, auto_cls, inputs: dict, tmp_path: Path, family: str, expected_variants: list[dict]):
    before_state = state_copy(model)
    before_logits = _logits(model, inputs)
    model.save_pretrained(tmp_path)

    cfg = _config_json(tmp_path)
    assert cfg["model_type"] == f"relattn_{family}"
    assert cfg["relattn"] == {"format": 1, "variants": expected_variants}

    loaded = auto_cls.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert type(loaded).__name__ == "Relattn" + type(model).__mro__[1].__name__
    assert loaded.config.relattn == {"format": 1, "variants": expected_variants}
    assert loaded.config._attn_implementation == "relattn"
    assert_same_state(before_state, loaded)
    loaded.eval()
    after = _logits(loaded, inputs)
    assert after.dtype == before_logits.dtype
    torch.testing.assert_close(after, before_logits, atol=0, rtol=0)
    return loaded


# -------------------------------------------------------------------------------- LLaMA
@pytest.mark.parametrize(
    "steps, expected",
    [
        pytest.param([("gqa", {"num_key_value_heads": 2, "layers": [0]})], [{**GQA2, "layers": [0]}], id="gqa_partial"),
        pytest.param([("alibi", {"layers": [1]})], [{**ALIBI, "layers": [1]}], id="alibi_converted"),
        pytest.param(
            [("gqa", {"num_key_value_heads": 2, "layers": [1]}), ("alibi", {})],
            [{**GQA2, "layers": [1]}, {**ALIBI, "layers": [0, 1]}],
            id="gqa_alibi",
        ),
    ],
)
def test_llama_round_trip(steps, expected, ids, tmp_path) -> None:
    model = tiny_llama()
    native_logits = _logits(model, {"input_ids": ids})
    for name, kwargs in steps:
        hf_relattn.convert(model, name, **kwargs)
    # the conversion changed the computation, so identical reloaded logits mean something
    assert not torch.allclose(_logits(model, {"input_ids": ids}), native_logits, atol=1e-4)
    loaded = _round_trip(model, AutoModelForCausalLM, {"input_ids": ids}, tmp_path, "llama", expected)
    if any(name == "gqa" for name, _ in steps):
        layer = expected[0]["layers"][0]
        assert loaded.model.layers[layer].self_attn.k_proj.out_features == 2 * 16
        assert loaded.model.layers[1 - layer].self_attn.k_proj.out_features == 4 * 16


def test_llama_round_trip_bfloat16(ids, tmp_path) -> None:
    # loaded the way a user gets a bf16 checkpoint (model.to(bf16) would also round the
    # rotary inv_freq buffer, which from_pretrained keeps in float32)
    tiny_llama().save_pretrained(tmp_path / "native")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "native", dtype=torch.bfloat16).eval()
    tmp_path = tmp_path / "converted"
    hf_relattn.convert(model, "gqa", num_key_value_heads=2, layers=[0])
    hf_relattn.convert(model, "alibi", layers=[1])
    assert model.model.layers[0].self_attn.k_proj.weight.dtype == torch.bfloat16
    loaded = _round_trip(
        model, AutoModelForCausalLM, {"input_ids": ids}, tmp_path, "llama", [{**GQA2, "layers": [0]}, {**ALIBI, "layers": [1]}]
    )
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())


@pytest.mark.parametrize("groups", [1, 2])
def test_llama_gqa_all_layers_saves_native(groups, ids, tmp_path) -> None:
    model = tiny_llama()
    hf_relattn.convert(model, "gqa", num_key_value_heads=groups)
    assert type(model) is LlamaForCausalLM
    before_state = state_copy(model)
    before = _logits(model, {"input_ids": ids})
    model.save_pretrained(tmp_path)

    cfg = _config_json(tmp_path)
    assert cfg["model_type"] == "llama"
    assert cfg["num_key_value_heads"] == groups
    assert "relattn" not in cfg

    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LlamaForCausalLM
    assert loaded.config.num_key_value_heads == groups
    assert_same_state(before_state, loaded)
    torch.testing.assert_close(_logits(loaded, {"input_ids": ids}), before, atol=0, rtol=0)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is LlamaForCausalLM


# --------------------------------------------------------------------------------- BERT
@pytest.mark.parametrize(
    "variant, options, expected",
    [
        ("gqa", {"num_key_value_heads": 2}, [{**GQA2, "layers": [0, 1]}]),
        ("mqa", {}, [{"name": "gqa", "options": {"num_key_value_heads": 1, "init": "mean"}, "layers": [0, 1]}]),
    ],
)
def test_bert_round_trip(variant, options, expected, ids, tmp_path) -> None:
    model = tiny_bert()
    hf_relattn.convert(model, variant, **options)
    loaded = _round_trip(model, AutoModelForSequenceClassification, {"input_ids": ids}, tmp_path, "bert", expected)
    kv = expected[0]["options"]["num_key_value_heads"]
    assert all(layer.attention.self.value.out_features == kv * 8 for layer in loaded.bert.encoder.layer)
    # a padded batch through the reloaded model: mask still honoured
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        a = loaded(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1][1, :6]
        b = model(ids[1:, :6], output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- ViT
def test_vit_round_trip(pixels, tmp_path) -> None:
    model = tiny_vit()
    native = _logits(model, {"pixel_values": pixels})
    hf_relattn.convert(model, "gqa", num_key_value_heads=2)
    hf_relattn.convert(model, "alibi", layers=[0])
    assert not torch.allclose(_logits(model, {"pixel_values": pixels}), native, atol=1e-5)
    loaded = _round_trip(
        model,
        AutoModelForImageClassification,
        {"pixel_values": pixels},
        tmp_path,
        "vit",
        [{**GQA2, "layers": [0, 1]}, {**ALIBI, "layers": [0]}],
    )
    assert all(layer.attention.k_proj.out_features == 2 * 8 for layer in loaded.vit.layers)


def test_adapted_config_loads_with_autoconfig(tmp_path) -> None:
    model = tiny_bert()
    hf_relattn.convert(model, "alibi", layers=[1])
    model.save_pretrained(tmp_path)
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert cfg.model_type == "relattn_bert"
    assert isinstance(cfg, type(model.config).__mro__[1])  # a BertConfig subclass
    assert cfg.relattn == {"format": 1, "variants": [{**ALIBI, "layers": [1]}]}


# ------------------------------------------------------------------ no plugin -> refusal
NO_PLUGIN = textwrap.dedent(
    """
    import sys
    assert "hf_relattn" not in sys.modules
    import transformers
    assert "hf_relattn" not in sys.modules
    print("BEFORE_LOAD", flush=True)
    try:
        transformers.{auto}.from_pretrained({path!r})
    finally:
        assert "hf_relattn" not in sys.modules, "the plugin was imported"
    print("LOADED", flush=True)
    """
)


def test_load_without_plugin_fails_loudly(ids, tmp_path) -> None:
    llama_dir, bert_dir = tmp_path / "llama", tmp_path / "bert"
    llama = tiny_llama()
    hf_relattn.convert(llama, "gqa", num_key_value_heads=2, layers=[0])
    llama.save_pretrained(llama_dir)
    bert = tiny_bert()
    hf_relattn.convert(bert, "mqa")
    bert.save_pretrained(bert_dir)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    runs = {
        family: subprocess.Popen(
            [sys.executable, "-c", NO_PLUGIN.format(auto=auto, path=str(path))],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for family, auto, path in [
            ("llama", "AutoModelForCausalLM", llama_dir),
            ("bert", "AutoModelForSequenceClassification", bert_dir),
        ]
    }
    for family, proc in runs.items():
        out, err = proc.communicate(timeout=120)
        assert "BEFORE_LOAD" in out, err
        assert "LOADED" not in out
        assert proc.returncode != 0
        assert "the plugin was imported" not in err
        # no silent vanilla load: transformers asks for the checkpoint's remote code
        assert "trust_remote_code" in err, err[-2000:]


# ------------------------------------------------- converting a checkpoint read from disk
@pytest.mark.parametrize("family", ["llama", "bert", "vit"])
def test_convert_loaded_checkpoint_matches_in_memory_conversion(family, ids, pixels, tmp_path) -> None:
    """A from_pretrained model (its config read from config.json) converts exactly like the
    in-memory model it was saved from, records its spec and round-trips."""
    build, auto_cls, inputs = {
        "llama": (tiny_llama, AutoModelForCausalLM, {"input_ids": ids}),
        "bert": (tiny_bert, AutoModelForSequenceClassification, {"input_ids": ids}),
        "vit": (tiny_vit, AutoModelForImageClassification, {"pixel_values": pixels}),
    }[family]
    reference = build()
    reference.save_pretrained(tmp_path / "native")
    loaded = auto_cls.from_pretrained(tmp_path / "native").eval()
    for model in (reference, loaded):
        hf_relattn.convert(model, "gqa", num_key_value_heads=2, layers=[1])
        hf_relattn.convert(model, "alibi", layers=[0])
    expected = [{**GQA2, "layers": [1]}, {**ALIBI, "layers": [0]}]
    assert hf_relattn.is_adapted(loaded)
    assert loaded.config.model_type == f"relattn_{family}"
    assert loaded.config.relattn == {"format": 1, "variants": expected}
    assert loaded.config._attn_implementation == "relattn"
    assert type(loaded) is type(reference)
    if family != "bert":  # tiny BERT's classifier logits are too small to tell variants apart
        torch.testing.assert_close(_logits(loaded, inputs), _logits(reference, inputs), atol=1e-6, rtol=0)
    with torch.no_grad():
        a = loaded(**inputs, output_hidden_states=True).hidden_states[-1]
        b = reference(**inputs, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    _round_trip(loaded, auto_cls, inputs, tmp_path / "converted", family, expected)


def test_reloaded_adapted_model_converts_further(ids, tmp_path) -> None:
    model = tiny_llama()
    hf_relattn.convert(model, "gqa", num_key_value_heads=2, layers=[0])
    model.save_pretrained(tmp_path / "step1")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "step1").eval()
    for m in (model, loaded):
        hf_relattn.convert(m, "alibi", layers=[1])
    expected = [{**GQA2, "layers": [0]}, {**ALIBI, "layers": [1]}]
    torch.testing.assert_close(_logits(loaded, {"input_ids": ids}), _logits(model, {"input_ids": ids}), atol=0, rtol=0)
    _round_trip(loaded, AutoModelForCausalLM, {"input_ids": ids}, tmp_path / "step2", "llama", expected)


def test_flag_active_at_conversion_is_persisted(ids, tmp_path) -> None:
    # Reference: the same model with ALiBi converted explicitly on every layer, then GQA.
    flagged = tiny_llama()
    flagged.set_attn_implementation("relattn_alibi")
    hf_relattn.convert(flagged, "gqa", num_key_value_heads=2, layers=[0])
    explicit = hf_relattn.convert(hf_relattn.convert(tiny_llama(), "alibi"), "gqa", num_key_value_heads=2, layers=[0])
    with torch.no_grad():
        expected = explicit(ids).logits
        torch.testing.assert_close(flagged(ids).logits, expected, atol=1e-6, rtol=0)
        flagged.save_pretrained(tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-6, rtol=0)
    names = {entry["name"] for entry in json.loads((tmp_path / "config.json").read_text())["relattn"]["variants"]}
    assert names == {"gqa", "alibi"}
