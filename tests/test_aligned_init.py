"""`init="aligned"` GQA/MQA (Jin et al. 2024, "Align Attention Heads Before Merging Them").

References written here, independently of the library:
- models whose grouped heads are built as maps the model cannot see (a key head rotated inside
  each RoPE plane for LLaMA, or by any orthogonal map for BERT/ViT, compensated in the queries;
  a value head by an orthogonal map, compensated in the output projection): merging must then
  give exactly the original model's logits;
- on random heads, the attention-output error of aligned vs mean pooling, measured on a
  materialised multi-head reference (the original model's own outputs).
The exactness tests hold for both fitted inits ("aligned", the paper's "procrustes").
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import tiny_bert, tiny_llama, tiny_vit

import hf_relattn

D = 16  # tiny_llama's head dim


def random_orthogonal(dim, gen):
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def rope_rotation(dim, gen):
    """A rotation inside each rotate_half plane (i, i + D/2), with its own angle per plane."""
    half = dim // 2
    angles = torch.rand(half, generator=gen, dtype=torch.float64) * 2 * math.pi
    rot = torch.zeros(dim, dim, dtype=torch.float64)
    idx = torch.arange(half)
    rot[idx, idx] = rot[idx + half, idx + half] = torch.cos(angles)
    rot[idx, idx + half] = -torch.sin(angles)
    rot[idx + half, idx] = torch.sin(angles)
    return rot


def make_rotated_heads(model, family, per_group, gen):
    """Within each group of `per_group` K/V heads, rewrite heads 1.. as maps of head 0 with the
    inverse maps folded into the queries / output columns: the model's function is unchanged."""
    for layer in range(model.config.num_hidden_layers):
        if family == "llama":
            attn = model.model.layers[layer].self_attn
            q, k, v, o, dim, rope = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, D, True
        elif family == "bert":
            block = model.bert.encoder.layer[layer].attention
            q, k, v, o, dim, rope = block.self.query, block.self.key, block.self.value, block.output.dense, 8, False
        else:
            attn = model.vit.layers[layer].attention
            q, k, v, o, dim, rope = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, 8, False
        heads = k.out_features // dim
        with torch.no_grad():
            for h in range(heads):
                base = h - h % per_group
                if h == base:
                    continue
                rows, src = slice(h * dim, (h + 1) * dim), slice(base * dim, (base + 1) * dim)
                a = rope_rotation(dim, gen) if rope else random_orthogonal(dim, gen)
                b = random_orthogonal(dim, gen)
                # original head h: k_h, v_h; new: k_h' = A k_base, q_h' = A k_h-compatible...
                # keep q_h.k_h: set k_h := A k_base and q_h := A (B_q) where q_h.k_h = q_h^T k_base before
                k.weight[rows] = (a @ k.weight[src].double()).float()
                q.weight[rows] = (a @ q.weight[rows].double()).float()
                if k.bias is not None:
                    k.bias[rows] = (a @ k.bias[src].double()).float()
                    q.bias[rows] = (a @ q.bias[rows].double()).float()
                v.weight[rows] = (b @ v.weight[src].double()).float()
                if v.bias is not None:
                    v.bias[rows] = (b @ v.bias[src].double()).float()
                o.weight[:, rows] = (o.weight[:, rows].double() @ b.T).float()
    return model


