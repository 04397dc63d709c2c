"""`hf-relattn bench kernels`: attention-op microbenchmarks on random q/k/v, no model.

    hf-relattn bench kernels [--lengths 256,512,1024] [--heads 9] [--head-dim 64] [--kv-heads 3,1]
                             [--reps 5] [--warmup 1] [--batch 1] [--matmul-size 2048] [--out DIR]

Cases, each at every sequence length, forward only and forward + backward:
- `sdpa`: `torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)` with all
  heads: the reference every ratio is taken against;
- `engine`: the plugin's entry point (`hf_relattn.engine.relattn_attention`) with no variant,
  which must dispatch to transformers' sdpa function: its dispatch overhead;
- `engine gqa G=g`: the same with g < H K/V heads (what a GQA/MQA-converted model runs);
- `engine <variant> (dense|reference)` for every registered variant that acts inside attention
  (parameter-free, axis other than "structure"; today ALiBi): the engine's chunked SDPA-with-bias path and its
  materialised reference formula, forced with `hf_relattn.force_implementation`.
The engine is called exactly as transformers calls it, with a small stand-in for the attention
module carrying what the engine reads (`config._attn_implementation`, `is_causal`, `scaling`,
`num_key_value_groups`, `layer_idx`, and the variants attached by
`hf_relattn.variants.base.attach`). Before timing, each engine case is checked against an
independent computation (SDPA with repeated K/V heads, or the variant's reference path).

Reported per case: median time (and min/max) over `--reps`, peak memory of a warm-up run (see
`hf_relattn.measure.PeakMemory`), forward GFLOP/s counting the causal half of the two attention
matmuls (2·B·H·D·L(L+1) FLOPs), and time relative to `sdpa`. Forward + backward GFLOP/s count
3.5x the forward FLOPs (backward = 2.5x forward, the FlashAttention convention). The machine's
fp32 `torch.matmul` rate on `--matmul-size` square matrices is measured first: the ceiling.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .measure import PeakMemory, environment, markdown_table, print_table, summarize, sync
from .engine import ENGINE_NAME, force_implementation, relattn_attention
from .presets import DTYPES
from .variants.base import VARIANTS, Variant, attach

BACKWARD_FACTOR = 3.5  # fwd + bwd FLOPs / fwd FLOPs (backward = 2.5x forward)


def attention_stub(num_heads: int, num_kv_heads: int, head_dim: int, variants: Sequence[Variant] = (), causal: bool = True) -> nn.Module:
    """A stand-in for an attention module: the attributes the engine (and transformers' sdpa
    function it dispatches to) read, with `variants` attached as `convert` would (a LLaMA-like
    1-D sequence model for variants that ask the family adapter)."""
    module = nn.Module()
    module.config = SimpleNamespace(_attn_implementation=ENGINE_NAME, relattn=None, model_type="llama")
    module.is_causal = causal
    module.scaling = head_dim**-0.5
    module.num_key_value_groups = num_heads // num_kv_heads
    module.layer_idx = 0
    for variant in variants:
        attach(module, variant)
    return module.eval()


@dataclass
class Case:
    """One benchmarked attention op: `run(q, k, v)` -> output."""

    name: str
    kv_heads: int
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    check: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # independent expected output
    baseline: str = "sdpa"  # the case its time and memory ratios are taken against
    causal: bool = True
    # bytes the case is known to need at a length (fwd or fwd+bwd), checked against --max-memory-gb
    needs: Callable[[int, bool], int] | None = None
    # forward FLOPs per batch entry and head, when not the causal or full QK^T and PV
    work: float | None = None


def _engine(module: nn.Module, implementation: str = "auto", inputs: Callable[[torch.Tensor], dict] | None = None) -> Callable[..., torch.Tensor]:
    """The engine on `module`; `inputs(q)`: the call's extra keyword arguments (a router's layer input)."""
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with force_implementation(implementation):
            out, _ = relattn_attention(module, q, k, v, None, scaling=module.scaling, **(inputs(q) if inputs else {}))
        return out  # (B, L, H, D), as transformers expects

    return run


def _sdpa_repeat(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA with the K/V heads repeated to H (what GQA means), as (B, L, H, D)."""
    groups = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), is_causal=True)
    return out.transpose(1, 2)


