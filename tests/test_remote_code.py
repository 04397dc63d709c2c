"""Adapted checkpoints load with plain transformers (trust_remote_code) where hf_relattn cannot
be imported, and give the plugin's logits; the remote code imports only torch, transformers
and the standard library."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_clip, tiny_llama
from variant_cases import BUILDERS, PADDING_SIDE

import hf_relattn

REPO = Path(__file__).resolve().parents[1]

# (family, auto class, conversions): every axis, on each family where it applies
CASES = {
    "llama-gqa-layer0": ("llama", "AutoModelForCausalLM", [("gqa", {"num_key_value_heads": 1, "layers": [0]})]),
    "llama-alibi": ("llama", "AutoModelForCausalLM", [("alibi", {})]),
    "llama-t5-shaw": ("llama", "AutoModelForCausalLM", [("t5_bias", {}), ("shaw", {"max_distance": 3})]),
    "llama-sliding-window": ("llama", "AutoModelForCausalLM", [("sliding_window", {"window": 4, "block_size": 4})]),
    "llama-moba": ("llama", "AutoModelForCausalLM", [("moba", {"block_size": 4, "top_k": 2})]),
    "llama-sinks-sink-logit": ("llama", "AutoModelForCausalLM", [("sliding_window", {"window": 4, "block_size": 4, "sinks": 2, "sink_logit": True})]),
    "llama-fixed-sinks": ("llama", "AutoModelForCausalLM", [("fixed", {"block": 4, "summary": 1, "sinks": 3})]),
    "llama-mosa": ("llama", "AutoModelForCausalLM", [("mosa", {"sparsity": 2})]),
    "llama-moh-gqa": ("llama", "AutoModelForCausalLM", [("gqa", {"num_key_value_heads": 2}), ("moh", {"active_heads": 0.5, "shared_heads": 1})]),
    "llama-prune": ("llama", "AutoModelForCausalLM", [("prune", {"heads": {0: [1], 1: [0, 3]}})]),
    "bert-shaw": ("bert", "AutoModelForSequenceClassification", [("shaw", {"max_distance": 3})]),
    "bert-moh-query-norm": ("bert", "AutoModelForSequenceClassification", [("moh", {"router": "query_norm", "active_heads": 0.5})]),
    "bert-sliding-window-prune": ("bert", "AutoModelForSequenceClassification", [("sliding_window", {"window": 3, "block_size": 4}), ("prune", {"heads": {1: [2]}})]),
    "vit-shaw": ("vit", "AutoModelForImageClassification", [("shaw", {"max_distance": 2})]),
    "vit-sliding-window-moh": ("vit", "AutoModelForImageClassification", [("sliding_window", {"window": 2, "block_size": 3}), ("moh", {"active_heads": 0.75})]),
    # the other families: one case each (their native features: windows, biases, norms, prefix tokens)
    "mistral-sliding-window": ("mistral", "AutoModelForCausalLM", [("sliding_window", {"window": 4, "block_size": 4})]),
    "qwen2-gqa-alibi": ("qwen2", "AutoModelForCausalLM", [("gqa", {"num_key_value_heads": 1, "layers": [0]}), ("alibi", {})]),
    "qwen3-moh": ("qwen3", "AutoModelForCausalLM", [("moh", {"active_heads": 0.5, "shared_heads": 1})]),
    "smollm3-shaw": ("smollm3", "AutoModelForCausalLM", [("shaw", {"max_distance": 3})]),
    "roberta-shaw": ("roberta", "AutoModelForSequenceClassification", [("shaw", {"max_distance": 3})]),
    "xlm-roberta-moh": ("xlm-roberta", "AutoModelForSequenceClassification", [("moh", {"router": "query_norm", "active_heads": 0.5})]),
    "deit-shaw": ("deit", "AutoModelForImageClassification", [("shaw", {"max_distance": 2})]),
    "dinov2-sliding-window": ("dinov2", "AutoModelForImageClassification", [("sliding_window", {"window": 2, "block_size": 3})]),
    "dinov2-registers-shaw": ("dinov2_with_registers", "AutoModelForImageClassification", [("shaw", {"max_distance": 2})]),
    "gemma3-shaw-gqa": ("gemma3_text", "AutoModelForCausalLM", [("gqa", {"num_key_value_heads": 1, "layers": [1]}), ("shaw", {"max_distance": 3})]),
    "distilbert-t5-bias": ("distilbert", "AutoModelForSequenceClassification", [("t5_bias", {})]),
    "olmo2-gqa-layer0": ("olmo2", "AutoModelForCausalLM", [("gqa", {"num_key_value_heads": 1, "layers": [0]})]),
    "gpt-neox-moh": ("gpt_neox", "AutoModelForCausalLM", [("moh", {"active_heads": 0.5, "shared_heads": 1})]),
    "gpt2-shaw": ("gpt2", "AutoModelForCausalLM", [("shaw", {"max_distance": 3})]),
    "phi3-sliding-window": ("phi3", "AutoModelForCausalLM", [("sliding_window", {"window": 4, "block_size": 4, "sinks": 1})]),
    # ModernBERT: sinks and a sink logit on its local layers (inside the native window)
    "modernbert-sinks-sink-logit": ("modernbert", "AutoModelForSequenceClassification", [("sliding_window", {"window": 3, "block_size": 2, "sinks": 2, "sink_logit": True})]),
    # CLIP: the causal, right-padded text tower; the vision tower; CLIPForImageClassification; the
    # two-tower CLIPModel (its towers' sub-configs must ask for the engine when reloaded)
    "clip-text-sliding-window-gqa": ("clip_text_model", "AutoModel", [("sliding_window", {"window": 3, "block_size": 2, "sinks": 1}), ("gqa", {"num_key_value_heads": 2})]),
    "clip-vision-shaw": ("clip_vision_model", "AutoModel", [("shaw", {"max_distance": 2})]),
    "clip-classifier-sliding-window": ("clip", "AutoModelForImageClassification", [("sliding_window", {"window": 2, "block_size": 3, "sinks": 1})]),
    "clip-model-shaw-gqa": ("clip_model", "AutoModel", [("shaw", {"max_distance": 2}), ("gqa", {"num_key_value_heads": 1, "layers": [1, 3]})]),
}
# families outside the conformance table (CLIPModel takes input_ids and pixel_values)
EXTRA_BUILDERS = {"clip_model": tiny_clip}

LOADER = """
import importlib.util, json, sys
# no route to the plugin: drop its editable finder and the repository from the import path
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path = [p for p in sys.path if not (p in ("", ".") or (p.startswith(REPO) and ".venv" not in p))]
assert importlib.util.find_spec("hf_relattn") is None, "hf_relattn is importable"
import torch, transformers
cases = json.loads(sys.argv[1])
for name, (folder, auto, inputs) in cases.items():
    model = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True).eval()
    batch = torch.load(inputs)
    with torch.no_grad():
        out = model(**batch)
    # a head's logits, CLIPModel's image-text logits, a bare tower's pooled output
    torch.save(next(out[k] for k in ("logits", "logits_per_image", "pooler_output") if k in out), folder + "/remote_logits.pt")
    print(name, type(model).__module__, type(model).__name__)
