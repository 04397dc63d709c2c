"""Every case of the variant table (tests/variant_cases.py) on its family's tiny random model:
the checks every variant owes, whatever it changes.

- the table covers every registered variant in every family (a case, or a reason why not),
  and the variants said not to apply are refused;
- (a) the default path equals the materialised reference path (`force_implementation("reference")`);
- (b) padding: a right-padded BERT sample equals the sample alone (ViT takes no attention mask;
  decoders: left and right padding in tests/test_paths.py, driven by the same table);
- (c) decoders' cached decoding, token by token, equals the full forward: tests/test_paths.py
  (DynamicCache and StaticCache, `test_static_cache_passed_in_equals_dynamic_and_full_forward`);
- (d) gradients reach the inputs and every parameter, finite, the variant's own ones non-zero;
- (e) save_pretrained then the Auto class's from_pretrained gives the same class, weights and outputs;
- (f) bad option values raise a ValueError naming the option, before anything is modified.

References are independent of the path under test: the other implementation, the sample alone,
the model before saving, the model before the refused call.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from conftest import assert_same_state, state_copy
from transformers import DynamicCache, StaticCache
from variant_cases import (
    AUTO_CLASSES,
    BUILDERS,
    CASES,
    FAMILIES,
    HEADLESS,
    NOT_APPLICABLE,
    NUM_RELATIONS,
    PADDING_SIDE,
    SAME_ATTENTION_AS,
    TOKENS,
    build,
    family_cases,
    is_flag,
    variant_of,
)

import hf_relattn
from hf_relattn import VARIANTS  # the registry, re-exported by the package

SHORT = 7  # the padded sample's length
PAD = 0
ATOL = 1e-5
# option values that are valid at 0 (every numeric option is invalid at -1)
ZERO_ALLOWED = {"sinks", "dense_layers", "shared_heads", "aux_loss_coef"}
CASE_PARAMS = [pytest.param(family, case, id=f"{family}-{case}") for family, case in family_cases()]
# gradients and bad options: not again on a family whose attention another family's table checks
OWN_CASE_PARAMS = [pytest.param(family, case, id=f"{family}-{case}") for family, case in family_cases()
                   if family not in SAME_ATTENTION_AS]


# ----------------------------------------------------------------------------- inputs
def relation_graph(batch: int, length: int, seed: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, NUM_RELATIONS, (batch, length, length), generator=gen)


def sample_inputs(family: str, case: str) -> dict:
    """Two samples of the family's input, with relation ids for `relation` cases. Tokens do not
    repeat within a sample: repeated tokens tie exactly in MoSA's router, and which of them a
    head keeps may then differ between two paths that round a layer's output differently
    (by 1e-8), which says nothing about either path."""
    gen = torch.Generator().manual_seed(1)
    if PADDING_SIDE[family] is None:  # vision
        inputs = {"pixel_values": torch.randn(2, 1, 16, 16, generator=gen)}
    else:
        ids = [torch.randperm(94, generator=gen)[: TOKENS[family]] + 3 for _ in range(2)]
        inputs = {"input_ids": torch.stack(ids)}
    if variant_of(family, case) == "relation":
        inputs["relation_ids"] = relation_graph(2, TOKENS[family])
    return inputs


def padded(family: str, inputs: dict) -> tuple[dict, torch.Tensor]:
    """The batch with sample 1 cut to SHORT tokens and padded on the family's side, and the
    (B, T) mask of real tokens (all real for ViT)."""
    if PADDING_SIDE[family] is None:
        return inputs, torch.ones(2, TOKENS[family], dtype=torch.bool)
    width = TOKENS[family]
    mask = torch.ones(2, width, dtype=torch.long)
    real = slice(width - SHORT, width) if PADDING_SIDE[family] == "left" else slice(0, SHORT)
    mask[1] = 0
    mask[1, real] = 1
    ids = inputs["input_ids"].clone()
    ids[1] = PAD
    ids[1, real] = inputs["input_ids"][1, :SHORT]
    out = {**inputs, "input_ids": ids, "attention_mask": mask}
    if "relation_ids" in inputs:
        graph = inputs["relation_ids"].clone()
        graph[1] = 0
        graph[1, real, real] = inputs["relation_ids"][1, :SHORT, :SHORT]
        out["relation_ids"] = graph
    return out, mask.bool()


def outputs(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, last hidden states): tiny BERT's classifier logits alone hardly tell variants apart.
    A backbone without a head (HEADLESS: CLIP's towers) gives its pooled output for the logits."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return (out.logits if "logits" in out else out.pooler_output), out.hidden_states[-1]


# ------------------------------------------------------------------------------ the table
@pytest.mark.parametrize("family", FAMILIES)
def test_every_variant_has_an_entry_per_family(family):
    """A newly registered variant fails here until each family's table has a case for it or a
    reason why it does not apply; no entry names an unregistered variant."""
    cased = {variant_of(family, case) for case in CASES[family]}
    refused = set(NOT_APPLICABLE[family])
    assert not cased & refused, f"{family}: both a case and not applicable: {sorted(cased & refused)}"
    assert cased | refused <= set(VARIANTS), f"{family}: not registered: {sorted((cased | refused) - set(VARIANTS))}"
    missing = sorted(set(VARIANTS) - cased - refused)
    assert not missing, f"{family}: give {missing} a case in tests/variant_cases.py or a NOT_APPLICABLE reason"
    assert all(isinstance(why, str) and why for why in NOT_APPLICABLE[family].values())
    assert set(CASES) == set(NOT_APPLICABLE) == set(BUILDERS) == set(AUTO_CLASSES) == set(TOKENS) == set(PADDING_SIDE)


def _options_for(variant: str) -> dict:
    """The options of the variant's first case in any family: what it needs to be built."""
    for family, case in family_cases():
        if CASES[family][case][0] == variant:
            return copy.deepcopy(CASES[family][case][1])
    return {}


