"""Arguments of `hf_relattn.finetune`, parsed the transformers way (HfArgumentParser).

`--config recipe.yaml` (or .json) supplies defaults; flags given on the command line win.
Variant options take flags as in `hf-relattn convert` (`--num-key-value-heads 1`), besides
`--variant-options`; `--block-size` keeps its meaning here (tokens per block), so a sparse
variant's block size goes through `--variant-options block_size=N`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from transformers import HfArgumentParser

from hf_relattn.settings import add_variant_option_flags, read_settings_file, variant_option_values, variant_options
# The dataclass lives in the library (model cards read a run's arguments); imported from here as always.
from hf_relattn.training import SCHEDULERS, TASKS, TRAIN_SELECTIONS, FinetuneArguments

__all__ = ["SCHEDULERS", "TASKS", "TRAIN_SELECTIONS", "FinetuneArguments", "parse_args"]


def _options_text(value: Any) -> Any:
    """Recipes may give variant_options as a mapping; the flag takes JSON text."""
    return json.dumps(value) if isinstance(value, dict) else value


def _with_option_flags(text: str | None, flags: dict[str, Any]) -> str | None:
    """--variant-options with the option flags (--num-key-value-heads 1 ...) merged in, as JSON."""
    if not flags:
        return text
    options = variant_options(text)
    clash = sorted(k for k in flags if k in options and options[k] != flags[k])
    if clash:
        k = clash[0]
        raise ValueError(f"--{k.replace('_', '-')} {flags[k]} and --variant-options {k}={options[k]} disagree: give the option once")
    return json.dumps({**options, **flags})


def parse_args(argv: list[str] | None = None) -> FinetuneArguments:
    """Parse the command line, with `--config FILE` (YAML or JSON) as defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(FinetuneArguments, prog="hf_relattn.finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML/JSON recipe; command-line flags override it.")
    fields = list(FinetuneArguments.__dataclass_fields__)
    option_flags = add_variant_option_flags(parser, taken=fields)
    if known.config:
        values = read_settings_file(known.config, fields + option_flags)
        parser.set_defaults(**{("opt_" + k if k in option_flags else k): _options_text(v) for k, v in values.items()})
    args, extra = parser.parse_args_into_dataclasses(args=rest)
    args.variant_options = _with_option_flags(args.variant_options, variant_option_values(extra))
    return args