assert "hf_relattn" not in sys.modules
""".replace("REPO", repr(str(REPO)))


def main_output(out):
    """What the remote load must reproduce: logits, CLIPModel's logits_per_image, or a bare tower's pooled output."""
    return next(out[k] for k in ("logits", "logits_per_image", "pooler_output") if k in out)


def build(family, conversions):
    model = tiny_llama(heads=4, kv_heads=4) if family == "llama" else {**BUILDERS, **EXTRA_BUILDERS}[family]()
    for name, options in conversions:
        options = dict(options)
        layers = options.pop("layers", None)
        hf_relattn.convert(model, name, layers=layers, **options)
    torch.manual_seed(1)
    with torch.no_grad():  # zero-initialised tables and routers would hide a missing piece
        for param_name, param in model.named_parameters():
            if "relattn" in param_name:
                param.normal_(0.0, 0.3)
    return model.eval()


def inputs(family):
    torch.manual_seed(2)
    if family == "clip_model":  # both towers: right-padded text, images
        ids = torch.randint(3, 90, (2, 13))
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 1, 16, 16)}
    if PADDING_SIDE[family] is None:  # vision
        return {"pixel_values": torch.randn(2, 1, 16, 16)}
    ids = torch.randint(3, 90, (2, 13))
    mask = torch.ones_like(ids)
    if PADDING_SIDE[family] == "left":
        mask[1, :3] = 0
    else:
        mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    out = {}
    for name, (family, auto, conversions) in CASES.items():
        model = build(family, conversions)
        folder = root / name
        model.save_pretrained(folder)
        batch = inputs(family)
        torch.save(batch, folder / "inputs.pt")
        with torch.no_grad():
            out[name] = (folder, auto, main_output(model(**batch)))
    return out


def test_plain_transformers_loads_with_remote_code_and_matches(saved, tmp_path):
    cases = {name: (str(folder), auto, str(folder / "inputs.pt")) for name, (folder, auto, _) in saved.items()}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", LOADER, json.dumps(cases)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for name, (folder, _, expected) in saved.items():
        got = torch.load(folder / "remote_logits.pt")
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert "transformers_modules" in result.stdout and "Relattn" in result.stdout


def test_remote_code_imports_only_torch_transformers_and_stdlib(saved):
    folder = next(iter(saved.values()))[0]
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers"}
    files = sorted(folder.glob("*.py"))
    assert {f.name for f in files} >= {"modeling_relattn.py", "relattn_engine.py", "relattn_modeling.py", "relattn_variants.py"}
    for file in files:
        tree = ast.parse(file.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{file.name} imports {roots - allowed}"
            assert "hf_relattn" not in roots
        text = file.read_text()
        for forbidden in ("open(", "urllib", "requests", "socket", "read_text", "torch.load", "hf_hub_download"):
            assert forbidden not in text, f"{file.name} contains {forbidden}"
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoConfig"].startswith("modeling_relattn.")
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))


def test_plugin_load_ignores_the_remote_code(saved):
    """With the plugin imported (and no trust_remote_code) the local adapted classes load."""
    from transformers import AutoModelForCausalLM

    folder, _, expected = saved["llama-moba"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__module__ == "hf_relattn.modeling"
    with torch.no_grad():
        torch.testing.assert_close(model(**torch.load(folder / "inputs.pt")).logits, expected)
