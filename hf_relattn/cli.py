"""Command line: `hf-relattn variants`, `hf-relattn convert SRC OUT --variant NAME [options]`,
`hf-relattn bench --model SRC --variants SPEC [...]`, `hf-relattn bench kernels [...]` and
`hf-relattn push DIR REPO_ID [...]` (model card + upload, see `hf_relattn.hub`).

Variant options of `convert` become flags automatically from the variants' option dataclasses
(`num_key_value_heads` -> `--num-key-value-heads`; finetune takes the same flags). `bench` takes
them inside its variant entries (`gqa:num_key_value_heads=1`); see `hf_relattn.bench` and
`hf_relattn.kernels`.

Output folders (`convert` OUTPUT, `bench --out`, finetune's `--output`) must be new or empty
unless `--overwrite`, which replaces an earlier output whole. `convert` writes beside OUTPUT and
renames into place when complete, with `relattn_provenance.json` (base model and conversion, for
`push`); a full disk or read-only folder is one error line (helpers in this module).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import bench, convert, kernels, variants
from .outputs import (
    check_output_folder,
    publish_folder,
    reporting_write_errors,
    staging_folder,
    write_provenance,
)
from .patches import ADAPTERS
from .presets import DTYPES, PRESETS
from .settings import add_variant_option_flags, read_settings_file, variant_option_values
from .variants.base import VARIANTS


def _layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated integers like 0,1,-1, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-relattn", description="Attention variants for pretrained transformers models.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("variants", help="list every variant with its description and paper")

    conv = sub.add_parser("convert", help="convert a model and save it as a checkpoint folder")
    conv.add_argument("source", nargs="?", help=f"local folder, Hub id, or preset: {', '.join(PRESETS)}")
    conv.add_argument("output", nargs="?", help="folder to write the converted checkpoint to")
    conv.add_argument("--config", default=None, help="YAML/JSON recipe (e.g. finetune/recipes/minilm_gqa4.yaml): defaults for "
                      "source, output and every flag; the command line wins")
    conv.add_argument("--variant", choices=sorted(VARIANTS), help="variant to apply (required)")
    conv.add_argument("--layers", type=_layers, default=None, help="comma-separated layer indices (default: all)")
    conv.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype to load and save in")
    conv.add_argument("--calibrate", metavar="DATA", default=None,
                      help="text data (file or table) to calibrate on: fitted inits (gqa/mqa init=aligned, moh "
                      "shared_heads=importance) and attention transfer (hf_relattn.calibrate)")
    conv.add_argument("--calibration-tokens", type=int, default=16384, help="tokens of DATA to use (default 16384)")
    conv.add_argument("--calibration-steps", type=int, default=100, help="attention-transfer steps per converted layer (0: fitted init only)")
    conv.add_argument("--calibration-lr", type=float, default=1e-5, help="attention-transfer learning rate")
    conv.add_argument("--calibration-block", type=int, default=512, help="tokens per calibration sequence")
    conv.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty OUTPUT (a former model output)")
    conv.add_argument("--replace", action="store_true",
                      help="convert a variant the source already has on these layers afresh (its trained tables are dropped)")
    add_variant_option_flags(conv)

    bench_parser = sub.add_parser(
        "bench",
        help="quality + speed + memory of variants against the unmodified model (or `bench kernels`)",
        description=bench.description() + "\n\nAttention-op microbenchmarks: hf-relattn bench kernels -h",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_arguments(bench_parser)
    modes = bench_parser.add_subparsers(dest="bench_mode", metavar="{kernels}")  # optional: plain `bench` runs the model bench
    kernels_parser = modes.add_parser("kernels", help="attention-op microbenchmarks on random q/k/v", description=kernels.__doc__.split("\n\n")[0])
    kernels.add_arguments(kernels_parser)

    push = sub.add_parser(
        "push", help="upload an adapted checkpoint folder to the Hub with its model card",
        description="Upload DIR (its top-level files) to the Hub repository REPO_ID with a model card written from the "
        "checkpoint's variant spec, training arguments and (--results) the bench rows that measured it.",
    )
    push.add_argument("folder", metavar="DIR", help="checkpoint folder (save_pretrained / hf-relattn convert / finetune output)")
    push.add_argument("repo_id", metavar="REPO_ID", help="Hub repository, 'namespace/name' (or 'name' for your own namespace)")
    push.add_argument("--private", action="store_true", help="create the repository private (an existing one keeps its visibility)")
    push.add_argument("--results", default=None, help="results.json of `hf-relattn bench --model DIR`: evaluation rows for the card")
    push.add_argument("--base-model", default=None, help="Hub id or name of the model DIR was converted from (default: from the folder)")
    push.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored `hf auth login` token)")
    push.add_argument("--dry-run", metavar="OUTDIR", default=None, help="write the files that would be uploaded to OUTDIR; upload nothing")
    push.add_argument("--commit-message", default=None, help="commit message (default: names the family and variants)")
    return parser


def _step(message: str) -> float:
    print(message, file=sys.stderr, flush=True)
    return time.perf_counter()


def cmd_variants() -> None:
    rows = variants()
    width = max(map(len, rows))
    for name, text in rows.items():
        print(f"{name:<{width}}  {text}")
    # on stderr: stdout stays one line per variant, for scripts
    print(f"families: {', '.join(sorted(ADAPTERS))} (README: 'Model families')", file=sys.stderr)


def with_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags not given on the command line from `--config` (keys as the flags' names)."""
    if args.config:
        defaults = vars(build_parser().parse_args(["convert"]))
        names = {k[len("opt_"):] if k.startswith("opt_") else k: k for k in defaults if k not in ("command", "config")}
        names["layers"] = "layers"
        for key, value in read_settings_file(args.config, list(names)).items():
            dest = names[key]
            if getattr(args, dest) == defaults[dest]:
                setattr(args, dest, ",".join(map(str, value)) if key == "layers" and isinstance(value, list) else value)
        if isinstance(args.layers, str):
            args.layers = _layers(args.layers)
    missing = [name for name in ("source", "output", "variant") if getattr(args, name) is None]
    if missing:
        raise ValueError(f"convert needs {', '.join(missing)} (on the command line or in --config)")
    if args.variant not in VARIANTS:
        raise ValueError(f"Unknown variant {args.variant!r}; valid variants: {', '.join(sorted(VARIANTS))}")
    return args


