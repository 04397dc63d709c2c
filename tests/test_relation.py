"""Relation-aware attention over caller-supplied graphs (`relation` variant), against the
paper's equations materialised in tests/reference.py (through test_shaw's reference function)."""

from __future__ import annotations

import re
import pytest
import torch
from conftest import assert_same_state, state_copy, tiny_bert, tiny_llama, tiny_vit
from reference import run_with_attention
from test_shaw import FAMILIES, REF, inputs_of, randomize, valid_rows
from transformers import AutoModelForSequenceClassification

import hf_relattn

NUM = 5


def random_graph(batch, q_len, k_len, seed=4, density=0.4):
    """Random labelled graphs: each pair has a relation 1..NUM-1 with probability `density`."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, NUM, (batch, q_len, k_len), generator=gen)
    return ids * (torch.rand(batch, q_len, k_len, generator=gen) < density)


def tokens_of(family):
    return 17 if family == "vit" else 11  # ViT: [CLS] + 4 x 4 patches


@pytest.mark.parametrize("family", ["llama", "bert", "vit"])
def test_zero_initialised_tables_leave_outputs_unchanged(family, ids, pixels):
    model = FAMILIES[family]()
    inputs = inputs_of(family, ids, pixels)
    graph = random_graph(2, tokens_of(family), tokens_of(family))
    with torch.no_grad():
        before = model(**inputs).logits
        hf_relattn.convert(model, "relation", num_relations=NUM)
        after = model(**inputs, relation_ids=graph).logits
    for a, b in zip(valid_rows(family, after), valid_rows(family, before)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_label_zero_contributes_nothing_even_after_training(ids):
    model = randomize(hf_relattn.convert(tiny_bert(), "relation", num_relations=NUM))
    plain = tiny_bert()
    with torch.no_grad():
        got = model(ids, relation_ids=torch.zeros(2, 11, 11, dtype=torch.long)).logits
        torch.testing.assert_close(got, plain(ids).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llama", "bert", "vit"])
@pytest.mark.parametrize("values", [True, False], ids=["keys+values", "keys"])
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per-head"])
def test_random_graphs_match_paper_equations(family, values, per_head, ids, pixels, chunking):
    model = FAMILIES[family]()
    if family == "llama":
        hf_relattn.convert(model, "gqa", num_key_value_heads=2)
    hf_relattn.convert(model, "relation", num_relations=NUM, values=values, per_head=per_head)
    randomize(model)
    inputs = inputs_of(family, ids, pixels)
    graph = random_graph(2, tokens_of(family), tokens_of(family))
    with torch.no_grad():
        got = model(**inputs, relation_ids=graph, output_hidden_states=True)
    got = got.logits if family == "llama" else got.hidden_states[-1]
    expected = run_with_attention(model, REF, **inputs, relation_ids=graph)
    for a, b in zip(valid_rows(family, got), valid_rows(family, expected)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_composes_with_shaw_and_broadcasts_one_graph(ids, chunking):
    model = hf_relattn.convert(hf_relattn.convert(tiny_bert(), "shaw", max_distance=2), "relation", num_relations=NUM)
    randomize(model)
    graph = random_graph(1, 11, 11)  # one graph for the whole batch
    inputs = inputs_of("bert", ids, None)
    with torch.no_grad():
        got = model(**inputs, relation_ids=graph, output_hidden_states=True).hidden_states[-1]
    expected = run_with_attention(model, REF, **inputs, relation_ids=graph.expand(2, -1, -1))
    for a, b in zip(valid_rows("bert", got), valid_rows("bert", expected)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_kv_cache_decoding_equals_full_forward(ids):
    model = randomize(hf_relattn.convert(tiny_llama(), "relation", num_relations=NUM))
    graph = random_graph(1, 11, 11)
    with torch.no_grad():
        full = model(ids[:1], relation_ids=graph).logits
        out = model(ids[:1, :4], relation_ids=graph[:, :4, :4], use_cache=True)
        logits = [out.logits[:, -1]]
        for t in range(4, 11):
            # (query positions, all key positions) of this step
            out = model(ids[:1, t : t + 1], relation_ids=graph[:, t : t + 1, : t + 1], cache=out.cache, use_cache=True)
            logits.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(logits, 1), full[:, 3:], atol=1e-5, rtol=1e-5)
    # generate() passes the same square graph at every step; the engine cuts it to the step
    generated = model.generate(ids[:1, :4], relation_ids=graph, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        again = model(generated[:, :-1], relation_ids=graph[:, :9, :9]).logits[:, 3:].argmax(-1)
    assert torch.equal(again, generated[:, 4:])


def test_gradients_reach_the_tables(ids):
    model = hf_relattn.convert(tiny_llama(), "relation", num_relations=NUM, per_head=True).train()
    model(ids, relation_ids=random_graph(2, 11, 11), labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "relattn_relation" in n}
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(p.shape == (4, NUM - 1, 16) for n, p in model.named_parameters() if "relattn_relation" in n)


def test_save_load_round_trip(tmp_path, ids):
    model = randomize(hf_relattn.convert(tiny_bert(), "relation", num_relations=NUM, layers=[0]))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert_same_state(state_copy(model), loaded)
    graph = random_graph(2, 11, 11)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, relation_ids=graph).logits, model(ids, relation_ids=graph).logits, atol=0, rtol=0)


@pytest.mark.parametrize("make, message", [
    (lambda: None, r"needs relation_ids: pass model\(\.\.\., relation_ids=R\) with R a LongTensor of shape \(batch, 11, 11\)"),
    (lambda: torch.zeros(2, 11, 11), r"must be an integer \(long\) tensor of shape \(batch, 11, 11\).*torch.float32"),
    (lambda: torch.zeros(2, 11, dtype=torch.long), r"must have shape \(batch, 11, 11\).*got \(2, 11\)"),
    (lambda: torch.zeros(2, 11, 10, dtype=torch.long), r"must have shape \(batch, 11, 11\).*got \(2, 11, 10\)"),
    (lambda: torch.full((2, 11, 11), NUM), r"must lie in \[0, 5\) \(num_relations=5\), got values in \[5, 5\]"),
    (lambda: -torch.ones(2, 11, 11, dtype=torch.long), r"must lie in \[0, 5\)"),
    (lambda: torch.zeros(3, 11, 11, dtype=torch.long), r"has batch size 3 but the input has 2: expected shape .*\(2, 11, 11\)"),
])
def test_bad_relation_ids(make, message, ids):
    model = hf_relattn.convert(tiny_bert(), "relation", num_relations=NUM)
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(ids, relation_ids=make())


def test_relation_ids_without_the_variant_are_refused(ids):
    model = hf_relattn.convert(tiny_bert(), "shaw")
    with pytest.raises(ValueError, match="relation_ids were passed but the model has no 'relation' variant"), torch.no_grad():
        model(ids, relation_ids=torch.zeros(2, 11, 11, dtype=torch.long))


@pytest.mark.parametrize("options, message", [
    ({}, "num_relations is required"),
    ({"num_relations": 1}, r"num_relations must be an integer in \[2,"),
    ({"num_relations": "4"}, r"num_relations must be an integer in \[2,"),
    ({"num_relations": 4, "values": None}, "values must be True or False"),
])
def test_bad_options_leave_the_model_unchanged(options, message):
    for make in (tiny_llama, tiny_vit):
        model = make()
        before = state_copy(model)
        with pytest.raises(ValueError, match=message):
            hf_relattn.convert(model, "relation", **options)
        assert_same_state(before, model)
