"""Remote code for adapted checkpoints: `save_pretrained` of an adapted model also writes the
modeling code it needs, so `AutoModelFor<Task>.from_pretrained(folder, trust_remote_code=True)`
works where hf_relattn is not installed.

The code is this package's own modules (engine, adapted types, variants, family adapters),
flattened into one folder as transformers' dynamic modules require: `hf_relattn.variants.moba`
becomes `relattn_variants_moba.py`, and every relative import is rewritten to the flat name
(`from .relattn_variants_base import Variant`). An entry module, `modeling_relattn.py`,
registers the attention functions and defines the family's adapted config and model classes;
`config.json` points the Auto classes at it (`auto_map`). Only torch, transformers and the
standard library are imported; nothing reads files or the network (weights come from the
checkpoint's safetensors through transformers).

With the plugin imported, the registered local types take precedence (transformers uses local
code when it has it and `trust_remote_code` is not set), so the files change nothing there.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

PACKAGE = "hf_relattn"
# Modules the adapted types need at load and run time (their imports are followed).
ROOTS = ("hf_relattn.modeling", "hf_relattn.variants", "hf_relattn.heads")
ENTRY = "modeling_relattn"


def flat_name(module: str) -> str:
    """`hf_relattn.variants.base` -> `relattn_variants_base` (the package itself: `relattn`)."""
    rest = module[len(PACKAGE):].lstrip(".")
    return "relattn" + ("_" + rest.replace(".", "_") if rest else "")


def _is_package(module: str) -> bool:
    return Path(inspect.getfile(importlib.import_module(module))).name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """Absolute module named by a relative `from ... import` inside `module`."""
    parts = module.split(".")
    base = parts if _is_package(module) else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _flatten(module: str) -> tuple[str, set[str]]:
    """The module's source with relative imports rewritten, and the modules it imports."""
    source = inspect.getsource(importlib.import_module(module))
    lines = source.splitlines(keepends=True)
    needed: set[str] = set()
    edits = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        target = _resolve(module, node)
        first = lines[node.lineno - 1]
        indent = first[: len(first) - len(first.lstrip())]
        new = []
        names = []
        for alias in node.names:
            if _is_module(f"{target}.{alias.name}"):
                # a submodule (for its side effects, or used as `module.name`): import it by its flat
                # name (a relative import transformers' loader follows) and bind the module object
                needed.add(f"{target}.{alias.name}")
                new.append(f"{indent}from .{flat_name(f'{target}.{alias.name}')} import __name__ as _{alias.name}_module\n")
                new.append(f"{indent}{alias.asname or alias.name} = __import__('sys').modules[_{alias.name}_module]\n")
            else:
                names.append(f"{alias.name} as {alias.asname}" if alias.asname else alias.name)
        if names:
            needed.add(target)
            new.insert(0, f"{indent}from .{flat_name(target)} import {', '.join(names)}\n")
        edits.append((node.lineno - 1, node.end_lineno, new))
    for start, end, new in sorted(edits, key=lambda e: e[0], reverse=True):
        lines[start:end] = new
    return "".join(lines), needed


def flattened_sources() -> dict[str, str]:
    """File name -> source of every module the adapted types need, flattened."""
    files: dict[str, str] = {}
    todo = list(ROOTS)
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        source, needed = _flatten(module)
        files[flat_name(module) + ".py"] = source
        todo.extend(needed - seen)
    return files


def _auto_map(model: PreTrainedModel) -> tuple[dict[str, str], list[str]]:
    """auto_map entries for the family's Auto classes, and the native classes they adapt."""
    from .modeling import auto_classes, mapped_class_name
    from .patches import base_model_type

    family = base_model_type(model.config.model_type)
    mapping = {"AutoConfig": f"{ENTRY}.Relattn{type(model.config).__mro__[1].__name__}"}
    classes = set()
    for auto_cls in auto_classes():
        class_name = mapped_class_name(auto_cls, family)
        if class_name is not None:
            mapping[auto_cls.__name__] = f"{ENTRY}.Relattn{class_name}"
            classes.add(class_name)
    return mapping, sorted(classes)


def entry_source(config_class: str, classes: list[str]) -> str:
    """`modeling_relattn.py`: registers the engine, defines the adapted config and model classes."""
    imports = ", ".join([config_class, *classes])
    lines = [
        '"""Remote code of an hf_relattn adapted checkpoint (written by save_pretrained; needs only torch',
        "and transformers). Load with AutoModelFor<Task>.from_pretrained(folder, trust_remote_code=True).",
        '"""',
        "",
        f"from transformers import {imports}",
        "",
        "from .relattn_modeling import adapted_config_class, adapted_class, register_attention",
        "from .relattn_variants import VARIANTS  # registers every variant",
        "",
        "register_attention()",
        f"Relattn{config_class} = adapted_config_class({config_class})",
    ]
    lines += [f"Relattn{name} = adapted_class({name})" for name in classes]
    return "\n".join(lines) + "\n"


def write_remote_code(model: PreTrainedModel, folder: str | Path) -> list[str]:
    """Write the flattened modules and the entry module into `folder`, and `auto_map` into its
    config.json. Returns the file names written."""
    from .outputs import write_text_atomic

    folder = Path(folder)
    mapping, classes = _auto_map(model)
    files = flattened_sources()
    files[ENTRY + ".py"] = entry_source(type(model.config).__mro__[1].__name__, classes)
    # each file through a temporary name and a rename, the config last: a kill leaves the old or
    # the new config.json (never a truncated one), and auto_map only once its modules are in place
    for name, text in files.items():
        write_text_atomic(folder / name, text)
    config_path = folder / "config.json"
    config: dict[str, Any] = json.loads(config_path.read_text())
    config["auto_map"] = mapping
    write_text_atomic(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return sorted(files)
