"""ModernBERT: what the generic table (tests/variant_cases.py) does not check on its own.

The adapter reads the fused Wqkv and targets only attention modules; transformers hands the engine
padded batches (no unpadding) and, on local layers, a mask holding the bidirectional window;
sparse patterns with sinks are exact on local layers at lengths well past the window, against
loop masks written from the papers' definitions (tests/test_sparse.py) intersected with that
mask; torch.compile runs them (an encoder has no cache, so there is nothing to refuse); the
function-preserving initialisations leave the model's outputs as they were.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import tiny_modernbert
from test_sparse import REF, CASES as SPARSE_CASES
from reference import run_with_attention

import hf_relattn
import hf_relattn.engine as engine
from hf_relattn.patches import get_adapter
from hf_relattn.patches.fused import EQUAL_PARTS

HALF_WINDOW = 2  # tiny_modernbert's local_attention=4: keys within 2 tokens on either side


def right_padded(length: int, real: int, seed: int = 2) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (2, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, real:] = 0
    ids[1, real:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_adapter_reads_the_fused_projection_and_targets_only_attention():
    model = tiny_modernbert()
    adapter = get_adapter(model)
    modules = adapter.attention_modules(model)
    assert [type(m).__name__ for m in modules] == ["ModernBertAttention"] * 2
    assert [adapter.module_num_heads(m) for m in modules] == [4] * 2
    assert [adapter.num_kv_heads(m) for m in modules] == [4] * 2
    assert adapter.output_projections(model) == [m.Wo for m in modules]
    assert adapter.rope_planes(model.config)[0] == (0, 4)  # rotate_half: dims i and i + D/2
    # PEFT's rule: a target matches a module named exactly so or ending in "." + target
    targeted = {name for name, _ in model.named_modules()
                if any(name == t or name.endswith("." + t) for t in adapter.lora_targets)}
    assert targeted == {f"model.layers.{i}.attn.{p}" for i in range(2) for p in ("Wqkv", "Wo")}  # not mlp.Wo
    for variant, reason in (("gqa", EQUAL_PARTS), ("mqa", EQUAL_PARTS)):
        options = {"gqa": {"num_key_value_heads": 2}}.get(variant, {})
        with pytest.raises(ValueError, match=re.escape(reason)):
            hf_relattn.convert(model, variant, **options)


def test_engine_gets_padded_batches_and_the_local_window_in_the_mask(monkeypatch):
    """transformers 5.2x does not unpad ModernBERT for this attention function: each call has the
    padded (B, H, T, D) tensors and a boolean (B, 1, T, T) mask, which on the local layer holds
    the bidirectional window (|i - j| <= local_attention // 2) and the padding."""
    calls = []
    build = engine.build_call

    def recording(module, query, key, value, mask, *args, **kwargs):
        call = build(module, query, key, value, mask, *args, **kwargs)
        calls.append((module.layer_idx, call))
        return call

    monkeypatch.setattr(engine, "build_call", recording)
    model = hf_relattn.convert(tiny_modernbert(), "shaw", max_distance=3)
    with torch.no_grad():
        model(**right_padded(11, 7))
    assert [idx for idx, _ in calls] == [0, 1]
    slots = torch.arange(11)
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, 7:] = False
    band = (slots[:, None] - slots[None, :]).abs() <= HALF_WINDOW
    for idx, call in calls:
        assert call.query.shape == call.key.shape == (2, 4, 11, 8) and not call.causal
        assert not any("cu_seq" in name or "indices" in name for name in call.inputs)
        expected = valid[:, None, None, :] & (band if idx == 1 else True)
        assert call.mask.dtype == torch.bool and torch.equal(call.mask, expected.expand(2, 1, 11, 11))
        assert call.native_window == (HALF_WINDOW + 1 if idx == 1 else None)


@pytest.mark.parametrize("name, options", [case for case in SPARSE_CASES if case[1]["sinks"]],
                         ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_patterns_with_sinks_on_local_layers_match_loop_masks(name, options):
    """37 tokens (one sample right-padded to 30) against the local window of 2 + 1 + 2: the
    pattern (sinks included) intersected with the window on the local layer, alone on the global
    one; and the sinks really are cut by the window (output_attentions: no weight outside it)."""
    model = hf_relattn.convert(tiny_modernbert(), name, **options)
    batch = right_padded(37, 30)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, output_attentions=True)
        got = model(**batch, output_hidden_states=True).hidden_states[-1]
    expected = run_with_attention(model, REF, **batch)
    for row, real in ((0, slice(None)), (1, slice(0, 30))):
        torch.testing.assert_close(got[row, real], expected[row, real], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(out.hidden_states[-1][row, real], expected[row, real], atol=2e-5, rtol=1e-5)
    slots = torch.arange(37)
    outside = (slots[:, None] - slots[None, :]).abs() > HALF_WINDOW
    assert out.attentions[1][..., outside].abs().max() == 0  # local layer: nothing outside the window
    assert out.attentions[0][0, :, 20:, 0].min() > 0  # global layer: far queries read the first sink


def test_the_compiled_path_with_sinks_on_local_layers_equals_eager(monkeypatch):
    """The path torch.compile takes (every variant on materialised scores; `engine.implementation`
    says "compiled" while dynamo traces, forced here: compiling costs seconds) is not refused on
    a bidirectional window, which has no cache to hide the first tokens, and equals eager.
    (Checked with torch.compile(backend="eager") too when this was written.)"""
    model = hf_relattn.convert(tiny_modernbert(), "sliding_window", window=3, block_size=2, sinks=2)
    batch = right_padded(11, 7)
    with torch.no_grad():
        want = model(**batch).logits
        monkeypatch.setattr(engine, "implementation", lambda: "compiled")
        got = model(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, options", [
    ("shaw", {}), ("t5_bias", {}), ("relation", {"num_relations": 3}), ("moh", {"active_heads": 1.0}),
    ("sliding_window", {"window": 64, "sinks": 0, "sink_logit": True}),
])
def test_function_preserving_initialisations_leave_outputs_unchanged(name, options):
    """Zero tables, all heads active, a window covering the sequence with a neutral sink logit:
    the converted masked LM gives the original logits (sequence classifiers: the conformance table)."""
    model = tiny_modernbert(head="AutoModelForMaskedLM")
    batch = right_padded(11, 7)
    extra = {"relation_ids": torch.randint(0, 3, (2, 11, 11))} if name == "relation" else {}
    with torch.no_grad():
        before = model(**batch).logits
        hf_relattn.convert(model, name, **options)
        after = model(**batch, **extra).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(after[real], before[real], atol=1e-5, rtol=0)
