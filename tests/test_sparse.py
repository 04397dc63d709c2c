"""Sparse attention variants against masks written here with plain loops over (i, j) from the
papers' definitions, and a naive MoBA; block-sparse path vs the materialised formula."""

from __future__ import annotations

import re
import pytest
import torch
from conftest import assert_same_state, state_copy, tiny_bert, tiny_llama, tiny_mistral, tiny_modernbert, tiny_vision, tiny_vit
from reference import prefix_of, materialized_attention, run_with_attention
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import hf_relattn
from hf_relattn.ops import blocks
from hf_relattn.variants.fixed import fixed_attention
from hf_relattn.variants.strided import strided_attention

REF = "sparse_reference_for_tests"


def pattern_mask(name, o, q_positions, k_len, causal, vit_cols=None, offset=0, prefix=1):
    """(Q, K) bool: may query i attend key j, by the paper's definition (causality included).
    Slots before `offset` are padding: positions count from the sample's first token. On a
    vision grid (`vit_cols`) the first `prefix` tokens are special ([CLS]; DeiT's distillation token)."""
    keep = torch.zeros(len(q_positions), k_len, dtype=torch.bool)
    for a, q_slot in enumerate(q_positions):
        i = q_slot - offset
        for j in range(-offset, k_len - offset):
            if causal and j > i:
                continue
            if name == "sliding_window":
                if vit_cols is not None:  # the prefix tokens are global; patches on a grid
                    if i < prefix or j < prefix:
                        ok = True
                    else:
                        (ri, ci), (rj, cj) = divmod(i - prefix, vit_cols), divmod(j - prefix, vit_cols)
                        ok = abs(ri - rj) < o["window"] and abs(ci - cj) < o["window"]
                else:
                    ok = i - j < o["window"] if causal else abs(i - j) < o["window"]
            elif name == "strided":  # Child et al. 2019: local + every stride-th
                ok = abs(i - j) < o["stride"] or (i - j) % o["stride"] == 0
            elif name == "fixed":  # own block + last `summary` of every block
                ok = j // o["block"] == i // o["block"] or j % o["block"] >= o["block"] - o["summary"]
            elif name == "power":  # blocks at power-of-two distance, local window blocks, sink block
                bs = o["block_size"]
                qb, kb = i // bs, j // bs
                d = qb - kb if causal else abs(qb - kb)
                local = kb * bs + bs - 1 > i - o["window"] and (kb <= qb if causal else kb * bs < i + o["window"] or kb <= qb)
                ok = kb == qb or kb == 0 or (d > 0 and (d & (d - 1)) == 0) or local
            else:
                raise AssertionError(name)
            # attention sinks (Xiao et al. 2024): the first tokens of the sample, for every query
            # (ViT: [CLS] and the first patches)
            sinks = o.get("sinks", 0)
            ok = ok or (sinks > 0 and j < sinks + (prefix if vit_cols is not None else 0))
            keep[a, j + offset] = ok
    return keep


