"""Attention sinks (Xiao et al. 2024, StreamingLLM) on every sparse pattern, the learnable sink
logit (GPT-OSS's `sinks`), and the bounded `StreamingCache`.

References: the patterns as loops over (i, j) from the papers' definitions (test_sparse), the
softmax with one extra logit column per head written here, the model without the option, and
generation with the whole dynamic cache. (Each pattern with sinks against its loop mask on
LLaMA with GQA and left padding, BERT with right padding and ViT is in test_sparse's CASES.)
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_same_state, state_copy, tiny_bert, tiny_llama, tiny_vit
from reference import run_with_attention
from test_sparse import allowed_pairs, padded
from transformers import AttentionInterface, AutoModelForCausalLM, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import hf_relattn
from hf_relattn.ops import blocks
from hf_relattn.streaming import StreamingLayer
from hf_relattn.variants.sparse_base import SINK_LOGIT, optimizer_groups

REF = "sink_logit_reference_for_tests"


def sink_logit_reference(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """softmax over [kept scores, the head's sink logit] in float64, the sink column dropped
    before @ v: the logit only adds to each row's denominator."""
    allowed = allowed_pairs(module, query, key, attention_mask)
    heads, groups = query.shape[1], query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, 1).double()
    v = value.repeat_interleave(groups, 1).double()
    scores = query.double() @ k.transpose(-1, -2) * scaling
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float64).min)
    sink = getattr(module, SINK_LOGIT).double()[None, :, None, None].expand(*scores.shape[:3], 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return (probs @ v).to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(REF, sink_logit_reference)
AttentionMaskInterface.register(REF, sdpa_mask)

PATTERNS = [
    ("sliding_window", {"window": 7, "block_size": 4, "sinks": 3}),
    ("strided", {"stride": 4, "block_size": 8, "sinks": 2}),
    ("fixed", {"block": 8, "summary": 2, "sinks": 5}),
    ("power", {"block_size": 4, "window": 6, "sinks": 6}),
    ("moba", {"block_size": 4, "top_k": 2, "sinks": 5}),
    ("moba", {"block_size": 4, "top_k": 2, "sinks": 0, "gate": "block"}),
]
IDS = [f"{n}-{'-'.join(map(str, o.values()))}" for n, o in PATTERNS]


@pytest.fixture
def long_ids():
    torch.manual_seed(2)
    return torch.randint(3, 97, (2, 37))


def with_sink_logits(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(SINK_LOGIT):
                param.copy_(torch.randn(param.shape, generator=gen))  # around the scores: it matters
    return model


@pytest.fixture(params=["gathered", "merged"])
def sink_mode(request, monkeypatch):
    """Inference reads the sinks outside the gathered blocks as a merged piece from
    SINK_MERGE_MIN_TOKENS query tokens on: run with it at 1 as well (every call merges)."""
    if request.param == "merged":
        monkeypatch.setattr(blocks, "SINK_MERGE_MIN_TOKENS", 1)
    return request.param


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("name, options", PATTERNS, ids=IDS)
def test_sink_logit_equals_softmax_with_an_extra_column(name, options, train, sink_mode, long_ids):
    """Every path (the window's slices, the gathered blocks, MoBA's per-token blocks, the
    strided and fixed layouts, the sinks gathered or merged, with autograd) against the
    materialised softmax with one extra logit column per head; LLaMA with GQA and left
    padding; outputs and gradients."""
    model = hf_relattn.convert(tiny_llama(heads=4, kv_heads=2), name, sink_logit=True, **options)
    model = with_sink_logits(model).train(train)
    mask, rows = padded("llama", long_ids)
    labels = long_ids.masked_fill(mask == 0, -100)

    def run(implementation):
        model.zero_grad()
        model.config._attn_implementation_internal = implementation
        try:
            with torch.set_grad_enabled(train):
                out = model(input_ids=long_ids, attention_mask=mask, labels=labels)
            if train:
                out.loss.backward()
        finally:
            model.config._attn_implementation_internal = "relattn"
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (got, got_grads), (want, want_grads) = run("relattn"), run(REF)
    for b, r in rows:
        torch.testing.assert_close(got[b, r], want[b, r], atol=2e-5, rtol=1e-5)
    assert any(SINK_LOGIT in n for n in want_grads) == train
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("family", ["llama", "bert", "vit"])
def test_sink_logit_starts_neutral_and_trains(family, long_ids):
    """A fresh sink logit moves the outputs by less than 1e-5, yet it is finite: one step of
    AdamW with finetune's parameter groups (sink logits with an epsilon below their tiny
    gradient) moves every head's logit by about the learning rate, and nothing else."""
    build = {"llama": tiny_llama, "bert": tiny_bert, "vit": tiny_vit}[family]
    inputs = {"pixel_values": torch.randn(2, 1, 16, 16)} if family == "vit" else {"input_ids": long_ids}
    plain = hf_relattn.convert(build(), "sliding_window", window=3, block_size=2, sinks=2)
    model = hf_relattn.convert(build(), "sliding_window", window=3, block_size=2, sinks=2, sink_logit=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, plain(**inputs).logits, atol=1e-5, rtol=0)
    new = [p for n, p in model.named_parameters() if n.endswith(SINK_LOGIT)]
    assert len(new) == 2 and all(torch.isfinite(p).all() for p in new)
    before = state_copy(model)
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in new))
    optimizer = torch.optim.AdamW(optimizer_groups(model, weight_decay=0.1), lr=1e-2)
    model.train()
    labels = {"labels": long_ids} if family == "llama" else {"labels": torch.tensor([0, 1])}
    model(**inputs, **labels).loss.backward()
    optimizer.step()
    after = model.state_dict()
    for key, value in before.items():
        if key.endswith(SINK_LOGIT):
            assert ((after[key] - value).abs() > 5e-3).all(), key  # Adam's normalised step: ~lr
        else:
            assert torch.equal(after[key], value), key


