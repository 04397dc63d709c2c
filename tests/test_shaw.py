"""Shaw et al. 2018 relative position representations on LLaMA, BERT and ViT, against the
paper's equations 3-4 materialised with gathered (T, T, d) tensors (tests/reference.py)."""

from __future__ import annotations

import re
import pytest
import torch
from conftest import assert_same_state, state_copy, tiny_bert, tiny_llama, tiny_vision, tiny_vit
from reference import (
    clipped_relative_labels,
    prefix_of,
    relation_aware_attention,
    run_with_attention,
    vit_grid_labels,
)
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.t5.modeling_t5 import T5Attention

import hf_relattn

REF = "relational_reference_for_tests"
FAMILIES = {"llama": tiny_llama, "bert": tiny_bert, "vit": tiny_vit}


def relational_reference(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Eqs. 3-4 of Shaw et al. with the labels written in tests/reference.py and the module's tables
    (the terms of `shaw` and `relation` summed when both are attached, plus a T5 bias)."""
    q_len, k_len = query.shape[2], key.shape[2]
    names = {v.name: v for v in getattr(module, "relattn_variants", ())}
    terms = []
    if "shaw" in names:
        k = names["shaw"].max_distance
        if hasattr(module.config, "patch_size"):
            prefix = prefix_of(module.config)
            labels = vit_grid_labels(k_len, module.config.image_size // module.config.patch_size, k, prefix)[None]
        else:
            labels = clipped_relative_labels(q_len, k_len, k)[None]
        terms.append((labels, module.relattn_shaw.key, module.relattn_shaw.value))
    if "relation" in names:
        ids = kwargs["relation_ids"]
        tables = module.relattn_relation

        def with_label_zero(t):  # label 0 ("no relation") has no stored row: it adds nothing
            return None if t is None else torch.cat([torch.zeros_like(t[..., :1, :]), t], dim=-2)

        terms.append((ids[:, k_len - q_len : k_len, :k_len], with_label_zero(tables.key), with_label_zero(tables.value)))
    bias = None
    if "t5_bias" in names:  # T5 buckets from transformers' own T5 code
        spec = names["t5_bias"]
        buckets = T5Attention._relative_position_bucket(
            torch.arange(k_len)[None, :] - torch.arange(k_len - q_len, k_len)[:, None],
            bidirectional=not module.is_causal, num_buckets=spec.num_buckets, max_distance=spec.max_distance)
        bias = module.relattn_t5_bias.weight[buckets].permute(2, 0, 1)
    out = relation_aware_attention(query, key, value, scaling, terms, causal=module.is_causal, allowed=attention_mask, bias=bias)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(REF, relational_reference)
AttentionMaskInterface.register(REF, sdpa_mask)


def randomize(model, prefix="relattn_", seed=3, std=0.5):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if prefix in name:
                param.normal_(0.0, std)
    return model


def inputs_of(family, ids, pixels, padded=True):
    if family == "vit":
        return {"pixel_values": pixels}
    mask = torch.ones_like(ids)
    if padded:
        if family == "llama":
            mask[1, :3] = 0  # left padding
        else:
            mask[0, 7:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask}


def valid_rows(family, out):
    """Outputs at real (non-padding) query positions, where the result is defined."""
    if family == "llama":
        return [out[0], out[1, 3:]]
    if family == "bert":
        return [out[0, :7], out[1]]
    return [out]


@pytest.mark.parametrize("family", ["llama", "bert", "vit"])
def test_zero_initialised_tables_leave_outputs_unchanged(family, ids, pixels):
    model = FAMILIES[family]()
    inputs = inputs_of(family, ids, pixels)
    with torch.no_grad():
        before = model(**inputs).logits
        hf_relattn.convert(model, "shaw")
        after = model(**inputs).logits
    for a, b in zip(valid_rows(family, after), valid_rows(family, before)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llama", "bert", "vit"])
@pytest.mark.parametrize("values", [True, False], ids=["keys+values", "keys"])
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per-head"])
def test_matches_paper_equations(family, values, per_head, ids, pixels, chunking):
    model = FAMILIES[family]()
    if family == "llama":
        hf_relattn.convert(model, "gqa", num_key_value_heads=2)
    hf_relattn.convert(model, "shaw", max_distance=3 if family != "vit" else 1, values=values, per_head=per_head)
    randomize(model)
    inputs = inputs_of(family, ids, pixels)
    with torch.no_grad():
        got = model(**inputs, output_hidden_states=True)
    got = got.logits if family == "llama" else got.hidden_states[-1]
    expected = run_with_attention(model, REF, **inputs)
    for a, b in zip(valid_rows(family, got), valid_rows(family, expected)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    with hf_relattn.force_implementation("reference"), torch.no_grad():
        naive = model(**inputs).logits
    torch.testing.assert_close(naive[0], model(**inputs).logits[0], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family, extra", [("deit", {}), ("dinov2_with_registers", {"num_register_tokens": 3})])
def test_prefix_tokens_get_the_special_labels(family, extra):
    """DeiT's [CLS] and distillation token, DINOv2's [CLS] and registers are all special tokens of
    the 2-D labels (the three extra labels), the patches on the grid after them: eqs. 3-4 with
    labels written in tests/reference.py."""
    model = randomize(hf_relattn.convert(tiny_vision(family, **extra), "shaw", max_distance=1, per_head=True))
    pixels = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = model(pixels, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(got, run_with_attention(model, REF, pixel_values=pixels), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("with_t5", [False, True], ids=["shaw", "shaw+t5_bias"])
def test_gradients_match_the_reference(ids, chunking, with_t5):
    """Gradients of the chunked path's written-out backward equal those of the materialised
    formula (autograd), for every weight; with a T5 bias as well, its table's too."""
    model = hf_relattn.convert(tiny_llama(), "shaw", max_distance=2, per_head=True)
    if with_t5:
        hf_relattn.convert(model, "t5_bias", num_buckets=8, max_distance=12)
    randomize(model).train()
    inputs = inputs_of("llama", ids, None)
    labels = ids.clone()
    labels[1, :4] = -100  # logits at padded positions 0-2 (predicting tokens 1-3) are undefined

    def grads(implementation=None):
        model.zero_grad()
        if implementation:
            model.config._attn_implementation_internal = implementation
        try:
            model(**inputs, labels=labels).loss.backward()
        finally:
            model.config._attn_implementation_internal = "relattn"
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    got, expected = grads(), grads(REF)
    assert got.keys() == expected.keys()
    tables = [n for n in got if "relattn_" in n]
    assert len(tables) == (6 if with_t5 else 4) and all(got[n].abs().sum() > 0 for n in tables)
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("order", ["gqa-first", "shaw-first"])
def test_kv_cache_decoding_equals_full_forward(order, ids):
    model = tiny_llama()
    steps = [("gqa", {"num_key_value_heads": 1}), ("shaw", {"max_distance": 2})]
    for name, options in steps if order == "gqa-first" else steps[::-1]:
        hf_relattn.convert(model, name, **options)
    randomize(model)
    with torch.no_grad():
        full = model(ids[:1]).logits
        out = model(ids[:1, :4], use_cache=True)
        logits = [out.logits[:, -1]]
        for t in range(4, ids.shape[1]):
            out = model(ids[:1, t : t + 1], cache=out.cache, use_cache=True)
            logits.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(logits, 1), full[:, 3:], atol=1e-5, rtol=1e-5)
    generated = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        again = model(generated[:, :-1]).logits[:, 3:].argmax(-1)
    assert torch.equal(again, generated[:, 4:])


