"""The one table of variant cases per model family, which the generic tests are parametrised
from (tests/test_conformance.py for every family, tests/test_paths.py for decoders).

A case is `name -> (variant, options)`: `variant` is a registered name (converted with
`hf_relattn.convert(model, variant, **options)`) or `"flag:<variant>"` (selected with
`set_attn_implementation("relattn_<variant>")`, the options going into `config.relattn`).
Options are small, so that tiny models with sequences of 8 to 17 tokens cross several blocks,
windows and strides.

Adding a variant: give it a case in each family's table, or say in `NOT_APPLICABLE` why the
family cannot take it; `test_conformance.test_every_variant_has_an_entry_per_family` fails
until then. Adding a family: an entry in `CASES`, `NOT_APPLICABLE`, `BUILDERS`, `AUTO_CLASSES`, `TOKENS`
and `PADDING_SIDE` (and `HEADLESS` for a backbone without a task head).
"""

from __future__ import annotations

import copy

import torch
from conftest import tiny_bert, tiny_clip_classifier, tiny_clip_text, tiny_clip_vision, tiny_encoder, tiny_gemma3, tiny_gpt2, tiny_gpt_neox, tiny_llama, tiny_modernbert, tiny_phi3, tiny_mistral, tiny_olmo2, tiny_qwen2, tiny_qwen3, tiny_smollm3, tiny_vision, tiny_vit
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification

import hf_relattn

NUM_RELATIONS = 3
REGISTERS = 2  # DINOv2's register tokens (after [CLS], before the patches) in the tiny model

# name -> (variant or "flag:<variant>", options); tables and routers get random values in `build`
DECODER_CASES = {
    "alibi_flag": ("flag:alibi", {}),
    "t5_bias": ("t5_bias", {"num_buckets": 8, "max_distance": 16}),
    "shaw": ("shaw", {"max_distance": 3}),
    "relation": ("relation", {"num_relations": NUM_RELATIONS}),
    "sliding_window": ("sliding_window", {"window": 4, "block_size": 2, "sinks": 2}),
    "sink_logit": ("sliding_window", {"window": 3, "block_size": 2, "sinks": 1, "sink_logit": True}),
    "strided": ("strided", {"stride": 3, "block_size": 2, "sinks": 0}),
    "fixed": ("fixed", {"block": 4, "summary": 1, "sinks": 3}),
    "power": ("power", {"block_size": 2, "window": 2, "sinks": 0}),
    "moba": ("moba", {"block_size": 2, "top_k": 2, "sinks": 3}),
    "moba_block_gate": ("moba", {"block_size": 3, "top_k": 2, "gate": "block", "sinks": 0}),
    "moh_query_norm": ("moh", {"router": "query_norm"}),
    "moh_learned": ("moh", {"router": "learned", "active_heads": 0.5, "shared_heads": 1}),
    "mosa": ("mosa", {"sparsity": 3}),
    # structure: on the decoders' 4 query / 2 K/V heads. gqa on one layer (an adapted model with
    # per-layer K/V counts), mqa on all (the native LLaMA with one K/V head), prune leaves 3
    # query heads on 3 K/V heads in layer 0 (uneven runs 1, 2 of the two groups)
    "gqa": ("gqa", {"num_key_value_heads": 1, "layers": [0]}),
    "mqa": ("mqa", {}),
    "prune": ("prune", {"heads": {0: [1]}}),
}

# BERT: bidirectional, right-padded batches
ENCODER_CASES = {
    "alibi": ("alibi", {}),
    "alibi_flag": ("flag:alibi", {}),
    "t5_bias": ("t5_bias", {"num_buckets": 8, "max_distance": 16}),
    "shaw": ("shaw", {"max_distance": 3}),
    "relation": ("relation", {"num_relations": NUM_RELATIONS}),
    "sliding_window": ("sliding_window", {"window": 3, "block_size": 2, "sinks": 2}),
    "sink_logit": ("sliding_window", {"window": 3, "block_size": 2, "sinks": 1, "sink_logit": True}),
    "strided": ("strided", {"stride": 3, "block_size": 2, "sinks": 1}),
    "fixed": ("fixed", {"block": 4, "summary": 1, "sinks": 0}),
    "power": ("power", {"block_size": 2, "window": 2, "sinks": 1}),
    "moh_query_norm": ("moh", {"router": "query_norm"}),
    "moh_learned": ("moh", {"router": "learned", "active_heads": 0.5, "shared_heads": 1}),
    "gqa": ("gqa", {"num_key_value_heads": 2, "layers": [0]}),
    "mqa": ("mqa", {}),
    "prune": ("prune", {"heads": {0: [1]}}),
}

