"""Issue 16, options and specs: every way in (convert, a flag's options, a saved spec, the
remote-code copy) refuses bad input with a clear error before anything runs or changes;
combinations are checked the same in any order; convert is all-or-nothing and never redoes a
variant silently. References: the untouched model's own state and outputs, and a fresh
conversion of the requested layers."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_same_state, state_copy, tiny_bert, tiny_llama, tiny_vit
from reference import attention_modules
from transformers import AutoModelForCausalLM, OPTConfig, OPTForCausalLM

import hf_relattn
from hf_relattn.variants.base import ATTACHED, get_variant_class
from hf_relattn.variants.shaw import Shaw

REPO = Path(__file__).resolve().parents[1]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _untouched(model):
    """What a refused call must leave as it was."""
    return (type(model), type(model.config), json.dumps(model.config.to_dict(), sort_keys=True, default=str),
            model.config._attn_implementation, [tuple(getattr(m, ATTACHED, ())) for m in attention_modules(model)])


# ------------------------------------------------------------------ 1. option values
BAD_OPTIONS = [
    ("sliding_window", {"window": 0}, "window must be an integer in [1,"),
    ("sliding_window", {"window": -3}, "window must be an integer in [1,"),
    ("sliding_window", {"window": 1.5}, "window must be an integer in [1,"),
    ("sliding_window", {"window": math.nan}, "window must be an integer in [1,"),
    ("sliding_window", {"window": 10**12}, "window must be an integer in [1, 16,777,216]"),
    ("sliding_window", {"block_size": 10**12}, "block_size must be an integer in [1, 16,777,216]"),
    ("moba", {"top_k": 0}, "top_k must be an integer in [1,"),
    ("moba", {"gate": "bogus"}, "gate must be one of 'token', 'block'"),
    ("strided", {"stride": 10**12}, "stride must be an integer in [1, 16,777,216]"),
    ("fixed", {"block": 0}, "block must be an integer in [1,"),
    ("power", {"window": "8"}, "window must be an integer in [1,"),
]
BAD_CONVERT_ONLY = [
    ("shaw", {"max_distance": 10**12}, "max_distance must be an integer in [1, 65,536]"),
    ("t5_bias", {"num_buckets": 10**12}, "num_buckets must be an integer in [1, 65,536]"),
    ("relation", {"num_relations": 10**12}, "num_relations must be an integer in [2, 65,536]"),
    ("gqa", {"num_key_value_heads": 10**12}, "num_key_value_heads must be an integer in [1, 65,536]"),
    ("moh", {"aux_loss_coef": math.inf}, "aux_loss_coef must be a number in [0,"),
    ("moh", {"active_heads": math.nan}, "active_heads must be a number in (0, 1]"),
    ("moh", {"shared_heads": "most"}, "shared_heads must be a count"),
    ("mosa", {"sparsity": 10**12}, "sparsity must be an integer in [1, 16,777,216]"),
]


@pytest.mark.parametrize("name, options, message", BAD_OPTIONS + BAD_CONVERT_ONLY)
def test_convert_refuses_bad_option_values(name, options, message, ids):
    model = tiny_llama()
    before, state, logits = _untouched(model), state_copy(model), _logits(model, ids)
    with pytest.raises(ValueError, match=re.escape(message)):
        hf_relattn.convert(model, name, **options)
    assert _untouched(model) == before
    assert_same_state(state, model)
    torch.testing.assert_close(_logits(model, ids), logits, atol=0, rtol=0)


@pytest.mark.parametrize("name, options, message", BAD_OPTIONS)
def test_flag_options_are_refused_at_load(name, options, message, tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=re.escape(message)):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=f"relattn_{name}", relattn=options)


def test_flag_options_are_refused_when_switching(ids):
    model = tiny_llama()
    model.config.relattn = {"window": 0}
    with pytest.raises(ValueError, match=re.escape("window must be an integer in [1,")):
        model.set_attn_implementation("relattn_sliding_window")
    assert model.config._attn_implementation == "sdpa"


# ------------------------------------------------------- 1. saved specs and their weights
def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def _entry(name):
    return lambda c: next(e for e in c["relattn"]["variants"] if e["name"] == name)


SPEC_EDITS = {
    "window_zero": (lambda c: _entry("sliding_window")(c)["options"].update(window=0), "window must be an integer"),
    "window_huge": (lambda c: _entry("sliding_window")(c)["options"].update(window=10**12), "window must be an integer"),
    "unknown_option": (lambda c: _entry("shaw")(c)["options"].update(radius=3), "Unknown option(s) ['radius']"),
    "unknown_variant": (lambda c: _entry("shaw")(c).update(name="shawn"), "Unknown variant 'shawn'"),
    "negative_layer": (lambda c: _entry("shaw")(c).update(layers=[-1]), "distinct layer indices in 0..2"),
    "layer_out_of_range": (lambda c: _entry("sliding_window")(c).update(layers=[1, 3]), "distinct layer indices in 0..2"),
    "duplicate_layer": (lambda c: _entry("sliding_window")(c).update(layers=[0, 0]), "distinct layer indices"),
    "empty_layers": (lambda c: _entry("sliding_window")(c).update(layers=[]), "non-empty list"),
    "layers_not_list": (lambda c: _entry("sliding_window")(c).update(layers="0"), "non-empty list"),
    "options_not_dict": (lambda c: _entry("shaw")(c).update(options=[3]), "options must be a dict"),
    "entry_not_dict": (lambda c: c["relattn"]["variants"].append("alibi"), "an entry is a dict"),
    "spec_null": (lambda c: c.update(relattn=None), "must be its variant spec"),
    "spec_missing": (lambda c: c.pop("relattn"), "must be its variant spec"),
    "variants_empty": (lambda c: c["relattn"].update(variants=[]), "not used ["),
    "format": (lambda c: c["relattn"].update(format=2), "unsupported spec format 2"),
    # the spec and the weights disagree
    "entry_deleted": (lambda c: c["relattn"]["variants"].remove(_entry("shaw")(c)), "not used ["),
    "tables_smaller": (lambda c: _entry("shaw")(c)["options"].update(max_distance=2), "ignore_mismatched_sizes"),
    "layer_added": (lambda c: _entry("shaw")(c).update(layers=[0, 2]), "missing ["),
    "values_dropped": (lambda c: _entry("shaw")(c)["options"].update(values=False), "not used ["),
    "sink_logit_dropped": (lambda c: _entry("sliding_window")(c)["options"].update(sink_logit=False), "not used ["),
    # combinations no conversion can make
    "sparse_with_scores": (lambda c: _entry("sliding_window")(c).update(layers=[0, 1]), "a sparse pattern ['sliding_window'] with score terms ['shaw']"),
    "two_patterns": (lambda c: c["relattn"]["variants"].append({"name": "strided", "options": {"stride": 4}, "layers": [1]}),
                     "two sparse patterns"),
}


@pytest.fixture(scope="module")
def saved_spec_folder(tmp_path_factory):
    """A LLaMA with Shaw on layer 0, a sliding window with sink logits on layer 1, layer 2 plain."""
    model = tiny_llama(layers=3)
    hf_relattn.convert(model, "shaw", max_distance=3, layers=[0])
    hf_relattn.convert(model, "sliding_window", window=4, block_size=4, sink_logit=True, layers=[1])
    folder = tmp_path_factory.mktemp("spec")
    model.save_pretrained(folder)
    return folder


def _copy(folder: Path, target: Path) -> Path:
    target.mkdir(exist_ok=True)
    for item in folder.iterdir():
        if item.is_file():
            (target / item.name).write_bytes(item.read_bytes())
    return target


@pytest.mark.parametrize("case", list(SPEC_EDITS))
def test_edited_spec_fails_the_load(case, saved_spec_folder, tmp_path):
    folder = _copy(saved_spec_folder, tmp_path / "edited")
    AutoModelForCausalLM.from_pretrained(folder)  # loads before the edit
    edit, message = SPEC_EDITS[case]
    _edit_config(folder, edit)
    with pytest.raises((ValueError, RuntimeError), match=re.escape(message)):
        AutoModelForCausalLM.from_pretrained(folder)


REMOTE_LOADER = """
import importlib.util, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path = [p for p in sys.path if not (p in ("", ".") or (p.startswith(REPO) and ".venv" not in p))]
assert importlib.util.find_spec("hf_relattn") is None
import transformers
for folder in sys.argv[1:]:
    try:
        transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        print("LOADED", folder)
    except ValueError as error:
        print("REFUSED", str(error).replace("\\n", " "))
