"""Share adapted checkpoints on the Hugging Face Hub with a model card of our own.

    card = hf_relattn.hub.build_card("runs/smollm2-swa512", results="runs/bench-swa512-trained/results.json")
    hf_relattn.push_to_hub("runs/smollm2-swa512", "me/smollm2-swa512", results=..., dry_run="out/preview")
    hf-relattn push runs/smollm2-swa512 me/smollm2-swa512 --results runs/bench-swa512-trained/results.json

The card (template `model_cards/relattn_card.md`, rendered by `huggingface_hub.ModelCard`)
states the base model, the variant spec of `config.relattn` with each variant's paper and
description from the registry, how the checkpoint was converted and trained (the finetune
output's `training_args.json` / `final_metrics.json` when present), the benchmark rows that
measured this very checkpoint (as `model-index` metadata built with `EvalResult`, and as
tables), how to load it with and without the plugin, and its limitations.

What is uploaded: every regular top-level file of the folder (weights, config, tokenizer or
image processor, remote-code modules, training_args.json, final_metrics.json, metrics.jsonl,
relattn_provenance.json) plus our README.md, which replaces any README in the folder. Sub-folders
(`checkpoints/` resumable states, LoRA's `base_model/`, tracker logs) and hidden files are never
uploaded. A symlink pointing outside the folder is refused: push sends the folder's own files,
never something elsewhere on the machine.
Files already in the Hub repository that the folder lacks are left there. `dry_run=DIR` writes
exactly the uploaded file set into DIR and contacts nobody.

Which checkpoints are accepted:
- adapted checkpoints (`model_type` `relattn_<family>` with the variant spec in `config.relattn`);
- native checkpoints the plugin wrote because the result is expressible natively (GQA/MQA on
  every LLaMA layer saves as a plain `llama` folder), when the folder records that variant: its
  `relattn_provenance.json` (written by `hf-relattn convert` and finetune) or `training_args.json`
  (a finetune output). The card then describes the conversion from the record and says that the
  checkpoint needs no plugin;
- anything else is refused before any upload: a plain transformers checkpoint has nothing of
  ours to describe (push it with `hf upload` or `model.push_to_hub`), a PEFT adapter folder
  needs `--merge` first.

Results (`results=`, a bench `results.json` or its loaded dict) must belong to the checkpoint,
or the push is refused. A result row belongs to it when all of these hold:
1. the bench measured this folder: `model.source` of the results names the same folder
   (same directory once resolved from the current directory; when that path does not exist
   here, e.g. results made on another machine, its last component must equal the folder's
   name), and `model.model_type` / `model.class` agree with `config.json`;
2. the row measured the model as loaded: its `spec` is empty (rows of variants converted on top
   during the bench are other models), and its `relattn_spec` equals the checkpoint's
   `config.relattn` (variant names, options and layers).
A bench of the base model with the variant converted on the fly (`--model smollm2-135m
--variants sliding_window:window=512`) therefore never counts for a trained checkpoint with the
same spec: those numbers are of the untrained conversion.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .measure import fmt_bytes
from .modeling import SPEC_KEY
from .outputs import PROVENANCE_FILE
from .patches import ADAPTED_PREFIX, ADAPTERS
from .settings import variant_options
from .variants.base import VARIANTS
from .version import __version__

TEMPLATE_NAME = "relattn_card.md"
LOGIN_HELP = (
    "log in with `hf auth login` (formerly `huggingface-cli login`), set the HF_TOKEN environment variable, "
    "or pass token= (CLI: --token)"
)

# architecture suffix -> (bench/finetune task, Auto class, Hub pipeline tag)
HEADS: dict[str, tuple[str | None, str, str | None]] = {
    "ForCausalLM": ("causal-lm", "AutoModelForCausalLM", "text-generation"),
    "ForMaskedLM": ("masked-lm", "AutoModelForMaskedLM", "fill-mask"),
    "ForSequenceClassification": ("seq-cls", "AutoModelForSequenceClassification", "text-classification"),
    "ForImageClassification": ("image-cls", "AutoModelForImageClassification", "image-classification"),
    "ForTokenClassification": (None, "AutoModelForTokenClassification", "token-classification"),
    "ForQuestionAnswering": (None, "AutoModelForQuestionAnswering", "question-answering"),
}
TASK_PIPELINES = {task: pipeline for task, _, pipeline in HEADS.values() if task}

# Presets (hf_relattn.presets) -> the Hub model they carry, for the card's `base_model`.
PRESET_HUB_IDS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
}

# Local data files of ../shared/data -> (Hub dataset, pretty name, config, split).
KNOWN_DATA: tuple[tuple[str, str, str, str | None, str | None], ...] = (
    ("wikitext-2-raw/wiki.test.raw", "Salesforce/wikitext", "WikiText-2 (raw), test split", "wikitext-2-raw-v1", "test"),
    ("wikitext-2/test.txt", "Salesforce/wikitext", "WikiText-2, test split", "wikitext-2-v1", "test"),
    ("wikitext-2/valid.txt", "Salesforce/wikitext", "WikiText-2, validation split", "wikitext-2-v1", "validation"),
    ("sst2/dev.tsv", "nyu-mll/glue", "GLUE SST-2, dev split", "sst2", "validation"),
    ("sst2/train_full.tsv", "nyu-mll/glue", "GLUE SST-2, train split", "sst2", "train"),
    ("mnist/t10k-images-idx3-ubyte.gz", "ylecun/mnist", "MNIST, test images", None, "test"),
    ("tinyshakespeare/input.txt", "karpathy/tiny_shakespeare", "Tiny Shakespeare", None, None),
)

GENERAL_LIMITS = (
    "Sparse variants do not combine with score variants (ALiBi, Shaw, T5, relation) in one layer.",
    (
        "Relative terms take positions as indices in the key/value sequence: exact with transformers' default "
        "`DynamicCache`, not supported with a `StaticCache`."
    ),
    "Developed and measured on CPU (torch 2.13, transformers 5.23); the GPU FlexAttention path is untested.",
    "License: the base model's license applies; the card does not set one.",
)


# =============================================================================== reading
@dataclass
class Checkpoint:
    """What the card and the checks read from a checkpoint folder."""

    folder: Path
    config: dict[str, Any]
    family: str
    native: bool
    variants: list[dict[str, Any]]  # spec entries {name, options, layers} (native: from training_args)
    training_args: dict[str, Any] | None = None
    final_metrics: dict[str, Any] | None = None
    files: list[Path] = field(default_factory=list)
    provenance: dict[str, Any] | None = None  # relattn_provenance.json: base model and conversion

    @property
    def spec(self) -> list[dict[str, Any]]:
        """config.relattn's entries (empty for a native checkpoint)."""
        return [] if self.native else self.variants

    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or [""])[0]


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({what}): {err}") from None


