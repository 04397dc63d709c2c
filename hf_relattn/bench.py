"""`hf-relattn bench`: quality and efficiency of attention variants against the unmodified model.

    hf-relattn bench --model SRC --variants "gqa:num_key_value_heads=1,alibi,mqa+alibi" \\
        [--data FILE] [--out DIR] [--config bench.yaml] [--contexts 256,1024] ...

Variant grammar: comma-separated entries; an entry is `name[:k=v[:k=v...]]` (values parsed like
the CLI's option flags; `layers=0;1;-1` selects layers), and `+` composes conversions applied in
order (`gqa:num_key_value_heads=1+alibi`). Every entry is checked against the variant registry
before any model is loaded. The baseline (the model as loaded, native sdpa) is always measured.
Each variant is a fresh deep copy of the loaded model converted with `hf_relattn.convert`.

Measured, for the baseline and every variant:
- quality through `hf_relattn.metrics` (Evaluate modules): perplexity for causal LMs (sliding
  windows of `--context` tokens advanced by `--stride`: every token is scored exactly once, the
  overlap only serves as context), accuracy for sequence and image classifiers, masked-token
  accuracy for masked LMs (masks drawn once by a seeded generator, the same for every model);
- prefill: latency and tokens/s of one forward pass over random token ids at each of
  `--contexts` (causal LMs keep only the last position's logits, as `generate` does; ViT has one
  context, its patch count + 1), peak memory of that forward and the KV-cache bytes it leaves;
- decode (causal LMs): tokens/s of `--new-tokens` greedy steps with the KV cache after a prefill
  of each of `--decode-contexts` random tokens (every repetition decodes from a copy of the same
  prefilled cache);
- parameter count.

Timing: `--warmup` untimed runs, then `--reps` timed repetitions, interleaved round-robin over
all models (the starting model rotates each repetition) so that machine drift hits every model
alike. Reported: median, min, max and quartiles of the raw values, which results.json keeps.
Ratios against the baseline are paired: for timings, the median over repetitions r of
variant[r] / baseline[r] (the two ran in the same round, same context); for sizes (parameters,
KV cache, peak memory medians) and quality, the plain quotient.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` minus the allocation before the call; on
CPU a background thread samples this process's resident set size (/proc/self/statm) every
0.5 ms, peak minus the RSS just before the call (after `gc.collect` and glibc `malloc_trim`, so
freed heap pages do not hide the forward's working set). It is sampled during the warm-up runs
only, so the sampling thread never disturbs a timed run.

Outputs in `--out`: results.json (every raw value, the ratios, the variant specs, the settings
and the environment), results.md (markdown tables), quality_vs_speed.png and
latency_vs_context.png (matplotlib, Agg), and the summary table printed on stdout (with `rich`
when it is importable). A tqdm bar on stderr counts the measurements.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .convert import convert
from .measure import (  # cpu_model, plain_table: still importable from here, where they were
    PeakMemory,
    cpu_model,
    environment,
    fmt_bytes,
    forward_accepts,
    load_metric,
    markdown_table,
    paired_ratio,
    perplexity,
    plain_table,
    print_table,
    quotient,
    sliding_windows,
    summarize,
    sync,
)
from .modeling import SPEC_KEY, is_adapted
from .outputs import check_output_folder, clear_folder, reporting_write_errors
from .patches import get_adapter
from .settings import parse_value, read_settings_file
from .streaming import StreamingCache, streaming_window
from .variants.base import DATA_OPTIONS, VARIANTS
from .variants.relation import INPUT_NAME as RELATION_INPUT

RESULTS_FORMAT = 1
LAYERS_OPTION = "layers"
BASELINE = "baseline"
TASK_METRICS = {
    "causal-lm": ("perplexity", "perplexity", False),
    "masked-lm": ("masked_accuracy", "masked_accuracy", True),
    "seq-cls": ("accuracy", "accuracy", True),
    "image-cls": ("accuracy", "accuracy", True),
}  # task -> (metrics module, headline key, higher is better)
PLOTS = ("quality_vs_speed.png", "latency_vs_context.png")


# ============================================================================ variant specs
@dataclasses.dataclass(frozen=True)
class Step:
    """One conversion: `hf_relattn.convert(model, name, layers=layers, **options)`."""

    name: str
    options: dict[str, Any]
    layers: tuple[int, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        """The step as written to results.json."""
        return {"variant": self.name, "options": dict(self.options), "layers": None if self.layers is None else list(self.layers)}


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    """A benchmarked variant: its label (the entry as written) and the conversions it applies."""

    label: str
    steps: tuple[Step, ...]

    def to_json(self) -> dict[str, Any]:
        """The variant as written to results.json."""
        return {"label": self.label, "steps": [s.to_json() for s in self.steps]}


def _grammar_hint() -> str:
    return "entries look like gqa:num_key_value_heads=1, alibi or gqa:num_key_value_heads=1+alibi"


def _parse_layers(text: str, entry: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(part) for part in text.split(";") if part.strip())
    except ValueError:
        layers = ()
    if not layers:
        raise ValueError(f"Malformed layers={text!r} in variant entry {entry!r}: give integers separated by ';', e.g. layers=0;1;-1")
    return layers


def _parse_step(component: str, entry: str) -> Step:
    name, *parts = component.split(":")
    name = name.strip()
    if name not in VARIANTS:
        shown = f"{name!r}" if name else "an empty name"
        raise ValueError(f"Unknown variant {shown} in --variants entry {entry!r}; valid variants: {', '.join(sorted(VARIANTS))}")
    cls = VARIANTS[name]
    names = [n for n in cls.option_names() if n not in DATA_OPTIONS]
    valid = ", ".join([*names, LAYERS_OPTION])
    options: dict[str, Any] = {}
    layers = None
    for part in parts:
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ValueError(
                f"Malformed option {part!r} in --variants entry {entry!r}: options are key=value after ':' "
                f"({_grammar_hint()}); options of {name}: {valid}"
            )
        if key in options or (key == LAYERS_OPTION and layers is not None):
            raise ValueError(f"Option {key!r} given twice in --variants entry {entry!r}")
        if key == LAYERS_OPTION:
            layers = _parse_layers(value, entry)
        elif key not in names:
            raise ValueError(f"Unknown option {key!r} for variant {name!r} in --variants entry {entry!r}; valid options: {valid}")
        else:
            options[key] = parse_value(value)
    cls.from_options(options)  # the registry's own check, so bench and convert agree
    return Step(name, options, layers)


def parse_variants(text: str | Sequence[str] | None) -> list[VariantSpec]:
    """Parse a variant list (see the module doc); raises ValueError naming the problem and the choices.

    A sequence (from a YAML/JSON config) is a list of entries.
    """
    if text is None:
        return []
    entries = list(text) if not isinstance(text, str) else ([] if not text.strip() else text.split(","))
    specs: list[VariantSpec] = []
    for position, raw in enumerate(entries, 1):
        entry = str(raw).strip()
        if not entry:
            raise ValueError(f"Empty variant entry #{position} in --variants {text!r}: separate entries with single commas ({_grammar_hint()})")
        components = entry.split("+")
        if any(not c.strip() for c in components):
            raise ValueError(f"Empty component in --variants entry {entry!r}: '+' joins two variants, as in gqa:num_key_value_heads=1+alibi")
        label = "+".join(c.strip() for c in components)
        if label == BASELINE or label in (s.label for s in specs):
            raise ValueError(f"Variant entry {label!r} appears twice (the baseline is always measured)")
        specs.append(VariantSpec(label, tuple(_parse_step(c.strip(), entry) for c in components)))
    return specs


class SameTokenGraph:
    """Stand-in relation graph with which the bench runs the `relation` variant (whose real
    graphs come from the user's data): relation 1 joins two positions holding the same token,
    0 is "no relation". A forward pre-hook: it adds `relation_ids` (B, Q, K) to every call that
    has none, keeping the tokens of the KV cache to label decoding steps."""

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        ids = kwargs.get("input_ids")
        if kwargs.get(RELATION_INPUT) is not None or ids is None:
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        self.tokens = ids if past == 0 or self.tokens is None else torch.cat([self.tokens[:, :past], ids], dim=1)
        kwargs[RELATION_INPUT] = (ids[:, :, None] == self.tokens[:, None, :]).long()
        return args, kwargs


def build_variant(base: nn.Module, spec: VariantSpec) -> nn.Module:
    """A fresh deep copy of `base` with every step of `spec` converted in order (a `relation`
    step also gets the `SameTokenGraph` stand-in graph)."""
    model = copy.deepcopy(base)
    for step in spec.steps:
        convert(model, step.name, layers=None if step.layers is None else list(step.layers), **step.options)
    if any(step.name == "relation" for step in spec.steps):
        model.register_forward_pre_hook(SameTokenGraph(), with_kwargs=True)
    return model.eval()


# ============================================================================= settings
def _int_list(value: Any, name: str) -> tuple[int, ...]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        out = tuple(int(str(v).strip()) for v in items if str(v).strip())
    except ValueError:
        raise ValueError(f"--{name.replace('_', '-')} takes comma-separated integers like 256,1024, got {value!r}") from None
    if not out or any(v <= 0 for v in out):
        raise ValueError(f"--{name.replace('_', '-')} needs positive integers, got {value!r}")
    return out


CACHES = ("dynamic", "streaming")  # --cache


@dataclasses.dataclass
class BenchConfig:
    """Every setting of a bench run (flags, or keys of a --config YAML/JSON file)."""

    model: str | None = None
    variants: Any = ""
    data: str | None = None
    out: str = "runs/bench"
    overwrite: bool = False  # replace a non-empty --out (its old results and plots go)
    task: str | None = None
    dtype: str = "float32"
    device: str | None = None
    threads: int | None = None
    # quality
    context: int = 512
    stride: int | None = None  # default: context // 2
    max_tokens: int = 1536
    eval_size: int | None = None
    batch_size: int = 16
    max_length: int = 128
    text_column: str = "sentence"
    label_column: str = "label"
    mlm_probability: float = 0.15
    seed: int = 0
    # efficiency
    contexts: Any = (256, 1024)
    decode_contexts: Any = (1024,)
    new_tokens: int = 16
    cache: str = "dynamic"  # decode cache: "dynamic", or "streaming" (hf_relattn.StreamingCache where a model has a window)
    warmup: int = 1
    reps: int = 3
    plots: bool = True

    def validate(self) -> list[VariantSpec]:
        """Check everything that needs no model; returns the parsed variants."""
        from .presets import DTYPES

        if not self.model:
            raise ValueError("--model is required (a preset, a checkpoint folder or a Hub id), on the command line or in --config")
        specs = parse_variants(self.variants)
        if self.task is not None and self.task not in TASK_METRICS:
            raise ValueError(f"Unknown --task {self.task!r}; valid: {', '.join(TASK_METRICS)}")
        self.contexts = _int_list(self.contexts, "contexts")
        self.decode_contexts = _int_list(self.decode_contexts, "decode_contexts") if self.decode_contexts not in ("", None, ()) else ()
        if self.stride is None:
            self.stride = max(1, self.context // 2)
        for name in ("context", "stride", "max_tokens", "batch_size", "max_length", "new_tokens", "reps"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.cache not in CACHES:
            raise ValueError(f"Unknown --cache {self.cache!r}; valid: {', '.join(CACHES)}")
        if self.warmup < 1:
            raise ValueError("--warmup must be at least 1: the warm-up runs are where peak memory is sampled")
        if self.stride > self.context:
            raise ValueError(f"--stride {self.stride} exceeds --context {self.context}: tokens between windows would never be scored")
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"--threads must be positive, got {self.threads}")
        if self.eval_size is not None and self.eval_size <= 0:
            raise ValueError(f"--eval-size must be positive, got {self.eval_size}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"--mlm-probability must be in (0, 1), got {self.mlm_probability}")
        if self.dtype not in DTYPES:
            raise ValueError(f"Unknown --dtype {self.dtype!r}; valid: {', '.join(DTYPES)}")
        if self.data is not None:
            from . import data as D

            D.data_format(self.data)  # FileNotFoundError naming the path and the formats
        check_output_folder(self.out, bool(self.overwrite), "--out", inputs=[self.model, self.data])
        return specs


def load_config_file(path: str) -> dict[str, Any]:
    """Keys of a YAML/JSON bench config (dashes or underscores), checked against BenchConfig."""
    return read_settings_file(path, [f.name for f in dataclasses.fields(BenchConfig)])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench flags (shared by `hf-relattn bench` and `python -m hf_relattn.demo`).

    Every default is None here: the effective default comes from BenchConfig, unless the
    --config file sets the key; a flag on the command line always wins.
    """
    d = BenchConfig()
    a = parser.add_argument
    a("--model", help="preset (smollm2-135m, minilm-l6, vit-mnist-tiny), checkpoint folder or Hub id")
    a("--variants", metavar="SPEC", help='comma-separated entries name[:k=v[:k=v]], "+" composes: "gqa:num_key_value_heads=1,alibi,mqa+alibi"')
    a("--data", help="evaluation data: text file (causal/masked LM; default pydoc_data.topics), .tsv/.csv/.jsonl (seq-cls), MNIST idx (image-cls)")
    a("--out", help=f"output folder (default {d.out}); must be new or empty unless --overwrite")
    a("--overwrite", action="store_const", const=True, help="replace the contents of a non-empty --out (an earlier bench's)")
    a("--config", help="YAML/JSON file with the same keys as these flags; flags override it")
    a("--task", help="causal-lm, masked-lm, seq-cls or image-cls (default: from the checkpoint's head)")
    a("--dtype", help=f"weights dtype (default {d.dtype})")
    a("--device", help="cpu or cuda (default: cuda when available)")
    a("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    a("--context", type=int, help=f"perplexity window / masked-LM block length in tokens (default {d.context})")
    a("--stride", type=int, help="perplexity window step; the overlap only serves as context (default: context / 2)")
    a("--max-tokens", type=int, help=f"cap on scored tokens (default {d.max_tokens})")
    a("--eval-size", type=int, help="classification: evaluate the last N examples (default all)")
    a("--batch-size", type=int, help=f"classification / masked-LM batch size (default {d.batch_size})")
    a("--max-length", type=int, help=f"seq-cls: max tokens per example (default {d.max_length})")
    a("--text-column", help=f"text column of tabular data (default {d.text_column})")
    a("--label-column", help=f"label column (default {d.label_column})")
    a("--mlm-probability", type=float, help=f"masked-LM masking rate (default {d.mlm_probability})")
    a("--seed", type=int, help=f"seed of the random inputs and the masks (default {d.seed})")
    a("--contexts", help=f"prefill lengths, comma-separated (default {','.join(map(str, d.contexts))})")
    a("--decode-contexts", help=f"decode prefill lengths, causal LMs; empty to skip (default {','.join(map(str, d.decode_contexts))})")
    a("--new-tokens", type=int, help=f"greedy decode steps per repetition (default {d.new_tokens})")
    a("--cache", help="decode cache: dynamic, or streaming (hf_relattn.StreamingCache for models with a causal sliding "
                      f"window: a bounded KV cache; the others keep the dynamic cache) (default {d.cache})")
    a("--warmup", type=int, help=f"untimed runs before timing; peak memory is sampled in them (default {d.warmup})")
    a("--reps", type=int, help=f"timed repetitions (default {d.reps})")
    a("--no-plots", dest="plots", action="store_const", const=False, help="skip the PNG plots")


def config_from_args(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> BenchConfig:
    """BenchConfig defaults < `defaults` (e.g. the demo's) < --config file < flags given."""
    values: dict[str, Any] = dict(defaults or {})
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    for field in dataclasses.fields(BenchConfig):
        flag = getattr(args, field.name, None)
        if flag is not None:
            values[field.name] = flag
    return BenchConfig(**values)


def description() -> str:
    """The usage and grammar paragraphs of the module doc (for --help)."""
    return "\n\n".join(__doc__.split("\n\n")[:3])


def build_parser(prog: str = "hf-relattn bench", text: str | None = None) -> argparse.ArgumentParser:
    """A standalone parser with the bench flags (the CLI adds the same flags to its subcommand)."""
    parser = argparse.ArgumentParser(prog=prog, description=text or description(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


# ======================================== measurement (shared helpers: hf_relattn.measure)
def cache_bytes(cache: Any) -> int:
    """Bytes held by the keys and values of a transformers Cache (every layer)."""
    total = 0
    for layer in getattr(cache, "layers", ()):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def parameter_count(model: nn.Module) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def prefill(model: nn.Module, ids: torch.Tensor, cache: Any = None) -> Any:
    """One forward over `ids` (1, L) building the KV cache (`cache`, or the model's default) and
    only the last logits, like `generate`."""
    kwargs: dict[str, Any] = {"use_cache": True, **({"cache": cache} if cache is not None else {})}
    if forward_accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    return model(input_ids=ids, **kwargs)


@torch.inference_mode()
def decode_steps(model: nn.Module, cache: Any, next_token: torch.Tensor, new_tokens: int) -> float:
    """Greedy-decode `new_tokens` tokens from `cache` (modified in place); returns seconds."""
    device = next_token.device
    sync(device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=next_token, cache=cache, use_cache=True)
        cache, next_token = out.cache, out.logits[:, -1:].argmax(-1)
    sync(device)
    return time.perf_counter() - start


@torch.inference_mode()
def decode_run(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, int]:
    """Prefill `ids` (1-D or (1, L)), then greedy-decode `new_tokens` with the cache.

    Returns (decode tokens/s, KV-cache bytes after the prefill)."""
    ids = ids[None] if ids.dim() == 1 else ids
    out = prefill(model, ids)
    kv_bytes = cache_bytes(out.cache)
    seconds = decode_steps(model, out.cache, out.logits[:, -1:].argmax(-1), new_tokens)
    return new_tokens / seconds, kv_bytes


# ================================================================================ quality
@torch.inference_mode()
def accuracy(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], metric: Any, step: Callable[[], None] | None = None) -> dict[str, Any]:
    """Argmax accuracy over prepared labelled batches with an accuracy-type metrics module:
    "accuracy" (one label per example) or "masked_accuracy" (per token; labels -100 skipped)."""
    device = next(model.parameters()).device
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        predictions = model(**inputs).logits.argmax(-1)
        metric.add_batch(predictions=predictions.reshape(-1).cpu().tolist(), references=batch["labels"].reshape(-1).tolist())
        if step:
            step()
    return metric.compute()


# =================================================================================== data
def default_text() -> str:
    """CPython's embedded Python Language Reference text (pydoc_data.topics): no download."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _raw_text(cfg: BenchConfig) -> tuple[str, str]:
    """(text, description) for the LM tasks."""
    if cfg.data is None:
        return default_text(), "pydoc_data.topics (embedded in CPython)"
    from . import data as D

    raw = D.load_raw(cfg.data)
    column = "text" if "text" in raw.column_names else cfg.text_column
    if column not in raw.column_names:
        raise ValueError(f"Column {column!r} not found in {cfg.data} (columns: {raw.column_names}); set --text-column")
    # text files come back as pieces that keep their line breaks; rows of tables get one each
    joiner = "" if column == "text" and D.data_format(cfg.data) == "text" else "\n"
    return joiner.join(str(t) for t in raw[column]), cfg.data


def text_prefix(tokenizer: Any, text: str, num_tokens: int) -> str:
    """The shortest of the doubling prefixes of `text` that holds more than `num_tokens` tokens
    (or all of it), so a large file is never tokenized whole."""
    chars = max(4096, 8 * num_tokens)
    while chars < len(text) and len(tokenizer(text[:chars]).input_ids) <= num_tokens:
        chars *= 2
    return text[:chars]


def lm_token_ids(tokenizer: Any, text: str, max_tokens: int) -> torch.Tensor:
    """The first max_tokens + 1 token ids of `text` (so at most max_tokens scored targets)."""
    ids = tokenizer(text_prefix(tokenizer, text, max_tokens + 1)).input_ids
    if len(ids) < 2:
        raise ValueError("The evaluation text has fewer than 2 tokens")
    return torch.tensor(ids[: max_tokens + 1], dtype=torch.long)


# ============================================================================ inputs
@dataclasses.dataclass
class Workload:
    """What the quality and efficiency loops run: built once, shared by every model."""

    task: str
    quality_batches: list[Any]  # LM: sliding windows of `ids`; others: prepared batches
    ids: torch.Tensor | None
    quality_info: dict[str, Any]
    contexts: tuple[int, ...]
    prefill_inputs: dict[int, dict[str, torch.Tensor]]
    decode_contexts: tuple[int, ...]
    decode_inputs: dict[int, torch.Tensor]


def _random_ids(length: int, vocab: int, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + length)
    return torch.randint(0, vocab, (1, length), generator=generator).to(device)


def _model_limit(config: Any) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def build_workload(cfg: BenchConfig, task: str, model: nn.Module, processor: Any, raw: Any, device: torch.device) -> Workload:
    """Tokenize / featurize the quality data and draw the random efficiency inputs."""
    from . import data as D

    config = model.config
    info: dict[str, Any] = {"metric": TASK_METRICS[task][0], "key": TASK_METRICS[task][1], "higher_is_better": TASK_METRICS[task][2]}
    ids = None
    batches: list[Any]
    prep_args = SimpleNamespace(text_column=cfg.text_column, label_column=cfg.label_column, block_size=cfg.context, max_length=cfg.max_length)
    if task == "causal-lm":
        text, source = raw
        ids = lm_token_ids(processor, text, cfg.max_tokens).to(device)
        batches = sliding_windows(ids.numel(), cfg.context, cfg.stride)
        info.update(data=source, context=cfg.context, stride=cfg.stride, scored_tokens=ids.numel() - 1, windows=len(batches))
    elif task == "masked-lm":
        text, source = raw
        limit = _model_limit(config)
        if limit is not None and cfg.context > limit:
            raise ValueError(f"--context {cfg.context} exceeds the model's maximum of {limit} positions")
        import datasets

        n_blocks = max(1, cfg.max_tokens // cfg.context)
        prefix = text_prefix(processor, text, n_blocks * cfg.context)
        # hf_relattn.data packs the tokens into blocks of --context, exactly as masked-LM training does
        blocks = D.prepare("masked-lm", datasets.Dataset.from_dict({"text": [prefix]}), processor, prep_args, config, None)
        blocks = blocks.select(range(min(n_blocks, len(blocks))))
        collate = D.collator("masked-lm", processor, cfg.mlm_probability)
        collate.seed = cfg.seed  # a seeded generator inside the collator: the same masks every run
        rows = [blocks[i] for i in range(len(blocks))]
        batches = [collate(rows[i : i + cfg.batch_size]) for i in range(0, len(rows), cfg.batch_size)]
        info.update(data=source, context=cfg.context, blocks=len(rows), mlm_probability=cfg.mlm_probability, seed=cfg.seed)
    else:
        from torch.utils.data import DataLoader

        full = raw
        evaluated = full if cfg.eval_size is None or cfg.eval_size >= len(full) else D.split(full, 0.0, cfg.eval_size, None)[1]
        labels = D.class_labels(full, cfg.label_column, getattr(config, "num_labels", None))
        prepared = D.prepare(task, evaluated, processor, prep_args, config, labels)
        loader = DataLoader(prepared, batch_size=cfg.batch_size, collate_fn=D.collator(task, processor, cfg.mlm_probability))
        batches = list(loader)
        info.update(data=cfg.data, examples=len(prepared), eval_size=cfg.eval_size, labels=[str(v) for v in labels])

    # efficiency inputs: random ids of each length (the same for every model); ViT: one image size
    if task == "image-cls":
        vision = getattr(config, "vision_config", None) or config  # CLIP: the vision tower's sizes
        size, channels = vision.image_size, vision.num_channels
        patch = vision.patch_size
        adapter = get_adapter(config)  # patches + the tokens before them ([CLS]; DeiT's distillation token; registers)
        tokens = (size // patch) ** 2 + (adapter.prefix_tokens(vision) if adapter.spatial else 1)
        generator = torch.Generator().manual_seed(cfg.seed)
        pixels = torch.randn(1, channels, size, size, generator=generator).to(device)
        contexts = (tokens,)
        prefill_inputs = {tokens: {"pixel_values": pixels}}
    else:
        limit = _model_limit(config)
        if task != "causal-lm" and limit is not None and max(cfg.contexts) > limit:
            raise ValueError(f"--contexts {','.join(map(str, cfg.contexts))}: the model has learned positions up to {limit} tokens")
        contexts = tuple(cfg.contexts)
        prefill_inputs = {n: {"input_ids": _random_ids(n, config.vocab_size, cfg.seed, device)} for n in contexts}
    decode_contexts = tuple(cfg.decode_contexts) if task == "causal-lm" else ()
    decode_inputs = {n: _random_ids(n, config.vocab_size, cfg.seed + 1, device) for n in decode_contexts}
    return Workload(task, batches, ids, info, contexts, prefill_inputs, decode_contexts, decode_inputs)


# ============================================================================== the run
def _order(models: list[Any], rep: int) -> list[Any]:
    """Round-robin order starting at a different model each repetition."""
    shift = rep % len(models)
    return models[shift:] + models[:shift]


@dataclasses.dataclass
class Entry:
    """One measured model (the baseline or a variant) and its growing results record."""

    label: str
    spec: VariantSpec | None
    model: nn.Module
    record: dict[str, Any]


def _timed_forward(model: nn.Module, inputs: dict[str, torch.Tensor], causal: bool, device: torch.device) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    if causal:
        out = prefill(model, inputs["input_ids"])
    else:
        with torch.inference_mode():
            out = model(**inputs)
    sync(device)
    return time.perf_counter() - start, out


def _resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return device


def _load(cfg: BenchConfig) -> tuple[str, nn.Module, Any, Any, dict[str, Any]]:
    """Resolve the task, read the data, then load the model (data errors come before the big load)."""
    from . import data as D
    from .presets import load
    from .training import AUTO_CLASSES, config_of, image_processor, resolve_task

    config = config_of(cfg.model)
    task = resolve_task(SimpleNamespace(task=cfg.task, model=cfg.model), config)
    if task in ("causal-lm", "masked-lm"):
        raw: Any = _raw_text(cfg)
    else:
        if cfg.data is None:
            raise ValueError(f"--data is required for {task} (a .tsv/.csv/.jsonl file for seq-cls, MNIST idx for image-cls)")
        raw = D.load_raw(cfg.data)
    kwargs: dict[str, Any] = {"output_loading_info": True}
    has_head = any(a.endswith(("ForSequenceClassification", "ForImageClassification")) for a in (config.architectures or []))
    if task in ("seq-cls", "image-cls") and not has_head:
        kwargs["num_labels"] = len(D.class_labels(raw, cfg.label_column, None))
    (model, info), processor = load(cfg.model, dtype=cfg.dtype, model_class=AUTO_CLASSES[task], **kwargs)
    if task == "image-cls":
        processor = image_processor(cfg.model, model.config)
    elif processor is None:
        raise ValueError(f"{cfg.model!r} has no tokenizer; {task} needs one")
    missing = sorted(info.get("missing_keys", ()))
    return task, model, processor, raw, {"missing_keys": missing}


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the whole benchmark; returns the results (also written to cfg.out)."""
    specs = cfg.validate()  # every cheap check before any model is loaded
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, specs)
    finally:
        torch.set_num_threads(threads)  # a library call must not leave the process changed


def _run(cfg: BenchConfig, specs: list[VariantSpec]) -> dict[str, Any]:
    from tqdm.auto import tqdm

    device = _resolve_device(cfg.device)
    out_dir = Path(cfg.out)
    started = time.perf_counter()
    _note(f"Loading {cfg.model} ...")
    task, base, processor, raw, load_info = _load(cfg)
    base.to(device).eval()
    if not is_adapted(base):
        base.set_attn_implementation("sdpa")  # the baseline runs transformers' native kernel
    if load_info["missing_keys"]:
        _note(f"Warning: {len(load_info['missing_keys'])} weights were not in the checkpoint and are random "
              f"(e.g. {load_info['missing_keys'][0]}): quality reflects an untrained part.")
    _note(f"Loaded {type(base).__name__} ({task}) in {time.perf_counter() - started:.1f}s; converting {len(specs)} variant(s) ...")
    work = build_workload(cfg, task, base, processor, raw, device)  # data problems surface before the copies
    entries = [Entry(BASELINE, None, base, {})]
    for spec in specs:
        entries.append(Entry(spec.label, spec, build_variant(base, spec), {}))
    causal = task == "causal-lm"

    n = len(entries)
    total = n * (len(work.quality_batches) + len(work.contexts) * (cfg.warmup + cfg.reps)
                 + len(work.decode_contexts) * (1 + cfg.warmup + cfg.reps))
    bar = tqdm(total=total, desc="bench", unit="run", file=sys.stderr, dynamic_ncols=True)
    metric = load_metric(work.quality_info["metric"])  # one Evaluate module, reused (compute() resets it)

    # ---- quality: one pass per model (deterministic, nothing to repeat)
    for entry in entries:
        bar.set_postfix_str(f"{entry.label}: {work.quality_info['metric']}", refresh=False)
        if task == "causal-lm":
            quality = perplexity(entry.model, work.ids, cfg.context, cfg.stride, metric, bar.update)
        else:
            quality = accuracy(entry.model, work.quality_batches, metric, bar.update)
        entry.record["quality"] = {k: (float(v) if isinstance(v, float) else v) for k, v in quality.items()}
        entry.record["parameters"] = parameter_count(entry.model)

    # ---- prefill: warm-up runs (memory sampled), then timed repetitions, round-robin
    for entry in entries:
        entry.record["prefill"] = []
    for context in work.contexts:
        inputs = work.prefill_inputs[context]
        memory: dict[str, list[int]] = {e.label: [] for e in entries}
        kv: dict[str, int | None] = {}
        times: dict[str, list[float]] = {e.label: [] for e in entries}
        for rep in range(cfg.warmup + cfg.reps):
            for entry in _order(entries, rep):
                bar.set_postfix_str(f"{entry.label}: prefill {context}", refresh=False)
                if rep < cfg.warmup:
                    with PeakMemory(device) as pm:
                        _, output = _timed_forward(entry.model, inputs, causal, device)
                    if pm.peak_bytes is not None:
                        memory[entry.label].append(pm.peak_bytes)
                    kv[entry.label] = cache_bytes(output.cache) if getattr(output, "cache", None) is not None else None
                else:
                    seconds, output = _timed_forward(entry.model, inputs, causal, device)
                    times[entry.label].append(seconds)
                del output
                bar.update()
        for entry in entries:
            t = times[entry.label]
            entry.record["prefill"].append({
                "context": context,
                "latency_s": summarize(t),
                "tokens_per_s": summarize([context / s for s in t]),
                "peak_memory_bytes": summarize(memory[entry.label]) if memory[entry.label] else None,
                "kv_cache_bytes": kv[entry.label],
            })

    # ---- decode: prefill once per model, every run decodes from a copy of that cache
    for entry in entries:
        entry.record["decode"] = []
    for context in work.decode_contexts:
        state: dict[str, tuple[Any, torch.Tensor]] = {}
        for entry in entries:
            bar.set_postfix_str(f"{entry.label}: decode prefill {context}", refresh=False)
            output = prefill(entry.model, work.decode_inputs[context], decode_cache(entry.model, cfg.cache))
            state[entry.label] = (output.cache, output.logits[:, -1:].argmax(-1))
            del output
            bar.update()
        times = {e.label: [] for e in entries}
        for rep in range(cfg.warmup + cfg.reps):
            for entry in _order(entries, rep):
                bar.set_postfix_str(f"{entry.label}: decode {context}+{cfg.new_tokens}", refresh=False)
                cache, token = state[entry.label]
                seconds = decode_steps(entry.model, copy.deepcopy(cache), token, cfg.new_tokens)
                if rep >= cfg.warmup:
                    times[entry.label].append(seconds)
                bar.update()
        for entry in entries:
            t = times[entry.label]
            entry.record["decode"].append({
                "context": context,
                "new_tokens": cfg.new_tokens,
                "seconds": summarize(t),
                "tokens_per_s": summarize([cfg.new_tokens / s for s in t]),
                "kv_cache_bytes": cache_bytes(state[entry.label][0]),
                "cache": type(state[entry.label][0]).__name__,
            })
        del state
    bar.close()

    results = assemble(cfg, specs, task, base, work, entries, device, time.perf_counter() - started, load_info)
    with reporting_write_errors("the bench results", out_dir):
        if cfg.overwrite:
            clear_folder(out_dir)  # the bench ran: only now do the earlier results and plots go
        write_outputs(results, out_dir, plots=cfg.plots)
    return results


def decode_cache(model: nn.Module, kind: str) -> Any:
    """A fresh decode cache of `kind` for `model`; None: the model's own default."""
    if kind == "streaming" and any(streaming_window(m) is not None for m in get_adapter(model).attention_modules(model)):
        return StreamingCache(model)
    return None


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _model_facts(model: nn.Module, task: str, source: str) -> dict[str, Any]:
    config = model.config
    facts: dict[str, Any] = {"source": source, "class": type(model).__name__, "model_type": config.model_type, "task": task}
    try:
        adapter = get_adapter(model)
        modules = adapter.attention_modules(model)
        layer = modules[0].config if modules else config  # a layer's own config (CLIP: its tower's)
        facts.update(
            num_layers=len(modules),
            num_attention_heads=adapter.num_heads(layer),
            num_key_value_heads=adapter.num_kv_heads(modules[0]) if modules else None,
            head_dim=adapter.head_dim(layer),
        )
    except ValueError:
        pass
    facts["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    return facts


def ratios(record: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """A variant's ratios against the baseline (see the module doc for the definitions)."""
    key = record["quality_key"]
    out: dict[str, Any] = {
        "quality": quotient(record["quality"][key], base["quality"][key]),
        "parameters": quotient(record["parameters"], base["parameters"]),
        "prefill": {},
        "decode": {},
    }
    base_prefill = {m["context"]: m for m in base["prefill"]}
    for m in record["prefill"]:
        b = base_prefill[m["context"]]
        out["prefill"][str(m["context"])] = {
            "latency_s": paired_ratio(m["latency_s"]["values"], b["latency_s"]["values"]),
            "tokens_per_s": paired_ratio(m["tokens_per_s"]["values"], b["tokens_per_s"]["values"]),
            "peak_memory_bytes": quotient(
                m["peak_memory_bytes"]["median"] if m["peak_memory_bytes"] else None,
                b["peak_memory_bytes"]["median"] if b["peak_memory_bytes"] else None,
            ),
            "kv_cache_bytes": quotient(m["kv_cache_bytes"], b["kv_cache_bytes"]),
        }
    base_decode = {m["context"]: m for m in base["decode"]}
    for m in record["decode"]:
        b = base_decode[m["context"]]
        out["decode"][str(m["context"])] = {
            "seconds": paired_ratio(m["seconds"]["values"], b["seconds"]["values"]),
            "tokens_per_s": paired_ratio(m["tokens_per_s"]["values"], b["tokens_per_s"]["values"]),
            "kv_cache_bytes": quotient(m["kv_cache_bytes"], b["kv_cache_bytes"]),
        }
    return out


def _settings(cfg: BenchConfig) -> dict[str, Any]:
    values = dataclasses.asdict(cfg)
    values["contexts"], values["decode_contexts"] = list(cfg.contexts), list(cfg.decode_contexts)
    values["variants"] = cfg.variants if isinstance(cfg.variants, str) else list(cfg.variants)
    return values


def assemble(
    cfg: BenchConfig, specs: list[VariantSpec], task: str, base: nn.Module, work: Workload,
    entries: list[Entry], device: torch.device, seconds: float, load_info: dict[str, Any],
) -> dict[str, Any]:
    """The results.json document."""
    key = TASK_METRICS[task][1]
    rows = []
    for entry in entries:
        record = {
            "label": entry.label,
            "spec": entry.spec.to_json()["steps"] if entry.spec else [],
            "model_class": type(entry.model).__name__,
            "attn_implementation": entry.model.config._attn_implementation,
            "relattn_spec": copy.deepcopy(getattr(entry.model.config, SPEC_KEY, None)) if is_adapted(entry.model) else None,
            "quality_key": key,
            **entry.record,
        }
        rows.append(record)
    for record in rows:
        record["ratios"] = ratios(record, rows[0])
    return {
        "format": RESULTS_FORMAT,
        "tool": "hf_relattn.bench",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": seconds,
        "settings": _settings(cfg),
        "environment": environment(device),
        "model": {**_model_facts(base, task, cfg.model), "missing_keys": load_info["missing_keys"]},
        "quality": work.quality_info,
        "variants": [s.to_json() for s in specs],
        "ratio_definitions": {
            "timings": "median over repetitions r of variant[r] / baseline[r]; the pair ran in the same round at the same context",
            "sizes": "variant / baseline (parameters, KV-cache bytes, median peak memory)",
            "quality": "variant / baseline of the headline metric",
        },
        "results": rows,
    }


# ============================================================================== reporting
def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"x{value:.2f}"


def _fmt_num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if value == 0 or math.isinf(value) or math.isnan(value):
        return str(value)
    magnitude = math.floor(math.log10(abs(value)))
    return f"{value:.{max(0, digits - 1 - magnitude)}f}" if magnitude < digits + 2 else f"{value:.3g}"


def _fmt_params(value: int) -> str:
    return f"{value / 1e6:.2f}M" if value >= 1e5 else f"{value / 1e3:.1f}K"


def summary_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the one-line-per-variant summary."""
    key = results["quality"]["key"]
    first = results["results"][0]
    contexts = [m["context"] for m in first["prefill"]]
    decodes = [m["context"] for m in first["decode"]]
    largest = max(contexts)
    headers = ["variant", "params", key]
    headers += [f"prefill tok/s @{c}" for c in contexts]
    headers += [f"peak mem @{largest}"]
    if first["prefill"][-1]["kv_cache_bytes"] is not None:
        headers += [f"KV cache @{largest}"]
    headers += [f"decode tok/s @{c}" for c in decodes]
    rows = []
    for r in results["results"]:
        ratio = r["ratios"]
        row = [r["label"], _fmt_params(r["parameters"]), f"{_fmt_num(r['quality'][key], 4)} ({_fmt_ratio(ratio['quality'])})"]
        for m in r["prefill"]:
            row.append(f"{_fmt_num(m['tokens_per_s']['median'])} ({_fmt_ratio(ratio['prefill'][str(m['context'])]['tokens_per_s'])})")
        last = next(m for m in r["prefill"] if m["context"] == largest)
        peak = fmt_bytes(last["peak_memory_bytes"]["median"] if last["peak_memory_bytes"] else None)
        row.append(f"{peak} ({_fmt_ratio(ratio['prefill'][str(largest)]['peak_memory_bytes'])})")
        if last["kv_cache_bytes"] is not None:
            row.append(f"{fmt_bytes(last['kv_cache_bytes'])} ({_fmt_ratio(ratio['prefill'][str(largest)]['kv_cache_bytes'])})")
        for m in r["decode"]:
            row.append(f"{_fmt_num(m['tokens_per_s']['median'])} ({_fmt_ratio(ratio['decode'][str(m['context'])]['tokens_per_s'])})")
        rows.append(row)
    return headers, rows


def _caption(results: dict[str, Any]) -> str:
    q, s, env, m = results["quality"], results["settings"], results["environment"], results["model"]
    if q["metric"] == "perplexity":
        what = f"perplexity over {q['scored_tokens']} tokens of {q['data']} (windows of {q['context']}, stride {q['stride']})"
    elif q["metric"] == "masked_accuracy":
        what = f"masked-token accuracy over {q['blocks']} blocks of {q['context']} tokens of {q['data']} (masking rate {q['mlm_probability']}, seed {q['seed']})"
    else:
        what = f"accuracy over {q['examples']} examples of {q['data']}"
    return (f"{m['source']} ({m['class']}, {m['dtype']}) on {env['device']} ({env['cpu_model']}, {env['torch_threads']} threads). "
            f"Quality: {what}. Timings: median of {s['reps']} interleaved repetitions after {s['warmup']} warm-up; "
            f"(xR) = ratio to the baseline.")


def render_markdown(results: dict[str, Any], plots: Sequence[str] = ()) -> str:
    """results.md: summary, per-context details, environment, method."""
    headers, rows = summary_table(results)
    lines = [f"# hf_relattn bench: {results['model']['source']}", "", _caption(results), "", markdown_table(headers, rows), ""]
    detail_h = ["variant", "context", "latency ms median [min-max]", "tok/s median [min-max]", "latency x base", "peak mem (median)", "KV cache", "KV x base"]
    detail = []
    for r in results["results"]:
        for m in r["prefill"]:
            lat, tps, ratio = m["latency_s"], m["tokens_per_s"], r["ratios"]["prefill"][str(m["context"])]
            detail.append([
                r["label"], str(m["context"]),
                f"{lat['median'] * 1e3:.1f} [{lat['min'] * 1e3:.1f}-{lat['max'] * 1e3:.1f}]",
                f"{_fmt_num(tps['median'])} [{_fmt_num(tps['min'])}-{_fmt_num(tps['max'])}]",
                _fmt_ratio(ratio["latency_s"]),
                fmt_bytes(m["peak_memory_bytes"]["median"] if m["peak_memory_bytes"] else None),
                fmt_bytes(m["kv_cache_bytes"]), _fmt_ratio(ratio["kv_cache_bytes"]),
            ])
    lines += ["## Prefill", "", markdown_table(detail_h, detail), ""]
    if results["results"][0]["decode"]:
        dec_h = ["variant", "context", "new tokens", "tok/s median [min-max]", "tok/s x base", "KV cache", "KV x base", "cache"]
        dec = []
        for r in results["results"]:
            for m in r["decode"]:
                tps, ratio = m["tokens_per_s"], r["ratios"]["decode"][str(m["context"])]
                dec.append([r["label"], str(m["context"]), str(m["new_tokens"]),
                            f"{_fmt_num(tps['median'])} [{_fmt_num(tps['min'])}-{_fmt_num(tps['max'])}]",
                            _fmt_ratio(ratio["tokens_per_s"]), fmt_bytes(m["kv_cache_bytes"]), _fmt_ratio(ratio["kv_cache_bytes"]),
                            m.get("cache", "")])
        lines += ["## Decode (greedy, KV cache)", "", markdown_table(dec_h, dec), ""]
    spec_rows = [[r["label"], json.dumps(r["spec"]) if r["spec"] else "(unmodified, native sdpa)", r["model_class"], r["attn_implementation"]] for r in results["results"]]
    lines += ["## Variants", "", markdown_table(["variant", "conversions", "model class", "attention"], spec_rows, left=4), ""]
    env_rows = [[k, str(v)] for k, v in results["environment"].items()]
    lines += ["## Environment", "", markdown_table(["", "value"], env_rows, left=2), ""]
    lines += ["## Method", ""] + [f"- ratios, {k}: {v}" for k, v in results["ratio_definitions"].items()]
    lines += ["- peak memory: extra RSS during a warm-up forward (CPU, sampled every 0.5 ms) or CUDA max allocated", ""]
    for plot in plots:
        lines += [f"![{plot}]({plot})", ""]
    return "\n".join(lines)


def make_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """quality_vs_speed.png and latency_vs_context.png (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["results"]
    q = results["quality"]
    key = q["key"]
    largest = max(m["context"] for m in rows[0]["prefill"])
    paths = []

    fig, ax = plt.subplots(figsize=(7, 5))
    for i, r in enumerate(rows):
        m = next(m for m in r["prefill"] if m["context"] == largest)
        tps = m["tokens_per_s"]
        x, y = tps["median"], r["quality"][key]
        ax.errorbar([x], [y], xerr=[[x - tps["min"]], [tps["max"] - x]], fmt="*" if i == 0 else "o",
                    markersize=14 if i == 0 else 8, capsize=3, label=r["label"])
        ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    if key == "perplexity" and all(r["quality"][key] > 0 and math.isfinite(r["quality"][key]) for r in rows):
        ax.set_yscale("log")
    ax.set_xlabel(f"prefill tokens/s at {largest} tokens (median, min-max)")
    ax.set_ylabel(f"{key} ({'higher' if q['higher_is_better'] else 'lower'} is better)")
    ax.set_title(f"{results['model']['source']}: quality vs speed", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    paths.append(out_dir / PLOTS[0])
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    for r in rows:
        xs = [m["context"] for m in r["prefill"]]
        med = [m["latency_s"]["median"] * 1e3 for m in r["prefill"]]
        lo = [med[i] - m["latency_s"]["min"] * 1e3 for i, m in enumerate(r["prefill"])]
        hi = [m["latency_s"]["max"] * 1e3 - med[i] for i, m in enumerate(r["prefill"])]
        ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=r["label"])
    if len(rows[0]["prefill"]) > 1:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("prefill latency, ms (median, min-max)")
    ax.set_title(f"{results['model']['source']}: prefill latency vs context", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    paths.append(out_dir / PLOTS[1])
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_outputs(results: dict[str, Any], out_dir: Path, plots: bool = True) -> dict[str, Path]:
    """results.json, plots, results.md in `out_dir`; prints the table and the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    plot_paths = make_plots(results, out_dir) if plots else []
    paths["markdown"].write_text(render_markdown(results, [p.name for p in plot_paths]))
    for p in plot_paths:
        paths[p.stem] = p
    results["files"] = {k: str(v) for k, v in paths.items()}
    headers, rows = summary_table(results)
    print_table(_caption(results), headers, rows)
    print(f"\nResults: {paths['json']}  {paths['markdown']}" + "".join(f"  {p}" for p in plot_paths) + f"  ({results['duration_s']:.0f}s)")
    return paths


def main(argv: Sequence[str] | None = None, prog: str = "hf-relattn bench", defaults: dict[str, Any] | None = None) -> int:
    """Standalone entry point (the demo uses it with its `defaults`): 0, or 2 after printing an error."""
    args = build_parser(prog).parse_args(argv)
    try:
        run_bench(config_from_args(args, defaults))
    except (ValueError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


# =============================================================== demo --perf benchmarks
def _interleaved_times(fns: Sequence[Callable[[], Any]], reps: int, warmup: int = 1) -> list[list[float]]:
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for rep in range(reps):
        order = list(range(len(fns)))
        order = order[rep % len(fns):] + order[: rep % len(fns)]
        for i in order:
            start = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - start)
    return times


@torch.inference_mode()
def plugin_overhead(base: nn.Module, context: int, reps: int, seed: int = 0) -> dict[str, Any]:
    """Prefill time of identity GQA (G == H, MHA) through the plugin engine vs native sdpa.

    Both models hold the same weights; the engine with no in-attention variant must dispatch
    to transformers' sdpa, so the ratio measures the plugin's dispatch overhead."""
    heads = get_adapter(base).num_heads(base.config)
    native = convert(copy.deepcopy(base), "gqa", num_key_value_heads=heads).eval()
    native.set_attn_implementation("sdpa")
    plugin = copy.deepcopy(native)
    plugin.set_attn_implementation("relattn")
    ids = _random_ids(context, base.config.vocab_size, seed, next(base.parameters()).device)
    check = ids[:, : min(64, context)]
    max_diff = (native(check).logits - plugin(check).logits).abs().max().item()
    if max_diff > 1e-4:
        raise RuntimeError(f"engine and native sdpa disagree by {max_diff:g}: the overhead comparison would be meaningless")
    t_native, t_plugin = _interleaved_times([lambda: prefill(native, ids), lambda: prefill(plugin, ids)], reps)
    return {
        "context": context, "heads": heads, "max_abs_diff": max_diff,
        "native_s": summarize(t_native), "plugin_s": summarize(t_plugin),
        "ratio": paired_ratio(t_plugin, t_native),
    }


def long_context_decode(base: nn.Module, context: int, new_tokens: int, seed: int = 0) -> dict[str, Any]:
    """Decode tokens/s and KV-cache bytes at a long context: the loaded model vs MQA."""
    mqa = convert(copy.deepcopy(base), "mqa").eval()
    ids = _random_ids(context, base.config.vocab_size, seed, next(base.parameters()).device)
    out: dict[str, Any] = {"context": context, "new_tokens": new_tokens}
    for name, model in (("original", base), ("mqa", mqa)):
        tps, kv = decode_run(model, ids, new_tokens)
        out[name] = {"tokens_per_s": tps, "kv_cache_bytes": kv}
    out["tokens_per_s_ratio"] = out["mqa"]["tokens_per_s"] / out["original"]["tokens_per_s"]
    out["kv_cache_ratio"] = out["mqa"]["kv_cache_bytes"] / out["original"]["kv_cache_bytes"]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