def test_sink_options_by_flag_and_saved_specs(tmp_path, long_ids):
    """`relattn={"window": W, "sinks": S}` with the flag equals the conversion; a spec saved
    before sinks existed (no `sinks` entry) keeps its meaning, 0 sinks; a flag cannot hold a
    sink logit."""
    tiny_llama().save_pretrained(tmp_path / "native")
    flagged = AutoModelForCausalLM.from_pretrained(tmp_path / "native", attn_implementation="relattn_sliding_window",
                                                   relattn={"window": 5, "block_size": 4, "sinks": 2}).eval()
    converted = hf_relattn.convert(tiny_llama(), "sliding_window", window=5, block_size=4, sinks=2)
    no_sinks = hf_relattn.convert(tiny_llama(), "sliding_window", window=5, block_size=4, sinks=0)
    with torch.no_grad():
        torch.testing.assert_close(flagged(long_ids).logits, converted(long_ids).logits, atol=1e-6, rtol=0)
        assert (converted(long_ids).logits - no_sinks(long_ids).logits).abs().max() > 1e-3  # the sinks act
    no_sinks.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    entry = config["relattn"]["variants"][0]
    del entry["options"]["sinks"], entry["options"]["sink_logit"]  # as written before the option existed
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    old = AutoModelForCausalLM.from_pretrained(tmp_path / "old").eval()
    assert old.model.layers[0].self_attn.relattn_variants[0].sinks == 0
    with torch.no_grad():
        torch.testing.assert_close(old(long_ids).logits, no_sinks(long_ids).logits, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="sink_logit=True adds a learned logit"), torch.no_grad():
        AutoModelForCausalLM.from_pretrained(tmp_path / "native", attn_implementation="relattn_sliding_window",
                                             relattn={"window": 5, "sink_logit": True})(long_ids)


