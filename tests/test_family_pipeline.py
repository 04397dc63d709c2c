"""Every family of the table through the user's tools, as a user runs them on a saved checkpoint:
`finetune` one step with a variant (Accelerate, in process), `bench` of the finetuned
checkpoint (one row), `push --dry-run` of the finetuned folder with the bench results in its card.

The model paths themselves are checked in tests/test_conformance.py; here the point is that the
tools find each family's task head, tokenizer or image processor, variant and saved spec.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import DATA, bpe_tokenizer
from reference import prefix_of
from pydoc_data.topics import topics
from transformers import AutoConfig
from variant_cases import AUTO_CLASSES, BUILDERS, FAMILIES, PADDING_SIDE

from hf_relattn.cli import main as cli_main
from hf_relattn.finetune import run
from hf_relattn.finetune.args import parse_args
from hf_relattn.hub import push_to_hub
from hf_relattn.patches import ADAPTERS

TEXT = "\n".join(topics[k] for k in sorted(topics))[:30_000]
MNIST = DATA / "mnist" / "t10k-images-idx3-ubyte.gz"
FAST = ["--reps", "1", "--warmup", "1", "--threads", "1", "--no-plots"]
# Shaw's relative positions: every family takes it (2-D on vision grids); max_distance small
VARIANT, OPTIONS = "shaw", {"max_distance": 3}

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def kind(family: str) -> str:
    return {"left": "decoder", "right": "encoder", None: "vision"}[PADDING_SIDE[family]]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pipeline-data")
    (folder / "text.txt").write_text(TEXT)
    rng = random.Random(0)
    lines = [line.strip() for line in TEXT.splitlines() if 20 < len(line.strip()) < 200 and "\t" not in line][:24]
    (folder / "sst.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{rng.randrange(2)}\n" for s in lines))
    return {"decoder": folder / "text.txt", "encoder": folder / "sst.tsv", "vision": MNIST}


def save_source(family: str, folder: Path) -> Path:
    """The family's tiny random model as a user's checkpoint folder: a trained BPE tokenizer for
    text families (embeddings resized to it), MNIST's 28 x 28 one-channel images with 10 labels for vision."""
    model = BUILDERS[family]()
    if kind(family) == "vision":
        config = model.config
        config.image_size, config.patch_size, config.num_labels = 28, 7, 10
        config.id2label, config.label2id = {i: str(i) for i in range(10)}, {str(i): i for i in range(10)}
        torch.manual_seed(0)
        model = AUTO_CLASSES[family].from_config(config)
    else:
        roles = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
        tokenizer = bpe_tokenizer(TEXT, list(roles.values()), **roles)
        tokenizer.save_pretrained(folder)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model.config.pad_token_id = tokenizer.pad_token_id
        if kind(family) == "encoder":
            model.config.num_labels = 2
            model.config.id2label, model.config.label2id = {0: "0", 1: "1"}, {"0": 0, "1": 1}
            model.classifier = None  # rebuilt for 2 labels below
            model = AUTO_CLASSES[family].from_config(model.config)
    model.save_pretrained(folder)
    return folder


# the families with a task head (CLIP's towers alone have none: CLIPForImageClassification, `clip`, has)
WITH_TASKS = [family for family in FAMILIES if ADAPTERS[family].tasks]


def test_only_headless_towers_are_left_out():
    assert sorted(set(FAMILIES) - set(WITH_TASKS)) == ["clip_text_model", "clip_vision_model"]


@pytest.mark.parametrize("family", WITH_TASKS)
def test_finetune_bench_and_push(family, data, tmp_path):
    if kind(family) == "vision" and not MNIST.exists():
        pytest.skip("../shared/data/mnist absent")
    source = save_source(family, tmp_path / "source")
    task = {"decoder": "causal-lm", "encoder": "seq-cls", "vision": "image-cls"}[kind(family)]
    sizes = {"decoder": ["--block-size", "16"], "encoder": ["--max-length", "24", "--train-size", "8"],
             "vision": ["--train-size", "8", "--eval-size", "8"]}[kind(family)]

    trained = tmp_path / "trained"
    metrics = run(parse_args([
        "--model", str(source), "--task", task, "--data", str(data[kind(family)]), "--output", str(trained),
        "--variant", VARIANT, "--variant-options", json.dumps(OPTIONS), "--batch-size", "2", "--max-steps", "1",
        "--logging-steps", "1", "--eval-batches", "1", *sizes,
    ]))
    assert all(not isinstance(v, float) or v == v for v in metrics.values()), metrics  # no NaN
    saved = json.loads((trained / "config.json").read_text())
    assert saved["model_type"] == "relattn_" + family
    assert saved["relattn"]["variants"][0]["name"] == VARIANT
    reloaded = AUTO_CLASSES[family].from_pretrained(trained)
    assert type(reloaded).__name__.startswith("Relattn") and AutoConfig.from_pretrained(trained).relattn == saved["relattn"]

    bench = tmp_path / "bench"
    sizes = {"decoder": ["--context", "16", "--stride", "8", "--max-tokens", "64", "--contexts", "16", "--decode-contexts", "8",
                         "--new-tokens", "2"],
             "encoder": ["--eval-size", "8", "--batch-size", "4", "--max-length", "24", "--contexts", "16"],
             "vision": ["--eval-size", "8", "--batch-size", "4"]}[kind(family)]
    # one row: the finetuned checkpoint itself (what its card reports)
    assert cli_main(["bench", "--model", str(trained), "--task", task, "--data", str(data[kind(family)]), "--out", str(bench),
                     *sizes, *FAST]) == 0
    results = json.loads((bench / "results.json").read_text())
    assert len(results["results"]) == 1 and results["results"][0]["relattn_spec"] == saved["relattn"]
    assert all(v == v for v in results["results"][0]["quality"].values() if isinstance(v, float))
    if kind(family) == "vision":  # the prefill context: 4 x 4 patches of 7 pixels and the prefix tokens
        assert [m["context"] for m in results["results"][0]["prefill"]] == [16 + prefix_of(reloaded.config)]

    preview = tmp_path / "preview"
    push_to_hub(str(trained), f"tester/{family}-{VARIANT}", results=str(bench / "results.json"), dry_run=preview)
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in preview.iterdir()}
    assert f"relattn_{family}" in (preview / "config.json").read_text()