def test_composes_with_alibi_flag(ids):
    model = randomize(hf_relattn.convert(tiny_llama(), "shaw", max_distance=3))
    model.config._attn_implementation_internal = "relattn_alibi"
    with torch.no_grad():
        both = model(ids).logits
        with hf_relattn.force_implementation("reference"):
            naive = model(ids).logits
    model.config._attn_implementation_internal = "relattn"
    with torch.no_grad():
        shaw_only = model(ids).logits
    torch.testing.assert_close(both, naive, atol=2e-5, rtol=1e-5)
    assert (both - shaw_only).abs().max() > 1e-3


def test_gradients_reach_the_tables_on_bert(ids):
    model = hf_relattn.convert(tiny_bert(), "shaw", layers=[1]).train()
    model(input_ids=ids, labels=torch.tensor([0, 2])).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "relattn_shaw" in n}
    assert set(grads) == {"bert.encoder.layer.1.attention.self.relattn_shaw.key", "bert.encoder.layer.1.attention.self.relattn_shaw.value"}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_save_load_round_trip(tmp_path, ids, pixels):
    vit = randomize(hf_relattn.convert(tiny_vit(), "shaw", max_distance=2, per_head=True))
    vit.save_pretrained(tmp_path / "vit")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "vit")
    assert_same_state(state_copy(vit), loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, vit(pixels).logits, atol=0, rtol=0)
    llama = randomize(hf_relattn.convert(hf_relattn.convert(tiny_llama(), "shaw", values=False), "gqa", num_key_value_heads=2))
    llama.save_pretrained(tmp_path / "llama")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    assert loaded.model.layers[0].self_attn.relattn_shaw.value is None
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, llama(ids).logits, atol=0, rtol=0)


def test_vit_other_image_size_uses_a_square_grid():
    model = randomize(hf_relattn.convert(tiny_vit(), "shaw", max_distance=2))
    pixels = torch.randn(1, 1, 24, 24)  # 6 x 6 patches instead of 4 x 4
    with torch.no_grad():
        got = model(pixels, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states[-1]
    module = model.vit.layers[0].attention
    labels = vit_grid_labels(37, 6, 2)
    from hf_relattn.variants.shaw import grid_labels

    assert torch.equal(grid_labels(torch.arange(37), torch.arange(37), 1, 6, 2), labels)
    assert module.relattn_shaw.key.shape == (5 * 5 + 3, 8)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("options, message", [
    ({"max_distance": 0}, r"max_distance must be an integer in \[1,"),
    ({"max_distance": 2.5}, r"max_distance must be an integer in \[1,"),
    ({"values": "yes"}, "values must be True or False"),
    ({"per_head": 1}, "per_head must be True or False"),
    ({"distance": 4}, r"Unknown option\(s\) \['distance'\]"),
])
def test_bad_options_leave_the_model_unchanged(options, message):
    model = tiny_bert()
    before = state_copy(model)
    with pytest.raises(ValueError, match=message):
        hf_relattn.convert(model, "shaw", **options)
    assert_same_state(before, model)
    assert type(model).__name__ == "BertForSequenceClassification"
