"""`hf_relattn.finetune`: real Accelerate runs on tiny models and real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import hf_relattn.finetune as finetune_pkg
import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import DATA, free_port, requires_minilm, save_tiny_llama
from hf_relattn.finetune import main, run
from hf_relattn.finetune.args import parse_args
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

RECIPES = Path(finetune_pkg.__file__).parent / "recipes"
CONFIGS = Path(finetune_pkg.__file__).parent / "accelerate_configs"
TEXT = "\n".join(topics[k] for k in sorted(topics))[:80_000]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny random LLaMA with a byte-level BPE tokenizer trained here on the same text."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), TEXT)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(TEXT)
    return path


def lm_args(llama_dir: Path, text_file: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--model", str(llama_dir), "--data", str(text_file), "--output", str(output),
        "--block-size", "32", "--batch-size", "4", "--learning-rate", "3e-3", "--logging-steps", "1",
        "--eval-fraction", "0.1", "--eval-batches", "4", *extra,
    ]


def losses(output: Path) -> list[float]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_causal_lm_loss_decreases_and_output_is_a_checkpoint(llama_dir, text_file, tmp_path):
    out = tmp_path / "out"
    metrics = run(parse_args(lm_args(llama_dir, text_file, out, "--variant", "gqa", "--variant-options", "num_key_value_heads=2,init=mean", "--max-steps", "20")))
    trace = losses(out)
    assert len(trace) == 20
    assert sum(trace[-5:]) / 5 < sum(trace[:5]) / 5 - 0.2
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_key_value_heads == 2  # GQA on every LLaMA layer stays native
    args = json.loads((out / "training_args.json").read_text())
    assert args["variant"] == "gqa" and args["max_steps"] == 20
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["steps"] == 20 and final["train_tokens"] == 20 * 4 * 32
    assert final["eval_loss"] == pytest.approx(metrics["eval_loss"])
    assert (out / "tokenizer.json").is_file()


def test_resume_reproduces_the_uninterrupted_run(llama_dir, text_file, tmp_path):
    full = tmp_path / "full"
    common = ("--variant", "mqa", "--max-steps", "8", "--warmup-steps", "2")
    run(parse_args(lm_args(llama_dir, text_file, full, *common, "--save-steps", "4")))
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = tmp_path / "resumed"
    run(parse_args(lm_args(llama_dir, text_file, resumed, *common, "--resume", str(full / "checkpoints" / "step-4"))))
    assert losses(resumed) == losses(full)[4:]
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_cpu_ddp(llama_dir, text_file, tmp_path):
    out = tmp_path / "ddp"
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [
        str(accelerate), "launch", "--config_file", str(CONFIGS / "cpu_ddp2.yaml"), "--main_process_port", str(free_port()),
        "-m", "hf_relattn.finetune", *lm_args(llama_dir, text_file, out, "--variant", "gqa", "--variant-options", "num_key_value_heads=2", "--max-steps", "4"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["processes"] == 2
    checksums = final["weight_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert final["train_tokens"] == 4 * 2 * 4 * 32  # steps x processes x batch x block


def test_lora_merge_equals_unmerged_peft_model(llama_dir, text_file, tmp_path, ids):
    from peft import PeftModel

    common = ("--variant", "gqa", "--variant-options", "num_key_value_heads=2", "--layers", "0", "--lora-r", "4", "--max-steps", "5")
    run(parse_args(lm_args(llama_dir, text_file, tmp_path / "adapter", *common)))
    AcceleratorState._reset_state(reset_partial_state=True)
    run(parse_args(lm_args(llama_dir, text_file, tmp_path / "merged", *common, "--merge")))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "base_model").eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()  # injects LoRA into base
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__name__ == "RelattnLlamaForCausalLM"  # partial GQA: an adapted checkpoint
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        expected = peft_model(ids).logits
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=0)
        # LoRA really trained: the merged model differs from the converted base
        assert (base_logits - expected).abs().max() > 1e-4


def test_train_attention_only_leaves_mlp_untouched(llama_dir, text_file, tmp_path):
    out = tmp_path / "attn"
    run(parse_args(lm_args(llama_dir, text_file, out, "--train", "attention", "--max-steps", "3")))
    before = load_file(llama_dir / "model.safetensors")
    after = load_file(out / "model.safetensors")
    for name, value in after.items():
        if ".self_attn." in name:
            assert not torch.equal(value, before[name]), name
        else:
            assert torch.equal(value, before[name]), name


def test_bf16_mixed_precision_trains(llama_dir, text_file, tmp_path):
    metrics = run(parse_args(lm_args(llama_dir, text_file, tmp_path / "bf16", "--mixed-precision", "bf16", "--max-steps", "3")))
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))


SST2 = DATA / "sst2" / "train_full.tsv"
MNIST = DATA / "mnist" / "t10k-images-idx3-ubyte.gz"


@requires_minilm
@pytest.mark.skipif(not SST2.exists(), reason="../shared/data/sst2 absent")
def test_bert_sequence_classification_runs(tmp_path):
    out = tmp_path / "bert"
    metrics = run(parse_args([
        "--model", "minilm-l6", "--task", "seq-cls", "--data", str(SST2), "--train-size", "64", "--eval-data", str(DATA / "sst2" / "dev.tsv"),
        "--eval-batches", "2", "--output", str(out), "--variant", "gqa", "--variant-options", '{"num_key_value_heads": 4}',
        "--train", "new", "--max-length", "32", "--batch-size", "8", "--max-steps", "3", "--logging-steps", "1",
    ]))
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "relattn_bert"
    assert AutoConfig.from_pretrained(out).num_labels == 2
    assert config["architectures"] == ["RelattnBertForSequenceClassification"]
    # --train new: only the new classification head trained (384 features x 2 labels + 2 biases, as scalars)
    assert json.loads((out / "final_metrics.json").read_text())["trainable_parameters"] == 384 * 2 + 2


@pytest.mark.skipif(not MNIST.exists(), reason="../shared/data/mnist absent")
def test_vit_image_classification_runs(tmp_path):
    out = tmp_path / "vit"
    metrics = run(parse_args([
        "--model", "vit-mnist-tiny", "--task", "image-cls", "--data", str(MNIST), "--train-size", "1024", "--eval-size", "256",
        "--output", str(out), "--variant", "alibi", "--batch-size", "32", "--learning-rate", "1e-3", "--max-steps", "40", "--logging-steps", "1",
    ]))
    assert metrics["eval_accuracy"] > 0.15  # 10 balanced classes: above chance after 40 steps from scratch
    trace = losses(out)
    assert sum(trace[-5:]) / 5 < sum(trace[:5]) / 5 - 0.05
    assert (out / "preprocessor_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["model_type"] == "relattn_vit"


def test_recipes_parse_and_flags_override():
    for recipe in sorted(RECIPES.glob("*.yaml")):
        args = parse_args(["--config", str(recipe), "--max-steps", "3"])
        assert args.model and args.data and args.output and args.max_steps == 3
        assert (Path(__file__).resolve().parents[1] / args.data).exists() or not DATA.exists(), recipe
    args = parse_args(["--config", str(RECIPES / "gqa_uptrain.yaml")])
    assert args.variant == "mqa" and json.loads(args.variant_options) == {"init": "mean"}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task", "image-cls"], "--task image-cls is not available for llama models; valid: causal-lm, seq-cls"),
        (["--data", "/no/such/file.txt"], "not found"),
        (["--block-size", "100000"], "exceeds the model's maximum"),
        (["--task", "seq-cls"], "Column 'label' not found in the data (columns: ['text']); set --label-column"),
        (["--train", "new", "--variant", "gqa", "--variant-options", "num_key_value_heads=2"], "add no new parameters"),
        (["--variant", "gqa", "--variant-options", "num_key_value_heads=3"], "does not divide"),
        (["--lr-scheduler", "bogus"], "valid: cosine, linear, constant"),
    ],
)
def test_bad_input_gives_clear_errors(llama_dir, text_file, tmp_path, capsys, extra, message):
    args = lm_args(llama_dir, text_file, tmp_path / "o", "--max-steps", "2")
    if "--data" in extra:
        args[args.index("--data") + 1] = extra[extra.index("--data") + 1]
        extra = [e for i, e in enumerate(extra) if i not in (extra.index("--data"), extra.index("--data") + 1)]
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err


def test_empty_data_file(llama_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["--model", str(llama_dir), "--data", str(empty), "--output", str(tmp_path / "o")]) == 2
    assert "is empty" in capsys.readouterr().err


def test_seq_cls_columns_from_jsonl(llama_dir, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"text": f"example {i}", "y": i % 2}) for i in range(40)))
    assert main(["--model", str(llama_dir), "--task", "seq-cls", "--data", str(rows), "--output", str(tmp_path / "o"), "--text-column", "text"]) == 2
    err = capsys.readouterr().err
    assert "Column 'label' not found" in err and "['text', 'y']" in err and "--label-column" in err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "nan"
    code = main(lm_args(llama_dir, text_file, out, "--learning-rate", "1e30", "--lr-scheduler", "constant", "--max-grad-norm", "0", "--save-steps", "1", "--max-steps", "6"))
    assert code == 2
    err = capsys.readouterr().err
    assert "training stopped; last good checkpoint:" in err
    good = Path(err.split("last good checkpoint: ")[1].split()[0])
    assert (good / "finetune_state.json").is_file()
    assert torch.isfinite(torch.tensor(json.loads((good / "finetune_state.json").read_text())["loss"]))
    assert not (out / "model.safetensors").exists()  # no final checkpoint from a diverged run


@requires_minilm
def test_masked_lm_from_a_save_to_disk_folder(tmp_path):
    import datasets

    folder = tmp_path / "disk"
    datasets.Dataset.from_dict({"text": [TEXT[i : i + 2000] for i in range(0, 40_000, 2000)]}).save_to_disk(folder)
    out = tmp_path / "mlm"
    metrics = run(parse_args([
        "--model", "minilm-l6", "--task", "masked-lm", "--data", str(folder), "--eval-fraction", "0.2", "--output", str(out),
        "--variant", "mqa", "--block-size", "64", "--batch-size", "8", "--max-steps", "3", "--logging-steps", "1",
    ]))
    # masked-token accuracy is measured only on the masked positions (labels != -100)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["eval_loss"] > 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["RelattnBertForMaskedLM"]


def test_train_new_trains_only_the_variant_tables(llama_dir, text_file, tmp_path):
    out = tmp_path / "t5"
    run(parse_args(lm_args(llama_dir, text_file, out, "--variant", "t5_bias", "--variant-options", "num_buckets=8,max_distance=16",
                           "--train", "new", "--max-steps", "3")))
    before = load_file(llama_dir / "model.safetensors")
    after = load_file(out / "model.safetensors")
    tables = [name for name in after if "relattn_t5_bias" in name]
    assert len(tables) == 2 and all(after[name].abs().sum() > 0 for name in tables)  # zero-init, then trained
    assert all(torch.equal(after[name], before[name]) for name in after if name not in tables)
    assert json.loads((out / "final_metrics.json").read_text())["trainable_parameters"] == sum(after[name].numel() for name in tables)


def test_train_new_moves_the_sink_logits(llama_dir, text_file, tmp_path):
    """--train new trains a fresh sink logit: finetune's AdamW group for sink logits (epsilon
    below their tiny gradient) moves each head's by about the learning rate per step; the
    other weights stay as they were."""
    out = tmp_path / "sinks"
    run(parse_args(lm_args(llama_dir, text_file, out, "--variant", "sliding_window",
                           "--variant-options", "window=8,block_size=4,sinks=2,sink_logit=true",
                           "--train", "new", "--learning-rate", "0.01", "--lr-scheduler", "constant", "--max-steps", "3")))
    trained = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    base_state = base.state_dict()
    for name, value in trained.state_dict().items():
        if name.endswith("relattn_sink_logit"):
            assert ((value + 30.0).abs() > 1e-3).all(), name  # steps of ~lr from -30 (default AdamW: ~1e-9)
        elif name in base_state:
            assert torch.equal(value, base_state[name]), name


# ------------------------------------------------------------------ distillation (--distill)
def test_distill_kl_term_matches_a_hand_computation(llama_dir, text_file, tmp_path):
    """One step at lr 0: the logged KL equals KL(softmax(t/T) || softmax(s/T)) computed here
    token by token from the teacher (model before conversion) and the converted student, and
    the logged loss equals alpha * T^2 * KL + (1 - alpha) * CE."""
    import math

    import hf_relattn
    from hf_relattn.finetune.train import EpochSampler
    from hf_relattn.finetune import data as D
    from transformers import AutoTokenizer

    out = tmp_path / "kd"
    args = lm_args(llama_dir, text_file, out, "--variant", "mqa", "--variant-options", "init=mean", "--distill", "--distill-alpha", "0.7", "--distill-temperature", "3",
                   "--max-steps", "1", "--learning-rate", "0", "--batch-size", "2")
    run(parse_args(args))
    row = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][0]
    # the same first batch, by hand
    parsed = parse_args(args)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    raw = D.split(D.load_raw(str(text_file)), parsed.eval_fraction, None, None)[0]
    teacher = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    student = hf_relattn.convert(AutoModelForCausalLM.from_pretrained(llama_dir), "mqa", init="mean").eval()
    ds = D.prepare("causal-lm", raw, tokenizer, parsed, teacher.config, None)
    order = list(EpochSampler(len(ds), parsed.seed))[:2]
    batch = D.collator("causal-lm", tokenizer, 0.15)([ds[i] for i in order])
    with torch.no_grad():
        s_logits, t_logits = student(**batch).logits.double(), teacher(**batch).logits.double()
        ce = float(student(**batch).loss)
    total, count = 0.0, 0
    mask = batch.get("attention_mask", torch.ones(s_logits.shape[:2], dtype=torch.long))  # packed blocks: every token
    for b in range(2):
        for t in range(s_logits.shape[1]):
            if mask[b, t]:
                p = torch.softmax(t_logits[b, t] / 3, -1)
                q = torch.softmax(s_logits[b, t] / 3, -1)
                total += float((p * (p.log() - q.log())).sum())
                count += 1
    kl = total / count
    assert row["distill_kl"] == pytest.approx(kl, rel=1e-4)
    assert row["loss"] == pytest.approx(0.7 * 9 * kl + 0.3 * ce, rel=1e-4)
    assert math.isfinite(row["loss"])


def test_distill_resume_is_exact(llama_dir, text_file, tmp_path):
    common = ("--variant", "mqa", "--distill", "--max-steps", "6", "--warmup-steps", "1")
    run(parse_args(lm_args(llama_dir, text_file, tmp_path / "full", *common, "--save-steps", "3")))
    AcceleratorState._reset_state(reset_partial_state=True)
    run(parse_args(lm_args(llama_dir, text_file, tmp_path / "resumed", *common, "--resume", str(tmp_path / "full" / "checkpoints" / "step-3"))))
    full = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines() if '"distill_kl"' in x]
    resumed = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines() if '"distill_kl"' in x]
    assert [(r["loss"], r["distill_kl"]) for r in resumed] == [(r["loss"], r["distill_kl"]) for r in full[3:]]
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_distill_with_attention_transfer_and_lora(llama_dir, text_file, tmp_path):
    out = tmp_path / "kd-lora"
    metrics = run(parse_args(lm_args(llama_dir, text_file, out, "--variant", "sliding_window", "--variant-options", "window=8,sinks=2,sink_logit=true",
                                     "--distill", "--attention-transfer-steps", "15", "--calibration-batches", "2", "--attention-transfer-lr", "1e-3",
                                     "--lora-r", "4", "--max-steps", "3")))
    rows = metrics["attention_transfer"]["rows"]
    assert len(rows) == 2 and all(r["after"] < r["before"] for r in rows)
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "attention_transfer" in logged[0] and all("distill_kl" in r for r in logged if "loss" in r)
    assert (out / "adapter_config.json").is_file()
    # the sink logits sit on the attention modules LoRA wraps: they train in place and reach base_model
    base = load_file(out / "base_model" / "model.safetensors")
    sinks = [v for k, v in base.items() if k.endswith("relattn_sink_logit")]
    assert len(sinks) == 2 and all((v != -30.0).all() for v in sinks)


def test_two_process_ddp_distill(llama_dir, text_file, tmp_path):
    out = tmp_path / "ddp-kd"
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [
        str(accelerate), "launch", "--config_file", str(CONFIGS / "cpu_ddp2.yaml"), "--main_process_port", str(free_port()),
        "-m", "hf_relattn.finetune", *lm_args(llama_dir, text_file, out, "--variant", "mqa", "--distill", "--attention-transfer-steps", "5",
                                              "--calibration-batches", "2", "--attention-transfer-lr", "1e-3", "--max-steps", "3"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["processes"] == 2
    assert final["weight_checksums"][0] == final["weight_checksums"][1]
    assert "attention_transfer" in final


def test_integer_labels_keep_their_class_in_an_existing_head():
    """A subset of the data lacking some classes (MNIST digits 0, 3, 5) finetuned on a 10-class
    head: digit 5 stays class 5 (counting the distinct labels would make it class 2); a new head
    (no count given) gets one class per distinct label, in sorted order."""
    import datasets
    from hf_relattn.data import class_labels

    raw = datasets.Dataset.from_dict({"label": [5, 0, 3, 5]})
    assert class_labels(raw, "label", 10) == list(range(10))
    assert class_labels(raw, "label", None) == [0, 3, 5]
    words = datasets.Dataset.from_dict({"label": ["pos", "neg"]})
    assert class_labels(words, "label", 2) == ["neg", "pos"]
    with pytest.raises(ValueError, match="the model's head has 2 classes"):
        class_labels(raw, "label", 2)
