"""MoH (Jin et al. 2024) against the official routers' formulas written here with plain loops,
the materialised attention, and the unconverted models."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import assert_same_state, state_copy, tiny_bert, tiny_llama, tiny_vit
from reference import materialized_attention, run_with_attention
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import hf_relattn
from hf_relattn.variants import moh as moh_module
from hf_relattn import moh_aux_loss
from hf_relattn.variants.moh import _balance_loss

REF = "moh_reference_for_tests"


@pytest.fixture(autouse=True)
def routed_from_two_tokens(monkeypatch):
    """Tiny inputs take the head-routed inference path too (it starts at 256 tokens by default)."""
    monkeypatch.setattr(moh_module, "ROUTED_MIN_TOKENS", 2)
INPUTS: dict[int, torch.Tensor] = {}  # id(attention module) -> its input of the current call


def keep_inputs(model):
    def hook(module, args, kwargs):
        INPUTS[id(module)] = args[0] if args else kwargs["hidden_states"]

    for m in model.modules():
        if any(v.name == "moh" for v in getattr(m, "relattn_variants", ())):
            m.register_forward_pre_hook(hook, with_kwargs=True)
    return model


def softmax(xs):
    top = max(xs)
    e = [math.exp(x - top) for x in xs]
    return [x / sum(e) for x in e]


def reference_weights(module, x, q):
    """(B, Q, H) head weights by the official MoH code's formulas, token by token."""
    moh = next(v for v in module.relattn_variants if v.name == "moh")
    batch, heads, q_len, _ = q.shape
    spec = moh.shared_heads
    if isinstance(spec, dict):
        shared = sorted(spec[module.layer_idx])
    elif isinstance(spec, float):
        shared = list(range(int(heads * spec + 1e-9)))
    elif isinstance(spec, int):
        shared = list(range(spec))
    else:
        shared = sorted(spec)
    routed = [h for h in range(heads) if h not in shared]
    picks = int(heads * moh.active_heads + 0.5) - len(shared)  # active heads: nearest count
    out = torch.zeros(batch, q_len, heads, dtype=torch.float64)
    for b in range(batch):
        for t in range(q_len):
            xt = x[b, t].detach().double()
            w = {}
            if picks > 0:
                if moh.router == "learned":
                    logits = [float(module.relattn_moh_routed.weight[e].detach().double() @ xt) for e in range(len(routed))]
                else:
                    norms = [float(q[b, h, t].double().norm()) for h in routed]
                    mean = sum(norms) / len(norms)
                    std = math.sqrt(sum((n - mean) ** 2 for n in norms) / (len(norms) - 1)) if len(norms) > 1 else 1.0
                    logits = [n / std for n in norms]
                g = softmax(logits)
                top = sorted(range(len(routed)), key=lambda e: -g[e])[:picks]
                total = sum(g[e] for e in top)
                for e in top:
                    w[routed[e]] = g[e] / total * picks if moh.router == "learned" else 1.0
            for i, h in enumerate(shared):
                if moh.router == "learned" and len(shared) > 1:
                    s = softmax([float(module.relattn_moh_shared.weight[j].detach().double() @ xt) for j in range(len(shared))])
                    w[h] = s[i] * len(shared)
                else:
                    w[h] = 1.0
            if moh.router == "learned" and shared and picks > 0:
                a = softmax([float(module.relattn_moh_mix.weight[j].detach().double() @ xt) for j in range(2)])
                for h in w:
                    w[h] *= 2 * (a[0] if h in shared else a[1])
            for h, value in w.items():
                out[b, t, h] = value
    return out


