"""Surgery on fused q/k/v projections (Phi-3 `qkv_proj`, GPT-NeoX `query_key_value`, GPT-2's
Conv1D `c_attn`, ModernBERT's `Wqkv`): split, changed, re-fused in the family's own row order.

References written here from the families' layouts, not from the plugin: which rows of the fused
matrix are head h's query, key and value; the unpruned model with the pruned heads' outputs
zeroed (Michel et al. 2019: a pruned model equals it); and a native Phi-3 with fewer K/V heads
whose fused matrix is built by hand from the mean of each group's K/V rows (Ainslie et al. 2023).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_gpt2, tiny_gpt_neox, tiny_modernbert, tiny_phi3
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hf_relattn

D = 16  # head size of the tiny decoders (64 hidden, 4 heads)
HEAD_DIM = {"gpt2": 16, "gpt_neox": 16, "modernbert": 8}  # tiny ModernBERT: 32 hidden, 4 heads
IDS = torch.randint(1, 97, (2, 13), generator=torch.Generator().manual_seed(5))
MASK = torch.ones(2, 13, dtype=torch.long)
MASK[1, :4] = 0  # left padding


def head_rows(family: str, part: int, head: int, heads: int = 4) -> slice:
    """Rows (output features) of head `head`'s query (0), key (1) or value (2) in the fused matrix."""
    d = HEAD_DIM[family]
    if family == "gpt_neox":  # per head: q, k, v side by side
        start = head * 3 * d + part * d
    else:  # GPT-2's Q | K | V columns, ModernBERT's Wqkv viewed as (3, heads, d): equal thirds
        start = part * heads * d + head * d
    return slice(start, start + d)


def fused_weight(family: str, attn: torch.nn.Module) -> torch.Tensor:
    """(out, in) weight of the fused projection (GPT-2's Conv1D stores (in, out))."""
    return {"gpt2": lambda: attn.c_attn.weight.T, "gpt_neox": lambda: attn.query_key_value.weight,
            "modernbert": lambda: attn.Wqkv.weight}[family]()


def attention(family: str, model: torch.nn.Module, layer: int) -> torch.nn.Module:
    return {"gpt2": lambda: model.transformer.h[layer].attn, "gpt_neox": lambda: model.gpt_neox.layers[layer].attention,
            "modernbert": lambda: model.model.layers[layer].attn}[family]()


def output_projection(family: str, model: torch.nn.Module, layer: int) -> torch.nn.Module:
    attn = attention(family, model, layer)
    return getattr(attn, {"gpt2": "c_proj", "gpt_neox": "dense", "modernbert": "Wo"}[family])


def logits(model: torch.nn.Module) -> torch.Tensor:
    """The last hidden states of the real tokens (a classifier's logits alone say little)."""
    with torch.no_grad():
        return model(IDS, attention_mask=MASK, output_hidden_states=True).hidden_states[-1][MASK.bool()]


