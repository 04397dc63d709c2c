"""ALiBi (Press, Smith & Lewis 2022): a per-head linear distance penalty on the scores.

Expectations are independent of the library:
- slopes from the paper's reference code (ofirpress/attention_with_linear_biases) and from
  the closed form 2^(-8h/n), written out here;
- per-module references: the attention recomputed from the hidden states a forward hook
  captured, softmax(q.k * scale - m_h * dist(i, j) + mask) v, dist = i - j (causal) or
  |i - j| (bidirectional);
- whole-model references: the same formula registered here as a plain transformers attention
  function ("alibi_test_reference") and run by the native model classes.
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import state_copy, tiny_bert, tiny_llama, tiny_vit
from reference import (
    attention_modules,
    attention_reference,
    capture,
    expand_heads,
    hidden_of,
    materialized_attention,
    native_llama_with,
    output_of,
    pool_heads,
    pooled_llama_kv,
    projections,
    with_random_biases,
)
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    BertForSequenceClassification,
    LlamaForCausalLM,
    ViTForImageClassification,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import hf_relattn
import hf_relattn.ops.dense
from hf_relattn.variants.alibi import alibi_slopes

ATOL = 1e-5
REF = "alibi_test_reference"


# ------------------------------------------------------------------------ slopes, bias
def paper_slopes(n: int) -> list[float]:
    """`get_slopes` of the ALiBi reference implementation (Press et al.), verbatim logic."""

    def get_slopes_power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        ratio = start
        return [start * ratio**i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return get_slopes_power_of_2(closest_power_of_2) + paper_slopes(2 * closest_power_of_2)[0::2][: n - closest_power_of_2]


def alibi_bias(heads: int, q_len: int, k_len: int, causal: bool) -> torch.Tensor:
    """-m_h * (i - j) (causal) or -m_h * |i - j|; queries are the last q_len of k_len positions."""
    slopes = torch.tensor(paper_slopes(heads), dtype=torch.float64)
    bias = torch.empty(heads, q_len, k_len, dtype=torch.float64)
    for qi in range(q_len):
        i = k_len - q_len + qi
        for j in range(k_len):
            dist = i - j if causal else abs(i - j)
            bias[:, qi, j] = -slopes * dist
    return bias


def reference_alibi_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A plain transformers attention function implementing ALiBi (the test's own)."""
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = bool(getattr(module, "is_causal", False))
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is not None:
        assert attention_mask.dtype == torch.bool
    bias = alibi_bias(query.shape[1], q_len, k_len, causal)
    out = materialized_attention(query, key, value, scale, causal, bias=bias, allowed=attention_mask)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(REF, reference_alibi_attention)
AttentionMaskInterface.register(REF, sdpa_mask)


# --------------------------------------------------------------------------- helpers
def module_reference(family, module, record, heads, key_mask, with_alibi=True):
    """Recompute one attention module's output from its captured input (its own weights)."""
    causal = family == "llama"
    seq = hidden_of(record).shape[1]
    bias = alibi_bias(heads, seq, seq, causal) if with_alibi else None
    return attention_reference(record, heads, *projections(module), causal=causal, rotary=causal, key_mask=key_mask, bias=bias)


def build(family, heads):
    model = {"llama": tiny_llama, "bert": tiny_bert, "vit": tiny_vit}[family](heads=heads)
    return model if family == "llama" else with_random_biases(model)


def inputs(family, ids, pixels, padded=True):
    """Model kwargs and the key padding mask (None for ViT and when not padded).

    Unpadded LLaMA input gets no mask from transformers: the engine must be causal by itself.
    """
    if family == "vit":
        return {"pixel_values": pixels}, None
    if not padded:
        return {"input_ids": ids}, None
    mask = torch.ones_like(ids)
    if family == "llama":
        mask[1, :3] = 0  # left padding, as for generation
    else:
        mask[1, -4:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask}, mask