# ViT: [CLS] + 4 x 4 patches (17 tokens), no attention mask; patterns and Shaw's labels on the 2-D grid
VISION_CASES = {
    "alibi": ("alibi", {}),
    "t5_bias": ("t5_bias", {"num_buckets": 8, "max_distance": 16}),
    "shaw": ("shaw", {"max_distance": 2}),
    "relation": ("relation", {"num_relations": NUM_RELATIONS}),
    "sliding_window": ("sliding_window", {"window": 2, "block_size": 3, "sinks": 1}),
    "sliding_window_flag": ("flag:sliding_window", {"window": 2, "block_size": 3, "sinks": 1}),
    "sink_logit": ("sliding_window", {"window": 2, "block_size": 3, "sinks": 1, "sink_logit": True}),
    "strided": ("strided", {"stride": 3, "block_size": 2, "sinks": 0}),
    "fixed": ("fixed", {"block": 4, "summary": 1, "sinks": 2}),
    "power": ("power", {"block_size": 2, "window": 2, "sinks": 1}),
    "moh_query_norm": ("moh", {"router": "query_norm"}),
    "moh_learned": ("moh", {"router": "learned", "active_heads": 0.5, "shared_heads": 1}),
    "gqa": ("gqa", {"num_key_value_heads": 2}),
    "mqa": ("mqa", {"layers": [1]}),
    "prune": ("prune", {"heads": {1: [0, 2]}}),
}

CAUSAL_ONLY = "needs a causal decoder: {what}; BERT and ViT attention is bidirectional (convert refuses it)"
# decoders with LLaMA's layout take the decoder table (mistral and qwen2 with native sliding windows)
DECODERS = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma3_text", "olmo2", "gpt_neox", "gpt2", "phi3")
EQUAL_PARTS = ("its forward splits the fused q/k/v output into three equal parts, so K/V cannot have fewer heads than "
               "the queries (convert refuses it)")
PHI3_PRUNE = ("its forward takes the number of query rows from the model config, so one layer cannot lose query heads "
              "(convert refuses it)")
# modernbert: fused Wqkv, rotary positions, a native bidirectional window on its local layers
ENCODERS = ("bert", "roberta", "xlm-roberta", "distilbert", "modernbert")
VISION = ("vit", "deit", "dinov2", "dinov2_with_registers")
CASES = {**dict.fromkeys(DECODERS, DECODER_CASES), **dict.fromkeys(ENCODERS, ENCODER_CASES),
         **dict.fromkeys(VISION, VISION_CASES)}
# CLIP (patches/clip.py): the text tower is causal (is_causal passed with each call) and
# right-padded, without a KV cache: the decoder cases on the encoders' padding checks; the vision
# tower and CLIPForImageClassification (model_type clip, vision tower only) take the ViT cases.
# The two-tower CLIPModel (input_ids and pixel_values): tests/test_clip.py.
CLIP_TOWERS = ("clip_text_model", "clip_vision_model")
CASES["clip_text_model"] = DECODER_CASES
CASES["clip_vision_model"] = VISION_CASES
# CLIPForImageClassification runs the vision tower's attention modules, whose every case
# clip_vision_model checks: here one case per variant (a flag's options reaching the tower's
# sub-config, sink logits), for the model type's own paths (adapter, top config, reload)
CASES["clip"] = {case: VISION_CASES[case] for case in ("alibi", "t5_bias", "shaw", "sliding_window_flag", "sink_logit", "strided",
                                                        "fixed", "power", "moh_learned", "gqa", "mqa", "prune")}
# family -> the family whose table checks the same attention modules case by case: the
# per-case gradient and bad-option checks run there only (the suite stays under 10 minutes)
SAME_ATTENTION_AS = {"clip": "clip_vision_model"}
# backbones without a task head (CLIP's towers): the tests compare their pooled output
# (text: the highest token id, CLIP's pooling; vision: [CLS]) and train on it
HEADLESS = CLIP_TOWERS
CASES["olmo2"] = {case: entry for case, entry in DECODER_CASES.items() if entry[0] != "prune"}
CASES["phi3"] = CASES["olmo2"]
for _family in ("gpt_neox", "gpt2"):  # multi-head: prune removes each head's q, k and v rows of the fused matrix
    CASES[_family] = {case: entry for case, entry in DECODER_CASES.items() if entry[0] not in ("gqa", "mqa")}
