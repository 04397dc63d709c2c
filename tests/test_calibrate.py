"""`hf_relattn.calibrate`: attention transfer (LoLCATs, Zhang et al. 2025).

The test measures the error itself, independently of the library: it records each attention
block's input and output on the reference model with its own hooks, feeds the reference input
to the converted model's block and compares (relative squared error over real tokens).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_bert, tiny_llama, tiny_vit

import hf_relattn

FAMILIES = {
    "llama": (tiny_llama, lambda m: [layer.self_attn for layer in m.model.layers]),
    "bert": (tiny_bert, lambda m: [layer.attention for layer in m.bert.encoder.layer]),
    "vit": (tiny_vit, lambda m: [layer.attention for layer in m.vit.layers]),
}
VARIANTS = {
    "gqa": {"num_key_value_heads": 2},
    "sliding_window": {"window": 3, "sinks": 1, "sink_logit": True},
    "moh": {"active_heads": 0.5},
    "shaw": {},
}


def batches_for(family, count=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if family == "vit":
        return [{"pixel_values": torch.randn(2, 1, 16, 16, generator=gen)} for _ in range(count)]
    out = []
    for _ in range(count):
        ids = torch.randint(1, 97, (2, 10), generator=gen)
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[1, :3] = 0  # left padding: padded tokens count nowhere
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def layer_errors(model, reference, blocks_of, batch):
    """Relative error of each of model's attention blocks fed the reference block's input."""
    seen = []

    def record(module, args, kwargs, output):
        seen.append((args, kwargs, output[0] if isinstance(output, tuple) else output))

    handles = [b.register_forward_hook(record, with_kwargs=True) for b in blocks_of(reference)]
    inputs = dict(batch, **({} if "pixel_values" in batch else {"use_cache": False}))
    with torch.no_grad():
        reference.eval()(**inputs)
    for h in handles:
        h.remove()
    # the converted model's own call arguments (its mask, positions) for each block
    calls = []
    handles = [b.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True) for b in blocks_of(model)]
    with torch.no_grad():
        model.eval()(**inputs)
    for h in handles:
        h.remove()
    valid = batch.get("attention_mask")
    errors = []
    with torch.no_grad():
        for block, (_, _, ref_out), (args, kwargs), (ref_args, ref_kwargs, _) in zip(blocks_of(model), seen, calls, seen):
            kwargs = {k: v for k, v in kwargs.items() if not k.startswith("relattn_") and k != "hidden_states"}
            ref_in = ref_args[0] if ref_args else ref_kwargs["hidden_states"]
            out = block(ref_in, *args[1:], **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            diff, energy = (out - ref_out).pow(2).sum(-1), ref_out.pow(2).sum(-1)
            if valid is not None:
                diff, energy = diff[valid.bool()], energy[valid.bool()]
            errors.append(float(diff.sum() / energy.sum()))
    return errors


def attention_parameter_ids(model, blocks_of):
    return {id(p) for b in blocks_of(model) for p in b.parameters()}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_calibrate_reduces_error_and_freezes_the_rest(family, variant):
    build, blocks_of = FAMILIES[family]
    reference = build()
    model = hf_relattn.convert(copy.deepcopy(reference), variant, **VARIANTS[variant])
    model.train()  # calibrate runs in eval numerics and gives the mode back
    batches = batches_for(family)
    # measured on a calibration batch (tiny models overfit three small batches: held-out error
    # is the benchmarks' business)
    probe = batches[0]
    before = layer_errors(model, reference, blocks_of, probe)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in attention_parameter_ids(model, blocks_of)}
    ref_state = {n: p.detach().clone() for n, p in reference.state_dict().items()}
    model.train()
    report = hf_relattn.calibrate(model, reference, batches, steps=40, lr=1e-3, progress=False, verbose=False)
    assert model.training
    after = layer_errors(model, reference, blocks_of, probe)
    assert [r["layer"] for r in report.rows] == [0, 1]
    for row, b, a in zip(report.rows, before, after):
        assert row["after"] <= row["before"]
        if b > 1e-9:  # shaw starts exact (zero tables): nothing to gain
            assert row["after"] < 0.7 * row["before"], report.rows
            assert a < b, (before, after)
        else:
            assert a < 1e-9
    for n, p in model.named_parameters():  # everything outside the attention blocks is bit-identical
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        assert p.grad is None
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in ref_state.items())


def test_train_new_only_touches_added_or_resized_parameters():
    reference = tiny_llama()
    model = hf_relattn.convert(copy.deepcopy(reference), "gqa", num_key_value_heads=1)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    hf_relattn.calibrate(model, reference, batches_for("llama"), steps=20, train="new", progress=False, verbose=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, state[n])}
    assert changed and all(n.endswith(("k_proj.weight", "v_proj.weight")) for n in changed), changed


def test_spilled_recordings_give_the_same_result():
    reference = tiny_llama()
    converted = hf_relattn.convert(copy.deepcopy(reference), "moh", active_heads=0.5)
    a, b = copy.deepcopy(converted), copy.deepcopy(converted)
    ra = hf_relattn.calibrate(a, reference, batches_for("llama"), steps=10, progress=False, verbose=False)
    rb = hf_relattn.calibrate(b, reference, batches_for("llama"), steps=10, memory_limit=0, progress=False, verbose=False)
    assert ra.rows == rb.rows
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_report_table():
    reference = tiny_llama()
    model = hf_relattn.convert(copy.deepcopy(reference), "gqa", num_key_value_heads=1)
    report = hf_relattn.calibrate(model, reference, batches_for("llama"), steps=5, progress=False, verbose=False)
    text = str(report)
    assert text.count("\n") == len(report.rows) + 2 and "error before" in text


def test_bad_inputs_raise_before_anything_changes():
    reference = tiny_llama()
    model = hf_relattn.convert(copy.deepcopy(reference), "gqa", num_key_value_heads=1)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    good = batches_for("llama")
    cases = [
        (dict(batches=None), "batches is required"),
        (dict(batches=[]), "batches is empty"),
        (dict(batches=[{"text": "x"}]), "input_ids, inputs_embeds or pixel_values"),
        (dict(reference=tiny_bert()), "reference is a bert model"),
        (dict(reference=tiny_llama(heads=2)), "hidden_size"),
        (dict(reference=model), "separate copy"),
        (dict(model=copy.deepcopy(reference)), "not converted"),
        (dict(steps=-1), "steps must be"),
        (dict(lr=0), "lr must be"),
        (dict(train="everything"), "valid: attention, new"),
        (dict(layers=[5]), "indices in 0..1"),
    ]
    for change, message in cases:
        kwargs = {"model": model, "reference": reference, "batches": good, **change}
        with pytest.raises(ValueError, match=message):
            hf_relattn.calibrate(kwargs.pop("model"), kwargs.pop("reference"), kwargs.pop("batches"), progress=False, **kwargs)
    window = hf_relattn.convert(copy.deepcopy(reference), "sliding_window", window=3, sinks=0)
    with pytest.raises(ValueError, match="no new or resized"):
        hf_relattn.calibrate(window, reference, good, train="new", progress=False)
    assert all(torch.equal(p, state[n]) for n, p in model.named_parameters())


def test_converted_inputs_feed_each_layer_the_calibrated_model_below_it():
    """inputs="converted": layer 0 sees the same input either way (identical result); layer 1
    is trained on what the converted model's calibrated layer 0 gives it, so it differs."""
    reference = tiny_llama()
    converted = hf_relattn.convert(copy.deepcopy(reference), "gqa", num_key_value_heads=1)
    a, b = copy.deepcopy(converted), copy.deepcopy(converted)
    ra = hf_relattn.calibrate(a, reference, batches_for("llama"), steps=20, lr=1e-3, progress=False, verbose=False)
    rb = hf_relattn.calibrate(b, reference, batches_for("llama"), steps=20, lr=1e-3, inputs="converted", progress=False, verbose=False)
    layer0 = [n for n, _ in a.named_parameters() if ".layers.0.self_attn." in n]
    layer1 = [n for n, _ in a.named_parameters() if ".layers.1.self_attn." in n]
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert all(torch.equal(pa[n], pb[n]) for n in layer0)
    assert any(not torch.equal(pa[n], pb[n]) for n in layer1)
    assert ra.rows[0] == rb.rows[0] and all(r["after"] < r["before"] for r in rb.rows)
    with pytest.raises(ValueError, match="valid: reference, converted"):
        hf_relattn.calibrate(b, reference, batches_for("llama"), inputs="student", progress=False)
