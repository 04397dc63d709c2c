"""Evaluate modules shipped with hf_relattn, loadable offline.

`evaluate.load("accuracy")` fetches its script from the Hugging Face Hub, which needs the
network. The modules here are plain local Evaluate scripts (one folder each, holding
`<name>/<name>.py` and its module card `README.md`), so they load from disk:

    >>> import hf_relattn.metrics
    >>> ppl = hf_relattn.metrics.load("perplexity")
    >>> ppl.compute(log_probs=[-1.0, -2.0])["perplexity"]  # exp(1.5)
    4.4816890703380645

or, equivalently, ``evaluate.load(hf_relattn.metrics.path("perplexity"))``.

The modules import nothing beyond numpy, datasets and evaluate:
- ``perplexity``: per-token natural-log probabilities -> perplexity, mean NLL, token count;
- ``accuracy``: integer predictions/references, optional ``normalize`` and ``sample_weight``;
- ``masked_accuracy``: masked-LM token accuracy, skipping references equal to ``ignore_index``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # evaluate is imported lazily: `path()` needs nothing but the file system
    import evaluate

__all__ = ["METRICS", "load", "path"]

METRICS = ("perplexity", "accuracy", "masked_accuracy")

_HERE = os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str:
    """Folder of the Evaluate module `name`, for ``evaluate.load(path(name))``.

    Raises:
        ValueError: `name` is not one of `METRICS`.
    """
    if name not in METRICS:
        raise ValueError(f"Unknown hf_relattn metric {name!r}; valid names: {', '.join(METRICS)}")
    return os.path.join(_HERE, name)


def load(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """Load the shipped module `name` with ``evaluate.load(path(name), **kwargs)``.

    `kwargs` are passed to `evaluate.load` unchanged (e.g. ``keep_in_memory=True``,
    ``experiment_id=...``, ``num_process``/``process_id`` for distributed evaluation).
    """
    import evaluate

    return evaluate.load(path(name), **kwargs)
