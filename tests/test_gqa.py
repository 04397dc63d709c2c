"""GQA / MQA uptraining (Ainslie et al. 2023): K/V heads pooled into G groups.

Every expectation is computed here, independently of the library:
- pooled weights by an explicit loop over groups (query head i uses K/V head i // (H/Hkv));
- LLaMA: a native `LlamaForCausalLM(num_key_value_heads=G)` loaded with those weights;
- BERT/ViT: a materialised attention softmax(q k^T / sqrt(d) + mask) v recomputed from the
  hidden states a forward hook captured, and a native multi-head model whose K/V heads are
  the pooled heads repeated per query head (mathematically the same attention).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import state_copy, tiny_bert, tiny_llama, tiny_vit
from reference import (
    attention_modules,
    attention_reference,
    capture,
    expand_heads,
    hidden_of,
    linear,
    materialized_attention,
    merge_heads,
    native_llama_with,
    output_of,
    pool_heads,
    pooled_llama_kv,
    split_heads,
    with_random_biases,
)
from transformers import LlamaForCausalLM

import hf_relattn

ATOL = 1e-5


# ----------------------------------------------------------------------------- helpers
# family -> builder, names of k/v projections, state-dict prefix of layer i
FAMILIES = {
    "llama": (tiny_llama, ("k_proj", "v_proj"), "model.layers.{}.self_attn."),
    "bert": (lambda **kw: with_random_biases(tiny_bert(**kw)), ("key", "value"), "bert.encoder.layer.{}.attention.self."),
    "vit": (lambda **kw: with_random_biases(tiny_vit(**kw)), ("k_proj", "v_proj"), "vit.layers.{}.attention."),
}


def padded_mask(batch=2, length=11, pad=4):
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - pad:] = 0
    return mask


def logits_of(family, model, ids, pixels, mask=None):
    with torch.no_grad():
        if family == "vit":
            return model(pixels).logits
        return model(ids, attention_mask=mask).logits


# ------------------------------------------------------------------------------ LLaMA
@pytest.mark.parametrize(
    "heads,kv_heads,groups",
    [(4, None, 2), (4, None, 1), (6, 3, 1), (6, 3, 2)],
    ids=["mha4-to-2", "mha4-to-1", "gqa6x3-to-1", "gqa6x3-to-2"],
)
def test_llama_mean_pool_equals_native_gqa(heads, kv_heads, groups, ids):
    src = tiny_llama(heads=heads, kv_heads=kv_heads)
    converted = hf_relattn.convert(copy.deepcopy(src), "gqa", num_key_value_heads=groups)

    # stays a plain native checkpoint
    assert type(converted) is LlamaForCausalLM
    assert not hf_relattn.is_adapted(converted)
    assert converted.config.model_type == "llama"
    assert converted.config.num_key_value_heads == groups
    assert converted.model.layers[0].self_attn.k_proj.out_features == groups * 16

    native = native_llama_with(src, groups, pooled_llama_kv(src, groups))
    for key, value in native.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], value, atol=1e-7, rtol=0, msg=key)

    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    for m in (None, mask):
        torch.testing.assert_close(logits_of("llama", converted, ids, None, m), logits_of("llama", native, ids, None, m), atol=ATOL, rtol=0)


def test_llama_gqa_source_to_mqa_is_mean_of_original_kv_heads(ids):
    src = tiny_llama(heads=6, kv_heads=3)
    before = state_copy(src)
    converted = hf_relattn.convert(copy.deepcopy(src), "mqa")
    assert converted.config.num_key_value_heads == 1
    for i in range(2):
        for proj in ("k_proj", "v_proj"):
            key = f"model.layers.{i}.self_attn.{proj}.weight"
            # every original K/V head serves 2 query heads, so the pooled head is their plain mean
            expected = before[key].reshape(3, 16, -1).mean(dim=0)
            torch.testing.assert_close(converted.state_dict()[key], expected, atol=1e-7, rtol=0)


def test_mqa_is_gqa_with_one_group(ids):
    src = tiny_llama()
    a = hf_relattn.convert(copy.deepcopy(src), "mqa")
    b = hf_relattn.convert(copy.deepcopy(src), "gqa", num_key_value_heads=1)
    native = native_llama_with(src, 1, pooled_llama_kv(src, 1))
    assert a.config.num_key_value_heads == b.config.num_key_value_heads == 1
    torch.testing.assert_close(logits_of("llama", a, ids, None), logits_of("llama", native, ids, None), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits_of("llama", b, ids, None), logits_of("llama", native, ids, None), atol=ATOL, rtol=0)


def test_llama_init_first(ids):
    src = tiny_llama()
    converted = hf_relattn.convert(copy.deepcopy(src), "gqa", num_key_value_heads=2, init="first")
    expected = pooled_llama_kv(src, 2, init="first")
    # the first head of group g is query head 2g: rows 32g .. 32g+15 of the original
    w = src.state_dict()["model.layers.0.self_attn.k_proj.weight"]
    torch.testing.assert_close(expected["model.layers.0.self_attn.k_proj.weight"], torch.cat([w[0:16], w[32:48]]), atol=0, rtol=0)
    for key, value in expected.items():
        torch.testing.assert_close(converted.state_dict()[key], value, atol=0, rtol=0, msg=key)
    native = native_llama_with(src, 2, expected)
    torch.testing.assert_close(logits_of("llama", converted, ids, None), logits_of("llama", native, ids, None), atol=ATOL, rtol=0)


def _check_random(weights, pooled, std):
    flat = torch.cat([w.flatten() for w in weights])
    for w, p in zip(weights, pooled):
        assert w.shape == p.shape
        assert not torch.allclose(w, p, atol=1e-3)
    assert abs(flat.mean().item()) < 0.2 * std
    assert flat.std().item() == pytest.approx(std, rel=0.1)


def test_llama_init_random(ids):
    src = tiny_llama()
    converted = hf_relattn.convert(copy.deepcopy(src), "gqa", num_key_value_heads=2, init="random")
    std = src.config.initializer_range
    pooled = pooled_llama_kv(src, 2)
    state = converted.state_dict()
    _check_random([state[k] for k in pooled], list(pooled.values()), std)
    # the fresh weights are what the model really uses: a native GQA model with them agrees
    native = native_llama_with(src, 2, {k: state[k] for k in pooled})
    torch.testing.assert_close(logits_of("llama", converted, ids, None), logits_of("llama", native, ids, None), atol=ATOL, rtol=0)


def test_bert_init_random_has_zero_bias():
    src = with_random_biases(tiny_bert())
    converted = hf_relattn.convert(copy.deepcopy(src), "gqa", num_key_value_heads=2, init="random")
    weights, pooled = [], []
    for layer, orig in zip(converted.bert.encoder.layer, src.bert.encoder.layer):
        for name in ("key", "value"):
            new, old = getattr(layer.attention.self, name), getattr(orig.attention.self, name)
            assert new.out_features == 16
            assert torch.equal(new.bias, torch.zeros(16))
            weights.append(new.weight.detach())
            pooled.append(pool_heads(old.weight.detach(), 4, 2))
    _check_random(weights, pooled, src.config.initializer_range)


# -------------------------------------------------------------------- identity G == H
@pytest.mark.parametrize("family", ["llama", "bert", "vit"])
def test_groups_equal_heads_is_identity(family, ids, pixels):
    build = FAMILIES[family][0]
    src = build()
    mask = None if family == "vit" else padded_mask()
    before = logits_of(family, src, ids, pixels, mask)
    converted = hf_relattn.convert(copy.deepcopy(src), "gqa", num_key_value_heads=4)
    torch.testing.assert_close(logits_of(family, converted, ids, pixels, mask), before, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------- BERT and ViT
@pytest.mark.parametrize("groups", [2, 1])
@pytest.mark.parametrize("family", ["bert", "vit"])
def test_encoder_kv_shrink_and_attention_equals_reference(family, groups, ids, pixels):
    build, (k_name, v_name), prefix = FAMILIES[family]
    src = build()
    heads, head_dim = 4, 8
    orig = state_copy(src)
    converted = hf_relattn.convert(copy.deepcopy(src), "gqa", num_key_value_heads=groups)

    pooled = {}
    for i, attn in enumerate(attention_modules(converted)):
        for name in (k_name, v_name):
            lin = getattr(attn, name)
            assert lin.out_features == groups * head_dim
            assert lin.weight.shape == (groups * head_dim, src.config.hidden_size)
            assert lin.bias.shape == (groups * head_dim,)
            for part in ("weight", "bias"):
                expected = pool_heads(orig[prefix.format(i) + f"{name}.{part}"], heads, groups)
                torch.testing.assert_close(getattr(lin, part).detach(), expected, atol=1e-7, rtol=0)
                pooled[prefix.format(i) + f"{name}.{part}"] = expected

    mask = padded_mask() if family == "bert" else None
    with capture(attention_modules(converted)) as rec:
        logits = logits_of(family, converted, ids, pixels, mask)
    assert len(rec) == 2

    q_name = "query" if family == "bert" else "q_proj"
    for i in range(2):
        p = prefix.format(i)
        h = hidden_of(rec[i]).double()
        q = split_heads(linear(h, orig[p + f"{q_name}.weight"], orig[p + f"{q_name}.bias"]), heads)
        k = split_heads(linear(h, pooled[p + f"{k_name}.weight"], pooled[p + f"{k_name}.bias"]), groups)
        v = split_heads(linear(h, pooled[p + f"{v_name}.weight"], pooled[p + f"{v_name}.bias"]), groups)
        assert k.shape[1] == groups
        ref = merge_heads(materialized_attention(q, k, v, head_dim**-0.5, key_mask=mask))
        if family == "vit":  # ViTAttention includes the output projection
            ref = linear(ref, orig[p + "o_proj.weight"], orig[p + "o_proj.bias"])
        torch.testing.assert_close(output_of(rec[i]).double(), ref, atol=ATOL, rtol=0)

    # whole model: a native multi-head model whose K/V heads repeat the pooled heads
    expanded = copy.deepcopy(src)
    state = state_copy(src)
    for key, value in pooled.items():
        state[key] = expand_heads(value, heads, groups)
    expanded.load_state_dict(state)
    torch.testing.assert_close(logits, logits_of(family, expanded, ids, pixels, mask), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------ cache
@pytest.mark.parametrize("groups", [2, 1])
def test_kv_cache_is_h_over_g_smaller(groups, ids):
    src = tiny_llama()
    converted = hf_relattn.convert(copy.deepcopy(src), "gqa", num_key_value_heads=groups)

    def cache_keys(model):
        out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
        return [layer.keys for layer in out.cache.layers], [layer.values for layer in out.cache.layers]

    base_k, base_v = cache_keys(src)
    conv_k, conv_v = cache_keys(converted)
    assert len(conv_k) == 2
    for bk, bv, ck, cv in zip(base_k, base_v, conv_k, conv_v):
        assert bk.shape == (2, 4, ids.shape[1] + 2, 16)
        assert ck.shape == (2, groups, ids.shape[1] + 2, 16)
        assert cv.shape == ck.shape
        assert bk.numel() == ck.numel() * (4 // groups)
        assert bv.numel() == cv.numel() * (4 // groups)

    # a single forward with use_cache stores the same reduced heads
    with torch.no_grad():
        pkv = converted(ids, use_cache=True).cache
    assert [layer.keys.shape for layer in pkv.layers] == [(2, groups, ids.shape[1], 16)] * 2


# ------------------------------------------------------------------ partial conversion
def llama_attention_reference(record, weights, heads, kv_heads, head_dim=16):
    """LLaMA self-attention recomputed from a hook record: RoPE, causal softmax, o_proj."""
    q, k, v, o = ((weights[f"{name}.weight"], None) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert q[0].shape[0] == heads * head_dim and k[0].shape[0] == v[0].shape[0] == kv_heads * head_dim
    return attention_reference(record, heads, q, k, v, o, causal=True, rotary=True)


@pytest.mark.parametrize("layers,changed", [([0], 0), ([-1], 1)])
def test_llama_partial_conversion(layers, changed, ids):
    src = tiny_llama()
    orig = state_copy(src)
    converted = hf_relattn.convert(copy.deepcopy(src), "gqa", num_key_value_heads=2, layers=layers)
    assert converted.config.num_key_value_heads == 4  # not every layer: config unchanged
    attns = [l.self_attn for l in converted.model.layers]
    for i, attn in enumerate(attns):
        expected = 32 if i == changed else 64
        assert attn.k_proj.out_features == attn.v_proj.out_features == expected
    state = converted.state_dict()
    for key, value in orig.items():
        if f"layers.{changed}.self_attn.k_proj" in key or f"layers.{changed}.self_attn.v_proj" in key:
            torch.testing.assert_close(state[key], pool_heads(value, 4, 2), atol=1e-7, rtol=0)
        else:
            assert torch.equal(state[key], value), key

    with capture(attns) as rec, torch.no_grad():
        converted(ids)
    for i in range(2):
        prefix = f"model.layers.{i}.self_attn."
        weights = {k[len(prefix):]: v for k, v in orig.items() if k.startswith(prefix)}
        kv = 4
        if i == changed:
            kv = 2
            for name in ("k_proj.weight", "v_proj.weight"):
                weights[name] = pool_heads(weights[name], 4, 2)
        ref = llama_attention_reference(rec[i], weights, 4, kv)
        torch.testing.assert_close(output_of(rec[i]).double(), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layers,changed", [([0], 0), ([-1], 1)])
def test_bert_partial_conversion(layers, changed, ids):
    src = with_random_biases(tiny_bert())
    orig = state_copy(src)
    converted = hf_relattn.convert(copy.deepcopy(src), "gqa", num_key_value_heads=1, layers=layers)
    for i, layer in enumerate(converted.bert.encoder.layer):
        attn = layer.attention.self
        expected = 8 if i == changed else 32
        assert attn.key.out_features == attn.value.out_features == expected
        for name in ("key", "value"):
            for part in ("weight", "bias"):
                value = orig[f"bert.encoder.layer.{i}.attention.self.{name}.{part}"]
                if i == changed:
                    value = pool_heads(value, 4, 1)
                torch.testing.assert_close(getattr(getattr(attn, name), part).detach(), value, atol=1e-7, rtol=0)

    mask = padded_mask()
    modules = [l.attention.self for l in converted.bert.encoder.layer]
    with capture(modules) as rec:
        logits_of("bert", converted, ids, None, mask)
    for i, attn in enumerate(modules):
        h = hidden_of(rec[i]).double()
        q, k, v = (split_heads(linear(h, lin.weight, lin.bias), lin.out_features // 8) for lin in (attn.query, attn.key, attn.value))
        assert k.shape[1] == (1 if i == changed else 4)
        ref = merge_heads(materialized_attention(q, k, v, 8**-0.5, key_mask=mask))
        torch.testing.assert_close(output_of(rec[i]).double(), ref, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- gradients
def test_llama_gradients_reach_converted_kv(ids):
    src = tiny_llama()
    converted = hf_relattn.convert(copy.deepcopy(src), "gqa", num_key_value_heads=2).train()
    native = native_llama_with(src, 2, pooled_llama_kv(src, 2)).train()
    converted(ids, labels=ids).loss.backward()
    native(ids, labels=ids).loss.backward()
    for conv_layer, nat_layer in zip(converted.model.layers, native.model.layers):
        for name in ("k_proj", "v_proj"):
            grad = getattr(conv_layer.self_attn, name).weight.grad
            assert grad is not None and grad.shape == (32, 64)
            assert grad.abs().sum() > 0
            torch.testing.assert_close(grad, getattr(nat_layer.self_attn, name).weight.grad, atol=1e-6, rtol=1e-4)


def test_bert_gradients_reach_converted_kv(ids):
    converted = hf_relattn.convert(with_random_biases(tiny_bert()), "gqa", num_key_value_heads=2).train()
    loss = converted(ids, attention_mask=padded_mask(), labels=torch.tensor([0, 2])).loss
    loss.backward()
    for layer in converted.bert.encoder.layer:
        for name in ("key", "value"):
            lin = getattr(layer.attention.self, name)
            assert lin.weight.grad is not None and lin.weight.grad.shape == (16, 32)
            assert lin.weight.grad.abs().sum() > 0
            assert lin.bias.grad is not None and lin.bias.grad.shape == (16,)
    # the value bias always receives gradient (the key bias cancels out in softmax)
    assert converted.bert.encoder.layer[0].attention.self.value.bias.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- bfloat16
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_bfloat16_conversion(family, ids):
    build, (k_name, _), prefix = FAMILIES[family]
    src32 = build()
    src16 = copy.deepcopy(src32).to(torch.bfloat16)
    orig16 = state_copy(src16)
    conv32 = hf_relattn.convert(copy.deepcopy(src32), "gqa", num_key_value_heads=2)
    conv16 = hf_relattn.convert(src16, "gqa", num_key_value_heads=2)

    key = prefix.format(0) + f"{k_name}.weight"
    w16 = conv16.state_dict()[key]
    assert w16.dtype == torch.bfloat16
    # pooled in high precision from the bf16 originals, then rounded once to bf16
    expected = pool_heads(orig16[key].double(), 4, 2).to(torch.bfloat16)
    torch.testing.assert_close(w16.float(), expected.float(), atol=0, rtol=2**-7)

    mask = padded_mask() if family == "bert" else None
    out16 = logits_of(family, conv16, ids, None, mask)
    out32 = logits_of(family, conv32, ids, None, mask)
    assert out16.dtype == torch.bfloat16
    assert torch.isfinite(out16).all()
    scale = out32.abs().max().item()
    assert (out16.float() - out32).abs().max().item() <= 0.02 * scale + 1e-4
