"""Every variant on the common transformers paths: static and dynamic caches (compiled too),
left and right padding, batched generation, beam search, assisted decoding, attention maps,
half precision, torch.compile and concurrent use.

References are independent of the path under test: the same sample alone, the uncached full
forward, the dynamic cache, native transformers' eager attention with the pattern written as
an additive 4-D mask (loops from the papers' definitions in test_sparse), sequential runs.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch._dynamo
from conftest import tiny_bert, tiny_llama, tiny_vit
from test_sparse import pattern_mask
from transformers import CompileConfig, DynamicCache, StaticCache
from transformers.models.t5.modeling_t5 import T5Attention
from variant_cases import DECODER_CASES, NUM_RELATIONS  # the one table of cases (tests/variant_cases.py)

import hf_relattn
from hf_relattn.variants import sparse_base
from hf_relattn.variants.alibi import alibi_slopes

ROUTED = ("moba", "moba_block_gate", "moh_query_norm", "moh_learned", "mosa")  # discrete choices per token
PAD = 0


def build(case: str, dtype: torch.dtype = torch.float32, layers: int = 2) -> torch.nn.Module:
    """A tiny LLaMA (4 query heads on 2 K/V heads, 2 layers) with the case's variant; new
    tables and routers random, so no zero initialisation hides a path's mistake."""
    name, options = DECODER_CASES[case]
    model = tiny_llama(kv_heads=2, layers=layers)
    if name.startswith("flag:"):
        model.set_attn_implementation("relattn_" + name[5:])
    else:
        hf_relattn.convert(model, name, **options)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "relattn" in param_name:
                param.copy_((0.5 if "mosa" not in param_name else 3.0) * torch.randn(param.shape, generator=gen))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model.to(dtype)


def relation_graph(batch: int, length: int, seed: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, NUM_RELATIONS, (batch, length, length), generator=gen)


def extra(case: str, graph: torch.Tensor | None) -> dict:
    return {"relation_ids": graph} if case == "relation" else {}


@pytest.fixture
def ids() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(3, 97, (2, 13))


def left_padded(ids: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    width = ids.shape[1]
    batch = torch.full_like(ids, PAD)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        batch[row, width - n :] = ids[row, :n]
        mask[row, width - n :] = 1
    return batch, mask


def padded_graph(graph_alone: list[torch.Tensor], width: int) -> torch.Tensor:
    """Relation ids of a left-padded batch: each sample's graph at its real positions."""
    out = torch.zeros(len(graph_alone), width, width, dtype=torch.long)
    for row, g in enumerate(graph_alone):
        n = g.shape[-1]
        out[row, width - n :, width - n :] = g
    return out


def greedy(model, inputs, mask, new, **kwargs):
    out = model.generate(inputs, attention_mask=mask, max_new_tokens=new, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.scores, dim=1)


# ------------------------------------------------------------------------- static cache
@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("case", list(DECODER_CASES))
def test_static_cache_generate_equals_dynamic(case, padding, ids):
    """generate(cache_implementation="static") hands the attention the whole preallocated cache
    (empty slots, and mask=None at an unpadded prefill): tokens and logits of the dynamic cache."""
    model = build(case)
    batch, mask = (ids, torch.ones_like(ids)) if padding == "none" else left_padded(ids, [13, 9])
    new = 5
    graph = None
    if case == "relation":
        graph = relation_graph(2, 13 + new)
        graph[:, : 13 - 9] = 0
    with torch.no_grad():
        dynamic, dyn_scores = greedy(model, batch, mask, new, **extra(case, graph))
        static, st_scores = greedy(model, batch, mask, new, cache_implementation="static", **extra(case, graph))
    assert torch.equal(static, dynamic)
    torch.testing.assert_close(st_scores, dyn_scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", list(DECODER_CASES))
def test_static_cache_passed_in_equals_dynamic_and_full_forward(case, ids):
    """A StaticCache given as the cache: prefill and single-token steps give the dynamic
    cache's logits, and the uncached full forward's (MoBA's block gate excepted: a decoding
    step is its own query block, by definition; MoSA: the prefill is the full forward of the
    prompt, as its expert choice over a whole sequence sees the later tokens, and each step
    keeps the cached tokens of earlier steps)."""
    model = build(case)
    graph = relation_graph(2, 13)
    prefix = 6
    with torch.no_grad():
        full = model(ids, **extra(case, graph)).logits
        if case == "mosa":
            full[:, :prefix] = model(ids[:, :prefix]).logits
        steps = {}
        for kind, cache in (("static", StaticCache(config=model.config, max_cache_len=32)), ("dynamic", DynamicCache())):
            logits = [model(ids[:, :prefix], cache=cache, use_cache=True, **extra(case, graph[:, :prefix, :prefix])).logits]
            for t in range(prefix, ids.shape[1]):
                logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True,
                                    **extra(case, graph[:, : t + 1, : t + 1])).logits)
            steps[kind] = torch.cat(logits, dim=1)
    torch.testing.assert_close(steps["static"], steps["dynamic"], atol=1e-4, rtol=0)
    torch.testing.assert_close(steps["static"][:, :prefix], full[:, :prefix], atol=1e-4, rtol=0)
    if case not in ("moba_block_gate", "mosa"):
        torch.testing.assert_close(steps["static"], full, atol=1e-4, rtol=0)


