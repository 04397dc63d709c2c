"""Padding masks and the KV cache with every kind of converted model.

References are independent of the batching/caching under test: each sample run alone
without padding, and the full-sequence forward without a cache.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, tiny_llama
from transformers import LlamaForCausalLM

import hf_relattn
from hf_relattn.modeling import SPEC_KEY

PAD = 0
ATOL_PAD = 1e-5
ATOL_CACHE = 1e-4


# ----------------------------------------------------------------------------- builders
def _llama(kind: str) -> torch.nn.Module:
    model = tiny_llama()
    if kind == "gqa_all":  # native: stays a LlamaForCausalLM with num_key_value_heads=2
        hf_relattn.convert(model, "gqa", num_key_value_heads=2)
        assert type(model) is LlamaForCausalLM and model.config.num_key_value_heads == 2
    elif kind == "gqa_partial":
        hf_relattn.convert(model, "gqa", num_key_value_heads=2, layers=[0])
    elif kind == "alibi_flag":
        model.set_attn_implementation("relattn_alibi")
    elif kind == "alibi_converted":
        hf_relattn.convert(model, "alibi", layers=[1])
    elif kind == "gqa_alibi":
        hf_relattn.convert(model, "gqa", num_key_value_heads=2, layers=[0])
        hf_relattn.convert(model, "alibi")
    else:
        raise AssertionError(kind)
    return model


def _bert(kind: str) -> torch.nn.Module:
    model = tiny_bert()
    if kind == "gqa":
        hf_relattn.convert(model, "gqa", num_key_value_heads=2)
        assert all(m.key.out_features == 2 * 8 for m in (layer.attention.self for layer in model.bert.encoder.layer))
    elif kind == "alibi_flag":
        model.set_attn_implementation("relattn_alibi")
    elif kind == "alibi_converted":
        hf_relattn.convert(model, "alibi", layers=[0])
    else:
        raise AssertionError(kind)
    return model


def _assert_variant_active(model: torch.nn.Module, native: torch.nn.Module, inputs: dict) -> None:
    """The conversion really changed the computation (else the padding checks prove nothing new)."""
    with torch.no_grad():
        a = model(**inputs, output_hidden_states=True).hidden_states[-1]
        b = native(**inputs, output_hidden_states=True).hidden_states[-1]
    assert (a - b).abs().max() > 1e-3


LLAMA_KINDS = ["gqa_all", "gqa_partial", "alibi_flag", "alibi_converted", "gqa_alibi"]
PAD_LLAMA_KINDS = LLAMA_KINDS
BERT_KINDS = ["gqa", "alibi_flag", "alibi_converted"]


def _lengths_batch(ids: torch.Tensor, lengths: list[int], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = ids.shape[1]
    batch = torch.full((len(lengths), width), PAD, dtype=ids.dtype)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "right":
            batch[i, :n] = ids[i, :n]
            mask[i, :n] = 1
        else:
            batch[i, width - n:] = ids[i, :n]
            mask[i, width - n:] = 1
    return batch, mask


def _generate_positions(mask: torch.Tensor) -> torch.Tensor:
    """position_ids as generate() computes them for a padded batch."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


# ------------------------------------------------------------------------------ padding
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", PAD_LLAMA_KINDS)
def test_llama_padding_matches_unpadded(kind: str, side: str, ids: torch.Tensor) -> None:
    model = _llama(kind)
    _assert_variant_active(model, tiny_llama(), {"input_ids": ids})
    lengths = [ids.shape[1], 6]
    batch, mask = _lengths_batch(ids, lengths, side)
    kwargs = {"attention_mask": mask}
    if side == "left":
        kwargs["position_ids"] = _generate_positions(mask)
    with torch.no_grad():
        padded = model(batch, **kwargs).logits
        assert torch.isfinite(padded).all()  # fully masked pad rows must not produce NaN
        for i, n in enumerate(lengths):
            alone = model(ids[i : i + 1, :n]).logits[0]
            real = padded[i, :n] if side == "right" else padded[i, ids.shape[1] - n :]
            torch.testing.assert_close(real, alone, atol=ATOL_PAD, rtol=0)


@pytest.mark.parametrize("kind", BERT_KINDS)
def test_bert_right_padding_matches_unpadded(kind: str, ids: torch.Tensor) -> None:
    model = _bert(kind)
    _assert_variant_active(model, tiny_bert(), {"input_ids": ids})
    lengths = [ids.shape[1], 6]
    batch, mask = _lengths_batch(ids, lengths, "right")
    with torch.no_grad():
        out = model(batch, attention_mask=mask, output_hidden_states=True)
        for i, n in enumerate(lengths):
            alone = model(ids[i : i + 1, :n], output_hidden_states=True)
            torch.testing.assert_close(out.hidden_states[-1][i, :n], alone.hidden_states[-1][0], atol=ATOL_PAD, rtol=0)
            # the classification head reads the first token, which attends to every real token
            torch.testing.assert_close(out.logits[i], alone.logits[0], atol=ATOL_PAD, rtol=0)


