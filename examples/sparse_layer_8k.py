"""A 1-layer SmolLM2-shaped LLaMA backbone (hidden 576, 9 query / 3 K/V heads, MLP 1536; random
weights; no LM head, whose 49k-word softmax would dwarf one layer) at 8k tokens: forward and
forward+backward time of each sparse pattern against the same model with dense attention, side
by side in one run, each pattern alternating with the dense model (embeddings, projections,
norms and MLP included), and the peak memory of a forward+backward against the dense model's.
`--padded`: a right-padded batch of two samples (T and 3T/4 tokens) with its attention mask,
which the sparse patterns run sample by sample on their flash kernels.

    python examples/sparse_layer_8k.py [--length 8192] [--reps 3] [--padded]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import LlamaConfig, LlamaModel

import hf_relattn
from hf_relattn.measure import PeakMemory

PATTERNS = {  # the `hf-relattn bench kernels --suite sparse` cases at 8k
    "sliding_window T/8": ("sliding_window", lambda t: {"window": t // 8, "block_size": 64, "sinks": 0}),
    "strided 256": ("strided", lambda t: {"stride": 256, "sinks": 0}),
    "fixed T/8, 64": ("fixed", lambda t: {"block": t // 8, "summary": 64, "sinks": 0}),
    "power (64, T/16)": ("power", lambda t: {"block_size": 64, "window": t // 16, "sinks": 0}),
    "moba 512/3, gate=block": ("moba", lambda t: {"block_size": 512, "top_k": 3, "gate": "block", "sinks": 0}),
    "moba 512/3, gate=token": ("moba", lambda t: {"block_size": 512, "top_k": 3, "gate": "token", "sinks": 0}),
}


def side_by_side(runs: list, reps: int) -> list[float]:
    """Fastest of `reps` timings of each run, the runs alternating (drift hits them alike)."""
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(reps):
        for run, kept in zip(runs, times):
            start = time.perf_counter()
            run()
            kept.append(time.perf_counter() - start)
    return [min(kept) for kept in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--padded", action="store_true", help="a right-padded batch: T and 3T/4 tokens")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9,
                         num_key_value_heads=3, max_position_embeddings=args.length, tie_word_embeddings=True)
    dense = LlamaModel(config).eval()
    inputs = {"input_ids": torch.randint(0, config.vocab_size, (1, args.length)), "use_cache": False}
    if args.padded:
        inputs["input_ids"] = inputs["input_ids"].repeat(2, 1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["attention_mask"][1, args.length * 3 // 4 :] = 0

    def forward(model):
        def run():
            with torch.no_grad():
                model(**inputs)
        return run

    def train_step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(**inputs).last_hidden_state.square().mean().backward()
        return run

    def peak(run) -> int:
        with PeakMemory() as memory:
            run()
        return memory.peak_bytes or 0

    shape = "2 samples, T and 3T/4 tokens, right-padded" if args.padded else "1 sample"
    print(f"{torch.__version__}, {torch.get_num_threads()} threads; T={args.length}, {shape}; each pattern timed "
          "alternately with the dense model")
    print("| pattern | forward (dense) | forward+backward (dense) | fwd+bwd peak memory x dense |\n| --- | ---: | ---: | ---: |")
    dense_peak = peak(train_step(dense))
    for label, (name, options) in PATTERNS.items():
        model = hf_relattn.convert(copy.deepcopy(dense), name, **options(args.length))
        base_f, f = side_by_side([forward(dense), forward(model)], args.reps)
        base_b, b = side_by_side([train_step(dense), train_step(model)], args.reps)
        print(f"| {label} | {base_f / f:.2f}x ({f * 1e3:.0f} ms; {base_f * 1e3:.0f} ms) | "
              f"{base_b / b:.2f}x ({b * 1e3:.0f} ms; {base_b * 1e3:.0f} ms) | "
              f"{peak(train_step(model)) / dense_peak:.2f} |", flush=True)


if __name__ == "__main__":
    main()