def upload_files(folder: Path) -> list[Path]:
    """The files of `folder` that go to the Hub: regular top-level files, not hidden, not README.md.
    A symlink to a file outside the folder is refused rather than followed."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != "README.md")
    inside = folder.resolve()
    for path in files:
        if path.is_symlink() and not path.resolve().is_relative_to(inside):
            raise ValueError(f"{path} is a symlink to {path.resolve()}, outside {folder}: push uploads only the folder's own "
                             "files; replace the link by a copy of the file (cp -L) or remove it")
    return files


def read_checkpoint(folder: str | os.PathLike[str]) -> Checkpoint:
    """Read and check a checkpoint folder; ValueError/FileNotFoundError say what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Checkpoint folder {str(folder)!r} does not exist (expected a save_pretrained folder)")
    if not (folder / "config.json").is_file():
        if (folder / "adapter_config.json").is_file():
            raise ValueError(
                f"{folder} is a PEFT LoRA adapter (adapter_config.json, no config.json): train with --merge to get a "
                "plain adapted checkpoint, or push its converted base model (the base_model/ sub-folder)"
            )
        raise ValueError(f"{folder} has no config.json: not a save_pretrained checkpoint folder")
    config = _read_json(folder / "config.json", "config.json")
    model_type = str(config.get("model_type", ""))
    family = model_type.removeprefix(ADAPTED_PREFIX)
    training_args = _read_json(folder / "training_args.json", "training_args.json") if (folder / "training_args.json").is_file() else None
    final_metrics = _read_json(folder / "final_metrics.json", "final_metrics.json") if (folder / "final_metrics.json").is_file() else None

    provenance = _read_json(folder / PROVENANCE_FILE, PROVENANCE_FILE) if (folder / PROVENANCE_FILE).is_file() else None
    if family not in ADAPTERS:
        raise ValueError(
            f"{folder}: model_type {model_type!r} is not a family hf_relattn adapts; supported: "
            f"{', '.join(ADAPTED_PREFIX + f for f in sorted(ADAPTERS))} (or native {', '.join(sorted(ADAPTERS))} after GQA)"
        )
    if model_type.startswith(ADAPTED_PREFIX):
        spec = config.get(SPEC_KEY)
        entries = spec.get("variants") if isinstance(spec, dict) else None
        if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) and "name" in e for e in entries):
            raise ValueError(
                f"{folder}: model_type {model_type!r} but config.json has no valid variant spec under {SPEC_KEY!r} "
                f"(expected {{'format': 1, 'variants': [{{'name': ..., 'options': ..., 'layers': [...]}}]}}, got {spec!r})"
            )
        unknown = sorted({e["name"] for e in entries} - set(VARIANTS))
        if unknown:
            raise ValueError(f"{folder}: unknown variant(s) {unknown} in config.relattn; valid variants: {', '.join(sorted(VARIANTS))}")
        variants = [{"name": e["name"], "options": dict(e.get("options") or {}), "layers": list(e.get("layers") or [])} for e in entries]
        native = False
    else:
        variants = _native_variants(folder, config, family, training_args or provenance)
        native = True
    return Checkpoint(folder, config, family, native, variants, training_args, final_metrics, upload_files(folder), provenance)