CASES["modernbert"] = {case: entry for case, entry in ENCODER_CASES.items() if entry[0] not in ("gqa", "mqa")}
# family -> {variant: why the family cannot take it}
NOT_APPLICABLE = {
    **{family: {} for family in DECODERS},
    **{family: {
        "moba": CAUSAL_ONLY.format(what="its gate chooses among earlier key blocks"),
        "mosa": CAUSAL_ONLY.format(what="its expert choice routes tokens under the causal mask"),
    } for family in ENCODERS + VISION},
    "olmo2": {"prune": "q_norm normalises all query heads together, so removing one changes the others (convert refuses it)"},
    "phi3": {"prune": PHI3_PRUNE},
    **{family: {"gqa": EQUAL_PARTS, "mqa": EQUAL_PARTS} for family in ("gpt_neox", "gpt2")},
    "clip_text_model": {},
    "clip_vision_model": {
        "moba": CAUSAL_ONLY.format(what="its gate chooses among earlier key blocks"),
        "mosa": CAUSAL_ONLY.format(what="its expert choice routes tokens under the causal mask"),
    },
    "clip": {
        "moba": "needs a causal decoder: CLIPForImageClassification holds only the bidirectional vision tower (on "
                "CLIPModel, moba converts the text layers: tests/test_clip.py)",
        "mosa": "needs a causal decoder: CLIPForImageClassification holds only the bidirectional vision tower (on "
                "CLIPModel, mosa converts the text layers: tests/test_clip.py)",
        "relation": "a tower's attention sees its sub-config, not the model's variant spec, and CLIPModel passes "
                    "relation_ids to both towers, whose sequences differ (convert refuses it; clip_text_model and "
                    "clip_vision_model take it)",
    },
}
NOT_APPLICABLE["modernbert"] = {**NOT_APPLICABLE["modernbert"], "gqa": EQUAL_PARTS, "mqa": EQUAL_PARTS}
# what the generic tests need to know of a family
BUILDERS = {
    "llama": lambda: tiny_llama(kv_heads=2),  # 4 query heads on 2 K/V heads
    "mistral": tiny_mistral,
    "qwen2": tiny_qwen2,
    "qwen3": tiny_qwen3,
    "smollm3": tiny_smollm3,
    "olmo2": tiny_olmo2,
    "gpt_neox": tiny_gpt_neox,
    "gpt2": tiny_gpt2,
    "phi3": tiny_phi3,
    "gemma3_text": tiny_gemma3,
    "distilbert": lambda: tiny_encoder("distilbert"),
    "roberta": lambda: tiny_encoder("roberta"),
    "xlm-roberta": lambda: tiny_encoder("xlm-roberta"),
    "deit": lambda: tiny_vision("deit"),
    "dinov2": lambda: tiny_vision("dinov2"),
    "dinov2_with_registers": lambda: tiny_vision("dinov2_with_registers", num_register_tokens=REGISTERS),
    "bert": tiny_bert,
    "modernbert": tiny_modernbert,
    "vit": tiny_vit,
    "clip_text_model": tiny_clip_text,
    "clip_vision_model": tiny_clip_vision,
    "clip": tiny_clip_classifier,
}
AUTO_CLASSES = {**dict.fromkeys(DECODERS, AutoModelForCausalLM), **dict.fromkeys(ENCODERS, AutoModelForSequenceClassification),
                **dict.fromkeys(VISION, AutoModelForImageClassification), **dict.fromkeys(CLIP_TOWERS, AutoModel),
                "clip": AutoModelForImageClassification}
# sequence length of the test inputs (vision: the prefix tokens + 4 x 4 patches; DeiT has two)
TOKENS = {**dict.fromkeys(DECODERS, 13), **dict.fromkeys(ENCODERS, 11), "vit": 17, "deit": 18, "dinov2": 17,
          "dinov2_with_registers": 17 + REGISTERS,
          "clip_text_model": 13, "clip_vision_model": 17, "clip": 17}
PADDING_SIDE = {**dict.fromkeys(DECODERS, "left"), **dict.fromkeys(ENCODERS, "right"), **dict.fromkeys(VISION, None),
                "clip_text_model": "right", "clip_vision_model": None, "clip": None}  # vision: no mask
FAMILIES = tuple(CASES)


def variant_of(family: str, case: str) -> str:
    """The registered variant name of a case ("flag:alibi" -> "alibi")."""
    return CASES[family][case][0].removeprefix("flag:")


def is_flag(family: str, case: str) -> bool:
    return CASES[family][case][0].startswith("flag:")


def family_cases() -> list[tuple[str, str]]:
    """Every (family, case) of the table."""
    return [(family, case) for family, table in CASES.items() for case in table]


def randomize(model: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """Random values for what the variants added (tables, routers, sink logits; MoSA's router
    larger, so its choices are not near ties): no zero initialisation hides a path's mistake."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "relattn" in name:
                param.copy_((0.5 if "mosa" not in name else 3.0) * torch.randn(param.shape, generator=gen))
    return model


def build(family: str, case: str) -> torch.nn.Module:
    """The family's tiny random model (conftest) with the case's variant, new tables and routers random."""
    name, options = CASES[family][case]
    options = copy.deepcopy(options)
    model = BUILDERS[family]()
    if name.startswith("flag:"):
        if options:
            model.config.relattn = options
        model.set_attn_implementation("relattn_" + name.removeprefix("flag:"))
    else:
        hf_relattn.convert(model, name, **options)
    return randomize(model)
