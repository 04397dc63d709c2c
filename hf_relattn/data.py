"""Data through the `datasets` library: loading, deterministic splits, per-task processing and
collation. finetune trains on it, the bench evaluates on it and calibration (`text_batches`)
reads it, so it lives in the library (finetune re-exports it as `hf_relattn.finetune.data`).

Formats (by path): plain text (packed into fixed-length token blocks), .tsv/.csv/.jsonl with a
text and a label column, MNIST IDX files (`*-images-idx3-ubyte[.gz]`, labels found beside
them), `Dataset.save_to_disk` folders, and Hub dataset names when online.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding, default_data_collator

TEXT_SUFFIXES = (".txt", ".raw", ".text", ".md")


def _fail(message: str) -> None:
    raise ValueError(message)


def data_format(path: str) -> str:
    """The format of a data source by its path: text, tsv, csv, json, mnist, disk or hub."""
    name = os.path.basename(path.rstrip("/"))
    if os.path.isdir(path):
        return "disk"
    if "idx3-ubyte" in name:
        return "mnist"
    suffix = name[:-3] if name.endswith(".gz") else name
    for fmt, suffixes in (("tsv", (".tsv",)), ("csv", (".csv",)), ("json", (".jsonl", ".json"))):
        if suffix.endswith(suffixes):
            return fmt
    if os.path.exists(path):
        return "text"
    if "/" in path and not path.startswith((".", "/")) and path.count("/") == 1 and "." not in name:
        return "hub"
    raise FileNotFoundError(f"Data file {path!r} not found (formats: text, .tsv, .csv, .jsonl, MNIST idx, save_to_disk folder, Hub name)")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 8:
        _fail(f"{path} is not an IDX file (too short)")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_raw(path: str) -> datasets.Dataset:
    """Load one data source as a `datasets.Dataset` (no processing yet)."""
    fmt = data_format(path)
    if fmt != "hub" and fmt != "disk" and os.path.getsize(path) == 0:
        _fail(f"Data file {path!r} is empty")
    if fmt == "text":
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        if not text.strip():
            _fail(f"Data file {path!r} is empty")
        # pieces of ~200 lines keep tokenisation batched without losing line breaks
        lines = text.splitlines(keepends=True)
        pieces = ["".join(lines[i : i + 200]) for i in range(0, len(lines), 200)]
        return datasets.Dataset.from_dict({"text": pieces})
    if fmt == "mnist":
        images = Path(path)
        labels = images.with_name(images.name.replace("images-idx3", "labels-idx1"))
        if not labels.exists():
            raise FileNotFoundError(f"MNIST labels {labels} not found beside {images}")
        x, y = _read_idx(images), _read_idx(labels)
        if len(x) != len(y):
            _fail(f"{images} has {len(x)} images but {labels} has {len(y)} labels")
        return datasets.Dataset.from_dict({"image": list(x), "label": y.astype(np.int64)})
    if fmt == "disk":
        loaded = datasets.load_from_disk(path)
        return loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
    if fmt == "hub":
        return datasets.load_dataset(path, split="train")
    kwargs: dict[str, Any] = {"delimiter": "\t", "quoting": 3} if fmt == "tsv" else {}
    builder = "json" if fmt == "json" else "csv"
    loaded = datasets.load_dataset(builder, data_files=path, split="train", **kwargs)
    if len(loaded) == 0:
        _fail(f"Data file {path!r} has no rows")
    return loaded


def split(ds: datasets.Dataset, eval_fraction: float, eval_size: int | None, train_size: int | None) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Deterministic split: evaluation examples are the last ones, training the first."""
    n_eval = eval_size if eval_size is not None else int(round(len(ds) * eval_fraction))
    if eval_size is None and eval_fraction > 0:
        n_eval = max(1, n_eval)  # a requested evaluation never silently vanishes on small data
    if not 0 <= n_eval < len(ds):
        _fail(f"Cannot hold out {n_eval} of {len(ds)} examples for evaluation")
    train = ds.select(range(len(ds) - n_eval))
    if train_size is not None:
        train = train.select(range(min(train_size, len(train))))
    return train, (ds.select(range(len(ds) - n_eval, len(ds))) if n_eval else None)