def naive_moba_mask(q, k, q_positions, block, top_k, key_valid, per_block=False, sinks=0):
    """MoBA (Lu et al. 2025) per token and head: own block, plus the top_k - 1 earlier blocks by
    q . mean(key block) (padding keys left out of the means), causal. (B, H, Q, K) bool.
    Blocks start at each sample's first real token (left padding moves nothing).
    per_block: every token gates with the mean query of its block (among these queries that
    are not padding)."""
    batch, heads, _, _ = q.shape
    offsets = [int(key_valid[b].int().argmax()) for b in range(batch)]
    if per_block:
        src, q = q, q.clone()
        for b in range(batch):
            for h in range(heads):
                for a, i in enumerate(q_positions):
                    same = [x for x, p in enumerate(q_positions)
                            if key_valid[b, p] and (p - offsets[b]) // block == (i - offsets[b]) // block]
                    if same:
                        q[b, h, a] = src[b, h, same].mean(0)
    groups = heads // k.shape[1]
    k_len = k.shape[2]
    keep = torch.zeros(batch, heads, len(q_positions), k_len, dtype=torch.bool)
    for b in range(batch):
        off = offsets[b]
        for h in range(heads):
            for a, i in enumerate(q_positions):
                own = (i - off) // block
                scores = []
                for blk in range(own):
                    members = [j for j in range(off + blk * block, off + (blk + 1) * block) if j < k_len and key_valid[b, j]]
                    if members:
                        mean = k[b, h // groups, members].double().mean(0)
                        scores.append((float(q[b, h, a].detach().double() @ mean.detach()), blk))
                chosen = {own} | {blk for _, blk in sorted(scores, reverse=True)[: top_k - 1]}
                for j in range(off, i + 1):
                    keep[b, h, a, j] = (j - off) // block in chosen or j - off < sinks
    return keep


def allowed_pairs(module, query, key, attention_mask):
    """(B, 1|H, Q, K) bool: the pairs the module's sparse variant keeps (loops above), with the
    mask's padding and causality; None for a dense layer without a mask."""
    variant = next(v for v in module.relattn_variants if v.axis == "sparsity")
    q_len, k_len = query.shape[2], key.shape[2]
    q_positions = list(range(k_len - q_len, k_len))
    causal = module.is_causal
    valid = attention_mask.any(-2)[:, 0] if attention_mask is not None else torch.ones(query.shape[0], k_len, dtype=torch.bool)
    if variant.name == "moba":
        dense = variant.dense_layers and module.layer_idx >= module.config.num_hidden_layers - variant.dense_layers
        allowed = None if dense else naive_moba_mask(query.detach(), key, q_positions, variant.block_size, variant.top_k, valid,
                                                     per_block=variant.gate == "block", sinks=variant.sinks)
    else:
        cols = module.config.image_size // module.config.patch_size if hasattr(module.config, "patch_size") else None
        prefix = prefix_of(module.config)
        allowed = torch.stack([pattern_mask(variant.name, variant.options(), q_positions, k_len, causal, cols,
                                            offset=int(valid[b].int().argmax()), prefix=prefix)
                               for b in range(query.shape[0])])[:, None]
    if attention_mask is not None:
        allowed = attention_mask if allowed is None else allowed & attention_mask
    return allowed


def sparse_reference(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    allowed = allowed_pairs(module, query, key, attention_mask)
    out = materialized_attention(query, key, value, scaling, causal=module.is_causal, allowed=allowed)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(REF, sparse_reference)
AttentionMaskInterface.register(REF, sdpa_mask)

CASES = [
    ("sliding_window", {"window": 7, "block_size": 4, "sinks": 0}),
    ("sliding_window", {"window": 3, "block_size": 8, "sinks": 5}),
    ("strided", {"stride": 5, "block_size": 4, "sinks": 0}),
    ("strided", {"stride": 4, "block_size": 8, "sinks": 3}),
    ("fixed", {"block": 8, "summary": 2, "sinks": 0}),
    ("fixed", {"block": 6, "summary": 4, "sinks": 9}),
    ("power", {"block_size": 4, "window": 6, "sinks": 0}),
    ("power", {"block_size": 3, "window": 1, "sinks": 5}),
]


def padded(family, ids):
    mask = torch.ones_like(ids)
    if family == "llama":
        mask[1, :5] = 0
        return mask, [(0, slice(None)), (1, slice(5, None))]
    mask[1, 30:] = 0
    return mask, [(0, slice(None)), (1, slice(0, 30))]


@pytest.fixture
def long_ids():
    torch.manual_seed(2)
    return torch.randint(3, 97, (2, 37))


@pytest.mark.parametrize("merge_from", [128, 1], ids=["sinks-gathered", "sinks-merged"])
@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in CASES])
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_patterns_match_loop_masks(name, options, family, merge_from, long_ids, monkeypatch):
    monkeypatch.setattr(blocks, "SINK_MERGE_MIN_TOKENS", merge_from)
    model = tiny_llama() if family == "llama" else tiny_bert()
    if family == "llama":
        hf_relattn.convert(model, "gqa", num_key_value_heads=2)
    hf_relattn.convert(model, name, **options)
    mask, rows = padded(family, long_ids)
    with torch.no_grad():
        got = model(input_ids=long_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    expected = run_with_attention(model, REF, input_ids=long_ids, attention_mask=mask)
    expected = expected if family == "bert" else run_hidden(model, long_ids, mask)
    for b, r in rows:
        torch.testing.assert_close(got[b, r], expected[b, r], atol=2e-5, rtol=1e-5)


def run_hidden(model, ids, mask):
    impl = model.config._attn_implementation
    model.config._attn_implementation_internal = REF
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    finally:
        model.config._attn_implementation_internal = impl


@pytest.mark.parametrize("options", [{"block_size": 4, "top_k": 3}, {"block_size": 5, "top_k": 2}, {"block_size": 4, "top_k": 3, "dense_layers": 1},
                                     {"block_size": 4, "top_k": 3, "gate": "block"}, {"block_size": 6, "top_k": 2, "gate": "block"}])
@pytest.mark.parametrize("merge_from", [128, 1], ids=["sinks-gathered", "sinks-merged"])
def test_moba_matches_naive_moba(options, merge_from, long_ids, monkeypatch):
    monkeypatch.setattr(blocks, "SINK_MERGE_MIN_TOKENS", merge_from)
    model = hf_relattn.convert(hf_relattn.convert(tiny_llama(), "gqa", num_key_value_heads=2), "moba", **options)
    mask, rows = padded("llama", long_ids)
    with torch.no_grad():
        got = model(input_ids=long_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    expected = run_hidden(model, long_ids, mask)
    for b, r in rows:
        torch.testing.assert_close(got[b, r], expected[b, r], atol=2e-5, rtol=1e-5)


def test_moba_block_gate_unpadded_whole_blocks(long_ids):
    """Whole key blocks and no padding: the engine's shared-mask path for query blocks gated whole;
    outputs and gradients against the naive MoBA."""
    model = hf_relattn.convert(tiny_llama(), "moba", block_size=4, top_k=3, gate="block").train()
    ids = long_ids[:, :36]

    def run(implementation):
        model.zero_grad()
        model.config._attn_implementation_internal = implementation
        try:
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
        finally:
            model.config._attn_implementation_internal = "relattn"
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (got, got_grads), (expected, expected_grads) = run("relattn"), run(REF)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    for n in got_grads:
        torch.testing.assert_close(got_grads[n], expected_grads[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_vit_two_d_neighbourhood_with_global_cls(pixels):
    model = hf_relattn.convert(tiny_vit(), "sliding_window", window=2, block_size=3)
    with torch.no_grad():
        got = model(pixels, output_hidden_states=True).hidden_states[-1]
    expected = run_with_attention(model, REF, pixel_values=pixels)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        assert (got - tiny_vit()(pixels, output_hidden_states=True).hidden_states[-1]).abs().max() > 1e-3


PREFIXED = {"deit": {}, "dinov2_with_registers": {"num_register_tokens": 3}}


@pytest.mark.parametrize("sinks", [0, 2])
@pytest.mark.parametrize("family", list(PREFIXED))
def test_two_d_neighbourhood_with_several_global_prefix_tokens(family, sinks):
    """DeiT's [CLS] and distillation token, DINOv2's [CLS] and registers: all global, the window
    and sinks on the patch grid after them."""
    model = hf_relattn.convert(tiny_vision(family, **PREFIXED[family]), "sliding_window", window=2, block_size=3, sinks=sinks)
    pixels = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = model(pixels, output_hidden_states=True).hidden_states[-1]
        plain = tiny_vision(family, **PREFIXED[family])(pixels, output_hidden_states=True).hidden_states[-1]
    expected = run_with_attention(model, REF, pixel_values=pixels)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3


@pytest.mark.parametrize("name, options", CASES + [("moba", {"block_size": 4, "top_k": 2})])
def test_gradients_match_the_reference(name, options, long_ids):
    model = hf_relattn.convert(tiny_llama(), name, **options).train()
    mask, _ = padded("llama", long_ids)
    labels = long_ids.clone()
    labels[1, :6] = -100  # logits at padded positions are undefined

    def grads(implementation=None):
        model.zero_grad()
        if implementation:
            model.config._attn_implementation_internal = implementation
        try:
            model(input_ids=long_ids, attention_mask=mask, labels=labels).loss.backward()
        finally:
            model.config._attn_implementation_internal = "relattn"
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    got, expected = grads(), grads(REF)
    for n in got:
        torch.testing.assert_close(got[n], expected[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name, options", CASES + [("moba", {"block_size": 4, "top_k": 2})])
def test_kv_cache_decoding_equals_full_forward(name, options, long_ids):
    model = hf_relattn.convert(tiny_llama(), name, **options)
    ids = long_ids[:1]
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :9], use_cache=True)
        logits = [out.logits[:, -1]]
        for t in range(9, ids.shape[1]):
            out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
            logits.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(logits, 1), full[:, 8:], atol=1e-5, rtol=1e-5)
    generated = model.generate(ids[:, :9], max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        assert torch.equal(model(generated[:, :-1]).logits[:, 8:].argmax(-1), generated[:, 9:])


def test_flag_with_options_from_the_config(tmp_path, long_ids):
    tiny_llama().save_pretrained(tmp_path)
    flagged = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="relattn_sliding_window",
                                                   relattn={"window": 5, "block_size": 4}).eval()
    converted = hf_relattn.convert(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), "sliding_window", window=5, block_size=4)
    with torch.no_grad():
        torch.testing.assert_close(flagged(long_ids).logits, converted(long_ids).logits, atol=0, rtol=0)
        assert (flagged(long_ids).logits - tiny_llama()(long_ids).logits).abs().max() > 1e-3


def test_save_load_round_trip(tmp_path, long_ids):
    model = hf_relattn.convert(hf_relattn.convert(tiny_llama(), "moba", block_size=4, top_k=2), "gqa", num_key_value_heads=1)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_same_state(state_copy(model), loaded)
    assert loaded.config.relattn["variants"][0]["name"] == "moba"
    with torch.no_grad():
        torch.testing.assert_close(loaded(long_ids).logits, model(long_ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("name, options, message", [
    ("sliding_window", {"window": 0}, r"window must be an integer in \[1,"),
    ("sliding_window", {"window": 4, "block_size": -2}, r"block_size must be an integer in \[1,"),
    ("moba", {"top_k": 0}, r"top_k must be an integer in \[1,"),
    ("moba", {"dense_layers": 5}, r"dense_layers \(5\) exceeds the model's 2 layers"),
    ("moba", {"gate": "head"}, "gate must be one of 'token', 'block'"),
    ("fixed", {"block": 4, "summary": 6}, r"summary \(6\) must not exceed block \(4\)"),
    ("strided", {"stride": 0}, r"stride must be an integer in \[1,"),
    ("power", {"window": 0}, r"window must be an integer in \[1,"),
    ("power", {"size": 3}, r"Unknown option\(s\) \['size'\]"),
])
def test_bad_options_leave_the_model_unchanged(name, options, message):
    model = tiny_llama()
    before = state_copy(model)
    with pytest.raises(ValueError, match=message):
        hf_relattn.convert(model, name, **options)
    assert_same_state(before, model)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_moba_needs_a_decoder_and_sparse_variants_do_not_stack():
    with pytest.raises(ValueError, match="needs a causal decoder"):
        hf_relattn.convert(tiny_bert(), "moba")
    model = hf_relattn.convert(tiny_llama(), "sliding_window", window=4)
    before = state_copy(model)
    with pytest.raises(ValueError, match=r"cannot combine \['sliding_window', 'power'\]: two sparse patterns"):
        hf_relattn.convert(model, "power")
    assert_same_state(before, model)


@pytest.mark.parametrize("name, options", [("sliding_window", {"window": 7, "block_size": 4}), ("power", {"block_size": 4, "window": 6})])
def test_flex_attention_path_matches_loop_masks(name, options, long_ids):
    """The compiled FlexAttention path (BlockMask from the same pattern; used automatically for
    long CPU inference and on GPU) against the loop masks, with GQA and left padding."""
    model = hf_relattn.convert(hf_relattn.convert(tiny_llama(), "gqa", num_key_value_heads=2), name, **options)
    mask, rows = padded("llama", long_ids)
    with torch.no_grad(), hf_relattn.force_implementation("flex"):
        got = model(input_ids=long_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    expected = run_hidden(model, long_ids, mask)
    for b, r in rows:
        torch.testing.assert_close(got[b, r], expected[b, r], atol=2e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:.*without torch.compile")
@pytest.mark.parametrize("family", ["modernbert", "mistral"])
def test_flex_attention_path_keeps_the_native_sliding_window(family, long_ids, monkeypatch):
    """The FlexAttention block mask intersects the whole mask transformers built, not only its
    padded keys: a native sliding window (ModernBERT's bidirectional one on its local layers,
    Mistral's causal one) hides keys, sinks included, that the pattern alone would keep. It
    kept them before (GPU, 4096 tokens and more). flex_attention runs uncompiled here: the same
    block mask, without tens of seconds of CPU compilation."""
    from torch.nn.attention.flex_attention import flex_attention

    from hf_relattn.ops import flex

    monkeypatch.setattr(flex, "_compiled_flex", flex_attention)
    model = tiny_modernbert() if family == "modernbert" else tiny_mistral()
    hf_relattn.convert(model, "sliding_window", window=4, block_size=2, sinks=2)
    mask, rows = padded("llama" if family == "mistral" else "bert", long_ids)  # decoders: left padding
    with torch.no_grad(), hf_relattn.force_implementation("flex"):
        got = model(input_ids=long_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    with torch.no_grad(), hf_relattn.force_implementation("reference"):
        expected = model(input_ids=long_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    for b, r in rows:
        torch.testing.assert_close(got[b, r], expected[b, r], atol=2e-5, rtol=1e-5)


def test_flex_refuses_per_token_choices(long_ids):
    model = hf_relattn.convert(tiny_llama(), "moba", block_size=4, top_k=2)
    with torch.no_grad(), hf_relattn.force_implementation("flex"), pytest.raises(ValueError, match="has no FlexAttention form"):
        model(long_ids)


@pytest.mark.parametrize("stride", [3, 8])
def test_strided_band_and_residue_layout_with_gqa(stride, long_ids):
    """The strided self-attention path (a band plus residue-major pieces, merged by log-sum-exp)
    against the loop mask, with grouped K/V heads, left padding and a length that is not a
    multiple of the stride; outputs and gradients."""
    model = hf_relattn.convert(tiny_llama(heads=4, kv_heads=2), "strided", stride=stride).train()
    mask, rows = padded("llama", long_ids)
    labels = long_ids.clone()
    labels[1, :6] = -100  # logits at padded positions are undefined (label t is scored by logits t - 1)

    def run(implementation):
        model.zero_grad()
        model.config._attn_implementation_internal = implementation
        try:
            out = model(input_ids=long_ids, attention_mask=mask, labels=labels, output_hidden_states=True)
            out.loss.backward()
        finally:
            model.config._attn_implementation_internal = "relattn"
        return out.hidden_states[-1].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (got, got_grads), (expected, expected_grads) = run("relattn"), run(REF)
    for b, r in rows:
        torch.testing.assert_close(got[b, r], expected[b, r], atol=2e-5, rtol=1e-5)
    for n in got_grads:
        torch.testing.assert_close(got_grads[n], expected_grads[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name, options, heads", [("strided", {"stride": 7}, 6), ("fixed", {"block": 8, "summary": 3}, 6),
                                                  ("fixed", {"block": 8, "summary": 3}, 3)])
def test_layouts_fused_inference_and_autograd_match_the_pattern(causal, name, options, heads):
    """Without autograd the layout pieces run through the CPU flash kernel (which returns the
    log-sum-exp; one query head per K/V head takes its causal mode); with autograd, through
    plain matmuls: both equal the materialised pattern, for a batch of two, no padding and a
    length that is not a multiple of the block."""
    torch.manual_seed(0)
    q = torch.randn(2, heads, 50, 16)
    k, v = torch.randn(2, 3, 50, 16), torch.randn(2, 3, 50, 16)

    def run(q):
        if name == "strided":
            return strided_attention(q, k, v, None, options["stride"], causal, 0.25, 0.0)
        return fixed_attention(q, k, v, None, options["block"], options["summary"], causal, 0.25, 0.0)

    with torch.no_grad():
        fused = run(q)
    plain = run(q.clone().requires_grad_())
    keep = pattern_mask(name, options, list(range(50)), 50, causal)
    expected = materialized_attention(q, k, v, 0.25, causal=causal, allowed=keep[None, None])
    torch.testing.assert_close(fused, expected.float(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(plain.detach(), expected.float(), atol=2e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:.*without torch.compile")
def test_flex_attention_path_under_inference_mode(long_ids, monkeypatch):
    """Under torch.inference_mode (transformers' pipelines) the mask is an inference tensor,
    which has no version counter: the FlexAttention path builds its block mask in every layer
    instead of caching it by version (it raised before), and equals the reference path."""
    from torch.nn.attention.flex_attention import flex_attention

    from hf_relattn.ops import flex

    monkeypatch.setattr(flex, "_compiled_flex", flex_attention)
    model = hf_relattn.convert(tiny_llama(), "sliding_window", window=7, block_size=4, sinks=2)
    mask, rows = padded("llama", long_ids)
    with torch.inference_mode():
        with hf_relattn.force_implementation("flex"):
            got = model(input_ids=long_ids, attention_mask=mask).logits
        with hf_relattn.force_implementation("reference"):
            expected = model(input_ids=long_ids, attention_mask=mask).logits
    for b, r in rows:
        torch.testing.assert_close(got[b, r], expected[b, r], atol=2e-5, rtol=1e-5)