def compile_config() -> CompileConfig:
    config = CompileConfig(backend="eager", fullgraph=False)
    config._compile_all_devices = True  # transformers compiles decoding on accelerators only by default
    return config


@pytest.mark.parametrize("case", [c for c in DECODER_CASES if c != "relation"])
def test_compiled_static_cache_decoding_equals_dynamic(case, ids):
    """generate() compiles the decoding step for a static cache (here on the CPU, eager backend:
    what dynamo traces is what is checked): the same tokens and logits as the dynamic cache."""
    torch._dynamo.reset()
    model = build(case)
    batch, mask = left_padded(ids, [13, 9])
    with torch.no_grad():
        dynamic, dyn_scores = greedy(model, batch, mask, 4)
        static, st_scores = greedy(model, batch, mask, 4, cache_implementation="static", compile_config=compile_config())
    assert torch.equal(static, dynamic)
    torch.testing.assert_close(st_scores, dyn_scores, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------ padding
@pytest.mark.parametrize("positions", ["given", "absent"])
@pytest.mark.parametrize("case", list(DECODER_CASES))
def test_left_padded_sample_equals_the_sample_alone(case, positions, ids):
    """Blocks, sinks, strides, counts and relative terms are those of each sample's own
    sequence: at its real positions a left-padded sample gets what it gets alone."""
    model = build(case)
    lengths = [13, 8]
    batch, mask = left_padded(ids, lengths)
    graphs = [relation_graph(1, n, seed=5 + row)[0] for row, n in enumerate(lengths)]
    kwargs = {"attention_mask": mask, **extra(case, padded_graph(graphs, 13))}
    if positions == "given":
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(batch, **kwargs).logits
        for row, n in enumerate(lengths):
            alone = model(ids[row : row + 1, :n], **extra(case, graphs[row][None])).logits[0]
            torch.testing.assert_close(padded[row, 13 - n :], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(DECODER_CASES))
def test_right_padded_sample_equals_the_sample_alone(case, ids):
    """Right padding (training batches): padding never takes part in a choice (MoSA's counts,
    MoBA's means and block gates)."""
    model = build(case)
    lengths = [13, 7]
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    batch = ids.masked_fill(mask == 0, PAD)
    graph = relation_graph(2, 13)
    with torch.no_grad():
        padded = model(batch, attention_mask=mask, **extra(case, graph)).logits
        for row, n in enumerate(lengths):
            alone = model(ids[row : row + 1, :n], **extra(case, graph[row : row + 1, :n, :n])).logits[0]
            torch.testing.assert_close(padded[row, :n], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["fixed", "power", "moba", "mosa"])
def test_gaps_inside_a_sample_are_refused_by_patterns_at_own_positions(case, ids):
    """Positions of a sample's own sequence need its tokens in one run: a mask with a hole in
    the middle gets a clear error, not positions silently counted another way."""
    model = build(case)
    mask = torch.ones_like(ids)
    mask[0, 5] = 0
    with pytest.raises(ValueError, match="contiguous run"), torch.no_grad():
        model(ids, attention_mask=mask)


@pytest.mark.parametrize("case", list(DECODER_CASES))
def test_left_padded_batched_generate_equals_each_row_alone(case, ids):
    model = build(case)
    lengths = [12, 7]
    batch, mask = left_padded(ids[:, :12], lengths)
    new = 5
    graphs = [relation_graph(1, n + new, seed=7 + row)[0] for row, n in enumerate(lengths)]
    with torch.no_grad():
        together, _ = greedy(model, batch, mask, new, **extra(case, padded_graph(graphs, 12 + new)))
        for row, n in enumerate(lengths):
            alone, _ = greedy(model, ids[row : row + 1, :n], torch.ones(1, n, dtype=torch.long), new,
                              **extra(case, graphs[row][None]))
            assert torch.equal(together[row, 12:], alone[0, n:]), row


# ------------------------------------------------------------------ other decoding modes
@pytest.mark.parametrize("case", ["alibi_flag", "shaw", "fixed", "moba", "moh_learned", "mosa"])
def test_beam_search_equals_uncached_beam_search(case, ids):
    """Beam search reorders the cache between steps (MoSA's router scores live there and must
    follow): with the cache it finds the beams the uncached search finds. (MoSA on one layer:
    there a cached step is the full forward of its prefix; deeper, later layers keep what
    earlier steps cached.)"""
    model = build(case, layers=1 if case == "mosa" else 2)
    kwargs = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 5, "do_sample": False,
              "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        cached = model.generate(ids[:, :8], attention_mask=torch.ones(2, 8, dtype=torch.long), **kwargs)
        uncached = model.generate(ids[:, :8], attention_mask=torch.ones(2, 8, dtype=torch.long), use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["alibi_flag", "sliding_window", "power", "moh_query_norm"])
def test_assisted_decoding_equals_greedy(case, ids):
    """Assisted generation crops the cache after rejected draft tokens; greedy output must not change."""
    model = build(case)
    assistant = tiny_llama(layers=1)
    assistant.generation_config.eos_token_id = None
    prompt = ids[:1, :8]
    with torch.no_grad():
        plain = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
        assisted = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                                  assistant_model=assistant)
    assert torch.equal(assisted, plain)


