"""What a training run is, for the library and finetune alike: the tasks, their Auto classes, how
a model source's config and task are found, and the arguments of a finetune run.

finetune (`hf_relattn.finetune`) runs them; the bench resolves its task and loads its model the
same way, and model cards (`hf_relattn.hub`) describe a run from its training_args.json against
the defaults here. The library must not import finetune, so these live here and finetune
imports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import transformers

from .patches import get_adapter
from .presets import PRESETS, preset_folder

TASKS = ("causal-lm", "masked-lm", "seq-cls", "image-cls")
TRAIN_SELECTIONS = ("all", "attention", "new")
SCHEDULERS = ("cosine", "linear", "constant")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class FinetuneArguments:
    """Every setting of a finetune run (`python -m hf_relattn.finetune --help` lists them; the
    run writes them to training_args.json, which model cards read)."""

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


AUTO_CLASSES = {
    "causal-lm": transformers.AutoModelForCausalLM,
    "masked-lm": transformers.AutoModelForMaskedLM,
    "seq-cls": transformers.AutoModelForSequenceClassification,
    "image-cls": transformers.AutoModelForImageClassification,
}
HEAD_SUFFIXES = {"ForCausalLM": "causal-lm", "ForMaskedLM": "masked-lm", "ForSequenceClassification": "seq-cls", "ForImageClassification": "image-cls"}


def config_of(source: str) -> Any:
    """The transformers config of a model source (preset, folder or Hub id), without its weights."""
    if source in PRESETS and PRESETS[source].config is not None:
        return transformers.AutoConfig.for_model(**PRESETS[source].config)
    if source in PRESETS:
        preset = PRESETS[source]
        extra = {"gguf_file": preset.gguf_file} if preset.gguf_file else {}
        config = transformers.AutoConfig.from_pretrained(preset_folder(source), **extra)
        config.architectures = config.architectures or [preset.model_class]  # GGUF files name none
        return config
    return transformers.AutoConfig.from_pretrained(source)


def resolve_task(args: Any, config: Any) -> str:
    """The task of a run: `args.task` (checked against the family), else the one of the config's head.

    `args`: anything with `task` and `model` (FinetuneArguments, or the bench's namespace)."""
    adapter = get_adapter(config)
    task = args.task
    if task is None:
        heads = [HEAD_SUFFIXES[s] for a in (config.architectures or []) for s in HEAD_SUFFIXES if a.endswith(s)]
        if not heads:
            raise ValueError(f"Cannot infer the task of {args.model!r}; pass --task ({', '.join(adapter.tasks)})")
        task = heads[0]
    if task not in TASKS:
        raise ValueError(f"Unknown --task {task!r}; valid: {', '.join(TASKS)}")
    if task not in adapter.tasks:
        raise ValueError(f"--task {task} is not available for {adapter.model_type} models; valid: {', '.join(adapter.tasks)}")
    return task


def image_processor(source: str, config: Any) -> Any:
    """The checkpoint's image processor, else one matching the config (normalise to [-1, 1])."""
    try:
        return transformers.AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError):
        config = getattr(config, "vision_config", None) or config  # CLIP: the vision tower's sizes
        size = {"height": config.image_size, "width": config.image_size}
        channels = config.num_channels
        return transformers.ViTImageProcessorPil(
            size=size, image_mean=[0.5] * channels, image_std=[0.5] * channels, do_convert_rgb=channels == 3
        )