def cmd_convert(args: argparse.Namespace) -> None:
    from .presets import load

    args = with_recipe(args)
    options = variant_option_values(args)
    if args.calibrate is not None and not Path(args.calibrate).exists():
        raise FileNotFoundError(f"--calibrate {args.calibrate!r} not found")
    if args.calibration_steps < 0:
        raise ValueError(f"--calibration-steps must be >= 0, got {args.calibration_steps}")
    check_output_folder(args.output, args.overwrite, "OUTPUT", inputs=[args.source, args.calibrate])
    start = _step(f"Loading {args.source} ...")
    model, tokenizer = load(args.source, dtype=args.dtype)
    reference = batches = None
    if args.calibrate is not None:
        import copy

        from .transfer import text_batches

        batches = text_batches(args.calibrate, model, tokenizer, tokens=args.calibration_tokens, block=args.calibration_block)
        if VARIANTS[args.variant].fits_on_batches(options):
            options["batches"] = batches  # fitted initialisation (gqa/mqa: aligned, moh: importance)
        if args.calibration_steps:
            reference = copy.deepcopy(model)
    start = _step(f"Loaded in {time.perf_counter() - start:.1f}s. Converting to {args.variant} "
                  f"{ {k: v for k, v in options.items() if k != 'batches'} or ''} ...")
    convert(model, args.variant, layers=args.layers, replace=args.replace, **options)
    if reference is not None:
        from .transfer import calibrate

        start = _step(f"Converted in {time.perf_counter() - start:.1f}s. Attention transfer on {args.calibrate} ...")
        calibrate(model, reference, batches, steps=args.calibration_steps, lr=args.calibration_lr)
    start = _step(f"Converted in {time.perf_counter() - start:.1f}s. Saving to {args.output} ...")
    # written beside OUTPUT and renamed into place when complete: a kill mid-save never leaves a
    # folder that looks like a checkpoint, and --overwrite replaces the old model only then
    staged = None
    try:
        with reporting_write_errors("the converted model", args.output):
            staged = staging_folder(args.output)
            model.save_pretrained(staged)
            if tokenizer is not None:
                tokenizer.save_pretrained(staged)
            write_provenance(staged, args.source, args.variant, {k: v for k, v in options.items() if k != "batches"},
                             args.layers, "hf-relattn convert")
            publish_folder(staged, args.output)
    finally:
        if staged is not None and staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    _step(f"Saved in {time.perf_counter() - start:.1f}s: {args.output} ({type(model).__name__})")


def cmd_bench(args: argparse.Namespace) -> None:
    if args.bench_mode == "kernels":
        given = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(bench.BenchConfig) if getattr(args, f.name, None) is not None]
        if given or args.config:
            raise ValueError(f"`bench kernels` takes no model-bench flags ({', '.join(given or ['--config'])}); put them after `bench` without `kernels`")
        kernels.run_from_args(args)
    else:
        bench.run_bench(bench.config_from_args(args))


def cmd_push(args: argparse.Namespace) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    from .hub import push_to_hub

    try:
        where = push_to_hub(
            args.folder, args.repo_id, private=args.private, results=args.results, token=args.token,
            dry_run=args.dry_run, commit_message=args.commit_message, base_model=args.base_model,
        )
    except HfHubHTTPError as err:
        raise ValueError(f"upload to the Hub failed: {err}") from None
    if args.dry_run:
        files = sorted(p.name for p in Path(where).iterdir())
        print(f"Dry run: {len(files)} files that would be uploaded to {args.repo_id} written to {where}: {', '.join(files)}")
    else:
        print(f"Pushed {args.folder} to {where}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "variants":
            cmd_variants()
        elif args.command == "convert":
            cmd_convert(args)
        elif args.command == "bench":
            cmd_bench(args)
        elif args.command == "push":
            cmd_push(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"hf-relattn: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