def moh_reference(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    attn = materialized_attention(query, key, value, scale, causal=module.is_causal and attention_mask is None, allowed=attention_mask)
    weights = reference_weights(module, INPUTS[id(module)], query)
    return (attn.transpose(1, 2) * weights[..., None]).to(query.dtype).contiguous(), None


AttentionInterface.register(REF, moh_reference)
AttentionMaskInterface.register(REF, sdpa_mask)


def model_of(family, **options):
    base = {"llama": lambda: tiny_llama(heads=6, kv_heads=3), "bert": lambda: tiny_bert(), "vit": lambda: tiny_vit()}[family]()
    return keep_inputs(hf_relattn.convert(base, "moh", **options))


def inputs_of(family, padded):
    torch.manual_seed(3)
    if family == "vit":
        return {"pixel_values": torch.randn(2, 1, 16, 16)}
    ids = torch.randint(3, 90, (2, 19))
    mask = torch.ones_like(ids)
    if padded:
        if family == "llama":
            mask[1, :4] = 0
        else:
            mask[1, 15:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def valid_rows(family, padded):
    if not padded or family == "vit":
        return [(0, slice(None)), (1, slice(None))]
    return [(0, slice(None)), (1, slice(4, None) if family == "llama" else slice(0, 15))]


def outputs(model, inputs, grad: bool):
    with torch.set_grad_enabled(grad):
        out = model(**inputs, output_hidden_states=True)
    return (out.logits if out.logits.dim() == 3 else out.hidden_states[-1]).detach()


CASES = [
    ("llama", {"router": "query_norm", "active_heads": 0.84, "shared_heads": 0.5}),
    ("llama", {"router": "learned", "active_heads": 0.5, "shared_heads": 1}),
    ("llama", {"router": "learned", "active_heads": 0.84, "shared_heads": [1, 4]}),
    ("bert", {"router": "learned", "active_heads": 0.75, "shared_heads": 0}),
    ("bert", {"router": "query_norm", "active_heads": 0.75, "shared_heads": 0.25}),
    ("vit", {"router": "learned", "active_heads": 0.5, "shared_heads": 0.25}),
]


@pytest.mark.parametrize("family, options", CASES, ids=[f"{f}-{o['router']}-{o['active_heads']}" for f, o in CASES])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("rows", [4, 512])
def test_routed_heads_match_the_official_formulas(family, options, padded, rows, monkeypatch):
    """Both engine paths (gathered inference, by windows / runs of `rows` tokens; masked dense
    with autograd) equal the materialised attention times the weights computed here from the
    official formulas."""
    if family == "vit" and padded:
        pytest.skip("images have no padding")
    monkeypatch.setattr(moh_module, "ROUTED_QUERY_ROWS", rows)
    monkeypatch.setattr(moh_module, "ROUTED_WINDOW", rows)
    model = model_of(family, **options)
    torch.manual_seed(5)
    for m in model.modules():  # non-trivial learned gates
        for name in ("relattn_moh_routed", "relattn_moh_shared", "relattn_moh_mix"):
            if hasattr(m, name):
                torch.nn.init.normal_(getattr(m, name).weight, std=0.3)
    inputs = inputs_of(family, padded)
    expected = run_with_attention(model, REF, **inputs)
    gathered, dense = outputs(model, inputs, grad=False), outputs(model, inputs, grad=True)
    for b, kept in valid_rows(family, padded):
        torch.testing.assert_close(gathered[b, kept], expected[b, kept], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(dense[b, kept], expected[b, kept], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "bert", "vit"])
@pytest.mark.parametrize("router", ["learned", "query_norm"])
def test_all_heads_active_conversion_is_the_original_model(family, router):
    """active_heads=1.0 computes the original model straight from the conversion (the learned
    router starts at zero then: nothing to choose, every weight exactly 1)."""
    base = {"llama": lambda: tiny_llama(heads=6, kv_heads=3), "bert": tiny_bert, "vit": tiny_vit}[family]
    inputs = inputs_of(family, padded=True)
    original = outputs(base(), inputs, grad=False)
    model = hf_relattn.convert(base(), "moh", router=router, active_heads=1.0, shared_heads=0.5)
    for grad in (False, True):
        got = outputs(model, inputs, grad)
        for b, rows in valid_rows(family, True):
            torch.testing.assert_close(got[b, rows], original[b, rows], atol=1e-6, rtol=1e-6)


def test_query_norm_straight_through_gradient():
    """Forward: binary weights; backward: the gradient of the softmax of std-normalised query
    norms (written here) with respect to the queries."""
    model = hf_relattn.convert(tiny_llama(heads=6, kv_heads=3), "moh", router="query_norm", active_heads=0.5, shared_heads=2)
    module = model.model.layers[0].self_attn
    moh = module.relattn_variants[-1]
    torch.manual_seed(0)
    q = torch.randn(2, 6, 5, 16, requires_grad=True)
    c = torch.randn(2, 5, 6)
    weights, used = moh.head_weights(module, q, None)
    assert set(weights.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(weights.detach().bool(), used)
    assert used[..., :2].all() and (used[..., 2:].sum(-1) == 1).all()
    (grad,) = torch.autograd.grad((weights * c).sum(), q)
    q2 = q.detach().clone().requires_grad_(True)
    norms = q2[:, 2:].norm(dim=-1).transpose(1, 2)
    gates = torch.softmax(norms / norms.std(dim=-1, keepdim=True), dim=-1)
    (expected,) = torch.autograd.grad((gates * c[..., 2:]).sum(), q2)
    torch.testing.assert_close(grad, expected)


def test_load_balance_loss_hand_computed():
    gates = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]])
    hard = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    # P = (0.3, 0.45, 0.25), f = (0.5, 0.5, 0): 3 * (0.15 + 0.225) = 1.125
    assert _balance_loss(gates, hard, None).item() == pytest.approx(1.125)
    # the padding token (second) is left out: P = gates[0], f = (1, 0, 0): 3 * 0.5
    assert _balance_loss(gates, hard, torch.tensor([[True, False]])).item() == pytest.approx(1.5)


