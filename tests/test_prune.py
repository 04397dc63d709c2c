"""Head pruning (Michel et al. 2019): heads physically removed, the other heads unchanged.

The reference is always the UNPRUNED model with the pruned heads' outputs zeroed by a forward
pre-hook written here (the output projection's input columns of those heads set to 0): a
pruned model must give the same logits. Expected shapes (K/V heads after pruning grouped
heads) are worked out by hand in the cases below.
"""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
from conftest import assert_same_state, state_copy, tiny_bert, tiny_llama, tiny_vit
from reference import with_random_biases
from test_shaw import inputs_of
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
)

import hf_relattn

ATOL = 1e-5

HEAD_DIM = {"llama": 16, "bert": 8, "vit": 8}
AUTO = {"llama": AutoModelForCausalLM, "bert": AutoModelForSequenceClassification, "vit": AutoModelForImageClassification}


def layers_of(family, model):
    return {"llama": lambda: model.model.layers, "bert": lambda: model.bert.encoder.layer, "vit": lambda: model.vit.layers}[family]()


def projections(family, model, i):
    """(q, k, v, output projection) of layer i, by the families' own module names."""
    layer = layers_of(family, model)[i]
    if family == "llama":
        a = layer.self_attn
        return a.q_proj, a.k_proj, a.v_proj, a.o_proj
    if family == "bert":
        a = layer.attention
        return a.self.query, a.self.key, a.self.value, a.output.dense
    a = layer.attention
    return a.q_proj, a.k_proj, a.v_proj, a.o_proj


