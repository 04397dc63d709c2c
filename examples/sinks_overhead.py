"""What attention sinks cost at prefill: each sparse pattern without and with 4 sinks on random
q/k/v (B=1, H=9, D=64, float32, causal), timed in interleaved pairs so that the machine's drift
hits both alike.

    python examples/sinks_overhead.py [patterns] [length] [repetitions]
    python examples/sinks_overhead.py window,strided,fixed,power,moba,mobablock 8192 15

prints, per pattern, the median times (ms) and time(4 sinks) / time(no sinks) over the medians
and over the minima.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from hf_relattn.engine import relattn_attention
from hf_relattn.kernels import attention_stub
from hf_relattn.variants.fixed import Fixed
from hf_relattn.variants.moba import MoBA
from hf_relattn.variants.power import Power
from hf_relattn.variants.sliding_window import SlidingWindow
from hf_relattn.variants.strided import Strided

PATTERNS = {
    "window": lambda length, sinks: SlidingWindow(window=length // 8, block_size=64, sinks=sinks),
    "strided": lambda length, sinks: Strided(stride=256, block_size=64, sinks=sinks),
    "fixed": lambda length, sinks: Fixed(block=length // 8, summary=64, sinks=sinks),
    "power": lambda length, sinks: Power(block_size=64, window=length // 16, sinks=sinks),
    "moba": lambda length, sinks: MoBA(block_size=512, top_k=3, sinks=sinks),
    "mobablock": lambda length, sinks: MoBA(block_size=512, top_k=3, gate="block", sinks=sinks),
}


def main(patterns: list[str], length: int, reps: int) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 9, length, 64) for _ in range(3))
    for name in patterns:
        modules = {sinks: attention_stub(9, 9, 64, [PATTERNS[name](length, sinks)]) for sinks in (0, 4)}
        times: dict[int, list[float]] = {0: [], 4: []}
        with torch.no_grad():
            for module in modules.values():  # warm-up
                relattn_attention(module, q, k, v, None, scaling=module.scaling)
            for rep in range(reps):
                for sinks in (0, 4) if rep % 2 else (4, 0):
                    start = time.perf_counter()
                    relattn_attention(modules[sinks], q, k, v, None, scaling=modules[sinks].scaling)
                    times[sinks].append(time.perf_counter() - start)
        plain, sunk = statistics.median(times[0]), statistics.median(times[4])
        print(f"{name}: {plain * 1e3:.1f} ms -> {sunk * 1e3:.1f} ms with 4 sinks; median ratio {sunk / plain:.3f}, "
              f"min ratio {min(times[4]) / min(times[0]):.3f}", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0].split(",") if args else list(PATTERNS), int(args[1]) if len(args) > 1 else 8192,
         int(args[2]) if len(args) > 2 else 15)