@pytest.mark.parametrize("router", ["learned", "query_norm"])
def test_aux_loss_is_added_to_the_loss_in_training_only(router):
    model = hf_relattn.convert(tiny_llama(heads=6, kv_heads=3), "moh", router=router, aux_loss_coef=0.5)
    layers = [layer.self_attn for layer in model.model.layers]
    collected = []  # the call's list of per-layer terms (it travels in the keyword arguments)
    layers[-1].register_forward_hook(lambda mod, a, k, o: collected.append(list(k.get("relattn_moh_aux", []))), with_kwargs=True)
    ids = torch.randint(3, 90, (2, 12))
    model.train()
    out = model(input_ids=ids, labels=ids)
    logits = out.logits.float()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    per_layer = collected.pop()
    assert len(per_layer) == len(layers)
    expected_aux = 0.5 * torch.stack(per_layer).mean()
    torch.testing.assert_close(out.loss, ce + expected_aux)
    torch.testing.assert_close(moh_aux_loss(out), expected_aux)
    out.loss.backward()  # the aux term has gradients into the router / queries
    assert all(p.grad is not None for n, p in model.named_parameters() if "moh" in n)
    model.eval()
    out = model(input_ids=ids, labels=ids)
    assert moh_aux_loss(out).item() == 0.0
    logits = out.logits.float()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ce)


@pytest.mark.parametrize("router", ["learned", "query_norm"])
def test_decoding_equals_full_forward_and_save_load(router, tmp_path):
    model = model_of("llama", router=router, active_heads=0.5, shared_heads=1)
    ids = torch.randint(3, 90, (1, 9))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :6], use_cache=True)
        steps = [out.logits]
        cache = out.cache
        for t in range(6, 9):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, full)
    assert loaded.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 12)


@pytest.mark.parametrize("other, options", [("gqa", {"num_key_value_heads": 1}), ("sliding_window", {"window": 4, "block_size": 4}),
                                            ("shaw", {"max_distance": 3})])
def test_composes_gating_on_top_of_other_variants(other, options):
    """The first layer's head outputs (o_proj input) are those of the model without MoH, times
    the reference weights."""
    plain = hf_relattn.convert(tiny_llama(heads=6, kv_heads=3), other, **options)
    torch.manual_seed(1)
    for p in plain.parameters():  # relation tables start at zero: make them matter
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.5)
    model = keep_inputs(hf_relattn.convert(tiny_llama(heads=6, kv_heads=3), other, **options))
    model.load_state_dict(plain.state_dict())
    model = keep_inputs(hf_relattn.convert(model, "moh", router="learned", active_heads=0.5, shared_heads=1))
    torch.nn.init.normal_(model.model.layers[0].self_attn.relattn_moh_routed.weight, std=0.3)
    ids = torch.randint(3, 90, (1, 13))
    seen = {}

    def grab(name):
        return lambda mod, args: seen.__setitem__(name, args[0].detach())

    plain.model.layers[0].self_attn.o_proj.register_forward_pre_hook(grab("plain"))
    attn = model.model.layers[0].self_attn
    attn.o_proj.register_forward_pre_hook(grab("moh"))
    captured = {}
    attn.register_forward_pre_hook(lambda mod, args, kwargs: captured.__setitem__("x", kwargs.get("hidden_states", args[0] if args else None)), with_kwargs=True)
    q_seen = {}
    attn.q_proj.register_forward_hook(lambda mod, args, out: q_seen.__setitem__("q", out))
    with torch.no_grad():
        plain(ids)
        model(ids)
    q = q_seen["q"].view(1, 13, 6, 16).transpose(1, 2)
    weights = reference_weights(attn, captured["x"], q).float()
    expected = seen["plain"].view(1, 13, 6, 16) * weights[..., None]
    torch.testing.assert_close(seen["moh"].view(1, 13, 6, 16), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("options, message", [
    ({"active_heads": 0}, "active_heads must be a number in (0, 1]"),
    ({"active_heads": 1.5}, "active_heads must be a number in (0, 1]"),
    ({"active_heads": "half"}, "active_heads must be a number in (0, 1]"),
    ({"router": "topk"}, "router must be one of 'learned', 'query_norm'; got 'topk'"),
    ({"shared_heads": 5, "active_heads": 0.5}, "fewer than its 5 shared heads"),
    ({"shared_heads": 7}, "shared_heads=7 but layer 0 has 6 heads"),
    ({"shared_heads": [0, 0]}, "distinct head indices in 0..5"),
    ({"shared_heads": [6]}, "distinct head indices in 0..5"),
    ({"shared_heads": "importance"}, "needs batches="),
    ({"batches": [{}], "shared_heads": 2}, "only used with shared_heads='importance'"),
    ({"batches": [{}]}, "input_ids, inputs_embeds or pixel_values"),
    ({"aux_loss_coef": -1}, "aux_loss_coef must be a number in [0, 1000000.0]"),
    ({"heads": 3}, "Unknown option"),
])
def test_invalid_options_raise_before_modifying(options, message):
    model = tiny_llama(heads=6, kv_heads=3)
    before = state_copy(model)
    with pytest.raises(ValueError, match=re.escape(message)):
        hf_relattn.convert(model, "moh", **options)
    assert_same_state(before, model)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_shared_heads_by_importance(tmp_path):
    """shared_heads="importance": per layer the top half by head_importance (Michel et al. 2019),
    recorded in the config as {layer: [heads]} and restored on load."""
    torch.manual_seed(4)
    ids = torch.randint(3, 90, (2, 15))
    batch = {"input_ids": ids, "labels": ids}
    model = tiny_llama(heads=6, kv_heads=3)
    scores = hf_relattn.head_importance(model, batch)
    expected = {layer: sorted(torch.argsort(row, descending=True)[:3].tolist()) for layer, row in enumerate(scores)}
    assert len({tuple(v) for v in expected.values()} | {(0, 1, 2)}) > 1  # not just the first half
    hf_relattn.convert(model, "moh", shared_heads="importance", batches=[batch], router="query_norm")
    entry = model.config.relattn["variants"][-1]
    assert entry["options"]["shared_heads"] == expected and "batches" not in entry["options"]
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits)