NOT_APPLICABLE_PARAMS = [pytest.param(f, v, id=f"{f}-{v}") for f, table in NOT_APPLICABLE.items() for v in table]


@pytest.mark.parametrize("family, variant", NOT_APPLICABLE_PARAMS)
def test_not_applicable_variants_are_refused(family, variant):
    """What the table says does not apply is refused with a ValueError, the model untouched
    (when a variant learns the family, this fails: give it a case instead)."""
    model = BUILDERS[family]()
    before, kind = state_copy(model), type(model)
    with pytest.raises(ValueError, match=r"causal decoder|valid families"):
        hf_relattn.convert(model, variant, **_options_for(variant))
    assert_same_state(before, model)
    assert type(model) is kind


# -------------------------------------------------------------- (a) reference path
@pytest.mark.parametrize("family, case", CASE_PARAMS)
def test_default_path_equals_the_reference_path(family, case):
    """The paths `auto` picks (SDPA with a bias, relational, block-sparse, pattern layouts,
    routed) equal the materialised formula, unpadded and padded (at real tokens); and the
    case really changes the computation (else the comparison proves little)."""
    model = build(family, case)
    inputs = sample_inputs(family, case)
    plain = BUILDERS[family]()
    _, native_hidden = outputs(plain, {k: v for k, v in inputs.items() if k != "relation_ids"})
    for batch, real in ((inputs, torch.ones(2, TOKENS[family], dtype=torch.bool)), padded(family, inputs)):
        logits, hidden = outputs(model, batch)
        with hf_relattn.force_implementation("reference"):
            ref_logits, ref_hidden = outputs(model, batch)
        assert torch.isfinite(logits).all() and torch.isfinite(hidden).all()
        torch.testing.assert_close(hidden[real], ref_hidden[real], rtol=1e-5, atol=ATOL)
        if PADDING_SIDE[family] == "left":  # decoders: per token
            torch.testing.assert_close(logits[real], ref_logits[real], rtol=1e-5, atol=ATOL)
        else:  # pooled from [CLS], a real token of every sample
            torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=ATOL)
    _, hidden = outputs(model, inputs)
    assert (hidden - native_hidden).abs().max() > 1e-3, "the case does not change the model's outputs"