@contextlib.contextmanager
def zeroed_heads(family, model, heads):
    """Zero the listed heads' outputs (the output projection's input columns) of the unpruned model."""
    d = HEAD_DIM[family]
    handles = []
    for layer, removed in heads.items():
        def hook(module, args, removed=removed):
            x = args[0].clone()
            for h in removed:
                x[..., h * d:(h + 1) * d] = 0
            return (x,) + args[1:]

        handles.append(projections(family, model, layer)[3].register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


BUILD = {
    "llama": tiny_llama,
    "bert": lambda **kw: with_random_biases(tiny_bert(**kw)),
    "vit": lambda **kw: with_random_biases(tiny_vit(**kw)),
}

# id: family, builder kwargs, heads to prune, expected (query heads, K/V heads) per layer after
CASES = {
    "llama-mha": ("llama", {"heads": 4}, {0: [1], 1: [0, 3]}, [(3, 3), (2, 2)]),
    # 6 query / 3 K/V (groups {0,1} {2,3} {4,5}). Layer 0 without head 1: runs 1, 2, 2 -> g'=1,
    # K/V heads 0, 1, 1, 2, 2. Layer 1 without heads 2, 3: K/V head 1 unused, runs 2, 2 -> g'=2.
    "llama-gqa6x3-uneven": ("llama", {"heads": 6, "kv_heads": 3}, {0: [1], 1: [2, 3]}, [(5, 5), (4, 2)]),
    # SmolLM2's 9 query / 3 K/V heads. Layer 0 without 0, 3: runs 2, 2, 3 -> g'=1. Layer 1
    # without 0, 3, 6: runs 2, 2, 2 -> g'=2, the 3 K/V heads kept.
    "llama-gqa9x3": ("llama", {"heads": 9, "kv_heads": 3}, {0: [0, 3], 1: [0, 3, 6]}, [(7, 7), (6, 3)]),
    # 8 query / 2 K/V. Layer 0 without 0, 4: runs 3, 3 -> g'=3, 2 K/V heads; layer 1 without 7:
    # runs 4, 3 -> g'=1, 7 K/V heads.
    "llama-gqa8x2": ("llama", {"heads": 8, "kv_heads": 2}, {0: [0, 4], 1: [7]}, [(6, 2), (7, 7)]),
    "bert": ("bert", {}, {0: [1], 1: [0, 2]}, [(3, 3), (2, 2)]),
    "vit": ("vit", {}, {0: [3], 1: [1, 2]}, [(3, 3), (2, 2)]),
}


def expected_params(family, src, after_heads):
    """Parameter count after pruning, from the per-layer (query heads, K/V heads) counts."""
    d, hidden = HEAD_DIM[family], src.config.hidden_size
    total = sum(p.numel() for p in src.parameters())
    for i, (heads, kv) in enumerate(after_heads):
        q, k, _, _ = projections(family, src, i)
        old_heads, old_kv = q.out_features // d, k.out_features // d
        bias = q.bias is not None
        total -= (old_heads - heads) * d * (hidden + bias)  # query rows
        total -= (old_heads - heads) * d * hidden  # output columns (its bias stays)
        total -= 2 * (old_kv - kv) * d * (hidden + bias)  # key and value rows
    return total


@pytest.mark.parametrize("case", list(CASES))
def test_pruned_equals_zeroed_heads(case, ids, pixels):
    family, kwargs, heads, after = CASES[case]
    src = BUILD[family](**kwargs)
    pruned = hf_relattn.convert(copy.deepcopy(src), "prune", heads=heads)
    assert hf_relattn.is_adapted(pruned)
    assert pruned.config.relattn["variants"] == [{"name": "prune", "options": {"heads": heads}, "layers": [0, 1]}]
    assert pruned.config.num_attention_heads == src.config.num_attention_heads  # config keeps the original

    d = HEAD_DIM[family]
    for i, (num_heads, num_kv) in enumerate(after):
        q, k, v, o = projections(family, pruned, i)
        assert q.out_features == o.in_features == num_heads * d
        assert k.out_features == v.out_features == num_kv * d
        if q.bias is not None:
            assert q.bias.shape == (num_heads * d,) and k.bias.shape == v.bias.shape == (num_kv * d,)
    assert sum(p.numel() for p in pruned.parameters()) == expected_params(family, src, after)

    for padded in (False, True):
        inputs = inputs_of(family, ids, pixels, padded)
        with zeroed_heads(family, src, heads):
            expected = logits(src, inputs)
        got = logits(pruned, inputs)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        # the reference can fail: the unpruned model differs
        assert (logits(src, inputs) - expected).abs().max() > 10 * ATOL


def test_uneven_groups_duplicate_kv_rows():
    src = tiny_llama(heads=6, kv_heads=3)
    pruned = hf_relattn.convert(copy.deepcopy(src), "prune", heads={0: [1]})
    for name in ("k_proj", "v_proj"):
        w = getattr(src.model.layers[0].self_attn, name).weight.detach()
        per_kv = w.reshape(3, 16, -1)
        expected = per_kv[[0, 1, 1, 2, 2]].reshape(-1, w.shape[1])  # query heads 0 | 2 3 | 4 5
        assert torch.equal(getattr(pruned.model.layers[0].self_attn, name).weight.detach(), expected)
    q = src.model.layers[0].self_attn.q_proj.weight.detach()
    keep = torch.cat([q[:16], q[32:]])
    assert torch.equal(pruned.model.layers[0].self_attn.q_proj.weight.detach(), keep)
    o = src.model.layers[0].self_attn.o_proj.weight.detach()
    assert torch.equal(pruned.model.layers[0].self_attn.o_proj.weight.detach(), torch.cat([o[:, :16], o[:, 32:]], dim=1))
    assert pruned.model.layers[0].self_attn.num_key_value_groups == 1
    assert pruned.model.layers[1].self_attn.num_key_value_groups == 2  # untouched


def test_bert_bookkeeping():
    pruned = hf_relattn.convert(tiny_bert(), "prune", heads={1: [0, 2]})
    attn = pruned.bert.encoder.layer[1].attention.self
    assert attn.num_attention_heads == 2 and attn.all_head_size == 16
    assert pruned.bert.encoder.layer[0].attention.self.num_attention_heads == 4


# ---------------------------------------------------------------------------- save/load
@pytest.mark.parametrize("case", ["llama-gqa6x3-uneven", "llama-gqa8x2", "bert", "vit"])
def test_round_trip(case, ids, pixels, tmp_path):
    family, kwargs, heads, after = CASES[case]
    pruned = hf_relattn.convert(BUILD[family](**kwargs), "prune", heads=heads)
    inputs = inputs_of(family, ids, pixels)
    before, state = logits(pruned, inputs), state_copy(pruned)
    pruned.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["relattn"]
    assert saved["variants"][0]["options"] == {"heads": {str(k): v for k, v in heads.items()}}

    loaded = AUTO[family].from_pretrained(tmp_path).eval()
    assert type(loaded) is type(pruned)
    assert_same_state(state, loaded)
    assert loaded.config.relattn["variants"][0]["options"]["heads"] == {str(k): v for k, v in heads.items()}
    torch.testing.assert_close(logits(loaded, inputs), before, atol=0, rtol=0)
    if family == "llama":
        assert [l.self_attn.num_key_value_groups for l in loaded.model.layers] == [h // kv for h, kv in after]


def test_string_layer_keys_as_json_writes_them(ids):
    a = hf_relattn.convert(tiny_llama(heads=6, kv_heads=3), "prune", heads={"0": [1], "1": [2, 3]})
    b = hf_relattn.convert(tiny_llama(heads=6, kv_heads=3), "prune", heads={0: [1], 1: [2, 3]})
    assert a.config.relattn == b.config.relattn
    assert_same_state(state_copy(b), a)
    # JSON text, as the command line passes it (--heads '{"0": [1], "1": [2, 3]}')
    c = hf_relattn.convert(tiny_llama(heads=6, kv_heads=3), "prune", heads='{"0": [1], "1": [2, 3]}')
    assert c.config.relattn == b.config.relattn
    assert_same_state(state_copy(b), c)


# ------------------------------------------------------------------------------ generate
def test_generate_with_kv_cache_matches_no_cache(ids):
    _, kwargs, heads, after = CASES["llama-gqa6x3-uneven"]
    src = tiny_llama(**kwargs)
    pruned = hf_relattn.convert(copy.deepcopy(src), "prune", heads=heads)
    out = pruned.generate(
        ids, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True
    )
    seq = out.sequences
    assert seq.shape == (2, ids.shape[1] + 6)
    # the cache holds each layer's K/V heads after pruning (duplicates included)
    assert [layer.keys.shape[1] for layer in out.cache.layers] == [kv for _, kv in after]

    # no-cache forward of the whole sequence: same step logits, same greedy path
    with torch.no_grad():
        full = pruned(seq, use_cache=False).logits
    start = ids.shape[1] - 1
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits, full[:, start + step], atol=1e-4, rtol=0)
        assert torch.equal(seq[:, start + step + 1], full[:, start + step].argmax(-1))
    # and the unpruned model with the heads zeroed generates the same tokens
    with zeroed_heads("llama", src, heads):
        ref = src.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(seq, ref)


# ---------------------------------------------------------------------- pruning again
def test_second_prune_indexes_current_heads(ids, tmp_path):
    src = tiny_llama(heads=8, kv_heads=2)
    model = hf_relattn.convert(copy.deepcopy(src), "prune", heads={0: [0]})
    # 8/2 without head 0: runs 3, 4 -> g'=1, 7 K/V heads (duplicated)
    assert model.model.layers[0].self_attn.k_proj.out_features == 7 * 16
    # current head 3 is original head 4; the duplicated K/V heads now count as distinct
    model = hf_relattn.convert(model, "prune", heads={0: [3]})
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 6 * 16 and attn.k_proj.out_features == 6 * 16
    assert model.config.relattn["variants"] == [{"name": "prune", "options": {"heads": [{0: [0]}, {0: [3]}]}, "layers": [0, 1]}]

    inputs = inputs_of("llama", ids, None)
    with zeroed_heads("llama", src, {0: [0, 4]}):
        expected = logits(src, inputs)
    torch.testing.assert_close(logits(model, inputs), expected, atol=ATOL, rtol=0)

    # pruning original heads 0 and 4 at once gives the same outputs with fewer K/V heads
    once = hf_relattn.convert(copy.deepcopy(src), "prune", heads={0: [0, 4]})
    assert once.model.layers[0].self_attn.k_proj.out_features == 2 * 16
    torch.testing.assert_close(logits(once, inputs), expected, atol=ATOL, rtol=0)

    # the recorded steps rebuild the shapes
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_same_state(state_copy(model), loaded)
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=0, rtol=0)

    # a step list is accepted directly and means the same
    direct = hf_relattn.convert(copy.deepcopy(src), "prune", heads=[{0: [0]}, {0: [3]}])
    assert_same_state(state_copy(model), direct)


