"""Head gates and head importance (Michel, Levy & Neubig 2019).

The reference is a central finite difference of the loss with respect to a scale on one
head's output, applied by a forward pre-hook written here (independent of `head_gates`), on
float64 tiny models: for a single batch |dL/d gate_h| = |finite difference|, and the scores
are those values divided by their layer's L2 norm.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_bert, tiny_llama, tiny_vit
from reference import with_random_biases
from torch import nn

import hf_relattn

EPS = 1e-4
HEAD_DIM = {"llama": 16, "bert": 8, "vit": 8}


def output_projection(family, model, i):
    if family == "llama":
        return model.model.layers[i].self_attn.o_proj
    if family == "bert":
        return model.bert.encoder.layer[i].attention.output.dense
    return model.vit.layers[i].attention.o_proj


def float64_rms_norms(model):
    """LlamaRMSNorm computes in float32 whatever the model's dtype, which would limit the finite
    differences to float32 precision: the same formula in float64 instead."""
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            def forward(x, norm=module):
                return norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)

            module.forward = forward
    return model


def build(family):
    if family == "llama":
        return float64_rms_norms(tiny_llama(heads=6, kv_heads=3, dtype=torch.float64))
    if family == "bert":
        return with_random_biases(tiny_bert(dtype=torch.float64))
    return with_random_biases(tiny_vit(dtype=torch.float64))


def batch_of(family, seed):
    gen = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(2, 1, 16, 16, generator=gen, dtype=torch.float64),
                "labels": torch.randint(0, 5, (2,), generator=gen)}
    ids = torch.randint(3, 97, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    if family == "llama":
        return {"input_ids": ids, "attention_mask": mask, "labels": ids}
    mask[1, -3:] = 0  # padding
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (2,), generator=gen)}


def scaled_loss(family, model, batch, layer, head, factor):
    d = HEAD_DIM[family]

    def hook(module, args):
        x = args[0].clone()
        x[..., head * d:(head + 1) * d] *= factor
        return (x,)

    handle = output_projection(family, model, layer).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            return reference_loss(family, model, batch)
    finally:
        handle.remove()


def reference_loss(family, model, batch):
    """Mean cross-entropy in float64 (the models' own loss upcasts logits to float32 only)."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.double()
    labels = batch["labels"]
    if family == "llama":  # next-token prediction
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).item()


def finite_differences(family, model, batch):
    """dL/d(scale of head h's output) at 1, per layer (central differences)."""
    rows = []
    for layer in range(model.config.num_hidden_layers):
        heads = output_projection(family, model, layer).in_features // HEAD_DIM[family]
        rows.append(torch.tensor([
            (scaled_loss(family, model, batch, layer, h, 1 + EPS) - scaled_loss(family, model, batch, layer, h, 1 - EPS)) / (2 * EPS)
            for h in range(heads)
        ], dtype=torch.float64))
    return rows


def normalised(rows):
    return [r.abs() / r.abs().norm() for r in rows]


@pytest.mark.parametrize("family", ["llama", "bert", "vit"])
def test_gate_gradient_and_importance_equal_finite_differences(family):
    model = build(family)
    batch = batch_of(family, 0)
    fd = finite_differences(family, model, batch)
    assert all(r.abs().max() > 1e-6 for r in fd)

    # raw gradient of the gates = signed finite difference
    with hf_relattn.head_gates(model) as gates:
        assert [g.dtype for g in gates] == [torch.float32] * len(fd)
        assert all(g.requires_grad and torch.equal(g, torch.ones_like(g)) for g in gates)
        model(**batch).loss.backward()
        for gate, row in zip(gates, fd):
            torch.testing.assert_close(gate.grad.double(), row, atol=1e-6, rtol=1e-4)
    for p in model.parameters():
        p.grad = None

    scores = hf_relattn.head_importance(model, batch)
    assert scores.shape == (model.config.num_hidden_layers, len(fd[0]))
    assert scores.dtype == torch.float32
    for i, row in enumerate(normalised(fd)):
        torch.testing.assert_close(scores[i].double(), row, atol=1e-5, rtol=1e-4)
        assert scores[i].norm().item() == pytest.approx(1.0, abs=1e-6)

    # two batches: |gradient| accumulated per batch, then normalised
    other = batch_of(family, 1)
    fd2 = finite_differences(family, model, other)
    both = hf_relattn.head_importance(model, iter([batch, other]))
    for i, (a, b) in enumerate(zip(fd, fd2)):
        expected = (a.abs() + b.abs()) / (a.abs() + b.abs()).norm()
        torch.testing.assert_close(both[i].double(), expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(both, scores, atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_gates_scale_head_outputs_and_are_removed(family):
    model = build(family)
    batch = {k: v for k, v in batch_of(family, 0).items() if k != "labels"}
    d = HEAD_DIM[family]
    with torch.no_grad():
        plain = model(**batch).logits

        def zero_head(module, args):
            x = args[0].clone()
            x[..., d:2 * d] = 0  # head 1
            return (x,)

        handle = output_projection(family, model, 0).register_forward_pre_hook(zero_head)
        expected = model(**batch).logits
        handle.remove()
        with hf_relattn.head_gates(model) as gates:
            gates[0][1] = 0.0
            gated = model(**batch).logits
        after = model(**batch).logits
    torch.testing.assert_close(gated, expected, atol=1e-10, rtol=0)
    assert (gated - plain).abs().max() > 1e-6
    assert torch.equal(after, plain)  # hooks removed on exit


def test_grads_and_modes_restored():
    model = build("bert")
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.3
    batch = batch_of("bert", 0)
    reference = hf_relattn.head_importance(copy.deepcopy(model).eval(), batch)

    model.train()
    model.classifier.eval()  # a mixed state must come back as it was
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.grad = torch.randn_like(p) if i % 2 else None
    grads = [None if p.grad is None else p.grad.clone() for p in params]

    scores = hf_relattn.head_importance(model, batch)
    torch.testing.assert_close(scores, reference, atol=0, rtol=0)  # eval mode: no dropout
    assert model.training and not model.classifier.training
    assert model.bert.encoder.layer[0].attention.self.dropout.training
    for p, g in zip(params, grads):
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)


def test_pruned_layers_are_padded_with_nan():
    model = hf_relattn.convert(build("llama"), "prune", heads={0: [1, 4]})
    batch = batch_of("llama", 0)
    scores = hf_relattn.head_importance(model, batch)
    assert scores.shape == (2, 6)
    assert torch.isnan(scores[0, 4:]).all() and not torch.isnan(scores[0, :4]).any()
    assert not torch.isnan(scores[1]).any()
    fd = finite_differences("llama", model, batch)
    assert [len(r) for r in fd] == [4, 6]
    for i, row in enumerate(normalised(fd)):
        torch.testing.assert_close(scores[i, : len(row)].double(), row, atol=1e-5, rtol=1e-4)
    with hf_relattn.head_gates(model) as gates:
        assert [len(g) for g in gates] == [4, 6]


def test_bad_batches():
    model = build("bert")
    with pytest.raises(ValueError, match="including `labels`"):
        hf_relattn.head_importance(model, {"input_ids": torch.ones(1, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="batches is empty"):
        hf_relattn.head_importance(model, [])
