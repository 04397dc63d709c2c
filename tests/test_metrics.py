"""The Evaluate modules shipped in hf_relattn.metrics: they load offline from their folders
(with `evaluate.load(path)` and with `hf_relattn.metrics.load(name)`), give hand-computed
values, accumulate over `add_batch`, and reject bad input with a clear ValueError."""

from __future__ import annotations

import ast
import math
import os
import uuid

import evaluate
import numpy as np
import pytest

from hf_relattn import metrics

ALLOWED_IMPORTS = {"__future__", "math", "typing", "numpy", "datasets", "evaluate"}


@pytest.fixture(scope="module", params=["path", "name"])
def load(request, tmp_path_factory):
    """Loader under test: `evaluate.load(<folder>)` or `hf_relattn.metrics.load(<name>)`.

    Each instance stores its inputs in its own file under a temporary cache_dir: an instance
    whose compute() raised keeps its file lock until it is garbage-collected, and a shared
    experiment_id would make the next instance wait for that lock.
    """
    cache_dir = str(tmp_path_factory.mktemp("evaluate"))

    def _load(name: str):
        kwargs = {"cache_dir": cache_dir, "experiment_id": uuid.uuid4().hex}
        if request.param == "path":
            return evaluate.load(metrics.path(name), **kwargs)
        return metrics.load(name, **kwargs)

    return _load


# ------------------------------------------------------------------------------ package
def test_names_folders_and_cards():
    assert metrics.METRICS == ("perplexity", "accuracy", "masked_accuracy")
    for name in metrics.METRICS:
        folder = metrics.path(name)
        assert os.path.isabs(folder) and os.path.basename(folder) == name
        assert os.path.isfile(os.path.join(folder, f"{name}.py"))
        with open(os.path.join(folder, "README.md"), encoding="utf-8") as f:
            card = f.read()
        # Evaluate module card: YAML front matter, then the "Metric Card for" sections.
        assert card.startswith("---\n") and "\ntags:\n- evaluate\n- metric\n" in card
        for section in ("# Metric Card for", "## Metric Description", "## How to Use", "### Inputs",
                        "### Output Values", "### Examples", "## Limitations and Bias", "## Citation"):
            assert section in card, (name, section)


