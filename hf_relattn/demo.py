"""The main job of `make demo`: SmolLM2-135M converted four ways, benchmarked side by side in one run.

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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_perf(argv) if "--perf" in argv else run_demo(argv)


if __name__ == "__main__":
    raise SystemExit(main())