# ------------------------------------------------------------------------ (b) padding
ENCODER_PARAMS = [pytest.param(family, case, id=f"{family}-{case}") for family in FAMILIES
                  if PADDING_SIDE[family] == "right" for case in CASES[family]]


@pytest.mark.parametrize("family, case", ENCODER_PARAMS)
def test_right_padded_encoder_sample_equals_the_sample_alone(family, case):
    """Encoders: at its real tokens a right-padded sample gets what it gets alone (patterns,
    sinks, relative terms and routers see no padding). Decoders: tests/test_paths.py (left and
    right padding, from DECODER_CASES) and below; vision models take no attention mask."""
    model = build(family, case)
    inputs = sample_inputs(family, case)
    batch, real = padded(family, inputs)
    logits, hidden = outputs(model, batch)
    for row, n in enumerate([TOKENS[family], SHORT]):
        alone = {"input_ids": inputs["input_ids"][row : row + 1, :n]}
        if "relation_ids" in inputs:
            alone["relation_ids"] = inputs["relation_ids"][row : row + 1, :n, :n]
        alone_logits, alone_hidden = outputs(model, alone)
        assert bool(real[row, :n].all())
        torch.testing.assert_close(hidden[row, :n], alone_hidden[0], rtol=0, atol=ATOL)
        torch.testing.assert_close(logits[row], alone_logits[0], rtol=0, atol=ATOL)
    assert torch.isfinite(hidden).all()  # padding rows too


# ---------------------------------------------------------------------- (d) gradients
@pytest.mark.parametrize("family, case", OWN_CASE_PARAMS)
def test_gradients_reach_inputs_and_parameters(family, case):
    """In training mode, on a padded batch: the loss's gradient reaches the input embeddings
    (pixels) and every parameter, all finite; the variant's own tables, routers and sink
    logits get non-zero gradients."""
    model = build(family, case).train()
    batch, real = padded(family, sample_inputs(family, case))
    if family in HEADLESS:
        _check_headless_gradients(model, batch, real)
        return
    if PADDING_SIDE[family] is None:  # vision
        leaf = batch["pixel_values"].clone().requires_grad_(True)
        kwargs = {"pixel_values": leaf, "labels": torch.tensor([1, 3])}
    else:
        leaf = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        labels = batch["input_ids"].masked_fill(~real, -100) if PADDING_SIDE[family] == "left" else torch.tensor([1, 2])
        kwargs = {"inputs_embeds": leaf, "attention_mask": batch["attention_mask"], "labels": labels}
        if PADDING_SIDE[family] == "left":
            kwargs["use_cache"] = False
    if "relation_ids" in batch:
        kwargs["relation_ids"] = batch["relation_ids"]
    loss = model(**kwargs).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    rows = real if PADDING_SIDE[family] is not None else torch.ones(2, dtype=torch.bool)
    assert leaf.grad[rows].abs().sum() > 0
    # inputs_embeds given: the token table is not used; nor is a vision model's mask token
    # (masked image modelling only)
    table = model.get_input_embeddings().weight if PADDING_SIDE[family] is not None else None
    for name, param in model.named_parameters():
        if param is table or name.endswith("mask_token"):
            continue
        assert param.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        if "relattn" in name:
            assert param.grad.abs().sum() > 0, f"{name} (the variant's) gets a zero gradient"