def _require(ds: datasets.Dataset, column: str, flag: str) -> None:
    if column not in ds.column_names:
        _fail(f"Column {column!r} not found in the data (columns: {ds.column_names}); set {flag}")


def _max_positions(config: Any) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def prepare(task: str, ds: datasets.Dataset, processor: Any, args: Any, config: Any, labels: list[Any] | None) -> datasets.Dataset:
    """Tokenise / pack / featurise for `task`; returns a torch-formatted Dataset."""
    if task in ("causal-lm", "masked-lm"):
        column = args.text_column if args.text_column in ds.column_names else "text"
        _require(ds, column, "--text-column")
        limit = _max_positions(config)
        if limit is not None and args.block_size > limit:
            _fail(f"--block-size {args.block_size} exceeds the model's maximum of {limit} positions")
        tokenized = ds.map(
            lambda batch: {"ids": processor(batch[column], add_special_tokens=False)["input_ids"]},
            batched=True, remove_columns=ds.column_names,
        )
        flat = np.fromiter((t for ids in tokenized["ids"] for t in ids), dtype=np.int64)
        n_blocks = len(flat) // args.block_size
        if n_blocks == 0:
            _fail(f"The data has {len(flat)} tokens, fewer than one block of {args.block_size}")
        blocks = flat[: n_blocks * args.block_size].reshape(n_blocks, args.block_size)
        return datasets.Dataset.from_dict({"input_ids": blocks}).with_format("torch")
    if task == "seq-cls":
        _require(ds, args.text_column, "--text-column")
        _require(ds, args.label_column, "--label-column")
        limit = _max_positions(config)
        if limit is not None and args.max_length > limit:
            _fail(f"--max-length {args.max_length} exceeds the model's maximum of {limit} positions")
        index = {label: i for i, label in enumerate(labels)}
        out = ds.map(
            lambda batch: {
                **processor(batch[args.text_column], truncation=True, max_length=args.max_length),
                "labels": [index[label] for label in batch[args.label_column]],
            },
            batched=True, remove_columns=ds.column_names,
        )
        return out.with_format("torch")
    if task == "image-cls":
        image_column = "image" if "image" in ds.column_names else "img"
        _require(ds, image_column, "(an 'image' column)")
        _require(ds, args.label_column, "--label-column")
        index = {label: i for i, label in enumerate(labels)}

        def featurize(batch: dict[str, list]) -> dict[str, Any]:
            images = [np.asarray(img, dtype=np.uint8) for img in batch[image_column]]
            images = [img[:, :, None] if img.ndim == 2 else img for img in images]
            pixels = processor(images, return_tensors="np", input_data_format="channels_last")["pixel_values"]
            return {"pixel_values": pixels, "labels": [index[label] for label in batch[args.label_column]]}

        return ds.map(featurize, batched=True, batch_size=500, remove_columns=ds.column_names).with_format("torch")
    _fail(f"Unknown task {task!r}")


def label_list(ds: datasets.Dataset, column: str) -> list[Any]:
    """The sorted distinct values of the label column (class i is the i-th)."""
    _require(ds, column, "--label-column")
    return sorted(set(ds[column]))


def class_labels(raw: datasets.Dataset, column: str, num_labels: int | None) -> list[Any]:
    """Label values in class-index order: class i is the integer i when the data's labels are
    integers inside the `num_labels` classes of a model's existing head (so a subset of the data
    lacking some classes keeps each label's class), else the sorted distinct values."""
    values = label_list(raw, column)
    if num_labels and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < num_labels for v in values):
        return list(range(num_labels))
    if num_labels and len(values) > num_labels:
        _fail(f"The data has {len(values)} labels {values[:20]} but the model's head has {num_labels} classes")
    return values


def collator(task: str, processor: Any, mlm_probability: float) -> Any:
    """The batch collation function of `task` (masked-lm: masks drawn at `mlm_probability`)."""
    if task == "causal-lm":
        return lambda rows: {"input_ids": (ids := torch.stack([r["input_ids"] for r in rows])), "labels": ids.clone()}
    if task == "masked-lm":
        if getattr(processor, "mask_token", None) is None:
            _fail("masked-lm needs a tokenizer with a mask token")
        return DataCollatorForLanguageModeling(processor, mlm_probability=mlm_probability)
    if task == "seq-cls":
        return DataCollatorWithPadding(processor)
    return default_data_collator
