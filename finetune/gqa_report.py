"""The GQA/MQA uptraining result: WikiText-2 test perplexity of SmolLM2 before and after.

    python -m hf_relattn.finetune.gqa_report --uptrained runs/smollm2-mqa-uptrain \\
        [--data ../shared/data/wikitext-2-raw/wiki.test.raw] [--context 512] [--stride 256] [--tokens 8192]

Rows: the original model (GQA-3), MQA right after conversion with each of Ainslie et al.'s
initialisations (mean, first, random) and, if given, the uptrained MQA checkpoint. Perplexity
is the standard sliding-window one (`hf_relattn.measure.perplexity`, the "perplexity" Evaluate
module): windows of `--context` tokens every `--stride`, each token scored once, over the first
`--tokens` tokens of the text.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import hf_relattn
from hf_relattn.measure import perplexity
from hf_relattn.presets import load


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hf_relattn.finetune.gqa_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--uptrained", default=None, help="finetune output folder of the uptrained MQA model")
    parser.add_argument("--data", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args(argv)

    base, tokenizer = load(args.model)
    base.eval()
    ids = torch.tensor(tokenizer(Path(args.data).read_text(encoding="utf-8")).input_ids)[: args.tokens + 1]
    rows = {"GQA-3 (original)": lambda: base}
    for init in ("mean", "first", "random"):
        rows[f"MQA, init={init}, no training"] = lambda init=init: hf_relattn.convert(copy.deepcopy(base), "mqa", init=init)
    if args.uptrained:
        meta = json.loads((Path(args.uptrained) / "final_metrics.json").read_text())
        label = f"MQA mean + uptraining ({meta.get('train_tokens', '?')} tokens, {meta['train_seconds'] / 60:.0f} min)"
        rows[label] = lambda: load(args.uptrained)[0].eval()
    print(f"Perplexity of {args.data}: first {ids.numel() - 1} tokens, context {args.context}, stride {args.stride}")
    print(f"| {'model':<58} | {'perplexity':>10} |")
    print(f"|{'-' * 60}|{'-' * 12}|")
    for name, make in rows.items():
        torch.manual_seed(0)  # init="random" draws from the global generator
        start = time.perf_counter()
        value = perplexity(make(), ids, args.context, args.stride)["perplexity"]
        print(f"| {name:<58} | {value:>10.2f} |  ({time.perf_counter() - start:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