def in_attention_variants() -> list[tuple[str, Variant]]:
    """Registered parameter-free variants acting inside attention that build with defaults.

    Variants with learned tables (e.g. t5_bias) need a converted model to hold them; their
    attention op is the same engine path as a parameter-free variant of the same axis."""
    found = []
    for name, cls in sorted(VARIANTS.items()):
        if cls.axis != "scores" or not cls.flag:  # sparse variants: --suite sparse
            continue
        try:
            found.append((name, cls.from_options({})))
        except (TypeError, ValueError):
            continue  # needs options to exist at all; nothing generic to benchmark
    return found


def build_cases(heads: int, head_dim: int, kv_heads: Sequence[int]) -> list[Case]:
    """The reference SDPA case, the engine without variant, GQA cases, in-attention variants."""
    cases = [
        Case("sdpa", heads, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        Case("engine", heads, _engine(attention_stub(heads, heads, head_dim)), _sdpa_repeat),
    ]
    for g in kv_heads:
        cases.append(Case(f"engine gqa G={g}", g, _engine(attention_stub(heads, g, head_dim)), _sdpa_repeat))
    for name, variant in in_attention_variants():
        module = attention_stub(heads, heads, head_dim, [variant])
        reference = _engine(module, "reference")
        cases.append(Case(f"engine {name} (dense)", heads, _engine(module, "dense"), reference))
        cases.append(Case(f"engine {name} (reference)", heads, reference))
    return cases


def naive_relative_bytes(length: int, head_dim: int, backward: bool) -> int:
    """Lower bound of the naive path's memory: the gathered a^K and a^V tables, T x T x d floats
    each (and as much again for their gradients in the backward pass)."""
    return 2 * length * length * head_dim * 4 * (2 if backward else 1)


def suite_variants(suite: str, length: int) -> list[Variant]:
    """The configurations every registered variant asks the suite to measure (`Variant.bench_variants`)."""
    return [variant for _, cls in sorted(VARIANTS.items()) for variant in cls.bench_variants(suite, length)]


def variant_stub(heads: int, head_dim: int, variant: Variant, length: int, causal: bool = True, seed: int = 0) -> tuple[nn.Module, Any]:
    """A stub with `variant` attached and given random values of what it reads; and the call's extra inputs."""
    module = attention_stub(heads, heads, head_dim, [variant], causal)
    module.config.num_hidden_layers = 1
    module.num_heads, module.head_dim, module.bench_length = heads, head_dim, length
    return module, variant.bench_setup(module, torch.Generator().manual_seed(seed))


def build_relative_cases(heads: int, head_dim: int) -> list[Case]:
    """The "relative" variants (Shaw: keys + values, k=16) in the engine and materialised as
    transformers v4 BERT's relative_key did, against plain SDPA without relative terms
    (transformers' sdpa attention function, output in the model's layout like the others),
    causal and bidirectional."""
    cases = []
    for causal in (True, False):
        mode = "causal" if causal else "bidir"
        # what a model without relative terms runs: transformers' sdpa function (SDPA, then
        # the (B, L, H, D) layout transformers expects), reached through the engine
        cases.append(Case(f"sdpa {mode}", heads, _engine(attention_stub(heads, heads, head_dim, causal=causal)),
                          baseline=f"sdpa {mode}", causal=causal))
        for variant in suite_variants("relative", 0):
            module, inputs = variant_stub(heads, head_dim, variant, 0, causal)
            naive = _engine(module, "reference", inputs)
            cases += [
                Case(f"{variant.name} {mode}", heads, _engine(module, inputs=inputs), naive, baseline=f"sdpa {mode}", causal=causal),
                Case(f"{variant.name} naive {mode}", heads, naive, baseline=f"sdpa {mode}", causal=causal,
                     needs=lambda length, backward: naive_relative_bytes(length, head_dim, backward)),
            ]
    return cases


def build_sparse_cases(heads: int, head_dim: int, length: int, q: torch.Tensor, k: torch.Tensor) -> list[Case]:
    """Dense causal SDPA (transformers' sdpa function) against the "sparse" variants at one
    length (each pattern's `bench_variants`: sliding window T/8, MoBA block 512 top-3 with the
    per-token and per-block gate, strided, fixed and PowerAttention with about the same reach,
    each without and with 4 attention sinks, MoSA). `work` counts the computed pairs; the check
    is the variant's reference path where that is another computation."""
    cases = [Case("sdpa causal", heads, _engine(attention_stub(heads, heads, head_dim)), baseline="sdpa causal",
                  work=2.0 * head_dim * length * (length + 1))]
    for variant in suite_variants("sparse", length):
        module, inputs = variant_stub(heads, head_dim, variant, length)
        pairs = variant.computed_pairs(module, q, k)
        check = _engine(module, "reference", inputs) if variant.reference_differs else None
        cases.append(Case(variant.bench_label(module), heads, _engine(module, inputs=inputs), check, baseline="sdpa causal",
                          work=4.0 * head_dim * pairs))
    return cases


def build_moh_cases(heads: int, head_dim: int, length: int) -> list[Case]:
    """Dense SDPA against the "moh" variants (MoH with 75% and 50% of the heads active per token,
    query_norm router on the benchmark's random queries), causal and bidirectional. Forward =
    inference: only the (token, head) pairs the router selects are computed. The check is the
    masked dense computation; `work` counts the selected pairs."""
    cases = []
    q = torch.zeros(1, heads, length, head_dim)
    for causal in (True, False):
        baseline = "sdpa causal" if causal else "sdpa bidirectional"
        cases.append(Case(baseline, heads, _engine(attention_stub(heads, heads, head_dim, causal=causal)), baseline=baseline, causal=causal))
        for variant in suite_variants("moh", length):
            module, inputs = variant_stub(heads, head_dim, variant, length, causal)
            pairs = variant.computed_pairs(module, q, q)
            cases.append(Case(f"{variant.bench_label(module)}{'' if causal else ', bidir'}", heads, _engine(module, inputs=inputs),
                              _engine(module, "dense", inputs), baseline=baseline, causal=causal, work=4.0 * head_dim * pairs))
    return cases


SUITES = ("attention", "relative", "sparse", "moh")


def matmul_gflops(size: int = 2048, reps: int = 3, device: torch.device | str = "cpu") -> dict[str, Any]:
    """fp32 GFLOP/s of `torch.matmul` on two size x size matrices (median of `reps`)."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device)
    b = torch.randn(size, size, generator=generator).to(device)
    torch.matmul(a, b)  # warm-up
    times = []
    for _ in range(max(1, reps)):
        sync(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"size": size, "seconds": summarize(times), "gflops": 2 * size**3 / seconds / 1e9}


def _qkv(batch: int, heads: int, kv_heads: int, length: int, head_dim: int, dtype: torch.dtype, device: torch.device, grad: bool, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed + length)
    q = torch.randn(batch, heads, length, head_dim, generator=generator, dtype=torch.float32)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=generator, dtype=torch.float32)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=generator, dtype=torch.float32)
    return tuple(t.to(device=device, dtype=dtype).requires_grad_(grad) for t in (q, k, v))


def _one(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    if backward:
        out = case.run(q, k, v)
        out.backward(torch.ones_like(out))
    else:
        with torch.inference_mode():
            case.run(q, k, v)
    sync(device)
    seconds = time.perf_counter() - start
    if backward:
        for t in (q, k, v):
            t.grad = None
    return seconds


def run_kernels(
    lengths: Sequence[int] = (256, 512, 1024),
    heads: int = 9,
    head_dim: int = 64,
    kv_heads: Sequence[int] | None = None,
    reps: int = 5,
    warmup: int = 1,
    batch: int = 1,
    dtype: str = "float32",
    matmul_size: int = 2048,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
    suite: str = "attention",
    max_memory_gb: float = 8.0,
) -> dict[str, Any]:
    """Run every case at every length (forward and forward+backward); returns the results.

    suite "attention": SDPA, the engine, GQA and parameter-free variants (causal); "relative":
    `build_relative_cases`. A case whose known need exceeds `max_memory_gb` is reported, not run."""
    if suite not in SUITES:
        raise ValueError(f"Unknown --suite {suite!r}; valid: {', '.join(SUITES)}")
    if dtype not in DTYPES:
        raise ValueError(f"Unknown --dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    if heads <= 0 or head_dim <= 0 or batch <= 0 or reps <= 0 or matmul_size <= 0 or not lengths or min(lengths) <= 0:
        raise ValueError("--heads, --head-dim, --batch, --reps, --matmul-size and every --lengths value must be positive")
    if warmup < 1:
        raise ValueError("--warmup must be at least 1: peak memory is sampled in the warm-up run")
    if kv_heads is None:
        kv_heads = sorted({g for g in (heads // 3 if heads % 3 == 0 else 0, 1) if 0 < g < heads}, reverse=True)
    bad = [g for g in kv_heads if g <= 0 or heads % g]
    if bad:
        raise ValueError(f"--kv-heads {bad} must divide --heads {heads}; valid: {[g for g in range(1, heads + 1) if heads % g == 0]}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = DTYPES[dtype]
    if suite == "attention":
        cases = build_cases(heads, head_dim, kv_heads)
    elif suite == "relative":
        cases = build_relative_cases(heads, head_dim)
    budget = int(max_memory_gb * 2**30)
    ceiling = matmul_gflops(matmul_size, reps=3, device=dev)

    from tqdm.auto import tqdm

    bar = tqdm(total=0, desc="kernels", unit="run", file=sys.stderr, disable=not progress)
    rows: list[dict[str, Any]] = []
    for length in lengths:
        if suite == "sparse":  # patterns scale with the length
            q, k, _ = _qkv(batch, heads, heads, length, head_dim, torch.float32, torch.device("cpu"), False, seed)
            cases = build_sparse_cases(heads, head_dim, length, q, k)
        elif suite == "moh":
            cases = build_moh_cases(heads, head_dim, length)
        bar.total += len(cases) * 2 * (warmup + reps)
        # correctness first: each engine case against an independent computation
        checks = {}
        with torch.no_grad():
            for case in cases:
                if case.check is not None:
                    q, k, v = _qkv(batch, heads, case.kv_heads, min(length, 256), head_dim, torch.float32, dev, False, seed)
                    checks[case.name] = (case.run(q, k, v).float() - case.check(q, k, v).float()).abs().max().item()
        for backward in (False, True):
            needs = {c.name: c.needs(length, backward) * batch for c in cases if c.needs is not None}
            running = [c for c in cases if needs.get(c.name, 0) <= budget]
            inputs = {case.name: _qkv(batch, heads, case.kv_heads, length, head_dim, torch_dtype, dev, backward, seed) for case in running}
            times: dict[str, list[float]] = {c.name: [] for c in running}
            memory: dict[str, int | None] = {}
            for rep in range(warmup + reps):
                shift = rep % len(running)  # rotate the order so drift hits every case alike
                for case in running[shift:] + running[:shift]:
                    bar.set_postfix_str(f"L={length} {case.name}{' fwd+bwd' if backward else ''}", refresh=False)
                    if rep < warmup:
                        with PeakMemory(dev) as pm:
                            _one(case, *inputs[case.name], backward, dev)
                        memory[case.name] = pm.peak_bytes
                    else:
                        times[case.name].append(_one(case, *inputs[case.name], backward, dev))
                    bar.update()
            for case in cases:
                row = {"case": case.name, "length": length, "pass": "fwd+bwd" if backward else "fwd", "kv_heads": case.kv_heads,
                       "baseline": case.baseline, "max_abs_diff_vs_check": checks.get(case.name)}
                if case not in running:
                    rows.append({**row, "skipped": f"needs >= {needs[case.name] / 2**30:.1f} GB > --max-memory-gb {max_memory_gb:g}",
                                 "needs_bytes": needs[case.name]})
                    continue
                # QK^T and PV: the causal half, all pairs, or the pairs a sparse case computes
                flops = batch * heads * (case.work or 2.0 * head_dim * length * ((length + 1) if case.causal else 2 * length))
                stats = summarize(times[case.name])
                work = flops * (BACKWARD_FACTOR if backward else 1.0)
                base_memory = memory.get(case.baseline)
                rows.append({
                    **row, "seconds": stats, "gflops": work / stats["median"] / 1e9,
                    "fraction_of_matmul": work / stats["median"] / 1e9 / ceiling["gflops"],
                    "vs_sdpa": stats["median"] / statistics.median(times[case.baseline]), "peak_memory_bytes": memory.get(case.name),
                    "memory_vs_baseline": memory[case.name] / base_memory if memory.get(case.name) and base_memory else None,
                })
    bar.close()
    return {
        "tool": "hf_relattn.kernels",
        "settings": {"suite": suite, "lengths": list(lengths), "heads": heads, "head_dim": head_dim, "kv_heads": list(kv_heads),
                     "reps": reps, "warmup": warmup, "batch": batch, "dtype": dtype, "matmul_size": matmul_size, "seed": seed,
                     "max_memory_gb": max_memory_gb},
        "environment": environment(dev),
        "matmul": ceiling,
        "results": rows,
    }


def table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the kernel table."""
    headers = ["case", "L", "pass", "ms (median)", "[min-max]", "x baseline", "GFLOP/s", "% matmul", "peak mem", "mem x baseline", "check |diff|"]
    rows = []
    for r in results["results"]:
        check = "-" if r["max_abs_diff_vs_check"] is None else f"{r['max_abs_diff_vs_check']:.1e}"
        if "skipped" in r:
            rows.append([r["case"], str(r["length"]), r["pass"], "not run", "", "", "", "", r["skipped"], "", check])
            continue
        s = r["seconds"]
        mem = r["peak_memory_bytes"]
        ratio = r.get("memory_vs_baseline")
        rows.append([
            r["case"], str(r["length"]), r["pass"], f"{s['median'] * 1e3:.2f}", f"[{s['min'] * 1e3:.2f}-{s['max'] * 1e3:.2f}]",
            f"{r['vs_sdpa']:.2f}", f"{r['gflops']:.1f}", f"{100 * r['fraction_of_matmul']:.0f}%",
            "-" if mem is None else f"{mem / 2**20:.1f} MB", "-" if ratio is None or r["case"] == r["baseline"] else f"{ratio:.2f}", check,
        ])
    return headers, rows


def report(results: dict[str, Any], out: str | None = None) -> None:
    """Print the matmul ceiling and the table; with `out`, write kernels.json and kernels.md."""
    m, env, s = results["matmul"], results["environment"], results["settings"]
    ceiling = (f"fp32 matmul ceiling: {m['gflops']:.1f} GFLOP/s ({m['size']}x{m['size']}, {m['seconds']['median'] * 1e3:.1f} ms) "
               f"on {env['cpu_model']} ({env['torch_threads']} threads, {env['device']})")
    print(ceiling)
    mode = "causal and bidirectional (bidir)" if s.get("suite") == "relative" else "causal"
    title = (f"Attention ops ({s.get('suite', 'attention')}): B={s['batch']}, H={s['heads']}, D={s['head_dim']}, {s['dtype']}, {mode}; "
             f"median of {s['reps']} after {s['warmup']} warm-up; ratios against each case's baseline")
    headers, rows = table(results)
    print_table(title, headers, rows)
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "kernels.json").write_text(json.dumps(results, indent=2) + "\n")
        (folder / "kernels.md").write_text(f"# hf_relattn kernels\n\n{ceiling}\n\n{title}\n\n{markdown_table(headers, rows)}\n")
        print(f"\nResults: {folder / 'kernels.json'}  {folder / 'kernels.md'}")