def _native_variants(folder: Path, config: dict[str, Any], family: str, record: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The variant a native checkpoint came from, read from its finetune arguments or its
    provenance record (same keys: variant, variant_options, layers); else refuse."""
    plain = (
        f"{folder} is a plain transformers checkpoint (model_type {config.get('model_type')!r}, no config.{SPEC_KEY}"
        f"{'' if record is None else ', and its record names no variant that gives a native model'}): "
        "it loads without the plugin and has no variant for this card to describe. Push it with the usual tools "
        "(`hf upload REPO_ID FOLDER` or `model.push_to_hub(REPO_ID)`)"
    )
    name = (record or {}).get("variant")
    if not name or name not in VARIANTS:
        raise ValueError(plain)
    from .convert import resolve_layers

    variant = VARIANTS[name].from_options(variant_options(record.get("variant_options")))
    num_layers = int(config.get("num_hidden_layers", 0))
    layer_value = record.get("layers")
    if isinstance(layer_value, str):  # finetune's --layers text
        layer_value = [int(x) for x in layer_value.split(",")] if layer_value else None
    layers = resolve_layers(layer_value or None, num_layers)
    if not variant.native(ADAPTERS[family], num_layers, layers):
        raise ValueError(plain)
    return [{"name": name, "options": variant.options(), "layers": layers}]


# =============================================================================== results
def _spec_key(entries: Any) -> str:
    if isinstance(entries, Mapping):
        entries = entries.get("variants", [])
    normal = [{"name": e.get("name"), "options": e.get("options") or {}, "layers": list(e.get("layers") or [])} for e in entries or []]
    return json.dumps(normal, sort_keys=True)


def _layers_text(layers: list[int], num_layers: int | None = None) -> str:
    if not layers:
        return "-"
    if num_layers and list(layers) == list(range(num_layers)):
        return f"all {num_layers} ({0}-{num_layers - 1})" if num_layers > 1 else "all (0)"
    runs: list[str] = []
    start = prev = layers[0]
    for x in list(layers[1:]) + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(runs)


def _options_text(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in options.items()) or "(defaults)"


def _describe_spec(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return "no variant"
    return " + ".join(f"{e['name']}({_options_text(e.get('options') or {})}) on layers {_layers_text(list(e.get('layers') or []))}" for e in entries)


def load_results(results: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """A bench results.json (path or loaded dict), checked to be one."""
    if isinstance(results, Mapping):
        doc = dict(results)
        where = "results"
    else:
        path = Path(results)
        if not path.is_file():
            raise FileNotFoundError(f"--results {str(path)!r} not found (expected the results.json of `hf-relattn bench`)")
        doc = _read_json(path, "bench results")
        where = str(path)
    if not isinstance(doc, dict) or doc.get("tool") != "hf_relattn.bench" or doc.get("format") != 1 or not isinstance(doc.get("results"), list):
        raise ValueError(f"{where} is not a results.json of `hf-relattn bench` (format 1: keys tool, format, model, quality, results)")
    for key in ("model", "quality", "settings"):
        if not isinstance(doc.get(key), dict):
            raise ValueError(f"{where}: results.json lacks its {key!r} section")  # noqa: TRY004 (a malformed file)
    return doc


def _same_source(source: str, folder: Path, identity: Path | None) -> bool:
    candidate = Path(source).expanduser()
    targets = [p for p in (folder, identity) if p is not None]
    if candidate.exists():
        return any(t.exists() and os.path.samefile(candidate, t) for t in targets)
    return any(candidate.name == t.resolve().name for t in targets)


def matching_rows(checkpoint: Checkpoint, results: Mapping[str, Any], identity: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The rows of a bench results document that measured this checkpoint (rule: module docstring).

    `identity` is another path that counts as this folder (the folder a model object was
    loaded from, when it was saved to a temporary folder for the push). Raises ValueError when
    no row belongs to the checkpoint, naming what the results measured."""
    facts = results["model"]
    source = str(facts.get("source") or results["settings"].get("model") or "")
    ident = Path(identity) if identity else None
    mine = f"{checkpoint.folder} ({checkpoint.config.get('model_type')}, {_describe_spec(checkpoint.spec)})"
    advice = f"benchmark this folder itself: hf-relattn bench --model {checkpoint.folder} --data ..."
    if not _same_source(source, checkpoint.folder, ident):
        raise ValueError(f"results.json measured {source!r}, not the checkpoint being pushed, {mine}; {advice}")
    wanted = {"model_type": checkpoint.config.get("model_type"), "class": checkpoint.architecture}
    for key, value in wanted.items():
        if facts.get(key) != value:
            raise ValueError(f"results.json measured a model with {key} {facts.get(key)!r}, but {checkpoint.folder} has {value!r}; {advice}")
    key = _spec_key(checkpoint.spec)
    rows = [r for r in results["results"] if not r.get("spec") and _spec_key(r.get("relattn_spec")) == key]
    if not rows:
        seen = "; ".join(f"{r.get('label')}: {_describe_spec(json.loads(_spec_key(r.get('relattn_spec'))))}" for r in results["results"])
        raise ValueError(f"No row of results.json measured {mine} as loaded (rows: {seen}); {advice}")
    return rows


# ================================================================================== card
def _dataset(path: str | None) -> dict[str, Any]:
    text = str(path or "")
    for suffix, hub_id, pretty, config, split in KNOWN_DATA:
        if text.replace("\\", "/").endswith(suffix):
            return {"type": hub_id, "name": pretty, "config": config, "split": split, "path": text}
    if text.startswith("pydoc_data.topics"):
        return {"type": "pydoc_data.topics", "name": "CPython's pydoc topics (text embedded in CPython)", "config": None, "split": None, "path": text}
    p = Path(text)
    return {"type": p.parent.name or p.stem or "local", "name": text or "local data", "config": None, "split": None, "path": text}


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _median(stats: Any) -> Any:
    return stats.get("median") if isinstance(stats, Mapping) else None


def _bench_command(settings: Mapping[str, Any]) -> str:
    from .bench import BenchConfig

    default = BenchConfig()
    parts = ["hf-relattn bench", f"--model {settings.get('model')}"]
    for name, value in settings.items():
        if name in ("model", "out", "plots", "variants") or value is None:
            continue
        base = getattr(default, name, None)
        base = list(base) if isinstance(base, tuple) else base
        if name == "stride" and value == max(1, int(settings.get("context") or 0) // 2):
            continue
        if value == base:
            continue
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        parts.append(f"--{name.replace('_', '-')} {text}")
    return " ".join(parts)


def _evaluations(results: Mapping[str, Any], rows: list[dict[str, Any]]) -> tuple[list[Any], list[dict[str, Any]], dict[str, Any]]:
    """EvalResults for the metadata, rows for the card's tables, and the bench context."""
    from huggingface_hub import EvalResult

    quality = results["quality"]
    task = results["model"].get("task")
    data = _dataset(quality.get("data") or results["settings"].get("data"))
    metric = quality.get("metric") or quality.get("key")
    metric_type = {"masked_accuracy": "accuracy"}.get(metric, metric)
    metric_name = {"perplexity": "Perplexity", "accuracy": "Accuracy", "masked_accuracy": "Masked-token accuracy"}.get(metric, metric)
    if metric == "perplexity":
        args = {k: quality[k] for k in ("context", "stride", "scored_tokens") if k in quality}
        details = f"sliding windows of {quality.get('context')} tokens, stride {quality.get('stride')}, {_fmt(quality.get('scored_tokens'))} scored tokens"
    elif metric == "masked_accuracy":
        args = {k: quality[k] for k in ("context", "blocks", "mlm_probability", "seed") if k in quality}
        details = f"{_fmt(quality.get('blocks'))} blocks of {quality.get('context')} tokens, masking rate {quality.get('mlm_probability')}"
    else:
        args = {k: quality[k] for k in ("examples", "eval_size") if quality.get(k) is not None}
        details = f"{_fmt(quality.get('examples'))} examples"
    evals, table, efficiency = [], [], []
    for row in rows:
        value = (row.get("quality") or {}).get(row.get("quality_key") or quality.get("key"))
        if value is None:
            continue
        evals.append(EvalResult(
            task_type=TASK_PIPELINES.get(task, task or "other"),
            dataset_type=data["type"],
            dataset_name=data["name"],
            dataset_config=data["config"],
            dataset_split=data["split"],
            metric_type=metric_type,
            metric_name=metric_name,
            metric_value=round(float(value), 6),
            metric_args=args or None,
        ))
        table.append({"label": row.get("label"), "metric": metric_name, "value": _fmt(float(value), 5),
                      "higher_is_better": quality.get("higher_is_better"), "data": data["path"], "details": details})
        for m in row.get("prefill") or []:
            efficiency.append({"what": f"prefill {m.get('context')} tokens", "latency": f"{_fmt(_median(m.get('latency_s')))} s",
                               "throughput": f"{_fmt(_median(m.get('tokens_per_s')))} tok/s",
                               "memory": fmt_bytes(_median(m.get("peak_memory_bytes"))), "kv_cache": fmt_bytes(m.get("kv_cache_bytes"))})
        for m in row.get("decode") or []:
            efficiency.append({"what": f"decode {m.get('new_tokens')} tokens at {m.get('context')} context",
                               "latency": f"{_fmt(_median(m.get('seconds')))} s",
                               "throughput": f"{_fmt(_median(m.get('tokens_per_s')))} tok/s",
                               "memory": "-", "kv_cache": fmt_bytes(m.get("kv_cache_bytes"))})
    env = results.get("environment") or {}
    context = {
        "command": _bench_command(results["settings"]),
        "created": results.get("created"),
        "machine": f"{env.get('cpu_model') or env.get('cuda_device') or env.get('device', '?')}, {env.get('cpu_count', '?')} CPUs, "
                   f"{env.get('torch_threads', '?')} torch threads, {env.get('device', 'cpu')}",
        "versions": f"torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}, hf_relattn {env.get('hf_relattn', '?')}",
        "efficiency": efficiency,
        "reps": results["settings"].get("reps"),
    }
    return evals, table, context


def _head(architecture: str) -> tuple[str | None, str, str | None]:
    name = architecture.removeprefix("Relattn")
    for suffix, head in HEADS.items():
        if name.endswith(suffix):
            return head
    return (None, "AutoModel", "image-feature-extraction" if name.startswith("ViT") else "feature-extraction")


def _base_model(checkpoint: Checkpoint, given: str | None) -> tuple[str, str | None, str | None]:
    """(text for the card, Hub id for the metadata or None, name to load it by or None)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from .presets import PRESETS

    def hub_id(name: str | None) -> str | None:
        if not name:
            return None
        if name in PRESET_HUB_IDS:
            return PRESET_HUB_IDS[name]
        if name.count("/") != 1 or Path(name).expanduser().exists():
            return None
        try:
            validate_repo_id(name)
        except HFValidationError:
            return None
        return name

    def text(name: str) -> str:
        if name in PRESETS:
            return f"`{name}` (hf_relattn preset: {PRESETS[name].description})"
        return f"`{name}`" if hub_id(name) else f"`{name}` (a local folder, not on the Hub)"

    if given:
        return text(given), hub_id(given), given
    candidates = [(checkpoint.training_args or {}).get("model"), (checkpoint.provenance or {}).get("base_model"),
                  checkpoint.config.get("_name_or_path")]
    for name in candidates:
        if hub_id(name):
            return text(name), hub_id(name), name
    for name in candidates:
        if name:
            return text(name), None, name
    return "unknown (pass base_model= / --base-model)", None, None


def _conversion_code(checkpoint: Checkpoint, auto_class: str, source: str | None) -> str:
    from .presets import PRESETS

    num_layers = int(checkpoint.config.get("num_hidden_layers") or 0)
    lines = ["import hf_relattn", f"from transformers import {auto_class}", ""]
    if source in PRESETS:
        lines[1:1] = ["from hf_relattn.presets import load"]
        lines.append(f"model, processor = load({json.dumps(source)}, model_class={auto_class})")
    else:
        lines.append(f"model = {auto_class}.from_pretrained({json.dumps(source or '<base model>')})")
    for entry in checkpoint.variants:
        args = [json.dumps(entry["name"])]
        if entry["layers"] and list(entry["layers"]) != list(range(num_layers)):
            args.append(f"layers={list(entry['layers'])!r}")
        args += [f"{k}={v!r}" for k, v in (entry.get("options") or {}).items()]
        lines.append(f"hf_relattn.convert(model, {', '.join(args)})")
    return "\n".join(lines)


def _training(checkpoint: Checkpoint, task: str | None) -> dict[str, Any] | None:
    args = checkpoint.training_args
    if args is None:
        return None
    from .training import FinetuneArguments

    defaults = {name: f.default for name, f in FinetuneArguments.__dataclass_fields__.items()}
    skip = {"output", "resume", "resume_changed_ok", "overwrite", "push_to_hub", "hub_private", "save_steps", "logging_steps"}
    command = ["python -m hf_relattn.finetune"]
    for name, value in args.items():
        if name in skip or value is None or (name in defaults and value == defaults[name]):
            continue
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            command.append(flag)
        else:
            text = str(value)
            quoted = json.dumps(text) if any(c in text for c in ' {}",') else text
            command.append(f"{flag} {quoted}")
    shown = ("model", "variant", "variant_options", "layers", "task", "data", "train", "train_tokens", "max_steps",
             "num_epochs", "block_size", "batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
             "warmup_steps", "weight_decay", "max_grad_norm", "mixed_precision", "lora_r", "merge", "seed")
    task = args.get("task") or task
    if task not in ("causal-lm", "masked-lm"):
        shown = tuple(name for name in shown if name not in ("block_size", "train_tokens"))
    rows = [(name, _fmt(args[name])) for name in shown if args.get(name) not in (None, "", 0, False) or name in ("model", "learning_rate")]
    metrics = checkpoint.final_metrics or {}
    metric_rows = [(name, _fmt(metrics[name])) for name in (
        "steps", "train_tokens", "train_loss", "eval_loss", "eval_perplexity", "eval_accuracy", "train_seconds", "processes", "trainable_parameters",
    ) if name in metrics]
    data = _dataset(args.get("data"))
    return {"command": " ".join(command), "rows": rows, "metrics": metric_rows,
            "eval_note": (f"`{args['eval_data']}`" if args.get("eval_data") else f"a held-out part of `{args.get('data')}`")
            if any(k.startswith("eval_") for k in metrics) else None,
            "dataset": data}


def _template_path() -> Path:
    try:
        packaged = resources.files("hf_relattn.model_cards") / TEMPLATE_NAME  # when shipped as package data
        if packaged.is_file():
            return Path(str(packaged))
    except (ModuleNotFoundError, TypeError):
        pass
    local = Path(__file__).resolve().parents[1] / "model_cards" / TEMPLATE_NAME
    if local.is_file():
        return local
    raise FileNotFoundError(f"Model card template {TEMPLATE_NAME} not found (looked in hf_relattn.model_cards and {local.parent})")


def build_card(
    folder: str | os.PathLike[str],
    results: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    base_model: str | None = None,
    *,
    repo_id: str | None = None,
    identity: str | os.PathLike[str] | None = None,
) -> Any:
    """The model card (`huggingface_hub.ModelCard`) of an adapted checkpoint folder.

    `results`: a bench results.json (path or dict) whose rows measured this checkpoint (see
    the module docstring for the rule; a mismatch raises ValueError). `base_model`: the Hub id
    or name of the model it was converted from (default: the finetune arguments' `--model`,
    then `config._name_or_path`; only Hub ids go into the `base_model` metadata).
    `repo_id` is used in the usage snippets; `identity` is a path that counts as this folder
    when matching results."""
    from huggingface_hub import ModelCard, ModelCardData

    checkpoint = read_checkpoint(folder)
    task, auto_class, pipeline = _head(checkpoint.architecture)
    base_text, base_id, base_source = _base_model(checkpoint, base_model)
    name = repo_id.split("/")[-1] if repo_id else checkpoint.folder.resolve().name
    evals, eval_rows, bench = [], [], None
    if results is not None:
        doc = load_results(results)
        rows = matching_rows(checkpoint, doc, identity)
        evals, eval_rows, bench = _evaluations(doc, rows)
    training = _training(checkpoint, task)
    num_layers = int(checkpoint.config.get("num_hidden_layers") or 0)
    variants = []
    for entry in checkpoint.variants:
        cls = VARIANTS[entry["name"]]
        variants.append({
            "name": entry["name"], "axis": cls.axis, "paper": cls.paper, "description": cls.description,
            "options": _options_text(entry.get("options") or {}), "layers": _layers_text(entry["layers"], num_layers),
            "note": cls.limits or None,
        })
    names = [v["name"] for v in variants]
    trained = training is not None
    limitations = []
    for v in variants:
        if v["note"]:
            limitations.append(f"`{v['name']}`: {v['note']}" + ("" if trained else " **This checkpoint was not trained after conversion.**"))
    limitations += list(GENERAL_LIMITS)
    datasets = sorted({d["type"] for d in ([training["dataset"]] if training else []) if "/" in d["type"]})
    card_data = ModelCardData(
        library_name="transformers",
        base_model=base_id,
        pipeline_tag=pipeline,
        tags=["hf_relattn", f"{ADAPTED_PREFIX}{checkpoint.family}", *dict.fromkeys(names)],
        datasets=datasets or None,
        model_name=name,
        eval_results=evals or None,
    )
    spec_json = None
    if not checkpoint.native:  # one variant entry per line, layer lists inline
        entries = ",\n".join("  " + json.dumps(e) for e in checkpoint.spec)
        spec_json = f'{{"format": 1, "variants": [\n{entries}\n]}}'
    return ModelCard.from_template(
        card_data,
        template_path=str(_template_path()),
        title=name,
        repo_id=repo_id or f"<namespace>/{name}",
        base_model_text=base_text,
        family=checkpoint.family,
        model_type=checkpoint.config.get("model_type"),
        architecture=checkpoint.architecture,
        auto_class=auto_class,
        task=task,
        native=checkpoint.native,
        variants=variants,
        spec_json=spec_json,
        conversion_code=_conversion_code(checkpoint, auto_class, base_source),
        training=training,
        evaluations=eval_rows,
        bench=bench,
        remote_code=bool(checkpoint.config.get("auto_map")),
        needs_relation_ids="relation" in names,
        limitations=limitations,
        plugin_version=__version__,
        files=[p.name for p in checkpoint.files] + ["README.md"],
    )


# ================================================================================== push
def _resolve_token(token: str | None) -> str:
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise ValueError(f"No Hugging Face token found: {LOGIN_HELP}")
    return token


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"Invalid repo_id {repo_id!r} (expected 'namespace/name' or 'name'): {err}") from None


def check_push_target(repo_id: str, token: str | None = None) -> None:
    """What can be checked before any work: repo id syntax, a token, offline mode.

    finetune calls it before training when --push-to-hub is given."""
    from huggingface_hub import constants

    _check_repo_id(repo_id)
    _resolve_token(token)
    if constants.is_offline_mode():
        raise ValueError("HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to push to the Hub")


def _stage(files: list[Path], readme: str, target: Path, *, link: bool) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for path in files:
        dest = target / path.name
        if link:
            try:
                dest.symlink_to(path.resolve())
                continue
            except OSError:
                pass
        shutil.copy2(path, dest)
    (target / "README.md").write_text(readme, encoding="utf-8")


def push_to_hub(
    model_or_folder: Any,
    repo_id: str,
    *,
    private: bool = False,
    results: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    token: str | None = None,
    dry_run: str | os.PathLike[str] | None = None,
    commit_message: str | None = None,
    base_model: str | None = None,
    processor: Any = None,
) -> str:
    """Upload an adapted checkpoint and our model card to the Hub repository `repo_id`.

    `model_or_folder`: a checkpoint folder, or an adapted model (saved with `save_pretrained`
    to a temporary folder first, with `processor` (tokenizer / image processor) when given).
    Every check runs before anything is uploaded: the folder (module docstring: which
    checkpoints are accepted), `results` against the checkpoint (the matching rule is in the
    module docstring), the repo id, a token (`token=`, else HF_TOKEN or the stored login;
    `huggingface_hub.get_token`), offline mode. Then `HfApi.create_repo(exist_ok=True)` and
    one `upload_folder` commit of the folder's top-level files plus README.md (ours replaces
    any README the folder has). `private` applies when the repository is created; an
    existing repository keeps its visibility.

    `dry_run=DIR`: write exactly the files that would be uploaded into DIR (which must be empty
    or new), upload nothing and need no token; returns DIR. Otherwise returns the repo URL.
    """
    from transformers import PreTrainedModel

    _check_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="relattn-push-") as tmp:
        identity = None
        if isinstance(model_or_folder, PreTrainedModel):
            from .modeling import is_adapted

            if not is_adapted(model_or_folder):
                raise ValueError(
                    f"{type(model_or_folder).__name__} is not adapted by hf_relattn (model_type "
                    f"{model_or_folder.config.model_type!r}): a plain transformers model needs no plugin; "
                    "use model.push_to_hub(repo_id), or hf_relattn.convert(model, ...) first"
                )
            folder = Path(tmp) / "checkpoint"
            identity = getattr(model_or_folder, "name_or_path", None) or None
            try:
                model_or_folder.save_pretrained(folder)
            finally:  # the temporary folder is not where the model lives (PEFT would record it)
                model_or_folder.name_or_path = identity or ""
            if processor is not None:
                processor.save_pretrained(folder)
        elif isinstance(model_or_folder, (str, os.PathLike)):
            folder = Path(model_or_folder)
        else:
            raise TypeError(f"push_to_hub takes a checkpoint folder or an adapted PreTrainedModel, got {type(model_or_folder).__name__}")
        checkpoint = read_checkpoint(folder)
        card = build_card(folder, results, base_model, repo_id=repo_id, identity=identity)
        readme = str(card)
        if dry_run is not None:
            out = Path(dry_run)
            if out.exists() and (not out.is_dir() or any(out.iterdir())):
                raise ValueError(f"--dry-run folder {str(out)!r} must be new or empty (it receives exactly the files to upload)")
            _stage(checkpoint.files, readme, out, link=False)
            return str(out)
        check_push_target(repo_id, token)
        from huggingface_hub import HfApi

        api = HfApi(token=_resolve_token(token))
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if repo_url.repo_id != repo_id:  # 'name' went to the user's namespace: show the full id in the card
            readme = str(build_card(folder, results, base_model, repo_id=repo_url.repo_id, identity=identity))
        names = "+".join(dict.fromkeys(v["name"] for v in checkpoint.variants))
        staging = Path(tmp) / "upload"
        _stage(checkpoint.files, readme, staging, link=True)
        api.upload_folder(
            repo_id=repo_url.repo_id,
            folder_path=staging,
            repo_type="model",
            commit_message=commit_message or f"Upload {checkpoint.family} checkpoint with {names} attention (hf_relattn {__version__})",
        )
        return str(repo_url)
