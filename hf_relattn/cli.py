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
import glob
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import convert, variants
from .presets import DTYPES, PRESETS
from .variants.base import DATA_OPTIONS, VARIANTS


def _value(text: str) -> Any:
    """Option value from the command line: int, float, bool or string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def read_settings_file(path: str, valid: Sequence[str]) -> dict[str, Any]:
    """A YAML or JSON mapping of settings (keys with dashes or underscores), checked against `valid`."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config {path!r} not found")
    if file.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(file.read_text()) or {}
    else:
        values = json.loads(file.read_text())
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings, got {type(values).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in --config {path}; valid: {', '.join(valid)}")
    return values


def _layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated integers like 0,1,-1, got {text!r}") from None


def _option_fields() -> dict[str, list[str]]:
    """Every option name -> the variants that accept it."""
    fields: dict[str, list[str]] = {}
    for name, cls in sorted(VARIANTS.items()):
        for field in dataclasses.fields(cls):
            if field.name not in DATA_OPTIONS:  # calibration batches come from --calibrate DATA
                fields.setdefault(field.name, []).append(name)
    return fields


def add_variant_option_flags(parser: argparse.ArgumentParser, taken: Sequence[str] = ()) -> list[str]:
    """One flag per variant option (`num_key_value_heads` -> `--num-key-value-heads`, dest
    `opt_num_key_value_heads`), shared by `convert` and `finetune`. Names in `taken` are flags the
    parser already has with another meaning (finetune's `--block-size`): those options stay
    reachable through `--variant-options`. Returns the option names that got a flag."""
    added = []
    for field, owners in _option_fields().items():
        if field in taken:
            continue
        parser.add_argument(
            "--" + field.replace("_", "-"), dest="opt_" + field, metavar=field.upper(), type=_value, default=None,
            help=f"option of {', '.join(owners)}",
        )
        added.append(field)
    return added


def variant_option_values(namespace: argparse.Namespace) -> dict[str, Any]:
    """The variant options given as flags (see `add_variant_option_flags`)."""
    return {k[len("opt_"):]: v for k, v in vars(namespace).items() if k.startswith("opt_") and v is not None}


# ---------------------------------------------------------------- output folders and safe writes
PROVENANCE_FILE = "relattn_provenance.json"  # how a folder was made; plain transformers ignores it
# Files that show a folder holds an output of ours (a model, a finetune run, a bench): only such a
# folder is cleared by --overwrite, so a mistyped path never empties a folder of something else.
OUTPUT_MARKERS = ("config.json", "adapter_config.json", "training_args.json", "metrics.jsonl", "results.json", PROVENANCE_FILE)


class OutputError(ValueError):
    """An output folder that must not or cannot be written; the message names it and the reason."""


def _write_errors() -> tuple[type[BaseException], ...]:
    # what a full disk or a read-only folder raises: OSError from Python, RuntimeError from torch's
    # C++ writer ("PytorchStreamWriter failed writing file"), SafetensorError from safetensors
    from safetensors import SafetensorError

    return (OSError, RuntimeError, SafetensorError)


def write_failure(what: str, folder: str | os.PathLike[str], err: BaseException) -> OutputError:
    """One clear line for a failed save, instead of a C++ or Rust error text."""
    if isinstance(err, OSError) and err.strerror:
        reason = err.strerror + (f": {err.filename}" if err.filename else "")
    else:
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)[:200]
    return OutputError(f"Cannot write {what} to {folder}: {reason} (is the disk full or the folder read-only?)")


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_folder(folder: str | os.PathLike[str], overwrite: bool, flag: str,
                        inputs: Sequence[str | os.PathLike[str] | None] = ()) -> None:
    """Refuse a non-empty output folder unless `overwrite`, and check it can be written. Modifies nothing.

    With `overwrite`, the folder must look like an output of ours (OUTPUT_MARKERS) and must not hold
    the current directory or one of `inputs` (the model or data the run reads), since it is cleared."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{flag} {folder} is a file, not a folder: choose a folder path")
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise OutputError(f"{flag} {folder} is not empty: pass --overwrite to replace its contents, or choose a new folder")
        if not any((folder / name).exists() for name in OUTPUT_MARKERS):
            raise OutputError(f"--overwrite: {folder} holds no model or bench output (none of {', '.join(OUTPUT_MARKERS)}), "
                              "so it is not cleared; empty it yourself or choose a new folder")
        resolved = folder.resolve()
        for path in [Path.cwd(), *(Path(p) for p in inputs if p)]:
            if path.exists() and path.resolve().is_relative_to(resolved):
                raise OutputError(f"--overwrite would delete {path}, which is inside {flag} {folder}: choose another output folder")
    check_writable(folder, flag)


def check_writable(folder: str | os.PathLike[str], flag: str) -> None:
    """Create and remove a file where `folder` will be written (it, or its nearest existing parent)."""
    where = _nearest_existing(Path(folder))
    try:
        fd, probe = tempfile.mkstemp(prefix=".relattn-write-test-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"{flag} {folder} cannot be written: {err.strerror or err} in {where}") from None


def _move_aside(path: Path) -> Path:
    """Rename `path` to a hidden sibling (one atomic step) and return the new name."""
    aside = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(path, aside)
    return aside


def clear_folder(folder: str | os.PathLike[str]) -> None:
    """Remove the folder's previous contents: renamed away first, so no half-deleted model is ever
    visible under the folder's name, then deleted; the folder is left empty."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(_move_aside(folder), ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)