def _check_headless_gradients(model: torch.nn.Module, batch: dict, real: torch.Tensor) -> None:
    """The gradient test on a backbone without a head or labels (CLIP's towers): a loss on its
    pooled output and every token's last state. CLIPTextModel takes no inputs_embeds: its token
    table stands for the input embeddings (non-zero at the real tokens' rows)."""
    if "pixel_values" in batch:
        leaf = batch["pixel_values"].clone().requires_grad_(True)
        batch = {**batch, "pixel_values": leaf}
    out = model(**batch)
    states = out.last_hidden_state[real] if "attention_mask" in batch else out.last_hidden_state
    loss = out.pooler_output.pow(2).mean() + states.pow(2).mean()
    assert torch.isfinite(loss)
    loss.backward()
    if "pixel_values" in batch:
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0
    else:
        table = model.get_input_embeddings().weight
        assert table.grad[batch["input_ids"][real]].abs().sum(-1).gt(0).all()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        if "relattn" in name:
            assert param.grad.abs().sum() > 0, f"{name} (the variant's) gets a zero gradient"


# ----------------------------------------------------------------------- (e) save/load
# Saving is the slowest check (0.4-0.8 s a case): every case on the first family of each kind
# (llama, bert, vit), and on the other families one case per kind of saved state: a flag, learned
# tables, sink logits, a router, K/V surgery, a sparse pattern (the suite stays under 10 minutes).
SAVE_SAMPLE = ("alibi_flag", "sliding_window_flag", "relation", "sink_logit", "moh_learned", "gqa", "moba")
SAVE_PARAMS = [pytest.param(family, case, id=f"{family}-{case}") for family, case in family_cases()
               if family in ("llama", "bert", "vit") or case in SAVE_SAMPLE]


@pytest.mark.parametrize("family, case", SAVE_PARAMS)
def test_save_pretrained_and_auto_reload_give_the_same_model(family, case, tmp_path):
    """save_pretrained, then the family's Auto class: the same class and weights, identical
    outputs on a padded batch. A flag is a runtime choice (transformers does not save
    attn_implementation): it is given again at load, with its options."""
    model = build(family, case)
    batch, real = padded(family, sample_inputs(family, case))
    logits, hidden = outputs(model, batch)
    state = state_copy(model)
    model.save_pretrained(tmp_path)
    if is_flag(family, case):
        options = copy.deepcopy(CASES[family][case][1])
        loaded = AUTO_CLASSES[family].from_pretrained(tmp_path, attn_implementation=f"relattn_{variant_of(family, case)}",
                                              **({"relattn": options} if options else {}))
        assert loaded.config._attn_implementation == f"relattn_{variant_of(family, case)}"
    else:
        loaded = AUTO_CLASSES[family].from_pretrained(tmp_path)
        if hf_relattn.is_adapted(model):
            assert json.loads((tmp_path / "config.json").read_text())["model_type"] == f"relattn_{family}"
            as_json = lambda spec: json.loads(json.dumps(spec))  # noqa: E731 (JSON makes layer keys text)
            assert as_json(loaded.config.relattn) == as_json(model.config.relattn)
    loaded.eval()
    assert type(loaded) is type(model)
    assert_same_state(state, loaded)
    got_logits, got_hidden = outputs(loaded, batch)
    torch.testing.assert_close(got_hidden[real], hidden[real], atol=0, rtol=0)
    torch.testing.assert_close(got_logits, logits, atol=0, rtol=0)


# -------------------------------------------------------------------- (f) bad options
def bad_values(option: str, value) -> list:
    """Values of the option's kind that no variant accepts."""
    if option == "layers":
        return [[99]]
    if isinstance(value, bool):
        return ["yes"]
    if isinstance(value, (int, float)):
        return [-1] if option in ZERO_ALLOWED else [-1, 0]
    if isinstance(value, str):
        return ["bogus"]
    if isinstance(value, dict):  # prune's {layer: [heads]}
        return [{-1: [0]}, {0: [99]}]
    raise AssertionError(f"no bad value for {option}={value!r}: add one")


def _untouched(model: torch.nn.Module) -> tuple:
    config = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    return type(model), config, model.config._attn_implementation