@pytest.mark.parametrize("family, build", [("gpt2", tiny_gpt2), ("gpt_neox", tiny_gpt_neox), ("modernbert", tiny_modernbert)])
def test_prune_fused_heads_equals_zeroed_heads(family, build, tmp_path):
    src = build()
    d, hidden = HEAD_DIM[family], src.config.hidden_size
    heads = {0: [1], 1: [0, 3]}
    pruned = hf_relattn.convert(copy.deepcopy(src), "prune", heads=heads)
    for layer, removed in heads.items():
        kept = [h for h in range(4) if h not in removed]
        before, after = fused_weight(family, attention(family, src, layer)), fused_weight(family, attention(family, pruned, layer))
        assert after.shape == (3 * len(kept) * d, hidden)
        for part in range(3):  # each kept head's q, k, v rows, at their new place
            for new, old in enumerate(kept):
                torch.testing.assert_close(after[head_rows(family, part, new, len(kept))],
                                           before[head_rows(family, part, old)], atol=0, rtol=0)
        assert type(output_projection(family, pruned, layer)) is type(output_projection(family, src, layer))

    # the unpruned model with the removed heads' outputs zeroed before its output projection
    def zero(module, args, removed):
        x = args[0].clone()
        for h in removed:
            x[..., h * d:(h + 1) * d] = 0
        return (x,)

    handles = [output_projection(family, src, layer).register_forward_pre_hook(
        lambda m, a, removed=removed: zero(m, a, removed)) for layer, removed in heads.items()]
    expected = logits(src)
    for handle in handles:
        handle.remove()
    assert (logits(src) - expected).abs().max() > 1e-3  # the reference differs from the unpruned model
    torch.testing.assert_close(logits(pruned), expected, atol=1e-5, rtol=0)

    # decoding with a cache, and a reload from safetensors, compute the same
    if family != "modernbert":
        with torch.no_grad():
            full = pruned(IDS).logits[:, -1]
            head = pruned(IDS[:, :-1], use_cache=True)
            step = pruned(IDS[:, -1:], cache=head.past_key_values).logits[:, -1]
        torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
    pruned.save_pretrained(tmp_path)
    auto = AutoModelForSequenceClassification if family == "modernbert" else AutoModelForCausalLM
    reloaded = auto.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), logits(pruned), atol=0, rtol=0)


def test_phi3_gqa_merges_the_fused_key_value_rows():
    """GQA (mean init) on Phi-3's fused qkv_proj: a native Phi-3 with 2 K/V heads whose fused
    matrix is [Q; mean of each pair of K heads; mean of each pair of V heads], built here."""
    src = tiny_phi3(kv_heads=None)  # 4 query heads, 4 K/V heads
    converted = hf_relattn.convert(copy.deepcopy(src), "gqa", num_key_value_heads=2, init="mean")
    assert json.loads(converted.config.to_json_string())["num_key_value_heads"] == 2  # a plain native checkpoint
    config = copy.deepcopy(src.config)
    config.num_key_value_heads = 2
    native = AutoModelForCausalLM.from_config(config).eval()
    state = src.state_dict()
    for i in range(2):
        key = f"model.layers.{i}.self_attn.qkv_proj.weight"
        q, k, v = state[key][:64], state[key][64:128], state[key][128:]
        pool = [torch.cat([w.view(4, D, 64)[2 * g:2 * g + 2].mean(0) for g in range(2)]) for w in (k, v)]
        state[key] = torch.cat([q, *pool])
    native.load_state_dict(state)
    torch.testing.assert_close(converted.model.layers[1].self_attn.qkv_proj.weight,
                               native.model.layers[1].self_attn.qkv_proj.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(converted), logits(native), atol=1e-5, rtol=0)


def test_phi3_fitted_gqa_reads_the_fused_parts():
    """The aligned init fits on each part's activations: its Gram matrices of Phi-3's keys,
    values and queries are those of the fused output's rows, cut here by Phi-3's layout."""
    from hf_relattn.patches import get_adapter
    from hf_relattn.variants.gqa import kv_grams

    model = tiny_phi3(kv_heads=2)
    batches = [{"input_ids": IDS, "attention_mask": MASK}]
    grams = kv_grams(model, get_adapter(model), [1], batches)[1]
    seen = []
    handle = model.model.layers[1].self_attn.qkv_proj.register_forward_hook(lambda m, a, out: seen.append(out))
    logits(model)
    handle.remove()
    x = seen[0][MASK.bool()].double()
    for gram, rows in zip(grams, (slice(64, 96), slice(96, 128), slice(0, 64))):  # key, value, query
        torch.testing.assert_close(gram, x[:, rows].T @ x[:, rows])
    aligned = hf_relattn.convert(copy.deepcopy(model), "mqa", batches=batches)
    assert aligned.model.layers[1].self_attn.qkv_proj.out_features == 64 + 2 * D
    assert aligned.model.layers[1].self_attn.num_key_value_heads == 1
