"""The two-tower CLIPModel (model_type `clip`, patches/clip.py): its layers are the text tower's,
then the vision tower's; each attention module runs with its tower's adapter and config.

The tiny model's towers differ in width and head count (text 2 heads of 16, vision 4 heads of
12), so a table, router or K/V group sized by the other tower's config fails. CLIP's towers
alone (clip_text_model, clip_vision_model) and CLIPForImageClassification are in the
conformance table (tests/variant_cases.py); remote code in tests/test_remote_code.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_clip
from transformers import AutoModel, CLIPTextModel, CLIPVisionModel
from variant_cases import randomize

import hf_relattn

TEXT_LAYERS, VISION_LAYERS = [0, 1], [2, 3]


def batch() -> dict[str, torch.Tensor]:
    """Two right-padded texts (13 and 7 tokens, no repeated ids) and two 16 x 16 images."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(94, generator=gen)[:13] + 3 for _ in range(2)])
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 1, 16, 16, generator=gen)}


def run(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits_per_image


def converted(*conversions: tuple[str, dict]) -> torch.nn.Module:
    model = tiny_clip()
    for name, options in conversions:
        hf_relattn.convert(model, name, **options)
    return randomize(model)


CONVERSIONS = {
    "shaw": [("shaw", {"max_distance": 2})],
    "sliding_window_sinks": [("sliding_window", {"window": 2, "block_size": 3, "sinks": 1, "sink_logit": True})],
    "alibi_gqa": [("alibi", {}), ("gqa", {"num_key_value_heads": 1, "layers": [1, 2]})],
    "prune_t5_bias": [("prune", {"heads": {0: [1], 3: [0, 2]}}), ("t5_bias", {"num_buckets": 8, "max_distance": 16, "layers": [1, 2]})],
    # moh on the text tower's 2 heads: the shared head is the only active one (no router)
    "moba_text_moh": [("moba", {"block_size": 2, "top_k": 2, "sinks": 1, "layers": TEXT_LAYERS}),
                      ("moh", {"router": "learned", "active_heads": 0.5, "shared_heads": 1})],
    "mosa_text": [("mosa", {"sparsity": 3, "layers": TEXT_LAYERS})],
    # shared heads named by the adapter's layer order (CLIPAttention has no layer_idx)
    "moh_shared_by_layer": [("moh", {"router": "learned", "active_heads": 0.75, "shared_heads": {0: [1], 1: [0], 2: [3], 3: [0, 2]}})],
}


@pytest.mark.parametrize("case", list(CONVERSIONS))
def test_default_path_equals_the_reference_path(case):
    """logits_per_image of the default paths equal the materialised formulas, and the conversion
    changes them (a variant on the other tower's sizes would fail to run)."""
    model = converted(*CONVERSIONS[case])
    inputs = batch()
    logits = run(model, inputs)
    with hf_relattn.force_implementation("reference"):
        reference = run(model, inputs)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert (logits - run(tiny_clip(), inputs)).abs().max() > 1e-3


def test_each_tower_runs_as_the_same_tower_converted_alone():
    """Text layers get causality and the text tower's sizes, vision layers the 2-D patch grid: the
    towers of a converted CLIPModel give what CLIPTextModel / CLIPVisionModel with the same weights
    and the same conversion give (those are checked case by case in tests/test_conformance.py)."""
    options = {"window": 2, "block_size": 3, "sinks": 1}
    model = converted(("sliding_window", {**options, "layers": [0, 2]}), ("shaw", {"max_distance": 2, "layers": [1, 3]}))
    text, vision = CLIPTextModel(model.config.text_config).eval(), CLIPVisionModel(model.config.vision_config).eval()
    for alone in (text, vision):  # layer 0 of each tower windowed, layer 1 with Shaw's terms
        hf_relattn.convert(alone, "sliding_window", layers=[0], **options)
        hf_relattn.convert(alone, "shaw", max_distance=2, layers=[1])
    text.load_state_dict(model.text_model.state_dict())
    vision.load_state_dict(model.vision_model.state_dict())
    inputs = batch()
    with torch.no_grad():
        out = model(**inputs)
        text_alone = text(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        vision_alone = vision(pixel_values=inputs["pixel_values"])
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(out.text_model_output.last_hidden_state[real], text_alone.last_hidden_state[real], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.vision_model_output.last_hidden_state, vision_alone.last_hidden_state, atol=1e-6, rtol=0)
    # causal text: a later token changes nothing before it
    changed = {**inputs, "input_ids": inputs["input_ids"].clone()}
    changed["input_ids"][0, -1] = 1
    with torch.no_grad():
        again = model(**changed).text_model_output.last_hidden_state
    torch.testing.assert_close(again[0, :-1], out.text_model_output.last_hidden_state[0, :-1], atol=1e-6, rtol=0)


def test_tables_and_groups_follow_each_towers_heads():
    """Per-head tables, routers and K/V groups take the head count of their own tower."""
    model = converted(("t5_bias", {}), ("gqa", {"num_key_value_heads": 2}))
    layers = [layer.self_attn for layer in model.text_model.encoder.layers] + \
             [layer.self_attn for layer in model.vision_model.encoder.layers]
    assert [attn.relattn_t5_bias.weight.shape[1] for attn in layers] == [2, 2, 4, 4]
    assert [attn.k_proj.out_features for attn in layers] == [32, 32, 24, 24]  # 2 K/V heads of 16 (text), of 12 (vision)
    with pytest.raises(ValueError, match="num_key_value_heads=4 does not divide the 2 attention heads"):
        hf_relattn.convert(tiny_clip(), "gqa", num_key_value_heads=4)


def test_save_pretrained_and_auto_reload_give_the_same_model(tmp_path):
    """An adapted CLIPModel reloads with AutoModel as it runs: both towers' sub-configs ask for the
    engine (with none requested they would pick sdpa and silently drop the variants)."""
    model = converted(*CONVERSIONS["alibi_gqa"], ("shaw", {"max_distance": 2, "layers": [0, 3]}))
    inputs = batch()
    expected = run(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert {loaded.text_model.config._attn_implementation, loaded.vision_model.config._attn_implementation} == {"relattn"}
    torch.testing.assert_close(run(loaded, inputs), expected, atol=0, rtol=0)


def test_identity_conversion_reproduces_the_original():
    """Zero-initialised tables and neutral sink logits change nothing: the untrained conversion is
    the original CLIPModel (to 1e-5)."""
    inputs = batch()
    expected = run(tiny_clip(), inputs)
    model = tiny_clip()
    hf_relattn.convert(model, "shaw", max_distance=2)
    hf_relattn.convert(model, "t5_bias")
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-5, rtol=0)


def test_flag_options_reach_both_towers():
    """A flag with options on CLIPModel runs them in both towers (each tower's attention reads
    its own sub-config): the same as converting with those options."""
    options = {"window": 2, "block_size": 3, "sinks": 1}
    inputs = batch()
    flagged = tiny_clip()
    flagged.config.relattn = dict(options)
    flagged.set_attn_implementation("relattn_sliding_window")
    convert = tiny_clip()
    hf_relattn.convert(convert, "sliding_window", **options)
    torch.testing.assert_close(run(flagged, inputs), run(convert, inputs), atol=1e-6, rtol=0)
    assert (run(flagged, inputs) - run(tiny_clip(), inputs)).abs().max() > 1e-3


@pytest.mark.parametrize("variant, options", [("moba", {"block_size": 2, "top_k": 2}), ("mosa", {"sparsity": 3})])
def test_causal_only_variants_are_refused_on_the_vision_layers(variant, options):
    """moba and mosa check every layer they are given (the first one alone is a text layer)."""
    model = tiny_clip()
    for layers in (None, VISION_LAYERS, [1, 2]):
        with pytest.raises(ValueError, match=r"causal decoder.*\[2"):
            hf_relattn.convert(model, variant, layers=layers, **options)
    assert not hf_relattn.is_adapted(model)


def test_relation_is_refused():
    with pytest.raises(ValueError, match="relation: not for clip: CLIPModel passes"):
        hf_relattn.convert(tiny_clip(), "relation", num_relations=3, layers=TEXT_LAYERS)