@pytest.mark.parametrize("family, case", OWN_CASE_PARAMS)
def test_bad_options_raise_naming_the_option_before_any_change(family, case):
    """Each option of the case set to a bad value of its kind (negative or zero counts, a
    non-boolean flag, an unknown choice, a head outside the layer, a missing layer), and an
    unknown option: a ValueError naming it, and the model as it was (class, config, weights,
    outputs). Flags refuse bad options in config.relattn when switched to."""
    variant = variant_of(family, case)
    options = CASES[family][case][1]
    model = BUILDERS[family]()
    inputs = {k: v for k, v in sample_inputs(family, case).items() if k != "relation_ids"}
    before, state, (logits, _) = _untouched(model), state_copy(model), outputs(model, inputs)
    attempts = [({**copy.deepcopy(options), option: bad}, "layer" if option == "layers" else option)
                for option, value in options.items() for bad in bad_values(option, value)]
    attempts.append(({**copy.deepcopy(options), "bogus_option": 1}, "bogus_option"))
    for bad_options, named in attempts:
        with pytest.raises(ValueError, match=rf"\b{re.escape(named)}"):
            hf_relattn.convert(model, variant, **bad_options)
        if is_flag(family, case) and named != "layer":
            flag_options = {k: v for k, v in bad_options.items() if k != "layers"}
            model.config.relattn = flag_options
            with pytest.raises(ValueError, match=rf"\b{re.escape(named)}"):
                model.set_attn_implementation(f"relattn_{variant}")
            del model.config.relattn  # what the test set (the class default, None, stays)
        assert _untouched(model) == before, bad_options
        assert_same_state(state, model)
    torch.testing.assert_close(outputs(model, inputs)[0], logits, atol=0, rtol=0)


# ------------------------------------------------------- decoder families beyond LLaMA
# LLaMA's decoder paths are tested at length in tests/test_paths.py; every other decoder family
# of the table gets its two essentials here: caches and left padding.
OTHER_DECODER_PARAMS = [pytest.param(family, case, id=f"{family}-{case}") for family in FAMILIES
                        if PADDING_SIDE[family] == "left" and family != "llama" for case in CASES[family]]


@pytest.mark.parametrize("family, case", OTHER_DECODER_PARAMS)
def test_decoder_caches_equal_the_full_forward(family, case):
    """Prefill and single-token steps through a StaticCache and a DynamicCache give the same
    logits, and those of the uncached full forward (MoBA's block gate and MoSA excepted, as in
    tests/test_paths.py: a step is its own query block; MoSA's prefill sees later tokens). On a
    model with a native sliding window the caches built from the config keep only the window:
    patterns placed at positions counted from the first token stay exact past it (positions from
    position_ids), variants that read the first keys themselves refuse the first step past it."""
    model = build(family, case)
    inputs = sample_inputs(family, case)
    ids, graph = inputs["input_ids"], inputs.get("relation_ids")
    prefix = 6

    def extra(length: int) -> dict:
        return {} if graph is None else {"relation_ids": graph[:, :length, :length]}

    variant = VARIANTS[variant_of(family, case)].from_options(
        {k: v for k, v in CASES[family][case][1].items() if k != "layers"})
    window = getattr(model.config, "sliding_window", None)
    if window is not None and variant.sequence_start == "keys":
        # exact while every token is inside the window; refused from the first step past it
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            logits = [model(ids[:, :prefix], cache=cache, use_cache=True, **extra(prefix)).logits]
            for t in range(prefix, window):
                logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True, **extra(t + 1)).logits)
            full = model(ids[:, :window], **extra(window)).logits
            if case not in ("moba_block_gate", "mosa"):  # the exceptions above
                torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=1e-4, rtol=0)
            with pytest.raises(ValueError, match="native sliding window of"):
                model(ids[:, window : window + 1], cache=cache, use_cache=True, **extra(window + 1))
        return

    with torch.no_grad():
        full = model(ids, **extra(ids.shape[1])).logits
        if case == "mosa":
            full[:, :prefix] = model(ids[:, :prefix]).logits
        steps = {}
        for kind, cache in (("static", StaticCache(config=model.config, max_cache_len=32)),
                            ("dynamic", DynamicCache(config=model.config))):  # windowed layers keep only the window
            logits = [model(ids[:, :prefix], cache=cache, use_cache=True, **extra(prefix)).logits]
            for t in range(prefix, ids.shape[1]):
                logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True, **extra(t + 1)).logits)
            steps[kind] = torch.cat(logits, dim=1)
    torch.testing.assert_close(steps["static"], steps["dynamic"], atol=1e-4, rtol=0)
    torch.testing.assert_close(steps["static"][:, :prefix], full[:, :prefix], atol=1e-4, rtol=0)
    if case not in ("moba_block_gate", "mosa"):
        torch.testing.assert_close(steps["static"], full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["sliding_window", "fixed"])