def test_importance_without_labels_leaves_the_model_unchanged():
    model = tiny_llama(heads=6, kv_heads=3)
    before = state_copy(model)
    with pytest.raises(ValueError, match="labels"):
        hf_relattn.convert(model, "moh", shared_heads="importance", batches=[{"input_ids": torch.ones(1, 4, dtype=torch.long)}])
    assert_same_state(before, model)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_shared_heads_default_is_importance_with_batches():
    from hf_relattn import head_importance

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 97, (2, 12), generator=gen)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    scores = head_importance(tiny_llama(heads=6, kv_heads=3), batches)
    model = hf_relattn.convert(tiny_llama(heads=6, kv_heads=3), "moh", batches=batches)
    saved = model.config.relattn["variants"][0]["options"]
    assert "batches" not in saved
    expected = {layer: sorted(torch.argsort(scores[layer], descending=True, stable=True)[:3].tolist()) for layer in range(2)}
    assert {int(k): v for k, v in saved["shared_heads"].items()} == expected
    plain = hf_relattn.convert(tiny_llama(heads=6, kv_heads=3), "moh")
    assert plain.config.relattn["variants"][0]["options"]["shared_heads"] == 0.5


def test_learned_router_with_only_shared_heads_active_runs():
    """A layer whose shared heads fill the active count (2 heads, active_heads=0.5, one shared)
    has no router and no input hook: it runs (it raised 'called without its input'), the shared
    head at weight 1 and the other off."""
    model = tiny_llama(heads=2)
    ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    hf_relattn.convert(model, "moh", router="learned", active_heads=0.5, shared_heads=1)
    attn = model.model.layers[0].self_attn
    assert not any(name.startswith("relattn_moh") for name in attn._modules)
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    weights, used = moh_module.MoH(router="learned", active_heads=0.5, shared_heads=1).head_weights(
        attn, torch.randn(1, 2, 6, 16), None)
    assert used[..., 0].all() and not used[..., 1].any() and (weights[..., 0] == 1).all()


@pytest.mark.parametrize("router", ["learned", "query_norm"])
def test_shared_heads_by_layer_on_modules_without_layer_idx(router):
    """shared_heads={layer: [heads]} on ViT, whose attention modules have no layer_idx: each layer
    shares the heads named for it (they were looked up under None: no shared heads, and the
    learned router, sized for the named ones, failed)."""
    model = tiny_vit(heads=4)
    hf_relattn.convert(model, "moh", router=router, active_heads=0.75, shared_heads={0: [1, 2], 1: [3]})
    pixels = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(pixel_values=pixels).logits).all()
    variant = next(v for v in model.vit.layers[0].attention.relattn_variants if v.name == "moh")
    for layer, shared in ((0, [1, 2]), (1, [3])):
        attn = model.vit.layers[layer].attention
        _, used = variant.head_weights(attn, torch.randn(2, 4, 17, 8), None, {"relattn_layer_input": torch.randn(2, 17, 32)})
        assert used[..., shared].all() and used.sum(-1).eq(3).all()
