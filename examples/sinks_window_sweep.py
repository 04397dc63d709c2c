"""Perplexity against the sliding window, with and without attention sinks, from a bench run.

    hf-relattn bench --model smollm2-135m --data ../shared/data/wikitext-2-raw/wiki.test.raw \
        --context 2048 --stride 2048 --max-tokens 8192 --contexts 2048 --decode-contexts "" \
        --variants "sliding_window:window=128:sinks=0,sliding_window:window=128:sinks=4,..." \
        --out runs/bench-sinks-sweep
    python examples/sinks_window_sweep.py runs/bench-sinks-sweep

writes `window_sweep.png` and `window_sweep.md` (a table) into that folder: one line per sink
count, the unmodified model as a horizontal line, every figure measured in the same run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def sweep(results: dict) -> tuple[float, dict[int, dict[int, float]]]:
    """(baseline perplexity, {sinks: {window: perplexity}}) of the sliding-window rows."""
    baseline, lines = None, {}
    for row in results["results"]:
        name, *parts = row["label"].split(":")
        options = dict(part.split("=") for part in parts)
        if row["label"] == "baseline":
            baseline = row["quality"]["perplexity"]
        elif name == "sliding_window" and "window" in options:
            lines.setdefault(int(options.get("sinks", 4)), {})[int(options["window"])] = row["quality"]["perplexity"]
    if baseline is None:
        raise ValueError("the bench results hold no baseline row")
    return baseline, lines


def main(folder: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(folder)
    results = json.loads((out / "results.json").read_text())
    baseline, lines = sweep(results)
    windows = sorted({w for line in lines.values() for w in line})
    table = ["| window | " + " | ".join(f"{s} sinks" for s in sorted(lines)) + " |",
             "| ---: | " + " | ".join("---:" for _ in lines) + " |"]
    for w in windows:
        cells = [f"{lines[s][w]:.2f} (x{lines[s][w] / baseline:.2f})" if w in lines[s] else "-" for s in sorted(lines)]
        table.append(f"| {w} | " + " | ".join(cells) + " |")
    table.append(f"\nunmodified model: {baseline:.2f}")
    (out / "window_sweep.md").write_text("\n".join(table) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for n, sinks in enumerate(sorted(lines)):  # distinct markers: single points coincide at one window
        points = sorted(lines[sinks].items())
        ax.plot([w for w, _ in points], [p for _, p in points], marker="osx^D"[n % 5], markersize=9 - 2 * (n % 3),
                fillstyle="none" if n % 2 else "full", label=f"window + {sinks} sinks")
    ax.axhline(baseline, color="black", linestyle="--", label="unmodified (dense)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(windows, [str(w) for w in windows])
    ax.set_xlabel("sliding window (tokens)")
    ax.set_ylabel("perplexity")
    model = results.get("model", {}).get("source", "model")
    ax.set_title(f"{model}: sliding window, with and without sinks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "window_sweep.png", dpi=120)
    print("\n".join(table))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/bench-sinks-sweep")