def _ints(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `hf-relattn bench kernels` (dest prefixed `k_` so they never clash with bench's)."""
    a = parser.add_argument
    a("--lengths", dest="k_lengths", metavar="N,N,...", type=_ints, default=[256, 512, 1024], help="sequence lengths (default 256,512,1024)")
    a("--heads", dest="k_heads", metavar="H", type=int, default=9, help="query heads (default 9, as SmolLM2)")
    a("--head-dim", dest="k_head_dim", metavar="D", type=int, default=64, help="head dimension (default 64)")
    a("--kv-heads", dest="k_kv_heads", metavar="G,G,...", type=_ints, default=None, help="K/V head counts for the GQA cases (default H/3 and 1)")
    a("--batch", dest="k_batch", metavar="B", type=int, default=1, help="batch size (default 1)")
    a("--reps", dest="k_reps", metavar="N", type=int, default=5, help="timed repetitions (default 5)")
    a("--warmup", dest="k_warmup", metavar="N", type=int, default=1, help="warm-up runs; peak memory is sampled there (default 1)")
    a("--dtype", dest="k_dtype", metavar="DTYPE", default="float32", help="float32, bfloat16 or float16 (default float32)")
    a("--matmul-size", dest="k_matmul_size", metavar="N", type=int, default=2048, help="matrix size of the matmul ceiling (default 2048)")
    a("--device", dest="k_device", metavar="DEVICE", default=None, help="cpu or cuda (default: cuda when available)")
    a("--suite", dest="k_suite", metavar="NAME", default="attention",
      help="attention (SDPA, engine, GQA, parameter-free variants), relative (Shaw vs SDPA vs the naive T x T x d path), "
           "sparse (block-sparse variants vs dense causal SDPA) or moh (MoH inference, 75%% and 50%% of heads, vs dense SDPA)")
    a("--max-memory-gb", dest="k_max_memory_gb", metavar="GB", type=float, default=8.0,
      help="do not run a case known to need more than this (default 8; the naive relative path)")
    a("--out", dest="k_out", metavar="DIR", default=None, help="also write kernels.json and kernels.md into this folder")


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run and report `hf-relattn bench kernels` from parsed arguments."""
    results = run_kernels(
        lengths=args.k_lengths, heads=args.k_heads, head_dim=args.k_head_dim, kv_heads=args.k_kv_heads, reps=args.k_reps,
        warmup=args.k_warmup, batch=args.k_batch, dtype=args.k_dtype, matmul_size=args.k_matmul_size, device=args.k_device,
        suite=args.k_suite, max_memory_gb=args.k_max_memory_gb,
    )
    report(results, args.k_out)
    return results