def test_partial_layers_then_again_and_reload(ids, tmp_path):
    src = tiny_bert()
    model = hf_relattn.convert(copy.deepcopy(src), "prune", heads={1: [0]}, layers=[1])
    assert model.config.relattn["variants"][0]["layers"] == [1]
    # second conversion on every layer: layer 1's earlier step is carried into the new entry
    model = hf_relattn.convert(model, "prune", heads={0: [2], 1: [1]})
    assert [l.attention.self.query.out_features // 8 for l in model.bert.encoder.layer] == [3, 2]
    assert len(model.config.relattn["variants"]) == 1

    inputs = inputs_of("bert", ids, None)
    with zeroed_heads("bert", src, {0: [2], 1: [0, 2]}):  # current head 1 of layer 1 was head 2
        expected = logits(src, inputs)
    torch.testing.assert_close(logits(model, inputs), expected, atol=ATOL, rtol=0)

    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert_same_state(state_copy(model), loaded)
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=0, rtol=0)


def test_prune_after_partial_gqa(ids, tmp_path):
    src = tiny_llama()
    grouped = hf_relattn.convert(copy.deepcopy(src), "gqa", num_key_value_heads=2, layers=[0])
    # layer 0: 4 query / 2 K/V heads; without head 1 the runs are 1, 2 -> g'=1, 3 K/V heads
    pruned = hf_relattn.convert(copy.deepcopy(grouped), "prune", heads={0: [1], 1: [3]})
    assert pruned.model.layers[0].self_attn.k_proj.out_features == 3 * 16
    inputs = inputs_of("llama", ids, None)
    with zeroed_heads("llama", grouped, {0: [1], 1: [3]}):
        expected = logits(grouped, inputs)
    torch.testing.assert_close(logits(pruned, inputs), expected, atol=ATOL, rtol=0)
    pruned.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(loaded, inputs), logits(pruned, inputs), atol=0, rtol=0)


