"""`make demo`: SmolLM2-135M -> MQA untrained vs calibrated; and the bench with demo defaults.

    python -m hf_relattn.demo --recovery [--transfer-steps 20] [--eval-tokens 4096] [--calibration-tokens 4096]

`--recovery` (what `make demo` runs, about 5 minutes on 2 cores): the original model (9 query /
3 K/V heads), MQA with mean-pooled K/V heads (the GQA paper's init, untrained), MQA with
aligned heads (`init="aligned"`, fitted on the calibration text, training-free) and the same
after a short attention transfer (`hf_relattn.calibrate`): perplexity on WikiText-2 raw test
(calibration on WikiText-2 valid; CPython's `pydoc_data.topics`, split in two disjoint halves,
when ../shared/data is absent) and the KV cache of a 512-token prompt, measured on the cache.

    python -m hf_relattn.demo [any `hf-relattn bench` flag, e.g. --data FILE --reps 5 --out DIR]
    python -m hf_relattn.demo --perf [--prefill-context 1024] [--long-context 4096] [--new-tokens 32] [--reps 7]

The first form is `hf-relattn bench` (hf_relattn.bench) with embedded defaults: the
`smollm2-135m` preset, variants `gqa:num_key_value_heads=3` (the identity conversion: the
original GQA-3 model, a sanity row that must match the baseline), `mqa` (K/V heads mean-pooled,
Ainslie et al. 2023), `mqa:init=first` (each group's first head, the paper's ablation) and
`alibi` (Press et al. 2022), the baseline being the model as loaded (GQA-3, native sdpa);
perplexity over CPython's embedded `pydoc_data.topics` text unless `--data` is given (e.g.
../shared/data/wikitext-2-raw/wiki.test.raw); output in `demo_out/`. Flags given here, or a
`--config` file, override these defaults. No variant is trained: the quality column shows what
conversion alone costs before uptraining (`python -m hf_relattn.finetune`).

Settings are the bench defaults, sized for about 4 minutes on 2 idle CPU cores (estimate: load
~13 s, perplexity ~45 s, prefill ~90 s, decode ~85 s): perplexity over 1536 tokens in windows of
512 with stride 256; prefill at 256 and 1024 tokens; 16 greedy tokens after a 1024-token
prefill; 1 warm-up and 3 interleaved repetitions. `--reps 5 --max-tokens 8192` measures more.

`--perf`: the plugin's overhead (identity GQA, G == H, through the "relattn" engine vs native
sdpa, same weights, interleaved repetitions) and decode tokens/s at a long context for MQA vs
the original GQA-3, with the KV-cache bytes of each.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import bench

DEMO_DEFAULTS: dict[str, Any] = {
    "model": "smollm2-135m",
    "variants": "gqa:num_key_value_heads=3,mqa,mqa:init=first,alibi",
    "out": "demo_out",
    "overwrite": True,  # the demo's own folder: a second run replaces the first
}
PROG = "python -m hf_relattn.demo"


def run_demo(argv: Sequence[str]) -> int:
    """The bench with the demo's defaults; prints where the results and plots are."""
    args = bench.build_parser(PROG, text=__doc__).parse_args(list(argv))
    try:
        results = bench.run_bench(bench.config_from_args(args, DEMO_DEFAULTS))
    except (ValueError, FileNotFoundError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    files = results["files"]
    plots = [files[k] for k in ("quality_vs_speed", "latency_vs_context") if k in files]
    print(f"\nTotal {results['duration_s']:.0f}s. The converted rows are untrained: uptraining (hf_relattn.finetune) recovers quality.")
    if plots:
        print("Plots: " + "  ".join(plots))
    print(f"Tables: {files['markdown']}  raw numbers: {files['json']}")
    return 0


def run_perf(argv: Sequence[str]) -> int:
    """Plugin overhead and long-context decode (see the module doc)."""
    from .presets import load

    parser = argparse.ArgumentParser(prog=f"{PROG} --perf", description="Plugin overhead and long-context decode benchmark.")
    parser.add_argument("--perf", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=DEMO_DEFAULTS["model"], help="preset, folder or Hub id (LLaMA family)")
    parser.add_argument("--prefill-context", type=int, default=1024, help="prefill length of the overhead measurement")
    parser.add_argument("--long-context", type=int, default=4096, help="context before decoding")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens decoded with the cache")
    parser.add_argument("--reps", type=int, default=7, help="interleaved repetitions of the overhead measurement")
    args, ignored = parser.parse_known_args(list(argv))
    if ignored:
        print(f"{PROG} --perf: ignoring bench flags {' '.join(ignored)}", file=sys.stderr)
    start = time.perf_counter()
    print(f"Loading {args.model} ...", file=sys.stderr, flush=True)
    base, _ = load(args.model)
    base.eval()

    over = bench.plugin_overhead(base, args.prefill_context, args.reps)
    native, plugin = over["native_s"], over["plugin_s"]
    print(f"Prefill {over['context']} tokens, identity GQA (G=H={over['heads']}), median of {args.reps} interleaved: "
          f"native sdpa {native['median'] * 1e3:.0f} ms [{native['min'] * 1e3:.0f}-{native['max'] * 1e3:.0f}], "
          f"plugin engine {plugin['median'] * 1e3:.0f} ms [{plugin['min'] * 1e3:.0f}-{plugin['max'] * 1e3:.0f}], "
          f"paired ratio {over['ratio']:.3f} (overhead {100 * (over['ratio'] - 1):+.1f}%); outputs agree to {over['max_abs_diff']:.1e}",
          flush=True)

    dec = bench.long_context_decode(base, args.long_context, args.new_tokens)
    kv_heads = getattr(base.config, "num_key_value_heads", None) or over["heads"]
    original = "MHA" if kv_heads == over["heads"] else f"GQA-{kv_heads}"
    for name, label in (("original", f"{original} (original)"), ("mqa", "MQA")):
        print(f"Decode at {dec['context']} context, {label}: {dec[name]['tokens_per_s']:.2f} tok/s, "
              f"KV cache {dec[name]['kv_cache_bytes'] / 2**20:.1f} MB")
    print(f"MQA / {original} decode tokens/s ratio at {dec['context']} context: {dec['tokens_per_s_ratio']:.2f}x "
          f"(KV cache {1 / dec['kv_cache_ratio']:.1f}x smaller). Total {time.perf_counter() - start:.0f}s.")
    return 0


def _kv_cache_bytes(model: Any, ids: Any) -> int:
    import torch

    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def run_recovery(argv: Sequence[str]) -> int:
    """Untrained vs calibrated MQA (see the module doc)."""
    import copy
    import tempfile
    from pathlib import Path

    import torch

    from . import calibrate, convert
    from .transfer import text_batches
    from .presets import load

    parser = argparse.ArgumentParser(prog=f"{PROG} --recovery", description="SmolLM2-135M -> MQA, untrained vs calibrated.")
    parser.add_argument("--recovery", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=DEMO_DEFAULTS["model"], help="preset, folder or Hub id (LLaMA family)")
    parser.add_argument("--data", default=None, help="shared data folder (default ../shared/data beside the repository)")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--transfer-steps", type=int, default=20, help="attention-transfer steps per layer")
    parser.add_argument("--context", type=int, default=512)
    args = parser.parse_args(list(argv))
    start = time.perf_counter()
    data = Path(args.data) if args.data else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    test_file, calib_file = data / "wikitext-2-raw" / "wiki.test.raw", data / "wikitext-2" / "valid.txt"
    print(f"Loading {args.model} ...", file=sys.stderr, flush=True)
    model, tokenizer = load(args.model)
    model.eval()
    if test_file.is_file() and calib_file.is_file():
        test_text, source = test_file.read_text()[: 12 * args.eval_tokens], f"WikiText-2 raw test (calibration: {calib_file})"
        calib_path = str(calib_file)
    else:
        text = bench.default_text()
        half = len(text) // 2
        test_text, source = text[half:], "pydoc_data.topics, second half (calibration: first half)"
        calib_path = None
    ids = torch.tensor(tokenizer(test_text).input_ids[: args.eval_tokens])
    with tempfile.TemporaryDirectory() as folder:
        if calib_path is None:
            calib_path = str(Path(folder) / "calibration.txt")
            Path(calib_path).write_text(text[:half])
        batches = text_batches(calib_path, model, tokenizer, tokens=args.calibration_tokens, block=args.context)
    prompt = ids[None, : args.context]
    rows = []

    def measure(name: str, m: Any, seconds: float) -> None:
        ppl = bench.perplexity(m.eval(), ids, args.context, args.context)["perplexity"]
        rows.append((name, ppl, _kv_cache_bytes(m, prompt), seconds))
        print(f"  {name}: perplexity {ppl:.1f} ({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)

    measure("original (GQA-3)", model, 0.0)
    t = time.perf_counter()
    measure("MQA, mean-pooled K/V (untrained)", convert(copy.deepcopy(model), "mqa", init="mean"), time.perf_counter() - t)
    t = time.perf_counter()
    aligned = convert(copy.deepcopy(model), "mqa", batches=batches)
    fit = time.perf_counter() - t
    measure("MQA, aligned heads (training-free)", aligned, fit)
    t = time.perf_counter()
    calibrate(aligned, model, batches, steps=args.transfer_steps, verbose=False)
    measure(f"MQA, aligned + attention transfer ({args.transfer_steps} steps/layer)", aligned, fit + time.perf_counter() - t)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    print(f"\nSmolLM2-135M -> MQA, perplexity on {ids.numel()} tokens of {source}, context {args.context}; "
          f"calibration {tokens} tokens; KV cache of a {prompt.shape[1]}-token prompt (float32):\n")
    print("| model | perplexity | vs original | KV cache | conversion time |\n|:--|--:|--:|--:|--:|")
    for name, ppl, kv, seconds in rows:
        print(f"| {name} | {ppl:.1f} | {ppl / rows[0][1]:.2f}x | {kv / 2**20:.3g} MB | {seconds:.0f} s |")
    print(f"\nTotal {time.perf_counter() - start:.0f}s. Distillation brings it further: "
          "python -m hf_relattn.finetune --config finetune/recipes/smollm2_mqa_recovery.yaml")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--recovery" in argv:
        return run_recovery(argv)
    return run_perf(argv) if "--perf" in argv else run_demo(argv)


if __name__ == "__main__":
    raise SystemExit(main())
