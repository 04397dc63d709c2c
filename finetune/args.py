"""Arguments of `hf_relattn.finetune`, parsed the transformers way (HfArgumentParser).

`--config recipe.yaml` (or .json) supplies defaults; flags given on the command line win.
Variant options take flags as in `hf-relattn convert` (`--num-key-value-heads 1`), besides
`--variant-options`; `--block-size` keeps its meaning here (tokens per block), so a sparse
variant's block size goes through `--variant-options block_size=N`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any

from transformers import HfArgumentParser

from hf_relattn.settings import add_variant_option_flags, read_settings_file, variant_option_values, variant_options

TASKS = ("causal-lm", "masked-lm", "seq-cls", "image-cls")
TRAIN_SELECTIONS = ("all", "attention", "new")
SCHEDULERS = ("cosine", "linear", "constant")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class FinetuneArguments:
    # ---- model and variant
    model: str | None = _help("Model source: preset (smollm2-135m, minilm-l6, vit-mnist-tiny), folder or Hub id.", default=None)
    output: str | None = _help("Output folder: the trained checkpoint, its tokenizer/processor, args and metrics.", default=None)
    variant: str | None = _help("Variant to convert to before training (see `hf-relattn variants`).", default=None)
    variant_options: str | None = _help('Variant options: JSON object or k=v,k=v (e.g. "num_key_value_heads=1,init=mean").', default=None)
    layers: str | None = _help("Comma-separated layer indices to convert (default: all).", default=None)
    task: str | None = _help(f"One of {', '.join(TASKS)}; default: from the model's head.", default=None)
    num_labels: int | None = _help("Classes for seq-cls/image-cls (default: from the data).", default=None)
    dtype: str = _help("Weights dtype to load: float32 or bfloat16.", default="float32")
    # ---- data
    data: str | None = _help("Training data: text file, .tsv/.csv/.jsonl, MNIST *-idx3-ubyte[.gz], save_to_disk folder, or Hub dataset.", default=None)
    eval_data: str | None = _help("Evaluation data (same formats); default: a split of --data.", default=None)
    eval_fraction: float = _help("Fraction of --data held out for evaluation (taken from the end, deterministic).", default=0.0)
    eval_size: int | None = _help("Number of examples held out for evaluation (from the end); overrides --eval-fraction.", default=None)
    train_size: int | None = _help("Use only the first N training examples.", default=None)
    text_column: str = _help("Text column of tabular data.", default="sentence")
    label_column: str = _help("Label column of tabular/image data.", default="label")
    block_size: int = _help("Tokens per packed block (causal-lm, masked-lm).", default=256)
    max_length: int = _help("Max tokens per example (seq-cls).", default=128)
    mlm_probability: float = _help("Masking rate for masked-lm.", default=0.15)
    # ---- optimisation
    seed: int = _help("Random seed (data order, initialisation, masking).", default=42)
    batch_size: int = _help("Per-device batch size.", default=8)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    learning_rate: float = _help("Peak learning rate (AdamW).", default=5e-5)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    max_grad_norm: float = _help("Gradient clipping norm (0 disables).", default=1.0)
    lr_scheduler: str = _help(f"One of {', '.join(SCHEDULERS)}.", default="cosine")
    warmup_steps: int = _help("Linear warm-up steps.", default=0)
    max_steps: int | None = _help("Optimizer steps to run (default: one epoch, or --train-tokens).", default=None)
    train_tokens: int | None = _help("Token budget (LM tasks): steps = tokens / (batch x block x accumulation x processes).", default=None)
    num_epochs: int = _help("Epochs when neither --max-steps nor --train-tokens is set.", default=1)
    mixed_precision: str = _help("no, bf16 or fp16 (bf16 works on CPU).", default="no")
    train: str = _help(f"What trains: {', '.join(TRAIN_SELECTIONS)} (new = parameters the variant or task head adds).", default="all")
    # ---- recovery: distillation and attention transfer from the model before conversion
    distill: bool = _help("Distil the model before conversion (frozen teacher, same tokenizer): loss = alpha * T^2 * KL + (1 - alpha) * task loss.", default=False)
    distill_alpha: float = _help("Weight of the KL term in [0, 1].", default=0.5)
    distill_temperature: float = _help("Softmax temperature T of teacher and student (> 0).", default=2.0)
    teacher: str | None = _help("Teacher / transfer reference (default: --model as loaded, before --variant converts it).", default=None)
    attention_transfer_steps: int = _help("Before training, attention transfer (hf_relattn.calibrate): N steps per converted layer.", default=0)
    attention_transfer_lr: float = _help("Learning rate of the attention transfer (AdamW, cosine).", default=1e-5)
    calibration_batches: int = _help("Training batches (from the start of --data) that fit the variant's initialisation when it can "
                                     "(gqa/mqa init=aligned, moh shared_heads=importance) and feed the attention transfer.", default=16)
    # ---- PEFT
    lora_r: int = _help("LoRA rank on the attention projections (0: no LoRA).", default=0)
    lora_alpha: int = _help("LoRA alpha.", default=16)
    lora_dropout: float = _help("LoRA dropout.", default=0.0)
    merge: bool = _help("Merge LoRA into the weights and save a plain adapted checkpoint.", default=False)
    # ---- bookkeeping
    save_steps: int = _help("Save a resumable checkpoint (accelerator.save_state) every N steps (0: never).", default=0)
    eval_steps: int = _help("Evaluate every N steps (0: only at the end).", default=0)
    eval_batches: int | None = _help("Cap the evaluation to N batches.", default=None)
    logging_steps: int = _help("Log every N steps.", default=10)
    resume: str | None = _help("Resume from a checkpoint folder, or 'latest' (the newest complete one in --output). Loads "
                               "pickled optimizer/RNG state (accelerate): resume only from folders you trust.", default=None)
    resume_changed_ok: bool = _help("Resume even though settings that change the run (learning rate, batch size, data, "
                                    "variant, ...) differ from the checkpoint's; without it such a resume is refused.", default=False)
    replace: bool = _help("Convert --variant afresh on layers where --model already has it (its trained tables are dropped).",
                          default=False)
    overwrite: bool = _help("Replace the contents of a non-empty --output (a former output) once every check has passed; "
                            "not needed to --resume into --output.", default=False)
    # ---- sharing
    push_to_hub: str | None = _help("Hub repository (namespace/name) to upload OUTPUT to with its model card after training (main process).", default=None)
    hub_private: bool = _help("Create the --push-to-hub repository private.", default=False)


def _options_text(value: Any) -> Any:
    """Recipes may give variant_options as a mapping; the flag takes JSON text."""
    return json.dumps(value) if isinstance(value, dict) else value


def _with_option_flags(text: str | None, flags: dict[str, Any]) -> str | None:
    """--variant-options with the option flags (--num-key-value-heads 1 ...) merged in, as JSON."""
    if not flags:
        return text
    options = variant_options(text)
    clash = sorted(k for k in flags if k in options and options[k] != flags[k])
    if clash:
        k = clash[0]
        raise ValueError(f"--{k.replace('_', '-')} {flags[k]} and --variant-options {k}={options[k]} disagree: give the option once")
    return json.dumps({**options, **flags})


def parse_args(argv: list[str] | None = None) -> FinetuneArguments:
    """Parse the command line, with `--config FILE` (YAML or JSON) as defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(FinetuneArguments, prog="hf_relattn.finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML/JSON recipe; command-line flags override it.")
    fields = list(FinetuneArguments.__dataclass_fields__)
    option_flags = add_variant_option_flags(parser, taken=fields)
    if known.config:
        values = read_settings_file(known.config, fields + option_flags)
        parser.set_defaults(**{("opt_" + k if k in option_flags else k): _options_text(v) for k, v in values.items()})
    args, extra = parser.parse_args_into_dataclasses(args=rest)
    args.variant_options = _with_option_flags(args.variant_options, variant_option_values(extra))
    return args