def test_pruned_model_trains(ids):
    model = hf_relattn.convert(tiny_llama(heads=6, kv_heads=3), "prune", heads={0: [1]}).train()
    model(ids, labels=ids).loss.backward()
    attn = model.model.layers[0].self_attn
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
        assert lin.weight.grad is not None and lin.weight.grad.shape == lin.weight.shape
        assert lin.weight.grad.abs().sum() > 0


# -------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "heads is required"),
        ({"heads": {5: [0]}}, "unknown layer 5: the model has 2 layers"),
        ({"heads": {0: [4]}}, "head index 4 out of range for layer 0, which has 4 heads: valid 0..3"),
        ({"heads": {0: [-1]}}, "head index -1 out of range"),
        ({"heads": {0: [1, 2, 1]}}, r"lists head\(s\) \[1\] more than once"),
        ({"heads": {0: [0, 1, 2, 3]}}, "would remove all 4 heads of layer 0"),
        ({"heads": {0: [1.0]}}, "head indices must be integers"),
        ({"heads": {0: [True]}}, "head indices must be integers"),
        ({"heads": {0: 1}}, "must be a list of head indices"),
        ({"heads": {"first": [1]}}, "layer keys of heads must be non-negative integers"),
        ({"heads": {0: [1], "0": [2]}}, "layer 0 appears twice"),
        ({"heads": {0: []}}, "names no head to remove"),
        ({"heads": [0, 1]}, "heads must be a mapping"),
        ({"heads": "0: [1]"}, "heads given as text must be JSON"),
        ({"heads": {1: [0]}, "layers": [0]}, "not among the converted layers"),
        # the second step indexes the layer as left by the first (3 heads)
        ({"heads": [{0: [1]}, {0: [3]}]}, r"head index 3 out of range for layer 0, which has 3 heads \(after earlier"),
        ({"heads": {0: [1]}, "head": 2}, "Unknown option"),
    ],
)
def test_invalid_options_leave_model_untouched(options, message):
    model = tiny_llama()
    before = state_copy(model)
    with pytest.raises(ValueError, match=message):
        hf_relattn.convert(model, "prune", **options)
    assert_same_state(before, model)
    assert not hf_relattn.is_adapted(model)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_error_after_earlier_pruning_names_current_count():
    model = hf_relattn.convert(tiny_bert(), "prune", heads={0: [0]})
    before, spec = state_copy(model), copy.deepcopy(model.config.relattn)
    with pytest.raises(ValueError, match=r"out of range for layer 0, which has 3 heads \(after earlier pruning"):
        hf_relattn.convert(model, "prune", heads={0: [3]})
    with pytest.raises(ValueError, match="would remove all 3 heads"):
        hf_relattn.convert(model, "prune", heads={0: [0, 1, 2]})
    assert_same_state(before, model)
    assert model.config.relattn == spec


