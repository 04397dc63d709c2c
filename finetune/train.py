"""Continued training of a converted model with Accelerate (+ optional LoRA through PEFT).

    accelerate launch -m hf_relattn.finetune --model SRC --variant NAME --variant-options ... \\
        --data FILE --output DIR [--config finetune/recipes/<name>.yaml]

The papers behind the variants convert a pretrained model and continue training it (GQA
uptraining: Ainslie et al. 2023 use ~5% of the pre-training compute). This loop is the
plain Accelerate recipe: gradient accumulation, mixed precision, clipping, warm-up + cosine or
linear decay, resumable checkpoints (`accelerator.save_state`) with the data position, periodic
evaluation, JSONL metrics (TensorBoard too when installed).

Work is never lost or corrupted: a resume continues bit-identically (across epochs too) and
refuses changed settings unless told; checkpoints and the final model are written under temporary
names and renamed when complete, so a kill mid-save leaves nothing that looks valid but is not.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from hf_relattn.patches import get_adapter
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import get_scheduler

import hf_relattn
from hf_relattn.outputs import (
    check_output_folder,
    check_writable,
    clear_folder,
    OutputError,
    publish_folder,
    reporting_write_errors,
    write_provenance,
    write_text_atomic,
)
from hf_relattn.presets import load
from hf_relattn.settings import variant_options
from hf_relattn.training import AUTO_CLASSES, HEAD_SUFFIXES, config_of, image_processor, resolve_task
from hf_relattn.variants.base import get_variant_class
from hf_relattn.variants.moh import moh_aux_loss, moh_layers
from hf_relattn.variants.sparse_base import optimizer_groups

from . import data as D
from .distill import combined_loss, distill_kl, prediction_mask
from .args import SCHEDULERS, TRAIN_SELECTIONS, FinetuneArguments, parse_args

STATE_FILE = "finetune_state.json"
CHECKPOINT = re.compile(r"step-(\d+)")
# Arguments that do not change what a run computes (where it writes, how often it logs, evaluates
# and saves, where it evaluates, sharing): a resume may change them freely.
BOOKKEEPING = {"output", "resume", "resume_changed_ok", "overwrite", "save_steps", "logging_steps", "eval_steps",
               "eval_batches", "eval_data", "push_to_hub", "hub_private"}


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, so a resumed run sees the same order."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


# ------------------------------------------------------------------------ set-up
def new_parameter_names(model: torch.nn.Module, missing: set[str]) -> set[str]:
    """Parameters a variant added (modules named relattn_*) or the checkpoint lacked (new heads)."""
    return {n for n, _ in model.named_parameters() if n in missing or ".relattn_" in f".{n}"}


def select_trainable(model: torch.nn.Module, selection: str, new: set[str]) -> list[str]:
    if selection not in TRAIN_SELECTIONS:
        raise ValueError(f"Unknown --train {selection!r}; valid: {', '.join(TRAIN_SELECTIONS)}")
    if selection == "all":
        chosen = {n for n, _ in model.named_parameters()}
    elif selection == "new":
        if not new:
            raise ValueError("--train new: this variant and task add no new parameters; use --train all or attention")
        chosen = new
    else:
        blocks = get_adapter(model).attention_blocks(model)
        ids = {id(p) for block in blocks for p in block.parameters()}
        chosen = {n for n, p in model.named_parameters() if id(p) in ids} | new
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    return sorted(chosen)


def apply_lora(model: torch.nn.Module, args: FinetuneArguments, new: set[str]) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    adapter = get_adapter(model)

    def holds_targets(name: str) -> bool:
        return any(sub.endswith(target) for sub, _ in model.get_submodule(name).named_modules() for target in adapter.lora_targets)

    # New parameters train fully: their whole modules are saved next to the LoRA weights, except
    # parameters that sit directly on an attention module (sink logits): PEFT cannot both wrap
    # that module and inject LoRA into its projections, so they stay trainable in place and
    # reach OUTPUT/base_model (or the merged checkpoint).
    parents = {n.rsplit(".", 1)[0] for n in new}
    modules_to_save = sorted(p for p in parents if not holds_targets(p))
    loose = {n for n in new if n.rsplit(".", 1)[0] not in modules_to_save}
    config = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=list(adapter.lora_targets), modules_to_save=modules_to_save or None,
    )
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if any(name.endswith("." + n) for n in loose):
            param.requires_grad_(True)
    return peft_model


def latest_checkpoint(output: Path) -> Path:
    """The newest complete checkpoint: checkpoints/step-N holding its state file. A save in progress
    or killed lives under a hidden temporary name (`save_checkpoint`) and is never picked."""
    folder = output / "checkpoints"
    steps = [p for p in folder.glob("step-*") if CHECKPOINT.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    if not steps:
        raise FileNotFoundError(f"--resume latest: no complete checkpoint under {folder}")
    return max(steps, key=lambda p: int(p.name.split("-")[1]))


def resume_checkpoint(args: FinetuneArguments, output: Path) -> Path:
    ckpt = latest_checkpoint(output) if args.resume == "latest" else Path(args.resume)
    if not (ckpt / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {ckpt}: not a complete finetune checkpoint (no {STATE_FILE})")
    return ckpt


def data_fingerprint(source: str) -> str:
    """SHA-256 of a local data file or folder (every file in it); a Hub name stands for itself."""
    path = Path(source)
    if not path.exists():
        return source
    digest = hashlib.sha256()
    for file in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() if file != path else b"")
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def run_settings(args: FinetuneArguments) -> dict[str, Any]:
    """The arguments that decide what a run computes; --data by its content, not its path."""
    settings = {k: v for k, v in dataclasses.asdict(args).items() if k not in BOOKKEEPING}
    settings["variant_options"] = variant_options(args.variant_options)
    settings["data"] = data_fingerprint(args.data)
    return settings


def check_resume_settings(ckpt: Path, args: FinetuneArguments) -> None:
    """Refuse to continue a run with settings that differ from those that made the checkpoint."""
    saved = json.loads((ckpt / STATE_FILE).read_text()).get("settings")
    if saved is None or args.resume_changed_ok:
        return  # a checkpoint from before settings were recorded, or the user accepts the change
    now = json.loads(json.dumps(run_settings(args)))  # the same JSON types as the saved record
    changed = [f"--{k.replace('_', '-')} " + ("(its content changed)" if k == "data" else f"{saved.get(k)!r} -> {now.get(k)!r}")
               for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if changed:
        raise ValueError(f"--resume {ckpt}: settings differ from the run that saved it: {'; '.join(changed)}. "
                         "Resume with the same settings, or pass --resume-changed-ok to continue with the new ones")


def truncate_metrics(path: Path, step: int) -> None:
    """A resumed run logs again from the checkpoint's step: drop what the interrupted run logged
    after it (and a line cut short by a kill), so metrics.jsonl has each step once."""
    if not path.is_file():
        return

    def step_of(line: str) -> float:
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            return math.inf

    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and step_of(line) <= step]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(kept))


def save_checkpoint(accelerator: Accelerator, output: Path, step: int, state: dict[str, Any]) -> Path:
    """`accelerator.save_state` into checkpoints/.step-N.partial, renamed to step-N once complete
    (state file included): a kill at any moment leaves only complete step-N folders."""
    final = output / "checkpoints" / f"step-{step}"
    partial = final.with_name(f".step-{step}.partial")
    try:
        with reporting_write_errors(f"checkpoint step-{step}", final.parent):
            if accelerator.is_main_process:
                for left in final.parent.glob(".step-*.partial"):  # left by a killed save
                    shutil.rmtree(left, ignore_errors=True)
                partial.mkdir(parents=True)
            accelerator.wait_for_everyone()
            accelerator.save_state(str(partial))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                write_text_atomic(partial / STATE_FILE, json.dumps(state))
                publish_folder(partial, final)
    except OutputError:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return final


# --------------------------------------------------------------------------- loop
@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator, task: str, max_batches: int | None) -> dict[str, float]:
    model.eval()
    total_loss, total_weight, correct, count = 0.0, 0, 0, 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        out = model(**batch)
        if task in ("seq-cls", "image-cls"):
            predictions, labels = accelerator.gather_for_metrics((out.logits.argmax(-1), batch["labels"]))
            correct += int((predictions == labels).sum())
            count += labels.numel()
        elif task == "masked-lm":
            predictions, labels = accelerator.gather_for_metrics((out.logits.argmax(-1), batch["labels"]))
            keep = labels != -100
            correct += int((predictions[keep] == labels[keep]).sum())
            count += int(keep.sum())
        losses = accelerator.gather_for_metrics(out.loss.detach()[None])
        total_loss += float(losses.sum())
        total_weight += losses.numel()
    model.train()
    metrics = {"eval_loss": total_loss / max(total_weight, 1)}
    if task == "causal-lm":
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    else:
        metrics["eval_accuracy"] = correct / max(count, 1)
    return metrics


def run(args: FinetuneArguments) -> dict[str, Any]:
    # ---- everything that can be checked cheaply is checked before loading anything big
    for name in ("model", "output", "data"):
        if getattr(args, name) is None:
            raise ValueError(f"--{name} is required (or set it in the --config recipe)")
    if args.lr_scheduler not in SCHEDULERS:
        raise ValueError(f"Unknown --lr-scheduler {args.lr_scheduler!r}; valid: {', '.join(SCHEDULERS)}")
    if args.merge and not args.lora_r:
        raise ValueError("--merge needs --lora-r > 0")
    if not 0.0 <= args.distill_alpha <= 1.0:
        raise ValueError(f"--distill-alpha must be in [0, 1], got {args.distill_alpha}")
    if not args.distill_temperature > 0:
        raise ValueError(f"--distill-temperature must be > 0, got {args.distill_temperature}")
    if args.attention_transfer_steps < 0 or args.calibration_batches < 1:
        raise ValueError("--attention-transfer-steps must be >= 0 and --calibration-batches >= 1")
    if args.attention_transfer_steps and not args.variant and args.teacher is None:
        raise ValueError("--attention-transfer-steps needs --variant (the conversion to transfer to) or --teacher (the model before conversion)")
    if args.teacher is not None and not (args.distill or args.attention_transfer_steps):
        raise ValueError("--teacher is only used with --distill or --attention-transfer-steps")
    if args.push_to_hub:
        if args.lora_r and not args.merge:
            raise ValueError("--push-to-hub with --lora-r needs --merge: OUTPUT would hold a LoRA adapter, not a checkpoint")
        from hf_relattn.hub import check_push_target

        check_push_target(args.push_to_hub)  # repo id, token, offline mode: before any training
    output = Path(args.output)
    options = variant_options(args.variant_options)
    if options and args.variant is None:  # an explicit --variant "" (a control run of a recipe) drops them
        raise ValueError(f"Variant options {sorted(options)} given without --variant: name the variant they configure")
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    # the output folder: a resume into its own run continues there; anything else needs an empty
    # folder or --overwrite (which clears it only after loading, right before training)
    ckpt = resume_checkpoint(args, output) if args.resume else None
    own_run = ckpt is not None and ckpt.resolve().is_relative_to(output.resolve())
    if own_run:
        if args.overwrite:
            raise ValueError(f"--overwrite would delete the checkpoint --resume {args.resume} continues from: drop --overwrite")
        check_writable(output, "--output")
    else:
        check_output_folder(output, args.overwrite, "--output", inputs=[args.model, args.data, args.eval_data, args.teacher])
    if ckpt is not None:
        check_resume_settings(ckpt, args)
    settings = run_settings(args) if args.save_steps else None  # recorded in each checkpoint
    config = config_of(args.model)
    task = resolve_task(args, config)
    if args.push_to_hub and not args.variant and not str(config.model_type).startswith("relattn_"):
        raise ValueError(f"--push-to-hub shares hf_relattn checkpoints: {args.model!r} is a plain {config.model_type} model and --variant is not set")

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        cpu=not torch.cuda.is_available(),
        log_with="tensorboard" if importlib.util.find_spec("tensorboard") else None,
        project_dir=str(output),
    )
    set_seed(args.seed)
    main = accelerator.is_main_process

    raw_train = D.load_raw(args.data)
    train_raw, eval_raw = D.split(raw_train, args.eval_fraction, args.eval_size, args.train_size)
    if args.eval_data:
        eval_raw = D.load_raw(args.eval_data)
    labels = None
    load_kwargs: dict[str, Any] = {"output_loading_info": True}
    if task in ("seq-cls", "image-cls"):
        found = D.label_list(train_raw, args.label_column)
        if args.num_labels is not None and args.num_labels < len(found):
            raise ValueError(f"--num-labels {args.num_labels} but the data has {len(found)} labels: {found[:20]}")
        # a checkpoint's own head keeps its classes (integer label i stays class i, even when the
        # training subset lacks some); a new head gets one class per distinct label
        config = config_of(args.model)
        has_head = any(a.endswith(suffix) and head == task for a in (config.architectures or [])
                       for suffix, head in HEAD_SUFFIXES.items())
        labels = D.class_labels(train_raw, args.label_column, args.num_labels or (config.num_labels if has_head else None))
        load_kwargs["num_labels"] = args.num_labels or len(labels)
    (model, info), processor = load(args.model, dtype=args.dtype, model_class=AUTO_CLASSES[task], **load_kwargs)
    if task == "image-cls":
        processor = image_processor(args.model, model.config)
    elif processor is None:
        raise ValueError(f"{args.model!r} has no tokenizer; {task} needs one")
    teacher = None
    if args.distill or args.attention_transfer_steps:
        # the model before conversion, frozen (same tokenizer; a copy, so a new task head is the same one)
        if args.teacher is None:
            teacher = copy.deepcopy(model)
        else:
            extra = {k: v for k, v in load_kwargs.items() if k != "output_loading_info"}
            teacher = load(args.teacher, dtype=args.dtype, model_class=AUTO_CLASSES[task], **extra)[0]
        teacher.eval().requires_grad_(False)
    train_ds = D.prepare(task, train_raw, processor, args, model.config, labels)
    eval_ds = D.prepare(task, eval_raw, processor, args, model.config, labels) if eval_raw is not None else None
    collate = D.collator(task, processor, args.mlm_probability)
    fitted = bool(args.variant) and get_variant_class(args.variant).fits_on_batches(options)
    calibration = None
    if fitted or (args.attention_transfer_steps and not args.resume):
        # a resumed run fits the same initialisation again (it decides the saved spec, e.g. MoH's
        # shared heads) but skips the transfer: its weights come from the checkpoint
        count = min(args.calibration_batches * args.batch_size, len(train_ds))
        calibration = [collate([train_ds[i] for i in range(start, min(start + args.batch_size, count))])
                       for start in range(0, count, args.batch_size)]
    if args.variant:
        extra = {"batches": calibration} if fitted and calibration is not None else {}
        hf_relattn.convert(model, args.variant, layers=layers, replace=args.replace, **options, **extra)
    transfer = None
    if args.attention_transfer_steps and not args.resume:
        transfer = hf_relattn.calibrate(model, teacher, calibration, steps=args.attention_transfer_steps, lr=args.attention_transfer_lr,
                                        progress=accelerator.is_local_main_process, verbose=main)
    if not args.distill:
        teacher = None
    new = new_parameter_names(model, set(info.get("missing_keys", ())))
    select_trainable(model, args.train, new)
    if args.lora_r:
        model = apply_lora(model, args, new)
    sampler = EpochSampler(len(train_ds), args.seed)
    # A private generator for the loader's per-iterator seed: drawn from the global RNG, it would
    # put a resumed run (which starts its iterator after restoring the RNG) one draw off.
    train_dl = DataLoader(train_ds, batch_size=args.batch_size, sampler=sampler, collate_fn=collate, drop_last=True,
                          generator=torch.Generator().manual_seed(args.seed))
    if len(train_dl) == 0:
        raise ValueError(f"{len(train_ds)} training examples make no full batch of {args.batch_size}")
    eval_dl = DataLoader(eval_ds, batch_size=args.batch_size, collate_fn=collate) if eval_ds is not None else None

    per_step = args.batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    if args.max_steps is not None:
        total_steps = args.max_steps
    elif args.train_tokens is not None:
        if task not in ("causal-lm", "masked-lm"):
            raise ValueError("--train-tokens applies to causal-lm and masked-lm; use --max-steps")
        total_steps = math.ceil(args.train_tokens / (per_step * args.block_size))
    else:
        total_steps = args.num_epochs * len(train_dl) // (args.gradient_accumulation_steps * accelerator.num_processes)
    if total_steps <= 0:
        raise ValueError("Nothing to train: the step budget is 0")

    optimizer = torch.optim.AdamW(optimizer_groups(model, args.weight_decay), lr=args.learning_rate)
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=total_steps)
    model, optimizer, train_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, scheduler)
    if eval_dl is not None:
        eval_dl = accelerator.prepare(eval_dl)
    if teacher is not None:
        teacher.to(accelerator.device)

    step = 0
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        step = json.loads((ckpt / STATE_FILE).read_text())["step"]

    log_path = output / "metrics.jsonl"
    if main:
        if args.overwrite:
            clear_folder(output)  # every check and all loading passed: now the old model files go
        output.mkdir(parents=True, exist_ok=True)
        if own_run:
            truncate_metrics(log_path, step)
    accelerator.wait_for_everyone()
    if accelerator.log_with:
        accelerator.init_trackers("finetune", config={k: v for k, v in dataclasses.asdict(args).items() if v is not None})
    if transfer is not None and main:
        with log_path.open("a") as handle:
            handle.write(json.dumps({"step": 0, "attention_transfer": transfer.to_dict()}) + "\n")
    last_good: Path | None = None
    start_time, tokens_per_step = time.perf_counter(), per_step * (args.block_size if task in ("causal-lm", "masked-lm") else 0)
    progress = tqdm(total=total_steps, initial=step, disable=not accelerator.is_local_main_process, desc="finetune")

    def log(record: dict[str, Any]) -> None:
        if main:
            with log_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        if accelerator.log_with:
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    model.train()
    micro_per_epoch = len(train_dl)
    running, running_n, last_loss = 0.0, 0, float("nan")
    inner = accelerator.unwrap_model(model)
    routed = bool(moh_layers(inner))  # MoH adds its load-balance term to the loss: log it apart
    running_aux, running_kl = 0.0, 0.0
    # accelerate ends an accumulation cycle at the end of the data: an epoch has ceil(batches / accumulation) steps
    steps_per_epoch = math.ceil(micro_per_epoch / args.gradient_accumulation_steps)
    while step < total_steps:
        epoch, done = divmod(step, steps_per_epoch)
        # The prepared loader sets the sampler's epoch from its own iteration counter (0 in a
        # resumed process, and copied by skip_first_batches): set the counter, not only the sampler.
        train_dl.set_epoch(epoch)
        sampler.set_epoch(epoch)
        offset = done * args.gradient_accumulation_steps
        loader = accelerator.skip_first_batches(train_dl, offset) if offset else train_dl
        for batch in loader:
            with accelerator.accumulate(model):
                outputs = model(**batch)
                loss = outputs.loss
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(**batch).logits
                    kl = distill_kl(outputs.logits, teacher_logits, prediction_mask(task, batch, outputs.logits), args.distill_temperature)
                    aux = moh_aux_loss(outputs).to(loss.dtype) if routed else 0.0
                    loss = combined_loss(loss - aux, kl, args.distill_alpha, args.distill_temperature) + aux
                if not bool(torch.isfinite(accelerator.gather(loss.detach()[None])).all()):
                    where = f"; last good checkpoint: {last_good}" if last_good else " (no checkpoint was saved)"
                    raise FloatingPointError(f"Loss became {loss.item()} at step {step + 1}: training stopped{where}")
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            running += float(accelerator.gather(loss.detach()[None]).mean())
            if routed:
                running_aux += float(moh_aux_loss(outputs).detach())
            if teacher is not None:
                running_kl += float(accelerator.gather(kl.detach()[None]).mean())
            running_n += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            last_loss = running / running_n
            progress.update(1)
            progress.set_postfix(loss=f"{last_loss:.4f}")
            if step % args.logging_steps == 0 or step == total_steps:
                log({"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                     **({"moh_aux_loss": running_aux / running_n} if routed else {}),
                     **({"distill_kl": running_kl / running_n} if teacher is not None else {}),
                     "tokens": step * tokens_per_step, "elapsed_s": round(time.perf_counter() - start_time, 2)})
            running, running_n, running_aux, running_kl = 0.0, 0, 0.0, 0.0
            if eval_dl is not None and args.eval_steps and step % args.eval_steps == 0 and step != total_steps:
                log({"step": step, **evaluate(model, eval_dl, accelerator, task, args.eval_batches)})
            if args.save_steps and step % args.save_steps == 0:
                last_good = save_checkpoint(accelerator, output, step, {"step": step, "loss": last_loss, "settings": settings})
            if step >= total_steps:
                break
    progress.close()

    metrics: dict[str, Any] = {"train_loss": last_loss, "steps": step, "train_seconds": round(time.perf_counter() - start_time, 2)}
    # One checksum of the trained weights per process: DDP replicas must agree.
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()[None].to(accelerator.device)
    metrics["processes"] = accelerator.num_processes
    metrics["weight_checksums"] = accelerator.gather(checksum).tolist()
    if tokens_per_step:
        metrics["train_tokens"] = step * tokens_per_step
    if transfer is not None:
        metrics["attention_transfer"] = transfer.to_dict()
    if eval_dl is not None:
        metrics.update(evaluate(model, eval_dl, accelerator, task, args.eval_batches))
        log({"step": step, **{k: v for k, v in metrics.items() if k.startswith("eval_")}})
    save(accelerator, model, processor, args, metrics, output)
    if args.push_to_hub and main:
        from hf_relattn.hub import push_to_hub

        try:
            url = push_to_hub(output, args.push_to_hub, private=args.hub_private)
        except Exception as err:  # the checkpoint is saved: say how to retry the upload alone
            raise ValueError(f"{output} is saved, but pushing it failed: {err} (retry: hf-relattn push {output} {args.push_to_hub})") from err
        print(f"Pushed {output} to {url}", file=sys.stderr)
    if accelerator.num_processes > 1:
        # Keep the process group alive: main() leaves with os._exit (see there), because
        # freeing DDP after the group is destroyed can hang in gloo's destructor.
        for tracker in accelerator.trackers:
            tracker.finish()
    else:
        accelerator.end_training()
    return metrics


def save(accelerator: Accelerator, model: torch.nn.Module, processor: Any, args: FinetuneArguments,
         metrics: dict[str, Any], output: Path) -> None:
    """A normal checkpoint folder: weights + config, tokenizer/processor, args, metrics, provenance.

    Written into a hidden folder inside OUTPUT, then moved in with config.json / adapter_config.json
    (what makes a folder look like a checkpoint) removed first and put back last."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    model = accelerator.unwrap_model(model)
    # scalar parameters that trained (each shared tensor once), before LoRA is merged away
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    for left in output.glob(".saving-*"):  # left by a killed save
        shutil.rmtree(left, ignore_errors=True)
    staged = Path(tempfile.mkdtemp(prefix=".saving-", dir=output))
    try:
        with reporting_write_errors("the trained model", output):
            adapter_base = None
            if args.lora_r and args.merge:
                model = model.merge_and_unload()
            elif args.lora_r:
                # PEFT adapter in OUTPUT, the converted base model it applies to in OUTPUT/base_model.
                base = copy.deepcopy(model).unload()
                base.save_pretrained(staged / "base_model")
                model.peft_config["default"].base_model_name_or_path = str(staged / "base_model")  # PEFT reads its config
                adapter_base = base
            model.save_pretrained(staged)
            if adapter_base is not None:
                final_base = str((output / "base_model").resolve())
                model.peft_config["default"].base_model_name_or_path = final_base
                point_adapter_at_auto_class(staged, adapter_base, final_base)
            processor.save_pretrained(staged)
            write_text_atomic(staged / "training_args.json", json.dumps(dataclasses.asdict(args), indent=2))
            write_text_atomic(staged / "final_metrics.json", json.dumps({**metrics, "trainable_parameters": trainable}, indent=2))
            write_provenance(staged, args.model, args.variant, variant_options(args.variant_options) if args.variant else {},
                             [int(x) for x in args.layers.split(",")] if args.layers else None, "hf_relattn.finetune")
            markers = ("config.json", "adapter_config.json")
            for name in markers:
                (output / name).unlink(missing_ok=True)
            for entry in sorted(staged.iterdir(), key=lambda p: p.name in markers):
                target = output / entry.name
                if entry.is_dir() and target.exists():  # base_model/ of an earlier save of this run: out in one rename
                    os.replace(target, staged / f".old-{entry.name}")
                os.replace(entry, target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def point_adapter_at_auto_class(output: Path, base: torch.nn.Module, base_path: str) -> None:
    """Make OUTPUT's adapter load with `peft.AutoPeftModel*.from_pretrained(OUTPUT)` alone.

    The LoRA config has no task type, so PEFT records the base model's class in the adapter's
    `auto_mapping`; for an adapted model that is `hf_relattn.modeling.Relattn<Head>`, a library
    outside PEFT's import allowlist, and AutoPeftModel* refuses the folder. The transformers
    Auto class of the head (which hf_relattn registers for the adapted types) loads the same
    class from OUTPUT/base_model."""
    path = output / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base_path  # saved from a staging folder: where the base model ends up
    mapping = config.get("auto_mapping")
    task = next((t for suffix, t in HEAD_SUFFIXES.items() if type(base).__name__.endswith(suffix)), None)
    if mapping and mapping.get("parent_library") != "transformers" and task is not None:
        config["auto_mapping"] = {"base_model_class": AUTO_CLASSES[task].__name__, "parent_library": "transformers"}
    write_text_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    error = None
    try:
        metrics = run(parse_args(argv))
        print(json.dumps(metrics))
        code = 0
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        error, code = f"hf_relattn.finetune: error: {err}", 2
    if error:  # printed once the failed run's frames are gone, so its progress bar's last redraw comes before it
        print(error, file=sys.stderr)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo's process-group destructor can hang at interpreter exit once a peer has gone
        # (seen here: ~ProcessGroupGloo joining its threads). Every rank has finished and
        # passed the barrier in save(), and rank 0 wrote the outputs, so leave without teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
