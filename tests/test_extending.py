"""A new variant is one module plus one registry entry (README "How it is built"): the two cases
the architecture promises, written here as a user would in a module of their own, run through
convert, every engine path, the cache, padding, save/reload and the kernels benchmark with no
change to the library.

- a new pattern: StreamingLLM's window plus attention sinks (Xiao et al. 2024), only
  `token_blocks` and `allowed`; checked against the existing `sliding_window`, an independent
  implementation of the same rule, and against the materialised reference;
- a new kernel for an existing pattern: `sliding_window` whose self-attention runs as one masked
  SDPA call (`own_kernel`); checked against the original.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from transformers import AutoModelForCausalLM, DynamicCache

import hf_relattn
from hf_relattn.call import AttnCall, positions
from hf_relattn.kernels import suite_variants
from hf_relattn.variants.base import VARIANTS, check_int_options, register_variant
from hf_relattn.variants.sliding_window import SlidingWindow
from hf_relattn.variants.sparse_base import PatternVariant, block_range


@dataclass
class StreamingWindow(PatternVariant):
    """The last `window` tokens (causal) plus the first `sinks` tokens of the sample."""

    window: int = 4
    block_size: int = 2

    name = "test_streaming"
    flag = True
    description = "The last `window` tokens plus the first `sinks` tokens (StreamingLLM)."
    paper = "Xiao et al. 2024, Efficient Streaming Language Models with Attention Sinks"
    limits = "Test-only."

    def check_options(self) -> None:
        super().check_options()
        check_int_options(self, "window")

    def token_blocks(self, module, q_pos, num_blocks, query, key, key_valid, *, causal):
        return block_range(q_pos - self.window + 1, q_pos, num_blocks, self.block_size)[None, None]

    def allowed(self, module, q_pos, k_pos, num_keys, *, causal):
        return k_pos > q_pos - self.window

    @classmethod
    def bench_variants(cls, suite, length):
        return [cls(window=length // 8, block_size=64)] if suite == "sparse" else []


@dataclass
class MaskedWindow(SlidingWindow):
    """sliding_window with a kernel of its own for self-attention: one SDPA call under the
    pattern's mask (the shared block-sparse path still serves decoding)."""

    name = "test_masked_window"
    calls = 0

    def own_kernel(self, call: AttnCall, sinks, sink):
        if call.query.shape[2] != call.key.shape[2] or sink is not None:
            return None
        MaskedWindow.calls += 1
        q_pos, k_pos, valid, _ = positions(call, self.absolute_positions)
        keep = self.pair_mask(call.module, q_pos, k_pos, call.query, call.key, valid, causal=True) | (k_pos < sinks)[:, None, None, :]
        keep = keep & (k_pos[:, None, None, :] <= q_pos[:, None, :, None])
        if call.mask is not None:
            keep = keep & call.mask
        groups = call.query.shape[1] // call.key.shape[1]
        key, value = (t.repeat_interleave(groups, dim=1) for t in (call.key, call.value))
        bias = torch.zeros(keep.shape, dtype=call.query.dtype).masked_fill(~keep, torch.finfo(call.query.dtype).min)
        return F.scaled_dot_product_attention(call.query, key, value, attn_mask=bias, scale=call.scale)


@pytest.fixture
def registered():
    """Register the two test variants for one test (the registry is process-wide)."""
    added = [register_variant(cls) for cls in (StreamingWindow, MaskedWindow)]
    yield
    for cls in added:
        VARIANTS.pop(cls.name, None)


@pytest.fixture
def ids() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(3, 97, (2, 13))


def converted(name: str, **options) -> torch.nn.Module:
    return hf_relattn.convert(tiny_llama(kv_heads=2), name, **options).eval()


def test_new_pattern_equals_the_same_rule_written_elsewhere(registered, ids):
    """StreamingWindow(window=3, sinks=2) computes what sliding_window with the same options does
    (full forward, left padding, the reference path, cached decoding)."""
    ours = converted("test_streaming", window=3, block_size=2, sinks=2)
    theirs = converted("sliding_window", window=3, block_size=2, sinks=2)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            expected = theirs(ids, **kwargs).logits
            torch.testing.assert_close(ours(ids, **kwargs).logits, expected, atol=1e-5, rtol=0)
            with hf_relattn.force_implementation("reference"):
                torch.testing.assert_close(ours(ids, **kwargs).logits, expected, atol=1e-5, rtol=0)
        full = ours(ids).logits
        cache = DynamicCache(config=ours.config)
        steps = [ours(ids[:, :5], cache=cache, use_cache=True).logits]
        for t in range(5, ids.shape[1]):
            steps.append(ours(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_new_pattern_saves_reloads_and_trains(registered, ids, tmp_path):
    model = converted("test_streaming", window=3, block_size=2, sinks=1, sink_logit=True)
    with torch.no_grad():
        model.model.layers[0].self_attn.relattn_sink_logit.fill_(0.5)  # not the neutral init
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=0, rtol=0)
    loaded.train()
    loaded(ids, labels=ids).loss.backward()
    grad = loaded.model.layers[0].self_attn.relattn_sink_logit.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_new_pattern_checks_its_options_and_reaches_the_kernels_benchmark(registered):
    with pytest.raises(ValueError, match="window must be an integer"):
        hf_relattn.convert(tiny_llama(), "test_streaming", window=0)
    assert [v.name for v in suite_variants("sparse", 1024)].count("test_streaming") == 1


def test_new_kernel_for_an_existing_pattern_is_used_and_equals_it(registered, ids):
    """MaskedWindow's own kernel runs for self-attention and gives sliding_window's outputs; a
    decoding step falls through to the shared block-sparse path."""
    ours = converted("test_masked_window", window=4, block_size=2, sinks=2)
    theirs = copy.deepcopy(converted("sliding_window", window=4, block_size=2, sinks=2))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    MaskedWindow.calls = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            torch.testing.assert_close(ours(ids, **kwargs).logits, theirs(ids, **kwargs).logits, atol=1e-5, rtol=0)
        assert MaskedWindow.calls > 0
        generated = ours.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        reference = theirs.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, reference)