def staging_folder(folder: str | os.PathLike[str]) -> Path:
    """A new hidden folder beside `folder` (the same file system, so publishing it is a rename)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for kind in ("partial", "old"):  # left by a killed save
        for left in folder.parent.glob(f".{glob.escape(folder.name)}.{kind}-*"):
            shutil.rmtree(left, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))


def publish_folder(staged: Path, folder: str | os.PathLike[str]) -> None:
    """Put a completely written `staged` folder in place of `folder`: a kill at any moment leaves the
    old folder, no folder, or the new one (plus hidden leftovers), never a mix."""
    folder = Path(folder)
    old = _move_aside(folder) if folder.exists() else None
    os.replace(staged, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: a kill leaves the
    old content or the new one, never a truncated file."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temp, "x", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


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
    add_variant_option_flags(conv)

    # imported here, not at the top: bench imports `_value` from this module
    from . import bench, kernels

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


def _with_recipe(args: argparse.Namespace) -> argparse.Namespace:
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


def write_provenance(folder: str | os.PathLike[str], base_model: str, variant: str | None, options: dict[str, Any],
                     layers: Sequence[int] | None, tool: str) -> None:
    """PROVENANCE_FILE: what `folder` was converted from and how, for `push`'s card (a native GQA
    checkpoint has no other record of it)."""
    from . import __version__

    record = {"format": 1, "base_model": base_model, "variant": variant or None, "variant_options": options,
              "layers": list(layers) if layers is not None else None, "tool": tool, "hf_relattn_version": __version__}
    write_text_atomic(Path(folder) / PROVENANCE_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")


def cmd_convert(args: argparse.Namespace) -> None:
    from .presets import load

    args = _with_recipe(args)
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
    convert(model, args.variant, layers=args.layers, **options)
    if reference is not None:
        from .transfer import calibrate

        start = _step(f"Converted in {time.perf_counter() - start:.1f}s. Attention transfer on {args.calibrate} ...")
        calibrate(model, reference, batches, steps=args.calibration_steps, lr=args.calibration_lr)
    start = _step(f"Converted in {time.perf_counter() - start:.1f}s. Saving to {args.output} ...")
    # written beside OUTPUT and renamed into place when complete: a kill mid-save never leaves a
    # folder that looks like a checkpoint, and --overwrite replaces the old model only then
    staged = None
    try:
        staged = staging_folder(args.output)
        model.save_pretrained(staged)
        if tokenizer is not None:
            tokenizer.save_pretrained(staged)
        write_provenance(staged, args.source, args.variant, {k: v for k, v in options.items() if k != "batches"},
                         args.layers, "hf-relattn convert")
        publish_folder(staged, args.output)
    except _write_errors() as err:
        raise write_failure("the converted model", args.output, err) from err
    finally:
        if staged is not None and staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    _step(f"Saved in {time.perf_counter() - start:.1f}s: {args.output} ({type(model).__name__})")


def cmd_bench(args: argparse.Namespace) -> None:
    from . import bench, kernels

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