@pytest.mark.parametrize("kind", BERT_KINDS)
def test_bert_padding_is_not_ignored(kind: str, ids: torch.Tensor) -> None:
    """Without the mask the pad tokens change the real tokens' outputs: the mask does reach the engine."""
    model = _bert(kind)
    batch, mask = _lengths_batch(ids, [ids.shape[1], 6], "right")
    with torch.no_grad():
        masked = model(batch, attention_mask=mask, output_hidden_states=True).hidden_states[-1][1, :6]
        unmasked = model(batch, output_hidden_states=True).hidden_states[-1][1, :6]
    assert (masked - unmasked).abs().max() > 1e-3


@pytest.mark.parametrize("kind", PAD_LLAMA_KINDS)
def test_llama_left_padding_is_not_ignored(kind: str, ids: torch.Tensor) -> None:
    model = _llama(kind)
    batch, mask = _lengths_batch(ids, [ids.shape[1], 6], "left")
    pos = _generate_positions(mask)
    with torch.no_grad():
        masked = model(batch, attention_mask=mask, position_ids=pos).logits[1, -6:]
        unmasked = model(batch, position_ids=pos).logits[1, -6:]
    assert (masked - unmasked).abs().max() > 1e-3


# ----------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("kind", LLAMA_KINDS)
def test_llama_kv_cache_decoding_matches_full_forward(kind: str, ids: torch.Tensor) -> None:
    model = _llama(kind)
    prefix = 4
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :prefix], use_cache=True)
        torch.testing.assert_close(out.logits, full[:, :prefix], atol=ATOL_CACHE, rtol=0)
        past = out.cache
        assert past is not None and past.get_seq_length() == prefix
        for t in range(prefix, ids.shape[1]):
            out = model(ids[:, t : t + 1], cache=past, use_cache=True)
            past = out.cache
            torch.testing.assert_close(out.logits[:, 0], full[:, t], atol=ATOL_CACHE, rtol=0)
        assert past.get_seq_length() == ids.shape[1]
    if kind in ("gqa_all", "gqa_partial", "gqa_alibi"):
        # the cache really holds the grouped K/V heads of layer 0
        assert past.layers[0].keys.shape[1] == 2
        assert past.layers[1].keys.shape[1] == (2 if kind == "gqa_all" else 4)


@pytest.mark.parametrize("kind", LLAMA_KINDS)
def test_llama_greedy_generate_matches_full_forward(kind: str, ids: torch.Tensor) -> None:
    model = _llama(kind)
    model.generation_config.eos_token_id = None
    prompt = ids[:, :5]
    new = 6
    with torch.no_grad():
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False)
        assert generated.shape == (2, 5 + new)
        assert torch.equal(generated[:, :5], prompt)
        logits = model(generated).logits
    torch.testing.assert_close(generated[:, 5:], logits[:, 4:-1].argmax(-1), atol=0, rtol=0)


def test_llama_alibi_left_padded_generate_matches_per_sample(ids: torch.Tensor) -> None:
    """Batched generation of a left-padded batch gives each sample's own greedy continuation."""
    model = _llama("gqa_alibi")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    lengths = [7, 4]
    batch, mask = _lengths_batch(ids[:, :7], lengths, "left")
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False)
        for i, n in enumerate(lengths):
            alone = model.generate(ids[i : i + 1, :n], attention_mask=torch.ones(1, n, dtype=torch.long), max_new_tokens=4, do_sample=False)
            assert torch.equal(together[i, 7:], alone[0, n:])
    assert getattr(model.config, SPEC_KEY)["variants"]  # adapted model, not a plain one


@pytest.mark.parametrize("kind", ["alibi_flag", "gqa_alibi"])
def test_llama_bfloat16_left_padding(kind: str, ids: torch.Tensor, tmp_path) -> None:
    """bf16: the masked score (float32 min) becomes -inf; fully masked pad rows must stay finite."""
    tiny_llama().save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    if kind == "alibi_flag":
        model.set_attn_implementation("relattn_alibi")
    else:
        hf_relattn.convert(model, "gqa", num_key_value_heads=2, layers=[0])
        hf_relattn.convert(model, "alibi")
    lengths = [ids.shape[1], 5]
    batch, mask = _lengths_batch(ids, lengths, "left")
    with torch.no_grad():
        padded = model(batch, attention_mask=mask, position_ids=_generate_positions(mask)).logits
        assert padded.dtype == torch.bfloat16 and torch.isfinite(padded).all()
        for i, n in enumerate(lengths):
            alone = model(ids[i : i + 1, :n]).logits[0]
            torch.testing.assert_close(padded[i, ids.shape[1] - n :], alone, atol=1e-2, rtol=0)
