"""MoSA (Piękos et al. 2025) against a naive expert-choice attention written here, and its
causal generation rule."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_same_state, state_copy, tiny_bert, tiny_llama
from reference import run_with_attention
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import hf_relattn

REF = "mosa_reference_for_tests"
INPUTS: dict[int, torch.Tensor] = {}


def naive_mosa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Per batch entry and head, with loops: router scores sigmoid(x W_r); the head keeps its
    k = max(2, n // sparsity) highest-scoring of the sample's n non-padding tokens (float64 scores here, float32
    in the model: the test spreads the router weights so no near-tie can flip), attends among them causally
    by position, scales by the score and leaves every other position at zero."""
    variant = next(v for v in module.relattn_variants if v.name == "mosa")
    x = INPUTS[id(module)].double()
    logits = x @ module.relattn_mosa.weight.double().t()  # (B, T, H)
    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    valid = attention_mask.any(-2)[:, 0] if attention_mask is not None else torch.ones(batch, length, dtype=torch.bool)
    out = torch.zeros(batch, heads, length, value.shape[-1], dtype=torch.float64)
    for b in range(batch):
        n = int(valid[b].sum())  # the sample's own tokens: it chooses as it would alone
        k = min(max(2, n // variant.sparsity), n)
        for h in range(heads):
            # ties (repeated tokens score alike) go to the earlier position
            ranked = sorted(range(length), key=lambda t: (bool(valid[b, t]), float(logits[b, t, h]), -t), reverse=True)
            chosen = sorted(ranked[:k])
            for i in chosen:
                keys = [j for j in chosen if j <= i and valid[b, j]]
                if not keys:
                    continue
                s = torch.stack([query[b, h, i].double() @ key[b, h // groups, j].double() for j in keys]) * scaling
                p = torch.softmax(s, 0)
                z = sum(p[n] * value[b, h // groups, j].double() for n, j in enumerate(keys))
                out[b, h, i] = z * torch.sigmoid(logits[b, i, h])
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(REF, naive_mosa)
AttentionMaskInterface.register(REF, sdpa_mask)


def mosa_model(layers=2, sparsity=4, kv_heads=2):
    model = hf_relattn.convert(hf_relattn.convert(tiny_llama(layers=layers), "gqa", num_key_value_heads=kv_heads), "mosa", sparsity=sparsity)
    with torch.no_grad():  # spread the router scores: no near-ties for float rounding to flip
        for name, param in model.named_parameters():
            if "relattn_mosa" in name:
                param.mul_(30)
    for module in [layer.self_attn for layer in model.model.layers]:
        module.register_forward_pre_hook(
            lambda mod, args, kwargs: INPUTS.__setitem__(id(mod), args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    return model


@pytest.mark.parametrize("sparsity", [4, 7])
def test_full_forward_matches_naive_mosa(sparsity):
    torch.manual_seed(2)
    ids = torch.randint(3, 97, (2, 23))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    model = mosa_model(sparsity=sparsity)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    expected = run_with_attention(model, REF, input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got[0], expected[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, 4:], expected[1, 4:], atol=2e-5, rtol=1e-5)


def test_generation_never_looks_ahead():
    """Each decoding step equals a full forward of the prefix (one layer: earlier tokens' states
    are then the same in both), so no later token can change an earlier step's output."""
    torch.manual_seed(3)
    ids = torch.randint(3, 97, (1, 30))
    model = mosa_model(layers=1, sparsity=3)
    with torch.no_grad():
        out = model(ids[:, :12], use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(12, 30):
            out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits[:, -1])
        prefixes = [model(ids[:, : t + 1]).logits[:, -1] for t in range(11, 30)]
    torch.testing.assert_close(torch.stack(steps), torch.stack(prefixes), atol=1e-5, rtol=1e-5)
    generated = model.generate(ids[:, :12], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 17)
    # decoding twice from copies of one prefill cache (as a benchmark does) repeats the same steps
    with torch.no_grad():
        prefill = model(ids[:, :12], use_cache=True).cache
        runs = []
        for _ in range(2):
            cache = copy.deepcopy(prefill)
            for t in range(12, 15):
                out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
                cache = out.cache
            runs.append(out.logits)
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)
    torch.testing.assert_close(runs[1][:, -1], prefixes[14 - 11], atol=1e-5, rtol=1e-5)


def test_router_trains_and_round_trips(tmp_path):
    torch.manual_seed(4)
    ids = torch.randint(3, 97, (2, 19))
    model = mosa_model().train()
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "relattn_mosa" in n]
    assert len(grads) == 2 and all(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval().save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_same_state(state_copy(model), loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_bad_uses():
    model = tiny_llama()
    before = state_copy(model)
    with pytest.raises(ValueError, match=r"sparsity must be an integer in \[1,"):
        hf_relattn.convert(model, "mosa", sparsity=0)
    assert_same_state(before, model)
    with pytest.raises(ValueError, match="mosa routes tokens of a causal decoder"):
        hf_relattn.convert(tiny_bert(), "mosa")
    model = hf_relattn.convert(tiny_llama(), "mosa")
    with torch.no_grad():
        cache = tiny_llama()(torch.randint(3, 97, (1, 8)), use_cache=True).cache
        with pytest.raises(ValueError, match="needs the router scores of the cached tokens"):
            model(torch.randint(3, 97, (1, 1)), cache=cache, use_cache=True)
