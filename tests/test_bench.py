"""`hf-relattn bench` (hf_relattn.bench), `bench kernels` (hf_relattn.kernels) and the demo wiring,
on tiny random models saved with real tokenizers."""

from __future__ import annotations

import copy
import json
import math
import random
import statistics
import sys
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch
from conftest import DATA, bpe_tokenizer, save_tiny_llama, tiny_bert, tiny_llama
from PIL import Image
from transformers import AutoModelForCausalLM, BertForMaskedLM, PreTrainedTokenizerFast

import hf_relattn
from hf_relattn import bench, demo
from hf_relattn.cli import main
from hf_relattn.variants.base import VARIANTS

TEXT = "\n".join(topics[k] for k in sorted(topics))[:60_000]
# --threads 1: tiny models are dominated by thread-pool hand-offs on a busy 2-core machine
FAST = ["--reps", "2", "--warmup", "1", "--threads", "1"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """Tiny LLaMA, 4 query = 4 K/V heads, with a byte-level BPE tokenizer trained on TEXT."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), TEXT)


@pytest.fixture(scope="module")
def bert_tokenizer() -> PreTrainedTokenizerFast:
    roles = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
    return bpe_tokenizer(TEXT, list(roles.values()), **roles)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(TEXT)
    return path


# ------------------------------------------------------------------------ variant grammar
def test_variant_grammar():
    specs = bench.parse_variants(" gqa:num_key_value_heads=1+alibi, mqa:init=first,alibi:layers=0;-1")
    assert [s.label for s in specs] == ["gqa:num_key_value_heads=1+alibi", "mqa:init=first", "alibi:layers=0;-1"]
    assert [(st.name, st.options, st.layers) for st in specs[0].steps] == [("gqa", {"num_key_value_heads": 1}, None), ("alibi", {}, None)]
    assert specs[1].steps[0].options == {"init": "first"}
    assert specs[2].steps[0].layers == (0, -1)
    assert bench.parse_variants(["mqa", "alibi"])[1].label == "alibi"  # list form (YAML)
    assert bench.parse_variants("") == []


def test_sliding_windows_score_every_token_once():
    for n, context, stride in [(10, 4, 4), (10, 4, 2), (100, 16, 5), (17, 32, 8), (2, 4, 4), (33, 8, 1)]:
        scored: list[int] = []
        for i, (begin, end, n_new) in enumerate(bench.sliding_windows(n, context, stride)):
            assert 0 <= begin < end <= n - 1 and end - begin <= context and 1 <= n_new <= end - begin
            targets = list(range(end - n_new + 1, end + 1))
            if i:  # overlap is context only: at least context - stride tokens before each scored one
                assert targets[0] - 1 - begin >= min(context - stride, targets[0] - 1)
            scored += targets
        assert scored == list(range(1, n)), (n, context, stride)


def test_perplexity_equals_one_pass_cross_entropy():
    model = tiny_llama(heads=4)
    ids = torch.randint(3, 97, (80,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1]
    expected = math.exp(torch.nn.functional.cross_entropy(logits, ids[1:]).item())
    one_window = bench.perplexity(model, ids, context=128, stride=128)
    assert one_window["num_tokens"] == 79
    assert one_window["perplexity"] == pytest.approx(expected, rel=1e-5)
    # short windows: same tokens scored, with less context
    assert bench.perplexity(model, ids, context=16, stride=8)["num_tokens"] == 79


# ----------------------------------------------------------------------- causal LM bench
@pytest.fixture(scope="module")
def llama_run(llama_dir, text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench-llama")
    code = main([
        "bench", "--model", str(llama_dir), "--data", str(text_file), "--out", str(out),
        "--variants", "mqa,gqa:num_key_value_heads=2,alibi,gqa:num_key_value_heads=1+alibi",
        "--context", "64", "--stride", "32", "--max-tokens", "300", "--contexts", "32,64",
        "--decode-contexts", "48", "--new-tokens", "3", *FAST,
    ])
    assert code == 0
    return out


STATS = {"values": list, "median": float, "min": float, "max": float, "q1": float, "q3": float}


def check_stats(stats: dict, reps: int) -> None:
    assert set(stats) == set(STATS)
    for key, kind in STATS.items():
        assert isinstance(stats[key], kind), key
    assert len(stats["values"]) == reps and all(isinstance(v, float) for v in stats["values"])
    assert stats["min"] <= stats["q1"] <= stats["median"] <= stats["q3"] <= stats["max"]
    assert stats["median"] == pytest.approx(statistics.median(stats["values"]))


def test_llama_results_json_is_complete(llama_run):
    res = json.loads((llama_run / "results.json").read_text())
    assert {"format", "tool", "created", "duration_s", "settings", "environment", "model", "quality", "variants",
            "ratio_definitions", "results"} <= set(res)
    env = res["environment"]
    for key in ("python", "torch", "transformers", "hf_relattn", "cpu_model", "platform", "device"):
        assert isinstance(env[key], str) and env[key], key
    assert env["hf_relattn"] == hf_relattn.__version__ and env["torch"] == torch.__version__
    assert isinstance(env["torch_threads"], int) and env["torch_threads"] == 1
    assert res["model"]["task"] == "causal-lm" and res["model"]["num_key_value_heads"] == 4
    assert res["quality"]["metric"] == "perplexity" and res["quality"]["scored_tokens"] == 300
    assert res["settings"]["contexts"] == [32, 64] and res["settings"]["reps"] == 2
    assert [v["label"] for v in res["variants"]] == [r["label"] for r in res["results"][1:]]
    assert res["variants"][3]["steps"] == [
        {"variant": "gqa", "options": {"num_key_value_heads": 1}, "layers": None},
        {"variant": "alibi", "options": {}, "layers": None},
    ]

    labels = [r["label"] for r in res["results"]]
    assert labels == ["baseline", "mqa", "gqa:num_key_value_heads=2", "alibi", "gqa:num_key_value_heads=1+alibi"]
    for r in res["results"]:
        assert isinstance(r["parameters"], int) and r["parameters"] > 0
        q = r["quality"]
        assert q["num_tokens"] == 300 and isinstance(q["perplexity"], float) and 1.0 < q["perplexity"] < 1e4
        assert q["mean_nll"] == pytest.approx(math.log(q["perplexity"]))
        assert [m["context"] for m in r["prefill"]] == [32, 64]
        for m in r["prefill"]:
            check_stats(m["latency_s"], 2)
            check_stats(m["tokens_per_s"], 2)
            assert m["tokens_per_s"]["values"] == pytest.approx([m["context"] / s for s in m["latency_s"]["values"]])
            assert m["peak_memory_bytes"] is not None and all(v >= 0 for v in m["peak_memory_bytes"]["values"])
            assert isinstance(m["kv_cache_bytes"], int) and m["kv_cache_bytes"] > 0
        (d,) = r["decode"]
        assert d["context"] == 48 and d["new_tokens"] == 3
        check_stats(d["seconds"], 2)
        check_stats(d["tokens_per_s"], 2)
    base = res["results"][0]
    assert base["spec"] == [] and base["attn_implementation"] == "sdpa" and base["model_class"] == "LlamaForCausalLM"
    composed = res["results"][4]
    assert composed["model_class"] == "RelattnLlamaForCausalLM" and composed["attn_implementation"] == "relattn"
    assert [v["name"] for v in composed["relattn_spec"]["variants"]] == ["alibi"]  # G=1 on all layers is native


def _paired(v: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(v, b))


def test_llama_ratios_recompute_from_raw_numbers(llama_run):
    res = json.loads((llama_run / "results.json").read_text())
    base = res["results"][0]
    heads = res["model"]["num_attention_heads"]
    for r in res["results"]:
        ratio = r["ratios"]
        assert ratio["quality"] == pytest.approx(r["quality"]["perplexity"] / base["quality"]["perplexity"])
        assert ratio["parameters"] == pytest.approx(r["parameters"] / base["parameters"])
        for m, b in zip(r["prefill"], base["prefill"]):
            got = ratio["prefill"][str(m["context"])]
            assert got["latency_s"] == pytest.approx(_paired(m["latency_s"]["values"], b["latency_s"]["values"]))
            assert got["tokens_per_s"] == pytest.approx(_paired(m["tokens_per_s"]["values"], b["tokens_per_s"]["values"]))
            assert got["kv_cache_bytes"] == pytest.approx(m["kv_cache_bytes"] / b["kv_cache_bytes"])
            base_mem = b["peak_memory_bytes"]["median"]
            assert got["peak_memory_bytes"] == (None if base_mem == 0 else pytest.approx(m["peak_memory_bytes"]["median"] / base_mem))
        for m, b in zip(r["decode"], base["decode"]):
            got = ratio["decode"][str(m["context"])]
            assert got["tokens_per_s"] == pytest.approx(_paired(m["tokens_per_s"]["values"], b["tokens_per_s"]["values"]))
            assert got["seconds"] == pytest.approx(_paired(m["seconds"]["values"], b["seconds"]["values"]))
    assert all(v == pytest.approx(1.0) for v in base["ratios"]["prefill"]["64"].values() if v is not None)

    # K/V cache shrinks exactly H/G times: the tiny model has H = 4 K/V heads
    by_label = {r["label"]: r for r in res["results"]}
    for label, groups in (("mqa", 1), ("gqa:num_key_value_heads=2", 2), ("alibi", 4), ("gqa:num_key_value_heads=1+alibi", 1)):
        for m, b in zip(by_label[label]["prefill"], base["prefill"]):
            assert m["kv_cache_bytes"] * heads // groups == b["kv_cache_bytes"]
        assert by_label[label]["decode"][0]["kv_cache_bytes"] * heads // groups == base["decode"][0]["kv_cache_bytes"]
    # 2 layers x (K + V) x G heads x 16 dims x (48 prefill tokens) x 4 bytes
    assert by_label["mqa"]["decode"][0]["kv_cache_bytes"] == 2 * 2 * 1 * 16 * 48 * 4


def test_llama_plots_and_markdown(llama_run):
    import matplotlib.image

    for name in bench.PLOTS:
        path = llama_run / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        pixels = matplotlib.image.imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
        with Image.open(path) as image:
            image.verify()
    md = (llama_run / "results.md").read_text()
    for label in ("baseline", "mqa", "gqa:num_key_value_heads=1+alibi", "## Prefill", "## Decode", "## Environment", "quality_vs_speed.png"):
        assert label in md


def test_baseline_perplexity_matches_an_own_computation(llama_run, llama_dir, text_file):
    """The bench's number equals the sliding-window perplexity computed here from the raw text."""
    res = json.loads((llama_run / "results.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(llama_dir)
    ids = torch.tensor(tokenizer(text_file.read_text()).input_ids[:301])
    nll, count, scored_until = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, 300, 32):
            end = min(start + 64, 300)
            begin = max(0, end - 64)
            logits = model(ids[None, begin:end]).logits[0].log_softmax(-1)
            for t in range(max(scored_until, begin) + 1, end + 1):  # target t predicted at input position t - 1
                nll -= logits[t - 1 - begin, ids[t]].item()
                count += 1
            scored_until = end
            if end == 300:
                break
    assert count == 300
    assert res["results"][0]["quality"]["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


# ------------------------------------------------------------------ classifiers and MLM
@pytest.fixture(scope="module")
def sentences() -> list[tuple[str, int]]:
    rng = random.Random(0)
    lines = [line.strip() for line in TEXT.splitlines() if 20 < len(line.strip()) < 200 and "\t" not in line]
    return [(line, rng.randrange(3)) for line in lines[:40]]


def test_bert_seq_cls_accuracy_equals_own_computation(tmp_path, bert_tokenizer, sentences):
    folder = tmp_path / "bert"
    model = tiny_bert(heads=4)
    model.resize_token_embeddings(len(bert_tokenizer), mean_resizing=False)
    model.save_pretrained(folder)
    bert_tokenizer.save_pretrained(folder)
    tsv = tmp_path / "data.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in sentences))
    out = tmp_path / "out"
    assert main(["bench", "--model", str(folder), "--data", str(tsv), "--out", str(out), "--variants", "gqa:num_key_value_heads=2,alibi",
                 "--eval-size", "30", "--batch-size", "8", "--max-length", "32", "--contexts", "16,32", "--no-plots", *FAST]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["model"]["task"] == "seq-cls" and res["quality"]["examples"] == 30

    def accuracy(m: torch.nn.Module) -> float:
        correct = 0
        with torch.no_grad():
            for sentence, label in sentences[-30:]:
                enc = bert_tokenizer(sentence, truncation=True, max_length=32, return_tensors="pt")
                correct += int(m(**enc).logits.argmax(-1).item() == label)
        return correct / 30

    model.eval()
    by_label = {r["label"]: r for r in res["results"]}
    assert by_label["baseline"]["quality"]["accuracy"] == accuracy(model)
    assert by_label["gqa:num_key_value_heads=2"]["quality"]["accuracy"] == accuracy(hf_relattn.convert(copy.deepcopy(model), "gqa", num_key_value_heads=2))
    for r in res["results"]:
        assert [m["context"] for m in r["prefill"]] == [16, 32] and r["decode"] == []
        assert all(m["kv_cache_bytes"] is None for m in r["prefill"])
    assert not (out / bench.PLOTS[0]).exists() and (out / "results.md").exists()


def test_masked_lm_uses_the_same_masks_for_every_model(tmp_path, bert_tokenizer, text_file):
    folder = tmp_path / "mlm"
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert(heads=4).config)
    model.resize_token_embeddings(len(bert_tokenizer), mean_resizing=False)
    model.save_pretrained(folder)
    bert_tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    # gqa G = H = 4 is the identity: an adapted model on the engine, same predictions
    assert main(["bench", "--model", str(folder), "--data", str(text_file), "--out", str(out), "--variants", "gqa:num_key_value_heads=4,mqa",
                 "--context", "64", "--max-tokens", "512", "--contexts", "32", "--no-plots", *FAST]) == 0
    res = json.loads((out / "results.json").read_text())
    base, identity, mqa = res["results"]
    assert res["model"]["task"] == "masked-lm" and res["quality"]["blocks"] == 8
    assert base["quality"]["num_masked"] > 20 and 0.0 <= base["quality"]["masked_accuracy"] <= 1.0
    assert identity["quality"] == base["quality"] and identity["model_class"] == "RelattnBertForMaskedLM"
    assert mqa["quality"]["num_masked"] == base["quality"]["num_masked"]


MNIST = DATA / "mnist" / "t10k-images-idx3-ubyte.gz"


@pytest.mark.skipif(not MNIST.exists(), reason="../shared/data/mnist absent")
def test_vit_image_classification(tmp_path):
    out = tmp_path / "vit"
    assert main(["bench", "--model", "vit-mnist-tiny", "--task", "image-cls", "--data", str(MNIST), "--out", str(out),
                 "--variants", "alibi", "--eval-size", "64", "--batch-size", "32", "--no-plots", *FAST]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["quality"]["examples"] == 64 and res["quality"]["metric"] == "accuracy"
    for r in res["results"]:
        assert [m["context"] for m in r["prefill"]] == [(28 // 4) ** 2 + 1]  # patches + [CLS]: one fixed context
        assert 0.0 <= r["quality"]["accuracy"] <= 1.0


# -------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "args, message",
    [
        (["--variants", "mqa,foo"], "Unknown variant 'foo' in --variants entry 'foo'; valid variants: " + ", ".join(sorted(VARIANTS))),
        (["--variants", "gqa:num_key_value_heads"], "Malformed option 'num_key_value_heads' in --variants entry 'gqa:num_key_value_heads'"),
        (["--variants", "gqa:heads=2"], "Unknown option 'heads' for variant 'gqa'"),
        (["--variants", "gqa:heads=2"], "valid options: num_key_value_heads, init, layers"),
        (["--variants", "mqa,,alibi"], "Empty variant entry #2"),
        (["--variants", "mqa+"], "Empty component in --variants entry 'mqa+'"),
        (["--variants", "alibi:layers=a"], "Malformed layers='a'"),
        (["--variants", "mqa,mqa"], "appears twice"),
        (["--data", "/nonexistent/wiki.txt"], "'/nonexistent/wiki.txt' not found"),
        (["--stride", "65", "--context", "64"], "--stride 65 exceeds --context 64"),
        (["--contexts", "32,x"], "--contexts takes comma-separated integers"),
        (["--warmup", "0"], "--warmup must be at least 1"),
    ],
)
def test_bad_arguments_fail_before_loading(tmp_path, capsys, args, message):
    # the model folder does not exist: each error must come from the checks before any load
    assert main(["bench", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert "hf-relattn: error:" in err and message in err
    assert not (tmp_path / "out").exists()


def test_variant_option_values_are_checked_by_convert(llama_dir, tmp_path, capsys):
    assert main(["bench", "--model", str(llama_dir), "--out", str(tmp_path), "--variants", "gqa:num_key_value_heads=3"]) == 2
    assert "does not divide the 4 attention heads" in capsys.readouterr().err


def test_parse_variants_raises_value_error():
    with pytest.raises(ValueError, match="valid variants: " + ", ".join(sorted(VARIANTS))):
        bench.parse_variants("alibi,relative")


def test_config_file_with_flags_overriding(tmp_path):
    config = tmp_path / "bench.yaml"
    config.write_text("model: smollm2-135m\nvariants: [mqa, 'gqa:num_key_value_heads=3']\ncontexts: [128, 256]\nreps: 5\nmax-tokens: 100\n")
    args = bench.build_parser().parse_args(["--config", str(config), "--reps", "2"])
    cfg = bench.config_from_args(args)
    specs = cfg.validate()
    assert cfg.reps == 2 and cfg.contexts == (128, 256) and cfg.max_tokens == 100 and cfg.model == "smollm2-135m"
    assert [s.label for s in specs] == ["mqa", "gqa:num_key_value_heads=3"]
    config.write_text("model: x\nrepetitions: 3\n")
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['repetitions'\]"):
        bench.config_from_args(bench.build_parser().parse_args(["--config", str(config)]))


# ----------------------------------------------------------------------------- kernels
def test_bench_kernels(tmp_path, capsys):
    assert main(["bench", "kernels", "--lengths", "16,32", "--heads", "6", "--head-dim", "8", "--reps", "1",
                 "--matmul-size", "128", "--out", str(tmp_path)]) == 0
    stdout = capsys.readouterr().out
    assert "fp32 matmul ceiling" in stdout
    res = json.loads((tmp_path / "kernels.json").read_text())
    assert res["matmul"]["gflops"] > 0 and res["settings"]["kv_heads"] == [2, 1]
    cases = {r["case"] for r in res["results"]}
    assert cases == {"sdpa", "engine", "engine gqa G=2", "engine gqa G=1", "engine alibi (dense)", "engine alibi (reference)"}
    assert len(res["results"]) == len(cases) * 2 * 2  # x lengths x (fwd, fwd+bwd)
    for r in res["results"]:
        assert r["seconds"]["median"] > 0 and r["gflops"] > 0 and r["pass"] in ("fwd", "fwd+bwd")
        if r["max_abs_diff_vs_check"] is not None:
            assert r["max_abs_diff_vs_check"] < 1e-4, r["case"]
    assert {r["case"] for r in res["results"] if r["max_abs_diff_vs_check"] is not None} == cases - {"sdpa", "engine alibi (reference)"}


def test_bench_kernels_rejects_model_flags(capsys):
    assert main(["bench", "--model", "x", "kernels"]) == 2
    assert "takes no model-bench flags (--model)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- demo
def test_demo_runs_the_bench_with_its_defaults_overridden(llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "demo"
    code = demo.main(["--model", str(llama_dir), "--variants", "mqa", "--data", str(text_file), "--out", str(out),
                      "--context", "32", "--stride", "32", "--max-tokens", "64", "--contexts", "16", "--decode-contexts", "16",
                      "--new-tokens", "2", *FAST])
    assert code == 0
    stdout = capsys.readouterr().out
    assert f"Plots: {out / 'quality_vs_speed.png'}" in stdout
    res = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in res["results"]] == ["baseline", "mqa"]
    assert demo.DEMO_DEFAULTS["variants"] == "gqa:num_key_value_heads=3,mqa,mqa:init=first,alibi"
    assert bench.parse_variants(demo.DEMO_DEFAULTS["variants"])  # the embedded defaults are valid


def test_perf_functions(llama_dir, capsys):
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    over = bench.plugin_overhead(model, context=32, reps=2)
    assert over["ratio"] > 0 and over["max_abs_diff"] < 1e-4 and len(over["plugin_s"]["values"]) == 2
    dec = bench.long_context_decode(model, context=40, new_tokens=2)
    assert dec["kv_cache_ratio"] == pytest.approx(1 / 4) and dec["mqa"]["tokens_per_s"] > 0
    assert demo.main(["--perf", "--model", str(llama_dir), "--prefill-context", "32", "--long-context", "40", "--new-tokens", "2", "--reps", "2"]) == 0
    stdout = capsys.readouterr().out
    assert "identity GQA (G=H=4)" in stdout and "MQA / MHA decode tokens/s ratio at 40 context" in stdout and "KV cache 4.0x smaller" in stdout


def test_table_printing_with_and_without_rich(monkeypatch, capsys):
    headers, rows = ["variant", "tok/s [min-max]"], [["baseline", "10 [9-11]"], ["mqa+alibi", "12 [11-13]"]]
    monkeypatch.setitem(sys.modules, "rich.console", None)  # import fails: the plain fallback
    bench.print_table("title", headers, rows)
    plain = capsys.readouterr().out.splitlines()
    assert plain[1] == "title" and plain[2:] == ["variant    tok/s [min-max]", "---------  ---------------", "baseline         10 [9-11]", "mqa+alibi       12 [11-13]"]
    monkeypatch.undo()
    pytest.importorskip("rich")
    bench.print_table("title", headers, rows)
    fancy = capsys.readouterr().out
    assert "[9-11]" in fancy and "mqa+alibi" in fancy and "tok/s [min-max]" in fancy  # brackets are text, not markup


# ------------------------------------------------------------- relative / relation-aware
def test_bench_reports_shaw_and_relation_beside_the_baseline(llama_dir, text_file, tmp_path):
    out = tmp_path / "rel"
    assert main(["bench", "--model", str(llama_dir), "--data", str(text_file), "--out", str(out),
                 "--variants", "shaw:max_distance=8,relation:num_relations=2", "--context", "64", "--stride", "32",
                 "--max-tokens", "200", "--contexts", "32", "--decode-contexts", "32", "--new-tokens", "2", "--no-plots", *FAST]) == 0
    res = {r["label"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert set(res) == {"baseline", "shaw:max_distance=8", "relation:num_relations=2"}
    base = res["baseline"]["quality"]["perplexity"]
    for label in ("shaw:max_distance=8", "relation:num_relations=2"):  # zero-initialised tables: the same model
        assert res[label]["quality"]["perplexity"] == pytest.approx(base, rel=1e-5)
        assert res[label]["parameters"] > res["baseline"]["parameters"]
        assert res[label]["decode"] and res[label]["prefill"]


def test_same_token_graph_feeds_prefill_and_decoding():
    model = hf_relattn.convert(tiny_llama(), "relation", num_relations=2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "relattn_relation" in name:
                param.normal_()
    ids = torch.tensor([[5, 7, 5, 9, 7, 5, 11, 9]])
    graph = torch.tensor([[[int(a == b) for b in row] for a in row] for row in ids.tolist()])  # written out here
    with torch.no_grad():
        full = model(ids, relation_ids=graph).logits
        model.register_forward_pre_hook(bench.SameTokenGraph(), with_kwargs=True)
        out = model(input_ids=ids[:, :5], use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(5, 8):
            out = model(input_ids=ids[:, t : t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 4:], atol=1e-5, rtol=1e-5)


def test_bench_kernels_relative_suite(tmp_path):
    assert main(["bench", "kernels", "--suite", "relative", "--lengths", "16,48", "--heads", "4", "--head-dim", "8",
                 "--reps", "1", "--matmul-size", "128", "--max-memory-gb", "0.0002", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "kernels.json").read_text())
    rows = {(r["case"], r["length"], r["pass"]): r for r in res["results"]}
    assert {case for case, _, _ in rows} == {f"{c} {m}" for c in ("sdpa", "shaw", "shaw naive") for m in ("causal", "bidir")}
    # the naive path's T x T x d tables: 2 * 48^2 * 8 * 4 bytes = 147 kB (x2 with gradients) vs 0.0002 GB = 215 kB
    assert "skipped" not in rows[("shaw naive causal", 16, "fwd")]
    assert rows[("shaw naive bidir", 48, "fwd+bwd")]["needs_bytes"] == 2 * 48 * 48 * 8 * 4 * 2
    assert "skipped" in rows[("shaw naive bidir", 48, "fwd+bwd")]
    for (case, _, _), r in rows.items():
        if case.startswith("shaw ") and "naive" not in case:
            assert r["max_abs_diff_vs_check"] < 1e-4 and r["baseline"] == "sdpa " + case.split()[-1]


def test_bench_kernels_sparse_suite(tmp_path):
    assert main(["bench", "kernels", "--suite", "sparse", "--lengths", "128", "--heads", "3", "--head-dim", "8",
                 "--reps", "1", "--matmul-size", "64", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "kernels.json").read_text())
    names = {r["case"].split("(")[0] for r in res["results"]}
    assert names == {"sdpa causal", "sliding_window", "moba", "strided", "fixed", "power", "mosa"}
    for r in res["results"]:
        assert r["baseline"] == "sdpa causal" and r["gflops"] > 0
        if r["case"] not in ("sdpa causal", "mosa(sparsity=8)"):  # each pattern against the materialised masked formula
            assert r["max_abs_diff_vs_check"] < 1e-4, r["case"]


def test_bench_decodes_with_the_streaming_cache(llama_dir, text_file, tmp_path):
    """--cache streaming: the window model decodes with a StreamingCache holding at most
    sinks + window + block_size keys per layer; the baseline keeps its dynamic cache."""
    main(["bench", "--model", str(llama_dir), "--variants", "sliding_window:window=8:block_size=4:sinks=2", "--data", str(text_file),
          "--context", "32", "--max-tokens", "64", "--contexts", "32", "--decode-contexts", "96", "--new-tokens", "4",
          "--cache", "streaming", "--out", str(tmp_path), "--no-plots", *FAST])
    results = {r["label"]: r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    base, window = results["baseline"]["decode"][0], results["sliding_window:window=8:block_size=4:sinks=2"]["decode"][0]
    assert (base["cache"], window["cache"]) == ("DynamicCache", "StreamingCache")
    per_token = base["kv_cache_bytes"] / 96  # both layers, keys and values
    assert window["kv_cache_bytes"] <= (2 + 8 + 4) * per_token
    assert "StreamingCache" in (tmp_path / "results.md").read_text()


def test_recovery_demo_runs_and_recovers(llama_dir, tmp_path, capsys):
    """`make demo`'s mode on the tiny model, without ../shared data (pydoc halves): the table has
    its four rows; the MQA rows have a quarter of the tiny original's KV cache (4 K/V heads -> 1)."""
    assert demo.main(["--recovery", "--model", str(llama_dir), "--data", str(tmp_path / "none"), "--eval-tokens", "256",
                      "--calibration-tokens", "256", "--context", "32", "--transfer-steps", "3"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "MB" in line]
    assert len(rows) == 4
    kv = [float(r[3].split()[0]) for r in rows]
    assert kv[1] == kv[2] == kv[3] == pytest.approx(kv[0] / 4, rel=0.01)