@pytest.mark.parametrize("name", metrics.METRICS)
def test_modules_import_only_numpy_datasets_evaluate(name):
    with open(os.path.join(metrics.path(name), f"{name}.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports would need extra files in the module folder"
            imported.add(node.module.split(".")[0])
    assert imported <= ALLOWED_IMPORTS, imported - ALLOWED_IMPORTS


def test_unknown_name_lists_the_valid_ones():
    for call in (metrics.path, metrics.load):
        with pytest.raises(ValueError, match="Unknown hf_relattn metric 'bleu'.*perplexity, accuracy, masked_accuracy"):
            call("bleu")


@pytest.mark.parametrize("name", metrics.METRICS)
def test_both_loaders_give_the_same_metric(name):
    by_path = evaluate.load(metrics.path(name))
    by_name = metrics.load(name, keep_in_memory=True)  # kwargs reach evaluate.load
    for module in (by_path, by_name):
        assert isinstance(module, evaluate.Metric) and module.module_type == "metric"
        assert module.name == name
        assert module.citation and module.description and module.inputs_description
    assert by_name.keep_in_memory and not by_path.keep_in_memory


# ------------------------------------------------------------------------------ perplexity
@pytest.mark.parametrize("vocab", [4, 97, 50257])
def test_perplexity_of_uniform_distribution_is_vocab_size(load, vocab):
    # Every token has probability 1/V: mean NLL = ln V, perplexity = V.
    out = load("perplexity").compute(log_probs=[math.log(1.0 / vocab)] * 13)
    assert out["num_tokens"] == 13
    assert out["mean_nll"] == pytest.approx(math.log(vocab), rel=1e-14)
    assert out["perplexity"] == pytest.approx(vocab, rel=1e-12)
    if vocab == 4:  # powers of two are exact in binary floating point
        assert out["perplexity"] == 4.0


def test_perplexity_of_mixed_probabilities(load):
    probs = [0.5, 0.25, 0.1, 0.9]
    out = load("perplexity").compute(log_probs=[math.log(p) for p in probs])
    # By hand: mean NLL = (ln 2 + ln 4 + ln 10 + ln(10/9)) / 4, and perplexity is the
    # inverse geometric mean of the probabilities: (1 / (0.5 * 0.25 * 0.1 * 0.9)) ** (1/4).
    nll = (math.log(2) + math.log(4) + math.log(10) + math.log(10 / 9)) / 4
    assert out == pytest.approx({"perplexity": (1 / 0.01125) ** 0.25, "mean_nll": nll, "num_tokens": 4}, rel=1e-12)
    assert out["perplexity"] == pytest.approx(3.0705196, rel=1e-7)


def test_perplexity_add_batch_equals_single_compute(load):
    rng = np.random.default_rng(0)
    batches = [np.log(rng.uniform(0.01, 1.0, size=n)).astype(np.float32) for n in (5, 1, 9)]
    ppl = load("perplexity")
    for b in batches:
        ppl.add_batch(log_probs=b)
    accumulated = ppl.compute()
    single = ppl.compute(log_probs=np.concatenate(batches))
    assert accumulated == single
    # Token-pooled, not an average of per-batch perplexities.
    flat = np.concatenate(batches).astype(np.float64)
    assert accumulated["perplexity"] == pytest.approx(math.exp(-flat.mean()), rel=1e-12)
    assert accumulated["num_tokens"] == 15


def test_perplexity_zero_probability_is_infinite(load):
    out = load("perplexity").compute(log_probs=[-math.inf, -1.0])
    assert out["perplexity"] == math.inf and out["mean_nll"] == math.inf


@pytest.mark.parametrize(
    "log_probs, match",
    [
        ([], "empty"),
        ([-0.5, 0.25], r"natural-log probabilities \(<= 0\), got 0.25 at index 1"),
        ([-0.5, math.nan], "NaN at index 1"),
    ],
)
def test_perplexity_rejects_bad_input(load, log_probs, match):
    with pytest.raises(ValueError, match=match):
        load("perplexity").compute(log_probs=log_probs)


# ------------------------------------------------------------------------------ accuracy
REFS = [0, 1, 2, 0, 1, 2]
PREDS = [0, 1, 1, 2, 1, 0]  # correct at positions 0, 1, 4
WEIGHTS = [0.5, 2, 0.7, 0.5, 9, 0.4]


def test_accuracy_values(load):
    acc = load("accuracy")
    assert acc.compute(predictions=PREDS, references=REFS) == {"accuracy": 0.5}
    assert acc.compute(predictions=PREDS, references=REFS, normalize=False) == {"accuracy": 3.0}
    # Weighted: correct weight (0.5 + 2 + 9) over total weight 13.1.
    weighted = acc.compute(predictions=PREDS, references=REFS, sample_weight=WEIGHTS)
    assert weighted["accuracy"] == pytest.approx(11.5 / 13.1, rel=1e-12)
    unnormalized = acc.compute(predictions=PREDS, references=REFS, sample_weight=WEIGHTS, normalize=False)
    assert unnormalized["accuracy"] == pytest.approx(11.5, rel=1e-12)
    assert acc.compute(predictions=[3, 3], references=[3, 3]) == {"accuracy": 1.0}


def test_accuracy_add_batch_equals_single_compute(load):
    acc = load("accuracy")
    for lo, hi in ((0, 2), (2, 3), (3, 6)):
        acc.add_batch(predictions=PREDS[lo:hi], references=REFS[lo:hi])
    # sample_weight spans everything compute() sees, across batches.
    accumulated = acc.compute(sample_weight=WEIGHTS)
    assert accumulated == acc.compute(predictions=PREDS, references=REFS, sample_weight=WEIGHTS)
    acc.add(prediction=1, reference=1)
    acc.add(prediction=0, reference=1)
    assert acc.compute() == {"accuracy": 0.5}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"predictions": [], "references": []}, "no examples"),
        ({"predictions": [0, 1], "references": [0, 1], "sample_weight": [1.0]}, "sample_weight has 1 values but there are 2"),
        ({"predictions": [0, 1], "references": [0, 1], "sample_weight": [0.0, 0.0]}, "sums to zero"),
        ({"predictions": [0, 1], "references": [0]}, "Mismatch in the number of predictions"),
    ],
)
def test_accuracy_rejects_bad_input(load, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load("accuracy").compute(**kwargs)


# ------------------------------------------------------------------------------ masked accuracy
def test_masked_accuracy_skips_ignore_index(load):
    mlm = load("masked_accuracy")
    # Scored positions: refs 7 (hit), 4 (miss, pred 9), 3 (hit); the -100s are never read.
    preds = [[5, 7, 9, 2], [3, 8]]
    refs = [[-100, 7, 4, -100], [3, -100]]
    assert mlm.compute(predictions=preds, references=refs) == {"masked_accuracy": 2 / 3, "num_masked": 3}
    # Flat layout, same positions.
    flat = mlm.compute(predictions=[t for row in preds for t in row], references=[t for row in refs for t in row])
    assert flat == {"masked_accuracy": 2 / 3, "num_masked": 3}
    # Custom ignore_index: 0 marks unscored positions, -100 is then an ordinary id.
    custom = mlm.compute(predictions=[5, 7, 9, 1], references=[0, 7, 9, -100], ignore_index=0)
    assert custom == {"masked_accuracy": 2 / 3, "num_masked": 3}


def test_masked_accuracy_add_batch_equals_single_compute(load):
    rng = np.random.default_rng(1)
    refs = rng.integers(0, 5, size=(6, 8))
    refs[rng.uniform(size=refs.shape) < 0.6] = -100
    refs[0, 0] = 3  # at least one scored position
    preds = np.where(rng.uniform(size=refs.shape) < 0.5, refs, rng.integers(0, 5, size=refs.shape))
    mlm = load("masked_accuracy")
    for lo, hi in ((0, 1), (1, 4), (4, 6)):
        mlm.add_batch(predictions=preds[lo:hi], references=refs[lo:hi])
    accumulated = mlm.compute()
    assert accumulated == mlm.compute(predictions=preds, references=refs)
    scored = refs != -100
    assert accumulated["num_masked"] == int(scored.sum())
    assert accumulated["masked_accuracy"] == pytest.approx((preds[scored] == refs[scored]).mean(), rel=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"predictions": [], "references": []}, "no positions given"),
        ({"predictions": [[1, 2]], "references": [[-100, -100]]}, "every reference equals ignore_index=-100"),
        ({"predictions": [[1, 2, 3]], "references": [[1, 2]]}, "example 0 has 3 predicted positions but 2 references"),
    ],
)
def test_masked_accuracy_rejects_bad_input(load, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load("masked_accuracy").compute(**kwargs)
