"""T5 relative position bias (Raffel et al. 2020) against transformers' own T5 bucketing and a
materialised attention written here."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.t5.modeling_t5 import T5Attention

import hf_relattn
from hf_relattn.variants.t5_bias import relative_position_bucket

from conftest import assert_same_state, state_copy, tiny_bert, tiny_llama, tiny_vit
from reference import run_with_attention

REF = "t5_reference_for_tests"


def t5_reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """softmax(q k^T * scale + table[bucket(j - i)] + mask) v, buckets from transformers' T5."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1).double(), value.repeat_interleave(groups, 1).double()
    q_len, k_len = query.shape[2], key.shape[2]
    i = torch.arange(k_len - q_len, k_len)[:, None]
    j = torch.arange(k_len)[None, :]
    spec = next((v for v in getattr(module, "relattn_variants", ()) if v.name == "t5_bias"), None)
    bias = torch.zeros(())  # an unconverted layer: plain attention
    if spec is not None:
        buckets = T5Attention._relative_position_bucket(j - i, bidirectional=not module.is_causal,
                                                        num_buckets=spec.num_buckets, max_distance=spec.max_distance)
        bias = module.relattn_t5_bias.weight.double()[buckets].permute(2, 0, 1)  # (H, Q, K)
    scores = query.double() @ key.transpose(-1, -2) * scaling + bias
    allowed = torch.ones(q_len, k_len, dtype=torch.bool) if not module.is_causal else (j <= i)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float64).min)
    out = torch.softmax(scores, -1) @ value
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(REF, t5_reference_attention)
AttentionMaskInterface.register(REF, sdpa_mask)


def with_random_tables(model, seed=3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "relattn_t5_bias" in name:
                param.normal_(0.0, 1.0)
    return model


def run_reference(model, **inputs):
    """The same model and weights, attention computed by the reference function above."""
    return run_with_attention(model, REF, **inputs)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 20), (6, 7)])
def test_buckets_match_transformers_t5(bidirectional, num_buckets, max_distance):
    rel = torch.arange(-400, 401)[None, :] - torch.zeros(1, 1, dtype=torch.long)
    expected = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    assert torch.equal(relative_position_bucket(rel, bidirectional, num_buckets, max_distance), expected)


@pytest.mark.parametrize("family", ["llama", "bert", "vit"])
def test_zero_initialised_tables_leave_outputs_unchanged(family, ids, pixels):
    model = {"llama": tiny_llama, "bert": tiny_bert, "vit": tiny_vit}[family]()
    inputs = {"pixel_values": pixels} if family == "vit" else {"input_ids": ids}
    with torch.no_grad():
        before = model(**inputs).logits
        hf_relattn.convert(model, "t5_bias")
        torch.testing.assert_close(model(**inputs).logits, before, atol=1e-6, rtol=0)


def test_llama_matches_reference_with_padding_and_gqa(ids):
    model = with_random_tables(hf_relattn.convert(hf_relattn.convert(tiny_llama(), "gqa", num_key_value_heads=2), "t5_bias", num_buckets=8, max_distance=16))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    expected = run_reference(model, input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1, 3:], expected[1, 3:], atol=1e-4, rtol=0)
    with hf_relattn.force_implementation("reference"), torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[0], expected[0], atol=1e-4, rtol=0)


def test_bert_bidirectional_matches_reference(ids):
    model = with_random_tables(hf_relattn.convert(tiny_bert(), "t5_bias", layers=[1]))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    with torch.no_grad():  # last hidden states: the tiny classifier's logits are too small to tell
        got = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    expected = run_reference(model, input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got[0, :7], expected[0, :7], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1], expected[1], atol=1e-4, rtol=0)


def test_kv_cache_decoding_equals_full_forward(ids):
    model = with_random_tables(hf_relattn.convert(tiny_llama(), "t5_bias", num_buckets=8, max_distance=12))
    with torch.no_grad():
        full = model(ids[:1]).logits
        out = model(ids[:1, :4], use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(4, ids.shape[1]):
            out = model(ids[:1, t : t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 3:], atol=1e-4, rtol=0)


def test_gradients_reach_the_tables(ids):
    model = hf_relattn.convert(tiny_llama(), "t5_bias").train()
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "relattn_t5_bias" in n]
    assert len(grads) == 2 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_save_load_round_trip(tmp_path, ids):
    model = with_random_tables(hf_relattn.convert(tiny_bert(), "t5_bias", num_buckets=16, max_distance=40))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert_same_state(state_copy(model), loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    llama = with_random_tables(hf_relattn.convert(tiny_llama(), "t5_bias"))
    llama.save_pretrained(tmp_path / "llama")
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "llama")(ids).logits, llama(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("options, message", [
    ({"num_buckets": 0}, "num_buckets must be an integer in [1,"),
    ({"num_buckets": 3}, "at least 4"),
    ({"num_buckets": 32, "max_distance": 16}, "must exceed num_buckets // 2"),
    ({"buckets": 32}, "Unknown option(s) ['buckets']"),
])
def test_bad_options_leave_the_model_unchanged(options, message):
    model = tiny_llama()
    before = state_copy(model)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        hf_relattn.convert(model, "t5_bias", **options)
    assert_same_state(before, model)
    assert type(model).__name__ == "LlamaForCausalLM"
