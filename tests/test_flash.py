"""FlashAttention over key windows on the CPU kernels (`hf_relattn.ops.flash`), forward and backward.

References written here: softmax over the band |i - j| (causal: 0 <= i - j < W) plus the first
`sinks` keys and a sink logit in every denominator, materialised in float64 with autograd; and
the model's own reference path. Memory: what a forward keeps for its backward is O(T) (the
saved tensors' bytes against the inputs'), not the (rows x keys) probabilities.
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import tiny_llama

import hf_relattn
from hf_relattn.ops import flash


def materialised(q, k, v, before, after, sinks, logit, scale):
    """Dense softmax over the band's pairs (and the sinks), float64."""
    length = q.shape[2]
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    keep = (j - i >= -before) & (j - i <= after)
    if sinks:
        keep = keep | (j < sinks) & ((j <= i) if after == 0 else True)
    return softmax_over(q, k, v, keep, logit, scale)


def softmax_over(q, k, v, keep, logit, scale):
    """softmax(q k^T * scale) v over the pairs `keep` (T, T) allows, with a zero key scoring each
    head's `logit` when given; float64."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(groups, 1) for t in (k, v))
    scores = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
    if logit is not None:  # a zero key scoring the head's logit
        scores = torch.cat([scores, logit.double().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)], -1)
        v = torch.cat([v, torch.zeros_like(v[:, :, :1])], 2)
    return torch.softmax(scores, -1) @ v


def qkv_logit(gen, length, heads, kv_heads, dtype, with_logit):
    """q, k, v of 2 samples in transformers' layout ((B, T, H, D) memory seen as (B, H, T, D)),
    16-dim heads, and a sink logit per head (or None), all requiring gradients."""
    q, k, v = (torch.randn(2, length, h, 16, generator=gen, dtype=dtype).transpose(1, 2).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    return q, k, v, (torch.randn(heads, generator=gen).requires_grad_() if with_logit else None)


CASES = {  # length, heads, K/V heads, before, after, sinks, sink logit, rows
    "causal-gqa": (100, 4, 2, 20, 0, 0, False, 16),
    "causal-sinks-logit": (130, 6, 3, 33, 0, 4, True, 32),
    "bidirectional-sinks": (77, 2, 1, 9, 9, 2, False, 8),
    "window-longer-than-sequence": (40, 2, 2, 70, 0, 0, False, 16),
}


@pytest.mark.parametrize("chunk", [None, 1], ids=["whole", "block-by-block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_band_outputs_and_gradients_equal_the_materialised_formula(case, dtype, chunk, monkeypatch):
    """Every case in one kernel call per piece, and one query block per call (the chunking of
    long sequences)."""
    if chunk is not None:
        monkeypatch.setattr(flash, "FLASH_CHUNK_ELEMENTS", chunk)
    length, heads, kv_heads, before, after, sinks, with_logit, rows = CASES[case]
    gen = torch.Generator().manual_seed(0)
    q, k, v, logit = qkv_logit(gen, length, heads, kv_heads, dtype, with_logit)
    out = flash.band_attention(q, k, v, before, after, sinks, logit, 0.25, rows)
    want = materialised(q, k, v, before, after, sinks, logit, 0.25)
    grad = torch.randn(out.shape, generator=gen, dtype=dtype)
    inputs = (q, k, v) + ((logit,) if with_logit else ())
    got_grads = torch.autograd.grad(out, inputs, grad)
    want_grads = torch.autograd.grad(want, inputs, grad.double())
    tol = {"atol": 2e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), want, **tol)
    for name, got, expected in zip("qkvl", got_grads, want_grads):
        torch.testing.assert_close(got.double(), expected.double(), **tol, msg=lambda m, n=name: f"d{n}: {m}")


def assert_matches(out, want, inputs, gen):
    """`out` and the gradients it gives `inputs` equal the float64 reference's (to bf16's
    precision for bf16 inputs)."""
    tol = {"atol": 2e-6, "rtol": 1e-5} if out.dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    assert out.dtype == inputs[0].dtype
    grad = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    for got, expected in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(want, inputs, grad.double())):
        torch.testing.assert_close(got.double(), expected.double(), **tol)
    torch.testing.assert_close(out.double(), want, **tol)


POWER_CASES = {  # length, block, window, heads, K/V heads, sink logit
    "gqa": (200, 8, 20, 4, 2, False),
    "logit": (256, 16, 40, 2, 1, True),
    "window-one-block-odd-length": (131, 8, 8, 2, 2, False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(POWER_CASES))
def test_power_pieces_equal_the_materialised_pattern(case, dtype):
    """PowerAttention on the flash kernels (local window piece + gathered far blocks) against the
    softmax over the pairs `Power.reads` keeps, causal, float64: outputs and gradients."""
    from hf_relattn.variants.power import Power, power_attention

    length, block, window, heads, kv_heads, with_logit = POWER_CASES[case]
    variant = Power(block_size=block, window=window, sinks=0)
    gen = torch.Generator().manual_seed(0)
    q, k, v, logit = qkv_logit(gen, length, heads, kv_heads, dtype, with_logit)
    out = power_attention(variant, q, k, v, logit, 0.25)
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    keep = variant.reads(i, j // block, True) & (j <= i)
    assert_matches(out, softmax_over(q, k, v, keep, logit, 0.25), (q, k, v) + ((logit,) if with_logit else ()), gen)


STRIDED_CASES = {  # length, stride, heads, K/V heads, causal, sinks, sink logit
    "causal-gqa": (300, 16, 4, 2, True, 0, False),
    "causal-sinks-logit": (300, 16, 4, 2, True, 3, True),
    "bidirectional-sinks": (200, 24, 2, 1, False, 2, False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 1], ids=["whole", "block-by-block"])
@pytest.mark.parametrize("case", list(STRIDED_CASES))
def test_strided_pieces_equal_the_materialised_pattern(case, chunk, dtype, monkeypatch):
    """Child et al.'s strided pattern on the flash kernels (band windows + residue classes) against
    the softmax over the pairs `Strided.allowed` keeps (and the sinks), float64."""
    from hf_relattn.variants.strided import Strided, strided_flash

    monkeypatch.setattr(flash, "FLASH_ROWS", 8)
    if chunk is not None:
        monkeypatch.setattr(flash, "FLASH_CHUNK_ELEMENTS", chunk)
    length, stride, heads, kv_heads, causal, sinks, with_logit = STRIDED_CASES[case]
    gen = torch.Generator().manual_seed(0)
    q, k, v, logit = qkv_logit(gen, length, heads, kv_heads, dtype, with_logit)
    out = strided_flash(q, k, v, stride, causal, sinks, logit, 0.25)
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    keep = Strided(stride=stride).allowed(None, i, j, length, causal=causal) | (j < sinks)
    keep = keep & (j <= i) if causal else keep
    assert_matches(out, softmax_over(q, k, v, keep, logit, 0.25), (q, k, v) + ((logit,) if with_logit else ()), gen)


FIXED_CASES = {  # length, block, summary, heads, K/V heads, sinks, sink logit
    "gqa": (300, 32, 8, 4, 2, 0, False),
    "sinks-logit-ragged": (250, 24, 9, 2, 1, 3, True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(FIXED_CASES))
def test_fixed_pieces_equal_the_materialised_pattern(case, dtype):
    """Child et al.'s fixed pattern on the flash kernels (own blocks causal + gathered summaries)
    against the softmax over the pairs `Fixed.allowed` keeps (and the sinks), causal, float64."""
    from hf_relattn.variants.fixed import Fixed, fixed_flash

    length, block, summary, heads, kv_heads, sinks, with_logit = FIXED_CASES[case]
    gen = torch.Generator().manual_seed(0)
    q, k, v, logit = qkv_logit(gen, length, heads, kv_heads, dtype, with_logit)
    out = fixed_flash(q, k, v, block, summary, sinks, logit, 0.25)
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    keep = (Fixed(block=block, summary=summary).allowed(None, i, j, length, causal=True) | (j < sinks)) & (j <= i)
    assert_matches(out, softmax_over(q, k, v, keep, logit, 0.25), (q, k, v) + ((logit,) if with_logit else ()), gen)


def moba_keep(q, k, block, top_k, gate, sinks):
    """(B, H, T, T) pairs MoBA keeps, written from the paper: token i (head h) reads its own key
    block causally and the top_k - 1 earlier blocks whose mean key scores highest against its
    query (`gate="block"`: against its query block's mean query), plus the first `sinks` keys."""
    length = q.shape[2]
    groups = q.shape[1] // k.shape[1]
    nb = -(-length // block)
    means = torch.stack([k[:, :, j * block : (j + 1) * block].float().mean(2) for j in range(nb)], 2)
    gater = q.float()
    if gate == "block":
        gater = torch.cat([q[:, :, j * block : (j + 1) * block].float().mean(2, keepdim=True)
                           .expand(-1, -1, min(block, length - j * block), -1) for j in range(nb)], 2)
    scores = gater @ means.repeat_interleave(groups, 1).transpose(-1, -2)  # (B, H, T, nb)
    own = torch.arange(length)[:, None] // block
    scores = scores.masked_fill(torch.arange(nb)[None, :] >= own, float("-inf"))
    chosen = torch.arange(nb)[None, :] == own
    if top_k > 1:
        top = scores.topk(min(top_k - 1, nb), dim=-1)
        chosen = chosen | torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top.indices, ~top.values.isneginf())
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    return (chosen[..., j // block].squeeze(-2) | (j < sinks)) & (j <= i)


MOBA_CASES = {  # length, block, top_k, gate, heads, K/V heads, sinks, sink logit
    "token-gqa-ragged": (150, 16, 3, "token", 4, 2, 0, False),
    "token-sinks-logit": (128, 16, 4, "token", 2, 1, 3, True),
    "token-top1-sinks": (100, 16, 1, "token", 2, 2, 2, False),
    "block-gqa-sinks": (150, 16, 3, "block", 4, 2, 2, True),
}


@pytest.mark.parametrize("fill", [0.0, 2.0], ids=["backward-all-heads", "backward-per-head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(MOBA_CASES))
def test_moba_pieces_equal_the_materialised_pattern(case, dtype, fill, monkeypatch):
    """MoBA on the flash kernels (own blocks causal, the chosen blocks key block by key block over
    the rows that chose them, sinks) against the softmax over the pairs the paper's gate keeps,
    written in `moba_keep`, float64: outputs and gradients, the backward's calls taking every
    head's rows of a block at once (padded) or one head at a time."""
    from hf_relattn.variants.moba import MoBA, moba_attention

    monkeypatch.setattr(flash, "PICKS_SHARED_FILL", fill)

    length, block, top_k, gate, heads, kv_heads, sinks, with_logit = MOBA_CASES[case]
    gen = torch.Generator().manual_seed(0)
    q, k, v, logit = qkv_logit(gen, length, heads, kv_heads, dtype, with_logit)
    out = moba_attention(MoBA(block_size=block, top_k=top_k, gate=gate, sinks=sinks), q, k, v, sinks, logit, 0.25)
    keep = moba_keep(q.detach(), k.detach(), block, top_k, gate, sinks)
    assert keep.sum() < 0.8 * q.shape[0] * heads * length * (length + 1) / 2  # sparser than causal
    assert_matches(out, softmax_over(q, k, v, keep, logit, 0.25), (q, k, v) + ((logit,) if with_logit else ()), gen)


def counted_flash_model(variant, options, monkeypatch):
    """A converted tiny LLaMA (GQA 4/2, training mode, sink logits drawn away from their neutral
    start) whose flash kernels serve any length, and the list its PieceAttention calls append to."""
    monkeypatch.setattr(flash, "FLASH_MIN_TOKENS", 0)
    calls = []
    apply = flash.PieceAttention.apply
    monkeypatch.setattr(flash.PieceAttention, "apply", lambda *a: calls.append(1) or apply(*a))
    options = {"block_size": 8, **options} if variant != "fixed" else options
    model = hf_relattn.convert(tiny_llama(kv_heads=2), variant, **options).train()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "relattn" in name:
                param.normal_(0, 1.0)
    return model, calls


@pytest.mark.parametrize("variant, options", [
    ("sliding_window", {"window": 24, "sinks": 0}),
    ("sliding_window", {"window": 17, "sinks": 3, "sink_logit": True}),
    ("power", {"window": 12, "sinks": 2, "sink_logit": True}),
    ("strided", {"stride": 8, "sinks": 2, "sink_logit": True}),
    ("fixed", {"block": 16, "summary": 4, "sinks": 2, "sink_logit": True}),
    ("moba", {"gate": "block", "top_k": 3, "sinks": 0}),
    ("moba", {"gate": "block", "top_k": 4, "sinks": 3, "sink_logit": True}),
    ("moba", {"gate": "token", "top_k": 3, "sinks": 0}),
    ("moba", {"gate": "token", "top_k": 4, "sinks": 3, "sink_logit": True}),
    ("moba", {"gate": "token", "top_k": 1, "sinks": 2}),
    ("moba", {"gate": "block", "top_k": 1, "sinks": 2}),
])
def test_model_path_runs_the_flash_kernels_and_equals_the_reference(variant, options, monkeypatch):
    """A converted LLaMA (GQA 4/2) at 70 tokens: the default path takes the flash kernels
    (counted) and its logits and every gradient equal the materialised reference path's."""
    model, calls = counted_flash_model(variant, options, monkeypatch)
    ids = torch.randint(3, 97, (2, 70), generator=torch.Generator().manual_seed(1))

    def run():
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    got, got_grads = run()
    assert calls, "the flash kernels did not run"
    with hf_relattn.force_implementation("reference"):
        want, want_grads = run()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("pattern", ["window", "moba-token"])
def test_what_the_forward_keeps_for_the_backward_is_linear_in_length(pattern):
    """At 4,096 tokens the tensors kept for the backward (saved tensors, and the plan's index
    tensors on the autograd node) are the inputs, the output, its log-sum-exp and O(T) indices:
    under 3x the inputs' bytes. The probabilities of the kept pairs alone would be 8x the queries'
    bytes for a 512-token window with 64-dim heads, and about 18x for MoBA 512/top-3 (each row
    reads up to 1,536 keys)."""
    from hf_relattn.variants.moba import MoBA, moba_attention

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 4096, 64, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 2, 4096, 64, generator=gen, requires_grad=True) for _ in range(2))
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        if pattern == "window":
            out = flash.band_attention(q, k, v, 511, 0, 4, None, 0.125, 64)
        else:
            out = moba_attention(MoBA(block_size=512, top_k=3, gate="token"), q, k, v, 4, None, 0.125)
    node = out.grad_fn
    while not hasattr(node, "plan"):  # the PieceAttention node under the slice of whole blocks
        node = node.next_functions[0][0]
    plans = node.plan if isinstance(node.plan[0], tuple) else [node.plan]
    for piece in (piece for plan in plans for piece in plan):
        for t in [getattr(piece, f, None) for f in ("mask", "empty", "index", "slot")] + list(getattr(piece, "rows", ())):
            if isinstance(t, torch.Tensor):
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    inputs = sum(t.numel() * t.element_size() for t in (q, k, v))
    assert sum(saved.values()) < 3 * inputs, (sum(saved.values()), inputs)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate, chunk", [("token", 1), ("token", 3), ("block", 1)])
def test_moba_decoding_steps_equal_the_reference(gate, chunk, dtype, monkeypatch):
    """MoBA decoding from a KV cache (`moba.decode_attention`: one pass over K and V, the gate from
    the scores' block means), with sinks, a sink logit and GQA 4/2: the logits of steps of `chunk`
    tokens equal the same steps on the materialised reference path, and (per-token gate, where a
    step chooses as the full forward does) the full forward's."""
    from hf_relattn.variants import moba

    calls = []
    decode = moba.decode_attention
    monkeypatch.setattr(moba, "decode_attention", lambda *a: calls.append(a[1].shape[2]) or decode(*a))
    model = hf_relattn.convert(tiny_llama(kv_heads=2), "moba", block_size=4, top_k=3, gate=gate, sinks=2, sink_logit=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "relattn" in name:
                param.normal_(0, 1.0)
    model = model.to(dtype)
    ids = torch.randint(3, 97, (1, 30), generator=torch.Generator().manual_seed(2))

    def decoded():
        with torch.no_grad():
            out = model(ids[:, :9], use_cache=True)
            steps = [out.logits[:, -1:]]
            for t in range(9, ids.shape[1] - chunk + 1, chunk):
                out = model(ids[:, t : t + chunk], cache=out.cache, use_cache=True)
                steps.append(out.logits)
        return torch.cat(steps, 1).float()

    got = decoded()
    assert calls and set(calls) == {chunk}, calls
    with hf_relattn.force_implementation("reference"):
        want = decoded()
        with torch.no_grad():
            full = model(ids).logits.float()
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 5e-2}
    torch.testing.assert_close(got, want, **tol)
    if gate == "token":
        torch.testing.assert_close(got, full[:, 8 : 8 + got.shape[1]], **tol)


PADDED_CASES = [
    ("sliding_window", {"window": 17, "sinks": 3, "sink_logit": True}),
    ("power", {"window": 12, "sinks": 2}),
    ("strided", {"stride": 8, "sinks": 2}),
    ("fixed", {"block": 16, "summary": 4, "sinks": 2}),
    ("moba", {"gate": "block", "top_k": 3, "sinks": 2, "sink_logit": True}),
    ("moba", {"gate": "token", "top_k": 3, "sinks": 0}),
]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("variant, options", PADDED_CASES)
def test_padded_batches_run_each_sample_alone_on_the_flash_kernels(variant, options, side, monkeypatch):
    """A padded batch of a converted LLaMA (70, 45 and 70 tokens): each sample's tokens run on
    the flash kernels unmasked (one kernel call per layer and distinct run), and the real tokens'
    logits and every parameter gradient (loss on real tokens) equal the reference path's, which
    applies the padding mask to the materialised pattern."""
    model, calls = counted_flash_model(variant, options, monkeypatch)
    width, lengths = 70, [70, 45, 70]
    ids = torch.randint(3, 97, (3, width), generator=torch.Generator().manual_seed(1))
    real = torch.zeros(3, width, dtype=torch.bool)
    for b, n in enumerate(lengths):
        real[b, :n] = True
    if side == "left":
        real = real.flip(-1)
    ids = ids.masked_fill(~real, 0)
    inputs = {"input_ids": ids, "attention_mask": real.long(), "labels": ids.masked_fill(~real, -100)}
    if side == "left":  # as generate() numbers a left-padded batch
        inputs["position_ids"] = (real.long().cumsum(-1) - 1).clamp(min=0)

    def run():
        model.zero_grad()
        out = model(**inputs)
        out.loss.backward()
        return out.logits.detach()[real], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    got, got_grads = run()
    assert len(calls) == 2 * 2, "each layer runs the two distinct runs of tokens on the flash kernels"
    with torch.inference_mode():  # an inference mask (no version counter): checked in every layer
        torch.testing.assert_close(model(**inputs).logits[real], got, atol=1e-5, rtol=1e-5)
    assert len(calls) == 4 * 2
    with hf_relattn.force_implementation("reference"):
        want, want_grads = run()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("check_rows", [1024, 5])
def test_padding_runs_take_only_masks_that_are_nothing_but_padding(check_rows, monkeypatch):
    """`padding_runs` reads each sample's run of tokens from a mask that is only padding (left,
    right, bidirectional, a sample without tokens) and refuses any other mask: a hole inside a
    run, a query seeing a padding key, packed documents, a native window; a mask changed in
    place after a check is checked again. Rows checked all at once and 5 at a time."""
    from hf_relattn import call as call_module
    from hf_relattn.call import AttnCall, padding_runs

    monkeypatch.setattr(call_module, "CHECK_ROWS", check_rows)

    length = 12

    def call_of(mask, causal=True):
        k = torch.zeros(mask.shape[0], 1, length, 4)
        return AttnCall.of(k[:, :, length - mask.shape[-2]:], k, k, mask, causal=causal, scale=1.0)

    def padded(lengths, side, causal=True):
        real = torch.tensor([[i < n for i in range(length)] for n in lengths])
        real = real.flip(-1) if side == "left" else real
        tril = torch.ones(length, length, dtype=torch.bool).tril() if causal else torch.ones(length, length, dtype=torch.bool)
        return (tril[None] & real[:, None, :])[:, None]  # transformers' padding: on keys only

    assert padding_runs(call_of(padded([12, 5], "right"))) == [(0, 5, [1]), (0, 12, [0])]
    assert padding_runs(call_of(padded([12, 5, 5], "left"))) == [(0, 12, [0]), (7, 12, [1, 2])]
    assert padding_runs(call_of(padded([9, 0], "right", causal=False), causal=False)) == [(0, 0, [1]), (0, 9, [0])]
    hole = padded([12, 12], "right")
    hole[1, 0, 6:, 3] = False
    assert padding_runs(call_of(hole)) is None
    sees_pad = padded([12, 5], "right")
    sees_pad[1, 0, 8, 7] = True
    assert padding_runs(call_of(sees_pad)) is None
    packed = padded([12], "right")
    packed[0, 0, 6:, :6] = False  # two documents of 6 tokens
    assert padding_runs(call_of(packed)) is None
    window = padded([12], "right") & ~torch.ones(length, length, dtype=torch.bool).tril(-4)
    assert padding_runs(call_of(window)) is None
    # decoding steps (the last 1 or 3 queries of the keys): left padding only
    assert padding_runs(call_of(padded([12, 5], "left")[:, :, -1:])) == [(0, 12, [0]), (7, 12, [1])]
    assert padding_runs(call_of(padded([12, 11], "left")[:, :, -3:])) == [(0, 12, [0]), (1, 12, [1])]
    assert padding_runs(call_of(padded([12, 5], "right")[:, :, -1:])) is None
    step = padded([12, 5], "left")[:, :, -1:].clone()
    step[1, 0, 0, 9] = False  # a cached key hidden from the step
    assert padding_runs(call_of(step)) is None
    mask = padded([12, 5], "left")
    assert padding_runs(call_of(mask)) is not None
    mask[0, 0, 3, 9] = True  # in place, after the check
    assert padding_runs(call_of(mask)) is None


@pytest.mark.parametrize("variant, options", [
    ("fixed", {"block": 6, "summary": 4}), ("strided", {"stride": 5, "block_size": 4}),
    ("sliding_window", {"window": 3, "block_size": 8}), ("power", {"block_size": 3, "window": 1}),
    ("moba", {"block_size": 4, "top_k": 2, "gate": "token"}),
])
@pytest.mark.parametrize("sinks", [9, 17])
def test_sinks_beyond_the_first_block_equal_the_reference(variant, options, sinks, monkeypatch):
    """More sinks than a block holds (9 and 17 over blocks of 3-8 keys) at 37 tokens: the default
    path (flash kernels where they hold every sink, else the other paths) equals the reference.
    The fixed pattern's pieces held only block 0's sinks (0.05 off in the logits before)."""
    monkeypatch.setattr(flash, "FLASH_MIN_TOKENS", 0)
    model = hf_relattn.convert(tiny_llama(kv_heads=2), variant, sinks=sinks, **options)
    ids = torch.randint(3, 97, (1, 37), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(ids).logits
        with hf_relattn.force_implementation("reference"):
            want = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant, options", [
    ("moba", {"block_size": 4, "top_k": 2, "gate": "token", "sinks": 2, "sink_logit": True}),
    ("moba", {"block_size": 4, "top_k": 2, "gate": "block"}),
    ("power", {"block_size": 4, "window": 6, "sinks": 2}),
])
def test_left_padded_decoding_runs_each_sample_alone(variant, options, monkeypatch):
    """Greedy generation of a left-padded batch (21 and 13 prompt tokens, 6 new): every decoding
    step of a pattern placed at the samples' own positions runs each sample's keys alone,
    unmasked (MoBA then takes its one-pass decode path), and each sample's new tokens and their
    scores equal the sample generated alone."""
    from hf_relattn import call as call_module
    from hf_relattn.variants import moba as moba_module

    steps, decodes = [], []
    alone, decode = call_module.alone, moba_module.decode_attention
    monkeypatch.setattr(sys.modules["hf_relattn.variants.sparse_base"], "alone",
                        lambda c, *a: steps.append(c.lead) or alone(c, *a))
    monkeypatch.setattr(moba_module, "decode_attention", lambda *a: decodes.append(1) or decode(*a))
    model = hf_relattn.convert(tiny_llama(kv_heads=2), variant, **options)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 97, (n,), generator=gen) for n in (21, 13)]
    batch = torch.zeros(2, 21, dtype=torch.long)
    mask = torch.zeros(2, 21, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, 21 - len(p):], mask[i, 21 - len(p):] = p, 1
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "output_scores": True,
                "return_dict_in_generate": True}
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, **settings)
        assert sum(lead > 0 for lead in steps) == 5 * 2, "each decoding step of each layer ran the samples alone"
        assert bool(decodes) == (variant == "moba")
        for i, p in enumerate(prompts):
            single = model.generate(p[None], **settings)
            assert torch.equal(together.sequences[i, 21:], single.sequences[0, len(p):])
            for a, b in zip(together.scores, single.scores):
                torch.testing.assert_close(a[i], b[0], atol=1e-5, rtol=1e-5)
