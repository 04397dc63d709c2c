"""The engine's relational path (`hf_relattn.ops.relational.relational_attention`) on raw tensors:
chunked, banded, checkpointed, against Shaw et al.'s eqs. 3-4 materialised in the test
(tests/reference.py), outputs and gradients, with hypothesis drawing shapes and masks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import clipped_relative_labels, relation_aware_attention

from hf_relattn.call import AttnCall
from hf_relattn.ops import relational
from hf_relattn.variants.base import RelationTerm


def run_case(batch, heads, kv_heads, q_len, k_len, dim, m, causal, pad, graph, per_head, values, chunk, seed):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).float().requires_grad_()

    q, k, v = rand(batch, heads, q_len, dim), rand(batch, kv_heads, k_len, dim), rand(batch, kv_heads, k_len, dim)
    labels_count = 2 * m + 1
    table_shape = (heads, labels_count, dim) if per_head else (labels_count, dim)
    a_key = rand(*table_shape)
    a_value = rand(*table_shape) if values else None
    key_mask = torch.ones(batch, k_len, dtype=torch.bool)
    for b in range(batch):
        key_mask[b, : int(torch.randint(0, pad + 1, (), generator=gen))] = False  # left padding
    allowed = key_mask[:, None, None, :].expand(batch, 1, q_len, k_len)
    if causal:
        allowed = allowed & (torch.arange(k_len)[None, :] <= torch.arange(k_len - q_len, k_len)[:, None])
    mask = allowed if pad else None
    if graph:
        labels = torch.randint(0, labels_count, (batch, q_len, k_len), generator=gen)
        term = RelationTerm(labels_count, labels=labels, key=a_key, value=a_value)
    else:
        labels = clipped_relative_labels(q_len, k_len, m)[None]
        term = RelationTerm(labels_count, max_distance=m, key=a_key, value=a_value)
    scale = dim**-0.5
    old = relational.RELATION_CHUNK_ELEMENTS
    relational.RELATION_CHUNK_ELEMENTS = chunk
    try:
        got = relational.relational_attention(AttnCall.of(q, k, v, mask, causal=causal, scale=scale), lambda qp, kp: None,
                                              terms=[term])
    finally:
        relational.RELATION_CHUNK_ELEMENTS = old
    expected = relation_aware_attention(q, k, v, scale, [(labels, a_key, a_value)], causal=causal, allowed=allowed)
    valid = allowed.any(-1, keepdim=True)  # queries with at least one key (padded ones are undefined)
    assert got.shape == expected.shape
    torch.testing.assert_close(got.double() * valid, expected * valid, atol=3e-5, rtol=1e-4)
    weights = torch.randn(got.shape, generator=gen, dtype=torch.float64) * valid
    leaves = [t for t in (q, k, v, a_key, a_value) if t is not None]
    ours = torch.autograd.grad((got.double() * weights).sum(), leaves)
    ref = torch.autograd.grad((expected * weights).sum(), leaves)
    for name, a, b in zip("qkvKV", ours, ref):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4, msg=lambda text, name=name: f"grad {name}: {text}")


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2]),
    q_len=st.integers(1, 24),
    extra_keys=st.integers(0, 6),
    dim=st.sampled_from([4, 8]),
    m=st.integers(1, 6),
    causal=st.booleans(),
    pad=st.integers(0, 4),
    graph=st.booleans(),
    per_head=st.booleans(),
    values=st.booleans(),
    chunk=st.integers(1, 400),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_and_masks(batch, kv_heads, groups, q_len, extra_keys, dim, m, causal, pad, graph, per_head, values, chunk, seed):
    k_len = q_len + extra_keys  # extra keys: a KV cache before the new queries
    run_case(batch, kv_heads * groups, kv_heads, q_len, k_len, dim, m, causal, pad, graph, per_head, values, chunk, seed)


@pytest.mark.parametrize("causal", [True, False])
def test_long_sequence_across_many_chunks(causal):
    # 300 queries in chunks of 16 rows: bands start, sit inside and leave the key range
    run_case(1, 3, 3, 300, 300, 16, 7, causal, 0, False, False, True, 3 * 300 * 16, seed=0)


@pytest.mark.parametrize("graph", [False, True], ids=["band", "labels"])
def test_dropout_gradients_match_finite_differences(graph):
    """Attention dropout regenerates the same keep mask in the backward pass: the written-out
    gradient equals central differences of the loss (same seed before every call), in float64."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    a_key = torch.randn(4, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    a_value = torch.randn(5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (2, 9, 9), generator=gen) if graph else None
    weights = torch.randn(2, 4, 9, 8, generator=gen, dtype=torch.float64)

    def loss():
        torch.manual_seed(11)  # the engine draws the dropout seed from the global generator
        term = RelationTerm(5, labels=labels, max_distance=None if graph else 2, key=a_key, value=a_value)
        out = relational.relational_attention(AttnCall.of(q, k, v, causal=True, scale=0.3, dropout=0.4), lambda qp, kp: None, terms=[term])
        return (out * weights).sum()

    leaves = (q, k, v, a_key, a_value)
    grads = torch.autograd.grad(loss(), leaves)
    directions = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in leaves]
    eps = 1e-6
    with torch.no_grad():
        for t, d in zip(leaves, directions):
            t += eps * d
        plus = loss()
        for t, d in zip(leaves, directions):
            t -= 2 * eps * d
        minus = loss()
        for t, d in zip(leaves, directions):
            t += eps * d
    numeric = (plus - minus) / (2 * eps)
    analytic = sum((g * d).sum() for g, d in zip(grads, directions))
    torch.testing.assert_close(analytic, numeric, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        assert loss() == loss()  # same seed: same mask
        torch.manual_seed(12)
        term = RelationTerm(5, labels=labels, max_distance=None if graph else 2, key=a_key, value=a_value)
        other = relational.relational_attention(AttnCall.of(q, k, v, causal=True, scale=0.3, dropout=0.4), lambda qp, kp: None, terms=[term])
        assert (other * weights).sum() != loss()  # another seed: another dropout mask
