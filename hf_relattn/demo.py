"""The main job of `make demo`: SmolLM2 converted four ways, measured side by side in one run.

    python -m hf_relattn.demo [--data FILE] [--context 512] [--max-windows 6]
                              [--decode-context 1024] [--new-tokens 32]
    python -m hf_relattn.demo --perf     # plugin overhead and 4k-context decode benchmark

Rows: the original model (GQA-3, native sdpa), MQA mean-pooled (Ainslie et al. 2023), MQA from
each group's first head (the paper's ablation), ALiBi by flag. Columns: perplexity over a text
(CPython's embedded `pydoc_data.topics` unless `--data` is given, e.g. WikiText-2), K/V cache
bytes measured in the cache after a prefill of `--decode-context` tokens, and greedy decode
tokens/s with the cache, with ratios against the original. No variant is trained here: the
quality column shows what conversion alone costs before uptraining.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from . import convert
from .presets import load


def demo_text(path: str | None) -> str:
    if path is None:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key] for key in sorted(topics))
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as err:
        raise SystemExit(f"hf_relattn.demo: cannot read --data {path!r}: {err.strerror}") from None


@torch.inference_mode()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, context: int, max_windows: int) -> float:
    """exp(mean token NLL) over consecutive non-overlapping windows of `context` tokens."""
    total_nll, total_tokens = 0.0, 0
    for start in range(0, min(ids.numel() - 1, context * max_windows), context):
        window = ids[start : start + context + 1][None]
        if window.shape[1] < 2:
            break
        logits = model(window[:, :-1]).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum")
        total_nll += nll.item()
        total_tokens += window.shape[1] - 1
    return math.exp(total_nll / total_tokens)


def cache_bytes(cache: Any) -> int:
    """Bytes held by the keys and values of a transformers Cache."""
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


@torch.inference_mode()
def decode_run(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, int]:
    """Prefill `ids`, then greedy-decode `new_tokens` one by one with the cache.

    Returns (decode tokens/s, cache bytes after prefill)."""
    out = model(ids[None], use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    kv_bytes = cache_bytes(cache)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return new_tokens / (time.perf_counter() - start), kv_bytes


def build_variants(base: torch.nn.Module) -> dict[str, Callable[[], torch.nn.Module]]:
    def mqa(init: str) -> torch.nn.Module:
        return convert(copy.deepcopy(base), "mqa", init=init)

    def alibi() -> torch.nn.Module:
        model = copy.deepcopy(base)
        model.set_attn_implementation("relattn_alibi")
        return model

    return {
        "GQA-3 (original)": lambda: base,
        "MQA (mean)": lambda: mqa("mean"),
        "MQA (first)": lambda: mqa("first"),
        "ALiBi (flag)": alibi,
    }


def run_demo(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    print(f"Loading {args.model} ...", file=sys.stderr, flush=True)
    base, tokenizer = load(args.model)
    base.eval()
    text = demo_text(args.data)
    ids = torch.tensor(tokenizer(text[: args.max_chars]).input_ids)
    needed = args.decode_context
    decode_ids = ids[:needed] if ids.numel() >= needed else ids.repeat(needed // ids.numel() + 1)[:needed]
    source = args.data or "pydoc_data.topics (embedded in CPython)"
    rows = []
    for name, make in build_variants(base).items():
        print(f"  {name}: perplexity ...", file=sys.stderr, flush=True)
        model = make()
        ppl = perplexity(model, ids, args.context, args.max_windows)
        print(f"  {name}: decode ...", file=sys.stderr, flush=True)
        tps, kv = decode_run(model, decode_ids, args.new_tokens)
        rows.append((name, ppl, kv, tps))
    base_kv, base_tps = rows[0][2], rows[0][3]
    n_tokens = min(ids.numel() - 1, args.context * args.max_windows)
    print(f"\nSmolLM2-135M, {torch.get_num_threads()} threads, float32. Perplexity: {n_tokens} tokens of {source}, "
          f"windows of {args.context}. Decode: {args.new_tokens} greedy tokens after a {args.decode_context}-token prefill.")
    header = f"| {'variant':<18} | {'perplexity':>10} | {'KV cache':>10} | {'x orig':>6} | {'decode tok/s':>12} | {'x orig':>6} |"
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for name, ppl, kv, tps in rows:
        print(f"| {name:<18} | {ppl:>10.2f} | {kv / 2**20:>7.1f} MB | {kv / base_kv:>6.2f} | {tps:>12.1f} | {tps / base_tps:>6.2f} |")
    print(f"\nTotal {time.perf_counter() - t0:.0f}s. The converted rows are untrained: uptraining (finetune) recovers quality.")


def _median_time(fn: Callable[[], Any], reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


@torch.inference_mode()
def run_perf(args: argparse.Namespace) -> None:
    """Plugin overhead (identity GQA, G == H, through the engine vs native sdpa) and
    decode tokens/s at a long context for MQA vs the original GQA-3."""
    base, _ = load(args.model)
    base.eval()
    heads = base.config.num_attention_heads
    torch.manual_seed(0)
    ids = torch.randint(10, base.config.vocab_size, (1, args.prefill_context))

    native = convert(copy.deepcopy(base), "gqa", num_key_value_heads=heads)  # G == H: MHA, native sdpa
    plugin = copy.deepcopy(native)
    plugin.set_attn_implementation("relattn")
    assert torch.allclose(native(ids[:, :64]).logits, plugin(ids[:, :64]).logits, atol=1e-5)
    native(ids), plugin(ids)  # warm-up
    t_native, t_plugin = [], []
    for _ in range(args.reps):  # interleaved so drift hits both equally
        t_native += _median_time(lambda: native(ids), 1)
        t_plugin += _median_time(lambda: plugin(ids), 1)
    mn, mp = statistics.median(t_native), statistics.median(t_plugin)
    print(f"Prefill {args.prefill_context} tokens, identity GQA (G=H={heads}), median of {args.reps}: "
          f"native sdpa {mn * 1000:.0f} ms, plugin engine {mp * 1000:.0f} ms, ratio {mp / mn:.3f} "
          f"(overhead {100 * (mp / mn - 1):+.1f}%)")

    mqa = convert(copy.deepcopy(base), "mqa")
    ctx_ids = ids[0, : args.long_context] if ids.numel() >= args.long_context else torch.randint(
        10, base.config.vocab_size, (args.long_context,))
    results = {}
    for name, model in (("GQA-3 (original)", base), ("MQA", mqa)):
        tps, kv = decode_run(model, ctx_ids, args.new_tokens)
        results[name] = (tps, kv)
        print(f"Decode at {args.long_context} context, {name}: {tps:.2f} tok/s, KV cache {kv / 2**20:.1f} MB", flush=True)
    ratio = results["MQA"][0] / results["GQA-3 (original)"][0]
    print(f"MQA / GQA-3 decode tokens/s ratio at {args.long_context} context: {ratio:.2f}x "
          f"(KV cache {results['GQA-3 (original)'][1] / results['MQA'][1]:.1f}x smaller)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hf_relattn.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="preset, folder or Hub id (LLaMA family)")
    parser.add_argument("--data", default=None, help="text file for perplexity (default: pydoc_data.topics)")
    parser.add_argument("--max-chars", type=int, default=400_000, help="characters of the text to tokenize")
    parser.add_argument("--context", type=int, default=512, help="perplexity window length")
    parser.add_argument("--max-windows", type=int, default=6, help="perplexity windows per variant")
    parser.add_argument("--decode-context", type=int, default=1024, help="prefill length before decoding")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens decoded with the cache")
    parser.add_argument("--perf", action="store_true", help="run the overhead / long-context decode benchmark instead")
    parser.add_argument("--prefill-context", type=int, default=1024, help="--perf: prefill length")
    parser.add_argument("--long-context", type=int, default=4096, help="--perf: decode context")
    parser.add_argument("--reps", type=int, default=7, help="--perf: repetitions")
    args = parser.parse_args(argv)
    (run_perf if args.perf else run_demo)(args)


if __name__ == "__main__":
    main()