""".replace("REPO", repr(str(REPO)))


def test_remote_code_copy_checks_the_spec_too(saved_spec_folder, tmp_path):
    cases = ["window_zero", "entry_deleted", "sparse_with_scores"]
    folders = []
    for case in cases:
        folder = _copy(saved_spec_folder, tmp_path / case)
        for name in [p.name for p in saved_spec_folder.iterdir() if p.suffix == ".py"]:
            (folder / name).write_text((saved_spec_folder / name).read_text())
        _edit_config(folder, SPEC_EDITS[case][0])
        folders.append(str(folder))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", REMOTE_LOADER, *folders], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(("LOADED", "REFUSED"))]
    assert len(lines) == len(cases), result.stdout
    for line, case in zip(lines, cases):
        assert line.startswith("REFUSED") and SPEC_EDITS[case][1] in line, (case, line)


# ------------------------------------------------------------------- 2. combinations
ORDERS = [
    (("sliding_window", {"window": 4}), ("alibi", {})),
    (("alibi", {}), ("sliding_window", {"window": 4})),
    (("sliding_window", {"window": 4}), ("shaw", {"max_distance": 2})),
    (("shaw", {"max_distance": 2}), ("sliding_window", {"window": 4})),
    (("t5_bias", {}), ("moba", {"block_size": 4, "top_k": 2})),
    (("strided", {"stride": 4}), ("fixed", {"block": 4, "summary": 1})),
]


@pytest.mark.parametrize("first, second", ORDERS, ids=[f"{a[0]}-then-{b[0]}" for a, b in ORDERS])
@pytest.mark.parametrize("way", ["convert", "flag-then-convert"])
def test_unsupported_combination_refused_in_any_order(first, second, way, ids):
    model = tiny_llama()
    if way == "flag-then-convert":
        if not get_variant_class(first[0]).flag:
            pytest.skip(f"{first[0]} has no flag")
        model.config.relattn = first[1]
        model.set_attn_implementation(f"relattn_{first[0]}")
    else:
        hf_relattn.convert(model, first[0], **first[1])
    before, state = _untouched(model), state_copy(model)
    replace = {"replace": True} if first[0] == second[0] else {}
    with pytest.raises(ValueError, match="cannot combine"):
        hf_relattn.convert(model, second[0], layers=[1], **second[1], **replace)
    assert _untouched(model) == before
    assert_same_state(state, model)


def test_flag_onto_an_incompatible_conversion_is_refused():
    model = hf_relattn.convert(tiny_llama(), "shaw", max_distance=2)
    with pytest.raises(ValueError, match="cannot combine"):
        model.set_attn_implementation("relattn_sliding_window")
    assert model.config._attn_implementation == "relattn"


SUPPORTED = [
    [("gqa", {"num_key_value_heads": 2, "layers": [1]}), ("sliding_window", {"window": 4, "sinks": 1}), ("moh", {"active_heads": 0.5})],
    [("alibi", {}), ("shaw", {"max_distance": 2}), ("t5_bias", {}), ("moh", {"router": "query_norm", "active_heads": 0.75})],
    [("prune", {"heads": {0: [1]}}), ("strided", {"stride": 4})],
]


@pytest.mark.parametrize("steps", SUPPORTED, ids=["gqa-window-moh", "scores-moh", "prune-strided"])
def test_supported_combinations_save_reload_and_run(steps, ids, tmp_path):
    model = tiny_llama()
    for name, options in steps:
        options = dict(options)
        hf_relattn.convert(model, name, layers=options.pop("layers", None), **options)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path), ids), _logits(model, ids), atol=0, rtol=0)


# ----------------------------------------------------------------- 3. all-or-nothing
FAILING = [("llama", "shaw", {"max_distance": 2}), ("bert", "gqa", {"num_key_value_heads": 2, "layers": [0]}),
           ("vit", "moh", {"active_heads": 0.5}), ("llama", "sliding_window", {"window": 4, "sink_logit": True}),
           ("llama", "prune", {"heads": {0: [1]}})]


@pytest.mark.parametrize("family, name, options", FAILING, ids=[f"{f}-{n}" for f, n, _ in FAILING])
@pytest.mark.parametrize("converted", [False, True], ids=["native", "adapted"])
def test_failure_inside_apply_restores_the_model(family, name, options, converted, monkeypatch, ids, pixels):
    model = {"llama": tiny_llama, "bert": tiny_bert, "vit": tiny_vit}[family]()
    if converted:
        hf_relattn.convert(model, "gqa", num_key_value_heads=2, layers=[1])
    inputs = {"pixel_values": pixels} if family == "vit" else {"input_ids": ids}
    with torch.no_grad():
        reference = model(**inputs).logits
    before, state = _untouched(model), state_copy(model)
    parameters = dict(model.named_parameters())
    variant_cls = get_variant_class(name)
    real_apply = variant_cls.apply

    def apply_then_fail(self, *args, **kwargs):
        real_apply(self, *args, **kwargs)  # the model is changed: new modules, weights, class
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(variant_cls, "apply", apply_then_fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        hf_relattn.convert(model, name, **options)
    assert _untouched(model) == before
    assert_same_state(state, model)
    # the very same parameter objects (an optimizer holding them stays valid)
    assert all(p is parameters[n] for n, p in model.named_parameters())
    assert set(dict(model.named_parameters())) == set(parameters)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference, atol=0, rtol=0)


# ---------------------------------------------------------------- 4. converting again
def test_second_convert_keeps_trained_tables_unless_replace(ids):
    model = hf_relattn.convert(tiny_llama(), "shaw", max_distance=2)
    with torch.no_grad():
        tables = [p for n, p in model.named_parameters() if "relattn_shaw" in n]
        for p in tables:
            p.normal_()  # "trained" tables
    assert tables
    trained, logits = state_copy(model), _logits(model, ids)
    with pytest.raises(ValueError, match=r"shaw is already on layers \[0, 1\].*replace=True"):
        hf_relattn.convert(model, "shaw", max_distance=2)
    assert_same_state(trained, model)
    torch.testing.assert_close(_logits(model, ids), logits, atol=0, rtol=0)
    # replace=True starts afresh: the same as converting the original model
    hf_relattn.convert(model, "shaw", max_distance=4, replace=True)
    fresh = hf_relattn.convert(tiny_llama(), "shaw", max_distance=4)
    assert model.config.relattn == fresh.config.relattn
    assert_same_state(state_copy(fresh), model)


def test_second_window_refused_then_replaced_without_leftovers(ids):
    model = hf_relattn.convert(tiny_llama(), "sliding_window", window=8, sink_logit=True)
    with pytest.raises(ValueError, match="sliding_window is already on layers"):
        hf_relattn.convert(model, "sliding_window", window=16)
    assert model.config.relattn["variants"][0]["options"]["window"] == 8
    hf_relattn.convert(model, "sliding_window", window=3, replace=True)
    fresh = hf_relattn.convert(tiny_llama(), "sliding_window", window=3)
    assert model.config.relattn == fresh.config.relattn
    assert set(state_copy(model)) == set(state_copy(fresh))  # the old sink logits are gone
    torch.testing.assert_close(_logits(model, ids), _logits(fresh, ids), atol=0, rtol=0)


def test_structure_variants_compose_instead(ids):
    """gqa/prune act on the current weights again (no replace needed): mqa after gqa-2 on BERT."""
    model = hf_relattn.convert(tiny_bert(), "gqa", num_key_value_heads=2, layers=[0])
    hf_relattn.convert(model, "mqa", layers=[0])
    assert attention_modules(model)[0].key.out_features == model.config.hidden_size // 4


def test_flag_then_convert_honours_layers(ids):
    model = tiny_llama(layers=3)
    model.set_attn_implementation("relattn_alibi")
    before = _untouched(model)
    with pytest.raises(ValueError, match=r"alibi is already on every layer.*replace=True"):
        hf_relattn.convert(model, "alibi", layers=[0, -1])
    assert _untouched(model) == before
    hf_relattn.convert(model, "alibi", layers=[0, -1], replace=True)
    assert model.config._attn_implementation == "relattn"
    assert model.config.relattn["variants"] == [{"name": "alibi", "options": {}, "layers": [0, 2]}]
    reference = hf_relattn.convert(tiny_llama(layers=3), "alibi", layers=[0, 2])
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), atol=0, rtol=0)


def test_another_flag_persists_on_every_layer_with_a_conversion(ids):
    model = tiny_llama()
    model.config.relattn = {"window": 4}
    model.set_attn_implementation("relattn_sliding_window")
    hf_relattn.convert(model, "gqa", num_key_value_heads=2, layers=[0])
    names = [(e["name"], e["layers"]) for e in model.config.relattn["variants"]]
    assert names == [("gqa", [0]), ("sliding_window", [0, 1])]


# ------------------------------------------------------------------------- 5. flags
def test_misspelled_flag_names_the_valid_ones(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError) as info:
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="relattn_alibai")
    message = str(info.value)
    assert "relattn_alibai" in message and "relattn_alibi" in message and "relattn_sliding_window" in message


def test_flag_on_unsupported_family_refused_like_convert():
    # OPT: a family the plugin does not adapt (GPT-2 was the example until issue 18 added it)
    model = OPTForCausalLM(OPTConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=8, ffn_dim=16, vocab_size=32,
                                     word_embed_proj_dim=8))
    with pytest.raises(ValueError, match="Unsupported architecture 'opt'.*llama"):
        model.set_attn_implementation("relattn_alibi")
    with pytest.raises(ValueError, match="Unsupported architecture 'opt'"):
        OPTForCausalLM._from_config(model.config, attn_implementation="relattn_sliding_window")


def test_flag_check_against_the_model():
    with pytest.raises(ValueError, match="needs a causal decoder"):
        tiny_bert().set_attn_implementation("relattn_moba")


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert, lambda: hf_relattn.convert(tiny_llama(), "gqa", num_key_value_heads=2),
                                   lambda: hf_relattn.convert(tiny_llama(), "alibi")],
                         ids=["llama", "bert", "native-gqa", "alibi"])
def test_relation_ids_refused_by_models_that_cannot_use_them(build, ids):
    model = build()
    relation_ids = torch.zeros(1, ids.shape[1], ids.shape[1], dtype=torch.long)
    with pytest.raises(ValueError, match="relation_ids"):
        model(ids, relation_ids=relation_ids)


def test_force_implementation_as_the_readme_shows_it(ids):
    model = hf_relattn.convert(tiny_llama(), "alibi")
    from hf_relattn.engine import implementation

    forced = hf_relattn.force_implementation("reference")
    with forced:
        assert implementation() == "reference"
        reference = _logits(model, ids)
        with forced:  # re-entrant
            assert implementation() == "reference"
        assert implementation() == "reference"
    assert implementation() == "auto"
    with forced:  # reusable
        assert implementation() == "reference"
    torch.testing.assert_close(_logits(model, ids), reference, atol=1e-5, rtol=1e-5)

    @hf_relattn.force_implementation("dense")
    def inside() -> str:
        return implementation()

    assert inside() == "dense" and implementation() == "auto"
    with pytest.warns(UserWarning, match="has no effect"):
        hf_relattn.force_implementation("reference")  # called alone: says so instead of doing nothing silently
    assert implementation() == "auto"
    with pytest.raises(ValueError, match="valid: auto, dense, reference, flex"):
        hf_relattn.force_implementation("fast")


def test_shaw_option_is_checked_where_built():
    with pytest.raises(ValueError, match="max_distance"):
        Shaw(max_distance=0)


# ------------------------------------------------------ what convert writes always loads
SEQUENCES = {
    # a later conversion takes layers over from an entry whose options name layers
    "moh-shared-per-layer-then-replace": [("moh", {"shared_heads": {0: [0, 1], 1: [1, 2]}}),
                                          ("moh", {"layers": [1], "replace": True, "shared_heads": 0.5})],
    "prune-twice": [("prune", {"heads": {0: [1], 1: [2]}}), ("prune", {"heads": {1: [0]}, "layers": [1]})],
    # a native conversion of every layer supersedes the only entry: the spec is empty
    "gqa-layer-then-native-mqa": [("gqa", {"num_key_value_heads": 2, "layers": [0]}), ("mqa", {})],
}


@pytest.mark.parametrize("case", list(SEQUENCES))
def test_every_conversion_sequence_reloads(case, ids, tmp_path):
    model = tiny_llama()
    for name, options in SEQUENCES[case]:
        options = dict(options)
        hf_relattn.convert(model, name, layers=options.pop("layers", None), **options)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path), ids), _logits(model, ids), atol=0, rtol=0)


def test_flag_model_checks_run_at_load(tmp_path):
    from transformers import AutoModelForSequenceClassification

    tiny_bert().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="needs a causal decoder"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, attn_implementation="relattn_moba")


def test_failed_convert_keeps_hook_handles_working(monkeypatch, ids):
    model = tiny_llama()
    calls = []
    handle = attention_modules(model)[0].register_forward_hook(lambda *a: calls.append(1))
    real_apply = Shaw.apply

    def apply_then_fail(self, *args, **kwargs):
        real_apply(self, *args, **kwargs)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Shaw, "apply", apply_then_fail)
    with pytest.raises(RuntimeError):
        hf_relattn.convert(model, "shaw")
    handle.remove()
    _logits(model, ids)
    assert calls == []


def test_convert_of_an_offloaded_model(ids):
    """Weights on the meta device (accelerate's CPU/disk offload) have no values to copy for the
    rollback: converting a variant that leaves them alone must still work."""
    from accelerate import cpu_offload

    model = tiny_llama()
    reference = hf_relattn.convert(tiny_llama(), "alibi", layers=[0])
    cpu_offload(model, execution_device=torch.device("cpu"))
    hf_relattn.convert(model, "alibi", layers=[0])
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), atol=1e-6, rtol=0)



def test_cli_convert_again_needs_replace(saved_spec_folder, tmp_path, capsys):
    from hf_relattn.cli import main

    args = ["convert", str(saved_spec_folder), str(tmp_path / "again"), "--variant", "shaw", "--max-distance", "2", "--layers", "0"]
    assert main(args) == 2
    assert "--replace on the command line" in capsys.readouterr().err
    assert main([*args, "--replace"]) == 0
    entries = json.loads((tmp_path / "again" / "config.json").read_text())["relattn"]["variants"]
    assert {"name": "shaw", "options": {"values": True, "per_head": False, "max_distance": 2}, "layers": [0]} in entries