@pytest.mark.parametrize("speculative", ["assistant_model", "prompt_lookup_num_tokens"])
def test_mosa_refuses_speculative_decoding(speculative, ids):
    """Assisted decoding runs the prompt with the draft as one forward, where MoSA's expert
    choice would see the draft: refused with a clear error, not a different output."""
    model = build("mosa")
    value = tiny_llama(layers=1) if speculative == "assistant_model" else 3
    with pytest.raises(ValueError, match="speculative decoding is not supported with mosa"):
        model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False, **{speculative: value})


def test_mosa_two_conversations_decoded_alternately_do_not_mix(ids):
    """MoSA's router scores of cached tokens travel with each cache, not with the model (one
    layer: each step equals the full forward of its prefix)."""
    model = build("mosa", layers=1)
    with torch.no_grad():
        full = [torch.stack([model(ids[row : row + 1, : t + 1]).logits[0, -1] for t in range(13)]) for row in range(2)]
        caches = [DynamicCache(), DynamicCache()]
        for row in range(2):
            model(ids[row : row + 1, :5], cache=caches[row], use_cache=True)
        for t in range(5, ids.shape[1]):
            for row in range(2):  # one step of each conversation in turn
                out = model(ids[row : row + 1, t : t + 1], cache=caches[row], use_cache=True)
                torch.testing.assert_close(out.logits[0, 0], full[row][t], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------ attention maps
def eager_with_mask(model: torch.nn.Module, variant_free: torch.nn.Module, inputs: torch.Tensor, additive: torch.Tensor):
    """The unconverted model with transformers' eager attention and `additive` (B, 1|H, Q, K)
    added to its scores: native attention maps of the pattern or bias."""
    variant_free.set_attn_implementation("eager")
    with torch.no_grad():
        return variant_free(inputs, attention_mask=additive, output_attentions=True)


def additive(keep: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    lowest = torch.finfo(torch.float32).min
    base = torch.zeros(keep.shape) if bias is None else bias.expand(keep.shape[0], -1, -1, -1)
    return base.masked_fill(~keep, lowest)


@pytest.mark.parametrize("case", ["alibi_flag", "t5_bias", "sliding_window", "strided", "fixed", "power"])
def test_output_attentions_equal_native_eager_with_the_pattern(case, ids):
    """output_attentions returns the variant's probabilities (B, H, Q, K), equal to native eager
    attention with the pattern or bias as an additive mask; left padding included."""
    model = build(case)
    name, options = DECODER_CASES[case]
    lengths = [13, 9]
    batch, mask = left_padded(ids, lengths)
    causal = torch.ones(13, 13, dtype=torch.bool).tril()
    keep = torch.stack([causal & (mask[row].bool()[None, :]) for row in range(2)])[:, None]  # (B, 1, Q, K)
    heads = model.config.num_attention_heads
    i = torch.arange(13)
    bias = None
    if name == "flag:alibi":
        bias = -alibi_slopes(heads)[None, :, None, None] * (i[:, None] - i[None, :]).float()
    elif name == "t5_bias":
        buckets = T5Attention._relative_position_bucket(i[None, :] - i[:, None], bidirectional=False,
                                                        num_buckets=8, max_distance=16)
        biases = [layer.self_attn.relattn_t5_bias.weight.detach() for layer in model.model.layers]
    else:
        offsets = [13 - n for n in lengths]
        pattern = torch.stack([pattern_mask(name, options, list(range(13)), 13, True, offset=o) for o in offsets])[:, None]
        keep = keep & pattern
    real = mask.bool()  # outputs at padding queries are not compared
    with torch.no_grad():
        ours = model(batch, attention_mask=mask, output_attentions=True)
        plain = model(batch, attention_mask=mask).logits
    torch.testing.assert_close(ours.logits[real], plain[real], atol=1e-5, rtol=0)  # asking for the maps changes nothing
    assert len(ours.attentions) == model.config.num_hidden_layers
    # one additive mask serves every native layer: t5_bias (a table per layer) compares layer 0
    layers = 1 if name == "t5_bias" else model.config.num_hidden_layers
    layer_bias = biases[0][buckets].permute(2, 0, 1)[None].expand(2, -1, -1, -1) if name == "t5_bias" else bias
    native = eager_with_mask(model, tiny_llama(kv_heads=2), batch, additive(keep, layer_bias))
    for layer, probs in enumerate(ours.attentions[:layers]):
        assert probs.shape == (2, heads, 13, 13)
        rows = real[:, None, :, None]
        torch.testing.assert_close(probs * rows, native.attentions[layer] * rows, atol=1e-5, rtol=0)
    if name != "t5_bias":
        torch.testing.assert_close(ours.logits[real], native.logits[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["shaw", "relation", "moba", "moh_query_norm", "moh_learned", "mosa"])
def test_output_attentions_of_learned_and_routed_variants(case, ids):
    """Maps of variants native attention cannot express: they do not change the outputs, each
    computed row is a distribution over visible keys, and rows a head does not compute are
    zero (MoH: the unused heads; MoSA: the tokens a head did not choose)."""
    model = build(case)
    graph = relation_graph(2, 13)
    with torch.no_grad():
        ours = model(ids, output_attentions=True, **extra(case, graph))
        plain = model(ids, **extra(case, graph)).logits
    torch.testing.assert_close(ours.logits, plain, atol=1e-5, rtol=0)
    assert len(ours.attentions) == model.config.num_hidden_layers
    for probs in ours.attentions:
        assert probs.shape == (2, 4, 13, 13)
        assert bool((probs.triu(1) == 0).all())  # causal
        sums = probs.sum(-1)
        computed = sums > 0.5
        torch.testing.assert_close(sums[computed], torch.ones_like(sums[computed]))
        if case.startswith("moh"):
            active = 3 if case == "moh_query_norm" else 2  # 75% / 50% of 4 heads
            assert bool((computed.sum(1) == active).all())
        elif case == "mosa":
            assert bool((computed.sum(-1) == 13 // 3).all())  # each head processes its k tokens
        else:
            assert bool(computed.all())


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_output_attentions_of_encoders(family, pixels=None):
    """Encoders: a bidirectional sliding window with sinks against native eager attention with
    the same pattern (BERT with right padding; ViT: the 2-D neighbourhood with [CLS] global, the
    first patch a sink)."""
    torch.manual_seed(0)
    if family == "bert":
        model = hf_relattn.convert(tiny_bert(), "sliding_window", window=3, block_size=2, sinks=2)
        inputs = {"input_ids": torch.randint(3, 97, (2, 11)), "attention_mask": torch.ones(2, 11, dtype=torch.long)}
        inputs["attention_mask"][1, 8:] = 0
        keep = pattern_mask("sliding_window", {"window": 3, "sinks": 2}, list(range(11)), 11, False)[None, None]
        keep = keep & inputs["attention_mask"].bool()[:, None, None, :]
        native = tiny_bert()
    else:
        model = hf_relattn.convert(tiny_vit(), "sliding_window", window=2, block_size=3, sinks=1)
        inputs = {"pixel_values": torch.randn(2, 1, 16, 16)}
        keep = pattern_mask("sliding_window", {"window": 2, "sinks": 1}, list(range(17)), 17, False, vit_cols=4)[None, None]
        native = tiny_vit()
    with torch.no_grad():
        ours = model(**inputs, output_attentions=True)
        native.set_attn_implementation("eager")
        if family == "bert":
            expected = native(input_ids=inputs["input_ids"], attention_mask=additive(keep.expand(2, 1, -1, -1)),
                              output_attentions=True).attentions
        else:
            # ViT takes no mask: the pattern goes in through a hook adding it to the eager scores
            expected = _vit_eager_with_pattern(native, inputs["pixel_values"], additive(keep))
    for got, want in zip(ours.attentions, expected, strict=True):
        rows = inputs.get("attention_mask", torch.ones(2, 17)).bool()[:, None, :, None]
        torch.testing.assert_close(got * rows, want * rows, atol=1e-5, rtol=0)


def _vit_eager_with_pattern(native, pixels, mask):
    from transformers.models.vit import modeling_vit

    original = modeling_vit.eager_attention_forward

    def masked(module, query, key, value, attention_mask, **kwargs):
        return original(module, query, key, value, mask, **kwargs)

    modeling_vit.eager_attention_forward = masked
    try:
        return native(pixel_values=pixels, output_attentions=True).attentions
    finally:
        modeling_vit.eager_attention_forward = original


# ------------------------------------------------------------------------ half precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(DECODER_CASES))
def test_half_precision_forward_backward_decode(case, dtype, ids):
    """Forward, backward and cached decoding run in bf16 and fp16 on the CPU, finite, with real
    positions of a left-padded batch within half precision's tolerance of float32 (variants that
    choose per token can flip a near-tie: there the argmax must agree almost everywhere)."""
    length = 300 if case.startswith("moh") else 40  # MoH computes only the routed heads from 256 tokens
    ids = torch.cat([ids] * 24, dim=1)[:, :length]
    batch, mask = left_padded(ids, [length, length - 10])
    graph = relation_graph(2, length)
    reference = build(case)
    model = build(case, dtype)
    with torch.no_grad():
        want = reference(batch, attention_mask=mask, **extra(case, graph)).logits
        got = model(batch, attention_mask=mask, **extra(case, graph)).logits
    assert got.dtype == dtype
    real = mask.bool()
    if case in ROUTED:
        agree = (got.float().argmax(-1) == want.argmax(-1))[real].float().mean()
        assert agree > 0.9
    else:
        torch.testing.assert_close(got.float()[real], want[real], atol=0.05, rtol=0.05)
    model.train()
    loss = model(batch, attention_mask=mask, labels=batch.masked_fill(mask == 0, -100), **extra(case, graph)).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    if case != "relation":
        with torch.no_grad():
            out = model.generate(batch[:, :20], attention_mask=mask[:, :20], max_new_tokens=3, do_sample=False)
        assert out.shape == (2, 23)


# --------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("case", ["sliding_window", "strided", "fixed", "power", "moba", "moba_block_gate", "mosa",
                                  "moh_learned"])
def test_compiled_forward_has_no_graph_breaks(case, ids):
    torch._dynamo.reset()
    model = build(case)
    explained = torch._dynamo.explain(model)(ids, attention_mask=torch.ones_like(ids))
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]


@pytest.mark.parametrize("case", ["alibi_flag", "t5_bias", "shaw", "moba"])
def test_compiled_forward_compiles_once_for_every_length_and_matches_eager(case):
    """After the first length, dynamo marks the length dynamic: no recompilation per length.
    Left padding in the batch; compiled outputs equal eager ones at real positions."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = build(case)
    compiled = torch.compile(model, backend="eager", fullgraph=case == "alibi_flag")
    for length in (8, 9, 12):
        torch.manual_seed(length)
        inputs = torch.randint(3, 97, (2, length))
        mask = torch.ones_like(inputs)
        mask[1, :3] = 0
        with torch.no_grad():
            got = compiled(inputs, attention_mask=mask, use_cache=False).logits
            want = model(inputs, attention_mask=mask, use_cache=False).logits
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(got[1, 3:], want[1, 3:], atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] <= 2
    assert sum(counters["graph_break"].values()) == 0


@pytest.mark.parametrize("flag", ["alibi", "sliding_window", "strided", "fixed", "power", "moba"])
def test_flag_variants_compile_with_fullgraph(flag, ids):
    torch._dynamo.reset()
    model = tiny_llama()
    model.set_attn_implementation("relattn_" + flag)
    model.config.relattn = {"sliding_window": {"window": 4}, "strided": {"stride": 3}, "fixed": {"block": 4, "summary": 1},
                            "power": {"block_size": 2, "window": 2}, "moba": {"block_size": 3, "top_k": 2}}.get(flag, {})
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- threads
def _run_in_threads(fn, jobs: list) -> list:
    results = [None] * len(jobs)
    errors = []

    def work(i):
        try:
            results[i] = fn(*jobs[i])
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("case", ["moh_learned", "mosa"])
def test_one_model_from_two_threads(case):
    """Per-call data (the router's layer input, MoSA's scores) travels with each call: two
    threads sharing one model get what each gets alone."""
    model = build(case)
    torch.manual_seed(0)
    inputs = [torch.randint(3, 97, (1, 300)), torch.randint(3, 97, (2, 260))]
    with torch.no_grad():
        alone = [model(x).logits for x in inputs]

    def many(x, expected):
        for _ in range(4):
            with torch.no_grad():
                torch.testing.assert_close(model(x).logits, expected, atol=1e-5, rtol=0)
        return True

    assert all(_run_in_threads(many, [(inputs[0], alone[0]), (inputs[1], alone[1])] * 2))


def test_force_implementation_belongs_to_its_thread(ids):
    """One thread forcing the reference path never changes another thread's path."""
    model = build("sliding_window")
    seen = {}
    barrier = threading.Barrier(2)
    real = sparse_base.materialized_attention

    def spy(*args, **kwargs):
        seen[threading.current_thread().name] = True
        return real(*args, **kwargs)

    def forced():
        with hf_relattn.force_implementation("reference"):
            barrier.wait()
            model(ids)
            barrier.wait()

    def plain():
        barrier.wait()
        model(ids)
        barrier.wait()

    sparse_base.materialized_attention = spy
    try:
        threads = [threading.Thread(target=forced, name="forced"), threading.Thread(target=plain, name="plain")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sparse_base.materialized_attention = real
    assert seen == {"forced": True}


def test_copied_model_and_cache_keep_their_own_state(ids):
    """A deep copy of a MoSA cache decodes on its own: the copies do not share router scores."""
    model = build("mosa", layers=1)
    with torch.no_grad():
        full = torch.stack([model(ids[:1, : t + 1]).logits[0, -1] for t in range(13)])
        cache = DynamicCache()
        model(ids[:1, :6], cache=cache, use_cache=True)
        other = copy.deepcopy(cache)
        for t in range(6, 9):
            out = model(ids[:1, t : t + 1], cache=cache, use_cache=True)
            torch.testing.assert_close(out.logits[0, 0], full[t], atol=1e-4, rtol=0)
        out = model(ids[:1, 6:7], cache=other, use_cache=True)  # the copy is still at 6 tokens
        torch.testing.assert_close(out.logits[0, 0], full[6], atol=1e-4, rtol=0)
