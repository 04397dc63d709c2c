"""Batched decoding of a left-padded batch (what `generate` runs for several prompts): time per
greedy step of a 4-layer SmolLM2-shaped LLaMA (random weights) with each sparse pattern against
the same model with dense attention, the models alternating (drift hits them alike).

    python examples/padded_decode.py [--length 4096] [--pad 1000] [--steps 8] [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_relattn

PATTERNS = {
    "moba 512/3, gate=token": ("moba", {"block_size": 512, "top_k": 3, "gate": "token"}),
    "moba 512/3, gate=block": ("moba", {"block_size": 512, "top_k": 3, "gate": "block"}),
    "sliding_window 512": ("sliding_window", {"window": 512}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096, help="prompt slots (the longer sample)")
    parser.add_argument("--pad", type=int, default=1000, help="left padding of the second sample")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
                         num_key_value_heads=3, max_position_embeddings=args.length + args.steps, tie_word_embeddings=True)
    dense = LlamaForCausalLM(config).eval()
    ids = torch.randint(100, 40000, (2, args.length))
    mask = torch.ones_like(ids)
    mask[1, : args.pad] = 0
    models = {"dense": dense} | {label: hf_relattn.convert(copy.deepcopy(dense), name, **options)
                                 for label, (name, options) in PATTERNS.items()}
    with torch.no_grad():
        prefilled = {label: model(ids, attention_mask=mask, use_cache=True) for label, model in models.items()}

    def step_time(label: str) -> float:
        """Seconds per greedy step from the prefilled cache (rolled back afterwards)."""
        cache, token = prefilled[label].past_key_values, prefilled[label].logits[:, -1:].argmax(-1)
        seen = mask
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(args.steps):
                seen = torch.cat([seen, torch.ones(2, 1, dtype=seen.dtype)], 1)
                out = models[label](token, attention_mask=seen, past_key_values=cache, use_cache=True,
                                    position_ids=seen.cumsum(-1)[:, -1:] - 1)
                token = out.logits[:, -1:].argmax(-1)
        cache.crop(-args.steps)
        return (time.perf_counter() - start) / args.steps

    times: dict[str, list[float]] = {label: [] for label in models}
    for round_ in range(args.rounds + 1):
        for label in models:
            took = step_time(label)
            if round_:  # the first round warms up
                times[label].append(took)
    base = statistics.median(times["dense"])
    print(f"{torch.__version__}, {torch.get_num_threads()} threads; 2 samples of {args.length} and "
          f"{args.length - args.pad} tokens, left-padded; median of {args.rounds} rounds of {args.steps} steps")
    print("| model | ms per step | decoding speed x dense |\n| --- | ---: | ---: |")
    for label, kept in times.items():
        print(f"| {label} | {statistics.median(kept) * 1e3:.1f} | {base / statistics.median(kept):.2f}x |")


if __name__ == "__main__":
    main()