def test_refuses_layers_with_per_head_variants():
    model = hf_relattn.convert(tiny_llama(), "alibi", layers=[1])
    before = state_copy(model)
    with pytest.raises(ValueError, match=r"layer 1 already has variant\(s\) \['alibi'\]"):
        hf_relattn.convert(model, "prune", heads={1: [0]})
    assert_same_state(before, model)

    flagged = tiny_llama()
    flagged.set_attn_implementation("relattn_alibi")
    before = state_copy(flagged)
    with pytest.raises(ValueError, match="flag variant 'alibi'"):
        hf_relattn.convert(flagged, "prune", heads={0: [0]})
    assert_same_state(before, flagged)
    assert not hf_relattn.is_adapted(flagged)


@pytest.mark.parametrize("name, options", [("gqa", {"num_key_value_heads": 1}), ("t5_bias", {}), ("alibi", {})])
def test_per_head_variants_after_pruning_are_refused(name, options):
    model = hf_relattn.convert(tiny_llama(heads=6, kv_heads=3), "prune", heads={0: [1]})
    before = state_copy(model)
    with pytest.raises(ValueError, match=f"{name}: layer 0 has 5 of the model's 6 heads after pruning; apply {name} before pruning"):
        hf_relattn.convert(model, name, **options)
    assert_same_state(before, model)


def test_moh_after_pruning_uses_each_layers_heads():
    """MoH sizes its routing by each layer's own heads: with every head active it is the pruned
    model; with fewer, layer 0 (5 heads) routes 5 and layer 1 (6 heads) routes 6."""
    pruned = hf_relattn.convert(tiny_llama(heads=6, kv_heads=3), "prune", heads={0: [1]})
    ids = torch.randint(3, 90, (1, 9))
    with torch.no_grad():
        expected = pruned(ids).logits
    model = hf_relattn.convert(copy.deepcopy(pruned), "moh", router="query_norm", active_heads=1.0, shared_heads=1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-6, rtol=1e-6)
    model = hf_relattn.convert(copy.deepcopy(pruned), "moh", router="query_norm", active_heads=0.5, shared_heads=1)
    seen = []
    for layer in model.model.layers:
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].view(1, 9, -1, 16).abs().sum(-1) > 0))
    with torch.no_grad():
        model(ids)
    assert [s.shape[-1] for s in seen] == [5, 6]
    assert [int(s.sum(-1).max()) for s in seen] == [3, 3]  # 0.5 * 5 = 2.5 -> 3 (nearest, half up); 0.5 * 6 = 3