def inputs(family, gen, batch=3, length=12):
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 1, 16, 16, generator=gen)}
    ids = torch.randint(1, 97, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def outputs(model, batch):
    """The last hidden states of the real tokens (tiny heads' logits are all near zero)."""
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
    mask = batch.get("attention_mask")
    return hidden[mask.bool()] if mask is not None else hidden


BUILDERS = {"llama": lambda: tiny_llama(heads=4), "bert": lambda: tiny_bert(heads=4), "vit": lambda: tiny_vit(heads=4)}


@pytest.mark.parametrize("init", ["aligned", "procrustes"])
@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("groups", [1, 2])
def test_aligned_exact_when_heads_are_hidden_maps_of_each_other(family, groups, init):
    gen = torch.Generator().manual_seed(1)
    model = BUILDERS[family]()
    per_group = 4 // groups
    # the heads of one new group are different parameterisations of one head (the model would
    # compute the same function with that head shared): same K/V per group after `make_rotated_heads`
    # only if the queries used the same head; instead, first make every head of a group equal.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in ("k_proj", "v_proj", ".key.", ".value.")):
                dim = p.shape[0] // 4
                for h in range(4):
                    base = h - h % per_group
                    p[h * dim:(h + 1) * dim] = p[base * dim:(base + 1) * dim].clone()
    make_rotated_heads(model, family, per_group, gen)
    batches = [inputs(family, gen) for _ in range(2)]
    test = inputs(family, gen)
    before = outputs(model, test)
    mean = outputs(hf_relattn.convert(copy.deepcopy(model), "gqa", num_key_value_heads=groups, init="mean"), test)
    converted = hf_relattn.convert(copy.deepcopy(model), "gqa", num_key_value_heads=groups, init=init, batches=batches)
    after = outputs(converted, test)
    assert (mean - before).abs().max() > 5e-3  # the maps matter: mean pooling changes the model
    torch.testing.assert_close(after, before, atol=2e-5, rtol=1e-4)
    assert converted.config.relattn is None or all("batches" not in e["options"] for e in converted.config.relattn["variants"])


def test_aligned_exact_on_grouped_source():
    """SmolLM2-like source (6 query / 3 K/V heads) -> MQA: heads pooled by their query counts."""
    gen = torch.Generator().manual_seed(2)
    model = tiny_llama(heads=6, kv_heads=3)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for h in (1, 2):
                rows, src = slice(h * D, (h + 1) * D), slice(0, D)
                a, b = rope_rotation(D, gen), random_orthogonal(D, gen)
                attn.k_proj.weight[rows] = (a @ attn.k_proj.weight[src].double()).float()
                attn.v_proj.weight[rows] = (b @ attn.v_proj.weight[src].double()).float()
                for qh in (2 * h, 2 * h + 1):  # the query heads reading K/V head h
                    qrows = slice(qh * D, (qh + 1) * D)
                    # query heads of K/V head h see A k_0: give them A q (q.k of head 0's frame)
                    attn.q_proj.weight[qrows] = (a @ attn.q_proj.weight[qrows].double()).float()
                    attn.o_proj.weight[:, qrows] = (attn.o_proj.weight[:, qrows].double() @ b.T).float()
    test = inputs("llama", gen)
    before = outputs(model, test)
    converted = hf_relattn.convert(copy.deepcopy(model), "mqa", init="aligned", batches=[inputs("llama", gen)])
    torch.testing.assert_close(outputs(converted, test), before, atol=2e-5, rtol=1e-4)


def attention_error(model, converted, batch):
    """Mean squared difference of the attention blocks' outputs (each fed the original's input)."""
    errors = []
    inputs_of, outputs_of = [], []
    def record(module, args, kwargs, output):
        inputs_of.append((args, kwargs))
        outputs_of.append(output[0])

    hooks = [layer.self_attn.register_forward_hook(record, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(**batch, use_cache=False)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for layer, (args, kwargs), ref in zip(converted.model.layers, inputs_of, outputs_of):
            errors.append(float((layer.self_attn(*args, **kwargs)[0] - ref).pow(2).mean()))
    return sum(errors) / len(errors)


@pytest.mark.parametrize("groups", [1, 2])
def test_aligned_beats_procrustes_beats_mean_on_random_heads(groups):
    gen = torch.Generator().manual_seed(3)
    model = tiny_llama(heads=4)
    calib = [inputs("llama", gen) for _ in range(3)]
    test = inputs("llama", gen)
    mean = hf_relattn.convert(copy.deepcopy(model), "gqa", num_key_value_heads=groups, init="mean")
    procrustes = hf_relattn.convert(copy.deepcopy(model), "gqa", num_key_value_heads=groups, init="procrustes", batches=calib)
    aligned = hf_relattn.convert(copy.deepcopy(model), "gqa", num_key_value_heads=groups, batches=calib)  # the default with batches
    assert aligned.config.num_key_value_heads == groups
    errors = [attention_error(model, m, test) for m in (aligned, procrustes, mean)]
    assert errors[0] < 0.9 * errors[1] < 0.81 * errors[2], errors


def test_aligned_defaults_and_errors():
    model = tiny_llama(heads=4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="batches is empty"):
        hf_relattn.convert(model, "mqa", init="aligned", batches=[])
    with pytest.raises(ValueError, match="batches is required"):
        hf_relattn.convert(model, "mqa", init="aligned")
    with pytest.raises(ValueError, match="only used with init='aligned'"):
        hf_relattn.convert(model, "mqa", init="mean", batches=[inputs("llama", torch.Generator())])
    with pytest.raises(ValueError, match="input_ids, inputs_embeds or pixel_values"):
        hf_relattn.convert(model, "mqa", batches=[{"text": "hello"}])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # nothing changed