def valid_rows(family, tensor, mask):
    """Rows of (B, T, ...) whose query is a real token (left-padded LLaMA rows see no key)."""
    if family != "llama" or mask is None:
        return tensor
    return tensor[mask.bool()]


def run(model, kwargs):
    extra = {"use_cache": False} if isinstance(model, LlamaForCausalLM) else {}
    with torch.no_grad():
        return model(**kwargs, **extra, output_hidden_states=True)


def forward(model, kwargs):
    return run(model, kwargs).logits


def differs(a, b):
    """Clearly different, relative to the scale of b."""
    return (a - b).abs().max().item() > 1e-3 * b.abs().max().item()


# ---------------------------------------------------------------------------- slopes
def test_slopes_eight_heads():
    expected = [2.0**-k for k in range(1, 9)]
    torch.testing.assert_close(alibi_slopes(8), torch.tensor(expected), atol=0, rtol=1e-6)
    torch.testing.assert_close(alibi_slopes(8), torch.tensor(paper_slopes(8), dtype=torch.float32), atol=0, rtol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 4, 16, 32, 64])
def test_slopes_power_of_two(n):
    expected = torch.tensor([2.0 ** (-8.0 * h / n) for h in range(1, n + 1)])
    assert alibi_slopes(n).shape == (n,)
    assert alibi_slopes(n).dtype == torch.float32
    torch.testing.assert_close(alibi_slopes(n), expected, atol=0, rtol=1e-6)


def test_slopes_non_power_of_two_written_out():
    eight = [2.0**-k for k in range(1, 9)]
    sixteen = [2.0 ** (-k / 2) for k in range(1, 17)]  # 2^(-8h/16)
    # n=9: the 8 slopes of p=8, then sixteen[0::2] = 2^-0.5, 2^-1.5, ... (first 1)
    torch.testing.assert_close(alibi_slopes(9), torch.tensor(eight + [2**-0.5]), atol=0, rtol=1e-6)
    expected12 = eight + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5]
    assert expected12[8:] == sixteen[0::2][:4]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected12), atol=0, rtol=1e-6)


@pytest.mark.parametrize("n", [3, 5, 6, 7, 9, 12, 20, 24, 40])
def test_slopes_match_paper_code(n):
    torch.testing.assert_close(alibi_slopes(n), torch.tensor(paper_slopes(n), dtype=torch.float32), atol=0, rtol=1e-6)