def test_sink_logit_saves_and_reloads(tmp_path, long_ids):
    model = with_sink_logits(hf_relattn.convert(tiny_llama(), "fixed", block=4, summary=1, sinks=2, sink_logit=True))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_same_state(state_copy(model), loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(long_ids).logits, model(long_ids).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name, options, message", [
    ("sliding_window", {"sinks": -1}, "sinks must be an integer"),
    ("moba", {"sinks": 1.5}, "sinks must be an integer"),
    ("power", {"sinks": 10**9}, "sinks must be an integer"),
    ("fixed", {"sink_logit": "yes"}, "sink_logit must be True or False"),
])
def test_bad_sink_options_leave_the_model_unchanged(name, options, message):
    model = tiny_llama()
    before = state_copy(model)
    with pytest.raises(ValueError, match=message):
        hf_relattn.convert(model, name, **options)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert_same_state(before, model)


# ------------------------------------------------------------------------- streaming cache
def greedy(model, ids, mask, new, cache=None):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, **({"cache": cache} if cache is not None else {}))
    return out.sequences, torch.stack(out.scores, 1)


@pytest.mark.parametrize("sink_logit", [False, True])
def test_streaming_cache_generates_what_the_whole_cache_generates(sink_logit):
    """300 greedy tokens with a window of 8 and 2 sinks, left-padded batch: the same tokens and
    logits as with the whole dynamic cache, while each window layer holds at most
    left padding + sinks + window + block_size keys after every step; the layer without the
    window keeps everything."""
    model = hf_relattn.convert(tiny_llama(layers=3), "sliding_window", window=8, block_size=4, sinks=2,
                               sink_logit=sink_logit, layers=[0, 2])
    with_sink_logits(model)
    model.generation_config.eos_token_id = None
    torch.manual_seed(3)
    ids = torch.randint(3, 97, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    held = []
    with torch.no_grad():
        whole, whole_scores = greedy(model, ids, mask, 300)
        for idx in (0, 2):
            model.model.layers[idx].self_attn.register_forward_hook(
                lambda mod, a, k, o: held.append(k["cache"].layers[mod.layer_idx].held()), with_kwargs=True)
        cache = hf_relattn.StreamingCache(model)
        streamed, streamed_scores = greedy(model, ids, mask, 300, cache)
    assert torch.equal(streamed, whole)
    torch.testing.assert_close(streamed_scores, whole_scores, atol=1e-4, rtol=0)
    assert [type(layer) for layer in cache.layers] == [StreamingLayer, type(cache.layers[1]), StreamingLayer]
    assert not isinstance(cache.layers[1], StreamingLayer) and cache.layers[1].get_seq_length() == 24 + 299
    bound = 5 + 2 + 8 + 4  # padding + sinks + window + block_size, after a step's new key
    assert max(held) <= bound and cache.layers[0].held() <= bound
    assert cache.get_seq_length() == 24 + 299  # positions keep counting the evicted keys


def test_streaming_cache_refuses_what_it_cannot_do_exactly(long_ids):
    with pytest.raises(ValueError, match="has none"):
        hf_relattn.StreamingCache(hf_relattn.convert(tiny_llama(), "fixed"))
    model = hf_relattn.convert(tiny_llama(), "sliding_window", window=4, block_size=2, sinks=1)
    cache = hf_relattn.StreamingCache(model)
    with torch.no_grad():
        model(long_ids[:, :20], cache=cache, use_cache=True)  # evicts after the prefill
        assert cache.layers[0].dropped > 0
        with pytest.raises(ValueError, match="decode one token per call"):
            model(long_ids[:, 20:23], cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="cannot roll back"):
            cache.crop(-1)
    assert isinstance(DynamicCache(), DynamicCache)


@pytest.mark.parametrize("gate", ["token", "block"])
def test_moba_reading_every_block_is_dense(gate, long_ids):
    """block_size * top_k >= the context: every earlier block is chosen, so MoBA (with its
    sinks) is the unconverted model's attention, left padding included."""
    model = hf_relattn.convert(tiny_llama(heads=4, kv_heads=2), "moba", block_size=4, top_k=10, gate=gate)  # 37 tokens: 10 blocks
    native = tiny_llama(heads=4, kv_heads=2)
    mask, rows = padded("llama", long_ids)
    with torch.no_grad():
        got = model(long_ids, attention_mask=mask).logits
        want = native(long_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    for b, r in rows:
        torch.testing.assert_close(got[b, r], want[b, r], atol=1e-5, rtol=0)