def test_generate_past_the_native_window_with_left_padding(case):
    """generate() on Mistral (native window of 8) with a pattern counting positions from each
    sample's first token, a left-padded batch, 12 new tokens: every step's scores equal a full
    forward of the text so far (own positions from the mask, as generate gives them)."""
    model = build("mistral", case)
    batch, mask = padded("mistral", sample_inputs("mistral", case))
    ids, attention = batch["input_ids"][:, -9:], batch["attention_mask"][:, -9:]  # sample 1: 2 pads, 7 tokens
    with torch.no_grad():
        out = model.generate(ids, attention_mask=attention, max_new_tokens=12, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=PAD)
        seq = out.sequences
        for step, logits in enumerate(out.logits):
            length = ids.shape[1] + step
            full_mask = torch.cat([attention, torch.ones(2, step, dtype=attention.dtype)], dim=1)
            positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
            want = model(seq[:, :length], attention_mask=full_mask, position_ids=positions).logits[:, -1]
            torch.testing.assert_close(logits, want, atol=1e-4, rtol=0, msg=lambda m, step=step: f"step {step}: {m}")
    assert seq.shape[1] - (attention[1] == 0).sum() > model.config.sliding_window + 4  # well past the window


@pytest.mark.parametrize("family, case", OTHER_DECODER_PARAMS)
def test_left_padded_decoder_sample_equals_the_sample_alone(family, case):
    model = build(family, case)
    inputs = sample_inputs(family, case)
    batch, mask = padded(family, inputs)
    alone = {"input_ids": inputs["input_ids"][1:, :SHORT]}
    if "relation_ids" in inputs:
        alone["relation_ids"] = inputs["relation_ids"][1:, :SHORT, :SHORT]
    # positions counted from each sample's first token, as generate() gives them (learned
    # absolute positions, GPT-2's, depend on it)
    positions = (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        together = model(**batch, position_ids=positions).logits[1, mask[1]]
        expected = model(**alone).logits[0]
    torch.testing.assert_close(together, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family, case", OTHER_DECODER_PARAMS)
def test_decoder_default_path_equals_the_materialised_path(family, case):
    """The materialised path (output_attentions=True, what torch.compile runs) applies the mask
    transformers built (padding, causality, a native sliding window) to every variant at once;
    the eager paths, MoSA's expert choice included, give the same logits, padded and unpadded."""
    model = build(family, case)
    inputs = sample_inputs(family, case)
    for batch, real in ((inputs, torch.ones(2, TOKENS[family], dtype=torch.bool)), padded(family, inputs)):
        with torch.no_grad():
            eager = model(**batch).logits
            materialised = model(**batch, output_attentions=True).logits
        torch.testing.assert_close(eager[real], materialised[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", [f for f in FAMILIES if PADDING_SIDE[f] == "left" and "gqa" in CASES[f]])
def test_gqa_on_every_layer_saves_a_plain_native_checkpoint(family, tmp_path):
    """The family's own config expresses grouped K/V heads: GQA on every layer leaves a native
    model (no relattn spec), which plain transformers reloads with the same logits."""
    config = copy.deepcopy(BUILDERS[family]().config)
    config.num_key_value_heads = config.num_attention_heads  # start from multi-head attention
    torch.manual_seed(0)
    model = AUTO_CLASSES[family].from_config(config).eval()
    hf_relattn.convert(model, "gqa", num_key_value_heads=2)
    ids = sample_inputs(family, "gqa")["input_ids"]
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == family and saved["num_key_value_heads"] == 2 and "relattn" not in saved
    reloaded = AUTO_CLASSES[family].from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__.startswith(type(model).__name__.removeprefix("Relattn"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_attention_softcapping_is_refused_not_ignored():
    """Tanh capping of the scores (Gemma 2's `softcap`) has no form in the engine's paths: a call
    that asks for it gets a clear error instead of uncapped scores."""
    from hf_relattn.engine import relattn_attention

    model = build("llama", "alibi_flag")
    module = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 5, 16)
    k = v = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="softcapping"):
        relattn_attention(module, q, k, v, None, softcap=50.0)


# ------------------------------------------------------------- function-preserving starts
IDENTITY = (("shaw", {}), ("t5_bias", {}), ("relation", {"num_relations": NUM_RELATIONS}), ("moh", {"active_heads": 1.0}),
            ("sliding_window", {"window": 64, "sinks": 0, "sink_logit": True}))


@pytest.mark.parametrize("family", FAMILIES)
def test_function_preserving_conversions_leave_outputs_unchanged(family):
    """Zero-initialised tables (Shaw, T5 buckets, relations), every head active (MoH), a window
    covering the sequence with a neutral sink logit: the converted model computes what the
    original did (1e-5), on a padded batch of the family's inputs."""
    original = BUILDERS[family]()
    for name, options in IDENTITY:
        if name in NOT_APPLICABLE[family]:
            continue
        inputs = sample_inputs(family, "relation" if name == "relation" else "shaw")  # relation_ids for relation
        batch, real = padded(family, inputs)
        plain = {k: v for k, v in batch.items() if k != "relation_ids"}
        before, before_hidden = outputs(original, plain)
        model = hf_relattn.convert(copy.deepcopy(original), name, **options)
        after, after_hidden = outputs(model, batch)
        torch.testing.assert_close(after_hidden[real], before_hidden[real], atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        if after.dim() == 3:
            after, before = after[real], before[real]
        torch.testing.assert_close(after, before, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


# ----------------------------------------------------------------------- half precision
HALF_CASES = ("shaw", "sliding_window")  # the score path (relative table) and the sparse path, on every family


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_forward_and_backward_on_every_family(family):
    """The family's own modules (fused projections, q/k norms, Conv1D, prefix tokens) with a
    variant in bf16: a padded batch's real tokens within bf16's tolerance of the same model in
    float32, and a finite backward (LLaMA's half-precision paths, decoding and fp16 included,
    are in tests/test_paths.py)."""
    for case in HALF_CASES:
        case = case if case in CASES[family] else case + "_flag"  # CLIPForImageClassification: the flag form
        reference = build(family, case)
        model = copy.deepcopy(reference).to(torch.bfloat16)
        batch, real = padded(family, sample_inputs(family, case))
        half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
        want, _ = outputs(reference, batch)
        got, _ = outputs(model, half)
        assert got.dtype == torch.bfloat16
        if want.dim() == 3:  # per-token logits: the real tokens
            want, got = want[real], got[real]
        scale = want.abs().max().item()
        torch.testing.assert_close(got.float(), want, atol=0.05 * max(scale, 1.0), rtol=0.05)
        model.train()
        out = model(**half)
        (out.logits if "logits" in out else out.pooler_output).float().square().mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), (family, case)