# --------------------------------------------------------- module-level reference via hooks
@pytest.fixture
def engine_mode(request, monkeypatch):
    """'auto' (default dense path), 'reference', or 'chunked' (dense, queries in chunks of 3)."""
    mode = request.param
    calls: list[int] = []
    if mode == "chunked":
        real = F.scaled_dot_product_attention

        def spy(query, key, value, *args, **kwargs):
            calls.append(query.shape[2])
            return real(query, key, value, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ctx = hf_relattn.force_implementation("reference") if mode == "reference" else contextlib.nullcontext()
    with ctx:
        yield mode, calls, monkeypatch


@pytest.mark.parametrize("engine_mode", ["auto", "reference", "chunked"], indirect=True)
@pytest.mark.parametrize("heads", [4, 6])
@pytest.mark.parametrize("family", ["llama", "bert", "vit"])
@pytest.mark.parametrize("enable", ["convert", "flag"])
def test_alibi_matches_materialized_reference(family, heads, engine_mode, enable, ids, pixels):
    mode, calls, monkeypatch = engine_mode
    model = build(family, heads)
    padded = heads == 4  # every mode and family runs both with and without padding
    plain = run(model, inputs(family, ids, pixels, padded)[0]).hidden_states[-1]
    if enable == "convert":
        hf_relattn.convert(model, "alibi")
    else:
        model.set_attn_implementation("relattn_alibi")
    kwargs, mask = inputs(family, ids, pixels, padded)
    seq = pixels.shape[-1] ** 2 // 16 + 1 if family == "vit" else ids.shape[1]
    if mode == "chunked":
        monkeypatch.setattr(hf_relattn.ops.dense, "CHUNK_ELEMENTS", 2 * heads * seq * 3)

    modules = attention_modules(model)
    calls.clear()  # forget the plain model's SDPA calls
    with capture(modules) as rec:
        last = run(model, kwargs).hidden_states[-1]
    assert len(rec) == len(modules) == 2
    for i, module in enumerate(modules):
        ref = module_reference(family, module, rec[i], heads, mask)
        got = output_of(rec[i]).double()
        torch.testing.assert_close(valid_rows(family, got, mask), valid_rows(family, ref, mask), atol=ATOL, rtol=0)
        # the bias matters: without it the reference is clearly different
        no_bias = module_reference(family, module, rec[i], heads, mask, with_alibi=False)
        assert (valid_rows(family, got, mask) - valid_rows(family, no_bias, mask)).abs().max() > 1e-3

    assert differs(valid_rows(family, last, mask), valid_rows(family, plain, mask))
    if mode == "chunked":
        # every layer ran in several query chunks of at most 3
        assert len(calls) >= 2 * math.ceil(seq / 3)
        assert max(calls) == 3 and sum(calls) == 2 * seq


# ------------------------------------------------------------------------- by flag
FLAG_CLASSES = {"llama": AutoModelForCausalLM, "bert": BertForSequenceClassification, "vit": ViTForImageClassification}


@pytest.mark.parametrize("family,heads", [("llama", 4), ("llama", 6), ("bert", 4), ("bert", 6), ("vit", 6)])
def test_flag_from_pretrained_and_set_attn_implementation(family, heads, tmp_path, ids, pixels):
    build(family, heads).save_pretrained(tmp_path)
    cls = FLAG_CLASSES[family]
    kwargs, mask = inputs(family, ids, pixels, padded=heads == 4)

    flagged = cls.from_pretrained(tmp_path, attn_implementation="relattn_alibi").eval()
    assert flagged.config._attn_implementation == "relattn_alibi"
    reference = cls.from_pretrained(tmp_path, attn_implementation=REF).eval()
    plain = cls.from_pretrained(tmp_path).eval()
    set_later = cls.from_pretrained(tmp_path).eval()
    set_later.set_attn_implementation("relattn_alibi")

    got, ref, later, base = (run(m, kwargs) for m in (flagged, reference, set_later, plain))
    for field in ("logits", "last"):
        a, b, c = (o.logits if field == "logits" else o.hidden_states[-1] for o in (got, ref, later))
        torch.testing.assert_close(valid_rows(family, a, mask), valid_rows(family, b, mask), atol=ATOL, rtol=0)
        torch.testing.assert_close(c, a, atol=1e-6, rtol=0)
    # ALiBi really changed the model (classifier logits of tiny random heads barely move)
    assert differs(valid_rows(family, base.hidden_states[-1], mask), valid_rows(family, got.hidden_states[-1], mask))


def test_flag_rejects_unknown_option(tmp_path, ids):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="bogus"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="relattn_alibi", relattn={"bogus": 1})
        model(ids)  # reached only if loading did not already refuse the option


@pytest.mark.parametrize("mode", ["auto", "reference"])
def test_flag_incremental_decoding_matches_reference(mode, ids):
    """With a KV cache the new queries sit at the end of the keys: distances stay absolute."""
    model = tiny_llama(heads=6)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation(REF)
    model.set_attn_implementation("relattn_alibi")
    ctx = hf_relattn.force_implementation(mode) if mode == "reference" else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        full_ref = reference(ids, use_cache=False).logits
        out = model(ids[:, :7], use_cache=True)
        steps = [out.logits]
        cache = out.cache
        for t in range(7, ids.shape[1]):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full_ref, atol=ATOL, rtol=0)


