"""Issue 15's benchmark: how much quality each recovery step brings back, side by side with the
unmodified model in one run (SmolLM2-135M and all-MiniLM-L6-v2, real data, 2-core CPU).

    python examples/recovery.py mqa     [--eval-tokens 16384] [--transfer-steps 100] [--kd-tokens 200000]
    python examples/recovery.py moh     [...]
    python examples/recovery.py window  [...]   # sliding window 512 + 4 sinks at context 2048
    python examples/recovery.py minilm          # sentence-embedding cosine on SST-2 dev

Calibration and training read `wikitext-2/valid.txt` (SST-2 train for MiniLM); perplexity is
measured on the first --eval-tokens tokens of `wikitext-2-raw/wiki.test.raw` in
non-overlapping windows of the context (512, or 2048 for `window`). Results go to
runs/recovery/<target>.json and print as a markdown table; every row says its training tokens
and wall time. Stages:
- mqa: init ablation (mean / first / random / procrustes / aligned, training-free), aligned +
  attention transfer (`hf_relattn.calibrate`), + distillation (`hf_relattn.finetune --distill
  --teacher smollm2-135m` from the transferred checkpoint), and plain LM-loss uptraining of the
  mean-pooled model with the same token budget as the distillation.
- moh: 7/9 heads with the query-norm router, first-half vs importance shared heads
  (training-free), + transfer, + KD, and the dense model continued with the same LM budget.
- window: dense vs window 512 + 4 sinks (untrained, + transfer, + KD) at context 2048.
- minilm: GQA-4 (mean, aligned, aligned + transfer) and shaw: cosine of mean-pooled
  embeddings to the original's over SST-2 dev sentences (mean and 5th percentile).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import hf_relattn
from hf_relattn.transfer import text_batches
from hf_relattn.bench import perplexity
from hf_relattn.patches import get_adapter
from hf_relattn.presets import load

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TRAIN = DATA / "wikitext-2" / "valid.txt"
TEST = DATA / "wikitext-2-raw" / "wiki.test.raw"
OUT = Path("runs/recovery")


def test_ids(tokenizer, tokens: int) -> torch.Tensor:
    text = TEST.read_text()
    chars = 8 * tokens
    while len(tokenizer(text[:chars]).input_ids) <= tokens and chars < len(text):
        chars *= 2
    return torch.tensor(tokenizer(text[:chars]).input_ids[:tokens])


class Table:
    def __init__(self, target: str, args: argparse.Namespace) -> None:
        self.target, self.rows, self.args = target, [], vars(args)
        OUT.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, value: float, ratio_to: float | None, tokens: int = 0, seconds: float = 0.0, **extra) -> None:
        row = {"model": name, "value": value, "ratio": value / ratio_to if ratio_to else None, "train_tokens": tokens,
               "seconds": round(seconds, 1), **extra}
        self.rows.append(row)
        print(f"  {name}: {value:.4g}" + (f" ({row['ratio']:.2f}x)" if ratio_to else "") + f"  tokens {tokens}  {seconds:.0f}s", flush=True)
        (OUT / f"{self.target}.json").write_text(json.dumps({"args": self.args, "rows": self.rows}, indent=2))

    def markdown(self, metric: str) -> str:
        lines = [f"| model | {metric} | vs original | training tokens | wall time |", "|:--|--:|--:|--:|--:|"]
        for r in self.rows:
            ratio = f"{r['ratio']:.2f}x" if r["ratio"] else ""
            lines.append(f"| {r['model']} | {r['value']:.4g} | {ratio} | {r['train_tokens']:,} | {r['seconds'] / 60:.1f} min |")
        return "\n".join(lines)


def finetune(args_list: list[str]) -> dict:
    from accelerate.state import AcceleratorState

    from hf_relattn.finetune import run
    from hf_relattn.finetune.args import parse_args

    AcceleratorState._reset_state(reset_partial_state=True)
    return run(parse_args(args_list))


def reload(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def kd_args(model: str, output: Path, tokens: int, context: int, lr: float, extra: list[str]) -> list[str]:
    batch = max(1, 2048 // context)
    return ["--model", model, "--output", str(output), "--data", str(TRAIN), "--block-size", str(context),
            "--batch-size", str(batch), "--learning-rate", str(lr), "--warmup-steps", "10", "--train-tokens", str(tokens),
            "--logging-steps", "10", "--overwrite", *extra]


def save(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run_lm(target: str, args: argparse.Namespace) -> None:
    context = 2048 if target == "window" else 512
    table = Table(target, args)
    model, tokenizer = load("smollm2-135m")
    model.eval()
    ids = test_ids(tokenizer, args.eval_tokens)
    calib = text_batches(str(TRAIN), model, tokenizer, tokens=args.calibration_tokens, block=context, batch_size=max(1, 2048 // context))
    t = time.perf_counter()
    base = perplexity(model, ids, context, context)["perplexity"]
    table.add("original", base, base, seconds=time.perf_counter() - t)

    def ppl(m) -> float:
        return perplexity(m.eval(), ids, context, context)["perplexity"]

    previous = Path(args.kd_start) if args.kd_start else OUT / f"{target}-transfer"
    if args.kd_start:
        # distil from a model an earlier run saved (its transfer output, or a distilled model to continue)
        if not previous.is_dir():
            raise SystemExit(f"--kd-start: {previous} does not exist")
        variant, fitted, converted = target, {}, None
        table.add(f"start: {previous}", ppl(reload(previous)), base)
    elif target == "mqa":
        variant, fitted = "mqa", {}
        for init in ("mean", "first", "random", "procrustes", "aligned"):
            t = time.perf_counter()
            m = hf_relattn.convert(copy.deepcopy(model), "mqa", init=init, **({"batches": calib} if init in ("aligned", "procrustes") else {}))
            table.add(f"MQA init={init} (training-free)", ppl(m), base, seconds=time.perf_counter() - t)
        converted = m
    elif target == "moh":
        variant = "moh"
        fitted = {"router": "query_norm", "active_heads": 0.75}
        t = time.perf_counter()
        m = hf_relattn.convert(copy.deepcopy(model), "moh", shared_heads=0.5, **fitted)
        table.add("MoH 7/9 query_norm, first half shared (training-free)", ppl(m), base, seconds=time.perf_counter() - t)
        t = time.perf_counter()
        converted = hf_relattn.convert(copy.deepcopy(model), "moh", batches=calib, **fitted)
        table.add("MoH 7/9 query_norm, important half shared (training-free)", ppl(converted), base, seconds=time.perf_counter() - t)
    else:
        variant, fitted = "sliding_window", {"window": 512, "sinks": 4}
        t = time.perf_counter()
        converted = hf_relattn.convert(copy.deepcopy(model), "sliding_window", **fitted)
        table.add("window 512 + 4 sinks (training-free)", ppl(converted), base, seconds=time.perf_counter() - t)

    if args.transfer_steps and not args.kd_start:
        t = time.perf_counter()
        report = hf_relattn.calibrate(converted, model, calib, steps=args.transfer_steps, lr=args.transfer_lr)
        seconds = time.perf_counter() - t
        calib_tokens = sum(int(b["attention_mask"].sum()) for b in calib)
        table.add(f"+ attention transfer ({args.transfer_steps} steps/layer)", ppl(converted), base, calib_tokens, seconds,
                  transfer=report.to_dict())
        save(converted, tokenizer, previous)
    if args.kd_tokens and (args.transfer_steps or args.kd_start):
        t = time.perf_counter()
        metrics = finetune(kd_args(str(previous), OUT / f"{target}-kd", args.kd_tokens, context, args.kd_lr,
                                   ["--distill", "--teacher", "smollm2-135m", "--distill-alpha", str(args.kd_alpha)]))
        table.add("+ distillation (KL + LM)", ppl(reload(OUT / f"{target}-kd")), base, metrics.get("train_tokens", 0),
                  time.perf_counter() - t)
    if args.kd_tokens and args.control:
        t = time.perf_counter()
        if target == "mqa":
            name, extra = "MQA init=mean + LM-loss uptraining (same tokens)", ["--variant", "mqa", "--variant-options", "init=mean"]
        else:
            name, extra = "dense, continued with LM loss (same tokens)", []
        metrics = finetune(kd_args("smollm2-135m", OUT / f"{target}-control", args.kd_tokens, context, args.kd_lr, extra))
        table.add(name, ppl(reload(OUT / f"{target}-control")), base, metrics.get("train_tokens", 0), time.perf_counter() - t)
    print(f"\nSmolLM2-135M, {variant}, WikiText-2 raw test, first {ids.numel()} tokens, context {context}:\n")
    print(table.markdown("perplexity"))


def embeddings(model, batches) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for b in batches:
            hidden = model(**b).last_hidden_state
            mask = b["attention_mask"][..., None].float()
            out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def run_minilm(args: argparse.Namespace) -> None:
    table = Table("minilm", args)
    model, tokenizer = load("minilm-l6")
    model.eval()
    sentences = [line.split("\t")[0] for line in (DATA / "sst2" / "dev.tsv").read_text().splitlines()[1:] if line.strip()]
    test = [dict(tokenizer(sentences[i:i + 32], padding=True, return_tensors="pt")) for i in range(0, len(sentences), 32)]
    calib = text_batches(str(DATA / "sst2" / "train_full.tsv"), model, tokenizer, tokens=args.calibration_tokens, block=128, batch_size=32)
    reference = embeddings(model, test)

    def cosine(m) -> tuple[float, float]:
        cos = torch.nn.functional.cosine_similarity(embeddings(m.eval(), test), reference, dim=-1)
        return float(cos.mean()), float(torch.quantile(cos, 0.05))

    def add(name: str, m, seconds: float, tokens: int = 0) -> None:
        mean, p5 = cosine(m)
        table.add(name, mean, None, tokens, seconds, p5=p5)

    for init in ("mean", "aligned"):
        t = time.perf_counter()
        m = hf_relattn.convert(copy.deepcopy(model), "gqa", num_key_value_heads=4, init=init, **({"batches": calib} if init == "aligned" else {}))
        add(f"GQA-4 init={init}", m, time.perf_counter() - t)
    t = time.perf_counter()
    hf_relattn.calibrate(m, model, calib, steps=args.transfer_steps, lr=args.transfer_lr, inputs=args.transfer_inputs)
    add(f"GQA-4 aligned + attention transfer ({args.transfer_steps} steps/layer)", m, time.perf_counter() - t,
        sum(int(b["attention_mask"].sum()) for b in calib))
    if args.kd_steps:
        # end-to-end: the converted model's mean-pooled embeddings pulled to the original's
        # (cosine loss) on the calibration sentences, attention parameters only, eval numerics
        # (no dropout)
        t = time.perf_counter()
        params = [p for block in get_adapter(m).attention_blocks(m) for p in block.parameters()]
        optimizer = torch.optim.AdamW(params, lr=args.kd_lr)
        for step in range(args.kd_steps):
            batch = calib[step % len(calib)]
            with torch.no_grad():
                target = embeddings(model, [batch])
            hidden = m(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            loss = (1 - torch.nn.functional.cosine_similarity(pooled, target, dim=-1)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        add(f"+ embedding distillation ({args.kd_steps} steps, cosine loss)", m, time.perf_counter() - t,
            sum(int(calib[i % len(calib)]["attention_mask"].sum()) for i in range(args.kd_steps)))
    t = time.perf_counter()
    add("shaw (zero-initialised tables)", hf_relattn.convert(copy.deepcopy(model), "shaw"), time.perf_counter() - t)
    lines = ["| model | mean cosine | 5th percentile | calibration tokens | wall time |", "|:--|--:|--:|--:|--:|"]
    lines += [f"| {r['model']} | {r['value']:.4f} | {r['p5']:.4f} | {r['train_tokens']:,} | {r['seconds']:.0f} s |" for r in table.rows]
    print(f"\nall-MiniLM-L6-v2, mean-pooled embeddings of {len(sentences)} SST-2 dev sentences vs the original:\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=["mqa", "moh", "window", "minilm"])
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--transfer-steps", type=int, default=100)
    parser.add_argument("--transfer-lr", type=float, default=1e-5)
    parser.add_argument("--transfer-inputs", default="reference", choices=["reference", "converted"])
    parser.add_argument("--kd-tokens", type=int, default=0, help="distillation budget in tokens (0: skip)")
    parser.add_argument("--kd-lr", type=float, default=5e-5)
    parser.add_argument("--kd-steps", type=int, default=0, help="minilm: end-to-end embedding distillation steps (0: skip)")
    parser.add_argument("--kd-alpha", type=float, default=0.5)
    parser.add_argument("--kd-start", help="skip conversion and transfer; distil the model saved in this folder "
                        "(e.g. runs/recovery/mqa-transfer from an earlier run)")
    parser.add_argument("--control", action="store_true", help="also the LM-loss control with the same token budget")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.target == "minilm":
        run_minilm(args)
    else:
        run_lm(args.target, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
