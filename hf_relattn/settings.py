"""Settings from the command line and from recipe files, shared by the CLI, the bench and
finetune: option values, YAML/JSON settings files, and one flag per variant option."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .variants.base import DATA_OPTIONS, VARIANTS


def parse_value(text: str) -> Any:
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


def option_fields() -> dict[str, list[str]]:
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
    for field, owners in option_fields().items():
        if field in taken:
            continue
        parser.add_argument(
            "--" + field.replace("_", "-"), dest="opt_" + field, metavar=field.upper(), type=parse_value, default=None,
            help=f"option of {', '.join(owners)}",
        )
        added.append(field)
    return added


def variant_option_values(namespace: argparse.Namespace) -> dict[str, Any]:
    """The variant options given as flags (see `add_variant_option_flags`)."""
    return {k[len("opt_"):]: v for k, v in vars(namespace).items() if k.startswith("opt_") and v is not None}


def variant_options(text: str | dict[str, Any] | None) -> dict[str, Any]:
    """finetune's --variant-options: a JSON object or k=v,k=v (values typed like the CLI's); a
    mapping (from a recipe) as it is."""
    if not text:
        return {}
    if isinstance(text, dict):
        return dict(text)
    if text.lstrip().startswith("{"):
        return json.loads(text)
    options = {}
    for item in text.split(","):
        if "=" not in item:
            raise ValueError(f"--variant-options takes k=v pairs or a JSON object, got {item!r}")
        key, value = item.split("=", 1)
        options[key.strip()] = parse_value(value.strip())
    return options