# -------------------------------------------------------------------- with GQA
@pytest.mark.parametrize("order", ["gqa-then-alibi", "alibi-then-gqa"])
@pytest.mark.parametrize("heads,groups", [(4, 2), (6, 3), (6, 1)])
def test_llama_alibi_composes_with_gqa(order, heads, groups, ids):
    src = tiny_llama(heads=heads)
    model = copy.deepcopy(src)
    steps = [("gqa", {"num_key_value_heads": groups}), ("alibi", {})]
    for name, options in steps if order == "gqa-then-alibi" else steps[::-1]:
        hf_relattn.convert(model, name, **options)
    assert model.model.layers[0].self_attn.k_proj.out_features == groups * 16

    # native GQA LLaMA with the pooled weights, run by the test's own ALiBi attention
    native = native_llama_with(src, groups, pooled_llama_kv(src, groups))
    native.set_attn_implementation(REF)

    kwargs, mask = inputs("llama", ids, None, padded=heads == 4)
    torch.testing.assert_close(
        valid_rows("llama", forward(model, kwargs), mask), valid_rows("llama", forward(native, kwargs), mask), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("order", ["gqa-then-alibi", "alibi-then-gqa"])
@pytest.mark.parametrize("family", ["bert", "vit"])
def test_encoder_alibi_composes_with_gqa(order, family, ids, pixels):
    heads, groups = 4, 2
    src = build(family, heads)
    model = copy.deepcopy(src)
    steps = [("gqa", {"num_key_value_heads": groups}), ("alibi", {})]
    for name, options in steps if order == "gqa-then-alibi" else steps[::-1]:
        hf_relattn.convert(model, name, **options)

    # multi-head model whose K/V heads repeat the pooled heads, with the test's ALiBi attention
    reference = copy.deepcopy(src)
    state = state_copy(src)
    pooled = {}
    for i, module in enumerate(attention_modules(src)):
        for proj in ("key", "value") if family == "bert" else ("k_proj", "v_proj"):
            for part in ("weight", "bias"):
                name = next(n for n, p in src.named_parameters() if p is getattr(getattr(module, proj), part))
                pooled[name] = pool_heads(state[name], heads, groups)
                state[name] = expand_heads(pooled[name], heads, groups)
    reference.load_state_dict(state)
    reference.set_attn_implementation(REF)

    kwargs, mask = inputs(family, ids, pixels)
    for name, value in pooled.items():
        torch.testing.assert_close(model.state_dict()[name], value, atol=1e-7, rtol=0)
    torch.testing.assert_close(forward(model, kwargs), forward(reference, kwargs), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------ some layers
@pytest.mark.parametrize("family,layers", [("llama", [0]), ("bert", [0]), ("llama", [-2])])
def test_alibi_on_layer_zero_only(family, layers, ids, pixels):
    heads = 4
    original = build(family, heads)
    model = hf_relattn.convert(copy.deepcopy(original), "alibi", layers=layers)
    kwargs, mask = inputs(family, ids, pixels)
    modules = attention_modules(model)
    with capture(modules) as rec:
        forward(model, kwargs)

    for i, module in enumerate(modules):
        got = valid_rows(family, output_of(rec[i]).double(), mask)
        with_bias = valid_rows(family, module_reference(family, module, rec[i], heads, mask, with_alibi=True), mask)
        without = valid_rows(family, module_reference(family, module, rec[i], heads, mask, with_alibi=False), mask)
        if i == 0:
            torch.testing.assert_close(got, with_bias, atol=ATOL, rtol=0)
            assert (got - without).abs().max() > 1e-3
        else:
            torch.testing.assert_close(got, without, atol=ATOL, rtol=0)
    # layer 1 of the original model, fed the same input, gives the same output
    args, kw, _ = rec[1]
    with torch.no_grad():
        orig_out = attention_modules(original)[1](*args, **kw)
    orig_out = orig_out[0] if isinstance(orig_out, tuple) else orig_out
    torch.testing.assert_close(valid_rows(family, output_of(rec[1]), mask), valid_rows(family, orig_out, mask), atol=ATOL, rtol=0)
